"""
Every ``kumoauth`` command that prints, its standard output closed by the
reader before it writes (``… | true``, ``| head`` that has had enough):
exit status 0 (``kumoauth.cli.EXIT_PIPE_CLOSED``, what ``kumoauth
spool list | head`` always gave) and nothing on stderr, no traceback, no
"Exception ignored", with standard output unbuffered
(``PYTHONUNBUFFERED``: the write fails at once, under the reactor for
``auth test``) and buffered (the write fails at the flush before exit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kumoauth.relay.queue import QueueStore
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import new_id
from tests.redis_server import RedisServer
from tests.test_cli_auth import policy_config

PASSWORD = "tiger"
#: kumoauth.cli.EXIT_PIPE_CLOSED: the reader has what it wanted
PIPE_CLOSED = 0


def closed_stdout(args: list[str], cwd: Path, buffered: bool, stdin: str = "") -> tuple[int, str]:
    """``kumoauth ARGS``, its stdout closed before it writes: exit status, stderr."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    with subprocess.Popen(
        [sys.executable, "-m", "kumoauth.cli", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first line
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
        code = proc.wait(60)
        return code, proc.stderr.read().decode("utf-8", "replace")


@pytest.fixture
def setup(tmp_path: Path, redis: RedisServer):
    """A configuration for every command: policy checker, Redis stores, a sender map, a queue."""
    policy_config(tmp_path, "    return password == 'tiger'\n")
    url = redis.url(db=0, prefix="closedout:", timeout=10)
    (tmp_path / "senders").write_text("scott@example.com  scott\n")
    config = tmp_path / "kumoauth.toml"
    config.write_text(
        config.read_text()
        + f'[auth.throttle]\nstore = "{url}"\n'
        + f'[limits]\nmax_messages_per_user = 5\nstore = "{url}"\n'
        + '[sender_binding]\nsource = "map"\nmap = "senders"\n'
    )
    with redis.client() as c:  # something for throttle list to print
        c("ZADD", b"closedout:fail:ip:192.0.2.1", time.time(), b"fp")
        c("EXPIRE", b"closedout:fail:ip:192.0.2.1", 600)
    msg = Message(new_id(), "a@example.com", ["b@example.net"], b"Subject: x\r\n\r\nhi\r\n", {})
    with QueueStore.open(tmp_path / "spool") as store:
        store.append_batch([msg])
    yield tmp_path, config, msg.id
    with redis.client() as c:
        for key in c.scan("closedout:*"):
            c("DEL", key)


COMMANDS = {
    "auth test success": (["auth", "test", "--config", "{config}", "scott"], PASSWORD + "\n"),
    "auth test failure": (["auth", "test", "--config", "{config}", "scott"], "wrong\n"),
    "pw": (["pw", "-s", "SHA512-CRYPT"], "s3cret\n"),
    "throttle list": (["throttle", "--config", "{config}", "list"], ""),
    "throttle list --json": (["throttle", "--config", "{config}", "list", "--json"], ""),
    "throttle clear": (["throttle", "--config", "{config}", "clear", "192.0.2.9"], ""),
    "limits show": (["limits", "--config", "{config}", "show", "scott"], ""),
    "limits reset": (["limits", "--config", "{config}", "reset", "scott"], ""),
    "sender check allowed": (
        ["sender", "check", "--config", "{config}", "scott", "scott@example.com"],
        "",
    ),
    "sender check refused": (
        ["sender", "check", "--config", "{config}", "scott", "x@example.com"],
        "",
    ),
    "spool list": (["spool", "--config", "{config}", "list"], ""),
    "spool show": (["spool", "--config", "{config}", "show", "{id}"], ""),
    "spool hold": (["spool", "--config", "{config}", "hold", "{id}"], ""),
    "spool release -": (["spool", "--config", "{config}", "release", "-"], "{id}\n"),
    "--help": (["--help"], ""),
    "--version": (["--version"], ""),
    "spool --help": (["spool", "--help"], ""),
}


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_closed_stdout_is_exit_0_without_a_traceback(setup, name, buffered):
    directory, config, mid = setup
    args, stdin = COMMANDS[name]
    args = [a.format(config=config, id=mid) for a in args]
    code, stderr = closed_stdout(args, directory, buffered, stdin.format(id=mid))
    assert (code, stderr) == (PIPE_CLOSED, ""), name
