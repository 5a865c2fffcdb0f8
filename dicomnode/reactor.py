"""Event-driven replacements for pynetdicom's polling loops.

pynetdicom runs two threads per association and both poll: the DUL thread checks the socket with a
zero-timeout ``select`` and sleeps 1 ms when nothing happened, and the association thread sleeps
1 ms before every look at the DIMSE message queue. Each C-STORE crosses both loops twice (request
in, response out), so on loopback the sleeps, not the bytes, bound the message rate.

Here both loops wait on the things that can wake them instead:

- the DUL thread blocks in ``select`` on its socket and a wake-up pipe, written whenever a primitive
  is queued for it to send, an event is queued for its state machine, or it is told to stop;
- the association thread blocks on an event set when a DIMSE message is complete, when an ACSE
  primitive (release, abort) reaches the user, or when the DUL thread ends.

Both still wake at least every ``MAX_WAIT`` seconds, so the timers pynetdicom checks by polling
(ARTIM, the network idle timeout) behave as before. The hooks swap pynetdicom's provider classes
in ``pynetdicom.association`` for subclasses, and its association loop for ours; pynetdicom is
pinned to 3.0.x for that (pyproject.toml), and ``tests/test_reactor.py`` exercises the paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pynetdicom.association
import pynetdicom.dul
import pynetdicom.service_class
from pynetdicom import evt
from pynetdicom.dimse import _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

# Upper bound on any wait, so that timers checked by polling still fire on time.
MAX_WAIT = 0.05

_WAKE_ATTR = "_dicomnode_wake"


def association_wake(assoc: Any) -> threading.Event:
    """The event that wakes ``assoc``'s reactor thread (created on first use)."""
    wake: threading.Event = assoc.__dict__.setdefault(_WAKE_ATTR, threading.Event())
    return wake


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _ProviderQueue(_WakingQueue):
    """The DUL's queue of primitives to send; counts the P-DATA ones not yet on the wire."""

    def __init__(self, dul: EventDUL) -> None:
        super().__init__(dul._wake.set)
        self._dul = dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if isinstance(item, P_DATA):
            with self._dul._send_lock:
                self._dul._pdata_pending += 1
        super().put(item, block, timeout)


