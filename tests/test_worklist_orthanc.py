"""Orthanc 1.10 (Debian package) and its ModalityWorklists plugin as real worklist peers: our
``worklist query`` against Orthanc's worklist SCP, and Orthanc's worklist SCU
(``/modalities/{id}/find-worklist``) against ours."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.support.node import RunningNode, run_node
from tests.support.orthanc import OrthancEndpoint, orthanc
from tests.support.worklist import item, write_wl

PLUGIN = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")
STEP = "ScheduledProcedureStepSequence"


@pytest.fixture(scope="module")
def peers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningNode, OrthancEndpoint]]:
    if not PLUGIN.exists():
        message = f"Orthanc's worklist plugin {PLUGIN} is missing (Debian package orthanc)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("orthanc-worklist")
    folder = root / "worklists"
    write_wl(item(PatientName="ORTHANC^ONE", PatientID="O1"), folder / "one.wl")
    write_wl(
        item({"Modality": "MR", "ScheduledStationAETitle": "MR1", "ScheduledProcedureStepID": "S2"},
             PatientName="Bäcker^Jörg", PatientID="O2", AccessionNumber="ACC2"),
        folder / "two.wl",
    )  # fmt: skip
    settings = {"unknown_peers": ["echo", "worklist"], "worklist": {"expire_after_days": 0}}
    with run_node(root / "node", **settings) as node:
        for patient, modality in (("P1", "CT"), ("P2", "MR")):
            added = node.cli(
                "worklist", "add", "--patient-name", f"DOE^{patient}", "--patient-id",
                patient, "--modality", modality, "--station-aet", f"{modality}1", "--date",
                "20261202", "--time", "0930", "--accession", f"A{patient}",
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
        overrides = {
            "Plugins": [str(PLUGIN)],
            "Worklists": {"Enable": True, "Database": str(folder)},
        }
        modalities = {"node": (node.ae_title, node.host, node.port)}
        with orthanc(root / "orthanc", modalities=modalities, config_overrides=overrides) as pacs:
            yield node, pacs


def test_our_query_against_orthancs_worklist(peers: tuple[RunningNode, OrthancEndpoint]) -> None:
    node, pacs = peers
    address = f"{pacs.aet}@{pacs.host}:{pacs.dicom_port}"
    done = node.cli("worklist", "query", address, "--modality", "MR", "--json")
    assert done.returncode == 0, done.stderr
    (answer,) = [Dataset.from_json(a) for a in json.loads(done.stdout)]
    assert (answer.PatientID, str(answer.PatientName)) == ("O2", "Bäcker^Jörg")
    step = answer[STEP][0]
    assert (step.Modality, step.ScheduledStationAETitle, step.ScheduledProcedureStepID) == (
        "MR",
        "MR1",
        "S2",
    )
    everything = node.cli("worklist", "query", address)
    assert everything.returncode == 0, everything.stderr
    assert "ORTHANC^ONE" in everything.stdout and "Bäcker^Jörg" in everything.stdout


def test_orthancs_worklist_query_against_ours(peers: tuple[RunningNode, OrthancEndpoint]) -> None:
    node, pacs = peers
    answers = pacs.post(
        "/modalities/node/find-worklist",
        {
            "PatientID": "",
            "PatientName": "",
            "AccessionNumber": "",
            STEP: [
                {"Modality": "MR", "ScheduledStationAETitle": "", "ScheduledProcedureStepID": ""}
            ],
        },
    )
    assert [(a["PatientID"], a["PatientName"], a["AccessionNumber"]) for a in answers] == [
        ("P2", "DOE^P2", "AP2")
    ]
    (step,) = answers[0][STEP]
    assert step["Modality"] == "MR" and step["ScheduledStationAETitle"] == "MR1"
    assert step["ScheduledProcedureStepID"]  # generated when the item was added
    node.wait_for_log("worklist C-FIND from ORTHANC: 1 items")
