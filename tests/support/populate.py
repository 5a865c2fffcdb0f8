"""Large synthetic indexes for C-FIND benchmarks and tests, without sending a single file.

Two parts:

- :func:`hierarchy` is a pure, deterministic generator of a Patient -> Study -> Series -> Instance
  tree of ``instances`` instances, as plain ``{DICOM keyword: value}`` dicts per entity. It knows
  nothing of dicomnode, so the same tree can be written into another archive's index (Orthanc's).
- :func:`populate_dicomnode` writes that tree straight into a dicomnode index file, rows exactly
  as the C-STORE path would write them (same attribute table, person-name keys, normalised study
  date-time, ModalitiesInStudy), in one transaction: 1,000,000 instances take well under a minute.

The shape is fixed (:data:`SHAPE`): 20 instances per series, 2 series per study, 2 studies per
patient, so 80 instances per patient. 1,000,000 instances are 12,500 patients, 25,000 studies and
50,000 series; the last patient, study and series are partial when ``instances`` is not a
multiple. Values, by 0-based index at each level (p patient, s study, r series, i instance):

- PatientID ``PID{p:08d}``; PatientName ``FAMILY^GIVEN``: the family name is five syllables
  (10 letters) picked by a bijection of ``p``, so names are distinct up to 3,200,000 patients and
  the first 6 letters of one are shared by about ``patients / 8000`` others (1-3 at 1M); the
  given name comes from a short list. PatientBirthDate between 1930 and 2009, PatientSex M/F/O.
- StudyInstanceUID ``{ROOT}.1.{s+1}``, SeriesInstanceUID ``{ROOT}.2.{r+1}``, SOPInstanceUID
  ``{ROOT}.3.{i+1}`` (a fixed 2.25 root, so valid UIDs well under 64 characters).
- StudyDate: studies are spread over the ``ceil(studies / 2)`` days up to 2024-12-31 by a
  bijection of ``s`` (two studies a day, in no order correlated with ``s``): a 3-day range matches
  6 studies at any size; at 1M the dates span 34 years (1990-2024). StudyTime ``HHMMSS`` from
  ``s``.
- AccessionNumber ``ACC{s:08d}`` scrambled by a bijection (unique), StudyID ``{s % 2 + 1}``,
  StudyDescription, Modality ``CT``, SeriesNumber 1 or 2, SeriesDescription, BodyPartExamined,
  InstanceNumber 1-20, SOPClassUID CT Image Storage.

:class:`Probe` names query values known to match a few records, with their expected counts.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = "2.25.143216789420395820367118237470593046213"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"


@dataclass(frozen=True)
class Shape:
    instances_per_series: int = 20
    series_per_study: int = 2
    studies_per_patient: int = 2

    @property
    def instances_per_study(self) -> int:
        return self.instances_per_series * self.series_per_study

    @property
    def instances_per_patient(self) -> int:
        return self.instances_per_study * self.studies_per_patient


SHAPE = Shape()


@dataclass(frozen=True)
class Entity:
    """One generated entity: its level, 0-based index at that level, its parent's index at the
    level above (None for a patient) and its attributes by DICOM keyword."""

    level: str
    index: int
    parent: int | None
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Counts:
    patients: int
    studies: int
    series: int
    instances: int


def counts(instances: int, shape: Shape = SHAPE) -> Counts:
    """How many entities of each level :func:`hierarchy` generates for ``instances``."""
    series = math.ceil(instances / shape.instances_per_series)
    studies = math.ceil(series / shape.series_per_study)
    patients = math.ceil(studies / shape.studies_per_patient)
    return Counts(patients, studies, series, instances)


# --- values ------------------------------------------------------------------------------------

_SYLLABLES = (
    "BA", "DE", "FI", "GO", "HA", "KE", "LI", "MO", "NA", "PE",
    "RI", "SO", "TA", "VE", "WI", "ZO", "BE", "DA", "MU", "RO",
)  # fmt: skip
_NAME_SPACE = len(_SYLLABLES) ** 5  # 3,200,000 distinct family names
_GIVEN = ("JOHN", "MARY", "PAUL", "ANNA", "LUIS", "NORA", "OMAR", "EMMA", "IVAN", "LENA")
_DESCRIPTIONS = ("CT CHEST", "CT ABDOMEN", "CT HEAD", "CT PELVIS")
_BODY_PARTS = ("CHEST", "ABDOMEN", "HEAD", "PELVIS")
_LAST_DAY = dt.date(2024, 12, 31)
_BIRTH_FIRST = dt.date(1930, 1, 1)
_STUDIES_PER_DAY = 2


def _scramble(index: int, size: int) -> int:
    """A bijection of ``range(size)`` that does not keep order (an affine map mod ``size``)."""
    if size <= 1:
        return 0
    factor = 7_368_787  # prime; stepped to the next value coprime with size
    while math.gcd(factor, size) != 1:
        factor += 2
    return (index * factor + 12_345) % size


def family_name(patient: int) -> str:
    code = _scramble(patient, _NAME_SPACE)
    letters = []
    for _ in range(5):
        code, digit = divmod(code, len(_SYLLABLES))
        letters.append(_SYLLABLES[digit])
    return "".join(letters)


def patient_attrs(p: int) -> dict[str, Any]:
    birth = _BIRTH_FIRST + dt.timedelta(days=(p * 7919) % (80 * 365))
    return {
        "PatientID": f"PID{p:08d}",
        "PatientName": f"{family_name(p)}^{_GIVEN[p % len(_GIVEN)]}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": "MFO"[p % 3] if p % 17 == 0 else "MF"[p % 2],
    }


def study_date(s: int, n_studies: int) -> str:
    days = math.ceil(n_studies / _STUDIES_PER_DAY)
    day = _scramble(s, n_studies) // _STUDIES_PER_DAY
    return (_LAST_DAY - dt.timedelta(days=days - 1 - day)).strftime("%Y%m%d")


def study_attrs(s: int, n_studies: int) -> dict[str, Any]:
    seconds = 7 * 3600 + (s * 613) % (12 * 3600)
    hours, rest = divmod(seconds, 3600)
    return {
        "StudyInstanceUID": f"{ROOT}.1.{s + 1}",
        "StudyDate": study_date(s, n_studies),
        "StudyTime": f"{hours:02d}{rest // 60:02d}{rest % 60:02d}",
        "AccessionNumber": f"ACC{_scramble(s, 10**8):08d}",
        "StudyID": str(s % SHAPE.studies_per_patient + 1),
        "StudyDescription": _DESCRIPTIONS[s % len(_DESCRIPTIONS)],
    }


def series_attrs(r: int, s: int) -> dict[str, Any]:
    return {
        "SeriesInstanceUID": f"{ROOT}.2.{r + 1}",
        "Modality": "CT",
        "SeriesNumber": r % SHAPE.series_per_study + 1,
        "SeriesDescription": "AXIAL" if r % 2 == 0 else "CORONAL",
        "BodyPartExamined": _BODY_PARTS[s % len(_BODY_PARTS)],
    }


def instance_attrs(i: int) -> dict[str, Any]:
    return {
        "SOPInstanceUID": f"{ROOT}.3.{i + 1}",
        "SOPClassUID": CT_IMAGE_STORAGE,
        "InstanceNumber": i % SHAPE.instances_per_series + 1,
    }


def hierarchy(instances: int, shape: Shape = SHAPE) -> Iterator[Entity]:
    """The tree of ``instances`` instances, depth first: each patient, then each of its studies
    followed by that study's series, each followed by its instances."""
    if shape != SHAPE:
        raise ValueError("only the documented SHAPE is generated")
    n_studies = counts(instances, shape).studies
    last_series = last_study = last_patient = -1
    for i in range(instances):
        r = i // shape.instances_per_series
        s = r // shape.series_per_study
        p = s // shape.studies_per_patient
        if p != last_patient:
            last_patient = p
            yield Entity(PATIENT, p, None, patient_attrs(p))
        if s != last_study:
            last_study = s
            yield Entity(STUDY, s, p, study_attrs(s, n_studies))
        if r != last_series:
            last_series = r
            yield Entity(SERIES, r, s, series_attrs(r, s))
        yield Entity(IMAGE, i, r, instance_attrs(i))


