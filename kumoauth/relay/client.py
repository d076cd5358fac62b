"""
The SMTP client that hands accepted messages to the one configured upstream
MTA (the "null client" job: no MX lookups).

:func:`connect` opens an authenticated, TLS-protected :class:`UpstreamSession`
(banner, EHLO, STARTTLS or implicit TLS with the certificate always verified,
EHLO again, AUTH PLAIN with an optional authzid); :meth:`UpstreamSession.send`
runs one mail transaction and returns a :class:`SendResult` with the reply
for each recipient; the session is then reset and can carry the next message
for the same identity, until it has carried ``max_messages_per_session``
transactions.  Failures of the session itself (refused, timeout, TLS, AUTH
refused, 421, connection lost, a 530 to a mail command) are
:class:`UpstreamError`: the caller defers the whole message.  One
exception: a reused session that the upstream ended before accepting
anything of the message is replaced by a new connection, once, and the
message sent there.

Why our own client rather than ``twisted.mail.smtp.ESMTPSenderFactory``:
that factory sends one message per connection, reports recipients only as a
list of accepted ones plus a single failure, has no SMTPUTF8, no way to
refuse (instead of silently downgrading) 8-bit mail, no SASL authzid, and
normalises line ends on its own terms.  See docs/decisions.md.

The pure parts (:func:`dot_stuff`, :class:`ReplyParser`, :func:`parse_reply`,
:func:`parse_ehlo`) have no I/O and are property tested.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import re
from collections import deque
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from twisted.internet import defer, error, ssl, task, threads
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kumoauth.auth.sasl import encode_plain
from kumoauth.config import RelayConfig
from kumoauth.ops.transport import make_eager_connection
from kumoauth.relay.dsn import STATUS_NEEDS_8BIT, STATUS_NEEDS_SMTPUTF8, STATUS_TOO_BIG
from kumoauth.smtp.commands import is_mailbox
from kumoauth.smtp.data import normalize_newlines
from kumoauth.smtp.dsnparams import Requested, mail_params, rcpt_params, xtext
from kumoauth.textsafe import escape
from kumoauth.tls.trust import trust_root

log = Logger(namespace="kumoauth.relay")

T = TypeVar("T")

#: Longest reply line we accept from the upstream (RFC 5321 §4.5.3.1.5 says
#: 512 octets; we are lenient but bounded).
MAX_REPLY_LINE = 4096
#: Most lines in one multi-line reply (an EHLO reply has one per extension).
MAX_REPLY_LINES = 200
#: Longest upstream text kept in a reason or a recipient result.
MAX_REPLY_TEXT = 512


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def crlf_body(body: bytes) -> bytes:
    """
    *body* with every bare CR and bare LF turned into CRLF and a final CRLF
    added if it lacks one (an empty body stays empty): the message exactly as
    it goes out, before dot-stuffing.  Its length is the SIZE we declare.
    """
    data = normalize_newlines(body)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


#: a message at least this long is made ready to send in a thread, a
#: piece of about this many octets at a time, and written a piece per
#: reactor turn: on the reactor, a 24 MB message's line ends, dot-stuffing
#: and TLS held every other session for 0.07 to 0.26 s
PIECE = 1 << 20


def wire_pieces(body: bytes, piece: int = PIECE) -> tuple[int, list[bytes]]:
    """
    What :func:`crlf_body` and :func:`dot_stuff` make of *body*, made a
    piece at a time: the length of ``crlf_body(body)`` (the SIZE to
    declare) and ``dot_stuff(body)`` as a list of pieces, the terminator
    ending the last (a body under *piece* octets is one piece).  Each
    piece of *body* ends before a CRLF (or at its end), so none parts a CR
    from its LF, and the next starts with that CRLF, so a dot after it is
    stuffed in the same piece.  No call on the whole message: run in a
    thread, it lets the reactor have the interpreter between pieces.
    """
    out: list[bytes] = []
    length = start = 0
    while start < len(body):
        cut = body.find(b"\r\n", start + piece)
        end = len(body) if cut < 0 else cut
        chunk = normalize_newlines(body[start:end])
        if start == 0 and chunk.startswith(b"."):
            chunk = b"." + chunk
            length -= 1  # the added dot is stuffing, not the message
        length += len(chunk)
        out.append(chunk.replace(b"\r\n.", b"\r\n.."))
        start = end
    if not out:
        return 0, [b".\r\n"]  # the CRLF before it ended the DATA command
    if not out[-1].endswith(b"\r\n"):
        out[-1] += b"\r\n"
        length += 2
    out[-1] += b".\r\n"
    return length, out


def dot_stuff(body: bytes) -> bytes:
    """
    The bytes to send after ``354`` (RFC 5321 §4.5.2): CRLF line ends only
    (bare CR and LF become CRLF, so no line end is ambiguous for the
    upstream), a final CRLF added if missing, every line that starts with
    "." gets another, and the terminating "." CRLF.  The result always ends
    with CRLF "." CRLF, except for an empty body, which is just "." CRLF
    (the CRLF before it is the one that ended the DATA command).
    """
    return b"".join(wire_pieces(body)[1])


class ReplyError(ValueError):
    """A reply from the upstream that is not SMTP (RFC 5321 §4.2)."""


_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?", re.S)
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")


@dataclass(frozen=True)
class Reply:
    """
    One SMTP reply: the code, the enhanced status code (RFC 3463, when the
    upstream gave one on the first line), and the text of each line without
    the code and the enhanced code.
    """

    code: int
    lines: tuple[str, ...]
    enhanced: str | None = None

    @property
    def text(self) -> str:
        """All lines joined by a space, escaped: one printable line."""
        return escape(" ".join(line for line in self.lines if line), MAX_REPLY_TEXT)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        text = self.text
        if text:
            parts.append(text)
        return " ".join(parts)


def _decode(raw: bytes) -> str:
    # Bytes that are not UTF-8 as lone surrogates, which escape() shows as
    # the byte (\xff), once.
    return raw.decode("utf-8", "surrogateescape")


def _without(reply: Reply, *secrets: str) -> Reply:
    """
    *reply* with each of *secrets* shown as ``***`` (but one of one or two
    characters, which would blot out the text around it as well).
    """
    lines = reply.lines
    for secret in secrets:
        if len(secret) >= 3 and any(secret in line for line in lines):
            lines = tuple(line.replace(secret, "***") for line in lines)
    return Reply(reply.code, lines, reply.enhanced) if lines is not reply.lines else reply


def _too_many(result: RecipientResult) -> bool:
    """``452`` "too many recipients" (4.5.3, or no enhanced code), not "mailbox full"."""
    return (
        result.code == 452
        and result.enhanced in (None, "4.5.3")
        and not isinstance(result, NotSent)
    )


def _transient(enhanced: str | None) -> str | None:
    return "4" + enhanced[1:] if enhanced else None


def make_reply(code: int, raw_lines: Sequence[bytes]) -> Reply:
    """Build a :class:`Reply` from the text parts of its lines."""
    lines = [_decode(raw) for raw in raw_lines]
    enhanced = None
    m = _ENHANCED.match(lines[0]) if lines else None
    if m is not None and m[1] == str(code)[0]:
        enhanced = f"{m[1]}.{int(m[2])}.{int(m[3])}"
        stripped = []
        for line in lines:
            # RFC 2034 §3: every line of the reply carries the code; strip it
            # where it is there.
            lm = _ENHANCED.match(line)
            if lm is not None and (lm[1], int(lm[2]), int(lm[3])) == (
                m[1],
                int(m[2]),
                int(m[3]),
            ):
                line = line[lm.end() :]
            stripped.append(line)
        lines = stripped
    return Reply(code=code, lines=tuple(lines), enhanced=enhanced)


class ReplyParser:
    """
    Assembles replies from lines (CRLF already removed): ``250-...``
    continues a multi-line reply, ``250 ...`` (or a bare ``250``) ends it.
    Every line of one reply must carry the same code.
    """

    __slots__ = ("_code", "_lines")

    def __init__(self) -> None:
        self._code: int | None = None
        self._lines: list[bytes] = []

    @property
    def pending(self) -> bool:
        """True in the middle of a multi-line reply."""
        return self._code is not None

    def line(self, line: bytes) -> Reply | None:
        """Take one line; return the reply it completes, if any."""
        if len(line) > MAX_REPLY_LINE:
            raise ReplyError("reply line too long")
        m = _REPLY_LINE.fullmatch(line)
        if m is None:
            raise ReplyError(f"malformed reply line: {escape(line, 80)}")
        code = int(m[1])
        if self._code is not None and code != self._code:
            raise ReplyError(f"reply code changed within a reply: {escape(line, 80)}")
        if len(self._lines) >= MAX_REPLY_LINES:
            raise ReplyError("too many lines in one reply")
        self._code = code
        self._lines.append(m[3] or b"")
        if m[2] == b"-":
            return None
        reply = make_reply(code, self._lines)
        self._code = None
        self._lines = []
        return reply


def parse_replies(data: bytes) -> list[Reply]:
    """
    Every complete reply in *data* (lines ending in CRLF; a bare LF is
    tolerated); raises :class:`ReplyError` on a malformed line or an
    unfinished reply at the end.
    """
    parser = ReplyParser()
    replies = []
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise ReplyError("unterminated reply line")
    for raw in lines[:-1]:
        reply = parser.line(raw.removesuffix(b"\r"))
        if reply is not None:
            replies.append(reply)
    if parser.pending:
        raise ReplyError("unfinished multi-line reply")
    return replies


def parse_reply(data: bytes) -> Reply:
    """Exactly one reply (see :func:`parse_replies`)."""
    replies = parse_replies(data)
    if len(replies) != 1:
        raise ReplyError(f"expected one reply, got {len(replies)}")
    return replies[0]


def format_reply(code: int, lines: Sequence[str], enhanced: str | None = None) -> bytes:
    """The wire form of a reply (for tests and fakes): the inverse of parsing."""
    if not lines:
        lines = [""]
    out = []
    for i, text in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        body = f"{enhanced} {text}" if enhanced else text
        out.append(f"{code}{sep}{body}".rstrip(" ").encode("utf-8") + b"\r\n")
    return b"".join(out)


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """
    The extensions of an EHLO reply (RFC 5321 §4.1.1.1): upper-case keyword
    to its parameters (``""`` when it has none).  The first line is the
    upstream's name, not an extension.
    """
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            ext[keyword.upper()] = params.strip()
    return ext


def size_limit(extensions: dict[str, str]) -> int | None:
    """The upstream's SIZE limit (RFC 1870); None when none is stated."""
    value = extensions.get("SIZE")
    if value is None or not value.isdigit() or int(value) == 0:
        return None
    return int(value)


