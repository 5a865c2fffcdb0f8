"""Modality Performed Procedure Step (PS3.4 Annex F): what a modality reports it performed.

A modality creates a performed step with N-CREATE when it starts (status IN PROGRESS) and ends
it with N-SET (COMPLETED or DISCONTINUED). This module checks both against PS3.4 F.7.2 and keeps
the step in the index, linked to the worklist items it performed (by the Study Instance UID or
Accession Number, and the Scheduled Procedure Step ID, of each Scheduled Step Attributes Sequence
item), whose ScheduledProcedureStepStatus follows it: STARTED, then COMPLETED or DISCONTINUED.

It imports no pynetdicom: the handlers give it the attribute lists and answer its statuses.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomnode.index import DuplicateStep, Index
from dicomnode.index.attributes import text_value
from dicomnode.index.models import PerformedStep
from dicomnode.policy import is_valid_uid
from dicomnode.status import Status
from dicomnode.worklist import decode, encode

log = logging.getLogger(__name__)

# PS3.4 F.7.1: the Modality Performed Procedure Step SOP Class.
MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
FINAL = (COMPLETED, DISCONTINUED)
# The worklist step status (0040,0020) that follows each performed step status.
STEP_STATUS = {IN_PROGRESS: "STARTED", COMPLETED: COMPLETED, DISCONTINUED: DISCONTINUED}
# PS3.4 Table F.7.2-2: the Error ID of "Performed Procedure Step Object may no longer be updated".
NO_LONGER_UPDATABLE = 0xA710

SCHEDULED_STEPS = "ScheduledStepAttributesSequence"
_CHARSET = Tag(0x00080005)
# PS3.4 Table F.7.2-1, Req. Type N-CREATE 1: present with a value.
CREATE_TYPE_1 = (
    SCHEDULED_STEPS,
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepStatus",
    "Modality",
)
# Req. Type N-CREATE 2: present, perhaps empty. Their absence is logged, not refused: a step
# the modality performed is worth keeping even when its report is short of an empty element.
CREATE_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "PerformedStationName",
    "PerformedLocation",
    "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime",
    "PerformedProcedureStepDescription",
    "PerformedProcedureTypeDescription",
    "ProcedureCodeSequence",
    "PerformedSeriesSequence",
)
# Req. Type N-SET "Not allowed": fixed once the step exists. Sent again unchanged they are
# accepted (modalities often resend them); changed, the N-SET is refused.
NOT_SETTABLE = (
    "SOPInstanceUID",
    "SOPClassUID",
    SCHEDULED_STEPS,
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "Modality",
    "StudyID",
)
# PS3.4 F.7.2.2 (final state): what a COMPLETED or DISCONTINUED step must hold, with values.
FINAL_TYPE_1 = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")


class StepError(Exception):
    """Refuse the request: answer ``status`` with ``comment`` (0000,0902) and, when given, the
    ``error_id`` (0000,0903); ``comment`` also goes to the log."""

    def __init__(self, status: Status, comment: str, error_id: int | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.error_id = error_id


def _text(ds: Dataset, keyword: str) -> str:
    return text_value(ds.get(keyword))


def _require(ds: Dataset, keyword: str, when: str) -> None:
    if keyword not in ds:
        raise StepError(Status.MISSING_ATTRIBUTE, f"{keyword} is required {when}")
    elem = ds[keyword]
    empty = not elem.value if elem.VR == "SQ" else not text_value(elem.value)
    if empty:
        raise StepError(Status.MISSING_ATTRIBUTE_VALUE, f"{keyword} needs a value {when}")


def check_create(sop_instance_uid: str, attrs: Dataset) -> list[str]:
    """PS3.4 F.7.2.1: check an N-CREATE attribute list; returns the Type 2 attributes missing
    (to log). Raises :class:`StepError` for a request to refuse."""
    if not is_valid_uid(sop_instance_uid):
        raise StepError(Status.INVALID_OBJECT_INSTANCE, "Affected SOP Instance UID is not a UID")
    for keyword in CREATE_TYPE_1:
        _require(attrs, keyword, "in N-CREATE (PS3.4 F.7.2.1)")
    status = _text(attrs, "PerformedProcedureStepStatus")
    if status != IN_PROGRESS:
        raise StepError(
            Status.INVALID_ATTRIBUTE_VALUE,
            f"PerformedProcedureStepStatus must be {IN_PROGRESS!r} in N-CREATE, got {status!r}",
        )
    for i, item in enumerate(attrs[SCHEDULED_STEPS].value):
        uid = _text(item, "StudyInstanceUID")
        if not is_valid_uid(uid):
            raise StepError(
                Status.MISSING_ATTRIBUTE_VALUE if not uid else Status.INVALID_ATTRIBUTE_VALUE,
                f"{SCHEDULED_STEPS}[{i}].StudyInstanceUID must be a UID (Type 1), got {uid!r}",
            )
    return [k for k in CREATE_TYPE_2 if k not in attrs]


def check_set(stored: Dataset, modification: Dataset) -> Dataset:
    """PS3.4 F.7.2.2: check an N-SET modification list against the stored step and return the
    step as it becomes. Raises :class:`StepError` for a request to refuse."""
    current = _text(stored, "PerformedProcedureStepStatus")
    if current in FINAL:
        # The Error Comment as PS3.4 Table F.7.2-2 words it.
        raise StepError(
            Status.PROCESSING_FAILURE,
            "Performed Procedure Step Object may no longer be updated",
            NO_LONGER_UPDATABLE,
        )
    for keyword in NOT_SETTABLE:
        if keyword in modification and not _same(modification[keyword], stored.get(Tag(keyword))):
            raise StepError(
                Status.INVALID_ATTRIBUTE_VALUE,
                f"{keyword} may not be changed by N-SET (PS3.4 F.7.2.2)",
            )
    merged = Dataset()
    merged.update(stored)
    for elem in modification:
        if elem.tag.group in (0x0000, 0x0002) or elem.tag == _CHARSET:
            continue
        merged[elem.tag] = elem
    status = _text(merged, "PerformedProcedureStepStatus")
    if status not in STEP_STATUS:
        raise StepError(
            Status.INVALID_ATTRIBUTE_VALUE,
            f"PerformedProcedureStepStatus {status!r} is not one of {', '.join(STEP_STATUS)}",
        )
    if status in FINAL:
        for keyword in FINAL_TYPE_1:
            _require(merged, keyword, f"to set the step {status} (PS3.4 F.7.2.2)")
        if status == COMPLETED:
            _require(merged, "PerformedSeriesSequence", f"to set the step {COMPLETED}")
    return merged


def _same(a: DataElement, b: DataElement | None) -> bool:
    if b is None:
        return a.value in (None, "", [])
    if a.VR == "SQ" or b.VR == "SQ":
        return bool(a.VR == b.VR == "SQ" and _encoded_items(a) == _encoded_items(b))
    return text_value(a.value) == text_value(b.value)


def _encoded_items(elem: DataElement) -> list[bytes]:
    return [encode(item) for item in elem.value]


def columns(step: Dataset) -> dict[str, str]:
    """The performed_step column values of a step."""
    first = next(iter(step.get(SCHEDULED_STEPS) or []), Dataset())
    return {
        "status": _text(step, "PerformedProcedureStepStatus"),
        "pps_id": _text(step, "PerformedProcedureStepID"),
        "station_aet": _text(step, "PerformedStationAETitle"),
        "modality": _text(step, "Modality"),
        "start_date": _text(step, "PerformedProcedureStepStartDate"),
        "start_time": _text(step, "PerformedProcedureStepStartTime"),
        "end_date": _text(step, "PerformedProcedureStepEndDate"),
        "end_time": _text(step, "PerformedProcedureStepEndTime"),
        "description": _text(step, "PerformedProcedureStepDescription"),
        "patient_id": _text(step, "PatientID"),
        "patient_name": _text(step, "PatientName"),
        "study_uid": _text(first, "StudyInstanceUID"),
        "accession_number": _text(first, "AccessionNumber"),
    }


def _link(
    con: sqlite3.Connection, step: Dataset, row_id: int, uid: str, step_status: str, now: str
) -> int:
    """Record the worklist items ``step`` (row ``row_id``) performed, point them at it and set
    their step status; returns how many. Each Scheduled Step Attributes item names a requested
    procedure by Study Instance UID (else Accession Number) and, when given, one of its steps
    by Scheduled Procedure Step ID; an item naming neither (an unscheduled step) links
    nothing. A step performed again (a second MPPS for it) follows the newer MPPS."""
    linked: set[int] = set()
    for item in step.get(SCHEDULED_STEPS) or []:
        study, accession = _text(item, "StudyInstanceUID"), _text(item, "AccessionNumber")
        step_id = _text(item, "ScheduledProcedureStepID")
        if study:
            sql, params = "SELECT id FROM worklist_item WHERE study_uid = ?", [study]
        elif accession:
            sql, params = "SELECT id FROM worklist_item WHERE accession_number = ?", [accession]
        else:
            continue
        if step_id:
            sql += " AND step_id = ?"
            params.append(step_id)
        linked.update(row[0] for row in con.execute(sql, params))
    for item_id in sorted(linked):
        con.execute(
            "INSERT INTO performed_item (step_id, item_id) VALUES (?, ?)", (row_id, item_id)
        )
        _set_step_status(con, item_id, step_status, uid, now)
    return len(linked)


def _follow(con: sqlite3.Connection, uid: str, step_status: str, now: str) -> int:
    """The items whose status follows performed step ``uid`` take ``step_status``."""
    ids = [r[0] for r in con.execute("SELECT id FROM worklist_item WHERE mpps_uid = ?", (uid,))]
    for item_id in ids:
        _set_step_status(con, item_id, step_status, uid, now)
    return len(ids)


def _set_step_status(
    con: sqlite3.Connection, item_id: int, step_status: str, uid: str, now: str
) -> None:
    """The worklist item's ScheduledProcedureStepStatus, in its column and its data set."""
    (data,) = con.execute("SELECT dataset FROM worklist_item WHERE id = ?", (item_id,)).fetchone()
    item = decode(bytes(data))
    for sps in item.get("ScheduledProcedureStepSequence") or []:
        sps.ScheduledProcedureStepStatus = step_status
    con.execute(
        "UPDATE worklist_item SET step_status = ?, mpps_uid = ?, dataset = ?, updated_at = ? "
        "WHERE id = ?",
        (step_status, uid, encode(item), now, item_id),
    )


