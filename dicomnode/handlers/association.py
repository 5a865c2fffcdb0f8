"""Association events: the policy decides what each caller may negotiate, and every rejection
(of an association or of a presentation context) is logged with its reason.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from pynetdicom.events import Event

from dicomnode.policy import Decision

if TYPE_CHECKING:
    from dicomnode.ae import Node

log = logging.getLogger(__name__)

# PS3.8 9.3.4 A-ASSOCIATE-RJ: (result, source, reason).
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)  # rejected-permanent, service-user


def on_conn_open(event: Event, node: Node) -> None:
    # pynetdicom never sets TCP_NODELAY; without it each small PDU (a C-STORE-RSP, a C-ECHO) can
    # wait on Nagle's algorithm for the peer's delayed ACK.
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.debug("could not set TCP_NODELAY on an accepted connection")


def on_requested(event: Event, node: Node) -> None:
    """A-ASSOCIATE-RQ received: choose the contexts this caller may have, or reject it."""
    assoc = event.assoc
    calling = node.calling_ae_title(assoc)
    address = _address(assoc.requestor)
    profile = node.profile_for(calling)
    if not profile.classes:
        log.warning(
            "association from %s at %s rejected: calling AE title not allowed any service "
            "(configure it under peers, or widen unknown_peers)",
            calling,
            address,
        )
        assoc.acse.send_reject(*REJECT_CALLING_AE_NOT_RECOGNIZED)
        # As pynetdicom does after its own rejections: let the DUL send the A-ASSOCIATE-RJ
        # before the connection is shut down.
        assoc.kill()
        return
    assoc.acceptor.supported_contexts = node.contexts_for(profile)
    request = assoc.requestor.primitive
    proposed = [
        (int(cx.context_id or 0), str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
        for cx in (request.presentation_context_definition_list if request else [])
    ]
    decisions = profile.negotiate(proposed)
    node.remember_decisions(assoc, decisions)
    for decision in decisions:
        if not decision.accepted:
            log.info("association from %s: %s", calling, decision.describe())


def on_accepted(event: Event, node: Node) -> None:
    assoc = event.assoc
    accepted = len(assoc.accepted_contexts)
    decisions: list[Decision] = node.decisions(assoc)
    log.info(
        "association from %s at %s accepted: %d of %d presentation contexts",
        node.calling_ae_title(assoc),
        _address(assoc.requestor),
        accepted,
        len(decisions),
    )
    if accepted == 0:
        log.warning(
            "association from %s accepted with no usable presentation context: every proposed "
            "context was rejected (see the lines above for why)",
            node.calling_ae_title(assoc),
        )


def on_rejected(event: Event, node: Node) -> None:
    assoc = event.assoc
    primitive = assoc.acceptor.primitive
    reason = getattr(primitive, "reason_str", "") if primitive is not None else ""
    log.warning(
        "association from %s at %s rejected: %s",
        node.calling_ae_title(assoc),
        _address(assoc.requestor),
        reason or "see above",
    )


def on_aborted(event: Event, node: Node) -> None:
    log.warning("association from %s aborted", node.calling_ae_title(event.assoc))


def on_conn_close(event: Event, node: Node) -> None:
    """The connection ended, however: drop partial receives and log the association's tally."""
    assoc = event.assoc
    dropped = node.receiver.abandon(assoc)
    if dropped:
        log.warning(
            "association from %s ended mid-transfer: %d partial data set(s) discarded",
            node.calling_ae_title(assoc),
            dropped,
        )
    counts = node.forget(assoc)
    if counts:
        log.info(
            "association from %s closed: %s",
            node.calling_ae_title(assoc),
            ", ".join(f"{n} {what}" for what, n in sorted(counts.items())),
        )


def _address(requestor: Any) -> str:
    info = getattr(requestor, "address_info", None)
    return f"{getattr(info, 'address', '?')}:{getattr(info, 'port', '?')}"
