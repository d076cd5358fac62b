"""
SIGHUP reload against a real twistd (SPEC §9): new connections get the new
certificate, policy and limits; live sessions go on untouched; a broken
configuration or policy keeps the old one running.
"""

from __future__ import annotations

import shutil
import signal
import smtplib
import ssl
import time

import pytest

from kumoauth.storage.spool import Spool
from tests.server import make_certs, running_server
from tests.test_e2e import POLICY, login, send, starttls_client

pytestmark = pytest.mark.e2e


def hup_and_wait(srv, marker: str, count: int = 1, timeout: float = 10) -> None:
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.log().count(marker) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {marker!r} in the log:\n{srv.log()[-2000:]}")


def test_certificate_swap_reaches_new_connections_only(tmp_path):
    old = make_certs(tmp_path / "old")
    new = make_certs(tmp_path / "new")
    # The server reads its pair from these paths; we overwrite them.
    live_chain, live_key = tmp_path / "chain.pem", tmp_path / "key.pem"
    shutil.copy(old.chain, live_chain)
    shutil.copy(old.key, live_key)
    old.chain, old.key = live_chain, live_key
    with running_server(tmp_path / "srv", old, POLICY) as srv:
        veteran = starttls_client(srv)
        assert login(veteran, "PLAIN", "scott", "tiger")[0] == 235
        shutil.copy(new.chain, live_chain)
        shutil.copy(new.key, live_key)
        hup_and_wait(srv, "reloaded configuration")
        # A new TLS connection sees the new certificate...
        with smtplib.SMTP_SSL(
            "127.0.0.1", srv.implicit_port, timeout=10, context=new.client_context()
        ) as s:
            assert s.noop()[0] == 250
        with pytest.raises(ssl.SSLCertVerificationError):
            smtplib.SMTP_SSL(
                "127.0.0.1", srv.implicit_port, timeout=10, context=old.client_context()
            )
        # ...while the session from before the reload sends as if nothing happened.
        mid = send(veteran)
        veteran.quit()
        assert Spool(srv.spool).read(mid).meta["authn_id"] == "scott"


def test_broken_policy_keeps_the_service_up(tmp_path):
    certs = make_certs(tmp_path / "certs")
    with running_server(tmp_path / "srv", certs, POLICY) as srv:
        (srv.directory / "policy.py").write_text("def broken(:\n")
        hup_and_wait(srv, "reload failed")
        line = next(x for x in srv.log().splitlines() if "reload failed" in x)
        assert "policy.py:1: syntax error" in line
        assert "Traceback" not in srv.log()
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        # Bad TOML too.
        srv.config.write_text(srv.config.read_text() + "\n[server\n")
        hup_and_wait(srv, "reload failed", count=2)
        assert "TOML syntax error" in srv.log()
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235


def test_policy_and_limits_reload(tmp_path):
    certs = make_certs(tmp_path / "certs")
    with running_server(tmp_path / "srv", certs, POLICY) as srv:
        veteran = starttls_client(srv)
        (srv.directory / "policy.py").write_text(
            POLICY.replace('"scott": "tiger"', '"scott": "lion"')
        )
        text = srv.config.read_text().replace(
            'hostname = "localhost"', 'hostname = "localhost"\nmax_recipients = 1'
        )
        text = text.replace('endpoint = "tcp:', 'endpoint = "tcp6:', 1)
        srv.config.write_text(text)
        hup_and_wait(srv, "reloaded configuration")
        log = srv.log()
        assert "needs a restart" in log and "stays until a restart" in log
        with starttls_client(srv) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                login(s, "PLAIN", "scott", "tiger")
            assert login(s, "PLAIN", "scott", "lion")[0] == 235
            s.mail("scott@example.com")
            assert s.rcpt("b@example.net")[0] == 250
            assert s.rcpt("c@example.net")[0] == 452
        # The session from before keeps the policy and limits it started with.
        assert login(veteran, "PLAIN", "scott", "tiger")[0] == 235
        veteran.mail("scott@example.com")
        assert veteran.rcpt("b@example.net")[0] == 250
        assert veteran.rcpt("c@example.net")[0] == 250
        veteran.quit()
        # The listener change reverted: what runs is what is configured, so
        # the next reload warns about no listener.
        srv.config.write_text(text.replace('endpoint = "tcp6:', 'endpoint = "tcp:', 1))
        hup_and_wait(srv, "reloaded configuration", count=2)
        second = srv.log().split("reloaded configuration")[1]  # the second reload's lines
        assert "a restart" not in second, second


def test_json_log_has_one_event_per_attempt(tmp_path):
    import base64
    import json

    certs = make_certs(tmp_path / "certs")
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    with running_server(
        srv_dir, certs, POLICY, server="", extra='[log]\njson_path = "events.jsonl"'
    ) as srv:
        with starttls_client(srv) as s:
            login(s, "PLAIN", "scott", "tiger")
        with starttls_client(srv) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                login(s, "PLAIN", "scott", "Secret-Pass-1")
            assert s.docmd("AUTH", "PLAIN QR==")[0] == 501
            with pytest.raises(smtplib.SMTPAuthenticationError):
                login(s, "PLAIN", "raise", "Secret-Pass-1")
        srv.stop()
        text = (srv.directory / "events.jsonl").read_text()
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    auth = [e for e in events if e.get("log_namespace") == "kumoauth.auth"]
    assert [e["result"] for e in auth] == ["success", "failure", "malformed", "tempfail"]
    first = auth[0]
    assert (first["mechanism"], first["authc"], first["authz"]) == ("PLAIN", "scott", "scott")
    assert first["client"].startswith("127.0.0.1:") and first["listener"].startswith("tcp:")
    assert isinstance(first["checker_latency"], float) and "log_time" in first
    assert "Secret-Pass-1" not in text
    assert base64.b64encode(b"\0scott\0Secret-Pass-1").decode() not in text


def test_checker_lifecycle_over_start_reload_and_stop(tmp_path):
    journal = tmp_path / "journal"
    table = f'[auth.journal_checker]\njournal = "{journal}"\nusers = {{ scott = "tiger" }}\n'
    auth = 'checker = "tests.checkers:journal_checker"'
    with running_server(
        tmp_path, make_certs(tmp_path / "certs"), None, auth=auth, extra=table
    ) as srv:
        with starttls_client(srv) as s:
            assert s.login("scott", "tiger")[0] == 235
        srv.config.write_text(srv.config.read_text().replace('scott = "tiger"', 'alice = "x"'))
        hup_and_wait(srv, "reloaded configuration")
        with starttls_client(srv) as s:
            assert s.login("alice", "x")[0] == 235
        with starttls_client(srv) as s, pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("scott", "tiger")
        srv.stop()
        assert srv.proc.returncode == 0
    assert journal.read_text().splitlines() == ["start", "reload alice", "stop"]
