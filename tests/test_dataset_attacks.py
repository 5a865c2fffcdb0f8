"""Malicious and broken data sets (issue 7), crafted byte by byte and sent to a real node over
real associations: each gets a named failure status with a log line that says why (no patient
data), or -- where the standard allows -- is stored exactly as received. Nothing is stored on
failure (no row, no object, no temp file), the node's memory stays bounded whatever lengths the
data set declares, and the node goes on serving (C-ECHO and a valid C-STORE after each case).

One node serves the whole module (each case checks its own instance UID and the store's
counts), so the figures recorded at the end cover every case sent to it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import build_context, build_role, evt

from dicomnode.status import Status
from tests.support import crafted
from tests.support.crafted import CT, PATIENT_ID, PATIENT_NAME, Instance, element
from tests.support.dimse import associate, context_id, echo, raw_store, store_file
from tests.support.node import RunningNode, run_node
from tests.support.qr import PENDING, STUDY_FIND, STUDY_GET, association, find, identifier
from tests.support.reliability import record

EXPLICIT = str(ExplicitVRLittleEndian)
DEFLATED = str(DeflatedExplicitVRLittleEndian)
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
# Peak resident memory the node may gain over the whole module: generous, and far below the
# gigabytes the data sets declare (a 3 GiB deflate bomb, 0xFFFFFFF0-byte elements).
RSS_BOUND = 300 * 2**20
BOMB = 3 * 2**30
# What an unconfigured caller may do here: store, query and retrieve (C-GET) too.
SERVICES = ["echo", "store", "find", "get"]


@dataclass
class Tally:
    sent: int = 0
    refused: int = 0
    byte_exact: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass
class Target:
    node: RunningNode
    baseline_hwm: int
    tally: Tally


def peak_rss(node: RunningNode) -> int:
    """The node's peak resident set (VmHWM, Linux), over its process and any workers."""
    total = 0
    proc = psutil.Process(node.proc.pid)
    for p in [proc, *proc.children(recursive=True)]:
        status = Path(f"/proc/{p.pid}/status").read_text()
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        total += int(found.group(1)) * 1024 if found else p.memory_info().rss
    return total


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with run_node(tmp_path_factory.mktemp("attacks") / "node", unknown_peers=SERVICES) as node:
        # Warm up (imports, first association, first store) before measuring.
        with associate(node, [(CT, [EXPLICIT])]) as assoc:
            assert store_file(assoc, CT_SMALL) == Status.SUCCESS
        found = Target(node, peak_rss(node), Tally())
        yield found
        growth = peak_rss(node) - found.baseline_hwm
        assert growth < RSS_BOUND, f"node peak RSS grew {growth >> 20} MiB"
        assert node.proc.poll() is None, "the node exited"
        record(
            "malicious data sets",
            "each refused with a named status and a logged reason, or stored byte-exact where "
            "PS3.5 allows; nothing half-stored; memory bounded; the node kept serving",
            cases_sent=found.tally.sent,
            refused=found.tally.refused,
            stored_byte_exact=found.tally.byte_exact,
            peak_rss_growth_mib=round(growth / 2**20, 1),
        )


def objects(node: RunningNode) -> int:
    return len(node.stored_files())


def send(target: Target, data: bytes, sop_instance: str, syntax: str = EXPLICIT) -> int:
    target.tally.sent += 1
    with associate(target.node, [(CT, [syntax])]) as assoc:
        assert assoc.is_established
        return raw_store(assoc, context_id(assoc, CT, syntax), CT, sop_instance, data)


def assert_refused(target: Target, before: int, sop_instance: str, status: int, why: str) -> None:
    """Refused with ``status``, logged with ``why``; nothing of it stored; node still serves."""
    node = target.node
    assert status == Status.CANNOT_UNDERSTAND, f"0x{status:04X}"
    log = node.wait_for_log(f"{why}")
    line = next(x for x in log.splitlines() if sop_instance in x and "failed" in x)
    assert why in line and "0xC000" in line, line
    assert node.instance(sop_instance) is None
    assert objects(node) == before
    assert node.temp_files() == []
    target.tally.refused += 1
    target.tally.reasons.append(why)
    assert_serving(target)


def assert_stored_as_sent(target: Target, sop_instance: str, data: bytes) -> Path:
    row = target.node.instance(sop_instance)
    assert row is not None
    path = target.node.storage / row["path"]
    stored = path.read_bytes()
    assert stored[:128] == bytes(128), "files the node writes get a zero preamble"
    assert stored.endswith(data) and len(stored) - len(data) == _meta_end(stored)
    target.tally.byte_exact += 1
    assert_serving(target)
    return path


def _meta_end(stored: bytes) -> int:
    return 144 + int.from_bytes(stored[140:144], "little")


