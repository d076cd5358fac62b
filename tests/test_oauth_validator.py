"""
The OAuth bearer-token validator (``[auth.oauth]``,
kumoauth.backends.oauth) against the test IdP of tests/idp.py: a real
``twisted.web`` server on 127.0.0.1 (plain HTTP and HTTPS with trustme)
serving a JWKS and RFC 7662 introspection, tokens signed with real RSA,
EC and Ed25519 keys, and a JWKS file.  What makes a token valid, the
attacks (alg "none", HS256 keyed with the public key), key rotation and
the JWKS cache (refresh on an unknown kid, rate-limited and shared,
Cache-Control), introspection, outages logged once, the RFC 7628 error
payload, and no token in any log line, exception or repr.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, ssl
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from kumoauth.backends.base import BackendError
from kumoauth.backends.oauth import (
    JWKS_TTL_DEFAULT,
    JWKS_TTL_MAX,
    JWKS_TTL_MIN,
    Config,
    InvalidToken,
    TokenValidator,
    _max_age,
    validate,
)
from tests.idp import AUDIENCE, CLIENT_SECRET, IdP, SigningKey, b64url, compact
from tests.upstream import in_reactor, start_reactor

# --------------------------------------------------------------------------
# fixtures


class Clock:
    """The validator's clock for the JWKS cache: wall time plus an offset."""

    def __init__(self) -> None:
        self.offset = 0.0

    def seconds(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    """One key per algorithm (RSA generation is slow: made once)."""
    return {alg: SigningKey.make(alg, f"{alg.lower()}-1") for alg in ("RS256", "ES256", "EdDSA")}


@pytest.fixture
def idp(reactor: Any, keys: dict[str, SigningKey]) -> Iterator[IdP]:
    server = IdP(reactor, published=list(keys.values()))
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_failure_logged(captured_log: Any) -> Iterator[None]:
    """No traceback, no "Unhandled error in Deferred", whatever the test did."""
    yield
    in_reactor(lambda: None)
    gc.collect()
    failures = [e for e in captured_log.events if "log_failure" in e]
    assert not failures, captured_log.text()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(reactor: Any, clock: Clock) -> Iterator[Callable[..., TokenValidator]]:
    """Validators made (and started) on the reactor thread, stopped after."""
    made: list[TokenValidator] = []

    def make_validator(raw: dict[str, Any], start: bool = True) -> TokenValidator:
        config = validate(raw)

        def build() -> TokenValidator:
            return TokenValidator(config, reactor=reactor, clock=clock)

        v: TokenValidator = in_reactor(build)
        made.append(v)
        if start:
            in_reactor(v.start)
        return v

    yield make_validator
    for v in made:
        in_reactor(v.stop)


def jwks_table(idp: IdP, **kw: Any) -> dict[str, Any]:
    return {"issuer": idp.issuer, "audience": AUDIENCE, "jwks_url": idp.url("/jwks"), **kw}


def introspection_table(idp: IdP, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    secret = tmp_path / "client-secret"
    secret.write_text(kw.pop("secret", CLIENT_SECRET) + "\n")
    return {
        "issuer": idp.issuer,
        "audience": AUDIENCE,
        "introspection_url": idp.url("/introspect"),
        "introspection_client_id": "kumoauth",
        "introspection_secret_file": str(secret),
        **kw,
    }


def ok(v: TokenValidator, token: str) -> dict[str, Any]:
    claims: dict[str, Any] = in_reactor(v.validate, token)
    return claims


def refused(v: TokenValidator, token: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as e:
        in_reactor(v.validate, token)
    return e.value


def unavailable(v: TokenValidator, token: str) -> BackendError:
    with pytest.raises(BackendError) as e:
        in_reactor(v.validate, token)
    return e.value


# --------------------------------------------------------------------------
# valid tokens


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_a_valid_token_of_each_algorithm(idp, keys, make, alg):
    v = make(jwks_table(idp))
    claims = ok(v, keys[alg].sign(idp.claims()))
    assert claims["email"] == "alice@example.org"
    assert claims["sub"] == idp.claims()["sub"]
    assert v.username(claims) == "alice@example.org"
    assert idp.jwks_requests == 1  # the prefetch; the cache answered the rest


def test_https_jwks_with_the_configured_ca(reactor, keys, make, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    tls = ssl.PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
    server = IdP(reactor, tls=tls, published=[keys["ES256"]])
    server.start()
    try:
        ca_file = tmp_path / "idp-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        v = make(jwks_table(server, ca_file=str(ca_file)))
        assert ok(v, keys["ES256"].sign(server.claims()))["email"] == "alice@example.org"
        # Without the CA (the system's trust store does not know it): 454.
        stranger = make(jwks_table(server))
        assert "TLS" in str(unavailable(stranger, keys["ES256"].sign(server.claims())))
    finally:
        server.stop()


def test_a_jwks_file_is_read_again_when_it_changes(idp, keys, make, tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [keys["RS256"].jwk()]}))
    v = make({"issuer": idp.issuer, "audience": AUDIENCE, "jwks_file": str(path)})
    assert ok(v, keys["RS256"].sign(idp.claims()))
    assert refused(v, keys["EdDSA"].sign(idp.claims())).reason == "unknown kid"
    new = tmp_path / "jwks.new"
    new.write_text(json.dumps({"keys": [keys["EdDSA"].jwk()]}))
    os.replace(new, path)  # how an operator rotates: a new file in place
    assert ok(v, keys["EdDSA"].sign(idp.claims()))
    assert refused(v, keys["RS256"].sign(idp.claims())).reason == "unknown kid"
    path.write_text("not json")
    assert "jwks_file" in str(unavailable(v, keys["EdDSA"].sign(idp.claims())))


def test_a_key_without_kid_is_used_only_when_it_is_the_only_one_of_its_algorithm(
    idp, keys, make, tmp_path
):
    lone = keys["EdDSA"].with_kid(None)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [lone.jwk(), keys["RS256"].jwk()]}))
    v = make({"issuer": idp.issuer, "audience": AUDIENCE, "jwks_file": str(path)})
    assert ok(v, lone.sign(idp.claims()))  # no kid in the token either
    other = SigningKey.make("EdDSA", None)
    path.write_text(json.dumps({"keys": [lone.jwk(), other.jwk(), keys["RS256"].jwk()]}))
    assert refused(v, lone.sign(idp.claims())).reason == "no kid"


