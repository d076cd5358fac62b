"""
kumoauth.relay.client against a real upstream (tests/upstream.py: aiosmtpd
on 127.0.0.1 with real TLS) on the real reactor (in a thread), and its pure
helpers (dot-stuffing, reply parsing) with hypothesis.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.logger import formatEvent

from kumoauth.relay.client import (
    PIECE,
    ClientSettings,
    IdentityRefused,
    Message,
    RecipientResult,
    Reply,
    ReplyError,
    ReplyParser,
    SendResult,
    UpstreamError,
    UpstreamSession,
    client_settings,
    connect,
    crlf_body,
    dot_stuff,
    format_reply,
    headers_need_utf8,
    parse_ehlo,
    parse_replies,
    parse_reply,
    wire_pieces,
    xforward_lines,
)
from kumoauth.smtp import dsnparams
from kumoauth.smtp.data import DataReader, has_bare_newline
from kumoauth.smtp.dsnparams import Rcpt, Requested
from tests.server import free_port
from tests.upstream import Upstream, in_reactor, running_upstream, start_reactor

PASSWORD = "relay-secret"
BODY = b"Subject: hello\r\nFrom: a@example.com\r\n\r\nhi there\r\n"


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


def settings_for(up: Upstream, tmp_path: Path, **kw: Any) -> ClientSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": up.port,
        "tls": up.tls,
        "ca_file": str(up.write_ca(tmp_path / "upstream-ca.pem")),
        "username": "kumoauth",
        "password": PASSWORD,
        "helo_name": "relay.test",
        "connect_timeout": 5.0,
        "command_timeout": 5.0,
        "data_timeout": 5.0,
    }
    values.update(kw)
    return ClientSettings(**values)


def open_session(reactor: Any, settings: ClientSettings, authzid: str | None = None) -> Any:
    return in_reactor(connect, reactor, settings, authzid)


def send(session: UpstreamSession, message: Message) -> SendResult:
    return in_reactor(session.send, message)


def close(session: UpstreamSession) -> None:
    in_reactor(session.close)


def message(*rcpts: str, body: bytes = BODY, **kw: Any) -> Message:
    return Message(
        mail_from=kw.pop("mail_from", "scott@example.com"),
        rcpt_to=list(rcpts),
        body=body,
        size=len(body),
        **kw,
    )


def connect_error(reactor: Any, settings: ClientSettings, authzid: str | None = None) -> Any:
    with pytest.raises(UpstreamError) as info:
        open_session(reactor, settings, authzid)
    return info.value


# ---------------------------------------------------------------------------
# Delivery
# ---------------------------------------------------------------------------


def test_starttls_delivery_with_authzid(reactor, tmp_path):
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path), "scott@example.com")
        assert session.tls_version in ("TLSv1.2", "TLSv1.3")
        result = send(session, message("b@example.net"))
        assert result.recipients == {"b@example.net": (250, "2.0.0", "OK queued")}
        assert result.delivered == ["b@example.net"] and result.data_sent
        assert session.reusable
        close(session)
        [got] = up.messages
        assert got.data == BODY
        assert got.mail_from == "scott@example.com"
        assert got.rcpt_tos == ["b@example.net"]
        assert f"SIZE={len(BODY)}" in got.mail_options
        assert "BODY=8BITMIME" not in got.mail_options
        assert "SMTPUTF8" not in got.mail_options
        assert (got.authc, got.authzid) == ("kumoauth", "scott@example.com")
        assert got.tls_version in ("TLSv1.2", "TLSv1.3")
        [record] = up.sessions
        assert record.plaintext_verbs() == ["EHLO", "STARTTLS"]
        assert record.ehlo == ["relay.test", "relay.test"]
        assert record.verbs()[-1] == "QUIT"


def test_implicit_tls_delivery(reactor, tmp_path):
    with running_upstream(tls="implicit") as up:
        session = open_session(reactor, settings_for(up, tmp_path), "alice")
        result = send(session, message("b@example.net", "c@example.net"))
        assert result.delivered == ["b@example.net", "c@example.net"]
        close(session)
        [got] = up.messages
        assert got.tls_version in ("TLSv1.2", "TLSv1.3")
        assert got.authzid == "alice"
        assert "STARTTLS" not in up.all_verbs()


def test_certificate_name_checked_against_tls_name(reactor, tmp_path):
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path, tls_name="localhost"))
        close(session)
        err = connect_error(reactor, settings_for(up, tmp_path, tls_name="mx.example.org"))
        assert err.reason == (
            "certificate verification failed: the certificate is not for mx.example.org"
        )
        assert up.sessions[-1].verbs() == ["EHLO", "STARTTLS"]


def test_without_authzid_and_without_auth(reactor, tmp_path):
    with running_upstream(auth_required=False) as up:
        session = open_session(reactor, settings_for(up, tmp_path), None)
        send(session, message("b@example.net"))
        close(session)
        session = open_session(reactor, settings_for(up, tmp_path, username=None), None)
        send(session, message("b@example.net"))
        close(session)
        first, second = up.messages
        assert (first.authc, first.authzid) == ("kumoauth", None)
        assert (second.authc, second.authzid) == (None, None)
        assert up.sessions[1].auth_attempts == 0


# ---------------------------------------------------------------------------
# Per-recipient results
# ---------------------------------------------------------------------------

SCRIPT = {
    "later@example.net": "451 4.7.1 try later",
    "nobody@example.net": "550 5.1.1 no such user",
}


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_per_recipient_results(reactor, tmp_path, pipelining):
    with running_upstream(rcpt_replies=dict(SCRIPT), pipelining=pipelining) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        assert ("PIPELINING" in session.extensions) is pipelining
        result = send(session, message("ok@example.net", "later@example.net", "nobody@example.net"))
        assert result.recipients == {
            "ok@example.net": (250, "2.0.0", "OK queued"),
            "later@example.net": (451, "4.7.1", "try later"),
            "nobody@example.net": (550, "5.1.1", "no such user"),
        }
        assert result.delivered == ["ok@example.net"]
        assert result.deferred == ["later@example.net"]
        assert result.bounced == ["nobody@example.net"]
        assert isinstance(result.recipients["nobody@example.net"], RecipientResult)
        assert result.recipients["nobody@example.net"].line == "550 5.1.1 no such user"
        assert session.reusable
        close(session)
        [got] = up.messages
        assert got.rcpt_tos == ["ok@example.net"]


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize(
    "too_many", ["452 4.5.3 Too many recipients", "552 5.5.3 Too many recipients"]
)
def test_an_upstream_taking_fewer_recipients_gets_the_rest_at_once(
    reactor, tmp_path, pipelining, too_many
):
    # RFC 5321 §4.5.3.1.10: the rest go in further transactions now, not
    # after a retry delay; RFC 821's 552 for it is taken as 452.
    rcpts = [f"r{i}@example.net" for i in range(7)]
    with running_upstream(
        pipelining=pipelining,
        max_rcpts=3,
        too_many_reply=too_many,
        rcpt_replies={"nobody@example.net": "550 5.1.1 no such user"},
    ) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message(*rcpts, "nobody@example.net"))
        assert result.delivered == rcpts
        assert result.bounced == ["nobody@example.net"]
        assert list(result.recipients) == [*rcpts, "nobody@example.net"]
        assert session.reusable
        close(session)
        assert [m.rcpt_tos for m in up.messages] == [rcpts[:3], rcpts[3:6], rcpts[6:]]
        assert len(up.sessions) == 1


#: what a sender asked of DSN (RFC 3461), as the scheduler reads it from the queue
REQUESTED = Requested(
    ret="FULL",
    envid="id+1 x",
    rcpts={
        "b@example.net": Rcpt("SUCCESS,FAILURE", ("rfc822", "orig+b@example.net")),
        "c@example.net": Rcpt("NEVER"),
        "d@example.net": Rcpt(None, ("utf-8", "bjørn@example.net")),
    },
)


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_dsn_parameters_go_to_an_upstream_that_offers_dsn(reactor, tmp_path, pipelining):
    # RFC 3461 §5.2: re-encoded as xtext; a follow-up transaction (an
    # upstream taking two recipients per message) carries them too.
    rcpts = ["b@example.net", "c@example.net", "d@example.net", "e@example.net"]
    with running_upstream(dsn=True, pipelining=pipelining, max_rcpts=2) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message(*rcpts, dsn=REQUESTED))
        assert result.delivered == rcpts and result.dsn
        close(session)
        first, second = up.messages
    mail = f"MAIL FROM:<scott@example.com> SIZE={len(BODY)} RET=FULL ENVID=id+2B1+20x"
    rcpt_lines = [
        "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Bb@example.net",
        "RCPT TO:<c@example.net> NOTIFY=NEVER",
        "RCPT TO:<d@example.net> ORCPT=utf-8;bj\\x{F8}rn@example.net",
        "RCPT TO:<e@example.net>",
    ]
    # the first took two (the others got 452), the follow-up the rest
    assert first.lines == [mail, *rcpt_lines]
    assert first.rcpt_tos == rcpts[:2]
    assert second.lines == [mail, *rcpt_lines[2:]]
    assert second.rcpt_tos == rcpts[2:]


def test_dsn_parameters_are_kept_from_an_upstream_without_dsn(reactor, tmp_path):
    # it would refuse them (555): the reports are then kumoauth's to make
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("b@example.net", "c@example.net", dsn=REQUESTED))
        assert result.delivered == ["b@example.net", "c@example.net"] and not result.dsn
        close(session)
        (got,) = up.messages
    assert got.lines == [
        f"MAIL FROM:<scott@example.com> SIZE={len(BODY)}",
        "RCPT TO:<b@example.net>",
        "RCPT TO:<c@example.net>",
    ]


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_a_failed_follow_up_never_sends_the_message_twice(reactor, tmp_path, pipelining):
    # The first transaction delivered; the follow-up's MAIL gets a 421: the
    # rest are deferred, nothing is sent again to the first ones (a stale
    # session's reconnect and resend would have), and the session ends.
    rcpts = ["r0@example.net", "r1@example.net", "r2@example.net", "r3@example.net"]
    with running_upstream(pipelining=pipelining, max_rcpts=2, mails_per_session=1) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message(*rcpts))
        assert result.delivered == rcpts[:2]
        assert result.deferred == rcpts[2:]
        assert result.recipients["r2@example.net"].line.startswith("451 4.4.2 not sent: ")
        assert not session.reusable
        close(session)
        assert [m.rcpt_tos for m in up.messages] == [rcpts[:2]]


def test_follow_ups_stop_at_max_messages_per_session(reactor, tmp_path):
    rcpts = [f"r{i}@example.net" for i in range(5)]
    with running_upstream(max_rcpts=2) as up:
        session = open_session(reactor, settings_for(up, tmp_path, max_messages=2))
        result = send(session, message(*rcpts))
        assert result.delivered == rcpts[:4]
        assert result.deferred == rcpts[4:]
        close(session)
        assert [m.rcpt_tos for m in up.messages] == [rcpts[:2], rcpts[2:4]]


def test_a_full_mailbox_is_no_reason_for_a_follow_up(reactor, tmp_path):
    with running_upstream(rcpt_replies={"full@example.net": "452 4.2.2 Mailbox full"}) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("a@example.net", "full@example.net"))
        assert result.delivered == ["a@example.net"]
        assert result.deferred == ["full@example.net"]
        close(session)
        assert len(up.messages) == 1 and up.all_verbs().count("MAIL") == 1


def test_too_many_recipients_and_nothing_taken_is_deferred(reactor, tmp_path):
    with running_upstream(max_rcpts=0, too_many_reply="552 5.5.3 Too many recipients") as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("a@example.net", "b@example.net"))
        assert result.deferred == ["a@example.net", "b@example.net"]
        assert result.recipients["a@example.net"].line == "452 4.5.3 Too many recipients"
        close(session)
        assert up.messages == []


def test_data_refused_applies_to_accepted_recipients_only(reactor, tmp_path):
    with running_upstream(
        rcpt_replies={"nobody@example.net": "550 5.1.1 no such user"},
        data_reply="554 5.7.1 message refused as spam",
    ) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("a@example.net", "nobody@example.net"))
        assert result.recipients == {
            "a@example.net": (554, "5.7.1", "message refused as spam"),
            "nobody@example.net": (550, "5.1.1", "no such user"),
        }
        assert result.final == (554, "5.7.1", "message refused as spam")
        assert session.reusable
        close(session)


def test_no_data_when_no_recipient_is_accepted(reactor, tmp_path):
    with running_upstream(rcpt_replies=dict(SCRIPT)) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("later@example.net", "nobody@example.net"))
        assert result.deferred == ["later@example.net"]
        assert result.bounced == ["nobody@example.net"]
        assert not result.data_sent
        assert "DATA" not in up.all_verbs()
        assert up.all_verbs()[-1] == "RSET"
        assert session.reusable
        close(session)


def test_mail_refused_applies_to_every_recipient(reactor, tmp_path):
    with running_upstream(mail_reply="550 5.7.1 sender not allowed") as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("a@example.net", "b@example.net"))
        assert result.bounced == ["a@example.net", "b@example.net"]
        assert result.recipients["a@example.net"] == (550, "5.7.1", "sender not allowed")
        assert "RCPT" not in up.all_verbs()
        close(session)


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_an_upstream_wanting_auth_defers_the_message_instead_of_bouncing_it(
    reactor, tmp_path, pipelining
):
    # [relay] without username to an upstream that requires AUTH: aiosmtpd
    # answers MAIL "530 5.7.0 Authentication required" (RFC 4954 §6).  The
    # setting is wrong, not the recipients: the message waits for it (its
    # bounce would go the same way, and be lost).
    with running_upstream(pipelining=pipelining) as up:
        session = open_session(reactor, settings_for(up, tmp_path, username=None))
        with pytest.raises(UpstreamError, match="530 5.7.0 Authentication required") as info:
            send(session, message("a@example.net", "b@example.net"))
        assert "requires authentication or TLS ([relay] username, tls) at MAIL FROM" in str(
            info.value
        )
        assert info.value.permanent and info.value.reply is not None
        assert info.value.reply.code == 530
        close(session)
        assert up.messages == []


@pytest.mark.parametrize(
    ("where", "options"),
    [
        (
            "RCPT TO",
            {"rcpt_replies": {"b@example.net": "530 5.7.0 Must issue a STARTTLS command first"}},
        ),
        ("the end of data", {"data_reply": "530 5.7.0 Must issue a STARTTLS command first"}),
    ],
)
def test_a_530_anywhere_in_the_transaction_defers_the_whole_message(
    reactor, tmp_path, where, options
):
    with running_upstream(**options) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        with pytest.raises(UpstreamError, match=f"at {where}: 530 5.7.0 Must issue") as info:
            send(session, message("a@example.net", "b@example.net"))
        assert info.value.permanent
        close(session)


def test_multiline_reply_text(reactor, tmp_path):
    with running_upstream(
        rcpt_replies={"x@example.net": "550-5.1.1 no such user\n550 5.1.1 see the docs"}
    ) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("x@example.net"))
        assert result.recipients["x@example.net"] == (550, "5.1.1", "no such user see the docs")
        close(session)


def test_session_reused_for_three_messages_with_one_auth(reactor, tmp_path):
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path), "scott")
        for i in range(3):
            body = f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode()
            result = send(session, message(f"r{i}@example.net", body=body))
            assert result.delivered == [f"r{i}@example.net"]
            assert session.reusable
        assert session.messages == 3
        close(session)
        [record] = up.sessions
        assert record.auth_attempts == 1 and record.messages == 3
        assert record.verbs().count("AUTH") == 1
        # A completed DATA ends the transaction: no RSET between messages.
        assert record.verbs().count("RSET") == 0
        assert record.verbs().count("MAIL") == 3
        assert [m.data for m in up.messages] == [
            f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode() for i in range(3)
        ]
        assert {m.authzid for m in up.messages} == {"scott"}


# ---------------------------------------------------------------------------
# SMTPUTF8, 8BITMIME, SIZE
# ---------------------------------------------------------------------------

UTF8_BODY = "Subject: δοκιμή\r\n\r\nγεια\r\n".encode()


def test_smtputf8_needed_and_offered(reactor, tmp_path):
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(
            session,
            message(
                "δοκιμή@example.net",
                mail_from="χρήστης@example.com",
                body=UTF8_BODY,
                smtputf8=True,
                eightbit=True,
            ),
        )
        assert result.delivered == ["δοκιμή@example.net"]
        close(session)
        [got] = up.messages
        assert "SMTPUTF8" in got.mail_options and "BODY=8BITMIME" in got.mail_options
        assert got.mail_from == "χρήστης@example.com"
        assert got.data == UTF8_BODY


def test_smtputf8_needed_not_offered_bounces_and_sends_nothing(reactor, tmp_path):
    with running_upstream(smtputf8=False) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(
            session, message("δοκιμή@example.net", body=UTF8_BODY, smtputf8=True, eightbit=True)
        )
        assert result.recipients == {
            "δοκιμή@example.net": (
                554,
                "5.6.7",
                "upstream does not offer SMTPUTF8, which this message needs",
            )
        }
        assert not result.data_sent
        assert "MAIL" not in up.all_verbs()
        assert session.reusable
        close(session)
        assert up.messages == []


@pytest.mark.parametrize(
    "body",
    [
        b"Subject: plain\r\n\r\nhello\r\n",
        "Subject: plain\r\n\r\ncaf\u00e9 body only\r\n".encode(),  # 8-bit body only
    ],
)
def test_smtputf8_asked_for_but_not_needed_goes_to_an_upstream_without_it(reactor, tmp_path, body):
    # Some clients send SMTPUTF8 on every message once offered: with an
    # ASCII envelope and ASCII headers nothing needs it (it bounced 5.6.7).
    with running_upstream(smtputf8=False) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("b@example.net", body=body, smtputf8=True))
        assert result.delivered == ["b@example.net"]
        close(session)
        [got] = up.messages
        assert "SMTPUTF8" not in got.mail_options
        assert ("BODY=8BITMIME" in got.mail_options) == (not body.isascii())
        assert got.data == body


def test_smtputf8_asked_for_is_passed_on_where_offered(reactor, tmp_path):
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        send(session, message("b@example.net", body=b"Subject: x\r\n\r\nhi\r\n", smtputf8=True))
        close(session)
        [got] = up.messages
        assert "SMTPUTF8" in got.mail_options


@pytest.mark.parametrize("padding", [0, PIECE], ids=["small", "large"])
def test_a_utf8_header_of_a_mime_part_needs_smtputf8(reactor, tmp_path, padding):
    # large: the walk over the parts' headers runs in a thread
    body = (
        b'Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n'
        b"\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        + "é\r\n".encode() * (padding // 4)
        + b"--b\r\n"
        + 'Content-Disposition: attachment; filename="grüße.txt"\r\n'.encode()
        + b"\r\nx\r\n--b--\r\n"
    )
    with running_upstream(smtputf8=False) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("b@example.net", body=body, smtputf8=True))
        assert result.recipients["b@example.net"][1] == "5.6.7"
        close(session)
        assert up.messages == []


def test_headers_need_utf8():
    assert not headers_need_utf8(b"Subject: a\r\n\r\n\xc3\xa9\r\n")
    assert headers_need_utf8("Subject: é\r\n\r\nx\r\n".encode())
    assert headers_need_utf8("From: é@x.example\r\n\r\n".encode())
    assert not headers_need_utf8(b"no header at all\r\n")
    head = b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    nested = (
        head + b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n"
        b"--b2\r\nContent-Type: text/plain\r\n\r\n"
        + "grüße\r\n-- \r\nsignature ünïcödé\r\n\r\n".encode()
        + b"--b2--\r\n\r\n--b1--\r\n"
        + "épilogue\r\n".encode()
    )
    # 8-bit text, a signature's "-- " line and the epilogue are no headers
    assert not headers_need_utf8(nested)
    deep = nested.replace(b"Content-Type: text/plain", "Content-Type: text/plain; name=é".encode())
    assert headers_need_utf8(deep)  # a header of a nested part


def test_8bitmime_needed_and_offered(reactor, tmp_path):
    body = "Subject: caf\u00e9\r\n\r\ncaf\u00e9\r\n".encode("latin-1")
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("b@example.net", body=body, eightbit=True))
        assert result.delivered == ["b@example.net"]
        close(session)
        [got] = up.messages
        assert "BODY=8BITMIME" in got.mail_options and "SMTPUTF8" not in got.mail_options
        assert got.data == body


def test_8bitmime_needed_not_offered_bounces(reactor, tmp_path):
    # eightbit=False on the message: the client looks at the bytes itself.
    body = "Subject: caf\u00e9\r\n\r\ncaf\u00e9\r\n".encode()
    with running_upstream(eightbitmime=False) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("b@example.net", body=body))
        [(code, enhanced, text)] = result.recipients.values()
        assert (code, enhanced) == (554, "5.6.3")
        assert "8BITMIME" in text
        assert "MAIL" not in up.all_verbs()
        close(session)


def test_size_over_upstream_limit_bounces_without_sending(reactor, tmp_path):
    body = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 40
    with running_upstream(size=1000) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        assert session.size_limit == 1000
        result = send(session, message("b@example.net", body=body))
        [(code, enhanced, text)] = result.recipients.values()
        assert (code, enhanced) == (552, "5.3.4")
        assert "1000" in text
        assert "MAIL" not in up.all_verbs()
        small = send(session, message("b@example.net"))
        assert small.delivered == ["b@example.net"]
        close(session)


def test_no_size_parameter_when_upstream_has_no_size(reactor, tmp_path):
    with running_upstream(size=None) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        send(session, message("b@example.net"))
        close(session)
        assert not any(o.startswith("SIZE=") for o in up.messages[0].mail_options)


# ---------------------------------------------------------------------------
# Failures of the session
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_untrusted_certificate_never_falls_back_to_plaintext(reactor, tmp_path, tls):
    other = trustme.CA()
    with running_upstream(tls=tls) as up:
        ca_file = tmp_path / "other-ca.pem"
        other.cert_pem.write_to_path(str(ca_file))
        err = connect_error(reactor, settings_for(up, tmp_path, ca_file=str(ca_file)))
        assert err.reason.startswith("certificate verification failed"), err.reason
        assert "\n" not in err.reason
        assert not err.permanent
        verbs = up.all_verbs()
        assert "MAIL" not in verbs and "AUTH" not in verbs
        assert verbs == (["EHLO", "STARTTLS"] if tls == "starttls" else [])
        assert up.messages == []


def test_starttls_not_offered_is_refused(reactor, tmp_path):
    with running_upstream(tls="none", auth_required=False) as up:
        settings = settings_for(up, tmp_path, tls="starttls")
        err = connect_error(reactor, settings)
        assert "does not offer STARTTLS" in err.reason
        assert up.all_verbs() == ["EHLO"]


def test_plaintext_only_to_loopback(reactor, tmp_path):
    with running_upstream(tls="none", auth_required=False) as up:
        session = open_session(reactor, settings_for(up, tmp_path, tls="none", username=None))
        assert session.tls_version is None
        assert send(session, message("b@example.net")).delivered == ["b@example.net"]
        close(session)
    err = connect_error(reactor, ClientSettings(host="192.0.2.1", port=25, tls="none"))
    assert "plaintext" in err.reason


def test_connection_refused(reactor):
    settings = ClientSettings(host="127.0.0.1", port=free_port(), connect_timeout=5)
    err = connect_error(reactor, settings)
    assert "refused" in err.reason
    assert not err.permanent


def test_silent_upstream_times_out(reactor):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)  # TCP completes in the backlog; nobody ever answers
        port = listener.getsockname()[1]
        settings = ClientSettings(host="127.0.0.1", port=port, command_timeout=0.5)
        err = connect_error(reactor, settings)
        assert "timeout" in err.reason and "greeting" in err.reason


def test_stalled_data_times_out(reactor, tmp_path):
    with running_upstream(stall_on="DATA") as up:
        session = open_session(reactor, settings_for(up, tmp_path, command_timeout=0.5))
        with pytest.raises(UpstreamError, match="timeout: no reply to DATA"):
            send(session, message("b@example.net"))
        assert not session.reusable


def _raw_upstream(script: list[tuple[bytes | None, bytes]]) -> tuple[int, threading.Thread]:
    """A one-connection fake: for each step, read a line starting with the prefix, then send."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.settimeout(5)
            f = conn.makefile("rb")
            for expect, answer in script:
                if expect is not None:
                    assert f.readline().startswith(expect)
                conn.sendall(answer)
            with contextlib.suppress(OSError):
                conn.recv(1024)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def _pipelining_upstream(data_reply: bytes) -> tuple[int, threading.Thread, list[bytes]]:
    """
    A plaintext fake offering PIPELINING that refuses the one recipient and
    answers DATA with *data_reply*; records each packet it reads.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    packets: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.settimeout(5)
            conn.sendall(b"220 fake ESMTP\r\n")
            buf = b""
            replies = {
                b"EHLO": b"250-fake\r\n250 PIPELINING\r\n",
                b"MAIL": b"250 2.1.0 ok\r\n",
                b"RCPT": b"550 5.1.1 no such user\r\n",
                b"DATA": data_reply,
                b".": b"250 2.0.0 empty message dropped\r\n",
                b"RSET": b"250 2.0.0 ok\r\n",
                b"QUIT": b"221 2.0.0 bye\r\n",
            }
            while True:
                try:
                    chunk = conn.recv(4096)
                except OSError:
                    return
                if not chunk:
                    return
                packets.append(chunk)
                buf += chunk
                out = b""
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
                    out += replies.get(verb, b"500 5.5.2 what\r\n")
                conn.sendall(out)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, packets


@pytest.mark.parametrize(
    "data_reply", [b"354 go ahead\r\n", b"554 5.5.1 no valid recipients\r\n"], ids=["354", "554"]
)
def test_pipelined_data_with_every_recipient_refused(reactor, data_reply):
    # RFC 2920 §3.1: MAIL, RCPT and DATA go in one write; with no recipient
    # accepted, a DATA that was accepted anyway gets the lone dot (nothing
    # is delivered), one that was refused gets RSET.  Either way the
    # recipient's own refusal is its result and the session stays usable.
    port, thread, packets = _pipelining_upstream(data_reply)
    settings = ClientSettings(host="127.0.0.1", port=port, tls="none")
    session = open_session(reactor, settings)
    result = send(session, message("nobody@example.net"))
    assert result.recipients == {"nobody@example.net": (550, "5.1.1", "no such user")}
    assert result.bounced == ["nobody@example.net"]
    assert not result.data_sent
    assert session.reusable
    close(session)
    thread.join(5)
    group = next(p for p in packets if p.startswith(b"MAIL"))
    assert group == (b"MAIL FROM:<scott@example.com>\r\nRCPT TO:<nobody@example.net>\r\nDATA\r\n")
    after = b"".join(packets[packets.index(group) + 1 :])
    if data_reply.startswith(b"354"):
        assert after.startswith(b".\r\n")
    else:
        assert after.startswith(b"RSET\r\n")


def test_data_injected_after_starttls_reply_is_refused(reactor):
    port, thread = _raw_upstream(
        [
            (None, b"220 fake ESMTP\r\n"),
            (b"EHLO", b"250-fake\r\n250 STARTTLS\r\n"),
            (b"STARTTLS", b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n"),
        ]
    )
    err = connect_error(reactor, ClientSettings(host="127.0.0.1", port=port))
    assert "sent data after its STARTTLS reply" in err.reason
    thread.join(5)


def test_malformed_reply_is_a_protocol_error(reactor):
    port, thread = _raw_upstream([(None, b"220 fake\r\n"), (b"EHLO", b"hello there\r\n")])
    err = connect_error(reactor, ClientSettings(host="127.0.0.1", port=port))
    assert err.reason.startswith("protocol error: malformed reply line")
    thread.join(5)


def test_auth_refused(reactor, tmp_path, captured_log):
    with running_upstream(users={"kumoauth": "something else"}) as up:
        err = connect_error(reactor, settings_for(up, tmp_path), "scott")
        assert "refused AUTH as kumoauth for scott" in err.reason
        # For one authzid: that user's mail waits, the upstream is not down.
        assert isinstance(err, IdentityRefused)
        # The caller (the scheduler) says it, in its one line per attempt.
        assert not any("refused AUTH" in formatEvent(e) for e in captured_log.events)
        assert "535 5.7.8" in err.reason
        assert err.permanent
        assert err.reply is not None and err.reply.code == 535
        assert PASSWORD not in str(err) and PASSWORD not in repr(err)
        assert PASSWORD not in captured_log.text()
        assert "MAIL" not in up.all_verbs()
        assert not isinstance(connect_error(reactor, settings_for(up, tmp_path)), IdentityRefused)
        # identity = "authz": kumoauth acting for itself (its bounces) is one
        # identity too; refusing it is no outage (it flapped unreachable /
        # answers again, a postmaster found, with the users' mail flowing)
        itself = connect_error(reactor, settings_for(up, tmp_path, for_users=True))
        assert isinstance(itself, IdentityRefused)
        assert "refused AUTH as kumoauth for itself (its bounces; see relay.md)" in itself.reason
    # a 4xx is the upstream's auth service, for everyone: no identity's own
    with running_upstream(auth_reply="454 4.7.0 Temporary authentication failure") as up:
        err = connect_error(reactor, settings_for(up, tmp_path), "scott")
        assert "refused AUTH as kumoauth for scott" in err.reason
        assert not isinstance(err, IdentityRefused)


def test_credentials_quoted_back_by_the_upstream_are_hidden(reactor, tmp_path, captured_log):
    blob = base64.b64encode(f"scott\0kumoauth\0{PASSWORD}".encode()).decode()
    with running_upstream(
        auth_reply=f"454 4.7.0 cannot check: AUTH PLAIN {blob} ({PASSWORD})"
    ) as up:
        err = connect_error(reactor, settings_for(up, tmp_path), "scott")
        assert "cannot check: AUTH PLAIN *** (***)" in err.reason
        assert err.reply is not None
        shown = [str(err), repr(err), str(err.reply), repr(err.reply), captured_log.text()]
        assert not any(blob in t or PASSWORD in t for t in shown), shown
    # in a later reply too (a bounce would have mailed it to the user)
    with running_upstream(mail_reply=f"550 5.7.1 not for: AUTH PLAIN {blob} {PASSWORD}") as up:
        session = open_session(reactor, settings_for(up, tmp_path), "scott")
        result = send(session, message("a@example.net"))
        close(session)
        line = result.recipients["a@example.net"].line
        assert line == "550 5.7.1 not for: AUTH PLAIN *** ***", line


def test_auth_reply_is_escaped_to_one_line(reactor, tmp_path):
    with running_upstream(auth_reply="454-4.7.0 temporary\n454 4.7.0 \x1b[31mfailure") as up:
        err = connect_error(reactor, settings_for(up, tmp_path))
        assert not err.permanent
        assert "\n" not in err.reason and "\x1b" not in err.reason
        assert "454 4.7.0 temporary \\x1b[31mfailure" in err.reason


def test_421_mid_session_defers_the_message(reactor, tmp_path):
    with running_upstream(rcpt_replies={"b@example.net": "421 4.3.2 shutting down"}) as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        with pytest.raises(UpstreamError, match="421 4.3.2 shutting down") as info:
            send(session, message("a@example.net", "b@example.net"))
        assert not info.value.permanent
        assert not session.reusable
        with pytest.raises(UpstreamError):
            send(session, message("a@example.net"))
        assert up.messages == []


def test_dropped_connection_mid_session(reactor, tmp_path):
    with running_upstream(disconnect_on="DATA") as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        with pytest.raises(UpstreamError, match="closed the connection|connection lost"):
            send(session, message("b@example.net"))
        assert not session.reusable
        in_reactor(session.when_closed)


def delivered_once(reactor: Any, tmp_path: Path, body: bytes) -> Any:
    """*body* sent to b@example.net over a new session: what the upstream got, once."""
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        result = send(session, message("b@example.net", body=body))
        assert result.delivered == ["b@example.net"]
        close(session)
        [got] = up.messages
        assert up.all_verbs().count("MAIL") == 1
    return got


def test_smuggling_payload_arrives_as_one_message_with_crlf_lines(reactor, tmp_path):
    body = (
        b"Subject: smuggle\n\nhello\n.\nMAIL FROM:<evil@example.com>\n"
        b"RCPT TO:<victim@example.net>\nDATA\nforged\r.\r\n.\nend"
    )
    got = delivered_once(reactor, tmp_path, body)
    assert not has_bare_newline(got.data)
    assert got.data == (
        b"Subject: smuggle\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@example.com>\r\n"
        b"RCPT TO:<victim@example.net>\r\nDATA\r\nforged\r\n.\r\n.\r\nend\r\n"
    )


def test_leading_dots_survive(reactor, tmp_path):
    body = b".\r\n..\r\n.hidden\r\nplain\r\n."
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        send(session, message("b@example.net", body=body))
        close(session)
        assert up.messages[0].data == body + b"\r\n"


def test_no_password_in_exceptions_logs_or_reprs(reactor, tmp_path, captured_log):
    with running_upstream() as up:
        settings = settings_for(up, tmp_path)
        session = open_session(reactor, settings, "scott")
        send(session, message("b@example.net"))
        texts = [repr(settings), str(settings), repr(session)]
        close(session)
        texts.append(repr(session))
        up.users["kumoauth"] = "changed"
        err = connect_error(reactor, settings, "scott")
        texts += [str(err), repr(err), err.reason]
    texts.append(captured_log.text())
    assert captured_log.namespace("kumoauth.relay"), "the client logs its sessions"
    for text in texts:
        assert PASSWORD not in text


def test_client_settings_from_relay_config(tmp_path):
    from kumoauth.config import RelayConfig

    class SchedulerSettings:
        config = RelayConfig(host="mx.internal", port=2525, ca_file=tmp_path / "ca.pem")
        hostname = "submit.example.com"
        password = "pw"

    flat = client_settings(SchedulerSettings())
    assert (flat.host, flat.port, flat.tls) == ("mx.internal", 2525, "starttls")
    assert flat.ca_file == str(tmp_path / "ca.pem")
    assert flat.helo_name == "submit.example.com" and flat.password == "pw"
    assert "pw" not in repr(flat)


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def _unstuff_with_reader(wire: bytes) -> tuple[bytes, bytes]:
    """What our own server reads from *wire*: the message, and what follows it."""
    reader = DataReader(max_size=10**9)
    buf = bytearray(wire + b"NEXT")
    assert reader.feed(buf)
    return reader.message(), bytes(buf)


@given(st.binary(max_size=300))
def test_dot_stuff_properties(body):
    wire = dot_stuff(body)
    assert not has_bare_newline(wire)
    if body:
        assert wire.endswith(b"\r\n.\r\n")
    else:
        assert wire == b".\r\n"
    # Every line starting with "." was stuffed: the only "." line is the last.
    lines = wire.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    assert all(line.startswith(b"..") for line in lines[:-2] if line.startswith(b"."))
    # A server finds exactly one message, ending where we meant it to.
    if body:
        got, rest = _unstuff_with_reader(wire)
        assert got == crlf_body(body)
        assert rest == b"NEXT"


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"x.y"]), max_size=30))
def test_dot_stuff_roundtrip_on_line_material(parts):
    body = b"".join(parts)
    wire = dot_stuff(body)
    expected = crlf_body(body)
    assert not has_bare_newline(expected)
    if body:
        got, rest = _unstuff_with_reader(wire)
        assert (got, rest) == (expected, b"NEXT")


@given(
    st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"x.y"]), max_size=40),
    st.integers(1, 12),
)
def test_a_message_made_ready_in_pieces_is_the_message_made_ready_whole(parts, piece):
    body = b"".join(parts)
    length, pieces = wire_pieces(body, piece)
    data = crlf_body(body)
    assert length == len(data)
    # RFC 5321 §4.5.2 on the whole message: a dot starting a line doubled
    stuffed = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
    assert b"".join(pieces) == stuffed + b".\r\n"
    assert len(pieces) == 1 or piece < len(body)


def test_a_large_message_goes_out_in_pieces_exactly_as_made(reactor, tmp_path):
    # Over PIECE: made ready in a thread and written a piece per reactor
    # turn; the upstream gets the same bytes as for a small one.
    line = b".dot line, then a bare LF\n and more\r\n"
    body = b"Subject: large\r\n\r\n" + line * (3 * PIECE // len(line))
    got = delivered_once(reactor, tmp_path, body)
    assert got.data == crlf_body(body)
    assert f"SIZE={len(crlf_body(body))}" in got.mail_options


def test_the_reply_to_a_message_in_pieces_waits_for_its_last_piece():
    # An upstream that answers before the end of data (a 552 as soon as it
    # sees the size) must not get the next command between two pieces.
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from kumoauth.relay.client import _ClientProtocol

    clock = Clock()
    proto = _ClientProtocol(clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    d = proto.send_data([b"one\r\n", b"two\r\n", b".\r\n"], 10)
    assert transport.value() == b"one\r\n"
    proto.dataReceived(b"552 5.3.4 too big, said early\r\n")
    assert not d.called
    for _ in range(3):
        clock.advance(0)
    assert transport.value() == b"one\r\ntwo\r\n.\r\n"
    assert str(d.result) == "552 5.3.4 too big, said early"


def test_dot_stuff_examples():
    assert dot_stuff(b"a\nb") == b"a\r\nb\r\n.\r\n"
    assert dot_stuff(b".a\r\n.\r\n") == b"..a\r\n..\r\n.\r\n"
    assert dot_stuff(b"x\r.\r\n") == b"x\r\n..\r\n.\r\n"
    assert dot_stuff(b"\n.\n") == b"\r\n..\r\n.\r\n"


_enhanced = st.builds(
    lambda c, s, d: f"{c}.{s}.{d}",
    st.sampled_from("245"),
    st.integers(0, 999),
    st.integers(0, 999),
)
_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=40
).map(str.strip)


@given(
    code=st.integers(200, 599).filter(lambda c: (c // 10) % 10 <= 5),
    lines=st.lists(_text, min_size=1, max_size=5),
    with_enhanced=st.booleans(),
    enhanced=_enhanced,
)
def test_reply_roundtrip(code, lines, with_enhanced, enhanced):
    if with_enhanced and code // 100 != 3:
        enhanced = str(code)[0] + enhanced[1:]
    else:
        enhanced = None
        assume(not _looks_enhanced(lines[0]))
    reply = parse_reply(format_reply(code, lines, enhanced))
    assert reply.code == code
    assert reply.enhanced == enhanced
    assert list(reply.lines) == lines


def _looks_enhanced(text: str) -> bool:
    return re.match(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}( |$)", text) is not None


@given(st.binary(max_size=200))
def test_reply_parser_never_crashes(data):
    parser = ReplyParser()
    for line in data.split(b"\n"):
        try:
            parser.line(line.removesuffix(b"\r"))
        except ReplyError:
            parser = ReplyParser()


def test_reply_parsing_examples():
    ehlo = parse_reply(
        b"250-upstream.test\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
        b"250-AUTH PLAIN LOGIN\r\n250 SMTPUTF8\r\n"
    )
    assert ehlo.code == 250 and ehlo.enhanced is None
    assert parse_ehlo(ehlo) == {
        "SIZE": "1000",
        "8BITMIME": "",
        "AUTH": "PLAIN LOGIN",
        "SMTPUTF8": "",
    }
    r = parse_reply(b"550-5.1.1 first\r\n550 5.1.1 second\r\n")
    assert (r.code, r.enhanced, r.lines, r.text) == (
        550,
        "5.1.1",
        ("first", "second"),
        "first second",
    )
    assert str(r) == "550 5.1.1 first second"
    assert parse_reply(b"250\r\n") == Reply(250, ("",), None)
    # An enhanced code of another class is text, not a status code.
    assert parse_reply(b"250 5.0.0 odd\r\n").enhanced is None
    assert parse_reply(b"451 4.07.001 x\r\n").enhanced == "4.7.1"
    assert [x.code for x in parse_replies(b"250 a\n354 b\r\n")] == [250, 354]
    for bad in (b"25 x\r\n", b"250-a\r\n251 b\r\n", b"abc\r\n", b"250-a\r\n", b"250 a"):
        with pytest.raises(ReplyError):
            parse_replies(bad)


def test_one_reply_timer_per_session_and_each_reply_gets_its_full_time():
    """
    The reply awaited first must come within its timeout of becoming first;
    the session keeps one DelayedCall for that, not one per command.
    """
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from kumoauth.relay.client import _ClientProtocol

    class Counting(Clock):
        armed = 0

        def callLater(self, *args: Any, **kw: Any) -> Any:
            self.armed += 1
            return super().callLater(*args, **kw)

    clock = Counting()
    proto = _ClientProtocol(clock)
    proto.makeConnection(StringTransport())
    greeting = proto.expect("the greeting", 10)
    proto.dataReceived(b"220 up\r\n")
    assert greeting.called
    for _ in range(20):  # twenty messages' pipelined groups, answered at once
        group = proto.commands([(b"MAIL FROM:<a@x>", "MAIL"), (b"DATA", "DATA")], 10)
        clock.advance(0.01)
        proto.dataReceived(b"250 ok\r\n354 go\r\n")
        assert all(d.called for d in group)
    assert clock.armed == 1 and len(clock.getDelayedCalls()) == 1
    # A slow first reply does not shorten the time the next one gets.
    first, second = proto.commands([(b"MAIL FROM:<a@x>", "MAIL"), (b"DATA", "DATA")], 10)
    clock.advance(6)
    proto.dataReceived(b"250 ok\r\n")
    clock.advance(6)  # 12 s since the commands, 6 since DATA became first
    assert first.called and not second.called and proto.error is None
    proto.dataReceived(b"354 go\r\n")
    assert second.called
    # A short timeout after a long one: the armed timer is brought forward.
    slow = proto.expect("the long one", 300)
    clock.advance(20)  # the timer now waits for the long one's deadline
    proto.dataReceived(b"250 ok\r\n")
    assert slow.called and clock.getDelayedCalls()[0].getTime() > clock.seconds() + 250
    failed: list[Exception] = []
    late = proto.expect("the end of data", 10)
    late.addErrback(lambda f: failed.append(f.value))
    clock.advance(9.9)
    assert not failed
    clock.advance(0.2)
    assert failed and "timeout: no reply to the end of data" in str(failed[0])
    assert not clock.getDelayedCalls()


def greeted() -> tuple[Any, Any, Any]:
    """A client protocol on a StringTransport, past the greeting: (protocol, wire, clock)."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from kumoauth.relay.client import _ClientProtocol

    clock = Clock()
    proto = _ClientProtocol(clock)
    wire = StringTransport()
    proto.makeConnection(wire)
    proto.expect("the greeting", 10)
    proto.dataReceived(b"220 up\r\n")
    return proto, wire, clock


