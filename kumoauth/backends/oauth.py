"""
The OAuth 2.0 bearer-token validator behind XOAUTH2 and OAUTHBEARER
(RFC 7628): it decides whether an access token is valid and what its
claims are.  The SASL decoding, the error exchange and the Cred checker
live elsewhere; this module never sees a password.

Two ways to validate, chosen by the token's shape:

- a JWT (RFC 7519: three base64url segments) is verified here, with
  PyJWT, against the issuer's public keys (a JWKS, RFC 7517) fetched from
  ``jwks_url`` or read from ``jwks_file``: an asymmetric signature by a
  key the JWKS holds (``algorithms``, default RS256, ES256, EdDSA; ``none``
  and the HMAC family are never accepted whatever the configuration says,
  since an HMAC "secret" would be the public key anyone can fetch),
  ``iss`` equal to ``issuer``, ``aud`` containing ``audience``, ``exp``
  present and not past, ``nbf`` and ``iat`` not in the future, each
  within ``leeway`` seconds;
- any other token (an opaque one) goes to the RFC 7662 introspection
  endpoint when one is configured (HTTP Basic client authentication,
  RFC 7662 §2.1 and RFC 6749 §2.3.1): ``active`` must be true, ``aud``
  must be present and contain ``audience`` (the endpoint answers for
  every token of the issuer, whatever it was issued for), and ``iss``,
  ``exp``, ``nbf`` and ``iat`` are checked like a JWT's when present.
  With introspection but no JWKS every token is introspected.

Either way the username claim (``username_claim``, default ``email``)
must be a non-empty printable string.

A token that fails is :class:`InvalidToken` (the client gets the RFC 7628
error challenge, then 535); an IdP that cannot be asked (JWKS or
introspection unreachable, timed out, answering nonsense, refusing our
client credentials) is :class:`~kumoauth.backends.base.BackendError`
(454), logged once per change of state, not per attempt.

The JWKS is cached for its ``Cache-Control: max-age`` (bounded to
60 s … 24 h, one hour without one) and fetched again when that ends or a
token names a key id it does not hold, at most once per
``jwks_min_refresh`` seconds for unknown key ids, outage or not;
validations waiting for the same fetch share it.  When a refresh fails,
the keys already held stay in use for up to a day past their lifetime (a
rotation is announced in advance; an IdP outage should not stop mail), and
a reload with the same ``jwks_url`` and ``ca_file`` keeps them.  A key
PyJWT cannot read is skipped, not the whole JWKS.  A ``jwks_file`` is read
again whenever its stat changes.

Everything runs on the reactor: treq for HTTP, and the signature check
inline (100-150 µs of CPU for RS256-2048, ES256 or Ed25519; a whole
validation 160-180 µs, measured on the 2-core reference machine): a thread
hop would cost more than it saves.  No token ever reaches a log line, an exception
message or a repr: only the reason, and a verified token's ``sub`` and
``jti``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlencode, urlsplit

import jwt
import treq.client
from treq.cookies import IndexableCookieJar
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.http_headers import Headers

import kumoauth
from kumoauth.backends.base import BackendError, BackendHealth, default_reactor, parse_table
from kumoauth.backends.base import read_secret_file as _read_secret_file
from kumoauth.backends.http import (
    QuietConnectionPool,
    _Body,
    _closed_unanswered,
    _ready_url,
    _TooBig,
    _where,
    request_within,
)
from kumoauth.checks import _LOOPBACK, _Bad, _bool, _number, _show, _str
from kumoauth.tls.trust import trust_root

#: Signature algorithms that may be allowed: asymmetric only.
SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: the same, for membership tests of values that may not be hashable
_ALG_NAMES = tuple(sorted(SUPPORTED_ALGORITHMS))

#: Longest token looked at; a longer one is refused before any parsing.
MAX_TOKEN = 16 * 1024
#: Largest JWKS or introspection answer read (bytes).
MAX_JWKS = 512 * 1024
MAX_INTROSPECTION = 64 * 1024

#: Bounds of a JWKS's cache lifetime, and the lifetime without Cache-Control.
JWKS_TTL_MIN = 60.0
JWKS_TTL_MAX = 24 * 3600.0
JWKS_TTL_DEFAULT = 3600.0
#: How long keys stay in use past their lifetime while refreshing fails.
JWKS_STALE_MAX = 24 * 3600.0
#: Shortest wait before fetching again after a failed fetch (or
#: ``jwks_min_refresh``, if shorter).
RETRY_AFTER_FAILURE = 5.0

#: Longest sub / jti kept for the log.
_MAX_ID = 256

# A compact JWS: header.payload.signature, unpadded base64url (RFC 7515
# §7.1); the signature may be empty (alg "none", refused later with a
# clear reason).
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_FORBIDDEN = re.compile(r"(?i)none|HS\d*")


# --------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Config:
    """
    ``[auth.oauth]``.  Files (JWKS, client secret, CA) are named, never
    held: a repr shows no secret.
    """

    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    username_claim: str = "email"
    introspection_url: str | None = None
    introspection_client_id: str | None = None
    introspection_secret_file: Path | None = None
    leeway: float = 60.0
    timeout: float = 5.0
    ca_file: Path | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    #: seconds between two JWKS fetches caused by unknown key ids
    jwks_min_refresh: float = 60.0
    #: http:// to a host other than the loopback
    allow_plaintext: bool = False
    #: the scope a client should ask for, in the RFC 7628 error payload
    scope: str | None = None
    #: scopes a token must carry (its ``scope``/``scp`` claim), all of them
    required_scopes: tuple[str, ...] = ()


def _algorithms(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v):
        raise _Bad(f"expected a non-empty list of strings, got {_show(v)}")
    for name in v:
        if _FORBIDDEN.fullmatch(name):
            raise _Bad(
                f'"{name}" is never allowed: an HMAC secret would be the public key, '
                '"none" is no signature'
            )
        if name not in SUPPORTED_ALGORITHMS:
            allowed = ", ".join(sorted(SUPPORTED_ALGORITHMS))
            raise _Bad(f'unsupported algorithm "{name}" (supported: {allowed})')
    return tuple(dict.fromkeys(v))


#: an RFC 6749 §3.3 scope-token
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _scopes(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _Bad(f"expected a list of strings, got {_show(v)}")
    for scope in v:
        if not _SCOPE_TOKEN.fullmatch(scope):
            raise _Bad(f"{_show(scope)} is not a scope (printable ASCII, no space, quote or \\)")
    return tuple(dict.fromkeys(v))


SCHEMA: dict[str, Callable[[Any], Any]] = {
    "issuer": _str,
    "audience": _str,
    "jwks_url": _str,
    "jwks_file": _str,
    "username_claim": _str,
    "introspection_url": _str,
    "introspection_client_id": _str,
    "introspection_secret_file": _str,
    "leeway": _number(0.0),
    "timeout": _number(0.1),
    "ca_file": _str,
    "algorithms": _algorithms,
    "jwks_min_refresh": _number(1.0),
    "allow_plaintext": _bool,
    "scope": _str,
    "required_scopes": _scopes,
}


def validate(raw: Mapping[str, Any], base: Path | None = None, read_files: bool = True) -> Config:
    """
    ``[auth.oauth]`` as a :class:`Config`; relative paths are against
    *base*.  The URLs are checked, and (*read_files*) the JWKS file, the
    client secret and the CA file are read once, so that a mistake in them
    stops start-up (or a reload).  ``ValueError`` with one line, ``key:
    problem``.
    """
    config: Config = parse_table(
        Config,
        raw,
        SCHEMA,
        required=("issuer", "audience"),
        paths=("jwks_file", "introspection_secret_file", "ca_file"),
        base=base,
    )
    if config.jwks_url is not None and config.jwks_file is not None:
        raise ValueError("jwks_url: jwks_url and jwks_file exclude each other")
    if config.jwks_url is None and config.jwks_file is None and config.introspection_url is None:
        raise ValueError("jwks_url: one of jwks_url, jwks_file or introspection_url is required")
    introspection = (
        config.introspection_url,
        config.introspection_client_id,
        config.introspection_secret_file,
    )
    if any(v is not None for v in introspection) and not all(v is not None for v in introspection):
        raise ValueError(
            "introspection_url: introspection_url, introspection_client_id and "
            "introspection_secret_file go together (RFC 7662 §2.1: the client authenticates)"
        )
    https = False
    for key in ("jwks_url", "introspection_url"):
        url = getattr(config, key)
        if url is not None:
            https |= _check_url(key, url, config.allow_plaintext)
    if config.ca_file is not None and not https:
        raise ValueError("ca_file: only for an https:// jwks_url or introspection_url")
    if config.scope is not None and config.required_scopes:
        advertised = set(config.scope.split(" "))
        missing = [s for s in config.required_scopes if s not in advertised]
        if missing:
            # A client asking for what the error reply says would get a
            # token refused again, and again.
            raise ValueError(
                f"scope: the scope to ask for lacks required_scopes {' '.join(missing)}"
            )
    if not read_files:
        return config
    if config.jwks_file is not None:
        _read_jwks_file(config.jwks_file)
    _client_secret(config)
    trust_root(config.ca_file)
    return config


def _check_url(key: str, url: str, allow_plaintext: bool) -> bool:
    """
    Check *url* for *key*; whether it is https.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{key}: not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f'{key}: must start with "https://" or "http://", got "{parts.scheme}:"')
    if not parts.hostname:
        raise ValueError(f"{key}: has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{key}: must not contain a user or password")
    if port == 0:
        raise ValueError(f"{key}: port 0")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK and not allow_plaintext:
        what = (
            "lets anyone on the path replace the issuer's keys"
            if key == "jwks_url"
            else "sends every token and the client secret in clear"
        )
        raise ValueError(
            f"{key}: http:// to {parts.hostname} {what}: use https://, "
            "http:// only to 127.0.0.1 / ::1, or set allow_plaintext = true"
        )
    try:
        _ready_url(url)
    except ValueError as e:
        raise ValueError(f"{key}: {str(e).removeprefix('url: ')}") from None
    return parts.scheme == "https"


