"""
kumoauth.ops.heap.QuietCollector: CPython's automatic full collections are
held off from the moment the slicer makes work wait until the burst is
over (one regardless when ten times overdue), and the threshold is given
back then, and when stopped.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from twisted.internet import task

from kumoauth.ops.cooperate import Slicer
from kumoauth.ops.heap import GENERATIONAL, QuietCollector, settle_when_running


def middle_collections(n: int) -> None:
    """*n* collections of the middle generation: what makes a full one due."""
    for _ in range(n):
        gc.collect(1)


@pytest.mark.skipif(not GENERATIONAL, reason="CPython 3.14's collector is incremental")
def test_full_collections_are_held_off_for_a_burst_but_not_forever():
    clock = task.Clock()
    slicer = Slicer(clock, 0.002)
    before = gc.get_threshold()
    collector = QuietCollector(clock, slicer.in_burst)
    collector.start()
    slicer.on_wait = collector.hold
    try:
        assert gc.get_threshold() == before  # no burst: CPython decides
        assert collector.tick() is None

        def spend() -> None:
            clock.rightNow += 0.003  # the work takes 3 ms (and no timer runs)

        slicer.call(spend)
        waiting = slicer.call(lambda: None)  # past the budget: a burst
        assert not waiting.called and collector.held
        assert gc.get_threshold()[:2] == before[:2]
        assert gc.get_threshold()[2] > 10**6  # automatic full collections off
        gc.collect()
        assert collector.tick() == "held"
        middle_collections(collector.overdue)
        assert collector.tick() == "overdue"  # collected even in the burst
        assert gc.get_count()[2] == 0
        clock.advance(collector.every)  # the waiting call runs; the burst is recent
        assert waiting.called and collector.held
        clock.advance(0.5)  # half a second without waiting work: over
        assert not collector.held and gc.get_threshold() == before
    finally:
        collector.stop()
    assert gc.get_threshold() == before


def test_stopping_in_a_burst_gives_the_threshold_back():
    clock = task.Clock()
    before = gc.get_threshold()
    collector = QuietCollector(clock, lambda: True)
    collector.start()
    collector.hold()
    collector.stop()
    assert gc.get_threshold() == before and not collector.held


def test_a_burst_is_work_waiting_or_having_waited_just_now():
    clock = task.Clock()
    slicer = Slicer(clock, 0.002)
    assert not slicer.in_burst()

    def spend() -> None:
        clock.rightNow += 0.003  # the work takes 3 ms (and no timer runs)

    slicer.call(spend)  # runs at once, and spends the budget
    assert not slicer.in_burst()
    slicer.call(lambda: None)  # past the budget: waits
    assert slicer.in_burst()
    clock.advance(0)  # the next iteration runs it
    assert len(slicer) == 0 and slicer.in_burst()  # ... but it had to wait just now
    clock.advance(0.5)
    assert not slicer.in_burst()


class Starting(task.Clock):
    """A reactor that is running already, and records its shutdown triggers."""

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[Any, ...]] = []

    def callWhenRunning(self, f: Any) -> None:
        f()

    def addSystemEventTrigger(self, *args: Any) -> None:
        self.triggers.append(args)


@pytest.mark.skipif(not GENERATIONAL, reason="CPython 3.14's collector is incremental")
def test_a_serving_process_settles_and_holds_at_its_slicers_bursts():
    reactor = Starting()
    slicer = Slicer(reactor)
    before = gc.get_threshold()
    try:
        collector = settle_when_running(reactor, slicer)
        assert collector is not None
        assert gc.get_freeze_count() > 0  # the heap was settled
        assert slicer.on_wait == collector.hold
        assert reactor.triggers == [("after", "shutdown", collector.stop)]
        slicer.on_wait()
        assert collector.held and gc.get_threshold()[2] > 10**6
        collector.stop()
        assert gc.get_threshold() == before
    finally:
        gc.unfreeze()  # this test process goes on collecting as before
        gc.set_threshold(*before)


def test_a_supervisor_only_settles():
    reactor = Starting()
    try:
        assert settle_when_running(reactor) is None
        assert gc.get_freeze_count() > 0 and reactor.triggers == []
    finally:
        gc.unfreeze()
