"""
The shared store (``store = "redis://…"``, ``"rediss://…"``, ``"unix://…"``):
one Redis that every kumoauth process and host uses, so the failure
throttles, the sending limits, the fingerprint salt and the cache
generation hold across all of them.

Settings (one URL)::

    redis://[[user]:password@]host[:port][/db][?prefix=…&timeout=…&password_file=…]
    rediss://[[user]:password@]host[:port][/db][?prefix=…&timeout=…&ca_file=…&password_file=…]
    unix:///path/to/redis.sock[?db=N&prefix=…&timeout=…&password_file=…]

``prefix`` (default ``"kumoauth:"``) starts every key; ``timeout`` (default
1 s) bounds each operation, waiting for the connection included.
``rediss://`` always verifies the server's certificate, against ``ca_file``
(PEM) or the system's CAs, and its name (the host of the URL).  A password
is given in the URL (percent-encode ``@ : / ? #`` in it) or, better, in
``password_file`` (its first line; the URL then holds no secret).

Every operation that reads and writes is one Lua script (EVALSHA, loaded
with SCRIPT LOAD on each new connection, EVAL when Redis answers NOSCRIPT)
timed by Redis's own clock (``TIME``), so hosts whose clocks disagree
still agree on windows; operations of one command (GET, INCR, DEL) are sent
as that command.  Keys::

    <prefix>fail:<key>      ZSET fingerprint -> time seen (µs), expires with the window
    <prefix>count:<key>     counter, expires at the end of its window
    <prefix>secret:<name>   32 bytes, set once (GET, then SET NX if missing), read once
    <prefix>gen:<name>      integer (INCR)

The connection is made on first use and again on the first use after it is
lost; after a failed attempt, operations fail at once (no waiting) until
a back-off delay (0.25 s doubling to 4 s) has passed.  Every failure is a
:class:`~kumoauth.stores.StoreUnavailable` whose message names the store
(its URL without the password) and the cause, never a secret.  The store
logs nothing itself: each caller logs one line when it finds the store
unavailable and one when it is available again, saying what that means
(``failure store unavailable: redis://…: connection refused; AUTH gets
454 …``).  A line of the store's own besides would say the same thing
twice.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import txredisapi
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

from kumoauth.stores import (
    ICounterStore,
    IFailureStore,
    ISharedState,
    IStoreAdmin,
    StoreUnavailable,
)
from kumoauth.textsafe import escape
from kumoauth.tls.trust import trust_root

DEFAULT_PORT = 6379
DEFAULT_PREFIX = "kumoauth:"
DEFAULT_TIMEOUT = 1.0
MAX_TIMEOUT = 60.0
SECRET_SIZE = 32
#: seconds between comparisons of a held secret with Redis's
SECRET_RESYNC = 30.0

#: keys one admin SCAN step asks for
SCAN_COUNT = 500

#: the longest path a UNIX socket address holds (Linux sun_path, less the NUL)
MAX_SOCKET_PATH = 107


# --------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Settings:
    """A parsed ``store`` URL.  ``display`` is the URL without its password."""

    scheme: str
    display: str
    host: str | None = None
    port: int = DEFAULT_PORT
    path: str | None = None
    db: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    trust_root: Any = field(default=None, repr=False, compare=False)


_OPTIONS = {
    "redis": ("prefix", "timeout", "password_file"),
    "rediss": ("prefix", "timeout", "password_file", "ca_file"),
    "unix": ("db", "prefix", "timeout", "password_file"),
}
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_USAGE = (
    'write "redis://[[user]:password@]host[:port][/db][?options]", '
    '"rediss://…" or "unix:///path/to/redis.sock[?options]"'
)


#: options that name a file
_FILE_OPTIONS = ("password_file", "ca_file")


def with_files_under(spec: str, base: Path) -> str:
    """
    *spec* with a relative ``password_file`` or ``ca_file`` made absolute
    against *base* (the configuration file's directory), as every path in
    the configuration is; the rest of the URL byte for byte.  A spec that
    is not a Redis URL with such options comes back unchanged (its errors
    are :func:`parse_spec`'s to report).
    """
    head, sep, query = spec.partition("?")
    if not sep or "://" not in head or head.partition("://")[0].lower() not in _OPTIONS:
        return spec
    items = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        if eq and value and name in _FILE_OPTIONS:
            try:
                path = Path(unquote(value, errors="strict"))
            except UnicodeDecodeError:
                path = Path("/")  # parse_spec says what is wrong with it
            if not path.is_absolute():
                item = f"{name}={quote(str(base / path), safe='/')}"
        items.append(item)
    return f"{head}?{'&'.join(items)}"


def parse_spec(spec: str) -> Settings:
    """
    The :class:`Settings` of a ``store`` URL; ``ValueError`` with one line
    that never holds the password (nor any part of a URL that has one).
    """
    if not isinstance(spec, str):
        raise ValueError(f"a Redis store is a URL: {_USAGE}")
    secret = "@" in spec

    def shown(text: str) -> str:
        # Once a URL holds a password, a piece of it could be part of the
        # password (a "/" or "?" in it not percent-encoded): never echo.
        return "(not shown: the URL has a password)" if secret else repr(escape(text, 80))

    scheme, sep, rest = spec.partition("://")
    if not sep:
        raise ValueError(f"not a URL: {_USAGE}")
    scheme = scheme.lower()
    if scheme not in _OPTIONS:
        name = scheme if re.fullmatch(r"[a-z][a-z0-9+.-]{0,20}", scheme) else "?"
        raise ValueError(f'unknown scheme "{name}": {_USAGE}')
    if any(c in rest for c in "#\r\n\x00") or any(c.isspace() for c in rest):
        raise ValueError(
            "spaces, control characters and '#' are not allowed in the URL "
            "(percent-encode them in a password or prefix)"
        )
    base, _, query = rest.partition("?")
    options = _parse_query(scheme, query, shown)
    if scheme == "unix":
        return _unix_settings(base, options, shown)
    return _tcp_settings(scheme, base, options, shown)


def _parse_query(scheme: str, query: str, shown: Callable[[str], str]) -> dict[str, str]:
    options: dict[str, str] = {}
    if not query:
        return options
    allowed = _OPTIONS[scheme]
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"option {shown(item)} has no '=': write name=value")
        if name not in allowed:
            hint = " (only with rediss://)" if name == "ca_file" else ""
            raise ValueError(
                f"unknown option {shown(name)}{hint}: {scheme}:// takes " + ", ".join(allowed)
            )
        if name in options:
            raise ValueError(f"option {name} given twice")
        options[name] = _unquote(value, name)
    return options


def _unquote(text: str, what: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{what}: its percent-encoding is not UTF-8") from None


def _common(options: dict[str, str], password: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "prefix" in options:
        out["prefix"] = options["prefix"]
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
        except ValueError:
            raise ValueError("timeout is not a number of seconds") from None
        if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
            raise ValueError(f"timeout must be above 0 and at most {MAX_TIMEOUT:g} seconds")
        out["timeout"] = timeout
    if "password_file" in options:
        if password is not None:
            raise ValueError("a password in the URL and a password_file: give one")
        password = _read_password(options["password_file"])
    out["password"] = password
    return out


def _read_password(path: str) -> str:
    if not path:
        raise ValueError("password_file is empty: give a path")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"password_file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"password_file {path}: not UTF-8 text") from None
    lines = text.splitlines()
    password = lines[0].strip() if lines else ""
    if not password:
        raise ValueError(f"password_file {path}: its first line is empty")
    return password


def _db(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise ValueError("the database is a number (/0, /1 … or ?db=N for unix://)")
    return int(text)


def _tcp_settings(
    scheme: str, base: str, options: dict[str, str], shown: Callable[[str], str]
) -> Settings:
    authority, slash, path = base.partition("/")
    username = password = None
    if "@" in authority:
        # The last "@": a password holding "@" needs no escaping.
        userinfo, _, authority = authority.rpartition("@")
        user, colon, pw = userinfo.partition(":")
        if not colon:
            raise ValueError("a user name without a password: write user:password@host")
        username = _unquote(user, "the user name") or None
        password = _unquote(pw, "the password")
        if not password:
            raise ValueError("the password in the URL is empty")
    elif "@" in path or "@" in base:
        raise ValueError("'/' in a password must be percent-encoded (%2F)")
    if authority.startswith("["):
        inside, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise ValueError("an IPv6 address needs its closing ']'")
        try:
            host = str(ipaddress.IPv6Address(inside))
        except ValueError:
            raise ValueError(f"{shown(inside)} is not an IPv6 address") from None
        host_shown = f"[{host}]"
        if after and not after.startswith(":"):
            raise ValueError("only ':port' may follow an IPv6 address")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text_ = authority.partition(":")
        port_text = port_text_ if colon else None
        if ":" in port_text_:
            raise ValueError("an IPv6 address goes in brackets: redis://[2001:db8::1]:6379")
        if not host:
            raise ValueError(f"no host: {_USAGE}")
        if not _HOST.fullmatch(host) or len(host) > 253:
            raise ValueError(f"{shown(host)} is not a host name or address")
        host_shown = host
    port = DEFAULT_PORT
    if port_text is not None:
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 0 < int(port_text) < 65536:
            raise ValueError("the port is a number from 1 to 65535")
        port = int(port_text)
    db = _db(path) if slash and path else None
    common = _common(options, password)
    root = None
    ca_file = options.get("ca_file")
    if scheme == "rediss" and ca_file is not None:
        root = trust_root(ca_file)
    display = f"{scheme}://"
    if common["password"] is not None and "password_file" not in options:
        display += f"{username or ''}:***@"
    elif username:
        display += f"{username}@"
    display += f"{host_shown}:{port}" + (f"/{db}" if db is not None else "")
    return Settings(
        scheme=scheme,
        display=display,
        host=host,
        port=port,
        db=db,
        username=username,
        ca_file=ca_file,
        trust_root=root,
        **common,
    )


def _unix_settings(base: str, options: dict[str, str], shown: Callable[[str], str]) -> Settings:
    if "@" in base:
        raise ValueError("unix:// takes no password in the URL: use ?password_file=")
    if not base.startswith("/"):
        raise ValueError('unix:// needs an absolute path: "unix:///run/redis/redis.sock"')
    path = _unquote(base, "the socket path")
    if path.endswith("/") or "\x00" in path:
        raise ValueError(f"{shown(path)} is not a socket path")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_SOCKET_PATH:
        raise ValueError(f"the socket path is longer than {MAX_SOCKET_PATH} bytes")
    db = _db(options["db"]) if "db" in options else None
    common = _common(options, None)
    display = f"unix://{escape(path, 120)}" + (f"?db={db}" if db is not None else "")
    return Settings(scheme="unix", display=display, path=path, db=db, **common)


# --------------------------------------------------------------------------
# scripts

# Times are microseconds of the Redis server's clock.  Numbers sent back to
# Redis go through string.format('%d'): tostring() would print 1.7e+15.
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# KEYS[1] failure set; ARGV: fingerprint, window (µs), keep.  The newest
# entry keeps the largest score, even if TIME steps back or two records
# share a microsecond, so "oldest" is always the first inserted.
_RECORD = (
    _NOW
    + """
local key = KEYS[1]
local window = tonumber(ARGV[2])
local keep = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - window))
local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) >= now then now = tonumber(newest[2]) + 1 end
redis.call('ZADD', key, string.format('%d', now), ARGV[1])
local n = redis.call('ZCARD', key)
if n > keep then
  redis.call('ZREMRANGEBYRANK', key, 0, n - keep - 1)
  n = keep