def _client_secret(config: Config) -> str | None:
    return _read_secret_file(config.introspection_secret_file, "introspection_secret_file")


# --------------------------------------------------------------------------
# the verdicts


class InvalidToken(Exception):
    """
    The token is not acceptable (→ RFC 7628 error challenge, then 535).

    *reason* is short and loggable ("expired", "bad signature", "wrong
    audience", "unknown kid", "inactive", "malformed", ...): it never
    quotes the token.  *sub* and *jti* are set only from claims whose
    signature (or introspection answer) was verified.
    """

    def __init__(
        self,
        reason: str,
        *,
        scope: str | None = None,
        sub: str | None = None,
        jti: str | None = None,
        status: str = "invalid_token",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        #: the RFC 7628 error status: an RFC 6750 error code
        self.status = status
        self.scope = scope
        self.sub = sub
        self.jti = jti

    def __repr__(self) -> str:
        return f"InvalidToken({self.reason!r}, sub={self.sub!r}, jti={self.jti!r})"


def _identifier(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if isinstance(value, str) and value:
        return value[:_MAX_ID]
    return None


def _refuse(reason: str, claims: Mapping[str, Any] | None = None) -> InvalidToken:
    if claims is None:
        return InvalidToken(reason)
    return InvalidToken(reason, sub=_identifier(claims, "sub"), jti=_identifier(claims, "jti"))


#: PyJWT's errors as reasons; the first class in this order that matches.
#: PyJWT's own messages are not used: some quote parts of the token.
_PYJWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidIssuedAtError, "malformed iat"),
    (jwt.exceptions.InvalidSubjectError, "malformed sub"),
    (jwt.exceptions.InvalidJTIError, "malformed jti"),
    (jwt.InvalidKeyError, "unusable key"),
    (jwt.DecodeError, "malformed"),
)


