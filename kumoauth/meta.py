"""
Connection and message metadata (SPEC §4).

One :class:`ConnMeta` exists per connection and is shared by every policy
event of that connection.  When DATA completes, a snapshot of it becomes the
message's meta.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: how deep a meta value may nest (lists and objects inside one another):
#: far more than any real use, and far from the interpreter's recursion
#: limit, which every later copy and JSON encoding of the value must pass
MAX_DEPTH = 32


class MetaError(ValueError):
    """
    A value given to ``set_meta`` cannot be stored (not JSON-serialisable,
    or nested deeper than :data:`MAX_DEPTH`).
    """


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """
    Whether *value* has more than *limit* lists or dicts one inside another
    (``[[1]]`` has two), found without recursion, so any depth can be asked.
    """
    level = [value]
    for _ in range(limit + 1):
        inner: list[Any] = []
        found = False
        for item in level:
            if isinstance(item, dict):
                inner.extend(item.values())
                found = True
            elif isinstance(item, (list, tuple)):
                inner.extend(item)
                found = True
        if not found:
            return False
        level = inner
    return True


class _NotPlain(Exception):
    pass


#: values a JSON round trip gives back as they are (exact types: a str or
#: int subclass may serialise differently from its value)
_ATOMS = frozenset({str, int, bool, type(None)})

#: values json.dumps always takes (not int: one past 4,300 digits fails)
_ALWAYS_JSON = frozenset({str, bool, type(None)})


def _plain_copy(value: Any) -> Any:
    """
    *value* copied as ``json.loads(json.dumps(value))`` would give it, for
    str, int, bool, None, finite floats, lists and str-keyed dicts of them;
    :class:`_NotPlain` for anything else (the caller goes through JSON).
    """
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _NotPlain  # NaN and infinities: JSON's own spelling
        return value
    if kind is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _NotPlain
            out[k] = _plain_copy(v)
        return out
    if kind is list:
        return [_plain_copy(v) for v in value]
    raise _NotPlain


class Meta:
    """
    A string-keyed store of JSON-serialisable values.
    """

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self._values: dict[str, Any] = dict(values) if values else {}

    def get_meta(self, key: str) -> Any:
        """
        Return the value stored under *key*, or ``None``.
        """
        return self._values.get(key)

    def set_meta(self, key: str, value: Any) -> None:
        """
        Store *value* under *key*.  The value must survive a JSON round trip,
        because it ends up in the spool's ``.json`` file.
        """
        if not isinstance(key, str):
            raise MetaError(f"meta keys are strings, not {type(key).__name__}")
        if type(value) in _ALWAYS_JSON:
            self._values[key] = value
            return
        if too_deep(value):
            raise MetaError(f"meta value for {key!r} nests deeper than {MAX_DEPTH} levels")
        try:
            json.dumps(value, allow_nan=False)  # NaN and infinities are not JSON
        except (TypeError, ValueError) as e:
            raise MetaError(f"meta value for {key!r} is not JSON-serialisable: {e}") from None
        self._values[key] = value

    def snapshot(self) -> dict[str, Any]:
        """
        A deep copy of every key and value, safe to keep after the
        connection changes its meta again: what a JSON round trip gives
        (tuples become lists, dict keys strings), made directly when the
        values are plain JSON types (the usual case, several times
        cheaper), through JSON otherwise.
        """
        try:
            return _plain_copy(self._values)  # type: ignore[no-any-return]
        except _NotPlain:
            return json.loads(json.dumps(self._values))  # type: ignore[no-any-return]

    def values_now(self) -> dict[str, Any]:
        """
        A shallow copy of the values (cheap; for :meth:`restore`).
        """
        return dict(self._values)

    def restore(self, values: dict[str, Any]) -> None:
        """
        Make the values exactly *values* (taken with :meth:`values_now`).
        """
        self._values = dict(values)

    def keys(self) -> list[str]:
        return list(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._values!r}>"


class ConnMeta(Meta):
    """
    The metadata of one connection (``conn_meta`` in the policy API).
    """

    __slots__ = ()
