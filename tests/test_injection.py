"""
Injection: nothing a client sends reaches a header, a reply or a text log
line raw (EHLO argument, user names, bare line ends in DATA, policy texts).
StringTransport level; the end-to-end versions are in test_probes_e2e.py.
"""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import formatEventAsClassicLogText

from kumoauth.config import ServerConfig
from kumoauth.policy import Reject
from kumoauth.smtp.data import has_bare_newline, normalize_newlines, received_header
from kumoauth.testing import Session, plain_b64
from kumoauth.textsafe import escape, field_value, unescape
from tests.test_protocol import HOST, authed, scott_policy, send_message

LINE_BREAKERS = ["\r", "\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def is_one_clean_line(text: str) -> bool:
    return len(text.splitlines()) <= 1 and all(c.isprintable() for c in text)


# --- EHLO / HELO ------------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        b"evil.example\nX-Injected:yes",
        b"evil.example\rX-Injected:yes",
        b"evil.example\x00",
        b"evil.example\x1b[31m",
        b"caf\xc3\xa9.example",
        b"(comment)",
        b"a..b",
        b"-bad.example",
        b"[]",
    ],
)
def test_ehlo_outside_the_grammar_gets_501_and_is_not_echoed(make_session, arg):
    s = authed(make_session)
    reply = s.send(b"EHLO " + arg + b"\r\n")
    # A bare LF does not end a command line: the whole line is refused.
    assert reply == "501 5.5.4 Invalid domain name\r\n"


@pytest.mark.parametrize(
    "arg", ["client.example", "[192.0.2.1]", "[IPv6:2001:db8::1]", "DESKTOP_7", "localhost."]
)
def test_ehlo_domains_and_literals_are_accepted(make_session, arg):
    s = make_session()
    assert s.command("EHLO " + arg).startswith(f"250-{HOST} Hello {arg}\r\n")


def test_forged_ehlo_never_reaches_the_received_header(make_session):
    s = make_session(scott_policy())
    s.send(b"EHLO good.example\r\nEHLO evil.example\nX-Injected: yes\r\n")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger")).startswith("235")
    assert send_message(s, b"Subject: hi\r\n\r\nbody\r\n.\r\n").startswith("250")
    (msg,) = s.messages()
    head = msg.read_bytes().split(b"\r\n\r\n")[0]
    assert b"X-Injected" not in head
    assert head.startswith(b"Received: from good.example ([127.0.0.1])\r\n")


@given(st.binary(min_size=1, max_size=80).filter(lambda b: b"\r\n" not in b))
def test_any_ehlo_argument_gives_a_clean_reply(tmp_path_factory, arg):
    s = Session(scott_policy(), spool_dir=tmp_path_factory.mktemp("spool"))
    reply = s.send(b"EHLO " + arg + b"\r\n")
    lines = reply.split("\r\n")
    assert lines[-1] == ""
    for line in lines[:-1]:
        assert line[:3] in ("250", "501")
        assert is_one_clean_line(line) and line.isascii()


@given(
    helo=st.from_regex(r"\A[A-Za-z0-9_]{1,10}(\.[A-Za-z0-9_]{1,10}){0,3}\Z"),
    ip=st.ip_addresses().map(str),
)
def test_received_header_is_three_folded_lines(helo, ip):
    header = received_header(helo, ip, "mx.example", "ESMTPSA", "id1", "date")
    lines = header.split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == 4
    assert lines[0].startswith(b"Received: from ")
    assert all(line.startswith(b"\t") for line in lines[1:3])
    assert b"\r" not in b"".join(lines) and b"\n" not in b"".join(lines)


# --- log lines --------------------------------------------------------------


@pytest.mark.parametrize("breaker", LINE_BREAKERS + ["\x1b[2J", "\x07", "\x7f"])
def test_user_names_cannot_forge_log_lines(make_session, captured_log, breaker):
    s = make_session(scott_policy())
    s.command("EHLO client.example")
    forged = (
        f"x{breaker}2026-11-29T00:00:00+0000 [kumoauth.auth#info] AUTH PLAIN success authc=admin"
    )
    blob = base64.b64encode(b"\0" + forged.encode() + b"\0guess").decode()
    reply = s.command("AUTH PLAIN " + blob)
    # Controls are refused by name preparation (RFC 4013); what is logged
    # about the attempt is one clean line either way.
    assert reply.startswith(("501", "535"))
    events = captured_log.namespace("kumoauth.auth")
    assert events
    for event in events:
        text = formatEventAsClassicLogText(event)
        assert text.count("\n") == 1 and text.endswith("\n")
        assert is_one_clean_line(text[:-1])
        assert " success " not in text


