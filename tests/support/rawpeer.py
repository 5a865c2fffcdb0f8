"""A scripted raw peer: a TCP connection that sends exactly the bytes a test builds, and reads and
decodes what the node answers (PS3.8 9.3 PDUs), always against a deadline.

Builders give valid PDUs to start from (A-ASSOCIATE-RQ through pynetdicom's own encoder, P-DATA-TF
and its PDV items by hand, DIMSE command sets in Implicit VR Little Endian as PS3.7 6.3.1 says), so
a test can then break exactly one thing about them.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from tests.support.corpus import TEST_FILES

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT = str(ImplicitVRLittleEndian)
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.3811.7"

# PDU types, PS3.8 9.3.1
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07

# PDV message control header, PS3.8 E.2: bit 0 command (1) or data set (0), bit 1 last fragment.
DATA_MORE, COMMAND_MORE, DATA_LAST, COMMAND_LAST = 0x00, 0x01, 0x02, 0x03

HEADER = struct.Struct(">BBI")
PDV_HEADER = struct.Struct(">IB")


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU of ``pdu_type``: its header (declaring ``length``, else the body's) and ``body``."""
    return HEADER.pack(pdu_type, 0, len(body) if length is None else length) + body


def associate_rq(
    contexts: Sequence[tuple[int, str, Sequence[str]]],
    calling: str = "RAWPEER",
    called: str = "DICOMNODE",
    max_pdu: int = 16384,
) -> bytes:
    """A valid A-ASSOCIATE-RQ proposing ``(context ID, abstract syntax, [transfer syntaxes])``."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    proposed = []
    for context_id, abstract, syntaxes in contexts:
        cx = build_context(abstract, list(syntaxes))
        cx.context_id = context_id
        proposed.append(cx)
    primitive.presentation_context_definition_list = proposed
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_UID
    primitive.user_information = [length, implementation]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode())


def release_rq() -> bytes:
    return pdu(RELEASE_RQ, b"\x00" * 4)


def abort_rq() -> bytes:
    return pdu(ABORT, b"\x00\x00\x00\x00")


def pdv(context_id: int, control: int, fragment: bytes, length: int | None = None) -> bytes:
    """One PDV item (PS3.8 9.3.5.1): its length (the context ID, the control header and the
    fragment, unless ``length`` says otherwise), context ID, control header, fragment."""
    real = len(fragment) + 2
    return struct.pack(">IBB", real if length is None else length, context_id, control) + fragment


def p_data(*items: bytes, length: int | None = None) -> bytes:
    """A P-DATA-TF PDU carrying the PDV ``items`` (each from :func:`pdv`)."""
    return pdu(P_DATA_TF, b"".join(items), length)


def command_set(**elements: object) -> bytes:
    """A DIMSE command set (PS3.7 E.1) with its Command Group Length, Implicit VR LE."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, True, True)
    assert body is not None
    group = Dataset()
    group.CommandGroupLength = len(body)
    head = encode(group, True, True)
    assert head is not None
    return bytes(head) + bytes(body)


def echo_rq(message_id: int = 1) -> bytes:
    return command_set(
        AffectedSOPClassUID=VERIFICATION,
        CommandField=0x0030,  # C-ECHO-RQ, PS3.7 E.1
        MessageID=message_id,
        CommandDataSetType=0x0101,  # no data set
    )


def store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command_set(
        AffectedSOPClassUID=sop_class,
        CommandField=0x0001,  # C-STORE-RQ
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0x0000,  # a data set follows
        AffectedSOPInstanceUID=sop_instance,
    )


def find_rq(message_id: int = 1) -> bytes:
    return command_set(
        AffectedSOPClassUID=STUDY_ROOT_FIND,
        CommandField=0x0020,  # C-FIND-RQ
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0x0000,
    )


def find_identifier() -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientID = ""
    return implicit_bytes(ds)


