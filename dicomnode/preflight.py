"""A peer's conformance in our YAML form, and the pre-flight check of our policy against it.

The peer conformance YAML uses the vocabulary of our own conformance YAML (``dicomnode.policy``:
the same SOP class and transfer syntax names and groups, the same accept and role rules), plus
what only a peer needs to say (``config/peers/*.yaml`` are commented examples):

``device``
    who it is: name, kind (free text), ae_title, max_pdu_size (the Maximum Length it announces,
    PS3.8 D.1; 0 = unlimited), implementation_class_uid and implementation_version_name (PS3.7
    D.3.3.2), probed (written by ``dicomnode probe``: host, port, at).
``accept``
    what it accepts as SCP when we call it, in our accept-rule form (transfer syntaxes in ITS
    order of preference).
``roles``
    our role-rule form (PS3.7 D.3.3.4): whether it agrees when we, the requestor, propose to act
    as SCU / SCP for those classes; C-GET needs ``scp: true`` on the storage classes.
``propose``
    what it proposes as SCU when it calls us: rules of sop_classes, transfer_syntaxes (offered,
    in its order) and optionally role (scu, scp or both: the role selection it proposes).

The check (:func:`check`) simulates association negotiation between our policy and a peer's
conformance in both directions, and :func:`render_text` / :func:`report_data` report it. Both
are pure: no sockets, no files but the ones asked for; the contexts our SCU would propose are
taken from ``dicomnode.scu`` and ``dicomnode.retrieve`` so the simulation cannot drift from them.
Each finding is ok, note, gap or mismatch (:class:`Severity`); :func:`exit_code` is
``ExitCode.FAILURE`` when a simulated negotiation fails (a mismatch; with ``strict``, a gap too).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydicom._uid_dict import UID_dictionary
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.presentation import build_context

from dicomnode import retrieve, scu, transcode
from dicomnode.config import Service, read_yaml, valid_ae_title
from dicomnode.index.query import StoredInstance
from dicomnode.policy import (
    SOP_CLASS_GROUPS,
    TRANSFER_SYNTAX_GROUPS,
    AcceptedClass,
    ConformanceError,
    Decision,
    PeerOverride,
    Policy,
    Profile,
    accept_list,
    apply_roles,
    check_keys,
    context_rule,
    is_valid_uid,
    service_of,
)
from dicomnode.qr import MODALITY_WORKLIST_FIND, SOP_CLASSES, Model, Operation
from dicomnode.status import ExitCode

# --- the schema --------------------------------------------------------------------------------

ROLES = ("scu", "scp", "both")
_TOP_KEYS = ("device", "accept", "roles", "propose")
_DEVICE_KEYS = (
    "name",
    "kind",
    "ae_title",
    "max_pdu_size",
    "implementation_class_uid",
    "implementation_version_name",
    "probed",
)


@dataclass(frozen=True)
class Device:
    """Who the peer is, as far as a report needs to say (every field optional)."""

    name: str = ""
    kind: str = ""
    ae_title: str = ""
    # The Maximum Length it announces (PS3.8 D.1); 0 means unlimited, None unknown.
    max_pdu_size: int | None = None
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    # Written by ``dicomnode probe``: where and when it was probed (host, port, at: ISO-8601 UTC).
    probed: Mapping[str, str] = field(default_factory=dict)

    def label(self) -> str:
        """How a report names the peer: its name, else its AE title, else "the peer"."""
        if self.name and self.ae_title:
            return f"{self.name} ({self.ae_title})"
        return self.name or self.ae_title or "the peer"


@dataclass(frozen=True)
class Proposal:
    """One presentation context the peer proposes when it calls us (PS3.7 D.3.3.2, PS3.8 9.3.2.2).

    ``role``: the SCP/SCU Role Selection it proposes with it (PS3.7 D.3.3.4): "scu" (SCU only),
    "scp" (SCP only, as a C-GET requestor does for storage to receive), "both", or None (no role
    selection item: the default roles, the requestor being the SCU).
    """

    sop_class: str
    transfer_syntaxes: tuple[str, ...]
    role: str | None = None


@dataclass(frozen=True)
class PeerConformance:
    """A peer's conformance: who it is, what it accepts as SCP, what it proposes as SCU."""

    device: Device = field(default_factory=Device)
    # What it accepts when we call it, roles folded in (AcceptedClass.scu_role/scp_role: whether
    # it agrees that WE act as SCU / SCP for the class).
    accept: Mapping[str, AcceptedClass] = field(default_factory=dict)
    # What it proposes when it calls us, one entry per presentation context, in its order.
    propose: tuple[Proposal, ...] = ()


def _text(value: Any, where: str, limit: int | None = None) -> str:
    if not isinstance(value, str):
        raise ConformanceError(f"{where}: must be a text, got {value!r}")
    if limit is not None and len(value) > limit:
        raise ConformanceError(f"{where}: at most {limit} characters, got {len(value)}")
    return value


def _device(data: Any, where: str) -> Device:
    if data is None:
        return Device()
    if not isinstance(data, dict):
        raise ConformanceError(
            f"{where}: must be a mapping with the keys {', '.join(_DEVICE_KEYS)}"
        )
    check_keys(data, _DEVICE_KEYS, where)
    ae_title = ""
    if "ae_title" in data:
        ae_title = _text(data["ae_title"], f"{where}.ae_title")
        if not valid_ae_title(ae_title):
            raise ConformanceError(
                f"{where}.ae_title: an AE title of 1-16 characters, no backslash or control "
                f"characters (PS3.5 6.2), got {ae_title!r}"
            )
        ae_title = ae_title.strip()
    max_pdu: int | None = None
    if "max_pdu_size" in data and data["max_pdu_size"] is not None:
        max_pdu = data["max_pdu_size"]
        if isinstance(max_pdu, bool) or not isinstance(max_pdu, int) or max_pdu < 0:
            raise ConformanceError(
                f"{where}.max_pdu_size: a whole number of bytes, 0 for unlimited (PS3.8 D.1), "
                f"got {max_pdu!r}"
            )
    uid = ""
    if data.get("implementation_class_uid") not in (None, ""):
        uid = _text(data["implementation_class_uid"], f"{where}.implementation_class_uid")
        if not is_valid_uid(uid):
            raise ConformanceError(
                f"{where}.implementation_class_uid: a UID (digits and dots, at most 64 "
                f"characters, PS3.5 9.1), got {uid!r}"
            )
    version = ""
    if data.get("implementation_version_name") not in (None, ""):
        # PS3.7 D.3.3.2: 1-16 characters.
        version = _text(
            data["implementation_version_name"], f"{where}.implementation_version_name", 16
        )
    probed: dict[str, str] = {}
    raw_probed = data.get("probed")
    if raw_probed is not None:
        if not isinstance(raw_probed, dict):
            raise ConformanceError(f"{where}.probed: must be a mapping such as host, port, at")
        for key, value in raw_probed.items():
            if not isinstance(key, str) or isinstance(value, bool | dict | list) or value is None:
                raise ConformanceError(
                    f"{where}.probed.{key}: must be a text or number, got {value!r}"
                )
            probed[key] = str(value)
    return Device(
        name=_text(data.get("name", ""), f"{where}.name"),
        kind=_text(data.get("kind", ""), f"{where}.kind"),
        ae_title=ae_title,
        max_pdu_size=max_pdu,
        implementation_class_uid=uid,
        implementation_version_name=version,
        probed=probed,
    )


