"""Telling the service manager what the node is doing: systemd's notify protocol (sd_notify).

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a Unix datagram socket (a path, or an
abstract name written with a leading ``@``). Each message is newline-separated ``KEY=VALUE``
assignments: ``READY=1`` once the node accepts associations, ``RELOADING=1`` with
``MONOTONIC_USEC`` while it reloads its configuration (then ``READY=1`` again), ``STOPPING=1``
when it begins to stop, ``STATUS=`` a line for ``systemctl status``. Without the variable, or
when the socket cannot be reached, every call is a no-op: the node runs the same in a terminal.
No library is needed for a datagram of a few bytes.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(**fields: str | int) -> bool:
    """Send ``fields`` (``READY=1`` as ``notify(READY=1)``); True when a manager got them."""
    target = os.environ.get(NOTIFY_SOCKET, "")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.debug("cannot notify the service manager at %s: %s", target, exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify(READY=1, STATUS=status)


def reloading() -> bool:
    # systemd (Type=notify-reload, 253+) wants the time the reload began, on CLOCK_MONOTONIC.
    return notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


def stopping(status: str) -> bool:
    return notify(STOPPING=1, STATUS=status)


def forget() -> None:
    """In a worker process: only the main process (the supervisor) speaks to the manager
    (``NotifyAccess=main``), so a worker drops the socket from its environment."""
    os.environ.pop(NOTIFY_SOCKET, None)
