"""The audit trail (dicomnode.audit; PS3.15 A.5, IHE ATNA): after real operations against a
real node, each event is in the audit file with the agreed fields, one JSON object a line, in a
file only its owner and group may read.

Events: application-start/stop, association-accepted/rejected, instances-stored (one record per
association and study, written when the association's connection closes), query (C-FIND in the
Q/R models and Modality Worklist), retrieve (C-MOVE, C-GET), config-reload.
"""

from __future__ import annotations

import json
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicomnode.status import Status
from tests.support.node import RunningNode, run_node
from tests.support.qr import (
    PATIENT_FIND,
    STUDY_MOVE,
    Patient,
    Receiver,
    find,
    get,
    identifier,
    move,
    receiver,
    store,
    study,
)
from tests.support.worklist import MWL_FIND

EVERYTHING = ["echo", "store", "find", "move", "get", "worklist", "mpps"]
ALICE = Patient("AUDIT^ALICE", "AUD-1", "19600101")
BOB = Patient("AUDIT^BOB", "AUD-2", "19610202")
WAIT = 15.0

Record = dict[str, Any]


def audit_path(node: RunningNode) -> Path:
    """The default place: var/audit.jsonl beside the configuration file."""
    return node.root / "var" / "audit.jsonl"


def records(node: RunningNode) -> list[Record]:
    """Every record so far; each line must be one whole JSON object."""
    path = audit_path(node)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "the last record is cut short"
    found = []
    for line in text.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        for key in ("time", "event", "outcome", "node", "pid"):
            assert key in record, f"{key} missing in {line}"
        assert record["outcome"] in ("success", "failure"), line
        found.append(record)
    return found


