"""Several worker processes on one listening port (``workers``): real processes, real associations.

Which worker takes a connection is the kernel's choice; to put an association on a given worker,
the tests stop (SIGSTOP) every other worker while it is set up, so only that one can accept.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.association import Association

from dicomnode.config import load_config
from dicomnode.status import Status
from tests.support.dcmtk import DCMTK_ENV, require_dcmtk
from tests.support.dimse import associate
from tests.support.node import RunningNode, run_node, write_config

CT = [(str(CTImageStorage), [str(ExplicitVRLittleEndian)])]
STOP_TIMEOUT = 20.0


def ct(uid: str | None = None, value: int = 0, study: str = "1.2.3.4", n: int = 1) -> Dataset:
    """A small CT instance; ``value`` fills its pixels (same UID, other value: other content)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "WORKERS^TEST"
    ds.PatientID = "W1"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.Modality = "CT"
    ds.InstanceNumber = n
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes([value % 256, 0]) * 64
    return ds


def workers(node: RunningNode) -> list[psutil.Process]:
    return sorted(psutil.Process(node.proc.pid).children(), key=lambda p: p.pid)


@contextmanager
def only(node: RunningNode, worker: psutil.Process) -> Iterator[None]:
    """While inside, ``worker`` is the only one that can accept (the others are stopped)."""
    others = [p for p in workers(node) if p.pid != worker.pid]
    for other in others:
        other.suspend()
    try:
        yield
    finally:
        for other in others:
            other.resume()


def served_by(node: RunningNode, assoc: Association) -> int:
    """The pid of the worker that accepted ``assoc`` (its log lines carry it)."""
    port = assoc.dul.socket.socket.getsockname()[1]
    pattern = rf"association\[(\d+)\]: association from \S+ at 127\.0\.0\.1:{port} accepted"
    node.wait_for_log(f"127.0.0.1:{port} accepted")
    found = re.search(pattern, node.log())
    assert found, f"no accept line for port {port}"
    return int(found.group(1))


def hold(
    stack: ExitStack, node: RunningNode, worker: psutil.Process, calling_ae: str = "TESTSCU"
) -> Association:
    """An established association on ``worker``, released when ``stack`` closes."""
    with only(node, worker):
        assoc = stack.enter_context(associate(node, CT, calling_ae))
        assert assoc.is_established
        assert served_by(node, assoc) == worker.pid
    return assoc


def store(assoc: Association, ds: Dataset) -> int:
    return int(assoc.send_c_store(ds).Status)


