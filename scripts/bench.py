"""Side-by-side benchmark: dicomnode beside DCMTK storescp (files only, the raw baseline), DCMTK
dcmqrscp and Orthanc, each started fresh per run on loopback, timed from outside with DCMTK
clients (TCP_NODELAY=1 for them). Medians of several runs; ratios from the same run.

First version (issue 4): C-ECHO round trip, CT ingest (512x512 16-bit, ~0.5 MB) and small-instance
ingest (~10 KB) over one association, with each server's peak RSS and CPU seconds. The query,
retrieve, concurrency and 1 GB workloads come next.

Run it with ``scripts/bench`` (``--quick`` for a minute or two).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.dcmtk import dcmqrscp, storescp  # noqa: E402
from tests.support.node import run_node  # noqa: E402
from tests.support.orthanc import orthanc  # noqa: E402

CLIENT_ENV = {**os.environ, "TCP_NODELAY": "1"}
SERVERS = ("dicomnode", "storescp", "dcmqrscp", "orthanc")


@dataclass
class Server:
    name: str
    aet: str
    host: str
    port: int
    pid: int


@dataclass
class Sample:
    seconds: float
    peak_rss_mib: float
    cpu_seconds: float


@dataclass
class Result:
    workload: str
    unit: str  # what the headline number is
    count: int
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def headline(self, server: str) -> float:
        seconds = statistics.median(s.seconds for s in self.samples[server])
        return self.count / seconds if self.unit == "inst/s" else seconds * 1000 / self.count


def _pid_listening(port: int) -> int:
    for conn in psutil.net_connections(kind="tcp"):
        listening = conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
        if listening and conn.pid:
            return int(conn.pid)
    raise RuntimeError(f"no process listens on port {port}")


def _usage(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a server process so far. CPU includes reaped children
    (dcmqrscp forks one per association); their RSS is not seen, the parent's peak is."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:"))
    t = psutil.Process(pid).cpu_times()
    return hwm / 1024, t.user + t.system + t.children_user + t.children_system


@contextmanager
def start(name: str, workdir: Path) -> Iterator[Server]:
    """One fresh server under ``workdir``, listening on a free loopback port."""
    if name == "dicomnode":
        with run_node(workdir, log_level="WARNING") as node:
            yield Server(name, node.ae_title, node.host, node.port, node.proc.pid)
    elif name == "storescp":
        with storescp(workdir / "in", aet="STORESCP") as ep:
            yield Server(name, ep.aet, ep.host, ep.port, _pid_listening(ep.port))
    elif name == "dcmqrscp":
        with dcmqrscp(workdir / "store", aet="QRSCP", max_pdu=131072) as ep:
            yield Server(name, ep.aet, ep.host, ep.port, _pid_listening(ep.port))
    elif name == "orthanc":
        with orthanc(workdir, aet="ORTHANC", verbose=False) as ep:
            yield Server(name, ep.aet, ep.host, ep.dicom_port, ep.proc.pid)
    else:
        raise ValueError(name)


def make_instances(folder: Path, count: int, rows: int, columns: int) -> list[Path]:
    """``count`` single-frame 16-bit instances in one CT study, pixel data from a seeded RNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    study, series = generate_uid(), generate_uid()
    pixels = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    paths = []
    for i in range(count):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Bench^Mark", "CT"
        ds.StudyDate, ds.InstanceNumber = "20260101", i + 1
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=CLIENT_ENV, timeout=3600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {done.stderr[-2000:]}")
    return elapsed


def ingest(server: Server, folder: Path) -> float:
    """storescu sending every file in ``folder`` over one association (-R: only the contexts
    needed; the DCMTK client's own start-up is included, as for every server)."""
    return _timed(
        ["storescu", "-R", "-aec", server.aet, "+sd", server.host, str(server.port), str(folder)]
    )


def echo(server: Server, count: int) -> float:
    """``count`` echoscu processes in a row: each a TCP connect, an association, a C-ECHO."""
    total = 0.0
    for _ in range(count):
        total += _timed(["echoscu", "-aec", server.aet, server.host, str(server.port)])
    return total