end
redis.call('PEXPIRE', key, math.max(1, math.ceil(window / 1000)))
return n
"""
)

# KEYS[1] failure set; ARGV: window (µs).  -> {count, µs until the oldest leaves}
_COUNT = (
    _NOW
    + """
local key = KEYS[1]
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - window))
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
if not oldest[2] then return {0, 0} end
return {redis.call('ZCARD', key), tonumber(oldest[2]) + window - now}
"""
)

# KEYS[1] counter; ARGV: amount (< 0 gives back), window (ms), limit, and for a
# give-back the epoch ms its window was to end (0: any).
# -> {allowed, count, ms left}
_ADD = """
local key = KEYS[1]
local amount = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local count = tonumber(redis.call('GET', key) or '0')
local ttl = redis.call('PTTL', key)
if amount < 0 then
  if ttl == -2 then return {1, 0, 0} end
  local due = tonumber(ARGV[4])
  if due > 0 and ttl > 0 then
    -- only to the window it was counted in, not one started since
    local t = redis.call('TIME')
    local ends = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
    if math.abs(ends - due) > math.min(1000, window / 2) then
      return {1, count, ttl}
    end
  end
  local n = redis.call('INCRBY', key, amount)
  if n < 0 then
    redis.call('INCRBY', key, -n)
    n = 0
  end
  return {1, n, ttl}
