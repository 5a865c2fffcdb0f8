"""Builds and serves the Application Entity: configuration and policy in, a listening node out."""

from __future__ import annotations

import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.archive import Archive
from dicomnode.config import Config
from dicomnode.handlers import association as assoc_handlers
from dicomnode.handlers.echo import handle_echo
from dicomnode.handlers.find import handle_find
from dicomnode.handlers.store import handle_store
from dicomnode.identity import new_ae
from dicomnode.policy import Decision, Policy, Profile
from dicomnode.receive import Receiver, install_receive_hooks
from dicomnode.retrieve import install_retrieve_hooks

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 A.4 Verification SOP Class


class Node:
    """One running node: its AE, archive, receiver and policy."""

    def __init__(self, config: Config, policy: Policy) -> None:
        self.config = config
        self.policy = policy
        self.archive = Archive(config)
        self.receiver = Receiver(self.archive.storage, config.store.min_free_space)
        self.ae = self._build_ae()
        self.server: ThreadedAssociationServer | None = None
        self._contexts: dict[int, tuple[Profile, list[PresentationContext]]] = {}
        self._lock = threading.Lock()
        self._per_assoc: dict[int, dict[str, Any]] = {}

    def _build_ae(self) -> AE:
        ae = new_ae(self.config)
        ae.maximum_associations = self.config.limits.max_associations
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
        bound: list[tuple[Any, Callable[..., Any]]] = [
            (evt.EVT_CONN_OPEN, assoc_handlers.on_conn_open),
            (evt.EVT_REQUESTED, assoc_handlers.on_requested),
            (evt.EVT_ACCEPTED, assoc_handlers.on_accepted),
            (evt.EVT_REJECTED, assoc_handlers.on_rejected),
            (evt.EVT_ABORTED, assoc_handlers.on_aborted),
            (evt.EVT_CONN_CLOSE, assoc_handlers.on_conn_close),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store),
            (evt.EVT_C_FIND, handle_find),
        ]
        return [(event, handler, [self]) for event, handler in bound]

    def start(self) -> tuple[str, int]:
        """Open the archive and start listening in the background; returns (host, port)."""
        install_receive_hooks()
        install_retrieve_hooks()
        # pynetdicom logs request/response identifiers (patient names, IDs) at INFO.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        self.archive.open()
        server = self.ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=self._handlers(),
        )
        assert server is not None  # block=False always returns the server
        self.server = server
        host, port = server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()
        self.archive.close()


def serve(config: Config, policy: Policy, ready: Callable[[str, int], None] | None = None) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM."""
    node = Node(config, policy)
    host, port = node.start()
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log.info(
        "%s listening on %s:%d (storage %s, index %s)",
        config.ae_title,
        host,
        port,
        config.storage_dir,
        config.database,
    )
    if ready is not None:
        ready(host, port)
    try:
        stop.wait()
    finally:
        node.stop()
        log.info("%s stopped", config.ae_title)
