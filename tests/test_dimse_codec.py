"""dicomnode.dimse_codec against pynetdicom's own encoding: byte for byte, every message type."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
from pynetdicom import dimse_messages, dimse_primitives, dsutils

from dicomnode import dimse_codec

UIDS = ["1.2.3", "1.2.34", "1.2.840.10008.5.1.4.1.1.2", "1." + "2" * 62]  # odd, even, 64 chars
AES = ["A", "AB", "STORESCP", "SIXTEEN_CHARS_AE"]
COMMENTS = ["", "x", "ok", "Failed: out of resources"]
TAGS: list[Any] = [[0x00100010], [0x00100010, 0x0020000D, 0x7FE00010], 0x00080018]
COUNTS = [0, 1, 65535]

POOL: dict[str, list[Any]] = {
    "MessageID": [1, 65535],
    "MessageIDBeingRespondedTo": [1, 65535],
    "AffectedSOPClassUID": UIDS,
    "RequestedSOPClassUID": UIDS,
    "AffectedSOPInstanceUID": UIDS,
    "RequestedSOPInstanceUID": UIDS,
    "Priority": [0, 1, 2],
    "Status": [0x0000, 0xFF00, 0xA801, 0xB000, 0xC000, 0xFE00],
    "MoveDestination": AES,
    "MoveOriginatorApplicationEntityTitle": AES,
    "MoveOriginatorMessageID": [1, 65535],
    "ErrorComment": COMMENTS,
    "OffendingElement": TAGS,
    "AttributeIdentifierList": TAGS,
    "ErrorID": [0, 0xFFFF],
    "EventTypeID": [1, 0xFFFF],
    "ActionTypeID": [1, 0xFFFF],
    "NumberOfRemainingSuboperations": COUNTS,
    "NumberOfCompletedSuboperations": COUNTS,
    "NumberOfFailedSuboperations": COUNTS,
    "NumberOfWarningSuboperations": COUNTS,
}
DATA_SET_NAMES = [
    "DataSet", "Identifier", "EventInformation", "EventReply", "AttributeList",
    "ModificationList", "ActionInformation", "ActionReply",
]  # fmt: skip
PRIMITIVES = {
    "C_STORE": dimse_primitives.C_STORE, "C_FIND": dimse_primitives.C_FIND,
    "C_GET": dimse_primitives.C_GET, "C_MOVE": dimse_primitives.C_MOVE,
    "C_ECHO": dimse_primitives.C_ECHO, "C_CANCEL": dimse_primitives.C_CANCEL,
    "N_EVENT_REPORT": dimse_primitives.N_EVENT_REPORT, "N_GET": dimse_primitives.N_GET,
    "N_SET": dimse_primitives.N_SET, "N_ACTION": dimse_primitives.N_ACTION,
    "N_CREATE": dimse_primitives.N_CREATE, "N_DELETE": dimse_primitives.N_DELETE,
}  # fmt: skip
MESSAGES = [cls for _, cls in dimse_messages._MESSAGE_TYPES.values()]


def variants(message: type[Any]) -> Iterator[dict[str, Any]]:
    """Keyword values for ``message``: each field through every value of its pool (others at
    their first), optional fields left out, and with and without a data set."""
    name = message.__name__
    keywords = [
        k for k in dimse_messages._COMMAND_SET_KEYWORDS[name.replace("_", "-")]
        if k in POOL
    ]  # fmt: skip
    base = {k: POOL[k][0] for k in keywords}
    yield base
    for keyword in keywords:
        for value in POOL[keyword][1:]:
            yield {**base, keyword: value}
        yield {k: v for k, v in base.items() if k != keyword}
    for a, b in itertools.combinations(keywords, 2):
        yield {**base, a: POOL[a][-1], b: POOL[b][-1]}


def build(message: type[Any], values: dict[str, Any], with_data: bool) -> Any:
    name = message.__name__
    primitive = PRIMITIVES[name.rsplit("_", 1)[0]]()
    for keyword, value in values.items():
        setattr(primitive, keyword, value)
    if with_data:
        for attr in DATA_SET_NAMES:
            if hasattr(primitive, attr):
                setattr(primitive, attr, BytesIO(b"\x08\x00\x18\x00\x02\x00\x00\x001\x00"))
    return primitive


def encoded(message: type[Any], primitive: Any, encoder: Any) -> bytes:
    original = dimse_messages.encode  # type: ignore[attr-defined]
    dimse_messages.encode = encoder  # type: ignore[attr-defined]
    try:
        msg = message()
        msg.primitive_to_message(primitive)
        return b"".join(
            data[:1] + data[1:]
            for pdata in msg.encode_msg(1, 0)
            for _, data in pdata.presentation_data_value_list
        )
    finally:
        dimse_messages.encode = original  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.__name__)
def test_every_message_type_encodes_as_pynetdicom_does(message: type[Any]) -> None:
    checked = 0
    for values in variants(message):
        for with_data in (False, True):
            try:
                primitive = build(message, values, with_data)
            except (ValueError, TypeError):
                continue  # a value pynetdicom's primitive itself refuses
            ours = encoded(message, primitive, dimse_codec.encode_dataset)
            theirs = encoded(message, primitive, dsutils.encode)
            assert ours == theirs, (values, with_data)
            checked += 1
    assert checked > 5


def test_fallback_for_what_is_not_a_plain_command_set() -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = "Doe^John"  # not group 0000
    ds.CommandGroupLength = 0
    assert dimse_codec.encode_dataset(ds, True, True) == dsutils.encode(ds, True, True)
    cs = Dataset()
    cs.ErrorComment = "Größe"  # not ASCII: pydicom's character set rules apply
    assert dimse_codec.encode_dataset(cs, True, True) == dsutils.encode(cs, True, True)
    cs = Dataset()
    cs.Status = 0
    # Explicit VR is never a command set encoding: pynetdicom's encoder.
    assert dimse_codec.encode_dataset(cs, False, True) == dsutils.encode(cs, False, True)


def command_of(message: type[Any], primitive: Any) -> bytes:
    msg = message()
    msg.primitive_to_message(primitive)
    return bytes(dsutils.encode(msg.command_set, True, True) or b"")


@pytest.mark.parametrize(
    "message", [dimse_messages.C_STORE_RQ, dimse_messages.C_STORE_RSP, dimse_messages.C_MOVE_RSP,
                dimse_messages.C_GET_RSP, dimse_messages.C_FIND_RSP, dimse_messages.C_ECHO_RSP],
    ids=lambda m: m.__name__,
)  # fmt: skip
def test_command_set_from_values_and_back(message: type[Any]) -> None:
    field = {v[1]: k for k, v in dimse_messages._MESSAGE_TYPES.items()}[message]
    keywords = [k for k in dimse_messages._COMMAND_SET_KEYWORDS[message.__name__.replace("_", "-")]
                if k in POOL]  # fmt: skip
    for values in variants(message):
        for with_data in (False, True):
            try:
                primitive = build(message, values, with_data)
            except (ValueError, TypeError):
                continue
            theirs = command_of(message, primitive)
            fields = {
                "CommandField": field,
                "CommandDataSetType": 0x0001 if with_data and message.__name__ != "C_STORE_RSP"
                and message.__name__ != "C_ECHO_RSP" else 0x0101,
                **{k: getattr(primitive, k, None) for k in keywords},
            }  # fmt: skip
            assert dimse_codec.command_set(fields) == theirs, values
            # Decoding: the values pynetdicom decodes from the same bytes.
            decoded = dimse_codec.decode_command(theirs)
            ds = dsutils.decode(BytesIO(theirs), True, True)
            for elem in ds:
                value = elem.value
                if elem.VR == "AT":
                    value = list(value) if elem.VM > 1 else ([value] if elem.VM else None)
                elif elem.VR in ("UI", "AE", "LO") and value is not None:
                    value = str(value)
                got = decoded[elem.keyword]
                if elem.VR in ("UI", "AE", "LO") and got is None:
                    got = ""
                    value = value or ""
                assert got == value, (elem.keyword, got, value)


def test_command_set_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError):
        dimse_codec.command_set({"PatientName": "x"})
    with pytest.raises(ValueError):
        dimse_codec.command_set({"Status": "0"})
    with pytest.raises(ValueError):
        dimse_codec.decode_command(b"\x00\x00\x00\x09\x04\x00")


def test_a_handlers_intenum_status_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom puts a handler's return value (our Status, an IntEnum) into the response as it
    is; encoding it must not fall back to pydicom, and must give pydicom's bytes."""
    from dicomnode.status import Status

    rsp = dimse_primitives.C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.3.4.5"
    rsp.Status = Status.OUT_OF_RESOURCES
    message = dimse_messages.C_STORE_RSP()
    message.primitive_to_message(rsp)
    expected = dsutils.encode(message.command_set, True, True)

    def no_fallback(*args: Any) -> bytes:
        raise AssertionError("fell back to pydicom for an IntEnum status")

    monkeypatch.setattr(dimse_codec, "_pynetdicom_encode", no_fallback)
    assert dimse_codec.encode_dataset(message.command_set, True, True) == expected
    bool_status = dimse_messages.C_STORE_RSP()
    rsp.Status = 0
    bool_status.primitive_to_message(rsp)
    bool_status.command_set.Status = True  # a bool is not an integer value here
    with pytest.raises(AssertionError, match="fell back"):
        dimse_codec.encode_dataset(bool_status.command_set, True, True)


