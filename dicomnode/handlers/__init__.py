"""DIMSE handlers: thin adapters from a pynetdicom event to a named status.

Each takes the event and the running :class:`dicomnode.ae.Node`; the work is done by the archive.
"""

from __future__ import annotations

import copy
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicomnode.encoding import check_dataset
from dicomnode.index.query import QueryError
from dicomnode.status import Status
from dicomnode.worklist import decode_values

# The request parameter holding each event's data set, and the event property decoding it.
_DATASETS = {
    "identifier": "Identifier",
    "attribute_list": "AttributeList",
    "modification_list": "ModificationList",
}


def query_failure(exc: QueryError) -> Status:
    """The C-FIND failure status of an identifier that cannot be answered (PS3.4 C.4.1.1.4):
    it does not fit the information model (A900), or cannot be processed (C000)."""
    return Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS if exc.hierarchy else Status.UNABLE_TO_PROCESS


def request_dataset(event: Any, name: str) -> Dataset:
    """The request's data set (``identifier``, ``attribute_list`` or ``modification_list``),
    its encoding walked in full first (pydicom reads an element cut short or a length running
    past the end without complaint; ``dicomnode.encoding``), then every value decoded by its own
    character set. Raises :class:`~dicomnode.encoding.EncodingError`, or one of
    ``archive.PARSE_ERRORS`` from pydicom."""
    raw = getattr(event.request, _DATASETS[name])
    data = raw.getvalue() if isinstance(raw, BytesIO) else b""
    syntax = str(event.context.transfer_syntax)
    if data and syntax != DeflatedExplicitVRLittleEndian:
        check_dataset(BytesIO(data), 0, len(data), syntax)
    ds: Dataset = copy.deepcopy(getattr(event, name))
    decode_values(ds)
    return ds
