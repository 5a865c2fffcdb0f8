"""Archive maintenance: rebuilding the index from the files in storage (``dicomnode index
rebuild``) and checking that the index and the files agree (``dicomnode index verify``).

The store's invariants these rely on (``dicomnode.archive``, ``dicomnode.storage``): a file enters
``objects/`` (complete, fsynced) before its row is written; a row leaves before its file does, and
in the same transaction the file is journaled in ``pending_delete``. So, with the node running:

- a row without its file never occurs in passing: it is a fault (the file was lost or removed by
  hand). Its instance cannot be sent any more; repairing drops the row, so C-FIND stops offering
  what C-MOVE/C-GET would fail to send.
- a file without a row occurs for an instant during a store (between the rename and the row), and
  during a delete (journaled). Repairing indexes it, as a store would have: a file is never deleted
  for want of a row, since it may be the only copy. The archive treats a store whose file was
  indexed that way meanwhile as stored.
- a size on the row that differs from the file's: repaired (the row takes the file's size) only
  when the file still reads completely as the very instance the row names; a damaged file, or
  one holding another instance, is reported and left for a person to decide.

Nothing here imports pynetdicom.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.archive import Archive, Rejected, read_stored
from dicomnode.index import Index, InstanceRecord, NewInstance
from dicomnode.storage import Storage, StorageError, StoredFile, fsync_dir

_BATCH = 500  # instances per write transaction when indexing many files

Progress = Callable[[int], None]


def _received_at(mtime: float) -> str:
    """A file's modification time as the ``received_at`` of a row indexed from it: the store
    wrote the file as it received it."""
    return dt.datetime.fromtimestamp(mtime, dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class Skipped:
    """A file that was not indexed, and why (no patient data: a path and a reason)."""

    path: str
    reason: str
    existing: str = ""  # the indexed file holding the same SOP Instance UID, for a duplicate


@dataclass
class RebuildReport:
    files: int = 0
    indexed: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    backup: Path | None = None
    studies: int = 0
    patients: int = 0


class IndexExists(Exception):
    """``index rebuild`` without ``--force`` over an index file that is not empty."""


def _index_many(
    index: Index, files: list[StoredFile], progress: Progress | None
) -> tuple[int, list[Skipped]]:
    """Read and index ``files`` in batches; returns how many were indexed and what was not."""
    indexed = 0
    skipped: list[Skipped] = []
    batch: list[NewInstance] = []

    def flush() -> None:
        nonlocal indexed
        duplicates: list[tuple[NewInstance, InstanceRecord]] = index.add_many(batch)
        for new, existing in duplicates:
            skipped.append(
                Skipped(
                    str(new.instance["path"]),
                    f"holds a SOP Instance UID already indexed from {existing.path}",
                    existing.path,
                )
            )
        indexed += len(batch) - len(duplicates)
        batch.clear()

    for stored in files:
        try:
            batch.append(read_stored(stored.path, stored.relative, _received_at(stored.mtime)))
        except Rejected as exc:
            skipped.append(Skipped(stored.relative, exc.reason))
        except FileNotFoundError:
            skipped.append(Skipped(stored.relative, "removed while being read"))
        if len(batch) >= _BATCH:
            flush()
        if progress is not None:
            progress(1)
    if batch:
        flush()
    return indexed, skipped


def _sqlite_files(database: Path) -> list[Path]:
    return [database, Path(f"{database}-wal"), Path(f"{database}-shm")]


def rebuild(
    storage_dir: Path,
    database: Path,
    *,
    force: bool = False,
    progress: Callable[[int], Progress] | None = None,
) -> RebuildReport:
    """Index every file under ``storage_dir/objects`` into a new index file and put it in place
    of ``database``. The node must be stopped (its workers hold the old file open).

    Refuses (:class:`IndexExists`) when ``database`` exists and is not empty, unless ``force``:
    then the new index is built beside it and swapped in with one rename, the old file kept as
    ``<database>.bak-<UTC time>`` (with its write-ahead log, if a crash left one). Worklist items
    and MPPS records live only in the index and are not rebuilt. ``progress(total)`` is called
    once with the number of files and returns the callback advanced per file.
    """
    if database.exists() and database.stat().st_size > 0 and not force:
        raise IndexExists(
            f"the index {database} exists and is not empty; stop the node and run "
            "'dicomnode index rebuild --force' to rebuild it into a new file (the old one is "
            "kept beside it as a backup)"
        )
    storage = Storage(storage_dir)
    if not storage.objects.is_dir():
        raise FileNotFoundError(f"no object store at {storage.objects}")
    files = sorted(storage.files(), key=lambda f: f.relative)
    fresh = database.with_name(database.name + ".rebuild")
    for leftover in _sqlite_files(fresh):  # an earlier rebuild that did not finish
        leftover.unlink(missing_ok=True)
    report = RebuildReport(files=len(files))
    index = Index(fresh)
    index.open()
    try:
        report.indexed, report.skipped = _index_many(
            index, files, progress(len(files)) if progress is not None else None
        )
        found = index.stats()
        report.studies, report.patients = found["studies"], found["patients"]
    finally:
        index.close()  # the last connection checkpoints and removes the new file's WAL
    report.backup = _swap(fresh, database)
    return report


def _swap(fresh: Path, database: Path) -> Path | None:
    """Put ``fresh`` in place of ``database`` with one rename; the old file (if any, not empty)
    is kept as a backup by a hard link made first, so ``database`` names a complete index at
    every moment. Returns the backup's path."""
    with open(fresh, "rb") as fh:
        os.fsync(fh.fileno())
    backup = None
    if database.exists() and database.stat().st_size > 0:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        backup = database.with_name(f"{database.name}.bak-{stamp}")
        os.link(database, backup)
    wal, shm = _sqlite_files(database)[1:]
    # A write-ahead log left by a crash belongs to the old file: SQLite would apply it to the new
    # one. It goes with the backup; the shared-memory index is rebuilt by whoever opens next.
    if wal.exists():
        if backup is not None:
            os.replace(wal, Path(f"{backup}-wal"))
        else:
            wal.unlink()
    shm.unlink(missing_ok=True)
    os.replace(fresh, database)
    fsync_dir(database.parent)
    return backup


