"""
The relay scheduler's side of the DSN extension, in memory: a real queue in
a temporary directory, the real report builder, a fake upstream session and
a Twisted Clock.  What the end-to-end tests cannot arrange: a report whose
store hangs while the relay stops, a bounce store that fails, a queue file
whose DSN values were tampered with, and large or 8-bit originals asked
back whole.
"""

from __future__ import annotations

import email
import email.policy
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from kumoauth.config import RelayConfig
from kumoauth.ops.metrics import Metrics
from kumoauth.relay import dsn, scheduler
from kumoauth.relay.client import NotSent, RecipientResult, SendResult
from kumoauth.relay.queue import QueueStore
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import new_id

OK = RecipientResult(250, "2.0.0", "Ok: queued as 4Zx")
NO_SUCH_USER = RecipientResult(550, "5.1.1", "no such user")


class Session:
    """An upstream session that answers each recipient as scripted."""

    reusable = False
    extensions: dict[str, str] = {}

    def __init__(self, replies: dict[str, RecipientResult], dsn: bool = False) -> None:
        self.replies = replies
        self.dsn = dsn
        self.sent: list[Any] = []

    async def transaction(self, message: Any) -> SendResult:
        self.sent.append(message)
        return SendResult(
            {r: self.replies.get(r, OK) for r in message.rcpt_to},
            data_sent=True,
            final=OK,
            dsn=self.dsn,
        )

    def abort(self) -> None:
        pass

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


def queue_one(
    store: QueueStore,
    rcpts: list[str],
    dsn_value: dict[str, Any],
    body: bytes = b"Subject: t\r\n\r\nbody\r\n",
) -> str:
    message = Message(new_id(), "a@example.com", rcpts, body, {"authn_id": "scott"})
    message.dsn = dsn_value
    (result,) = store.append_batch([message])
    assert not isinstance(result, Exception), result
    return message.id


def make_relay(
    store: QueueStore,
    clock: Clock,
    store_bounce: Callable[[bytes, str], defer.Deferred[str]],
    session: Session | None = None,
    connect: Callable[..., defer.Deferred[Any]] | None = None,
    config: RelayConfig | None = None,
) -> scheduler.Relay:
    """Started (one attempt made) if it has an upstream: *session*, or *connect*."""

    def to_session(*args: object, **kwargs: object) -> defer.Deferred[object]:
        assert session is not None
        return defer.succeed(session)

    settings = scheduler.RelaySettings(config or RelayConfig(host="127.0.0.1"), "relay.test")
    relay = scheduler.Relay(
        store, settings, clock, Metrics(), connect or to_session, store_bounce, dsn.build_dsn
    )
    if session is not None or connect is not None:
        relay.startService()
        clock.advance(0)
    return relay


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A Clock that is the scheduler's wall clock too: retries and max_age follow it."""
    clock = Clock()
    start = time.time()  # the queue stamps arrivals with the real time
    monkeypatch.setattr(
        scheduler,
        "time",
        SimpleNamespace(time=lambda: start + clock.seconds(), monotonic=clock.seconds),
    )
    return clock


