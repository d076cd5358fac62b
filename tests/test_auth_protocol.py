"""
Every AUTH row of SPEC §6, through StringTransport and a fake clock.
"""

from __future__ import annotations

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, task
from twisted.logger import formatEvent

from kumoauth.auth import sasl
from kumoauth.config import AuthConfig
from kumoauth.policy import Policy
from kumoauth.testing import login_b64, plain_b64

PW = "tiger"


class Recorder:
    """A checker that records its calls and answers as told."""

    def __init__(self, answer=None):
        self.calls = []
        self.answer = answer or (lambda authz, authc, pw, meta: authc == "scott" and pw == PW)

    def __call__(self, authz, authc, password, conn_meta):
        self.calls.append((authz, authc, password))
        return self.answer(authz, authc, password, conn_meta)

    def policy(self) -> Policy:
        p = Policy()
        p.on("smtp_server_auth_plain", self)
        return p


@pytest.fixture
def checker():
    return Recorder()


@pytest.fixture
def session(make_session, checker):
    def make(**kw):
        s = make_session(checker.policy(), **kw)
        s.command("EHLO client.example")
        return s

    return make


def b64(data: bytes) -> str:
    return sasl.encode_response(data).decode()


# --- availability and sequence -------------------------------------------


def test_auth_without_tls(make_session, checker):
    s = make_session(checker.policy(), tls="starttls")
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("538 5.7.11")
    assert checker.calls == []


def test_auth_without_tls_on_plain_listener(make_session, checker):
    s = make_session(checker.policy(), tls="none", auth_required=False)
    s.command("EHLO client.example")
    assert s.command("AUTH LOGIN").startswith("538 5.7.11")


def test_allow_plaintext_auth(make_session, checker):
    s = make_session(checker.policy(), tls="none", allow_plaintext_auth=True)
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("235 2.7.0")


def test_auth_before_ehlo(make_session, checker):
    s = make_session(checker.policy())
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("503 5.5.1")


