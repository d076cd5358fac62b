"""
End to end: a real ``twistd kumoauth`` on 127.0.0.1, real TLS (trustme),
real clients (smtplib, Twisted's ESMTPSenderFactory, raw sockets).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kumoauth.storage.spool import Spool
from tests.server import running_server, wait_for_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent

POLICY = """
from twisted.internet import defer, reactor, task
from kumoauth import kumo

USERS = {"scott": "tiger", "alice": "wonder land"}


@kumo.on("smtp_server_connection_accepted")
def accepted(conn_meta):
    conn_meta.set_meta("tenant", "acme")


@kumo.on("smtp_server_ehlo")
def ehlo(domain, conn_meta):
    conn_meta.set_meta("ehlo_seen", conn_meta.get_meta("tenant") + ":" + domain)


async def slow_yes(password):
    await task.deferLater(reactor, 0.05, lambda: None)
    return password == "tiger"


@kumo.on("smtp_server_auth_plain")
def auth(authz, authc, password, conn_meta):
    conn_meta.set_meta("auth_saw", conn_meta.get_meta("ehlo_seen"))
    if authc == "deferred":
        return task.deferLater(reactor, 0.05, lambda: password == "tiger")
    if authc == "async":
        return slow_yes(password)
    if authc == "raise":
        raise RuntimeError("checker exploded on " + password)
    if authc == "hang":
        return defer.Deferred()
    return USERS.get(authc) == password
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, certs):
    with running_server(tmp_path_factory.mktemp("server"), certs, POLICY) as srv:
        yield srv


def starttls_client(server, **kw) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", server.starttls_port, timeout=10, **kw)
    s.ehlo("client.example")
    s.starttls(context=server.certs.client_context())
    s.ehlo("client.example")
    return s


def implicit_client(server) -> smtplib.SMTP:
    s = smtplib.SMTP_SSL(
        "127.0.0.1", server.implicit_port, timeout=10, context=server.certs.client_context()
    )
    s.ehlo("client.example")
    return s


def login(s: smtplib.SMTP, mechanism: str, user: str, password: str) -> tuple[int, bytes]:
    s.user, s.password = user, password
    auth = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login}[mechanism]
    return s.auth(mechanism, auth, initial_response_ok=False)


def spooled(server, mid: str):
    return Spool(server.spool).read(mid)


