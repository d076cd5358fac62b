"""
No password and no base64 AUTH blob ever reaches a log, an exception
message, the spool, or a repr (SPEC §7, §9).
"""

from __future__ import annotations

import base64
import smtplib

import pytest
from twisted.internet import defer, task

from kumoauth.auth.authenticator import secret_forms
from kumoauth.auth.cred import PlainCredentials
from kumoauth.config import AuthConfig
from kumoauth.meta import ConnMeta
from kumoauth.policy import Policy
from kumoauth.testing import login_b64, plain_b64
from tests.server import make_certs, running_server
from tests.test_e2e import POLICY, login, send, starttls_client

SECRET = "Sekr1t-Pa55-phrase"


def forms(user: str, password: str) -> list[str]:
    """The password and every base64 form a client may have sent it in."""
    out = [password, base64.b64encode(password.encode()).decode()]
    for authz in ("", user, "other"):
        out.append(plain_b64(authz, user, password))
    return out


def assert_clean(text: str, user: str = "scott", password: str = SECRET) -> None:
    for form in forms(user, password):
        assert form not in text, "a secret form reached the output"


def test_in_memory_attempts_leave_no_secret_in_logs(make_session, captured_log):
    clock = task.Clock()

    def check(authz, authc, password, conn_meta):
        if authc == "raise":
            raise ValueError(f"bad password {password!r} for {authc}")
        if authc == "fail-deferred":
            return defer.fail(RuntimeError("cannot check " + password))
        if authc == "hang":
            return defer.Deferred()
        return password == "right"

    policy = Policy()
    policy.on("smtp_server_auth_plain", check)
    s = make_session(
        policy, clock=clock, auth=AuthConfig(failure_delay=0, max_failures=100, timeout=1)
    )
    s.command("EHLO client.example")
    for user in ("scott", "raise", "fail-deferred"):
        s.command("AUTH PLAIN " + plain_b64("", user, SECRET))
    s.command("AUTH PLAIN " + plain_b64("", "hang", SECRET))
    clock.advance(1)
    s.command("AUTH LOGIN " + login_b64("scott"))
    s.command(login_b64(SECRET))
    s.command("AUTH PLAIN")
    s.command(base64.b64encode(b"\0scott\0" + SECRET.encode() + b"\xff").decode())  # malformed
    s.command("AUTH LOGIN " + login_b64("scott"))
    s.command("*")  # cancelled
    s.command("AUTH PLAIN " + plain_b64("", "scott", SECRET)[:-1])  # bad base64
    text = captured_log.text()
    assert "Traceback" in text  # the raising checker was logged...
    for user in ("scott", "raise", "fail-deferred", "hang"):
        assert_clean(text, user)  # ...without the password


@pytest.mark.parametrize(
    "password",
    ["se\\cret", "tab\there", "it's\"x", "bell\x07ring", "p\u00e4ss\u2028w", "7"],
    ids=["backslash", "tab", "both-quotes", "control", "non-ascii", "one-char"],
)
def test_a_checker_quoting_the_password_leaks_no_form_of_it(password, make_session, captured_log):
    # A checker's exceptions quote what they were given: int() and
    # f"{x!r}" with repr(), which rewrites backslashes, quotes and controls.
    def check(authz, authc, password, conn_meta):
        if authc == "int":
            return int(password) == 1234
        if authc == "repr":
            raise ValueError(f"bad {password!r} / {password.encode()!r} / {ascii(password)}")
        raise KeyError(password)

    policy = Policy()
    policy.on("smtp_server_auth_plain", check)
    s = make_session(policy, auth=AuthConfig(failure_delay=0, max_failures=100))
    s.command("EHLO client.example")
    for user in ("int", "repr", "key"):
        s.command("AUTH PLAIN " + plain_b64("", user, password))
    text = captured_log.text()
    for user in ("repr", "key") if password == "7" else ("int", "repr", "key"):
        assert f"checker failed for authc={user} " in text
    secret = password.encode()
    for form in secret_forms(secret):
        assert form not in text
    if len(password) > 1:
        assert password not in text and repr(password)[1:-1] not in text


def test_credentials_repr_hides_password():
    creds = PlainCredentials("", "scott", SECRET, ConnMeta())
    assert SECRET not in repr(creds)
    assert creds.checkPassword(SECRET.encode()) and not creds.checkPassword(b"x")


@pytest.mark.e2e
def test_real_server_logs_and_spool_hold_no_secret(tmp_path):
    certs = make_certs(tmp_path / "certs")
    with running_server(tmp_path / "srv", certs, POLICY) as srv:
        with starttls_client(srv) as s:
            for user in ("scott", "raise", "hang"):
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    login(s, "PLAIN", user, SECRET)
        with starttls_client(srv) as s:
            code, _ = s.docmd("AUTH", "PLAIN " + plain_b64("", "scott", SECRET)[:-2])
            assert code == 501
            assert s.docmd("AUTH", "LOGIN " + login_b64("scott"))[0] == 334
            assert s.docmd("*")[0] == 501
            assert s.docmd("AUTH", "LOGIN " + login_b64("alice"))[0] == 334
            assert s.docmd(login_b64(SECRET))[0] == 535
        with starttls_client(srv) as s:
            # A real password for a real user, then a message.
            assert login(s, "PLAIN", "alice", "wonder land")[0] == 235
            send(s)
        srv.stop()
        text = srv.log() + (srv.directory / "stderr.txt").read_text()
        assert "AUTH PLAIN tempfail authc=raise" in text
        assert "AUTH PLAIN tempfail authc=hang" in text
        assert "AUTH PLAIN malformed" in text
        assert "AUTH LOGIN cancelled" in text
        for user in ("scott", "raise", "hang", "alice"):
            assert_clean(text, user)
        assert_clean(text, "alice", "wonder land")
        for path in srv.spool.rglob("*"):
            if path.is_file():
                data = path.read_text(errors="replace")
                assert_clean(data, "alice", "wonder land")
                assert_clean(data)
