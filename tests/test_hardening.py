"""
Abuse and faults against a real twistd (SPEC §8): blocking checkers,
connection limits under load, socket-level fuzzing, crash durability, a
full disk, TLS hygiene and timing.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import os
import random
import re
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
import trustme

from kumoauth.storage.spool import Spool
from tests.server import Certs, make_certs, running_server
from tests.test_e2e import POLICY, login, starttls_client

pytestmark = pytest.mark.e2e

PLAIN_SCOTT = base64.b64encode(b"\0scott\0tiger")


def body_of(data: bytes) -> bytes:
    """The message as the client sent it: without our Received header."""
    end = re.match(rb"Received: [^\r]*\r\n(?:\t[^\r]*\r\n)*", data)
    assert end is not None
    return data[end.end() :]


def banner(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1000)
        if not chunk:
            break
        data += chunk
    return data


# --- blocking checkers run in the thread pool -----------------------------------

BLOCKING_POLICY = """
import time
from kumoauth import kumo

@kumo.on("smtp_server_auth_plain")
@kumo.blocking
def check(authz, authc, password, conn_meta):
    # A synchronous, slow lookup (sqlite, an HTTP call, bcrypt); well
    # within the test server's [auth] timeout of 1 s, even on a busy machine.
    time.sleep(0.7 if authc == "slow" else 0)
    return password == "tiger"