def _proposals(rules: Any, where: str) -> tuple[Proposal, ...]:
    if not isinstance(rules, list) or not rules:
        raise ConformanceError(f"{where}: must be a non-empty list of rules")
    out: list[Proposal] = []
    for i, rule in enumerate(rules):
        here = f"{where}[{i}]"
        classes, syntaxes = context_rule(rule, here, optional=("role",))
        role = rule.get("role")
        if role is not None and role not in ROLES:
            raise ConformanceError(
                f"{here}.role: must be one of {', '.join(ROLES)} (the SCP/SCU role selection it "
                f"proposes, PS3.7 D.3.3.4), got {role!r}"
            )
        # Unlike accept rules, a SOP class may appear in several rules: a requestor commonly
        # proposes one presentation context per transfer syntax (PS3.8 9.3.2.2).
        out.extend(Proposal(uid, syntaxes, role) for uid in classes)
    return tuple(out)


def parse_peer_conformance(data: Any, where: str = "peer conformance") -> PeerConformance:
    """Validate a parsed peer conformance YAML; :class:`ConformanceError` names the bad key."""
    if not isinstance(data, dict):
        raise ConformanceError(
            f"{where}: must be a mapping with the keys {', '.join(_TOP_KEYS)} (all optional)"
        )
    check_keys(data, _TOP_KEYS, where)
    device = _device(data.get("device"), f"{where}: device")
    accept: dict[str, AcceptedClass] = {}
    if data.get("accept") is not None:
        accept = accept_list(data["accept"], f"{where}: accept")
    if data.get("roles") is not None:
        if not accept:
            raise ConformanceError(
                f"{where}: roles: role rules answer proposals we make as requestor, so they "
                "need an accept list; add accept or remove roles"
            )
        apply_roles(accept, data["roles"], f"{where}: roles")
    propose: tuple[Proposal, ...] = ()
    if data.get("propose") is not None:
        propose = _proposals(data["propose"], f"{where}: propose")
    return PeerConformance(device=device, accept=accept, propose=propose)


def load_peer_conformance(path: Path) -> PeerConformance:
    """The peer conformance in the YAML file at ``path``."""
    return parse_peer_conformance(
        read_yaml(path, "peer conformance file", ConformanceError), str(path)
    )


# --- writing it back -----------------------------------------------------------------------------

# Keyword -> UID, to write a keyword only where it reads back as the same UID.
_KEYWORD_UID: Mapping[str, str] = {info[4]: uid for uid, info in UID_dictionary.items() if info[4]}


def name_of(uid: str) -> str:
    """The name a YAML file uses for ``uid``: its pydicom keyword, else the UID itself."""
    info = UID_dictionary.get(uid)
    keyword = info[4] if info else ""
    return keyword if keyword and _KEYWORD_UID.get(keyword) == uid else uid


def _class_names(uids: Iterable[str]) -> list[str]:
    """SOP class names, a whole group written as the group's name (the order does not matter)."""
    remaining = dict.fromkeys(uids)
    names: list[str] = []
    for group, members in SOP_CLASS_GROUPS.items():
        # A one-member group (verification, worklist) reads better as the class's keyword.
        if len(members) > 1 and all(uid in remaining for uid in members):
            names.append(group)
            for uid in members:
                remaining.pop(uid, None)
    return names + [name_of(uid) for uid in remaining]


def _syntax_names(uids: tuple[str, ...]) -> list[str]:
    """Transfer syntax names, a run equal to a group in the group's order written as its name
    (here the order is the order of preference, so only an exact run is a group)."""
    # One-member groups (deflated) read better as the syntax's keyword.
    groups = sorted(
        ((g, m) for g, m in TRANSFER_SYNTAX_GROUPS.items() if len(m) > 1),
        key=lambda item: -len(item[1]),
    )
    names: list[str] = []
    i = 0
    while i < len(uids):
        for group, members in groups:
            if uids[i : i + len(members)] == members:
                names.append(group)
                i += len(members)
                break
        else:
            names.append(name_of(uids[i]))
            i += 1
    return names


def peer_conformance_data(peer: PeerConformance) -> dict[str, Any]:
    """The YAML-ready mapping of ``peer`` (what :func:`dump_peer_conformance` writes)."""
    data: dict[str, Any] = {}
    device: dict[str, Any] = {}
    dev = peer.device
    for text_key in ("name", "kind", "ae_title"):
        if getattr(dev, text_key):
            device[text_key] = getattr(dev, text_key)
    if dev.max_pdu_size is not None:
        device["max_pdu_size"] = dev.max_pdu_size
    if dev.implementation_class_uid:
        device["implementation_class_uid"] = dev.implementation_class_uid
    if dev.implementation_version_name:
        device["implementation_version_name"] = dev.implementation_version_name
    if dev.probed:
        device["probed"] = dict(dev.probed)
    if device:
        data["device"] = device
    if peer.accept:
        # One rule per distinct list of transfer syntaxes, in the order first seen.
        by_syntaxes: dict[tuple[str, ...], list[str]] = {}
        for uid, accepted in peer.accept.items():
            by_syntaxes.setdefault(accepted.transfer_syntaxes, []).append(uid)
        data["accept"] = [
            {"sop_classes": _class_names(uids), "transfer_syntaxes": _syntax_names(tss)}
            for tss, uids in by_syntaxes.items()
        ]
        by_roles: dict[tuple[bool, bool], list[str]] = {}
        for uid, accepted in peer.accept.items():
            if accepted.scu_role is not None and accepted.scp_role is not None:
                by_roles.setdefault((accepted.scu_role, accepted.scp_role), []).append(uid)
        if by_roles:
            data["roles"] = [
                {"sop_classes": _class_names(uids), "scu": scu, "scp": scp}
                for (scu, scp), uids in by_roles.items()
            ]
    if peer.propose:
        # Consecutive proposals with the same syntaxes and role read back the same as one rule.
        rules: list[dict[str, Any]] = []
        last: tuple[tuple[str, ...], str | None] | None = None
        members: list[str] = []
        for proposal in peer.propose:
            key = (proposal.transfer_syntaxes, proposal.role)
            if key != last or proposal.sop_class in members:
                members = []
                rule: dict[str, Any] = {
                    "sop_classes": members,
                    "transfer_syntaxes": _syntax_names(proposal.transfer_syntaxes),
                }
                if proposal.role is not None:
                    rule["role"] = proposal.role
                rules.append(rule)
                last = key
            members.append(proposal.sop_class)
        for rule in rules:
            rule["sop_classes"] = [name_of(uid) for uid in rule["sop_classes"]]
        data["propose"] = rules
    return data


class _Dumper(yaml.SafeDumper):
    """Short lists of names on one line (``[CTImageStorage, MRImageStorage]``), the rest in
    blocks, one name per line."""


