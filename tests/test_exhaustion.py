"""
Resource exhaustion at the protocol level: backpressure on unread replies,
throttled floods, TLS handshake deadline, the message size limit on the
unstuffed message.  (End-to-end versions: test_probes_e2e.py.)
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumoauth.config import AuthConfig, ServerConfig, ThrottleConfig
from kumoauth.smtp.data import DataReader, has_bare_newline, normalize_newlines
from kumoauth.testing import Session, plain_b64
from tests.test_protocol import HOST, authed, scott_policy, send_message


def test_unread_replies_stop_command_processing(make_session):
    s = make_session()
    s.command("EHLO client.example")
    # The transport says its buffer is full (the client is not reading).
    s.protocol.pauseProducing()
    assert s.transport.producerState == "paused"  # we stopped reading too
    out = s.send(b"HELP\r\n" * 1000)
    assert out == ""  # nothing processed, nothing buffered for output
    s.protocol.resumeProducing()
    assert s.transport.producerState == "producing"
    assert s.output().count("214 ") == 1000


def test_output_pause_does_not_stop_the_idle_timer(make_session):
    s = make_session(server=ServerConfig(hostname=HOST, idle_timeout=30))
    s.protocol.pauseProducing()
    s.send(b"NOOP\r\n")
    s.clock.advance(31)
    assert s.closed


def test_throttled_flood_is_cut_off_and_logged_once(make_session, captured_log):
    auth = AuthConfig(
        failure_delay=0,
        max_failures=1000,
        throttle=ThrottleConfig(max_failures_per_ip=2, max_failures_per_authc=100),
    )
    s = make_session(scott_policy(), auth=auth)
    s.command("EHLO client.example")
    for guess in ("a", "b"):
        s.command("AUTH PLAIN " + plain_b64("", "scott", guess))
    flood = ("AUTH PLAIN " + plain_b64("", "scott", "c") + "\r\n").encode() * 2000
    out = s.send(flood)
    replies = [line for line in out.split("\r\n") if line]
    # max_errors (10) throttled replies, then 421 and close.
    assert len(replies) == 11
    assert all(
        r.startswith("454 4.7.0 Too many failed attempts, try again in ") for r in replies[:10]
    )
    assert replies[-1].startswith("421 4.7.0")
    assert s.closed
    throttled = [
        e for e in captured_log.namespace("kumoauth.auth") if e.get("result") == "throttled"
    ]
    assert len(throttled) == 1
    metric = s.runtime.metrics.auth_attempts.labels("PLAIN", "throttled")
    assert metric._value.get() == 10
    # The summary comes once the interval is over.
    s.clock.advance(61)
    summaries = [e for e in captured_log.namespace("kumoauth.auth") if "suppressed" in e]
    assert [e["suppressed"] for e in summaries] == [9]


def test_handshake_timeout_on_implicit_tls(tmp_path):
    s = Session(scott_policy(), spool_dir=tmp_path, connect=False)
    s.protocol.makeConnection(s.transport)  # "TLS" never completes
    s.clock.advance(29)
    assert not s.closed
    s.clock.advance(2)
    assert s.closed


def test_handshake_timer_stops_once_tls_is_up(make_session):
    s = make_session(tls="starttls")
    s.command("EHLO client.example")
    assert s.command("STARTTLS").startswith("220")
    s.clock.advance(60)
    assert s.command("EHLO client.example").startswith("250")


def test_size_limit_is_on_the_unstuffed_message(make_session):
    limit = 1_000_000
    s = authed(make_session, server=ServerConfig(hostname=HOST, max_message_size=limit))
    # 240,000 lines of "." (3 octets each once unstuffed, 4 on the wire):
    # 720 kB of message, 960 kB on the wire; plus 240 kB of text.
    body = b"..\r\n" * 240_000 + b"x" * 238 + b"\r\n"
    body += (b"y" * 998 + b"\r\n") * 240
    assert send_message(s, body + b".\r\n").startswith("250 ")
    (msg,) = s.messages()
    assert len(msg.read_bytes().split(b"\r\n", 3)[3]) <= limit


def test_one_octet_over_the_limit_is_refused(make_session):
    limit = 1000
    s = authed(make_session, server=ServerConfig(hostname=HOST, max_message_size=limit))
    body = b"x" * (limit - 2) + b"\r\n"
    assert send_message(s, b".." + body[1:] + b".\r\n").startswith("250 ")
    assert send_message(s, b"x" + body + b".\r\n").startswith("552 5.3.4")
    assert len(s.messages()) == 1


def test_a_header_section_over_max_header_size_is_refused(make_session):
    s = authed(make_session, server=ServerConfig(hostname=HOST, max_header_size=1000))
    field = b"X-Pad: " + b"p" * 91 + b"\r\n"  # 100 octets
    assert send_message(s, field * 10 + b"\r\nbody\r\n.\r\n").startswith("250 ")
    reply = send_message(s, field * 10 + b"X: 1\r\n\r\nbody\r\n.\r\n")
    assert reply == "552 5.3.4 Message header exceeds fixed limit\r\n"
    # folded lines are the header's too; a large body is not, nor is text
    # without header fields
    folded = b"Subject: x\r\n" + b" folded\r\n" * 200 + b"\r\nbody\r\n"
    assert send_message(s, folded + b".\r\n").startswith("552 5.3.4")
    big_body = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 100
    assert send_message(s, big_body + b".\r\n").startswith("250 ")
    text = b"no header fields, only text\r\n" * 100
    assert send_message(s, text + b".\r\n").startswith("250 ")
    assert len(s.messages()) == 3
    # the session goes on
    assert s.command("NOOP").startswith("250")


def test_max_header_size_0_turns_the_check_off(make_session):
    s = authed(make_session, server=ServerConfig(hostname=HOST, max_header_size=0))
    assert send_message(s, b"X: y\r\n" * 300_000 + b"\r\n.\r\n").startswith("250 ")


def test_reader_memory_is_bounded_by_the_limit():
    reader = DataReader(10_000)
    buf = bytearray()
    for _ in range(1000):
        buf += b"..\r\n" * 100
        assert not reader.feed(buf)
        assert len(reader._body) + len(reader._raw) <= 10_000 + 4 + 4
    buf += b".\r\n"
    assert reader.feed(buf)
    assert reader.too_big and reader.message() == b""


class Searched(bytearray):
    """A bytearray that counts the octets its searches look at."""

    looked = 0

    def find(self, sub, start=0, *rest):  # type: ignore[no-untyped-def, override]
        Searched.looked += len(self) - max(0, start)
        return super().find(sub, start, *rest)

    def rfind(self, sub, start=0, *rest):  # type: ignore[no-untyped-def, override]
        Searched.looked += len(self) - max(0, start)
        return super().rfind(sub, start, *rest)


@pytest.mark.parametrize(
    ("chunk", "total"), [(b"A" * 1023 + b"\n", 2_000_000), (b"A", 200_000)], ids=["1KiB", "1B"]
)
def test_a_long_line_in_small_chunks_is_searched_once(chunk, total):
    # Each chunk's search for the last CRLF went over the whole unfinished
    # line: a line without CRLF, fed 1 KiB at a time (each with a bare LF,
    # which kept the idle timer happy), cost minutes of the reactor's CPU.
    reader = DataReader(10**8)
    reader._raw = Searched(reader._raw)
    Searched.looked = 0
    fed = feeds = 0
    buf = bytearray()
    while fed < total:
        buf += chunk
        fed += len(chunk)
        feeds += 1
        assert not reader.feed(buf)
    # Linear: a few looks per octet, and a few per call (the terminator's
    # search goes back 4 octets into what it saw).
    assert Searched.looked < 4 * fed + 8 * feeds, (Searched.looked, fed)
    buf += b"\r\n.\r\n"
    assert reader.feed(buf)
    assert reader.message_size == fed + 2


def stuff(message: bytes) -> bytes:
    return (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:]


lines = st.lists(
    st.sampled_from([b"", b".", b"..", b"x", b".x", b"\r", b"\n", b"\n.", b"a.b"]).map(
        lambda part: part * 2
    ),
    max_size=20,
)


#: how long a line without CRLF grows before the reader takes part of it
pieces = st.sampled_from([5, 6, 9, 65536])


@settings(max_examples=300)
@given(
    lines,
    st.lists(st.integers(1, 7), min_size=1, max_size=30),
    st.binary(max_size=10),
    pieces,
)
def test_reader_gives_back_exactly_the_message(parts, sizes, tail, piece):
    message = b"".join(p + b"\r\n" for p in parts)
    wire = stuff(message) + b".\r\n" + tail
    reader = DataReader(10_000, piece=piece)
    buf = bytearray()
    pos = i = 0
    while True:
        n = sizes[i % len(sizes)]
        i += 1
        buf += wire[pos : pos + n]
        pos += n
        if reader.feed(buf):
            break
        assert pos < len(wire) + 10
    assert reader.message() == message
    assert reader.message_size == len(message)
    assert bytes(buf) + wire[pos:] == tail


@settings(max_examples=300)
@given(lines, st.lists(st.integers(1, 7), min_size=1, max_size=30), st.booleans(), pieces)
def test_the_reader_finds_and_rewrites_bare_line_ends_as_the_whole_message_would(
    parts, sizes, normalize, piece
):
    # pieces fed at random cuts: what the reader finds and rewrites line by
    # line is what has_bare_newline and normalize_newlines say of the whole
    message = b"".join(p + b"\r\n" for p in parts)
    wire = stuff(message) + b".\r\n"
    reader = DataReader(10_000, normalize=normalize, piece=piece)
    buf = bytearray()
    pos = i = 0
    while not reader.feed(buf):
        buf += wire[pos : pos + sizes[i % len(sizes)]]
        pos += sizes[i % len(sizes)]
        i += 1
    assert reader.bare is has_bare_newline(message)
    assert reader.message() == (normalize_newlines(message) if normalize else message)
    assert reader.message_size == len(message)  # the limit is on what came


@given(lines)
def test_reader_limit_is_exact(parts):
    message = b"".join(p + b"\r\n" for p in parts)
    for limit in (max(0, len(message) - 1), len(message)):
        reader = DataReader(limit)
        buf = bytearray(stuff(message) + b".\r\n")
        assert reader.feed(buf)
        assert (reader.too_big or reader.message_size > limit) == (len(message) > limit)
