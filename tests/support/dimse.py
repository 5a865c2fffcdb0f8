"""pynetdicom as a test peer: real associations, and C-STORE requests crafted byte by byte."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from tests.support.corpus import dataset_bytes
from tests.support.node import RunningNode


@contextmanager
def associate(
    node: RunningNode,
    contexts: Sequence[tuple[str, Sequence[str]]],
    calling_ae: str = "TESTSCU",
) -> Iterator[Association]:
    """An association to ``node`` proposing ``(abstract syntax, [transfer syntaxes])`` pairs."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def context_id(assoc: Association, abstract: str, syntax: str | None = None) -> int:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == abstract and (syntax is None or cx.transfer_syntax[0] == syntax):
            return int(cx.context_id)  # type: ignore[arg-type]
    raise AssertionError(f"no accepted context for {abstract} {syntax or ''}")


def raw_store(
    assoc: Association, cx_id: int, sop_class: str, sop_instance: str, data: bytes
) -> int:
    """Send a C-STORE-RQ whose command says ``sop_class``/``sop_instance`` and whose data set is
    exactly ``data``, on context ``cx_id``; return the response status."""
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = BytesIO(data)
    return raw_request(assoc, cx_id, req)


def pause_reactor(assoc: Association, timeout: float = 30.0) -> None:
    """Stop ``assoc``'s reactor thread from taking DIMSE messages off the queue, as
    Association.send_c_store does before it sends, but without its race: ``_is_paused`` may
    still be True from the reactor's last pause while it has already passed the checkpoint (it
    would then take our response). So wait until the reactor is really blocked on the cleared
    checkpoint: paused, and a waiter on the event's condition (CPython's threading.Event).
    Release with ``assoc._reactor_checkpoint.set()``."""
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    while not (assoc._is_paused and checkpoint._cond._waiters):  # type: ignore[attr-defined]
        if not assoc.is_established or time.monotonic() > deadline:
            return  # nothing to wait for: the association is gone
        time.sleep(0.0001)


def raw_request(assoc: Association, cx_id: int, request: Any) -> int:
    """Send a DIMSE request primitive as it is, on context ``cx_id``; return the response's
    status."""
    pause_reactor(assoc)
    try:
        assoc.dimse.send_msg(request, cx_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert rsp is not None, f"no response to {type(request).__name__}"
    return int(rsp.Status)


def store_file(assoc: Association, path: Path) -> int:
    """Send a Part 10 file's data set as it is, on the context of its SOP class and syntax."""
    ds = dcmread(path, stop_before_pixels=True)
    cx = context_id(assoc, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    return raw_store(assoc, cx, str(ds.SOPClassUID), str(ds.SOPInstanceUID), dataset_bytes(path))


UNCOMPRESSED = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]


def echo(node: RunningNode, calling_ae: str = "TESTSCU") -> Any:
    with associate(node, [("1.2.840.10008.1.1", UNCOMPRESSED)], calling_ae) as assoc:
        assert assoc.is_established
        return assoc.send_c_echo().Status
