"""C-FIND SCP against DCMTK findscu and pynetdicom, over a node holding pydicom's real files.

The expected answers are computed here, independently, from the same files with pydicom, so a
matching bug in the node cannot hide behind its own logic.
"""

from __future__ import annotations

import fnmatch
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicomnode.status import Status
from tests.conftest import require_dcmtk
from tests.support.corpus import CHARSET_FILES, TEST_FILES
from tests.support.node import RunningNode, run_node

PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
QUERYING = ["echo", "store", "find"]


def special_patients(folder: Path) -> list[Path]:
    """Instances whose names hold characters that are special in SQL and GLOB."""
    paths = []
    for i, name in enumerate(["O'Brien_%[x]^Ann", "OXBrien^Bob", "Back\\slash", "Star*Name"]):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientName = name
        ds.PatientID = f"SPECIAL{i}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"special{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass
class Held:
    """What the node was sent, read back with pydicom: the oracle."""

    datasets: list[Dataset]

    def studies(self) -> dict[str, Dataset]:
        return {str(ds.StudyInstanceUID): ds for ds in self.datasets}

    def study_uids(self, **where: str) -> set[str]:
        return {
            uid
            for uid, ds in self.studies().items()
            if all(_matches(ds, k, v) for k, v in where.items())
        }


def _matches(ds: Dataset, keyword: str, pattern: str) -> bool:
    value = str(ds.get(keyword, "") or "")
    if keyword == "PatientName":
        groups = value.split("=")
        return any(fnmatch.fnmatchcase(g.casefold(), pattern.casefold()) for g in groups)
    return fnmatch.fnmatchcase(value, pattern)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningNode, Held]]:
    root = tmp_path_factory.mktemp("find")
    files = [p for p in (TEST_FILES / "dicomdirtests").rglob("*") if p.is_file()]
    files += sorted(CHARSET_FILES.glob("chr*.dcm"))
    files += [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))]
    files += special_patients(root)
    with run_node(root / "node", unknown_peers=QUERYING) as node:
        done = subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", "send", node.address, *map(str, files)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        stored = {r["sop_instance_uid"] for r in node.rows("SELECT sop_instance_uid FROM instance")}
        held = []
        for path in files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: S112 - DICOMDIRs and non-instances
                continue
            if str(ds.get("SOPInstanceUID", "")) in stored:
                held.append(ds)
        yield node, Held(held)