class _WakePipe:
    """A self-pipe: ``set`` from any thread makes the reader's ``select`` return."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._pending = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_fds, self.read_fd, self._write_fd)

    def set(self) -> None:
        if self._pending or self._closed:
            return
        self._pending = True
        # A full pipe already means "wake up"; a closed one means nobody is waiting any more.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.read_fd, 512):
                pass
        # Cleared after draining: a set() racing with this either left a byte behind (the next
        # select returns at once) or queued its item before we go on to look at the queues.
        self._pending = False

    def close(self) -> None:
        self._closed = True
        self._finalizer()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class EventDUL(DULServiceProvider):
    """pynetdicom's DUL provider, waiting in ``select`` instead of sleeping between polls."""

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self._wake = _WakePipe()
        # Serialises writes to the socket between this thread and a direct sender
        # (send_direct), and guards the count of P-DATA primitives queued but not yet sent.
        self._send_lock = threading.Lock()
        self._pdata_pending = 0
        self.to_provider_queue = _ProviderQueue(self)
        self.event_queue = _WakingQueue(self._wake.set)
        user_wake = association_wake(assoc)
        self.to_user_queue = _WakingQueue(user_wake.set)

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake.set()

    def _read_pdu_data(self) -> None:
        """pynetdicom's PDU read (dul.py, 3.0.x), refusing a declared length past the bound
        (:func:`pdu_length_bound`) before reading or allocating anything of it: the association
        is aborted and the connection closed at once (nothing after it can be read as a PDU)."""
        transport = self.socket
        if transport is None:
            self.event_queue.put("Evt17")
            return
        try:
            header = bytes(transport.recv(6))
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")  # the connection closed or went silent mid-header
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
        assoc = self.assoc
        local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
        bound = pdu_length_bound(pdu_type, int(local.maximum_length or 0))
        if bound is None or pdu_length > bound:
            log.warning(
                "aborting the association from %s: a PDU of type 0x%02X declares %d bytes%s",
                self._peer_address(),
                pdu_type,
                pdu_length,
                f", more than the {bound} allowed" if bound is not None else " (unknown type)",
            )
            self._abort_now(_INVALID_PDU_PARAMETER if bound is not None else _UNRECOGNIZED_PDU)
            return
        try:
            body = transport.recv(pdu_length)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception:
            pynetdicom.dul.LOGGER.exception("Unable to decode the received PDU data")
            self.event_queue.put("Evt19")
            return
        if isinstance(pdu, P_DATA_TF) and assoc.is_established:
            unknown = sorted(
                {int(item.context_id or 0) for item in pdu.presentation_data_value_items}
                - set(assoc._accepted_cx)
            )
            if unknown:
                # PS3.8 9.3.5.1: a PDV's context ID must be one accepted at association; the
                # rest of the message could not be decoded against any transfer syntax.
                log.warning(
                    "aborting the association from %s: P-DATA on presentation context %s, "
                    "never accepted",
                    self._peer_address(),
                    ", ".join(map(str, unknown)),
                )
                self._abort_now(_INVALID_PDU_PARAMETER)
                return
        if (
            pdu_type == _RELEASE_RQ
            and assoc.is_established
            and getattr(assoc.dimse, "message", None) is not None
            and self.event_queue.empty()
        ):
            # A release asked for with a DIMSE message half received (PS3.8 7.2: release comes
            # when the service user has nothing more to send). Releasing would read as an
            # orderly end; the message is lost either way, so say so with A-ABORT.
            log.warning(
                "aborting the association from %s: A-RELEASE-RQ in the middle of a DIMSE message",
                self._peer_address(),
            )
            self._abort_now(_UNEXPECTED_PDU)
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _peer_address(self) -> str:
        """host:port of the other end, for log lines."""
        assoc = self.assoc
        remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        address = getattr(remote, "address_info", None)
        return f"{getattr(address, 'address', '?')}:{getattr(address, 'port', '?')}"

    def _send(self, pdu: Any) -> None:
        with self._send_lock:
            super()._send(pdu)
            if isinstance(pdu, P_DATA_TF):
                self._pdata_pending -= 1

    def send_direct(self, pdatas: Iterable[P_DATA]) -> bool:
        """Write the P-DATA primitives ``pdatas`` (one DIMSE message) to the socket from the
        calling thread, as DT-1 would (PS3.8 9.2: P-DATA in Sta6 leaves the state unchanged);
        False, having consumed nothing, when the queue must be used instead: P-DATA still
        queued (order must hold), another state, or a TLS socket (its SSL object is not
        shared between threads).

        A response through the queue costs a hand-over to this thread and back; on loopback
        that is about as long as the rest of sending it.
        """
        transport = self.socket
        raw = getattr(transport, "socket", None) if transport is not None else None
        if type(raw) is not socket.socket or not getattr(transport, "_is_connected", False):
            return False
        with self._send_lock:
            if self._pdata_pending or self.state_machine.current_state != "Sta6":
                return False
            try:
                for pdata in pdatas:
                    raw.sendall(_p_data_tf(pdata))
            except OSError:
                # As pynetdicom's transport does on a failed send: the connection is gone.
                self.event_queue.put("Evt17")
        return True

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake.set()
            if self.is_alive() and threading.current_thread() is not self:
                self.join()
            return True
        return False

    def _wait(self) -> None:
        """Block until the socket is readable, a wake-up arrives, or a timer may be due."""
        timeout = MAX_WAIT
        if self.artim_timer._start_time is not None and self.artim_timer.timeout is not None:
            timeout = max(0.0, min(timeout, self.artim_timer.remaining))
        fds: list[Any] = [self._wake.read_fd]
        transport = self.socket
        raw = getattr(transport, "socket", None) if transport is not None else None
        if raw is not None and getattr(transport, "_is_connected", False):
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # decrypted bytes already buffered: select would not see them
            if raw.fileno() >= 0:
                fds.append(raw)
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError):
            # The socket was closed under us: the transport check in the loop reports it.
            return
        if self._wake.read_fd in readable:
            self._wake.drain()

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (dul.py, 3.0.x) with ``_wait`` in place of the fixed sleep."""
        try:
            self._run()
        finally:
            self._wake.close()
            association_wake(self.assoc).set()
            if self.assoc.is_acceptor and self.assoc.requestor.primitive is None:
                # The connection ended before an A-ASSOCIATE-RQ: wake the association thread,
                # waiting up to acse_timeout for one, as that timeout would (None), so that it
                # closes the connection and frees its place now.
                self.to_user_queue.put(None)

    def _run(self) -> None:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if idle:
                self._wait()
            if self._kill_thread:
                break
            # The ARTIM timer first, so that its event is queued ahead of any other this turn.
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # Either encode and send one primitive, or receive and decode one PDU.
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                self._abort_on_exception()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            try:
                self.state_machine.do_action(event)
            except Exception:
                # pynetdicom's state machine re-raises what an action raised (a P-DATA it cannot
                # decode, say); left alone that ends this thread with the connection open and
                # no close event, so partial receives would never be discarded.
                self._abort_on_exception()
                return
            idle = False

    def _abort_on_exception(self) -> None:
        # As pynetdicom does: bypass the state machine, send A-ABORT, stop both threads.
        pynetdicom.dul.LOGGER.exception("Exception in the DUL loop, aborting the association")
        self._abort_now(0x00)

    def _abort_now(self, reason: int) -> None:
        """Send A-ABORT (source: service-provider, ``reason`` as PS3.8 9.3.8) and stop both
        threads at once, past the state machine: for a peer whose byte stream cannot be read
        on (the rest of an unread PDU would be taken for the next one)."""
        from pynetdicom.pdu import A_ABORT_RQ

        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = reason
        transport = self.socket
        with contextlib.suppress(Exception):
            transport.send(abort_pdu.encode())  # type: ignore[union-attr]
        if transport is not None and getattr(transport, "_is_connected", False):
            # Close it here, as the state machine's actions do, and say so: the close handlers
            # (partial receives discarded, the association's place freed, its audit) run once.
            with contextlib.suppress(Exception):
                transport.close()
            remote = self.assoc.requestor if self.assoc.is_acceptor else self.assoc.acceptor
            info = getattr(remote, "address_info", None)
            address = info.as_tuple if info is not None else None
            evt.trigger(self.assoc, evt.EVT_CONN_CLOSE, {"address": address})
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class EventDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, waking the association thread when a message is complete,
    and writing responses to the socket from the thread that makes them."""

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self.msg_queue = _WakingQueue(association_wake(assoc).set)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """pynetdicom's send_msg (dimse.py, 3.0.x); a response goes out directly when the DUL
        allows (:meth:`EventDUL.send_direct`). Requests keep the queue: a C-STORE request's
        data set is read as it is sent, and must not wait on the socket under the send lock."""
        dul = self.dul
        if primitive.MessageIDBeingRespondedTo is None or not isinstance(dul, EventDUL):
            super().send_msg(primitive, context_id)
            return
        message = _RSP_TO_MESSAGE[primitive.__class__]()
        message.primitive_to_message(primitive)
        message.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        pdatas = list(message.encode_msg(context_id, self.maximum_pdu_size))
        if not dul.send_direct(pdatas):
            for pdata in pdatas:
                dul.send_pdu(pdata)


