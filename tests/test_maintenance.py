"""Archive maintenance as an operator runs it: ``dicomnode index rebuild``, ``index verify``,
``stats`` and ``delete`` on the command line, against a real node holding real files sent with
DCMTK storescu, its real index file, and C-FIND answers over real associations.

The expected numbers are computed here from the files sent and the files on disk (read with
pydicom), not from the index being checked.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicomnode.status import ExitCode, Status
from tests.support.corpus import TEST_FILES
from tests.support.dcmtk import Endpoint, storescu
from tests.support.node import RunningNode, run_node

PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
SETTINGS: dict[str, Any] = {"unknown_peers": ["echo", "store", "find"]}


def dicomdir_files() -> list[Path]:
    """pydicom's dicomdirtests instances: 3 patients, several studies and series, CT/MR/CR."""
    return sorted(
        p
        for p in (TEST_FILES / "dicomdirtests").rglob("*")
        if p.is_file() and not p.name.startswith(("DICOMDIR", "README"))
    )


def sample_files() -> list[Path]:
    return [
        *dicomdir_files(),
        Path(get_testdata_file("CT_small.dcm")),
        Path(get_testdata_file("MR_small.dcm")),
    ]


def send(node: RunningNode, files: list[Path], calling: str = "STORESCU") -> None:
    storescu(Endpoint(node.ae_title, node.host, node.port), files, options=["-aet", calling])


