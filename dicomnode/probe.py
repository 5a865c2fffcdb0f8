"""``dicomnode probe``: discover, over real associations, what a live peer accepts.

Nothing here reads a conformance statement: every answer comes from A-ASSOCIATE-AC items the
peer sent us (PS3.8 9.3.3). The probe proposes presentation contexts and reads the result of
each one (PS3.8 9.3.3.2: 0 acceptance, 1 user rejection, 2 no reason, 3 abstract syntax not
supported, 4 transfer syntaxes not supported); it sends one C-ECHO (which carries no data set,
PS3.7 9.3.5) and no other DIMSE message, so no data set ever leaves this node.

The stages, each a few associations opened one after the other and released at once:

1. **Screen**: one context per SOP class offering every candidate transfer syntax. Classes
   rejected with reason 3 (or 4: none of our syntaxes) need no more contexts. The first
   association also carries Verification, on which the C-ECHO is sent.
2. **Sweep**: for every class left, one context per (class, transfer syntax) pair: an acceptor
   picks one syntax per context (PS3.8 9.3.2.2), so a context of one syntax tells exactly
   whether that pair is accepted. Associations hold at most 128 contexts (PS3.8 9.3.2.2:
   context IDs are the odd numbers 1-255; ``ProbeOptions.batch`` for devices taking fewer).
3. **Preference**: the accepted set offered forwards and reversed; an acceptor choosing by its
   own preference picks the same syntax both times, one following the proposer's order does
   not (then the order is unknown and the list is written in our order). With a preference of
   its own, the chosen syntax is removed and the rest offered again, until the order is known
   (or ``preference_depth`` syntaxes are placed; the rest follow in our order). Each class
   asks one question at a time and each association carries questions of many classes.
4. **Roles**: when a C-GET model is accepted, every accepted storage class is proposed again
   with an SCP/SCU Role Selection item asking for both roles (PS3.7 D.3.3.4), beside the C-GET
   model; the peer's reply items say which roles it agrees we take (C-GET needs us as SCP of
   storage, PS3.4 C.4.3).

The acceptor's Maximum Length (PS3.8 D.1) and Implementation Class UID / Version Name (PS3.7
D.3.3.2) are read from the first A-ASSOCIATE-AC. :func:`peer_conformance` turns the result into
the peer conformance form that ``dicomnode conformance check`` reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

from pynetdicom.association import Association
from pynetdicom.presentation import build_context, build_role

from dicomnode import scu
from dicomnode.config import Config, Peer
from dicomnode.policy import (
    SOP_CLASS_GROUPS,
    TRANSFER_SYNTAX_GROUPS,
    AcceptedClass,
    uid_name,
)
from dicomnode.preflight import Device, PeerConformance
from dicomnode.status import describe

log = logging.getLogger(__name__)

# What the services are probed with: their messages carry small identifiers (or nothing), so
# the uncompressed and deflated syntaxes are every syntax they can sensibly use.
SERVICE_CLASSES: tuple[str, ...] = tuple(
    dict.fromkeys(
        SOP_CLASS_GROUPS["verification"]
        + SOP_CLASS_GROUPS["query_retrieve"]
        + SOP_CLASS_GROUPS["worklist"]
        + SOP_CLASS_GROUPS["mpps"]
    )
)
SERVICE_SYNTAXES: tuple[str, ...] = (
    TRANSFER_SYNTAX_GROUPS["uncompressed"] + TRANSFER_SYNTAX_GROUPS["deflated"]
)
_VERIFICATION = str(scu.VERIFICATION_SOP_CLASS)
_GET_MODELS = tuple(
    uid for uid in SOP_CLASS_GROUPS["query_retrieve"] if uid_name(uid).endswith("Get")
)


class ContextResult(IntEnum):
    """PS3.8 9.3.3.2: the Result/Reason of a Presentation Context item in an A-ASSOCIATE-AC."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2  # provider rejection
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

    def describe(self) -> str:
        return self.name.lower().replace("_", " ")


