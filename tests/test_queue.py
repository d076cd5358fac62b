"""
The relay queue store (kumoauth.relay.queue): record format, group commit,
recovery, journal, compaction, the owner's lock, tailing other writers,
the lock-free reader, restart time and memory, kill -9.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue as queue_module
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumoauth.relay import queue as q
from kumoauth.relay.queue import (
    QueueCorrupt,
    QueueError,
    QueueLocked,
    QueueReader,
    QueueStore,
    SegmentWriter,
    decode_records,
    encode_envelope,
    encode_record,
    iso_time,
)
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import new_id

ROOT = Path(__file__).resolve().parent.parent


def message(mid: str | None = None, data: bytes | None = None, **meta: object) -> Message:
    mid = mid or new_id()
    if data is None:
        data = b"Subject: " + mid.encode() + b"\r\n\r\nbody\r\n"
    return Message(mid, "a@example.com", ["b@example.net"], data, {"authn_id": "scott", **meta})


def batch(n: int, size: int | None = None) -> list[Message]:
    return [message(data=None if size is None else os.urandom(size)) for _ in range(n)]


def tree(path: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under *path*: (size, mtime_ns, sha256)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st_ = p.stat()
            out[str(p.relative_to(path))] = (
                st_.st_size,
                st_.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def segments(path: Path) -> list[Path]:
    return sorted((path / "seg").glob("*.q"))


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    return tmp_path / "queue"


# --------------------------------------------------------------------------
# the record format

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
envelopes = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=30),
        "received_at": st.text(max_size=25),
        "mail_from": st.text(max_size=40),
        "rcpt_to": st.lists(st.text(max_size=40), max_size=5),
        "meta": st.dictionaries(st.text(max_size=10), json_values, max_size=5),
        "smtputf8": st.booleans(),
        "size": st.integers(0, 2**40),
    }
)


@given(st.lists(st.tuples(envelopes, st.binary(max_size=3000)), min_size=1, max_size=5))
def test_record_round_trip(records):
    data = b"".join(
        b"".join(encode_record(encode_envelope(env), body, q.FIRST if i == 0 else 0))
        for i, (env, body) in enumerate(records)
    )
    decoded, end = decode_records(data)
    assert end == len(data)
    assert decoded == records


def test_envelope_json_is_utf8_not_escaped():
    raw = encode_envelope({"id": "x", "mail_from": "jöran@exämple.com"})
    assert "jöran@exämple.com".encode() in raw


@given(
    st.lists(st.tuples(envelopes, st.binary(max_size=500)), min_size=2, max_size=5),
    st.data(),
)
def test_truncated_or_corrupted_tail_is_detected(records, data):
    encoded = [b"".join(encode_record(encode_envelope(env), body)) for env, body in records]
    head = b"".join(encoded[:-1])
    last = encoded[-1]
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.integers(0, len(last) - 1), label="cut")
        damaged = last[:cut]
    else:
        pos = data.draw(st.integers(0, len(last) - 1), label="pos")
        flip = data.draw(st.integers(1, 255), label="xor")
        damaged = last[:pos] + bytes([last[pos] ^ flip]) + last[pos + 1 :]
    decoded, end = decode_records(head + damaged)
    assert end == len(head)
    assert decoded == records[:-1]


class Plain:
    """A submission without twisted or a Meta."""

    def __init__(self, mid: str, data: bytes, sender: str = "a@example.com") -> None:
        self.id, self.data, self.sender, self.recipients = mid, data, sender, ["b@example.net"]

    def values_now(self) -> dict[str, object]:
        return {"authn_id": "scott"}


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    bodies=st.lists(st.binary(min_size=0, max_size=300), min_size=16, max_size=16),
    data=st.data(),
)
def test_recovery_truncates_a_damaged_last_batch_on_disk(sizes, bodies, data):
    """
    Damage anywhere in a segment's last batch (truncation, or one byte
    changed, in a header, an envelope or a body): reopening keeps every
    record before the damaged one and truncates the file there.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        store = QueueStore.open(path)
        written: list[tuple[str, bytes]] = []
        k = 0
        for n in sizes:
            msgs = [Plain(new_id(), bodies[(k + i) % 16]) for i in range(n)]
            k += n
            assert all(isinstance(r, str) for r in store.append_batch(msgs))
            written += [(m.id, m.data) for m in msgs]
        last_batch = written[-sizes[-1] :]
        starts = {mid: store.get(mid).offset for mid, _ in written}
        seg = store.seg_dir / store.get(written[-1][0]).segment
        store.close()
        size = seg.stat().st_size
        first = starts[last_batch[0][0]]
        raw = bytearray(seg.read_bytes())
        if data.draw(st.booleans(), label="truncate"):
            pos = data.draw(st.integers(first, size - 1), label="cut")
            os.truncate(seg, pos)
        else:
            pos = data.draw(st.integers(first, size - 1), label="pos")
            raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
            seg.write_bytes(bytes(raw))
        # the damaged record: the last one that starts at or before pos
        damaged = max(i for i, (mid, _) in enumerate(written) if starts[mid] <= pos)
        store = QueueStore.open(path)
        try:
            assert store.ids() == sorted(mid for mid, _ in written[:damaged])
            for mid, body in written[:damaged]:
                assert store.read_message(mid) == body
            expected_size = starts[written[damaged][0]]
            if expected_size:
                assert seg.stat().st_size == expected_size
            else:
                assert not seg.exists()  # nothing valid left: removed
        finally:
            store.close()


# --------------------------------------------------------------------------
# group commit


def test_group_commit_one_fdatasync_per_batch(qdir, monkeypatch):
    store = QueueStore.open(qdir)
    calls: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def fdatasync(fd):
        calls.append("fdatasync")
        real_fdatasync(fd)

    def fsync(fd):
        calls.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    # First batch: creates the segment, so one directory fsync too.
    results = store.append_batch(batch(20))
    assert all(isinstance(r, str) for r in results)
    assert calls == ["fsync", "fdatasync"]
    for n in (1, 20, 64):
        calls.clear()
        results = store.append_batch(batch(n))
        assert all(isinstance(r, str) for r in results)
        assert calls == ["fdatasync"], n
    # done is written at once but synced with the next flush: one fdatasync
    calls.clear()
    for mid in store.ids()[:50]:
        store.done(mid)
    assert calls == []
    store.flush()
    assert calls == ["fdatasync"]
    store.close()