# --- UID conversion, memoised ------------------------------------------------------------------

UID_VALUES: list[Any] = [
    "1.2.840.10008.1.2.1",
    b"1.2.840.10008.1.2.1\x00",  # as an A-ASSOCIATE-RQ item may carry it, padded
    b"1.2.840.10008.5.1.4.1.1.2",
    "1.2.3.04",  # non-conformant (a leading zero)
    "9" * 65,  # too long
    "",
    None,
]


@pytest.mark.parametrize("value", UID_VALUES)
@pytest.mark.parametrize(
    ("allow_empty", "allow_none", "validate"),
    [(True, True, True), (False, False, True), (True, True, False)],
)
def test_set_uid_answers_as_pynetdicom(
    value: Any, allow_empty: bool, allow_none: bool, validate: bool
) -> None:
    import pynetdicom.utils

    ours, theirs = dimse_codec.set_uid, dimse_codec._set_uid
    assert theirs.__module__ == pynetdicom.utils.__name__
    try:
        expected = theirs(value, "name", allow_empty, allow_none, validate)
    except (ValueError, TypeError) as exc:
        for _ in range(2):  # not remembered as a success the second time either
            with pytest.raises(type(exc), match=re.escape(str(exc))):
                ours(value, "name", allow_empty, allow_none, validate)
        return
    for _ in range(2):  # the first answer, then the remembered one
        got = ours(value, "name", allow_empty, allow_none, validate)
        assert got == expected and type(got) is type(expected)


def test_set_uid_is_what_pynetdicom_decodes_with() -> None:
    import pynetdicom.pdu_items
    import pynetdicom.presentation

    dimse_codec.install_codec_hooks()
    assert pynetdicom.pdu_items.set_uid is dimse_codec.set_uid
    assert pynetdicom.presentation.set_uid is dimse_codec.set_uid