def measure(
    servers: tuple[str, ...],
    runs: int,
    work: Path,
    workload: Callable[[Server], float],
    result: Result,
) -> None:
    for run in range(runs):
        for name in servers:
            with (
                tempfile.TemporaryDirectory(dir=work, prefix=f"{name}-") as tmp,
                start(name, Path(tmp)) as server,
            ):
                seconds = workload(server)
                rss, cpu = _usage(server.pid)
            result.samples.setdefault(name, []).append(Sample(seconds, rss, cpu))
            print(
                f"  {result.workload} run {run + 1}/{runs} {name}: {seconds:.2f} s, "
                f"peak RSS {rss:.0f} MiB, CPU {cpu:.2f} s",
                file=sys.stderr,
            )


def table(results: list[Result], servers: tuple[str, ...]) -> str:
    head = ["workload", "unit", *servers, *(f"dicomnode / {s}" for s in servers[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        values = [r.headline(s) for s in servers]
        ratios = [values[0] / v if v else float("nan") for v in values[1:]]
        cells = [r.workload, r.unit, *(f"{v:.1f}" for v in values), *(f"{x:.2f}x" for x in ratios)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| workload | " + " | ".join(f"{s} peak RSS MiB / CPU s" for s in servers) + " |"]
    lines.append("|" + "---|" * (len(servers) + 1))
    for r in results:
        cells = []
        for s in servers:
            rss = statistics.median(x.peak_rss_mib for x in r.samples[s])
            cpu = statistics.median(x.cpu_seconds for x in r.samples[s])
            cells.append(f"{rss:.0f} / {cpu:.2f}")
        lines.append(f"| {r.workload} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one run each")
    parser.add_argument("--runs", type=int, default=5, help="runs per workload (median taken)")
    parser.add_argument("--ct", type=int, default=300, help="CT instances (512x512 16-bit)")
    parser.add_argument("--small", type=int, default=500, help="small instances (~10 KB)")
    parser.add_argument("--echo", type=int, default=20, help="C-ECHO associations per run")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, default=ROOT / "var" / "bench.json")
    args = parser.parse_args(argv)
    # DCMTK (and Orthanc, built on it) disable Nagle's algorithm only when told: without this
    # every small response waits for a delayed ACK (~40 ms). Servers inherit it from here.
    os.environ["TCP_NODELAY"] = "1"
    if args.quick:
        args.runs, args.ct, args.small, args.echo = 1, 50, 100, 5
    servers = tuple(s for s in args.servers.split(",") if s)
    if servers[0] != "dicomnode":
        parser.error("the first server must be dicomnode (ratios are against it)")
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        work = Path(tmp)
        print("generating instances...", file=sys.stderr)
        ct = make_instances(work / "ct", args.ct, 512, 512)
        small = make_instances(work / "small", args.small, 64, 64)
        ct_mb = sum(p.stat().st_size for p in ct) / args.ct / 1e6
        small_kb = sum(p.stat().st_size for p in small) / args.small / 1e3
        results = [
            Result("C-ECHO association round trip", "ms", args.echo),
            Result(f"CT ingest ({ct_mb:.2f} MB each, 1 association)", "inst/s", args.ct),
            Result(f"small ingest ({small_kb:.0f} KB each, 1 association)", "inst/s", args.small),
        ]
        measure(servers, args.runs, work, lambda s: echo(s, args.echo), results[0])
        measure(servers, args.runs, work, lambda s: ingest(s, work / "ct"), results[1])
        measure(servers, args.runs, work, lambda s: ingest(s, work / "small"), results[2])
    report = table(results, servers)
    print(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "runs": args.runs,
        "machine": {"cpus": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30},
        "results": [
            {
                "workload": r.workload,
                "unit": r.unit,
                "count": r.count,
                "headline": {s: r.headline(s) for s in servers},
                "samples": {s: [vars(x) for x in r.samples[s]] for s in servers},
            }
            for r in results
        ],
    }
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"\nJSON written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