def test_rotation_makes_new_segments(qdir, monkeypatch):
    monkeypatch.setattr(q, "SEGMENT_MAX", 10_000)
    store = QueueStore.open(qdir)
    ids = []
    for _ in range(10):
        ids += [r for r in store.append_batch(batch(4, size=1000)) if isinstance(r, str)]
    assert len(ids) == 40
    assert len(segments(qdir)) >= 3
    store.close()
    store = QueueStore.open(qdir)
    assert store.ids() == sorted(ids)
    store.close()


def test_a_bad_message_fails_alone(qdir):
    store = QueueStore.open(qdir)
    good = message()
    bad = message()
    bad.set_meta("x", 1)
    bad._values["x"] = object()  # not JSON: fails to encode
    dup = message(mid=good.id)
    results = store.append_batch([good, bad, dup])
    assert results[0] == good.id
    assert isinstance(results[1], QueueError) and isinstance(results[2], QueueError)
    assert store.ids() == [good.id]
    again = store.append_batch([message(mid=good.id)])
    assert isinstance(again[0], QueueError)
    store.close()


def test_a_failed_sync_fails_the_batch_and_abandons_the_segment(qdir, monkeypatch):
    store = QueueStore.open(qdir)
    first = store.append_batch(batch(3))
    seg = store.writer.current

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    failed = store.append_batch(batch(3))
    assert all(isinstance(r, QueueError) and "Input/output" in str(r) for r in failed)
    monkeypatch.undo()
    later = store.append_batch(batch(2))
    assert all(isinstance(r, str) for r in later)
    assert store.writer.current != seg  # never appends after a doubtful batch
    store.close()
    store = QueueStore.open(qdir)
    assert set(first) | set(later) <= set(store.ids())
    store.close()


# --------------------------------------------------------------------------
# recovery and the journal


def test_recovery_after_a_torn_tail(qdir):
    store = QueueStore.open(qdir)
    msgs = batch(5)
    ids = store.append_batch(msgs)
    seg = segments(qdir)[0]
    store.close()
    good = seg.stat().st_size
    # half a record: a header and part of an envelope
    with open(seg, "ab") as f:
        f.write(b"".join(encode_record(b'{"id":"x"}', b"y" * 100))[:40])
    store = QueueStore.open(qdir)
    assert seg.stat().st_size == good
    assert store.ids() == sorted(ids)
    for m in msgs:
        assert store.read_message(m.id) == m.data
        assert store.read_envelope(m.id)["meta"] == {"authn_id": "scott"}
    more = store.append_batch(batch(2))
    store.close()
    store = QueueStore.open(qdir)
    assert store.ids() == sorted(ids + more)
    store.close()


def test_a_torn_tail_is_noted_and_the_zeros_written_ahead_are_not(qdir):
    store = QueueStore.open(qdir)
    ids = store.append_batch(batch(2))
    store.close()
    seg = segments(qdir)[0]
    good = seg.stat().st_size
    # As a crashed writer leaves it: the zeros written ahead, nothing else.
    with open(seg, "ab") as f:
        f.write(bytes(q.ZERO_AHEAD))
    store = QueueStore.open(qdir)
    assert store.recovery_notes == [] and store.ids() == sorted(ids)
    store.close()
    assert seg.stat().st_size == good
    # Half a record, then the zeros: a write that never finished.
    with open(seg, "ab") as f:
        f.write(b"".join(encode_record(b'{"id":"x"}', b"y" * 100))[:40] + bytes(4096))
    store = QueueStore.open(qdir)
    assert store.recovery_notes == [
        (
            "warn",
            f"queue segment {seg.name}: cut {40 + 4096} bytes at its end, a write that never "
            "finished (its messages were never acknowledged)",
        )
    ]
    assert store.ids() == sorted(ids)
    store.close()
    assert seg.stat().st_size == good
    assert not (qdir / "damaged").exists()


@pytest.mark.parametrize("damaged", [0, 1])
def test_damage_before_a_later_batch_is_copied_and_said(qdir, damaged):
    # A crash only tears the last batch: bad bytes with a later batch after
    # them are damage to acknowledged mail.  What follows them cannot be
    # taken back (a record is not bound to its place), so it is cut as
    # before, but a copy is kept and one error line says what happened
    # (it used to be cut, or the segment removed, silently).
    store = QueueStore.open(qdir)
    ids = [store.append_batch([m])[0] for m in batch(3)]
    starts = [store.get(mid).offset for mid in ids]
    store.close()
    seg = segments(qdir)[0]
    raw = bytearray(seg.read_bytes())
    raw[starts[damaged] + 10 : starts[damaged] + 40] = os.urandom(30)
    seg.write_bytes(bytes(raw))
    store = QueueStore.open(qdir)
    try:
        assert store.ids() == sorted(ids[:damaged])
        ((level, text),) = store.recovery_notes
    finally:
        store.close()
    copy = qdir / "damaged" / seg.name
    assert copy.read_bytes() == bytes(raw)
    assert level == "error" and f"damaged at byte {starts[damaged]} of {len(raw)}" in text
    assert str(copy) in text and "\n" not in text
    # Said once: the next start finds a clean segment (or none).
    store = QueueStore.open(qdir)
    assert store.recovery_notes == [] and store.ids() == sorted(ids[:damaged])
    store.close()
    assert copy.read_bytes() == bytes(raw)


def test_a_record_inside_a_body_is_never_taken_for_a_message(qdir):
    # A client's message may hold bytes that look like a whole record (a
    # forged envelope, checksums right, marked as a batch start).  When the
    # last batch is torn, recovery must not index it.
    forged_env = json.dumps(
        {
            "id": "f" * 24,
            "mail_from": "ceo@example.com",
            "rcpt_to": ["x@y"],
            "meta": {"authn_id": "admin"},
        }
    ).encode()
    forged = b"".join(encode_record(forged_env, b"forged", flags=q.FIRST))
    store = QueueStore.open(qdir)
    first = store.append_batch(batch(1))
    (mid,) = store.append_batch([message(data=b"Subject: x\r\n\r\n" + forged + b"\r\n")])
    end = store.get(mid).body_offset + store.get(mid).body_len
    store.close()
    seg = segments(qdir)[0]
    raw = seg.read_bytes()
    seg.write_bytes(raw[: end - 1] + b"!")  # the last batch torn: its body checksum fails
    store = QueueStore.open(qdir)
    try:
        assert store.ids() == sorted(first)
        assert "f" * 24 not in store.ids()
    finally:
        store.close()


