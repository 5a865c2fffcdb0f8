"""Bad input to the C-STORE SCP: the right status, a log line that says why, nothing written,
and the node goes on serving. Real associations (pynetdicom as the peer) against a real node."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.index.models import SCHEMA_VERSION
from dicomnode.status import Status
from tests.support.corpus import dataset_bytes
from tests.support.dimse import UNCOMPRESSED, associate, context_id, echo, raw_store, store_file
from tests.support.node import RunningNode, run_node

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = str(ExplicitVRLittleEndian)
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
MR_SMALL = Path(get_testdata_file("MR_small.dcm"))


def assert_nothing_stored(node: RunningNode) -> None:
    assert node.stored_files() == []
    assert node.temp_files() == []
    assert node.rows("SELECT COUNT(*) AS n FROM instance")[0]["n"] == 0


def assert_still_serving(node: RunningNode) -> None:
    """Another association still gets C-ECHO and a real C-STORE answered with success."""
    assert echo(node) == Status.SUCCESS
    with associate(node, [(CT, [EXPLICIT])], "OTHER") as assoc:
        assert store_file(assoc, CT_SMALL) == Status.SUCCESS
    assert node.instance(pydicom.dcmread(CT_SMALL).SOPInstanceUID) is not None


def ct_bytes(**changes: object) -> tuple[pydicom.Dataset, bytes]:
    """CT_small's data set with attributes changed (None deletes), encoded explicit VR LE."""
    ds = pydicom.dcmread(CT_SMALL)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out = Path(f"/tmp/ct-{id(ds)}.dcm")
    try:
        ds.save_as(out, enforce_file_format=True)
        return ds, dataset_bytes(out)
    finally:
        out.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("changes", "status", "reason"),
    [
        ({"SOPClassUID": MR}, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "differs from the request"),
        ({"SOPInstanceUID": "1.2.3.4"}, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "differs from"),
        ({"SOPClassUID": None}, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "has no SOP Class UID"),
        ({"SOPInstanceUID": None}, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "no SOP Instance"),
        ({"StudyInstanceUID": None}, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID"),
        ({"SeriesInstanceUID": "1.02.3"}, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Series"),
    ],
)
def test_data_set_that_is_not_the_requested_instance(
    node: RunningNode, changes: dict[str, object], status: Status, reason: str
) -> None:
    original = pydicom.dcmread(CT_SMALL)
    _, data = ct_bytes(**changes)
    with associate(node, [(CT, [EXPLICIT])]) as assoc:
        got = raw_store(assoc, context_id(assoc, CT), CT, original.SOPInstanceUID, data)
    assert got == status
    log = node.wait_for_log(reason)
    assert f"0x{status:04X}" in log
    assert_nothing_stored(node)
    assert_still_serving(node)


@pytest.mark.parametrize("bad_uid", ["../../x", "1.2.03.4", "1.2.3..4", "abc"])
def test_invalid_sop_instance_uid(node: RunningNode, bad_uid: str) -> None:
    _, data = ct_bytes(SOPInstanceUID=bad_uid)
    with associate(node, [(CT, [EXPLICIT])]) as assoc:
        got = raw_store(assoc, context_id(assoc, CT), CT, bad_uid, data)
    assert got == Status.INVALID_OBJECT_INSTANCE
    node.wait_for_log("Affected SOP Instance UID is not a valid UID")
    assert_nothing_stored(node)
    # Nothing anywhere under the storage folder carries the peer's value in its name.
    assert not any(p.name == "x" or ".." in p.name for p in node.storage.rglob("*"))
    assert_still_serving(node)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        pytest.param(
            b"\x08\x00\x16\x00UI\xff\xffgarbage", "runs past the end", id="length-past-end"
        ),
        pytest.param(b"\x00" * 3, "element tag cut short", id="three-bytes"),
        pytest.param(
            b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"\xfe\xff\x00\xe0" + bytes(4),
            "item tag (FFFE,E000) outside a sequence",
            id="stray-item-tag",
        ),
        pytest.param(
            dataset_bytes(Path(get_testdata_file("MR_truncated.dcm"))),
            "element (7FE0,0010) length 8192 runs past the end",
            id="truncated-pixel-data",
        ),
    ],
)
def test_data_set_that_cannot_be_parsed(node: RunningNode, data: bytes, why: str) -> None:
    with associate(node, [(CT, [EXPLICIT]), (MR, [EXPLICIT])]) as assoc:
        sop_class = MR if len(data) > 1000 else CT
        got = raw_store(assoc, context_id(assoc, sop_class), sop_class, generate_uid(), data)
    assert got == Status.CANNOT_UNDERSTAND
    log = node.wait_for_log("data set cannot be parsed")
    assert why in log
    assert_nothing_stored(node)
    assert_still_serving(node)