def test_auth_after_helo_needs_ehlo(make_session, checker):
    s = make_session(checker.policy())
    s.command("HELO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("503 5.5.1")


def test_auth_after_starttls_needs_ehlo_again(make_session, checker):
    s = make_session(checker.policy(), tls="starttls")
    s.command("EHLO client.example")
    s.command("STARTTLS")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("503 5.5.1")
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("235 2.7.0")


def test_auth_when_already_authenticated(session):
    s = session()
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("235")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("503 5.5.1")


def test_auth_inside_transaction(session):
    s = session(auth_required=False)
    s.command("MAIL FROM:<a@example.com>")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("503 5.5.1")


@pytest.mark.parametrize("mech", ["CRAM-MD5", "XOAUTH2", "GSSAPI", "PLAINX"])
def test_unknown_mechanism(session, mech):
    s = session()
    assert s.command(f"AUTH {mech}").startswith("504 5.5.4")


def test_disabled_mechanism(make_session, checker):
    s = make_session(checker.policy(), auth=AuthConfig(mechanisms=("PLAIN",), failure_delay=0))
    assert "250 AUTH PLAIN\r\n" in s.command("EHLO client.example")
    assert s.command("AUTH LOGIN").startswith("504 5.5.4")


@pytest.mark.parametrize("name", ["plain", "Plain", "pLaIn"])
def test_mechanism_names_are_case_insensitive(session, name):
    s = session()
    assert s.command(f"AUTH {name} " + plain_b64("", "scott", PW)).startswith("235 2.7.0")


@pytest.mark.parametrize("line", ["AUTH", "AUTH ", "AUTH PLAIN a b", "AUTH LOGIN x y z"])
def test_auth_syntax(session, line):
    s = session()
    assert s.command(line).startswith("501 5.5.4")


# --- the exchange ----------------------------------------------------------


def test_plain_without_initial_response(session, checker):
    s = session()
    assert s.command("AUTH PLAIN") == "334 \r\n"
    assert s.command(plain_b64("", "scott", PW)) == "235 2.7.0 Authentication successful\r\n"
    assert checker.calls == [("scott", "scott", PW)]


def test_plain_equals_is_empty_initial_response(session, checker):
    s = session()
    # An empty PLAIN message is not "authz NUL authc NUL password".
    assert s.command("AUTH PLAIN =").startswith("501 5.5.2")
    assert checker.calls == []


def test_login_prompts(session, checker):
    s = session()
    assert s.command("AUTH LOGIN") == "334 VXNlcm5hbWU6\r\n"
    assert s.command(login_b64("scott")) == "334 UGFzc3dvcmQ6\r\n"
    assert s.command(login_b64(PW)) == "235 2.7.0 Authentication successful\r\n"
    assert checker.calls == [("scott", "scott", PW)]


def test_login_initial_response_skips_username_prompt(session, checker):
    s = session()
    assert s.command("AUTH LOGIN " + login_b64("scott")) == "334 UGFzc3dvcmQ6\r\n"
    assert s.command(login_b64(PW)).startswith("235 2.7.0")


@pytest.mark.parametrize(
    "steps",
    [["AUTH PLAIN", "*"], ["AUTH LOGIN", "*"], ["AUTH LOGIN", login_b64("scott"), "*"]],
)
def test_cancel(session, checker, steps):
    s = session()
    for step in steps[:-1]:
        assert s.command(step).startswith("334")
    assert s.command(steps[-1]).startswith("501 5.7.0")
    assert checker.calls == []
    # The session is usable, and a cancel is no failed attempt.
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("235")


@pytest.mark.parametrize(
    "response",
    ["QQ", "QQ=", "QR==", "Q Q==", "!!!!", "c2NvdHQ=\t", "AAAA====", "AA==AA=="],
)
def test_bad_base64(session, checker, response):
    s = session()
    s.command("AUTH PLAIN")
    assert s.command(response).startswith("501 5.5.2")
    assert checker.calls == []
    assert s.command("NOOP").startswith("250")


def test_bad_base64_in_initial_response(session):
    s = session()
    assert s.command("AUTH PLAIN QR==").startswith("501 5.5.2")


def test_response_line_over_12288_octets(session):
    s = session()
    s.command("AUTH PLAIN")
    assert s.command("A" * 12292).startswith("500 5.5.6")
    assert s.command("NOOP").startswith("250")


def test_initial_response_over_12288_octets(session):
    s = session()
    assert s.command("AUTH PLAIN " + "A" * 12292).startswith("500 5.5.6")
    assert s.command("NOOP").startswith("250")


def test_endless_auth_response_is_500_5_5_6(session):
    s = session()
    s.command("AUTH PLAIN")
    for _ in range(10):
        assert s.send(b"A" * 4000) == ""
    assert s.send(b"\r\n").startswith("500 5.5.6")


def test_response_of_exactly_12288_octets_is_decoded(session, checker):
    s = session()
    s.command("AUTH PLAIN")
    # 9216 bytes -> 12288 base64 octets; a too-long PLAIN field, so 501 5.5.2.
    assert s.command(b64(b"\x00scott\x00" + b"p" * 9209)).startswith("501 5.5.2")


@pytest.mark.parametrize(
    "message",
    [
        b"scott\x00tiger",
        b"\x00scott\x00tiger\x00",
        b"",
        b"\x00" + b"s" * 256 + b"\x00tiger",
        b"\x00scott\x00" + b"p" * 256,
        b"\x00sc\xffott\x00tiger",
        b"\xc3\x28\x00scott\x00tiger",
    ],
)
def test_malformed_plain(session, checker, message):
    s = session()
    assert s.command("AUTH PLAIN " + b64(message)).startswith("501 5.5.2")
    assert checker.calls == []
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("235")


def test_fields_of_255_octets_are_accepted(session, checker):
    s = session()
    long = "ü" * 127 + "x"  # 255 octets of UTF-8
    assert s.command("AUTH PLAIN " + plain_b64(long, long, long)).startswith("535")
    assert checker.calls == [(long, long, long)]


@pytest.mark.parametrize("authc,password", [("", PW), ("scott", ""), ("", "")])
def test_empty_authc_or_password_never_reaches_checker(session, checker, authc, password):
    s = session()
    assert s.command("AUTH PLAIN " + plain_b64("", authc, password)).startswith("535 5.7.8")
    assert checker.calls == []


def test_login_empty_password(session, checker):
    s = session()
    s.command("AUTH LOGIN " + login_b64("scott"))
    assert s.command("=").startswith("535 5.7.8")
    assert checker.calls == []


# --- checker results -------------------------------------------------------


def test_true_gives_235_and_identities(session):
    s = session()
    assert (
        s.command("AUTH PLAIN " + plain_b64("", "scott", PW))
        == "235 2.7.0 Authentication successful\r\n"
    )
    assert s.meta.get_meta("authn_id") == "scott"
    assert s.meta.get_meta("authz_id") == "scott"


def test_distinct_authz_is_kept_when_checker_accepts(make_session):
    rec = Recorder(lambda authz, authc, pw, meta: authc == "scott" and pw == PW)
    s = make_session(rec.policy())
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("sales", "scott", PW)).startswith("235")
    assert rec.calls == [("sales", "scott", PW)]
    assert s.meta.get_meta("authz_id") == "sales"
    assert s.meta.get_meta("authn_id") == "scott"
    s.command("MAIL FROM:<sales@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    assert s.send(b"x\r\n.\r\n").startswith("250")
    meta = s.messages()[0].meta
    assert (meta["authn_id"], meta["authz_id"]) == ("scott", "sales")


def test_checker_may_refuse_proxy_authorization(make_session):
    rec = Recorder(lambda authz, authc, pw, meta: authz == authc and pw == PW)
    s = make_session(rec.policy())
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("sales", "scott", PW)).startswith("535")


