"""DICOM TLS (PS3.15 B.9, the BCP 195 TLS Secure Transport Connection Profile): the SSL contexts
of our listener and of our SCU associations, built from ``config.tls``.

Both ends are authenticated as PS3.15 B.9 expects: our listener presents ``tls.certificate`` and
(by default) requires a client certificate signed by ``tls.ca_certificates``; our SCU checks the
called peer's certificate chain against the same CA file and presents our certificate.

Every problem with the configured files is a :class:`TlsError` naming the key and the file, so
the node refuses to start (or to reload) with a message a person can act on instead of an
OpenSSL error code.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import ClientCertificates, TlsSettings


class TlsError(ValueError):
    """A ``tls.*`` setting that cannot be used; the message names the key, the file and why."""


# BCP 195 (RFC 9325 4.2, which updated RFC 7525 4.2) recommends, for TLS 1.2, exactly the
# ECDHE key exchanges with AES-GCM: forward secrecy and authenticated encryption, no CBC (Lucky
# 13 and its kin), no RSA key transport (no forward secrecy), no SHA-1 MAC, no RC4/3DES/NULL.
# RFC 9325 also moved finite-field DHE to "SHOULD NOT" (RFC 7525 still listed it), so it is left
# out. Python's default list is close but also allows CBC and DHE suites; we name the set
# instead of depending on Python's or the system's defaults. OpenSSL order is our preference
# (AES-128 first as the RFC lists it, ECDSA before RSA). These interoperate with DCMTK's
# default "Non-downgrading BCP 195" profile (+py) and with its "BCP 195" profile (+px).
# TLS 1.3 suites are not affected by this string: all of OpenSSL's (AES-GCM, ChaCha20-Poly1305)
# are AEAD with forward secrecy, as RFC 9325 4.2 asks.
BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
    )
)

# tls.min_version -> the ssl module's version. BCP 195 (RFC 8996, RFC 9325 3.1.1): TLS 1.0
# and 1.1 MUST NOT be negotiated, so nothing lower than 1.2 can be configured.
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = re.compile(rb"-----BEGIN (?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----")
_PEM_ENCRYPTED = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED")


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context our DICOM TLS listener wraps accepted connections with.

    It presents ``tls.certificate``/``tls.private_key``, accepts TLS ``tls.min_version`` (never
    below 1.2) with the BCP 195 cipher suites, and asks callers for a client certificate as
    ``tls.client_certificates`` says: ``required`` refuses a handshake without a certificate
    signed by ``tls.ca_certificates``, ``optional`` checks one when presented, ``none`` asks for
    none.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, settings)
    # The server picks the suite from its own preference order, not the client's.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_identity(context, settings, required=True)
    mode = settings.client_certificates
    if mode is ClientCertificates.NONE:
        context.verify_mode = ssl.CERT_NONE
        if settings.ca_certificates is not None:
            _load_ca(context, settings.ca_certificates)
    else:
        if settings.ca_certificates is None:
            raise TlsError(
                f"tls.ca_certificates: not set; it is required with tls.client_certificates: "
                f"{mode.value} (it is what callers' certificates are checked against)"
            )
        _load_ca(context, settings.ca_certificates)
        context.verify_mode = (
            ssl.CERT_REQUIRED if mode is ClientCertificates.REQUIRED else ssl.CERT_OPTIONAL
        )
    return context


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context our SCU wraps its connection to a peer configured with ``tls: true`` in.

    The peer's certificate chain must verify against ``tls.ca_certificates`` (the system's
    trusted CAs when it is not set); ``tls.certificate``/``tls.private_key`` are presented as
    our client certificate when set (peers that require one, as DCMTK does by default, refuse us
    otherwise).

    The host name is NOT checked against the certificate (``check_hostname`` off): DICOM peers
    are configured by IP address far more often than by name, and modality and PACS certificates
    seldom carry the address as a subjectAltName, so checking would refuse most real peers.
    Trust comes from the chain instead: only a certificate issued by the configured CA is
    accepted, which is also what DCMTK does by default (``--require-peer-cert``, no host name
    check). Point ``tls.ca_certificates`` at the CA that signs your DICOM devices, not at a
    public CA bundle.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, settings)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.ca_certificates is not None:
        _load_ca(context, settings.ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _load_identity(context, settings, required=False)
    return context


def _harden(context: ssl.SSLContext, settings: TlsSettings) -> None:
    version = _VERSIONS.get(settings.min_version)
    if version is None:
        raise TlsError(
            f"tls.min_version: {settings.min_version!r} is not one of "
            + ", ".join(_VERSIONS)
            + " (BCP 195: nothing older than TLS 1.2)"
        )
    # Set explicitly so that the floor never depends on the system's OpenSSL policy (which on
    # some systems still allows TLS 1.0).
    context.minimum_version = version
    try:
        context.set_ciphers(BCP195_CIPHERS)
    except ssl.SSLError as exc:  # an OpenSSL built without them: refuse rather than weaken
        raise TlsError(f"this OpenSSL offers none of the BCP 195 cipher suites: {exc}") from exc
    # No TLS-level compression (CRIME; RFC 9325 3.3) and no renegotiation (which BCP 195 only
    # tolerates with RFC 5746; nothing in DICOM needs it). Python sets the first already.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load_identity(context: ssl.SSLContext, settings: TlsSettings, *, required: bool) -> None:
    """Load our certificate and key: both required on the server; both or neither on a client."""
    certificate, key = settings.certificate, settings.private_key
    if certificate is None and key is None and not required:
        return
    if certificate is None:
        raise TlsError(
            "tls.certificate: not set"
            + (
                " (required with tls.enabled)"
                if required
                else ", but tls.private_key is (give both)"
            )
        )
    if key is None:
        raise TlsError(
            "tls.private_key: not set"
            + (
                " (required with tls.enabled)"
                if required
                else ", but tls.certificate is (give both)"
            )
        )
    cert_bytes = _read("tls.certificate", certificate)
    if _PEM_CERTIFICATE not in cert_bytes:
        raise TlsError(
            f"tls.certificate: {certificate} is not a PEM certificate (no "
            f"'{_PEM_CERTIFICATE.decode()}' line; convert DER with "
            f"'openssl x509 -inform der -in FILE -out FILE.pem')"
        )
    key_bytes = _read("tls.private_key", key)
    if not _PEM_KEY.search(key_bytes):
        raise TlsError(
            f"tls.private_key: {key} is not a PEM private key (no '-----BEGIN ... PRIVATE "
            f"KEY-----' line)"
        )
    if _PEM_ENCRYPTED.search(key_bytes):
        raise TlsError(
            f"tls.private_key: {key} is encrypted; the node cannot ask for a passphrase. "
            f"Decrypt it (openssl pkey -in FILE -out FILE.plain) and make it readable by the "
            f"service user only"
        )
    try:
        # A password callback that answers nothing: OpenSSL never prompts on the terminal.
        context.load_cert_chain(str(certificate), str(key), password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"tls.private_key: {key} does not match tls.certificate {certificate} (the key "
                f"is not the one the certificate was issued for)"
            ) from exc
        raise TlsError(
            f"tls.certificate {certificate} / tls.private_key {key}: OpenSSL cannot use them: "
            f"{_reason(exc)}"
        ) from exc
    except OSError as exc:
        raise TlsError(
            f"tls.certificate {certificate} / tls.private_key {key}: cannot read: "
            f"{exc.strerror or exc}"
        ) from exc


def _load_ca(context: ssl.SSLContext, path: Path) -> None:
    data = _read("tls.ca_certificates", path)
    if _PEM_CERTIFICATE not in data:
        raise TlsError(
            f"tls.ca_certificates: {path} holds no PEM certificate (no "
            f"'{_PEM_CERTIFICATE.decode()}' line)"
        )
    try:
        context.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"tls.ca_certificates: {path}: OpenSSL cannot use it: {_reason(exc)}"
        ) from exc


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{key}: {path} does not exist") from None
    except IsADirectoryError:
        raise TlsError(f"{key}: {path} is a folder, not a PEM file") from None
    except OSError as exc:
        raise TlsError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason.replace('_', ' ').lower()} ({exc.library or 'ssl'})"
    return str(exc.strerror or exc)


# --- why a caller's handshake failed ---------------------------------------------------------

# OpenSSL's reason for a failed server-side handshake -> what it means for a DICOM caller.
_REFUSALS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
        "the caller presented no client certificate (tls.client_certificates: required)"
    ),
    "WRONG_VERSION_NUMBER": "not a TLS handshake (a plain DICOM association on the TLS port?)",
    "HTTP_REQUEST": "not a TLS handshake (an HTTP request)",
    "UNSUPPORTED_PROTOCOL": "the caller offers only TLS versions older than tls.min_version",
    "VERSION_TOO_LOW": "the caller offers only TLS versions older than tls.min_version",
    "NO_SHARED_CIPHER": "no cipher suite in common (we accept the BCP 195 suites only)",
    "TLSV1_ALERT_UNKNOWN_CA": "the caller does not trust the CA of our certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the caller refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the caller refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the caller says our certificate has expired",
}


def handshake_refusal(exc: BaseException) -> str:
    """Why a caller's TLS handshake with our listener failed, in words for the log and audit
    (e.g. no client certificate, one from an unknown CA, TLS 1.1, a plain DICOM caller)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the caller's certificate is not trusted: {exc.verify_message} (it must be signed "
            f"by a CA in tls.ca_certificates)"
        )
    if isinstance(exc, ssl.SSLError) and exc.reason in _REFUSALS:
        return _REFUSALS[exc.reason]
    if isinstance(exc, TimeoutError):
        return "no TLS handshake within limits.acse_timeout"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        return "the caller closed the connection during the TLS handshake"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    return str(exc) or type(exc).__name__


