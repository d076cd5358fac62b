"""
Deadlines for Deferreds, shared by everything a session waits on (the
checker, the sending-limits store, the sender-binding store).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer


def deadline(
    d: defer.Deferred[Any],
    seconds: float,
    clock: Any,
    on_timeout: Callable[[Any, float], Any] | None = None,
) -> defer.Deferred[Any]:
    """
    ``d.addTimeout(seconds, clock, on_timeout)``, unless *d* has its result
    already (a memory store, a synchronous checker): a timer set and
    cancelled at once for every call costs a DelayedCall, three closures
    and a heap entry the reactor keeps until it compacts.  A Deferred
    waiting on another it was chained to (``paused``) has no result yet.
    *on_timeout* (``onTimeoutCancel``) turns the cancellation into the
    caller's own failure.  Returns *d*.
    """
    if not d.called or d.paused:
        d.addTimeout(seconds, clock, onTimeoutCancel=on_timeout)
    return d
