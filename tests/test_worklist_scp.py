"""The Modality Worklist SCP (PS3.4 K.6) against DCMTK ``findscu -W`` as the scanner, and
pynetdicom for statuses and crafted identifiers.

The worklist is filled the way an operator fills it: ``dicomnode worklist add`` from a YAML file
and ``dicomnode worklist import`` of DICOM worklist files (written by pydicom in ISO_IR 100 and
ISO 2022 IR 87, and by DCMTK's own dump2dcm). Expiry is off (the items have fixed dates).
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_FIND

from dicomnode.status import Status
from tests.support.dcmtk import require_dcmtk
from tests.support.dimse import associate, context_id, raw_request
from tests.support.node import RunningNode, run_node
from tests.support.worklist import MWL_FIND, dump2dcm, findscu_worklist, item, write_wl

STEP = "ScheduledProcedureStepSequence"
# What the scanner asks for in every query here, besides its matching keys.
RETURN = [
    "PatientName",
    "PatientID",
    "AccessionNumber",
    f"{STEP}[0].Modality",
    f"{STEP}[0].ScheduledStationAETitle",
    f"{STEP}[0].ScheduledProcedureStepStartDate",
    f"{STEP}[0].ScheduledProcedureStepStartTime",
    f"{STEP}[0].ScheduledProcedureStepID",
]

YAML_ITEMS = [
    {
        "PatientName": "DOE^JOHN",
        "PatientID": "P1",
        "AccessionNumber": "ACC1",
        "RequestedProcedureDescription": "CT head",
        STEP: [
            {
                "Modality": "CT",
                "ScheduledStationAETitle": "CT1",
                "ScheduledProcedureStepStartDate": "20261202",
                "ScheduledProcedureStepStartTime": "0930",
                "ScheduledProcedureStepID": "SPS1",
                "ScheduledPerformingPhysicianName": "HOUSE^GREGORY",
                "ScheduledProtocolCodeSequence": [
                    {
                        "CodeValue": "CT01",
                        "CodingSchemeDesignator": "99LOCAL",
                        "CodeMeaning": "Schädel nativ",
                    }
                ],
            }
        ],
    },
    {
        "PatientName": "SMITH^ANNA",
        "PatientID": "P2",
        "AccessionNumber": "ACC2",
        STEP: [
            {
                "Modality": "CT",
                "ScheduledStationAETitle": "CT2",
                "ScheduledProcedureStepStartDate": "20261202",
                "ScheduledProcedureStepStartTime": "1400",
                "ScheduledProcedureStepID": "SPS2",
            }
        ],
    },
    {
        "PatientName": "GREEN^GARY",
        "PatientID": "P6",
        "AccessionNumber": "ACC6",
        STEP: [
            {
                "Modality": "CT",
                "ScheduledStationAETitle": "CT1",
                "ScheduledProcedureStepStartDate": "20261202",
                "ScheduledProcedureStepStartTime": "0800",
                "ScheduledProcedureStepID": "SPS6",
                "ScheduledProcedureStepStatus": "COMPLETED",
            }
        ],
    },
]

DUMP = """
(0008,0005) CS [ISO_IR 100]
(0008,0050) SH [ACC5]
(0010,0010) PN [BROWN^BOB]
(0010,0020) LO [P5]
(0010,0030) DA [19800505]
(0010,0040) CS [M]
(0020,000d) UI [1.2.826.0.1.3680043.2.1143.555]
(0032,1060) LO [US abdomen]
(0040,1001) SH [RP5]
(0040,0100) SQ (Sequence with undefined length)
  (fffe,e000) na (Item with undefined length)
    (0008,0060) CS [US]
    (0040,0001) AE [US1]
    (0040,0002) DA [20261130]
    (0040,0003) TM [113000]
    (0040,0006) PN []
    (0040,0007) LO [US abdomen]
    (0040,0009) SH [SPS5]
  (fffe,e00d)
