"""
The message half of SMTP, as pure code: reading DATA (RFC 5321 §4.1.1.4,
§4.5.2), bare line endings (§2.3.8) and the trace header (§4.4).

No I/O here; the protocol feeds bytes in and gets a message out.
"""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime

from kumoauth.stamps import PerSecond

#: RFC 5321 §4.1.1.4: the only end of data.
TERMINATOR = b"\r\n.\r\n"


class DataReader:
    """
    Reads one message from the bytes after ``354``: finds the terminating
    CRLF "." CRLF, removes the transparency dots (RFC 5321 §4.5.2) as the
    bytes arrive, and counts the size of the *unstuffed* message.

    Memory is bounded by *max_size* plus one partial line: complete lines
    are unstuffed and appended to the message as they come, and once the
    message is over *max_size* nothing more is kept but the few bytes the
    terminator search needs.  A bare CR or LF never ends or splits a line
    here; see :func:`has_bare_newline`.

    Bare line ends are found as the lines come (:attr:`bare`) and, with
    *normalize*, rewritten there (:func:`normalize_newlines`): no piece
    taken parts a CR from the LF after it, so each can be looked at alone,
    and the end of DATA does not go over a whole message again (a tenth
    of a second for 24 MB, half a second for 24 MB of bare line ends, with
    every other session waiting).  A piece ends before a CRLF, or inside
    a line longer than *piece* that has none.
    """

    __slots__ = (
        "max_size",
        "normalize",
        "piece",
        "bare",
        "_body",
        "_raw",
        "_scanned",
        "size",
        "too_big",
    )

    def __init__(self, max_size: int, normalize: bool = False, piece: int = 65536) -> None:
        self.max_size = max_size
        self.normalize = normalize
        #: how long a line without CRLF grows before it is taken in part
        self.piece = piece
        #: a bare CR or LF was seen (RFC 5321 §2.3.8)
        self.bare = False
        self._body = bytearray()
        # Unprocessed wire bytes, always starting at a line boundary: a CRLF
        # sentinel first, so the first line is no exception and an empty
        # message ends with the same CRLF "." CRLF as any other.
        self._raw = bytearray(b"\r\n")
        self._scanned = 0
        #: unstuffed octets so far, CRLFs included
        self.size = 0
        self.too_big = False

    def feed(self, buf: bytearray) -> bool:
        """
        Take message bytes from the front of *buf*.  Returns True once the
        end of data was found; what follows it stays in *buf* (the next
        commands, when pipelined).
        """
        raw = self._raw
        start = len(raw)
        raw += buf
        end = raw.find(TERMINATOR, max(0, self._scanned - 4))
        if end >= 0:
            del buf[: end + len(TERMINATOR) - start]
            del raw[end + 2 :]  # keep the CRLF that ends the last line
            self._take(len(raw))
            return True
        buf.clear()
        if self.too_big:
            del raw[:-4]  # only the terminator search matters now
            self._scanned = len(raw)
            return False
        # Everything before the last CRLF is whole lines: unstuff them now.
        # No "\r\n." can straddle that cut: it would need a CRLF after it.
        # Only the new bytes are searched (and the CR the last chunk may
        # have ended with): what came before holds no CRLF but the one at
        # its start, and a line without one, fed in small chunks, made
        # the whole search quadratic (a 25 MB line: minutes of CPU).
        cut = raw.rfind(b"\r\n", max(0, start - 1))
        if cut > 0:
            self._take(cut)
        elif len(raw) > max(self.piece, 6):
            # A line without CRLF (24 MB of bare CRs is one) is taken in
            # pieces as it comes, not rewritten whole at the end of DATA.
            # What stays starts mid-line (past the line's first octet, so
            # no dot there is a stuffed one); the last 4 octets stay for
            # the terminator's start, and no CR is parted from an LF (there
            # is no CRLF here but at the start).
            self._take(len(raw) - 4)
        self._scanned = len(raw)
        # The partial line loses at most its one stuffed dot.
        if self.size + len(raw) - 3 > self.max_size:
            self._overflow()
        return False

    def _take(self, n: int) -> None:
        if self.too_big:
            del self._raw[:n]
            return
        chunk = bytes(self._raw[:n]).replace(b"\r\n.", b"\r\n")
        del self._raw[:n]
        first = self.size == 0
        self.size += len(chunk)
        if has_bare_newline(chunk):
            self.bare = True
            if self.normalize:
                chunk = normalize_newlines(chunk)
        self._body += chunk
        if first:
            del self._body[:2]  # the CRLF sentinel (O(1) at a bytearray's start)
        if self.size - 2 > self.max_size:
            self._overflow()

    def _overflow(self) -> None:
        self.too_big = True
        self._body = bytearray()
        del self._raw[:-4]
        self._scanned = len(self._raw)

    def message(self) -> bytearray:
        """
        The unstuffed message, each line ending as received (with
        *normalize*, as CRLF), once :meth:`feed` returned True; empty if it
        was too big.  It is the reader's own buffer, not a copy: as bytes
        it would be one more copy of the whole message on the reactor.
        """
        if self.too_big:
            return bytearray()
        return self._body

    @property
    def message_size(self) -> int:
        """
        Unstuffed octets read so far (exact once the end was found, unless
        the message was too big).
        """
        return max(0, self.size - 2)