def findscu(node: RunningNode, out: Path, *args: str) -> list[Dataset]:
    """Run DCMTK findscu, extracting every response to a file, and read them back."""
    require_dcmtk("findscu")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    done = subprocess.run(
        ["findscu", "-aec", node.ae_title, "-X", "-od", str(out), *args, node.host, str(node.port)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert done.returncode == 0, done.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def find(
    node: RunningNode, model: str, keys: dict[str, object], charset: str | None = None
) -> tuple[list[Dataset], int]:
    """C-FIND with pynetdicom: the matches and the final status."""
    ae = AE(ae_title="PYFIND")
    ae.add_requested_context(model)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    if charset:
        identifier.SpecificCharacterSet = charset
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    matches, final = [], -1
    try:
        for status, answer in assoc.send_c_find(identifier, model):
            if status.Status in (Status.PENDING, Status.PENDING_WARNING):
                matches.append(answer)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
        ae.shutdown()
    return matches, final


def uids(answers: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(a.get(keyword)) for a in answers}


# --- DCMTK findscu ------------------------------------------------------------------------------


def test_study_root_name_wildcard_is_case_insensitive(
    loaded: tuple[RunningNode, Held], tmp_path: Path
) -> None:
    node, held = loaded
    answers = findscu(
        node,
        tmp_path,
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientName=doe*",
        "-k",
        "StudyInstanceUID",
        "-k",
        "PatientID",
        "-k",
        "PatientBirthDate",
    )
    expected = held.study_uids(PatientName="doe*")
    assert len(expected) >= 5
    assert uids(answers) == expected
    for answer in answers:
        study = held.studies()[str(answer.StudyInstanceUID)]
        assert str(answer.PatientName).casefold().startswith("doe")
        assert answer.PatientID == study.PatientID
        assert "PatientBirthDate" in answer  # asked for: returned, empty if unknown
        assert answer.QueryRetrieveLevel == "STUDY"


def test_patient_root_each_level(loaded: tuple[RunningNode, Held], tmp_path: Path) -> None:
    node, held = loaded
    patient_id = "77654033"
    mine = [ds for ds in held.datasets if ds.PatientID == patient_id]
    patients = findscu(
        node,
        tmp_path / "p",
        "-P",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        f"PatientID={patient_id}",
        "-k",
        "PatientName",
        "-k",
        "NumberOfPatientRelatedStudies",
        "-k",
        "NumberOfPatientRelatedInstances",
    )
    assert len(patients) == 1
    assert int(patients[0].NumberOfPatientRelatedStudies) == len(
        {ds.StudyInstanceUID for ds in mine}
    )
    assert int(patients[0].NumberOfPatientRelatedInstances) == len(mine)
    studies = findscu(
        node,
        tmp_path / "st",
        "-P",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"PatientID={patient_id}",
        "-k",
        "StudyInstanceUID",
        "-k",
        "NumberOfStudyRelatedSeries",
        "-k",
        "ModalitiesInStudy",
    )
    assert uids(studies) == {ds.StudyInstanceUID for ds in mine}
    study = sorted(studies, key=lambda a: a.StudyInstanceUID)[0]
    in_study = [ds for ds in mine if ds.StudyInstanceUID == study.StudyInstanceUID]
    assert int(study.NumberOfStudyRelatedSeries) == len({ds.SeriesInstanceUID for ds in in_study})
    assert set(study.ModalitiesInStudy if isinstance(study.ModalitiesInStudy, list) else
               [study.ModalitiesInStudy]) == {ds.Modality for ds in in_study}  # fmt: skip
    series = findscu(
        node,
        tmp_path / "se",
        "-P",
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"PatientID={patient_id}",
        "-k",
        f"StudyInstanceUID={study.StudyInstanceUID}",
        "-k",
        "SeriesInstanceUID",
        "-k",
        "Modality",
        "-k",
        "NumberOfSeriesRelatedInstances",
    )
    assert uids(series, "SeriesInstanceUID") == {ds.SeriesInstanceUID for ds in in_study}
    one = series[0]
    in_series = [ds for ds in in_study if ds.SeriesInstanceUID == one.SeriesInstanceUID]
    assert int(one.NumberOfSeriesRelatedInstances) == len(in_series)
    images = findscu(
        node,
        tmp_path / "im",
        "-P",
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"PatientID={patient_id}",
        "-k",
        f"StudyInstanceUID={study.StudyInstanceUID}",
        "-k",
        f"SeriesInstanceUID={one.SeriesInstanceUID}",
        "-k",
        "SOPInstanceUID",
        "-k",
        "SOPClassUID",
        "-k",
        "InstanceNumber",
    )
    assert uids(images, "SOPInstanceUID") == {ds.SOPInstanceUID for ds in in_series}
    for image in images:
        source = next(ds for ds in in_series if ds.SOPInstanceUID == image.SOPInstanceUID)
        assert image.SOPClassUID == source.SOPClassUID
        assert str(image.InstanceNumber) == str(source.InstanceNumber)


def test_study_root_series_and_image_levels(
    loaded: tuple[RunningNode, Held], tmp_path: Path
) -> None:
    node, held = loaded
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = findscu(
        node,
        tmp_path / "se",
        "-S",
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={ct.StudyInstanceUID}",
        "-k",
        "SeriesInstanceUID",
        "-k",
        "Modality=CT",
        "-k",
        "SeriesNumber",
    )
    assert uids(series, "SeriesInstanceUID") == {
        ds.SeriesInstanceUID for ds in held.datasets
        if ds.StudyInstanceUID == ct.StudyInstanceUID and ds.Modality == "CT"
    }  # fmt: skip
    images = findscu(
        node,
        tmp_path / "im",
        "-S",
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"StudyInstanceUID={ct.StudyInstanceUID}",
        "-k",
        f"SeriesInstanceUID={ct.SeriesInstanceUID}",
        "-k",
        "SOPInstanceUID",
    )
    assert ct.SOPInstanceUID in uids(images, "SOPInstanceUID")


def test_uid_list_date_range_and_modalities(
    loaded: tuple[RunningNode, Held], tmp_path: Path
) -> None:
    node, held = loaded
    two = sorted(held.studies())[:2]
    answers = findscu(
        node,
        tmp_path / "l",
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={two[0]}\\{two[1]}",
    )
    assert uids(answers) == set(two)
    for value, low, high in [
        ("20010101-", "20010101", "99999999"),
        ("-20010101", "00000000", "20010101"),
        ("19950101-20020101", "19950101", "20020101"),
        ("20030505", "20030505", "20030505"),
    ]:
        answers = findscu(
            node,
            tmp_path / value,
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyDate={value}",
            "-k",
            "StudyInstanceUID",
        )
        expected = {
            uid for uid, ds in held.studies().items()
            if ds.get("StudyDate") and low <= ds.StudyDate <= high
        }  # fmt: skip
        assert expected, value
        assert uids(answers) == expected, value
    answers = findscu(
        node,
        tmp_path / "m",
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "ModalitiesInStudy=CR",
        "-k",
        "StudyInstanceUID",
    )
    assert uids(answers) == {uid for uid, ds in held.studies().items() if ds.Modality == "CR"}


def test_combined_date_time_range(loaded: tuple[RunningNode, Held]) -> None:
    """PS3.4 C.2.2.2.5.1: StudyDate and StudyTime ranges together are one date-time range."""
    node, held = loaded
    studies = [ds for ds in held.studies().values() if ds.get("StudyDate") and ds.get("StudyTime")]
    target = studies[0]
    date, time = target.StudyDate, target.StudyTime
    stamp = date + str(time)[:6].ljust(6, "0")
    answers, final = find(
        node, STUDY_ROOT,
        {"QueryRetrieveLevel": "STUDY", "StudyDate": f"{date}-{date}",
         "StudyTime": f"{str(time)[:6]}-", "StudyInstanceUID": ""},
    )  # fmt: skip
    assert final == Status.SUCCESS
    expected = {
        str(ds.StudyInstanceUID) for ds in studies
        if (ds.StudyDate + str(ds.StudyTime)[:6].ljust(6, "0")) >= stamp and ds.StudyDate == date
    }  # fmt: skip
    assert uids(answers) == expected and target.StudyInstanceUID in expected


@pytest.mark.parametrize(
    "keys",
    [
        {"PatientName": "doe*", "StudyDate": "19950101-"},
        {"PatientName": "d*", "StudyDate": "20010101-20010101"},
        {"PatientName": "doe^peter", "AccessionNumber": "2"},
        {"PatientID": "9889*", "StudyDate": "20030101-", "AccessionNumber": "1*"},
        {"PatientID": "7765403?", "PatientName": "*ARCH*", "StudyDate": "-20301231"},
        {"AccessionNumber": "2", "StudyDate": "20010101"},
        {"PatientName": "*", "StudyDate": "19000101-", "PatientID": "*"},
        {"StudyDate": "20010101", "SOPClassesInStudy": "1.2.840.10008.5.1.4.1.1.1"},
        {"PatientName": "doe*", "SOPClassesInStudy": "1.2.840.10008.5.1.4.1.1.4"},
        {"PatientName": "zz*", "StudyDate": "19950101-"},
    ],
)
def test_several_keys_match_together(
    loaded: tuple[RunningNode, Held], keys: dict[str, str]
) -> None:
    """With several indexed keys the narrowest drives the SQL and the others are checked on its
    rows (dicomnode.index.query._where): the matches are still exactly those of every key."""
    node, held = loaded

    def matches(ds: Dataset, keyword: str, value: str) -> bool:
        if keyword == "StudyDate":
            low, dash, high = value.partition("-")
            date = str(ds.get("StudyDate", "") or "")
            return bool(date) and (low or "0") <= date <= ((high or "9") if dash else low)
        if keyword == "SOPClassesInStudy":
            return any(
                str(other.SOPClassUID) == value
                for other in held.datasets
                if other.StudyInstanceUID == ds.StudyInstanceUID
            )
        return value == "*" or _matches(ds, keyword, value)

    expected = {
        str(ds.StudyInstanceUID)
        for ds in held.datasets
        if all(matches(ds, k, v) for k, v in keys.items())
    }
    answers, final = find(
        node, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", **keys}
    )
    assert final == Status.SUCCESS
    assert uids(answers) == expected


def test_special_characters_are_literal(loaded: tuple[RunningNode, Held], tmp_path: Path) -> None:
    """% _ ' \\ and [ in a query are literal characters; only * and ? are wildcards."""
    node, _ = loaded
    cases = {
        "O'Brien_%[x]^Ann": {"SPECIAL0"},
        "O'Brien_*": {"SPECIAL0"},
        "o?brien*": {"SPECIAL0", "SPECIAL1"},
        "O_Brien*": set(),
        "%": set(),
        "Star*": {"SPECIAL3"},
    }
    for pattern, expected in cases.items():
        answers, final = find(
            node, PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientName": pattern,
                                 "PatientID": ""},
        )  # fmt: skip
        assert final == Status.SUCCESS, pattern
        assert uids(answers, "PatientID") == expected, pattern


# --- character sets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "pattern", "expected"),
    [
        (None, "yamada*", {"chrH31.dcm"}),
        ("ISO_IR 192", "山田*", {"chrH31.dcm", "chrH32.dcm"}),
        (["ISO 2022 IR 6", "ISO 2022 IR 87"], "山田*", {"chrH31.dcm", "chrH32.dcm"}),
        ("ISO_IR 144", "люк*", {"chrRuss.dcm"}),
        ("ISO_IR 100", "äneas*", {"chrGerm.dcm"}),
        ("ISO_IR 192", "홍*", {"chrI2.dcm"}),
    ],
)
def test_non_ascii_names(
    loaded: tuple[RunningNode, Held], charset: object, pattern: str, expected: set[str]
) -> None:
    """Queries in the caller's character set (ISO 2022 multi-byte included) match names held as
    Unicode, case-insensitively, per component group; answers come back in UTF-8, intact."""
    node, _ = loaded
    names = {
        p.name: str(pydicom.dcmread(p).get("PatientName", ""))
        for p in CHARSET_FILES.glob("chr*.dcm")
    }
    answers, final = find(
        node, PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientName": pattern},
        charset=charset,  # type: ignore[arg-type]
    )  # fmt: skip
    assert final == Status.SUCCESS
    assert {str(a.PatientName) for a in answers} == {names[f] for f in expected}
    for answer in answers:
        assert answer.SpecificCharacterSet == "ISO_IR 192"