def _represent_list(dumper: yaml.SafeDumper, values: list[Any]) -> yaml.Node:
    flow = all(isinstance(v, str) for v in values) and sum(len(v) + 2 for v in values) <= 72
    return dumper.represent_sequence("tag:yaml.org,2002:seq", values, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_peer_conformance(peer: PeerConformance) -> str:
    """``peer`` as peer conformance YAML text, with a short header comment.

    UIDs are written as pydicom keywords where there is one, whole groups by their names;
    ``parse_peer_conformance(yaml.safe_load(dump_peer_conformance(p))) == p``.
    """
    header = (
        f"# Peer conformance of {peer.device.label()}, in dicomnode's peer conformance form\n"
        "# (dicomnode/preflight.py; examples in config/peers/). Check it against our policy:\n"
        "#   dicomnode conformance check config/conformance.yaml THIS_FILE\n"
    )
    body = yaml.dump(
        peer_conformance_data(peer),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
    )
    return header + body


# --- the check: negotiation simulated in both directions ----------------------------------------
#
# A simulation of what the two sides would do, from their YAML alone, with the decisions the live
# code makes: our acceptor decisions are ``policy.Profile.decide``; a peer's are the same rule over
# its accept list (PS3.8 9.3.3.2: the acceptor picks one of the offered transfer syntaxes, here its
# first preferred one, as pynetdicom and our node do); role selection is PS3.7 D.3.3.4 as
# pynetdicom negotiates it; the contexts our SCU proposes come from ``dicomnode.scu`` and
# ``dicomnode.retrieve`` themselves, the conversions we can make from ``dicomnode.transcode``.


class Severity(IntEnum):
    """How bad a finding is, in increasing order."""

    OK = 0
    # Works, with a caveat worth knowing (a fallback context, a decompressed copy).
    NOTE = 1
    # One side handles a SOP class or service the other does not offer at all: nothing to
    # negotiate, but whatever relies on it fails (counted as a mismatch with ``strict``).
    GAP = 2
    # Both sides mean to use it and cannot agree (transfer syntax, role, refused proposal).
    MISMATCH = 3


FIX_BY = ("ours", "config", "peer", "peer or ours", "dicomnode")


@dataclass(frozen=True)
class Change:
    """A change to OUR conformance YAML: a rule to append at ``where`` for the finding's classes.

    ``where``: ``accept``, ``roles``, ``peers.AE.accept`` or ``peers.AE.transfer_syntaxes``.
    """

    where: str
    transfer_syntaxes: tuple[str, ...] = ()
    scu: bool = True
    scp: bool = True

    def yaml(self, sop_classes: Iterable[str]) -> str:
        """The snippet, as it would sit in the file (long lists one name per line)."""
        parts = self.where.split(".")
        indent = ""
        lines: list[str] = []
        if parts[0] == "peers":
            lines += ["peers:", f"  {parts[1]}:"]
            indent = "    "
            if parts[2] == "transfer_syntaxes":
                return "\n".join(
                    lines + _yaml_list(indent, "transfer_syntaxes", self.transfer_syntaxes, False)
                )
        key = parts[-1]
        lines.append(f"{indent}{key}:")
        lines += _yaml_list(indent + "  - ", "sop_classes", tuple(sop_classes), True)
        if key == "roles":
            lines += [
                f"{indent}    scu: {str(self.scu).lower()}",
                f"{indent}    scp: {str(self.scp).lower()}",
            ]
        else:
            lines += _yaml_list(indent + "    ", "transfer_syntaxes", self.transfer_syntaxes, False)
        return "\n".join(lines)


def _yaml_list(prefix: str, key: str, uids: tuple[str, ...], classes: bool) -> list[str]:
    """``key: [a, b]`` after ``prefix``, or one name a line when that is over 100 characters."""
    names = _class_names(uids) if classes else _syntax_names(uids)
    line = f"{prefix}{key}: [{', '.join(names)}]"
    if len(line) <= 100:
        return [line]
    pad = " " * (len(prefix) + 2)
    return [f"{prefix}{key}:"] + [f"{pad}- {name}" for name in names]


@dataclass(frozen=True)
class Finding:
    """One outcome for one or more SOP classes: what happens, what it means, what to change.

    The texts say "{classes}" where the SOP class names go, so that one finding can stand for
    many classes with the same outcome (:meth:`text` fills them in).
    """

    severity: Severity
    sop_classes: tuple[str, ...]
    summary: str  # what negotiation does, in plain words (syntax, roles, or why it fails)
    transfer_syntax: str | None = None  # the accepted transfer syntax, when there is one
    roles: str = ""  # who is SCU and who SCP on the accepted context
    consequence: str = ""
    # Who can fix it (one of FIX_BY: "ours" = our conformance YAML, "config" = our
    # dicomnode.yaml, "peer" = only the peer, "dicomnode" = only our code), in words, and the
    # change to our conformance YAML, if there is one.
    fix_by: str = ""
    suggestion: str = ""
    change: Change | None = None
    # The transfer syntaxes the texts mean by "{syntaxes}".
    syntaxes: tuple[str, ...] = ()

    def text(self, value: str, full: bool = True) -> str:
        """``value`` with the class name in ("these SOP classes" for more than one) and the
        transfer syntaxes (the first few and a count, unless ``full``)."""
        one = len(self.sop_classes) == 1
        names = _syntax_names(self.syntaxes)
        if not full and len(names) > 8:
            names = [*names[:6], f"... ({len(names)} syntaxes; --all lists them)"]
        return value.replace(
            "{classes}", name_of(self.sop_classes[0]) if one else "these SOP classes"
        ).replace("{syntaxes}", ", ".join(names))

    @property
    def yaml_change(self) -> str:
        return self.change.yaml(self.sop_classes) if self.change else ""


def merge(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """Findings that differ only in their SOP classes as one, in the order first seen."""
    merged: dict[tuple[Any, ...], Finding] = {}
    for f in findings:
        key = (
            f.severity,
            f.summary,
            f.transfer_syntax,
            f.roles,
            f.consequence,
            f.fix_by,
            f.suggestion,
            f.change,
            f.syntaxes,
        )
        if key in merged:
            old = merged[key]
            merged[key] = replace(old, sop_classes=old.sop_classes + f.sop_classes)
        else:
            merged[key] = f
    return tuple(merged.values())


@dataclass(frozen=True)
class Section:
    """One exchange between the two nodes, e.g. "CT_SCANNER -> us: what it proposes"."""

    key: str
    title: str
    intro: str
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class CheckReport:
    """The result of :func:`check`."""

    ours: str
    theirs: str
    peer: PeerConformance
    calling_ae_title: str
    profile_source: str
    services: frozenset[Service]
    services_source: str
    sections: tuple[Section, ...]

    def count(self, severity: Severity) -> int:
        return sum(1 for s in self.sections for f in s.findings if f.severity is severity)

    def failed(self, strict: bool = False) -> bool:
        """Whether there is a mismatch (or, with ``strict``, a gap)."""
        worst = Severity.GAP if strict else Severity.MISMATCH
        return any(f.severity >= worst for s in self.sections for f in s.findings)


# Requestor role proposals as (SCU, SCP) flags of the SCP/SCU Role Selection item (PS3.7 D.3.3.4).
_PROPOSED_ROLES: Mapping[str | None, tuple[bool, bool] | None] = {
    None: None,
    "scu": (True, False),
    "scp": (False, True),
    "both": (True, True),
}


def negotiate_roles(
    proposed: tuple[bool, bool] | None, accepted: AcceptedClass
) -> tuple[bool, bool] | None:
    """The roles the requestor ends up with, as (is SCU, is SCP), or None: context rejected.

    PS3.7 D.3.3.4: without a role selection item the requestor is SCU and the acceptor SCP; an
    acceptor can only agree to a role that was proposed, so each role is the requestor's proposal
    AND the acceptor's answer, and neither left rejects the context. An acceptor that sends no
    reply (``scu_role``/``scp_role`` None) leaves the default roles. This is the table pynetdicom
    negotiates with (a test compares the two).
    """
    if proposed is None or accepted.scu_role is None or accepted.scp_role is None:
        return (True, False)
    scu_role = proposed[0] and accepted.scu_role
    scp_role = proposed[1] and accepted.scp_role
    if not (scu_role or scp_role):
        return None
    return (scu_role, scp_role)


def _roles_text(roles: tuple[bool, bool], requestor: str, acceptor: str) -> str:
    if roles == (True, False):
        return f"{requestor} SCU, {acceptor} SCP"
    if roles == (False, True):
        return f"{requestor} SCP, {acceptor} SCU (role selection)"
    return f"{requestor} and {acceptor} both SCU and SCP (role selection)"


def _names(uids: Iterable[str]) -> str:
    return ", ".join(name_of(uid) for uid in uids) or "none"


@cache
def can_decompress(transfer_syntax: str) -> bool:
    """Whether ``dicomnode.transcode`` can decompress pixel data in ``transfer_syntax`` here
    (pydicom has a decoder for it and one of its plugins is installed)."""
    transcode.register_decoders()  # the 12-bit JPEG plugin transcode adds on first use
    try:
        decoder = get_decoder(UID(transfer_syntax))
    except NotImplementedError:
        return False
    return bool(decoder.is_available)


@dataclass(frozen=True)
class _Ours:
    """Our side: the policy and the profile the peer's calling AE title gets."""

    policy: Policy
    profile: Profile
    ae_title: str
    # Where our dicomnode.yaml sets the services of this caller, for suggestions.
    services_key: str = "peers.NAME.services, or unknown_peers"

    @property
    def override(self) -> PeerOverride | None:
        return self.policy.peers.get(self.ae_title)


def _refusal(uid: str, label: str) -> str:
    """What a refused proposal of ``uid`` from the peer means, in plain words."""
    service = service_of(uid)
    if service is Service.STORE:
        return (
            f"instances of {{classes}} from {label} will be rejected: there is no presentation "
            "context for them, so it fails (or skips) those C-STOREs"
        )
    if service is Service.ECHO:
        return f"C-ECHO from {label} fails: it cannot verify its connection to us"
    if service is Service.WORKLIST:
        return f"{label} cannot fetch its worklist from us: patient and order data typed by hand"
    if service is Service.MPPS:
        return f"{label} cannot report procedure step progress (MPPS) to us"
    if service is Service.FIND:
        return f"{label}'s queries in this information model fail"
    if service in (Service.MOVE, Service.GET):
        return f"{label}'s retrievals in this information model fail"
    return f"{label} cannot use {{classes}} with us"


def _accept_change(ours: _Ours, uid: str, add: tuple[str, ...]) -> tuple[str, Change]:
    """Words and the change that make our profile for the peer accept ``uid`` in ``add``."""
    base = ours.policy.accept.get(uid)
    override = ours.override
    aet = ours.ae_title
    later = "(a later rule for the same SOP class replaces the earlier one)"
    if override is not None and override.accept is not None:
        listed = override.accept.get(uid)
        syntaxes = tuple(dict.fromkeys((*(listed.transfer_syntaxes if listed else ()), *add)))
        words = f"add {_names(add)} for {{classes}} to the override for {aet}: append to "
        return words + f"peers.{aet}.accept {later}", Change(f"peers.{aet}.accept", syntaxes)
    if override is not None and override.transfer_syntaxes is not None:
        missing = tuple(ts for ts in add if ts not in override.transfer_syntaxes)
        if missing and base is not None and all(ts in base.transfer_syntaxes for ts in add):
            syntaxes = (*override.transfer_syntaxes, *missing)
            words = (
                f"the override for {aet} narrows every SOP class to its transfer_syntaxes: "
                f"add {_names(missing)} to peers.{aet}.transfer_syntaxes"
            )
            return words, Change(f"peers.{aet}.transfer_syntaxes", syntaxes)
    syntaxes = tuple(dict.fromkeys((*(base.transfer_syntaxes if base else ()), *add)))
    also = ""
    if override is not None and override.transfer_syntaxes is not None:
        missing = tuple(ts for ts in add if ts not in override.transfer_syntaxes)
        if missing:
            also = (
                f"; and add {_names(missing)} to peers.{aet}.transfer_syntaxes (the override "
                "narrows every SOP class to those)"
            )
    if base is None:
        return f"accept {{classes}}{also}: append this rule to accept:", Change("accept", syntaxes)
    words = (
        f"add {_names(add)} to the transfer_syntaxes of the rule for {{classes}} in accept: "
        f"append this rule {later}"
    )
    return words + also, Change("accept", syntaxes)


def _them_to_us(
    ours: _Ours, label: str, proposals: Iterable[Proposal], assumed: bool = False
) -> list[Finding]:
    """The peer as requestor: each proposed context against our profile, one finding per class."""
    by_class: dict[str, list[tuple[Proposal, Decision, tuple[bool, bool] | None]]] = {}
    for i, proposal in enumerate(proposals):
        decision = ours.profile.decide(2 * i + 1, proposal.sop_class, proposal.transfer_syntaxes)
        roles: tuple[bool, bool] | None = None
        accepted = ours.profile.classes.get(proposal.sop_class)
        if decision.accepted and accepted is not None:
            roles = negotiate_roles(_PROPOSED_ROLES[proposal.role], accepted)
        by_class.setdefault(proposal.sop_class, []).append((proposal, decision, roles))
    return [_class_outcome(ours, label, uid, cxs, assumed) for uid, cxs in by_class.items()]


def _class_outcome(
    ours: _Ours,
    label: str,
    uid: str,
    contexts: list[tuple[Proposal, Decision, tuple[bool, bool] | None]],
    assumed: bool,
) -> Finding:
    """One SOP class the peer proposes (maybe in several contexts): accepted how, or why not."""
    wants_scp = any(p.role == "scp" for p, _, _ in contexts)

    def usable(p: Proposal, d: Decision, r: tuple[bool, bool] | None) -> bool:
        # A C-GET requestor's storage context is only of use when it is SCP on it; any other
        # context when it is SCU (PS3.7 D.3.3.4).
        return d.accepted and r is not None and (r[1] if p.role == "scp" else r[0])

    good = [(p, d, r) for p, d, r in contexts if usable(p, d, r)]
    offered = tuple(dict.fromkeys(ts for p, _, _ in contexts for ts in p.transfer_syntaxes))
    accepted_class = ours.profile.classes.get(uid)
    if good:
        _, decision, roles = good[0]
        ts = decision.transfer_syntax or ""
        roles_text = _roles_text(roles or (True, False), label, "we")
        chosen = tuple(dict.fromkeys(d.transfer_syntax or "" for _, d, _ in good))
        summary = f"accepted in {_names(chosen)}"
        if len(contexts) > 1:
            # One transfer syntax per accepted context (PS3.8 9.3.3.2); it picks the context.
            summary += f" ({len(good)} of its {len(contexts)} contexts for it accepted)"
        good_syntaxes = {t for p, _, _ in good for t in p.transfer_syntaxes}
        refused = tuple(
            dict.fromkeys(
                t
                for p, d, _ in contexts
                if not d.accepted
                for t in p.transfer_syntaxes
                if t not in good_syntaxes
            )
        )
        if not refused:
            return Finding(Severity.OK, (uid,), summary, ts, roles_text)
        words, change = _accept_change(ours, uid, refused)
        return Finding(
            Severity.NOTE,
            (uid,),
            f"{summary}; its context offering only {_names(refused)} is rejected",
            ts,
            roles_text,
            consequence=f"{label} has to send {{classes}} in {name_of(ts)} instead (decompressing "
            "if it holds them compressed, if it can)",
            fix_by="ours",
            suggestion=f"optional, to receive them as offered: {words}",
            change=change,
        )
    consequence = _refusal(uid, label)
    role_blocked = [(p, d, r) for p, d, r in contexts if d.accepted]
    if role_blocked and accepted_class is not None:
        wanted = "SCP" if wants_scp else "SCU"
        if accepted_class.scu_role is None:
            answer = "we have no roles rule for it (no reply: default roles, it SCU, we SCP)"
        else:
            answer = (
                f"our roles rule answers scu: {str(accepted_class.scu_role).lower()}, "
                f"scp: {str(accepted_class.scp_role).lower()}"
            )
        if wants_scp:
            consequence = (
                f"{label}'s C-GET cannot bring back instances of {{classes}}: it asks to act as "
                "Storage SCP on its association (PS3.7 D.3.3.4) and we do not agree, so those "
                "C-GET sub-operations fail"
            )
        return Finding(
            Severity.MISMATCH,
            (uid,),
            f"the transfer syntax would do, but it proposes to act as {wanted} and {answer}",
            consequence=consequence,
            fix_by="ours",
            suggestion=f"agree to the {wanted} role for {{classes}}: append this rule to roles: "
            "(a later rule for the same SOP class replaces the earlier one)",
            change=Change("roles", scu=True, scp=True),
        )
    reason = contexts[0][1].reason
    # Assumed proposals (a C-MOVE source that may hold anything) of a class no rule of ours
    # covers are a gap; refused by our access rules or an override they are a mismatch.
    unknown_to_us = uid not in ours.policy.sop_classes()
    severity = Severity.GAP if assumed and unknown_to_us else Severity.MISMATCH
    if accepted_class is None:
        service = service_of(uid)
        if service is not None and "may not use" in reason:
            return Finding(
                severity,
                (uid,),
                f"rejected: {reason}",
                consequence=consequence,
                fix_by="config",
                suggestion=f"not a conformance YAML change: allow the '{service.value}' service "
                f"for this AE title in dicomnode.yaml ({ours.services_key})",
            )
        words, change = _accept_change(ours, uid, offered)
        return Finding(
            severity,
            (uid,),
            f"rejected: {reason}",
            consequence=consequence,
            fix_by="ours",
            suggestion=words,
            change=change,
        )
    words, change = _accept_change(ours, uid, offered[:1])
    return Finding(
        severity,
        (uid,),
        f"rejected: {label} offers {_names(offered)}; we accept "
        f"{_names(accepted_class.transfer_syntaxes)}",
        consequence=consequence,
        fix_by="ours",
        suggestion=words,
        change=change,
    )


# --- us sending stored instances -----------------------------------------------------------------


def _held(policy: Policy) -> dict[str, tuple[str, ...]]:
    """What we may hold: every storage SOP class any caller may send us, in every syntax it may
    arrive in (instances are stored as received), from the policy and its overrides."""
    held: dict[str, dict[str, None]] = {}
    accepts = [policy.accept] + [o.accept for o in policy.peers.values() if o.accept is not None]
    for accept in accepts:
        for uid, accepted in accept.items():
            if service_of(uid) is Service.STORE:
                held.setdefault(uid, {}).update(dict.fromkeys(accepted.transfer_syntaxes))
    return {uid: tuple(tss) for uid, tss in held.items()}


def _move_contexts(sop_class: str, stored: str) -> list[tuple[str, tuple[str, ...]]]:
    """The presentation contexts our C-MOVE SCP proposes to a destination for an instance of
    ``sop_class`` stored in ``stored``: ``dicomnode.retrieve``'s own batching."""
    item = StoredInstance(
        path="", sop_class_uid=sop_class, sop_instance_uid="", transfer_syntax=stored
    )
    return [
        (str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
        for _, contexts in retrieve.presentation_batches([item])
        for cx in contexts
    ]


_NO_DECODER = "no decoder"
_NO_CONVERSION = "no lossless conversion fits (nothing is ever recompressed)"


def _deliver(stored: str, accepted: Iterable[str]) -> tuple[str | None, str]:
    """The syntax a stored instance goes out in over contexts accepted in ``accepted`` and "" or
    how it is converted; or None and why it cannot go. ``transcode.choose_syntax`` decides, and
    a decompression needs a decoder installed here."""
    target = transcode.choose_syntax(stored, tuple(accepted))
    if target is None:
        return None, _NO_CONVERSION
    if target == stored:
        return target, ""
    if stored in transcode.UNCOMPRESSED or stored == str(DeflatedExplicitVRLittleEndian):
        return target, "re-encoded"
    if target in transcode.RELABEL_LOSSLESS.get(stored, ()):
        return target, "relabelled (the same bit stream)"
    if not can_decompress(stored):
        return None, _NO_DECODER
    return target, "decompressed"


def _delivery_findings(
    uid: str,
    held: tuple[str, ...],
    accepted_for: Callable[[str], tuple[str, ...]],
    their_list: tuple[str, ...],
    label: str,
    get: bool,
    policy: Policy,
) -> list[Finding]:
    """How the instances of ``uid`` we may hold (in ``held``) reach the peer, whose accepted
    syntaxes for an instance stored in a given syntax ``accepted_for`` gives; ``get``: on its
    C-GET association, else as C-MOVE sub-operations to it. One finding per kind of failure,
    else one note for what is converted, else one ok."""
    as_stored: list[str] = []
    converted: dict[tuple[str, str], list[str]] = {}
    failing: dict[str, list[str]] = {}
    for ts in held:
        target, how = _deliver(ts, accepted_for(ts))
        if target is None:
            failing.setdefault(how, []).append(ts)
        elif target == ts:
            as_stored.append(ts)
        else:
            converted.setdefault((how, target), []).append(ts)
    theirs = ", ".join(_syntax_names(their_list)) or "nothing"
    receives = (
        f"{label}'s contexts for it were accepted in {theirs} only"
        if get
        else f"{label} accepts it only in {theirs}"
    )
    what = (
        f"{label}'s C-GET sub-operations for them fail"
        if get
        else f"C-MOVE sub-operations to {label} fail for them (and dicomnode send of such files)"
    )
    base = policy.accept.get(uid)
    findings: list[Finding] = []
    for why, syntaxes in failing.items():
        bad = tuple(syntaxes)
        consequence = (
            f"instances of {{classes}} we hold in those syntaxes cannot be sent to {label}: {what}"
        )
        keep = tuple(t for t in (base.transfer_syntaxes if base else ()) if t not in bad)
        because = (
            "no decoder is installed here to decompress them"
            if why == _NO_DECODER
            else _NO_CONVERSION
        )
        findings.append(
            Finding(
                Severity.MISMATCH,
                (uid,),
                f"held as {{syntaxes}}: {receives}; {because}",
                consequence=consequence,
                fix_by="peer or ours" if keep else "peer",
                suggestion=f"only {label} can take them (add those syntaxes for {{classes}} to its "
                "accept list)"
                + (
                    "; or we stop accepting {classes} in those syntaxes (senders must then send "
                    "another one, if they can): append this rule to accept:"
                    if keep
                    else ""
                ),
                change=Change("accept", keep) if keep else None,
                syntaxes=bad,
            )
        )
    if converted:
        hows = "; ".join(
            f"held as {', '.join(_syntax_names(tuple(tss)))}: {how} to {name_of(target)}"
            for (how, target), tss in converted.items()
        )
        stored_part = (
            f"sent as stored in {', '.join(_syntax_names(tuple(as_stored)))}; " if as_stored else ""
        )
        consequence = (
            "the converted copies are larger and not byte-identical to what we hold"
            if get
            else "C-MOVE converts them, but dicomnode send sends files unchanged: sending such "
            f"files to {label} with it fails"
        )
        findings.append(
            Finding(
                Severity.NOTE,
                (uid,),
                f"{stored_part}{hows}",
                consequence=consequence,
                fix_by="peer",
                suggestion=f"optional: {label} could accept {{classes}} in the syntaxes we hold",
            )
        )
    if findings:
        return findings
    return [
        Finding(
            Severity.OK,
            (uid,),
            f"sent as stored in every syntax we may hold it in ({len(held)})",
            as_stored[0] if as_stored else None,
        )
    ]


def _storage_to_them(ours: _Ours, peer: PeerConformance, label: str) -> list[Finding]:
    """C-MOVE sub-operations (and ``dicomnode send``) from us to the peer as Storage SCP."""
    their = Profile(classes=peer.accept)
    findings: list[Finding] = []
    not_taken: list[str] = []
    for uid, held in _held(ours.policy).items():
        accepted_class = peer.accept.get(uid)
        if accepted_class is None:
            not_taken.append(uid)
            continue

        def accepted_for(stored: str, uid: str = uid) -> tuple[str, ...]:
            contexts = _move_contexts(uid, stored)
            return tuple(
                d.transfer_syntax
                for d in their.negotiate((2 * i + 1, s, t) for i, (s, t) in enumerate(contexts))
                if d.transfer_syntax is not None
            )

        findings += _delivery_findings(
            uid, held, accepted_for, accepted_class.transfer_syntaxes, label, False, ours.policy
        )
    if not_taken:
        findings.append(
            Finding(
                Severity.GAP,
                tuple(not_taken),
                f"not accepted by {label} at all",
                consequence=f"instances of {{classes}} we hold cannot be sent to {label} (C-MOVE "
                "sub-operations to it fail for them)",
                fix_by="peer",
                suggestion=f"only {label} can accept them; if it should never receive them, "
                "nothing to do",
            )
        )
    return findings


def _echo_to_them(peer: PeerConformance, label: str) -> list[Finding]:
    """``dicomnode echo``: the Verification context our SCU proposes (``dicomnode.scu``)."""
    proposed = tuple(str(ts) for ts in build_context(scu.VERIFICATION_SOP_CLASS).transfer_syntax)
    decision = Profile(classes=peer.accept).decide(1, str(scu.VERIFICATION_SOP_CLASS), proposed)
    uid = str(scu.VERIFICATION_SOP_CLASS)
    if decision.accepted:
        return [
            Finding(
                Severity.OK,
                (uid,),
                f"accepted in {name_of(decision.transfer_syntax or '')}",
                decision.transfer_syntax,
                f"we SCU, {label} SCP",
            )
        ]
    severity = Severity.MISMATCH if uid in peer.accept else Severity.GAP
    return [
        Finding(
            severity,
            (uid,),
            f"not accepted: we offer {_names(proposed)}; {label} accepts "
            f"{_names(peer.accept[uid].transfer_syntaxes) if uid in peer.accept else 'nothing'}",
            consequence=f"dicomnode echo to {label} fails: connectivity cannot be verified",
            fix_by="peer",
            suggestion=f"only {label} can accept Verification in one of the syntaxes we offer",
        )
    ]


_MODEL_OPTION = {Model.PATIENT_ROOT: "patient", Model.STUDY_ROOT: "study"}


def _qr_to_them(peer: PeerConformance, label: str) -> list[Finding]:
    """Our Q/R and worklist SCU (``dicomnode find/move/get``, ``worklist query``) against the
    peer's accept list: the contexts ``dicomnode.scu`` proposes for each model."""
    their = Profile(classes=peer.accept)
    offered = tuple(str(ts) for ts in scu.QR_TRANSFER_SYNTAXES)
    findings: list[Finding] = []
    accepted_ops: set[Operation] = set()
    for op in (Operation.FIND, Operation.MOVE, Operation.GET):
        models = [(m, SOP_CLASSES[m, op]) for m in (Model.STUDY_ROOT, Model.PATIENT_ROOT)]
        decisions = {m: their.decide(1, uid, offered) for m, uid in models}
        if any(d.accepted for d in decisions.values()):
            accepted_ops.add(op)
        elif not any(uid in peer.accept for _, uid in models):
            continue  # it is no SCP of this operation: reported below if it matters
        command = f"dicomnode {op.name.lower()}"
        for model, uid in models:
            d = decisions[model]
            option = f"{command} --model {_MODEL_OPTION[model]}"
            if d.accepted:
                findings.append(
                    Finding(
                        Severity.OK,
                        (uid,),
                        f"accepted in {name_of(d.transfer_syntax or '')}: {option} works",
                        d.transfer_syntax,
                        f"we SCU, {label} SCP",
                    )
                )
            elif op in accepted_ops:
                findings.append(
                    Finding(
                        Severity.NOTE,
                        (uid,),
                        f"not accepted: {option} fails (the other model works)",
                        fix_by="peer",
                    )
                )
            elif uid in peer.accept:
                findings.append(
                    Finding(
                        Severity.MISMATCH,
                        (uid,),
                        f"{label} accepts it only in {_names(peer.accept[uid].transfer_syntaxes)}"
                        f"; we offer {_names(offered)}",
                        consequence=f"{command} to {label} fails in this model",
                        fix_by="peer",
                        suggestion=f"only {label} can accept it in {_names(offered)} (what every "
                        "implementation supports, PS3.5 10.1)",
                    )
                )
    if Operation.FIND in accepted_ops and not accepted_ops & {Operation.MOVE, Operation.GET}:
        moves = tuple(
            SOP_CLASSES[m, Operation.MOVE] for m in (Model.STUDY_ROOT, Model.PATIENT_ROOT)
        )
        findings.append(
            Finding(
                Severity.GAP,
                moves,
                f"{label} accepts neither C-MOVE nor C-GET",
                consequence=f"we can query {label} but not retrieve from it",
                fix_by="peer",
                suggestion=f"only {label} can offer a retrieve model",
            )
        )
    mwl = MODALITY_WORKLIST_FIND
    if mwl in peer.accept:
        d = their.decide(1, mwl, offered)
        findings.append(
            Finding(
                Severity.OK,
                (mwl,),
                f"accepted in {name_of(d.transfer_syntax or '')}: dicomnode worklist query works",
                d.transfer_syntax,
                f"we SCU, {label} SCP",
            )
            if d.accepted
            else Finding(
                Severity.MISMATCH,
                (mwl,),
                f"{label} accepts it only in {_names(peer.accept[mwl].transfer_syntaxes)}; we "
                f"offer {_names(offered)}",
                consequence=f"dicomnode worklist query to {label} fails",
                fix_by="peer",
                suggestion=f"only {label} can accept it in {_names(offered)}",
            )
        )
    return findings


def _get_from_them(peer: PeerConformance, label: str, get_uid: str) -> list[Finding]:
    """``dicomnode get``: the storage contexts and SCP role items ``dicomnode.scu.get_contexts``
    proposes, against the peer's accept list and its answers to our role selection."""
    their = Profile(classes=peer.accept)
    contexts, _ = scu.get_contexts(UID(get_uid))
    ours: dict[str, list[str]] = {}
    taken: dict[str, list[str]] = {}
    role_refused: set[str] = set()
    for i, cx in enumerate(contexts[1:], start=1):
        uid = str(cx.abstract_syntax)
        offered = tuple(str(ts) for ts in cx.transfer_syntax)
        ours.setdefault(uid, []).extend(offered)
        d = their.decide(2 * i + 1, uid, offered)
        if not d.accepted:
            continue
        # We propose SCP only for storage (build_role(scp_role=True)): PS3.7 D.3.3.4.
        roles = negotiate_roles((False, True), peer.accept[uid])
        if roles is not None and roles[1]:
            taken.setdefault(uid, []).append(d.transfer_syntax or "")
        else:
            role_refused.add(uid)
    findings: list[Finding] = []
    not_proposed: list[str] = []
    for uid, accepted in peer.accept.items():
        if service_of(uid) is not Service.STORE:
            continue
        if uid not in ours:
            not_proposed.append(uid)
        elif uid in taken:
            findings.append(
                Finding(
                    Severity.OK,
                    (uid,),
                    f"accepted in {', '.join(_syntax_names(tuple(dict.fromkeys(taken[uid]))))}",
                    taken[uid][0],
                    f"{label} SCU, we SCP (role selection)",
                )
            )
        elif uid in role_refused:
            answer = (
                "it sends no role selection reply (no roles rule: default roles)"
                if accepted.scp_role is None
                else "its roles rule answers scp: false"
            )
            findings.append(
                Finding(
                    Severity.MISMATCH,
                    (uid,),
                    f"we propose to act as Storage SCP (PS3.7 D.3.3.4) and {answer}",
                    consequence=f"dicomnode get from {label} cannot bring back instances "
                    "of {classes}: their C-STORE sub-operations have no context (use dicomnode "
                    "move)",
                    fix_by="peer",
                    suggestion=f"only {label} can agree: a roles rule with scp: true for "
                    "{classes} in its conformance",
                )
            )
        else:
            findings.append(
                Finding(
                    Severity.MISMATCH,
                    (uid,),
                    f"{label} takes {{classes}} in "
                    f"{', '.join(_syntax_names(accepted.transfer_syntaxes))}; "
                    f"our C-GET offers {_names(dict.fromkeys(ours[uid]))}",
                    consequence=f"dicomnode get from {label} cannot bring back instances "
                    "of {classes} (use dicomnode move)",
                    fix_by="peer",
                    suggestion=f"only {label} can accept them in a syntax our C-GET offers (our "
                    "C-GET's syntaxes are fixed in dicomnode.scu, not in the YAML)",
                )
            )
    if not_proposed:
        findings.append(
            Finding(
                Severity.GAP,
                tuple(not_proposed),
                "our C-GET does not propose them: it proposes pynetdicom's common storage "
                "classes, as many as fit in 128 presentation contexts (PS3.8 9.3.2.2)",
                consequence=f"dicomnode get from {label} cannot bring back instances of "
                "{classes} (dicomnode move can)",
                fix_by="dicomnode",
                suggestion="not a YAML change: use dicomnode move for them",
            )
        )
    return findings


def _get_by_them(ours: _Ours, peer: PeerConformance, label: str) -> list[Finding]:
    """The peer's C-GET from us: what it proposes as Storage SCP against what we may hold, as
    our C-GET SCP (``dicomnode.retrieve``) sends on its association."""
    scp_props = [
        p
        for p in peer.propose
        if p.role in ("scp", "both") and service_of(p.sop_class) is Service.STORE
    ]
    if not scp_props:
        return [
            Finding(
                Severity.MISMATCH,
                (),
                f"{label} proposes C-GET but no storage SOP class with role scp",
                consequence=f"{label}'s C-GET from us cannot receive any instance: the C-STORE "
                "sub-operations need contexts on which it is SCP (PS3.4 C.4.3, PS3.7 D.3.3.4)",
                fix_by="peer",
                suggestion=f"only {label} can propose the storage classes it wants with role: scp",
            )
        ]
    taken: dict[str, list[str]] = {}
    for i, p in enumerate(scp_props):
        d = ours.profile.decide(2 * i + 1, p.sop_class, p.transfer_syntaxes)
        accepted = ours.profile.classes.get(p.sop_class)
        if d.accepted and accepted is not None:
            roles = negotiate_roles(_PROPOSED_ROLES[p.role], accepted)
            if roles is not None and roles[1]:
                taken.setdefault(p.sop_class, []).append(d.transfer_syntax or "")
    findings: list[Finding] = []
    refused: list[Proposal] = []
    not_proposed: list[str] = []
    proposed = {p.sop_class for p in scp_props}
    for uid, held in _held(ours.policy).items():
        if uid not in proposed:
            not_proposed.append(uid)
            continue
        if uid not in taken:
            refused += [p for p in scp_props if p.sop_class == uid]
            continue
        on_its_contexts = tuple(taken[uid])

        def accepted_for(
            _stored: str, syntaxes: tuple[str, ...] = on_its_contexts
        ) -> tuple[str, ...]:
            return syntaxes  # its contexts are the same whatever the stored syntax

        findings += _delivery_findings(
            uid, held, accepted_for, on_its_contexts, label, True, ours.policy
        )
    if refused:
        # Why its Storage SCP contexts are of no use: our transfer syntaxes or our roles.
        findings += _them_to_us(ours, label, refused)
    if not_proposed:
        findings.append(
            Finding(
                Severity.GAP,
                tuple(not_proposed),
                f"{label} does not propose them as Storage SCP",
                consequence=f"{label}'s C-GET of instances of {{classes}} from us fails (those "
                "sub-operations have no context)",
                fix_by="peer",
                suggestion=f"only {label} can propose them (at most 128 contexts per association, "
                "PS3.8 9.3.2.2); C-MOVE to it has no such limit",
            )
        )
    return findings


# --- the whole check ---------------------------------------------------------------------------

ALL_SERVICES: frozenset[Service] = frozenset(Service)


def _label(peer: PeerConformance) -> str:
    return peer.device.ae_title or peer.device.name or "the peer"


def check(
    policy: Policy,
    peer: PeerConformance,
    *,
    ours: str = "ours",
    theirs: str = "theirs",
    calling_ae_title: str | None = None,
    services: frozenset[Service] = ALL_SERVICES,
    services_source: str = "all services",
    services_key: str = "peers.NAME.services, or unknown_peers",
) -> CheckReport:
    """Simulate every exchange between our node (``policy``) and ``peer``, in both directions.

    ``calling_ae_title`` (default: the peer's ``device.ae_title``) picks our profile for it
    (``Policy.profile``: its override, if any) together with ``services``, what our
    dicomnode.yaml allows that caller (``services_key`` says where, for suggestions).
    """
    aet = (peer.device.ae_title if calling_ae_title is None else calling_ae_title).strip()
    side = _Ours(policy, policy.profile(aet, services), aet, services_key)
    label = _label(peer)
    profile_source = (
        f"the override peers.{aet}" if aet in policy.peers else "the policy (no override)"
    )
    their = Profile(classes=peer.accept)
    qr_offered = tuple(str(ts) for ts in scu.QR_TRANSFER_SYNTAXES)

    def they_accept(op: Operation) -> str | None:
        for model in (Model.STUDY_ROOT, Model.PATIENT_ROOT):
            if their.decide(1, SOP_CLASSES[model, op], qr_offered).accepted:
                return SOP_CLASSES[model, op]
        return None

    sections: list[Section] = []
    # Its C-GET from us, if we accept a GET model it proposes: its storage contexts with role scp
    # are judged there, against what we hold; otherwise with the rest of what it proposes.
    gets = [
        p
        for p in peer.propose
        if service_of(p.sop_class) is Service.GET
        and side.profile.decide(1, p.sop_class, p.transfer_syntaxes).accepted
    ]
    calls = [p for p in peer.propose if not gets or p.role != "scp"]
    sections.append(
        Section(
            "them_to_us",
            f"{label} -> us: what it proposes when it calls us",
            f"its propose list, against our profile for calling AE title {aet or '(none)'}"
            if calls
            else "it proposes nothing (no propose list): it does not call us, or what it "
            "proposes is not known",
            merge(_them_to_us(side, label, calls)),
        )
    )
    if not peer.accept:
        sections.append(
            Section(
                "us_to_them",
                f"us -> {label}",
                "it accepts no associations (no accept list): we send it nothing",
                (),
            )
        )
    else:
        sections.append(
            Section(
                "echo_to_them",
                f"us -> {label}: C-ECHO (dicomnode echo)",
                "the Verification context our SCU proposes",
                merge(_echo_to_them(peer, label)),
            )
        )
        if any(service_of(uid) is Service.STORE for uid in peer.accept):
            sections.append(
                Section(
                    "storage_to_them",
                    f"us -> {label}: storage (C-MOVE sub-operations to it, dicomnode send)",
                    "every storage SOP class we accept, in every transfer syntax we may hold it "
                    "in (stored as received), as our C-MOVE SCP proposes it (the stored syntax, "
                    "plus uncompressed little endian for compressed data)",
                    merge(_storage_to_them(side, peer, label)),
                )
            )
        qr = _qr_to_them(peer, label)
        if qr:
            sections.append(
                Section(
                    "qr_to_them",
                    f"us -> {label}: query/retrieve and worklist (dicomnode find, move, get, "
                    "worklist query)",
                    "the contexts our Q/R and worklist SCU proposes",
                    merge(qr),
                )
            )
        if they_accept(Operation.MOVE):
            storage_calls = [p for p in calls if service_of(p.sop_class) is Service.STORE]
            assumed = not storage_calls
            if assumed:
                move_subops = merge(
                    _them_to_us(
                        side,
                        label,
                        (
                            Proposal(uid, a.transfer_syntaxes)
                            for uid, a in peer.accept.items()
                            if service_of(uid) is Service.STORE
                        ),
                        assumed=True,
                    )
                )
            sections.append(
                Section(
                    "move_subops_to_us",
                    f"{label} -> us: the C-STORE sub-operations of our C-MOVE",
                    "it has no storage in its propose list: assumed it proposes what it accepts "
                    "(it must also know our AE title and address as a move destination)"
                    if assumed
                    else "as in its propose list (see above); it must also know our AE title and "
                    "address as a move destination",
                    move_subops if assumed else (),
                )
            )
        get_uid = they_accept(Operation.GET)
        if get_uid:
            sections.append(
                Section(
                    "get_from_them",
                    f"us -> {label}: C-GET (dicomnode get), its C-STORE sub-operations to us",
                    "the storage contexts and SCP role selection our C-GET proposes, for every "
                    "storage SOP class it accepts",
                    merge(_get_from_them(peer, label, get_uid)),
                )
            )
    if gets:
        sections.append(
            Section(
                "get_by_them",
                f"{label} -> us: its C-GET, the C-STORE sub-operations we send it",
                "every storage SOP class and transfer syntax we may hold, against the storage "
                "contexts it proposes as SCP",
                merge(_get_by_them(side, peer, label)),
            )
        )
    return CheckReport(
        ours=ours,
        theirs=theirs,
        peer=peer,
        calling_ae_title=aet,
        profile_source=profile_source,
        services=services,
        services_source=services_source,
        sections=tuple(
            replace(s, findings=tuple(sorted(s.findings, key=lambda f: -f.severity)))
            for s in sections
        ),
    )


# --- the report ----------------------------------------------------------------------------------

_FIX_WORDS = {
    "ours": "fix in our conformance YAML",
    "config": "fix in our dicomnode.yaml",
    "peer": "only the peer can change this",
    "peer or ours": "fix at the peer, or in our conformance YAML",
    "dicomnode": "not a configuration matter",
}
_SEVERITY_WORDS = {
    Severity.OK: "ok",
    Severity.NOTE: "note",
    Severity.GAP: "gap",
    Severity.MISMATCH: "MISMATCH",
}


def exit_code(report: CheckReport, strict: bool = False) -> ExitCode:
    """:attr:`ExitCode.FAILURE` when a simulated negotiation fails (a mismatch; with ``strict``
    also a gap), as an SCU command exits when a DIMSE operation failed; else SUCCESS."""
    return ExitCode.FAILURE if report.failed(strict) else ExitCode.SUCCESS


def _class_list(finding: Finding, full: bool) -> str:
    if full or len(finding.sop_classes) <= 6:
        return _names(finding.sop_classes)
    return f"{_names(finding.sop_classes[:5])} and {len(finding.sop_classes) - 5} more"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def render_text(report: CheckReport, *, strict: bool = False, full: bool = False) -> str:
    """The report for a person: per exchange, per SOP class, what happens and what to change."""
    wrap = textwrap.TextWrapper(width=100, subsequent_indent=" " * 12, break_on_hyphens=False)
    dev = report.peer.device
    about = [dev.label()]
    if dev.kind:
        about.append(f"kind {dev.kind}")
    if dev.max_pdu_size is not None:
        about.append(f"max PDU {dev.max_pdu_size or 'unlimited'}")
    if dev.implementation_class_uid:
        about.append(
            f"implementation {dev.implementation_class_uid} "
            f"{dev.implementation_version_name}".rstrip()
        )
    if dev.probed:
        about.append("probed " + ", ".join(f"{k} {v}" for k, v in dev.probed.items()))
    services = ", ".join(s.value for s in Service if s in report.services) or "none"
    lines = [
        "dicomnode conformance check",
        *wrap.wrap(
            f"  ours:   {report.ours}: {report.profile_source} for calling AE title "
            f"{report.calling_ae_title or '(none)'}; services {services} "
            f"({report.services_source})"
        ),
        *wrap.wrap(f"  theirs: {report.theirs}: {', '.join(about)}"),
    ]
    for section in report.sections:
        lines += ["", section.title]
        if section.intro:
            lines += textwrap.wrap(
                f"({section.intro})", width=100, initial_indent="  ", subsequent_indent="   "
            )
        for f in section.findings:
            head = _class_list(f, full)
            summary = f.text(f.summary, full)
            what = f"{head}: {summary}" if f.sop_classes else summary
            if f.roles:
                what += f"; {f.roles}"
            lines += wrap.wrap(f"  {_SEVERITY_WORDS[f.severity]:<9} {what}")
            for label, text in (
                ("consequence", f.consequence),
                (_FIX_WORDS.get(f.fix_by, "fix"), f.suggestion),
            ):
                if text and (f.severity > Severity.OK):
                    lines += wrap.wrap(" " * 12 + f"{label}: {f.text(text, full)}")
            if f.change is not None and f.severity > Severity.OK:
                lines += [" " * 14 + line for line in f.change.yaml(f.sop_classes).splitlines()]
    code = exit_code(report, strict)
    counts = (
        f"{_plural(report.count(Severity.MISMATCH), 'mismatch', 'mismatches')}, "
        f"{_plural(report.count(Severity.GAP), 'gap', 'gaps')}, "
        f"{_plural(report.count(Severity.NOTE), 'note', 'notes')}"
    )
    why = (
        "a simulated negotiation fails"
        if code is ExitCode.FAILURE
        else "no mismatch" + ("" if strict else "; gaps count with --strict")
    )
    lines += ["", f"Result: {counts}: exit {int(code)} ({code.name}: {why})"]
    return "\n".join(lines) + "\n"


def report_data(report: CheckReport, strict: bool = False) -> dict[str, Any]:
    """The report as plain data (for ``--format yaml`` / ``json``): names, not UIDs."""

    def finding(f: Finding) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": _SEVERITY_WORDS[f.severity].lower(),
            "sop_classes": [name_of(uid) for uid in f.sop_classes],
            "summary": f.text(f.summary),
        }
        if f.transfer_syntax:
            out["transfer_syntax"] = name_of(f.transfer_syntax)
        for key, value in (
            ("roles", f.roles),
            ("consequence", f.consequence),
            ("fix_by", f.fix_by),
            ("suggestion", f.suggestion),
        ):
            if value:
                out[key] = f.text(value)
        if f.change is not None:
            out["yaml_change"] = f.yaml_change
        return out

    code = exit_code(report, strict)
    return {
        "ours": report.ours,
        "theirs": report.theirs,
        "peer": peer_conformance_data(replace(report.peer, accept={}, propose=())).get(
            "device", {}
        ),
        "calling_ae_title": report.calling_ae_title,
        "profile": report.profile_source,
        "services": [s.value for s in Service if s in report.services],
        "services_source": report.services_source,
        "sections": [
            {
                "key": s.key,
                "title": s.title,
                "intro": s.intro,
                "findings": [finding(f) for f in s.findings],
            }
            for s in report.sections
        ],
        "result": {
            "mismatches": report.count(Severity.MISMATCH),
            "gaps": report.count(Severity.GAP),
            "notes": report.count(Severity.NOTE),
            "exit_code": int(code),
            "exit_name": code.name,
        },
    }
