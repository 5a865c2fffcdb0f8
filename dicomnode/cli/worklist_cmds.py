"""Worklist and MPPS commands: ``dicomnode worklist add/import/list/show/remove/query`` and
``dicomnode mpps list/show``.

``add``, ``import``, ``list``, ``show`` and ``remove`` work on the node's own index (the
``database`` of the configuration), safely beside a running node (SQLite in WAL mode); ``query``
asks any Modality Worklist SCP over the network.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from dicomnode import scu
from dicomnode.cli import CliState, pass_state, setup_logging, with_config
from dicomnode.cli.scu_cmds import (
    _cell,
    _outcome,
    _peer,
    _run_cancellable,
    _setup,
    _show_matches,
    _text_table,
    key_option,
    tls_option,
)
from dicomnode.config import Config
from dicomnode.index import Index, IndexError_
from dicomnode.index.attributes import STEP_KEYWORDS, STEP_SEQUENCE, WORKLIST_ATTRIBUTES
from dicomnode.mpps import PerformedSteps
from dicomnode.status import ExitCode
from dicomnode.worklist import (
    StoredItem,
    Worklist,
    WorklistError,
    item_from_mapping,
    items_from_text,
    normalise,
    read_worklist_file,
)

_STEP = Tag(STEP_SEQUENCE)
# What `worklist query` asks for when given no return keys, and `worklist list` shows: the
# attributes of the worklist table that hold one value (sequences are asked for by -k).
DEFAULT_KEYS = tuple(
    a.keyword
    for a in WORKLIST_ATTRIBUTES
    if a.column and a.keyword not in ("PatientBirthDate", "PatientSex", "StudyInstanceUID")
)


@contextmanager
def _worklist(state: CliState) -> Iterator[Worklist]:
    """The node's worklist: its index opened (created or migrated if need be), old items
    expired, closed afterwards. Index failures end the command with exit status 2."""
    config = state.config
    setup_logging(state.verbosity)
    index = Index(config.database, config.database_busy_timeout)
    try:
        index.open()
        worklist = Worklist(config, index)
        worklist.expire()
        yield worklist
    except IndexError_ as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    finally:
        index.close()


def _fail(message: str, code: ExitCode = ExitCode.FAILURE) -> None:
    click.echo(f"dicomnode worklist: {message}", err=True)
    sys.exit(code)


@click.group("worklist")
def worklist_group() -> None:
    """Modality Worklist: manage the node's scheduled procedure steps, or query a worklist SCP."""


# --- add / import ------------------------------------------------------------------------------

_DAY_WORDS = {"today": 0, "tomorrow": 1, "yesterday": -1}
# (option, attribute keyword, help)
_ITEM_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--patient-name", "PatientName", "Patient's name, e.g. DOE^JOHN."),
    ("--patient-id", "PatientID", "Patient ID."),
    ("--birth-date", "PatientBirthDate", "Patient's birth date (YYYYMMDD)."),
    ("--sex", "PatientSex", "Patient's sex: M, F or O."),
    ("--accession", "AccessionNumber", "Accession number."),
    ("--referring-physician", "ReferringPhysicianName", "Referring physician's name."),
    ("--requesting-physician", "RequestingPhysician", "Requesting physician's name."),
    ("--procedure-id", "RequestedProcedureID", "Requested Procedure ID (generated if not given)."),
    ("--procedure-description", "RequestedProcedureDescription", "Requested procedure."),
    ("--study-uid", "StudyInstanceUID", "Study Instance UID to use (generated if not given)."),
    ("--modality", "Modality", "Modality of the step, e.g. CT."),
    ("--station-aet", "ScheduledStationAETitle", "AE title of the scheduled station."),
    ("--station-name", "ScheduledStationName", "Name of the scheduled station."),
    ("--date", "ScheduledProcedureStepStartDate", "Start date: YYYYMMDD, today, tomorrow."),
    ("--time", "ScheduledProcedureStepStartTime", "Start time: HHMM, HHMMSS, HH:MM, or now."),
    ("--performing-physician", "ScheduledPerformingPhysicianName", "Performing physician."),
    (
        "--step-id",
        "ScheduledProcedureStepID",
        "Scheduled Procedure Step ID (generated if not given).",
    ),
    ("--step-description", "ScheduledProcedureStepDescription", "What the step is."),
    ("--location", "ScheduledProcedureStepLocation", "Where the step takes place."),
)


