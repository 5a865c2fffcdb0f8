"""scripts/install and systemd/dicomnode.service: the unit passes systemd-analyze verify, and the
install script lays the service out, runs again without changing anything, keeps a changed
configuration, and uninstalls without touching the data.

Two real installs (each a full pip install of a copy of this checkout into a new venv):
  staged:  --root DIR with every default, as a package build would; nothing outside DIR.
  direct:  as root into temporary folders, as an existing unprivileged user (no user is made on
           this machine), owners and modes set; its unit names real paths, so systemd-analyze
           verify checks its ExecStart.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomnode.status import Status
from tests.support.node import _await_listening

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# The service venv's Python: not one under /root or /home (the unit's ProtectHome= hides them).
SYSTEM_PYTHON = Path("/usr/bin/python3")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# What the service layout is, as the unit and the installed configuration must name it.
DEFAULT_EXEC = "/opt/dicomnode/venv/bin/dicomnode --config /etc/dicomnode/dicomnode.yaml serve"


def need_system_python() -> None:
    usable = SYSTEM_PYTHON.exists() and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"],
        capture_output=True,
    )
    if not usable or usable.returncode != 0:
        pytest.skip(f"no {SYSTEM_PYTHON} (3.11 or later, with venv and ensurepip) for the venv")


def need_systemd_analyze() -> str:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return SYSTEMD_ANALYZE


@dataclass
class Install:
    checkout: Path  # the copy of this checkout the script ran from
    root: Path  # --root, or / for the direct install
    base: Path  # the test's folder: the checkout and what was installed
    args: tuple[str, ...]  # the options it ran with
    output: str  # what its first run printed

    def run(self, *extra: str) -> str:
        return run_install(self.checkout, *self.args, *extra)

    def path(self, inside: str) -> Path:
        """A path as the service sees it, where it is on this machine."""
        return self.root / inside.lstrip("/")


def run_install(checkout: Path, *args: str) -> str:
    done = subprocess.run(
        ["bash", str(checkout / "scripts" / "install"), "--python", str(SYSTEM_PYTHON), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"scripts/install {' '.join(args)} failed:\n{output}"
    return output


def copy_checkout(target: Path) -> Path:
    """What scripts/install reads, copied, so that edits to the working tree during the test
    (or between its runs) change nothing, and the script is shown not to need this folder."""
    for part in ("pyproject.toml", "README.md", "dicomnode", "config", "systemd", "scripts"):
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, target / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / part)
    return target


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Install:
    need_system_python()
    base = tmp_path_factory.mktemp("staged")
    checkout = copy_checkout(base / "checkout")
    root = base / "root"
    root.mkdir()
    args = ("--root", str(root))
    return Install(checkout, root, base, args, run_install(checkout, *args))


# An unprivileged account every Debian system has ("nobody" is refused by systemd-analyze as
# unsafe for a service, and rightly).
SERVICE_USER = "daemon"


@pytest.fixture(scope="module")
def direct() -> Iterator[Install]:
    need_system_python()
    if os.geteuid() != 0:
        pytest.skip("the direct install sets owners: needs root")
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pytest.skip(f"no user {SERVICE_USER} to run the service as")
    # Not under pytest's temporary folders, which only root may enter: the service user must
    # reach the venv, the configuration and the state folders, as it would under /opt and /etc.
    base = Path(tempfile.mkdtemp(prefix="dicomnode-install-"))
    base.chmod(0o755)
    try:
        yield from _direct(base)
    finally:
        shutil.rmtree(base)


def _direct(base: Path) -> Iterator[Install]:
    checkout = copy_checkout(base / "checkout")
    args = (
        *("--prefix", str(base / "opt")),
        *("--unit-dir", str(base / "units")),
        *("--config-dir", str(base / "etc")),
        *("--state-dir", str(base / "state")),
        *("--log-dir", str(base / "log")),
        *("--user", SERVICE_USER),
    )
    yield Install(checkout, Path("/"), base, args, run_install(checkout, *args))


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int, int]]:
    """Every path under root with its mode, owner, group, size and modification time."""
    seen = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        seen[str(path)] = (info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns)
    return seen


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def unit_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def verify(unit: Path) -> None:
    """systemd-analyze verify: exit status 0 and not a word about our unit (it prints warnings,
    e.g. an unknown setting or a missing binary, and may exit 0 anyway)."""
    done = subprocess.run(
        [need_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    ours = [line for line in output.splitlines() if "dicomnode" in line]
    assert ours == []


def load_installed_config(venv_python: Path, config: Path) -> dict[str, object]:
    """The installed configuration as the installed node reads it."""
    code = (
        "import json, sys\n"
        "from dicomnode.config import load_config\n"
        "from dicomnode.policy import load_policy\n"
        "c = load_config(sys.argv[1])\n"
        "print(json.dumps({'storage_dir': str(c.storage_dir), 'database': str(c.database),\n"
        "    'audit': str(c.audit.path), 'conformance': str(c.conformance),\n"
        "    'workers': c.workers, 'peers': sorted(c.peers), 'port': c.port}))\n"
    )
    done = subprocess.run(
        [venv_python, "-c", code, config], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded: dict[str, object] = json.loads(done.stdout)
    return loaded


# --- the unit file --------------------------------------------------------------------------------


def test_unit_as_staged_verifies_and_is_hardened(staged: Install, tmp_path: Path) -> None:
    unit = staged.path("/etc/systemd/system/dicomnode.service")
    lines = unit_lines(unit)
    assert f"ExecStart={DEFAULT_EXEC}" in lines
    for setting in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
        "Restart=on-failure",
        "User=dicomnode",
        "Group=dicomnode",
        "StateDirectory=dicomnode",
        "LogsDirectory=dicomnode",
        "ConfigurationDirectory=dicomnode",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ProtectHome=true",
        "PrivateTmp=true",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ):
        assert setting in lines
    # The stop timeout covers the node's own grace for open associations (service.stop_grace,
    # 30 s by default) with room to close the index.
    timeout = next(int(line.split("=")[1]) for line in lines if line.startswith("TimeoutStopSec="))
    assert timeout >= 30 + 15
    # Every setting says why it is there: it has a comment right above it, or is one of a run
    # of settings that has (User= and Group=, the ProtectKernel*= group, ...).
    text = unit.read_text().splitlines()
    for i, line in enumerate(text):
        if line and not line.startswith(("#", "[")):
            above = i - 1
            while text[above] and not text[above].startswith(("#", "[")):
                above -= 1
            assert text[above].startswith("#"), f"no comment says why: {line}"
    # systemd-analyze checks that ExecStart exists: the same unit with it under --root.
    copy = tmp_path / "dicomnode.service"
    copy.write_text(unit.read_text().replace("ExecStart=/", f"ExecStart={staged.root}/", 1))
    verify(copy)
    # Its own summary of the sandbox: the exposure level (0 to 10, lower is better; 1.7 when
    # written) must not creep up. --threshold is that level times 10.
    done = subprocess.run(
        [need_systemd_analyze(), "security", "--offline=true", "--threshold=25", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-600:] + done.stderr


def test_unit_in_the_repository_is_the_default_layout(staged: Install) -> None:
    """With every default the install script writes the repository's unit as it is."""
    unit = staged.path("/etc/systemd/system/dicomnode.service")
    assert unit.read_bytes() == (REPO / "systemd" / "dicomnode.service").read_bytes()