@given(st.text(min_size=1, max_size=60))
def test_any_user_name_gives_one_clean_log_line(tmp_path_factory, name):
    from twisted.logger import globalLogPublisher

    from tests.conftest import CapturedLog

    log = CapturedLog()
    globalLogPublisher.addObserver(log)
    try:
        s = Session(scott_policy(), spool_dir=tmp_path_factory.mktemp("spool"))
        s.command("EHLO client.example")
        user = name.encode("utf-8")[:255].decode("utf-8", "ignore") or "x"
        s.command("AUTH PLAIN " + plain_b64("", user, "wrong"))
        s.clock.advance(5)
    finally:
        globalLogPublisher.removeObserver(log)
    for event in log.events:
        if event.get("log_namespace") != "kumoauth.auth":
            continue
        text = formatEventAsClassicLogText(event)
        assert text.count("\n") == 1
        assert is_one_clean_line(text[:-1])


#: one key=value field of a log line, its value bare or in double quotes
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ ]*)')


def fields(text: str) -> list[tuple[str, str]]:
    """The key=value fields of *text*, as a logfmt reader would take them."""
    return [
        (k, v[1:-1].replace('\\"', '"') if v.startswith('"') else v) for k, v in FIELD.findall(text)
    ]


def test_a_user_name_cannot_pass_for_other_fields(make_session, captured_log):
    s = make_session(scott_policy())
    s.command("EHLO client.example")
    name = 'bob authz=admin result=success client=10.0.0.1:1 "'
    assert s.command("AUTH PLAIN " + plain_b64("", name, "wrong")).startswith("535")
    s.clock.advance(5)
    (event,) = [e for e in captured_log.namespace("kumoauth.auth") if "text" in e]
    found = fields(event["text"])
    keys = [k for k, _ in found]
    assert len(keys) == len(set(keys)), event["text"]  # no field twice
    assert dict(found)["authc"] == name
    assert dict(found)["client"] != "10.0.0.1:1"


@given(st.text(max_size=80), st.text(max_size=80))
def test_a_field_reads_back_as_one_field(first, second):
    authc, authz = field_value(first), field_value(second)
    line = f"AUTH PLAIN failure authc={authc} authz={authz} client=192.0.2.1:25"
    assert fields(line) == [
        ("authc", escape(first)),
        ("authz", escape(second)),
        ("client", "192.0.2.1:25"),
    ]
    assert is_one_clean_line(line)


def test_malformed_attempt_logs_no_none(make_session, captured_log):
    s = make_session(scott_policy())
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN not-base64!").startswith("501")
    (event,) = captured_log.namespace("kumoauth.auth")
    assert event["text"].startswith("AUTH PLAIN malformed client=")
    assert "None" not in event["text"]


@given(st.text(max_size=300))
def test_escape_gives_one_printable_line(value):
    out = escape(value)
    assert is_one_clean_line(out)
    if value.isprintable() and "\\" not in value and len(value) <= 256:
        assert out == value


@given(st.text(max_size=300))
def test_unescape_gives_back_what_escape_was_given(value):
    assert unescape(escape(value, len(value))) == value


def test_escape_is_unambiguous():
    assert escape("a\nb") == "a\\x0ab"
    assert escape("a\\x0ab") == "a\\\\x0ab"
    assert escape("\u2028") == "\\u2028"
    # A byte that is not UTF-8 is shown once, as the byte; the text "\xff"
    # has its backslash doubled.
    assert escape(b"\xff") == "\\xff"
    assert escape(b"\\xff") == escape("\\xff") == "\\\\xff"
    assert escape(b"a\xff\xfe\x1b") == "a\\xff\\xfe\\x1b"
    assert escape(None) == "-"


def test_policy_reject_text_has_no_controls():
    reject = Reject(550, "no \x1b[31mred\x1b[0m sender\r\nX-Injected: 1")
    assert is_one_clean_line(reject.reply.decode())


