"""C-MOVE and C-GET SCP against DCMTK movescu/getscu and pynetdicom, with DCMTK storescp as the
move destination: what arrives is compared with what was stored, byte for byte, or pixel for
pixel where the destination forced a decompression."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts

from dicomnode import scu
from dicomnode.config import Config, Peer
from dicomnode.qr import Level, Model
from dicomnode.status import Status
from tests.conftest import require_dcmtk
from tests.support.corpus import TEST_FILES, dataset_bytes
from tests.support.dcmtk import Endpoint, free_port, storescp
from tests.support.node import RunningNode, run_node

STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
RETRIEVERS = ["echo", "store", "find", "move", "get"]
DICOMDIR_FOLDER = TEST_FILES / "dicomdirtests"
# Lossless compressed files, each with an uncompressed reference to compare pixels against.
LOSSLESS = ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"]
ENV = {**os.environ, "TCP_NODELAY": "1"}


def send(node: RunningNode, *paths: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "send", node.address, *map(str, paths)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def received(folder: Path) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in folder.iterdir()
        if p.is_file()
    }


def originals(folder: Path) -> dict[str, Path]:
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.name != "DICOMDIR" and not path.name.startswith("DICOMDIR"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            found[str(ds.SOPInstanceUID)] = path
    return found


def peer(name: str, endpoint: Endpoint) -> dict[str, object]:
    return {"ae_title": endpoint.aet, "host": endpoint.host, "port": endpoint.port}


def movescu(node: RunningNode, destination: str, *keys: str) -> subprocess.CompletedProcess[str]:
    require_dcmtk("movescu")
    args = [a for k in keys for a in ("-k", k)]
    return subprocess.run(
        ["movescu", "-v", "-S", "-aec", node.ae_title, "-aem", destination, *args,
         node.host, str(node.port)],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[tuple[Endpoint, Path]]:
    """DCMTK storescp accepting every transfer syntax, writing exactly what it receives."""
    out = tmp_path / "dest"
    with storescp(out, aet="DEST") as endpoint:
        yield endpoint, out


def test_movescu_study_arrives_byte_for_byte(
    tmp_path: Path, destination: tuple[Endpoint, Path]
) -> None:
    endpoint, out = destination
    mine = originals(DICOMDIR_FOLDER / "98892003")
    study = pydicom.dcmread(next(iter(mine.values()))).StudyInstanceUID
    in_study = {
        uid: path for uid, path in mine.items()
        if pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID == study
    }  # fmt: skip
    peers = {"DEST": peer("DEST", endpoint)}
    with run_node(tmp_path / "node", unknown_peers=RETRIEVERS, peers=peers) as node:
        send(node, DICOMDIR_FOLDER / "98892003")
        done = movescu(node, "DEST", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        assert done.returncode == 0, done.stderr
        got = received(out)
        assert set(got) == set(in_study)
        for uid, path in got.items():
            assert dataset_bytes(path) == dataset_bytes(in_study[uid])
        log = node.wait_for_log("C-MOVE from MOVESCU to DEST")
        assert f"{len(in_study)} instances, {len(in_study)} completed, 0 failed" in log
        # movescu saw pending responses counting down, then success.
        assert "Pending" in done.stderr + done.stdout


def test_getscu_series_arrives_byte_for_byte(tmp_path: Path) -> None:
    require_dcmtk("getscu")
    mine = originals(DICOMDIR_FOLDER / "77654033")
    first = pydicom.dcmread(next(iter(mine.values())), stop_before_pixels=True)
    in_series = {
        uid: p for uid, p in mine.items()
        if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == first.SeriesInstanceUID
    }  # fmt: skip
    out = tmp_path / "got"
    out.mkdir()
    with run_node(tmp_path / "node", unknown_peers=RETRIEVERS) as node:
        send(node, DICOMDIR_FOLDER / "77654033")
        done = subprocess.run(
            ["getscu", "-S", "-aec", node.ae_title, "-od", str(out),
             "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={first.StudyInstanceUID}",
             "-k", f"SeriesInstanceUID={first.SeriesInstanceUID}", node.host, str(node.port)],
            capture_output=True, text=True, timeout=300, env=ENV,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        got = received(out)
        assert set(got) == set(in_series)
        for uid, path in got.items():
            assert dataset_bytes(path) == dataset_bytes(in_series[uid])
        node.wait_for_log(f"C-GET from GETSCU: {len(in_series)} instances")


def test_destination_refusing_compressed_gets_lossless_decompression(tmp_path: Path) -> None:
    """A destination that accepts only uncompressed syntaxes (storescp's default) gets each
    lossless-compressed instance decompressed, pixel for pixel, every other attribute kept."""
    out = tmp_path / "dest"
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    with (
        storescp(out, aet="PLAIN", options=()) as endpoint,
        run_node(
            tmp_path / "node",
            unknown_peers=RETRIEVERS,
            peers={"PLAIN": peer("PLAIN", endpoint)},
            # The three files are one SOP instance in three encodings: each replaces the last.
            store={"duplicates": "replace"},
        ) as node,
    ):
        for name in LOSSLESS:
            path = Path(get_testdata_file(name))
            send(node, path)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            done = movescu(node, "PLAIN", "QueryRetrieveLevel=STUDY",
                           f"StudyInstanceUID={ds.StudyInstanceUID}")  # fmt: skip
            assert done.returncode == 0, done.stderr
            (arrived,) = [p for p in out.iterdir() if p.is_file()]
            got = pydicom.dcmread(arrived)
            assert not got.file_meta.TransferSyntaxUID.is_compressed, name
            assert np.array_equal(got.pixel_array, reference), name
            assert got.PatientName == ds.PatientName and got.SOPInstanceUID == ds.SOPInstanceUID
            arrived.unlink()
        log = node.wait_for_log("sent as ExplicitVRLittleEndian, stored as JPEG2000Lossless")
        assert "stored as RLELossless" in log and "stored as JPEGLSLossless" in log


def move(
    node: RunningNode, destination: str, keys: dict[str, str], calling: str = "PYMOVE",
    cancel_after: int | None = None, model: str = STUDY_MOVE,
) -> tuple[list[Dataset], Dataset]:  # fmt: skip
    """C-MOVE with pynetdicom; the pending responses and the final one."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    pending: list[Dataset] = []
    final = Dataset()
    try:
        for status, answer in assoc.send_c_move(identifier, destination, model, msg_id=9):
            if status.Status == Status.PENDING:
                pending.append(status)
                if cancel_after is not None and len(pending) == cancel_after:
                    assoc.send_c_cancel(9, query_model=model)
            else:
                final = status
                if answer is not None:
                    final.FailedSOPInstanceUIDList = answer.get("FailedSOPInstanceUIDList", [])
    finally:
        assoc.release()
        ae.shutdown()
    return pending, final


def test_unknown_destination_and_unauthorised_caller(tmp_path: Path) -> None:
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    silent_port = free_port()
    peers = {
        "DEST": {"ae_title": "DEST", "host": "127.0.0.1", "port": silent_port},
        "VIEWER": {"ae_title": "VIEWER", "host": "127.0.0.1", "port": 104,
                   "services": RETRIEVERS, "move_destinations": ["VIEWER"]},
    }  # fmt: skip
    with run_node(tmp_path / "node", unknown_peers=RETRIEVERS, peers=peers) as node:
        send(node, Path(get_testdata_file("CT_small.dcm")))
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ct.StudyInstanceUID}
        _, final = move(node, "NOBODY", keys)
        assert final.Status == Status.MOVE_DESTINATION_UNKNOWN
        node.wait_for_log("move destination 'NOBODY' is not a configured peer")
        _, final = move(node, "DEST", keys, calling="VIEWER")
        assert final.Status == Status.NOT_AUTHORIZED
        node.wait_for_log("VIEWER may not move to DEST")
        # A configured destination that does not answer: every sub-operation fails, with the
        # failed instance listed, and the node goes on serving.
        _, final = move(node, "DEST", keys)
        assert final.Status == Status.UNABLE_TO_PERFORM_SUBOPERATIONS
        assert final.NumberOfFailedSuboperations == 1
        assert final.FailedSOPInstanceUIDList == ct.SOPInstanceUID  # one UID: VM 1
        # No unique key at the retrieve level: refused, nothing sent.
        _, final = move(node, "DEST", {"QueryRetrieveLevel": "STUDY", "PatientName": "*"})
        assert final.Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


