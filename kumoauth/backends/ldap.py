"""
LDAP: find the user's entry with a search, then bind as that entry with the
password the client gave ("search, then bind", RFC 4513 §5.1.3 simple
bind).  The directory checks the password itself, in whatever scheme it
stores it; kumoauth never sees a hash.

One attempt:

1. the user name goes into ``filter`` RFC 4515-escaped (§3: ``*``, ``(``,
   ``)``, ``\\``, NUL and the other control characters become ``\\2a``
   ...), so a name is always a value and never filter syntax;
2. a search under ``base`` (as ``bind_dn``, or anonymously) on one of the
   pooled search connections, asking for no attributes and at most two
   entries: none → 535, two or more → 535 and one log line per user
   (ambiguous: the filter or the directory needs fixing);
3. a simple bind as the entry's DN with the password on a separate
   connection (a bind changes a connection's identity, and RFC 4511 §4.2.1
   forbids other operations during one): success (0) → 235 with
   ``ldap_dn`` in conn_meta, invalidCredentials (49) → 535, anything else
   → 454.

An empty password is refused before anything is sent: an empty simple
bind is an *unauthenticated* bind (RFC 4513 §5.1.2) that many servers
answer with success.  For an unknown user the bind connection still makes
one round trip (a WhoAmI, RFC 4532, that carries no password) so the answer
takes about as long as a wrong password's.

Everything is on the reactor (ldaptor is Twisted-native): no thread per
attempt, TLS through Twisted with the certificate and host name always
verified.  Referrals are not followed: a search reference is ignored, a
referral result is a 454.
"""

from __future__ import annotations

import collections
import re
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kumoauth.backends.base import (
    DENIED,
    BackendError,
    ICredentialStore,
    OncePer,
    ReactorThreads,
    StoreChecker,
    Verdict,
    default_reactor,
    parse_table,
    read_secret_file,
)
from kumoauth.checks import (
    _LOOPBACK,
    _Bad,
    _bool,
    _choice,
    _int,
    _ldap_attribute,
    _number,
    _str,
)
from kumoauth.textsafe import escape
from kumoauth.tls.trust import trust_root

with warnings.catch_warnings():
    # ldaptor 21.2 builds its filter grammar with pyparsing's old camelCase
    # names, each of which warns once at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from ldaptor import ldapfilter
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapclient import LDAPClient

log = Logger(namespace="kumoauth.backends")

DEFAULT_FILTER = "(|(uid={user})(mail={user}))"

#: ``scope`` → the SearchRequest scope (RFC 4511 §4.5.1.2)
SCOPES = {"base": 0, "one": 1, "sub": 2}

#: default ports (RFC 4516 §2; ldaps is IANA's 636)
PORTS = {"ldap": 389, "ldaps": 636}

# LDAP result codes (RFC 4511 Appendix A) this module acts on or names.
SUCCESS = 0
SIZE_LIMIT_EXCEEDED = 4
INVALID_CREDENTIALS = 49
#: bind answers about this one entry (an ACL, a lockout policy), not the
#: server: 454 for this user, logged once, the backend not marked down
USER_PROBLEMS = frozenset({48, 50, 53})
RESULT_NAMES = {
    0: "success",
    1: "operationsError",
    2: "protocolError",
    3: "timeLimitExceeded",
    4: "sizeLimitExceeded",
    7: "authMethodNotSupported",
    8: "strongerAuthRequired",
    10: "referral",
    11: "adminLimitExceeded",
    13: "confidentialityRequired",
    32: "noSuchObject",
    34: "invalidDNSyntax",
    48: "inappropriateAuthentication",
    49: "invalidCredentials",
    50: "insufficientAccessRights",
    51: "busy",
    52: "unavailable",
    53: "unwillingToPerform",
    80: "other",
}

#: the WhoAmI extended operation (RFC 4532): a round trip without a password
WHOAMI_OID = b"1.3.6.1.4.1.4203.1.11.3"


def result_name(code: int) -> str:
    return f"{RESULT_NAMES.get(code, 'result')} ({code})"


# --------------------------------------------------------------------------
# configuration


