"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3): the sub-operation engine.

pynetdicom's own retrieve SCP sends in-memory data sets over one association it opens before the
handler has said what will be sent. A node must do better: stream each stored file from disk as it
is, open as many associations to a move destination as more than 128 presentation contexts need,
fall back to a transfer syntax the destination accepts (``dicomnode.transcode``), and report exact
counts. So the two retrieve services are served by :class:`RetrieveServiceClass`, which pynetdicom
picks for the MOVE and GET SOP classes once :func:`install_retrieve_hooks` has run (pinned to
pynetdicom 3.0.x in pyproject.toml, like ``dicomnode.receive``). The archive says what to send; this
module only moves bytes and keeps count.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO, FileIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, association
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

from dicomnode import scu, transcode
from dicomnode.audit import FAILURE, SUCCESS, status_code
from dicomnode.config import Peer
from dicomnode.dimse_codec import command_set
from dicomnode.handlers import decode_identifier, peer_address, query_level
from dicomnode.index.query import QueryError, StoredInstance
from dicomnode.policy import uid_name
from dicomnode.qr import Operation, model_of
from dicomnode.status import Category, Status, category, describe

if TYPE_CHECKING:
    from dicomnode.ae import Node

log = logging.getLogger(__name__)

# PS3.7 9.3.2.2: the sub-operation counts are US, so one retrieval is at most 65535 instances.
MAX_SUBOPERATIONS = 0xFFFF
_UNCOMPRESSED_LE = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
# Largest data set fragment we send (a peer may announce a huge or unlimited maximum PDU length,
# PS3.8 D.1; shorter PDUs are always allowed), so the read buffer stays small however large the
# instance.
_MAX_FRAGMENT = 1024 * 1024
# How long one wait for a response blocks before checking that the association is still alive.
_WAIT_SLICE = 0.5
_PENDING = 0xFF00
_NO_DATA_SET, _DATA_SET = 0x0101, 0x0001
_MEDIUM_PRIORITY = 0x0002
_C_STORE_RQ = 0x0001
_RSP_FIELD = {True: 0x8021, False: 0x8010}  # C-MOVE-RSP, C-GET-RSP
_PDU_HEADER = struct.Struct(">BBIIBB")  # P-DATA-TF with one PDV item (PS3.8 9.3.5, E.2)


@dataclass
class Tally:
    """Sub-operation counts (PS3.4 C.4.2.1.4), the SOP Instance UIDs that failed, and the
    studies whose instances were sent (for the audit trail), in order."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    studies: dict[str, None] = field(default_factory=dict)

    def record(self, uid: str, status: int | None, study_uid: str = "") -> None:
        self.remaining -= 1
        outcome = Category.FAILURE if status is None else category(status)
        if outcome is Category.SUCCESS:
            self.completed += 1
        elif outcome is Category.WARNING:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(uid)
            return
        if study_uid:
            self.studies[study_uid] = None


@dataclass(frozen=True)
class Sent:
    """One sub-operation's outcome: the peer's C-STORE status, or why there is none."""

    status: int | None
    reason: str = ""
    lost: bool = False  # the association can carry no more sub-operations


class RetrieveServiceClass(QueryRetrieveServiceClass):
    """The Query/Retrieve service class with dicomnode's C-MOVE and C-GET."""

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        _Retrieval(self, req, context, move=True).run()

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        _Retrieval(self, req, context, move=False).run()


