"""Association events: the policy decides what each caller may negotiate, and every rejection
(of an association or of a presentation context) is logged with its reason.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from pynetdicom.events import Event

from dicomnode.audit import FAILURE
from dicomnode.handlers.store import audit_stores
from dicomnode.policy import Decision
from dicomnode.tls import tls_peer

if TYPE_CHECKING:
    from dicomnode.ae import Node

log = logging.getLogger(__name__)

# PS3.8 9.3.4 A-ASSOCIATE-RJ: (result, source, reason). Result 1 rejected-permanent, 2
# rejected-transient; source 1 service-user, 2 service-provider (ACSE), 3 service-provider
# (presentation).
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)  # rejected-permanent, service-user
REJECT_CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)  # rejected-permanent, service-user
# The attribute marking an association this module rejected (and audited) itself.
_REJECTED_HERE = "_dicomnode_rejected"


def on_conn_open(event: Event, node: Node) -> None:
    # pynetdicom never sets TCP_NODELAY; without it each small PDU (a C-STORE-RSP, a C-ECHO) can
    # wait on Nagle's algorithm for the peer's delayed ACK.
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.debug("could not set TCP_NODELAY on an accepted connection")


def reject(node: Node, assoc: Any, rejection: tuple[int, int, int], why: str) -> None:
    """Send A-ASSOCIATE-RJ ``rejection`` (result, source, reason), log why (no patient data
    here: AE titles and addresses only) and audit it."""
    calling = node.calling_ae_title(assoc)
    log.warning("association from %s at %s rejected: %s", calling, _address(assoc.requestor), why)
    audit_rejection(node, assoc, rejection, why)
    setattr(assoc, _REJECTED_HERE, True)
    assoc.acse.send_reject(*rejection)
    # As pynetdicom does after its own rejections: let the DUL send the A-ASSOCIATE-RJ
    # before the connection is shut down.
    assoc.kill()


def audit_rejection(node: Node, assoc: Any, rejection: tuple[int, int, int], why: str) -> None:
    record_rejection(node, _who(node, assoc), rejection, why)


def record_rejection(
    node: Node,
    who: dict[str, Any],
    rejection: tuple[int, int, int] | tuple[None, None, None],
    why: str,
) -> None:
    """The association-rejected audit record: ``who`` as :func:`_who` gives it, ``rejection``
    the A-ASSOCIATE-RJ (result, source, reason), all None where none was sent (TLS)."""
    result, source, reason = rejection
    node.archive.audit.record(
        "association-rejected",
        outcome=FAILURE,
        **who,
        reason=why,
        result=result,
        source=source,
        reason_code=reason,
    )


def on_requested(event: Event, node: Node) -> None:
    """A-ASSOCIATE-RQ received: check who calls from where, choose the contexts this caller
    may have, or reject it."""
    assoc = event.assoc
    calling = node.calling_ae_title(assoc)
    config = node.config
    if config.require_called_ae_title:
        called = _called_ae_title(assoc)
        if called != config.ae_title:
            # PS3.8 7.1.1.4: the Called AE Title names the application the caller wants.
            reject(
                node,
                assoc,
                REJECT_CALLED_AE_NOT_RECOGNIZED,
                f"called AE title {called!r} is not this node's {config.ae_title!r} "
                "(require_called_ae_title)",
            )
            return
    peer = config.peer_by_ae_title(calling)
    info = getattr(assoc.requestor, "address_info", None)
    if peer is not None and not node.access.allowed_from(peer, str(getattr(info, "address", ""))):
        # An AE title is no credential: a known title from elsewhere is not that peer.
        reject(
            node,
            assoc,
            REJECT_CALLING_AE_NOT_RECOGNIZED,
            f"the AE title of peer {peer.name} from an address not in peers.{peer.name}.hosts",
        )
        return
    profile = node.profile_for(calling)
    if not profile.classes:
        reject(
            node,
            assoc,
            REJECT_CALLING_AE_NOT_RECOGNIZED,
            "calling AE title not allowed any service (configure it under peers, or widen "
            "unknown_peers)",
        )
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
    node.archive.audit.record(
        "association-accepted", **_who(node, assoc), tls=_tls_peer(assoc), contexts=accepted
    )
    if accepted == 0:
        log.warning(
            "association from %s accepted with no usable presentation context: every proposed "
            "context was rejected (see the lines above for why)",
            node.calling_ae_title(assoc),
        )


def on_rejected(event: Event, node: Node) -> None:
    """pynetdicom rejected the association itself (application context, the association
    limit); our own rejections (:func:`reject`) are logged and audited already."""
    assoc = event.assoc
    if getattr(assoc, _REJECTED_HERE, False):
        return
    primitive = assoc.acceptor.primitive
    reason = getattr(primitive, "reason_str", "") if primitive is not None else ""
    log.warning(
        "association from %s at %s rejected: %s",
        node.calling_ae_title(assoc),
        _address(assoc.requestor),
        reason or "see above",
    )
    rejection = tuple(
        int(getattr(primitive, name, 0) or 0) for name in ("result", "result_source", "diagnostic")
    )
    audit_rejection(node, assoc, (rejection[0], rejection[1], rejection[2]), reason or "rejected")


def on_conn_close_unrequested(event: Event, node: Node) -> None:
    """A connection that closed without ever sending an A-ASSOCIATE-RQ: a port scan, a load
    balancer's health check, or a peer that connected and said nothing until acse_timeout."""
    assoc = event.assoc
    if assoc.requestor.primitive is None:
        log.info(
            "connection from %s closed without an association request (limits.acse_timeout %.0f s)",
            _address(assoc.requestor),
            node.config.limits.acse_timeout,
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
    # The audit trail's record of what the association stored, per study.
    audit_stores(assoc, node)
    counts = node.forget(assoc)
    if counts:
        log.info(
            "association from %s closed: %s",
            node.calling_ae_title(assoc),
            ", ".join(f"{n} {what}" for what, n in sorted(counts.items())),
        )


def _called_ae_title(assoc: Any) -> str:
    primitive = assoc.requestor.primitive
    return str(getattr(primitive, "called_ae_title", "") or "").strip()


def _who(node: Node, assoc: Any) -> dict[str, Any]:
    """The audit fields naming the caller (PS3.15 A.5.3: the active participant and its
    network access point)."""
    info = getattr(assoc.requestor, "address_info", None)
    return {
        "calling_ae": node.calling_ae_title(assoc),
        "called_ae": _called_ae_title(assoc),
        "address": getattr(info, "address", None),
        "port": getattr(info, "port", None),
    }


def _tls_peer(assoc: Any) -> str | bool:
    """False over plain TCP; over TLS the version, cipher and the client certificate."""
    sock = getattr(assoc.dul.socket, "socket", None)
    peer = tls_peer(sock)
    return False if peer is None else peer.describe()


def _address(requestor: Any) -> str:
    info = getattr(requestor, "address_info", None)
    return f"{getattr(info, 'address', '?')}:{getattr(info, 'port', '?')}"
