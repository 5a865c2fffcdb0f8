"""The index on a real SQLite file, in-process: a second row for a SOP Instance UID already held
(what a concurrent association would write) is refused as a duplicate and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomnode.index import DuplicateInstance, Index, NewInstance
from dicomnode.index.models import Patient


def new_instance(path: str, patient_id: str) -> NewInstance:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    ds.PatientID = patient_id
    return NewInstance.from_dataset(
        ds, transfer_syntax="1.2.840.10008.1.2.1", file_size=1, path=path,
        received_from="TEST", received_at="2026-01-01T00:00:00",
    )  # fmt: skip


def test_second_row_for_a_held_instance_is_a_duplicate(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    index.open()
    try:
        index.add(new_instance("objects/a.dcm", "FIRST"))
        with pytest.raises(DuplicateInstance) as caught:
            # Another patient ID, so the attempt creates a patient row before the instance
            # row is refused: the whole transaction must roll back.
            index.add(new_instance("objects/b.dcm", "SECOND"))
        assert caught.value.existing.path == "objects/a.dcm"
        rows = list(index.instances())
        assert [r["path"] for r in rows] == ["objects/a.dcm"]
        assert [s["patient_id"] for s in index.studies()] == ["FIRST"]
        with index.reading():
            assert [p.patient_id for p in Patient.select()] == ["FIRST"]
    finally:
        index.close()