def assert_serving(target: Target) -> None:
    node = target.node
    assert node.proc.poll() is None, "the node exited"
    assert echo(node) == Status.SUCCESS
    fresh = Instance()
    with associate(node, [(CT, [EXPLICIT])], "OTHER") as assoc:
        assert raw_store(assoc, context_id(assoc, CT), CT, fresh.sop_instance, fresh.encode()) == 0
    assert node.instance(fresh.sop_instance) is not None
    assert not [
        line
        for line in node.log().splitlines()
        if " DEBUG " not in line and (PATIENT_NAME.decode() in line or PATIENT_ID.decode() in line)
    ], "patient data logged at INFO or above"


GB = 0xFFFFFFF0


def _invalid_vr(x: Instance) -> bytes:
    return x.encode(tail=b"\x08\x10\x00\x10ZZ\x04\x00abcd")


def _binary_vr(x: Instance) -> bytes:
    return x.encode(tail=b"\x08\x10\x00\x10\x00\x01\x04\x00abcd")


def _gb_private(x: Instance) -> bytes:
    return x.encode(tail=element(0x00291010, b"OB", b"\x00" * 16, length=GB))


def _gb_pixels(x: Instance) -> bytes:
    return x.encode(tail=element(0x7FE00010, b"OW", b"\x00" * 64, length=GB))


def _gb_sequence(x: Instance) -> bytes:
    return x.encode(tail=element(crafted.CONTENT_SEQUENCE, b"SQ", crafted.item(b""), length=GB))


def _short_past_end(x: Instance) -> bytes:
    return x.encode(tail=element(0x00321060, b"LO", b"AB", length=0xFFFE))


def _item_without_delimiters(x: Instance) -> bytes:
    # An undefined-length sequence whose undefined-length item is never closed: it "runs to the
    # end" of the data set (no item delimiter, no sequence delimiter).
    inner = crafted.item(element(0x0040A010, b"CS", b"CONTAINS"), defined=False)
    return x.encode(tail=element(crafted.CONTENT_SEQUENCE, b"SQ", inner, length=crafted.UNDEFINED))


def _sequence_without_delimiter(x: Instance) -> bytes:
    inner = crafted.item(element(0x0040A010, b"CS", b"CONTAINS"))
    return x.encode(tail=element(crafted.CONTENT_SEQUENCE, b"SQ", inner, length=crafted.UNDEFINED))


def _item_past_its_sequence(x: Instance) -> bytes:
    body = crafted.item(element(0x0040A010, b"CS", b"CONTAINS"))
    return x.encode(tail=element(crafted.CONTENT_SEQUENCE, b"SQ", body, length=len(body) - 4))


def _nested_undefined(x: Instance) -> bytes:
    return x.encode(tail=crafted.nested(5000, defined=False))


def _nested_defined(x: Instance) -> bytes:
    return x.encode(tail=crafted.nested(5000, defined=True))


@pytest.mark.parametrize(
    ("build", "why"),
    [
        pytest.param(_invalid_vr, "has an invalid VR (0x5a5a)", id="invalid-vr"),
        pytest.param(_binary_vr, "has an invalid VR (0x0001)", id="binary-vr"),
        pytest.param(_gb_private, f"length {GB} runs past the end", id="gb-private-ob"),
        pytest.param(_gb_pixels, f"length {GB} runs past the end", id="gb-pixel-data"),
        pytest.param(_gb_sequence, f"length {GB} runs past the end", id="gb-sequence"),
        pytest.param(_short_past_end, "length 65534 runs past the end", id="short-past-end"),
        pytest.param(
            _item_without_delimiters,
            "undefined-length item without an item delimiter",
            id="item-without-delimiters",
        ),
        pytest.param(
            _sequence_without_delimiter,
            "item header in element (0040,A730) cut short",
            id="sequence-without-delimiter",
        ),
        pytest.param(_item_past_its_sequence, "runs past the end of its sequence", id="item-past"),
        pytest.param(_nested_undefined, "nested deeper than 64", id="nested-5000-undefined"),
        pytest.param(_nested_defined, "nested deeper than 64", id="nested-5000-defined"),
    ],
)
def test_broken_encoding_is_refused(target: Target, build: object, why: str) -> None:
    x = Instance()
    data = build(x)  # type: ignore[operator]
    before = objects(target.node)
    status = send(target, data, x.sop_instance)
    assert_refused(target, before, x.sop_instance, status, why)


def test_odd_length_value_is_stored_as_received(target: Target) -> None:
    """PS3.5 7.1.1 asks for even lengths, but an odd one leaves the structure unambiguous: the
    instance is stored byte-exact (as received, like every instance) rather than refused."""
    x = Instance()
    data = x.encode(tail=element(0x00321060, b"LO", b"ODD") + element(0x00400254, b"LO", b"ok"))
    assert send(target, data, x.sop_instance) == Status.SUCCESS
    assert_stored_as_sent(target, x.sop_instance, data)


