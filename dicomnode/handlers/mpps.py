"""Modality Performed Procedure Step SCP (PS3.4 F.7): N-CREATE and N-SET in, a status out.

:mod:`dicomnode.mpps` checks and keeps the step; these adapters only read the request, answer
the status, with an Error Comment (0000,0902) and Error ID (0000,0903) when refused (PS3.7
10.1.3.1.10, 10.1.5.1.10), and log why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from pynetdicom.events import Event

from dicomnode.archive import PARSE_ERRORS
from dicomnode.encoding import EncodingError
from dicomnode.handlers import request_dataset
from dicomnode.index import IndexError_
from dicomnode.mpps import StepError
from dicomnode.status import Status, describe

if TYPE_CHECKING:
    from dicomnode.ae import Node

log = logging.getLogger(__name__)

Response = tuple[Status | Dataset, Dataset | None]
# (0000,0902) Error Comment is an LO: 64 characters at most.
_COMMENT_MAX = 64


def handle_n_create(event: Event, node: Node) -> Response:
    request = cast(N_CREATE, event.request)
    calling = node.calling_ae_title(event.assoc)
    given = str(request.AffectedSOPInstanceUID or "")
    # PS3.7 10.1.5.1.3: without an Affected SOP Instance UID the SCP assigns one and returns it.
    uid = given or generate_uid(prefix=None)
    try:
        attrs = _decoded(event, "attribute_list")
        linked = node.archive.steps.create(uid, attrs, calling)
    except StepError as exc:
        return _refused("N-CREATE", calling, uid, exc), None
    except IndexError_ as exc:
        return _refused("N-CREATE", calling, uid, _out_of_resources(exc)), None
    log.info("MPPS %s IN PROGRESS from %s: %d worklist item(s) linked", uid, calling, linked)
    if given:
        return Status.SUCCESS, None
    answer = Dataset()
    answer.AffectedSOPInstanceUID = uid  # pynetdicom moves it into the response's command set
    return Status.SUCCESS, answer


def handle_n_set(event: Event, node: Node) -> Response:
    request = cast(N_SET, event.request)
    calling = node.calling_ae_title(event.assoc)
    uid = str(request.RequestedSOPInstanceUID or "")
    try:
        modification = _decoded(event, "modification_list")
        status, linked = node.archive.steps.set(uid, modification)
    except StepError as exc:
        return _refused("N-SET", calling, uid, exc), None
    except IndexError_ as exc:
        return _refused("N-SET", calling, uid, _out_of_resources(exc)), None
    log.info("MPPS %s set %s by %s: %d worklist item(s) follow", uid, status, calling, linked)
    return Status.SUCCESS, None


def _decoded(event: Event, name: str) -> Dataset:
    """The request's data set (``attribute_list``, ``modification_list``), decoded; a
    StepError when it cannot be read."""
    what = name.replace("_", " ")
    try:
        return request_dataset(event, name)
    except EncodingError as exc:
        raise StepError(Status.PROCESSING_FAILURE, f"the {what} cannot be decoded: {exc}") from exc
    except PARSE_ERRORS as exc:
        raise StepError(
            Status.PROCESSING_FAILURE, f"the {what} cannot be decoded: {type(exc).__name__}"
        ) from exc


def _out_of_resources(exc: IndexError_) -> StepError:
    return StepError(Status.RESOURCE_LIMITATION, f"the index is unavailable: {exc}")


def _refused(operation: str, calling: str, uid: str, exc: StepError) -> Dataset:
    log.warning(
        "MPPS %s from %s refused, %s: %s (SOP Instance UID %s)",
        operation,
        calling,
        describe(exc.status),
        exc.comment,
        uid,
    )
    status = Dataset()
    status.Status = int(exc.status)
    status.ErrorComment = exc.comment[:_COMMENT_MAX]
    if exc.error_id is not None:
        status.ErrorID = exc.error_id
    return status
