"""
The log twistd writes, in twistd's own format, formatted faster.

twistd's file observer formats every event through ``string.Formatter``
and works its timestamp out from scratch (time zone included): ~35 µs per
event in a busy server, two or three events per session.  kumoauth's own
events are one prebuilt ``{text}`` field, so this observer writes them
directly, with the timestamp formatted once a second by twistd's own
function; every other event (a failure, a many-field format, Twisted's
own) goes through Twisted's formatter.  The lines are the same, byte for
byte (``tests/test_logfile.py`` holds the two side by side), except that
a character neither printable nor a line feed or tab (in a traceback's
message, say) is escaped (:func:`visible`).

The observer is offered to twistd as its application's ``ILogObserver``
(:class:`ApplicationLog`), which twistd uses instead of building its own,
so it writes where twistd would: ``--logfile`` (with twistd's rotation and
its SIGUSR1 re-open), or stdout with ``-n``.  With ``--syslog`` or
``--logger`` nothing is offered and twistd does as it always does.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from kumoauth.textsafe import escape

_log = Logger("kumoauth")


def log_time(when: float | None) -> str:
    """*when* as twistd's log writes it (RFC 3339, local time zone)."""
    return formatTime(when, timeFormatRFC3339)


class ClassicText:
    """
    ``formatEventAsClassicLogText`` as twistd's file observer calls it,
    with a fast path for an event that is one prebuilt text field.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = ""

    def __call__(self, event: dict[str, Any]) -> str | None:
        text = event.get("text")
        when = event.get("log_time")
        level = event.get("log_level")
        if (
            event.get("log_format") != "{text}"
            or type(text) is not str
            or not text
            or type(when) is not float
            or when < 0
            or level is None
            or "log_failure" in event
            or "log_system" in event
            or "log_flattened" in event
        ):
            line = formatEventAsClassicLogText(event, formatTime=log_time)
            if line is None or line[:-1].replace("\n\t", "").isprintable():
                return line
            return visible(line[:-1]) + "\n"
        # The second datetime.fromtimestamp puts it in: microseconds rounded
        # half to even first, as CPython does (1.9999996 is 00:00:02).
        frac, whole = math.modf(when)
        second = int(whole) + (round(frac * 1e6) >= 1_000_000)
        if second != self._second:
            # The stamp has whole seconds, and a time zone's offset changes
            # on a whole second: one per second is the same text.
            self._second, self._stamp = second, log_time(second)
        if not text.isprintable():  # a worker's line with its traceback, say
            text = visible(text)
        system = f"{event.get('log_namespace', '-')}#{level.name}"
        return f"{self._stamp} [{system}] {text}".replace("\n", "\n\t") + "\n"


def visible(text: str) -> str:
    """
    *text* with each character that is neither printable nor a line feed
    or tab escaped (``\\x1b``).  A safety net under every line: kumoauth's
    own texts are escaped already, but a traceback quotes its exception's
    message, which may quote a client, and Twisted's own events are not
    escaped.  Line feeds stay (twistd indents the lines after the first,
    so a traceback cannot forge a line); nothing reaches a terminal raw.
    """
    return "".join(c if c.isprintable() or c in "\n\t" else escape(c) for c in text)


def observer_for(options: Any) -> ILogObserver | None:
    """
    The observer twistd would make for its *options* (its ServerOptions),
    with :class:`ClassicText`; None where twistd should choose (``--syslog``,
    ``--logger``, a daemon told to log to stdout, which twistd refuses).
    """
    if options is None or options.get("logger") or options.get("syslog"):
        return None
    name = options.get("logfile") or ""
    nodaemon = options.get("nodaemon", False)
    out: Any
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            return None
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(name or "twistd.log")
        # SIGUSR1 re-opens the file under its name (after something moved
        # it), with the JSON log: install_signals.  twistd's own handler
        # renamed it to NAME.1 instead.
        on_reopen(lambda: _reopen(out))
    global _log_fd
    try:
        _log_fd = out.fileno() if out is sys.stdout else out._file.fileno()
    except (AttributeError, OSError, ValueError):
        _log_fd = None
    return ClassicFileLogObserver(out, ClassicText())


#: the descriptor twistd's log is written to, once :func:`observer_for` chose it
_log_fd: int | None = None


def _reopen(log_file: Any) -> bool:
    """
    ``LogFile.reopen`` closes the file before it opens the new one: a name
    that cannot be opened any more would leave no log at all.  Tried first.
    """
    try:
        with open(log_file.path, "a"):
            pass
    except OSError as e:
        _log.warn(
            "cannot re-open {path}: {error}; still writing to the file it was",
            path=escape(log_file.path),
            error=escape(e.strerror or str(e)),
        )
        return False
    log_file.reopen()
    return True


#: what SIGUSR1 re-opens (the log files), in order
_reopeners: list[Callable[[], object]] = []


def on_reopen(fn: Callable[[], object]) -> None:
    """Call *fn* on each SIGUSR1 (:func:`reopen_logs`), from now on."""
    _reopeners.append(fn)


def forget_reopen(fn: Callable[[], object]) -> None:
    with contextlib.suppress(ValueError):
        _reopeners.remove(fn)


def reopen_logs() -> None:
    """
    SIGUSR1: re-open every log file under its name, as after logrotate
    moved it (``postrotate``: ``kill -USR1``); with workers, the
    supervisor passes the signal on to them.
    """
    done = True
    for fn in list(_reopeners):
        try:
            if fn() is False:
                done = False  # it said why, in one line
        except Exception:
            _log.failure("re-opening a log file")
            done = False
    if done:
        # In the new files: what a look after the rotation finds.
        _log.info("log files re-opened (SIGUSR1)")


def log_is_stderr() -> bool:
    """
    True if twistd's log goes where file descriptor 2 goes (``twistd -n``
    under systemd or in a terminal): a line for both would be read twice.
    """
    if _log_fd is None:
        return False
    try:
        log, err = os.fstat(_log_fd), os.fstat(2)
    except OSError:
        return False
    return (log.st_dev, log.st_ino) == (err.st_dev, err.st_ino)


class ClassicFileLogObserver(FileLogObserver):
    """
    ``FileLogObserver``, except inside :func:`one_write`: what a thread
    logs there reaches the file in one write when the block ends, instead
    of one write (a system call: the file is unbuffered) per event.
    """

    def __call__(self, event: dict[str, Any]) -> None:
        text = self.formatEvent(event)
        if not text:
            return
        gathered = getattr(_batch, "texts", None)
        if gathered is not None:
            gathered.setdefault(self, []).append(text)
        else:
            self._put(text)

    def _put(self, text: str) -> None:
        self._outFile.write(text if self._encoding is None else text.encode(self._encoding))
        self._outFile.flush()


#: .texts: inside one_write, this thread's gathered texts per observer
_batch = threading.local()


@contextmanager
def one_write() -> Iterator[None]:
    """
    What this thread logs inside the block through kumoauth's file
    observer is written once, when the block ends, in order (the
    supervisor logs each batch of a worker's lines so).  Other threads'
    events are written at once, as always.
    """
    if getattr(_batch, "texts", None) is not None:
        yield  # inside another block: that one writes
        return
    gathered: dict[ClassicFileLogObserver, list[str]] = {}
    _batch.texts = gathered
    try:
        yield
    finally:
        _batch.texts = None
        for observer, texts in gathered.items():
            observer._put("".join(texts))


class ApplicationLog:
    """
    Mixin for the service twistd puts in its application: with
    :attr:`log_observer` set, the application gets it as its
    ``ILogObserver``, which twistd then logs through.
    """

    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> Any:
        if (
            self.log_observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)  # type: ignore[misc]
