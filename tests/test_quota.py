"""The storage quota (``store.max_size``, ``store.at_limit``) against a real node: refused stores
answer A700 and leave nothing behind; recycling removes the studies received longest ago (never
the incoming instance's own), audits each, and stores the new instance; with several worker
processes the limit holds across them.

The instances are copies of one file whose UIDs all have the same length, so every stored file
has the same size and the limits below are exact multiples of it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomnode.status import Status
from tests.support.dimse import associate, store_file
from tests.support.node import RunningNode, run_node

CT = "1.2.840.10008.5.1.4.1.1.2"
CT_EXPLICIT = [(CT, ["1.2.840.10008.1.2.1"])]
SETTINGS: dict[str, Any] = {"unknown_peers": ["echo", "store", "find"]}


def uid(kind: int, n: int) -> str:
    """A valid UID of fixed length (no leading zero in a component)."""
    return f"2.25.{kind}{n:030d}"


def instance(folder: Path, study: int, number: int) -> Path:
    """CT_small as instance ``number`` of series 1 of study ``study``."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = uid(1, study)
    ds.SeriesInstanceUID = uid(2, study)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(3, study * 1000 + number)
    ds.PatientID = f"QUOTA{study:04d}"
    ds.PatientName = f"QUOTA^PATIENT{study:04d}"
    path = folder / f"s{study}-i{number}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_size(tmp_path: Path) -> int:
    """The size of one such instance as the node stores it (sent once to a throwaway node)."""
    with run_node(tmp_path / "probe", **SETTINGS) as node, associate(node, CT_EXPLICIT) as assoc:
        assert store_file(assoc, instance(tmp_path / "probe-files", 9999, 1)) == Status.SUCCESS
        (row,) = node.rows("SELECT file_size FROM instance")
        return int(row["file_size"])


@pytest.fixture(scope="module")
def size(tmp_path_factory: pytest.TempPathFactory) -> int:
    return stored_size(tmp_path_factory.mktemp("size"))


def study_uids(node: RunningNode) -> set[str]:
    return {r["study_uid"] for r in node.rows("SELECT study_uid FROM study")}


def deletes(node: RunningNode) -> list[dict[str, Any]]:
    path = node.root / "var" / "audit.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["event"] == "delete"]


def total(node: RunningNode) -> tuple[int, int]:
    (row,) = node.rows("SELECT instances, bytes FROM store_total")
    return row["instances"], row["bytes"]