@dataclass(frozen=True)
class StoredStep:
    """A performed step as the index holds it."""

    sop_instance_uid: str
    status: str
    step: Dataset
    calling_ae_title: str
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, row: Any) -> StoredStep:
        return cls(
            row.sop_instance_uid,
            row.status,
            decode(bytes(row.dataset)),
            row.calling_ae_title,
            row.created_at,
            row.updated_at,
        )


class PerformedSteps:
    """The performed procedure steps of an open index."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def create(self, sop_instance_uid: str, attrs: Dataset, calling_ae_title: str) -> int:
        """N-CREATE: check and store the step and link its worklist items; returns how many
        items it linked. ``attrs`` has its values decoded already (``decode_values``).
        Raises :class:`StepError` (nothing stored)."""
        missing = check_create(sop_instance_uid, attrs)
        if missing:
            log.warning(
                "MPPS N-CREATE from %s lacks Type 2 attributes %s (PS3.4 F.7.2.1); accepted",
                calling_ae_title,
                ", ".join(missing),
            )
        step = copy.deepcopy(attrs)
        step.SOPClassUID = MODALITY_PERFORMED_PROCEDURE_STEP
        step.SOPInstanceUID = sop_instance_uid
        _to_utf8(step)
        now = _now()
        row = {
            **columns(step),
            "sop_instance_uid": sop_instance_uid,
            "calling_ae_title": calling_ae_title,
            "dataset": encode(step),
            "created_at": now,
            "updated_at": now,
        }
        try:
            return self.index.create_performed_step(
                row,
                lambda con, row_id: _link(
                    con, step, row_id, sop_instance_uid, STEP_STATUS[IN_PROGRESS], now
                ),
            )
        except DuplicateStep:
            raise StepError(
                Status.DUPLICATE_SOP_INSTANCE,
                "a performed procedure step with this SOP Instance UID exists already",
            ) from None

    def set(self, sop_instance_uid: str, modification: Dataset) -> tuple[str, int]:
        """N-SET: check the change against the stored step, store it and let its worklist items
        follow; returns the step's status and how many items it updated. ``modification`` has
        its values decoded already. Raises :class:`StepError` (nothing changed)."""
        outcome: dict[str, Any] = {}

        def change(row: Any, con: sqlite3.Connection) -> dict[str, Any]:
            step = check_set(decode(bytes(row.dataset)), modification)
            _to_utf8(step)
            status = _text(step, "PerformedProcedureStepStatus")
            now = _now()
            outcome["status"] = status
            outcome["linked"] = _follow(con, sop_instance_uid, STEP_STATUS[status], now)
            return {**columns(step), "dataset": encode(step), "updated_at": now}

        if self.index.update_performed_step(sop_instance_uid, change) is None:
            raise StepError(
                Status.NO_SUCH_SOP_INSTANCE,
                "no performed procedure step with this SOP Instance UID (N-CREATE it first)",
            )
        return outcome["status"], outcome["linked"]

    def linked_items(self, sop_instance_uid: str) -> list[int]:
        """The ids of the worklist items this step reported on."""
        return self.index.performed_items(sop_instance_uid)

    def steps(self, sop_instance_uid: str | None = None) -> list[StoredStep]:
        condition = (
            None if sop_instance_uid is None else PerformedStep.sop_instance_uid == sop_instance_uid
        )
        return [StoredStep.of(row) for row in self.index.performed_steps(condition)]


def _to_utf8(step: Dataset) -> None:
    """The step is stored with its text in UTF-8 (every value is Unicode by now)."""
    step[_CHARSET] = DataElement(_CHARSET, "CS", "ISO_IR 192")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
