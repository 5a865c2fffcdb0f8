"""C-ECHO SCP (PS3.4 A.4): Verification needs nothing but a success status."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pynetdicom.events import Event

from dicomnode.status import Status

if TYPE_CHECKING:
    from dicomnode.ae import Node


def handle_echo(event: Event, node: Node) -> Status:
    return Status.SUCCESS
