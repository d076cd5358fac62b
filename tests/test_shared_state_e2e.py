"""
Many instances, one set of limits (issue 13), end to end: real ``twistd
kumoauth`` processes (one of them with ``[server] workers = 2``) sharing a
real redis-server of their own; smtplib as the client.

- guesses spread across instances are limited to the configured total,
  and ``kumoauth throttle clear`` unlocks the address everywhere;
- per-user message and recipient limits hold across instances, and
  ``kumoauth limits show|reset`` see and reset them;
- Redis killed mid-run: ``on_store_error`` decides, one log line per state
  change, recovery without restarting kumoauth;
- keys carry the prefix and expire (TTL checked in Redis);
- an IPv6 client over ::1 is counted per /64.
"""

from __future__ import annotations

import contextlib
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import require_redis, running_redis
from tests.server import running_server
from tests.test_e2e import POLICY, login, starttls_client

WINDOW = 600


@pytest.fixture
def redis() -> Iterator:
    require_redis()
    with running_redis() as server:
        yield server


def store_url(redis, prefix: str) -> str:
    return redis.url(db=0, prefix=prefix, timeout="0.5")


@contextlib.contextmanager
def instances(tmp_path: Path, certs, throttle: str, extra: str = "", workers: tuple = (1, 2)):
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                running_server(
                    tmp_path / f"instance{i}",
                    certs,
                    POLICY,
                    throttle=throttle,
                    server=f"workers = {n}" if n > 1 else "",
                    extra=extra,
                )
            )
            for i, n in enumerate(workers)
        ]
        yield servers


def attempt(srv, user: str, password: str) -> int:
    """One AUTH on a fresh connection (a session closes after max_failures)."""
    with starttls_client(srv) as s:
        try:
            return login(s, "PLAIN", user, password)[0]
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code