end
if count + amount > limit then
  if ttl == -1 then
    redis.call('PEXPIRE', key, window)
    ttl = window
  elseif ttl < 0 then
    ttl = window
  end
  return {0, count, ttl}
end
if ttl == -2 then
  redis.call('SET', key, string.format('%d', count + amount), 'PX', window)
  ttl = window
else
  redis.call('INCRBY', key, amount)
  if ttl == -1 then
    redis.call('PEXPIRE', key, window)
    ttl = window
  end
end
return {1, count + amount, ttl}
"""

# KEYS[1] counter.  -> {count, ms left}
_GET = """
local count = redis.call('GET', KEYS[1])
if not count then return {0, 0} end
return {tonumber(count), math.max(0, redis.call('PTTL', KEYS[1]))}
"""

# KEYS[1] secret; ARGV[1] fresh random bytes, kept only if there are none yet.
# GET first: a Redis that refuses writes (maxmemory with noeviction answers
# OOM to any SET) still gives the secret it holds.
_SET_ONCE = """
local value = redis.call('GET', KEYS[1])
if value then return value end
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

# KEYS: failure sets; ARGV[1] the fingerprint to take out of each
# (IFailureStore.forget: a password verified since it was counted).
_FORGET = """
for _, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[1])
end
return 0
"""

