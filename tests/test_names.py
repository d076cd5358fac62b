"""
``[auth] username_format`` and ``default_realm`` (kumoauth.auth.names):
Dovecot's ``auth_username_format`` and ``auth_default_realm`` for every
store.  The pure rewriting, with hypothesis; the configuration's checks;
through the protocol on StringTransport with a real passwd-file store;
and ``kumoauth auth test`` agreeing with the server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoauth.auth.names import check_format, check_realm, formatter
from kumoauth.backends.schemes import hash_password
from kumoauth.config import ConfigError, parse

BASE = (
    '[[listener]]\nendpoint = "tcp:1"\ntls = "none"\nauth_required = false\n'
    '[spool]\npath = "s"\n[server]\nhostname = "h"\n'
)


@pytest.mark.parametrize(
    ("template", "realm", "login", "account"),
    [
        ("%Lu", None, "Alice@Example.COM", "alice@example.com"),
        ("%Lu", "example.com", "ALICE", "alice@example.com"),
        (None, "example.com", "alice", "alice@example.com"),
        (None, "example.com", "alice@other.example", "alice@other.example"),
        ("%Ln", None, "Bob@Example.com", "bob"),
        ("%n@%Ld", None, "Bob@EXAMPLE.com", "Bob@example.com"),
        # as Dovecot: ASCII letters change case, the first @ splits
        ("%Uu", None, "jürgen", "JüRGEN"),
        ("%Lu", None, "JÜRGEN", "jÜrgen"),
        ("%u", None, "a@b@c", "a@b@c"),
        ("%n", None, "a@b@c", "a"),
        ("%d", None, "a@b@c", "b@c"),
        ("100%%-%Lu", None, "X", "100%-x"),
        ("%Lu", None, "", ""),
    ],
)
def test_accounts(template, realm, login, account):
    fmt = formatter(template, realm)
    assert fmt is not None
    assert fmt(login) == account


def test_nothing_to_do_is_none():
    assert formatter(None, None) is None


@given(st.text(), st.sampled_from(["%Lu", "%u", "%Ln@%Ld", "%Uu"]))
def test_the_rewriting_is_a_fixed_point(name, template):
    # an account name rewritten again is itself: a stored name stays put
    fmt = formatter(template, "example.com")
    assert fmt is not None
    once = fmt(name)
    assert fmt(once) == once


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("%x", "unknown variable '%x'"),
        ("%L", "unknown variable '%L'"),
        ("%{user}", "unknown variable '%{'"),
        ("plain", "names no part of the login"),
        ("%%", "names no part of the login"),
        ("%", "unknown variable '%'"),
    ],
)
def test_a_template_with_an_unknown_variable_is_refused(template, problem):
    with pytest.raises(ValueError, match=problem):
        check_format(template)
    with pytest.raises(ConfigError, match=r"\[auth\] username_format"):
        parse(BASE + f"[auth]\nusername_format = {template!r}\n".replace("'", '"'))


@pytest.mark.parametrize("realm", ["", "a@b", "exa mple.com", "x\ny"])
def test_a_realm_that_is_no_domain_is_refused(realm):
    with pytest.raises(ValueError, match="expected a domain"):
        check_realm(realm)


def test_the_configuration_takes_both():
    cfg = parse(BASE + '[auth]\nusername_format = "%Lu"\ndefault_realm = "example.com"\n')
    assert cfg.auth.account is not None and cfg.auth.account("Alice") == "alice@example.com"
    assert parse(BASE).auth.account is None


def users_file(path: Path) -> None:
    path.write_text(f"alice@example.com:{hash_password('alicepw', 'SHA512-CRYPT')}\n")


def passwd_file_session(make_session, tmp_path, **auth):
    from twisted.internet.task import Clock

    from kumoauth.backends.base import StoreChecker
    from kumoauth.backends.passwdfile import PasswdFile
    from kumoauth.config import AuthConfig
    from tests.test_backend_cache_stores import InlinePool

    users_file(tmp_path / "users")
    clock = Clock()
    store = PasswdFile(tmp_path / "users", reactor=clock, pool=InlinePool())
    store.start()
    s = make_session(
        None,
        checkers=[StoreChecker(store, clock)],
        auth=AuthConfig(failure_delay=0.0, **auth),
        clock=clock,
    )
    s.command("EHLO client.example")
    return s


def test_every_spelling_of_a_login_is_its_account_in_a_passwd_file(
    make_session, tmp_path, captured_log
):
    """
    A postmaster moving from Dovecot (auth_username_format = %Lu,
    auth_default_realm = example.com) to kumoauth's passwd-file on the same
    file: Alice, alice and ALICE were 535 (outside walkthrough).
    """
    from kumoauth.testing import plain_b64

    for login in ("alice", "Alice", "ALICE@EXAMPLE.COM", "alice@example.com"):
        s = passwd_file_session(
            make_session, tmp_path, username_format="%Lu", default_realm="example.com"
        )
        assert s.command("AUTH PLAIN " + plain_b64("", login, "alicepw")).startswith("235"), login
        assert s.meta.get_meta("authn_id") == "alice@example.com"
        assert s.meta.get_meta("authz_id") == "alice@example.com"
    plain = passwd_file_session(make_session, tmp_path)
    assert plain.command("AUTH PLAIN " + plain_b64("", "Alice", "alicepw")).startswith("535")
    # the log names the account tried, for the throttles and fail2ban alike
    assert "authc=alice@example.com" in captured_log.text()


def test_auth_test_applies_them_as_a_session_does(tmp_path):
    users_file(tmp_path / "users")
    config = tmp_path / "kumoauth.toml"
    config.write_text(
        BASE.replace('path = "s"', f'path = "{tmp_path / "s"}"')
        + '[auth]\nchecker = "passwd-file"\nusername_format = "%Lu"\n'
        'default_realm = "example.com"\n[auth.passwd-file]\npath = "users"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "auth", "test", "--config", str(config), "Alice"],
        input="alicepw\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert '"authn_id": "alice@example.com"' in result.stdout
