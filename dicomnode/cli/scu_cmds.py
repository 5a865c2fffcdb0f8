"""SCU commands: ``dicomnode echo``, ``send``, ``find``, ``move``, ``get``."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from dicomnode import scu, tls
from dicomnode.cli import CliState, pass_state, setup_logging, with_config
from dicomnode.config import Config, ConfigError, Peer, resolve_peer, valid_ae_title
from dicomnode.qr import Level, Model
from dicomnode.status import Category, ExitCode, category, describe, exit_code


def _setup(state: CliState) -> Config:
    setup_logging(state.verbosity)
    if state.verbosity <= 0:
        # Every association and per-file failure is reported once, in our own words; pynetdicom's
        # ERROR lines about the same events are shown from -v on.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    return state.config


_TLS_META = "dicomnode.tls"


def _set_tls(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    del param
    if value:
        ctx.meta[_TLS_META] = True


# Declared once, for every command that calls a peer; read by _peer (not passed as a parameter).
tls_option = click.option(
    "--tls",
    is_flag=True,
    expose_value=False,
    callback=_set_tls,
    help="Call PEER over DICOM TLS (as a configured peer with tls: true does), presenting "
    "tls.certificate and checking its certificate against tls.ca_certificates.",
)


def _peer(config: Config, text: str) -> Peer:
    """The peer named by ``text`` (see resolve_peer), over TLS with --tls; exits with a usage
    error when it cannot be resolved or our tls.* files are unusable for calling it."""
    try:
        peer = resolve_peer(config, text)
    except ConfigError as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.USAGE)
    context = click.get_current_context(silent=True)
    if context is not None and context.meta.get(_TLS_META):
        peer = replace(peer, tls=True)
    if peer.tls:
        # Checked before anything is sent, so a bad file is a usage error, not an unreachable
        # peer; each association builds its own context again (scu.request_association).
        try:
            tls.client_context(config.tls)
        except tls.TlsError as exc:
            click.echo(f"dicomnode: cannot call {peer.address} over TLS: {exc}", err=True)
            sys.exit(ExitCode.USAGE)
    return peer


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@click.command("echo")
@with_config
@click.argument("peer")
@tls_option
@pass_state
def echo_cmd(state: CliState, peer: str) -> None:
    """Check that PEER answers a C-ECHO (DICOM Verification).

    PEER is a peer name from the configuration or AET@host:port. Exits 0 on success, 5 when
    the peer cannot be reached or refuses the association.
    """
    config = _setup(state)
    target = _peer(config, peer)
    result = scu.echo(config, target)
    if result.failure is not None:
        click.echo(f"dicomnode echo: {result.failure.message}", err=True)
        sys.exit(ExitCode.UNREACHABLE)
    if result.status is None:
        click.echo(f"dicomnode echo: {result.error}", err=True)
        sys.exit(ExitCode.FAILURE)
    click.echo(
        f"echo {target.name} ({target.address}): {describe(result.status)} "
        f"in {result.elapsed * 1000:.0f} ms"
    )
    sys.exit(exit_code([category(result.status)]))


@click.command("send")
@with_config
@click.argument("peer")
@tls_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@pass_state
def send_cmd(state: CliState, peer: str, paths: tuple[Path, ...]) -> None:
    """Send DICOM files to PEER (C-STORE), as they are on disk.

    PATHS are files, folders (searched recursively) or DICOMDIRs (their referenced instances
    are sent). Files that are not DICOM Part 10 are skipped and listed. PEER is a peer name
    from the configuration or AET@host:port.

    Exits with the worst status seen (0 success, 1 warning, 2 failure), 4 when there is nothing
    to send, 5 when no association could be established.
    """
    config = _setup(state)
    target = _peer(config, peer)
    # pydicom both warns and logs about oddities in the files it reads; keep the log lines only.
    warnings.simplefilter("ignore", UserWarning)
    found = scu.collect(paths)
    quiet = state.verbosity < 0
    if not quiet:
        for skipped in found.skipped:
            click.echo(f"skipped: {skipped.path}: {skipped.reason}", err=True)
    if not found.files:
        click.echo("dicomnode send: no DICOM files to send", err=True)
        sys.exit(ExitCode.USAGE)

    with ExitStack() as stack:
        progress: Callable[[scu.FileResult], None] | None = None
        if sys.stderr.isatty() and not quiet:
            bar = stack.enter_context(
                click.progressbar(
                    length=len(found.files),
                    label=f"sending to {target.name}",
                    file=sys.stderr,
                    show_pos=True,
                )
            )

            def progress(result: scu.FileResult) -> None:
                del result
                bar.update(1)

        report = scu.send(config, target, found.files, skipped=found.skipped, progress=progress)

    for failure in _distinct(report.association_failures):
        click.echo(f"dicomnode send: {failure.message}", err=True)
    for result in report.results:
        if result.category is Category.SUCCESS:
            continue
        if result.category is Category.WARNING and result.status is not None:
            if quiet:
                continue
            click.echo(
                f"warning: {result.path} ({result.sop_instance_uid}): {describe(result.status)}",
                err=True,
            )
        else:
            why = describe(result.status) if result.status is not None else result.error
            click.echo(f"failed: {result.path} ({result.sop_instance_uid}): {why}", err=True)
    click.echo(
        f"sent {report.sent} of {_plural(report.total, 'file')} to {target.name} "
        f"({_plural(report.warnings, 'warning')}, {report.failed} failed, "
        f"{len(report.skipped)} skipped) in {report.elapsed:.1f} s"
    )
    if report.unreachable:
        sys.exit(ExitCode.UNREACHABLE)
    sys.exit(exit_code(report.categories()))


def _distinct(failures: list[scu.AssociationFailure]) -> list[scu.AssociationFailure]:
    seen: set[str] = set()
    kept = []
    for failure in failures:
        if failure.message not in seen:
            seen.add(failure.message)
            kept.append(failure)
    return kept


# --- Query/Retrieve: find, move, get ------------------------------------------------------------

_LEVELS = [level.value.lower() for level in Level]
_MODELS = [model.value for model in Model]
_CELL_WIDTH = 64  # the longest UI/LO value; longer text (LT, UT) is cut
_Report = TypeVar("_Report", bound=scu.QueryOutcome)


def _parse_keys(
    ctx: click.Context, param: click.Parameter, specs: tuple[str, ...]
) -> list[DataElement]:
    """``-k`` values as data elements, in the order given; a bad one is a usage error (exit 4)."""
    del ctx
    try:
        return [scu.query_key(spec) for spec in specs]
    except scu.QueryKeyError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def key_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``-k KEY[=VALUE]``, findscu's query keys, as every query command takes them."""
    return click.option(
        "-k",
        "--key",
        "keys",
        multiple=True,
        metavar="KEY[=VALUE]",
        callback=_parse_keys,
        help=help_text,
    )


