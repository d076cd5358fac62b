"""
The built-in stores as Twisted strcred plugins: listed by ``--help-auth``,
usable as ``twistd kumoauth --auth passwd-file:PATH`` against a real
server, and a bad argument is one usage line.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys

import pytest

from kumoauth.backends.schemes import hash_password
from tests.server import running_server
from tests.test_e2e import POLICY, login, send, spooled, starttls_client

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def test_help_auth_lists_every_store():
    result = subprocess.run(
        [*TWISTD, "kumoauth", "--help-auth"], capture_output=True, text=True, timeout=60
    )
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"passwd-file", "dovecot", "ldap", "sql", "http"} <= listed, result.stdout


def test_plugin_factories_build_store_checkers(tmp_path):
    from twisted.cred.strcred import makeChecker

    users = tmp_path / "users"
    users.write_text(f"ann:{hash_password('pw', 'SSHA256')}\n")
    checker = makeChecker(f"passwd-file:{users}")
    assert type(checker).__name__ == "StoreChecker" and checker.store.name == "passwd-file"
    with pytest.raises(ValueError, match="passwd-file"):
        makeChecker("passwd-file:")


def test_twistd_auth_passwd_file_end_to_end(tmp_path, certs):
    users = tmp_path / "users"
    users.write_text(
        f"dave@example.com:{hash_password('pa55word', 'ARGON2ID')}\n"
        f"erin@example.com:{hash_password('other', 'BLF-CRYPT')}\n"
    )
    args = ["--auth", f"passwd-file:{users}"]
    with running_server(tmp_path / "srv", certs, POLICY, args=args) as srv:
        with starttls_client(srv) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                login(s, "PLAIN", "dave@example.com", "wrong")
        with starttls_client(srv) as s:
            assert login(s, "LOGIN", "erin@example.com", "other")[0] == 235
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "dave@example.com", "pa55word")[0] == 235
            mid = send(s)
        assert spooled(srv, mid).meta["authn_id"] == "dave@example.com"
        assert "dave@example.com" in srv.log() and "pa55word" not in srv.log()


@pytest.mark.parametrize(
    ("argument", "line"),
    [
        ("passwd-file:", "--auth passwd-file: path: must not be empty"),
        (
            "passwd-file:/nonexistent/users",
            "--auth passwd-file: path: /nonexistent/users: file not found",
        ),
        # Twisted's own file: checker warned, then refused every login
        ("file:/nonexistent/passwd", "--auth file: /nonexistent/passwd: No such file or directory"),
        ("memory:carol", "--auth memory: argstring must be in format U:P:..."),
        ("nosuch:x", "--auth: no checker named 'nosuch' (twistd kumoauth --help-auth lists them)"),
    ],
)
def test_bad_plugin_argument_is_one_line(tmp_path, argument, line):
    result = subprocess.run(
        [*TWISTD, "-n", "kumoauth", "--config", str(tmp_path / "x.toml"), "--auth", argument],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""  # not twistd's usage text
    assert result.stderr == f"kumoauth: error: {line}\n"
