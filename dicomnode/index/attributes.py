"""The one table of attribute knowledge: which DICOM attributes the index holds, at which level of
the Patient -> Study -> Series -> Instance hierarchy (PS3.4 C.6.1.1), in which column, and how the
value is normalised. Extraction at store time reads it; query translation (C-FIND) reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.qr import Level


class Kind(StrEnum):
    """How a value is held and matched (PS3.4 C.2.2.2): text (wildcards allowed), a person name
    (wildcards, case-insensitive by default, per component group), a UID (single value or list,
    no wildcards), a date or time (ranges), an integer (IS, single value), a count (computed)."""

    TEXT = "text"
    PERSON_NAME = "pn"
    INTEGER = "int"
    UID = "uid"
    DATE = "date"
    TIME = "time"
    COUNT = "count"
    MODALITIES = "modalities"  # ModalitiesInStudy: matches when any of the study's does
    UID_LIST = "uid_list"  # SOPClassesInStudy: computed from the study's instances


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
    Attribute("ModalitiesInStudy", Level.STUDY, "modalities", Kind.MODALITIES, computed=True),
    Attribute("SOPClassesInStudy", Level.STUDY, "", Kind.UID_LIST, computed=True),
    # PS3.4 C.6.1.1.2-4: optional computed keys, answered when asked for.
    Attribute("NumberOfPatientRelatedStudies", Level.PATIENT, "", Kind.COUNT, computed=True),
    Attribute("NumberOfPatientRelatedSeries", Level.PATIENT, "", Kind.COUNT, computed=True),
    Attribute("NumberOfPatientRelatedInstances", Level.PATIENT, "", Kind.COUNT, computed=True),
    Attribute("NumberOfStudyRelatedSeries", Level.STUDY, "", Kind.COUNT, computed=True),
    Attribute("NumberOfStudyRelatedInstances", Level.STUDY, "", Kind.COUNT, computed=True),
    Attribute("NumberOfSeriesRelatedInstances", Level.SERIES, "", Kind.COUNT, computed=True),
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
LEVEL_ORDER = tuple(Level)  # top first
UNIQUE_KEY = {a.level: a for a in ATTRIBUTES if a.unique_key}
PERSON_NAMES = tuple(a for a in ATTRIBUTES if a.kind is Kind.PERSON_NAME)


def name_groups(value: str) -> list[str]:
    """A person name's component groups (PS3.5 6.2.1.1): alphabetic, ideographic, phonetic."""
    return value.split("=")[:3]


def fold(value: str) -> str:
    """The case-insensitive form names are matched in (Unicode casefolding, not only ASCII)."""
    return value.casefold()


def study_datetime(date: str, time: str) -> str:
    """StudyDate and StudyTime as one sortable ``YYYYMMDDHHMMSS.ffffff`` string, missing parts
    as zeros, for combined date-time range matching (PS3.4 C.2.2.2.5.1); "" without a date."""
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return ""
    return date + pad_time(time, "0")


def pad_time(value: str, fill: str) -> str:
    """A TM value (HH, HHMM, HHMMSS, HHMMSS.f...) padded to ``HHMMSS.ffffff`` with ``fill``
    ("0" for a lower bound or a stored value, "9" for an upper bound; PS3.5 6.2 TM)."""
    value = value.strip().replace(":", "")
    whole, _, fraction = value.partition(".")
    whole = whole[:6]
    if not whole.isdigit() and whole:
        return ""
    high = fill == "9"
    if not whole:
        return "235959.999999" if high else "000000.000000"
    # An upper bound "15" means up to 15:59:59.999999.
    pad = {2: "5959" if high else "0000", 4: "59" if high else "00"}.get(len(whole), "")
    whole = (whole + pad).ljust(6, "0")
    fraction = (fraction + fill * 6)[:6] if fraction or high else "000000"
    return f"{whole}.{fraction}"


