"""
Meta snapshots (a message's meta is its connection's, copied at DATA) and
the Received header's date.
"""

from __future__ import annotations

import email.utils
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoauth.meta import MAX_DEPTH, ConnMeta, MetaError, too_deep
from kumoauth.smtp.data import trace_date


class Tag(str):
    pass


atoms = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)  # the others are refused (below)
    | st.text(max_size=8)
    | st.builds(Tag, st.text(max_size=4))
)
values = st.recursive(
    atoms,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4), inner, max_size=4)
        | st.dictionaries(st.integers() | st.booleans() | st.none(), inner, max_size=3)
    ),
    max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    """Equal as JSON round trips are (NaN equal to NaN, types exact)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@given(st.dictionaries(st.text(max_size=6), values, max_size=6))
def test_a_snapshot_is_what_a_json_round_trip_gives_and_owns_its_values(raw):
    meta = ConnMeta()
    for key, value in raw.items():
        meta.set_meta(key, value)
    snap = meta.snapshot()
    expected = json.loads(json.dumps(meta.values_now()))
    assert same(snap, expected)
    # Nothing in it is shared with the connection's meta.
    for value in meta.values_now().values():
        if isinstance(value, (list, dict)):
            value.clear()
    assert same(snap, expected)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1.0, math.inf], {"a": math.nan}])
def test_nan_and_infinities_are_refused(value):
    # Not JSON (RFC 8259 §6): the spool's meta would hold NaN / Infinity,
    # which jq and every strict reader refuse.
    with pytest.raises(MetaError, match="not JSON-serialisable"):
        ConnMeta().set_meta("x", value)


def depth(value: Any) -> int:
    """Lists and dicts one inside another, counted the obvious way."""
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max(map(depth, value), default=0)
    return 0


@given(values, st.integers(min_value=0, max_value=6))
def test_too_deep_counts_nesting(value, limit):
    assert too_deep(value, limit) == (depth(value) > limit)


def nested(levels: int) -> Any:
    value: Any = {"leaf": 1}
    for n in range(levels - 1):
        value = [value] if n % 2 else {"k": value}
    return value


def test_set_meta_takes_values_up_to_max_depth_and_refuses_deeper():
    meta = ConnMeta()
    meta.set_meta("ok", nested(MAX_DEPTH))
    assert meta.snapshot()["ok"] == nested(MAX_DEPTH)
    for levels in (MAX_DEPTH + 1, 5_000):  # 5,000: past the recursion limit
        with pytest.raises(MetaError, match=f"nests deeper than {MAX_DEPTH} levels"):
            meta.set_meta("deep", nested(levels))
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(MetaError):
        meta.set_meta("loop", loop)
    assert meta.keys() == ["ok"]


def test_set_meta_refuses_an_int_json_cannot_write():
    meta = ConnMeta()
    with pytest.raises(MetaError, match="not JSON-serialisable"):
        meta.set_meta("n", 10**5000)


@given(st.floats(min_value=0, max_value=4102444800, allow_nan=False))
def test_the_received_date_is_the_rfc5322_date_of_its_second(now):
    expected = email.utils.format_datetime(datetime.fromtimestamp(int(now), UTC))
    assert trace_date(now) == expected
    assert trace_date(now) == expected  # cached
