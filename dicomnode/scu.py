"""The SCU side of the node: verify a peer (C-ECHO), send files to it (C-STORE), and query and
retrieve from it (C-FIND, C-MOVE, C-GET).

Every association we request goes through :func:`make_ae` and :func:`request_association`, so
our AE title, implementation identity (PS3.7 D.3.3.2), timeouts and maximum PDU size are set in
one place; later SCU services (find, move, get) reuse them.

Files are sent as they are on disk: the data set after the File Meta group is streamed in P-DATA
fragments without being decoded or transcoded, so each file needs a presentation context with
exactly its own SOP class and transfer syntax (PS3.8 9.3.2.2 allows at most 128 contexts per
association; more pairs mean more associations).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MediaStorageDirectoryStorage,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, _config, evt
from pynetdicom._globals import MODE_REQUESTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta, split_dataset
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context, build_role

from dicomnode import tls
from dicomnode.config import Config, Peer, valid_ae_title
from dicomnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, new_ae
from dicomnode.qr import MODALITY_WORKLIST_FIND, SOP_CLASSES, Level, Model, Operation
from dicomnode.status import Category, Status, category
from dicomnode.storage import fsync_dir

log = logging.getLogger(__name__)

# PS3.8 9.3.2.2: a Presentation Context ID is an odd integer from 1 to 255, so one association
# carries at most 128 presentation contexts.
MAX_CONTEXTS_PER_ASSOCIATION = 128
# PS3.7 E.1: Message ID is a US (0-65535); it only has to be unique among outstanding requests.
_MAX_MESSAGE_ID = 0xFFFF

# PS3.4 A.4 / PS3.6 Annex A: the Verification SOP Class.
VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")

_SOP_CLASS_UID = Tag(0x0008, 0x0016)
_SOP_INSTANCE_UID = Tag(0x0008, 0x0018)

# PS3.8 9.3.3.2 (A-ASSOCIATE-AC Presentation Context item): Result/Reason values.
_CONTEXT_RESULTS = {
    1: "rejected by the peer (user rejection)",
    2: "rejected by the peer's provider, no reason given",
    3: "the peer does not support this SOP class (abstract syntax not supported)",
    4: "the peer does not accept this transfer syntax for it (transfer syntax not supported)",
}


# --- the Application Entity and its associations ---------------------------------------------


def make_ae(config: Config) -> AE:
    """A pynetdicom AE for requesting associations as ``config.ae_title``.

    It announces our Implementation Class UID and Version Name (PS3.7 D.3.3.2), never
    pynetdicom's, and uses the configured timeouts and maximum PDU size (PS3.8 D.1).
    """
    ae = new_ae(config)
    # The TCP connect is the first step of association establishment (PS3.8 9.1.1); bound it by
    # the same timeout as the A-ASSOCIATE exchange rather than the operating system's default.
    ae.connection_timeout = config.limits.acse_timeout
    return ae


class FailureKind(StrEnum):
    """Why an association could not be used."""

    UNREACHABLE = "unreachable"  # no TCP connection
    REJECTED = "rejected"  # A-ASSOCIATE-RJ (PS3.8 9.3.4)
    ABORTED = "aborted"  # A-ABORT / connection closed / no answer within the ACSE timeout
    NO_CONTEXT = "no accepted presentation context"  # A-ASSOCIATE-AC accepting none of ours
    # DICOM TLS (PS3.15 B.9) to a peer with tls: true: our tls.* files are unusable, the TLS
    # handshake failed, or the peer ended the connection in a TLS alert (it refused our
    # certificate).
    TLS = "TLS failure"


# What each file of a batch whose association failed is reported with.
_NOT_SENT = {
    FailureKind.UNREACHABLE: "not sent: the peer is unreachable",
    FailureKind.REJECTED: "not sent: the association was rejected",
    FailureKind.ABORTED: "not sent: the association request was aborted",
    FailureKind.NO_CONTEXT: "not sent: no presentation context was accepted",
    FailureKind.TLS: "not sent: no TLS connection",
}


@dataclass(frozen=True)
class AssociationFailure:
    """An association that was not established, and why."""

    kind: FailureKind
    message: str
    # A-ASSOCIATE-RJ fields (PS3.8 9.3.4): Result 1 permanent / 2 transient; Source 1 service
    # user, 2 service provider (ACSE), 3 service provider (presentation); Reason/Diag.
    result: int | None = None
    source: int | None = None
    reason: int | None = None


def request_association(
    ae: AE,
    config: Config,
    peer: Peer,
    contexts: Sequence[PresentationContext],
    *,
    ext_neg: Sequence[Any] = (),
    evt_handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
) -> tuple[Association, AssociationFailure | None]:
    """Request an association with ``peer`` proposing ``contexts`` (at most 128).

    ``ext_neg`` adds User Information sub-items (e.g. SCP/SCU Role Selection, PS3.7 D.3.3.4);
    ``evt_handlers`` are bound to the association (e.g. EVT_C_STORE for C-GET sub-operations).
    Returns the association (its negotiated contexts are readable even when it failed) and,
    when it is not established, why.

    A peer with ``tls: true`` is called over DICOM TLS (PS3.15 B.9) with a context built from
    ``config.tls`` for this association (so renewed certificate files are picked up).
    """
    connected = threading.Event()
    tls_args: tuple[ssl.SSLContext, str] | None = None
    tls_errors: list[OSError] = []
    if peer.tls:
        try:
            context = tls.client_context(config.tls)
        except tls.TlsError as exc:
            # Nothing was sent: an association object that never started, with nothing
            # negotiated, stands for the attempt.
            message = f"cannot call {peer.address} over TLS: {exc}"
            return Association(ae, MODE_REQUESTOR), AssociationFailure(FailureKind.TLS, message)
        context.sslsocket_class = _recording_socket(tls_errors)
        # The name is sent as SNI (not for IP addresses); it is not checked against the
        # certificate (see tls.client_context).
        tls_args = (context, peer.host)

    def on_connect(event: evt.Event) -> None:
        connected.set()
        # pynetdicom writes each PDU (command, then data set fragments) separately; with Nagle's
        # algorithm on, every C-STORE waits for the peer's delayed ACK (~40 ms on Linux).
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                log.debug("could not set TCP_NODELAY", exc_info=True)

    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=list(contexts),
        ae_title=peer.ae_title,
        max_pdu=config.limits.max_pdu_size,
        ext_neg=list(ext_neg) or None,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_connect), *evt_handlers],
        tls_args=tls_args,
    )
    if assoc.is_established:
        return assoc, None
    if tls_errors:
        # The handshake failed (no EVT_CONN_OPEN), or the peer answered our A-ASSOCIATE-RQ with
        # a TLS alert: with TLS 1.3 a server checks our certificate after our side of the
        # handshake is done, so its refusal arrives as the first thing we read.
        message = _tls_failure(config, peer, tls_errors[0], handshake=not connected.is_set())
        return assoc, AssociationFailure(FailureKind.TLS, message)
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and isinstance(answer, A_ASSOCIATE):
        result, source, reason = answer.result, answer.result_source, answer.diagnostic
        message = (
            f"{peer.address} rejected the association: {answer.result_str}, "
            f"source: {answer.source_str}, reason: {answer.reason_str} "
            f"(A-ASSOCIATE-RJ result {result}, source {source}, reason {reason})"
        )
        return assoc, AssociationFailure(FailureKind.REJECTED, message, result, source, reason)
    if not connected.is_set():
        message = (
            f"cannot connect to {peer.host} port {peer.port} for {peer.address} (refused, "
            f"unreachable, or no answer within {config.limits.acse_timeout:g} s)"
        )
        return assoc, AssociationFailure(FailureKind.UNREACHABLE, message)
    if isinstance(answer, A_ASSOCIATE) and answer.result == 0:
        # pynetdicom aborts an accepted association in which no context was accepted.
        message = (
            f"{peer.address} accepted none of the {len(contexts)} proposed presentation "
            f"contexts: " + _rejected_summary(assoc)
        )
        return assoc, AssociationFailure(FailureKind.NO_CONTEXT, message)
    message = (
        f"{peer.address} aborted the association request or did not answer it within "
        f"{config.limits.acse_timeout:g} s"
    )
    return assoc, AssociationFailure(FailureKind.ABORTED, message)


def _recording_socket(errors: list[OSError]) -> type[ssl.SSLSocket]:
    """An SSLSocket class that keeps the TLS errors pynetdicom only logs, for our message."""

    class RecordingSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            try:
                super().do_handshake(block)
            except OSError as exc:
                errors.append(exc)
                raise

        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            try:
                return super().recv(buflen, flags)
            except ssl.SSLError as exc:
                errors.append(exc)
                raise

    return RecordingSocket


# OpenSSL reasons (the peer's TLS alert, or our own check) -> what they mean for a DICOM peer.
_TLS_REASONS = {
    "WRONG_VERSION_NUMBER": "the peer did not answer in TLS (is this its plain DICOM port?)",
    "UNSUPPORTED_PROTOCOL": "no TLS version both sides allow (we offer tls.min_version and up)",
    "TLSV1_ALERT_PROTOCOL_VERSION": (
        "the peer refused our TLS version (we offer tls.min_version and up)"
    ),
    "SSLV3_ALERT_HANDSHAKE_FAILURE": (
        "the peer shares no cipher suite with us (we offer the BCP 195 suites only)"
    ),
    "TLSV1_ALERT_UNKNOWN_CA": (
        "the peer does not trust the CA that signed our certificate (tls.certificate)"
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate (tls.certificate)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate (tls.certificate)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate (tls.certificate) expired",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "the peer requires a client certificate: set tls.certificate and tls.private_key"
    ),
}


def _tls_failure(config: Config, peer: Peer, exc: OSError, *, handshake: bool) -> str:
    where = f"TLS {'handshake' if handshake else 'connection'} with {peer.address} failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        cas = config.tls.ca_certificates or "the system's trusted CAs"
        return (
            f"{where}: its certificate is not trusted: {exc.verify_message} (it must be signed "
            f"by a CA in tls.ca_certificates, {cas})"
        )
    if isinstance(exc, ssl.SSLError) and exc.reason in _TLS_REASONS:
        return f"{where}: {_TLS_REASONS[exc.reason]}"
    if isinstance(exc, ConnectionResetError | ssl.SSLEOFError | BrokenPipeError):
        # A plain DICOM port closes on a ClientHello it cannot parse; some TLS servers close
        # without an alert when they refuse the version or our certificate.
        return (
            f"{where}: the peer closed the connection "
            + ("in the handshake" if handshake else "after the handshake")
            + " without a TLS alert (is this its DICOM TLS port? does it accept our TLS "
            "version and certificate?)"
        )
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{where}: {exc.reason.replace('_', ' ').lower()}"
    if isinstance(exc, TimeoutError):
        return f"{where}: no answer within {config.limits.acse_timeout:g} s"
    return f"{where}: {exc.strerror or exc}"


def _rejected_summary(assoc: Association) -> str:
    reasons = sorted(
        {_CONTEXT_RESULTS.get(cx.result or 0, cx.status) for cx in assoc.rejected_contexts}
    )
    return "; ".join(reasons) or "no reason given"


def finish(assoc: Association) -> None:
    """Release an established association (PS3.8 7.2); abort it if the release fails."""
    if not assoc.is_established:
        return
    try:
        assoc.release()
    except Exception:  # a broken connection while releasing; nothing more to tell the peer
        log.debug("release failed, aborting", exc_info=True)
        assoc.abort()


# --- C-ECHO -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoResult:
    """The outcome of one C-ECHO (PS3.7 9.1.5): a status, or why there was none."""

    peer: Peer
    elapsed: float
    status: int | None = None
    # Set when no association could be established (the peer is unreachable or refused us).
    failure: AssociationFailure | None = None
    # Set when the association was established but no C-ECHO response came back.
    error: str | None = None


def echo(config: Config, peer: Peer) -> EchoResult:
    """Verify end-to-end communication with ``peer`` (Verification SOP Class, PS3.4 A.4)."""
    started = time.monotonic()
    assoc, failure = request_association(
        make_ae(config), config, peer, [build_context(VERIFICATION_SOP_CLASS)]
    )
    if failure is not None:
        return EchoResult(peer, time.monotonic() - started, failure=failure)
    try:
        response = assoc.send_c_echo()
    except BaseException:
        assoc.abort()
        raise
    finish(assoc)
    elapsed = time.monotonic() - started
    if "Status" not in response:
        # pynetdicom returns an empty data set when the association was aborted or the DIMSE
        # timeout expired before a response arrived.
        error = (
            f"no C-ECHO response from {peer.address}: the association was aborted or no answer "
            f"came within {config.limits.dimse_timeout:g} s"
        )
        return EchoResult(peer, elapsed, error=error)
    return EchoResult(peer, elapsed, status=int(response.Status))


# --- collecting files -------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomFile:
    """A DICOM Part 10 file to send: its UIDs and its File Meta transfer syntax (PS3.10 7.1)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    # True (the rule): the data set is streamed from disk byte for byte. False when the File Meta
    # disagrees with the data set or the data set has an odd length: it is decoded and re-encoded
    # by pydicom in its own transfer syntax.
    stream: bool = True

    @property
    def context_key(self) -> tuple[str, str]:
        """The (abstract syntax, transfer syntax) pair this file needs (PS3.8 9.3.2.2)."""
        return self.sop_class_uid, self.transfer_syntax_uid


