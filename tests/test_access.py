"""Access control and association limits against a real node: a peer's AE title counts only
from its hosts, the called AE title can be required, and peers that connect and say nothing,
stop mid-PDU or declare a 4 GB PDU neither block nor exhaust the node."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from dicomnode.status import Status
from tests.conftest import require_dcmtk
from tests.support.dimse import UNCOMPRESSED, echo
from tests.support.node import RunningNode, run_node

VERIFICATION = "1.2.840.10008.1.1"
DEADLINE = 30.0
# PS3.8 9.3.4 A-ASSOCIATE-RJ (result, source, reason)
CALLING_AE_NOT_RECOGNIZED = (1, 1, 3)
CALLED_AE_NOT_RECOGNIZED = (1, 1, 7)
A_ABORT = 0x07


def modality(**settings: Any) -> dict[str, Any]:
    peer = {"ae_title": "MODALITY", "host": "127.0.0.1", "port": 104, "services": ["echo"]}
    peer.update(settings)
    return {"MODALITY": peer}


def try_echo(
    node: RunningNode, calling: str = "MODALITY", called: str | None = None, source: str = ""
) -> tuple[bool, tuple[int, int, int] | None]:
    """(established, (result, source, reason) of an A-ASSOCIATE-RJ or None)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = DEADLINE
    ae.add_requested_context(VERIFICATION, UNCOMPRESSED)
    bind = (source, 0) if source else None
    kwargs: dict[str, Any] = {"bind_address": bind} if bind else {}
    assoc = ae.associate(node.host, node.port, ae_title=called or node.ae_title, **kwargs)
    try:
        if assoc.is_established:
            assert assoc.send_c_echo().Status == Status.SUCCESS
            assoc.release()
            return True, None
        rj = assoc.acceptor.primitive
        if assoc.is_rejected and rj is not None:
            return False, (rj.result, rj.result_source, rj.diagnostic)
        return False, None
    finally:
        ae.shutdown()


def wait_until(check: Callable[[], object], what: str) -> object:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"not within {DEADLINE} s: {what}")


# --- who may call from where ------------------------------------------------------------------


def test_known_ae_title_from_another_address_is_not_that_peer(tmp_path: Path) -> None:
    # Unknown callers may echo, yet a peer's title from elsewhere is refused, not demoted.
    with run_node(tmp_path / "node", peers=modality(), unknown_peers=["echo"]) as node:
        assert try_echo(node, source="127.0.0.1") == (True, None)
        assert try_echo(node, source="127.0.0.2") == (False, CALLING_AE_NOT_RECOGNIZED)
        assert try_echo(node, calling="SOMEONE", source="127.0.0.2") == (True, None)
        log = node.wait_for_log("rejected: the AE title of peer MODALITY from an address not in")
        assert "association from MODALITY at 127.0.0.2:" in log


def test_hosts_take_networks_and_names(tmp_path: Path) -> None:
    peers = modality(hosts=["127.0.0.0/30", "localhost"])
    with run_node(tmp_path / "node", peers=peers, unknown_peers=[]) as node:
        assert try_echo(node, source="127.0.0.2") == (True, None)  # in 127.0.0.0/30
        assert try_echo(node, source="127.0.0.1") == (True, None)
        assert try_echo(node, source="127.0.0.9") == (False, CALLING_AE_NOT_RECOGNIZED)


def test_called_ae_title_checked_when_required(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", require_called_ae_title=True) as node:
        assert try_echo(node, calling="ANYONE") == (True, None)
        assert try_echo(node, calling="ANYONE", called="ANY-SCP") == (
            False,
            CALLED_AE_NOT_RECOGNIZED,
        )
        node.wait_for_log("called AE title 'ANY-SCP' is not this node's 'DICOMNODE'")


def test_called_ae_title_not_checked_by_default(node: RunningNode) -> None:
    assert try_echo(node, calling="ANYONE", called="ANY-SCP") == (True, None)


def test_dcmtk_echoscu_with_a_wrong_called_ae_title_is_rejected(tmp_path: Path) -> None:
    require_dcmtk("echoscu")
    with run_node(tmp_path / "node", require_called_ae_title=True) as node:
        ok = subprocess.run(
            ["echoscu", "-aec", node.ae_title, node.host, str(node.port)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert ok.returncode == 0, ok.stderr
        wrong = subprocess.run(
            ["echoscu", "-aec", "SOMEONE-ELSE", node.host, str(node.port)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert wrong.returncode != 0
        assert "Called AE Title Not Recognized" in wrong.stderr + wrong.stdout


# --- peers that misbehave on the wire -----------------------------------------------------------


def wait_closed(sock: socket.socket) -> bytes:
    """Everything the node sends on ``sock`` until it closes it (b"" for nothing)."""
    sock.settimeout(DEADLINE)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_silent_connections_are_dropped_and_do_not_hold_the_node(tmp_path: Path) -> None:
    limits = {"max_associations": 2, "acse_timeout": 1}
    with run_node(tmp_path / "node", limits=limits) as node:
        silent = [socket.create_connection((node.host, node.port)) for _ in range(2)]
        try:
            # Both places are taken by connections that never send A-ASSOCIATE-RQ, until the
            # ACSE timer closes them; then a real caller gets in.
            for sock in silent:
                assert wait_closed(sock) == b""
            # Their threads end a moment after the close.
            wait_until(lambda: try_echo(node, calling="TESTSCU")[0], "an echo gets in")
        finally:
            for sock in silent:
                sock.close()
        node.wait_for_log("closed without an association request (limits.acse_timeout 1 s)")


def test_a_peer_that_stops_mid_pdu_is_dropped(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", limits={"network_timeout": 1}) as node:
        with socket.create_connection((node.host, node.port)) as sock:
            # An A-ASSOCIATE-RQ header announcing 200 bytes, and then only 10 of them.
            sock.sendall(struct.pack(">BBI", 0x01, 0, 200) + b"\x00" * 10)
            assert wait_closed(sock) == b""
        assert echo(node) == Status.SUCCESS


@pytest.mark.parametrize("pdu_type", [0x01, 0x04, 0x07])
def test_a_4_gb_pdu_is_refused_without_reading_it(tmp_path: Path, pdu_type: int) -> None:
    with run_node(tmp_path / "node") as node:
        with socket.create_connection((node.host, node.port)) as sock:
            sock.sendall(struct.pack(">BBI", pdu_type, 0, 0xFFFFFFFF) + b"\x00" * 64)
            assert wait_closed(sock)[:1] == bytes([A_ABORT])
        node.wait_for_log(f"a PDU of type 0x{pdu_type:02X} declares 4294967295 bytes")
        assert echo(node) == Status.SUCCESS


def test_an_oversized_p_data_on_an_open_association_aborts_it(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", limits={"max_pdu_size": 16384}) as node:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(VERIFICATION, UNCOMPRESSED)
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        try:
            assert assoc.is_established
            assert assoc.acceptor.maximum_length == 16384
            raw = assoc.dul.socket.socket
            raw.sendall(struct.pack(">BBI", 0x04, 0, 16384 + 1024 + 1))
            wait_until(lambda: assoc.is_aborted, "the node aborts the association")
        finally:
            ae.shutdown()
        node.wait_for_log("declares 17409 bytes, more than the 17408 allowed")
        assert echo(node) == Status.SUCCESS