def has_bare_newline(data: bytes) -> bool:
    """
    True if *data* has a CR not followed by LF or an LF not preceded by CR
    (RFC 5321 §2.3.8), the material of SMTP smuggling.
    """
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def normalize_newlines(data: bytes) -> bytes:
    """
    Every bare CR and bare LF becomes CRLF, so the message has one kind of
    line end; a lone "." after a bare LF becomes an ordinary line that is
    dot-stuffed when the message is sent on.
    """
    if not has_bare_newline(data):
        return data
    # byte replacements, not a regex substitution per line end (seconds
    # for 25 MB of bare CRs)
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


#: a line that belongs to the header section: a field (a name, then the
#: spaces or tabs before its colon that RFC 5322 §4.5's obsolete syntax
#: allows), a folded continuation, or an mbox ``From `` line
HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*[ \t]*:|[\t ]")
#: the first line that does not (an empty one included): where the header
#: section ends, as the stdlib parser and Postfix's cleanup read it
HEADER_END = re.compile(rb"^(?!" + HEADER_LINE.pattern + rb")", re.MULTILINE)


def header_section_over(message: bytes | bytearray, limit: int) -> bool:
    """
    True when the header section of *message* (its lines up to the first
    that is not a header line, :data:`HEADER_END`) is longer than *limit*
    octets.  Reads the first *limit* + 1 octets, and the rest of the line
    they end in.
    """
    if len(message) <= limit:
        return False
    end = HEADER_END.search(message, 0, limit + 1)
    if end is None or end.start() > limit:
        return True
    cut = end.start()
    if message.find(b"\n", cut, limit + 1) >= 0:
        return False  # a whole line that is no header line: the end
    # The bound cut that line short, and it only looked like no header
    # line: read whole (one scan to its end), it may be one, with a long
    # name; then the header section goes on past the limit.
    line_end = message.find(b"\n", cut)
    return HEADER_LINE.match(message, cut, len(message) if line_end < 0 else line_end) is not None


def protocol_type(esmtp: bool, tls: bool, authenticated: bool, utf8: bool) -> str:
    """
    The ``with`` keyword of a Received header: RFC 3848 (ESMTP, ESMTPS,
    ESMTPA, ESMTPSA) and RFC 6531 §3.7.3 (UTF8SMTP…) for SMTPUTF8 mail.
    """
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if utf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


#: the RFC 5322 date of a ``Received:`` header, in UTC: ``trace_date()``
#: for now, ``trace_date(t)`` for *t*
trace_date = PerSecond(
    lambda second: email.utils.format_datetime(datetime.fromtimestamp(second, UTC))
)


