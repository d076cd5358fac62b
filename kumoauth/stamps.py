"""
Timestamps formatted once a second: many messages share a second, and the
text of a second never changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class PerSecond:
    """
    ``text(second)`` for the current second (or for *now*), formatted only
    when the second changes.  Safe from any thread: the cache is one tuple,
    swapped whole.
    """

    def __init__(self, text: Callable[[int], str]) -> None:
        self._text = text
        self._cached: tuple[int, str] = (-1, "")

    def __call__(self, now: float | None = None) -> str:
        second = int(time.time() if now is None else now)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, self._text(second))
        return cached[1]