def test_a_pipelined_group_fires_once_with_every_reply_or_fails_whole():
    """
    ``pipeline`` writes the group in one write and fires one Deferred, with
    the replies in order, when the last has come; before that it has not
    fired.  A timeout or a lost session fails the group once, and a group
    sent after the session failed fails at once without writing.
    """
    proto, wire, clock = greeted()
    lines = [(b"MAIL FROM:<a@x>", "MAIL"), (b"RCPT TO:<b@y>", "RCPT"), (b"DATA", "DATA")]
    got: list[Any] = []
    proto.pipeline(lines, 10).addCallback(got.append)
    assert wire.value() == b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
    proto.dataReceived(b"250 ok\r\n550 5.1.1 no\r\n")
    assert got == []
    proto.dataReceived(b"354 go\r\n")
    assert [[r.code for r in replies] for replies in got] == [[250, 550, 354]]
    # Two replies of three, then silence: the group fails once, whole.
    failed: list[Any] = []
    proto.pipeline(lines, 10).addCallbacks(got.append, failed.append)
    proto.dataReceived(b"250 ok\r\n250 ok\r\n")
    clock.advance(10.1)
    assert len(got) == 1 and len(failed) == 1
    assert "timeout: no reply to DATA" in str(failed[0].value)
    wire.clear()
    after: list[Any] = []
    proto.pipeline(lines, 10).addErrback(after.append)
    assert len(after) == 1 and wire.value() == b""
    with pytest.raises(ValueError):
        proto.pipeline([(b"MAIL FROM:<a@x>\r\nRSET", "MAIL")], 10)


