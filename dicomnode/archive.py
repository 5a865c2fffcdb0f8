"""The archive: storing a received instance into the file store and the index, as one outcome.

It imports no pynetdicom. The C-STORE handler gives it a complete Part 10 file in the storage
``tmp/`` folder and what the request said; it answers with a named status and a reason for the log.
The order is fixed: validate, move the file into the store (durably), then index it; if indexing
fails the file is removed again, so success always means "on disk and indexed".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import filecmp
import logging
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomnode.audit import AuditLog
from dicomnode.config import AtLimit, Config, DuplicatePolicy
from dicomnode.encoding import EncodingError, check_dataset, inflate
from dicomnode.index import (
    DuplicateInstance,
    Index,
    IndexError_,
    NewInstance,
    Quota,
    QuotaExceeded,
    RemovedStudy,
)
from dicomnode.index.query import StoredInstance, count, instances, parse, run
from dicomnode.mpps import PerformedSteps
from dicomnode.policy import is_valid_uid, uid_name
from dicomnode.qr import Level, Model
from dicomnode.status import Status
from dicomnode.storage import Storage, StorageError
from dicomnode.worklist import Worklist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreRequest:
    """What the C-STORE request said about the instance (PS3.7 9.1.1.1)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae_title: str


@dataclass(frozen=True)
class StoreOutcome:
    """The status to answer and, when it is not plain success, why (no patient data in it)."""

    status: Status
    reason: str = ""
    replaced: bool = False  # a duplicate with different content took the stored copy's place
    study_uid: str = ""  # the instance's study, once the data set was read (for the audit trail)


class TooManyMatches(Exception):
    """A query matched more than the configured cap; nothing was answered."""


