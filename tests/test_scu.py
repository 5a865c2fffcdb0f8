"""``dicomnode echo`` and ``dicomnode send`` against real DCMTK storescp over loopback.

The CLI runs as a subprocess, exactly as a user runs it; storescp runs bit-preserving (``+B``),
so what it writes is the data set it received, byte for byte.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    generate_uid,
)
from pynetdicom import AllStoragePresentationContexts

from dicomnode import scu
from dicomnode.config import Limits
from dicomnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.status import ExitCode
from tests.support.dcmtk import Endpoint, free_port, require_dcmtk, storescp

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
DICOMDIR_TESTS = TEST_FILES / "dicomdirtests"
OUR_AET = "DNTESTSCU"
MAX_PDU = 65536
SUMMARY = re.compile(
    r"^sent (\d+) of (\d+) files? to (\S+) \((\d+) warnings?, (\d+) failed, (\d+) skipped\) "
    r"in \d+\.\d s$",
    re.MULTILINE,
)


# --- helpers ---------------------------------------------------------------------------------


def write_config(tmp_path: Path, peers: dict[str, Endpoint]) -> Path:
    """A configuration naming each storescp as a peer, with short timeouts."""
    data = {
        "ae_title": OUR_AET,
        "limits": {
            "acse_timeout": 10,
            "dimse_timeout": 30,
            "network_timeout": 30,
            "max_pdu_size": MAX_PDU,
        },
        "peers": {
            name: {"ae_title": ep.aet, "host": ep.host, "port": ep.port}
            for name, ep in peers.items()
        },
    }
    path = tmp_path / "dicomnode.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_cli(*args: str | Path, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m dicomnode.cli [--config C] ARGS`` as a user runs it (stderr is no terminal)."""
    env = {k: v for k, v in os.environ.items() if k != "DICOMNODE_CONFIG"}
    argv = [sys.executable, "-m", "dicomnode.cli"]
    if config is not None:
        argv += ["--config", str(config)]
    argv += [str(a) for a in args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta group (PS3.10 7.1), located by its group length."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part 10 file"
    group, element, vr, length = struct.unpack("<HH2sH", data[132:140])
    assert (group, element, vr, length) == (2, 0, b"UL", 4), f"{path}: no (0002,0000) first"
    (meta_length,) = struct.unpack("<I", data[140:144])
    return data[144 + meta_length :]


def received(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def summary(result: subprocess.CompletedProcess[str]) -> tuple[int, int, str, int, int, int]:
    match = SUMMARY.search(result.stdout)
    assert match, f"no summary line in stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    sent, total, peer, warnings, failed, skipped = match.groups()
    return int(sent), int(total), peer, int(warnings), int(failed), int(skipped)


def failed_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("failed: ")]


def tiny_instance(path: Path, sop_class: str, syntax: str = ExplicitVRLittleEndian) -> str:
    """A minimal Part 10 file of ``sop_class``; returns its SOP Instance UID."""
    ds = Dataset()
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "SCU^TEST"
    ds.PatientID = "SCUTEST"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    return tmp_path / "received"


@pytest.fixture
def pacs(tmp_path: Path, incoming: Path) -> Iterator[Endpoint]:
    """storescp accepting every transfer syntax it knows, writing to ``incoming``."""
    require_dcmtk("storescp")
    with storescp(incoming, log_path=tmp_path / "storescp.log") as endpoint:
        yield endpoint


# --- echo ------------------------------------------------------------------------------------


def test_echo_configured_peer_and_address(tmp_path: Path, incoming: Path) -> None:
    require_dcmtk("storescp")
    log = tmp_path / "storescp.log"
    with storescp(incoming, options=("+xa", "-d"), log_path=log) as pacs:  # -d: dump A-ASSOCIATE
        config = write_config(tmp_path, {"PACS": pacs})
        by_name = run_cli("echo", "PACS", config=config)
        by_address = run_cli("echo", pacs.address, config=config)

    assert by_name.returncode == ExitCode.SUCCESS, by_name.stderr
    assert re.fullmatch(
        rf"echo PACS \({pacs.address}\): 0x0000 Success in \d+ ms\n", by_name.stdout
    )
    assert by_address.returncode == ExitCode.SUCCESS, by_address.stderr
    assert "0x0000 Success" in by_address.stdout
    # Our identity and limits, as the peer saw them in the A-ASSOCIATE-RQ (PS3.7 D.3.3.2).
    seen = log.read_text()
    assert re.search(rf"Their Implementation Class UID: +{IMPLEMENTATION_CLASS_UID}$", seen, re.M)
    assert re.search(
        rf"Their Implementation Version Name: +{IMPLEMENTATION_VERSION_NAME}$", seen, re.M
    )
    assert re.search(rf"Calling Application Name: +{OUR_AET}$", seen, re.M)
    assert re.search(rf"Called Application Name: +{pacs.aet}$", seen, re.M)
    assert re.search(rf"Their Max PDU Receive Size: +{MAX_PDU}$", seen, re.M)


def test_echo_closed_port_is_unreachable(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there

    result = run_cli("echo", f"NOBODY@127.0.0.1:{port}")

    assert result.returncode == ExitCode.UNREACHABLE
    assert f"cannot connect to 127.0.0.1 port {port}" in result.stderr
    assert result.stdout == ""


def test_bad_peer_is_a_usage_error(tmp_path: Path) -> None:
    some_file = tmp_path / "x.dcm"
    shutil.copy(TEST_FILES / "CT_small.dcm", some_file)

    echo = run_cli("echo", "not-a-peer")
    send = run_cli("send", "FOO@host:99999", some_file)

    assert echo.returncode == ExitCode.USAGE
    assert "give a configured peer name" in echo.stderr
    assert send.returncode == ExitCode.USAGE
    assert "AET@host:port" in send.stderr


def test_refused_association_exits_unreachable_with_reason(tmp_path: Path) -> None:
    require_dcmtk("storescp")
    with storescp(tmp_path / "in", options=("+xa", "--refuse")) as refusing:
        echo = run_cli("echo", refusing.address)
        send = run_cli("send", refusing.address, TEST_FILES / "CT_small.dcm")

    for result in (echo, send):
        assert result.returncode == ExitCode.UNREACHABLE, result.stderr
        # storescp --refuse answers A-ASSOCIATE-RJ (rejected permanent, service user) and closes
        # the connection at once; now and then pynetdicom sees the close before the RJ and
        # reports an aborted request instead. Either way nothing is sent and the exit is 5.
        rejected = (
            "rejected the association: Rejected Permanent" in result.stderr
            and "source: Service User" in result.stderr
        )
        assert rejected or "aborted the association request" in result.stderr, result.stderr
    assert summary(send) == (0, 1, refusing.address, 0, 1, 0)
    prefix = (
        f"failed: {TEST_FILES / 'CT_small.dcm'} (1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322)"
    )
    assert failed_lines(send) in (
        [f"{prefix}: not sent: the association was rejected"],
        [f"{prefix}: not sent: the association request was aborted"],
    )
    assert not list((tmp_path / "in").iterdir())


# --- send ------------------------------------------------------------------------------------

# Streamed byte for byte: several transfer syntaxes, native and encapsulated.
STREAMED = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian (retired, still negotiable)
    "MR_small_RLE.dcm",  # RLE lossless
    "JPEG2000.dcm",  # JPEG 2000
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
]
# Sent decoded: File Meta UIDs differ from the data set's (rtplan), odd deflated stream (dfl).
DECODED = ["rtplan.dcm", "image_dfl.dcm"]


def test_send_folder_recursively(tmp_path: Path, pacs: Endpoint, incoming: Path) -> None:
    source = tmp_path / "study"
    for i, name in enumerate(STREAMED + DECODED):
        target = source / ("a" if i % 2 else "b") / ("deeper" * (i % 3)) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TEST_FILES / name, target)
    (source / "a" / "notes.txt").write_text("not DICOM\n")
    shutil.copy(TEST_FILES / "no_meta.dcm", source / "b" / "no_meta.dcm")  # no Part 10 header
    config = write_config(tmp_path, {"PACS": pacs})

    result = run_cli("send", "PACS", source, config=config)

    assert result.returncode == ExitCode.SUCCESS, result.stderr
    assert summary(result) == (8, 10, "PACS", 0, 0, 2)
    assert f"skipped: {source / 'a' / 'notes.txt'}: not a DICOM Part 10 file" in result.stderr
    assert f"skipped: {source / 'b' / 'no_meta.dcm'}: not a DICOM Part 10 file" in result.stderr
    assert "failed:" not in result.stderr
    assert "sending to" not in result.stderr  # no progress bar when stderr is not a terminal
    got = received(incoming)
    assert len(got) == 8
    # Every streamed file's data set arrived unchanged.
    arrived = Counter(dataset_bytes(p) for p in got)
    for name in STREAMED:
        assert arrived[dataset_bytes(TEST_FILES / name)] == 1, name
    # Decoded files arrived under their data set's UIDs, with the same content.
    by_uid = {str(dcmread(p).SOPInstanceUID): p for p in got}
    for name in DECODED:
        original = dcmread(TEST_FILES / name)
        copy = dcmread(by_uid[str(original.SOPInstanceUID)])
        assert copy.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert copy == original, name


