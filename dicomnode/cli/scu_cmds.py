"""SCU commands: ``dicomnode echo``, ``dicomnode send``."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import click

from dicomnode import scu
from dicomnode.cli import CliState, pass_state, setup_logging, with_config
from dicomnode.config import Config, ConfigError, Peer, resolve_peer
from dicomnode.status import Category, ExitCode, category, describe, exit_code


def _setup(state: CliState) -> Config:
    setup_logging(state.verbosity)
    if state.verbosity <= 0:
        # Every association and per-file failure is reported once, in our own words; pynetdicom's
        # ERROR lines about the same events are shown from -v on.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    return state.config


def _peer(config: Config, text: str) -> Peer:
    try:
        return resolve_peer(config, text)
    except ConfigError as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.USAGE)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@click.command("echo")
@with_config
@click.argument("peer")
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


COMMANDS: list[click.Command] = [echo_cmd, send_cmd]