def test_sop_class_outside_the_policy(tmp_path: Path) -> None:
    """A SOP class the policy does not accept is refused at negotiation (logged with why), and
    cannot slip in under another class's accepted context (0x0122)."""
    conformance = {
        "accept": [
            {"sop_classes": ["verification"], "transfer_syntaxes": ["uncompressed"]},
            {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["ExplicitVRLittleEndian"]},
        ]
    }
    with run_node(tmp_path / "node", conformance=conformance) as node:
        with associate(node, [(CT, [EXPLICIT]), (MR, UNCOMPRESSED)]) as assoc:
            assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CT]
            mr = pydicom.dcmread(MR_SMALL)
            got = raw_store(
                assoc, context_id(assoc, CT), MR, mr.SOPInstanceUID, dataset_bytes(MR_SMALL)
            )
        assert got == Status.SOP_CLASS_NOT_SUPPORTED
        log = node.wait_for_log("sent on the presentation context of CTImageStorage")
        assert "MRImageStorage: rejected, SOP class not in the conformance policy" in log
        assert "offered ExplicitVRLittleEndian, ImplicitVRLittleEndian" in log
        assert_nothing_stored(node)
        assert_still_serving(node)


def test_free_space_floor_refuses_before_writing(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", store={"min_free_space": "1000TB"}) as node:
        with associate(node, [(CT, [EXPLICIT])]) as assoc:
            assert store_file(assoc, CT_SMALL) == Status.OUT_OF_RESOURCES
        node.wait_for_log("under the floor")
        assert_nothing_stored(node)
        assert echo(node) == Status.SUCCESS


def test_index_failure_removes_the_file_and_refuses(node: RunningNode) -> None:
    """A database that refuses the row: the file already written is removed, the peer gets a
    failure (never success), and once the database accepts rows again stores succeed."""
    con = sqlite3.connect(node.database)
    con.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON instance BEGIN "
        "SELECT RAISE(ABORT, 'injected failure'); END"
    )
    con.commit()
    try:
        with associate(node, [(CT, [EXPLICIT])]) as assoc:
            assert store_file(assoc, CT_SMALL) == Status.OUT_OF_RESOURCES_INDEX
        log = node.wait_for_log("index write failed")
        assert "injected failure" in log
        assert_nothing_stored(node)
    finally:
        con.execute("DROP TRIGGER refuse")
        con.commit()
        con.close()
    assert_still_serving(node)


def test_abort_mid_transfer_leaves_nothing(node: RunningNode) -> None:
    """A peer that aborts while its data set is arriving leaves no file and no row."""
    big = (
        b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"
        + b"\xe0\x7f\x10\x00OW\x00\x00"
        + ((200 * 1024 * 1024).to_bytes(4, "little"))
    )
    with associate(node, [(CT, [EXPLICIT])]) as assoc:
        cx = context_id(assoc, CT)

        def send() -> None:
            # 200 MB declared, sent in 1 MB pieces until the association is gone.
            chunk = b"\x00" * (1024 * 1024)
            payload = big + chunk * 200
            # The abort ends this send however it can.
            with contextlib.suppress(Exception):
                raw_store(assoc, cx, CT, generate_uid(), payload)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size > 0 for p in node.temp_files()):
            assert time.monotonic() < deadline, "nothing arrived"
            time.sleep(0.01)
        assoc.abort()
        sender.join(timeout=30)
    node.wait_for_log("partial data set(s) discarded")
    assert_nothing_stored(node)
    assert_still_serving(node)


def test_leftover_temp_files_removed_at_start_up(tmp_path: Path) -> None:
    """What a crash left in storage/tmp (a half-received data set) is gone once the node runs,
    and was never indexed."""
    tmp = tmp_path / "node" / "storage" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "rx-0123.part").write_bytes(b"\x00" * 1000)
    (tmp / "stale-folder").mkdir()
    (tmp / "stale-folder" / "x").write_bytes(b"x")
    with run_node(tmp_path / "node") as node:
        assert node.temp_files() == []
        assert "removed 2 leftover temporary file(s)" in node.log()
        assert node.rows("PRAGMA user_version")[0][0] == SCHEMA_VERSION  # recorded
        assert_nothing_stored(node)
