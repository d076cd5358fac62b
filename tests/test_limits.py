"""
Per-user sending limits (``[limits]``, kumoauth.smtp.limits) through the
protocol on StringTransport: 451 4.7.1 at MAIL and RCPT with the reset
time, counted per authn_id after the policy said yes, the policy event,
the metric, one log line per user and kind per minute, and
``on_store_error``.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from kumoauth.config import LimitsConfig, ServerConfig, parse
from kumoauth.policy import Policy, Reject
from kumoauth.smtp.limits import counter_key
from kumoauth.stores import StoreUnavailable
from kumoauth.stores.memory import MemoryStore
from kumoauth.testing import Session, plain_b64

LIMIT_EVENTS: list[tuple[str, str]] = []


def users_policy(extra: Any = None) -> Policy:
    policy = Policy()
    policy.on("smtp_server_auth_plain", lambda authz, authc, pw, meta: pw == "pw")
    policy.on(
        "smtp_server_limit_exceeded",
        lambda user, kind, meta: LIMIT_EVENTS.append((user, kind)),
    )
    if extra:
        extra(policy)
    return policy


def session(make_session, limits: LimitsConfig, user: str = "alice", **kw: Any) -> Session:
    s = make_session(users_policy(kw.pop("extra", None)), limits=limits, **kw)
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", user, "pw")).startswith("235 ")
    return s


def send(s: Session, rcpts: int = 1) -> list[str]:
    replies = [s.command("MAIL FROM:<a@example.com>")]
    for i in range(rcpts):
        replies.append(s.command(f"RCPT TO:<r{i}@example.net>"))
    return replies


def deliver(s: Session, rcpts: int = 1) -> str:
    """One whole transaction; the reply to the end of DATA."""
    assert all(r.startswith("250 ") for r in send(s, rcpts))
    assert s.command("DATA").startswith("354")
    return s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")


def counts(s: Session, user: str = "alice") -> tuple[int, int]:
    """The user's (messages, recipients) counts in the session's limits store."""
    store = s.runtime.sending_limits.store
    return tuple(  # type: ignore[return-value]
        store._counters.get(counter_key(kind, user), [0])[0] for kind in ("messages", "recipients")
    )


def test_message_limit_refuses_mail_with_the_reset_time(make_session, captured_log):
    LIMIT_EVENTS.clear()
    s = session(make_session, LimitsConfig(window=3600, max_messages_per_user=2))
    for _ in range(2):
        assert deliver(s).startswith("250 ")
    s.clock.advance(200)
    refused = s.command("MAIL FROM:<a@example.com>")
    assert refused.startswith("451 4.7.1 Sending limit reached (2 messages per 3600 seconds)")
    assert "try again in 3400 seconds" in refused
    assert LIMIT_EVENTS == [("alice", "messages")]
    metrics = s.runtime.metrics.registry
    value = metrics.get_sample_value(
        "kumoauth_limit_exceeded_total", {"kind": "messages", "user": "alice"}
    )
    assert value == 1
    assert "sending limit: user alice reached 2 messages per 3600s" in captured_log.text()
    # the window ends: mail again
    for _ in range(17):
        s.clock.advance(200)
        s.command("NOOP")
    assert s.command("MAIL FROM:<a@example.com>").startswith("250 ")


def test_recipient_limit_refuses_rcpt(make_session):
    LIMIT_EVENTS.clear()
    s = session(make_session, LimitsConfig(max_recipients_per_user=3))
    replies = send(s, rcpts=5)
    assert [r[:3] for r in replies] == ["250", "250", "250", "250", "451", "451"]
    assert replies[4].startswith("451 4.7.1 Sending limit reached (3 recipients")
    # the message with the recipients that were accepted still goes
    assert s.command("DATA").startswith("354")
    assert s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").startswith("250 ")
    assert LIMIT_EVENTS == [("alice", "recipients")] * 2


def test_limits_are_per_user_across_sessions_and_case(make_session, spool_dir):
    store = MemoryStore(None)  # type: ignore[arg-type]
    limits = LimitsConfig(max_messages_per_user=1)

    def make(user: str) -> Session:
        s = session(make_session, limits, user=user, limits_store=store)
        store.clock = s.clock
        return s

    assert send(make("alice"))[0].startswith("250 ")
    assert send(make("ALICE"))[0].startswith("451 ")  # same budget, folded
    assert send(make("bob"))[0].startswith("250 ")


def test_what_the_policy_refuses_is_not_counted(make_session):
    def refuse_some(policy: Policy) -> None:
        def rcpt(address: str, meta: Any) -> None:
            if address.startswith("bad"):
                raise Reject(550, "no such user")

        policy.on("smtp_server_rcpt_to", rcpt)

    s = session(make_session, LimitsConfig(max_recipients_per_user=2), extra=refuse_some)
    s.command("MAIL FROM:<a@example.com>")
    for _ in range(5):
        assert s.command("RCPT TO:<bad@example.net>").startswith("550")
    assert s.command("RCPT TO:<ok1@example.net>").startswith("250")
    assert s.command("RCPT TO:<ok2@example.net>").startswith("250")
    assert s.command("RCPT TO:<ok3@example.net>").startswith("451")


def test_log_line_once_per_user_and_kind(make_session, captured_log):
    s = session(make_session, LimitsConfig(max_messages_per_user=1))
    deliver(s)
    for _ in range(20):
        s.command("MAIL FROM:<a@example.com>")
    lines = [ln for ln in captured_log.text().splitlines() if ln.startswith("sending limit: user")]
    assert len(lines) == 1
    s.clock.advance(61)
    assert "sending limit: 19 more messages refused for user alice" in captured_log.text()


class DownStore(MemoryStore):
    """A store whose counters are unreachable (as a Redis outage looks)."""

    down = True

    def add(self, key: str, amount: int, window: float, limit: int, **kw: Any) -> Any:
        if self.down:
            return defer.fail(StoreUnavailable("connection refused"))
        return super().add(key, amount, window, limit, **kw)


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_store_outage_follows_on_store_error(make_session, captured_log, mode):
    store = DownStore(None)  # type: ignore[arg-type]
    s = session(
        make_session,
        LimitsConfig(max_messages_per_user=5, on_store_error=mode),
        limits_store=store,
    )
    store.clock = s.clock
    for _ in range(5):
        reply = s.command("MAIL FROM:<a@example.com>")
        if mode == "closed":
            assert reply.startswith("451 4.7.1 Cannot check sending limits")
        else:
            assert reply.startswith("250 ")
            s.command("RSET")
    text = captured_log.text()
    assert text.count("sending-limits store unavailable: connection refused") == 1
    assert "Traceback" not in text
    store.down = False
    assert s.command("MAIL FROM:<a@example.com>").startswith("250 ")
    assert captured_log.text().count("sending-limits store available again") == 1


class SilentStore(MemoryStore):
    """A store that takes the request and never answers (a stalled Redis)."""

    def add(self, key: str, amount: int, window: float, limit: int, **kw: Any) -> Any:
        return defer.Deferred()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_store_silent_past_the_policy_timeout_follows_on_store_error(
    make_session, captured_log, mode
):
    # The Redis URL's timeout may be longer than [policy] timeout: a store
    # still silent then is down like a refusing one (on_store_error, one
    # line), not a 451 4.3.0 with a traceback at every command.
    s = session(
        make_session,
        LimitsConfig(max_messages_per_user=5, on_store_error=mode),
        limits_store=SilentStore(None),  # type: ignore[arg-type]
    )
    timeout = s.runtime.policy_timeout
    for _ in range(3):
        assert s.command("MAIL FROM:<a@example.com>") == ""
        s.clock.advance(timeout)
        reply = s.output()
        if mode == "closed":
            assert reply.startswith("451 4.7.1 Cannot check sending limits"), reply
        else:
            assert reply.startswith("250 "), reply
            s.command("RSET")
    text = captured_log.text()
    assert text.count(f"sending-limits store unavailable: no answer within {timeout:g} s") == 1
    assert "Traceback" not in text


def test_unauthenticated_sessions_are_not_counted(make_session):
    s = make_session(
        users_policy(), limits=LimitsConfig(max_messages_per_user=1), auth_required=False
    )
    s.command("EHLO client.example")
    for _ in range(3):
        assert s.command("MAIL FROM:<a@example.com>").startswith("250 ")
        s.command("RSET")


def test_counter_keys_fold_case():
    assert counter_key("messages", "Alice@Example.COM") == "limit:messages:alice@example.com"


def test_limits_table_parses():
    base = (
        '[[listener]]\nendpoint = "tcp:1"\ntls = "none"\nauth_required = false\n'
        '[spool]\npath = "s"\n[server]\nhostname = "h"\n'
    )
    assert parse(base).limits is None
    cfg = parse(base + "[limits]\nwindow = 60\nmax_recipients_per_user = 10\n")
    assert cfg.limits == LimitsConfig(window=60.0, max_recipients_per_user=10)
    from kumoauth.config import ConfigError

    with pytest.raises(ConfigError, match=r"\[limits\] on_store_error"):
        parse(base + '[limits]\non_store_error = "maybe"\n')


def test_user_name_variants_share_one_counter_and_one_metric_label(make_session):
    """
    Names a user database takes for one account ("alice ", " ALICE",
    "alice  smith" for "alice smith") count against one limit and add no
    metric series of their own (audit finding 3).
    """
    store = MemoryStore(None)  # type: ignore[arg-type]
    limits = LimitsConfig(max_messages_per_user=1)
    sessions = []

    def make(user: str) -> Session:
        s = session(make_session, limits, user=user, limits_store=store)
        store.clock = s.clock
        sessions.append(s)
        return s

    assert send(make("alice smith"))[0].startswith("250 ")
    for variant in ("alice smith ", " Alice Smith", "alice  smith", "ALICE SMITH  "):
        assert send(make(variant))[0].startswith("451 ")
    assert store._counters.keys() == {counter_key("messages", "alice smith")}
    labels = {
        (sample.labels["kind"], sample.labels["user"])
        for s in sessions  # a runtime each here: four refused one message each
        for metric in s.runtime.metrics.registry.collect()
        if metric.name == "kumoauth_limit_exceeded"
        for sample in metric.samples
        if sample.name == "kumoauth_limit_exceeded_total"
    }
    assert labels == {("messages", "alice smith")}


def test_a_transaction_that_ends_without_its_message_gives_the_counts_back(make_session):
    """
    RSET, a refusal at the end of DATA and a lost connection give back what
    the transaction counted; only an accepted message keeps its counts (a
    client retrying after a 451 used up its budget without sending).
    """
    s = session(
        make_session,
        LimitsConfig(max_messages_per_user=2, max_recipients_per_user=3),
        server=ServerConfig(hostname="mail.example.com", max_message_size=100),
    )
    send(s, rcpts=2)
    assert counts(s) == (1, 2)
    assert s.command("RSET").startswith("250 ")
    assert counts(s) == (0, 0)
    # refused at the end of DATA: given back at the next MAIL
    assert all(r.startswith("250 ") for r in send(s, rcpts=2))
    assert s.command("DATA").startswith("354")
    assert s.send(b"Subject: x\r\n\r\n" + b"y" * 200 + b"\r\n.\r\n").startswith("552 ")
    assert counts(s) == (1, 2)  # held until the next command ends the transaction
    assert deliver(s, rcpts=3).startswith("250 ")
    assert counts(s) == (1, 3)
    # over the recipient limit: 451 at RCPT; the retry after RSET is not refused
    # for a message budget spent on attempts
    assert s.command("MAIL FROM:<a@example.com>").startswith("250 ")
    assert s.command("RCPT TO:<x@example.net>").startswith("451 4.7.1")
    assert s.command("RSET").startswith("250 ")
    for _ in range(5):
        assert s.command("MAIL FROM:<a@example.com>").startswith("250 ")
        assert s.command("RSET").startswith("250 ")
    assert counts(s) == (1, 3)
    # a session lost mid-transaction gives its counts back
    send(s, rcpts=0)
    assert counts(s) == (2, 3)
    s.close()
    assert counts(s) == (1, 3)


def test_an_accepted_message_keeps_its_counts(make_session):
    s = session(make_session, LimitsConfig(max_messages_per_user=1))
    assert deliver(s).startswith("250 ")
    s.command("RSET")
    s.command("EHLO again.example")
    assert counts(s) == (1, 0)
    assert s.command("MAIL FROM:<a@example.com>").startswith("451 4.7.1")


class SlowSpool(Session):
    """
    A spool that stores whatever becomes of its Deferred, as the threaded
    writer does (a cancel does not stop the write): the test fires it.
    """

    pending: list[defer.Deferred[str]]

    def _store(self, message: Any) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred(lambda _: None)
        self.pending.append(d)
        return d


def test_a_client_gone_while_its_message_is_stored_still_has_it_counted(spool_dir):
    # The review: send the final dot and close at once; the message was
    # stored and relayed and its counts given back (unlimited sending).
    SlowSpool.pending = []
    s = SlowSpool(
        users_policy(),
        spool_dir=spool_dir,
        limits=LimitsConfig(max_messages_per_user=1, max_recipients_per_user=1),
    )
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "alice", "pw")).startswith("235 ")
    send(s)
    assert s.command("DATA").startswith("354")
    s.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert len(SlowSpool.pending) == 1
    s.close()  # the write goes on (the cancel only tells the session)
    assert counts(s) == (1, 1)
    # one the store refuses is given back
    SlowSpool.pending = []
    t = SlowSpool(users_policy(), spool_dir=spool_dir, limits=LimitsConfig(max_messages_per_user=5))
    t.command("EHLO client.example")
    assert t.command("AUTH PLAIN " + plain_b64("", "bob", "pw")).startswith("235 ")
    send(t)
    t.command("DATA")
    t.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    SlowSpool.pending[0].errback(RuntimeError("disk"))
    assert t.output().startswith("451 4.3.0")
    assert counts(t, "bob") == (0, 0)


def test_a_give_back_goes_to_the_window_it_was_counted_in(make_session):
    # The review: a MAIL held open past its window, given back after a new
    # window began, made room for a third message in a 2-per-window window.
    clock = Clock()
    store = MemoryStore(clock)
    limits = LimitsConfig(window=60, max_messages_per_user=2)

    def open_session() -> Session:
        return session(make_session, limits, limits_store=store, clock=clock)

    a, b = open_session(), open_session()
    assert a.command("MAIL FROM:<a@example.com>").startswith("250")  # held open
    assert deliver(b).startswith("250 ")  # window 1: 2 counted
    clock.advance(61)  # window 1 over
    a.command("NOOP")
    assert [deliver(b)[:3] for _ in range(2)] == ["250", "250"]  # window 2 full
    assert a.command("RSET").startswith("250")  # window 1's count: not window 2's
    assert b.command("MAIL FROM:<a@example.com>").startswith("451 4.7.1")
