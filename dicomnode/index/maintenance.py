"""Index-side maintenance, in plain SQL on a connection inside the caller's transaction: removing
parts of the Patient -> Study -> Series -> Instance hierarchy, the storage quota, the maintained
total and the numbers ``dicomnode stats`` shows.

Table and column names come from the models, never from received data; values are bound.

Removing rows journals the files (``pending_delete``) in the same transaction: see
:class:`dicomnode.index.models.PendingDelete` for why rows go before files.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dicomnode.index.attributes import PERSON_NAMES
from dicomnode.qr import Level

# The maintained total (models.StoreTotal), kept by the very statements that change instance rows,
# whoever runs them (a store on any worker, a delete, a rebuild, a test populating the index).
TOTAL_TRIGGERS: tuple[str, ...] = (
    "CREATE TRIGGER IF NOT EXISTS instance_total_insert AFTER INSERT ON instance BEGIN "
    "UPDATE store_total SET instances = instances + 1, bytes = bytes + NEW.file_size "
    "WHERE id = 1; END",
    "CREATE TRIGGER IF NOT EXISTS instance_total_delete AFTER DELETE ON instance BEGIN "
    "UPDATE store_total SET instances = instances - 1, bytes = bytes - OLD.file_size "
    "WHERE id = 1; END",
    "CREATE TRIGGER IF NOT EXISTS instance_total_size AFTER UPDATE OF file_size ON instance "
    "BEGIN UPDATE store_total SET bytes = bytes - OLD.file_size + NEW.file_size "
    "WHERE id = 1; END",
)
RECOUNT_TOTAL_SQL = (
    "INSERT OR REPLACE INTO store_total (id, instances, bytes) "
    "SELECT 1, COUNT(*), COALESCE(SUM(file_size), 0) FROM instance"
)
# A study's recycling age: when its first instance arrived (migration and rebuild fill it in).
FILL_STUDY_RECEIVED_AT_SQL = (
    "UPDATE study SET received_at = COALESCE((SELECT MIN(i.received_at) FROM instance i "
    "JOIN series s ON s.id = i.series_id WHERE s.study_id = study.id), '')"
)

_NAME_KEYWORDS = {
    level: tuple(a.keyword for a in PERSON_NAMES if a.level is level)
    for level in (Level.PATIENT, Level.STUDY)
}


class QuotaExceeded(Exception):
    """Storing the instance would take the store past ``store.max_size`` and nothing (more) may
    be recycled; the transaction is rolled back. The message holds no patient data."""


@dataclass(frozen=True)
class Quota:
    """``store.max_size`` (bytes, > 0) and whether to recycle the oldest studies at the limit."""

    max_size: int
    recycle: bool


@dataclass(frozen=True)
class Total:
    instances: int
    bytes: int


@dataclass
class RemovedStudy:
    """What one delete or recycle removed of one study: for the audit trail and the report."""

    study_uid: str
    patient_id: str  # the DICOM Patient ID (0010,0020)
    issuer: str
    whole: bool = False  # the study row went too (else some of its series did)
    series_uids: list[str] = field(default_factory=list)
    instances: int = 0
    bytes: int = 0
    paths: list[str] = field(default_factory=list)


def read_total(con: sqlite3.Connection) -> Total:
    row = con.execute("SELECT instances, bytes FROM store_total WHERE id = 1").fetchone()
    return Total(0, 0) if row is None else Total(int(row[0]), int(row[1]))


def counted_total(con: sqlite3.Connection) -> Total:
    """The total summed over the instance table (what the maintained one must equal)."""
    row = con.execute("SELECT COUNT(*), COALESCE(SUM(file_size), 0) FROM instance").fetchone()
    return Total(int(row[0]), int(row[1]))


def _ids(con: sqlite3.Connection, sql: str, value: Any) -> list[int]:
    return [int(r[0]) for r in con.execute(sql, (value,))]


def remove(
    con: sqlite3.Connection,
    queued_at: str,
    *,
    patients: Iterable[int] = (),
    studies: Iterable[int] = (),
    series: Iterable[int] = (),
) -> list[RemovedStudy]:
    """Delete the rows of these patients, studies and series (row ids) and everything under
    them, journal their files in ``pending_delete``, and prune what is left empty above them
    (a study without series, a patient without studies) with its person-name keys; the
    ModalitiesInStudy of a study that keeps some series is recomputed. Inside the caller's
    write transaction. Returns what went, per study."""
    patient_ids = set(patients)
    study_ids = set(studies)
    for patient in patient_ids:
        study_ids.update(_ids(con, "SELECT id FROM study WHERE patient_id = ?", patient))
    targets: dict[int, set[int]] = {
        study: set(_ids(con, "SELECT id FROM series WHERE study_id = ?", study))
        for study in study_ids
    }
    for one in series:
        found = con.execute("SELECT study_id FROM series WHERE id = ?", (one,)).fetchone()
        if found is not None:
            targets.setdefault(int(found[0]), set()).add(one)
    removed: list[RemovedStudy] = []
    for study, series_ids in sorted(targets.items()):
        found = con.execute(
            "SELECT st.study_uid, st.patient_id, p.patient_id, p.issuer FROM study st "
            "JOIN patient p ON p.id = st.patient_id WHERE st.id = ?",
            (study,),
        ).fetchone()
        if found is None:
            continue
        study_uid, patient_row, patient_id, issuer = found
        done = RemovedStudy(study_uid, patient_id, issuer)
        for one in sorted(series_ids):
            (series_uid,) = con.execute(
                "SELECT series_uid FROM series WHERE id = ?", (one,)
            ).fetchone()
            done.series_uids.append(series_uid)
            for path, size in con.execute(
                "SELECT path, file_size FROM instance WHERE series_id = ?", (one,)
            ):
                done.paths.append(path)
                done.instances += 1
                done.bytes += int(size)
            con.execute(
                "INSERT OR IGNORE INTO pending_delete (path, queued_at) "
                "SELECT path, ? FROM instance WHERE series_id = ?",
                (queued_at, one),
            )
            con.execute("DELETE FROM instance WHERE series_id = ?", (one,))
            con.execute("DELETE FROM series WHERE id = ?", (one,))
        done.whole = _prune_study(con, study, force=study in study_ids)
        patient_ids.add(int(patient_row))
        removed.append(done)
    for patient in patient_ids:
        _prune_patient(con, patient)
    return removed


def drop_instances(con: sqlite3.Connection, rows: Iterable[tuple[int, str]]) -> int:
    """Delete instance rows (id, path) whose files are gone, without journaling anything, and
    prune what is left empty above them. A row is deleted only if it still points at that path
    (a duplicate replaced meanwhile points at its new file). Returns how many went."""
    touched: set[int] = set()
    dropped = 0
    for row_id, path in rows:
        found = con.execute(
            "SELECT series_id FROM instance WHERE id = ? AND path = ?", (row_id, path)
        ).fetchone()
        if found is None:
            continue
        con.execute("DELETE FROM instance WHERE id = ?", (row_id,))
        touched.add(int(found[0]))
        dropped += 1
    studies: set[int] = set()
    for series in touched:
        if con.execute("SELECT 1 FROM instance WHERE series_id = ? LIMIT 1", (series,)).fetchone():
            continue
        found = con.execute("SELECT study_id FROM series WHERE id = ?", (series,)).fetchone()
        con.execute("DELETE FROM series WHERE id = ?", (series,))
        if found is not None:
            studies.add(int(found[0]))
    for study in studies:
        found = con.execute("SELECT patient_id FROM study WHERE id = ?", (study,)).fetchone()
        if _prune_study(con, study, force=False) and found is not None:
            _prune_patient(con, int(found[0]))
    return dropped


def _prune_study(con: sqlite3.Connection, study: int, *, force: bool) -> bool:
    """Delete the study row (and its name keys) if ``force`` or it has no series left, else
    recompute its ModalitiesInStudy; True if it went."""
    left = [r[0] for r in con.execute("SELECT modality FROM series WHERE study_id = ?", (study,))]
    if left and not force:
        modalities = "\\".join(sorted({m for m in left if m}))
        con.execute("UPDATE study SET modalities = ? WHERE id = ?", (modalities, study))
        return False
    _delete_names(con, study, Level.STUDY)
    con.execute("DELETE FROM study WHERE id = ?", (study,))
    return True


def _prune_patient(con: sqlite3.Connection, patient: int) -> None:
    if con.execute("SELECT 1 FROM study WHERE patient_id = ? LIMIT 1", (patient,)).fetchone():
        return
    _delete_names(con, patient, Level.PATIENT)
    con.execute("DELETE FROM patient WHERE id = ?", (patient,))


def _delete_names(con: sqlite3.Connection, owner: int, level: Level) -> None:
    for keyword in _NAME_KEYWORDS[level]:
        con.execute("DELETE FROM person_name WHERE owner = ? AND keyword = ?", (owner, keyword))


def enforce_quota(
    con: sqlite3.Connection, quota: Quota, keep_study_uid: str, queued_at: str
) -> list[RemovedStudy]:
    """After an instance row was inserted (in this write transaction): if the maintained total
    is past the quota, refuse (raise :class:`QuotaExceeded`) or, recycling, remove the studies
    received longest ago until it fits again. The study ``keep_study_uid`` (the incoming
    instance's) is never removed; when removing every other study would not be enough, nothing
    is removed and the store is refused."""
    total = read_total(con)
    if total.bytes <= quota.max_size:
        return []
    used = f"{total.bytes} bytes with this instance, store.max_size is {quota.max_size}"
    if not quota.recycle:
        raise QuotaExceeded(f"storage quota reached ({used}; store.at_limit refuse)")
    excess = total.bytes - quota.max_size
    chosen: list[int] = []
    freed = 0
    candidates = con.execute(
        "SELECT id FROM study WHERE study_uid != ? ORDER BY received_at, id", (keep_study_uid,)
    )
    for (study,) in candidates:
        (size,) = con.execute(
            "SELECT COALESCE(SUM(i.file_size), 0) FROM instance i "
            "JOIN series s ON s.id = i.series_id WHERE s.study_id = ?",
            (study,),
        ).fetchone()
        chosen.append(int(study))
        freed += int(size)
        if freed >= excess:
            break
    else:
        candidates.close()
        raise QuotaExceeded(
            f"storage quota reached ({used}) and recycling every other study would free only "
            f"{freed} of the {excess} bytes needed"
        )
    candidates.close()
    return remove(con, queued_at, studies=chosen)


def stats(con: sqlite3.Connection) -> dict[str, Any]:
    """Counts, bytes, and summaries per modality (of the series) and per sender (the calling AE
    title each instance came from; "" for instances indexed by ``index rebuild``)."""

    def one(sql: str) -> int:
        return int(con.execute(sql).fetchone()[0] or 0)

    total = counted_total(con)
    modalities = [
        {"modality": m, "studies": st, "series": se, "instances": n, "bytes": int(b or 0)}
        for m, st, se, n, b in con.execute(
            "SELECT s.modality, COUNT(DISTINCT s.study_id), COUNT(DISTINCT s.id), COUNT(i.id), "
            "SUM(i.file_size) FROM series s LEFT JOIN instance i ON i.series_id = s.id "
            "GROUP BY s.modality ORDER BY COUNT(i.id) DESC, s.modality"
        )
    ]
    senders = [
        {
            "calling_ae_title": ae,
            "studies": st,
            "instances": n,
            "bytes": int(b or 0),
            "first_received": first,
            "last_received": last,
        }
        for ae, st, n, b, first, last in con.execute(
            "SELECT i.received_from, COUNT(DISTINCT s.study_id), COUNT(*), SUM(i.file_size), "
            "MIN(i.received_at), MAX(i.received_at) FROM instance i "
            "JOIN series s ON s.id = i.series_id GROUP BY i.received_from "
            "ORDER BY COUNT(*) DESC, i.received_from"
        )
    ]
    return {
        "patients": one("SELECT COUNT(*) FROM patient"),
        "studies": one("SELECT COUNT(*) FROM study"),
        "series": one("SELECT COUNT(*) FROM series"),
        "instances": total.instances,
        "bytes": total.bytes,
        "by_modality": modalities,
        "by_sender": senders,
        "pending_deletions": one("SELECT COUNT(*) FROM pending_delete"),
        "worklist_items": one("SELECT COUNT(*) FROM worklist_item"),
        "performed_steps": one("SELECT COUNT(*) FROM performed_step"),
    }