# --------------------------------------------------------------------------
# claims common to JWTs and introspection answers


def _number_claim(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise _refuse(f"malformed {name}", claims)
    return float(value)


def _check_times(claims: Mapping[str, Any], now: float, leeway: float, require_exp: bool) -> None:
    """
    RFC 7519 §4.1.4-6 with *leeway*: PyJWT's rule for a JWT, applied to an
    introspection answer too; for a JWT it also insists on JSON numbers
    (PyJWT takes ``"123"``).
    """
    exp = _number_claim(claims, "exp")
    nbf = _number_claim(claims, "nbf")
    iat = _number_claim(claims, "iat")
    if exp is None:
        if require_exp:
            raise _refuse("missing exp", claims)
    elif exp <= now - leeway:
        raise _refuse("expired", claims)
    if nbf is not None and nbf > now + leeway:
        raise _refuse("not yet valid", claims)
    if iat is not None and iat > now + leeway:
        raise _refuse("not yet valid", claims)


def _username(claims: Mapping[str, Any], claim: str) -> str:
    value = claims.get(claim)
    if value is None:
        raise _refuse(f"no {claim} claim", claims)
    if not isinstance(value, str) or not value or not value.isprintable():
        raise _refuse(f"unusable {claim} claim", claims)
    if claim == "email" and claims.get("email_verified") in (False, "false"):
        # OpenID Connect: an address the IdP did not verify may be anyone's
        # (a user who set it on their own account: "nOAuth").  Absent,
        # the IdP does not say (some never do): taken.
        raise _refuse("email not verified", claims)
    return value


# --------------------------------------------------------------------------
# keys


_KEY_TYPES = ("RSA", "EC", "OKP")


class _KeySet:
    """
    The usable signing keys of a JWKS: asymmetric (``kty`` RSA, EC, OKP),
    for signatures (``use`` absent or ``"sig"``), each bound to one
    algorithm (its ``alg``, or the one PyJWT derives from its type and
    curve: RSA → RS256, P-256 → ES256, Ed25519 → EdDSA).
    """

    def __init__(self, document: Any) -> None:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError('not a JWKS (a JSON object with a "keys" list)')
        usable = [
            k
            for k in document["keys"]
            if isinstance(k, dict)
            and k.get("kty") in _KEY_TYPES
            and k.get("use", "sig") == "sig"
            and isinstance(k.get("kid", ""), str)
            # no "alg": PyJWT derives it; any other than ours (a list, "none")
            and (k.get("alg") is None or k.get("alg") in _ALG_NAMES)
        ]
        # One key at a time: PyJWKSet skips a key PyJWT refuses, but lets
        # anything else it raises (a TypeError for an "alg" that is a list,
        # NotImplementedError for "none") end the whole set, and with it
        # the IdP's answer, in a traceback.  The JWKS is the IdP's text:
        # whatever one key makes PyJWT raise, the others stay usable.
        keys: list[jwt.PyJWK] = []
        for k in usable:
            try:
                keys.append(jwt.PyJWK(k))
            except Exception:  # noqa: S112  (the IdP's text: the other keys stay usable)
                continue
        self.keys = [k for k in keys if k.algorithm_name in SUPPORTED_ALGORITHMS]
        if not self.keys:
            raise ValueError("the JWKS holds no usable signing key")

    def find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        """
        The key for a token's header: the key with its ``kid`` and
        algorithm; without a kid, the only key of its algorithm.  None
        when no key has the kid (a refresh may bring it).
        """
        if kid is None:
            candidates = [k for k in self.keys if k.algorithm_name == alg]
            if len(candidates) == 1:
                return candidates[0]
            raise InvalidToken("no kid" if candidates else "no key for the algorithm")
        same_kid = [k for k in self.keys if k.key_id == kid]
        for key in same_kid:
            if key.algorithm_name == alg:
                return key
        if same_kid:
            raise InvalidToken("algorithm does not match the key")
        return None


def _parse_jwks(data: bytes) -> _KeySet:
    try:
        document = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("not JSON") from None
    return _KeySet(document)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _read_jwks_file(path: Path) -> _KeySet:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"jwks_file: {path}: {e.strerror}") from None
    try:
        return _parse_jwks(data)
    except ValueError as e:
        raise ValueError(f"jwks_file: {path}: {e}") from None


