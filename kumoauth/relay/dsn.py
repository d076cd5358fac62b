"""
Delivery status notifications (bounces), as pure code: RFC 3464 reports in
an RFC 6522 ``multipart/report``, with the internationalized variants of
RFC 6533 for SMTPUTF8 mail.

The relay calls :func:`build_dsn` when recipients failed for good (a 5xx
reply, a 4xx one that outlived the queue's maximum age, or a reason of the
relay's own such as an upstream without SMTPUTF8) or are delayed, or were
relayed to an upstream without DSN while the sender asked to hear of
success (RFC 3461 §5.2.2, ``NOTIFY=SUCCESS``), and sends
what it returns from the null reverse-path ``<>`` to the envelope sender,
through the same upstream.  ``None`` means "send nothing": a bounce is never
bounced (RFC 5321 §6.1, RFC 3834 §2).

Every value that came from elsewhere (an address, the upstream's reply, a
host name) is made one printable line before it becomes a field, so neither
the upstream nor a sender can end a field early and add one; every line of
the result ends with CRLF and is at most 998 octets (RFC 5322 §2.1.1).

No I/O here.
"""

from __future__ import annotations

import binascii
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32, default
from email.utils import format_datetime
from typing import Literal

from kumoauth.smtp.dsnparams import utf8_address

#: RFC 5322 §2.1.1: the hard limit on a line, CRLF excluded.
MAX_LINE = 998

#: RFC 5322 §2.1.1: the recommended limit, which folding aims for.
FOLD_WIDTH = 78

#: Where the human part's lines are wrapped (under quoted-printable's 76).
HUMAN_WIDTH = 72

#: Longest Content-Type value looked at for a report's type, in characters
MAX_CONTENT_TYPE = 2048

#: Longest diagnostic kept, in characters: an upstream's multi-line reply
#: says all it has to say well before this.
MAX_DIAGNOSTIC = 2000

#: Largest original returned whole (RFC 3461's RET=FULL), in octets, as
#: Postfix's ``bounce_size_limit``: a larger one returns its header
#: section, so that a report stays small enough to be delivered.
FULL_RETURN_LIMIT = 50_000

#: RFC 3463 status codes for failures of the relay's own making.
STATUS_EXPIRED = "4.4.7"  # §3.5: delivery time expired (with Action: failed)
STATUS_TOO_BIG = "5.3.4"  # §3.4: message too big for system
STATUS_NEEDS_SMTPUTF8 = "5.6.7"  # RFC 6531 (registered per RFC 5248): non-ASCII not permitted
STATUS_NEEDS_8BIT = "5.6.3"  # §3.7: conversion required but not supported

Action = Literal["failed", "delayed", "relayed"]
ReturnContent = Literal["headers", "full"]

#: RFC 3463 §2: class "." subject "." detail.
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")

#: An SMTP reply (RFC 5321 §4.2): three digits, then a space, a hyphen or
#: nothing.  Such a diagnostic is of type "smtp" (RFC 3464 §2.3.6).
_SMTP_REPLY = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")

#: RFC 3463 §3: a few subjects and details worth a word to a human.
_STATUS_TEXT = {
    "0.0": "other or undefined status",
    "1.1": "bad destination mailbox address",
    "1.2": "bad destination system address",
    "1.3": "bad destination mailbox address syntax",
    "1.7": "bad sender's mailbox address syntax",
    "2.1": "mailbox disabled, not accepting messages",
    "2.2": "mailbox full",
    "3.4": "message too big for system",
    "4.1": "no answer from host",
    "4.2": "bad connection",
    "4.7": "delivery time expired",
    "5.3": "too many recipients",
    "6.7": "non-ASCII addresses not permitted",
    "7.1": "delivery not authorized, message refused",
}

