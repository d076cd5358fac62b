"""
kumoauth.backends.passwdfile against files made by the real tools: a
Dovecot passwd-file with one user per scheme (hashes from ``doveadm pw``,
``htpasswd``, ``mkpasswd``) and an htpasswd file written by ``htpasswd``
itself, checked on the real reactor (in a thread) with the real thread
pool; one end-to-end test through ``twistd kumoauth``.

A test that needs a tool skips when it is missing, and fails when CI is set
(``tests/test_schemes.py``'s :func:`need`).
"""

from __future__ import annotations

import base64
import os
import smtplib
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.cred import error as cred_error
from twisted.internet import defer

from kumoauth.auth.checkers import build, resolve
from kumoauth.auth.cred import BackendUnavailable, PlainCredentials
from kumoauth.backends import passwdfile
from kumoauth.backends.base import DENIED, BackendError, StoreChecker
from kumoauth.backends.passwdfile import PasswdFile, from_argstring, validate
from kumoauth.meta import ConnMeta
from tests.server import passwd_file_server
from tests.test_schemes import (  # noqa: F401 - doveadm is a fixture
    PASSWORD,
    WRONG,
    doveadm,
    doveadm_hash,
    htpasswd_hash,
    mkpasswd_hash,
    need,
    run,
)
from tests.upstream import in_reactor, start_reactor

#: a stored value's body that must never reach a log
HASH_BODY = "s3cr3tHASHb0dyXYZ"


@pytest.fixture(scope="module", autouse=True)
def reactor() -> Any:
    return start_reactor()


@pytest.fixture(scope="module")
def hashes(request: pytest.FixtureRequest) -> dict[str, str]:
    """user name -> a hash of PASSWORD made by a real tool, one per scheme."""
    dove = request.getfixturevalue("doveadm")  # tests/test_schemes.py's, imported
    made = {
        f"dove-{scheme.lower()}": doveadm_hash(dove, scheme)
        for scheme in (
            "ARGON2ID",
            "ARGON2I",
            "BLF-CRYPT",
            "SHA512-CRYPT",
            "SHA256-CRYPT",
            "SSHA512",
            "SSHA256",
            "SSHA",
            "PLAIN",
            "CLEAR",
        )
    }
    made["htpasswd-bcrypt"] = htpasswd_hash("B")
    made["htpasswd-apr1"] = htpasswd_hash("m")
    made["mkpasswd-yescrypt"] = mkpasswd_hash("yescrypt")
    made["mkpasswd-sha512"] = mkpasswd_hash("sha-512")
    return made


def dovecot_lines(hashes: dict[str, str]) -> str:
    lines = ["# kumoauth test users", ""]
    for i, (user, stored) in enumerate(sorted(hashes.items())):
        if i % 2:
            # the full Dovecot form, with userdb fields and extra fields
            lines.append(f"{user}:{stored}:{1000 + i}:{1000 + i}::/home/{user}::userdb_quota=1G")
        else:
            lines.append(f"{user}:{stored}")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check(store: Any, authc: str, password: str, authz: str = "", conn_meta: Any = None) -> Any:
    return in_reactor(store.check, authz, authc, password, conn_meta)


def check_error(store: Any, authc: str, password: str) -> BackendError:
    with pytest.raises(BackendError) as e:
        check(store, authc, password)
    return e.value


def store_for(path: Path, **kw: Any) -> PasswdFile:
    kw.setdefault("check_interval", 0.0)
    store = PasswdFile(path, **kw)
    in_reactor(store.start)
    return store


def log_lines(captured_log: Any, needle: str) -> list[str]:
    from twisted.logger import formatEvent

    return [t for e in captured_log.events if needle in (t := formatEvent(e) or "")]


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory, hashes: dict[str, str]) -> Path:
    path = tmp_path_factory.mktemp("passwd") / "users"
    path.write_text(dovecot_lines(hashes))
    return path


@pytest.fixture(scope="module")
def users(users_file: Path) -> PasswdFile:
    return store_for(users_file)


# --------------------------------------------------------------------------
# each scheme, each answer


