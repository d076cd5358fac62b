"""
Failed-attempt throttles (SPEC §8): *distinct* wrong passwords counted per
client address and per authc over a sliding window.

Distinct, because clients retry: smtplib's ``login()`` tries PLAIN then
LOGIN, Twisted's client tries PLAIN twice, Thunderbird falls back from PLAIN
to LOGIN.  Counting attempts, one typo would cost two failures and three
typos would lock a user out.  So, like Dovecot, each key keeps a short list
of salted fingerprints of the failed passwords: the same wrong password
retried counts once, each distinct guess counts.  A fingerprint is
HMAC-SHA256 of ``authc NUL password`` under a key, cut to
:data:`FINGERPRINT_SIZE` bytes: it is never the password and is never
logged.  The key is derived from ``fingerprint_key_file`` when that is
set (so what a shared store holds cannot be tested offline without it),
else it is the shared store's salt (instances must agree) or a
process-random one.

Two keys per failure:

- the client key (:func:`client_key`: an IPv4 address, or the /64 of an
  IPv6 address, since one host commonly holds a whole /64) counts distinct
  (authc, password) pairs from that client;
- the authc key (case-folded, independent of the address) counts distinct
  passwords tried for that user from anywhere.

The per-authc limit is a lever an attacker can pull against a victim: fail
five times as ``alice`` and alice is locked out.  To blunt that, the
per-authc limit only applies to clients whose own key has failures in the
window; alice, logging in from an address that has not been failing, is
still checked (see docs/security.md).

The store holds committed failures only: :meth:`Throttle.check` reads,
:meth:`Throttle.failed` records after the checker said no.  Attempts in
flight (at the checker now) are counted in the process
(:class:`InFlightKeys`), so parallel guesses cannot all pass a check that
none of them has been counted by yet: a client key that has at least one
committed failure is refused while ``failures + in flight`` reaches
``max_failures_per_ip``, and likewise an authc key with failures of its
own, under the per-authc rule above.  A key without committed failures is
never refused for concurrency: an office behind one NAT address, a webmail
host, a user's several connections all log in at once.  The first burst
from a clean client is bounded by ``[server] max_connections_per_ip`` and
``[auth] max_in_flight`` alone, and several processes each count their own
attempts in flight (:meth:`Throttle.admit`).

A password verified by the checker is not a failure: every success removes
its fingerprint from both keys (:meth:`IFailureStore.forget`), so an
attempt counted because its session went away while it was checked does
not stay counted once the same password succeeds.  Nothing else is
removed: an attacker's guesses stay.

The counters live behind :class:`IFailureStore`, whose methods return
Deferreds, so several kumoauth instances can share one store (Redis)
without the protocol changing; :meth:`IFailureStore.record` adds and counts
in one atomic step.  The stores live in :mod:`kumoauth.stores`.

A store that refuses a write (Redis at ``maxmemory``, NOREPLICAS) is an
outage like one that does not answer: once a record (or a forget) failed,
an attempt the check lets through is recorded *before* it goes on, until
a write succeeds again, so such a store stops attempts as one that is down
does (``on_store_error``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from twisted.internet import defer
from twisted.python.failure import Failure

from kumoauth.config import ThrottleConfig
from kumoauth.stores import (  # noqa: F401  (IFailureStore, make_store: re-exported)
    IFailureStore,
    fold_user,
    make_store,
)
from kumoauth.stores.memory import MemoryFailureStore  # noqa: F401  (re-exported)

#: bytes kept of each HMAC-SHA256 fingerprint
FINGERPRINT_SIZE = 12


def client_key(ip: str, ipv6_prefix: int = 64) -> str:
    """
    The throttle key of a client address: an IPv4 address on its own, an
    IPv6 address by its */ipv6_prefix* network (64 by default: a single
    host commonly gets a whole /64 and can pick any address in it).  An
    IPv4-mapped IPv6 address counts as its IPv4 address; a zone index is
    ignored; anything that is not an address (a UNIX socket's "local") is
    used as it is.
    """
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return "ip:" + ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "ip:" + str(address.ipv4_mapped)
        net = ipaddress.IPv6Network((address, ipv6_prefix), strict=False)
        return "ip:" + str(net)
    return "ip:" + str(address)


def authc_key(authc: str) -> str:
    # User names are compared case-insensitively (and spaces around and
    # inside them loosely) by most user databases: "Scott", "scott " and
    # "scott" share one budget (kumoauth.stores.fold_user).
    return "authc:" + fold_user(authc)


def key_from_file(material: bytes) -> bytes:
    """
    The fingerprint key from the bytes of ``fingerprint_key_file``: an HMAC
    of its own under them, so the file could serve another purpose without
    one use giving anything of the other away.
    """
    return hmac.new(material, b"kumoauth failed-password fingerprints", hashlib.sha256).digest()


@dataclass(frozen=True)
class Throttled:
    """
    Why an attempt is refused: ``reason`` is ``"ip"`` or ``"authc"``, and
    ``retry_after`` the seconds until the oldest counted failure leaves the
    window (for the 454 reply).  ``in_flight``: refused only because of
    attempts at the checker now (the committed failures alone are under
    the limit); ``retry_after`` is then 0 and the caller picks a short
    wait (those attempts are answered within ``[auth] timeout``).
    """

    reason: Literal["ip", "authc"]
    retry_after: float
    in_flight: bool = False


class InFlightKeys:
    """
    Attempts at the checker now, in this process, per throttle key: for
    each key, the distinct fingerprints in flight and how many attempts
    carry each (the same password sent over several connections at once is
    one guess, as it is one failure in the store).  Process-wide: a reload
    keeps it (:class:`~kumoauth.auth.authenticator.InFlight`).
    """

    def __init__(self) -> None:
        self._keys: dict[str, dict[bytes, int]] = {}

    def count(self, key: str, besides: bytes | None = None) -> int:
        """
        The distinct fingerprints in flight under *key*, but *besides* (an
        attempt with a password already in flight adds no guess).
        """
        prints = self._keys.get(key)
        if prints is None:
            return 0
        return len(prints) - (besides in prints)

    def add(self, key: str, fingerprint: bytes) -> None:
        prints = self._keys.setdefault(key, {})
        prints[fingerprint] = prints.get(fingerprint, 0) + 1

    def remove(self, key: str, fingerprint: bytes) -> None:
        prints = self._keys.get(key)
        if prints is None or fingerprint not in prints:
            return
        prints[fingerprint] -= 1
        if prints[fingerprint] <= 0:
            del prints[fingerprint]
            if not prints:
                del self._keys[key]

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(eq=False)
class Admission:
    """
    An attempt let through to the checker and counted in flight under its
    keys until :meth:`done` (called exactly once it is answered; again does
    nothing).  The fingerprint is never shown; None for an attempt from a
    client without failures, which is neither counted in flight (a clean
    client is never refused for a burst) nor has anything to forget.
    ``recorded``: the store holds it already (recorded before the checker
    while the store had refused a write).
    """

    ip_key: str
    user_key: str | None
    fingerprint: bytes | None = field(repr=False)
    in_flight: InFlightKeys = field(repr=False)
    recorded: bool = False
    _done: bool = field(default=False, repr=False)

    def start(self) -> None:
        if self.fingerprint is None:
            return
        self.in_flight.add(self.ip_key, self.fingerprint)
        if self.user_key is not None:
            self.in_flight.add(self.user_key, self.fingerprint)

    def done(self) -> None:
        if self._done:
            return
        self._done = True
        if self.fingerprint is None:
            return
        self.in_flight.remove(self.ip_key, self.fingerprint)
        if self.user_key is not None:
            self.in_flight.remove(self.user_key, self.fingerprint)


@dataclass
class WriteState:
    """
    Why the last write to the failure store failed (None: it succeeded).
    Process-lived (:class:`~kumoauth.smtp.runtime.ProcessState`): a reload
    builds a new :class:`Throttle` and must not forget that writes are
    refused.
    """

    refused: str | None = None


class Throttle:
    """
    Decides whether an attempt may reach the checker, and records failures.

    *salt* keys the password fingerprints; by default a fresh random one per
    process.  Instances sharing a store should share a salt, or a password
    retried through two instances counts twice: a shared store gives one
    (:meth:`~kumoauth.stores.ISharedState.secret`), and ``config``'s
    ``fingerprint_key`` (the bytes of ``fingerprint_key_file``), when set,
    gives the key instead of either.  *ipv6_prefix* groups IPv6 clients
    (:func:`client_key`).
    """

    def __init__(
        self,
        store: IFailureStore,
        config: ThrottleConfig,
        *,
        salt: bytes | None = None,
        ipv6_prefix: int = 64,
        writes: WriteState | None = None,
    ) -> None:
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix {ipv6_prefix} is not in 0..128")
        self.store = store
        self.config = config
        self.ipv6_prefix = ipv6_prefix
        # A store shared by several processes (Redis) gives the salt: the
        # same wrong password tried through two instances counts once.
        # A key file, when configured, keeps the key out of that store.
        self._salt: bytes | None = None
        #: whether the salt is the shared store's (asked for at each use)
        self._from_store = False
        if config.fingerprint_key is not None:
            self._salt = key_from_file(config.fingerprint_key)
        elif not getattr(store, "shared", False):
            self._salt = os.urandom(32) if salt is None else salt
        else:
            self._from_store = True
        #: whether the last write (a record, a forget) failed: until one
        #: succeeds, an attempt is recorded before it goes on; the process
        #: keeps it across reloads
        self.writes = WriteState() if writes is None else writes
        #: attempts at the checker, when the caller does not give its own
        self.in_flight = InFlightKeys()

    @property
    def salt(self) -> bytes | None:
        """
        The fingerprint key, to hand to the throttle a reload builds (None
        until a shared store has given it).
        """
        return self._salt

    def _with_salt(self) -> defer.Deferred[bytes]:
        if self._salt is not None and not self._from_store:
            return defer.succeed(self._salt)
        # A shared store's salt is asked for each time: the store holds it,
        # and compares it with the other instances' now and then.

        def got(secret: bytes) -> bytes:
            self._salt = secret
            return secret

        shared: Any = self.store  # a shared store also provides ISharedState
        d: defer.Deferred[bytes] = shared.secret("fingerprint-salt")
        return d.addCallback(got)

    def client_key(self, ip: str) -> str:
        return client_key(ip, self.ipv6_prefix)

    def __repr__(self) -> str:
        return f"<Throttle {self.config!r} store={self.store!r}>"

    def fingerprint(self, authc: str, password: str | bytes) -> bytes:
        """
        HMAC-SHA256(salt, fold_user(authc) NUL password), truncated.  Neither
        field can hold NUL (the SASL decoders refuse it), so the pair is
        unambiguous.  A ``str`` password is taken as UTF-8, so ``"pw"`` and
        ``b"pw"`` give one fingerprint.
        """
        if isinstance(password, str):
            password = password.encode("utf-8")
        assert self._salt is not None, "fingerprint before the shared salt arrived"
        message = fold_user(authc).encode("utf-8") + b"\x00" + password
        return hmac.new(self._salt, message, hashlib.sha256).digest()[:FINGERPRINT_SIZE]

    def check(
        self,
        ip: str,
        authc: str,
        in_flight: InFlightKeys | None = None,
        fingerprint: bytes | None = None,
    ) -> defer.Deferred[Throttled | None]:
        """
        Fire with ``None`` if the attempt may go on, else a :class:`Throttled`.
        Read-only.  *in_flight* (default: this throttle's own) are the
        attempts at the checker now; they count only against a key that
        has committed failures of its own, and the attempt's own
        *fingerprint*, if in flight already, not at all.
        """
        busy = self.in_flight if in_flight is None else in_flight
        ip_key = self.client_key(ip)
        # A bearer token without a named user has no authc budget.
        user_key = authc_key(authc) if authc else None
        return self._counts(ip_key, user_key).addCallback(
            lambda counts: self._verdict(counts, ip_key, user_key, busy, fingerprint)
        )

    def _counts(
        self, ip_key: str, user_key: str | None
    ) -> defer.Deferred[tuple[tuple[int, float], tuple[int, float] | None]]:
        """
        The client's failures and, only if it has some (the per-authc limit
        applies to such clients alone), the user's: a clean client, the
        common case, costs one count.
        """
        window = self.config.window
        d = self.store.count(ip_key, window)
        if user_key is not None and not d.called:
            # A round trip (Redis): both asked at once, on one connection in
            # order, so a failure recorded meanwhile is in both or neither.
            both = defer.gatherResults([d, self.store.count(user_key, window)], consumeErrors=True)
            both.addErrback(_first_error)
            return both.addCallback(lambda counts: (counts[0], counts[1]))

        def more(ip_count: tuple[int, float]) -> Any:
            if ip_count[0] == 0 or user_key is None:
                return (ip_count, None)
            return self.store.count(user_key, window).addCallback(
                lambda user_count: (ip_count, user_count)
            )

        return d.addCallback(more)

    def _verdict(
        self,
        counts: tuple[tuple[int, float], tuple[int, float] | None],
        ip_key: str,
        user_key: str | None,
        busy: InFlightKeys,
        fingerprint: bytes | None,
    ) -> Throttled | None:
        """Decided when the counts arrive, with what is in flight *then*."""
        cfg = self.config
        (ip_failures, retry_after), user_count = counts
        if ip_failures >= cfg.max_failures_per_ip:
            return Throttled("ip", retry_after)
        if ip_failures == 0:
            # A clean client is always checked: a locked-out authc cannot
            # lock out its owner (module docstring), and a burst from a
            # clean address is not refused for being a burst.
            return None
        if ip_failures + busy.count(ip_key, fingerprint) >= cfg.max_failures_per_ip:
            return Throttled("ip", 0.0, in_flight=True)
        if user_key is None or user_count is None:
            return None
        user_failures, retry_after = user_count
        if user_failures >= cfg.max_failures_per_authc:
            return Throttled("authc", retry_after)
        user_busy = busy.count(user_key, fingerprint)
        if user_failures and user_failures + user_busy >= cfg.max_failures_per_authc:
            return Throttled("authc", 0.0, in_flight=True)
        return None

    def admit(
        self,
        ip: str,
        authc: str,
        password: str | bytes,
        in_flight: InFlightKeys | None = None,
    ) -> defer.Deferred[Admission | Throttled]:
        """
        :meth:`check`, and if the attempt may go on, count it in flight at
        once (in the same callback: nothing runs between the decision and
        the count): fire with an :class:`Admission` (whose
        :meth:`~Admission.done` the caller calls once the checker answered)
        or a :class:`Throttled`.  Fails (with ``StoreUnavailable``, say) if
        the store cannot give the salt or answer, or, after a write it
        refused, cannot record this attempt: the attempt must then not go
        on unless ``on_store_error`` says so.
        """
        busy = self.in_flight if in_flight is None else in_flight
        ip_key = self.client_key(ip)
        user_key = authc_key(authc) if authc else None

        def decided(counts: Any) -> Any:
            if counts[0][0] == 0 and self.writes.refused is None:
                # A clean client: checked, nothing counted in flight, and
                # (no failure of its own to remove) nothing to forget.
                return Admission(ip_key, user_key, None, busy)
            fp = self.fingerprint(authc, password)
            verdict = self._verdict(counts, ip_key, user_key, busy, fp)
            if verdict is not None:
                return verdict
            admission = Admission(ip_key, user_key, fp, busy)
            admission.start()
            if self.writes.refused is None:
                return admission
            # The store refused the last write: this attempt is recorded
            # before it goes on, so writes refused stop attempts as a store
            # that is down does.  A success forgets it again.
            admission.recorded = True
            d = self._record(admission.ip_key, admission.user_key, fp)

            def not_recorded(f: Failure) -> Failure:
                admission.done()
                return f

            return d.addCallbacks(lambda _: admission, not_recorded)

        def with_salt(_: bytes) -> defer.Deferred[Admission | Throttled]:
            return self._counts(ip_key, user_key).addCallback(decided)

        return self._with_salt().addCallback(with_salt)

    def _record(
        self, ip_key: str, user_key: str | None, fp: bytes
    ) -> defer.Deferred[tuple[int, int]]:
        """
        Record *fp* under the keys; fire with the distinct failure counts
        ``(per_ip, per_authc)`` now in the window.
        """
        cfg = self.config
        records = [self.store.record(ip_key, fp, cfg.window, cfg.max_failures_per_ip)]
        if user_key is not None:
            records.append(self.store.record(user_key, fp, cfg.window, cfg.max_failures_per_authc))
        d: defer.Deferred[list[int]] = defer.gatherResults(records, consumeErrors=True)
        d.addErrback(_first_error)

        def recorded(counts: list[int]) -> tuple[int, int]:
            self.writes.refused = None
            return (counts[0], counts[1] if user_key is not None else 0)

        return d.addCallbacks(recorded, self._not_written)

    def _not_written(self, f: Failure) -> Failure:
        self.writes.refused = f.getErrorMessage() or type(f.value).__name__
        return f

    def failed(self, ip: str, authc: str, password: str | bytes) -> defer.Deferred[tuple[int, int]]:
        """
        Record a failed attempt under the client key and the authc key; fire
        with the distinct failure counts ``(per_ip, per_authc)`` now in the
        window.
        """

        def record(_: bytes) -> defer.Deferred[tuple[int, int]]:
            fp = self.fingerprint(authc, password)
            user_key = authc_key(authc) if authc else None
            return self._record(self.client_key(ip), user_key, fp)

        return self._with_salt().addCallback(record)

    def succeeded(self, admission: Admission) -> defer.Deferred[None]:
        """
        The checker verified the password of *admission*: remove its
        fingerprint from both keys (:meth:`IFailureStore.forget`), where an
        attempt with it may have been counted (its session went away while
        it was checked, or it was recorded in advance).  Nothing else is
        removed.  A store without ``forget`` keeps it until the window
        passes.
        """
        forget = getattr(self.store, "forget", None)
        if forget is None or admission.fingerprint is None:
            return defer.succeed(None)
        a = admission
        d: defer.Deferred[None] = forget(a.ip_key, a.user_key, a.fingerprint)
        return d.addErrback(self._not_written)


def _first_error(f: Any) -> Any:
    """The failure inside gatherResults' FirstError (StoreUnavailable, say)."""
    if f.check(defer.FirstError):
        return f.value.subFailure
    return f
