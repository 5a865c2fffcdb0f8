"""Presentation-context policy: the conformance YAML in, negotiation decisions out.

The YAML says, as a conformance statement would (PS3.2 Annex A, "Association Acceptance Policy"):
which SOP classes we accept as SCP, each with its transfer syntaxes in order of preference; which
SCP/SCU roles we agree to (PS3.7 D.3.3.4); and overrides per calling AE title. ``config/
conformance.yaml`` is the commented reference.

This module is pure: no sockets, no files but the one it is asked to read, no pynetdicom objects.
``dicomnode.ae`` turns a :class:`Profile` into pynetdicom presentation contexts, and the same
``Profile.decide`` explains every context that negotiation rejects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    BasicWorklistManagementPresentationContexts,
    ModalityPerformedPresentationContexts,
    QueryRetrievePresentationContexts,
    VerificationPresentationContexts,
)

from dicomnode.config import Service, read_yaml, valid_ae_title


class ConformanceError(ValueError):
    """A conformance YAML that cannot be used; the message names the key and what is allowed."""


# --- the vocabulary: SOP class and transfer syntax groups -------------------------------------

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str) -> bool:
    """PS3.5 9.1: dot-separated numeric components, no leading zeros, at most 64 characters."""
    return len(value) <= 64 and bool(_UID.fullmatch(value))


def _abstract_syntaxes(contexts: Iterable[Any]) -> tuple[str, ...]:
    return tuple(str(cx.abstract_syntax) for cx in contexts)


_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), str(ExplicitVRBigEndian))
_DEFLATED = (str(DeflatedExplicitVRLittleEndian),)

TRANSFER_SYNTAX_GROUPS: Mapping[str, tuple[str, ...]] = {
    "uncompressed": _UNCOMPRESSED,
    "deflated": _DEFLATED,
    # Every encapsulated syntax pydicom knows (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG, HEVC,
    # SMPTE ST 2110): stored as received, never decoded on the way in.
    "compressed": tuple(
        str(ts) for ts in AllTransferSyntaxes if str(ts) not in _UNCOMPRESSED + _DEFLATED
    ),
}
TRANSFER_SYNTAX_GROUPS = {
    **TRANSFER_SYNTAX_GROUPS,
    "all": tuple(uid for group in TRANSFER_SYNTAX_GROUPS.values() for uid in group),
}

_QR = _abstract_syntaxes(QueryRetrievePresentationContexts)

# Which SOP classes each service uses. A calling AE is offered only the SOP classes of the services
# the configuration allows it (config: peers.NAME.services, unknown_peers).
SERVICE_SOP_CLASSES: Mapping[Service, tuple[str, ...]] = {
    Service.ECHO: _abstract_syntaxes(VerificationPresentationContexts),
    Service.STORE: _abstract_syntaxes(AllStoragePresentationContexts),
    # Every Q/R model that is not a retrieve is a query (the FIND models and Repository Query).
    Service.FIND: tuple(uid for uid in _QR if not UID_dictionary[uid][0].endswith(("MOVE", "GET"))),
    Service.MOVE: tuple(uid for uid in _QR if UID_dictionary[uid][0].endswith("MOVE")),
    Service.GET: tuple(uid for uid in _QR if UID_dictionary[uid][0].endswith("GET")),
    Service.WORKLIST: _abstract_syntaxes(BasicWorklistManagementPresentationContexts),
    Service.MPPS: _abstract_syntaxes(ModalityPerformedPresentationContexts),
}

SOP_CLASS_GROUPS: Mapping[str, tuple[str, ...]] = {
    "verification": SERVICE_SOP_CLASSES[Service.ECHO],
    "storage": SERVICE_SOP_CLASSES[Service.STORE],
    "query_retrieve": _QR,
    "worklist": SERVICE_SOP_CLASSES[Service.WORKLIST],
    "mpps": SERVICE_SOP_CLASSES[Service.MPPS],
}

_KEYWORDS: Mapping[str, tuple[str, str]] = {
    info[4]: (uid, info[1]) for uid, info in UID_dictionary.items() if info[4]
}


def uid_name(uid: str) -> str:
    """A UID's keyword for log lines (``CTImageStorage``), or the UID itself when unknown."""
    info = UID_dictionary.get(uid)
    return info[4] if info and info[4] else uid


def service_of(sop_class: str) -> Service | None:
    """The service a SOP class belongs to, if any."""
    for service, uids in SERVICE_SOP_CLASSES.items():
        if sop_class in uids:
            return service
    return None