def text_value(value: Any) -> str:
    """A data element value as index text: multiple values joined by a backslash, trimmed."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(text_value(v) for v in value)
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
    for tag, column, integer in _EXTRACTED[level]:
        # By tag: the keyword look-up pydicom does for ds.get("PatientID") costs as much as
        # decoding the value, once per attribute of every stored instance.
        elem = ds.get(tag)
        value = None if elem is None else elem.value
        row[column] = _integer(value) if integer else text_value(value)
    return row


# (tag, column, is an integer) of the attributes read from a data set, by level.
_EXTRACTED: dict[Level, tuple[tuple[int, str, bool], ...]] = {
    level: tuple(
        (int(tag_for_keyword(a.keyword) or 0), a.column, a.kind is Kind.INTEGER)
        for a in ATTRIBUTES
        if a.level is level and not a.computed
    )
    for level in Level
}


# --- Modality Worklist (PS3.4 K.6) -------------------------------------------------------------


@dataclass(frozen=True)
class WorklistAttribute:
    """An attribute of the Modality Worklist Information Model (PS3.4 K.6.1.2, Table K.6-1).

    ``in_step``: it sits inside the item of the Scheduled Procedure Step Sequence (0040,0100),
    not at the top level. ``column``: the worklist_item column that holds it for matching in
    SQL and for listing ("" when only the stored data set holds it). ``required_key``: a
    matching key every SCP must support ("R" in Table K.6-1); the others ("O") match too.
    """

    keyword: str
    column: str = ""
    in_step: bool = False
    required_key: bool = False


STEP_SEQUENCE = "ScheduledProcedureStepSequence"

WORKLIST_ATTRIBUTES: tuple[WorklistAttribute, ...] = (
    # Scheduled Procedure Step (K.6-1): one item per step.
    WorklistAttribute("ScheduledStationAETitle", "station_aet", True, True),
    WorklistAttribute("ScheduledProcedureStepStartDate", "start_date", True, True),
    WorklistAttribute("ScheduledProcedureStepStartTime", "start_time", True, True),
    WorklistAttribute("Modality", "modality", True, True),
    WorklistAttribute("ScheduledPerformingPhysicianName", "performing_physician", True, True),
    WorklistAttribute("ScheduledProcedureStepDescription", "step_description", True),
    WorklistAttribute("ScheduledStationName", "station_name", True),
    WorklistAttribute("ScheduledProcedureStepLocation", "", True),
    WorklistAttribute("ScheduledProtocolCodeSequence", "", True),
    WorklistAttribute("ScheduledProcedureStepID", "step_id", True),
    WorklistAttribute("ScheduledProcedureStepStatus", "step_status", True),
    # Requested Procedure
    WorklistAttribute("RequestedProcedureID", "requested_procedure_id"),
    WorklistAttribute("RequestedProcedureDescription", "requested_procedure_description"),
    WorklistAttribute("RequestedProcedureCodeSequence"),
    WorklistAttribute("StudyInstanceUID", "study_uid"),
    WorklistAttribute("RequestedProcedurePriority"),
    # Imaging Service Request
    WorklistAttribute("AccessionNumber", "accession_number", required_key=True),
    WorklistAttribute("RequestingPhysician"),
    WorklistAttribute("ReferringPhysicianName"),
    # Visit
    WorklistAttribute("AdmissionID"),
    WorklistAttribute("CurrentPatientLocation"),
    # Patient
    WorklistAttribute("PatientName", "patient_name", required_key=True),
    WorklistAttribute("PatientID", "patient_id", required_key=True),
    WorklistAttribute("IssuerOfPatientID"),
    WorklistAttribute("OtherPatientIDsSequence"),
    WorklistAttribute("PatientBirthDate", "birth_date"),
    WorklistAttribute("PatientSex", "sex"),
    WorklistAttribute("PatientWeight"),
    WorklistAttribute("MedicalAlerts"),
    WorklistAttribute("Allergies"),
    WorklistAttribute("PregnancyStatus"),
)
WORKLIST_BY_KEYWORD = {a.keyword: a for a in WORKLIST_ATTRIBUTES}
STEP_KEYWORDS = frozenset(a.keyword for a in WORKLIST_ATTRIBUTES if a.in_step)
