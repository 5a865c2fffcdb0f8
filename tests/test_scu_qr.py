"""``dicomnode find``, ``move`` and ``get`` (and the ``dicomnode.scu`` functions behind them).

The peer is DCMTK dcmqrscp on a free loopback port, loaded once per module with pydicom's test
files through storescu (several patients, studies and series; names in many character sets).
Move destinations are DCMTK storescp (bit-preserving, ``+B``) and, where a test must hold a
sub-operation, a pynetdicom storage SCP in this process. Cancel paths whose timing the test must
control use a pynetdicom Query/Retrieve SCP in this process. The CLI runs as a subprocess,
exactly as a user runs it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicomnode import scu
from dicomnode.cli import main
from dicomnode.config import Config, Limits, Peer
from dicomnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.qr import Level, Model, Operation
from dicomnode.status import Category, ExitCode
from tests.support.corpus import CHARSET_FILES, TEST_FILES, dataset_bytes
from tests.support.dcmtk import (
    DCMTK_ENV,
    LOOPBACK,
    Endpoint,
    dcmqrscp,
    free_port,
    require_dcmtk,
    storescp,
    storescu,
)
from tests.test_scu import OUR_AET, run_cli, write_config

DICOMDIR_TESTS = TEST_FILES / "dicomdirtests"
# Three patients over five studies and ten series (CR, CT, MR), two more single-image patients,
# and one instance per character set (SOP Instance UIDs all distinct).
LOADED = [
    TEST_FILES / "CT_small.dcm",
    TEST_FILES / "MR_small.dcm",
    *sorted(
        p
        for folder in ("77654033", "98892001", "98892003")
        for p in (DICOMDIR_TESTS / folder).rglob("*")
        if p.is_file()
    ),
    *(
        CHARSET_FILES / name
        for name in (
            "chrArab.dcm",
            "chrFren.dcm",
            "chrGerm.dcm",
            "chrGreek.dcm",
            "chrH31.dcm",
            "chrHbrw.dcm",
            "chrI2.dcm",
            "chrKoreanMulti.dcm",
            "chrRuss.dcm",
            "chrX1.dcm",
            "chrX2.dcm",
        )
    ),
]
STUDY_KEYS = [
    "PatientName",
    "PatientID",
    "StudyDate",
    "StudyDescription",
    "AccessionNumber",
    "ModalitiesInStudy",
    "StudyInstanceUID",
]
RANDOM_NAME = re.compile(r"[0-9a-f]{32}\.dcm")
WAIT = 30.0  # bound on every wait for another process or thread


@dataclass(frozen=True)
class Original:
    """What the test knows about one loaded instance, read from its original file."""

    path: Path
    patient_id: str
    patient_name: str
    study_uid: str
    study_date: str
    study_description: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class Archive:
    qr: Endpoint  # dcmqrscp
    storage: Path  # its storage area
    log: Path  # its debug log (-d)
    dest: Endpoint  # storescp, "dest" in dcmqrscp's HostTable
    dest_dir: Path
    blocker: Endpoint  # "blocker" in the HostTable: started by the test that needs it
    config: Path  # a dicomnode configuration naming dcmqrscp as peer "QR"
    originals: dict[str, Original]  # by SOP Instance UID
    stored: dict[str, Path]  # by SOP Instance UID: dcmqrscp's file

    def where(self, **wanted: str) -> list[Original]:
        return [
            o for o in self.originals.values() if all(getattr(o, k) == v for k, v in wanted.items())
        ]


def _original(path: Path) -> Original:
    ds = dcmread(path, stop_before_pixels=True)
    return Original(
        path,
        str(ds.PatientID),
        str(ds.PatientName),
        str(ds.StudyInstanceUID),
        str(ds.get("StudyDate", "")),
        str(ds.get("StudyDescription", "")),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
    )


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    require_dcmtk("dcmqrscp", "storescu", "storescp")
    root = tmp_path_factory.mktemp("qr")
    blocker = Endpoint("BLOCKER", LOOPBACK, free_port())
    with storescp(root / "dest", aet="DEST", log_path=root / "storescp.log") as dest:
        peers = {"dest": dest, "blocker": blocker}
        log = root / "dcmqrscp.log"
        with dcmqrscp(root / "storage", peers=peers, options=("-d",), log_path=log) as qr:
            storescu(qr, LOADED)
            stored = {
                str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in (root / "storage").iterdir()
                if p.name != "index.dat"
            }
            originals = {o.sop_uid: o for o in map(_original, LOADED)}
            assert set(stored) == set(originals), "dcmqrscp did not store every file"
            yield Archive(
                qr=qr,
                storage=root / "storage",
                log=log,
                dest=dest,
                dest_dir=root / "dest",
                blocker=blocker,
                config=write_config(root, {"QR": qr}),
                originals=originals,
                stored=stored,
            )


@pytest.fixture
def dest_dir(archive: Archive) -> Path:
    """storescp's output folder, emptied for this test."""
    for leftover in archive.dest_dir.iterdir():
        leftover.unlink()
    return archive.dest_dir


