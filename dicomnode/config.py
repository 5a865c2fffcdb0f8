"""The node's configuration: one YAML file loaded into one typed, validated object.

Every default is declared once, in the dataclasses below; ``config/dicomnode.yaml`` is the commented
reference and must agree with them (a test checks it). Loading never has side effects: nothing is
created or opened here.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

CONFIG_ENV = "DICOMNODE_CONFIG"

# ``workers: auto``: one worker process per CPU this process may run on, at most this many. Past
# a handful of processes the single SQLite writer and the disk's fsyncs set the pace, and each
# worker costs its own memory (about 80 MiB).
AUTO_WORKERS_MAX = 8
WORKERS_MAX = 64


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key and what is allowed."""


class Service(StrEnum):
    """What a calling peer may ask of this node (PS3.4 service classes, by their everyday names)."""

    ECHO = "echo"
    STORE = "store"
    FIND = "find"
    MOVE = "move"
    GET = "get"
    WORKLIST = "worklist"
    MPPS = "mpps"


class WorklistScope(StrEnum):
    """Which scheduled steps a worklist query that names no Scheduled Station AE Title sees.

    ``all``: every step (PS3.4 K.6: an empty key matches everything). ``own``: only the steps
    scheduled for the caller's own AE title, so a scanner that asks for "everything" gets its
    own schedule, as most RIS gateways do. A query that gives a station AE title value is always
    matched on it as given.
    """

    ALL = "all"
    OWN = "own"


class ClientCertificates(StrEnum):
    """Whether DICOM TLS callers must present a certificate signed by ``tls.ca_certificates``.

    ``required`` (PS3.15 B.9 expects both ends authenticated; DCMTK's default), ``optional``
    (verified when presented), ``none`` (never asked for: encryption without client identity).
    """

    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


class AtLimit(StrEnum):
    """What a store does when ``store.max_size`` is reached.

    ``refuse``: answer A700 (out of resources) until space is freed; ``recycle``: remove the
    studies received longest ago until the new instance fits, as Orthanc's recycling does.
    """

    REFUSE = "refuse"
    RECYCLE = "recycle"


class DuplicatePolicy(StrEnum):
    """What to do with a SOP Instance UID we already hold, received again with different content.

    Identical content is always a no-op success. ``keep`` (the default, as Orthanc) answers success
    and keeps the first copy; ``replace`` stores the new copy and indexes it in place of the old;
    ``reject`` answers a failure status. Each case is logged at WARNING.
    """

    KEEP = "keep"
    REPLACE = "replace"
    REJECT = "reject"


# PS3.5 6.2: AE titles are at most 16 characters of the Default Character Repertoire, without
# backslash or control characters; leading and trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def valid_ae_title(value: str) -> bool:
    """True when ``value`` is a usable AE title (PS3.5 6.2 AE value representation)."""
    return bool(_AE_TITLE.fullmatch(value)) and bool(value.strip())


@dataclass(frozen=True)
class Peer:
    """A known remote node: where to reach it and what it may ask of us."""

    name: str
    ae_title: str
    host: str
    port: int
    services: frozenset[Service] = frozenset()
    # Peer names this peer may C-MOVE to; None: any configured peer.
    move_destinations: frozenset[str] | None = None
    # Its worklist queries without a station AE title key; None: worklist.default_scope.
    worklist_scope: WorklistScope | None = None
    # Where its associations may come from: IP addresses, networks (CIDR) or host names; None:
    # only from ``host``. An AE title alone is not a credential.
    hosts: tuple[str, ...] | None = None
    # Our SCU commands call it over DICOM TLS (with tls.certificate as our client certificate).
    tls: bool = False

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        return self.hosts if self.hosts is not None else (self.host,)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Limits:
    """Association limits (PS3.8 9.3: the PDU size we announce; ACSE/DIMSE/network timeouts)."""

    max_associations: int = 16
    # The largest P-DATA-TF PDU we announce in A-ASSOCIATE-AC (PS3.8 D.1). Larger PDUs mean fewer
    # round trips per instance; 0 would mean "unlimited", which we do not allow.
    max_pdu_size: int = 262144
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0


