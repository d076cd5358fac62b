"""
Message ids: the spool's, the queue's, and kumoauth 0.1's (the same form).
"""

from __future__ import annotations

import secrets
import time


def new_id() -> str:
    """
    A spool id: 16 hex digits of nanoseconds since the epoch (so ids sort by
    arrival) and 8 random hex digits (so concurrent writers never collide).
    """
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


def is_id(name: str) -> bool:
    return len(name) == 24 and all(c in "0123456789abcdef" for c in name)
