"""
The process lifecycle under traffic, against a real twistd: workers killed
in the middle of sessions, the supervisor killed, SIGHUP while stopping,
what a reload reports, and where the supervisor's own events are logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import eventsFromJSONLogFile, formatEvent

from tests.server import alive, children_of, make_certs, running_server
from tests.test_e2e import POLICY, login, send, starttls_client
from tests.test_workers import kill_worker, ready_count, two_workers, wait_for, worker_pids

pytestmark = pytest.mark.e2e

KUMOAUTH = str(Path(sys.executable).with_name("kumoauth"))


def queue_ids(srv) -> list[str]:
    """The queue as ``kumoauth spool list --json`` shows it (ids, with repeats)."""
    done = subprocess.run(
        [KUMOAUTH, "spool", "--config", str(srv.config), "list", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [json.loads(line)["id"] for line in done.stdout.splitlines()]


def log_count(srv, marker: str) -> int:
    return srv.log().count(marker)


def wait_log(srv, marker: str, count: int = 1, timeout: float = 15) -> None:
    wait_for(lambda: log_count(srv, marker) >= count, timeout=timeout)


class Traffic:
    """
    Clients sending messages on the plaintext listener, each message's
    data in two writes with a pause between them (so a kill often lands
    in DATA), until stopped.  Collects the ids a 250 named, and counts the
    messages in doubt: the final dot sent, the connection lost before the
    reply (stored or not; a real client sends those again).
    """

    def __init__(self, srv, clients: int = 4) -> None:
        self.srv = srv
        self.acked: list[str] = []
        self.in_doubt = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self.client) for _ in range(clients)]

    def client(self) -> None:
        while not self.stopped.is_set():
            dot_sent = False
            try:
                with smtplib.SMTP("127.0.0.1", self.srv.plain_port, timeout=20) as s:
                    s.ehlo("client.example")
                    for _ in range(5):
                        s.mail("a@example.com")
                        s.rcpt("b@example.net")
                        s.putcmd("data")
                        if s.getreply()[0] != 354:
                            break
                        s.send(b"Subject: t\r\n\r\n" + b"x" * 500)
                        time.sleep(0.01)
                        s.send(b"\r\n.\r\n")
                        dot_sent = True
                        code, reply = s.getreply()
                        dot_sent = False
                        if code == 250:
                            with self.lock:
                                self.acked.append(reply.decode().rsplit(" ", 1)[-1])
            except (OSError, smtplib.SMTPException):
                if dot_sent:
                    with self.lock:
                        self.in_doubt += 1
                time.sleep(0.05)  # killed under us: a new connection

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(60)

    def wait_for_more(self, n: int = 20) -> None:
        start = len(self.acked)
        wait_for(lambda: len(self.acked) >= start + n, timeout=30)


def test_workers_killed_under_traffic_lose_nothing_acknowledged(tmp_path, certs):
    with two_workers(tmp_path / "srv", certs) as srv:
        with Traffic(srv) as traffic:
            traffic.wait_for_more()
            kill_worker(srv, 0)
            traffic.wait_for_more()
            kill_worker(srv, 1)
            traffic.wait_for_more()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0
        ids = queue_ids(srv)
        # Every 250 is in the queue, once; anything else is a message whose
        # reply the kill cut off after it was durable (RFC 5321 §6.1: a
        # duplicate on the client's retry rather than a loss).
        assert len(ids) == len(set(ids))
        assert len(traffic.acked) == len(set(traffic.acked))
        assert set(traffic.acked) <= set(ids)
        assert len(set(ids) - set(traffic.acked)) <= traffic.in_doubt
        # One line per death, no storm.
        log = srv.log()
        assert log.count(" died: ") == 2, log
        assert "Traceback" not in log


def half_sent(srv, subject: str) -> smtplib.SMTP:
    """A logged-in session in the middle of DATA: the first half sent."""
    s = starttls_client(srv)
    assert login(s, "PLAIN", "scott", "tiger")[0] == 235
    s.mail("scott@example.com")
    s.rcpt("b@example.net")
    s.putcmd("data")
    assert s.getreply()[0] == 354
    s.send(f"Subject: {subject}\r\n\r\nfirst half\r\n".encode())
    return s


def test_a_killed_supervisor_takes_its_workers_along(tmp_path, certs):
    with two_workers(tmp_path / "srv", certs) as srv:
        workers = children_of(srv.proc.pid)
        assert len(workers) == 2
        s = half_sent(srv, "orphan")
        srv.kill()
        # The worker drains as on SIGTERM: the message in DATA is accepted.
        s.send(b"second half\r\n.\r\n")
        code, reply = s.getreply()
        assert code == 250, reply
        assert s.getreply()[0] == 421
        mid = reply.decode().rsplit(" ", 1)[-1]
        wait_for(lambda: not any(alive(pid) for pid in workers))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.plain_port), timeout=2)
        assert queue_ids(srv) == [mid]


def test_sighup_while_draining_is_not_applied(tmp_path, certs):
    journal = tmp_path / "journal"
    table = f'[auth.journal_checker]\njournal = "{journal}"\nusers = {{ scott = "tiger" }}\n'
    auth = 'checker = "tests.checkers:journal_checker"'
    with running_server(
        tmp_path / "srv", certs, POLICY, auth=auth, extra=table, server="shutdown_grace = 10"
    ) as srv:
        s = half_sent(srv, "late")
        # The next generation has no checker: a reload would stop this one.
        srv.config.write_text(srv.config.read_text().replace(auth, "").replace(table, ""))
        srv.proc.send_signal(signal.SIGTERM)
        wait_log(srv, "stopping: 1 sessions")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload" in srv.log().split("stopping: 1 sessions", 1)[1])
        s.send(b"second half\r\n.\r\n")
        code, reply = s.getreply()
        assert code == 250, reply
        assert srv.proc.wait(20) == 0
        assert "reload not applied: the server is stopping" in srv.log()
        assert "reloaded configuration" not in srv.log()
        # Started once, stopped once.
        assert journal.read_text().splitlines() == ["start", "stop"]


def test_what_needs_a_restart_is_reported_against_the_start_up_value(tmp_path, certs):
    with running_server(tmp_path / "srv", certs, POLICY) as srv:
        original = srv.config.read_text()
        warning = "[spool] path changed: it needs a restart"
        srv.config.write_text(original.replace('path = "spool"', 'path = "elsewhere"'))
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, "reloaded configuration")
        assert log_count(srv, warning) == 1
        # Still not what runs: said again.
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, "reloaded configuration", 2)
        assert log_count(srv, warning) == 2
        # Back to what runs: nothing to say.
        srv.config.write_text(original)
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, "reloaded configuration", 3)
        assert log_count(srv, warning) == 2
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
            mid = send(s)
        assert queue_ids(srv) == [mid]


def test_the_supervisors_events_reach_the_json_log(tmp_path, certs):
    events_path = tmp_path / "events.jsonl"
    with two_workers(tmp_path / "srv", certs, extra=f'[log]\njson_path = "{events_path}"') as srv:
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
            send(s)
        policy = srv.directory / "policy.py"
        good = policy.read_text()
        policy.write_text("def broken(:\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, "reload failed, configuration unchanged")
        policy.write_text(good)
        kill_worker(srv, 0)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0
    with open(events_path, encoding="utf-8") as f:
        texts = [formatEvent(e) for e in eventsFromJSONLogFile(f)]
    # The supervisor's: the failed reload (which no counter shows) and the
    # worker that died.
    failed = [t for t in texts if t.startswith("reload failed, configuration unchanged")]
    assert len(failed) == 1 and "policy.py:1: syntax error" in failed[0], texts
    assert sum(" died: " in t for t in texts) == 1, texts
    # A worker's event once (its own, with its fields), not again as the
    # supervisor's copy of its line.
    assert sum(t.startswith("AUTH PLAIN success") for t in texts) == 1, texts
    assert not any(t.startswith("[worker") for t in texts), texts


def test_a_restarted_worker_runs_the_generation_the_supervisor_validated(tmp_path):
    # The files on disk are being edited (no SIGHUP yet) when both workers
    # die: the policy already says something else, the key and certificate
    # are half written.  Their successors run what was validated, like the
    # workers still up would: same policy, same key, same certificate.
    certs = make_certs(tmp_path / "certs")
    with two_workers(tmp_path / "srv", certs) as srv:
        policy = srv.directory / "policy.py"
        policy.write_text(POLICY.replace('"scott": "tiger"', '"scott": "lion"'))
        key, chain = certs.key.read_bytes(), certs.chain.read_bytes()
        certs.key.write_bytes(key[: len(key) // 2])
        certs.chain.write_bytes(chain[: len(chain) // 2])
        for index in (0, 1):
            kill_worker(srv, index)
        with starttls_client(srv) as s:  # verifies the certificate
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        assert "worker cannot start" not in srv.log()
        # The edit finished: a SIGHUP makes it the generation, in every worker.
        certs.key.write_bytes(key)
        certs.chain.write_bytes(chain)
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, "running configuration generation 2", count=2)
        with starttls_client(srv) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                login(s, "PLAIN", "scott", "tiger")
            assert refused.value.smtp_code == 535
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "lion")[0] == 235
        assert "Traceback" not in srv.log()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0


FP_KEY = 'fingerprint_key_file = "fp.key"'


@contextlib.contextmanager
def keyed_workers(tmp_path: Path, certs: Any) -> Iterator[Any]:
    """
    Two workers whose throttle has a fingerprint key file (``fp.key``);
    after the block, they still serve and none ever failed to start.
    """
    where = tmp_path / "srv"
    where.mkdir()
    (where / "fp.key").write_bytes(os.urandom(32))
    with two_workers(where, certs, throttle=FP_KEY) as srv:
        yield srv
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        assert "worker cannot start" not in srv.log()


def test_a_worker_restarted_after_its_start_up_files_are_gone_still_starts(tmp_path, certs):
    # Generation 1 named a fingerprint key file; generation 2 does not, and
    # the file is deleted.  A worker restarted now reads the start-up text
    # only for what needs a restart: the file it named must not matter.
    with keyed_workers(tmp_path, certs) as srv:
        srv.config.write_text(srv.config.read_text().replace(FP_KEY, ""))
        (srv.directory / "fp.key").unlink()
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, "running configuration generation 2", count=2)
        kill_worker(srv, 0)
        kill_worker(srv, 1)


def test_a_worker_restarted_during_a_key_rotation_keeps_the_validated_key(tmp_path, certs):
    # The fingerprint key file is being rewritten (no SIGHUP yet) when a
    # worker dies: its successor uses the key every other worker uses.
    with keyed_workers(tmp_path, certs) as srv:
        (srv.directory / "fp.key").write_bytes(b"half")
        kill_worker(srv, 0)


def test_a_worker_that_cannot_start_says_why_in_one_line(tmp_path, certs):
    # A store's own file (the sender map) is broken on disk when a worker
    # dies: its successor cannot build the generation.  One line, retried.
    where = tmp_path / "srv"
    where.mkdir()
    good = "scott@example.com scott\n"
    (where / "senders").write_text(good)
    extra = '[sender_binding]\nsource = "map"\nmap = "senders"\n'
    with two_workers(where, certs, extra=extra) as srv:
        (where / "senders").write_text(good + "not-an-address\n")
        os.kill(worker_pids(srv)[0], signal.SIGKILL)
        wait_log(srv, "worker cannot start")
        lines = [line for line in srv.log().splitlines() if "worker cannot start" in line]
        assert "senders line 2" in lines[0], lines
        assert "Traceback" not in srv.log()
        with starttls_client(srv) as s:  # the other worker serves meanwhile
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        (where / "senders").write_text(good)
        wait_for(lambda: ready_count(srv) == 3, timeout=30)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_relay_added_by_a_reload_says_it_needs_a_restart(tmp_path, certs, workers):
    with running_server(tmp_path / "srv", certs, POLICY, server=f"workers = {workers}") as srv:
        if workers > 1:
            wait_for(lambda: ready_count(srv) == workers)
        relay = '\n[relay]\nhost = "127.0.0.1"\nport = 2525\ntls = "none"\nidentity = "none"\n'
        srv.config.write_text(srv.config.read_text() + relay)
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, "[relay] added or removed: it needs a restart")
        assert "Traceback" not in srv.log()


def test_a_worker_sent_sighup_re_applies_the_validated_files(tmp_path, certs):
    # A SIGHUP to one worker directly: its generation again, as validated,
    # not the policy file edited since.
    with two_workers(tmp_path / "srv", certs) as srv:
        policy = srv.directory / "policy.py"
        policy.write_text("def broken(:\n")
        for pid in worker_pids(srv).values():
            os.kill(pid, signal.SIGHUP)
        wait_log(srv, "reloaded configuration", count=2)
        assert "reload failed" not in srv.log()
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235


_EARLY_SIGNAL = """
import os, signal, sys
from twisted.internet import reactor
from kumoauth.ops.listening import install_signals

