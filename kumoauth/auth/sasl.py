"""
SASL decoding for SMTP AUTH: pure functions, no I/O.

Every malformed input raises :class:`SASLError`, whose ``reply`` is the SMTP
reply of SPEC §6 that the protocol sends for it.  Messages never include the
decoded data, so no secret can leak through an exception.
"""

from __future__ import annotations

import base64
import binascii
import stringprep
import unicodedata
from dataclasses import dataclass

#: RFC 4954 §4: a client response line is at most 12288 octets.
MAX_RESPONSE = 12288

#: RFC 4616 §2: each PLAIN field is at most 255 octets.
MAX_FIELD = 255

#: RFC 4954 §4: a client that wants to cancel sends a single "*".
CANCEL = b"*"

LOGIN_USERNAME_PROMPT = b"VXNlcm5hbWU6"  # base64("Username:")
LOGIN_PASSWORD_PROMPT = b"UGFzc3dvcmQ6"  # base64("Password:")


class SASLError(ValueError):
    """
    A malformed or cancelled SASL exchange.  ``reply`` is the SMTP reply,
    ``kind`` is "cancelled" or "malformed" for the auth log.
    """

    def __init__(self, reply: bytes, reason: str, kind: str = "malformed") -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason
        self.kind = kind


def _err(reason: str) -> SASLError:
    return SASLError(b"501 5.5.2 " + reason.encode("ascii"), reason)


def cancelled() -> SASLError:
    return SASLError(b"501 5.7.0 Authentication cancelled", "cancelled", "cancelled")


def too_long() -> SASLError:
    return SASLError(b"500 5.5.6 Authentication exchange line too long", "too long")


def decode_response(line: bytes) -> bytes:
    """
    Decode one client response of an AUTH exchange (RFC 4954 §4).

    ``*`` cancels; ``=`` is an empty response (the form RFC 4954 §4 gives for
    a zero-length initial response).  Otherwise the line must be strict,
    canonical, padded base64 (RFC 4648 §4, §3.5): no whitespace, no missing
    padding, no non-zero pad bits.  An empty line is also an empty response.
    """
    if len(line) > MAX_RESPONSE:
        raise too_long()
    if line == CANCEL:
        raise cancelled()
    if line == b"=" or line == b"":
        return b""
    if len(line) % 4:
        raise _err("Invalid base64 data")
    try:
        data = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise _err("Invalid base64 data") from None
    # Canonical form only: "QR==" decodes like "QQ==" in lenient decoders;
    # accepting both would make the wire form ambiguous.
    if base64.b64encode(data) != line:
        raise _err("Invalid base64 data")
    return data


def encode_response(data: bytes) -> bytes:
    """
    The inverse of :func:`decode_response` for a client: ``=`` for empty.
    """
    return base64.b64encode(data) if data else b"="


def _text(field: bytes, name: str) -> str:
    if len(field) > MAX_FIELD:
        raise _err(f"{name} longer than {MAX_FIELD} octets")
    try:
        return field.decode("utf-8")
    except UnicodeDecodeError:
        raise _err(f"{name} is not UTF-8") from None


@dataclass(frozen=True)
class PlainResponse:
    """
    A decoded PLAIN message.  ``repr`` hides the password.
    """

    authz: str
    authc: str
    password: str

    def __repr__(self) -> str:
        return f"PlainResponse(authz={self.authz!r}, authc={self.authc!r}, password=<hidden>)"


def decode_plain(message: bytes) -> PlainResponse:
    """
    Split a PLAIN message: ``[authzid] NUL authcid NUL passwd`` (RFC 4616 §2),
    exactly three fields, each at most 255 octets of UTF-8 with no NUL.

    An empty authz is returned empty here; the caller replaces it by authc.
    Empty authc or password are syntactically valid and left to the caller
    (they get 535, not 501).
    """
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise _err("PLAIN response must be authzid NUL authcid NUL password")
    authz, authc, password = parts
    return PlainResponse(
        authz=_text(authz, "authzid"),
        authc=_text(authc, "authcid"),
        password=_text(password, "password"),
    )


