"""Archive inspection: ``dicomnode list`` shows what the node's index holds."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from dicomnode.cli import CliState, pass_state, setup_logging, with_config
from dicomnode.index import Index, IndexError_
from dicomnode.status import ExitCode


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@click.command("list")
@with_config
@click.option("--instances", is_flag=True, help="One line per instance instead of per study.")
@click.option("--study", "study_uid", help="Only this Study Instance UID (with --instances).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_state
def list_cmd(state: CliState, instances: bool, study_uid: str | None, as_json: bool) -> None:
    """List the studies (or instances) in the node's index."""
    config = state.config
    setup_logging(state.verbosity)
    if not config.database.exists():
        click.echo(f"no index at {config.database}: nothing has been stored yet", err=True)
        return
    index = Index(config.database, config.database_busy_timeout)
    try:
        index.open()
        rows: list[dict[str, Any]] = (
            list(index.instances(study_uid)) if instances else list(index.studies())
        )
    except IndexError_ as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    finally:
        index.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str, ensure_ascii=False))
        return
    if instances:
        table = [
            [
                r["study_uid"],
                r["series_uid"],
                r["modality"],
                r["sop_instance_uid"],
                _size(r["file_size"]),
                r["received_from"],
                r["path"],
            ]
            for r in rows
        ]
        headers = ["Study UID", "Series UID", "Mod", "SOP Instance UID", "Size", "From", "File"]
    else:
        table = [
            [
                r["patient_id"],
                r["patient_name"],
                r["study_date"],
                r["modalities"],
                r["accession_number"],
                str(r["n_series"]),
                str(r["n_instances"]),
                _size(r["n_bytes"]),
                r["study_uid"],
            ]
            for r in rows
        ]
        headers = ["Patient ID", "Name", "Date", "Modalities", "Accession", "Series",
                   "Instances", "Size", "Study UID"]  # fmt: skip
    click.echo(_table(table, headers))
    noun = ("instance", "instances") if instances else ("study", "studies")
    click.echo(f"{len(rows)} {noun[0] if len(rows) == 1 else noun[1]}")


COMMANDS: list[click.Command] = [list_cmd]
