"""DICOM TLS (PS3.15 B.9, BCP 195): our TLS listener against DCMTK echoscu/storescu +tls and
Python's own TLS client; our SCU (echo, send, and C-MOVE sub-operations) against DCMTK
storescp +tls. Certificates come from throwaway CAs made per test (tests/support/tls.py).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pydicom
import pytest
import yaml

from dicomnode import tls
from dicomnode.config import ClientCertificates, TlsSettings
from dicomnode.status import ExitCode
from tests.support.corpus import STORESCU_OPTION, TEST_FILES, dataset_bytes
from tests.support.dcmtk import DCMTK_ENV, Endpoint, storescp
from tests.support.node import RunningNode, run_node
from tests.support.tls import KeyPair, Pki, make_pki, require_dcmtk_tls
from tests.test_worklist_scp import YAML_ITEMS

CT = TEST_FILES / "CT_small.dcm"
CT_UID = str(pydicom.dcmread(CT, stop_before_pixels=True).SOPInstanceUID)
MR = TEST_FILES / "MR_small.dcm"
MR_UID = str(pydicom.dcmread(MR, stop_before_pixels=True).SOPInstanceUID)
OUR_AET = "DNTLSSCU"
_PADDING = 0xFFFCFFFC  # PS3.10 7.2: Data Set Trailing Padding
TIMEOUT = 60


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@contextmanager
def tls_node(root: Path, pki: Pki, **tls_settings: Any) -> Iterator[RunningNode]:
    """A node serving DICOM TLS with ``pki``'s certificates (client certificates required
    unless ``tls_settings`` says otherwise), beside its plain port unless ``only=True``."""
    with run_node(root, tls=pki.node_tls(**tls_settings)) as node:
        assert node.tls_port, f"no DICOM TLS listener announced; log:\n{node.log()}"
        yield node


# --- DCMTK against our listener ---------------------------------------------------------------


def dcmtk_tls(identity: KeyPair | None, trust: Path) -> list[str]:
    """DCMTK's TLS options: our certificate and key (``+tls``) or none (``+tla``: anonymous
    TLS, no client certificate), and the CA the server's certificate must be signed by."""
    return [*(identity.dcmtk() if identity else ["+tla"]), "+cf", str(trust)]


def echoscu(node: RunningNode, options: Sequence[str]) -> subprocess.CompletedProcess[str]:
    require_dcmtk_tls("echoscu")
    argv = ["echoscu", "-v", "-aec", node.ae_title, *options, node.host, str(node.tls_port)]
    return subprocess.run(
        argv, capture_output=True, text=True, env=DCMTK_ENV, timeout=TIMEOUT, check=False
    )


def storescu(
    node: RunningNode, options: Sequence[str], *files: Path
) -> subprocess.CompletedProcess[str]:
    require_dcmtk_tls("storescu")
    # Propose each file's own transfer syntax first, so that it arrives as it is on disk.
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for f in files}  # fmt: skip
    assert len(syntaxes) == 1, "one transfer syntax per call"
    argv = [
        "storescu", "-v", "-aec", node.ae_title, STORESCU_OPTION[syntaxes.pop()], *options,
        node.host, str(node.tls_port), *map(str, files),
    ]  # fmt: skip
    return subprocess.run(
        argv, capture_output=True, text=True, env=DCMTK_ENV, timeout=TIMEOUT, check=False
    )


def assert_stored(node: RunningNode, original: Path) -> None:
    """The instance of ``original`` is indexed and its stored file holds the same data set.

    storescu re-encodes what it sends and leaves out the Data Set Trailing Padding (FFFC,FFFC),
    so the comparison is element by element, padding aside (byte-for-byte storage of what
    arrives is tested in test_store.py against storescp's copy).
    """
    expected = pydicom.dcmread(original)
    row = node.instance(str(expected.SOPInstanceUID))
    assert row is not None, f"{original.name} is not indexed"
    stored = pydicom.dcmread(node.storage / row["path"])
    for ds in (expected, stored):
        if _PADDING in ds:
            del ds[_PADDING]
    assert stored == expected


def audit(node: RunningNode) -> list[dict[str, Any]]:
    path = node.root / "var" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_refused_in_log(node: RunningNode) -> None:
    """The node logged the refused handshake (and why) and audited it."""
    node.wait_for_log("DICOM TLS connection from 127.0.0.1:")
    assert any(
        r["event"] == "association-rejected" and "TLS" in r["reason"] for r in audit(node)
    ), audit(node)