def wait_for_all(node: RunningNode, pattern: str, count: int) -> list[str]:
    """The first group of each match of ``pattern`` in the log, once there are ``count``."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        found = re.findall(pattern, node.log())
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"{pattern!r} not {count} times in:\n{node.log()}"
        time.sleep(0.02)


def count_rows(node: RunningNode) -> int:
    return int(node.rows("SELECT COUNT(*) AS n FROM instance")[0]["n"])


def test_concurrent_senders_on_both_workers_each_instance_indexed_once(tmp_path: Path) -> None:
    require_dcmtk("storescu")
    folders = []
    for s in range(2):
        folder = tmp_path / f"storescu{s}"
        folder.mkdir()
        for i in range(15):
            ct(study=f"1.2.3.9{s}", n=i).save_as(folder / f"{i}.dcm", enforce_file_format=True)
        folders.append(folder)
    batches = [[ct(study=f"1.2.3.8{a}", n=i) for i in range(15)] for a in range(4)]
    expected = {str(ds.SOPInstanceUID) for batch in batches for ds in batch}

    with run_node(tmp_path / "node", workers=2) as node, ExitStack() as stack:
        first, second = workers(node)
        assocs = [hold(stack, node, w) for w in (first, first, second, second)]
        statuses: list[list[int]] = [[] for _ in assocs]

        def send(k: int) -> None:
            statuses[k] = [store(assocs[k], ds) for ds in batches[k]]

        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(assocs))]
        dcmtk = [
            subprocess.Popen(
                ["storescu", "-aec", node.ae_title, "+sd", node.host, str(node.port), str(f)],
                env=DCMTK_ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for f in folders
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for proc in dcmtk:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        assert statuses == [[Status.SUCCESS] * 15] * 4

        for folder in folders:
            expected |= {str(dcmread(p).SOPInstanceUID) for p in folder.iterdir()}
        rows = node.rows("SELECT sop_instance_uid, path FROM instance")
        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(expected)  # each once
        assert len(rows) == 90
        files = node.stored_files()
        assert sorted(node.storage / r["path"] for r in rows) == files
        assert node.temp_files() == []


def test_association_limit_counts_every_worker(tmp_path: Path) -> None:
    with (
        run_node(tmp_path / "node", workers=2, limits={"max_associations": 2}) as node,
        ExitStack() as stack,
    ):
        first, second = workers(node)
        held = ExitStack()
        hold(held, node, first)
        hold(stack, node, second)
        # The node holds 2: a third is refused whichever worker takes it, like pynetdicom's
        # own limit in one process (A-ASSOCIATE-RJ rejected-transient, local limit exceeded).
        for worker in (first, second):
            with only(node, worker), associate(node, CT) as refused:
                assert not refused.is_established
                # pynetdicom now and then reports an A-ASSOCIATE-RJ followed at once by the
                # close as an aborted request (see test_retrieve); the node's log decides below.
                assert refused.is_rejected or refused.is_aborted
                if refused.is_rejected:
                    rj = refused.acceptor.primitive
                    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        log = node.log()
        for worker in (first, second):
            assert re.search(
                rf"association\[{worker.pid}\]: association from TESTSCU at \S+ rejected: "
                r"the node has 2 associations open \(limits.max_associations\)",
                log,
            ), log
        # A place freed on one worker is free for the other.
        held.close()
        node.wait_for_log("association from TESTSCU ended: 1 open on the node")
        hold(stack, node, second)


def test_dead_worker_is_replaced_and_its_places_freed(tmp_path: Path) -> None:
    root = tmp_path / "node"
    (root / "storage" / "tmp").mkdir(parents=True)
    (root / "storage" / "tmp" / "rx-from-last-run.part").write_bytes(b"partial")
    with (
        run_node(root, workers=2, limits={"max_associations": 2}) as node,
        ExitStack() as stack,
    ):
        # Start-up cleared what the last run left, once, in the supervisor (not in a worker).
        assert node.temp_files() == []
        cleared = [line for line in node.log().splitlines() if "leftover temporary" in line]
        assert len(cleared) == 1 and "storage[" not in cleared[0], cleared
        first, second = workers(node)
        hold(stack, node, first)
        hold(stack, node, second)
        # A receive in flight on a worker: the replacement worker must not delete it.
        inflight = node.storage / "tmp" / "rx-inflight.part"
        inflight.write_bytes(b"arriving")

        first.kill()
        first.wait(timeout=STOP_TIMEOUT)
        node.wait_for_log(
            f"worker 1 (pid {first.pid}) ended unexpectedly (killed by SIGKILL); starting a new one"
        )
        started = wait_for_all(node, r"worker 1 started \(pid (\d+)\)", 2)
        replacement = psutil.Process(int(started[1]))
        node.wait_for_log(f"worker 1 (pid {replacement.pid}) ready")
        assert {p.pid for p in workers(node)} == {replacement.pid, second.pid}

        # The dead worker's association no longer counts: the limit of 2 has room for one.
        assoc = hold(stack, node, replacement)
        ds = ct()
        assert store(assoc, ds) == Status.SUCCESS
        assert node.instance(str(ds.SOPInstanceUID)) is not None
        assert inflight.exists()


def test_sigterm_stops_every_process(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", workers=3) as node:
        children = workers(node)
        assert len(children) == 3
        stack = ExitStack()
        hold(stack, node, children[0])  # stopping with an association open
        assert node.stop() == 0
        assert node.proc.stdout is not None
        assert node.proc.stdout.read() == ""  # the listening line was printed once, only
        assert not any(child.is_running() for child in children)
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection((node.host, node.port)),
        ):
            pass
        stack.close()
        assert "3 worker processes" in node.log()


def test_killed_supervisor_takes_its_workers_with_it(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", workers=2) as node:
        children = workers(node)
        node.proc.kill()
        node.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=STOP_TIMEOUT)
        assert alive == [], [p.pid for p in alive]


@pytest.mark.parametrize(
    ("policy", "statuses"),
    [
        ("reject", [Status.SUCCESS, Status.DUPLICATE_SOP_INSTANCE]),
        ("replace", [Status.SUCCESS, Status.SUCCESS]),
        ("keep", [Status.SUCCESS, Status.SUCCESS]),
    ],
)
def test_same_instance_to_two_workers_at_once(
    tmp_path: Path, policy: str, statuses: list[Status]
) -> None:
    uid = generate_uid()
    versions = [ct(uid, value=1), ct(uid, value=2)]
    with (
        run_node(tmp_path / "node", workers=2, store={"duplicates": policy}) as node,
        ExitStack() as stack,
    ):
        assocs = [hold(stack, node, w) for w in workers(node)]
        barrier = threading.Barrier(2)
        got: list[int] = [0, 0]

        def send(k: int) -> None:
            barrier.wait()
            got[k] = store(assocs[k], versions[k])

        threads = [threading.Thread(target=send, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(got) == statuses, [hex(s) for s in got]
        assert count_rows(node) == 1
        files = node.stored_files()
        assert len(files) == 1
        row = node.instance(uid)
        assert row is not None and node.storage / row["path"] == files[0]
        assert node.temp_files() == []
        kept = dcmread(files[0]).PixelData
        assert kept in {v.PixelData for v in versions}
        if policy == "reject":
            # The copy kept is the one that was answered success.
            assert kept == versions[got.index(Status.SUCCESS)].PixelData


def test_one_worker_is_one_process_and_auto_is_the_cpus(tmp_path: Path) -> None:
    with run_node(tmp_path / "one", workers=1) as node:
        assert workers(node) == []
        assert "worker 1 started" not in node.log()
    with run_node(tmp_path / "auto", workers="auto") as node:
        expected = load_config(node.config_path).worker_count()
        assert len(workers(node)) == (expected if expected > 1 else 0)


# A node whose workers misbehave: ``dicomnode.ae`` patched in a real ``serve`` process.
MISBEHAVING = """
import sys, threading
from dicomnode import ae
from dicomnode.cli import setup_logging
from dicomnode.config import load_config
from dicomnode.policy import load_policy

