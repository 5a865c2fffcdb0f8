"""C-STORE SCP (PS3.4 B.2): hand the received file to the archive, answer its status."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicomnode.archive import StoreRequest
from dicomnode.policy import uid_name
from dicomnode.status import Status, describe

if TYPE_CHECKING:
    from dicomnode.ae import Node

log = logging.getLogger(__name__)


def handle_store(event: Event, node: Node) -> Status:
    request = cast(C_STORE, event.request)
    calling = node.calling_ae_title(event.assoc)
    sop_class = str(request.AffectedSOPClassUID or "")
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    rx = node.receiver.take(str(event.dataset_path))
    if rx is None:  # pynetdicom handed us a file we did not open: nothing we can vouch for
        return _failed(event, node, Status.OUT_OF_RESOURCES, "received data set not found")
    if rx.refused:
        rx.discard()
        return _failed(event, node, Status.OUT_OF_RESOURCES, rx.refused)
    context = event.context
    # PS3.7 9.1.1.1: the Affected SOP Class UID must be the context's abstract syntax; a SOP class
    # the policy did not accept on this association cannot slip in under another's context.
    if sop_class != context.abstract_syntax:
        rx.discard()
        return _failed(
            event,
            node,
            Status.SOP_CLASS_NOT_SUPPORTED,
            f"Affected SOP Class UID {uid_name(sop_class)} sent on the presentation context of "
            f"{uid_name(str(context.abstract_syntax))}",
        )
    outcome = node.archive.store(
        rx.path,
        StoreRequest(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax=str(context.transfer_syntax),
            calling_ae_title=calling,
        ),
    )
    if outcome.status != Status.SUCCESS:
        return _failed(event, node, outcome.status, outcome.reason)
    node.count(event.assoc, "stored")
    if log.isEnabledFor(logging.DEBUG):  # uid_name looks the UID up: not for every instance
        log.debug(
            "stored %s %s from %s%s",
            uid_name(sop_class),
            sop_instance,
            calling,
            f" ({outcome.reason})" if outcome.reason else "",
        )
    return outcome.status


def _failed(event: Event, node: Node, status: Status, reason: str) -> Status:
    node.count(event.assoc, "failed")
    log.warning(
        "C-STORE from %s failed, %s: %s (SOP Instance UID %s)",
        node.calling_ae_title(event.assoc),
        describe(status),
        reason,
        cast(C_STORE, event.request).AffectedSOPInstanceUID,
    )
    return status
