"""The MPPS SCP (PS3.4 F.7) with a pynetdicom SCU as the modality: N-CREATE (IN PROGRESS) then
N-SET (COMPLETED or DISCONTINUED), checked per F.7.2, kept in the index and linked to the
worklist items it performed, whose status follows; and ``dicomnode mpps list/show``.

The scanner's whole loop is here too: DCMTK ``findscu -W`` gets the schedule, the MPPS reports
the step, and the worklist answers change with it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_CREATE

from dicomnode.mpps import NO_LONGER_UPDATABLE
from dicomnode.status import Status
from dicomnode.worklist import decode
from tests.support.dcmtk import require_dcmtk
from tests.support.dimse import echo, raw_request
from tests.support.node import RunningNode, run_node
from tests.support.worklist import MPPS, findscu_worklist, mpps_completed, mpps_in_progress

STEP = "ScheduledProcedureStepSequence"
SETTINGS: dict[str, Any] = {
    "unknown_peers": ["echo", "worklist", "mpps"],
    "worklist": {"expire_after_days": 0},
}
ITEMS = [
    {
        "PatientName": "DOE^JOHN",
        "PatientID": "P1",
        "AccessionNumber": "ACC1",
        "StudyInstanceUID": "1.2.826.0.1.3680043.2.1143.1",
        STEP: [
            {
                "Modality": "CT",
                "ScheduledStationAETitle": "CT1",
                "ScheduledProcedureStepStartDate": "20261202",
                "ScheduledProcedureStepStartTime": "0930",
                "ScheduledProcedureStepID": "SPS1",
            },
            {
                "Modality": "CT",
                "ScheduledStationAETitle": "CT1",
                "ScheduledProcedureStepStartDate": "20261202",
                "ScheduledProcedureStepStartTime": "1000",
                "ScheduledProcedureStepID": "SPS1B",
            },
        ],
    },
    {
        "PatientName": "Müller^Jürgen",
        "PatientID": "P2",
        "AccessionNumber": "ACC2",
        "StudyInstanceUID": "1.2.826.0.1.3680043.2.1143.2",
        STEP: [
            {
                "Modality": "MR",
                "ScheduledStationAETitle": "MR1",
                "ScheduledProcedureStepStartDate": "20261202",
                "ScheduledProcedureStepStartTime": "1100",
                "ScheduledProcedureStepID": "SPS2",
            }
        ],
    },
]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    with run_node(tmp_path / "node", **SETTINGS) as running:
        items = tmp_path / "items.yaml"
        items.write_text(yaml.safe_dump(ITEMS, allow_unicode=True), encoding="utf-8")
        done = running.cli("worklist", "add", str(items))
        assert done.returncode == 0, done.stderr
        yield running


@pytest.fixture
def assoc(node: RunningNode) -> Iterator[Association]:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(MPPS)
    association = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert association.is_established
    try:
        yield association
    finally:
        if association.is_established:
            association.release()
        ae.shutdown()


def in_progress(study: str = "1.2.826.0.1.3680043.2.1143.1", step: str = "SPS1") -> Dataset:
    """An N-CREATE attribute list as a modality sends it (PS3.4 Table F.7.2-1)."""
    return mpps_in_progress(study, step)


def completed(status: str = "COMPLETED") -> Dataset:
    """An N-SET modification list ending the step (PS3.4 F.7.2.2, final state)."""
    return mpps_completed(status)


def create(assoc: Association, attrs: Dataset, uid: str | None = None) -> tuple[Dataset, str]:
    uid = uid or generate_uid(prefix=None)
    status, _ = assoc.send_n_create(attrs, MPPS, uid)
    return status, uid


def step_status(node: RunningNode) -> dict[str, str]:
    """Each worklist item's step status, by ScheduledProcedureStepID (column and data set)."""
    statuses = {}
    for row in node.rows("SELECT step_id, step_status, dataset FROM worklist_item"):
        item = decode(bytes(row["dataset"]))
        assert item[STEP][0].ScheduledProcedureStepStatus == row["step_status"]
        statuses[row["step_id"]] = row["step_status"]
    return statuses