USERS = [
    "dove-argon2id",
    "dove-argon2i",
    "dove-blf-crypt",
    "dove-sha512-crypt",
    "dove-sha256-crypt",
    "dove-ssha512",
    "dove-ssha256",
    "dove-ssha",
    "dove-plain",
    "dove-clear",
    "htpasswd-bcrypt",
    "htpasswd-apr1",
    "mkpasswd-yescrypt",
    "mkpasswd-sha512",
]


@pytest.mark.parametrize("user", USERS)
def test_each_scheme_verifies(users, user):
    verdict = check(users, user, PASSWORD)
    assert verdict.ok and verdict.meta == {}
    assert check(users, user, WRONG) == DENIED
    assert check(users, user, PASSWORD + "x") == DENIED


def test_htpasswd_file_written_by_htpasswd(tmp_path):
    path = tmp_path / "htpasswd"
    htpasswd = need("htpasswd")
    run([htpasswd, "-c", "-b", "-B", "-C", "5", str(path), "alice", PASSWORD])
    run([htpasswd, "-b", "-m", str(path), "bob", "bob's other password"])
    store = store_for(path)
    assert check(store, "alice", PASSWORD).ok
    assert check(store, "bob", "bob's other password").ok
    assert check(store, "alice", "bob's other password") == DENIED
    assert check(store, "bob", PASSWORD) == DENIED
    # htpasswd -D rewrites the file: picked up without a restart
    run([htpasswd, "-D", str(path), "bob"])
    assert check(store, "bob", "bob's other password") == DENIED
    assert check(store, "alice", PASSWORD).ok


def test_unknown_user_empty_password_and_case(users):
    assert check(users, "nobody", PASSWORD) == DENIED
    assert check(users, "dove-plain", "") == DENIED
    assert check(users, "", PASSWORD) == DENIED
    # compared exactly, as Dovecot does by default
    assert check(users, "DOVE-PLAIN", PASSWORD) == DENIED
    assert check(users, "dove-plain ", PASSWORD) == DENIED


def test_authz_must_be_authc(users):
    assert check(users, "dove-plain", PASSWORD, authz="dove-plain").ok
    assert check(users, "dove-plain", PASSWORD, authz="dove-clear") == DENIED


@pytest.mark.parametrize(
    "authc",
    [
        "dove-plain:{PLAIN}x",
        "dove-plain\n",
        "dove-plain\x00",
        "# kumoauth test users",
        "*",
        ":",
        "dove-plain:" + PASSWORD,
    ],
)
def test_injection_in_the_user_name(users, authc):
    assert check(users, authc, PASSWORD) == DENIED
    assert check(users, authc, "x") == DENIED


def test_a_line_without_a_password_and_a_locked_one(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"nopass:\nlocked:!{{PLAIN}}{PASSWORD}\nstar:*\nok:{{PLAIN}}{PASSWORD}\n")
    store = store_for(path)
    for user in ("nopass", "locked", "star"):
        assert check(store, user, PASSWORD) == DENIED
        assert check(store, user, "") == DENIED
    assert check(store, "ok", PASSWORD).ok


def test_nologin_and_allow_nets(tmp_path):
    path = tmp_path / "users"
    path.write_text(
        f"barred:{{PLAIN}}{PASSWORD}::::::nologin reason=gone\n"
        f"office:{{PLAIN}}{PASSWORD}::::::allow_nets=192.0.2.0/24,2001:db8::/32\n"
        f"typo:{{PLAIN}}{PASSWORD}::::::allow_nets=192.0.2.300\n"
    )
    store = store_for(path)

    def from_ip(received_from: str) -> ConnMeta:
        return ConnMeta({"received_from": received_from})

    assert check(store, "barred", PASSWORD, conn_meta=from_ip("192.0.2.1:5000")) == DENIED
    assert check(store, "office", PASSWORD, conn_meta=from_ip("192.0.2.7:5000")).ok
    assert check(store, "office", PASSWORD, conn_meta=from_ip("[::ffff:192.0.2.7]:5000")).ok
    assert check(store, "office", PASSWORD, conn_meta=from_ip("[2001:db8::1]:5000")).ok
    assert check(store, "office", PASSWORD, conn_meta=from_ip("198.51.100.1:5000")) == DENIED
    assert check(store, "office", PASSWORD) == DENIED  # no address known: not allowed
    assert check(store, "typo", PASSWORD, conn_meta=from_ip("192.0.2.7:5000")) == DENIED


