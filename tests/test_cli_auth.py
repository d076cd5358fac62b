"""
``kumoauth auth test``: the configured checker run as a session would,
with the documented exit statuses (0 success, 1 failure, 2 cannot decide)
and never the password in its output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from kumoauth.backends.schemes import hash_password

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
    assert bad.returncode == 2 and "prohibited" in bad.stderr


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
