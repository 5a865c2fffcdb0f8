"""The SCU side of the node: verify a peer (C-ECHO) and send files to it (C-STORE).

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
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, MediaStorageDirectoryStorage
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context

from dicomnode.config import Config, Peer
from dicomnode.identity import new_ae
from dicomnode.status import Category, category

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


# What each file of a batch whose association failed is reported with.
_NOT_SENT = {
    FailureKind.UNREACHABLE: "not sent: the peer is unreachable",
    FailureKind.REJECTED: "not sent: the association was rejected",
    FailureKind.ABORTED: "not sent: the association request was aborted",
    FailureKind.NO_CONTEXT: "not sent: no presentation context was accepted",
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
    ae: AE, config: Config, peer: Peer, contexts: Sequence[PresentationContext]
) -> tuple[Association, AssociationFailure | None]:
    """Request an association with ``peer`` proposing ``contexts`` (at most 128).

    Returns the association (its negotiated contexts are readable even when it failed) and,
    when it is not established, why.
    """
    connected = threading.Event()

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
        evt_handlers=[(evt.EVT_CONN_OPEN, on_connect)],
    )
    if assoc.is_established:
        return assoc, None
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


def _rejected_summary(assoc: Association) -> str:
    reasons = sorted(
        {_CONTEXT_RESULTS.get(cx.result or 0, cx.status) for cx in assoc.rejected_contexts}
    )
    return "; ".join(reasons) or "no reason given"


def _finish(assoc: Association) -> None:
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
    _finish(assoc)
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
        _finish(assoc)


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
