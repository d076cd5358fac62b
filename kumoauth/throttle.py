"""
Failed-attempt throttles (SPEC §8): failures counted per client IP and per
authc over a sliding window.

The counters live behind :class:`IFailureStore`, whose methods return
Deferreds, so several kumoauth instances can later share one store (Redis)
without the protocol changing.  :class:`MemoryFailureStore` is the
per-process implementation.

The per-authc limit is a lever an attacker can pull against a victim: fail
five times as ``alice`` and alice is locked out.  To blunt that, the
per-authc limit only applies to clients whose IP has failures of its own in
the window; alice, logging in from an address that has not been failing, is
still checked (see docs/security.md).
"""

from __future__ import annotations

import importlib
from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from kumoauth.config import ThrottleConfig


class IFailureStore(Interface):
    """
    Sliding-window counters of failed AUTH attempts, by key.
    """

    def count(key: str, window: float) -> defer.Deferred[int]:
        """
        Fire with the number of failures recorded under *key* in the last
        *window* seconds.
        """

    def record(key: str, window: float) -> defer.Deferred[None]:
        """
        Record one failure under *key* now; it counts for *window* seconds.
        """


@implementer(IFailureStore)
class MemoryFailureStore:
    """
    Per-process store: a deque of timestamps per key.  Keys whose failures
    have all expired are swept out, so memory follows the attack, not its
    history.
    """

    #: sweep expired keys after this many records
    SWEEP_EVERY = 1024

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._events: dict[str, deque[float]] = {}
        self._records = 0

    def _prune(self, key: str, window: float, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        horizon = now - window
        while events and events[0] <= horizon:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def count(self, key: str, window: float) -> defer.Deferred[int]:
        events = self._prune(key, window, self.clock.seconds())
        return defer.succeed(len(events) if events is not None else 0)

    def record(self, key: str, window: float) -> defer.Deferred[None]:
        now = self.clock.seconds()
        self._events.setdefault(key, deque()).append(now)
        self._records += 1
        if self._records % self.SWEEP_EVERY == 0:
            for k in list(self._events):
                self._prune(k, window, now)
        return defer.succeed(None)

    def __len__(self) -> int:
        return len(self._events)


def ip_key(ip: str) -> str:
    return "ip:" + ip


def authc_key(authc: str) -> str:
    # User names are compared case-insensitively by most user databases;
    # "Scott" and "scott" share one budget.
    return "authc:" + authc.casefold()


class Throttle:
    """
    Decides whether an attempt may reach the checker.
    """

    def __init__(self, store: IFailureStore, config: ThrottleConfig) -> None:
        self.store = store
        self.config = config

    def check(self, ip: str, authc: str) -> defer.Deferred[str | None]:
        """
        Fire with ``None`` if the attempt may go on, else the reason:
        ``"ip"`` or ``"authc"``.
        """
        cfg = self.config

        def by_ip(ip_failures: int) -> Any:
            if ip_failures >= cfg.max_failures_per_ip:
                return "ip"
            if ip_failures == 0:
                # A clean client is always checked: a locked-out authc
                # cannot lock out its owner (module docstring).
                return None
            return self.store.count(authc_key(authc), cfg.window).addCallback(by_authc)

        def by_authc(authc_failures: int) -> str | None:
            return "authc" if authc_failures >= cfg.max_failures_per_authc else None

        return self.store.count(ip_key(ip), cfg.window).addCallback(by_ip)

    def failed(self, ip: str, authc: str) -> defer.Deferred[Any]:
        window = self.config.window
        return defer.gatherResults(
            [
                self.store.record(ip_key(ip), window),
                self.store.record(authc_key(authc), window),
            ],
            consumeErrors=True,
        )


def make_store(spec: str, clock: IReactorTime) -> IFailureStore:
    """
    ``"memory"``, or ``"package.module:factory"`` called with the reactor.
    Raises ``ValueError`` with one line.
    """
    if spec == "memory":
        return MemoryFailureStore(clock)
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f'"{spec}" is not "memory" or "package.module:factory"')
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        store = factory(clock)
    except Exception as e:
        raise ValueError(f"{spec}: {type(e).__name__}: {e}") from None
    if not IFailureStore.providedBy(store):
        raise ValueError(f"{spec} did not return an IFailureStore")
    return store
