"""
What every credential store shares: the verdict, the error that means "ask
again later", the checker that puts a store behind the Cred portal, and
the lookup-then-verify store that passwd-file and SQL are.

A store provides :class:`ICredentialStore`: ``check(authz, authc, password,
conn_meta)`` returns (or fires a Deferred with) a :class:`Verdict`.  A
policy may call a store directly and add meta of its own::

    from kumoauth.backends import PasswdFile
    users = PasswdFile("/etc/kumoauth/users")

    async def smtp_server_auth_plain(authz, authc, password, conn_meta):
        verdict = await users.check(authz, authc, password, conn_meta)
        ...

Inside the server, :class:`StoreChecker` is the store as an
``ICredentialsChecker``: ``True`` → 235 with the verdict's meta merged into
conn_meta, ``False`` → 535, :class:`BackendError` → 454 with one log line
per change of the backend's state (down, up again), never a traceback per
attempt.  Any other exception is a bug: the authenticator logs it with its
traceback and answers 454.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from kumoauth.auth.checkers import ICheckerLifecycle
from kumoauth.auth.cred import BackendUnavailable, IPlainCredentials
from kumoauth.backends import schemes
from kumoauth.ops.loglimit import StateLog
from kumoauth.ops.threads import QueueFull
from kumoauth.textsafe import escape

log = Logger(namespace="kumoauth.backends")


@dataclass(frozen=True)
class Verdict:
    """
    A store's answer: *ok*, and on success the meta to merge into conn_meta
    (an HTTP auth API's ``meta``, a tenant column), and *user*, the
    account's own name when the store spells it otherwise than the login
    (Dovecot's ``user=`` after ``auth_username_format`` and its default
    realm): that name is the session's ``authn_id``, so locks, limits and
    sender binding see one account whatever the client typed.  Truthy when
    ok.
    """

    ok: bool
    meta: Mapping[str, Any] = field(default_factory=dict)
    user: str | None = None
    #: with *user*: the identity the account acts as, when the store
    #: resolved a proxy login itself (a Dovecot master user: ``user`` its
    #: own name, ``authz`` the target's), whatever the login asked for
    authz: str | None = None

    def __bool__(self) -> bool:
        return self.ok


DENIED = Verdict(False)


class AccountName(str):
    """
    An avatar id that also names the identity it acts as (``authz``): a
    store's answer to a proxy login (:attr:`Verdict.authz`).  A ``str``, so
    the cache and every checker's caller take it as one.
    """

    authz: str

    def __new__(cls, name: str, authz: str) -> AccountName:
        value = super().__new__(cls, name)
        value.authz = authz
        return value


class BackendError(Exception):
    """
    The store could not answer (unreachable, timed out, answered nonsense,
    a stored hash it cannot read): the client gets ``454 4.7.0``.

    The message is logged: it must name the cause and never a password,
    a hash or a secret.  *outage* is false for a problem with one user's
    entry (a malformed hash): it does not mark the whole backend down.
    """

    def __init__(self, message: str, outage: bool = True) -> None:
        super().__init__(message)
        self.outage = outage


class ICredentialStore(Interface):
    """
    Somewhere users and their passwords live.

    A store whose content can change under the verified-credential cache
    without an attempt reaching it (a passwd-file edited on disk) may also
    have ``fresh()``: called before the cache answers from memory, it
    returns None when the store has nothing newer, or a Deferred that fires
    once the store has caught up (having told its subscribers, so the
    cache's entries are gone).  It must be cheap: it runs at every cache
    hit.
    """

    name = Attribute("The backend's label in logs and metrics: passwd-file, sql, ...")

    def check(authz: str, authc: str, password: str, conn_meta: Any) -> Any:
        """
        A :class:`Verdict` (or a Deferred firing with one) for this attempt;
        raise or fail with :class:`BackendError` when the store cannot say.
        """

    def subscribe(listener: Callable[[], None]) -> None:
        """
        Call *listener* whenever the store's content changed (a passwd-file
        re-read): the verified-credential cache drops its entries.  A store
        that cannot tell does nothing.
        """


class BackendHealth(StateLog):
    """
    A credential store's state changes, logged once each under
    ``kumoauth.backends`` with the backend's name: the first error after
    success ("unavailable: reason"), the first success after errors
    ("available again").  Attempts in between log nothing.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"auth backend {name}", log, backend=name)
        self.name = name


