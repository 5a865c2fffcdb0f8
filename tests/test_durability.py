"""Durability (issue 7): nothing the node acknowledged is ever lost, and nothing half-done stays.

- Kill loop: the node is SIGKILLed at seeded random moments while a sender streams instances of
  several sizes (so kills land mid-PDU, mid-fsync, mid-index), and restarted on the same storage
  and index each time. After every restart: each instance that got a Success status is indexed
  and its file holds exactly the data set sent; no row points to a missing file; no temp file is
  left; a file without a row (a kill between the rename into ``objects/`` and the index commit)
  is reported by ``index verify`` and taken in by ``--repair``. Senders: pynetdicom (exact
  per-instance statuses), DCMTK storescu (its verbose per-file results), one worker and two.
- Disk full: the storage folder is a small tmpfs filled by the test: stores fail with A700 and
  leave nothing, C-ECHO and C-FIND still answer, and stores succeed once space is freed.
- Index locked by another process for longer than the node's busy timeout: the store fails with
  A701 and leaves no file and no row; it succeeds once the lock is released.
- Twenty concurrent associations storing overlapping instances of one study: one file and one
  row per instance, and the counts at every level right.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from dicomnode.index import Index
from dicomnode.status import Status
from tests.support import faults
from tests.support.dcmtk import require_dcmtk
from tests.support.dimse import echo
from tests.support.faults import InstanceFactory, SendLog, Sent, send
from tests.support.node import RunningNode, run_node
from tests.support.qr import PATIENT_FIND, STUDY_FIND, find, identifier
from tests.support.reliability import record

SEED = int(os.environ.get("DICOMNODE_DURABILITY_SEED", "7007"))
# Kills in all: an eighth by the storescu loop, a sixteenth by the two-worker loop (its restarts
# take longest), the rest by the one-process loop. 200 take about four minutes (about 1.1 s a
# kill and restart, 2.5 s with two workers); raise it for a soak run.
KILLS = max(32, int(os.environ.get("DICOMNODE_KILLS", "200")))
STORESCU_KILLS = KILLS // 8
TWO_WORKER_KILLS = KILLS // 16
ONE_PROCESS_KILLS = KILLS - STORESCU_KILLS - TWO_WORKER_KILLS
# Every this many kills, and at the end, every acknowledged file is read back whole; in between,
# each restart reads back what was acknowledged (or sent again) since the last look, and checks
# the row, the file and its size of all the others.
FULL_CHECK_EVERY = 25
# Unknown peers may store and query (the default lets them store only).
QUERYING = ["echo", "store", "find"]


# --- kill loop -------------------------------------------------------------------------------


class KillLoop:
    """The state a kill loop carries from one node run to the next."""

    def __init__(self, tmp_path: Path, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.factory = InstanceFactory(tmp_path / "sent", self.rng)
        self.root = tmp_path / "node"
        self.by_uid: dict[str, Sent] = {}
        self.pending: list[Sent] = []
        self.acknowledged: dict[str, Sent] = {}
        self.kills = 0
        self.processes_killed = 0
        self.restarts = 0
        self.orphans_repaired = 0
        self.verify_runs = 0
        self.answered = 0
        self.duplicates_sent = 0
        self.exact = True  # the sender sends the file's data set bytes as they are
        # Instances whose stored file was read back and found identical, with its size then.
        self.verified: dict[str, int] = {}
        self.refill()

    def refill(self, unacked: int = 24) -> None:
        self.pending = [s for s in self.pending if s.sop_instance_uid not in self.acknowledged]
        fresh = self.factory.make(max(0, unacked - len(self.pending)))
        self.by_uid.update((s.sop_instance_uid, s) for s in fresh)
        self.pending += fresh

    def batch(self) -> list[Sent]:
        """The unacknowledged instances, and a few acknowledged ones again (identical
        duplicates, answered Success without a second file), in a random order."""
        again = self.rng.sample(sorted(self.acknowledged), min(3, len(self.acknowledged)))
        self.duplicates_sent += len(again)
        for uid in again:  # the node saw it again: read its file back at the next look
            self.verified.pop(uid, None)
        batch = self.pending + [self.acknowledged[uid] for uid in again]
        self.rng.shuffle(batch)
        return batch

    def where(self) -> str:
        return f"seed {self.seed}, after kill {self.kills}"

    def note(self, log: SendLog) -> None:
        unexpected = {uid: s for uid, s in log.statuses.items() if s != Status.SUCCESS}
        assert not unexpected, f"{self.where()}: stores answered with failures: {unexpected}"
        self.answered += len(log.statuses)
        for uid in log.acknowledged:
            self.acknowledged[uid] = self.by_uid[uid]

    def check(self, node: RunningNode, full: bool = False) -> None:
        """The invariants on a node just restarted (idle: nothing is being received)."""
        self.restarts += 1
        where = self.where()
        found = faults.state(node)
        assert not found.temp, f"{where}: temp files left after restart: {found.temp}"
        assert not found.missing, f"{where}: rows whose file is missing: {found.missing}"
        unknown = set(found.rows) - set(self.by_uid)
        assert not unknown, f"{where}: rows of instances never sent: {unknown}"
        if full:
            self.verified.clear()
        unread = {u: s for u, s in self.acknowledged.items() if u not in self.verified}
        faults.check_acknowledged(node, found, unread, where, self.exact)
        for uid in unread:
            self.verified[uid] = (node.storage / found.rows[uid]).stat().st_size
        for uid, size in self.verified.items():
            stored = node.storage / found.rows[uid] if uid in found.rows else None
            assert stored is not None, f"{where}: acknowledged instance {uid} lost its row"
            assert stored.is_file(), f"{where}: acknowledged instance {uid}: file gone"
            assert stored.stat().st_size == size, f"{where}: acknowledged {uid}: file changed"
        if found.orphans:
            # Killed after the file was renamed into objects/ and before the index commit: the
            # instance was never acknowledged. verify reports it; --repair indexes it.
            report = node.cli("index", "verify")
            assert report.returncode == 1, (
                f"{where}: verify missed {found.orphans}: {report.stdout}"
            )
            repair = node.cli("index", "verify", "--repair")
            assert repair.returncode == 0, f"{where}: {repair.stdout}{repair.stderr}"
            self.orphans_repaired += len(found.orphans)
            found = faults.state(node)
            assert not found.orphans and not found.missing, f"{where}: after --repair: {found}"
            full = True
        if full:
            self.verify_runs += 1
            result = node.cli("index", "verify")
            assert result.returncode == 0, f"{where}: index verify: {result.stdout}{result.stderr}"


def _kill_loop(
    tmp_path: Path, *, workers: int, kills: int, supervisor_only_every: int = 0
) -> KillLoop:
    loop = KillLoop(tmp_path, SEED + workers)
    while loop.kills < kills:
        with run_node(loop.root, workers=workers) as node:
            loop.check(node, full=loop.kills % FULL_CHECK_EVERY == 0)
            log = SendLog()
            sender = threading.Thread(target=send, args=(node, loop.batch(), log), daemon=True)
            sender.start()
            # The fault: a kill after a seeded random delay, whatever the node is doing then.
            sender.join(timeout=loop.rng.uniform(0.0, 0.5))
            if supervisor_only_every and loop.kills % supervisor_only_every == 1:
                loop.processes_killed += _kill_supervisor_only(node, loop.where())
            else:
                loop.processes_killed += faults.kill_node(node)
            sender.join(timeout=60)
            assert not sender.is_alive(), f"{loop.where()}: the sender did not notice the kill"
            loop.kills += 1
            loop.note(log)
            loop.refill()
    with run_node(loop.root, workers=workers) as node:
        loop.check(node, full=True)
        # The node still stores after all that.
        log = SendLog()
        last = loop.factory.make(3)
        loop.by_uid.update((s.sop_instance_uid, s) for s in last)
        send(node, last, log)
        assert log.acknowledged == {s.sop_instance_uid for s in last}, f"seed {loop.seed}: {log}"
        loop.note(log)
        loop.check(node, full=True)
    return loop


def _kill_supervisor_only(node: RunningNode, where: str) -> int:
    """SIGKILL only the supervisor of a node with workers: each worker is told to stop by the
    kernel (PR_SET_PDEATHSIG), drains and exits; wait until all are gone."""
    workers = psutil.Process(node.proc.pid).children(recursive=True)
    assert workers, f"{where}: no worker processes"
    node.proc.kill()
    node.proc.wait(timeout=15)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"{where}: workers outlived their supervisor: {alive}"
    return 1 + len(workers)


def _record_kill_loop(scenario: str, loop: KillLoop, seconds: float) -> None:
    record(
        scenario,
        "every acknowledged instance indexed and byte-identical after each SIGKILL and restart; "
        "no row without its file, no temp file left; files without a row reconciled by "
        "index verify --repair",
        seed=loop.seed,
        kills_survived=loop.kills,
        processes_killed=loop.processes_killed,
        restarts=loop.restarts,
        instances_answered=loop.answered,
        instances_acknowledged_and_verified=len(loop.acknowledged),
        duplicates_sent=loop.duplicates_sent,
        orphan_files_repaired=loop.orphans_repaired,
        verify_runs=loop.verify_runs,
        seconds=round(seconds, 1),
    )


@pytest.mark.slow
def test_kill_loop_one_process(tmp_path: Path) -> None:
    started = time.monotonic()
    loop = _kill_loop(tmp_path, workers=1, kills=ONE_PROCESS_KILLS)
    assert len(loop.acknowledged) >= ONE_PROCESS_KILLS, (
        f"seed {loop.seed}: too few stores got through"
    )
    _record_kill_loop("kill -9 during C-STORE (one process)", loop, time.monotonic() - started)


@pytest.mark.slow
def test_kill_loop_two_workers(tmp_path: Path) -> None:
    """Two worker processes: most kills take the supervisor and both workers at once (kill -9
    of the service's cgroup); every third only the supervisor, whose workers must then stop."""
    started = time.monotonic()
    loop = _kill_loop(tmp_path, workers=2, kills=TWO_WORKER_KILLS, supervisor_only_every=3)
    assert len(loop.acknowledged) >= TWO_WORKER_KILLS, (
        f"seed {loop.seed}: too few stores got through"
    )
    _record_kill_loop("kill -9 during C-STORE (two workers)", loop, time.monotonic() - started)


@pytest.mark.slow
def test_kill_loop_storescu(tmp_path: Path) -> None:
    """DCMTK storescu as the sender: its verbose output names each file answered Success."""
    require_dcmtk("storescu")
    started = time.monotonic()
    loop = KillLoop(tmp_path, SEED + 100)
    loop.exact = False  # storescu encodes the data set again (same elements, not same bytes)
    while loop.kills < STORESCU_KILLS:
        with run_node(loop.root, workers=1) as node:
            loop.check(node, full=loop.kills % FULL_CHECK_EVERY == 0)
            batch = loop.batch()
            by_path = {s.path: s for s in batch}
            scu = faults.storescu_process(node, [s.path for s in batch])
            with contextlib.suppress(subprocess.TimeoutExpired):
                scu.wait(timeout=loop.rng.uniform(0.1, 0.8))
            loop.processes_killed += faults.kill_node(node)
            output, _ = scu.communicate(timeout=60)
            loop.kills += 1
            log = SendLog()
            for path in faults.storescu_acknowledged(output):
                log.statuses[by_path[path].sop_instance_uid] = Status.SUCCESS
            loop.note(log)
            loop.refill()
    with run_node(loop.root, workers=1) as node:
        loop.check(node, full=True)
    assert len(loop.acknowledged) >= STORESCU_KILLS, f"seed {loop.seed}: too few stores got through"
    _record_kill_loop("kill -9 during DCMTK storescu", loop, time.monotonic() - started)


# --- disk full -------------------------------------------------------------------------------


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs for the storage folder: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")


def _fill(path: Path, leave: int) -> int:
    """Write ``path`` until the filesystem has about ``leave`` bytes free (0: until ENOSPC)."""
    chunk = b"\0" * 65536
    written = 0
    with path.open("ab") as fh:
        while True:
            st = os.statvfs(path.parent)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                fh.write(chunk[: max(4096, min(len(chunk), free - leave))])
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
            written += len(chunk)
    return written


def _study_counts(node: RunningNode, study_uid: str) -> tuple[int, int]:
    answers, final = find(
        node,
        identifier(
            QueryRetrieveLevel="STUDY",
            StudyInstanceUID=study_uid,
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
        ),
        STUDY_FIND,
    )
    assert final == Status.SUCCESS
    assert len(answers) == 1, answers
    return int(answers[0].NumberOfStudyRelatedSeries), int(answers[0].NumberOfStudyRelatedInstances)


def test_disk_full(tmp_path: Path) -> None:
    root = tmp_path / "node"
    storage = root / "storage"
    _mount_tmpfs(storage, "16m")
    rng = random.Random(SEED)
    try:
        factory = InstanceFactory(tmp_path / "sent", rng, studies=1)
        made = factory.make(40)
        small = [s for s in made if s.path.stat().st_size < 100_000][:4]
        big = [s for s in made if s.path.stat().st_size > 2_000_000][:2]
        assert len(small) == 4 and len(big) == 2, "the factory made too few of each size"
        with run_node(root, unknown_peers=QUERYING) as node:
            ok = SendLog()
            send(node, small[:1], ok)
            assert ok.acknowledged == {small[0].sop_instance_uid}, ok
            before = faults.state(node)
            refused = 0

            # Room for a small instance but not a large one: the large one fails part-written.
            filler = storage / "filler"
            _fill(filler, leave=1_000_000)
            log = SendLog()
            send(node, [big[0], small[1]], log)
            assert log.statuses == {
                big[0].sop_instance_uid: Status.OUT_OF_RESOURCES,
                small[1].sop_instance_uid: Status.SUCCESS,
            }, log
            refused += 1
            node.wait_for_log("could not write the received data set")

            # Nothing left at all: every store fails, the node still answers echo and find.
            _fill(filler, leave=0)
            log = SendLog()
            send(node, [small[2], big[1]], log)
            assert log.statuses == {
                small[2].sop_instance_uid: Status.OUT_OF_RESOURCES,
                big[1].sop_instance_uid: Status.OUT_OF_RESOURCES,
            }, log
            refused += 2
            found = faults.state(node)
            assert not found.temp, f"partial receives left: {found.temp}"
            assert set(found.rows) == set(before.rows) | {small[1].sop_instance_uid}
            assert len(found.files) == len(found.rows) and not found.orphans and not found.missing
            assert echo(node) == Status.SUCCESS
            assert _study_counts(node, small[0].study_uid)[1] == 2

            # Space again: the refused instances store, byte for byte.
            filler.unlink()
            log = SendLog()
            retry = [big[0], small[2], big[1], small[3]]
            send(node, retry, log)
            assert log.acknowledged == {s.sop_instance_uid for s in retry}, log
            found = faults.state(node)
            stored = {s.sop_instance_uid: s for s in [small[0], small[1], *retry]}
            faults.check_acknowledged(node, found, stored, "after freeing space")
            assert set(found.rows) == set(stored) and len(found.files) == len(stored)
            assert not found.temp
            assert _study_counts(node, small[0].study_uid)[1] == len(stored)
            verify = node.cli("index", "verify")
            assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        subprocess.run(["umount", "-l", str(storage)], check=False, timeout=30)
    record(
        "disk full during C-STORE (tmpfs storage)",
        "A700 for each store that did not fit, partial file removed, C-ECHO and C-FIND answered "
        "while full, the refused instances stored byte-identical once space was freed",
        stores_refused_while_full=refused,
        stored_before=2,
        stored_after_freeing=len(retry),
        storage_bytes=16 * 2**20,
    )


# --- index locked ----------------------------------------------------------------------------


@pytest.mark.slow
def test_index_locked_by_another_process(tmp_path: Path) -> None:
    # Shorter than the default (10 s), so the test does not wait long; the default is the
    # same code path with another number.
    busy = 2.0
    assert busy < Index(tmp_path / "unused.sqlite").busy_timeout
    rng = random.Random(SEED)
    factory = InstanceFactory(tmp_path / "sent", rng, studies=1)
    first, second = factory.make(2)
    with run_node(tmp_path / "node", database_busy_timeout=busy) as node:
        with faults.index_locked(node.database) as holder:
            log = SendLog()
            sender = threading.Thread(target=send, args=(node, [first], log), daemon=True)
            sender.start()
            # While the store waits for the lock, the node answers others.
            assert echo(node) == Status.SUCCESS
            sender.join(timeout=busy + 30)
            assert not sender.is_alive(), "no answer to a store while the index was locked"
            assert log.statuses == {first.sop_instance_uid: Status.OUT_OF_RESOURCES_INDEX}, log
            found = faults.state(node)
            assert not found.rows and not found.files and not found.temp, found
            faults.release(holder)
        node.wait_for_log("index write failed")
        log = SendLog()
        send(node, [first, second], log)
        assert log.acknowledged == {first.sop_instance_uid, second.sop_instance_uid}, log
        found = faults.state(node)
        faults.check_acknowledged(
            node, found, {s.sop_instance_uid: s for s in (first, second)}, "after unlock"
        )
        assert len(found.files) == 2 and not found.temp
    record(
        "index locked by another process past the busy timeout",
        "store answered A701 (out of resources, index) with no file, row or temp file left; the "
        "node answered C-ECHO meanwhile and stored again once the lock was released",
        busy_timeout_seconds=busy,
        stores_refused_while_locked=1,
        stored_after_release=2,
    )


# --- concurrent associations -----------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_twenty_associations_same_study(tmp_path: Path, workers: int) -> None:
    seed = SEED + 20 + workers
    rng = random.Random(seed)
    factory = InstanceFactory(tmp_path / "sent", rng, studies=1)
    factory.templates = factory.templates[:2]  # small instances: many stores, all at once
    study = factory.make(40)
    senders = 20
    plans = []
    for _ in range(senders):
        plan = rng.sample(study, 12)  # overlapping: each instance goes on ~6 associations
        plans.append(plan)
    covered = {s.sop_instance_uid for plan in plans for s in plan}
    logs = [SendLog() for _ in range(senders)]
    limits = {"max_associations": senders + 4}
    with run_node(
        tmp_path / "node", workers=workers, limits=limits, unknown_peers=QUERYING
    ) as node:
        barrier = threading.Barrier(senders)

        def run(i: int) -> None:
            barrier.wait(timeout=30)
            send(node, plans[i], logs[i], calling=f"SCU{i:02d}")

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), f"seed {seed}: a sender hung"
        for i, log in enumerate(logs):
            assert not log.error, f"seed {seed}: sender {i}: {log.error}"
            assert log.acknowledged == {s.sop_instance_uid for s in plans[i]}, (
                f"seed {seed}: sender {i}: {log.statuses}"
            )
        found = faults.state(node)
        assert set(found.rows) == covered, f"seed {seed}"
        assert len(found.files) == len(covered), f"seed {seed}: {len(found.files)} files"
        assert not found.orphans and not found.missing and not found.temp
        faults.check_acknowledged(
            node,
            found,
            {s.sop_instance_uid: s for s in study if s.sop_instance_uid in covered},
            f"seed {seed}",
        )
        study_uid = study[0].study_uid
        series = {s.series_uid for s in study if s.sop_instance_uid in covered}
        assert _study_counts(node, study_uid) == (len(series), len(covered)), f"seed {seed}"
        answers, final = find(
            node,
            identifier(
                QueryRetrieveLevel="SERIES",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID="",
                NumberOfSeriesRelatedInstances="",
            ),
            STUDY_FIND,
        )
        assert final == Status.SUCCESS
        expected = {
            uid: sum(1 for s in study if s.series_uid == uid and s.sop_instance_uid in covered)
            for uid in series
        }
        got = {str(a.SeriesInstanceUID): int(a.NumberOfSeriesRelatedInstances) for a in answers}
        assert got == expected, f"seed {seed}"
        answers, final = find(
            node,
            identifier(
                QueryRetrieveLevel="PATIENT",
                PatientID="DURABILITY",
                NumberOfPatientRelatedStudies="",
                NumberOfPatientRelatedInstances="",
            ),
            PATIENT_FIND,
        )
        assert final == Status.SUCCESS and len(answers) == 1, answers
        assert int(answers[0].NumberOfPatientRelatedStudies) == 1
        assert int(answers[0].NumberOfPatientRelatedInstances) == len(covered)
        assert len(node.rows("SELECT id FROM patient")) == 1
        assert len(node.rows("SELECT id FROM study")) == 1
        assert len(node.rows("SELECT id FROM series")) == len(series)
        verify = node.cli("index", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    record(
        f"twenty concurrent associations storing one study ({workers} worker process"
        f"{'es' if workers > 1 else ''})",
        "one file and one row per instance; patient, study and series counts right",
        seed=seed,
        associations=senders,
        stores_sent=sum(len(p) for p in plans),
        distinct_instances=len(covered),
        series=len(series),
    )
