"""
The Slicer (kumoauth.ops.cooperate): calls run at once within a per-
iteration budget, then FIFO a slice per reactor iteration; cancellation
withdraws a queued call and reaches a started one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from kumoauth.ops.cooperate import Slicer


class Iterations:
    """
    A clock whose ``callLater(0, f)`` waits for :meth:`next` (one reactor
    iteration), so tests can see what each iteration ran; work advances
    ``now``.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[Any] = []

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, fn: Any, *args: Any) -> None:
        self.pending.append((fn, args))

    def next(self) -> None:
        due, self.pending = self.pending, []
        for fn, args in due:
            fn(*args)

    def advance(self, _: float) -> None:
        while self.pending:
            self.next()


def make(slice_: float = 0.004) -> tuple[Any, Slicer, list[Any]]:
    clock = Iterations()
    return clock, Slicer(clock, slice_), []


def work(clock: Any, done: list[Any], cost: float, name: Any) -> Any:
    clock.now += cost  # the work takes *cost* seconds of the clock
    done.append(name)
    return name


def test_under_task_clock_queued_work_still_finishes():
    """
    task.Clock runs calls scheduled for "now" within one advance(0): the
    slicer must still make progress (at least one call per iteration).
    """
    from twisted.internet import task

    clock = task.Clock()
    slicer = Slicer(clock, 0.0)
    results = [slicer.call(lambda i=i: i) for i in range(5)]
    clock.advance(0)
    assert all(d.called for d in results)


def test_a_lone_call_runs_at_once():
    clock, slicer, done = make()
    d = slicer.call(work, clock, done, 0.001, "a")
    assert done == ["a"] and d.called and not slicer.busy


def test_past_the_budget_calls_wait_for_the_next_iterations_in_order():
    clock, slicer, done = make(0.004)
    ds = [slicer.call(work, clock, done, 0.001, i) for i in range(10)]
    assert done == [0, 1, 2, 3]  # 4 ms spent: the budget of this iteration
    assert slicer.busy and len(slicer) == 6
    clock.next()  # the next iteration
    assert done == list(range(8))
    clock.next()
    assert done == list(range(10)) and all(d.called for d in ds)
    results: list[Any] = []
    for d in ds:
        d.addCallback(results.append)
    assert results == list(range(10))


def test_a_queued_call_is_withdrawn_by_cancel():
    clock, slicer, done = make(0.001)
    slicer.call(work, clock, done, 0.002, "first")
    queued = slicer.call(work, clock, done, 0.001, "second")
    queued.addErrback(lambda f: f.trap(defer.CancelledError))
    queued.cancel()
    clock.advance(0)
    assert done == ["first"] and len(slicer) == 0


def test_cancel_reaches_a_started_call():
    clock, slicer, done = make(0.001)
    slicer.call(work, clock, done, 0.002, "first")
    inner: defer.Deferred[Any] = defer.Deferred()
    cancelled: list[bool] = []
    inner.addErrback(lambda f: cancelled.append(f.check(defer.CancelledError) is not None))
    queued = slicer.call(lambda: inner)
    clock.advance(0)  # started: waiting on inner
    queued.addErrback(lambda f: f.trap(defer.CancelledError))
    queued.cancel()
    assert cancelled == [True]


def test_failures_and_deferred_results_pass_through():
    clock, slicer, done = make(0.0)  # everything queued after the first
    slicer.call(work, clock, done, 0.001, "x")
    failing = slicer.call(lambda: 1 / 0)
    later: defer.Deferred[Any] = defer.Deferred()
    chained = slicer.call(lambda: later)
    clock.advance(0)
    clock.advance(0)
    errors: list[Any] = []
    failing.addErrback(errors.append)
    assert errors and errors[0].check(ZeroDivisionError)
    assert not chained.called
    later.callback("done")
    box: list[Any] = []
    chained.addCallback(box.append)
    assert box == ["done"]


def test_hop_passes_a_value_or_a_failure_on():
    clock, slicer, done = make()
    box: list[Any] = []
    slicer.hop(42).addCallback(box.append)
    from twisted.python.failure import Failure

    slicer.hop(Failure(ValueError("x"))).addErrback(lambda f: box.append(f.type))
    assert box == [42, ValueError]


def test_what_a_result_sets_off_counts_against_the_budget():
    """
    The budget is time elapsed in the iteration: the callbacks after a
    hop (a reply written, a line logged) are counted, so 500 answers on one
    timer tick cannot all run their callbacks in it.
    """
    clock, slicer, done = make(0.004)

    def answer(name: str) -> None:
        slicer.hop(name).addCallback(lambda n: work(clock, done, 0.003, n))

    for name in ("a", "b", "c"):
        answer(name)
    assert done == ["a", "b"]  # 6 ms spent after b: c waits
    clock.next()
    assert done == ["a", "b", "c"]


def test_the_budget_opens_with_the_iteration_not_with_each_call():
    """Work done in the iteration before a call (other sessions read) counts too."""
    clock, slicer, done = make(0.004)
    slicer.call(work, clock, done, 0.001, "first")
    clock.now += 0.005  # the rest of the iteration: other sessions
    later = slicer.call(work, clock, done, 0.001, "later")
    assert done == ["first"] and not later.called and slicer.busy
    clock.next()
    assert done == ["first", "later"] and later.called
