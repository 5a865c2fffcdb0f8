"""C-STORE SCP (PS3.4 B.2): hand the received file to the archive, answer its status.

The audit trail gets one ``instances-stored`` record per association and study when the
association's connection closes (PS3.15 A.5.3.2 DICOM Instances Transferred: the study, the
source, how many), written by :func:`audit_stores`; refused instances one ``failure`` record per
association and status, so a peer sending thousands of refused instances writes a line, not
thousands.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicomnode.archive import StoreRequest
from dicomnode.audit import FAILURE, status_code
from dicomnode.handlers import peer_address
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
    if node.archive.audit.enabled:
        _stored(event.assoc, node, outcome.study_uid, rx.size)
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
    if node.archive.audit.enabled:
        _refused(event.assoc, node, status, reason)
    log.warning(
        "C-STORE from %s failed, %s: %s (SOP Instance UID %s)",
        node.calling_ae_title(event.assoc),
        describe(status),
        reason,
        cast(C_STORE, event.request).AffectedSOPInstanceUID,
    )
    return status


# --- the audit trail ---------------------------------------------------------------------------

# The tally rides on the pynetdicom Association itself, so it lives and dies with it.
_TALLY = "dicomnode_store_tally"
_tally_lock = threading.Lock()


@dataclass
class _Tally:
    """One association's stores until its connection closes: (count, bytes) by study UID, and
    (count, first reason) of the refused ones by status."""

    studies: dict[str, list[int]] = field(default_factory=dict)
    refused: dict[int, tuple[int, str]] = field(default_factory=dict)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _tally_of(assoc: Any) -> _Tally:
    tally: _Tally | None = getattr(assoc, _TALLY, None)
    if tally is None:
        with _tally_lock:
            tally = getattr(assoc, _TALLY, None)
            if tally is None:
                tally = _Tally()
                setattr(assoc, _TALLY, tally)
    return tally


def _stored(assoc: Any, node: Node, study_uid: str, size: int) -> None:
    tally = _tally_of(assoc)
    with tally.lock:
        if not tally.closed:
            counts = tally.studies.setdefault(study_uid, [0, 0])
            counts[0] += 1
            counts[1] += size
            return
    # The connection closed while this store was being committed (an abort): its tally is
    # written already, so this instance gets a record of its own rather than none.
    _write(assoc, node, {study_uid: [1, size]}, {})


def _refused(assoc: Any, node: Node, status: Status, reason: str) -> None:
    tally = _tally_of(assoc)
    with tally.lock:
        if not tally.closed:
            count, first = tally.refused.get(int(status), (0, reason))
            tally.refused[int(status)] = (count + 1, first)
            return
    _write(assoc, node, {}, {int(status): (1, reason)})


def audit_stores(assoc: Any, node: Node) -> None:
    """The association's connection closed: write its ``instances-stored`` records (nothing
    when it stored nothing and was refused nothing)."""
    tally = getattr(assoc, _TALLY, None)
    if tally is None:
        return
    with tally.lock:
        tally.closed = True
        studies, refused = tally.studies, tally.refused
        tally.studies, tally.refused = {}, {}
    _write(assoc, node, studies, refused)


def _write(
    assoc: Any,
    node: Node,
    studies: dict[str, list[int]],
    refused: dict[int, tuple[int, str]],
) -> None:
    audit = node.archive.audit
    calling = node.calling_ae_title(assoc)
    address = peer_address(assoc)
    for study_uid, (count, size) in studies.items():
        audit.record(
            "instances-stored",
            calling_ae=calling,
            address=address,
            study_uid=study_uid,
            count=count,
            bytes=size,
        )
    for status, (count, reason) in sorted(refused.items()):
        # PS3.15 A.5.3.2 with EventOutcomeIndicator failure: what was refused and why (the
        # reason of the first of them; reasons carry no patient data).
        audit.record(
            "instances-stored",
            FAILURE,
            calling_ae=calling,
            address=address,
            count=count,
            status=status_code(status),
            reason=reason,
        )
