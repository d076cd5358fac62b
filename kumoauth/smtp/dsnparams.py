"""
The DSN extension's parameters (RFC 3461): ``RET`` and ``ENVID`` on MAIL,
``NOTIFY`` and ``ORCPT`` on RCPT.  Pure functions, no I/O.

A client's values are checked and decoded here (xtext, RFC 3461 §4; the
``utf-8`` address type's ``\\x{HEX}``, RFC 6533 §3), kept with the message
in the queue in their decoded form (:func:`stored`), encoded again when the
relay passes them to an upstream that offers DSN (:func:`mail_params`,
:func:`rcpt_params`), and read by the relay to decide which reports the
sender asked for (:class:`Requested`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: RFC 3461 §4.4: ENVID is at most 100 characters (as xtext)
MAX_ENVID = 100
#: RFC 3461 §4.2: ORCPT is at most 500 characters (as xtext)
MAX_ORCPT = 500

#: RFC 3461 §4.1
NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
#: RFC 6533 §3: EmbeddedUnicodeChar, 1-6 hex digits (ABNF's HEXDIG
#: takes either case; RFC 3461's "+HH" is upper-case only)
_UNICODE_CHAR = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
#: RFC 3464 §2.1.2: address-type = atom (IANA names: rfc822, utf-8, x400…)
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}")


class ParamError(ValueError):
    """A DSN parameter's value does not parse; the message says which."""


