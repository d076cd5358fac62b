"""
SMTP command-line parsing and reply formatting: pure functions, no I/O.

Grammar from RFC 5321 §4.1 (commands, paths, parameters), extended for
UTF-8 addresses by RFC 6531 §3.3; the MAIL parameters known here are SIZE
(RFC 1870), BODY (RFC 6152), AUTH (RFC 4954 §5), SMTPUTF8 (RFC 6531) and
the DSN extension's RET and ENVID (RFC 3461), whose NOTIFY and ORCPT are
the RCPT parameters (:mod:`kumoauth.smtp.dsnparams` decodes them).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import idna

from kumoauth.smtp import dsnparams

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF; we
#: allow 1000 (the text-line limit of §4.5.3.1.6) as SPEC §6 says.
MAX_COMMAND_LINE = 1000


class CommandError(ValueError):
    """
    A command refused; ``reply`` is the full SMTP reply line.  A syntax
    error is a *protocol_error* (it counts toward ``max_errors``); a
    refused size or address is not.
    """

    def __init__(self, reply: bytes, protocol_error: bool = True) -> None:
        super().__init__(reply.decode("ascii", "replace"))
        self.reply = reply
        self.protocol_error = protocol_error


def parse_command(line: bytes) -> tuple[str, bytes]:
    """
    Split a command line into an upper-case verb and its argument bytes
    (RFC 5321 §4.1.1: verbs are case-insensitive, separated by one SP).
    Returns ``("", b"")`` for a verb that is not 1-16 ASCII letters.
    """
    verb, _, arg = line.partition(b" ")
    if not (0 < len(verb) <= 16 and verb.isalpha() and verb.isascii()):
        return "", b""
    return verb.decode("ascii").upper(), arg.strip(b" ")


# RFC 5321 §4.1.2, simplified to what a submission server must accept:
# Local-part "@" Domain, with a dot-string or quoted-string local part and a
# domain name or address literal.  An at-domain source route ("@a,@b:") is
# accepted and ignored (§4.1.2, Appendix C).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX = re.compile(rf"(?:{_DOT_STRING}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})", re.ASCII)
_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:", re.ASCII)
# RFC 6531 §3.3: atext, quoted text and sub-domains may also hold any
# non-ASCII UTF-8 character (printable ones only here: see is_mailbox).
_U = r"[^\x00-\x7f]"
_UATEXT = rf"(?:{_ATEXT}|{_U})"
_U_DOT_STRING = rf"{_UATEXT}+(?:\.{_UATEXT}+)*"
_U_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|{_U}|\\[\x20-\x7e])*"'
_U_LABEL = rf"(?:[A-Za-z0-9]|{_U})(?:(?:[A-Za-z0-9-]|{_U}){{0,61}}(?:[A-Za-z0-9]|{_U}))?"
_U_DOMAIN = rf"{_U_LABEL}(?:\.{_U_LABEL})*\.?"
_U_MAILBOX = re.compile(rf"(?:{_U_DOT_STRING}|{_U_QUOTED})@(?:{_U_DOMAIN}|{_LITERAL})")
# RFC 5321 §4.1.1.1 EHLO/HELO argument: a Domain or an address literal.
# Underscores are tolerated in labels: Windows machine names carry them and
# refusing those clients helps nobody; nothing else outside the grammar is.
_HELO_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HELO_DOMAIN = rf"{_HELO_LABEL}(?:\.{_HELO_LABEL})*\.?"
_HELO = re.compile(rf"(?:{_HELO_DOMAIN}|\[[\x21-\x5a\x5e-\x7e]{{1,253}}\])".encode())


def is_helo_domain(arg: bytes) -> bool:
    """
    True if *arg* may be the argument of EHLO/HELO: printable ASCII only, a
    Domain of letters, digits, hyphens (and underscores), or an address
    literal.  It goes into the reply and the Received header.
    """
    return len(arg) <= 255 and _HELO.fullmatch(arg) is not None


_PARAM = re.compile(rb"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")


def is_mailbox(address: str, utf8: bool = False) -> bool:
    """
    True if *address* is an RFC 5321 §4.1.2 Mailbox (local@domain), or with
    *utf8* an RFC 6531 one; a non-ASCII domain must also be valid IDNA.
    """
    if len(address.encode("utf-8")) > 254:
        return False
    if address.isascii():
        if _MAILBOX.fullmatch(address) is None:
            return False
    elif not utf8 or not address.isprintable() or _U_MAILBOX.fullmatch(address) is None:
        return False
    domain = address.rpartition("@")[2]
    if domain.startswith("["):
        return is_address_literal(domain)
    if domain.isascii():
        return True
    try:
        idna.encode(domain.rstrip("."), uts46=True)
    except idna.IDNAError:
        return False
    return True


def is_address_literal(literal: str) -> bool:
    """
    True if *literal* (with its brackets) is an IPv4 or IPv6 address
    literal (RFC 5321 §4.1.3).  The grammar's general form (``[tag:…]``)
    has no registered tag but ``IPv6``, so it is refused, as Postfix does:
    no upstream could deliver to it.
    """
    inner = literal[1:-1]
    if inner[:5].upper() == "IPV6:":
        kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv6Address
        inner = inner[5:]
    else:
        kind = ipaddress.IPv4Address
    if not inner.isascii() or "%" in inner:
        return False
    try:
        kind(inner)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Path:
    """
    A parsed MAIL FROM or RCPT TO argument.
    """

    address: str
    params: dict[str, str | None]


def parse_path(arg: bytes, keyword: bytes, allow_null: bool, utf8: bool = False) -> Path:
    """
    Parse ``FROM:<addr> params`` or ``TO:<addr> params``.

    A space between the colon and ``<`` is tolerated, because common clients
    send it.  The null reverse-path ``<>`` is allowed only for MAIL
    (*allow_null*), and ``<postmaster>`` without a domain only for RCPT
    (RFC 5321 §4.1.1.3, §4.5.1).  With *utf8* the address may be UTF-8
    (RFC 6531); whether the transaction allows it is the caller's
    business.  Parameter keywords are returned upper-case.
    """
    head = arg[: len(keyword) + 1]
    verb = b"MAIL FROM" if keyword == b"FROM" else b"RCPT TO"
    syntax = CommandError(b"501 5.5.4 Syntax: " + verb + b":<address>")
    if head.upper() != keyword + b":":
        raise syntax
    rest = arg[len(keyword) + 1 :].lstrip(b" ")
    if not rest.startswith(b"<"):
        raise syntax
    end = rest.find(b">")
    if b'"' in rest[:end]:  # a quoted local part may hold ">"
        end = _path_end(rest)
    if end < 0:
        raise syntax
    raw, tail = rest[1:end], rest[end + 1 :]
    if tail and not tail.startswith(b" "):
        raise syntax
    bad = CommandError(
        b"501 5.1.7 Bad sender address syntax"
        if allow_null
        else b"501 5.1.3 Bad recipient address syntax"
    )
    try:
        address = raw.decode("utf-8" if utf8 else "ascii")
    except UnicodeDecodeError:
        raise bad from None
    route = _ROUTE.match(address)
    if route:
        address = address[route.end() :]
    if address == "":
        if not allow_null or route:
            raise bad
    elif not allow_null and address.lower() == "postmaster":
        pass
    elif not is_mailbox(address, utf8):
        raise bad
    return Path(address=address, params=parse_params(tail))


def parse_params(tail: bytes) -> dict[str, str | None]:
    """
    Parse ``esmtp-param *(SP esmtp-param)`` (RFC 5321 §4.1.2).

    A parameter given twice with the same value counts once: Python's
    ``smtplib`` adds ``SMTPUTF8 BODY=8BITMIME`` (and ``SIZE``) to the
    options its caller passes, so ``send_message(msg,
    mail_options=["SMTPUTF8"])`` repeats one.  Two different values are
    refused: which one the client meant is not ours to guess.
    """
    params: dict[str, str | None] = {}
    for word in tail.split():
        m = _PARAM.fullmatch(word)
        if m is None:
            raise CommandError(b"501 5.5.4 Malformed parameter")
        key = m.group(1).decode("ascii").upper()
        value = m.group(2)
        text = value.decode("ascii") if value is not None else None
        if key in params:
            same = params[key] == text if key in _EXACT else _folded(params[key]) == _folded(text)
            if not same:
                raise CommandError(b"501 5.5.4 Conflicting values for parameter " + m.group(1))
            continue
        params[key] = text
    return params


#: parameters whose values are case-sensitive (RFC 3461's xtext)
_EXACT = frozenset({"ENVID", "ORCPT"})


def _folded(value: str | None) -> str | None:
    return value.upper() if value is not None else None


def _path_end(rest: bytes) -> int:
    """
    Where the path that *rest* starts (at its ``<``) ends: the first ``>``
    outside a quoted local part (``qtextSMTP`` includes ``>``, RFC 5321
    §4.1.2), or -1.
    """
    quoted = False
    i = 1
    while i < len(rest):
        c = rest[i]
        if quoted:
            if c == 0x5C:  # backslash: the next octet is quoted-pair'd
                i += 1
            elif c == 0x22:
                quoted = False
        elif c == 0x22:
            quoted = True
        elif c == 0x3E:
            return i
        i += 1
    return -1


def check_mail_params(
    params: dict[str, str | None], max_size: int, esmtp: bool = True, dsn: bool = False
) -> tuple[str | None, str | None]:
    """
    Validate MAIL FROM parameters: SIZE (RFC 1870 §6), BODY (RFC 6152 §2),
    AUTH (RFC 4954 §5, accepted; the identity comes from the session),
    and with *dsn* (the extension offered) RET and ENVID (RFC 3461 §4.3,
    §4.4), returned decoded as (RET, ENVID), None where not given.  After
    HELO (*esmtp* false) no extension was announced, so none of their
    parameters may be used (RFC 5321 §2.2.1).
    """
    if params and not esmtp:
        raise CommandError(b"555 5.5.4 MAIL parameters need EHLO")
    decoded: dict[str, Any] = {}
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise CommandError(b"501 5.5.4 Bad SIZE parameter")
            if int(value) > max_size:
                raise CommandError(b"552 5.3.4 Message size exceeds fixed limit", False)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise CommandError(b"501 5.5.4 Bad BODY parameter")
        elif key == "AUTH":
            if value is None:
                raise CommandError(b"501 5.5.4 Bad AUTH parameter")
        elif key == "SMTPUTF8":
            if value is not None:
                raise CommandError(b"501 5.5.4 SMTPUTF8 takes no value")
        else:
            decoded[key] = _dsn_param(_MAIL_DSN, key, value, dsn)
    return decoded.get("RET"), decoded.get("ENVID")


def check_rcpt_params(
    params: dict[str, str | None], dsn: bool, esmtp: bool = True
) -> dsnparams.Rcpt | None:
    """
    RCPT TO parameters: with *dsn* (the extension offered) NOTIFY and
    ORCPT (RFC 3461 §4.1, §4.2), returned decoded; no others, and none
    after HELO (*esmtp* false: RFC 5321 §2.2.1).
    """
    if params and not esmtp:
        raise CommandError(b"555 5.5.4 RCPT parameters need EHLO")
    decoded = {key: _dsn_param(_RCPT_DSN, key, value, dsn) for key, value in params.items()}
    if not decoded:
        return None
    return dsnparams.Rcpt(decoded.get("NOTIFY"), decoded.get("ORCPT"))


#: the DSN extension's parameters (RFC 3461 §4) by command, and their decoders
_MAIL_DSN = {"RET": dsnparams.parse_ret, "ENVID": dsnparams.parse_envid}
_RCPT_DSN = {"NOTIFY": dsnparams.parse_notify, "ORCPT": dsnparams.parse_orcpt}


def _dsn_param(known: dict[str, Any], key: str, value: str | None, dsn: bool) -> Any:
    """A DSN parameter *key* decoded: 555 if unknown (or DSN is off), 501 if malformed."""
    parse = known.get(key) if dsn else None
    if parse is None:
        raise CommandError(b"555 5.5.4 Unsupported parameter " + key.encode())
    try:
        return parse(value)
    except dsnparams.ParamError:
        raise CommandError(b"501 5.5.4 Bad " + key.encode() + b" parameter") from None


def reply_lines(code: int, lines: list[str]) -> bytes:
    """
    Format a (possibly multi-line) reply, RFC 5321 §4.2.1: every line but the
    last has a hyphen after the code.
    """
    out = []
    last = len(lines) - 1
    for i, text in enumerate(lines):
        sep = " " if i == last else "-"
        out.append(f"{code}{sep}{text}\r\n".encode())
    return b"".join(out)
