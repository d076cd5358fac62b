"""
The queue's owner service alone: operator requests through control/, and
the queue gauges.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

from kumoauth.ops.metrics import Metrics
from kumoauth.relay import queue as q
from kumoauth.relay import service as qs
from kumoauth.relay.queue import QueueStore
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import new_id


def message(data: bytes = b"x") -> Message:
    return Message(new_id(), "a@example.com", ["b@example.net"], data + b"\r\n", {"authn_id": "u"})


@pytest.fixture
def queue(tmp_path):
    store = QueueStore.open(tmp_path / "q")
    yield store
    store.close()


def test_requests_are_taken_and_applied(queue):
    held, gone = message(), message()
    queue.append_batch([held, gone])
    qs.request(queue.path, "hold", held.id)
    qs.request(queue.path, "delete", gone.id)
    owner = qs.QueueService(queue, reactor=None, metrics=Metrics())
    requests = owner._take_requests()
    assert requests == [("hold", held.id, None, None), ("delete", gone.id, None, None)]
    assert list((queue.path / qs.CONTROL_DIR).iterdir()) == []  # taken once
    for op, mid, _, _ in requests:
        qs.apply(queue, op, mid)
    assert queue.get(held.id).held and gone.id not in queue


def test_flush_and_retry_make_messages_due(queue):
    m = message()
    queue.append_batch([m])
    queue.deferred(m.id, 1, time.time() + 3600, "451 later")
    assert list(queue.due()) == []
    assert qs.apply(queue, "flush", None) == "1 deferred messages are due now"
    assert [e.id for e in queue.due()] == [m.id]


def test_bounce_without_relay_is_refused(queue):
    m = message()
    queue.append_batch([m])
    with pytest.raises(ValueError, match="needs \\[relay\\]"):
        qs.apply(queue, "bounce", m.id)


def test_gauges_by_state(queue):
    a, b, c = message(), message(), message()
    queue.append_batch([a, b, c])
    queue.deferred(b.id, 2, time.time() + 60, "451")
    queue.hold(c.id)
    metrics = Metrics()
    qs.QueueService(queue, reactor=None, metrics=metrics)._gauges()
    values = {
        state: metrics.queue_messages.labels(state)._value.get()
        for state in ("queued", "deferred", "held")
    }
    assert values == {"queued": 1, "deferred": 1, "held": 1}
    assert metrics.queue_oldest.labels("queued")._value.get() >= 0


def test_retry_of_a_held_message_says_it_stays_held(queue):
    m = message()
    queue.append_batch([m])
    queue.deferred(m.id, 1, time.time() + 3600, "451 later")
    queue.hold(m.id)
    assert qs.apply(queue, "retry", m.id) == (
        f"{m.id} is held: it will be due as soon as it is released"
    )
    assert list(queue.due()) == []  # still held
    assert qs.apply(queue, "release", m.id) == f"{m.id} is released"
    assert [e.id for e in queue.due()] == [m.id]


def test_an_answer_nobody_read_is_removed_after_an_hour(queue):
    control = queue.path / qs.CONTROL_DIR
    control.mkdir()
    old, fresh = control / f"1-1-hold{qs.ANSWER_SUFFIX}", control / f"2-2-hold{qs.ANSWER_SUFFIX}"
    for p in (old, fresh):
        p.write_text("x is held\n")
    os.utime(old, (time.time() - qs.ANSWER_KEPT - 60,) * 2)
    owner = qs.QueueService(queue, reactor=None, metrics=Metrics())
    assert owner._take_requests() == []
    assert not old.exists() and fresh.exists()


def test_a_request_asking_for_an_answer_is_answered_where_the_command_looks(queue):
    m = message()
    queue.append_batch([m])
    req = qs.request(queue.path, "hold", m.id, answer=True)
    owner = qs.QueueService(queue, reactor=None, metrics=Metrics())
    ((op, mid, answer, _),) = owner._take_requests()
    assert (op, mid, answer) == ("hold", m.id, req)
    owner._apply(op, mid, answer)
    assert qs.answer_path(req).read_text() == f"{m.id} is held\n"


def test_housekeeping_compacts_and_answers_while_the_journal_cannot_be_written(
    tmp_path, monkeypatch
):
    # The journal's failed sync stopped the round before compaction and the
    # operator's requests: a full disk never got delivered mail's space
    # back, and requests waited for an answer that never came.
    monkeypatch.setattr(q, "SEGMENT_MAX", 4000)
    store = QueueStore.open(tmp_path / "q")
    try:
        done = store.append_batch([message(b"x" * 1500) for _ in range(3)])
        kept = store.append_batch([message(b"y" * 1500) for _ in range(3)])
        first = store.get(done[0]).segment
        done = [m for m in done + kept if store.get(m).segment == first]
        for mid in done:
            store.done(mid)
        other = next(m for m in kept if m not in done)
        qs.request(store.path, "hold", other)
        real_rewrite = store._rewrite_journal

        def full(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store, "_rewrite_journal", full)
        store.journal_behind = "a write failed"
        owner = qs.QueueService(store, reactor=None, metrics=Metrics())
        requests, problem = owner.housekeeping_work(compact=False, gauges=False)
        assert isinstance(problem, OSError)
        assert not (store.seg_dir / first).exists()  # the space came back
        assert requests == [("hold", other, None, None)]  # and the request was taken
        monkeypatch.setattr(store, "_rewrite_journal", real_rewrite)
        store._catch_up_at = 0.0
        requests, problem = owner.housekeeping_work(compact=False, gauges=False)
        assert problem is None and store.journal_behind is None
    finally:
        store.close()


def test_a_hold_whose_sync_fails_is_not_done_now_or_after_a_restart(tmp_path, monkeypatch):
    # The line stayed in the journal: told "not done", the operator found
    # the message held after the next restart.
    store = QueueStore.open(tmp_path / "q")
    m = message()
    store.append_batch([m])

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(OSError):
        store.hold(m.id)
    monkeypatch.undo()
    assert not store.get(m.id).held
    store.close()
    store = QueueStore.open(tmp_path / "q")
    try:
        assert not store.get(m.id).held
    finally:
        store.close()


def test_a_delete_that_waited_for_an_attempt_answers_when_the_journal_fails(queue, monkeypatch):
    # The OSError escaped: a traceback, no answer, the command waited out
    # its timeout.
    m = message()
    queue.append_batch([m])

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    said = qs._after_attempt("deferred", queue, "delete", m.id, relay=None)
    monkeypatch.undo()
    assert said == f"delete {m.id} not done: Input/output error"
    assert m.id in queue


def test_stopping_with_a_journal_that_cannot_be_written_still_closes_the_queue(
    tmp_path, monkeypatch, captured_log
):
    # flush() raised out of stopService: the lock and the journal stayed open.
    store = QueueStore.open(tmp_path / "q")
    store.append_batch([message()])

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_rewrite_journal", full)
    store.journal_behind = "a write failed"
    owner = qs.QueueService(store, reactor=None, metrics=Metrics())
    failures: list[object] = []
    owner.stopService().addErrback(failures.append)
    assert failures == []
    assert "the journal could not be written at stop" in captured_log.text()
    QueueStore.open(tmp_path / "q").close()  # the lock was released


def test_roots_request_belongs_to_the_queues_owner(queue):
    # Made 0640 by root, the service (the queue directory's owner) could
    # not read it, and dropped it as malformed.
    if os.geteuid() != 0:
        pytest.skip("needs root")
    control = queue.path / qs.CONTROL_DIR
    control.mkdir(exist_ok=True)
    os.chown(control, 65534, 65534)
    path = qs.request(queue.path, "flush", None)
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
    assert [p.name for p in control.iterdir()] == [path.name]  # no temporary left


def test_a_bulk_request_syncs_the_journal_once(tmp_path, monkeypatch):
    # One fdatasync per message, on the reactor thread: 8,600 of them for a
    # phished account's queue froze every session on a slow disk.
    queue = QueueStore.open(tmp_path / "q")
    msgs = [Message(new_id(), "a@example.com", ["b@example.net"], b"x\r\n", {}) for _ in range(50)]
    queue.append_batch(msgs)
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(q.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    ids = [m.id for m in msgs]
    assert qs.apply_many(queue, "hold", ids, "authn=x") == (
        "hold of 50 message(s) with authn=x: 50 held"
    )
    assert len(syncs) == 1
    assert qs.apply_many(queue, "delete", ids[:10] + ["f" * 24], "from=<a\x1b>") == (
        "delete of 11 message(s) with from=<a\\x1b>: 10 deleted, 1 no longer queued"
    )
    assert len(syncs) == 2
    queue.close()
    # Synced: a restart finds them held and deleted.
    with QueueStore.open(tmp_path / "q") as again:
        assert len(again) == 40 and all(e.held for e in again.entries())