@pytest.mark.parametrize(
    "charset",
    [b"ISO_IR 999", b"\xff\xfe\x80garbage", b"ISO 2022 IR 6\\ISO 2022 IR 999"],
    ids=["unknown-term", "garbage-bytes", "unknown-extension"],
)
def test_invalid_specific_character_set_is_stored_and_queried(
    target: Target, charset: bytes
) -> None:
    """PS3.5 6.1.2.3: a value we cannot interpret is no reason to refuse the instance; it is
    stored as received, and C-FIND over it answers (never crashes the query)."""
    x = Instance(charset=charset)
    data = x.encode()
    assert send(target, data, x.sop_instance) == Status.SUCCESS
    assert_stored_as_sent(target, x.sop_instance, data)
    query = identifier(
        QueryRetrieveLevel="STUDY", StudyInstanceUID=x.study, PatientName="", PatientID=""
    )
    answers, final = find(target.node, query, STUDY_FIND)
    assert final == Status.SUCCESS
    assert [str(a.StudyInstanceUID) for a in answers] == [x.study]
    assert_serving(target)


def _bomb(x: Instance) -> bytes:
    return crafted.deflate_bomb(x.encode(), BOMB)


def test_deflate_bomb_is_refused_without_inflating_it(target: Target) -> None:
    """3 MB of deflate that inflates to 3 GiB, on a negotiated deflated context: refused once
    the inflated size passes the bound (256 times the deflated size), in 1 MiB steps."""
    x = Instance()
    data = _bomb(x)
    assert len(data) < 4 * 2**20
    before = objects(target.node)
    status = send(target, data, x.sop_instance, DEFLATED)
    assert_refused(target, before, x.sop_instance, status, "deflated data set inflates past")


