"""
The start-up heap leaves the cyclic garbage collector's view.

CPython's full collection walks every object the collector tracks.  In a
running kumoauth most of them were made at start-up and live as long as
the process: modules, classes, functions, the interface registry, the
first configuration generation — about 60,000 objects, against ~150 per
open session.  A full collection while 500 sessions are open walked all
of it in one go: 40–80 ms during which the reactor served no one (the
(f) workload's worst stall; BENCHMARKS.md).

:func:`settle` (called once, when the reactor starts) collects what is
garbage already, then moves everything left to the permanent generation
(:func:`gc.freeze`), which collections skip.  Objects made afterwards —
sessions, later configuration generations — are collected as before.

The one cost: a cycle among the frozen objects that later becomes garbage
is never reclaimed.  Only the first configuration generation can do that
(on the first SIGHUP), once, so it is bounded; reference counting still
frees everything that is not in a cycle.
"""

from __future__ import annotations

import gc

from twisted.logger import Logger

log = Logger(namespace="kumoauth")


def settle() -> int:
    """Collect, then freeze what the process holds; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "start-up heap settled: {frozen} objects left out of garbage collection", frozen=frozen
    )
    return frozen


def settle_when_running(reactor: object) -> None:
    """:func:`settle` once *reactor* runs (after the services have started)."""
    reactor.callWhenRunning(settle)  # type: ignore[attr-defined]