# Lines with the extra fields on which Dovecot refuses a login (besides
# nologin and allow_nets), and what kumoauth answers from 192.0.2.7 and from
# 198.51.100.1: True (235), False (535), None (454).  Each was refused (or
# let through more widely) by kumoauth before it read them as Dovecot does.
DOVECOT_FIELDS: dict[str, tuple[str, bool | None, bool | None]] = {
    # name: (extra fields, answer from 192.0.2.7, answer from 198.51.100.1)
    "plain": ("userdb_quota=1G nodelay nopassword host=10.0.0.1", True, True),
    "fail": ("fail", False, False),
    "failno": ("fail=no", False, False),  # Dovecot: a field's presence is "yes"
    "noauth": ("noauthenticate", False, False),
    "imported": ("passdb_import=fail", False, False),
    "importtwice": ("passdb_import=userdb_quota=1G passdb_import:protected=fail", False, False),
    "protected": ("fail:protected", False, False),
    "realnets": ("allow_real_nets=192.0.2.0/24", True, False),
    "realnone": ("allow_real_nets=203.0.113.0/24", False, False),
    "twonets": ("allow_nets=192.0.2.0/24 allow_nets=198.51.100.0/24", False, False),
    "bothnets": ("allow_nets=192.0.2.0/24 allow_nets:protected=198.51.100.0/24", True, False),
    "tabbed": ("allow_nets=198.51.100.0/24\t192.0.2.0/24", False, False),
    "netmask": ("allow_nets=192.0.2.0/255.255.255.0", False, False),
    "emptynets": ("allow_nets=", False, False),
    "emptyuser": ("user=", False, False),
    "past": (f"delay_until={int(time.time()) - 60}+10", True, True),
    "late": (f"delay_until={int(time.time()) + 3600}", False, False),
    "baddelay": ("delay_until=tomorrow", False, False),
}


def dovecot_fields_file(path: Path) -> None:
    path.write_text(
        "".join(
            f"{name}:{{PLAIN}}{PASSWORD}::::::{extra}\n"
            for name, (extra, _, _) in DOVECOT_FIELDS.items()
        )
    )


INSIDE = "192.0.2.7:5000"
OUTSIDE = "198.51.100.1:5000"


def answer(store: Any, user: str, password: str, conn_meta: Any) -> bool | None:
    try:
        return bool(check(store, user, password, conn_meta=conn_meta))
    except BackendError:
        return None


@pytest.mark.parametrize("user", sorted(DOVECOT_FIELDS))
def test_dovecot_refusing_extra_fields(tmp_path, user, captured_log):
    path = tmp_path / "users"
    dovecot_fields_file(path)
    store = store_for(path)
    _, inside, outside = DOVECOT_FIELDS[user]
    assert answer(store, user, PASSWORD, ConnMeta({"received_from": INSIDE})) is inside
    assert answer(store, user, PASSWORD, ConnMeta({"received_from": OUTSIDE})) is outside
    assert answer(store, user, WRONG, ConnMeta({"received_from": INSIDE})) is False
    assert PASSWORD not in captured_log.text()


