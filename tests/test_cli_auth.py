"""
``kumoauth auth test``: the configured checker run as a session would,
with the documented exit statuses (0 success, 1 failure, 2 cannot decide
or wrong usage, 130 Ctrl-C) and never the password in its output; at its
password prompt on a real terminal (a pty), Ctrl-D and Ctrl-C without a
traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kumoauth.backends.schemes import hash_password
from tests.test_cli_pw import CTRL_C, CTRL_D, at_a_terminal, lines_after_prompt

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "S3cret-horse-battery"


def run_auth_test(config: Path, *args: str, password: str = PASSWORD):
    return subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "auth", "test", "--config", str(config), *args],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(directory: Path, auth: str) -> Path:
    config = directory / "kumoauth.toml"
    config.write_text(
        '[server]\nhostname = "mx.example"\n'
        '[[listener]]\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
        'auth_required = false\nmeta = { port_kind = "submission" }\n'
        f'[spool]\npath = "{directory / "spool"}"\n' + auth
    )
    return config


def policy_config(directory: Path, body: str) -> Path:
    (directory / "policy.py").write_text(
        "from kumoauth import kumo\n\n"
        "@kumo.on('smtp_server_auth_plain')\n"
        "def check(authz, authc, password, conn_meta):\n" + body
    )
    return write_config(directory, '[policy]\npath = "policy.py"\n')


def assert_no_secret(result: subprocess.CompletedProcess[str]) -> None:
    assert PASSWORD not in result.stdout and PASSWORD not in result.stderr


def test_policy_success_prints_the_meta(tmp_path):
    config = policy_config(
        tmp_path,
        "    conn_meta.set_meta('tenant', 'acme')\n"
        "    assert conn_meta.get_meta('port_kind') == 'submission'\n"
        f"    return authc == 'scott' and password == {PASSWORD!r}\n",
    )
    result = run_auth_test(config, "scott")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "result: success (235 2.7.0)"
    meta = json.loads(lines[1].removeprefix("meta: "))
    assert meta == {"authn_id": "scott", "authz_id": "scott", "tenant": "acme"}
    assert_no_secret(result)


def test_policy_failure_exits_1(tmp_path):
    config = policy_config(tmp_path, "    return False\n")
    result = run_auth_test(config, "scott")
    assert result.returncode == 1
    assert result.stdout.strip() == "result: failure (535 5.7.8)"
    assert_no_secret(result)


def test_checker_error_exits_2_without_the_password(tmp_path):
    config = policy_config(tmp_path, "    raise RuntimeError('db down for ' + password)\n")
    result = run_auth_test(config, "scott")
    assert result.returncode == 2
    assert result.stdout.startswith("result: tempfail (454 4.7.0)")
    assert_no_secret(result)


def test_configuration_error_is_one_line_and_exit_2(tmp_path):
    config = write_config(tmp_path, '[auth]\nchecker = "nosuch"\n')
    result = run_auth_test(config, "scott")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "kumoauth auth test: error:" in result.stderr and "nosuch" in result.stderr


def test_user_name_is_prepared_like_one_from_the_wire(tmp_path):
    config = policy_config(tmp_path, "    return authc == 'j\\u00fcrgen'\n")
    assert run_auth_test(config, "ju\u0308rgen").returncode == 0
    bad = run_auth_test(config, "bad\u0007name")
    # the server's 501: a failure of that name (1), not a configuration error (2)
    assert bad.returncode == 1
    assert bad.stdout == "result: failure (501 5.5.2 authcid contains a prohibited character)\n"
    # As long as a PLAIN field may be: a longer one was checked (535)
    # where a session answers 501.
    assert run_auth_test(config, "a" * 255).returncode == 1
    long = run_auth_test(config, "\u00fc" * 128)  # 256 octets of UTF-8
    assert long.returncode == 1
    assert long.stdout == "result: failure (501 5.5.2 authcid longer than 255 octets)\n"


def passwd_file_config(directory: Path, cache: bool = False) -> Path:
    users = directory / "users"
    users.write_text(f"scott@example.com:{hash_password(PASSWORD, 'SHA512-CRYPT')}\n")
    auth = '[auth]\nchecker = "passwd-file"\n[auth.passwd-file]\npath = "users"\n'
    if cache:
        auth += "[auth.cache]\nttl = 60\n"
    return write_config(directory, auth)


def test_passwd_file_store(tmp_path):
    config = passwd_file_config(tmp_path)
    ok = run_auth_test(config, "scott@example.com")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("result: success")
    wrong = run_auth_test(config, "scott@example.com", password="nope")
    assert wrong.returncode == 1
    unknown = run_auth_test(config, "nobody@example.com")
    assert unknown.returncode == 1
    for result in (ok, wrong, unknown):
        assert_no_secret(result)


def test_a_refusal_says_why(tmp_path):
    # "result: failure" alone, for a right password, left the operator guessing.
    config = passwd_file_config(tmp_path)
    users = tmp_path / "users"
    users.write_text(users.read_text().rstrip("\n") + "::::::allow_nets=192.0.2.0/24\n")
    refused = run_auth_test(config, "scott@example.com")
    assert refused.returncode == 1
    assert refused.stdout.startswith("result: failure")
    assert "may not log in from" in refused.stderr and "allow_nets" in refused.stderr
    assert_no_secret(refused)


def test_cache_only_when_asked(tmp_path):
    config = passwd_file_config(tmp_path, cache=True)
    plain = run_auth_test(config, "scott@example.com")
    assert plain.returncode == 0 and "cache" not in plain.stdout
    cached = run_auth_test(config, "scott@example.com", "--cache")
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.splitlines()[0] == "first attempt: success (235 2.7.0)"
    assert cached.stdout.splitlines()[2] == "second attempt (cache): success (235 2.7.0)"
    (tmp_path / "other").mkdir()
    no_table = run_auth_test(passwd_file_config(tmp_path / "other"), "--cache", "x")
    assert no_table.returncode == 2 and "[auth.cache]" in no_table.stderr


def test_a_locked_user_and_the_servers_cache_are_said(tmp_path):
    # "failure" from the store while a running server's cache still took
    # the old password, and "success" for a user the server refuses, misled.
    config = passwd_file_config(tmp_path, cache=True)
    (tmp_path / "locked").write_text("Scott@Example.com\n")
    config.write_text(
        config.read_text().replace(
            'checker = "passwd-file"', 'checker = "passwd-file"\nlocked_users = "locked"'
        )
    )
    locked = run_auth_test(config, "scott@example.com")
    assert locked.returncode == 1, locked.stderr
    assert locked.stdout.startswith(
        "result: failure (535 5.7.8): 'scott@example.com' is in [auth] locked_users"
    )
    wrong = run_auth_test(config, "scott@example.com", password="nope")
    assert wrong.returncode == 1
    assert wrong.stdout.splitlines()[1] == (
        "note: a running server's [auth.cache] may take a password it verified before "
        "for up to 60s more (SIGHUP empties it)"
    )
    for result in (locked, wrong):
        assert_no_secret(result)


def test_backend_down_exits_2(tmp_path):
    config = write_config(
        tmp_path,
        '[auth]\nchecker = "dovecot"\ntimeout = 5\n'
        f'[auth.dovecot]\nsocket = "{tmp_path / "no-such-socket"}"\n',
    )
    result = run_auth_test(config, "scott")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "454 4.7.0" in result.stdout
    assert_no_secret(result)


def test_the_example_policy_with_a_store(tmp_path):
    """
    etc/policy_backend.py: the passwd-file store from a policy, plus a
    tenant; run on a copy with users of our own.
    """
    shutil.copy(REPO / "etc" / "policy_backend.py", tmp_path / "policy_backend.py")
    (tmp_path / "users").write_text(
        f"scott@example.com:{hash_password(PASSWORD, 'SSHA512')}\n"
        f"ann@example.org:{hash_password(PASSWORD, 'SSHA512')}\n"
    )
    config = write_config(tmp_path, '[policy]\npath = "policy_backend.py"\n')
    ok = run_auth_test(config, "scott@example.com")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[1].removeprefix("meta: "))["tenant"] == "acme"
    other = run_auth_test(config, "ann@example.org")
    assert json.loads(other.stdout.splitlines()[1].removeprefix("meta: "))["tenant"] == "default"
    assert run_auth_test(config, "scott@example.com", password="wrong").returncode == 1


def test_the_shipped_sample_users_file_verifies():
    """etc/users holds scott@example.com / tiger, like etc/policy.py's sample user."""
    from kumoauth.backends.schemes import verify

    line = next(
        ln for ln in (REPO / "etc" / "users").read_text().splitlines() if not ln.startswith("#")
    )
    user, _, stored = line.partition(":")
    assert user == "scott@example.com" and verify(stored, "tiger")


