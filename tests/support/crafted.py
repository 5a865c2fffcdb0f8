"""Data sets crafted byte by byte (explicit VR little endian, PS3.5 7.1.2), for the malicious-input
tests: every element header written by hand, so a test can declare any VR, length or nesting."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.uid import generate_uid

from dicomnode.receive import FileMeta, encode_file_meta

CT = "1.2.840.10008.5.1.4.1.1.2"
# Patient data the node must never write to its log at INFO or above.
PATIENT_NAME = b"ATTACK^SECRET"
PATIENT_ID = b"PID-7734-SECRET"
UNDEFINED = 0xFFFFFFFF
_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` overrides the declared length."""
    declared = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in _LONG:
        return head + b"\x00\x00" + struct.pack("<I", declared) + value
    return head + struct.pack("<H", declared) + value


def item(body: bytes, defined: bool = True) -> bytes:
    length = len(body) if defined else UNDEFINED
    return struct.pack("<HHI", 0xFFFE, 0xE000, length) + body


ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQUENCE_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def ui(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def even(data: bytes, pad: bytes = b" ") -> bytes:
    return data + pad if len(data) % 2 else data


class Instance:
    """A CT instance's identifying header; ``encode(before, after)`` puts crafted bytes after
    (0008,0005) or at the end (tags must ascend: callers pick tags that fit)."""

    def __init__(self, charset: bytes = b"ISO_IR 100") -> None:
        self.sop_instance = generate_uid()
        self.study = generate_uid()
        self.series = generate_uid()
        self.charset = charset

    def encode(self, tail: bytes = b"", middle: bytes = b"") -> bytes:
        """The header, ``middle`` between the patient and study elements (tags 0010-0020),
        ``tail`` after the series UID (tags above (0020,000E))."""
        return (
            element(0x00080005, b"CS", even(self.charset))
            + element(0x00080016, b"UI", ui(CT))
            + element(0x00080018, b"UI", ui(self.sop_instance))
            + element(0x00080060, b"CS", b"CT")
            + element(0x00100010, b"PN", even(PATIENT_NAME))
            + element(0x00100020, b"LO", even(PATIENT_ID))
            + middle
            + element(0x0020000D, b"UI", ui(self.study))
            + element(0x0020000E, b"UI", ui(self.series))
            + tail
        )


CONTENT_SEQUENCE = 0x0040A730


def nested(depth: int, defined: bool) -> bytes:
    """(0040,A730) Content Sequence nested ``depth`` deep, each level one item holding the next,
    every sequence and item closed properly (defined lengths, or undefined with delimiters)."""
    inner = element(0x0040A010, b"CS", b"CONTAINS")
    for _ in range(depth):
        if defined:
            inner = element(CONTENT_SEQUENCE, b"SQ", item(inner))
        else:
            body = item(inner + ITEM_DELIMITER, defined=False) + SEQUENCE_DELIMITER
            inner = element(CONTENT_SEQUENCE, b"SQ", body, length=UNDEFINED)
    return inner


def deflate_bomb(header: bytes, inflated_pixels: int) -> bytes:
    """``header`` then Pixel Data (OB) of ``inflated_pixels`` zero bytes, deflated (PS3.5 A.5:
    raw RFC 1951): a few MB that inflate to ``inflated_pixels``. Built from one full-flushed
    16 MiB block repeated (a full flush resets the window, so copies of it are a valid stream)."""
    step = 16 * 2**20
    assert inflated_pixels % step == 0
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = element(0x7FE00010, b"OB", b"", length=inflated_pixels)
    prefix = deflater.compress(header + head) + deflater.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(step)
    block = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
    again = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
    assert block == again, "full-flushed blocks differ: the bomb would not be valid"
    stream = prefix + block * (inflated_pixels // step) + deflater.flush()
    return stream + b"\x00" if len(stream) % 2 else stream


def deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = deflater.compress(data) + deflater.flush()
    return stream + b"\x00" if len(stream) % 2 else stream


def part10(
    path: Path,
    sop_instance: str,
    transfer_syntax: str,
    dataset: bytes,
    preamble: bytes = bytes(128),
) -> Path:
    """A Part 10 file: ``preamble``, "DICM", our File Meta (PS3.10 7.1), ``dataset``."""
    assert len(preamble) == 128
    meta = encode_file_meta(FileMeta(CT, sop_instance, transfer_syntax))
    path.write_bytes(preamble + b"DICM" + meta + dataset)
    return path


# Executable headers a dual-format ("polyglot") file carries in its preamble (PS3.10 7.1 allows
# any preamble content; the security concern is such a file being run as a program).
# "MZ", e_lfanew (offset 60) pointing at "PE\0\0" at 64: a DOS/PE header.
PE_PREAMBLE = b"MZ" + bytes(58) + struct.pack("<I", 64) + b"PE\x00\x00" + bytes(60)
ELF_PREAMBLE = b"\x7fELF\x02\x01\x01" + bytes(121)


def implicit(tag: int, value: bytes) -> bytes:
    """One implicit VR little endian element (PS3.5 7.1.3)."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def nested_implicit(depth: int) -> bytes:
    """Content Sequence nested ``depth`` deep in implicit VR, defined lengths: only the data
    dictionary says (0040,A730) is a sequence, so a reader recurses where a walker cannot see."""
    inner = implicit(0x0040A010, b"CONTAINS")
    for _ in range(depth):
        inner = implicit(CONTENT_SEQUENCE, item(inner))
    return inner


def implicit_header(x: Instance) -> bytes:
    return (
        implicit(0x00080016, ui(CT))
        + implicit(0x00080018, ui(x.sop_instance))
        + implicit(0x00100010, even(PATIENT_NAME))
        + implicit(0x0020000D, ui(x.study))
        + implicit(0x0020000E, ui(x.series))
    )
