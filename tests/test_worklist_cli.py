"""``dicomnode worklist add/import/list/show/remove`` against a real SQLite index file.

The commands run as subprocesses, exactly as a user runs them; what they did is read back from
the index file with sqlite3 (table ``worklist_item``), its ``dataset`` blob decoded with
:func:`dicomnode.worklist.decode`. Where a test needs items already in the index (list, show,
remove, refused input), they are put there in this process through the index itself.

Starting a command costs about a second (pydicom's import), and most tests run one command on
an index of their own: those commands are prepared first (``@command``), then all run side by
side once per module (fixture ``ran``), each test asserting on what its own did. Tests that run
several commands in a row on one index run them themselves.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sqlite3
import subprocess
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomnode.config import load_config
from dicomnode.index import Index
from dicomnode.worklist import Worklist, decode, item_from_mapping, normalise
from tests.support.node import write_config
from tests.support.worklist import dump2dcm, item, write_wl
from tests.test_scu import run_cli

ADDED = re.compile(r"^added item (\d+): ", re.MULTILINE)
STEP = "ScheduledProcedureStepSequence"
# Items here have fixed dates: they must not expire (expiry has its own tests).
NO_EXPIRY = {"expire_after_days": 0}


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A node configuration under tmp_path (its index beside it) whose items never expire."""
    return write_config(tmp_path / "node", worklist=NO_EXPIRY)


def database(config: Path) -> Path:
    return config.parent / "index.sqlite"