def cli(
    node: RunningNode, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m dicomnode.cli --config <node's> ARGS``, with ``stdin`` for a prompt."""
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(node.config_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        input=stdin if stdin is not None else "",
    )


def audit_records(node: RunningNode, event: str) -> list[dict[str, Any]]:
    path = node.root / "var" / "audit.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["event"] == event]


def write_db(node: RunningNode, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Change the node's index behind its back (planting a fault), in one transaction."""
    con = sqlite3.connect(node.database, timeout=10)
    try:
        with con:
            for sql, params in statements:
                con.execute(sql, params)
    finally:
        con.close()


# --- C-FIND answers at every level --------------------------------------------------------------

PATIENT_KEYS = {
    "PatientID": "", "PatientName": "", "PatientBirthDate": "", "PatientSex": "",
    "NumberOfPatientRelatedStudies": None, "NumberOfPatientRelatedSeries": None,
    "NumberOfPatientRelatedInstances": None,
}  # fmt: skip
STUDY_KEYS = {
    "StudyInstanceUID": "", "StudyDate": "", "StudyTime": "", "AccessionNumber": "",
    "StudyID": "", "StudyDescription": "", "PatientID": "", "PatientName": "",
    "ReferringPhysicianName": "", "ModalitiesInStudy": "", "SOPClassesInStudy": "",
    "NumberOfStudyRelatedSeries": None, "NumberOfStudyRelatedInstances": None,
}  # fmt: skip
SERIES_KEYS = {
    "SeriesInstanceUID": "", "Modality": "", "SeriesNumber": None, "SeriesDescription": "",
    "NumberOfSeriesRelatedInstances": None,
}  # fmt: skip
IMAGE_KEYS = {"SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": None}

Answer = tuple[tuple[str, str], ...]


def _flat(ds: Dataset) -> Answer:
    return tuple(sorted((e.keyword, str(e.value)) for e in ds if e.keyword))


def _query(assoc: Any, model: str, level: str, keys: dict[str, Any]) -> list[Answer]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    matches, final = [], None
    for status, answer in assoc.send_c_find(identifier, model):
        if status.Status in (Status.PENDING, Status.PENDING_WARNING):
            matches.append(_flat(answer))
        else:
            final = int(status.Status)
    assert final == Status.SUCCESS
    return sorted(matches)


def answers(node: RunningNode) -> dict[str, list[Answer]]:
    """Every patient, study, series and instance, as C-FIND answers them (one association)."""
    ae = AE(ae_title="PYFIND")
    ae.add_requested_context(PATIENT_ROOT)
    ae.add_requested_context(STUDY_ROOT)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        found: dict[str, list[Answer]] = {
            "patient": _query(assoc, PATIENT_ROOT, "PATIENT", PATIENT_KEYS),
            "study": _query(assoc, STUDY_ROOT, "STUDY", STUDY_KEYS),
            "series": [],
            "image": [],
        }
        for study in found["study"]:
            study_uid = dict(study)["StudyInstanceUID"]
            series = _query(
                assoc, STUDY_ROOT, "SERIES", {**SERIES_KEYS, "StudyInstanceUID": study_uid}
            )
            found["series"] += [(("StudyInstanceUID", study_uid), *s) for s in series]
            for one in series:
                keys = {
                    **IMAGE_KEYS,
                    "StudyInstanceUID": study_uid,
                    "SeriesInstanceUID": dict(one)["SeriesInstanceUID"],
                }
                found["image"] += _query(assoc, STUDY_ROOT, "IMAGE", keys)
    finally:
        assoc.release()
        ae.shutdown()
    found["series"].sort()
    found["image"].sort()
    return found


# --- index rebuild --------------------------------------------------------------------------------


def test_rebuild_after_losing_the_database_gives_the_same_answers(tmp_path: Path) -> None:
    root = tmp_path / "node"
    files = sample_files()
    with run_node(root, **SETTINGS) as node:
        send(node, files)
        before = answers(node)
        stored = node.stored_files()
    assert len(before["image"]) == len(files) == len(stored)
    assert len(before["patient"]) == 5 and len(before["study"]) >= 7

    # The index still exists: refused, and left as it was.
    refused = cli(node, "index", "rebuild")
    assert refused.returncode == ExitCode.FAILURE, refused.stdout + refused.stderr
    assert "exists and is not empty" in refused.stderr and "--force" in refused.stderr
    assert node.rows("SELECT COUNT(*) AS n FROM instance")[0]["n"] == len(files)

    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (root / name).unlink(missing_ok=True)
    rebuilt = cli(node, "index", "rebuild")
    assert rebuilt.returncode == ExitCode.SUCCESS, rebuilt.stdout + rebuilt.stderr
    assert f"indexed {len(files)} of {len(files)} file(s)" in rebuilt.stdout
    assert "worklist items and MPPS records are not stored in files" in rebuilt.stdout
    assert not list(root.glob("index.sqlite.*"))  # no backup of a file that was not there

    with run_node(root, **SETTINGS) as node:
        assert answers(node) == before
        rows = node.rows("SELECT path, received_from FROM instance")
        assert sorted(node.root / "storage" / r["path"] for r in rows) == stored
        assert {r["received_from"] for r in rows} == {""}  # the sender is not in the file
        total = node.rows("SELECT instances, bytes FROM store_total")[0]
        assert (total["instances"], total["bytes"]) == (
            len(files),
            sum(p.stat().st_size for p in stored),
        )
        assert cli(node, "index", "verify").returncode == ExitCode.SUCCESS


def test_rebuild_with_force_keeps_a_backup_and_reports_unreadable_files(tmp_path: Path) -> None:
    root = tmp_path / "node"
    with run_node(root, **SETTINGS) as node:
        send(
            node, [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))]
        )
        added = cli(
            node, "worklist", "add", "--patient-name", "DOE^JOHN", "--patient-id", "P1",
            "--modality", "CT", "--date", "20261202", "--time", "0930",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
    junk = root / "storage" / "objects" / "ff" / "ff" / ("f" * 32 + ".dcm")
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"not a file meta group")
    cut = node.stored_files()[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # damaged: half a file
    old_rows = node.rows("SELECT sop_instance_uid FROM instance")

    done = cli(node, "index", "rebuild", "--force")
    assert done.returncode == ExitCode.WARNING, done.stdout + done.stderr
    assert "indexed 1 of 3 file(s)" in done.stdout
    skipped = [line for line in done.stdout.splitlines() if line.startswith("skipped ")]
    assert sorted(line.split()[1].rstrip(":") for line in skipped) == sorted(
        str(p.relative_to(root / "storage")) for p in (junk, cut)
    )
    # (with its write-ahead log beside it, if the old index had one)
    (backup,) = [
        p for p in root.glob("index.sqlite.bak-*") if not p.name.endswith(("-wal", "-shm"))
    ]
    assert f"kept as {backup}" in done.stdout
    # The backup is the old index, whole: its instances and the worklist item.
    con = sqlite3.connect(backup)
    try:
        assert len(con.execute("SELECT id FROM instance").fetchall()) == len(old_rows) == 2
        assert len(con.execute("SELECT id FROM worklist_item").fetchall()) == 1
    finally:
        con.close()
    assert node.rows("SELECT COUNT(*) AS n FROM worklist_item")[0]["n"] == 0
    assert node.rows("SELECT COUNT(*) AS n FROM instance")[0]["n"] == 1
    assert junk.exists() and cut.exists()  # skipped files are reported, never deleted


# --- index verify ---------------------------------------------------------------------------------


def _fresh_copy(source: Path, target: Path) -> str:
    """A copy of ``source`` as a new instance of a new study; returns its SOP Instance UID."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _verify(node: RunningNode, *options: str) -> tuple[int, dict[str, Any]]:
    done = cli(node, "index", "verify", "--json", *options)
    assert done.returncode in (ExitCode.SUCCESS, ExitCode.WARNING), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_verify_finds_planted_faults_and_repair_fixes_them(tmp_path: Path) -> None:
    ct_small = Path(get_testdata_file("CT_small.dcm"))
    mr_small = Path(get_testdata_file("MR_small.dcm"))
    with run_node(tmp_path / "node", **SETTINGS) as node:
        send(node, [*dicomdir_files()[:6], ct_small, mr_small])
        assert cli(node, "index", "verify").returncode == ExitCode.SUCCESS
        ct_uid = str(pydicom.dcmread(ct_small).SOPInstanceUID)
        mr_uid = str(pydicom.dcmread(mr_small).SOPInstanceUID)
        storage = node.storage
        # A file without a row: a Part 10 file in the store that the index never heard of.
        planted = storage / "objects" / "0a" / "0b" / ("0a0b" + "1" * 28 + ".dcm")
        planted_uid = _fresh_copy(ct_small, planted)
        # A row without its file: MR_small's file is gone (its study and patient with it).
        mr_row = node.instance(mr_uid)
        assert mr_row is not None
        (storage / mr_row["path"]).unlink()
        # A size mismatch: CT_small's row says 100 bytes more than its file has.
        write_db(
            node,
            (
                "UPDATE instance SET file_size = file_size + 100 WHERE sop_instance_uid = ?",
                (ct_uid,),
            ),
        )
        # A deletion a crash interrupted: the row is gone and its file journaled, not yet removed.
        victim = node.rows("SELECT id, path FROM instance ORDER BY id LIMIT 1")[0]
        write_db(
            node,
            (
                "INSERT INTO pending_delete (path, queued_at) VALUES (?, '2026-01-01')",
                (victim["path"],),
            ),
            ("DELETE FROM instance WHERE id = ?", (victim["id"],)),
        )
        # And the maintained total knocked off by one byte.
        write_db(node, ("UPDATE store_total SET bytes = bytes + 1", ()))

        code, report = _verify(node)
        assert code == ExitCode.WARNING
        found = sorted((f["kind"], f["path"]) for f in report["faults"])
        assert found == sorted([
            ("unindexed-file", str(planted.relative_to(storage))),
            ("missing-file", mr_row["path"]),
            ("size-mismatch", node.instance(ct_uid)["path"]),
            ("pending-deletion", victim["path"]),
            ("total", ""),
        ])  # fmt: skip
        assert not any(f["repaired"] for f in report["faults"])
        assert planted.exists() and (storage / victim["path"]).exists()  # verify changes nothing

        code, report = _verify(node, "--repair")
        assert code == ExitCode.SUCCESS, report
        assert all(f["repaired"] for f in report["faults"]) and len(report["faults"]) == 5

        code, report = _verify(node)
        assert (code, report["faults"]) == (ExitCode.SUCCESS, [])
        # What each repair did, seen in the index and on disk.
        indexed = node.instance(planted_uid)
        assert indexed is not None and indexed["path"] == str(planted.relative_to(storage))
        assert node.instance(mr_uid) is None
        assert node.rows("SELECT id FROM patient WHERE patient_id = '4MR1'") == []
        ct_row = node.instance(ct_uid)
        assert ct_row["file_size"] == (storage / ct_row["path"]).stat().st_size
        assert not (storage / victim["path"]).exists()
        assert node.rows("SELECT COUNT(*) AS n FROM pending_delete")[0]["n"] == 0
        on_disk = node.stored_files()
        total = node.rows("SELECT instances, bytes FROM store_total")[0]
        assert (total["instances"], total["bytes"]) == (
            len(on_disk),
            sum(p.stat().st_size for p in on_disk),
        )
        # The planted instance is now found by C-FIND, the lost one no more.
        images = {dict(a)["SOPInstanceUID"] for a in answers(node)["image"]}
        assert planted_uid in images and mr_uid not in images


def test_verify_never_deletes_damaged_or_unreadable_files(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", **SETTINGS) as node:
        send(node, dicomdir_files()[:3])
        damaged = node.stored_files()[0]
        damaged.write_bytes(damaged.read_bytes()[:300])
        junk = node.storage / "objects" / "junk.dcm"
        junk.write_bytes(b"this is not DICOM")

        code, report = _verify(node, "--repair")
        assert code == ExitCode.WARNING
        kinds = {f["path"]: f for f in report["faults"]}
        relative = str(damaged.relative_to(node.storage))
        assert kinds[relative]["kind"] == "size-mismatch" and not kinds[relative]["repaired"]
        assert "damaged" in kinds[relative]["detail"]
        assert kinds["objects/junk.dcm"]["kind"] == "unindexed-file"
        assert not kinds["objects/junk.dcm"]["repaired"]
        assert "not indexed" in kinds["objects/junk.dcm"]["detail"]
        assert damaged.exists() and junk.exists()

        code, report = _verify(node, "--deep")
        assert code == ExitCode.WARNING
        assert ("damaged", relative) in {(f["kind"], f["path"]) for f in report["faults"]}


def test_a_deletion_interrupted_by_a_crash_is_finished_at_start(tmp_path: Path) -> None:
    root = tmp_path / "node"
    with run_node(root, **SETTINGS) as node:
        send(node, dicomdir_files()[:2])
        victim = node.rows("SELECT id, path FROM instance ORDER BY id LIMIT 1")[0]
    # As Archive.delete leaves it when killed between its transaction and the unlink.
    write_db(
        node,
        (
            "INSERT INTO pending_delete (path, queued_at) VALUES (?, '2026-01-01')",
            (victim["path"],),
        ),
        ("DELETE FROM instance WHERE id = ?", (victim["id"],)),
    )
    assert (root / "storage" / victim["path"]).exists()
    with run_node(root, **SETTINGS) as node:
        node.wait_for_log("removed 1 file(s) whose deletion an earlier run left unfinished")
        assert not (root / "storage" / victim["path"]).exists()
        assert node.rows("SELECT COUNT(*) AS n FROM pending_delete")[0]["n"] == 0
        assert cli(node, "index", "verify").returncode == ExitCode.SUCCESS


# --- stats ----------------------------------------------------------------------------------------


def test_stats_match_what_was_stored(tmp_path: Path) -> None:
    first = dicomdir_files()
    second = [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))]
    with run_node(tmp_path / "node", **SETTINGS) as node:
        send(node, first, calling="SENDER_A")
        send(node, second, calling="SENDER_B")
        done = cli(node, "stats", "--json")
        assert done.returncode == 0, done.stderr
        numbers = json.loads(done.stdout)
        text = cli(node, "stats")
        assert text.returncode == 0, text.stderr
        on_disk = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.stat().st_size
                   for p in node.stored_files()}  # fmt: skip

    sent = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in first + second}
    datasets = list(sent.values())
    assert numbers["patients"] == len({str(ds.PatientID) for ds in datasets})
    assert numbers["studies"] == len({str(ds.StudyInstanceUID) for ds in datasets})
    assert numbers["series"] == len({str(ds.SeriesInstanceUID) for ds in datasets})
    assert numbers["instances"] == len(datasets) == len(on_disk)
    assert numbers["bytes"] == sum(on_disk.values())

    def size_of(paths: list[Path]) -> int:
        return sum(on_disk[str(sent[p].SOPInstanceUID)] for p in paths)

    by_modality = {m["modality"]: m for m in numbers["by_modality"]}
    for modality, count in Counter(str(ds.Modality) for ds in datasets).items():
        mine = [p for p, ds in sent.items() if ds.Modality == modality]
        assert by_modality[modality]["instances"] == count
        assert by_modality[modality]["bytes"] == size_of(mine)
        assert by_modality[modality]["series"] == len(
            {str(sent[p].SeriesInstanceUID) for p in mine}
        )
    by_sender = {s["calling_ae_title"]: s for s in numbers["by_sender"]}
    assert set(by_sender) == {"SENDER_A", "SENDER_B"}
    for ae, paths in (("SENDER_A", first), ("SENDER_B", second)):
        assert by_sender[ae]["instances"] == len(paths)
        assert by_sender[ae]["bytes"] == size_of(paths)
        assert by_sender[ae]["studies"] == len({str(sent[p].StudyInstanceUID) for p in paths})
    first_line = text.stdout.splitlines()[0]
    assert first_line.startswith(
        f"{numbers['patients']} patient(s), {numbers['studies']} studies, "
        f"{numbers['series']} series, {numbers['instances']} instance(s)"
    )
    assert any(line.startswith("SENDER_B ") for line in text.stdout.splitlines())


# --- delete ---------------------------------------------------------------------------------------


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[RunningNode]:
    with run_node(tmp_path / "node", **SETTINGS) as node:
        send(node, sample_files())
        yield node


def _files_of(node: RunningNode, where: str, *params: str) -> set[Path]:
    # The test's own conditions, never received data.
    sql = (
        "SELECT i.path FROM instance i JOIN series s ON s.id = i.series_id "  # noqa: S608
        "JOIN study st ON st.id = s.study_id JOIN patient p ON p.id = st.patient_id "
        f"WHERE {where}"
    )
    rows = node.rows(sql, *params)
    return {node.storage / r["path"] for r in rows}


def test_delete_series_study_and_patient(loaded: RunningNode) -> None:
    node = loaded
    everything = set(node.stored_files())
    # A study with several series, of which one goes.
    study = node.rows(
        "SELECT st.study_uid, st.modalities FROM study st JOIN series s ON s.study_id = st.id "
        "GROUP BY st.id HAVING COUNT(s.id) > 1 ORDER BY st.id LIMIT 1"
    )[0]
    series = node.rows(
        "SELECT s.series_uid FROM series s JOIN study st ON st.id = s.study_id "
        "WHERE st.study_uid = ? ORDER BY s.id LIMIT 1",
        study["study_uid"],
    )[0]["series_uid"]
    doomed = _files_of(node, "s.series_uid = ?", series)
    size = sum(p.stat().st_size for p in doomed)
    assert doomed
    done = cli(node, "delete", "series", series, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"deleted 1 study, 1 series, {len(doomed)} instance(s)" in done.stdout
    assert set(node.stored_files()) == everything - doomed
    assert node.rows("SELECT id FROM series WHERE series_uid = ?", series) == []
    assert node.rows("SELECT id FROM study WHERE study_uid = ?", study["study_uid"])  # stays
    (record,) = audit_records(node, "delete")
    assert record["by"] == "command" and record["level"] == "series"
    assert record["study_uids"] == [study["study_uid"]] and record["instances"] == len(doomed)
    assert record["bytes"] == size and record["series_uids"] == [series]
    everything -= doomed

    # A whole study: asked first; "n" keeps everything.
    one = node.rows("SELECT study_uid FROM study WHERE modalities = 'CR'")[0]["study_uid"]
    doomed = _files_of(node, "st.study_uid = ?", one)
    kept = cli(node, "delete", "study", one, stdin="n\n")
    assert kept.returncode == ExitCode.CANCEL, kept.stdout + kept.stderr
    assert "To delete (study" in kept.stdout and f"{len(doomed)} instance(s)" in kept.stdout
    assert set(node.stored_files()) == everything
    gone = cli(node, "delete", "study", one, stdin="y\n")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert set(node.stored_files()) == everything - doomed
    assert node.rows("SELECT id FROM study WHERE study_uid = ?", one) == []
    assert one not in {dict(a)["StudyInstanceUID"] for a in answers(node)["study"]}
    everything -= doomed

    # A patient: every study, the patient row and its person-name keys.
    patient = node.rows("SELECT id FROM patient WHERE patient_id = '98890234'")[0]["id"]
    studies = {
        r["study_uid"]
        for r in node.rows("SELECT study_uid FROM study WHERE patient_id = ?", patient)
    }
    doomed = _files_of(node, "p.patient_id = ?", "98890234")
    size = sum(p.stat().st_size for p in doomed)
    assert len(studies) > 1 and doomed
    done = cli(node, "delete", "patient", "98890234", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(node.stored_files()) == everything - doomed
    assert node.rows("SELECT id FROM patient WHERE patient_id = '98890234'") == []
    assert (
        node.rows("SELECT id FROM person_name WHERE owner = ? AND keyword = 'PatientName'", patient)
        == []
    )
    record = audit_records(node, "delete")[-1]
    assert (record["level"], record["patient_id"]) == ("patient", "98890234")
    assert set(record["study_uids"]) == studies and record["instances"] == len(doomed)
    assert record["bytes"] == size
    assert len(audit_records(node, "delete")) == 3
    assert cli(node, "index", "verify").returncode == ExitCode.SUCCESS
    assert node.rows("SELECT COUNT(*) AS n FROM pending_delete")[0]["n"] == 0


def test_delete_of_nothing_fails_and_deletes_nothing(loaded: RunningNode) -> None:
    before = loaded.stored_files()
    done = cli(loaded, "delete", "study", "1.2.3.4.5", "--yes")
    assert done.returncode == ExitCode.FAILURE
    assert "no study '1.2.3.4.5' in the index" in done.stderr
    assert loaded.stored_files() == before
    # No answer to the question (end of input, as from cron without --yes) is a no.
    study = loaded.rows("SELECT study_uid FROM study LIMIT 1")[0]["study_uid"]
    unanswered = cli(loaded, "delete", "study", study)
    assert unanswered.returncode == ExitCode.CANCEL, unanswered.stdout + unanswered.stderr
    assert "nothing deleted" in unanswered.stdout
    assert loaded.stored_files() == before
    assert audit_records(loaded, "delete") == []