# ---------------------------------------------------------------------------
# Results and errors
# ---------------------------------------------------------------------------


class UpstreamError(Exception):
    """
    The upstream session failed: connection refused, timeout, TLS or
    certificate verification failure, AUTH refused, 421, connection lost,
    a malformed reply.  The whole message is deferred.  ``reason`` is one
    printable line (upstream text escaped) and never holds a password;
    ``permanent`` is True when the upstream answered with a 5xx reply, which
    retrying the same configuration will not change.  ``closed`` is True
    when the upstream ended the session itself: it closed or reset the
    connection, or said 421 (``reply`` is then that 421).
    """

    def __init__(
        self,
        reason: str,
        permanent: bool = False,
        reply: Reply | None = None,
        closed: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.reply = reply
        self.closed = closed

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        return f"UpstreamError({self.reason!r}, permanent={self.permanent})"


class IdentityRefused(UpstreamError):
    """
    The upstream refused AUTH for one authzid with a 5xx (``[relay]
    identity = "authz"``): that user's mail waits, the upstream is not
    down.
    """


class _StaleSession(UpstreamError):
    """
    A session that had been idle for reuse turned out to be ended by the
    upstream before it accepted anything of this message (no reply to MAIL,
    or a 421 to it): the message was not sent, and goes at once over a new
    session instead (:meth:`UpstreamSession.transaction`).
    """


class RecipientResult(NamedTuple):
    """The outcome for one recipient: ``(code, enhanced, text)``."""

    code: int
    enhanced: str | None
    text: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def line(self) -> str:
        """``code enhanced text``, one printable line."""
        return str(self)

    @classmethod
    def of(cls, reply: Reply) -> RecipientResult:
        return cls(reply.code, reply.enhanced, reply.text)

    def __str__(self) -> str:
        return " ".join(str(p) for p in (self.code, self.enhanced, self.text) if p)


class NotSent(RecipientResult):
    """
    kumoauth's own refusal, the message not sent (the upstream lacks
    SMTPUTF8, 8BITMIME or room; an address it cannot be given): a bounce
    does not say the upstream refused it.
    """

    __slots__ = ()


@dataclass
class SendResult:
    """
    The outcome of one message.  ``recipients`` maps each recipient (in the
    order given, duplicates removed) to its result: the RCPT reply, or for a
    recipient accepted at RCPT the reply to DATA or to the end of data; a
    failed MAIL or a local refusal (SIZE, SMTPUTF8, 8BITMIME) applies to all.
    ``data_sent`` is True when the message bytes went to the upstream and
    ``final`` is the reply to them.  ``dsn`` is True when the upstream
    offered DSN (RFC 3461): the sender's NOTIFY went with the recipients,
    and reports from here on are the upstream's to send.
    """

    recipients: dict[str, RecipientResult]
    data_sent: bool = False
    final: RecipientResult | None = None
    dsn: bool = False

    @property
    def delivered(self) -> list[str]:
        return [r for r, res in self.recipients.items() if res.delivered]

    @property
    def deferred(self) -> list[str]:
        return [r for r, res in self.recipients.items() if res.transient]

    @property
    def bounced(self) -> list[str]:
        return [r for r, res in self.recipients.items() if res.permanent]


class OutboundMessage(Protocol):
    """
    What :meth:`UpstreamSession.send` needs of a message.  The bytes may
    also be called ``data`` instead of ``body``.
    """

    @property
    def mail_from(self) -> str: ...
    @property
    def rcpt_to(self) -> Sequence[str]: ...
    @property
    def size(self) -> int: ...
    @property
    def smtputf8(self) -> bool: ...
    @property
    def eightbit(self) -> bool: ...
    @property
    def body(self) -> bytes: ...


#: octets of one XFORWARD command line, CRLF excluded (Postfix's limit is
#: the 512 of RFC 5321 command lines)
XFORWARD_LINE = 500


def xforward_lines(attributes: Sequence[tuple[str, str]], offered: str) -> list[bytes]:
    """
    The ``XFORWARD`` commands for *attributes* (name, value) that the
    upstream's EHLO keyword *offered* (``XFORWARD NAME ADDR PROTO …``)
    names, values xtext-encoded, as few lines as fit :data:`XFORWARD_LINE`;
    an attribute too long for a line of its own is left out.
    """
    names = set(offered.upper().split())
    lines: list[bytes] = []
    line = "XFORWARD"
    for name, value in attributes:
        if name not in names:
            continue
        field = f" {name}={xtext(value)}"
        if len("XFORWARD" + field) > XFORWARD_LINE:
            continue
        if len(line + field) > XFORWARD_LINE:
            lines.append(line.encode("ascii"))
            line = "XFORWARD"
        line += field
    if line != "XFORWARD":
        lines.append(line.encode("ascii"))
    return lines


_BOUNDARY = re.compile(rb'(?i)\bboundary[ \t]*=[ \t]*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))')
#: multipart boundaries followed at most, nested ones included
MAX_BOUNDARIES = 100
#: part header blocks looked at; past it the message is taken to need
#: SMTPUTF8 (no real message has this many parts)
MAX_PARTS = 10_000
#: a line that may be a delimiter (RFC 2046 §5.1.1): "--", then a
#: boundary (at most 70 characters; some senders use up to 200) and
#: perhaps the closing "--" and transport padding
_DELIMITER = re.compile(rb"\r\n--([^\r\n]{1,210})\r\n")


def headers_need_utf8(body: bytes) -> bool:
    """
    Whether a header of the message or of one of its MIME parts is not
    ASCII (RFC 6532 UTF-8 headers): what SMTPUTF8 is needed for, beyond
    the envelope.  A byte scan of the header blocks only (the message's,
    then the one after each boundary its Content-Types declare): it runs
    on the reactor thread, and a parse of a large message would hold it.
    """
    if body.isascii():
        return False
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[:end]
    if not head.isascii():
        return True
    if end < 0:
        return False
    known = {m[1] or m[2] for m in itertools.islice(_BOUNDARY.finditer(head), MAX_BOUNDARIES)}
    # One pass forward over the delimiter lines, each header block read
    # once: a block is never scanned again from a later delimiter (a body
    # of delimiters without blank lines was quadratic).
    pos, parts = end, 0
    while known and (m := _DELIMITER.search(body, pos)):
        name = m[1].rstrip(b" \t")
        pos = m.end() - 2  # the CRLF that ends the delimiter line
        if name not in known:
            continue  # another line starting "--", or a closing delimiter
        parts += 1
        if parts > MAX_PARTS:
            return True
        stop = body.find(b"\r\n\r\n", pos)
        stop = len(body) if stop < 0 else stop
        block = body[pos:stop]
        if not block.isascii():
            return True
        if len(known) < MAX_BOUNDARIES:
            known.update(x[1] or x[2] for x in _BOUNDARY.finditer(block))
        pos = stop
    return False


def _body(message: Any) -> bytes:
    body = getattr(message, "body", None)
    if body is None:
        body = message.data
    return bytes(body)


@dataclass(frozen=True)
class Message:
    """A plain :class:`OutboundMessage`."""

    mail_from: str
    rcpt_to: list[str]
    body: bytes
    size: int = 0
    smtputf8: bool = False
    eightbit: bool = False
    #: the sender's DSN parameters (RFC 3461), passed where DSN is offered
    dsn: Requested | None = None


@dataclass(frozen=True)
class ClientSettings:
    """
    What :func:`connect` needs from ``[relay]``.  ``password`` is the text
    of ``password_file``; it is left out of ``repr``.  ``tls_name`` is the
    name the certificate must carry (default: ``host``).  ``helo_name`` is
    our hostname.  ``allow_plaintext`` permits ``tls = "none"`` to a host
    that is not a loopback address.  ``command_timeout`` bounds the wait for
    each reply but one: ``data_timeout`` bounds the one for the reply to the
    message (after its final dot; RFC 5321 §4.5.3.2.6 suggests 10 minutes).
    ``max_messages`` is the number of mail transactions one session carries
    before it is no longer :attr:`~UpstreamSession.reusable`.
    ``for_users``: sessions log in for the submitting user (``identity =
    "authz"``), so one without an authzid is kumoauth's own account acting
    for itself (its bounces), and a 5xx to it is about that mail only.
    """

    host: str
    port: int = 587
    tls: str = "starttls"
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    helo_name: str = "localhost"
    tls_name: str | None = None
    allow_plaintext: bool = False
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    data_timeout: float = 600.0
    max_messages: int = 100
    for_users: bool = False

    @classmethod
    def from_config(
        cls, config: RelayConfig, hostname: str, password: str | None
    ) -> ClientSettings:
        """From ``[relay]``, our ``[server] hostname`` and the password file's text."""
        return cls(
            host=config.host,
            port=config.port,
            tls=config.tls,
            ca_file=None if config.ca_file is None else str(config.ca_file),
            username=config.username,
            password=password,
            helo_name=hostname,
            allow_plaintext=config.allow_plaintext,
            connect_timeout=config.connect_timeout,
            command_timeout=config.command_timeout,
            data_timeout=config.data_timeout,
            max_messages=config.max_messages_per_session,
            for_users=config.identity == "authz",
        )


def client_settings(settings: Any) -> ClientSettings:
    """
    *settings* as :class:`ClientSettings`: itself, or built from an object
    with ``config`` (a :class:`~kumoauth.config.RelayConfig`), ``hostname``
    and ``password`` (the scheduler's settings).
    """
    if isinstance(settings, ClientSettings):
        return settings
    config = getattr(settings, "config", None)
    if config is None:
        raise TypeError(f"not relay settings: {type(settings).__name__}")
    return ClientSettings.from_config(config, settings.hostname, settings.password)


# ---------------------------------------------------------------------------
# The wire
# ---------------------------------------------------------------------------


class _Waiter(NamedTuple):
    #: fired with the reply (None: a pipelined group's reply before its last)
    deferred: defer.Deferred[Any] | None
    what: str
    timeout: float
    #: the last plaintext reply before TLS: nothing may follow it
    before_tls: bool
    #: a pipelined group's replies so far; its last waiter fires with them
    group: list[Reply] | None = None


def _describe_tls_failure(value: BaseException, expected: str) -> str:
    parts: list[str] = []
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list):
        for item in args[0]:
            if isinstance(item, tuple) and item:
                parts.append(str(item[-1]))
    if not parts:
        parts.append(str(value) or type(value).__name__)
    detail = escape("; ".join(p for p in parts if p), 200)
    name = type(value).__name__
    text = detail.lower()
    if name == "VerificationError" or "verif" in text or "certificate" in text:
        if name == "VerificationError":
            detail = f"the certificate is not for {escape(expected)}"
        return f"certificate verification failed: {detail}"
    return f"TLS handshake failed: {detail}"