def _query_options(default_level: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--level``, ``--model`` and ``-k`` as find, move and get share them."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        command = key_option(
            "A query key as findscu -k takes it: Keyword=Value or gggg,eeee=Value "
            "(wildcards * ?, date ranges 20200101-20201231, UID lists a\\b); no value: "
            "return this attribute. Repeatable."
        )(command)
        command = click.option(
            "--model",
            type=click.Choice(_MODELS, case_sensitive=False),
            default="study",
            show_default=True,
            help="Query/Retrieve information model: Patient Root or Study Root.",
        )(command)
        return click.option(
            "--level",
            type=click.Choice(_LEVELS, case_sensitive=False),
            default=default_level,
            show_default=True,
            help="Query/Retrieve level.",
        )(command)

    return decorate


def _level_model(level: str, model: str) -> tuple[Level, Model]:
    query_level, query_model = Level(level.upper()), Model(model.lower())
    try:
        scu.check_level(query_model, query_level)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return query_level, query_model


def _keys_dataset(elements: list[DataElement]) -> Dataset:
    keys = Dataset()
    for element in elements:
        keys[element.tag] = element
    return keys


def _require_selection(elements: list[DataElement], command: str) -> None:
    """move/get must name what to retrieve: an identifier of return keys only would match all."""
    if not any(e.value not in (None, "", []) for e in elements):
        raise click.UsageError(
            f"give what to {command} with -k Keyword=Value "
            "(e.g. -k StudyInstanceUID=1.2.3 or -k PatientID=12345)"
        )


@contextmanager
def _cancel_on_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) sets the yielded event, which makes the operation send C-CANCEL and
    wait for the peer's final response; a second Ctrl-C raises KeyboardInterrupt (abort)."""
    cancel = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread (an embedding program): no signal handling
        yield cancel
        return
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_cancellable(name: str, operation: Callable[[threading.Event], _Report]) -> _Report:
    with _cancel_on_interrupt() as cancel:
        try:
            return operation(cancel)
        except KeyboardInterrupt:
            click.echo(
                f"dicomnode {name}: interrupted again; the association was aborted", err=True
            )
            sys.exit(ExitCode.CANCEL)


