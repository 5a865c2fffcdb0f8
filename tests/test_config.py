"""Configuration loading and validation (dicomnode.config): no sockets, no node started."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from dicomnode.config import (
    CONFIG_ENV,
    AuditSettings,
    Config,
    ConfigError,
    DuplicatePolicy,
    Limits,
    Peer,
    QuerySettings,
    Service,
    ServiceSettings,
    StoreSettings,
    TlsSettings,
    WorklistScope,
    WorklistSettings,
    load_config,
    parse_config,
    parse_size,
    resolve_peer,
    valid_ae_title,
)

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "config" / "dicomnode.yaml"
# The keys config/dicomnode.yaml deliberately sets to something other than the dataclass default
# (its header comment lists them); "source" is where the file was loaded from, never a key.
DOCUMENTED_EXCEPTIONS = {"storage_dir", "database", "conformance", "peers", "source", "audit"}
# Every nested section of Config, by its key.
SECTIONS: dict[str, type] = {
    "limits": Limits,
    "store": StoreSettings,
    "query": QuerySettings,
    "worklist": WorklistSettings,
    "tls": TlsSettings,
    "audit": AuditSettings,
    "service": ServiceSettings,
}
SECTION_EXCEPTIONS = {"audit.path"}  # ../var/audit.jsonl, as storage_dir
# Keys that have no default value to show, given in the reference as commented-out examples.
COMMENTED_OUT = {"tls": {"certificate", "private_key", "ca_certificates"}}
ALL_SERVICES = "a list of echo, store, find, move, get, worklist, mpps"


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)


def write_config(folder: Path, text: str, name: str = "node.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write_config(tmp_path, text))


# --- defaults --------------------------------------------------------------------------------


def test_dataclass_defaults() -> None:
    config = Config()
    assert config.ae_title == "DICOMNODE"
    assert config.host == "0.0.0.0"
    assert config.port == 11112
    assert config.workers == "auto"
    assert config.storage_dir == Path("var/storage")
    assert config.database == Path("var/index.sqlite")
    assert config.conformance is None
    assert config.log_level == "INFO"
    assert dict(config.peers) == {}
    assert config.unknown_peers == frozenset({Service.ECHO, Service.STORE})
    assert config.limits == Limits(
        max_associations=16,
        max_pdu_size=262144,
        acse_timeout=30.0,
        dimse_timeout=60.0,
        network_timeout=60.0,
    )
    assert config.store == StoreSettings(
        duplicates=DuplicatePolicy.KEEP, min_free_space=100 * 1024**2
    )
    assert config.source is None


def test_load_config_without_file_or_env_gives_defaults_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.ae_title == "DICOMNODE"
    assert config.port == 11112
    assert config.storage_dir == tmp_path / "var" / "storage"
    assert config.database == tmp_path / "var" / "index.sqlite"
    assert config.conformance is None
    assert config.source is None
    assert config.limits == Limits()
    assert config.store == StoreSettings()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "limits:\nstore:\npeers:\n"])
def test_empty_file_and_empty_sections_give_defaults(tmp_path: Path, text: str) -> None:
    config = load_text(tmp_path, text)
    assert config.ae_title == "DICOMNODE"
    assert config.limits == Limits()
    assert config.store == StoreSettings()
    assert dict(config.peers) == {}
    assert config.storage_dir == tmp_path.resolve() / "var" / "storage"
    assert config.source == (tmp_path / "node.yaml").resolve()


def test_accepted_value_forms_are_normalised(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "ae_title: '  NODE1 '\n"
        "port: 0\n"
        "log_level: debug\n"
        "unknown_peers: []\n"
        "limits: {acse_timeout: 5, dimse_timeout: 0.5, max_pdu_size: 4096}\n"
        "store: {duplicates: reject, min_free_space: 2 GiB}\n",
    )
    assert config.ae_title == "NODE1"
    assert config.port == 0
    assert config.log_level == "DEBUG"
    assert config.unknown_peers == frozenset()
    assert config.limits.acse_timeout == 5.0
    assert isinstance(config.limits.acse_timeout, float)
    assert config.limits.dimse_timeout == 0.5
    assert config.limits.max_pdu_size == 4096
    assert config.store.duplicates is DuplicatePolicy.REJECT
    assert config.store.min_free_space == 2 * 1024**3


@pytest.mark.parametrize(("text", "workers"), [("workers: 1\n", 1), ("workers: 64\n", 64)])
def test_workers_integer(tmp_path: Path, text: str, workers: int) -> None:
    config = load_text(tmp_path, text)
    assert config.workers == workers
    assert config.worker_count() == workers  # an integer is taken as it is


@pytest.mark.parametrize(
    ("cpus", "max_associations", "expected"),
    [(1, 16, 1), (2, 16, 2), (6, 16, 6), (32, 16, 8), (32, 3, 3), (4, 1, 1)],
)
def test_workers_auto_is_the_usable_cpus_capped(
    monkeypatch: pytest.MonkeyPatch, cpus: int, max_associations: int, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    config = parse_config(
        {"workers": "auto", "limits": {"max_associations": max_associations}}, Path.cwd()
    )
    assert config.workers == "auto"
    assert config.worker_count() == expected


def test_workers_auto_without_affinity_uses_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert Config().worker_count() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert Config().worker_count() == 1


# --- the reference configuration ---------------------------------------------------------------


def test_reference_config_values_are_the_defaults_except_documented() -> None:
    config = load_config(REFERENCE)
    default = Config()
    for f in fields(Config):
        if f.name not in DOCUMENTED_EXCEPTIONS:
            assert getattr(config, f.name) == getattr(default, f.name), f.name
    # The nested sections compare field by field too, so a new field cannot slip through.
    for name, section in SECTIONS.items():
        for f in fields(section):
            if f"{name}.{f.name}" in SECTION_EXCEPTIONS:
                continue
            assert getattr(getattr(config, name), f.name) == getattr(section(), f.name), (
                f"{name}.{f.name}"
            )
    assert config.audit.path.resolve() == REPO / "var" / "audit.jsonl"

    # The documented exceptions, exactly.
    assert config.storage_dir.resolve() == REPO / "var" / "storage"
    assert config.database.resolve() == REPO / "var" / "index.sqlite"
    assert config.conformance == REFERENCE.parent / "conformance.yaml"
    assert config.conformance.is_file()
    assert dict(config.peers) == {
        "PACS": Peer(
            name="PACS",
            ae_title="PACS",
            host="127.0.0.1",
            port=4242,
            services=frozenset(Service),
        )
    }
    assert config.source == REFERENCE


def test_reference_config_lists_every_key() -> None:
    raw = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    assert set(raw) == {f.name for f in fields(Config)} - {"source"}
    # Keys commented out (examples without a default value) are listed by the comment test.
    for name, section in SECTIONS.items():
        assert set(raw[name]) == {f.name for f in fields(section)} - COMMENTED_OUT.get(name, set())
    assert set(raw["peers"]) == {"PACS"}
    assert set(raw["peers"]["PACS"]) == {"ae_title", "host", "port", "services"}


def test_reference_config_comments_every_key() -> None:
    """Each key has a comment block above it; each leaf key's says what is allowed and default."""
    lines = REFERENCE.read_text(encoding="utf-8").splitlines()
    keys = {f.name for f in fields(Config)} | {"ae_title", "host", "port", "services"}
    for section in SECTIONS.values():
        keys |= {f.name for f in fields(section)}
    keys -= {"source"} | set().union(*COMMENTED_OUT.values())
    sections = set(SECTIONS)
    seen: set[str] = set()
    for i, line in enumerate(lines):
        match = re.match(r"^\s*([a-z_]+):", line)
        if not match or match.group(1) not in keys:
            continue
        key = match.group(1)
        seen.add(key)
        block = []
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            block.append(lines[j].lower())
            j -= 1
        assert block, f"line {i + 1}: key {key!r} has no comment above it"
        if key not in sections:
            text = " ".join(block)
            assert "allowed" in text, (
                f"line {i + 1}: comment on {key!r} does not say what is allowed"
            )
            assert "default" in text, f"line {i + 1}: comment on {key!r} does not give the default"
    assert seen == keys