def _p_data_tf(pdata: P_DATA) -> bytes:
    """A P-DATA-TF PDU (PS3.8 9.3.5): type 04, reserved, length, then one PDV item per value,
    each its length, presentation context ID and the fragment with its control header."""
    items = b"".join(
        _PDV_HEADER.pack(len(fragment) + 1, context_id) + fragment
        for context_id, fragment in pdata.presentation_data_value_list
    )
    return _PDU_HEADER.pack(0x04, 0x00, len(items)) + items


_PDU_HEADER = struct.Struct(">BBI")
# The PDU types of PS3.8 9.3: the association PDUs carry at most a few hundred presentation
# contexts and a user identity (PS3.7 D.3.3.7: a Kerberos ticket or SAML assertion, each at
# most 64 KiB), so 1 MiB is generous; A-RELEASE and A-ABORT PDUs have a fixed length of 4.
_ASSOCIATION_PDU_MAX = 1024 * 1024
_FIXED_PDUS = {0x05, 0x06, 0x07}  # A-RELEASE-RQ, A-RELEASE-RP, A-ABORT
_P_DATA_TF = 0x04
_RELEASE_RQ = 0x05
# PS3.8 9.3.8 A-ABORT reason/diag. for the service-provider source.
_UNRECOGNIZED_PDU = 0x01
_UNEXPECTED_PDU = 0x02
_INVALID_PDU_PARAMETER = 0x06
# A P-DATA-TF PDU may carry no more than the Maximum Length we announced (PS3.8 D.1); a little
# slack for peers that count the PDV item headers differently.
_P_DATA_SLACK = 1024
# When we announced no maximum (0, "unlimited": never by our own configuration).
_P_DATA_UNLIMITED = 64 * 1024 * 1024


