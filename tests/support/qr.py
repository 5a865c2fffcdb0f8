"""pynetdicom SCUs against a running node, and a pynetdicom storage SCP as a move destination:
one association per call, statuses and answers returned for the test to check.

Data: :func:`study` turns pydicom's shipped files into a study of a made-up patient (fresh UIDs,
the patient's name, ID and birth date), so that tests can follow exactly those values.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from dicomnode.qr import SOP_CLASSES, Model, Operation
from dicomnode.status import Status
from tests.support.node import RunningNode

LOOPBACK = "127.0.0.1"
PATIENT_FIND = SOP_CLASSES[(Model.PATIENT_ROOT, Operation.FIND)]
STUDY_FIND = SOP_CLASSES[(Model.STUDY_ROOT, Operation.FIND)]
PATIENT_MOVE = SOP_CLASSES[(Model.PATIENT_ROOT, Operation.MOVE)]
STUDY_MOVE = SOP_CLASSES[(Model.STUDY_ROOT, Operation.MOVE)]
STUDY_GET = SOP_CLASSES[(Model.STUDY_ROOT, Operation.GET)]
PENDING = (Status.PENDING, Status.PENDING_WARNING)
# Uncompressed, so every storage SCP takes them as they are.
SOURCES = ("CT_small.dcm", "MR_small.dcm")


@dataclass(frozen=True)
class Patient:
    name: str
    patient_id: str
    birth_date: str  # DA, YYYYMMDD


def study(patient: Patient, instances: int = 2, sources: Sequence[str] = SOURCES) -> list[Dataset]:
    """``instances`` instances of one new study of ``patient``, one series per source file."""
    study_uid = generate_uid()
    series = {name: generate_uid() for name in sources}
    made = []
    for i in range(instances):
        name = sources[i % len(sources)]
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.PatientName = patient.name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = patient.birth_date
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series[name]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        made.append(ds)
    return made


def identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@contextmanager
def association(
    node: RunningNode, calling: str, contexts: Sequence[Any], **kwargs: Any
) -> Iterator[Any]:
    ae = AE(ae_title=calling)
    for cx in contexts:
        if isinstance(cx, str):
            ae.add_requested_context(cx)
        else:
            ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, **kwargs)
    assert assoc.is_established, f"{calling}: association not established"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def store(node: RunningNode, datasets: Sequence[Dataset], calling: str = "STORESCU") -> list[int]:
    """C-STORE every data set on one association; their statuses."""
    classes = sorted({str(ds.SOPClassUID) for ds in datasets})
    statuses = []
    with association(node, calling, classes) as assoc:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    return statuses


def find(
    node: RunningNode, query: Dataset, model: str = STUDY_FIND, calling: str = "FINDSCU"
) -> tuple[list[Dataset], int]:
    """C-FIND; the pending answers and the final status."""
    answers: list[Dataset] = []
    final = -1
    with association(node, calling, [model]) as assoc:
        for status, answer in assoc.send_c_find(query, model):
            if int(status.Status) in PENDING:
                answers.append(answer)
            else:
                final = int(status.Status)
    return answers, final


def move(
    node: RunningNode,
    query: Dataset,
    destination: str,
    model: str = STUDY_MOVE,
    calling: str = "MOVESCU",
) -> Dataset:
    """C-MOVE; the final response."""
    final = Dataset()
    with association(node, calling, [model]) as assoc:
        for status, _ in assoc.send_c_move(query, destination, model):
            if int(status.Status) not in PENDING:
                final = status
    return final


def get(
    node: RunningNode, query: Dataset, model: str = STUDY_GET, calling: str = "GETSCU"
) -> tuple[list[Dataset], Dataset]:
    """C-GET with the storage SOP classes of :data:`SOURCES` in the SCP role; what arrived and
    the final response."""
    arrived: list[Dataset] = []

    def on_store(event: Any) -> int:
        arrived.append(event.dataset)
        return int(Status.SUCCESS)

    classes = sorted({str(pydicom.dcmread(get_testdata_file(n)).SOPClassUID) for n in SOURCES})
    roles = [build_role(uid, scp_role=True) for uid in classes]
    final = Dataset()
    with association(
        node,
        calling,
        [model, *classes],
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    ) as assoc:
        for status, _ in assoc.send_c_get(query, model):
            if int(status.Status) not in PENDING:
                final = status
    return arrived, final


@dataclass
class Receiver:
    """A storage SCP: what it received, by SOP Instance UID."""

    ae_title: str
    port: int
    received: dict[str, Dataset] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def peer(self) -> Mapping[str, Any]:
        """As the node's ``peers`` section names it."""
        return {"ae_title": self.ae_title, "host": LOOPBACK, "port": self.port}


@contextmanager
def receiver(ae_title: str = "DEST") -> Iterator[Receiver]:
    """A pynetdicom storage SCP on a free loopback port, for the node's C-MOVE to send to."""
    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    found = Receiver(ae_title, 0)

    def on_store(event: Any) -> int:
        ds = event.dataset
        with found.lock:
            found.received[str(ds.SOPInstanceUID)] = ds
        return int(Status.SUCCESS)

    server = ae.start_server((LOOPBACK, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    found.port = int(server.server_address[1])
    try:
        yield found
    finally:
        server.shutdown()
        ae.shutdown()