@dataclass(frozen=True)
class Skipped:
    """A path that will not be sent, and why."""

    path: Path
    reason: str


@dataclass
class Collection:
    """What :func:`collect` found: files to send, paths skipped, DICOMDIRs expanded."""

    files: list[DicomFile] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    dicomdirs: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Directory:
    """A DICOMDIR (Media Storage Directory, PS3.10 8.6): sent as the instances it references."""

    path: Path


def collect(paths: Iterable[Path | str]) -> Collection:
    """The DICOM files under ``paths`` (files, folders searched recursively, DICOMDIRs).

    A DICOMDIR, named directly or found in a folder, contributes the instances it references
    instead of itself. Each file is read only as far as its File Meta and SOP Class/Instance
    UIDs; pixel data is never loaded. A file reached twice is collected once.
    """
    found = Collection()
    seen: set[Path] = set()
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            for file in _walk(path):
                _add(found, seen, file)
        elif path.exists():
            _add(found, seen, path)
        else:
            found.skipped.append(Skipped(path, "no such file or folder"))
    return found


def _walk(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder``, in a stable order, not following symlinked folders."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def _add(found: Collection, seen: set[Path], path: Path, via: Path | None = None) -> None:
    key = path.resolve()
    if key in seen:
        return
    seen.add(key)
    inspected = _inspect(path)
    if isinstance(inspected, DicomFile | Skipped):
        if isinstance(inspected, DicomFile):
            found.files.append(inspected)
        else:
            found.skipped.append(inspected)
        return
    if via is not None:
        # Do not follow a DICOMDIR referenced from another one (no loops, no surprises).
        found.skipped.append(Skipped(path, f"a DICOMDIR referenced by the DICOMDIR {via}"))
        return
    found.dicomdirs.append(path)
    referenced, problems = dicomdir_references(path)
    found.skipped.extend(problems)
    log.info("%s: %d referenced files", path, len(referenced))
    for file in referenced:
        _add(found, seen, file, via=path)


def _stop_after_sop_instance_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
    del vr, length
    return int(tag) > 0x00080018  # (0008,0018) SOP Instance UID


def _inspect(path: Path) -> DicomFile | Skipped | _Directory:
    """Classify ``path`` from its File Meta and its first few data elements."""
    try:
        with path.open("rb") as fp:
            # dcmread can only stop before pixel data; read_partial (which dcmread calls) stops
            # right after (0008,0018), so large headers are not parsed just to plan a send.
            ds = read_partial(
                fp,
                stop_when=_stop_after_sop_instance_uid,
                specific_tags=[_SOP_CLASS_UID, _SOP_INSTANCE_UID],
            )
    except InvalidDicomError:
        # PS3.10 7.1: a 128-byte preamble, then "DICM", then the File Meta group.
        return Skipped(path, "not a DICOM Part 10 file (no DICM prefix after the preamble)")
    except OSError as exc:
        return Skipped(path, f"cannot read: {exc.strerror or exc}")
    except Exception as exc:  # pydicom raises assorted errors on malformed files
        return Skipped(path, f"not a readable DICOM file: {exc}")
    meta = ds.file_meta
    transfer_syntax = meta.get("TransferSyntaxUID")
    media_class = meta.get("MediaStorageSOPClassUID")
    if media_class == MediaStorageDirectoryStorage:
        return _Directory(path)
    if not transfer_syntax:
        return Skipped(path, "File Meta has no Transfer Syntax UID (0002,0010)")
    sop_class = ds.get(_SOP_CLASS_UID)
    sop_instance = ds.get(_SOP_INSTANCE_UID)
    if sop_class is None or not sop_class.value:
        return Skipped(path, "no SOP Class UID (0008,0016)")
    if sop_instance is None or not sop_instance.value:
        return Skipped(path, "no SOP Instance UID (0008,0018)")
    sop_class_uid, sop_instance_uid = str(sop_class.value), str(sop_instance.value)
    for label, uid in (
        ("SOP Class UID", sop_class_uid),
        ("SOP Instance UID", sop_instance_uid),
        ("Transfer Syntax UID", str(transfer_syntax)),
    ):
        if not UID(uid).is_valid:  # PS3.5 9.1: digits and dots, at most 64 characters
            return Skipped(path, f"invalid {label} {uid!r}")
    # PS3.10 7.1: Media Storage SOP Class/Instance UID (Type 1) equal the data set's SOP Class/
    # Instance UID. pynetdicom's streaming send takes the C-STORE Affected SOP Class/Instance UID
    # (which PS3.4 B.2 requires to match the data set) from the File Meta, so a file whose meta
    # disagrees (common after careless de-identification) is sent decoded instead.
    media_instance = meta.get("MediaStorageSOPInstanceUID")
    if str(media_class) != sop_class_uid or str(media_instance) != sop_instance_uid:
        log.info("%s: File Meta UIDs differ from the data set's; it will be sent decoded", path)
        return DicomFile(path, sop_class_uid, sop_instance_uid, str(transfer_syntax), False)
    # Encoded data sets have even lengths (PS3.5 7.1: every value field is even; DCMTK aborts the
    # association on an odd one). A data set can end on an odd byte in the deflated transfer
    # syntax, whose stream is padded with one trailing null byte (PS3.5 A.5); pynetdicom pads
    # only when it encodes the data set itself, so such files (and malformed odd ones) are sent
    # decoded.
    try:
        _, offset = split_dataset(path)
        odd = (path.stat().st_size - offset) % 2 == 1
    except Exception as exc:
        return Skipped(path, f"not a readable DICOM file: {exc}")
    if odd:
        log.info("%s: data set of odd length; it will be sent decoded", path)
    return DicomFile(path, sop_class_uid, sop_instance_uid, str(transfer_syntax), not odd)


def dicomdir_references(dicomdir: Path) -> tuple[list[Path], list[Skipped]]:
    """The files a DICOMDIR references, and the references that cannot be used.

    Each in-use directory record's Referenced File ID (0004,1500) (PS3.3 F.3.2.2) is a list of
    path components relative to the DICOMDIR's folder (PS3.10 8.2). A reference that escapes
    that folder (``..``, absolute parts, a symlink pointing elsewhere) is refused.
    """
    try:
        ds = dcmread(dicomdir, stop_before_pixels=True)
    except Exception as exc:
        return [], [Skipped(dicomdir, f"DICOMDIR cannot be read: {exc}")]
    root = dicomdir.parent.resolve()
    files: list[Path] = []
    problems: list[Skipped] = []
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        # PS3.3 F.3.2.2: Record In-use Flag 0000H marks an inactive record.
        if record.get("RecordInUseFlag", 0xFFFF) == 0:
            continue
        components = [file_id] if isinstance(file_id, str) else [str(c) for c in file_id]
        shown = "\\".join(components)
        resolved = _resolve_file_id(root, components)
        if isinstance(resolved, str):
            problems.append(Skipped(dicomdir, f'Referenced File ID "{shown}": {resolved}'))
        else:
            # Shown as the user reached it: under the DICOMDIR's folder as they named it.
            files.append(dicomdir.parent / resolved.relative_to(root))
    return files, problems


def _resolve_file_id(root: Path, components: list[str]) -> Path | str:
    """The file for a Referenced File ID under ``root``, or why there is none."""
    parts = [c.strip() for c in components]
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part or ":" in part:
            return "not a plain relative file ID; refused"
    candidate = root.joinpath(*parts)
    if not candidate.exists():
        # PS3.10 8.2 file IDs are upper case; media copied to case-sensitive file systems are
        # often lower case. Match each component against the names actually present.
        candidate = _match_case_insensitive(root, parts) or candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        return "points outside the DICOMDIR's folder; refused"
    if not resolved.is_file():
        return "referenced file not found"
    return resolved


def _match_case_insensitive(root: Path, parts: list[str]) -> Path | None:
    current = root
    for part in parts:
        try:
            names = os.listdir(current)
        except OSError:
            return None
        match = part if part in names else None
        match = match or next((n for n in sorted(names) if n.upper() == part.upper()), None)
        if match is None:
            return None
        current = current / match
    return current


# --- C-STORE ----------------------------------------------------------------------------------


@dataclass
class FileResult:
    """What happened to one file: the peer's C-STORE status, or why it was not stored."""

    path: Path
    sop_instance_uid: str
    status: int | None = None
    error: str | None = None

    @property
    def category(self) -> Category:
        if self.status is None:
            return Category.FAILURE
        return category(self.status)


@dataclass
class SendReport:
    """The outcome of :func:`send`, one result per file in the order given."""

    peer: Peer
    results: list[FileResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    associations: int = 0  # associations established
    association_failures: list[AssociationFailure] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def succeeded(self) -> int:
        return sum(1 for r in self.results if r.category == Category.SUCCESS)

    @property
    def warnings(self) -> int:
        return sum(1 for r in self.results if r.category == Category.WARNING)

    @property
    def sent(self) -> int:
        """Files the peer accepted (success or warning status)."""
        return self.succeeded + self.warnings

    @property
    def failed(self) -> int:
        return len(self.results) - self.sent

    @property
    def total(self) -> int:
        return len(self.results) + len(self.skipped)

    @property
    def unreachable(self) -> bool:
        """True when files were to be sent but no association could be established at all."""
        return bool(self.results) and self.associations == 0

    def categories(self) -> list[Category]:
        return [r.category for r in self.results]


@dataclass(frozen=True)
class Batch:
    """The files that go over one association, and the exact contexts they need."""

    contexts: list[tuple[str, str]]
    files: list[tuple[int, DicomFile]]  # (position in the input, file)


def plan(files: Sequence[DicomFile]) -> list[Batch]:
    """Split ``files`` into associations of at most 128 (SOP class, transfer syntax) pairs.

    Pairs are taken in order of first appearance; each file goes with the batch holding its pair.
    """
    pairs: dict[tuple[str, str], int] = {}
    for file in files:
        pairs.setdefault(file.context_key, len(pairs) // MAX_CONTEXTS_PER_ASSOCIATION)
    count = (len(pairs) + MAX_CONTEXTS_PER_ASSOCIATION - 1) // MAX_CONTEXTS_PER_ASSOCIATION
    batches = [Batch([], []) for _ in range(count)]
    for pair, index in pairs.items():
        batches[index].contexts.append(pair)
    for position, file in enumerate(files):
        batches[pairs[file.context_key]].files.append((position, file))
    return batches


Progress = Callable[[FileResult], None]


def send(
    config: Config,
    peer: Peer,
    files: Iterable[DicomFile],
    *,
    skipped: Sequence[Skipped] = (),
    progress: Progress | None = None,
) -> SendReport:
    """Send ``files`` to ``peer`` with C-STORE (PS3.4 B.2), streaming each from disk.

    One association per batch of at most 128 exact (SOP class, transfer syntax) contexts, many
    files per association. ``progress`` is called once per file as its outcome is known.
    ``skipped`` (from :func:`collect`) is carried into the report for its counts.
    """
    # Send each file's data set straight from disk (no decoding, no transcoding). The flag is
    # process-wide and only affects send_c_store() given a path, which dicomnode always wants
    # streamed; it is set here, not at import, so importing this module changes nothing.
    _config.STORE_SEND_CHUNKED_DATASET = True
    started = time.monotonic()
    todo = list(files)
    report = SendReport(peer=peer, skipped=list(skipped))
    results: list[FileResult | None] = [None] * len(todo)

    def record(position: int, result: FileResult) -> None:
        results[position] = result
        if progress is not None:
            progress(result)

    ae = make_ae(config)
    for batch in plan(todo):
        _send_batch(ae, config, peer, batch, report, record)
    report.results = [r for r in results if r is not None]
    report.elapsed = time.monotonic() - started
    return report


def _send_batch(
    ae: AE,
    config: Config,
    peer: Peer,
    batch: Batch,
    report: SendReport,
    record: Callable[[int, FileResult], None],
) -> None:
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in batch.contexts]
    assoc, failure = request_association(ae, config, peer, contexts)
    if failure is not None:
        report.association_failures.append(failure)
        log.info("%s", failure.message)  # callers report it; the CLI prints it once
        if failure.kind is not FailureKind.NO_CONTEXT:
            for position, file in batch.files:
                error = _NOT_SENT[failure.kind]
                record(position, FileResult(file.path, file.sop_instance_uid, error=error))
            return
    unusable = _unusable_contexts(assoc, batch.contexts)
    if failure is not None:
        for position, file in batch.files:
            error = unusable.get(file.context_key, _NOT_SENT[failure.kind])
            record(position, FileResult(file.path, file.sop_instance_uid, error=error))
        return
    report.associations += 1
    log.info(
        "association %d with %s: %d files, %d contexts",
        report.associations,
        peer.address,
        len(batch.files),
        len(batch.contexts),
    )
    lost: str | None = None  # why the association ended early
    message_id = 0
    try:
        for position, file in batch.files:
            if lost is not None:
                record(position, FileResult(file.path, file.sop_instance_uid, error=lost))
                continue
            reason = unusable.get(file.context_key)
            if reason is not None:
                record(position, FileResult(file.path, file.sop_instance_uid, error=reason))
                continue
            if not assoc.is_established:  # released or aborted by the peer between files
                lost = "not sent: the peer ended the association"
                record(position, FileResult(file.path, file.sop_instance_uid, error=lost))
                continue
            message_id = message_id % _MAX_MESSAGE_ID + 1
            result, lost = _store_one(assoc, config, file, message_id)
            record(position, result)
    except BaseException:
        assoc.abort()
        raise
    if lost is not None:
        assoc.abort()
    else:
        finish(assoc)


def _store_one(
    assoc: Association, config: Config, file: DicomFile, message_id: int
) -> tuple[FileResult, str | None]:
    """C-STORE one file; returns its result and, if the association is now unusable, why."""
    uid = file.sop_instance_uid
    what: Path | Dataset = file.path
    try:
        if file.stream:
            # Fail this file alone if it vanished or became unreadable since it was collected:
            # once pynetdicom has sent the C-STORE command, a read error would leave half a
            # message on the association.
            with file.path.open("rb"):
                pass
        else:
            what = dcmread(file.path)  # the whole file: rare, see DicomFile.stream
            if _encoded_length(what) % 2:
                # A truncated or malformed file; sending it would make the peer abort.
                error = "not sent: its data set encodes to an odd length (truncated or malformed)"
                return FileResult(file.path, uid, error=error), None
    except OSError as exc:
        return FileResult(file.path, uid, error=f"not sent: {exc.strerror or exc}"), None
    except Exception as exc:  # pydicom's assorted parse errors
        return FileResult(file.path, uid, error=f"not sent: cannot decode: {exc}"), None
    try:
        response: Dataset = assoc.send_c_store(what, msg_id=message_id)
    except (ValueError, AttributeError) as exc:
        # Raised before anything is sent: no exact accepted context, File Meta lacking the UIDs
        # or a data set pydicom cannot encode (the first two are checked beforehand).
        return FileResult(file.path, uid, error=f"not sent: {exc}"), None
    except OSError as exc:
        # The command may already be on the wire with its data set cut short: the association
        # cannot be trusted any more (PS3.8 7.3: abort it).
        reason = f"not sent: the association was aborted after a read error on {file.path}"
        return FileResult(file.path, uid, error=f"read error: {exc.strerror or exc}"), reason
    if "Status" not in response:
        dimse = config.limits.dimse_timeout
        error = (
            f"no C-STORE response: the association was aborted or no answer came within {dimse:g} s"
        )
        return FileResult(file.path, uid, error=error), "not sent: the association was aborted"
    return FileResult(file.path, uid, status=int(response.Status)), None


def _encoded_length(ds: Dataset) -> int:
    """The length of ``ds`` encoded in its file's transfer syntax, as pynetdicom will send it."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    encoded = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        raise ValueError("pydicom cannot encode its data set")
    return len(encoded)


def _unusable_contexts(
    assoc: Association, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """For each proposed pair the peer did not accept exactly, the reason to report per file."""
    accepted = {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
    }
    # pynetdicom rewrites a rejected context's transfer syntax with whatever the acceptor put in
    # its reply, so match results to our proposals by Presentation Context ID, not by syntax.
    results: dict[int | None, PresentationContext] = {
        cx.context_id: cx for cx in assoc.rejected_contexts
    }
    requested = assoc.requestor.requested_contexts
    unusable: dict[tuple[str, str], str] = {}
    for pair, proposed in zip(pairs, requested, strict=False):
        if pair in accepted:
            continue
        rejected = results.get(proposed.context_id)
        if rejected is None:
            why = "the peer did not answer this presentation context"
        else:
            why = _CONTEXT_RESULTS.get(rejected.result or 0, str(rejected.status))
        sop_class, syntax = (UID(p) for p in pair)
        unusable[pair] = (
            f"no accepted presentation context for {sop_class.name} ({sop_class}) in "
            f"{syntax.name} ({syntax}): {why}"
        )
    return unusable


# --- Query/Retrieve: C-FIND, C-MOVE, C-GET (PS3.4 Annex C) ------------------------------------


# What a query asks for when the user names no return keys: the attributes a person looks at
# first at each level, the level's unique key last (PS3.4 C.6.1.1.2-5, C.6.2.1.2).
DEFAULT_RETURN_KEYS: dict[Level, tuple[str, ...]] = {
    Level.PATIENT: (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "NumberOfPatientRelatedStudies",
    ),
    Level.STUDY: (
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyDescription",
        "AccessionNumber",
        "ModalitiesInStudy",
        "StudyInstanceUID",
    ),
    Level.SERIES: (
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
        "SeriesInstanceUID",
    ),
    Level.IMAGE: ("InstanceNumber", "SOPClassUID", "SOPInstanceUID"),
}

_QUERY_RETRIEVE_LEVEL = Tag(0x0008, 0x0052)
_SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
# UTF-8 (defined term in PS3.3 C.12.1.1.2): the one repertoire any value typed on a command
# line fits.
_UTF8 = "ISO_IR 192"
# Value representations whose values may use a character set other than the default one
# (PS3.5 6.1.2.2); the others are always the default repertoire.
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "PN", "UC", "UT"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"})
_KEY_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


class QueryKeyError(ValueError):
    """A ``Keyword=Value`` query key that cannot be used; the message says why."""


def check_level(model: Model, level: Level) -> None:
    """Raise :class:`ValueError` when ``model`` has no ``level``.

    PS3.4 C.6.2.1: the Study Root model starts at the Study level; only Patient Root has a
    Patient level.
    """
    if model is Model.STUDY_ROOT and level is Level.PATIENT:
        raise ValueError(
            "the Study Root information model has no PATIENT level (PS3.4 C.6.2); "
            "use the Patient Root model for patient-level queries"
        )


def qr_sop_class(model: Model, service: Operation) -> UID:
    """The SOP Class UID of ``service`` in ``model`` (PS3.4 C.6.1.3, C.6.2.3)."""
    return UID(SOP_CLASSES[model, service])


def query_key(spec: str) -> DataElement:
    """One query key as findscu's ``-k`` takes it: ``Keyword=Value``, ``gggg,eeee=Value``.

    A key without ``=Value`` (or with an empty value) is a return key: universal matching
    (PS3.4 C.2.2.2.3). Values are sent as typed: wildcards (``*``, ``?``), ranges
    (``20200101-``) and lists of UIDs (backslash-separated) are the peer's to interpret
    (PS3.4 C.2.2.2). A sequence may only be given without a value (a zero-length sequence
    asks for every item, PS3.4 C.2.2.2.6). Raises :class:`QueryKeyError`.
    """
    name, has_value, raw = spec.partition("=")
    name = name.strip()
    value = raw if has_value else ""
    if not name:
        raise QueryKeyError(f"query key {spec!r}: give Keyword or Keyword=Value")
    match = _KEY_TAG.match(name)
    if match:
        tag = Tag(int(match.group(1), 16), int(match.group(2), 16))
    else:
        number = tag_for_keyword(name)
        if number is None:
            close = get_close_matches(name, keyword_dict.keys(), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise QueryKeyError(
                f"query key {spec!r}: unknown attribute keyword {name!r} "
                f"(not in the DICOM data dictionary){hint}"
            )
        tag = Tag(number)
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise QueryKeyError(
            f"query key {spec!r}: {tag} is not in the DICOM data dictionary"
        ) from None
    label = f"{keyword_for_tag(tag) or tag}"
    if tag.group in (0x0000, 0x0002):
        # Group 0000 is the command set (PS3.7 E.1), 0002 the File Meta (PS3.10 7.1).
        raise QueryKeyError(f"query key {spec!r}: {label} cannot be part of an identifier")
    if tag == _QUERY_RETRIEVE_LEVEL:
        raise QueryKeyError(f"query key {spec!r}: set the level with --level, not as a key")
    vr = vr.split(" or ")[0]  # e.g. "US or SS": the first is the usual one
    if vr == "SQ":
        if value:
            raise QueryKeyError(
                f"query key {spec!r}: {label} is a sequence; only a universal match (no value) "
                "is supported"
            )
        return DataElement(tag, vr, [])
    if not value:
        return DataElement(tag, vr, None)
    parts = value.split("\\")
    try:
        if vr in _INT_VRS:
            return DataElement(tag, vr, [int(p) for p in parts] if len(parts) > 1 else int(value))
        if vr in _FLOAT_VRS:
            floats = [float(p) for p in parts]
            return DataElement(tag, vr, floats if len(floats) > 1 else floats[0])
    except ValueError:
        raise QueryKeyError(f"query key {spec!r}: {label} ({vr}) takes numbers") from None
    if vr in _BINARY_VRS:
        raise QueryKeyError(f"query key {spec!r}: {label} ({vr}) cannot be matched on a value")
    return DataElement(tag, vr, value)


def query_keys(specs: Iterable[str]) -> Dataset:
    """The identifier keys for ``specs`` (see :func:`query_key`); a later key replaces an earlier
    one for the same attribute."""
    keys = Dataset()
    for spec in specs:
        element = query_key(spec)
        keys[element.tag] = element
    return keys


def _identifier(level: Level, keys: Dataset) -> Dataset:
    """``keys`` with the Query/Retrieve Level (PS3.4 C.4.1.1.3.1) and, when a value needs it,
    Specific Character Set (see :func:`with_character_set`)."""
    identifier = Dataset()
    identifier.update(keys)
    identifier.QueryRetrieveLevel = level.value
    return with_character_set(identifier)


def with_character_set(identifier: Dataset) -> Dataset:
    """``identifier`` with Specific Character Set (0008,0005) UTF-8 when a value, in a sequence
    item too, is outside the default repertoire (PS3.4 C.4.1.1.3.1: present only then)."""
    if _SPECIFIC_CHARACTER_SET not in identifier and not _ascii_only(identifier):
        identifier.SpecificCharacterSet = _UTF8
    return identifier


def _ascii_only(ds: Dataset) -> bool:
    for element in ds:
        if element.VR == "SQ":
            if not all(_ascii_only(item) for item in element.value or []):
                return False
        elif (
            element.VR in _TEXT_VRS
            and element.value is not None
            and not str(element.value).isascii()
        ):
            return False
    return True


@dataclass
class QueryOutcome:
    """What a C-FIND, C-MOVE or C-GET came to: the peer's final status, or why there was none."""

    peer: Peer
    service: Operation
    # The final response's status (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4); None without one.
    status: int | None = None
    error_comment: str | None = None  # (0000,0902) of the final response, when given
    # True when a C-CANCEL was sent (PS3.7 9.3.2.3, 9.3.3.3, 9.3.4.3) or the operation was
    # cancelled before the request went out.
    cancelled: bool = False
    failure: AssociationFailure | None = None  # no usable association
    error: str | None = None  # the association was usable but no final response came
    elapsed: float = 0.0

    @property
    def category(self) -> Category:
        """The final status's category; FAILURE without one (CANCEL if nothing was sent)."""
        if self.status is not None:
            return category(self.status)
        if self.cancelled and self.error is None and self.failure is None:
            return Category.CANCEL
        return Category.FAILURE

    def categories(self) -> list[Category]:
        """The final category, plus CANCEL when the user cancelled (the exit code's input)."""
        found = [self.category]
        if self.cancelled and Category.CANCEL not in found:
            found.append(Category.CANCEL)
        return found


@dataclass
class FindReport(QueryOutcome):
    """The outcome of :func:`find`: every match (Pending response identifier) in order."""

    matches: list[Dataset] = field(default_factory=list)


@dataclass
class RetrieveReport(QueryOutcome):
    """The outcome of :func:`move` or :func:`get`.

    The counts are the peer's Number of Remaining/Completed/Failed/Warning Sub-operations
    (PS3.4 C.4.2.1.6, C.4.3.1.5), from its last response; None when it never said.
    """

    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    # Failed SOP Instance UID List (0008,0058) of the final response (PS3.4 C.4.2.1.5).
    failed_instances: list[str] = field(default_factory=list)
    # C-GET: the files written, in order of arrival, and the sub-operations we refused.
    files: list[Path] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


MatchCallback = Callable[[Dataset], None]
# (remaining, completed, failed, warning) sub-operations, from each Pending response.
ProgressCallback = Callable[[int, int, int, int], None]
_Responses = Iterator[tuple[Dataset, Dataset | None]]

# How often the cancel watcher looks whether the operation ended (it reacts to a cancel request
# at once; this only bounds how long the idle thread outlives the operation).
_CANCEL_POLL = 0.1


class _Canceller:
    """Sends C-CANCEL (PS3.7 9.3.2.3, 9.3.3.3, 9.3.4.3) as soon as ``cancel`` is set, from a thread.

    The main thread stays blocked reading responses, so the request goes out at once rather
    than after the next response. If the final response has not arrived ``grace`` seconds after
    the C-CANCEL, the association is aborted (PS3.8 7.3), which also ends the main thread's wait.
    """

    def __init__(
        self,
        assoc: Association,
        message_id: int,
        context_id: int,
        cancel: threading.Event,
        grace: float,
    ) -> None:
        self._assoc = assoc
        self._message_id = message_id
        self._context_id = context_id
        self._cancel = cancel
        self._grace = grace
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.sent = False
        self.gave_up = False
        self._thread = threading.Thread(target=self._run, name="dicomnode-cancel", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> bool:
        """The operation is over: send nothing from now on. Returns whether C-CANCEL was sent."""
        with self._lock:
            self._done.set()
            return self.sent

    def _run(self) -> None:
        while not self._cancel.wait(_CANCEL_POLL):
            if self._done.is_set():
                return
        with self._lock:
            if self._done.is_set() or not self._assoc.is_established:
                return
            try:
                self._assoc.send_c_cancel(self._message_id, self._context_id)
            except Exception:  # the association ended under us; the main thread reports it
                log.debug("could not send C-CANCEL", exc_info=True)
                return
            self.sent = True
        log.info("C-CANCEL sent for message %d", self._message_id)
        if not self._done.wait(self._grace):
            self.gave_up = True
            log.warning("no final response %g s after C-CANCEL: aborting", self._grace)
            self._assoc.abort()


def _exchange(
    config: Config,
    peer: Peer,
    report: QueryOutcome,
    sop_class: UID,
    contexts: Sequence[PresentationContext],
    request: Callable[[Association, int], _Responses],
    on_pending: Callable[[Dataset, Dataset | None], None],
    on_final: Callable[[Dataset, Dataset | None], None],
    cancel: threading.Event | None,
    *,
    ext_neg: Sequence[Any] = (),
    evt_handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
) -> None:
    """One Query/Retrieve operation on its own association, the path C-FIND/MOVE/GET share.

    Establishes the association, sends the request built by ``request``, hands each Pending
    response to ``on_pending`` and the final one to ``on_final``, cancels on request, and
    releases (or aborts) the association. Fills ``report``.
    """
    started = time.monotonic()
    try:
        assoc, failure = request_association(
            make_ae(config), config, peer, contexts, ext_neg=ext_neg, evt_handlers=evt_handlers
        )
        if failure is not None:
            log.info("%s", failure.message)
            report.failure = failure
            return
        context = next(
            (cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class), None
        )
        if context is None:
            finish(assoc)
            rejected = next(
                (cx for cx in assoc.rejected_contexts if cx.abstract_syntax == sop_class), None
            )
            why = _CONTEXT_RESULTS.get(rejected.result or 0, "") if rejected else ""
            report.failure = AssociationFailure(
                FailureKind.NO_CONTEXT,
                f"{peer.address} does not accept {sop_class.name} ({sop_class})"
                + (f": {why}" if why else ""),
            )
            return
        if cancel is not None and cancel.is_set():
            finish(assoc)  # cancelled while the association was being set up
            report.cancelled = True
            return
        context_id = cast(int, context.context_id)  # set on every accepted context
        _converse(config, peer, assoc, context_id, report, request, on_pending, on_final, cancel)
    finally:
        report.elapsed = time.monotonic() - started


def _converse(
    config: Config,
    peer: Peer,
    assoc: Association,
    context_id: int,
    report: QueryOutcome,
    request: Callable[[Association, int], _Responses],
    on_pending: Callable[[Dataset, Dataset | None], None],
    on_final: Callable[[Dataset, Dataset | None], None],
    cancel: threading.Event | None,
) -> None:
    message_id = 1  # the only request on this association
    try:
        responses = request(assoc, message_id)
    except ValueError as exc:  # the identifier cannot be encoded; nothing was sent
        finish(assoc)
        report.error = f"the request was not sent: {exc}"
        return
    canceller = None
    if cancel is not None:
        grace = config.limits.dimse_timeout
        canceller = _Canceller(assoc, message_id, context_id, cancel, grace)
        canceller.start()
    try:
        for status, identifier in responses:
            if "Status" not in status:
                # pynetdicom's answer to an abort, a DIMSE timeout or an invalid response.
                if canceller is not None and canceller.gave_up:
                    report.error = (
                        f"no final {report.service} response within "
                        f"{config.limits.dimse_timeout:g} s of the C-CANCEL; association aborted"
                    )
                else:
                    report.error = (
                        f"no final {report.service} response from {peer.address}: the "
                        "association was aborted, or no answer came within "
                        f"{config.limits.dimse_timeout:g} s"
                    )
                break
            code = int(status.Status)
            if category(code) is Category.PENDING:
                on_pending(status, identifier)
                continue
            report.status = code
            comment = status.get("ErrorComment")
            report.error_comment = str(comment) if comment else None
            on_final(status, identifier)
            break
    except BaseException:
        if canceller is not None:
            canceller.stop()
        assoc.abort()
        raise
    if canceller is not None:
        report.cancelled = canceller.stop()
    if report.status is None:
        assoc.abort()
    else:
        finish(assoc)


def find(
    config: Config,
    peer: Peer,
    level: Level,
    model: Model,
    keys: Dataset,
    *,
    on_match: MatchCallback | None = None,
    cancel: threading.Event | None = None,
) -> FindReport:
    """C-FIND (PS3.4 C.4.1) at ``level`` of ``model`` with the identifier ``keys``.

    Every Pending response's identifier is a match, collected in order and handed to
    ``on_match`` as it arrives. Setting ``cancel`` sends C-CANCEL; the peer then ends with
    0xFE00 Cancel (PS3.4 C.4.1.1.4). Raises :class:`ValueError` for a level the model lacks.
    """
    check_level(model, level)
    sop_class = qr_sop_class(model, Operation.FIND)
    return _find(config, peer, sop_class, _identifier(level, keys), on_match, cancel)


def worklist_find(
    config: Config,
    peer: Peer,
    identifier: Dataset,
    *,
    on_match: MatchCallback | None = None,
    cancel: threading.Event | None = None,
) -> FindReport:
    """Modality Worklist C-FIND (PS3.4 K.4.1) with ``identifier`` (no Query/Retrieve Level:
    the worklist model has one level; the step keys sit in the Scheduled Procedure Step
    Sequence item). Matches, cancelling and the report are as for :func:`find`."""
    sop_class = UID(MODALITY_WORKLIST_FIND)
    return _find(config, peer, sop_class, with_character_set(identifier), on_match, cancel)


def _find(
    config: Config,
    peer: Peer,
    sop_class: UID,
    identifier: Dataset,
    on_match: MatchCallback | None,
    cancel: threading.Event | None,
) -> FindReport:
    report = FindReport(peer=peer, service=Operation.FIND)

    def request(assoc: Association, message_id: int) -> _Responses:
        responses: _Responses = assoc.send_c_find(identifier, sop_class, msg_id=message_id)
        return responses

    def on_pending(status: Dataset, match: Dataset | None) -> None:
        del status
        if match is None:
            log.warning("a C-FIND response identifier could not be decoded; skipped")
            return
        report.matches.append(match)
        if on_match is not None:
            on_match(match)

    def on_final(status: Dataset, identifier: Dataset | None) -> None:
        del status, identifier

    contexts = [build_context(sop_class, QR_TRANSFER_SYNTAXES)]
    _exchange(config, peer, report, sop_class, contexts, request, on_pending, on_final, cancel)
    return report


# The identifiers of C-FIND/MOVE/GET are small: any uncompressed syntax will do.
QR_TRANSFER_SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def _retrieve_handlers(
    report: RetrieveReport, on_progress: ProgressCallback | None
) -> tuple[Callable[[Dataset, Dataset | None], None], Callable[[Dataset, Dataset | None], None]]:
    """The Pending and final response handlers C-MOVE and C-GET share."""

    def counts(status: Dataset) -> None:
        for name, keyword in (
            ("remaining", "NumberOfRemainingSuboperations"),
            ("completed", "NumberOfCompletedSuboperations"),
            ("failed", "NumberOfFailedSuboperations"),
            ("warning", "NumberOfWarningSuboperations"),
        ):
            value = status.get(keyword)
            if value is not None:
                setattr(report, name, int(value))

    def on_pending(status: Dataset, identifier: Dataset | None) -> None:
        del identifier
        counts(status)
        if on_progress is not None:
            on_progress(
                report.remaining or 0,
                report.completed or 0,
                report.failed or 0,
                report.warning or 0,
            )

    def on_final(status: Dataset, identifier: Dataset | None) -> None:
        counts(status)
        # PS3.4 C.4.2.1.6: Number of Remaining Sub-operations is only in a final response after
        # a cancel; otherwise nothing remains.
        if "NumberOfRemainingSuboperations" not in status:
            report.remaining = 0
        if identifier is not None:
            failed = identifier.get("FailedSOPInstanceUIDList")
            if failed:
                values = failed if isinstance(failed, list | MultiValue) else [failed]
                report.failed_instances = [str(uid) for uid in values]

    return on_pending, on_final


def move(
    config: Config,
    peer: Peer,
    destination_aet: str,
    level: Level,
    model: Model,
    keys: Dataset,
    *,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> RetrieveReport:
    """C-MOVE (PS3.4 C.4.2): ask ``peer`` to send the matching instances to ``destination_aet``.

    The peer resolves the AE title itself (an unknown one is its 0xA801). ``on_progress`` gets
    the sub-operation counts of every Pending response; setting ``cancel`` sends C-CANCEL.
    """
    check_level(model, level)
    if not valid_ae_title(destination_aet):
        raise ValueError(f"move destination {destination_aet!r} is not a valid AE title")
    sop_class = qr_sop_class(model, Operation.MOVE)
    identifier = _identifier(level, keys)
    report = RetrieveReport(peer=peer, service=Operation.MOVE)

    def request(assoc: Association, message_id: int) -> _Responses:
        responses: _Responses = assoc.send_c_move(
            identifier, destination_aet.strip(), sop_class, msg_id=message_id
        )
        return responses

    on_pending, on_final = _retrieve_handlers(report, on_progress)
    contexts = [build_context(sop_class, QR_TRANSFER_SYNTAXES)]
    _exchange(config, peer, report, sop_class, contexts, request, on_pending, on_final, cancel)
    return report


# C-GET sub-operations arrive as C-STORE requests on our own association (PS3.4 C.4.3.1), so it
# proposes storage contexts too, with us in the SCP role (PS3.7 D.3.3.4). Every class of
# pynetdicom's StoragePresentationContexts (120: sized to leave room in the 128 of PS3.8
# 9.3.2.2) in the uncompressed little endian syntaxes every SCP can send; the contexts left over
# ask for the common image classes once more in a compressed syntax, so that compressed data
# can arrive as it is stored. The peer picks one syntax per context (PS3.8 9.3.3.2).
_GET_UNCOMPRESSED: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_GET_COMPRESSED: list[str | UID] = [
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    RLELossless,
    JPEG2000,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    DeflatedExplicitVRLittleEndian,
]
_GET_COMPRESSED_CLASSES = [
    UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
    UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
    UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
    UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
    UID("1.2.840.10008.5.1.4.1.1.6.1"),  # Ultrasound Image Storage
    UID("1.2.840.10008.5.1.4.1.1.1.2"),  # Digital Mammography X-Ray Image Storage - Presentation
    UID("1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture Image Storage
    UID("1.2.840.10008.5.1.4.1.1.3.1"),  # Ultrasound Multi-frame Image Storage
]


def get_contexts(sop_class: UID) -> tuple[list[PresentationContext], list[Any]]:
    """The presentation contexts (at most 128) and SCP/SCU role items a C-GET proposes."""
    storage = [UID(str(cx.abstract_syntax)) for cx in StoragePresentationContexts]
    contexts = [build_context(sop_class, QR_TRANSFER_SYNTAXES)]
    contexts += [build_context(uid, _GET_UNCOMPRESSED) for uid in storage]
    room = MAX_CONTEXTS_PER_ASSOCIATION - len(contexts)
    contexts += [build_context(uid, _GET_COMPRESSED) for uid in _GET_COMPRESSED_CLASSES[:room]]
    # PS3.7 D.3.3.4: one role item per SOP class; we are SCP (we receive the C-STOREs).
    roles = [build_role(uid, scp_role=True) for uid in dict.fromkeys(storage)]
    return contexts, roles


class _InstanceWriter:
    """The EVT_C_STORE handler of a C-GET: each instance becomes a Part 10 file in ``folder``.

    The file holds the data set exactly as received (no decoding), after a File Meta group with
    our implementation identity (PS3.10 7.1). Names are random (never a UID or any other value
    the peer sent); the file is written under a temporary name in the same folder, fsynced and
    renamed, and the folder fsynced, before success is answered; any failure answers 0xA700
    (PS3.4 B.2.3, Refused: out of resources) and leaves nothing behind.
    """

    def __init__(self, folder: Path, report: RetrieveReport) -> None:
        self.folder = folder
        self.report = report

    def __call__(self, event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        sop_class = UID(str(request.AffectedSOPClassUID or ""))
        sop_instance = UID(str(request.AffectedSOPInstanceUID or ""))
        what = f"SOP instance {sop_instance}"
        try:
            if request.DataSet is None:
                raise ValueError("the C-STORE request carries no data set")
            meta = create_file_meta(
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                transfer_syntax=UID(event.context.transfer_syntax),
                implementation_uid=UID(IMPLEMENTATION_CLASS_UID),
                implementation_version=IMPLEMENTATION_VERSION_NAME,
            )
            header = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
            # pynetdicom holds the received data set in a BytesIO; write it without a copy.
            path = _write_atomically(self.folder, header, request.DataSet.getbuffer())
        except Exception as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning("%s not written to %s: %s", what, self.folder, reason)
            self.report.refused.append(f"{what}: {reason}")
            return int(Status.OUT_OF_RESOURCES)
        self.report.files.append(path)
        log.info("%s written to %s", what, path)
        return int(Status.SUCCESS)


def _write_atomically(folder: Path, header: bytes, data: memoryview) -> Path:
    """Write ``header + data`` to a new randomly named ``.dcm`` file in ``folder``, durably."""
    temp = folder / f".{secrets.token_hex(16)}.part"
    try:
        with temp.open("xb") as fh:
            fh.write(header)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        target = folder / f"{secrets.token_hex(16)}.dcm"
        os.rename(temp, target)  # a 128-bit random name does not clash in practice
        fsync_dir(folder)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def get(
    config: Config,
    peer: Peer,
    level: Level,
    model: Model,
    keys: Dataset,
    out_dir: Path,
    *,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> RetrieveReport:
    """C-GET (PS3.4 C.4.3): retrieve the matching instances over this association into
    ``out_dir`` (which must exist), one Part 10 file each (see :class:`_InstanceWriter`).

    ``on_progress`` gets the sub-operation counts of every Pending response; setting
    ``cancel`` sends C-CANCEL.
    """
    check_level(model, level)
    sop_class = qr_sop_class(model, Operation.GET)
    identifier = _identifier(level, keys)
    report = RetrieveReport(peer=peer, service=Operation.GET)

    def request(assoc: Association, message_id: int) -> _Responses:
        responses: _Responses = assoc.send_c_get(identifier, sop_class, msg_id=message_id)
        return responses

    on_pending, on_final = _retrieve_handlers(report, on_progress)
    contexts, roles = get_contexts(sop_class)
    writer = _InstanceWriter(out_dir, report)
    _exchange(
        config,
        peer,
        report,
        sop_class,
        contexts,
        request,
        on_pending,
        on_final,
        cancel,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, writer)],
    )
    return report
