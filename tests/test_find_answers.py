"""C-FIND answers are built already encoded (dicomnode.index.query._answer): whatever transfer
syntax carries them, they decode to the values held, with every element of the request, padded
to even length, and in UTF-8 when a value needs it."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import decode, encode

from dicomnode.index.attributes import BY_KEYWORD
from dicomnode.index.query import _answer, _template, for_transfer_syntax, parse
from dicomnode.qr import Model

SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian]  # fmt: skip


def request(**extra: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientName = "yamada*"
    ds.PatientID = ""
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedInstances = ""
    ds.StudyDate = ""
    ds.SmallestImagePixelValue = None  # (0028,0106) "US or SS": not ours, returned empty
    ds.ReferencedStudySequence = Sequence()  # a sequence: returned empty
    ds.add_new(0x00091001, "LO", "")  # a private element: returned empty
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


ROW = {
    "k_StudyInstanceUID": "1.2.840.113619.2.11",  # odd length: NUL padded
    "k_PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "k_PatientID": "ID1",
    "k_ModalitiesInStudy": "CT\\SR",
    "k_NumberOfStudyRelatedInstances": 7,
    "k_StudyDate": "20240101",
}


def answer(identifier: Dataset, row: dict[str, Any]) -> Dataset:
    query = parse(identifier, Model.STUDY_ROOT)
    returned = {k: BY_KEYWORD[k[2:]] for k in row}
    return _answer(_template(query, returned), row)


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_answer_round_trips_in_every_syntax(syntax: UID) -> None:
    identifier = request()
    sent = for_transfer_syntax(answer(identifier, ROW), syntax.is_implicit_VR,
                               syntax.is_little_endian)  # fmt: skip
    data = encode(sent, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    assert data is not None
    got = decode(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    assert {e.tag for e in got} == {e.tag for e in identifier} | {0x00080005}
    assert got.SpecificCharacterSet == "ISO_IR 192"
    assert str(got.PatientName) == ROW["k_PatientName"]
    assert got.PatientName.ideographic == "山田^太郎"
    assert got.StudyInstanceUID == ROW["k_StudyInstanceUID"]
    assert list(got.ModalitiesInStudy) == ["CT", "SR"]
    assert int(got.NumberOfStudyRelatedInstances) == 7
    assert got.StudyDate == "20240101"
    assert got.QueryRetrieveLevel == "STUDY"
    assert got.PatientID == "ID1"
    assert got.SmallestImagePixelValue is None
    assert list(got.ReferencedStudySequence) == []
    assert got[0x00091001].value in ("", None, b"")
    if not syntax.is_deflated:
        # Every value of even length: UIDs padded with NUL, text with a space (PS3.5 7.1).
        assert b"1.2.840.113619.2.11\x00" in data
        assert b"ID1 " in data


def test_answer_reads_like_any_data_set() -> None:
    """Read directly (not encoded), the raw elements decode on access, as UTF-8."""
    got = answer(request(), ROW)
    assert str(got.PatientName) == ROW["k_PatientName"]
    assert got.StudyInstanceUID == ROW["k_StudyInstanceUID"]
    assert got.ModalitiesInStudy == ["CT", "SR"]
    assert got.NumberOfStudyRelatedInstances == 7


def test_ascii_answer_has_no_character_set_unless_asked() -> None:
    row = {**ROW, "k_PatientName": "Doe^John"}
    assert "SpecificCharacterSet" not in answer(request(), row)
    asked = answer(request(SpecificCharacterSet="ISO_IR 192"), row)
    assert asked.SpecificCharacterSet == "ISO_IR 192"
    empty = answer(request(), {**row, "k_StudyDate": None, "k_ModalitiesInStudy": ""})
    assert empty.StudyDate == "" and empty.ModalitiesInStudy == ""
