"""Structural check of an encoded data set: every element header complete, every length inside
the data, every undefined-length value closed by its delimiter (PS3.5 7.1, 7.5).

pydicom is lenient: it stops quietly at a cut-off header and seeks past a length that runs off the
end. A storage SCP must not acknowledge such a data set, so before the archive believes pydicom it
walks the headers here. Values are skipped by seeking, never read, so the cost is a few reads per
element whatever the instance's size.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
# Explicit VRs (PS3.5 6.2, Table 6.2-1). Any other pair of bytes leaves the length field's size
# unknown (2 or 4 bytes), so nothing after it can be read with confidence.
_VRS = _LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
# Nesting deeper than any real IOD, bounded so a hostile data set cannot exhaust the stack.
MAX_DEPTH = 64
# A deflated data set (PS3.5 A.5) may inflate to at most this many times its deflated size, and
# never past MAX_INFLATED; past MIN_INFLATED the ratio applies. Real data sets deflate a few times
# over (blank images much more, but those are small); a "deflate bomb" inflates a thousandfold.
INFLATE_RATIO = 256
MIN_INFLATED = 64 * 2**20
MAX_INFLATED = 2**30
_INFLATE_STEP = 2**20


class EncodingError(ValueError):
    """The data set's encoding is broken; the message says where."""


def inflate_limit(deflated_size: int) -> int:
    """The most bytes a deflated data set of ``deflated_size`` bytes may inflate to."""
    return min(MAX_INFLATED, max(MIN_INFLATED, INFLATE_RATIO * deflated_size))


def inflate(fp: BinaryIO, end: int, out: BinaryIO | None = None) -> int:
    """Inflate the raw deflate stream (PS3.5 A.5: RFC 1951, no zlib header) in ``fp`` from its
    position to ``end`` in bounded steps, into ``out`` (None: only count); return the inflated
    size. Raises :class:`EncodingError` for a corrupt or unfinished stream, and as soon as the
    output passes :func:`inflate_limit`: memory stays at one step whatever the stream claims."""
    limit = inflate_limit(end - fp.tell())
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending = b""
    try:
        while not inflater.eof:
            if not pending:
                want = min(_INFLATE_STEP, end - fp.tell())
                pending = fp.read(want) if want > 0 else b""
                if not pending:
                    break
            chunk = inflater.decompress(pending, _INFLATE_STEP)
            pending = inflater.unconsumed_tail
            total += len(chunk)
            if total > limit:
                raise EncodingError(
                    f"deflated data set inflates past {limit} bytes ({INFLATE_RATIO} times its "
                    f"deflated size, at least {MIN_INFLATED} and at most {MAX_INFLATED})"
                )
            if out is not None and chunk:
                out.write(chunk)
    except zlib.error as exc:
        raise EncodingError(f"deflate stream is corrupt: {exc}") from exc
    if not inflater.eof:
        raise EncodingError("deflate stream ends before its final block")
    return total


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


def _is_sequence(tag: int) -> bool:
    """Whether the data dictionary has ``tag`` as a sequence (as pydicom's reader decides)."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


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
            position = self.fp.tell()
            if position >= self.end:
                if position > self.end:  # a header read across the end of its item
                    raise EncodingError(f"element header runs past its item at {self.end}")
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
                if vr not in _VRS:
                    raise EncodingError(
                        f"element ({group:04X},{element:04X}) has an invalid VR (0x{vr.hex()})"
                    )
                if vr in _LONG_VRS:
                    self._read(2, "element header")
                    length = struct.unpack(f"{self.endian}I", self._read(4, "element length"))[0]
                else:
                    length = struct.unpack(f"{self.endian}H", self._read(2, "element length"))[0]
            where = f"element ({group:04X},{element:04X})"
            if length == _UNDEFINED:
                # PS3.5 6.2.2: an undefined-length UN holds implicit VR little endian.
                self.items(depth + 1, implicit or vr == b"UN", where)
            elif vr == b"SQ":
                # Defined-length items are walked too (PS3.5 7.5.1): their nesting counts.
                self.defined_items(depth + 1, length, implicit, where)
            elif (implicit or vr == b"UN") and length >= 8 and _is_sequence(tag):
                # Implicit VR (or UN, which holds implicit VR, PS3.5 6.2.2): only the data
                # dictionary says this is a sequence, and pydicom's reader recurses into it.
                self.defined_items(depth + 1, length, True, where)
            else:
                self._skip(length, where)

    def defined_items(self, depth: int, length: int, implicit: bool, where: str) -> None:
        """Items of a defined-length sequence, each inside the value, each item's elements
        inside the item."""
        outer = self.end
        value_end = self.fp.tell() + length
        if value_end > outer:
            raise EncodingError(f"{where} length {length} runs past the end of the data set")
        try:
            while self.fp.tell() < value_end:
                self.end = value_end
                group, element, item_length = struct.unpack(
                    f"{self.endian}HHI", self._read(8, f"item header in {where}")
                )
                if (group << 16) | element != _ITEM:
                    raise EncodingError(
                        f"{where}: expected an item, found ({group:04X},{element:04X})"
                    )
                if item_length == _UNDEFINED:
                    self.elements(depth, until_delimiter=True, implicit=implicit)
                else:
                    if self.fp.tell() + item_length > value_end:
                        raise EncodingError(f"item in {where} runs past the end of its sequence")
                    self.end = self.fp.tell() + item_length
                    self.elements(depth, until_delimiter=False, implicit=implicit)
            if self.fp.tell() != value_end:
                raise EncodingError(f"{where}: items run past the end of the sequence")
        finally:
            self.end = outer

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