"""


def test_blocking_checker_does_not_stall_other_sessions(tmp_path, certs):
    with running_server(tmp_path, certs, BLOCKING_POLICY) as srv:
        result = {}

        def slow_login():
            with starttls_client(srv) as s:
                result["code"] = login(s, "PLAIN", "slow", "tiger")[0]

        with smtplib.SMTP("127.0.0.1", srv.plain_port, timeout=10) as other:
            other.ehlo("other.example")
            thread = threading.Thread(target=slow_login)
            thread.start()
            time.sleep(0.2)  # the slow check is running now
            start = time.monotonic()
            for _ in range(5):
                assert other.noop()[0] == 250
            assert time.monotonic() - start < 0.3
            thread.join(10)
        assert result["code"] == 235


# --- connection-level limits under load --------------------------------------------


def test_connection_limits_under_load(tmp_path, certs):
    server = "max_connections = 30\nmax_connections_per_ip = 20"
    with running_server(tmp_path, certs, POLICY, server=server) as srv:
        socks, banners = [], []
        try:
            for ip, n in (("127.0.0.1", 25), ("127.0.0.2", 15)):
                for _ in range(n):
                    sock = socket.socket()
                    sock.bind((ip, 0))
                    sock.connect(("127.0.0.1", srv.plain_port))
                    socks.append(sock)
                    banners.append((ip, banner(sock)))
            ok = [ip for ip, b in banners if b.startswith(b"220 ")]
            refused = [b for _, b in banners if b.startswith(b"421 4.7.0")]
            assert ok.count("127.0.0.1") == 20  # per-IP limit
            assert ok.count("127.0.0.2") == 10  # server-wide limit
            assert len(refused) == 10
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.3)
        # Every slot was given back.
        with smtplib.SMTP("127.0.0.1", srv.plain_port, timeout=10) as s:
            assert s.noop()[0] == 250


def test_byte_at_a_time_client_is_cut_off_at_idle_timeout(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY, server="idle_timeout = 1") as srv:
        with socket.create_connection(("127.0.0.1", srv.plain_port)) as sock:
            assert banner(sock).startswith(b"220")
            start = time.monotonic()
            reply = b""
            sock.settimeout(0.25)
            for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP":
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break
                try:
                    chunk = sock.recv(1000)
                except TimeoutError:
                    continue
                reply += chunk
                if not chunk or b"421" in reply:
                    break
            assert reply.startswith(b"421 4.4.2")
            assert 0.9 < time.monotonic() - start < 2.5


def test_max_errors_closes_the_connection(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY, server="max_errors = 3") as srv:
        with socket.create_connection(("127.0.0.1", srv.plain_port), timeout=10) as sock:
            banner(sock)
            sock.sendall(b"BOGUS\r\nBOGUS\r\nBOGUS\r\n")
            data = b""
            while chunk := sock.recv(1000):
                data += chunk
            assert data.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")


# --- fuzzing ---------------------------------------------------------------------


def client_hello() -> bytes:
    """The first TLS record a real client sends."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class Fuzzer:
    def __init__(self, srv, seed: int):
        self.srv = srv
        self.rng = random.Random(seed)
        self.hello = client_hello()
        self.valid = [
            b"EHLO fuzz.example\r\n",
            b"MAIL FROM:<a@example.com>\r\n",
            b"RCPT TO:<b@example.net>\r\n",
            b"DATA\r\n",
            b"Subject: x\r\n\r\nbody\r\n.\r\n",
            b"RSET\r\n",
            b"AUTH PLAIN " + PLAIN_SCOTT + b"\r\n",
            b"AUTH LOGIN\r\n",
            b"STARTTLS\r\n",
            b"NOOP\r\n",
        ]

    def junk(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def mutate(self, data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(self.rng.randint(1, 8)):
            op = self.rng.randrange(3)
            pos = self.rng.randrange(len(b) + 1)
            if op == 0 and b:
                b[min(pos, len(b) - 1)] = self.rng.randrange(256)
            elif op == 1:
                b[pos:pos] = self.junk(self.rng.randint(1, 20))
            else:
                del b[pos : pos + self.rng.randint(1, 10)]
        return bytes(b)

    def case(self) -> tuple[str, int, bytes, bool]:
        """(kind, port, payload, implicit TLS?)"""
        r = self.rng
        srv = self.srv
        kind = r.choice(
            ["junk", "mutated", "auth-b64", "long-line", "hello-cleartext", "after-starttls"]
        )
        if kind == "junk":
            return kind, r.choice(srv.ports[::2]), self.junk(r.randint(1, 5000)), False
        if kind == "mutated":
            script = b"".join(r.choice(self.valid) for _ in range(r.randint(1, 8)))
            return kind, srv.plain_port, self.mutate(script), False
        if kind == "auth-b64":
            blob = base64.b64encode(self.junk(r.randint(0, 300)))
            if r.random() < 0.5:
                blob = self.mutate(blob)
            payload = b"EHLO f\r\nAUTH PLAIN\r\n" + blob + b"\r\nAUTH LOGIN " + blob + b"\r\n"
            return kind, srv.implicit_port, payload, True
        if kind == "long-line":
            line = b"A" * r.choice([1001, 20000, 300000])
            prefix = r.choice([b"", b"AUTH PLAIN ", b"MAIL FROM:<"])
            return kind, srv.plain_port, prefix + line + b"\r\nNOOP\r\n", False
        if kind == "hello-cleartext":
            return kind, srv.starttls_port, b"EHLO f\r\n" + self.hello + self.junk(100), False
        return (
            kind,
            srv.starttls_port,
            b"EHLO f\r\nSTARTTLS\r\n" + self.junk(r.randint(1, 2000)),
            False,
        )

    def run_one(self, case) -> None:
        kind, port, payload, implicit = case
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                sock = raw
                if implicit:
                    ctx = self.srv.certs.client_context()
                    sock = ctx.wrap_socket(raw, server_hostname="localhost")
                sock.sendall(payload)
                if not implicit:
                    sock.shutdown(socket.SHUT_WR)
                sock.settimeout(1 if implicit else 3)
                try:
                    while sock.recv(65536):
                        pass
                except (TimeoutError, OSError):
                    pass
        except (OSError, ssl.SSLError):
            pass


def normal_session(srv) -> None:
    with starttls_client(srv) as s:
        assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        s.sendmail("scott@example.com", ["b@example.net"], b"Subject: ok\r\n\r\nok\r\n")


def test_fuzzed_sessions_leave_the_server_healthy(tmp_path, certs):
    server = "max_connections_per_ip = 40\nidle_timeout = 3"
    with running_server(tmp_path, certs, POLICY, server=server, auth="failure_delay = 0") as srv:
        fuzzer = Fuzzer(srv, seed=20261128)

        def round_of(n):
            cases = [fuzzer.case() for _ in range(n)]
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(fuzzer.run_one, cases))

        round_of(150)  # warm up every code path once
        for _ in range(10):
            normal_session(srv)
        before = srv.rss_kib()
        round_of(400)
        time.sleep(0.5)
        for _ in range(10):
            normal_session(srv)
        after = srv.rss_kib()
        log = srv.log()
        assert "Traceback" not in log
        assert "Unhandled" not in log
        # Memory back to its level (allocator slack allowed; a per-session
        # leak of even 1 KiB would be 400 KiB here, times buffers held).
        assert after <= before * 1.1 + 2048, (before, after)


# --- crash durability ------------------------------------------------------------


def test_sigkill_never_loses_an_acknowledged_message(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY, auth="failure_delay = 0") as srv:
        acked: dict[str, str] = {}
        lock = threading.Lock()
        stop = threading.Event()
        rng = random.Random(7)

        def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    s = smtplib.SMTP_SSL(
                        "127.0.0.1",
                        srv.implicit_port,
                        timeout=5,
                        context=srv.certs.client_context(),
                    )
                    s.login("scott", "tiger")
                    while not stop.is_set():
                        i += 1
                        body = (
                            f"Subject: c{n} m{i}\r\n\r\n".encode()
                            + os.urandom(512 + 97 * i % 5000).hex().encode()
                            + b"\r\n"
                        )
                        s.mail("scott@example.com")
                        s.rcpt("b@example.net")
                        code, reply = s.data(body)
                        if code == 250:
                            with lock:
                                acked[reply.decode().rsplit(" ", 1)[-1]] = hashlib.sha256(
                                    body
                                ).hexdigest()
                except (OSError, smtplib.SMTPException):
                    time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            for _ in range(4):
                time.sleep(rng.uniform(0.4, 1.0))
                srv.kill()
                # What a reader sees right after the crash: whole messages.
                for msg in Spool(srv.spool):
                    assert len(msg.read_bytes()) == msg.size
                srv.start()
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        srv.stop()
        srv.start()  # one more recovery pass, on a quiet spool
        assert len(acked) > 20
        # One reader, one scan of the queue (Spool.read scans it per call).
        stored = {msg.id: msg for msg in Spool(srv.spool)}
        for mid, digest in acked.items():
            assert mid in stored, mid
            data = stored[mid].read_bytes()
            assert hashlib.sha256(body_of(data)).hexdigest() == digest
        # Nothing half-written survives recovery: every message reads whole.
        for msg in stored.values():
            assert len(msg.read_bytes()) == msg.size


# --- a full disk -------------------------------------------------------------------


@pytest.fixture
def tiny_spool(tmp_path):
    spool = tmp_path / "srv" / "spool"
    spool.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small filesystem")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(spool)])
    if mount.returncode:
        pytest.skip("cannot mount tmpfs here")
    yield spool
    subprocess.run(["umount", "-l", str(spool)])


def test_disk_full_gives_451_nothing_partial_and_service_goes_on(tiny_spool, certs):
    with running_server(tiny_spool.parent, certs, POLICY) as srv:
        with starttls_client(srv) as s:
            login(s, "PLAIN", "scott", "tiger")
            for _ in range(2):
                s.mail("scott@example.com")
                s.rcpt("b@example.net")
                code, reply = s.data(b"Subject: big\r\n\r\n" + b"x" * 400_000 + b"\r\n")
                assert (code, reply[:5]) == (451, b"4.3.0")
            assert list(Spool(srv.spool).ids()) == []
            # What was written of it is gone: the disk has its space back.
            assert sum(p.stat().st_size for p in (srv.spool / "seg").iterdir()) < 4096
            s.mail("scott@example.com")
            s.rcpt("b@example.net")
            code, reply = s.data(b"Subject: small\r\n\r\nfits\r\n")
            assert code == 250
        # One line when it starts, one when mail is stored again: not one
        # per message.
        log = srv.log()
        assert log.count("spool unavailable: write failed") == 1, log
        assert log.count("spool available again (2 operations met it down)") == 1, log


# --- TLS hygiene -------------------------------------------------------------------


def permissive_server(certs: Certs) -> tuple[socket.socket, threading.Thread]:
    """A control server that accepts anything, to show the client can speak it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.chain, certs.key)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"220 ok\r\n")
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def handshake(certs: Certs, port: int, ctx: ssl.SSLContext) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.recv(100).startswith(b"220")
    except (OSError, ssl.SSLError):
        return False


def weak_client(certs: Certs, version: ssl.TLSVersion | None, ciphers: str) -> ssl.SSLContext:
    ctx = certs.client_context()
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
            ctx.minimum_version = ctx.maximum_version = version
    ctx.set_ciphers(ciphers)
    return ctx


@pytest.mark.parametrize(
    "version,ciphers,key",
    [
        (ssl.TLSVersion.TLSv1, "ALL:@SECLEVEL=0", "ecdsa"),
        (ssl.TLSVersion.TLSv1_1, "ALL:@SECLEVEL=0", "ecdsa"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA", "ecdsa"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384", "ecdsa"),
        (ssl.TLSVersion.TLSv1_2, "AES128-GCM-SHA256:AES128-SHA:DES-CBC3-SHA:@SECLEVEL=0", "rsa"),
    ],
    ids=["tls1.0", "tls1.1", "cbc-sha1", "cbc-sha2", "rsa-key-exchange"],
)
def test_old_protocols_and_weak_suites_are_refused(tmp_path, version, ciphers, key):
    key_type = trustme.KeyType.ECDSA if key == "ecdsa" else trustme.KeyType.RSA
    certs = make_certs(tmp_path / "certs", key_type)
    try:
        ctx = weak_client(certs, version, ciphers)
    except (ValueError, ssl.SSLError):
        pytest.skip("this Python's OpenSSL cannot even build such a client")
    listener, _ = permissive_server(certs)
    try:
        if not handshake(certs, listener.getsockname()[1], ctx):
            pytest.skip("this Python's OpenSSL will not speak it (nothing to refuse)")
    finally:
        listener.close()
    with running_server(tmp_path / "srv", certs, POLICY) as srv:
        assert not handshake(certs, srv.implicit_port, ctx)
        # A modern client still works, and the refusal is logged at info, no traceback.
        assert handshake(certs, srv.implicit_port, certs.client_context())
        srv.stop()
        log = srv.log()
        assert re.search(r"\[kumoauth\.smtp#info\] TLS handshake with 127\.0\.0\.1:\d+ failed", log)
        assert "Traceback" not in log


def chain_certs(directory: Path, whole: bool) -> Certs:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
    directory.mkdir(parents=True, exist_ok=True)
    chain, key = directory / "fullchain.pem", directory / "privkey.pem"
    leaf.private_key_pem.write_to_path(str(key))
    blobs = leaf.cert_chain_pems if whole else leaf.cert_chain_pems[:1]
    chain.write_bytes(b"".join(b.bytes() for b in blobs))
    return Certs(ca=root, chain=chain, key=key)


@pytest.mark.parametrize("whole", [True, False], ids=["chain", "leaf-only-control"])
def test_certificate_chain_is_served_whole(tmp_path, whole):
    certs = chain_certs(tmp_path / "certs", whole)
    with running_server(tmp_path / "srv", certs, POLICY) as srv:
        # The client trusts only the root: it verifies only if the
        # intermediate came from the server.
        assert handshake(certs, srv.implicit_port, certs.client_context()) is whole


# --- timing --------------------------------------------------------------------------

TIMING_POLICY = """
from twisted.internet import reactor, task
from kumoauth import kumo

@kumo.on("smtp_server_auth_plain")
def check(authz, authc, password, conn_meta):
    if authc != "scott":
        return False                      # unknown user: answered at once
    # known user: a slow password hash
    return task.deferLater(reactor, 0.1, lambda: password == "tiger")
"""


def test_unknown_user_and_wrong_password_take_the_same_time(tmp_path, certs):
    delay = 0.3
    with running_server(tmp_path, certs, TIMING_POLICY, auth=f"failure_delay = {delay}") as srv:
        timings: dict[str, list[float]] = {"unknown": [], "known": []}
        with starttls_client(srv) as s:
            for i in range(6):
                for kind, user in (("unknown", f"nobody{i}"), ("known", "scott")):
                    blob = base64.b64encode(f"\0{user}\0wrong".encode()).decode()
                    start = time.monotonic()
                    code, _ = s.docmd("AUTH", "PLAIN " + blob)
                    timings[kind].append(time.monotonic() - start)
                    assert code in (535, 421)
                    if code == 421:
                        s = starttls_client(srv)
        for kind in timings:
            assert min(timings[kind]) >= delay
        median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
        assert abs(median["known"] - median["unknown"]) < 0.05, median