def escape_filter_value(value: str) -> str:
    """
    *value* as a filter assertion value (RFC 4515 §3): the characters that
    would end or widen it — ``*`` ``(`` ``)`` ``\\`` and NUL — as ``\\XX``,
    and the other ASCII control characters too (the filter parser would
    turn a TAB into spaces).  Every other character, non-ASCII included,
    stands for itself (UTF-8 on the wire).
    """
    return value.translate(_FILTER_ESCAPES)


_FILTER_ESCAPES = {c: f"\\{c:02x}" for c in (*range(0x20), 0x7F, *b"*()\\")}


def parse_filter(text: str) -> Any:
    """
    *text* (an RFC 4515 filter) as ldaptor's filter object; ``ValueError``
    when it does not parse.
    """
    try:
        return ldapfilter.toplevel.parse_string(text, parse_all=True)[0]
    except ldapfilter.ParseException as e:
        raise ValueError(
            f"not an LDAP filter (RFC 4515): {e.msg} at character {e.loc + 1}"
        ) from None


def filter_for(template: str, user: str) -> Any:
    """
    The search filter for *user*: ``{user}`` in *template* replaced by the
    escaped name, parsed.
    """
    return parse_filter(template.replace("{user}", escape_filter_value(user)))


def _url(v: Any) -> str:
    text = _str(v)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise _Bad(f"not a URL: {e}") from None
    if parts.scheme not in PORTS:
        # The scheme only: the rest may hold a password (ldapx://cn=admin:secret@…).
        got = f'"{escape(parts.scheme, 20)}:"' if parts.scheme else "no scheme"
        raise _Bad(f'expected "ldap://host[:port]" or "ldaps://host[:port]", got {got}')
    if not parts.hostname:
        raise _Bad("names no host")
    if parts.username is not None or parts.password is not None:
        raise _Bad("must not hold a user or password (use bind_dn and bind_password_file)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _Bad("must be only scheme, host and port (base, scope and filter are keys)")
    if port == 0:
        raise _Bad("port 0")
    return text


def _filter(v: Any) -> str:
    text = _str(v)
    if "{user}" not in text:
        raise _Bad("must contain {user}, where the user name goes")
    try:
        filter_for(text, "user")
    except ValueError as e:
        raise _Bad(str(e)) from None
    return text


@dataclass(frozen=True)
class Config:
    """
    ``[auth.ldap]``.
    """

    url: str
    base: str
    filter: str = DEFAULT_FILTER
    scope: str = "sub"
    bind_dn: str = ""
    bind_password_file: Path | None = None
    start_tls: bool = False
    ca_file: Path | None = None
    timeout: float = 5.0
    pool_size: int = 4
    #: the entry's attribute whose value is the account's name (authn_id),
    #: or None: the login as typed
    username_attribute: str | None = None


SCHEMA: dict[str, Callable[[Any], Any]] = {
    "url": _url,
    "base": _str,
    "filter": _filter,
    "scope": _choice(*SCOPES),
    "bind_dn": _str,
    "bind_password_file": _str,
    "start_tls": _bool,
    "ca_file": _str,
    "timeout": _number(0.1),
    "pool_size": _int(1),
    "username_attribute": _ldap_attribute,
}


def validate(raw: Mapping[str, Any], base: Path | None = None) -> Config:
    """
    ``[auth.ldap]`` as a :class:`Config`; the bind password file and the CA
    file are read now, so a mistake stops start-up (or the reload).
    ``ValueError``: ``key: problem``.
    """
    config: Config = parse_table(
        Config,
        raw,
        SCHEMA,
        required=("url", "base"),
        paths=("bind_password_file", "ca_file"),
        base=base,
    )
    ldaps = config.url.startswith("ldaps:")
    if config.start_tls and ldaps:
        raise ValueError("start_tls: not with ldaps:// (TLS from the first byte already)")
    if config.ca_file is not None and not (ldaps or config.start_tls):
        raise ValueError("ca_file: only used with ldaps:// or start_tls = true")
    if config.bind_dn and config.bind_password_file is None:
        raise ValueError("bind_password_file: required with bind_dn")
    if config.bind_password_file is not None and not config.bind_dn:
        raise ValueError("bind_password_file: only used with bind_dn")
    read_secret_file(config.bind_password_file, "bind_password_file")
    trust_root(config.ca_file)
    return config


_EXTENSIONS = {
    "bindname": "bind_dn",
    "x-bind-password-file": "bind_password_file",
    "x-start-tls": "start_tls",
    "x-ca-file": "ca_file",
    "x-timeout": "timeout",
    "x-pool-size": "pool_size",
}


def from_argstring(arg: str) -> Config:
    """
    ``twistd kumoauth --auth ldap:<arg>``: *arg* is an LDAP URL (RFC 4516)::

        ldap[s]://host[:port]/<base>[?[<attributes>][?[<scope>][?[<filter>][?<extensions>]]]]

    e.g. ``ldap://ldap.example.com/ou=people,dc=example,dc=com??sub?(uid={user})``.
    The base and the filter are percent-decoded.  Attributes must be empty
    (none are read).  An omitted scope is ``sub`` (RFC 4516 would say
    ``base``, which finds no user under a base DN), an omitted filter the
    default filter.  Extensions, comma-separated, set the other keys:
    ``bindname=<dn>`` (RFC 4516's name for the bind DN),
    ``x-bind-password-file=<path>``, ``x-start-tls``, ``x-ca-file=<path>``,
    ``x-timeout=<seconds>``, ``x-pool-size=<n>`` (a leading ``!``, critical,
    is accepted).  ``ValueError`` with one line.
    """
    m = re.fullmatch(r"(?P<url>ldaps?://[^/?#]+)(?:/(?P<rest>.*))?", arg, flags=re.DOTALL)
    if m is None:
        raise ValueError("expected an LDAP URL: ldap[s]://host[:port]/<base>??<scope>?<filter>")
    parts = (m["rest"] or "").split("?")
    if len(parts) > 5:
        raise ValueError('too many "?" in the LDAP URL (percent-encode "?" as %3F)')
    parts += [""] * (5 - len(parts))
    dn, attributes, scope, filter_, extensions = parts
    raw: dict[str, Any] = {"url": m["url"], "base": unquote(dn)}
    if attributes:
        raise ValueError("attributes: must be empty (the backend reads no attribute)")
    if scope:
        raw["scope"] = scope
    if filter_:
        raw["filter"] = unquote(filter_)
    for item in extensions.split(",") if extensions else []:
        name, eq, value = item.lstrip("!").partition("=")
        key = _EXTENSIONS.get(name.lower())
        if key is None:
            known = ", ".join(_EXTENSIONS)
            raise ValueError(f"LDAP URL extension {name!r} unknown (known: {known})")
        value = unquote(value)
        if key == "start_tls":
            raw[key] = value.lower() not in ("false", "0", "no") if eq else True
        elif key in ("timeout", "pool_size"):
            try:
                raw[key] = float(value) if key == "timeout" else int(value)
            except ValueError:
                raise ValueError(f"{name}: expected a number, got {value!r}") from None
        else:
            raw[key] = value
    return validate(raw)


# --------------------------------------------------------------------------
# the connection


@dataclass(frozen=True)
class _Settings:
    """
    A :class:`Config` read for use: the address, the TLS options, the bind
    password (never in a repr).
    """

    url: str
    host: str
    port: int
    tls: str | None  # "ldaps", "starttls" or None
    tls_options: Any = field(repr=False)
    base: str
    scope: int
    filter: str
    bind_dn: str
    bind_password_file: Path | None
    timeout: float
    pool_size: int

    @classmethod
    def of(cls, config: Config) -> _Settings:
        parts = urlsplit(config.url)
        scheme, host = parts.scheme, parts.hostname or ""
        tls = "ldaps" if scheme == "ldaps" else "starttls" if config.start_tls else None
        options = None
        if tls is not None:
            options = optionsForClientTLS(host, trustRoot=trust_root(config.ca_file))
        port = parts.port or PORTS[scheme]
        return cls(
            url=_display(scheme, host, port),
            host=host,
            port=port,
            tls=tls,
            tls_options=options,
            base=config.base,
            scope=SCOPES[config.scope],
            filter=config.filter,
            bind_dn=config.bind_dn,
            bind_password_file=config.bind_password_file,
            timeout=config.timeout,
            pool_size=config.pool_size,
        )


def _display(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Lost(Exception):
    """
    The connection went away (or never came) before the answer.
    """


@implementer(IHandshakeListener)
class _Connection(LDAPClient):  # type: ignore[misc]
    """
    ldaptor's client protocol, plus: a Deferred for the TLS handshake (so
    nothing is sent before the certificate is verified), the reason the
    connection was lost in words, and no traceback for an answer ldaptor
    cannot decode (the connection is dropped instead).
    """

    def __init__(self) -> None:
        super().__init__()
        self.why: str | None = None
        self.handshake_done = False
        self.waiting_handshake: list[defer.Deferred[None]] = []
        self.waiting_lost: list[defer.Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        try:
            super().dataReceived(data)
        except Exception:
            self.why = "the server's answer is not LDAP"
            self.buffer = b""
            self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        waiting, self.waiting_handshake = self.waiting_handshake, []
        for d in waiting:
            d.callback(None)

    def handshake(self) -> defer.Deferred[None]:
        if self.handshake_done:
            return defer.succeed(None)
        if not self.connected:
            return defer.fail(_Lost(self.why or "connection lost"))
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting_handshake.append(d)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.why is None:
            self.why = describe(reason)
        waiting, self.waiting_handshake = self.waiting_handshake, []
        super().connectionLost(reason)
        for d in waiting:
            d.errback(_Lost(self.why))
        lost, self.waiting_lost = self.waiting_lost, []
        for d in lost:
            d.callback(None)

    def when_lost(self) -> defer.Deferred[None]:
        if not self.connected:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting_lost.append(d)
        return d

    def usable(self) -> bool:
        # Not "nothing on the wire": ldaptor forgets a request only after
        # its answer's callbacks ran, and the pool takes the connection
        # back inside them.  A pool connection has one operation at a time,
        # and one that timed out was dropped.
        return bool(self.connected) and self.why is None

    def close(self) -> None:
        """
        Unbind and close when idle; drop at once with a request in flight.
        """
        if not self.connected:
            return
        if self.onwire:
            self.transport.abortConnection()
            return
        try:
            self.unbind()
        except Exception:
            self.transport.abortConnection()


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting factory" line per connection

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection()


def describe(reason: Any) -> str:
    """
    Why a connection failed or was lost, in a few words (no traceback).
    """
    value = reason.value if isinstance(reason, Failure) else reason
    if isinstance(value, _Lost):
        return str(value)
    if isinstance(value, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, net_error.DNSLookupError):
        return "host name not found"
    if isinstance(
        value,
        net_error.TimeoutError | defer.TimeoutError | net_error.ConnectingCancelledError,
    ):
        # A connect cut off at [auth.ldap] timeout is a cancelled connect
        # (HostnameEndpoint's), which said "ConnectingCancelledError:
        # HostnameAddress(…)".
        return "no connection (timed out)"
    if isinstance(value, net_error.ConnectionDone):
        return "closed by the server"
    if isinstance(value, net_error.ConnectionLost):
        return "connection lost"
    if type(value).__name__ == "VerificationError":
        return "TLS: the server's certificate is not for this host name"
    if type(value).__module__.startswith("OpenSSL"):
        args = getattr(value, "args", ())
        errors = args[0] if args and isinstance(args[0], list) else []
        reasons = [e[2] for e in errors if isinstance(e, tuple) and len(e) == 3 and e[2]]
        return "TLS: " + ("; ".join(reasons) or type(value).__name__)
    return f"{type(value).__name__}: {value}"


class _Pool:
    """
    Up to *size* connections (open or opening) of one kind, each used by
    one operation at a time; an idle one is reused, a broken one replaced.
    When all are busy an attempt waits for one.
    """

    def __init__(self, settings: _Settings, opener: Callable[[], Awaitable[_Connection]]) -> None:
        self.settings = settings
        self.opener = opener
        self.idle: list[_Connection] = []
        self.busy = 0
        self.waiting: collections.deque[defer.Deferred[None]] = collections.deque()
        self.closed = False

    async def acquire(self, timed: Callable[..., Awaitable[Any]]) -> tuple[_Connection, bool]:
        """
        A connection, and whether it was used before.
        """
        while True:
            while self.idle:
                conn = self.idle.pop()
                if conn.usable():
                    self.busy += 1
                    return conn, True
            if self.busy < self.settings.pool_size:
                self.busy += 1
                try:
                    return await self.opener(), False
                except BaseException:
                    self.busy -= 1
                    self._wake()
                    raise
            d: defer.Deferred[None] = defer.Deferred()
            self.waiting.append(d)
            await timed(d, None, "waiting for a free connection")

    def release(self, conn: _Connection, reuse: bool) -> None:
        self.busy -= 1
        if reuse and not self.closed and conn.usable():
            self.idle.append(conn)
        else:
            conn.close()
        self._wake()

    def _wake(self) -> None:
        while self.waiting:
            d = self.waiting.popleft()
            if not d.called:
                d.callback(None)
                return

    def close(self) -> list[_Connection]:
        """
        No more reuse: idle connections are closed now, busy ones when
        released; waiting attempts go on (on a connection of their own).
        """
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        while self.waiting:
            d = self.waiting.popleft()
            if not d.called:
                d.callback(None)
        return idle


# --------------------------------------------------------------------------
# the store


@implementer(ICredentialStore)
class LDAP:
    """
    Users in an LDAP directory: search for the user's entry, bind as it.

    For a policy::

        from kumoauth.backends.ldap import LDAP
        directory = LDAP("ldaps://ldap.example.com", "ou=people,dc=example,dc=com")

    takes the keys of ``[auth.ldap]`` as keyword arguments (paths as
    strings or :class:`~pathlib.Path`).  The network work is all on the
    reactor; *pool* (default: the reactor's threads) only reads
    ``bind_password_file`` when a search connection opens.
    """

    name = "ldap"

    def __init__(
        self,
        url: str,
        base: str,
        *,
        filter: str = DEFAULT_FILTER,
        scope: str = "sub",
        bind_dn: str = "",
        bind_password_file: str | Path | None = None,
        start_tls: bool = False,
        ca_file: str | Path | None = None,
        timeout: float = 5.0,
        pool_size: int = 4,
        username_attribute: str | None = None,
        reactor: Any = None,
        pool: Any = None,
    ) -> None:
        raw: dict[str, Any] = {
            "url": url,
            "base": base,
            "filter": filter,
            "scope": scope,
            "start_tls": start_tls,
            "timeout": timeout,
            "pool_size": pool_size,
        }
        if bind_dn:
            raw["bind_dn"] = bind_dn
        if bind_password_file is not None:
            raw["bind_password_file"] = str(bind_password_file)
        if ca_file is not None:
            raw["ca_file"] = str(ca_file)
        if username_attribute is not None:
            raw["username_attribute"] = username_attribute
        self._setup(validate(raw), reactor, pool)

    @classmethod
    def from_config(cls, config: Config, reactor: Any = None, pool: Any = None) -> LDAP:
        store = cls.__new__(cls)
        store._setup(config, reactor, pool)
        return store

    def _setup(self, config: Config, reactor: Any, pool: Any) -> None:
        self.reactor = default_reactor(reactor)
        self.pool = pool if pool is not None else ReactorThreads(self.reactor)
        self.ambiguous = OncePer()
        self.user_problems = OncePer()
        self._use(config)

    def _use(self, config: Config) -> None:
        settings = _Settings.of(config)
        self.config = config
        self.settings = settings
        self.searches = _Pool(settings, lambda: self._open(settings, service=True))
        self.binds = _Pool(settings, lambda: self._open(settings, service=False))
        if settings.tls is None and settings.host not in _LOOPBACK:
            log.warn(
                "auth backend ldap: {url} without TLS: passwords cross the network in clear "
                "(use ldaps:// or start_tls = true)",
                url=settings.url,
            )

    def __repr__(self) -> str:
        return f"<LDAP {self.settings.url} base={self.settings.base!r}>"

    # -- ICredentialStore ------------------------------------------------

    def subscribe(self, listener: Callable[[], None]) -> None:
        """
        A directory does not say when an entry changes: nothing to do.
        """

    def check(
        self, authz: str, authc: str, password: str, conn_meta: Any = None
    ) -> defer.Deferred[Verdict]:
        return defer.Deferred.fromCoroutine(self._check(authz or authc, authc, password))

    async def _check(self, authz: str, authc: str, password: str) -> Verdict:
        # An empty password would make an unauthenticated bind (RFC 4513
        # §5.1.2), which servers may answer with success: never sent.
        if not authc or not password or authz != authc:
            return DENIED
        if not (_utf8(authc) and _utf8(password)):
            # an unpaired surrogate cannot go on the wire: no such user,
            # rather than an "outage" any client could cause at will
            return DENIED
        searches, binds = self.searches, self.binds
        try:
            search_filter = filter_for(searches.settings.filter, authc)
        except ValueError:
            # Only a filter whose {user} is not in a value's place gets here.
            if self.user_problems.first((authc, "filter")):
                log.warn(
                    "auth backend ldap: no valid filter for user {user}; refused "
                    "(is {{user}} inside a value in the filter?)",
                    user=escape(authc),
                )
            return DENIED
        named = self.config.username_attribute
        if named is None:
            found = await self._on(
                searches, lambda c: self._search(c, searches.settings, search_filter, _dn)
            )
        else:
            wanted = named.split(";")[0].lower()
            found = await self._on(
                searches,
                lambda c: self._search(
                    c,
                    searches.settings,
                    search_filter,
                    lambda m: (_dn(m), _values(m, wanted)),
                    named,
                ),
            )
        one = self._one_entry(found, authc)
        dn, account = (
            (one, None) if named is None or one is None else (one[0], _account(one[1], authc))
        )
        if not dn:
            # as long as a bind takes, with no password sent
            await self._on(binds, lambda c: self._whoami(c, binds.settings))
            return DENIED
        code = await self._on(binds, lambda c: self._bind(c, binds.settings, dn, password))
        if code == SUCCESS:
            return Verdict(True, {"ldap_dn": dn.decode("utf-8", "replace")}, user=account)
        if code == INVALID_CREDENTIALS:
            return DENIED
        if code in USER_PROBLEMS:
            if self.user_problems.first((authc, code)):
                log.error(
                    "auth backend ldap: bind as {dn} answered {result}; "
                    "this user gets 454 until the directory says otherwise",
                    dn=escape(dn),
                    result=result_name(code),
                )
            raise BackendError(f"bind answered {result_name(code)}", outage=False)
        raise BackendError(f"{binds.settings.url}: bind answered {result_name(code)}")

    # -- other lookups (sender binding) ------------------------------------

    def attribute_values(self, user: str, attribute: str) -> defer.Deferred[list[str] | None]:
        """
        The values of *attribute* in *user*'s entry, found with the same
        escaped search as authentication (``filter`` under ``base``, on the
        search connections): ``[]`` when the entry has none, None when no
        entry or more than one matches (the latter logged once per user).
        Values are UTF-8 decoded (what does not decode is replaced).
        :class:`BackendError` when the directory cannot answer.
        """
        return defer.Deferred.fromCoroutine(self._attribute_values(user, attribute))

    async def _attribute_values(self, user: str, attribute: str) -> list[str] | None:
        if not user or not _utf8(user):
            return None
        searches = self.searches
        try:
            search_filter = filter_for(searches.settings.filter, user)
        except ValueError:
            return None
        wanted = attribute.split(";")[0].lower()
        found = await self._on(
            searches,
            lambda c: self._search(
                c, searches.settings, search_filter, lambda m: _values(m, wanted), attribute
            ),
        )
        values: list[str] | None = self._one_entry(found, user)
        return values

    def _one_entry(self, found: list[Any], user: str) -> Any:
        """
        The one entry's item of a search for *user*, or None (none, or
        several: the latter logged once per user).
        """
        if len(found) == 1:
            return found[0]
        if len(found) > 1 and self.ambiguous.first(user):
            log.warn(
                "auth backend ldap: {n} entries match user {user} under {base}; refused "
                "until exactly one does",
                n="2 or more",
                user=escape(user),
                base=escape(self.searches.settings.base),
            )
        return None

    # -- lifecycle -------------------------------------------------------

    def reload(self, config: Config) -> None:
        """
        New connections for what comes next (re-reading the bind password
        and CA files); attempts in flight finish on the old ones.
        """
        old = (self.searches, self.binds)
        self._use(config)
        self.ambiguous.clear()
        self.user_problems.clear()
        for p in old:
            p.close()

    def stop(self) -> defer.Deferred[None]:
        """
        Unbind and close the idle connections (busy ones close when their
        attempt ends); fires when they are closed.
        """
        closing = self.searches.close() + self.binds.close()
        waits = [c.when_lost() for c in closing]
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # -- operations ------------------------------------------------------

    async def _on(self, pool: _Pool, op: Callable[[_Connection], Awaitable[Any]]) -> Any:
        """
        *op* on a connection from *pool*.  A reused connection that turns
        out dead (the server restarted, an idle timeout) is replaced once.
        """
        for attempt in (1, 2):
            conn, reused = await pool.acquire(self._timed_for(pool.settings))
            ok = False
            try:
                result = await op(conn)
                ok = True
                return result
            except _Lost as e:
                if reused and attempt == 1:
                    continue
                raise BackendError(f"{pool.settings.url}: {e}") from None
            finally:
                pool.release(conn, reuse=ok)
        raise AssertionError("unreachable")

    def _timed_for(self, settings: _Settings) -> Callable[..., Awaitable[Any]]:
        async def timed(d: defer.Deferred[Any], conn: _Connection | None, what: str) -> Any:
            return await self._timed(settings, d, conn, what)

        return timed

    async def _timed(
        self, s: _Settings, d: defer.Deferred[Any], conn: _Connection | None, what: str
    ) -> Any:
        d.addTimeout(s.timeout, self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            if conn is not None:
                conn.transport.abortConnection()
            raise BackendError(f"{s.url}: {what}: no answer within {s.timeout:g} s") from None
        except defer.CancelledError:
            if conn is not None and conn.connected:
                conn.transport.abortConnection()
            raise
        except (BackendError, _Lost):
            raise
        except Exception as e:
            raise _Lost(conn.why if conn is not None and conn.why else describe(e)) from None

    async def _request(self, s: _Settings, conn: _Connection, op: Any, what: str) -> Any:
        try:
            d = conn.send(op)
        except Exception:
            raise _Lost(conn.why or "connection lost") from None
        return await self._timed(s, d, conn, what)

    async def _open(self, s: _Settings, service: bool) -> _Connection:
        """
        A new connection: TCP, TLS (ldaps, or StartTLS, RFC 4511 §4.14)
        with the certificate verified, and for searches the bind as
        ``bind_dn``.
        """
        endpoint: Any = HostnameEndpoint(self.reactor, s.host, s.port, timeout=s.timeout)
        if s.tls == "ldaps":
            endpoint = wrapClientTLS(s.tls_options, endpoint)
        try:
            conn: _Connection = await self._timed(
                s, endpoint.connect(_ConnectionFactory()), None, "connecting"
            )
        except _Lost as e:
            raise BackendError(f"{s.url}: {e}") from None
        try:
            if s.tls == "starttls":
                answer = await self._request(s, conn, pureldap.LDAPStartTLSRequest(), "StartTLS")
                if answer.resultCode != SUCCESS:
                    raise BackendError(
                        f"{s.url}: StartTLS refused: {result_name(answer.resultCode)}"
                    )
                conn.transport.startTLS(s.tls_options)
            if s.tls is not None:
                await self._timed(s, conn.handshake(), conn, "TLS handshake")
            if service and s.bind_dn:
                secret = await self._bind_password(s)
                bind = pureldap.LDAPBindRequest(dn=s.bind_dn, auth=secret)
                answer = await self._request(s, conn, bind, "bind as bind_dn")
                if answer.resultCode != SUCCESS:
                    raise BackendError(
                        f"{s.url}: bind as bind_dn refused: {result_name(answer.resultCode)}"
                    )
        except _Lost as e:
            conn.transport.abortConnection()
            raise BackendError(f"{s.url}: {e}") from None
        except BaseException:
            conn.transport.abortConnection()
            raise
        return conn

    async def _bind_password(self, s: _Settings) -> str:
        """
        ``bind_password_file``, read for each new search connection (in
        the pool: it is file I/O), so a rotated password needs no SIGHUP.
        """
        try:
            secret: str | None = await self.pool.call(
                read_secret_file, s.bind_password_file, "bind_password_file"
            )
        except ValueError as e:  # names the file, never its content
            raise BackendError(str(e)) from None
        except Exception as e:
            raise BackendError(f"bind_password_file: not read: {type(e).__name__}") from None
        return secret or ""

    async def _search(
        self,
        conn: _Connection,
        s: _Settings,
        search_filter: Any,
        entry: Callable[[Any], Any],
        attribute: str | None = None,
    ) -> list[Any]:
        """
        ``entry(message)`` for each of up to two entries matching
        *search_filter* under base; the entries carry *attribute*'s values,
        or no attribute at all without one.
        """
        done: defer.Deferred[Any] = defer.Deferred()
        found: list[Any] = []

        def answer(message: Any) -> bool:
            if isinstance(message, pureldap.LDAPSearchResultEntry):
                found.append(entry(message))
                return False
            if isinstance(message, pureldap.LDAPSearchResultDone):
                if not done.called:
                    done.callback(message)
                return True
            return False  # a search reference: referrals are not followed

        request = pureldap.LDAPSearchRequest(
            baseObject=s.base,
            scope=s.scope,
            derefAliases=0,
            sizeLimit=2,
            timeLimit=max(1, int(s.timeout)),
            typesOnly=0 if attribute else 1,
            filter=search_filter,
            # "1.1": no attributes (RFC 4511 §4.5.1.8)
            attributes=[attribute] if attribute else ["1.1"],
        )
        try:
            sent = conn.send_multiResponse(request, answer)
        except Exception:
            raise _Lost(conn.why or "connection lost") from None
        sent.addErrback(lambda f: None if done.called else done.errback(f))
        result = await self._timed(s, done, conn, "search")
        code = result.resultCode
        if code == SUCCESS or (code == SIZE_LIMIT_EXCEEDED and len(found) > 1):
            return found
        detail = escape(result.errorMessage, 120) if result.errorMessage else ""
        raise BackendError(
            f"{s.url}: search under {escape(s.base, 120)} answered {result_name(code)}"
            + (f": {detail}" if detail else "")
        )

    async def _bind(self, conn: _Connection, s: _Settings, dn: bytes, password: str) -> int:
        request = pureldap.LDAPBindRequest(dn=dn, auth=password)
        answer = await self._request(s, conn, request, "bind")
        return int(answer.resultCode)

    async def _whoami(self, conn: _Connection, s: _Settings) -> None:
        request = pureldap.LDAPExtendedRequest(requestName=WHOAMI_OID)
        await self._request(s, conn, request, "WhoAmI")


def _dn(message: Any) -> bytes:
    dn = message.objectName
    return dn.encode() if isinstance(dn, str) else bytes(dn)


def _account(values: list[str], login: str) -> str | None:
    """
    The account name among an entry's ``username_attribute`` *values*: the
    only one, or the one the login spells in another case, else the first
    (a ``mail`` attribute with aliases); None without a value (the login).
    """
    if not values:
        return None
    for value in values:
        if value.casefold() == login.casefold():
            return value
    return values[0]


def _values(message: Any, wanted: str) -> list[str]:
    """
    The values of the attribute *wanted* (lower case, no options) in an
    entry, UTF-8 decoded (what does not decode is replaced).
    """

    def text(value: Any) -> str:
        if isinstance(value, bytes | bytearray):
            return bytes(value).decode("utf-8", "replace")
        return str(value)

    values: list[str] = []
    for name, vals in message.attributes:
        if text(name).split(";")[0].lower() == wanted:
            values.extend(text(v) for v in vals)
    return values


def factory(config: Config, reactor: Any, pool: Any, metrics: Any = None) -> StoreChecker:
    """
    ``[auth] checker = "ldap"``.
    """
    store = LDAP.from_config(config, reactor, pool)
    return StoreChecker(store, store.reactor, metrics)


factory.validate = validate  # type: ignore[attr-defined]