def _outcome(name: str, report: scu.QueryOutcome, quiet: bool) -> ExitCode:
    """Report on stderr what went wrong (or was cancelled); the exit code for ``report``."""
    peer = report.peer
    if report.failure is not None:
        click.echo(f"dicomnode {name}: {report.failure.message}", err=True)
        return ExitCode.UNREACHABLE
    if report.error is not None:
        click.echo(f"dicomnode {name}: {report.error}", err=True)
    if report.cancelled:
        if report.status is not None:
            answer = f"{peer.name} answered {describe(report.status, report.service)}"
            click.echo(f"dicomnode {name}: cancelled (C-CANCEL); {answer}", err=True)
        elif report.error is None:
            click.echo(f"dicomnode {name}: cancelled before the request was sent", err=True)
    elif report.status is not None and category(report.status) is not Category.SUCCESS:
        shown = not (quiet and category(report.status) is Category.WARNING)
        comment = f" ({report.error_comment})" if report.error_comment else ""
        if shown:
            click.echo(
                f"dicomnode {name}: {peer.name} answered "
                f"{describe(report.status, report.service)}{comment}",
                err=True,
            )
    return exit_code(report.categories())


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cell(element: DataElement | None) -> str:
    if element is None or element.value is None:
        return ""
    if element.VR == "SQ":
        return f"<{len(element.value)} items>"
    value = element.value
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue | list) else str(value)
    text = " ".join(text.split())  # no line breaks or tabs in a table cell
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 3] + "..."