def test_journal_states_survive_reopen(qdir):
    store = QueueStore.open(qdir)
    ids = store.append_batch(batch(6))
    a, b, c, d, e, f = ids
    store.deferred(a, 2, 1234.5, "451 4.3.0 try later", {"b@example.net": "deferred"})
    store.deferred(b, 1, 99.0, None)
    store.deferred(b, 3, 199.0, "421 busy", {"b@example.net": "deferred", "x@y": "sent"})
    store.hold(c)
    store.deferred(c, 1, 5.0, "x")
    store.hold(d)
    store.release(d)
    store.done(e)
    store.delete(f)
    store.close()
    store = QueueStore.open(qdir)
    assert store.ids() == sorted([a, b, c, d])
    ea, eb, ec, ed = (store.get(x) for x in (a, b, c, d))
    assert (ea.attempts, ea.next_attempt, ea.last_error, ea.rcpts) == (
        2,
        1234.5,
        "451 4.3.0 try later",
        {"b@example.net": "deferred"},
    )
    assert (eb.attempts, eb.next_attempt, eb.last_error) == (3, 199.0, "421 busy")
    assert eb.rcpts == {"b@example.net": "deferred", "x@y": "sent"}
    assert ec.held and ec.attempts == 1
    assert not ed.held and ed.attempts == 0
    for x in (e, f):
        with pytest.raises(KeyError):
            store.get(x)
    assert not store.claim(c)  # held
    store.close()


@pytest.mark.parametrize(
    ("tail", "notes"),
    [
        # torn by a crash (never synced, never relied on): cut, nothing said
        (b'","op":"do', []),
        # a complete line that cannot be read: skipped, and said
        (b'","op":"de{"id":"x","op":"held"}\n', ["1 unreadable journal lines skipped"]),
    ],
    ids=["torn", "unreadable"],
)
def test_a_bad_journal_line_is_skipped(qdir, tail, notes):
    store = QueueStore.open(qdir)
    a, b = store.append_batch(batch(2))
    store.deferred(a, 1, 1.0, "e")
    store.close()
    (journal,) = qdir.glob("journal-*.log")
    with open(journal, "ab") as f:
        f.write(b'{"id":"' + b.encode() + tail)
    store = QueueStore.open(qdir)
    assert store.ids() == sorted([a, b]) and store.get(a).attempts == 1
    said = list(store.recovery_notes)
    assert [level for level, _ in said] == ["warn"] * len(notes)
    assert all(n in text for n, (_, text) in zip(notes, said, strict=True))
    store.close()
    (journal,) = qdir.glob("journal-*.log")
    for line in journal.read_bytes().splitlines():
        json.loads(line)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a disk that fills."""
    path = tmp_path / "tiny"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small filesystem")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    yield path
    subprocess.run(["umount", "-l", str(path)])


def fill(directory: Path) -> Path:
    """Fill *directory*'s filesystem to the last byte; the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")
    return filler


def test_a_full_disk_never_glues_journal_lines_and_loses_no_hold(tiny_fs):
    # A deferral's line torn by ENOSPC was left in the journal; once space
    # came back, the operator's synced "held" line was appended to it, and
    # recovery dropped both: the message held was relayed.
    qdir = tiny_fs / "queue"
    store = QueueStore.open(qdir)
    a, b = store.append_batch(batch(2))
    filler = fill(tiny_fs)
    # The relay's outcomes go on in memory while the journal cannot follow.
    for attempt in range(1, 200):
        store.deferred(a, attempt, 1000.0 + attempt, "451 4.3.0 " + "x" * 200)
        if store.journal_behind is not None:
            break
    assert store.journal_behind is not None and "No space left" in store.journal_behind
    assert store.get(a).attempts == attempt
    # An operator's hold is synced first, or refused with nothing changed.
    with pytest.raises(OSError):
        store.hold(b)
    assert not store.get(b).held
    with pytest.raises(OSError):
        store.flush()
    filler.unlink()
    store.hold(b)  # the journal is rewritten from memory, then the hold
    assert store.journal_behind is None
    store.close()
    store = QueueStore.open(qdir)
    assert store.recovery_notes == []  # no unreadable line
    assert store.get(b).held
    assert store.get(a).attempts == attempt
    store.close()
    (journal,) = qdir.glob("journal-*.log")
    for line in journal.read_bytes().splitlines():
        json.loads(line)


def test_claims(qdir):
    store = QueueStore.open(qdir)
    a, b = store.append_batch(batch(2))
    assert store.claim(a)
    assert not store.claim(a)
    assert store.claim(b)
    store.release_claim(a)
    assert store.claim(a)
    store.done(a)
    assert not store.is_claimed(a)
    assert not store.claim("nope")
    store.close()


def test_the_index_holds_envelopes_not_bodies(qdir):
    store = QueueStore.open(qdir)
    (mid,) = store.append_batch(
        [Message(new_id(), "jöran@exämple.com", ["ü@exämple.net"], b"hi\r\n", {"smtputf8": True})]
    )
    store.close()
    store = QueueStore.open(qdir)
    e = store.get(mid)
    assert e.mail_from == "jöran@exämple.com" and e.rcpt_to == ("ü@exämple.net",)
    assert e.size == 4 and e.received_at.endswith("Z")
    assert not any(isinstance(getattr(e, f), bytes) for f in e.__slots__)
    env = store.read_envelope(mid)
    assert set(env) == {"id", "received_at", "mail_from", "rcpt_to", "meta", "smtputf8", "size"}
    assert env["smtputf8"] is True and env["size"] == 4
    path, offset, length = store.message_path(mid)
    with open(path, "rb") as f:
        f.seek(offset)
        assert f.read(length) == b"hi\r\n"
    store.close()


def test_a_corrupt_body_is_reported_when_read(qdir):
    store = QueueStore.open(qdir)
    ids = store.append_batch(batch(3))
    store.append_batch(batch(1))  # so the damaged record is not in the last batch
    path, offset, _ = store.message_path(ids[0])
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"X")
    with pytest.raises(QueueCorrupt):
        store.read_message(ids[0])
    assert store.read_message(ids[1])
    store.close()


# --------------------------------------------------------------------------
# compaction


