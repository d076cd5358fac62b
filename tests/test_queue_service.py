"""
The queue's owner service alone: operator requests through control/, and
the queue gauges.
"""

from __future__ import annotations

import os
import time

import pytest

from kumoauth.ops.metrics import Metrics
from kumoauth.relay import service as qs
from kumoauth.relay.queue import QueueStore
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import new_id


def message() -> Message:
    return Message(new_id(), "a@example.com", ["b@example.net"], b"x\r\n", {"authn_id": "u"})


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
    assert requests == [("hold", held.id, None), ("delete", gone.id, None)]
    assert list((queue.path / qs.CONTROL_DIR).iterdir()) == []  # taken once
    for op, mid, _ in requests:
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
    ((op, mid, answer),) = owner._take_requests()
    assert (op, mid, answer) == ("hold", m.id, req)
    owner._apply(op, mid, answer)
    assert qs.answer_path(req).read_text() == f"{m.id} is held\n"
