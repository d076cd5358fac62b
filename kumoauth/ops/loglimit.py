"""
Rate-limited logging of events a client can repeat at will.

A throttled client pipelining 2,000 AUTH lines must not write 2,000 log
lines: the first event per (client, kind) is logged, the repeats within
*interval* are only counted, and one summary line says how many there were
once the interval is over.  Metrics still count every event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

_log = Logger(namespace="kumoauth")

#: seconds during which repeats of one (client, kind) are summarised
INTERVAL = 60.0


class LogLimiter:
    """
    Process-lived (it survives reloads); memory is bounded by the number of
    clients active within one interval.
    """

    def __init__(self, clock: IReactorTime, interval: float = INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        # key -> [window start, suppressed count, summary callback]
        self._windows: dict[tuple[str, ...], list[Any]] = {}

    def allow(self, key: tuple[str, ...], summarise: Callable[[int], None]) -> bool:
        """
        True if the event under *key* should be logged now.  Otherwise it is
        counted, and *summarise(n)* is called once at the end of the
        interval with the number suppressed.
        """
        now = self.clock.seconds()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            if window is not None and window[1] and window[2] is not None:
                window[2](window[1])
            self._windows[key] = [now, 0, None]
            if len(self._windows) == 1 and window is None:
                self.clock.callLater(self.interval, self._sweep)
            return True
        window[1] += 1
        window[2] = summarise
        return False

    def _sweep(self) -> None:
        now = self.clock.seconds()
        for key, (start, suppressed, summarise) in list(self._windows.items()):
            if now - start < self.interval:
                continue
            del self._windows[key]
            if suppressed and summarise is not None:
                summarise(suppressed)
        if self._windows:
            oldest = min(w[0] for w in self._windows.values())
            self.clock.callLater(max(0.0, oldest + self.interval - now), self._sweep)

    def __len__(self) -> int:
        return len(self._windows)


class StateLog:
    """
    One log line per change of a dependency's state: the first failure
    after success (with the reason and what it means for clients), and the
    first success after failures (with how many there were), never one line
    per attempt.  Process-lived: a reload keeps it.  *logger* and *fields*
    (extra event fields, e.g. ``backend=``) let each owner log under its
    own namespace.
    """

    def __init__(self, what: str, logger: Logger | None = None, **fields: Any) -> None:
        self.what = what
        self.logger = logger if logger is not None else _log
        self.fields = fields
        self.down: str | None = None
        self.failures = 0

    def failed(self, reason: str, consequence: str = "", count: bool = True) -> None:
        """
        The dependency failed: said if it was up.  *count* False: not an
        operation of a client's (a connection of its own lost, say), so
        not among those the "available again" line counts.
        """
        from kumoauth.textsafe import escape

        if self.down is None:
            self.down = reason
            self.failures = 0
            self.logger.error(
                "{what} unavailable: {reason}{consequence}",
                what=self.what,
                reason=escape(reason, 300),
                consequence=f"; {consequence}" if consequence else "",
                **self.fields,
            )
        if count:
            self.failures += 1

    def succeeded(self) -> None:
        if self.down is not None:
            self.logger.info(
                "{what} available again ({n} operations met it down)",
                what=self.what,
                n=self.failures,
                **self.fields,
            )
            self.down = None
