"""``dicomnode probe PEER``: discover what a live peer accepts."""

from __future__ import annotations

import click

from dicomnode.cli import CliState, pass_state


@click.command("probe")
@pass_state
def probe_cmd(state: CliState) -> None:
    """Discover what a live peer accepts (not written yet)."""
    raise click.ClickException("not implemented yet")


COMMANDS: list[click.Command] = [probe_cmd]
