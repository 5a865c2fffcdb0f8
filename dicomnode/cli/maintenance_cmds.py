"""Archive maintenance commands: ``index rebuild``, ``index verify``, ``stats`` and ``delete``.

Exit codes (``dicomnode.status.ExitCode``): 0 done and nothing amiss; 1 (WARNING) faults found
and not (all) repaired, or files that could not be indexed; 2 (FAILURE) the work could not be
done (no index, an index that cannot be opened, a rebuild refused, nothing to delete); 3
(CANCEL) a deletion not confirmed; 4 usage.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict

import click

from dicomnode.archive import Archive
from dicomnode.cli import CliState, pass_state, setup_logging, with_config
from dicomnode.cli.archive_cmds import _size, _table
from dicomnode.index import IndexError_, RemovedStudy
from dicomnode.maintenance import IndexExists, rebuild, verify
from dicomnode.qr import Level
from dicomnode.status import ExitCode


def _fail(message: str, code: ExitCode = ExitCode.FAILURE) -> None:
    click.echo(f"dicomnode: {message}", err=True)
    sys.exit(code)


class _Bars:
    """Progress on stderr: a bar when it is a terminal, nothing otherwise (the summary counts
    follow on stdout either way)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __call__(self, total: int) -> Callable[[int], None]:
        if not sys.stderr.isatty() or total == 0:
            return lambda n: None
        bar = self._stack.enter_context(
            click.progressbar(length=total, label=self.label, file=sys.stderr)
        )
        return bar.update


@contextlib.contextmanager
def _archive(state: CliState) -> Iterator[Archive]:
    """The node's archive with only its index open (nothing under storage_dir is touched)."""
    config = state.config
    setup_logging(state.verbosity)
    if not config.database.exists():
        _fail(f"no index at {config.database}: nothing has been stored yet")
    archive = Archive(config)
    try:
        archive.open_index()
    except IndexError_ as exc:
        _fail(str(exc))
    try:
        yield archive
    except IndexError_ as exc:
        _fail(str(exc))
    finally:
        archive.close()


# --- index rebuild / verify --------------------------------------------------------------------


@click.group("index")
def index_group() -> None:
    """Rebuild or verify the index of the node's stored files."""


@index_group.command("rebuild")
@with_config
@click.option(
    "--force",
    is_flag=True,
    help="Rebuild even though the index file exists and is not empty (the old one is kept "
    "beside it as <file>.bak-<time>).",
)
@pass_state
def rebuild_cmd(state: CliState, force: bool) -> None:
    """Rebuild the index from the files under storage_dir/objects (after the index was lost).

    Stop the node first. Each file's header is read (not its pixel data) and indexed as a store
    would index it; files that cannot be read are skipped and listed. Worklist items and MPPS
    records exist only in the index and cannot be rebuilt from files.
    """
    config = state.config
    setup_logging(state.verbosity)
    try:
        with _Bars("indexing") as bars:
            report = rebuild(config.storage_dir, config.database, force=force, progress=bars)
    except IndexExists as exc:
        _fail(str(exc))
    except (FileNotFoundError, IndexError_) as exc:
        _fail(str(exc))
    click.echo(
        f"indexed {report.indexed} of {report.files} file(s): {report.patients} patient(s), "
        f"{report.studies} stud{'y' if report.studies == 1 else 'ies'} -> {config.database}"
    )
    for skip in report.skipped:
        click.echo(f"skipped {skip.path}: {skip.reason}")
    if report.backup is not None:
        click.echo(f"the previous index is kept as {report.backup}")
    click.echo(
        "worklist items and MPPS records are not stored in files and were not rebuilt: "
        "import the worklist again (dicomnode worklist import)"
        + (", or copy them from the backup" if report.backup is not None else "")
    )
    if report.skipped:
        click.echo(f"{len(report.skipped)} file(s) not indexed")
        sys.exit(ExitCode.WARNING)


