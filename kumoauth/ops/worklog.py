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

Wire format: one event per line, whatever it holds (a traceback's line
ends and backslashes are escaped, so no text can start a line of its own)::

    <event time: seconds since the epoch, 6 decimals> <space> [namespace#level] text
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.python import threadable
from zope.interface import implementer

from kumoauth.ops.logfile import log_time, one_write, visible

#: seconds a worker may hold an info line before writing it
FLUSH_EVERY = 0.05
#: bytes that make a worker write at once
FLUSH_AT = 64 * 1024

#: marks an event that is a worker's line, republished by the supervisor
WORKER_LINE = "kumoauth_worker_line"

_QUIET = frozenset({LogLevel.debug, LogLevel.info})
_STAMP = re.compile(rb"(\d{9,11}\.\d{6}) ")
_ESCAPED = re.compile(r"\\(.)")


def worker_line(event: dict[str, Any]) -> str:
    """
    The wire form of *event*: its time, ``[namespace#level]`` and text, on
    one line.
    """
    level = event.get("log_level")
    namespace = event.get("log_namespace", "-")
    text = f"[{namespace}#{level.name if level else '-'}] {formatEvent(event)}"
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    when = event.get("log_time")
    if not isinstance(when, (int, float)) or not 0 < when < 1e11:
        when = 0.0
    text = text.rstrip("\n").replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return f"{when:.6f} {text}\n"


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), text)


@implementer(ILogObserver)
class WorkerLog:
    """
    The worker's log observer: gathers lines and writes them to *fd*.

    It may be called from any thread, and again from inside itself (a
    signal handler or a garbage collection that logs while it writes):
    the lock is never held while it writes or arms its timer, and one call
    at a time writes (others leave their line to it).
    """

    def __init__(
        self,
        fd: int,
        reactor: Any,
        every: float = FLUSH_EVERY,
        in_io_thread: Callable[[], bool] = threadable.isInIOThread,
        orphan_fd: int = 2,
    ) -> None:
        self.fd = fd
        #: where the lines go once the supervisor is gone (stderr: the
        #: journal under systemd), in the log's own format
        self.orphan_fd = orphan_fd
        self._orphaned = False
        self.reactor = reactor
        self.every = every
        self._in_io_thread = in_io_thread
        self._lines: list[str] = []
        self._size = 0
        self._armed = False  # a timer will write what is gathered
        self._timer: Any = None
        self._writing = False  # a call is writing: it takes what is added meanwhile
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        line = worker_line(event)
        at_once = (
            event.get("log_level") not in _QUIET
            or not getattr(self.reactor, "running", False)
            or not self._in_io_thread()
        )
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            if self._writing:
                return
            if not at_once and self._size < FLUSH_AT:
                if self._armed:
                    return
                self._armed = True
                arm = True
            else:
                self._writing = True
                arm = False
        if arm:
            self._timer = self.reactor.callLater(self.every, self._tick)
        else:
            self._drain()

    def _tick(self) -> None:
        self._timer = None
        self._armed = False
        self._write_gathered()

    def flush(self) -> None:
        """Write what is gathered now (at shutdown)."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._armed = False
        self._write_gathered()

    def _write_gathered(self) -> None:
        with self._lock:
            if self._writing or not self._lines:
                return
            self._writing = True
        self._drain()

    def _drain(self) -> None:
        """Write until nothing is gathered (``_writing`` is ours)."""
        try:
            while True:
                with self._lock:
                    if not self._lines:
                        # Given up in the same hold of the lock that saw the
                        # buffer empty: a line added after it is written by
                        # whoever added it.
                        self._writing = False
                        return
                    text = "".join(self._lines)
                    self._lines.clear()
                    self._size = 0
                self._write(text.encode("utf-8", "replace"))
        except BaseException:
            with self._lock:
                self._writing = False
            raise

    def _write(self, data: bytes) -> None:
        if not self._orphaned:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self.fd, view) :]
                return
            except OSError:
                # The supervisor is gone (killed): this worker finishes its
                # sessions, and their lines (AUTH, spooled) must not vanish.
                self._orphaned = True
                data = bytes(view)
                notice = worker_line(
                    {
                        "log_format": "{text}",
                        "text": "the supervisor is gone: this worker's lines go to its "
                        "standard error until it stops",
                        "log_level": LogLevel.warn,
                        "log_namespace": "kumoauth",
                        "log_time": time.time(),
                    }
                )
                data = notice.encode("utf-8") + data
        with contextlib.suppress(OSError):
            view = memoryview(classic_lines(data))
            while view:
                view = view[os.write(self.orphan_fd, view) :]


def classic_lines(data: bytes) -> bytes:
    """
    Wire lines (:func:`worker_line`) as the log writes them: the event's
    time, then the line, a traceback's lines after the first indented.
    """
    out = []
    for raw in data.split(b"\n"):
        if raw:
            when, text = read_line(raw, time.time)
            out.append(f"{log_time(when)} {visible(text)}".replace("\n", "\n\t") + "\n")
    return "".join(out).encode("utf-8", "replace")


def read_line(line: bytes, now: Callable[[], float]) -> tuple[float, str]:
    """
    (time, text) of one wire line; a line without a time (something the
    worker printed rather than logged) is taken at *now()*, after
    ``(printed)``, so that it never reads as one of the worker's events (a
    printed "[kumoauth.auth#info] AUTH … failure …" is no failure for
    fail2ban's text filter).
    """
    stamped = _STAMP.match(line)
    if stamped is None:
        return now(), "(printed) " + line.decode("utf-8", "replace")
    return float(stamped.group(1)), _unescape(line[stamped.end() :].decode("utf-8", "replace"))


class LineReader:
    """
    The supervisor's side: split a worker's output into events and publish
    each (with the time the worker gave it) to *observer*, prefixed.  A
    line without a time (something written to the worker's stderr) is
    published with the time it arrived, after ``(printed)``.
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
        # A worker's batch (50 ms of its lines) in one write to the file.
        with one_write():
            for line in lines:
                if line.strip():
                    self._publish(line, now)

    def _publish(self, line: bytes, now: Callable[[], float]) -> None:
        when, text = read_line(line, now)
        self.observer(
            {
                "log_format": "{text}",
                "text": self.prefix + text,
                "log_level": LogLevel.info,
                "log_namespace": self.logger.namespace,
                "log_source": None,
                "log_logger": self.logger,
                "log_time": when,
                # the worker wrote it to its own [log] json_path already
                WORKER_LINE: True,
            }
        )