def received_header(
    helo: str,
    ip: str,
    hostname: str,
    protocol: str,
    message_id: str,
    date: str,
    tls_version: str | None = None,
    tls_cipher: str | None = None,
) -> bytes:
    """
    The RFC 5321 §4.4 trace header kumoauth prepends to every message.

    *helo* must already be a validated Domain or address literal (the
    protocol refuses anything else with 501), so no client byte can end
    the header early or add one.
    """
    literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
    tls = ""
    if tls_version:
        tls = f"\r\n\t(using {tls_version} with cipher {tls_cipher})"
    return (
        f"Received: from {helo} ({literal})\r\n"
        f"\tby {hostname} (kumoauth) with {protocol} id {message_id}{tls};\r\n"
        f"\t{date}\r\n"
    ).encode("utf-8", "replace")


#: the header kumoauth signs for the upstream (``[relay] identity = "header"``)
IDENTITY_HEADER = b"x-kumoauth-identity"

# A field's value runs to the first CRLF not followed by a space or tab
# (its folds continue it); a bare CR inside it is part of the value.  The
# repeats are possessive: nothing after them can match what they gave up,
# and without the backtracking state a field of 6 million folded lines
# took 6.5 s instead of 0.3.
_VALUE = rb"[^\r]*+(?:\r(?!\n)[^\r]*+)*+"
# Field names are matched at a CRLF, so the search has a literal prefix to
# skip ahead with: "(?m)^" with IGNORECASE tries every position, a quarter
# of a second for 25 MB of header lines, on the reactor.
_IDENTITY_FIELD = re.compile(
    rb"(?i)\r\nx-kumoauth-identity[ \t]*+:" + _VALUE + rb"(?:\r\n[ \t]" + _VALUE + rb")*+"
)
_MESSAGE_ID_NAME = re.compile(rb"(?i)\r\nmessage-id[ \t]*:")
_FIELD_END = re.compile(rb"\r\n(?![ \t])")
_FOLD = re.compile(rb"\r\n[ \t]")
#: longest Message-ID a log line carries (RFC 5322 puts no bound on it)
MESSAGE_ID_LIMIT = 256
#: how much of a Message-ID field is read: its value, folds and all, is
#: cut to MESSAGE_ID_LIMIT characters, so reading on is wasted work (an
#: unfolded 25 MB field took 5 seconds)
_MESSAGE_ID_READ = MESSAGE_ID_LIMIT * 16


def _header_section(message: bytes | bytearray) -> tuple[bytes, int]:
    """
    The header section with a CRLF put before it, so that every field
    starts after one, and where it ends in *message*: after the CRLF of
    its last field, or at the end if there is no blank line.
    """
    end = message.find(b"\r\n\r\n")
    head_end = len(message) if end < 0 else end + 2
    return b"\r\n" + message[:head_end], head_end


def message_id(message: bytes | bytearray) -> str | None:
    """
    The first ``Message-ID`` field of the header section, unfolded and
    stripped (as text, for a log line: the caller escapes it), or None.
    """
    head, _ = _header_section(message)
    m = _MESSAGE_ID_NAME.search(head)
    if m is None:
        return None
    raw = head[m.end() : m.end() + _MESSAGE_ID_READ]
    end = _FIELD_END.search(raw)
    value = _FOLD.sub(b" ", raw if end is None else raw[: end.start()]).strip()
    return value[: MESSAGE_ID_LIMIT * 4].decode("utf-8", "replace") or None


def strip_identity_header(message: bytes | bytearray) -> bytes | bytearray:
    """
    Remove every ``X-Kumoauth-Identity`` field (with its folded lines) from
    the header section: only kumoauth writes that header, so a client must
    never be able to bring one of its own.
    """
    head, head_end = _header_section(message)
    # each field goes with the CRLF before it; the one put first comes off
    stripped, n = _IDENTITY_FIELD.subn(b"", head)
    return message if n == 0 else stripped[2:] + message[head_end:]
