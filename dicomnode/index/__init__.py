"""The index: a peewee SQLite database (WAL) of what the store holds, Patient -> Instance.

The index knows nothing of pynetdicom or of files; ``dicomnode.archive`` pairs it with storage.
Writes are one transaction each, begun IMMEDIATE so concurrent associations serialise on the write
lock instead of failing on an upgrade; ``synchronous=FULL`` makes a committed row durable before
the C-STORE response is sent.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
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
from dicomnode.index.models import (
    MODELS,
    SCHEMA_VERSION,
    BaseModel,
    Instance,
    Patient,
    PersonName,
    Series,
    Study,
)
from dicomnode.qr import Level

log = logging.getLogger(__name__)

__all__ = ["DuplicateInstance", "Index", "IndexError_", "InstanceRecord", "NewInstance"]


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
        row = (
            Instance.select(Instance, Series.series_uid, Study.study_uid)
            .join(Series)
            .join(Study)
            .where(Instance.sop_instance_uid == sop_instance_uid)
            .objects()
            .first()
        )
        if row is None:
            return None
        return InstanceRecord(
            sop_instance_uid=row.sop_instance_uid,
            sop_class_uid=row.sop_class_uid,
            transfer_syntax=row.transfer_syntax,
            path=row.path,
            file_size=row.file_size,
            series_uid=row.series_uid,
            study_uid=row.study_uid,
        )

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

    def add(self, new: NewInstance) -> None:
        """Index a new instance in one transaction.

        Raises :class:`DuplicateInstance` when its SOP Instance UID is already indexed (also when
        another association indexed it a moment ago), and :class:`IndexError_` on any database
        failure; either way nothing of this instance is written.
        """
        db = self._database()
        uid = new.instance["sop_instance_uid"]
        try:
            with db.connection_context():
                try:
                    with db.atomic():
                        series = self._series_for(new)
                        Instance.create(series=series, **new.instance)
                except pw.IntegrityError:
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

    def replace(self, new: NewInstance) -> str:
        """Point the indexed instance at a new file and attributes; returns the old file's path."""
        db = self._database()
        try:
            with db.connection_context(), db.atomic():
                row = Instance.get(Instance.sop_instance_uid == new.instance["sop_instance_uid"])
                old_path: str = row.path
                series = self._series_for(new)
                Instance.update(series=series, **new.instance).where(
                    Instance.id == row.id
                ).execute()
                return old_path
        except (pw.PeeweeException, sqlite3.Error) as exc:
            raise IndexError_(f"index write failed: {exc}") from exc

    def _series_for(self, new: NewInstance) -> Series:
        """Find or create the patient, study and series of ``new`` (inside a transaction)."""
        patient = Patient.get_or_none(
            (Patient.patient_id == new.patient["patient_id"])
            & (Patient.issuer == new.patient["issuer"])
        )
        if patient is None:
            patient = Patient.create(**new.patient)
            _add_names(patient, Level.PATIENT)
        study = Study.get_or_none(Study.study_uid == new.study["study_uid"])
        if study is None:
            study = Study.create(
                patient=patient,
                study_datetime=study_datetime(new.study["study_date"], new.study["study_time"]),
                **new.study,
            )
            _add_names(study, Level.STUDY)
        elif study.patient_id != patient.id:
            # The same Study Instance UID arrived with other patient identifiers: the study keeps
            # the patient it was first indexed under (a reconciliation issue, not ours to guess).
            log.warning("study already indexed under another patient; keeping the first patient")
        series = Series.get_or_none(Series.series_uid == new.series["series_uid"])
        if series is None:
            series = Series.create(study=study, **new.series)
        elif series.study_id != study.id:
            log.warning("series already indexed under another study; keeping the first study")
        modality = series.modality
        if modality:
            known = [m for m in study.modalities.split("\\") if m]
            if modality not in known:
                study.modalities = "\\".join(sorted([*known, modality]))
                study.save(only=[Study.modalities])
        return series


def _add_names(owner: BaseModel, level: Level) -> None:
    """The person-name match keys of a new patient or study row (see models.PersonName)."""
    rows = [
        {
            "owner": owner.id,
            "keyword": attr.keyword,
            "group": i,
            "value": group,
            "folded": fold(group),
        }
        for attr in PERSON_NAMES
        if attr.level is level
        for i, group in enumerate(name_groups(getattr(owner, attr.column)))
        if group
    ]
    if rows:
        PersonName.insert_many(rows).execute()


def _v1_to_v2(db: PooledSqliteDatabase) -> None:
    """Add the person-name keys and the normalised study date-time, filled from what is held."""
    db.create_tables([PersonName])
    db.execute_sql("ALTER TABLE study ADD COLUMN study_datetime TEXT NOT NULL DEFAULT ''")
    db.execute_sql("CREATE INDEX study_study_datetime ON study (study_datetime)")
    for patient in Patient.select():
        _add_names(patient, Level.PATIENT)
    for study in Study.select():
        study.study_datetime = study_datetime(study.study_date, study.study_time)
        study.save(only=[Study.study_datetime])
        _add_names(study, Level.STUDY)


# _MIGRATIONS[v - 1] takes an index from schema version v to v + 1.
_MIGRATIONS: tuple[Callable[[PooledSqliteDatabase], None], ...] = (_v1_to_v2,)
