"""Structural check of an encoded data set: every element header complete, every length inside
the data, every undefined-length value closed by its delimiter (PS3.5 7.1, 7.5).

pydicom is lenient: it stops quietly at a cut-off header and seeks past a length that runs off the
end. A storage SCP must not acknowledge such a data set, so before the archive believes pydicom it
walks the headers here. Values are skipped by seeking, never read, so the cost is a few reads per
element whatever the instance's size.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
# Nesting deeper than any real IOD, bounded so a hostile data set cannot exhaust the stack.
MAX_DEPTH = 64


class EncodingError(ValueError):
    """The data set's encoding is broken; the message says where."""


def check_dataset(fp: BinaryIO, start: int, end: int, transfer_syntax: str) -> None:
    """Walk the data set in ``fp`` from ``start`` to ``end`` encoded in ``transfer_syntax``.

    Deflated data sets are not walked (the archive checks them by inflating, bounded).
    """
    walker = _Walker(
        fp,
        end,
        implicit=transfer_syntax == ImplicitVRLittleEndian,
        endian=">" if transfer_syntax == ExplicitVRBigEndian else "<",
    )
    fp.seek(start)
    if start >= end:
        raise EncodingError("empty data set")
    walker.elements(depth=0, until_delimiter=False, implicit=walker.implicit)


class _Walker:
    def __init__(self, fp: BinaryIO, end: int, implicit: bool, endian: str) -> None:
        self.fp = fp
        self.end = end
        self.implicit = implicit
        self.endian = endian

    def _read(self, n: int, what: str) -> bytes:
        data = self.fp.read(n)
        if len(data) < n:
            raise EncodingError(f"{what} cut short at offset {self.fp.tell()}")
        return data

    def _skip(self, length: int, what: str) -> None:
        if self.fp.tell() + length > self.end:
            raise EncodingError(f"{what} length {length} runs past the end of the data set")
        self.fp.seek(length, 1)

    def elements(self, depth: int, until_delimiter: bool, implicit: bool) -> None:
        """Elements until the end (top level, defined-length item) or an item delimiter."""
        if depth > MAX_DEPTH:
            raise EncodingError(f"sequences nested deeper than {MAX_DEPTH}")
        while True:
            if self.fp.tell() == self.end:
                if until_delimiter:
                    raise EncodingError("undefined-length item without an item delimiter")
                return
            group, element = struct.unpack(f"{self.endian}HH", self._read(4, "element tag"))
            tag = (group << 16) | element
            if tag == _ITEM_DELIM:
                self._read(4, "item delimiter")
                if not until_delimiter:
                    raise EncodingError("item delimiter outside an item")
                return
            if tag in (_ITEM, _SEQ_DELIM):
                raise EncodingError(f"item tag ({group:04X},{element:04X}) outside a sequence")
            vr = b""
            if implicit:
                length = struct.unpack(f"{self.endian}I", self._read(4, "element length"))[0]
            else:
                vr = self._read(2, "element VR")
                if vr in _LONG_VRS:
                    self._read(2, "element header")
                    length = struct.unpack(f"{self.endian}I", self._read(4, "element length"))[0]
                else:
                    length = struct.unpack(f"{self.endian}H", self._read(2, "element length"))[0]
            where = f"element ({group:04X},{element:04X})"
            if length == _UNDEFINED:
                # PS3.5 6.2.2: an undefined-length UN holds implicit VR little endian.
                self.items(depth + 1, implicit or vr == b"UN", where)
            else:
                self._skip(length, where)

    def items(self, depth: int, implicit: bool, where: str) -> None:
        """Items of an undefined-length value (a sequence or encapsulated fragments)."""
        while True:
            group, element, length = struct.unpack(
                f"{self.endian}HHI", self._read(8, f"item header in {where}")
            )
            tag = (group << 16) | element
            if tag == _SEQ_DELIM:
                return
            if tag != _ITEM:
                raise EncodingError(f"{where}: expected an item, found ({group:04X},{element:04X})")
            if length == _UNDEFINED:
                self.elements(depth, until_delimiter=True, implicit=implicit)
            else:
                self._skip(length, f"item in {where}")
