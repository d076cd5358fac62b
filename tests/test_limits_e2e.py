"""
``[limits]`` end to end: real ``twistd kumoauth`` processes,
smtplib over STARTTLS, and a real Redis.

- many sessions of one user, with the user name written in several ways
  (case, spaces), racing through two instances (one with two workers)
  that share the Redis at 127.0.0.1:6379 (a key prefix of the test's own,
  deleted afterwards): the message and recipient caps hold exactly, and
  the refusal is ``451 4.7.1`` with the window;
- the Redis of the limits killed mid-run (a redis-server of the test's
  own): ``on_store_error`` decides, one log line when it goes and one when
  it is back, no traceback, recovery without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import RawClient, require_redis, running_redis
from tests.server import Server, running_server
from tests.test_e2e import login, starttls_client

pytestmark = pytest.mark.e2e

SYSTEM_REDIS = ("127.0.0.1", 6379)

#: one account, whatever case and spaces the client writes its name in
POLICY = """
from kumoauth import kumo


@kumo.on("smtp_server_auth_plain")
def auth(authz, authc, password, conn_meta):
    return " ".join(authc.split()).lower() == "scott" and password == "tiger"
"""

VARIANTS = ["scott", "SCOTT", "Scott", " scott", "scott "]


@pytest.fixture
def system_redis() -> Iterator[tuple[str, RawClient]]:
    """A key prefix of our own on the running Redis; its keys deleted afterwards."""
    try:
        client = RawClient(SYSTEM_REDIS[1])
    except OSError as e:
        pytest.skip(f"no Redis at {SYSTEM_REDIS[0]}:{SYSTEM_REDIS[1]}: {e}")
    prefix = f"kumoauth-audit-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix, client
    finally:
        for key in client.scan(prefix + "*"):
            client("DEL", key)
        client.close()


def limits_table(url: str, mode: str = "closed", messages: int = 5, recipients: int = 12) -> str:
    return (
        f"[limits]\nwindow = 3600\nmax_messages_per_user = {messages}\n"
        f'max_recipients_per_user = {recipients}\nstore = "{url}"\non_store_error = "{mode}"\n'
    )


@contextlib.contextmanager
def instances(tmp_path: Path, certs: Any, extra: str, workers: tuple[int, ...]) -> Iterator[Any]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                running_server(
                    tmp_path / f"instance{i}",
                    certs,
                    POLICY,
                    server=f"workers = {n}" if n > 1 else "",
                    extra=extra,
                )
            )
            for i, n in enumerate(workers)
        ]


def transaction(srv: Server, user: str, rcpts: int, start: threading.Barrier | None = None) -> Any:
    """One session: (MAIL reply, [RCPT replies], DATA code or None)."""
    with starttls_client(srv) as s:
        assert login(s, "PLAIN", user, "tiger")[0] == 235
        if start is not None:
            start.wait(timeout=30)
        mail = s.mail("scott@example.com")
        if mail[0] != 250:
            return mail, [], None
        replies = [s.rcpt(f"r{i}@example.net") for i in range(rcpts)]
        data = None
        if any(code == 250 for code, _ in replies):
            data = s.data(b"Subject: race\r\n\r\nhi\r\n")[0]
        return mail, replies, data


LIMIT_REPLY = re.compile(
    r"4\.7\.1 Sending limit reached \((\d+) (messages|recipients) per 3600 seconds\), "
    r"try again in (\d+) seconds"
)


def test_racing_sessions_of_one_user_through_two_instances_stay_within_the_caps(
    tmp_path, certs, system_redis
):
    prefix, client = system_redis
    url = f"redis://{SYSTEM_REDIS[0]}:{SYSTEM_REDIS[1]}/0?prefix={prefix}&timeout=2"
    sessions = 24
    with instances(tmp_path, certs, limits_table(url), workers=(1, 2)) as servers:
        start = threading.Barrier(sessions)
        results: list[Any] = [None] * sessions
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                user = VARIANTS[i % len(VARIANTS)]
                results[i] = transaction(servers[i % 2], user, 3, start)
            except BaseException as e:  # reported below
                errors.append(e)
                start.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a client thread did not finish"
        assert not errors, errors
        mails = [r[0] for r in results]
        rcpts = [reply for r in results for reply in r[1]]
        accepted = [m for m in mails if m[0] == 250]
        assert len(accepted) == 5, mails
        assert sum(1 for code, _ in rcpts if code == 250) == 12, rcpts
        for code, text in [m for m in mails if m[0] != 250] + [r for r in rcpts if r[0] != 250]:
            assert code == 451, (code, text)
            m = LIMIT_REPLY.fullmatch(text.decode())
            assert m is not None, text
            assert 3590 <= int(m[3]) <= 3600
        # every session with a recipient accepted had its message stored
        assert all(r[2] == 250 for r in results if any(c == 250 for c, _ in r[1]))
        # one counter per kind for every spelling of the name
        keys = sorted(k.decode() for k in client.scan(prefix + "*"))
        assert keys == [
            f"{prefix}count:limit:messages:scott",
            f"{prefix}count:limit:recipients:scott",
        ], keys
        # the messages stored keep their counts; a MAIL whose recipients all
        # lost the race gave its count back when its session ended
        stored = sum(1 for r in results if r[2] == 250)
        assert stored in (4, 5), results
        assert wait_for(
            lambda: client("GET", f"{prefix}count:limit:messages:scott") == str(stored).encode()
        )
        assert client("GET", f"{prefix}count:limit:recipients:scott") == b"12"
        assert 0 < client("PTTL", f"{prefix}count:limit:messages:scott") <= 3600_000
        blob = base64.b64encode(b"\0scott\0tiger").decode()
        for srv in servers:
            assert "tiger" not in srv.log() and blob not in srv.log()
            assert "Traceback" not in srv.log()


def wait_for(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def mail_reply(srv: Server) -> tuple[int, bytes]:
    with starttls_client(srv) as s:
        assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        return s.mail("scott@example.com")


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_limits_redis_killed_mid_run(tmp_path, certs, mode):
    require_redis()
    with running_redis() as redis:
        url = redis.url(db=0, prefix="audit-down:", timeout="0.5")
        extra = limits_table(url, mode, messages=1000, recipients=1000)
        with instances(tmp_path, certs, extra, workers=(1,)) as (srv,):
            assert mail_reply(srv)[0] == 250
            redis.kill()
            for _ in range(4):
                code, text = mail_reply(srv)
                if mode == "closed":
                    assert (code, text) == (
                        451,
                        b"4.7.1 Cannot check sending limits now, try again later",
                    )
                else:
                    assert code == 250, text
            assert wait_for(lambda: "sending-limits store unavailable" in srv.log())
            assert srv.log().count("sending-limits store unavailable") == 1
            assert "Traceback" not in srv.log()
            redis.start()

            def recovered() -> bool:
                return mail_reply(srv)[0] == 250 and "available again" in srv.log()

            assert wait_for(recovered, timeout=30)
            log = srv.log()
            assert log.count("sending-limits store available again") == 1
            assert log.count("sending-limits store unavailable") == 1
            assert "Traceback" not in log
