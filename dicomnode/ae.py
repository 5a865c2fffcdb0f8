"""Builds and serves the Application Entity: configuration and policy in, a listening node out.

With ``workers: 1`` :func:`serve` runs one :class:`Node` in this process. With more, this process
becomes a supervisor (:class:`Supervisor`, a pre-fork server): it does the one-time start-up work
(clearing ``storage_dir/tmp``, creating or migrating the index), binds and listens once, then forks
the workers before any thread exists. Each worker builds its own :class:`Node` (its own AE, hooks
and SQLite connections) and accepts on the inherited listening socket; the kernel hands each new
connection to one of them. ``limits.max_associations`` stays node-wide through the
:class:`WorkerBoard`, counts in shared memory that also balance accepts. The supervisor restarts a
worker that dies and stops them all on SIGTERM or SIGINT.

Only an association counts against ``limits.max_associations``: a connection is admitted when its
A-ASSOCIATE-RQ has arrived (a single process keeps the same :class:`WorkerBoard`, of one worker).
Connections that have not sent one yet are bounded apart (:class:`PendingConnections`), the oldest
closed when a new one would pass the bound, so idle or byte-at-a-time sockets can neither hold the
places of real callers nor pile up threads.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import mmap
import multiprocessing
import os
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import AddressInformation, ThreadedAssociationServer

from dicomnode import service
from dicomnode.access import AccessRules
from dicomnode.archive import Archive
from dicomnode.audit import FAILURE, AuditLog
from dicomnode.config import Config, ConfigError, Limits, load_config
from dicomnode.handlers import association as assoc_handlers
from dicomnode.handlers.echo import handle_echo
from dicomnode.handlers.find import handle_find
from dicomnode.handlers.mpps import handle_n_create, handle_n_set
from dicomnode.handlers.store import handle_store
from dicomnode.identity import apply_limits, new_ae
from dicomnode.policy import ConformanceError, Decision, Policy, Profile, load_policy
from dicomnode.reactor import install_reactor_hooks
from dicomnode.receive import Receiver, install_receive_hooks
from dicomnode.retrieve import install_retrieve_hooks
from dicomnode.tls import TlsError, handshake_refusal, server_context

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 A.4 Verification SOP Class
# PS3.8 9.3.4 A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local limit
# exceeded; sent past limits.max_associations (as pynetdicom past AE.maximum_associations).
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_NODE_SIGNALS = (*_STOP_SIGNALS, signal.SIGHUP)


class WorkerBoard:
    """What the worker processes of one node share, in memory the supervisor maps before it forks.

    - ``limits.max_associations`` across the workers: one count per worker, each written only by
      its worker, all under one process-shared lock. A worker admits an association (at
      A-ASSOCIATE-RQ) only while the sum is under the limit and releases it when its connection
      closes, so the (limit + 1)th association is rejected whichever worker takes it. A single
      process has a board of one worker: connections that sent no A-ASSOCIATE-RQ never count.
    - Balancing: each worker publishes how many associations it serves. Every worker wakes for a
      new connection and the first to accept gets it; one that serves more than the least busy
      worker waits a little before accepting (as nginx's accept_disabled), so the least busy one
      usually takes it, yet a connection never waits long if that one is slow to wake.

    The supervisor zeroes the counts of a worker that died.
    """

    # Critical sections are a few microseconds; waiting this long means the holder died in one.
    LOCK_TIMEOUT = 5.0
    # A worker serving n more associations than the least busy one waits n steps before it
    # accepts, at most ACCEPT_DELAY_MAX: long enough for a worker whose association threads hold
    # its GIL to wake (Python switches threads every 5 ms), short beside an association set-up.
    ACCEPT_DELAY_STEP = 0.01
    ACCEPT_DELAY_MAX = 0.05

    def __init__(self, limit: int, workers: int) -> None:
        self.limit = limit
        self.workers = workers
        size = ctypes.sizeof(ctypes.c_int) * workers
        self._memory = mmap.mmap(-1, 2 * size)  # anonymous and MAP_SHARED: shared across fork
        self._counts = (ctypes.c_int * workers).from_buffer(self._memory)
        self._loads = (ctypes.c_int * workers).from_buffer(self._memory, size)
        self._lock = multiprocessing.get_context("fork").Lock()
        self.slot = 0  # this worker's place; set in each worker after the fork
        self._mine: dict[int, Any] = {}  # this worker's admitted associations, by id

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self._lock.acquire(timeout=self.LOCK_TIMEOUT):
            raise TimeoutError("the node-wide association count is locked")
        try:
            yield
        finally:
            self._lock.release()

    def admit(self, assoc: Any) -> bool:
        """Count ``assoc`` in, or False when the node already has ``limit`` associations."""
        try:
            with self._locked():
                # An association whose thread ended without a connection-close event is gone
                # too: never let a missed event hold a place for ever.
                for key, other in list(self._mine.items()):
                    if not other.is_alive():
                        del self._mine[key]
                others = sum(self._counts) - self._counts[self.slot]
                admitted = others + len(self._mine) < self.limit
                if admitted:
                    self._mine[id(assoc)] = assoc
                self._counts[self.slot] = len(self._mine)
                return admitted
        except TimeoutError:
            log.error("association count locked for %.0f s; refusing", self.LOCK_TIMEOUT)
            return False

    def release(self, assoc: Any) -> bool:
        """``assoc``'s connection closed: its place is free. False if it was never admitted."""
        with contextlib.suppress(TimeoutError), self._locked():
            if self._mine.pop(id(assoc), None) is not None:
                self._counts[self.slot] = len(self._mine)
                return True
        return False

    def total(self) -> int:
        """Associations admitted on the whole node (a snapshot)."""
        return sum(self._counts)

    def publish_load(self, load: int) -> None:
        self._loads[self.slot] = load

    def accept_delay(self, load: int) -> float:
        """Seconds this worker, serving ``load`` associations, waits before it accepts."""
        others = [n for i, n in enumerate(self._loads) if i != self.slot]
        excess = load - min(others, default=load)
        return min(excess * self.ACCEPT_DELAY_STEP, self.ACCEPT_DELAY_MAX) if excess > 0 else 0.0

    def reset(self, slot: int) -> None:
        """Supervisor: a worker died; its associations died with it."""
        if not self._lock.acquire(timeout=1.0):
            # Only a worker that died inside the critical section holds the lock this long:
            # take it over (a plain lock may be released by any process).
            log.warning("the dead worker held the association count lock; freeing it")
        try:
            self._counts[slot] = 0
            self._loads[slot] = 0
        finally:
            self._lock.release()


class PendingConnections:
    """Connections this process accepted that have not sent an A-ASSOCIATE-RQ yet, oldest first.

    They hold no place under ``limits.max_associations`` (pynetdicom's own count includes them:
    200 silent sockets would hold 16 places until ``limits.acse_timeout`` each), yet each costs
    two threads and a descriptor, so at most ``cap`` are kept: a connection accepted past that
    closes the oldest one still waiting (nginx and Apache do the same with idle keep-alive
    connections). A real caller sends its A-ASSOCIATE-RQ within a round trip of connecting, so
    it leaves this set long before a flood of idle sockets can push it out.
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(1, cap)
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[socket.socket, Any]] = {}  # by id, in accept order
        self.evicted = 0

    def add(self, sock: socket.socket, address: Any) -> list[tuple[socket.socket, Any]]:
        """Note ``sock`` as waiting; returns the connections to close to keep within ``cap``."""
        with self._lock:
            for key, (other, _) in list(self._waiting.items()):
                if other.fileno() < 0:  # closed without a close event reaching us
                    del self._waiting[key]
            self._waiting[id(sock)] = (sock, address)
            evict: list[tuple[socket.socket, Any]] = []
            while len(self._waiting) > self.cap:
                oldest = next(iter(self._waiting))
                evict.append(self._waiting.pop(oldest))
            self.evicted += len(evict)
            return evict

    def discard(self, sock: Any) -> bool:
        """``sock`` sent its A-ASSOCIATE-RQ or closed: no longer waiting."""
        if sock is None:
            return False
        with self._lock:
            return self._waiting.pop(id(sock), None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)


def pending_cap(limits: Limits) -> int:
    """Connections kept waiting for their A-ASSOCIATE-RQ: twice the associations allowed, so a
    burst of callers up to that many is answered in full (those past the limit with
    A-ASSOCIATE-RJ) before any is closed unanswered."""
    return 2 * limits.max_associations


def _close_waiting(sock: socket.socket, address: Any, pending: PendingConnections) -> None:
    host, port = (*tuple(address or ()), "?", "?")[:2]
    log.warning(
        "connection from %s:%s closed: no A-ASSOCIATE-RQ yet and %d newer connections waiting "
        "to send one (at most twice limits.max_associations wait)",
        host,
        port,
        pending.cap,
    )
    # At the descriptor, under any TLS layer: the association's DUL thread, blocked reading
    # this socket, gets end-of-file and ends the connection as a peer's close would.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


# pynetdicom's own limit counts every acceptor thread, connections that sent nothing included;
# ours (WorkerBoard at A-ASSOCIATE-RQ, PendingConnections before) replaces it, so this is only
# out of its way.
_PYNETDICOM_LIMIT_OFF = 1_000_000


class Node:
    """One running node: its AE, archive, receiver and policy.

    ``board``: what this node shares with the other workers when it is one of several (the
    node-wide association limit, accept balancing); in a single process a board of one worker,
    so that the limit counts associations (from their A-ASSOCIATE-RQ), not connections.
    """

    def __init__(self, config: Config, policy: Policy, board: WorkerBoard | None = None) -> None:
        self.config = config
        self.policy = policy
        self.board = board if board is not None else WorkerBoard(config.limits.max_associations, 1)
        self.pending = PendingConnections(pending_cap(config.limits))
        self.archive = Archive(config)
        self.receiver = Receiver(self.archive.storage, config.store.min_free_space)
        self.ae = self._build_ae()
        self.servers: list[_NodeServer] = []
        self._listening = False
        self.access = AccessRules(config)
        # Built here so a certificate problem stops the node before it listens.
        self.tls_context = server_context(config.tls) if config.tls.enabled else None
        self._contexts: dict[int, tuple[Profile, list[PresentationContext]]] = {}
        self._lock = threading.Lock()
        self._per_assoc: dict[int, dict[str, Any]] = {}

    def _build_ae(self) -> AE:
        ae = new_ae(self.config)
        ae.maximum_associations = _PYNETDICOM_LIMIT_OFF
        # The real contexts are chosen per caller in on_requested. pynetdicom deep-copies the
        # AE's list for every association, so keep that list to one context.
        ae.add_supported_context(VERIFICATION)
        # Found by dicomnode.receive's hook through the receiving thread's association.
        ae.dicomnode_receiver = self.receiver  # type: ignore[attr-defined]
        # Found by dicomnode.retrieve's service class through the requesting association.
        ae.dicomnode_node = self  # type: ignore[attr-defined]
        return ae

    # --- per-association state used by the handlers ---------------------------------------

    def calling_ae_title(self, assoc: Any) -> str:
        title = assoc.requestor.ae_title or ""
        if not title and assoc.requestor.primitive is not None:
            title = assoc.requestor.primitive.calling_ae_title or ""
        return str(title).strip()

    def profile_for(self, calling_ae_title: str) -> Profile:
        return self.policy.profile(calling_ae_title, self.config.services_for(calling_ae_title))

    def contexts_for(self, profile: Profile) -> list[PresentationContext]:
        """pynetdicom contexts for ``profile``, built once (negotiation only reads them)."""
        with self._lock:
            cached = self._contexts.get(id(profile))
            if cached is None:
                contexts = []
                for accepted in profile.classes.values():
                    cx = build_context(accepted.sop_class, list(accepted.transfer_syntaxes))
                    cx.scu_role = accepted.scu_role
                    cx.scp_role = accepted.scp_role
                    contexts.append(cx)
                cached = self._contexts[id(profile)] = (profile, contexts)
        return cached[1]

    def remember_decisions(self, assoc: Any, decisions: list[Decision]) -> None:
        with self._lock:
            self._per_assoc.setdefault(id(assoc), {})["decisions"] = decisions

    def decisions(self, assoc: Any) -> list[Decision]:
        with self._lock:
            return list(self._per_assoc.get(id(assoc), {}).get("decisions", []))

    def count(self, assoc: Any, what: str) -> None:
        with self._lock:
            state = self._per_assoc.setdefault(id(assoc), {})
            state.setdefault("counts", Counter())[what] += 1

    def forget(self, assoc: Any) -> Counter[str]:
        with self._lock:
            state = self._per_assoc.pop(id(assoc), {})
        counts: Counter[str] = state.get("counts", Counter())
        return counts

    # --- running ----------------------------------------------------------------------------

    def _handlers(self) -> list[Any]:
        # The node-wide limit is checked after the policy, and a closed connection frees its
        # place before its closing line is logged.
        bound: list[tuple[Any, Callable[..., Any]]] = [
            (evt.EVT_CONN_OPEN, assoc_handlers.on_conn_open),
            (evt.EVT_REQUESTED, _on_requested_within_limit),
            (evt.EVT_ACCEPTED, assoc_handlers.on_accepted),
            (evt.EVT_REJECTED, assoc_handlers.on_rejected),
            (evt.EVT_ABORTED, assoc_handlers.on_aborted),
            (evt.EVT_CONN_CLOSE, _on_conn_close_release),
            (evt.EVT_CONN_CLOSE, assoc_handlers.on_conn_close),
            (evt.EVT_CONN_CLOSE, assoc_handlers.on_conn_close_unrequested),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store),
            (evt.EVT_C_FIND, handle_find),
            (evt.EVT_N_CREATE, handle_n_create),
            (evt.EVT_N_SET, handle_n_set),
        ]
        return [(event, handler, [self]) for event, handler in bound]

    def start(self, listeners: list[Listener] | None = None) -> list[tuple[str, int, bool]]:
        """Open the archive and serve in the background; returns (host, port, tls) of each
        listener.

        ``listeners``: sockets the supervisor bound and listens on, when this node is one worker
        of several; the supervisor has already cleared ``tmp/`` and migrated the index.
        """
        install_reactor_hooks()
        install_receive_hooks()
        install_retrieve_hooks()
        # pynetdicom logs request/response identifiers (patient names, IDs) at INFO.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        self._warm_contexts()
        if listeners is None:
            self.archive.open()
            listeners = listen(self.config)
        else:
            # Never clean tmp/ here: other workers are receiving into it.
            self.archive.storage.prepare(clean=False)
            self.archive.index.open()
        for listener in listeners:
            self.servers.append(self._serve_on(listener))
        self._listening = True
        return [listener.address for listener in listeners]

    def _warm_contexts(self) -> None:
        """Build the pynetdicom contexts of every configured peer and of unknown callers now,
        not during some caller's first association (about 10 ms for the default policy)."""
        for title in ["", *(peer.ae_title for peer in self.config.peers.values())]:
            self.contexts_for(self.profile_for(title))

    def _serve_on(self, listener: Listener) -> _NodeServer:
        """What ``AE.start_server(block=False)`` does, on a socket bound and listening already."""
        server = self.ae.make_server(
            listener.sock.getsockname(),
            evt_handlers=self._handlers(),
            server_class=_NodeServer,
            ssl_context=self.tls_context if listener.tls else None,
            listener=listener,
            node=self,
        )
        name = "TLSAcceptorServer" if listener.tls else "AcceptorServer"
        thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
        thread.start()
        self.ae._servers.append(server)  # as start_server does; server.shutdown() removes it
        assert isinstance(server, _NodeServer)
        return server

    def associations(self) -> list[Any]:
        """The associations this node (this process) serves now."""
        servers = set(map(id, self.servers))
        return [
            thread
            for thread in threading.enumerate()
            if "AcceptorThread" in thread.name and id(getattr(thread, "_server", None)) in servers
        ]

    def publish_load(self, leaving: Any = None) -> int:
        """Tell the other workers how many associations this one serves (``leaving`` is ending
        and not counted); returns that number."""
        load = sum(1 for assoc in self.associations() if assoc is not leaving)
        self.board.publish_load(load)
        return load

    def tls_refused(self, client_address: Any, exc: BaseException) -> None:
        """A TLS handshake failed or timed out: no association, nothing to negotiate."""
        host, port = (*tuple(client_address), "?", "?")[:2]
        why = handshake_refusal(exc)
        log.warning("DICOM TLS connection from %s:%s refused: %s", host, port, why)
        # No A-ASSOCIATE-RQ was read, so no AE titles; no A-ASSOCIATE-RJ was sent.
        who = {"calling_ae": None, "called_ae": None, "address": host, "port": port}
        assoc_handlers.record_rejection(
            self, who, (None, None, None), f"TLS handshake failed: {why}"
        )

    def reload(self, audit: bool = True) -> bool:
        """SIGHUP: read the configuration file and its conformance policy again and use them
        for associations from now on; those in flight keep what they negotiated. A file that
        fails validation changes nothing: the error is logged and False returned.

        What the node was started with (listeners, storage, index, workers) needs a restart:
        such a change is logged and ignored until then.
        """
        old = self.config
        try:
            fresh, policy, tls_context = load_reloadable(old)
        except (ConfigError, ConformanceError, TlsError) as exc:
            log.error("configuration reload failed, keeping the running configuration: %s", exc)
            if audit:
                self.archive.audit.record(
                    "config-reload", outcome=FAILURE, source=str(old.source), error=str(exc)
                )
            return False
        with self._lock:
            self.config = fresh
            self.policy = policy
            self._contexts.clear()
        self.access = AccessRules(fresh)
        self.archive.reconfigure(fresh)
        self.receiver.min_free_space = fresh.store.min_free_space
        # Each worker reloads, so each sets the node-wide limit it checks against.
        self.board.limit = fresh.limits.max_associations
        self.pending.cap = pending_cap(fresh.limits)
        apply_limits(self.ae, fresh.limits)
        if tls_context is not None:
            self.tls_context = tls_context  # renewed certificates, for handshakes from now on
            for server in self.servers:
                if server.ssl_context is not None:
                    server.ssl_context = tls_context
        self._warm_contexts()
        self.archive.audit.reopen()  # the audit file may have been rotated away
        log.info("configuration reloaded from %s", old.source)
        if audit:
            self.archive.audit.record("config-reload", source=str(old.source), error=None)
        return True

    def stop_listening(self) -> None:
        """Accept no more connections (the first step of a stop). The servers stay in
        ``servers``: their associations are still this node's to drain."""
        if not self._listening:
            return
        self._listening = False
        for server in self.servers:
            server.shutdown()

    def drain(self, grace: float) -> int:
        """Let the associations in flight finish for up to ``grace`` seconds, then abort the
        rest; returns how many had to be aborted. A store not acknowledged by then is
        discarded by the connection-close handler, never half kept."""
        deadline = time.monotonic() + grace
        remaining = self.associations()
        if remaining:
            log.info(
                "waiting up to %.0f s for %d association(s) in flight to finish",
                grace,
                len(remaining),
            )
        while remaining and time.monotonic() < deadline:
            remaining[0].join(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            remaining = [assoc for assoc in remaining if assoc.is_alive()]
        for assoc in remaining:
            log.warning(
                "aborting the association from %s: still open %.0f s after the stop signal "
                "(service.stop_grace)",
                self.calling_ae_title(assoc),
                grace,
            )
            assoc.abort()
        for assoc in remaining:
            assoc.join(timeout=5.0)
        return len(remaining)

    def stop(self, grace: float = 0.0, record_stop: str | None = None) -> int:
        """Stop listening, drain for ``grace`` seconds, close everything; returns the number of
        associations aborted. ``record_stop``: the reason for the application-stop audit
        record (None in a worker: its supervisor records the node's stop)."""
        self.stop_listening()
        aborted = self.drain(grace)
        self.ae.shutdown()
        if record_stop is not None:
            self.archive.audit.record("application-stop", reason=record_stop, aborted=aborted)
        self.archive.close()
        return aborted


def _on_requested_within_limit(event: Any, node: Node) -> None:
    """EVT_REQUESTED: the policy decides as always, then the node-wide limit (PS3.8 9.3.4
    rejected-transient, local limit exceeded). Only now does the connection count."""
    assoc = event.assoc
    node.pending.discard(_raw_socket(assoc))
    assoc_handlers.on_requested(event, node)
    board = node.board
    if assoc.is_rejected or assoc.is_aborted or board.admit(assoc):
        return
    assoc_handlers.reject(
        node,
        assoc,
        REJECT_LOCAL_LIMIT,
        f"the node has {board.limit} associations open (limits.max_associations)",
    )


def _raw_socket(assoc: Any) -> Any:
    transport = getattr(assoc.dul, "socket", None)
    return getattr(transport, "socket", None) if transport is not None else None


def _on_conn_close_release(event: Any, node: Node) -> None:
    node.pending.discard(_raw_socket(event.assoc))
    if node.board.release(event.assoc):
        log.debug(
            "association from %s ended: %d open on the node",
            node.calling_ae_title(event.assoc),
            node.board.total(),
        )
    node.publish_load(leaving=event.assoc)


class TooManyHandshakes(OSError):
    """As many TLS handshakes are in progress as associations are allowed."""


@dataclass
class Listener:
    """A listening socket of the node: the plain DICOM port or the DICOM TLS port."""

    sock: socket.socket
    tls: bool

    @property
    def address(self) -> tuple[str, int, bool]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port), self.tls


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on a socket we bound and listen on (:func:`listen`): in a
    worker of several it is shared with the other workers, balancing accepts through the
    :class:`WorkerBoard`.

    Unlike pynetdicom's server it never blocks its accept loop on a peer: an accepted socket
    gets ``limits.network_timeout`` (pynetdicom leaves it blocking for ever, so a peer that
    stops in the middle of a PDU would hold its association, and its place under
    ``limits.max_associations``, until it closed), and a TLS handshake runs in a thread of its
    own, bounded by ``limits.acse_timeout``, instead of in ``accept``.
    """

    def __init__(self, *args: Any, listener: Listener, node: Node, **kwargs: Any) -> None:
        self._listener = listener
        self._node = node
        # Handshakes in progress at once: no more than the associations that could follow
        # them, so a flood of silent connections cannot pile up threads.
        self._handshakes = threading.BoundedSemaphore(node.config.limits.max_associations)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the unbound socket TCPServer made
        # In a worker this is its inherited copy of the supervisor's socket: closing it at stop
        # leaves the others' open.
        self.socket = self._listener.sock
        # Every worker wakes for a new connection and one wins the accept: the others must get
        # EAGAIN at once (socketserver ignores it), not wait in accept() for the next one.
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """:func:`listen` listens already."""

    def server_close(self) -> None:
        # Close this server's descriptor only: shutdown() would stop the socket listening for
        # every worker.
        if self.socket is not None:
            self.socket.close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self._node.board.workers > 1:
            delay = self._node.board.accept_delay(self._node.publish_load())
            if delay:
                time.sleep(delay)  # the server thread only: the associations run on
        assert self.socket is not None
        sock, address = self.socket.accept()
        sock.settimeout(self.ae.network_timeout)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a plain association in this thread (pynetdicom's threaded server starts a
        thread only to start the association's own): then the load counts it at once. A TLS
        connection first needs its handshake, which may take a round trip or a slow peer."""
        if isinstance(request, ssl.SSLSocket):
            if not self._handshakes.acquire(blocking=False):
                self._node.tls_refused(
                    client_address,
                    TooManyHandshakes(
                        "as many TLS handshakes in progress as limits.max_associations"
                    ),
                )
                self.shutdown_request(request)
                return
            thread = threading.Thread(
                target=self._handshake_then_serve,
                args=(request, client_address),
                name="TLSHandshake",
                daemon=True,
            )
            thread.start()
            return
        self._serve(request, client_address)

    def _serve(self, request: Any, client_address: Any) -> None:
        for evicted in self._node.pending.add(request, client_address):
            _close_waiting(*evicted, self._node.pending)
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        self._node.publish_load()

    def _handshake_then_serve(self, request: ssl.SSLSocket, client_address: Any) -> None:
        request.settimeout(self.ae.acse_timeout)
        try:
            request.do_handshake()
        except (OSError, ValueError) as exc:
            # ssl.SSLError is an OSError; a silent peer ends in TimeoutError.
            self._node.tls_refused(client_address, exc)
            self.shutdown_request(request)
            return
        finally:
            self._handshakes.release()
        request.settimeout(self.ae.network_timeout)
        self._serve(request, client_address)


Ready = Callable[[list[tuple[str, int, bool]]], None]


def serve(config: Config, policy: Policy, ready: Ready | None = None) -> int:
    """Run the node in the foreground until SIGINT or SIGTERM, reloading its configuration on
    SIGHUP; returns the exit status. ``ready`` gets (host, port, tls) of each listener.

    One process for ``workers: 1``, else a :class:`Supervisor` and its workers.
    """
    workers = config.worker_count()
    if workers > 1:
        return Supervisor(config, policy, workers).run(ready)
    return _serve_one(config, policy, ready)


def _serve_one(config: Config, policy: Policy, ready: Ready | None = None) -> int:
    """A single-process node until SIGINT or SIGTERM."""
    node = Node(config, policy)
    addresses = node.start()
    signals = _Signals()
    announce(config, addresses, node.archive.audit, workers=1)
    if ready is not None:
        ready(addresses)
    reason = "error"
    try:
        while True:
            received = signals.wait()
            stop = received & set(_STOP_SIGNALS)
            if stop:
                reason = _signal_names(stop)
                log.info("signal %s: stopping", reason)
                break
            if signal.SIGHUP in received:
                service.reloading()
                node.reload()
                service.ready(_status(node.config, addresses))
    finally:
        service.stopping(f"stopping ({reason})")
        node.stop(node.config.service.stop_grace, record_stop=reason)
        log.info("%s stopped", config.ae_title)
    # Associations aborted at the end of the grace are the configured stop, not a failure
    # (systemd would mark the unit failed after every stop while a scanner idles connected).
    return 0


def announce(
    config: Config, addresses: list[tuple[str, int, bool]], audit: AuditLog, workers: int
) -> None:
    """The node serves: log it, audit it, tell systemd."""
    where = ", ".join(
        f"{host}:{port}{' (DICOM TLS)' if tls else ''}" for host, port, tls in addresses
    )
    log.info(
        "%s listening on %s (storage %s, index %s%s)",
        config.ae_title,
        where,
        config.storage_dir,
        config.database,
        f", {workers} worker processes" if workers > 1 else "",
    )
    plain = [port for _, port, tls in addresses if not tls]
    secure = [port for _, port, tls in addresses if tls]
    audit.record(
        "application-start",
        ae_title=config.ae_title,
        host=config.host,
        port=plain[0] if plain else None,
        tls_port=secure[0] if secure else None,
        workers=workers,
    )
    service.ready(_status(config, addresses))


def _status(config: Config, addresses: list[tuple[str, int, bool]]) -> str:
    where = ", ".join(f"{port}{'/tls' if tls else ''}" for _, port, tls in addresses)
    return f"{config.ae_title} listening on port {where}"


class _Signals:
    """Waits in the main thread for SIGTERM, SIGINT or SIGHUP in a process with threads.

    The kernel hands a process's signal to any thread that does not block it. Python runs its
    handler only in the main thread, and only once that thread runs again: a main thread asleep
    in ``Event.wait()`` stays asleep when another thread caught the signal. So the handler does
    nothing and the signal's number, which the C-level handler writes to the wakeup pipe from
    whatever thread caught it, wakes the main thread's ``select``.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in _NODE_SIGNALS:
            signal.signal(sig, _ignore)

    def wait(self) -> set[int]:
        """The signals received (at least one of _NODE_SIGNALS)."""
        while True:
            select.select([self._read], [], [])
            received = _drain(self._read) & set(_NODE_SIGNALS)
            if received:
                return received

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)


def load_reloadable(running: Config) -> tuple[Config, Policy, ssl.SSLContext | None]:
    """The configuration file of ``running`` read again, its policy and TLS context, with what
    only a restart can change kept as it runs (and a warning naming each such key).

    Raises ConfigError, ConformanceError or TlsError for a file that cannot be used.
    """
    if running.source is None:
        raise ConfigError("the node runs on the built-in defaults: there is no file to reload")
    fresh = load_config(running.source)
    policy = load_policy(fresh.conformance)
    kept = {key: getattr(running, key) for key in _RESTART_KEYS}
    tls_kept = {key: getattr(running.tls, key) for key in _RESTART_TLS_KEYS}
    changed = [key for key, value in kept.items() if getattr(fresh, key) != value]
    changed += [f"tls.{key}" for key, value in tls_kept.items() if getattr(fresh.tls, key) != value]
    if changed:
        log.warning(
            "configuration reload: %s changed; that takes effect at the next restart",
            ", ".join(changed),
        )
    fresh = replace(fresh, tls=replace(fresh.tls, **tls_kept), **kept)
    tls_context = server_context(fresh.tls) if fresh.tls.enabled else None
    return fresh, policy, tls_context


# What the node was started with; a reload leaves these as they are.
_RESTART_KEYS = (
    "ae_title",
    "host",
    "port",
    "workers",
    "storage_dir",
    "database",
    "database_busy_timeout",
    "log_level",
    "audit",
)
_RESTART_TLS_KEYS = ("enabled", "port", "only")


# --- several worker processes -----------------------------------------------------------------

_PARENT_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_PID = struct.Struct("=i")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class _Worker:
    slot: int  # 0-based; logged 1-based
    pid: int
    ready: bool = False


class Supervisor:
    """The parent of a node's worker processes (``workers`` > 1): a pre-fork server.

    It does the start-up work once, before any worker exists: clears ``storage_dir/tmp`` (only
    here, or a worker would delete another's receive in flight), creates or migrates the index and
    closes it again (no SQLite connection crosses a fork), binds and listens (so ``port: 0``
    works: it learns the real port), and creates the shared association count. Then it forks the
    workers while it has no thread. It reports ready once every worker accepts; it restarts a
    worker that dies after it was ready; a worker that dies before it was ready (it could not
    start) stops the node with exit status 1. SIGTERM or SIGINT: it closes its listening
    sockets, sends each worker SIGTERM (each drains its associations for ``service.stop_grace``)
    and waits for all of them; status 0, or 1 when one had to be killed. SIGHUP: it checks the
    configuration file and, if it is usable, sends each worker SIGHUP to reload it.
    """

    # A worker still running this long after its stop_grace is killed.
    STOP_MARGIN = 15.0

    def __init__(self, config: Config, policy: Policy, workers: int) -> None:
        self.config = config
        self.policy = policy
        self.count = workers
        self.workers: dict[int, _Worker] = {}  # by pid
        self.board = WorkerBoard(config.limits.max_associations, workers)
        self.listeners: list[Listener] = []
        self.audit = AuditLog(config.audit.path if config.audit.enabled else None, config.ae_title)
        self._wake = (-1, -1)
        self._ready = (-1, -1)
        self._status = 0
        self._stopping = False
        self._stop_reason = "error"
        self._deadline: float | None = None  # stopping: when stragglers are killed

    def run(self, ready: Ready | None = None) -> int:
        if not hasattr(os, "fork"):
            raise RuntimeError("workers > 1 needs os.fork (Linux, BSD, macOS); set workers: 1")
        if self.config.tls.enabled:
            server_context(self.config.tls)  # a certificate problem stops us before any fork
        archive = Archive(self.config)
        archive.open()  # creates the folders, clears tmp/, creates or migrates the index
        archive.close()
        self.listeners = listen(self.config)
        addresses = [listener.address for listener in self.listeners]
        self._wake = os.pipe()
        for fd in self._wake:
            os.set_blocking(fd, False)
        self._ready = os.pipe()
        signal.set_wakeup_fd(self._wake[1], warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, _ignore) for sig in _PARENT_SIGNALS}
        try:
            try:
                for slot in range(self.count):
                    self._spawn(slot)
                self._supervise(ready, addresses)
            except BaseException:
                # Whatever went wrong here, no worker is left behind.
                if self.workers:
                    self._status = 1
                    self._stop("error")
                    self._supervise(None, addresses)
                raise
        finally:
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (*self._wake, *self._ready):
                os.close(fd)
            self._close_listeners()
            self.audit.record("application-stop", reason=self._stop_reason, status=self._status)
            self.audit.close()
        log.info("%s stopped", self.config.ae_title)
        return self._status

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.sock.close()
        self.listeners = []

    # --- the parent -------------------------------------------------------------------------

    def _supervise(self, ready: Ready | None, addresses: list[tuple[str, int, bool]]) -> None:
        announced = False
        pending = b""
        while self.workers:
            timeout = None
            if self._stopping and self._deadline is not None:
                timeout = max(0.0, self._deadline - time.monotonic())
            readable, _, _ = select.select([self._wake[0], self._ready[0]], [], [], timeout)
            if self._wake[0] in readable:
                received = _drain(self._wake[0])
                if not self._stopping and any(sig in received for sig in _STOP_SIGNALS):
                    reason = _signal_names(received)
                    log.info("signal %s: stopping the workers", reason)
                    self._stop(reason)
                elif not self._stopping and signal.SIGHUP in received:
                    self._reload(addresses)
            if self._ready[0] in readable:
                pending += os.read(self._ready[0], 4096)
                while len(pending) >= _PID.size:
                    (pid,) = _PID.unpack(pending[: _PID.size])
                    pending = pending[_PID.size :]
                    if pid in self.workers:
                        self.workers[pid].ready = True
                        log.debug("worker %d (pid %d) ready", self.workers[pid].slot + 1, pid)
            self._reap()
            if (
                self._stopping
                and self.workers
                and self._deadline is not None
                and time.monotonic() >= self._deadline
            ):
                self._kill_stragglers()
            if not announced and not self._stopping and self._all_ready():
                announced = True
                announce(self.config, addresses, self.audit, self.count)
                if ready is not None:
                    ready(addresses)

    def _reload(self, addresses: list[tuple[str, int, bool]]) -> None:
        """SIGHUP: check the file here (so a bad one is reported once and no worker sees it),
        then let each worker read it again."""
        service.reloading()
        source = str(self.config.source)
        try:
            fresh, policy, _ = load_reloadable(self.config)
        except (ConfigError, ConformanceError, TlsError) as exc:
            log.error("configuration reload failed, keeping the running configuration: %s", exc)
            self.audit.record("config-reload", outcome=FAILURE, source=source, error=str(exc))
        else:
            self.config, self.policy = fresh, policy  # for workers started from now on
            for pid in self.workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
            self.audit.reopen()
            log.info("configuration reloaded from %s; the workers read it again", source)
            self.audit.record("config-reload", source=source, error=None)
        service.ready(_status(self.config, addresses))

    def _all_ready(self) -> bool:
        return len(self.workers) == self.count and all(w.ready for w in self.workers.values())

    def _reap(self) -> None:
        for pid, worker in list(self.workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            del self.workers[pid]
            self.board.reset(worker.slot)
            how = _describe_exit(status)
            if self._stopping:
                log.debug("worker %d (pid %d) stopped (%s)", worker.slot + 1, pid, how)
                if os.waitstatus_to_exitcode(status) != 0 and self._status == 0:
                    self._status = 1
            elif not worker.ready:
                log.error(
                    "worker %d (pid %d) ended (%s) before it could serve; stopping the node "
                    "(see its messages above)",
                    worker.slot + 1,
                    pid,
                    how,
                )
                self._status = 1
                self._stop("a worker could not start")
            else:
                log.warning(
                    "worker %d (pid %d) ended unexpectedly (%s); starting a new one",
                    worker.slot + 1,
                    pid,
                    how,
                )
                self._spawn(worker.slot)

    def _stop(self, reason: str) -> None:
        self._stopping = True
        self._stop_reason = reason
        service.stopping(f"stopping ({reason})")
        # No new connection waits in a backlog that no worker will accept from.
        self._close_listeners()
        self._deadline = time.monotonic() + self.config.service.stop_grace + self.STOP_MARGIN
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _kill_stragglers(self) -> None:
        for pid, worker in self.workers.items():
            log.error(
                "worker %d (pid %d) did not stop within %.0f s; killing it",
                worker.slot + 1,
                pid,
                self.config.service.stop_grace + self.STOP_MARGIN,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._status = 1
        self._deadline = None  # SIGKILL cannot be ignored: wait for the exits

    def _spawn(self, slot: int) -> None:
        if threading.active_count() != 1:
            # fork() copies only the calling thread; a lock another thread held stays held.
            raise RuntimeError("the supervisor must not run threads before it forks")
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        # Signals wait until the worker has its own handlers (and the parent its bookkeeping).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    status = self._worker(slot, parent, mask)
                finally:
                    os._exit(status)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.workers[pid] = _Worker(slot, pid)
        log.info("worker %d started (pid %d)", slot + 1, pid)

    # --- a worker ---------------------------------------------------------------------------

    def _worker(self, slot: int, parent: int, mask: Iterable[int]) -> int:
        """The body of a worker process (never returns to the caller's stack: see _spawn)."""
        signal.set_wakeup_fd(-1)
        for fd in (*self._wake, self._ready[0]):
            os.close(fd)
        service.forget()
        signals = _Signals()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _die_with_parent(parent)
        _tag_log_lines()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            self.board.slot = slot
            node = Node(self.config, self.policy, self.board)
            node.start(self.listeners)
        except BaseException:
            log.exception("worker %d could not start", slot + 1)
            return 1
        try:
            os.write(self._ready[1], _PID.pack(os.getpid()))
            log.debug("worker %d serving", slot + 1)
            while True:
                received = signals.wait()
                if received & set(_STOP_SIGNALS):
                    break
                if signal.SIGHUP in received:
                    node.reload(audit=False)  # the supervisor audits the reload once
        finally:
            node.stop(node.config.service.stop_grace)
        return 0


def listen(config: Config) -> list[Listener]:
    """The node's listening sockets: the plain port (unless ``tls.only``) and the DICOM TLS
    port (with ``tls.enabled``)."""
    ports = [] if config.tls.only else [(config.port, False)]
    if config.tls.enabled:
        ports.append((config.tls.port, True))
    listeners: list[Listener] = []
    try:
        for port, tls in ports:
            listeners.append(Listener(_listen(config.host, port, config.limits), tls))
    except OSError:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def _listen(host: str, port: int, limits: Limits) -> socket.socket:
    """A listening socket, bound as pynetdicom's server binds its own."""
    info = AddressInformation.from_tuple((host, port))
    sock = socket.socket(info.address_family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Connections wait here until accepted; past the association limit they are accepted
        # and rejected, so a backlog of the limit is plenty.
        sock.listen(max(5, limits.max_associations))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the signal's number is read from the wakeup pipe instead."""


def _drain(fd: int) -> set[int]:
    received: set[int] = set()
    while True:
        try:
            chunk = os.read(fd, 512)
        except BlockingIOError:
            return received
        if not chunk:
            return received
        received.update(chunk)


def _signal_names(received: set[int]) -> str:
    return "/".join(signal.Signals(sig).name for sig in _STOP_SIGNALS if sig in received)


def _describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _die_with_parent(parent: int) -> None:
    """Linux: this worker gets SIGTERM when the supervisor dies, even by SIGKILL, so no orphan
    keeps serving the port. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _WorkerFormatter(logging.Formatter):
    """A handler's own format, with this worker's process id after the logger name
    (``dicomnode.archive[12345]``, as syslog writes ``program[pid]``)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.tag = f"[{os.getpid()}]"

    def format(self, record: logging.LogRecord) -> str:
        tagged = copy.copy(record)
        tagged.name = f"{record.name}{self.tag}"
        return self.inner.format(tagged)


def _tag_log_lines() -> None:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_WorkerFormatter(handler.formatter))
