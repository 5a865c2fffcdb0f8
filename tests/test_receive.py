"""The receive file that stands in for pynetdicom's temporary file, on a real full device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info as pydicom_write_file_meta_info

from dicomnode import receive
from dicomnode.receive import ReceiveFile


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_write_error_mid_transfer_refuses_and_keeps_reading(tmp_path: Path) -> None:
    """ENOSPC while a data set arrives: nothing is kept, the message is still consumed, and the
    file says why so the handler can answer A700."""
    rx = ReceiveFile(tmp_path / "rx-1.part", owner=None, refused=None)
    rx.write(b"x" * 100)
    # Swap the real file for the real full device: every write now fails with ENOSPC.
    rx._fh.close()  # type: ignore[union-attr]
    rx._fh = Path("/dev/full").open("wb", buffering=0)  # noqa: SIM115 - closed by rx
    assert rx.write(b"y" * 4096) == 4096  # consumed, as pynetdicom expects
    assert rx.write(b"z" * 10) == 10
    assert rx.refused is not None and "No space left on device" in rx.refused
    assert not rx.path.exists()
    rx.close()
    assert rx.size == 100 + 4096 + 10


def test_refused_file_writes_nothing(tmp_path: Path) -> None:
    rx = ReceiveFile(tmp_path / "rx-2.part", owner=None, refused="free space under the floor")
    assert rx.write(b"data") == 4
    rx.close()
    assert not rx.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_large_receive_starts_writeback_and_keeps_every_byte(tmp_path: Path) -> None:
    """Past the write-back step the file is handed to the kernel's writeback as it grows (on
    Linux); the bytes on disk are still exactly those received, in order."""
    if sys.platform.startswith("linux"):
        assert receive._start_writeback is not None, "sync_file_range not found in libc"
    rx = ReceiveFile(tmp_path / "rx-3.part", owner=None, refused=None)
    chunk = bytes(range(256)) * 1024  # 256 KiB
    steps = 0
    for i in range(3 * receive._WRITEBACK_STEP // len(chunk) + 1):
        rx.write(bytes([i % 251]) + chunk[1:])
        steps = max(steps, rx._written_back // receive._WRITEBACK_STEP)
    rx.close()
    if receive._start_writeback is not None:
        assert steps == 3
    data = rx.path.read_bytes()
    assert len(data) == rx.size
    for i in range(0, rx.size // len(chunk)):
        assert data[i * len(chunk)] == i % 251
        assert data[i * len(chunk) + 1 : (i + 1) * len(chunk)] == chunk[1:]


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # odd, even, odd
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2"),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.2", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.90"),  # 64 chars
    ],
)
def test_file_meta_bytes_equal_pydicoms(sop_class: str, sop_instance: str, syntax: str) -> None:
    """The File Meta we write into received files is byte for byte what pydicom wrote before
    (through pynetdicom's create_file_meta with our implementation identity)."""
    meta = receive.FileMeta(sop_class, sop_instance, syntax)
    ours = DicomBytesIO()
    receive._write_file_meta(ours, meta)
    theirs = DicomBytesIO()
    pydicom_write_file_meta_info(theirs, receive._pydicom_file_meta(meta), enforce_standard=True)
    assert ours.getvalue() == theirs.getvalue()


def test_file_meta_with_an_empty_instance_uid_is_written_for_the_handler_to_refuse() -> None:
    """pydicom refuses to write it (and pynetdicom then aborted the association); written as an
    empty element, the handler answers the request with a refusal status instead."""
    meta = receive.FileMeta("1.2.840.10008.5.1.4.1.1.2", "", "1.2.840.10008.1.2.1")
    encoded = receive.encode_file_meta(meta)
    assert b"\x02\x00\x03\x00UI\x00\x00" in encoded


def test_file_meta_with_a_non_ascii_uid_falls_back_to_pydicom() -> None:
    meta = receive.FileMeta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.\u00e9", "1.2.840.10008.1.2.1")
    with pytest.raises(UnicodeEncodeError):
        receive.encode_file_meta(meta)
    out = DicomBytesIO()
    receive._write_file_meta(out, meta)  # pydicom writes what it can; nothing raises here
    assert out.getvalue()[4:6] == b"UL"
