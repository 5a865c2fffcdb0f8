"""Hostile and broken peers at the PDU level, against a real node over loopback: every case sends
exactly the bytes it scripts (tests/support/rawpeer.py), and then the node must have aborted the
connection (A-ABORT, or closed it), stored nothing (no index row, no object file, no temporary
file), stayed within a small memory bound, and still serve a real echo and a real store.

Also slow peers: 200 connections that say nothing, or one byte at a time, do not keep a real
caller out (they hold no place under limits.max_associations, and at most max_associations of
them are kept waiting (twice max_associations), the oldest closed first).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from pynetdicom.association import Association

from dicomnode.status import Status
from tests.support import reliability
from tests.support.dimse import UNCOMPRESSED, associate, echo
from tests.support.node import RunningNode, run_node
from tests.support.rawpeer import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RQ,
    COMMAND_LAST,
    COMMAND_MORE,
    CT_IMAGE_STORAGE,
    DATA_LAST,
    DATA_MORE,
    IMPLICIT,
    P_DATA_TF,
    RELEASE_RP,
    STUDY_ROOT_FIND,
    VERIFICATION,
    RawPeer,
    associate_rq,
    command_set,
    find_identifier,
    find_rq,
    p_data,
    pdu,
    pdv,
    release_rq,
    small_ct,
    store_rq,
    store_status,
)

DEADLINE = 15.0
RSS_BOUND = 50 * 1024 * 1024
CONTEXTS = [(1, VERIFICATION, [IMPLICIT]), (3, CT_IMAGE_STORAGE, [IMPLICIT])]
STORE_CX = 3
LIMITS = {"network_timeout": 2, "acse_timeout": 2, "max_pdu_size": 16384}


@pytest.fixture(scope="module")
def hostile_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    root = tmp_path_factory.mktemp("hostile") / "node"
    with run_node(root, unknown_peers=["echo", "store", "find"], limits=LIMITS) as node:
        yield node


def rss(node: RunningNode) -> int:
    return int(psutil.Process(node.proc.pid).memory_info().rss)


@pytest.fixture(scope="module")
def baseline(hostile_node: RunningNode) -> dict[str, int]:
    # Warm: one real store and echo first, so the baseline includes what every association costs.
    assert store_status(hostile_node.host, hostile_node.port) == Status.SUCCESS
    assert echo(hostile_node) == Status.SUCCESS
    return {"rss": rss(hostile_node), "peak": rss(hostile_node), "aborts": 0, "cases": 0}


# --- the cases: each a function of a connected raw peer ----------------------------------------
# A case sends its bytes and leaves the connection open; the test then reads until the node
# closes it. One that stops in the middle of a PDU is closed after limits.network_timeout.


def _associated(peer: RawPeer) -> None:
    ac = peer.associate(CONTEXTS)
    assert ac.pdu_type == ASSOCIATE_AC and ac.contexts.get(STORE_CX) == 0, ac


def _stored_uid() -> tuple[str, bytes]:
    return small_ct()


def _store_command(uid: str) -> bytes:
    return p_data(pdv(STORE_CX, COMMAND_LAST, store_rq(CT_IMAGE_STORAGE, uid)))


def rq_length(length: int, body: bytes = b"") -> Callable[[RawPeer], None]:
    def case(peer: RawPeer) -> None:
        peer.send(pdu(ASSOCIATE_RQ, body, length))

    return case


def p_data_length(length: int, associated: bool) -> Callable[[RawPeer], None]:
    def case(peer: RawPeer) -> None:
        if associated:
            _associated(peer)
        peer.send(pdu(P_DATA_TF, b"\x00" * min(length, 64), length))

    return case


def truncated_rq(peer: RawPeer) -> None:
    whole = associate_rq(CONTEXTS)
    peer.send(whole[: len(whole) // 2])


def truncated_data_set(peer: RawPeer) -> None:
    # A store whose data set PDU stops half way: the node has a partial receive to discard.
    _associated(peer)
    uid, data = _stored_uid()
    peer.send(_store_command(uid))
    peer.send(p_data(pdv(STORE_CX, DATA_MORE, data[:4000])))
    piece = p_data(pdv(STORE_CX, DATA_LAST, data[4000:12000]))
    peer.send(piece[: len(piece) // 2])


def unknown_type(pdu_type: int, associated: bool) -> Callable[[RawPeer], None]:
    def case(peer: RawPeer) -> None:
        if associated:
            _associated(peer)
        peer.send(pdu(pdu_type, b"\x00" * 8))

    return case


def pdv_longer_than_pdu(peer: RawPeer) -> None:
    _associated(peer)
    uid, _ = _stored_uid()
    command = store_rq(CT_IMAGE_STORAGE, uid)
    peer.send(p_data(pdv(STORE_CX, COMMAND_LAST, command, length=len(command) + 1000)))


def pdv_length_below_header(peer: RawPeer) -> None:
    _associated(peer)
    peer.send(p_data(pdv(STORE_CX, COMMAND_LAST, b"", length=0)))


def context_never_negotiated(peer: RawPeer) -> None:
    _associated(peer)
    uid, data = _stored_uid()
    peer.send(p_data(pdv(99, COMMAND_LAST, store_rq(CT_IMAGE_STORAGE, uid))))
    peer.send(p_data(pdv(99, DATA_LAST, data[:8000])))


def data_on_a_context_never_negotiated(peer: RawPeer) -> None:
    _associated(peer)
    uid, data = _stored_uid()
    peer.send(_store_command(uid))
    peer.send(p_data(pdv(99, DATA_LAST, data[:8000])))


def command_that_does_not_decode(peer: RawPeer) -> None:
    _associated(peer)
    # A group length that promises more than follows, then an element whose length runs past
    # the end.
    garbage = struct.pack("<HHII", 0, 0, 4, 500) + struct.pack("<HHI", 0, 0x0100, 0xFFFF) + b"x"
    peer.send(p_data(pdv(STORE_CX, COMMAND_LAST, garbage)))


def command_without_command_field(peer: RawPeer) -> None:
    _associated(peer)
    peer.send(p_data(pdv(STORE_CX, COMMAND_LAST, command_set(MessageID=1))))


def data_set_before_command(peer: RawPeer) -> None:
    _associated(peer)
    _, data = _stored_uid()
    peer.send(p_data(pdv(STORE_CX, DATA_LAST, data[:8000])))


def release_mid_data_set(peer: RawPeer) -> None:
    _associated(peer)
    uid, data = _stored_uid()
    peer.send(_store_command(uid))
    peer.send(p_data(pdv(STORE_CX, DATA_MORE, data[:8000])))
    peer.send(release_rq())


def release_mid_command(peer: RawPeer) -> None:
    _associated(peer)
    uid, _ = _stored_uid()
    command = store_rq(CT_IMAGE_STORAGE, uid)
    peer.send(p_data(pdv(STORE_CX, COMMAND_MORE, command[:20])))
    peer.send(release_rq())


def second_associate_rq(peer: RawPeer) -> None:
    _associated(peer)
    peer.send(associate_rq(CONTEXTS))


def release_rq_too_long(peer: RawPeer) -> None:
    _associated(peer)
    peer.send(pdu(0x05, b"\x00" * 16))


CASES: dict[str, Callable[[RawPeer], None]] = {
    "associate-rq length 0": rq_length(0),
    "associate-rq length 1": rq_length(1, b"\x00"),
    "associate-rq length 4 GB": rq_length(0xFFFFFFFF, b"\x00" * 64),
    "associate-rq truncated": truncated_rq,
    "p-data before association, length 0": p_data_length(0, associated=False),
    "p-data before association, length 4 GB": p_data_length(0xFFFFFFFF, associated=False),
    "p-data length 0": p_data_length(0, associated=True),
    "p-data length 1": p_data_length(1, associated=True),
    "p-data length 4 GB": p_data_length(0xFFFFFFFF, associated=True),
    "data set truncated mid-PDU": truncated_data_set,
    "unknown PDU type before association": unknown_type(0x08, associated=False),
    "unknown PDU type 0xFF": unknown_type(0xFF, associated=True),
    "PDV longer than its PDU": pdv_longer_than_pdu,
    "PDV length 0": pdv_length_below_header,
    "command on a context never negotiated": context_never_negotiated,
    "data set on a context never negotiated": data_on_a_context_never_negotiated,
    "command set that does not decode": command_that_does_not_decode,
    "command set without a command field": command_without_command_field,
    "data set before any command": data_set_before_command,
    "A-RELEASE-RQ mid data set": release_mid_data_set,
    "A-RELEASE-RQ mid command": release_mid_command,
    "second A-ASSOCIATE-RQ": second_associate_rq,
    "A-RELEASE-RQ of 16 bytes": release_rq_too_long,
}
# The node waits for the rest of the PDU until limits.network_timeout, then closes.
DROPPED = {"associate-rq truncated", "data set truncated mid-PDU"}


@pytest.mark.parametrize("name", list(CASES))
def test_broken_peer_is_dropped_and_nothing_is_stored(
    hostile_node: RunningNode, baseline: dict[str, int], name: str
) -> None:
    node = hostile_node
    rows_before = node.rows("SELECT sop_instance_uid FROM instance")
    files_before = node.stored_files()
    with (
        associate(node, [(VERIFICATION, UNCOMPRESSED)]) as bystander,
        RawPeer(node.host, node.port, timeout=DEADLINE) as peer,
    ):
        # Another association, echoing all along: what the broken peer does must not touch it.
        assert bystander.is_established
        stop = threading.Event()
        echoes: list[int] = []
        echoing = threading.Thread(target=keep_echoing, args=(bystander, stop, echoes))
        echoing.start()
        try:
            CASES[name](peer)
            replies = peer.read_until_closed(DEADLINE)
        finally:
            stop.set()
            echoing.join(timeout=DEADLINE)
        # The node ends the connection itself, within its timeouts.
        assert peer.closed, f"{name}: the node kept the connection open; got {replies}"
        assert echoes and set(echoes) == {Status.SUCCESS}, f"{name}: bystander got {echoes}"
        assert bystander.is_established, name
    kinds = [reply.pdu_type for reply in replies]
    # No DIMSE success for anything: whatever came back, no C-STORE-RSP said success.
    statuses = [int(rsp.Status) for rsp in peer.responses(replies) if "Status" in rsp]
    assert Status.SUCCESS not in statuses, f"{name}: {statuses}"
    # Aborted (A-ABORT; a peer that stops mid-PDU is simply dropped after network_timeout),
    # never released as if nothing had happened mid-store.
    assert RELEASE_RP not in kinds, f"{name}: {kinds}"
    assert ABORT in kinds or name in DROPPED, f"{name}: {kinds}"
    if ABORT in kinds:
        baseline["aborts"] += 1
    assert node.proc.poll() is None, f"{name}: the node died"
    # Nothing stored, nothing half-written left behind.
    assert node.rows("SELECT sop_instance_uid FROM instance") == rows_before, name
    assert node.stored_files() == files_before, name
    wait_no_temp_files(node, name)
    # Memory within a small bound of the warmed-up node.
    now = rss(node)
    baseline["peak"] = max(baseline["peak"], now)
    assert now - baseline["rss"] < RSS_BOUND, f"{name}: RSS grew {now - baseline['rss']} bytes"
    # And everyone else is still served: a real echo and a real store.
    assert echo(node) == Status.SUCCESS, name
    assert store_status(node.host, node.port) == Status.SUCCESS, name
    assert len(node.rows("SELECT sop_instance_uid FROM instance")) == len(rows_before) + 1
    baseline["cases"] += 1
    if baseline["cases"] == len(CASES):
        reliability.record(
            "hostile PDUs (tests/test_hostile.py)",
            "every broken or hostile byte stream aborted or closed, nothing stored, "
            "no temporary file left, another association echoing throughout unaffected, a real "
            "echo and store served right after each",
            cases=baseline["cases"],
            aborts_seen=baseline["aborts"],
            peak_rss_growth_mib=round((baseline["peak"] - baseline["rss"]) / 2**20, 1),
        )


def keep_echoing(assoc: Association, stop: threading.Event, statuses: list[int]) -> None:
    """C-ECHO on ``assoc`` every 0.2 s (so the node's network_timeout never ends it) until
    ``stop``; at most 200 of them."""
    for _ in range(200):
        rsp = assoc.send_c_echo()
        statuses.append(int(rsp.Status) if "Status" in rsp else -1)
        if stop.wait(0.2):
            return


def wait_no_temp_files(node: RunningNode, name: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while node.temp_files() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.temp_files() == [], f"{name}: {node.temp_files()}"


def test_release_during_find_is_answered(hostile_node: RunningNode) -> None:
    """An A-RELEASE-RQ right behind a C-FIND-RQ, so that it arrives while the find is being
    answered: the node stops the find and answers A-RELEASE-RP (PS3.8 7.2: the requestor has
    nothing more to send), instead of leaving the caller waiting until limits.network_timeout
    and then aborting (pynetdicom's Q/R loop takes the A-RELEASE-RQ off the queue and never
    answers it)."""
    node = hostile_node
    for _ in range(3):  # studies to match, so the find has pending responses to send
        assert store_status(node.host, node.port) == Status.SUCCESS
    with RawPeer(node.host, node.port, timeout=DEADLINE) as peer:
        ac = peer.associate([(1, STUDY_ROOT_FIND, [IMPLICIT])])
        assert ac.pdu_type == ASSOCIATE_AC and ac.contexts.get(1) == 0, ac
        query = p_data(pdv(1, COMMAND_LAST, find_rq())) + p_data(
            pdv(1, DATA_LAST, find_identifier())
        )
        assert peer.send(query + release_rq())
        replies = peer.read_until_closed(DEADLINE)
        assert peer.closed, f"the node kept the connection open; got {replies}"
    kinds = [reply.pdu_type for reply in replies]
    # Released, not aborted (an abort here is the network timeout giving up on us).
    assert kinds[-1] == RELEASE_RP and ABORT not in kinds, kinds
    statuses = [int(rsp.Status) for rsp in peer.responses(replies) if "Status" in rsp]
    assert all(s in (Status.PENDING, Status.SUCCESS) for s in statuses), statuses
    assert node.proc.poll() is None
    assert echo(node) == Status.SUCCESS
    reliability.record(
        "A-RELEASE-RQ during a C-FIND",
        "the find stopped and the release answered with A-RELEASE-RP; no abort, no hang "
        "until the network timeout",
        responses_before_release=len(statuses),
    )


# --- slow peers ---------------------------------------------------------------------------------

IDLE = 100
DRIPPING = 100
KEPT = 2 * 16  # connections kept waiting for an A-ASSOCIATE-RQ: twice max_associations


def test_200_idle_and_dripping_connections_do_not_keep_a_real_caller_out(tmp_path: Path) -> None:
    # The default acse_timeout (30 s) and max_associations (16): idle sockets would hold every
    # place for 30 s if they counted as associations.
    with run_node(tmp_path / "node", unknown_peers=["echo", "store"]) as node:
        start_rss = rss(node)
        idle = [socket.create_connection((node.host, node.port)) for _ in range(IDLE)]
        dripping = [socket.create_connection((node.host, node.port)) for _ in range(DRIPPING)]
        stop = threading.Event()
        request = associate_rq(CONTEXTS)

        def drip() -> None:
            # One byte of an A-ASSOCIATE-RQ per connection per turn, until told to stop (the
            # request is longer than the turns this test lasts).
            sent = 0
            deadline = time.monotonic() + 4 * DEADLINE
            while not stop.is_set() and sent < len(request) and time.monotonic() < deadline:
                for sock in dripping:
                    # OSError: closed by the node, which had newer connections waiting.
                    with contextlib.suppress(OSError):
                        sock.send(request[sent : sent + 1])
                sent += 1
                stop.wait(0.1)

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            # All 200 are connected (in the node's accept queue, or accepted), so the real
            # caller's connection is accepted after them. It associates, echoes and stores while
            # all 200 are still open on our side (pynetdicom's own timeouts bound each step).
            assert echo(node) == Status.SUCCESS
            assert store_status(node.host, node.port) == Status.SUCCESS
            assert len(node.rows("SELECT sop_instance_uid FROM instance")) == 1
            threads = psutil.Process(node.proc.pid).num_threads()
            # At most KEPT waiting connections: two threads each, plus the node's own; never two
            # per each of the 200.
            assert threads < KEPT * 2 + 40, threads
            assert rss(node) - start_rss < RSS_BOUND
        finally:
            stop.set()
            dripper.join(timeout=DEADLINE)
            for sock in idle + dripping:
                sock.close()
        evicted = node.log().count("no A-ASSOCIATE-RQ yet")
        assert evicted >= IDLE + DRIPPING - KEPT
        reliability.record(
            "slow peers (tests/test_hostile.py)",
            "200 idle or byte-at-a-time connections held no association place; a real caller "
            "echoed and stored at once; the oldest waiting connections were closed",
            connections_held=IDLE + DRIPPING,
            waiting_connections_closed=evicted,
            node_threads=threads,
        )
