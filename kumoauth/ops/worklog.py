"""
A worker's log lines on their way to the supervisor, which writes the log.

A worker writes its events to its stdout, a pipe the supervisor reads.
One ``write`` per event woke the supervisor once per line (two lines per
session): at ~500 sessions/s that was most of the supervisor's CPU and a
context switch on the workers' cores.  So a worker gathers its lines and
writes them every :data:`FLUSH_EVERY` seconds, and at once for a warning or
worse, off the reactor thread, before the reactor runs and after it stops.
Each line carries the time of its event, and the supervisor logs it with
that time: a gathered line keeps the time it happened at.

Wire format, one event per line (continuation lines of a traceback start
with a tab, as in the log itself)::

    <event time, seconds since the epoch> <space> [namespace#level] text
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.python import threadable
from zope.interface import implementer

#: seconds a worker may hold an info line before writing it
FLUSH_EVERY = 0.05
#: bytes that make a worker write at once
FLUSH_AT = 64 * 1024

_QUIET = frozenset({LogLevel.debug, LogLevel.info})


def worker_line(event: dict[str, Any]) -> str:
    """
    The wire form of *event*: its time, ``[namespace#level]`` and text.
    """
    level = event.get("log_level")
    namespace = event.get("log_namespace", "-")
    text = f"[{namespace}#{level.name if level else '-'}] {formatEvent(event)}"
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    when = event.get("log_time")
    if not isinstance(when, (int, float)):
        when = 0.0
    return f"{when:.6f} " + text.replace("\n", "\n\t") + "\n"


@implementer(ILogObserver)
class WorkerLog:
    """
    The worker's log observer: gathers lines and writes them to *fd*.
    """

    def __init__(
        self,
        fd: int,
        reactor: Any,
        every: float = FLUSH_EVERY,
        in_io_thread: Callable[[], bool] = threadable.isInIOThread,
    ) -> None:
        self.fd = fd
        self.reactor = reactor
        self.every = every
        self._in_io_thread = in_io_thread
        self._lines: list[str] = []
        self._size = 0
        self._timer: Any = None
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        line = worker_line(event)
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            at_once = (
                event.get("log_level") not in _QUIET
                or self._size >= FLUSH_AT
                or not getattr(self.reactor, "running", False)
                or not self._in_io_thread()
            )
            if at_once:
                self._write_locked()
                return
            if self._timer is None:
                self._timer = self.reactor.callLater(self.every, self._tick)

    def _tick(self) -> None:
        with self._lock:
            self._timer = None
            self._write_locked()

    def flush(self) -> None:
        """Write what is gathered now (at shutdown)."""
        with self._lock:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._write_locked()

    def _write_locked(self) -> None:
        if not self._lines:
            return
        data = memoryview("".join(self._lines).encode("utf-8", "replace"))
        self._lines.clear()
        self._size = 0
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            pass  # the supervisor is gone: nobody to tell


class LineReader:
    """
    The supervisor's side: split a worker's output into events and publish
    each (with the time the worker gave it) to *observer*, prefixed.
    """

    def __init__(
        self, prefix: str, observer: Callable[[dict[str, Any]], None], logger: Any
    ) -> None:
        self.prefix = prefix
        self.observer = observer
        self.logger = logger
        self._partial = b""

    def feed(self, data: bytes, now: Callable[[], float]) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        # A traceback's continuation lines (a tab first) belong to the
        # event before them.
        events: list[list[bytes]] = []
        for line in lines:
            if line.startswith(b"\t") and events:
                events[-1].append(line[1:])  # the log adds the tab back
            elif line.strip():
                events.append([line.removeprefix(b"\t")])
        for parts in events:
            self._publish(b"\n".join(parts).decode("utf-8", "replace"), now)

    def _publish(self, line: str, now: Callable[[], float]) -> None:
        stamp, _, text = line.partition(" ")
        try:
            when = float(stamp)
        except ValueError:
            when = 0.0
        if not 0 < when < 1e11:  # not one of ours (a raw line on stderr)
            when, text = now(), line
        self.observer(
            {
                "log_format": "{text}",
                "text": self.prefix + text,
                "log_level": LogLevel.info,
                "log_namespace": self.logger.namespace,
                "log_source": None,
                "log_logger": self.logger,
                "log_time": when,
            }
        )
