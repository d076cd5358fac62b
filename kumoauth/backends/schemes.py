"""
Password hash schemes operators already have: pure functions, no I/O.

:func:`verify` checks a password against a stored value, dispatching on its
form:

- Dovecot ``{SCHEME}`` values (Dovecot's "Password Schemes" documentation):
  ``{ARGON2ID}``, ``{ARGON2I}`` (the Argon2 encoding of RFC 9106 / PHC),
  ``{BLF-CRYPT}`` (bcrypt), ``{SHA512-CRYPT}``, ``{SHA256-CRYPT}`` (Drepper's
  SHA-crypt), ``{SSHA512}``, ``{SSHA256}``, ``{SSHA}`` (base64 of the digest
  of password+salt followed by the salt), ``{PLAIN}``, ``{CLEAR}`` and
  ``{CLEARTEXT}``; any of these with Dovecot's encoding suffix
  (``{SSHA512.HEX}``, ``{SHA512-CRYPT.B64}``: the scheme's own form in
  hex or base64, as ``doveadm pw -s SCHEME.HEX`` prints it);
  ``{CRYPT}`` (Dovecot's default scheme, whatever crypt(3) reads:
  ``doveadm pw -s CRYPT`` prints ``{CRYPT}$2y$05$...``) followed by one of
  the crypt(3) forms below but ``$apr1$``, which crypt(3) does not read;
- crypt(3) strings without a prefix, as in ``/etc/shadow`` or an htpasswd
  file: ``$2y$``/``$2b$``/``$2a$`` (bcrypt, ``htpasswd -B``), ``$6$``,
  ``$5$``, ``$y$`` (yescrypt, libxcrypt's default) and ``$apr1$``
  (Apache's MD5, ``htpasswd -m``).

Digests are compared with :func:`hmac.compare_digest`; the libraries used for
the other schemes compare in constant time themselves.

A stored value of no known form raises :class:`UnknownScheme`, one of a known
form that cannot be parsed :class:`MalformedHash`; their messages name the
scheme at most, never the stored value or the password.  A wrong password is
``False``, never an exception.

bcrypt only ever read the first 72 bytes of a password (crypt(3) stopped
there); the bcrypt library refuses longer ones since version 5.  To keep the
hashes operators have working, :func:`verify` truncates to 72 bytes as
crypt(3) did, so a longer password matches any hash of its first 72 bytes.
:func:`hash_password` refuses a password over 72 bytes for ``BLF-CRYPT``
rather than make such a hash anew.

A password containing NUL never verifies (crypt(3) cannot take one, and SASL
PLAIN, RFC 4616 §2, cannot carry one); :func:`hash_password` refuses it.

**Blocking.**  Verification is deliberately CPU-bound (Argon2 with 64 MiB and
bcrypt take tens of milliseconds): callers run it in the checker thread pool
(``deferToThreadPool``), never on the reactor thread.  For an unknown user,
verify against :func:`dummy` of the scheme (and the parameters) the store's
real users have, so that the answer takes as long as for a known one.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import argon2
import bcrypt
import crypt_r
from argon2.exceptions import VerificationError, VerifyMismatchError
from passlib.hash import apr_md5_crypt

#: bcrypt reads at most this many bytes of a password
BCRYPT_MAX = 72


class SchemeError(ValueError):
    """
    A stored value :func:`verify` cannot use.  The message names the scheme
    at most: never the stored value, never the password.
    """


class UnknownScheme(SchemeError):
    """The stored value has no prefix this module knows."""


class MalformedHash(SchemeError):
    """The stored value has a known prefix but cannot be parsed."""


@dataclass(frozen=True)
class Params:
    """
    Costs for :func:`hash_password`.  The defaults are Dovecot's own
    (``doveadm pw``), except bcrypt's cost, which is OWASP's minimum of 10
    instead of Dovecot's 5.  Argon2 parallelism stays 1: Dovecot verifies
    Argon2 with libsodium, which only accepts 1.
    """

    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    bcrypt_cost: int = 10


DEFAULT = Params()

#: schemes :func:`hash_password` produces (Dovecot names)
HASH_SCHEMES = (
    "ARGON2ID",
    "ARGON2I",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "SSHA512",
    "SSHA256",
    "SSHA",
)

#: schemes :func:`dummy` has a dummy hash for
DUMMY_SCHEMES = (*HASH_SCHEMES, "PLAIN", "CLEAR", "CLEARTEXT", "YESCRYPT", "APR1")

_B64 = "A-Za-z0-9+/"
_CRYPT64 = "./0-9A-Za-z"
_ARGON2 = re.compile(
    rf"\$(argon2id|argon2i)\$(?:v=\d{{1,3}}\$)?m=\d{{1,10}},t=\d{{1,10}},p=\d{{1,3}}"
    rf"\$[{_B64}]{{8,}}\$[{_B64}]{{16,}}"
)
_BCRYPT = re.compile(rf"\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[{_CRYPT64}]{{53}}")
_SHA_CRYPT = re.compile(rf"\$([56])\$(?:rounds=\d{{1,9}}\$)?[^$:\n]{{0,16}}\$[{_CRYPT64}]+")
_YESCRYPT = re.compile(rf"\$y\$[{_CRYPT64}]+\$[{_CRYPT64}]*\$[{_CRYPT64}]{{43}}")
_APR1 = re.compile(rf"\$apr1\$[^$:\n]{{0,8}}\$[{_CRYPT64}]{{22}}")
_DOVECOT = re.compile(r"\{([A-Za-z0-9.-]{1,32})\}")

#: digest length of each salted SHA scheme
_SSHA = {"SSHA": hashlib.sha1, "SSHA256": hashlib.sha256, "SSHA512": hashlib.sha512}


def _encode(password: str) -> bytes | None:
    """UTF-8 of *password*, or None if it cannot be a password here."""
    if "\x00" in password:
        return None
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        return None


# --------------------------------------------------------------------------
# one verifier per form: (stored value without any {SCHEME}, password bytes)


def _verify_argon2(kind: str) -> Callable[[str, bytes], bool]:
    type_ = argon2.Type.ID if kind == "argon2id" else argon2.Type.I

    def check(value: str, password: bytes) -> bool:
        m = _ARGON2.fullmatch(value)
        if m is None or m.group(1) != kind:
            raise MalformedHash(f"malformed {kind} hash")
        try:
            return argon2.low_level.verify_secret(value.encode("ascii"), password, type_)
        except VerifyMismatchError:
            return False
        except VerificationError:
            raise MalformedHash(f"malformed {kind} hash") from None

    return check


def _verify_bcrypt(value: str, password: bytes) -> bool:
    if _BCRYPT.fullmatch(value) is None:
        raise MalformedHash("malformed bcrypt hash")
    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX], value.encode("ascii"))
    except ValueError:
        raise MalformedHash("malformed bcrypt hash") from None


def _verify_crypt(name: str, pattern: re.Pattern[str]) -> Callable[[str, bytes], bool]:
    def check(value: str, password: bytes) -> bool:
        if pattern.fullmatch(value) is None:
            raise MalformedHash(f"malformed {name} hash")
        computed = crypt_r.crypt(password.decode("utf-8"), value)
        if computed is None or computed.startswith("*"):
            # libxcrypt's failure token: it could not use the setting
            raise MalformedHash(f"malformed {name} hash")
        return hmac.compare_digest(computed.encode("ascii"), value.encode("ascii"))

    return check


def _verify_apr1(value: str, password: bytes) -> bool:
    if _APR1.fullmatch(value) is None:
        raise MalformedHash("malformed apr1 hash")
    try:
        return bool(apr_md5_crypt.verify(password, value))
    except ValueError:
        raise MalformedHash("malformed apr1 hash") from None


def _verify_ssha(scheme: str) -> Callable[[str, bytes], bool]:
    digest = _SSHA[scheme]
    size = digest().digest_size

    def check(value: str, password: bytes) -> bool:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedHash(f"malformed {scheme} hash") from None
        if len(raw) <= size:
            raise MalformedHash(f"malformed {scheme} hash")
        expected, salt = raw[:size], raw[size:]
        return hmac.compare_digest(digest(password + salt).digest(), expected)

    return check


def _verify_plain(value: str, password: bytes) -> bool:
    # Digests of both, so the comparison takes as long whatever the lengths.
    stored = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(stored, hashlib.sha256(password).digest())


#: Dovecot scheme name -> verifier of the value after ``{SCHEME}``
_DOVECOT_VERIFIERS: dict[str, Callable[[str, bytes], bool]] = {
    "ARGON2ID": _verify_argon2("argon2id"),
    "ARGON2I": _verify_argon2("argon2i"),
    "BLF-CRYPT": _verify_bcrypt,
    "SHA512-CRYPT": _verify_crypt("SHA512-CRYPT", _SHA_CRYPT),
    "SHA256-CRYPT": _verify_crypt("SHA256-CRYPT", _SHA_CRYPT),
    "SSHA512": _verify_ssha("SSHA512"),
    "SSHA256": _verify_ssha("SSHA256"),
    "SSHA": _verify_ssha("SSHA"),
    "PLAIN": _verify_plain,
    "CLEAR": _verify_plain,
    "CLEARTEXT": _verify_plain,
}

#: Dovecot's encoding suffixes (``doveadm pw -s SSHA512.HEX``): the value
#: is the scheme's own form, in base64 or hex
_ENCODINGS = {"B64": "base64", "BASE64": "base64", "HEX": "hex"}

#: the ``$id$`` a Dovecot crypt scheme's value must carry
_DOVECOT_CRYPT_IDS = {
    "BLF-CRYPT": ("$2y$", "$2b$", "$2a$"),
    "SHA512-CRYPT": ("$6$",),
    "SHA256-CRYPT": ("$5$",),
}

#: crypt(3) prefix -> (scheme name, verifier of the whole string)
_CRYPT_VERIFIERS: dict[str, tuple[str, Callable[[str, bytes], bool]]] = {
    "$2y$": ("BLF-CRYPT", _verify_bcrypt),
    "$2b$": ("BLF-CRYPT", _verify_bcrypt),
    "$2a$": ("BLF-CRYPT", _verify_bcrypt),
    "$6$": ("SHA512-CRYPT", _verify_crypt("SHA512-CRYPT", _SHA_CRYPT)),
    "$5$": ("SHA256-CRYPT", _verify_crypt("SHA256-CRYPT", _SHA_CRYPT)),
    "$y$": ("YESCRYPT", _verify_crypt("yescrypt", _YESCRYPT)),
    "$apr1$": ("APR1", _verify_apr1),
}


#: the ``$id$`` forms ``{CRYPT}`` may carry: those of :data:`_CRYPT_VERIFIERS`
#: that crypt(3) reads (not Apache's ``$apr1$``)
_DOVECOT_CRYPT = tuple(prefix for prefix in _CRYPT_VERIFIERS if prefix != "$apr1$")


def _split_crypt(value: str) -> tuple[str, str, Callable[[str, bytes], bool]]:
    """
    (scheme, value, verifier) of the value after ``{CRYPT}``: Dovecot hands
    it to crypt(3), so its ``$id$`` decides, as for the same string without
    the prefix.  DES (no ``$id$``) and MD5-crypt (``$1$``) are not read, as
    without the prefix.
    """
    for prefix in _DOVECOT_CRYPT:
        if value.startswith(prefix):
            scheme, check = _CRYPT_VERIFIERS[prefix]
            return scheme, value, check
    raise UnknownScheme(
        "unknown password scheme: {CRYPT} with a crypt(3) form other than "
        "$2y$, $2b$, $2a$ (bcrypt), $6$, $5$ (SHA-crypt) or $y$ (yescrypt)"
    )


def _split(stored: str) -> tuple[str, str, Callable[[str, bytes], bool]]:
    """(scheme, value, verifier) of *stored*; :class:`SchemeError` if none."""
    if stored.startswith("{"):
        m = _DOVECOT.match(stored)
        if m is None:
            raise MalformedHash("malformed {SCHEME} prefix")
        scheme, _, encoding = m.group(1).upper().partition(".")
        value = stored[m.end() :]
        if encoding:
            if encoding not in _ENCODINGS:
                raise UnknownScheme(f"unknown password scheme {{{m.group(1).upper()}}}")
            value = _decoded(scheme, value, _ENCODINGS[encoding])
        if scheme == "CRYPT":
            return _split_crypt(value)
        check = _DOVECOT_VERIFIERS.get(scheme)
        if check is None:
            # The name only: it is no secret (and the value may be one).
            raise UnknownScheme(f"unknown password scheme {{{scheme}}}")
        ids = _DOVECOT_CRYPT_IDS.get(scheme)
        if ids is not None and not value.startswith(ids):
            raise MalformedHash(f"malformed {scheme} hash")
        return scheme, value, check
    for prefix, (scheme, check) in _CRYPT_VERIFIERS.items():
        if stored.startswith(prefix):
            return scheme, stored, check
    raise UnknownScheme("unknown password scheme")


def _decoded(scheme: str, value: str, encoding: str) -> str:
    """
    A ``{SCHEME.B64}`` or ``{SCHEME.HEX}`` value in the scheme's own form:
    the salted SHA schemes' base64 of their bytes, the others' text.
    """
    try:
        if encoding == "hex":
            raw = bytes.fromhex(value)
        else:
            raw = base64.b64decode(value, validate=True)
        if scheme in _SSHA:
            return base64.b64encode(raw).decode("ascii")
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        raise MalformedHash(f"malformed {scheme}.{encoding.upper()} hash") from None


def scheme_of(stored: str) -> str:
    """
    The scheme of a stored value: a Dovecot name (``ARGON2ID``,
    ``BLF-CRYPT``, …), ``YESCRYPT`` or ``APR1``; for ``{CRYPT}``, that of
    the crypt(3) form after it (``{CRYPT}$2y$...`` is ``BLF-CRYPT``).
    Raises like :func:`verify` for an unknown prefix (it does not parse the
    rest).
    """
    return _split(stored)[0]


def verify(stored: str, password: str) -> bool:
    """
    Whether *password* matches the *stored* hash (see the module docstring
    for the forms).  Blocking and CPU-bound: run it in a thread pool.

    Raises :class:`UnknownScheme` or :class:`MalformedHash` (both
    ``ValueError``) for a stored value it cannot use.
    """
    _, value, check = _split(stored)
    encoded = _encode(password)
    if encoded is None:
        return False
    return check(value, encoded)


# --------------------------------------------------------------------------
# making hashes


def _crypt_salt(n: int) -> str:
    alphabet = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _sha_crypt(password: bytes, ident: str) -> str:
    # Dovecot's form: default rounds (5000), 16 salt characters.
    out = crypt_r.crypt(password.decode("utf-8"), f"${ident}${_crypt_salt(16)}$")
    if out is None or out.startswith("*"):  # pragma: no cover - libxcrypt without SHA-crypt
        raise RuntimeError("crypt(3) cannot make SHA-crypt hashes here")
    return str(out)


def hash_password(password: str, scheme: str = "ARGON2ID", params: Params = DEFAULT) -> str:
    """
    A new hash of *password* in Dovecot's ``{SCHEME}`` form, which
    ``doveadm pw -t`` and :func:`verify` accept.  *scheme* is one of
    :data:`HASH_SCHEMES` (any case).

    ``ValueError`` for an unknown scheme, a password containing NUL or
    that is not encodable as UTF-8, and for ``BLF-CRYPT`` a password over 72
    bytes (bcrypt would ignore the rest).  The message never contains the
    password.
    """
    name = scheme.upper()
    if name not in HASH_SCHEMES:
        raise ValueError(
            f"cannot make {scheme[:32]!r} hashes; use one of {', '.join(HASH_SCHEMES)}"
        )
    encoded = _encode(password)
    if encoded is None:
        raise ValueError("a password cannot contain NUL or unpaired surrogates")
    if name in ("ARGON2ID", "ARGON2I"):
        hasher = argon2.PasswordHasher(
            time_cost=params.argon2_time_cost,
            memory_cost=params.argon2_memory_kib,
            parallelism=1,
            hash_len=32,
            salt_len=16,
            type=argon2.Type.ID if name == "ARGON2ID" else argon2.Type.I,
        )
        value = hasher.hash(encoded)
    elif name == "BLF-CRYPT":
        if len(encoded) > BCRYPT_MAX:
            raise ValueError(
                f"bcrypt uses only the first {BCRYPT_MAX} bytes of a password; "
                "this one is longer: use ARGON2ID"
            )
        # $2y$ as Dovecot writes it: the same algorithm as $2b$.
        made = bcrypt.hashpw(encoded, bcrypt.gensalt(params.bcrypt_cost, prefix=b"2b"))
        value = "$2y$" + made.decode("ascii")[4:]
    elif name == "SHA512-CRYPT":
        value = _sha_crypt(encoded, "6")
    elif name == "SHA256-CRYPT":
        value = _sha_crypt(encoded, "5")
    else:
        digest = _SSHA[name]
        salt = os.urandom(16)
        value = base64.b64encode(digest(encoded + salt).digest() + salt).decode("ascii")
    return f"{{{name}}}{value}"


@functools.cache
def dummy(scheme: str = "ARGON2ID", params: Params = DEFAULT) -> str:
    """
    A hash of a random password in *scheme* (one of :data:`DUMMY_SCHEMES`),
    made once per process: verify an unknown user's password against it so
    the answer takes as long as for a known user.  Pick the scheme and
    parameters the store's users have (:func:`scheme_of`).
    """
    name = scheme.upper()
    secret = secrets.token_urlsafe(24)
    if name in HASH_SCHEMES:
        return hash_password(secret, name, params)
    if name in ("PLAIN", "CLEAR", "CLEARTEXT"):
        return f"{{{name}}}{secret}"
    if name == "YESCRYPT":
        # libxcrypt's default cost ("j9T"), as mkpasswd and passwd use
        out = crypt_r.crypt(secret, f"$y$j9T${_crypt_salt(16)}$")
        if out is None or out.startswith("*"):  # pragma: no cover - libcrypt without yescrypt
            raise RuntimeError("crypt(3) cannot make yescrypt hashes here")
        return str(out)
    if name == "APR1":
        return str(apr_md5_crypt.hash(secret))
    raise ValueError(f"no dummy for {scheme[:32]!r}; use one of {', '.join(DUMMY_SCHEMES)}")
