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
from dicomnode.worklist import decode_values

# The request parameter holding each event's data set, and the event property decoding it.
_DATASETS = {
    "identifier": "Identifier",
    "attribute_list": "AttributeList",
    "modification_list": "ModificationList",
}


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