# --------------------------------------------------------------------------
# claims


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"nbf": int(time.time()) + 3600}, "not yet valid"),
        ({"iat": int(time.time()) + 3600}, "not yet valid"),
        ({"aud": "someone-else"}, "wrong audience"),
        ({"aud": ["a", "b"]}, "wrong audience"),
        ({"iss": "https://evil.example/realms/mail"}, "wrong issuer"),
        ({"exp": None}, "missing exp"),
        ({"iss": None}, "missing iss"),
        ({"aud": None}, "missing aud"),
        ({"exp": "9999999999"}, "malformed exp"),
        ({"email": None}, "no email claim"),
        ({"email": ""}, "unusable email claim"),
        ({"email": ["alice@example.org"]}, "unusable email claim"),
        ({"email": "alice@example.org\r\nX-Injected: 1"}, "unusable email claim"),
        ({"email": "alice\x00@example.org"}, "unusable email claim"),
        ({"email": "alice\u2028@example.org"}, "unusable email claim"),
        ({"email": 42}, "unusable email claim"),
        ({"email": {"address": "alice@example.org"}}, "unusable email claim"),
        # an address the IdP says it did not verify may be anyone's ("nOAuth")
        ({"email_verified": False}, "email not verified"),
        ({"email_verified": "false"}, "email not verified"),
        ({"aud": [AUDIENCE + "x", {"a": AUDIENCE}]}, "wrong audience"),
        ({"aud": []}, "missing aud"),
        ({"iat": "0"}, "malformed iat"),
    ],
)
def test_claims_that_make_a_token_invalid(idp, keys, make, overrides, reason):
    v = make(jwks_table(idp))
    e = refused(v, keys["ES256"].sign(idp.claims(**overrides)))
    assert e.reason == reason
    assert e.sub == idp.claims()["sub"] and e.jti == "jti-0001"  # signed: loggable


def test_leeway(idp, keys, make):
    now = int(time.time())
    v = make(jwks_table(idp))  # leeway 60 s
    assert ok(v, keys["ES256"].sign(idp.claims(exp=now - 30)))
    assert ok(v, keys["ES256"].sign(idp.claims(nbf=now + 30, iat=now + 30)))
    assert refused(v, keys["ES256"].sign(idp.claims(exp=now - 90))).reason == "expired"
    strict = make(jwks_table(idp, leeway=0))
    assert refused(strict, keys["ES256"].sign(idp.claims(exp=now - 30))).reason == "expired"


def test_an_audience_list_containing_ours(idp, keys, make):
    v = make(jwks_table(idp))
    assert ok(v, keys["RS256"].sign(idp.claims(aud=["account", AUDIENCE])))


def test_username_claim(idp, keys, make):
    v = make(jwks_table(idp, username_claim="preferred_username"))
    token = keys["EdDSA"].sign(idp.claims(preferred_username="alice"))
    assert v.username(ok(v, token)) == "alice"
    assert refused(v, keys["EdDSA"].sign(idp.claims())).reason == "no preferred_username claim"


# --------------------------------------------------------------------------
# signatures and attacks


def test_a_signature_by_another_key_with_the_same_kid(idp, keys, make):
    v = make(jwks_table(idp))
    impostor = SigningKey.make("ES256", keys["ES256"].kid)
    e = refused(v, impostor.sign(idp.claims()))
    assert e.reason == "bad signature"
    assert e.sub is None and e.jti is None  # not the issuer's: nothing to log


def test_a_tampered_payload(idp, keys, make):
    v = make(jwks_table(idp))
    header, _, signature = keys["RS256"].sign(idp.claims()).split(".")
    forged = b64url(json.dumps(idp.claims(email="mallory@example.org")).encode())
    assert refused(v, f"{header}.{forged}.{signature}").reason == "bad signature"


def test_alg_none_is_refused(idp, keys, make):
    v = make(jwks_table(idp))
    for alg in ("none", "None", "NONE"):
        token = compact({"alg": alg, "typ": "JWT", "kid": keys["RS256"].kid}, idp.claims())
        assert refused(v, token).reason == "algorithm not allowed"
    # without a kid, too, and with PyJWT's own encoding
    assert refused(v, compact({"alg": "none"}, idp.claims())).reason == "algorithm not allowed"


def _hs256_with_the_public_key(idp: IdP, key: SigningKey) -> str:
    """The classic confusion: HMAC keyed with the issuer's public key PEM,
    which anyone can fetch (PyJWT refuses to sign this; done by hand)."""
    from cryptography.hazmat.primitives import serialization

    pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    h = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    p = b64url(json.dumps(idp.claims()).encode())
    mac = hmac.new(pem, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64url(mac)}"


def test_hs256_keyed_with_the_rsa_public_key_is_refused(idp, keys, make, reactor, clock):
    token = _hs256_with_the_public_key(idp, keys["RS256"])
    v = make(jwks_table(idp))
    assert refused(v, token).reason == "algorithm not allowed"
    # validate() refuses to allow it; a Config made by hand gets it filtered out
    with pytest.raises(ValueError, match="never allowed"):
        validate(jwks_table(idp, algorithms=["RS256", "HS256"]))
    with pytest.raises(ValueError, match="never allowed"):
        validate(jwks_table(idp, algorithms=["none"]))
    raw = Config(
        issuer=idp.issuer,
        audience=AUDIENCE,
        jwks_url=idp.url("/jwks"),
        algorithms=("RS256", "HS256", "none"),
    )
    hand_made = in_reactor(lambda: TokenValidator(raw, reactor=reactor, clock=clock))
    try:
        assert refused(hand_made, token).reason == "algorithm not allowed"
    finally:
        in_reactor(hand_made.stop)