class OncePer:
    """
    Remember up to *size* keys, so a problem with one user's entry is logged
    once, not at every attempt (the oldest key is forgotten first).
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self.seen: collections.OrderedDict[Any, None] = collections.OrderedDict()

    def first(self, key: Any) -> bool:
        if key in self.seen:
            return False
        self.seen[key] = None
        if len(self.seen) > self.size:
            self.seen.popitem(last=False)
        return True

    def clear(self) -> None:
        self.seen.clear()


#: conn_meta keys kumoauth sets itself: a store's meta never replaces them
RESERVED_META = frozenset(
    {
        "authn_id",
        "authz_id",
        "received_from",
        "received_via",
        "received_from_proxy",
        "hostname",
        "reception_protocol",
        "ehlo_domain",
    }
)


@implementer(ICredentialsChecker, ICheckerLifecycle)
class StoreChecker:
    """
    A :class:`ICredentialStore` behind the Cred portal, with its health log
    and metrics (``kumoauth_auth_backend_requests``, ``…_latency_seconds``).
    Lifecycle hooks pass through to the store.
    """

    credentialInterfaces = (IPlainCredentials,)

    def __init__(self, store: Any, clock: Any, metrics: Any = None) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics
        # A store that watches its own connection (dovecot) reports its
        # state changes into the same log: one line each way, whoever sees
        # the change first.
        health = getattr(store, "health", None)
        self.health = health if isinstance(health, BackendHealth) else BackendHealth(store.name)
        self.reserved_logged = OncePer(100)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        started = self.clock.seconds()
        d = defer.maybeDeferred(
            self.store.check,
            credentials.authz,
            credentials.authc,
            credentials.password_text(),
            credentials.conn_meta,
        )

        def answered(verdict: Any) -> Any:
            self._count("ok" if verdict else "denied", started)
            self.health.succeeded()
            if not isinstance(verdict, Verdict) or not verdict.ok:
                raise error.UnauthorizedLogin()
            for key, value in verdict.meta.items():
                if key in RESERVED_META or key.startswith("tls_"):
                    if self.reserved_logged.first(key):
                        log.warn(
                            "auth backend {backend}: ignoring meta key {key} (kumoauth's own)",
                            backend=self.store.name,
                            key=escape(key, 64),
                        )
                    continue
                credentials.conn_meta.set_meta(key, value)
            if verdict.user and verdict.authz:
                # A proxy login the store resolved (Dovecot's master user,
                # "alice*master" as much as authzid alice): the account is
                # the master, acting as the target.
                return AccountName(verdict.user, verdict.authz)
            if verdict.user and credentials.authz == credentials.authc:
                # The account's own name (the login asked for no other).
                return verdict.user
            return credentials.authc

        def failed(f: Failure) -> Any:
            if f.check(BackendError):
                e: Any = f.value
                self._count("error", started)
                if e.outage:
                    self.health.failed(str(e))
                raise BackendUnavailable(f"{self.store.name}: {e}")
            return f

        return d.addCallbacks(answered, failed)

    def _count(self, result: str, started: float) -> None:
        if self.metrics is None:
            return
        name = self.store.name
        self.metrics.backend_requests.labels(name, result).inc()
        self.metrics.backend_latency.labels(name).observe(self.clock.seconds() - started)

    def fresh(self) -> Any:
        """
        The store's freshness check before a cache hit (see
        :class:`ICredentialStore`), None for a store without one.
        """
        return _maybe(self.store, "fresh")

    def start(self) -> Any:
        return _maybe(self.store, "start")

    def reload(self, config: Any) -> Any:
        return _maybe(self.store, "reload", config)

    def stop(self) -> Any:
        return _maybe(self.store, "stop")

    def __repr__(self) -> str:
        return f"<StoreChecker {self.store.name}>"


def _maybe(obj: Any, hook: str, *args: Any) -> Any:
    fn = getattr(obj, hook, None)
    return fn(*args) if fn is not None else None


# --------------------------------------------------------------------------
# lookup, then verify a stored hash


@dataclass(frozen=True)
class Entry:
    """
    What a store found for a user: the stored hash (any form
    :func:`schemes.verify` reads), the meta a success adds, and where the
    entry is (``"line 12"``) for the operator's log.
    """

    hash: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""


class ReactorThreads:
    """
    The reactor's own thread pool as a ``pool`` (``call(fn, *args)``), for
    a store a policy makes without kumoauth's checker pool.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def call(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)


def default_reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


