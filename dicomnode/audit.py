"""The audit trail: security-relevant events, one JSON object a line, appended to their own file.

In the spirit of DICOM PS3.15 A.5 (audit trail messages) and IHE ATNA: who did what, from where,
to which data, with what outcome. Unlike the operational log (stderr, journald), this file may
hold identifiers (study UIDs, patient IDs of deleted data): it is written with mode 0640 and is
meant to be read by those who may see them.

Every record is one ``write()`` of one line to a descriptor opened with ``O_APPEND``, so lines
from several threads and several worker processes never interleave or overwrite one another
(POSIX appends are atomic with respect to the file offset). The file is never truncated or
rewritten by the node; rotate it with logrotate's ``copytruncate`` or by renaming it and sending
SIGHUP (the node reopens the file on reload).

Durability: a record is in the kernel once ``record`` returns, so it survives the node crashing
or being killed. Records of events that change or move data, or change the node
(:data:`SYNCED_EVENTS`), are also flushed to disk (``fdatasync``) before ``record`` returns, so a
power failure cannot lose them after the data they describe was acknowledged; that flush also
carries every earlier record. Per-request reads and association records (``query``,
``association-accepted``, ``association-rejected``) are not flushed one by one: they are the
high-volume events (a modality polling its worklist, a viewer's series-level queries, a caller
refused in a loop), a flush costs 0.2-0.4 ms on an SSD and several on a disk, and the kernel
writes them out within its writeback interval (about 30 s) or with the next flushed record.
IHE ATNA's own transports (syslog over TLS or UDP, RFC 5425/5426) promise no more than that.

Event names (``event``), in PS3.15 A.5.3 terms:
- ``application-start``, ``application-stop``: Application Activity
- ``association-accepted``, ``association-rejected``: Security Alert / User Authentication
- ``instances-stored``: DICOM Instances Transferred (per association and study)
- ``query``: Query (C-FIND, Modality Worklist)
- ``retrieve``: DICOM Instances Transferred (C-MOVE, C-GET), from us to a destination
- ``delete``: DICOM Study Deleted (by the delete command, or by storage recycling)
- ``config-reload``: Security Alert (software configuration)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUCCESS = "success"
FAILURE = "failure"  # PS3.15 A.5.3 EventOutcomeIndicator: minor/serious failure

# Flushed to disk record by record (see the module's docstring).
SYNCED_EVENTS = frozenset(
    {
        "application-start",
        "application-stop",
        "config-reload",
        "instances-stored",
        "retrieve",
        "delete",
    }
)
# Bits the file never keeps: nobody but its owner and group reads the audit trail.
_OTHERS = 0o007


def status_code(status: int) -> str:
    """A DIMSE status as audit records write it: ``"0xA700"``, as PS3.7 Annex C prints it."""
    return f"0x{int(status):04X}"


class AuditLog:
    """Appends audit records to ``path``; with ``path`` None every call is a no-op.

    Nothing is opened until the first record (or :meth:`open`), so building one has no side
    effect. A record that cannot be written is logged at ERROR and dropped: the audit trail
    must not stop the node from serving.
    """

    def __init__(self, path: Path | None, node: str = "") -> None:
        self.path = path
        self.node = node
        self._fd = -1
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def open(self) -> None:
        """Open (creating the file and its folder if need be); idempotent."""
        if self.path is None:
            return
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> None:
        if self._fd >= 0 or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            mode = os.fstat(fd).st_mode
            if mode & _OTHERS:
                # A file made by someone else (or before a umask was set) that others may read.
                os.fchmod(fd, mode & 0o7777 & ~_OTHERS)
                log.warning(
                    "audit log %s was readable by others; now mode 0%o", self.path, mode & 0o770
                )
        except OSError as exc:
            log.warning("audit log %s: cannot check its permissions: %s", self.path, exc)
        self._fd = fd

    def reopen(self) -> None:
        """Close and open again: after the file was renamed away for rotation."""
        with self._lock:
            self._close_locked()
            with contextlib.suppress(OSError):
                self._open_locked()

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def record(self, event: str, outcome: str = SUCCESS, **fields: Any) -> None:
        """Append one record: time (UTC, ISO 8601), event, outcome, node, pid, then ``fields``
        (values JSON can hold; anything else is written as its ``str``). Events in
        :data:`SYNCED_EVENTS` are on disk when this returns."""
        if self.path is None:
            return
        entry: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "event": event,
            "outcome": outcome,
            "node": self.node,
            "pid": os.getpid(),
        }
        entry.update(fields)
        line = json.dumps(entry, ensure_ascii=False, default=str, separators=(",", ":")) + "\n"
        # A peer-sent value may hold a lone surrogate (undecodable bytes); never fail on it.
        data = line.encode("utf-8", errors="backslashreplace")
        with self._lock:
            try:
                self._open_locked()
                written = os.write(self._fd, data)
                if written != len(data):  # a full disk; never leave half a line unmarked
                    os.write(self._fd, b"\n")
                    raise OSError(f"short write ({written} of {len(data)} bytes)")
                if event in SYNCED_EVENTS:
                    _sync(self._fd)
            except OSError as exc:
                log.error("audit log %s: cannot write a %s record: %s", self.path, event, exc)


# fdatasync where there is one (the file's size is data it must flush; its times are not).
_sync = getattr(os, "fdatasync", os.fsync)
