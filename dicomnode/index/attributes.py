"""The one table of attribute knowledge: which DICOM attributes the index holds, at which level of
the Patient -> Study -> Series -> Instance hierarchy (PS3.4 C.6.1.1), in which column, and how the
value is normalised. Extraction at store time reads it; query translation (C-FIND) reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue


class Level(StrEnum):
    """Query/retrieve levels (PS3.4 C.6.1.1.1), named as in (0008,0052) Query/Retrieve Level."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class Kind(StrEnum):
    """How a value is held: as text (most VRs), a person name, or an integer (IS)."""

    TEXT = "text"
    PERSON_NAME = "pn"
    INTEGER = "int"
    UID = "uid"
    DATE = "date"
    TIME = "time"


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: Level
    column: str
    kind: Kind = Kind.TEXT
    unique_key: bool = False  # the level's unique key (PS3.4 C.6.1.1.2-5)
    computed: bool = False  # derived by the index, not read from the data set


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("PatientID", Level.PATIENT, "patient_id", unique_key=True),
    Attribute("IssuerOfPatientID", Level.PATIENT, "issuer"),
    Attribute("PatientName", Level.PATIENT, "patient_name", Kind.PERSON_NAME),
    Attribute("PatientBirthDate", Level.PATIENT, "birth_date", Kind.DATE),
    Attribute("PatientSex", Level.PATIENT, "sex"),
    Attribute("StudyInstanceUID", Level.STUDY, "study_uid", Kind.UID, unique_key=True),
    Attribute("StudyDate", Level.STUDY, "study_date", Kind.DATE),
    Attribute("StudyTime", Level.STUDY, "study_time", Kind.TIME),
    Attribute("StudyID", Level.STUDY, "study_id"),
    Attribute("AccessionNumber", Level.STUDY, "accession_number"),
    Attribute("StudyDescription", Level.STUDY, "description"),
    Attribute("ReferringPhysicianName", Level.STUDY, "referring_physician", Kind.PERSON_NAME),
    Attribute("ModalitiesInStudy", Level.STUDY, "modalities", computed=True),
    Attribute("SeriesInstanceUID", Level.SERIES, "series_uid", Kind.UID, unique_key=True),
    Attribute("SeriesNumber", Level.SERIES, "series_number", Kind.INTEGER),
    Attribute("Modality", Level.SERIES, "modality"),
    Attribute("SeriesDescription", Level.SERIES, "description"),
    Attribute("BodyPartExamined", Level.SERIES, "body_part"),
    Attribute("SOPInstanceUID", Level.IMAGE, "sop_instance_uid", Kind.UID, unique_key=True),
    Attribute("SOPClassUID", Level.IMAGE, "sop_class_uid", Kind.UID),
    Attribute("InstanceNumber", Level.IMAGE, "instance_number", Kind.INTEGER),
)

BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    return str(value).strip()


def _integer(value: Any) -> int | None:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def extract(ds: Dataset, level: Level) -> dict[str, Any]:
    """Column values for ``level`` read from ``ds``, text decoded as Unicode.

    pydicom decodes text with the data set's Specific Character Set (0008,0005) when the element
    is accessed, so person names in ISO 2022 or UTF-8 arrive here as Python strings, with their
    ideographic and phonetic component groups kept (``Yamada^Tarou=山田^太郎=やまだ^たろう``).
    """
    row: dict[str, Any] = {}
    for attr in ATTRIBUTES:
        if attr.level is not level or attr.computed:
            continue
        value = ds.get(attr.keyword)
        row[attr.column] = _integer(value) if attr.kind is Kind.INTEGER else _text(value)
    return row