def test_send_dicomdir_sends_only_referenced_instances(
    tmp_path: Path, pacs: Endpoint, incoming: Path
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(DICOMDIR_TESTS / "DICOMDIR", media / "DICOMDIR")
    for folder in ("77654033", "98892001", "98892003"):
        shutil.copytree(DICOMDIR_TESTS / folder, media / folder)
    # In the media folder but not referenced by the DICOMDIR: must not be sent.
    shutil.copy(TEST_FILES / "CT_small.dcm", media / "98892001" / "EXTRA")
    records = [
        r for r in dcmread(media / "DICOMDIR").DirectoryRecordSequence if "ReferencedFileID" in r
    ]
    expected_uids = {str(r.ReferencedSOPInstanceUIDInFile) for r in records}
    config = write_config(tmp_path, {"PACS": pacs})

    result = run_cli("send", "PACS", media / "DICOMDIR", config=config)

    assert result.returncode == ExitCode.SUCCESS, result.stderr
    assert summary(result) == (len(records), len(records), "PACS", 0, 0, 0)
    got = received(incoming)
    assert len(got) == len(records) == 31
    assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in got} == expected_uids
    originals = Counter(dataset_bytes(media.joinpath(*r.ReferencedFileID)) for r in records)
    assert Counter(dataset_bytes(p) for p in got) == originals