@implementer(IHandshakeListener)
class _ClientProtocol(TwistedProtocol):
    """
    Line framing, reply parsing and a FIFO of waiters (so commands can be
    pipelined), one timer for the oldest outstanding reply, and the TLS
    switch.  Everything that goes wrong becomes an :class:`UpstreamError`
    for every waiter.
    """

    def __init__(self, reactor: IReactorTime, implicit_tls: Any = None, tls_name: str = "") -> None:
        self._reactor = reactor
        self._tls_name = tls_name
        self._implicit_tls = implicit_tls
        self._buffer = bytearray()
        self._parser = ReplyParser()
        self._waiters: deque[_Waiter] = deque()
        # One timer per session, not one per reply: the reply awaited first
        # must come by _deadline; the timer, when it fires, re-arms itself
        # for what is left (None: no reply awaited).
        self._timer: IDelayedCall | None = None
        self._deadline: float | None = None
        self._timed: _Waiter | None = None
        self.error: UpstreamError | None = None
        self.connected_ = False
        self.tls_started = False
        self.tls_version: str | None = None
        self.closing = False
        #: replies received so far (to tell which command a failure came at)
        self.replies = 0
        #: what no reply may show (the AUTH blob, the relay password), from
        #: AUTH on: an upstream that quotes a command back, in any reply
        self.secrets: tuple[str, ...] = ()
        self._lost_waiters: list[defer.Deferred[None]] = []

    # -- Twisted ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_ = True
        # Commands leave when written, not an iteration later (see
        # kumoauth/ops/transport.py); a pipelined group is one write.
        make_eager_connection(self.transport)
        if self._implicit_tls is not None:
            self.start_tls(self._implicit_tls)

    def handshakeCompleted(self) -> None:
        try:
            handle = self.transport.getHandle()  # type: ignore[union-attr]
            self.tls_version = handle.get_protocol_version_name()
        except Exception:  # noqa: BLE001 - informational only
            self.tls_version = "TLS"

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        self._buffer += data
        while self.error is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self.fail(UpstreamError("protocol error: reply line too long from upstream"))
                return
            line = bytes(self._buffer[:end]).removesuffix(b"\r")
            del self._buffer[: end + 1]
            try:
                reply = self._parser.line(line)
            except ReplyError as e:
                self.fail(UpstreamError(f"protocol error: {e}"))
                return
            if reply is not None:
                if self.secrets:
                    reply = _without(reply, *self.secrets)
                self._deliver(reply)

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.connected_ = False
        self._cancel_timer()
        if self.error is None:
            if self.tls_started and self.tls_version is None:
                err = UpstreamError(
                    _describe_tls_failure(reason.value or Exception(), self._tls_name)
                )
            elif self.closing:
                err = UpstreamError("session closed")
            elif reason.check(error.ConnectionDone):
                err = UpstreamError("upstream closed the connection", closed=True)
            else:
                err = UpstreamError(
                    f"connection lost: {escape(reason.getErrorMessage(), 200)}", closed=True
                )
            self.error = err
        self._fail_waiters(self.error)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    # -- ours ---------------------------------------------------------------

    def when_lost(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.connected_:
            self._lost_waiters.append(d)
        else:
            d.callback(None)
        return d

    def start_tls(self, options: Any) -> None:
        self.tls_started = True
        self.transport.startTLS(options)  # type: ignore[union-attr]

    def expect(self, what: str, timeout: float, before_tls: bool = False) -> defer.Deferred[Reply]:
        d: defer.Deferred[Reply] = defer.Deferred()
        if self.error is not None:
            d.errback(self.error)
            return d
        self._await(_Waiter(d, what, timeout, before_tls))
        return d

    def _await(self, waiter: _Waiter) -> None:
        self._waiters.append(waiter)
        if self._deadline is None:
            self._start_timer()

    def _write_lines(self, lines: list[tuple[bytes, str]]) -> None:
        """*lines* ((line, what) pairs) in one write, unless the session has failed."""
        for line, _ in lines:
            if b"\r" in line or b"\n" in line:
                raise ValueError("a command line must not contain CR or LF")
        if self.error is None:
            self.transport.write(b"".join(line + b"\r\n" for line, _ in lines))  # type: ignore[union-attr]

    def command(
        self, line: bytes, what: str, timeout: float, before_tls: bool = False
    ) -> defer.Deferred[Reply]:
        [d] = self.commands([(line, what)], timeout, before_tls)
        return d

    def commands(
        self, lines: list[tuple[bytes, str]], timeout: float, before_tls: bool = False
    ) -> list[defer.Deferred[Reply]]:
        """Send *lines* in one write: pipelined (RFC 2920) when several; a Deferred each."""
        self._write_lines(lines)
        return [self.expect(what, timeout, before_tls) for _, what in lines]

    def pipeline(
        self, lines: list[tuple[bytes, str]], timeout: float
    ) -> defer.Deferred[list[Reply]]:
        """
        Send *lines* in one write (RFC 2920) and fire once, with every reply
        in order, when the last has come; or fail when the session does.
        One Deferred for the group, not one per command.
        """
        self._write_lines(lines)
        d: defer.Deferred[list[Reply]] = defer.Deferred()
        if self.error is not None:
            d.errback(self.error)
            return d
        group: list[Reply] = []
        *first, (_, last) = lines
        for _, what in first:
            self._await(_Waiter(None, what, timeout, False, group))
        self._await(_Waiter(d, last, timeout, False, group))
        return d

    def send_data(self, wire: bytes | list[bytes], timeout: float) -> defer.Deferred[Reply]:
        """
        Write *wire* (the bytes after 354, or a list of pieces of them:
        one per reactor turn, :data:`PIECE`) and wait for the reply.
        """
        if isinstance(wire, bytes):
            wire = [wire]
        if self.error is None:
            self.transport.write(wire[0])  # type: ignore[union-attr]
        reply = self.expect("the end of data", timeout)
        if self.error is not None or len(wire) == 1:
            return reply
        # a piece per turn of this session's reactor (a Clock in tests)
        turns = task.Cooperator(scheduler=lambda step: self._reactor.callLater(0, step))
        written = turns.cooperate(self._write_each(wire[1:])).whenDone()
        # The reply is not taken before the last piece is out: after an
        # upstream that answers early, the next command must not go out
        # between two pieces of the message.
        return written.addCallback(lambda _: reply)

    def _write_each(self, pieces: list[bytes]) -> Iterator[None]:
        for each in pieces:
            if self.error is not None or self.transport is None:
                return  # the session failed: its waiter has the error
            self.transport.write(each)
            yield None

    def fail(self, err: UpstreamError) -> None:
        """Fail every waiter with *err* and drop the connection."""
        if self.error is None:
            self.error = err
        self._cancel_timer()
        self._fail_waiters(self.error)
        if self.connected_ and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _fail_waiters(self, err: UpstreamError) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.deferred is not None:
                waiter.deferred.errback(err)

    def _deliver(self, reply: Reply) -> None:
        self._deadline = self._timed = None  # the timer stays armed, for the next
        self.replies += 1
        if not self._waiters:
            if reply.code == 421:
                self.fail(
                    UpstreamError(
                        f"upstream closing the session: {reply}", reply=reply, closed=True
                    )
                )
            else:
                self.fail(UpstreamError(f"protocol error: unexpected reply {reply}"))
            return
        waiter = self._waiters.popleft()
        if waiter.before_tls and (self._buffer or self._parser.pending):
            # Bytes after the reply that starts TLS were sent in plaintext
            # and would be read as if they came through TLS (CVE-2011-0411,
            # the client side): refuse the session.
            self._waiters.appendleft(waiter)
            self.fail(UpstreamError("protocol error: upstream sent data after its STARTTLS reply"))
            return
        group = waiter.group
        if reply.code == 421 and group is not None and waiter.deferred is None:
            # A 421 is the last thing the upstream says (RFC 5321 §3.8): the
            # rest of the group will not be answered.  Fail it now, with the
            # upstream's words rather than the connection loss that follows.
            group.append(reply)
            self.fail(
                UpstreamError(
                    f"upstream closing the session at {waiter.what}: {reply}",
                    reply=reply,
                    closed=True,
                )
            )
            return
        if self._waiters:
            self._start_timer()
        if group is not None:
            group.append(reply)
            if waiter.deferred is not None:
                waiter.deferred.callback(group)
        elif waiter.deferred is not None:
            waiter.deferred.callback(reply)

    def _start_timer(self) -> None:
        waiter = self._waiters[0]
        self._deadline, self._timed = self._reactor.seconds() + waiter.timeout, waiter
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self._reactor.callLater(waiter.timeout, self._check_deadline)
        elif timer.getTime() > self._deadline:
            timer.reset(waiter.timeout)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._deadline is None or self._timed is None:
            return  # nothing awaited: the next command arms it again
        left = self._deadline - self._reactor.seconds()
        if left > 0:
            self._timer = self._reactor.callLater(left, self._check_deadline)
            return
        self._timed_out(self._timed)

    def _cancel_timer(self) -> None:
        self._deadline = self._timed = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self, waiter: _Waiter) -> None:
        self._timer = None
        self.fail(
            UpstreamError(
                f"timeout: no reply to {waiter.what} from upstream within {waiter.timeout:g} s"
            )
        )


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, reactor: IReactorTime, implicit_tls: Any, tls_name: str) -> None:
        self.reactor = reactor
        self.implicit_tls = implicit_tls
        self.tls_name = tls_name

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        return _ClientProtocol(self.reactor, self.implicit_tls, self.tls_name)


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------