def test_an_oct_key_in_the_jwks_is_never_used(idp, keys, make):
    idp.published = []
    idp.jwks_body = json.dumps(
        {"keys": [{"kty": "oct", "kid": "h", "k": b64url(b"secret")}, keys["ES256"].jwk()]}
    ).encode()
    v = make(jwks_table(idp, algorithms=["ES256"]))
    token = compact({"alg": "HS256", "kid": "h"}, idp.claims(), b"x" * 32)
    assert refused(v, token).reason == "algorithm not allowed"
    assert ok(v, keys["ES256"].sign(idp.claims()))


def test_an_algorithm_that_does_not_match_the_key(idp, keys, make):
    v = make(jwks_table(idp, algorithms=["RS256", "ES256", "EdDSA", "PS256"]))
    token = jwt_ps256(keys["RS256"], idp.claims())
    assert refused(v, token).reason == "algorithm does not match the key"


def jwt_ps256(key: SigningKey, claims: dict[str, Any]) -> str:
    import jwt

    return jwt.encode(claims, key.private, algorithm="PS256", headers={"kid": key.kid})


# --------------------------------------------------------------------------
# the JWKS cache


def test_an_unknown_kid_refreshes_and_a_rotated_key_is_then_valid(idp, keys, make, clock):
    v = make(jwks_table(idp))
    assert idp.jwks_requests == 1  # the prefetch
    rotated = SigningKey.make("EdDSA", "eddsa-2")
    token = rotated.sign(idp.claims())
    assert refused(v, token).reason == "unknown kid"  # fetched moments ago: not asked
    assert idp.jwks_requests == 1
    clock.advance(61)
    assert refused(v, token).reason == "unknown kid"  # one refresh, not there yet
    assert idp.jwks_requests == 2
    idp.published = [rotated, keys["RS256"]]
    assert refused(v, token).reason == "unknown kid"  # rate-limited: not asked
    assert idp.jwks_requests == 2
    clock.advance(61)
    assert ok(v, token)["email"] == "alice@example.org"  # rotated in
    assert ok(v, keys["RS256"].sign(idp.claims()))
    assert idp.jwks_requests == 3


def test_unknown_kid_refreshes_are_rate_limited(idp, keys, make, clock):
    v = make(jwks_table(idp, jwks_min_refresh=30))
    clock.advance(31)
    rotated = SigningKey.make("ES256", "es256-2")
    for n in range(5):
        assert refused(v, SigningKey.make("ES256", f"junk-{n}").sign(idp.claims())).reason == (
            "unknown kid"
        )
    assert idp.jwks_requests == 2  # the prefetch and one refresh
    idp.published = [rotated]
    clock.advance(31)
    assert ok(v, rotated.sign(idp.claims()))
    assert idp.jwks_requests == 3
    # the old keys went with the rotation
    assert refused(v, keys["ES256"].sign(idp.claims())).reason == "unknown kid"
    assert idp.jwks_requests == 3


def test_concurrent_validations_share_one_fetch(idp, make, clock):
    v = make(jwks_table(idp))
    clock.advance(61)
    rotated = SigningKey.make("EdDSA", "eddsa-3")
    idp.published = [rotated]
    token = rotated.sign(idp.claims())

    def many() -> Any:
        return defer.gatherResults([v.validate(token) for _ in range(10)], consumeErrors=True)

    results = in_reactor(many)
    assert [r["email"] for r in results] == ["alice@example.org"] * 10
    assert idp.jwks_requests == 2


def test_cache_control_max_age_is_honoured(idp, keys, make, clock):
    idp.cache_control = "public, max-age=120"
    v = make(jwks_table(idp))
    token = keys["RS256"].sign(idp.claims())
    assert ok(v, token) and idp.jwks_requests == 1
    clock.advance(100)
    assert ok(v, token) and idp.jwks_requests == 1
    clock.advance(30)  # 130 s: past max-age
    assert ok(v, token) and idp.jwks_requests == 2
    clock.advance(100)
    assert ok(v, token) and idp.jwks_requests == 2


def test_max_age_bounds_and_default():
    def age(value: str | None) -> float:
        headers = Headers({b"Cache-Control": [value.encode()]} if value else {})
        return _max_age(headers)

    assert age(None) == JWKS_TTL_DEFAULT
    assert age("max-age=600") == 600
    assert age("max-age=5") == JWKS_TTL_MIN
    assert age("max-age=99999999") == JWKS_TTL_MAX
    assert age("no-cache") == JWKS_TTL_MIN
    assert age("max-age=junk") == JWKS_TTL_DEFAULT


def test_keys_stay_in_use_past_their_lifetime_while_the_idp_is_down(
    idp, keys, make, clock, captured_log
):
    v = make(jwks_table(idp))
    token = keys["EdDSA"].sign(idp.claims())
    idp.stop()
    clock.advance(JWKS_TTL_DEFAULT + 1)
    assert ok(v, token)  # the refresh failed; the keys held still verify
    assert idp.jwks_requests == 1
    clock.advance(JWKS_TTL_MAX)
    assert "connection refused" in str(unavailable(v, token))
    lines = captured_log.namespace("kumoauth.backends")
    assert len(lines) == 1 and "unavailable" in lines[0]["log_format"]
    idp.start()  # the same port again


