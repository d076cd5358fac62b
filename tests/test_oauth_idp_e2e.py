"""
OAuth bearer tokens against the real ``twistd kumoauth`` and a real IdP
(tests/idp.py: a JWKS served over HTTP on 127.0.0.1), with smtplib as the
client: what a hostile client or a misbehaving IdP can make kumoauth do.

- made-up ``kid``\\ s do not turn into one JWKS fetch per attempt;
- a JWKS with a key PyJWT cannot parse (an ``alg`` that is a list) is
  skipped, not a traceback per attempt;
- no token, and no base64 AUTH blob, reaches the log.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kumoauth.auth.sasl import encode_oauthbearer, encode_xoauth2
from tests.idp import AUDIENCE, IdP, SigningKey
from tests.server import running_server
from tests.test_e2e import POLICY, starttls_client
from tests.upstream import start_reactor

MECHANISMS = 'mechanisms = ["PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"]'


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.make("ES256", "es-1")


@pytest.fixture
def idp(key: SigningKey) -> Iterator[IdP]:
    server = IdP(start_reactor(), published=[key])
    server.start()
    yield server
    server.stop()


def oauth_table(idp: IdP, **extra: Any) -> str:
    lines = [
        "[auth.oauth]",
        f'issuer = "{idp.issuer}"',
        f'audience = "{AUDIENCE}"',
        f'jwks_url = "{idp.url("/jwks")}"',
        *(f"{k} = {json.dumps(v)}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def auth(s: Any, mechanism: str, message: bytes) -> tuple[int, bytes]:
    code, text = s.docmd("AUTH", f"{mechanism} " + base64.b64encode(message).decode())
    if code == 334:  # the RFC 7628 error challenge: the dummy response ends it
        code, text = s.docmd("AQ==")
    return code, text


def test_made_up_kids_do_not_fetch_the_jwks_per_attempt(tmp_path, certs, key, idp):
    # An attacker's tokens, each naming a kid of its own (and signed by a
    # key of its own): each is refused, the IdP is asked once at start and
    # at most once more (jwks_min_refresh), and nothing of them is logged.
    extra = oauth_table(idp, jwks_min_refresh=3600)
    sent: list[str] = []
    with running_server(tmp_path, certs, POLICY, auth=MECHANISMS, extra=extra) as srv:
        with starttls_client(srv) as s:
            for n in range(12):
                forger = SigningKey.make("ES256", f"made-up-{n}-{time.monotonic_ns()}")
                token = forger.sign(idp.claims())
                message = encode_xoauth2("alice@example.org", token)
                sent += [token, base64.b64encode(message).decode()]
                code, _ = auth(s, "XOAUTH2", message)
                assert code == 535
                if n % 2 == 1:  # max_failures per connection
                    s.close()
                    s.connect("127.0.0.1", srv.starttls_port)
                    s.ehlo("client.example")
                    s.starttls(context=srv.certs.client_context())
                    s.ehlo("client.example")
            good = key.sign(idp.claims())
            assert auth(s, "OAUTHBEARER", encode_oauthbearer("", good))[0] == 235
        log = srv.log()
    assert idp.jwks_requests <= 2, idp.jwks_requests
    assert "Traceback" not in log and "unknown kid" in log
    for secret in sent:
        for part in secret.split("."):
            assert part[:40] not in log


def test_a_jwks_key_pyjwt_cannot_parse_is_skipped_not_a_traceback(tmp_path, certs, key, idp):
    # The IdP's JWKS holds, beside the signing key, a key whose "alg" is a
    # list.  kumoauth used to fail the whole JWKS with a TypeError: every
    # token 454 and a traceback at start and at every refetch.
    junk = {**SigningKey.make("ES256", "junk").jwk(), "alg": ["ES256"]}
    idp.published = []
    idp.jwks_body = json.dumps({"keys": [junk, key.jwk()]}).encode()
    extra = oauth_table(idp, jwks_min_refresh=1)
    with running_server(tmp_path, certs, POLICY, auth=MECHANISMS, extra=extra) as srv:
        with starttls_client(srv) as s:
            for _ in range(2):
                time.sleep(1.1)  # past jwks_min_refresh: an unknown kid may refetch
                stranger = SigningKey.make("ES256", "junk").sign(idp.claims())
                assert auth(s, "OAUTHBEARER", encode_oauthbearer("", stranger))[0] in (535, 454)
            token = key.sign(idp.claims())
            assert auth(s, "XOAUTH2", encode_xoauth2("alice@example.org", token))[0] == 235
        log = srv.log()
    assert "Traceback" not in log and "TypeError" not in log, log[-3000:]
    assert "checker failed" not in log


def test_a_jwks_of_only_unusable_keys_is_454_and_one_line(tmp_path, certs, key, idp):
    idp.published = []
    idp.jwks_body = json.dumps(
        {"keys": [{**key.jwk(), "alg": ["ES256"]}, {**key.jwk(), "alg": {"x": 1}, "kid": "b"}]}
    ).encode()
    extra = oauth_table(idp, jwks_min_refresh=1)
    with running_server(tmp_path, certs, POLICY, auth=MECHANISMS, extra=extra) as srv:
        with starttls_client(srv) as s:
            for _ in range(3):
                time.sleep(1.1)
                token = key.sign(idp.claims())
                assert auth(s, "XOAUTH2", encode_xoauth2("alice@example.org", token))[0] == 454
            # password users are not affected
            s.user, s.password = "scott", "tiger"
            assert s.auth("PLAIN", s.auth_plain, initial_response_ok=True)[0] == 235
        log = srv.log()
    assert "Traceback" not in log and "TypeError" not in log, log[-3000:]
    assert log.count("oauth-jwks unavailable") == 1, log[-3000:]
    assert "no usable signing key" in log


def test_a_reload_during_an_idp_outage_keeps_the_keys(tmp_path, certs, key, idp):
    # docs/configuration.md: "the key cache is kept unless the key source
    # changed".  A SIGHUP that changes [auth.oauth] while the IdP is down
    # used to drop the JWKS: every token 454 until the IdP came back.
    from tests.test_reload import hup_and_wait

    with running_server(tmp_path, certs, POLICY, auth=MECHANISMS, extra=oauth_table(idp)) as srv:
        token = key.sign(idp.claims())
        with starttls_client(srv) as s:
            assert auth(s, "OAUTHBEARER", encode_oauthbearer("", token))[0] == 235
        idp.stop()
        srv.config.write_text(srv.config.read_text() + 'scope = "smtp"\nleeway = 30\n')
        hup_and_wait(srv, "reloaded configuration")
        with starttls_client(srv) as s:
            assert auth(s, "XOAUTH2", encode_xoauth2("alice@example.org", token))[0] == 235
        idp.start()  # the same port again, for the fixture's stop()
        log = srv.log()
    assert "Traceback" not in log and "oauth-jwks unavailable" not in log, log[-3000:]


ERROR_CHALLENGE = 334


def _session(srv: Any) -> Any:
    return starttls_client(srv)


def test_the_sasl_exchange_as_a_hostile_client(tmp_path, certs, key, idp):
    import re

    token = key.sign(idp.claims())
    b64 = base64.b64encode
    sent: list[bytes] = []

    def send(s: Any, mechanism: str, message: bytes) -> tuple[int, bytes]:
        sent.append(message)
        return s.docmd("AUTH", f"{mechanism} " + b64(message).decode())

    malformed = [
        ("XOAUTH2", b"user=alice@example.org\x01Bearer " + token.encode() + b"\x01\x01"),
        ("XOAUTH2", b"user=alice@example.org\x01auth=Bearer " + token.encode()),
        ("OAUTHBEARER", b"n,,auth=Bearer " + token.encode() + b"\x01\x01"),
        ("OAUTHBEARER", b"n,,\x01auth=Bearer \x01\x01"),
        ("OAUTHBEARER", b"n,,\x01auth=Bearer " + token.encode() + b"\x00x\x01\x01"),
        ("OAUTHBEARER", b"n,,\x01auth=Bearer " + token.encode() + b"\r\nX-Evil: 1\x01\x01"),
        (
            "XOAUTH2",
            b"user=alice@example.org\r\nforged\x01auth=Bearer " + token.encode() + b"\x01\x01",
        ),
        ("XOAUTH2", "user=alice\u2028forged\x01auth=Bearer t\x01\x01".encode()),
        ("OAUTHBEARER", b"n,a=alice\x00root,\x01auth=Bearer " + token.encode() + b"\x01\x01"),
        ("OAUTHBEARER", b"n,a=alice\r\nforged,\x01auth=Bearer " + token.encode() + b"\x01\x01"),
        ("OAUTHBEARER", b"\x01"),
    ]
    with running_server(tmp_path, certs, POLICY, auth=MECHANISMS, extra=oauth_table(idp)) as srv:
        for mechanism, message in malformed:
            with _session(srv) as s:  # a session each: max_errors
                code, text = send(s, mechanism, message)
                assert code == 501, (message, code, text)
        # The token is for alice; the client asks to be bob: the error
        # challenge, then 535 whatever the client answers.
        for answer in ("AQ==", "QUJD", "="):
            with _session(srv) as s:
                code, text = send(s, "OAUTHBEARER", encode_oauthbearer("bob@example.org", token))
                assert code == ERROR_CHALLENGE
                assert json.loads(base64.b64decode(text))["status"] == "invalid_token"
                assert s.docmd(answer)[0] == 535
        with _session(srv) as s:
            code, _ = send(s, "XOAUTH2", encode_xoauth2("bob@example.org", token))
            assert code == ERROR_CHALLENGE
            # "*" after the error challenge cancels (RFC 4954 §4: 501)
            assert s.docmd("*")[0] == 501
            assert s.docmd("MAIL", "FROM:<alice@example.org>")[0] == 530
        # "*" at the first challenge cancels
        with _session(srv) as s:
            assert s.docmd("AUTH", "OAUTHBEARER") == (334, b"")
            assert s.docmd("*")[0] == 501
            # an opaque, long token (no introspection): refused, not logged
            opaque = "A" * 9000
            code, _ = send(s, "OAUTHBEARER", encode_oauthbearer("", opaque))
            assert code == ERROR_CHALLENGE and s.docmd("AQ==")[0] == 535
        # the scheme name is case-insensitive (RFC 7235 §2.1)
        with _session(srv) as s:
            message = b"n,,\x01auth=bEaReR " + token.encode() + b"\x01\x01"
            assert send(s, "OAUTHBEARER", message)[0] == 235
        log = srv.log()
    assert "Traceback" not in log
    # one event, one line: every line of the log is an event of its own
    for line in log.splitlines():
        assert re.match(r"\d{4}-\d\d-\d\dT", line), line
    for secret in [token, "A" * 100] + [b64(m).decode() for m in sent]:
        for part in secret.split("."):
            assert part[:40] not in log
    # (The start-up line names the configuration file: pytest-of-root/…)
    said = log.replace(str(srv.config), "")
    assert "forged" not in said and "root" not in said and "X-Evil" not in said


def test_a_token_without_a_required_scope_is_refused_with_insufficient_scope(
    tmp_path, certs, key, idp
):
    extra = oauth_table(idp, required_scopes=["smtp", "mail.send"])
    with running_server(tmp_path, certs, POLICY, auth=MECHANISMS, extra=extra) as srv:
        with starttls_client(srv) as s:
            narrow = key.sign(idp.claims(scope="openid smtp"))
            code, text = s.docmd(
                "AUTH",
                "OAUTHBEARER " + base64.b64encode(encode_oauthbearer("", narrow)).decode(),
            )
            assert code == 334  # the RFC 7628 error challenge, then 535
            assert json.loads(base64.b64decode(text)) == {
                "status": "insufficient_scope",
                "scope": "smtp mail.send",
                "openid-configuration": f"{idp.issuer}/.well-known/openid-configuration",
            }
            assert s.docmd("AQ==")[0] == 535
            wide = key.sign(idp.claims(scp=["mail.send"]))  # with "scope": "openid email smtp"
            assert auth(s, "XOAUTH2", encode_xoauth2("alice@example.org", wide))[0] == 235
        log = srv.log()
    assert "missing scope mail.send" in log and "Traceback" not in log
