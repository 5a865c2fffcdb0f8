"""The presentation-context policy (dicomnode.policy): pure functions, no sockets."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.config import Service
from dicomnode.policy import (
    DEFAULT_CONFORMANCE,
    SERVICE_SOP_CLASSES,
    SOP_CLASS_GROUPS,
    TRANSFER_SYNTAX_GROUPS,
    AcceptedClass,
    ConformanceError,
    Decision,
    Policy,
    default_policy,
    is_valid_uid,
    load_policy,
    parse_policy,
    service_of,
    uid_name,
)

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE = REPO / "config" / "conformance.yaml"

# SOP classes
VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"  # CTImageStorage
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # EnhancedCTImageStorage
MR = "1.2.840.10008.5.1.4.1.1.4"  # MRImageStorage
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # StudyRootQueryRetrieveInformationModelFind
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # StudyRootQueryRetrieveInformationModelMove
PATIENT_GET = "1.2.840.10008.5.1.4.1.2.1.3"  # PatientRootQueryRetrieveInformationModelGet
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"  # ModalityWorklistInformationFind
MPPS = "1.2.840.10008.3.1.2.3.3"  # ModalityPerformedProcedureStep
MPPS_RETRIEVE = "1.2.840.10008.3.1.2.3.4"  # N-GET: no SCP for it, so not in the default policy
MPPS_NOTIFICATION = "1.2.840.10008.3.1.2.3.5"
REPOSITORY_QUERY = "1.2.840.10008.5.1.4.1.1.201.6"  # RepositoryQuery (a C-FIND SOP class)
# Transfer syntaxes
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"

ECHO_STORE = frozenset({Service.ECHO, Service.STORE})
EVERYTHING = frozenset(Service)


def policy_with(**changes: Any) -> Policy:
    """The default conformance data with some top-level keys replaced."""
    data = copy.deepcopy(dict(DEFAULT_CONFORMANCE))
    data.update(changes)
    return parse_policy(data)


def conformance_error(data: Any) -> str:
    with pytest.raises(ConformanceError) as info:
        parse_policy(data)
    return str(info.value)


# --- the built-in default ----------------------------------------------------------------------


def test_default_accepts_ct_preferring_explicit_vr_little_endian() -> None:
    profile = default_policy().profile("ANYONE", ECHO_STORE)
    decision = profile.decide(1, CT, [IMPLICIT, EXPLICIT])
    assert decision == Decision(1, CT, (IMPLICIT, EXPLICIT), EXPLICIT, "")
    assert decision.accepted


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ([IMPLICIT], IMPLICIT),
        ([BIG_ENDIAN, IMPLICIT], IMPLICIT),
        ([BIG_ENDIAN], BIG_ENDIAN),
        ([J2K_LOSSLESS, DEFLATED], DEFLATED),
        ([J2K_LOSSLESS, EXPLICIT], EXPLICIT),
        ([J2K_LOSSLESS], J2K_LOSSLESS),
        ([J2K_LOSSLESS, JPEG_BASELINE], JPEG_BASELINE),
    ],
)
def test_default_chooses_our_first_preference_that_was_offered(
    offered: list[str], chosen: str
) -> None:
    decision = default_policy().profile("ANYONE", ECHO_STORE).decide(3, MR, offered)
    assert decision.transfer_syntax == chosen


def test_compressed_only_offer_is_accepted_as_offered() -> None:
    decision = default_policy().profile("ANYONE", ECHO_STORE).decide(5, CT, [J2K_LOSSLESS])
    assert decision.accepted
    assert decision.transfer_syntax == J2K_LOSSLESS
    assert decision.reason == ""


def test_default_verification_accepts_only_little_endian_uncompressed() -> None:
    profile = default_policy().profile("ANYONE", ECHO_STORE)
    assert profile.decide(1, VERIFICATION, [IMPLICIT]).transfer_syntax == IMPLICIT
    rejected = profile.decide(1, VERIFICATION, [BIG_ENDIAN, J2K_LOSSLESS])
    assert rejected.transfer_syntax is None
    assert rejected.reason == (
        "no offered transfer syntax is accepted "
        "(we accept: ExplicitVRLittleEndian, ImplicitVRLittleEndian)"
    )


@pytest.mark.parametrize(
    "sop_class", ["1.2.3.4.5", REPOSITORY_QUERY, MPPS_RETRIEVE, MPPS_NOTIFICATION]
)
def test_unknown_or_unsupported_sop_class_is_rejected_with_the_reason(sop_class: str) -> None:
    profile = default_policy().profile("ANYONE", EVERYTHING)
    decision = profile.decide(7, sop_class, [EXPLICIT])
    assert not decision.accepted
    assert decision.transfer_syntax is None
    assert decision.reason == "SOP class not in the conformance policy"


@pytest.mark.parametrize(
    ("sop_class", "service"), [(WORKLIST_FIND, Service.WORKLIST), (MPPS, Service.MPPS)]
)
def test_default_accepts_worklist_and_mpps_for_callers_allowed_them(
    sop_class: str, service: Service
) -> None:
    allowed = default_policy().profile("SCANNER", frozenset({service}))
    assert allowed.decide(1, sop_class, [IMPLICIT, EXPLICIT]).transfer_syntax == EXPLICIT
    refused = default_policy().profile("ANYONE", ECHO_STORE).decide(1, sop_class, [EXPLICIT])
    assert refused.reason == f"calling AE may not use the '{service.value}' service"


def test_sop_class_of_a_service_the_caller_may_not_use_is_rejected() -> None:
    profile = default_policy().profile("ECHO_ONLY", frozenset({Service.ECHO}))
    assert set(profile.classes) == {VERIFICATION}
    decision = profile.decide(3, CT, [EXPLICIT])
    assert not decision.accepted
    assert decision.reason == "calling AE may not use the 'store' service"
    assert profile.decide(1, VERIFICATION, [EXPLICIT]).transfer_syntax == EXPLICIT


def test_no_services_rejects_even_verification() -> None:
    profile = default_policy().profile("NOBODY", frozenset())
    assert dict(profile.classes) == {}
    assert profile.decide(1, VERIFICATION, [EXPLICIT]).reason == (
        "calling AE may not use the 'echo' service"
    )


def test_default_policy_contents() -> None:
    policy = default_policy()
    qr = "1.2.840.10008.5.1.4.1.2."
    find_models = tuple(qr + m for m in ("1.1", "2.1", "1.2", "2.2", "1.3", "2.3"))
    assert tuple(policy.accept) == (
        VERIFICATION,
        *SOP_CLASS_GROUPS["storage"],
        *find_models,
        WORKLIST_FIND,
        MPPS,
    )
    assert policy.accept[WORKLIST_FIND] == AcceptedClass(WORKLIST_FIND, (EXPLICIT, IMPLICIT))
    assert policy.accept[MPPS] == AcceptedClass(MPPS, (EXPLICIT, IMPLICIT))
    assert policy.accept[STUDY_FIND] == AcceptedClass(STUDY_FIND, (EXPLICIT, IMPLICIT))
    assert policy.accept[VERIFICATION] == AcceptedClass(VERIFICATION, (EXPLICIT, IMPLICIT))
    assert policy.accept[CT] == AcceptedClass(CT, TRANSFER_SYNTAX_GROUPS["all"], True, True)
    assert policy.accept[CT].transfer_syntaxes[:4] == (EXPLICIT, IMPLICIT, BIG_ENDIAN, DEFLATED)
    assert dict(policy.peers) == {}
    assert policy.sop_classes() == tuple(policy.accept)
    assert default_policy() is policy


def test_negotiate_decides_every_context_in_order() -> None:
    profile = default_policy().profile("ANYONE", ECHO_STORE)
    decisions = profile.negotiate(
        [(1, VERIFICATION, [IMPLICIT]), (3, CT, [J2K_LOSSLESS]), (5, STUDY_FIND, [EXPLICIT])]
    )
    assert [(d.context_id, d.transfer_syntax) for d in decisions] == [
        (1, IMPLICIT),
        (3, J2K_LOSSLESS),
        (5, None),
    ]


# --- the reference file ------------------------------------------------------------------------


def test_reference_conformance_equals_the_builtin_default() -> None:
    policy = load_policy(CONFORMANCE)
    default = default_policy()
    # Same classes in the same order, each with the same syntaxes in the same order and roles.
    assert list(policy.accept.items()) == list(default.accept.items())
    assert dict(policy.peers) == dict(default.peers) == {}
    assert policy.sop_classes() == default.sop_classes()
    for services in (ECHO_STORE, frozenset({Service.ECHO}), EVERYTHING):
        ours, theirs = policy.profile("X", services), default.profile("X", services)
        assert list(ours.classes.items()) == list(theirs.classes.items())
        assert dict(ours.excluded) == dict(theirs.excluded)


def _uncommented_peer_examples() -> dict[str, Any]:
    """The commented-out ``# peers:`` block at the end of config/conformance.yaml, uncommented."""
    lines = CONFORMANCE.read_text(encoding="utf-8").splitlines()
    start = lines.index("# peers:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else line[1:])
    examples: dict[str, Any] = yaml.safe_load("\n".join(block))
    assert set(examples) == {"peers"}
    return examples


def test_reference_conformance_examples_work_as_documented() -> None:
    data = yaml.safe_load(CONFORMANCE.read_text(encoding="utf-8"))
    assert "peers" not in data
    policy = parse_policy({**data, **_uncommented_peer_examples()}, "examples")
    assert set(policy.peers) == {"CT_SCANNER", "OLD_CR"}

    scanner = policy.profile("CT_SCANNER", ECHO_STORE)
    assert list(scanner.classes) == [VERIFICATION, CT, ENHANCED_CT]
    assert scanner.decide(1, CT, [IMPLICIT, EXPLICIT]).transfer_syntax == EXPLICIT
    assert scanner.decide(3, ENHANCED_CT, [J2K_LOSSLESS]).transfer_syntax == J2K_LOSSLESS
    assert scanner.decide(5, CT, [IMPLICIT, JPEG_BASELINE]).reason == (
        "no offered transfer syntax is accepted "
        "(we accept: ExplicitVRLittleEndian, JPEG2000Lossless)"
    )
    assert scanner.decide(7, MR, [EXPLICIT]).reason == (
        "not accepted from CT_SCANNER (conformance override)"
    )
    assert scanner.decide(9, VERIFICATION, [IMPLICIT]).accepted
    # The top-level storage roles still apply to the replaced list.
    assert (scanner.classes[CT].scu_role, scanner.classes[CT].scp_role) == (True, True)

    old_cr = policy.profile("OLD_CR", ECHO_STORE)
    assert all(c.transfer_syntaxes == (IMPLICIT,) for c in old_cr.classes.values())
    assert old_cr.decide(1, CT, [EXPLICIT, IMPLICIT]).transfer_syntax == IMPLICIT
    assert not old_cr.decide(3, CT, [EXPLICIT]).accepted
    assert old_cr.decide(5, MR, [IMPLICIT]).accepted

    # Everyone else keeps the default policy.
    other = policy.profile("SOMEONE", ECHO_STORE)
    assert other.decide(1, MR, [J2K_LOSSLESS]).transfer_syntax == J2K_LOSSLESS


# --- per-AE overrides --------------------------------------------------------------------------


def test_override_accept_replaces_the_list() -> None:
    policy = policy_with(
        peers={
            "CT_ONLY": {
                "accept": [{"sop_classes": ["CTImageStorage"], "transfer_syntaxes": "uncompressed"}]
            }
        }
    )
    profile = policy.profile("CT_ONLY", ECHO_STORE)
    assert list(profile.classes) == [CT]
    assert profile.classes[CT].transfer_syntaxes == (EXPLICIT, IMPLICIT, BIG_ENDIAN)
    assert profile.decide(1, CT, [J2K_LOSSLESS, IMPLICIT]).transfer_syntax == IMPLICIT
    reason = "not accepted from CT_ONLY (conformance override)"
    assert profile.decide(3, MR, [EXPLICIT]) == Decision(3, MR, (EXPLICIT,), None, reason)
    assert profile.decide(5, VERIFICATION, [EXPLICIT]).reason == reason
    assert profile.decide(7, "1.2.3.4", [EXPLICIT]).reason == (
        "SOP class not in the conformance policy"
    )
    # The AE title is matched without its padding; other callers keep the base policy.
    assert policy.profile("CT_ONLY   ", ECHO_STORE) is profile
    assert policy.profile("OTHER", ECHO_STORE).decide(3, MR, [EXPLICIT]).accepted
    # Services still apply inside the override.
    assert policy.profile("CT_ONLY", frozenset({Service.ECHO})).decide(
        1, CT, [EXPLICIT]
    ).reason == ("calling AE may not use the 'store' service")


def test_override_accept_extends_sop_classes() -> None:
    policy = policy_with(
        peers={
            "QR_CLIENT": {
                "accept": [
                    {"sop_classes": "query_retrieve", "transfer_syntaxes": "ImplicitVRLittleEndian"}
                ]
            }
        }
    )
    assert STUDY_FIND in policy.sop_classes()
    assert policy.sop_classes()[: len(policy.accept)] == tuple(policy.accept)
    client = policy.profile("QR_CLIENT", frozenset({Service.FIND}))
    assert client.decide(1, STUDY_FIND, [IMPLICIT]).accepted
    assert client.decide(3, STUDY_MOVE, [IMPLICIT]).reason == (
        "calling AE may not use the 'move' service"
    )


def test_override_transfer_syntaxes_narrow_in_the_override_order() -> None:
    policy = policy_with(
        peers={"NARROW": {"transfer_syntaxes": ["JPEG2000Lossless", "ImplicitVRLittleEndian"]}}
    )
    profile = policy.profile("NARROW", ECHO_STORE)
    assert profile.classes[CT].transfer_syntaxes == (J2K_LOSSLESS, IMPLICIT)
    assert profile.classes[VERIFICATION].transfer_syntaxes == (IMPLICIT,)
    assert profile.decide(1, CT, [IMPLICIT, J2K_LOSSLESS]).transfer_syntax == J2K_LOSSLESS
    assert profile.decide(3, CT, [EXPLICIT]).reason == (
        "no offered transfer syntax is accepted "
        "(we accept: JPEG2000Lossless, ImplicitVRLittleEndian)"
    )
    # Roles survive the narrowing.
    assert (profile.classes[CT].scu_role, profile.classes[CT].scp_role) == (True, True)


def test_override_narrowing_that_leaves_nothing_excludes_the_class() -> None:
    policy = policy_with(peers={"J2K_ONLY": {"transfer_syntaxes": "JPEG2000Lossless"}})
    profile = policy.profile("J2K_ONLY", ECHO_STORE)
    assert VERIFICATION not in profile.classes
    assert profile.classes[MR].transfer_syntaxes == (J2K_LOSSLESS,)
    decision = profile.decide(1, VERIFICATION, [EXPLICIT, IMPLICIT])
    assert not decision.accepted
    assert decision.reason == "no transfer syntax left for J2K_ONLY after override"


def test_override_accept_and_transfer_syntaxes_together() -> None:
    policy = policy_with(
        peers={
            "BOTH": {
                "accept": [{"sop_classes": ["MRImageStorage"], "transfer_syntaxes": ["all"]}],
                "transfer_syntaxes": ["RLELossless", "ExplicitVRLittleEndian"],
            }
        }
    )
    profile = policy.profile("BOTH", ECHO_STORE)
    assert list(profile.classes) == [MR]
    assert profile.classes[MR].transfer_syntaxes == ("1.2.840.10008.1.2.5", EXPLICIT)


def test_override_roles_apply_after_the_top_level_roles() -> None:
    policy = policy_with(
        peers={
            "GETTER": {
                "accept": [
                    {
                        "sop_classes": ["CTImageStorage", "MRImageStorage"],
                        "transfer_syntaxes": "all",
                    }
                ],
                "roles": [{"sop_classes": ["CTImageStorage"], "scu": False, "scp": True}],
            }
        }
    )
    profile = policy.profile("GETTER", ECHO_STORE)
    assert (profile.classes[CT].scu_role, profile.classes[CT].scp_role) == (False, True)
    assert (profile.classes[MR].scu_role, profile.classes[MR].scp_role) == (True, True)
    # The base policy is untouched.
    assert (policy.accept[CT].scu_role, policy.accept[CT].scp_role) == (True, True)


# --- rules and roles ---------------------------------------------------------------------------


def test_later_rule_replaces_earlier_for_the_same_class() -> None:
    policy = parse_policy(
        {
            "accept": [
                {"sop_classes": ["storage"], "transfer_syntaxes": ["uncompressed"]},
                {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["JPEG2000Lossless"]},
            ]
        }
    )
    assert policy.accept[CT].transfer_syntaxes == (J2K_LOSSLESS,)
    assert policy.accept[MR].transfer_syntaxes == (EXPLICIT, IMPLICIT, BIG_ENDIAN)
    profile = policy.profile("X", ECHO_STORE)
    assert not profile.decide(1, CT, [EXPLICIT]).accepted
    assert profile.decide(3, MR, [EXPLICIT]).accepted

    reversed_order = parse_policy(
        {
            "accept": [
                {"sop_classes": ["CTImageStorage"], "transfer_syntaxes": ["JPEG2000Lossless"]},
                {"sop_classes": ["storage"], "transfer_syntaxes": ["uncompressed"]},
            ]
        }
    )
    assert reversed_order.accept[CT].transfer_syntaxes == (EXPLICIT, IMPLICIT, BIG_ENDIAN)


def test_names_uids_groups_and_repeats_resolve_in_order() -> None:
    policy = parse_policy(
        {
            "accept": [
                {
                    "sop_classes": [CT, "CTImageStorage", "verification"],
                    "transfer_syntaxes": [J2K_LOSSLESS, "uncompressed", "ExplicitVRLittleEndian"],
                }
            ]
        }
    )
    assert list(policy.accept) == [CT, VERIFICATION]
    assert policy.accept[CT].transfer_syntaxes == (J2K_LOSSLESS, EXPLICIT, IMPLICIT, BIG_ENDIAN)


def test_roles_are_applied_to_accepted_classes_only() -> None:
    policy = parse_policy(
        {
            "accept": [
                {"sop_classes": ["CTImageStorage", "MRImageStorage"], "transfer_syntaxes": "all"}
            ],
            "roles": [
                {"sop_classes": ["CTImageStorage"], "scu": False, "scp": True},
                {"sop_classes": ["EnhancedCTImageStorage"], "scu": True, "scp": True},
            ],
        }
    )
    assert policy.accept[CT] == AcceptedClass(CT, TRANSFER_SYNTAX_GROUPS["all"], False, True)
    assert policy.accept[MR].scu_role is None
    assert policy.accept[MR].scp_role is None
    assert ENHANCED_CT not in policy.accept
    assert policy.profile("X", ECHO_STORE).classes[CT].scp_role is True


def test_later_role_rule_wins() -> None:
    policy = policy_with(
        roles=[
            {"sop_classes": "storage", "scu": True, "scp": True},
            {"sop_classes": "CTImageStorage", "scu": True, "scp": False},
        ]
    )
    assert (policy.accept[CT].scu_role, policy.accept[CT].scp_role) == (True, False)
    assert (policy.accept[MR].scu_role, policy.accept[MR].scp_role) == (True, True)


# --- validation errors -------------------------------------------------------------------------

RULE = {"sop_classes": ["storage"], "transfer_syntaxes": ["all"]}
SOP_ALLOWED = (
    "allowed: a SOP class keyword as pydicom names it (e.g. CTImageStorage), its UID, or a "
    "group: verification, storage, query_retrieve, worklist, mpps"
)
TS_ALLOWED = (
    "allowed: a transfer syntax keyword as pydicom names it (e.g. ExplicitVRLittleEndian), its "
    "UID, or a group: uncompressed, deflated, compressed, all"
)


def accept_with(rule: Any, *, before: int = 0) -> dict[str, Any]:
    return {"accept": [RULE] * before + [rule]}


def peer(override: Any, aet: Any = "PEER") -> dict[str, Any]:
    return {"accept": [RULE], "peers": {aet: override}}


ERRORS: list[tuple[Any, str]] = [
    # (data, the exact message)
    ([], "conformance: must be a mapping with the keys accept, roles, peers"),
    (None, "conformance: must be a mapping with the keys accept, roles, peers"),
    (
        {"accept": [RULE], "reject": []},
        "conformance: unknown key 'reject'; allowed here: accept, roles, peers",
    ),
    ({"roles": []}, "conformance: key 'accept' is required"),
    ({"accept": []}, "conformance: accept: must be a non-empty list of rules"),
    ({"accept": RULE}, "conformance: accept: must be a non-empty list of rules"),
    (
        {"accept": ["storage"]},
        "conformance: accept[0]: must be a mapping with sop_classes, transfer_syntaxes",
    ),
    (
        accept_with({**RULE, "syntax": "all"}),
        "conformance: accept[0]: unknown key 'syntax'; allowed here: sop_classes, "
        "transfer_syntaxes",
    ),
    (
        accept_with({"sop_classes": ["storage"]}, before=1),
        "conformance: accept[1]: key 'transfer_syntaxes' is required",
    ),
    (
        accept_with({"transfer_syntaxes": ["all"]}),
        "conformance: accept[0]: key 'sop_classes' is required",
    ),
    (
        accept_with({"sop_classes": ["CTImageStorag"], "transfer_syntaxes": ["all"]}),
        f"conformance: accept[0].sop_classes: unknown SOP class 'CTImageStorag'; {SOP_ALLOWED}",
    ),
    (
        # A Transfer Syntax keyword used as a SOP class.
        accept_with({"sop_classes": ["ExplicitVRLittleEndian"], "transfer_syntaxes": ["all"]}),
        "conformance: accept[0].sop_classes: unknown SOP class 'ExplicitVRLittleEndian'; "
        + SOP_ALLOWED,
    ),
    (
        # A Transfer Syntax UID used as a SOP class.
        accept_with({"sop_classes": [EXPLICIT], "transfer_syntaxes": ["all"]}, before=2),
        f"conformance: accept[2].sop_classes: unknown SOP class '{EXPLICIT}'; {SOP_ALLOWED}",
    ),
    (
        # A SOP class keyword used as a transfer syntax.
        accept_with({"sop_classes": ["storage"], "transfer_syntaxes": ["CTImageStorage"]}),
        "conformance: accept[0].transfer_syntaxes: unknown transfer syntax 'CTImageStorage'; "
        + TS_ALLOWED,
    ),
    (
        # A SOP class UID used as a transfer syntax.
        accept_with({"sop_classes": ["storage"], "transfer_syntaxes": [CT]}),
        f"conformance: accept[0].transfer_syntaxes: unknown transfer syntax '{CT}'; {TS_ALLOWED}",
    ),
    (
        # A group of the other kind.
        accept_with({"sop_classes": ["storage"], "transfer_syntaxes": ["storage"]}),
        "conformance: accept[0].transfer_syntaxes: unknown transfer syntax 'storage'; "
        + TS_ALLOWED,
    ),
    (
        accept_with({"sop_classes": ["uncompressed"], "transfer_syntaxes": ["all"]}),
        f"conformance: accept[0].sop_classes: unknown SOP class 'uncompressed'; {SOP_ALLOWED}",
    ),
    (
        accept_with({"sop_classes": [], "transfer_syntaxes": ["all"]}),
        "conformance: accept[0].sop_classes: must be a non-empty list of SOP class names",
    ),
    (
        accept_with({"sop_classes": ["storage"], "transfer_syntaxes": []}),
        "conformance: accept[0].transfer_syntaxes: must be a non-empty list of transfer "
        "syntax names",
    ),
    (
        accept_with({"sop_classes": None, "transfer_syntaxes": ["all"]}),
        "conformance: accept[0].sop_classes: must be a non-empty list of SOP class names",
    ),
    (
        accept_with({"sop_classes": [1], "transfer_syntaxes": ["all"]}),
        "conformance: accept[0].sop_classes: 1 is not a SOP class name",
    ),
    (
        accept_with({"sop_classes": ["storage"], "transfer_syntaxes": [["all"]]}),
        "conformance: accept[0].transfer_syntaxes: ['all'] is not a transfer syntax name",
    ),
    ({"accept": [RULE], "roles": RULE}, "conformance: roles: must be a list of rules"),
    (
        {"accept": [RULE], "roles": ["storage"]},
        "conformance: roles[0]: must be a mapping with sop_classes, scu, scp",
    ),
    (
        {"accept": [RULE], "roles": [{"sop_classes": "storage", "scu": True, "both": True}]},
        "conformance: roles[0]: unknown key 'both'; allowed here: sop_classes, scu, scp",
    ),
    (
        {"accept": [RULE], "roles": [{"scu": True, "scp": True}]},
        "conformance: roles[0]: key 'sop_classes' is required",
    ),
    (
        {"accept": [RULE], "roles": [{"sop_classes": "storage", "scu": "yes", "scp": True}]},
        "conformance: roles[0].scu: must be true or false, got 'yes'",
    ),
    (
        {"accept": [RULE], "roles": [{"sop_classes": "storage", "scu": True, "scp": 1}]},
        "conformance: roles[0].scp: must be true or false, got 1",
    ),
    (
        {"accept": [RULE], "roles": [{"sop_classes": "storage", "scu": True}]},
        "conformance: roles[0].scp: must be true or false, got None",
    ),
    (
        {
            "accept": [RULE],
            "roles": [{"sop_classes": "JPEG2000Lossless", "scu": True, "scp": True}],
        },
        f"conformance: roles[0].sop_classes: unknown SOP class 'JPEG2000Lossless'; {SOP_ALLOWED}",
    ),
    (
        {"accept": [RULE], "peers": ["PEER"]},
        "conformance: peers: must be a mapping of calling AE title to override",
    ),
    (
        peer({"transfer_syntaxes": "all"}, aet="THIS_TITLE_IS_TOO_LONG"),
        "conformance: peers.THIS_TITLE_IS_TOO_LONG: keys are calling AE titles of 1-16 characters, "
        "no backslash or control characters",
    ),
    (
        peer({"transfer_syntaxes": "all"}, aet="   "),
        "conformance: peers.   : keys are calling AE titles of 1-16 characters, "
        "no backslash or control characters",
    ),
    (
        peer({"transfer_syntaxes": "all"}, aet=104),
        "conformance: peers.104: keys are calling AE titles of 1-16 characters, "
        "no backslash or control characters",
    ),
    (
        peer({}),
        "conformance: peers.PEER: must be a mapping with accept and/or transfer_syntaxes",
    ),
    (
        peer(None),
        "conformance: peers.PEER: must be a mapping with accept and/or transfer_syntaxes",
    ),
    (
        peer(["ExplicitVRLittleEndian"]),
        "conformance: peers.PEER: must be a mapping with accept and/or transfer_syntaxes",
    ),
    (
        peer({"services": ["echo"]}),
        "conformance: peers.PEER: unknown key 'services'; allowed here: accept, "
        "transfer_syntaxes, roles",
    ),
    (peer({"accept": []}), "conformance: peers.PEER.accept: must be a non-empty list of rules"),
    (
        peer({"accept": [{"sop_classes": ["CTImage"], "transfer_syntaxes": "all"}]}),
        "conformance: peers.PEER.accept[0].sop_classes: unknown SOP class 'CTImage'; "
        + SOP_ALLOWED,
    ),
    (
        peer({"transfer_syntaxes": []}),
        "conformance: peers.PEER.transfer_syntaxes: must be a non-empty list of transfer "
        "syntax names",
    ),
    (
        peer({"transfer_syntaxes": ["CTImageStorage"]}),
        "conformance: peers.PEER.transfer_syntaxes: unknown transfer syntax 'CTImageStorage'; "
        + TS_ALLOWED,
    ),
    (
        peer({"accept": [RULE], "roles": [{"sop_classes": "storage", "scu": True, "scp": "no"}]}),
        "conformance: peers.PEER.roles[0].scp: must be true or false, got 'no'",
    ),
]


@pytest.mark.parametrize(("data", "message"), ERRORS)
def test_validation_error_names_the_key_path(data: Any, message: str) -> None:
    assert conformance_error(data) == message


def test_error_messages_start_with_the_where_argument() -> None:
    with pytest.raises(ConformanceError) as info:
        parse_policy({"accept": []}, "site.yaml")
    assert str(info.value) == "site.yaml: accept: must be a non-empty list of rules"


@pytest.mark.parametrize("aet", ["BAD\\AE", "BAD\tAE"])
def test_peer_ae_title_with_forbidden_characters_is_rejected(aet: str) -> None:
    message = conformance_error(peer({"transfer_syntaxes": "all"}, aet=aet))
    assert f"peers.{aet}: keys are calling AE titles" in message


def test_peer_roles_without_accept_are_not_silently_ignored() -> None:
    message = conformance_error(peer({"transfer_syntaxes": "all", "roles": "not a list"}))
    assert message.startswith("conformance: peers.PEER.roles")


def test_every_storage_group_uid_can_be_named_on_its_own() -> None:
    missing = []
    for uid in SOP_CLASS_GROUPS["storage"]:
        try:
            parse_policy({"accept": [{"sop_classes": [uid], "transfer_syntaxes": "all"}]})
        except ConformanceError:
            missing.append(uid)
    assert missing == []


def test_every_query_retrieve_class_belongs_to_a_service() -> None:
    policy = policy_with(
        accept=[{"sop_classes": "query_retrieve", "transfer_syntaxes": "uncompressed"}]
    )
    profile = policy.profile("ECHO_ONLY", frozenset({Service.ECHO}))
    assert not profile.decide(1, REPOSITORY_QUERY, [EXPLICIT]).accepted


# --- loading files -----------------------------------------------------------------------------


def test_load_policy_none_is_the_default() -> None:
    assert load_policy(None) is default_policy()


def test_load_policy_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text(
        "accept:\n  - sop_classes: CTImageStorage\n    transfer_syntaxes: [JPEG2000Lossless]\n"
        "peers:\n  'CT1 ':\n    transfer_syntaxes: JPEG2000Lossless\n",
        encoding="utf-8",
    )
    policy = load_policy(path)
    assert dict(policy.accept) == {CT: AcceptedClass(CT, (J2K_LOSSLESS,))}
    assert set(policy.peers) == {"CT1"}


def test_load_policy_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text("accept:\n  - sop_classes: [storage]\n", encoding="utf-8")
    with pytest.raises(ConformanceError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: accept[0]: key 'transfer_syntaxes' is required"


def test_load_policy_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConformanceError) as info:
        load_policy(path)
    assert str(info.value) == (
        f"{path}: cannot read the conformance file: No such file or directory"
    )


def test_load_policy_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text("accept: [\n", encoding="utf-8")
    with pytest.raises(ConformanceError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: not valid YAML: ")


def test_load_policy_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ConformanceError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: must be a mapping with the keys accept, roles, peers"


def test_load_policy_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "conf.yaml"
    path.write_bytes("# r\u00e9f\u00e9rence\naccept: []\n".encode("latin-1"))
    with pytest.raises(ConformanceError):
        load_policy(path)


# --- decisions and profiles --------------------------------------------------------------------


def test_describe_accepted() -> None:
    decision = default_policy().profile("X", ECHO_STORE).decide(1, CT, [IMPLICIT, EXPLICIT])
    assert decision.describe() == (
        "context 1 CTImageStorage: accepted ExplicitVRLittleEndian "
        "(offered ImplicitVRLittleEndian, ExplicitVRLittleEndian)"
    )


def test_describe_rejected_gives_the_reason() -> None:
    decision = default_policy().profile("X", frozenset({Service.ECHO})).decide(3, MR, [EXPLICIT])
    assert decision.describe() == (
        "context 3 MRImageStorage: rejected, calling AE may not use the 'store' service "
        "(offered ExplicitVRLittleEndian)"
    )


def test_describe_unknown_uids_and_nothing_offered() -> None:
    assert Decision(
        5, "1.2.3.4", ("1.2.3.5",), None, "SOP class not in the conformance policy"
    ).describe() == (
        "context 5 1.2.3.4: rejected, SOP class not in the conformance policy (offered 1.2.3.5)"
    )
    assert Decision(7, CT, (), None, "no offered transfer syntax is accepted").describe() == (
        "context 7 CTImageStorage: rejected, no offered transfer syntax is accepted (offered none)"
    )


def test_profiles_are_cached_per_override_and_services() -> None:
    policy = parse_policy(
        {
            **copy.deepcopy(dict(DEFAULT_CONFORMANCE)),
            "peers": {"SPECIAL": {"transfer_syntaxes": "all"}},
        }
    )
    first = policy.profile("UNKNOWN1", frozenset({Service.ECHO, Service.STORE}))
    assert policy.profile("UNKNOWN2", frozenset({Service.STORE, Service.ECHO})) is first
    assert policy.profile("UNKNOWN1", frozenset({Service.ECHO})) is not first
    special = policy.profile("SPECIAL", ECHO_STORE)
    assert special is not first
    assert policy.profile(" SPECIAL ", ECHO_STORE) is special
    # The cache does not take part in equality.
    assert policy == parse_policy(
        {
            **copy.deepcopy(dict(DEFAULT_CONFORMANCE)),
            "peers": {"SPECIAL": {"transfer_syntaxes": "all"}},
        }
    )


# --- vocabulary helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "name"),
    [
        (CT, "CTImageStorage"),
        (VERIFICATION, "Verification"),
        (EXPLICIT, "ExplicitVRLittleEndian"),
        (J2K_LOSSLESS, "JPEG2000Lossless"),
        ("1.2.3.4", "1.2.3.4"),
        ("", ""),
    ],
)
def test_uid_name(uid: str, name: str) -> None:
    assert uid_name(uid) == name


@pytest.mark.parametrize(
    ("sop_class", "service"),
    [
        (VERIFICATION, Service.ECHO),
        (CT, Service.STORE),
        (MR, Service.STORE),
        (STUDY_FIND, Service.FIND),
        (STUDY_MOVE, Service.MOVE),
        (PATIENT_GET, Service.GET),
        (WORKLIST_FIND, Service.WORKLIST),
        (MPPS, Service.MPPS),
        (EXPLICIT, None),
        ("1.2.3.4", None),
    ],
)
def test_service_of(sop_class: str, service: Service | None) -> None:
    assert service_of(sop_class) is service


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (CT, True),
        ("0", True),
        ("1.0.2", True),
        ("1.2.840.10008.1.2.4.90", True),
        ("1." + "2" * 62, True),  # 64 characters
        ("1." + "2" * 63, False),  # 65 characters
        ("../../x", False),
        ("1.2.03", False),
        ("01.2", False),
        ("", False),
        ("1..2", False),
        (".1.2", False),
        ("1.2.", False),
        ("1.2.a", False),
        ("1.2 .3", False),
        (" 1.2.3", False),
        ("1.2.3\x00", False),
    ],
)
def test_is_valid_uid(value: str, valid: bool) -> None:
    assert is_valid_uid(value) is valid


