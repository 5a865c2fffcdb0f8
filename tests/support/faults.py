"""Fault injection against a real node: distinct instances to stream, senders that keep a
per-instance record of what the node acknowledged, a SIGKILL of the whole node at a chosen
moment, another process holding the index's write lock, and the on-disk invariants checked
after each fault (through the node's real SQLite file and the files under ``storage_dir``).
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import psutil
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from dicomnode.status import Status
from tests.support.corpus import dataset_bytes
from tests.support.dcmtk import DCMTK_ENV
from tests.support.dimse import pause_reactor
from tests.support.node import RunningNode


@dataclass(frozen=True)
class Sent:
    """One instance file to send: its SOP UIDs and the data set bytes the node must keep."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str

    def data(self) -> bytes:
        return dataset_bytes(self.path)


class InstanceFactory:
    """Distinct instances (fresh SOP Instance UIDs) copied from a few templates of different
    sizes (about 10 KB, 40 KB and, synthesised, 2 MB and 5 MB) into ``workdir``, spread over a few
    studies of one patient. Sizes differ so that a kill lands mid-PDU, mid-fsync or mid-index."""

    def __init__(self, workdir: Path, rng: random.Random, studies: int = 3) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.rng = rng
        self.studies = [(generate_uid(), [generate_uid(), generate_uid()]) for _ in range(studies)]
        small = [pydicom.dcmread(get_testdata_file(n)) for n in ("MR_small.dcm", "CT_small.dcm")]
        self.templates: list[tuple[Dataset, int]] = [(ds, 6) for ds in small]
        for rows, weight in ((1024, 2), (1600, 1)):  # 2 MiB and ~4.9 MiB of pixel data
            self.templates.append((_large(small[1], rows, rng), weight))
        self.made = 0

    def make(self, count: int) -> list[Sent]:
        weights = [w for _, w in self.templates]
        out = []
        for _ in range(count):
            template = self.rng.choices([t for t, _ in self.templates], weights)[0]
            study_uid, series = self.studies[self.rng.randrange(len(self.studies))]
            series_uid = series[self.rng.randrange(len(series))]
            ds = template.copy()
            ds.file_meta = template.file_meta.copy()
            uid = generate_uid()
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.PatientID = "DURABILITY"
            ds.PatientName = "Durability^Test"
            self.made += 1
            ds.InstanceNumber = self.made
            path = self.workdir / f"{self.made:05d}.dcm"
            # Encoded in memory and written at once: pydicom writes a file element by element.
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            path.write_bytes(buffer.getvalue())
            out.append(
                Sent(
                    path,
                    str(ds.SOPClassUID),
                    uid,
                    str(ds.file_meta.TransferSyntaxUID),
                    study_uid,
                    series_uid,
                )
            )
        return out


def _large(template: Dataset, rows: int, rng: random.Random) -> Dataset:
    ds = template.copy()
    ds.file_meta = template.file_meta.copy()
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelData = rng.randbytes(rows * rows * 2)
    return ds


# --- senders ---------------------------------------------------------------------------------


@dataclass
class SendLog:
    """What a sender learnt: the status the node answered for each instance it answered."""

    statuses: dict[str, int] = field(default_factory=dict)
    attempted: int = 0
    error: str = ""

    @property
    def acknowledged(self) -> set[str]:
        return {uid for uid, status in self.statuses.items() if status == Status.SUCCESS}


def contexts_of(instances: Sequence[Sent]) -> list[tuple[str, str]]:
    return sorted({(s.sop_class_uid, s.transfer_syntax) for s in instances})


def send(
    node: RunningNode, instances: Sequence[Sent], log: SendLog, calling: str = "KILLSCU"
) -> None:
    """C-STORE each instance's data set bytes exactly as in its file, on one association, and
    note every response's status. Returns (never raises) when the node goes away mid-way."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for abstract, syntax in contexts_of(instances):
        ae.add_requested_context(abstract, [syntax])
    try:
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        if not assoc.is_established:
            log.error = "association not established"
            return
        try:
            for i, sent in enumerate(instances, 1):
                cx = _context(assoc, sent)
                log.attempted += 1
                status = _store(assoc, cx, sent, message_id=i)
                if status is None:
                    log.error = "association lost"
                    return
                log.statuses[sent.sop_instance_uid] = status
            assoc.release()
        finally:
            if assoc.is_established:
                assoc.abort()
    except Exception as exc:  # a connection reset while the node dies: the log says so far
        log.error = f"{type(exc).__name__}: {exc}"
    finally:
        ae.shutdown()


def _context(assoc: Association, sent: Sent) -> int:
    for cx in assoc.accepted_contexts:
        if (
            cx.abstract_syntax == sent.sop_class_uid
            and cx.transfer_syntax[0] == sent.transfer_syntax
        ):
            return int(cx.context_id)  # type: ignore[arg-type]
    raise AssertionError(f"no accepted context for {sent.sop_class_uid} {sent.transfer_syntax}")


def _store(assoc: Association, cx_id: int, sent: Sent, message_id: int) -> int | None:
    """The response status, or None when no response came (the association died)."""
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sent.sop_class_uid
    req.AffectedSOPInstanceUID = sent.sop_instance_uid
    req.Priority = 2
    req.DataSet = BytesIO(sent.data())
    # Pause pynetdicom's association reactor so it does not take our response (without
    # Association.send_c_store's race: see pause_reactor).
    pause_reactor(assoc)
    try:
        if not assoc.is_established:
            return None
        assoc.dimse.send_msg(req, cx_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None or rsp.Status is None:
        return None
    return int(rsp.Status)


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def storescu_acknowledged(output: str) -> set[Path]:
    """The files DCMTK ``storescu -v`` reports a Success response for: each "Received Store
    Response (Success)" line answers the last "Sending file:" line before it."""
    acked: set[Path] = set()
    current: Path | None = None
    for line in output.splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _RESPONSE.search(line)) and current is not None:
            if m.group(1).strip() == "Success":
                acked.add(current)
            current = None
    return acked


