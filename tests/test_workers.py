"""
[server] workers = N against a real twistd: shared sockets, every worker
serving, a killed worker replaced, SIGHUP and SIGTERM forwarded, metrics
summed over workers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from kumoauth.config import parse
from kumoauth.ops.assembly import GenerationFiles
from kumoauth.ops.workers import (
    RESTART_MIN,
    RESTART_RESET_AFTER,
    Inherited,
    Netstrings,
    Supervisor,
    WorkerProcess,
    encode,
    read_message,
    worker_config,
)
from kumoauth.relay.queue import QueueStore, decode_records
from kumoauth.storage.spool import Spool
from tests.server import (
    Server,
    free_port,
    make_certs,
    running_server,
    wait_for_port,
    write_config,
)
from tests.test_e2e import POLICY, implicit_client, login, send, starttls_client
from tests.test_upgrade import v1_pair

pytestmark = pytest.mark.e2e


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(x) for x in path.read_text().split()}


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def one_session(srv) -> str:
    with starttls_client(srv) as s:
        assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        return send(s)


def test_two_workers(tmp_path):
    certs = make_certs(tmp_path / "certs")
    mport = free_port()
    with running_server(
        tmp_path / "srv",
        certs,
        POLICY,
        server="workers = 2\nshutdown_grace = 5",
        extra=f'[metrics]\nendpoint = "tcp:{mport}:interface=127.0.0.1"',
    ) as srv:
        workers = wait_for(lambda: len(children(srv.proc.pid)) == 2 and children(srv.proc.pid))
        # Both serve once their reactors run (after the heap settles).
        settled = r"\[worker (\d)\] \[kumoauth#info\] start-up heap settled"
        wait_for(lambda: len(re.findall(settled, srv.log())) == 2)
        # Concurrent sessions: all served, by both workers.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: one_session(srv), range(40)))
        assert len(set(ids)) == 40
        assert {m for m in Spool(srv.spool).ids()} == set(ids)
        log = srv.log()
        served = set(re.findall(r"\[worker (\d)\] \[kumoauth\.auth#info\] AUTH PLAIN success", log))
        assert served == {"0", "1"}
        assert sorted(re.findall(settled, log)) == ["0", "1"]
        # Metrics cover both workers.
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        )
        assert 'kumoauth_auth_attempts_total{mechanism="PLAIN",result="success"} 40.0' in text
        # A killed worker is replaced, and service goes on.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        new = wait_for(
            lambda: (
                len(children(srv.proc.pid)) == 2
                and victim not in children(srv.proc.pid)
                and children(srv.proc.pid)
            )
        )
        assert victim not in new
        assert "died" in srv.log() and "restarting" in srv.log()
        for _ in range(6):
            one_session(srv)
        # SIGHUP reaches the workers.
        (srv.directory / "policy.py").write_text(
            POLICY.replace('"scott": "tiger"', '"scott": "lion"')
        )
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: srv.log().count("reloaded configuration") >= 2)
        for _ in range(4):
            with starttls_client(srv) as s:
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    login(s, "PLAIN", "scott", "tiger")
        # SIGTERM drains every worker and exits 0.
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in new)
        # A worker that stopped cleanly cut its segment back to its last
        # record; the killed one left its zeros, which recovery cuts.
        segs = sorted((srv.spool / "seg").glob("*.q"))
        tails = [p.stat().st_size - decode_records(p.read_bytes())[1] for p in segs]
        assert len(segs) >= 2 and sum(t > 0 for t in tails) == 1, tails
        store = QueueStore.open(srv.spool)
        assert set(ids) <= set(store.ids())
        store.close()
        assert all(p.stat().st_size == decode_records(p.read_bytes())[1] for p in segs)


# --- configuration generations ----------------------------------------------------


def worker_pids(srv) -> dict[int, int]:
    """Worker index -> pid of its latest process, from the supervisor's log."""
    found = re.findall(r"worker (\d+) started \(pid (\d+)\)", srv.log())
    return {int(index): int(pid) for index, pid in found}


@contextlib.contextmanager
def two_workers(directory: Path, certs: Any, **kw: Any) -> Iterator[Any]:
    """A real twistd (the e2e POLICY) with two workers, once both are ready."""
    server = "workers = 2\nshutdown_grace = 5"
    with running_server(directory, certs, POLICY, server=server, **kw) as srv:
        wait_for(lambda: ready_count(srv) == 2)
        yield srv


