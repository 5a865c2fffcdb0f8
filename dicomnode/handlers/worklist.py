"""Modality Worklist C-FIND SCP (PS3.4 K.4.1): the worklist answers, this adapter streams them.

The Basic Worklist Management service class reaches us through the same EVT_C_FIND as the
Query/Retrieve models; :func:`dicomnode.handlers.find.handle_find` hands its SOP class here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.events import Event

from dicomnode.archive import PARSE_ERRORS
from dicomnode.encoding import EncodingError
from dicomnode.handlers import audit_query, query_failure, request_dataset
from dicomnode.index import IndexError_
from dicomnode.index.query import QueryError
from dicomnode.index.worklist import encoded_for
from dicomnode.qr import Operation
from dicomnode.status import Status, describe
from dicomnode.worklist import TooManyItems

if TYPE_CHECKING:
    from dicomnode.ae import Node

log = logging.getLogger(__name__)

Response = tuple[Status, Dataset | None]


# The audit trail's name for the Modality Worklist Information Model (it has no levels).
AUDIT_MODEL = "worklist"


def handle_worklist_find(event: Event, node: Node) -> Iterator[Response]:
    calling = node.calling_ae_title(event.assoc)
    try:
        identifier = request_dataset(event, "identifier")
    except EncodingError as exc:
        reason = f"the identifier cannot be decoded: {exc}"
        yield _failed(event, node, Status.UNABLE_TO_PROCESS, reason)
        return
    except PARSE_ERRORS as exc:
        reason = f"the identifier cannot be decoded: {type(exc).__name__}"
        yield _failed(event, node, Status.UNABLE_TO_PROCESS, reason)
        return
    try:
        answers = node.archive.worklist.find(identifier, calling)
    except QueryError as exc:
        yield _failed(event, node, query_failure(exc), exc.reason)
        return
    except TooManyItems as exc:
        yield _failed(event, node, Status.OUT_OF_RESOURCES, str(exc))
        return
    except IndexError_ as exc:
        yield _failed(event, node, Status.OUT_OF_RESOURCES, str(exc))
        return
    # The answers are written in the negotiated transfer syntax: say so, so that encoding them
    # copies their already encoded values (index.worklist.encoded_for).
    syntax = UID(event.context.transfer_syntax)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    sent = 0
    audited = False
    try:
        for answer in answers:
            # PS3.4 C.4.1.2.3 (K.4.1.2.3 follows it): a C-CANCEL ends the matching.
            if event.is_cancelled:
                log.info("worklist C-FIND from %s cancelled after %d items", calling, sent)
                audited = True
                audit_query(event, node, AUDIT_MODEL, None, sent, Status.CANCEL)
                yield Status.CANCEL, None
                return
            sent += 1
            yield Status.PENDING, encoded_for(answer, implicit, little)
        log.info("worklist C-FIND from %s: %d items", calling, len(answers))
        audited = True
        audit_query(event, node, AUDIT_MODEL, None, sent, Status.SUCCESS)
        yield Status.SUCCESS, None
    finally:
        if not audited:  # the association ended before the final status
            audit_query(event, node, AUDIT_MODEL, None, sent, None, "no final response was sent")


def _failed(event: Event, node: Node, status: Status, reason: str) -> Response:
    log.warning(
        "worklist C-FIND from %s failed, %s: %s",
        node.calling_ae_title(event.assoc),
        describe(status, Operation.FIND),
        reason,
    )
    audit_query(event, node, AUDIT_MODEL, None, 0, status, reason)
    return status, None
