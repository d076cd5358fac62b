"""
Keep CPython's full garbage collections out of the way of bursts.

A full collection walks every object the collector tracks, in one go,
with the reactor stopped.  Two things made those pauses long where they
hurt most (workload (f) of ``python -m bench``: 500 clients sending AUTH
at once):

- **The start-up heap.**  Most tracked objects in a running kumoauth were
  made at start-up and live as long as the process: modules, classes,
  functions, the interface registry, the first configuration generation —
  about 60,000 objects against ~40 per idle session.  :func:`settle`
  (once, when the reactor starts) collects what is garbage already and
  moves the rest to the permanent generation (:func:`gc.freeze`), which
  collections skip.  The price: a reference cycle among those objects
  that becomes garbage later is never reclaimed; only the first
  configuration generation can do that, once, on the first SIGHUP.
  Reference counting still frees everything not in a cycle.

- **Their timing.**  A burst is exactly what triggers a full collection
  (its attempts are thousands of new objects that survive the young
  generations), which then walks those attempts too: 15–30 ms with 500 in
  flight, on top of the burst's own work.  :class:`QuietCollector` turns
  the automatic full collections off and runs them itself, from a timer,
  as soon as CPython would have (``threshold2`` collections of the middle
  generation since the last full one) *and* no burst is being sliced
  (:meth:`~kumoauth.ops.cooperate.Slicer.in_burst`); at ten times that it
  runs one regardless, so a server that is never quiet still collects.
  The young generations are collected as before.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

log = Logger(namespace="kumoauth")

#: seconds between looks at whether a full collection is due
EVERY = 0.25
#: a threshold the middle generation's collections never reach
_NEVER = 2**30


def settle() -> int:
    """Collect, then freeze what the process holds; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "start-up heap settled: {frozen} objects left out of garbage collection", frozen=frozen
    )
    return frozen


class QuietCollector:
    """
    Full collections when due and no burst is going on (*busy* answers
    that), or when long overdue.
    """

    def __init__(self, clock: Any, busy: Callable[[], bool], every: float = EVERY) -> None:
        self.clock = clock
        self.busy = busy
        self.every = every
        self.due = 10
        self.overdue = 100
        self._saved: tuple[int, int, int] | None = None
        self._loop: task.LoopingCall | None = None

    def start(self) -> None:
        t0, t1, t2 = self._saved = gc.get_threshold()
        self.due, self.overdue = max(1, t2), max(1, t2) * 10
        gc.set_threshold(t0, t1, _NEVER)
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.every, now=False).addErrback(
            lambda f: log.failure("the quiet collector stopped", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    def tick(self) -> bool:
        """Collect if due; whether it did."""
        pending = gc.get_count()[2]  # middle-generation collections since the last full one
        if pending >= self.overdue or (pending >= self.due and not self.busy()):
            gc.collect()
            return True
        return False


def settle_when_running(reactor: Any, busy: Callable[[], bool] | None = None) -> QuietCollector:
    """
    Once *reactor* runs (the services started): :func:`settle`, then a
    :class:`QuietCollector` that defers to *busy* (default: never busy).
    """
    collector = QuietCollector(reactor, busy or (lambda: False))

    def run() -> None:
        settle()
        collector.start()

    reactor.callWhenRunning(run)
    reactor.addSystemEventTrigger("after", "shutdown", collector.stop)
    return collector
