"""
``kumoauth throttle`` and ``kumoauth limits`` as an operator sees them: the
user names they take fold as the server folds them (SASLprep, then case),
what comes from the store reaches the terminal escaped (table and JSON),
and a store answer the command cannot use is one line (exit 2), never a
traceback.  A redis-server of the tests' own (tests/redis_server.py).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kumoauth.cli.throttle import key_for
from kumoauth.smtp.limits import counter_key
from tests.redis_server import RedisServer

BASE = (
    '[server]\nhostname = "h"\n[[listener]]\nendpoint = "tcp:1"\ntls = "none"\n'
    'auth_required = false\n[spool]\npath = "spool"\n'
)
PREFIX = "cliadmin:"


@pytest.fixture
def cfg(tmp_path: Path, redis: RedisServer) -> Iterator[Path]:
    url = redis.url(db=0, prefix=PREFIX, timeout=10)
    path = tmp_path / "kumoauth.toml"
    path.write_text(
        BASE + f'[auth.throttle]\nstore = "{url}"\n'
        f'[limits]\nmax_messages_per_user = 5\nstore = "{url}"\n'
    )
    yield path
    with redis.client() as c:
        for key in c.scan(PREFIX + "*"):
            c("DEL", key)


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", args[0], "--config", str(config), *args[1:]],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="backslashreplace",
        timeout=60,
    )


def fail_key(redis: RedisServer, name: bytes, n: int = 1) -> None:
    key = PREFIX.encode() + b"fail:" + name
    with redis.client() as c:
        for i in range(n):
            c("ZADD", key, i, b"fp%d" % i)
        c("EXPIRE", key, 600)


@pytest.mark.parametrize("text", ["\uff21lice", "ali\u00adce", "user:\uff21LICE", " Alice\u2003"])
def test_user_names_fold_as_the_server_folds_them(text):
    # The server SASLprep's an authcid before it folds it into the key:
    # fullwidth "Ａlice" and "ali<SOFT HYPHEN>ce" are the user "alice".
    assert key_for(text, 64) == "authc:alice"


def test_user_name_no_session_could_send_is_refused():
    with pytest.raises(ValueError, match="SASLprep"):
        key_for("user:ev\x1bil", 64)


def test_limits_memory_store_names_its_own_window(tmp_path):
    path = tmp_path / "kumoauth.toml"
    path.write_text(BASE + "[limits]\nmax_messages_per_user = 5\n")
    result = run(path, "limits", "show", "alice")
    assert result.returncode == 1
    assert "[limits] window" in result.stderr
    assert "[auth.throttle]" not in result.stderr


def test_limits_show_and_reset_find_a_fullwidth_spelling(cfg, redis):
    key = (PREFIX + "count:" + counter_key("messages", "alice")).encode()
    with redis.client() as c:
        c("SET", key, 4, "PX", 600_000)
    shown = run(cfg, "limits", "show", "\uff21lice")
    assert shown.returncode == 0, shown.stderr
    assert "messages: 4 of 5" in shown.stdout
    reset = run(cfg, "limits", "reset", "\uff21LICE")
    assert reset.returncode == 0 and reset.stdout.startswith("reset messages"), reset.stdout
    with redis.client() as c:
        assert c("EXISTS", key) == 0


def test_throttle_clear_finds_a_fullwidth_spelling(cfg, redis):
    fail_key(redis, b"authc:alice", 2)
    result = run(cfg, "throttle", "clear", "\uff21lice")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cleared authc:alice"


def test_throttle_list_escapes_and_aligns_store_keys(cfg, redis):
    fail_key(redis, b"authc:ev\x1b[31mil")
    fail_key(redis, "authc:c1\u009b31m".encode())
    fail_key(redis, b"authc:alice", 3)
    table = run(cfg, "throttle", "list")
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout and "\u009b" not in table.stdout
    lines = table.stdout.splitlines()
    column = lines[0].index("FAILURES")
    assert len(lines) == 4
    for line in lines[1:]:
        assert line[column - 2 : column] == "  ", lines  # columns stay aligned
    listing = run(cfg, "throttle", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.isascii(), listing.stdout
    assert "\\u001b[31m" in listing.stdout and "\\u009b" in listing.stdout


def test_a_key_that_is_not_utf8_is_listed_escaped_not_a_traceback(cfg, redis):
    # only another program can write one under our prefix
    fail_key(redis, b"authc:bad\xff\xfe")
    result = run(cfg, "throttle", "list")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # each byte shown once, as the byte
    assert "bad\\xff\\xfe " in result.stdout and result.stdout.isascii(), result.stdout


def test_a_relative_password_file_is_found_beside_the_configuration(tmp_path):
    # The store URL's password_file, like every path in the file, is
    # relative to the configuration's directory, not to where the command
    # (or twistd) happens to run.
    from tests.redis_server import require_redis, running_redis

    require_redis()
    with running_redis(password="s3cret-pw") as server:
        etc = tmp_path / "etc"
        etc.mkdir()
        (etc / "redis.pass").write_text("s3cret-pw\n")
        url = server.url(db=0, password=False, password_file="redis.pass", prefix=PREFIX)
        config = etc / "kumoauth.toml"
        config.write_text(BASE + f'[auth.throttle]\nstore = "{url}"\n')
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "kumoauth.cli", "throttle", "--config", str(config), "list"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=elsewhere,
        )
        assert done.returncode == 0, done.stderr
        assert "s3cret" not in done.stdout + done.stderr
