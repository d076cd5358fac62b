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

from hypothesis import given
from hypothesis import strategies as st

from kumoauth.meta import ConnMeta
from kumoauth.smtp.data import trace_date


class Tag(str):
    pass


atoms = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and the infinities included
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


@given(st.floats(min_value=0, max_value=4102444800, allow_nan=False))
def test_the_received_date_is_the_rfc5322_date_of_its_second(now):
    expected = email.utils.format_datetime(datetime.fromtimestamp(int(now), UTC))
    assert trace_date(now) == expected
    assert trace_date(now) == expected  # cached