def _date(text: str) -> str:
    word = text.strip().lower()
    if word in _DAY_WORDS:
        return (dt.date.today() + dt.timedelta(days=_DAY_WORDS[word])).strftime("%Y%m%d")
    return text.strip().replace("-", "")


def _time(text: str) -> str:
    if text.strip().lower() == "now":
        return dt.datetime.now().strftime("%H%M%S")
    return text.strip().replace(":", "")


_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")


def _date_range(ctx: click.Context, param: click.Parameter, text: str | None) -> str | None:
    """``--date``: a day word, a date (YYYYMMDD or YYYY-MM-DD) or a range of them
    (``A-B``, ``A-``, ``-B``), as a DICOM DA value or range; anything else is a usage error."""
    del ctx
    if text is None:
        return None
    # Dashes inside an ISO date are not the range's dash.
    parts = _ISO_DATE.sub(r"\1\2\3", text.strip()).split("-")
    dates = [_date(part) if part else "" for part in parts]
    if len(dates) > 2 or not any(dates) or any(d and not _real_date(d) for d in dates):
        raise click.BadParameter(
            f"{text!r}: give today, tomorrow, yesterday, a date (YYYYMMDD or YYYY-MM-DD) or a "
            "range of them (A-B, A-, -B)",
            param=param,
        )
    return "-".join(dates)


def _real_date(text: str) -> bool:
    try:
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return len(text) == 8


def _mapping_from_options(values: dict[str, str | None]) -> dict[str, Any]:
    top: dict[str, Any] = {}
    step: dict[str, Any] = {}
    for option, keyword, _ in _ITEM_OPTIONS:
        value = values.get(option.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if keyword == "ScheduledProcedureStepStartDate":
            value = _date(value)
        elif keyword == "ScheduledProcedureStepStartTime":
            value = _time(value)
        (step if keyword in STEP_KEYWORDS else top)[keyword] = value
    if step:
        top[STEP_SEQUENCE] = [step]
    return top


def _item_options(command: Any) -> Any:
    for option, _, help_text in reversed(_ITEM_OPTIONS):
        command = click.option(option, help=help_text)(command)
    return command


def _describe(item_id: int, item: Dataset) -> str:
    step = item[_STEP].value[0]
    return (
        f"item {item_id}: {item.get('PatientID', '')} {item.get('PatientName', '')}, "
        f"{step.get('Modality', '')} at {step.get('ScheduledStationAETitle', '') or 'any station'} "
        f"{step.get('ScheduledProcedureStepStartDate', '')} "
        f"{step.get('ScheduledProcedureStepStartTime', '')}, accession "
        f"{item.get('AccessionNumber', '') or '-'}, step {step.get('ScheduledProcedureStepID', '')}"
    )


def _store(worklist: Worklist, items: list[Dataset]) -> None:
    ids = worklist.add(items)
    for item_id, item in zip(ids, items, strict=True):
        click.echo(f"added {_describe(item_id, item)}")


@worklist_group.command("add")
@with_config
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_item_options
@pass_state
def add_cmd(state: CliState, /, files: tuple[Path, ...], **options: str | None) -> None:
    """Add worklist items from FILES (YAML or JSON) or from the options.

    A file holds one item or a list of items: a mapping of DICOM keywords to values, with the
    Scheduled Procedure Step Sequence as a list of such mappings (or DICOM JSON). An item
    needs PatientName, PatientID and, per step, Modality, ScheduledProcedureStepStartDate and
    ScheduledProcedureStepStartTime; the Study Instance UID, Requested Procedure ID and step ID
    are generated when missing. Every item is checked before any is added. Exits 0 when added,
    2 when nothing was (the message says why), 4 on a usage error.
    """
    given = {k: v for k, v in options.items() if v is not None}
    if files and given:
        raise click.UsageError("give item files or item options, not both")
    if not files and not given:
        raise click.UsageError("give item files (YAML or JSON), or the options of one item")
    try:
        raw: list[tuple[str, Dataset]] = []
        if files:
            for path in files:
                text = _read_text(path)
                raw += [
                    (f"{path}[{i}]", ds) for i, ds in enumerate(items_from_text(text, str(path)))
                ]
        else:
            raw.append(("options", item_from_mapping(_mapping_from_options(options), "options")))
        items = [n for where, ds in raw for n in normalise(ds, where)]
    except WorklistError as exc:
        _fail(f"{exc}; nothing added")
        return
    with _worklist(state) as worklist:
        _store(worklist, items)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise WorklistError(f"{path}: cannot read it as UTF-8 text: {exc}") from exc


@worklist_group.command("import")
@with_config
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@pass_state
def import_cmd(state: CliState, paths: tuple[Path, ...]) -> None:
    """Import DICOM worklist files (as DCMTK wlmscpfs and Orthanc read them): files, or folders
    searched for *.wl files. Every file is read and checked before any is imported; one that
    is not a usable worklist item stops the import with its name and why (exit 2)."""
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.rglob("*.wl") if p.is_file()) if path.is_dir() else [path]
    if not files:
        _fail("no worklist files (*.wl) found; nothing imported")
    try:
        items = [n for path in files for n in normalise(read_worklist_file(path), str(path))]
    except WorklistError as exc:
        _fail(f"{exc}; nothing imported")
        return
    with _worklist(state) as worklist:
        _store(worklist, items)
        click.echo(f"imported {len(items)} item(s) from {len(files)} file(s)")