def test_compaction(qdir, monkeypatch):
    monkeypatch.setattr(q, "SEGMENT_MAX", 4000)
    monkeypatch.setattr(q, "JOURNAL_COMPACT_MIN", 10)
    store = QueueStore.open(qdir)
    ids: list[str] = []
    for _ in range(6):
        ids += store.append_batch(batch(3, size=600))
    before_segs = segments(qdir)
    assert len(before_segs) >= 3
    first_seg = store.get(ids[0]).segment
    in_first = [m for m in ids if store.get(m).segment == first_seg]
    for m in in_first:
        store.done(m)
    for m in ids[len(in_first) :][:2]:
        for n in range(5):
            store.deferred(m, n + 1, float(n), f"try {n}")
    keep = ids[len(in_first) + 2]
    store.hold(keep)
    removed, rewritten = store.compact()
    assert removed == [first_seg]
    assert rewritten
    assert not (qdir / "seg" / first_seg).exists()
    (journal,) = qdir.glob("journal-*.log")
    # only live states are left: 2 deferred + 1 held, and no done lines
    assert len(journal.read_text().splitlines()) == 3
    snapshot = [
        (e.id, e.attempts, e.next_attempt, e.last_error, e.rcpts, e.held) for e in store.entries()
    ]
    bodies = {e.id: store.read_message(e.id) for e in store.entries()}
    store.close()
    store = QueueStore.open(qdir)
    assert [
        (e.id, e.attempts, e.next_attempt, e.last_error, e.rcpts, e.held) for e in store.entries()
    ] == snapshot
    assert {e.id: store.read_message(e.id) for e in store.entries()} == bodies
    # done lines are kept while their segment still exists
    rest = store.ids()
    some = [m for m in rest if store.get(m).segment != store.get(rest[-1]).segment][:1]
    store.done(some[0])
    store.rewrite_journal()
    store.close()
    store = QueueStore.open(qdir)
    assert some[0] not in store
    # everything done: every segment goes
    for m in store.ids():
        store.done(m)
    store.compact()
    assert segments(qdir) == []
    store.close()
    store = QueueStore.open(qdir)
    assert len(store) == 0
    store.close()


def with_a_dead_segment(qdir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str, list[str]]:
    """A store of 3 small segments whose first has only delivered messages."""
    monkeypatch.setattr(q, "SEGMENT_MAX", 4000)
    store = QueueStore.open(qdir)
    ids: list[str] = []
    for _ in range(3):
        ids += store.append_batch(batch(3, size=600))
    first = store.get(ids[0]).segment
    for m in ids:
        if store.get(m).segment == first:
            store.done(m)
    return store, first, [m for m in ids if m in store]


def test_housekeepings_syncs_do_not_hold_the_queue(qdir, monkeypatch):
    # Under a burst of 24 MB messages the disk took seconds to sync even the
    # small journal (its file system journal commits wait for the data
    # before them), and the housekeeping thread held the store's mutex
    # meanwhile: the reactor's next call (a delivery's done, a new message's
    # index entry) waited as long.  Each sync here waits until it is let go.
    store, first, rest = with_a_dead_segment(qdir, monkeypatch)  # journal lines to sync too
    entered: queue_module.Queue[str] = queue_module.Queue()
    let_go: queue_module.Queue[None] = queue_module.Queue()

    def held(name: str, real: Any) -> Any:
        def sync(fd_or_path: Any) -> None:
            entered.put(name)
            let_go.get(timeout=10)
            real(fd_or_path)

        return sync

    monkeypatch.setattr(q.os, "fdatasync", held("the journal", os.fdatasync))
    monkeypatch.setattr(q, "_fsync_dir", held("the directory", q._fsync_dir))
    housekeeping = threading.Thread(target=store.compact)
    housekeeping.start()
    for expected in ("the journal", "the directory"):
        assert entered.get(timeout=5) == expected
        answered = threading.Event()

        def reactor(mid: str = rest.pop(), answered: threading.Event = answered) -> None:
            assert store.claim(mid)
            store.release_claim(mid)
            answered.set()

        threading.Thread(target=reactor, daemon=True).start()
        assert answered.wait(2), f"the queue was held while {expected} was synced"
        let_go.put(None)
    housekeeping.join(10)
    assert not (qdir / "seg" / first).exists()
    store.close()


