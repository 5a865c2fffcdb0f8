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

This module is pure: no sockets, no pynetdicom objects, no files but the one it is asked to read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydicom._uid_dict import UID_dictionary

from dicomnode.config import read_yaml, valid_ae_title
from dicomnode.policy import (
    SOP_CLASS_GROUPS,
    TRANSFER_SYNTAX_GROUPS,
    AcceptedClass,
    ConformanceError,
    _accept_list,
    _apply_roles,
    _check_keys,
    _resolve,
    is_valid_uid,
)

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
    _check_keys(data, _DEVICE_KEYS, where)
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
        if not isinstance(rule, dict):
            raise ConformanceError(
                f"{here}: must be a mapping with sop_classes, transfer_syntaxes and maybe role"
            )
        _check_keys(rule, ("sop_classes", "transfer_syntaxes", "role"), here)
        for required in ("sop_classes", "transfer_syntaxes"):
            if required not in rule:
                raise ConformanceError(f"{here}: key {required!r} is required")
        classes = _resolve(
            rule["sop_classes"], SOP_CLASS_GROUPS, "SOP class", f"{here}.sop_classes"
        )
        syntaxes = _resolve(
            rule["transfer_syntaxes"],
            TRANSFER_SYNTAX_GROUPS,
            "transfer syntax",
            f"{here}.transfer_syntaxes",
        )
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
    _check_keys(data, _TOP_KEYS, where)
    device = _device(data.get("device"), f"{where}: device")
    accept: dict[str, AcceptedClass] = {}
    if data.get("accept") is not None:
        accept = _accept_list(data["accept"], f"{where}: accept")
    if data.get("roles") is not None:
        if not accept:
            raise ConformanceError(
                f"{where}: roles: role rules answer proposals we make as requestor, so they "
                "need an accept list; add accept or remove roles"
            )
        _apply_roles(accept, data["roles"], f"{where}: roles")
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
    groups = sorted(TRANSFER_SYNTAX_GROUPS.items(), key=lambda item: -len(item[1]))
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