def test_false_gives_535_after_failure_delay(make_session, checker):
    s = make_session(checker.policy(), auth=AuthConfig(failure_delay=1.0))
    other = make_session(checker.policy(), runtime=s.runtime, client=("127.0.0.2", 1))
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "wrong")) == ""
    # The delay blocks nobody else.
    assert other.command("NOOP") == "250 2.0.0 OK\r\n"
    s.clock.advance(0.99)
    assert s.output() == ""
    s.clock.advance(0.01)
    assert s.output() == "535 5.7.8 Authentication credentials invalid\r\n"
    assert s.command("NOOP").startswith("250")


def test_commands_pipelined_during_failure_delay_wait(make_session, checker):
    s = make_session(checker.policy(), auth=AuthConfig(failure_delay=1.0))
    s.command("EHLO client.example")
    assert s.send(("AUTH PLAIN " + plain_b64("", "scott", "x") + "\r\nNOOP\r\n").encode()) == ""
    s.clock.advance(1)
    assert s.output() == "535 5.7.8 Authentication credentials invalid\r\n250 2.0.0 OK\r\n"


def test_failure_delay_counts_from_the_attempt_start(make_session):
    clock = task.Clock()
    policy = Policy()
    policy.on(
        "smtp_server_auth_plain", lambda a, c, p, m: task.deferLater(clock, 0.4, lambda: False)
    )
    s = make_session(policy, clock=clock, auth=AuthConfig(failure_delay=1.0))
    s.command("EHLO client.example")
    s.command("AUTH PLAIN " + plain_b64("", "scott", "x"))
    clock.advance(0.4)
    assert s.output() == ""
    clock.advance(0.6)
    assert s.output().startswith("535")


def test_max_failures_closes_with_421(make_session, checker):
    s = make_session(checker.policy(), auth=AuthConfig(failure_delay=0, max_failures=3))
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "a")).startswith("535")
    assert s.command("AUTH PLAIN " + plain_b64("", "", "a")).startswith("535")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "c")).startswith("421 4.7.0")
    assert s.closed


def test_deferred_checker(make_session):
    clock = task.Clock()
    policy = Policy()
    policy.on(
        "smtp_server_auth_plain", lambda a, c, p, m: task.deferLater(clock, 2, lambda: p == PW)
    )
    s = make_session(policy, clock=clock)
    s.command("EHLO client.example")
    assert s.send(("AUTH PLAIN " + plain_b64("", "scott", PW) + "\r\nNOOP\r\n").encode()) == ""
    clock.advance(2)
    assert s.output() == "235 2.7.0 Authentication successful\r\n250 2.0.0 OK\r\n"


def test_async_def_checker(make_session):
    policy = Policy()

    @policy.on("smtp_server_auth_plain")
    async def check(authz, authc, password, conn_meta):
        await defer.succeed(None)
        return password == PW

    s = make_session(policy)
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("235")


def raising(a, c, p, m):
    raise RuntimeError("database down")