def test_unaccepted_transfer_syntax_fails_that_file_only(tmp_path: Path, incoming: Path) -> None:
    require_dcmtk("storescp")
    implicit = TEST_FILES / "MR_small_implicit.dcm"
    explicit = TEST_FILES / "CT_small.dcm"
    with storescp(incoming, aet="IMPLICITONLY", options=("+xi",)) as peer:
        result = run_cli("send", peer.address, implicit, explicit)

    assert result.returncode == ExitCode.FAILURE, result.stderr
    assert summary(result) == (1, 2, peer.address, 0, 1, 0)
    lines = failed_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith(
        f"failed: {explicit} (1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322)"
    )
    assert (
        "no accepted presentation context for CT Image Storage (1.2.840.10008.5.1.4.1.1.2) in "
        "Explicit VR Little Endian (1.2.840.10008.1.2.1)" in lines[0]
    )
    assert "transfer syntax not supported" in lines[0]
    got = received(incoming)
    assert [dataset_bytes(p) for p in got] == [dataset_bytes(implicit)]


def test_more_than_128_context_pairs_use_several_associations(
    tmp_path: Path, incoming: Path
) -> None:
    require_dcmtk("storescp")
    # 130 distinct storage SOP classes, one tiny instance each: 130 (SOP class, TS) pairs.
    classes = [
        str(cx.abstract_syntax)
        for cx in AllStoragePresentationContexts
        if cx.abstract_syntax != MediaStorageDirectoryStorage
    ][:130]
    assert len(set(classes)) == 130
    source = tmp_path / "many"
    for i, sop_class in enumerate(classes):
        tiny_instance(source / f"{i // 50}" / f"{i:03d}.dcm", sop_class)
    log = tmp_path / "storescp.log"
    # -pm: accept SOP classes newer than this DCMTK; -v: log each association.
    with storescp(incoming, options=("+xa", "-pm", "-v"), log_path=log) as peer:
        result = run_cli("send", peer.address, source)

    assert result.returncode == ExitCode.SUCCESS, result.stderr
    assert summary(result) == (130, 130, peer.address, 0, 0, 0)
    assert log.read_text().count("Association Received") == 2
    originals = Counter(dataset_bytes(p) for p in source.rglob("*.dcm"))
    assert Counter(dataset_bytes(p) for p in received(incoming)) == originals


