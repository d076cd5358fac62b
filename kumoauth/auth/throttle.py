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

An attempt is counted *before* it reaches the checker
(:meth:`Throttle.reserve`: check and count in one atomic step of the
store), so attempts in flight at once cannot all pass a check none of them
has counted yet; with a limit of N, at most N reach the checker, however
many arrive together and through however many instances.  The attempt
then settles its reservation: a failure keeps it (:meth:`Throttle.commit`),
anything else (a success, a checker that could not answer) gives it back
(:meth:`Throttle.release`).  The same wrong password again takes no new
place: its fingerprint is there already.

The counters live behind :class:`IFailureStore`, whose methods return
Deferreds, so several kumoauth instances can share one store (Redis)
without the protocol changing; :meth:`IFailureStore.record` adds and counts
in one atomic step, and :class:`~kumoauth.stores.IFailureReservations`
reserves.  A store without reservations (a ``package.module:factory`` one)
is checked, then recorded after the checker, as before.  The stores live
in :mod:`kumoauth.stores`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from twisted.internet import defer
from twisted.python.failure import Failure

from kumoauth.config import ThrottleConfig
from kumoauth.stores import (  # noqa: F401  (IFailureStore, make_store: re-exported)
    IFailureReservations,
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
    window (for the 454 reply).
    """

    reason: Literal["ip", "authc"]
    retry_after: float


@dataclass(frozen=True)
class Reservation:
    """
    An attempt let through to the checker, counted in advance, and what
    settling it takes: the keys, the fingerprint (never shown), whether the
    store holds it already (``counted``) and, to give it back, where it was
    new (``added``: bit 1 the client key, bit 2 the authc key).
    """

    ip_key: str
    user_key: str | None
    fingerprint: bytes = field(repr=False)
    counted: bool = True
    added: int = 0


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
        if config.fingerprint_key is not None:
            self._salt = key_from_file(config.fingerprint_key)
        elif not getattr(store, "shared", False):
            self._salt = os.urandom(32) if salt is None else salt
        #: why the last failure could not be recorded (a store without
        #: reservations only): the next attempt is counted before it goes on
        self._unrecorded: str | None = None

    @property
    def salt(self) -> bytes | None:
        """
        The fingerprint key, to hand to the throttle a reload builds (None
        until a shared store has given it).
        """
        return self._salt

    def _with_salt(self) -> defer.Deferred[bytes]:
        if self._salt is not None:
            return defer.succeed(self._salt)

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

    def check(self, ip: str, authc: str) -> defer.Deferred[Throttled | None]:
        """
        Fire with ``None`` if the attempt may go on, else a :class:`Throttled`.
        """
        cfg = self.config

        def by_ip(result: tuple[int, float]) -> Any:
            ip_failures, retry_after = result
            if ip_failures >= cfg.max_failures_per_ip:
                return Throttled("ip", retry_after)
            if ip_failures == 0 or not authc:
                # A clean client is always checked: a locked-out authc
                # cannot lock out its owner (module docstring).  A bearer
                # token naming no user has no authc budget.
                return None
            return self.store.count(authc_key(authc), cfg.window).addCallback(by_authc)

        def by_authc(result: tuple[int, float]) -> Throttled | None:
            authc_failures, retry_after = result
            if authc_failures >= cfg.max_failures_per_authc:
                return Throttled("authc", retry_after)
            return None

        return self.store.count(self.client_key(ip), cfg.window).addCallback(by_ip)

    def reserve(
        self, ip: str, authc: str, password: str | bytes
    ) -> defer.Deferred[Reservation | Throttled]:
        """
        Decide whether an attempt may reach the checker and, if it may,
        count it now, in one atomic step of the store: fire with a
        :class:`Reservation` (to :meth:`commit` if the attempt fails, else
        to :meth:`release`) or a :class:`Throttled`.  Fails (with
        ``StoreUnavailable``, say) if the store cannot give the salt, answer
        or count: the attempt must then not go on unless ``on_store_error``
        says so.
        """
        cfg = self.config

        def reserve_with(_: bytes) -> defer.Deferred[Reservation | Throttled]:
            fp = self.fingerprint(authc, password)
            ip_key = self.client_key(ip)
            # A bearer token without a named user has no authc to count.
            user_key = authc_key(authc) if authc else None
            if not IFailureReservations.providedBy(self.store):
                return self._check_then_count(ip, authc, Reservation(ip_key, user_key, fp, False))
            per_ip, per_authc = cfg.max_failures_per_ip, cfg.max_failures_per_authc
            d: defer.Deferred[tuple[int, float, int]] = self.store.reserve(
                ip_key, fp, cfg.window, per_ip, user_key, per_authc
            )

            def decided(result: tuple[int, float, int]) -> Reservation | Throttled:
                refused, retry_after, added = result
                if refused:
                    return Throttled("ip" if refused == 1 else "authc", retry_after)
                return Reservation(ip_key, user_key, fp, True, added)

            return d.addCallback(decided)

        return self._with_salt().addCallback(reserve_with)

    def _check_then_count(
        self, ip: str, authc: str, reservation: Reservation
    ) -> defer.Deferred[Reservation | Throttled]:
        """
        A store without reservations: the check, then the failure recorded
        after the checker (:meth:`commit`).  While the last failure could
        not be recorded, an attempt is recorded before it goes on, so a
        store that refuses writes stops attempts as one that is down does
        (it then stays counted: such a store cannot give it back).
        """

        def checked(verdict: Throttled | None) -> Any:
            if verdict is not None:
                return verdict
            if self._unrecorded is None:
                return reservation
            d = self._record(reservation)
            return d.addCallback(lambda _: replace(reservation, counted=True))

        return self.check(ip, authc).addCallback(checked)

    def commit(self, reservation: Reservation) -> defer.Deferred[Any]:
        """
        The attempt failed: it counts.  A reservation the store made is
        counted already; otherwise this records it.
        """
        if reservation.counted:
            return defer.succeed(None)
        return self._record(reservation)

    def release(self, reservation: Reservation) -> defer.Deferred[None]:
        """
        The attempt did not fail (a success, or a checker that could not
        answer): give back what its reservation added.
        """
        if not reservation.counted or not reservation.added:
            return defer.succeed(None)
        store: Any = self.store  # provides IFailureReservations (it made the reservation)
        d: defer.Deferred[None] = store.release(
            reservation.ip_key, reservation.fingerprint, reservation.user_key, reservation.added
        )
        return d

    def _record(self, r: Reservation) -> defer.Deferred[tuple[int, int]]:
        """
        Record *r*'s fingerprint under its keys; fire with the distinct
        failure counts ``(per_ip, per_authc)`` now in the window.
        """
        cfg = self.config
        records = [self.store.record(r.ip_key, r.fingerprint, cfg.window, cfg.max_failures_per_ip)]
        if r.user_key is not None:
            records.append(
                self.store.record(r.user_key, r.fingerprint, cfg.window, cfg.max_failures_per_authc)
            )
        d: defer.Deferred[list[int]] = defer.gatherResults(records, consumeErrors=True)
        d.addErrback(_first_error)

        def recorded(counts: list[int]) -> tuple[int, int]:
            self._unrecorded = None
            return (counts[0], counts[1] if r.user_key is not None else 0)

        def not_recorded(f: Failure) -> Failure:
            self._unrecorded = f.getErrorMessage() or type(f.value).__name__
            return f

        return d.addCallbacks(recorded, not_recorded)

    def failed(self, ip: str, authc: str, password: str | bytes) -> defer.Deferred[tuple[int, int]]:
        """
        Record a failed attempt under the client key and the authc key; fire
        with the distinct failure counts ``(per_ip, per_authc)`` now in the
        window.
        """

        def record(_: bytes) -> defer.Deferred[tuple[int, int]]:
            fp = self.fingerprint(authc, password)
            user_key = authc_key(authc) if authc else None
            return self._record(Reservation(self.client_key(ip), user_key, fp, False))

        return self._with_salt().addCallback(record)


def _first_error(f: Any) -> Any:
    """The failure inside gatherResults' FirstError (StoreUnavailable, say)."""
    if f.check(defer.FirstError):
        return f.value.subFailure
    return f
