"""The node as a service: systemd's notify protocol, SIGTERM with associations in flight, SIGHUP
reloads (good and bad), each with one process and with worker processes."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom import dcmread
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicomnode.status import ExitCode, Status
from tests.support.corpus import TEST_FILES, dataset_bytes
from tests.support.dimse import UNCOMPRESSED, associate, context_id, echo, store_file
from tests.support.node import RunningNode, run_node, write_config

VERIFICATION = "1.2.840.10008.1.1"
CT_FILE = TEST_FILES / "CT_small.dcm"
MR_FILE = TEST_FILES / "MR_small.dcm"  # about 10 KB of pixel data: many PDUs of 4 KiB
WORKERS = [pytest.param(1, id="one-process"), pytest.param(2, id="two-workers")]
DEADLINE = 30.0


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A stand-in for systemd's notify socket: a Unix datagram socket we read."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(DEADLINE)
    try:
        yield path, sock
    finally:
        sock.close()


def next_message(sock: socket.socket, key: str) -> dict[str, str]:
    """The next notify message that sets ``key`` (earlier ones are skipped)."""
    while True:
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        if key in fields:
            return fields


def audit_records(node: RunningNode) -> list[dict[str, object]]:
    path = node.root / "var" / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def wait_until(check: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {DEADLINE} s: {what}")


def refused(node: RunningNode) -> bool:
    """No new connection is accepted on the node's port."""
    try:
        with socket.create_connection((node.host, node.port), timeout=2) as sock:
            # Accepted by the kernel: a node that stopped listening would have refused it.
            sock.settimeout(2)
            return sock.recv(1) == b""
    except OSError:
        return True


# --- systemd notify ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
def test_notify_ready_reloading_stopping(
    tmp_path: Path, notify: tuple[Path, socket.socket], workers: int
) -> None:
    path, sock = notify
    with run_node(tmp_path / "node", env={"NOTIFY_SOCKET": str(path)}, workers=workers) as node:
        ready = next_message(sock, "READY")
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"DICOMNODE listening on port {node.port}"
        node.proc.send_signal(signal.SIGHUP)
        reloading = next_message(sock, "RELOADING")
        # systemd compares it with CLOCK_MONOTONIC: it must be the time of the reload.
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_usec - int(reloading["MONOTONIC_USEC"]) < DEADLINE * 1e6
        assert next_message(sock, "READY")["READY"] == "1"
        assert node.stop() == 0
        stopping = next_message(sock, "STOPPING")
        assert stopping["STATUS"] == "stopping (SIGTERM)"
    # Only the main process speaks to systemd (NotifyAccess=main): one READY, not one a worker.
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        next_message(sock, "READY")


# --- SIGTERM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
def test_sigterm_lets_the_association_in_flight_finish(tmp_path: Path, workers: int) -> None:
    with (
        run_node(tmp_path / "node", workers=workers, service={"stop_grace": 60}) as node,
        associate(node, [(str(dcmread(CT_FILE).SOPClassUID), UNCOMPRESSED)]) as assoc,
    ):
        assert assoc.is_established
        node.proc.send_signal(signal.SIGTERM)
        node.wait_for_log("waiting up to 60 s for 1 association(s) in flight to finish")
        # Stopping: no new connection is taken...
        wait_until(lambda: refused(node), "the port refuses new connections")
        # ...while the open association is still served, and what it stores is kept.
        assert store_file(assoc, CT_FILE) == Status.SUCCESS
        assoc.release()
        assert node.proc.wait(timeout=DEADLINE) == 0
        uid = str(dcmread(CT_FILE).SOPInstanceUID)
        row = node.instance(uid)
        assert row is not None
        stored = node.storage / row["path"]
        assert dataset_bytes(stored) == dataset_bytes(CT_FILE)
        records = audit_records(node)
        assert records[-1]["event"] == "application-stop"
        assert records[-1]["reason"] == "SIGTERM"


def _partial_store(assoc: object, path: Path) -> None:
    """Send a C-STORE request and all but the last fragment of its data set, then stop."""
    ds = dcmread(path)
    cx = context_id(assoc, str(ds.SOPClassUID))  # type: ignore[arg-type]
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encode(ds, True, True))  # implicit VR little endian
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdatas = list(message.encode_msg(cx, 4096))
    assert len(pdatas) > 3
    for pdata in pdatas[:-1]:
        assoc.dul.send_pdu(pdata)  # type: ignore[attr-defined]