# KEYS: failure sets.  -> {zcard1, pttl1, zcard2, pttl2, ...}
_SIZES = """
local out = {}
for i, key in ipairs(KEYS) do
  out[#out + 1] = redis.call('ZCARD', key)
  out[#out + 1] = redis.call('PTTL', key)
end
return out
"""


class Script:
    """A Lua script and its SHA1, for EVALSHA."""

    def __init__(self, source: str) -> None:
        self.source = source.strip().encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest()  # noqa: S324 - Redis's script id


SCRIPTS = {
    name: Script(source)
    for name, source in (
        ("record", _RECORD),
        ("count", _COUNT),
        ("add", _ADD),
        ("get", _GET),
        ("secret", _SET_ONCE),
        ("sizes", _SIZES),
        ("forget", _FORGET),
    )
}


# --------------------------------------------------------------------------
# the connection


class _Protocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    """txredisapi's protocol, telling its store when the connection is lost."""

    store: RedisStore

    #: why the connection was lost (for the operations it fails)
    lost_reason: str | None = None

    def connectionLost(self, why: Failure) -> None:  # noqa: N802 - Twisted's name
        self.lost_reason = describe(why)
        # The store first: callbacks of the replies failed below must not
        # be handed this connection again.
        self.store._lost(self, why)
        super().connectionLost(why)


class _ProtocolFactory(Factory):
    """
    What txredisapi's protocol expects of its factory, without the pool:
    the store makes (and remakes) its one connection itself.
    """

    noisy = False
    isLazy = False  # noqa: N815 - txredisapi's name; False: it logs nothing itself

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def buildProtocol(self, addr: Any) -> _Protocol:  # noqa: N802
        s = self.store.settings
        p = _Protocol(
            charset=None,  # replies as bytes: fingerprints and secrets are binary
            password=s.password,
            dbid=s.db,
            convertNumbers=False,
            username=s.username,
        )
        p.factory = self
        p.store = self.store
        return p

    def stopTrying(self) -> None:  # noqa: N802
        # txredisapi calls this when AUTH or SELECT fails; the store retries
        # later on its own (the password may be fixed in Redis meanwhile).
        pass

    def connectionError(self, why: str) -> None:  # noqa: N802
        self.store._setup_failed(why)


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return escape(lines[0], 200) if lines else "error"


def _redis_error(message: str) -> str:
    return "Redis: " + _first_line(message)