def pdu_length_bound(pdu_type: int, maximum_length: int) -> int | None:
    """The largest PDU length (the header's length field) accepted for ``pdu_type`` when we
    announced ``maximum_length``; None for a type PS3.8 does not define."""
    if pdu_type == _P_DATA_TF:
        return (maximum_length or _P_DATA_UNLIMITED) + _P_DATA_SLACK
    if pdu_type in _FIXED_PDUS:
        return 4
    if pdu_type in (0x01, 0x02, 0x03):  # A-ASSOCIATE-RQ, -AC, -RJ
        return _ASSOCIATION_PDU_MAX
    return None


_PDV_HEADER = struct.Struct(">IB")


def _run_association_reactor(self: Any) -> None:
    """pynetdicom's acceptor/requestor loop (association.py ``_run_reactor``, 3.0.x), waiting on
    ``association_wake`` instead of sleeping 1 ms per turn.

    While it waits it counts as paused, so that a thread sending on this association (a C-STORE
    sub-operation, a release) need not wait for a turn of the loop to take over the queues.
    """
    wake = association_wake(self)
    served = False
    while not self._kill:
        self._is_paused = True
        if not served:
            wake.wait(MAX_WAIT)
        wake.clear()
        # A sender (pynetdicom's send_* methods) clears the checkpoint, then waits until we are
        # paused, then owns the DIMSE queues until it sets the checkpoint again. We unpause,
        # then look at the checkpoint once more: either we see its clear (and pause again), or
        # it sees us unpaused (and waits for our next turn). Without the second look, a sender
        # that cleared the checkpoint just as we passed it would find us still "paused", and we
        # would take its response off the queue.
        while True:
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if self._reactor_checkpoint.is_set():
                break
            self._is_paused = True
        served = False

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)
            # Another message may have completed meanwhile with its wake already consumed.
            served = True

        if self.is_established and self.acse.is_release_requested():
            _answer_release(self)
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            pynetdicom.association.LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            pynetdicom.association.LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def _answer_release(assoc: Any) -> None:
    """Answer the A-RELEASE-RQ just taken off the queue and end the association, as pynetdicom's
    loop does (PS3.8 9.2: A-RELEASE-RP, then the requestor closes the connection)."""
    assoc.acse.send_release(is_response=True)
    pynetdicom.association.LOGGER.info("Association Released")
    assoc.is_released = True
    assoc.is_established = False
    evt.trigger(assoc, evt.EVT_RELEASED, {})
    assoc.kill()


def _wrap_service_handler(self: Any, handler: Iterator[Any]) -> Iterator[tuple[Any, Any]]:
    """pynetdicom's ``ServiceClass._wrap_handler`` (3.0.x), which runs a C-FIND, C-MOVE or C-GET
    handler one response at a time, but answering an A-RELEASE-RQ that arrives meanwhile.

    pynetdicom stops the operation then, having taken the A-RELEASE-RQ off the queue, and nobody
    answers it: the requestor waits for its A-RELEASE-RP until a timeout, and so do we, then
    abort. A requestor releases when it has nothing more to send (PS3.8 7.2), so here the
    operation stops (the handler is closed, which ends C-MOVE sub-associations and database
    reads), no further response is sent, and the release is answered at once.
    """
    assoc = self.assoc
    try:
        for result in handler:
            if assoc.acse.is_aborted():
                _close(handler)
                return
            if assoc.acse.is_release_requested():
                log.warning(
                    "A-RELEASE-RQ from %s before the operation was complete: stopped it and "
                    "released the association",
                    assoc.dul._peer_address(),
                )
                _close(handler)
                _answer_release(assoc)
                return
            yield (result, None)
    except Exception:
        yield (None, sys.exc_info())


def _close(handler: Iterator[Any]) -> None:
    close = getattr(handler, "close", None)
    if close is not None:
        close()


_installed = False


def install_reactor_hooks() -> None:
    """Make pynetdicom's DUL and association loops wait on events instead of polling.

    Affects associations created afterwards, in both directions (our SCP and our SCUs).
    """
    global _installed
    if _installed:
        return
    pynetdicom.association.DULServiceProvider = EventDUL  # type: ignore[attr-defined]
    pynetdicom.association.DIMSEServiceProvider = EventDIMSE  # type: ignore[attr-defined]
    pynetdicom.association.Association._run_reactor = _run_association_reactor  # type: ignore[method-assign]
    pynetdicom.service_class.ServiceClass._wrap_handler = _wrap_service_handler  # type: ignore[method-assign]
    _installed = True