def find_json(archive: Archive, *args: str) -> list[Dataset]:
    result = run_cli("find", "QR", "--json", *args, config=archive.config)
    assert result.returncode == ExitCode.SUCCESS, result.stderr
    return [Dataset.from_json(item) for item in json.loads(result.stdout)]


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def api_config(dimse_timeout: float = 30) -> Config:
    return Config(
        ae_title=OUR_AET,
        limits=Limits(acse_timeout=10, dimse_timeout=dimse_timeout, network_timeout=30),
    )


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``condition`` (every 5 ms) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# --- find ------------------------------------------------------------------------------------


def test_find_study_level_table_with_default_columns(archive: Archive) -> None:
    studies = {o.study_uid for o in archive.originals.values() if o.patient_name.startswith("Doe")}

    result = run_cli("find", "QR", "-k", "PatientName=Doe*", config=archive.config)

    assert result.returncode == ExitCode.SUCCESS, result.stderr
    header, rule, *rows = result.stdout.splitlines()
    # Only a matching key was given: the study level's usual attributes are asked for as well.
    assert header.split() == STUDY_KEYS
    assert set(rule.replace(" ", "")) == {"-"}
    assert len(rows) == len(studies) == 6
    assert all(row.startswith("Doe^") for row in rows)
    assert {row.split()[-1] for row in rows} == studies
    assert "6 matches from QR at STUDY level" in result.stderr


@pytest.mark.parametrize("model", ["study", "patient"])
def test_find_json_study_level_both_models(archive: Archive, model: str) -> None:
    expected = {
        o.study_uid: (o.study_date, o.study_description)
        for o in archive.where(patient_id="77654033")
    }

    matches = find_json(
        archive,
        "--model",
        model,
        "-k",
        "PatientID=77654033",
        "-k",
        "StudyDate",
        "-k",
        "StudyDescription",
        "-k",
        "StudyInstanceUID",
    )

    assert len(expected) == 2
    assert {m.StudyInstanceUID: (m.StudyDate, m.StudyDescription) for m in matches} == expected
    assert {m.QueryRetrieveLevel for m in matches} == {"STUDY"}
    assert {m.PatientID for m in matches} == {"77654033"}


def test_find_date_range(archive: Archive) -> None:
    expected = {
        o.study_uid
        for o in archive.originals.values()
        if o.study_date and "20010101" <= o.study_date <= "20031231"
    }

    matches = find_json(
        archive, "-k", "StudyDate=20010101-20031231", "-k", "StudyInstanceUID", "-k", "PatientID"
    )

    assert len(expected) == 5  # the 1995, 2004 and 2008 studies are left out
    assert {m.StudyInstanceUID for m in matches} == expected
    assert all("20010101" <= m.StudyDate <= "20031231" for m in matches)