# --- who is at the other end ------------------------------------------------------------------

# X.509 attribute names as getpeercert() spells them -> the short names of RFC 4514.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "emailAddress": "emailAddress",
}


@dataclass(frozen=True)
class TlsPeer:
    """What a finished TLS handshake says about the other end (for log lines and the audit)."""

    version: str  # e.g. TLSv1.3
    cipher: str  # e.g. TLS_AES_256_GCM_SHA384
    # The verified certificate's subject and issuer as "CN=...,O=..."; None when the peer
    # presented none (tls.client_certificates optional or none).
    subject: str | None = None
    issuer: str | None = None
    common_name: str | None = None

    def describe(self) -> str:
        who = (
            f"certificate {self.subject} issued by {self.issuer}"
            if self.subject is not None
            else "no certificate"
        )
        return f"{self.version} {self.cipher}, {who}"


def tls_peer(sock: socket.socket | None) -> TlsPeer | None:
    """The TLS identity of the peer on ``sock``; None when it is not a TLS socket.

    Only a certificate that verified against ``tls.ca_certificates`` is reported (Python returns
    no details of an unverified one), so ``subject`` is an authenticated identity.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cipher = sock.cipher()
    version = sock.version() or "TLS"
    name = cipher[0] if cipher else "unknown cipher"
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):  # handshake not done, or the connection is gone
        cert = None
    if not cert:
        return TlsPeer(version, name)
    subject = _rdns(cert.get("subject", ()))
    issuer = _rdns(cert.get("issuer", ()))
    common = [value for key, value in _attributes(cert.get("subject", ())) if key == "commonName"]
    return TlsPeer(
        version,
        name,
        subject=subject or "(empty subject)",
        issuer=issuer or "(empty issuer)",
        common_name=common[-1] if common else None,
    )


def _attributes(rdns: object) -> Iterable[tuple[str, str]]:
    if not isinstance(rdns, tuple):
        return
    for rdn in rdns:
        for pair in rdn if isinstance(rdn, tuple) else ():
            if isinstance(pair, tuple) and len(pair) == 2:
                yield str(pair[0]), str(pair[1])


def _rdns(rdns: object) -> str:
    # RFC 4514 writes the most specific RDN first; certificates list them the other way round.
    parts = [f"{_SHORT_NAMES.get(k, k)}={v}" for k, v in _attributes(rdns)]
    return ",".join(reversed(parts))
