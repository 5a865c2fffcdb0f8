"""``dicomnode conformance check OURS THEIRS``: simulated negotiation with a peer."""

from __future__ import annotations

import click

from dicomnode.cli import CliState, pass_state


@click.command("check")
@pass_state
def check_cmd(state: CliState) -> None:
    """Pre-flight check of our policy against a peer's conformance (not written yet)."""
    raise click.ClickException("not implemented yet")