# ---------------------------------------------------------------------------
# Session lifetime: max_messages_per_session, stale reused sessions, and
# the wait for the reply to the message (data_timeout)
# ---------------------------------------------------------------------------


class PlainUpstream:
    """
    A small plaintext upstream on 127.0.0.1 (a thread per connection) for
    what the aiosmtpd one does not script: a per-session MAIL limit, past
    which MAIL gets ``421`` (or, with ``extra_mail="drop"``, no reply at
    all) and the connection is closed; a global one (``mails_total``); a
    delay before the reply to the end of data.  ``sessions`` holds the
    command verbs of each connection, ``bodies`` every message received.
    """

    def __init__(
        self,
        *,
        pipelining: bool = False,
        mails_per_session: int | None = None,
        mails_total: int | None = None,
        extra_mail: str = "421",
        final_delay: float = 0.0,
    ) -> None:
        self.pipelining = pipelining
        self.mails_per_session = mails_per_session
        self.mails_total = mails_total
        self.extra_mail = extra_mail
        self.final_delay = final_delay
        self.sessions: list[list[str]] = []
        self.bodies: list[bytes] = []
        self._mails = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> PlainUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def settings(self, **relay: Any) -> ClientSettings:
        """ClientSettings the way the scheduler makes them: from ``[relay]``."""
        from kumoauth.config import RelayConfig

        class SchedulerSettings:
            config = RelayConfig(
                host="127.0.0.1",
                port=self.port,
                tls="none",
                identity="none",
                **{"connect_timeout": 5.0, "command_timeout": 5.0, **relay},
            )
            hostname = "relay.test"
            password = None

        return client_settings(SchedulerSettings())

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _hang_up(self, conn: socket.socket) -> None:
        # FIN after what was said, then drain: no RST that could eat it.
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(4096):
                pass

    def _serve(self, conn: socket.socket) -> None:
        # The client may hang up or reset at any point: that ends the session.
        with contextlib.suppress(ConnectionError, TimeoutError):
            self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        verbs: list[str] = []
        with self._lock:
            self.sessions.append(verbs)
        with conn:
            conn.settimeout(10)
            f = conn.makefile("rb")
            conn.sendall(b"220 plain.test ESMTP\r\n")
            mails = 0
            while True:
                line = f.readline()
                if not line:
                    return
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode()
                verbs.append(verb)
                if verb == "EHLO":
                    extra = b"250-PIPELINING\r\n" if self.pipelining else b""
                    conn.sendall(b"250-plain.test\r\n" + extra + b"250 8BITMIME\r\n")
                elif verb == "MAIL":
                    mails += 1
                    with self._lock:
                        self._mails += 1
                        total = self._mails
                    over = (
                        self.mails_per_session is not None and mails > self.mails_per_session
                    ) or (self.mails_total is not None and total > self.mails_total)
                    if over:
                        if self.extra_mail == "421":
                            conn.sendall(b"421 4.7.0 plain.test too many messages, closing\r\n")
                        self._hang_up(conn)
                        return
                    conn.sendall(b"250 2.1.0 ok\r\n")
                elif verb == "RCPT":
                    conn.sendall(b"250 2.1.5 ok\r\n")
                elif verb == "DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    body = b""
                    while (chunk := f.readline()) not in (b".\r\n", b""):
                        body += chunk
                    time.sleep(self.final_delay)
                    with self._lock:
                        self.bodies.append(body)
                    conn.sendall(b"250 2.0.0 queued\r\n")
                elif verb == "RSET":
                    conn.sendall(b"250 2.0.0 ok\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"221 2.0.0 bye\r\n")
                    return
                else:
                    conn.sendall(b"500 5.5.2 what\r\n")


def numbered(i: int) -> Message:
    return message(f"r{i}@example.net", body=f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode())


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_max_messages_per_session_retires_the_session_with_quit(reactor, pipelining):
    # The audit's upstream: 421 to the 3rd MAIL of a session.  With
    # max_messages_per_session = 2 the 3rd message never meets it.
    with PlainUpstream(pipelining=pipelining, mails_per_session=2) as up:
        settings = up.settings(max_messages_per_session=2)
        assert settings.max_messages == 2
        session = open_session(reactor, settings)
        for i in range(2):
            assert session.reusable
            assert send(session, numbered(i)).delivered == [f"r{i}@example.net"]
        assert session.transactions == 2 and session.exhausted
        assert not session.reusable  # the scheduler closes it, not back to the pool
        with pytest.raises(UpstreamError, match="carried its 2 messages"):
            send(session, numbered(9))
        close(session)
        wait_for(lambda: len(up.sessions) == 1 and up.sessions[0][-1:] == ["QUIT"])
        assert up.sessions[0].count("MAIL") == 2  # the refused send wrote nothing
        second = open_session(reactor, settings)
        assert send(second, numbered(2)).delivered == ["r2@example.net"]
        close(second)
        assert len(up.bodies) == 3 and len(up.sessions) == 2


def test_a_refused_transaction_counts_towards_max_messages(reactor, tmp_path):
    with running_upstream(mail_reply="550 5.7.1 sender not allowed") as up:
        session = open_session(reactor, settings_for(up, tmp_path, max_messages=1))
        assert send(session, message("a@example.net")).bounced == ["a@example.net"]
        assert session.messages == 0 and session.transactions == 1
        assert not session.reusable
        close(session)


@pytest.mark.parametrize("extra_mail", ["421", "drop"])
@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_reused_session_ended_before_mail_sends_over_a_new_one(
    reactor, captured_log, pipelining, extra_mail
):
    # max_messages_per_session left at 100, above the upstream's limit of 2:
    # its 421 (or silent close) at the 3rd MAIL is not the message's fault
    # and nothing of it was sent: it goes at once over a new connection.
    with PlainUpstream(pipelining=pipelining, mails_per_session=2, extra_mail=extra_mail) as up:
        session = open_session(reactor, up.settings())
        for i in range(3):
            assert send(session, numbered(i)).delivered == [f"r{i}@example.net"]
        assert session.reusable and session.messages == 1
        close(session)
        assert [b.split(b"\r\n")[0] for b in up.bodies] == [
            b"Subject: 0",
            b"Subject: 1",
            b"Subject: 2",
        ]
        first, second = up.sessions
        assert first.count("MAIL") == 3 and first.count("DATA") == 2
        assert second[:2] == ["EHLO", "MAIL"] and second[-1] == "QUIT"
    text = captured_log.text()
    assert "sending it over a new session" in text
    if extra_mail == "421":
        assert "421 4.7.0 plain.test too many messages" in text


def test_stale_session_retry_is_once(reactor):
    # Every MAIL after the first one, on any connection, gets 421: the
    # reused session is retried once on a new one, whose 421 is the result.
    with PlainUpstream(pipelining=True, mails_total=1) as up:
        session = open_session(reactor, up.settings())
        send(session, numbered(0))
        with pytest.raises(UpstreamError) as info:
            send(session, numbered(1))
        assert "421 4.7.0 plain.test too many messages" in info.value.reason
        assert info.value.reply is not None and info.value.reply.code == 421
        assert not session.reusable
        wait_for(lambda: len(up.sessions) == 2)
        assert [s.count("MAIL") for s in up.sessions] == [2, 1]
        assert len(up.bodies) == 1


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_421_text_kept_when_the_upstream_closes_at_mail(reactor, pipelining):
    # A fresh session is not retried; the error carries the upstream's
    # words, not "upstream closed the connection" (the pipelined group used
    # to fail on the close that follows the 421).
    with PlainUpstream(pipelining=pipelining, mails_per_session=0) as up:
        session = open_session(reactor, up.settings())
        with pytest.raises(UpstreamError) as info:
            send(session, numbered(0))
        assert info.value.reason == (
            "upstream closing the session at MAIL FROM: "
            "421 4.7.0 plain.test too many messages, closing"
        )
        assert not info.value.permanent and info.value.closed
        assert len(up.sessions) == 1


def test_no_new_session_once_the_upstream_accepted_part_of_the_message(reactor, tmp_path):
    # MAIL accepted, then 421 at RCPT: not a stale session, the attempt
    # fails (the scheduler defers it) and no second connection is made.
    with running_upstream() as up:
        session = open_session(reactor, settings_for(up, tmp_path))
        send(session, message("a@example.net"))
        up.rcpt_replies["b@example.net"] = "421 4.3.2 shutting down"
        with pytest.raises(UpstreamError, match="at RCPT TO: 421 4.3.2 shutting down"):
            send(session, message("b@example.net"))
        assert len(up.sessions) == 1


def test_reused_session_the_upstream_closed_while_idle(reactor):
    # Closed between two messages (before the session was taken from the
    # pool, the scheduler would have dropped it; after, it is stale).
    with PlainUpstream(mails_per_session=1, extra_mail="drop") as up:
        session = open_session(reactor, up.settings())
        send(session, numbered(0))
        in_reactor(lambda: session._proto.transport.loseConnection())
        wait_for(lambda: not session.reusable)
        assert send(session, numbered(1)).delivered == ["r1@example.net"]
        close(session)
        assert len(up.bodies) == 2 and len(up.sessions) == 2


def test_a_pipelined_group_fails_at_once_with_a_421():
    proto, wire, _ = greeted()
    lines = [(b"MAIL FROM:<a@x>", "MAIL FROM"), (b"RCPT TO:<b@y>", "RCPT TO"), (b"DATA", "DATA")]
    failed: list[Any] = []
    proto.pipeline(lines, 10).addErrback(failed.append)
    proto.dataReceived(b"421 4.7.0 too busy\r\n")
    [f] = failed
    assert f.value.reason == "upstream closing the session at MAIL FROM: 421 4.7.0 too busy"
    assert f.value.closed and f.value.reply.code == 421
    assert wire.disconnecting or wire.disconnected


def test_data_timeout_not_command_timeout_bounds_the_reply_to_the_message(reactor):
    from kumoauth.config import RelayConfig

    assert client_settings_of(RelayConfig(host="h", command_timeout=20)).data_timeout == 600
    assert client_settings_of(RelayConfig(host="h", command_timeout=900)).data_timeout == 600
    assert client_settings_of(RelayConfig(host="h", data_timeout=45)).data_timeout == 45
    with PlainUpstream(final_delay=3.0) as up:
        # A slow final reply is waited for, though command_timeout is short
        # (short for the final reply; ample for a loopback session set-up
        # on a loaded machine).
        session = open_session(reactor, up.settings(command_timeout=1.5, data_timeout=10.0))
        assert send(session, numbered(0)).delivered == ["r0@example.net"]
        close(session)
        # And data_timeout does bound it.
        session = open_session(reactor, up.settings(command_timeout=5.0, data_timeout=1.0))
        with pytest.raises(UpstreamError) as info:
            send(session, numbered(1))
        assert info.value.reason == "timeout: no reply to the end of data from upstream within 1 s"
        assert not session.reusable


def client_settings_of(config: Any) -> ClientSettings:
    class SchedulerSettings:
        hostname = "relay.test"
        password = None

    SchedulerSettings.config = config  # type: ignore[attr-defined]
    return client_settings(SchedulerSettings())


@pytest.mark.parametrize("max_messages", [2, 100])
def test_three_messages_in_a_row_through_the_scheduler(reactor, tmp_path, max_messages):
    """
    The audit's case through the scheduler and a real queue: one session at
    a time, an upstream that says 421 to the 3rd MAIL of a session.  With
    max_messages_per_session = 2 the session is retired (QUIT) after two;
    left at 100 the 421 meets a reused session, and the message goes over a
    new one at once.  Either way nothing is deferred.
    """
    from kumoauth.config import RelayConfig
    from kumoauth.ops.metrics import Metrics
    from kumoauth.relay import dsn
    from kumoauth.relay.queue import QueueStore
    from kumoauth.relay.scheduler import Relay, RelaySettings
    from kumoauth.storage.delivery import Message as Stored

    with PlainUpstream(pipelining=True, mails_per_session=2) as up:
        config = RelayConfig(
            host="127.0.0.1",
            port=up.port,
            tls="none",
            identity="none",
            concurrency=1,
            max_messages_per_session=max_messages,
            command_timeout=5.0,
        )
        queue = QueueStore.open(tmp_path / "queue")
        metrics = Metrics()
        relay = Relay(
            queue,
            RelaySettings(config=config, hostname="relay.test"),
            reactor,
            metrics,
            connect=connect,
            store_bounce=lambda data, sender: pytest.fail("no bounce expected"),
            build_bounce=dsn.build_dsn,
        )

        def attempts(result: str) -> float:
            value = metrics.registry.get_sample_value(
                "kumoauth_relay_attempts_total", {"result": result}
            )
            return value or 0.0

        try:
            for i in range(3):
                body = f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode()
                queue.append_batch(
                    [Stored(f"m{i}", "scott@example.com", [f"r{i}@example.net"], body, {})]
                )
            in_reactor(relay.kick, False)
            wait_for(lambda: len(queue) == 0 or attempts("deferred") > 0)
            assert (attempts("deferred"), attempts("delivered")) == (0, 3)
            assert len(up.bodies) == 3
            in_reactor(relay.stopService)  # QUIT to the idle session
            wait_for(lambda: len(up.sessions) == 2 and up.sessions[1][-1:] == ["QUIT"])
            first, second = up.sessions
            if max_messages == 2:
                assert first.count("MAIL") == 2 and first[-1] == "QUIT"
            else:
                assert first.count("MAIL") == 3  # the 3rd got 421
            assert second.count("MAIL") == 1
        finally:
            queue.close()


def test_xforward_lines_are_xtext():
    assert dsnparams.xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    attrs = [("NAME", "[UNAVAILABLE]"), ("ADDR", "IPV6:2001:db8::1"), ("IDENT", "x"), ("FOO", "y")]
    # only what the upstream offered, in one line
    assert xforward_lines(attrs, "NAME ADDR PROTO HELO SOURCE PORT IDENT") == [
        b"XFORWARD NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 IDENT=x"
    ]
    assert xforward_lines(attrs, "helo") == []
    # a long HELO: lines of at most 500 octets; one too long for a line is left out
    long = [("ADDR", "192.0.2.1"), ("HELO", "h" * 480), ("IDENT", "x"), ("NAME", "n" * 600)]
    lines = xforward_lines(long, "ADDR HELO IDENT NAME")
    assert lines == [
        b"XFORWARD ADDR=192.0.2.1",
        b"XFORWARD HELO=" + b"h" * 480,
        b"XFORWARD IDENT=x",
    ]
    assert all(len(line) <= 500 for line in lines)


def test_xforward_attributes_of_a_queued_message():
    from types import SimpleNamespace

    from kumoauth.relay.scheduler import xforward_attributes

    def entry(meta: dict[str, str]) -> Any:
        return SimpleNamespace(id="18ecf40d45c84aa9688bede9", envelope={"meta": meta})

    v4 = dict(
        xforward_attributes(entry({"received_from": "192.0.2.7:50123", "ehlo_domain": "mua"}))
    )
    assert (v4["ADDR"], v4["PORT"], v4["HELO"], v4["IDENT"]) == (
        "192.0.2.7",
        "50123",
        "mua",
        "18ecf40d45c84aa9688bede9",
    )
    v6 = dict(xforward_attributes(entry({"received_from": "[2001:db8::1]:587"})))
    assert (v6["ADDR"], v6["PORT"], v6["HELO"]) == ("IPV6:2001:db8::1", "587", "[UNAVAILABLE]")
    # kumoauth's own mail (a bounce) and a unix-socket client have none to forward
    assert xforward_attributes(entry({})) is None
    assert xforward_attributes(entry({"received_from": "unix"})) is None


def test_headers_need_utf8_reads_each_header_block_once():
    # delimiter lines with no blank line after them (each block runs to the
    # end of the message), and boundaries that are prefixes of each other:
    # the same answers as a parse, from one pass forward
    head = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    runs = head + b"--b\r\nX-A: 1\r\n" * 2000 + "X-Late: é\r\n".encode()
    assert headers_need_utf8(runs)  # the last block reaches the é
    assert not headers_need_utf8(head + b"--b\r\nX-A: 1\r\n" * 2000 + "\r\n\r\né\r\n".encode())
    prefixes = head + b"--bb\r\n" + "X-Not-A-Part: é\r\n\r\n".encode() + b"--b--\r\n"
    assert not headers_need_utf8(prefixes)  # "--bb" is not a delimiter of "b"
    padded = head + b"--b  \r\n" + "X-Part: é\r\n\r\n".encode()
    assert headers_need_utf8(padded)  # transport padding after the boundary
    closing = head + b"--b--\r\n" + "X-Epilogue: é\r\n\r\n".encode()
    assert not headers_need_utf8(closing)
