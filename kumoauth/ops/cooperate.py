"""
Work done a slice at a time, so a burst cannot hold the reactor.

Five hundred clients sending AUTH in the same instant, or five hundred
checker answers arriving on the same timer tick, would otherwise be handled
back to back in one reactor iteration: 500 × a few hundred µs of parsing,
checking, logging and TLS writing during which no other connection is
served (the (f) workload's stall).  :class:`Slicer` queues such steps and
runs them for at most :data:`SLICE` seconds per reactor iteration, then
lets the reactor serve everything else before it goes on — the per-
iteration budget of :class:`twisted.internet.task.Cooperator`, without its
generator protocol, for one-shot calls.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

#: seconds of queued work per reactor iteration
SLICE = 0.002


class Slicer:
    """
    Calls run at once while less than *slice* seconds of *clock* have
    passed since this reactor iteration first used the slicer; past that,
    queued (FIFO) and run a slice per iteration.  A lone call is never
    delayed.

    The budget is time elapsed, not time measured around each call: what a
    call's result sets off synchronously (a reply written, a line logged,
    the callbacks after :meth:`hop`) costs the same reactor iteration, and
    is counted with it.
    """

    def __init__(self, clock: Any, slice: float = SLICE) -> None:
        self.clock = clock
        self.slice = slice
        #: (the caller's Deferred, fn, (started-holder, *args))
        self._queue: collections.deque[
            tuple[defer.Deferred[Any], Callable[..., Any], tuple[Any, ...]]
        ] = collections.deque()
        self._tick_started = 0.0
        self._tick_open = False
        #: when work last had to wait for a coming slice (a burst)
        self.last_queued = float("-inf")
        #: told each time work has to wait (kumoauth.ops.heap holds full
        #: garbage collections off while a burst lasts)
        self.on_wait: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """
        Whether this iteration's budget is spent (or calls are waiting):
        work that can wait should go through :meth:`call`.
        """
        return bool(self._queue) or (self._tick_open and not self._budget_left())

    def call(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """
        ``fn(*args)`` now or in a coming slice; the Deferred fires with its
        result (a Deferred result is chained).  Cancelling it before it
        runs withdraws the call.
        """
        if not self._queue and self._in_budget():
            return defer.maybeDeferred(fn, *args)
        started: list[defer.Deferred[Any]] = []

        def cancel(d: defer.Deferred[Any]) -> None:
            # Not run yet: withdrawn.  Running: the cancellation goes on
            # to what it is waiting for (a checker, a lookup).
            if not self._withdraw(d) and started:
                started[0].cancel()

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        self._queue.append((d, fn, (started, *args)))
        self.last_queued = self.clock.seconds()
        if self.on_wait is not None:
            self.on_wait()
        return d

    def hop(self, result: Any) -> defer.Deferred[Any]:
        """
        Pass *result* (a value or a Failure) on, now or in a coming slice:
        for a callback chain whose next steps should not all run at once.
        """
        return self.call(_identity, result)

    def in_burst(self, within: float = 0.5) -> bool:
        """Whether work is waiting, or had to wait in the last *within* seconds."""
        # A clock stepped back (wall time) ends the burst rather than lengthen it.
        return bool(self._queue) or 0 <= self.clock.seconds() - self.last_queued < within

    def _in_budget(self) -> bool:
        if not self._tick_open:
            # A new reactor iteration: a fresh budget, closed by the next.
            self._tick_open = True
            self._tick_started = self.clock.seconds()
            self.clock.callLater(0, self._next_tick)
        return self._budget_left()

    def _budget_left(self) -> bool:
        # A clock stepped back (wall time) leaves the work for the next slice.
        return 0 <= self.clock.seconds() - self._tick_started < self.slice

    def _withdraw(self, d: defer.Deferred[Any]) -> bool:
        for item in self._queue:
            if item[0] is d:
                self._queue.remove(item)
                return True
        return False

    def _next_tick(self) -> None:
        self._tick_open = False
        queue = self._queue
        if not queue:
            return
        self._in_budget()  # this iteration's budget (and a look at the next)
        while queue:
            # At least one call per iteration, however small the slice.
            d, fn, (started, *args) = queue.popleft()
            inner = defer.maybeDeferred(fn, *args)
            started.append(inner)
            inner.addBoth(_forward, d)
            if not self._budget_left():
                break


def _identity(result: Any) -> Any:
    return result


def _forward(result: Any, d: defer.Deferred[Any]) -> None:
    """Pass a started call's result on, unless the caller cancelled."""
    if d.called:
        return  # cancelled meanwhile: the result (its CancelledError too) has no taker
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)