def ready_count(srv) -> int:
    return srv.log().count("worker ready")


def kill_worker(srv, index: int) -> int:
    """SIGKILL worker *index*; wait for its successor to be ready; its pid."""
    pid = worker_pids(srv)[index]
    ready = ready_count(srv)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: ready_count(srv) > ready and worker_pids(srv)[index] != pid, timeout=30)
    return worker_pids(srv)[index]


def implicit_session(srv) -> str:
    with implicit_client(srv) as s:
        assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        return send(s)


def test_a_worker_left_by_a_killed_supervisor_still_logs_its_sessions(tmp_path):
    # Its lines went into the supervisor's pipe, closed: a message taken
    # with 250 had no "spooled" line anywhere (an audit and fail2ban gap).
    with two_workers(tmp_path / "srv", make_certs(tmp_path / "certs")) as srv:
        workers = list(worker_pids(srv).values())
        try:
            with implicit_client(srv) as s:
                assert login(s, "PLAIN", "scott", "tiger")[0] == 235
                s.mail("scott@example.com")
                s.rcpt("b@example.net")
                assert s.docmd("DATA")[0] == 354
                os.kill(srv.proc.pid, signal.SIGKILL)
                srv.proc.wait(timeout=10)
                s.send(b"Subject: orphan\r\n\r\nhello\r\n.\r\n")
                code, reply = s.getreply()
                assert code == 250, reply
                mid = reply.decode().rsplit(" ", 1)[-1]
                s.close()  # the draining worker would answer QUIT with 421
            err = srv.directory / "stderr.txt"
            wait_for(lambda: f"spooled {mid}" in err.read_text(errors="replace"))
            text = err.read_text(errors="replace")
            assert "the supervisor is gone: this worker's lines go to its standard error" in text
            assert "Traceback" not in text
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            srv.proc = None  # already gone


def test_restarted_worker_runs_the_supervisors_configuration(tmp_path):
    with two_workers(tmp_path / "srv", make_certs(tmp_path / "certs")) as srv:
        # The file changes but nobody says SIGHUP: the STARTTLS and implicit
        # listeners swap their tls, the spool moves.
        original = srv.config.read_text()
        edited = (
            original.replace('tls = "starttls"', 'tls = "@"')
            .replace('tls = "implicit"', 'tls = "starttls"')
            .replace('tls = "@"', 'tls = "implicit"')
            .replace('path = "spool"', 'path = "elsewhere"')
        )
        assert edited != original
        srv.config.write_text(edited)
        # A restarted worker still runs what the supervisor runs.
        kill_worker(srv, 0)
        ids = [one_session(srv) for _ in range(16)] + [implicit_session(srv) for _ in range(8)]
        assert set(Spool(srv.spool).ids()) >= set(ids)
        assert not (srv.directory / "elsewhere").exists()
        assert "worker 0 (pid" in srv.log() and "restarting in 1s" in srv.log()

        # Now SIGHUP: generation 2 has the swapped listeners and the new
        # spool, which need a restart.  A worker restarted now serves each
        # socket with the listener it was bound for, and the same spool.
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: srv.log().count("running configuration generation 2") == 2)
        kill_worker(srv, 0)
        # Dying again soon after: a longer wait.
        assert "restarting in 2s" in srv.log()
        restarted = srv.log().rsplit("worker 0 started", 1)[1]
        assert "(configuration generation 2)" in restarted
        assert (
            f"listener tcp:{srv.implicit_port}:interface=127.0.0.1 (starttls) is new" in restarted
        )
        assert "was removed or changed: it stays until a restart" in restarted
        ids = [one_session(srv) for _ in range(16)] + [implicit_session(srv) for _ in range(8)]
        assert set(Spool(srv.spool).ids()) >= set(ids)
        assert not (srv.directory / "elsewhere").exists()

        # A broken file on SIGHUP: one line from the supervisor, no worker
        # sees it, and a worker restarted afterwards starts fine.
        srv.config.write_text(original + "\n[server]\nbroken = \n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed, configuration unchanged" in srv.log())
        failures = [line for line in srv.log().splitlines() if "reload failed" in line]
        assert len(failures) == 1 and "[worker" not in failures[0], failures
        kill_worker(srv, 1)
        for _ in range(6):
            one_session(srv)
        assert "[worker 1] [kumoauth#critical]" not in srv.log()

        # A good file on SIGHUP: generation 3 in every worker.
        srv.config.write_text(original)
        (srv.directory / "policy.py").write_text(
            POLICY.replace('"scott": "tiger"', '"scott": "lion"')
        )
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: srv.log().count("running configuration generation 3") == 2)
        assert "configuration generation 3 from" in srv.log()
        for _ in range(4):
            with starttls_client(srv) as s:
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    login(s, "PLAIN", "scott", "tiger")
        # ... and in a worker started after it.
        kill_worker(srv, 1)
        assert "(configuration generation 3)" in srv.log().rsplit("worker 1 started", 1)[1]
        for _ in range(4):
            with starttls_client(srv) as s:
                assert login(s, "PLAIN", "scott", "lion")[0] == 235
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0
        assert "supervisor is gone" not in srv.log()