class HeldSync:
    """A sync (of a descriptor or a directory) that waits until the test lets it go."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.entered, self.let_go = threading.Event(), threading.Event()

    def __call__(self, target: Any) -> None:
        self.entered.set()
        self.let_go.wait(10)
        self.real(target)


def test_a_second_flush_waits_for_the_sync_under_way(qdir, monkeypatch):
    # a review: the second returned at once, before the first's sync was
    # done (the stop path's flush could not see that sync fail)
    store = QueueStore.open(qdir)
    (mid,) = store.append_batch(batch(1))
    store.done(mid)
    held = HeldSync(os.fdatasync)
    monkeypatch.setattr(q.os, "fdatasync", held)
    first = threading.Thread(target=store.flush)
    first.start()
    assert held.entered.wait(5)
    second_done = threading.Event()
    threading.Thread(target=lambda: (store.flush(), second_done.set()), daemon=True).start()
    assert not second_done.wait(0.5)
    held.let_go.set()
    first.join(10)
    assert second_done.wait(5)
    store.close()


def test_a_store_closed_during_compaction_writes_no_journal(qdir, monkeypatch):
    monkeypatch.setattr(q, "JOURNAL_COMPACT_MIN", 1)
    store, first, _ = with_a_dead_segment(qdir, monkeypatch)
    store.flush()
    held = HeldSync(q._fsync_dir)
    monkeypatch.setattr(q, "_fsync_dir", held)
    result: list[Any] = []
    housekeeping = threading.Thread(target=lambda: result.append(store.compact()))
    housekeeping.start()
    assert held.entered.wait(5)
    journals = sorted(qdir.glob("journal-*.log"))
    store.close()  # SIGTERM while the housekeeping thread syncs
    held.let_go.set()
    housekeeping.join(10)
    assert result == [([first], False)]
    assert store._journal_fd is None
    assert sorted(qdir.glob("journal-*.log")) == journals


def test_compaction_spares_a_live_writers_segment(qdir):
    store = QueueStore.open(qdir)
    other = SegmentWriter(qdir, "w1")
    results = other.append_batch(batch(3))
    store.scan_new()
    for mid, _ in results:  # type: ignore[misc]
        store.done(mid)
    assert store.compact()[0] == []  # w1 still holds it
    assert len(segments(qdir)) == 1
    other.close()
    assert len(store.compact()[0]) == 1
    assert segments(qdir) == []
    store.close()


# --------------------------------------------------------------------------
# one owner


def test_a_second_instance_refuses_and_touches_nothing(qdir):
    store = QueueStore.open(qdir)
    store.append_batch(batch(3))
    store.deferred(store.ids()[0], 1, 1.0, "e")
    store.flush()
    before = tree(qdir)
    proc = run_python(
        """
        import sys
        from kumoauth.relay.queue import QueueStore, QueueLocked
        try:
            QueueStore.open(sys.argv[1])
        except QueueLocked as e:
            print(e)
            sys.exit(3)
        """,
        str(qdir),
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert str(qdir) in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert tree(qdir) == before
    store.close()
    # once the owner is gone, the next one may open it
    QueueStore.open(qdir).close()


def test_lock_in_the_same_process(qdir):
    store = QueueStore.open(qdir)
    with pytest.raises(QueueLocked, match="in use"):
        QueueStore.open(qdir)
    store.close()


# --------------------------------------------------------------------------
# tailing other writers


def test_scan_new_sees_other_writers(qdir):
    store = QueueStore.open(qdir)
    own = store.append_batch(batch(2))
    assert store.scan_new() == []
    other = SegmentWriter(qdir, "w1")
    theirs = [r[0] for r in other.append_batch(batch(3))]  # type: ignore[index]
    proc = run_python(
        """
        import sys
        from kumoauth.relay.queue import SegmentWriter
        from kumoauth.storage.delivery import Message
        from kumoauth.storage.spool import new_id
        w = SegmentWriter(sys.argv[1], "w2")
        for _ in range(2):
            for r in w.append_batch(
                [Message(new_id(), "a@x", ["b@y"], b"from w2", {}) for _ in range(4)]
            ):
                print(r[0])
        """,
        str(qdir),
    )
    assert proc.returncode == 0, proc.stderr
    remote = proc.stdout.split()
    new = store.scan_new()
    assert sorted(e.id for e in new) == sorted(theirs + remote)
    assert store.scan_new() == []  # nothing changed
    assert store.read_message(remote[0]) == b"from w2"
    more = [r[0] for r in other.append_batch(batch(1))]  # type: ignore[index]
    assert [e.id for e in store.scan_new()] == more
    assert store.ids() == sorted(own + theirs + remote + more)
    other.close()
    store.close()
    store = QueueStore.open(qdir)
    assert store.ids() == sorted(own + theirs + remote + more)
    store.close()


def test_the_relay_scans_for_other_writers_on_its_tick_not_per_message(qdir):
    """
    A message this process stores is indexed as it is stored: the look
    that follows (notify) starts it without listing the segment directory;
    another writer's records are picked up by the tick.
    """
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from kumoauth.config import RelayConfig
    from kumoauth.ops.metrics import Metrics
    from kumoauth.relay import scheduler

    store = QueueStore.open(qdir)
    scans = []
    real_scan = store.scan_new
    store.scan_new = lambda: scans.append(1) or real_scan()  # type: ignore[method-assign]
    connecting: list[defer.Deferred[object]] = []

    def connect(*args: object) -> defer.Deferred[object]:
        connecting.append(defer.Deferred())
        return connecting[-1]

    clock = Clock()
    settings = scheduler.RelaySettings(RelayConfig(host="127.0.0.1"), "kumoauth.test")
    relay = scheduler.Relay(store, settings, clock, Metrics(), connect, None, None)  # type: ignore[arg-type]
    relay.startService()  # the first tick, now
    assert len(scans) == 1
    store.append_batch(batch(1))
    relay.notify()
    clock.advance(0)
    assert len(connecting) == 1 and len(scans) == 1
    other = SegmentWriter(qdir, "w1")
    other.append_batch(batch(1))
    relay.notify()
    clock.advance(0)
    assert len(connecting) == 1  # not seen yet
    clock.advance(scheduler.TICK)
    assert len(scans) == 2 and len(connecting) == 2
    # A send that ends looks for other writers' records too (a busy relay
    # does not wait for the tick), at most every RESCAN_AFTER.
    other.append_batch(batch(1))
    clock.advance(scheduler.RESCAN_AFTER)
    connecting[0].errback(ConnectionRefusedError("refused"))
    clock.advance(0)
    assert len(scans) == 3 and len(connecting) == 3
    relay._stopping = True
    other.close()
    store.close()


def started_relay(store: Any, clock: Any, connect: Any, concurrency: int) -> Any:
    """A running relay scheduler over *store*, its sessions from *connect*."""
    from kumoauth.config import RelayConfig
    from kumoauth.ops.metrics import Metrics
    from kumoauth.relay import scheduler

    relay = scheduler.Relay(
        store,
        scheduler.RelaySettings(RelayConfig(host="127.0.0.1", concurrency=concurrency), "k.test"),
        clock,
        Metrics(),
        connect,
        None,
        None,
    )  # type: ignore[arg-type]
    relay.startService()
    return relay


def test_a_connection_begun_before_the_upstream_answered_does_not_mark_it_down(qdir, captured_log):
    """
    Two sessions being made; the later one is made, then the earlier one
    fails: the upstream answers, so no "unreachable" line (the log read:
    answers again, unreachable, answers again, within one second).
    """
    from twisted.internet import defer
    from twisted.internet.task import Clock
    from twisted.logger import formatEvent

    from kumoauth.relay.client import RecipientResult, SendResult

    class Session:
        reusable = False

        async def transaction(self, message: object) -> SendResult:
            return SendResult(dict.fromkeys(message.rcpt_to, RecipientResult(250, "2.0.0", "ok")))

        def close(self) -> None:
            pass

    store = QueueStore.open(qdir)
    connecting: list[defer.Deferred[object]] = []

    def connect(*args: object) -> defer.Deferred[object]:
        connecting.append(defer.Deferred())
        return connecting[-1]

    clock = Clock()
    relay = started_relay(store, clock, connect, concurrency=2)
    store.append_batch(batch(2))
    relay.notify()
    clock.advance(0)
    assert len(connecting) == 2
    connecting[1].callback(Session())
    clock.advance(0)
    connecting[0].errback(ConnectionRefusedError("refused"))
    clock.advance(0)

    def outages() -> list[str]:
        return [x for x in map(formatEvent, captured_log.events) if "unreachable" in x]

    assert outages() == []
    # A connection begun after that, failing, is an outage.
    store.make_due(time.time())
    relay.notify()
    clock.advance(0)
    assert len(connecting) == 3
    connecting[2].errback(ConnectionRefusedError("refused"))
    clock.advance(0)
    assert len(outages()) == 1
    relay._stopping = True
    store.close()


def test_one_users_refused_authzid_is_not_an_upstream_outage(qdir, captured_log):
    """
    ``identity = "authz"``: the upstream refusing AUTH for one authzid is
    that user's mail waiting, not the upstream down (which said
    "unreachable", then "answers again" and made every deferred message
    due at each of the other users' sessions).  One line per attempt.
    """
    from twisted.internet import defer
    from twisted.internet.task import Clock
    from twisted.logger import formatEvent

    from kumoauth.relay.client import IdentityRefused, UpstreamError

    store = QueueStore.open(qdir)
    refusals = iter(
        [
            IdentityRefused("upstream refused AUTH as kumoauth for alice: 535 5.7.8 no"),
            UpstreamError("connection to 127.0.0.1:25 refused"),
        ]
    )

    def connect(*args: object) -> defer.Deferred[object]:
        return defer.fail(next(refusals))

    clock = Clock()
    relay = started_relay(store, clock, connect, concurrency=1)
    store.append_batch(batch(1))
    relay.notify()
    clock.advance(0)
    texts = [formatEvent(e) for e in captured_log.events]
    assert not any("unreachable" in t for t in texts), texts
    assert sum("refused AUTH as kumoauth for alice" in t for t in texts) == 1, texts
    # The whole upstream refusing connections is an outage.
    store.make_due(time.time())
    relay.notify()
    clock.advance(0)
    texts = [formatEvent(e) for e in captured_log.events]
    assert sum(" unreachable: " in t for t in texts) == 1, texts
    relay._stopping = True
    store.close()


def test_owner_restart_does_not_truncate_a_live_writer(qdir):
    store = QueueStore.open(qdir)
    other = SegmentWriter(qdir, "w1")
    other.append_batch(batch(2))
    store.close()
    (seg,) = segments(qdir)
    store = QueueStore.open(qdir)
    end = max(e.body_offset + e.body_len for e in store.entries())
    store.close()
    # a batch being written right now, into the writer's zeros: half a record
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(b"".join(encode_record(b'{"id":"x"}', b"y" * 10))[:20])
    size = seg.stat().st_size
    assert size > end + 20  # the zeros after it
    store = QueueStore.open(qdir)
    assert len(store) == 2 and seg.stat().st_size == size
    store.close()
    # the writer dies (no close: its zeros and the half record stay)
    assert other._fd is not None
    os.close(other._fd)
    other._fd = None
    store = QueueStore.open(qdir)  # now no one holds it: truncated
    assert len(store) == 2 and seg.stat().st_size == end
    store.close()


def test_a_segment_ends_with_its_last_record_once_its_writer_closes_it(qdir):
    """
    A writer fills space with zeros before its records go there; a segment
    it has closed (or rotated away from) has none left, so compaction and
    readers see exactly the records.
    """
    writer = SegmentWriter(qdir, "w1")
    writer.create()
    writer.append_batch(batch(1))
    (seg,) = segments(qdir)
    size = seg.stat().st_size
    assert size >= q.ZERO_AHEAD
    writer.append_batch(batch(1))
    writer.append_batch(batch(1))
    assert seg.stat().st_size == size  # records overwrite zeros: no size change to sync
    writer.close()
    data = seg.read_bytes()
    records, valid = q.decode_records(data)
    assert len(records) == 3 and valid == len(data)


def test_a_record_half_written_into_the_zeros_waits_for_the_next_scan(qdir):
    """
    The file size no longer tells where a writer is: a record whose header
    and envelope are there but whose body is still being written is not
    indexed (its checksum fails) until it is whole.
    """
    store = QueueStore.open(qdir)
    other = SegmentWriter(qdir, "w1")
    first = [r[0] for r in other.append_batch(batch(2))]  # type: ignore[index]
    assert sorted(e.id for e in store.scan_new()) == sorted(first)
    (seg,) = segments(qdir)
    end = max(store.get(m).body_offset + store.get(m).body_len for m in first)
    mid = new_id()
    env = {"id": mid, "mail_from": "a@x", "rcpt_to": ["b@y"], "meta": {}, "size": 400}
    record = b"".join(encode_record(encode_envelope(env), b"z" * 400, q.FIRST))
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(record[:-100])  # the last 100 bytes of the body: still zeros
    assert store.scan_new() == []
    assert sorted(QueueReader(qdir).ids()) == sorted(first)  # the lock-free reader too
    store.close()
    store = QueueStore.open(qdir)  # recovery, with the writer alive: not indexed, not cut
    assert store.ids() == sorted(first) and seg.stat().st_size > end + len(record)
    with open(seg, "r+b") as f:
        f.seek(end + len(record) - 100)
        f.write(record[-100:])
    assert [e.id for e in store.scan_new()] == [mid]
    assert store.read_message(mid) == b"z" * 400
    other.close()
    store.close()


def test_compaction_removes_a_dead_writers_segment_with_its_zeros(qdir):
    store = QueueStore.open(qdir)
    other = SegmentWriter(qdir, "w1")
    ids = [r[0] for r in other.append_batch(batch(2))]  # type: ignore[index]
    assert sorted(e.id for e in store.scan_new()) == sorted(ids)
    for mid in ids:
        store.done(mid)
    assert other._fd is not None  # the writer dies: its zeros stay
    os.close(other._fd)
    other._fd = None
    (seg,) = segments(qdir)
    assert seg.stat().st_size > q.ZERO_AHEAD
    removed, _ = store.compact()
    assert removed == [seg.name] and not seg.exists()
    store.close()


def test_compaction_notes_damage_in_another_writers_segment(qdir):
    # A worker's segment damaged before a later batch: the owner's scan
    # stops at the damage, and once what it indexed is done, compaction
    # removes the segment; it used to do so silently.
    store = QueueStore.open(qdir)
    other = SegmentWriter(qdir, "w1")
    ids = [other.append_batch([m])[0][0] for m in batch(3)]  # type: ignore[index]
    other.close()
    (seg,) = segments(qdir)
    raw = bytearray(seg.read_bytes())
    second = raw.index(q.MAGIC, 1)
    raw[second + 10 : second + 40] = os.urandom(30)
    seg.write_bytes(bytes(raw))
    assert [e.id for e in store.scan_new()] == ids[:1]
    store.done(ids[0])
    assert store.take_notes() == []
    removed, _ = store.compact()
    assert removed == [seg.name] and not seg.exists()
    ((level, text),) = store.take_notes()
    assert level == "error" and f"{seg.name} is damaged at byte {second}" in text
    assert (qdir / "damaged" / seg.name).read_bytes() == bytes(raw)
    assert store.take_notes() == []
    store.close()


# --------------------------------------------------------------------------
# reading without the lock (the Spool API)


def test_reader_works_while_the_owner_holds_the_lock(qdir):
    store = QueueStore.open(qdir)
    msgs = batch(4)
    ids = store.append_batch(msgs)
    store.done(ids[1])
    store.deferred(ids[2], 1, 7.0, "451")
    before = tree(qdir)
    reader = QueueReader(qdir)
    assert list(reader.ids()) == sorted([ids[0], ids[2], ids[3]])
    m = reader.read(ids[0])
    assert m.id == ids[0] and m.read_bytes() == msgs[0].data
    assert m.envelope["mail_from"] == "a@example.com" and m.meta == {"authn_id": "scott"}
    assert m.envelope["rcpt_to"] == ["b@example.net"] and m.size == len(msgs[0].data)
    assert reader.get(ids[2]).attempts == 1
    assert [x.id for x in reader] == list(reader.ids())
    with pytest.raises(KeyError):
        reader.read(ids[1])
    later = store.append_batch(batch(1))
    assert reader.read(later[0]).id == later[0]  # an unknown id triggers a fresh look
    assert tree(qdir) != before  # (the owner wrote; the reader did not)
    snapshot = tree(qdir)
    list(QueueReader(qdir))
    assert tree(qdir) == snapshot
    store.close()


def test_reader_of_a_queue_being_written_by_a_worker(qdir):
    store = QueueStore.open(qdir)
    store.close()
    w = SegmentWriter(qdir, "w0")
    (r,) = w.append_batch(batch(1))
    assert list(QueueReader(qdir).ids()) == [r[0]]  # type: ignore[index]
    w.close()


# --------------------------------------------------------------------------
# restart: time and memory


def test_reopen_100k_messages_fast_and_without_bodies(tmp_path):
    path = tmp_path / "big"
    writer = SegmentWriter(path, "0")
    writer.create()
    body = b"x" * 2048
    n = 100_000
    for k in range(0, n, 500):
        writer.append_batch([Plain(f"{k + i:024x}", body) for i in range(500)])
    writer.close()
    t = time.perf_counter()
    store = QueueStore.open(path)
    elapsed = time.perf_counter() - t
    assert len(store) == n
    store.close()
    tracemalloc.start()
    try:
        store = QueueStore.open(path)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(store) == n
    store.close()
    print(
        f"\nreopen of {n} queued messages (2 KB): {elapsed:.2f} s; "
        f"index {current / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB "
        f"(bodies: {n * len(body) / 1e6:.0f} MB)"
    )
    assert elapsed <= 10
    assert peak < 100e6  # far below the 205 MB of bodies


# --------------------------------------------------------------------------
# kill -9

APPENDER = """
import sys
from kumoauth.relay.queue import QueueStore

