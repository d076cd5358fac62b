"""
The server's TLS configuration (SPEC §3 ``[tls]``, §8).

One pyOpenSSL ``Context`` is built at start-up and shared by every
connection (STARTTLS and implicit TLS alike): TLS 1.2 minimum, forward-secret
AEAD suites only, server cipher preference, no compression, no
renegotiation, the whole PEM chain served.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from kumoauth.config import TLSConfig

#: TLS 1.2 suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 only
#: (no RSA key exchange, no CBC, no SHA-1 MACs, no 3DES/RC4/NULL/export).
#: TLS 1.3 suites are all AEAD and use OpenSSL's defaults.
CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}


class TLSError(Exception):
    """
    The certificate or key cannot be used: an operator error.
    """


@implementer(IOpenSSLServerConnectionCreator)
class ServerContextFactory:
    """
    Creates each server-side TLS connection from the one shared, pre-built
    context (so a connection costs an ``SSL_new``, not a context).
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context

    def set_context(self, context: SSL.Context) -> None:
        """
        Use *context* for connections from now on (a reload); connections
        already made keep theirs.
        """
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def build_context(cfg: TLSConfig) -> SSL.Context:
    """
    Load the chain and key into a new server ``Context``.  Raises
    :class:`TLSError` with a one-line reason.
    """
    for label, path in (("certificate", cfg.certificate), ("private_key", cfg.private_key)):
        if not path.is_file():
            raise TLSError(f"[tls] {label}: {path}: file not found")
        if not os.access(path, os.R_OK):
            raise TLSError(f"[tls] {label}: {path}: not readable")
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(_VERSIONS[cfg.min_version])
    ctx.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    )
    ctx.set_cipher_list(CIPHERS)
    # Idle connections give their 34 KiB of OpenSSL read/write buffers back.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_session_id(b"kumoauth")
    if not cfg.session_tickets:
        # Issuing TLS 1.3 tickets (OpenSSL sends two after every handshake)
        # costs about 0.3 ms of CPU per session here, wasted on clients that
        # never resume; see BENCHMARKS.md.  Off unless asked for.
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    else:
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    # The key first: loaded after the certificate, OpenSSL would report a
    # mismatch as an unreadable key.
    try:
        ctx.use_privatekey_file(str(cfg.private_key).encode())
    except SSL.Error:
        raise TLSError(f"[tls] private_key: {cfg.private_key}: not a PEM private key") from None
    try:
        ctx.use_certificate_chain_file(str(cfg.certificate).encode())
    except SSL.Error:
        raise TLSError(
            f"[tls] certificate: {cfg.certificate}: not a PEM certificate chain"
        ) from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSError(
            f"[tls] private_key: {cfg.private_key}: does not match the certificate"
        ) from None
    return ctx


def make_self_signed(certificate: Path, private_key: Path, hostname: str) -> None:
    """
    Write a self-signed ECDSA P-256 certificate for *hostname* (and
    localhost, 127.0.0.1, ::1), valid one year, for development only.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    for path in (certificate, private_key):
        path.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def describe(connection: SSL.Connection) -> dict[str, str]:
    """
    The conn_meta keys of SPEC §4 for an established TLS connection.
    """
    meta = {
        "tls_cipher": connection.get_cipher_name() or "",
        "tls_protocol_version": connection.get_protocol_version_name(),
    }
    peer = connection.get_peer_certificate()
    if peer is not None:
        subject = peer.get_subject()
        meta["tls_peer_subject_name"] = ",".join(
            f"{k.decode()}={v.decode('utf-8', 'replace')}" for k, v in subject.get_components()
        )
    return meta