def test_abort_midway_fails_the_rest_without_crashing(tmp_path: Path, incoming: Path) -> None:
    require_dcmtk("storescp")
    files = [tmp_path / "f" / f"{i}.dcm" for i in range(3)]
    uids = [tiny_instance(f, "1.2.840.10008.5.1.4.1.1.7") for f in files]  # SC Image Storage
    # storescp --abort-after: A-ABORT after receiving the first C-STORE-RQ, before answering.
    with storescp(incoming, options=("+xa", "--abort-after")) as peer:
        result = run_cli("send", peer.address, tmp_path / "f")

    assert result.returncode == ExitCode.FAILURE, result.stderr
    assert summary(result) == (0, 3, peer.address, 0, 3, 0)
    lines = failed_lines(result)
    assert lines[0] == (
        f"failed: {files[0]} ({uids[0]}): no C-STORE response: the association was aborted "
        f"or no answer came within {Limits().dimse_timeout:g} s"
    )
    assert lines[1:] == [
        f"failed: {f} ({u}): not sent: the association was aborted"
        for f, u in zip(files[1:], uids[1:], strict=True)
    ]


def test_nothing_to_send_is_a_usage_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here\n")
    port = free_port()

    nothing = run_cli("send", f"X@127.0.0.1:{port}", folder)
    missing = run_cli("send", f"X@127.0.0.1:{port}", tmp_path / "does-not-exist")
    no_path = run_cli("send", f"X@127.0.0.1:{port}")

    assert nothing.returncode == ExitCode.USAGE
    assert "no DICOM files to send" in nothing.stderr
    assert f"skipped: {folder / 'readme.txt'}" in nothing.stderr
    assert missing.returncode == ExitCode.USAGE
    assert "does not exist" in missing.stderr
    assert no_path.returncode == ExitCode.USAGE


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd test data
def test_send_all_of_pydicoms_test_files(tmp_path: Path, pacs: Endpoint, incoming: Path) -> None:
    """Robustness: a folder of odd files; whatever is reported sent has arrived."""
    config = write_config(tmp_path, {"PACS": pacs})

    result = run_cli("send", "PACS", TEST_FILES, config=config)

    assert result.returncode in (ExitCode.SUCCESS, ExitCode.FAILURE), result.stderr
    sent, total, _, _, failed, skipped = summary(result)
    assert sent + failed + skipped == total
    assert len(failed_lines(result)) == failed
    assert "the association was aborted" not in result.stderr
    assert len(received(incoming)) == sent
    not_sent = {line[len("failed: ") :].split(" (")[0] for line in failed_lines(result)}
    arrived = Counter(dataset_bytes(p) for p in received(incoming))
    for file in scu.collect([TEST_FILES]).files:
        if file.stream and str(file.path) not in not_sent:
            assert arrived[dataset_bytes(file.path)] >= 1, file.path