def counted(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[Any]:
    """Each call of *owner*.*name* from now on, as its first argument."""
    calls: list[Any] = []
    real = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def stored(reports: list[bytes]) -> Callable[[bytes, str], defer.Deferred[str]]:
    def store_bounce(data: bytes, sender: str) -> defer.Deferred[str]:
        reports.append(data)
        return defer.succeed(f"B{len(reports)}")

    return store_bounce


def parts(report: bytes) -> list[Any]:
    return list(email.message_from_bytes(report, policy=email.policy.default).iter_parts())


def status_blocks(report: bytes) -> list[Any]:
    """The delivery-status part's per-message block, then one per recipient."""
    return list(parts(report)[1].get_payload())


def final_recipients(report: bytes) -> list[str]:
    return [block["Final-Recipient"] for block in status_blocks(report)[1:]]


def relay_lines(captured_log: Any, level: LogLevel | None = None) -> list[str]:
    return [
        formatEvent(e)
        for e in captured_log.namespace("kumoauth.relay")
        if level is None or e.get("log_level") == level
    ]


def unreported_lines(captured_log: Any) -> list[str]:
    return [line for line in relay_lines(captured_log) if "no bounce, as the sender asked" in line]


def crashed(captured_log: Any) -> bool:
    """A failure was logged: the scheduler's "bug relaying ..." line, or any traceback."""
    return any("log_failure" in e for e in captured_log.events) or any(
        line.startswith("bug ") for line in relay_lines(captured_log)
    )


def test_a_relayed_report_whose_store_hangs_never_sends_the_message_again(tmp_path: Path):
    store = QueueStore.open(tmp_path / "q")
    clock = Clock()
    hanging: list[defer.Deferred[str]] = []

    def store_bounce(data: bytes, sender: str) -> defer.Deferred[str]:
        hanging.append(defer.Deferred())
        return hanging[-1]

    session = Session({})
    mid = queue_one(store, ["b@example.net"], {"rcpt": {"b@example.net": {"notify": "SUCCESS"}}})
    relay = make_relay(store, clock, store_bounce, session)
    assert len(session.sent) == 1 and len(hanging) == 1
    # The upstream has it, and that is recorded before the report is stored.
    assert mid not in store or store.get(mid).rcpt_status() == {"b@example.net": "done"}
    relay.stopService()
    clock.advance(scheduler.STOP_WITHIN + 1)
    assert mid not in store
    store.close()
    again = QueueStore.open(tmp_path / "q")
    assert mid not in again  # nothing to send after a restart
    again.close()


def test_an_operator_bounce_that_cannot_be_stored_leaves_never_recipients_pending(
    tmp_path: Path, captured_log
):
    store = QueueStore.open(tmp_path / "q")
    clock = Clock()

    def store_bounce(data: bytes, sender: str) -> defer.Deferred[str]:
        return defer.fail(OSError("disk full"))

    rcpts = ["b@example.net", "c@example.net"]
    mid = queue_one(store, rcpts, {"rcpt": {"b@example.net": {"notify": "NEVER"}}})
    relay = make_relay(store, clock, store_bounce)
    outcome: list[object] = []
    relay.bounce_now(store.get(mid), "5.0.0", "bounced by the operator").addBoth(outcome.append)
    clock.advance(0)
    assert outcome == [False]
    # "stays queued, unchanged": the NEVER recipient too, and not logged as done with
    assert store.get(mid).rcpt_status() == dict.fromkeys(rcpts, "pending")
    assert "no bounce, as the sender asked" not in captured_log.text()
    store.close()


def test_an_operator_bounce_of_never_recipients_only_sends_nothing(tmp_path: Path):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    mid = queue_one(store, ["b@example.net"], {"rcpt": {"b@example.net": {"notify": "NEVER"}}})
    relay = make_relay(store, Clock(), stored(reports))
    outcome: list[object] = []
    relay.bounce_now(store.get(mid), "5.0.0", "bounced by the operator").addBoth(outcome.append)
    assert outcome == [True] and reports == [] and mid not in store
    store.close()


def test_dsn_values_tampered_with_in_the_queue_read_as_not_given(tmp_path: Path):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    session = Session({}, dsn=False)
    queue_one(
        store,
        ["b@example.net"],
        {
            "envid": "a\r\nX-Injected: 1",
            "rcpt": {
                "b@example.net": {
                    "notify": "SUCCESS\r\nRSET",
                    "orcpt": ["rfc822\r\nX: y", "q\r\nZ: 1"],
                }
            },
        },
    )
    make_relay(store, Clock(), stored(reports), session)
    (sent,) = session.sent
    # read as not given: defaults (no success report), nothing to send on
    assert sent.dsn.envid is None
    assert sent.dsn.rcpt("b@example.net").notify is None
    assert sent.dsn.rcpt("b@example.net").orcpt is None
    assert reports == []
    store.close()


def test_ret_full_of_a_large_message_returns_its_headers_and_says_why(tmp_path: Path, monkeypatch):
    # the relay reads a large message in a thread: here, in line
    monkeypatch.setattr(scheduler.threads, "deferToThread", defer.maybeDeferred)
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    # 4 MB of 997-octet lines
    body = b"Subject: big\r\n\r\n" + (b"a" * 997 + b"\r\n") * 4000
    queue_one(store, ["x@example.net"], {"ret": "FULL"}, body)
    make_relay(store, Clock(), stored(reports), Session({"x@example.net": NO_SUCH_USER}))
    (report,) = reports
    assert len(report) < 10_000
    human, status, returned = parts(report)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "too large to be returned whole" in human.get_content()
    assert b"Subject: big" in report and b"a" * 997 not in report
    store.close()


def test_ret_full_of_a_small_message_returns_it_whole(tmp_path: Path):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    queue_one(store, ["x@example.net"], {"ret": "FULL"})
    make_relay(store, Clock(), stored(reports), Session({"x@example.net": NO_SUCH_USER}))
    (report,) = reports
    assert parts(report)[2].get_content_type() == "message/rfc822"
    assert b"\r\nbody\r\n" in report
    store.close()


@pytest.mark.parametrize(
    "refused",
    [
        NotSent(554, "5.6.3", "upstream does not offer 8BITMIME, which this message needs"),
        NotSent(553, "5.6.7", "upstream does not offer SMTPUTF8, which this message needs"),
    ],
)
def test_ret_full_of_a_message_kumoauth_could_not_send_returns_headers(
    tmp_path: Path, refused: NotSent
):
    # The whole original would fail the same way, and a report that fails
    # is dropped: the sender would hear nothing.
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    body = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()
    queue_one(store, ["x@example.net"], {"ret": "FULL"}, body)
    make_relay(store, Clock(), stored(reports), Session({"x@example.net": refused}))
    (report,) = reports
    assert report.isascii()
    assert parts(report)[2].get_content_type() == "text/rfc822-headers"
    store.close()


def test_one_attempt_with_a_success_and_a_failure_makes_two_reports(tmp_path: Path):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    notify = {"notify": "SUCCESS,FAILURE"}
    queue_one(
        store,
        ["ok@example.net", "bad@example.net"],
        {"envid": "E1", "rcpt": {"ok@example.net": notify, "bad@example.net": notify}},
    )
    make_relay(store, Clock(), stored(reports), Session({"bad@example.net": NO_SUCH_USER}))
    subjects = sorted(
        email.message_from_bytes(r, policy=email.policy.default)["Subject"] for r in reports
    )
    assert subjects == ["Successful Mail Relay Report", "Undelivered Mail Returned to Sender"]
    assert all(b"Original-Envelope-Id: E1\r\n" in r for r in reports)
    store.close()


def test_the_head_read_for_a_report_is_longer_than_a_whole_return():
    # else a large RET=FULL original, read only this far, would be returned
    # cut off as if whole
    assert scheduler.REPORT_HEAD > dsn.FULL_RETURN_LIMIT


def test_a_long_header_section_is_returned_cut_after_a_whole_line(tmp_path: Path, monkeypatch):
    # longer than the head a report reads (past Postfix's header_size_limit)
    monkeypatch.setattr(scheduler.threads, "deferToThread", defer.maybeDeferred)
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    line = b"X-Long: " + b"v" * 90 + b"\r\n"
    body = b"Subject: long\r\n" + line * (2 * scheduler.REPORT_HEAD // len(line)) + b"\r\nx\r\n"
    queue_one(store, ["x@example.net"], {}, body)
    make_relay(store, Clock(), stored(reports), Session({"x@example.net": NO_SUCH_USER}))
    (report,) = reports
    returned = parts(report)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    text = returned.get_payload(decode=True)
    assert text.startswith(b"Subject: long\r\n")
    assert text.endswith(line)  # no line cut in its middle
    store.close()


def damage_envelope(store: QueueStore, mid: str) -> None:
    """Break *mid*'s envelope on disk (its checksum no longer matches); the body is intact."""
    entry = store.get(mid)
    fd = os.open(store.seg_dir / entry.segment, os.O_RDWR)
    try:
        at = entry.offset + entry.env_len  # inside the envelope, after the header
        os.pwrite(fd, b"#", at)
    finally:
        os.close(fd)


def test_dsn_requests_that_cannot_be_read_are_one_warning(tmp_path: Path, captured_log):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    session = Session({}, dsn=True)
    mid = queue_one(store, ["b@example.net"], {"rcpt": {"b@example.net": {"notify": "NEVER"}}})
    damage_envelope(store, mid)
    make_relay(store, Clock(), stored(reports), session)
    (sent,) = session.sent
    assert sent.dsn is not None and sent.dsn.rcpts is None  # sent as if none were asked
    text = captured_log.text()
    assert f"relay {mid}: its DSN requests cannot be read" in text
    assert "Traceback" not in text
    store.close()


def test_a_damaged_envelope_still_bounces_to_the_sender(tmp_path: Path, captured_log):
    # the bounce takes the sender from the index: a bounce built from the
    # damaged envelope failed, and the message left the queue without one
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    mid = queue_one(store, ["b@example.net"], {"rcpt": {"b@example.net": {"notify": "NEVER"}}})
    damage_envelope(store, mid)
    make_relay(store, Clock(), stored(reports), Session({"b@example.net": NO_SUCH_USER}))
    (report,) = reports  # NOTIFY unreadable: the default, failures reported
    assert email.message_from_bytes(report)["To"] == "<a@example.com>"
    assert final_recipients(report) == ["rfc822; b@example.net"]
    assert mid not in store
    assert not crashed(captured_log)
    store.close()


def test_never_recipients_are_left_out_of_the_bounce_of_an_attempt(tmp_path: Path, captured_log):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    rcpts = ["b@example.net", "c@example.net"]
    mid = queue_one(store, rcpts, {"rcpt": {"b@example.net": {"notify": "NEVER"}}})
    entry = store.get(mid)
    session = Session(dict.fromkeys(rcpts, NO_SUCH_USER))
    make_relay(store, Clock(), stored(reports), session)
    (report,) = reports
    assert final_recipients(report) == ["rfc822; c@example.net"]
    # every recipient is done with: the message left the queue, bounced
    assert mid not in store
    assert entry.rcpt_status() == dict.fromkeys(rcpts, "failed")
    (unreported,) = unreported_lines(captured_log)
    assert f"relay {mid}: not delivered to b@example.net;" in unreported
    store.close()


def test_a_relayed_report_that_cannot_be_stored_is_one_warning(
    tmp_path: Path, clock: Clock, captured_log
):
    store = QueueStore.open(tmp_path / "q")

    def store_bounce(data: bytes, sender: str) -> defer.Deferred[str]:
        return defer.fail(OSError("disk full"))

    session = Session({}, dsn=False)
    mid = queue_one(store, ["b@example.net"], {"rcpt": {"b@example.net": {"notify": "SUCCESS"}}})
    make_relay(store, clock, store_bounce, session)
    for _ in range(4):  # past four retries of the default schedule
        clock.advance(3600)
    assert len(session.sent) == 1
    assert mid not in store
    (warning,) = relay_lines(captured_log, LogLevel.warn)
    assert "could not be stored (disk full)" in warning and "not sent again" in warning
    assert not crashed(captured_log)
    store.close()


def test_an_attempt_that_fails_past_max_age_bounces_as_the_sender_asked(
    tmp_path: Path, clock: Clock, monkeypatch, captured_log
):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    reads = counted(monkeypatch, scheduler, "dsn_of")

    def refused(*args: object, **kwargs: object) -> defer.Deferred[object]:
        return defer.fail(ConnectionRefusedError())

    mid = queue_one(
        store,
        ["b@example.net", "c@example.net"],
        {
            "envid": "env-1",
            "ret": "HDRS",
            "rcpt": {
                "b@example.net": {"notify": "NEVER"},
                "c@example.net": {"notify": "FAILURE", "orcpt": ["rfc822", "orig@example.org"]},
            },
        },
    )
    config = RelayConfig(host="127.0.0.1", retry_schedule=(60.0,), max_age=60.0)
    make_relay(store, clock, stored(reports), connect=refused, config=config)
    assert reports == [] and store.get(mid).attempts == 1  # deferred, not yet too old
    clock.advance(60)
    assert mid not in store
    (report,) = reports
    head, block = status_blocks(report)
    assert head["Original-Envelope-Id"] == "env-1"
    assert block["Original-Recipient"] == "rfc822; orig@example.org"
    assert block["Final-Recipient"] == "rfc822; c@example.net"
    assert block["Status"] == "4.4.7"
    assert parts(report)[2].get_content_type() == "text/rfc822-headers"
    (unreported,) = unreported_lines(captured_log)
    assert "not delivered to b@example.net;" in unreported
    assert len(reads) == 2  # once an attempt
    store.close()


def test_a_bounce_not_stored_retries_only_its_recipient_and_reports_the_relayed_once(
    tmp_path: Path, clock: Clock
):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    refused: list[bytes] = []

    def store_bounce(data: bytes, sender: str) -> defer.Deferred[str]:
        if b"Action: failed" in data:
            refused.append(data)
            return defer.fail(OSError("disk full"))
        reports.append(data)
        return defer.succeed(f"B{len(reports)}")

    mid = queue_one(
        store,
        ["b@example.net", "c@example.net"],
        {"rcpt": {"b@example.net": {"notify": "SUCCESS"}}},
    )
    session = Session({"c@example.net": NO_SUCH_USER}, dsn=False)
    make_relay(store, clock, store_bounce, session)
    assert len(refused) == 1
    assert store.get(mid).rcpt_status() == {"b@example.net": "done", "c@example.net": "pending"}
    assert store.get(mid).last_error == "the bounce could not be stored"
    (report,) = reports
    assert b"Action: relayed" in report
    assert final_recipients(report) == ["rfc822; b@example.net"]

    session.replies = {}  # c@ is taken now
    clock.advance(60)  # the first retry
    first, second = session.sent
    assert first.rcpt_to == ["b@example.net", "c@example.net"]
    assert second.rcpt_to == ["c@example.net"]
    assert mid not in store
    assert len(reports) == 1 and len(refused) == 1
    store.close()


def test_an_attempt_reads_the_dsn_requests_once(tmp_path: Path, monkeypatch):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    reads = counted(monkeypatch, scheduler, "dsn_of")
    notify = {"notify": "SUCCESS,FAILURE"}
    mid = queue_one(
        store,
        ["ok@example.net", "bad@example.net"],
        {"rcpt": {"ok@example.net": notify, "bad@example.net": notify}},
    )
    make_relay(store, Clock(), stored(reports), Session({"bad@example.net": NO_SUCH_USER}))
    assert len(reports) == 2  # a success report and a bounce
    assert [entry.id for entry in reads] == [mid]
    store.close()


@pytest.mark.parametrize(("upstream_dsn", "head_reads"), [(True, 0), (False, 1)])
def test_the_message_is_read_for_a_success_report_only_if_the_upstream_has_no_dsn(
    tmp_path: Path, monkeypatch, upstream_dsn: bool, head_reads: int
):
    store = QueueStore.open(tmp_path / "q")
    reports: list[bytes] = []
    reads = counted(monkeypatch, store, "read_head")
    queue_one(store, ["b@example.net"], {"rcpt": {"b@example.net": {"notify": "SUCCESS"}}})
    make_relay(store, Clock(), stored(reports), Session({}, dsn=upstream_dsn))
    assert len(reads) == head_reads
    assert len(reports) == head_reads  # the upstream reports it, or kumoauth does
    store.close()