@dataclass(frozen=True)
class StoreSettings:
    """How received instances are kept."""

    duplicates: DuplicatePolicy = DuplicatePolicy.KEEP
    # Refuse stores (status A700) before writing when the storage filesystem has less free space.
    min_free_space: int = 100 * 1024**2
    # The most the stored instances may take, in bytes; 0: no quota (only min_free_space).
    max_size: int = 0
    # At max_size: refuse the store (A700), or recycle (remove the oldest studies).
    at_limit: AtLimit = AtLimit.REFUSE


@dataclass(frozen=True)
class QuerySettings:
    """How C-FIND matches and answers (PS3.4 C.2.2.2, C.4.1)."""

    # PS3.4 C.2.2.2.1: whether person names match case-sensitively is the SCP's choice; most
    # users expect "doe*" to find "DOE^JOHN".
    case_sensitive_names: bool = False
    # A query with more matches than this is refused with A700 before any match is sent, so a
    # client never takes a silently cut list for the whole answer.
    max_matches: int = 10000


@dataclass(frozen=True)
class WorklistSettings:
    """Modality Worklist items held in the index (PS3.4 K.6) and how queries see them."""

    # Items scheduled more than this many days ago (by Scheduled Procedure Step Start Date, else
    # when they were added) are removed: at start-up, by the worklist commands, and at most
    # hourly while queries come in. 0 keeps every item until it is removed by hand.
    expire_after_days: int = 30
    # Steps whose status is COMPLETED (set by MPPS, or imported so) are left out of answers
    # unless the query asks for ScheduledProcedureStepStatus by value.
    hide_completed: bool = True
    # For callers whose peer entry sets no worklist_scope, and unknown callers.
    default_scope: WorklistScope = WorklistScope.ALL


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (PS3.15 B.9, BCP 195): a second listener, beside the plain one or instead of it,
    and what our SCU commands present to peers configured with ``tls: true``."""

    enabled: bool = False
    port: int = 2762  # IANA "dicom-tls"
    # No plain listener: every association must come over TLS.
    only: bool = False
    # PEM files; relative paths resolve against the configuration file's folder.
    certificate: Path | None = None
    private_key: Path | None = None
    # The CAs that sign our peers' certificates (client certificates here, servers' for our SCU).
    ca_certificates: Path | None = None
    client_certificates: ClientCertificates = ClientCertificates.REQUIRED
    # The lowest TLS version accepted or offered: BCP 195 forbids below 1.2.
    min_version: str = "1.2"


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail (see dicomnode.audit): security-relevant events as JSON lines."""

    enabled: bool = True
    path: Path = Path("var/audit.jsonl")


@dataclass(frozen=True)
class ServiceSettings:
    """Running as a service: how it stops."""

    # After SIGTERM no association is accepted; those in flight may finish for this many seconds
    # and are then aborted (an unacknowledged store is discarded, never half kept).
    stop_grace: float = 30.0


