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

from kumoauth.textsafe import INVISIBLE

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


def field_text(field: bytes, name: str) -> str:
    """A field as the wire gives it: at most 255 octets of UTF-8 (else 501)."""
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
        authz=field_text(authz, "authzid"),
        authc=field_text(authc, "authcid"),
        password=field_text(password, "password"),
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
    return field_text(data, name)


# --- bearer tokens: XOAUTH2 and OAUTHBEARER (RFC 7628) ---------------------

#: RFC 6750 §2.1 b64token: the characters a bearer token may hold
_B64TOKEN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/")

#: RFC 7628 §3.1 kvsep
_KVSEP = b"\x01"


@dataclass(frozen=True)
class BearerResponse:
    """
    A decoded XOAUTH2 or OAUTHBEARER message: the identity the client asks
    for (``user=`` / ``a=``; may be empty for OAUTHBEARER) and the token.
    ``repr`` hides the token.
    """

    authz: str
    token: str

    def __repr__(self) -> str:
        return f"BearerResponse(authz={self.authz!r}, token=<hidden>)"


def _bearer(value: bytes) -> str:
    """
    ``Bearer`` 1*SP b64token (RFC 6750 §2.1; RFC 7628 §3.1 auth-value);
    the scheme name is case-insensitive.
    """
    scheme, sep, token = value.partition(b" ")
    if not sep or scheme.lower() != b"bearer":
        raise _err("auth must be a Bearer token")
    token = token.lstrip(b" ")
    body = token.rstrip(b"=")
    if not body or any(c not in _B64TOKEN for c in body):
        raise _err("malformed bearer token")
    return token.decode("ascii")


def decode_xoauth2(message: bytes) -> BearerResponse:
    """
    Google's XOAUTH2: ``user=`` USER ^A ``auth=Bearer `` TOKEN ^A ^A, exactly
    those two fields in that order.  The user name is at most 255 octets of
    UTF-8 without control characters.
    """
    if not message.endswith(_KVSEP + _KVSEP):
        raise _err("XOAUTH2 response must end with two ^A")
    fields = message[:-2].split(_KVSEP)
    if len(fields) != 2 or not fields[0].startswith(b"user=") or not fields[1].startswith(b"auth="):
        raise _err("XOAUTH2 response must be user=...^Aauth=Bearer ...^A^A")
    user = field_text(fields[0][5:], "user")
    if not user or any(ord(c) < 0x20 or c == "\x7f" for c in user):
        raise _err("malformed XOAUTH2 user")
    return BearerResponse(authz=user, token=_bearer(fields[1][5:]))


def _saslname(value: bytes) -> str:
    """
    RFC 5801 §4 saslname: ``=2C`` is ``,`` and ``=3D`` is ``=``; any other
    ``=`` or a bare ``,`` is malformed.
    """
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i : i + 1]
        if c == b",":
            raise _err("malformed authzid")
        if c == b"=":
            escape = value[i + 1 : i + 3]
            if escape == b"2C":
                out += b","
            elif escape == b"3D":
                out += b"="
            else:
                raise _err("malformed authzid")
            i += 3
            continue
        out += c
        i += 1
    return field_text(bytes(out), "authzid")


def decode_oauthbearer(message: bytes) -> BearerResponse:
    """
    RFC 7628 §3.1: ``gs2-header kvsep *kvpair kvsep``.  The GS2 header is
    ``n,`` or ``y,`` (no channel binding: ``p=`` is refused) then an
    optional ``a=`` authzid and ``,``.  Each kvpair is ``key=value`` ^A with
    a key of letters; ``auth`` is required, once, and must be a Bearer
    token; ``host`` and ``port`` are allowed, others ignored (the RFC
    allows extensions).
    """
    head, sep, rest = message.partition(_KVSEP)
    if not sep:
        raise _err("OAUTHBEARER response has no kvsep")
    parts = head.split(b",")
    if len(parts) != 3 or parts[2] != b"":
        raise _err("malformed GS2 header")
    flag, authzid = parts[0], parts[1]
    if flag not in (b"n", b"y"):
        raise _err("channel binding is not supported")
    if authzid and not authzid.startswith(b"a="):
        raise _err("malformed GS2 header")
    authz = _saslname(authzid[2:]) if authzid else ""
    if not rest.endswith(_KVSEP):
        raise _err("OAUTHBEARER response must end with ^A^A")
    pairs = rest[:-1].split(_KVSEP)
    if pairs and pairs[-1] == b"":
        pairs.pop()
    else:
        raise _err("OAUTHBEARER response must end with ^A^A")
    token: str | None = None
    for pair in pairs:
        key, eq, value = pair.partition(b"=")
        if not eq or not key.isalpha() or not key.isascii():
            raise _err("malformed OAUTHBEARER key/value")
        if any(c < 0x20 and c not in (0x09, 0x0A, 0x0D) or c == 0x7F for c in value):
            raise _err("malformed OAUTHBEARER value")
        if key == b"auth":
            if token is not None:
                raise _err("OAUTHBEARER auth given twice")
            token = _bearer(value)
    if token is None:
        raise _err("OAUTHBEARER response has no auth")
    return BearerResponse(authz=authz, token=token)