def test_find_series_and_image_levels(archive: Archive) -> None:
    ct = archive.where(patient_id="98890234", study_date="20010101")
    study = ct[0].study_uid
    series = {o.series_uid for o in ct}
    biggest = max(series, key=lambda uid: sum(o.series_uid == uid for o in ct))
    images = {o.sop_uid for o in ct if o.series_uid == biggest}

    # dcmqrscp wants the unique keys of the levels above (hierarchical query, PS3.4 C.4.1.2.2).
    table = run_cli(
        "find", "QR", "--level", "series", "-k", f"StudyInstanceUID={study}", config=archive.config
    )
    by_series = find_json(archive, "--level", "series", "-k", f"StudyInstanceUID={study}")
    by_image = find_json(
        archive,
        "--model",
        "patient",
        "--level",
        "image",
        "-k",
        "PatientID=98890234",
        "-k",
        f"StudyInstanceUID={study}",
        "-k",
        f"SeriesInstanceUID={biggest}",
        "-k",
        "SOPInstanceUID",
        "-k",
        "InstanceNumber",
    )

    assert table.returncode == ExitCode.SUCCESS, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert header == ["StudyInstanceUID", *scu.DEFAULT_RETURN_KEYS[Level.SERIES]]
    assert {m.SeriesInstanceUID for m in by_series} == series
    assert {m.Modality for m in by_series} == {"CT"}
    assert len(series) == 2
    assert {m.SOPInstanceUID for m in by_image} == images
    assert len(images) == 5
    assert {m.QueryRetrieveLevel for m in by_image} == {"IMAGE"}


def test_find_names_in_other_character_sets(archive: Archive) -> None:
    names = {o.patient_id: o.patient_name for o in archive.originals.values()}

    scs = find_json(
        archive,
        "--model",
        "patient",
        "--level",
        "patient",
        "-k",
        "PatientID=SCS*",
        "-k",
        "PatientName",
    )
    # A non-ASCII matching value goes out in UTF-8 (Specific Character Set ISO_IR 192).
    german = run_cli(
        "find", "QR", "--model", "patient", "--level", "patient", "-k", "PatientName=Äneas*",
        "-k", "PatientID", config=archive.config,
    )  # fmt: skip
    multi = run_cli(
        "find", "QR", "--model", "patient", "--level", "patient", "-k", "PatientName",
        "-k", "PatientID=*EXAMPLE", config=archive.config,
    )  # fmt: skip

    # Arabic, French, German, Greek, Hebrew, Russian: each decoded with its own character set.
    assert {m.PatientID: str(m.PatientName) for m in scs} == {
        pid: name for pid, name in names.items() if pid.startswith("SCS")
    }
    assert len(scs) == 6
    assert german.returncode == ExitCode.SUCCESS, german.stderr
    assert german.stdout.splitlines()[2:] == ["Äneas^Rüdiger  SCSGERM"]
    # Japanese, Korean, Chinese names (ISO 2022, UTF-8, GB18030): columns line up on screen.
    assert multi.returncode == ExitCode.SUCCESS, multi.stderr
    rows = multi.stdout.splitlines()[2:]
    assert len(rows) == 4
    columns = set()
    for row in rows:
        name, pid = (cell.strip() for cell in row.rsplit("  ", 1))
        assert name == names[pid]
        columns.add(display_width(row[: row.rindex(pid)]))
    assert len(columns) == 1, rows