def test_corrupt_deflate_stream_is_refused(target: Target) -> None:
    good = crafted.deflate(Instance().encode())
    for data, why in [
        (good[: len(good) // 2 & ~1], "deflate stream ends before its final block"),
        (b"\xff" * 64, "deflate stream is corrupt"),
    ]:
        x = Instance()  # the request names a fresh instance each time
        before = objects(target.node)
        status = send(target, data, x.sop_instance, DEFLATED)
        assert_refused(target, before, x.sop_instance, status, why)


def _get_explicit_only(node: RunningNode, study: str) -> tuple[list[Dataset], int]:
    """C-GET of ``study`` by a peer accepting CT only in explicit VR little endian."""
    arrived: list[Dataset] = []

    def on_store(event: object) -> int:
        arrived.append(event.dataset)  # type: ignore[attr-defined]
        return int(Status.SUCCESS)

    contexts = [build_context(STUDY_GET), build_context(CT, [EXPLICIT])]
    final = -1
    with association(
        node,
        "GETSCU",
        contexts,
        ext_neg=[build_role(CT, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    ) as assoc:
        query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        for status, _ in assoc.send_c_get(query, STUDY_GET):
            if int(status.Status) not in PENDING:
                final = int(status.Status)
    return arrived, final


def test_deflated_instance_retrieved_inflated_and_planted_bomb_is_not(
    target: Target, tmp_path: Path
) -> None:
    """A real deflated instance is stored as received and inflated for a C-GET peer that takes
    only explicit VR little endian. Its file then replaced on disk by a deflate bomb with the
    same UIDs (tampering, or an import): the retrieve refuses that sub-operation without
    inflating it (transcode counts first, bounded), and the node stays up and small."""
    node = target.node
    x = Instance()
    plain = x.encode(tail=element(0x7FE00010, b"OW", bytes(range(256)) * 16))
    data = crafted.deflate(plain)
    assert send(target, data, x.sop_instance, DEFLATED) == Status.SUCCESS
    path = assert_stored_as_sent(target, x.sop_instance, data)
    arrived, final = _get_explicit_only(node, x.study)
    assert final == Status.SUCCESS
    assert [bytes(ds.PixelData) for ds in arrived] == [bytes(range(256)) * 16]

    bomb = crafted.part10(tmp_path / "bomb.dcm", x.sop_instance, DEFLATED, _bomb(x))
    shutil.copyfile(bomb, path)
    arrived, final = _get_explicit_only(node, x.study)
    assert arrived == []
    assert final == Status.UNABLE_TO_PERFORM_SUBOPERATIONS, f"0x{final:04X}"
    node.wait_for_log("deflated data set inflates past")
    assert_serving(target)


@pytest.mark.parametrize("preamble", [crafted.PE_PREAMBLE, crafted.ELF_PREAMBLE], ids=["pe", "elf"])
def test_executable_preamble(tmp_path: Path, preamble: bytes) -> None:
    """A Part 10 file whose preamble is an executable header (a dual-format file). PS3.10 7.1
    allows any preamble, so it is read like any other; but the preamble is never propagated:
    ``dicomnode send`` sends only the data set (DIMSE has no preamble) and the node writes every
    file with a zero preamble. ``index rebuild`` indexes such a file found in the store (it is
    valid DICOM; refusing would lose an instance) and a retrieve sends its data set only."""
    x = Instance()
    data = x.encode()
    source = crafted.part10(tmp_path / "polyglot.dcm", x.sop_instance, EXPLICIT, data, preamble)
    with run_node(tmp_path / "node", unknown_peers=SERVICES) as node:
        sent = node.cli("send", node.address, str(source))
        assert sent.returncode == 0, sent.stderr
        row = node.instance(x.sop_instance)
        assert row is not None
        stored = (node.storage / row["path"]).read_bytes()
        assert stored[:128] == bytes(128)
        assert stored.endswith(data)
        # The same file put into the store by hand, the index rebuilt from the files.
        planted = node.storage / "objects" / "planted" / "polyglot.dcm"
        planted.parent.mkdir(parents=True)
        other = Instance()
        crafted.part10(planted, other.sop_instance, EXPLICIT, other.encode(), preamble)
        node.stop()
        rebuilt = node.cli("index", "rebuild", "--force")
        assert rebuilt.returncode == 0, rebuilt.stderr
    with run_node(tmp_path / "node", unknown_peers=SERVICES) as node:
        assert node.instance(other.sop_instance) is not None
        assert node.instance(x.sop_instance) is not None
        arrived, final = _get_explicit_only(node, other.study)
        assert final == Status.SUCCESS
        assert [str(ds.SOPInstanceUID) for ds in arrived] == [other.sop_instance]
        assert not hasattr(arrived[0], "preamble") or not arrived[0].preamble
    assert pydicom.dcmread(planted).preamble == preamble  # the store keeps files as they are
    record(
        "executable Part 10 preamble",
        "sent by dicomnode send without its preamble, stored with a zero preamble; a planted "
        "file is indexed by index rebuild and retrieved as its data set only",
        preamble=preamble[:4].hex(),
        files=2,
    )


def test_deep_nesting_in_implicit_vr(target: Target) -> None:
    """Implicit VR hides which elements are sequences from a purely structural walk, while
    pydicom's reader (and writer) recurse into them by the data dictionary. Stored, such an
    instance hung a C-GET that had to re-encode it; the walk now descends into what the
    dictionary calls a sequence, so 5000 levels are refused at the store."""
    x = Instance()
    data = crafted.implicit_header(x) + crafted.nested_implicit(5000)
    before = objects(target.node)
    status = send(target, data, x.sop_instance, str(ImplicitVRLittleEndian))
    assert_refused(target, before, x.sop_instance, status, "sequences nested deeper than 64")


def test_deflated_query_identifier_bomb_is_refused(tmp_path: Path) -> None:
    """A site that accepts deflated C-FIND identifiers: an identifier that inflates to 1 GiB is
    answered with a failure status after bounded inflation, and queries go on."""
    from pynetdicom.dimse_primitives import C_FIND

    from tests.support.dimse import raw_request

    policy = {
        "accept": [
            {"sop_classes": ["verification"], "transfer_syntaxes": ["uncompressed"]},
            {"sop_classes": [STUDY_FIND], "transfer_syntaxes": ["deflated", "uncompressed"]},
        ]
    }
    query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientID="")
    header = pydicom.filebase.DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(header, query)
    bomb = crafted.deflate_bomb(header.getvalue(), 2**30)
    with run_node(tmp_path / "node", conformance=policy, unknown_peers=["echo", "find"]) as node:
        rss_before = psutil.Process(node.proc.pid).memory_info().rss
        with associate(node, [(STUDY_FIND, [str(DeflatedExplicitVRLittleEndian)])]) as assoc:
            assert assoc.is_established
            request = C_FIND()
            request.MessageID = 1
            request.AffectedSOPClassUID = STUDY_FIND
            request.Priority = 2
            request.Identifier = BytesIO(bomb)
            status = raw_request(assoc, context_id(assoc, STUDY_FIND), request)
        assert status == Status.UNABLE_TO_PROCESS
        node.wait_for_log("identifier cannot be decoded: deflated data set inflates past")
        grown = psutil.Process(node.proc.pid).memory_info().rss - rss_before
        assert grown < 300 * 2**20, f"the node grew {grown / 2**20:.0f} MiB"
        assert find(node, query, STUDY_FIND)[1] == Status.SUCCESS
