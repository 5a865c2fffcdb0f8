"""Orthanc as a real peer: the fixture itself, our SCU against it, and Orthanc's SCU against us.

One Orthanc serves the whole module (a clean stop takes it about 3 s); each test starts from an
empty Orthanc. ``dicomnode`` runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicomnode.status import ExitCode
from tests.support import orthanc as orthanc_support
from tests.support.corpus import dataset_bytes
from tests.support.dcmtk import LOOPBACK, free_port
from tests.support.node import RunningNode, run_node
from tests.support.orthanc import OrthancEndpoint, OrthancError, orthanc

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
CT_SMALL = TEST_FILES / "CT_small.dcm"
MR_SMALL = TEST_FILES / "MR_small.dcm"
FOLDER = TEST_FILES / "dicomdirtests" / "77654033"  # 7 CR and CT images in sub-folders
UNREACHABLE = "unreachable"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m dicomnode.cli ARGS`` with the built-in configuration (AE title DICOMNODE)."""
    env = {k: v for k, v in os.environ.items() if k != "DICOMNODE_CONFIG"}
    argv = [sys.executable, "-m", "dicomnode.cli", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)


def sop_instance_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def files_under(*paths: Path) -> list[Path]:
    return [q for p in paths for q in ([p] if p.is_file() else sorted(p.rglob("*"))) if q.is_file()]


@pytest.fixture(scope="module")
def module_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancEndpoint]:
    # A configured peer nobody listens on: shows the modalities argument and a failing echo.
    nobody = ("NOBODY", "127.0.0.1", free_port())
    with orthanc(tmp_path_factory.mktemp("orthanc"), modalities={UNREACHABLE: nobody}) as peer:
        yield peer


@pytest.fixture
def pacs(module_orthanc: OrthancEndpoint) -> OrthancEndpoint:
    """The module's Orthanc, emptied."""
    module_orthanc.clear()
    assert module_orthanc.instances() == []
    return module_orthanc


@pytest.fixture
def our_node(tmp_path: Path, pacs: OrthancEndpoint) -> Iterator[RunningNode]:
    """Our node knowing Orthanc as a peer (also as C-MOVE destination), and Orthanc knowing it
    as modality ``dicomnode``."""
    peer = {
        "ae_title": pacs.aet,
        "host": pacs.host,
        "port": pacs.dicom_port,
        "services": ["echo", "store", "find", "move"],
    }
    with run_node(tmp_path / "node", peers={"ORTHANC": peer}) as node:
        pacs.add_modality("dicomnode", node.ae_title, node.host, node.port)
        yield node


# --- the fixture ------------------------------------------------------------------------------


def test_fixture_runs_our_configuration(module_orthanc: OrthancEndpoint) -> None:
    system = module_orthanc.system()

    assert system["DicomAet"] == module_orthanc.aet == "ORTHANC"
    assert system["DicomPort"] == module_orthanc.dicom_port
    assert system["HttpPort"] == module_orthanc.http_port
    # "Plugins": [] loads none of the Debian ones; /plugins always lists the pseudo-plugin
    # explorer.js (Orthanc Explorer's extension hook), even with the Explorer disabled.
    assert module_orthanc.get("/plugins") == ["explorer.js"]
    assert module_orthanc.modalities() == [UNREACHABLE]
    # Storage and index under the work folder, not /var/lib/orthanc.
    assert (module_orthanc.workdir / "index" / "index").is_file()
    assert "Orthanc has started" in module_orthanc.log()


def test_fixture_tries_fresh_ports_when_one_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])  # the first "free" port (for DICOM) is someone else's
        monkeypatch.setattr(orthanc_support, "free_port", lambda: next(ports, 0) or free_port())

        with orthanc(tmp_path / "orthanc", verbose=False) as peer:
            assert peer.dicom_port != taken
            assert peer.system()["DicomPort"] == peer.dicom_port

    assert "The TCP port of the DICOM server is privileged or already in use" in peer.log()


def test_echo_to_an_unreachable_modality_is_an_error(module_orthanc: OrthancEndpoint) -> None:
    with pytest.raises(OrthancError) as raised:
        module_orthanc.echo(UNREACHABLE, timeout=5)

    assert raised.value.status == 500
    assert "Connection refused" in raised.value.body["Details"]


# --- our SCU against Orthanc ------------------------------------------------------------------