class Order(StrEnum):
    """What the probe learnt about a class's order of transfer syntax preference."""

    SINGLE = "single"  # one syntax accepted: nothing to order
    ACCEPTOR = "acceptor"  # its own preference, found completely
    PARTIAL = "partial"  # its own preference, the first preference_depth syntaxes found
    PROPOSER = "proposer"  # it picks by the proposer's order: written in our order
    UNSURE = "unsure"  # its choices were not consistent: written in our order
    UNPROBED = "unprobed"  # preference_depth 0: written in our order


@dataclass(frozen=True)
class ProbeOptions:
    """What to probe: the SOP classes beside the services, and the candidate syntaxes."""

    sop_classes: tuple[str, ...] = SOP_CLASS_GROUPS["storage"]
    transfer_syntaxes: tuple[str, ...] = TRANSFER_SYNTAX_GROUPS["all"]
    services: bool = True  # Verification, Q/R, worklist, MPPS (SERVICE_CLASSES)
    screen: bool = True  # stage 1; off: every pair of every class is proposed
    # How many syntaxes of each class to place in its order of preference (None: all).
    preference_depth: int | None = None
    roles: bool = True
    # Presentation contexts per association: at most 128 (PS3.8 9.3.2.2), at least 2 (the
    # first preference question and the role question take two); some devices take fewer.
    batch: int = scu.MAX_CONTEXTS_PER_ASSOCIATION

    def __post_init__(self) -> None:
        if not 2 <= self.batch <= scu.MAX_CONTEXTS_PER_ASSOCIATION:
            raise ValueError(f"batch must be 2-{scu.MAX_CONTEXTS_PER_ASSOCIATION}: {self.batch}")


@dataclass
class ClassResult:
    """What the peer answered for one SOP class."""

    sop_class: str
    candidates: tuple[str, ...]
    # Accepted transfer syntaxes, in its order of preference as far as ``order`` says.
    accepted: tuple[str, ...] = ()
    order: Order = Order.SINGLE
    # The screening context's result when the class was not accepted (PS3.8 9.3.3.2).
    screen_result: int | None = None
    # Its SCP/SCU Role Selection reply (PS3.7 D.3.3.4) when roles were proposed: whether it
    # agrees that we act as SCU / SCP; None: no reply item (default roles) or not proposed.
    scu_role: bool | None = None
    scp_role: bool | None = None
    roles_proposed: bool = False


@dataclass
class ProbeResult:
    """Everything a probe found, and what it cost."""

    peer: Peer
    at: datetime
    options: ProbeOptions
    classes: dict[str, ClassResult] = field(default_factory=dict)
    max_pdu_size: int | None = None
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    echo_status: int | None = None
    echo_error: str | None = None
    associations: int = 0
    contexts: int = 0
    elapsed: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Set when an association could not be used: the probe stopped there.
    failure: scu.AssociationFailure | None = None

    def accepted(self) -> dict[str, ClassResult]:
        return {uid: r for uid, r in self.classes.items() if r.accepted}