def test_dcmtk_reads_utf8_answers(loaded: tuple[RunningNode, Held], tmp_path: Path) -> None:
    node, _ = loaded
    answers = findscu(
        node,
        tmp_path,
        "-P",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        "SpecificCharacterSet=ISO_IR 192",
        "-k",
        "PatientName=Wang*",
    )
    assert sorted(str(a.PatientName) for a in answers) == [
        "Wang^XiaoDong=王^小东", "Wang^XiaoDong=王^小東",
    ]  # fmt: skip


# --- bad identifiers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "keys", "status", "reason"),
    [
        (STUDY_ROOT, {"QueryRetrieveLevel": "FOO"}, Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
         "'FOO' is not one of STUDY, SERIES, IMAGE"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "PATIENT"},
         Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "for the study root model"),
        (STUDY_ROOT, {"PatientName": "*"}, Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
         "'(missing)'"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": ""},
         Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "must carry a single StudyInstanceUID"),
        (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientID": "A*"},
         Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "must carry a single PatientID"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"},
         Status.UNABLE_TO_PROCESS, "never wildcards"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "2024-01"},
         Status.UNABLE_TO_PROCESS, "is not a date or date range"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyTime": "25x-"},
         Status.UNABLE_TO_PROCESS, "is not a time"),
    ],
)  # fmt: skip
def test_bad_identifier_gets_failure_and_reason(
    loaded: tuple[RunningNode, Held], model: str, keys: dict[str, object], status: Status,
    reason: str,
) -> None:  # fmt: skip
    node, _ = loaded
    answers, final = find(node, model, keys)
    assert answers == []
    assert final == status
    assert reason in node.wait_for_log(reason)
    # The node goes on answering.
    ok, final = find(node, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""})
    assert final == Status.SUCCESS and ok