class Rejected(Exception):
    """Validation failed: answer ``status``; ``reason`` goes to the log."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Archive:
    """Storage plus index, opened together for the lifetime of a node."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.storage = Storage(config.storage_dir)
        self.index = Index(config.database, config.database_busy_timeout)
        self.worklist = Worklist(config, self.index)
        self.steps = PerformedSteps(self.index)
        # The audit trail of everything done through this archive (and by the node's handlers,
        # which reach it as node.archive.audit). Opened on its first record.
        self.audit = AuditLog(
            config.audit.path if config.audit.enabled else None, node=config.ae_title
        )

    def open(self) -> None:
        """Prepare the folders (clearing leftover temp files), open the index, finish deletions a
        crash interrupted and expire old worklist items."""
        self.storage.prepare()
        self.index.open()
        finished = self.finish_deletions()
        if finished:
            log.info("removed %d file(s) whose deletion an earlier run left unfinished", finished)
        self.worklist.expire()

    def open_index(self) -> None:
        """Open only the index, for the maintenance commands: nothing under ``storage_dir`` is
        touched (a running node's receives live in ``tmp/``) and no worklist item expires."""
        self.index.open()

    def finish_deletions(self) -> int:
        """Remove the files journaled for deletion (their rows are gone already) and clear their
        entries; returns how many entries were cleared."""
        cleared = 0
        while True:
            pending = self.index.pending_deletions()
            if not pending:
                return cleared
            gone = self._remove_files(pending)
            cleared += len(gone)
            if len(gone) < len(pending):  # some cannot be removed (logged): try again later
                return cleared

    def _remove_files(self, paths: list[str]) -> list[str]:
        """Delete stored files whose rows were removed, then their journal entries.

        Why rows first: a row without its file would be offered by C-FIND and then fail its
        C-MOVE/C-GET; a file without a row is offered by nothing. The rows went in the one
        transaction that also journaled these paths (``pending_delete``), so a crash at any
        point leaves either everything (before the commit) or rows gone and files listed for
        deletion, which :meth:`finish_deletions` (at the next start, or ``index verify
        --repair``) completes; a file deleted whose entry stayed is simply cleared then.
        """
        gone: list[str] = []
        for start in range(0, len(paths), 500):
            removed = self.storage.remove_many(paths[start : start + 500])
            try:
                self.index.forget_deletions(removed)
            except IndexError_ as exc:  # the files are gone; the entries are cleared next time
                log.error("cannot clear journal entries of deleted files: %s", exc)
            gone += removed
        return gone

    def delete(self, level: Level, ids: list[int], by: str = "command") -> list[RemovedStudy]:
        """Delete patients, studies or series (row ids from ``index.lookup``) with their files,
        and audit it in one ``delete`` record (PS3.15 A.5.3.4 DICOM Study Deleted). Rows first,
        then files: see :meth:`_remove_files`."""
        try:
            removed = self.index.remove(level, ids)
        except IndexError_ as exc:
            self.audit.record("delete", "failure", by=by, level=level.value.lower(), error=str(exc))
            raise
        if not removed:
            return removed
        self._remove_files([p for r in removed for p in r.paths])
        fields: dict[str, Any] = {
            "by": by,
            "level": level.value.lower(),
            "patient_id": removed[0].patient_id,
            "study_uids": [r.study_uid for r in removed],
            "instances": sum(r.instances for r in removed),
            "bytes": sum(r.bytes for r in removed),
        }
        if level is Level.SERIES:
            fields["series_uids"] = [u for r in removed for u in r.series_uids]
        self.audit.record("delete", **fields)
        return removed

    def _quota(self) -> Quota | None:
        store = self.config.store
        if store.max_size <= 0:
            return None
        return Quota(store.max_size, store.at_limit is AtLimit.RECYCLE)

    def _check_quota(self, quota: Quota, size: int) -> None:
        """Before committing, refuse what cannot fit without taking the write lock (one row
        read). The decision that counts is made again under the lock (``Index.add``), where
        every worker's stores show."""
        if size > quota.max_size:
            raise Rejected(
                Status.OUT_OF_RESOURCES,
                f"an instance of {size} bytes is larger than the storage quota "
                f"(store.max_size {quota.max_size} bytes)",
            )
        if not quota.recycle:
            used = self.index.total().bytes
            if used + size > quota.max_size:
                raise Rejected(
                    Status.OUT_OF_RESOURCES,
                    f"storage quota reached ({used} bytes stored, {size} more would pass "
                    f"store.max_size {quota.max_size}; store.at_limit refuse)",
                )

    def _recycled(self, removed: list[RemovedStudy]) -> None:
        """Storage recycling removed these studies' rows to make room: remove their files and
        audit each study (PS3.15 A.5.3.4 DICOM Study Deleted)."""
        self._remove_files([p for r in removed for p in r.paths])
        for r in removed:
            self.audit.record(
                "delete",
                by="recycle",
                level="study",
                patient_id=r.patient_id,
                study_uids=[r.study_uid],
                instances=r.instances,
                bytes=r.bytes,
            )
        log.warning(
            "storage quota reached (store.max_size %d bytes, store.at_limit recycle): removed "
            "the %d stud%s received longest ago (%d instances, %d bytes) to store a new instance",
            self.config.store.max_size,
            len(removed),
            "y" if len(removed) == 1 else "ies",
            sum(r.instances for r in removed),
            sum(r.bytes for r in removed),
        )

    def close(self) -> None:
        self.index.close()
        self.audit.close()

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration: its query, store and worklist settings apply from now on
        (storage, index and audit paths stay as opened; they need a restart)."""
        self.config = config
        self.worklist.config = config

    def find(self, model: Model, identifier: Dataset) -> Iterator[Dataset]:
        """C-FIND: the response identifiers for ``identifier`` in ``model``, streamed.

        Raises :class:`QueryError` for an identifier that cannot be answered and
        :class:`TooManyMatches` past ``query.max_matches``, both before the first match.
        """
        settings = self.config.query
        query = parse(identifier, model, case_sensitive_names=settings.case_sensitive_names)
        with self.index.reading():
            matches = count(query, settings.max_matches)
            if matches > settings.max_matches:
                raise TooManyMatches(
                    f"more than {settings.max_matches} matches (query.max_matches); "
                    "narrow the query"
                )
            yield from run(query)

    def retrieve(self, model: Model, identifier: Dataset) -> list[StoredInstance]:
        """C-MOVE/C-GET: the stored instances ``identifier`` names, in study/series order.

        Raises :class:`QueryError` for an identifier that names nothing retrievable.
        """
        query = parse(identifier, model, retrieve=True)
        with self.index.reading():
            return instances(query)

    def path_of(self, instance: StoredInstance) -> Path:
        """The file of an instance to send, checked to lie inside the object store."""
        return self.storage.resolve(instance.path)

    def store(self, temp: Path, request: StoreRequest) -> StoreOutcome:
        """Store the Part 10 file ``temp`` (in ``storage.tmp``) received for ``request``.

        ``temp`` is consumed: moved into the store, or deleted.
        """
        committed: str | None = None
        quota = self._quota()
        try:
            new = _with(
                _read_and_check(temp, request),
                transfer_syntax=request.transfer_syntax,
                file_size=temp.stat().st_size,
                received_from=request.calling_ae_title,
                received_at=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            )
            study = str(new.study.get("study_uid") or "")
            existing = self.index.existing(request.sop_instance_uid)
            if existing is not None:
                return replace(self._duplicate(new, temp, existing.path), study_uid=study)
            if quota is not None:
                self._check_quota(quota, int(new.instance["file_size"]))
            committed = self.storage.commit(temp)
            try:
                recycled = self.index.add(_with(new, path=committed), quota)
            except QuotaExceeded as exc:
                return StoreOutcome(Status.OUT_OF_RESOURCES, str(exc))
            except DuplicateInstance as dup:
                if dup.existing.path == committed:
                    # ``index verify --repair`` indexed our committed file (it saw a file
                    # without a row) between our commit and our write: it is stored.
                    committed = None
                    return StoreOutcome(Status.SUCCESS, study_uid=study)
                # Another association indexed the same instance between our look-up and our
                # write: ours is the duplicate, decided like any other.
                outcome = self._duplicate(new, self.storage.resolve(committed), dup.existing.path)
                if outcome.replaced:
                    committed = None
                return replace(outcome, study_uid=study)
            committed = None
            if recycled:
                self._recycled(recycled)
            return StoreOutcome(Status.SUCCESS, study_uid=study)
        except Rejected as exc:
            return StoreOutcome(exc.status, exc.reason)
        except IndexError_ as exc:
            return StoreOutcome(Status.OUT_OF_RESOURCES_INDEX, str(exc))
        except StorageError as exc:
            return StoreOutcome(Status.OUT_OF_RESOURCES, str(exc))
        finally:
            # Whatever did not end up in the store is removed: the temp file if it was never
            # committed, the committed file if indexing failed.
            self.storage.discard(temp)
            if committed is not None:
                with contextlib.suppress(StorageError, OSError):
                    self.storage.remove(committed)

    def _duplicate(self, new: NewInstance, incoming: Path, stored: str) -> StoreOutcome:
        """The SOP Instance UID is already indexed: compare contents and apply the policy.

        ``incoming`` is the new file, in ``tmp/`` or already committed; the caller removes it
        unless the outcome says it replaced the stored copy.
        """
        if _same_content(incoming, self.storage.resolve(stored)):
            return StoreOutcome(Status.SUCCESS, "identical duplicate, nothing to do")
        policy = self.config.store.duplicates
        log.warning(
            "SOP instance received again with different content; duplicates policy %r",
            policy.value,
        )
        if policy is DuplicatePolicy.KEEP:
            return StoreOutcome(Status.SUCCESS, "different duplicate, kept the first copy")
        if policy is DuplicatePolicy.REJECT:
            return StoreOutcome(
                Status.DUPLICATE_SOP_INSTANCE, "different duplicate rejected by policy"
            )
        committed = (
            str(incoming.relative_to(self.storage.root))
            if incoming.is_relative_to(self.storage.objects)
            else self.storage.commit(incoming)
        )
        try:
            old = self.index.replace(_with(new, path=committed))
        except IndexError_:
            self.storage.remove(committed)
            raise
        self.storage.remove(old)
        return StoreOutcome(Status.SUCCESS, "different duplicate replaced the first copy", True)


def _with(new: NewInstance, **instance: object) -> NewInstance:
    """``new`` with more instance-level columns."""
    return NewInstance(new.patient, new.study, new.series, {**new.instance, **instance})


def _same_content(a: Path, b: Path) -> bool:
    """Byte-equal files (our files share the File Meta we write, so the data sets decide)."""
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


# --- validation --------------------------------------------------------------------------------


# What pydicom raises on data it cannot read (it has no single exception type for that).
PARSE_ERRORS = (
    InvalidDicomError,
    ValueError,
    KeyError,
    TypeError,
    EOFError,
    OSError,
    struct.error,
    NotImplementedError,
    AttributeError,
    LookupError,
)


def _read_and_check(path: Path, request: StoreRequest) -> NewInstance:
    """Parse what the index needs (never the pixel data), check it against the request, and
    return it extracted for the index."""
    # PS3.5 9.1: a UID that is not a UID cannot name an instance we would ever give back.
    if not is_valid_uid(request.sop_instance_uid):
        raise Rejected(
            Status.INVALID_OBJECT_INSTANCE, "Affected SOP Instance UID is not a valid UID"
        )
    if not is_valid_uid(request.sop_class_uid):
        raise Rejected(Status.SOP_CLASS_NOT_SUPPORTED, "Affected SOP Class UID is not a valid UID")
    ds, new = _parse(path, request.transfer_syntax)
    _check_identity(ds, request)
    return new


def _parse(path: Path, transfer_syntax: str | None) -> tuple[Dataset, NewInstance]:
    """Walk the encoding of the whole data set (a deflated one inflated, bounded), then read the
    header of our Part 10 file (stop before the pixel data) and extract the index's attributes.
    With ``transfer_syntax`` None the file's File Meta says which.

    The walk comes first: it is bounded in depth and memory, where pydicom's reader recurses
    into every sequence and inflates a deflated data set whole in memory."""
    try:
        with path.open("rb") as fp:
            start = _dataset_offset(fp)
            if transfer_syntax is None:
                meta = read_file_meta_info(path)
                transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
                if not is_valid_uid(transfer_syntax):
                    raise EncodingError("no valid Transfer Syntax UID in the File Meta")
            size = path.stat().st_size
            if transfer_syntax == DeflatedExplicitVRLittleEndian:
                ds = _parse_deflated(fp, path, start, size)
            else:
                check_dataset(fp, start, size, transfer_syntax)
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=4096)
            # Decode every attribute the index needs now, so decoding errors surface here.
            new = NewInstance.from_dataset(ds)
    except EncodingError as exc:
        raise Rejected(Status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from exc
    except RecursionError as exc:
        # Nesting our walk allows (encoding.MAX_DEPTH) can still be deeper than pydicom's reader
        # recurses within Python's limit: a clean refusal, never a dead worker thread.
        raise Rejected(
            Status.CANNOT_UNDERSTAND, "data set cannot be parsed: sequences nested too deep"
        ) from exc
    except PARSE_ERRORS as exc:
        raise Rejected(
            Status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(exc).__name__}"
        ) from exc
    return ds, new


def _parse_deflated(fp: BinaryIO, path: Path, start: int, size: int) -> Dataset:
    """A deflated data set (PS3.5 A.5): inflated once only counting, refused past the bound
    (:func:`~dicomnode.encoding.inflate_limit`, a deflate bomb stops there), then inflated into
    an unnamed file beside ``path``, walked and read from there: pydicom would inflate it whole
    in memory. The stored file stays as received."""
    fp.seek(start)
    inflate(fp, size)
    meta = read_file_meta_info(path)
    with tempfile.TemporaryFile(dir=path.parent) as plain:
        fp.seek(start)
        inflated = inflate(fp, size, plain)
        plain.flush()
        check_dataset(plain, 0, inflated, ExplicitVRLittleEndian)
        plain.seek(0)
        # Values are read now (no deferral: the unnamed file is gone afterwards); the walk has
        # bounded them all by the inflated size, which is bounded.
        ds = read_dataset(plain, is_implicit_VR=False, is_little_endian=True, stop_when=_pixels)
    ds.file_meta = meta
    return ds


def _pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    del vr, length
    return int(tag) >= 0x7FE00010  # stop_before_pixels, as dcmread does


def read_stored(path: Path, relative: str, received_at: str) -> NewInstance:
    """What the index records of a file already in the store (``index rebuild``, ``index verify
    --repair``), read and checked as a store would, the request's part taken from the file's own
    File Meta (PS3.10 7.1). The sender is not in the file: ``received_from`` stays empty.
    Raises :class:`Rejected` with the reason the file cannot be indexed."""
    ds, new = _parse(path, None)
    meta = ds.file_meta
    request = StoreRequest(
        sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "") or ""),
        sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "") or ""),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
        calling_ae_title="",
    )
    for value, what in ((request.sop_class_uid, "Class"), (request.sop_instance_uid, "Instance")):
        if not is_valid_uid(value):
            raise Rejected(
                Status.INVALID_OBJECT_INSTANCE,
                f"File Meta Media Storage SOP {what} UID is missing or not a valid UID",
            )
    _check_identity(ds, request, "the File Meta's Media Storage")
    return _with(
        new,
        transfer_syntax=request.transfer_syntax,
        file_size=path.stat().st_size,
        path=relative,
        received_from="",
        received_at=received_at,
    )


def _dataset_offset(fp: BinaryIO) -> int:
    """Where the data set starts in our Part 10 file: after the preamble, "DICM" and the File
    Meta group, whose (0002,0000) group length we wrote ourselves (PS3.10 7.1)."""
    fp.seek(132)
    header = fp.read(12)
    if len(header) < 12 or header[:4] != b"\x02\x00\x00\x00" or header[4:6] != b"UL":
        raise EncodingError("File Meta group length missing")
    return 144 + int(struct.unpack("<I", header[8:12])[0])


def _check_identity(
    ds: Dataset, request: StoreRequest, against: str = "the request's Affected"
) -> None:
    """PS3.4 B.2.3: the data set must be the instance the request names (else A900)."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_class:
        raise Rejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "data set has no SOP Class UID")
    if sop_class != request.sop_class_uid:
        raise Rejected(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"data set SOP Class UID {uid_name(sop_class)} differs from {against} SOP Class "
            f"UID {uid_name(request.sop_class_uid)}",
        )
    if not sop_instance:
        raise Rejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "data set has no SOP Instance UID")
    if sop_instance != request.sop_instance_uid:
        raise Rejected(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"data set SOP Instance UID differs from {against} SOP Instance UID",
        )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ds.get(keyword, "") or "")
        if not is_valid_uid(value):
            # PS3.3: both are Type 1 in every composite IOD; without them there is no hierarchy.
            raise Rejected(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is missing or not a valid UID"
            )