def describe(reason: Failure | BaseException) -> str:
    """A short cause for a log line and a StoreUnavailable, never a secret."""
    e = reason.value if isinstance(reason, Failure) else reason
    if e is None:
        return "error"
    if isinstance(e, StoreUnavailable):
        return str(e)
    if isinstance(e, txredisapi.ResponseError):
        return _redis_error(str(e.args[0]) if e.args else "error")
    if isinstance(e, txredisapi.ConnectionError):
        return "connection lost"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError | defer.TimeoutError):
        return "connection timed out"
    if isinstance(e, error.DNSLookupError):
        return "host name not found"
    if isinstance(e, error.ConnectionDone):
        return "connection closed by Redis"
    if isinstance(e, error.ConnectionLost):
        return "connection lost"
    if isinstance(e, error.ConnectError):
        os_error = getattr(e, "osError", None)
        if isinstance(os_error, OSError) and os_error.strerror:
            return f"cannot connect: {os_error.strerror}"
        return f"cannot connect: {e.args[0] if e.args else type(e).__name__}"
    module = type(e).__module__
    if module.startswith("service_identity"):
        return "TLS: the certificate does not name the host of the URL"
    if module.startswith("OpenSSL"):
        return f"TLS: {_tls_reason(e)}"
    return f"{type(e).__name__}: {e}"


def _tls_reason(e: BaseException) -> str:
    try:
        # OpenSSL.SSL.Error([(library, function, reason), ...])
        reasons = [r[-1] for r in e.args[0] if r and r[-1]]
        if reasons:
            return "; ".join(str(r) for r in reasons)
    except Exception:  # noqa: S110 - any shape: fall back to the text
        pass
    return str(e) or type(e).__name__