def test_jwks_down_at_start_does_not_fail_it_then_back(idp, keys, make, clock, captured_log):
    idp.stop()
    v = make(jwks_table(idp))  # start() prefetches and fails quietly
    token = keys["ES256"].sign(idp.claims())
    for _ in range(3):
        assert "connection refused" in str(unavailable(v, token))
    idp.start()
    assert "connection refused" in str(unavailable(v, token))  # not asked again yet
    clock.advance(6)
    assert ok(v, token)
    assert ok(v, token)
    lines = captured_log.namespace("kumoauth.backends")
    texts = [e["log_format"] for e in lines]
    assert len(lines) == 2, texts
    assert "unavailable" in texts[0] and lines[0]["backend"] == "oauth-jwks"
    assert "available again" in texts[1]


def asking(idp: IdP, fetch: str, make: Any, keys: Any, tmp_path: Path) -> tuple[Any, str]:
    """A validator that asks *idp* by *fetch* (its JWKS or introspection), and a token for it."""
    if fetch == "jwks":
        return make(jwks_table(idp)), keys["ES256"].sign(idp.claims())
    return make(introspection_table(idp, tmp_path)), "opaque-1"


@pytest.mark.parametrize("fetch", ["jwks", "introspection"])
def test_an_idp_outage_logs_one_line_and_nothing_per_request(
    reactor, keys, make, clock, captured_log, tmp_path, fetch
):
    # Nothing listening at the IdP's URLs: every validation (the JWKS
    # once the rate limit allows a refetch; introspection each time) opens
    # and fails a connection.  The whole log is the one "unavailable"
    # line: no Twisted "Starting factory" / "Stopping factory" per request.
    from tests.server import free_port

    down = IdP(reactor, port=free_port(), published=list(keys.values()))  # never started
    v, token = asking(down, fetch, make, keys, tmp_path)
    for _ in range(4):
        clock.advance(6)  # past the refetch rate limit
        assert "connection refused" in str(unavailable(v, token))
    lines = [formatEvent(e) for e in captured_log.events]
    assert len(lines) == 1, lines
    assert "unavailable" in lines[0] and "connection refused" in lines[0], lines


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (500, None, "HTTP 500"),
        (302, None, "redirect, not followed"),
        (200, b"<html>", "not JSON"),
        (200, b'{"keys": []}', "no usable signing key"),
        (200, b'{"keys": [{"kty": "RSA"}]}', "no usable signing key"),
        (200, b"[1]", "not a JWKS"),
    ],
)
def test_a_jwks_answering_nonsense_is_a_backend_error(idp, keys, make, status, body, reason):
    idp.jwks_status, idp.jwks_body = status, body
    v = make(jwks_table(idp))
    assert reason in str(unavailable(v, keys["ES256"].sign(idp.claims())))


# --------------------------------------------------------------------------
# malformed tokens


@pytest.fixture(scope="module")
def file_validator(keys: dict[str, SigningKey], tmp_path_factory: Any) -> TokenValidator:
    """A JWKS-file validator: validate() completes without the reactor."""
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [k.jwk() for k in keys.values()]}))
    config = validate(
        {"issuer": "https://idp.example", "audience": AUDIENCE, "jwks_file": str(path)}
    )
    return TokenValidator(config, reactor=start_reactor())


def _outcome(v: TokenValidator, token: Any) -> Any:
    results: list[Any] = []
    v.validate(token).addBoth(results.append)
    assert results, "a JWKS-file validation completes at once"
    return results[0]


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@given(
    st.one_of(
        st.text(max_size=300),
        st.text(alphabet=_B64URL + ".=", max_size=300),
        st.lists(st.text(alphabet=_B64URL, max_size=80), min_size=3, max_size=3).map(".".join),
        st.tuples(
            st.dictionaries(
                st.sampled_from(["alg", "kid", "typ", "crit", "b64"]),
                st.none()
                | st.booleans()
                | st.integers()
                | st.text(max_size=10)
                | st.sampled_from(["RS256", "ES256", "EdDSA", "rs256-1"]),
            ),
            st.binary(max_size=64),
            st.binary(max_size=64),
        ).map(lambda t: f"{b64url(json.dumps(t[0]).encode())}.{b64url(t[1])}.{b64url(t[2])}"),
    )
)
def test_random_tokens_are_only_ever_invalid(file_validator, token):
    result = _outcome(file_validator, token)
    assert isinstance(result, Failure) and result.check(InvalidToken), result
    assert token not in str(result.value) or len(token) < 3


@given(st.integers(min_value=0), st.characters(codec="ascii"))
def test_a_valid_token_with_one_character_changed_is_invalid(file_validator, keys, where, ch):
    token = keys["ES256"].sign(
        {
            "iss": "https://idp.example",
            "aud": AUDIENCE,
            "exp": int(time.time()) + 60,
            "email": "a@example.org",
        }
    )
    i = where % len(token)
    mutated = token[:i] + ch + token[i + 1 :]
    result = _outcome(file_validator, mutated)
    if mutated == token or isinstance(result, dict):
        # base64url has spare bits in a final character: some changes decode
        # to the same bytes; the token is then still the signed one
        assert isinstance(result, dict) and result["email"] == "a@example.org"
    else:
        assert isinstance(result, Failure) and result.check(InvalidToken), result


def test_oversized_and_non_string_tokens(file_validator):
    for token in ("a" * 20000, "", None, b"a.b.c"):
        result = _outcome(file_validator, token)
        assert isinstance(result, Failure) and result.check(InvalidToken)
    result = _outcome(file_validator, "opaque-token")
    assert result.value.reason == "not a JWT"


# --------------------------------------------------------------------------
# introspection


def test_introspection_active_gives_the_claims(idp, make, tmp_path):
    v = make(introspection_table(idp, tmp_path))
    idp.introspected["opaque-1"] = {"active": True, **idp.claims(), "client_id": "thunderbird"}
    claims = ok(v, "opaque-1")
    assert claims["email"] == "alice@example.org" and claims["client_id"] == "thunderbird"
    form = idp.introspection_forms[-1]
    assert form == {"token": ["opaque-1"], "token_type_hint": ["access_token"]}
    # with introspection only, a JWT is introspected too
    idp.introspected["a.b.c"] = {"active": True, **idp.claims()}
    assert ok(v, "a.b.c")


