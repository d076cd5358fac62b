"""
twistd's log, formatted faster (kumoauth.ops.logfile): the same lines as
twistd's own observer, byte for byte, written where twistd would write them.
"""

from __future__ import annotations

import io
import signal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application import service
from twisted.logger import ILogObserver, LogLevel, textFileLogObserver
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from kumoauth.ops.logfile import ApplicationLog, ClassicText, observer_for


def twistd_text(event: dict[str, Any]) -> str:
    out = io.StringIO()
    textFileLogObserver(out)(dict(event))
    return out.getvalue()


def ours(event: dict[str, Any], fmt: ClassicText | None = None) -> str:
    out = io.StringIO()
    from twisted.logger import FileLogObserver

    FileLogObserver(out, fmt or ClassicText())(dict(event))
    return out.getvalue()


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
times = st.floats(min_value=0, max_value=4e9) | st.integers(0, 4_000_000_000)


@settings(max_examples=300, deadline=None)
@given(
    text=texts,
    when=times,
    level=st.sampled_from(list(LogLevel.iterconstants())),
    namespace=st.sampled_from(["kumoauth", "kumoauth.auth", "kumoauth.workers", None]),
    extra=st.sampled_from([{}, {"log_system": "-"}, {"log_format": "{text} {n}", "n": 3}]),
)
def test_the_same_lines_as_twistds_own_observer(text, when, level, namespace, extra):
    event = {"log_format": "{text}", "text": text, "log_level": level, "log_time": when}
    if namespace is not None:
        event["log_namespace"] = namespace
    event.update(extra)
    assert ours(event) == shown(twistd_text(event))


def shown(line: str) -> str:
    """twistd's *line*, each character neither printable nor LF or tab escaped."""

    def code(n: int) -> str:
        return f"\\x{n:02x}" if n <= 0xFF else f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"

    return "".join(c if c.isprintable() or c in "\n\t" else code(ord(c)) for c in line)


def test_a_traceback_quoting_a_client_reaches_the_log_escaped():
    # The text of kumoauth's own events is escaped where it is made; an
    # exception's message (which may quote a client) and Twisted's own
    # events are not: the observer escapes what is left, lines kept.
    try:
        raise ValueError("bad name \x1b[31mred\x1b[0m\r\x85")
    except ValueError:
        failure = Failure()
    event = {
        "log_format": "policy handler {event} failed",
        "event": "smtp_server_mail_from",
        "log_level": LogLevel.critical,
        "log_namespace": "kumoauth",
        "log_time": 0.0,
        "log_failure": failure,
    }
    line = ours(event)
    assert "\\x1b[31mred\\x1b[0m\\x0d\\x85" in line
    assert all(c.isprintable() or c in "\n\t" for c in line)
    assert line.count("\n\t") == twistd_text(event).count("\n\t")  # the same lines
    worker = {
        "log_format": "{text}",
        "text": "[kumoauth#error] x\nValueError: \x1b",
        "log_level": LogLevel.error,
        "log_time": 0.0,
    }
    assert ours(worker).endswith("\n\tValueError: \\x1b\n")


def test_one_formatter_across_seconds_and_for_a_failure():
    fmt = ClassicText()
    base = {"log_format": "{text}", "log_level": LogLevel.info, "log_namespace": "kumoauth"}
    # Microseconds are rounded before the second is taken (as CPython's
    # datetime does): 1.9999995… is 00:00:02.
    for when in (
        1_700_000_000.1,
        1_700_000_000.9,
        1_700_000_001.0,
        1_700_000_000.5,
        1.9999995231628418,
        1_700_000_000.9999996,
        1_700_000_000.9999994,
    ):
        event = {**base, "text": "AUTH PLAIN success\nsecond line", "log_time": when}
        assert ours(event, fmt) == twistd_text(event)
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    event = {**base, "text": "bug", "log_time": 1_700_000_002.0, "log_failure": failure}
    assert ours(event, fmt) == twistd_text(event)
    assert "ValueError: boom" in ours(event, fmt)


class Options(dict):
    pass