def test_metric_files_per_worker_index(tmp_path):
    mport = free_port()
    with two_workers(
        tmp_path / "srv",
        make_certs(tmp_path / "certs"),
        extra=f'[metrics]\nendpoint = "tcp:{mport}:interface=127.0.0.1"',
    ) as srv:

        def successes() -> float:
            url = f"http://127.0.0.1:{mport}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            pattern = r'kumoauth_auth_attempts_total\{mechanism="PLAIN",result="success"\} (\S+)'
            match = re.search(pattern, text)
            return float(match.group(1)) if match else 0.0

        for _ in range(6):
            one_session(srv)
        assert successes() == 6
        pid = worker_pids(srv)[0]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        directory = Path(
            next(e for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
            .split(b"=", 1)[1]
            .decode()
        )
        kill_worker(srv, 0)
        kill_worker(srv, 0)
        # Counters carry on over restarts, and no file per process id.
        assert successes() == 6
        one_session(srv)
        assert successes() == 7
        names = sorted(p.name for p in directory.iterdir())
        # Per worker index, and the supervisor's own (queue and relay metrics).
        assert names and all(re.fullmatch(r"\w+_(w[01]|sup)\.db", n) for n in names), names
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0
        assert not directory.exists()


#: An interpreter user nobody can run, with kumoauth installed: .ci/run makes
#: one outside /root (whose 0700 hides the usual one from nobody).
UID_PYTHON = os.environ.get("KUMOAUTH_UID_PYTHON", sys.executable)
UID_TWISTD = [UID_PYTHON, "-c", "from twisted.scripts.twistd import run; run()"]


def nobody_runs_python() -> bool:
    """Root, and nobody can run this interpreter (not one under a 0700 /root)."""
    if os.geteuid() != 0:
        return False
    probe = [UID_PYTHON, "-c", "import kumoauth.ops.workers"]
    try:
        done = subprocess.run(probe, user="nobody", group="nogroup", cwd="/", capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


NOBODY_RUNS_PYTHON = nobody_runs_python()

# In CI (root, and .ci/run provides the interpreter) these must run, not skip.
needs_nobody = pytest.mark.skipif(
    not NOBODY_RUNS_PYTHON and not os.environ.get("CI"),
    reason="needs root, and an interpreter user nobody can run (KUMOAUTH_UID_PYTHON)",
)


@contextlib.contextmanager
def nobodys_directory() -> Iterator[tuple[Path, Any]]:
    """
    A directory user nobody can reach (pytest's tmp_path tree is 0700):
    certificates nobody can read, an empty ``srv`` for the server; removed
    after.
    """
    if not NOBODY_RUNS_PYTHON:  # CI, where it must run: say why it cannot, at once
        pytest.fail(f"user nobody cannot import kumoauth with {UID_PYTHON} (KUMOAUTH_UID_PYTHON)")
    top = Path(tempfile.mkdtemp(prefix="kumoauth-uid-"))
    try:
        top.chmod(0o755)
        certs = make_certs(top / "certs")
        for p in (top / "certs", certs.chain, certs.key):
            p.chmod(0o755 if p.is_dir() else 0o644)
        (top / "srv").mkdir(mode=0o755)
        yield top, certs
    finally:
        shutil.rmtree(top, ignore_errors=True)


@needs_nobody
def test_uid_gid_workers(tmp_path):
    # nobody must read the configuration, policy, certificate and key.
    with nobodys_directory() as (top, certs):
        directory = top / "srv"
        ports = (free_port(), free_port(), free_port())
        mport = free_port()
        config = write_config(
            directory,
            certs,
            ports,
            POLICY,
            server="workers = 2\nshutdown_grace = 5",
            extra=f'[metrics]\nendpoint = "tcp:{mport}:interface=127.0.0.1"',
        )
        config.write_text(config.read_text().replace('path = "spool"', 'path = "new/spool"'))
        logfile = directory / "twistd.log"
        with open(directory / "stderr.txt", "ab") as stderr:
            proc = subprocess.Popen(
                [
                    *UID_TWISTD,
                    "-n",
                    "--pidfile=",
                    f"--logfile={logfile}",
                    "--uid=nobody",
                    "--gid=nogroup",
                    "kumoauth",
                    "--config",
                    str(config),
                ],
                cwd=directory,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        srv = Server(proc, directory, config, *ports, certs=certs)
        try:
            for port in srv.ports:
                wait_for_port(port, proc, logfile)
            wait_for(lambda: ready_count(srv) == 2)
            nobody = pwd.getpwnam("nobody").pw_uid
            nogroup = grp.getgrnam("nogroup").gr_gid
            assert {Path(f"/proc/{pid}").stat().st_uid for pid in children(proc.pid)} == {nobody}
            mid = one_session(srv)
            spool = directory / "new" / "spool"
            assert Spool(spool).read(mid) is not None
            # The queue: its directory, lock, journal, segment directory and
            # the segment the worker wrote the message to.
            owned = [spool.parent, spool, *spool.rglob("*")]
            assert {p.name for p in owned} >= {"lock", "seg"}
            assert any(p.suffix == ".q" for p in owned)
            for p in owned:
                assert (p.stat().st_uid, p.stat().st_gid) == (nobody, nogroup), p
            metrics_dir = Path(
                next(
                    e
                    for e in Path(f"/proc/{worker_pids(srv)[0]}/environ").read_bytes().split(b"\0")
                    if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
                )
                .split(b"=", 1)[1]
                .decode()
            )
            for p in [metrics_dir, *metrics_dir.iterdir()]:
                assert p.stat().st_uid == nobody, p
            url = f"http://127.0.0.1:{mport}/metrics"
            assert "kumoauth_messages_spooled_total 1.0" in (
                urllib.request.urlopen(url, timeout=5).read().decode()
            )
            assert "died" not in srv.log(), srv.log()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            srv.stop()


@needs_nobody
def test_single_process_uid_gid_spool(tmp_path):
    """The single-process path: a spool created as root is the runtime user's."""
    with nobodys_directory() as (top, certs):
        directory = top / "srv"
        ports = (free_port(), free_port(), free_port())
        config = write_config(directory, certs, ports, POLICY)
        # kumoauth 0.1 left a message there (as root): the import at start,
        # as root too, must leave the segment it writes to nobody.
        old = "18ecec3b873661d1fd3f2023"
        v1_pair(directory / "spool", old, ["b@example.net"], b"Subject: 0.1\r\n\r\nold\r\n")
        logfile = directory / "twistd.log"
        proc = subprocess.Popen(
            [*UID_TWISTD, "-n", "--pidfile=", f"--logfile={logfile}", "--uid=nobody"]
            + ["kumoauth", "--config", str(config)],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        srv = Server(proc, directory, config, *ports, certs=certs)
        try:
            for port in srv.ports:
                wait_for_port(port, proc, logfile)
            mid = one_session(srv)
            nobody = pwd.getpwnam("nobody")
            assert Spool(srv.spool).read(mid) is not None
            assert Spool(srv.spool).read(old) is not None
            owned = [srv.spool, *srv.spool.rglob("*")]
            assert any(p.suffix == ".q" for p in owned)
            for p in owned:
                assert (p.stat().st_uid, p.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid), p
        finally:
            srv.stop()


# --- the supervisor's bookkeeping, on a fake reactor ---------------------------


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.failures = 0
        self.spawned: list[tuple[WorkerProcess, FakeTransport]] = []

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None):
        if self.failures:
            self.failures -= 1
            raise OSError(24, "Too many open files")
        transport = FakeTransport(1000 + len(self.spawned))
        proto.makeConnection(transport)
        self.spawned.append((proto, transport))
        return transport


def fake_supervisor(tmp_path, workers: int = 1) -> tuple[Supervisor, FakeReactor]:
    text = f"""
[server]
workers = {workers}
shutdown_grace = 1
[[listener]]
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
auth_required = false
[spool]
path = "spool"
"""
    path = tmp_path / "kumoauth.toml"
    path.write_text(text)
    reactor = FakeReactor()
    return Supervisor(parse(text, path), reactor, [], text=text), reactor


def died(supervisor: Supervisor, worker: WorkerProcess) -> None:
    worker.processEnded(Failure(ProcessTerminated(signal=9)))


def test_failed_spawn_is_not_a_worker(tmp_path):
    supervisor, reactor = fake_supervisor(tmp_path)
    reactor.failures = 1
    supervisor.spawn(0)
    assert supervisor.workers == {}
    assert [c.getTime() for c in reactor.getDelayedCalls()] == [1.0]
    # Retried after the backoff.
    reactor.advance(1.0)
    assert list(supervisor.workers) == [0]
    message = Netstrings().feed(reactor.spawned[0][1].written[0])[0]
    assert message["type"] == "start" and message["generation"] == 1
    assert message["text"] == supervisor.text
    # A stop with a spawn that failed does not wait for it.
    reactor.failures = 1
    died(supervisor, supervisor.workers[0])
    reactor.advance(2.0)
    assert supervisor.workers == {}
    done = []
    supervisor.stopService().addCallback(done.append)
    assert done == [None]
    assert reactor.getDelayedCalls() == []


def test_restart_backoff(tmp_path):
    supervisor, reactor = fake_supervisor(tmp_path)
    supervisor.spawn(0)
    delays = []
    for _ in range(9):
        died(supervisor, supervisor.workers[0])
        (call,) = reactor.getDelayedCalls()
        delays.append(call.getTime() - reactor.seconds())
        reactor.advance(delays[-1])
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    # Up for a while: back to one second.
    reactor.advance(RESTART_RESET_AFTER)
    died(supervisor, supervisor.workers[0])
    (call,) = reactor.getDelayedCalls()
    assert call.getTime() - reactor.seconds() == RESTART_MIN
    supervisor.stopService()


def test_worker_config_matches_sockets_by_endpoint_and_tls():
    boot = parse(
        """
[[listener]]
endpoint = "tcp:1"
tls = "none"
auth_required = false
[[listener]]
endpoint = "tcp:2"
tls = "none"
auth_required = false
meta = { name = "old" }
[spool]
path = "/a"
[auth]
threads = 3
""",
        "/etc/k.toml",
    )
    current = parse(
        """
[[listener]]
endpoint = "tcp:3"
tls = "none"
auth_required = false
[[listener]]
endpoint = "tcp:2"
tls = "none"
auth_required = false
meta = { name = "new" }
[[listener]]
endpoint = "tcp:1"
tls = "none"
allow_plaintext_auth = true
[spool]
path = "/b"
[auth]
threads = 4
max_in_flight = 7
""",
        "/etc/k.toml",
    )
    sockets = [Inherited("tcp:1", "none", 4, 2), Inherited("tcp:2", "none", 5, 2)]
    cfg, adopt, warnings = worker_config(boot, current, sockets)
    assert [(li.endpoint, li.meta) for li in cfg.listeners] == [
        ("tcp:1", {}),
        ("tcp:2", {"name": "new"}),
    ]
    assert cfg.listeners[0].allow_plaintext_auth  # unchanged (endpoint, tls): the new one
    assert adopt == {0: (4, 2), 1: (5, 2)}
    assert warnings == ["listener tcp:3 (none) is new or changed: it needs a restart"]
    assert cfg.spool.path == Path("/a") and cfg.auth.threads == 3
    assert cfg.auth.max_in_flight == 7
    # tls changed for an endpoint: the socket keeps the listener it was bound for.
    changed = parse(
        """
[tls]
certificate = "c.pem"
private_key = "k.pem"
[[listener]]
endpoint = "tcp:1"
tls = "implicit"
[spool]
path = "/b"
""",
        "/etc/k.toml",
    )
    cfg, adopt, warnings = worker_config(boot, changed, sockets)
    assert [(li.endpoint, li.tls) for li in cfg.listeners] == [("tcp:1", "none"), ("tcp:2", "none")]
    assert cfg.listeners == boot.listeners
    assert warnings == [
        "listener tcp:1 (none) was removed or changed: it stays until a restart",
        "listener tcp:2 (none) was removed or changed: it stays until a restart",
        "listener tcp:1 (implicit) is new or changed: it needs a restart",
    ]


def test_control_messages_round_trip():
    decoder = Netstrings()
    data = encode({"type": "config", "text": "a:b,c", "generation": 2}) + encode({"type": "x"})
    out = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == [{"type": "config", "text": "a:b,c", "generation": 2}, {"type": "x"}]
    with pytest.raises(ValueError):
        Netstrings().feed(b"x3:abc,")
    r, w = os.pipe()
    try:
        os.write(w, data)
        assert read_message(r) == out[0]
        assert read_message(r) == out[1]
    finally:
        os.close(r)
        os.close(w)


@given(
    policy=st.none() | st.binary(max_size=300),
    key=st.none() | st.binary(max_size=300),
    chain=st.none() | st.binary(max_size=300),
)
def test_generation_files_cross_the_control_channel_unchanged(policy, key, chain):
    files = GenerationFiles(policy=policy, private_key=key, certificate=chain)
    wire = json.loads(json.dumps(files.to_wire()))
    assert GenerationFiles.from_wire(wire) == files


def test_generation_files_never_show_their_bytes():
    files = GenerationFiles(policy=b"USERS = 1", private_key=b"SECRET KEY", certificate=b"CHAIN")
    assert "SECRET" not in repr(files) and "CHAIN" not in repr(files)


VALIDATED_ELSEWHERE = """
[server]
hostname = "mx.example"
[[listener]]
endpoint = "tcp:0"
tls = "none"
auth_required = false
[spool]
path = "spool"
[auth.throttle]
fingerprint_key_file = "fp.key"
[auth.oauth]
issuer = "https://idp.example"
audience = "smtp"
jwks_file = "jwks.json"
[sender_binding]
source = "map"
map = "senders"
"""


def test_a_validated_generation_is_parsed_without_its_files(tmp_path):
    # None of the files it names exists (any more): as any text it is
    # refused; as the supervisor's generation it parses, with its key.
    from kumoauth.config import ConfigError
    from kumoauth.ops.assembly import parse_validated

    source = tmp_path / "kumoauth.toml"
    with pytest.raises(ConfigError, match="fingerprint_key_file"):
        parse(VALIDATED_ELSEWHERE, source)
    key = os.urandom(32)
    cfg = parse_validated(VALIDATED_ELSEWHERE, source, GenerationFiles(fingerprint_key=key))
    assert cfg.auth.throttle.fingerprint_key == key
    assert cfg.auth.oauth is not None and cfg.sender_binding is not None
    unkeyed = parse(VALIDATED_ELSEWHERE, source, read_files=False)
    assert unkeyed.auth.throttle.fingerprint_key is None


def test_worker_config_keeps_the_sockets_proxy_networks():
    # proxy_networks needs a restart: a worker restarted after a reload
    # trusts the peers the others (and the socket's first workers) trust.
    text = """
[[listener]]
endpoint = "haproxy:tcp:1"
tls = "none"
auth_required = false
proxy_networks = [{networks}]
meta = {{ name = "{name}" }}
[spool]
path = "/a"
"""
    boot = parse(text.format(networks='"10.0.0.0/8"', name="old"), "/etc/k.toml")
    current = parse(text.format(networks='"0.0.0.0/0"', name="new"), "/etc/k.toml")
    sockets = [Inherited("haproxy:tcp:1", "none", 4, 2)]
    cfg, _, _ = worker_config(boot, current, sockets)
    (listener,) = cfg.listeners
    assert listener.proxy_networks == boot.listeners[0].proxy_networks
    assert listener.meta == {"name": "new"}  # the rest is the new generation's
