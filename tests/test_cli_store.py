"""
``kumoauth throttle`` and ``kumoauth limits`` without a server: what KEY
means, the memory store explained (exit 1), a store that cannot be reached
(exit 2, one line).  With a real Redis: tests/test_shared_state_e2e.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoauth.cli.throttle import key_for
from tests.server import free_port

BASE = (
    '[server]\nhostname = "h"\n[[listener]]\nendpoint = "tcp:1"\ntls = "none"\n'
    'auth_required = false\n[spool]\npath = "spool"\n'
)


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", args[0], "--config", str(config), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kumoauth.toml"
    path.write_text(BASE + text)
    return path


@pytest.mark.parametrize(
    "text,key",
    [
        ("192.0.2.1", "ip:192.0.2.1"),
        ("2001:db8:1:2:3::9", "ip:2001:db8:1:2::/64"),
        ("2001:db8:1:2::/64", "ip:2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "ip:192.0.2.7"),
        ("alice", "authc:alice"),
        ("Alice@Example.org", "authc:alice@example.org"),
        ("user:192.0.2.1", "authc:192.0.2.1"),
        ("ip:192.0.2.7/32", "ip:192.0.2.7"),
        # inside one counted /64: that /64
        ("2001:db8:1:2:3::/80", "ip:2001:db8:1:2::/64"),
    ],
)
def test_key_for(text, key):
    assert key_for(text, 64) == key


def test_key_for_refuses_nonsense():
    # "10.0.0.1/33": a mistyped network, not a user of that name
    for bad in (
        "",
        "ip:",
        "user:",
        "ip:not-an-address",
        "10.0.0.1/33",
        "2001:db8::/129",
        "10.0.0/",
    ):
        with pytest.raises(ValueError):
            key_for(bad, 64)


@pytest.mark.parametrize(
    ("text", "unit"), [("192.0.2.0/24", "each IPv4 address"), ("2001:db8::/33", "each IPv6 /64")]
)
def test_key_for_a_network_of_several_counted_clients_says_so(text, unit):
    # It was taken as a key no client ever has: "nothing to clear".
    with pytest.raises(ValueError) as e:
        key_for(text, 64)
    assert str(e.value) == (
        f"{text} holds more than one client the throttle counts (it counts {unit}): "
        "clear them one by one"
    )


@given(st.text(min_size=1))
def test_key_for_any_text_is_a_key_or_a_clear_error(text):
    try:
        key = key_for(text, 56)
    except ValueError:
        return
    assert key.startswith(("ip:", "authc:"))


def test_memory_store_is_explained(tmp_path):
    cfg = config(tmp_path, "")
    result = run(cfg, "throttle", "list")
    assert result.returncode == 1
    assert "live inside each server process" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    limits = run(config(tmp_path, "[limits]\nmax_messages_per_user = 5\n"), "limits", "show", "u")
    assert limits.returncode == 1 and "[limits]" in limits.stderr
    none = run(config(tmp_path, ""), "limits", "show", "u")
    assert none.returncode == 1 and "has no [limits] table" in none.stderr


def test_unreachable_store_is_one_line_and_exit_2(tmp_path):
    port = free_port()  # nothing listens there
    url = f"redis://:hunter2-secret@127.0.0.1:{port}/0?timeout=0.5"
    cfg = config(tmp_path, f'[auth.throttle]\nstore = "{url}"\n')
    for args in (("throttle", "list"), ("throttle", "clear", "alice")):
        result = run(cfg, *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "unavailable" in result.stderr
        assert "hunter2" not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr
