"""
The holes outside probes found and the core defects a review found, through
a real ``twistd kumoauth`` on 127.0.0.1 with real TLS and real clients.
"""

from __future__ import annotations

import base64
import email.message
import re
import signal
import smtplib
import socket
import time

import pytest

from kumoauth.storage.spool import Spool
from tests.server import free_port, running_server
from tests.test_e2e import POLICY, queued_id, starttls_client

pytestmark = pytest.mark.e2e


def wait_closed(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass  # aborted: nothing can be said half-way through a handshake


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_unread_replies_keep_memory_flat(tmp_path, certs):
    # Before TLS, with no account: pipelined HELP, never reading a reply.
    with running_server(tmp_path, certs, POLICY, server="max_errors = 1000") as srv:
        with socket.create_connection(("127.0.0.1", srv.plain_port), timeout=10) as sock:
            read_reply(sock)
            time.sleep(0.3)
            before = srv.rss_kib()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(3)
            chunk = b"HELP\r\n" * 10_000
            sent = 0
            try:
                while sent < 15_000_000:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (TimeoutError, OSError):
                pass  # the server stopped reading: backpressure works
            time.sleep(0.5)
            grown = srv.rss_kib() - before
        # Before: +326 MiB for 15 MB.  Now bounded by socket buffers.
        assert grown < 16 * 1024, f"RSS grew {grown} KiB after {sent} bytes sent"
        assert sent < 15_000_000
        # The server is still fine.
        with socket.create_connection(("127.0.0.1", srv.plain_port), timeout=10) as sock:
            assert read_reply(sock).startswith(b"220 ")


def test_silent_tls_clients_are_dropped_at_the_handshake_timeout(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY, extra="", server="idle_timeout = 300") as srv:
        pass
    config = srv.config.read_text().replace(
        'private_key = "', 'handshake_timeout = 1.0\nprivate_key = "', 1
    )
    srv.config.write_text(config)
    srv.start()
    try:
        cases = {
            "silent": b"",
            "plaintext": b"EHLO client.example\r\n",
            "half hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        }
        for name, payload in cases.items():
            with socket.create_connection(("127.0.0.1", srv.implicit_port), timeout=10) as sock:
                start = time.monotonic()
                sock.sendall(payload)
                wait_closed(sock)
                took = time.monotonic() - start
                # Plaintext is no TLS record: refused at once.  The others
                # wait for more, until the deadline.
                assert took < 4, (name, took)
                if name != "plaintext":
                    assert took > 0.5, (name, took)
        # STARTTLS, then nothing.
        with socket.create_connection(("127.0.0.1", srv.starttls_port), timeout=10) as sock:
            read_reply(sock)
            sock.sendall(b"EHLO client.example\r\n")
            read_reply(sock)
            sock.sendall(b"STARTTLS\r\n")
            assert read_reply(sock).startswith(b"220 2.0.0")
            start = time.monotonic()
            wait_closed(sock)
            assert 0.5 < time.monotonic() - start < 4
        # A real client is not affected.
        with starttls_client(srv) as s:
            assert s.login("scott", "tiger")[0] == 235
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


def test_smtputf8_with_smtplib(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY) as srv:
        with starttls_client(srv) as s:
            assert s.has_extn("smtputf8")
            s.login("scott", "tiger")
            message = "From: jürgen@bücher.example\r\nSubject: Grüße\r\n\r\nhallo\r\n"
            s.sendmail(
                "jürgen@bücher.example",
                ["用户@例子.广告"],
                message.encode(),
                mail_options=["SMTPUTF8"],
            )
        (msg,) = Spool(srv.spool)
        assert msg.envelope["mail_from"] == "jürgen@bücher.example"
        assert msg.meta["smtputf8"] is True
        assert b"with UTF8SMTPSA id" in msg.read_bytes()


def test_smtplib_send_message_with_its_own_smtputf8_option(tmp_path, certs):
    # send_message adds SMTPUTF8 and BODY=8BITMIME for a UTF-8 address to
    # the options it is given, so the command carries SMTPUTF8 twice.
    message = email.message.EmailMessage()
    message["From"] = "jürgen@bücher.example"
    message["To"] = "用户@例子.广告"
    message["Subject"] = "Grüße"
    message.set_content("hallo")
    with running_server(tmp_path, certs, POLICY) as srv:
        with starttls_client(srv) as s:
            s.login("scott", "tiger")
            assert s.send_message(message, mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
        (msg,) = Spool(srv.spool)
        assert msg.envelope["rcpt_to"] == ["用户@例子.广告"]
        assert msg.meta["smtputf8"] is True


def test_smtplib_typos_do_not_lock_the_user_out(tmp_path, certs):
    throttle = "max_failures_per_authc = 5\nmax_failures_per_ip = 10"
    with running_server(tmp_path, certs, POLICY, throttle=throttle) as srv:
        for typo in ("tigre", "tiger1", "Tiger", "tige"):
            with starttls_client(srv) as s:
                # smtplib tries PLAIN, then LOGIN: two attempts per typo.
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    s.login("scott", typo)
        with starttls_client(srv) as s:
            assert s.login("scott", "tiger")[0] == 235
        # Distinct guesses still count: the fifth locks.
        with starttls_client(srv) as s, pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("scott", "fifth")
        with starttls_client(srv) as s, pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("scott", "tiger")
        assert e.value.smtp_code == 454
        assert b"try again in" in e.value.smtp_error


def test_log_lines_cannot_be_forged(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY) as srv:
        with starttls_client(srv) as s:
            for name in ("x\nAUTH PLAIN success authc=admin", "y\u2028z", "\x1b[2Jq"):
                blob = base64.b64encode(b"\0" + name.encode() + b"\0pw").decode()
                code, _ = s.docmd("AUTH", "PLAIN " + blob)
                assert code == 501
            s.send(b"EHLO evil.example\nX-Injected:yes\r\n")
            assert s.getreply()[0] == 501
        srv.stop()
        text = srv.log()
    lines = text.splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")
    for line in lines:
        assert stamp.match(line) or line.startswith("\t"), line
        assert all(c.isprintable() or c == "\t" for c in line), line
    assert "authc=admin" not in text


def test_starttls_logs_out_a_cleartext_login(tmp_path, certs):
    port = free_port()
    extra = f"""
[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "starttls"
allow_plaintext_auth = true
"""
    with running_server(tmp_path, certs, POLICY, extra=extra) as srv:
        s = smtplib.SMTP("127.0.0.1", port, timeout=10)
        s.ehlo("client.example")
        assert s.login("scott", "tiger")[0] == 235  # in clear (allowed here)
        s.starttls(context=certs.client_context())
        s.ehlo("client.example")
        code, _ = s.mail("scott@example.com")
        assert code == 530  # the identity did not survive STARTTLS
        assert s.login("scott", "tiger")[0] == 235  # a new AUTH, not 503
        s.mail("scott@example.com")
        s.rcpt("b@example.net")
        code, reply = s.data(b"Subject: x\r\n\r\ny\r\n")
        assert code == 250
        s.quit()
        msg = Spool(srv.spool).read(queued_id(reply))
        assert msg.meta["authn_id"] == "scott"
        assert b"ESMTPSA" in msg.read_bytes()


NEVER_POLICY = (
    POLICY
    + """

@kumo.on("smtp_server_mail_from")
def mail_from(sender, conn_meta):
    if sender.startswith("hang"):
        return defer.Deferred()
"""
)


def test_handlers_and_checkers_that_never_answer(tmp_path, certs):
    with running_server(
        tmp_path / "policy", certs, NEVER_POLICY, extra="", auth="timeout = 1.0"
    ) as srv:
        pass
    srv.config.write_text(srv.config.read_text().replace("[policy]\n", "[policy]\ntimeout = 1.0\n"))
    srv.start()
    try:
        with starttls_client(srv) as s:
            s.login("scott", "tiger")
            start = time.monotonic()
            code, _ = s.mail("hang@example.com")
            assert code == 451 and 0.8 < time.monotonic() - start < 3
            assert s.noop()[0] == 250
            assert s.mail("scott@example.com")[0] == 250
    finally:
        srv.stop()
    with running_server(
        tmp_path / "checker",
        certs,
        None,
        auth='checker = "tests.checkers:never_checker"\ntimeout = 1.0',
    ) as srv:
        with starttls_client(srv) as s:
            start = time.monotonic()
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                s.login("scott", "tiger")
            assert e.value.smtp_code == 454
            assert time.monotonic() - start < 5
            assert s.noop()[0] == 250


def test_two_auth_checkers_are_both_used(tmp_path, certs):
    args = ["--auth", "memory:alice:x", "--auth", "memory:bob:y"]
    with running_server(tmp_path, certs, None, args=args) as srv:
        for user, password in (("alice", "x"), ("bob", "y")):
            with starttls_client(srv) as s:
                assert s.login(user, password)[0] == 235
        with starttls_client(srv) as s, pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice", "y")


HUNG_POLICY = """
import time
from kumoauth import kumo

@kumo.on("smtp_server_auth_plain")
@kumo.blocking
def check(authz, authc, password, conn_meta):
    time.sleep(60)
    return True
"""


def test_sigterm_is_not_held_by_a_hung_blocking_handler(tmp_path, certs):
    with running_server(
        tmp_path, certs, HUNG_POLICY, server="shutdown_grace = 1", auth="timeout = 30"
    ) as srv:
        s = starttls_client(srv)
        blob = base64.b64encode(b"\0scott\0tiger").decode()
        s.send(f"AUTH PLAIN {blob}\r\n".encode())
        time.sleep(0.5)  # the handler is running in its thread now
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(30)
        took = time.monotonic() - start
        s.close()
    assert rc == 0
    assert took < 10, took


def test_ehlo_injection_over_the_wire(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY) as srv:
        with socket.create_connection(("127.0.0.1", srv.plain_port), timeout=10) as sock:
            read_reply(sock)
            sock.sendall(b"EHLO evil.example\nX-Injected:yes\r\n")
            assert read_reply(sock) == b"501 5.5.4 Invalid domain name\r\n"
            sock.sendall(b"EHLO good.example\r\n")
            assert read_reply(sock).startswith(b"250-localhost Hello good.example\r\n")
