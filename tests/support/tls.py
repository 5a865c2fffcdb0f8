"""Throwaway PKI for DICOM TLS tests: a CA, certificates it signs, and an untrusted second CA.

Made with trustme (real X.509 certificates and keys, written as PEM files under the test's
folder), so the node, DCMTK and our SCU all run their real TLS handshakes against them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import trustme

from tests.support.dcmtk import require_dcmtk

# RSA keys: what hospital PKIs hand out, and what every DCMTK TLS profile accepts.
KEY_TYPE = trustme.KeyType.RSA


@dataclass(frozen=True)
class KeyPair:
    """A certificate (PEM, leaf first, then its chain up to the CA) and its private key."""

    certificate: Path
    key: Path

    def dcmtk(self) -> list[str]:
        """DCMTK's ``+tls`` option: the private key file, then the certificate file."""
        return ["+tls", str(self.key), str(self.certificate)]


@dataclass(frozen=True)
class Pki:
    """Everything a TLS test needs, as files."""

    ca: Path  # the CA the node and our SCU trust (tls.ca_certificates)
    server: KeyPair  # the node's own certificate: 127.0.0.1 and localhost, signed by ca
    client: KeyPair  # a peer's client certificate signed by ca (CN DCMTKSCU)
    peer_server: KeyPair  # a peer's server certificate (e.g. storescp +tls), signed by ca
    rogue_ca: Path  # another CA, trusted by nobody here
    rogue_client: KeyPair  # a client certificate signed by rogue_ca
    rogue_server: KeyPair  # a server certificate for 127.0.0.1 signed by rogue_ca

    def node_tls(self, **overrides: object) -> dict[str, object]:
        """The ``tls`` section of a node configuration that serves TLS with these files."""
        settings: dict[str, object] = {
            "enabled": True,
            "port": 0,
            "certificate": str(self.server.certificate),
            "private_key": str(self.server.key),
            "ca_certificates": str(self.ca),
            "client_certificates": "required",
        }
        settings.update(overrides)
        return settings


def _write(ca: trustme.CA, folder: Path, name: str, *identities: str, cn: str) -> KeyPair:
    leaf = ca.issue_cert(*identities, common_name=cn, key_type=KEY_TYPE)
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    with pair.certificate.open("wb") as out:
        for pem in leaf.cert_chain_pems:
            out.write(pem.bytes())
    leaf.private_key_pem.write_to_path(str(pair.key))
    pair.key.chmod(0o600)
    return pair


def make_pki(folder: Path) -> Pki:
    """Generate the CAs and certificates as PEM files in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="dicomnode test CA", key_type=KEY_TYPE)
    rogue = trustme.CA(organization_name="untrusted test CA", key_type=KEY_TYPE)
    ca.cert_pem.write_to_path(str(folder / "ca.crt"))
    rogue.cert_pem.write_to_path(str(folder / "rogue-ca.crt"))
    loopback = ("127.0.0.1", "localhost")
    return Pki(
        ca=folder / "ca.crt",
        server=_write(ca, folder, "node", *loopback, cn="DICOMNODE"),
        client=_write(ca, folder, "client", "dcmtkscu.test", cn="DCMTKSCU"),
        peer_server=_write(ca, folder, "peer", *loopback, cn="STORESCP"),
        rogue_ca=folder / "rogue-ca.crt",
        rogue_client=_write(rogue, folder, "rogue-client", "rogue.test", cn="ROGUESCU"),
        rogue_server=_write(rogue, folder, "rogue-server", *loopback, cn="ROGUESCP"),
    )


@cache
def dcmtk_has_tls() -> bool:
    """Whether the installed DCMTK was built with OpenSSL (its tools then offer ``+tls``)."""
    try:
        out = subprocess.run(
            ["echoscu", "--help"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return False
    return "+tls" in out.stdout + out.stderr


def require_dcmtk_tls(*tools: str) -> None:
    """Skip the calling test when DCMTK is missing or was built without TLS support."""
    require_dcmtk("echoscu", *tools)
    if not dcmtk_has_tls():
        pytest.skip("the installed DCMTK has no TLS support (echoscu --help shows no +tls)")
