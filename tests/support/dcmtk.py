"""Run DCMTK network tools as real peers in tests: a server on a free loopback port.

:func:`dcmtk_server` starts any DCMTK server whose last argument is its port (storescp,
wlmscpfs, dcmqrscp ...), waits until that very process listens, yields where to reach it and
stops it afterwards. :func:`storescp` is the C-STORE SCP built on it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, NamedTuple

import psutil
import pytest

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 20.0
# DCMTK (as packaged by Debian, 3.6.7) leaves Nagle's algorithm on unless TCP_NODELAY is set in
# its environment; every C-STORE then waits ~40 ms for a delayed ACK. Tests do not need that.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
STOP_TIMEOUT = 10.0


class Endpoint(NamedTuple):
    """Where a started server answers; unpacks as ``aet, host, port``."""

    aet: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``AET@host:port``, as ``dicomnode`` accepts for a peer."""
        return f"{self.aet}@{self.host}:{self.port}"


class ServerDidNotStart(RuntimeError):
    """The server exited or did not listen in time; the message carries its output."""


def require_dcmtk(*tools: str) -> None:
    """Skip the calling test when a DCMTK tool is not on PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"DCMTK not installed ({', '.join(missing)} not on PATH); "
            "install it (e.g. apt-get install dcmtk) to run these tests"
        )


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it; another process may take it
    before our server binds it, which :func:`dcmtk_server` handles by retrying)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def dcmtk_server(
    argv: Sequence[str],
    *,
    aet: str,
    port: int | None = None,
    host: str = LOOPBACK,
    log_path: Path | None = None,
    attempts: int = 5,
    ready_timeout: float = READY_TIMEOUT,
) -> Iterator[Endpoint]:
    """Run ``argv + [port]`` until the block ends; yield once the process listens on the port.

    With ``port=None`` a free port is chosen, and a fresh one tried again when the server exits
    before listening (someone else took the port in between). Output goes to ``log_path``
    (appended) or is discarded; a server that never comes up raises with that output.
    """
    tool = argv[0]
    if shutil.which(tool) is None:
        pytest.skip(f"DCMTK tool {tool} not installed (not on PATH)")
    last_error = ""
    for _ in range(attempts if port is None else 1):
        chosen = port if port is not None else free_port(host)
        with _log_file(log_path) as log:
            proc = subprocess.Popen(
                [*argv, str(chosen)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=DCMTK_ENV,
            )
        try:
            ready = _await_listening(proc, host, chosen, ready_timeout)
            if ready:
                yield Endpoint(aet, host, chosen)
                return
            last_error = f"{tool} exited with {proc.returncode} before listening on {chosen}"
        finally:
            _stop(proc)
    output = log_path.read_text(errors="replace") if log_path and log_path.exists() else ""
    raise ServerDidNotStart(f"{last_error}\n{output}")


@contextmanager
def _log_file(log_path: Path | None) -> Iterator[IO[bytes] | int]:
    if log_path is None:
        yield subprocess.DEVNULL
        return
    with log_path.open("ab") as log:
        yield log


def _await_listening(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float) -> bool:
    """True once ``proc`` listens on ``port``; False if it exited first.

    Polls (bounded by ``timeout``) whether the process owns a listening socket on the port;
    between polls it waits on the process itself, so an early exit (port taken, bad option) is
    seen at once. The interval grows from 5 ms to 200 ms.
    """
    deadline = time.monotonic() + timeout
    interval = 0.005
    while True:
        if proc.poll() is not None:
            return False
        if _listens(proc, host, port):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerDidNotStart(f"pid {proc.pid} did not listen on {port} within {timeout} s")
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=min(interval, remaining))
        interval = min(interval * 2, 0.2)


def _listens(proc: subprocess.Popen[bytes], host: str, port: int) -> bool:
    # Asks whether *our* process holds the listening socket, so a program that happened to take
    # the port in between is never mistaken for the server.
    try:
        connections = psutil.Process(proc.pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # some platforms hide sockets; then a TCP connect must do
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def storescp(
    out_dir: Path,
    *,
    aet: str = "STORESCP",
    options: Sequence[str] = ("+xa",),
    log_path: Path | None = None,
) -> Iterator[Endpoint]:
    """DCMTK storescp writing what it receives into ``out_dir``.

    Always bit-preserving (``+B``: each received data set is written exactly as it arrived) with
    unique file names (``+uf``: two instances with the same UID do not overwrite each other).
    ``options`` adds to that: ``+xa`` (default) accepts every transfer syntax DCMTK knows,
    ``+xi`` implicit VR little endian only, ``--refuse`` rejects every association, ``-pm``
    accepts unknown SOP classes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = ["storescp", "-aet", aet, "-od", str(out_dir), "+B", "+uf", "-dhl", *options]
    with dcmtk_server(argv, aet=aet, log_path=log_path) as endpoint:
        yield endpoint


@contextmanager
def dcmqrscp(
    storage_dir: Path,
    *,
    aet: str = "QRSCP",
    peers: dict[str, Endpoint] | None = None,
    options: Sequence[str] = (),
    max_pdu: int = 65536,
    log_path: Path | None = None,
) -> Iterator[Endpoint]:
    """DCMTK dcmqrscp, a Query/Retrieve SCP (and storage SCP) over one storage area.

    Writes its configuration file next to ``storage_dir`` (see ``man dcmqrscp`` and
    /etc/dcmtk/dcmqrscp.cfg): one AE title ``aet`` whose storage area is ``storage_dir``,
    read/write, open to any caller, and a HostTable with ``peers`` (symbolic name ->
    AET/host/port), the C-MOVE destinations it knows. Instances sent to it (C-STORE) are
    indexed in ``storage_dir/index.dat`` and can then be found and retrieved. ``options`` adds
    command-line options (``-d`` logs every PDU, role negotiation included).
    """
    storage_dir.mkdir(parents=True, exist_ok=True)
    if any(c.isspace() for c in str(storage_dir)):
        raise ValueError(f"dcmqrscp cannot take a storage path with spaces: {storage_dir}")
    hosts = [f"{name} = ({ep.aet}, {ep.host}, {ep.port})" for name, ep in (peers or {}).items()]
    config = storage_dir.parent / f"{storage_dir.name}-dcmqrscp.cfg"
    config.write_text(
        "\n".join(
            [
                # The port given on the command line (dcmtk_server appends it) wins over this.
                "NetworkTCPPort  = 104",
                f"MaxPDUSize      = {max_pdu}",
                "MaxAssociations = 16",
                "",
                "HostTable BEGIN",
                *hosts,
                "HostTable END",
                "",
                "VendorTable BEGIN",
                "VendorTable END",
                "",
                "AETable BEGIN",
                # AETitle StorageArea Access Quota(maxStudies, maxBytesPerStudy) Peers
                f"{aet} {storage_dir} RW (1000, 1024mb) ANY",
                "AETable END",
                "",
            ]
        ),
        encoding="ascii",
    )
    argv = ["dcmqrscp", "-c", str(config), "-dhl", *options]
    with dcmtk_server(argv, aet=aet, log_path=log_path) as endpoint:
        yield endpoint


def storescu(
    peer: Endpoint, files: Sequence[Path], *, options: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` to ``peer`` with DCMTK storescu on one association; raises on failure."""
    require_dcmtk("storescu")
    argv = ["storescu", "-aec", peer.aet, *options, peer.host, str(peer.port), *map(str, files)]
    result = subprocess.run(
        argv, capture_output=True, text=True, env=DCMTK_ENV, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu exited with {result.returncode}:\n{result.stderr}")
    return result