def test_introspection_inactive_and_its_claims(idp, make, tmp_path):
    v = make(introspection_table(idp, tmp_path))
    assert refused(v, "unknown-token").reason == "inactive"
    now = int(time.time())
    cases = {
        "no-aud": ({"aud": None}, "missing aud"),
        "wrong-aud": ({"aud": ["account"]}, "wrong audience"),
        "wrong-iss": ({"iss": "https://other.example"}, "wrong issuer"),
        "expired": ({"exp": now - 3600}, "expired"),
        "later": ({"nbf": now + 3600}, "not yet valid"),
        "no-user": ({"email": None}, "no email claim"),
    }
    for token, (overrides, _) in cases.items():
        idp.introspected[token] = {"active": True, **idp.claims(**overrides)}
    for token, (_, reason) in cases.items():
        e = refused(v, token)
        assert e.reason == reason, token
    # iss and exp may be left out of an answer
    idp.introspected["bare"] = {"active": True, "aud": AUDIENCE, "email": "bob@example.org"}
    assert ok(v, "bare")["email"] == "bob@example.org"


def test_introspection_with_a_wrong_client_secret(idp, make, tmp_path, captured_log):
    v = make(introspection_table(idp, tmp_path, secret="wrong-secret"))
    idp.introspected["opaque-1"] = {"active": True, **idp.claims()}
    e = unavailable(v, "opaque-1")
    assert "HTTP 401" in str(e) and "client id or secret" in str(e)
    assert "wrong-secret" not in captured_log.text() + str(e)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"<html>", "not JSON"),
        (b'{"active": "yes"}', '"active"'),
        (b"[]", '"active"'),
    ],
)
def test_introspection_answering_nonsense(idp, make, tmp_path, answer, reason):
    idp.introspection_body = answer
    v = make(introspection_table(idp, tmp_path))
    assert reason in str(unavailable(v, "opaque-1"))


def test_introspection_down_then_back_logs_one_line_each(idp, make, tmp_path, captured_log):
    v = make(introspection_table(idp, tmp_path))
    idp.introspected["opaque-1"] = {"active": True, **idp.claims()}
    assert ok(v, "opaque-1")
    idp.stop()
    for _ in range(3):
        assert "connection refused" in str(unavailable(v, "opaque-1"))
    idp.start()
    assert ok(v, "opaque-1")
    assert ok(v, "opaque-1")
    lines = captured_log.namespace("kumoauth.backends")
    texts = [e["log_format"] for e in lines]
    assert len(lines) == 2, texts
    assert "unavailable" in texts[0] and "connection refused" in lines[0]["reason"]
    assert lines[0]["backend"] == "oauth-introspection"
    assert "available again" in texts[1] and lines[1]["n"] == 3


def test_a_caller_that_gives_up_during_the_name_lookup_is_no_outage(
    idp, make, tmp_path, reactor, silent_dns, captured_log
):
    # The attempt's deadline cancels an introspection still waiting for the
    # IdP's name: Twisted reports "couldn't find the hostname", which must
    # not be logged as the IdP being down.
    table = introspection_table(idp, tmp_path, allow_plaintext=True)
    table["introspection_url"] = "http://idp.example.test:8080/introspect"
    v = make(table)
    pending: list[Any] = []
    in_reactor(lambda: pending.append(v.validate("opaque-1")))
    wait = time.monotonic() + 5
    while not silent_dns.asked and time.monotonic() < wait:
        time.sleep(0.01)
    assert silent_dns.asked == ["idp.example.test"]
    with pytest.raises(defer.CancelledError):
        in_reactor(lambda: (pending[0].cancel(), pending[0])[1])
    assert "unavailable" not in captured_log.text()


