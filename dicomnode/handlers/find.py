"""C-FIND SCP (PS3.4 C.4.1): the archive answers, this adapter streams pending responses."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.events import Event

from dicomnode.archive import TooManyMatches
from dicomnode.handlers import audit_query, decode_identifier, query_failure, query_level
from dicomnode.handlers.worklist import handle_worklist_find
from dicomnode.index.query import QueryError, for_transfer_syntax
from dicomnode.policy import uid_name
from dicomnode.qr import MODALITY_WORKLIST_FIND, Operation, model_of
from dicomnode.status import Status, describe

if TYPE_CHECKING:
    from dicomnode.ae import Node

log = logging.getLogger(__name__)

Response = tuple[Status, Dataset | None]


def handle_find(event: Event, node: Node) -> Iterator[Response]:
    request = cast(C_FIND, event.request)
    calling = node.calling_ae_title(event.assoc)
    sop_class = str(request.AffectedSOPClassUID or "")
    if sop_class == MODALITY_WORKLIST_FIND:
        yield from handle_worklist_find(event, node)
        return
    model = model_of(sop_class, Operation.FIND)
    if model is None:
        name = uid_name(sop_class)
        yield _failed(event, node, name, None, Status.SOP_CLASS_NOT_SUPPORTED, f"{name} model")
        return
    # The answers are written in the negotiated transfer syntax: say so, so that encoding them
    # copies their already encoded values (query.for_transfer_syntax).
    syntax = UID(event.context.transfer_syntax)
    try:
        identifier = decode_identifier(request.Identifier, syntax)
    except Exception as exc:  # a bomb past the inflate bound, or what pydicom cannot decode
        why = f"identifier cannot be decoded: {exc}"
        yield _failed(event, node, model.value, None, Status.UNABLE_TO_PROCESS, why)
        return
    level = query_level(identifier)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    matched = 0
    audited = False
    try:
        try:
            for answer in node.archive.find(model, identifier):
                # PS3.4 C.4.1.2.3: a C-CANCEL ends the matching; the final status is Cancel.
                if event.is_cancelled:
                    log.info("C-FIND from %s cancelled after %d matches", calling, matched)
                    audited = True
                    audit_query(event, node, model.value, level, matched, Status.CANCEL)
                    yield Status.CANCEL, None
                    return
                matched += 1
                yield Status.PENDING, for_transfer_syntax(answer, implicit, little)
        except QueryError as exc:
            audited = True
            yield _failed(event, node, model.value, level, query_failure(exc), exc.reason)
            return
        except TooManyMatches as exc:
            audited = True
            yield _failed(event, node, model.value, level, Status.OUT_OF_RESOURCES, str(exc))
            return
        log.info("C-FIND from %s (%s): %d matches", calling, model.value, matched)
        audited = True
        audit_query(event, node, model.value, level, matched, Status.SUCCESS)
        yield Status.SUCCESS, None
    finally:
        if not audited:
            # The association ended (or the answers failed) before a final status: what was
            # sent until then was still disclosed.
            audit_query(
                event, node, model.value, level, matched, None, "no final response was sent"
            )


def _failed(
    event: Event, node: Node, model: str, level: str | None, status: Status, reason: str
) -> Response:
    calling = node.calling_ae_title(event.assoc)
    log.warning("C-FIND from %s failed, %s: %s", calling, describe(status, Operation.FIND), reason)
    audit_query(event, node, model, level, 0, status, reason)
    return status, None
