"""``dicomnode worklist query`` (our Modality Worklist SCU) against DCMTK wlmscpfs.

wlmscpfs serves worklist files written with pydicom, one scheduled step each, once for the
module. The CLI runs as a subprocess, exactly as a user runs it; the queries that only read
run side by side (each its own process and association) to keep the module fast; the one
whose association is refused runs alone.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.support.dcmtk import Endpoint, free_port, require_dcmtk
from tests.support.node import write_config
from tests.support.worklist import item, wlmscpfs, write_wl
from tests.test_scu import run_cli

AET = "WLMSCP"
STEP = "ScheduledProcedureStepSequence"
SUMMARY = re.compile(r"^(\d+) scheduled steps? from (\S+) in \d+\.\d s$", re.MULTILINE)


@dataclass(frozen=True)
class Scheduled:
    """One worklist file wlmscpfs serves: the values the answers must carry."""

    patient_id: str
    patient_name: str
    accession: str
    modality: str
    station: str
    date: str
    time: str
    step_id: str
    procedure_id: str

    def dataset(self) -> Dataset:
        return item(
            {
                "Modality": self.modality,
                "ScheduledStationAETitle": self.station,
                "ScheduledProcedureStepStartDate": self.date,
                "ScheduledProcedureStepStartTime": self.time,
                "ScheduledProcedureStepID": self.step_id,
                "ScheduledProcedureStepDescription": f"{self.modality} step {self.step_id}",
            },
            PatientName=self.patient_name,
            PatientID=self.patient_id,
            AccessionNumber=self.accession,
            RequestedProcedureID=self.procedure_id,
        )

    def columns(self) -> dict[str, str]:
        """What a table row of this step shows, by column."""
        return {
            "PatientID": self.patient_id,
            "PatientName": self.patient_name,
            "AccessionNumber": self.accession,
            "Modality": self.modality,
            "ScheduledStationAETitle": self.station,
            "ScheduledProcedureStepStartDate": self.date,
            "ScheduledProcedureStepStartTime": self.time,
            "ScheduledProcedureStepID": self.step_id,
            "ScheduledProcedureStepStatus": "SCHEDULED",
            "ScheduledProcedureStepDescription": f"{self.modality} step {self.step_id}",
            "RequestedProcedureID": self.procedure_id,
        }


SCHEDULE = (
    Scheduled("P1", "DOE^JOHN", "ACC1", "CT", "CT1", "20300115", "093000", "SPS1", "RP1"),
    Scheduled("P2", "DOE^JANE", "ACC2", "MR", "MR1", "20300116", "100000", "SPS2", "RP2"),
    Scheduled("P3", "SMITH^ANNA", "ACC3", "CT", "CT2", "20300120", "110000", "SPS3", "RP3"),
    # ISO_IR 100 on disk; wlmscpfs compares names byte for byte, so this one is only shown.
    Scheduled("P4", "Bäcker^Jörg", "ACC4", "US", "US1", "20300116", "080000", "SPS4", "RP4"),
)
BY_ID = {s.patient_id: s for s in SCHEDULE}
# The columns a query without return keys shows (every step attribute plus who and what).
DEFAULT_COLUMNS = {
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledStationName",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepStatus",
}


@dataclass(frozen=True)
class Peer:
    endpoint: Endpoint
    config: Path  # names it as peer "MWL"
    unreachable: str  # AET@host:port where nobody listens


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    require_dcmtk("wlmscpfs")
    root = tmp_path_factory.mktemp("mwl")
    folder = root / "worklists"
    for scheduled in SCHEDULE:
        write_wl(scheduled.dataset(), folder / AET / f"{scheduled.patient_id}.wl")
    assert b"B\xe4cker^J\xf6rg" in (folder / AET / "P4.wl").read_bytes()
    with wlmscpfs(folder, AET, log_path=root / "wlmscpfs.log") as endpoint:
        config = write_config(
            root / "node",
            ae_title="DNWLSCU",
            peers={"MWL": {"ae_title": endpoint.aet, "host": endpoint.host, "port": endpoint.port}},
        )
        yield Peer(endpoint, config, f"NOBODY@{endpoint.host}:{free_port()}")


def table(stdout: str) -> list[dict[str, str]]:
    """The rows of a printed table, by column header (columns as the dashes line spans them)."""
    lines = stdout.rstrip("\n").splitlines()
    assert len(lines) >= 2, stdout
    starts: list[int | None] = [m.start() for m in re.finditer(r"-+", lines[1])]
    starts.append(None)
    headers = [lines[0][a:b].strip() for a, b in itertools.pairwise(starts)]
    assert lines[1].replace("-", "").strip() == "" and headers == lines[0].split(), stdout
    return [
        {
            h: line[a:b].strip()
            for h, (a, b) in zip(headers, itertools.pairwise(starts), strict=True)
        }
        for line in lines[2:]
    ]


# --- the queries, run side by side -------------------------------------------------------------

# name -> (arguments after "worklist query": "{address}" is the peer's AET@host:port), and for
# the queries that succeed with a table, the patient IDs of the steps they must answer.
QUERIES: dict[str, tuple[list[str], set[str]]] = {
    "no keys": (["{address}"], {"P1", "P2", "P3", "P4"}),
    "modality": (["{address}", "--modality", "CT"], {"P1", "P3"}),
    "station": (["{address}", "--station", "MR1"], {"P2"}),
    "single date": (["{address}", "--date", "20300116"], {"P2", "P4"}),
    "date range": (["{address}", "--date", "20300115-20300116"], {"P1", "P2", "P4"}),
    "open date range": (["{address}", "--date", "20300116-"], {"P2", "P3", "P4"}),
    "patient name wildcard": (["{address}", "-k", "PatientName=DOE*"], {"P1", "P2"}),
    "step keys given with -k": (
        ["{address}", "-k", "Modality=CT", "-k", "ScheduledStationAETitle=CT2"],
        {"P3"},
    ),
    "modality and date": (["{address}", "--modality", "CT", "--date", "20300101-20300115"], {"P1"}),
    "nothing matches": (["{address}", "--station", "NOWHERE"], set()),
}
OTHER_RUNS: dict[str, list[str]] = {
    "return keys": [
        "{address}",
        *("-k", "PatientName=DOE*", "-k", "PatientID", "-k", "ScheduledProcedureStepStartDate"),
    ],
    "json": ["{address}", "--json"],
    "peer by name": ["MWL", "--modality", "MR", "--json"],
    "dashed date": ["{address}", "--date", "2030-01-16"],
    "unreachable": ["{unreachable}"],
    "unknown keyword": ["{address}", "-k", "PatientFavouriteColour=blue"],
}


@pytest.fixture(scope="module")
def answered(peer: Peer) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every run of QUERIES and OTHER_RUNS, side by side (a process and association each)."""
    runs = {name: args for name, (args, _) in QUERIES.items()} | OTHER_RUNS
    fields = {
        "address": peer.endpoint.address,
        "unreachable": peer.unreachable,
    }
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {
            name: pool.submit(
                run_cli,
                "worklist",
                "query",
                *(a.format(**fields) for a in args),
                config=peer.config,
            )
            for name, args in runs.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(QUERIES))