# --- bare CR / LF in DATA -------------------------------------------------------

SMUGGLE = (
    b"Subject: first\r\n\r\nhello\n.\nMAIL FROM:<ceo@example.com>\n"
    b"RCPT TO:<victim@example.net>\nDATA\nSubject: smuggled\n\nowned\r\n.\r\n"
)


def test_bare_newlines_are_normalised_by_default(make_session):
    s = authed(make_session)
    assert send_message(s, SMUGGLE).startswith("250 2.0.0")
    (msg,) = s.messages()
    body = msg.read_bytes().split(b"\r\n", 3)[3]  # after the Received header
    assert not has_bare_newline(msg.read_bytes())
    # One message; its "." line is an ordinary line now, dot-stuffed when
    # relayed.
    assert body.startswith(b"Subject: first\r\n\r\nhello\r\n.\r\nMAIL FROM:")
    assert s.command("NOOP").startswith("250")


def test_bare_newlines_rejected_when_configured(make_session):
    s = authed(make_session, server=ServerConfig(hostname=HOST, bare_newlines="reject"))
    assert send_message(s, SMUGGLE) == "550 5.6.0 Message contains bare CR or LF characters\r\n"
    assert s.messages() == []
    # The session is in sync and goes on.
    assert send_message(s, b"Subject: ok\r\n\r\nfine\r\n.\r\n").startswith("250")
    assert len(s.messages()) == 1


@given(st.binary(max_size=200))
def test_normalize_newlines_leaves_only_crlf(data):
    out = normalize_newlines(data)
    assert not has_bare_newline(out)
    assert out.replace(b"\r\n", b"") == data.replace(b"\r\n", b"").replace(b"\r", b"").replace(
        b"\n", b""
    )
    if not has_bare_newline(data):
        assert out == data
    # each line end of any kind is one CRLF (the regex it replaced, as reference)
    assert out == re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def test_policy_with_a_reject_text_quoting_the_client(make_session):
    policy = scott_policy()

    def mail_from(sender, meta):
        raise Reject(550, f"sender {sender}\x1b[0m refused")

    policy.on("smtp_server_mail_from", mail_from)
    s = make_session(policy)
    s.command("EHLO client.example")
    s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger"))
    reply = s.command("MAIL FROM:<a@example.com>")
    assert reply == "550 5.7.1 sender a@example.com\\x1b[0m refused\r\n"


def test_a_clients_identity_header_is_removed(make_session):
    s = authed(make_session)
    forged = (
        b"X-Kumoauth-Identity: authn=ceo; authz=ceo; id=x; sig=00\r\n"
        b"Subject: hi\r\nx-kumoauth-identity : folded\r\n continued\r\n\r\n"
        b"X-Kumoauth-Identity: in the body stays\r\n"
    )
    assert send_message(s, forged + b".\r\n").startswith("250")
    (msg,) = s.messages()
    head, _, body = msg.read_bytes().partition(b"\r\n\r\n")
    assert b"kumoauth-identity" not in head.lower() and b"continued" not in head
    assert b"Subject: hi" in head
    assert body == b"X-Kumoauth-Identity: in the body stays\r\n"


@given(st.binary(max_size=300))
def test_strip_identity_header_only_touches_that_field(data):
    from kumoauth.smtp.data import strip_identity_header

    out = strip_identity_header(data)
    end = out.find(b"\r\n\r\n")
    head = out if end < 0 else out[: end + 2]
    assert not any(
        line.lower().replace(b" ", b"").replace(b"\t", b"").startswith(b"x-kumoauth-identity:")
        for line in head.split(b"\r\n")
    )
    if b"kumoauth-identity" not in data.lower():
        assert out == data


def test_what_shows_as_nothing_is_escaped_though_printable():
    # str.isprintable passes variation selectors, the combining grapheme
    # joiner and Hangul fillers: a log line showed "alice" for them (review)
    from kumoauth.textsafe import escape

    assert escape("x\U000e0100y\u034fz\u3164") == "x\\U000e0100y\\u034fz\\u3164"
    assert escape("j\u00fcrgen \u0d05\u0d7b") == "j\u00fcrgen \u0d05\u0d7b"