# --- probe -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Query values that match a few records of a generated index, and how many.

    Every value is of one patient ``patient_id`` near the middle of the index; its first study is
    ``study_uid`` (accession ``accession_number``), whose first series is ``series_uid``.
    """

    instances: int
    patients: int  # totals of the index
    studies: int
    series: int
    patient_id: str
    patient_name: str  # the full name of patient_id's patient
    name_prefix: str  # its first 6 letters: query as f"{name_prefix}*"
    name_prefix_patients: int  # patients whose name starts with name_prefix
    name_prefix_studies: int
    study_uid: str
    accession_number: str
    study_date: str  # the probe study's date
    date_range: str  # "YYYYMMDD-YYYYMMDD", 3 days around study_date
    date_range_studies: int  # studies in date_range
    series_uid: str
    sop_instance_uid: str  # the probe series' first instance
    studies_per_patient: int  # studies of patient_id (PatientID matches at STUDY level)
    series_per_study: int  # series of study_uid
    instances_per_series: int  # instances of series_uid
    instances_per_study: int  # instances of study_uid
    missing_patient_id: str = "NOSUCHPATIENT"
    missing_name_prefix: str = "XQXQ"
    missing_date_range: str = "18000101-18001231"


def probe(instances: int, shape: Shape = SHAPE) -> Probe:
    """The :class:`Probe` of :func:`hierarchy` ``(instances)``."""
    n = counts(instances, shape)
    if n.patients < 1:
        raise ValueError("an empty index has nothing to probe")
    p = n.patients // 2
    s = p * shape.studies_per_patient
    r = s * shape.series_per_study
    i = r * shape.instances_per_series
    patient, study = patient_attrs(p), study_attrs(s, n.studies)
    prefix = family_name(p)[:6]
    named = [q for q in range(n.patients) if family_name(q).startswith(prefix)]
    named_studies = sum(_studies_of(q, n.studies, shape) for q in named)
    day = dt.datetime.strptime(study["StudyDate"], "%Y%m%d").date()
    low, high = (
        (day - dt.timedelta(days=1)).strftime("%Y%m%d"),
        (day + dt.timedelta(days=1)).strftime("%Y%m%d"),
    )
    in_range = sum(1 for t in range(n.studies) if low <= study_date(t, n.studies) <= high)

    def instances_of_series(series: int) -> int:
        first = series * shape.instances_per_series
        return max(0, min(shape.instances_per_series, instances - first))

    series_of_study = min(shape.series_per_study, n.series - r)
    return Probe(
        instances=instances,
        patients=n.patients,
        studies=n.studies,
        series=n.series,
        patient_id=patient["PatientID"],
        patient_name=patient["PatientName"],
        name_prefix=prefix,
        name_prefix_patients=len(named),
        name_prefix_studies=named_studies,
        study_uid=study["StudyInstanceUID"],
        accession_number=study["AccessionNumber"],
        study_date=study["StudyDate"],
        date_range=f"{low}-{high}",
        date_range_studies=in_range,
        series_uid=series_attrs(r, s)["SeriesInstanceUID"],
        sop_instance_uid=instance_attrs(i)["SOPInstanceUID"],
        studies_per_patient=_studies_of(p, n.studies, shape),
        series_per_study=series_of_study,
        instances_per_series=instances_of_series(r),
        instances_per_study=sum(instances_of_series(r + k) for k in range(series_of_study)),
    )


def _studies_of(patient: int, n_studies: int, shape: Shape) -> int:
    first = patient * shape.studies_per_patient
    return max(0, min(shape.studies_per_patient, n_studies - first))


# --- dicomnode ---------------------------------------------------------------------------------

_BATCH = 20_000


def populate_dicomnode(
    database: Path,
    instances: int,
    *,
    received_from: str = "POPULATE",
    received_at: str = "2024-01-01T00:00:00.000+00:00",
) -> Probe:
    """Write :func:`hierarchy` ``(instances)`` into the dicomnode index at ``database``.

    The index is created (or migrated) by ``dicomnode.index.Index`` and must hold nothing yet.
    Rows are what the C-STORE path writes: columns from ``attributes.ATTRIBUTES`` through the same
    value helpers, person-name keys per component group (``attributes.fold``), the normalised
    ``study_datetime`` and ``modalities``; each instance gets a generated relative path under
    ``objects/`` (no file is written: C-FIND needs none) and a file size. One transaction, written
    with ``synchronous=OFF`` (the file is fsynced once at the end by the WAL checkpoint).
    """
    from dicomnode.index import Index, insert_sql, name_rows
    from dicomnode.index.attributes import (
        BY_KEYWORD,
        Kind,
        study_datetime,
        text_value,
    )
    from dicomnode.index.models import Instance, Patient, PersonName, Series, Study
    from dicomnode.qr import Level

    index = Index(database)
    index.open()  # creates the schema at the current version
    index.close()

    models: dict[str, Any] = {PATIENT: Patient, STUDY: Study, SERIES: Series, IMAGE: Instance}
    dicom_level = {PATIENT: Level.PATIENT, STUDY: Level.STUDY, SERIES: Level.SERIES,
                   IMAGE: Level.IMAGE}  # fmt: skip
    parent_column = {STUDY: "patient_id", SERIES: "study_id", IMAGE: "series_id"}

    stored = {
        level: [a for a in BY_KEYWORD.values() if a.level is dicom_level[level] and not a.computed]
        for level in models
    }  # every stored column of each level; "" (or NULL for integers) when the data lacks it

    def columns(level: str, attrs: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for attr in stored[level]:
            value = attrs.get(attr.keyword)
            if attr.kind is Kind.INTEGER:
                row[attr.column] = None if value is None else int(value)
            else:
                row[attr.column] = text_value(value)
        return row

    con = sqlite3.connect(database, isolation_level=None)
    try:
        for model in models.values():
            table = model._meta.table_name
            if con.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchone():  # noqa: S608 - ours
                raise ValueError(f"{database} already holds data; populate an empty index")
        con.execute("PRAGMA synchronous = OFF")
        con.execute("BEGIN IMMEDIATE")
        buffers: dict[str, list[tuple[Any, ...]]] = {level: [] for level in models}
        names: list[tuple[Any, ...]] = []
        statements: dict[str, str] = {}
        name_sql = insert_sql(PersonName, ("owner", "keyword", "group", "value", "folded"))

        def flush(level: str) -> None:
            if buffers[level]:
                con.executemany(statements[level], buffers[level])
                buffers[level].clear()
            if names:
                con.executemany(name_sql, names)
                names.clear()

        pending_study: dict[str, Any] | None = None
        study_modalities: set[str] = set()
        order: dict[str, list[str]] = {}

        def add(level: str, row: dict[str, Any]) -> None:
            if level not in statements:
                order[level] = list(row)
                statements[level] = insert_sql(models[level], tuple(order[level]))
            buffers[level].append(tuple(row[c] for c in order[level]))
            if len(buffers[level]) >= _BATCH:
                flush(level)

        def finish_study() -> None:
            if pending_study is not None:
                pending_study["modalities"] = "\\".join(sorted(study_modalities))
                add(STUDY, pending_study)

        for entity in hierarchy(instances):
            row: dict[str, Any] = {"id": entity.index + 1}
            if entity.parent is not None:
                row[parent_column[entity.level]] = entity.parent + 1
            row.update(columns(entity.level, entity.attrs))
            if entity.level == IMAGE:
                row.update(
                    transfer_syntax=EXPLICIT_VR_LITTLE_ENDIAN,
                    file_size=524_288 + 1024 + entity.index % 4096,
                    path=_object_path(entity.index),
                    received_from=received_from,
                    received_at=received_at,
                )
                add(IMAGE, row)
                continue
            if entity.level == STUDY:
                finish_study()
                row["study_datetime"] = study_datetime(row["study_date"], row["study_time"])
                pending_study, study_modalities = row, set()
            elif entity.level == SERIES:
                if row["modality"]:
                    study_modalities.add(row["modality"])
                add(SERIES, row)
            else:
                add(PATIENT, row)
            # The same person-name keys the C-STORE path writes (dicomnode.index.name_rows).
            names.extend(
                tuple(r.values())
                for r in name_rows(entity.index + 1, dicom_level[entity.level], row)
            )
        finish_study()
        for level in models:
            flush(level)
        con.execute("COMMIT")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    return probe(instances)


def _object_path(index: int) -> str:
    """A relative path shaped like ``storage.commit``'s (``objects/ab/cd/<32 hex>.dcm``), unique
    per instance (an odd multiplier is a bijection modulo 2**128)."""
    name = f"{(index + 1) * 0x9E3779B97F4A7C15F39CC0605CEDC835 % 2**128:032x}"
    return f"objects/{name[:2]}/{name[2:4]}/{name}.dcm"
