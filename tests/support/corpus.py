"""pydicom's shipped real-world files, sorted into what a storage SCP must accept byte for byte."""

from __future__ import annotations

import struct
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.uid import generate_uid

from dicomnode.policy import SOP_CLASS_GROUPS, TRANSFER_SYNTAX_GROUPS

DATA = Path(pydicom.data.__file__).parent
TEST_FILES = DATA / "test_files"
CHARSET_FILES = DATA / "charset_files"

# DCMTK storescu proposes a compressed transfer syntax only when told which (and by default in a
# context of its own, so the file goes as it is).
STORESCU_OPTION = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


@dataclass(frozen=True)
class CorpusFile:
    path: Path  # the file to send (an original, or a copy with fresh UIDs)
    original: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def dataset_bytes(path: Path) -> bytes:
    """The data set part of a Part 10 file: everything after the File Meta group (PS3.10 7.1)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not Part 10"
    pos = 132
    while True:
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            return data[pos:]
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]


# Files pydicom reads without complaint but that are cut short; the bad-input tests use them.
TRUNCATED = {"MR_truncated.dcm", "rtplan_truncated.dcm"}


def _is_storable(path: Path) -> tuple[str, str, str] | None:
    """(SOP class, SOP instance, transfer syntax) if ``path`` is a complete, valid instance of a
    standard storage SOP class in a syntax we accept; None otherwise."""
    if path.name in TRUNCATED:
        return None
    try:
        with warnings.catch_warnings():
            # A file whose meta says explicit VR but whose data set is implicit is not valid
            # Part 10 (PS3.10 7.1), however leniently pydicom reads it.
            warnings.filterwarnings("error", message="Expected explicit VR")
            ds = pydicom.dcmread(path)
        ds.PixelData if "PixelData" in ds else None  # noqa: B018 - read it all: truncated files fail
        for elem in ds.iterall():
            elem.value  # noqa: B018 - decode every value
    except Exception:
        return None
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in SOP_CLASS_GROUPS["storage"] or ts not in TRANSFER_SYNTAX_GROUPS["all"]:
        return None
    if not ds.get("StudyInstanceUID") or not ds.get("SeriesInstanceUID"):
        return None
    # Part 10 as written: the file's SOP Instance UID must agree with its meta
    if ds.file_meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID"):
        return None
    return sop_class, str(ds.SOPInstanceUID), ts


def dcmtk_can_send(path: Path) -> bool:
    """storescu finds the SOP class and instance only in elements encoded with VR UI; a file that
    encodes them as UN (legal in explicit VR, and pydicom reads it) is refused by storescu."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if ds.original_encoding[0]:  # implicit VR: no VR in the file to be wrong
        return True
    return all(ds.get_item(tag).VR == "UI" for tag in (0x00080016, 0x00080018))


def candidates() -> list[Path]:
    files = [p for p in TEST_FILES.rglob("*") if p.is_file()]
    files += [p for p in CHARSET_FILES.rglob("*") if p.is_file()]
    return sorted(files)


def storable_corpus(workdir: Path) -> list[CorpusFile]:
    """Every valid storable file; where several share a SOP Instance UID (with different
    content), the first keeps it and the others are copied into ``workdir`` with fresh UIDs."""
    found: dict[str, list[tuple[Path, str, str]]] = defaultdict(list)
    for path in candidates():
        info = _is_storable(path)
        if info is not None:
            sop_class, sop_instance, ts = info
            found[sop_instance].append((path, sop_class, ts))
    corpus: list[CorpusFile] = []
    workdir.mkdir(parents=True, exist_ok=True)
    for sop_instance, group in found.items():
        for i, (path, sop_class, ts) in enumerate(group):
            if i == 0:
                corpus.append(CorpusFile(path, path, sop_class, sop_instance, ts))
                continue
            ds = pydicom.dcmread(path)
            fresh = generate_uid()
            ds.SOPInstanceUID = fresh
            ds.file_meta.MediaStorageSOPInstanceUID = fresh
            copy = workdir / f"{len(corpus):03d}-{path.name}"
            ds.save_as(copy, enforce_file_format=True)
            corpus.append(CorpusFile(copy, path, sop_class, fresh, ts))
    return corpus


def duplicate_groups() -> dict[str, list[Path]]:
    """Original files that share a SOP Instance UID, by that UID (for the duplicate policy)."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in candidates():
        info = _is_storable(path)
        if info is not None:
            found[info[1]].append(path)
    return {uid: paths for uid, paths in found.items() if len(paths) > 1}