def test_allow_real_nets_is_the_proxys_address_when_a_proxy_named_the_client(tmp_path):
    path = tmp_path / "users"
    path.write_text(
        f"direct:{{PLAIN}}{PASSWORD}::::::allow_real_nets=192.0.2.0/24\n"
        f"proxied:{{PLAIN}}{PASSWORD}::::::allow_real_nets=10.0.0.0/8\n"
        f"both:{{PLAIN}}{PASSWORD}::::::allow_nets=192.0.2.0/24 allow_real_nets=10.0.0.0/8\n"
    )
    store = store_for(path)
    via_proxy = ConnMeta({"received_from": INSIDE, "received_from_proxy": "10.0.0.5:6000"})
    direct = ConnMeta({"received_from": INSIDE})
    assert check(store, "direct", PASSWORD, conn_meta=direct).ok
    assert check(store, "direct", PASSWORD, conn_meta=via_proxy) == DENIED
    assert check(store, "proxied", PASSWORD, conn_meta=via_proxy).ok
    assert check(store, "proxied", PASSWORD, conn_meta=direct) == DENIED
    assert check(store, "both", PASSWORD, conn_meta=via_proxy).ok
    outside = ConnMeta({"received_from": OUTSIDE, "received_from_proxy": "10.0.0.5:6000"})
    assert check(store, "both", PASSWORD, conn_meta=outside) == DENIED
    # a proxy address that does not parse is an unknown peer: never allowed
    garbled = ConnMeta({"received_from": INSIDE, "received_from_proxy": "somewhere"})
    assert check(store, "direct", PASSWORD, conn_meta=garbled) == DENIED
    assert check(store, "direct", PASSWORD) == DENIED  # no address at all


def test_delay_until_within_five_minutes_is_454_until_then(tmp_path, captured_log):
    path = tmp_path / "users"
    # 4-5 s ahead: margin for a loaded box between writing and checking
    soon = int(time.time()) + 5
    path.write_text(f"soon:{{PLAIN}}{PASSWORD}::::::delay_until={soon}+30\n")
    store = store_for(path)
    e = check_error(store, "soon", PASSWORD)
    assert e.outage is False and "(delay_until)" in str(e) and PASSWORD not in str(e)
    assert check(store, "soon", WRONG) == DENIED  # a wrong password is still just wrong
    time.sleep(max(0.0, soon - time.time()) + 0.1)
    assert check(store, "soon", PASSWORD).ok


def test_refusing_fields_are_logged_by_name(tmp_path, captured_log):
    path = tmp_path / "users"
    dovecot_fields_file(path)
    store = store_for(path)
    for user in ("fail", "noauth", "realnets", "baddelay"):
        check(store, user, PASSWORD, conn_meta=ConnMeta({"received_from": OUTSIDE}))
    for user, field in [
        ("fail", "fail"),
        ("noauth", "noauthenticate"),
        ("realnets", "allow_real_nets"),
        ("baddelay", "delay_until"),
    ]:
        assert len(log_lines(captured_log, f"user {user} ({path} line")) == 1
        (line,) = log_lines(captured_log, f"user {user} ({path} line")
        assert line.endswith(f"may not log in from 198.51.100.1 ({field})"), line
    assert len(log_lines(captured_log, "user baddelay: delay_until is not a Unix time")) == 1
    assert len(log_lines(captured_log, "user netmask: an allow_nets entry is not")) == 1
    assert PASSWORD not in captured_log.text()


def test_dovecot_refuses_the_same_lines(tmp_path, reactor):
    """
    The lines above in a real Dovecot's passwd-file, asked through the
    Dovecot store (``rip`` from received_from; Dovecot takes it as
    ``real_rip`` too): kumoauth's passwd-file answers each as Dovecot does.
    (``delay_until`` within five minutes is left out: Dovecot holds the
    answer until then, kumoauth answers 454 at once.)
    """
    from kumoauth.backends.dovecot import Dovecot
    from tests import dovecot_auth as lab
    from tests import postfix as pf

    lab.require_dovecot()
    ours = tmp_path / "users"
    dovecot_fields_file(ours)
    store = store_for(ours)
    with pf.service_directory("kumoauth-passwd-dovecot-") as base:
        d = lab.Dovecot(base / "d", lab.Users())
        dovecot_fields_file(d.directory / "users")
        d.start()
        try:
            theirs = in_reactor(lambda: Dovecot(d.client_socket, reactor=reactor))
            cases = [(user, address) for user in DOVECOT_FIELDS for address in (INSIDE, OUTSIDE)]

            def cannot_say(f: Any) -> None:
                f.trap(BackendError)

            def ask_dovecot() -> defer.Deferred[list[bool | None]]:
                # All at once: Dovecot holds each refusal back for a while.
                return defer.gatherResults(
                    [
                        defer.maybeDeferred(
                            theirs.check, "", user, PASSWORD, ConnMeta({"received_from": address})
                        ).addCallbacks(bool, cannot_say)
                        for user, address in cases
                    ]
                )

            try:
                dove = in_reactor(ask_dovecot)
            finally:
                in_reactor(theirs.stop)
            for (user, address), said in zip(cases, dove, strict=True):
                kumo = answer(store, user, PASSWORD, ConnMeta({"received_from": address}))
                assert kumo is said, (user, address, kumo, said, d.log()[-2000:])
        finally:
            d.stop()


