"""
kumoauth.backends.schemes and ``kumoauth pw`` against the real tools:
hashes made at test time by ``doveadm pw``, ``htpasswd`` and ``mkpasswd``
verify, and what ``kumoauth pw`` prints ``doveadm pw -t`` verifies.

A test that needs a tool skips when it is missing (``apt-get install
dovecot-core apache2-utils whois``), and fails instead when CI is set.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kumoauth.backends import schemes
from kumoauth.backends.schemes import (
    DUMMY_SCHEMES,
    HASH_SCHEMES,
    MalformedHash,
    Params,
    UnknownScheme,
    dummy,
    hash_password,
    scheme_of,
    verify,
)
from kumoauth.cli import main

PASSWORD = "Tr0ub4dor & 3 ünïcödé"
WRONG = "Tr0ub4dor & 3 ünïcödè"

#: cheap costs for property tests (Argon2's minimum memory is 8 KiB per lane)
FAST = Params(argon2_time_cost=1, argon2_memory_kib=8, bcrypt_cost=4)

TOOL_PACKAGES = {"doveadm": "dovecot-core", "htpasswd": "apache2-utils", "mkpasswd": "whois"}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        why = f"{tool} missing (apt-get install {TOOL_PACKAGES[tool]})"
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def doveadm(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``doveadm -c <a minimal config of our own>``."""
    conf = tmp_path_factory.mktemp("dovecot") / "dovecot.conf"
    conf.write_text("ssl = no\n")
    return [need("doveadm"), "-c", str(conf)]