@implementer(IFailureStore, ICounterStore, ISharedState, IStoreAdmin)
class RedisStore:
    """
    The shared store on one Redis connection (commands are pipelined on
    it).  *clock* is the reactor: it times operations and makes the
    connection.
    """

    #: other processes see the same state
    shared = True

    #: after a failed connection attempt, operations fail at once for this
    #: long, then the next one tries again; doubled per failure up to
    #: MAX_BACKOFF, back to MIN_BACKOFF once connected
    MIN_BACKOFF = 0.25
    MAX_BACKOFF = 4.0

    def __init__(self, settings: Settings, clock: IReactorTime) -> None:
        self.settings = settings
        self.clock = clock
        self.prefix = settings.prefix
        self.timeout = settings.timeout
        self._endpoint = self._make_endpoint(settings)
        self._factory = _ProtocolFactory(self)
        self._closed = False
        #: the usable connection
        self._protocol: _Protocol | None = None
        #: an attempt: the endpoint's Deferred, then the connection doing AUTH/SELECT
        self._attempting = False
        self._connecting: defer.Deferred[Any] | None = None
        self._pending: _Protocol | None = None
        self._setup_error: str | None = None
        self._attempt_timer: Any = None
        self._waiters: list[defer.Deferred[Any]] = []
        #: why the last attempt failed, and when the next may start
        self._down: str | None = None
        self._retry_at = 0.0
        self._backoff = self.MIN_BACKOFF
        self._close_waiters: list[defer.Deferred[None]] = []
        #: secrets once read, kept across a reload with the store, and
        #: compared with Redis's every SECRET_RESYNC seconds (see secret()):
        #: name -> (value, when it was last compared)
        self._secrets: dict[str, tuple[bytes, float]] = {}

    def _make_endpoint(self, s: Settings) -> Any:
        reactor: Any = self.clock
        if s.scheme == "unix":
            assert s.path is not None
            return UNIXClientEndpoint(reactor, s.path, timeout=self.timeout)
        assert s.host is not None
        endpoint: Any = HostnameEndpoint(reactor, s.host, s.port, timeout=self.timeout)
        if s.scheme == "rediss":
            endpoint = wrapClientTLS(optionsForClientTLS(s.host, trustRoot=s.trust_root), endpoint)
        return endpoint

    def __repr__(self) -> str:
        return f"<RedisStore {self.settings.display} prefix={self.prefix!r}>"

    # --- connection --------------------------------------------------------

    def _connection(self) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(StoreUnavailable("store closed"))
        if self._protocol is not None:
            return defer.succeed(self._protocol)
        if not self._attempting:
            if self._down is not None and self.clock.seconds() < self._retry_at:
                return defer.fail(StoreUnavailable(self._down))
            self._start_attempt()
            if self._protocol is not None:
                return defer.succeed(self._protocol)
            if not self._attempting:
                return defer.fail(StoreUnavailable(self._down or "cannot connect"))
        waiter: defer.Deferred[Any] = defer.Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def _start_attempt(self) -> None:
        self._attempting = True
        self._setup_error = None
        self._attempt_timer = self.clock.callLater(self.timeout, self._attempt_timed_out)
        connecting = self._connecting = self._endpoint.connect(self._factory)
        connecting.addCallbacks(self._transport_up, self._connect_failed)

    def _transport_up(self, protocol: _Protocol) -> None:
        self._connecting = None
        if not self._attempting or self._closed:
            protocol.transport.loseConnection()
            return
        self._pending = protocol
        protocol.whenConnected().addCallback(self._load_scripts)

    def _load_scripts(self, protocol: _Protocol) -> None:
        """
        After AUTH and SELECT: SCRIPT LOAD every script.  A connection is
        usable once Redis has answered on it (a TLS handshake that fails,
        a Redis that accepts connections but is stopped, fail the attempt).
        """
        if protocol is not self._pending:
            return
        loads = [
            defer.maybeDeferred(protocol.execute_command, "SCRIPT", "LOAD", script.source)
            for script in SCRIPTS.values()
        ]
        # An error reply (NOAUTH ...) is an answer too: operations report it.
        defer.DeferredList(loads, consumeErrors=True).addCallback(lambda _: self._ready(protocol))

    def _connect_failed(self, reason: Failure) -> None:
        if self._connecting is None:
            return  # cancelled by the attempt's timer or close(), already handled
        self._connecting = None
        self._attempt_failed(describe(reason))

    def _attempt_timed_out(self) -> None:
        self._attempt_timer = None
        why = f"no connection within {self.timeout:g} s"
        connecting, self._connecting = self._connecting, None
        pending, self._pending = self._pending, None
        self._attempt_failed(why)
        if connecting is not None:
            connecting.cancel()
        if pending is not None:
            pending.transport.abortConnection()

    def _setup_failed(self, why: str) -> None:
        # txredisapi: "Redis error: could not auth: WRONGPASS ..." or "...
        # could not set dbid=N: ..." (Redis's words, never the password).
        _, auth, detail = why.partition("could not auth: ")
        if auth:
            self._setup_error = "authentication failed: " + _first_line(detail)
        else:
            _, select, detail = why.partition("could not set dbid=")
            self._setup_error = "cannot select database " + _first_line(detail if select else why)

    def _ready(self, protocol: _Protocol) -> None:
        if protocol is not self._pending or not protocol.connected:
            return
        self._pending = None
        self._attempting = False
        self._cancel_attempt_timer()
        if self._closed:
            protocol.transport.loseConnection()
            return
        self._protocol = protocol
        self._down = None
        self._backoff = self.MIN_BACKOFF
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _attempt_failed(self, why: str) -> None:
        if not self._attempting:
            return
        self._attempting = False
        self._cancel_attempt_timer()
        self._mark_down(why)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(StoreUnavailable(why))

    def _mark_down(self, why: str) -> None:
        self._down = why
        self._retry_at = self.clock.seconds() + self._backoff
        self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)

    def _cancel_attempt_timer(self) -> None:
        timer, self._attempt_timer = self._attempt_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _lost(self, protocol: _Protocol, why: Failure) -> None:
        if protocol is self._protocol:
            # The next operation connects again at once.
            self._protocol = None
        elif protocol is self._pending:
            self._pending = None
            self._attempt_failed(self._setup_error or describe(why))
        if self._protocol is None and self._pending is None and self._connecting is None:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)

    def _stalled(self, protocol: Any) -> None:
        """An operation got no answer in time: drop the connection (a peer
        that stopped answering leaves it open forever) and back off."""
        current = self._protocol
        if current is not None and protocol is current:
            self._protocol = None
            self._mark_down(f"no answer within {self.timeout:g} s")
            current.transport.abortConnection()

    # --- operations ----------------------------------------------------------

    def _call(self, send: Callable[[Any], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        """
        Run *send(connection)* within the timeout; its failures become
        StoreUnavailable naming the store (the caller logs what that
        means, once per state change).  The caller may cancel: the
        connection stays usable for the others.
        """
        timed_out = False
        used: list[Any] = []

        def on_connection(protocol: Any) -> defer.Deferred[Any]:
            used.append(protocol)
            return send(protocol)

        d = self._connection().addCallback(on_connection)

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self.clock.callLater(self.timeout, expire)

        def finish(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                if result.check(defer.CancelledError) and not timed_out:
                    return result  # the caller cancelled: not the store's fault
                if self._closed:
                    raise StoreUnavailable("store closed")
                if timed_out:
                    why = f"no answer within {self.timeout:g} s"
                    if used:
                        self._stalled(used[0])
                elif result.check(txredisapi.ConnectionError) and used and used[0].lost_reason:
                    why = self._redact(used[0].lost_reason)
                else:
                    why = self._redact(describe(result))
                raise StoreUnavailable(f"{self.settings.display}: {why}")
            return result

        return d.addBoth(finish)

    def _script(self, name: str, keys: list[bytes], args: list[Any]) -> defer.Deferred[Any]:
        script = SCRIPTS[name]

        def send(protocol: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = protocol.execute_command(
                "EVALSHA", script.sha, len(keys), *keys, *args
            )

            def noscript(failure: Failure) -> Any:
                if failure.check(txredisapi.ResponseError) and str(failure.value).startswith(
                    "NOSCRIPT"
                ):
                    return protocol.execute_command("EVAL", script.source, len(keys), *keys, *args)
                return failure

            return d.addErrback(noscript)

        return self._call(send)

    def _command(self, *args: Any) -> defer.Deferred[Any]:
        return self._call(lambda protocol: protocol.execute_command(*args))

    def _key(self, kind: str, name: str) -> bytes:
        return f"{self.prefix}{kind}:{name}".encode("utf-8", "surrogatepass")

    def _redact(self, text: str) -> str:
        password = self.settings.password
        if password and password in text:
            text = text.replace(password, "***")
        return text

    # --- IFailureStore -------------------------------------------------------

    def record(self, key: str, fingerprint: bytes, window: float, keep: int) -> defer.Deferred[int]:
        d = self._script(
            "record", [self._key("fail", key)], [bytes(fingerprint), _us(window), max(keep, 1)]
        )
        return d.addCallback(int)

    def count(self, key: str, window: float) -> defer.Deferred[tuple[int, float]]:
        d = self._script("count", [self._key("fail", key)], [_us(window)])

        def convert(reply: list[int]) -> tuple[int, float]:
            n, left = int(reply[0]), int(reply[1])
            return (n, min(max(0.0, left / 1e6), max(0.0, window)) if n else 0.0)

        return d.addCallback(convert)

    def forget(self, key: str, user_key: str | None, fingerprint: bytes) -> defer.Deferred[None]:
        keys = [self._key("fail", k) for k in (key, user_key) if k is not None]
        return self._script("forget", keys, [bytes(fingerprint)]).addCallback(lambda _: None)

    # --- ICounterStore -------------------------------------------------------

    def add(
        self, key: str, amount: int, window: float, limit: int, until: float | None = None
    ) -> defer.Deferred[tuple[bool, int, float]]:
        argv = [int(amount), _ms(window), int(limit), 0 if until is None else _ms(until)]
        d = self._script("add", [self._key("count", key)], argv)
        return d.addCallback(lambda r: (bool(int(r[0])), int(r[1]), max(0, int(r[2])) / 1000))

    def get(self, key: str) -> defer.Deferred[tuple[int, float]]:
        d = self._script("get", [self._key("count", key)], [])
        return d.addCallback(lambda r: (int(r[0]), max(0, int(r[1])) / 1000))

    def reset(self, key: str) -> defer.Deferred[bool]:
        return self._command("DEL", self._key("count", key)).addCallback(lambda n: int(n) > 0)

    # --- ISharedState --------------------------------------------------------

    def secret(self, name: str) -> defer.Deferred[bytes]:
        """
        The secret *name* every instance sharing this Redis uses: made once
        (SET NX) by the first to ask.  Compared again every
        :data:`SECRET_RESYNC` seconds, offering the one held here: after a
        Redis restart (or an eviction) the first instance back writes the
        secret they all had, and one started meanwhile, which made a new
        one, takes whichever Redis holds; the instances agree again within
        that time instead of until each restarts.
        """
        now = self.clock.seconds()
        held = self._secrets.get(name)
        if held is not None and now - held[1] < SECRET_RESYNC:
            return defer.succeed(held[0])
        offer = held[0] if held is not None else os.urandom(SECRET_SIZE)
        d = self._script("secret", [self._key("secret", name)], [offer])

        def check(value: Any) -> bytes:
            if not isinstance(value, bytes) or len(value) != SECRET_SIZE:
                raise StoreUnavailable(
                    f"the secret {name!r} in Redis is not {SECRET_SIZE} bytes "
                    f"(delete {self.prefix}secret:{name} to make a new one)"
                )
            self._secrets[name] = (value, now)
            return value

        def unavailable(f: Any) -> Any:
            if held is not None and f.check(StoreUnavailable):
                return held[0]  # Redis down: the one held; it is what the counts were made with
            return f

        return d.addCallbacks(check, unavailable)

    def generation(self, name: str) -> defer.Deferred[int]:
        d = self._command("GET", self._key("gen", name))
        return d.addCallback(lambda v: _integer(v, f"{self.prefix}gen:{name}"))

    def bump(self, name: str) -> defer.Deferred[int]:
        return self._command("INCR", self._key("gen", name)).addCallback(int)

    # --- IStoreAdmin ---------------------------------------------------------

    def failures(self, kind: str) -> defer.Deferred[list[tuple[str, int, float]]]:
        return defer.Deferred.fromCoroutine(self._failures(kind))

    async def _failures(self, kind: str) -> list[tuple[str, int, float]]:
        start = self._key("fail", kind + ":")
        pattern = _glob_escape(start) + b"*"
        out: list[tuple[str, int, float]] = []
        cursor: bytes = b"0"
        while True:
            reply = await self._command("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
            cursor, keys = reply[0], [k for k in reply[1] if k.startswith(start)]
            if keys:
                sizes = await self._script("sizes", keys, [])
                for i, key in enumerate(keys):
                    n, ttl = int(sizes[2 * i]), int(sizes[2 * i + 1])
                    if n > 0:
                        out.append((_key_name(key[len(start) :]), n, max(0, ttl) / 1000))
            if cursor in (b"0", 0, "0"):
                return out

    def clear_failures(self, key: str) -> defer.Deferred[int]:
        return self._command("DEL", self._key("fail", key)).addCallback(int)

    def close(self) -> defer.Deferred[None]:
        """
        Drop the connection (an attempt in progress too); operations fail
        with StoreUnavailable from now on.  Fires once disconnected.
        """
        self._closed = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(StoreUnavailable("store closed"))
        connecting, self._connecting = self._connecting, None
        self._attempting = False
        self._cancel_attempt_timer()
        if connecting is not None:
            connecting.cancel()
            connecting.addErrback(lambda _: None)
        live = [p for p in (self._protocol, self._pending) if p is not None]
        if not live:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(done)
        for protocol in live:
            protocol.transport.loseConnection()
        return done


def _us(seconds: float) -> int:
    return int(round(seconds * 1_000_000))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _integer(value: Any, key: str) -> int:
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StoreUnavailable(f"{key} in Redis is not a number") from None


def _glob_escape(raw: bytes) -> bytes:
    return re.sub(rb"([\\*?\[\]])", rb"\\\1", raw)


def from_spec(spec: str, clock: IReactorTime) -> RedisStore:
    """
    The store of a ``store`` URL (module docstring); ``ValueError`` with one
    line, never holding the password.  Connects on first use.
    """
    return RedisStore(parse_spec(spec), clock)


def _key_name(raw: bytes) -> str:
    """
    A key's name as :meth:`RedisStore._key` wrote it (UTF-8, lone
    surrogates passed); bytes another program wrote under our prefix that
    are not UTF-8 come back as surrogate escapes, to be shown escaped.
    """
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")
