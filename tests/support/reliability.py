"""The figures behind the reliability report: each robustness test records its scenario, what the
node did and the counts of the run (kills survived, cases run, connections held), so that the
report is produced by the suite, not typed by hand.

Records are JSON lines appended to ``var/reliability/results.jsonl`` under the repository (or
``$DICOMNODE_RELIABILITY``); appends are one write each, so parallel tests may record. A test
records only after its assertions passed: a failed scenario leaves no figures. The file is
emptied when a test session starts and rendered (:func:`render`) when it ends, to
``var/reliability/report.md``, or to ``$DICOMNODE_RELIABILITY_REPORT`` (``docs/reliability.md``
is such a rendering of a whole-suite run, committed as the suite wrote it).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "var" / "reliability" / "results.jsonl"


REPORT = REPO / "var" / "reliability" / "report.md"


def results_path() -> Path:
    return Path(os.environ.get("DICOMNODE_RELIABILITY", RESULTS))


def record(scenario: str, behaviour: str, **figures: int | float | str) -> None:
    """Note that ``scenario`` held: ``behaviour`` says in a sentence what the node did (e.g.
    "every acknowledged instance present and byte-identical after restart"), ``figures`` the
    counts of this run."""
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "scenario": scenario,
        "behaviour": behaviour,
        "figures": figures,
    }
    line = json.dumps(entry, ensure_ascii=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def start_session() -> None:
    """A test session begins: the figures of earlier sessions are dropped."""
    results_path().unlink(missing_ok=True)


def finish_session(command: str) -> Path | None:
    """A test session ended: render what it recorded; the report's path (None if nothing)."""
    path = results_path()
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not records:
        return None
    report = Path(os.environ.get("DICOMNODE_RELIABILITY_REPORT", REPORT))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render(records, command), encoding="utf-8")
    return report


def render(records: list[dict[str, object]], command: str) -> str:
    """The report: one row per scenario (in the order they ran), what the node did, the
    counts of the run."""
    when = min(str(r["time"]) for r in records)
    lines = [
        "# Reliability: what the node survives",
        "",
        "Written by the test suite (`tests/support/reliability.py`), not by hand: each",
        "robustness test records its scenario, what the node did and its counts once its",
        "assertions passed. A scenario missing here did not run or did not pass.",
        "",
        f"Run: {when} (UTC), `{command}`.",
        "",
        "| scenario | what the node did | figures of the run |",
        "|---|---|---|",
    ]
    for r in records:
        figures = r.get("figures") or {}
        assert isinstance(figures, dict)
        shown = ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in figures.items())
        lines.append(f"| {r['scenario']} | {r['behaviour']} | {shown} |")
    return "\n".join(lines) + "\n"
