"""
The relay end to end: a real ``twistd kumoauth`` with ``[relay]`` hands
what it accepts to a real upstream, the scripted aiosmtpd one
(tests/upstream.py) or a real Postfix + Dovecot (tests/postfix.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.parser
import hashlib
import hmac
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from kumoauth.relay.queue import QueueReader
from kumoauth.storage.spool import Spool
from tests import postfix as pf
from tests import upstream as upstream_module
from tests.server import Certs, free_port, run_twistd, running_server
from tests.test_e2e import POLICY, starttls_client
from tests.upstream import Upstream, running_upstream

pytestmark = pytest.mark.e2e

T = TypeVar("T")

SENDER = "scott@example.com"


# ---------------------------------------------------------------------------
# helpers


def wait_until(predicate: Callable[[], T], timeout: float = 15, what: str = "it") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def relay_toml(
    directory: Path,
    port: int,
    ca: trustme.CA,
    password: str = upstream_module.DEFAULT_USERS["kumoauth"],
    **settings: str | None,
) -> str:
    """A ``[relay]`` table; *settings* values are TOML already (None: left out)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    secret = directory / "relay.secret"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    table = {
        "host": '"localhost"',
        "port": str(port),
        "ca_file": f'"{ca_file}"',
        "username": '"kumoauth"',
        "password_file": f'"{secret}"',
        "retry_schedule": "[1, 1]",
        "connect_timeout": "5",
        "command_timeout": "20",
    }
    table.update(settings)
    return "[relay]\n" + "".join(f"{k} = {v}\n" for k, v in table.items() if v is not None)


#: recipients, each an address or (address, its RCPT parameters)
Rcpts = Sequence[str | tuple[str, Sequence[str]]]


def submit(
    srv: Any,
    rcpts: Rcpts,
    body: bytes,
    sender: str = SENDER,
    mail_options: Sequence[str] = (),
) -> str:
    """One message from scott through the submission port; its queue id."""
    with starttls_client(srv) as s:
        s.login("scott", "tiger")
        return send_on(s, rcpts, body, sender, mail_options)


def send_on(
    s: smtplib.SMTP,
    rcpts: Rcpts,
    body: bytes,
    sender: str = SENDER,
    mail_options: Sequence[str] = (),
) -> str:
    """One message on *s*, with MAIL and per-RCPT parameters; its queue id."""
    code, reply = s.mail(sender, list(mail_options))
    assert code == 250, reply
    for rcpt in rcpts:
        address, options = (rcpt, ()) if isinstance(rcpt, str) else rcpt
        code, reply = s.rcpt(address, list(options))
        assert code == 250, reply
    code, reply = s.data(body)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def queue_ids(srv: Any) -> list[str]:
    return list(Spool(srv.spool).ids())


def wait_queue_empty(srv: Any, timeout: float = 10) -> None:
    wait_until(lambda: not queue_ids(srv), timeout, "the queue to be empty")


def with_tag(up: Upstream, tag: str) -> list[upstream_module.Received]:
    return [m for m in list(up.messages) if tag.encode() in m.data]


def bounces(up: Upstream) -> list[upstream_module.Received]:
    return [m for m in list(up.messages) if m.mail_from in ("", "<>")]


def dsn_blocks(data: bytes) -> tuple[email.message.Message, list[dict[str, str]]]:
    """The DSN and its delivery-status blocks (per-message first)."""
    msg = email.message_from_bytes(data)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    report = next(
        p
        for p in msg.walk()
        if p.get_content_type() in ("message/delivery-status", "message/global-delivery-status")
    )
    payload = report.get_payload()
    if report.get_content_type() == "message/delivery-status":
        assert isinstance(payload, list)
        return msg, [dict(block.items()) for block in payload]
    # message/global-delivery-status: parsed as one message, the first
    # block its header and the others its body
    raw = payload[0].as_bytes() if isinstance(payload, list) else report.get_payload(decode=True)
    assert isinstance(raw, bytes)
    text = raw.decode("utf-8").replace("\r\n", "\n")
    parser = email.parser.HeaderParser()
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    return msg, [dict(parser.parsestr(b + "\n").items()) for b in blocks]


