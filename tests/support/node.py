"""Run a real dicomnode (``dicomnode serve`` in a subprocess) for tests, on a free port."""

from __future__ import annotations

import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

START_TIMEOUT = 30.0


@dataclass
class RunningNode:
    root: Path
    config_path: Path
    ae_title: str
    host: str
    port: int
    proc: subprocess.Popen[str]
    log_path: Path
    # The DICOM TLS port, with tls.enabled; port is then 0 if tls.only.
    tls_port: int | None = None

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def database(self) -> Path:
        return self.root / "index.sqlite"

    @property
    def address(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rows(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        """Query the node's real index file (read-only, its own connection)."""
        con = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=10)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def instance(self, sop_instance_uid: str) -> sqlite3.Row | None:
        found = self.rows("SELECT * FROM instance WHERE sop_instance_uid = ?", sop_instance_uid)
        return found[0] if found else None

    def stored_files(self) -> list[Path]:
        return sorted(p for p in (self.storage / "objects").rglob("*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return sorted((self.storage / "tmp").iterdir())

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it contains ``text`` (the node writes a line per event, flushed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log()
            if text in content:
                return content
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged within {timeout}s; log:\n{self.log()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m dicomnode.cli --config <this node's config> ARGS``, as a user runs it."""
        return subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def write_config(root: Path, ae_title: str = "DICOMNODE", **settings: Any) -> Path:
    """A configuration for a node rooted at ``root`` listening on a free loopback port."""
    root.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "ae_title": ae_title,
        "host": "127.0.0.1",
        "port": 0,
        "storage_dir": "storage",
        "database": "index.sqlite",
        "log_level": "DEBUG",
        "store": {"min_free_space": 0},
        # A test that leaves an association open at the end should not wait the default 30 s.
        "service": {"stop_grace": 5},
        # One process, as the tests were written for; tests of several pass workers=N.
        # DICOMNODE_TEST_WORKERS=N runs every other test against N worker processes.
        "workers": _test_workers(),
    }
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = root / "dicomnode.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _test_workers() -> int | str:
    value = os.environ.get("DICOMNODE_TEST_WORKERS", "1")
    return int(value) if value.isdigit() else value


@contextmanager
def run_node(
    root: Path,
    conformance: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    **settings: Any,
) -> Iterator[RunningNode]:
    """Start ``dicomnode serve`` and yield once it prints its listening line; stop it after."""
    if conformance is not None:
        (root / "conformance.yaml").parent.mkdir(parents=True, exist_ok=True)
        (root / "conformance.yaml").write_text(yaml.safe_dump(conformance), encoding="utf-8")
        settings["conformance"] = "conformance.yaml"
    config = write_config(root, **settings)
    log_path = root / "node.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=env,
        )
    try:
        tls = settings.get("tls") or {}
        expected = {"plain": not tls.get("only", False), "tls": bool(tls.get("enabled", False))}
        listening = _await_listening(proc, log_path, expected)
        host = next(iter(listening.values()))[0]
        node = RunningNode(
            root=root,
            config_path=config,
            ae_title=settings.get("ae_title", "DICOMNODE"),
            host=host,
            port=listening.get("plain", (host, 0))[1],
            proc=proc,
            log_path=log_path,
            tls_port=listening["tls"][1] if "tls" in listening else None,
        )
        yield node
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _await_listening(
    proc: subprocess.Popen[str], log_path: Path, expected: dict[str, bool]
) -> dict[str, tuple[str, int]]:
    """(host, port) of each listener ("plain", "tls") as ``dicomnode serve`` prints them."""
    assert proc.stdout is not None
    wanted = {kind for kind, on in expected.items() if on}
    found: dict[str, tuple[str, int]] = {}
    pending = b""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                break
            # Raw reads: the node prints its listening lines in one write, and a buffered
            # readline would leave the second in Python's buffer, where select cannot see it.
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:  # the node exited
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in (raw.decode("utf-8", "replace") for raw in lines):
                for kind, marker in (
                    ("tls", " listening for DICOM TLS on "),
                    ("plain", " listening on "),
                ):
                    if marker in line:
                        address = line.rsplit(marker, 1)[1].strip()
                        host, _, port = address.rpartition(":")
                        found[kind] = (host, int(port))
                        break
            if wanted <= set(found):
                return found
    finally:
        selector.close()
    proc.kill()
    proc.wait()
    raise RuntimeError(f"dicomnode did not start; log:\n{log_path.read_text()}")