def xtext(value: str) -> str:
    """*value* in RFC 3461's xtext: ``+``, ``=`` and what is not visible ASCII as ``+HH``."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}"
        for b in value.encode("utf-8", "surrogateescape")
    )


def unxtext(value: str, utf8: bool = False) -> str:
    """
    Decode RFC 3461 xtext (upper-case ``+HH``, §4); :class:`ParamError` if
    it is not xtext or decodes to anything but visible ASCII and SPACE,
    or with *utf8* to anything but printable UTF-8 (an address's octets,
    as clients encode a non-ASCII one).
    """
    if not _XTEXT.fullmatch(value):
        raise ParamError("not xtext")
    out = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)
    if utf8 and not out.isascii():
        try:
            out = out.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            raise ParamError("decodes to octets that are not UTF-8") from None
        if not out.isprintable():
            raise ParamError("decodes to a character that does not print")
        return out
    if not all(" " <= ch <= "~" for ch in out):
        raise ParamError("decodes to a control or non-ASCII character")
    return out


def parse_ret(value: str | None) -> str:
    """``RET=FULL`` or ``RET=HDRS`` (RFC 3461 §4.3), upper-cased."""
    word = (value or "").upper()
    if word not in ("FULL", "HDRS"):
        raise ParamError("RET must be FULL or HDRS")
    return word


def parse_envid(value: str | None) -> str:
    """``ENVID=xtext`` (RFC 3461 §4.4), decoded: printable ASCII, at most 100."""
    if not value:
        raise ParamError("ENVID needs a value")
    if len(value) > MAX_ENVID:
        raise ParamError(f"ENVID is longer than {MAX_ENVID} characters")
    return unxtext(value)


def parse_notify(value: str | None) -> str:
    """
    ``NOTIFY=NEVER`` or a comma-separated list of SUCCESS, FAILURE and
    DELAY (RFC 3461 §4.1), as the canonical upper-case list.
    """
    words = (value or "").upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if not set(words) <= NOTIFY_WORDS or len(set(words)) != len(words):
        raise ParamError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE and DELAY")
    return ",".join(w for w in ("SUCCESS", "FAILURE", "DELAY") if w in words)


def parse_orcpt(value: str | None) -> tuple[str, str]:
    """
    ``ORCPT=addr-type;xtext`` (RFC 3461 §4.2), as (lower-case type,
    decoded address).  The ``utf-8`` type's address may hold RFC 6533's
    ``\\x{HEX}`` characters, decoded here (its raw-UTF-8 form is not
    taken: the parameter grammar here is ASCII).  An ``rfc822`` address
    whose xtext decodes to UTF-8 octets (nodemailer's ``+C3+B8``, and
    Postfix's for mail not flagged SMTPUTF8) is an internationalized
    address: taken, as the ``utf-8`` type, which is what it is.
    """
    if not value or len(value) > MAX_ORCPT:
        raise ParamError(f"ORCPT needs a value of at most {MAX_ORCPT} characters")
    kind, sep, rest = value.partition(";")
    if not sep or not _ADDR_TYPE.fullmatch(kind) or not rest:
        raise ParamError("ORCPT must be addr-type;address")
    kind = kind.lower()
    address = unxtext(rest, utf8=kind in ("rfc822", "utf-8"))
    if not address.isascii():
        kind = "utf-8"
    if kind == "utf-8":
        if "\\" in _UNICODE_CHAR.sub("", address):
            raise ParamError("ORCPT's utf-8 address is not utf-8-addr-xtext")
        address = _UNICODE_CHAR.sub(_unicode_char, address)
        if not address.isprintable():
            raise ParamError("ORCPT's utf-8 address holds a character that does not print")
    if len(orcpt_xtext(kind, address)) > MAX_ORCPT:
        # what the relay would send on (a "+2B" is "\x{2B}" in the utf-8 form)
        raise ParamError(f"ORCPT would be longer than {MAX_ORCPT} characters sent on")
    return kind, address


def _unicode_char(m: re.Match[str]) -> str:
    code = int(m.group(1), 16)
    if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        raise ParamError("ORCPT's utf-8 address has an invalid \\x{…} character")
    return chr(code)


def orcpt_xtext(kind: str, address: str) -> str:
    """
    An ORCPT value for the relay to send: ``rfc822;`` (or the type it
    came with) and the address as xtext; an address that is not ASCII as
    RFC 6533's ``utf-8;`` form with ``\\x{HEX}``, which is plain ASCII and
    so needs no SMTPUTF8.
    """
    if kind != "utf-8" and address.isascii():
        return f"{kind};{xtext(address)}"
    return "utf-8;" + utf8_address(address)


def utf8_address(address: str, unitext: bool = False) -> str:
    """
    *address* in RFC 6533 §3's ``utf-8-addr-xtext`` form: what is not
    visible ASCII, and ``+ = \\``, as ``\\x{HEX}``; with *unitext* its
    ``utf-8-addr-unitext`` form, which keeps printable non-ASCII as it is.
    """
    out = []
    for ch in address:
        if "!" <= ch <= "~" and ch not in "+=\\":
            out.append(ch)
        elif unitext and ord(ch) > 0x7F and ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):X}}}")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Rcpt:
    """One recipient's DSN parameters."""

    #: "NEVER", or a list of SUCCESS, FAILURE and DELAY; None: not given
    notify: str | None = None
    #: (address type, decoded address); None: not given
    orcpt: tuple[str, str] | None = None


def stored(ret: str | None, envid: str | None, rcpts: Mapping[str, Rcpt]) -> dict[str, Any] | None:
    """The envelope's ``dsn`` value (JSON), or None if nothing was given."""
    out: dict[str, Any] = {}
    if ret is not None:
        out["ret"] = ret
    if envid is not None:
        out["envid"] = envid
    per: dict[str, Any] = {}
    for address, r in rcpts.items():
        one: dict[str, Any] = {}
        if r.notify is not None:
            one["notify"] = r.notify
        if r.orcpt is not None:
            one["orcpt"] = list(r.orcpt)
        if one:
            per[address] = one
    if per:
        out["rcpt"] = per
    return out or None


@dataclass(frozen=True, slots=True)
class Requested:
    """
    What a queued message's sender asked for, read back from its envelope's
    ``dsn`` value.  Each value is checked again as a client's would be (a
    queue is a file: what goes to an upstream's command line from it must
    be what the parser lets through); anything malformed reads as not
    given.
    """

    ret: str | None = None
    envid: str | None = None
    rcpts: Mapping[str, Rcpt] | None = None

    @classmethod
    def of(cls, value: object) -> Requested:
        if not isinstance(value, dict):
            return NOTHING
        rcpts: dict[str, Rcpt] = {}
        per = value.get("rcpt")
        if isinstance(per, dict):
            for address, one in per.items():
                if isinstance(one, dict):
                    notify = _checked(parse_notify, one.get("notify"))
                    rcpts[str(address)] = Rcpt(notify, _stored_orcpt(one.get("orcpt")))
        ret = value.get("ret")
        return cls(
            ret if ret in ("FULL", "HDRS") else None,
            _checked(lambda v: parse_envid(xtext(v)), value.get("envid")),
            rcpts or None,
        )

    def rcpt(self, address: str) -> Rcpt:
        return (self.rcpts or {}).get(address, NO_RCPT)

    def wants(self, address: str, event: str) -> bool:
        """
        Whether a report of *event* (SUCCESS or FAILURE) goes to the
        sender for *address*: without NOTIFY, failures only (RFC 3461
        §4.1's default; delays are never reported by kumoauth).
        """
        notify = self.rcpt(address).notify
        if notify is None:
            return event == "FAILURE"
        return event in notify.split(",")


def _checked(parse: Any, value: object) -> Any:
    if not isinstance(value, str):
        return None
    try:
        return parse(value)
    except ValueError:  # ParamError, or a lone surrogate xtext cannot encode
        return None


def _stored_orcpt(value: object) -> tuple[str, str] | None:
    """A stored ORCPT, if it is one a client could have given."""
    if not (isinstance(value, list) and len(value) == 2):
        return None
    kind, address = value
    if not (isinstance(kind, str) and isinstance(address, str)):
        return None
    if not _ADDR_TYPE.fullmatch(kind):
        return None
    return _checked(parse_orcpt, orcpt_xtext(kind.lower(), address))


NO_RCPT = Rcpt()
NOTHING = Requested()


def mail_params(requested: Requested) -> list[str]:
    """``RET=`` and ``ENVID=`` for the relay's MAIL FROM, as given."""
    envid = requested.envid
    return _params(("RET", requested.ret), ("ENVID", None if envid is None else xtext(envid)))


def rcpt_params(requested: Requested, address: str) -> list[str]:
    """``NOTIFY=`` and ``ORCPT=`` for the relay's RCPT TO *address*, as given."""
    r = requested.rcpt(address)
    orcpt = None if r.orcpt is None else orcpt_xtext(*r.orcpt)
    return _params(("NOTIFY", r.notify), ("ORCPT", orcpt))


def _params(*pairs: tuple[str, str | None]) -> list[str]:
    return [f"{name}={value}" for name, value in pairs if value is not None]
