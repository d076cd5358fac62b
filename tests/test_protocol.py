"""
The SMTP dialogue of SPEC §6 (all but the AUTH rows), driven through
StringTransport with a fake clock: deterministic, no sockets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.logger import formatEvent

from kumoauth.config import ServerConfig
from kumoauth.policy import Policy
from kumoauth.relay.queue import dsn_of
from kumoauth.testing import Session, plain_b64
from tests.conftest import read_only

HOST = "mail.example.com"


def scott_policy() -> Policy:
    policy = Policy()
    policy.on(
        "smtp_server_auth_plain", lambda authz, authc, pw, meta: authc == "scott" and pw == "tiger"
    )
    return policy


def authed(make_session, **kw) -> Session:
    s = make_session(scott_policy(), **kw)
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger")).startswith("235 ")
    return s


def codes(text: str) -> list[str]:
    return [line[:3] for line in text.split("\r\n") if line]


def test_banner(make_session):
    s = make_session()
    assert s.banner == f"220 {HOST} ESMTP kumoauth\r\n"


def test_banner_text_is_configurable(make_session):
    s = make_session(server=ServerConfig(hostname="mx.test", banner="Ready"))
    assert s.banner == "220 mx.test ESMTP Ready\r\n"


def test_ehlo_before_tls_offers_starttls_not_auth(make_session):
    s = make_session(tls="starttls")
    lines = s.command("EHLO client.example").split("\r\n")
    assert lines[0] == f"250-{HOST} Hello client.example"
    keywords = [line[4:] for line in lines if line]
    assert keywords[1:] == [
        "PIPELINING",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "SIZE 26214400",
        "DSN",
        "STARTTLS",
    ]
    assert lines[-2].startswith("250 STARTTLS")
    assert not any(k.startswith("AUTH") for k in keywords)


def test_ehlo_inside_tls_offers_auth_not_starttls(make_session):
    s = make_session(tls="implicit")
    reply = s.command("EHLO client.example")
    assert "250 AUTH PLAIN LOGIN\r\n" in reply
    assert "STARTTLS" not in reply


def test_ehlo_after_starttls_offers_auth(make_session):
    s = make_session(tls="starttls")
    s.command("EHLO client.example")
    assert s.command("STARTTLS") == "220 2.0.0 Ready to start TLS\r\n"
    assert s.transport.tls_started
    reply = s.command("EHLO client.example")
    assert "AUTH PLAIN LOGIN" in reply and "STARTTLS" not in reply


def test_allow_plaintext_auth_offers_auth_in_clear(make_session):
    s = make_session(tls="none", allow_plaintext_auth=True)
    assert "250 AUTH PLAIN LOGIN" in s.command("EHLO client.example")


def test_ehlo_needs_a_domain(make_session):
    s = make_session()
    assert s.command("EHLO").startswith("501 5.5.4")
    assert s.command("HELO").startswith("501 5.5.4")


def test_helo_is_plain_smtp(make_session):
    s = make_session(auth_required=False)
    assert s.command("HELO client.example") == f"250 {HOST} Hello client.example\r\n"
    s.command("MAIL FROM:<a@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    assert s.send(b"hi\r\n.\r\n").startswith("250 ")
    (msg,) = s.messages()
    assert b" with SMTP id " in msg.read_bytes()


def test_starttls_discards_pipelined_commands(make_session):
    """CVE-2011-0411: RSET sent in the same packet as STARTTLS is never answered."""
    s = make_session(tls="starttls")
    s.command("EHLO client.example")
    out = s.send(b"STARTTLS\r\nRSET\r\nNOOP\r\n")
    assert out == "220 2.0.0 Ready to start TLS\r\n"
    # The first thing said inside TLS is answered, nothing queued before it.
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"


def test_session_is_new_after_starttls(make_session):
    s = make_session(tls="starttls", auth_required=False)
    s.command("EHLO client.example")
    assert s.meta.get_meta("ehlo_domain") == "client.example"
    s.command("STARTTLS")
    assert s.meta.get_meta("ehlo_domain") is None
    assert s.command("MAIL FROM:<a@example.com>").startswith("503 5.5.1")
    assert s.command("AUTH PLAIN").startswith("503 5.5.1")


def test_starttls_transaction_is_forgotten(make_session):
    s = make_session(tls="starttls", auth_required=False)
    s.command("EHLO client.example")
    assert s.command("MAIL FROM:<a@example.com>").startswith("250")
    s.command("STARTTLS")
    s.command("EHLO client.example")
    assert s.command("RCPT TO:<b@example.net>").startswith("503 5.5.1")


def test_starttls_with_arguments(make_session):
    s = make_session(tls="starttls")
    s.command("EHLO client.example")
    assert s.command("STARTTLS now").startswith("501 5.5.4")
    assert not s.transport.tls_started


def test_starttls_twice(make_session):
    s = make_session(tls="starttls")
    s.command("EHLO client.example")
    s.command("STARTTLS")
    s.command("EHLO client.example")
    assert s.command("STARTTLS").startswith("503 5.5.1")


@pytest.mark.parametrize("tls", ["implicit", "none"])
def test_starttls_on_listener_without_it(make_session, tls):
    s = make_session(tls=tls, auth_required=False)
    s.command("EHLO client.example")
    assert s.command("STARTTLS").startswith("502 5.5.1")


def test_mail_before_auth_on_auth_required_listener(make_session):
    s = make_session(scott_policy())
    s.command("EHLO client.example")
    assert s.command("MAIL FROM:<a@example.com>").startswith("530 5.7.0")


def test_mail_before_starttls_is_told_to_start_tls(make_session):
    # RFC 3207 §4: before TLS, the client's next step is STARTTLS (AUTH is
    # not even offered yet), not a password.
    s = make_session(scott_policy(), tls="starttls")
    s.command("EHLO client.example")
    assert s.command("MAIL FROM:<a@example.com>") == (
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    )
    s.command("STARTTLS")
    s.command("EHLO client.example")
    assert s.command("MAIL FROM:<a@example.com>") == "530 5.7.0 Authentication required\r\n"


def test_mail_before_ehlo(make_session):
    s = make_session(auth_required=False)
    assert s.command("MAIL FROM:<a@example.com>").startswith("503 5.5.1")


def test_mail_with_auth_and_size_parameters(make_session):
    s = authed(make_session)
    reply = s.command(
        "MAIL FROM:<scott@example.com> AUTH=<scott@example.com> SIZE=1000 BODY=8BITMIME"
    )
    assert reply == "250 2.1.0 Sender OK\r\n"


def test_mail_size_over_limit(make_session):
    s = authed(make_session, server=ServerConfig(hostname=HOST, max_message_size=1000))
    assert s.command("MAIL FROM:<a@example.com> SIZE=1001").startswith("552 5.3.4")
    assert s.command("MAIL FROM:<a@example.com> SIZE=1000").startswith("250")


@pytest.mark.parametrize(
    "line,code",
    [
        ("MAIL FROM:a@example.com", "501 5.5.4"),
        ("MAIL TO:<a@example.com>", "501 5.5.4"),
        ("MAIL FROM:<not an address>", "501 5.1.7"),
        ("MAIL FROM:<a@example.com> FOO=1", "555 5.5.4"),
        ("MAIL FROM:<a@example.com> SIZE=big", "501 5.5.4"),
    ],
)
def test_mail_syntax_errors(make_session, line, code):
    s = authed(make_session)
    assert s.command(line).startswith(code)
    assert s.command("MAIL FROM:<a@example.com>").startswith("250")


def test_null_sender_is_accepted(make_session):
    s = authed(make_session)
    assert s.command("MAIL FROM:<>").startswith("250")
    assert s.command("RCPT TO:<>").startswith("501 5.1.3")


def test_nested_mail(make_session):
    s = authed(make_session)
    s.command("MAIL FROM:<a@example.com>")
    assert s.command("MAIL FROM:<a@example.com>").startswith("503 5.5.1")


def test_rcpt_before_mail(make_session):
    s = authed(make_session)
    assert s.command("RCPT TO:<b@example.net>").startswith("503 5.5.1")


def test_too_many_recipients(make_session):
    s = authed(make_session, server=ServerConfig(hostname=HOST, max_recipients=2))
    s.command("MAIL FROM:<a@example.com>")
    assert s.command("RCPT TO:<b1@example.net>").startswith("250 2.1.5")
    assert s.command("RCPT TO:<b2@example.net>").startswith("250 2.1.5")
    assert s.command("RCPT TO:<b3@example.net>").startswith("452 4.5.3")
    s.command("DATA")
    assert s.send(b"x\r\n.\r\n").startswith("250")
    assert s.messages()[0].envelope["rcpt_to"] == ["b1@example.net", "b2@example.net"]


def test_refused_addresses_are_not_protocol_errors(make_session):
    # A UTF-8 address without SMTPUTF8 refuses that address (553), and DATA
    # after pipelined RCPTs that all failed gets 554 (RFC 2920 §3.1): how a
    # transaction goes, not a client's mistake, so max_errors never closes.
    s = authed(make_session, server=ServerConfig(hostname=HOST, max_errors=2))
    for _ in range(3):
        assert s.command("MAIL FROM:<pelé@example.com>").startswith("553 5.6.7")
    s.command("MAIL FROM:<a@example.com>")
    for _ in range(3):
        assert s.command("RCPT TO:<pelé@example.com>").startswith("553 5.6.7")
        assert s.command("DATA").startswith("554 5.5.1")
    assert not s.closed
    assert s.command("RCPT TO:<b@example.net>").startswith("250")


def test_data_without_recipients(make_session):
    s = authed(make_session)
    assert s.command("DATA").startswith("503 5.5.1")
    s.command("MAIL FROM:<a@example.com>")
    assert s.command("DATA").startswith("554 5.5.1")


def send_message(s: Session, body: bytes) -> str:
    s.command("MAIL FROM:<scott@example.com>")
    s.command("RCPT TO:<b@example.net>")
    assert s.command("DATA").startswith("354 ")
    return s.send(body)


def test_message_is_spooled_with_meta(make_session):
    s = authed(make_session, listener_meta={"tenant": "acme"})
    reply = send_message(s, b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert reply.startswith("250 2.0.0 ")
    (msg,) = s.messages()
    assert reply.strip().endswith(msg.id)
    env = msg.envelope
    assert env["mail_from"] == "scott@example.com"
    assert env["rcpt_to"] == ["b@example.net"]
    meta = env["meta"]
    assert meta["authn_id"] == "scott" and meta["authz_id"] == "scott"
    assert meta["received_from"] == "127.0.0.1:50000"
    assert meta["received_via"] == "127.0.0.1:587"
    assert meta["reception_protocol"] == "ESMTP"
    assert meta["hostname"] == HOST
    assert meta["ehlo_domain"] == "client.example"
    assert meta["tenant"] == "acme"
    data = msg.read_bytes()
    assert data.startswith(
        b"Received: from client.example ([127.0.0.1])\r\n"
        b"\tby mail.example.com (kumoauth) with ESMTPSA id " + msg.id.encode()
    )
    assert data.endswith(b"\r\nSubject: hi\r\n\r\nhello\r\n")


def test_bare_lf_dot_never_ends_a_message(make_session):
    s = authed(make_session)
    body = b"line one\n.\nstill the same message\r.\rand more\r\n"
    reply = send_message(s, body + b".\r\n")
    assert reply.startswith("250 ")
    (msg,) = s.messages()
    # One message; its bare line ends became CRLF ([server] bare_newlines).
    assert msg.read_bytes().endswith(
        b"line one\r\n.\r\nstill the same message\r\n.\r\nand more\r\n"
    )


def test_dot_stuffing_is_removed(make_session):
    s = authed(make_session)
    send_message(s, b"..leading dot\r\n...\r\n.\r\n")
    (msg,) = s.messages()
    assert msg.read_bytes().endswith(b"\r\n.leading dot\r\n..\r\n")


def test_data_split_across_packets(make_session):
    s = authed(make_session)
    s.command("MAIL FROM:<scott@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    assert s.send(b"part one\r") == ""
    assert s.send(b"\npart two\r\n.") == ""
    assert s.send(b"\r\n").startswith("250 ")
    assert s.messages()[0].read_bytes().endswith(b"part one\r\npart two\r\n")


def test_oversized_message_is_refused_and_not_spooled(make_session, spool_dir):
    s = authed(make_session, server=ServerConfig(hostname=HOST, max_message_size=100))
    reply = send_message(s, b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\n")
    assert reply.startswith("552 5.3.4")
    assert s.messages() == []
    # The session goes on.
    assert send_message(s, b"small\r\n.\r\n").startswith("250 ")


def test_one_enormous_data_line_is_refused(make_session):
    s = authed(make_session, server=ServerConfig(hostname=HOST, max_message_size=1000))
    s.command("MAIL FROM:<scott@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    for _ in range(10):
        assert s.send(b"z" * 500) == ""
    assert s.send(b"\r\n.\r\n").startswith("552 5.3.4")
    assert s.messages() == []


def test_read_only_spool_gives_451_and_leaves_nothing(make_session, spool_dir):
    s = authed(make_session)
    with read_only(spool_dir):
        reply = send_message(s, b"hello\r\n.\r\n")
    assert reply.startswith("451 4.3.0")
    assert s.messages() == []
    assert send_message(s, b"again\r\n.\r\n").startswith("250 ")
    assert len(s.messages()) == 1


def test_spool_write_error_gives_451_and_session_goes_on(make_session, spool_dir):
    """Works as root too: the segment directory is replaced by a file."""
    s = authed(make_session)
    segments = spool_dir / "seg"
    segments.write_bytes(b"not a directory")
    assert send_message(s, b"hello\r\n.\r\n").startswith("451 4.3.0")
    segments.unlink()
    assert s.messages() == []
    assert send_message(s, b"again\r\n.\r\n").startswith("250 2.0.0")
    assert len(s.messages()) == 1


def test_unknown_command(make_session):
    s = make_session()
    assert s.command("FOO bar") == "500 5.5.2 Command unrecognized\r\n"
    assert s.command("\x00\x01") == "500 5.5.2 Command unrecognized\r\n"


def test_line_over_1000_octets(make_session):
    s = make_session()
    assert s.command("NOOP " + "x" * 1000).startswith("500 5.5.2")
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"


def test_endless_line_is_discarded_without_buffering(make_session):
    s = make_session()
    for _ in range(100):
        assert s.send(b"x" * 10000) == ""
    assert len(s.protocol._buf) < 20000
    assert s.send(b"\r\nNOOP\r\n") == "500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"


def test_a_line_ended_by_a_bare_lf_is_answered_at_once(make_session):
    # `openssl s_client` without -crlf, waiting for a reply: said at once,
    # not left to the idle timeout; a protocol error (RFC 5321 §2.3.8).
    s = make_session(server=ServerConfig(hostname=HOST, max_errors=3))
    assert s.send(b"NOOP\n") == "500 5.5.2 Line must end with CRLF\r\n"
    # What a CRLF then ends is the rest of that line: dropped, unanswered
    # (a proxy framing on CRLF saw one line, and got its one reply).
    assert s.send(b"RSET\n") == ""
    assert s.send(b"RSET\r\n") == ""
    assert s.send(b"NOOP\r\n") == "250 2.0.0 OK\r\n"
    # A bare LF inside a line ends nothing: the line is refused whole (no
    # command smuggled past a proxy that frames on CRLF).
    assert s.send(b"EHLO x\nRSET\r\n") == "501 5.5.4 Invalid domain name\r\n"
    # In an AUTH exchange it ends the exchange with RFC 4954's 501.
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN").startswith("334")
    assert s.send(b"AGZvbwBiYXI=\n") == (
        "501 5.5.2 Line must end with CRLF\r\n421 4.7.0 Too many errors, closing connection\r\n"
    )  # the third error
    # A CRLF split across reads is no bare LF.
    s = make_session()
    assert s.send(b"NOOP\r") == ""
    assert s.send(b"\n") == "250 2.0.0 OK\r\n"


def test_idle_timer_leaves_a_handshake_to_its_own_deadline(make_session, captured_log):
    # idle_timeout below [tls] handshake_timeout (30 s): a client that never
    # sends its ClientHello is a handshake timeout at 30 s, not an idle one
    # with a 421 written into a TLS layer that never started.
    s = make_session(tls="starttls", server=ServerConfig(hostname=HOST, idle_timeout=20))
    s.command("EHLO client.example")
    s.transport.on_tls = None  # the handshake never completes
    s.command("STARTTLS")
    s.clock.advance(25)
    assert not s.closed
    s.clock.advance(6)
    assert s.closed and s.output() == ""
    texts = [formatEvent(e) for e in captured_log.events]
    assert any(t.startswith("TLS handshake timeout for 127.0.0.1:") for t in texts), texts
    assert not any("idle timeout" in t for t in texts), texts


def test_idle_timeout(make_session):
    s = make_session(server=ServerConfig(hostname=HOST, idle_timeout=30))
    s.clock.advance(20)
    s.command("NOOP")
    s.clock.advance(20)
    assert not s.closed
    s.clock.advance(11)
    assert s.output().startswith("421 4.4.2")
    assert s.closed


def test_partial_line_does_not_reset_idle_timer(make_session):
    s = make_session(server=ServerConfig(hostname=HOST, idle_timeout=30))
    for _ in range(4):
        s.send(b"N")
        s.clock.advance(10)
    assert s.closed


def test_rset_keeps_ehlo_and_authentication(make_session):
    s = authed(make_session)
    s.command("MAIL FROM:<a@example.com>")
    assert s.command("RSET") == "250 2.0.0 OK\r\n"
    assert s.command("RCPT TO:<b@example.net>").startswith("503")
    assert s.command("MAIL FROM:<a@example.com>").startswith("250")


def test_quit(make_session):
    s = make_session()
    assert s.command("QUIT") == f"221 2.0.0 {HOST} closing connection\r\n"
    assert s.closed


def test_noop_vrfy_help(make_session):
    s = make_session()
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"
    assert s.command("VRFY scott").startswith("252 2.5.0")
    assert s.command("VRFY").startswith("501 5.5.4")  # the argument is required
    assert s.command("EXPN staff").startswith("502 5.5.1")  # defined, not offered
    assert s.command("HELP").startswith("214 2.0.0")


def test_expn_is_not_counted_as_a_client_error(make_session):
    s = make_session(server=ServerConfig(hostname=HOST, max_errors=2))
    for _ in range(3):
        assert s.command("EXPN staff").startswith("502 ")
    assert not s.closed


def test_mail_parameters_need_ehlo(make_session):
    # After HELO no extension was announced (RFC 5321 §2.2.1): SMTPUTF8,
    # SIZE, BODY and AUTH= get 555, a plain MAIL FROM still works.
    s = authed(make_session)
    s.command("HELO client.example")
    for params in ("SMTPUTF8", "BODY=8BITMIME", "SIZE=10", "AUTH=<>"):
        assert s.command(f"MAIL FROM:<a@example.com> {params}") == (
            "555 5.5.4 MAIL parameters need EHLO\r\n"
        )
    assert s.command("MAIL FROM:<a@example.com>").startswith("250")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    assert s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").startswith("250 ")
    (msg,) = s.messages()
    assert not msg.meta.get("smtputf8")


def test_pipelined_commands_answered_in_order(make_session):
    s = authed(make_session)
    out = s.send(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<bad>\r\n"
        b"DATA\r\nhello\r\n.\r\nNOOP\r\nQUIT\r\n"
    )
    assert codes(out) == ["250", "250", "501", "354", "250", "250", "221"]


def test_pipelined_replies_leave_in_one_write(make_session):
    # RFC 2920 §3.2: the replies to a pipelined group together (one TLS
    # record, one segment), not one write each.
    s = authed(make_session)
    writes: list[bytes] = []
    write = s.transport.write
    s.transport.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
    s.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<bad>\r\nDATA\r\n")
    assert [codes(w.decode()) for w in writes] == [["250", "250", "501", "354"]]
    writes.clear()
    s.send(b"hello\r\n.\r\nNOOP\r\n")
    assert [codes(w.decode()) for w in writes] == [["250", "250"]]
    writes.clear()
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"
    assert len(writes) == 1


def test_starttls_reply_leaves_before_the_handshake_when_pipelined(make_session):
    s = make_session(tls="starttls")
    order: list[object] = []
    write = s.transport.write
    s.transport.write = lambda data: (order.append(data), write(data))  # type: ignore[method-assign]
    s.transport.on_tls = lambda: order.append("TLS")
    s.send(b"EHLO client.example\r\nSTARTTLS\r\n")
    assert len(order) == 2 and order[1] == "TLS", order
    assert codes(order[0].decode())[-1] == "220"  # type: ignore[union-attr]


def test_max_errors_closes(make_session):
    s = make_session(server=ServerConfig(hostname=HOST, max_errors=3))
    s.command("BAD")
    s.command("BAD")
    assert not s.closed
    out = s.command("BAD")
    assert (
        out == "500 5.5.2 Command unrecognized\r\n421 4.7.0 Too many errors, closing connection\r\n"
    )
    assert s.closed


def test_closing_at_a_limit_is_logged(make_session, captured_log):
    s = make_session(server=ServerConfig(hostname=HOST, max_errors=3))
    s.send(b"BAD\r\nBAD\r\nBAD\r\n")
    assert s.closed
    s = make_session(scott_policy())
    s.command("EHLO client.example")
    for _ in range(3):
        s.command("AUTH PLAIN " + plain_b64("", "scott", "wrong"))
    assert s.closed
    texts = [formatEvent(e) for e in captured_log.events]
    assert "closing 127.0.0.1:50000: too many errors (3)" in texts, texts
    assert "closing 127.0.0.1:50000: too many authentication failures (3)" in texts, texts


def test_max_connections_per_ip(make_session):
    first = make_session(server=ServerConfig(hostname=HOST, max_connections_per_ip=2))
    rt = first.runtime
    second = make_session(runtime=rt)
    assert second.banner.startswith("220 ")
    third = make_session(runtime=rt)
    assert third.banner.startswith("421 4.7.0")
    assert third.closed
    other_ip = make_session(runtime=rt, client=("192.0.2.7", 4000))
    assert other_ip.banner.startswith("220 ")
    first.close()
    assert make_session(runtime=rt).banner.startswith("220 ")


def test_max_connections_per_ip_counts_an_ipv6_client_by_its_network(make_session):
    # Every address of one host's /64 got max_connections_per_ip of its own:
    # one host could fill max_connections and lock everyone out.
    first = make_session(
        server=ServerConfig(hostname=HOST, max_connections_per_ip=2),
        client=("2001:db8:1:2::1", 4000),
    )
    rt = first.runtime
    assert make_session(runtime=rt, client=("2001:db8:1:2::2", 4000)).banner.startswith("220 ")
    third = make_session(runtime=rt, client=("2001:db8:1:2:ffff::3", 4000))
    assert third.banner.startswith("421 4.7.0")
    assert make_session(runtime=rt, client=("2001:db8:1:3::1", 4000)).banner.startswith("220 ")
    first.close()
    assert make_session(runtime=rt, client=("2001:db8:1:2::9", 4000)).banner.startswith("220 ")
    assert rt.limits.total == 3
    # One host on a dual-stack listener (IPv4-mapped) and an IPv4 one.
    v4 = make_session(runtime=rt, client=("192.0.2.9", 4000))
    assert v4.banner.startswith("220 ")
    assert make_session(runtime=rt, client=("::ffff:192.0.2.9", 4000)).banner.startswith("220 ")
    mapped = make_session(runtime=rt, client=("::ffff:192.0.2.9", 4001))
    assert mapped.banner.startswith("421 4.7.0")


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("192.0.2.1", 64, "192.0.2.1"),
        ("::ffff:192.0.2.1", 64, "192.0.2.1"),
        ("2001:db8:1:2::1", 64, "20010db800010002/64"),
        ("2001:db8:1:2:ffff::1", 64, "20010db800010002/64"),
        ("2001:db8:1:2::1%eth0", 64, "20010db800010002/64"),
        ("2001:db8::1", 128, "20010db8000000000000000000000001/128"),
        ("2001:db8::1", 0, "0/0"),
        ("local", 64, "local"),
        ("not:an:address", 64, "not:an:address"),
    ],
)
def test_limit_key(ip, prefix, key):
    from kumoauth.smtp.runtime import limit_key

    assert limit_key(ip, prefix) == key


def test_max_connections(make_session):
    first = make_session(server=ServerConfig(hostname=HOST, max_connections=1))
    other = make_session(runtime=first.runtime, client=("192.0.2.7", 4000))
    assert other.banner.startswith("421 4.7.0")
    third = make_session(runtime=first.runtime, client=("192.0.2.8", 4000))
    assert third.banner.startswith("421 4.7.0")
    assert first.runtime.limits.total == 1
    first.close()
    assert first.runtime.limits.total == 0


def test_conn_meta_presets(make_session):
    s = make_session(tls="starttls", listener_meta={"port_kind": "submission"})
    meta = s.meta
    assert meta.get_meta("reception_protocol") == "ESMTP"
    assert meta.get_meta("received_from") == "127.0.0.1:50000"
    assert meta.get_meta("received_via") == "127.0.0.1:587"
    assert meta.get_meta("hostname") == HOST
    assert meta.get_meta("port_kind") == "submission"
    assert meta.get_meta("ehlo_domain") is None
    s.command("EHLO client.example")
    assert meta.get_meta("ehlo_domain") == "client.example"


def test_received_header_says_esmtps_without_auth(make_session):
    s = make_session(tls="implicit", auth_required=False)
    s.command("EHLO client.example")
    send_message(s, b"x\r\n.\r\n")
    assert b" with ESMTPS id " in s.messages()[0].read_bytes()


def test_received_header_says_esmtp_in_clear(make_session):
    s = make_session(tls="none", auth_required=False)
    s.command("EHLO client.example")
    send_message(s, b"x\r\n.\r\n")
    assert b" with ESMTP id " in s.messages()[0].read_bytes()


def test_policy_bug_costs_the_client_a_451(make_session, captured_log):
    policy = Policy()

    def broken(sender, meta):
        raise KeyError("oops")

    policy.on("smtp_server_mail_from", broken)
    s = make_session(policy, auth_required=False)
    s.command("EHLO client.example")
    assert s.command("MAIL FROM:<a@example.com>").startswith("451 4.3.0")
    assert "KeyError" in captured_log.text()
    assert s.command("NOOP").startswith("250")


def test_written_spool_has_no_temporary_leftovers(make_session, spool_dir: Path):
    s = authed(make_session)
    send_message(s, b"x\r\n.\r\n")
    assert [p.name for p in (spool_dir / "seg").iterdir() if p.name.startswith(".")] == []


def test_reload_leaves_live_sessions_alone(make_session):
    """A reload swaps the factory's listener and runtime; a live session keeps its own."""
    import dataclasses

    s = make_session(scott_policy(), server=ServerConfig(hostname=HOST, max_recipients=1))
    s.command("EHLO client.example")
    old_runtime = s.runtime
    s.factory.listener = dataclasses.replace(s.factory.listener, auth_required=False)
    s.factory.runtime = dataclasses.replace(old_runtime, server=ServerConfig(hostname="new"))
    assert s.command("MAIL FROM:<a@example.com>").startswith("530 5.7.0")
    assert s.protocol.rt is old_runtime
    late = make_session(runtime=s.factory.runtime, auth_required=False)
    late.command("EHLO client.example")
    assert late.command("MAIL FROM:<a@example.com>").startswith("250")