def storescu_process(node: RunningNode, files: Sequence[Path]) -> subprocess.Popen[str]:
    """DCMTK storescu sending ``files`` on one association, verbose (a line per response)."""
    argv = ["storescu", "-v", "-aec", node.ae_title, node.host, str(node.port), *map(str, files)]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV
    )


# --- the kill --------------------------------------------------------------------------------


def kill_node(node: RunningNode, timeout: float = 15.0) -> int:
    """SIGKILL the node and every process of it at once (as ``kill -9`` of its cgroup does, or
    systemd's KillMode=control-group); return how many processes died. Waits until they are gone."""
    procs: list[psutil.Process] = []
    try:
        top = psutil.Process(node.proc.pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    node.proc.wait(timeout=timeout)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"processes of the node survived SIGKILL: {alive}"
    return len(procs)


# --- another process holding the index's write lock ------------------------------------------

_HOLDER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
con.execute("ROLLBACK")
con.close()
print("released", flush=True)
"""


@contextmanager
def index_locked(database: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holds ``BEGIN EXCLUSIVE`` on ``database`` until the block ends (or until
    something is written to its stdin)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        line = holder.stdout.readline()
        assert line.strip() == "locked", f"lock holder did not lock: {line!r}"
        yield holder
    finally:
        if holder.poll() is None:
            try:
                holder.stdin.write("\n")
                holder.stdin.flush()
            except BrokenPipeError:
                pass
            try:
                holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
        holder.stdin.close()
        holder.stdout.close()


def release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"
    holder.wait(timeout=10)


# --- invariants ------------------------------------------------------------------------------


@dataclass
class State:
    """The node's index rows and files as found on disk."""

    rows: dict[str, str]  # SOP Instance UID -> path relative to storage_dir
    files: set[str]  # relative paths under objects/
    temp: list[Path]

    @property
    def missing(self) -> dict[str, str]:
        """Rows whose file is gone."""
        return {uid: path for uid, path in self.rows.items() if path not in self.files}

    @property
    def orphans(self) -> set[str]:
        """Files no row points to."""
        return self.files - set(self.rows.values())


def state(node: RunningNode) -> State:
    rows = {
        r["sop_instance_uid"]: r["path"]
        for r in node.rows("SELECT sop_instance_uid, path FROM instance")
    }
    count = node.rows("SELECT COUNT(*) AS n FROM instance")[0]["n"]
    assert count == len(rows), f"{count} instance rows for {len(rows)} distinct SOP Instance UIDs"
    files = {str(p.relative_to(node.storage)) for p in node.stored_files()}
    return State(rows, files, node.temp_files())


def check_acknowledged(
    node: RunningNode,
    found: State,
    acknowledged: dict[str, Sent],
    context: str,
    exact: bool = True,
) -> None:
    """Every acknowledged instance has its row, and its file holds exactly the data set sent
    (``exact=False``: the same elements and values, for a sender such as DCMTK storescu that
    encodes the data set again from the file rather than sending the file's bytes)."""
    for uid, sent in acknowledged.items():
        path = found.rows.get(uid)
        assert path is not None, f"{context}: acknowledged instance {uid} has no index row"
        stored = node.storage / path
        assert stored.is_file(), f"{context}: acknowledged instance {uid}: file {path} missing"
        if exact:
            same = dataset_bytes(stored) == sent.data()
        else:
            same = _elements(stored) == _elements(sent.path)
        assert same, f"{context}: acknowledged instance {uid}: stored data set differs from sent"


def _elements(path: Path) -> Dataset:
    """The data set without Data Set Trailing Padding (FFFC,FFFC), which DCMTK drops when it
    sends a file (PS3.10 7.2 lets an application ignore it)."""
    ds = pydicom.dcmread(path)
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    return ds
