"""
A worker's log lines on their way to the supervisor (kumoauth.ops.worklog):
gathered in the worker, written at once when they matter, and logged by the
supervisor with the time they happened at.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure

from kumoauth.ops.worklog import FLUSH_AT, FLUSH_EVERY, LineReader, WorkerLog, worker_line


class RunningClock(Clock):
    running = True


@pytest.fixture
def pipe():
    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for the big burst
    yield r, w
    os.close(r)
    os.close(w)


def pending(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def event(text: str, level: LogLevel = LogLevel.info, when: float = 1_700_000_000.25) -> dict:
    return {
        "log_format": "{text}",
        "text": text,
        "log_level": level,
        "log_namespace": "kumoauth.auth",
        "log_time": when,
    }


def test_info_lines_are_gathered_and_written_together(pipe):
    r, w = pipe
    clock = RunningClock()
    out = WorkerLog(w, clock, in_io_thread=lambda: True)
    out(event("AUTH PLAIN success authc=a"))
    out(event("spooled x"))
    assert pending(r) == b""
    clock.advance(FLUSH_EVERY)
    assert pending(r) == (
        b"1700000000.250000 [kumoauth.auth#info] AUTH PLAIN success authc=a\n"
        b"1700000000.250000 [kumoauth.auth#info] spooled x\n"
    )
    clock.advance(FLUSH_EVERY)
    assert pending(r) == b"" and not clock.getDelayedCalls()


def test_a_warning_goes_out_at_once_after_what_came_before(pipe):
    r, w = pipe
    clock = RunningClock()
    out = WorkerLog(w, clock, in_io_thread=lambda: True)
    out(event("first"))
    out(event("store down", LogLevel.warn))
    assert pending(r).decode().splitlines() == [
        "1700000000.250000 [kumoauth.auth#info] first",
        "1700000000.250000 [kumoauth.auth#warn] store down",
    ]
    clock.advance(FLUSH_EVERY)  # the timer finds nothing left
    assert pending(r) == b""


def test_with_the_supervisor_gone_the_lines_go_to_stderr(pipe):
    # A worker left by a supervisor killed with SIGKILL finishes its
    # sessions; their AUTH and spooled lines were written into a closed
    # pipe and lost.
    r, w = os.pipe()
    os.close(r)  # the supervisor's end
    err_r, err_w = pipe
    clock = RunningClock()
    out = WorkerLog(w, clock, in_io_thread=lambda: True, orphan_fd=err_w)
    try:
        out(event("spooled 18ec from 192.0.2.7:5000"))
        out(event("store down\x1b[31m", LogLevel.warn))
        out(event("AUTH PLAIN success authc=scott", LogLevel.info))
        clock.advance(FLUSH_EVERY)
    finally:
        os.close(w)
    lines = pending(err_r).decode().splitlines()
    stamp = "2023-11-14T22:13:20"
    assert [line.split(" ", 1)[1] for line in lines] == [
        "[kumoauth#warn] the supervisor is gone: this worker's lines go to its standard error "
        "until it stops",
        "[kumoauth.auth#info] spooled 18ec from 192.0.2.7:5000",
        "[kumoauth.auth#warn] store down\\x1b[31m",
        "[kumoauth.auth#info] AUTH PLAIN success authc=scott",
    ]
    assert all(line.startswith(stamp) for line in lines[1:]), lines


@pytest.mark.parametrize(
    "running, io_thread", [(False, True), (True, False)], ids=["reactor not running", "a thread"]
)
def test_at_once_before_the_reactor_runs_and_from_other_threads(pipe, running, io_thread):
    r, w = pipe
    clock = Clock()
    clock.running = running  # type: ignore[attr-defined]
    out = WorkerLog(w, clock, in_io_thread=lambda: io_thread)
    out(event("now"))
    assert pending(r) == b"1700000000.250000 [kumoauth.auth#info] now\n"
    assert not clock.getDelayedCalls()


def test_flush_at_shutdown_writes_and_cancels_the_timer(pipe):
    r, w = pipe
    clock = RunningClock()
    out = WorkerLog(w, clock, in_io_thread=lambda: True)
    out(event("last words"))
    out.flush()
    assert pending(r).endswith(b"last words\n")
    assert not clock.getDelayedCalls()


def test_a_big_burst_is_written_without_waiting(pipe):
    r, w = pipe
    clock = RunningClock()
    out = WorkerLog(w, clock, in_io_thread=lambda: True)
    for i in range(1000):
        out(event(f"line {i} " + "x" * 40))
    assert len(pending(r)) >= FLUSH_AT


def test_a_traceback_stays_one_event_through_the_pipe():
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    e = event("bug handling a line", LogLevel.critical)
    e["log_failure"] = failure
    wire = worker_line(e).encode()
    assert wire.count(b"\n") == 1  # one line on the wire, whatever the event holds
    got: list[dict[str, Any]] = []
    reader = LineReader("[worker 0] ", got.append, Logger(namespace="kumoauth.workers"))
    half = wire.index(b"Traceback")
    reader.feed(wire[:half], time.time)  # a read may end anywhere
    reader.feed(wire[half:], time.time)
    assert len(got) == 1
    text = formatEventAsClassicLogText(got[0])
    assert text is not None
    assert "[worker 0] [kumoauth.auth#critical] bug handling a line\n\tTraceback" in text
    assert "ValueError: boom" in text and "\n\t\t" not in text


def test_the_supervisor_logs_a_line_with_the_workers_time():
    got: list[dict[str, Any]] = []
    reader = LineReader("[worker 1] ", got.append, Logger(namespace="kumoauth.workers"))
    reader.feed(worker_line(event("AUTH ok", when=1_600_000_000.5)).encode(), lambda: 5.0)
    reader.feed(b"Traceback written raw to stderr\n", lambda: 5.0)
    reader.feed(b"nan not a time\n", lambda: 5.0)
    reader.feed(b"3 errors\n", lambda: 5.0)
    assert [(e["log_time"], e["text"]) for e in got] == [
        (1_600_000_000.5, "[worker 1] [kumoauth.auth#info] AUTH ok"),
        (5.0, "[worker 1] (printed) Traceback written raw to stderr"),
        (5.0, "[worker 1] (printed) nan not a time"),
        (5.0, "[worker 1] (printed) 3 errors"),
    ]
    assert all(e["log_level"] == LogLevel.info for e in got)
    assert all(e["log_namespace"] == "kumoauth.workers" for e in got)


lines = st.lists(
    st.tuples(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
        st.sampled_from([LogLevel.info, LogLevel.warn]),
        st.floats(min_value=1e9, max_value=4e9),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(lines, st.data())
def test_reads_split_anywhere_give_the_same_events(events, data):
    wire = b"".join(worker_line(event(t, lvl, when)).encode() for t, lvl, when in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    got: list[dict[str, Any]] = []
    reader = LineReader("", got.append, Logger(namespace="kumoauth.workers"))
    last = 0
    for cut in [*cuts, len(wire)]:
        reader.feed(wire[last:cut], lambda: 0.0)
        last = cut
    # Whatever the text holds (line ends, backslashes, a forged time after
    # a line end), each event arrives whole, once, with its own time.
    want = [
        (float(f"{when:.6f}"), f"[kumoauth.auth#{lvl.name}] {t}".rstrip("\n"))
        for t, lvl, when in events
    ]
    assert [(e["log_time"], e["text"]) for e in got] == want


def test_a_line_logged_while_it_writes_waits_its_turn_and_nothing_deadlocks(pipe):
    """
    A signal handler or a garbage collection can log from inside the
    observer (while it writes, or while it arms its timer): the nested
    line is kept, after what was being written, and nothing blocks.
    """
    r, w = pipe

    class Nesting(RunningClock):
        def callLater(self, *args: Any, **kw: Any) -> Any:
            out(event("logged while arming"))
            return super().callLater(*args, **kw)

    clock = Nesting()
    out = WorkerLog(w, clock, in_io_thread=lambda: True)
    nested = []
    real_write = out._write

    def write(data: bytes) -> None:
        if not nested:
            nested.append(1)
            out(event("logged while writing", LogLevel.warn))
        real_write(data)

    out._write = write  # type: ignore[method-assign]
    out(event("first"))  # arms the timer, which logs
    clock.advance(FLUSH_EVERY)  # writes, which logs a warning
    assert [line.split(" ", 1)[1] for line in pending(r).decode().splitlines()] == [
        "[kumoauth.auth#info] first",
        "[kumoauth.auth#info] logged while arming",
        "[kumoauth.auth#warn] logged while writing",
    ]
    clock.advance(FLUSH_EVERY)
    assert pending(r) == b""