def test_create_then_complete_and_the_worklist_item_follows(
    node: RunningNode, assoc: Association, tmp_path: Path
) -> None:
    status, uid = create(assoc, in_progress())
    assert status.Status == Status.SUCCESS
    (row,) = node.rows("SELECT * FROM performed_step")
    assert (row["sop_instance_uid"], row["status"], row["calling_ae_title"]) == (
        uid,
        "IN PROGRESS",
        "CT1",
    )
    assert (row["pps_id"], row["modality"], row["study_uid"]) == (
        "PPS1",
        "CT",
        "1.2.826.0.1.3680043.2.1143.1",
    )
    # Linked by Study Instance UID and Scheduled Procedure Step ID: SPS1, not SPS1B.
    assert step_status(node) == {"SPS1": "STARTED", "SPS1B": "SCHEDULED", "SPS2": "SCHEDULED"}
    status, _ = assoc.send_n_set(completed(), MPPS, uid)
    assert status.Status == Status.SUCCESS
    (row,) = node.rows("SELECT status, end_date, end_time, dataset FROM performed_step")
    assert (row["status"], row["end_date"], row["end_time"]) == ("COMPLETED", "20261202", "100500")
    stored = decode(bytes(row["dataset"]))
    assert stored.PerformedSeriesSequence[0].ProtocolName == "HEAD"
    assert stored.PerformedProcedureStepID == "PPS1"  # kept from N-CREATE
    assert step_status(node) == {"SPS1": "COMPLETED", "SPS1B": "SCHEDULED", "SPS2": "SCHEDULED"}
    node.wait_for_log(f"MPPS {uid} set COMPLETED by CT1: 1 worklist item(s) follow")
    # The scanner's next worklist query no longer offers the completed step.
    require_dcmtk("findscu")
    done, answers = findscu_worklist(
        (node.ae_title, node.host, node.port),
        tmp_path,
        [f"{STEP}[0].ScheduledStationAETitle=CT1", f"{STEP}[0].ScheduledProcedureStepID"],
        calling="CT1",
    )
    assert done.returncode == 0, done.stderr
    assert [str(a[STEP][0].ScheduledProcedureStepID) for a in answers] == ["SPS1B"]


def test_discontinued_step_and_the_item_follows(node: RunningNode, assoc: Association) -> None:
    _, uid = create(assoc, in_progress(step=""))  # no step ID: every step of the request
    assert step_status(node) == {"SPS1": "STARTED", "SPS1B": "STARTED", "SPS2": "SCHEDULED"}
    discontinued = completed("DISCONTINUED")
    del discontinued.PerformedSeriesSequence  # a DISCONTINUED step may have no series
    status, _ = assoc.send_n_set(discontinued, MPPS, uid)
    assert status.Status == Status.SUCCESS
    assert step_status(node) == {
        "SPS1": "DISCONTINUED",
        "SPS1B": "DISCONTINUED",
        "SPS2": "SCHEDULED",
    }


def test_a_finished_step_may_no_longer_be_updated(node: RunningNode, assoc: Association) -> None:
    _, uid = create(assoc, in_progress())
    assert assoc.send_n_set(completed(), MPPS, uid)[0].Status == Status.SUCCESS
    for again in (completed(), completed("DISCONTINUED"), completed("IN PROGRESS")):
        status, _ = assoc.send_n_set(again, MPPS, uid)
        # PS3.4 Table F.7.2-2.
        assert status.Status == Status.PROCESSING_FAILURE
        assert status.ErrorComment == "Performed Procedure Step Object may no longer be updated"
        assert status.ErrorID == NO_LONGER_UPDATABLE
    (row,) = node.rows("SELECT status FROM performed_step")
    assert row["status"] == "COMPLETED"
    node.wait_for_log("may no longer be updated")


def test_n_set_of_an_unknown_instance(node: RunningNode, assoc: Association) -> None:
    status, _ = assoc.send_n_set(completed(), MPPS, generate_uid(prefix=None))
    assert status.Status == Status.NO_SUCH_SOP_INSTANCE
    assert node.rows("SELECT * FROM performed_step") == []
    node.wait_for_log("no performed procedure step with this SOP Instance UID")


@pytest.mark.parametrize(
    ("change", "expected", "reason"),
    [
        (lambda ds: delattr(ds, "PerformedProcedureStepID"), Status.MISSING_ATTRIBUTE,
         "PerformedProcedureStepID is required in N-CREATE"),
        (lambda ds: delattr(ds, "ScheduledStepAttributesSequence"), Status.MISSING_ATTRIBUTE,
         "ScheduledStepAttributesSequence is required"),
        (lambda ds: setattr(ds, "Modality", ""), Status.MISSING_ATTRIBUTE_VALUE,
         "Modality needs a value"),
        (lambda ds: setattr(ds, "PerformedProcedureStepStatus", "COMPLETED"),
         Status.INVALID_ATTRIBUTE_VALUE, "must be 'IN PROGRESS' in N-CREATE"),
        (lambda ds: setattr(ds.ScheduledStepAttributesSequence[0], "StudyInstanceUID", ""),
         Status.MISSING_ATTRIBUTE_VALUE, "StudyInstanceUID must be a UID"),
    ],
)  # fmt: skip
def test_create_refused_for_missing_or_invalid_attributes(
    node: RunningNode, assoc: Association, change: Any, expected: Status, reason: str
) -> None:
    attrs = in_progress()
    change(attrs)
    status, _ = create(assoc, attrs)
    assert status.Status == expected
    assert reason[:20] in str(status.ErrorComment)
    node.wait_for_log(reason)
    assert node.rows("SELECT * FROM performed_step") == []
    assert step_status(node)["SPS1"] == "SCHEDULED"


