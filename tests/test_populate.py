"""tests/support/populate.py: the generated hierarchy is what it says, its Probe is right, and an
index written by populate_dicomnode holds the rows C-STORE would write and answers C-FIND over a
real association exactly as for stored instances."""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicomnode.status import Status
from tests.support.dimse import associate, store_file
from tests.support.node import RunningNode, run_node
from tests.support.populate import (
    CT_IMAGE_STORAGE,
    IMAGE,
    PATIENT,
    SERIES,
    SHAPE,
    STUDY,
    Probe,
    counts,
    hierarchy,
    populate_dicomnode,
    probe,
)

PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
QUERYING = ["echo", "store", "find"]
UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
SIZE = 1234  # not a multiple of the shape: a partial last series, study and patient


def test_hierarchy_shape_and_values() -> None:
    entities = list(hierarchy(SIZE))
    assert entities == list(hierarchy(SIZE))  # deterministic
    by_level = Counter(e.level for e in entities)
    n = counts(SIZE)
    assert by_level == {PATIENT: n.patients, STUDY: n.studies, SERIES: n.series, IMAGE: SIZE}
    assert n.series == -(-SIZE // SHAPE.instances_per_series)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        values = [e.attrs[key] for e in entities if key in e.attrs]
        assert len(set(values)) == len(values), key
        assert all(UID.fullmatch(v) and len(v) <= 64 for v in values), key
    patients = [e.attrs for e in entities if e.level == PATIENT]
    families = [p["PatientName"].split("^")[0] for p in patients]
    assert len(set(families)) == len(families)
    assert all(re.fullmatch(r"[A-Z]{10}\^[A-Z]+", p["PatientName"]) for p in patients)
    studies = [e.attrs for e in entities if e.level == STUDY]
    assert len({s["AccessionNumber"] for s in studies}) == len(studies)
    assert all(re.fullmatch(r"(19|20)\d{6}", s["StudyDate"]) for s in studies)
    assert all(e.attrs["SOPClassUID"] == CT_IMAGE_STORAGE for e in entities if e.level == IMAGE)


def test_probe_counts_match_the_hierarchy() -> None:
    p = probe(SIZE)
    entities = list(hierarchy(SIZE))
    patient_of_study: dict[int, int] = {}
    study_of_series: dict[int, int] = {}
    names: dict[int, str] = {}
    for e in entities:
        if e.level == PATIENT:
            names[e.index] = e.attrs["PatientName"]
        elif e.level == STUDY:
            assert e.parent is not None
            patient_of_study[e.index] = e.parent
        elif e.level == SERIES:
            assert e.parent is not None
            study_of_series[e.index] = e.parent
    studies = {e.index: e.attrs for e in entities if e.level == STUDY}
    named = {i for i, name in names.items() if name.startswith(p.name_prefix)}
    assert len(named) == p.name_prefix_patients >= 1
    assert sum(1 for s in patient_of_study.values() if s in named) == p.name_prefix_studies
    low, high = p.date_range.split("-")
    in_range = [s for s in studies.values() if low <= s["StudyDate"] <= high]
    assert len(in_range) == p.date_range_studies
    assert 1 <= p.date_range_studies <= 12  # "a few", at any size
    (study,) = [i for i, s in studies.items() if s["StudyInstanceUID"] == p.study_uid]
    assert studies[study]["AccessionNumber"] == p.accession_number
    assert studies[study]["StudyDate"] == p.study_date
    patient = patient_of_study[study]
    assert names[patient] == p.patient_name
    assert list(patient_of_study.values()).count(patient) == p.studies_per_patient
    assert list(study_of_series.values()).count(study) == p.series_per_study
    series_uids = {e.index: e.attrs["SeriesInstanceUID"] for e in entities if e.level == SERIES}
    (series,) = [i for i, uid in series_uids.items() if uid == p.series_uid]
    images = [e for e in entities if e.level == IMAGE and e.parent == series]
    assert len(images) == p.instances_per_series
    assert images[0].attrs["SOPInstanceUID"] == p.sop_instance_uid
    assert (p.patients, p.studies, p.series) == (len(names), len(studies), len(series_uids))


def as_dataset(entities: list[Any]) -> Dataset:
    """The one instance of ``hierarchy(1)`` as a real CT data set (CT_small's pixels)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for entity in entities:
        for keyword, value in entity.attrs.items():
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_populated_rows_equal_stored_rows(tmp_path: Path) -> None:
    """The same instance, once populated and once sent by C-STORE: identical index rows."""
    entities = list(hierarchy(1))
    path = tmp_path / "one.dcm"
    as_dataset(entities).save_as(path, enforce_file_format=True)
    ct = [(CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1"])]
    with run_node(tmp_path / "stored") as node, associate(node, ct) as assoc:
        assert store_file(assoc, path) == Status.SUCCESS
    populated = tmp_path / "populated.sqlite"
    populate_dicomnode(populated, 1)
    skip = {"id", "path", "file_size", "received_from", "received_at", "transfer_syntax"}

    def rows(database: Path) -> dict[str, list[dict[str, Any]]]:
        con = sqlite3.connect(database)
        con.row_factory = sqlite3.Row
        try:
            return {
                table: [
                    {k: r[k] for k in r.keys() if k not in skip}  # noqa: SIM118 - sqlite3.Row
                    for r in con.execute(f"SELECT * FROM {table} ORDER BY id")  # noqa: S608
                ]
                for table in ("patient", "study", "series", "instance", "person_name")
            }
        finally:
            con.close()

    assert rows(populated) == rows(tmp_path / "stored" / "index.sqlite")


# --- C-FIND over a populated index ---------------------------------------------------------------

POPULATED = 4000


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningNode, Probe]]:
    root = tmp_path_factory.mktemp("populated")
    p = populate_dicomnode(root / "index.sqlite", POPULATED)
    with run_node(root, unknown_peers=QUERYING) as node:
        yield node, p


def find(node: RunningNode, model: str, keys: dict[str, Any]) -> list[Dataset]:
    ae = AE(ae_title="PYFIND")
    ae.add_requested_context(model)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    answers, final = [], -1
    try:
        for status, answer in assoc.send_c_find(identifier, model):
            if status.Status in (Status.PENDING, Status.PENDING_WARNING):
                answers.append(answer)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
        ae.shutdown()
    assert final == Status.SUCCESS
    return answers


def expected_studies(**where: Any) -> set[str]:
    """StudyInstanceUIDs of hierarchy(POPULATED) matching ``where`` (an oracle, in Python)."""
    patients: dict[int, dict[str, Any]] = {}
    found = set()
    for e in hierarchy(POPULATED):
        if e.level == PATIENT:
            patients[e.index] = e.attrs
        elif e.level == STUDY:
            assert e.parent is not None
            attrs = {**patients[e.parent], **e.attrs}
            if all(test(attrs) for test in where.values()):
                found.add(attrs["StudyInstanceUID"])
    return found


def test_populated_index_answers_each_key_at_each_level(
    populated: tuple[RunningNode, Probe],
) -> None:
    node, p = populated
    study = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "PatientID": "",
             "PatientName": "", "StudyDate": "", "AccessionNumber": "", "ModalitiesInStudy": "",
             "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""}  # fmt: skip
    low, high = p.date_range.split("-")
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"PatientID": p.patient_id},
         expected_studies(i=lambda a: a["PatientID"] == p.patient_id)),
        ({"PatientName": p.name_prefix.lower() + "*"},
         expected_studies(n=lambda a: a["PatientName"].startswith(p.name_prefix))),
        ({"StudyDate": p.date_range}, expected_studies(d=lambda a: low <= a["StudyDate"] <= high)),
        ({"AccessionNumber": p.accession_number}, {p.study_uid}),
        ({"PatientName": p.name_prefix[:1] + "*", "StudyDate": p.date_range},
         expected_studies(d=lambda a: low <= a["StudyDate"] <= high,
                          n=lambda a: a["PatientName"].startswith(p.name_prefix[:1]))),
        ({"StudyDate": f"{low}-", "AccessionNumber": p.accession_number}, {p.study_uid}),
        ({"PatientID": p.missing_patient_id}, set()),
        ({"PatientName": p.missing_name_prefix + "*"}, set()),
        ({"StudyDate": p.missing_date_range}, set()),
    ]  # fmt: skip
    assert len(cases[0][1]) == p.studies_per_patient
    assert len(cases[1][1]) == p.name_prefix_studies
    assert len(cases[2][1]) == p.date_range_studies
    for keys, expected in cases:
        answers = find(node, STUDY_ROOT, {**study, **keys})
        assert {str(a.StudyInstanceUID) for a in answers} == expected, keys
    (answer,) = find(node, STUDY_ROOT, {**study, "StudyInstanceUID": p.study_uid})
    assert answer.PatientID == p.patient_id
    assert str(answer.PatientName) == p.patient_name
    assert answer.StudyDate == p.study_date
    assert answer.AccessionNumber == p.accession_number
    assert answer.ModalitiesInStudy == "CT"
    assert int(answer.NumberOfStudyRelatedSeries) == p.series_per_study
    assert int(answer.NumberOfStudyRelatedInstances) == p.instances_per_study
    series = find(node, STUDY_ROOT, {
        "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": p.study_uid, "PatientID": p.patient_id,
        "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": "", "Modality": "",
    })  # fmt: skip
    assert len(series) == p.series_per_study
    assert p.series_uid in {str(a.SeriesInstanceUID) for a in series}
    assert all(int(a.NumberOfSeriesRelatedInstances) == p.instances_per_series for a in series)
    images = find(node, STUDY_ROOT, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": p.study_uid,
        "SeriesInstanceUID": p.series_uid, "StudyDate": p.date_range,
        "SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": "",
    })  # fmt: skip
    assert len(images) == p.instances_per_series
    assert p.sop_instance_uid in {str(a.SOPInstanceUID) for a in images}
    assert {str(a.SOPClassUID) for a in images} == {CT_IMAGE_STORAGE}
    patients = find(node, PATIENT_ROOT, {
        "QueryRetrieveLevel": "PATIENT", "PatientName": p.name_prefix + "*", "PatientID": "",
        "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedInstances": "",
    })  # fmt: skip
    assert len(patients) == p.name_prefix_patients
    mine = next(a for a in patients if a.PatientID == p.patient_id)
    assert int(mine.NumberOfPatientRelatedStudies) == p.studies_per_patient
    assert int(mine.NumberOfPatientRelatedInstances) == p.studies_per_patient * (
        SHAPE.instances_per_study
    )
    studies = find(node, PATIENT_ROOT, {
        "QueryRetrieveLevel": "STUDY", "PatientID": p.patient_id, "StudyDate": p.study_date,
        "StudyInstanceUID": "",
    })  # fmt: skip
    assert p.study_uid in {str(a.StudyInstanceUID) for a in studies}