class M:
    def __init__(self, mid):
        self.id = mid
        self.sender = "a@example.com"
        self.recipients = ["b@example.net"]
        self.data = (mid * 40).encode()

    def values_now(self):
        return {"authn_id": "scott"}

store = QueueStore.open(sys.argv[1])
prefix = sys.argv[2]
k = 0
while True:
    size = 1 + k % 17
    ids = store.append_batch([M(f"{prefix}{k + i:020x}") for i in range(size)])
    k += size
    for mid in ids:
        if isinstance(mid, str):
            sys.stdout.write(mid + "\\n")
    sys.stdout.flush()
    for mid in ids[:2]:
        if k % 3 == 0:
            store.deferred(mid, 1, 2.0, "again")
"""


@pytest.mark.parametrize("round_", range(4))
def test_kill_9_loses_no_acknowledged_message(qdir, round_):
    acknowledged: list[str] = []
    for attempt in range(2):  # twice on the same queue: recovery after recovery
        proc = subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(qdir), f"{round_:02x}{attempt:02x}"],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # it is running
        time.sleep(random.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        out = first + proc.stdout.read()
        proc.wait()
        lines = out.split(b"\n")
        acknowledged += [x.decode() for x in lines[:-1]]  # the last one may be cut
        assert acknowledged
        store = QueueStore.open(qdir)
        try:
            missing = [m for m in acknowledged if m not in store]
            assert missing == []
            for mid in acknowledged:
                assert store.read_message(mid) == (mid * 40).encode()
            assert json.dumps(store.read_envelope(acknowledged[-1])["meta"]) == (
                '{"authn_id": "scott"}'
            )
        finally:
            store.close()


# --------------------------------------------------------------------------
# what the scheduler uses


def test_due_claims_and_recipient_status(qdir):
    store = QueueStore.open(qdir)
    ids = store.append_batch(batch(5))
    a, b, c, d, e = ids
    assert [x.id for x in store.due(0)] == ids  # oldest first
    store.defer(a, attempts=1, next_attempt=100.0, error="451 later")
    store.hold(b)
    assert store.claim(c)
    assert [x.id for x in store.due(50.0)] == [d, e]
    due = store.due(150.0)
    first = next(due)
    assert first.id in (d, a)
    assert sorted([first.id, *(x.id for x in due)]) == sorted([a, d, e])
    store.release(b)
    assert b in [x.id for x in store.due(150.0)]
    entry = store.get(a)
    assert entry.rcpt_status() == {"b@example.net": "pending"}
    assert entry.authn_id == "scott"  # indexed: no envelope read to relay as the user
    entry.set_rcpt("b@example.net", "failed")
    store.defer(a, attempts=2, next_attempt=200.0, error="x")
    store.done(c)
    store.close()
    store = QueueStore.open(qdir)
    entry = store.get(a)
    assert entry.rcpt_status() == {"b@example.net": "failed"} and entry.attempts == 2
    assert [x.id for x in store.due(150.0)] == [b, d, e]
    assert [x.id for x in store.due(250.0)] == [b, d, e, a]
    assert entry.envelope["meta"] == {"authn_id": "scott"} and entry.authn_id == "scott"
    assert abs(entry.arrival - time.time()) < 60
    assert entry.received_at.endswith("Z") and not entry.smtputf8
    store.close()


def test_due_is_lazy_and_survives_changes_while_iterating(qdir):
    store = QueueStore.open(qdir)
    ids = store.append_batch(batch(10))
    seen = []
    for entry in store.due(0):
        seen.append(entry.id)
        store.claim(entry.id)
        if len(seen) == 1:
            store.done(ids[1])  # leaves the queue while we iterate
        if len(seen) == 5:
            break
    assert seen == [ids[0], *ids[2:6]]
    assert [x.id for x in store.due(0)] == ids[6:]
    store.close()


_HELD_WRITER = """
import errno, os, sys
from kumoauth.relay.queue import SegmentWriter
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import new_id