def test_introspection_timeout(idp, make, tmp_path, monkeypatch):
    from tests import idp as idp_module

    def hang(self: Any, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        return NOT_DONE_YET

    monkeypatch.setattr(idp_module._Introspect, "render_POST", hang)
    v = make(introspection_table(idp, tmp_path, timeout=0.3))
    assert "no answer within 0.3 s" in str(unavailable(v, "opaque-1"))


# --------------------------------------------------------------------------
# the RFC 7628 error payload


def test_error_json_byte_for_byte(idp, make, tmp_path):
    v = make(jwks_table(idp))
    issuer = idp.issuer
    assert v.error_json(InvalidToken("expired")) == (
        b'{"status":"invalid_token","openid-configuration":"'
        + issuer.encode()
        + b'/.well-known/openid-configuration"}'
    )
    assert v.error_json(InvalidToken("expired", scope="smtp email")) == (
        b'{"status":"invalid_token","scope":"smtp email","openid-configuration":"'
        + issuer.encode()
        + b'/.well-known/openid-configuration"}'
    )
    scoped = make(jwks_table(idp, issuer=issuer + "/", scope="api://smtp/send"), start=False)
    assert scoped.error_json(InvalidToken("inactive")) == (
        b'{"status":"invalid_token","scope":"api://smtp/send","openid-configuration":"'
        + issuer.encode()
        + b'/.well-known/openid-configuration"}'
    )


# --------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"audience": "a", "jwks_url": "https://idp/j"}, "issuer: required"),
        ({"issuer": "i", "jwks_url": "https://idp/j"}, "audience: required"),
        ({"issuer": "i", "audience": "a"}, "one of jwks_url, jwks_file or introspection_url"),
        (
            {"issuer": "i", "audience": "a", "jwks_url": "https://idp/j", "jwks_file": "/x"},
            "exclude each other",
        ),
        ({"issuer": "i", "audience": "a", "jwks_url": "http://idp.example/j"}, "http://"),
        ({"issuer": "i", "audience": "a", "jwks_url": "ftp://idp/j"}, "must start with"),
        ({"issuer": "i", "audience": "a", "jwks_url": "https://u:p@idp/j"}, "user or password"),
        (
            {"issuer": "i", "audience": "a", "introspection_url": "https://idp/i"},
            "go together",
        ),
        (
            {"issuer": "i", "audience": "a", "jwks_url": "http://127.0.0.1/j", "ca_file": "/x"},
            "ca_file: only for an https://",
        ),
        ({"issuer": "i", "audience": "a", "jwks_url": "https://idp/j", "leeway": -1}, "leeway"),
        ({"issuer": "i", "audience": "a", "jwks_url": "https://idp/j", "algorithms": []}, "list"),
        (
            {"issuer": "i", "audience": "a", "jwks_url": "https://idp/j", "algorithms": ["HS512"]},
            "never allowed",
        ),
        (
            {"issuer": "i", "audience": "a", "jwks_url": "https://idp/j", "algorithms": ["X1"]},
            "unsupported algorithm",
        ),
        ({"issuer": "i", "audience": "a", "jwks_file": "/nonexistent/jwks"}, "jwks_file:"),
        ({"issuer": "i", "audience": "a", "jwks_url": "https://idp/j", "bogus": 1}, "unknown key"),
    ],
)
def test_configuration_mistakes(raw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate(raw)


def test_configuration_paths_and_plaintext(tmp_path):
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [SigningKey.make("EdDSA", "k").jwk()]}))
    config = validate({"issuer": "i", "audience": "a", "jwks_file": "jwks.json"}, base=tmp_path)
    assert config.jwks_file == tmp_path / "jwks.json"
    assert config.algorithms == ("RS256", "ES256", "EdDSA")
    plain = validate(
        {"issuer": "i", "audience": "a", "jwks_url": "http://idp.lan/j", "allow_plaintext": True}
    )
    assert plain.jwks_url == "http://idp.lan/j"


# --------------------------------------------------------------------------
# nothing leaks


def test_no_token_or_secret_in_logs_errors_or_reprs(idp, keys, make, tmp_path, captured_log):
    v = make(jwks_table(idp))
    i = make(introspection_table(idp, tmp_path))
    tokens = [
        keys["RS256"].sign(idp.claims(exp=int(time.time()) - 3600)),
        keys["ES256"].sign(idp.claims(aud="nope")),
        SigningKey.make("EdDSA", "eddsa-1").sign(idp.claims()),
        _hs256_with_the_public_key(idp, keys["RS256"]),
        compact({"alg": "none"}, idp.claims()),
        "not.a-valid.jwt",
    ]
    texts = []
    for token in tokens:
        e = refused(v, token)
        texts += [str(e), repr(e), e.reason]
    e = refused(i, "opaque-secret-token-value")
    texts += [str(e), repr(e)]
    idp.stop()
    b = unavailable(i, "opaque-secret-token-value")
    texts += [str(b), repr(b)]
    idp.start()
    texts += [captured_log.text(), repr(v), repr(i), repr(v.config), repr(i.config)]
    everything = "\n".join(texts)
    assert captured_log.namespace("kumoauth.backends"), "the outage was logged"
    for token in tokens + ["opaque-secret-token-value"]:
        for part in token.split("."):
            if len(part) > 8:
                assert part not in everything
    assert CLIENT_SECRET not in everything


# --------------------------------------------------------------------------
# cost


def test_signature_checks_are_cheap_enough_for_the_reactor_thread(file_validator, keys):
    claims = {
        "iss": "https://idp.example",
        "aud": AUDIENCE,
        "exp": int(time.time()) + 60,
        "email": "a@example.org",
    }
    for alg, key in keys.items():
        token = key.sign(claims)
        n = 200
        started = time.perf_counter()
        for _ in range(n):
            assert isinstance(_outcome(file_validator, token), dict)
        per = (time.perf_counter() - started) / n
        assert per < 0.002, f"{alg}: {per * 1e6:.0f} µs per validation"


# --------------------------------------------------------------------------
# audit: a JWKS PyJWT cannot parse, reloads, refreshes during an outage


def _junk_alg_keys(keys: dict[str, SigningKey]) -> list[dict[str, Any]]:
    """JWKs whose "alg" PyJWT's key set cannot take (TypeError, NotImplementedError)."""
    return [
        {**keys["ES256"].jwk(), "alg": ["ES256"], "kid": "junk-list"},
        {**keys["RS256"].jwk(), "alg": {"name": "RS256"}, "kid": "junk-dict"},
        # PyJWT raises NotImplementedError for this one
        {**keys["RS256"].jwk(), "alg": "none", "kid": "junk-none"},
    ]


def test_a_jwks_key_with_a_non_string_alg_is_skipped(idp, keys, make, clock, captured_log):
    # The keys beside it stay usable ...
    idp.published = []
    idp.jwks_body = json.dumps({"keys": [*_junk_alg_keys(keys), keys["EdDSA"].jwk()]}).encode()
    v = make(jwks_table(idp))
    assert ok(v, keys["EdDSA"].sign(idp.claims()))["email"] == "alice@example.org"
    junk = keys["ES256"].with_kid("junk-list").sign(idp.claims())
    assert refused(v, junk).reason == "unknown kid"
    # ... and a JWKS of nothing else is an IdP answering nonsense: 454 and
    # one "unavailable" line, never a TypeError (a traceback per attempt).
    idp.jwks_body = json.dumps({"keys": _junk_alg_keys(keys)}).encode()
    v2 = make(jwks_table(idp))
    for _ in range(3):
        clock.advance(6)
        assert "no usable signing key" in str(unavailable(v2, keys["ES256"].sign(idp.claims())))
    lines = captured_log.namespace("kumoauth.backends")
    assert len(lines) == 1 and "unavailable" in lines[0]["log_format"], lines