_LINE_END = re.compile(rb"\r\n|\r|\n")
_ENVID = "Original-Envelope-Id:"
_ORCPT = "Original-Recipient:"
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HOSTNAME = re.compile(r"[A-Za-z0-9_.:\[\]-]+")
_QUEUE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class FailedRecipient:
    """
    One recipient to report on: a per-recipient block of RFC 3464 §2.3.
    """

    #: the envelope recipient (RCPT TO), without angle brackets
    address: str
    #: RFC 3463 enhanced status code, e.g. "5.1.1"
    status: str
    #: RFC 3464 §2.3.3: "failed" (given up), "delayed" (still retrying) or
    #: "relayed" (handed to a system that reports no further)
    action: Action = "failed"
    #: the upstream's reply, e.g. "550 5.1.1 no such user", or a reason of
    #: the relay's own; None if there is none
    diagnostic: str | None = None
    #: the upstream host that gave *diagnostic* (RFC 3464 §2.3.5)
    remote_mta: str | None = None
    #: when delivery was last tried (RFC 3464 §2.3.7)
    last_attempt: datetime | None = None
    #: for "delayed": when the relay gives up (RFC 3464 §2.3.9)
    will_retry_until: datetime | None = None
    #: the sender's ORCPT (RFC 3461 §4.2) as (address type, address)
    original: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.action not in ("failed", "delayed", "relayed"):
            raise ValueError(
                f"action must be 'failed', 'delayed' or 'relayed', not {self.action!r}"
            )
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"not an RFC 3463 status code: {self.status!r}")
        if self.action == "delayed" and not self.status.startswith("4"):
            raise ValueError("a delayed recipient needs a 4.x.x status (RFC 3464 §2.3.4)")
        if (self.action == "relayed") != self.status.startswith("2"):
            raise ValueError("only a relayed recipient has a 2.x.x status, and it must")


def build_dsn(
    *,
    reporting_mta: str,
    message_id: str,
    envelope_from: str,
    arrival: datetime,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    return_content: ReturnContent = "headers",
    now: datetime | None = None,
    smtputf8: bool = False,
    envid: str | None = None,
) -> bytes | None:
    """
    The delivery status notification for *recipients* of the message queued
    as *message_id*, to send from ``<>`` to *envelope_from*: a complete
    RFC 5322 message, CRLF line ends, or ``None`` when no notification may
    be sent:

    * *envelope_from* is null (``""`` or ``<>``; angle brackets around
      an address are optional): the message is itself a
      notification, and notifications are never answered (RFC 5321 §4.5.5,
      §6.1).
    * *original* says it is a delivery report (``multipart/report`` with
      ``report-type=delivery-status`` or ``global-delivery-status``) that
      came with a sender anyway: a loop in the making.

    ``Auto-Submitted`` does not stop a bounce: RFC 3834 governs automatic
    responses, not delivery reports (its §1.2), and an automatic message
    sent from a real address has a sender to tell, as Postfix tells it.

    The message is an RFC 6522 ``multipart/report`` with three parts: a
    human explanation, the ``message/delivery-status`` report (RFC 3464 §2)
    and the original's header section (``text/rfc822-headers``) or, with
    *return_content* ``"full"``, the whole original (``message/rfc822``).

    With *smtputf8* (the original came with SMTPUTF8, or the sender's
    address is not ASCII, which implies it) the report uses RFC 6533's
    types: ``message/global-delivery-status``, the ``utf-8`` address type,
    ``message/global-headers`` or ``message/global``; it must then be sent
    with SMTPUTF8.  Otherwise the report is 7-bit, except a ``"full"``
    return of an 8-bit original, which needs BODY=8BITMIME (RFC 6152):
    check ``result.isascii()``.

    *envid* is the sender's ENVID (RFC 3461 §4.4), returned as
    ``Original-Envelope-Id``; a recipient's ``original`` (its ORCPT) as
    its ``Original-Recipient``.  A report on relayed recipients returns
    only the original's header section, whatever *return_content* says,
    and so does one whose original is over :data:`FULL_RETURN_LIMIT`
    octets (its human part says so).

    Raises ValueError if *recipients* is empty, mixes relayed recipients
    with others, or *reporting_mta* is not a host name.
    """
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    relayed = [r.action == "relayed" for r in recipients]
    if any(relayed) and not all(relayed):
        raise ValueError("relayed recipients are reported apart from failed or delayed ones")
    if relayed[0]:
        return_content = "headers"
    too_large = return_content == "full" and len(original) > FULL_RETURN_LIMIT
    if too_large:
        return_content = "headers"
    if not _HOSTNAME.fullmatch(reporting_mta):
        raise ValueError(f"reporting MTA is not a host name: {reporting_mta!r}")
    sender = envelope_from.strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1].strip()
    if not sender:
        return None
    original = _LINE_END.sub(b"\r\n", original)
    headers = header_section(original)
    if is_report(headers):
        return None
    if now is None:
        now = datetime.now(UTC)
    utf8 = smtputf8 or not sender.isascii()

    returned, whole = _returned_part(original, headers, return_content, utf8)
    text = _human_part(reporting_mta, message_id, arrival, recipients, whole, too_large)
    status = _status_part(reporting_mta, message_id, arrival, recipients, utf8, envid)
    parts = [text, status, returned]

    boundary = _boundary(p.body for p in parts)
    if relayed[0]:
        subject = "Successful Mail Relay Report"
    elif all(r.action == "delayed" for r in recipients):
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Undelivered Mail Returned to Sender"
    eight_bit = any(p.encoding == "8bit" for p in parts)
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{_clean(sender, ascii_only=not utf8)}>",
        f"Subject: {subject}",
        f"Date: {format_datetime(_aware(now))}",
        f"Message-ID: <{_unique_id(message_id)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type="
        + ("global-delivery-status" if utf8 else "delivery-status")
        + f'; boundary="{boundary}"',
    ]
    if eight_bit:
        top.append("Content-Transfer-Encoding: 8bit")
    out = bytearray()
    for field in top:
        out += _fold(field).encode("utf-8")
    out += b"\r\nThis is a MIME-encapsulated delivery status notification.\r\n"
    for part in parts:
        out += b"\r\n--" + boundary.encode("ascii") + b"\r\n"
        out += part.head + b"\r\n" + part.body
    out += b"\r\n--" + boundary.encode("ascii") + b"--\r\n"
    return bytes(out)


