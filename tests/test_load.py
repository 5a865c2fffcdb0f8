"""Load: sustained ingest from several concurrent senders with nothing lost, and the node's
memory, open files and threads flat from start to end; queries and retrievals answered
correctly while it runs.

Bounded by time: ``DICOMNODE_LOAD_SECONDS`` (default 30) of ingest, in rounds; each round every
sender opens an association, stores a batch of new instances and releases. Between rounds (no
association open) the node's resident memory, descriptors and threads are sampled; the last
sample may exceed the first only by generous bounds (a leak of one descriptor or thread per
association, or a few KiB per instance, would pass them within minutes).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.status import Status
from tests.conftest import require_dcmtk
from tests.support.dcmtk import DCMTK_ENV
from tests.support.node import RunningNode, run_node
from tests.support.qr import Patient, find, identifier, move, receiver, store, study
from tests.support.reliability import record

SECONDS = float(os.environ.get("DICOMNODE_LOAD_SECONDS", "30"))
SENDERS = 4
BATCH = 10  # instances per association
RETRIEVERS = ["echo", "store", "find", "move", "get"]
# Growth allowed from the first between-rounds sample to the last.
RSS_GROWTH = 64 * 1024**2
FD_GROWTH = 16
THREAD_GROWTH = 8
SETTLE = 15.0  # seconds for the last association threads to end after a round
TRAILING_PADDING = 0xFFFCFFFC  # (FFFC,FFFC) Data Set Trailing Padding


def node_processes(node: RunningNode) -> list[psutil.Process]:
    main = psutil.Process(node.proc.pid)
    return [main, *main.children(recursive=True)]


def sample(node: RunningNode) -> tuple[int, int, int]:
    """(resident bytes, open descriptors, threads) of the node, all processes together."""
    rss = fds = threads = 0
    for proc in node_processes(node):
        with proc.oneshot():
            rss += proc.memory_info().rss
            fds += proc.num_fds()
            threads += proc.num_threads()
    return rss, fds, threads


def settled(node: RunningNode, baseline_threads: int) -> tuple[int, int, int]:
    """A sample once the association threads of the round have ended (bounded wait)."""
    deadline = time.monotonic() + SETTLE
    now = sample(node)
    while now[2] > baseline_threads and time.monotonic() < deadline:
        time.sleep(0.1)
        now = sample(node)
    return now


def storescu_batch(node: RunningNode, files: list[Path], calling: str) -> list[bool]:
    """Send ``files`` with DCMTK storescu on one association; which of them the node answered
    with success (storescu -v logs a request line, then its response line, per file)."""
    argv = ["storescu", "-v", "-td", "60", "-aet", calling, "-aec", node.ae_title]
    argv += [node.host, str(node.port), *map(str, files)]
    done = subprocess.run(
        argv, capture_output=True, text=True, env=DCMTK_ENV, timeout=180, check=False
    )
    acknowledged = [False] * len(files)
    current = -1
    for line in (done.stdout + done.stderr).splitlines():
        if "Sending Store Request" in line:
            current += 1
        elif "Received Store Response" in line and 0 <= current < len(files):
            acknowledged[current] = "(Success)" in line
    return acknowledged


def run_senders(
    node: RunningNode, patient: Patient, folder: Path, acknowledged: dict[str, Path]
) -> int:
    """One round: SENDERS storescu processes at once, BATCH new instances each (written to
    ``folder``); the acknowledged files are added to ``acknowledged`` by SOP Instance UID;
    returns how many were not."""
    batches: list[tuple[list[Dataset], list[Path]]] = []
    for _ in range(SENDERS):
        datasets = study(patient, BATCH)
        paths = []
        for ds in datasets:
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        batches.append((datasets, paths))
    refused = 0
    with ThreadPoolExecutor(SENDERS) as pool:
        results = list(
            pool.map(
                lambda item: storescu_batch(node, item[1][1], f"LOAD{item[0]}"),
                enumerate(batches),
            )
        )
    for (datasets, paths), acks in zip(batches, results, strict=True):
        for ds, path, ok in zip(datasets, paths, acks, strict=True):
            if ok:
                acknowledged[str(ds.SOPInstanceUID)] = path
            else:
                refused += 1
    return refused


def while_running(work: Callable[[], None], stop: threading.Event, errors: list[str]) -> int:
    """Run ``work`` again and again until ``stop``; returns how many times it ran."""
    done = 0
    while not stop.is_set():
        try:
            work()
        except AssertionError as exc:
            errors.append(str(exc))
            return done
        done += 1
    return done


@pytest.mark.slow
def test_sustained_ingest_loses_nothing_and_stays_flat(tmp_path: Path) -> None:
    fixed = Patient("LOAD^FIXED", "LOAD-FIXED", "19700101")
    senders = Patient("LOAD^SENDER", "LOAD-SENDER", "19700202")
    with (
        receiver("DEST") as dest,
        run_node(
            tmp_path / "node",
            unknown_peers=RETRIEVERS,
            peers={"DEST": dest.peer()},
            limits={"max_associations": 32},
        ) as node,
    ):
        # A study to query and move while the ingest runs.
        fixed_study = study(fixed, 6)
        assert store(node, fixed_study) == [Status.SUCCESS] * 6
        study_uid = str(fixed_study[0].StudyInstanceUID)

        require_dcmtk("storescu")
        folder = tmp_path / "sent"
        folder.mkdir()
        acknowledged: dict[str, Path] = {}
        assert run_senders(node, senders, folder, acknowledged) == 0  # warm-up round
        baseline_threads = sample(node)[2]
        first = settled(node, baseline_threads)

        stop = threading.Event()
        errors: list[str] = []

        def query() -> None:
            answers, final = find(
                node,
                identifier(
                    StudyInstanceUID=study_uid,
                    QueryRetrieveLevel="STUDY",
                    NumberOfStudyRelatedInstances="",
                ),
            )
            assert final == Status.SUCCESS, f"C-FIND final status {final:#06x}"
            assert len(answers) == 1, f"C-FIND: {len(answers)} answers"
            assert int(answers[0].NumberOfStudyRelatedInstances) == 6

        def retrieve() -> None:
            final = move(
                node, identifier(StudyInstanceUID=study_uid, QueryRetrieveLevel="STUDY"), "DEST"
            )
            assert int(final.Status) == Status.SUCCESS, (
                f"C-MOVE final status {int(final.Status):#06x}"
            )
            assert int(final.NumberOfCompletedSuboperations) == 6

        counts: dict[str, int] = {}
        side = [
            threading.Thread(
                target=lambda n=name, w=work: counts.__setitem__(n, while_running(w, stop, errors))
            )
            for name, work in (("queries", query), ("moves", retrieve))
        ]
        for thread in side:
            thread.start()
        rounds = 0
        refused = 0
        deadline = time.monotonic() + SECONDS
        try:
            while time.monotonic() < deadline and not errors:
                refused += run_senders(node, senders, folder, acknowledged)
                rounds += 1
        finally:
            stop.set()
            for thread in side:
                thread.join(timeout=120)
        assert not errors, errors
        assert refused == 0
        last = settled(node, baseline_threads)

        # Nothing lost: every acknowledged instance is indexed, with its file.
        rows = {
            row["sop_instance_uid"]: row["path"]
            for row in node.rows("SELECT sop_instance_uid, path FROM instance")
        }
        missing = sorted(set(acknowledged) - set(rows))
        assert not missing, f"{len(missing)} acknowledged instances not indexed"
        # storescu drops trailing padding: compared element by element, without it.
        for uid, sent in acknowledged.items():
            original = pydicom.dcmread(sent)
            original.pop(TRAILING_PADDING, None)
            assert pydicom.dcmread(node.storage / rows[uid]) == original, uid
        assert len(rows) == len(acknowledged) + 6
        assert node.temp_files() == []
        assert len(dest.received) == 6  # the moved study, whole, however often it was moved

        rss_growth = last[0] - first[0]
        assert rss_growth < RSS_GROWTH, f"resident memory grew {rss_growth / 2**20:.1f} MiB"
        assert last[1] - first[1] <= FD_GROWTH, f"descriptors {first[1]} -> {last[1]}"
        assert last[2] - first[2] <= THREAD_GROWTH, f"threads {first[2]} -> {last[2]}"
    record(
        "sustained ingest with queries and moves",
        "every instance storescu saw acknowledged is indexed with the data set sent; C-FIND "
        "and C-MOVE answered correctly throughout; memory, descriptors and threads flat",
        seconds=round(SECONDS),
        senders=SENDERS,
        rounds=rounds,
        instances_acknowledged=len(acknowledged),
        queries=counts.get("queries", 0),
        moves=counts.get("moves", 0),
        rss_growth_mib=round(rss_growth / 2**20, 1),
        descriptors=f"{first[1]} -> {last[1]}",
        threads=f"{first[2]} -> {last[2]}",
    )
