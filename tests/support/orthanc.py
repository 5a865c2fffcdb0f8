"""Run Orthanc as a real DICOM peer in tests, driven through its REST API.

:func:`orthanc` starts the ``Orthanc`` server (Debian package ``orthanc``, 1.10.x) in the
foreground with a JSON configuration of our own, on two free loopback ports (DICOM and HTTP),
its storage and SQLite index under a work folder; it yields an :class:`OrthancEndpoint` once both
the DICOM port listens and ``GET /system`` answers, and stops the server afterwards (SIGTERM,
then SIGKILL after a bounded wait). The endpoint's helpers use only the standard library.

What matters in the configuration (Orthanc 1.10 names):

- ``DicomAet``/``DicomPort``/``HttpPort``: who and where. 1.10 has no bind address option: both
  servers listen on every interface (0.0.0.0). ``RemoteAccessAllowed: false`` makes the HTTP
  server answer loopback clients only; the DICOM port stays open to all, harmless in a test.
- ``DicomModalities``: the peers Orthanc may call (C-ECHO/C-FIND/C-MOVE/C-STORE SCU, and the
  only valid C-MOVE destinations): ``{"name": [AET, host, port]}``. More can be added while it
  runs with :meth:`OrthancEndpoint.add_modality` (``PUT /modalities/{name}``, kept in memory).
- ``DicomCheckCalledAet: false`` (any called AE title is accepted) and ``DicomAlwaysAllowEcho``/
  ``Store``/``Find``/``Move``/``Get``: what callers that are not in ``DicomModalities`` may do.
  Orthanc's defaults allow only echo and store; here every service is allowed, a test peer.
- ``AcceptedTransferSyntaxes: ["1.2.840.10008.1.*"]`` (every syntax DCMTK knows, the default)
  and ``UnknownSopClassAccepted: false`` (the default: only storage SOP classes it knows).
- ``Plugins: []`` so that no plugin of the Debian packages is loaded; no Explorer, no WebDAV,
  no saved jobs, no fsync, no storage compression.

How Orthanc 1.10 behaves, as seen from these tests:

- Received over C-STORE, an instance gets a File Meta group of Orthanc's own (DCMTK's
  Implementation Class UID ``1.2.276.0.7230010.3.0.3.6.7``, ``OFFIS_DCMTK_367``); the data set is
  DCMTK's re-encoding of what arrived: byte for byte the same for most files, but sequences and
  items of undefined length are written with explicit lengths. ``POST /instances`` keeps the
  uploaded file byte for byte. As C-STORE SCU (``store_to``, its C-MOVE SCP) it also drops
  Data Set Trailing Padding (FFFC,FFFC) and sends sequences with explicit lengths.
- A SOP Instance UID it already holds: C-STORE answers success and the new copy is discarded
  (``OverwriteInstances: false``); ``POST /instances`` says ``AlreadyStored``.
- A service a caller may not use (e.g. C-FIND from an AE title not in ``DicomModalities`` with
  ``DicomAlwaysAllowFind: false``): the association is accepted, then the request gets no
  response and the association is aborted.
- Storage transfer syntaxes: every one DCMTK 3.6.7 knows (uncompressed, deflated, JPEG, JPEG-LS,
  JPEG 2000, RLE, MPEG-2/4, HEVC, JPIP); HTJ2K, encapsulated uncompressed and SMPTE ST 2110 are
  rejected.
- SIGTERM stops it cleanly in about 3 s (its servers poll once a second); start-up to a served
  ``/system`` takes about 0.1 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest

from tests.support.dcmtk import LOOPBACK, Endpoint, ServerDidNotStart, free_port

# The Debian package installs the server as /usr/sbin/Orthanc, which is not on a normal user's
# PATH; $ORTHANC names another binary.
DEFAULT_BINARY = "/usr/sbin/Orthanc"
READY_TIMEOUT = 20.0
# On SIGTERM Orthanc stops its HTTP server, DICOM server and jobs engine one after the other,
# each polling about once a second: a clean stop takes about 3 s.
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 60.0
# Talks to the loopback directly, whatever http_proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Levels of /tools/find and of C-FIND queries, as Orthanc spells them.
LEVELS = ("Patient", "Study", "Series", "Instance")


class OrthancError(RuntimeError):
    """A REST call answered with an HTTP error; ``body`` is Orthanc's JSON error, if any."""

    def __init__(self, method: str, url: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {url}: HTTP {status}: {body}")
        self.status = status
        self.body = body


class QueryAnswers(NamedTuple):
    """The result of a C-FIND that Orthanc ran as SCU (``/modalities/{name}/query``)."""

    id: str  # the query's identifier under /queries, for :meth:`OrthancEndpoint.modality_move`
    answers: list[dict[str, Any]]  # one per matching C-FIND response, tags by keyword


def orthanc_binary() -> str | None:
    """The Orthanc server binary: ``$ORTHANC``, else ``Orthanc`` on PATH, else the Debian path."""
    named = os.environ.get("ORTHANC")
    candidate = (shutil.which(named) or named) if named else shutil.which("Orthanc")
    candidate = candidate or DEFAULT_BINARY
    return candidate if os.access(candidate, os.X_OK) else None


def require_orthanc() -> str:
    """The binary to run; skips the calling test when there is none (fails it when ``$CI`` is
    set, as ``require_dcmtk`` does)."""
    binary = orthanc_binary()
    if binary is None:
        named = os.environ.get("ORTHANC")
        message = (
            f"Orthanc not found: $ORTHANC={named} is not an executable"
            if named
            else f"Orthanc not installed (no Orthanc on PATH, no {DEFAULT_BINARY}); install it"
            " (apt-get install orthanc; scripts/test does so as root)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@dataclass
class OrthancEndpoint:
    """A running Orthanc: where it answers, and small REST helpers (``path`` starts with /)."""

    aet: str
    host: str
    dicom_port: int
    http_port: int
    workdir: Path
    log_path: Path
    config_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    @property
    def address(self) -> str:
        """``AET@host:port`` of its DICOM server, as ``dicomnode`` accepts for a peer."""
        return f"{self.aet}@{self.host}:{self.dicom_port}"

    @property
    def dicom(self) -> Endpoint:
        """Its DICOM server as the DCMTK helpers describe a peer."""
        return Endpoint(self.aet, self.host, self.dicom_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    # --- raw REST -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> tuple[str, bytes]:
        """One HTTP request: the answer's content type and bytes. ``body`` is sent as is when
        bytes (as application/dicom), else as JSON; None sends no body."""
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data: bytes | None = None
        headers = {}
        if isinstance(body, bytes):
            data = body
            headers["Content-Type"] = "application/dicom"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with _OPENER.open(req, timeout=timeout) as response:
                content: bytes = response.read()
                return response.headers.get_content_type(), content
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                detail: Any = json.loads(raw)
            except ValueError:
                detail = raw.decode(errors="replace")
            raise OrthancError(method, url, error.code, detail) from None

    def get(self, path: str, **params: str) -> Any:
        """``GET path``: JSON decoded, text as str; keyword arguments make the query string
        (``expand=""`` for a bare ``?expand``)."""
        return _decode(*self.request("GET", path, params=params))

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path)[1]

    def post(self, path: str, body: Any = None, *, timeout: float = HTTP_TIMEOUT) -> Any:
        """``POST path`` with ``body`` as JSON (default ``{}``) or raw bytes; decoded as by
        :meth:`get`."""
        return _decode(*self.request("POST", path, {} if body is None else body, timeout=timeout))

    def put(self, path: str, body: Any) -> Any:
        return _decode(*self.request("PUT", path, body))

    def delete(self, path: str) -> Any:
        return _decode(*self.request("DELETE", path))

    # --- what it holds --------------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/system")
        return result

    def patients(self) -> list[str]:
        """Orthanc identifiers of every patient it holds (not DICOM UIDs)."""
        return list(self.get("/patients"))

    def studies(self) -> list[str]:
        return list(self.get("/studies"))

    def series(self) -> list[str]:
        return list(self.get("/series"))

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (``/instances/{id}/simplified-tags``)."""
        result: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return result

    def file(self, instance_id: str) -> bytes:
        """The Part 10 file Orthanc keeps for an instance (``/instances/{id}/file``)."""
        return self.get_bytes(f"/instances/{instance_id}/file")

    def instance_ids(self) -> dict[str, str]:
        """Every instance it holds: SOP Instance UID -> Orthanc identifier."""
        found = self.find("Instance", {}, expand=True)
        return {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in found}

    def find(self, level: str, query: Mapping[str, str], *, expand: bool = False) -> list[Any]:
        """A search in its own index (``POST /tools/find``): identifiers, or with ``expand``
        the resources' descriptions. ``query`` maps tag keywords to C-FIND-like patterns."""
        _check_level(level)
        body = {"Level": level, "Query": dict(query), "Expand": expand}
        return list(self.post("/tools/find", body))

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a Part 10 file through REST (``POST /instances``): its ``ID`` and ``Status``
        (``Success`` or ``AlreadyStored``)."""
        result: dict[str, Any] = self.post("/instances", path.read_bytes())
        return result

    def clear(self) -> None:
        """Delete every patient, hence everything it holds."""
        for patient in self.patients():
            self.delete(f"/patients/{patient}")

    # --- Orthanc as SCU against a peer of DicomModalities ---------------------------------

    def add_modality(self, name: str, aet: str, host: str, port: int, **options: Any) -> None:
        """Declare (or change) a peer while running (``PUT /modalities/{name}``); ``options``
        are Orthanc's per-modality keys, e.g. ``AllowMove=False``."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port, **options})

    def modalities(self) -> list[str]:
        return list(self.get("/modalities"))

    def echo(self, modality: str, *, timeout: float | None = None) -> None:
        """Orthanc's C-ECHO SCU to a peer; raises :class:`OrthancError` unless it succeeded."""
        self.post(f"/modalities/{modality}/echo", _with_timeout({}, timeout))

    def modality_find(
        self,
        modality: str,
        level: str,
        query: Mapping[str, str],
        *,
        normalize: bool = True,
        timeout: float | None = None,
    ) -> QueryAnswers:
        """Orthanc's C-FIND SCU against a peer (``POST /modalities/{name}/query``), and the
        answers (``GET /queries/{id}/answers?expand&simplify``). Return keys the peer should
        fill in go in ``query`` with an empty value."""
        _check_level(level)
        body = {"Level": level, "Query": dict(query), "Normalize": normalize}
        started = self.post(f"/modalities/{modality}/query", _with_timeout(body, timeout))
        query_id = str(started["ID"])
        answers = self.get(f"/queries/{query_id}/answers", expand="", simplify="")
        return QueryAnswers(query_id, list(answers))

    def modality_move(
        self,
        query_id: str,
        *,
        target_aet: str | None = None,
        answer: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Orthanc's C-MOVE SCU for the answers of an earlier :meth:`modality_find` (all of
        them, or the one at index ``answer``), synchronously: the call returns once the move has
        ended. The destination is ``target_aet`` (default: Orthanc itself, a plain retrieve)."""
        body: dict[str, Any] = {"Synchronous": True}
        if target_aet is not None:
            body["TargetAet"] = target_aet
        path = f"/queries/{query_id}/retrieve"
        if answer is not None:
            path = f"/queries/{query_id}/answers/{answer}/retrieve"
        return self.post(path, _with_timeout(body, timeout), timeout=HTTP_TIMEOUT * 5)

    def move_from(
        self,
        modality: str,
        level: str,
        identifiers: Sequence[Mapping[str, str]],
        *,
        target_aet: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Orthanc's C-MOVE SCU without an earlier C-FIND (``POST /modalities/{name}/move``):
        one C-MOVE per identifier (e.g. ``{"StudyInstanceUID": uid}``; at Series/Instance level
        with the UIDs of the levels above), to ``target_aet`` (default: Orthanc itself). Returns
        once every move has ended."""
        _check_level(level)
        body: dict[str, Any] = {"Level": level, "Resources": [dict(i) for i in identifiers]}
        if target_aet is not None:
            body["TargetAet"] = target_aet
        return self.post(
            f"/modalities/{modality}/move", _with_timeout(body, timeout), timeout=HTTP_TIMEOUT * 5
        )

    def store_to(
        self, modality: str, resource_ids: Sequence[str], *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Orthanc's C-STORE SCU: send patients/studies/series/instances (Orthanc identifiers)
        to a peer, synchronously; the job's result (``InstancesCount``,
        ``FailedInstancesCount``, ...)."""
        body = {"Resources": list(resource_ids), "Synchronous": True}
        result: dict[str, Any] = self.post(
            f"/modalities/{modality}/store", _with_timeout(body, timeout), timeout=HTTP_TIMEOUT * 5
        )
        return result


@contextmanager
def orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    verbose: bool = True,
    attempts: int = 5,
    ready_timeout: float = READY_TIMEOUT,
) -> Iterator[OrthancEndpoint]:
    """Run Orthanc until the block ends, storing under ``workdir``; yield once it serves.

    ``modalities`` are its DICOM peers, ``{"name": (AET, host, port)}``; ``config_overrides``
    replace top-level keys of the generated configuration. Free ports are chosen, and fresh ones
    tried when Orthanc exits before serving (someone took a port in between). A ``workdir``
    used again keeps what the previous run stored. Its log goes to
    ``workdir/orthanc.log`` (``--verbose`` unless ``verbose=False``); a server that never
    comes up raises :class:`ServerDidNotStart` with that log.
    """
    binary = require_orthanc()
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("storage", "index", "tmp"):
        (workdir / sub).mkdir(exist_ok=True)
    log_path = workdir / "orthanc.log"
    config_path = workdir / "orthanc.json"
    if {"DicomPort", "HttpPort"} & set(config_overrides or {}):
        attempts = 1  # a port of the caller's: trying again would not help
    last_error = ""
    for _ in range(attempts):
        name = f"dicomnode-test-{uuid.uuid4().hex[:12]}"
        config = _config(workdir, name, aet, free_port(), free_port(), modalities or {})
        config.update(config_overrides or {})  # may fix the ports, or the Name
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        argv = [binary, *(["--verbose"] if verbose else []), str(config_path)]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        endpoint = OrthancEndpoint(
            aet=config["DicomAet"],
            host=LOOPBACK,
            dicom_port=config["DicomPort"],
            http_port=config["HttpPort"],
            workdir=workdir,
            log_path=log_path,
            config_path=config_path,
            proc=proc,
        )
        try:
            if _await_ready(endpoint, config["Name"], ready_timeout):
                yield endpoint
                return
            last_error = (
                f"Orthanc exited with {proc.returncode} before serving DICOM on"
                f" {endpoint.dicom_port} and HTTP on {endpoint.http_port}"
            )
        finally:
            _stop(proc)
    log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
    raise ServerDidNotStart(f"{last_error}\n{log_text}")


def _config(
    workdir: Path,
    name: str,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: Mapping[str, tuple[str, str, int]],
) -> dict[str, Any]:
    return {
        "Name": name,  # /system reports it: proves the HTTP port is this very process
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "TemporaryDirectory": str(workdir / "tmp"),
        "StorageCompression": False,
        "SyncStorageArea": False,
        "Plugins": [],
        "LuaScripts": [],
        "ConcurrentJobs": 2,
        "SaveJobs": False,
        "JobsHistorySize": 100,  # synchronous REST jobs need a history
        # HTTP: loopback clients only (1.10 still listens on every interface), no password.
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpDescribeErrors": True,
        "HttpCompressionEnabled": False,
        # DICOM
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomModalities": {key: list(value) for key, value in modalities.items()},
        "DicomModalitiesInDatabase": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomCheckModalityHost": False,
        "DicomEchoChecksFind": False,
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
        "UnknownSopClassAccepted": False,
        "SynchronousCMove": True,
        "DicomScpTimeout": 30,
        "DicomScuTimeout": 10,
        "OverwriteInstances": False,
        "DeidentifyLogs": False,  # the log shows C-FIND/C-MOVE identifiers as received
    }


def _await_ready(endpoint: OrthancEndpoint, name: str, timeout: float) -> bool:
    """True once the process listens on the DICOM port and its REST API answers ``/system``
    with our ``Name``; False if it exited first. Bounded polling, 5 ms growing to 100 ms, waiting
    on the process in between so an early exit (port taken, bad configuration) is seen at once.
    """
    proc = endpoint.proc
    deadline = time.monotonic() + timeout
    interval = 0.005
    while True:
        if proc.poll() is not None:
            return False
        if _listens(proc.pid, endpoint.dicom_port) and _serves(endpoint, name):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerDidNotStart(
                f"Orthanc (pid {proc.pid}) did not serve DICOM on {endpoint.dicom_port} and HTTP"
                f" on {endpoint.http_port} within {timeout} s\n{endpoint.log()}"
            )
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=min(interval, remaining))
        interval = min(interval * 2, 0.1)


def _listens(pid: int, port: int) -> bool:
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def _serves(endpoint: OrthancEndpoint, name: str) -> bool:
    try:
        system = json.loads(endpoint.request("GET", "/system", timeout=2.0)[1])
    except (OSError, OrthancError, ValueError):
        return False
    return bool(system.get("Name") == name)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")


def _with_timeout(body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    return body if timeout is None else {**body, "Timeout": timeout}


def _decode(content_type: str, content: bytes) -> Any:
    if content_type == "application/json":
        return json.loads(content)
    if content_type.startswith("text/"):
        return content.decode()
    return content