class ProbeFailed(Exception):
    """An association was rejected, aborted or never established; the probe cannot go on."""

    def __init__(self, failure: scu.AssociationFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass(frozen=True)
class _Offer:
    """One presentation context to propose, and what it is for."""

    sop_class: str
    transfer_syntaxes: tuple[str, ...]
    tag: str = ""


@dataclass(frozen=True)
class _Answer:
    offer: _Offer
    result: int
    transfer_syntax: str | None


class _Prober:
    """Opens the associations of one probe, one after the other, and reads their answers."""

    def __init__(self, config: Config, peer: Peer, result: ProbeResult) -> None:
        self.config = config
        self.peer = peer
        self.result = result
        self.ae = scu.make_ae(config)
        self.identified = False

    def associate(
        self,
        offers: Sequence[_Offer],
        *,
        ext_neg: Sequence[Any] = (),
        during: Callable[[Association, list[_Answer]], None] | None = None,
    ) -> tuple[list[_Answer], dict[str, tuple[bool | None, bool | None]]]:
        """One association proposing ``offers`` (at most 128): each offer's answer, and the
        SCP/SCU role replies by SOP class. ``during`` runs while it is established."""
        contexts = [build_context(o.sop_class, list(o.transfer_syntaxes)) for o in offers]
        assoc, failure = scu.request_association(
            self.ae, self.config, self.peer, contexts, ext_neg=ext_neg
        )
        self.result.associations += 1
        self.result.contexts += len(offers)
        # An A-ASSOCIATE-AC accepting none of the contexts still answers every one of them
        # (pynetdicom then aborts): that is an answer, not a failure.
        if failure is not None and failure.kind is not scu.FailureKind.NO_CONTEXT:
            raise ProbeFailed(failure)
        try:
            self._identity(assoc)
            answers = self._answers(assoc, offers)
            replies = {
                str(uid): (item.scu_role, item.scp_role)
                for uid, item in assoc.acceptor.role_selection.items()
            }
            if during is not None and assoc.is_established:
                during(assoc, answers)
        except BaseException:
            assoc.abort()
            raise
        scu.finish(assoc)
        return answers, replies

    def sweep(
        self,
        offers: Sequence[_Offer],
        during: Callable[[Association, list[_Answer]], None] | None = None,
    ) -> list[_Answer]:
        """``offers`` in as many associations of at most 128 contexts as they need."""
        answers: list[_Answer] = []
        size = self.result.options.batch
        for start in range(0, len(offers), size):
            batch, _ = self.associate(offers[start : start + size], during=during)
            answers += batch
        return answers

    def _identity(self, assoc: Association) -> None:
        if self.identified:
            return
        self.identified = True
        acceptor = assoc.acceptor
        self.result.max_pdu_size = acceptor.maximum_length
        self.result.implementation_class_uid = str(acceptor.implementation_class_uid or "")
        self.result.implementation_version_name = str(acceptor.implementation_version_name or "")

    @staticmethod
    def _answers(assoc: Association, offers: Sequence[_Offer]) -> list[_Answer]:
        # pynetdicom numbers the proposed contexts 1, 3, 5 ... in the order given (PS3.8
        # 9.3.2.2); a context missing from the A-ASSOCIATE-AC counts as rejected, no reason.
        by_id = {cx.context_id: cx for cx in assoc.accepted_contexts + assoc.rejected_contexts}
        answers = []
        for i, offer in enumerate(offers):
            cx = by_id.get(2 * i + 1)
            if cx is None or str(cx.abstract_syntax) != offer.sop_class:
                answers.append(_Answer(offer, ContextResult.NO_REASON, None))
                continue
            result = int(cx.result if cx.result is not None else ContextResult.NO_REASON)
            syntax = str(cx.transfer_syntax[0]) if result == ContextResult.ACCEPTANCE else None
            answers.append(_Answer(offer, result, syntax))
        return answers


def probe(
    config: Config,
    peer: Peer,
    options: ProbeOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Probe ``peer`` (see the module docstring); never raises for what the peer does: a
    failed association ends the probe with :attr:`ProbeResult.failure` set."""
    options = options or ProbeOptions()
    result = ProbeResult(peer=peer, at=datetime.now(UTC), options=options)
    started = time.monotonic()
    prober = _Prober(config, peer, result)
    services = SERVICE_CLASSES if options.services else ()
    for uid in services:
        result.classes[uid] = ClassResult(uid, SERVICE_SYNTAXES)
    for uid in options.sop_classes:
        if uid not in result.classes:
            result.classes[uid] = ClassResult(uid, options.transfer_syntaxes)
    stages: list[tuple[str, Callable[[], None]]] = [
        ("screen", lambda: _screen(prober, result, options)),
        ("sweep", lambda: _sweep(prober, result, options)),
        ("preference", lambda: _preference(prober, result, options)),
        ("roles", lambda: _roles(prober, result, options)),
    ]
    try:
        for name, stage in stages:
            begun = time.monotonic()
            count = result.associations
            stage()
            result.stage_seconds[name] = time.monotonic() - begun
            opened = result.associations - count
            message = (
                f"{name}: {opened} association{'' if opened == 1 else 's'} in "
                f"{result.stage_seconds[name]:.2f} s"
            )
            log.debug("probe %s %s", peer.address, message)
            if progress is not None:
                progress(message)
    except ProbeFailed as exc:
        result.failure = exc.failure
    result.elapsed = time.monotonic() - started
    return result


def _echo(prober: _Prober) -> Callable[[Association, list[_Answer]], None]:
    """A ``during`` hook sending the one C-ECHO on the first accepted Verification context."""

    result = prober.result

    def during(assoc: Association, answers: list[_Answer]) -> None:
        if result.echo_status is not None or result.echo_error is not None:
            return
        if not any(a.offer.sop_class == _VERIFICATION and a.transfer_syntax for a in answers):
            return
        response = assoc.send_c_echo()
        if "Status" in response:
            result.echo_status = int(response.Status)
        else:
            result.echo_error = (
                "no C-ECHO response: the association was aborted or no answer came within "
                f"{prober.config.limits.dimse_timeout:g} s"
            )

    return during


def _screen(prober: _Prober, result: ProbeResult, options: ProbeOptions) -> None:
    """Stage 1: one context per class with every candidate syntax (Verification first)."""
    if not options.screen:
        return
    offers = [_Offer(r.sop_class, r.candidates) for r in result.classes.values()]
    for answer in prober.sweep(offers, during=_echo(prober)):
        entry = result.classes[answer.offer.sop_class]
        entry.screen_result = answer.result
        if answer.transfer_syntax is not None:
            entry.accepted = (answer.transfer_syntax,)


def _needs_sweep(entry: ClassResult, options: ProbeOptions) -> bool:
    if not options.screen:
        return True
    if entry.screen_result in (
        ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
        ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
    ):
        return False  # it said why: nothing of this class (in our syntaxes) is accepted
    # Accepted with the only candidate: the sweep would ask the same question again.
    return not (entry.screen_result == ContextResult.ACCEPTANCE and len(entry.candidates) == 1)


def _sweep(prober: _Prober, result: ProbeResult, options: ProbeOptions) -> None:
    """Stage 2: one context per (class, syntax) pair; the accepted ones in candidate order."""
    todo = [e for e in result.classes.values() if _needs_sweep(e, options)]
    # The syntax a class was accepted in when screened is known to be accepted alone too.
    offers = [
        _Offer(e.sop_class, (ts,)) for e in todo for ts in e.candidates if ts not in e.accepted
    ]
    accepted = {e.sop_class: set(e.accepted) for e in todo}
    for answer in prober.sweep(offers, during=_echo(prober)):
        if answer.transfer_syntax is not None:
            accepted[answer.offer.sop_class].add(answer.transfer_syntax)
    for entry in todo:
        entry.accepted = tuple(ts for ts in entry.candidates if ts in accepted[entry.sop_class])


def _preference(prober: _Prober, result: ProbeResult, options: ProbeOptions) -> None:
    """Stage 3: the order of preference among the accepted syntaxes of every class.

    Each class asks one question at a time (its first: the accepted set forwards and reversed;
    then the syntaxes not yet placed). Questions wait in a queue and each association carries
    up to 128 of them from different classes, so a class whose answer came back asks its next
    question in the next association, beside classes still on their first: the number of
    associations is about the number of contexts / 128, not rounds x batches.
    """
    search = {
        e.sop_class: _Search(e.sop_class, list(e.accepted))
        for e in result.classes.values()
        if len(e.accepted) >= 2
    }
    if not search:
        return
    if options.preference_depth == 0:  # not asked for: in our order
        for uid in search:
            result.classes[uid].order = Order.UNPROBED
        return
    queue: dict[str, list[_Offer]] = {uid: job.first_question() for uid, job in search.items()}
    size = options.batch
    while queue:
        batch: list[_Offer] = []
        for uid in list(queue):
            if len(batch) + len(queue[uid]) > size:
                break
            batch += queue.pop(uid)
        answers, _ = prober.associate(batch)
        by_class: dict[str, list[_Answer]] = {}
        for answer in answers:
            by_class.setdefault(answer.offer.sop_class, []).append(answer)
        for uid, replies in by_class.items():
            question = search[uid].answered(replies, options.preference_depth)
            if question:
                queue[uid] = question  # to the back of the queue
    for uid, job in search.items():
        entry = result.classes[uid]
        entry.order = job.order
        # Placed syntaxes first; the rest (all of them for PROPOSER) in our order.
        entry.accepted = tuple(job.placed + [ts for ts in entry.accepted if ts not in job.placed])


@dataclass
class _Search:
    """The search for one class's order of preference."""

    sop_class: str
    open: list[str]  # its accepted syntaxes not yet placed, in our order
    placed: list[str] = field(default_factory=list)
    order: Order = Order.ACCEPTOR

    def first_question(self) -> list[_Offer]:
        # The same choice both ways round: it picks by a preference of its own (PS3.8 9.3.3.2
        # leaves the choice to the acceptor; some follow the proposer's order).
        return [
            _Offer(self.sop_class, tuple(self.open), "forward"),
            _Offer(self.sop_class, tuple(reversed(self.open)), "reversed"),
        ]

    def answered(self, replies: list[_Answer], depth: int | None) -> list[_Offer]:
        """Take the answers to the last question; the next question, or none when done."""
        picks = {a.offer.tag: a.transfer_syntax for a in replies}
        chosen = picks.get("forward", picks.get(""))
        if any(ts is None or ts not in self.open for ts in picks.values()) or chosen is None:
            # It accepted each of these alone a moment ago: its answers are not stable.
            self.order = Order.UNSURE
            return []
        if "reversed" in picks and picks["reversed"] != chosen:
            self.order = Order.PROPOSER
            return []
        self.placed.append(chosen)
        self.open.remove(chosen)
        if len(self.open) <= 1:
            self.placed += self.open
            self.open = []
            return []
        if depth is not None and len(self.placed) >= depth:
            self.order = Order.PARTIAL
            return []
        return [_Offer(self.sop_class, tuple(self.open))]


def _roles(prober: _Prober, result: ProbeResult, options: ProbeOptions) -> None:
    """Stage 4: SCP/SCU role selection for the accepted storage classes, beside a C-GET model."""
    if not options.roles:
        return
    get_model = next((uid for uid in _GET_MODELS if result.classes.get(uid, _NONE).accepted), None)
    if get_model is None:
        return
    model = _Offer(get_model, result.classes[get_model].accepted)
    storage = [e for uid, e in result.classes.items() if e.accepted and uid not in SERVICE_CLASSES]
    size = options.batch - 1  # beside the C-GET model
    for start in range(0, len(storage), size):
        batch = storage[start : start + size]
        offers = [model] + [_Offer(e.sop_class, e.accepted) for e in batch]
        # PS3.7 D.3.3.4: one item per SOP class; asking for both roles, its reply says which
        # it agrees to.
        roles = [build_role(e.sop_class, scu_role=True, scp_role=True) for e in batch]
        _, replies = prober.associate(offers, ext_neg=roles)
        for entry in batch:
            entry.roles_proposed = True
            entry.scu_role, entry.scp_role = replies.get(entry.sop_class, (None, None))


_NONE = ClassResult("", ())


# --- the result as a peer conformance ------------------------------------------------------


def peer_conformance(result: ProbeResult) -> PeerConformance:
    """What the probe found, in the peer conformance form ``conformance check`` reads."""
    peer = result.peer
    device = Device(
        name=peer.name,
        ae_title=peer.ae_title,
        max_pdu_size=result.max_pdu_size,
        implementation_class_uid=result.implementation_class_uid,
        implementation_version_name=result.implementation_version_name[:16],
        probed={
            "host": peer.host,
            "port": str(peer.port),
            "at": result.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )
    accept = {
        uid: AcceptedClass(uid, entry.accepted, entry.scu_role, entry.scp_role)
        for uid, entry in result.accepted().items()
    }
    return PeerConformance(device=device, accept=accept)


def notes(result: ProbeResult) -> list[str]:
    """What the YAML cannot say, for its header comment and the summary."""
    lines = []
    by_order: dict[Order, list[str]] = {}
    for entry in result.accepted().values():
        by_order.setdefault(entry.order, []).append(uid_name(entry.sop_class))
    if Order.PROPOSER in by_order:
        lines.append(
            "picks the transfer syntax by the proposer's order (not its own) for: "
            + _names(by_order[Order.PROPOSER])
            + "; those lists are in our order"
        )
    if Order.PARTIAL in by_order:
        depth = result.options.preference_depth
        lines.append(
            f"order of preference probed for the first {depth} syntaxes only for: "
            + _names(by_order[Order.PARTIAL])
        )
    if Order.UNPROBED in by_order:
        lines.append(
            "order of preference not probed: transfer syntaxes are listed in our order for: "
            + _names(by_order[Order.UNPROBED])
        )
    if Order.UNSURE in by_order:
        lines.append(
            "answered inconsistently when offered several syntaxes for: "
            + _names(by_order[Order.UNSURE])
            + "; those lists are in our order"
        )
    storage = [e for uid, e in result.accepted().items() if uid not in SERVICE_CLASSES]
    options = result.options
    if (
        options.roles
        and options.services
        and storage
        and not any(e.roles_proposed for e in storage)
    ):
        lines.append("no C-GET model accepted: SCP/SCU role selection was not probed")
    unanswered = [e for e in storage if e.roles_proposed and e.scp_role is None]
    if unanswered:
        lines.append(
            "sent no SCP/SCU role selection reply (default roles: we may only be SCU) for: "
            + _names([uid_name(e.sop_class) for e in unanswered])
        )
    return lines


def _names(names: Iterable[str], limit: int = 8) -> str:
    items = list(names)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def summary(result: ProbeResult) -> list[str]:
    """A short account for a person (stderr)."""
    peer = result.peer
    who = peer.address if peer.name == peer.address else f"{peer.name} ({peer.address})"
    lines = [
        f"probed {who} in {result.elapsed:.2f} s: "
        f"{result.associations} associations, {result.contexts} presentation contexts"
    ]
    if result.implementation_class_uid or result.max_pdu_size is not None:
        pdu = "unlimited" if result.max_pdu_size == 0 else f"{result.max_pdu_size}"
        lines.append(
            f"  implementation {result.implementation_class_uid or '?'} "
            f"{result.implementation_version_name or '(no version name)'}, max PDU {pdu}"
        )
    accepted = result.accepted()
    verification = accepted.get(_VERIFICATION)
    if verification is None:
        lines.append("  verification: not accepted")
    elif result.echo_status is not None:
        lines.append(f"  verification: C-ECHO answered {describe(result.echo_status)}")
    else:
        lines.append(f"  verification: accepted, but {result.echo_error or 'no C-ECHO sent'}")
    services = [
        uid_name(uid) for uid in SERVICE_CLASSES if uid in accepted and uid != _VERIFICATION
    ]
    lines.append(f"  Q/R, worklist, MPPS: {_names(services, 20) if services else 'none'}")
    probed = [uid for uid in result.classes if uid not in SERVICE_CLASSES]
    storage = [uid for uid in probed if uid in accepted]
    if probed:
        lines.append(
            f"  storage: {len(storage)} of {len(probed)} SOP classes accepted"
            + (f": {_names(uid_name(uid) for uid in storage)}" if storage else "")
        )
        syntaxes = {ts for uid in storage for ts in accepted[uid].accepted}
        if syntaxes:
            lines.append(
                f"  {len(syntaxes)} transfer syntaxes accepted for storage: "
                + _names(
                    (uid_name(ts) for ts in result.options.transfer_syntaxes if ts in syntaxes), 12
                )
            )
        # Why the others were not: the screening answer (PS3.8 9.3.3.2), else no pair accepted.
        why: dict[str, list[str]] = {}
        for uid in probed:
            if uid not in accepted:
                code = result.classes[uid].screen_result
                reason = (
                    ContextResult(code).describe()
                    if code in set(ContextResult) and code != ContextResult.ACCEPTANCE
                    else "no (class, transfer syntax) pair accepted"
                )
                why.setdefault(reason, []).append(uid_name(uid))
        for reason, names in why.items():
            lines.append(f"  not accepted, {reason}: {_names(names, 6)}")
    scp = [uid_name(uid) for uid in storage if accepted[uid].scp_role]
    if any(accepted[uid].roles_proposed for uid in storage):
        lines.append(f"  C-GET: agrees that we act as storage SCP for {len(scp)} of {len(storage)}")
    lines += [f"  note: {line}" for line in notes(result)]
    if result.failure is not None:
        lines.append(f"  stopped: {result.failure.message}")
    return lines
