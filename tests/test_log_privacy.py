"""The operational log holds no patient data at INFO and above (issue 6; PS3.15 E: identifiers
belong in the audit trail, which is meant for those who may read them).

A real node at ``log_level: INFO`` (one process, and two workers) stores studies of patients
whose name, ID and birth date are made up for this run, and is asked for them every way a peer
can: C-FIND at each level of both models with those values as keys, C-MOVE and C-GET, the
Modality Worklist and MPPS, and each of them also wrongly (refused stores, identifiers that
cannot be answered), since refusals are where values get quoted. Then none of the values, in
any spelling (``^`` or spaces, any case, dates with separators), may appear in its log.
"""

from __future__ import annotations

import random
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.status import Status
from tests.support.node import RunningNode, run_node
from tests.support.qr import (
    PATIENT_FIND,
    PATIENT_MOVE,
    STUDY_FIND,
    Patient,
    Receiver,
    association,
    find,
    get,
    identifier,
    move,
    receiver,
    store,
    study,
)
from tests.support.worklist import MPPS, MWL_FIND, mpps_completed, mpps_in_progress

EVERYTHING = ["echo", "store", "find", "move", "get", "worklist", "mpps"]


def token(prefix: str) -> str:
    """A value no log line could hold by chance."""
    return prefix + "".join(random.choices(string.ascii_uppercase + string.digits, k=10))


class Canary:
    """One made-up patient and every spelling of its data that must not be logged."""

    def __init__(self, birth_date: str) -> None:
        self.family, self.given = token("CANARYF"), token("CANARYG")
        self.id_part = token("ID")
        self.patient = Patient(f"{self.family}^{self.given}", f"PID-{self.id_part}", birth_date)

    def forms(self) -> list[str]:
        name, birth = self.patient.name, self.patient.birth_date
        y, m, d = birth[:4], birth[4:6], birth[6:]
        return [
            self.family,
            self.given,
            self.id_part,  # within the ID, whatever is around it
            name,
            name.replace("^", " "),
            f"{self.given} {self.family}",
            self.patient.patient_id,
            birth,
            f"{y}-{m}-{d}",
            f"{y}.{m}.{d}",
            f"{y}/{m}/{d}",
            f"{d}.{m}.{y}",
            f"{d}/{m}/{y}",
            f"{m}/{d}/{y}",
        ]


def leaks(log: str, canaries: list[Canary]) -> list[str]:
    """Log lines holding any form of any canary's data (case-insensitive)."""
    forms = [f.lower() for c in canaries for f in c.forms()]
    return [line for line in log.splitlines() if any(f in line.lower() for f in forms)]


@pytest.fixture
def dest() -> Iterator[Receiver]:
    with receiver("DEST") as found:
        yield found


@pytest.mark.parametrize("workers", [1, 2])
def test_no_patient_data_in_the_operational_log(
    tmp_path: Path, dest: Receiver, workers: int
) -> None:
    stored = Canary("19370611")
    scheduled = Canary("19410923")
    performed = Canary("19290307")
    with run_node(
        tmp_path / "node",
        log_level="INFO",
        workers=workers,
        unknown_peers=EVERYTHING,
        peers={"DEST": dict(dest.peer())},
        worklist={"expire_after_days": 0},
    ) as node:
        exercise(node, tmp_path, stored, scheduled, performed, dest)
        node.stop()
        log = node.log()
    # The operations were logged at INFO (so the test looks at a log that talks about them) ...
    for expected in ("C-FIND from FINDSCU", "C-MOVE from MOVESCU", "C-GET from GETSCU",
                     "worklist C-FIND from CT1", "MPPS ", "C-STORE from STORESCU failed",
                     "association from STORESCU"):  # fmt: skip
        assert expected in log, f"{expected!r} not logged:\n{log}"
    assert " DEBUG " not in log
    # ... pynetdicom's own lines (identifiers at INFO) are off ...
    assert " INFO pynetdicom" not in log
    # ... and not one line names a patient.
    found = leaks(log, [stored, scheduled, performed])
    assert not found, "patient data in the operational log:\n" + "\n".join(found)


