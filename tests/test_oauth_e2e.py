"""
OAuth end to end: the real ``twistd kumoauth`` with ``[auth.oauth]``, real
clients: **nodemailer** (``auth: {type: "OAuth2", user, accessToken}``,
XOAUTH2) and smtplib speaking OAUTHBEARER; the spooled meta carries the
token's user as authn_id.  An IdP that cannot be reached gives 454.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kumoauth.auth.sasl import encode_oauthbearer
from kumoauth.storage.spool import Spool
from tests.idp import AUDIENCE, SigningKey
from tests.server import free_port, running_server
from tests.test_e2e import POLICY, starttls_client

ISSUER = "https://idp.example.org/realms/mail"
NODE_DIR = Path(__file__).resolve().parent / "node"
MECHANISMS = 'mechanisms = ["PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"]'


def require_nodemailer() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "nodemailer").is_dir():
        message = "node and tests/node/node_modules/nodemailer (npm install --prefix tests/node)"
        if os.environ.get("CI"):
            pytest.fail("CI must have " + message)
        pytest.skip("needs " + message)
    return node


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.make("RS256", "rsa-1")


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "sub-42",
        "jti": "jti-42",
        "email": "carol@example.org",
        "iat": now,
        "exp": now + 300,
    }
    out.update(overrides)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, certs, key):
    directory = tmp_path_factory.mktemp("oauth-server")
    (directory / "jwks.json").write_text(json.dumps({"keys": [key.jwk()]}))
    oauth = (
        f'[auth.oauth]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'
        f'jwks_file = "{directory / "jwks.json"}"\n'
    )
    with running_server(directory, certs, POLICY, auth=MECHANISMS, extra=oauth) as srv:
        yield srv


def spooled_meta(srv) -> list[dict[str, Any]]:
    return [message.meta for message in Spool(srv.spool)]


def ca_file(srv) -> Path:
    path = srv.directory / "client-ca.pem"
    if not path.exists():
        srv.certs.ca.cert_pem.write_to_path(str(path))
    return path


def nodemailer(node: str, srv, token: str) -> dict[str, Any]:
    result = subprocess.run(
        [node, "send_oauth.js", str(srv.starttls_port), str(ca_file(srv)), "carol@example.org"],
        input=token,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_DIR,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_nodemailer_sends_with_an_access_token(server, key):
    node = require_nodemailer()
    token = key.sign(claims())
    before = len(spooled_meta(server))
    outcome = nodemailer(node, server, token)
    assert outcome["ok"], outcome
    assert outcome["response"].startswith("250")
    metas = spooled_meta(server)
    assert len(metas) == before + 1
    meta = next(m for m in metas if m.get("authn_id") == "carol@example.org")
    assert meta["authz_id"] == "carol@example.org"
    assert token not in server.log()


def test_nodemailer_with_an_expired_token_is_refused(server, key):
    node = require_nodemailer()
    outcome = nodemailer(node, server, key.sign(claims(exp=int(time.time()) - 600)))
    assert not outcome["ok"] and outcome["code"] == 535, outcome


def test_smtplib_oauthbearer_and_the_error_challenge(server, key):
    with starttls_client(server) as s:
        bad = key.sign(claims(aud="another-service"))
        code, text = s.docmd(
            "AUTH",
            "OAUTHBEARER "
            + base64.b64encode(encode_oauthbearer("carol@example.org", bad)).decode(),
        )
        assert code == 334
        error = json.loads(base64.b64decode(text))
        assert error["status"] == "invalid_token"
        assert error["openid-configuration"].startswith(ISSUER)
        code, _ = s.docmd("AQ==")
        assert code == 535
        good = key.sign(claims())
        code, _ = s.docmd(
            "AUTH", "OAUTHBEARER " + base64.b64encode(encode_oauthbearer("", good)).decode()
        )
        assert code == 235
        s.mail("carol@example.org")
        s.rcpt("r@example.net")
        code, _ = s.data(b"Subject: t\r\n\r\nhi\r\n")
        assert code == 250
    assert "OAuth token refused" in server.log() and "wrong audience" in server.log()


def test_idp_unreachable_is_454(tmp_path, certs, key):
    oauth = (
        f'[auth.oauth]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'
        f'jwks_url = "http://127.0.0.1:{free_port()}/jwks"\ntimeout = 1.0\n'
    )
    with running_server(tmp_path, certs, POLICY, auth=MECHANISMS, extra=oauth) as srv:
        with starttls_client(srv) as s:
            token = key.sign(claims())
            code, _ = s.docmd(
                "AUTH", "OAUTHBEARER " + base64.b64encode(encode_oauthbearer("", token)).decode()
            )
            assert code == 454
            # password users are not affected
            s.user, s.password = "scott", "tiger"
            assert s.auth("PLAIN", s.auth_plain, initial_response_ok=True)[0] == 235
        assert srv.log().count("unavailable") >= 1 and "Traceback" not in srv.log()
