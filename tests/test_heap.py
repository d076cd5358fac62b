"""
kumoauth.ops.heap.QuietCollector: CPython's automatic full collections are
off while it runs; it collects when one is due and no burst is going on,
or when one is long overdue, and gives the thresholds back when stopped.
"""

from __future__ import annotations

import gc

from twisted.internet import task

from kumoauth.ops.cooperate import Slicer
from kumoauth.ops.heap import QuietCollector


def middle_collections(n: int) -> None:
    """*n* collections of the middle generation: what makes a full one due."""
    for _ in range(n):
        gc.collect(1)


def test_full_collections_wait_for_the_end_of_a_burst_but_not_forever():
    clock = task.Clock()
    busy = [True]
    before = gc.get_threshold()
    collector = QuietCollector(clock, lambda: busy[0])
    collector.start()
    try:
        assert gc.get_threshold()[:2] == before[:2]
        assert gc.get_threshold()[2] > 10**6  # automatic full collections off
        gc.collect()
        middle_collections(collector.due)
        assert not collector.tick()  # due, but a burst is going on
        assert gc.get_count()[2] >= collector.due
        busy[0] = False
        assert collector.tick()  # due and quiet
        assert gc.get_count()[2] == 0
        busy[0] = True
        middle_collections(collector.overdue)
        assert collector.tick()  # overdue: collected even in a burst
        assert gc.get_count()[2] == 0
        # The timer looks by itself.
        busy[0] = False
        middle_collections(collector.due)
        clock.advance(collector.every)
        assert gc.get_count()[2] == 0
    finally:
        collector.stop()
    assert gc.get_threshold() == before


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