def encode_plain(authz: str, authc: str, password: str) -> bytes:
    """
    Build a PLAIN message, for clients and tests.
    """
    return b"\x00".join(s.encode("utf-8") for s in (authz, authc, password))


def decode_login_field(data: bytes, name: str) -> str:
    """
    Validate one decoded LOGIN response (user name or password): at most
    255 octets of UTF-8 without NUL, like a PLAIN field.
    """
    if b"\x00" in data:
        raise _err(f"{name} contains NUL")
    return _text(data, name)


# SASLprep (RFC 4013), the stringprep (RFC 3454) profile RFC 4616 §2 names
# for PLAIN identities.  The stdlib's stringprep tables are those of RFC 3454
# (Unicode 3.2), so normalization uses the matching Unicode 3.2 database.
_UCD = unicodedata.ucd_3_2_0

_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space (after mapping: none left)
    stringprep.in_table_c21,  # ASCII control
    stringprep.in_table_c22,  # non-ASCII control, incl. U+2028, U+2029
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogate codes
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties / deprecated
    stringprep.in_table_c9,  # tagging characters
)


def _prohibited(field: str) -> SASLError:
    return _err(f"{field} contains a prohibited character")


def prepare_name(name: str, field: str) -> str:
    """
    Prepare a user name (authcid, authzid or a LOGIN user name) with SASLprep
    (RFC 4013) as a *stored* string (RFC 3454 §7), the preparation RFC 4616
    §2 asks servers to apply; RFC 8265 (PRECIS) is its successor and agrees
    on everything this does.  A decomposed ``"ju\\u0308rgen"`` (NFD, as some
    macOS clients send) comes out as the NFC ``"j\\u00fcrgen"``.

    1. Map: non-ASCII spaces (table C.1.2) become SPACE; characters
       "commonly mapped to nothing" (B.1: SOFT HYPHEN, zero-width joiners,
       variation selectors...) are removed.
    2. Normalize: NFKC (``"\\u2168"`` ROMAN NUMERAL NINE becomes ``"IX"``).
    3. Prohibit: tables C.1.2, C.2.1, C.2.2, C.3 to C.9 (controls, private
       use, non-characters, surrogates, bidi overrides, tags...) and, since
       names are stored strings, code points unassigned in Unicode 3.2
       (A.1).
    4. Bidi (RFC 3454 §6): a name with a right-to-left character has no
       left-to-right one and starts and ends with a right-to-left one.

    There is **no case folding**: whether ``"Scott"`` and ``"scott"`` are one
    user is the checker's (the user database's) decision, not the wire's.

    An empty name stays empty (the caller turns an empty authz into authc
    and refuses an empty authc with 535).  A prohibited character raises
    :class:`SASLError` with ``501 5.5.2 <field> contains a prohibited
    character``; a non-empty name that maps to nothing (only SOFT HYPHENs,
    say) raises ``501 5.5.2 <field> is empty after preparation``, so that an
    authz cannot silently turn into authc.  *field* names the field in that
    reply (``"authcid"``, ``"authzid"``, ``"username"``); the name itself is
    never part of an error.

    Passwords are deliberately **not** prepared: Dovecot and most password
    stores compare (or hash) the octets as the client sent them, and a
    stored hash made from an unprepared password would no longer match its
    prepared form, locking its owner out.
    """
    if not name:
        return name
    if name.isascii() and name.isprintable():
        # The common case, and a fixed point: no printable ASCII character
        # is mapped, changed by NFKC, prohibited or right-to-left.
        return name
    if any(stringprep.in_table_a1(c) for c in name):
        raise _prohibited(field)
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in name if not stringprep.in_table_b1(c)
    )
    prepared = _UCD.normalize("NFKC", mapped)
    if not prepared:
        raise _err(f"{field} is empty after preparation")
    for c in prepared:
        if any(prohibited(c) for prohibited in _PROHIBITED) or stringprep.in_table_a1(c):
            raise _prohibited(field)
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared):
            raise _prohibited(field)
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise _prohibited(field)
    return prepared