class _Retrieval:
    """One C-MOVE or C-GET request, from identifier to final response."""

    def __init__(
        self,
        service: RetrieveServiceClass,
        req: C_MOVE | C_GET,
        context: PresentationContext,
        move: bool,
    ) -> None:
        self.service = service
        self.req = req
        self.context = context
        self.move = move
        self.assoc: Association = service.assoc
        self.node: Node = self.assoc.ae.dicomnode_node  # type: ignore[attr-defined]
        self.calling = self.node.calling_ae_title(self.assoc)
        self.operation = Operation.MOVE if move else Operation.GET
        self.name = self.operation.value
        self.msg_id = int(req.MessageID or 0)
        # As the request names it (for the audit trail, also when it is refused).
        self.move_destination = str(cast(C_MOVE, req).MoveDestination or "").strip() if move else ""
        self.level: str | None = None
        self.service.statuses = (
            QR_MOVE_SERVICE_CLASS_STATUS if move else QR_GET_SERVICE_CLASS_STATUS
        )
        # Pending responses (and, for C-GET, the sub-operations) go straight to the socket.
        self.wire = _Wire.of(self.assoc)

    # --- the protocol ----------------------------------------------------------------------

    def run(self) -> None:
        model = model_of(str(self.context.abstract_syntax), self.operation)
        if model is None:
            self._refuse(Status.SOP_CLASS_NOT_SUPPORTED, "information model not supported")
            return
        destination = None
        if self.move:
            destination = self._destination()
            if destination is None:
                return
        try:
            identifier = self._identifier()
            self.level = query_level(identifier)
            items = self.node.archive.retrieve(model, identifier)
        except QueryError as exc:
            status = (
                Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
                if exc.hierarchy
                else Status.UNABLE_TO_PROCESS
            )
            self._refuse(status, exc.reason)
            return
        except Exception as exc:  # an identifier pydicom cannot decode
            self._refuse(Status.UNABLE_TO_PROCESS, f"identifier cannot be decoded: {exc}")
            return
        if len(items) > MAX_SUBOPERATIONS:
            self._refuse(
                Status.UNABLE_TO_PROCESS,
                f"{len(items)} instances match; one retrieval carries at most "
                f"{MAX_SUBOPERATIONS} (PS3.7 C.4.2.1.4: counts are US)",
            )
            return
        tally = Tally(remaining=len(items))
        if items:
            sender = _MoveSender(self, cast(Peer, destination)) if self.move else _GetSender(self)
            cancelled = self._suboperations(sender, items, tally)
            if cancelled:
                return
            if isinstance(sender, _MoveSender):
                log.info(
                    "C-MOVE to %s used %d association(s)",
                    sender.destination.name,
                    sender.associations,
                )
        self._final(tally, destination)

    def _destination(self) -> Peer | None:
        """The configured peer the C-MOVE names; never an address the caller gives."""
        wanted = self.move_destination
        config = self.node.config
        peer = config.peer_by_ae_title(wanted)
        if peer is None:
            # PS3.4 C.4.2.1.5: A801, and no connection is attempted.
            self._refuse(
                Status.MOVE_DESTINATION_UNKNOWN,
                f"move destination {wanted!r} is not a configured peer",
            )
            return None
        if not config.may_move_to(self.calling, peer):
            self._refuse(
                Status.NOT_AUTHORIZED,
                f"{self.calling} may not move to {peer.name} (peers.*.move_destinations)",
            )
            return None
        return peer

    def _identifier(self) -> Dataset:
        return decode_identifier(
            cast(BytesIO, self.req.Identifier), UID(self.context.transfer_syntax[0])
        )

    def _suboperations(self, sender: _Sender, items: list[StoredInstance], tally: Tally) -> bool:
        """Run every sub-operation, reporting each; True when a C-CANCEL ended them."""
        try:
            for item, sent in sender.send_all(items, self._cancelled):
                if not sent.lost and sent.status is not None and sent.reason:
                    log.info("%s sub-operation: %s", self.name, sent.reason)
                if sent.status is None or category(sent.status) is Category.FAILURE:
                    log.warning(
                        "%s from %s: %s not sent%s: %s",
                        self.name,
                        self.calling,
                        item.sop_instance_uid,
                        "" if sent.status is None else f" ({describe(sent.status)})",
                        sent.reason or "refused by the destination",
                    )
                tally.record(item.sop_instance_uid, sent.status, item.study_uid)
                if tally.remaining:
                    self._respond(Status.PENDING, tally, with_failures=False)
        finally:
            sender.close()
        if self._cancel_seen:
            log.info(
                "%s from %s cancelled: %d completed, %d failed, %d remaining",
                self.name,
                self.calling,
                tally.completed,
                tally.failed,
                tally.remaining,
            )
            self._audit(Status.CANCEL, tally)
            self._respond(Status.CANCEL, tally, with_failures=True, remaining=True)
            return True
        return False

    _cancel_seen = False

    def _cancelled(self) -> bool:
        # PS3.4 C.4.2.3.1: a C-CANCEL stops further sub-operations; the final status is Cancel.
        if not self._cancel_seen and self.service.is_cancelled(self.msg_id):
            self._cancel_seen = True
        return self._cancel_seen

    def _final(self, tally: Tally, destination: Peer | None) -> None:
        total = tally.completed + tally.failed + tally.warning
        if tally.failed and tally.failed == total:
            status = Status.UNABLE_TO_PERFORM_SUBOPERATIONS
        elif tally.failed or tally.warning:
            status = Status.SUBOPERATIONS_COMPLETE_WITH_FAILURES
        else:
            status = Status.SUCCESS
        log.info(
            "%s from %s%s: %d instances, %d completed, %d failed, %d warning",
            self.name,
            self.calling,
            f" to {destination.name}" if destination else "",
            total,
            tally.completed,
            tally.failed,
            tally.warning,
        )
        self._audit(status, tally)
        self._respond(status, tally, with_failures=status != Status.SUCCESS)

    # --- responses -------------------------------------------------------------------------

    def _refuse(self, status: Status, reason: str) -> None:
        log.warning(
            "%s from %s refused, %s: %s",
            self.name,
            self.calling,
            describe(status, self.operation),
            reason,
        )
        self._audit(status, None, reason)
        self._respond(status, None, with_failures=False)

    def _audit(self, status: Status, tally: Tally | None, reason: str = "") -> None:
        """The audit trail's ``retrieve`` record (PS3.15 A.5.3.2 DICOM Instances Transferred,
        from us): who asked, to where, at which level, which studies went, the counts. A
        refusal, or any failed sub-operation, makes it a ``failure`` record."""
        audit = self.node.archive.audit
        if not audit.enabled:
            return
        failed = category(status) is Category.FAILURE or (tally is not None and tally.failed > 0)
        fields: dict[str, Any] = {
            "calling_ae": self.calling,
            "address": peer_address(self.assoc),
            "operation": "move" if self.move else "get",
            "destination": self.move_destination if self.move else None,
            "level": self.level,
            "study_uids": list(tally.studies) if tally is not None else [],
            "completed": tally.completed if tally is not None else 0,
            "failed": tally.failed if tally is not None else 0,
            "warning": tally.warning if tally is not None else 0,
            "status": status_code(status),
        }
        if reason:
            fields["reason"] = reason
        audit.record("retrieve", FAILURE if failed else SUCCESS, **fields)

    def _respond(
        self, status: Status, tally: Tally | None, *, with_failures: bool, remaining: bool = False
    ) -> None:
        if status == Status.PENDING and tally is not None and self.wire is not None:
            self._pending(tally, self.wire)
            return
        rsp = C_MOVE() if self.move else C_GET()
        rsp.MessageIDBeingRespondedTo = self.req.MessageID
        rsp.AffectedSOPClassUID = self.req.AffectedSOPClassUID
        rsp.Status = int(status)
        if tally is not None:
            # PS3.4 C.4.2.1.4: Remaining in pending (and cancel) responses; the others always.
            if status == Status.PENDING or remaining:
                rsp.NumberOfRemainingSuboperations = tally.remaining
            rsp.NumberOfCompletedSuboperations = tally.completed
            rsp.NumberOfFailedSuboperations = tally.failed
            rsp.NumberOfWarningSuboperations = tally.warning
            if with_failures and tally.failed_uids:
                ds = Dataset()
                ds.FailedSOPInstanceUIDList = tally.failed_uids
                ts = self.context.transfer_syntax[0]
                encoded = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
                rsp.Identifier = BytesIO(cast(bytes, encoded))
        if self.assoc.is_established:
            self.service.dimse.send_msg(rsp, int(self.context.context_id or 0))

    def _pending(self, tally: Tally, wire: _Wire) -> None:
        """A pending response (PS3.4 C.4.2.1.4), encoded as pynetdicom would and written at once."""
        command = command_set(
            {
                "AffectedSOPClassUID": str(self.req.AffectedSOPClassUID or "") or None,
                "CommandField": _RSP_FIELD[self.move],
                "MessageIDBeingRespondedTo": self.msg_id,
                "CommandDataSetType": _NO_DATA_SET,
                "Status": _PENDING,
                "NumberOfRemainingSuboperations": tally.remaining,
                "NumberOfCompletedSuboperations": tally.completed,
                "NumberOfFailedSuboperations": tally.failed,
                "NumberOfWarningSuboperations": tally.warning,
            }
        )
        try:
            wire.send(int(self.context.context_id or 0), command)
        except OSError as exc:
            log.warning("%s from %s: pending response not sent: %s", self.name, self.calling, exc)
            self.wire = None