# --- verify ------------------------------------------------------------------------------------

MISSING_FILE = "missing-file"  # a row whose file is gone
UNINDEXED_FILE = "unindexed-file"  # a file without a row (and not journaled for deletion)
SIZE_MISMATCH = "size-mismatch"  # the row's file_size is not the file's
UID_MISMATCH = "uid-mismatch"  # (--deep) the file holds another SOP instance than its row says
DAMAGED = "damaged"  # (--deep) the file does not read as a complete instance
PENDING_DELETION = "pending-deletion"  # a deletion a crash interrupted
TOTAL = "total"  # the maintained total (store_total) differs from the rows'


@dataclass
class Fault:
    kind: str
    path: str
    detail: str
    repaired: bool = False


@dataclass
class VerifyReport:
    files: int = 0
    rows: int = 0
    faults: list[Fault] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[Fault]:
        return [f for f in self.faults if not f.repaired]


def verify(
    archive: Archive,
    *,
    repair: bool = False,
    deep: bool = False,
    progress: Callable[[int], Progress] | None = None,
) -> VerifyReport:
    """Compare the index with the files under ``objects/`` (see the module docstring for what
    each fault means and what ``repair`` does about it). Safe while the node runs: files are
    listed before the rows are read, and every fault is checked again before it is reported."""
    storage, index = archive.storage, archive.index
    files = {f.relative: f for f in storage.files()}
    rows = index.instance_files()
    pending = set(index.pending_deletions(limit=-1))
    report = VerifyReport(files=len(files), rows=len(rows))
    faults = report.faults

    gone: list[tuple[int, str]] = []
    for path, (row_id, _, uid) in sorted(rows.items()):
        if path in files or _exists(storage, path):
            continue
        faults.append(Fault(MISSING_FILE, path, f"the row of SOP Instance UID {uid} has no file"))
        gone.append((row_id, path))
    if repair and gone:
        index.drop_instances(gone)
        for fault in faults:  # so far only these: dropped (or replaced or deleted meanwhile)
            fault.repaired = True

    for path, (row_id, size, uid) in sorted(rows.items()):
        stored = files.get(path)
        if stored is None or stored.size == size:
            continue
        fault = Fault(SIZE_MISMATCH, path, f"the row says {size} bytes, the file has {stored.size}")
        faults.append(fault)
        if repair:
            try:
                new = read_stored(stored.path, path, "")
            except (Rejected, OSError) as exc:
                fault.detail += f"; the file is damaged ({_reason(exc)}): left as it is"
                continue
            if new.instance["sop_instance_uid"] != uid:
                fault.detail += "; the file holds another SOP instance: left as it is"
                continue
            fault.repaired = index.update_file_size(row_id, path, int(new.instance["file_size"]))

    if deep:
        checked = [(p, f) for p, f in sorted(files.items()) if p in rows]
        advance = progress(len(checked)) if progress is not None else None
        for path, stored in checked:
            if advance is not None:
                advance(1)
            try:
                new = read_stored(stored.path, path, "")
            except FileNotFoundError:
                continue  # deleted meanwhile
            except (Rejected, OSError) as exc:
                faults.append(Fault(DAMAGED, path, f"does not read as an instance: {_reason(exc)}"))
                continue
            if new.instance["sop_instance_uid"] != rows[path][2]:
                faults.append(
                    Fault(
                        UID_MISMATCH,
                        path,
                        f"holds SOP Instance UID {new.instance['sop_instance_uid']}, its row "
                        f"says {rows[path][2]}",
                    )
                )

    unindexed = [f for p, f in sorted(files.items()) if p not in rows and p not in pending]
    found: list[Fault] = []
    for stored in unindexed:
        if stored.path.exists():
            found.append(Fault(UNINDEXED_FILE, stored.relative, "no row in the index"))
    faults += found
    if repair and found:
        by_path = {f.path: f for f in found}
        _, skipped = _index_many(index, [files[p] for p in by_path], None)
        for fault in found:
            fault.repaired = True
        for skip in skipped:
            fault = by_path[skip.path]
            if skip.existing == skip.path:
                continue  # the node indexed it meanwhile: it was a store in progress
            fault.detail += f"; not indexed: {skip.reason}"
            fault.repaired = False

    still_pending = sorted(pending & set(index.pending_deletions(limit=-1)))
    for path in still_pending:
        faults.append(
            Fault(PENDING_DELETION, path, "deleted from the index; the file is still to go")
        )
    if repair and still_pending:
        archive.finish_deletions()
        left = set(index.pending_deletions(limit=-1))
        for fault in faults:
            if fault.kind == PENDING_DELETION:
                fault.repaired = fault.path not in left

    maintained, counted = index.check_total()
    if maintained != counted:
        fault = Fault(
            TOTAL,
            "",
            f"the maintained total says {maintained.instances} instances, {maintained.bytes} "
            f"bytes; the rows hold {counted.instances}, {counted.bytes}",
        )
        faults.append(fault)
        if repair:
            index.recount_total()
            fault.repaired = True
    return report


def _exists(storage: Storage, relative: str) -> bool:
    try:
        return storage.resolve(relative).is_file()
    except StorageError:
        return False  # a path outside the object store cannot be sent either


def _reason(exc: Exception) -> str:
    if isinstance(exc, Rejected):
        return exc.reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
