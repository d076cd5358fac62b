"""
The thread pool for handlers marked ``@kumo.blocking`` (and, later, for
checkers that must block: hash verification, synchronous clients).

Three promises the stock ``deferToThreadPool`` does not keep:

- **A bounded queue.**  When the backend hangs, attempts pile up behind
  the busy threads; past ``max_queued`` waiting calls a new one fails at
  once (:class:`QueueFull`, so the client gets a 4xx) instead of joining an
  ever longer queue.
- **Work whose caller gave up is dropped.**  Cancelling the Deferred (the
  session's deadline does) before the call started removes it: it never
  runs later, when the backend recovers, and its arguments (a password) are
  released at once.  A call already running cannot be stopped; its result
  is ignored.
- **Stopping never blocks the reactor.**  Threads are daemon threads and
  :meth:`BlockingPool.stop` joins them in a helper thread, so one hung
  handler cannot hold SIGTERM until systemd's SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


class QueueFull(Exception):
    """
    Too many blocking calls are waiting for a thread.
    """


def yield_on_wake() -> None:
    """
    Make the calling thread ``SCHED_BATCH`` (Linux): woken (a job, a
    message to write), it waits for a free CPU instead of preempting the
    reactor thread that woke it.  Preempted, the reactor thread still holds
    the GIL, which the woken thread needs at once: the two switched back
    and forth several times per job.  For the queue's writer thread,
    measured with ``python -m bench.ab``: workload (a) 0.94x, (i) 0.97x,
    context switches per session 4.6 -> 2.7.  Where the policy does not
    exist or is refused, nothing changes.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, policy, os.sched_param(0))


class BackgroundThread(threading.Thread):
    """A thread that runs :func:`yield_on_wake` before its target."""

    def run(self) -> None:
        yield_on_wake()
        super().run()


def background_pool(reactor: Any) -> None:
    """The reactor's own thread pool makes :class:`BackgroundThread` threads."""
    pool = reactor.getThreadPool()
    pool.threadFactory = BackgroundThread


class _DaemonThreadPool(ThreadPool):
    def threadFactory(self, *args: Any, **kwargs: Any) -> threading.Thread:  # type: ignore[override]
        return BackgroundThread(*args, daemon=True, **kwargs)


class _Job:
    __slots__ = ("fn", "args", "state")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn: Callable[..., Any] | None = fn
        self.args: tuple[Any, ...] = args
        self.state = "queued"  # -> "running" -> "done", or "cancelled"


class BlockingPool:
    """
    *threads* daemon threads; at most *max_queued* calls waiting for one.
    """

    def __init__(self, reactor: Any, threads: int, max_queued: int, name: str) -> None:
        self.reactor = reactor
        self.max_queued = max_queued
        self.pool = _DaemonThreadPool(minthreads=0, maxthreads=threads, name=name)
        self._lock = threading.Lock()
        self.queued = 0

    def start(self) -> None:
        self.pool.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """
        Run ``fn(*args)`` in a thread; the Deferred fires on the reactor
        thread.  Cancel it to withdraw the call if it has not started.
        """
        with self._lock:
            if self.queued >= self.max_queued:
                return defer.fail(QueueFull(f"{self.queued} blocking calls already waiting"))
            self.queued += 1
        job = _Job(fn, args)

        def cancel(d: defer.Deferred[Any]) -> None:
            with self._lock:
                if job.state == "queued":
                    job.state = "cancelled"
                    job.fn, job.args = None, ()
                    self.queued -= 1

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        self.pool.callInThread(self._run, job, d)
        return d

    def _run(self, job: _Job, d: defer.Deferred[Any]) -> None:
        with self._lock:
            if job.state != "queued":
                return  # withdrawn while it waited: never runs
            job.state = "running"
            self.queued -= 1
            fn, args = job.fn, job.args
            job.fn, job.args = None, ()
        assert fn is not None
        try:
            result: Any = fn(*args)
        except BaseException:
            result = Failure()
        del fn, args  # nothing of the call outlives it in this thread
        job.state = "done"
        self.reactor.callFromThread(_fire, d, result)

    def stop(self) -> defer.Deferred[None]:
        """
        Stop the threads without blocking the reactor: queued calls are
        dropped, running ones finish on their own.  Fires once every thread
        has ended (a hung one never: see :func:`stop_within`).
        """
        d: defer.Deferred[None] = defer.Deferred()

        def join() -> None:
            self.pool.stop()
            self.reactor.callFromThread(d.callback, None)

        threading.Thread(target=join, name="kumoauth-pool-stop", daemon=True).start()
        return d


def _fire(d: defer.Deferred[Any], result: Any) -> None:
    if d.called:
        return  # cancelled (the caller gave up) after it had started
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def stop_within(d: defer.Deferred[Any], seconds: float, clock: Any) -> defer.Deferred[None]:
    """
    *d*, or success anyway after *seconds*: a shutdown waits that long for
    threads, then goes on (they are daemon threads; the process can exit).
    """
    out: defer.Deferred[None] = defer.Deferred()

    def give_up() -> None:
        if not out.called:
            out.callback(None)

    timer = clock.callLater(seconds, give_up)

    def done(result: object) -> None:
        if timer.active():
            timer.cancel()
        if not out.called:
            out.callback(None)

    d.addBoth(done)
    return out


class Serial:
    """
    Runs Deferred-returning calls one at a time, in the order asked (a quick
    second SIGHUP must not overtake the first).
    """

    def __init__(self) -> None:
        self._last: defer.Deferred[Any] = defer.succeed(None)

    def run(self, fn: Callable[[object], Any]) -> defer.Deferred[Any]:
        result: defer.Deferred[Any] = defer.Deferred()

        def report(value: Any) -> None:
            result.callback(value)

        self._last = self._last.addBoth(fn)
        self._last.addBoth(report)
        return result