def wait_for(
    node: RunningNode, event: str, match: Callable[[Record], bool] = lambda r: True, count: int = 1
) -> list[Record]:
    """The ``event`` records that ``match``, once there are ``count`` of them (records of an
    association are written when its connection closes, after the SCU has returned)."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [r for r in records(node) if r["event"] == event and match(r)]
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(found) >= count, f"{count} {event} record(s) expected; audit: {records(node)}"
    return found


@pytest.fixture
def dest() -> Iterator[Receiver]:
    with receiver("DEST") as found:
        yield found


@pytest.fixture
def node(tmp_path: Path, dest: Receiver) -> Iterator[RunningNode]:
    with run_node(
        tmp_path / "node", unknown_peers=EVERYTHING, peers={"DEST": dict(dest.peer())}
    ) as running:
        yield running


# --- data events ---------------------------------------------------------------------------


def test_one_instances_stored_record_per_association_and_study(node: RunningNode) -> None:
    alice, bob = study(ALICE, 3), study(BOB, 2)
    assert store(node, [*alice, *bob], calling="MODALITY") == [Status.SUCCESS] * 5
    assert store(node, study(ALICE, 1), calling="OTHER") == [Status.SUCCESS]
    stored = wait_for(node, "instances-stored", count=3)
    assert len(stored) == 3
    by_study = {r["study_uid"]: r for r in stored if r["calling_ae"] == "MODALITY"}
    assert set(by_study) == {alice[0].StudyInstanceUID, bob[0].StudyInstanceUID}
    for study_uid, expected in ((alice[0].StudyInstanceUID, 3), (bob[0].StudyInstanceUID, 2)):
        record = by_study[study_uid]
        sizes = node.rows(
            "SELECT i.file_size FROM instance i JOIN series s ON s.id = i.series_id "
            "JOIN study st ON st.id = s.study_id WHERE st.study_uid = ?",
            study_uid,
        )
        assert record["count"] == expected == len(sizes)
        assert record["bytes"] == sum(row["file_size"] for row in sizes) > 0
        assert record["address"] == "127.0.0.1"
        assert record["outcome"] == "success"
        assert record["node"] == node.ae_title
    (other,) = [r for r in stored if r["calling_ae"] == "OTHER"]
    assert other["count"] == 1


def test_refused_stores_are_one_failure_record_per_status(node: RunningNode) -> None:
    good = study(ALICE, 1)
    bad = study(BOB, 3)
    for ds in bad:
        ds.StudyInstanceUID = "not-a-uid"  # PS3.4 B.2.3: refused, A900
    statuses = store(node, [*good, *bad], calling="SLOPPY")
    assert statuses == [Status.SUCCESS] + [Status.DATASET_DOES_NOT_MATCH_SOP_CLASS] * 3
    (refused,) = wait_for(node, "instances-stored", lambda r: r["outcome"] == "failure")
    assert refused["calling_ae"] == "SLOPPY"
    assert refused["count"] == 3
    assert refused["status"] == "0xA900"
    assert "StudyInstanceUID" in refused["reason"]
    (stored,) = wait_for(node, "instances-stored", lambda r: r["outcome"] == "success")
    assert stored["study_uid"] == good[0].StudyInstanceUID and stored["count"] == 1


def test_query_records_model_level_matches_and_status(node: RunningNode) -> None:
    store(node, [*study(ALICE, 1), *study(ALICE, 1), *study(BOB, 1)])
    answers, final = find(
        node, identifier(QueryRetrieveLevel="STUDY", PatientID="AUD-1", StudyInstanceUID="")
    )
    assert final == Status.SUCCESS and len(answers) == 2
    answers, final = find(
        node, identifier(QueryRetrieveLevel="PATIENT", PatientID="AUD-*"), model=PATIENT_FIND
    )
    assert final == Status.SUCCESS and len(answers) == 2
    # A level the model does not have: refused, A900 (PS3.4 C.4.1.1.4).
    _, final = find(node, identifier(QueryRetrieveLevel="PATIENT", PatientID=""))
    assert final == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    queries = wait_for(node, "query", count=3)
    study_q, patient_q, refused = queries
    assert (study_q["model"], study_q["level"], study_q["matches"], study_q["status"]) == (
        "study",
        "STUDY",
        2,
        "0x0000",
    )
    assert study_q["outcome"] == "success"
    assert study_q["calling_ae"] == "FINDSCU" and study_q["address"] == "127.0.0.1"
    assert (patient_q["model"], patient_q["level"], patient_q["matches"]) == (
        "patient",
        "PATIENT",
        2,
    )
    assert refused["outcome"] == "failure"
    assert (refused["model"], refused["level"], refused["matches"]) == ("study", "PATIENT", 0)
    assert refused["status"] == "0xA900" and refused["reason"]


def test_worklist_query_record(node: RunningNode, tmp_path: Path) -> None:
    items = tmp_path / "items.yaml"
    items.write_text(yaml.safe_dump([worklist_item("WL^ONE", "WL1", "SPS1")]), encoding="utf-8")
    assert node.cli("worklist", "add", str(items)).returncode == 0
    query = Dataset()
    query.PatientID = "WL1"
    step = Dataset()
    step.Modality = "CT"
    query.ScheduledProcedureStepSequence = [step]
    answers, final = find(node, query, model=MWL_FIND, calling="CT1")
    assert final == Status.SUCCESS and len(answers) == 1
    (record,) = wait_for(node, "query")
    assert record["model"] == "worklist" and record["level"] is None
    assert (record["matches"], record["status"], record["calling_ae"]) == (1, "0x0000", "CT1")


def worklist_item(name: str, patient_id: str, step_id: str) -> dict[str, Any]:
    return {
        "PatientName": name,
        "PatientID": patient_id,
        "AccessionNumber": f"ACC-{step_id}",
        "ScheduledProcedureStepSequence": [
            {
                "Modality": "CT",
                "ScheduledStationAETitle": "CT1",
                "ScheduledProcedureStepStartDate": "20261202",
                "ScheduledProcedureStepStartTime": "0930",
                "ScheduledProcedureStepID": step_id,
            }
        ],
    }


def test_move_record_names_destination_level_studies_and_counts(
    node: RunningNode, dest: Receiver
) -> None:
    alice = study(ALICE, 3)
    store(node, [*alice, *study(BOB, 1)])
    study_uid = alice[0].StudyInstanceUID
    final = move(node, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid), "DEST")
    assert final.Status == Status.SUCCESS
    assert set(dest.received) == {str(ds.SOPInstanceUID) for ds in alice}
    (record,) = wait_for(node, "retrieve")
    assert record["outcome"] == "success"
    assert (record["operation"], record["destination"], record["level"]) == (
        "move",
        "DEST",
        "STUDY",
    )
    assert record["study_uids"] == [study_uid]
    assert (record["completed"], record["failed"], record["warning"]) == (3, 0, 0)
    assert record["calling_ae"] == "MOVESCU" and record["address"] == "127.0.0.1"
    assert record["status"] == "0x0000"


def test_move_to_an_unknown_destination_is_a_failure_record(node: RunningNode) -> None:
    alice = study(ALICE, 1)
    store(node, alice)
    query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=alice[0].StudyInstanceUID)
    final = move(node, query, "NOWHERE", model=STUDY_MOVE)
    assert final.Status == Status.MOVE_DESTINATION_UNKNOWN
    (record,) = wait_for(node, "retrieve")
    assert record["outcome"] == "failure"
    assert (record["destination"], record["status"], record["completed"]) == (
        "NOWHERE",
        "0xA801",
        0,
    )
    assert record["study_uids"] == [] and "NOWHERE" in record["reason"]


def test_get_record(node: RunningNode) -> None:
    alice, bob = study(ALICE, 2), study(BOB, 1)
    store(node, [*alice, *bob])
    uids = f"{alice[0].StudyInstanceUID}\\{bob[0].StudyInstanceUID}"
    arrived, final = get(node, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=uids))
    assert final.Status == Status.SUCCESS and len(arrived) == 3
    (record,) = wait_for(node, "retrieve")
    assert (record["operation"], record["destination"], record["level"]) == ("get", None, "STUDY")
    assert sorted(record["study_uids"]) == sorted(
        [alice[0].StudyInstanceUID, bob[0].StudyInstanceUID]
    )
    assert (record["completed"], record["failed"], record["warning"]) == (3, 0, 0)
    assert record["calling_ae"] == "GETSCU" and record["outcome"] == "success"


# --- the file --------------------------------------------------------------------------------


def test_file_mode_0640_and_every_line_json(node: RunningNode) -> None:
    store(node, study(ALICE, 2))
    find(node, identifier(QueryRetrieveLevel="STUDY", PatientID="AUD-1"))
    wait_for(node, "instances-stored")
    path = audit_path(node)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records(node)) >= 2


def test_a_file_others_may_read_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "node" / "var" / "audit.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"event":"older","outcome":"success","time":"","node":"","pid":1}\n')
    path.chmod(0o644)
    with run_node(tmp_path / "node") as node:
        wait_for(node, "application-start")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert records(node)[0]["event"] == "older"  # appended to, never truncated
        node.wait_for_log("was readable by others; now mode 0640")


def test_disabled_writes_nothing(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", unknown_peers=EVERYTHING, audit={"enabled": False}) as node:
        store(node, study(ALICE, 1))
        _, final = find(node, identifier(QueryRetrieveLevel="STUDY", PatientID="AUD-1"))
        assert final == Status.SUCCESS
        node.wait_for_log("association from STORESCU")
        node.stop()
        assert not audit_path(node).exists()
        assert not list(node.root.rglob("*.jsonl"))


def test_configured_path_and_several_workers_write_whole_lines(tmp_path: Path) -> None:
    """Two worker processes append to one file: every line stays whole, nothing is lost."""
    with run_node(
        tmp_path / "node",
        unknown_peers=EVERYTHING,
        workers=2,
        audit={"path": "logs/trail.jsonl"},
    ) as node:
        studies = [study(ALICE, 2) for _ in range(8)]
        for i, made in enumerate(studies):
            assert store(node, made, calling=f"SCU{i}") == [Status.SUCCESS] * 2
        path = node.root / "logs" / "trail.jsonl"
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            stored = [json.loads(line) for line in text.splitlines()]
            stored = [r for r in stored if r["event"] == "instances-stored"]
            if len(stored) >= len(studies):
                break
            time.sleep(0.02)
        assert sorted(r["study_uid"] for r in stored) == sorted(
            str(made[0].StudyInstanceUID) for made in studies
        )
        assert all(r["count"] == 2 for r in stored)
        assert not audit_path(node).exists()


# --- the lead's events: start/stop, associations, reload -------------------------------------


def test_application_start_and_stop(tmp_path: Path) -> None:
    with run_node(tmp_path / "node") as node:
        (start,) = wait_for(node, "application-start")
        assert start["ae_title"] == node.ae_title
        assert start["port"] == node.port and start["host"] == node.host
        assert start["tls_port"] is None
        assert start["workers"] == 1
        assert node.stop() == 0
        (stop,) = wait_for(node, "application-stop")
        assert stop["reason"]
        assert records(node)[-1]["event"] == "application-stop"


def test_association_accepted(node: RunningNode) -> None:
    store(node, study(ALICE, 1), calling="MODALITY")
    (record,) = wait_for(node, "association-accepted", lambda r: r["calling_ae"] == "MODALITY")
    assert record["called_ae"] == node.ae_title
    assert record["address"] == "127.0.0.1" and isinstance(record["port"], int)
    assert record["tls"] in (False, None)
    assert record["contexts"]


def test_association_rejected_for_an_unknown_peer(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", unknown_peers=[]) as node:
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        assert assoc.is_rejected
        ae.shutdown()
        (record,) = wait_for(node, "association-rejected")
        assert record["outcome"] == "failure"
        assert (record["calling_ae"], record["called_ae"]) == ("STRANGER", node.ae_title)
        assert record["address"] == "127.0.0.1"
        assert record["reason"]
        # PS3.8 9.3.4: rejected-permanent, by the service user, calling AE title not recognized.
        assert (record["result"], record["source"], record["reason_code"]) == (1, 1, 3)


def test_rotation_by_rename_and_sighup(tmp_path: Path) -> None:
    """Rename the file away, send SIGHUP: the node writes a new file from then on."""
    with run_node(tmp_path / "node", unknown_peers=EVERYTHING) as node:
        wait_for(node, "application-start")
        rotated = audit_path(node).with_suffix(".jsonl.1")
        audit_path(node).rename(rotated)
        node.proc.send_signal(signal.SIGHUP)
        (reload,) = wait_for(node, "config-reload")
        assert reload["outcome"] == "success"
        store(node, study(ALICE, 1))
        wait_for(node, "instances-stored")
        old = [json.loads(line)["event"] for line in rotated.read_text().splitlines()]
        assert old == ["application-start"]
        assert stat.S_IMODE(audit_path(node).stat().st_mode) == 0o640


def test_config_reload_good_and_bad(tmp_path: Path) -> None:
    with run_node(tmp_path / "node") as node:
        config = yaml.safe_load(node.config_path.read_text())
        config["log_level"] = "INFO"
        node.config_path.write_text(yaml.safe_dump(config))
        node.proc.send_signal(signal.SIGHUP)
        (good,) = wait_for(node, "config-reload")
        assert good["outcome"] == "success" and not good.get("error")
        assert good["source"]
        node.config_path.write_text("ae_title: [not, a, title]\n")
        node.proc.send_signal(signal.SIGHUP)
        (bad,) = wait_for(node, "config-reload", lambda r: r["outcome"] == "failure")
        assert bad["error"]
        # A bad configuration changes nothing: the node goes on serving.
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == Status.SUCCESS
        assoc.release()
        ae.shutdown()