# --- list / show / remove ---------------------------------------------------------------------


def _flat(item: Dataset) -> Dataset:
    """The item with its step's attributes beside the top-level ones (for a table row)."""
    flat = Dataset()
    flat.update(item)
    for step in item.get(STEP_SEQUENCE) or []:
        flat.update(step)
    return flat


_LIST_COLUMNS = ("ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
                 "Modality", "ScheduledStationAETitle", "PatientID", "PatientName",
                 "AccessionNumber", "ScheduledProcedureStepID",
                 "ScheduledProcedureStepDescription", "ScheduledProcedureStepStatus")  # fmt: skip
_STEP_LIST_COLUMNS = ("SOPInstanceUID", "PerformedProcedureStepStatus", "PerformedStationAETitle",
                      "Modality", "PerformedProcedureStepStartDate",
                      "PerformedProcedureStepStartTime", "PatientID",
                      "PerformedProcedureStepDescription")  # fmt: skip


@worklist_group.command("list")
@with_config
@click.option("--json", "as_json", is_flag=True, help="One DICOM JSON object per item, in a list.")
@pass_state
def list_cmd(state: CliState, as_json: bool) -> None:
    """List the worklist items in scheduled order (old ones expire first)."""
    with _worklist(state) as worklist:
        stored = list(worklist.items())
    if as_json:
        click.echo(json.dumps([_json(s) for s in stored], ensure_ascii=False, indent=2))
        return
    if stored:
        rows = [
            [str(s.id), *(_cell(_flat(s.item).get(Tag(keyword))) for keyword in _LIST_COLUMNS)]
            for s in stored
        ]
        click.echo(_text_table(["ID", *_LIST_COLUMNS], rows))
    click.echo(f"{len(stored)} item{'' if len(stored) == 1 else 's'}")


def _json(stored: StoredItem) -> dict[str, Any]:
    return {
        "id": stored.id,
        "mpps": stored.mpps_uid or None,
        "added": stored.created_at,
        "updated": stored.updated_at,
        "item": stored.item.to_json_dict(),
    }