hups, timer = [], []
install_signals(reactor, lambda: hups.append(1))
# Listeners are bound, the reactor does not run yet: twistd's own moment.
os.kill(os.getpid(), signal.{name})

def give_up():
    timer.append(1)
    reactor.stop()

reactor.callLater(3, give_up)  # what ends the run when no signal does
reactor.run()
print("timer" if timer else "signal", len(hups))
"""


@pytest.mark.parametrize(("name", "expected"), [("SIGTERM", "signal 0"), ("SIGHUP", "timer 1")])
def test_a_signal_before_the_reactor_runs_does_not_kill_the_process(name, expected):
    # SIGTERM between binding the listeners and the reactor running (when
    # systemd stops a service that just started) stops the server as soon
    # as it runs, exit 0; SIGHUP then is a reload, not the default
    # action's death.
    done = subprocess.run(
        [sys.executable, "-c", _EARLY_SIGNAL.format(name=name)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == expected


@pytest.mark.parametrize("workers", [False, True], ids=["one process", "two workers"])
def test_sigusr1_reopens_the_logs_logrotate_moved(tmp_path, workers):
    """
    logrotate moves the text and JSON logs, then ``kill -USR1`` (its
    postrotate): each file is opened again under its name, the workers'
    JSON log too, and nothing more goes to the moved ones.  SIGUSR1's
    default action ended the process; twistd's own handler renamed the
    text log to .1 and never re-opened the JSON log (fail2ban's input).
    """
    certs = make_certs(tmp_path / "certs")
    events = tmp_path / "events.jsonl"
    extra = f'[log]\njson_path = "{events}"'
    directory = tmp_path / "srv"
    server = (
        two_workers(directory, certs, extra=extra)
        if workers
        else running_server(directory, certs, POLICY, extra=extra)
    )
    with server as srv:
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        # the worker's lines reach the supervisor's log every 50 ms
        wait_for(lambda: "AUTH PLAIN success" in srv.log())
        srv.logfile.rename(srv.logfile.with_suffix(".log.1"))
        events.rename(events.with_suffix(".jsonl.1"))
        srv.proc.send_signal(signal.SIGUSR1)
        wanted = 3 if workers else 1  # the supervisor's and each worker's line
        wait_for(lambda: srv.log().count("log files re-opened") == wanted)
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        wait_for(lambda: "AUTH PLAIN success" in srv.log())
        assert srv.proc.poll() is None
        srv.stop()
    assert srv.proc.returncode == 0

    def successes(path: Path) -> int:
        with open(path, encoding="utf-8") as f:
            return sum(
                formatEvent(e).startswith("AUTH PLAIN success") for e in eventsFromJSONLogFile(f)
            )

    assert successes(events.with_suffix(".jsonl.1")) == 1
    assert successes(events) == 1
    assert srv.logfile.with_suffix(".log.1").read_text().count("AUTH PLAIN success") == 1
    assert srv.log().count("AUTH PLAIN success") == 1


def test_a_worker_starting_when_logrotate_signals_reopens_once_ready(tmp_path):
    """
    A worker (re)started just before logrotate's SIGUSR1 had opened the JSON
    log under its old name and ignored the signal while it started: it
    wrote to the rotated file until the next rotation.  It re-opens once
    ready.
    """
    certs = make_certs(tmp_path / "certs")
    events = tmp_path / "events.jsonl"
    with two_workers(tmp_path / "srv", certs, extra=f'[log]\njson_path = "{events}"') as srv:
        old = worker_pids(srv)[0]
        ready = ready_count(srv)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: worker_pids(srv)[0] != old, timeout=30)
        new = worker_pids(srv)[0]

        def json_logs() -> list[str]:
            links = []
            for fd in os.listdir(f"/proc/{new}/fd"):
                with contextlib.suppress(OSError):
                    links.append(os.readlink(f"/proc/{new}/fd/{fd}"))
            return [link for link in links if "events.jsonl" in link]

        wait_for(lambda: bool(json_logs()), timeout=30)  # opened, under its old name
        events.rename(events.with_suffix(".jsonl.1"))
        srv.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: ready_count(srv) > ready, timeout=30)
        wait_for(lambda: json_logs() == [str(events)], timeout=10)


def test_sigusr1_and_sighup_while_twistd_starts_kumoauth_do_not_end_it():
    """
    From the moment twistd makes kumoauth's options (before the
    configuration is read) until the service's handlers: a SIGUSR1 from
    logrotate (systemd's MainPID postrotate comes at any moment) or a
    SIGHUP ended the process, their default action.
    """
    from kumoauth import tap

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        tap.Options()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)  # delivered (this process is still here)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
