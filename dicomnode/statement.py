"""The node's DICOM Conformance Statement, built from the configuration and policy it serves with.

``dicomnode serve`` negotiates with ``load_policy(config.conformance)`` and the limits, peers and
TLS settings of ``config``; :func:`build_statement` reads exactly those objects (and the tables
the query, worklist and MPPS code match with: ``dicomnode.index.attributes``,
``dicomnode.mpps``), so the statement says what the node does, not what a document once said.
The layout follows PS3.2 Annex A (Overview, Introduction, Networking with the Implementation
Model and the AE Specifications, Media, Character Sets, Security).

Two steps: :func:`build_statement` gathers the facts into a :class:`Statement` (dataclasses, no
text layout), and :func:`render_markdown` / :func:`render_html` lay them out through one
document tree (:class:`Section`), so both formats always say the same. In the Markdown every
UID sits in a code span in its own table cell, one SOP class or transfer syntax a row, so a
program can read the presentation contexts back out of it (the tests do, and propose each one).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import Tag
from pydicom.uid import UID

from dicomnode import __version__
from dicomnode.config import Config, Service
from dicomnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.index.attributes import ATTRIBUTES, STEP_SEQUENCE, WORKLIST_ATTRIBUTES, Kind
from dicomnode.policy import AcceptedClass, Policy, service_of
from dicomnode.qr import LEVELS, MODALITY_WORKLIST_FIND, SOP_CLASSES, Level, Model, Operation

# PS3.7 A.2.1: the DICOM Application Context Name, the only one defined.
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# PS3.4 F.7.1.
MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"
VERIFICATION = "1.2.840.10008.1.1"

_SERVICE_TITLES: Mapping[Service | None, str] = {
    Service.ECHO: "Verification",
    Service.STORE: "Storage",
    Service.FIND: "Query/Retrieve - FIND",
    Service.MOVE: "Query/Retrieve - MOVE",
    Service.GET: "Query/Retrieve - GET",
    Service.WORKLIST: "Modality Worklist",
    Service.MPPS: "Modality Performed Procedure Step",
    None: "Other",
}


# --- the facts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uid:
    """A UID with the name PS3.6 gives it (the UID itself when pydicom knows no name)."""

    uid: str
    name: str

    @classmethod
    def of(cls, uid: str) -> Uid:
        name = UID(uid).name
        return cls(uid, name if name and name != uid else uid)


@dataclass(frozen=True)
class AcceptedSopClass:
    """One SOP class we accept as SCP, the role selections we agree to (PS3.7 D.3.3.4; None:
    no role selection reply, default roles) and whether the node serves its requests."""

    sop_class: Uid
    scu_role: bool | None
    scp_role: bool | None
    served: bool


@dataclass(frozen=True)
class ContextGroup:
    """SOP classes of one service accepted with the same transfer syntaxes, in preference
    order: one presentation context table of the statement."""

    title: str
    service: Service | None
    sop_classes: tuple[AcceptedSopClass, ...]
    transfer_syntaxes: tuple[Uid, ...]


@dataclass(frozen=True)
class CallerOverride:
    """What one calling AE title with an entry under the conformance ``peers`` negotiates."""

    ae_title: str
    services: tuple[Service, ...]  # what config allows it (a peer's, or unknown_peers)
    replaces_accept: bool
    narrowed_to: tuple[Uid, ...]  # transfer_syntaxes of the override; () when not given
    groups: tuple[ContextGroup, ...]  # what it gets, services applied
    # Why SOP classes of the general policy are missing for it: reason -> how many.
    excluded: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RemoteAE:
    """A configured peer: where we reach it, what it may ask of us."""

    name: str
    ae_title: str
    host: str
    port: int
    services: tuple[Service, ...]
    allowed_hosts: tuple[str, ...]
    move_destinations: tuple[str, ...] | None  # None: any configured peer
    worklist_scope: str
    tls: bool


@dataclass(frozen=True)
class ScuActivity:
    """One activity in which the node requests associations (PS3.2 "Association Initiation
    Policy"): the command or event, and the presentation contexts it proposes."""

    name: str
    trigger: str
    proposed: tuple[tuple[str, tuple[Uid, ...]], ...]  # (abstract syntax text, syntaxes)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryKey:
    """A C-FIND key of the Patient/Study Root models (``dicomnode.index.attributes``)."""

    keyword: str
    tag: str
    level: Level
    kind: Kind
    unique: bool
    computed: bool


@dataclass(frozen=True)
class WorklistKey:
    """A Modality Worklist key (PS3.4 Table K.6-1) as ``WORKLIST_ATTRIBUTES`` lists it."""

    keyword: str
    tag: str
    vr: str
    in_step: bool
    required: bool


@dataclass(frozen=True)
class TlsFacts:
    enabled: bool
    port: int
    only: bool
    min_version: str
    client_certificates: str
    certificate: str
    ca_certificates: str
    ciphers: tuple[str, ...]


@dataclass(frozen=True)
class Statement:
    """Everything the conformance statement says, gathered from a Config and a Policy."""

    product: str
    version: str
    ae_title: str
    host: str
    port: int
    workers: str
    config_source: str
    conformance_source: str
    implementation_class_uid: str
    implementation_version_name: str
    application_context_name: str
    max_pdu_size: int
    max_associations: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    require_called_ae_title: bool
    unknown_peers: tuple[Service, ...]
    peers: tuple[RemoteAE, ...]
    accepted: tuple[ContextGroup, ...]
    # Every SOP class some caller may negotiate (the general policy and the overrides).
    scp_sop_classes: tuple[str, ...]
    overrides: tuple[CallerOverride, ...]
    scu: tuple[ScuActivity, ...]
    query_keys: tuple[QueryKey, ...]
    query_models: Mapping[str, tuple[Level, ...]]  # SOP class UID -> levels
    retrieve_models: Mapping[str, tuple[Level, ...]]
    case_sensitive_names: bool
    max_matches: int
    worklist_keys: tuple[WorklistKey, ...]
    worklist_scope: str
    hide_completed: bool
    expire_after_days: int
    mpps_create_type1: tuple[str, ...]
    mpps_create_type2: tuple[str, ...]
    mpps_not_settable: tuple[str, ...]
    mpps_final_type1: tuple[str, ...]
    character_sets: tuple[str, ...]
    duplicates: str
    min_free_space: int
    max_size: int
    at_limit: str
    tls: TlsFacts
    audit_enabled: bool
    audit_path: str
    audit_events: tuple[str, ...]

    def accepted_pairs(self) -> set[tuple[str, str]]:
        """Every (SOP class UID, transfer syntax UID) of the general policy's tables."""
        return {
            (c.sop_class.uid, ts.uid)
            for g in self.accepted
            for c in g.sop_classes
            for ts in g.transfer_syntaxes
        }


# --- building it -------------------------------------------------------------------------------


def _served(uid: str) -> bool:
    """Whether the node answers requests of this SOP class once negotiated (its handlers in
    dicomnode.ae): Verification, every storage class, the Patient/Study Root FIND/MOVE/GET models,
    Modality Worklist FIND and MPPS N-CREATE/N-SET. Other classes a YAML names are accepted in
    negotiation only and their requests refused."""
    service = service_of(uid)
    if service in (Service.ECHO, Service.STORE):
        return True
    if service in (Service.FIND, Service.MOVE, Service.GET):
        return uid in SOP_CLASSES.values()
    return uid in (MODALITY_WORKLIST_FIND, MODALITY_PERFORMED_PROCEDURE_STEP)


def _groups(classes: Iterable[AcceptedClass]) -> tuple[ContextGroup, ...]:
    """SOP classes grouped by (service, transfer syntaxes), in the order they first appear."""
    grouped: dict[tuple[Service | None, tuple[str, ...]], list[AcceptedClass]] = {}
    for accepted in classes:
        key = (service_of(accepted.sop_class), accepted.transfer_syntaxes)
        grouped.setdefault(key, []).append(accepted)
    per_service: dict[Service | None, int] = {}
    for service, _ in grouped:
        per_service[service] = per_service.get(service, 0) + 1
    seen: dict[Service | None, int] = {}
    groups = []
    for (service, syntaxes), members in grouped.items():
        seen[service] = seen.get(service, 0) + 1
        title = _SERVICE_TITLES[service]
        if per_service[service] > 1:
            title = f"{title} ({seen[service]} of {per_service[service]})"
        groups.append(
            ContextGroup(
                title=title,
                service=service,
                sop_classes=tuple(
                    AcceptedSopClass(
                        Uid.of(a.sop_class), a.scu_role, a.scp_role, _served(a.sop_class)
                    )
                    for a in members
                ),
                transfer_syntaxes=tuple(Uid.of(ts) for ts in syntaxes),
            )
        )
    return tuple(groups)


def _services(services: Iterable[Service]) -> tuple[Service, ...]:
    return tuple(s for s in Service if s in set(services))


def _overrides(config: Config, policy: Policy) -> tuple[CallerOverride, ...]:
    overrides = []
    for ae_title, override in policy.peers.items():
        services = config.services_for(ae_title)
        profile = policy.profile(ae_title, services)
        excluded: dict[str, int] = {}
        for reason in profile.excluded.values():
            excluded[reason] = excluded.get(reason, 0) + 1
        overrides.append(
            CallerOverride(
                ae_title=ae_title,
                services=_services(services),
                replaces_accept=override.accept is not None,
                narrowed_to=tuple(Uid.of(ts) for ts in override.transfer_syntaxes or ()),
                groups=_groups(profile.classes.values()),
                excluded=excluded,
            )
        )
    return tuple(overrides)


def _scu_activities(config: Config) -> tuple[ScuActivity, ...]:
    # The contexts our SCU commands really propose, read from the code that builds them.
    from pynetdicom.presentation import build_context

    from dicomnode import scu

    qr_syntaxes = tuple(Uid.of(str(ts)) for ts in scu.QR_TRANSFER_SYNTAXES)
    echo = build_context(scu.VERIFICATION_SOP_CLASS)
    get_contexts, get_roles = scu.get_contexts(UID(SOP_CLASSES[Model.STUDY_ROOT, Operation.GET]))
    storage_plain = [cx for cx in get_contexts[1:] if len(cx.transfer_syntax) == 2]
    storage_compressed = [cx for cx in get_contexts[1:] if len(cx.transfer_syntax) > 2]
    find_models = ", ".join(
        f"{Uid.of(SOP_CLASSES[m, Operation.FIND]).name} `{SOP_CLASSES[m, Operation.FIND]}`"
        for m in Model
    )
    move_models = ", ".join(
        f"{Uid.of(SOP_CLASSES[m, Operation.MOVE]).name} `{SOP_CLASSES[m, Operation.MOVE]}`"
        for m in Model
    )
    get_models = ", ".join(
        f"{Uid.of(SOP_CLASSES[m, Operation.GET]).name} `{SOP_CLASSES[m, Operation.GET]}`"
        for m in Model
    )
    limit = scu.MAX_CONTEXTS_PER_ASSOCIATION
    return (
        ScuActivity(
            "Verify a peer",
            "`dicomnode echo PEER`",
            (
                (
                    f"Verification `{VERIFICATION}`",
                    tuple(Uid.of(str(ts)) for ts in echo.transfer_syntax),
                ),
            ),
            ("One C-ECHO; the status is printed and sets the exit code.",),
        ),
        ScuActivity(
            "Send instances",
            "`dicomnode send PEER FILES...`",
            (("the SOP class of each file", ()),),
            (
                "One presentation context per distinct (SOP class, transfer syntax) of the "
                "files, proposing exactly the file's own transfer syntax: files are sent as "
                "stored, never decoded or re-encoded.",
                f"At most {limit} contexts per association (PS3.8 9.3.2.2); more pairs use "
                "further associations, one after the other.",
                "A file whose context the peer rejects is reported as not sent.",
            ),
        ),
        ScuActivity(
            "Query (C-FIND)",
            "`dicomnode find PEER --level ... -k KEY=VALUE`",
            ((find_models, qr_syntaxes),),
            (
                "Keys are sent as typed; Specific Character Set ISO_IR 192 is added when a "
                "value is not ASCII. Ctrl-C sends C-CANCEL.",
            ),
        ),
        ScuActivity(
            "Retrieve to a third party (C-MOVE)",
            "`dicomnode move PEER --dest AET ...`",
            ((move_models, qr_syntaxes),),
            ("The peer resolves the destination AE title; Ctrl-C sends C-CANCEL.",),
        ),
        ScuActivity(
            "Retrieve to us (C-GET)",
            "`dicomnode get PEER ...`",
            (
                (get_models, qr_syntaxes),
                (
                    f"{len(storage_plain)} storage SOP classes (pynetdicom's "
                    "StoragePresentationContexts)",
                    tuple(Uid.of(str(ts)) for ts in storage_plain[0].transfer_syntax),
                ),
                (
                    ", ".join(
                        f"{Uid.of(str(cx.abstract_syntax)).name} `{cx.abstract_syntax}`"
                        for cx in storage_compressed
                    ),
                    tuple(Uid.of(str(ts)) for ts in storage_compressed[0].transfer_syntax),
                ),
            ),
            (
                f"At most {limit} contexts in one association; an SCP/SCU Role Selection item "
                f"with the SCP role for each of the {len(get_roles)} storage SOP classes "
                "(PS3.7 D.3.3.4): the instances arrive as C-STORE sub-operations on the same "
                "association and are written as received.",
            ),
        ),
        ScuActivity(
            "Query a Modality Worklist",
            "`dicomnode worklist query PEER ...`",
            (
                (
                    f"Modality Worklist Information Model - FIND `{MODALITY_WORKLIST_FIND}`",
                    qr_syntaxes,
                ),
            ),
            ("Specific Character Set ISO_IR 192 when a key is not ASCII.",),
        ),
        ScuActivity(
            "C-MOVE sub-operations",
            "a C-MOVE request we accept (as Q/R SCP), to a configured peer",
            (("the SOP class of each instance to send", ()),),
            (
                "To the configured peer whose AE title is the Move Destination: its host and "
                "port from the configuration, never an address the caller supplies.",
                "One context per (SOP class, stored transfer syntax), and one proposing "
                "Explicit and Implicit VR Little Endian unless both are among those, so the "
                "destination can take a losslessly decompressed or re-encoded copy "
                "(dicomnode.transcode).",
                f"At most {limit} contexts per association, more associations one after the "
                "other; each C-STORE carries the Move Originator AE Title and Message ID "
                "(PS3.7 9.1.1.1).",
            ),
        ),
    )


def _character_sets() -> tuple[str, ...]:
    """The Specific Character Set defined terms (PS3.3 C.12.1.1.2) pydicom decodes."""
    pattern = re.compile(r"^(ISO_IR \d+|ISO 2022 IR \d+|GB18030|GBK)$")
    return tuple(term for term in python_encoding if pattern.fullmatch(term))


def _tag(keyword: str) -> str:
    return str(Tag(tag_for_keyword(keyword) or 0))


def _vr(keyword: str) -> str:
    try:
        return str(dictionary_VR(keyword)).split(" or ")[0]
    except KeyError:
        return "UN"


def build_statement(config: Config, policy: Policy) -> Statement:
    """The conformance statement of a node serving ``config`` with ``policy``."""
    from dicomnode import mpps
    from dicomnode.tls import BCP195_CIPHERS

    tls = config.tls
    return Statement(
        product="dicomnode",
        version=__version__,
        ae_title=config.ae_title,
        host=config.host,
        port=config.port,
        workers=(
            f"auto ({config.worker_count()} here)"
            if config.workers == "auto"
            else str(config.workers)
        ),
        config_source=str(config.source) if config.source else "built-in defaults",
        conformance_source=str(config.conformance) if config.conformance else "built-in policy",
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
        application_context_name=APPLICATION_CONTEXT_NAME,
        max_pdu_size=config.limits.max_pdu_size,
        max_associations=config.limits.max_associations,
        acse_timeout=config.limits.acse_timeout,
        dimse_timeout=config.limits.dimse_timeout,
        network_timeout=config.limits.network_timeout,
        require_called_ae_title=config.require_called_ae_title,
        unknown_peers=_services(config.unknown_peers),
        peers=tuple(
            RemoteAE(
                name=p.name,
                ae_title=p.ae_title,
                host=p.host,
                port=p.port,
                services=_services(p.services),
                allowed_hosts=p.allowed_hosts,
                move_destinations=(
                    None if p.move_destinations is None else tuple(sorted(p.move_destinations))
                ),
                worklist_scope=str(config.worklist_scope_for(p.ae_title)),
                tls=p.tls,
            )
            for p in config.peers.values()
        ),
        accepted=_groups(policy.accept.values()),
        scp_sop_classes=policy.sop_classes(),
        overrides=_overrides(config, policy),
        scu=_scu_activities(config),
        query_keys=tuple(
            QueryKey(a.keyword, _tag(a.keyword), a.level, a.kind, a.unique_key, a.computed)
            for a in ATTRIBUTES
        ),
        query_models={SOP_CLASSES[m, Operation.FIND]: LEVELS[m] for m in Model},
        retrieve_models={
            SOP_CLASSES[m, op]: LEVELS[m] for m in Model for op in (Operation.MOVE, Operation.GET)
        },
        case_sensitive_names=config.query.case_sensitive_names,
        max_matches=config.query.max_matches,
        worklist_keys=tuple(
            WorklistKey(a.keyword, _tag(a.keyword), _vr(a.keyword), a.in_step, a.required_key)
            for a in WORKLIST_ATTRIBUTES
        ),
        worklist_scope=str(config.worklist.default_scope),
        hide_completed=config.worklist.hide_completed,
        expire_after_days=config.worklist.expire_after_days,
        mpps_create_type1=mpps.CREATE_TYPE_1,
        mpps_create_type2=mpps.CREATE_TYPE_2,
        mpps_not_settable=mpps.NOT_SETTABLE,
        mpps_final_type1=mpps.FINAL_TYPE_1,
        character_sets=_character_sets(),
        duplicates=str(config.store.duplicates),
        min_free_space=config.store.min_free_space,
        max_size=config.store.max_size,
        at_limit=str(config.store.at_limit),
        tls=TlsFacts(
            enabled=tls.enabled,
            port=tls.port,
            only=tls.only,
            min_version=tls.min_version,
            client_certificates=str(tls.client_certificates),
            certificate=str(tls.certificate) if tls.certificate else "",
            ca_certificates=str(tls.ca_certificates) if tls.ca_certificates else "",
            ciphers=tuple(BCP195_CIPHERS.split(":")),
        ),
        audit_enabled=config.audit.enabled,
        audit_path=str(config.audit.path),
        audit_events=AUDIT_EVENTS,
    )


# The audit trail's event names and what PS3.15 A.5.3 calls them (dicomnode.audit).
AUDIT_EVENTS = (
    "application-start, application-stop: Application Activity",
    "association-accepted, association-rejected: Security Alert / User Authentication",
    "instances-stored: DICOM Instances Transferred (per association and study)",
    "query: Query (C-FIND, Modality Worklist)",
    "retrieve: DICOM Instances Transferred (C-MOVE, C-GET), from us to a destination",
    "delete: DICOM Study Deleted",
    "config-reload: Security Alert (software configuration)",
)


# --- the document: one tree, two renderers -----------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A table; cells are text in which `...` marks a code span (UIDs, AE titles, keys)."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


Block = str | Table | Bullets  # a str is a paragraph


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)
    numbered: bool = True

    def add(self, title: str, *blocks: Block) -> Section:
        child = Section(title, list(blocks))
        self.children.append(child)
        return child