def test_the_spooled_line_names_the_sender_and_the_message_id(make_session, captured_log):
    # a Postfix admin traces a message by its Message-ID and sender
    from twisted.logger import formatEvent

    s = authed(make_session)
    s.command("MAIL FROM:<scott@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    reply = s.send(b"Subject: x\r\nMessage-ID:\r\n <1234.5678@client.example>\r\n\r\nhi\r\n.\r\n")
    assert reply.startswith("250 ")
    s.command("MAIL FROM:<>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    assert s.send(b'Message-ID: <a b="c"\x1b[31m>\r\n\r\nhi\r\n.\r\n').startswith("250 ")
    s.command("MAIL FROM:<scott@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    assert s.send(b"Subject: no id\r\n\r\nhi\r\n.\r\n").startswith("250 ")
    lines = [formatEvent(e) for e in captured_log.events if "spooled " in formatEvent(e)]
    assert len(lines) == 3, lines
    assert lines[0].endswith(
        " from=<scott@example.com> message_id=<1234.5678@client.example> authn=scott"
    )
    # a client's text escaped and quoted: one field, no raw control
    assert lines[1].endswith(' from=<> message_id="<a b=\\"c\\"\\x1b[31m>" authn=scott')
    assert lines[2].endswith(" from=<scott@example.com> authn=scott")
    events = [e for e in captured_log.events if "spooled " in formatEvent(e)]
    assert events[0]["message_id"] == "<1234.5678@client.example>"
    assert events[0]["mail_from"] == "scott@example.com"


# -- the DSN extension (RFC 3461) --------------------------------------------


def test_dsn_parameters_are_stored_with_the_message(make_session):
    s = authed(make_session)
    assert s.command("MAIL FROM:<a@example.com> RET=FULL ENVID=QQ+2B1").startswith("250 ")
    assert s.command(
        "RCPT TO:<b@example.net> NOTIFY=success,failure ORCPT=rfc822;orig+2B1@example.net"
    ).startswith("250 ")
    assert s.command("RCPT TO:<c@example.net>").startswith("250 ")
    assert s.command("RCPT TO:<d@example.net> NOTIFY=NEVER").startswith("250 ")
    s.command("DATA")
    assert s.send(b"Subject: dsn\r\n\r\nhi\r\n.\r\n").startswith("250 ")
    (msg,) = s.messages()
    assert msg.envelope["dsn"] == {
        "ret": "FULL",
        "envid": "QQ+1",
        "rcpt": {
            "b@example.net": {
                "notify": "SUCCESS,FAILURE",
                "orcpt": ["rfc822", "orig+1@example.net"],
            },
            "d@example.net": {"notify": "NEVER"},
        },
    }
    # the index keeps a flag; the values are read from the envelope
    assert msg.entry.dsn is True
    assert dsn_of(msg.entry).envid == "QQ+1"
    assert dsn_of(msg.entry).rcpt("b@example.net").notify == "SUCCESS,FAILURE"


def test_a_transaction_without_dsn_parameters_stores_none(make_session):
    s = authed(make_session)
    # RSET forgets the last transaction's parameters
    s.command("MAIL FROM:<a@example.com> RET=HDRS")
    s.command("RCPT TO:<b@example.net> NOTIFY=NEVER")
    assert s.command("RSET").startswith("250 ")
    s.command("MAIL FROM:<a@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    assert s.send(b"Subject: plain\r\n\r\nhi\r\n.\r\n").startswith("250 ")
    (msg,) = s.messages()
    assert "dsn" not in msg.envelope
    assert msg.entry.dsn is False


def test_a_malformed_dsn_parameter_is_501_and_refuses_only_that_command(make_session):
    s = authed(make_session)
    assert s.command("MAIL FROM:<a@example.com> RET=ALL") == ("501 5.5.4 Bad RET parameter\r\n")
    assert s.command("MAIL FROM:<a@example.com> ENVID=a+0Db") == (
        "501 5.5.4 Bad ENVID parameter\r\n"
    )
    assert s.command("MAIL FROM:<a@example.com> ENVID=e1").startswith("250 ")
    assert s.command("RCPT TO:<b@example.net> NOTIFY=NEVER,SUCCESS") == (
        "501 5.5.4 Bad NOTIFY parameter\r\n"
    )
    assert s.command("RCPT TO:<b@example.net> ORCPT=b@example.net") == (
        "501 5.5.4 Bad ORCPT parameter\r\n"
    )
    assert s.command("RCPT TO:<b@example.net> FOO=1") == ("555 5.5.4 Unsupported parameter FOO\r\n")
    assert s.command("RCPT TO:<b@example.net> NOTIFY=DELAY").startswith("250 ")


def test_dsn_off_is_not_offered_and_its_parameters_are_refused(make_session):
    s = authed(make_session, server=ServerConfig(hostname=HOST, dsn=False))
    assert "DSN" not in s.command("EHLO client.example")
    assert s.command("MAIL FROM:<a@example.com> RET=FULL") == (
        "555 5.5.4 Unsupported parameter RET\r\n"
    )
    s.command("MAIL FROM:<a@example.com>")
    assert s.command("RCPT TO:<b@example.net> NOTIFY=NEVER") == (
        "555 5.5.4 Unsupported parameter NOTIFY\r\n"
    )


def test_dsn_parameters_need_ehlo(make_session):
    # RFC 5321 §2.2.1: after HELO a NOTIFY=NEVER must not silence bounces
    s = authed(make_session)
    s.command("HELO client.example")
    assert s.command("MAIL FROM:<a@example.com>").startswith("250 ")
    assert s.command("RCPT TO:<b@example.net> NOTIFY=NEVER") == (
        "555 5.5.4 RCPT parameters need EHLO\r\n"
    )
