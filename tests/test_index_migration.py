"""An index written at an older schema version is upgraded in place when the node opens it: the
v2 keys are filled from what it already holds, v3 adds the PatientBirthDate index, v4 the
worklist and MPPS tables, v5 the studies' received time, the maintained total and the deletion
journal, and queries answer as for a fresh index."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicomnode.index.models import SCHEMA_VERSION
from dicomnode.status import Status
from tests.support.dimse import associate, store_file
from tests.support.node import run_node

STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
CT_EXPLICIT = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]

# What version 5 added, taken away again: the schema exactly as version 4 had it.
V5_TO_V4 = """
    DROP TRIGGER instance_total_insert;
    DROP TRIGGER instance_total_delete;
    DROP TRIGGER instance_total_size;
    DROP TABLE store_total;
    DROP TABLE pending_delete;
    DROP INDEX study_received_at;
    ALTER TABLE study DROP COLUMN received_at;
"""


def downgrade_to_v1(database: Path) -> None:
    """Turn a current index back into exactly the version 1 schema (what dicomnode 0.1 wrote)."""
    con = sqlite3.connect(database)
    con.executescript(
        V5_TO_V4
        + """
        DROP TABLE worklist_item;
        DROP TABLE performed_step;
        DROP INDEX patient_birth_date;
        DROP TABLE person_name;
        DROP INDEX study_study_datetime;
        ALTER TABLE study DROP COLUMN study_datetime;
        PRAGMA user_version = 1;
        """
    )
    con.close()


def test_v1_index_is_migrated_and_queryable(tmp_path: Path) -> None:
    root = tmp_path / "node"
    settings = {"unknown_peers": ["echo", "store", "find"]}
    ct = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]
    with run_node(root, **settings) as node, associate(node, ct) as assoc:
        assert store_file(assoc, Path(get_testdata_file("CT_small.dcm"))) == Status.SUCCESS
    downgrade_to_v1(root / "index.sqlite")
    with run_node(root, **settings) as node:
        assert f"at schema version {SCHEMA_VERSION} (was 1)" in node.log()
        assert node.rows("PRAGMA user_version")[0][0] == SCHEMA_VERSION
        (study,) = node.rows("SELECT study_datetime FROM study")
        assert study["study_datetime"].startswith("20040119")
        names = node.rows("SELECT keyword, folded FROM person_name ORDER BY keyword")
        assert ("PatientName", "compressedsamples^ct1") in [
            (r["keyword"], r["folded"]) for r in names
        ]
        ae = AE(ae_title="PYFIND")
        ae.add_requested_context(STUDY_ROOT)
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.PatientName = "COMPRESSED*"
        identifier.StudyDate = "20040101-20041231"
        results = list(assoc.send_c_find(identifier, STUDY_ROOT))
        assoc.release()
        ae.shutdown()
        statuses = [int(status.Status) for status, _ in results]
        assert statuses == [Status.PENDING, Status.SUCCESS]


def downgrade_to_v2(database: Path) -> None:
    """Turn a current index back into exactly the version 2 schema."""
    con = sqlite3.connect(database)
    con.executescript(
        V5_TO_V4 + "DROP TABLE worklist_item; DROP TABLE performed_step; "
        "DROP INDEX patient_birth_date; PRAGMA user_version = 2;"
    )
    con.close()


def test_v2_index_gets_the_birth_date_index(tmp_path: Path) -> None:
    root = tmp_path / "node"
    settings = {"unknown_peers": ["echo", "store", "find"]}
    ct = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientBirthDate = "19700115"
    ds.save_as(tmp_path / "born.dcm", enforce_file_format=True)
    with run_node(root, **settings) as node, associate(node, ct) as assoc:
        assert store_file(assoc, tmp_path / "born.dcm") == Status.SUCCESS
    downgrade_to_v2(root / "index.sqlite")
    with run_node(root, **settings) as node:
        assert f"at schema version {SCHEMA_VERSION} (was 2)" in node.log()
        assert node.rows("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 5
        indexes = {r["name"] for r in node.rows("PRAGMA index_list(patient)")}
        assert "patient_birth_date" in indexes
        (plan,) = node.rows(
            "EXPLAIN QUERY PLAN SELECT id FROM patient WHERE birth_date BETWEEN ? AND ?", "1", "2"
        )
        assert "patient_birth_date" in plan["detail"]
        ae = AE(ae_title="PYFIND")
        ae.add_requested_context(STUDY_ROOT)
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.PatientBirthDate = "19700101-19700131"
        identifier.StudyInstanceUID = ""
        results = list(assoc.send_c_find(identifier, STUDY_ROOT))
        assoc.release()
        ae.shutdown()
        statuses = [int(status.Status) for status, _ in results]
        assert statuses == [Status.PENDING, Status.SUCCESS]


def test_v3_index_gets_the_worklist_tables(tmp_path: Path) -> None:
    """A v3 index (issue 4) holding an instance: v4 adds worklist_item, performed_step and
    performed_item, keeps what was stored, and the worklist works at once."""
    root = tmp_path / "node"
    settings = {"unknown_peers": ["echo", "store", "worklist"]}
    ct = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]
    with run_node(root, **settings) as node, associate(node, ct) as assoc:
        assert store_file(assoc, Path(get_testdata_file("CT_small.dcm"))) == Status.SUCCESS
    con = sqlite3.connect(root / "index.sqlite")
    con.executescript(
        V5_TO_V4 + "DROP TABLE performed_item; DROP TABLE worklist_item; "
        "DROP TABLE performed_step; PRAGMA user_version = 3;"
    )
    con.close()
    with run_node(root, **settings) as node:
        assert f"at schema version {SCHEMA_VERSION} (was 3)" in node.log()
        assert node.rows("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 5
        tables = {r["name"] for r in node.rows("SELECT name FROM sqlite_master")}
        assert {"worklist_item", "performed_step", "performed_item"} <= tables
        assert len(node.rows("SELECT id FROM instance")) == 1
        added = node.cli(
            "worklist", "add", "--patient-name", "DOE^JOHN", "--patient-id", "P1",
            "--modality", "CT", "--date", "20261202", "--time", "0930",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        ae = AE(ae_title="PYMWL")
        ae.add_requested_context("1.2.840.10008.5.1.4.31")
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        identifier = Dataset()
        identifier.PatientID = "P1"
        results = list(assoc.send_c_find(identifier, "1.2.840.10008.5.1.4.31"))
        assoc.release()
        ae.shutdown()
        assert [int(status.Status) for status, _ in results] == [Status.PENDING, Status.SUCCESS]


def test_v4_index_gets_the_total_the_journal_and_received_times(tmp_path: Path) -> None:
    """A v4 index (issue 5) holding two studies: v5 counts the maintained total from the rows,
    fills each study's received_at with its first instance's, adds the (empty) deletion journal,
    and the triggers keep the total from the next store on."""
    root = tmp_path / "node"
    settings = {"unknown_peers": ["echo", "store", "find"]}
    mr = [("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])]
    with run_node(root, **settings) as node, associate(node, CT_EXPLICIT + mr) as assoc:
        assert store_file(assoc, Path(get_testdata_file("CT_small.dcm"))) == Status.SUCCESS
        assert store_file(assoc, Path(get_testdata_file("MR_small.dcm"))) == Status.SUCCESS
    con = sqlite3.connect(root / "index.sqlite")
    con.executescript(V5_TO_V4 + "PRAGMA user_version = 4;")
    con.close()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.4455"
    ds.save_as(tmp_path / "third.dcm", enforce_file_format=True)
    with run_node(root, **settings) as node:
        assert f"at schema version {SCHEMA_VERSION} (was 4)" in node.log()
        assert node.rows("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 5
        (total,) = node.rows("SELECT id, instances, bytes FROM store_total")
        (summed,) = node.rows("SELECT COUNT(*) AS n, SUM(file_size) AS b FROM instance")
        assert (total["id"], total["instances"], total["bytes"]) == (1, 2, summed["b"])
        first = node.rows(
            "SELECT st.received_at AS study, MIN(i.received_at) AS first FROM study st "
            "JOIN series s ON s.study_id = st.id JOIN instance i ON i.series_id = s.id "
            "GROUP BY st.id"
        )
        assert len(first) == 2
        assert all(r["study"] == r["first"] != "" for r in first)
        assert node.rows("SELECT COUNT(*) AS n FROM pending_delete")[0]["n"] == 0
        with associate(node, CT_EXPLICIT) as assoc:
            assert store_file(assoc, tmp_path / "third.dcm") == Status.SUCCESS
        (total,) = node.rows("SELECT instances, bytes FROM store_total")
        (summed,) = node.rows("SELECT COUNT(*) AS n, SUM(file_size) AS b FROM instance")
        assert (total["instances"], total["bytes"]) == (3, summed["b"])