@dataclass(frozen=True)
class Config:
    """Everything the node needs to run; see ``config/dicomnode.yaml`` for each key's meaning."""

    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens on the LAN by design
    port: int = 11112
    # How many processes serve associations on the one listening port: an integer, or "auto" (see
    # worker_count). With 1 the node is one process, as before workers existed.
    workers: int | Literal["auto"] = "auto"
    storage_dir: Path = Path("var/storage")
    database: Path = Path("var/index.sqlite")
    # How long a write to the index waits for the lock another process holds (a backup, an
    # sqlite3 shell) before the store fails with A701, out of resources (never success without
    # its row).
    database_busy_timeout: float = 10.0
    # The conformance YAML that drives presentation-context negotiation; None: the built-in default
    # (every standard storage SOP class and Verification, in every transfer syntax we can store).
    conformance: Path | None = None
    log_level: str = "INFO"
    peers: Mapping[str, Peer] = field(default_factory=dict)
    # What a calling AE title that matches no peer may ask of us.
    unknown_peers: frozenset[Service] = frozenset({Service.ECHO, Service.STORE})
    # Reject associations whose Called AE Title is not ae_title (PS3.8 7.1.1.4; A-ASSOCIATE-RJ
    # reason 7). Off by default as in Orthanc and storescp: many modalities send a generic one.
    require_called_ae_title: bool = False
    limits: Limits = field(default_factory=Limits)
    store: StoreSettings = field(default_factory=StoreSettings)
    query: QuerySettings = field(default_factory=QuerySettings)
    worklist: WorklistSettings = field(default_factory=WorklistSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    # The file this was loaded from, if any (for messages and for resolving relative paths).
    source: Path | None = None

    def worker_count(self) -> int:
        """The number of worker processes to run: ``workers``, with ``auto`` resolved to the CPUs
        this process may use (its affinity mask), at most :data:`AUTO_WORKERS_MAX` and at most
        ``limits.max_associations`` (a worker beyond that could never hold an association)."""
        if self.workers != "auto":
            return self.workers
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, AUTO_WORKERS_MAX, self.limits.max_associations))

    def peer_by_ae_title(self, ae_title: str) -> Peer | None:
        """The configured peer whose AE title is ``ae_title`` (surrounding spaces ignored)."""
        wanted = ae_title.strip()
        for peer in self.peers.values():
            if peer.ae_title == wanted:
                return peer
        return None

    def may_move_to(self, calling_ae_title: str, destination: Peer) -> bool:
        """Whether a caller may send a C-MOVE's instances to ``destination`` (a configured
        peer): a peer's move_destinations decide; unknown callers allowed the move service may
        move to any configured peer."""
        caller = self.peer_by_ae_title(calling_ae_title)
        if caller is None or caller.move_destinations is None:
            return True
        return destination.name in caller.move_destinations

    def worklist_scope_for(self, calling_ae_title: str) -> WorklistScope:
        """Which steps a caller's worklist queries without a station AE title key see."""
        peer = self.peer_by_ae_title(calling_ae_title)
        if peer is not None and peer.worklist_scope is not None:
            return peer.worklist_scope
        return self.worklist.default_scope

    def services_for(self, calling_ae_title: str) -> frozenset[Service]:
        """What a caller presenting ``calling_ae_title`` may ask of us."""
        peer = self.peer_by_ae_title(calling_ae_title)
        return peer.services if peer is not None else self.unknown_peers


# --- loading ---------------------------------------------------------------------------------