def _file_stamp(path: Path) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"jwks_file: {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"jwks_file: {path}: not a regular file")
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _FileKeys:
    """
    A JWKS file, read again whenever its stat changes (one stat per
    validation: the operator rotates keys by replacing the file).
    """

    def __init__(self, path: Path, health: BackendHealth) -> None:
        self.path = path
        self.health = health
        self.stamp = _file_stamp(path)
        self.keys = _read_jwks_file(path)

    def start(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        try:
            stamp = _file_stamp(self.path)
            if stamp != self.stamp:
                self.keys = _read_jwks_file(self.path)
                self.stamp = stamp
        except ValueError as e:
            self.health.failed(str(e))
            raise BackendError(str(e)) from None
        self.health.succeeded()
        return self.keys.find(kid, alg)


def _max_age(headers: Headers) -> float:
    """
    The JWKS's cache lifetime from ``Cache-Control`` (RFC 9111 §5.2.2.1
    max-age; no-cache and no-store mean the shortest), bounded.
    """
    ttl = JWKS_TTL_DEFAULT
    for value in headers.getRawHeaders(b"cache-control", []):
        for directive in value.decode("latin-1").split(","):
            name, _, arg = directive.strip().partition("=")
            name = name.strip().lower()
            if name in ("no-cache", "no-store"):
                return JWKS_TTL_MIN
            if name == "max-age":
                try:
                    ttl = float(int(arg.strip().strip('"')))
                except ValueError:
                    continue
    return min(max(ttl, JWKS_TTL_MIN), JWKS_TTL_MAX)


class _RemoteKeys:
    """
    The JWKS at ``jwks_url``: cached, fetched again when its lifetime ends
    and (rate-limited) when a token names an unknown kid; concurrent
    validations share one fetch.
    """

    def __init__(self, config: Config, client: _Client, clock: Any, health: BackendHealth) -> None:
        assert config.jwks_url is not None
        self.url = config.jwks_url
        self.where = _where(config.jwks_url)
        self.client = client
        self.clock = clock
        self.health = health
        self.min_refresh = config.jwks_min_refresh
        self.keys: _KeySet | None = None
        self.expires = 0.0  # when the cached keys' lifetime ends
        self.last_attempt: float | None = None
        #: why the last fetch failed, None after a success
        self.last_failed: str | None = None
        self.fetching: defer.Deferred[None] | None = None
        self.waiters: list[defer.Deferred[None]] = []
        #: fetches made (for the tests and the metrics)
        self.fetches = 0
        #: replaced by a reload to another key source: a fetch still under
        #: way no longer speaks for the IdP's state (the log lines)
        self.retired = False

    def start(self) -> defer.Deferred[None]:
        """
        Prefetch, unless keys are held (kept across a reload); fires when
        done, never fails (the outage is logged).
        """
        if self.keys is not None:
            return defer.succeed(None)

        def logged(f: Failure) -> None:
            f.trap(BackendError)

        return self.refresh().addErrback(logged)

    def adopt(self, config: Config, client: _Client) -> None:
        """
        Serve a reloaded table with the same key source: the cached keys,
        their lifetime, the fetch under way and the rate limits go on; the
        connections and ``jwks_min_refresh`` are the new table's.
        """
        self.client = client
        self.min_refresh = config.jwks_min_refresh

    def refresh(self) -> defer.Deferred[None]:
        """
        Fetch the JWKS, or join the fetch under way.  Each caller gets a
        Deferred of its own: cancelling it does not cancel the fetch.
        """
        waiter: defer.Deferred[None] = defer.Deferred()
        self.waiters.append(waiter)
        if self.fetching is None:
            self.last_attempt = self.clock.seconds()
            self.fetches += 1
            self.fetching = defer.Deferred.fromCoroutine(self._fetch())
            self.fetching.addBoth(self._fetched)
        return waiter

    def _fetched(self, result: Any) -> None:
        self.fetching = None
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if waiter.called:
                continue  # its caller gave up
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    async def _fetch(self) -> None:
        try:
            code, headers, body = await self.client.request(
                b"GET", self.url, MAX_JWKS, Headers({b"Accept": [b"application/json"]})
            )
            if code != 200:
                what = "a redirect, not followed" if 300 <= code < 400 else "expected 200"
                raise BackendError(f"JWKS {self.where}: HTTP {code} ({what})")
            try:
                keys = _parse_jwks(body)
            except ValueError as e:
                raise BackendError(f"JWKS {self.where}: {e}") from None
        except BackendError as e:
            self.last_failed = str(e)
            if e.outage and not self.retired:
                self.health.failed(str(e))
            raise
        self.keys = keys
        self.expires = self.clock.seconds() + _max_age(headers)
        self.last_failed = None
        if not self.retired:
            self.health.succeeded()

    def _may_fetch(self, now: float, unknown_kid: bool = False) -> bool:
        """
        Whether a fetch may start (or be joined) now: ``jwks_min_refresh``
        after the last one; after a failed one, sooner (5 s) when the keys
        are missing or past their lifetime, never sooner for an unknown kid.
        """
        if self.fetching is not None or self.last_attempt is None:
            return True
        failed = self.last_failed is not None and not unknown_kid
        wait = min(self.min_refresh, RETRY_AFTER_FAILURE) if failed else self.min_refresh
        return now - self.last_attempt >= wait

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        now = self.clock.seconds()
        fetched = False
        if self.keys is None and not self._may_fetch(now):
            # The last fetch failed moments ago: do not hammer the IdP.
            self.health.failed(self.last_failed or "no JWKS")
            raise BackendError(self.last_failed or f"JWKS {self.where}: not fetched yet")
        if self.keys is None or now >= self.expires:
            if self._may_fetch(now):
                try:
                    await self.refresh()
                    fetched = True
                except BackendError:
                    # Keys held a while past their lifetime beat an outage.
                    if self.keys is None or now >= self.expires + JWKS_STALE_MAX:
                        raise
        assert self.keys is not None
        key = self.keys.find(kid, alg)
        if key is None and not fetched:
            if self._may_fetch(self.clock.seconds(), unknown_kid=True):
                # An unknown kid: the IdP may have rotated a key in.
                await self.refresh()
                key = self.keys.find(kid, alg)
            elif self.last_failed is not None:
                # The IdP is down: whether the kid is a rotated key cannot
                # be known now, and made-up kids may not make us ask again.
                raise BackendError(self.last_failed)
        return key


# --------------------------------------------------------------------------
# HTTP to the IdP


class _Client:
    """
    The connections to the IdP (JWKS and introspection): treq over an
    Agent with persistent connections, TLS verified against ``ca_file`` or
    the system's CAs, no cookies, no redirects, bounded bodies and one
    deadline per request.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        self.reactor = reactor
        self.timeout = config.timeout
        self.pool = QuietConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        agent = web_client.Agent(
            reactor,
            contextFactory=web_client.BrowserLikePolicyForHTTPS(
                trustRoot=trust_root(config.ca_file)
            ),
            connectTimeout=config.timeout,
            pool=self.pool,
        )
        jar = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self.http = treq.client.HTTPClient(agent, cookiejar=jar)
        self.user_agent = f"kumoauth/{kumoauth.__version__}".encode()

    def request(
        self, method: bytes, url: str, limit: int, headers: Headers, body: bytes | None = None
    ) -> defer.Deferred[tuple[int, Headers, bytes]]:
        """
        ``(status, headers, body)``; :class:`BackendError` naming the URL
        (without its query) when there is no usable answer within
        ``timeout``.
        """
        where = _where(url)
        headers = headers.copy()
        headers.setRawHeaders(b"User-Agent", [self.user_agent])
        work = self._ask(method, url, where, limit, headers, body)
        return request_within(work, self.timeout, self.reactor, where)

    async def _ask(
        self,
        method: bytes,
        url: str,
        where: str,
        limit: int,
        headers: Headers,
        body: bytes | None,
    ) -> tuple[int, Headers, bytes]:
        try:
            response = await self._send(method, url, headers, body)
        except Exception as e:
            # A kept-alive connection the IdP closed as the request left:
            # one more try (Agent retries only idempotent requests itself).
            if not _closed_unanswered(e):
                raise
            response = await self._send(method, url, headers, body)
        reader = _Body(limit, response.length)
        response.deliverBody(reader)
        try:
            data = await reader.done
        except _TooBig:
            raise BackendError(
                f"{where}: HTTP {response.code} with a body over {limit} bytes"
            ) from None
        return response.code, response.headers, data

    def _send(self, method: bytes, url: str, headers: Headers, body: bytes | None) -> Any:
        return self.http.request(
            method.decode("ascii"),
            _ready_url(url),
            headers=headers,
            data=body,
            allow_redirects=False,
            unbuffered=True,
            reactor=self.reactor,
        )

    def retire(self) -> defer.Deferred[None]:
        self.reactor.callLater(self.timeout + 1, self.pool.closeCachedConnections)
        d: defer.Deferred[None] = self.pool.closeCachedConnections()
        return d


class _Introspection:
    """
    RFC 7662 token introspection with HTTP Basic client authentication.
    The secret is read when the validator is made (and on reload).
    """

    def __init__(self, config: Config, client: _Client, health: BackendHealth) -> None:
        assert config.introspection_url is not None
        assert config.introspection_client_id is not None
        self.url = config.introspection_url
        self.where = _where(config.introspection_url)
        self.client = client
        self.health = health
        secret = _client_secret(config)
        assert secret is not None
        # RFC 6749 §2.3.1: both parts form-urlencoded, then Basic.
        pair = f"{quote(config.introspection_client_id, safe='')}:{quote(secret, safe='')}"
        self._authorization = b"Basic " + base64.b64encode(pair.encode("utf-8"))

    def __repr__(self) -> str:
        return f"<introspection {self.where}>"

    async def introspect(self, token: str) -> dict[str, Any]:
        body = urlencode({"token": token, "token_type_hint": "access_token"}).encode("ascii")
        headers = Headers(
            {
                b"Content-Type": [b"application/x-www-form-urlencoded"],
                b"Accept": [b"application/json"],
                b"Authorization": [self._authorization],
            }
        )
        try:
            code, _, data = await self.client.request(
                b"POST", self.url, MAX_INTROSPECTION, headers, body
            )
            answer = self._answer(code, data)
        except BackendError as e:
            if e.outage:
                self.health.failed(str(e))
            raise
        self.health.succeeded()
        active = answer.get("active")
        if active is False:
            raise InvalidToken("inactive")
        return answer

    def _answer(self, code: int, data: bytes) -> dict[str, Any]:
        # Bodies are never quoted: an error page might echo the token.
        if code in (401, 403):
            raise BackendError(
                f"introspection {self.where}: HTTP {code}: the IdP refused kumoauth's "
                "client id or secret"
            )
        if code != 200:
            what = "a redirect, not followed" if 300 <= code < 400 else "expected 200"
            raise BackendError(f"introspection {self.where}: HTTP {code} ({what})")
        try:
            answer = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BackendError(f"introspection {self.where}: an answer that is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
            raise BackendError(
                f'introspection {self.where}: an answer without "active": true or false'
            )
        return answer


def _token_scopes(claims: Mapping[str, Any]) -> set[str]:
    """
    The scopes a token was granted: ``scope`` (RFC 9068, RFC 7662: one
    string, space-separated) and ``scp`` (a list, or such a string: Okta,
    Entra ID), together.
    """
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split(" "))
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found


def _check_scopes(config: Config, claims: Mapping[str, Any]) -> None:
    if not config.required_scopes:
        return
    granted = _token_scopes(claims)
    missing = [s for s in config.required_scopes if s not in granted]
    if missing:
        # RFC 6750 §3.1; the names are the operator's, loggable.
        # (The error reply names the scope to ask for: error_json.)
        raise InvalidToken(
            "missing scope " + " ".join(missing),
            status="insufficient_scope",
            sub=_identifier(claims, "sub"),
            jti=_identifier(claims, "jti"),
        )


def _audience_contains(claims: Mapping[str, Any], audience: str) -> bool:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return aud == audience
    return isinstance(aud, list) and audience in aud


# --------------------------------------------------------------------------
# the validator


class _Health:
    """
    The IdP's state logs, process-lived: a reload during an outage neither
    logs it again nor loses its end.
    """

    def __init__(self) -> None:
        self.jwks = BackendHealth("oauth-jwks")
        self.introspection = BackendHealth("oauth-introspection")


class _Setup:
    """
    One configuration's client, keys and introspection; a reload makes a
    new one, which keeps the previous one's JWKS cache when the key source
    (``jwks_url`` and ``ca_file``) is the same.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        clock: Any,
        health: _Health,
        previous: _Setup | None = None,
    ) -> None:
        self.config = config
        self.client = _Client(config, reactor)
        kept = previous.keys if previous is not None else None
        if not (
            isinstance(kept, _RemoteKeys)
            and previous is not None
            and config.jwks_url is not None
            and (previous.config.jwks_url, previous.config.ca_file)
            == (config.jwks_url, config.ca_file)
        ):
            kept = None
        self.keys: _FileKeys | _RemoteKeys | None = None
        if kept is not None:
            self.keys = kept  # adopted below, once nothing can fail
        elif config.jwks_url is not None:
            self.keys = _RemoteKeys(config, self.client, clock, health.jwks)
        elif config.jwks_file is not None:
            self.keys = _FileKeys(config.jwks_file, health.jwks)
        self.introspection: _Introspection | None = None
        if config.introspection_url is not None:
            self.introspection = _Introspection(config, self.client, health.introspection)
        # Never "none" or HMAC, whatever the table said (validate() refuses
        # them too; a Config made by hand does not go through it).
        self.algorithms = [
            a
            for a in config.algorithms
            if a in SUPPORTED_ALGORITHMS and not _FORBIDDEN.fullmatch(a)
        ]
        if kept is not None:
            kept.adopt(config, self.client)
        elif previous is not None and isinstance(previous.keys, _RemoteKeys):
            previous.keys.retired = True


