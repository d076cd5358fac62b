"""
SASL decoding for SMTP AUTH: pure functions, no I/O.

Every malformed input raises :class:`SASLError`, whose ``reply`` is the SMTP
reply of SPEC §6 that the protocol sends for it.  Messages never include the
decoded data, so no secret can leak through an exception.
"""

from __future__ import annotations

import base64
import binascii
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
