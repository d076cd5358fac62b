"""
The verified-credential cache (``[auth.cache]``), in front of any checker.

An argon2id verification costs ~150 ms of a core here: a mail client that
opens a session per message, or a fleet of devices polling every minute,
would keep the checker pool busy re-proving what it proved a moment ago.
The cache remembers recent answers:

- **Key**: HMAC-SHA256 under a random per-process secret of the attempt's
  authz, authc and password and of what a store's verdict may depend on
  about the connection (:func:`~kumoauth.backends.base.connection_context`:
  the client's address, the TCP peer's, the listener, whether TLS is up),
  each part length-prefixed, so no two attempts share a key.  A success
  from an address a store allows is thus never replayed for one it
  refuses (``allow_nets``), nor a refusal for the address it allows.
  Neither the password nor a plain hash of it is kept, so a memory dump
  does not give an offline dictionary attack anything cheaper than the
  secret; keys are never logged.
- **Positive entries** (``ttl``): the avatar id and the meta the checker
  added to conn_meta (the difference it made, captured around the call),
  replayed on a hit, so a policy's tenant lookup survives caching.
- **Negative entries** (``negative_ttl``): a wrong password is answered
  from the cache for a short time (the authenticator still counts the
  failure and applies the failure delay, so guessing gets no faster).
- **Errors are never cached**: a backend outage answers 454 unless a
  still-valid positive entry exists, so users seen recently keep working
  through a short outage.
- **Invalidation**: :meth:`CredentialCache.clear` on SIGHUP and whenever a
  store reports a content change (``subscribe``: a passwd-file re-read).
  Before a hit is served, each checker's ``fresh()`` hook (if any) may
  look for such a change first: a passwd-file stat()s its file once the
  check interval has passed, and the attempt waits for the re-read, which
  clears the cache, so a changed password is refused from the first
  attempt after the interval, not after ``ttl``;
  with a shared ``[auth.throttle] store`` (Redis), through a generation
  number every process polls each second, so one instance's invalidation
  reaches all.
- **Bounded**: at most ``max_entries``, the least recently used dropped
  first; expired entries are dropped when met.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
from typing import Any

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kumoauth.auth.cred import CheckerChain, IPlainCredentials
from kumoauth.backends.base import StoreChecker, connection_context
from kumoauth.config import CacheConfig
from kumoauth.ops.loglimit import StateLog

_MISSING = object()

#: the shared store's name for the cache generation
GENERATION = "credential-cache"
#: seconds between looks at the shared generation
POLL_INTERVAL = 1.0


class _Entry:
    __slots__ = ("expires", "avatar", "meta")

    def __init__(self, expires: float, avatar: Any, meta: dict[str, Any] | None) -> None:
        self.expires = expires
        self.avatar = avatar  # None: a negative entry
        self.meta = meta


class CredentialCache:
    """
    The entries, shared by every configuration generation of the process
    (a reload clears it and may change its settings).
    """

    def __init__(self, clock: Any, config: CacheConfig, metrics: Any = None) -> None:
        self.clock = clock
        self.config = config
        self.metrics = metrics
        self._secret = os.urandom(32)
        self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._subscribed: set[int] = set()
        self._shared: Any = None
        self._poll: Any = None
        self._generation: int | None = None
        #: bumped whenever the entries are dropped: an answer the checker
        #: gave for a check that began before is not stored (it may rest
        #: on what the clear was for, a passwd-file's old line)
        self.epoch = 0
        # The shared store's outages as the cache meets them (its poll runs
        # without traffic): one line per change of state.
        self._shared_state = StateLog(
            "cache invalidation: shared store", logger=Logger(namespace="kumoauth.auth")
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def configure(self, config: CacheConfig) -> None:
        self.config = config
        self.clear()

    def clear(self) -> None:
        """
        Drop every entry here and, with a shared store, everywhere: the
        generation it keeps is bumped, and every process polling it clears
        its own cache within :data:`POLL_INTERVAL`.
        """
        self._drop_all()
        if self._shared is not None:
            self._shared.bump(GENERATION).addCallbacks(self._shared_ok, self._shared_failed)

    def share(self, store: Any) -> None:
        """
        Follow *store*'s cache generation when other processes share it
        (``[auth.throttle] store`` is Redis): a passwd-file re-read or a
        SIGHUP on any instance clears every instance's cache.
        """
        if not getattr(store, "shared", False):
            store = None
        if store is self._shared:
            return
        self._shared = store
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        self._generation = None
        if store is not None:
            from twisted.internet.task import LoopingCall

            self._poll = LoopingCall(self._check_generation)
            self._poll.clock = self.clock
            self._poll.start(POLL_INTERVAL, now=True)

    def _drop_all(self) -> None:
        self._entries.clear()
        self.epoch += 1

    def _check_generation(self) -> None:
        store = self._shared
        if store is None:
            return

        def got(generation: int) -> None:
            self._shared_ok(generation)
            if self._generation is not None and generation != self._generation:
                self._drop_all()
            self._generation = generation

        store.generation(GENERATION).addCallbacks(got, self._shared_failed)

    def _shared_ok(self, result: object) -> None:
        self._shared_state.succeeded()

    def _shared_failed(self, f: Failure) -> None:
        self._shared_state.failed(
            f.getErrorMessage() or type(f.value).__name__,
            "a clear here does not reach other instances, whose entries live until they expire",
        )

    def stop(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()

    def key(
        self,
        authz: str,
        authc: str,
        password: bytes,
        context: tuple[str | bool | None, ...] = (),
    ) -> bytes:
        """
        The entry's key: an HMAC of the credentials and the *context* of
        the connection (:func:`~kumoauth.backends.base.connection_context`).
        """
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        parts = (authz.encode("utf-8"), authc.encode("utf-8"), password)
        for part in (*parts, *(_context_part(value) for value in context)):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.digest()

    def get(self, key: bytes) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock.seconds():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, avatar: Any, meta: dict[str, Any] | None) -> None:
        ttl = self.config.ttl if avatar is not None else self.config.negative_ttl
        if ttl <= 0:
            return
        self._entries[key] = _Entry(self.clock.seconds() + ttl, avatar, meta)
        self._entries.move_to_end(key)
        while len(self._entries) > self.config.max_entries:
            self._entries.popitem(last=False)

    def count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.cache_lookups.labels(result).inc()

    def watch(self, checkers: list[Any]) -> None:
        """
        Clear the cache whenever one of *checkers*' stores changes (a
        store is subscribed once, however many reloads keep it).
        """
        for checker in checkers:
            store = getattr(checker, "store", None)
            subscribe = getattr(store, "subscribe", None)
            if subscribe is None or id(store) in self._subscribed:
                continue
            self._subscribed.add(id(store))
            subscribe(self.clear)

    def wrap(self, checker: ICredentialsChecker) -> ICredentialsChecker:
        return CachingChecker(checker, self)


@implementer(ICredentialsChecker)
class CachingChecker:
    """
    *inner* behind the cache.
    """

    credentialInterfaces = (IPlainCredentials,)

    def __init__(self, inner: ICredentialsChecker, cache: CredentialCache) -> None:
        self.inner = inner
        self.cache = cache
        self.freshness = _fresh_hooks(inner)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        key = self.cache.key(
            credentials.authz,
            credentials.authc,
            credentials.password,
            connection_context(credentials.conn_meta),
        )
        if self.freshness and key in self.cache:
            # A hit never reaches the store: let it look for a change first.
            waiting = [d for d in (hook() for hook in self.freshness) if d is not None]
            if waiting:
                d = defer.gatherResults(waiting, consumeErrors=True)
                return d.addCallback(lambda _: self._answer(credentials, key))
        return self._answer(credentials, key)

    def _answer(self, credentials: Any, key: bytes) -> defer.Deferred[Any]:
        cache = self.cache
        entry = cache.get(key)
        if entry is not None:
            if entry.avatar is None:
                cache.count("negative_hit")
                return defer.fail(error.UnauthorizedLogin())
            cache.count("hit")
            conn_meta = credentials.conn_meta
            for name, value in (entry.meta or {}).items():
                conn_meta.set_meta(name, value)
            return defer.succeed(entry.avatar)
        cache.count("miss")
        conn_meta = credentials.conn_meta
        before = conn_meta.values_now()
        epoch = cache.epoch
        d = defer.maybeDeferred(self.inner.requestAvatarId, credentials)

        def verified(avatar: Any) -> Any:
            if cache.epoch == epoch:  # not cleared while it was checked
                after = conn_meta.values_now()
                added = {k: v for k, v in after.items() if before.get(k, _MISSING) != v}
                cache.put(key, avatar, added or None)
            return avatar

        def refused(f: Failure) -> Failure:
            if f.check(error.UnauthorizedLogin) and cache.epoch == epoch:
                cache.put(key, None, None)
            return f

        return d.addCallbacks(verified, refused)

    def __repr__(self) -> str:
        return f"<CachingChecker {self.inner!r}>"


def _context_part(value: str | bool | None) -> bytes:
    """One part of the connection's context, tagged so no two values read alike."""
    if value is None:
        return b"-"
    if isinstance(value, bool):
        return b"y" if value else b"n"
    return b"s" + value.encode("utf-8", "surrogatepass")


def _fresh_hooks(checker: Any) -> list[Any]:
    """
    The ``fresh()`` hooks of *checker*, or of each checker of a chain
    (``--auth a --auth b``): a passwd-file's, through its StoreChecker.
    A store without one adds nothing to a hit's cost.
    """
    if isinstance(checker, CheckerChain):
        return [hook for inner in checker.checkers for hook in _fresh_hooks(inner)]
    if isinstance(checker, StoreChecker) and getattr(checker.store, "fresh", None) is None:
        return []
    hook = getattr(checker, "fresh", None)
    return [hook] if callable(hook) else []