def _table(columns: list[BaseTag], matches: list[Dataset]) -> str:
    headers = [keyword_for_tag(tag) or str(tag) for tag in columns]
    rows = [[_cell(match.get(tag)) for tag in columns] for match in matches]
    return _text_table(headers, rows)


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to the widest cell, as a terminal shows them (wide characters count 2)."""
    widths = [
        max([_display_width(h), *(_display_width(r[i]) for r in rows)])
        for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        padded = (c + " " * (w - _display_width(c)) for c, w in zip(cells, widths, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


@click.command("find")
@with_config
@click.argument("peer")
@tls_option
@_query_options("study")
@click.option("--json", "as_json", is_flag=True, help="Print the matches as a DICOM JSON array.")
@pass_state
def find_cmd(
    state: CliState,
    peer: str,
    level: str,
    model: str,
    keys: list[DataElement],
    as_json: bool,
) -> None:
    """Query PEER (C-FIND) and print the matches.

    Prints a table, one row per match, with a column per key in the order given. Without
    return keys (only Keyword=Value keys, or none), the usual attributes of the level are
    asked for as well. --json prints the matches as a DICOM JSON array (PS3.18 F.2) and
    nothing else on stdout. Ctrl-C sends C-CANCEL.

    Exits 0 success, 1 warning, 2 failure, 3 cancelled, 4 usage error, 5 peer unreachable or
    refusing.
    """
    query_level, query_model = _level_model(level, model)
    config = _setup(state)
    target = _peer(config, peer)
    elements = list(keys)
    if all(e.value not in (None, "", []) for e in elements):
        # Matching keys only (or none at all): ask for the level's usual attributes too.
        given = {e.tag for e in elements}
        for keyword in scu.DEFAULT_RETURN_KEYS[query_level]:
            tag = Tag(keyword)
            if tag not in given:
                elements.append(DataElement(tag, dictionary_VR(tag), None))
    columns = [e.tag for e in elements if e.tag != Tag("SpecificCharacterSet")]
    warnings.simplefilter("ignore", UserWarning)  # pydicom on odd values; its log lines remain
    report = _run_cancellable(
        "find",
        lambda cancel: scu.find(
            config, target, query_level, query_model, _keys_dataset(elements), cancel=cancel
        ),
    )
    code = _outcome("find", report, state.verbosity < 0)
    count = len(report.matches)
    summary = (
        f"{count} match{'' if count == 1 else 'es'} from {target.name} "
        f"at {query_level.value} level in {report.elapsed:.1f} s"
    )
    _show_matches(report, columns, report.matches, as_json, summary, state.verbosity >= 0)
    sys.exit(code)


def _show_matches(
    report: scu.FindReport,
    columns: list[BaseTag],
    rows: list[Dataset],
    as_json: bool,
    summary: str,
    verbose: bool,
) -> None:
    """The matches on stdout: a DICOM JSON array of ``report.matches``, or a table of ``rows``
    (the matches as shown) with a ``summary`` line on stderr unless quiet."""
    if report.failure is not None:
        return
    if as_json:
        click.echo(
            json.dumps([m.to_json_dict() for m in report.matches], ensure_ascii=False, indent=2)
        )
        return
    if rows:
        click.echo(_table(columns, rows))
    if verbose:
        click.echo(summary, err=True)


class _Progress:
    """A progress bar on stderr (only when it is a terminal) fed from Pending sub-op counts."""

    def __init__(self, stack: ExitStack, label: str, enabled: bool) -> None:
        self.stack = stack
        self.label = label
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, remaining: int, completed: int, failed: int, warning: int) -> None:
        if not self.enabled:
            return
        done = completed + failed + warning
        if self.bar is None:
            self.bar = self.stack.enter_context(
                click.progressbar(
                    length=done + remaining, label=self.label, file=sys.stderr, show_pos=True
                )
            )
        self.bar.update(done - self.bar.pos)


def _retrieve_summary(verb: str, report: scu.RetrieveReport, where: str) -> str:
    completed, failed = report.completed or 0, report.failed or 0
    warning, remaining = report.warning or 0, report.remaining or 0
    total = completed + failed + warning + remaining
    status = (
        describe(report.status, report.service) if report.status is not None else "no final status"
    )
    left = f", {remaining} not attempted" if remaining else ""
    if not total:  # nothing matched, or the peer refused before any sub-operation
        return f"{verb} nothing {where} in {report.elapsed:.1f} s: {status}"
    return (
        f"{verb} {completed + warning} of {_plural(total, 'instance')} {where} "
        f"({_plural(warning, 'warning')}, {failed} failed{left}) in {report.elapsed:.1f} s: "
        f"{status}"
    )


def _report_failed_instances(report: scu.RetrieveReport) -> None:
    for uid in report.failed_instances:
        click.echo(f"failed: SOP instance {uid}", err=True)


@click.command("move")
@with_config
@click.argument("peer")
@tls_option
@click.option("--dest", required=True, metavar="AET", help="AE title to send the instances to.")
@_query_options("study")
@pass_state
def move_cmd(
    state: CliState, peer: str, dest: str, level: str, model: str, keys: list[DataElement]
) -> None:
    """Ask PEER to send instances to the AE titled --dest (C-MOVE).

    PEER must know where --dest is. Select what to move with -k, e.g.
    -k StudyInstanceUID=1.2.3. Progress shows on stderr when it is a terminal; a summary line
    follows. Ctrl-C sends C-CANCEL.

    Exits 0 success, 1 warning (some sub-operations failed), 2 failure, 3 cancelled, 4 usage
    error, 5 peer unreachable or refusing.
    """
    query_level, query_model = _level_model(level, model)
    _require_selection(keys, "move")
    if not valid_ae_title(dest):
        raise click.BadParameter(
            f"{dest!r} is not an AE title (1-16 characters)", param_hint="--dest"
        )
    config = _setup(state)
    target = _peer(config, peer)
    quiet = state.verbosity < 0
    with ExitStack() as stack:
        progress = _Progress(stack, f"moving to {dest}", sys.stderr.isatty() and not quiet)
        report = _run_cancellable(
            "move",
            lambda cancel: scu.move(
                config,
                target,
                dest,
                query_level,
                query_model,
                _keys_dataset(keys),
                on_progress=progress,
                cancel=cancel,
            ),
        )
    code = _outcome("move", report, quiet)
    if report.failure is None:
        _report_failed_instances(report)
        click.echo(_retrieve_summary("moved", report, f"from {target.name} to {dest.strip()}"))
    sys.exit(code)


@click.command("get")
@with_config
@click.argument("peer")
@tls_option
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the retrieved files (created if missing).",
)
@_query_options("study")
@pass_state
def get_cmd(
    state: CliState, peer: str, out_dir: Path, level: str, model: str, keys: list[DataElement]
) -> None:
    """Retrieve instances from PEER into --out (C-GET).

    Each instance is written as a DICOM file named by a random id, with the data set exactly as
    received. Select what to get with -k, e.g. -k StudyInstanceUID=1.2.3. Ctrl-C sends
    C-CANCEL.

    Exits 0 success, 1 warning (some sub-operations failed), 2 failure, 3 cancelled, 4 usage
    error, 5 peer unreachable or refusing.
    """
    query_level, query_model = _level_model(level, model)
    _require_selection(keys, "get")
    config = _setup(state)
    target = _peer(config, peer)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        click.echo(f"dicomnode get: cannot create {out_dir}: {exc.strerror or exc}", err=True)
        sys.exit(ExitCode.USAGE)
    quiet = state.verbosity < 0
    with ExitStack() as stack:
        progress = _Progress(
            stack, f"retrieving from {target.name}", sys.stderr.isatty() and not quiet
        )
        report = _run_cancellable(
            "get",
            lambda cancel: scu.get(
                config,
                target,
                query_level,
                query_model,
                _keys_dataset(keys),
                out_dir,
                on_progress=progress,
                cancel=cancel,
            ),
        )
    code = _outcome("get", report, quiet)
    if report.failure is None:
        for refused in report.refused:
            click.echo(f"not written: {refused}", err=True)
        _report_failed_instances(report)
        click.echo(_retrieve_summary("retrieved", report, f"from {target.name} into {out_dir}"))
    sys.exit(code)


COMMANDS: list[click.Command] = [echo_cmd, send_cmd, find_cmd, move_cmd, get_cmd]
