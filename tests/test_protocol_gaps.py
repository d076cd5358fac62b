"""
Protocol gaps users hit: SMTPUTF8 (RFC 6531), prepared user names
(RFC 4013), <postmaster> (RFC 5321 §4.5.1), refused AUTH made visible; and
the core defects a review found: identity across STARTTLS, deadlines on
every handler and checker, handlers looked up at call time.
"""

from __future__ import annotations

import dataclasses
import unicodedata

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer

from kumoauth.auth.cred import IPlainCredentials
from kumoauth.config import AuthConfig
from kumoauth.policy import Policy
from kumoauth.smtp.protocol import SubmissionProtocol
from kumoauth.testing import Session, login_b64, plain_b64
from tests.test_protocol import HOST, authed, scott_policy

# --- SMTPUTF8 -----------------------------------------------------------------


def test_smtputf8_is_advertised(make_session):
    assert "250-SMTPUTF8\r\n" in make_session().command("EHLO client.example")


def test_utf8_addresses_need_the_smtputf8_parameter(make_session):
    s = authed(make_session)
    assert s.command("MAIL FROM:<jürgen@bücher.example>") == (
        "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter\r\n"
    )
    assert s.command("MAIL FROM:<scott@example.com>").startswith("250")
    assert s.command("RCPT TO:<用户@例子.广告>").startswith("553 5.6.7")


def test_smtputf8_message_is_accepted_and_recorded(make_session):
    s = authed(make_session)
    assert s.command("MAIL FROM:<jürgen@bücher.example> SMTPUTF8").startswith("250")
    assert s.command("RCPT TO:<用户@例子.广告>").startswith("250")
    assert s.command("RCPT TO:<plain@example.net>").startswith("250")
    s.command("DATA")
    body = "Subject: Grüße\r\n\r\nhallo\r\n.\r\n".encode()
    assert s.send(body).startswith("250 ")
    (msg,) = s.messages()
    assert msg.envelope["mail_from"] == "jürgen@bücher.example"
    assert msg.envelope["rcpt_to"] == ["用户@例子.广告", "plain@example.net"]
    assert msg.meta["smtputf8"] is True
    assert b" with UTF8SMTPSA id " in msg.read_bytes().split(b"\r\n")[1]


