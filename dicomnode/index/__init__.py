"""The index: a peewee SQLite database (WAL) of what the store holds, Patient -> Instance.

The index knows nothing of pynetdicom or of files; ``dicomnode.archive`` pairs it with storage.
Writes are one transaction each, begun IMMEDIATE so concurrent associations serialise on the write
lock instead of failing on an upgrade; ``synchronous=FULL`` makes a committed row durable before
the C-STORE response is sent.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peewee as pw
from playhouse.pool import PooledSqliteDatabase

from dicomnode.index.attributes import (
    PERSON_NAMES,
    extract,
    fold,
    name_groups,
    study_datetime,
)
from dicomnode.index.maintenance import (
    FILL_STUDY_RECEIVED_AT_SQL,
    RECOUNT_TOTAL_SQL,
    TOTAL_TRIGGERS,
    Quota,
    QuotaExceeded,
    RemovedStudy,
    Total,
    counted_total,
    drop_instances,
    enforce_quota,
    read_total,
    remove,
    stats,
)
from dicomnode.index.models import (
    MODELS,
    SCHEMA_VERSION,
    BaseModel,
    Instance,
    Patient,
    PendingDelete,
    PerformedItem,
    PerformedStep,
    PersonName,
    Series,
    StoreTotal,
    Study,
    WorklistItem,
)
from dicomnode.qr import Level

log = logging.getLogger(__name__)

__all__ = [
    "DuplicateInstance",
    "DuplicateStep",
    "Index",
    "IndexError_",
    "InstanceRecord",
    "NewInstance",
    "Quota",
    "QuotaExceeded",
    "RemovedStudy",
    "Total",
]


class IndexError_(RuntimeError):
    """The index could not be opened or written."""


@dataclass(frozen=True)
class InstanceRecord:
    """An indexed instance, as much as the store needs to decide about duplicates."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    file_size: int
    series_uid: str
    study_uid: str