def test_where_it_writes_follows_twistds_options(tmp_path, monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # not the test process's SIGUSR1
    assert observer_for(None) is None
    assert observer_for(Options(syslog=True, logfile="x")) is None
    assert observer_for(Options(logger="some.factory")) is None
    assert observer_for(Options(logfile="-", nodaemon=False)) is None  # twistd refuses it
    to_stdout = observer_for(Options(logfile="", nodaemon=True))
    assert to_stdout is not None and ILogObserver.providedBy(to_stdout)
    path = tmp_path / "kumoauth.log"
    to_file = observer_for(Options(logfile=str(path), nodaemon=True))
    assert to_file is not None
    to_file(
        {
            "log_format": "{text}",
            "text": "spooled x",
            "log_level": LogLevel.info,
            "log_namespace": "kumoauth.smtp",
            "log_time": 1_700_000_000.0,
        }
    )
    assert path.read_text().endswith(" [kumoauth.smtp#info] spooled x\n")
    assert isinstance(to_file._outFile, LogFile)  # twistd's rotating file


def test_twistds_application_gets_the_observer():
    class Top(ApplicationLog, service.MultiService):
        pass

    application = service.Application("kumoauth")
    top = Top()
    top.log_observer = observer_for(Options(logfile="", nodaemon=True))
    top.setServiceParent(application)
    assert application.getComponent(ILogObserver) is top.log_observer
    assert list(service.IServiceCollection(application)) == [top]
    plain = service.Application("other")
    Top().setServiceParent(plain)  # no observer offered: twistd chooses
    assert plain.getComponent(ILogObserver, None) is None


def test_a_served_log_is_twistds_file_in_twistds_format(tmp_path):
    """
    The server's log goes where ``--logfile`` says, in twistd's format.
    (SIGUSR1 re-opens it: tests/test_lifecycle_signals.py.)
    """
    import re

    from tests.server import make_certs, running_server
    from tests.test_e2e import POLICY, login, send, starttls_client

    certs = make_certs(tmp_path / "certs")
    with running_server(tmp_path / "srv", certs, POLICY) as srv:
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
            mid = send(s)
        stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
        assert re.search(stamp + r" \[kumoauth\.smtp#info\] spooled " + mid, srv.log())


_APPLICATION_OF = """
import sys
from twisted.application import service
from twisted.logger import ILogObserver
from kumoauth import tap

class Parent(dict):
    pass

options = tap.Options()
options.parseOptions(["--config", sys.argv[1]])
options.parent = Parent(logfile=sys.argv[2], nodaemon=True)
top = tap.makeService(options)
application = service.Application("kumoauth")
top.setServiceParent(application)  # as twistd does
observer = application.getComponent(ILogObserver, None)
print(type(top).__name__, observer is not None and observer is top.log_observer)
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_twistd_logs_through_our_observer_with_and_without_workers(tmp_path, workers):
    """
    Whatever ``makeService`` gives twistd offers it our observer: with
    workers too, where the supervisor writes every worker's lines (it was
    a plain MultiService there, and twistd's slower observer did the work).
    """
    import subprocess
    import sys
    from pathlib import Path

    from tests.server import free_port, make_certs, write_config
    from tests.test_e2e import POLICY

    certs = make_certs(tmp_path / "certs")
    config = write_config(
        tmp_path,
        certs,
        (free_port(), free_port(), free_port()),
        POLICY,
        server=f"workers = {workers}",
    )
    done = subprocess.run(
        [sys.executable, "-c", _APPLICATION_OF, str(config), str(tmp_path / "twistd.log")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "True", done.stdout + done.stderr


def test_one_write_gathers_this_threads_lines_into_one_write():
    """
    Inside one_write (the supervisor logging a worker's batch), this
    thread's lines reach the file in one write at the end, in order; a
    nested block does not write early; another thread's line is written at
    once.
    """
    import threading

    from kumoauth.ops.logfile import ClassicFileLogObserver, one_write

    class Out:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, text: str) -> None:
            self.writes.append(text)

        def flush(self) -> None:
            pass

    out = Out()
    observer = ClassicFileLogObserver(out, ClassicText())
    base = {"log_format": "{text}", "log_level": LogLevel.info, "log_namespace": "kumoauth"}

    def log(text: str) -> None:
        observer({**base, "text": text, "log_time": 1_700_000_000.0})

    log("before")
    assert len(out.writes) == 1
    with one_write():
        log("one")
        with one_write():
            log("two")
        other = threading.Thread(target=log, args=("elsewhere",))
        other.start()
        other.join()
        assert [w.split("] ")[1] for w in out.writes] == ["before\n", "elsewhere\n"]
    log("after")
    assert len(out.writes) == 4
    assert out.writes[2] == ours({**base, "text": "one", "log_time": 1_700_000_000.0}) + ours(
        {**base, "text": "two", "log_time": 1_700_000_000.0}
    )
    assert out.writes[3].endswith("] after\n")


def test_a_log_that_cannot_be_reopened_keeps_its_file_and_says_so_once(tmp_path, captured_log):
    from twisted.logger import formatEvent

    from kumoauth.ops.listening import ReopenableFile
    from kumoauth.ops.logfile import forget_reopen, on_reopen, reopen_logs

    logs = tmp_path / "logs"
    logs.mkdir()
    stream = ReopenableFile(logs / "events.jsonl")
    on_reopen(stream.reopen)
    try:
        stream.write("before\n")
        stream.flush()
        logs.rename(tmp_path / "moved")
        (tmp_path / "logs").write_text("")  # where the directory was: no re-open
        reopen_logs()
        stream.write("after\n")
        stream.flush()
    finally:
        forget_reopen(stream.reopen)
        stream.close()
    texts = [formatEvent(e) for e in captured_log.events]
    assert sum("cannot re-open" in t for t in texts) == 1, texts
    assert not any("re-opened" in t for t in texts), texts
    assert (tmp_path / "moved" / "events.jsonl").read_text() == "before\nafter\n"
