"""
XOAUTH2 and OAUTHBEARER through the protocol (StringTransport), with the
real token validator reading a JWKS file and tokens signed with real keys:
235 with authn_id from the claim, the RFC 7628 §3.2.2 error challenge byte
for byte and 535 after the client's dummy response, 538 before TLS, 501
for malformed input, the policy event, throttles and the IdP down (454).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from kumoauth.auth.bearer import BearerChecker
from kumoauth.auth.sasl import encode_oauthbearer, encode_xoauth2
from kumoauth.backends.oauth import TokenValidator, validate
from kumoauth.config import AuthConfig, ConfigError, parse
from kumoauth.policy import Policy, invoke
from tests.idp import AUDIENCE, SigningKey

ISSUER = "https://idp.example.org/realms/mail"
MECHANISMS = ("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER")
ERROR_JSON = (
    b'{"status":"invalid_token","openid-configuration":'
    b'"https://idp.example.org/realms/mail/.well-known/openid-configuration"}'
)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.make("ES256", "k1")


@pytest.fixture
def jwks_file(tmp_path: Path, key: SigningKey) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [key.jwk()]}))
    return path


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "sub-1",
        "jti": "jti-1",
        "email": "alice@example.org",
        "iat": now,
        "exp": now + 300,
    }
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def make_checker(jwks_file: Path, policy: Policy, **table: Any) -> BearerChecker:
    config = validate(
        {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks_file), **table}
    )
    validator = TokenValidator(config)
    return BearerChecker(
        validator,
        config.username_claim,
        policy.handler("smtp_server_auth_oauth"),
        invoke,
    )


@pytest.fixture
def oauth_session(make_session, jwks_file):
    def make(policy: Policy | None = None, **kw: Any):
        policy = policy or Policy()
        s = make_session(
            policy,
            auth=AuthConfig(mechanisms=MECHANISMS, failure_delay=0.0),
            bearer=make_checker(jwks_file, policy, **kw.pop("table", {})),
            **kw,
        )
        s.command("EHLO client.example")
        return s

    return make


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_ehlo_offers_the_oauth_mechanisms(oauth_session):
    s = oauth_session()
    assert "250 AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n" in s.command("EHLO client.example")


def test_xoauth2_success_sets_authn_from_the_claim(oauth_session, key):
    s = oauth_session()
    token = key.sign(claims())
    reply = s.command("AUTH XOAUTH2 " + b64(encode_xoauth2("alice@example.org", token)))
    assert reply.startswith("235 2.7.0")
    assert s.meta.get_meta("authn_id") == "alice@example.org"
    assert s.meta.get_meta("authz_id") == "alice@example.org"
    assert s.command("MAIL FROM:<alice@example.org>").startswith("250")


def test_oauthbearer_without_authzid_acts_as_the_tokens_user(oauth_session, key):
    s = oauth_session()
    token = key.sign(claims())
    assert s.command("AUTH OAUTHBEARER " + b64(encode_oauthbearer("", token))).startswith("235")
    assert s.meta.get_meta("authz_id") == "alice@example.org"


def test_the_success_line_names_the_tokens_user(oauth_session, key, captured_log):
    # OAUTHBEARER without a=: the user comes from the token, after the check
    s = oauth_session()
    token = key.sign(claims())
    assert s.command("AUTH OAUTHBEARER " + b64(encode_oauthbearer("", token))).startswith("235")
    assert "AUTH OAUTHBEARER success authc=alice@example.org authz=alice@example.org" in (
        captured_log.text()
    )


def test_cancel_after_the_error_challenge_is_501(oauth_session, key):
    # RFC 4954 §4: "*" cancels the exchange, 501, whenever it comes
    s = oauth_session()
    token = key.sign(claims(exp=int(time.time()) - 3600))
    reply = s.command("AUTH OAUTHBEARER " + b64(encode_oauthbearer("alice@example.org", token)))
    assert reply == "334 " + b64(ERROR_JSON) + "\r\n"
    assert s.command("*").startswith("501 5.7.0")
    assert s.meta.get_meta("authn_id") is None
    assert s.command("MAIL FROM:<a@example.org>").startswith("530")


def test_an_error_challenge_ended_by_a_bad_line_leaves_nothing_for_the_next_auth(
    oauth_session, key
):
    # The refused token's outcome waited for the client's answer; a bare-LF
    # answer ends the exchange, and the next exchange is checked afresh
    # (it got the old 535 without its credentials being looked at).
    s = oauth_session()
    token = key.sign(claims(exp=int(time.time()) - 3600))
    s.command("AUTH OAUTHBEARER " + b64(encode_oauthbearer("alice@example.org", token)))
    assert s.send(b"AQ==\n").startswith("501 5.5.2")
    assert s.send(b"\r\n") == ""  # the rest of that line
    assert s.command("AUTH OAUTHBEARER").startswith("334")
    good = key.sign(claims())
    assert s.command(b64(encode_oauthbearer("", good))).startswith("235")


def test_oauthbearer_as_a_challenge_response(oauth_session, key):
    s = oauth_session()
    assert s.command("AUTH OAUTHBEARER") == "334 \r\n"
    reply = s.command(b64(encode_oauthbearer("alice@example.org", key.sign(claims()))))
    assert reply.startswith("235")


@pytest.mark.parametrize(
    "mechanism,encode",
    [("XOAUTH2", encode_xoauth2), ("OAUTHBEARER", encode_oauthbearer)],
)
@pytest.mark.parametrize(
    "spoil",
    [
        {"exp": int(time.time()) - 3600},  # expired
        {"aud": "someone-else"},
        {"iss": "https://evil.example/"},
        {"email": "mallory@example.org"},  # a token for another user
    ],
    ids=["expired", "audience", "issuer", "other-user"],
)
def test_refused_token_gets_the_rfc7628_error_then_535(
    oauth_session, key, mechanism, encode, spoil
):
    s = oauth_session()
    token = key.sign(claims(**spoil))
    reply = s.command(f"AUTH {mechanism} " + b64(encode("alice@example.org", token)))
    assert reply == "334 " + b64(ERROR_JSON) + "\r\n"
    # the client's dummy response (%x01 for OAUTHBEARER, empty for XOAUTH2)
    final = s.command("AQ==" if mechanism == "OAUTHBEARER" else "")
    assert final.startswith("535 5.7.8")
    assert s.meta.get_meta("authn_id") is None
    assert s.command("MAIL FROM:<a@example.org>").startswith("530")


@pytest.mark.parametrize(
    "email", ["\uff43eo@example.org", "\ufb01nance@example.org"], ids=["fullwidth", "ligature"]
)
def test_a_claim_saslprep_would_change_is_refused(oauth_session, key, captured_log, email):
    # Prepared, "ｃeo@" was "ceo@": another of the IdP's users.
    s = oauth_session()
    token = key.sign(claims(email=email))
    reply = s.command("AUTH XOAUTH2 " + b64(encode_xoauth2(email, token)))
    assert reply == "334 " + b64(ERROR_JSON) + "\r\n"
    assert s.command("").startswith("535 5.7.8")
    assert s.meta.get_meta("authn_id") is None
    assert "email claim not in its prepared form" in captured_log.text()


def test_bad_signature_is_refused(oauth_session):
    s = oauth_session()
    forged = SigningKey.make("ES256", "k1").sign(claims())  # same kid, another key
    reply = s.command("AUTH XOAUTH2 " + b64(encode_xoauth2("alice@example.org", forged)))
    assert reply.startswith("334 ")
    assert s.command("").startswith("535")


def test_before_tls_is_538(make_session, jwks_file, key):
    policy = Policy()
    s = make_session(
        policy,
        tls="starttls",
        auth=AuthConfig(mechanisms=MECHANISMS),
        bearer=make_checker(jwks_file, policy),
    )
    s.command("EHLO client.example")
    token = key.sign(claims())
    reply = s.command("AUTH XOAUTH2 " + b64(encode_xoauth2("alice@example.org", token)))
    assert reply.startswith("538 5.7.11")


@pytest.mark.parametrize(
    "message",
    [b"user=alice\x01auth=Bearer t\x01", b"n,,\x01auth=Basic x\x01\x01", b"garbage"],
)
def test_malformed_is_501(oauth_session, message):
    s = oauth_session()
    mechanism = "XOAUTH2" if message.startswith(b"user=") else "OAUTHBEARER"
    assert s.command(f"AUTH {mechanism} " + b64(message)).startswith("501 5.5.2")


def test_policy_can_veto_allow_delegation_and_add_meta(oauth_session, key):
    seen: list[tuple[str, dict[str, Any]]] = []

    def decide(authz: str, token_claims: dict[str, Any], conn_meta: Any) -> bool | None:
        seen.append((authz, token_claims))
        conn_meta.set_meta("tenant", token_claims.get("tenant"))
        if authz == "shared@example.org":
            return True  # alice may send as the shared mailbox
        if token_claims.get("tenant") == "blocked":
            return False
        return None

    policy = Policy()
    policy.on("smtp_server_auth_oauth", decide)
    s = oauth_session(policy)
    token = key.sign(claims(tenant="acme"))
    assert s.command("AUTH XOAUTH2 " + b64(encode_xoauth2("shared@example.org", token))).startswith(
        "235"
    )
    assert s.meta.get_meta("authn_id") == "alice@example.org"
    assert s.meta.get_meta("authz_id") == "shared@example.org"
    assert s.meta.get_meta("tenant") == "acme"
    assert seen[0][0] == "shared@example.org" and seen[0][1]["sub"] == "sub-1"

    s2 = oauth_session(policy)
    blocked = key.sign(claims(tenant="blocked"))
    assert s2.command(
        "AUTH XOAUTH2 " + b64(encode_xoauth2("alice@example.org", blocked))
    ).startswith("334 ")
    assert s2.command("").startswith("535")


def test_token_never_logged_and_reason_is(oauth_session, key, captured_log):
    s = oauth_session()
    token = key.sign(claims(exp=int(time.time()) - 3600))
    s.command("AUTH XOAUTH2 " + b64(encode_xoauth2("alice@example.org", token)))
    s.command("")
    text = captured_log.text()
    assert token not in text and token.split(".")[2] not in text
    assert "OAuth token refused" in text and "AUTH XOAUTH2 failure" in text


@pytest.mark.parametrize(
    ("mechanism", "encode", "user", "counted"),
    [
        ("XOAUTH2", encode_xoauth2, "alice@example.org", "authc:alice@example.org"),
        # OAUTHBEARER without a=: no authc, so no per-user budget; each
        # refused token still counts for the client (each costs the IdP a check).
        ("OAUTHBEARER", encode_oauthbearer, "", "ip:127.0.0.1"),
    ],
)
def test_refusals_count_toward_the_throttle(oauth_session, key, mechanism, encode, user, counted):
    from kumoauth.auth.throttle import authc_key, client_key

    s = oauth_session()
    throttle = s.runtime.throttle
    for i in range(3):
        token = key.sign(claims(exp=int(time.time()) - 3600, jti=f"{mechanism}{i}"))
        s.command(f"AUTH {mechanism} " + b64(encode(user, token)))
        s.command("")
    kind, _, name = counted.partition(":")
    store_key = authc_key(name) if kind == "authc" else client_key(name)
    box: list[Any] = []
    throttle.store.count(store_key, 900).addCallback(box.append)
    assert box[0][0] == 3


def test_config_requires_the_oauth_table_for_its_mechanisms(tmp_path, jwks_file):
    base = (
        '[server]\nhostname = "h"\n[[listener]]\nendpoint = "tcp:1"\ntls = "none"\n'
        'auth_required = false\n[spool]\npath = "s"\n'
    )
    with pytest.raises(ConfigError, match="XOAUTH2 needs an \\[auth.oauth\\] table"):
        parse(base + '[auth]\nmechanisms = ["PLAIN", "XOAUTH2"]\n')
    cfg = parse(
        base
        + '[auth]\nmechanisms = ["PLAIN", "XOAUTH2", "OAUTHBEARER"]\n'
        + f'[auth.oauth]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'
        + f'jwks_file = "{jwks_file}"\n'
    )
    assert cfg.auth.oauth.issuer == ISSUER
    with pytest.raises(ConfigError, match=r"\[auth.oauth\]"):
        parse(base + "[auth.oauth]\naudience = 'x'\n")


def test_refusals_wait_the_failure_delay_and_are_counted_like_plain(make_session, jwks_file, key):
    policy = Policy()
    s = make_session(
        policy,
        auth=AuthConfig(mechanisms=MECHANISMS, failure_delay=1.0),
        bearer=make_checker(jwks_file, policy),
    )
    s.command("EHLO client.example")
    token = key.sign(claims(exp=int(time.time()) - 3600))
    assert s.command("AUTH XOAUTH2 " + b64(encode_xoauth2("alice@example.org", token))) == ""
    s.clock.advance(0.9)
    assert s.output() == ""  # still within failure_delay
    s.clock.advance(0.2)
    assert s.output().startswith("334 ")
    assert s.command("").startswith("535")
    value = s.runtime.metrics.registry.get_sample_value(
        "kumoauth_auth_attempts_total", {"mechanism": "XOAUTH2", "result": "failure"}
    )
    assert value == 1


def test_a_locked_users_good_token_gets_the_error_challenge_of_a_bad_one(
    oauth_session, key, tmp_path, captured_log
):
    # A locked XOAUTH2 user got 535 at once, where a bad token gets the
    # RFC 7628 error challenge first: the token was seen to be good.
    from kumoauth.auth import locked

    s = oauth_session()
    path = tmp_path / "locked"
    path.write_text("alice@example.org\n")
    s.runtime.process.locked_users.use(path, locked.read(path))
    token = key.sign(claims())
    reply = s.command("AUTH XOAUTH2 " + b64(encode_xoauth2("alice@example.org", token)))
    assert reply == "334 " + b64(ERROR_JSON) + "\r\n"
    assert s.command("").startswith("535 5.7.8")
    assert s.meta.get_meta("authn_id") is None
    assert "reason=locked" in captured_log.text()
