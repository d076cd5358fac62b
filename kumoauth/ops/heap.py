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
  flight, on top of the burst's own work.  :class:`QuietCollector` holds
  the automatic full collections off while a burst is being sliced (the
  slicer tells it when work first has to wait) and gives CPython its
  threshold back as soon as the burst is over, so outside bursts CPython
  decides, with all its rules.  A burst that lasts until a full
  collection is ten times overdue gets one regardless.  The young
  generations are collected as always.

CPython 3.14's collector is incremental (no middle generation, bounded
pauses): there the hold is left off; the freeze still applies.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

log = Logger(namespace="kumoauth")

#: seconds between looks at whether a burst is over
EVERY = 0.25
#: a threshold the middle generation's collections never reach
_NEVER = 2**30
#: three generations, full collections triggered by ``threshold2`` (not 3.14)
GENERATIONAL = sys.version_info[:2] != (3, 14)


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
    CPython's automatic full collections held off while *busy* (a burst),
    from :meth:`hold` until a timer sees the burst over; one collection
    regardless when ten times overdue.
    """

    def __init__(self, clock: Any, busy: Callable[[], bool], every: float = EVERY) -> None:
        self.clock = clock
        self.busy = busy
        self.every = every
        self.overdue = 100
        self.held = False
        self._saved: tuple[int, int, int] | None = None
        self._loop: task.LoopingCall | None = None

    def start(self) -> None:
        if not GENERATIONAL:
            return
        self._saved = gc.get_threshold()
        self.overdue = max(1, self._saved[2]) * 10
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.clock

        def stopped(f: Any) -> None:
            log.failure("the burst-aware collector stopped", f)
            self.stop()  # CPython decides alone again

        self._loop.start(self.every, now=False).addErrback(stopped)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None
        self.held = False

    def hold(self) -> None:
        """A burst began: no automatic full collection until it is over."""
        if self.held or self._saved is None:
            return
        self.held = True
        t0, t1, _ = self._saved
        gc.set_threshold(t0, t1, _NEVER)

    def tick(self) -> str | None:
        """
        What this look did: ``"released"`` (the burst is over), ``"held"``,
        ``"overdue"`` (a full collection in the burst), or None.
        """
        if not self.held or self._saved is None:
            return None
        if not self.busy():
            gc.set_threshold(*self._saved)
            self.held = False
            return "released"
        # Middle-generation collections since the last full one.
        if gc.get_count()[2] >= self.overdue:
            gc.collect()
            return "overdue"
        return "held"


def settle_when_running(reactor: Any, slicer: Any = None) -> QuietCollector | None:
    """
    Once *reactor* runs (the services started): :func:`settle`; and with
    *slicer* (a :class:`~kumoauth.ops.cooperate.Slicer`: this process
    serves sessions), a :class:`QuietCollector` it holds at each burst.
    """
    collector = QuietCollector(reactor, slicer.in_burst) if slicer is not None else None

    def run() -> None:
        settle()
        if collector is not None:
            collector.start()
            slicer.on_wait = collector.hold

    reactor.callWhenRunning(run)
    if collector is not None:
        reactor.addSystemEventTrigger("after", "shutdown", collector.stop)
    return collector
