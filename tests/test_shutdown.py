"""
Graceful shutdown (SPEC §9): SIGTERM stops accepting, lets transactions
finish for shutdown_grace seconds, then 421 4.3.2 to the rest; exit 0.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import time

import pytest

from kumoauth.config import ServerConfig
from kumoauth.storage.spool import Spool
from kumoauth.testing import plain_b64
from tests.server import running_server
from tests.test_e2e import POLICY, login, starttls_client
from tests.test_protocol import scott_policy


def test_drain_closes_idle_sessions_and_waits_for_transactions(make_session):
    idle = make_session(scott_policy())
    rt = idle.runtime
    busy = make_session(runtime=rt)
    for s in (idle, busy):
        s.command("EHLO client.example")
        s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger"))
    busy.command("MAIL FROM:<scott@example.com>")
    busy.command("RCPT TO:<b@example.net>")
    done = []
    rt.sessions.drain(30, idle.clock).addCallback(done.append)
    assert idle.output() == "421 4.3.2 Service shutting down, try again later\r\n"
    assert idle.closed and not busy.closed
    idle.close()
    busy.command("DATA")
    reply = busy.send(b"hello\r\n.\r\n")
    assert reply.startswith("250 2.0.0 OK queued as ")
    assert reply.endswith("421 4.3.2 Service shutting down, try again later\r\n")
    assert len(busy.messages()) == 1
    busy.close()
    assert done == [None]


def test_grace_period_ends_with_421(make_session):
    s = make_session(scott_policy(), server=ServerConfig(hostname="mx", shutdown_grace=5))
    s.command("EHLO client.example")
    s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger"))
    s.command("MAIL FROM:<scott@example.com>")
    s.runtime.sessions.drain(5, s.clock)
    s.clock.advance(4.9)
    assert not s.closed
    s.clock.advance(0.1)
    assert s.output() == "421 4.3.2 Service shutting down, try again later\r\n"
    assert s.closed


def test_new_sessions_while_draining_are_turned_away(make_session):
    first = make_session(scott_policy())
    first.runtime.sessions.drain(5, first.clock)
    late = make_session(runtime=first.runtime)
    assert late.banner.endswith("421 4.3.2 Service shutting down, try again later\r\n")


@pytest.mark.e2e
def test_sigterm_during_data_still_gives_250(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY, server="shutdown_grace = 10") as srv:
        idle = starttls_client(srv)
        s = starttls_client(srv)
        login(s, "PLAIN", "scott", "tiger")
        s.mail("scott@example.com")
        s.rcpt("b@example.net")
        s.putcmd("data")
        assert s.getreply()[0] == 354
        s.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Not accepting any more...
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.starttls_port), timeout=2)
        # ...the idle session was told so at once...
        assert idle.getreply() == (421, b"4.3.2 Service shutting down, try again later")
        # ...and the message in flight is still accepted and spooled.
        s.send(b"second half\r\n.\r\n")
        code, reply = s.getreply()
        assert code == 250, reply
        mid = reply.decode().rsplit(" ", 1)[-1]
        assert s.getreply()[0] == 421
        assert srv.proc.wait(10) == 0
        data = Spool(srv.spool).read(mid).read_bytes()
        assert data.endswith(b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n")
        assert "Traceback" not in srv.log()


@pytest.mark.e2e
def test_sigterm_grace_expires(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY, server="shutdown_grace = 1") as srv:
        s = starttls_client(srv)
        login(s, "PLAIN", "scott", "tiger")
        s.mail("scott@example.com")
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert s.getreply()[0] == 421
        assert srv.proc.wait(10) == 0
        assert 0.9 < time.monotonic() - start < 5
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()


@pytest.mark.e2e
def test_a_second_sigterm_while_draining_is_not_an_error(tmp_path, certs):
    with running_server(tmp_path, certs, POLICY, server="shutdown_grace = 1") as srv:
        s = starttls_client(srv)
        login(s, "PLAIN", "scott", "tiger")
        s.mail("scott@example.com")  # a transaction in flight: the stop drains
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 0
        assert "Traceback" not in srv.log()
