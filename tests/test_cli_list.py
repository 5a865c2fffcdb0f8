"""``dicomnode list`` reads the node's real index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from dicomnode.status import Status
from tests.support.dimse import associate, store_file
from tests.support.node import RunningNode

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))


def dicomnode(node: RunningNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(node.config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_list_shows_stored_studies_and_instances(node: RunningNode) -> None:
    empty = dicomnode(node, "list")
    assert empty.returncode == 0 and "0 studies" in empty.stdout
    with associate(node, [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]) as assoc:
        assert store_file(assoc, CT_SMALL) == Status.SUCCESS
    ds = pydicom.dcmread(CT_SMALL)
    table = dicomnode(node, "list")
    assert table.returncode == 0, table.stderr
    assert str(ds.PatientName) in table.stdout and ds.StudyInstanceUID in table.stdout
    assert "1 study" in table.stdout
    studies = json.loads(dicomnode(node, "list", "--json").stdout)
    assert [(s["study_uid"], s["n_series"], s["n_instances"]) for s in studies] == [
        (ds.StudyInstanceUID, 1, 1)
    ]
    (instance,) = json.loads(dicomnode(node, "list", "--instances", "--json").stdout)
    assert instance["sop_instance_uid"] == ds.SOPInstanceUID
    assert (node.storage / instance["path"]).stat().st_size == instance["file_size"]
    assert ds.SOPInstanceUID not in instance["path"]  # file names never come from UIDs


def test_list_without_an_index_says_so(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("database: nowhere.sqlite\n")
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(config), "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "nothing has been stored yet" in done.stderr
    assert not (tmp_path / "nowhere.sqlite").exists()
