"""Worklist test data and DCMTK worklist peers: complete worklist items, DICOM worklist files
(written by pydicom, or by DCMTK's own dump2dcm), ``findscu -W`` as the scanner, and
``wlmscpfs`` as the worklist SCP our SCU queries."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from tests.support.dcmtk import DCMTK_ENV, Endpoint, dcmtk_server, require_dcmtk

MWL_FIND = "1.2.840.10008.5.1.4.31"
MPPS = "1.2.840.10008.3.1.2.3.3"


def item(step: Mapping[str, Any] | None = None, charset: str = "ISO_IR 100", **top: Any) -> Dataset:
    """A worklist item that DCMTK wlmscpfs takes as complete (every Type 1 return key of PS3.4
    Table K.6-1 with a value, no empty description or code sequence), one step; keyword
    arguments replace top-level values, ``step`` the step's."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    values: dict[str, Any] = {
        "PatientName": "DOE^JOHN",
        "PatientID": "P1",
        "PatientBirthDate": "19700101",
        "PatientSex": "M",
        "AccessionNumber": "ACC1",
        "ReferringPhysicianName": "",
        "RequestingPhysician": "",
        "RequestedProcedureID": "RP1",
        "RequestedProcedureDescription": "CT head",
        "StudyInstanceUID": generate_uid(),
        **top,
    }
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    sps = Dataset()
    step_values: dict[str, Any] = {
        "Modality": "CT",
        "ScheduledStationAETitle": "CT1",
        "ScheduledProcedureStepStartDate": "20261202",
        "ScheduledProcedureStepStartTime": "093000",
        "ScheduledPerformingPhysicianName": "",
        "ScheduledProcedureStepDescription": "CT head plain",
        "ScheduledStationName": "",
        "ScheduledProcedureStepLocation": "",
        "ScheduledProcedureStepID": "SPS1",
        "ScheduledProcedureStepStatus": "SCHEDULED",
        **(step or {}),
    }
    for keyword, value in step_values.items():
        setattr(sps, keyword, value)
    ds.ScheduledProcedureStepSequence = [sps]
    return ds


def write_wl(ds: Dataset, path: Path) -> Path:
    """``ds`` as a DICOM worklist file (PS3.10, with File Meta), as wlmscpfs and Orthanc read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(MWL_FIND)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def dump2dcm(dump: str, path: Path) -> Path:
    """A worklist file made by DCMTK's dump2dcm from its text dump (as DCMTK's own examples)."""
    require_dcmtk("dump2dcm")
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.with_suffix(".dump")
    source.write_text(dump, encoding="latin-1")
    subprocess.run(["dump2dcm", str(source), str(path)], check=True, capture_output=True)
    return path


def findscu_worklist(
    peer: tuple[str, str, int],
    out: Path,
    keys: Sequence[str] = (),
    *,
    query: Dataset | None = None,
    calling: str = "FINDSCU",
) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    """DCMTK ``findscu -W`` as a scanner asks for its worklist: ``keys`` as findscu's ``-k``
    (``ScheduledProcedureStepSequence[0].Modality=CT``), and/or a ``query`` data set as the
    query file. Every response is extracted to a file and read back, in order."""
    require_dcmtk("findscu")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    aet, host, port = peer
    argv = ["findscu", "-W", "-aet", calling, "-aec", aet, "-X", "-od", str(out)]
    for key in keys:
        argv += ["-k", key]
    argv += [host, str(port)]
    if query is not None:
        query_path = out / "query.dcm"
        query.file_meta = FileMetaDataset()
        query.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pydicom.dcmwrite(query_path, query, enforce_file_format=False)
        argv.append(str(query_path))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=DCMTK_ENV)
    answers: list[Dataset] = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return done, answers


@contextmanager
def wlmscpfs(folder: Path, aet: str = "WLMSCP", log_path: Path | None = None) -> Iterator[Endpoint]:
    """DCMTK wlmscpfs serving the worklist files in ``folder/aet`` (its lock file included)."""
    (folder / aet).mkdir(parents=True, exist_ok=True)
    (folder / aet / "lockfile").touch()
    argv = ["wlmscpfs", "-dfp", str(folder)]
    with dcmtk_server(argv, aet=aet, log_path=log_path) as endpoint:
        yield endpoint


def mpps_in_progress(
    study: str = "1.2.826.0.1.3680043.2.1143.1",
    step: str = "SPS1",
    accession: str = "ACC1",
    patient: tuple[str, str, str, str] = ("DOE^JOHN", "P1", "", ""),
) -> Dataset:
    """An MPPS N-CREATE attribute list as a modality sends it (PS3.4 Table F.7.2-1), for the
    scheduled step ``step`` of ``study``; ``patient`` is (name, ID, birth date, sex)."""
    ds = Dataset()
    ssa = Dataset()
    ssa.StudyInstanceUID = study
    ssa.ReferencedStudySequence = []
    ssa.AccessionNumber = accession
    ssa.RequestedProcedureID = ""
    ssa.RequestedProcedureDescription = ""
    ssa.ScheduledProcedureStepID = step
    ssa.ScheduledProcedureStepDescription = ""
    ssa.ScheduledProtocolCodeSequence = []
    ds.ScheduledStepAttributesSequence = [ssa]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedStationName = ""
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20261202"
    ds.PerformedProcedureStepStartTime = "093500"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "CT head"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = None
    ds.PerformedProcedureStepEndTime = None
    ds.Modality = "CT"
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def mpps_completed(status: str = "COMPLETED") -> Dataset:
    """An MPPS N-SET modification list ending the step (PS3.4 F.7.2.2, final state), with one
    performed series."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261202"
    ds.PerformedProcedureStepEndTime = "100500"
    series = Dataset()
    series.SeriesInstanceUID = generate_uid(prefix=None)
    series.RetrieveAETitle = ""
    series.SeriesDescription = "head"
    series.PerformingPhysicianName = ""
    series.OperatorsName = ""
    series.ProtocolName = "HEAD"
    series.ReferencedImageSequence = []
    ds.PerformedSeriesSequence = [series]
    return ds