def implicit_bytes(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = True
    write_dataset(buffer, ds)
    return buffer.getvalue()


def small_ct(sop_instance: str | None = None) -> tuple[str, bytes]:
    """pydicom's CT_small with a fresh SOP Instance UID, as an Implicit VR LE data set:
    (its SOP Instance UID, its bytes)."""
    ds = dcmread(TEST_FILES / "CT_small.dcm")
    uid = sop_instance or str(generate_uid())
    ds.SOPInstanceUID = uid
    del ds.file_meta
    return uid, implicit_bytes(ds)


def fragments(context_id: int, control_last: int, data: bytes, size: int = 8192) -> Iterable[bytes]:
    """``data`` as P-DATA-TF PDUs of one PDV each, at most ``size`` bytes of fragment per PDU;
    the last PDV carries ``control_last``, the others the same kind without the last bit."""
    more = control_last & ~0x02
    for start in range(0, max(len(data), 1), size):
        last = start + size >= len(data)
        yield p_data(pdv(context_id, control_last if last else more, data[start : start + size]))


@dataclass
class Reply:
    """A PDU the node sent, decoded as far as the tests need."""

    pdu_type: int
    body: bytes
    # A-ASSOCIATE-AC: {context ID: result} (PS3.8 9.3.3.2, 0 acceptance)
    contexts: dict[int, int] = field(default_factory=dict)
    # A-ASSOCIATE-RJ (result, source, reason) / A-ABORT (source, reason)
    reject: tuple[int, int, int] | None = None
    abort: tuple[int, int] | None = None


class RawPeer:
    """One TCP connection to the node; every read has the peer's deadline."""

    def __init__(self, host: str, port: int, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        self.closed = False
        # P-DATA fragments received, per kind, until their last fragment
        self._command = b""
        self._dataset = b""

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send ``data``; False if the node has closed the connection meanwhile."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self._buffer) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                return False
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return False
            self._buffer += chunk
        return True

    def read_pdu(self, timeout: float | None = None) -> Reply | None:
        """The next PDU the node sends, or None when it closed (or the deadline passed: then
        ``closed`` stays False)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if not self._fill(6, deadline):
            return None
        pdu_type, _, length = HEADER.unpack(self._buffer[:6])
        if not self._fill(6 + length, deadline):
            return None
        body = self._buffer[6 : 6 + length]
        self._buffer = self._buffer[6 + length :]
        reply = Reply(pdu_type, body)
        if pdu_type == ASSOCIATE_AC:
            reply.contexts = _accepted_contexts(body)
        elif pdu_type == ASSOCIATE_RJ:
            reply.reject = (body[1], body[2], body[3])
        elif pdu_type == ABORT:
            reply.abort = (body[2], body[3])
        return reply

    def read_until_closed(self, timeout: float | None = None) -> list[Reply]:
        """Every PDU until the node closes the connection or the deadline passes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        replies = []
        while (reply := self.read_pdu(max(0.0, deadline - time.monotonic()))) is not None:
            replies.append(reply)
        return replies

    def responses(self, replies: Iterable[Reply]) -> list[Dataset]:
        """The DIMSE command sets (responses) carried by the P-DATA-TF ``replies``."""
        commands = []
        for reply in replies:
            if reply.pdu_type != P_DATA_TF:
                continue
            body = reply.body
            offset = 0
            while offset + 6 <= len(body):
                length, _ = PDV_HEADER.unpack(body[offset : offset + 5])
                control = body[offset + 5]
                fragment = body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x01:
                    self._command += fragment
                    if control & 0x02:
                        commands.append(decode(BytesIO(self._command), True, True))
                        self._command = b""
        return commands

    def associate(
        self, contexts: Sequence[tuple[int, str, Sequence[str]]], called: str = "DICOMNODE"
    ) -> Reply:
        """Send a valid A-ASSOCIATE-RQ; the node's answer (AC, RJ or ABORT)."""
        assert self.send(associate_rq(contexts, called=called)), "the node closed at once"
        reply = self.read_pdu()
        assert reply is not None, "no answer to A-ASSOCIATE-RQ"
        return reply


def store_status(node_host: str, node_port: int, path: Path | None = None) -> int:
    """Associate, store a fresh small CT over the raw peer, release; the C-STORE-RSP status."""
    uid, data = small_ct()
    with RawPeer(node_host, node_port) as peer:
        ac = peer.associate([(1, CT_IMAGE_STORAGE, [IMPLICIT])])
        assert ac.pdu_type == ASSOCIATE_AC and ac.contexts.get(1) == 0, ac
        peer.send(p_data(pdv(1, COMMAND_LAST, store_rq(CT_IMAGE_STORAGE, uid))))
        for piece in fragments(1, DATA_LAST, data):
            peer.send(piece)
        rsp = peer.responses([r for r in [peer.read_pdu()] if r is not None])
        peer.send(release_rq())
        peer.read_until_closed(5.0)
    assert rsp, "no C-STORE-RSP"
    return int(rsp[0].Status)


def _accepted_contexts(body: bytes) -> dict[int, int]:
    """A-ASSOCIATE-AC variable items (PS3.8 9.3.3): {presentation context ID: result}."""
    contexts: dict[int, int] = {}
    offset = 68  # protocol version, reserved, two AE titles, 32 reserved bytes
    while offset + 4 <= len(body):
        item_type = body[offset]
        (length,) = struct.unpack(">H", body[offset + 2 : offset + 4])
        if item_type == 0x21 and length >= 4:
            contexts[body[offset + 4]] = body[offset + 6]
        offset += 4 + length
    return contexts