def test_ascii_transaction_has_no_smtputf8_meta(make_session):
    s = authed(make_session)
    s.command("MAIL FROM:<scott@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    s.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
    (msg,) = s.messages()
    assert "smtputf8" not in msg.meta


@pytest.mark.parametrize(
    "address", ["a\u2028b@example.com", "a@exa mple.com", "a@\u00e9xample..com", "\x85@x.org"]
)
def test_bad_utf8_addresses_get_501(make_session, address):
    s = authed(make_session)
    reply = s.send(f"MAIL FROM:<{address}> SMTPUTF8\r\n".encode())
    assert reply.startswith("501 5.1.7")


def test_invalid_utf8_bytes_get_501(make_session):
    s = authed(make_session)
    assert s.send(b"MAIL FROM:<j\xfcrgen@example.com> SMTPUTF8\r\n").startswith("501 5.1.7")


# --- postmaster -----------------------------------------------------------------


@pytest.mark.parametrize("rcpt", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_rcpt_to_postmaster_without_domain(make_session, rcpt):
    s = authed(make_session)
    s.command("MAIL FROM:<scott@example.com>")
    assert s.command(f"RCPT TO:{rcpt}").startswith("250 ")


def test_mail_from_postmaster_without_domain_is_still_refused(make_session):
    s = authed(make_session)
    assert s.command("MAIL FROM:<postmaster>").startswith("501")


# --- user names -------------------------------------------------------------------


def juergen_policy() -> Policy:
    policy = Policy()
    stored = unicodedata.normalize("NFC", "jürgen")
    policy.on(
        "smtp_server_auth_plain",
        lambda authz, authc, pw, meta: authc == stored and pw == "geheim",
    )
    return policy


@pytest.mark.parametrize("form", ["NFC", "NFD"])
def test_decomposed_user_name_matches(make_session, form):
    s = make_session(juergen_policy())
    s.command("EHLO client.example")
    name = unicodedata.normalize(form, "jürgen")
    assert s.command("AUTH PLAIN " + plain_b64("", name, "geheim")).startswith("235")
    assert s.meta.get_meta("authn_id") == unicodedata.normalize("NFC", "jürgen")


def test_login_user_name_is_prepared_too(make_session):
    s = make_session(juergen_policy())
    s.command("EHLO client.example")
    s.command("AUTH LOGIN")
    s.command(login_b64(unicodedata.normalize("NFD", "jürgen")))
    assert s.command(login_b64("geheim")).startswith("235")


@pytest.mark.parametrize("name", ["a\nb", "a\u2028b", "\x1b[2Jroot", "a\x7fb"])
def test_prohibited_user_names_get_501_before_any_checker(make_session, name):
    calls = []
    policy = Policy()
    policy.on("smtp_server_auth_plain", lambda *a: calls.append(a) or False)
    s = make_session(policy)
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", name, "pw")).startswith("501 5.5.2")
    assert calls == []


# --- refused AUTH is visible ----------------------------------------------------


def test_cleartext_auth_is_logged_and_counted(make_session, captured_log):
    s = make_session(scott_policy(), tls="starttls")
    s.command("EHLO client.example")
    blob = plain_b64("", "scott", "tiger")
    assert s.command("AUTH PLAIN " + blob).startswith("538 5.7.11")
    (event,) = captured_log.namespace("kumoauth.auth")
    assert event["result"] == "cleartext"
    assert event["text"].startswith("AUTH PLAIN cleartext client=127.0.0.1:50000")
    assert blob not in captured_log.text() and "tiger" not in captured_log.text()
    metric = s.runtime.metrics.auth_attempts.labels("PLAIN", "cleartext")
    assert metric._value.get() == 1


def test_unknown_mechanism_is_logged_and_counted(make_session, captured_log):
    s = make_session(scott_policy())
    s.command("EHLO client.example")
    assert s.command("AUTH X\x1bY").startswith("504")
    assert s.command("AUTH CRAM-MD5").startswith("504")
    # The second is a repeat from the same client: counted, not logged.
    (event,) = captured_log.namespace("kumoauth.auth")
    assert event["result"] == "unsupported"
    assert event["text"].startswith("AUTH X\\x1bY unsupported")
    # The metrics label never takes a value the client chose.
    assert s.runtime.metrics.auth_attempts.labels("other", "unsupported")._value.get() == 2


# --- identity does not survive STARTTLS (RFC 3207 §4.2) --------------------------


def test_starttls_logs_the_session_out(make_session):
    s = make_session(scott_policy(), tls="starttls", allow_plaintext_auth=True)
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger")).startswith("235")
    assert s.meta.get_meta("authn_id") == "scott"
    assert s.command("STARTTLS").startswith("220")
    assert s.meta.get_meta("authn_id") is None and s.meta.get_meta("authz_id") is None
    s.command("EHLO client.example")
    assert s.command("MAIL FROM:<scott@example.com>").startswith("530 5.7.0")
    # A second AUTH is allowed (it is a new session), not 503.
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger")).startswith("235")


def test_starttls_forgets_meta_the_client_caused(make_session):
    policy = scott_policy()
    policy.on("smtp_server_connection_accepted", lambda meta: meta.set_meta("geo", "here"))
    policy.on("smtp_server_ehlo", lambda domain, meta: meta.set_meta("said_hello", True))
    s = make_session(policy, tls="starttls")
    s.command("EHLO client.example")
    assert s.meta.get_meta("said_hello") is True
    s.command("STARTTLS")
    assert s.meta.get_meta("said_hello") is None
    assert s.meta.get_meta("geo") == "here"  # the server's own knowledge stays


# --- deadlines ------------------------------------------------------------------


@pytest.mark.parametrize(
    "event,command,reply",
    [
        ("smtp_server_ehlo", "EHLO client.example", "451 4.3.0"),
        ("smtp_server_mail_from", "MAIL FROM:<scott@example.com>", "451 4.3.0"),
    ],
)
def test_policy_handler_that_never_answers(tmp_path, event, command, reply):
    policy = scott_policy()
    policy.on(event, lambda *a: defer.Deferred())
    s = Session(policy, spool_dir=tmp_path, connect=False)
    s.factory.runtime = dataclasses.replace(s.runtime, policy_timeout=5.0)
    s.connect()
    if event != "smtp_server_ehlo":
        s.command("EHLO client.example")
        s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger"))
    assert s.command(command) == ""
    s.clock.advance(5)
    assert s.output().startswith(reply)
    assert not s.closed
    assert s.command("NOOP").startswith("250")


def test_connection_handler_that_never_answers_gets_421(tmp_path):
    policy = Policy()
    policy.on("smtp_server_connection_accepted", lambda meta: defer.Deferred())
    s = Session(policy, spool_dir=tmp_path, connect=False)
    s.factory.runtime = dataclasses.replace(s.runtime, policy_timeout=5.0)
    assert s.connect() == ""
    s.clock.advance(5)
    assert s.output().startswith("421 4.3.0")
    assert s.closed


@implementer(ICredentialsChecker)
class NeverChecker:
    credentialInterfaces = (IPlainCredentials,)

    def __init__(self) -> None:
        self.cancelled = 0

    def requestAvatarId(self, credentials):
        return defer.Deferred(lambda d: setattr(self, "cancelled", self.cancelled + 1))


def test_any_checker_gets_the_auth_timeout(tmp_path):
    checker = NeverChecker()
    s = Session(
        spool_dir=tmp_path,
        checkers=[checker],
        auth=AuthConfig(failure_delay=0, timeout=3.0),
    )
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger")) == ""
    s.clock.advance(3)
    assert s.output() == "454 4.7.0 Temporary authentication failure\r\n"
    assert checker.cancelled == 1
    assert s.runtime.in_flight.count == 0
    assert s.command("NOOP").startswith("250")


# --- handlers are looked up at call time ---------------------------------------------


def test_subclass_can_override_a_command(tmp_path):
    class Custom(SubmissionProtocol):
        def smtp_NOOP(self, arg: bytes) -> None:
            self._send(b"250 2.0.0 custom")

    s = Session(spool_dir=tmp_path, connect=False)
    s.factory.protocol = Custom  # type: ignore[assignment]
    s.protocol = s.factory.buildProtocol(s.transport.getPeer())  # type: ignore[assignment]
    s.connect()
    assert s.command("NOOP") == "250 2.0.0 custom\r\n"
    assert s.command("HELP").startswith("214")
    assert HOST in s.banner