# --- paths and where the file comes from ---------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(
        tmp_path / "etc",
        "storage_dir: data/store\ndatabase: index.sqlite\nconformance: ../policy/conf.yaml\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    base = (tmp_path / "etc").resolve()
    assert config.storage_dir == base / "data" / "store"
    assert config.database == base / "index.sqlite"
    assert config.conformance == base.parent / "policy" / "conf.yaml"  # normalised, for logs
    assert config.conformance.resolve() == tmp_path.resolve() / "policy" / "conf.yaml"


def test_relative_path_to_the_file_itself_resolves_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path / "etc", "ae_title: REL\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/node.yaml")
    assert config.ae_title == "REL"
    assert config.storage_dir == tmp_path.resolve() / "etc" / "var" / "storage"
    assert config.source == tmp_path.resolve() / "etc" / "node.yaml"


def test_absolute_and_home_paths_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    config = load_text(tmp_path / "etc", f"storage_dir: {tmp_path / 'abs'}\ndatabase: ~/idx.db\n")
    assert config.storage_dir == tmp_path / "abs"
    assert config.database == home / "idx.db"


def test_env_var_is_honoured_by_load_config_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, "ae_title: FROMENV\nport: 4006\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    config = load_config(None)
    assert config.ae_title == "FROMENV"
    assert config.port == 4006
    assert config.source == path.resolve()