@worklist_group.command("show")
@with_config
@click.argument("item_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="The item as DICOM JSON.")
@pass_state
def show_cmd(state: CliState, item_id: int, as_json: bool) -> None:
    """Show worklist item ITEM_ID in full (every attribute, and the MPPS that performed it)."""
    with _worklist(state) as worklist:
        found = list(worklist.items([item_id]))
    if not found:
        _fail(f"no worklist item {item_id}")
    stored = found[0]
    if as_json:
        click.echo(json.dumps(_json(stored), ensure_ascii=False, indent=2))
        return
    click.echo(
        f"worklist item {stored.id} (added {stored.created_at}, updated {stored.updated_at})"
    )
    click.echo(f"performed by MPPS {stored.mpps_uid}" if stored.mpps_uid else "no MPPS yet")
    click.echo(str(stored.item))


@worklist_group.command("remove")
@with_config
@click.argument("item_ids", nargs=-1, required=True, type=int)
@pass_state
def remove_cmd(state: CliState, item_ids: tuple[int, ...]) -> None:
    """Remove the worklist items ITEM_IDS (as `worklist list` numbers them). Exits 2 when one
    of them did not exist (the others are removed)."""
    with _worklist(state) as worklist:
        existing = {s.id for s in worklist.items(item_ids)}
        removed = worklist.remove(existing) if existing else 0
    click.echo(f"removed {removed} item{'' if removed == 1 else 's'}")
    missing = sorted(set(item_ids) - existing)
    if missing:
        _fail(f"no worklist item {', '.join(map(str, missing))}")


# --- query (SCU) --------------------------------------------------------------------------------


def _identifier(elements: list[DataElement], defaults: bool) -> tuple[Dataset, list[Any]]:
    """The worklist identifier for ``elements`` (step attributes go inside the Scheduled
    Procedure Step Sequence item) and the table columns, in the order given."""
    top, step = Dataset(), Dataset()
    for element in elements:
        if element.tag == _STEP:
            continue
        (step if element.keyword in STEP_KEYWORDS else top)[element.tag] = element
    if defaults:
        for keyword in DEFAULT_KEYS:
            tag = Tag(keyword)
            target = step if keyword in STEP_KEYWORDS else top
            if tag not in target:
                target[tag] = DataElement(tag, dictionary_VR(tag), None)
    top[_STEP] = DataElement(_STEP, "SQ", Sequence([step]))
    columns = [e.tag for e in elements if e.tag not in (_STEP, Tag("SpecificCharacterSet"))]
    if defaults:
        columns += [Tag(k) for k in DEFAULT_KEYS]
    return top, list(dict.fromkeys(columns))


@worklist_group.command("query")
@with_config
@tls_option
@click.argument("peer")
@key_option(
    "A query key as findscu -k takes it (Keyword=Value; no value: return it). Attributes "
    "of the scheduled step (Modality, ScheduledStationAETitle, ...) go into the Scheduled "
    "Procedure Step Sequence item by themselves. Repeatable."
)
@click.option("--modality", help="Only steps of this modality (Modality=...).")
@click.option(
    "--station", help="Only steps scheduled for this AE title (ScheduledStationAETitle=...)."
)
@click.option(
    "--date",
    "date_text",
    callback=_date_range,
    help="Only steps starting on this date: today, tomorrow, yesterday, YYYYMMDD (or "
    "YYYY-MM-DD) or a range of them, e.g. today-tomorrow, 20261201-20261207.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the answers as a DICOM JSON array.")
@pass_state
def query_cmd(
    state: CliState,
    peer: str,
    keys: list[DataElement],
    modality: str | None,
    station: str | None,
    date_text: str | None,
    as_json: bool,
) -> None:
    """Query PEER's Modality Worklist (C-FIND) and print the scheduled steps.

    Prints a table, one row per step (a column per key; without return keys, the usual
    worklist attributes), or --json a DICOM JSON array. Ctrl-C sends C-CANCEL.
    Exits 0 success, 2 failure, 3 cancelled, 4 usage error, 5 peer unreachable or refusing.
    """
    elements = list(keys)
    shortcuts = {
        "Modality": modality,
        "ScheduledStationAETitle": station,
        "ScheduledProcedureStepStartDate": date_text,
    }
    for keyword, value in shortcuts.items():
        if value is not None:
            elements = [e for e in elements if e.keyword != keyword]
            elements.append(scu.query_key(f"{keyword}={value}"))
    defaults = all(e.value not in (None, "", []) for e in elements)
    identifier, columns = _identifier(elements, defaults)
    config = _setup(state)
    target = _peer(config, peer)
    report = _run_cancellable(
        "worklist query",
        lambda cancel: scu.worklist_find(config, target, identifier, cancel=cancel),
    )
    code = _outcome("worklist query", report, state.verbosity < 0)
    count = len(report.matches)
    summary = (
        f"{count} scheduled step{'' if count == 1 else 's'} from {target.name} "
        f"in {report.elapsed:.1f} s"
    )
    rows = [_flat(m) for m in report.matches]
    _show_matches(report, columns, rows, as_json, summary, state.verbosity >= 0)
    sys.exit(code)


# --- mpps ---------------------------------------------------------------------------------------


@click.group("mpps")
def mpps_group() -> None:
    """Modality Performed Procedure Steps the node received (N-CREATE, N-SET)."""


@contextmanager
def _steps(state: CliState) -> Iterator[tuple[PerformedSteps, Config]]:
    config = state.config
    setup_logging(state.verbosity)
    index = Index(config.database, config.database_busy_timeout)
    try:
        index.open()
        yield PerformedSteps(index), config
    except IndexError_ as exc:
        click.echo(f"dicomnode: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    finally:
        index.close()


@mpps_group.command("list")
@with_config
@click.option("--json", "as_json", is_flag=True, help="One object per step, in a list.")
@pass_state
def mpps_list_cmd(state: CliState, as_json: bool) -> None:
    """List the performed procedure steps, oldest first, with the worklist items they performed."""
    with _steps(state) as (steps, _):
        found = steps.steps()
        linked = {s.sop_instance_uid: steps.linked_items(s.sop_instance_uid) for s in found}
    if as_json:
        click.echo(
            json.dumps(
                [_step_json(s, linked[s.sop_instance_uid]) for s in found],
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    if found:
        rows = [
            [
                *(_cell(s.step.get(Tag(keyword))) for keyword in _STEP_LIST_COLUMNS),
                ",".join(map(str, linked[s.sop_instance_uid])) or "-",
            ]
            for s in found
        ]
        click.echo(_text_table([*_STEP_LIST_COLUMNS, "WorklistItems"], rows))
    click.echo(f"{len(found)} performed step{'' if len(found) == 1 else 's'}")


def _step_json(step: Any, items: list[int]) -> dict[str, Any]:
    return {
        "sop_instance_uid": step.sop_instance_uid,
        "status": step.status,
        "from": step.calling_ae_title,
        "created": step.created_at,
        "updated": step.updated_at,
        "worklist_items": items,
        "attributes": step.step.to_json_dict(),
    }


@mpps_group.command("show")
@with_config
@click.argument("sop_instance_uid")
@click.option("--json", "as_json", is_flag=True, help="The step as DICOM JSON.")
@pass_state
def mpps_show_cmd(state: CliState, sop_instance_uid: str, as_json: bool) -> None:
    """Show the performed procedure step SOP_INSTANCE_UID in full."""
    with _steps(state) as (steps, _):
        found = steps.steps(sop_instance_uid)
        items = steps.linked_items(sop_instance_uid)
    if not found:
        click.echo(f"dicomnode mpps: no performed procedure step {sop_instance_uid}", err=True)
        sys.exit(ExitCode.FAILURE)
    step = found[0]
    if as_json:
        click.echo(json.dumps(_step_json(step, items), ensure_ascii=False, indent=2))
        return
    click.echo(
        f"performed procedure step {step.sop_instance_uid}: {step.status} (from "
        f"{step.calling_ae_title}, created {step.created_at}, updated {step.updated_at})"
    )
    click.echo(
        f"worklist items: {', '.join(map(str, items))}" if items else "no worklist item linked"
    )
    click.echo(str(step.step))


COMMANDS: list[click.Command] = [worklist_group, mpps_group]
