"""
Failed-attempt throttles (SPEC §8): *distinct* wrong passwords counted per
client address and per authc over a sliding window.

Distinct, because clients retry: smtplib's ``login()`` tries PLAIN then
LOGIN, Twisted's client tries PLAIN twice, Thunderbird falls back from PLAIN
to LOGIN.  Counting attempts, one typo would cost two failures and three
typos would lock a user out.  So, like Dovecot, each key keeps a short list
of salted fingerprints of the failed passwords: the same wrong password
retried counts once, each distinct guess counts.  A fingerprint is
HMAC-SHA256 under a process-random salt of ``authc NUL password``, cut to
:data:`FINGERPRINT_SIZE` bytes: it is never the password, is useless outside
this process, and is never logged.

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

The counters live behind :class:`IFailureStore`, whose methods return
Deferreds, so several kumoauth instances can share one store (Redis)
without the protocol changing; :meth:`IFailureStore.record` adds and counts
in one atomic step.  The stores live in :mod:`kumoauth.stores`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet import defer

from kumoauth.config import ThrottleConfig
from kumoauth.stores import IFailureStore, make_store  # noqa: F401  (re-exported)
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
    # User names are compared case-insensitively by most user databases;
    # "Scott" and "scott" share one budget.
    return "authc:" + authc.casefold()


@dataclass(frozen=True)
class Throttled:
    """
    Why an attempt is refused: ``reason`` is ``"ip"`` or ``"authc"``, and
    ``retry_after`` the seconds until the oldest counted failure leaves the
    window (for the 454 reply).
    """

    reason: Literal["ip", "authc"]
    retry_after: float


class Throttle:
    """
    Decides whether an attempt may reach the checker, and records failures.

    *salt* keys the password fingerprints; by default a fresh random one per
    process.  Instances sharing a store should share a salt, or a password
    retried through two instances counts twice.  *ipv6_prefix* groups IPv6
    clients (:func:`client_key`).
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
        self._salt: bytes | None = None
        if not getattr(store, "shared", False):
            self._salt = os.urandom(32) if salt is None else salt

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
        HMAC-SHA256(salt, casefold(authc) NUL password), truncated.  Neither
        field can hold NUL (the SASL decoders refuse it), so the pair is
        unambiguous.  A ``str`` password is taken as UTF-8, so ``"pw"`` and
        ``b"pw"`` give one fingerprint.
        """
        if isinstance(password, str):
            password = password.encode("utf-8")
        assert self._salt is not None, "fingerprint before the shared salt arrived"
        message = authc.casefold().encode("utf-8") + b"\x00" + password
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

    def failed(self, ip: str, authc: str, password: str | bytes) -> defer.Deferred[tuple[int, int]]:
        """
        Record a failed attempt under the client key and the authc key; fire
        with the distinct failure counts ``(per_ip, per_authc)`` now in the
        window.
        """
        cfg = self.config

        def record(_: bytes) -> defer.Deferred[tuple[int, int]]:
            fp = self.fingerprint(authc, password)
            records = [
                self.store.record(self.client_key(ip), fp, cfg.window, cfg.max_failures_per_ip)
            ]
            if authc:  # a bearer token without a named user has no authc to count
                records.append(
                    self.store.record(authc_key(authc), fp, cfg.window, cfg.max_failures_per_authc)
                )
            d: defer.Deferred[list[int]] = defer.gatherResults(records, consumeErrors=True)
            d.addErrback(_first_error)
            return d.addCallback(lambda counts: (counts[0], counts[1] if authc else 0))

        return self._with_salt().addCallback(record)


def _first_error(f: Any) -> Any:
    """The failure inside gatherResults' FirstError (StoreUnavailable, say)."""
    if f.check(defer.FirstError):
        return f.value.subFailure
    return f
