"""A mutation fuzzer over valid association byte streams, against a real node over loopback.

Three valid streams are built (tests/support/rawpeer.py) and checked once as they are: an
association with a C-ECHO, one with a C-STORE of a small CT, one with a C-FIND; each ends with
A-RELEASE-RQ. Each case mutates one of them (bit flips, bytes inserted or deleted, PDU and PDV
length fields changed, truncation, PDUs reordered, duplicated or dropped), sends it on a raw
connection and reads what the node answers until it closes the connection.

The node must never crash (its process is alive after every batch of cases and answers a real
echo), never hang (it closes every connection within its timeouts), and never answer success for
a data set it did not store: at the end, every instance a C-STORE-RSP said success for is in the
index with its file, the index holds nothing the fuzzer did not send, and no temporary file is
left.

Seeded: ``DICOMNODE_FUZZ_SEED`` replays a run (the seed is in every assertion message), and case
``i`` depends only on the seed and ``i``. Bounded: ``DICOMNODE_FUZZ_CASES`` cases (default 240) in
batches of concurrent connections, and no more than ``FUZZ_SECONDS`` of them.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from dicomnode.status import Status
from tests.support import reliability
from tests.support.dimse import echo
from tests.support.node import RunningNode, run_node
from tests.support.rawpeer import (
    ABORT,
    ASSOCIATE_AC,
    COMMAND_LAST,
    CT_IMAGE_STORAGE,
    DATA_LAST,
    IMPLICIT,
    P_DATA_TF,
    STUDY_ROOT_FIND,
    VERIFICATION,
    RawPeer,
    associate_rq,
    echo_rq,
    find_identifier,
    find_rq,
    fragments,
    p_data,
    pdv,
    release_rq,
    small_ct,
    store_rq,
)

CASES = int(os.environ.get("DICOMNODE_FUZZ_CASES", "240"))
FUZZ_SECONDS = 60.0
BATCH = 8  # concurrent connections, under max_associations (16)
CASE_DEADLINE = 15.0  # the node closes within network_timeout (1 s) of the last byte; far more
RSS_BOUND = 100 * 1024 * 1024
LIMITS = {"network_timeout": 1, "acse_timeout": 1, "dimse_timeout": 5, "max_pdu_size": 16384}
CONTEXTS = [
    (1, VERIFICATION, [IMPLICIT]),
    (3, CT_IMAGE_STORAGE, [IMPLICIT]),
    (5, STUDY_ROOT_FIND, [IMPLICIT]),
]
KINDS = ("echo", "store", "find")


def seed() -> int:
    value = os.environ.get("DICOMNODE_FUZZ_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**32)


def valid_stream(kind: str, uid: str) -> list[bytes]:
    """The PDUs of a valid association doing ``kind``; a store sends instance ``uid``."""
    stream = [associate_rq(CONTEXTS, calling="FUZZER")]
    if kind == "echo":
        stream.append(p_data(pdv(1, COMMAND_LAST, echo_rq())))
    elif kind == "store":
        _, data = small_ct(uid)
        stream.append(p_data(pdv(3, COMMAND_LAST, store_rq(CT_IMAGE_STORAGE, uid))))
        stream.extend(fragments(3, DATA_LAST, data, size=8192))
    else:
        stream.append(p_data(pdv(5, COMMAND_LAST, find_rq())))
        stream.append(p_data(pdv(5, DATA_LAST, find_identifier())))
    stream.append(release_rq())
    return stream


_LENGTHS = (0, 1, 2, 5, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


def _length_field(pdus: list[bytes], rng: random.Random) -> str:
    """Change a PDU's length field, or the length of a P-DATA-TF's first PDV item."""
    i = rng.randrange(len(pdus))
    raw = bytearray(pdus[i])
    real = len(raw) - 6
    if raw[0] == P_DATA_TF and len(raw) >= 10 and rng.random() < 0.5:
        value = rng.choice([*_LENGTHS, real - 4 + rng.randint(-3, 3)]) & 0xFFFFFFFF
        raw[6:10] = struct.pack(">I", value)
        what = f"PDV length of PDU {i} = {value}"
    else:
        value = rng.choice([*_LENGTHS, real + rng.randint(-3, 3)]) & 0xFFFFFFFF
        raw[2:6] = struct.pack(">I", value)
        what = f"length of PDU {i} = {value}"
    pdus[i] = bytes(raw)
    return what


def mutate(stream: list[bytes], rng: random.Random) -> tuple[list[bytes], list[str]]:
    """One to three mutations of ``stream``, of its PDUs or of the bytes of one of them (a PDU
    whose bytes no longer match its length field shifts every boundary after it)."""
    pdus = list(stream)
    done: list[str] = []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["flip", "insert", "delete", "length", "truncate", "swap", "dup", "drop"])
        if op == "length":
            done.append(_length_field(pdus, rng))
        elif op == "swap" and len(pdus) > 1:
            a, b = rng.sample(range(len(pdus)), 2)
            pdus[a], pdus[b] = pdus[b], pdus[a]
            done.append(f"swap PDUs {a} {b}")
        elif op == "dup":
            i = rng.randrange(len(pdus))
            pdus.insert(rng.randrange(len(pdus) + 1), pdus[i])
            done.append(f"duplicate PDU {i}")
        elif op == "drop" and len(pdus) > 1:
            i = rng.randrange(len(pdus))
            del pdus[i]
            done.append(f"drop PDU {i}")
        else:
            i = rng.randrange(len(pdus))
            data = bytearray(pdus[i])
            if not data:  # truncated to nothing by an earlier mutation: nothing to change
                continue
            at = rng.randrange(len(data))
            if op == "flip":
                data[at] ^= 1 << rng.randrange(8)
                done.append(f"flip a bit at {at} of PDU {i}")
            elif op == "insert":
                data[at:at] = bytes([rng.randrange(256)] * rng.randint(1, 4))
                done.append(f"insert at {at} of PDU {i}")
            elif op == "delete":
                del data[at : at + rng.randint(1, 4)]
                done.append(f"delete at {at} of PDU {i}")
            else:
                del data[at:]
                del pdus[i + 1 :]
                done.append(f"truncate at {at} of PDU {i}")
            pdus[i] = bytes(data)
    return pdus, done


@dataclass
class Outcome:
    closed: bool = False
    aborted: bool = False
    acknowledged: list[str] = field(default_factory=list)  # UIDs a C-STORE-RSP said success for
    error: str = ""


PENDING = (0xFF00, 0xFF01)  # PS3.4 C.4.1.1.4: more C-FIND responses follow
RELEASE = release_rq()


def run_case(node: RunningNode, pdus: list[bytes], outcome: Outcome) -> None:
    """Send the first PDU (the A-ASSOCIATE-RQ, unless mutated away) and, if the node accepts,
    the rest (PS3.8 9.2: P-DATA only once the association is established); a final
    A-RELEASE-RQ only once the last request is answered (or the node has closed), as a real
    requestor does. Then read all the node answers until it closes the connection."""
    try:
        with RawPeer(node.host, node.port, timeout=CASE_DEADLINE) as peer:
            deadline = time.monotonic() + CASE_DEADLINE
            replies = []
            commands = []

            def read(until_final: bool) -> None:
                while (reply := peer.read_pdu(max(0.0, deadline - time.monotonic()))) is not None:
                    replies.append(reply)
                    answered = peer.responses([reply])
                    commands.extend(answered)
                    final = any(c.get("Status") not in PENDING for c in answered)
                    if until_final and (final or reply.pdu_type == ABORT):
                        return

            peer.send(pdus[0])
            first = peer.read_pdu(CASE_DEADLINE)
            if first is not None:
                replies.append(first)
            if first is not None and first.pdu_type == ASSOCIATE_AC:
                rest, tail = (pdus[1:-1], pdus[-1:]) if pdus[-1] == RELEASE else (pdus[1:], [])
                peer.send(b"".join(rest))
                if tail:
                    read(until_final=True)
                    peer.send(tail[0])
            read(until_final=False)
            outcome.closed = peer.closed
            outcome.aborted = any(reply.pdu_type == ABORT for reply in replies)
            for rsp in commands:
                # C-STORE-RSP (PS3.7 9.3.1.2) with status success
                if rsp.get("CommandField") == 0x8001 and rsp.get("Status") == Status.SUCCESS:
                    outcome.acknowledged.append(str(rsp.AffectedSOPInstanceUID))
    except OSError as exc:
        outcome.error = f"connection failed: {exc!r}"
    except Exception as exc:  # the node's own responses must always decode
        outcome.error = f"undecodable response: {exc!r}"


@pytest.mark.slow
def test_mutated_streams_never_crash_hang_or_acknowledge_what_was_not_stored(
    tmp_path: Path,
) -> None:
    run_seed = seed()
    replay = f"seed {run_seed} (DICOMNODE_FUZZ_SEED={run_seed} replays this run)"
    print(f"fuzz {replay}")
    services = ["echo", "store", "find"]
    with run_node(tmp_path / "node", unknown_peers=services, limits=LIMITS) as node:
        process = psutil.Process(node.proc.pid)
        acknowledged: set[str] = set()
        sent_uids: set[str] = set()

        # The streams as they are work: each association does what it should.
        for kind in KINDS:
            uid = f"2.25.{random.Random(f'{run_seed}:valid:{kind}').getrandbits(96)}"
            outcome = Outcome()
            run_case(node, valid_stream(kind, uid), outcome)
            assert outcome.closed and not outcome.aborted and not outcome.error, (replay, kind)
            if kind == "store":
                assert outcome.acknowledged == [uid], (replay, outcome)
            acknowledged.update(outcome.acknowledged)
        start_rss = peak_rss = process.memory_info().rss

        started = time.monotonic()
        run = aborts = dropped = 0
        for first in range(0, CASES, BATCH):
            if time.monotonic() - started > FUZZ_SECONDS:
                break
            batch = []
            for i in range(first, min(first + BATCH, CASES)):
                rng = random.Random(f"{run_seed}:{i}")
                kind = rng.choice(KINDS)
                uid = f"2.25.{rng.getrandbits(96)}"
                data, mutations = mutate(valid_stream(kind, uid), rng)
                batch.append((i, kind, mutations, data, Outcome()))
                sent_uids.add(uid)
            threads = [
                threading.Thread(target=run_case, args=(node, data, outcome), daemon=True)
                for _, _, _, data, outcome in batch
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=2 * CASE_DEADLINE)
            for (i, kind, mutations, _, outcome), thread in zip(batch, threads, strict=True):
                what = f"{replay}, case {i} ({kind}: {'; '.join(mutations)})"
                assert not thread.is_alive(), f"the peer thread hung: {what}"
                assert not outcome.error, f"{outcome.error}: {what}"
                assert outcome.closed, f"the node kept the connection open: {what}"
                acknowledged.update(outcome.acknowledged)
                aborts += outcome.aborted
                dropped += not outcome.aborted
            run += len(batch)
            assert node.proc.poll() is None, f"the node died: {replay}, cases up to {run}"
            assert echo(node) == Status.SUCCESS, f"no echo after cases up to {run}: {replay}"
            peak_rss = max(peak_rss, process.memory_info().rss)
            assert peak_rss - start_rss < RSS_BOUND, f"RSS grew {peak_rss - start_rss}: {replay}"

        # Every acknowledged instance is stored, with its file. The other way round cannot hold
        # under mutation: a store completes, then a broken PDU after it (a mutated A-RELEASE-RQ,
        # a duplicated fragment) aborts the association before the C-STORE-RSP goes out. That
        # instance is stored and unacknowledged, the safe side: its sender must send it again.
        rows = node.rows("SELECT sop_instance_uid, path FROM instance")
        stored = {str(row["sop_instance_uid"]) for row in rows}
        assert acknowledged - stored == set(), f"acknowledged but not stored: {replay}"
        assert all((node.storage / row["path"]).is_file() for row in rows), replay
        assert len(node.stored_files()) == len(rows), replay
        unacknowledged = stored - acknowledged
        assert all(uid in sent_uids for uid in unacknowledged), (replay, unacknowledged)
        deadline = time.monotonic() + CASE_DEADLINE
        while node.temp_files() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.temp_files() == [], f"{node.temp_files()}: {replay}"
        assert node.proc.poll() is None, replay

    reliability.record(
        "mutation fuzzer (tests/test_fuzz.py)",
        "no crash, no hang, every mutated stream closed; every instance acknowledged with "
        "success indexed with its file; no temporary file left",
        seed=run_seed,
        cases_run=run,
        aborts_seen=aborts,
        closed_without_abort=dropped,
        acknowledged_stores=len(acknowledged),
        stored_unacknowledged=len(unacknowledged),
        peak_rss_growth_mib=round((peak_rss - start_rss) / 2**20, 1),
    )