def test_find_usage_errors_exit_4_before_connecting() -> None:
    nobody = f"NOBODY@127.0.0.1:{free_port()}"  # never contacted: exit 4, not 5
    cases = {
        ("find", nobody, "-k", "PatientNme=DOE*"): "unknown attribute keyword 'PatientNme'",
        ("find", nobody, "-k", "(0009,0010)=x"): "(0009,0010) is not in the DICOM data dictionary",
        ("find", nobody, "-k", "=DOE"): "give Keyword or Keyword=Value",
        ("find", nobody, "-k", "ReferencedStudySequence=1"): "is a sequence",
        ("find", nobody, "-k", "Rows=many"): "Rows (US) takes numbers",
        ("find", nobody, "-k", "QueryRetrieveLevel=IMAGE"): "set the level with --level",
        ("find", nobody, "--level", "patient"): "has no PATIENT level",
        ("find", nobody, "--level", "frame"): "Invalid value for '--level'",
        ("move", nobody, "--dest", "X", "-k", "PatientName"): "give what to move with -k",
        ("move", nobody, "--dest", "A" * 17, "-k", "PatientID=1"): "is not an AE title",
        ("get", nobody, "--out", "unused", "-k", "StudyDate"): "give what to get with -k",
    }

    # One as a user runs it; the rest in process (the same click group, much faster).
    process = run_cli("find", nobody, "-k", "PatientNme")
    runner = CliRunner()
    results = {args: runner.invoke(main, list(args)) for args in cases}

    assert process.returncode == ExitCode.USAGE
    assert "did you mean PatientName?" in process.stderr
    assert process.stdout == ""
    for args, message in cases.items():
        result = results[args]
        assert result.exit_code == ExitCode.USAGE, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert result.stdout == "", args


def test_query_keys_parse_like_findscu() -> None:
    keys = scu.query_keys(
        [
            "PatientName=DOE*",
            "0008,0020=20200101-",  # StudyDate by tag
            "(0020,000D)=1.2.3\\1.2.4",  # a UID list, as it goes on the wire
            "Rows=512",
            "PatientWeight",
            "ReferencedStudySequence",
            "PatientName=SMITH",  # a later key replaces an earlier one
        ]
    )

    assert [(e.keyword, e.VR, e.value) for e in keys] == [
        ("StudyDate", "DA", "20200101-"),
        ("ReferencedStudySequence", "SQ", []),
        ("PatientName", "PN", "SMITH"),
        ("PatientWeight", "DS", None),
        ("StudyInstanceUID", "UI", ["1.2.3", "1.2.4"]),
        ("Rows", "US", 512),
    ]


def test_get_proposes_at_most_128_contexts() -> None:
    get_class = scu.qr_sop_class(Model.STUDY_ROOT, Operation.GET)

    contexts, roles = scu.get_contexts(get_class)

    storage = {str(cx.abstract_syntax) for cx in StoragePresentationContexts}
    assert len(contexts) == 128  # PS3.8 9.3.2.2
    assert str(contexts[0].abstract_syntax) == get_class
    assert {str(cx.abstract_syntax) for cx in contexts[1:]} == storage
    assert {str(r.sop_class_uid) for r in roles} == storage
    assert all(r.scp_role and not r.scu_role for r in roles)
    uncompressed = [cx for cx in contexts[1:] if ExplicitVRLittleEndian in cx.transfer_syntax]
    assert len(uncompressed) == len(storage)
    # The contexts left over: CT, MR, ... once more, in compressed syntaxes only.
    assert [str(cx.abstract_syntax) for cx in contexts[1 + len(storage) :]][:2] == [
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.4",
    ]


def test_unreachable_peer_exits_5(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    peer = f"NOBODY@127.0.0.1:{port}"

    find = run_cli("find", peer, "--json", "-k", "PatientID=1")
    move = run_cli("move", peer, "--dest", "X", "-k", "PatientID=1")
    get = run_cli("get", peer, "--out", tmp_path / "out", "-k", "PatientID=1")

    for result in (find, move, get):
        assert result.returncode == ExitCode.UNREACHABLE, result.stderr
        assert f"cannot connect to 127.0.0.1 port {port}" in result.stderr
        assert result.stdout == ""


# --- move ------------------------------------------------------------------------------------


def test_move_patient_to_storescp(archive: Archive, dest_dir: Path) -> None:
    moved = {o.sop_uid for o in archive.where(patient_id="98890234")}

    result = run_cli(
        "move", "QR", "--dest", "DEST", "--model", "patient", "--level", "patient",
        "-k", "PatientID=98890234", config=archive.config,
    )  # fmt: skip

    assert result.returncode == ExitCode.SUCCESS, result.stderr
    assert re.fullmatch(
        r"moved 24 of 24 instances from QR to DEST \(0 warnings, 0 failed\) in \d+\.\d s: "
        r"0x0000 Success: sub-operations complete, no failures\n",
        result.stdout,
    )
    assert "moving to" not in result.stderr  # no progress bar: stderr is not a terminal
    arrived = sorted(dest_dir.iterdir())
    assert len(moved) == len(arrived) == 24
    assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in arrived} == moved
    # storescp +B wrote the data sets as they came off the wire: what dcmqrscp holds.
    assert Counter(dataset_bytes(p) for p in arrived) == Counter(
        dataset_bytes(archive.stored[uid]) for uid in moved
    )