def test_at_the_limit_stores_are_refused_and_nothing_is_kept(tmp_path: Path, size: int) -> None:
    files = [instance(tmp_path / "in", study, 1) for study in (1, 2, 3)]
    store = {"max_size": size * 5 // 2, "at_limit": "refuse"}
    with run_node(tmp_path / "node", store=store, **SETTINGS) as node:
        with associate(node, CT_EXPLICIT) as assoc:
            statuses = [store_file(assoc, path) for path in files]
        assert statuses == [Status.SUCCESS, Status.SUCCESS, Status.OUT_OF_RESOURCES]
        assert study_uids(node) == {uid(1, 1), uid(1, 2)}
        assert len(node.stored_files()) == 2 and node.temp_files() == []
        assert total(node) == (2, 2 * size)
        log = node.wait_for_log("storage quota reached")
        (line,) = [x for x in log.splitlines() if "storage quota reached" in x]
        assert " WARNING " in line and "0xA700" in line and "store.at_limit refuse" in line
        assert "QUOTA" not in line  # no patient data in the log
        assert deletes(node) == []


def test_recycling_removes_the_oldest_study_and_stores_the_new_one(
    tmp_path: Path, size: int
) -> None:
    store = {"max_size": size * 5 // 2, "at_limit": "recycle"}
    with run_node(tmp_path / "node", store=store, **SETTINGS) as node:
        for study in (1, 2, 3, 4):  # one association each, so each is received after the last
            with associate(node, CT_EXPLICIT) as assoc:
                assert store_file(assoc, instance(tmp_path / "in", study, 1)) == Status.SUCCESS
        # 1 went to make room for 3, then 2 for 4.
        assert study_uids(node) == {uid(1, 3), uid(1, 4)}
        assert len(node.stored_files()) == 2 and total(node) == (2, 2 * size)
        patients = node.rows("SELECT patient_id FROM patient ORDER BY patient_id")
        assert [r["patient_id"] for r in patients] == ["QUOTA0003", "QUOTA0004"]
        records = deletes(node)
        assert [
            (r["by"], r["level"], r["study_uids"], r["instances"], r["bytes"]) for r in records
        ] == [
            ("recycle", "study", [uid(1, 1)], 1, size),
            ("recycle", "study", [uid(1, 2)], 1, size),
        ]
        assert [r["patient_id"] for r in records] == ["QUOTA0001", "QUOTA0002"]
        lines = [x for x in node.log().splitlines() if "store.at_limit recycle" in x]
        assert len(lines) == 2 and all(" WARNING " in x and "QUOTA" not in x for x in lines)
        assert node.rows("SELECT COUNT(*) AS n FROM pending_delete")[0]["n"] == 0


def test_recycling_never_removes_the_incoming_instances_study(tmp_path: Path, size: int) -> None:
    store = {"max_size": size * 5 // 2, "at_limit": "recycle"}
    with run_node(tmp_path / "node", store=store, **SETTINGS) as node:
        with associate(node, CT_EXPLICIT) as assoc:
            statuses = [store_file(assoc, instance(tmp_path / "in", 1, n)) for n in (1, 2, 3)]
        # The third instance of study 1 would need study 1 itself to go: refused, nothing lost.
        assert statuses == [Status.SUCCESS, Status.SUCCESS, Status.OUT_OF_RESOURCES]
        assert total(node) == (2, 2 * size) and len(node.stored_files()) == 2
        assert deletes(node) == []
        log = node.wait_for_log("recycling every other study would free only")
        assert "QUOTA" not in log
        # Another study: study 1 is the only one to recycle, and it is enough.
        with associate(node, CT_EXPLICIT) as assoc:
            assert store_file(assoc, instance(tmp_path / "in", 2, 1)) == Status.SUCCESS
        assert study_uids(node) == {uid(1, 2)} and total(node) == (1, size)
        (record,) = deletes(node)
        assert (record["study_uids"], record["instances"]) == ([uid(1, 1)], 2)


def test_an_instance_larger_than_the_quota_is_refused(tmp_path: Path, size: int) -> None:
    store = {"max_size": size - 1, "at_limit": "recycle"}
    with run_node(tmp_path / "node", store=store, **SETTINGS) as node:
        with associate(node, CT_EXPLICIT) as assoc:
            assert store_file(assoc, instance(tmp_path / "in", 1, 1)) == Status.OUT_OF_RESOURCES
        assert node.stored_files() == [] and node.temp_files() == []
        node.wait_for_log("larger than the storage quota")


def test_the_limit_holds_across_worker_processes(tmp_path: Path, size: int) -> None:
    """Two workers, four associations storing at once: exactly as many instances as fit are
    stored, whichever worker stores them (the total is read under the index's write lock)."""
    fits = 5
    store = {"max_size": size * fits, "at_limit": "refuse"}
    files = [[instance(tmp_path / "in", 10 + a, n) for n in range(4)] for a in range(4)]
    with run_node(tmp_path / "node", store=store, workers=2, **SETTINGS) as node:
        results: list[int] = []
        lock = threading.Lock()
        start = threading.Barrier(len(files))

        def sender(paths: list[Path]) -> None:
            with associate(node, CT_EXPLICIT) as assoc:
                start.wait(timeout=30)
                for path in paths:
                    status = store_file(assoc, path)
                    with lock:
                        results.append(status)

        threads = [threading.Thread(target=sender, args=(paths,)) for paths in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(results) == sorted(
            [Status.SUCCESS] * fits + [Status.OUT_OF_RESOURCES] * (16 - fits)
        )
        assert total(node) == (fits, fits * size)
        assert len(node.stored_files()) == fits
        assert node.rows("SELECT COUNT(*) AS n FROM instance")[0]["n"] == fits
