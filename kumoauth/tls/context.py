"""
The server's TLS configuration (SPEC §3 ``[tls]``, §8).

One server context is built at start-up (and on each reload) and shared by
every connection, STARTTLS and implicit TLS alike: TLS 1.2 minimum, forward-
secret AEAD suites only (``[tls] ciphers``), a short list of key-exchange
groups (``[tls] groups``), server cipher preference, no compression, no
renegotiation, the whole PEM chain served.  Session tickets are either off
completely (no TLS 1.2 ticket, no TLS 1.3 NewSessionTicket) or on with keys
of our own, shared by every ``[server] workers`` process and by every
context a reload builds, and rotated hourly (the previous key still
decrypts).

The context and connections are :mod:`kumoauth.tls.openssl`'s (the system
OpenSSL 3 ``libssl``), not pyOpenSSL's: pyOpenSSL cannot stop TLS 1.3
tickets, set the groups list or the ticket keys.  See docs/decisions.md.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from kumoauth.checks import file_problem
from kumoauth.config import TLSConfig
from kumoauth.tls import openssl as ossl

#: TLS 1.2 suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 only
#: (no RSA key exchange, no CBC, no SHA-1 MACs, no 3DES/RC4/NULL/export): a
#: subset of Mozilla's *intermediate* list (which adds DHE-RSA suites).
#: TLS 1.3 suites are all AEAD and use OpenSSL's defaults.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: Key-exchange groups, most preferred first (Mozilla *intermediate* and
#: *modern*); the hybrid post-quantum one only where this OpenSSL has it.
GROUPS = ("X25519MLKEM768", "X25519", "P-256", "P-384")
OPTIONAL_GROUPS = frozenset({"X25519MLKEM768"})

_VERSIONS = {"TLSv1.2": ossl.TLS1_2_VERSION, "TLSv1.3": ossl.TLS1_3_VERSION}

#: Ticket keys change this often (seconds); a ticket is accepted for one
#: more period after that, so it lives between one and two periods.
TICKET_KEY_PERIOD = 3600
#: TLS 1.3 NewSessionTicket messages per handshake when tickets are on
#: (OpenSSL's default is 2; one is enough for a client that resumes).
TICKETS_PER_HANDSHAKE = 1

Context = ossl.Context
Connection = ossl.Connection


class TLSError(Exception):
    """
    The certificate, key, groups or ciphers cannot be used: an operator
    error.
    """


# --- session ticket keys --------------------------------------------------------


class TicketKeys:
    """
    Session-ticket keys derived from one secret and the clock: every process
    given the same secret (the ``[server] workers``) computes the same keys
    without talking to the others, and they rotate by themselves every
    *period* seconds.  ``keys()`` is [current, previous]: the first
    encrypts, both decrypt.  The secret and the keys are never logged.
    """

    def __init__(
        self,
        secret: bytes,
        period: float = TICKET_KEY_PERIOD,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 32:
            raise ValueError("the ticket secret must be at least 32 bytes")
        self._secret = secret
        self.period = period
        self.clock = clock
        self._epoch: int | None = None
        self._keys: list[tuple[bytes, bytes, bytes]] = []

    def __repr__(self) -> str:
        return f"<TicketKeys period={self.period}>"  # never the secret

    def _derive(self, epoch: int) -> tuple[bytes, bytes, bytes]:
        info = b"kumoauth session ticket key %d " % epoch
        name, aes, mac = (
            hmac.new(self._secret, info + label, hashlib.sha256).digest()
            for label in (b"name", b"aes", b"hmac")
        )
        return name[:16], aes, mac

    def keys(self) -> list[tuple[bytes, bytes, bytes]]:
        epoch = int(self.clock() // self.period)
        if epoch != self._epoch:
            self._keys = [self._derive(epoch), self._derive(epoch - 1)]
            self._epoch = epoch
        return self._keys


_lock = threading.Lock()
_ticket_keys: TicketKeys | None = None


def ticket_keys(secret: bytes | None = None) -> TicketKeys:
    """
    This process's ticket keys, created on first use (from *secret*, or a
    random one).  They live as long as the process: a reload keeps them.
    """
    global _ticket_keys
    with _lock:
        if _ticket_keys is None:
            _ticket_keys = TicketKeys(secret if secret is not None else os.urandom(32))
            ossl.set_ticket_keys(_ticket_keys.keys)
        return _ticket_keys


def ticket_secret() -> bytes:
    """
    The secret to hand a worker process so its tickets are ours (and the
    other workers').
    """
    return ticket_keys()._secret


def adopt_ticket_secret(secret: bytes) -> None:
    """
    In a worker, before any context is built: use the supervisor's secret.
    """
    global _ticket_keys
    with _lock:
        _ticket_keys = TicketKeys(secret)
        ossl.set_ticket_keys(_ticket_keys.keys)


# --- context ----------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class ServerContextFactory:
    """
    Creates each server-side TLS connection from the one shared, pre-built
    context (so a connection costs an ``SSL_new``, not a context).
    """

    def __init__(self, context: Context) -> None:
        self._context = context

    def getContext(self) -> Context:
        return self._context

    def set_context(self, context: Context) -> None:
        """
        Use *context* for connections from now on (a reload); connections
        already made keep theirs.
        """
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> Connection:  # type: ignore[override]
        # Not an OpenSSL.SSL.Connection, but the same interface for Twisted.
        return Connection(self._context)


def available_group(name: str) -> bool:
    """Whether this OpenSSL knows the key-exchange group *name*."""
    try:
        Context().set_groups(name.encode())
    except (ossl.Error, UnicodeEncodeError):
        return False
    return True


def groups(cfg: TLSConfig) -> tuple[str, ...]:
    """
    The groups to offer: ``[tls] groups`` (each one must exist) or the
    default list without what this OpenSSL lacks.  Raises :class:`TLSError`.
    """
    if cfg.groups is None:
        return tuple(g for g in GROUPS if g not in OPTIONAL_GROUPS or available_group(g))
    for name in cfg.groups:
        if ":" in name or not available_group(name):
            raise TLSError(f'[tls] groups: unknown key-exchange group "{name}" ({ossl.VERSION})')
    return cfg.groups


def read_pem(cfg: TLSConfig) -> tuple[bytes, bytes]:
    """
    The private key's and the certificate chain's files, as they are now:
    ``(key, chain)``.  Raises :class:`TLSError` naming the file, never what
    it holds.
    """
    found = {}
    for label, path in (("certificate", cfg.certificate), ("private_key", cfg.private_key)):
        problem = file_problem(path)
        if problem is None:
            try:
                found[label] = Path(path).read_bytes()
                continue
            except OSError as e:
                problem = f"cannot be read ({e.strerror or e})"
        raise TLSError(f"[tls] {label}: {path}: {problem}")
    return found["private_key"], found["certificate"]


def build_context(cfg: TLSConfig, pem: tuple[bytes, bytes] | None = None) -> Context:
    """
    Load the chain and key into a new server context: *pem* (``(key,
    chain)``, as :func:`read_pem` read them, perhaps in another process),
    or the files as they are now.  Raises :class:`TLSError` with a
    one-line reason naming the configured file.
    """
    key, chain = pem if pem is not None else read_pem(cfg)
    ctx = Context()
    ctx.set_min_proto_version(_VERSIONS[cfg.min_version])
    ctx.set_options(
        ossl.SSL_OP_NO_COMPRESSION
        | ossl.SSL_OP_CIPHER_SERVER_PREFERENCE
        | ossl.SSL_OP_NO_RENEGOTIATION
    )
    ciphers = cfg.ciphers if cfg.ciphers is not None else CIPHERS
    try:
        ctx.set_cipher_list(ciphers.encode())
    except (ossl.Error, UnicodeEncodeError):
        raise TLSError(f'[tls] ciphers: no TLS 1.2 cipher suite matches "{ciphers}"') from None
    try:
        ctx.set_groups(":".join(groups(cfg)).encode())
    except ossl.Error:
        raise TLSError(f"[tls] groups: {', '.join(groups(cfg))}: refused by OpenSSL") from None
    # Idle connections give their 34 KiB of OpenSSL read/write buffers back.
    ctx.set_mode(ossl.SSL_MODE_RELEASE_BUFFERS)
    ctx.set_session_id(b"kumoauth")
    # No server-side session cache either way: a per-process cache would not
    # work across workers, and with tickets off there is nothing to resume.
    ctx.set_session_cache_mode(ossl.SSL_SESS_CACHE_OFF)
    if not cfg.session_tickets:
        # No TLS 1.2 ticket extension (NO_TICKET) and no TLS 1.3
        # NewSessionTicket (num_tickets 0: NO_TICKET alone only makes 1.3
        # tickets stateful): issuing them costs CPU on every session for
        # clients that never resume; see BENCHMARKS.md.  Off unless asked for.
        ctx.set_options(ossl.SSL_OP_NO_TICKET)
        ctx.set_num_tickets(0)
    else:
        ticket_keys()
        ctx.use_ticket_keys()
        ctx.set_num_tickets(TICKETS_PER_HANDSHAKE)
        ctx.set_timeout(TICKET_KEY_PERIOD)
    # The key first: loaded after the certificate, OpenSSL would report a
    # mismatch as an unreadable key.
    try:
        ctx.use_privatekey_pem(key)
    except ossl.Error:
        if b"ENCRYPTED" in key:
            # OpenSSL asked for a passphrase no one can type at start-up.
            raise TLSError(
                f"[tls] private_key: {cfg.private_key}: the key is encrypted (a passphrase "
                "is needed); kumoauth takes an unencrypted key (openssl pkey -in KEY -out NEW), "
                "readable by the service only"
            ) from None
        raise TLSError(f"[tls] private_key: {cfg.private_key}: not a PEM private key") from None
    try:
        ctx.use_certificate_chain_pem(chain)
    except ossl.Error:
        raise TLSError(
            f"[tls] certificate: {cfg.certificate}: not a PEM certificate chain"
        ) from None
    try:
        ctx.check_privatekey()
    except ossl.Error:
        raise TLSError(
            f"[tls] private_key: {cfg.private_key}: does not match the certificate"
        ) from None
    return ctx


def make_self_signed(certificate: Path, private_key: Path, hostname: str) -> None:
    """
    Write a self-signed ECDSA P-256 certificate for *hostname* (and
    localhost, 127.0.0.1, ::1), valid one year, for development only.  It
    carries what strict verifiers (cryptography's, hence sslyze's) require
    of a leaf: subject and authority key identifiers, key usage
    (digitalSignature) and extended key usage serverAuth.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for dns in dict.fromkeys([hostname.lower(), "localhost"]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(dns)))
        except ValueError:
            sans.append(x509.DNSName(dns))
    for address in ("127.0.0.1", "::1"):
        ip = x509.IPAddress(ipaddress.ip_address(address))
        if ip not in sans:
            sans.append(ip)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
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


def describe(connection: Any) -> dict[str, str]:
    """
    The conn_meta keys of SPEC §4 for an established TLS connection (a
    :class:`Connection`, or anything with pyOpenSSL's ``Connection`` API).
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