def queued_id(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[-1]


def send(s: smtplib.SMTP, body: bytes = b"Subject: test\r\n\r\nhello\r\n") -> str:
    s.mail("scott@example.com")
    s.rcpt("b@example.net")
    code, reply = s.data(body)
    assert code == 250, reply
    return queued_id(reply)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize(
    "connect", [starttls_client, implicit_client], ids=["starttls", "implicit"]
)
def test_login_and_send(server, connect, mechanism):
    with connect(server) as s:
        assert "PLAIN" in s.esmtp_features["auth"]
        code, _ = login(s, mechanism, "scott", "tiger")
        assert code == 235
        mid = send(s)
    msg = spooled(server, mid)
    meta = msg.meta
    assert meta["authn_id"] == "scott" and meta["authz_id"] == "scott"
    assert meta["tls_protocol_version"] in ("TLSv1.2", "TLSv1.3")
    assert meta["tls_cipher"]
    assert b"with ESMTPSA id " + mid.encode() in msg.read_bytes()
    assert msg.read_bytes().endswith(b"Subject: test\r\n\r\nhello\r\n")


def test_start_up_heap_is_left_out_of_garbage_collection(server):
    """
    Once running, the server freezes what start-up made (kumoauth/ops/heap.py):
    a full collection with many sessions open walks their objects only.
    """
    deadline = time.monotonic() + 10
    while not (found := re.search(r"start-up heap settled: (\d+) objects", server.log())):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert int(found.group(1)) > 10_000


def test_smtplib_login_picks_a_mechanism(server):
    with starttls_client(server) as s:
        assert s.login("alice", "wonder land")[0] == 235


def test_no_auth_offered_before_starttls(server):
    with smtplib.SMTP("127.0.0.1", server.starttls_port, timeout=10) as s:
        s.ehlo("client.example")
        assert not s.has_extn("auth")
        assert s.has_extn("starttls")
        code, msg = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0scott\0tiger").decode())
        assert code == 538


def test_conn_meta_flows_through_events_into_spool(server):
    with starttls_client(server) as s:
        login(s, "PLAIN", "scott", "tiger")
        mid = send(s)
    meta = spooled(server, mid).meta
    assert meta["tenant"] == "acme"
    assert meta["ehlo_seen"] == "acme:client.example"
    assert meta["auth_saw"] == "acme:client.example"
    assert meta["listener_name"] == "submission"
    assert meta["received_from"].startswith("127.0.0.1:")
    assert meta["received_via"] == f"127.0.0.1:{server.starttls_port}"


@pytest.mark.parametrize("user", ["deferred", "async"])
def test_deferred_and_async_checkers(server, user):
    with starttls_client(server) as s:
        assert login(s, "PLAIN", user, "tiger")[0] == 235
        assert login(s, "PLAIN", user, "tiger")[0] == 503  # already authenticated


def test_wrong_password_is_535(server):
    with starttls_client(server) as s:
        start = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            login(s, "PLAIN", "scott", "lion")
        assert e.value.smtp_code == 535
        assert time.monotonic() - start >= 0.2
        assert login(s, "PLAIN", "scott", "tiger")[0] == 235


@pytest.mark.parametrize("user", ["raise", "hang"])
def test_checker_error_and_timeout_are_454_and_session_lives(server, user):
    with starttls_client(server) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            login(s, "PLAIN", user, "tiger")
        assert e.value.smtp_code == 454
        assert s.noop()[0] == 250
        assert login(s, "PLAIN", "scott", "tiger")[0] == 235


def test_max_failures_closes(server):
    s = starttls_client(server)
    for _ in range(2):
        with pytest.raises(smtplib.SMTPAuthenticationError):
            login(s, "PLAIN", "scott", "x")
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        login(s, "PLAIN", "scott", "x")
    assert e.value.smtp_code == 421
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()


def test_mail_before_auth_is_530(server):
    with starttls_client(server) as s:
        code, _ = s.mail("scott@example.com")
        assert code == 530


def plain_ehlo(raw: socket.socket):
    """The greeting and EHLO on a plaintext socket; its reader, after the last 250."""
    f = raw.makefile("rb")
    assert f.readline().startswith(b"220 ")
    raw.sendall(b"EHLO client.example\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    return f


def test_starttls_pipelined_rset_is_never_answered(server):
    with socket.create_connection(("127.0.0.1", server.starttls_port), timeout=10) as raw:
        f = plain_ehlo(raw)
        raw.sendall(b"STARTTLS\r\nRSET\r\n")
        assert f.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        ctx = server.certs.client_context()
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"NOOP\r\n")
        # The first reply inside TLS answers NOOP: the RSET was discarded.
        assert tls.recv(1000) == b"250 2.0.0 OK\r\n"
        tls.close()


@pytest.mark.parametrize("port", ["starttls_port", "implicit_port"])
def test_quit_over_tls_ends_with_the_servers_close_notify(server, port):
    """
    After QUIT's 221 the server closes TLS itself (its close_notify goes
    with the reply) instead of waiting for the client's: a client that
    just reads sees the end of the stream at once, not after the
    5-second abort.
    """
    ctx = server.certs.client_context()
    with socket.create_connection(("127.0.0.1", getattr(server, port)), timeout=10) as raw:
        if port == "starttls_port":
            f = plain_ehlo(raw)
            raw.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220 ")
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        if port == "implicit_port":
            assert tls.recv(1000).startswith(b"220 ")
        tls.sendall(b"QUIT\r\n")
        tls.settimeout(2)  # well under the abort
        got = b""
        started = time.monotonic()
        while chunk := tls.recv(1000):  # b"": the server's close_notify
            got += chunk
        assert got.startswith(b"221 2.0.0 ")
        assert time.monotonic() - started < 1.5


def raw_session(server, commands: list[bytes]) -> list[bytes]:
    """Authenticated session over implicit TLS with raw bytes; returns every reply line."""
    ctx = server.certs.client_context()
    with socket.create_connection(("127.0.0.1", server.implicit_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            f = tls.makefile("rb")
            lines = [f.readline()]
            for command in commands:
                tls.sendall(command)
                while True:
                    line = f.readline()
                    lines.append(line)
                    if line[3:4] != b"-":
                        break
            return lines


def test_bare_lf_dot_is_spooled_whole_as_one_message(server):
    body = b"Subject: dots\r\n\r\nfirst\n.\nsecond\r\n.. stuffed\r\nlast\r\n"
    plain = base64.b64encode(b"\0scott\0tiger")
    lines = raw_session(
        server,
        [
            b"EHLO client.example\r\n",
            b"AUTH PLAIN " + plain + b"\r\n",
            b"MAIL FROM:<scott@example.com>\r\n",
            b"RCPT TO:<b@example.net>\r\n",
            b"DATA\r\n",
            body + b".\r\n",
            b"QUIT\r\n",
        ],
    )
    queued = [line for line in lines if line.startswith(b"250 2.0.0 OK queued")]
    assert len(queued) == 1
    msg = spooled(server, queued_id(queued[0].strip()))
    # One message; bare line ends became CRLF ([server] bare_newlines).
    assert msg.read_bytes().endswith(
        b"Subject: dots\r\n\r\nfirst\r\n.\r\nsecond\r\n. stuffed\r\nlast\r\n"
    )


def test_oversized_message_gets_552_and_nothing_is_spooled(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY, server="max_message_size = 5000") as srv:
        with starttls_client(srv) as s:
            login(s, "PLAIN", "scott", "tiger")
            s.mail("scott@example.com")
            s.rcpt("b@example.net")
            code, _ = s.data(b"x" * 6000 + b"\r\n")
            assert code == 552
            assert list(Spool(srv.spool).ids()) == []
            send(s, b"small\r\n")


def test_twisted_esmtp_sender_with_require_transport_security(server, tmp_path):
    ca = tmp_path / "ca.pem"
    server.certs.ca.cert_pem.write_to_path(str(ca))
    script = textwrap.dedent(
        f"""
        import io, sys
        from twisted.internet import defer, task, ssl
        from twisted.mail.smtp import ESMTPSenderFactory

        def main(reactor):
            authority = ssl.Certificate.loadPEM(open({str(ca)!r}, "rb").read())
            options = ssl.optionsForClientTLS("localhost", trustRoot=authority)
            d = defer.Deferred()
            factory = ESMTPSenderFactory(
                b"scott", b"tiger", "scott@example.com", ["b@example.net"],
                io.BytesIO(b"Subject: from twisted\\r\\n\\r\\nhi\\r\\n"), d,
                contextFactory=options, requireAuthentication=True,
                requireTransportSecurity=True, heloFallback=False,
            )
            reactor.connectTCP("127.0.0.1", {server.starttls_port}, factory)
            return d.addCallback(lambda result: print("SENT", result[0]))

        task.react(main)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "SENT 1" in result.stdout


def test_auth_memory_replaces_the_policy_checker(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY, args=["--auth", "memory:carol:s3cret"]) as srv:
        with starttls_client(srv) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                login(s, "PLAIN", "scott", "tiger")
            assert login(s, "PLAIN", "carol", "s3cret")[0] == 235
            mid = send(s)
        assert spooled(srv, mid).meta["authn_id"] == "carol"


def test_auth_file_with_a_password_file(tmp_path, certs):
    passwd = tmp_path / "passwd"
    passwd.write_text("dave:pa55word\nerin:other\n")
    with running_server(tmp_path / "srv", certs, POLICY, args=["--auth", f"file:{passwd}"]) as srv:
        with starttls_client(srv) as s:
            assert login(s, "LOGIN", "dave", "pa55word")[0] == 235
            mid = send(s)
        meta = spooled(srv, mid).meta
        assert (meta["authn_id"], meta["authz_id"]) == ("dave", "dave")
        with starttls_client(srv) as s:
            # A stock IUsernamePassword checker cannot authorize another identity.
            s.user, s.password = "dave", "pa55word"
            code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"erin\0dave\0pa55word").decode())
            assert code == 535


def test_custom_checker_from_config(tmp_path, certs):
    with running_server(
        tmp_path,
        certs,
        POLICY,
        auth='checker = "tests.checkers:tenant_checker"',
        env={"PYTHONPATH": str(REPO)},
    ) as srv:
        with starttls_client(srv) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                login(s, "PLAIN", "frank", "frank")
            assert login(s, "PLAIN", "frank", "knarf")[0] == 235
            mid = send(s)
        meta = spooled(srv, mid).meta
        assert meta["checked_by"] == "TenantChecker"
        assert meta["authn_id"] == "frank"


def test_spool_pairs_are_complete_and_hash_match(server):
    with starttls_client(server) as s:
        login(s, "PLAIN", "scott", "tiger")
        bodies = {}
        for i in range(5):
            body = f"Subject: n{i}\r\n\r\n".encode() + bytes(range(32, 127)) * (i + 1) + b"\r\n"
            bodies[send(s, body)] = hashlib.sha256(body).hexdigest()
    for mid, digest in bodies.items():
        data = spooled(server, mid).read_bytes()
        body = data[re.match(rb"Received: [^\r]*\r\n(?:\t[^\r]*\r\n)*", data).end() :]
        assert hashlib.sha256(body).hexdigest() == digest
        envelope = spooled(server, mid).envelope
        assert envelope["id"] == mid and envelope["rcpt_to"] == ["b@example.net"]


def test_readme_run_command_serves_the_sample_config(tmp_path):
    """`twistd -n kumoauth --config etc/kumoauth.toml`, as the README says, in a copy of etc/."""
    shutil.copytree(REPO / "etc", tmp_path / "etc", ignore=shutil.ignore_patterns("tls"))
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={log}",
            "kumoauth",
            "--config",
            "etc/kumoauth.toml",
        ],
        cwd=tmp_path,
    )
    try:
        for port in (10587, 10465):
            wait_for_port(port, proc, log)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "etc/tls/fullchain.pem"))
        with smtplib.SMTP("127.0.0.1", 10587, timeout=10) as s:
            s.starttls(context=ctx)
            s.login("scott", "tiger")
            s.sendmail("scott@example.com", ["b@example.net"], b"Subject: readme\r\n\r\nhi\r\n")
        with smtplib.SMTP_SSL("127.0.0.1", 10465, timeout=10, context=ctx) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("scott", "lion")
        (msg,) = list(Spool(tmp_path / "var/spool"))
        assert msg.meta["authn_id"] == "scott"
        assert "self-signed" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