# --- sending -----------------------------------------------------------------------------------


class _Sender:
    """Sends stored instances as C-STORE sub-operations over some association(s)."""

    def __init__(self, retrieval: _Retrieval) -> None:
        self.retrieval = retrieval
        self.archive = retrieval.node.archive
        self.associations = 0  # opened for the sub-operations (C-MOVE)

    def send_all(
        self, items: list[StoredInstance], cancelled: Callable[[], bool]
    ) -> Iterator[tuple[StoredInstance, Sent]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sender opened."""

    def send_one(
        self,
        assoc: Association,
        accepted: dict[str, list[str]],
        item: StoredInstance,
        msg_id: int,
        wire: _Wire | None = None,
        contexts: dict[tuple[str, str], int] | None = None,
    ) -> Sent:
        """C-STORE one instance: as stored when the peer accepted its syntax, else transcoded
        into one it accepted (never into a lossy one), else a failure saying why.

        With a ``wire`` the file is streamed straight from disk to the socket (the context for
        its stored syntax taken from ``contexts``); otherwise, and for anything that needs
        converting, pynetdicom's ``send_c_store`` sends it."""
        try:
            path = self.archive.path_of(item)
        except OSError as exc:
            return Sent(None, f"stored file unavailable: {exc}")
        syntaxes = accepted.get(item.sop_class_uid, [])
        target = transcode.choose_syntax(item.transfer_syntax, syntaxes)
        if target is None:
            offered = ", ".join(uid_name(t) for t in syntaxes) or "no presentation context"
            return Sent(
                None,
                f"the destination accepts {uid_name(item.sop_class_uid)} in {offered}; stored "
                f"as {uid_name(item.transfer_syntax)} and no lossless conversion fits",
            )
        if target == item.transfer_syntax and wire is not None and contexts is not None:
            context_id = contexts.get((item.sop_class_uid, target))
            if context_id is not None:
                sent = self._stream(assoc, wire, context_id, path, item, msg_id)
                if sent is not None:
                    return sent
        what: Path | Dataset = path
        note = ""
        try:
            if target != item.transfer_syntax:
                what = transcode.transcode(path, target)
                note = f"sent as {uid_name(target)}, stored as {uid_name(item.transfer_syntax)}"
            elif _odd_length(path):
                # PS3.5 7.1: encoded lengths are even; an odd deflate stream is re-encoded and
                # padded by pynetdicom rather than streamed as it is.
                what = dcmread(path)
        except (transcode.TranscodeError, OSError, ValueError) as exc:
            return Sent(None, f"cannot convert for the destination: {exc}")
        try:
            rsp = assoc.send_c_store(
                what,
                msg_id=msg_id,
                originator_aet=self.originator(),
                originator_id=self.retrieval.msg_id if self.originator() else None,
            )
        except (ValueError, AttributeError, RuntimeError) as exc:
            return Sent(None, f"C-STORE not sent: {exc}", lost=not assoc.is_established)
        except OSError as exc:
            return Sent(None, f"read error while sending: {exc}", lost=True)
        if "Status" not in rsp:
            return Sent(None, "no C-STORE response (association aborted or timed out)", lost=True)
        return Sent(int(rsp.Status), note)

    def originator(self) -> str | None:
        return None

    _originator_ae: str | None = None

    def originator_ae(self) -> str | None:
        """The Move Originator AE title as pynetdicom's C-STORE primitive normalises it."""
        if self._originator_ae is None and self.originator() is not None:
            probe = C_STORE()
            probe.MoveOriginatorApplicationEntityTitle = self.originator()
            self._originator_ae = probe.MoveOriginatorApplicationEntityTitle
        return self._originator_ae

    def _stream(
        self,
        assoc: Association,
        wire: _Wire,
        context_id: int,
        path: Path,
        item: StoredInstance,
        msg_id: int,
    ) -> Sent | None:
        """C-STORE ``path`` as stored, written from the file to the socket in PDU-sized reads;
        None when the file needs pynetdicom's path (not our File Meta layout, odd length)."""
        try:
            fp = path.open("rb", buffering=0)
        except OSError as exc:
            return Sent(None, f"stored file unavailable: {exc}")
        with fp:
            try:
                span = _data_set_span(fp)
            except OSError as exc:
                return Sent(None, f"stored file unavailable: {exc}")
            if span is None:
                return None
            offset, length = span
            if length % 2:
                # PS3.5 7.1: encoded lengths are even; an odd deflate stream is re-encoded and
                # padded by pynetdicom rather than streamed as it is.
                return None
            originator = self.originator_ae()
            command = command_set(
                {
                    "AffectedSOPClassUID": item.sop_class_uid,
                    "CommandField": _C_STORE_RQ,
                    "MessageID": msg_id,
                    "Priority": _MEDIUM_PRIORITY,
                    "CommandDataSetType": _DATA_SET,
                    "AffectedSOPInstanceUID": item.sop_instance_uid,
                    "MoveOriginatorApplicationEntityTitle": originator,
                    "MoveOriginatorMessageID": self.retrieval.msg_id if originator else None,
                }
            )
            try:
                fp.seek(offset)
                wire.send(context_id, command, fp, length)
            except OSError as exc:
                # Part of a message may be on the wire: the association can carry no more.
                return Sent(None, f"C-STORE interrupted: {exc}", lost=True)
        rsp = _await_response(assoc)
        if rsp is None:
            if assoc.is_established:
                assoc.abort()
            return Sent(None, "no C-STORE response (association aborted or timed out)", lost=True)
        if (
            not isinstance(rsp, C_STORE)
            or rsp.Status is None
            or rsp.MessageIDBeingRespondedTo != msg_id
        ):
            return Sent(None, f"unexpected {type(rsp).__name__} instead of the C-STORE response")
        return Sent(int(rsp.Status))


class _Wire:
    """Whole DIMSE messages written by the calling thread straight to an association's socket.

    pynetdicom passes every PDU through a queue to its DUL thread, which encodes it (a copy)
    and sends it: for a stored instance that is dozens of thread hand-offs and copies. During a
    retrieval its thread is the only one sending on the associations it uses, and every message
    is wholly on the socket (``sendall`` returned) before anything else is queued to pynetdicom,
    so PDUs of two messages never interleave. Reading still goes through pynetdicom's DUL thread.
    TLS sockets are left to pynetdicom (their SSL object belongs to the DUL thread).
    """

    def __init__(self, sock: socket.socket, max_pdu: int) -> None:
        self.sock = sock
        self.fragment = min(max_pdu - 6, _MAX_FRAGMENT) if max_pdu > 6 else _MAX_FRAGMENT
        self.buffer = bytearray(12 + self.fragment)
        self.view = memoryview(self.buffer)

    @classmethod
    def of(cls, assoc: Association) -> _Wire | None:
        transport = getattr(assoc.dul, "socket", None)
        sock = getattr(transport, "socket", None)
        if type(sock) is not socket.socket or isinstance(sock, ssl.SSLSocket):
            return None
        if not assoc.is_established:
            return None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return None
        return cls(sock, int(assoc.dimse.maximum_pdu_size or 0))

    def send(
        self, context_id: int, command: bytes, fp: FileIO | None = None, length: int = 0
    ) -> None:
        """The command set, then ``length`` bytes of data set read from ``fp`` (PS3.8 E.2:
        control header bit 0 command/data, bit 1 last fragment)."""
        fragment, sendall = self.fragment, self.sock.sendall
        for start in range(0, len(command), fragment):
            chunk = command[start : start + fragment]
            last = start + fragment >= len(command)
            n = len(chunk)
            sendall(_PDU_HEADER.pack(4, 0, n + 6, n + 2, context_id, 3 if last else 1) + chunk)
        if fp is None:
            return
        buffer, view, readinto = self.buffer, self.view, fp.readinto
        left = length
        while True:
            n = min(fragment, left)
            got = 0
            while got < n:
                read = readinto(view[12 + got : 12 + n])
                if not read:
                    raise OSError(f"stored file ended {left - got} bytes early")
                got += read
            left -= n
            _PDU_HEADER.pack_into(buffer, 0, 4, 0, n + 6, n + 2, context_id, 0 if left else 2)
            sendall(view[: 12 + n])
            if not left:
                return


def _data_set_span(fp: FileIO) -> tuple[int, int] | None:
    """(offset, length) of the data set in a stored file with our File Meta (group length at
    offset 140, PS3.10 7.1), or None for any other layout."""
    head = fp.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return None
    offset = 144 + int(struct.unpack_from("<I", head, 140)[0])
    size = os.fstat(fp.fileno()).st_size
    if offset > size:
        return None
    return offset, size - offset


def _await_response(assoc: Association) -> Any:
    """The next DIMSE message on ``assoc`` (the response), or None when the association ends
    or none comes within the DIMSE timeout."""
    dimse = assoc.dimse
    timeout = dimse.dimse_timeout
    deadline = None if timeout is None else time.monotonic() + float(timeout)
    while True:
        try:
            _, rsp = dimse.msg_queue.get(timeout=_WAIT_SLICE)
            return rsp
        except queue.Empty:
            pass
        if assoc.is_aborted or not assoc.is_established or not assoc.dul.is_alive():
            return None
        if deadline is not None and time.monotonic() > deadline:
            return None


def _odd_length(path: Path) -> bool:
    """Whether a stored file's data set has an odd length (our File Meta starts with its group
    length at offset 140, PS3.10 7.1)."""
    with path.open("rb") as fp:
        fp.seek(140)
        group_length = int(struct.unpack("<I", fp.read(4))[0])
        return (os.fstat(fp.fileno()).st_size - 144 - group_length) % 2 == 1


def _accepted(assoc: Association, as_scu_only: bool) -> dict[str, list[str]]:
    """Accepted transfer syntaxes per SOP class on ``assoc``."""
    accepted: dict[str, list[str]] = {}
    for cx in assoc.accepted_contexts:
        if as_scu_only and not cx.as_scu:
            continue
        accepted.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
    return accepted


def _context_ids(assoc: Association, as_scu_only: bool) -> dict[tuple[str, str], int]:
    """Accepted presentation context IDs by (SOP class, transfer syntax) on ``assoc``."""
    found: dict[tuple[str, str], int] = {}
    for cx in assoc.accepted_contexts:
        if as_scu_only and not cx.as_scu:
            continue
        key = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        found.setdefault(key, int(cx.context_id or 0))
    return found


class _MoveSender(_Sender):
    """C-MOVE: sub-operations on our own association(s) to the configured destination."""

    def __init__(self, retrieval: _Retrieval, destination: Peer) -> None:
        super().__init__(retrieval)
        self.destination = destination
        self.config = retrieval.node.config

    def originator(self) -> str | None:
        # PS3.7 9.1.1.1: the Move Originator is the AE that asked for the move.
        return str(self.retrieval.calling)

    def send_all(
        self, items: list[StoredInstance], cancelled: Callable[[], bool]
    ) -> Iterator[tuple[StoredInstance, Sent]]:
        ae = scu.make_ae(self.config)
        for batch, contexts in presentation_batches(items):
            if cancelled():
                return
            assoc, failure = scu.request_association(ae, self.config, self.destination, contexts)
            if failure is not None:
                log.warning("C-MOVE to %s: %s", self.destination.name, failure.message)
                for item in batch:
                    yield item, Sent(None, f"no association: {failure.message}")
                continue
            self.associations += 1
            accepted = _accepted(assoc, as_scu_only=False)
            context_ids = _context_ids(assoc, as_scu_only=False)
            wire = _Wire.of(assoc)
            if wire is not None:
                # The association's own thread must leave the responses to us (as pynetdicom's
                # send_c_store makes it): paused until the batch is done.
                assoc._reactor_checkpoint.clear()
                while not assoc._is_paused and assoc.is_established:
                    time.sleep(0.0001)
            lost = ""
            try:
                for msg_id, item in enumerate(batch, start=1):
                    if lost:
                        yield item, Sent(None, lost)
                        continue
                    if cancelled():
                        return
                    sent = self.send_one(
                        assoc, accepted, item, msg_id % 0xFFFF or 1, wire, context_ids
                    )
                    if sent.lost:
                        lost = f"not sent: the association to {self.destination.name} was lost"
                    yield item, sent
            finally:
                assoc._reactor_checkpoint.set()
                if assoc.is_established:
                    if lost:
                        assoc.abort()
                    else:
                        assoc.release()


class _GetSender(_Sender):
    """C-GET: sub-operations on the requesting association, where it took the SCP role."""

    def send_all(
        self, items: list[StoredInstance], cancelled: Callable[[], bool]
    ) -> Iterator[tuple[StoredInstance, Sent]]:
        assoc = self.retrieval.assoc
        accepted = _accepted(assoc, as_scu_only=True)
        contexts = _context_ids(assoc, as_scu_only=True)
        lost = ""
        for msg_id, item in enumerate(items, start=1):
            if lost:
                yield item, Sent(None, lost)
                continue
            if cancelled():
                return
            sent = self.send_one(
                assoc,
                accepted,
                item,
                (self.retrieval.msg_id + msg_id) % 0xFFFF or 1,
                self.retrieval.wire,
                contexts,
            )
            if sent.lost:
                lost = "not sent: the association was lost"
            yield item, sent


def presentation_batches(
    items: Sequence[StoredInstance],
) -> Iterable[tuple[list[StoredInstance], list[PresentationContext]]]:
    """Group instances into associations of at most 128 presentation contexts (PS3.8 9.3.2.2).

    Each (SOP class, stored syntax) gets a context of its own, and a SOP class not already
    proposed in both uncompressed little endian syntaxes also one offering the two, so the
    destination can take a decompressed or re-encoded copy when it refuses the stored syntax (a
    PACS that takes only implicit VR little endian, PS3.5 10.1, still gets what we hold as
    explicit VR). A SOP class's contexts never straddle two associations.
    """
    needs: dict[str, list[str]] = {}
    for item in items:
        syntaxes = needs.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax not in syntaxes:
            syntaxes.append(item.transfer_syntax)

    def fallback(syntaxes: list[str]) -> bool:
        return not set(_UNCOMPRESSED_LE) <= set(syntaxes)

    groups: list[list[str]] = [[]]
    sizes = [0]
    for sop_class, syntaxes in needs.items():
        size = len(syntaxes) + (1 if fallback(syntaxes) else 0)
        if sizes[-1] + size > scu.MAX_CONTEXTS_PER_ASSOCIATION:
            groups.append([])
            sizes.append(0)
        groups[-1].append(sop_class)
        sizes[-1] += size
    for group in groups:
        classes = set(group)
        batch = [item for item in items if item.sop_class_uid in classes]
        contexts = []
        for sop_class in group:
            syntaxes = needs[sop_class]
            contexts += [build_context(sop_class, [ts]) for ts in syntaxes]
            if fallback(syntaxes):
                contexts.append(build_context(sop_class, list(_UNCOMPRESSED_LE)))
        yield batch, contexts


# --- installation ------------------------------------------------------------------------------

_pynetdicom_service_class = association.uid_to_service_class  # type: ignore[attr-defined]
_installed = False


def _service_class(uid: str) -> Any:
    if model_of(uid, Operation.MOVE) or model_of(uid, Operation.GET):
        return RetrieveServiceClass
    return _pynetdicom_service_class(uid)


def install_retrieve_hooks() -> None:
    """Serve C-MOVE and C-GET with :class:`RetrieveServiceClass` (idempotent; called when a
    node starts, never at import time). Stored files are sent as they are on disk."""
    global _installed
    if _installed:
        return
    if not hasattr(association, "uid_to_service_class"):
        raise RuntimeError("this pynetdicom version lacks the service-class lookup we hook")
    _config.STORE_SEND_CHUNKED_DATASET = True
    association.uid_to_service_class = _service_class
    _installed = True