@pytest.mark.parametrize(
    "answer",
    [
        raising,
        lambda a, c, p, m: defer.fail(RuntimeError("boom")),
        lambda a, c, p, m: "yes",
        lambda a, c, p, m: 1,
        lambda a, c, p, m: None,
    ],
    ids=["raises", "failed-deferred", "str", "int", "none"],
)
def test_checker_errors_give_454_and_session_goes_on(make_session, answer, captured_log):
    state = {"broken": True}

    def check(a, c, p, m):
        if state["broken"]:
            return answer(a, c, p, m)
        return p == PW

    policy = Policy()
    policy.on("smtp_server_auth_plain", check)
    s = make_session(policy)
    s.command("EHLO client.example")
    assert (
        s.command("AUTH PLAIN " + plain_b64("", "scott", PW))
        == "454 4.7.0 Temporary authentication failure\r\n"
    )
    assert not s.closed
    assert "Traceback" in captured_log.text()
    state["broken"] = False
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)).startswith("235")


def test_checker_timeout_gives_454(make_session):
    clock = task.Clock()
    policy = Policy()
    policy.on("smtp_server_auth_plain", lambda a, c, p, m: defer.Deferred())
    s = make_session(policy, clock=clock, auth=AuthConfig(timeout=5, failure_delay=0))
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", PW)) == ""
    clock.advance(4.9)
    assert s.output() == ""
    clock.advance(0.1)
    assert s.output() == "454 4.7.0 Temporary authentication failure\r\n"
    assert s.command("NOOP").startswith("250")


def test_disconnect_during_check_cancels_it(make_session):
    cancelled = []
    policy = Policy()
    policy.on(
        "smtp_server_auth_plain",
        lambda a, c, p, m: defer.Deferred(lambda d: cancelled.append(True)),
    )
    s = make_session(policy)
    s.command("EHLO client.example")
    s.command("AUTH PLAIN " + plain_b64("", "scott", PW))
    s.close()
    assert cancelled == [True]


def test_username_password_checker_refuses_other_authz(make_session):
    db = InMemoryUsernamePasswordDatabaseDontUse(scott=PW)
    s = make_session(checkers=[db])
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("sales", "scott", PW)).startswith("535 5.7.8")
    assert s.command("AUTH PLAIN " + plain_b64("scott", "scott", PW)).startswith("235 2.7.0")
    assert s.meta.get_meta("authz_id") == "scott"


def test_auth_parameter_on_mail_is_accepted(session):
    s = session()
    s.command("AUTH PLAIN " + plain_b64("", "scott", PW))
    assert s.command("MAIL FROM:<scott@example.com> AUTH=<>").startswith("250 2.1.0")


def test_mail_before_auth_then_after(session):
    s = session()
    assert s.command("MAIL FROM:<scott@example.com>").startswith("530 5.7.0")
    s.command("AUTH PLAIN " + plain_b64("", "scott", PW))
    assert s.command("MAIL FROM:<scott@example.com>").startswith("250")


# --- the auth log ------------------------------------------------------------


def test_one_log_event_per_attempt(make_session, checker, captured_log):
    s = make_session(checker.policy(), auth=AuthConfig(failure_delay=0, max_failures=10))
    s.command("EHLO client.example")
    s.command("AUTH PLAIN " + plain_b64("", "scott", "bad"))
    s.command("AUTH PLAIN QR==")
    s.command("AUTH LOGIN")
    s.command("*")
    s.command("AUTH PLAIN " + plain_b64("", "scott", PW))
    events = captured_log.namespace("kumoauth.auth")
    assert [e["result"] for e in events] == ["failure", "malformed", "cancelled", "success"]
    last = events[-1]
    assert last["mechanism"] == "PLAIN"
    assert last["authc"] == "scott" and last["authz"] == "scott"
    assert last["client"] == "127.0.0.1:50000"
    assert last["listener"] == "tcp:587"
    assert isinstance(last["checker_latency"], float)


def test_a_malformed_attempt_says_why_in_its_log_line(session, checker, captured_log):
    # an outside test could not tell a prohibited character from bad base64
    s = session()
    assert s.command("AUTH PLAIN " + plain_b64("", "a\u202eb", PW)).startswith("501 5.5.2")
    other = session(client=("127.0.0.2", 50000))  # its own line, not summarised
    assert other.command("AUTH PLAIN !!!").startswith("501 5.5.2")
    lines = [
        formatEvent(e) for e in captured_log.events if "AUTH PLAIN malformed" in formatEvent(e)
    ]
    assert len(lines) == 2, lines
    assert lines[0].endswith(' reason="authcid contains a prohibited character"')
    assert lines[1].endswith(' reason="Invalid base64 data"')
    assert "\u202e" not in captured_log.text() and PW not in captured_log.text()
