"""Worklist matching (PS3.4 C.2.2.2 over K.6 items) on a real SQLite index, in process.

Each query is answered twice: by :meth:`Worklist.find` (SQL narrowing on the indexed columns,
then matching on the stored items) and by matching every stored item with no SQL at all. The
two must agree, so a column condition can never drop an item the matcher would accept.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicomnode.config import Config, QuerySettings, WorklistSettings
from dicomnode.index import Index
from dicomnode.index.query import QueryError
from dicomnode.index.worklist import answer, matches, parse
from dicomnode.worklist import Worklist, item_from_mapping, normalise

STEP = "ScheduledProcedureStepSequence"


def entry(pid: str, name: str, **step: Any) -> dict[str, Any]:
    top = {k: step.pop(k) for k in list(step) if not k.startswith(("Scheduled", "Modality"))}
    return {
        "PatientName": name,
        "PatientID": pid,
        **top,
        STEP: [
            {
                "Modality": "CT",
                "ScheduledStationAETitle": "CT1",
                "ScheduledProcedureStepStartDate": "20261202",
                "ScheduledProcedureStepStartTime": "0930",
                **step,
            }
        ],
    }


ITEMS = [
    entry("P1", "DOE^JOHN", AccessionNumber="A%1", ScheduledProcedureStepID="S1"),
    entry("P2", "doe^jane", Modality="MR", ScheduledStationAETitle="MR1"),
    entry("P3", "Yamada^Tarou=山田^太郎=やまだ^たろう", ScheduledProcedureStepStartDate="20261203"),
    entry("P4", "ÉCOLE^ÉLODIE", ScheduledProcedureStepStartTime="235959.5"),
    entry("P5", "SMITH^ANNA", ScheduledStationAETitle="CT1\\CT2", AccessionNumber="A[5]"),
    entry("P6", "GREEN^GARY", ScheduledProcedureStepStatus="COMPLETED"),
    entry(
        "P7",
        "CODE^CARL",
        ScheduledProtocolCodeSequence=[
            {"CodeValue": "X1", "CodingSchemeDesignator": "99LOCAL", "CodeMeaning": "head"},
            {"CodeValue": "X2", "CodingSchemeDesignator": "99LOCAL", "CodeMeaning": "neck"},
        ],
    ),
]


# Every item but the COMPLETED one (P6), which queries without a status key do not see.
OPEN = ["P1", "P2", "P3", "P4", "P5", "P7"]


@pytest.fixture(scope="module")
def worklist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worklist]:
    index = Index(tmp_path_factory.mktemp("wl") / "index.sqlite")
    index.open()
    config = Config(worklist=WorklistSettings(expire_after_days=0))
    wl = Worklist(config, index)
    wl.add(n for i, e in enumerate(ITEMS) for n in normalise(item_from_mapping(e, f"{i}"), f"{i}"))
    yield wl
    index.close()


def query(step: dict[str, Any] | None = None, **top: Any) -> Dataset:
    ds = Dataset()
    ds.PatientID = ""
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    sps = Dataset()
    for keyword, value in (step or {}).items():
        setattr(sps, keyword, value)
    ds.ScheduledProcedureStepSequence = [sps]
    return ds


def found(worklist: Worklist, identifier: Dataset, calling: str = "ANY") -> list[str]:
    answers = sorted(str(a.PatientID) for a in worklist.find(identifier, calling))
    # Every stored item matched without SQL, hiding COMPLETED as find does without a status key.
    parsed = parse(identifier)
    status_asked = any(
        k.keyword == "ScheduledProcedureStepStatus" and not k.matches_everything
        for k in (parsed.top(STEP).item or [])  # type: ignore[union-attr]
    )
    unfiltered = sorted(
        str(s.item.PatientID)
        for s in worklist.items()
        if matches(parsed, s.item)
        and (status_asked or s.item[STEP][0].ScheduledProcedureStepStatus != "COMPLETED")
    )
    assert answers == unfiltered, "the SQL narrowing dropped or added an item"
    return answers


@pytest.mark.parametrize(
    ("identifier", "expected"),
    [
        (query(), OPEN),
        (query(PatientName="DOE*"), ["P1", "P2"]),
        (query(PatientName="doe^j?hn"), ["P1"]),
        (query(PatientName="山田*"), ["P3"]),  # the ideographic group
        (query(PatientName="=山田^太郎"), ["P3"]),  # that group only
        (query(PatientName="やまだ*"), ["P3"]),
        (query(PatientName="école*"), ["P4"]),  # Unicode case folding
        (query(PatientName="*ANNA"), ["P5"]),
        (query(PatientName="DOE"), []),
        (query(AccessionNumber="A%1"), ["P1"]),  # % is literal
        (query(AccessionNumber="A[5]"), ["P5"]),  # [ is literal
        (query(AccessionNumber="A*"), ["P1", "P5"]),
        (query({"Modality": "MR"}), ["P2"]),
        (query({"Modality": "mr"}), []),  # CS values match case-sensitively
        (query({"ScheduledStationAETitle": "CT2"}), ["P5"]),  # one value of a multi-valued one
        (query({"ScheduledStationAETitle": "CT1"}), ["P1", "P3", "P4", "P5", "P7"]),
        (query({"ScheduledProcedureStepStartDate": "20261203"}), ["P3"]),
        (query({"ScheduledProcedureStepStartDate": "20261203-"}), ["P3"]),
        (query({"ScheduledProcedureStepStartDate": "-20261202"}), ["P1", "P2", "P4", "P5", "P7"]),
        (query({"ScheduledProcedureStepStartTime": "2359-"}), ["P4"]),
        (query({"ScheduledProcedureStepStartTime": "09-0930"}), ["P1", "P2", "P3", "P5", "P7"]),
        (query({"ScheduledProcedureStepID": "S1"}), ["P1"]),
        (query({"ScheduledProcedureStepStatus": "COMPLETED"}), ["P6"]),
        (query({"ScheduledProcedureStepStatus": "SCHEDULED"}), OPEN),
        (query({"ScheduledProtocolCodeSequence": [Dataset()]}), OPEN),
        (query(PatientID="P2"), ["P2"]),
        (query(PatientID="P*"), OPEN),
    ],
)  # fmt: skip
def test_matching(worklist: Worklist, identifier: Dataset, expected: list[str]) -> None:
    assert found(worklist, identifier) == expected


def code_query(**code: str) -> Dataset:
    item = Dataset()
    for keyword, value in code.items():
        setattr(item, keyword, value)
    item.CodeMeaning = ""
    return query({"ScheduledProtocolCodeSequence": [item]})


def test_sequence_matching_returns_the_matching_items(worklist: Worklist) -> None:
    """C.2.2.2.6: an item matches when one of its sequence items matches every key, and the
    answer holds the matching sequence items with the keys asked for."""
    assert found(worklist, code_query(CodeValue="X2")) == ["P7"]
    (carl,) = worklist.find(code_query(CodeValue="X2"), "ANY")
    codes = carl[STEP][0].ScheduledProtocolCodeSequence
    assert [(c.CodeValue, c.CodeMeaning) for c in codes] == [("X2", "neck")]
    assert "CodingSchemeDesignator" not in codes[0]
    assert found(worklist, code_query(CodeValue="X3")) == []
    # A zero-length sequence key returns the stored sequence whole.
    whole = query({"ScheduledProtocolCodeSequence": []}, PatientID="P7")
    (carl,) = worklist.find(whole, "ANY")
    assert [c.CodeValue for c in carl[STEP][0].ScheduledProtocolCodeSequence] == ["X1", "X2"]


def test_answer_holds_exactly_the_keys_asked(worklist: Worklist) -> None:
    identifier = query({"Modality": "", "ScheduledStationName": ""}, PatientID="P3")
    identifier.PatientName = ""
    identifier.PatientWeight = None
    (yamada,) = worklist.find(identifier, "ANY")
    assert [e.keyword for e in yamada] == [
        "SpecificCharacterSet",
        "PatientName",
        "PatientID",
        "PatientWeight",
        STEP,
    ]
    assert yamada.SpecificCharacterSet == "ISO_IR 192"  # non-ASCII name
    assert yamada.PatientWeight is None
    assert [e.keyword for e in yamada[STEP][0]] == ["Modality", "ScheduledStationName"]
    ascii_only = worklist.find(query(PatientID="P1"), "ANY")[0]
    assert "SpecificCharacterSet" not in ascii_only


def test_scope_own_and_hide_completed(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    index.open()
    try:
        from dicomnode.config import WorklistScope

        config = Config(
            worklist=WorklistSettings(
                expire_after_days=0, hide_completed=False, default_scope=WorklistScope.OWN
            )
        )
        wl = Worklist(config, index)
        wl.add(n for i, e in enumerate(ITEMS) for n in normalise(item_from_mapping(e, "x"), "x"))
        ids = sorted(str(a.PatientID) for a in wl.find(query(), "MR1"))
        assert ids == ["P2"]
        everything = sorted(str(a.PatientID) for a in wl.find(query(), "CT1"))
        # P6 is COMPLETED but shown (hide_completed off); P5 is scheduled for CT1\CT2.
        assert everything == ["P1", "P3", "P4", "P5", "P6", "P7"]
        assert sorted(str(a.PatientID) for a in wl.find(query(), "CT2")) == ["P5"]
        given = sorted(str(a.PatientID) for a in wl.find(query({"Modality": "MR",
                       "ScheduledStationAETitle": "MR*"}), "CT1"))  # fmt: skip
        assert given == ["P2"]
    finally:
        index.close()


@pytest.mark.parametrize(
    ("identifier", "hierarchy", "reason"),
    [
        (query({"ScheduledProcedureStepStartDate": "2026-12-02"}), False, "is not a date"),
        (query({"ScheduledProcedureStepStartDate": "-"}), False, "is an empty range"),
        (query({"ScheduledProcedureStepStartTime": "9am"}), False, "is not a time"),
        (query(StudyInstanceUID="1.2.3*"), False, "is not a UID"),
        (query(StudyInstanceUID="01.2"), False, "is not a UID"),
    ],
)
def test_unusable_keys_are_refused(identifier: Dataset, hierarchy: bool, reason: str) -> None:
    with pytest.raises(QueryError) as info:
        parse(identifier)
    assert info.value.hierarchy is hierarchy
    assert reason in info.value.reason


def test_two_step_items_do_not_match_the_model() -> None:
    identifier = query({"Modality": "CT"})
    identifier.ScheduledProcedureStepSequence.append(Dataset())
    with pytest.raises(QueryError) as info:
        parse(identifier)
    assert info.value.hierarchy is True
    assert "ScheduledProcedureStepSequence: a sequence key holds at most one item" in str(
        info.value
    )


def test_case_sensitive_names_when_configured(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    index.open()
    try:
        config = Config(
            query=QuerySettings(case_sensitive_names=True),
            worklist=WorklistSettings(expire_after_days=0),
        )
        wl = Worklist(config, index)
        wl.add(n for e in ITEMS[:2] for n in normalise(item_from_mapping(e, "x"), "x"))
        assert [str(a.PatientID) for a in wl.find(query(PatientName="doe*"), "ANY")] == ["P2"]
    finally:
        index.close()


def test_answer_of_a_stored_item_copies_values_not_references() -> None:
    (stored,) = normalise(item_from_mapping(ITEMS[6], "x"), "x")
    parsed = parse(query({"ScheduledProtocolCodeSequence": []}))
    first = answer(parsed, stored)
    first[STEP][0].ScheduledProtocolCodeSequence[0].CodeValue = "CHANGED"
    assert stored[STEP][0].ScheduledProtocolCodeSequence[0].CodeValue == "X1"


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit VR", "explicit VR"])
def test_answers_encode_to_the_same_bytes_marked_or_not(tmp_path: Path, implicit: bool) -> None:
    """encoded_for lets pydicom copy the stored raw values instead of re-encoding each: the
    bytes on the wire must be exactly those of the slow path, for every item (non-ASCII names,
    multi-valued titles, nested code sequences, empty keys)."""
    from pynetdicom.dsutils import encode

    from dicomnode.index.worklist import encoded_for

    identifier = query(
        {"Modality": "", "ScheduledStationAETitle": "", "ScheduledProtocolCodeSequence": []},
        PatientName="",
        AccessionNumber="",
        PatientWeight=None,
    )
    # Its own index: the models bind to one database per process, and the tests above opened
    # others since the module's was made.
    index = Index(tmp_path / "index.sqlite")
    index.open()
    try:
        wl = Worklist(Config(worklist=WorklistSettings(expire_after_days=0)), index)
        wl.add(n for e in ITEMS for n in normalise(item_from_mapping(e, "x"), "x"))
        answers = wl.find(identifier, "ANY")
    finally:
        index.close()
    assert len(answers) == len(OPEN)
    for plain in answers:
        slow = encode(copy.deepcopy(plain), implicit, True)
        fast = encode(encoded_for(copy.deepcopy(plain), implicit, True), implicit, True)
        assert slow is not None and fast == slow, plain.PatientID