def _run(coro: Coroutine[Any, Any, T]) -> defer.Deferred[T]:
    return defer.Deferred.fromCoroutine(coro)


_ADDRESS_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _valid_address(address: str) -> bool:
    """
    Whether *address* may go in ``MAIL FROM:<…>`` / ``RCPT TO:<…>``: no
    control character, and a space or angle bracket only inside a quoted
    local part of a valid mailbox (``"a b"@example.net``, which the
    submission side took with 250: refusing it here bounced it as if the
    upstream had).
    """
    if len(address.encode()) > 1000:
        return False
    if _ADDRESS_FORBIDDEN.search(address) is None:
        return True
    return _CONTROLS.search(address) is None and is_mailbox(address, utf8=True)


def _raise_421(reply: Reply, what: str) -> None:
    if reply.code == 421:
        raise UpstreamError(
            f"upstream closing the session at {what}: {reply}", reply=reply, closed=True
        )


def _raise_530(reply: Reply, what: str) -> None:
    """
    A 530 is about the session, not the message or a recipient: the
    upstream wants AUTH (RFC 4954 §6, "Authentication required") or TLS
    (RFC 3207, "Must issue a STARTTLS command first") that ``[relay]``
    does not give it.  The message is deferred whole, as when AUTH is
    refused, not bounced: its bounce would go the same way and be lost.
    """
    if reply.code == 530:
        raise UpstreamError(
            f"upstream requires authentication or TLS ([relay] username, tls) at {what}: {reply}",
            True,
            reply,
        )