def test_move_to_unknown_destination_is_the_peers_failure(archive: Archive, dest_dir: Path) -> None:
    result = run_cli(
        "move", "QR", "--dest", "NOWHERE", "-k", "PatientID=77654033", config=archive.config
    )

    assert result.returncode == ExitCode.FAILURE, result.stderr
    assert "QR answered 0xA801 Refused: move destination unknown" in result.stderr
    assert re.fullmatch(
        r"moved nothing from QR to NOWHERE in \d+\.\d s: 0xA801 Refused: move destination "
        r"unknown\n",
        result.stdout,
    )
    assert list(dest_dir.iterdir()) == []


# --- get -------------------------------------------------------------------------------------


def test_get_writes_instances_with_generated_names(archive: Archive, tmp_path: Path) -> None:
    wanted = {o.sop_uid for o in archive.where(patient_id="98890234")}
    out = tmp_path / "new" / "folder"  # created
    log_before = archive.log.stat().st_size

    result = run_cli(
        "get", "QR", "--out", out, "--model", "patient", "--level", "patient",
        "-k", "PatientID=98890234", config=archive.config,
    )  # fmt: skip

    assert result.returncode == ExitCode.SUCCESS, result.stderr
    assert re.fullmatch(
        rf"retrieved 24 of 24 instances from QR into {re.escape(str(out))} \(0 warnings, "
        r"0 failed\) in \d+\.\d s: 0x0000 Success: sub-operations complete, no failures\n",
        result.stdout,
    )
    files = sorted(out.iterdir())
    assert len(files) == 24
    for path in files:
        # Our names (no temporary file left over), never a UID or anything the peer sent.
        assert RANDOM_NAME.fullmatch(path.name), path.name
        ds = dcmread(path)
        assert ds.SOPInstanceUID in wanted
        meta = ds.file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    got = Counter(dataset_bytes(p) for p in files)
    assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files} == wanted
    # The data sets as sent: what dcmqrscp holds (what storescu sent it) ...
    assert got == Counter(dataset_bytes(archive.stored[uid]) for uid in wanted)
    # ... which for these MR files is the original bytes (storescu re-encodes the CT ones).
    mr = [uid for uid in wanted if "/MR" in str(archive.originals[uid].path)]
    assert len(mr) == 17
    for uid in mr:
        assert got[dataset_bytes(archive.originals[uid].path)] == 1
    # getscu-style role negotiation (PS3.7 D.3.3.4): dcmqrscp agreed to our SCP role.
    negotiation = archive.log.read_bytes()[log_before:].decode(errors="replace")
    assert re.search(
        r"Abstract Syntax: =CTImageStorage\n\S+ +Proposed SCP/SCU Role: SCP\n\S+ +Accepted "
        r"SCP/SCU Role: SCP",
        negotiation,
    ), "no accepted SCP role for CT Image Storage in dcmqrscp's log"