def header_section(message: bytes) -> bytes:
    """
    The header section of *message* (RFC 5322 §2.1): everything up to the
    first empty line, every line ending with CRLF; empty if *message*
    starts with one.  *message* must have CRLF line ends already.
    """
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message if message.endswith(b"\r\n") or not message else message + b"\r\n"
    return message[: end + 2]


def is_report(headers: bytes) -> bool:
    """
    True if the header section *headers* belongs to a delivery report (RFC
    3464 §2, RFC 6533 §4), which must not be answered with another.
    """
    fields = BytesHeaderParser(policy=compat32).parsebytes(headers)
    content_type = fields.get("Content-Type")
    if content_type is None:
        return False
    return _report_type(str(content_type)) in ("delivery-status", "global-delivery-status")


def _report_type(content_type: str) -> str | None:
    """
    The ``report-type`` of a ``multipart/report`` Content-Type value
    (RFC 6522 §3), lower case, RFC 2231 continuations and charsets
    undone; None for any other type.
    """
    # a real one is short; the stdlib parser is quadratic on some long ones
    unfolded = re.sub(r"\r?\n", "", content_type[:MAX_CONTENT_TYPE])
    try:
        header = default.header_factory("Content-Type", unfolded)
    except Exception:  # the stdlib parser has had crashes on malformed values
        return None
    if header.content_type != "multipart/report":
        return None
    value = header.params.get("report-type")
    return value.strip().lower() if isinstance(value, str) else None


def encode_address(address: str, utf8: bool) -> str:
    """
    *address* as the value of a Final-Recipient field (RFC 3464 §2.3.2):
    ``rfc822; addr`` when it is printable ASCII without spaces, otherwise
    RFC 6533 §3's ``utf-8; …`` with every character that may not appear
    as ``\\x{HEX}``: in 7-bit reports (``utf8`` False) the ``utf-8-addr-xtext``
    form, in global ones ``utf-8-addr-unitext``.  Either way the result is
    one line of printable characters and decodes back to *address*.
    """
    if address and all("!" <= ch <= "~" for ch in address):
        return "rfc822; " + address
    return "utf-8; " + utf8_address(address, utf8)


def _original(kind: str, address: str, utf8: bool) -> str:
    """
    An ORCPT as an Original-Recipient value (RFC 3464 §2.3.1): its type and
    address as the sender gave them (an ``rfc822`` one holds printable
    ASCII and SPACE, as dsnparams lets through, runs of spaces kept); a
    ``utf-8`` one, or an address with anything else, as
    :func:`encode_address` writes it.
    """
    if kind == "utf-8" or not (address.isascii() and address.isprintable()):
        return "utf-8; " + utf8_address(address, utf8)
    return f"{_clean(kind, ascii_only=True)}; {address}"