def assert_serves(node: RunningNode, pki: Pki) -> None:
    """The node still answers a valid TLS association (a refusal did not break the listener)."""
    done = echoscu(node, dcmtk_tls(pki.client, pki.ca))
    assert done.returncode == 0, done.stdout + done.stderr


def test_echoscu_and_storescu_with_a_valid_client_certificate(tmp_path: Path, pki: Pki) -> None:
    with tls_node(tmp_path / "node", pki) as node:
        echo = echoscu(node, dcmtk_tls(pki.client, pki.ca))
        store = storescu(node, dcmtk_tls(pki.client, pki.ca), CT)

        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert "Received Echo Response (Success)" in echo.stdout + echo.stderr
        assert store.returncode == 0, store.stdout + store.stderr
        assert_stored(node, CT)
        # The audit names the verified client certificate of each association.
        accepted = [r for r in audit(node) if r["event"] == "association-accepted"]
        assert [r["calling_ae"] for r in accepted] == ["ECHOSCU", "STORESCU"]
        for record in accepted:
            assert "certificate CN=DCMTKSCU," in record["tls"], record
            assert "O=dicomnode test CA" in record["tls"], record


def test_plain_port_serves_beside_tls(tmp_path: Path, pki: Pki) -> None:
    require_dcmtk_tls("echoscu")
    with tls_node(tmp_path / "node", pki) as node:
        plain = subprocess.run(
            ["echoscu", "-aec", node.ae_title, node.host, str(node.port)],
            capture_output=True, text=True, env=DCMTK_ENV, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        # A plain DICOM association on the TLS port is no TLS handshake: refused.
        on_tls_port = subprocess.run(
            ["echoscu", "-to", "10", "-ta", "10", "-aec", node.ae_title,
             node.host, str(node.tls_port)],
            capture_output=True, text=True, env=DCMTK_ENV, timeout=TIMEOUT, check=False,
        )  # fmt: skip

        assert plain.returncode == 0, plain.stderr
        assert on_tls_port.returncode != 0
        assert_serves(node, pki)


def test_missing_client_certificate_is_refused_when_required(tmp_path: Path, pki: Pki) -> None:
    with tls_node(tmp_path / "node", pki, client_certificates="required") as node:
        echo = echoscu(node, dcmtk_tls(None, pki.ca))
        store = storescu(node, dcmtk_tls(None, pki.ca), CT)

        assert echo.returncode != 0
        assert store.returncode != 0
        assert node.instance(CT_UID) is None
        assert node.stored_files() == []
        assert_refused_in_log(node)
        assert_serves(node, pki)


def test_optional_client_certificate(tmp_path: Path, pki: Pki) -> None:
    with tls_node(tmp_path / "node", pki, client_certificates="optional") as node:
        anonymous = storescu(node, dcmtk_tls(None, pki.ca), CT)
        identified = storescu(node, dcmtk_tls(pki.client, pki.ca), MR)
        # Optional means "checked when presented": a certificate from another CA is refused.
        untrusted = echoscu(node, dcmtk_tls(pki.rogue_client, pki.ca))

        assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
        assert identified.returncode == 0, identified.stdout + identified.stderr
        assert_stored(node, CT)
        assert_stored(node, MR)
        assert untrusted.returncode != 0


def test_client_certificates_none_never_asks(tmp_path: Path, pki: Pki) -> None:
    with tls_node(tmp_path / "node", pki, client_certificates="none") as node:
        anonymous = storescu(node, dcmtk_tls(None, pki.ca), CT)

        assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
        assert_stored(node, CT)


def test_untrusted_client_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    with tls_node(tmp_path / "node", pki) as node:
        echo = echoscu(node, dcmtk_tls(pki.rogue_client, pki.ca))
        store = storescu(node, dcmtk_tls(pki.rogue_client, pki.ca), CT)

        assert echo.returncode != 0
        assert store.returncode != 0
        assert node.instance(CT_UID) is None
        assert node.stored_files() == []
        assert_refused_in_log(node)
        assert_serves(node, pki)


def test_dcmtk_refuses_our_certificate_when_it_trusts_another_ca(tmp_path: Path, pki: Pki) -> None:
    # The other direction of the same check: DCMTK verifies the node's certificate.
    with tls_node(tmp_path / "node", pki) as node:
        done = echoscu(node, dcmtk_tls(pki.client, pki.rogue_ca))
        assert done.returncode != 0
        assert_serves(node, pki)


# --- TLS versions, with Python's TLS client ---------------------------------------------------


def handshake(
    port: int | None, pki: Pki, version: ssl.TLSVersion, *, identity: KeyPair | None = None
) -> str:
    """A bare TLS handshake with the node offering only ``version``; the version agreed.

    Raises ssl.SSLError when it is refused. For versions below 1.2 our own side is opened up
    (security level 0, no minimum) so that the ClientHello really offers the old version and it
    is the node that refuses, not the local OpenSSL policy.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(pki.ca))
    identity = identity or pki.client
    context.load_cert_chain(str(identity.certificate), str(identity.key))
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    else:
        context.minimum_version = version
    context.maximum_version = version
    assert port is not None
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw) as sock,
    ):
        agreed = sock.version()
        assert agreed is not None
        return agreed


# Naming the old versions is deprecated in the ssl module; offering them is the point here.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("old", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_before_1_2_is_refused(tmp_path: Path, pki: Pki, old: ssl.TLSVersion) -> None:
    with tls_node(tmp_path / "node", pki) as node:
        assert handshake(node.tls_port, pki, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        with pytest.raises(ssl.SSLError) as refused:
            handshake(node.tls_port, pki, old)
        # Either the node's "protocol version" alert, or (where the local OpenSSL cannot offer
        # the old version at all) the local refusal; never a handshake.
        assert refused.value.reason in {
            "TLSV1_ALERT_PROTOCOL_VERSION",
            "UNSUPPORTED_PROTOCOL",
            "NO_PROTOCOLS_AVAILABLE",
        }, refused.value
        assert handshake(node.tls_port, pki, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_min_version_1_3_refuses_1_2(tmp_path: Path, pki: Pki) -> None:
    with tls_node(tmp_path / "node", pki, min_version="1.3") as node:
        with pytest.raises(ssl.SSLError) as refused:
            handshake(node.tls_port, pki, ssl.TLSVersion.TLSv1_2)
        assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
        assert handshake(node.tls_port, pki, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_tls_1_2_uses_a_bcp_195_suite(tmp_path: Path, pki: Pki) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client.certificate), str(pki.client.key))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    # Offer only suites BCP 195 does not recommend (CBC, RSA key transport): refused.
    context.set_ciphers("AES128-SHA:AES256-SHA256:ECDHE-RSA-AES128-SHA")
    with tls_node(tmp_path / "node", pki) as node:
        with (
            pytest.raises(ssl.SSLError) as refused,
            socket.create_connection(("127.0.0.1", node.tls_port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw),
        ):
            pass
        assert refused.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE", refused.value
        context.set_ciphers("ALL")
        with (
            socket.create_connection(("127.0.0.1", node.tls_port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw) as sock,
        ):
            cipher = sock.cipher()
        assert cipher is not None
        assert cipher[0] in tls.BCP195_CIPHERS.split(":")


def test_a_stalled_handshake_does_not_block_others(tmp_path: Path, pki: Pki) -> None:
    # A caller that connects and never says anything must not hold up the next one: the
    # handshake is not done by the thread that accepts connections.
    with (
        tls_node(tmp_path / "node", pki) as node,
        socket.create_connection(("127.0.0.1", node.tls_port), timeout=TIMEOUT),
    ):
        assert_serves(node, pki)


def test_tls_only_closes_the_plain_port(tmp_path: Path, pki: Pki) -> None:
    with tls_node(tmp_path / "node", pki, only=True) as node:
        listening = {
            c.laddr.port
            for c in psutil.Process(node.proc.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {node.tls_port}
        assert_serves(node, pki)


def test_unusable_certificate_files_stop_the_node_with_the_key_named(
    tmp_path: Path, pki: Pki
) -> None:
    # The node's certificate with the client's key: they do not match.
    settings = pki.node_tls(private_key=str(pki.client.key))
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump({"host": "127.0.0.1", "port": 0, "storage_dir": "s", "tls": settings}),
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "tls.private_key" in done.stderr
    assert str(pki.client.key) in done.stderr
    assert "does not match" in done.stderr
    assert "listening" not in done.stdout


# --- the contexts themselves: what a bad file says --------------------------------------------


def settings(pki: Pki, **overrides: Any) -> TlsSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "certificate": pki.server.certificate,
        "private_key": pki.server.key,
        "ca_certificates": pki.ca,
    }
    values.update(overrides)
    return TlsSettings(**values)


def test_contexts_never_allow_less_than_tls_1_2(pki: Pki) -> None:
    for context in (tls.server_context(settings(pki)), tls.client_context(settings(pki))):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
        names = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert names == set(tls.BCP195_CIPHERS.split(":"))
    assert tls.server_context(settings(pki, min_version="1.3")).minimum_version is (
        ssl.TLSVersion.TLSv1_3
    )


def test_verify_modes(pki: Pki) -> None:
    modes = {
        ClientCertificates.REQUIRED: ssl.CERT_REQUIRED,
        ClientCertificates.OPTIONAL: ssl.CERT_OPTIONAL,
        ClientCertificates.NONE: ssl.CERT_NONE,
    }
    for mode, verify in modes.items():
        assert tls.server_context(settings(pki, client_certificates=mode)).verify_mode == verify
    client = tls.client_context(settings(pki))
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is False


def test_bad_files_are_named_with_their_key(tmp_path: Path, pki: Pki) -> None:
    der = tmp_path / "server.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(pki.server.certificate.read_text()))
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    unreadable = tmp_path / "unreadable.key"
    unreadable.write_bytes(pki.server.key.read_bytes())
    unreadable.chmod(0)
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"certificate": der}, ["tls.certificate", str(der), "not a PEM certificate"]),
        ({"private_key": pki.server.certificate}, ["tls.private_key", "not a PEM private key"]),
        ({"private_key": pki.client.key}, ["tls.private_key", str(pki.client.key), "not match"]),
        ({"private_key": encrypted}, ["tls.private_key", "encrypted"]),
        (
            {"ca_certificates": tmp_path / "missing-ca.crt"},
            ["tls.ca_certificates", "missing-ca.crt", "does not exist"],
        ),
        ({"ca_certificates": pki.server.key}, ["tls.ca_certificates", "no PEM certificate"]),
        ({"certificate": None}, ["tls.certificate", "not set"]),
    ]
    if os.geteuid() != 0:  # root reads a file of mode 0 anyway
        cases.append(({"private_key": unreadable}, ["tls.private_key", "cannot read"]))
    for overrides, expected in cases:
        with pytest.raises(tls.TlsError) as raised:
            tls.server_context(settings(pki, **overrides))
        for text in expected:
            assert text in str(raised.value), (overrides, str(raised.value))
    with pytest.raises(tls.TlsError, match=r"tls\.ca_certificates: not set"):
        tls.server_context(settings(pki, ca_certificates=None))
    # A client certificate is optional on our SCU side, but half of one is an error.
    assert tls.client_context(settings(pki, certificate=None, private_key=None)) is not None
    with pytest.raises(tls.TlsError, match=r"tls\.private_key: not set"):
        tls.client_context(settings(pki, private_key=None))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_handshake_refusals_in_words(pki: Pki) -> None:
    """What tls.handshake_refusal says about real failed handshakes with our server context."""
    server = tls.server_context(settings(pki))
    failures: list[BaseException] = []

    def serve_one(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True, do_handshake_on_connect=False) as sock:
            sock.settimeout(TIMEOUT)
            try:
                sock.do_handshake()
            except OSError as exc:
                failures.append(exc)

    def client(identity: KeyPair | None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if identity is not None:
            context.load_cert_chain(str(identity.certificate), str(identity.key))
        if version is not None:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = version
        return context

    cases: list[tuple[ssl.SSLContext | bytes, str]] = [
        (client(None), "presented no client certificate"),
        (client(pki.rogue_client), "the caller's certificate is not trusted: unable to get"),
        (client(pki.client, ssl.TLSVersion.TLSv1_1), "older than tls.min_version"),
        # The first bytes of an A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) instead of a ClientHello.
        (b"\x01\x00\x00\x00\x00\xcd\x00\x01", "not a TLS handshake"),
    ]
    for how, expected in cases:
        failures.clear()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            thread = threading.Thread(target=serve_one, args=(listener,))
            thread.start()
            with socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT) as raw:
                try:
                    if isinstance(how, bytes):
                        raw.sendall(how)
                        raw.recv(1)
                    else:
                        with how.wrap_socket(raw) as sock:
                            sock.recv(1)  # TLS 1.3: the refusal comes after our Finished
                except OSError:
                    pass
            thread.join(TIMEOUT)
        assert len(failures) == 1, (expected, failures)
        assert expected in tls.handshake_refusal(failures[0]), tls.handshake_refusal(failures[0])


# --- our SCU against DCMTK storescp +tls ------------------------------------------------------


def scu_config(
    tmp_path: Path, pki: Pki, peers: dict[str, Endpoint], *, identity: KeyPair | None = None
) -> Path:
    """Our SCU's configuration: the node's certificate as our client certificate (unless
    ``identity``), the test CA, and each peer called over TLS."""
    me = identity or pki.server
    data = {
        "ae_title": OUR_AET,
        "limits": {"acse_timeout": 20, "dimse_timeout": 30, "network_timeout": 30},
        "tls": {
            "certificate": str(me.certificate),
            "private_key": str(me.key),
            "ca_certificates": str(pki.ca),
        },
        "peers": {
            name: {"ae_title": ep.aet, "host": ep.host, "port": ep.port, "tls": True}
            for name, ep in peers.items()
        },
    }
    path = tmp_path / "scu.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def cli(config: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DICOMNODE_CONFIG"}
    argv = [sys.executable, "-m", "dicomnode.cli", "--config", str(config), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=TIMEOUT)


def tls_storescp(out: Path, identity: KeyPair, trust: Path, *, aet: str = "TLSSCP") -> Any:
    """storescp +tls presenting ``identity``, requiring a client certificate signed by
    ``trust`` (DCMTK's default, --require-peer-cert)."""
    require_dcmtk_tls("storescp")
    options = ("+xa", *identity.dcmtk(), "+cf", str(trust))
    return storescp(out, aet=aet, options=options, log_path=out.parent / f"{aet}.log")


def test_our_echo_and_send_over_tls(tmp_path: Path, pki: Pki) -> None:
    out = tmp_path / "received"
    with tls_storescp(out, pki.peer_server, pki.ca) as peer:
        config = scu_config(tmp_path, pki, {"SECURE": peer})
        echo = cli(config, "echo", "SECURE")
        send = cli(config, "send", "SECURE", CT)
        # An ad-hoc AET@host:port over TLS with --tls.
        adhoc = cli(config, "send", "--tls", peer.address, MR)

    assert echo.returncode == 0, echo.stderr
    assert "Success" in echo.stdout
    assert send.returncode == 0, send.stderr
    assert adhoc.returncode == 0, adhoc.stderr
    files = sorted(p for p in out.iterdir() if p.is_file())
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    assert set(got) == {CT_UID, MR_UID}
    assert dataset_bytes(got[CT_UID]) == dataset_bytes(CT)
    assert dataset_bytes(got[MR_UID]) == dataset_bytes(MR)


def test_untrusted_peer_certificate_fails_with_unreachable(tmp_path: Path, pki: Pki) -> None:
    out = tmp_path / "received"
    with tls_storescp(out, pki.rogue_server, pki.ca) as peer:
        config = scu_config(tmp_path, pki, {"ROGUE": peer})
        echo = cli(config, "echo", "ROGUE")
        send = cli(config, "send", "ROGUE", CT)

    for done in (echo, send):
        assert done.returncode == ExitCode.UNREACHABLE, done.stderr
        assert f"TLS handshake with {peer.address} failed" in done.stderr
        assert "certificate is not trusted" in done.stderr
        assert str(pki.ca) in done.stderr
    assert "not sent: no TLS connection" in send.stderr
    assert not [p for p in out.iterdir() if p.is_file()]


def test_peer_refusing_our_certificate(tmp_path: Path, pki: Pki) -> None:
    out = tmp_path / "received"
    # storescp trusts only the rogue CA: our certificate (signed by the test CA) is refused.
    with tls_storescp(out, pki.peer_server, pki.rogue_ca) as peer:
        config = scu_config(tmp_path, pki, {"PICKY": peer})
        done = cli(config, "send", "PICKY", CT)

    assert done.returncode == ExitCode.UNREACHABLE, done.stderr
    assert f"with {peer.address} failed" in done.stderr
    assert "does not trust the CA that signed our certificate" in done.stderr
    assert not [p for p in out.iterdir() if p.is_file()]


def test_peer_requiring_a_client_certificate_we_do_not_have(tmp_path: Path, pki: Pki) -> None:
    out = tmp_path / "received"
    with tls_storescp(out, pki.peer_server, pki.ca) as peer:
        config = tmp_path / "anonymous.yaml"
        config.write_text(
            yaml.safe_dump({"ae_title": OUR_AET, "tls": {"ca_certificates": str(pki.ca)}}),
            encoding="utf-8",
        )
        done = cli(config, "echo", "--tls", peer.address)

    assert done.returncode == ExitCode.UNREACHABLE, done.stderr
    assert "client certificate" in done.stderr


def test_tls_peer_on_a_plain_port(tmp_path: Path, pki: Pki) -> None:
    require_dcmtk_tls("storescp")
    out = tmp_path / "received"
    with storescp(out) as plain:
        config = scu_config(tmp_path, pki, {"PLAIN": plain})
        done = cli(config, "echo", "PLAIN")

    assert done.returncode == ExitCode.UNREACHABLE, done.stderr
    assert f"TLS handshake with {plain.address} failed" in done.stderr


def test_unusable_tls_files_are_a_usage_error(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "broken.yaml"
    missing = tmp_path / "nowhere.crt"
    config.write_text(
        yaml.safe_dump(
            {
                "tls": {
                    "certificate": str(missing),
                    "private_key": str(pki.client.key),
                    "ca_certificates": str(pki.ca),
                }
            }
        ),
        encoding="utf-8",
    )
    done = cli(config, "echo", "--tls", "ANY@127.0.0.1:9")

    assert done.returncode == ExitCode.USAGE, done.stderr
    assert f"tls.certificate: {missing} does not exist" in done.stderr


def test_move_to_a_tls_destination(tmp_path: Path, pki: Pki) -> None:
    require_dcmtk_tls("storescp", "movescu")
    out = tmp_path / "dest"
    with tls_storescp(out, pki.peer_server, pki.ca, aet="DEST") as dest:
        peers = {"DEST": {"ae_title": "DEST", "host": dest.host, "port": dest.port, "tls": True}}
        # Our node calls DEST with its own certificate (tls.certificate) as client certificate,
        # with no TLS listener of its own.
        identity = {
            "certificate": str(pki.server.certificate),
            "private_key": str(pki.server.key),
            "ca_certificates": str(pki.ca),
        }
        retrievers = ["echo", "store", "find", "move", "get"]
        with run_node(
            tmp_path / "node", unknown_peers=retrievers, peers=peers, tls=identity
        ) as node:
            sent = node.cli("send", node.address, str(CT))
            assert sent.returncode == 0, sent.stdout + sent.stderr
            study = str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID)
            moved = subprocess.run(
                ["movescu", "-S", "-aec", node.ae_title, "-aem", "DEST",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                 node.host, str(node.port)],
                capture_output=True, text=True, env=DCMTK_ENV, timeout=TIMEOUT, check=False,
            )  # fmt: skip
            assert moved.returncode == 0, moved.stdout + moved.stderr
            node.wait_for_log("C-MOVE from MOVESCU to DEST")

    files = [p for p in out.iterdir() if p.is_file()]
    assert len(files) == 1
    # storescp +tls speaks nothing but TLS: the file arriving is the proof it went over TLS.
    assert dataset_bytes(files[0]) == dataset_bytes(CT)


def test_worklist_query_over_tls_to_our_own_tls_port(tmp_path: Path, pki: Pki) -> None:
    """`worklist query --tls` calls the peer over TLS, presenting tls.certificate (here the
    node's own, signed by the trusted CA); without --tls the TLS port refuses it (exit 5)."""
    settings: dict[str, Any] = {
        "tls": pki.node_tls(),
        "unknown_peers": ["echo", "worklist"],
        "worklist": {"expire_after_days": 0},
    }
    with run_node(tmp_path / "node", **settings) as node:
        items = tmp_path / "items.yaml"
        item = {**YAML_ITEMS[0], "PatientID": "TLS1"}
        items.write_text(yaml.safe_dump([item]), encoding="utf-8")
        assert node.cli("worklist", "add", str(items)).returncode == 0
        address = f"{node.ae_title}@127.0.0.1:{node.tls_port}"
        done = node.cli("worklist", "query", "--tls", address, "--json")
        assert done.returncode == 0, done.stderr
        (match,) = json.loads(done.stdout)
        assert "TLS1" in json.dumps(match)
        plain = node.cli("worklist", "query", address)
        assert plain.returncode == ExitCode.UNREACHABLE, plain.stderr
