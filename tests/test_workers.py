"""
[server] workers = N against a real twistd: shared sockets, every worker
serving, a killed worker replaced, SIGHUP and SIGTERM forwarded, metrics
summed over workers.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import smtplib
import time
import urllib.request
from pathlib import Path

import pytest

from kumoauth.storage.spool import Spool
from tests.server import free_port, make_certs, running_server
from tests.test_e2e import POLICY, login, send, starttls_client

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
        # Concurrent sessions: all served, by both workers.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: one_session(srv), range(40)))
        assert len(set(ids)) == 40
        assert {m for m in Spool(srv.spool).ids()} == set(ids)
        log = srv.log()
        served = set(re.findall(r"\[worker (\d)\] \[kumoauth\.auth#info\] AUTH PLAIN success", log))
        assert served == {"0", "1"}
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
