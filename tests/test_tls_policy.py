"""
TLS policy (issue items 8-10): key-exchange groups, TLS 1.2 cipher suites,
session tickets (none when off; resumption when on, across a reload and
across worker processes), the self-signed development certificate, and
Mozilla *intermediate* compliance checked by sslyze.

Real servers (``twistd kumoauth``) on 127.0.0.1, real clients: the stdlib
``ssl`` module and the ``openssl`` command line.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from bench.handshake import handshake
from kumoauth.config import TLSConfig
from kumoauth.tls import context as tls
from tests.server import Certs, Server, free_port, make_certs, write_config
from tests.test_e2e import POLICY
from tests.test_workers import ready_count, wait_for

REPO = Path(__file__).resolve().parent.parent
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="no openssl command")


# --- helpers -------------------------------------------------------------------


def start_server(directory: Path, certs: Certs, tls_lines: str = "", server: str = "") -> Server:
    """A twistd kumoauth whose [tls] table has *tls_lines* added."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = (free_port(), free_port(), free_port())
    config = write_config(directory, certs, ports, POLICY, server=server)
    text = config.read_text().replace("[tls]\n", "[tls]\n" + tls_lines + "\n", 1)
    config.write_text(text)
    srv = Server(None, directory, config, *ports, certs=certs)  # type: ignore[arg-type]
    srv.start()
    return srv


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


@pytest.fixture
def tickets_off(tmp_path: Path, certs: Certs) -> Iterator[Server]:
    srv = start_server(tmp_path / "off", certs)
    yield srv
    srv.stop()


