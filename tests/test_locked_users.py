"""
``[auth] locked_users``: a phished account is stopped at once, including
the sessions it already has open, without a reload.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from kumoauth.auth import locked
from kumoauth.storage.spool import Spool
from tests.server import Certs, Server, run_twistd, running_server, write_config
from tests.test_e2e import POLICY, send, starttls_client

pytestmark = pytest.mark.e2e


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_parse_names_comments_and_spellings() -> None:
    text = "# phished 2026-11-30\nBob@Acme.Example  # ticket 123\n\n  scott \n"
    assert locked.parse(text, "f") == frozenset({"bob@acme.example", "scott"})
    with pytest.raises(locked.LockedFileError, match=r"^f:2: not a user name"):
        locked.parse("ok\nbad\x00name\n", "f")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_parse_takes_any_text_or_names_its_line(text: str) -> None:
    try:
        names = locked.parse(text, "f")
    except locked.LockedFileError as e:
        assert str(e).startswith("f:")
    else:
        assert all(n == n.strip() and n for n in names)


def test_only_a_regular_file_is_read(tmp_path: Path) -> None:
    # Read on the reactor thread: a FIFO there would block it for good.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(locked.LockedFileError, match="not a regular file"):
        locked.read(fifo)
    with pytest.raises(locked.LockedFileError, match="No such file"):
        locked.read(tmp_path / "absent")


def test_the_file_is_looked_at_once_a_second_and_kept_when_it_breaks(tmp_path: Path) -> None:
    path = tmp_path / "locked"
    path.write_text("")
    clock = Clock()
    users = locked.LockedUsers(clock)
    users.use(path, locked.read(path))
    assert not users.locked("bob")
    path.write_text("bob\n")
    assert not users.locked("bob")  # looked at less than a second ago
    clock.advance(1)
    assert users.locked("BOB") and users.locked("bob") and not users.locked("scott")
    path.write_bytes(b"bob\n\xff\n")  # half an editor's save: not UTF-8
    clock.advance(1)
    assert users.locked("bob")  # what was read before stays locked
    assert users.state.down
    path.write_text("")
    clock.advance(1)
    assert not users.locked("bob") and not users.state.down
    users.use(None, None)
    path.write_text("bob\n")
    clock.advance(1)
    assert not users.locked("bob")


def test_a_lock_holds_on_the_account_and_on_the_login(tmp_path: Path) -> None:
    """
    The review: once a store names the account (Dovecot's realm makes
    "alice" alice@example.com), a lock written before, on "alice", no
    longer held.  Either name locks.
    """
    from kumoauth.auth.cred import AccountLocked, AuthContext, PlainCredentials, SubmissionRealm
    from kumoauth.meta import ConnMeta
    from kumoauth.storage.delivery import IMessageDelivery

    path = tmp_path / "locked"
    users = locked.LockedUsers(Clock())
    realm = SubmissionRealm(None, users)

    def login(avatar: str, typed: str) -> str:
        meta = ConnMeta({})
        creds = PlainCredentials("", typed, "pw", meta)
        try:
            realm.requestAvatar(avatar, AuthContext(typed, meta, creds), IMessageDelivery)
        except AccountLocked as e:
            return f"locked {e.user}"
        return "in"

    for names, expected in (
        ("alice\n", "locked alice"),  # the login, as locks were written before
        ("alice@example.com\n", "locked alice@example.com"),  # the account
        ("bob\n", "in"),
    ):
        path.write_text(names)
        users.use(path, locked.read(path))
        assert login("alice@example.com", "alice") == expected, names


@contextlib.contextmanager
def locking_server(tmp_path: Path, certs: Certs, names: str) -> Iterator[tuple[Server, Path]]:
    """A real server with ``[auth] locked_users`` holding *names*; its lock file."""
    directory = tmp_path / "srv"
    directory.mkdir()
    lockfile = directory / "locked"
    lockfile.write_text(names)
    with running_server(directory, certs, POLICY, auth='locked_users = "locked"') as srv:
        yield srv, lockfile


def test_a_lock_closes_open_sessions_and_refuses_logins(tmp_path: Path, certs: Certs) -> None:
    with locking_server(tmp_path, certs, "# none yet\n") as (srv, lockfile):
        # Two sessions of the account, open before the lock: one between
        # messages, one in the middle of its DATA.
        idle = starttls_client(srv)
        idle.login("scott", "tiger")
        send(idle)
        busy = starttls_client(srv)
        busy.login("scott", "tiger")
        busy.mail("scott@example.com")
        busy.rcpt("b@example.net")
        assert busy.docmd("DATA")[0] == 354
        busy.send(b"Subject: spam\r\n\r\nhalf of it\r\n")
        other = starttls_client(srv)
        other.login("alice", "wonder land")
        lockfile.write_text("# phished\nSCOTT\n")
        time.sleep(1.2)
        # The next MAIL, and the end of the message under way: 421, closed.
        code, reply = idle.docmd("MAIL FROM:<scott@example.com>")
        assert (code, reply) == (421, b"4.7.0 Account locked, closing connection")
        busy.send(b".\r\n")
        assert busy.getreply() == (421, b"4.7.0 Account locked, closing connection")
        for s in (idle, busy):
            with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError, socket.error)):
                s.noop()
        # The right password no longer logs in; another user is untouched.
        with starttls_client(srv) as s, pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("scott", "tiger")
        assert e.value.smtp_code == 535
        send(other)
        other.quit()
        # Unlocking is removing the line.
        lockfile.write_text("")
        time.sleep(1.2)
        with starttls_client(srv) as s:
            assert s.login("scott", "tiger")[0] == 235
            send(s)
        log = srv.log()
    spooled = list(Spool(srv.spool))
    assert b"half of it" not in b"".join(m.read_bytes() for m in spooled)
    assert len(spooled) == 3  # scott before the lock, alice, scott after
    closed = [line for line in log.splitlines() if "is locked ([auth] locked_users)" in line]
    assert len(closed) == 2 and all("user scott is locked" in x for x in closed)
    assert any(
        "AUTH PLAIN failure authc=scott" in x and "reason=locked" in x for x in log.splitlines()
    )
    # Each stored message names its sender's account, for the post-mortem.
    spooled_lines = [x for x in log.splitlines() if "] spooled " in x]
    assert [x.rsplit(" ", 1)[1] for x in spooled_lines] == ["authn=scott", "authn=alice"] + [
        "authn=scott"
    ]
    assert "Traceback" not in log


def test_a_missing_file_stops_start_up_with_one_line(tmp_path: Path, certs: Certs) -> None:
    ports = (0, 0, 0)
    config = write_config(tmp_path, certs, ports, POLICY, auth='locked_users = "nowhere"')
    done = run_twistd(["kumoauth", "--config", str(config)], cwd=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.endswith(f"[auth] locked_users: {tmp_path / 'nowhere'}: No such file or directory")


def test_a_refused_locked_login_stamps_nothing_and_waits_like_a_wrong_one(tmp_path: Path) -> None:
    # The lock was checked after the avatar had stamped authn_id on the
    # connection: on a listener without auth_required the 535'd client
    # then sent mail as the locked user, relayed upstream under that name.
    # And it answered at once, where a wrong password waits failure_delay.
    from kumoauth.config import AuthConfig
    from kumoauth.policy import load_policy
    from kumoauth.testing import Session, plain_b64

    (tmp_path / "policy.py").write_text(
        "from kumoauth import kumo\n"
        "@kumo.on('smtp_server_auth_plain')\n"
        "def auth(authz, authc, password, conn_meta):\n"
        "    return password == 'tiger'\n"
    )
    lockfile = tmp_path / "locked"
    lockfile.write_text("scott\n")
    replies = {}
    for password in ("tiger", "wrong"):
        s = Session(
            load_policy(tmp_path / "policy.py"),
            spool_dir=tmp_path / f"spool-{password}",
            auth_required=False,
            auth=AuthConfig(failure_delay=1.0),
        )
        s.runtime.process.locked_users.use(lockfile, locked.read(lockfile))
        s.command("EHLO client.example")
        early = s.command("AUTH PLAIN " + plain_b64("", "scott", password))
        s.clock.advance(0.5)
        early += s.output()
        s.clock.advance(0.6)
        replies[password] = (early, s.output())
        assert s.meta.get_meta("authn_id") is None and s.meta.get_meta("authz_id") is None
        assert s.command("MAIL FROM:<x@example.com>").startswith("250")
        assert s.command("RCPT TO:<y@example.net>").startswith("250")
        assert s.command("DATA").startswith("354")
        assert s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n").startswith("250")
        (message,) = s.messages()
        assert "authn_id" not in message.meta
        s.close()
    assert (
        replies["tiger"]
        == replies["wrong"]
        == (
            "",
            "535 5.7.8 Authentication credentials invalid\r\n",
        )
    )


def test_a_lock_on_the_login_closes_a_session_the_store_named_otherwise(tmp_path: Path) -> None:
    # The review: a lock on "alice" refused her next login, but her open
    # session, whose account the store had named alice@example.com (as a
    # Dovecot realm does), went on sending: only the account was looked at.
    from twisted.cred.checkers import ICredentialsChecker
    from twisted.internet import defer
    from zope.interface import implementer

    from kumoauth.auth.cred import IPlainCredentials
    from kumoauth.testing import Session, plain_b64

    @implementer(ICredentialsChecker)
    class NamingStore:
        """A store that knows alice as alice@example.com."""

        credentialInterfaces = (IPlainCredentials,)

        def requestAvatarId(self, credentials: IPlainCredentials) -> defer.Deferred[str]:
            return defer.succeed(f"{credentials.authc}@example.com")

    lockfile = tmp_path / "locked"
    lockfile.write_text("# none yet\n")
    s = Session(spool_dir=tmp_path / "spool", checkers=[NamingStore()])
    s.runtime.process.locked_users.use(lockfile, locked.read(lockfile))
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "alice", "pw")).startswith("235")
    assert s.meta.get_meta("authn_id") == "alice@example.com"
    lockfile.write_text("# phished\nalice\n")
    s.clock.advance(locked.CHECK_EVERY)
    assert s.command("MAIL FROM:<alice@example.com>") == (
        "421 4.7.0 Account locked, closing connection\r\n"
    )
    assert s.closed


def test_a_reload_with_the_file_gone_keeps_the_configuration(tmp_path: Path, certs: Certs) -> None:
    with locking_server(tmp_path, certs, "scott\n") as (srv, lockfile):
        lockfile.unlink()
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in srv.log())
        time.sleep(1.2)  # the file is looked at once a second
        # The names read before stay locked; the state line says so once.
        with starttls_client(srv) as s, pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("scott", "tiger")
        log = srv.log()
    (failed,) = [x for x in log.splitlines() if "reload failed" in x]
    assert failed.endswith(f"[auth] locked_users: {lockfile}: No such file or directory")
    assert log.count("locked_users file") == 1
    assert "Traceback" not in log