# --------------------------------------------------------------------------
# what the operator reads


def test_a_name_no_login_can_reach_is_said_with_its_line(tmp_path, captured_log):
    # An NFD "zoë" (macOS tools write it so) got 535 with the right
    # password, and the load line only said "3 users" (outside test).
    path = tmp_path / "users"
    path.write_text(
        f"zoe\u0308:{{PLAIN}}{PASSWORD}\n"  # NFD
        f"\uff46ull:{{PLAIN}}{PASSWORD}\n"  # fullwidth f: NFKC makes it "full"
        f"j\u00fcrgen:{{PLAIN}}{PASSWORD}\n"  # NFC: fine
        f"bad\u202e:{{PLAIN}}{PASSWORD}\n",  # a bidi override: never a login
        encoding="utf-8",
    )
    store = store_for(path)
    assert check(store, "j\u00fcrgen", PASSWORD).ok
    said = log_lines(captured_log, "can never log in")
    assert len(said) == 3, said
    assert f"{path} line 1: user zo\u00eb can never log in" not in said[0]  # shown as stored
    assert said[0].startswith(f"auth backend passwd-file: {path} line 1: user zoe")
    assert "a login becomes zo\u00eb (SASLprep: NFKC); write the name in that form" in said[0]
    assert "line 2:" in said[1] and "a login becomes full" in said[1]
    assert "line 4:" in said[2] and "contains a prohibited character (SASLprep)" in said[2]
    assert "\u202e" not in captured_log.text()
    assert PASSWORD not in captured_log.text()


def test_malformed_lines_are_skipped_and_logged_once(tmp_path, captured_log):
    path = tmp_path / "users"
    path.write_text(
        "# header\n"
        f"good:{{PLAIN}}{PASSWORD}\n"
        f"{{PLAIN}}{HASH_BODY}\n"  # line 3: no ':', perhaps a bare hash
        f":{{PLAIN}}{HASH_BODY}\n"  # line 4: empty user
        f"good:{{PLAIN}}{HASH_BODY}\n"  # line 5: listed again; the first counts
    )
    with open(path, "ab") as f:
        f.write(b"caf\xe9:{PLAIN}" + HASH_BODY.encode() + b"\n")  # line 6: not UTF-8
    store = store_for(path)
    for _ in range(3):
        assert check(store, "good", PASSWORD).ok
        assert check(store, "good", HASH_BODY) == DENIED
    assert len(log_lines(captured_log, f"{path} line 3: no ':'")) == 1
    assert len(log_lines(captured_log, f"{path} line 4: empty user name")) == 1
    assert len(log_lines(captured_log, f"{path} line 5: user good again (first on line 2)")) == 1
    assert len(log_lines(captured_log, f"{path} line 6: not UTF-8")) == 1
    assert len(log_lines(captured_log, f"read {path}: 1 users")) == 1
    text = captured_log.text()
    assert HASH_BODY not in text
    assert PASSWORD not in text


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path, captured_log):
    # Notepad's UTF-8 BOM made the first user "\ufeffalice": refused, silently.
    path = tmp_path / "users"
    path.write_bytes(
        b"\xef\xbb\xbfalice:{PLAIN}"
        + PASSWORD.encode()
        + b"\r\nbob:{PLAIN}"
        + PASSWORD.encode()
        + b"\r\n"
    )
    store = store_for(path)
    assert check(store, "alice", PASSWORD).ok
    assert check(store, "bob", PASSWORD).ok
    assert len(log_lines(captured_log, f"read {path}: 2 users")) == 1


