"""A fast, exact Implicit VR Little Endian encoder for DIMSE command sets (PS3.7 6.3.1, E).

pynetdicom encodes every command set through pydicom's generic ``write_dataset``, twice per
message (once for the Command Group Length, once to send). A command set is a handful of group
0000 elements of a few VRs, so it can be written directly: tag, 32-bit length, value padded to
even length (UIDs with NUL, text with a space, PS3.5 6.2). :func:`install_codec_hooks` replaces
the ``encode`` name ``pynetdicom.dimse_messages`` uses (pinned to pynetdicom 3.0.x in
pyproject.toml, like ``dicomnode.receive``); anything that is not a plain command set (another
group, an unexpected VR or value type, non-ASCII text, another transfer syntax) goes to
pynetdicom's own ``encode``, so the bytes on the wire are always those pynetdicom would send
(``tests/test_dimse_codec.py`` compares both for every message type).

:func:`command_set` builds the encoded command set of a message straight from keyword values,
for code that sends messages without a pydicom Dataset (``dicomnode.retrieve``), and
:func:`decode_command` reads one back into plain values.

The same hooks memoise pynetdicom's UID conversion (``pynetdicom.utils.set_uid``): decoding an
A-ASSOCIATE-RQ turns every transfer syntax of every presentation context into a validated
pydicom ``UID``, a regular expression each, so 128 contexts of 39 syntaxes cost about 50 ms of
the acceptor's time; the same few dozen UIDs come back in every association.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pynetdicom.ae
import pynetdicom.dimse_primitives
import pynetdicom.pdu_items
import pynetdicom.pdu_primitives
import pynetdicom.presentation
import pynetdicom.utils
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import dimse_messages, dsutils

# Every element pynetdicom's command sets use (PS3.7 E.1-1), with its VR.
COMMAND_ELEMENTS: dict[str, tuple[int, str]] = {
    "CommandGroupLength": (0x00000000, "UL"),
    "AffectedSOPClassUID": (0x00000002, "UI"),
    "RequestedSOPClassUID": (0x00000003, "UI"),
    "CommandField": (0x00000100, "US"),
    "MessageID": (0x00000110, "US"),
    "MessageIDBeingRespondedTo": (0x00000120, "US"),
    "MoveDestination": (0x00000600, "AE"),
    "Priority": (0x00000700, "US"),
    "CommandDataSetType": (0x00000800, "US"),
    "Status": (0x00000900, "US"),
    "OffendingElement": (0x00000901, "AT"),
    "ErrorComment": (0x00000902, "LO"),
    "ErrorID": (0x00000903, "US"),
    "AffectedSOPInstanceUID": (0x00001000, "UI"),
    "RequestedSOPInstanceUID": (0x00001001, "UI"),
    "EventTypeID": (0x00001002, "US"),
    "AttributeIdentifierList": (0x00001005, "AT"),
    "ActionTypeID": (0x00001008, "US"),
    "NumberOfRemainingSuboperations": (0x00001020, "US"),
    "NumberOfCompletedSuboperations": (0x00001021, "US"),
    "NumberOfFailedSuboperations": (0x00001022, "US"),
    "NumberOfWarningSuboperations": (0x00001023, "US"),
    "MoveOriginatorApplicationEntityTitle": (0x00001030, "AE"),
    "MoveOriginatorMessageID": (0x00001031, "US"),
}
_VR_BY_TAG = {tag: vr for tag, vr in COMMAND_ELEMENTS.values()}
_KEYWORD_BY_TAG = {tag: keyword for keyword, (tag, _) in COMMAND_ELEMENTS.items()}
_TEXT_VRS = frozenset({"AE", "LO", "SH", "CS", "ST"})

_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class _NotPlain(Exception):
    """A value this encoder does not handle: pynetdicom's own encoder takes the command set."""


def _value_bytes(vr: str, value: Any) -> bytes:
    """The encoded value of one element, padded to even length, exactly as pydicom writes it."""
    kind = type(value)
    if value is None:
        return b""
    if vr == "US" or vr == "UL":
        # int and its subclasses but bool: a handler's status is often an IntEnum, which
        # pydicom writes as its integer value.
        if not issubclass(kind, int) or kind is bool:
            raise _NotPlain
        try:
            return (_US if vr == "US" else _UL).pack(value)
        except struct.error:
            raise _NotPlain from None
    if vr == "UI" or vr in _TEXT_VRS:
        # str and pydicom's UID (a str subclass); a MultiValue or bytes is left to pydicom.
        if not isinstance(value, str) or "\\" in value or not value.isascii():
            raise _NotPlain
        data = value.encode("ascii")
        if len(data) % 2:
            data += b"\x00" if vr == "UI" else b" "
        return data
    if vr == "AT":
        tags = [value] if isinstance(value, int) else value
        if not isinstance(tags, list):  # a MultiValue or a tuple: pydicom's rules apply
            raise _NotPlain
        out = bytearray()
        for tag in tags:
            if not isinstance(tag, int) or isinstance(tag, bool) or not 0 <= tag <= 0xFFFFFFFF:
                raise _NotPlain
            out += struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        return bytes(out)
    raise _NotPlain


def _encode_elements(elements: Iterable[tuple[int, str, Any]]) -> bytes:
    """Elements (tag, VR, value) in ascending tag order, encoded Implicit VR Little Endian."""
    out = bytearray()
    pack = _HEADER.pack
    for tag, vr, value in elements:
        data = _value_bytes(vr, value)
        out += pack(tag >> 16, tag & 0xFFFF, len(data))
        out += data
    return bytes(out)


