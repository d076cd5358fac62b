"""
kumoauth.ops.heap.QuietCollector: CPython's automatic full collections are
held off from the moment the slicer makes work wait until the burst is
over (one regardless when ten times overdue), and the threshold is given
back then, and when stopped.
"""

from __future__ import annotations

import gc

import pytest
from twisted.internet import task

from kumoauth.ops.cooperate import Slicer
from kumoauth.ops.heap import GENERATIONAL, QuietCollector


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