@dataclass(frozen=True)
class _Part:
    head: bytes
    body: bytes
    encoding: str  # "7bit", "8bit" or "quoted-printable"


def _human_part(
    reporting_mta: str,
    message_id: str,
    arrival: datetime,
    recipients: Sequence[FailedRecipient],
    whole: bool,
    too_large: bool = False,
) -> _Part:
    """
    RFC 6522 §3: the first part, for people; *whole* if the whole message
    is returned, not just its header section.
    """
    failed = [r for r in recipients if r.action == "failed"]
    delayed = [r for r in recipients if r.action == "delayed"]
    relayed = [r for r in recipients if r.action == "relayed"]
    lines = [f"This is the mail delivery system at {reporting_mta}.", ""]
    if relayed:
        lines += [
            "Your message was handed on for the recipients below, as you asked to "
            "be told. The system it went to sends no delivery reports, so this may "
            "be the last you hear of it; a failure further on may still be reported.",
            "",
        ]
        lines += _describe(relayed)
    if failed:
        lines += [
            "Your message could not be delivered to the recipients below. "
            "Delivery has been given up; the message will not be retried.",
            "",
        ]
        lines += _describe(failed)
    if delayed:
        lines += [
            "Your message has not yet been delivered to the recipients below. "
            "Delivery is still being tried; you do not need to send it again.",
            "",
        ]
        lines += _describe(delayed)
    lines += [
        f"Queue ID: {_clean(message_id, ascii_only=False)}",
        f"Arrived: {format_datetime(_aware(arrival))}",
        "",
        ("Your message is too large to be returned whole. " if too_large else "")
        + "A technical report and "
        + ("your message" if whole else "the header section of your message")
        + " follow.",
    ]
    text = "".join(_wrap(line) for line in lines)
    data = text.encode("utf-8")
    if data.isascii():
        return _Part(b'Content-Type: text/plain; charset="us-ascii"\r\n', data, "7bit")
    return _Part(
        b'Content-Type: text/plain; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        _quoted_printable(data),
        "quoted-printable",
    )


def _describe(recipients: Iterable[FailedRecipient]) -> list[str]:
    lines = []
    for r in recipients:
        detail = _STATUS_TEXT.get(r.status.split(".", 1)[1], "")
        if r.action == "relayed":
            detail = "relayed"
        what = f"{r.status} {detail}".rstrip()
        lines.append(f"<{_clean(r.address, ascii_only=False)}>: {what}")
        said = _clean(r.diagnostic or "", ascii_only=False, limit=MAX_DIAGNOSTIC)
        remote = _clean(r.remote_mta or "", ascii_only=False)
        if said and remote:
            lines.append(f"    {remote} said: {said}")
        elif said:
            lines.append(f"    not sent: {said}")
        if r.will_retry_until is not None:
            until = format_datetime(_aware(r.will_retry_until))
            lines.append(f"    Will be retried until {until}")
        lines.append("")
    return lines