class UpstreamSession:
    """
    One authenticated SMTP session to the upstream, for one identity
    (``authzid``).  :meth:`send` one message at a time; after each the
    session is reset and, while :attr:`reusable`, can send the next.  It is
    no longer reusable once it has carried ``max_messages`` mail
    transactions: the caller closes it (QUIT) and opens another.

    A session reused after waiting idle may have been ended by the upstream
    in the meantime (its idle timeout, its own per-session limit).  When
    that shows before the upstream accepted anything of the message (the
    connection was gone, or MAIL got no reply or a 421), the message has
    not been sent: :meth:`transaction` opens a new connection (with
    *reactor*) and sends it there, once, rather than failing the attempt.
    """

    def __init__(
        self,
        protocol: _ClientProtocol,
        settings: ClientSettings,
        authzid: str | None,
        reactor: Any = None,
    ) -> None:
        self._proto = protocol
        self._settings = settings
        self._reactor = reactor
        self.authzid = authzid
        self.authenticated_as: str | None = None
        self.extensions: dict[str, str] = {}
        #: messages the upstream answered the end of data of, this connection
        self.messages = 0
        #: mail transactions (MAIL commands) sent over this connection
        self.transactions = 0
        #: transaction() calls ended over this connection (more than 0: reused)
        self._uses = 0
        self._busy = False
        self._broken = False
        self._aborted = False
        self._connecting: defer.Deferred[UpstreamSession] | None = None

    def __repr__(self) -> str:
        s = self._settings
        return (
            f"<UpstreamSession {s.host}:{s.port} tls={self.tls_version or 'none'} "
            f"authc={self.authenticated_as!r} authzid={self.authzid!r} "
            f"messages={self.messages} reusable={self.reusable}>"
        )

    @property
    def tls_version(self) -> str | None:
        return self._proto.tls_version

    @property
    def size_limit(self) -> int | None:
        return size_limit(self.extensions)

    @property
    def exhausted(self) -> bool:
        """True once the session has carried ``max_messages`` transactions."""
        return self.transactions >= self._settings.max_messages

    @property
    def reusable(self) -> bool:
        """
        True when the session is connected, idle, in a known state and has
        not carried ``max_messages`` transactions yet.
        """
        p = self._proto
        return (
            p.connected_
            and p.error is None
            and not p.closing
            and not self._busy
            and not self._broken
            and not self.exhausted
        )

    def when_closed(self) -> defer.Deferred[None]:
        """Fires (with None) when the connection is gone, for whatever reason."""
        return self._proto.when_lost()

    # -- setting up ---------------------------------------------------------

    async def _ehlo(self) -> None:
        s = self._settings
        reply = await self._proto.command(
            b"EHLO " + s.helo_name.encode("ascii"), "EHLO", s.command_timeout
        )
        if not reply.positive:
            raise UpstreamError(f"upstream refused EHLO: {reply}", reply.permanent, reply)
        self.extensions = parse_ehlo(reply)

    async def _open(self, tls_options: Any) -> None:
        s = self._settings
        proto = self._proto
        banner = await proto.expect("the greeting", s.command_timeout)
        if banner.code != 220:
            raise UpstreamError(f"upstream refused the session: {banner}", banner.permanent, banner)
        await self._ehlo()
        if s.tls == "starttls":
            if "STARTTLS" not in self.extensions:
                raise UpstreamError(
                    "upstream does not offer STARTTLS (tls = starttls): not sending in plaintext"
                )
            reply = await proto.command(b"STARTTLS", "STARTTLS", s.command_timeout, True)
            if reply.code != 220:
                raise UpstreamError(
                    f"upstream refused STARTTLS: {reply} (not sending in plaintext)",
                    reply.permanent,
                    reply,
                )
            proto.start_tls(tls_options)
            await self._ehlo()  # RFC 3207 §4.2: forget what was said in plaintext
        if s.username is not None:
            await self._auth(s.username, s.password or "")

    async def _auth(self, username: str, password: str) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" not in mechanisms:
            raise UpstreamError("upstream does not offer AUTH PLAIN")
        try:
            blob = encode_plain(self.authzid or "", username, password)
        except UnicodeEncodeError:
            raise UpstreamError("relay credentials are not valid UTF-8") from None
        fields = blob.split(b"\x00")
        if len(fields) != 3 or any(len(f) > 255 for f in fields):
            raise UpstreamError("relay user name, authzid or password unusable for SASL PLAIN")
        encoded = base64.b64encode(blob)
        line = b"AUTH PLAIN " + encoded
        # An upstream that quotes what it was sent ("… for: AUTH PLAIN
        # <blob>"), in its reply to AUTH or any later one, must not put the
        # credentials in the log, the queue or a bounce.
        self._proto.secrets = (encoded.decode(), password)
        reply = await self._proto.command(line, "AUTH", self._settings.command_timeout)
        if reply.code == 334:
            # We gave the initial response; a challenge means it was not
            # understood.  Cancel (RFC 4954 §4) and give up.
            reply = await self._proto.command(b"*", "AUTH", self._settings.command_timeout)
            raise UpstreamError(f"upstream refused AUTH as {escape(username)}: {reply}")
        if reply.code != 235:
            # A 5xx for an authzid is about that user, and under identity =
            # "authz" one for kumoauth acting for itself (no authzid) is about
            # its own mail (bounces): the upstream answers the users, it is
            # no outage.  A 4xx (the upstream's auth service down) is about
            # everyone.
            itself = not self.authzid and self._settings.for_users
            refused = (
                IdentityRefused if reply.permanent and (self.authzid or itself) else UpstreamError
            )
            raise refused(
                f"upstream refused AUTH as {escape(username)}"
                + (f" for {escape(self.authzid)}" if self.authzid else "")
                + (" for itself (its bounces; see relay.md)" if itself else "")
                + f": {reply}",
                reply.permanent,
                reply,
            )
        self.authenticated_as = username

    # -- sending --------------------------------------------------------------

    def send(self, message: OutboundMessage) -> defer.Deferred[SendResult]:
        """
        Run one mail transaction for *message*.  Fires with a
        :class:`SendResult`, or fails with :class:`UpstreamError` when the
        session breaks (the message is then to be deferred whole).
        """
        return _run(self.transaction(message))

    async def transaction(self, message: OutboundMessage) -> SendResult:
        """
        :meth:`send` as a coroutine, for a caller that is one itself (the
        scheduler): awaited directly, without a Deferred in between.
        """
        if self._busy:
            raise RuntimeError("UpstreamSession.send: a message is already in progress")
        err = self._proto.error
        if err is None and self.exhausted:
            raise UpstreamError(
                f"session has carried its {self._settings.max_messages} messages "
                "(max_messages_per_session)"
            )
        if err is None and not self.reusable:
            raise UpstreamError("session is closed")
        self._busy = True
        try:
            try:
                if err is not None:
                    # Ended while it waited idle (or before its first use).
                    raise self._stale(
                        UpstreamError(err.reason, err.permanent, err.reply, err.closed)
                    )
                return await self._transaction(message)
            except _StaleSession as stale:
                await self._reconnect(stale)
                return await self._transaction(message)
        except UpstreamError as e:
            self._broken = True
            self._proto.fail(e)
            raise
        except Exception:
            # A bug: the session is in an unknown state.
            self._broken = True
            self._proto.fail(UpstreamError("session abandoned after an internal error"))
            raise
        finally:
            self._busy = False
            self._uses += 1

    def _refusal(
        self, message: OutboundMessage, utf8: bool, eightbit: bool, size: int
    ) -> RecipientResult | None:
        if utf8 and "SMTPUTF8" not in self.extensions:
            return NotSent(
                554,
                STATUS_NEEDS_SMTPUTF8,
                "upstream does not offer SMTPUTF8, which this message needs",
            )
        if eightbit and "8BITMIME" not in self.extensions:
            return NotSent(
                554, STATUS_NEEDS_8BIT, "upstream does not offer 8BITMIME, which this message needs"
            )
        limit = self.size_limit
        if limit is not None and size > limit:
            return NotSent(
                552,
                STATUS_TOO_BIG,
                f"message size {size} exceeds the upstream's limit of {limit} octets",
            )
        if not _valid_address(message.mail_from):
            return NotSent(553, "5.1.7", "invalid sender address")
        return None

    def _stale(self, e: UpstreamError, answered: int = 0) -> UpstreamError:
        """
        *e*, or a :class:`_StaleSession` for it when this session was reused
        (its last transaction ended cleanly) and the upstream ended it before
        accepting anything of the message: *answered* (the replies since
        MAIL was written) is none, or only a 421 to MAIL.  Nothing of the
        message was sent (its bytes go only after a 354), so sending it over
        a new session cannot duplicate it.
        """
        reused = self._uses > 0 and not self._broken
        if not (reused and e.closed and self._reactor is not None and not self._aborted):
            return e
        if answered == 0 or (answered == 1 and e.reply is not None and e.reply.code == 421):
            return _StaleSession(e.reason, e.permanent, e.reply, closed=True)
        return e

    async def _reconnect(self, stale: _StaleSession) -> None:
        """A new connection in place of the stale one, for the same identity."""
        s = self._settings
        log.info(
            "relay: idle session to {where} ended by the upstream before the message "
            "was sent ({reason}); sending it over a new session",
            where=f"{escape(s.host)}:{s.port}",
            reason=stale.reason,
        )
        self._proto.fail(stale)
        d = _run(_connect(self._reactor, s, self.authzid))
        self._connecting = d
        try:
            fresh = await d
        except defer.CancelledError:
            raise UpstreamError("session aborted") from None
        finally:
            self._connecting = None
        if self._aborted:
            fresh.abort()
            raise UpstreamError("session aborted")
        self._proto = fresh._proto
        self.extensions = fresh.extensions
        self.authenticated_as = fresh.authenticated_as
        self.messages = self.transactions = self._uses = 0
        self._broken = False

    async def _one_transaction(self, message: OutboundMessage) -> SendResult:
        s = self._settings
        proto = self._proto
        recipients = list(dict.fromkeys(message.rcpt_to))
        results: dict[str, RecipientResult] = {}
        body = _body(message)
        utf8 = not message.mail_from.isascii() or not all(r.isascii() for r in recipients)
        if message.smtputf8 and not utf8:
            # The client asked for SMTPUTF8 (some do for every message once
            # it is offered): passed on where the upstream has it; where it
            # has not, needed only if a header is UTF-8 (RFC 6531 §3.2),
            # else the message goes as it is, as Postfix sends it.
            utf8 = "SMTPUTF8" in self.extensions or (
                # a walk over every MIME part's header: off the reactor
                # for a large message (0.2 s for 24 MB of delimiters)
                headers_need_utf8(body)
                if len(body) < PIECE
                else await threads.deferToThread(headers_need_utf8, body)
            )
        eightbit = bool(message.eightbit) or not body.isascii()
        if len(body) < PIECE:
            length, wire = wire_pieces(body)  # one piece: no thread round trip
        else:
            length, wire = await threads.deferToThread(wire_pieces, body)
        size = max(int(message.size or 0), length)

        requested: Requested | None = getattr(message, "dsn", None)
        dsn = "DSN" in self.extensions
        refusal = self._refusal(message, utf8, eightbit, size)
        if refusal is not None:
            return SendResult({r: refusal for r in recipients}, dsn=dsn)
        to_send = []
        for r in recipients:
            if _valid_address(r) and r:
                to_send.append(r)
            else:
                results[r] = NotSent(553, "5.1.3", "invalid recipient address")
        if not to_send:
            return SendResult(results, dsn=dsn)

        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={size}")
        if eightbit:
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        if dsn and requested is not None:
            # RFC 3461 §5.2: the sender's wishes travel with the message.
            params += mail_params(requested)
        mail = " ".join([f"MAIL FROM:<{message.mail_from}>", *params]).encode("utf-8")

        def rcpt(r: str) -> bytes:
            if dsn and requested is not None:
                return " ".join([f"RCPT TO:<{r}>", *rcpt_params(requested, r)]).encode()
            return f"RCPT TO:<{r}>".encode()

        # The submitting client, for an upstream that asks for it (Postfix's
        # smtpd_authorized_xforward_hosts): its log and checks see the
        # user's address, not kumoauth's.  Informational: a refusal is no
        # reason not to send.
        attributes = getattr(message, "xforward", None)
        offered = self.extensions.get("XFORWARD")
        forward = xforward_lines(attributes, offered) if attributes and offered else []

        t = s.command_timeout
        go: Reply | None = None
        self.transactions += 1
        mark = proto.replies
        try:
            if "PIPELINING" in self.extensions:
                # RFC 2920: MAIL, every RCPT and DATA in one write, the
                # replies in order.  Every reply is checked: DATA's too (§3.1).
                # XFORWARD may lead the group (Postfix's XFORWARD_README).
                group = [(line, "XFORWARD") for line in forward]
                group += [(mail, "MAIL FROM")] + [(rcpt(r), "RCPT TO") for r in to_send]
                replies = await proto.pipeline([*group, (b"DATA", "DATA")], t)
                for each in replies[: len(forward)]:
                    _raise_421(each, "XFORWARD")
                replies = replies[len(forward) :]
                mail_reply, rcpt_replies, go = replies[0], replies[1:-1], replies[-1]
                _raise_421(mail_reply, "MAIL FROM")
                if mail_reply.positive:
                    for each in rcpt_replies:
                        _raise_421(each, "RCPT TO")
            else:
                for line in forward:
                    _raise_421(await proto.command(line, "XFORWARD", t), "XFORWARD")
                mail_reply = await proto.command(mail, "MAIL FROM", t)
                _raise_421(mail_reply, "MAIL FROM")
                rcpt_replies = []
                if mail_reply.positive:
                    for r in to_send:
                        reply = await proto.command(rcpt(r), "RCPT TO", t)
                        _raise_421(reply, "RCPT TO")
                        rcpt_replies.append(reply)
        except UpstreamError as e:
            raise self._stale(e, proto.replies - mark) from None
        if (
            go is not None
            and go.code == 354
            and not (mail_reply.positive and any(r.positive for r in rcpt_replies))
        ):
            # DATA accepted with no recipient: RFC 2920 §3.1 says send the
            # lone dot; nothing is delivered whatever the reply.
            await proto.send_data(b".\r\n", s.data_timeout)
            go = None
        _raise_530(mail_reply, "MAIL FROM")
        for each in rcpt_replies:
            _raise_530(each, "RCPT TO")

        if not mail_reply.positive:
            for r in to_send:
                results[r] = RecipientResult.of(mail_reply)
            await self._reset()
            return SendResult(self._ordered(recipients, results), dsn=dsn)

        accepted = []
        for r, reply in zip(to_send, rcpt_replies, strict=True):
            if reply.code // 100 not in (2, 4, 5):
                raise UpstreamError(f"protocol error: unexpected reply to RCPT TO: {reply}")
            res = RecipientResult.of(reply)
            if res.code == 552:
                # RFC 5321 §4.5.3.1.10: "too many recipients" was 552 in RFC
                # 821; clients SHOULD take it as 452 (as Postfix does).
                res = RecipientResult(452, _transient(res.enhanced), res.text)
            results[r] = res
            if res.delivered:
                accepted.append(r)
        result = SendResult(self._ordered(recipients, results), dsn=dsn)
        if not accepted:
            await self._reset()
            return result

        if go is None:
            go = await proto.command(b"DATA", "DATA", t)
        _raise_421(go, "DATA")
        _raise_530(go, "DATA")
        if go.code != 354:
            if go.positive:
                raise UpstreamError(f"protocol error: unexpected reply to DATA: {go}")
            for r in accepted:
                result.recipients[r] = RecipientResult.of(go)
            await self._reset()
            return result

        final = await proto.send_data(wire, s.data_timeout)
        _raise_421(final, "the end of data")
        _raise_530(final, "the end of data")
        if final.code // 100 not in (2, 4, 5):
            raise UpstreamError(f"protocol error: unexpected reply to the end of data: {final}")
        result.data_sent = True
        result.final = RecipientResult.of(final)
        for r in accepted:
            result.recipients[r] = result.final
        self.messages += 1
        # RFC 5321 §4.1.1.4: the reply to the end of data ends the
        # transaction; no RSET is needed before the next MAIL.
        return result

    async def _transaction(self, message: OutboundMessage) -> SendResult:
        """
        One message: a transaction, and while the upstream answered some
        recipients "too many recipients" (``452 4.5.3``; RFC 821's ``552``
        is taken as it) and took the message for the others, another
        transaction for the rest, now (RFC 5321 §4.5.3.1.10), as long as
        the session may carry one more.  A failure in a follow-up leaves
        the recipients it was for deferred and ends the session: the ones
        before have the message, which must not go to them twice.
        """
        result = await self._one_transaction(message)
        sent = list(result.recipients)
        while not self.exhausted:
            rest = [r for r in sent if _too_many(result.recipients[r])]
            if not rest or not any(result.recipients[r].delivered for r in sent):
                break
            follow_up = Message(
                mail_from=message.mail_from,
                rcpt_to=rest,
                body=_body(message),
                size=int(message.size or 0),
                smtputf8=bool(message.smtputf8),
                eightbit=bool(message.eightbit),
                dsn=getattr(message, "dsn", None),
            )
            try:
                more = await self._one_transaction(follow_up)
            except UpstreamError as e:
                self._broken = True
                self._proto.fail(e)
                reason = NotSent(451, "4.4.2", f"not sent: {e.reason}")
                result.recipients.update(dict.fromkeys(rest, reason))
                break
            result.recipients.update(more.recipients)
            sent = rest
        return result

    @staticmethod
    def _ordered(
        recipients: list[str], results: dict[str, RecipientResult]
    ) -> dict[str, RecipientResult]:
        return {r: results[r] for r in recipients if r in results}

    async def _reset(self) -> None:
        """RSET after a transaction; a failure only costs the session, not the result."""
        try:
            reply = await self._proto.command(b"RSET", "RSET", self._settings.command_timeout)
        except UpstreamError:
            self._broken = True
            return
        if not reply.positive:
            self._broken = True
            self._proto.fail(UpstreamError(f"upstream refused RSET: {reply}"))

    # -- ending -----------------------------------------------------------------

    def close(self) -> defer.Deferred[None]:
        """Send QUIT and close the connection; never fails."""
        return _run(self._close())

    async def _close(self) -> None:
        proto = self._proto
        if not proto.connected_:
            return
        proto.closing = True
        if proto.error is None and not self._busy:
            try:
                await proto.command(b"QUIT", "QUIT", min(self._settings.command_timeout, 10.0))
            except UpstreamError:
                pass
        if proto.connected_ and proto.transport is not None:
            proto.transport.loseConnection()
        await proto.when_lost()

    def abort(self) -> None:
        """Drop the connection at once (and a new one being made)."""
        self._aborted = True
        self._proto.closing = True
        self._proto.fail(UpstreamError("session aborted"))
        if self._connecting is not None:
            self._connecting.cancel()


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _trust_root(ca_file: str | None) -> Any:
    try:
        return trust_root(ca_file)
    except ValueError as e:
        raise UpstreamError(f"cannot load {escape(str(e), 300)}") from None