def docs_verifier() -> Callable[[str, bytes], dict[str, str] | None]:
    """``verify`` from docs/relay.md's Python block, run as it is there."""
    text = (Path(__file__).parent.parent / "docs" / "relay.md").read_text()
    section = text[text.index('### `identity = "header"`') :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/relay.md", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace["verify"]  # type: ignore[no-any-return]


def verify_identity(value: str, key: bytes) -> dict[str, str] | None:
    """docs/relay.md's verification, verbatim."""
    return docs_verifier()(value, key)


def only_received_before(data: bytes, body: bytes) -> None:
    """*data* is exactly one Received field (ours) followed by *body*."""
    assert data.endswith(body), data
    head = data[: len(data) - len(body)]
    assert re.fullmatch(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", head), head


class Forwarder:
    """A TCP port that forwards to another (the upstream "on that port")."""

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def relaying(
    tmp_path: Path, certs: Certs, up: Upstream, server: str = "", **settings: str
) -> Iterator[Any]:
    extra = relay_toml(tmp_path / "relay", up.port, up.ca, **settings)
    with running_server(tmp_path / "srv", certs, POLICY, extra=extra, server=server) as srv:
        yield srv


# ---------------------------------------------------------------------------
# 1. delivery, authzid, session reuse


def test_an_upstream_size_below_max_message_size_is_said_once(tmp_path: Path, certs: Certs) -> None:
    # A postmaster's walkthrough: Postfix's 10 MB behind kumoauth's 25 MiB,
    # and a 12 MB message was taken with 250, then bounced.
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        for n in range(3):
            submit(srv, ["b@example.net"], f"Subject: {n}\r\n\r\nx\r\n".encode())
        wait_until(lambda: len(up.messages) == 3, what="the messages")
        said = [ln for ln in srv.log().splitlines() if "(SIZE), less than" in ln]
        assert len(said) == 1, said
        assert (
            f"relay: upstream localhost:{up.port} takes messages of at most {up.size} octets "
            "(SIZE), less than [server] max_message_size 26214400: larger ones are "
            f"accepted, then bounced; set max_message_size at or below {up.size}"
        ) in said[0]
    with (
        running_upstream() as up,
        relaying(tmp_path / "fits", certs, up, server=f"max_message_size = {up.size}") as srv,
    ):
        submit(srv, ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        wait_until(lambda: up.messages, what="the message")
        assert "(SIZE), less than" not in srv.log()


def test_a_listener_without_auth_is_said_to_relay_as_the_service_account(
    tmp_path: Path, certs: Certs
) -> None:
    # Mail from it went upstream as kumoauth's own account, with no word.
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        with smtplib.SMTP("127.0.0.1", srv.plain_port, timeout=10) as s:
            s.ehlo("client.example")
            mid = send_on(s, ["b@example.net"], b"Subject: anon\r\n\r\nno auth\r\n")
        wait_until(lambda: up.messages, what="the message")
        assert mid
        warned = [line for line in srv.log().splitlines() if "takes mail without AUTH" in line]
        assert len(warned) == 1, warned
        assert f"tcp:{srv.plain_port}:interface=127.0.0.1" in warned[0]
        assert "as kumoauth's own account kumoauth (no authzid)" in warned[0]


def test_delivery_authzid_and_session_reuse(tmp_path: Path, certs: Certs) -> None:
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        bodies = [
            f"Subject: reuse {i}\r\nX-Tag: tag-{i}\r\n\r\nhello {i}\r\n..dots\r\n".encode()
            for i in range(3)
        ]
        with starttls_client(srv) as s:
            s.login("scott", "tiger")
            for i, body in enumerate(bodies):
                send_on(s, ["b@example.net", "c@example.net"], body)
                wait_until(lambda i=i: len(up.messages) == i + 1, what=f"message {i}")
        wait_queue_empty(srv)
        time.sleep(1.2)  # a retry, if anything was left over, would show now
        assert len(up.messages) == 3
        for body, m in zip(bodies, up.messages, strict=True):
            only_received_before(m.data, body)
            assert m.mail_from == SENDER
            assert m.rcpt_tos == ["b@example.net", "c@example.net"]
            assert (m.authc, m.authzid) == ("kumoauth", "scott")
            assert m.tls_version is not None
        used = [sess for sess in up.sessions if sess.messages]
        assert len(used) == 1, up.sessions
        assert used[0].auth_attempts == 1
        assert used[0].verbs().count("AUTH") == 1
        assert used[0].messages == 3
        assert "authenticated as kumoauth for scott" in srv.log()
        # The relay password is in its file, nowhere else.
        password = upstream_module.DEFAULT_USERS["kumoauth"]
        assert password not in srv.log()
        for path in srv.spool.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------
# 2. identity = "header"


def test_identity_header_signed_and_forgery_removed(tmp_path: Path, certs: Certs) -> None:
    key = b"a shared secret key for the header"
    key_file = tmp_path / "header.key"
    key_file.write_bytes(key + b"\n")
    key_file.chmod(0o600)
    with (
        running_upstream() as up,
        relaying(tmp_path, certs, up, identity='"header"', header_key_file=f'"{key_file}"') as srv,
    ):
        forged = "authn=admin; authz=admin; id=x; sig=" + "0" * 64
        body = (f"X-Kumoauth-Identity: {forged}\r\nSubject: header identity\r\n\r\nhi\r\n").encode()
        mid = submit(srv, ["b@example.net"], body)
        wait_until(lambda: up.messages, what="the message")
        m = email.message_from_bytes(up.messages[0].data)
        values = m.get_all("X-Kumoauth-Identity")
        assert values is not None and len(values) == 1, values
        fields = verify_identity(values[0], key)
        assert fields == {"authn": "scott", "authz": "scott", "id": mid}
        assert verify_identity(values[0], b"another key") is None
        assert b"authn=admin" not in up.messages[0].data
        assert up.messages[0].authzid is None


def test_identity_header_values_cannot_add_fields() -> None:
    """
    An authzid that looks like more fields is one percent-encoded value:
    the docs' verifier returns the identity kumoauth signed, and refuses a
    header that does name a field twice (or an unknown one), signed or not.
    """
    from kumoauth.relay.scheduler import identity_header

    key = b"k" * 32
    verify = docs_verifier()
    mid = "0123456789abcdef01234567"
    tricky = "scott; authn=admin"
    for authz in (tricky, "ø %41=\t;\x1b\u2028x", "a@b+c.d_e-f~g"):
        header = identity_header(key, "scott", authz, mid).decode("ascii")
        assert header.endswith("\r\n") and header.count("\r\n") == 1
        value = header.split(":", 1)[1]
        assert verify(value, key) == {"authn": "scott", "authz": authz, "id": mid}
    value = identity_header(key, "scott", tricky, mid).decode().split(":", 1)[1]
    assert "authn=admin" not in value and value.count("=") == 4

    def signed(fields: str) -> str:
        return f"{fields}; sig={hmac.new(key, fields.encode(), hashlib.sha256).hexdigest()}"

    # What the old encoding produced for that authzid: refused, not "admin".
    assert verify(signed(f"authn=scott; authz={tricky}; id={mid}"), key) is None
    assert verify(signed(f"authn=scott; authz=scott; id={mid}; role=admin"), key) is None
    assert verify(signed(f"authz=scott; authn=scott; id={mid}"), key) is None
    assert verify(signed(f"authn=scott; authz=scott; id={mid}"), key) == {
        "authn": "scott",
        "authz": "scott",
        "id": mid,
    }


# ---------------------------------------------------------------------------
# 3. upstream down, then back on that port


def test_upstream_down_then_back(tmp_path: Path, certs: Certs) -> None:
    ca = trustme.CA()
    port = free_port()
    # After three attempts, the next is an hour away.
    extra = relay_toml(tmp_path / "relay", port, ca, retry_schedule="[1, 1, 3600]")
    with running_server(tmp_path / "srv", certs, POLICY, extra=extra) as srv:
        mid = submit(srv, ["b@example.net"], b"Subject: later\r\n\r\nwhen you are back\r\n")
        other = submit(srv, ["c@example.net"], b"Subject: also\r\n\r\ndown\r\n")
        pattern = rf"relay {mid} deferred: (.*) \(attempt (\d+), 1 recipients\)"
        wait_until(lambda: len(re.findall(pattern, srv.log())) >= 3, 10, "three deferred attempts")
        assert sorted(queue_ids(srv)) == sorted([mid, other])
        found = re.findall(pattern, srv.log())
        attempts = [int(n) for _, n in found]
        assert attempts == list(range(1, len(attempts) + 1)), found  # one line per attempt
        assert all("refused" in reason for reason, _ in found), found
        # The outage itself: one warning, however many messages and attempts.
        down = f"relay: upstream localhost:{port} unreachable: "
        assert srv.log().count(down) == 1, srv.log()[-3000:]
        (line,) = [line for line in srv.log().splitlines() if down in line]
        assert "[kumoauth.relay#warn]" in line and "refused" in line
        with running_upstream(ca=ca) as up:
            forward = Forwarder(port, up.port)
            try:
                # A new message finds the upstream back: the deferred ones
                # go at once, not in an hour.
                submit(srv, ["d@example.net"], b"Subject: new\r\n\r\nback\r\n")
                wait_until(lambda: len(up.messages) == 3, 10, "all three once it is back")
                wait_queue_empty(srv)
            finally:
                forward.close()
        assert b"when you are back" in b"".join(m.data for m in up.messages)
        log = srv.log()
        assert log.count(down) == 1
        back = f"relay: upstream localhost:{port} answers again after "
        assert log.count(back) == 1, log[-3000:]
        assert re.search(re.escape(back) + r"\d+s; 2 deferred messages are due now", log)


def test_a_quoted_local_part_is_relayed_and_logged_as_one_field(
    tmp_path: Path, certs: Certs
) -> None:
    # Taken with 250 at RCPT, then refused by the relay's own check (a
    # space) and bounced as if the upstream had; its text, unquoted in
    # the log, read as fields of its own.
    odd = '"a b) failed=victim@example.net reply=x"@example.net'
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        mid = submit(srv, [odd, "ok@example.net"], b"Subject: odd\r\n\r\nquoted\r\n")
        wait_until(lambda: up.messages, what="the message")
        wait_queue_empty(srv)
        assert up.messages[0].rcpt_tos == [odd, "ok@example.net"]
        assert not bounces(up)
        quoted = '"\\"a b) failed=victim@example.net reply=x\\"@example.net,ok@example.net"'
        (line,) = [line for line in srv.log().splitlines() if f"relay {mid} to " in line]
        assert f"delivered={quoted} " in line, line
        assert " failed=" not in line.replace(quoted, "")


# ---------------------------------------------------------------------------
# 4. 4xx, then retried


def test_4xx_recipient_retried_other_not_resent(tmp_path: Path, certs: Certs) -> None:
    with (
        running_upstream(rcpt_replies={"b@example.net": "451 4.7.1 try again later"}) as up,
        relaying(tmp_path, certs, up) as srv,
    ):
        mid = submit(srv, ["b@example.net", "c@example.net"], b"Subject: 4xx\r\n\r\nretry\r\n")
        wait_until(lambda: up.messages, what="the first attempt")
        up.rcpt_replies = {}
        wait_until(lambda: len(up.messages) >= 2, 10, "the retry")
        wait_queue_empty(srv)
        time.sleep(1.2)
        assert [m.rcpt_tos for m in up.messages] == [["c@example.net"], ["b@example.net"]]
        assert re.search(
            rf"relay {mid} to localhost: delivered=c@example.net deferred=b", srv.log()
        )
        assert not bounces(up)


# ---------------------------------------------------------------------------
# 5. 5xx: a bounce; never a bounce of a bounce


def test_5xx_bounce_and_no_bounce_of_bounce(tmp_path: Path, certs: Certs) -> None:
    with (
        running_upstream(rcpt_replies={"x@example.net": "550 5.1.1 no such user here"}) as up,
        relaying(tmp_path, certs, up) as srv,
    ):
        body = b"Subject: some fail\r\nMessage-ID: <orig@example.com>\r\n\r\nhello\r\n"
        mid = submit(srv, ["b@example.net", "x@example.net", "c@example.net"], body)
        wait_until(lambda: bounces(up), 10, "the bounce")
        wait_queue_empty(srv)
        delivered = [m for m in up.messages if m.mail_from == SENDER]
        assert len(delivered) == 1
        assert delivered[0].rcpt_tos == ["b@example.net", "c@example.net"]
        (bounce,) = bounces(up)
        assert bounce.rcpt_tos == [SENDER]
        msg, blocks = dsn_blocks(bounce.data)
        per_message, per_rcpt = blocks[0], blocks[1:]
        assert per_message["Reporting-MTA"] == "dns; localhost"
        assert mid in msg.as_string()
        assert len(per_rcpt) == 1
        (r,) = per_rcpt
        assert r["Final-Recipient"].lower() == "rfc822; x@example.net"
        assert r["Action"] == "failed"
        assert re.fullmatch(r"5\.\d+\.\d+", r["Status"]), r["Status"]
        assert r["Status"] == "5.1.1"
        assert r["Diagnostic-Code"].startswith("smtp; 550")
        assert "no such user here" in r["Diagnostic-Code"]
        assert "Subject: some fail" in msg.as_string()  # the headers are returned

        # A message from <> (a bounce itself) whose recipient fails: no bounce.
        before = len(up.messages)
        mid2 = submit(srv, ["x@example.net"], b"Subject: null sender\r\n\r\nx\r\n", sender="")
        wait_until(
            lambda: re.search(rf"relay {mid2} to localhost: failed=x@example.net", srv.log()),
            10,
            "the failed attempt",
        )
        wait_queue_empty(srv)
        time.sleep(1.5)
        assert len(up.messages) == before
        # said as a loss, with why (it was an info line saying only "no bounce")
        assert re.search(
            rf"\[kumoauth\.relay#warn\] relay {mid2}: not delivered to x@example\.net "
            r"\(550 [^)]*\) and not bounced: it has the null sender or is a delivery "
            r"report; it is dropped",
            srv.log(),
        ), srv.log()


# ---------------------------------------------------------------------------
# 6. max_age: bounced with 4.4.7


def test_max_age_bounce(tmp_path: Path, certs: Certs) -> None:
    with (
        running_upstream(rcpt_replies={"slow@example.net": "451 4.3.0 mailbox busy"}) as up,
        relaying(tmp_path, certs, up, max_age="2", retry_schedule="[1]") as srv,
    ):
        mid = submit(srv, ["slow@example.net"], b"Subject: too slow\r\n\r\nhi\r\n")
        wait_until(lambda: bounces(up), 15, "the bounce after max_age")
        wait_queue_empty(srv)
        # The last attempt's line says the recipient expired (not "deferred"),
        # and the bounce follows it.
        lines = [line for line in srv.log().splitlines() if f"relay {mid}" in line]
        expired = f"relay {mid} to localhost: expired=slow@example.net "
        expired += "(451 4.3.0 mailbox busy; older than max_age 2s)"
        assert expired in lines[-2], lines
        assert f"relay {mid}: bounce " in lines[-1], lines
        assert all("expired=" not in line for line in lines[:-2]), lines
        (bounce,) = bounces(up)
        _, blocks = dsn_blocks(bounce.data)
        (r,) = blocks[1:]
        assert r["Final-Recipient"].lower() == "rfc822; slow@example.net"
        assert r["Action"] == "failed"
        assert r["Status"] == "4.4.7"
        assert "mailbox busy" in r.get("Diagnostic-Code", ""), r


# ---------------------------------------------------------------------------
# 7. an untrusted certificate: deferred, never plaintext


def test_an_upstream_wanting_auth_defers_and_loses_nothing(tmp_path: Path, certs: Certs) -> None:
    # An operator's mistake: [relay] without username (identity = "none")
    # to an upstream that requires AUTH.  It answered MAIL with 530; the
    # message used to bounce, and the bounce, refused the same way, was
    # dropped: the mail was gone.  It waits for the setting to be fixed.
    with running_upstream() as up:
        extra = relay_toml(
            tmp_path / "relay", up.port, up.ca, identity='"none"', username=None, password_file=None
        )
        with running_server(tmp_path / "srv", certs, POLICY, extra=extra) as srv:
            mid = submit(srv, ["b@example.net"], b"Subject: waits\r\n\r\nhi\r\n")
            pattern = (
                rf"relay {mid} deferred: upstream requires authentication or TLS "
                r"\(\[relay\] username, tls\) at MAIL FROM: 530 5\.7\.0 Authentication required"
            )
            wait_until(lambda: len(re.findall(pattern, srv.log())) >= 2, 10, "two deferrals")
            assert queue_ids(srv) == [mid]
            assert not re.search(r"bounce [0-9a-f]|dropped|not delivered", srv.log())
        assert not up.messages


def test_untrusted_certificate_deferred_never_plaintext(tmp_path: Path, certs: Certs) -> None:
    with running_upstream() as up:
        extra = relay_toml(tmp_path / "relay", up.port, trustme.CA())  # not up's CA
        with running_server(tmp_path / "srv", certs, POLICY, extra=extra) as srv:
            mid = submit(srv, ["b@example.net"], b"Subject: secret\r\n\r\nhidden\r\n")
            pattern = rf"relay {mid} deferred: certificate verification failed"
            wait_until(lambda: len(re.findall(pattern, srv.log())) >= 2, 10, "two deferrals")
            assert queue_ids(srv) == [mid]
        assert not up.messages
        verbs = up.all_verbs()
        assert "MAIL" not in verbs and "AUTH" not in verbs, verbs
        for sess in up.sessions:
            assert set(sess.plaintext_verbs()) <= {"EHLO", "STARTTLS"}, sess.commands


# ---------------------------------------------------------------------------
# 8. a second instance on the same queue


def test_second_instance_refused(tmp_path: Path, certs: Certs) -> None:
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        submit(srv, ["b@example.net"], b"Subject: first\r\n\r\n1\r\n")
        wait_until(lambda: up.messages, what="the first message")
        wait_queue_empty(srv)
        time.sleep(1.2)  # the journal flushed

        def snapshot() -> dict[str, tuple[int, int]]:
            return {
                str(p): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(srv.spool.rglob("*"))
                if p.is_file()
            }

        # The second one has ports of its own: only the queue is shared.
        second = srv.directory / "second.toml"
        text = srv.config.read_text()
        for port in srv.ports:
            text = text.replace(f"tcp:{port}:", f"tcp:{free_port()}:")
        second.write_text(text)
        before = snapshot()
        done = run_twistd(["kumoauth", "--config", str(second)], srv.directory, timeout=30)
        output = (done.stdout + done.stderr).strip()
        print(f"\nsecond instance: {output}")
        assert done.returncode == 1, output
        assert len(output.splitlines()) == 1, output
        assert "in use by another kumoauth" in output, output
        assert str(srv.proc.pid) in output, output
        assert snapshot() == before
        assert srv.proc.poll() is None
        # The first keeps working.
        submit(srv, ["c@example.net"], b"Subject: second\r\n\r\n2\r\n")
        wait_until(lambda: len(up.messages) == 2, 10, "delivery by the first instance")
        wait_queue_empty(srv)


# ---------------------------------------------------------------------------
# 9. kill -9 while relaying under concurrent clients


def test_kill9_under_load_loses_nothing(tmp_path: Path, certs: Certs) -> None:
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        acked: list[str] = []
        stop = threading.Event()
        lock = threading.Lock()

        def client(k: int) -> None:
            n = 0
            while not stop.is_set():
                try:
                    with starttls_client(srv) as s:
                        s.login("scott", "tiger")
                        while not stop.is_set():
                            tag = f"kill9-{k}-{n}-end"
                            n += 1
                            body = f"Subject: {tag}\r\n\r\nnumber {tag}\r\n".encode()
                            s.mail(SENDER)
                            s.rcpt("b@example.net")
                            code, _ = s.data(body)
                            if code == 250:
                                with lock:
                                    acked.append(tag)
                except (OSError, smtplib.SMTPException):
                    time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        rng = random.Random()
        kills = 3
        for _ in range(kills):
            time.sleep(rng.uniform(0.4, 1.5))
            srv.kill()
            srv.start()
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(20)
        assert len(acked) > 20, len(acked)

        def arrived() -> dict[str, int]:
            counts: dict[str, int] = {}
            for m in list(up.messages):
                found = re.search(rb"kill9-\d+-\d+-end", m.data)
                assert found is not None
                tag = found.group().decode()
                counts[tag] = counts.get(tag, 0) + 1
            return counts

        wait_until(lambda: set(acked) <= set(arrived()), 30, "every acknowledged message")
        wait_queue_empty(srv, 15)
        counts = arrived()
        lost = set(acked) - set(counts)
        duplicates = sum(n - 1 for n in counts.values())
        print(
            f"\nkill -9 x{kills}: {len(acked)} acknowledged, {len(counts)} arrived "
            f"({len(counts) - len(set(acked))} not acknowledged), {duplicates} duplicates"
        )
        assert not lost


# ---------------------------------------------------------------------------
# 10. SIGHUP: a new upstream; SIGTERM while a message is being sent


def test_sighup_new_upstream(tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    original = upstream_module._Handler.handle_DATA
    slow: list[Upstream] = []

    async def slow_data(self: Any, server: Any, session: Any, envelope: Any) -> str:
        if self.up in slow:
            await asyncio.sleep(2)
        return await original(self, server, session, envelope)

    monkeypatch.setattr(upstream_module._Handler, "handle_DATA", slow_data)
    ca = trustme.CA()
    with (
        running_upstream(ca=ca) as up1,
        running_upstream(ca=ca) as up2,
        relaying(tmp_path, certs, up1) as srv,
    ):
        submit(srv, ["b@example.net"], b"Subject: one\r\n\r\nto the first\r\n")
        wait_until(lambda: up1.messages, what="delivery to the first upstream")
        # The reload comes while a message is being sent over a session to
        # the first upstream: that message finishes there, the session is
        # not used again.
        slow.append(up1)
        submit(srv, ["b@example.net"], b"Subject: one\r\n\r\nbusy at the reload\r\n")
        wait_until(lambda: up1.all_verbs().count("DATA") >= 2, 10, "the second DATA")
        text = srv.config.read_text()
        assert text.count(f"port = {up1.port}\n") == 1
        srv.config.write_text(text.replace(f"port = {up1.port}\n", f"port = {up2.port}\n"))
        reloads = srv.log().count("reloaded configuration")
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: srv.log().count("reloaded configuration") > reloads, 10, "reload")
        wait_until(lambda: len(up1.messages) == 2, 10, "the busy message at the first upstream")
        wait_queue_empty(srv)
        submit(srv, ["b@example.net"], b"Subject: two\r\n\r\nto the second\r\n")
        wait_until(lambda: up2.messages, what="delivery to the second upstream")
        time.sleep(0.5)
        assert [b"to the second" in m.data for m in up1.messages] == [False, False]
        assert [b"to the second" in m.data for m in up2.messages] == [True]


@pytest.mark.parametrize(
    ("stall", "grace"),
    [(6.0, 9), (60.0, 1)],
    ids=["grace-outlasts-stall", "stall-outlasts-grace"],
)
def test_sigterm_while_sending(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch, stall: float, grace: int
) -> None:
    """
    A send in progress at SIGTERM gets ``[server] shutdown_grace``: one
    that ends within it is delivered before the exit (not sent again), one
    that does not is dropped at the end of it and stays queued.
    """
    original = upstream_module._Handler.handle_DATA
    stalling = {"on": True}

    async def slow_data(self: Any, server: Any, session: Any, envelope: Any) -> str:
        if stalling["on"]:
            await asyncio.sleep(stall)
        return await original(self, server, session, envelope)

    monkeypatch.setattr(upstream_module._Handler, "handle_DATA", slow_data)
    with (
        running_upstream() as up,
        relaying(tmp_path, certs, up, server=f"shutdown_grace = {grace}") as srv,
    ):
        mid = submit(srv, ["b@example.net"], b"Subject: term\r\n\r\nduring DATA\r\n")
        wait_until(lambda: "DATA" in up.all_verbs(), 10, "the upstream to get DATA")
        time.sleep(0.3)  # the message's bytes are on their way
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            code = srv.proc.wait(30 + grace)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()
            pytest.fail(f"SIGTERM did not stop kumoauth in time\n{srv.log()[-3000:]}")
        took = time.monotonic() - started
        assert code == 0, srv.log()[-3000:]
        queued = mid in queue_ids(srv)
        delivered_now = bool(with_tag(up, "during DATA"))
        print(f"\nSIGTERM after {took:.1f}s: queued={queued} delivered={delivered_now}")
        if stall < grace:
            assert delivered_now and not queued, srv.log()[-3000:]
            assert took >= stall - 1, took
        else:
            assert queued and not delivered_now
            assert took < grace + 10, took  # not the 60 s stall (margin for a loaded box)
            assert f"messages still being sent after {grace}s stay queued" in srv.log()
        # What stayed queued goes out after a restart; nothing else does.
        stalling["on"] = False
        srv.start()
        wait_until(lambda: with_tag(up, "during DATA"), 15, "delivery after restart")
        wait_queue_empty(srv)
        time.sleep(1.2)
        assert len(with_tag(up, "during DATA")) == 1


def test_upstream_text_escaped_once_in_log_and_list(tmp_path: Path, certs: Certs) -> None:
    from tests.test_cli_spool import run_cli

    reply = "451 4.3.0 evil\x1b[31mred\u200bnext"
    with (
        running_upstream(rcpt_replies={"b@example.net": reply}) as up,
        relaying(tmp_path, certs, up, retry_schedule="[3600]") as srv,
    ):
        mid = submit(srv, ["b@example.net"], b"Subject: escapes\r\n\r\nx\r\n")
        line = f"relay {mid} to localhost: deferred=b@example.net"
        wait_until(lambda: line in srv.log(), 10, "the attempt")
        once = r"451 4.3.0 evil\x1b[31mred\u200bnext"
        (logged,) = [x for x in srv.log().splitlines() if line in x]
        assert f"deferred=b@example.net ({once})" in logged, logged
        assert "\\\\" not in logged and "\x1b" not in logged and "\u200b" not in logged
        # The queue keeps what the upstream said; `spool list` escapes it once.
        wait_until(lambda: QueueReader(srv.spool).get(mid).last_error == reply, 5, "the journal")
        listing = run_cli(None, "list", config=srv.config)
        assert listing.returncode == 0, listing.stderr
        assert f'error="{once}"' in listing.stdout, listing.stdout
        assert "\x1b" not in listing.stdout


# ---------------------------------------------------------------------------
# 11. smuggling


def test_smuggling_payload_is_one_message_crlf_only(tmp_path: Path, certs: Certs) -> None:
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        with starttls_client(srv) as s:
            s.login("scott", "tiger")
            s.mail(SENDER)
            s.rcpt("b@example.net")
            code, _ = s.docmd("DATA")
            assert code == 354
            s.send(
                b"Subject: smuggle\r\n\r\nfirst\r\n"
                b"lf\n.\nMAIL FROM:<evil@example.org>\nRCPT TO:<victim@example.org>\nDATA\n"
                b"smuggled lf\n"
                b"cr\r.\rMAIL FROM:<evil@example.org>\rRCPT TO:<victim@example.org>\rDATA\r"
                b"smuggled cr\r\n"
                b"last\r\n.\r\n"
            )
            code, reply = s.getreply()
            assert code == 250, reply
        wait_until(lambda: up.messages, what="the message")
        time.sleep(1.0)
        assert len(up.messages) == 1, up.messages
        (m,) = up.messages
        assert m.rcpt_tos == ["b@example.net"] and m.mail_from == SENDER
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", m.data) is None, m.data
        assert b"smuggled lf" in m.data and b"smuggled cr" in m.data
        assert m.data.endswith(b"last\r\n")
        assert up.all_verbs().count("MAIL") == 1


# ---------------------------------------------------------------------------
# 12. SMTPUTF8


def test_smtputf8_end_to_end(tmp_path: Path, certs: Certs) -> None:
    sender, rcpt = "scött@exämple.com", "bjørn@exämple.net"
    body = "Subject: grüße\r\n\r\nÜnïcödé\r\n".encode()
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        submit(srv, [rcpt], body, sender=sender, mail_options=("SMTPUTF8",))
        wait_until(lambda: up.messages, what="the message")
        (m,) = up.messages
        assert "SMTPUTF8" in m.mail_options
        assert (m.mail_from, m.rcpt_tos) == (sender, [rcpt])
        assert m.data.endswith(body)


def test_smtputf8_refused_by_upstream_bounces_567(tmp_path: Path, certs: Certs) -> None:
    rcpt = "bjørn@exämple.net"
    body = "Subject: grüße\r\n\r\nÜnïcödé\r\n".encode()
    with running_upstream(smtputf8=False) as up, relaying(tmp_path, certs, up) as srv:
        submit(srv, [rcpt], body, mail_options=("SMTPUTF8",))
        wait_until(lambda: bounces(up), 10, "the bounce")
        wait_queue_empty(srv)
        assert not [m for m in up.messages if m.mail_from == SENDER]
        (bounce,) = bounces(up)
        assert bounce.rcpt_tos == [SENDER]
        _, blocks = dsn_blocks(bounce.data)
        (r,) = blocks[1:]
        assert r["Action"] == "failed"
        assert r["Status"] == "5.6.7"
        assert "SMTPUTF8" in r["Diagnostic-Code"]
        # kumoauth's own refusal: no upstream said it (it said "localhost
        # said:" and named it as the Remote-MTA)
        assert "Remote-MTA" not in r
        assert b"said:" not in bounce.data and b"not sent: 554 5.6.7" in bounce.data
        # The attempt's line says why it failed: nothing was sent.
        why = (
            f"failed={rcpt} (554 5.6.7 upstream does not offer SMTPUTF8, which this message needs)"
        )
        assert why in srv.log()


def test_the_bounce_of_a_utf8_message_gets_through_an_upstream_without_8bitmime(
    tmp_path: Path, certs: Certs
) -> None:
    # Its report was global (8-bit), the upstream refused it for want of
    # 8BITMIME, and it was dropped: the sender never heard.
    rcpt = "bjørn@exämple.net"
    body = "Subject: grüße\r\n\r\nÜnïcödé\r\n".encode()
    with (
        running_upstream(smtputf8=False, eightbitmime=False) as up,
        relaying(tmp_path, certs, up) as srv,
    ):
        submit(srv, [rcpt], body, mail_options=("SMTPUTF8",))
        wait_until(lambda: bounces(up), 10, "the bounce")
        wait_queue_empty(srv)
        (bounce,) = bounces(up)
        assert bounce.rcpt_tos == [SENDER] and bounce.data.isascii()
        _, blocks = dsn_blocks(bounce.data)
        (r,) = blocks[1:]
        assert r["Status"] == "5.6.7"
        assert r["Final-Recipient"] == "utf-8; bj\\x{F8}rn@ex\\x{E4}mple.net"
        assert "no bounce" not in srv.log()


# ---------------------------------------------------------------------------
# the real Postfix + Dovecot


@contextlib.contextmanager
def real_postfix(
    tmp_path: Path, extra_main: dict[str, str] | None = None
) -> Iterator[tuple[Any, Any, Any, str]]:
    """
    A real Postfix as the upstream, with Dovecot SASL as relay.md's recipe
    builds it (kumoauth a master user, and itself from its address), and a
    recording sink as its relayhost: (sink, dovecot, postfix, the
    ``[relay]`` table for kumoauth).
    """
    pf.require_postfix()
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    master = "kumoauth-master-secret"
    with pf.service_directory() as base, pf.RecordingSink() as sink:
        chain, key = base / "fullchain.pem", base / "privkey.pem"
        cert.private_key_pem.write_to_path(str(key))
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        with (
            pf.running_dovecot_auth(
                base / "dovecot", {"scott": "dovecot-side"}, {"kumoauth": master}
            ) as dovecot,
            pf.running_postfix(
                base / "postfix",
                port=pf.free_port(),
                relayhost=sink.address,
                sasl_socket=dovecot.socket,
                tls=(chain, key),
                extra_main=extra_main,
            ) as postfix,
        ):
            yield (
                sink,
                dovecot,
                postfix,
                relay_toml(tmp_path / "relay", postfix.port, ca, password=master),
            )


def test_real_postfix_authzid_names_the_user(tmp_path: Path, certs: Certs) -> None:
    with real_postfix(tmp_path) as (sink, dovecot, postfix, extra):
        with running_server(tmp_path / "srv", certs, POLICY, extra=extra) as srv:
            tag = f"postfix-{os.getpid()}-{time.time_ns()}"
            body = f"From: {SENDER}\r\nTo: someone@example.net\r\nSubject: {tag}\r\n\r\nhi\r\n"
            submit(srv, ["someone@example.net"], body.encode())
            envelope = sink.wait_for(
                lambda e: tag.encode() in (e.original_content or b""), timeout=20
            )
            wait_queue_empty(srv)
        relayed = email.message_from_bytes(envelope.original_content or b"")
        received = relayed.get_all("Received") or []
        assert "(Authenticated sender: scott)" in received[0].replace("\r\n", ""), received
        assert envelope.mail_from == SENDER
        postfix.wait_log(r"sasl_method=PLAIN, sasl_username=scott$")
        assert pf.wait_for(lambda: "Master user logging in as scott" in dovecot.log(), 5)


def test_real_postfix_takes_kumoauths_own_bounce(tmp_path: Path, certs: Certs) -> None:
    """
    relay.md's Postfix + Dovecot recipe carries kumoauth's own bounces (no
    authzid: kumoauth as itself): its first version had the account only as
    a master user, which Dovecot skips for such a login (535), and every
    bounce waited until max_age, then was dropped (a postmaster's
    walkthrough).
    """
    with real_postfix(
        tmp_path,
        {
            "smtpd_recipient_restrictions": (
                "check_recipient_access inline:{ {nobody@example.net=550 5.1.1 no such user} }"
            )
        },
    ) as (sink, dovecot, postfix, extra):
        with running_server(tmp_path / "srv", certs, POLICY, extra=extra) as srv:
            submit(srv, ["nobody@example.net"], b"Subject: to nobody\r\n\r\nhi\r\n")
            envelope = sink.wait_for(lambda e: e.mail_from in ("", "<>"), timeout=20)
            wait_queue_empty(srv)
            assert "refused AUTH" not in srv.log() and "unreachable" not in srv.log()
        assert envelope.rcpt_tos == [SENDER]
        report = email.message_from_bytes(envelope.original_content or b"")
        assert report.get_content_type() == "multipart/report"
        assert b"Status: 5.1.1" in (envelope.original_content or b"")
        assert b"no such user" in (envelope.original_content or b"")
        postfix.wait_log(r"sasl_method=PLAIN, sasl_username=kumoauth$")


def test_real_postfix_gets_the_submitting_client_by_xforward(tmp_path: Path, certs: Certs) -> None:
    """
    A Postfix that authorizes kumoauth for XFORWARD (smtpd_authorized_
    xforward_hosts) logs the submitting client and kumoauth's queue id
    (orig_queue_id) rather than kumoauth as its client: a postmaster's
    walkthrough found every message logged as client=unknown[127.0.0.1]
    with nothing to follow it back.
    """
    with real_postfix(tmp_path, {"smtpd_authorized_xforward_hosts": "127.0.0.0/8"}) as (
        sink,
        dovecot,
        postfix,
        extra,
    ):
        with running_server(tmp_path / "srv", certs, POLICY, extra=extra) as srv:
            with smtplib.SMTP("127.0.0.1", srv.starttls_port, timeout=10) as s:
                s.ehlo("mua.client.example")
                s.starttls(context=srv.certs.client_context())
                s.ehlo("mua.client.example")
                s.login("scott", "tiger")
                mid = send_on(s, ["someone@example.net"], b"Subject: xf\r\n\r\nhi\r\n")
            sink.wait_for(lambda e: b"Subject: xf" in (e.original_content or b""), timeout=20)
            wait_queue_empty(srv)
        postfix.wait_log(rf"orig_queue_id={mid}, orig_client=unknown\[127\.0\.0\.1\]")
        postfix.wait_log(r" xforward=1 ")


# ---------------------------------------------------------------------------
# metrics


def test_relay_and_queue_metrics(tmp_path: Path, certs: Certs) -> None:
    import urllib.request

    from tests.server import free_port

    mport = free_port()
    with running_upstream(rcpt_replies={"later@example.net": "451 4.7.1 try later"}) as up:
        extra = relay_toml(tmp_path / "relay", up.port, up.ca, retry_schedule="[3600]")
        extra += f'\n[metrics]\nendpoint = "tcp:{mport}:interface=127.0.0.1"\n'
        with running_server(tmp_path / "srv", certs, POLICY, extra=extra) as srv:
            submit(srv, ["b@example.net"], b"Subject: one\r\n\r\n1\r\n")
            submit(srv, ["later@example.net"], b"Subject: two\r\n\r\n2\r\n")
            wait_until(lambda: len(up.messages) == 1, what="the delivered one")

            def scrape() -> str:
                url = f"http://127.0.0.1:{mport}/metrics"
                return urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: S310

            wait_until(
                lambda: 'kumoauth_queue_messages{state="deferred"} 1.0' in scrape(),
                what="the queue gauge",
                timeout=20,
            )
            text = scrape()
            assert 'kumoauth_relay_attempts_total{result="delivered"} 1.0' in text
            assert 'kumoauth_relay_attempts_total{result="deferred"} 1.0' in text
            assert "kumoauth_relay_latency_seconds_count" in text
            assert 'kumoauth_queue_oldest_seconds{state="deferred"}' in text


# ---------------------------------------------------------------------------
# [server] workers: the supervisor owns the queue and relays what the workers store


def test_workers_store_and_the_supervisor_relays_each_message_once(
    tmp_path: Path, certs: Certs
) -> None:
    with running_upstream() as up:
        extra = relay_toml(tmp_path / "relay", up.port, up.ca)
        with running_server(
            tmp_path / "srv", certs, POLICY, extra=extra, server="workers = 2"
        ) as srv:
            for i in range(12):
                submit(srv, ["b@example.net"], f"Subject: n{i}\r\n\r\nmessage {i}\r\n".encode())
            wait_until(lambda: len(up.messages) >= 12, what="12 messages")
            wait_queue_empty(srv)
            time.sleep(1.2)  # a second send of any of them would show now
            bodies = sorted(m.data.rsplit(b"\r\n\r\n", 1)[1] for m in up.messages)
            assert bodies == sorted(f"message {i}\r\n".encode() for i in range(12))
            log = srv.log()
            # Workers accepted the mail; only the supervisor relayed it.
            assert "[kumoauth.smtp#info] spooled" in log
            assert "[worker 0] [kumoauth.relay" not in log
            assert "[worker 1] [kumoauth.relay" not in log