@implementer(ICredentialStore)
class HashStore:
    """
    A store that finds a user's stored hash (:meth:`lookup`) and verifies
    the password against it in *pool* (never on the reactor thread).

    - authz must equal authc: a hash store cannot say whether one user may
      act as another (a policy can, by calling :meth:`check` with authz =
      authc and deciding the rest itself);
    - an empty password is refused without a lookup;
    - an unknown user is verified against a dummy hash of the scheme the
      store's users last had, so the answer takes as long;
    - a stored value no scheme reads is an operator's error: logged once
      per user with where it is, answered 454 (:class:`BackendError` with
      ``outage=False``).
    """

    name = "hash-store"

    def __init__(self, pool: Any = None, reactor: Any = None) -> None:
        self.reactor = default_reactor(reactor)
        self.pool = pool if pool is not None else ReactorThreads(self.reactor)
        self.dummy_scheme = "ARGON2ID"
        #: a hash of a random password with the store's own costs (set by a
        #: store that knows them); preferred over a dummy of dummy_scheme
        self.dummy_hash: str | None = None
        self.bad_entries = OncePer()
        self.listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def changed(self) -> None:
        """
        The content changed: forget logged bad entries, tell subscribers.
        """
        self.bad_entries.clear()
        for listener in list(self.listeners):
            listener()

    def lookup(self, authc: str) -> Entry | None | defer.Deferred[Entry | None]:
        """
        The user's entry, or None.  Raise (or fail with)
        :class:`BackendError` when the store cannot be read.
        """
        raise NotImplementedError

    def check(
        self, authz: str, authc: str, password: str, conn_meta: Any = None
    ) -> defer.Deferred[Verdict]:
        return defer.Deferred.fromCoroutine(self._check(authz or authc, authc, password))

    async def _check(self, authz: str, authc: str, password: str) -> Verdict:
        if not authc or not password or authz != authc:
            return DENIED
        found: Any = await defer.maybeDeferred(self.lookup, authc)
        entry: Entry | None = found
        if entry is None:
            try:
                if self.dummy_hash is not None:
                    await _cpu_bound(self.pool, _dummy_verify_hash, self.dummy_hash, password)
                else:
                    await _cpu_bound(self.pool, _dummy_verify, self.dummy_scheme, password)
            except QueueFull:
                raise BackendError(BUSY, outage=False) from None
            return DENIED
        try:
            ok = await _cpu_bound(self.pool, _verify, entry.hash, password)
        except QueueFull:
            raise BackendError(BUSY, outage=False) from None
        except schemes.SchemeError as e:
            where = f" ({entry.where})" if entry.where else ""
            if self.bad_entries.first((authc, entry.hash)):
                log.error(
                    "auth backend {backend}: user {user}{where}: {problem}; "
                    "this user gets 454 until the entry is fixed",
                    backend=self.name,
                    user=escape(authc),
                    where=where,
                    problem=str(e),
                )
            raise BackendError(f"unusable stored hash for a user{where}", outage=False) from None
        return Verdict(True, entry.meta) if ok else DENIED


BUSY = "too many checks waiting for a thread"

#: hash verifications running at once, process-wide: one per core.  More
#: would not verify faster (Argon2 and bcrypt are CPU- and memory-bound)
#: but would take the cores from the reactor thread (stalls) and fight
#: over memory bandwidth (each Argon2id check touches 64 MiB).
_VERIFY_SLOTS = defer.DeferredSemaphore(max(1, os.cpu_count() or 1))