# --- collecting, in process --------------------------------------------------------------------


def write_dicomdir(path: Path, file_ids: list[list[str]], in_use: bool = True) -> None:
    ds = Dataset()
    ds.FileSetID = "TEST"
    records = []
    for file_id in file_ids:
        record = Dataset()
        record.OffsetOfTheNextDirectoryRecord = 0
        record.RecordInUseFlag = 0xFFFF if in_use else 0
        record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
        record.DirectoryRecordType = "IMAGE"
        record.ReferencedFileID = file_id
        records.append(record)
    ds.DirectoryRecordSequence = records
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about ".." as a CS value; we want it
        dcmwrite(path, ds, enforce_file_format=True)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd test data
def test_dicomdir_references_never_leave_its_folder(tmp_path: Path) -> None:
    media = tmp_path / "media"
    outside = tmp_path / "outside.dcm"
    tiny_instance(outside, "1.2.840.10008.5.1.4.1.1.7")
    tiny_instance(media / "IMG" / "IM1", "1.2.840.10008.5.1.4.1.1.7")
    tiny_instance(media / "series2" / "im2", "1.2.840.10008.5.1.4.1.1.7")  # lower-case copy
    (media / "LINK").symlink_to(outside)
    write_dicomdir(
        media / "DICOMDIR",
        [["IMG", "IM1"], ["..", "outside.dcm"], ["LINK"], ["NOPE"], ["SERIES2", "IM2"]],
    )

    found = scu.collect([media / "DICOMDIR"])

    assert found.dicomdirs == [media / "DICOMDIR"]
    assert [f.path for f in found.files] == [media / "IMG" / "IM1", media / "series2" / "im2"]
    assert {s.reason for s in found.skipped} == {
        'Referenced File ID "..\\outside.dcm": not a plain relative file ID; refused',
        'Referenced File ID "LINK": points outside the DICOMDIR\'s folder; refused',
        'Referenced File ID "NOPE": referenced file not found',
    }


def test_inactive_dicomdir_records_are_ignored(tmp_path: Path) -> None:
    tiny_instance(tmp_path / "media" / "IM1", "1.2.840.10008.5.1.4.1.1.7")
    write_dicomdir(tmp_path / "media" / "DICOMDIR", [["IM1"]], in_use=False)

    found = scu.collect([tmp_path / "media" / "DICOMDIR"])

    assert found.files == []
    assert found.skipped == []


def test_collect_reports_what_it_skips(tmp_path: Path) -> None:
    (tmp_path / "text.dcm").write_bytes(b"hello")
    no_uid = Dataset()
    no_uid.PatientID = "X"
    no_uid.file_meta = FileMetaDataset()
    no_uid.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    no_uid.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    no_uid.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dcmwrite(tmp_path / "no_uid.dcm", no_uid, enforce_file_format=True)
    good = tmp_path / "sub" / "good.dcm"
    tiny_instance(good, "1.2.840.10008.5.1.4.1.1.7")

    found = scu.collect([tmp_path, good])  # good is reached twice, collected once

    assert [f.path for f in found.files] == [good]
    assert {(s.path.name, s.reason) for s in found.skipped} == {
        ("no_uid.dcm", "no SOP Class UID (0008,0016)"),
        ("text.dcm", "not a DICOM Part 10 file (no DICM prefix after the preamble)"),
    }


def test_plan_splits_at_128_contexts() -> None:
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts][:100]
    syntaxes = [ExplicitVRLittleEndian, "1.2.840.10008.1.2"]
    files = [
        scu.DicomFile(Path(f"{i}.dcm"), classes[i % 100], str(i), syntaxes[(i // 100) % 2])
        for i in range(400)
    ]  # 200 distinct pairs

    batches = scu.plan(files)

    assert [len(b.contexts) for b in batches] == [128, 72]
    assert sorted(pos for b in batches for pos, _ in b.files) == list(range(400))
    for batch in batches:
        assert {f.context_key for _, f in batch.files} == set(batch.contexts)
