"""``dicomnode probe`` against real peers over loopback: DCMTK storescp (a restricted
association negotiation profile, and accept-all), DCMTK dcmqrscp, Orthanc and our own node.

Every expectation comes from how the peer was configured (storescp's profile file, Orthanc's
configuration, our node's conformance YAML) or from what the peer documents (DCMTK's
storescp.cfg), never from an earlier probe.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydicom._uid_dict import UID_dictionary
from pydicom.data import get_testdata_file
from pynetdicom import AE, acse, presentation
from pynetdicom.presentation import build_context

from dicomnode import probe
from dicomnode.cli import main
from dicomnode.config import Config, Limits, Peer, Service
from dicomnode.identity import IMPLEMENTATION_CLASS_UID
from dicomnode.policy import (
    SOP_CLASS_GROUPS,
    TRANSFER_SYNTAX_GROUPS,
    AcceptedClass,
    parse_policy,
)
from dicomnode.preflight import PeerConformance, parse_peer_conformance
from dicomnode.status import ExitCode
from tests.support.dcmtk import Endpoint, dcmqrscp, free_port, require_dcmtk, storescp
from tests.support.node import RunningNode, run_node
from tests.support.orthanc import OrthancEndpoint, orthanc, require_orthanc
from tests.support.tls import make_pki, require_dcmtk_tls

PROBER_AET = "DNPROBER"


def uid(keyword: str) -> str:
    """The UID of a pydicom keyword, as the YAML names it."""
    found = [u for u, info in UID_dictionary.items() if info[4] == keyword]
    assert len(found) == 1, keyword
    return found[0]


CT, MR, SC = uid("CTImageStorage"), uid("MRImageStorage"), uid("SecondaryCaptureImageStorage")
US = uid("UltrasoundImageStorage")
VERIFICATION = uid("Verification")
EVRLE, IVRLE = uid("ExplicitVRLittleEndian"), uid("ImplicitVRLittleEndian")
EVRBE, DEFLATED = uid("ExplicitVRBigEndian"), uid("DeflatedExplicitVRLittleEndian")
J2K_LOSSLESS, JPEGLS_LOSSLESS = uid("JPEG2000Lossless"), uid("JPEGLSLossless")
HTJ2K_LOSSLESS, RLE = uid("HTJ2KLossless"), uid("RLELossless")
QR_MODELS = {
    f"{root}QueryRetrieveInformationModel{op}": uid(f"{root}QueryRetrieveInformationModel{op}")
    for root in ("PatientRoot", "StudyRoot")
    for op in ("Find", "Move", "Get")
}
MWL_FIND = uid("ModalityWorklistInformationModelFind")
MPPS = uid("ModalityPerformedProcedureStep")


# --- helpers -------------------------------------------------------------------------------


def write_config(path: Path, **settings: Any) -> Path:
    """Our SCU's configuration: its own AE title, short timeouts."""
    data: dict[str, Any] = {
        "ae_title": PROBER_AET,
        "limits": {"acse_timeout": 5, "dimse_timeout": 10, "network_timeout": 10},
        **settings,
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_cli(config: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m dicomnode.cli --config CONFIG ARGS`` as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "DICOMNODE_CONFIG"}
    argv = [sys.executable, "-m", "dicomnode.cli", "--config", str(config), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)


def probe_cli(
    config: Path, address: str, out: Path, *args: str | Path
) -> tuple[PeerConformance, str, subprocess.CompletedProcess[str]]:
    """Run ``dicomnode probe``; the YAML it wrote, parsed as ``check`` reads it, and its text."""
    result = run_cli(config, "probe", address, "--output", out, *args)
    assert result.returncode == ExitCode.SUCCESS, result.stderr
    text = out.read_text(encoding="utf-8")
    return parse_peer_conformance(yaml.safe_load(text), str(out)), text, result


def syntaxes(peer: PeerConformance) -> dict[str, tuple[str, ...]]:
    return {sop: accepted.transfer_syntaxes for sop, accepted in peer.accept.items()}


def associations(text: str) -> int:
    match = re.search(r"Probed by dicomnode probe: (\d+) associations", text)
    assert match, text
    return int(match.group(1))


def api_config() -> Config:
    return Config(ae_title=PROBER_AET, limits=Limits(acse_timeout=5, dimse_timeout=10))


def as_peer(endpoint: Endpoint) -> Peer:
    return Peer(name=endpoint.aet, ae_title=endpoint.aet, host=endpoint.host, port=endpoint.port)


# --- storescp with a restricted association negotiation profile -------------------------------

# DCMTK's configuration file format (storescp -xf FILE PROFILE; /etc/dcmtk/storescp.cfg is the
# documented sample): transfer syntax lists in the acceptor's order of preference, presentation
# contexts pairing a SOP class with a list, and a profile naming the contexts.
RESTRICTED_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[J2KFirst]
TransferSyntax1 = JPEG2000LosslessOnly
TransferSyntax2 = LittleEndianExplicit
[ExplicitFirst]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = JPEG2000LosslessOnly

[[PresentationContexts]]
[Restricted]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\J2KFirst
PresentationContext3 = SecondaryCaptureImageStorage\\J2KFirst
PresentationContext4 = MRImageStorage\\ExplicitFirst

[[Profiles]]
[Restricted]
PresentationContexts = Restricted
"""


# What that profile accepts, in its order of preference.
RESTRICTED_ACCEPTS = {
    VERIFICATION: (EVRLE, IVRLE),
    CT: (J2K_LOSSLESS, EVRLE),
    SC: (J2K_LOSSLESS, EVRLE),
    MR: (EVRLE, J2K_LOSSLESS),
}


@pytest.fixture(scope="module")
def restricted_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the restricted storescp writes what it receives (nothing, ever)."""
    return tmp_path_factory.mktemp("restricted") / "out"


@pytest.fixture(scope="module")
def restricted(restricted_out: Path) -> Iterator[Endpoint]:
    profile = restricted_out.parent / "restricted.cfg"
    profile.write_text(RESTRICTED_PROFILE, encoding="ascii")
    with storescp(
        restricted_out, aet="RESTRICTED", options=("-xf", str(profile), "Restricted")
    ) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def accept_all(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    with storescp(tmp_path_factory.mktemp("accept_all") / "out", aet="ACCEPTALL") as endpoint:
        yield endpoint


def test_restricted_storescp_full_default_probe(
    restricted: Endpoint, restricted_out: Path, tmp_path: Path
) -> None:
    """The default probe (every storage class x every transfer syntax) finds exactly the
    profile: Verification, CT and SC with JPEG 2000 lossless preferred, MR with explicit VR
    little endian preferred; nothing else; screening keeps it to a few associations."""
    config = write_config(tmp_path / "scu.yaml")
    out = tmp_path / "restricted.yaml"
    peer, text, result = probe_cli(config, restricted.address, out)

    assert syntaxes(peer) == RESTRICTED_ACCEPTS
    # No Q/R model accepted: no C-GET, so no role selection was asked or written.
    assert all(a.scu_role is None and a.scp_role is None for a in peer.accept.values())
    assert "roles:" not in text
    # Compact: one accept rule per distinct transfer syntax list (CT and SC share theirs).
    data = yaml.safe_load(text)
    assert len(data["accept"]) == 3
    assert sorted(data["accept"][1]["sop_classes"]) == [
        "CTImageStorage",
        "SecondaryCaptureImageStorage",
    ]
    device = peer.device
    assert device.ae_title == "RESTRICTED"
    assert device.max_pdu_size == 16384  # storescp's default -pdu
    assert device.implementation_class_uid.startswith("1.2.276.0.7230010.3.")  # OFFIS DCMTK
    assert device.implementation_version_name.startswith("OFFIS_DCMTK")
    assert device.probed["host"] == restricted.host
    assert device.probed["port"] == str(restricted.port)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", device.probed["at"])
    # 170 classes screened in 2 associations, the 4 accepted swept in 1, their order in 1.
    assert associations(text) <= 5
    assert "C-ECHO answered 0x0000 Success" in result.stderr
    assert "3 of 170 SOP classes accepted" in result.stderr
    # Nothing but negotiation and one C-ECHO: storescp received no data set.
    assert not any(restricted_out.iterdir())


def test_check_reads_what_probe_wrote(restricted: Endpoint, tmp_path: Path) -> None:
    """The probed YAML is what ``conformance check`` reads. A policy holding CT only in syntaxes
    the peer accepts passes; adding a class the peer lacks (Ultrasound) is a gap, a mismatch
    with --strict; our default policy (CT in every syntax, video ones included, which nothing
    can turn into what this peer takes) is a mismatch."""
    config = write_config(tmp_path / "scu.yaml")
    theirs = tmp_path / "restricted.yaml"
    probe_cli(config, restricted.address, theirs)

    def check(ours: Path, *options: str) -> tuple[int, list[dict[str, Any]]]:
        args = ["conformance", "check", str(ours), str(theirs), "--format", "json", *options]
        done = CliRunner().invoke(main, args)
        assert done.exit_code in (ExitCode.SUCCESS, ExitCode.FAILURE), done.output
        report = json.loads(done.stdout)
        storage = [s for s in report["sections"] if s["key"] == "storage_to_them"]
        return done.exit_code, [f for s in storage for f in s["findings"]]

    def policy(name: str, *rules: dict[str, Any]) -> Path:
        path = tmp_path / f"{name}.yaml"
        verification = {"sop_classes": ["Verification"], "transfer_syntaxes": [EVRLE]}
        path.write_text(yaml.safe_dump({"accept": [verification, *rules]}), encoding="utf-8")
        return path

    ct = {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": [J2K_LOSSLESS, EVRLE]}
    code, findings = check(policy("fits", ct))
    assert code == ExitCode.SUCCESS, findings
    assert [f["severity"] for f in findings] == ["ok"]
    assert findings[0]["sop_classes"] == ["CTImageStorage"]

    us = {"sop_classes": ["UltrasoundImageStorage"], "transfer_syntaxes": [EVRLE]}
    with_us = policy("with_us", ct, us)
    code, findings = check(with_us)
    assert code == ExitCode.SUCCESS
    assert {(f["severity"], tuple(f["sop_classes"])) for f in findings} == {
        ("ok", ("CTImageStorage",)),
        ("gap", ("UltrasoundImageStorage",)),
    }
    code, _ = check(with_us, "--strict")
    assert code == ExitCode.FAILURE

    default = Path(__file__).resolve().parent.parent / "config" / "conformance.yaml"
    code, findings = check(default)
    assert code == ExitCode.FAILURE
    assert any(
        f["severity"] == "mismatch" and "CTImageStorage" in f["sop_classes"] for f in findings
    )


def test_held_probes_the_classes_we_hold(restricted: Endpoint, tmp_path: Path) -> None:
    """--held: the SOP classes of what our index holds (here one CT image), not the policy's:
    the peer also accepts MR, but we hold none, so MR is not asked about."""
    with run_node(tmp_path / "node") as ours:
        sent = ours.cli("send", ours.address, str(get_testdata_file("CT_small.dcm")))
        assert sent.returncode == ExitCode.SUCCESS, sent.stderr
        out = tmp_path / "held.yaml"
        done = ours.cli("probe", restricted.address, "--held", "--output", str(out))
    assert done.returncode == ExitCode.SUCCESS, done.stderr
    peer = parse_peer_conformance(yaml.safe_load(out.read_text(encoding="utf-8")))
    assert syntaxes(peer) == {
        VERIFICATION: RESTRICTED_ACCEPTS[VERIFICATION],
        CT: (J2K_LOSSLESS, EVRLE),
    }
    assert "1 of 1 SOP classes accepted" in done.stderr
    # No index yet: a usage error, and none is created.
    config = write_config(tmp_path / "scu.yaml")
    empty = run_cli(config, "probe", restricted.address, "--held")
    assert empty.returncode == ExitCode.USAGE
    assert "no index at" in empty.stderr
    assert not (tmp_path / "var").exists()


def test_why_a_class_is_not_accepted(restricted: Endpoint) -> None:
    """The screening answer tells "not this class" (3) from "not in these syntaxes" (4)."""
    options = probe.ProbeOptions(
        sop_classes=(CT, US), transfer_syntaxes=(JPEGLS_LOSSLESS,), services=False
    )
    result = probe.probe(api_config(), as_peer(restricted), options)
    assert result.failure is None and result.accepted() == {}
    assert result.associations == 1  # nothing left to sweep
    reasons = probe.ContextResult
    assert result.classes[CT].screen_result == reasons.TRANSFER_SYNTAXES_NOT_SUPPORTED
    assert result.classes[US].screen_result == reasons.ABSTRACT_SYNTAX_NOT_SUPPORTED
    summary = "\n".join(probe.summary(result))
    assert "not accepted, transfer syntaxes not supported: CTImageStorage" in summary
    assert "not accepted, abstract syntax not supported: UltrasoundImageStorage" in summary
    assert probe.peer_conformance(result).accept == {}


def test_smaller_batches_find_the_same(restricted: Endpoint) -> None:
    """--batch 16: for devices that take fewer contexts; the same answers in more associations."""
    result = probe.probe(api_config(), as_peer(restricted), probe.ProbeOptions(batch=16))
    assert result.failure is None
    assert {u: r.accepted for u, r in result.accepted().items()} == RESTRICTED_ACCEPTS
    screened = len(SOP_CLASS_GROUPS["storage"]) + len(probe.SERVICE_CLASSES)
    assert result.associations >= screened // 16


def test_exhaustive_sweep_agrees_with_screening(accept_all: Endpoint) -> None:
    """Screening only skips contexts: without it (every pair proposed) the answers are the
    same. storescp +xa accepts what DCMTK 3.6.7 knows: no HTJ2K, and no Enhanced RT Image."""
    enhanced_rt = uid("EnhancedRTImageStorage")
    candidates = (EVRLE, IVRLE, J2K_LOSSLESS, HTJ2K_LOSSLESS, RLE)
    base = probe.ProbeOptions(
        sop_classes=(CT, MR, enhanced_rt), transfer_syntaxes=candidates, services=False
    )
    screened = probe.probe(api_config(), as_peer(accept_all), base)
    exhaustive = probe.probe(api_config(), as_peer(accept_all), replace(base, screen=False))
    assert screened.failure is None and exhaustive.failure is None
    found = {u: set(r.accepted) for u, r in screened.accepted().items()}
    assert found == {u: set(r.accepted) for u, r in exhaustive.accepted().items()}
    assert found == {CT: {EVRLE, IVRLE, J2K_LOSSLESS, RLE}, MR: {EVRLE, IVRLE, J2K_LOSSLESS, RLE}}
    assert (
        screened.classes[enhanced_rt].screen_result
        == probe.ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED
    )
    # Same order of preference either way, and it is storescp's own (JPEG 2000 first).
    assert screened.classes[CT].accepted == exhaustive.classes[CT].accepted
    assert screened.classes[CT].accepted[0] == J2K_LOSSLESS
    assert screened.classes[CT].order is probe.Order.ACCEPTOR
    assert screened.contexts < exhaustive.contexts


@pytest.mark.parametrize("depth", [0, 1, None])
def test_preference_depth(accept_all: Endpoint, depth: int | None) -> None:
    """--preference-depth N places the peer's first N choices, the rest in our order; 0 asks
    nothing (our order). storescp +xa prefers JPEG 2000 lossless, then RLE, then explicit and
    implicit VR little endian ([AnyTransferSyntax] in /etc/dcmtk/storescp.cfg)."""
    options = probe.ProbeOptions(
        sop_classes=(CT,),
        transfer_syntaxes=(EVRLE, IVRLE, J2K_LOSSLESS, RLE),
        services=False,
        preference_depth=depth,
    )
    result = probe.probe(api_config(), as_peer(accept_all), options)
    assert result.failure is None
    found = result.classes[CT]
    expected = {
        0: ((EVRLE, IVRLE, J2K_LOSSLESS, RLE), probe.Order.UNPROBED),
        1: ((J2K_LOSSLESS, EVRLE, IVRLE, RLE), probe.Order.PARTIAL),
        None: ((J2K_LOSSLESS, RLE, EVRLE, IVRLE), probe.Order.ACCEPTOR),
    }
    assert (found.accepted, found.order) == expected[depth]


# storescp +xa's order of preference, as DCMTK documents it in the [AnyTransferSyntax] list of
# /etc/dcmtk/storescp.cfg (JPEG 2000 first ... uncompressed last).
DCMTK_ANY_ORDER = (
    "JPEG2000",
    "JPEG2000Lossless",
    "JPEGExtended12Bit",
    "JPEGBaseline8Bit",
    "JPEGLosslessSV1",
    "JPEGLSNearLossless",
    "JPEGLSLossless",
    "RLELossless",
    "MPEG2MPML",
    "MPEG2MPHL",
    "MPEG4HP41",
    "MPEG4HP41BD",
    "MPEG4HP422D",
    "MPEG4HP423D",
    "MPEG4HP42STEREO",
    "HEVCMP51",
    "HEVCM10P51",
    "DeflatedExplicitVRLittleEndian",
    "ExplicitVRLittleEndian",
    "ExplicitVRBigEndian",
    "ImplicitVRLittleEndian",
)


def test_full_default_sweep_of_accept_all_storescp(
    accept_all: Endpoint, tmp_path: Path, record_property: Any
) -> None:
    """The full default probe (170 storage classes x 39 transfer syntaxes, order of preference
    and all) against a peer that accepts nearly everything: the worst case, timed."""
    config = write_config(tmp_path / "scu.yaml")
    out = tmp_path / "accept_all.yaml"
    started = time.monotonic()
    peer, text, result = probe_cli(config, accept_all.address, out)
    elapsed = time.monotonic() - started
    record_property("probe_seconds", round(elapsed, 2))
    record_property("probe_associations", associations(text))
    print(f"full default probe of storescp +xa: {elapsed:.1f} s, {associations(text)} associations")
    storage = {u: a for u, a in peer.accept.items() if u in SOP_CLASS_GROUPS["storage"]}
    assert len(storage) >= 150
    assert CT in storage and uid("EnhancedRTImageStorage") not in storage
    expected = tuple(uid(name) for name in DCMTK_ANY_ORDER)
    assert storage[CT].transfer_syntaxes == expected
    assert HTJ2K_LOSSLESS not in storage[CT].transfer_syntaxes
    # Batches of at most 128 contexts: 170 classes x 39 candidate syntaxes cannot take fewer.
    assert associations(text) >= len(storage) * len(expected) // 128
    assert elapsed < 60, result.stderr


# --- exit codes -----------------------------------------------------------------------------


def test_unreachable_and_refusing_peers_exit_as_echo_does(tmp_path: Path) -> None:
    require_dcmtk("storescp")
    config = write_config(tmp_path / "scu.yaml")
    nobody = f"NOBODY@127.0.0.1:{free_port()}"
    out = tmp_path / "never.yaml"
    probed = run_cli(config, "probe", nobody, "--output", out)
    echoed = run_cli(config, "echo", nobody)
    assert probed.returncode == echoed.returncode == ExitCode.UNREACHABLE
    assert "cannot connect" in probed.stderr
    assert not out.exists()
    with storescp(tmp_path / "refuse", aet="REFUSER", options=("--refuse",)) as refuser:
        probed = run_cli(config, "probe", refuser.address, "--output", out)
        echoed = run_cli(config, "echo", refuser.address)
    assert probed.returncode == echoed.returncode == ExitCode.UNREACHABLE
    assert "rejected the association" in probed.stderr
    # A rejection with no reason given may be a device that cannot take 128 contexts.
    assert "try --batch 16" in probed.stderr
    assert not out.exists()


def test_bad_names_are_usage_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path / "scu.yaml")
    for args in (
        ("--sop-class", "NoSuchStorage"),
        ("--transfer-syntax", "CTImageStorage"),
        ("--sop-class", "ExplicitVRLittleEndian"),
    ):
        # In-process: a usage error is found before any association is tried.
        result = CliRunner().invoke(
            main, ["--config", str(config), "probe", "X@127.0.0.1:104", *args]
        )
        assert result.exit_code == ExitCode.USAGE, (args, result.output)
        assert args[0] in result.output
        assert "unknown" in result.output


# --- dcmqrscp: Query/Retrieve and C-GET role selection ---------------------------------------


@pytest.fixture(scope="module")
def qrscp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    with dcmqrscp(tmp_path_factory.mktemp("qrscp") / "store", max_pdu=32768) as endpoint:
        yield endpoint


def test_dcmqrscp_models_and_get_roles(qrscp: Endpoint, tmp_path: Path) -> None:
    config = write_config(tmp_path / "scu.yaml")
    peer, text, _ = probe_cli(
        config,
        qrscp.address,
        tmp_path / "qr.yaml",
        "--sop-class",
        "CTImageStorage",
        "--sop-class",
        "MRImageStorage",
        "--transfer-syntax",
        "uncompressed",
    )
    for name, model in QR_MODELS.items():
        assert model in peer.accept, name
        assert EVRLE in peer.accept[model].transfer_syntaxes
    assert MWL_FIND not in peer.accept and MPPS not in peer.accept
    # Role selection proposed with a C-GET model: dcmqrscp answers for each storage class that
    # we may be SCP (receive the C-GET's C-STOREs) and SCU.
    for sop in (CT, MR):
        assert peer.accept[sop].scp_role is True
        assert peer.accept[sop].scu_role is True
    assert yaml.safe_load(text)["roles"] == [
        {"sop_classes": ["CTImageStorage", "MRImageStorage"], "scu": True, "scp": True}
    ]
    assert peer.device.max_pdu_size == 32768  # its MaxPDUSize


def test_no_roles_option_leaves_roles_out(qrscp: Endpoint) -> None:
    options = probe.ProbeOptions(sop_classes=(CT,), transfer_syntaxes=(EVRLE,), roles=False)
    result = probe.probe(api_config(), as_peer(qrscp), options)
    assert result.failure is None
    assert result.classes[CT].accepted == (EVRLE,)
    assert result.classes[CT].scp_role is None and not result.classes[CT].roles_proposed


# --- Orthanc --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancEndpoint]:
    require_orthanc()
    with orthanc(
        tmp_path_factory.mktemp("orthanc"), config_overrides={"MaximumPduLength": 65536}
    ) as endpoint:
        yield endpoint


def test_orthanc(orthanc_peer: OrthancEndpoint, tmp_path: Path) -> None:
    config = write_config(tmp_path / "scu.yaml")
    peer, _, _ = probe_cli(
        config,
        orthanc_peer.address,
        tmp_path / "orthanc.yaml",
        "--sop-class",
        "CTImageStorage",
        "--sop-class",
        "MRImageStorage",
    )
    device = peer.device
    assert device.implementation_class_uid and device.implementation_version_name
    assert device.implementation_class_uid != IMPLEMENTATION_CLASS_UID
    assert device.max_pdu_size == 65536
    ct = peer.accept[CT].transfer_syntaxes
    # tests/support/orthanc.py: every syntax DCMTK 3.6.7 knows, no HTJ2K or SMPTE ST 2110.
    for accepted in (EVRLE, IVRLE, DEFLATED, J2K_LOSSLESS, JPEGLS_LOSSLESS, RLE):
        assert accepted in ct
    assert HTJ2K_LOSSLESS not in ct
    assert not {u for u in TRANSFER_SYNTAX_GROUPS["all"] if "1.2.840.10008.1.2.7" in u} & set(ct)
    assert VERIFICATION in peer.accept
    for name, model in QR_MODELS.items():
        assert model in peer.accept, name
    assert MWL_FIND not in peer.accept  # no worklist plugin loaded
    assert peer.accept[CT].scp_role is True  # C-GET: it agrees to send us C-STOREs

    # What probe wrote is what check reads: a policy holding CT as JPEG 2000 lossless or explicit
    # VR and MR uncompressed, querying and retrieving with Study Root, fits this Orthanc.
    ours = tmp_path / "ours.yaml"
    ours.write_text(
        yaml.safe_dump(
            {
                "accept": [
                    {"sop_classes": ["Verification"], "transfer_syntaxes": [EVRLE]},
                    {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": [J2K_LOSSLESS, EVRLE]},
                    {"sop_classes": ["MRImageStorage"], "transfer_syntaxes": ["uncompressed"]},
                    {"sop_classes": list(QR_MODELS.values()), "transfer_syntaxes": [EVRLE]},
                ]
            }
        ),
        encoding="utf-8",
    )
    args = ["conformance", "check", str(ours), str(tmp_path / "orthanc.yaml"), "--format", "json"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == ExitCode.SUCCESS, done.output
    sections = {s["key"]: s["findings"] for s in json.loads(done.stdout)["sections"]}
    for key in ("echo_to_them", "storage_to_them", "qr_to_them", "get_from_them"):
        assert sections[key] and {f["severity"] for f in sections[key]} <= {"ok", "note"}, key
    stored_ct = [f for f in sections["storage_to_them"] if "CTImageStorage" in f["sop_classes"]]
    assert [f["severity"] for f in stored_ct] == ["ok"], stored_ct


# --- our own node ----------------------------------------------------------------------------

NODE_CONFORMANCE: dict[str, Any] = {
    "accept": [
        {"sop_classes": ["verification"], "transfer_syntaxes": [IVRLE, EVRLE]},
        {
            "sop_classes": ["CTImageStorage"],
            "transfer_syntaxes": ["JPEG2000Lossless", "JPEGLSLossless", "ExplicitVRLittleEndian"],
        },
        {"sop_classes": ["MRImageStorage", "SecondaryCaptureImageStorage"],
         "transfer_syntaxes": ["uncompressed"]},
        {
            "sop_classes": [
                "StudyRootQueryRetrieveInformationModelFind",
                "StudyRootQueryRetrieveInformationModelGet",
            ],
            "transfer_syntaxes": ["ExplicitVRLittleEndian"],
        },
        {"sop_classes": ["ModalityWorklistInformationModelFind"],
         "transfer_syntaxes": ["ImplicitVRLittleEndian", "ExplicitVRLittleEndian"]},
    ],
    "roles": [
        {"sop_classes": ["CTImageStorage"], "scu": True, "scp": True},
        {"sop_classes": ["MRImageStorage"], "scu": True, "scp": False},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    everything = [s.value for s in Service]
    root = tmp_path_factory.mktemp("node") / "node"
    with run_node(root, conformance=NODE_CONFORMANCE, unknown_peers=everything) as running:
        yield running


def test_our_node_answers_as_its_policy_says(node: RunningNode, tmp_path: Path) -> None:
    """Probed with its own configuration (so the classes to probe are its policy's), plus one
    class it does not accept: what it accepts as SCP is exactly its policy, roles included."""
    out = tmp_path / "node.yaml"
    result = node.cli("-q", "probe", node.address, "--output", str(out))
    assert result.returncode == ExitCode.SUCCESS, result.stderr
    peer = parse_peer_conformance(yaml.safe_load(out.read_text(encoding="utf-8")))
    policy = parse_policy(NODE_CONFORMANCE)
    profile = policy.profile(node.ae_title, frozenset(Service))
    assert dict(peer.accept) == dict(profile.classes)
    assert peer.accept[CT] == AcceptedClass(CT, (J2K_LOSSLESS, JPEGLS_LOSSLESS, EVRLE), True, True)
    assert peer.accept[MR] == AcceptedClass(MR, (EVRLE, IVRLE, EVRBE), True, False)
    assert peer.device.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert result.stderr == ""  # -q: nothing but errors
    assert node.stored_files() == []  # no data set was sent


def test_our_node_rejects_what_its_policy_does_not_list(node: RunningNode, tmp_path: Path) -> None:
    """--sop-classes-from takes the classes of a policy-form YAML (accept) and of a peer
    conformance (accept and propose: what a scanner would send); the node rejects the one its
    policy does not list."""
    config = write_config(tmp_path / "scu.yaml")
    ours_form = tmp_path / "policy.yaml"
    ours_form.write_text(
        yaml.safe_dump({"accept": [{"sop_classes": ["UltrasoundImageStorage"],
                                    "transfer_syntaxes": ["all"]}]}),
        encoding="utf-8",
    )  # fmt: skip
    peer_form = tmp_path / "scanner.yaml"
    peer_form.write_text(
        yaml.safe_dump({
            "device": {"name": "a CT scanner", "ae_title": "CT1"},
            "propose": [{"sop_classes": ["Verification", "CTImageStorage"],
                         "transfer_syntaxes": ["ExplicitVRLittleEndian"]}],
        }),
        encoding="utf-8",
    )  # fmt: skip
    peer, _, result = probe_cli(
        config,
        node.address,
        tmp_path / "node.yaml",
        "--sop-classes-from",
        ours_form,
        "--sop-classes-from",
        peer_form,
    )
    assert US not in peer.accept
    assert peer.accept[CT].transfer_syntaxes == (J2K_LOSSLESS, JPEGLS_LOSSLESS, EVRLE)
    # Verification is probed as a service, not counted with the storage classes.
    assert "1 of 2 SOP classes accepted" in result.stderr


# --- over DICOM TLS ------------------------------------------------------------------------


def test_probe_over_tls(tmp_path: Path) -> None:
    """--tls: every association of the probe is made over TLS (PS3.15 B.9) with our tls.*
    files, as echo and send make theirs."""
    require_dcmtk_tls("storescp")
    pki = make_pki(tmp_path / "pki")
    options = ("+xa", *pki.peer_server.dcmtk(), "+cf", str(pki.ca))
    with storescp(tmp_path / "out", aet="TLSSCP", options=options) as peer:
        tls = {
            "certificate": str(pki.server.certificate),
            "private_key": str(pki.server.key),
            "ca_certificates": str(pki.ca),
        }
        config = write_config(tmp_path / "scu.yaml", tls=tls)
        conformance, text, _ = probe_cli(
            config,
            peer.address,
            tmp_path / "tls.yaml",
            "--tls",
            "--sop-class",
            "CTImageStorage",
            "--transfer-syntax",
            "uncompressed",
        )
        plain = run_cli(
            config,
            "probe",
            peer.address,
            "--output",
            tmp_path / "plain.yaml",
            "--sop-class",
            "CTImageStorage",
        )
    assert set(conformance.accept[CT].transfer_syntaxes) == {EVRLE, IVRLE, EVRBE}
    assert VERIFICATION in conformance.accept
    assert associations(text) >= 3
    # Without --tls the same port answers no A-ASSOCIATE-AC: unreachable, nothing written.
    assert plain.returncode == ExitCode.UNREACHABLE, plain.stderr
    assert not (tmp_path / "plain.yaml").exists()


# --- an acceptor that follows the proposer's order ------------------------------------------


@contextmanager
def pynetdicom_peer(follow_proposer: bool, monkeypatch: pytest.MonkeyPatch) -> Iterator[Peer]:
    """A pynetdicom acceptor on a free loopback port accepting CT in the uncompressed syntaxes
    (its own order: big endian first). With ``follow_proposer`` it picks, per context, the
    first offered syntax it supports, as PS3.8 9.3.3.2 also allows (the choice is the
    acceptor's), instead of its own first."""
    if follow_proposer:
        original = presentation.negotiate_as_acceptor

        def negotiate(rq_contexts: Any, ac_contexts: Any, roles: Any = None) -> Any:
            supported = {cx.abstract_syntax: cx for cx in ac_contexts}
            results, replies = [], []
            for rq in rq_contexts:
                mine = supported.get(rq.abstract_syntax)
                if mine is not None:
                    order = [ts for ts in rq.transfer_syntax if ts in mine.transfer_syntax]
                    mine = build_context(mine.abstract_syntax, order or mine.transfer_syntax)
                answer, role_items = original([rq], [mine] if mine else [], roles)
                results += answer
                replies += role_items
            return results, replies

        monkeypatch.setattr(acse, "negotiate_as_acceptor", negotiate)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_supported_context(CT, [EVRBE, EVRLE, IVRLE])
    server = ae.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        port = server.server_address[1]
        yield Peer(name="pynetdicom", ae_title="PYNETDICOM", host="127.0.0.1", port=port)
    finally:
        server.shutdown()


@pytest.mark.parametrize("follow_proposer", [False, True])
def test_order_of_preference_or_the_proposers(
    follow_proposer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = probe.ProbeOptions(
        sop_classes=(CT,), transfer_syntaxes=TRANSFER_SYNTAX_GROUPS["uncompressed"], services=False
    )
    with pynetdicom_peer(follow_proposer, monkeypatch) as peer:
        result = probe.probe(api_config(), peer, options)
    assert result.failure is None
    found = result.classes[CT]
    if follow_proposer:
        # Forwards and reversed it picked differently: no order of its own is known, so the
        # list is in our order and a note says why.
        assert found.order is probe.Order.PROPOSER
        assert found.accepted == (EVRLE, IVRLE, EVRBE)
        assert any("proposer's order" in note for note in probe.notes(result))
    else:
        assert found.order is probe.Order.ACCEPTOR
        assert found.accepted == (EVRBE, EVRLE, IVRLE)
        assert probe.notes(result) == []