@dataclass(frozen=True)
class NewInstance:
    """Everything the index records about one received instance, by level."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]

    @classmethod
    def from_dataset(cls, ds: Any, **instance_extra: Any) -> NewInstance:
        return cls(
            patient=extract(ds, Level.PATIENT),
            study=extract(ds, Level.STUDY),
            series=extract(ds, Level.SERIES),
            instance={**extract(ds, Level.IMAGE), **instance_extra},
        )


class DuplicateInstance(Exception):
    """The SOP Instance UID is already indexed."""

    def __init__(self, existing: InstanceRecord) -> None:
        super().__init__(existing.sop_instance_uid)
        self.existing = existing


class Index:
    """The SQLite index at ``path``."""

    def __init__(self, path: Path, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.db: PooledSqliteDatabase | None = None

    def open(self) -> None:
        """Open (creating or migrating) the database; binds the models to it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = PooledSqliteDatabase(
            str(self.path),
            max_connections=64,
            stale_timeout=600,
            timeout=self.busy_timeout,
            check_same_thread=False,
            lock_type="IMMEDIATE",
            pragmas={
                "journal_mode": "wal",
                "synchronous": "full",
                "foreign_keys": 1,
                "busy_timeout": int(self.busy_timeout * 1000),
            },
        )
        db.bind(MODELS)
        self.db = db
        try:
            with db.connection_context():
                self._migrate(db)
        except (pw.DatabaseError, sqlite3.DatabaseError) as exc:
            raise IndexError_(f"cannot open the index {self.path}: {exc}") from exc

    def _migrate(self, db: PooledSqliteDatabase) -> None:
        version = db.execute_sql("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise IndexError_(
                f"the index {self.path} has schema version {version}; this dicomnode "
                f"understands up to {SCHEMA_VERSION}: upgrade dicomnode"
            )
        with db.atomic():
            if version == 0:
                db.create_tables(MODELS)
                _install_totals(db)
            else:
                # One step per version, in order; each leaves the schema at its version.
                for step in _MIGRATIONS[version - 1 :]:
                    step(db)
            db.execute_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("index %s at schema version %d (was %d)", self.path, SCHEMA_VERSION, version)

    def close(self) -> None:
        if self.db is not None:
            self.db.close_all()
            self.db = None

    def _database(self) -> PooledSqliteDatabase:
        if self.db is None:
            raise IndexError_("the index is not open")
        return self.db

    # --- reads -----------------------------------------------------------------------------

    def reading(self) -> Any:
        """A pooled connection held for a read that spans many rows (a C-FIND's matches)."""
        return self._database().connection_context()

    def existing(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self._database().connection_context():
            return self._record(sop_instance_uid)

    def _record(self, sop_instance_uid: str) -> InstanceRecord | None:
        # Plain SQL on the hot C-STORE path: building this query with peewee costs more than
        # running it.
        row = self._database().connection().execute(_RECORD_SQL, (sop_instance_uid,)).fetchone()
        return None if row is None else InstanceRecord(*row)

    def studies(self) -> Iterator[dict[str, Any]]:
        """Every study with its patient and counts, newest study date first (for ``list``)."""
        with self._database().connection_context():
            query = (
                Study.select(
                    Study,
                    Patient.patient_id,
                    Patient.patient_name,
                    pw.fn.COUNT(Series.id.distinct()).alias("n_series"),
                    pw.fn.COUNT(Instance.id).alias("n_instances"),
                    pw.fn.SUM(Instance.file_size).alias("n_bytes"),
                )
                .join(Patient)
                .switch(Study)
                .join(Series, pw.JOIN.LEFT_OUTER)
                .join(Instance, pw.JOIN.LEFT_OUTER)
                .group_by(Study.id)
                .order_by(Study.study_date.desc(), Study.id)
            )
            rows: Iterator[dict[str, Any]] = query.dicts().iterator()
            yield from rows

    def instances(self, study_uid: str | None = None) -> Iterator[dict[str, Any]]:
        """Every instance (of one study, if given) with its series and study UIDs."""
        with self._database().connection_context():
            query = (
                Instance.select(Instance, Series.series_uid, Series.modality, Study.study_uid)
                .join(Series)
                .join(Study)
                .order_by(Study.id, Series.series_number, Instance.instance_number, Instance.id)
            )
            if study_uid is not None:
                query = query.where(Study.study_uid == study_uid)
            rows: Iterator[dict[str, Any]] = query.dicts().iterator()
            yield from rows

    # --- writes ----------------------------------------------------------------------------

    def add(self, new: NewInstance, quota: Quota | None = None) -> list[RemovedStudy]:
        """Index a new instance in one transaction.

        Raises :class:`DuplicateInstance` when its SOP Instance UID is already indexed (also when
        another association indexed it a moment ago), and :class:`IndexError_` on any database
        failure; either way nothing of this instance is written.

        With ``quota`` the maintained total is checked in the same write transaction, after the
        row went in, so every worker process sees every other's stores: past ``max_size`` the
        store is refused with :class:`QuotaExceeded` (nothing written) or, recycling, the rows of
        the studies received longest ago are removed and their files journaled. Returns those
        studies; the caller removes their files (:meth:`forget_deletions` after).
        """
        db = self._database()
        uid = new.instance["sop_instance_uid"]
        try:
            with db.connection_context():
                try:
                    with db.atomic():
                        con = db.connection()
                        series_id = _series_for(con, new)
                        _insert(con, Instance, {**new.instance, "series_id": series_id})
                        if quota is None:
                            return []
                        return enforce_quota(con, quota, new.study["study_uid"], _now())
                except (pw.IntegrityError, sqlite3.IntegrityError):
                    # The unique SOP Instance UID refused the row (the transaction, patient to
                    # series, rolled back): someone indexed it first. Anything else is a failure.
                    existing = self._record(uid)
                    if existing is None:
                        raise
                    raise DuplicateInstance(existing) from None
        except DuplicateInstance:
            raise
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc

    def add_many(self, news: list[NewInstance]) -> list[tuple[NewInstance, InstanceRecord]]:
        """Index many instances in one transaction (``index rebuild``, ``index verify --repair``),
        each in a savepoint of its own: one whose SOP Instance UID is already indexed is left out
        and returned with the record that holds it, the others are written. A study's
        ``received_at`` becomes the earliest of its instances', whatever order they come in."""
        db = self._database()
        duplicates: list[tuple[NewInstance, InstanceRecord]] = []
        try:
            with db.connection_context(), db.atomic():
                con = db.connection()
                for new in news:
                    try:
                        with db.atomic():  # nested: a savepoint
                            series_id = _series_for(con, new)
                            _insert(con, Instance, {**new.instance, "series_id": series_id})
                    except (pw.IntegrityError, sqlite3.IntegrityError):
                        existing = self._record(new.instance["sop_instance_uid"])
                        if existing is None:
                            raise
                        duplicates.append((new, existing))
                        continue
                    received = new.instance.get("received_at", "")
                    con.execute(
                        "UPDATE study SET received_at = ? WHERE received_at > ? AND id = "
                        "(SELECT study_id FROM series WHERE id = ?)",
                        (received, received, series_id),
                    )
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc
        return duplicates

    def replace(self, new: NewInstance) -> str:
        """Point the indexed instance at a new file and attributes; returns the old file's path."""
        db = self._database()
        try:
            with db.connection_context(), db.atomic():
                row = Instance.get(Instance.sop_instance_uid == new.instance["sop_instance_uid"])
                old_path: str = row.path
                series_id = _series_for(db.connection(), new)
                Instance.update(series=series_id, **new.instance).where(
                    Instance.id == row.id
                ).execute()
                return old_path
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc

    # --- maintenance (dicomnode.maintenance, the delete command, storage recycling) ---------

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work`` on a connection in one write transaction."""
        db = self._database()
        try:
            with db.connection_context(), db.atomic():
                return work(db.connection())
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc

    def _read(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self._database()
        try:
            with db.connection_context():
                return work(db.connection())
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index read failed: {exc}") from exc

    def total(self) -> Total:
        """The maintained total of instances and bytes (one row; see models.StoreTotal)."""
        result: Total = self._read(read_total)
        return result

    def counted_total(self) -> Total:
        """The total summed over every instance row (for ``index verify``)."""
        result: Total = self._read(counted_total)
        return result

    def check_total(self) -> tuple[Total, Total]:
        """The maintained total and the summed one, from one read snapshot."""

        def work(con: sqlite3.Connection) -> tuple[Total, Total]:
            con.execute("BEGIN")
            try:
                return read_total(con), counted_total(con)
            finally:
                con.execute("COMMIT")

        result: tuple[Total, Total] = self._read(work)
        return result

    def recount_total(self) -> Total:
        """Set the maintained total to the summed one, under the write lock."""

        def work(con: sqlite3.Connection) -> Total:
            con.execute(RECOUNT_TOTAL_SQL)
            return read_total(con)

        result: Total = self._write(work)
        return result

    def stats(self) -> dict[str, Any]:
        """What ``dicomnode stats`` shows (see maintenance.stats), from one read snapshot."""

        def work(con: sqlite3.Connection) -> dict[str, Any]:
            con.execute("BEGIN")  # one snapshot for every count
            try:
                return stats(con)
            finally:
                con.execute("COMMIT")

        result: dict[str, Any] = self._read(work)
        return result

    def lookup(self, level: Level, key: str, issuer: str | None = None) -> list[int]:
        """Row ids of the patients (by Patient ID, and Issuer of Patient ID if given), the study
        or the series (by its UID) named by ``key``."""
        if level is Level.PATIENT:
            sql, params = "SELECT id FROM patient WHERE patient_id = ?", [key]
            if issuer is not None:
                sql, params = sql + " AND issuer = ?", [key, issuer]
        elif level is Level.STUDY:
            sql, params = "SELECT id FROM study WHERE study_uid = ?", [key]
        elif level is Level.SERIES:
            sql, params = "SELECT id FROM series WHERE series_uid = ?", [key]
        else:
            raise ValueError(f"cannot look up {level.value} rows")
        found: list[int] = self._read(
            lambda con: [int(r[0]) for r in con.execute(sql + " ORDER BY id", params)]
        )
        return found

    def remove(self, level: Level, ids: list[int], *, dry_run: bool = False) -> list[RemovedStudy]:
        """Remove the rows of these patients, studies or series (ids from :meth:`lookup`) and
        everything under them in one write transaction, journaling their files; the caller
        removes the files and then calls :meth:`forget_deletions`. ``dry_run`` rolls the
        transaction back: exactly what would go, for a confirmation prompt."""
        keyword = {Level.PATIENT: "patients", Level.STUDY: "studies", Level.SERIES: "series"}
        db = self._database()
        try:
            with db.connection_context(), db.atomic() as txn:
                removed = remove(db.connection(), _now(), **{keyword[level]: ids})
                if dry_run:
                    txn.rollback()
                return removed
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc

    def pending_deletions(self, limit: int = 1000) -> list[str]:
        """Paths journaled for deletion whose entries are still there (oldest first); -1: all."""
        found: list[str] = self._read(
            lambda con: [
                r[0]
                for r in con.execute(
                    "SELECT path FROM pending_delete ORDER BY id LIMIT ?", (limit,)
                )
            ]
        )
        return found

    def forget_deletions(self, paths: list[str]) -> None:
        """Clear the journal entries of files that are gone now."""
        self._write(
            lambda con: con.executemany(
                "DELETE FROM pending_delete WHERE path = ?", [(p,) for p in paths]
            )
        )

    def instance_files(self) -> dict[str, tuple[int, int, str]]:
        """Every instance row as ``{path: (row id, file_size, SOP Instance UID)}``, from one read
        snapshot (``index verify``)."""
        found: dict[str, tuple[int, int, str]] = self._read(
            lambda con: {
                path: (int(row_id), int(size), uid)
                for row_id, path, size, uid in con.execute(
                    "SELECT id, path, file_size, sop_instance_uid FROM instance"
                )
            }
        )
        return found

    def drop_instances(self, rows: list[tuple[int, str]]) -> int:
        """Delete instance rows (id, path) whose files are gone (see maintenance.drop_instances)."""
        dropped: int = self._write(lambda con: drop_instances(con, rows))
        return dropped

    def update_file_size(self, row_id: int, path: str, size: int) -> bool:
        """Record a file's size on its row (if the row still points at ``path``)."""
        changed: bool = self._write(
            lambda con: (
                con.execute(
                    "UPDATE instance SET file_size = ? WHERE id = ? AND path = ?",
                    (size, row_id, path),
                ).rowcount
                == 1
            )
        )
        return changed

    # --- Modality Worklist and MPPS (dicomnode.worklist, dicomnode.mpps) -------------------

    def add_worklist_items(self, rows: list[dict[str, Any]]) -> list[int]:
        """Insert worklist items, all or none, in one transaction; returns their ids."""
        db = self._database()
        try:
            with db.connection_context(), db.atomic():
                con = db.connection()
                return [_insert(con, WorklistItem, row) for row in rows]
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc

    def worklist_rows(self, condition: Any = None, limit: int | None = None) -> Iterator[Any]:
        """Worklist items (model rows) meeting ``condition``, in scheduled order, streamed."""
        with self._database().connection_context():
            query = WorklistItem.select().order_by(
                WorklistItem.start_date, WorklistItem.start_time, WorklistItem.id
            )
            if condition is not None:
                query = query.where(condition)
            if limit is not None:
                query = query.limit(limit)
            yield from query.iterator()

    def remove_worklist_items(self, condition: Any) -> int:
        """Delete the worklist items meeting ``condition``; returns how many."""
        db = self._database()
        try:
            with db.connection_context(), db.atomic():
                return int(WorklistItem.delete().where(condition).execute())
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc

    def performed_items(self, sop_instance_uid: str) -> list[int]:
        """The ids of the worklist items a performed step reported on."""
        with self._database().connection_context():
            query = (
                PerformedItem.select(PerformedItem.item_id)
                .join(PerformedStep)
                .where(PerformedStep.sop_instance_uid == sop_instance_uid)
                .order_by(PerformedItem.item_id)
            )
            return [row.item_id for row in query]

    def performed_steps(self, condition: Any = None) -> list[Any]:
        """Performed procedure steps (model rows), oldest first."""
        with self._database().connection_context():
            query = PerformedStep.select().order_by(PerformedStep.created_at, PerformedStep.id)
            if condition is not None:
                query = query.where(condition)
            return list(query)

    def create_performed_step(
        self, row: dict[str, Any], link: Callable[[sqlite3.Connection, int], int]
    ) -> int:
        """Insert a performed step and, in the same transaction, let ``link`` update the worklist
        items it performs (given the new row's id; returns how many it linked). Raises
        :class:`DuplicateStep` when the SOP Instance UID exists already."""
        db = self._database()
        try:
            with db.connection_context(), db.atomic():
                con = db.connection()
                if con.execute(
                    "SELECT 1 FROM performed_step WHERE sop_instance_uid = ?",
                    (row["sop_instance_uid"],),
                ).fetchone():
                    raise DuplicateStep(row["sop_instance_uid"])
                return link(con, _insert(con, PerformedStep, row))
        except DuplicateStep:
            raise
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc

    def update_performed_step(
        self, sop_instance_uid: str, change: Callable[[Any, sqlite3.Connection], dict[str, Any]]
    ) -> Any:
        """Read the performed step, let ``change`` check the change and return the new column
        values (it may raise to refuse, and may update linked worklist items on the connection),
        and write them; all in one write transaction, so two N-SETs of the same step on two
        workers are decided one after the other. Returns the row as it was; None when there is
        no such step (nothing written)."""
        db = self._database()
        try:
            with db.connection_context(), db.atomic():
                row = PerformedStep.get_or_none(PerformedStep.sop_instance_uid == sop_instance_uid)
                if row is None:
                    return None
                values = change(row, db.connection())
                PerformedStep.update(**values).where(PerformedStep.id == row.id).execute()
                return row
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc


class DuplicateStep(Exception):
    """A performed procedure step with this SOP Instance UID exists already."""


# --- the C-STORE write path, in plain SQL ------------------------------------------------------
#
# Column and table names below come from the models, never from received data; values are bound.

_RECORD_SQL = (
    "SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, i.path, i.file_size, "
    "s.series_uid, st.study_uid FROM instance i JOIN series s ON s.id = i.series_id "
    "JOIN study st ON st.id = s.study_id WHERE i.sop_instance_uid = ?"
)


@functools.cache
def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Column defaults peewee would fill in (they are not in the table's DDL)."""
    return {
        field.column_name: field.default
        for field in model._meta.sorted_fields
        if field.default is not None and not callable(field.default)
    }


@functools.cache
def insert_sql(model: type[BaseModel], columns: tuple[str, ...]) -> str:
    """INSERT of ``columns`` (column names) into ``model``'s table, values bound."""
    unknown = set(columns) - set(model._meta.columns)
    if unknown:  # keys come from our attribute table; anything else is a programming error
        raise ValueError(f"not columns of {model._meta.table_name}: {sorted(unknown)}")
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" * len(columns))
    return f'INSERT INTO "{model._meta.table_name}" ({names}) VALUES ({marks})'  # noqa: S608


def _insert(con: sqlite3.Connection, model: type[BaseModel], values: dict[str, Any]) -> int:
    """Insert one row of ``model``; returns its id."""
    row = {**_defaults(model), **values}
    cursor = con.execute(insert_sql(model, tuple(row)), tuple(row.values()))
    return int(cursor.lastrowid or 0)


def _series_for(con: sqlite3.Connection, new: NewInstance) -> int:
    """Find or create the patient, study and series of ``new`` (inside a transaction); returns
    the series id."""
    p = new.patient
    found = con.execute(
        "SELECT id FROM patient WHERE patient_id = ? AND issuer = ?",
        (p["patient_id"], p.get("issuer", "")),
    ).fetchone()
    if found is None:
        patient_id = _insert(con, Patient, p)
        _insert_names(con, patient_id, Level.PATIENT, p)
    else:
        patient_id = found[0]
    st = new.study
    found = con.execute(
        "SELECT id, patient_id, modalities FROM study WHERE study_uid = ?", (st["study_uid"],)
    ).fetchone()
    if found is None:
        values = {
            **st,
            "patient_id": patient_id,
            "study_datetime": study_datetime(st.get("study_date", ""), st.get("study_time", "")),
            "received_at": new.instance.get("received_at", ""),
        }
        study_id = _insert(con, Study, values)
        modalities = ""
        _insert_names(con, study_id, Level.STUDY, st)
    else:
        study_id, study_patient, modalities = found
        if study_patient != patient_id:
            # The same Study Instance UID arrived with other patient identifiers: the study keeps
            # the patient it was first indexed under (a reconciliation issue, not ours to guess).
            log.warning("study already indexed under another patient; keeping the first patient")
    se = new.series
    found = con.execute(
        "SELECT id, study_id, modality FROM series WHERE series_uid = ?", (se["series_uid"],)
    ).fetchone()
    if found is None:
        series_id = _insert(con, Series, {**se, "study_id": study_id})
        modality = se.get("modality", "")
    else:
        series_id, series_study, modality = found
        if series_study != study_id:
            log.warning("series already indexed under another study; keeping the first study")
    if modality:
        # ModalitiesInStudy (0008,0061), kept as series arrive.
        known = [m for m in modalities.split("\\") if m]
        if modality not in known:
            con.execute(
                "UPDATE study SET modalities = ? WHERE id = ?",
                ("\\".join(sorted([*known, modality])), study_id),
            )
    return int(series_id)


def name_rows(owner: int, level: Level, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The person-name match keys of a new patient or study row (see models.PersonName)."""
    return [
        {
            "owner": owner,
            "keyword": attr.keyword,
            "group": i,
            "value": group,
            "folded": fold(group),
        }
        for attr in PERSON_NAMES
        if attr.level is level
        for i, group in enumerate(name_groups(values.get(attr.column) or ""))
        if group
    ]


def _insert_names(
    con: sqlite3.Connection, owner: int, level: Level, values: Mapping[str, Any]
) -> None:
    for row in name_rows(owner, level, values):
        _insert(con, PersonName, row)


def _add_names(owner: BaseModel, level: Level) -> None:
    """The person-name match keys of a patient or study model row (used by migrations)."""
    values = {
        attr.column: getattr(owner, attr.column) for attr in PERSON_NAMES if attr.level is level
    }
    rows = name_rows(owner.id, level, values)
    if rows:
        PersonName.insert_many(rows).execute()


def _v1_to_v2(db: PooledSqliteDatabase) -> None:
    """Add the person-name keys and the normalised study date-time, filled from what is held."""
    db.create_tables([PersonName])
    db.execute_sql("ALTER TABLE study ADD COLUMN study_datetime TEXT NOT NULL DEFAULT ''")
    db.execute_sql("CREATE INDEX study_study_datetime ON study (study_datetime)")
    # Only the columns a v1 index has (the models have grown since).
    patient_names = [getattr(Patient, a.column) for a in PERSON_NAMES if a.level is Level.PATIENT]
    study_names = [getattr(Study, a.column) for a in PERSON_NAMES if a.level is Level.STUDY]
    for patient in Patient.select(Patient.id, *patient_names):
        _add_names(patient, Level.PATIENT)
    for study in Study.select(Study.id, Study.study_date, Study.study_time, *study_names):
        study.study_datetime = study_datetime(study.study_date, study.study_time)
        study.save(only=[Study.study_datetime])
        _add_names(study, Level.STUDY)


def _v2_to_v3(db: PooledSqliteDatabase) -> None:
    """Index PatientBirthDate, so that a birth date (range) query does not read every study."""
    db.execute_sql("CREATE INDEX IF NOT EXISTS patient_birth_date ON patient (birth_date)")


def _v3_to_v4(db: PooledSqliteDatabase) -> None:
    """Add the Modality Worklist and MPPS tables (empty)."""
    db.create_tables([WorklistItem, PerformedStep, PerformedItem])


def _v4_to_v5(db: PooledSqliteDatabase) -> None:
    """Add study.received_at (filled from the studies' instances), the maintained total with its
    triggers (counted from what is held) and the deletion journal (empty)."""
    db.execute_sql("ALTER TABLE study ADD COLUMN received_at TEXT NOT NULL DEFAULT ''")
    db.execute_sql("CREATE INDEX study_received_at ON study (received_at)")
    db.execute_sql(FILL_STUDY_RECEIVED_AT_SQL)
    db.create_tables([StoreTotal, PendingDelete])
    _install_totals(db)


def _install_totals(db: PooledSqliteDatabase) -> None:
    """The triggers that keep store_total, and its one row counted from the instance table."""
    for sql in TOTAL_TRIGGERS:
        db.execute_sql(sql)
    db.execute_sql(RECOUNT_TOTAL_SQL)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# _MIGRATIONS[v - 1] takes an index from schema version v to v + 1.
_MIGRATIONS: tuple[Callable[[PooledSqliteDatabase], None], ...] = (
    _v1_to_v2,
    _v2_to_v3,
    _v3_to_v4,
    _v4_to_v5,
)