def test_query_answers_the_matching_steps(
    answered: dict[str, subprocess.CompletedProcess[str]], peer: Peer, name: str
) -> None:
    done = answered[name]
    expected = QUERIES[name][1]
    assert done.returncode == 0, done.stderr
    summary = SUMMARY.search(done.stderr)
    assert summary is not None, done.stderr
    assert (int(summary[1]), summary[2]) == (len(expected), peer.endpoint.address)
    if not expected:
        assert done.stdout == ""
        return
    found = table(done.stdout)
    assert sorted(row["PatientID"] for row in found) == sorted(expected)
    assert set(found[0]) >= DEFAULT_COLUMNS  # every key had a value: the usual columns too
    for row in found:
        want = BY_ID[row["PatientID"]].columns()
        assert {k: row[k] for k in want} == want


def test_query_table_columns(answered: dict[str, subprocess.CompletedProcess[str]]) -> None:
    assert set(answered["no keys"].stdout.splitlines()[0].split()) == DEFAULT_COLUMNS
    header = answered["step keys given with -k"].stdout.splitlines()[0].split()
    assert header[:2] == ["Modality", "ScheduledStationAETitle"]  # the keys given come first


def test_query_with_return_keys_shows_only_them(
    answered: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    done = answered["return keys"]
    assert done.returncode == 0, done.stderr
    found = table(done.stdout)
    assert list(found[0]) == ["PatientName", "PatientID", "ScheduledProcedureStepStartDate"]
    assert sorted((r["PatientID"], r["ScheduledProcedureStepStartDate"]) for r in found) == [
        ("P1", "20300115"),
        ("P2", "20300116"),
    ]


def test_query_json_has_the_step_inside_its_sequence(
    answered: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    done = answered["json"]
    assert done.returncode == 0, done.stderr
    answers = [Dataset.from_json(a) for a in json.loads(done.stdout)]
    assert sorted(ds.PatientID for ds in answers) == ["P1", "P2", "P3", "P4"]
    for ds in answers:
        scheduled = BY_ID[ds.PatientID]
        assert str(ds.PatientName) == scheduled.patient_name
        assert (ds.AccessionNumber, ds.RequestedProcedureID) == (
            scheduled.accession,
            scheduled.procedure_id,
        )
        for keyword in ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepID"):
            assert keyword not in ds  # step attributes only inside the step
        (step,) = ds[STEP].value
        assert step.Modality == scheduled.modality
        assert step.ScheduledStationAETitle == scheduled.station
        assert step.ScheduledProcedureStepStartDate == scheduled.date
        assert step.ScheduledProcedureStepStartTime == scheduled.time
        assert step.ScheduledProcedureStepID == scheduled.step_id
        assert step.ScheduledProcedureStepStatus == "SCHEDULED"
    (latin,) = [ds for ds in answers if ds.PatientID == "P4"]
    assert str(latin.PatientName) == "Bäcker^Jörg"  # ISO_IR 100 at the peer, decoded
    assert "Bäcker^Jörg" in done.stdout  # and written as such, not as \u escapes


def test_query_a_configured_peer_by_name(
    answered: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    done = answered["peer by name"]
    assert done.returncode == 0, done.stderr
    (answer,) = [Dataset.from_json(a) for a in json.loads(done.stdout)]
    assert answer.PatientID == "P2"
    assert answer[STEP].value[0].Modality == "MR"


def test_query_date_written_with_dashes(
    answered: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    done = answered["dashed date"]
    assert done.returncode == 0, done.stderr
    assert sorted(r["PatientID"] for r in table(done.stdout)) == ["P2", "P4"]


# --- failures ----------------------------------------------------------------------------------


def test_query_an_unreachable_peer_exits_5(
    answered: dict[str, subprocess.CompletedProcess[str]], peer: Peer
) -> None:
    done = answered["unreachable"]
    assert done.returncode == 5, (done.stdout, done.stderr)
    port = peer.unreachable.rpartition(":")[2]
    assert "cannot connect" in done.stderr and f"port {port}" in done.stderr
    assert done.stdout == ""


def test_query_refused_association_exits_5(peer: Peer) -> None:
    # Run alone: wlmscpfs closes the connection right after its A-ASSOCIATE-RJ, and under load
    # the reset can overtake the rejection (then the association reads as aborted: exit 5 too).
    endpoint = peer.endpoint
    address = f"NOTWLMSCP@{endpoint.host}:{endpoint.port}"  # a called AE title it does not serve
    done = run_cli("worklist", "query", address, config=peer.config)
    assert done.returncode == 5, (done.stdout, done.stderr)
    assert address in done.stderr
    assert (
        "rejected the association" in done.stderr
        or "aborted the association request" in done.stderr
    ), done.stderr
    assert done.stdout == ""


def test_query_unknown_keyword_is_a_usage_error(
    answered: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    done = answered["unknown keyword"]
    assert done.returncode == 4, (done.stdout, done.stderr)
    assert "PatientFavouriteColour" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("date", ["garbage", "20261301", "2026-12-02-2026-12-03-2026"])
def test_query_date_that_is_no_date_is_a_usage_error(peer: Peer, date: str) -> None:
    done = run_cli("worklist", "query", peer.endpoint.address, "--date", date, config=peer.config)
    assert done.returncode == 4, (done.stdout, done.stderr)
    assert f"'{date}': give today, tomorrow, yesterday, a date" in done.stderr
    assert done.stdout == ""