def test_duplicate_create_is_refused(node: RunningNode, assoc: Association) -> None:
    _, uid = create(assoc, in_progress())
    status, _ = create(assoc, in_progress(), uid)
    assert status.Status == Status.DUPLICATE_SOP_INSTANCE
    assert len(node.rows("SELECT * FROM performed_step")) == 1


@pytest.mark.parametrize(
    ("change", "expected", "reason"),
    [
        # N-CREATE sent the end date empty (Type 2): still empty when the step ends.
        (lambda ds: delattr(ds, "PerformedProcedureStepEndDate"), Status.MISSING_ATTRIBUTE_VALUE,
         "PerformedProcedureStepEndDate needs a value to set the step COMPLETED"),
        (lambda ds: setattr(ds, "PerformedProcedureStepEndTime", ""),
         Status.MISSING_ATTRIBUTE_VALUE, "PerformedProcedureStepEndTime needs a value"),
        (lambda ds: delattr(ds, "PerformedSeriesSequence"), Status.MISSING_ATTRIBUTE_VALUE,
         "PerformedSeriesSequence needs a value to set the step COMPLETED"),
        (lambda ds: setattr(ds, "PerformedProcedureStepStatus", "DONE"),
         Status.INVALID_ATTRIBUTE_VALUE, "PerformedProcedureStepStatus 'DONE' is not one of"),
        (lambda ds: setattr(ds, "PatientID", "SOMEONE_ELSE"), Status.INVALID_ATTRIBUTE_VALUE,
         "PatientID may not be changed by N-SET"),
    ],
)  # fmt: skip
def test_set_refused_for_missing_final_state_or_changed_fixed_attributes(
    node: RunningNode, assoc: Association, change: Any, expected: Status, reason: str
) -> None:
    _, uid = create(assoc, in_progress())
    modification = completed()
    change(modification)
    status, _ = assoc.send_n_set(modification, MPPS, uid)
    assert status.Status == expected
    node.wait_for_log(reason)
    (row,) = node.rows("SELECT status, patient_id FROM performed_step")
    assert (row["status"], row["patient_id"]) == ("IN PROGRESS", "P1")
    assert step_status(node)["SPS1"] == "STARTED"
    # The step can still be ended properly, and fixed attributes sent again unchanged are fine.
    fine = completed()
    fine.PatientID = "P1"
    fine.Modality = "CT"
    assert assoc.send_n_set(fine, MPPS, uid)[0].Status == Status.SUCCESS


def test_progress_updates_while_in_progress(node: RunningNode, assoc: Association) -> None:
    _, uid = create(assoc, in_progress())
    update = Dataset()
    update.PerformedProcedureStepDescription = "CT head with contrast"
    assert assoc.send_n_set(update, MPPS, uid)[0].Status == Status.SUCCESS
    (row,) = node.rows("SELECT status, description FROM performed_step")
    assert (row["status"], row["description"]) == ("IN PROGRESS", "CT head with contrast")


def test_create_without_instance_uid_gets_one_assigned(
    node: RunningNode, assoc: Association
) -> None:
    status, _ = assoc.send_n_create(in_progress(), MPPS, None)
    assert status.Status == Status.SUCCESS
    (row,) = node.rows("SELECT sop_instance_uid FROM performed_step")
    assert row["sop_instance_uid"].startswith("2.25.")
    node.wait_for_log(f"MPPS {row['sop_instance_uid']} IN PROGRESS from CT1")


