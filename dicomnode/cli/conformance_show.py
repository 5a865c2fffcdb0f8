"""``dicomnode conformance show``: the conformance statement of the running policy."""

from __future__ import annotations

import click

from dicomnode.cli import CliState, pass_state


@click.command("show")
@pass_state
def show_cmd(state: CliState) -> None:
    """The node's DICOM Conformance Statement (not written yet)."""
    raise click.ClickException("not implemented yet")
