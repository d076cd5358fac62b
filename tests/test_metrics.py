"""
Prometheus metrics over HTTP against a real twistd (SPEC §9).
"""

from __future__ import annotations

import contextlib
import signal
import smtplib
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import free_port, make_certs, running_server
from tests.test_e2e import POLICY, login, send, starttls_client

pytestmark = pytest.mark.e2e


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.contextmanager
def metrics_server(tmp_path: Path, server: str) -> Iterator[tuple[Any, int]]:
    """A real twistd with ``[metrics]`` on a port of its own: (server, port)."""
    port = free_port()
    with running_server(
        tmp_path / "srv",
        make_certs(tmp_path / "certs"),
        POLICY,
        server=server,
        extra=f'[metrics]\nendpoint = "tcp:{port}:interface=127.0.0.1"',
    ) as srv:
        yield srv, port


def test_metrics_move_with_real_sessions(tmp_path):
    with metrics_server(tmp_path, "max_connections_per_ip = 3") as (srv, port):
        before = scrape(port)
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
            send(s, b"Subject: m\r\n\r\n" + b"x" * 1000 + b"\r\n")
        with starttls_client(srv) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                login(s, "PLAIN", "scott", "nope")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                login(s, "PLAIN", "raise", "x")
        # A TLS handshake that fails, and connections over the per-IP limit.
        with socket.create_connection(("127.0.0.1", srv.implicit_port)) as raw:
            raw.sendall(b"this is not TLS\r\n" * 20)
            raw.settimeout(5)
            try:
                raw.recv(100)
            except OSError:
                pass
        held = [socket.create_connection(("127.0.0.1", srv.plain_port)) for _ in range(4)]
        time.sleep(0.3)
        during = scrape(port)
        for sock in held:
            sock.close()
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        (srv.directory / "policy.py").write_text("this is not python\n")
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        after = scrape(port)

    def delta(name, m=after, **labels):
        return value(m, name, **labels) - value(before, name, **labels)

    assert delta("kumoauth_auth_attempts_total", mechanism="PLAIN", result="success") == 1
    assert delta("kumoauth_auth_attempts_total", mechanism="PLAIN", result="failure") == 1
    assert delta("kumoauth_auth_attempts_total", mechanism="PLAIN", result="tempfail") == 1
    assert delta("kumoauth_checker_latency_seconds_count") == 3
    assert delta("kumoauth_messages_spooled_total") == 1
    assert delta("kumoauth_spooled_bytes_total") > 1000
    assert delta("kumoauth_tls_handshakes_total") >= 2
    assert delta("kumoauth_tls_handshake_failures_total") >= 1
    assert delta("kumoauth_connections_rejected_total", reason="limit") >= 1
    assert value(during, "kumoauth_open_connections") >= 3
    assert delta("kumoauth_reloads_total", result="success") == 1
    assert delta("kumoauth_reloads_total", result="failure") == 1
    total = sum(v for (n, _), v in after.items() if n == "kumoauth_connections_total")
    assert total >= 7


def test_reloads_are_counted_once_per_sighup_with_workers(tmp_path):
    # The supervisor validates the file: one count per SIGHUP, success or
    # failure, not one success per worker and no failure at all.
    from tests.test_lifecycle_signals import wait_log
    from tests.test_workers import ready_count, wait_for

    with metrics_server(tmp_path, "workers = 2") as (srv, port):
        wait_for(lambda: ready_count(srv) == 2)
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, "running configuration generation 2", count=2)
        (srv.directory / "policy.py").write_text("this is not python\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, "reload failed, configuration unchanged")
        after = scrape(port)
    assert value(after, "kumoauth_reloads_total", result="success") == 1
    assert value(after, "kumoauth_reloads_total", result="failure") == 1


def test_every_metric_is_in_the_operations_table():
    import re

    from kumoauth.ops.metrics import Metrics

    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `kumoauth_")]
    documented = {name for row in rows for name in re.findall(r"`(kumoauth_[a-z_]+)`", row)}
    missing = [
        f.name + ("_total" if f.type == "counter" else "")
        for f in Metrics().registry.collect()
        if (f.name + ("_total" if f.type == "counter" else "")) not in documented
    ]
    assert missing == [], missing