def test_caller_without_the_move_service_is_refused_at_negotiation(tmp_path: Path) -> None:
    with run_node(tmp_path / "node") as node:  # unknown callers: echo and store only
        ae = AE(ae_title="NOSY")
        ae.add_requested_context(STUDY_MOVE)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        try:
            assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]
        finally:
            assoc.release()
            ae.shutdown()
        node.wait_for_log("calling AE may not use the 'move' service")


def many_instances(folder: Path, count: int) -> tuple[str, list[Path]]:
    """``count`` small CT instances in one new study (fresh UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def test_pending_counts_and_cancel(tmp_path: Path, destination: tuple[Endpoint, Path]) -> None:
    endpoint, out = destination
    study, paths = many_instances(tmp_path / "many", 60)
    with run_node(tmp_path / "node", unknown_peers=RETRIEVERS,
                  peers={"DEST": peer("DEST", endpoint)}) as node:  # fmt: skip
        send(node, *paths)
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
        pending, final = move(node, "DEST", keys)
        assert final.Status == Status.SUCCESS
        assert [p.NumberOfRemainingSuboperations for p in pending] == list(range(59, 0, -1))
        assert [p.NumberOfCompletedSuboperations for p in pending] == list(range(1, 60))
        assert final.NumberOfCompletedSuboperations == 60
        assert final.NumberOfFailedSuboperations == 0
        assert len(received(out)) == 60
        pending, final = move(node, "DEST", keys, cancel_after=1)
        assert final.Status == Status.CANCEL
        done = final.NumberOfCompletedSuboperations
        assert 1 <= done < 60
        assert final.NumberOfRemainingSuboperations == 60 - done
        node.wait_for_log("C-MOVE from PYMOVE cancelled")


def test_destination_that_aborts_midway(tmp_path: Path) -> None:
    study, paths = many_instances(tmp_path / "many", 3)
    out = tmp_path / "dest"
    with storescp(out, aet="FLAKY", options=("+xa", "--abort-after")) as endpoint, run_node(
        tmp_path / "node", unknown_peers=RETRIEVERS, peers={"FLAKY": peer("FLAKY", endpoint)}
    ) as node:  # fmt: skip
        send(node, *paths)
        _, final = move(node, "FLAKY", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
        assert final.Status == Status.UNABLE_TO_PERFORM_SUBOPERATIONS
        assert final.NumberOfFailedSuboperations == 3
        assert final.NumberOfCompletedSuboperations == 0
        node.wait_for_log("was lost")
        # The node still answers.
        _, again = move(node, "NOBODY", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
        assert again.Status == Status.MOVE_DESTINATION_UNKNOWN


def test_more_than_128_contexts_use_several_associations(tmp_path: Path) -> None:
    """130 SOP classes in one study, each with two presentation contexts (its stored syntax, and
    the uncompressed little endian fallback): 260 contexts, so three associations to the
    destination (PS3.8 9.3.2.2: at most 128 per association), and every instance arrives."""
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts][:130]
    study, series = generate_uid(), generate_uid()
    source = tmp_path / "many"
    source.mkdir()
    for i, sop_class in enumerate(classes):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = "MANY", "Many^Classes"
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        pydicom.dcmwrite(source / f"{i:03d}.dcm", ds, enforce_file_format=True)
    out, log = tmp_path / "dest", tmp_path / "storescp.log"
    # -pm: accept SOP classes newer than this DCMTK; -v: log each association.
    wide = storescp(out, aet="WIDE", options=("+xa", "-pm", "-v"), log_path=log)
    with (
        wide as endpoint,
        run_node(
            tmp_path / "node", unknown_peers=RETRIEVERS, peers={"WIDE": peer("WIDE", endpoint)}
        ) as node,
    ):
        send(node, source)
        _, final = move(node, "WIDE", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
        assert final.Status == Status.SUCCESS
        assert final.NumberOfCompletedSuboperations == 130
        node.wait_for_log("C-MOVE to WIDE used 3 association(s)")
    assert log.read_text().count("Association Received") == 3
    assert {str(pydicom.dcmread(p).SOPClassUID) for p in out.iterdir()} == set(classes)


def test_destination_refusing_the_association(tmp_path: Path) -> None:
    study, paths = many_instances(tmp_path / "many", 2)
    with storescp(tmp_path / "dest", aet="NOPE", options=("--refuse",)) as endpoint, run_node(
        tmp_path / "node", unknown_peers=RETRIEVERS, peers={"NOPE": peer("NOPE", endpoint)}
    ) as node:  # fmt: skip
        send(node, *paths)
        _, final = move(node, "NOPE", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
        assert final.Status == Status.UNABLE_TO_PERFORM_SUBOPERATIONS
        assert final.NumberOfFailedSuboperations == 2
        assert sorted(final.FailedSOPInstanceUIDList) == sorted(
            str(pydicom.dcmread(p).SOPInstanceUID) for p in paths
        )
        # storescp --refuse sends A-ASSOCIATE-RJ and closes at once; pynetdicom now and then
        # reports that as an aborted request. Either way: nothing sent, A702, the list above.
        log = node.wait_for_log("C-MOVE to NOPE: NOPE@")
        assert "rejected the association" in log or "aborted the association request" in log


def test_our_get_scu_against_our_scp_with_cancel(tmp_path: Path) -> None:
    """dicomnode's C-GET SCU against dicomnode's C-GET SCP: the whole study arrives byte for
    byte; a second C-GET cancelled after the first instance ends with FE00 and the counts."""
    study, paths = many_instances(tmp_path / "many", 40)
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in paths}
    with run_node(tmp_path / "node", unknown_peers=RETRIEVERS) as node:
        send(node, *paths)
        target = Peer(name="NODE", ae_title=node.ae_title, host=node.host, port=node.port)
        keys = Dataset()
        keys.StudyInstanceUID = study
        whole = tmp_path / "whole"
        whole.mkdir()
        report = scu.get(Config(ae_title="OURGET"), target, Level.STUDY, Model.STUDY_ROOT, keys,
                         whole)  # fmt: skip
        assert report.status == Status.SUCCESS and report.completed == 40
        got = received(whole)
        assert set(got) == set(by_uid)
        assert all(dataset_bytes(got[uid]) == dataset_bytes(by_uid[uid]) for uid in got)
        cancel = threading.Event()
        part = tmp_path / "part"
        part.mkdir()
        report = scu.get(
            Config(ae_title="OURGET"), target, Level.STUDY, Model.STUDY_ROOT, keys, part,
            on_progress=lambda remaining, done, failed, warning: cancel.set(), cancel=cancel,
        )  # fmt: skip
        assert report.status == Status.CANCEL
        assert report.completed is not None and 1 <= report.completed < 40
        assert len(received(part)) == report.completed
        node.wait_for_log("C-GET from OURGET cancelled")
