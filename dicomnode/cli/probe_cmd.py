"""``dicomnode probe PEER``: discover what a live peer accepts, as a peer conformance YAML."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from dicomnode import scu
from dicomnode.cli import CliState, pass_state, with_config
from dicomnode.cli.scu_cmds import _peer, _setup, tls_option
from dicomnode.config import Config, read_yaml
from dicomnode.index import Index, IndexError_
from dicomnode.index.models import Instance
from dicomnode.policy import (
    SOP_CLASS_GROUPS,
    TRANSFER_SYNTAX_GROUPS,
    ConformanceError,
    load_policy,
    parse_policy,
    resolve_names,
)
from dicomnode.status import ExitCode, category, exit_code

if TYPE_CHECKING:
    from dicomnode import probe


def _names(kind: str, groups: Any) -> Any:
    """A click callback resolving repeated NAME values (keywords, UIDs, groups) to UIDs."""

    def resolve(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
        del ctx
        if not values:
            return None
        try:
            return resolve_names(list(values), groups, kind, param.opts[0])
        except ConformanceError as exc:
            raise click.BadParameter(str(exc), param=param) from None

    return resolve


def _classes_from(path: Path) -> tuple[str, ...]:
    """The SOP classes a conformance YAML names: our policy form (accept, roles, peers) or a
    peer conformance (device, accept, roles, propose)."""
    data = read_yaml(path, "conformance file", ConformanceError)
    if isinstance(data, dict) and set(data) <= {"accept", "roles", "peers"}:
        policy = parse_policy(data, str(path))
        uids = dict.fromkeys(policy.accept)
        for override in policy.peers.values():
            uids.update(dict.fromkeys(override.accept or {}))
        return tuple(uids)
    from dicomnode.preflight import parse_peer_conformance

    peer = parse_peer_conformance(data, str(path))
    return tuple(dict.fromkeys([*peer.accept, *(p.sop_class for p in peer.propose)]))


def _held_classes(config: Config) -> tuple[str, ...]:
    """The distinct SOP classes of the instances in our index (read, never created)."""
    if not config.database.exists():
        click.echo(f"dicomnode probe: --held: no index at {config.database}", err=True)
        sys.exit(ExitCode.USAGE)
    index = Index(config.database, config.database_busy_timeout)
    try:
        index.open()
        with index.reading():
            query = Instance.select(Instance.sop_class_uid).distinct().tuples()
            rows = cast(Iterable[tuple[Any, ...]], query)
            uids = tuple(sorted(str(row[0]) for row in rows))
    except IndexError_ as exc:
        click.echo(f"dicomnode probe: --held: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    finally:
        index.close()
    if not uids:
        click.echo(f"dicomnode probe: --held: the index {config.database} holds nothing", err=True)
        sys.exit(ExitCode.USAGE)
    return uids


@click.command("probe")
@with_config
@click.argument("peer")
@tls_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    default="-",
    show_default=True,
    help="Write the peer conformance YAML here (- for stdout).",
)
@click.option(
    "--sop-class",
    "sop_classes",
    multiple=True,
    metavar="NAME",
    callback=_names("SOP class", SOP_CLASS_GROUPS),
    help="A SOP class to probe (keyword, UID or group such as storage), instead of the storage "
    "classes our conformance policy accepts. Repeatable.",
)
@click.option(
    "--sop-classes-from",
    "classes_from",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    metavar="YAML",
    help="Probe the SOP classes a conformance YAML names (our policy form, or a peer "
    "conformance such as config/peers/*.yaml: its accept and propose lists). Repeatable.",
)
@click.option(
    "--held",
    is_flag=True,
    help="Probe the SOP classes of the instances our index holds (what C-MOVE and C-GET would "
    "send to PEER).",
)
@click.option(
    "--transfer-syntax",
    "transfer_syntaxes",
    multiple=True,
    metavar="NAME",
    callback=_names("transfer syntax", TRANSFER_SYNTAX_GROUPS),
    help="A candidate transfer syntax for the storage classes (keyword, UID or group such as "
    "uncompressed, compressed); default: every one (all). Repeatable.",
)
@click.option(
    "--exhaustive",
    is_flag=True,
    help="Propose every (class, transfer syntax) pair, without first screening out the classes "
    "the peer does not support.",
)
@click.option(
    "--preference-depth",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Find the peer's order of preference for the first N transfer syntaxes of each class "
    "only (0: not at all; default: all of them).",
)
@click.option("--no-roles", is_flag=True, help="Do not probe SCP/SCU role selection for C-GET.")
@click.option(
    "--batch",
    type=click.IntRange(2, 128),
    default=128,
    show_default=True,
    metavar="N",
    help="At most N presentation contexts per association (128 is the limit of PS3.8 9.3.2.2; "
    "some devices accept fewer).",
)
@pass_state
def probe_cmd(
    state: CliState,
    peer: str,
    output: Path,
    sop_classes: tuple[str, ...] | None,
    classes_from: tuple[Path, ...],
    held: bool,
    transfer_syntaxes: tuple[str, ...] | None,
    exhaustive: bool,
    preference_depth: int | None,
    no_roles: bool,
    batch: int,
) -> None:
    """Discover what PEER accepts, over real associations, and write it as a peer conformance
    YAML (the form `dicomnode conformance check` reads).

    Probes Verification (one C-ECHO), the Query/Retrieve, Modality Worklist and MPPS models,
    every storage SOP class our conformance policy accepts (or those given, or those of the
    instances we hold) with every
    candidate transfer syntax, one presentation context per pair, in associations of at most
    128 contexts; then the peer's order of preference and, when it accepts a C-GET model, the
    SCP/SCU role selection it agrees to for storage. Also records its maximum PDU size and
    implementation class UID and version name. No data set is ever sent.

    PEER is a peer name from the configuration or AET@host:port. Exits 0 when the probe
    completed (1 or 2 when the C-ECHO answered a warning or failure), 4 on a usage error, 5
    when the peer could not be reached or refused or aborted an association.
    """
    # Imported here, not with the command table: every other command starts without them.
    from dicomnode import probe
    from dicomnode.preflight import dump_peer_conformance

    config = _setup(state)
    target = _peer(config, peer)
    classes: dict[str, None] = {}
    for uid in sop_classes or ():
        classes[uid] = None
    try:
        for path in classes_from:
            classes.update(dict.fromkeys(_classes_from(path)))
        if held:
            classes.update(dict.fromkeys(_held_classes(config)))
        if not classes:
            policy = load_policy(config.conformance)
            classes = {uid: None for uid in policy.accept if uid not in probe.SERVICE_CLASSES}
    except ConformanceError as exc:
        click.echo(f"dicomnode probe: {exc}", err=True)
        sys.exit(ExitCode.USAGE)
    options = probe.ProbeOptions(
        sop_classes=tuple(uid for uid in classes if uid not in probe.SERVICE_CLASSES),
        transfer_syntaxes=transfer_syntaxes or TRANSFER_SYNTAX_GROUPS["all"],
        screen=not exhaustive,
        preference_depth=preference_depth,
        roles=not no_roles,
        batch=batch,
    )
    quiet = state.verbosity < 0
    result = probe.probe(
        config,
        target,
        options,
        progress=(lambda line: click.echo(f"  {line}", err=True)) if state.verbosity > 0 else None,
    )
    if result.failure is not None:
        click.echo(f"dicomnode probe: {result.failure.message}", err=True)
        if _maybe_too_many_contexts(result.failure) and batch > _SMALL_BATCH and not quiet:
            click.echo(
                f"dicomnode probe: some devices refuse an association proposing many "
                f"presentation contexts; try --batch {_SMALL_BATCH}",
                err=True,
            )
        if result.associations > 1 and not quiet:
            click.echo(
                f"dicomnode probe: stopped after {result.associations} associations; "
                "nothing written",
                err=True,
            )
        sys.exit(ExitCode.UNREACHABLE)
    text = _with_notes(
        dump_peer_conformance(probe.peer_conformance(result)), result, probe.notes(result)
    )
    if str(output) == "-":
        click.echo(text, nl=False)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            click.echo(f"dicomnode probe: cannot write {output}: {exc.strerror or exc}", err=True)
            sys.exit(ExitCode.USAGE)
    if not quiet:
        for line in probe.summary(result):
            click.echo(line, err=True)
    if result.echo_error is not None:
        sys.exit(ExitCode.FAILURE)
    if result.echo_status is not None:
        sys.exit(exit_code([category(result.echo_status)]))
    sys.exit(ExitCode.SUCCESS)


_SMALL_BATCH = 16
# PS3.8 9.3.4 A-ASSOCIATE-RJ: source 1 (service user), reason 1 (no reason given).
_SERVICE_USER, _NO_REASON_GIVEN = 1, 1


def _maybe_too_many_contexts(failure: scu.AssociationFailure) -> bool:
    """An abort, or a rejection without a reason: what a device that cannot take 128 contexts
    tends to answer (a rejection naming a reason, e.g. an unknown called AE title, is not)."""
    if failure.kind is scu.FailureKind.ABORTED:
        return True
    return (
        failure.kind is scu.FailureKind.REJECTED
        and failure.source == _SERVICE_USER
        and failure.reason == _NO_REASON_GIVEN
    )


def _with_notes(text: str, result: probe.ProbeResult, notes: Iterable[str]) -> str:
    """The YAML with comment lines on how it was probed (and ``notes``), after its header
    comment."""
    lines = text.splitlines(keepends=True)
    head = 0
    while head < len(lines) and lines[head].startswith("#"):
        head += 1
    options = result.options
    extra = [
        f"# Probed by dicomnode probe: {result.associations} associations, {result.contexts} "
        f"presentation contexts in {result.elapsed:.2f} s; {len(options.sop_classes)} SOP "
        f"classes beside the services, {len(options.transfer_syntaxes)} candidate transfer "
        "syntaxes.\n",
        "# accept: only what it accepted; transfer syntaxes in its order of preference.\n",
    ]
    extra += [f"# Note: {note}\n" for note in notes]
    return "".join(lines[:head] + extra + lines[head:])


COMMANDS: list[click.Command] = [probe_cmd]