def test_sigterm_aborts_what_is_still_open_after_the_grace(tmp_path: Path) -> None:
    """A store cut off by the stop is never acknowledged and leaves nothing behind."""
    ds = dcmread(MR_FILE)
    with (
        run_node(
            tmp_path / "node", service={"stop_grace": 1}, limits={"max_pdu_size": 4096}
        ) as node,
        associate(node, [(str(ds.SOPClassUID), [str(pydicom.uid.ImplicitVRLittleEndian)])]) as a,
    ):
        assert a.is_established
        _partial_store(a, MR_FILE)
        wait_until(lambda: node.temp_files(), "the partial data set is being received")
        node.proc.send_signal(signal.SIGTERM)
        # Aborting at the end of the grace is the configured stop, not a failure.
        assert node.proc.wait(timeout=DEADLINE) == 0
        wait_until(lambda: a.is_aborted or not a.is_established, "the association is aborted")
        log = node.log()
        assert "aborting the association from TESTSCU: still open 1 s after the stop" in log
        assert "ended mid-transfer: 1 partial data set(s) discarded" in log
        assert node.temp_files() == []
        assert node.stored_files() == []
        assert node.rows("SELECT count(*) AS n FROM instance")[0]["n"] == 0


# --- SIGHUP -------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
def test_sighup_reload_bad_then_good(tmp_path: Path, workers: int) -> None:
    with (
        run_node(tmp_path / "node", workers=workers, unknown_peers=["echo"]) as node,
        associate(node, [(VERIFICATION, UNCOMPRESSED)]) as inflight,
    ):
        assert inflight.is_established
        original = yaml.safe_load(node.config_path.read_text(encoding="utf-8"))

        # A file that does not validate: logged, audited, and the node goes on as it was.
        node.config_path.write_text("limits:\n  max_associations: many\n", encoding="utf-8")
        node.proc.send_signal(signal.SIGHUP)
        log = node.wait_for_log("configuration reload failed, keeping the running configuration")
        assert "limits.max_associations" in log
        assert echo(node) == Status.SUCCESS
        assert inflight.send_c_echo().Status == Status.SUCCESS

        # A good one: unknown callers may now do nothing. A change only a restart can make is
        # named and left as it runs.
        changed = {**original, "unknown_peers": [], "port": node.port + 1}
        node.config_path.write_text(yaml.safe_dump(changed), encoding="utf-8")
        node.proc.send_signal(signal.SIGHUP)
        # The supervisor, then each worker, reads it.
        wait_until(
            lambda: node.log().count("configuration reloaded from") >= (1 if workers == 1 else 3),
            "every process reloaded",
        )
        assert "configuration reload: port changed; that takes effect at the next restart" in (
            node.log()
        )
        with associate(node, [(VERIFICATION, UNCOMPRESSED)]) as refused_now:
            assert not refused_now.is_established
        # The association in flight keeps what it negotiated.
        assert inflight.send_c_echo().Status == Status.SUCCESS

    reloads = [r for r in audit_records(node) if r["event"] == "config-reload"]
    assert [r["outcome"] for r in reloads] == ["failure", "success"]
    assert "limits.max_associations" in str(reloads[0]["error"])
    assert reloads[1]["source"] == str(node.config_path)


# --- journald ------------------------------------------------------------------------------------


def test_log_lines_take_journald_form_when_stderr_is_the_journal(tmp_path: Path) -> None:
    """Under systemd ($JOURNAL_STREAM names stderr) each event is one line with its syslog
    priority and no timestamp of its own; elsewhere lines keep their timestamps."""
    root = tmp_path / "node"
    root.mkdir()
    log_file = root / "node.log"  # run_node sends stderr here (opened again, same inode)
    log_file.touch()
    st = log_file.stat()
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with run_node(root, env=env, unknown_peers=[]) as node:
        with associate(node, [(VERIFICATION, UNCOMPRESSED)]) as rejected:
            assert not rejected.is_established
        log = node.wait_for_log("rejected: calling AE title not allowed any service")
    lines = log.splitlines()
    assert lines and all(re.match(r"^<[2-7]>[a-z_.]+(\[\d+\])?: ", line) for line in lines), log
    assert any(line.startswith("<6>dicomnode.ae: DICOMNODE listening on") for line in lines)
    assert any(line.startswith("<4>dicomnode.handlers.association: association") for line in lines)


def test_log_lines_keep_timestamps_elsewhere(node: RunningNode) -> None:
    first = node.log().splitlines()[0]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO) ", first), first


# --- check-config --------------------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(path), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_says_ok_or_what_is_wrong(tmp_path: Path) -> None:
    good = write_config(tmp_path / "good")
    done = check_config(good)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{good.resolve()}: OK (DICOMNODE on port 0, 0 peers, ")

    missing_key = write_config(
        tmp_path / "tls",
        tls={"enabled": True, "certificate": "node.crt", "private_key": "node.key"},
    )
    done = check_config(missing_key)
    assert done.returncode == ExitCode.USAGE
    assert "tls.ca_certificates" in done.stderr  # required with client certificates

    unreadable = write_config(
        tmp_path / "files",
        tls={
            "enabled": True,
            "certificate": "node.crt",
            "private_key": "node.key",
            "client_certificates": "none",
        },
    )
    done = check_config(unreadable)
    assert done.returncode == ExitCode.USAGE
    assert "tls.certificate" in done.stderr and "node.crt" in done.stderr

    bad_policy = write_config(tmp_path / "policy", conformance="missing.yaml")
    done = check_config(bad_policy)
    assert done.returncode == ExitCode.USAGE
    assert "missing.yaml" in done.stderr
