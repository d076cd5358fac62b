"""
File descriptors against max_connections (kumoauth/ops/descriptors.py):
the soft limit raised when the hard one allows, connections capped (421,
one warning) when it does not, an impossible limit refused at start-up,
and running out at run time said once, not once per connection.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import time
from pathlib import Path

from kumoauth.ops.descriptors import RESERVE
from tests.server import free_port, running_server, spawn, terminate, write_config
from tests.test_e2e import POLICY
from tests.test_hardening import banner

LIMITS = "max_connections = 1000\nmax_connections_per_ip = 1000"
WARNING = "needs 1256 file descriptors"


def soft_limit(pid: int) -> int:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]


def banners(port: int, n: int) -> list[bytes]:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    try:
        return [banner(s) for s in socks]
    finally:
        for s in socks:
            s.close()


def accepted_connections(ports: tuple[int, ...]) -> int:
    """
    TCP connections a server on *ports* accepted and has not closed (its
    side ESTABLISHED or CLOSE_WAIT: it still holds their descriptors).
    """
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)  # the heading
            for line in f:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) in ports and state in ("01", "08"):
                    count += 1
    return count


def settled_descriptors(
    pid: int, ports: tuple[int, ...], quiet: float = 0.3, timeout: float = 10
) -> int:
    """
    How many descriptors *pid* holds once it holds no connection on *ports*
    (the harness's start-up probes closed) and the count stayed put for
    *quiet* s.
    """
    deadline = time.monotonic() + timeout
    while accepted_connections(ports) and time.monotonic() < deadline:
        time.sleep(0.02)
    count = len(os.listdir(f"/proc/{pid}/fd"))
    since = time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.02)
        now = len(os.listdir(f"/proc/{pid}/fd"))
        if now != count:
            count, since = now, time.monotonic()
    return count


def test_the_soft_limit_is_raised_for_max_connections(tmp_path: Path, certs) -> None:
    # soft 300 under a hard 5000: raised to what 1000 connections need
    with running_server(tmp_path, certs, POLICY, server=LIMITS, nofile=(300, 5000)) as srv:
        assert soft_limit(srv.proc.pid) == 1000 + RESERVE
        assert WARNING not in srv.log()


def test_a_hard_limit_too_low_caps_connections_with_421(tmp_path: Path, certs) -> None:
    with running_server(tmp_path, certs, POLICY, server=LIMITS, nofile=(300, 300)) as srv:
        ceiling = 300 - RESERVE
        # The start-up probes of the ports may still be counted for a moment:
        # try again until the server holds none of them.
        deadline = time.monotonic() + 10
        while True:
            got = banners(srv.plain_port, ceiling + 6)
            if sum(b.startswith(b"220 ") for b in got) == ceiling or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sum(b.startswith(b"220 ") for b in got) == ceiling
        assert sum(b.startswith(b"421 4.7.0") for b in got) == 6
        warnings = [line for line in srv.log().splitlines() if WARNING in line]
        assert len(warnings) == 1, warnings
        assert f"at most {ceiling} connections are served" in warnings[0]
        assert "(hard limit 300)" in warnings[0]
        # A reload with the same settings says nothing new.
        os.kill(srv.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded configuration" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.log().count(WARNING) == 1


def test_a_limit_with_no_room_for_a_connection_is_refused_at_start(tmp_path: Path, certs) -> None:
    config = write_config(
        tmp_path, certs, (free_port(), free_port(), free_port()), POLICY, server=LIMITS
    )
    proc = spawn(tmp_path, config, [], {}, nofile=(RESERVE, RESERVE))
    try:
        assert proc.wait(timeout=60) == 1
    finally:
        terminate(proc)  # started after all (the code before this test's fix)
    err = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    assert len(err) == 1, err
    assert "[server] max_connections" in err[0]
    assert f"the file descriptor limit is {RESERVE}" in err[0]
    log = tmp_path / "twistd.log"
    assert not log.exists() or "Traceback" not in log.read_text(errors="replace")


def test_running_out_at_run_time_is_one_line_each_way(tmp_path: Path, certs) -> None:
    with running_server(tmp_path, certs, POLICY, server=LIMITS) as srv:
        pid = srv.proc.pid
        before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # The harness's start-up probes may still hold descriptors for a
        # moment on a busy machine: one freed mid-test lets a client in,
        # and the server rightly says "available again" in between.
        in_use = settled_descriptors(pid, srv.ports)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 4, before[1]))
        try:
            got = banners(srv.plain_port, 40)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
        closed = sum(b == b"" for b in got)
        assert closed > 20, got
        # Descriptors again: a client is served (Twisted's recovery closes
        # what arrives until the backlog is empty), and that is said.
        deadline = time.monotonic() + 10
        while not (got := banners(srv.plain_port, 1)[0]).startswith(b"220 "):
            assert got == b"" and time.monotonic() < deadline
            closed += 1
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while "available again" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = srv.log()
        down = re.findall(r"file descriptors for new connections unavailable: accept: EMFILE", log)
        assert len(down) == 1, log
        again = re.findall(r"file descriptors for new connections available again \((\d+) ", log)
        # The server may close more than this client saw (a stray connection
        # in the backlog): at least these.
        assert len(again) == 1 and int(again[0]) >= closed, log
        assert "EMFILE recovery" not in log and "Re-reserving" not in log
        assert "Traceback" not in log


def test_queue_housekeeping_out_of_descriptors_is_one_line_each_way(tmp_path: Path, certs) -> None:
    # It used to log a traceback every second (HOUSEKEEPING) while it lasted.
    with running_server(tmp_path, certs, POLICY) as srv:
        pid = srv.proc.pid
        before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # Below every descriptor it has: no new one, whatever holes a closed
        # connection (or Twisted's EMFILE reserve) leaves among them.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, before[1]))

        try:
            deadline = time.monotonic() + 10
            while srv.log().count("queue housekeeping unavailable") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(2.5)  # two more rounds of housekeeping meet it
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
        deadline = time.monotonic() + 10
        while "queue housekeeping available again" not in srv.log():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        log = srv.log()
        assert log.count("queue housekeeping unavailable: [Errno 24] Too many open files") == 1
        assert log.count("queue housekeeping available again") == 1
        assert "Traceback" not in log