@pytest.fixture
def tickets_on(tmp_path: Path, certs: Certs) -> Iterator[Server]:
    srv = start_server(tmp_path / "on", certs, "session_tickets = true")
    yield srv
    srv.stop()


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def starttls(
    port: int,
    ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    waits: list[float] | None = None,
) -> ssl.SSLSocket:
    """A STARTTLS session, TLS up and one EHLO answered inside it (so the
    client has read any TLS 1.3 NewSessionTicket); *waits* gets that
    EHLO's round trip."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        _reply(raw)
        raw.sendall(b"EHLO client.example\r\n")
        _reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        assert _reply(raw).startswith(b"220")
        conn = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    except BaseException:
        raw.close()
        raise
    start = time.monotonic()
    conn.sendall(b"EHLO client.example\r\n")
    assert _reply(conn).startswith(b"250")  # type: ignore[arg-type]
    if waits is not None:
        waits.append(time.monotonic() - start)
    return conn


def resumption_rate(
    srv: Server, ctx: ssl.SSLContext, n: int, session: ssl.SSLSession | None = None
) -> tuple[float, ssl.SSLSession | None]:
    """Connect *n* times, each resuming the previous session: the fraction
    of handshakes that resumed."""
    reused = 0
    for _ in range(n):
        with starttls(srv.starttls_port, ctx, session) as conn:
            reused += conn.session_reused
            session = conn.session
    return reused / n, session


def client(version: ssl.TLSVersion, certs: Certs) -> ssl.SSLContext:
    ctx = certs.client_context()
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def s_client(srv: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` through STARTTLS; sends QUIT and reads to the end
    (so every NewSessionTicket the server sends is seen)."""
    assert OPENSSL is not None
    return subprocess.run(
        [
            OPENSSL,
            "s_client",
            "-connect",
            f"127.0.0.1:{srv.starttls_port}",
            "-starttls",
            "smtp",
            "-servername",
            "localhost",
            "-CAfile",
            str(srv.certs.chain.parent / "ca.pem"),
            "-crlf",
            "-ign_eof",
            *args,
        ],  # fmt: skip
        input="QUIT\n",
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(autouse=True)
def _ca_file(certs: Certs) -> None:
    certs.ca.cert_pem.write_to_path(str(certs.chain.parent / "ca.pem"))


# --- groups (item 8) --------------------------------------------------------------


@needs_openssl
def test_default_groups_offered_and_refused(tickets_off: Server) -> None:
    for group in ("X25519", "P-256", "P-384"):
        r = s_client(tickets_off, "-tls1_3", "-groups", group, "-brief")
        assert "CONNECTION ESTABLISHED" in r.stderr, (group, r.stderr)
    for group in ("X448", "P-521", "ffdhe2048", "ffdhe3072"):
        r = s_client(tickets_off, "-tls1_3", "-groups", group, "-brief")
        assert "CONNECTION ESTABLISHED" not in r.stderr, group
    # TLS 1.2: a client offering X448 and P-521 first gets P-256 (in 1.2 the
    # list also limits the certificate's curve, so P-256 must be in it).
    r = s_client(tickets_off, "-tls1_2", "-groups", "X448:P-521:P-256", "-brief")
    assert "CONNECTION ESTABLISHED" in r.stderr, r.stderr
    assert re.search(r"Temp Key: ECDH, (prime256v1|P-256)", r.stderr), r.stderr


def test_default_groups_depend_on_the_openssl_build() -> None:
    cfg = TLSConfig(certificate=Path("c"), private_key=Path("k"))
    expected = ["X25519", "P-256", "P-384"]
    if tls.available_group("X25519MLKEM768"):
        expected.insert(0, "X25519MLKEM768")
    assert list(tls.groups(cfg)) == expected


@needs_openssl
def test_configured_groups_are_the_only_ones(tmp_path: Path, certs: Certs) -> None:
    srv = start_server(tmp_path / "srv", certs, 'groups = ["P-384"]')
    try:
        assert "CONNECTION ESTABLISHED" in s_client(srv, "-groups", "P-384", "-brief").stderr
        assert "CONNECTION ESTABLISHED" not in s_client(srv, "-groups", "X25519", "-brief").stderr
    finally:
        srv.stop()


def _config(tmp_path: Path, certs: Certs, tls_lines: str) -> Path:
    path = write_config(tmp_path, certs, (1, 2, 3), POLICY)
    path.write_text(path.read_text().replace("[tls]\n", "[tls]\n" + tls_lines + "\n", 1))
    return path


@pytest.mark.parametrize(
    "lines,message",
    [
        ('groups = ["X25519", "nope"]', '[tls] groups: unknown key-exchange group "nope"'),
        ('groups = ["X25519:P-256"]', '[tls] groups: unknown key-exchange group "X25519:P-256"'),
        ('ciphers = "NOPE-CIPHER"', '[tls] ciphers: no TLS 1.2 cipher suite matches "NOPE-CIPHER"'),
        ('ciphers = "TLS_AES_128_GCM_SHA256"', "[tls] ciphers: no TLS 1.2 cipher suite matches"),
    ],
    ids=["unknown-group", "list-in-one-name", "unknown-cipher", "only-tls13"],
)
def test_bad_groups_or_ciphers_stop_startup_with_one_line(
    tmp_path: Path, certs: Certs, lines: str, message: str
) -> None:
    from kumoauth.config import load
    from kumoauth.ops.service import OperatorError, build_tls

    with pytest.raises(OperatorError) as e:
        build_tls(load(_config(tmp_path, certs, lines)))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# --- ciphers (item 8) ------------------------------------------------------------


def test_default_tls12_suites_are_ecdhe_aead(tickets_off: Server, certs: Certs) -> None:
    for suite, ok in (
        ("ECDHE-ECDSA-AES128-GCM-SHA256", True),
        ("ECDHE-ECDSA-CHACHA20-POLY1305", True),
        ("ECDHE-ECDSA-AES128-SHA256", False),
        ("ECDHE-ECDSA-AES256-SHA", False),
    ):
        ctx = client(ssl.TLSVersion.TLSv1_2, certs)
        ctx.set_ciphers(suite)
        try:
            with starttls(tickets_off.starttls_port, ctx) as conn:
                assert conn.cipher()[0] == suite
            accepted = True
        except (ssl.SSLError, ConnectionError, OSError):
            accepted = False
        assert accepted is ok, suite


def test_configured_ciphers(tmp_path: Path, certs: Certs) -> None:
    srv = start_server(tmp_path / "srv", certs, 'ciphers = "ECDHE-ECDSA-AES256-GCM-SHA384"')
    try:
        ctx = client(ssl.TLSVersion.TLSv1_2, certs)
        with starttls(srv.starttls_port, ctx) as conn:
            assert conn.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
        ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            starttls(srv.starttls_port, ctx).close()
        # TLS 1.3 is not governed by [tls] ciphers.
        with starttls(srv.starttls_port, client(ssl.TLSVersion.TLSv1_3, certs)) as conn:
            assert conn.version() == "TLSv1.3"
    finally:
        srv.stop()


@needs_openssl
def test_modern_is_tls13_only(tmp_path: Path, certs: Certs) -> None:
    srv = start_server(tmp_path / "srv", certs, 'min_version = "TLSv1.3"')
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            starttls(srv.starttls_port, client(ssl.TLSVersion.TLSv1_2, certs)).close()
        with starttls(srv.starttls_port, certs.client_context()) as conn:
            assert conn.version() == "TLSv1.3"
    finally:
        srv.stop()


# --- session tickets (item 9) ------------------------------------------------------


@needs_openssl
def test_no_tickets_when_off(tickets_off: Server, certs: Certs) -> None:
    r = s_client(tickets_off, "-tls1_3", "-msg")
    assert "221" in r.stdout, r.stdout[-2000:]
    assert r.stdout.count("NewSessionTicket") == 0
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client(version, certs)
        rate, session = resumption_rate(tickets_off, ctx, 3)
        assert rate == 0.0
        assert session is not None and not session.has_ticket


@needs_openssl
def test_one_ticket_and_resumption_when_on(tickets_on: Server, certs: Certs) -> None:
    r = s_client(tickets_on, "-tls1_3", "-msg")
    assert "221" in r.stdout, r.stdout[-2000:]
    assert r.stdout.count("NewSessionTicket") == tls.TICKETS_PER_HANDSHAKE
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client(version, certs)
        _, session = resumption_rate(tickets_on, ctx, 1)
        assert session is not None and session.has_ticket
        rate, _ = resumption_rate(tickets_on, ctx, 10, session)
        assert rate == 1.0, version


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
@pytest.mark.parametrize("tickets", [False, True], ids=["full", "resumed"])
def test_first_command_after_the_handshake_is_not_held_back(
    tmp_path: Path, certs: Certs, version: ssl.TLSVersion, tickets: bool
) -> None:
    """
    A client with Nagle's algorithm on (Python's sockets, swaks, Postfix)
    sends its first command right after its Finished, and holds it until
    that Finished is acknowledged.  When the server has nothing to send
    then (TLS 1.3 without tickets, any resumption), it must acknowledge at
    once: the kernel's delayed ACK made that command wait 40 ms.  (A full
    TLS 1.2 handshake ends with the server's Finished, so it never waited:
    the control case.)
    """
    srv = start_server(tmp_path / "srv", certs, "session_tickets = true" if tickets else "")
    try:
        ctx = client(version, certs)
        session = None
        waits: list[float] = []
        for _ in range(6):
            with starttls(srv.starttls_port, ctx, session, waits) as conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
                if tickets:
                    assert conn.session_reused == (session is not None)
                    session = conn.session
        if tickets:
            waits = waits[1:]  # the first one was a full handshake, with a ticket to send
        assert sorted(waits)[len(waits) // 2] < 0.03, waits
    finally:
        srv.stop()


def test_resumption_survives_a_reload(tickets_on: Server, certs: Certs) -> None:
    ctx = certs.client_context()
    _, session = resumption_rate(tickets_on, ctx, 1)
    # A reload with a new certificate: a new context, the same ticket keys.
    make_certs(certs.chain.parent / "new", trustme.KeyType.ECDSA)
    shutil.copy(certs.chain.parent / "new" / "privkey.pem", certs.key)
    shutil.copy(certs.chain.parent / "new" / "fullchain.pem", certs.chain)
    tickets_on.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded configuration" not in tickets_on.log():
        assert time.monotonic() < deadline, tickets_on.log()
        time.sleep(0.05)
    rate, _ = resumption_rate(tickets_on, ctx, 5, session)
    assert rate == 1.0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_resumption_across_worker_processes(tmp_path: Path, certs: Certs) -> None:
    srv = start_server(tmp_path / "srv", certs, "session_tickets = true", server="workers = 2")
    try:
        wait_for(lambda: ready_count(srv) >= 2, timeout=20)
        ctx = certs.client_context()
        _, session = resumption_rate(srv, ctx, 1)
        # Spread over both workers (the kernel picks): every one resumes.
        rate, _ = resumption_rate(srv, ctx, 20, session)
        assert rate == 1.0
        # New worker processes (the supervisor restarts killed ones) still
        # accept the tickets the old ones issued: the keys come from the
        # supervisor, not from each process.
        workers = _children(srv.proc.pid)
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: ready_count(srv) >= 4, timeout=20)
        assert not set(_children(srv.proc.pid)) & set(workers)
        rate, _ = resumption_rate(srv, ctx, 10, session)
        assert rate == 1.0
        assert "ticket" not in srv.log().lower()  # the secret is never logged
    finally:
        srv.stop()


def test_ticket_keys_rotate_and_the_previous_key_still_decrypts(certs: Certs) -> None:
    keys = tls.ticket_keys()
    now = [1_000_000.0 * keys.period]
    saved = keys.clock
    keys.clock = lambda: now[0]
    try:
        ctx = tls.build_context(
            TLSConfig(certificate=certs.chain, private_key=certs.key, session_tickets=True)
        )
        client_ctx = certs.client_context()
        # A whole handshake and one exchange, in memory (bench/handshake.py).
        _, old, _ = handshake(ctx, client_ctx, None)
        now[0] += keys.period  # one rotation: the old key is the previous one
        _, _, reused = handshake(ctx, client_ctx, old)
        assert reused
        now[0] += keys.period  # two: gone, a full handshake
        assert not handshake(ctx, client_ctx, old)[2]
    finally:
        keys.clock = saved


def test_ticket_keys_are_derived_from_the_secret() -> None:
    a = tls.TicketKeys(b"s" * 32, period=10, clock=lambda: 25.0)
    b = tls.TicketKeys(b"s" * 32, period=10, clock=lambda: 25.0)
    c = tls.TicketKeys(b"t" * 32, period=10, clock=lambda: 25.0)
    assert a.keys() == b.keys() != c.keys()
    later = tls.TicketKeys(b"s" * 32, period=10, clock=lambda: 35.0)
    assert later.keys()[1] == a.keys()[0]  # previous = the one before
    assert all(len(n) == 16 and len(k) == len(m) == 32 for n, k, m in a.keys())
    assert "s" * 32 not in repr(a)


# --- the self-signed certificate (item 10) ---------------------------------------


@pytest.mark.parametrize("hostname", ["localhost", "mail.example.com", "LocalHost"])
def test_self_signed_certificate(tmp_path: Path, hostname: str) -> None:
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    tls.make_self_signed(cert_path, key_path, hostname)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = san.get_values_for_type(x509.DNSName)
    assert len(names) == len(set(names))
    assert names == list(dict.fromkeys([hostname.lower(), "localhost"]))
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    # A strict verifier (cryptography's, which sslyze uses) accepts it.
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = PolicyBuilder().store(Store([cert])).build_server_verifier(x509.DNSName("localhost"))
    verifier.verify(cert, [])
    # And our server loads it.
    tls.build_context(TLSConfig(certificate=cert_path, private_key=key_path))


# --- Mozilla intermediate, as sslyze sees it (item 8) --------------------------------


def _sslyze() -> list[str] | None:
    """sslyze pins cryptography<47, pyOpenSSL needs >=49: it lives in a
    virtualenv of its own (KUMOAUTH_SSLYZE, or .venv-sslyze)."""
    given = os.environ.get("KUMOAUTH_SSLYZE")
    for candidate in (given, REPO / ".venv-sslyze" / "bin" / "sslyze", shutil.which("sslyze")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    return None


def _proper_leaf(ca: trustme.CA, key_type: str, d: Path) -> None:
    """A leaf from a trustme CA, but as public CAs issue them: trustme's own
    leaves mark subjectAltName critical beside a non-empty subject, which
    strict path validation (RFC 5280 §4.2.1.6) refuses whatever the server."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if key_type == "ecdsa"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=60))  # modern: under 90 days
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=key_type == "rsa",
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (d / "privkey.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (d / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))


@pytest.mark.parametrize(
    "kind,profile",
    [
        ("ecdsa", "intermediate"),
        ("rsa", "intermediate"),
        ("self-signed", "intermediate"),
        ("ecdsa", "modern"),  # with min_version = "TLSv1.3"
    ],
)
def test_sslyze_mozilla(tmp_path: Path, kind: str, profile: str) -> None:
    sslyze = _sslyze()
    if sslyze is None:
        # .ci/run installs it: in CI a missing sslyze is a failure, not a skip.
        assert not os.environ.get("CI"), "sslyze missing: .ci/run installs it in .venv-sslyze"
        pytest.skip(
            "no sslyze: python -m venv .venv-sslyze && .venv-sslyze/bin/pip install sslyze==6.3.1"
        )
    d = tmp_path / "mozilla"
    d.mkdir()
    ca = trustme.CA()
    if kind == "self-signed":
        # The development certificate (item 10): its own anchor.
        tls.make_self_signed(d / "fullchain.pem", d / "privkey.pem", "localhost")
        shutil.copy(d / "fullchain.pem", d / "ca.pem")
    else:
        _proper_leaf(ca, kind, d)
    certs = Certs(ca=ca, chain=d / "fullchain.pem", key=d / "privkey.pem")
    lines = 'min_version = "TLSv1.3"' if profile == "modern" else ""
    srv = start_server(tmp_path / "srv", certs, lines)
    try:
        r = subprocess.run(
            [
                *sslyze,
                f"--mozilla_config={profile}",
                "--starttls=smtp",
                f"--certinfo_ca_file={d / 'ca.pem'}",
                f"localhost:{srv.starttls_port}{{127.0.0.1}}",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        srv.stop()
    assert f'Checking results against Mozilla\'s "{profile}" configuration' in r.stdout
    assert f"localhost:{srv.starttls_port}: OK - Compliant." in r.stdout, r.stdout
    assert r.returncode == 0, r.stdout