def test_auth_test_prints_the_addresses_the_user_may_send_as(tmp_path):
    config = policy_config(tmp_path, "    return True\n")
    (tmp_path / "senders").write_text("scott@example.com scott\n@example.org scott\n")
    config.write_text(config.read_text() + '[sender_binding]\nmap = "senders"\n')
    result = run_auth_test(config, "scott")
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("may send as: "))
    assert "scott@example.com" in line and "@example.org" in line


# --------------------------------------------------------------------------
# no password, Ctrl-C, wrong usage


def auth_test_at_a_terminal(config: Path, keys: list[bytes], *args: str) -> tuple[int, str]:
    return at_a_terminal(
        ["auth", "test", "--config", str(config), *args, "scott"], keys, timeout=15
    )


def test_ctrl_d_at_the_prompt_is_one_line_and_exit_2(tmp_path):
    config = policy_config(tmp_path, "    return True\n")
    status, shown = auth_test_at_a_terminal(config, [CTRL_D])
    assert status == 2, shown
    assert "Traceback" not in shown and "EOFError" not in shown
    assert lines_after_prompt(shown) == ["kumoauth auth test: error: no password given"]


def test_ctrl_c_at_the_prompt_exits_130_without_a_traceback(tmp_path):
    config = policy_config(tmp_path, "    return True\n")
    status, shown = auth_test_at_a_terminal(config, [CTRL_C])
    assert status == 130, shown
    assert "Traceback" not in shown and "KeyboardInterrupt" not in shown
    assert lines_after_prompt(shown) == [], shown