_GROUPED_UIDS: Mapping[str, frozenset[str]] = {
    "SOP class": frozenset(uid for group in SOP_CLASS_GROUPS.values() for uid in group),
    "transfer syntax": frozenset(TRANSFER_SYNTAX_GROUPS["all"]),
}


def resolve_names(
    names: Any, groups: Mapping[str, tuple[str, ...]], kind: str, where: str
) -> tuple[str, ...]:
    """Expand keywords, UIDs and group names into UIDs, keeping the order and dropping repeats."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names:
        raise ConformanceError(f"{where}: must be a non-empty list of {kind} names")
    out: dict[str, None] = {}
    for name in names:
        if not isinstance(name, str):
            raise ConformanceError(f"{where}: {name!r} is not a {kind} name")
        if name in groups:
            out.update(dict.fromkeys(groups[name]))
            continue
        wanted = "Transfer Syntax" if kind == "transfer syntax" else "SOP Class"
        if name in _KEYWORDS and _KEYWORDS[name][1] == wanted:
            out[_KEYWORDS[name][0]] = None
        elif (
            name in UID_dictionary and UID_dictionary[name][1] == wanted
        ) or name in _GROUPED_UIDS[kind]:
            out[name] = None
        else:
            example = "CTImageStorage" if wanted == "SOP Class" else "ExplicitVRLittleEndian"
            raise ConformanceError(
                f"{where}: unknown {kind} {name!r}; allowed: a {kind} keyword as pydicom names "
                f"it (e.g. {example}), its UID, or a group: {', '.join(groups)}"
            )
    return tuple(out)


# --- the policy --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptedClass:
    """One SOP class we accept as SCP, with its transfer syntaxes and role-selection answers.

    ``scu_role``/``scp_role``: whether we agree when the requestor proposes to act as SCU / as SCP
    for this class (PS3.7 D.3.3.4); None means we send no role-selection reply (default roles).
    """

    sop_class: str
    transfer_syntaxes: tuple[str, ...]
    scu_role: bool | None = None
    scp_role: bool | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome of negotiating one proposed presentation context."""

    context_id: int
    sop_class: str
    offered: tuple[str, ...]
    transfer_syntax: str | None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.transfer_syntax is not None

    def describe(self) -> str:
        """One log line: which abstract syntax, what was offered, what happened and why."""
        offered = ", ".join(uid_name(ts) for ts in self.offered) or "none"
        if self.accepted:
            return (
                f"context {self.context_id} {uid_name(self.sop_class)}: accepted "
                f"{uid_name(self.transfer_syntax or '')} (offered {offered})"
            )
        return (
            f"context {self.context_id} {uid_name(self.sop_class)}: rejected, {self.reason} "
            f"(offered {offered})"
        )


@dataclass(frozen=True)
class Profile:
    """What one calling AE may negotiate: the policy narrowed by its override and its services."""

    classes: Mapping[str, AcceptedClass]
    # Why a SOP class the base policy knows is missing here, for rejection reasons.
    excluded: Mapping[str, str] = field(default_factory=dict)

    def decide(self, context_id: int, sop_class: str, offered: Sequence[str]) -> Decision:
        """Negotiate one context as pynetdicom does: our first preferred syntax that was offered."""
        offered_t = tuple(offered)
        accepted = self.classes.get(sop_class)
        if accepted is None:
            reason = self.excluded.get(sop_class, "SOP class not in the conformance policy")
            return Decision(context_id, sop_class, offered_t, None, reason)
        for ts in accepted.transfer_syntaxes:
            if ts in offered_t:
                return Decision(context_id, sop_class, offered_t, ts)
        ours = ", ".join(uid_name(ts) for ts in accepted.transfer_syntaxes)
        reason = f"no offered transfer syntax is accepted (we accept: {ours})"
        return Decision(context_id, sop_class, offered_t, None, reason)

    def negotiate(self, proposed: Iterable[tuple[int, str, Sequence[str]]]) -> list[Decision]:
        """Decide every proposed (context ID, abstract syntax, transfer syntaxes)."""
        return [self.decide(cid, sop, tss) for cid, sop, tss in proposed]