def test_get_matches_dcmtk_getscu(archive: Archive, tmp_path: Path) -> None:
    require_dcmtk("getscu")
    study = archive.where(patient_id="77654033", study_date="20010101")[0].study_uid
    ours, theirs = tmp_path / "ours", tmp_path / "getscu"
    theirs.mkdir()

    result = run_cli(
        "get", "QR", "-k", f"StudyInstanceUID={study}", "--out", ours, config=archive.config
    )
    getscu = subprocess.run(
        ["getscu", "-aec", archive.qr.aet, "-S", "+B", "-od", str(theirs), "-k",
         "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         archive.qr.host, str(archive.qr.port)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == ExitCode.SUCCESS, result.stderr
    assert getscu.returncode == 0, getscu.stderr
    assert len(list(ours.iterdir())) == 3
    assert Counter(dataset_bytes(p) for p in ours.iterdir()) == Counter(
        dataset_bytes(p) for p in theirs.iterdir()
    )


# --- cancel ----------------------------------------------------------------------------------


def bytes_waiting(port: int) -> int:
    """Bytes received but not yet read on the established TCP sockets listening-side at
    ``port`` (Linux /proc/net/tcp rx_queue): what dcmqrscp has not read from us yet."""
    waiting = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # 01: ESTABLISHED
            waiting += int(fields[4].split(":")[1], 16)
    return waiting


@contextmanager
def storage_scp(endpoint: Endpoint, on_store: Callable[[evt.Event], int]) -> Iterator[None]:
    """A pynetdicom storage SCP at ``endpoint`` in this process."""
    ae = AE(ae_title=endpoint.aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ExplicitVRLittleEndian)
    server = ae.start_server(
        (endpoint.host, endpoint.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield
    finally:
        server.shutdown()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc/net/tcp")
def test_sigint_cancels_a_move_in_flight(archive: Archive) -> None:
    """Ctrl-C during a C-MOVE from dcmqrscp: C-CANCEL, dcmqrscp stops, exit 3.

    The destination holds the second sub-operation until the C-CANCEL has reached dcmqrscp's
    socket; dcmqrscp looks for a C-CANCEL after each sub-operation (DIMSE_moveProvider).
    """
    stored: list[str] = []
    second = threading.Event()
    release = threading.Event()

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        if len(stored) == 2:
            second.set()
            release.wait(WAIT)
        return 0x0000

    argv = [sys.executable, "-m", "dicomnode.cli", "--config", str(archive.config), "move", "QR",
            "--dest", "BLOCKER", "--model", "patient", "--level", "patient",
            "-k", "PatientID=98890234"]  # fmt: skip
    with storage_scp(archive.blocker, on_store):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert second.wait(WAIT), "the move never reached its second sub-operation"
            assert bytes_waiting(archive.qr.port) == 0
            proc.send_signal(signal.SIGINT)
            wait_until(lambda: bytes_waiting(archive.qr.port) > 0, "the C-CANCEL to arrive")
        finally:
            release.set()
        out, err = proc.communicate(timeout=WAIT)

    assert proc.returncode == ExitCode.CANCEL, err
    assert (
        "dicomnode move: cancelled (C-CANCEL); QR answered 0xFE00 Cancelled: sub-operations "
        "terminated due to cancel indication" in err
    )
    assert re.fullmatch(
        r"moved 2 of 24 instances from QR to BLOCKER \(0 warnings, 0 failed, 22 not attempted\) "
        r"in \d+\.\d s: 0xFE00 Cancelled: sub-operations terminated due to cancel indication\n",
        out,
    )
    assert len(stored) == 2


@contextmanager
def qr_scp(handlers: list[tuple[Any, Callable[..., Any]]]) -> Iterator[Peer]:
    """A pynetdicom Query/Retrieve SCP in this process, as a peer for the API."""
    ae = AE(ae_title="PYQRSCP")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    for uid in (
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    ):
        ae.add_supported_context(uid)
    for cx in StoragePresentationContexts:  # C-GET: we send, over the caller's association
        ae.add_supported_context(cx.abstract_syntax, scu_role=True, scp_role=True)
    port = free_port()
    server = ae.start_server((LOOPBACK, port), block=False, evt_handlers=handlers)
    try:
        yield Peer(name="PYQR", ae_title="PYQRSCP", host=LOOPBACK, port=port)
    finally:
        server.shutdown()


def wait_for_cancel(event: evt.Event) -> None:
    """In an SCP handler: poll (bounded) until the peer's C-CANCEL has arrived."""
    wait_until(lambda: bool(event.is_cancelled), "C-CANCEL at the SCP")


def a_match(n: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = f"MATCH^{n}"
    return ds


def test_find_cancelled_from_on_match() -> None:
    cancelled_at_scp = threading.Event()

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, a_match(1)  # pynetdicom sends it before resuming here
        wait_for_cancel(event)
        cancelled_at_scp.set()
        yield 0xFE00, None

    cancel = threading.Event()
    with qr_scp([(evt.EVT_C_FIND, on_find)]) as peer:
        report = scu.find(
            api_config(),
            peer,
            Level.STUDY,
            Model.STUDY_ROOT,
            scu.query_keys(["PatientName=MATCH*"]),
            on_match=lambda match: cancel.set(),
            cancel=cancel,
        )

    assert cancelled_at_scp.is_set()
    assert report.status == 0xFE00
    assert report.cancelled
    assert report.category is Category.CANCEL
    assert [str(m.PatientName) for m in report.matches] == ["MATCH^1"]
    assert report.error is None and report.failure is None


def test_get_cancelled_from_on_progress(tmp_path: Path) -> None:
    instances = []
    for n in range(3):
        ds = dcmread(TEST_FILES / "CT_small.dcm")
        ds.SOPInstanceUID = f"1.2.3.4.{n}"
        instances.append(ds)

    def on_get(event: evt.Event) -> Iterator[Any]:
        yield len(instances)
        yield 0xFF00, instances[0]  # stored over our association, then a Pending response
        wait_for_cancel(event)
        yield 0xFE00, None

    cancel = threading.Event()
    progress: list[tuple[int, ...]] = []

    def on_progress(*counts: int) -> None:
        progress.append(counts)
        cancel.set()

    with qr_scp([(evt.EVT_C_GET, on_get)]) as peer:
        report = scu.get(
            api_config(),
            peer,
            Level.STUDY,
            Model.STUDY_ROOT,
            scu.query_keys(["StudyInstanceUID=1.2.3"]),
            tmp_path,
            on_progress=on_progress,
            cancel=cancel,
        )

    assert report.status == 0xFE00
    assert report.category is Category.CANCEL and report.cancelled
    assert progress == [(2, 1, 0, 0)]
    assert (report.remaining, report.completed, report.failed) == (2, 1, 0)
    assert report.files == sorted(tmp_path.iterdir())
    assert len(report.files) == 1
    written = dcmread(report.files[0])
    assert written.SOPInstanceUID == "1.2.3.4.0"
    assert written.PixelData == instances[0].PixelData


def test_peer_ignoring_cancel_is_aborted_after_the_dimse_timeout() -> None:
    """A peer that keeps answering Pending after C-CANCEL: each response restarts pynetdicom's
    DIMSE timeout, so only our own bound (the DIMSE timeout, counted from the C-CANCEL) ends it.
    """
    stop = threading.Event()

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        n = 0
        while not stop.is_set() and event.assoc.is_established:
            n += 1
            yield 0xFF00, a_match(n)
            stop.wait(0.05)  # the peer's pace: well inside the 1 s DIMSE timeout

    cancel = threading.Event()
    try:
        with qr_scp([(evt.EVT_C_FIND, on_find)]) as peer:
            report = scu.find(
                api_config(dimse_timeout=1),
                peer,
                Level.STUDY,
                Model.STUDY_ROOT,
                Dataset(),
                on_match=lambda match: cancel.set(),
                cancel=cancel,
            )
    finally:
        stop.set()

    assert report.status is None
    assert report.cancelled
    assert report.error == (
        "no final C-FIND response within 1 s of the C-CANCEL; association aborted"
    )
    assert Category.CANCEL in report.categories()
    assert report.elapsed < 10