def _plain_elements(ds: Dataset) -> list[tuple[int, str, Any]] | None:
    """(tag, VR, value) of every element when ``ds`` is a plain command set, else None."""
    found: list[tuple[int, str, Any]] = []
    store = ds._dict
    for tag in sorted(store):
        elem = store[tag]
        if type(elem) is not DataElement:  # a raw (undecoded) element: pydicom decides
            return None
        vr = _VR_BY_TAG.get(tag)
        if vr is None or vr != elem.VR:
            return None
        found.append((int(tag), vr, elem.value))
    return found


def encode_dataset(
    ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> bytes | None:
    """Drop-in for ``pynetdicom.dsutils.encode``: command sets here, the rest by pynetdicom."""
    if is_implicit_vr and is_little_endian and not deflated:
        elements = _plain_elements(ds)
        if elements is not None:
            try:
                return _encode_elements(elements)
            except _NotPlain:
                pass
    return _pynetdicom_encode(ds, is_implicit_vr, is_little_endian, deflated)


def command_set(fields: Mapping[str, Any]) -> bytes:
    """The encoded command set (Command Group Length first) of ``fields``: keyword -> value for
    keywords of :data:`COMMAND_ELEMENTS`; None values are left out, as pynetdicom does.

    Raises ValueError for an unknown keyword or a value this encoder does not take (use
    pynetdicom's own message classes for those).
    """
    elements = []
    for keyword, value in fields.items():
        if value is None or keyword == "CommandGroupLength":
            continue
        try:
            tag, vr = COMMAND_ELEMENTS[keyword]
        except KeyError:
            raise ValueError(f"{keyword!r} is not a command element") from None
        elements.append((tag, vr, value))
    elements.sort(key=lambda item: item[0])
    try:
        body = _encode_elements(elements)
    except _NotPlain:
        raise ValueError("a value the command set encoder does not take") from None
    return _HEADER.pack(0, 0, 4) + _UL.pack(len(body)) + body


def decode_command(data: bytes) -> dict[str, Any]:
    """The values of an encoded command set, by keyword: US/UL as int, UI/text stripped of their
    padding (as pydicom does), AT as a list of ints. Raises ValueError on a malformed or
    unknown element."""
    values: dict[str, Any] = {}
    offset, end = 0, len(data)
    unpack = _HEADER.unpack_from
    while offset < end:
        if end - offset < 8:
            raise ValueError("truncated command set element")
        group, element, length = unpack(data, offset)
        offset += 8
        value = data[offset : offset + length]
        if len(value) != length:
            raise ValueError("truncated command set value")
        offset += length
        tag = (group << 16) | element
        keyword = _KEYWORD_BY_TAG.get(tag)
        if keyword is None:
            raise ValueError(f"unknown command element ({group:04X},{element:04X})")
        vr = _VR_BY_TAG[tag]
        if not length:
            values[keyword] = None
        elif vr == "US":
            values[keyword] = _US.unpack(value)[0] if length == 2 else None
        elif vr == "UL":
            values[keyword] = _UL.unpack(value)[0] if length == 4 else None
        elif vr == "AT":
            values[keyword] = [
                (g << 16) | e for g, e in struct.iter_unpack("<HH", value[: length - length % 4])
            ]
        elif vr == "UI":
            values[keyword] = value.decode("ascii", "replace").rstrip("\x00 ")
        else:
            values[keyword] = value.decode("latin-1").strip(" ")
    return values


_pynetdicom_encode: Callable[..., bytes | None] = dsutils.encode
_installed = False


_set_uid = pynetdicom.utils.set_uid
# The modules that call set_uid by the name they imported.
_SET_UID_USERS = (
    pynetdicom.utils,
    pynetdicom.ae,
    pynetdicom.dimse_primitives,
    pynetdicom.pdu_items,
    pynetdicom.pdu_primitives,
    pynetdicom.presentation,
)


# Bounded: a peer sending ever new UIDs only evicts older ones.
@functools.lru_cache(maxsize=4096)
def _uid_of(
    value: str | bytes, name: str, allow_empty: bool, allow_none: bool, validate: bool
) -> Any:
    return _set_uid(value, name, allow_empty, allow_none, validate)


def set_uid(
    value: Any,
    name: str,
    allow_empty: bool = True,
    allow_none: bool = True,
    validate: bool = True,
) -> Any:
    """``pynetdicom.utils.set_uid``, remembered for text and bytes values: the same arguments
    give the same (immutable) UID or the same error, so a UID seen before is not validated
    again."""
    if isinstance(value, str | bytes):
        return _uid_of(value, name, allow_empty, allow_none, validate)
    return _set_uid(value, name, allow_empty, allow_none, validate)


def install_codec_hooks() -> None:
    """Encode command sets with :func:`encode_dataset`, and convert UIDs through :func:`set_uid`
    (idempotent; affects every AE in the process, our SCP and our SCUs alike: the bytes and
    values are the same, only cheaper to make)."""
    global _installed
    if _installed:
        return
    if getattr(dimse_messages, "encode", None) is not dsutils.encode:
        raise RuntimeError("this pynetdicom version lacks the command-set encoder name we hook")
    dimse_messages.encode = encode_dataset  # type: ignore[attr-defined]
    for module in _SET_UID_USERS:
        if getattr(module, "set_uid", None) is not _set_uid:
            raise RuntimeError(
                f"this pynetdicom version lacks the set_uid name we hook in {module}"
            )
        module.set_uid = set_uid  # type: ignore[attr-defined]
    _installed = True
