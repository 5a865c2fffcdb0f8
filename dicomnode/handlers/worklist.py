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
from dicomnode.handlers import query_failure, request_dataset
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


def handle_worklist_find(event: Event, node: Node) -> Iterator[Response]:
    calling = node.calling_ae_title(event.assoc)
    try:
        identifier = request_dataset(event, "identifier")
    except EncodingError as exc:
        yield _failed(calling, Status.UNABLE_TO_PROCESS, f"the identifier cannot be decoded: {exc}")
        return
    except PARSE_ERRORS as exc:
        yield _failed(
            calling,
            Status.UNABLE_TO_PROCESS,
            f"the identifier cannot be decoded: {type(exc).__name__}",
        )
        return
    try:
        answers = node.archive.worklist.find(identifier, calling)
    except QueryError as exc:
        yield _failed(calling, query_failure(exc), exc.reason)
        return
    except TooManyItems as exc:
        yield _failed(calling, Status.OUT_OF_RESOURCES, str(exc))
        return
    except IndexError_ as exc:
        yield _failed(calling, Status.OUT_OF_RESOURCES, str(exc))
        return
    # The answers are written in the negotiated transfer syntax: say so, so that encoding them
    # copies their already encoded values (index.worklist.encoded_for).
    syntax = UID(event.context.transfer_syntax)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    for sent, answer in enumerate(answers):
        # PS3.4 C.4.1.2.3 (K.4.1.2.3 follows it): a C-CANCEL ends the matching.
        if event.is_cancelled:
            log.info("worklist C-FIND from %s cancelled after %d items", calling, sent)
            yield Status.CANCEL, None
            return
        yield Status.PENDING, encoded_for(answer, implicit, little)
    log.info("worklist C-FIND from %s: %d items", calling, len(answers))
    yield Status.SUCCESS, None


def _failed(calling: str, status: Status, reason: str) -> Response:
    log.warning(
        "worklist C-FIND from %s failed, %s: %s",
        calling,
        describe(status, Operation.FIND),
        reason,
    )
    return status, None