def test_is_valid_uid_rejects_a_trailing_newline() -> None:
    assert is_valid_uid("1.2.3\n") is False


def test_groups() -> None:
    assert TRANSFER_SYNTAX_GROUPS["uncompressed"] == (EXPLICIT, IMPLICIT, BIG_ENDIAN)
    assert TRANSFER_SYNTAX_GROUPS["deflated"] == (DEFLATED,)
    assert TRANSFER_SYNTAX_GROUPS["all"] == (
        TRANSFER_SYNTAX_GROUPS["uncompressed"]
        + TRANSFER_SYNTAX_GROUPS["deflated"]
        + TRANSFER_SYNTAX_GROUPS["compressed"]
    )
    assert {J2K_LOSSLESS, JPEG_BASELINE} <= set(TRANSFER_SYNTAX_GROUPS["compressed"])
    assert not set(TRANSFER_SYNTAX_GROUPS["compressed"]) & {EXPLICIT, IMPLICIT, DEFLATED}
    assert SOP_CLASS_GROUPS["verification"] == (VERIFICATION,)
    assert {CT, MR, ENHANCED_CT} <= set(SOP_CLASS_GROUPS["storage"])
    assert {STUDY_FIND, STUDY_MOVE, PATIENT_GET} <= set(SOP_CLASS_GROUPS["query_retrieve"])
    assert SOP_CLASS_GROUPS["worklist"] == (WORKLIST_FIND,)
    assert MPPS in SOP_CLASS_GROUPS["mpps"]
    # A SOP class belongs to at most one service.
    every = [uid for uids in SERVICE_SOP_CLASSES.values() for uid in uids]
    assert len(every) == len(set(every))
