"""
XOAUTH2 and OAUTHBEARER (RFC 7628) decoders: pure functions, strict, with
property tests (round trips, arbitrary input raises only SASLError, errors
never carry the token).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoauth.auth import sasl
from kumoauth.auth.mechanisms import REGISTRY, BearerResult, OAuthBearer, XOAuth2
from kumoauth.auth.sasl import SASLError

TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
tokens = st.builds(
    lambda body, pad: body + "=" * pad,
    st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=400),
    st.integers(0, 2),
)
users = st.text(
    alphabet=st.characters(min_codepoint=0x20, blacklist_categories=("Cs", "Cc")),
    min_size=1,
    max_size=60,
).filter(lambda u: len(u.encode()) <= 255 and "\x7f" not in u)


@given(users, tokens)
def test_xoauth2_round_trip(user, token):
    decoded = sasl.decode_xoauth2(sasl.encode_xoauth2(user, token))
    assert (decoded.authz, decoded.token) == (user, token)


@given(
    st.one_of(st.just(""), users),
    tokens,
    st.sampled_from(["", "mail.example"]),
    st.integers(0, 65535),
)
def test_oauthbearer_round_trip(authz, token, host, port):
    decoded = sasl.decode_oauthbearer(sasl.encode_oauthbearer(authz, token, host, port))
    assert (decoded.authz, decoded.token) == (authz, token)


@given(st.binary(max_size=300))
def test_arbitrary_input_raises_only_sasl_error(data):
    for decode in (sasl.decode_xoauth2, sasl.decode_oauthbearer):
        try:
            decode(data)
        except SASLError as e:
            assert e.reply.startswith(b"501 5.5.2 ")


def test_xoauth2_exact_wire_form():
    message = (
        b"user=someuser@example.com\x01"
        b"auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
    )
    decoded = sasl.decode_xoauth2(message)
    assert decoded.authz == "someuser@example.com"
    assert decoded.token == "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"


def test_oauthbearer_rfc7628_example():
    # RFC 7628 §4.1, the client's initial response (decoded)
    message = (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==\x01\x01"
    )
    decoded = sasl.decode_oauthbearer(message)
    assert decoded.authz == "user@example.com"
    assert decoded.token == "vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg=="


def test_oauthbearer_authzid_escapes():
    decoded = sasl.decode_oauthbearer(b"n,a=a=2Cb=3Dc,\x01auth=Bearer t\x01\x01")
    assert decoded.authz == "a,b=c"


@pytest.mark.parametrize(
    "message",
    [
        b"user=u\x01auth=Bearer t\x01",  # one ^A at the end
        b"user=u\x01auth=Bearer t",
        b"auth=Bearer t\x01user=u\x01\x01",  # order
        b"user=u\x01auth=Basic dTpw\x01\x01",  # not Bearer
        b"user=u\x01auth=Bearer \x01\x01",  # empty token
        b"user=u\x01auth=Bearer t\x00k\x01\x01",  # bad token character
        b"user=\x01auth=Bearer t\x01\x01",  # empty user
        b"user=u\x07\x01auth=Bearer t\x01\x01",  # control in user
        b"user=u\x01auth=Bearer t\x01extra=1\x01\x01",  # a third field
        b"user=" + b"x" * 256 + b"\x01auth=Bearer t\x01\x01",  # user too long
    ],
)
def test_malformed_xoauth2(message):
    with pytest.raises(SASLError) as e:
        sasl.decode_xoauth2(message)
    assert e.value.reply.startswith(b"501 ")


@pytest.mark.parametrize(
    "message",
    [
        b"p=tls-unique,,\x01auth=Bearer t\x01\x01",  # channel binding asked for
        b"x,,\x01auth=Bearer t\x01\x01",  # unknown flag
        b"n,b=u,\x01auth=Bearer t\x01\x01",  # not a=
        b"n,a=u\x01auth=Bearer t\x01\x01",  # no closing comma
        b"n,a=u=2X,\x01auth=Bearer t\x01\x01",  # bad saslname escape
        b"n,,auth=Bearer t\x01\x01",  # no kvsep after the header
        b"n,,\x01auth=Bearer t\x01",  # one ^A at the end
        b"n,,\x01host=h\x01\x01",  # no auth
        b"n,,\x01auth=Bearer t\x01auth=Bearer u\x01\x01",  # auth twice
        b"n,,\x01au th=x\x01auth=Bearer t\x01\x01",  # key not letters
        b"n,,\x01auth=Bearer t t\x01\x01",  # space inside the token
        b"n,,\x01host=h\x00\x01auth=Bearer t\x01\x01",  # NUL in a value
    ],
)
def test_malformed_oauthbearer(message):
    with pytest.raises(SASLError) as e:
        sasl.decode_oauthbearer(message)
    assert e.value.reply.startswith(b"501 ")


@given(tokens)
def test_errors_and_reprs_never_carry_the_token(token):
    secret = "S3CRET" + token
    for bad in (
        b"user=u\x01auth=Bearer " + secret.encode() + b"\x01",
        b"n,,\x01auth=Bearer " + secret.encode() + b" x\x01\x01",
    ):
        for decode in (sasl.decode_xoauth2, sasl.decode_oauthbearer):
            try:
                decode(bad)
            except SASLError as e:
                assert "S3CRET" not in str(e) and b"S3CRET" not in e.reply
    assert "S3CRET" not in repr(sasl.decode_xoauth2(sasl.encode_xoauth2("u", secret)))
    assert "S3CRET" not in repr(BearerResult("u", secret))


def test_mechanisms_are_registered_and_need_oauth():
    assert REGISTRY["XOAUTH2"] is XOAuth2 and REGISTRY["OAUTHBEARER"] is OAuthBearer
    assert XOAuth2.needs_oauth and OAuthBearer.needs_oauth
    assert not REGISTRY["PLAIN"].needs_oauth
    result = OAuthBearer().respond(sasl.encode_oauthbearer("a@b", "tok"))
    assert isinstance(result, BearerResult) and result.authz == "a@b"
