"""A 300 MB multi-frame instance is received straight to disk: the node's peak RSS stays well
under the instance's size, and the stored file is exactly what was sent."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import require_dcmtk
from tests.support.corpus import dataset_bytes
from tests.support.node import RunningNode

FRAMES, ROWS, COLUMNS = 600, 512, 512  # 600 frames of 512x512x16 bit: 300 MiB of pixel data
MULTIFRAME_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage


def write_large_instance(path: Path) -> tuple[str, int]:
    """Write the instance without ever holding its pixel data in memory."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_CT
    ds.SOPClassUID = MULTIFRAME_CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BIG1", "Large^Instance", "CT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLUMNS, FRAMES
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.save_as(path, enforce_file_format=True)
    size = FRAMES * ROWS * COLUMNS * 2
    frame = bytes(range(256)) * (ROWS * COLUMNS * 2 // 256)
    with path.open("ab") as fp:
        fp.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size))
        for _ in range(FRAMES):
            fp.write(frame)
    return str(ds.SOPInstanceUID), size


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def sha256_of_dataset(path: Path) -> str:
    # dataset_bytes reads the whole file; fine in the test process, which is not measured.
    return hashlib.sha256(dataset_bytes(path)).hexdigest()


def test_300mb_instance_stored_with_bounded_memory(node: RunningNode, tmp_path: Path) -> None:
    require_dcmtk("storescu")
    source = tmp_path / "large.dcm"
    uid, pixel_bytes = write_large_instance(source)
    assert source.stat().st_size > pixel_bytes > 300 * 2**20 - 1
    before = peak_rss_mib(node.proc.pid)
    done = subprocess.run(
        ["storescu", "-aec", node.ae_title, "-xe", node.host, str(node.port), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert done.returncode == 0, done.stderr
    row = node.instance(uid)
    assert row is not None
    stored = node.storage / row["path"]
    assert sha256_of_dataset(stored) == sha256_of_dataset(source)
    peak = peak_rss_mib(node.proc.pid)
    print(f"node peak RSS {before:.0f} MiB before, {peak:.0f} MiB after a 300 MiB instance")
    # Well under the instance's size: what the node holds is its own baseline, not the data.
    assert peak < 160, f"peak RSS {peak:.0f} MiB for a 300 MiB instance"
