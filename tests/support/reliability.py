"""The figures behind the reliability report: each robustness test records its scenario, what the
node did and the counts of the run (kills survived, cases run, connections held), so that the
report is produced by the suite, not typed by hand.

Records are JSON lines appended to ``var/reliability/results.jsonl`` under the repository (or
``$DICOMNODE_RELIABILITY``); appends are one write each, so parallel tests may record. A test
records only after its assertions passed: a failed scenario leaves no figures.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "var" / "reliability" / "results.jsonl"


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
