"""The peer conformance YAML (dicomnode.preflight) and ``dicomnode conformance check``.

Pure: no sockets. The check runs through the real CLI on real files.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from click.testing import CliRunner
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.presentation import build_role

from dicomnode.cli import main
from dicomnode.policy import DEFAULT_CONFORMANCE, SOP_CLASS_GROUPS, AcceptedClass, ConformanceError
from dicomnode.preflight import (
    _KEYWORD_UID,
    Device,
    PeerConformance,
    Proposal,
    dump_peer_conformance,
    load_peer_conformance,
    negotiate_roles,
    parse_peer_conformance,
)
from tests.conftest import require_dcmtk
from tests.support.dcmtk import storescp
from tests.support.node import run_node

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "config" / "peers"

CT = "1.2.840.10008.5.1.4.1.1.2"  # CTImageStorage
MR = "1.2.840.10008.5.1.4.1.1.4"  # MRImageStorage
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # StudyRootQueryRetrieveInformationModelMove

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


# --- role selection as pynetdicom negotiates it --------------------------------------------------


def test_role_negotiation_is_pynetdicoms_table() -> None:
    from pynetdicom.presentation import CONTEXT_REJECTED, DEFAULT_ROLE, SCP_SCU_ROLES

    flags = (None, True, False)
    for proposed in (None, (True, True), (True, False), (False, True), (False, False)):
        for ac_scu in flags:
            for ac_scp in flags:
                accepted = AcceptedClass(CT, (EXPLICIT,), ac_scu, ac_scp)
                # pynetdicom's acceptor: no reply (a None answer) means the default roles,
                # before its table is consulted.
                if None in (ac_scu, ac_scp):
                    outcome = DEFAULT_ROLE
                else:
                    outcome = SCP_SCU_ROLES[proposed or (None, None)][(ac_scu, ac_scp)]
                expected = None if outcome == CONTEXT_REJECTED else (outcome[0], outcome[1])
                assert negotiate_roles(proposed, accepted) == expected, (proposed, accepted)


# --- the check, through the real CLI -------------------------------------------------------------

CONFORMANCE = REPO / "config" / "conformance.yaml"
EXAMPLES = sorted(PEERS.glob("*.yaml"))


def run_check(*args: str | Path) -> tuple[int, str, str]:
    """``dicomnode conformance check ...`` in-process (click's runner; no network involved)."""
    result = CliRunner().invoke(main, ["conformance", "check", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def flat(text: str) -> str:
    """The text report with its line wrapping undone, to search for phrases."""
    return " ".join(text.split())


def check_json(*args: str | Path) -> tuple[int, dict[str, Any]]:
    code, out, _ = run_check(*args, "--format", "json")
    return code, json.loads(out)


def findings(report: dict[str, Any], section: str, severity: str) -> list[dict[str, Any]]:
    return [
        f
        for s in report["sections"]
        if s["key"] == section
        for f in s["findings"]
        if f["severity"] == severity
    ]


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_examples_are_shipped() -> None:
    kinds = {p.stem for p in EXAMPLES}
    assert {"ct_scanner", "mr_scanner", "cr_dr", "ultrasound", "pacs", "workstation_cget"} <= kinds
    assert "worklist_modality" in kinds


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_parses_round_trips_and_checks(path: Path) -> None:
    peer = load_peer_conformance(path)
    assert peer.device.ae_title and peer.device.kind == path.stem
    assert parse_peer_conformance(yaml.safe_load(dump_peer_conformance(peer))) == peer
    code, report = check_json(CONFORMANCE, path)
    # Against the reference policy every example passes but the C-GET workstation: we may hold
    # instances in syntaxes we cannot decompress and it does not offer (MPEG, HEVC, ...).
    expected = 2 if path.stem == "workstation_cget" else 0
    assert code == expected == report["result"]["exit_code"]
    assert report["result"]["mismatches"] == (1 if expected else 0)


def test_ct_scanner_against_the_reference_policy() -> None:
    code, text, _ = run_check(CONFORMANCE, PEERS / "ct_scanner.yaml", "--all")
    out = flat(text)
    assert code == 0
    assert "CT_SCANNER -> us: what it proposes when it calls us" in out
    assert "ok CTImageStorage, EnhancedCTImageStorage: accepted in ExplicitVRLittleEndian" in out
    assert "CT_SCANNER SCU, we SCP" in out
    assert "us -> CT_SCANNER: C-ECHO (dicomnode echo)" in out
    assert out.endswith("exit 0 (SUCCESS: no mismatch; gaps count with --strict)")


def test_workstation_c_get_reports_what_we_cannot_pass_on() -> None:
    code, report = check_json(CONFORMANCE, PEERS / "workstation_cget.yaml")
    assert code == 2
    [mismatch] = findings(report, "get_by_them", "mismatch")
    assert "CTImageStorage" in mismatch["sop_classes"]
    assert "MPEG2MPML" in mismatch["summary"] and "no decoder" in mismatch["summary"]
    assert "VIEWER's C-GET sub-operations for them fail" in mismatch["consequence"]
    # The suggested narrowing keeps what we can pass on and drops the rest.
    change = yaml.safe_load(mismatch["yaml_change"])["accept"][0]["transfer_syntaxes"]
    assert "JPEG2000Lossless" in change and "MPEG2MPML" not in change
    [gap] = findings(report, "get_by_them", "gap")
    assert "RTPlanStorage" in gap["sop_classes"]
    # Its C-GET proposals are accepted, with us agreeing to its SCP role for storage.
    assert findings(report, "them_to_us", "mismatch") == []


def test_matching_pair_exits_zero_through_the_real_command() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomnode.cli",
            "conformance",
            "check",
            CONFORMANCE,
            PEERS / "pacs.yaml",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "us -> PACS: C-GET (dicomnode get)" in out
    assert "PACS -> us: the C-STORE sub-operations of our C-MOVE" in out


# A restricted policy: CT only, uncompressed.
RESTRICTED = {
    "accept": [
        {"sop_classes": ["verification"], "transfer_syntaxes": ["ExplicitVRLittleEndian"]},
        {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["uncompressed"]},
    ],
}
J2K_SCANNER = {
    "device": {"name": "J2K CT", "ae_title": "J2K_CT"},
    "propose": [
        {"sop_classes": ["Verification"], "transfer_syntaxes": ["ImplicitVRLittleEndian"]},
        {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["JPEG2000Lossless"]},
    ],
}


def test_scanner_sending_jpeg2000_to_a_restricted_policy(tmp_path: Path) -> None:
    ours = write(tmp_path / "ours.yaml", RESTRICTED)
    theirs = write(tmp_path / "theirs.yaml", J2K_SCANNER)
    code, text, _ = run_check(ours, theirs)
    out = flat(text)
    assert code == 2
    assert "MISMATCH CTImageStorage: rejected: J2K_CT offers JPEG2000Lossless" in out
    assert "instances of CTImageStorage from J2K_CT will be rejected" in out
    assert "add JPEG2000Lossless to the transfer_syntaxes of the rule for CTImageStorage" in out
    # Verification is offered only in implicit VR, which we do not accept either.
    assert "C-ECHO from J2K_CT fails" in out
    assert "Result: 2 mismatches, 0 gaps, 0 notes: exit 2 (FAILURE" in out

    # The suggested YAML, appended to our file as it says, makes the check pass.
    _, report = check_json(ours, theirs)
    data = copy.deepcopy(RESTRICTED)
    for f in findings(report, "them_to_us", "mismatch"):
        assert f["fix_by"] == "ours"
        data["accept"] += yaml.safe_load(f["yaml_change"])["accept"]
    assert run_check(write(ours, data), theirs)[0] == 0


def test_fallback_context_is_a_note_not_a_mismatch(tmp_path: Path) -> None:
    ours = write(tmp_path / "ours.yaml", RESTRICTED)
    scanner = copy.deepcopy(J2K_SCANNER)
    scanner["propose"] = [
        {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["JPEG2000Lossless"]},
        {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["ExplicitVRLittleEndian"]},
    ]
    code, report = check_json(ours, write(tmp_path / "theirs.yaml", scanner))
    assert code == 0
    [note] = findings(report, "them_to_us", "note")
    assert note["transfer_syntax"] == "ExplicitVRLittleEndian"
    assert "JPEG2000Lossless is rejected" in note["summary"]


def test_override_for_the_calling_ae_title_gets_the_suggestion(tmp_path: Path) -> None:
    data = copy.deepcopy(DEFAULT_CONFORMANCE)
    data["peers"] = {"J2K_CT": {"transfer_syntaxes": ["ExplicitVRLittleEndian"]}}
    ours = write(tmp_path / "ours.yaml", data)
    theirs = write(tmp_path / "theirs.yaml", J2K_SCANNER)
    code, report = check_json(ours, theirs)
    assert code == 2
    assert report["profile"] == "the override peers.J2K_CT"
    ct = next(
        f
        for f in findings(report, "them_to_us", "mismatch")
        if f["sop_classes"] == ["CTImageStorage"]
    )
    change = yaml.safe_load(ct["yaml_change"])
    assert change == {
        "peers": {"J2K_CT": {"transfer_syntaxes": ["ExplicitVRLittleEndian", "JPEG2000Lossless"]}}
    }
    # Under another calling AE title the override does not apply.
    assert check_json(ours, theirs, "--ae-title", "OTHER_CT")[0] == 0


PACS_JPEG_ONLY = {
    "device": {"ae_title": "JPEG_PACS"},
    "accept": [
        {"sop_classes": ["Verification"], "transfer_syntaxes": ["ImplicitVRLittleEndian"]},
        {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["JPEGBaseline8Bit"]},
        {"sop_classes": ["MRImageStorage"], "transfer_syntaxes": ["ImplicitVRLittleEndian"]},
        {
            "sop_classes": [
                "StudyRootQueryRetrieveInformationModelFind",
                "StudyRootQueryRetrieveInformationModelGet",
            ],
            "transfer_syntaxes": ["ImplicitVRLittleEndian"],
        },
    ],
    # It refuses our SCP role for CT (C-GET) and answers nothing for MR.
    "roles": [{"sop_classes": ["CTImageStorage"], "scu": True, "scp": False}],
}


def test_peer_accepting_only_jpeg_for_what_we_hold_uncompressed(tmp_path: Path) -> None:
    ours = write(tmp_path / "ours.yaml", RESTRICTED)
    code, report = check_json(ours, write(tmp_path / "pacs.yaml", PACS_JPEG_ONLY))
    assert code == 2
    [ct] = findings(report, "storage_to_them", "mismatch")
    assert ct["sop_classes"] == ["CTImageStorage"]
    assert "JPEG_PACS accepts it only in JPEGBaseline8Bit" in ct["summary"]
    assert "no lossless conversion fits" in ct["summary"]
    assert "cannot be sent to JPEG_PACS: C-MOVE sub-operations" in ct["consequence"]
    assert ct["fix_by"] == "peer"  # we hold CT only uncompressed: nothing to narrow


def test_peer_refusing_the_scp_role_for_c_get(tmp_path: Path) -> None:
    ours = write(tmp_path / "ours.yaml", DEFAULT_CONFORMANCE)
    code, report = check_json(ours, write(tmp_path / "pacs.yaml", PACS_JPEG_ONLY))
    assert code == 2
    by_class = {f["sop_classes"][0]: f for f in findings(report, "get_from_them", "mismatch")}
    assert "its roles rule answers scp: false" in by_class["CTImageStorage"]["summary"]
    assert "no role selection reply" in by_class["MRImageStorage"]["summary"]
    for f in by_class.values():
        assert f["fix_by"] == "peer"
        assert "dicomnode get from JPEG_PACS cannot bring back" in f["consequence"]
    # Patient Root is not accepted: a note, since Study Root works.
    notes = findings(report, "qr_to_them", "note")
    assert any("dicomnode get --model patient fails" in f["summary"] for f in notes)
    # Agreeing to the role (as the PACS example does) removes those mismatches.
    fixed = copy.deepcopy(PACS_JPEG_ONLY)
    fixed["roles"] = [{"sop_classes": ["storage"], "scu": True, "scp": True}]
    _, report = check_json(ours, write(tmp_path / "pacs.yaml", fixed))
    assert findings(report, "get_from_them", "mismatch") == []


def test_stored_explicit_vr_to_an_implicit_only_peer(tmp_path: Path) -> None:
    ours = write(
        tmp_path / "ours.yaml",
        {"accept": [{"sop_classes": ["MRImageStorage"], "transfer_syntaxes": ["uncompressed"]}]},
    )
    _, report = check_json(ours, write(tmp_path / "pacs.yaml", PACS_JPEG_ONLY))
    # Our C-MOVE offers an uncompressed little endian context next to the stored syntax
    # (dicomnode.retrieve), so what we hold in explicit VR or big endian goes re-encoded.
    assert findings(report, "storage_to_them", "mismatch") == []
    [mr] = findings(report, "storage_to_them", "note")
    assert mr["sop_classes"] == ["MRImageStorage"]
    assert mr["summary"] == (
        "sent as stored in ImplicitVRLittleEndian; held as ExplicitVRLittleEndian, "
        "ExplicitVRBigEndian: re-encoded to ImplicitVRLittleEndian"
    )


def test_c_get_by_them_needs_our_scp_role(tmp_path: Path) -> None:
    data = copy.deepcopy(DEFAULT_CONFORMANCE)
    data["roles"] = [{"sop_classes": ["storage"], "scu": True, "scp": False}]
    ours = write(tmp_path / "ours.yaml", data)
    code, report = check_json(ours, PEERS / "workstation_cget.yaml")
    assert code == 2
    role = [f for f in findings(report, "get_by_them", "mismatch") if "role" in f["summary"]]
    assert role and "CTImageStorage" in role[0]["sop_classes"]
    assert "VIEWER's C-GET cannot bring back instances" in role[0]["consequence"]
    assert yaml.safe_load(role[0]["yaml_change"])["roles"][0]["scp"] is True


def test_services_come_from_the_configuration(tmp_path: Path) -> None:
    node = tmp_path / "dicomnode.yaml"
    node.write_text("ae_title: DICOMNODE\nunknown_peers: [echo, store]\n", encoding="utf-8")
    modality = PEERS / "worklist_modality.yaml"
    result = CliRunner().invoke(
        main,
        [
            "--config",
            str(node),
            "conformance",
            "check",
            str(CONFORMANCE),
            str(modality),
            "--format",
            "yaml",
        ],
    )
    assert result.exit_code == 2
    report = yaml.safe_load(result.stdout)
    assert report["services"] == ["echo", "store"]
    bad = {f["sop_classes"][0]: f for f in findings(report, "them_to_us", "mismatch")}
    assert set(bad) == {"ModalityWorklistInformationModelFind", "ModalityPerformedProcedureStep"}
    assert bad["ModalityWorklistInformationModelFind"]["fix_by"] == "config"
    assert "unknown_peers" in bad["ModalityWorklistInformationModelFind"]["suggestion"]
    assert "cannot fetch its worklist" in bad["ModalityWorklistInformationModelFind"]["consequence"]
    # --services overrides; without a configuration every service is allowed.
    assert run_check(CONFORMANCE, modality, "--services", "echo,store,worklist,mpps")[0] == 0
    assert run_check(CONFORMANCE, modality, "--services", "echo,store")[0] == 2
    assert run_check(CONFORMANCE, modality)[0] == 0


def test_strict_counts_gaps() -> None:
    assert run_check(CONFORMANCE, PEERS / "pacs.yaml")[0] == 0
    code, out, _ = run_check(CONFORMANCE, PEERS / "pacs.yaml", "--strict")
    assert code == 2 and "our C-GET does not propose them" in flat(out)


@pytest.mark.parametrize(
    ("which", "content", "message"),
    [
        ("ours", "accept: []\n", "ours.yaml: accept: must be a non-empty list"),
        ("ours", "acept: []\n", "unknown key 'acept'"),
        (
            "theirs",
            "propose:\n  - {sop_classes: [CTImageStorage], transfer_syntaxes: [all], "
            "role: master}\n",
            "theirs.yaml: propose[0].role: must be one of scu, scp, both",
        ),
        ("theirs", "device: {ae_title: A_VERY_LONG_AE_TITLE}\n", "device.ae_title"),
        ("theirs", "[", "not valid YAML"),
    ],
)
def test_bad_files_exit_usage_naming_the_key(
    tmp_path: Path, which: str, content: str, message: str
) -> None:
    ours = tmp_path / "ours.yaml"
    theirs = tmp_path / "theirs.yaml"
    write(ours, RESTRICTED)
    write(theirs, J2K_SCANNER)
    (ours if which == "ours" else theirs).write_text(content, encoding="utf-8")
    code, out, err = run_check(ours, theirs)
    assert code == 4  # ExitCode.USAGE
    assert message in err and out == ""


def test_missing_file_exits_usage(tmp_path: Path) -> None:
    code, _, err = run_check(CONFORMANCE, tmp_path / "nope.yaml")
    assert code == 4 and "cannot read the peer conformance file" in err


def test_probed_storage_scp_against_the_reference_policy(tmp_path: Path) -> None:
    # What `dicomnode probe` writes for a storescp that takes CT and MR in JPEG 2000 lossless and
    # explicit VR little endian only.
    probed = {
        "device": {
            "name": "RSCP@127.0.0.1:11990",
            "ae_title": "RSCP",
            "max_pdu_size": 16384,
            "implementation_class_uid": "1.2.276.0.7230010.3.0.3.6.7",
            "implementation_version_name": "OFFIS_DCMTK_367",
            "probed": {"host": "127.0.0.1", "port": "11990", "at": "2026-12-02T16:45:38Z"},
        },
        "accept": [
            {"sop_classes": ["Verification"], "transfer_syntaxes": ["ExplicitVRLittleEndian"]},
            {
                "sop_classes": ["CTImageStorage", "MRImageStorage"],
                "transfer_syntaxes": ["JPEG2000Lossless", "ExplicitVRLittleEndian"],
            },
        ],
    }
    code, report = check_json(CONFORMANCE, write(tmp_path / "rscp.yaml", probed))
    assert code == 2
    assert report["peer"]["implementation_version_name"] == "OFFIS_DCMTK_367"
    mismatches = findings(report, "storage_to_them", "mismatch")
    by_fix = {f["fix_by"]: f for f in mismatches}
    assert set(by_fix) == {"peer or ours"}
    # Video and other syntaxes we cannot decompress: narrowing our accept list is offered.
    undecodable = by_fix["peer or ours"]
    assert "no decoder is installed here" in undecodable["summary"]
    kept = yaml.safe_load(undecodable["yaml_change"])["accept"][0]["transfer_syntaxes"]
    assert "MPEG4HP41" not in kept and "JPEG2000" in kept
    # What we can convert is a note: decompressed by C-MOVE, never by dicomnode send.
    [note] = findings(report, "storage_to_them", "note")
    assert "JPEG2000, HTJ2KLossless" in note["summary"]
    assert "decompressed to ExplicitVRLittleEndian" in note["summary"]
    assert "dicomnode send sends files unchanged" in note["consequence"]
    [gap] = findings(report, "storage_to_them", "gap")
    assert "SecondaryCaptureImageStorage" in gap["sop_classes"]


def test_c_move_sub_operations_refused_by_our_access_rules() -> None:
    # The PACS sends the instances of our C-MOVE back as Storage SCU; if dicomnode.yaml does not
    # let its AE title store, every one of them is refused.
    code, report = check_json(CONFORMANCE, PEERS / "pacs.yaml", "--services", "echo,find,move,get")
    assert code == 2
    [refused] = findings(report, "move_subops_to_us", "mismatch")
    assert "CTImageStorage" in refused["sop_classes"]
    assert refused["fix_by"] == "config"
    assert "allow the 'store' service" in refused["suggestion"]


# --- the simulation against a real association with our node ------------------------------------

HONEST_OURS = {
    "accept": [
        {"sop_classes": ["verification"], "transfer_syntaxes": ["ExplicitVRLittleEndian"]},
        {"sop_classes": ["storage"], "transfer_syntaxes": ["uncompressed"]},
        {
            "sop_classes": ["MRImageStorage"],
            "transfer_syntaxes": ["JPEG2000Lossless", "uncompressed"],
        },
        {
            "sop_classes": ["StudyRootQueryRetrieveInformationModelFind"],
            "transfer_syntaxes": ["ImplicitVRLittleEndian"],
        },
    ],
    "roles": [
        {"sop_classes": ["storage"], "scu": True, "scp": True},
        {"sop_classes": ["UltrasoundImageStorage"], "scu": True, "scp": False},
    ],
}
HONEST_PEER = {
    "device": {"ae_title": "HONEST"},
    "propose": [
        {"sop_classes": ["Verification"], "transfer_syntaxes": ["ImplicitVRLittleEndian"]},
        {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["JPEG2000Lossless"]},
        {
            "sop_classes": ["MRImageStorage"],
            "transfer_syntaxes": ["ExplicitVRLittleEndian", "JPEG2000Lossless"],
        },
        {
            "sop_classes": ["SecondaryCaptureImageStorage"],
            "transfer_syntaxes": ["ImplicitVRLittleEndian", "ExplicitVRLittleEndian"],
        },
        {
            "sop_classes": ["StudyRootQueryRetrieveInformationModelFind"],
            "transfer_syntaxes": ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"],
        },
        {
            "sop_classes": ["StudyRootQueryRetrieveInformationModelGet"],
            "transfer_syntaxes": ["ImplicitVRLittleEndian"],
        },
        {
            "sop_classes": ["UltrasoundImageStorage", "ComputedRadiographyImageStorage"],
            "transfer_syntaxes": ["ExplicitVRLittleEndian"],
            "role": "scp",
        },
    ],
}


def test_the_simulation_is_what_our_node_negotiates(tmp_path: Path) -> None:
    """Every context HONEST proposes, proposed for real to a node running HONEST_OURS: what
    check predicts per SOP class (accepted syntax, or a mismatch) is what the node does."""
    peer = parse_peer_conformance(HONEST_PEER)
    with run_node(
        tmp_path / "node", conformance=HONEST_OURS, unknown_peers=["echo", "store", "find"]
    ) as node:
        code, report = check_json(
            tmp_path / "node" / "conformance.yaml",
            write(tmp_path / "honest.yaml", HONEST_PEER),
            "--config",
            str(node.config_path),
        )
        ae = AE(ae_title="HONEST")
        for proposal in peer.propose:
            ae.add_requested_context(proposal.sop_class, list(proposal.transfer_syntaxes))
        roles = [
            build_role(p.sop_class, scu_role=False, scp_role=True)
            for p in peer.propose
            if p.role == "scp"
        ]
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, ext_neg=roles)
        try:
            assert assoc.is_established
            real: dict[str, str | None] = {p.sop_class: None for p in peer.propose}
            for cx in assoc.accepted_contexts:
                # A C-GET requestor's storage context is of use when it got the SCP role.
                wanted_scp = any(p.sop_class == cx.abstract_syntax and p.role for p in peer.propose)
                if cx.as_scp if wanted_scp else cx.as_scu:
                    real[str(cx.abstract_syntax)] = str(cx.transfer_syntax[0])
        finally:
            assoc.release()
    predicted: dict[str, str | None] = {}
    for section in report["sections"]:
        if section["key"] not in ("them_to_us", "get_by_them"):
            continue
        for f in section["findings"]:
            for name in f["sop_classes"]:
                uid = _KEYWORD_UID[name]
                if f["severity"] in ("ok", "note") and section["key"] == "them_to_us":
                    predicted[uid] = _KEYWORD_UID[f["transfer_syntax"]]
                elif f["severity"] == "mismatch":
                    predicted[uid] = None
    # Some answers are worth spelling out: CT only as JPEG 2000 is refused; MR gets our first
    # preference among what was offered; the GET model is refused by our access rules; the SCP
    # role for US is refused by our roles rule, for CR agreed.
    assert real[CT] is None and real[MR] == J2K_LOSSLESS
    assert real["1.2.840.10008.5.1.4.1.1.7"] == EXPLICIT  # Secondary Capture: our order
    assert real["1.2.840.10008.5.1.4.1.2.2.3"] is None  # Study Root GET
    assert real["1.2.840.10008.5.1.4.1.1.6.1"] is None  # Ultrasound: SCP role refused
    assert real["1.2.840.10008.5.1.4.1.1.1"] == EXPLICIT  # CR: SCP role agreed
    assert code == 2
    for uid, syntax in real.items():
        assert predicted.get(uid, "missing") == syntax, uid


def test_c_move_prediction_holds_against_dcmtk(tmp_path: Path) -> None:
    """check says an instance stored in explicit VR little endian is C-MOVEd to a Storage SCP that
    accepts only implicit VR little endian re-encoded (dicomnode.retrieve offers an uncompressed
    context next to the stored syntax), and that one stored in implicit VR goes as stored. A
    real C-MOVE from our node to DCMTK storescp +xi agrees."""
    require_dcmtk("storescp")
    ours = write(
        tmp_path / "ours.yaml",
        {
            "accept": [
                {"sop_classes": ["storage"], "transfer_syntaxes": ["uncompressed"]},
                {"sop_classes": [STUDY_MOVE], "transfer_syntaxes": ["ExplicitVRLittleEndian"]},
            ]
        },
    )
    implicit_only = {
        "device": {"ae_title": "IMPLICIT"},
        "accept": [
            {"sop_classes": ["storage"], "transfer_syntaxes": ["ImplicitVRLittleEndian"]},
        ],
    }
    _, report = check_json(ours, write(tmp_path / "implicit.yaml", implicit_only))
    assert findings(report, "storage_to_them", "mismatch") == []
    [converted] = findings(report, "storage_to_them", "note")
    assert {"CTImageStorage", "MRImageStorage"} <= set(converted["sop_classes"])
    assert converted["summary"] == (
        "sent as stored in ImplicitVRLittleEndian; held as ExplicitVRLittleEndian, "
        "ExplicitVRBigEndian: re-encoded to ImplicitVRLittleEndian"
    )
    ct_path = Path(get_testdata_file("CT_small.dcm"))  # explicit VR little endian
    mr_path = Path(get_testdata_file("MR_small_implicit.dcm"))  # implicit VR little endian
    with (
        storescp(tmp_path / "dest", aet="IMPLICIT", options=("+xi",)) as dest,
        run_node(
            tmp_path / "node",
            conformance=yaml.safe_load(ours.read_text(encoding="utf-8")),
            unknown_peers=["echo", "store", "move"],
            peers={"IMPLICIT": {"ae_title": dest.aet, "host": dest.host, "port": dest.port}},
        ) as node,
    ):
        done = node.cli("send", node.address, str(ct_path), str(mr_path))
        assert done.returncode == 0, done.stdout + done.stderr
        ae = AE(ae_title="MOVER")
        ae.add_requested_context(STUDY_MOVE)
        outcome: dict[str, tuple[int, int]] = {}
        for path in (ct_path, mr_path):
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
            assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
            assert assoc.is_established
            try:
                *_, (status, _) = assoc.send_c_move(query, "IMPLICIT", STUDY_MOVE)
            finally:
                assoc.release()
            completed = int(status.get("NumberOfCompletedSuboperations", 0))
            failed = int(status.get("NumberOfFailedSuboperations", 0))
            outcome[path.name] = (completed, failed)
    assert outcome == {"CT_small.dcm": (1, 0), "MR_small_implicit.dcm": (1, 0)}