def exercise(
    node: RunningNode,
    tmp_path: Path,
    canary: Canary,
    scheduled: Canary,
    performed: Canary,
    dest: Receiver,
) -> None:
    p = canary.patient
    instances = study(p, 4)
    study_uid = str(instances[0].StudyInstanceUID)
    series_uid = str(instances[0].SeriesInstanceUID)
    # C-STORE: stored, stored again (identical duplicates), and refused.
    assert store(node, instances) == [Status.SUCCESS] * 4
    assert store(node, instances[:2]) == [Status.SUCCESS] * 2
    (bad,) = study(p, 1)
    bad.StudyInstanceUID = "not-a-uid"
    assert store(node, [bad]) == [Status.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    # Stored, though pydicom finds the values invalid (and says so, quoting them).
    (odd,) = study(p, 1)
    odd.PatientBirthDate = f"{p.birth_date[:4]}-{p.birth_date[4:6]}-{p.birth_date[6:]}"
    odd.PatientAge = p.patient_id[:4]  # AS: nnnD/W/M/Y
    odd.OtherPatientIDs = f"{p.patient_id}\\{p.name}"
    assert store(node, [odd]) == [Status.SUCCESS]

    # C-FIND at every level of both models, the patient's data as keys.
    patient_keys = {"PatientName": p.name, "PatientID": p.patient_id}
    asks = [
        (PATIENT_FIND, identifier(QueryRetrieveLevel="PATIENT", **patient_keys,
                                  PatientBirthDate=p.birth_date)),
        (PATIENT_FIND, identifier(QueryRetrieveLevel="STUDY", PatientID=p.patient_id,
                                  StudyInstanceUID="", PatientName="")),
        (PATIENT_FIND, identifier(QueryRetrieveLevel="SERIES", PatientID=p.patient_id,
                                  StudyInstanceUID=study_uid, SeriesInstanceUID="")),
        (PATIENT_FIND, identifier(QueryRetrieveLevel="IMAGE", PatientID=p.patient_id,
                                  StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                                  SOPInstanceUID="")),
        (STUDY_FIND, identifier(QueryRetrieveLevel="STUDY", PatientName=f"{canary.family}*",
                                PatientID=p.patient_id, PatientBirthDate=f"{p.birth_date}-")),
        (STUDY_FIND, identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=study_uid,
                                PatientName="", SeriesInstanceUID="")),
        (STUDY_FIND, identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID=study_uid,
                                SeriesInstanceUID=series_uid, PatientID="")),
    ]  # fmt: skip
    for model, query in asks:
        answers, final = find(node, query, model=model)
        assert final == Status.SUCCESS and answers, query
    # ... and identifiers that are refused (or match nothing), with the patient's values where
    # a reason might quote them.
    reversed_range = f"{p.birth_date}-19000101"
    unusual = [
        (PATIENT_FIND, identifier(QueryRetrieveLevel="STUDY", PatientID=f"{p.patient_id}*")),
        (STUDY_FIND, identifier(QueryRetrieveLevel="STUDY", PatientBirthDate=reversed_range)),
        (STUDY_FIND, identifier(QueryRetrieveLevel="STUDY", PatientBirthDate=f"{p.birth_date}X")),
        (STUDY_FIND, identifier(QueryRetrieveLevel="STUDY", PatientBirthDate=p.name)),
        (STUDY_FIND, identifier(QueryRetrieveLevel="PATIENT", PatientName=p.name)),
    ]  # fmt: skip
    finals = [find(node, query, model=model)[1] for model, query in unusual]
    assert -1 not in finals  # each got its final response
    assert finals.count(Status.SUCCESS) <= 2, finals  # most are refused

    # C-MOVE by patient and by study, C-GET; and a move that cannot be answered.
    final = move(
        node,
        identifier(QueryRetrieveLevel="PATIENT", PatientID=p.patient_id),
        "DEST",
        model=PATIENT_MOVE,
    )
    assert final.Status == Status.SUCCESS and len(dest.received) == 5  # both studies
    final = move(node, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid), "DEST")
    assert final.Status == Status.SUCCESS
    final = move(
        node,
        identifier(QueryRetrieveLevel="PATIENT", PatientID=f"{p.patient_id}*"),
        "DEST",
        model=PATIENT_MOVE,
    )
    assert final.Status != Status.SUCCESS
    arrived, final = get(node, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid))
    assert final.Status == Status.SUCCESS and len(arrived) == 4

    # Modality Worklist: an item of another patient, asked for by its values.
    s = scheduled.patient
    items = tmp_path / "items.yaml"
    items.write_text(yaml.safe_dump([worklist_item(s, "SPS1")]), encoding="utf-8")
    done = node.cli("worklist", "add", str(items))
    assert done.returncode == 0, done.stderr
    for keys in (
        {"PatientName": s.name},
        {"PatientID": s.patient_id, "PatientBirthDate": s.birth_date},
        {"PatientName": f"{scheduled.family}*", "PatientBirthDate": f"{s.birth_date}-20301231"},
    ):
        answers, final = find(node, worklist_query(**keys), model=MWL_FIND, calling="CT1")
        assert final == Status.SUCCESS and len(answers) == 1, keys
    finals = [
        find(node, worklist_query(PatientBirthDate=value), model=MWL_FIND, calling="CT1")[1]
        for value in (f"{s.birth_date}-19000101", f"{s.birth_date}X", s.name)
    ]
    assert -1 not in finals and finals.count(Status.SUCCESS) <= 1, finals

    # MPPS: the step performed on the scheduled item, for yet another patient's data.
    step_uid = generate_uid(prefix=None)
    with association(node, "CT1", [MPPS]) as assoc:
        status, _ = assoc.send_n_create(in_progress(performed.patient), MPPS, step_uid)
        assert status.Status == Status.SUCCESS
        # Refused: the same SOP Instance UID again.
        status, _ = assoc.send_n_create(in_progress(performed.patient), MPPS, step_uid)
        assert status.Status != Status.SUCCESS
        changed = Dataset()
        changed.PatientID = f"{performed.patient.patient_id}X"  # not settable (PS3.4 F.7.2.2)
        status, _ = assoc.send_n_set(changed, MPPS, step_uid)
        assert status.Status != Status.SUCCESS
        status, _ = assoc.send_n_set(completed(performed.patient), MPPS, step_uid)
        assert status.Status == Status.SUCCESS


