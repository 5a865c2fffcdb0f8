"""Association negotiation against a real node: the policy decides what each caller gets, and
every rejection is explained in the log."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.uid import JPEG2000Lossless
from pynetdicom import AE, build_role

from dicomnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.status import Status
from tests.conftest import require_dcmtk
from tests.support.dimse import UNCOMPRESSED, associate, echo
from tests.support.node import RunningNode, run_node

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
MPPS_NOTIFICATION = "1.2.840.10008.3.1.2.3.5"  # no N-EVENT-REPORT SCP here: not in the policy
EXPLICIT, IMPLICIT = UNCOMPRESSED


def accepted(assoc: object) -> dict[int, tuple[str, str]]:
    return {
        int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))  # type: ignore[attr-defined]
        for cx in assoc.accepted_contexts  # type: ignore[attr-defined]
    }


def test_default_policy_prefers_explicit_and_keeps_compressed(node: RunningNode) -> None:
    contexts = [
        (CT, [IMPLICIT, EXPLICIT]),
        (CT, [str(JPEG2000Lossless)]),
        (STUDY_FIND, [IMPLICIT]),
        (WORKLIST_FIND, [IMPLICIT]),
        (MPPS_NOTIFICATION, [IMPLICIT]),
    ]
    with associate(node, contexts) as assoc:
        assert assoc.is_established
        assert sorted(accepted(assoc).values()) == [(CT, EXPLICIT), (CT, str(JPEG2000Lossless))]
        # Our own implementation identity, never pynetdicom's.
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    log = node.wait_for_log("ModalityPerformedProcedureStepNotification: rejected")
    assert "SOP class not in the conformance policy (offered ImplicitVRLittleEndian)" in log
    # An unknown caller may echo and store only (unknown_peers): no queries, no worklist.
    assert "StudyRootQueryRetrieveInformationModelFind: rejected, calling AE may not use" in log
    assert (
        "ModalityWorklistInformationModelFind: rejected, calling AE may not use the "
        "'worklist' service"
    ) in log
    assert "association from TESTSCU at 127.0.0.1:" in log


def test_unknown_caller_rejected_when_unknown_peers_may_do_nothing(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", unknown_peers=[]) as node:
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        try:
            assert assoc.is_rejected
            rj = assoc.acceptor.primitive
            # PS3.8 9.3.4: rejected-permanent, service-user, calling-AE-title-not-recognized
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        finally:
            ae.shutdown()
        log = node.wait_for_log("association from STRANGER")
        assert "rejected: calling AE title not allowed any service" in log


def test_peer_services_limit_what_it_may_negotiate(tmp_path: Path) -> None:
    peers = {
        "MONITOR": {"ae_title": "MONITOR", "host": "127.0.0.1", "port": 104, "services": ["echo"]}
    }
    with run_node(tmp_path / "node", peers=peers, unknown_peers=["echo", "store"]) as node:
        with associate(node, [(VERIFICATION, [IMPLICIT]), (CT, [EXPLICIT])], "MONITOR") as assoc:
            assert list(accepted(assoc).values()) == [(VERIFICATION, IMPLICIT)]
            assert assoc.send_c_echo().Status == Status.SUCCESS
        log = node.wait_for_log("CTImageStorage: rejected")
        assert "calling AE may not use the 'store' service" in log
        # An unknown caller still gets what unknown_peers allows.
        with associate(node, [(CT, [EXPLICIT])], "SOMEONE") as assoc:
            assert list(accepted(assoc).values()) == [(CT, EXPLICIT)]


def test_conformance_overrides_per_calling_ae(tmp_path: Path) -> None:
    conformance = {
        "accept": [
            {"sop_classes": ["verification"], "transfer_syntaxes": ["uncompressed"]},
            {"sop_classes": ["storage"], "transfer_syntaxes": ["uncompressed", "compressed"]},
        ],
        "peers": {
            "CT_SCANNER": {
                "accept": [
                    {
                        "sop_classes": ["CTImageStorage"],
                        "transfer_syntaxes": ["JPEG2000Lossless", "ExplicitVRLittleEndian"],
                    }
                ]
            },
            "OLD_CR": {"transfer_syntaxes": ["ImplicitVRLittleEndian"]},
        },
    }
    with run_node(tmp_path / "node", conformance=conformance) as node:
        offer = [(CT, [EXPLICIT, str(JPEG2000Lossless)]), (MR, [EXPLICIT])]
        with associate(node, offer, "CT_SCANNER") as assoc:
            assert list(accepted(assoc).values()) == [(CT, str(JPEG2000Lossless))]
        log = node.wait_for_log("MRImageStorage: rejected")
        assert "not accepted from CT_SCANNER (conformance override)" in log
        with associate(node, [(CT, [EXPLICIT])], "OLD_CR") as assoc:
            assert accepted(assoc) == {}
        log = node.wait_for_log("no offered transfer syntax is accepted")
        assert "(we accept: ImplicitVRLittleEndian)" in log
        assert "association from OLD_CR accepted with no usable presentation context" in log
        with associate(node, offer, "ANYONE") as assoc:
            assert sorted(accepted(assoc).values()) == [(CT, EXPLICIT), (MR, EXPLICIT)]


def test_role_selection_for_storage_is_agreed(node: RunningNode) -> None:
    """A C-GET requestor proposes to act as storage SCP (PS3.7 D.3.3.4); the default policy
    agrees to both roles."""
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(CT, [EXPLICIT])
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.ae_title,
        ext_neg=[build_role(CT, scu_role=True, scp_role=True)],
    )
    try:
        assert assoc.is_established
        (cx,) = assoc.accepted_contexts
        assert (cx.as_scu, cx.as_scp) == (True, True)
    finally:
        assoc.release()
        ae.shutdown()


def test_dcmtk_echoscu(node: RunningNode) -> None:
    require_dcmtk("echoscu")
    done = subprocess.run(
        ["echoscu", "-aec", node.ae_title, node.host, str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert echo(node) == Status.SUCCESS
