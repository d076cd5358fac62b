"""
SASL decoders (RFC 4954 §4, RFC 4616 §2): examples and hypothesis properties.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kumoauth import sasl
from kumoauth.sasl import SASLError

field = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    max_size=64,
).filter(lambda s: len(s.encode()) <= sasl.MAX_FIELD)


@given(st.binary(max_size=9216))
def test_response_round_trip(data):
    assert sasl.decode_response(sasl.encode_response(data)) == data


@given(st.binary(max_size=13000))
def test_arbitrary_response_raises_only_sasl_error(line):
    try:
        sasl.decode_response(line)
    except SASLError as e:
        assert e.reply[:3] in (b"501", b"500")


@given(st.binary(min_size=1, max_size=300))
def test_base64_without_padding_is_rejected(data):
    encoded = base64.b64encode(data)
    stripped = encoded.rstrip(b"=")
    assume(stripped != encoded)
    with pytest.raises(SASLError) as e:
        sasl.decode_response(stripped)
    assert e.value.reply.startswith(b"501 5.5.2")


B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@given(st.binary(min_size=1, max_size=300), st.integers(min_value=1, max_value=15))
def test_non_canonical_pad_bits_are_rejected(data, noise):
    """RFC 4648 §3.5: the bits before the padding must be zero."""
    encoded = bytearray(base64.b64encode(data))
    pad = encoded.count(b"=")
    assume(pad)
    noise %= 1 << (4 if pad == 2 else 2)
    assume(noise)
    pos = len(encoded) - pad - 1
    encoded[pos] = B64[B64.index(encoded[pos]) | noise]
    with pytest.raises(SASLError):
        sasl.decode_response(bytes(encoded))


def test_cancel_and_empty():
    with pytest.raises(SASLError) as e:
        sasl.decode_response(b"*")
    assert e.value.kind == "cancelled"
    assert e.value.reply == b"501 5.7.0 Authentication cancelled"
    assert sasl.decode_response(b"=") == b""
    assert sasl.decode_response(b"") == b""


def test_too_long():
    with pytest.raises(SASLError) as e:
        sasl.decode_response(b"A" * 12292)
    assert e.value.reply.startswith(b"500 5.5.6")
    assert len(sasl.decode_response(b"A" * 12288)) == 9216


@given(field, field, field)
def test_plain_round_trip(authz, authc, password):
    decoded = sasl.decode_plain(sasl.encode_plain(authz, authc, password))
    assert (decoded.authz, decoded.authc, decoded.password) == (authz, authc, password)


@given(st.binary(max_size=1000))
def test_arbitrary_plain_raises_only_sasl_error(message):
    try:
        sasl.decode_plain(message)
    except SASLError as e:
        assert e.reply.startswith(b"501 5.5.2")


@given(st.binary(max_size=300))
def test_arbitrary_login_field_raises_only_sasl_error(data):
    try:
        assert isinstance(sasl.decode_login_field(data, "username"), str)
    except SASLError as e:
        assert e.reply.startswith(b"501 5.5.2")


@pytest.mark.parametrize(
    "message",
    [b"a\x00b", b"a\x00b\x00c\x00d", b"\x00" + b"x" * 256 + b"\x00p", b"\x00u\x00\xff"],
)
def test_malformed_plain(message):
    with pytest.raises(SASLError):
        sasl.decode_plain(message)


def test_errors_never_carry_the_data():
    secret = "hunter2-secret"
    for message in (
        b"\x00user\x00" + secret.encode() + b"\xff",
        b"\x00user\x00" + secret.encode() * 30,
        secret.encode(),
    ):
        with pytest.raises(SASLError) as e:
            sasl.decode_plain(message)
        assert secret not in str(e.value) and secret.encode() not in e.value.reply


def test_repr_hides_password():
    r = sasl.decode_plain(b"\x00scott\x00tiger")
    assert "tiger" not in repr(r)