def test_unit_of_the_direct_install_verifies(direct: Install) -> None:
    base = direct.base
    unit = base / "units" / "dicomnode.service"
    lines = unit_lines(unit)
    assert f"ExecStart={base}/opt/venv/bin/dicomnode --config {base}/etc/dicomnode.yaml serve" in (
        lines
    )
    assert f"User={SERVICE_USER}" in lines
    # Outside /var/lib and /var/log: no StateDirectory=/LogsDirectory=, the two folders made
    # writable by path instead.
    assert f"ReadWritePaths={base}/state" in lines
    assert f"ReadWritePaths={base}/log" in lines
    assert not [line for line in lines if re.match(r"(State|Logs|Configuration)Directory", line)]
    verify(unit)


# --- the staged install ---------------------------------------------------------------------------


def test_staged_install_lays_out_the_service(staged: Install) -> None:
    venv = staged.path("/opt/dicomnode/venv")
    # The program runs (its script through the staged interpreter: its #! names the target's).
    done = subprocess.run(
        [venv / "bin" / "python", venv / "bin" / "dicomnode", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dicomnode, version {VERSION}"
    assert (venv / "bin" / "dicomnode").read_text().splitlines()[0] == (
        "#!/opt/dicomnode/venv/bin/python"
    )
    # Not an editable install: the package is in the venv, not a pointer to the checkout.
    installed = list(venv.glob("lib/python3*/site-packages/dicomnode/config.py"))
    assert len(installed) == 1
    # No file anywhere names the staging folder (scripts, pyvenv.cfg, compiled modules).
    staging = str(staged.root).encode()
    naming = [p for p in staged.root.rglob("*") if p.is_file() and staging in p.read_bytes()]
    assert naming == []

    config = staged.path("/etc/dicomnode/dicomnode.yaml")
    loaded = load_installed_config(venv / "bin" / "python", config)
    assert loaded == {
        "storage_dir": "/var/lib/dicomnode/storage",
        "database": "/var/lib/dicomnode/index.sqlite",
        "audit": "/var/log/dicomnode/audit.jsonl",
        "conformance": "/etc/dicomnode/conformance.yaml",
        "workers": "auto",
        "peers": [],
        "port": 11112,
    }
    text = config.read_text()
    assert "#  PACS:" in text  # the example peer, kept commented out
    assert "../var" not in text
    conformance = staged.path("/etc/dicomnode/conformance.yaml")
    assert conformance.read_bytes() == (REPO / "config" / "conformance.yaml").read_bytes()

    for folder in ("/etc/dicomnode", "/var/lib/dicomnode", "/var/lib/dicomnode/storage"):
        assert mode(staged.path(folder)) == 0o750, folder
    assert mode(staged.path("/var/log/dicomnode")) == 0o750
    assert mode(config) == 0o640
    assert mode(staged.path("/etc/systemd/system/dicomnode.service")) == 0o644
    assert "not setting owners" in staged.output


def test_second_run_changes_nothing(staged: Install) -> None:
    before = snapshot(staged.root)
    output = staged.run()
    assert snapshot(staged.root) == before
    assert "venv: up to date" in output
    assert output.count(": unchanged") == 3  # dicomnode.yaml, conformance.yaml, the unit
    assert ".new" not in output


def test_a_changed_configuration_is_kept(staged: Install) -> None:
    config = staged.path("/etc/dicomnode/dicomnode.yaml")
    fresh = config.read_text()
    edited = fresh.replace("ae_title: DICOMNODE", "ae_title: SITE_NODE")
    assert edited != fresh
    config.write_text(edited)
    new = config.with_name("dicomnode.yaml.new")
    try:
        output = staged.run()
        assert config.read_text() == edited
        assert new.read_text() == fresh
        assert f"{config} differs from this version's: kept" in output
        # Again: nothing to do, and said so.
        before = snapshot(staged.root)
        output = staged.run()
        assert snapshot(staged.root) == before
        assert f"which is in {new} (unchanged)" in output
    finally:
        config.write_text(fresh)
        new.unlink(missing_ok=True)


def test_enable_and_uninstall_keep_the_data(staged: Install, tmp_path: Path) -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed (Debian package systemd)")
    # A copy of the staged tree, so the other tests keep theirs.
    root = tmp_path / "root"
    shutil.copytree(staged.root, root, symlinks=True)
    index = root / "var/lib/dicomnode/index.sqlite"
    index.write_bytes(b"kept")
    audit = root / "var/log/dicomnode/audit.jsonl"
    audit.write_text('{"event": "kept"}\n')
    args = ("--root", str(root))

    output = run_install(staged.checkout, *args, "--enable")
    assert "venv: up to date" in output
    wanted = root / "etc/systemd/system/multi-user.target.wants/dicomnode.service"
    assert os.readlink(wanted) == "/etc/systemd/system/dicomnode.service"

    output = run_install(staged.checkout, *args, "--uninstall")
    assert not (root / "opt/dicomnode").exists()
    assert not (root / "etc/systemd/system/dicomnode.service").exists()
    assert not wanted.is_symlink()
    assert index.read_bytes() == b"kept"
    assert audit.read_text() == '{"event": "kept"}\n'
    assert (root / "etc/dicomnode/dicomnode.yaml").read_bytes() == (
        staged.path("/etc/dicomnode/dicomnode.yaml").read_bytes()
    )
    assert (root / "etc/dicomnode/conformance.yaml").exists()
    assert "kept" in output and "/var/lib/dicomnode" in output

    # Once more: nothing left to remove, and no error.
    output = run_install(staged.checkout, *args, "--uninstall")
    assert "not there" in output


def test_uninstall_refuses_a_folder_it_did_not_make(staged: Install, tmp_path: Path) -> None:
    root = tmp_path / "root"
    precious = root / "opt" / "dicomnode" / "venv" / "precious"
    precious.parent.mkdir(parents=True)
    precious.write_text("not ours")
    done = subprocess.run(
        ["bash", str(staged.checkout / "scripts" / "install"), "--root", str(root), "--uninstall"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "not a venv made by scripts/install" in done.stderr
    assert precious.read_text() == "not ours"


# --- the direct install ---------------------------------------------------------------------------


def test_direct_install_owners_and_a_working_node(direct: Install) -> None:
    base = direct.base
    account = pwd.getpwnam(SERVICE_USER)
    for folder in ("state", "state/storage", "log"):
        info = (base / folder).stat()
        assert (info.st_uid, info.st_gid, mode(base / folder)) == (
            account.pw_uid,
            account.pw_gid,
            0o750,
        ), folder
    for path, wanted in ((base / "etc", 0o750), (base / "etc" / "dicomnode.yaml", 0o640)):
        info = path.stat()
        assert (info.st_uid, info.st_gid, mode(path)) == (0, account.pw_gid, wanted), path
    # The program as the unit starts it: its own script, its own #!.
    dicomnode = base / "opt" / "venv" / "bin" / "dicomnode"
    done = subprocess.run([dicomnode, "--version"], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"dicomnode, version {VERSION}", done.stderr
    loaded = load_installed_config(
        base / "opt" / "venv" / "bin" / "python", base / "etc/dicomnode.yaml"
    )
    assert (loaded["storage_dir"], loaded["database"], loaded["audit"]) == (
        str(base / "state" / "storage"),
        str(base / "state" / "index.sqlite"),
        str(base / "log" / "audit.jsonl"),
    )


class NotifySocket:
    """systemd's end of the notify protocol: a datagram socket that learns each sender's pid
    (SCM_CREDENTIALS), as systemd does to apply NotifyAccess=main."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        path.chmod(0o777)  # the service user must be able to send
        self.sock.settimeout(30)

    def receive(self) -> tuple[int, dict[str, str]]:
        """(sender pid, fields) of the next message."""
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pids = [
            struct.unpack("iII", cdata[:12])[0]
            for level, kind, cdata in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return pids[0], fields

    def close(self) -> None:
        self.sock.close()


def test_the_installed_node_runs_as_the_service_user(direct: Install) -> None:
    """The node as the unit starts it: the installed program and configuration (on a free
    loopback port), as the service user with the unit's UMask=, told $NOTIFY_SOCKET. It can
    write where the install put its data, and only the main process speaks to systemd."""
    base = direct.base
    account = pwd.getpwnam(SERVICE_USER)
    config = base / "etc" / "serve.yaml"
    text = (base / "etc" / "dicomnode.yaml").read_text()
    serving = text.replace("\nport: 11112\n", "\nport: 0\n").replace(
        "\nhost: 0.0.0.0\n", "\nhost: 127.0.0.1\n"
    )
    assert serving.count("\n") == text.count("\n") and serving != text
    config.write_text(serving)
    os.chown(config, 0, account.pw_gid)
    config.chmod(0o640)
    notify = NotifySocket(base / "notify.sock")
    log = base / "serve.log"
    try:
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                [base / "opt/venv/bin/dicomnode", "--config", config, "serve"],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                user=account.pw_uid,
                group=account.pw_gid,
                extra_groups=[],
                umask=0o027,
                env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": str(notify.path)},
            )
        try:
            host, port = _await_listening(proc, log, {"plain": True, "tls": False})["plain"]
            sender, fields = notify.receive()
            assert (sender, fields["READY"]) == (proc.pid, "1")

            ae = AE(ae_title="INSTALLTEST")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate(host, port, ae_title="DICOMNODE")
            assert assoc.is_established
            try:
                status = assoc.send_c_store(dcmread(get_testdata_file("CT_small.dcm")))
                assert status.Status == Status.SUCCESS
            finally:
                assoc.release()
                ae.shutdown()

            proc.send_signal(signal.SIGTERM)
            sender, fields = notify.receive()
            assert (sender, fields["STOPPING"]) == (proc.pid, "1")
            assert proc.wait(timeout=60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
    finally:
        notify.close()

    # What it wrote is the service user's, and not readable by others (UMask=0027).
    stored = list((base / "state" / "storage").rglob("*.dcm"))
    written = [*stored, base / "state" / "index.sqlite", base / "log" / "audit.jsonl"]
    assert len(stored) == 1
    for path in written:
        info = path.stat()
        assert (info.st_uid, mode(path)) == (account.pw_uid, 0o640), path
    assert stored[0].stat().st_size > 0
    events = [json.loads(line)["event"] for line in written[-1].read_text().splitlines()]
    assert "application-start" in events


def test_direct_second_run_changes_nothing(direct: Install) -> None:
    base = direct.base
    before = snapshot(base)
    output = direct.run()
    assert snapshot(base) == before
    assert "venv: up to date" in output