def tls_options(settings: ClientSettings) -> Any:
    """The client TLS options: certificate verified against ``ca_file`` and the name."""
    return ssl.optionsForClientTLS(
        settings.tls_name or settings.host,
        trustRoot=_trust_root(settings.ca_file),
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
    )


_HELO_NAME = re.compile(r"[A-Za-z0-9._:\[\]-]+")


def connect(reactor: Any, settings: Any, authzid: str | None) -> defer.Deferred[UpstreamSession]:
    """
    Open a session to the upstream: TCP, greeting, EHLO, TLS (STARTTLS or
    implicit, always verified), EHLO again, AUTH PLAIN as
    ``settings.username`` with *authzid* (when a user name is configured).
    Fails with :class:`UpstreamError`.  *settings* is a
    :class:`ClientSettings` or anything :func:`client_settings` takes.
    """
    try:
        flat = client_settings(settings)
    except TypeError as e:
        return defer.fail(e)
    return _run(_connect(reactor, flat, authzid))


async def _connect(reactor: Any, s: ClientSettings, authzid: str | None) -> UpstreamSession:
    if s.tls not in ("starttls", "implicit", "none"):
        raise UpstreamError(f"unknown relay tls mode {escape(s.tls)}")
    if s.tls == "none" and not (s.allow_plaintext or _is_loopback(s.host)):
        raise UpstreamError(
            f"refusing a plaintext relay session to {escape(s.host)}: "
            "tls = none is only allowed to a loopback address without allow_plaintext"
        )
    if not _HELO_NAME.fullmatch(s.helo_name):
        raise UpstreamError(f"unusable EHLO name {escape(s.helo_name)}")
    options = None if s.tls == "none" else tls_options(s)
    where = f"{escape(s.host)}:{s.port}"
    endpoint = HostnameEndpoint(reactor, s.host, s.port, timeout=s.connect_timeout)
    factory = _ClientFactory(
        reactor, options if s.tls == "implicit" else None, s.tls_name or s.host
    )
    try:
        proto = await endpoint.connect(factory)
    except error.ConnectionRefusedError:
        raise UpstreamError(f"connection to {where} refused") from None
    except (error.TimeoutError, defer.TimeoutError):
        raise UpstreamError(
            f"connection to {where} timed out after {s.connect_timeout:g} s"
        ) from None
    except error.DNSLookupError as e:
        raise UpstreamError(f"cannot resolve {escape(s.host)}: {escape(str(e), 200)}") from None
    except Exception as e:  # noqa: BLE001 - any failure to connect defers the message
        raise UpstreamError(f"cannot connect to {where}: {escape(str(e), 200)}") from None
    assert isinstance(proto, _ClientProtocol)
    session = UpstreamSession(proto, s, authzid, reactor)
    try:
        await session._open(options)
    except UpstreamError as e:
        # Its reason is the caller's to log (the scheduler's one line per
        # attempt says it).
        proto.fail(e)
        raise
    except BaseException:
        # Cancelled (a stop) or a bug: do not leave the connection behind.
        proto.fail(UpstreamError("session setup abandoned"))
        raise
    log.info(
        "relay: session to {where} ({tls}) authenticated as {authc} for {authzid}",
        where=where,
        tls=session.tls_version or "plaintext",
        authc=escape(session.authenticated_as),
        authzid=escape(authzid),
    )
    return session


__all__ = [
    "Message",
    "OutboundMessage",
    "RecipientResult",
    "ClientSettings",
    "IdentityRefused",
    "Reply",
    "ReplyError",
    "ReplyParser",
    "SendResult",
    "UpstreamError",
    "UpstreamSession",
    "client_settings",
    "connect",
    "crlf_body",
    "dot_stuff",
    "format_reply",
    "parse_ehlo",
    "parse_replies",
    "parse_reply",
    "size_limit",
    "tls_options",
]