real = os.fdatasync

def held(fd):
    print("written", flush=True)  # the batch is on the file, not synced
    if sys.stdin.readline().strip() == "fail":
        raise OSError(errno.EIO, "Input/output error")
    real(fd)

os.fdatasync = held
w = SegmentWriter(sys.argv[1], "w1")
w.create()
mid = new_id()
result = w.append_batch([Message(mid, "a@example.com", ["b@example.net"], b"x\\r\\n", {})])[0]
print("stored" if isinstance(result, tuple) else "failed", mid, flush=True)
sys.stdin.readline()  # the segment stays open (current) until told
"""


@contextlib.contextmanager
def held_writer(qdir: Path) -> Iterator[subprocess.Popen[str]]:
    """
    Another process (``_HELD_WRITER``) with one batch written and its sync
    held until :func:`answer` says how it ends; it exits cleanly at the end.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _HELD_WRITER, str(qdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "written"
        yield child
        answer(child, "")  # the segment may close now
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def answer(child: subprocess.Popen[str], word: str) -> list[str]:
    """Tell the held writer *word* ("ok", "fail"); its reply's words."""
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(word + "\n")
    child.stdin.flush()
    return child.stdout.readline().split() if word else []


@pytest.mark.parametrize("sync", ["ok", "fail"])
def test_the_owner_indexes_another_writers_batch_only_once_it_is_synced(qdir, sync):
    """
    A worker's batch can be read back between its write and its sync (the
    page cache has it, checksums and all).  The owner must not index it
    then: the relay would send a message whose client may yet be told 451
    (its sync failed, and the writer cuts it off) or that a crash may yet
    lose.  The writer holds a POSIX write lock over the batch until its
    sync returns; the owner's scan leaves the locked records for later.
    Another process, because POSIX locks do not conflict within one.
    """
    store = QueueStore.open(qdir)
    try:
        with held_writer(qdir) as child:
            (segment,) = store.seg_dir.glob("w1-*")
            # Written and readable, checksums and all: only the lock says "not yet".
            assert len(QueueReader(qdir).entries()) == 1
            assert store.scan_new() == []
            # The next scan reads the batch, then its probe lets the writer go
            # on (and waits for it): synced, it is indexed; failed and cut off
            # after it was read, it is not (the probe then finds no lock, the
            # file's size says the record is gone).
            got: list[str] = []
            real = q._lockable

            def probe(fd: int, start: int, length: int) -> bool:
                if not got:
                    got.extend(answer(child, sync))
                return real(fd, start, length)

            q._lockable = probe  # type: ignore[assignment]
            try:
                new = store.scan_new()
            finally:
                q._lockable = real  # type: ignore[assignment]
            outcome, mid = got
            if sync == "ok":
                assert outcome == "stored" and [e.id for e in new] == [mid]
            else:
                assert outcome == "failed" and new == [] and mid not in store
                assert segment.stat().st_size == 0  # cut back by the writer
                assert store.scan_new() == []
    finally:
        store.close()


def test_the_owners_own_current_segment_is_indexed_by_its_stores_not_by_scans(qdir):
    """
    What the owner appends itself is indexed after each batch's sync, by
    ``append_batch``; a scan (the relay's tick, on the reactor thread)
    could otherwise catch a batch between the writer thread's write and
    its sync, and POSIX locks do not keep a process from itself.
    """
    store = QueueStore.open(qdir)
    ids = store.append_batch(batch(2))
    assert all(mid in store for mid in ids)
    store.writer.append_batch(batch(1))  # as if caught between write and sync
    assert store.scan_new() == []
    # Nor a segment of ours the scan does not know as current yet (the
    # writer thread opening the next one while the scan looks).
    next_one = SegmentWriter(qdir, store.writer.writer)
    next_one.append_batch(batch(1))
    assert next_one.current != store.writer.current
    assert store.scan_new() == []
    next_one.close()
    store.close()


def test_recovery_leaves_a_live_writers_batch_being_synced_for_later(qdir):
    """
    Recovery (a supervisor restarted while a worker of the old one still
    writes, or ``QueueStore.open`` from the command line) takes a live
    writer's segment as scan_new does: a batch under its writer's lock is
    left for a later scan.
    """
    with held_writer(qdir) as child:
        store = QueueStore.open(qdir)
        assert len(store) == 0
        outcome, mid = answer(child, "ok")
        assert outcome == "stored" and [e.id for e in store.scan_new()] == [mid]
        store.close()


def test_only_a_writer_the_owner_scans_locks_its_batches(qdir, monkeypatch):
    """
    A worker's batch is under a write lock until its sync returns (the
    owner's scan must not relay it earlier); the owner's own writer needs
    none: its scan skips its own segments and it indexes each batch after
    the sync.  Two fcntl calls per batch saved where there are no workers.
    """
    import fcntl

    locks: list[int] = []
    real = fcntl.lockf

    def lockf(fd: int, cmd: int, *args: int) -> None:
        locks.append(cmd)
        real(fd, cmd, *args)

    monkeypatch.setattr(fcntl, "lockf", lockf)
    store = QueueStore.open(qdir)
    try:
        mid = new_id()
        assert store.append_batch(
            [Message(mid, "a@example.com", ["b@example.net"], b"x\r\n", {})]
        ) == [mid]
        assert locks == []
        worker = SegmentWriter(qdir, "w1")
        worker.create()
        result = worker.append_batch(
            [Message(new_id(), "a@example.com", ["b@example.net"], b"y\r\n", {})]
        )
        assert isinstance(result[0], tuple)
        assert locks == [fcntl.LOCK_EX, fcntl.LOCK_UN]
        worker.close()
        assert [e.id for e in store.scan_new()] == [result[0][0]]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("when", "shown"),
    [
        (0.0, "1970-01-01T00:00:00Z"),
        (1e300, "9999-12-31T23:59:59Z"),  # OverflowError: spool list was a traceback
        (-1e300, "0001-01-01T00:00:00Z"),
    ],
)
def test_iso_time_of_any_time(when, shown):
    assert iso_time(when) == shown