def rows(config: Path) -> list[sqlite3.Row]:
    """Every worklist_item row of the index file, by id (read-only, its own connection)."""
    con = sqlite3.connect(f"file:{database(config)}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return con.execute("SELECT * FROM worklist_item ORDER BY id").fetchall()
    finally:
        con.close()


def snapshot(config: Path) -> list[tuple[int, str]]:
    """(id, patient_id) of every row; [] when there is no index file yet."""
    if not database(config).exists():
        return []
    return [(r["id"], r["patient_id"]) for r in rows(config)]


def stored(row: sqlite3.Row) -> Dataset:
    """The item data set a row holds."""
    return decode(bytes(row["dataset"]))


def step_of(ds: Dataset) -> Dataset:
    """The one Scheduled Procedure Step of a stored item."""
    steps = ds[STEP].value
    assert len(steps) == 1, f"a stored item has one step, not {len(steps)}"
    step: Dataset = steps[0]
    return step


def entry(
    patient_id: str,
    name: str = "DOE^JOHN",
    date: str = "20261202",
    time: str = "0930",
    modality: str = "CT",
    **top: Any,
) -> dict[str, Any]:
    """An item as a mapping of keywords (one step), as a YAML or JSON file holds it."""
    return {
        "PatientName": name,
        "PatientID": patient_id,
        **top,
        STEP: [
            {
                "Modality": modality,
                "ScheduledProcedureStepStartDate": date,
                "ScheduledProcedureStepStartTime": time,
            }
        ],
    }


def seed(config: Path, *mappings: dict[str, Any]) -> list[int]:
    """Create the index (schema only, or with these items) in this process; the row ids."""
    settings = load_config(config)
    index = Index(settings.database)
    index.open()
    try:
        items = [
            one
            for i, mapping in enumerate(mappings)
            for one in normalise(item_from_mapping(mapping, f"seed[{i}]"), f"seed[{i}]")
        ]
        return Worklist(settings, index).add(items) if items else []
    finally:
        index.close()


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_yaml(path: Path, data: Any) -> Path:
    return write_text(path, yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


def added_ids(stdout: str) -> list[int]:
    return [int(n) for n in ADDED.findall(stdout)]


def valid_uid(text: str) -> bool:
    return bool(text) and UID(text).is_valid


def valid_sh(text: str) -> bool:
    """A generated identifier fits its SH value: 1-16 characters, no backslash or control."""
    return 0 < len(text) <= 16 and text.isprintable() and "\\" not in text and text == text.strip()


def today() -> str:
    return dt.date.today().strftime("%Y%m%d")


def days_ago(days: int) -> str:
    return (dt.date.today() - dt.timedelta(days=days)).strftime("%Y%m%d")


# --- commands run side by side ----------------------------------------------------------------

# (config, folder for the inputs) -> the command's arguments (it writes the inputs, may seed the
# index). Arguments with their own --config are run without one in front.
Prepare = Callable[[Path, Path], list[str | Path]]
COMMANDS: dict[str, Prepare] = {}


def command(name: str) -> Callable[[Prepare], Prepare]:
    """Register a command for the module's side-by-side run, under ``name``."""

    def register(prepare: Prepare) -> Prepare:
        assert name not in COMMANDS, name
        COMMANDS[name] = prepare
        return prepare

    return register


@dataclass(frozen=True)
class Ran:
    """One command as it ran, on its own index."""

    config: Path
    inputs: Path
    before: list[tuple[int, str]]  # (id, patient_id) of the rows before it ran
    done: subprocess.CompletedProcess[str]
    dates: tuple[str, str]  # today's date (YYYYMMDD) before and after the run

    def rows(self) -> list[sqlite3.Row]:
        return rows(self.config)


def _run(config: Path, args: list[str | Path]) -> subprocess.CompletedProcess[str]:
    if "--config" in args:
        return run_cli(*args)
    return run_cli(*args, config=config)


class Runs:
    """The commands as they ran, by name; one whose preparation failed (or skipped, as
    without DCMTK's dump2dcm) raises that again for its own test only."""

    def __init__(self, runs: dict[str, Ran], errors: dict[str, BaseException]) -> None:
        self.runs = runs
        self.errors = errors

    def __getitem__(self, name: str) -> Ran:
        if name in self.errors:
            raise self.errors[name]
        return self.runs[name]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("commands")
    prepared: dict[str, tuple[Path, Path, list[str | Path], list[tuple[int, str]]]] = {}
    errors: dict[str, BaseException] = {}
    for i, (name, prepare) in enumerate(COMMANDS.items()):
        inputs = base / f"command{i}"
        config = write_config(inputs / "node", worklist=NO_EXPIRY)
        try:
            args = prepare(config, inputs)
        except (Exception, pytest.skip.Exception) as exc:
            errors[name] = exc
            continue
        prepared[name] = (config, inputs, args, snapshot(config))
    before = today()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {
            name: pool.submit(_run, config, args) for name, (config, _, args, _) in prepared.items()
        }
        done = {name: future.result() for name, future in futures.items()}
    after = today()
    runs = {
        name: Ran(config, inputs, rows_before, done[name], (before, after))
        for name, (config, inputs, _, rows_before) in prepared.items()
    }
    return Runs(runs, errors)


# --- add -------------------------------------------------------------------------------------

TWO_ITEMS_YAML = """\
# Two items; the first has two scheduled steps (it becomes two rows).
- PatientName: DOE^JOHN
  PatientID: P1
  PatientBirthDate: 19700101       # YAML reads this as a number
  AccessionNumber: ACC1
  ScheduledProcedureStepSequence:
    - Modality: CT
      ScheduledStationAETitle: CT1
      ScheduledProcedureStepStartDate: 20261202
      ScheduledProcedureStepStartTime: "0930"
      ScheduledProcedureStepDescription: CT head plain
    - Modality: MR
      ScheduledStationAETitle: MR1
      ScheduledProcedureStepStartDate: "20261203"
      ScheduledProcedureStepStartTime: "1400"
- PatientName: ROE^JANE
  PatientID: P2
  StudyInstanceUID: 1.2.826.0.1.3680043.8.498.4242
  RequestedProcedureID: RP2
  ScheduledProcedureStepSequence:
    - Modality: US
      ScheduledProcedureStepStartDate: "20261204"
      ScheduledProcedureStepStartTime: "081500"
      ScheduledProcedureStepID: SPS2
      ScheduledProcedureStepStatus: ARRIVED
"""


@command("add yaml list")
def _add_yaml_list(config: Path, inputs: Path) -> list[str | Path]:
    return ["worklist", "add", write_text(inputs / "items.yaml", TWO_ITEMS_YAML)]


def test_add_yaml_list_with_a_two_step_item_makes_a_row_per_step(ran: Runs) -> None:
    run = ran["add yaml list"]
    done = run.done
    assert done.returncode == 0, done.stderr
    found = run.rows()
    assert len(found) == 3
    assert added_ids(done.stdout) == [r["id"] for r in found]
    ct, mr, us = found
    assert [(r["patient_id"], r["modality"], r["station_aet"]) for r in found] == [
        ("P1", "CT", "CT1"),
        ("P1", "MR", "MR1"),
        ("P2", "US", ""),
    ]
    assert [(r["start_date"], r["start_time"]) for r in found] == [
        ("20261202", "0930"),
        ("20261203", "1400"),
        ("20261204", "081500"),
    ]
    # The two steps of one item: one study, one requested procedure, generated; two step ids.
    assert ct["study_uid"] == mr["study_uid"] and valid_uid(ct["study_uid"])
    assert ct["study_uid"] != us["study_uid"]
    assert ct["requested_procedure_id"] == mr["requested_procedure_id"]
    assert valid_sh(ct["requested_procedure_id"])
    assert ct["step_id"] != mr["step_id"]
    assert valid_sh(ct["step_id"]) and valid_sh(mr["step_id"])
    assert ct["step_status"] == mr["step_status"] == "SCHEDULED"
    assert ct["accession_number"] == mr["accession_number"] == "ACC1"
    assert ct["birth_date"] == "19700101"
    # What was given is kept, not generated over.
    assert us["study_uid"] == "1.2.826.0.1.3680043.8.498.4242"
    assert us["requested_procedure_id"] == "RP2"
    assert (us["step_id"], us["step_status"]) == ("SPS2", "ARRIVED")
    # The blob is the whole item, one step each, agreeing with the columns.
    for row in found:
        ds = stored(row)
        step = step_of(ds)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert (ds.PatientID, str(ds.PatientName)) == (row["patient_id"], row["patient_name"])
        assert ds.StudyInstanceUID == row["study_uid"]
        assert ds.RequestedProcedureID == row["requested_procedure_id"]
        assert step.Modality == row["modality"]
        assert step.ScheduledProcedureStepStartDate == row["start_date"]
        assert step.ScheduledProcedureStepID == row["step_id"]
        assert step.ScheduledProcedureStepStatus == row["step_status"]
        assert "Modality" not in ds  # step attributes stay inside the step
    assert step_of(stored(ct)).ScheduledProcedureStepDescription == "CT head plain"
    assert "ScheduledProcedureStepDescription" not in step_of(stored(mr))


@command("add json")
def _add_json(config: Path, inputs: Path) -> list[str | Path]:
    data = entry(
        "J1",
        "García^José",
        date="20261205",
        time="1015",
        modality="DX",
        AccessionNumber="ACCJ1",
        StudyInstanceUID="1.2.826.0.1.3680043.8.498.77",
        PatientSex="M",
    )
    data[STEP][0]["ScheduledStationAETitle"] = "DX_ROOM_2"
    return ["worklist", "add", write_text(inputs / "item.json", json.dumps(data))]


def test_add_json_file_with_keywords(ran: Runs) -> None:
    run = ran["add json"]
    assert run.done.returncode == 0, run.done.stderr
    (row,) = run.rows()
    assert added_ids(run.done.stdout) == [row["id"]]
    assert (row["patient_id"], row["patient_name"]) == ("J1", "García^José")
    assert (row["modality"], row["station_aet"]) == ("DX", "DX_ROOM_2")
    assert (row["start_date"], row["start_time"]) == ("20261205", "1015")
    assert (row["accession_number"], row["sex"]) == ("ACCJ1", "M")
    assert row["study_uid"] == "1.2.826.0.1.3680043.8.498.77"
    assert row["step_status"] == "SCHEDULED" and valid_sh(row["step_id"])
    assert str(stored(row).PatientName) == "García^José"


DICOM_JSON = {
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Ström^Åsa"}]},
    "00100020": {"vr": "LO", "Value": ["DJ1"]},
    "00080050": {"vr": "SH", "Value": ["ACCDJ"]},
    "00400100": {
        "vr": "SQ",
        "Value": [
            {
                "00080060": {"vr": "CS", "Value": ["MR"]},
                "00400001": {"vr": "AE", "Value": ["MR1"]},
                "00400002": {"vr": "DA", "Value": ["20261206"]},
                "00400003": {"vr": "TM", "Value": ["101500"]},
                "00400009": {"vr": "SH", "Value": ["SPSDJ"]},
            }
        ],
    },
}


@command("add dicom json")
def _add_dicom_json(config: Path, inputs: Path) -> list[str | Path]:
    text = json.dumps(DICOM_JSON, ensure_ascii=False)
    return ["worklist", "add", write_text(inputs / "item.dcm.json", text)]


def test_add_dicom_json(ran: Runs) -> None:
    run = ran["add dicom json"]
    assert run.done.returncode == 0, run.done.stderr
    (row,) = run.rows()
    assert added_ids(run.done.stdout) == [row["id"]]
    assert (row["patient_id"], row["patient_name"]) == ("DJ1", "Ström^Åsa")
    assert (row["modality"], row["station_aet"]) == ("MR", "MR1")
    assert (row["start_date"], row["start_time"]) == ("20261206", "101500")
    assert (row["accession_number"], row["step_id"]) == ("ACCDJ", "SPSDJ")
    assert row["step_status"] == "SCHEDULED"
    assert valid_uid(row["study_uid"]) and valid_sh(row["requested_procedure_id"])
    ds = stored(row)
    assert str(ds.PatientName) == "Ström^Åsa"
    assert step_of(ds).ScheduledStationAETitle == "MR1"


@command("add options")
def _add_options(config: Path, inputs: Path) -> list[str | Path]:
    return [
        "worklist",
        "add",
        *("--patient-name", "DOE^OPTION", "--patient-id", "O1"),
        *("--modality", "CT", "--station-aet", "CT1", "--date", "today", "--time", "0815"),
        *("--accession", "ACCO1", "--step-id", "SPSO1"),
        *("--config", config),  # after the subcommand
    ]


def test_add_from_options_with_date_today(ran: Runs) -> None:
    run = ran["add options"]
    assert run.done.returncode == 0, run.done.stderr
    (row,) = run.rows()
    assert added_ids(run.done.stdout) == [row["id"]]
    assert row["start_date"] in run.dates
    assert row["start_time"] == "0815"
    assert (row["patient_id"], row["patient_name"]) == ("O1", "DOE^OPTION")
    assert (row["modality"], row["station_aet"]) == ("CT", "CT1")
    assert (row["accession_number"], row["step_id"], row["step_status"]) == (
        "ACCO1",
        "SPSO1",
        "SCHEDULED",
    )
    assert valid_uid(row["study_uid"]) and valid_sh(row["requested_procedure_id"])
    ds = stored(row)
    assert ds.AccessionNumber == "ACCO1" and "AccessionNumber" not in step_of(ds)
    assert step_of(ds).ScheduledProcedureStepStartDate == row["start_date"]


@command("add non-ascii")
def _add_non_ascii(config: Path, inputs: Path) -> list[str | Path]:
    text = (
        "PatientName: Müller^Jürgen\n"
        "PatientID: U1\n"
        "ReferringPhysicianName: Ødegård^Åse\n"
        "RequestedProcedureDescription: Schädel nativ\n"
        "ScheduledProcedureStepSequence:\n"
        "  - Modality: CT\n"
        "    ScheduledProcedureStepStartDate: 20261202\n"
        '    ScheduledProcedureStepStartTime: "1100"\n'
    )
    return ["worklist", "add", write_text(inputs / "umlaut.yaml", text)]


def test_non_ascii_names_are_stored_as_unicode(ran: Runs) -> None:
    run = ran["add non-ascii"]
    assert run.done.returncode == 0, run.done.stderr
    assert "Müller^Jürgen" in run.done.stdout
    (row,) = run.rows()
    assert row["patient_name"] == "Müller^Jürgen"
    assert row["requested_procedure_description"] == "Schädel nativ"
    blob = bytes(row["dataset"])
    assert "Müller^Jürgen".encode() in blob  # UTF-8 in the stored data set
    assert "Müller".encode("latin-1") not in blob
    ds = decode(blob)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert str(ds.ReferringPhysicianName) == "Ødegård^Åse"
    assert ds.RequestedProcedureDescription == "Schädel nativ"


GOOD = entry("GOOD1")


@dataclass(frozen=True)
class AddRefusal:
    """``worklist add`` FILES OPTIONS that must exit with ``code`` saying ``expected``."""

    name: str
    files: dict[str, str]
    expected: tuple[str, ...]
    options: tuple[str, ...] = ()
    code: int = 2


ADD_REFUSALS = (
    AddRefusal(
        "missing PatientID",
        {"bad.yaml": yaml.safe_dump({k: v for k, v in GOOD.items() if k != "PatientID"})},
        ("bad.yaml", "PatientID is required"),
    ),
    AddRefusal(
        "missing Modality in the second step",
        {
            "bad.yaml": yaml.safe_dump(
                {
                    **GOOD,
                    STEP: [
                        GOOD[STEP][0],
                        {
                            "ScheduledProcedureStepStartDate": "20261202",
                            "ScheduledProcedureStepStartTime": "1000",
                        },
                    ],
                }
            )
        },
        ("bad.yaml", "ScheduledProcedureStepSequence[1]: Modality is required"),
    ),
    AddRefusal(
        "bad date",
        {"bad.yaml": yaml.safe_dump(entry("B1", date="2026-13-45"))},
        ("bad.yaml", "ScheduledProcedureStepStartDate", "2026-13-45"),
    ),
    AddRefusal(
        "bad date in DICOM JSON",
        {
            "bad.json": json.dumps(
                {
                    **DICOM_JSON,
                    "00400100": {
                        "vr": "SQ",
                        "Value": [
                            {
                                "00080060": {"vr": "CS", "Value": ["CT"]},
                                "00400002": {"vr": "DA", "Value": ["20261345"]},
                                "00400003": {"vr": "TM", "Value": ["1000"]},
                            }
                        ],
                    },
                }
            )
        },
        ("bad.json", "ScheduledProcedureStepStartDate", "20261345"),
    ),
    AddRefusal(
        "bad time",
        {"bad.yaml": yaml.safe_dump(entry("B3", time="2561"))},
        ("bad.yaml", "ScheduledProcedureStepStartTime", "2561"),
    ),
    AddRefusal(
        "unknown keyword",
        {"bad.yaml": yaml.safe_dump({**GOOD, "PatientFavouriteColour": "blue"})},
        ("bad.yaml", "PatientFavouriteColour", "not a DICOM keyword"),
    ),
    AddRefusal(
        "unparseable YAML",
        {"bad.yaml": "PatientName: [DOE^JOHN\nPatientID: P1\n"},
        ("bad.yaml", "neither YAML nor JSON"),
    ),
    AddRefusal(
        "second item of a list bad",
        {
            "bad.yaml": yaml.safe_dump(
                [GOOD, {k: v for k, v in entry("B4").items() if k != "PatientName"}]
            )
        },
        ("bad.yaml[1]", "PatientName is required"),
    ),
    AddRefusal(
        "second file bad",
        {
            "good.yaml": yaml.safe_dump([GOOD, entry("GOOD2")]),
            "bad.yaml": yaml.safe_dump(entry("B5", modality="")),
        },
        ("bad.yaml", "Modality is required"),
    ),
    AddRefusal(
        "files and options",
        {"good.yaml": yaml.safe_dump(GOOD)},
        ("give item files or item options, not both",),
        options=("--patient-id", "X1"),
        code=4,
    ),
    AddRefusal("neither files nor options", {}, ("give item files",), code=4),
)


def _refused_add(refusal: AddRefusal) -> Prepare:
    def prepare(config: Path, inputs: Path) -> list[str | Path]:
        seed(config, entry("SEED"))  # the index exists, with a row
        paths = [write_text(inputs / name, text) for name, text in refusal.files.items()]
        return ["worklist", "add", *paths, *refusal.options]

    return prepare


for _refusal in ADD_REFUSALS:
    command(f"refused add: {_refusal.name}")(_refused_add(_refusal))


@pytest.mark.parametrize("refusal", ADD_REFUSALS, ids=[r.name for r in ADD_REFUSALS])
def test_add_refuses_bad_input_and_adds_nothing(ran: Runs, refusal: AddRefusal) -> None:
    run = ran[f"refused add: {refusal.name}"]
    done = run.done
    assert done.returncode == refusal.code, (done.stdout, done.stderr)
    for fragment in refusal.expected:
        assert fragment in done.stderr
    if refusal.code == 2:
        assert done.stderr.strip().endswith("nothing added")
    assert "Traceback" not in done.stderr
    assert added_ids(done.stdout) == []
    assert [p for _, p in run.before] == ["SEED"]
    assert snapshot(run.config) == run.before


@command("add unquoted invalid date")
def _add_unquoted_invalid_date(config: Path, inputs: Path) -> list[str | Path]:
    seed(config)
    text = (
        "PatientName: DOE^JOHN\n"
        "PatientID: P1\n"
        "ScheduledProcedureStepSequence:\n"
        "  - Modality: CT\n"
        "    ScheduledProcedureStepStartDate: 2026-13-45\n"
        '    ScheduledProcedureStepStartTime: "0930"\n'
    )
    return ["worklist", "add", write_text(inputs / "bad.yaml", text)]


def test_add_unquoted_invalid_yaml_date_is_refused(ran: Runs) -> None:
    run = ran["add unquoted invalid date"]
    assert run.rows() == []
    assert "Traceback" not in run.done.stderr
    assert run.done.returncode == 2, run.done.stderr
    assert "bad.yaml" in run.done.stderr
    assert run.done.stderr.strip().endswith("nothing added")


@command("add leading zeros")
def _add_leading_zeros(config: Path, inputs: Path) -> list[str | Path]:
    seed(config)
    text = (
        "PatientName: DOE^JOHN\n"
        "PatientID: 001234\n"
        "ScheduledProcedureStepSequence:\n"
        "  - Modality: CT\n"
        "    ScheduledProcedureStepStartDate: 20261202\n"
        "    ScheduledProcedureStepStartTime: 0020\n"
    )
    return ["worklist", "add", write_text(inputs / "zeros.yaml", text)]


def test_add_never_changes_a_yaml_value_with_leading_zeros(ran: Runs) -> None:
    run = ran["add leading zeros"]
    found = [(r["patient_id"], r["start_time"]) for r in run.rows()]
    # Either the values as written, or refused naming them: never other values.
    if run.done.returncode == 0:
        assert found == [("001234", "0020")]
    else:
        assert run.done.returncode == 2 and found == [], (run.done.stderr, found)


# --- import ----------------------------------------------------------------------------------

DUMP = """\
# A worklist file as DCMTK's examples make them (Latin-1 text).
(0008,0005) CS [ISO_IR 100]
(0010,0010) PN [Bäcker^Ödön]
(0010,0020) LO [D1]
(0010,0030) DA [19800229]
(0008,0050) SH [ACCD1]
(0040,0100) SQ (Sequence with explicit length #=1)
  (fffe,e000) na (Item with explicit length #=4)
    (0008,0060) CS [US]
    (0040,0001) AE [US1]
    (0040,0002) DA [20261207]
    (0040,0003) TM [1100]
  (fffe,e00d) na (ItemDelimitationItem for re-encoding)
(fffe,e0dd) na (SequenceDelimitationItem for re-encoding)
"""


@command("import folder")
def _import_folder(config: Path, inputs: Path) -> list[str | Path]:
    """Two pydicom-written worklist files (one in a subfolder) and one made by dump2dcm."""
    folder = inputs / "worklists"
    latin = write_wl(
        item(PatientName="Müller^Jürgen", PatientID="L1", charset="ISO_IR 100"), folder / "a.wl"
    )
    assert b"M\xfcller^J\xfcrgen" in latin.read_bytes()  # Latin-1 on disk, really
    write_wl(
        item(
            PatientID="L2",
            AccessionNumber="ACCL2",
            step={
                "Modality": "MR",
                "ScheduledStationAETitle": "MR1",
                "ScheduledProcedureStepID": "S2",
            },
        ),
        folder / "sub" / "b.wl",
    )
    dumped = dump2dcm(DUMP, folder / "c.wl")
    assert b"B\xe4cker^\xd6d\xf6n" in dumped.read_bytes()
    write_text(folder / "notes.txt", "not a worklist file\n")
    return ["worklist", "import", folder]


def test_import_folder_of_worklist_files(ran: Runs) -> None:
    run = ran["import folder"]
    done = run.done
    assert done.returncode == 0, done.stderr
    assert "imported 3 item(s) from 3 file(s)" in done.stdout
    found = {r["patient_id"]: r for r in run.rows()}
    assert sorted(found) == ["D1", "L1", "L2"]
    assert sorted(added_ids(done.stdout)) == sorted(r["id"] for r in found.values())
    latin, plain, dumped = found["L1"], found["L2"], found["D1"]
    assert latin["patient_name"] == "Müller^Jürgen"
    assert dumped["patient_name"] == "Bäcker^Ödön"
    for row, name in ((latin, "Müller^Jürgen"), (dumped, "Bäcker^Ödön")):
        blob = bytes(row["dataset"])
        assert name.encode() in blob
        ds = decode(blob)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == name
    assert (plain["modality"], plain["station_aet"], plain["step_id"]) == ("MR", "MR1", "S2")
    assert plain["accession_number"] == "ACCL2"
    assert (latin["modality"], latin["start_date"], latin["start_time"]) == (
        "CT",
        "20261202",
        "093000",
    )
    # The dump2dcm file had no identifiers: generated, and the step SCHEDULED.
    assert (dumped["modality"], dumped["station_aet"]) == ("US", "US1")
    assert (dumped["start_date"], dumped["start_time"]) == ("20261207", "1100")
    assert (dumped["accession_number"], dumped["birth_date"]) == ("ACCD1", "19800229")
    assert valid_uid(dumped["study_uid"])
    assert valid_sh(dumped["step_id"]) and valid_sh(dumped["requested_procedure_id"])
    assert dumped["step_status"] == "SCHEDULED"
    assert step_of(stored(dumped)).ScheduledProcedureStepStatus == "SCHEDULED"


def _truncated(folder: Path) -> Path:
    whole = write_wl(item(PatientID="T1"), folder / "whole.tmp").read_bytes()
    path = folder / "truncated.wl"
    path.write_bytes(whole[: len(whole) * 2 // 3])  # cut inside the data set
    return path


def _text(folder: Path) -> Path:
    return write_text(folder / "x.wl", "PatientName: DOE^JOHN\nthis is a text file, not DICOM\n")


def _no_patient_name(folder: Path) -> Path:
    ds = item(PatientID="N1")
    del ds.PatientName
    return write_wl(ds, folder / "noname.wl")


def _bad_date(folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom's, on the invalid date
        ds = item(PatientID="D1", step={"ScheduledProcedureStepStartDate": "20261345"})
    return write_wl(ds, folder / "wrongdate.wl")


@dataclass(frozen=True)
class ImportRefusal:
    """``worklist import`` of a folder with two good files and the one ``make_bad`` writes
    (named to sort after them), or of the good files and the bad one by name."""

    name: str
    make_bad: Callable[[Path], Path]
    reason: str
    by_name: bool = False


IMPORT_REFUSALS = (
    ImportRefusal("truncated", _truncated, "not a readable DICOM data set"),
    ImportRefusal("text file", _text, "not a readable DICOM data set"),
    ImportRefusal("no PatientName", _no_patient_name, "PatientName is required"),
    ImportRefusal("bad date", _bad_date, "20261345"),
    ImportRefusal("truncated, by name", _truncated, "not a readable DICOM data set", True),
)
GOOD_FILES = ("a.wl", "b.wl")


def _refused_import(refusal: ImportRefusal) -> Prepare:
    def prepare(config: Path, inputs: Path) -> list[str | Path]:
        seed(config)  # the index exists, empty
        folder = inputs / "worklists"
        good = [write_wl(item(PatientID=f"G{i}"), folder / n) for i, n in enumerate(GOOD_FILES)]
        bad = refusal.make_bad(folder)
        assert bad.parent == folder and bad.name > max(GOOD_FILES)
        return ["worklist", "import", *([*good, bad] if refusal.by_name else [folder])]

    return prepare


for _import_refusal in IMPORT_REFUSALS:
    command(f"refused import: {_import_refusal.name}")(_refused_import(_import_refusal))


@pytest.mark.parametrize("refusal", IMPORT_REFUSALS, ids=[r.name for r in IMPORT_REFUSALS])
def test_import_with_one_bad_file_imports_nothing(ran: Runs, refusal: ImportRefusal) -> None:
    run = ran[f"refused import: {refusal.name}"]
    done = run.done
    folder = run.inputs / "worklists"
    (bad,) = [p for p in folder.glob("*.wl") if p.name not in GOOD_FILES]
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert str(bad) in done.stderr
    assert not any(str(folder / name) in done.stderr for name in GOOD_FILES)
    assert refusal.reason in done.stderr
    assert done.stderr.strip().endswith("nothing imported")
    assert "Traceback" not in done.stderr
    assert added_ids(done.stdout) == []
    assert database(run.config).exists() and run.rows() == []


# --- list / show / remove ---------------------------------------------------------------------

LISTED = (
    entry("L-LATE", "LATE^PAT", date="20261210", time="0800", AccessionNumber="ACC-LATE"),
    entry("L-EARLY", "Müller^Jürgen", date="20261201", time="1600", AccessionNumber="ACC-EARLY"),
    entry("L-MID", "MID^PAT", date="20261205", time="0700", modality="MR"),
)


def _listed(*args: str) -> Prepare:
    """A command on an index holding LISTED; {early} in ``args`` is L-EARLY's id."""

    def prepare(config: Path, inputs: Path) -> list[str | Path]:
        early = seed(config, *LISTED)[1]
        return ["worklist", *(a.format(early=early) for a in args)]

    return prepare


command("list")(_listed("list"))
command("list json")(_listed("list", "--json"))
command("show")(_listed("show", "{early}"))
command("show json")(_listed("show", "{early}", "--json"))
command("show unknown")(_listed("show", "999"))


def ids_of(run: Ran) -> dict[str, int]:
    return {patient_id: row_id for row_id, patient_id in run.before}


def test_list_shows_every_item_in_scheduled_order(ran: Runs) -> None:
    run = ran["list"]
    ids = ids_of(run)
    assert run.done.returncode == 0, run.done.stderr
    lines = run.done.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "ScheduledProcedureStepStartDate"]
    assert "PatientID" in lines[0].split()
    assert lines[-1] == "3 items"
    body = lines[2:-1]
    assert [line.split()[0] for line in body] == [
        str(ids["L-EARLY"]),
        str(ids["L-MID"]),
        str(ids["L-LATE"]),
    ]
    assert [line.split()[1] for line in body] == ["20261201", "20261205", "20261210"]
    assert "L-EARLY" in body[0] and "L-MID" in body[1] and "L-LATE" in body[2]
    assert "Müller^Jürgen" in body[0] and "ACC-EARLY" in body[0] and "SCHEDULED" in body[0]
    assert snapshot(run.config) == run.before


def test_list_json_is_a_list_of_id_and_item(ran: Runs) -> None:
    run = ran["list json"]
    ids = ids_of(run)
    assert run.done.returncode == 0, run.done.stderr
    entries = json.loads(run.done.stdout)
    assert isinstance(entries, list)
    assert [e["id"] for e in entries] == [ids["L-EARLY"], ids["L-MID"], ids["L-LATE"]]
    by_id = {r["id"]: r for r in run.rows()}
    for e in entries:
        ds = Dataset.from_json(e["item"])
        assert ds.PatientID == by_id[e["id"]]["patient_id"]
        assert step_of(ds).ScheduledProcedureStepID == by_id[e["id"]]["step_id"]
        assert e["item"] == stored(by_id[e["id"]]).to_json_dict()
    assert str(Dataset.from_json(entries[0]["item"]).PatientName) == "Müller^Jürgen"


def test_show_an_item_as_text(ran: Runs) -> None:
    run = ran["show"]
    early = ids_of(run)["L-EARLY"]
    (row,) = [r for r in run.rows() if r["id"] == early]
    assert run.done.returncode == 0, run.done.stderr
    text = run.done.stdout
    assert text.startswith(f"worklist item {early} ")
    for value in ("Müller^Jürgen", "L-EARLY", "ACC-EARLY", row["study_uid"], row["step_id"]):
        assert value in text
    assert "Scheduled Procedure Step Sequence" in text
    assert "L-MID" not in text and "L-LATE" not in text


def test_show_an_item_as_json(ran: Runs) -> None:
    run = ran["show json"]
    early = ids_of(run)["L-EARLY"]
    (row,) = [r for r in run.rows() if r["id"] == early]
    assert run.done.returncode == 0, run.done.stderr
    data = json.loads(run.done.stdout)
    assert data["id"] == early
    ds = Dataset.from_json(data["item"])
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert ds.StudyInstanceUID == row["study_uid"]
    step = step_of(ds)
    assert (step.Modality, step.ScheduledProcedureStepStartDate) == ("CT", "20261201")
    assert step.ScheduledProcedureStepStartTime == "1600"
    assert data["item"] == stored(row).to_json_dict()


def test_show_an_unknown_item(ran: Runs) -> None:
    run = ran["show unknown"]
    assert 999 not in ids_of(run).values()
    assert run.done.returncode == 2
    assert "no worklist item 999" in run.done.stderr
    assert run.done.stdout == ""


def test_remove_items(config: Path) -> None:
    late, early, mid = seed(config, *LISTED)
    done = run_cli("worklist", "remove", str(late), str(early), config=config)
    assert done.returncode == 0, done.stderr
    assert "removed 2 items" in done.stdout
    assert [r["id"] for r in rows(config)] == [mid]

    missing = mid + 100
    partly = run_cli("worklist", "remove", str(missing), str(mid), config=config)
    assert partly.returncode == 2
    assert f"no worklist item {missing}" in partly.stderr
    assert "removed 1 item" in partly.stdout
    assert rows(config) == []  # the existing one is removed all the same


# --- expiry ----------------------------------------------------------------------------------


def test_expired_items_are_removed_by_the_next_command(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node", worklist={"expire_after_days": 7})
    source = write_yaml(
        tmp_path / "dated.yaml",
        [
            entry("E-30", date=days_ago(30)),
            entry("E-8", date=days_ago(8)),
            entry("E-7", date=days_ago(7)),
            entry("E-0", date=days_ago(0)),
        ],
    )
    done = run_cli("worklist", "add", source, config=config)
    assert done.returncode == 0, done.stderr
    assert sorted(r["patient_id"] for r in rows(config)) == ["E-0", "E-30", "E-7", "E-8"]

    listed = run_cli("-v", "worklist", "list", config=config)
    assert listed.returncode == 0, listed.stderr
    cutoff = (dt.date.today() - dt.timedelta(days=7)).isoformat()
    assert re.search(
        rf"\bINFO\b.*\b2 item\(s\) scheduled before {cutoff} expired", listed.stderr
    ), listed.stderr
    assert sorted(r["patient_id"] for r in rows(config)) == ["E-0", "E-7"]
    assert "E-30" not in listed.stdout and "E-8" not in listed.stdout
    assert "E-7" in listed.stdout and "E-0" in listed.stdout
    assert listed.stdout.splitlines()[-1] == "2 items"


@command("list without expiry")
def _list_without_expiry(config: Path, inputs: Path) -> list[str | Path]:
    seed(config, entry("K-OLD", date=days_ago(3650)), entry("K-NOW", date=today()))
    return ["-v", "worklist", "list"]


def test_expire_after_zero_days_keeps_everything(ran: Runs) -> None:
    run = ran["list without expiry"]
    assert load_config(run.config).worklist.expire_after_days == 0
    assert sorted(p for _, p in run.before) == ["K-NOW", "K-OLD"]
    assert run.done.returncode == 0, run.done.stderr
    assert "expired" not in run.done.stderr
    assert snapshot(run.config) == run.before
    assert "K-OLD" in run.done.stdout and run.done.stdout.splitlines()[-1] == "2 items"


@pytest.mark.parametrize(
    "options",
    [["-F", "+ti"], ["-F", "+te"], ["+tb"]],
    ids=["bare implicit", "bare explicit", "big endian"],
)
def test_import_bare_data_sets_and_other_syntaxes(
    config: Path, tmp_path: Path, options: list[str]
) -> None:
    """dump2dcm -F writes the data set alone (no preamble, no File Meta), as older worklist
    tools keep them; the syntax is then told by the first element. +tb: explicit big endian
    (retired, but readable), named in the File Meta."""
    source = tmp_path / "item.wl"
    dump2dcm(DUMP, tmp_path / "from-dump.wl")
    done = subprocess.run(
        ["dump2dcm", *options, str(tmp_path / "from-dump.dump"), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (source.read_bytes()[128:132] == b"DICM") is ("-F" not in options)
    imported = run_cli("worklist", "import", source, config=config)
    assert imported.returncode == 0, imported.stderr
    (row,) = rows(config)
    assert (row["patient_name"], row["patient_id"], row["modality"]) == ("Bäcker^Ödön", "D1", "US")
    assert str(stored(row).PatientBirthDate) == "19800229"