(fffe,e0dd)
"""


SETTINGS: dict[str, Any] = {
    "unknown_peers": ["echo", "worklist"],
    "peers": {
        "CT1": {
            "ae_title": "CT1",
            "host": "127.0.0.1",
            "port": 104,
            "services": ["echo", "worklist", "mpps"],
            "worklist_scope": "own",
        }
    },
    "worklist": {"expire_after_days": 0},
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    require_dcmtk("findscu", "dump2dcm")
    root = tmp_path_factory.mktemp("worklist")
    with run_node(root / "node", **SETTINGS) as running:
        items = root / "items.yaml"
        items.write_text(yaml.safe_dump(YAML_ITEMS, allow_unicode=True), encoding="utf-8")
        assert running.cli("worklist", "add", str(items)).returncode == 0
        files = root / "files"
        write_wl(
            item(
                {"Modality": "MR", "ScheduledStationAETitle": "MR1",
                 "ScheduledProcedureStepStartDate": "20261203",
                 "ScheduledProcedureStepStartTime": "080000", "ScheduledProcedureStepID": "SPS3"},
                PatientName="Müller^Jürgen", PatientID="P3", AccessionNumber="ACC3",
            ),
            files / "muller.wl",
        )  # fmt: skip
        japanese = pydicom.dcmread(get_charset_files("chrH31.dcm")[0])
        write_wl(
            item(
                {"Modality": "MR", "ScheduledStationAETitle": "MR1",
                 "ScheduledProcedureStepStartDate": "20261205",
                 "ScheduledProcedureStepStartTime": "100000", "ScheduledProcedureStepID": "SPS4"},
                charset=japanese.SpecificCharacterSet,
                PatientName=str(japanese.PatientName), PatientID="P4", AccessionNumber="ACC4",
            ),
            files / "yamada.wl",
        )  # fmt: skip
        dump2dcm(DUMP, files / "brown.wl")
        done = running.cli("worklist", "import", str(files))
        assert done.returncode == 0, done.stderr
        assert len(running.rows("SELECT id FROM worklist_item")) == 6
        yield running


def ask(node: RunningNode, tmp_path: Path, *keys: str, calling: str = "FINDSCU") -> list[Dataset]:
    done, answers = findscu_worklist(
        (node.ae_title, node.host, node.port), tmp_path, [*RETURN, *keys], calling=calling
    )
    assert done.returncode == 0, done.stderr
    return answers


def ids(answers: list[Dataset]) -> list[str]:
    return sorted(str(a.PatientID) for a in answers)


def test_matching_by_modality_returns_each_step_with_its_keys(
    node: RunningNode, tmp_path: Path
) -> None:
    answers = ask(node, tmp_path, f"{STEP}[0].Modality=MR")
    assert ids(answers) == ["P3", "P4"]
    muller = next(a for a in answers if a.PatientID == "P3")
    step = muller[STEP][0]
    assert step.Modality == "MR"
    assert step.ScheduledStationAETitle == "MR1"
    assert step.ScheduledProcedureStepStartDate == "20261203"
    assert step.ScheduledProcedureStepID == "SPS3"
    assert muller.AccessionNumber == "ACC3"
    # Only the keys asked for come back (PS3.4 K.6.1.2.2), in the step item too.
    assert "PatientBirthDate" not in muller
    assert "ScheduledProcedureStepDescription" not in step


def test_matching_by_station_ae_title(node: RunningNode, tmp_path: Path) -> None:
    # GREEN^GARY (P6) is also scheduled on CT1 but COMPLETED: hidden (worklist.hide_completed).
    assert ids(ask(node, tmp_path, f"{STEP}[0].ScheduledStationAETitle=CT1")) == ["P1"]
    assert ids(ask(node, tmp_path, f"{STEP}[0].ScheduledStationAETitle=CT*")) == ["P1", "P2"]


def test_matching_by_start_date_range_and_time_range(node: RunningNode, tmp_path: Path) -> None:
    by_date = ask(node, tmp_path, f"{STEP}[0].ScheduledProcedureStepStartDate=20261202-20261203")
    assert ids(by_date) == ["P1", "P2", "P3"]
    assert ids(ask(node, tmp_path, f"{STEP}[0].ScheduledProcedureStepStartDate=-20261201")) == [
        "P5"
    ]
    afternoon = ask(
        node,
        tmp_path,
        f"{STEP}[0].ScheduledProcedureStepStartDate=20261202",
        f"{STEP}[0].ScheduledProcedureStepStartTime=1200-1800",
    )
    assert ids(afternoon) == ["P2"]
    assert afternoon[0][STEP][0].ScheduledProcedureStepStartTime == "1400"


def test_patient_name_wildcards_are_case_insensitive(node: RunningNode, tmp_path: Path) -> None:
    assert ids(ask(node, tmp_path, "PatientName=doe*")) == ["P1"]
    assert ids(ask(node, tmp_path, "PatientName=*ller*")) == ["P3"]
    assert ids(ask(node, tmp_path, "PatientName=SM?TH^ANNA")) == ["P2"]
    assert ids(ask(node, tmp_path, "PatientName=DOE")) == []


def test_patient_id_and_accession_number(node: RunningNode, tmp_path: Path) -> None:
    assert ids(ask(node, tmp_path, "PatientID=P5")) == ["P5"]
    assert ids(ask(node, tmp_path, "AccessionNumber=ACC4")) == ["P4"]
    assert ids(ask(node, tmp_path, "AccessionNumber=ACC9")) == []


def test_imported_dcmtk_worklist_file_is_served(node: RunningNode, tmp_path: Path) -> None:
    (brown,) = ask(node, tmp_path, "PatientID=P5", "StudyInstanceUID", "PatientBirthDate")
    assert brown.PatientName == "BROWN^BOB"
    assert brown.StudyInstanceUID == "1.2.826.0.1.3680043.2.1143.555"
    assert brown.PatientBirthDate == "19800505"
    assert brown[STEP][0].Modality == "US"


def test_non_ascii_names_come_back_in_utf8(node: RunningNode, tmp_path: Path) -> None:
    """The items were imported in ISO_IR 100 and ISO 2022 IR 87; answers holding non-ASCII text
    are sent in UTF-8 (ISO_IR 192), whatever the query's character set, so nothing is lost."""
    muller, yamada = sorted(
        ask(node, tmp_path, f"{STEP}[0].Modality=MR"), key=lambda a: str(a.PatientID)
    )
    assert muller.SpecificCharacterSet == "ISO_IR 192"
    assert str(muller.PatientName) == "Müller^Jürgen"
    assert str(yamada.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    # A query in ISO_IR 100 and one in UTF-8 for the ideographic group, as query files.
    latin = Dataset()
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "müller*"
    latin.PatientID = ""
    done, answers = findscu_worklist((node.ae_title, node.host, node.port), tmp_path, query=latin)
    assert done.returncode == 0, done.stderr
    assert [str(a.PatientName) for a in answers] == ["Müller^Jürgen"]
    utf8 = Dataset()
    utf8.SpecificCharacterSet = "ISO_IR 192"
    utf8.PatientName = "山田*"
    utf8.PatientID = ""
    done, answers = findscu_worklist((node.ae_title, node.host, node.port), tmp_path, query=utf8)
    assert done.returncode == 0, done.stderr
    assert [str(a.PatientID) for a in answers] == ["P4"]


def test_empty_and_missing_return_keys_come_back_empty(node: RunningNode, tmp_path: Path) -> None:
    (john,) = ask(
        node,
        tmp_path,
        "PatientID=P1",
        "PatientWeight",  # no item has it
        "AdmissionID",  # nor this
        "RequestedProcedureDescription",  # this one has a value
        f"{STEP}[0].ScheduledPerformingPhysicianName",
        f"{STEP}[0].ScheduledStationName",  # not in the item
        "RequestedProcedureCodeSequence",  # a sequence the item lacks: zero-length
    )
    assert "PatientWeight" in john and john.PatientWeight in (None, "")
    assert "AdmissionID" in john and john.AdmissionID in (None, "")
    assert john.RequestedProcedureDescription == "CT head"
    step = john[STEP][0]
    assert str(step.ScheduledPerformingPhysicianName) == "HOUSE^GREGORY"
    assert "ScheduledStationName" in step and step.ScheduledStationName in (None, "")
    assert "RequestedProcedureCodeSequence" in john
    assert len(john.RequestedProcedureCodeSequence) == 0
    # Generated at add time: a Study Instance UID and a Requested Procedure ID.
    (again,) = ask(node, tmp_path, "PatientID=P1", "StudyInstanceUID", "RequestedProcedureID")
    assert str(again.StudyInstanceUID).startswith("2.25.")
    assert again.RequestedProcedureID


def test_step_status_key_shows_completed_steps(node: RunningNode, tmp_path: Path) -> None:
    done = ask(node, tmp_path, f"{STEP}[0].ScheduledProcedureStepStatus=COMPLETED")
    assert ids(done) == ["P6"]
    everything = ask(node, tmp_path)
    assert ids(everything) == ["P1", "P2", "P3", "P4", "P5"]


def test_a_scanner_with_scope_own_sees_only_its_own_steps(
    node: RunningNode, tmp_path: Path
) -> None:
    """CT1 is configured with worklist_scope: own. Without a station key it gets its own
    schedule; a station key it gives is matched as given."""
    assert ids(ask(node, tmp_path, calling="CT1")) == ["P1"]
    assert ids(ask(node, tmp_path, f"{STEP}[0].ScheduledStationAETitle=CT2", calling="CT1")) == [
        "P2"
    ]
    node.wait_for_log("worklist C-FIND from CT1: 1 items")


def find(
    node: RunningNode, identifier: Dataset, calling: str = "PYMWL"
) -> tuple[list[Dataset], int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(MWL_FIND)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    answers, final = [], -1
    try:
        for status, answer in assoc.send_c_find(identifier, MWL_FIND):
            if int(status.Status) in (Status.PENDING, Status.PENDING_WARNING):
                answers.append(answer)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
        ae.shutdown()
    return answers, final


def step_query(**step: str) -> Dataset:
    identifier = Dataset()
    identifier.PatientID = ""
    sps = Dataset()
    for keyword, value in step.items():
        setattr(sps, keyword, value)
    identifier.ScheduledProcedureStepSequence = [sps]
    return identifier


def test_statuses_pending_then_success(node: RunningNode) -> None:
    answers, final = find(node, step_query(Modality="CT"))
    assert final == Status.SUCCESS
    assert sorted(str(a.PatientID) for a in answers) == ["P1", "P2"]


def test_two_items_in_the_step_sequence_do_not_match_the_sop_class(node: RunningNode) -> None:
    identifier = step_query(Modality="CT")
    other = Dataset()
    other.Modality = "MR"
    identifier.ScheduledProcedureStepSequence.append(other)
    answers, final = find(node, identifier)
    assert (answers, final) == ([], Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
    node.wait_for_log("a sequence key holds at most one item")


@pytest.mark.parametrize(
    ("step", "top", "reason"),
    [
        ({"ScheduledProcedureStepStartDate": "2026-12"}, {}, "is not a date or date range"),
        ({"ScheduledProcedureStepStartTime": "25h"}, {}, "is not a time or time range"),
        ({}, {"StudyInstanceUID": "1.2.*"}, "is not a UID"),
    ],
)
def test_unusable_values_are_refused_with_the_reason(
    node: RunningNode, step: dict[str, str], top: dict[str, str], reason: str
) -> None:
    identifier = step_query(**step)
    for keyword, value in top.items():
        setattr(identifier, keyword, value)
    answers, final = find(node, identifier)
    assert (answers, final) == ([], Status.UNABLE_TO_PROCESS)
    node.wait_for_log(reason)
    # The node goes on serving.
    assert find(node, step_query(Modality="US"))[1] == Status.SUCCESS


def test_match_cap_refuses_before_answering(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", **{**SETTINGS, "query": {"max_matches": 1}}) as node:
        items = tmp_path / "items.yaml"
        items.write_text(yaml.safe_dump(YAML_ITEMS), encoding="utf-8")
        assert node.cli("worklist", "add", str(items)).returncode == 0
        answers, final = find(node, step_query(Modality="CT", ScheduledProcedureStepStatus=""))
        assert (answers, final) == ([], Status.OUT_OF_RESOURCES)
        node.wait_for_log("more than 1 matching worklist items (query.max_matches)")
        assert len(find(node, step_query(ScheduledStationAETitle="CT2"))[0]) == 1


def test_cancel_stops_the_answers(tmp_path: Path) -> None:
    """C-CANCEL ends a long answer with FE00 (PS3.4 C.4.1.2.3): 3000 steps of one request."""
    with run_node(tmp_path / "node", **SETTINGS) as node:
        steps = [
            {"Modality": "CT", "ScheduledStationAETitle": "CT9",
             "ScheduledProcedureStepStartDate": "20261202",
             "ScheduledProcedureStepStartTime": f"{i // 60 % 24:02d}{i % 60:02d}"}
            for i in range(3000)
        ]  # fmt: skip
        items = tmp_path / "many.yaml"
        items.write_text(
            yaml.safe_dump({"PatientName": "MANY^STEPS", "PatientID": "P9", STEP: steps}),
            encoding="utf-8",
        )
        done = node.cli("worklist", "add", str(items))
        assert done.returncode == 0, done.stderr
        ae = AE(ae_title="PYMWL")
        ae.add_requested_context(MWL_FIND)
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        pending, final = 0, -1
        try:
            for status, _ in assoc.send_c_find(step_query(Modality="CT"), MWL_FIND, msg_id=7):
                if status.Status == Status.PENDING:
                    pending += 1
                    if pending == 1:
                        assoc.send_c_cancel(7, query_model=MWL_FIND)
                else:
                    final = int(status.Status)
        finally:
            assoc.release()
            ae.shutdown()
        assert final == Status.CANCEL
        assert 1 <= pending < 3000
        node.wait_for_log("cancelled after")


def test_callers_not_allowed_the_worklist_service_are_refused(tmp_path: Path) -> None:
    with run_node(tmp_path / "node", unknown_peers=["echo"]) as node:
        done, answers = findscu_worklist((node.ae_title, node.host, node.port), tmp_path, RETURN)
        assert done.returncode != 0
        assert answers == []
        node.wait_for_log(
            "ModalityWorklistInformationModelFind: rejected, calling AE may not use the "
            "'worklist' service"
        )


@pytest.mark.parametrize(
    "identifier",
    [
        # (0010,0020) PatientID "P1", then the step sequence (undefined length) whose item never
        # ends: neither item nor sequence delimiter follows.
        b"\x10\x00\x20\x00LO\x02\x00P1"
        b"\x40\x00\x00\x01SQ\x00\x00\xff\xff\xff\xff"
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        b"\x08\x00\x60\x00CS\x02\x00CT",
        # A sequence of explicit length 200 holding 16 bytes.
        b"\x40\x00\x00\x01SQ\x00\x00\xc8\x00\x00\x00"
        b"\xfe\xff\x00\xe0\x08\x00\x00\x00\x08\x00\x60\x00CS\x02\x00CT",
    ],
    ids=["no delimiters", "length past the end"],
)
def test_broken_sequence_encoding_is_refused_and_the_node_goes_on(
    node: RunningNode, identifier: bytes
) -> None:
    request = C_FIND()
    request.MessageID = 3
    request.AffectedSOPClassUID = MWL_FIND
    request.Priority = 2
    request.Identifier = BytesIO(identifier)
    with associate(node, [(MWL_FIND, [str(ExplicitVRLittleEndian)])], "PYMWL") as assoc:
        assert raw_request(assoc, context_id(assoc, MWL_FIND), request) == Status.UNABLE_TO_PROCESS
    node.wait_for_log("the identifier cannot be decoded")
    assert find(node, step_query(Modality="US"))[1] == Status.SUCCESS


def answers_in(node: RunningNode, syntax: str, identifier: Dataset) -> dict[str, Any]:
    """The answers (DICOM JSON, by PatientID) over an association in ``syntax`` only."""
    ae = AE(ae_title="PYMWL")
    ae.add_requested_context(MWL_FIND, [str(syntax)])
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        assert assoc.accepted_contexts[0].transfer_syntax[0] == syntax
        return {
            str(a.PatientID): a.to_json_dict()
            for status, a in assoc.send_c_find(identifier, MWL_FIND)
            if status.Status == Status.PENDING
        }
    finally:
        assoc.release()
        ae.shutdown()


def test_answers_are_the_same_in_either_little_endian_syntax(node: RunningNode) -> None:
    """Answers are copied from the stored items still encoded (explicit VR little endian, UTF-8):
    read back from an implicit VR association they must say exactly the same, nested sequences
    and non-ASCII text included."""
    identifier = step_query(Modality="", ScheduledProcedureStepID="")
    identifier.PatientName = ""
    identifier[STEP][0].ScheduledProtocolCodeSequence = []  # zero-length: the stored one whole
    identifier.PatientWeight = None
    implicit = answers_in(node, ImplicitVRLittleEndian, identifier)
    explicit = answers_in(node, ExplicitVRLittleEndian, identifier)
    assert implicit == explicit
    assert sorted(implicit) == ["P1", "P2", "P3", "P4", "P5"]
    john = Dataset.from_json(implicit["P1"])
    assert john.SpecificCharacterSet == "ISO_IR 192"  # the code meaning is not ASCII
    (code,) = john[STEP][0].ScheduledProtocolCodeSequence
    assert (code.CodeValue, code.CodeMeaning) == ("CT01", "Schädel nativ")
    assert "PatientWeight" in john and john.PatientWeight in (None, "")
    yamada = Dataset.from_json(implicit["P4"])
    assert str(yamada.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert "SpecificCharacterSet" not in Dataset.from_json(implicit["P5"])  # all ASCII