@dataclass(frozen=True)
class PeerOverride:
    """Per calling AE: a replacement accept list and/or a narrowing of every syntax list."""

    accept: Mapping[str, AcceptedClass] | None = None
    transfer_syntaxes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Policy:
    """The whole conformance policy; :meth:`profile` gives what one caller may negotiate."""

    accept: Mapping[str, AcceptedClass]
    peers: Mapping[str, PeerOverride] = field(default_factory=dict)
    # Profiles are built once per (override, services): a handful per node, whoever calls.
    _profiles: dict[tuple[str | None, frozenset[Service]], Profile] = field(
        default_factory=dict, repr=False, compare=False
    )

    def profile(self, calling_ae_title: str, services: frozenset[Service]) -> Profile:
        """The contexts ``calling_ae_title`` may negotiate when allowed ``services``."""
        key = calling_ae_title.strip()
        cache_key = (key if key in self.peers else None, services)
        profile = self._profiles.get(cache_key)
        if profile is None:
            profile = self._profiles[cache_key] = self._build_profile(*cache_key)
        return profile

    def _build_profile(self, override_key: str | None, services: frozenset[Service]) -> Profile:
        override = self.peers.get(override_key) if override_key else None
        base = override.accept if override and override.accept is not None else self.accept
        excluded: dict[str, str] = {}
        if base is not self.accept:
            for uid in self.accept:
                if uid not in base:
                    excluded[uid] = f"not accepted from {override_key} (conformance override)"
        classes: dict[str, AcceptedClass] = {}
        for uid, accepted in base.items():
            service = service_of(uid)
            if service is not None and service not in services:
                excluded[uid] = f"calling AE may not use the '{service.value}' service"
                continue
            if override and override.transfer_syntaxes is not None:
                narrowed = tuple(
                    ts for ts in override.transfer_syntaxes if ts in accepted.transfer_syntaxes
                )
                if not narrowed:
                    excluded[uid] = f"no transfer syntax left for {override_key} after override"
                    continue
                accepted = replace(accepted, transfer_syntaxes=narrowed)
            classes[uid] = accepted
        return Profile(classes=classes, excluded=excluded)

    def sop_classes(self) -> tuple[str, ...]:
        """Every SOP class any caller may negotiate (for pynetdicom's service-class table)."""
        uids = dict.fromkeys(self.accept)
        for override in self.peers.values():
            if override.accept is not None:
                uids.update(dict.fromkeys(override.accept))
        return tuple(uids)


# --- reading the YAML ------------------------------------------------------------------------

_TOP_KEYS = ("accept", "roles", "peers")


def check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConformanceError(
                f"{where}: unknown key {key!r}; allowed here: {', '.join(allowed)}"
            )


