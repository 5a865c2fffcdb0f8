"""The peer conformance YAML (dicomnode.preflight) and ``dicomnode conformance check``.

Pure: no sockets. The check runs through the real CLI on real files.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.policy import DEFAULT_CONFORMANCE, SOP_CLASS_GROUPS, AcceptedClass, ConformanceError
from dicomnode.preflight import (
    Device,
    PeerConformance,
    Proposal,
    dump_peer_conformance,
    load_peer_conformance,
    parse_peer_conformance,
)

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "config" / "peers"

CT = "1.2.840.10008.5.1.4.1.1.2"  # CTImageStorage
MR = "1.2.840.10008.5.1.4.1.1.4"  # MRImageStorage
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# --- the schema ----------------------------------------------------------------------------------


def full_peer() -> dict[str, Any]:
    return {
        "device": {
            "name": "Generic CT scanner",
            "kind": "ct_scanner",
            "ae_title": "CT_SCANNER",
            "max_pdu_size": 16384,
            "implementation_class_uid": "1.2.3.4",
            "implementation_version_name": "CT_1",
            "probed": {"host": "ct.example", "port": 104, "at": "2026-01-01T00:00:00Z"},
        },
        "accept": [
            {"sop_classes": ["verification"], "transfer_syntaxes": ["ImplicitVRLittleEndian"]},
            {"sop_classes": ["storage"], "transfer_syntaxes": ["uncompressed"]},
            {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["JPEG2000Lossless"]},
        ],
        "roles": [{"sop_classes": ["storage"], "scu": True, "scp": False}],
        "propose": [
            {
                "sop_classes": ["CTImageStorage"],
                "transfer_syntaxes": ["JPEG2000Lossless", "ExplicitVRLittleEndian"],
            },
            {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["ImplicitVRLittleEndian"]},
            {"sop_classes": ["MRImageStorage"], "transfer_syntaxes": ["all"], "role": "scp"},
        ],
    }


def test_parse_full_peer() -> None:
    peer = parse_peer_conformance(full_peer())
    assert peer.device == Device(
        name="Generic CT scanner",
        kind="ct_scanner",
        ae_title="CT_SCANNER",
        max_pdu_size=16384,
        implementation_class_uid="1.2.3.4",
        implementation_version_name="CT_1",
        probed={"host": "ct.example", "port": "104", "at": "2026-01-01T00:00:00Z"},
    )
    assert peer.accept[VERIFICATION] == AcceptedClass(VERIFICATION, (IMPLICIT,))
    # The later CT rule replaced the storage one; roles folded in.
    assert peer.accept[CT] == AcceptedClass(CT, (J2K_LOSSLESS,), scu_role=True, scp_role=False)
    assert peer.accept[MR].scp_role is False
    assert peer.accept[MR].transfer_syntaxes[:2] == (EXPLICIT, IMPLICIT)
    # One proposal per presentation context, in order; the same class may appear twice.
    assert peer.propose[:2] == (
        Proposal(CT, (J2K_LOSSLESS, EXPLICIT)),
        Proposal(CT, (IMPLICIT,)),
    )
    assert peer.propose[2].sop_class == MR and peer.propose[2].role == "scp"


def test_everything_is_optional() -> None:
    assert parse_peer_conformance({}) == PeerConformance(Device(), {}, ())
    assert parse_peer_conformance({"device": None, "accept": None}) == PeerConformance()


@pytest.mark.parametrize(
    "peer",
    [
        full_peer(),
        {
            "propose": [
                {"sop_classes": "CTImageStorage", "transfer_syntaxes": "ImplicitVRLittleEndian"}
            ]
        },
        {**copy.deepcopy(DEFAULT_CONFORMANCE), "device": {"max_pdu_size": 0}},
        {
            "accept": [
                {"sop_classes": ["1.2.840.10008.5.1.4.1.1.2"], "transfer_syntaxes": ["all"]}
            ],
            "propose": [
                {"sop_classes": ["CTImageStorage", "MRImageStorage"], "transfer_syntaxes": ["all"]},
                {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["all"]},
                {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["all"], "role": "both"},
            ],
        },
    ],
)
def test_dump_round_trips(peer: dict[str, Any]) -> None:
    parsed = parse_peer_conformance(peer)
    text = dump_peer_conformance(parsed)
    assert text.startswith("# ")
    assert parse_peer_conformance(yaml.safe_load(text)) == parsed


def test_dump_writes_keywords_and_groups() -> None:
    text = dump_peer_conformance(parse_peer_conformance(full_peer()))
    data = yaml.safe_load(text)
    assert data["accept"][0] == {
        "sop_classes": ["Verification"],
        "transfer_syntaxes": ["ImplicitVRLittleEndian"],
    }
    # All storage classes but CT share one list: every other one is named; CT has its own rule.
    storage_rule = data["accept"][1]
    assert storage_rule["transfer_syntaxes"] == ["uncompressed"]
    assert len(storage_rule["sop_classes"]) == len(SOP_CLASS_GROUPS["storage"]) - 1
    assert data["accept"][2] == {
        "sop_classes": ["CTImageStorage"],
        "transfer_syntaxes": ["JPEG2000Lossless"],
    }
    assert data["roles"] == [{"sop_classes": ["storage"], "scu": True, "scp": False}]
    assert "CTImageStorage" in text and "1.2.840.10008.5.1.4.1.1.2\n" not in text


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.yaml"
    path.write_text(dump_peer_conformance(parse_peer_conformance(full_peer())), encoding="utf-8")
    assert load_peer_conformance(path) == parse_peer_conformance(full_peer())
    path.write_text("accept: [", encoding="utf-8")
    with pytest.raises(ConformanceError, match="not valid YAML"):
        load_peer_conformance(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(acept=[]), r"unknown key 'acept'; allowed here: device, accept, roles"),
        (lambda d: d["device"].update(colour="red"), r"device: unknown key 'colour'"),
        (lambda d: d["device"].update(ae_title="A" * 17), r"device\.ae_title: an AE title"),
        (lambda d: d["device"].update(max_pdu_size=-1), r"device\.max_pdu_size: a whole number"),
        (lambda d: d["device"].update(max_pdu_size=True), r"device\.max_pdu_size"),
        (
            lambda d: d["device"].update(implementation_class_uid="1.02"),
            r"device\.implementation_class_uid: a UID",
        ),
        (
            lambda d: d["device"].update(implementation_version_name="X" * 17),
            r"implementation_version_name: at most 16 characters",
        ),
        (lambda d: d["device"].update(probed=[1]), r"device\.probed: must be a mapping"),
        (lambda d: d["device"].update(name=3), r"device\.name: must be a text"),
        (lambda d: d.update(accept=[]), r"accept: must be a non-empty list"),
        (
            lambda d: d["accept"][1].update(transfer_syntaxes=["CTImageStorage"]),
            r"accept\[1\]\.transfer_syntaxes: unknown transfer syntax 'CTImageStorage'",
        ),
        (lambda d: d["roles"][0].pop("scp"), r"roles\[0\]\.scp: must be true or false"),
        (lambda d: d.pop("accept"), r"roles: .* need an accept list"),
        (lambda d: d["propose"][0].update(role="master"), r"propose\[0\]\.role: must be one of"),
        (lambda d: d["propose"][1].pop("transfer_syntaxes"), r"propose\[1\]: key 'transfer_"),
        (lambda d: d["propose"][2].update(tls=True), r"propose\[2\]: unknown key 'tls'"),
        (
            lambda d: d["propose"][0].update(sop_classes=["CTImage"]),
            r"propose\[0\]\.sop_classes: unknown SOP class 'CTImage'; allowed: a SOP class",
        ),
        (lambda d: d.update(propose={}), r"propose: must be a non-empty list"),
    ],
)
def test_errors_name_the_key(change: Any, message: str) -> None:
    data = full_peer()
    change(data)
    with pytest.raises(ConformanceError, match=message):
        parse_peer_conformance(data, "peer.yaml")


def test_not_a_mapping() -> None:
    with pytest.raises(ConformanceError, match=r"peer\.yaml: must be a mapping with the keys"):
        parse_peer_conformance(["accept"], "peer.yaml")
