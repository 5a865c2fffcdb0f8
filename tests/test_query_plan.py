"""The SQL that C-FIND generates reads indexes, not tables: EXPLAIN QUERY PLAN over a populated
index (tests/support/populate.py) for every indexed key at every level, and the choice of the
driving key when several are given (answers unchanged, plan from the narrowest)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicomnode.index import Index
from dicomnode.index.query import Query, _select, parse, run
from dicomnode.qr import Model
from tests.support.populate import CT_IMAGE_STORAGE, Probe, populate_dicomnode

SIZE = 40_000  # 500 patients: a one-letter name prefix matches about 25, a date range 6 studies
STUDY_KEYS = {"StudyInstanceUID": "", "PatientName": "", "PatientID": "", "StudyDate": "",
              "AccessionNumber": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
              "NumberOfStudyRelatedInstances": ""}  # fmt: skip


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Index, Probe]]:
    database = tmp_path_factory.mktemp("plan") / "index.sqlite"
    p = populate_dicomnode(database, SIZE)
    idx = Index(database)
    idx.open()
    try:
        yield idx, p
    finally:
        idx.close()


def query(model: Model, keys: dict[str, Any]) -> Query:
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return parse(identifier, model)


def plan(idx: Index, q: Query) -> list[str]:
    """EXPLAIN QUERY PLAN details of both statements a C-FIND runs: the capped count and the
    answers."""
    assert idx.db is not None
    details = []
    with idx.reading():
        answers, _ = _select(q)
        counted, _ = _select(q, columns=False)
        for select, wrap in ((answers, "{}"), (counted.limit(10001), "SELECT COUNT(1) FROM ({})")):
            sql, params = select.sql()
            rows = idx.db.execute_sql("EXPLAIN QUERY PLAN " + wrap.format(sql), params)
            details += [str(row[3]) for row in rows.fetchall()]
    return details


def scans(details: list[str]) -> list[str]:
    """Full reads of a table (``SCAN t1``), as opposed to reads of a subquery's result: the
    count's wrapper, and ``d``, a study's distinct SOP classes (query._sop_class_list)."""
    return [
        d
        for d in details
        if d.startswith("SCAN ") and not d.split()[1].startswith(("(", "_")) and d != "SCAN d"
    ]


def cases(p: Probe) -> list[tuple[str, Model, dict[str, Any]]]:
    keys = {
        "PatientID": {"PatientID": p.patient_id},
        "PatientName": {"PatientName": p.name_prefix.lower() + "*"},
        "StudyDate": {"StudyDate": p.date_range},
        "AccessionNumber": {"AccessionNumber": p.accession_number},
        "PatientBirthDate": {"PatientBirthDate": "19600101-19600131"},
        "none": {"PatientID": p.missing_patient_id},
    }
    found = []
    for name, k in keys.items():
        found.append(
            (f"study {name}", Model.STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", **STUDY_KEYS, **k})
        )
        found.append(
            (
                f"series {name}",
                Model.STUDY_ROOT,
                {
                    "QueryRetrieveLevel": "SERIES",
                    "StudyInstanceUID": p.study_uid,
                    "SeriesInstanceUID": "",
                    "NumberOfSeriesRelatedInstances": "",
                    **k,
                },
            )
        )
        found.append(
            (
                f"image {name}",
                Model.STUDY_ROOT,
                {
                    "QueryRetrieveLevel": "IMAGE",
                    "StudyInstanceUID": p.study_uid,
                    "SeriesInstanceUID": p.series_uid,
                    "SOPInstanceUID": "",
                    **k,
                },
            )
        )
        found.append(
            (
                f"patient-root study {name}",
                Model.PATIENT_ROOT,
                {"QueryRetrieveLevel": "STUDY", **STUDY_KEYS, "PatientID": p.patient_id, **k},
            )
        )
    for name in ("PatientID", "PatientName", "PatientBirthDate", "none"):
        found.append(
            (
                f"patient {name}",
                Model.PATIENT_ROOT,
                {
                    "QueryRetrieveLevel": "PATIENT",
                    "PatientID": "",
                    "PatientName": "",
                    "NumberOfPatientRelatedStudies": "",
                    "NumberOfPatientRelatedInstances": "",
                    **keys[name],
                },
            )
        )
    found += [
        ("study SOPClassesInStudy and date", Model.STUDY_ROOT,
         {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "StudyDate": p.date_range,
          "SOPClassesInStudy": CT_IMAGE_STORAGE}),
        ("study accession prefix", Model.STUDY_ROOT,
         {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
          "AccessionNumber": p.accession_number[:-2] + "*"}),
        ("study broad name and narrow date", Model.STUDY_ROOT,
         {"QueryRetrieveLevel": "STUDY", **STUDY_KEYS, "PatientName": p.name_prefix[:1] + "*",
          "StudyDate": p.date_range}),
    ]  # fmt: skip
    return found


def test_indexed_keys_read_no_table_whole(index: tuple[Index, Probe]) -> None:
    idx, p = index
    for name, model, keys in cases(p):
        details = plan(idx, query(model, keys))
        assert not scans(details), (name, details)


def test_the_narrowest_key_drives(index: tuple[Index, Probe]) -> None:
    idx, p = index
    study = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}
    # A name prefix shared by a twentieth of the patients, and a three-day range of 6 studies.
    broad_name = query(Model.STUDY_ROOT, {**study, "PatientName": p.name_prefix[:1] + "*",
                                          "StudyDate": p.date_range})  # fmt: skip
    first = next(d for d in plan(idx, broad_name) if d.startswith("SEARCH"))
    assert "study_study_date" in first, first
    # The same name's full prefix (one patient) against every study since 1900.
    narrow_name = query(Model.STUDY_ROOT, {**study, "PatientName": p.name_prefix + "*",
                                           "StudyDate": "19000101-"})  # fmt: skip
    details = plan(idx, narrow_name)
    assert any("person_name_keyword_folded" in d for d in details), details
    assert not any("study_study_date" in d for d in details), details


@pytest.mark.parametrize(
    "keys",
    [
        {"PatientName": "B*", "StudyDate": "{range}"},
        {"PatientName": "{prefix}*", "StudyDate": "19000101-"},
        {"PatientName": "{prefix}*", "StudyDate": "{range}", "PatientID": "PID*"},
        {"PatientID": "PID000000*", "AccessionNumber": "ACC*"},
        {"PatientBirthDate": "19300101-19500101", "PatientName": "*A*", "StudyDate": "{range}"},
        {"AccessionNumber": "{accession}", "StudyDate": "20300101-"},
    ],
)
def test_driver_choice_keeps_the_answers(index: tuple[Index, Probe], keys: dict[str, str]) -> None:
    """Whichever key drives, the matches are those of the plain query (no driver chosen)."""
    idx, p = index
    values = {"range": p.date_range, "prefix": p.name_prefix, "accession": p.accession_number}
    filled = {k: v.format(**values) for k, v in keys.items()}
    base = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}
    with idx.reading():
        chosen = query(Model.STUDY_ROOT, {**base, **filled})
        plain = query(Model.STUDY_ROOT, {**base, **filled})
        plain.driver = None  # every key written as indexable, as before the choice existed
        got = {str(a.StudyInstanceUID) for a in run(chosen)}
        want = {str(a.StudyInstanceUID) for a in run(plain)}
    assert got == want
    assert chosen.driver is not None or len(filled) < 2


def test_populated_index_is_probed(index: tuple[Index, Probe]) -> None:
    """Sanity: the probe's study is in the index the plans ran on."""
    idx, p = index
    with idx.reading():
        q = query(Model.STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": p.study_uid,
                                     "AccessionNumber": ""})  # fmt: skip
        (answer,) = list(run(q))
    assert answer.AccessionNumber == p.accession_number
    assert Path(str(idx.path)).exists()
