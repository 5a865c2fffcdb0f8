"""DIMSE handlers: thin adapters from a pynetdicom event to a named status.

Each takes the event and the running :class:`dicomnode.ae.Node`; the work is done by the archive.
"""

from __future__ import annotations

import copy
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom.dsutils import decode

from dicomnode.audit import FAILURE, SUCCESS, status_code
from dicomnode.encoding import check_dataset, inflate
from dicomnode.index.query import QueryError
from dicomnode.status import Category, Status, category
from dicomnode.worklist import decode_values

# The request parameter holding each event's data set, and the event property decoding it.
_DATASETS = {
    "identifier": "Identifier",
    "attribute_list": "AttributeList",
    "modification_list": "ModificationList",
}


def peer_address(assoc: Any) -> str | None:
    """The IP address the association's requestor connects from (for the audit trail)."""
    info = getattr(assoc.requestor, "address_info", None)
    address = getattr(info, "address", None)
    return None if address is None else str(address)


def query_level(identifier: Dataset) -> str | None:
    """The Query/Retrieve Level (0008,0052) an identifier asks for, as sent (for the audit
    trail; the archive checks it), or None when it has none or it cannot be read."""
    try:
        value = identifier.get("QueryRetrieveLevel")
    except Exception:  # an undecodable identifier: the archive answers it
        return None
    return None if value is None else str(value).strip()[:16]  # a CS holds 16 characters


def audit_query(
    event: Any,
    node: Any,
    model: str,
    level: str | None,
    matches: int,
    status: int | None,
    reason: str = "",
) -> None:
    """The audit trail's ``query`` record of one C-FIND (PS3.15 A.5.3.10 Query): who asked,
    in which model at which level, how many matches were sent, and the final status (None: the
    association ended first). Failure statuses (and no status) are ``failure`` records."""
    audit = node.archive.audit
    if not audit.enabled:
        return
    ok = status is not None and category(status) is not Category.FAILURE
    fields: dict[str, Any] = {
        "calling_ae": node.calling_ae_title(event.assoc),
        "address": peer_address(event.assoc),
        "model": model,
        "level": level,
        "matches": matches,
        "status": None if status is None else status_code(status),
    }
    if reason:
        fields["reason"] = reason
    audit.record("query", SUCCESS if ok else FAILURE, **fields)


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
    if data and syntax == DeflatedExplicitVRLittleEndian:
        plain = inflated(data)
        check_dataset(BytesIO(plain), 0, len(plain), ExplicitVRLittleEndian)
        ds: Dataset = decode(BytesIO(plain), False, True)
    else:
        if data:
            check_dataset(BytesIO(data), 0, len(data), syntax)
        ds = copy.deepcopy(getattr(event, name))
    decode_values(ds)
    return ds


def inflated(data: bytes) -> bytes:
    """A deflated data set (PS3.5 A.5) inflated in bounded steps (``encoding.inflate``):
    pynetdicom's own decode inflates the whole stream in memory, and a few KB of deflate can
    claim gigabytes. Raises :class:`~dicomnode.encoding.EncodingError` past the bound."""
    out = BytesIO()
    inflate(BytesIO(data), len(data), out)
    return out.getvalue()


def decode_identifier(raw: BytesIO | None, syntax: UID) -> Dataset:
    """An identifier as pynetdicom decodes it, a deflated one inflated within bounds first."""
    data = raw.getvalue() if raw is not None else b""
    if syntax == DeflatedExplicitVRLittleEndian:
        return decode(BytesIO(inflated(data)), False, True)
    return decode(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