def encode_xoauth2(user: str, token: str) -> bytes:
    """Build an XOAUTH2 message, for clients and tests."""
    return (
        b"user=" + user.encode("utf-8") + b"\x01auth=Bearer " + token.encode("ascii") + b"\x01\x01"
    )


def encode_oauthbearer(authz: str, token: str, host: str = "", port: int = 0) -> bytes:
    """Build an OAUTHBEARER message (RFC 7628 §3.1), for clients and tests."""
    name = authz.replace("=", "=3D").replace(",", "=2C").encode("utf-8")
    out = b"n," + (b"a=" + name if authz else b"") + b"," + _KVSEP
    if host:
        out += b"host=" + host.encode("ascii") + _KVSEP
    if port:
        out += b"port=%d" % port + _KVSEP
    return out + b"auth=Bearer " + token.encode("ascii") + _KVSEP + _KVSEP


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


#: categories no name may hold: format, control, surrogate, private use,
#: unassigned, line and paragraph separators
_NOT_IN_NAMES = frozenset({"Cf", "Cc", "Cs", "Co", "Cn", "Zl", "Zp"})


def _prohibited(field: str) -> SASLError:
    return _err(f"{field} contains a prohibited character")


def prepare_name(name: str, field: str) -> str:
    """
    Prepare a user name (authcid, authzid or a LOGIN user name) with SASLprep
    (RFC 4013) as a *query* (RFC 3454 §7: a name a client presents is looked
    up, not stored), the preparation RFC 4616 §2 asks servers to apply, with
    the Bidi Rule of RFC 5893 that its successor, RFC 8265 (PRECIS), uses.
    A decomposed ``"ju\\u0308rgen"`` (NFD, as some macOS clients send) comes
    out as the NFC ``"j\\u00fcrgen"``.

    1. Map: non-ASCII spaces (table C.1.2) become SPACE; characters
       "commonly mapped to nothing" (B.1: SOFT HYPHEN, zero-width joiners,
       variation selectors...) are removed.
    2. Normalize: NFKC (``"\\u2168"`` ROMAN NUMERAL NINE becomes ``"IX"``).
    3. Prohibit: tables C.1.2, C.2.1, C.2.2, C.3 to C.9 (controls, private
       use, non-characters, surrogates, bidi overrides, tags...).  Code
       points unassigned in Unicode 3.2 (A.1) are allowed, as in any query:
       Malayalam chillu letters, ẞ, newer CJK ideographs are names people
       have (an outside test found them all refused, on every store).
    4. Bidi (RFC 5893, as RFC 8265 §3.4 applies it to each space-separated
       part): a part with a right-to-left character starts with one, ends
       with one or a digit (``"محمد1"``), holds no left-to-right one, and
       does not mix European and Arabic-Indic digits.  RFC 3454 §6, which
       SASLprep had, also refused the trailing digit.

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
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in name if not stringprep.in_table_b1(c)
    )
    prepared = _UCD.normalize("NFKC", mapped)
    if not prepared:
        raise _err(f"{field} is empty after preparation")
    for c in prepared:
        if any(prohibited(c) for prohibited in _PROHIBITED):
            raise _prohibited(field)
        if INVISIBLE.match(c) or (
            stringprep.in_table_a1(c) and unicodedata.category(c) in _NOT_IN_NAMES
        ):
            # What shows as nothing (a Hangul filler, and what is newer
            # than Unicode 3.2, which no table above knows: bidi isolates,
            # variation selectors) or is no character (unassigned even
            # now) would make "alice\u2066" an account a collation merges
            # with alice (RFC 8265 refuses them too).
            raise _prohibited(field)
    if not all(_bidi_ok(part) for part in prepared.split(" ")):
        raise _prohibited(field)
    return prepared


#: RFC 5893 §2: the bidi classes a right-to-left label may hold
_RTL_ALLOWED = frozenset({"R", "AL", "AN", "EN", "ES", "CS", "ET", "ON", "BN", "NSM"})


def _bidi_ok(part: str) -> bool:
    """
    The Bidi Rule (RFC 5893 §2) for a part holding a right-to-left
    character; a left-to-right part passes (a name such as ``"alice."`` is
    not refused for its trailing dot).
    """
    classes = [unicodedata.bidirectional(c) for c in part]
    if not any(k in ("R", "AL") for k in classes):
        return True
    if classes[0] not in ("R", "AL") or not all(k in _RTL_ALLOWED for k in classes):
        return False
    if "EN" in classes and "AN" in classes:
        return False
    last = [k for k in classes if k != "NSM"]
    return bool(last) and last[-1] in ("R", "AL", "EN", "AN")