def test_unknown_scheme_is_454_and_logged_once_per_user(tmp_path, captured_log):
    path = tmp_path / "users"
    path.write_text(
        f"good:{{PLAIN}}{PASSWORD}\n"
        f"md5:{{MD5-CRYPT}}$1$abc${HASH_BODY}\n"
        f"pbkdf2:{{PBKDF2}}{HASH_BODY}\n"
    )
    store = store_for(path)
    for _ in range(3):
        for user in ("md5", "pbkdf2"):
            e = check_error(store, user, PASSWORD)
            assert e.outage is False
            assert HASH_BODY not in str(e)
    assert check(store, "good", PASSWORD).ok
    assert len(log_lines(captured_log, "user md5 (" + f"{path} line 2)")) == 1
    assert len(log_lines(captured_log, "user pbkdf2 (" + f"{path} line 3)")) == 1
    assert HASH_BODY not in captured_log.text()


def test_no_secret_in_logs_reprs_or_errors(users, users_file, hashes, captured_log):
    for user in ("dove-argon2id", "dove-plain", "nobody"):
        check(users, user, PASSWORD)
        check(users, user, WRONG)
    text = captured_log.text() + repr(users) + repr(users.users)
    for secret in (PASSWORD, WRONG, *hashes.values()):
        assert secret not in text
    assert repr(users) == f"<PasswdFile {str(users_file)!r} ({len(USERS)} users)>"


# --------------------------------------------------------------------------
# re-reading


def test_a_change_is_picked_up_without_restart(tmp_path, captured_log):
    path = tmp_path / "users"
    path.write_text("alice:{PLAIN}old password\n")
    store = store_for(path)
    changes: list[int] = []
    store.subscribe(lambda: changes.append(1))
    assert check(store, "alice", "old password").ok
    write_atomically(path, "alice:{PLAIN}new password\nbob:{PLAIN}bob's\n")
    assert check(store, "alice", "new password").ok
    assert check(store, "alice", "old password") == DENIED
    assert check(store, "bob", "bob's").ok
    assert changes == [1]
    # same content again (a touch, a rewrite): no change for subscribers
    write_atomically(path, "alice:{PLAIN}new password\nbob:{PLAIN}bob's\n")
    assert check(store, "alice", "new password").ok
    assert changes == [1]
    assert len(log_lines(captured_log, f"re-read {path}: 2 users")) == 1


def test_the_check_interval_bounds_the_stats(tmp_path):
    path = tmp_path / "users"
    path.write_text("alice:{PLAIN}old\n")
    store = store_for(path, check_interval=3600.0)
    # long past the racy window, so only a stat can tell
    os.utime(path, ns=(time.time_ns() - 10**10, time.time_ns() - 10**10))
    in_reactor(store.reload, passwdfile.Config(path, check_interval=3600.0))
    write_atomically(path, "alice:{PLAIN}new\n")
    assert check(store, "alice", "old").ok  # not looked at within the interval
    store.next_check = 0.0
    assert check(store, "alice", "new").ok