def context_rule(
    rule: Any, here: str, optional: tuple[str, ...] = ()
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The SOP class and transfer syntax UIDs of one rule (``sop_classes``, ``transfer_syntaxes``
    and the ``optional`` keys, which the caller reads), in their order; the peer conformance
    files of ``dicomnode.preflight`` use the same rules."""
    if not isinstance(rule, dict):
        maybe = f" (and optionally {', '.join(optional)})" if optional else ""
        raise ConformanceError(
            f"{here}: must be a mapping with sop_classes, transfer_syntaxes{maybe}"
        )
    check_keys(rule, ("sop_classes", "transfer_syntaxes", *optional), here)
    for required in ("sop_classes", "transfer_syntaxes"):
        if required not in rule:
            raise ConformanceError(f"{here}: key {required!r} is required")
    classes = resolve_names(
        rule["sop_classes"], SOP_CLASS_GROUPS, "SOP class", f"{here}.sop_classes"
    )
    syntaxes = resolve_names(
        rule["transfer_syntaxes"],
        TRANSFER_SYNTAX_GROUPS,
        "transfer syntax",
        f"{here}.transfer_syntaxes",
    )
    return classes, syntaxes


def accept_list(rules: Any, where: str) -> dict[str, AcceptedClass]:
    if not isinstance(rules, list) or not rules:
        raise ConformanceError(f"{where}: must be a non-empty list of rules")
    accepted: dict[str, AcceptedClass] = {}
    for i, rule in enumerate(rules):
        classes, syntaxes = context_rule(rule, f"{where}[{i}]")
        # A later rule for the same SOP class replaces the earlier one: "all storage, but CT only
        # as JPEG 2000" is two rules.
        for uid in classes:
            accepted.pop(uid, None)
            accepted[uid] = AcceptedClass(uid, syntaxes)
    return accepted


def apply_roles(accepted: dict[str, AcceptedClass], roles: Any, where: str) -> None:
    if roles is None:
        return
    if not isinstance(roles, list):
        raise ConformanceError(f"{where}: must be a list of rules")
    for i, rule in enumerate(roles):
        here = f"{where}[{i}]"
        if not isinstance(rule, dict):
            raise ConformanceError(f"{here}: must be a mapping with sop_classes, scu, scp")
        check_keys(rule, ("sop_classes", "scu", "scp"), here)
        if "sop_classes" not in rule:
            raise ConformanceError(f"{here}: key 'sop_classes' is required")
        flags: dict[str, bool] = {}
        for key in ("scu", "scp"):
            value = rule.get(key)
            if not isinstance(value, bool):
                raise ConformanceError(f"{here}.{key}: must be true or false, got {value!r}")
            flags[key] = value
        classes = resolve_names(
            rule["sop_classes"], SOP_CLASS_GROUPS, "SOP class", f"{here}.sop_classes"
        )
        for uid in classes:
            if uid in accepted:
                accepted[uid] = replace(accepted[uid], scu_role=flags["scu"], scp_role=flags["scp"])


def parse_policy(data: Any, where: str = "conformance") -> Policy:
    """Validate the parsed conformance YAML into a :class:`Policy`."""
    if not isinstance(data, dict):
        raise ConformanceError(f"{where}: must be a mapping with the keys {', '.join(_TOP_KEYS)}")
    check_keys(data, _TOP_KEYS, where)
    if "accept" not in data:
        raise ConformanceError(f"{where}: key 'accept' is required")
    accept = accept_list(data["accept"], f"{where}: accept")
    apply_roles(accept, data.get("roles"), f"{where}: roles")
    peers: dict[str, PeerOverride] = {}
    raw_peers = data.get("peers") or {}
    if not isinstance(raw_peers, dict):
        raise ConformanceError(f"{where}: peers: must be a mapping of calling AE title to override")
    for aet, override in raw_peers.items():
        here = f"{where}: peers.{aet}"
        if not isinstance(aet, str) or not valid_ae_title(aet):
            raise ConformanceError(
                f"{here}: keys are calling AE titles of 1-16 characters, no backslash or "
                "control characters"
            )
        if aet.strip() in peers:
            raise ConformanceError(f"{here}: the AE title {aet.strip()!r} appears twice")
        if not isinstance(override, dict) or not override:
            raise ConformanceError(
                f"{here}: must be a mapping with accept and/or transfer_syntaxes"
            )
        check_keys(override, ("accept", "transfer_syntaxes", "roles"), here)
        peer_accept = None
        if "accept" in override:
            peer_accept = accept_list(override["accept"], f"{here}.accept")
            apply_roles(peer_accept, data.get("roles"), f"{where}: roles")
        if "roles" in override:
            # Roles for this caller only: on its own accept list, or on a copy of the global one.
            if peer_accept is None:
                peer_accept = dict(accept)
            apply_roles(peer_accept, override["roles"], f"{here}.roles")
        syntaxes = None
        if "transfer_syntaxes" in override:
            syntaxes = resolve_names(
                override["transfer_syntaxes"],
                TRANSFER_SYNTAX_GROUPS,
                "transfer syntax",
                f"{here}.transfer_syntaxes",
            )
        peers[aet.strip()] = PeerOverride(accept=peer_accept, transfer_syntaxes=syntaxes)
    return Policy(accept=accept, peers=peers)


def load_policy(path: Path | None) -> Policy:
    """The policy in the YAML file at ``path``, or the built-in default when ``path`` is None."""
    if path is None:
        return default_policy()
    return parse_policy(read_yaml(path, "conformance file", ConformanceError), str(path))


# The built-in default, identical to config/conformance.yaml (a test keeps them equal): every
# standard storage SOP class in every transfer syntax we can store as received, explicit VR little
# endian preferred; Verification; Q/R FIND/MOVE/GET; Modality Worklist FIND and MPPS; both roles
# agreed for storage so C-GET requestors can receive.
DEFAULT_CONFORMANCE: Mapping[str, Any] = {
    "accept": [
        {
            "sop_classes": ["verification"],
            "transfer_syntaxes": ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"],
        },
        {
            "sop_classes": ["storage"],
            "transfer_syntaxes": ["uncompressed", "deflated", "compressed"],
        },
        {
            "sop_classes": [
                "PatientRootQueryRetrieveInformationModelFind",
                "StudyRootQueryRetrieveInformationModelFind",
                "PatientRootQueryRetrieveInformationModelMove",
                "StudyRootQueryRetrieveInformationModelMove",
                "PatientRootQueryRetrieveInformationModelGet",
                "StudyRootQueryRetrieveInformationModelGet",
            ],
            "transfer_syntaxes": ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"],
        },
        {
            "sop_classes": [
                "ModalityWorklistInformationModelFind",
                "ModalityPerformedProcedureStep",
            ],
            "transfer_syntaxes": ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"],
        },
    ],
    "roles": [{"sop_classes": ["storage"], "scu": True, "scp": True}],
}


@cache
def default_policy() -> Policy:
    """The built-in policy (see :data:`DEFAULT_CONFORMANCE`)."""
    return parse_policy(DEFAULT_CONFORMANCE, "built-in conformance")