def cli(config: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", *args[:1], "--config", str(config), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        input=password,
    )


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_guesses_across_instances_share_one_budget_and_clear_unlocks_everywhere(
    tmp_path, certs, redis
):
    throttle = (
        f'store = "{store_url(redis, "t1:")}"\nmax_failures_per_ip = 4\n'
        f"max_failures_per_authc = 100\nwindow = {WINDOW}"
    )
    with instances(tmp_path, certs, throttle) as (a, b):
        codes = [attempt((a, b)[i % 2], "scott", f"guess{i}") for i in range(4)]
        assert codes == [535] * 4
        # the budget is spent, whichever instance (or worker) is asked next
        assert attempt(a, "scott", "tiger") == 454
        assert attempt(b, "scott", "tiger") == 454
        listed = cli(a.config, "throttle", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert '"key": "127.0.0.1", "failures": 4, "limit": 4, "locked": true' in listed.stdout
        cleared = cli(b.config, "throttle", "clear", "127.0.0.1")
        assert cleared.returncode == 0 and "cleared ip:127.0.0.1" in cleared.stdout
        assert attempt(a, "scott", "tiger") == 235
        assert attempt(b, "scott", "tiger") == 235
        # the same wrong password through both instances counts once (shared salt)
        assert attempt(a, "scott", "same") == 535
        assert attempt(b, "scott", "same") == 535
        listed = cli(a.config, "throttle", "list", "--json").stdout
        assert '"key": "127.0.0.1", "failures": 1' in listed
        for srv in (a, b):
            assert "tiger" not in srv.log() and "guess1" not in srv.log()


def test_keys_carry_the_prefix_and_expire(tmp_path, certs, redis):
    throttle = f'store = "{store_url(redis, "ttl-test:")}"\nwindow = {WINDOW}'
    with instances(tmp_path, certs, throttle, workers=(1,)) as (a,):
        assert attempt(a, "scott", "wrong") == 535
        with redis.client() as r:
            keys = sorted(k.decode() for k in r.scan("*"))
            assert keys and all(k.startswith("ttl-test:") for k in keys), keys
            failure_keys = [k for k in keys if ":fail:" in k]
            assert len(failure_keys) == 2  # the client's and the user's
            for key in failure_keys:
                ttl = r("PTTL", key)
                assert 0 < ttl <= WINDOW * 1000, (key, ttl)


def test_sending_limits_hold_across_instances(tmp_path, certs, redis):
    url = store_url(redis, "l1:")
    extra = (
        f"[limits]\nwindow = 3600\nmax_messages_per_user = 3\nmax_recipients_per_user = 5\n"
        f'store = "{url}"\n'
    )
    with instances(tmp_path, certs, f'store = "{url}"', extra=extra) as (a, b):

        def send_via(srv, rcpts: int = 1) -> tuple[int, int]:
            with starttls_client(srv) as s:
                login(s, "PLAIN", "scott", "tiger")
                code, _ = s.mail("scott@example.com")
                if code != 250:
                    return code, 0
                accepted = 0
                for i in range(rcpts):
                    if s.rcpt(f"r{i}@example.net")[0] == 250:
                        accepted += 1
                if accepted:
                    s.data(b"Subject: t\r\n\r\nhi\r\n")
                return code, accepted

        assert send_via(a) == (250, 1)
        assert send_via(b, rcpts=2) == (250, 2)
        # recipients: 3 of 5 used; 2 more pass, the third is refused
        assert send_via(a, rcpts=3) == (250, 2)
        # messages: 3 of 3 used, on whichever instance
        code, _ = send_via(b)
        assert code == 451
        shown = cli(a.config, "limits", "show", "scott", "--json")
        assert shown.returncode == 0, shown.stderr
        assert '"messages": {"used": 3, "limit": 3' in shown.stdout
        assert '"recipients": {"used": 5, "limit": 5' in shown.stdout
        # each instance logged the limit it enforced: recipients on a, messages on b
        assert wait_for(lambda: "sending limit: user scott reached 5 recipients" in a.log())
        assert wait_for(lambda: "sending limit: user scott reached 3 messages" in b.log())
        reset = cli(b.config, "limits", "reset", "scott")
        assert reset.returncode == 0 and "reset messages, recipients" in reset.stdout
        assert send_via(a) == (250, 1)


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_killed_mid_run(tmp_path, certs, redis, mode):
    throttle = f'store = "{store_url(redis, "k1:")}"\non_store_error = "{mode}"'
    with instances(tmp_path, certs, throttle, workers=(1,)) as (a,):
        assert attempt(a, "scott", "tiger") == 235
        redis.kill()
        expected = 454 if mode == "closed" else 235
        for _ in range(5):
            assert attempt(a, "scott", "tiger") == expected
        assert wait_for(lambda: "failure store unavailable" in a.log())
        assert a.log().count("failure store unavailable") == 1
        assert "Traceback" not in a.log()
        redis.start()

        def recovered() -> bool:
            # each attempt asks the store again (after its back-off)
            return attempt(a, "scott", "tiger") == 235 and "available again" in a.log()

        assert wait_for(recovered, timeout=20)
        assert a.log().count("failure store available again") == 1


def test_ipv6_client_counted_per_64(tmp_path, certs, redis):
    import socket

    from tests.server import free_port

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = free_port()
    extra = f'[[listener]]\nendpoint = "tcp6:{port}:interface=\\\\:\\\\:1"\ntls = "starttls"\n'
    throttle = f'store = "{store_url(redis, "v6:")}"\nmax_failures_per_ip = 2'
    with instances(tmp_path, certs, throttle, extra=extra, workers=(1,)) as (a,):

        def v6_open() -> bool:
            try:
                socket.create_connection(("::1", port), timeout=1).close()
                return True
            except OSError:
                return False

        assert wait_for(v6_open)
        for password in ("one", "two"):
            with smtplib.SMTP("::1", port, timeout=10) as s:
                s.ehlo("client.example")
                ctx = a.certs.client_context()
                ctx.check_hostname = False
                s.starttls(context=ctx)
                s.ehlo("client.example")
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    login(s, "PLAIN", "scott", password)
        listed = cli(a.config, "throttle", "list", "--json").stdout
        assert '"key": "::/64", "failures": 2, "limit": 2, "locked": true' in listed
        # IPv4 is another client: not locked
        assert attempt(a, "scott", "tiger") == 235


CHANGING_POLICY = """
import json, pathlib
from kumoauth import kumo

PASSWORDS = pathlib.Path(__file__).with_name("passwords.json")


@kumo.on("smtp_server_auth_plain")
def check(authz, authc, password, conn_meta):
    return json.loads(PASSWORDS.read_text()).get(authc) == password
"""


def test_a_reload_on_one_instance_clears_every_instances_cache(tmp_path, certs, redis):
    """
    [auth.cache] on two instances sharing Redis: B answers from its cache
    after the password changed, until A gets a SIGHUP; then B asks its
    checker again within the poll interval.
    """
    import json
    import signal

    url = store_url(redis, "c1:")
    with contextlib.ExitStack() as stack:
        servers = []
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            (directory / "passwords.json").write_text(json.dumps({"scott": "old"}))
            servers.append(
                stack.enter_context(
                    running_server(
                        directory,
                        certs,
                        CHANGING_POLICY,
                        throttle=f'store = "{url}"',
                        extra="[auth.cache]\nttl = 300\nnegative_ttl = 0\n",
                    )
                )
            )
        a, b = servers
        assert attempt(b, "scott", "old") == 235  # cached in B
        (b.directory / "passwords.json").write_text(json.dumps({"scott": "new"}))
        assert attempt(b, "scott", "old") == 235  # still from B's cache
        a.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded configuration" in a.log())
        assert wait_for(lambda: attempt(b, "scott", "old") == 535, timeout=10)
        assert attempt(b, "scott", "new") == 235


def test_reloads_of_a_supervisor_leave_no_store_connection_behind(tmp_path, certs, redis):
    # Each SIGHUP to a supervisor built its workers' stores to check the
    # configuration and kept them: one more Redis connection per reload,
    # and its cache's poll logging every outage once more.
    throttle = f'store = "{store_url(redis, "leak:")}"'
    extra = "[auth.cache]\nttl = 60\n"
    with instances(tmp_path, certs, throttle, extra=extra, workers=(2,)) as (srv,):
        assert wait_for(lambda: srv.log().count("worker ready") == 2)
        with redis.client() as c:

            def clients() -> int:
                info = c("INFO", "clients")
                text = info.decode() if isinstance(info, bytes) else info
                return int(re.search(r"connected_clients:(\d+)", text)[1])

            time.sleep(1)
            before = clients()
            for n in range(1, 6):
                srv.proc.send_signal(signal.SIGHUP)
                # Both workers say so for each reload.
                assert wait_for(lambda n=n: srv.log().count("reloaded configuration") >= 2 * n)
            time.sleep(1)
            assert clients() <= before
