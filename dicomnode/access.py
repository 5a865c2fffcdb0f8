"""Who may associate from where: a configured peer's AE title counts only from its addresses.

An AE title is a name a caller chooses, not a credential (PS3.15 has no AE-title
authentication): a peer entry is matched on the Calling AE Title together with the caller's IP
address, from ``peers.NAME.hosts`` (default: the peer's ``host``). Entries are IP addresses,
networks in CIDR form, or host names, resolved here once, when the node starts or reloads, so
that no association waits on DNS and a name that stops resolving is logged once.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable

from dicomnode.config import Config, Peer

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], Iterable[str]]


def resolve(name: str) -> list[str]:
    """The IPv4 and IPv6 addresses of host ``name``."""
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class AccessRules:
    """The networks each configured peer may call from."""

    def __init__(self, config: Config, resolver: Resolver = resolve) -> None:
        self._networks: dict[str, list[Network]] = {}
        for peer in config.peers.values():
            self._networks[peer.name] = _networks(peer, resolver)

    def allowed_from(self, peer: Peer, address: str) -> bool:
        """Whether ``address`` (the caller's IP address as the socket gives it) is one of the
        peer's; unknown or unparsable addresses are not."""
        ip = _address(address)
        if ip is None:
            return False
        return any(
            ip.version == net.version and ip in net for net in self._networks.get(peer.name, [])
        )


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone index
    except ValueError:
        return None
    # A dual-stack listener sees IPv4 callers as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _networks(peer: Peer, resolver: Resolver) -> list[Network]:
    networks: list[Network] = []
    for entry in peer.allowed_hosts:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        try:
            addresses = list(resolver(entry))
        except OSError as exc:
            log.warning(
                "peers.%s.hosts: cannot resolve %r (%s); the peer cannot call from it",
                peer.name,
                entry,
                exc,
            )
            continue
        for address in addresses:
            ip = _address(address)
            if ip is not None:
                networks.append(ipaddress.ip_network(ip))
    return networks