def test_match_cap_refuses_before_answering(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", unknown_peers=QUERYING, query={"max_matches": 1}) as node:
        files = [str(p) for p in sorted((TEST_FILES / "dicomdirtests" / "77654033").rglob("*"))
                 if p.is_file()]  # fmt: skip
        sent = subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", "send", node.address, *files],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        answers, final = find(node, PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT"})
        assert final == Status.SUCCESS and len(answers) == 1
        answers, final = find(node, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY"})
        assert node.rows("SELECT COUNT(*) AS n FROM study")[0]["n"] == 2
        assert final == Status.OUT_OF_RESOURCES and answers == []
        node.wait_for_log("more than 1 matches (query.max_matches)")


def test_cancel_stops_the_answers(tmp_path: Path) -> None:
    """C-CANCEL (PS3.4 C.4.1.2.3) ends a long answer with status FE00. The series holds 3000
    instances, written into the node's real index directly (as the benchmark issue allows for
    large indexes) so the answer outlasts the cancel."""
    with run_node(tmp_path / "node", unknown_peers=QUERYING) as node:
        ct = Path(get_testdata_file("CT_small.dcm"))
        sent = subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", "send", node.address, str(ct)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0
        con = sqlite3.connect(node.database)
        series_id = con.execute("SELECT series_id FROM instance").fetchone()[0]
        con.executemany(
            "INSERT INTO instance (series_id, sop_instance_uid, sop_class_uid, transfer_syntax,"
            " file_size, path, received_from, received_at) VALUES (?, ?, ?, ?, 0, ?, '', '')",
            [(series_id, f"1.2.3.{i}", SC, "1.2.840.10008.1.2.1", f"fake/{i}")
             for i in range(3000)],
        )  # fmt: skip
        con.commit()
        con.close()
        ds = pydicom.dcmread(ct, stop_before_pixels=True)
        ae = AE(ae_title="PYFIND")
        ae.add_requested_context(STUDY_ROOT)
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = ds.StudyInstanceUID
        identifier.SeriesInstanceUID = ds.SeriesInstanceUID
        identifier.SOPInstanceUID = ""
        pending, final = 0, -1
        try:
            responses = assoc.send_c_find(identifier, STUDY_ROOT, msg_id=7)
            for status, _ in responses:
                if status.Status == Status.PENDING:
                    pending += 1
                    if pending == 1:
                        assoc.send_c_cancel(7, query_model=STUDY_ROOT)
                else:
                    final = int(status.Status)
        finally:
            assoc.release()
            ae.shutdown()
        assert final == Status.CANCEL
        assert 1 <= pending < 3001
        node.wait_for_log("cancelled after")


def test_case_sensitive_names_when_configured(tmp_path: Path) -> None:
    with run_node(
        tmp_path / "node", unknown_peers=QUERYING, query={"case_sensitive_names": True}
    ) as node:
        sent = subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", "send", node.address,
             str(get_testdata_file("CT_small.dcm"))],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        ae = AE(ae_title="PYFIND")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.2.1.1")
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        found = {}
        for pattern in ("compressed*", "CompressedSamples*"):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "PATIENT"
            identifier.PatientName = pattern
            responses = list(assoc.send_c_find(identifier, "1.2.840.10008.5.1.4.1.2.1.1"))
            found[pattern] = sum(1 for s, _ in responses if s.Status == Status.PENDING)
        assoc.release()
        ae.shutdown()
        assert found == {"compressed*": 0, "CompressedSamples*": 1}