@dataclass(frozen=True)
class Document:
    title: str
    sections: tuple[Section, ...]


def code(value: object) -> str:
    """``value`` as a code span; a value holding a backtick is fenced with two (CommonMark)."""
    text = str(value)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _names(services: Iterable[Service]) -> str:
    return ", ".join(code(s.value) for s in services) or "none"


def _bytes(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size} bytes ({size // factor} {unit})"
    return f"{size} bytes"


def _role(flag: bool | None) -> str:
    return "no reply (default role)" if flag is None else ("agreed" if flag else "refused")


def _sop_table(group: ContextGroup) -> Table:
    rows = []
    for c in group.sop_classes:
        served = "" if c.served else " (negotiated only: the node provides no service for it)"
        rows.append(
            (
                c.sop_class.name + served,
                code(c.sop_class.uid),
                _role(c.scu_role),
                _role(c.scp_role),
            )
        )
    return Table(
        ("SOP Class", "SOP Class UID", "Caller as SCU (role selection)", "Caller as SCP"),
        tuple(rows),
    )


def _syntax_table(syntaxes: Iterable[Uid]) -> Table:
    return Table(
        ("Preference", "Transfer Syntax", "Transfer Syntax UID"),
        tuple((str(i), ts.name, code(ts.uid)) for i, ts in enumerate(syntaxes, start=1)),
    )


def _group_sections(parent: Section, groups: Iterable[ContextGroup], who: str) -> None:
    for group in groups:
        service = f"the {code(group.service.value)} service" if group.service else "no service"
        parent.add(
            f"Presentation contexts: {group.title}",
            f"{len(group.sop_classes)} SOP class(es), accepted {who} that may use {service}, "
            f"as SCP, with any of {len(group.transfer_syntaxes)} transfer syntax(es). For each "
            "proposed context the node accepts the first syntax of this list (its order of "
            "preference) that the caller offered.",
            _sop_table(group),
            _syntax_table(group.transfer_syntaxes),
        )


def _overview(st: Statement) -> Section:
    overview = Section("Conformance Statement Overview", numbered=False)
    overview.blocks.append(
        f"{st.product} {st.version} is a DICOM storage, query/retrieve, Modality Worklist and "
        f"MPPS node (one Application Entity, {code(st.ae_title)}) with command-line SCU tools. "
        f"This statement was generated by {code('dicomnode conformance show')} from the "
        f"configuration {code(st.config_source)} and the conformance policy "
        f"{code(st.conformance_source)}: the same objects {code('dicomnode serve')} negotiates "
        "with, so it describes the node as configured and changes with its configuration."
    )
    accepted = set(st.scp_sop_classes)
    all_groups = [*st.accepted, *(g for o in st.overrides for g in o.groups)]
    served = {c.sop_class.uid: c.served for g in all_groups for c in g.sop_classes}

    def scp(uid: str) -> str:
        if uid not in accepted:
            return "no"
        return "yes" if served.get(uid, _served(uid)) else "negotiated only"

    storage = [u for u in accepted if service_of(u) is Service.STORE]
    scu_qr = set(SOP_CLASSES.values())
    rows: list[tuple[str, ...]] = [
        (
            "Transfer",
            f"Storage SOP Classes ({len(storage)}, listed in the presentation context tables)",
            "",
            "yes (any held or sent)",
            "yes" if storage else "no",
        ),
    ]
    qr = [
        u
        for u in {*SOP_CLASSES.values(), *accepted}
        if service_of(u) in (Service.FIND, Service.MOVE, Service.GET)
    ]
    for uid in sorted(qr, key=lambda u: (u not in scu_qr, u)):
        rows.append(("Query/Retrieve", Uid.of(uid).name, code(uid), _yes(uid in scu_qr), scp(uid)))
    workflow = [MODALITY_WORKLIST_FIND, MODALITY_PERFORMED_PROCEDURE_STEP]
    workflow += sorted(
        u
        for u in accepted
        if service_of(u) in (Service.WORKLIST, Service.MPPS) and u not in workflow
    )
    for uid in workflow:
        rows.append(
            (
                "Workflow Management",
                Uid.of(uid).name,
                code(uid),
                _yes(uid == MODALITY_WORKLIST_FIND),
                scp(uid),
            )
        )
    rows.append(("Verification", "Verification", code(VERIFICATION), "yes", scp(VERIFICATION)))
    for uid in sorted(u for u in accepted if service_of(u) is None):
        rows.append(("Other", Uid.of(uid).name, code(uid), "no", scp(uid)))
    overview.blocks += [
        Table(
            (
                "Service",
                "SOP Class",
                "SOP Class UID",
                "User of Service (SCU)",
                "Provider of Service (SCP)",
            ),
            tuple(rows),
        ),
        "Media interchange: none (no DICOMDIR is written; the send command reads DICOMDIRs).",
    ]
    return overview


def _introduction(st: Statement) -> Section:
    intro = Section("Introduction")
    intro.add(
        "Revision History",
        Table(
            ("Document", "Product version", "Implementation Version Name"),
            (("generated", st.version, code(st.implementation_version_name)),),
        ),
    )
    intro.add(
        "Audience and Remarks",
        "For integrators and reviewers connecting devices to this node. Everything here is "
        "read from the running configuration and the code that acts on it; where a behaviour "
        "depends on a setting, the configured value is given. A reload (SIGHUP) or restart "
        "with another configuration changes what the node does, and this statement with it.",
    )
    intro.add(
        "Terms and Definitions",
        Bullets(
            (
                "AE: Application Entity; SCU/SCP: Service Class User/Provider",
                "PDU: Protocol Data Unit (PS3.8); Q/R: Query/Retrieve (PS3.4 C)",
                "MWL: Modality Worklist (PS3.4 K); MPPS: Modality Performed Procedure Step "
                "(PS3.4 F)",
                "TLS: Transport Layer Security (PS3.15 B.9, BCP 195)",
            )
        ),
    )
    intro.add(
        "References",
        Bullets(
            (
                "PS3.2 Conformance (Annex A: the structure of this statement)",
                "PS3.4 Service Class Specifications; PS3.5 Data Structures and Encoding",
                "PS3.7 Message Exchange; PS3.8 Network Communication Support",
                "PS3.15 Security and System Management Profiles; BCP 195 (RFC 9325)",
            )
        ),
    )
    return intro


def _implementation_model(st: Statement) -> Section:
    model = Section("Implementation Model")
    provided = set(provided_services(st))
    flow: list[str] = []
    if Service.STORE in provided:
        flow.append(
            f"Remote AEs send instances (C-STORE) to {code(st.ae_title)}; each is checked and "
            "kept exactly as received (file and index entry) before Success is answered."
        )
    if provided & {Service.FIND, Service.MOVE, Service.GET}:
        flow.append(
            "Remote AEs query the index (C-FIND) and retrieve stored instances (C-MOVE to a "
            "configured peer, C-GET on their own association), as far as the policy accepts "
            "those models."
        )
    if provided & {Service.WORKLIST, Service.MPPS}:
        flow.append(
            "Modalities query the Modality Worklist held in the index (items added with "
            f"{code('dicomnode worklist add/import')}) and report performed steps with MPPS, "
            "which updates the status of the worklist items they performed."
        )
    flow.append(
        "Operators use the SCU commands (echo, send, find, move, get, worklist query) to act "
        "on remote AEs as the same AE title."
    )
    model.add("Application Data Flow", Bullets(tuple(flow)))
    model.add(
        "Functional Definition of AEs",
        f"One AE, {code(st.ae_title)}, listening on {code(st.host)} port {st.port}"
        + (f" and DICOM TLS port {st.tls.port}" if st.tls.enabled else "")
        + (" (TLS only)" if st.tls.only else "")
        + f", with {st.workers} worker process(es) sharing the port. It is SCP of the services "
        "in the presentation context tables, and SCU for the activities of the association "
        "initiation policy. Port 0 means a port the system assigns at start.",
    )
    sequencing = [
        "An instance can be queried and retrieved once its C-STORE was answered Success.",
        "C-MOVE: the sub-operations run on our associations to the destination before the final "
        "C-MOVE response; C-GET: on the requesting association.",
    ]
    if Service.MPPS in provided:
        sequencing.append(
            "A worklist item's ScheduledProcedureStepStatus follows the MPPS that performed it: "
            "STARTED at N-CREATE (IN PROGRESS), then COMPLETED or DISCONTINUED at N-SET"
            + (
                "; COMPLETED items are left out of worklist answers unless asked for by value."
                if st.hide_completed
                else "."
            )
        )
    model.add("Sequencing of Real-World Activities", Bullets(tuple(sequencing)))
    return model


def _association_policies(st: Statement, ae: Section) -> None:
    pol = ae.add("Association Policies")
    pol.add(
        "General",
        Table(
            ("Item", "Value"),
            (
                (
                    "Application Context Name (returned in every A-ASSOCIATE-AC)",
                    code(st.application_context_name),
                ),
                ("Maximum PDU size we announce (PS3.8 D.1)", _bytes(st.max_pdu_size)),
                ("PDUs we send", "at most the Maximum Length the peer announced"),
                ("ACSE timeout", f"{st.acse_timeout:g} s"),
                ("DIMSE timeout", f"{st.dimse_timeout:g} s"),
                ("Network timeout", f"{st.network_timeout:g} s"),
            ),
        ),
    )
    pol.add(
        "Number of Associations",
        Table(
            ("Item", "Value"),
            (
                ("Maximum simultaneous associations accepted", str(st.max_associations)),
                ("Worker processes", st.workers),
                (
                    "Connections waiting for their A-ASSOCIATE-RQ",
                    f"at most {2 * st.max_associations}",
                ),
                ("Associations initiated by one SCU command", "1 at a time"),
            ),
        ),
        f"The limit of {st.max_associations} holds node-wide, across the worker processes. "
        "One more association is answered A-ASSOCIATE-RJ rejected-transient, source "
        "service-provider (presentation), reason local-limit-exceeded (PS3.8 9.3.4).",
    )
    pol.add(
        "Asynchronous Nature",
        "Not supported: the node answers an Asynchronous Operations Window item (PS3.7 "
        "D.3.3.3) with none, so one operation is outstanding at a time in each direction; our "
        "SCU commands propose none.",
    )
    pol.add(
        "Implementation Identifying Information",
        Table(
            ("Item", "Value"),
            (
                ("Implementation Class UID", code(st.implementation_class_uid)),
                ("Implementation Version Name", code(st.implementation_version_name)),
            ),
        ),
        "Both are sent in every A-ASSOCIATE-RQ and A-ASSOCIATE-AC (PS3.7 D.3.3.2) and written "
        "in the File Meta of stored files. The UID is under the UUID-derived root 2.25 "
        "(PS3.5 B.2), generated for dicomnode.",
    )


def _initiation(st: Statement, ae: Section) -> None:
    init = ae.add("Association Initiation Policy")
    tls_peers = [p for p in st.peers if p.tls]
    init.blocks.append(
        f"The node calls remote AEs as {code(st.ae_title)}, proposing the maximum PDU size "
        "above; a peer is named in the configuration or given as AET@host:port. "
        + (
            "Peers called over DICOM TLS: " + ", ".join(code(p.name) for p in tls_peers) + "."
            if tls_peers
            else "No peer is configured for DICOM TLS (peers.NAME.tls)."
        )
    )
    for activity in st.scu:
        rows = tuple(
            (
                abstract,
                ", ".join(f"{ts.name} {code(ts.uid)}" for ts in syntaxes)
                or "the instance's own transfer syntax",
            )
            for abstract, syntaxes in activity.proposed
        )
        init.add(
            f"Activity: {activity.name}",
            f"Triggered by {activity.trigger}.",
            Table(("Proposed abstract syntaxes", "Transfer syntaxes, in order"), rows),
            Bullets(activity.notes),
        )


def _override(st: Statement, ae_title: str) -> str:
    return "yes (below)" if any(o.ae_title == ae_title for o in st.overrides) else "none"


def _callers(st: Statement) -> Table:
    configured = {p.ae_title for p in st.peers}
    rows = []
    for p in st.peers:
        destinations = (
            "any configured peer"
            if p.move_destinations is None
            else ", ".join(code(d) for d in p.move_destinations) or "none"
        )
        rows.append(
            (
                code(p.name),
                code(p.ae_title),
                ", ".join(code(h) for h in p.allowed_hosts),
                _names(p.services),
                destinations,
                code(p.worklist_scope),
                _override(st, p.ae_title),
            )
        )
    rows.append(
        (
            "any other caller",
            "any",
            "any address",
            _names(st.unknown_peers),
            "any configured peer",
            code(st.worklist_scope),
            ", ".join(code(o.ae_title) for o in st.overrides if o.ae_title not in configured)
            or "none",
        )
    )
    return Table(
        (
            "Peer",
            "Calling AE title",
            "Calls from",
            "Services",
            "May C-MOVE to",
            "Worklist scope",
            "Per-caller override",
        ),
        tuple(rows),
    )


def _acceptance(st: Statement, ae: Section) -> None:
    acc = ae.add("Association Acceptance Policy")
    listeners = [] if st.tls.only else [f"port {st.port}"]
    if st.tls.enabled:
        listeners.append(f"DICOM TLS port {st.tls.port}")
    acc.blocks += [
        f"The node accepts associations on {code(st.host)} {' and '.join(listeners)}. What a "
        "caller may negotiate depends on who it is: a configured peer is recognised by its "
        "Calling AE Title together with the address it calls from; every other caller gets "
        "the services of unknown_peers.",
        _callers(st),
        Bullets(
            (
                (
                    f"The Called AE Title must be {code(st.ae_title)}, else A-ASSOCIATE-RJ "
                    "rejected-permanent, service-user, called-AE-title-not-recognized "
                    "(require_called_ae_title: true)."
                    if st.require_called_ae_title
                    else "The Called AE Title is not checked (require_called_ae_title: false)."
                ),
                "A configured peer's AE title from an address not in its hosts, and a caller "
                "allowed no service, are rejected: rejected-permanent, service-user, "
                "calling-AE-title-not-recognized. Each rejection is logged and audited.",
                "A caller is offered only the SOP classes of the services it may use; other "
                "contexts are rejected (abstract syntax not supported), as are SOP classes "
                "outside the tables below and contexts offering none of a class's transfer "
                "syntaxes (transfer syntaxes not supported). The log says why for each.",
                "SOP Class Extended Negotiation is not answered (relational queries, "
                "combined date-time and fuzzy semantic matching: not supported), and SOP "
                "Class Common Extended Negotiation items are not accepted.",
            )
        ),
    ]
    tables = acc.add(
        "Presentation Context Tables",
        f"The general policy ({code(st.conformance_source)}). SCP/SCU role selection (PS3.7 "
        "D.3.3.4): the role columns say whether the node agrees when the caller proposes to "
        "act as SCU or as SCP of a SOP class; a C-GET requestor must be agreed the SCP role "
        "for the storage classes it is to receive.",
    )
    _group_sections(tables, st.accepted, "from every caller")
    overrides = acc.add("Per-Caller Overrides")
    if not st.overrides:
        overrides.blocks.append("None configured: every caller negotiates the tables above.")
    for o in st.overrides:
        what = []
        if o.replaces_accept:
            what.append("its own accept list replaces the general one")
        if o.narrowed_to:
            what.append(
                "every SOP class narrowed to "
                + ", ".join(f"{ts.name} {code(ts.uid)}" for ts in o.narrowed_to)
                + ", in this order of preference"
            )
        excluded = "; ".join(f"{n} SOP class(es): {why}" for why, n in o.excluded.items())
        section = overrides.add(
            f"Calling AE title {code(o.ae_title)}",
            f"For calls with Calling AE Title {code(o.ae_title)}: {'; '.join(what)}. Allowed "
            f"the services {_names(o.services)}, it negotiates exactly the tables below."
            + (f" Not accepted from it: {excluded}." if excluded else ""),
        )
        _group_sections(section, o.groups, f"from {code(o.ae_title)}")
        if not o.groups:
            section.blocks.append("Nothing: its associations are rejected.")
    _service_conformance(st, acc)


_KIND_MATCHING: Mapping[Kind, str] = {
    Kind.TEXT: "single value (exact, case-sensitive), wildcard (`*` `?`), universal",
    Kind.PERSON_NAME: "single value, wildcard (`*` `?`), universal; per component group",
    Kind.INTEGER: "single value, universal",
    Kind.UID: "single value, list of UIDs, universal",
    Kind.DATE: "single value, range, universal",
    Kind.TIME: "single value, range (time of day), universal",
    Kind.COUNT: "single value, universal; computed",
    Kind.MODALITIES: "single value, list, wildcard, universal; matches when any modality of "
    "the study does",
    Kind.UID_LIST: "single value, list of UIDs, universal; computed from the study's instances",
}


def _worklist_matching(vr: str, names: str) -> str:
    from dicomnode.index.worklist import NO_WILDCARDS

    if vr == "SQ":
        return "sequence matching (one item), universal (zero length: the whole sequence)"
    if vr == "PN":
        return f"single value, wildcard (`*` `?`), universal; per component group, {names}"
    if vr == "UI":
        return "single value, list of UIDs, universal"
    if vr in ("DA", "TM", "DT"):
        return "single value, range, universal"
    if vr in NO_WILDCARDS:
        return "single value, universal"
    return "single value (exact, case-sensitive), wildcard (`*` `?`), universal"


# Which services each SOP Specific Conformance section describes.
_SECTION_SERVICES: Mapping[str, frozenset[Service]] = {
    "Verification SCP": frozenset({Service.ECHO}),
    "Storage SCP": frozenset({Service.STORE}),
    "Query/Retrieve SCP: C-FIND": frozenset({Service.FIND}),
    "Query/Retrieve SCP: C-MOVE and C-GET": frozenset({Service.MOVE, Service.GET}),
    "Modality Worklist SCP": frozenset({Service.WORKLIST}),
    "Modality Performed Procedure Step SCP": frozenset({Service.MPPS}),
}


def provided_services(st: Statement) -> tuple[Service, ...]:
    """The services some caller may negotiate a served SOP class of (policy and overrides)."""
    found = {service_of(uid) for uid in st.scp_sop_classes if _served(uid)}
    return tuple(s for s in Service if s in found)


def _service_conformance(st: Statement, acc: Section) -> None:
    spec = acc.add("SOP Specific Conformance")
    _service_sections(st, spec)
    provided = set(provided_services(st))
    left = [c.title for c in spec.children if not _SECTION_SERVICES[c.title] & provided]
    spec.children = [c for c in spec.children if _SECTION_SERVICES[c.title] & provided]
    if left:
        spec.blocks.append(
            "Not provided with this policy (it accepts no SOP class the node serves for them): "
            + ", ".join(left)
            + "."
        )
    allowed = set(st.unknown_peers) | {s for p in st.peers for s in p.services}
    unused = [s for s in provided_services(st) if s not in allowed]
    if unused:
        spec.blocks.append(
            f"In the policy but allowed to no caller (unknown_peers, peers.NAME.services): "
            f"{_names(unused)}."
        )


def _service_sections(st: Statement, spec: Section) -> None:
    names = "case-sensitive" if st.case_sensitive_names else "case-insensitive"
    spec.add("Verification SCP", "C-ECHO is answered Success (0000).")
    quota = (
        f"the stored instances may take {_bytes(st.max_size)}; at that size the node "
        + (
            "refuses stores (A700)"
            if st.at_limit == "refuse"
            else "removes the studies "
            "received longest ago until the new instance fits (at_limit: recycle)"
        )
        if st.max_size
        else "no quota (store.max_size 0)"
    )
    spec.add(
        "Storage SCP",
        Bullets(
            (
                "Level 2 (Full) storage in the sense of PS3.4 B.4.1: every element is kept; "
                "data sets are stored exactly as received (no coercion, no decompression), "
                "so the node never answers a coercion warning.",
                "Before Success, the encoding of the whole data set is walked (element "
                "lengths, delimiters, nesting at most 64 deep, deflated data inflated in "
                "bounded steps), the SOP Class and Instance UIDs must match the request and "
                "Study and Series Instance UIDs must be valid; the file is then fsynced and "
                "indexed.",
                f"An instance received again: identical content is Success; different content "
                f"follows store.duplicates: {code(st.duplicates)}.",
                f"Stores are refused (A700) when the storage filesystem has less than "
                f"{_bytes(st.min_free_space)} free; {quota}.",
            )
        ),
        Table(
            ("Status", "Meaning"),
            (
                ("0000", "Success: stored (or an identical copy is held)"),
                ("A700", "Refused: out of resources (free space, quota, write failure)"),
                ("A701", "Refused: out of resources (the index is unavailable)"),
                ("A900", "Error: data set does not match SOP class (UIDs differ or missing)"),
                ("C000", "Error: cannot understand (the encoding is broken)"),
                ("0111", "Failure: duplicate SOP instance (store.duplicates: reject)"),
                ("0117", "Failure: invalid SOP Instance UID"),
                ("0122", "Refused: SOP class not supported (not the context's, or not a UID)"),
            ),
        ),
    )
    models = Table(
        ("Information model", "SOP Class UID", "Levels"),
        tuple(
            (Uid.of(uid).name, code(uid), ", ".join(level.value for level in levels))
            for uid, levels in st.query_models.items()
        ),
    )
    keys = Table(
        ("Key", "Tag", "Level", "Unique key", "Matching"),
        tuple(
            (
                code(k.keyword),
                k.tag,
                k.level.value,
                "U" if k.unique else "",
                _KIND_MATCHING[k.kind] + (f", {names}" if k.kind is Kind.PERSON_NAME else ""),
            )
            for k in st.query_keys
        ),
    )
    spec.add(
        "Query/Retrieve SCP: C-FIND",
        "Hierarchical queries only (PS3.4 C.4.1.2.2): below the model's top level, the unique "
        "key of every level above the query level must be a single value.",
        models,
        "Keys the index matches and returns (in the Study Root model the Patient level keys "
        "are matched at the Study level):",
        keys,
        Bullets(
            (
                "Universal matching: an empty value, or `*` alone.",
                f"Person names match per component group (alphabetic, ideographic, phonetic); "
                f"a value without `=` may match any group; {names} "
                "(query.case_sensitive_names), Unicode casefolded.",
                "StudyDate and StudyTime are matched each on its own: a StudyTime range selects "
                "the time of day on every date the StudyDate key matches (no combined date-time "
                "matching).",
                "Every other key is returned with a zero length value, not matched; so are keys "
                "of levels below the query level, and sequence keys (the index holds no "
                "sequences).",
                f"A query with more than {st.max_matches} matches is refused with A700 before "
                "any match is sent (query.max_matches).",
                "Answers are sent as Pending (FF00); C-CANCEL ends them with Cancel (FE00).",
            )
        ),
        Table(
            ("Status", "Meaning"),
            (
                ("FF00", "Pending: a match"),
                ("0000", "Success: matching is complete"),
                ("A700", "Refused: out of resources (too many matches)"),
                ("A900", "Failed: identifier does not match SOP class (level, hierarchy)"),
                ("C000", "Failed: unable to process (a value that cannot be matched)"),
                ("FE00", "Cancelled"),
                ("0122", "Refused: SOP class not supported (a model the node does not serve)"),
            ),
        ),
    )
    destinations = ", ".join(f"{code(p.ae_title)} ({code(p.name)})" for p in st.peers)
    spec.add(
        "Query/Retrieve SCP: C-MOVE and C-GET",
        Table(
            ("Information model", "SOP Class UID", "Levels"),
            tuple(
                (Uid.of(uid).name, code(uid), ", ".join(level.value for level in levels))
                for uid, levels in st.retrieve_models.items()
            ),
        ),
        Bullets(
            (
                "The retrieval level's unique key must be given (one value or a list of UIDs); "
                "other keys are ignored (PS3.4 C.4.2.2.1).",
                "C-MOVE destinations are configured peers only, by AE title: "
                + (destinations or "none configured")
                + ". A peer's move_destinations may narrow them; an unknown Move Destination "
                "is A801 and no connection is attempted.",
                "C-GET sends on the requesting association, for the storage SOP classes in which "
                "the requestor took the SCP role.",
                "Each instance is sent in its stored transfer syntax when the destination "
                "accepted it, else losslessly converted to one it accepted; lossy conversion "
                "is never chosen.",
                "At most 65535 instances per retrieval (the counts are US); a Pending response "
                "with the sub-operation counts after each sub-operation; C-CANCEL stops them.",
            )
        ),
        Table(
            ("Status", "Meaning"),
            (
                ("FF00", "Pending: sub-operations continue (counts)"),
                ("0000", "Success: sub-operations complete, no failures"),
                ("B000", "Warning: sub-operations complete, one or more failures or warnings"),
                ("A702", "Refused: unable to perform sub-operations (all failed)"),
                ("A801", "Refused: move destination unknown"),
                ("0124", "Refused: not authorized (peers.NAME.move_destinations)"),
                ("A900", "Failed: identifier does not match SOP class"),
                ("C000", "Failed: unable to process"),
                ("FE00", "Cancelled: sub-operations terminated"),
            ),
        ),
    )
    wl_keys = Table(
        ("Key", "Tag", "Where", "Type (PS3.4 K.6-1)", "Matching"),
        tuple(
            (
                code(k.keyword),
                k.tag,
                f"{STEP_SEQUENCE} item" if k.in_step else "top level",
                "R" if k.required else "O",
                _worklist_matching(k.vr, names),
            )
            for k in st.worklist_keys
        ),
    )
    spec.add(
        "Modality Worklist SCP",
        f"Modality Worklist Information Model - FIND {code(MODALITY_WORKLIST_FIND)}: each item "
        "is one Scheduled Procedure Step. Keys:",
        wl_keys,
        Bullets(
            (
                "Any other key is matched on the stored item by its VR the same way, and "
                "returned; every key of the request is returned, empty when the item lacks it.",
                "A multi-valued stored attribute matches when one of its values does.",
                "A sequence key holds at most one item (else A900); a key inside it matches "
                "when some stored item matches every key of it.",
                "A query without a ScheduledStationAETitle value sees "
                + (
                    "every step"
                    if st.worklist_scope == "all"
                    else "only the steps scheduled for the caller's own AE title"
                )
                + f" (worklist.default_scope {code(st.worklist_scope)}; a peer's "
                "worklist_scope overrides it, see the callers table).",
                (
                    "Steps whose status is COMPLETED are left out unless the query asks for "
                    "ScheduledProcedureStepStatus by value (worklist.hide_completed)."
                    if st.hide_completed
                    else "COMPLETED steps are answered like any other (worklist.hide_completed: "
                    "false)."
                ),
                (
                    f"Items scheduled more than {st.expire_after_days} days ago are removed "
                    "(worklist.expire_after_days)."
                    if st.expire_after_days
                    else "Items are kept until removed by hand (worklist.expire_after_days 0)."
                ),
                f"More than {st.max_matches} matching items: A700, nothing answered.",
            )
        ),
        Table(
            ("Status", "Meaning"),
            (
                ("FF00", "Pending: a matching item"),
                ("0000", "Success"),
                ("A700", "Refused: out of resources (too many matches, index unavailable)"),
                ("A900", "Failed: identifier does not match SOP class"),
                ("C000", "Failed: unable to process"),
                ("FE00", "Cancelled"),
            ),
        ),
    )
    spec.add(
        "Modality Performed Procedure Step SCP",
        f"Modality Performed Procedure Step {code(MODALITY_PERFORMED_PROCEDURE_STEP)}: "
        "N-CREATE and N-SET (PS3.4 F.7.2); N-GET and N-EVENT-REPORT are not supported. A step "
        "is linked to the worklist items it performed by the Study Instance UID or Accession "
        "Number, and the Scheduled Procedure Step ID, of each Scheduled Step Attributes "
        "Sequence item.",
        Table(
            ("Operation", "Attributes", "Handling"),
            (
                (
                    "N-CREATE",
                    ", ".join(code(k) for k in st.mpps_create_type1),
                    "required with a value (else 0120 / 0121); the status must be IN PROGRESS "
                    "(else 0106); each Study Instance UID of the sequence must be a UID",
                ),
                (
                    "N-CREATE",
                    ", ".join(code(k) for k in st.mpps_create_type2),
                    "Type 2: their absence is logged, not refused",
                ),
                (
                    "N-SET",
                    ", ".join(code(k) for k in st.mpps_not_settable),
                    "may be sent again unchanged; changed: 0106",
                ),
                (
                    "N-SET to COMPLETED or DISCONTINUED",
                    ", ".join(code(k) for k in st.mpps_final_type1),
                    "required with a value; COMPLETED also needs PerformedSeriesSequence",
                ),
                (
                    "N-SET after COMPLETED or DISCONTINUED",
                    "any",
                    "0110 with Error ID A710 (may no longer be updated)",
                ),
            ),
        ),
        "Other attributes are stored as sent. Refusals carry an Error Comment (0000,0902).",
    )


def _configuration(st: Statement) -> Section:
    cfg = Section("Configuration")
    cfg.add(
        "AE Title / Presentation Address Mapping",
        Table(
            ("AE", "AE title", "Address", "DICOM TLS"),
            (
                (
                    "local",
                    code(st.ae_title),
                    f"{code(st.host)} port {st.port}" if not st.tls.only else "TLS only",
                    f"port {st.tls.port}" if st.tls.enabled else "off",
                ),
                *(
                    (code(p.name), code(p.ae_title), f"{code(p.host)} port {p.port}", _yes(p.tls))
                    for p in st.peers
                ),
            ),
        ),
    )
    cfg.add(
        "Parameters",
        Table(
            ("Parameter", "Value"),
            (
                ("configuration file", code(st.config_source)),
                ("conformance policy", code(st.conformance_source)),
                ("limits.max_pdu_size", str(st.max_pdu_size)),
                ("limits.max_associations", str(st.max_associations)),
                (
                    "limits.acse_timeout / dimse_timeout / network_timeout",
                    f"{st.acse_timeout:g} / {st.dimse_timeout:g} / {st.network_timeout:g} s",
                ),
                ("workers", st.workers),
                ("require_called_ae_title", _yes(st.require_called_ae_title)),
                ("unknown_peers", _names(st.unknown_peers)),
                ("store.duplicates", code(st.duplicates)),
                ("store.min_free_space", str(st.min_free_space)),
                ("store.max_size / at_limit", f"{st.max_size} / {code(st.at_limit)}"),
                ("query.case_sensitive_names", _yes(st.case_sensitive_names)),
                ("query.max_matches", str(st.max_matches)),
                ("worklist.default_scope", code(st.worklist_scope)),
                ("worklist.hide_completed", _yes(st.hide_completed)),
                ("worklist.expire_after_days", str(st.expire_after_days)),
            ),
        ),
    )
    return cfg


def _networking(st: Statement) -> Section:
    net = Section("Networking")
    net.children.append(_implementation_model(st))
    specs = net.add("AE Specifications")
    ae = specs.add(f"{code(st.ae_title)} AE Specification")
    ae.add(
        "SOP Classes",
        "The SOP classes of the Overview: as SCP those of the presentation context tables "
        "below, as SCU those of the association initiation policy.",
    )
    _association_policies(st, ae)
    _initiation(st, ae)
    _acceptance(st, ae)
    net.add(
        "Network Interfaces",
        "TCP/IP (PS3.8), on the configured listening address; the DICOM TLS listener, when "
        "enabled, runs the TLS handshake before the A-ASSOCIATE-RQ (PS3.15 B.9).",
    )
    net.children.append(_configuration(st))
    return net


def _character_set_section(st: Statement) -> Section:
    names = "case-sensitively" if st.case_sensitive_names else "case-insensitively"
    return Section(
        "Support of Character Sets",
        [
            "Data sets and identifiers received are decoded with their Specific Character Set "
            "(0008,0005); the defined terms decoded are:",
            ", ".join(code(term) for term in st.character_sets) + ".",
            Bullets(
                (
                    "A common misspelling (ISO-IR 100) is read as the term meant; an unknown "
                    "term is decoded as the default repertoire, and the log names the problem "
                    "without the values.",
                    "Stored instances are kept byte for byte, their Specific Character Set "
                    "unchanged; the index holds their text as Unicode.",
                    "C-FIND and Modality Worklist answers are UTF-8 with Specific Character Set "
                    "ISO_IR 192 when a value is not ASCII or the request's Specific Character "
                    "Set includes ISO_IR 192; otherwise they carry none (default repertoire).",
                    f"Person names are matched {names}, Unicode casefolded, in each component "
                    "group (alphabetic, ideographic, phonetic).",
                    "Worklist items and MPPS steps are held in UTF-8 (ISO_IR 192).",
                    "Our SCU commands send ISO_IR 192 when a query key is not ASCII.",
                )
            ),
        ],
    )


def _security(st: Statement) -> Section:
    sec = Section("Security")
    tls = st.tls
    if tls.enabled:
        sec.add(
            "DICOM TLS",
            Table(
                ("Item", "Value"),
                (
                    ("Profile", "BCP 195 TLS Secure Transport Connection Profile (PS3.15 B.9)"),
                    ("TLS port", str(tls.port)),
                    ("Plain (unencrypted) listener", "none (tls.only)" if tls.only else "yes"),
                    ("Lowest TLS version", f"TLS {tls.min_version}"),
                    ("TLS 1.2 cipher suites", ", ".join(code(c) for c in tls.ciphers)),
                    ("TLS 1.3 cipher suites", "OpenSSL's (all AEAD with forward secrecy)"),
                    (
                        "Client certificates",
                        code(tls.client_certificates)
                        + {
                            "required": ": required, signed by tls.ca_certificates",
                            "optional": ": verified when presented",
                            "none": ": not asked for",
                        }.get(tls.client_certificates, ""),
                    ),
                    ("Our certificate", code(tls.certificate)),
                    (
                        "CA certificates",
                        code(tls.ca_certificates) if tls.ca_certificates else "none",
                    ),
                ),
            ),
            "As SCU, peers with tls: true are called over TLS: their certificate chain must "
            "verify against tls.ca_certificates (host names are not checked), and ours is "
            "presented when configured.",
        )
    else:
        sec.add(
            "DICOM TLS",
            "Not enabled (tls.enabled: false): associations are accepted over plain TCP only.",
        )
    sec.add(
        "Access Control",
        Bullets(
            (
                "An AE title is no credential: a configured peer counts as that peer only from "
                "its hosts (addresses, networks or host names resolved at start and reload); "
                "from elsewhere its AE title is rejected.",
                f"Callers that are not configured peers may use: {_names(st.unknown_peers)} "
                "(unknown_peers).",
                f"Called AE Title checked: {_yes(st.require_called_ae_title)} "
                "(require_called_ae_title).",
                "C-MOVE sends only to configured peers, narrowed per caller by move_destinations.",
                f"At most {st.max_associations} associations at once (limits.max_associations).",
            )
        ),
    )
    sec.add(
        "Audit Trail",
        (
            f"Enabled: security-relevant events are appended as JSON lines to "
            f"{code(st.audit_path)} (mode 0640), in the spirit of PS3.15 A.5 and IHE ATNA. "
            "Events:"
            if st.audit_enabled
            else "Disabled (audit.enabled: false): no audit trail is written. When enabled, "
            "the events would be:"
        ),
        Bullets(st.audit_events),
    )
    return sec


def document(st: Statement) -> Document:
    """The statement laid out as PS3.2 Annex A orders it."""
    sections = [
        _overview(st),
        _introduction(st),
        _networking(st),
        Section(
            "Media Interchange",
            ["Not supported: the node offers no Media Storage Application Profile."],
        ),
        _character_set_section(st),
        _security(st),
        Section(
            "Annexes",
            [
                "IOD contents: instances are stored and returned as received; the node creates "
                "no composite instances and no private attributes. Private transfer syntaxes "
                "and SOP classes: none."
            ],
        ),
    ]
    contents = Section("Table of Contents", numbered=False)
    contents.blocks.append(Bullets(tuple(_contents(sections))))
    sections.insert(1, contents)
    return Document(
        f"DICOM Conformance Statement: {st.product} {st.version}, AE {st.ae_title}",
        tuple(sections),
    )


def _numbered(sections: Iterable[Section], prefix: str = "") -> Iterable[tuple[str, Section, int]]:
    """(number, section, depth) in document order; unnumbered sections get ""."""
    n = 0
    for section in sections:
        number = ""
        if section.numbered:
            n += 1
            number = f"{prefix}{n}"
        yield number, section, prefix.count(".") + 1
        yield from _numbered(section.children, f"{number}." if number else prefix)


def _contents(sections: list[Section]) -> Iterable[str]:
    for number, section, depth in _numbered(sections):
        if number and depth <= 3:
            heading = f"{number} {section.title}"
            yield f"[{heading.replace('`', '')}](#{_slug(heading)})"


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it (lower case, punctuation dropped, spaces to
    hyphens), so the contents' links work in rendered Markdown and in our HTML alike."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


# --- Markdown ------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block) -> str:
    if isinstance(block, Table):
        lines = [
            "| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
            "|" + "---|" * len(block.headers),
        ]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    return block


def render_markdown(statement: Statement) -> str:
    """The statement as Markdown (CommonMark with pipe tables)."""
    doc = document(statement)
    parts = [f"# {doc.title}"]
    for number, section, depth in _numbered(doc.sections):
        level = min(depth + 1, 6)
        parts.append(f"{'#' * level} {number + ' ' if number else ''}{section.title}")
        parts += [_md_block(block) for block in section.blocks if block != Bullets(())]
    return "\n\n".join(parts) + "\n"


# --- HTML ----------------------------------------------------------------------------------

_CODE = re.compile(r"`` (.+?) ``|`([^`]+)`|\[([^\]`]+)\]\(#([a-z0-9_-]+)\)")

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.45; color: #1b1b1b; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.92rem; }
th, td { border: 1px solid #c8c8c8; padding: 0.25rem 0.5rem; text-align: left;
         vertical-align: top; }
th { background: #eef1f4; }
code { font-family: ui-monospace, monospace; font-size: 0.9em; background: #f4f4f4;
       padding: 0 0.2em; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; margin-top: 2rem; }
"""


def _inline(text: str) -> str:
    """Escaped text with its code spans as <code> and its links to headings as <a>."""
    out, end = [], 0
    for match in _CODE.finditer(text):
        out.append(html.escape(text[end : match.start()]))
        if match.group(3) is not None:  # a link to a heading of this page
            out.append(f'<a href="#{match.group(4)}">{html.escape(match.group(3))}</a>')
        else:
            inner = match.group(1) if match.group(1) is not None else match.group(2)
            out.append(f"<code>{html.escape(inner)}</code>")
        end = match.end()
    out.append(html.escape(text[end:]))
    return "".join(out)


def _html_block(block: Block) -> str:
    if isinstance(block, Table):
        head = "".join(f"<th>{_inline(h)}</th>" for h in block.headers)
        body = "\n".join(
            "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows
        )
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
    if isinstance(block, Bullets):
        if not block.items:
            return ""
        return "<ul>\n" + "\n".join(f"<li>{_inline(i)}</li>" for i in block.items) + "\n</ul>"
    return f"<p>{_inline(block)}</p>"


def render_html(statement: Statement) -> str:
    """The statement as one self-contained HTML page (inline style, no scripts)."""
    doc = document(statement)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(doc.title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for number, section, depth in _numbered(doc.sections):
        level = min(depth + 1, 6)
        title = (number + " " if number else "") + section.title
        parts.append(f'<h{level} id="{_slug(title)}">{_inline(title)}</h{level}>')
        parts += [_html_block(block) for block in section.blocks]
    parts += ["</body>", "</html>"]
    return "\n".join(p for p in parts if p) + "\n"