def test_non_ascii_attributes_are_kept_as_sent(node: RunningNode, assoc: Association) -> None:
    attrs = in_progress("1.2.826.0.1.3680043.2.1143.2", "SPS2")
    attrs.SpecificCharacterSet = "ISO_IR 100"
    attrs.PatientName = "Müller^Jürgen"
    attrs.PatientID = "P2"
    _, uid = create(assoc, attrs)
    (row,) = node.rows("SELECT patient_name FROM performed_step")
    assert row["patient_name"] == "Müller^Jürgen"
    shown = node.cli("mpps", "show", uid, "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["attributes"]["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
    assert data["worklist_items"] == [
        r["id"] for r in node.rows("SELECT id FROM worklist_item WHERE step_id = 'SPS2'")
    ]
    assert step_status(node)["SPS2"] == "STARTED"


def test_mpps_list_and_show(node: RunningNode, assoc: Association) -> None:
    _, first = create(assoc, in_progress())
    assoc.send_n_set(completed(), MPPS, first)
    _, second = create(assoc, in_progress(step="SPS1B"))
    listed = node.cli("mpps", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == [
        "SOPInstanceUID",
        "PerformedProcedureStepStatus",
        "PerformedStationAETitle",
        "Modality",
    ]
    assert any(line.startswith(first) and "COMPLETED" in line for line in lines)
    assert any(line.startswith(second) and "IN PROGRESS" in line for line in lines)
    assert lines[-1] == "2 performed steps"
    as_json = json.loads(node.cli("mpps", "list", "--json").stdout)
    assert [(s["sop_instance_uid"], s["status"], s["from"]) for s in as_json] == [
        (first, "COMPLETED", "CT1"),
        (second, "IN PROGRESS", "CT1"),
    ]
    ids = {r["step_id"]: r["id"] for r in node.rows("SELECT id, step_id FROM worklist_item")}
    assert as_json[0]["worklist_items"] == [ids["SPS1"]]
    assert as_json[1]["worklist_items"] == [ids["SPS1B"]]
    shown = node.cli("mpps", "show", first)
    assert shown.returncode == 0
    assert f"performed procedure step {first}: COMPLETED (from CT1" in shown.stdout
    assert f"worklist items: {ids['SPS1']}" in shown.stdout
    missing = node.cli("mpps", "show", "1.2.3.4")
    assert missing.returncode == 2
    assert "no performed procedure step 1.2.3.4" in missing.stderr
    # The worklist item shows which MPPS performed it.
    item = json.loads(node.cli("worklist", "show", str(ids["SPS1"]), "--json").stdout)
    assert item["mpps"] == first


def test_a_second_mpps_for_the_same_step_takes_it_over(
    node: RunningNode, assoc: Association
) -> None:
    _, first = create(assoc, in_progress())
    assoc.send_n_set(completed("DISCONTINUED"), MPPS, first)
    _, second = create(assoc, in_progress())  # performed again
    assert step_status(node)["SPS1"] == "STARTED"
    assert assoc.send_n_set(completed(), MPPS, second)[0].Status == Status.SUCCESS
    assert step_status(node)["SPS1"] == "COMPLETED"
    both = json.loads(node.cli("mpps", "list", "--json").stdout)
    item_id = node.rows("SELECT id FROM worklist_item WHERE step_id = 'SPS1'")[0]["id"]
    assert [s["worklist_items"] for s in both] == [[item_id], [item_id]]


def test_unscheduled_step_is_kept_and_links_nothing(node: RunningNode, assoc: Association) -> None:
    attrs = in_progress(study="1.2.826.0.1.3680043.2.1143.999", step="")
    attrs.ScheduledStepAttributesSequence[0].AccessionNumber = ""
    status, uid = create(assoc, attrs)
    assert status.Status == Status.SUCCESS
    node.wait_for_log(f"MPPS {uid} IN PROGRESS from CT1: 0 worklist item(s) linked")
    assert set(step_status(node).values()) == {"SCHEDULED"}


def test_broken_attribute_list_is_refused_and_the_node_goes_on(
    node: RunningNode, assoc: Association
) -> None:
    request = N_CREATE()
    request.MessageID = 9
    request.AffectedSOPClassUID = MPPS
    request.AffectedSOPInstanceUID = generate_uid(prefix=None)
    # An element header claiming 200 bytes where 4 follow.
    request.AttributeList = BytesIO(b"\x10\x00\x10\x00PN\xc8\x00DOE^")
    context_id = int(assoc.accepted_contexts[0].context_id or 1)
    assert raw_request(assoc, context_id, request) == Status.PROCESSING_FAILURE
    node.wait_for_log("the attribute list cannot be decoded")
    assert echo(node) == Status.SUCCESS
    assert create(assoc, in_progress())[0].Status == Status.SUCCESS


def test_callers_not_allowed_mpps_are_refused(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", unknown_peers=["echo", "worklist"]) as node:
        ae = AE(ae_title="CT1")
        ae.add_requested_context(MPPS)
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        try:
            assert not assoc.is_established or not assoc.accepted_contexts
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        node.wait_for_log(
            "ModalityPerformedProcedureStep: rejected, calling AE may not use the 'mpps' service"
        )


def test_an_index_write_failure_answers_resource_limitation(
    node: RunningNode, assoc: Association
) -> None:
    con = sqlite3.connect(node.database)
    con.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON performed_step "
        "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    con.commit()
    try:
        status, _ = create(assoc, in_progress())
        assert status.Status == Status.RESOURCE_LIMITATION
        node.wait_for_log("the index is unavailable")
        assert step_status(node)["SPS1"] == "SCHEDULED"  # nothing half-written
    finally:
        con.execute("DROP TRIGGER refuse")
        con.commit()
        con.close()
    assert create(assoc, in_progress())[0].Status == Status.SUCCESS
