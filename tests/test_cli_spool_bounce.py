"""
``kumoauth spool bounce ID`` against a real ``twistd kumoauth`` with
``[relay]`` and the scripted upstream: the answer the command prints does
not promise a bounce the sender asked not to get (RFC 3461 ``NOTIFY=NEVER``),
and a message without NOTIFY gets its bounce as before.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kumoauth.relay.queue import QueueStore
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import new_id
from tests.server import Certs
from tests.test_cli_spool import run_cli
from tests.test_relay_e2e import SENDER, bounces, relaying, wait_queue_empty, wait_until
from tests.upstream import running_upstream

pytestmark = pytest.mark.e2e


def held(path: Path, notify: str | None) -> str:
    """A held message from SENDER in the queue at *path*, its recipient's NOTIFY given."""
    msg = Message(new_id(), SENDER, ["b@example.net"], b"Subject: x\r\n\r\nhi\r\n", {})
    if notify is not None:
        msg.dsn = {"rcpt": {"b@example.net": {"notify": notify}}}
    with QueueStore.open(path) as store:
        (mid,) = store.append_batch([msg])
        store.hold(mid)
    return mid


def test_bounce_of_a_message_whose_sender_asked_for_no_bounce(tmp_path: Path, certs: Certs):
    spool = tmp_path / "srv" / "spool"
    never = held(spool, "NEVER")
    default = held(spool, None)
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        result = run_cli(None, "bounce", never, config=srv.config)
        assert result.returncode == 0, (result, srv.log()[-3000:])
        (line,) = result.stdout.splitlines()
        # one line: what was done, who took it, and who gets a bounce
        assert line.startswith(f"{never} is bounced (taken by the running server (pid "), line
        assert "failed and out of the queue" in line
        assert "except those whose NOTIFY leaves out FAILURE" in line
        wait_until(lambda: "no bounce, as the sender asked" in srv.log(), 10, "the log line")

        result = run_cli(None, "bounce", default, config=srv.config)
        assert result.returncode == 0, (result, srv.log()[-3000:])
        assert result.stdout.startswith(f"{default} is bounced (taken by the running server")
        wait_until(lambda: bounces(up), 15, "the bounce of the message without NOTIFY")
        wait_queue_empty(srv)
        time.sleep(1.0)  # a bounce for the NOTIFY=NEVER one would be here by now
        (bounce,) = bounces(up)
        assert default.encode() in bounce.data and never.encode() not in bounce.data
        assert "Traceback" not in srv.log()