@index_group.command("verify")
@with_config
@click.option(
    "--repair",
    is_flag=True,
    help="Fix what is safe to fix: index files without rows, drop rows whose file is gone, "
    "correct sizes of files that still read completely, finish interrupted deletions.",
)
@click.option(
    "--deep", is_flag=True, help="Also read every file's header: damaged files, wrong instances."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_state
def verify_cmd(state: CliState, repair: bool, deep: bool, as_json: bool) -> None:
    """Check that the index and the stored files agree; exit 1 while faults remain.

    Reported: rows whose file is gone, files without a row, sizes that differ, deletions a crash
    left unfinished, a maintained total that is off; with --deep also damaged files and files
    holding another instance than their row says. A file is never deleted for want of a row.
    """
    with _archive(state) as archive, _Bars("reading") as bars:
        report = verify(archive, repair=repair, deep=deep, progress=bars)
    left = report.unrepaired
    if as_json:
        click.echo(
            json.dumps(
                {
                    "files": report.files,
                    "rows": report.rows,
                    "faults": [asdict(f) for f in report.faults],
                    "unrepaired": len(left),
                },
                indent=2,
            )
        )
    else:
        for fault in report.faults:
            mark = " (repaired)" if fault.repaired else ""
            where = f" {fault.path}" if fault.path else ""
            click.echo(f"{fault.kind}{where}: {fault.detail}{mark}")
        click.echo(
            f"{report.files} file(s), {report.rows} row(s): {len(report.faults)} fault(s), "
            f"{len(report.faults) - len(left)} repaired"
        )
    if left:
        sys.exit(ExitCode.WARNING)


# --- stats -------------------------------------------------------------------------------------


@click.command("stats")
@with_config
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_state
def stats_cmd(state: CliState, as_json: bool) -> None:
    """Counts and sizes of what the node holds, per modality and per sender."""
    with _archive(state) as archive:
        numbers = archive.index.stats()
    store = state.config.store
    numbers["max_size"] = store.max_size
    numbers["at_limit"] = store.at_limit.value
    if as_json:
        click.echo(json.dumps(numbers, indent=2))
        return
    click.echo(
        f"{numbers['patients']} patient(s), {numbers['studies']} stud"
        f"{'y' if numbers['studies'] == 1 else 'ies'}, {numbers['series']} series, "
        f"{numbers['instances']} instance(s), {_size(numbers['bytes'])} ({numbers['bytes']} bytes)"
    )
    if store.max_size:
        share = 100 * numbers["bytes"] / store.max_size
        click.echo(
            f"quota {_size(store.max_size)}: {share:.1f}% used (at the limit: "
            f"{store.at_limit.value})"
        )
    if numbers["by_modality"]:
        click.echo("")
        click.echo(
            _table(
                [
                    [
                        m["modality"] or "(none)",
                        str(m["studies"]),
                        str(m["series"]),
                        str(m["instances"]),
                        _size(m["bytes"]),
                    ]
                    for m in numbers["by_modality"]
                ],
                ["Modality", "Studies", "Series", "Instances", "Size"],
            )
        )
    if numbers["by_sender"]:
        click.echo("")
        click.echo(
            _table(
                [
                    [
                        s["calling_ae_title"] or "(unknown)",
                        str(s["studies"]),
                        str(s["instances"]),
                        _size(s["bytes"]),
                        s["last_received"] or "",
                    ]
                    for s in numbers["by_sender"]
                ],
                ["Sender", "Studies", "Instances", "Size", "Last received"],
            )
        )
    extra = [
        f"{numbers['worklist_items']} worklist item(s)",
        f"{numbers['performed_steps']} performed procedure step(s)",
    ]
    if numbers["pending_deletions"]:
        extra.append(
            f"{numbers['pending_deletions']} file(s) pending deletion (run dicomnode index verify)"
        )
    click.echo("")
    click.echo(", ".join(extra))


# --- delete ------------------------------------------------------------------------------------

_LEVELS = {"patient": Level.PATIENT, "study": Level.STUDY, "series": Level.SERIES}


def _summary(removed: list[RemovedStudy]) -> str:
    instances = sum(r.instances for r in removed)
    size = sum(r.bytes for r in removed)
    series = sum(len(r.series_uids) for r in removed)
    return (
        f"{len(removed)} stud{'y' if len(removed) == 1 else 'ies'}, {series} series, "
        f"{instances} instance(s), {_size(size)}"
    )


def _confirmed(question: str) -> bool:
    """Ask on the terminal; no answer (end of input, as under cron without --yes) is a no."""
    try:
        return click.confirm(question, default=False)
    except click.Abort:
        click.echo("")
        return False


@click.command("delete")
@with_config
@click.argument("level", type=click.Choice(list(_LEVELS)))
@click.argument("key")
@click.option("--issuer", help="Issuer of Patient ID, when one Patient ID has several issuers.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def delete_cmd(state: CliState, level: str, key: str, issuer: str | None, yes: bool) -> None:
    """Delete a patient (by Patient ID), a study or a series (by its UID): rows and files.

    Shows what will be deleted and asks first (unless --yes). The deletion is audited. Safe while
    the node runs; a crash midway is finished by the next start or by index verify --repair.
    """
    which = _LEVELS[level]
    with _archive(state) as archive:
        ids = archive.index.lookup(which, key, issuer)
        if not ids:
            _fail(f"no {level} {key!r} in the index")
        if len(ids) > 1:
            _fail(
                f"Patient ID {key!r} is held under {len(ids)} issuers; choose one with --issuer",
                ExitCode.USAGE,
            )
        preview = archive.index.remove(which, ids, dry_run=True)
        if not preview:
            _fail(f"{level} {key!r} holds nothing to delete")
        click.echo(f"To delete ({level} {key}): {_summary(preview)}")
        for r in preview:
            part = "whole study" if r.whole else f"{len(r.series_uids)} series of it"
            click.echo(
                f"  patient {r.patient_id}  study {r.study_uid}  {part}: "
                f"{r.instances} instance(s), {_size(r.bytes)}"
            )
        if not yes and not _confirmed("Delete these rows and files?"):
            click.echo("nothing deleted")
            sys.exit(ExitCode.CANCEL)
        removed = archive.delete(which, ids, by="command")
    click.echo(f"deleted {_summary(removed)}")


COMMANDS: list[click.Command] = [index_group, stats_cmd, delete_cmd]
