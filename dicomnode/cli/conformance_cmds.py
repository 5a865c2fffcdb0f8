"""``dicomnode conformance``: the node's conformance statement (``show``) and the pre-flight
check of our policy against a peer's conformance (``check``)."""

from __future__ import annotations

import click

from dicomnode.cli.conformance_check import check_cmd
from dicomnode.cli.conformance_show import show_cmd


@click.group("conformance")
def conformance() -> None:
    """The DICOM Conformance Statement of this node, and pre-flight checks against peers."""


conformance.add_command(show_cmd)
conformance.add_command(check_cmd)

COMMANDS: list[click.Command] = [conformance]