def test_a_jwks_file_with_a_non_string_alg_is_one_line(idp, keys, make, tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": _junk_alg_keys(keys)}))
    with pytest.raises(ValueError, match="jwks_file: .*no usable signing key"):
        validate({"issuer": idp.issuer, "audience": AUDIENCE, "jwks_file": str(path)})
    # replaced by such a file while running: 454, not a TypeError
    path.write_text(json.dumps({"keys": [keys["ES256"].jwk()]}))
    v = make({"issuer": idp.issuer, "audience": AUDIENCE, "jwks_file": str(path)})
    assert ok(v, keys["ES256"].sign(idp.claims()))
    new = tmp_path / "jwks.new"
    new.write_text(json.dumps({"keys": _junk_alg_keys(keys)}))
    os.replace(new, path)
    assert "no usable signing key" in str(unavailable(v, keys["ES256"].sign(idp.claims())))


def test_a_reload_keeps_the_key_cache_while_the_idp_is_down(idp, keys, make, clock, captured_log):
    # docs/configuration.md: "the key cache is kept unless the key source
    # changed"; an IdP outage must not turn a SIGHUP into 454 for everyone.
    v = make(jwks_table(idp))
    token = keys["ES256"].sign(idp.claims())
    assert ok(v, token) and idp.jwks_requests == 1
    idp.stop()
    in_reactor(v.reload, validate(jwks_table(idp, leeway=30, scope="smtp")))
    assert v.config.scope == "smtp"
    assert ok(v, token)["email"] == "alice@example.org"
    clock.advance(JWKS_TTL_DEFAULT + 1)
    assert ok(v, token)  # past their lifetime: the held keys, as before the reload
    # The outage is one line, across the reload too, and so is the recovery.
    in_reactor(v.reload, validate(jwks_table(idp, leeway=20)))
    clock.advance(6)
    assert ok(v, token)
    idp.start()
    clock.advance(6)
    assert ok(v, token)
    lines = [formatEvent(e) for e in captured_log.namespace("kumoauth.backends")]
    assert len(lines) == 2, lines
    assert "unavailable" in lines[0] and "available again" in lines[1]
    # Another key source: its own cache, fetched from the new URL.
    before = idp.jwks_requests
    in_reactor(v.reload, validate(jwks_table(idp, jwks_url=idp.url("/jwks?v=2"))))
    assert ok(v, token) and idp.jwks_requests == before + 1


def test_a_replaced_key_source_no_longer_speaks_for_the_idp(idp, keys, make, captured_log):
    # A fetch of the old URL still under way after a reload to another one
    # ends after it: its failure is not the IdP's state (no "unavailable"
    # line while the new source answers).
    v = make(jwks_table(idp))
    token = keys["ES256"].sign(idp.claims())
    assert ok(v, token)
    old = v._setup.keys
    in_reactor(v.reload, validate(jwks_table(idp, jwks_url=idp.url("/jwks?v=2"))))
    assert ok(v, token)
    idp.jwks_status = 500
    with pytest.raises(BackendError, match="HTTP 500"):
        in_reactor(old.refresh)  # the old source's late fetch
    assert captured_log.namespace("kumoauth.backends") == []


def test_unknown_kids_during_an_outage_fetch_once_per_min_refresh(idp, keys, make, clock):
    # Keys are held; the IdP answers 500.  Made-up kids may not make
    # kumoauth ask it more often than jwks_min_refresh (the 5 s retry is
    # for having no keys, or only keys past their lifetime): until then an
    # unknown kid is 454 (whether it was rotated in cannot be known), and
    # known keys keep working.
    v = make(jwks_table(idp, jwks_min_refresh=60))
    assert idp.jwks_requests == 1
    idp.jwks_status = 500
    clock.advance(61)
    junk = SigningKey.make("ES256", "junk-0").sign(idp.claims())
    assert "HTTP 500" in str(unavailable(v, junk))
    assert idp.jwks_requests == 2
    for n in range(1, 9):
        clock.advance(6)
        token = keys["ES256"].with_kid(f"junk-{n}").sign(idp.claims())
        assert "HTTP 500" in str(unavailable(v, token))
        assert ok(v, keys["ES256"].sign(idp.claims()))
    assert idp.jwks_requests == 2
    idp.jwks_status = 200
    clock.advance(13)  # 61 s after the failed fetch: asked again, and back
    assert refused(v, junk).reason == "unknown kid"
    assert idp.jwks_requests == 3


def test_a_reload_that_fails_leaves_the_key_cache_as_it_was(idp, keys, make, tmp_path):
    table = introspection_table(idp, tmp_path, jwks_url=idp.url("/jwks"))
    v = make(table)
    setup = v._setup
    assert ok(v, keys["ES256"].sign(idp.claims()))
    (tmp_path / "client-secret").unlink()  # gone between validate() and reload
    with pytest.raises(ValueError, match="introspection_secret_file"):
        in_reactor(v.reload, Config(**{**vars(v.config), "leeway": 5.0}))
    assert v._setup is setup and setup.keys is not None
    assert setup.keys.client is setup.client  # not a client nobody retires
    assert ok(v, keys["ES256"].sign(idp.claims()))


def test_duplicate_kids_are_told_apart_by_algorithm(idp, keys, make, tmp_path):
    # RFC 7517 §4.5: keys of different types may share a kid.  Two keys
    # of one algorithm under one kid (an IdP's mistake): the first is used,
    # a token of the second is a bad signature, never a key of another type.
    rsa, ec = keys["RS256"].with_kid("shared"), keys["ES256"].with_kid("shared")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa.jwk(), ec.jwk()]}))
    v = make({"issuer": idp.issuer, "audience": AUDIENCE, "jwks_file": str(path)})
    assert ok(v, rsa.sign(idp.claims())) and ok(v, ec.sign(idp.claims()))
    twin = SigningKey.make("ES256", "shared")
    path.write_text(json.dumps({"keys": [ec.jwk(), twin.jwk(), rsa.jwk()]}))
    assert ok(v, ec.sign(idp.claims()))
    assert refused(v, twin.sign(idp.claims())).reason == "bad signature"
    # a kid's key without "alg" is its type's usual algorithm only
    path.write_text(json.dumps({"keys": [ec.jwk(with_alg=False)]}))
    assert ok(v, ec.sign(idp.claims()))
    token = compact({"alg": "ES384", "kid": "shared"}, idp.claims(), b"x" * 96)
    v384 = make(
        {
            "issuer": idp.issuer,
            "audience": AUDIENCE,
            "jwks_file": str(path),
            "algorithms": ["ES256", "ES384"],
        }
    )
    assert refused(v384, token).reason == "algorithm does not match the key"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"active": true, "x": "' + b"a" * 70_000 + b'"}', "body over 65536 bytes"),
        (b'{"active": true, "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "not JSON"),
        (b'{"active": 1}', '"active"'),
        (b'{"active": null}', '"active"'),
        (b'{"active": true, "exp": NaN}', "not JSON"),
    ],
)
def test_introspection_answers_too_big_too_deep_or_not_boolean(
    idp, make, tmp_path, captured_log, body, reason
):
    idp.introspection_body = body
    v = make(introspection_table(idp, tmp_path))
    for _ in range(3):
        assert reason in str(unavailable(v, "opaque-1"))
    lines = captured_log.namespace("kumoauth.backends")
    assert len(lines) == 1 and "unavailable" in lines[0]["log_format"]
    assert CLIENT_SECRET not in captured_log.text()


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",
        b"",
    ],
    ids=["not-http", "bad-length", "bad-chunk", "short-body", "closed"],
)
@pytest.mark.parametrize("fetch", ["jwks", "introspection"])
def test_an_idp_speaking_broken_http_is_454_and_one_line(
    reactor, keys, make, clock, captured_log, tmp_path, answer, fetch
):
    from twisted.internet import protocol

    class Broken(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(answer)
            self.transport.loseConnection()

    factory = protocol.Factory.forProtocol(Broken)
    port = in_reactor(lambda: reactor.listenTCP(0, factory, interface="127.0.0.1"))
    try:
        down = IdP(reactor, port=port.getHost().port)  # its URLs, not its server
        v, token = asking(down, fetch, make, keys, tmp_path)
        for _ in range(3):
            clock.advance(6)
            unavailable(v, token)
    finally:
        in_reactor(port.stopListening)
    # (the raw server's own "Starting factory" lines are not kumoauth's)
    ours = [e for e in captured_log.events if e.get("log_namespace", "").startswith("kumoauth")]
    lines = [formatEvent(e) for e in ours]
    assert len(lines) == 1 and "unavailable" in lines[0], lines


# --------------------------------------------------------------------------
# required scopes


@pytest.mark.parametrize(
    ("granted", "allowed"),
    [
        ({"scope": "openid smtp.send email"}, True),
        ({"scope": "openid email"}, False),
        ({"scope": "openid SMTP.SEND"}, False),  # compared exactly
        ({"scope": "smtp.sendx"}, False),
        ({"scope": None, "scp": ["openid", "smtp.send"]}, True),  # Okta
        ({"scope": None, "scp": "openid smtp.send"}, True),  # Entra ID
        ({"scope": None, "scp": [["smtp.send"]]}, False),
        ({"scope": None}, False),
        ({"scope": ["smtp.send"]}, True),
    ],
)
def test_required_scopes_must_all_be_granted(idp, keys, make, granted, allowed):
    v = make(jwks_table(idp, required_scopes=["smtp.send"]))
    token = keys["ES256"].sign(idp.claims(**granted))
    if allowed:
        assert ok(v, token)["email"] == "alice@example.org"
        return
    e = refused(v, token)
    assert e.reason == "missing scope smtp.send"
    assert e.status == "insufficient_scope" and e.sub == idp.claims()["sub"]
    assert v.error_json(e) == (
        b'{"status":"insufficient_scope","scope":"smtp.send","openid-configuration":"'
        + idp.issuer.encode()
        + b'/.well-known/openid-configuration"}'
    )


def test_required_scopes_of_an_introspected_token(idp, make, tmp_path):
    v = make(introspection_table(idp, tmp_path, required_scopes=["smtp", "email"]))
    idp.introspected["both"] = {"active": True, **idp.claims()}  # "openid email smtp"
    idp.introspected["one"] = {"active": True, **idp.claims(scope="smtp")}
    assert ok(v, "both")
    assert refused(v, "one").reason == "missing scope email"
    # without required_scopes a token's scopes are not looked at
    plain = make(introspection_table(idp, tmp_path))
    assert ok(plain, "one")


@pytest.mark.parametrize(
    "value", [["smtp send"], ['"q"'], ["back\\slash"], ["é"], "smtp", [1], [""]]
)
def test_required_scopes_must_be_scope_tokens(value):
    raw = {"issuer": "i", "audience": "a", "jwks_url": "https://idp/j", "required_scopes": value}
    with pytest.raises(ValueError, match="required_scopes"):
        validate(raw)


def test_the_advertised_scope_must_include_the_required_ones(idp, make):
    with pytest.raises(ValueError, match="scope: the scope to ask for lacks required_scopes b"):
        validate(jwks_table(idp, scope="a", required_scopes=["a", "b"]))
    v = make(jwks_table(idp, required_scopes=["a", "b"]), start=False)
    # every refusal names what to ask for, not only insufficient_scope
    assert v.error_json(InvalidToken("expired")) == (
        b'{"status":"invalid_token","scope":"a b","openid-configuration":"'
        + idp.issuer.encode()
        + b'/.well-known/openid-configuration"}'
    )