def test_a_same_size_rewrite_within_one_mtime_tick_is_seen(tmp_path):
    path = tmp_path / "users"
    path.write_text("alice:{PLAIN}aaaa\n")
    store = store_for(path)
    st = os.stat(path)
    with open(path, "r+") as f:  # same inode, same size
        f.write("alice:{PLAIN}bbbb\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime as well
    assert check(store, "alice", "bbbb").ok
    assert check(store, "alice", "aaaa") == DENIED


def test_a_half_written_file_never_replaces_a_good_one(tmp_path, captured_log):
    path = tmp_path / "users"
    path.write_text("alice:{PLAIN}alice1\nbob:{PLAIN}bob1\n")
    store = store_for(path)
    changes: list[int] = []
    store.subscribe(lambda: changes.append(1))
    with open(path, "w") as f:  # truncated, then written in place: not done yet
        f.write("alice:{PLAIN}alice2\nbob:{PLAI")
        f.flush()
        for _ in range(3):
            assert check(store, "alice", "alice1").ok
            assert check(store, "bob", "bob1").ok
        assert changes == []
        f.write("N}bob2\n")
    assert check(store, "alice", "alice2").ok
    assert check(store, "bob", "bob2").ok
    assert check(store, "alice", "alice1") == DENIED
    assert changes == [1]
    refused = log_lines(captured_log, "does not end with a newline")
    assert len(refused) == 1
    assert "keeping the 2 users" in refused[0]
    # an empty file (truncated, nothing written yet) is not an empty table
    path.write_text("")
    assert check(store, "alice", "alice2").ok
    assert len(log_lines(captured_log, "it is empty (still being written?)")) == 1
    assert changes == [1]


def test_a_vanished_file_keeps_the_table(tmp_path, captured_log):
    path = tmp_path / "users"
    path.write_text("alice:{PLAIN}alice1\n")
    store = store_for(path)
    path.unlink()
    for _ in range(3):
        assert check(store, "alice", "alice1").ok
    assert len(log_lines(captured_log, "keeping the 1 users read before")) == 1
    write_atomically(path, "alice:{PLAIN}alice2\n")
    assert check(store, "alice", "alice2").ok


def test_unreadable_at_first_then_recovers(tmp_path, captured_log):
    path = tmp_path / "users"
    store = PasswdFile(path, check_interval=0.0)
    checker = StoreChecker(store, start_reactor())
    meta = ConnMeta({"received_from": "127.0.0.1:5000"})

    def login(password: str) -> Any:
        return in_reactor(checker.requestAvatarId, PlainCredentials("", "alice", password, meta))

    for _ in range(3):
        e = check_error(store, "alice", "alice1")
        assert e.outage and "No such file or directory" in str(e)
        with pytest.raises(BackendUnavailable):
            login("alice1")
    path.write_text("alice:{PLAIN}alice1\n")
    assert login("alice1") == "alice"
    with pytest.raises(cred_error.UnauthorizedLogin):
        login("wrong")
    assert len(log_lines(captured_log, "auth backend passwd-file unavailable")) == 1
    assert len(log_lines(captured_log, "auth backend passwd-file available again")) == 1
    assert len(log_lines(captured_log, f"cannot read {path}: No such file")) == 1
    assert "alice1" not in captured_log.text()


# --------------------------------------------------------------------------
# timing: an unknown user costs a verification of the file's own kind


def median_seconds(store: PasswdFile, users: list[str]) -> float:
    times = []
    for user in users:
        start = time.perf_counter()
        assert check(store, user, WRONG) == DENIED
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("kind", ["argon2id", "bcrypt-cost-5"])
def test_unknown_user_takes_as_long_as_a_wrong_password(tmp_path, hashes, kind):
    if kind == "argon2id":
        stored = [hashes["dove-argon2id"]] * 3
    else:
        htpasswd = need("htpasswd")
        stored = [
            run([htpasswd, "-nbB", "-C", "5", f"u{i}", PASSWORD]).partition(":")[2]
            for i in range(3)
        ]
    path = tmp_path / "users"
    path.write_text("".join(f"u{i}:{s}\n" for i, s in enumerate(stored)) + "x:{SSHA}AAAA\n")
    store = store_for(path)
    check(store, "warm-up", WRONG)
    known, unknown = [], []
    # Interleaved, so load on the box hits both alike; a 2 ms bcrypt check
    # needs more rounds than a 150 ms Argon2 one for a stable median.
    for round_ in range(5 if kind == "argon2id" else 25):
        known.append(median_seconds(store, [f"u{round_ % 3}"]))
        unknown.append(median_seconds(store, [f"nobody{round_}"]))
    ratio = statistics.median(unknown) / statistics.median(known)
    assert 0.5 < ratio < 2.0, (kind, known, unknown)


@pytest.mark.parametrize("prefix", ["", "{BLF-CRYPT}", "{CRYPT}"])
def test_the_unknown_users_dummy_has_the_bcrypt_cost_in_every_form(prefix):
    # doveadm pw -s CRYPT writes {CRYPT}$2y$05$...: the dummy for an unknown
    # user must be cost 5 too, not the default 10 (measurably slower).
    import bcrypt

    stored = prefix + bcrypt.hashpw(b"x", bcrypt.gensalt(5)).decode().replace("$2b$", "$2y$", 1)
    dummy = passwdfile.dummy_like(stored)
    assert dummy is not None and "$05$" in dummy, dummy
    assert passwdfile._cost_key(stored) == ("BLF-CRYPT", "5")


# --------------------------------------------------------------------------
# configuration


def test_validate(tmp_path):
    path = tmp_path / "users"
    path.write_text("")
    os.mkfifo(tmp_path / "fifo")
    config = validate({"path": "users"}, base=tmp_path)
    assert config == passwdfile.Config(path=path, check_interval=1.0)
    assert validate({"path": str(path), "check_interval": 0}, base=None).check_interval == 0.0
    for raw, message in [
        ({}, "path: required key is missing"),
        ({"path": "missing"}, f"path: {tmp_path / 'missing'}: file not found"),
        ({"path": "."}, f"path: {tmp_path}: is a directory, not a file"),
        ({"path": "fifo"}, f"path: {tmp_path / 'fifo'}: not a regular file"),
        ({"path": "users", "check_interval": -1}, "check_interval: must be at least 0"),
        ({"path": "users", "check_intervall": 1}, "check_intervall: unknown key"),
    ]:
        with pytest.raises(ValueError) as e:
            validate(raw, base=tmp_path)
        assert str(e.value).startswith(message), str(e.value)
        assert "\n" not in str(e.value)
    assert set(passwdfile.SCHEMA) == {"path", "check_interval"}


def test_missing_file_is_one_start_up_line(tmp_path):
    with pytest.raises(ValueError) as e:
        resolve("passwd-file", {"passwd-file": {"path": "nope"}}, base=tmp_path)
    assert str(e.value) == (f"[auth.passwd-file] path: {tmp_path / 'nope'}: file not found")


def test_factory_through_the_checker_registry(tmp_path):
    (tmp_path / "users").write_text("carol:{PLAIN}s3cret\n")
    spec = resolve("passwd-file", {"passwd-file": {"path": "users"}}, base=tmp_path)
    checker = build(spec, start_reactor(), None)
    assert isinstance(checker, StoreChecker) and isinstance(checker.store, PasswdFile)
    in_reactor(checker.start)
    meta = ConnMeta({})
    assert in_reactor(checker.requestAvatarId, PlainCredentials("", "carol", "s3cret", meta))


def test_from_argstring(tmp_path, monkeypatch):
    (tmp_path / "users").write_text("")
    monkeypatch.chdir(tmp_path)
    assert from_argstring("users") == passwdfile.Config(path=tmp_path / "users")
    with pytest.raises(ValueError, match="file not found"):
        from_argstring("other")


# --------------------------------------------------------------------------
# end to end


@pytest.mark.e2e
def test_end_to_end_through_twistd(tmp_path, hashes):
    with passwd_file_server(
        tmp_path,
        f"alice:{hashes['dove-sha512-crypt']}\nbroken:{{MD5-CRYPT}}$1$abc${HASH_BODY}\n",
        check_interval=0.1,
    ) as srv:
        users, certs = srv.directory / "users", srv.certs

        def login(user: str, password: str) -> int:
            with smtplib.SMTP("127.0.0.1", srv.starttls_port, timeout=10) as s:
                s.ehlo("client.example")
                s.starttls(context=certs.client_context())
                s.ehlo("client.example")
                # smtplib's login() cannot send a non-ASCII password: PLAIN by hand
                response = f"\0{user}\0{password}".encode()
                return s.docmd("AUTH", "PLAIN " + base64.b64encode(response).decode())[0]

        assert login("alice", PASSWORD) == 235
        assert login("alice", WRONG) == 535
        assert login("nobody", PASSWORD) == 535
        assert login("broken", PASSWORD) == 454
        write_atomically(users, "alice:{PLAIN}n3w-Passw0rd\n")
        time.sleep(0.2)
        assert login("alice", "n3w-Passw0rd") == 235
        assert login("alice", PASSWORD) == 535
        srv.stop()
        log = srv.log()
    assert "passwd-file" in log and "re-read" in log
    assert PASSWORD not in log and HASH_BODY not in log and "n3w-Passw0rd" not in log