T = TypeVar("T")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Reader:
    """Reads one mapping of the YAML, naming each key in full in every error."""

    def __init__(self, data: Any, where: str, prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a mapping")
        self.data: dict[str, Any] = data
        self.where = where
        self.prefix = prefix

    def fail(self, key: str, allowed: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.where}: key '{self.prefix}{key}': {allowed}, got {value!r}")

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                raise ConfigError(
                    f"{self.where}: unknown key '{self.prefix}{key}'; allowed here: "
                    + ", ".join(allowed)
                )

    def get(self, key: str, default: T, convert: Callable[[Any], T | None], allowed: str) -> T:
        if key not in self.data:
            return default
        value = self.data[key]
        result = convert(value)
        if result is None:
            raise self.fail(key, allowed, value)
        return result

    def sub(self, key: str) -> _Reader:
        return _Reader(self.data.get(key) or {}, self.where, f"{self.prefix}{key}.")


def _int_in(low: int, high: int) -> Callable[[Any], int | None]:
    def convert(value: Any) -> int | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return value if ok else None

    return convert


def _positive_seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 86400:
        return float(value)
    return None


def _workers(value: Any) -> int | Literal["auto"] | None:
    if value == "auto":
        return "auto"
    return _int_in(1, WORKERS_MAX)(value)


def _ae_title(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and valid_ae_title(value) else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?$")


def _hosts(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not value:
        return None
    hosts: list[str] = []
    for item in value:
        if not isinstance(item, str):
            return None
        text = item.strip()
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            if not _HOST_NAME.fullmatch(text):
                return None
        hosts.append(text)
    return tuple(hosts)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def parse_size(value: Any) -> int | None:
    """Bytes from an integer or a string such as ``500MB`` or ``2 GiB``; None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    match = _SIZE.fullmatch(value)
    if not match:
        return None
    unit = (match.group(2) or "B").lower()
    return round(float(match.group(1)) * _SIZE_UNITS[unit])


def _services(value: Any) -> frozenset[Service] | None:
    if not isinstance(value, list):
        return None
    try:
        return frozenset(Service(item) for item in value)
    except ValueError:
        return None


E = TypeVar("E", bound=StrEnum)


def _enum(kind: type[E]) -> Callable[[Any], E | None]:
    def convert(value: Any) -> E | None:
        try:
            return kind(value)
        except ValueError:
            return None

    return convert


def _path_against(base: Path) -> Callable[[Any], Path | None]:
    def convert(value: Any) -> Path | None:
        if not isinstance(value, str) or not value.strip():
            return None
        path = Path(value).expanduser()
        # normpath, not resolve: "config/../var" reads as "var" in logs, symlinks stay as given.
        return Path(os.path.normpath(path if path.is_absolute() else base / path))

    return convert


_SECONDS = "seconds, above 0 and at most 86400"
_AE_ALLOWED = "an AE title of 1-16 characters, no backslash or control characters"
_SERVICES_ALLOWED = "a list of " + ", ".join(s.value for s in Service)
_TOP_KEYS = tuple(f.name for f in fields(Config) if f.name != "source")


def _one_of(kind: type[StrEnum]) -> str:
    """What an enumerated key allows, for its error message."""
    return "one of " + ", ".join(member.value for member in kind)


_SCOPES_ALLOWED = _one_of(WorklistScope)


def _peers(reader: _Reader) -> dict[str, Peer]:
    peers: dict[str, Peer] = {}
    raw = reader.data.get("peers") or {}
    if not isinstance(raw, dict):
        raise reader.fail("peers", "must be a mapping of peer name to settings", raw)
    for name, settings in raw.items():
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
            raise reader.fail("peers", "peer names are 1-64 letters, digits, '_', '.', '-'", name)
        sub = _Reader(settings, reader.where, f"peers.{name}.")
        sub.check_keys(
            (
                "ae_title",
                "host",
                "port",
                "services",
                "move_destinations",
                "worklist_scope",
                "hosts",
                "tls",
            )
        )
        for required in ("ae_title", "host", "port"):
            if required not in sub.data:
                raise ConfigError(f"{reader.where}: key 'peers.{name}.{required}' is required")
        peers[name] = Peer(
            name=name,
            ae_title=sub.get("ae_title", "", _ae_title, _AE_ALLOWED),
            host=sub.get("host", "", _text, "a host name or address"),
            port=sub.get("port", 0, _int_in(1, 65535), "a port number from 1 to 65535"),
            services=sub.get("services", frozenset(), _services, _SERVICES_ALLOWED),
            move_destinations=sub.get(
                "move_destinations",
                None,
                lambda v: (
                    frozenset(v)
                    if isinstance(v, list) and all(isinstance(x, str) for x in v)
                    else None
                ),
                "a list of peer names",
            ),
            worklist_scope=sub.get("worklist_scope", None, _enum(WorklistScope), _SCOPES_ALLOWED),
            hosts=sub.get(
                "hosts",
                None,
                _hosts,
                "a non-empty list of IP addresses, networks such as 10.1.2.0/24, or host names",
            ),
            tls=sub.get("tls", False, _bool, "true or false"),
        )
    for peer in peers.values():
        unknown = sorted((peer.move_destinations or frozenset()) - set(peers))
        if unknown:
            raise ConfigError(
                f"{reader.where}: key 'peers.{peer.name}.move_destinations': {unknown} are not "
                f"configured peers; allowed: {', '.join(sorted(peers))}"
            )
    titles = [p.ae_title for p in peers.values()]
    duplicated = sorted({t for t in titles if titles.count(t) > 1})
    if duplicated:
        raise ConfigError(
            f"{reader.where}: key 'peers': AE titles must be unique, {duplicated} appear twice"
        )
    return peers


def parse_config(data: Any, base_dir: Path, where: str = "config") -> Config:
    """Validate ``data`` (the parsed YAML) into a :class:`Config`.

    Relative paths resolve against ``base_dir`` (the configuration file's folder).
    """
    if data is None:
        data = {}
    top = _Reader(data, where)
    top.check_keys(_TOP_KEYS)
    d = Config()
    path = _path_against(base_dir)
    limits = top.sub("limits")
    limits.check_keys(tuple(f.name for f in fields(Limits)))
    dl = Limits()
    store = top.sub("store")
    store.check_keys(tuple(f.name for f in fields(StoreSettings)))
    ds = StoreSettings()
    query = top.sub("query")
    query.check_keys(tuple(f.name for f in fields(QuerySettings)))
    dq = QuerySettings()
    worklist = top.sub("worklist")
    worklist.check_keys(tuple(f.name for f in fields(WorklistSettings)))
    dw = WorklistSettings()
    tls = _tls(top.sub("tls"), path)
    audit = top.sub("audit")
    audit.check_keys(tuple(f.name for f in fields(AuditSettings)))
    da = AuditSettings()
    service = top.sub("service")
    service.check_keys(tuple(f.name for f in fields(ServiceSettings)))
    dv = ServiceSettings()
    port = top.get("port", d.port, _int_in(0, 65535), "a port number from 0 to 65535")
    if tls.enabled and port != 0 and tls.port == port:
        raise ConfigError(f"{where}: key 'tls.port': must differ from port ({port})")
    return Config(
        ae_title=top.get("ae_title", d.ae_title, _ae_title, _AE_ALLOWED),
        host=top.get("host", d.host, _text, "a host name or address to listen on"),
        port=port,
        workers=top.get(
            "workers", d.workers, _workers, f"auto or an integer from 1 to {WORKERS_MAX}"
        ),
        storage_dir=top.get("storage_dir", base_dir / d.storage_dir, path, "a folder path"),
        database=top.get("database", base_dir / d.database, path, "a file path"),
        database_busy_timeout=top.get(
            "database_busy_timeout", d.database_busy_timeout, _positive_seconds, _SECONDS
        ),
        conformance=top.get("conformance", d.conformance, path, "a file path"),
        log_level=top.get(
            "log_level",
            d.log_level,
            lambda v: v.upper() if isinstance(v, str) and v.upper() in _LOG_LEVELS else None,
            "one of " + ", ".join(_LOG_LEVELS),
        ),
        peers=_peers(top),
        unknown_peers=top.get("unknown_peers", d.unknown_peers, _services, _SERVICES_ALLOWED),
        require_called_ae_title=top.get(
            "require_called_ae_title", d.require_called_ae_title, _bool, "true or false"
        ),
        limits=Limits(
            max_associations=limits.get(
                "max_associations", dl.max_associations, _int_in(1, 1000), "an integer 1-1000"
            ),
            max_pdu_size=limits.get(
                "max_pdu_size",
                dl.max_pdu_size,
                _int_in(4096, 16 * 1024**2),
                "an integer from 4096 to 16777216 (bytes)",
            ),
            acse_timeout=limits.get("acse_timeout", dl.acse_timeout, _positive_seconds, _SECONDS),
            dimse_timeout=limits.get(
                "dimse_timeout", dl.dimse_timeout, _positive_seconds, _SECONDS
            ),
            network_timeout=limits.get(
                "network_timeout", dl.network_timeout, _positive_seconds, _SECONDS
            ),
        ),
        store=StoreSettings(
            duplicates=store.get(
                "duplicates",
                ds.duplicates,
                _enum(DuplicatePolicy),
                _one_of(DuplicatePolicy),
            ),
            min_free_space=store.get(
                "min_free_space",
                ds.min_free_space,
                parse_size,
                "a size in bytes, or with a unit such as 500MB or 2GiB",
            ),
            max_size=store.get(
                "max_size",
                ds.max_size,
                parse_size,
                "a size in bytes, or with a unit such as 500GB or 2TiB; 0 for no quota",
            ),
            at_limit=store.get(
                "at_limit",
                ds.at_limit,
                _enum(AtLimit),
                _one_of(AtLimit),
            ),
        ),
        query=QuerySettings(
            case_sensitive_names=query.get(
                "case_sensitive_names",
                dq.case_sensitive_names,
                lambda v: v if isinstance(v, bool) else None,
                "true or false",
            ),
            max_matches=query.get(
                "max_matches", dq.max_matches, _int_in(1, 10_000_000), "an integer 1-10000000"
            ),
        ),
        worklist=WorklistSettings(
            expire_after_days=worklist.get(
                "expire_after_days",
                dw.expire_after_days,
                _int_in(0, 36500),
                "a number of days from 0 (never) to 36500",
            ),
            hide_completed=worklist.get(
                "hide_completed",
                dw.hide_completed,
                lambda v: v if isinstance(v, bool) else None,
                "true or false",
            ),
            default_scope=worklist.get(
                "default_scope", dw.default_scope, _enum(WorklistScope), _SCOPES_ALLOWED
            ),
        ),
        tls=tls,
        audit=AuditSettings(
            enabled=audit.get("enabled", da.enabled, _bool, "true or false"),
            path=audit.get("path", base_dir / da.path, path, "a file path"),
        ),
        service=ServiceSettings(
            stop_grace=service.get(
                "stop_grace",
                dv.stop_grace,
                lambda v: _positive_seconds(v) if v != 0 else 0.0,
                "seconds from 0 (abort at once) to 86400",
            ),
        ),
    )


_TLS_VERSIONS = ("1.2", "1.3")


def _tls(reader: _Reader, path: Callable[[Any], Path | None]) -> TlsSettings:
    reader.check_keys(tuple(f.name for f in fields(TlsSettings)))
    d = TlsSettings()
    tls = TlsSettings(
        enabled=reader.get("enabled", d.enabled, _bool, "true or false"),
        port=reader.get("port", d.port, _int_in(0, 65535), "a port number from 0 to 65535"),
        only=reader.get("only", d.only, _bool, "true or false"),
        certificate=reader.get("certificate", d.certificate, path, "a PEM file path"),
        private_key=reader.get("private_key", d.private_key, path, "a PEM file path"),
        ca_certificates=reader.get("ca_certificates", d.ca_certificates, path, "a PEM file path"),
        client_certificates=reader.get(
            "client_certificates",
            d.client_certificates,
            _enum(ClientCertificates),
            _one_of(ClientCertificates),
        ),
        min_version=reader.get(
            "min_version",
            d.min_version,
            lambda v: str(v) if str(v) in _TLS_VERSIONS else None,
            "one of " + ", ".join(_TLS_VERSIONS) + " (BCP 195: nothing older than TLS 1.2)",
        ),
    )
    if tls.only and not tls.enabled:
        raise reader.fail("only", "needs tls.enabled: true (else nothing would listen)", True)
    if tls.enabled:
        for key in ("certificate", "private_key"):
            if getattr(tls, key) is None:
                raise ConfigError(f"{reader.where}: key 'tls.{key}' is required with tls.enabled")
        if tls.client_certificates != ClientCertificates.NONE and tls.ca_certificates is None:
            raise ConfigError(
                f"{reader.where}: key 'tls.ca_certificates' is required unless "
                "tls.client_certificates is none (it verifies the callers' certificates)"
            )
    return tls


def read_yaml(path: Path, what: str, error: type[ValueError]) -> Any:
    """The YAML document in ``path``; ``error`` with a message saying what is wrong otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    except UnicodeError as exc:
        raise error(f"{path}: the {what} must be UTF-8 text: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc


def load_config(path: Path | str | None = None) -> Config:
    """Load the configuration from ``path``, else ``$DICOMNODE_CONFIG``, else the defaults.

    With neither, relative paths resolve against the current folder.
    """
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        path = Path(env) if env else None
    if path is None:
        return parse_config({}, Path.cwd(), "defaults")
    path = Path(path)
    data = read_yaml(path, "configuration", ConfigError)
    config = parse_config(data, path.resolve().parent, str(path))
    return replace(config, source=path.resolve())


_ADDRESS = re.compile(
    r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$"
)


def resolve_peer(config: Config, text: str) -> Peer:
    """A peer named in the configuration, or one written as ``AET@host:port``.

    Raises :class:`ConfigError` with what is allowed when ``text`` is neither.
    """
    if text in config.peers:
        return config.peers[text]
    match = _ADDRESS.match(text)
    if match:
        aet, host, port = match.group("aet"), match.group("host"), int(match.group("port"))
        if valid_ae_title(aet) and 1 <= port <= 65535:
            return Peer(name=text, ae_title=aet.strip(), host=host.strip("[]"), port=port)
    known = ", ".join(sorted(config.peers)) or "none configured"
    raise ConfigError(
        f"peer {text!r}: give a configured peer name ({known}) or AET@host:port "
        "(AE title of 1-16 characters, port 1-65535)"
    )