def test_explicit_path_wins_over_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = write_config(tmp_path, "ae_title: FROMENV\n", "env.yaml")
    explicit = write_config(tmp_path, "ae_title: EXPLICIT\n", "explicit.yaml")
    monkeypatch.setenv(CONFIG_ENV, str(from_env))
    assert load_config(explicit).ae_title == "EXPLICIT"


def test_empty_env_var_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "")
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.ae_title == "DICOMNODE"
    assert config.source is None


def test_env_var_naming_a_missing_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.yaml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))
    with pytest.raises(ConfigError) as info:
        load_config(None)
    assert str(info.value) == (
        f"{missing}: cannot read the configuration: No such file or directory"
    )


# --- bad values ------------------------------------------------------------------------------

PEER = "peers:\n  PACS:\n    ae_title: PACS\n    host: 127.0.0.1\n    port: 4242\n"

BAD_VALUES = [
    # (YAML, the full key the message must name, what the message must say is allowed)
    ("ae_title: THIS_TITLE_IS_TOO_LONG\n", "ae_title", "an AE title of 1-16 characters"),
    ("ae_title: 'A\\B'\n", "ae_title", "an AE title of 1-16 characters"),
    ("ae_title: '   '\n", "ae_title", "an AE title of 1-16 characters"),
    ("ae_title: 104\n", "ae_title", "an AE title of 1-16 characters"),
    ("host: ''\n", "host", "a host name or address to listen on"),
    ("port: 70000\n", "port", "a port number from 0 to 65535"),
    ("port: -1\n", "port", "a port number from 0 to 65535"),
    ("port: '11112'\n", "port", "a port number from 0 to 65535"),
    ("port: true\n", "port", "a port number from 0 to 65535"),
    ("port: 104.0\n", "port", "a port number from 0 to 65535"),
    ("storage_dir: ''\n", "storage_dir", "a folder path"),
    ("database: 5\n", "database", "a file path"),
    ("conformance: []\n", "conformance", "a file path"),
    ("log_level: verbose\n", "log_level", "one of DEBUG, INFO, WARNING, ERROR"),
    ("unknown_peers: [echo, print]\n", "unknown_peers", ALL_SERVICES),
    ("unknown_peers: echo\n", "unknown_peers", ALL_SERVICES),
    ("unknown_peers: [ECHO]\n", "unknown_peers", ALL_SERVICES),
    ("limits: {max_pdu_size: 1024}\n", "limits.max_pdu_size", "an integer from 4096 to 16777216"),
    ("limits: {max_pdu_size: 0}\n", "limits.max_pdu_size", "an integer from 4096 to 16777216"),
    (
        "limits: {max_pdu_size: 16777217}\n",
        "limits.max_pdu_size",
        "an integer from 4096 to 16777216",
    ),
    ("workers: 0\n", "workers", "auto or an integer from 1 to 64"),
    ("workers: 65\n", "workers", "auto or an integer from 1 to 64"),
    ("workers: AUTO\n", "workers", "auto or an integer from 1 to 64"),
    ("workers: '2'\n", "workers", "auto or an integer from 1 to 64"),
    ("workers: true\n", "workers", "auto or an integer from 1 to 64"),
    ("workers: 1.5\n", "workers", "auto or an integer from 1 to 64"),
    ("limits: {max_associations: 0}\n", "limits.max_associations", "an integer 1-1000"),
    ("limits: {max_associations: 1001}\n", "limits.max_associations", "an integer 1-1000"),
    ("limits: {acse_timeout: 0}\n", "limits.acse_timeout", "seconds, above 0"),
    ("limits: {dimse_timeout: -5}\n", "limits.dimse_timeout", "seconds, above 0"),
    ("limits: {network_timeout: '60'}\n", "limits.network_timeout", "seconds, above 0"),
    ("limits: {network_timeout: true}\n", "limits.network_timeout", "seconds, above 0"),
    ("store: {duplicates: overwrite}\n", "store.duplicates", "one of keep, replace, reject"),
    (
        "store: {min_free_space: lots}\n",
        "store.min_free_space",
        "a size in bytes, or with a unit such as 500MB or 2GiB",
    ),
    (
        "store: {min_free_space: -1}\n",
        "store.min_free_space",
        "a size in bytes, or with a unit such as 500MB or 2GiB",
    ),
    (PEER + "    services: [echo, storage]\n", "peers.PACS.services", ALL_SERVICES),
    (PEER.replace("port: 4242", "port: 0"), "peers.PACS.port", "a port number from 1 to 65535"),
    (
        PEER.replace("port: 4242", "port: 65536"),
        "peers.PACS.port",
        "a port number from 1 to 65535",
    ),
    (
        PEER.replace("port: 4242", "port: '4242'"),
        "peers.PACS.port",
        "a port number from 1 to 65535",
    ),
    (
        PEER.replace("ae_title: PACS", "ae_title: THIS_TITLE_IS_TOO_LONG"),
        "peers.PACS.ae_title",
        "an AE title of 1-16 characters",
    ),
    (
        PEER.replace("ae_title: PACS", "ae_title: 'PA\\CS'"),
        "peers.PACS.ae_title",
        "an AE title of 1-16 characters",
    ),
    (
        PEER.replace("host: 127.0.0.1", "host: ''"),
        "peers.PACS.host",
        "a host name or address",
    ),
    (
        "peers:\n  'bad name':\n    ae_title: X\n    host: h\n    port: 1\n",
        "peers",
        "peer names are 1-64 letters, digits, '_', '.', '-'",
    ),
    ("peers: [PACS]\n", "peers", "must be a mapping of peer name to settings"),
    (PEER + "    worklist_scope: mine\n", "peers.PACS.worklist_scope", "one of all, own"),
    (
        "worklist: {expire_after_days: -1}\n",
        "worklist.expire_after_days",
        "a number of days from 0 (never) to 36500",
    ),
    ("worklist: {hide_completed: 'yes'}\n", "worklist.hide_completed", "true or false"),
    ("worklist: {default_scope: OWN}\n", "worklist.default_scope", "one of all, own"),
]


