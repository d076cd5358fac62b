"""
The per-process store (``store = "memory"``, the default): failure
counters, sending-limit counters, and "shared" values shared with nobody.
With ``[server] workers`` above 1, each worker has its own, so every limit
is per worker (docs/operations.md).
"""

from __future__ import annotations

import os
from collections import OrderedDict

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from kumoauth.stores import ICounterStore, IFailureStore, ISharedState, IStoreAdmin


@implementer(IFailureStore, ICounterStore, ISharedState, IStoreAdmin)
class MemoryStore:
    """
    Per-process store.  Failures: per key, an insertion-ordered map of
    fingerprint to the time it was last seen.  At most *keep* fingerprints per key, and
    keys whose failures have all expired are swept out, so memory follows
    the attack, not its history.
    """

    #: sweep expired keys after this many records
    SWEEP_EVERY = 1024

    #: other processes never see this state
    shared = False

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._keys: dict[str, OrderedDict[bytes, float]] = {}
        self._records = 0
        #: counters: key -> [count, window end]
        self._counters: dict[str, list[float]] = {}
        self._secrets: dict[str, bytes] = {}
        self._generations: dict[str, int] = {}

    def _prune(self, key: str, window: float, now: float) -> OrderedDict[bytes, float] | None:
        seen = self._keys.get(key)
        if seen is None:
            return None
        horizon = now - window
        while seen and next(iter(seen.values())) <= horizon:
            seen.popitem(last=False)
        if not seen:
            del self._keys[key]
            return None
        return seen

    def _add(self, key: str, fingerprint: bytes, window: float, keep: int, now: float) -> bool:
        """Add (or refresh) *fingerprint* under *key*; whether it is new there."""
        seen = self._prune(key, window, now)
        if seen is None:
            seen = self._keys[key] = OrderedDict()
        new = seen.pop(fingerprint, None) is None
        seen[fingerprint] = now
        while len(seen) > max(keep, 1):
            seen.popitem(last=False)
        self._records += 1
        if self._records % self.SWEEP_EVERY == 0:
            for k in list(self._keys):
                self._prune(k, window, now)
        return new

    def record(self, key: str, fingerprint: bytes, window: float, keep: int) -> defer.Deferred[int]:
        self._add(key, fingerprint, window, keep, self.clock.seconds())
        return defer.succeed(len(self._keys[key]))

    def _retry_after(self, seen: OrderedDict[bytes, float], window: float, now: float) -> float:
        oldest = next(iter(seen.values()))
        return max(0.0, oldest + window - now)

    def count(self, key: str, window: float) -> defer.Deferred[tuple[int, float]]:
        now = self.clock.seconds()
        seen = self._prune(key, window, now)
        if seen is None:
            return defer.succeed((0, 0.0))
        return defer.succeed((len(seen), self._retry_after(seen, window, now)))

    def forget(self, key: str, user_key: str | None, fingerprint: bytes) -> defer.Deferred[None]:
        for k in (key, user_key):
            seen = self._keys.get(k) if k is not None else None
            if k is not None and seen is not None:
                seen.pop(fingerprint, None)
                if not seen:
                    del self._keys[k]
        return defer.succeed(None)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<MemoryStore: {len(self._keys)} failure keys, {len(self._counters)} counters>"

    # --- counters ------------------------------------------------------------

    def _counter(self, key: str, now: float) -> list[float] | None:
        entry = self._counters.get(key)
        if entry is not None and entry[1] <= now:
            del self._counters[key]
            return None
        return entry

    def add(
        self, key: str, amount: int, window: float, limit: int, until: float | None = None
    ) -> defer.Deferred[tuple[bool, int, float]]:
        now = self.clock.seconds()
        if len(self._counters) > self.SWEEP_EVERY and self._records % 64 == 0:
            for k in list(self._counters):
                self._counter(k, now)
        entry = self._counter(key, now)
        if entry is None:
            if amount < 0:
                return defer.succeed((True, 0, 0.0))
            entry = [0, now + window]
        count, end = int(entry[0]), entry[1]
        if amount < 0:
            if until is None or abs(end - until) <= min(1.0, window / 2):
                entry[0] = max(0, count + amount)
            return defer.succeed((True, int(entry[0]), max(0.0, end - now)))
        if count + amount > limit:
            if count:
                self._counters[key] = entry
            return defer.succeed((False, count, max(0.0, end - now)))
        entry[0] = count + amount
        self._counters[key] = entry
        self._records += 1
        return defer.succeed((True, count + amount, max(0.0, end - now)))

    def get(self, key: str) -> defer.Deferred[tuple[int, float]]:
        now = self.clock.seconds()
        entry = self._counter(key, now)
        if entry is None:
            return defer.succeed((0, 0.0))
        return defer.succeed((int(entry[0]), max(0.0, entry[1] - now)))

    def reset(self, key: str) -> defer.Deferred[bool]:
        return defer.succeed(self._counters.pop(key, None) is not None)

    # --- shared state (shared with nobody) --------------------------------

    def secret(self, name: str) -> defer.Deferred[bytes]:
        if name not in self._secrets:
            self._secrets[name] = os.urandom(32)
        return defer.succeed(self._secrets[name])

    def generation(self, name: str) -> defer.Deferred[int]:
        return defer.succeed(self._generations.get(name, 0))

    def bump(self, name: str) -> defer.Deferred[int]:
        self._generations[name] = self._generations.get(name, 0) + 1
        return defer.succeed(self._generations[name])

    # --- admin (in-process only) ---------------------------------------------

    def failures(self, kind: str) -> defer.Deferred[list[tuple[str, int, float]]]:
        now = self.clock.seconds()
        out = []
        for key, seen in self._keys.items():
            if key.startswith(kind + ":") and seen:
                newest = next(reversed(seen.values()))
                out.append((key[len(kind) + 1 :], len(seen), max(0.0, newest - now)))
        return defer.succeed(out)

    def clear_failures(self, key: str) -> defer.Deferred[int]:
        return defer.succeed(1 if self._keys.pop(key, None) is not None else 0)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


#: the name the throttle's users know it by
MemoryFailureStore = MemoryStore


def from_spec(spec: str, clock: IReactorTime) -> MemoryStore:
    if spec != "memory":
        raise ValueError('the memory store takes no options: write "memory"')
    return MemoryStore(clock)