class TokenValidator:
    """
    Validates bearer tokens for ``[auth.oauth]`` (see the module's
    docstring).  *clock* (``seconds()``, default the reactor) times the
    JWKS cache; token times (``exp``, ``nbf``, ``iat``) are checked
    against the wall clock.  *pool* is accepted like every store's and not
    used: nothing here blocks.
    """

    def __init__(
        self, config: Config, reactor: Any = None, pool: Any = None, clock: Any = None
    ) -> None:
        self.reactor = default_reactor(reactor)
        self.clock = clock if clock is not None else self.reactor
        self._health = _Health()
        self._setup = _Setup(config, self.reactor, self.clock, self._health)

    @property
    def config(self) -> Config:
        return self._setup.config

    def username(self, claims: Mapping[str, Any]) -> str:
        """
        The username in a valid token's *claims* (``username_claim``).
        """
        return _username(claims, self.config.username_claim)

    def validate(self, token: str) -> defer.Deferred[dict[str, Any]]:
        """
        Fires with the claims of a valid *token*; fails with
        :class:`InvalidToken` or :class:`BackendError`.
        """
        return defer.Deferred.fromCoroutine(self._validate(self._setup, token))

    async def _validate(self, setup: _Setup, token: str) -> dict[str, Any]:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            raise InvalidToken("malformed")
        if setup.keys is not None and _JWT_SHAPE.fullmatch(token):
            claims = await self._verify_jwt(setup, token)
        elif setup.introspection is not None:
            claims = await setup.introspection.introspect(token)
            self._check_introspected(setup.config, claims)
        else:
            raise InvalidToken("not a JWT")
        _username(claims, setup.config.username_claim)
        _check_scopes(setup.config, claims)
        return claims

    async def _verify_jwt(self, setup: _Setup, token: str) -> dict[str, Any]:
        config = setup.config
        assert setup.keys is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in setup.algorithms:
            # alg "none" and HS256 (the public key as HMAC secret) end here,
            # before any key is looked at.
            raise InvalidToken("algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed")
        key = await setup.keys.key_for(kid, alg)
        if key is None:
            raise InvalidToken("unknown kid")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.MissingRequiredClaimError as e:
            raise _refuse(f"missing {e.claim}", _verified_payload(token)) from None
        except jwt.PyJWTError as e:
            raise self._pyjwt_refusal(e, token) from None
        if not isinstance(claims, dict):
            raise InvalidToken("malformed")
        _check_times(claims, _now(), config.leeway, require_exp=True)
        return claims

    @staticmethod
    def _pyjwt_refusal(e: Exception, token: str) -> InvalidToken:
        reason = next((r for cls, r in _PYJWT_REASONS if isinstance(e, cls)), "invalid")
        # PyJWT checks the claims only after the signature: their sub and
        # jti are the issuer's, and may be logged.
        signed = reason not in ("bad signature", "algorithm not allowed", "malformed", "invalid")
        return _refuse(reason, _verified_payload(token) if signed else None)

    @staticmethod
    def _check_introspected(config: Config, claims: dict[str, Any]) -> None:
        iss = claims.get("iss")
        if iss is not None and iss != config.issuer:
            raise _refuse("wrong issuer", claims)
        if "aud" not in claims:
            raise _refuse("missing aud", claims)
        if not _audience_contains(claims, config.audience):
            raise _refuse("wrong audience", claims)
        _check_times(claims, _now(), config.leeway, require_exp=False)

    def error_json(self, error: InvalidToken) -> bytes:
        """
        The RFC 7628 §3.2.2 server error payload, compact and in a fixed
        key order (status, scope, openid-configuration).
        """
        payload: dict[str, str] = {"status": error.status}
        scope = error.scope if error.scope is not None else self.config.scope
        if scope is None and self.config.required_scopes:
            scope = " ".join(self.config.required_scopes)
        if scope is not None:
            payload["scope"] = scope
        issuer = self.config.issuer.rstrip("/")
        payload["openid-configuration"] = f"{issuer}/.well-known/openid-configuration"
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    def start(self) -> defer.Deferred[None]:
        """
        Prefetch the JWKS.  The Deferred fires when that is done and never
        fails: an IdP that is down is logged, and asked again at the first
        token.
        """
        keys = self._setup.keys
        return keys.start() if keys is not None else defer.succeed(None)

    def reload(self, config: Config) -> defer.Deferred[None]:
        """
        Take the new table: new connections, the old ones closed once idle.
        The JWKS cache is kept when ``jwks_url`` and ``ca_file`` are the
        same (keys held through an IdP outage stay in use); another key
        source starts empty and is fetched.  A file that cannot be read
        raises ``ValueError`` and keeps what was.
        """
        old = self._setup
        self._setup = _Setup(config, self.reactor, self.clock, self._health, old)
        self.start()
        return old.client.retire()

    def stop(self) -> defer.Deferred[None]:
        return self._setup.client.retire()

    def __repr__(self) -> str:
        return f"<TokenValidator {self.config.issuer}>"


def _now() -> float:
    return time.time()


def _verified_payload(token: str) -> dict[str, Any]:
    """
    The payload of a token whose signature was verified, read again
    without the claim checks that refused it (for its sub and jti).
    """
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return cast(dict[str, Any], payload) if isinstance(payload, dict) else {}