def worklist_item(patient: Patient, step_id: str) -> dict[str, object]:
    return {
        "PatientName": patient.name,
        "PatientID": patient.patient_id,
        "PatientBirthDate": patient.birth_date,
        "AccessionNumber": f"ACC-{step_id}",
        "StudyInstanceUID": "1.2.826.0.1.3680043.2.1143.99",
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


def worklist_query(**keys: str) -> Dataset:
    query = identifier(**{"PatientName": "", "PatientID": "", "PatientBirthDate": "", **keys})
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledProcedureStepID = ""
    query.ScheduledProcedureStepSequence = [step]
    return query


def in_progress(patient: Patient) -> Dataset:
    """An N-CREATE attribute list (PS3.4 Table F.7.2-1) for the scheduled item's step."""
    return mpps_in_progress(
        "1.2.826.0.1.3680043.2.1143.99",
        "SPS1",
        "ACC-SPS1",
        (patient.name, patient.patient_id, patient.birth_date, "O"),
    )


def completed(patient: Patient) -> Dataset:
    """An N-SET modification list ending the step (PS3.4 F.7.2.2), naming the patient again."""
    ds = mpps_completed()
    ds.PatientName = patient.name  # not settable: must be the same value, and is
    return ds


PYDICOM_READS = """
import sys
from io import BytesIO
from pydicom import config, dcmread
from pydicom.data import get_testdata_file
from pydicom.valuerep import validate_value
from dicomnode.cli import setup_logging

setup_logging(0, "INFO")
ds = dcmread(get_testdata_file("CT_small.dcm"))
config.settings.writing_validation_mode = config.IGNORE
ds.PatientBirthDate, ds.PatientID = sys.argv[1], sys.argv[2]
buffer = BytesIO()
ds.save_as(buffer)
buffer.seek(0)
config.settings.writing_validation_mode = config.WARN
read = dcmread(buffer)
print(read.PatientBirthDate, read.PatientID)
validate_value("IS", sys.argv[2], config.WARN)  # too long, and not a number
"""


def test_pydicom_quoting_invalid_values_is_withheld() -> None:
    """pydicom logs a value it finds invalid at WARNING, quoted, and repeats it as a Python
    warning; the node's logging keeps the line, without the value, and drops the repeat."""
    canary = Canary("19370611")
    p = canary.patient
    dashed = f"{p.birth_date[:4]}-{p.birth_date[4:6]}-{p.birth_date[6:]}"  # not a DA
    done = subprocess.run(
        [sys.executable, "-c", PYDICOM_READS, dashed, p.patient_id],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [dashed, p.patient_id]  # the values were read, as they are
    assert "WARNING pydicom: Invalid value for VR DA (value withheld from the log)" in done.stderr
    assert "VR IS (value withheld from the log)" in done.stderr
    assert "UserWarning" not in done.stderr
    assert not leaks(done.stderr, [canary]), done.stderr