@pytest.mark.parametrize("checker", ["deferred", "blocking"])
def test_ctrl_c_while_the_checker_is_awaited_exits_130_without_a_traceback(tmp_path, checker):
    # The checker never answers (a backend that hangs: a Deferred that never
    # fires, or a call that blocks); Ctrl-C then is an interruption (130),
    # not "could not decide" (2), and says nothing more. A blocked call
    # cannot be cancelled: the second Ctrl-C ends the process at once.
    called = tmp_path / "called"
    hang = (
        "    from twisted.internet import defer\n    return defer.Deferred()\n"
        if checker == "deferred"
        else "    import time\n    time.sleep(30)\n    return True\n"
    )
    config = policy_config(tmp_path, f"    open({str(called)!r}, 'w').close()\n" + hang)
    given = tmp_path / "password"
    given.write_text(PASSWORD + "\n")
    command = ["auth", "test", "--config", str(config), "scott"]
    with given.open() as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kumoauth.cli", *command],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        deadline = time.monotonic() + 20
        while not called.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert called.exists(), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        if checker == "blocking":
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "result:" not in out
    assert PASSWORD not in out + err


def test_a_password_at_the_prompt_is_checked(tmp_path):
    config = policy_config(tmp_path, f"    return password == {PASSWORD!r}\n")
    status, shown = auth_test_at_a_terminal(config, [PASSWORD.encode() + b"\n"])
    assert status == 0, shown
    assert lines_after_prompt(shown)[0] == "result: success (235 2.7.0)"
    assert PASSWORD not in shown  # not echoed


@pytest.mark.parametrize("stdin", ["empty", "closed"])
def test_no_password_on_standard_input_is_not_checked(tmp_path, stdin):
    # End of input before any line (an empty pipe; no fd 0 at all) is no
    # password: said so, rather than an empty one checked (535, exit 1).
    (tmp_path / "asked").mkdir()
    config = policy_config(tmp_path, f"    open({str(tmp_path / 'asked' / 'x')!r}, 'w')\n")
    result = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "auth", "test", "--config", str(config), "scott"],
        input="" if stdin == "empty" else None,
        stdin=subprocess.DEVNULL if stdin == "closed" else None,
        preexec_fn=(lambda: os.close(0)) if stdin == "closed" else None,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == "kumoauth auth test: error: no password given\n"
    assert result.stdout == ""
    assert not list((tmp_path / "asked").iterdir()), "the checker was called"


def test_cache_without_the_table_is_said_before_asking_for_the_password(tmp_path):
    config = passwd_file_config(tmp_path)  # no [auth.cache]
    status, shown = auth_test_at_a_terminal(config, [], "--cache")
    assert status == 2, shown
    assert "assword" not in shown
    (line,) = [ln for ln in shown.splitlines() if ln.strip()]
    assert line.startswith("kumoauth auth test: error: --cache") and "[auth.cache]" in line


@pytest.mark.parametrize("bad", ["notanip", "300.1.2.3", "2001:db8::1::2", ""])
def test_client_ip_must_be_an_ip_address(tmp_path, bad):
    config = policy_config(tmp_path, "    return True\n")
    result = run_auth_test(config, "--client-ip", bad, "scott")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "argument --client-ip: not an IP address" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("ip", "received_from"),
    [("192.0.2.7", "192.0.2.7:0"), ("2001:db8::7", "[2001:db8::7]:0")],
)
def test_client_ip_reaches_the_checker(tmp_path, ip, received_from):
    config = policy_config(
        tmp_path, f"    return conn_meta.get_meta('received_from') == {received_from!r}\n"
    )
    result = run_auth_test(config, "--client-ip", ip, "scott")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_piped_password_is_utf8_whatever_the_locale(tmp_path):
    # A UTF-8 password piped in under a latin-1 locale was read as latin-1
    # and answered "failure" (outside test with non-ASCII users).
    users = tmp_path / "users"
    users.write_text(f"jürgen:{hash_password('pässwort', 'SHA512-CRYPT')}\n", encoding="utf-8")
    config = write_config(
        tmp_path, '[auth]\nchecker = "passwd-file"\n[auth.passwd-file]\npath = "users"\n'
    )
    command = [sys.executable, "-m", "kumoauth.cli", "auth", "test", "--config", str(config)]
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    ok = subprocess.run(
        [*command, "jürgen"], input="pässwort\n".encode(), capture_output=True, env=env, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(b"result: success")
    assert '"authn_id": "jürgen"'.encode("latin-1") in ok.stdout  # in the locale's encoding
    bad = subprocess.run(
        [*command, "jürgen"], input=b"p\xe4sswort\n", capture_output=True, env=env, timeout=60
    )
    assert bad.returncode == 1
    assert (
        bad.stderr.strip() == b"kumoauth: error: the password is not UTF-8 (as SMTP AUTH sends it)"
    )