def test_dicomnode_echo(pacs: OrthancEndpoint) -> None:
    result = run_cli("echo", pacs.address)

    assert result.returncode == ExitCode.SUCCESS, result.stderr
    assert re.fullmatch(
        rf"echo {re.escape(pacs.address)} \({re.escape(pacs.address)}\): 0x0000 Success "
        r"in \d+ ms\n",
        result.stdout,
    )


def test_dicomnode_send_stores_exactly_the_data_sets(pacs: OrthancEndpoint, tmp_path: Path) -> None:
    originals = {sop_instance_uid(path): path for path in files_under(CT_SMALL, MR_SMALL, FOLDER)}
    assert len(originals) == 9

    result = run_cli("send", pacs.address, CT_SMALL, MR_SMALL, FOLDER)

    assert result.returncode == ExitCode.SUCCESS, result.stderr
    assert "sent 9 of 9 files" in result.stdout
    held = pacs.instance_ids()
    assert set(held) == set(originals)
    for uid, original in originals.items():
        instance = held[uid]
        assert pacs.find("Instance", {"SOPInstanceUID": uid}) == [instance]
        assert pacs.tags(instance)["SOPInstanceUID"] == uid
        assert pacs.get(f"/instances/{instance}/metadata/RemoteAET") == "DICOMNODE"
        syntax = dcmread(original, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert pacs.get(f"/instances/{instance}/metadata/TransferSyntax") == syntax
        # Orthanc writes a File Meta group of its own (DCMTK's implementation UID); the data
        # set after it is what we sent, byte for byte.
        stored = tmp_path / f"{uid}.dcm"
        stored.write_bytes(pacs.file(instance))
        assert dataset_bytes(stored) == dataset_bytes(original), original


# --- Orthanc's SCU against our node ---------------------------------------------------------


def test_orthanc_echoes_our_node(pacs: OrthancEndpoint, our_node: RunningNode) -> None:
    pacs.echo("dicomnode", timeout=10)

    our_node.wait_for_log("association from ORTHANC")


def test_orthanc_stores_to_our_node(pacs: OrthancEndpoint, our_node: RunningNode) -> None:
    uploaded = pacs.upload(MR_SMALL)
    assert uploaded["Status"] == "Success"

    job = pacs.store_to("dicomnode", [uploaded["ID"]], timeout=10)

    assert (job["InstancesCount"], job["FailedInstancesCount"]) == (1, 0)
    assert our_node.instance(sop_instance_uid(MR_SMALL)) is not None


def test_orthanc_queries_and_retrieves_from_our_node(
    pacs: OrthancEndpoint, our_node: RunningNode
) -> None:
    sent = run_cli("send", our_node.address, CT_SMALL, MR_SMALL)
    assert sent.returncode == ExitCode.SUCCESS, sent.stderr
    ct = dcmread(CT_SMALL, stop_before_pixels=True)
    mr = dcmread(MR_SMALL, stop_before_pixels=True)

    studies = pacs.modality_find(
        "dicomnode", "Study", {"StudyInstanceUID": "", "PatientName": "", "ModalitiesInStudy": ""}
    )
    ct_only = pacs.modality_find(
        "dicomnode", "Study", {"StudyInstanceUID": ct.StudyInstanceUID, "PatientID": ""}
    )
    pacs.modality_move(ct_only.id, target_aet=pacs.aet, timeout=10)

    found = {
        a["StudyInstanceUID"]: (a["PatientName"], a["ModalitiesInStudy"]) for a in studies.answers
    }
    assert found == {
        ct.StudyInstanceUID: (str(ct.PatientName), "CT"),
        mr.StudyInstanceUID: (str(mr.PatientName), "MR"),
    }
    assert [a["PatientID"] for a in ct_only.answers] == [ct.PatientID]
    # The C-MOVE brought the CT study, and only it, to Orthanc.
    assert list(pacs.instance_ids()) == [ct.SOPInstanceUID]

    # A C-MOVE by UIDs, without a C-FIND first: the MR series.
    mr_series = {"StudyInstanceUID": mr.StudyInstanceUID, "SeriesInstanceUID": mr.SeriesInstanceUID}
    pacs.move_from("dicomnode", "Series", [mr_series], timeout=10)

    assert set(pacs.instance_ids()) == {ct.SOPInstanceUID, mr.SOPInstanceUID}