def _cpu_bound(pool: Any, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return _VERIFY_SLOTS.run(pool.call, fn, *args)


def _verify(stored: str, password: str) -> bool:
    return schemes.verify(stored, password)


def _dummy_verify_hash(stored: str, password: str) -> bool:
    try:
        schemes.verify(stored, password)
    except ValueError:
        schemes.verify(schemes.dummy("ARGON2ID"), password)
    return False


def _dummy_verify(scheme: str, password: str) -> bool:
    try:
        schemes.verify(schemes.dummy(scheme), password)
    except ValueError:
        schemes.verify(schemes.dummy("ARGON2ID"), password)
    return False


def note_scheme(store: HashStore, stored: str) -> None:
    """
    Remember *stored*'s scheme as the one an unknown user's dummy uses.
    """
    try:
        scheme = schemes.scheme_of(stored)
    except ValueError:
        return
    if scheme in schemes.DUMMY_SCHEMES:
        store.dummy_scheme = scheme


# --------------------------------------------------------------------------
# configuration tables


def parse_table(
    cls: type,
    raw: Mapping[str, Any],
    checks: Mapping[str, Callable[[Any], Any]],
    *,
    required: tuple[str, ...] = (),
    paths: tuple[str, ...] = (),
    base: Path | None = None,
) -> Any:
    """
    A backend's ``[auth.<name>]`` table as an instance of the dataclass
    *cls*: each key through its check from :mod:`kumoauth.config` (which
    raise ``config._Bad``), *paths* made absolute against *base* (the
    configuration file's directory).  ``ValueError`` with one line
    (``key: problem``); the caller adds the table's name.
    """
    from kumoauth.checks import _Bad

    known = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        check = checks.get(key)
        if check is None or key not in known:
            raise ValueError(f"{key}: unknown key (known: {', '.join(checks)})")
        try:
            out[key] = check(value)
        except _Bad as e:
            raise ValueError(f"{key}: {e}") from None
    for key in required:
        if key not in out:
            raise ValueError(f"{key}: required key is missing")
    for key in paths:
        if key in out and out[key]:
            p = Path(out[key]).expanduser()
            if not p.is_absolute() and base is not None:
                p = base / p
            out[key] = p
    return cls(**out)


def read_secret_file(path: Path | None, what: str) -> str | None:
    """
    The first line of a secret file (a bind password, a client secret),
    or None without a path.  ``ValueError`` naming the file, never its
    content.
    """
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{what}: {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {path}: not UTF-8") from None
    secret = text.splitlines()[0] if text else ""
    if not secret:
        raise ValueError(f"{what}: {path}: empty")
    return secret


# --------------------------------------------------------------------------
# what a store may tell its server about the connection


#: conn_meta key for the address (``"10.0.0.5:51234"``) of the connection's
#: TCP peer when that is not the client ``received_from`` names: the proxy
#: whose PROXY header named the client.  Absent: ``received_from`` is the
#: TCP peer.  Dovecot calls that address ``real_rip``.
PROXY_PEER = "received_from_proxy"


def client_ip(conn_meta: Any) -> str | None:
    """
    The client's address without the port (``received_from`` is
    ``"192.0.2.1:5000"`` or ``"[2001:db8::1]:5000"``), or None.
    """
    return _host(conn_meta.get_meta("received_from") if conn_meta is not None else None)


def peer_ip(conn_meta: Any) -> str | None:
    """
    The address of the connection's TCP peer without the port (Dovecot's
    ``real_rip``): the proxy's (:data:`PROXY_PEER`) when a proxy named the
    client, else the client's; None when unknown (a Unix socket, or a
    proxy address that does not parse).
    """
    if conn_meta is None:
        return None
    proxy = conn_meta.get_meta(PROXY_PEER)
    if proxy is not None:
        return _host(proxy)
    return client_ip(conn_meta)


def _host(value: Any) -> str | None:
    if not isinstance(value, str) or ":" not in value:
        return None
    if value.startswith("["):
        return value[1:].partition("]")[0] or None
    return value.rpartition(":")[0] or None


def listener_address(conn_meta: Any) -> str | None:
    """
    The local address the client connected to (``received_via``), or None.
    """
    value = conn_meta.get_meta("received_via") if conn_meta is not None else None
    return value if isinstance(value, str) else None


def secured(conn_meta: Any) -> bool:
    """
    Whether TLS is up on the connection (kumoauth offers AUTH only then,
    unless a listener allows plaintext AUTH behind a TLS proxy).
    """
    return conn_meta is not None and conn_meta.get_meta("tls_protocol_version") is not None


def connection_context(conn_meta: Any) -> tuple[str | None, str | None, str | None, bool]:
    """
    What a built-in store's answer may depend on about the connection, as
    the stores read it: the client's address, the TCP peer's, the
    listener's address, and whether TLS is up.  Dovecot gets ``rip`` (and
    takes it as ``real_rip``), ``lip``/``lport`` and ``secured``; an HTTP
    auth API ``client_ip``, ``listener`` and ``secured``; a passwd-file
    checks ``allow_nets`` against the first, ``allow_real_nets`` against
    the second.  Not the client's port: it changes with every connection,
    and no store decides on it (Dovecot gets it as ``rport`` for its log).
    The verified-credential cache keys its entries on this, so a verdict
    for one connection is never replayed for another the store might
    judge differently.
    """
    return client_ip(conn_meta), peer_ip(conn_meta), listener_address(conn_meta), secured(conn_meta)