def _status_part(
    reporting_mta: str,
    message_id: str,
    arrival: datetime,
    recipients: Sequence[FailedRecipient],
    utf8: bool,
    envid: str | None = None,
) -> _Part:
    """
    RFC 3464 §2.1: the per-message fields, then one block per recipient,
    each block ending with an empty line.
    """
    ascii_only = not utf8
    fields = []
    if envid is not None:
        # RFC 3464 §2.2.1: the ENVID decoded, in its "original case and
        # spelling", spaces included (dsnparams lets only printable ASCII
        # and SPACE through; anything else is escaped)
        if not (envid.isascii() and envid.isprintable()):
            envid = _clean(envid, ascii_only=True)
        fields.append(f"{_ENVID} {envid}")
    fields += [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Kumoauth-Queue-ID: {_clean(message_id, ascii_only)}",
        f"Arrival-Date: {format_datetime(_aware(arrival))}",
    ]
    blocks = [fields]
    for r in recipients:
        block = []
        if r.original is not None:
            block.append(f"Original-Recipient: {_original(*r.original, utf8)}")
        block += [
            f"Final-Recipient: {encode_address(r.address, utf8)}",
            f"Action: {r.action}",
            f"Status: {r.status}",
        ]
        remote = _clean(r.remote_mta or "", ascii_only)
        if remote:
            block.append(f"Remote-MTA: dns; {remote}")
        said = _clean(r.diagnostic or "", ascii_only, limit=MAX_DIAGNOSTIC)
        if said:
            kind = "smtp" if _SMTP_REPLY.match(said) else "X-Kumoauth"
            block.append(f"Diagnostic-Code: {kind}; {said}")
        if r.last_attempt is not None:
            block.append(f"Last-Attempt-Date: {format_datetime(_aware(r.last_attempt))}")
        if r.will_retry_until is not None:
            block.append(f"Will-Retry-Until: {format_datetime(_aware(r.will_retry_until))}")
        blocks.append(block)
    # What the sender gave (the envelope id, an original recipient) goes
    # as given: unfolded, where folding would make its runs of spaces one.
    body = "\r\n".join("".join(map(_status_field, block)) for block in blocks)
    data = body.encode("utf-8")
    kind = "message/global-delivery-status" if utf8 else "message/delivery-status"
    head = f"Content-Type: {kind}\r\n"
    if data.isascii():
        return _Part(head.encode("ascii"), data, "7bit")
    # RFC 6533 §6.4: 8bit is what global reports are meant to use.
    return _Part((head + "Content-Transfer-Encoding: 8bit\r\n").encode("ascii"), data, "8bit")


def _status_field(field: str) -> str:
    """One delivery-status field with CRLF: folded, but a sender's value."""
    if field.startswith((_ENVID, _ORCPT)) and _octets(field) <= MAX_LINE:
        return field + "\r\n"
    return _fold(field)


def _returned_part(
    original: bytes, headers: bytes, what: ReturnContent, utf8: bool
) -> tuple[_Part, bool]:
    """
    The third part (RFC 6522 §3; RFC 3461 §4.3's RET): the whole original
    when asked and it can travel as it is, else its header section.

    ``message/rfc822`` may only be 7bit or 8bit (RFC 2046 §5.2.1), so a
    full original with NULs or lines over 998 octets is returned as headers
    only; ``text/rfc822-headers`` (RFC 6522 §4) and the global types (RFC
    6532 §3.7, RFC 6533 §6.3) take quoted-printable when they need it.
    ``text/rfc822-headers`` is kept 7-bit, so that a report on ASCII mail
    needs no 8BITMIME for its header section.  The flag is True if the
    part is the whole original.
    """
    if what == "full":
        kind = "message/global" if utf8 else "message/rfc822"
        if _fits(original, "7bit"):
            return _plain(kind, original, "7bit"), True
        if _fits(original, "8bit"):
            return _plain(kind, original, "8bit"), True
        if utf8:
            return _plain(kind, _quoted_printable(original), "quoted-printable"), True
    if utf8:
        kind = "message/global-headers"
        if _fits(headers, "7bit"):
            return _plain(kind, headers, "7bit"), False
        if _fits(headers, "utf-8"):
            return _plain(kind, headers, "8bit"), False
        return _plain(kind, _quoted_printable(headers), "quoted-printable"), False
    kind = "text/rfc822-headers"
    if _fits(headers, "7bit"):
        return _plain(kind, headers, "7bit"), False
    if _fits(headers, "utf-8"):
        kind += '; charset="utf-8"'
    return _plain(kind, _quoted_printable(headers), "quoted-printable"), False


def _plain(content_type: str, body: bytes, encoding: str) -> _Part:
    head = f"Content-Type: {content_type}\r\n"
    if encoding != "7bit":
        head += f"Content-Transfer-Encoding: {encoding}\r\n"
    return _Part(head.encode("ascii"), body, encoding)


def _fits(data: bytes, kind: Literal["7bit", "8bit", "utf-8"]) -> bool:
    """
    True if *data* (CRLF line ends) may go unencoded as RFC 2045 §2.7's
    7bit or §2.8's 8bit data: no NUL, no control other than tab, lines at
    most 998 octets; for "7bit" only ASCII, for "utf-8" valid UTF-8.
    """
    if _CONTROL.search(data) or _longest_line(data) > MAX_LINE:
        return False
    if kind == "7bit":
        return data.isascii()
    if kind == "utf-8":
        return _is_utf8(data)
    return True