mode = sys.argv[2]
start, stop = ae.Node.start, ae.Node.stop

def failing_start(self, listeners=None):
    if listeners is not None:
        raise RuntimeError("this worker cannot start")
    return start(self, listeners)

def hanging_stop(self, grace=0.0, record_stop=None):
    threading.Event().wait()

if mode == "start-fails":
    ae.Node.start = failing_start
else:
    ae.Node.stop = hanging_stop
    ae.Supervisor.STOP_MARGIN = 1.0
setup_logging(1)
config = load_config(sys.argv[1])
ready = lambda addresses: print(f"listening on {addresses[0][0]}:{addresses[0][1]}", flush=True)
sys.exit(ae.serve(config, load_policy(None), ready))
"""


def misbehaving(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    config = write_config(tmp_path / "node", workers=2, service={"stop_grace": 0})
    return subprocess.Popen(
        [sys.executable, "-c", MISBEHAVING, str(config), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_worker_that_cannot_start_stops_the_node_with_status_1(tmp_path: Path) -> None:
    proc = misbehaving(tmp_path, "start-fails")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "listening" not in out
    assert "this worker cannot start" in err
    assert "before it could serve; stopping the node" in err


def test_worker_that_does_not_stop_is_killed_and_status_is_1(tmp_path: Path) -> None:
    proc = misbehaving(tmp_path, "stop-hangs")
    assert proc.stdout is not None
    assert "listening on" in proc.stdout.readline()
    children = psutil.Process(proc.pid).children()
    assert len(children) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.count("did not stop within 1 s; killing it") == 2
    assert not any(child.is_running() for child in children)
