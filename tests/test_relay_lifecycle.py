"""
The relay's lifecycle around a message being sent, with a real ``twistd
kumoauth``, the scripted upstream (tests/upstream.py) and the real queue:

- SIGTERM while the upstream is about to refuse a message: its bounce is
  stored before the spool writer stops;
- a bounce that cannot be stored (the queue's segment cannot grow: a
  file-size limit put on the running server) keeps the message queued;
- ``kumoauth spool bounce|delete ID`` while ID is being sent waits for the
  attempt, then applies to what is left.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kumoauth.relay.queue import QueueReader
from tests import upstream as upstream_module
from tests.server import Certs
from tests.test_cli_spool import cli_command
from tests.test_relay_e2e import (
    SENDER,
    bounces,
    dsn_blocks,
    relaying,
    submit,
    wait_queue_empty,
    wait_until,
)
from tests.upstream import running_upstream

pytestmark = pytest.mark.e2e


def slow_sender_data(
    monkeypatch: pytest.MonkeyPatch, delay: float, reply: dict[str, str | None]
) -> threading.Event:
    """
    The upstream waits *delay* seconds, or until the event returned is set,
    before it answers the end of data of a message from :data:`SENDER`
    (bounces, from ``<>``, are answered at once), then answers
    ``reply["text"]`` (None: its usual 250, and the message is recorded as
    received).
    """
    original = upstream_module._Handler.handle_DATA
    release = threading.Event()

    async def handle(self: Any, server: Any, session: Any, envelope: Any) -> str:
        if envelope.mail_from == SENDER:
            until = time.monotonic() + delay
            while not release.is_set() and time.monotonic() < until:
                await asyncio.sleep(0.02)
            if reply["text"] is not None:
                return reply["text"]
        return await original(self, server, session, envelope)

    monkeypatch.setattr(upstream_module._Handler, "handle_DATA", handle)
    return release


def sender_messages(up: upstream_module.Upstream) -> list[upstream_module.Received]:
    return [m for m in list(up.messages) if m.mail_from == SENDER]


def stop(srv: Any) -> None:
    srv.proc.send_signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(40)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()
        pytest.fail(f"SIGTERM did not stop kumoauth\n{srv.log()[-3000:]}")
    assert code == 0, srv.log()[-3000:]


# ---------------------------------------------------------------------------
# SIGTERM: the bounce of a send in progress is stored


def test_sigterm_keeps_the_bounce_of_a_send_in_progress(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    reply: dict[str, str | None] = {"text": "550 5.7.1 refused after a while"}
    slow_sender_data(monkeypatch, 3.0, reply)
    with (
        running_upstream() as up,
        relaying(tmp_path, certs, up, server="shutdown_grace = 10") as srv,
    ):
        mid = submit(srv, ["b@example.net"], b"Subject: refused late\r\n\r\nbye\r\n")
        wait_until(lambda: "DATA" in up.all_verbs(), 10, "the upstream to get DATA")
        time.sleep(1.0)
        stop(srv)
        log = srv.log()
        assert "spool writer is not running" not in log
        assert "Traceback" not in log, log[-3000:]
        assert f"relay {mid} to localhost: failed=b@example.net" in log
        # Stopped: the message has left the queue, its bounce is in it.
        reader = QueueReader(srv.spool)
        (bid,) = reader.ids()
        assert bid != mid
        assert reader.read(bid).envelope["mail_from"] == ""
        assert reader.read(bid).envelope["rcpt_to"] == [SENDER]

        # After a restart the bounce goes out.
        srv.start()
        wait_until(lambda: bounces(up), 15, "the bounce after the restart")
        wait_queue_empty(srv)
        (bounce,) = bounces(up)
        msg, blocks = dsn_blocks(bounce.data)
        assert mid in msg.as_string()
        assert "refused after a while" in blocks[1]["Diagnostic-Code"]
        assert not sender_messages(up)


# ---------------------------------------------------------------------------
# a bounce that cannot be stored: the message stays


def test_bounce_not_stored_keeps_the_message(tmp_path: Path, certs: Certs) -> None:
    rcpt = "x@example.net"
    # Big, so the queue segment's end is far past where the log and the
    # journal write: a file-size limit between them fails only the segment.
    body = b"Subject: big\r\n\r\n" + b"y" * 76 * 3000 + b"\r\n"
    limit = 100_000
    with (
        running_upstream(rcpt_replies={rcpt: "451 4.2.0 not yet"}) as up,
        relaying(tmp_path, certs, up, retry_schedule="[3]") as srv,
    ):
        mid = submit(srv, [rcpt], body)
        wait_until(lambda: f"relay {mid} to localhost: deferred={rcpt}" in srv.log(), 10)
        assert (srv.directory / "twistd.log").stat().st_size < limit / 2
        soft, hard = resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
        try:
            up.rcpt_replies = {rcpt: "550 5.1.1 no such user"}
            gone = f"relay {mid}: the bounce for {rcpt} could not be stored"
            wait_until(lambda: gone in srv.log(), 10, "the bounce to fail")
            time.sleep(0.5)
            log = srv.log()
            assert "Traceback" not in log, log[-3000:]
            assert log.count(gone) == 1
            # Still queued, deferred, the recipient still pending.
            entry = QueueReader(srv.spool).get(mid)
            assert entry.last_error == "the bounce could not be stored"
            assert entry.rcpt_status() == {rcpt: "pending"}
            assert not bounces(up)
        finally:
            resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
        # Once it can be stored, the next attempt bounces it, once.
        wait_until(lambda: bounces(up), 10, "the bounce")
        wait_queue_empty(srv)
        time.sleep(1.2)
        (bounce,) = bounces(up)
        _, blocks = dsn_blocks(bounce.data)
        (r,) = blocks[1:]
        assert r["Final-Recipient"].lower() == f"rfc822; {rcpt}"
        assert "no such user" in r["Diagnostic-Code"]
        assert not sender_messages(up)
        (line,) = [line for line in srv.log().splitlines() if gone in line]
        assert line.endswith("the message stays queued and is tried again")


# ---------------------------------------------------------------------------
# the operator, while the message is being sent


@pytest.mark.parametrize(
    ("op", "upstream_says"),
    [
        ("bounce", None),
        ("delete", None),
        ("bounce", "451 4.3.0 try again later"),
        ("delete", "451 4.3.0 try again later"),
    ],
    ids=["bounce-delivered", "delete-delivered", "bounce-deferred", "delete-deferred"],
)
def test_operator_request_during_a_send(
    tmp_path: Path,
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
    op: str,
    upstream_says: str | None,
) -> None:
    reply: dict[str, str | None] = {"text": upstream_says}
    # The upstream holds the end of data until the server has taken the
    # request (30 s at most: ample for the CLI and the 1 s tick).
    release = slow_sender_data(monkeypatch, 30.0, reply)
    with running_upstream() as up, relaying(tmp_path, certs, up, retry_schedule="[1]") as srv:
        mid = submit(srv, ["b@example.net"], b"Subject: busy\r\n\r\nbeing sent\r\n")
        wait_until(lambda: "DATA" in up.all_verbs(), 10, "the upstream to get DATA")
        # The command waits for the server's answer, which comes once the
        # attempt under way has ended, and prints it.
        with subprocess.Popen(
            cli_command(None, op, mid, "--wait", "40", config=srv.config),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as cli:
            wait_until(
                lambda: "waits for the delivery attempt under way" in srv.log(), 20, "the request"
            )
            assert cli.poll() is None  # still waiting for the answer
            release.set()
            stdout, stderr = cli.communicate(timeout=60)
        result = subprocess.CompletedProcess(cli.args, cli.returncode, stdout, stderr)
        if upstream_says is None:
            assert result.returncode == 3, result
            assert f"{op} {mid} not done: it was delivered by the attempt under way" in (
                result.stderr
            )
        else:
            assert result.returncode == 0, result
            assert f"{mid} is {op.rstrip('e')}ed (taken by the running server" in result.stdout
        ended = f"operator request: {op} {mid} "
        wait_until(lambda: ended + "not done" in srv.log() or f"{mid} is " in srv.log(), 15)
        wait_queue_empty(srv)
        time.sleep(1.5)  # a retry, a late bounce, would show now
        log = srv.log()
        assert "Traceback" not in log and "bug relaying" not in log, log[-3000:]
        if upstream_says is None:
            # Delivered: nothing to bounce or delete, and the log says so.
            assert f"{ended}not done: it was delivered by the attempt under way" in log
            assert len(sender_messages(up)) == 1
            assert not bounces(up)
        elif op == "bounce":
            assert f"operator request: {mid} is bounced" in log
            assert not sender_messages(up)
            (bounce,) = bounces(up)
            _, blocks = dsn_blocks(bounce.data)
            assert "bounced by the operator" in blocks[1]["Diagnostic-Code"]
        else:
            assert f"operator request: {mid} is deleted" in log
            assert not sender_messages(up) and not bounces(up)
            assert up.all_verbs().count("MAIL") == 1  # not tried again