def _longest_line(data: bytes) -> int:
    """The longest line of *data* (CRLF line ends), CRLF excluded: linear."""
    return max(map(len, data.split(b"\r\n")), default=0)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _quoted_printable(data: bytes) -> bytes:
    """
    RFC 2045 §6.7 of *data*, whose line ends are all CRLF: every encoded
    line is at most 76 characters and ends with CRLF.
    """
    if not data:
        return data
    encoded = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    # b2a_qp keeps the line end it found first; make sure it is CRLF.
    if not data.endswith(b"\r\n"):
        encoded += b"=\r\n"
    return _LINE_END.sub(b"\r\n", encoded)


def _clean(text: str, ascii_only: bool, limit: int | None = None) -> str:
    """
    *text* as one line of printable text with single spaces: every line
    break and other white space (CR, LF, U+2028, tab…) becomes a space,
    every other non-printable character (and, with *ascii_only*, every
    non-ASCII one) becomes RFC 6533's ``\\x{HEX}``.  More than *limit*
    characters are cut with ``...``.
    """
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    out = []
    for ch in text:
        if ch.isspace():
            out.append(" ")
        elif not ch.isprintable() or ascii_only and ord(ch) > 0x7E:
            out.append(f"\\x{{{ord(ch):X}}}")
        else:
            out.append(ch)
    return " ".join(word for word in "".join(out).split(" ") if word)


def _fold(field: str) -> str:
    """
    *field* ("Name: value", one line) folded (RFC 5322 §2.2.3) at a space
    wherever a line would pass :data:`FOLD_WIDTH`, with CRLF after each
    line; runs of spaces become one.  A run without spaces too long for
    the hard limit of 998 octets (only a pathological address or reply
    has one) is broken with a folding space, which unfolding keeps.
    """
    return _lines(field.split(" "), FOLD_WIDTH, "", " ")


def _wrap(line: str) -> str:
    """A line of the human part, wrapped for reading, with CRLF."""
    text = line.lstrip(" ")
    lead = " " * (len(line) - len(text))
    return _lines(text.split(" "), HUMAN_WIDTH, lead, lead)


def _lines(words: Iterable[str], width: int, first: str, indent: str) -> str:
    """
    *words* joined with single spaces into lines of at most *width* octets
    where the words allow, and never more than :data:`MAX_LINE`: the first
    line starts with *first*, the others with *indent*.
    """
    lines: list[str] = []
    current: str | None = None
    hard = MAX_LINE - max(_octets(first), _octets(indent)) - 1
    for word in words:
        for piece in _pieces(word, hard) if word else ():
            if current is None:
                current = first + piece
            elif _octets(current) + 1 + _octets(piece) > width:
                lines.append(current)
                current = indent + piece
            else:
                current += " " + piece
    lines.append(current or "")
    return "".join(line + "\r\n" for line in lines)


def _pieces(word: str, limit: int) -> list[str]:
    """*word* cut into pieces of at most *limit* octets, between characters."""
    if _octets(word) <= limit:
        return [word]
    pieces = []
    current = ""
    size = 0
    for ch in word:
        n = _octets(ch)
        if size + n > limit:
            pieces.append(current)
            current, size = "", 0
        current += ch
        size += n
    pieces.append(current)
    return pieces


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _aware(moment: datetime) -> datetime:
    """A naive *moment* is taken to be UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _unique_id(message_id: str) -> str:
    """
    The left part of the notification's Message-ID (RFC 5322 §3.6.4): the
    queue id, for people, and 64 random bits, for uniqueness.
    """
    queue = _QUEUE_ID_UNSAFE.sub("", message_id)[:32] or "dsn"
    return f"{queue}.{secrets.token_hex(8)}"


def _boundary(bodies: Iterable[bytes]) -> str:
    """
    A multipart boundary (RFC 2046 §5.1.1) that occurs in none of *bodies*.
    "=_" never starts a quoted-printable line, and the random part makes
    a collision with any other content a matter of luck; it is checked all
    the same.
    """
    contents = list(bodies)
    while True:
        boundary = f"=_kumoauth_{secrets.token_hex(16)}"
        if not any(boundary.encode("ascii") in body for body in contents):
            return boundary
