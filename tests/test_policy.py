"""
The policy API of SPEC §4: loading, registration, the six events, reject.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer

from kumoauth import kumo
from kumoauth.policy import Policy, PolicyError, Reject, load_policy, read_policy
from kumoauth.testing import call_event, conn_meta, plain_b64

ETC = Path(__file__).resolve().parent.parent / "etc"


# --- the sample from the seed, verbatim ---------------------------------------


@pytest.fixture(scope="module")
def sample():
    return load_policy(ETC / "policy.py")


@pytest.mark.parametrize(
    "authz,authc,password,expected",
    [
        ("", "scott", "tiger", True),
        ("scott", "scott", "tiger", True),
        ("", "scott", "lion", False),
        ("", "scott", "", False),
        ("", "nobody", "tiger", False),
        ("", "", "", False),
    ],
)
def test_kumomta_sample(sample, authz, authc, password, expected):
    assert (
        call_event(sample, "smtp_server_auth_plain", authz, authc, password, conn_meta())
        is expected
    )


def test_kumomta_sample_in_a_session(sample, make_session):
    s = make_session(sample)
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger")).startswith("235")


# --- the sender-login example -------------------------------------------------


@pytest.fixture
def sender_login():
    return load_policy(ETC / "policy_sender_login.py")


def test_sender_login_map(sender_login, make_session):
    s = make_session(sender_login)
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger")).startswith("235")
    assert s.command("MAIL FROM:<news@example.com>") == (
        "553 5.7.1 Sender address rejected: not owned by user scott\r\n"
    )
    assert s.command("MAIL FROM:<Scott@Example.com>").startswith("250")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    assert s.send(b"hi\r\n.\r\n").startswith("250")
    assert s.messages()[0].meta["sender_checked"] is True


def test_sender_login_refuses_proxy_authorization(sender_login):
    assert (
        call_event(
            sender_login, "smtp_server_auth_plain", "newsletter", "scott", "tiger", conn_meta()
        )
        is False
    )
    assert (
        call_event(sender_login, "smtp_server_auth_plain", "scott", "scott", "tiger", conn_meta())
        is True
    )


# --- registration ---------------------------------------------------------------


def test_decorator_and_plain_forms():
    p = Policy()

    @p.on("smtp_server_ehlo")
    def ehlo(domain, meta):
        return None

    def rcpt(recipient, meta):
        return None

    assert p.on("smtp_server_rcpt_to", rcpt) is rcpt
    assert p.handler("smtp_server_ehlo") is ehlo
    assert p.handler("smtp_server_mail_from") is None


def test_second_handler_is_an_error():
    p = Policy()
    p.on("smtp_server_ehlo", lambda d, m: None)
    with pytest.raises(PolicyError, match="second handler"):
        p.on("smtp_server_ehlo", lambda d, m: None)


def test_unknown_event_is_an_error():
    with pytest.raises(PolicyError, match="unknown event"):
        Policy().on("smtp_server_helo", lambda d, m: None)


def test_not_callable_is_an_error():
    with pytest.raises(PolicyError, match="not callable"):
        Policy().on("smtp_server_ehlo", "nope")


def test_each_load_is_fresh(tmp_path):
    path = tmp_path / "p.py"
    path.write_text("from kumoauth import kumo\nkumo.on('smtp_server_ehlo', lambda d, m: None)\n")
    first, second = load_policy(path), load_policy(path)
    assert first.handler("smtp_server_ehlo") is not second.handler("smtp_server_ehlo")
    assert kumo.default.handler("smtp_server_ehlo") is None


@pytest.mark.parametrize(
    "source,message",
    [
        ("raise RuntimeError('boom')\n", "p.py:1: failed to import: RuntimeError: boom"),
        ("x = (\n", "p.py:1: syntax error"),
        ("from kumoauth import kumo\nkumo.on('nope', print)\n", "p.py:2: unknown event"),
    ],
)
def test_load_errors_are_one_line(tmp_path, source, message):
    path = tmp_path / "p.py"
    path.write_text(source)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "missing.py")


# --- reject ---------------------------------------------------------------------


def test_reject_reply_forms():
    assert Reject(550, "5.7.1 No thanks").reply == b"550 5.7.1 No thanks"
    assert Reject(450, "later").reply == b"450 4.7.1 later"
    assert Reject(550, "two\r\nlines").reply == b"550 5.7.1 two lines"
    with pytest.raises(ValueError):
        Reject(250, "ok")
    with pytest.raises(Reject):
        kumo.reject(550, "no")


def test_reject_in_rcpt_and_421_closes(make_session):
    p = Policy()

    @p.on("smtp_server_rcpt_to")
    def rcpt(recipient, meta):
        if recipient.startswith("bad"):
            kumo.reject(550, "5.1.1 No such user")
        if recipient.startswith("bye"):
            raise kumo.Reject(421, "4.7.0 Go away")

    s = make_session(p, auth_required=False)
    s.command("EHLO client.example")
    s.command("MAIL FROM:<a@example.com>")
    assert s.command("RCPT TO:<bad@example.net>") == "550 5.1.1 No such user\r\n"
    assert s.command("RCPT TO:<good@example.net>").startswith("250")
    assert s.command("RCPT TO:<bye@example.net>") == "421 4.7.0 Go away\r\n"
    assert s.closed


def test_reject_at_connection_closes(make_session):
    p = Policy()
    p.on("smtp_server_connection_accepted", lambda meta: kumo.reject(554, "5.7.1 Not from here"))
    s = make_session(p)
    assert s.banner == "554 5.7.1 Not from here\r\n"
    assert s.closed


def test_reject_at_ehlo_needs_ehlo_again(make_session):
    p = Policy()

    @p.on("smtp_server_ehlo")
    def ehlo(domain, meta):
        if domain == "bad.example":
            kumo.reject(550, "5.7.1 Bad HELO")

    s = make_session(p, auth_required=False)
    assert s.command("EHLO bad.example") == "550 5.7.1 Bad HELO\r\n"
    assert s.command("MAIL FROM:<a@example.com>").startswith("503")
    assert s.command("EHLO good.example").startswith("250")


# --- the six events, one conn_meta -------------------------------------------------


def test_all_events_in_order_with_one_conn_meta(make_session):
    calls = []
    p = Policy()

    @p.on("smtp_server_connection_accepted")
    def accepted(meta):
        calls.append(("accepted", id(meta)))
        meta.set_meta("order", ["accepted"])

    @p.on("smtp_server_ehlo")
    async def ehlo(domain, meta):
        calls.append(("ehlo", id(meta)))
        meta.set_meta("order", meta.get_meta("order") + ["ehlo:" + domain])

    @p.on("smtp_server_auth_plain")
    def auth(authz, authc, password, meta):
        calls.append(("auth", id(meta)))
        return defer.succeed(password == "tiger")

    @p.on("smtp_server_mail_from")
    def mail(sender, meta):
        calls.append(("mail", id(meta)))
        return defer.succeed(None)

    @p.on("smtp_server_rcpt_to")
    def rcpt(recipient, meta):
        calls.append(("rcpt", id(meta)))

    @p.on("smtp_server_message_received")
    def received(msg, meta):
        calls.append(("received", id(meta)))
        assert msg.sender == "scott@example.com"
        assert msg.recipients == ["b@example.net", "c@example.net"]
        assert msg.headers["Subject"] == "hello"
        assert msg.get_meta("authn_id") == "scott"
        msg.set_meta("verdict", "clean")
        meta.set_meta("after_snapshot", True)

    s = make_session(p)
    s.command("EHLO client.example")
    s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger"))
    s.command("MAIL FROM:<scott@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("RCPT TO:<c@example.net>")
    s.command("DATA")
    assert s.send(b"Subject: hello\r\n\r\nbody\r\n.\r\n").startswith("250")
    assert [c[0] for c in calls] == ["accepted", "ehlo", "auth", "mail", "rcpt", "rcpt", "received"]
    assert len({c[1] for c in calls}) == 1
    meta = s.messages()[0].meta
    assert meta["order"] == ["accepted", "ehlo:client.example"]
    assert meta["verdict"] == "clean"
    assert "after_snapshot" not in meta


def test_message_received_reject_spools_nothing(make_session):
    p = Policy()
    p.on("smtp_server_auth_plain", lambda a, c, pw, m: True)
    p.on("smtp_server_message_received", lambda msg, meta: kumo.reject(550, "5.7.1 Spam"))
    s = make_session(p)
    s.command("EHLO client.example")
    s.command("AUTH PLAIN " + plain_b64("", "scott", "x"))
    s.command("MAIL FROM:<scott@example.com>")
    s.command("RCPT TO:<b@example.net>")
    s.command("DATA")
    assert s.send(b"x\r\n.\r\n") == "550 5.7.1 Spam\r\n"
    assert s.messages() == []


def test_set_meta_rejects_what_json_cannot_hold():
    meta = conn_meta()
    with pytest.raises(ValueError):
        meta.set_meta("when", object())
    meta.set_meta("nested", {"a": [1, 2.5, None, True]})
    assert meta.snapshot()["nested"] == {"a": [1, 2.5, None, True]}


def test_load_from_bytes_read_earlier_runs_those_bytes(tmp_path):
    # A worker runs the policy as its supervisor read it, whatever the file
    # holds now; errors still name the file and the line.
    path = tmp_path / "policy.py"
    path.write_text(POLICY_SAYS.format(word="then"))
    source = read_policy(path)
    path.write_text("def broken(:\n")
    policy = load_policy(path, source)
    assert policy.handlers["smtp_server_ehlo"](None, None) == "then"
    with pytest.raises(PolicyError) as e:
        load_policy(path, b"x = 1\nraise ValueError('no')\n")
    assert str(e.value) == f"{path}:2: failed to import: ValueError: no"


def test_read_policy_says_what_is_wrong(tmp_path):
    with pytest.raises(PolicyError, match="policy file not found"):
        read_policy(tmp_path / "missing.py")


POLICY_SAYS = """
from kumoauth import kumo

@kumo.on("smtp_server_ehlo")
def ehlo(domain, conn_meta):
    return "{word}"
"""


def test_a_handlers_traceback_quotes_the_lines_that_run(tmp_path):
    import traceback

    path = tmp_path / "policy.py"
    source = (
        b"from kumoauth import kumo\n\n"
        b'@kumo.on("smtp_server_ehlo")\n'
        b"def ehlo(domain, conn_meta):\n"
        b'    raise ValueError("from the bytes that run")\n'
    )
    path.write_bytes(b"# edited since\n" * 10)
    policy = load_policy(path, source)
    with pytest.raises(ValueError) as e:
        policy.handlers["smtp_server_ehlo"](None, None)
    assert 'raise ValueError("from the bytes that run")' in "".join(traceback.format_tb(e.tb))