def run(command: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, (command[0], done.returncode, done.stderr)
    return done.stdout.strip()


def doveadm_hash(doveadm: list[str], scheme: str) -> str:
    return run([*doveadm, "pw", "-s", scheme, "-p", PASSWORD])


def htpasswd_hash(flag: str) -> str:
    line = run([need("htpasswd"), f"-nb{flag}", "user", PASSWORD])
    user, _, stored = line.partition(":")
    assert user == "user"
    return stored


def mkpasswd_hash(method: str) -> str:
    return run([need("mkpasswd"), "-m", method, PASSWORD])


DOVEADM_SCHEMES = [*HASH_SCHEMES, "PLAIN", "CLEAR", "CLEARTEXT"]


# --------------------------------------------------------------------------
# hashes made by the real tools


@pytest.mark.parametrize("scheme", DOVEADM_SCHEMES)
def test_doveadm_hashes_verify(doveadm, scheme):
    stored = doveadm_hash(doveadm, scheme)
    assert stored.startswith(f"{{{scheme}}}")
    assert scheme_of(stored) == scheme
    assert verify(stored, PASSWORD)
    assert not verify(stored, WRONG)
    assert not verify(stored, PASSWORD + "x")
    assert not verify(stored, "")


@pytest.mark.parametrize("encoding", ["B64", "HEX"])
@pytest.mark.parametrize(
    "scheme", ["SSHA512", "SSHA", "SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "PLAIN"]
)
def test_doveadm_encoding_suffixes_verify(doveadm, scheme, encoding):
    # doveadm pw -s SSHA512.HEX prints {SSHA512.HEX}: the scheme's own form in hex
    stored = doveadm_hash(doveadm, f"{scheme}.{encoding}")
    assert stored.startswith(f"{{{scheme}.{encoding}}}")
    assert scheme_of(stored) == scheme
    assert verify(stored, PASSWORD)
    assert not verify(stored, WRONG)


@pytest.mark.parametrize(
    ("flag", "prefix", "scheme"), [("B", "$2y$", "BLF-CRYPT"), ("m", "$apr1$", "APR1")]
)
def test_htpasswd_hashes_verify(flag, prefix, scheme):
    stored = htpasswd_hash(flag)
    assert stored.startswith(prefix)
    assert scheme_of(stored) == scheme
    assert verify(stored, PASSWORD)
    assert not verify(stored, WRONG)


@pytest.mark.parametrize(
    ("method", "prefix", "scheme"),
    [
        ("yescrypt", "$y$", "YESCRYPT"),
        ("sha-512", "$6$", "SHA512-CRYPT"),
        ("sha-256", "$5$", "SHA256-CRYPT"),
        ("bcrypt", "$2b$", "BLF-CRYPT"),
    ],
)
def test_mkpasswd_hashes_verify(method, prefix, scheme):
    stored = mkpasswd_hash(method)
    assert stored.startswith(prefix)
    assert scheme_of(stored) == scheme
    assert verify(stored, PASSWORD)
    assert not verify(stored, WRONG)


@pytest.fixture(scope="session")
def crypt_strings(doveadm) -> dict[str, str]:
    """crypt(3) strings of PASSWORD from the real tools, by the scheme they are."""
    return {
        "BLF-CRYPT": doveadm_hash(doveadm, "CRYPT").removeprefix("{CRYPT}"),
        "SHA512-CRYPT": doveadm_hash(doveadm, "SHA512-CRYPT").removeprefix("{SHA512-CRYPT}"),
        "SHA256-CRYPT": mkpasswd_hash("sha-256"),
        "YESCRYPT": mkpasswd_hash("yescrypt"),
    }


def test_doveadm_crypt_is_bcrypt_and_verifies(doveadm):
    # CRYPT is Dovecot's default scheme; doveadm 2.3 makes it bcrypt
    stored = doveadm_hash(doveadm, "CRYPT")
    assert stored.startswith("{CRYPT}$2y$")
    assert scheme_of(stored) == "BLF-CRYPT"
    assert verify(stored, PASSWORD)
    assert not verify(stored, WRONG)
    assert not verify(stored, "")


@pytest.mark.parametrize("scheme", ["BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "YESCRYPT"])
@pytest.mark.parametrize("prefix", ["{CRYPT}", "{crypt}"])
def test_crypt_prefix_verifies_what_dovecot_verifies(doveadm, crypt_strings, scheme, prefix):
    stored = prefix + crypt_strings[scheme]
    assert "(verified)" in run([*doveadm, "pw", "-t", stored, "-p", PASSWORD])
    assert scheme_of(stored) == scheme
    assert verify(stored, PASSWORD)
    assert not verify(stored, WRONG)


@settings(max_examples=10, deadline=None)
@given(st.text(min_size=1, max_size=30).filter(lambda s: "\x00" not in s))
def test_crypt_prefix_is_the_bare_form(password):
    bare = bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(4)).decode()
    assert verify("{CRYPT}" + bare, password) is verify(bare, password) is True
    assert verify("{CRYPT}" + bare, password + "x") is verify(bare, password + "x")


@pytest.mark.parametrize("scheme", ["DES-CRYPT", "MD5-CRYPT"])
def test_crypt_prefix_with_a_form_kumoauth_does_not_read(doveadm, scheme):
    # Dovecot reads these through crypt(3); kumoauth does not, with or
    # without the prefix: one line naming {CRYPT}, never the value
    value = doveadm_hash(doveadm, scheme).removeprefix(f"{{{scheme}}}")
    with pytest.raises(UnknownScheme) as e:
        verify("{CRYPT}" + value, PASSWORD)
    message = str(e.value)
    assert "{CRYPT}" in message and "\n" not in message
    assert value not in message and PASSWORD not in message


def test_bcrypt_2a_prefix_verifies():
    made = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4, prefix=b"2a")).decode()
    assert made.startswith("$2a$")
    assert verify(made, PASSWORD)
    assert verify("{BLF-CRYPT}" + made, PASSWORD)
    assert not verify(made, WRONG)


# --------------------------------------------------------------------------
# bcrypt's 72 bytes


def test_long_password_against_htpasswd_bcrypt_of_its_first_72_bytes():
    long = "x" * 72 + "and then some"
    stored = run([need("htpasswd"), "-nbB", "user", long[:72]]).partition(":")[2]
    assert verify(stored, long)
    assert verify(stored, long[:72])
    assert not verify(stored, long[:71])


@settings(max_examples=25)
@given(st.text(min_size=1, max_size=100).filter(lambda s: "\x00" not in s))
def test_long_password_against_bcrypt_of_its_first_72_bytes(text):
    password = (text * 80)[:100]
    encoded = password.encode()
    if len(encoded) <= 72:
        password += "y" * (73 - len(encoded))
        encoded = password.encode()
    stored = bcrypt.hashpw(encoded[:72], bcrypt.gensalt(4)).decode()
    assert verify(stored, password)
    assert verify("{BLF-CRYPT}" + stored, password)


def test_hash_password_refuses_over_72_bytes_for_bcrypt():
    with pytest.raises(ValueError, match="72 bytes") as e:
        hash_password("é" * 37, "BLF-CRYPT", FAST)
    assert "é" not in str(e.value)
    assert verify(hash_password("é" * 36, "BLF-CRYPT", FAST), "é" * 36)


# --------------------------------------------------------------------------
# what cannot be used


SECRET = "s3cr3tHASHb0dy"


@pytest.mark.parametrize(
    "stored",
    [
        f"{{MD5-CRYPT}}$1$abc${SECRET}",
        f"{{SHA}}{SECRET}=",
        f"{{PBKDF2}}{SECRET}",
        f"$1$abcdefgh${SECRET}",
        f"{{CRYPT}}$1$abcdefgh${SECRET}",
        f"{{CRYPT}}{SECRET}",
        f"{{crypt}}$apr1$abcdefgh${SECRET}",  # crypt(3) does not read it: neither does Dovecot
        "{CRYPT}",
        f"$argon2id$v=19$m=65536,t=3,p=1${SECRET}${SECRET}",
        SECRET,
        "",
    ],
)
def test_unknown_scheme_raises_without_leaking(stored):
    with pytest.raises(UnknownScheme) as e:
        verify(stored, PASSWORD)
    assert isinstance(e.value, ValueError)
    assert SECRET not in str(e.value)
    assert PASSWORD not in str(e.value)


@pytest.mark.parametrize("scheme", ["PBKDF2", "MD5-CRYPT", "SHA", "SSHA.ZZ"])
def test_an_unknown_scheme_is_named(scheme):
    # The operator's log line said "unknown password scheme" without which.
    with pytest.raises(UnknownScheme, match=re.escape(f"unknown password scheme {{{scheme}}}")):
        verify(f"{{{scheme.lower()}}}{SECRET}", PASSWORD)


@pytest.mark.parametrize(
    "stored",
    [
        f"{{SSHA512.HEX}}{SECRET}",
        f"{{SHA512-CRYPT.B64}}{SECRET}!",
        "{PLAIN.B64}/w==",  # not UTF-8 once decoded
        f"{{ARGON2ID}}{SECRET}",
        f"{{ARGON2ID}}$argon2i$v=19$m=65536,t=3,p=1${SECRET}${SECRET}AAAAAA",
        f"{{ARGON2I}}$argon2i$v=19$m=65536,t=3${SECRET}${SECRET}AAAAAA",
        f"{{BLF-CRYPT}}$6${SECRET}$abc",
        f"{{BLF-CRYPT}}{SECRET}",
        f"$2y$05${SECRET}",
        f"{{CRYPT}}$2y$05${SECRET}",
        f"{{CRYPT}}$6${SECRET}$not!crypt64",
        f"$2y$99${SECRET}" + "A" * 39,
        f"{{SHA512-CRYPT}}$5${SECRET}$abc",
        f"{{SHA256-CRYPT}}{SECRET}",
        f"$6${SECRET}$not!crypt64",
        f"$5$rounds=x${SECRET}$abc",
        f"$y$j9T${SECRET}$short",
        f"$y$!!!${SECRET}$" + "A" * 43,
        f"$apr1${SECRET}$abc",
        f"{{SSHA512}}{SECRET}!!",
        f"{{SSHA512}}{SECRET}AA",  # decodes, but shorter than the digest
        "{SSHA}",
        f"{{SSHA256}}{SECRET}=",
        f"{{ARG ON}}{SECRET}",
        f"{{}}{SECRET}",
        f"{{unclosed{SECRET}",
    ],
)
def test_malformed_hash_raises_without_leaking(stored):
    with pytest.raises(MalformedHash) as e:
        verify(stored, PASSWORD)
    assert isinstance(e.value, ValueError)
    assert SECRET not in str(e.value)
    assert PASSWORD not in str(e.value)
    assert e.value.__cause__ is None


def test_malformed_argon2_the_library_refuses(doveadm):
    # matches the shape, but the library cannot decode it (salt too short)
    stored = doveadm_hash(doveadm, "ARGON2ID")
    head, _, digest = stored.rpartition("$")
    broken = head.rpartition("$")[0] + "$AAAAAAAA$" + digest
    with pytest.raises(MalformedHash):
        verify(broken, PASSWORD)


def test_scheme_is_case_insensitive_in_braces(doveadm):
    stored = doveadm_hash(doveadm, "SSHA512")
    assert verify("{ssha512}" + stored.partition("}")[2], PASSWORD)


# --------------------------------------------------------------------------
# passwords that cannot be


def test_nul_and_surrogates_never_verify_and_are_not_hashed():
    plain = "{PLAIN}a\x00b"
    assert not verify(plain, "a\x00b")
    assert not verify(hash_password("ab", "SSHA512"), "a\ud800b")
    for bad in ("a\x00b", "a\ud800b"):
        with pytest.raises(ValueError) as e:
            hash_password(bad, "SSHA512")
        assert bad not in str(e.value)


def test_plain_compares_the_whole_password():
    assert verify("{PLAIN}tiger", "tiger")
    assert verify("{CLEAR}", "")
    assert not verify("{PLAIN}tiger", "tige")
    assert not verify("{PLAIN}tiger", "tigers")


def test_hash_password_unknown_scheme():
    with pytest.raises(ValueError, match="cannot make"):
        hash_password(PASSWORD, "PLAIN")


# --------------------------------------------------------------------------
# hash_password round-trips


passwords = st.text(min_size=0, max_size=100).filter(lambda s: "\x00" not in s)


@pytest.mark.parametrize("scheme", [s for s in HASH_SCHEMES if s != "BLF-CRYPT"])
@settings(max_examples=20)
@given(password=passwords)
def test_hash_password_round_trips(scheme, password):
    stored = hash_password(password, scheme, FAST)
    assert stored.startswith(f"{{{scheme}}}")
    assert verify(stored, password)
    assert not verify(stored, password + "x")


@settings(max_examples=20)
@given(password=passwords.filter(lambda s: len(s.encode()) <= 72))
def test_hash_password_round_trips_bcrypt(password):
    stored = hash_password(password, "blf-crypt", FAST)
    assert stored.startswith("{BLF-CRYPT}$2y$04$")
    assert verify(stored, password)
    assert not verify(stored, password + "x")


def test_default_params_are_dovecots():
    stored = hash_password(PASSWORD)
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$")
    assert verify(stored, PASSWORD)


# --------------------------------------------------------------------------
# dummies


@pytest.mark.parametrize("scheme", DUMMY_SCHEMES)
def test_dummy_per_scheme(scheme):
    stored = dummy(scheme, FAST)
    assert scheme_of(stored) == scheme
    assert dummy(scheme, FAST) is stored  # made once
    assert not verify(stored, PASSWORD)
    assert not verify(stored, "")


def test_dummy_unknown_scheme():
    with pytest.raises(ValueError, match="no dummy"):
        dummy("MD5", FAST)


# --------------------------------------------------------------------------
# kumoauth pw


def kumoauth_pw(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "pw", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("scheme", ["ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SSHA512"])
def test_doveadm_verifies_what_pw_prints(doveadm, scheme):
    done = kumoauth_pw("-s", scheme.lower(), stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    stored = done.stdout.strip()
    assert stored.startswith(f"{{{scheme}}}")
    assert PASSWORD not in done.stdout + done.stderr
    out = run([*doveadm, "pw", "-t", stored, "-p", PASSWORD])
    assert "(verified)" in out
    wrong = subprocess.run(
        [*doveadm, "pw", "-t", stored, "-p", WRONG], capture_output=True, timeout=60, check=False
    )
    assert wrong.returncode != 0
    assert verify(stored, PASSWORD)


def test_pw_default_scheme_and_crlf():
    done = kumoauth_pw(stdin="tiger\r\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("{ARGON2ID}$argon2id$")
    assert verify(done.stdout.strip(), "tiger")


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_pw_refuses_an_empty_password(stdin):
    done = kumoauth_pw(stdin=stdin)
    assert done.returncode == 1
    assert "empty password" in done.stderr
    assert done.stdout == ""


def test_pw_refuses_unknown_scheme():
    done = kumoauth_pw("-s", "MD5", stdin="tiger\n")
    assert done.returncode == 2


def test_pw_refuses_long_bcrypt_without_echoing_it():
    long = "z" * 80
    done = kumoauth_pw("-s", "BLF-CRYPT", stdin=long + "\n")
    assert done.returncode == 1
    assert long not in done.stderr


class TTY:
    def isatty(self) -> bool:
        return True


def test_pw_on_a_terminal_asks_twice(monkeypatch, capsys):
    answers = iter(["tiger", "tiger"])
    monkeypatch.setattr(sys, "stdin", TTY())
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert main(["pw", "-s", "SSHA512"]) == 0
    assert verify(capsys.readouterr().out.strip(), "tiger")


def test_pw_on_a_terminal_refuses_two_that_differ(monkeypatch, capsys):
    answers = iter(["tiger", "tigre"])
    monkeypatch.setattr(sys, "stdin", TTY())
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert main(["pw"]) == 1
    captured = capsys.readouterr()
    assert "differ" in captured.err
    assert "tiger" not in captured.err + captured.out


def test_module_documents_the_thread_pool():
    assert "thread pool" in (schemes.__doc__ or "")
    assert Path(schemes.__file__).parent.name == "backends"