@pytest.mark.parametrize(("text", "key", "allowed"), BAD_VALUES)
def test_bad_value_names_the_full_key_and_what_is_allowed(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: key '{key}': {allowed}"), message
    assert ", got " in message


UNKNOWN_KEYS = [
    (
        "colour: blue\n",
        "colour",
        "ae_title, host, port, workers, storage_dir, database, database_busy_timeout, "
        "conformance, log_level, peers, unknown_peers, require_called_ae_title, limits, store",
    ),
    ("stroage_dir: x\n", "stroage_dir", "ae_title, host, port, workers, storage_dir"),
    ("source: x.yaml\n", "source", "limits, store"),
    (
        "limits: {max_pdu: 65536}\n",
        "limits.max_pdu",
        "max_associations, max_pdu_size, acse_timeout, dimse_timeout, network_timeout",
    ),
    ("store: {duplicate: keep}\n", "store.duplicate", "duplicates, min_free_space"),
    (
        "worklist: {expiry: 3}\n",
        "worklist.expiry",
        "expire_after_days, hide_completed, default_scope",
    ),
    (PEER + "    hostname: x\n", "peers.PACS.hostname", "ae_title, host, port, services"),
]


@pytest.mark.parametrize(("text", "key", "allowed"), UNKNOWN_KEYS)
def test_unknown_key_names_the_full_key_and_the_allowed_keys(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown key '{key}'; allowed here: "), message
    assert allowed in message


def test_source_is_not_a_key(tmp_path: Path) -> None:
    # "source" is filled in by load_config; the allowed list must not offer it.
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "colour: blue\n")
    assert "source" not in str(info.value).split("allowed here: ")[1]


@pytest.mark.parametrize("missing", ["ae_title", "host", "port"])
def test_peer_missing_required_key(tmp_path: Path, missing: str) -> None:
    entry = {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
    del entry[missing]
    path = write_config(tmp_path, yaml.safe_dump({"peers": {"PACS": entry}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: key 'peers.PACS.{missing}' is required"


@pytest.mark.parametrize("settings", ["PACS@host:104", None, [1, 2]])
def test_peer_settings_must_be_a_mapping(tmp_path: Path, settings: object) -> None:
    path = write_config(tmp_path, yaml.safe_dump({"peers": {"PACS": settings}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: peers.PACS must be a mapping"


def test_duplicate_peer_ae_titles(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "peers:\n"
        "  A: {ae_title: PACS, host: h1, port: 104}\n"
        "  B: {ae_title: 'PACS  ', host: h2, port: 104}\n"
        "  C: {ae_title: OTHER, host: h3, port: 104}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: key 'peers': AE titles must be unique, ['PACS'] appear twice"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limits: 5\n", "limits must be a mapping"),
        ("store: keep\n", "store must be a mapping"),
        ("- ae_title: X\n", "the file must be a mapping"),
        ("just a string\n", "the file must be a mapping"),
    ],
)
def test_sections_and_file_must_be_mappings(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize("text", ["port: [1, 2\n", "ae_title: X\n  host: y\n", "a: 'x\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not valid YAML: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read the configuration: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read the configuration: Is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "ae_title: X\n")
    path.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read the configuration: Permission denied"


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("ae_title: M\u00fcller\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("text", "explanation"),
    [("limits: {acse_timeout: 100000}\n", "86400"), ("ae_title: 'A\\B'\n", "backslash")],
)
def test_message_explains_why_the_value_is_refused(
    tmp_path: Path, text: str, explanation: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert explanation in str(info.value)


def test_parse_config_where_prefixes_messages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"limits": {"max_pdu_size": 1}}, tmp_path, "inline")
    assert str(info.value) == (
        "inline: key 'limits.max_pdu_size': an integer from 4096 to 16777216 (bytes), got 1"
    )


# --- parse_size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("500MB", 500_000_000),
        ("2 GiB", 2 * 1024**3),
        (1024, 1024),
        (0, 0),
        ("0", 0),
        ("123", 123),
        ("7 B", 7),
        (" 10kib ", 10 * 1024),
        ("1.5KB", 1500),
        ("100MiB", 104_857_600),
        ("1TB", 10**12),
        ("3tib", 3 * 1024**4),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    ["500M", "lots", "", "-5MB", "5 XB", "1e3", "MB", "5 MB B", -1, 1.5, True, None, [100]],
)
def test_parse_size_rejects(value: object) -> None:
    assert parse_size(value) is None


def test_parse_size_decimal_is_exact() -> None:
    assert parse_size("2.01KB") == 2010


# --- AE titles, peers and services -------------------------------------------------------------


@pytest.mark.parametrize(
    ("title", "valid"),
    [
        ("PACS", True),
        ("A" * 16, True),
        ("  PACS  ", True),
        ("STORE SCP-1_x.y", True),
        ("A" * 17, False),
        ("", False),
        ("    ", False),
        ("PA\\CS", False),
        ("PA\tCS", False),
        ("PAC\u00c9", False),
    ],
)
def test_valid_ae_title(title: str, valid: bool) -> None:
    assert valid_ae_title(title) is valid


def test_valid_ae_title_rejects_a_trailing_newline() -> None:
    assert valid_ae_title("PACS\n") is False


@pytest.fixture
def two_peers(tmp_path: Path) -> Config:
    return load_text(
        tmp_path,
        "unknown_peers: [echo]\n"
        "peers:\n"
        "  PACS: {ae_title: PACS, host: 10.0.0.5, port: 104, services: [echo, store, find]}\n"
        "  archive-2: {ae_title: ARCHIVE2, host: archive.example.org, port: 11112}\n",
    )


def test_peers_are_loaded(two_peers: Config) -> None:
    assert dict(two_peers.peers) == {
        "PACS": Peer(
            "PACS", "PACS", "10.0.0.5", 104, frozenset({Service.ECHO, Service.STORE, Service.FIND})
        ),
        "archive-2": Peer("archive-2", "ARCHIVE2", "archive.example.org", 11112, frozenset()),
    }
    assert two_peers.peers["PACS"].address == "PACS@10.0.0.5:104"


def test_resolve_peer_by_configured_name(two_peers: Config) -> None:
    assert resolve_peer(two_peers, "PACS") is two_peers.peers["PACS"]
    assert resolve_peer(two_peers, "archive-2") is two_peers.peers["archive-2"]


@pytest.mark.parametrize(
    ("text", "ae_title", "host", "port"),
    [
        ("STORESCP@pacs.example.org:104", "STORESCP", "pacs.example.org", 104),
        ("AET@192.168.1.10:11112", "AET", "192.168.1.10", 11112),
        ("AET@[::1]:104", "AET", "::1", 104),
        ("AET@[fe80::1:2]:65535", "AET", "fe80::1:2", 65535),
        (" AET @localhost:1", "AET", "localhost", 1),
        ("A" * 16 + "@h:4242", "A" * 16, "h", 4242),
    ],
)
def test_resolve_peer_address(
    two_peers: Config, text: str, ae_title: str, host: str, port: int
) -> None:
    assert resolve_peer(two_peers, text) == Peer(
        name=text, ae_title=ae_title, host=host, port=port, services=frozenset()
    )


@pytest.mark.parametrize(
    "text",
    [
        "UNKNOWN",
        "pacs",
        "",
        "AET@host",
        "AET@host:",
        "AET@host:0",
        "AET@host:65536",
        "AET@host:port",
        "@host:104",
        "A" * 17 + "@host:104",
        "A\\B@host:104",
        "AET@::1:104",
        "AET@[::1]",
        "AET@host:104:105",
        "AET@@host:104",
    ],
)
def test_resolve_peer_invalid_lists_configured_names(two_peers: Config, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_peer(two_peers, text)
    assert str(info.value) == (
        f"peer {text!r}: give a configured peer name (PACS, archive-2) or AET@host:port "
        "(AE title of 1-16 characters, port 1-65535)"
    )


def test_resolve_peer_invalid_without_peers_says_none_configured() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_peer(Config(), "PACS")
    assert "give a configured peer name (none configured) or AET@host:port" in str(info.value)


def test_services_for_known_and_unknown_ae_titles(two_peers: Config) -> None:
    assert two_peers.services_for("PACS") == frozenset({Service.ECHO, Service.STORE, Service.FIND})
    assert two_peers.services_for("  PACS ") == two_peers.services_for("PACS")
    # A peer configured without services may ask nothing, not what unknown callers may.
    assert two_peers.services_for("ARCHIVE2") == frozenset()
    # AE titles are case-sensitive; anything else is an unknown caller.
    assert two_peers.services_for("pacs") == frozenset({Service.ECHO})
    assert two_peers.services_for("STRANGER") == frozenset({Service.ECHO})
    assert two_peers.peer_by_ae_title("ARCHIVE2") is two_peers.peers["archive-2"]
    assert two_peers.peer_by_ae_title("archive-2") is None


def test_worklist_scope_per_peer_else_the_default(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "worklist: {default_scope: own}\n"
        "peers:\n"
        "  CT1: {ae_title: CT1, host: ct1, port: 104, worklist_scope: all}\n"
        "  MR1: {ae_title: MR1, host: mr1, port: 104}\n",
    )
    assert config.peers["CT1"].worklist_scope is WorklistScope.ALL
    assert config.peers["MR1"].worklist_scope is None
    assert config.worklist_scope_for("CT1") is WorklistScope.ALL
    assert config.worklist_scope_for("MR1") is WorklistScope.OWN
    assert config.worklist_scope_for("STRANGER") is WorklistScope.OWN
    assert Config().worklist_scope_for("ANYONE") is WorklistScope.ALL


def test_services_for_unknown_caller_uses_the_default() -> None:
    assert Config().services_for("ANYONE") == frozenset({Service.ECHO, Service.STORE})


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "limits:\n  max_pdu_size: 1024\n",
            "key 'limits.max_pdu_size': an integer from 4096 to 16777216 (bytes), got 1024",
        ),
        (
            PEER.replace("port: 4242", "port: 99999"),
            "key 'peers.PACS.port': a port number from 1 to 65535, got 99999",
        ),
        ("limits: {max_pdu: 1}\n", "unknown key 'limits.max_pdu'; allowed here: "),
    ],
)
def test_cli_serve_with_bad_config_exits_4_before_listening(
    tmp_path: Path, text: str, expected: str
) -> None:
    bad = write_config(tmp_path, text, "BAD.yaml")
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(bad), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith(f"dicomnode: {bad}: {expected}"), result.stderr
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stdout
    # It failed at configuration load: the archive was never opened, nothing was created.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BAD.yaml"]


def test_move_destinations_name_configured_peers(tmp_path: Path) -> None:
    peers = (
        "peers:\n"
        "  PACS: {ae_title: PACS, host: 10.0.0.1, port: 104}\n"
        "  WS: {ae_title: WS, host: 10.0.0.2, port: 104, services: [move],"
        " move_destinations: [WS]}\n"
    )
    config = load_config(write_config(tmp_path, peers))
    assert config.peers["WS"].move_destinations == frozenset({"WS"})
    assert config.may_move_to("WS", config.peers["WS"])
    assert not config.may_move_to("WS", config.peers["PACS"])
    assert config.may_move_to("PACS", config.peers["WS"])  # no list: any configured peer
    assert config.may_move_to("STRANGER", config.peers["PACS"])
    bad = peers.replace("move_destinations: [WS]", "move_destinations: [NOPE]")
    with pytest.raises(ConfigError, match=r"peers.WS.move_destinations': \['NOPE'\] are not"):
        load_config(write_config(tmp_path / "bad", bad))
