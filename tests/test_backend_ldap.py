"""
kumoauth.backends.ldap against a real OpenLDAP slapd (tests/slapd.py): a
slapd of our own in a temporary directory, on loopback ports, with ldap://
(StartTLS) and ldaps:// listeners whose certificate a trustme CA signed,
users whose ``{SSHA}`` passwords ``slappasswd`` made, and a service
account.  The store runs on the real reactor (in a thread, as in
test_relay_client).  Outages are real: a slapd of the test's own is
stopped (refused connections) or frozen with SIGSTOP (a server that
accepted the connection and never answers).  slapd's own ``-d stats`` log
says what it was asked (which connections, binds, searches), so tests can
tell that a password never reached it.

Without slapd the tests skip, and fail when CI is set.
"""

from __future__ import annotations

import base64
import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred import error as cred_error
from twisted.internet import defer

from kumoauth.auth import checkers
from kumoauth.auth.cred import BackendUnavailable, PlainCredentials
from kumoauth.backends.base import DENIED, BackendError, StoreChecker, Verdict
from kumoauth.backends.ldap import (
    DEFAULT_FILTER,
    LDAP,
    SCHEMA,
    Config,
    escape_filter_value,
    factory,
    filter_for,
    from_argstring,
    validate,
)
from kumoauth.meta import ConnMeta
from tests.server import free_port, make_certs, running_server
from tests.slapd import PEOPLE, SERVICE_DN, SUFFIX, Slapd, User, require_slapd, running_slapd
from tests.upstream import in_reactor, start_reactor

ALICE_PW = "Älice (pw)* \\ 1"
BOB_PW = "bob-Secret-42"
ODD_PW = "odd-Secret-7"
WRONG = "not-Alice-pw"
SERVICE_PW = "svc-Secret-9e1"
SECRETS = (ALICE_PW, BOB_PW, ODD_PW, WRONG, SERVICE_PW, "wrong-Service-pw")

USERS = [
    User("alice", ALICE_PW, mail="alice@example.test"),
    User("bob", BOB_PW, mail="bob@example.test"),
    # a name made of filter syntax: only the literal name may find it
    User("p(a)r*en", ODD_PW),
    # two entries for one mail address: ambiguous
    User("twin1", BOB_PW, mail="twins@example.test"),
    User("twin2", BOB_PW, mail="twins@example.test"),
    # outside ou=people
    User("carol", BOB_PW, ou="staff"),
]


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    require_slapd()
    with running_slapd(
        USERS, service_password=SERVICE_PW, directory=tmp_path_factory.mktemp("slapd")
    ) as server:
        yield server


@pytest.fixture(scope="module")
def service_pw_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "bind-password"
    path.write_text(SERVICE_PW + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def stores(reactor: Any) -> Iterator[list[LDAP]]:
    made: list[LDAP] = []
    yield made
    for store in made:
        in_reactor(store.stop)


@pytest.fixture
def make_store(reactor: Any, slapd: Slapd, service_pw_file: Path, stores: list[LDAP]) -> Any:
    def make(url: str | None = None, **kw: Any) -> LDAP:
        kw.setdefault("bind_dn", SERVICE_DN)
        if kw["bind_dn"]:
            kw.setdefault("bind_password_file", service_pw_file)
        kw.setdefault("timeout", 3.0)
        store = LDAP(url or slapd.url(), kw.pop("base", PEOPLE), reactor=reactor, **kw)
        stores.append(store)
        return store

    return make


def check(store: LDAP, authc: str, password: str, authz: str = "") -> Verdict:
    verdict: Verdict = in_reactor(store.check, authz, authc, password)
    return verdict


def backend_error(store: LDAP, authc: str = "alice", password: str = ALICE_PW) -> BackendError:
    with pytest.raises(BackendError) as raised:
        check(store, authc, password)
    return raised.value


def log_mark(server: Slapd) -> int:
    return len(server.log())


def log_since(server: Slapd, mark: int, settle: float = 0.3) -> str:
    """slapd's log after *mark*, once it stopped growing (it writes from its threads)."""
    last, deadline = -1, time.monotonic() + 5
    while time.monotonic() < deadline:
        size = len(server.log())
        if size == last:
            break
        last = size
        time.sleep(settle)
    return server.log()[mark:]


def binds_of(log: str, dn: str) -> list[str]:
    return [line for line in log.splitlines() if f'BIND dn="{dn}"' in line]


# --------------------------------------------------------------------------
# the filter: RFC 4515 escaping


def test_escape_filter_value_rfc4515_examples():
    # RFC 4515 §4's examples, and the five characters §3 requires escaping
    assert escape_filter_value("Parens R Us (for all your parenthetical needs)") == (
        "Parens R Us \\28for all your parenthetical needs\\29"
    )
    assert escape_filter_value("*") == "\\2a"
    assert escape_filter_value("C:\\MyFile") == "C:\\5cMyFile"
    assert escape_filter_value("\0") == "\\00"
    assert escape_filter_value("Lučić") == "Lučić"


@given(st.text(max_size=40))
def test_any_user_name_is_one_literal_value(name: str) -> None:
    parsed = filter_for("(uid={user})", name) if name else None
    if parsed is None:
        return
    assert type(parsed).__name__ == "LDAPFilter_equalityMatch"
    assert parsed.assertionValue.value == name


def test_filter_with_two_places_and_a_prefix() -> None:
    parsed = filter_for("(&(objectClass=inetOrgPerson)(|(uid={user})(mail={user}@x)))", ")(*")
    wire = parsed.toWire()
    # two whole octet-string values (BER 0x04, length), no substring filter (0xa4)
    assert b"\x04\x03)(*\xa3" in wire and wire.endswith(b"\x04\x05)(*@x")
    assert b"\xa4" not in wire


# --------------------------------------------------------------------------
# search, then bind


def test_plain_ldap_success_by_uid_and_by_mail(make_store, slapd):
    store = make_store()
    mark = log_mark(slapd)
    verdict = check(store, "alice", ALICE_PW)
    assert verdict == Verdict(True, {"ldap_dn": f"uid=alice,{PEOPLE}"})
    assert check(store, "alice@example.test", ALICE_PW).ok
    assert check(store, "bob", BOB_PW).meta == {"ldap_dn": f"uid=bob,{PEOPLE}"}
    log = log_since(slapd, mark)
    # searched as the service account, bound as the user
    assert binds_of(log, SERVICE_DN)
    assert len(binds_of(log, f"uid=alice,{PEOPLE}")) == 4  # BIND ... method / mech lines, x2


def test_username_attribute_makes_every_login_of_an_entry_one_account(make_store, slapd):
    # alice, ALICE and alice@example.test are one entry: with the default
    # each spelling was its own authn_id, with its own [limits] counters
    # (outside test with non-ASCII users)
    store = make_store(username_attribute="uid")
    for login in ("alice", "ALICE", "alice@example.test"):
        verdict = check(store, login, ALICE_PW)
        assert verdict.ok and verdict.user == "alice", (login, verdict)
    assert check(store, "alice", WRONG) == DENIED
    by_mail = make_store(username_attribute="mail")
    assert check(by_mail, "bob", BOB_PW).user == "bob@example.test"
    # without it: the login as typed (no user)
    assert check(make_store(), "ALICE", ALICE_PW).user is None
    from kumoauth.backends.ldap import validate

    with pytest.raises(ValueError, match="username_attribute"):
        validate({"url": "ldap://h", "base": "dc=x", "username_attribute": "ui d"})


def test_wrong_password_unknown_user_and_empty_password(make_store, slapd):
    store = make_store()
    assert check(store, "alice", WRONG) == DENIED
    assert check(store, "alice", ALICE_PW.upper()) == DENIED
    mark = log_mark(slapd)
    assert check(store, "nobody", ALICE_PW) == DENIED
    log = log_since(slapd, mark)
    # an unknown user costs a round trip on the bind connection too (a
    # WhoAmI, which carries no password), and no bind
    assert "WHOAMI" in log
    assert " BIND " not in log.replace(SERVICE_DN, "")


def test_empty_password_never_reaches_the_server(make_store, slapd):
    store = make_store()
    mark = log_mark(slapd)
    for authc in ("alice", "nobody", ""):
        assert check(store, authc, "") == DENIED
    assert check(store, "alice", ALICE_PW, authz="bob") == DENIED
    assert "ACCEPT" not in log_since(slapd, mark)
    # nor does it need one: no server at all, still a plain "no"
    dead = make_store(f"ldap://127.0.0.1:{free_port()}")
    assert check(dead, "alice", "") == DENIED


def test_authz_equal_to_authc_is_the_same_as_none(make_store):
    store = make_store()
    assert check(store, "alice", ALICE_PW, authz="alice").ok


@pytest.mark.parametrize(
    "authc",
    [
        "*",
        "al*",
        "*lice",
        ")(uid=*",
        "alice)(uid=*",
        "admin)(|(uid=*",
        "*)(|(uid=*",
        "alice)(|(objectClass=*)",
        "\\",
        "alice\\",
        "alice\0",
        "p(a)r*",
        "p\\28a\\29r\\2aen",
        f"uid=alice,{PEOPLE}",
    ],
)
def test_filter_injection_finds_nothing(make_store, slapd, authc):
    store = make_store()
    # the right password for the entry an unescaped filter would find
    for password in (ALICE_PW, ODD_PW):
        assert check(store, authc, password) == DENIED


def test_a_name_made_of_filter_syntax_matches_itself(make_store):
    store = make_store()
    assert check(store, "p(a)r*en", ODD_PW) == Verdict(True, {"ldap_dn": f"uid=p(a)r*en,{PEOPLE}"})


def test_ambiguous_user_is_refused_and_logged_once(make_store, captured_log):
    store = make_store()
    for _ in range(3):
        assert check(store, "twins@example.test", BOB_PW) == DENIED
    lines = [e for e in captured_log.events if "entries match user" in str(e.get("log_format"))]
    assert len(lines) == 1
    # each twin alone is fine
    assert check(store, "twin1", BOB_PW).ok


def test_anonymous_search(make_store, slapd):
    store = make_store(bind_dn="")
    mark = log_mark(slapd)
    assert check(store, "alice", ALICE_PW).ok
    assert check(store, "alice", WRONG) == DENIED
    assert not binds_of(log_since(slapd, mark), SERVICE_DN)


def test_scope_and_base(make_store):
    assert check(make_store(base=SUFFIX), "carol", BOB_PW).ok
    assert check(make_store(base=SUFFIX, scope="one"), "carol", BOB_PW) == DENIED
    assert check(make_store(), "carol", BOB_PW) == DENIED  # not under ou=people
    only_uid = make_store(filter="(&(objectClass=inetOrgPerson)(uid={user}))")
    assert check(only_uid, "alice", ALICE_PW).ok
    assert check(only_uid, "alice@example.test", ALICE_PW) == DENIED


def test_missing_base_is_a_backend_error(make_store):
    e = backend_error(make_store(base=f"ou=nowhere,{SUFFIX}"))
    assert "noSuchObject (32)" in str(e)
    assert e.outage


def test_service_password_file_is_read_per_connection(make_store, tmp_path):
    pw = tmp_path / "bind-password"
    pw.write_text("wrong-Service-pw\n")
    store = make_store(bind_password_file=pw)
    e = backend_error(store)
    assert "bind as bind_dn refused: invalidCredentials (49)" in str(e)
    # rotated: the next connection reads the file again, no reload
    pw.write_text(SERVICE_PW + "\n")
    assert check(store, "alice", ALICE_PW).ok
    # gone: 454 naming the file, when a new connection needs it
    pw.unlink()
    in_reactor(store.stop)
    e = backend_error(store)
    assert "bind_password_file" in str(e) and str(pw) in str(e)
    assert "wrong-Service-pw" not in str(e)


def test_a_name_that_cannot_be_utf8_is_no_user(make_store):
    store = make_store()
    assert check(store, "alice\udc80", ALICE_PW) == DENIED
    assert check(store, "alice", "pw\ud800") == DENIED


# --------------------------------------------------------------------------
# TLS: StartTLS and ldaps://, the certificate always verified


def test_start_tls(make_store, slapd):
    store = make_store(start_tls=True, ca_file=slapd.ca_file)
    mark = log_mark(slapd)
    assert check(store, "alice", ALICE_PW).ok
    assert check(store, "alice", WRONG) == DENIED
    log = log_since(slapd, mark)
    assert "STARTTLS" in log
    # every bind went over TLS (ssf > 0)
    bound = [line for line in log.splitlines() if "mech=SIMPLE" in line]
    assert bound and all(re.search(r" ssf=[1-9]", line) for line in bound), bound


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_ldaps(make_store, slapd, host):
    store = make_store(slapd.url(tls=True, host=host), ca_file=slapd.ca_file)
    assert check(store, "alice", ALICE_PW).ok
    assert check(store, "bob", WRONG) == DENIED


@pytest.mark.parametrize("tls", ["ldaps", "starttls"])
def test_an_unknown_ca_is_refused_before_any_password(make_store, slapd, tmp_path, tls):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    if tls == "ldaps":
        store = make_store(slapd.url(tls=True), ca_file=other)
    else:
        store = make_store(start_tls=True, ca_file=other)
    mark = log_mark(slapd)
    e = backend_error(store)
    assert "certificate verify failed" in str(e)
    assert " BIND " not in log_since(slapd, mark)


def test_the_system_trust_store_does_not_know_the_test_ca(make_store, slapd):
    e = backend_error(make_store(slapd.url(tls=True)))
    assert "TLS" in str(e)


def test_certificate_for_another_host_is_refused(reactor, stores):
    require_slapd()
    with running_slapd({"dave": BOB_PW}, cert_names=("ldap.example.test",)) as other:
        store = LDAP(other.url(tls=True), PEOPLE, ca_file=other.ca_file, reactor=reactor)
        stores.append(store)
        e = backend_error(store, "dave", BOB_PW)
        assert "not for this host name" in str(e)
        assert " BIND " not in other.log()


# --------------------------------------------------------------------------
# outages, timeouts, concurrency


def test_server_down_then_back(reactor, captured_log):
    require_slapd()
    with running_slapd({"dave": BOB_PW}) as own:
        config = validate({"url": own.url(), "base": PEOPLE, "timeout": 2})
        checker = factory(config, reactor=reactor, pool=None)
        assert isinstance(checker, StoreChecker)

        def login(password: str = BOB_PW) -> Any:
            credentials = PlainCredentials("", "dave", password, ConnMeta())
            return in_reactor(checker.requestAvatarId, credentials)

        assert login() == "dave"
        own.stop()
        for _ in range(3):
            with pytest.raises(BackendUnavailable, match="connection refused"):
                login()
        own.start()
        # the idle pooled connections died with the old slapd: new ones
        assert login() == "dave"
        with pytest.raises(cred_error.UnauthorizedLogin):
            login(WRONG)
        in_reactor(checker.stop)
    health = [str(e.get("log_format")) for e in captured_log.namespace("kumoauth.backends")]
    assert sum("unavailable" in f for f in health) == 1
    assert sum("available again" in f for f in health) == 1


def test_hung_server_times_out_then_recovers(reactor, stores):
    require_slapd()
    with running_slapd({"dave": BOB_PW}) as own:
        store = LDAP(own.url(), PEOPLE, timeout=0.5, reactor=reactor)
        stores.append(store)
        assert check(store, "dave", BOB_PW).ok
        own.pause()
        try:
            started = time.monotonic()
            e = backend_error(store, "dave", BOB_PW)
            assert "no answer within 0.5 s" in str(e)
            assert time.monotonic() - started < 3
            # a new connection: the kernel accepts it, slapd never answers
            assert "no answer within 0.5 s" in str(backend_error(store, "dave", BOB_PW))
        finally:
            own.resume()
        assert check(store, "dave", BOB_PW).ok


def test_twenty_parallel_checks_on_a_small_pool(make_store, slapd):
    store = make_store(pool_size=2)
    cases = [("alice", ALICE_PW, True), ("bob", BOB_PW, True), ("alice", WRONG, False)]
    cases += [("nobody", WRONG, False), ("alice@example.test", ALICE_PW, True)]
    attempts = (cases * 4)[:20]
    mark = log_mark(slapd)

    def all_at_once() -> defer.Deferred[list[Verdict]]:
        return defer.gatherResults([store.check("", u, p) for u, p, _ in attempts])

    verdicts = in_reactor(all_at_once)
    assert [v.ok for v in verdicts] == [ok for _, _, ok in attempts]
    # two search connections and two bind connections at most
    assert log_since(slapd, mark).count("ACCEPT from") <= 4


def test_reload_and_stop(make_store, slapd, reactor):
    store = make_store()
    assert check(store, "alice@example.test", ALICE_PW).ok
    narrower = validate(
        {
            "url": slapd.url(),
            "base": PEOPLE,
            "filter": "(uid={user})",
            "bind_dn": SERVICE_DN,
            "bind_password_file": str(store.config.bind_password_file),
        }
    )
    mark = log_mark(slapd)
    in_reactor(store.reload, narrower)
    assert check(store, "alice@example.test", ALICE_PW) == DENIED
    assert check(store, "alice", ALICE_PW).ok
    in_reactor(store.stop)
    log = log_since(slapd, mark)
    assert "UNBIND" in log  # the old pools' and the stopped store's idle connections


# --------------------------------------------------------------------------
# secrets


def test_no_secret_in_logs_errors_or_reprs(make_store, slapd, tmp_path, captured_log, caplog):
    messages: list[str] = []
    store = make_store()
    check(store, "alice", ALICE_PW)
    check(store, "alice", WRONG)
    check(store, "twins@example.test", BOB_PW)
    bad = tmp_path / "bad-password"
    bad.write_text("wrong-Service-pw\n")
    messages.append(str(backend_error(make_store(bind_password_file=bad))))
    messages.append(str(backend_error(make_store(f"ldap://127.0.0.1:{free_port()}"))))
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    messages.append(str(backend_error(make_store(slapd.url(tls=True), ca_file=other))))
    messages += [repr(store), repr(store.config), repr(store.settings)]
    everything = "\n".join([*messages, captured_log.text(), caplog.text])
    for secret in SECRETS:
        assert secret not in everything


# --------------------------------------------------------------------------
# configuration


def test_schema_is_the_config() -> None:
    assert set(SCHEMA) == set(Config.__dataclass_fields__)
    config = validate({"url": "ldap://ldap.example.com", "base": "dc=example,dc=com"})
    assert config == Config(url="ldap://ldap.example.com", base="dc=example,dc=com")
    assert config.filter == DEFAULT_FILTER and config.scope == "sub" and config.pool_size == 4


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"base": "dc=x"}, "url: required key is missing"),
        ({"url": "ldap://h"}, "base: required key is missing"),
        ({"url": "http://h", "base": "dc=x"}, "url: expected"),
        ({"url": "ldap://", "base": "dc=x"}, "url: names no host"),
        ({"url": "ldap://h:99999", "base": "dc=x"}, "url: not a URL"),
        ({"url": "ldap://u:p@h", "base": "dc=x"}, "url: must not hold a user"),
        ({"url": "ldap://h/dc=x", "base": "dc=x"}, "url: must be only scheme"),
        ({"url": "ldaps://h", "base": "dc=x", "start_tls": True}, "start_tls: not with ldaps"),
        ({"url": "ldap://h", "base": "dc=x", "ca_file": "/x.pem"}, "ca_file: only used"),
        ({"url": "ldap://h", "base": "dc=x", "filter": "(uid=alice)"}, "must contain {user}"),
        ({"url": "ldap://h", "base": "dc=x", "filter": "(uid={user}"}, "not an LDAP filter"),
        ({"url": "ldap://h", "base": "dc=x", "filter": "uid={user}"}, "not an LDAP filter"),
        ({"url": "ldap://h", "base": "dc=x", "scope": "subtree"}, "scope: expected one of"),
        ({"url": "ldap://h", "base": "dc=x", "bind_dn": "cn=a"}, "bind_password_file: required"),
        ({"url": "ldap://h", "base": "dc=x", "timeout": 0}, "timeout: must be at least"),
        ({"url": "ldap://h", "base": "dc=x", "pool_size": 0}, "pool_size: must be at least 1"),
        ({"url": "ldap://h", "base": "dc=x", "port": 389}, "port: unknown key"),
    ],
)
def test_validate_refuses(table, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(table)


@pytest.mark.parametrize(
    "url,shown",
    [
        ("ldapx://cn=admin:TopSecret1@127.0.0.1:389", 'got "ldapx:"'),
        ("ldapi://cn=admin:TopSecret1@%2Frun%2Fslapd", 'got "ldapi:"'),
        ("cn=admin:TopSecret1@127.0.0.1:389", "got no scheme"),
    ],
)
def test_a_wrong_url_scheme_is_refused_without_the_rest_of_the_url(url, shown):
    # The whole URL was quoted, with any password in it, at start-up and in
    # a reload's "reload failed" log line.
    with pytest.raises(ValueError) as refused:
        validate({"url": url, "base": "dc=x"})
    assert shown in str(refused.value)
    assert "TopSecret1" not in str(refused.value)


def test_validate_files(tmp_path):
    base = {"url": "ldaps://h", "base": "dc=x"}
    with pytest.raises(ValueError, match="ca_file: .*no PEM certificate"):
        (tmp_path / "empty.pem").write_text("")
        validate({**base, "ca_file": "empty.pem"}, base=tmp_path)
    with pytest.raises(ValueError, match="ca_file: .*No such file"):
        validate({**base, "ca_file": "missing.pem"}, base=tmp_path)
    (tmp_path / "pw").write_text("Sekrit-pw-1\n")
    config = validate({**base, "bind_dn": "cn=a", "bind_password_file": "pw"}, base=tmp_path)
    assert config.bind_password_file == tmp_path / "pw"
    assert "Sekrit-pw-1" not in repr(config)
    (tmp_path / "pw").write_text("")
    with pytest.raises(ValueError, match="bind_password_file: .*empty"):
        validate({**base, "bind_dn": "cn=a", "bind_password_file": "pw"}, base=tmp_path)


def test_from_argstring(tmp_path):
    config = from_argstring(
        "ldap://ldap.example.com:1389/ou=people,dc=example,dc=com??one?"
        "(%26(objectClass=person)(uid={user}))"
    )
    assert config == Config(
        url="ldap://ldap.example.com:1389",
        base="ou=people,dc=example,dc=com",
        scope="one",
        filter="(&(objectClass=person)(uid={user}))",
    )
    (tmp_path / "pw").write_text("x\n")
    tmp_path.joinpath("ca.pem").write_bytes(trustme.CA().cert_pem.bytes())
    config = from_argstring(
        f"ldap://h/dc=x????bindname=cn=svc%2Cdc=x,x-bind-password-file={tmp_path}/pw,"
        f"!x-start-tls,x-ca-file={tmp_path}/ca.pem,x-timeout=2.5,x-pool-size=8"
    )
    assert (config.bind_dn, config.start_tls, config.timeout, config.pool_size) == (
        "cn=svc,dc=x",
        True,
        2.5,
        8,
    )
    assert config.scope == "sub" and config.filter == DEFAULT_FILTER
    assert from_argstring("ldaps://h/dc=x").url == "ldaps://h"
    for bad, message in [
        ("h/dc=x", "expected an LDAP URL"),
        ("ldap://h/dc=x?cn", "attributes: must be empty"),
        ("ldap://h/dc=x??sub??x-nope=1", "extension 'x-nope' unknown"),
        ("ldap://h/dc=x??sub??x-timeout=soon", "expected a number"),
        ("ldap://h", "base: "),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            from_argstring(bad)


def test_resolve_and_build_through_the_checker_registry(slapd, service_pw_file, reactor):
    table = {
        "url": slapd.url(),
        "base": PEOPLE,
        "bind_dn": SERVICE_DN,
        "bind_password_file": service_pw_file.name,
    }
    spec = checkers.resolve("ldap", {"ldap": table}, base=service_pw_file.parent)
    assert spec.config.bind_password_file == service_pw_file
    checker = checkers.build(spec, reactor, pool=None)
    meta = ConnMeta()
    avatar = in_reactor(checker.requestAvatarId, PlainCredentials("", "alice", ALICE_PW, meta))
    assert avatar == "alice"
    assert meta.get_meta("ldap_dn") == f"uid=alice,{PEOPLE}"
    in_reactor(checker.stop)
    with pytest.raises(ValueError, match=r"\[auth.ldap\] url: required key is missing"):
        checkers.resolve("ldap", {"ldap": {"base": PEOPLE}})


# --------------------------------------------------------------------------
# end to end: twistd kumoauth with checker = "ldap"


def auth_plain(s: smtplib.SMTP, authc: str, password: str) -> int:
    blob = base64.b64encode(f"\0{authc}\0{password}".encode()).decode("ascii")
    return s.docmd("AUTH", f"PLAIN {blob}")[0]


@pytest.mark.e2e
def test_twistd_with_the_ldap_checker(tmp_path, slapd, service_pw_file):
    certs = make_certs(tmp_path / "certs")
    extra = (
        f'[auth.ldap]\nurl = "{slapd.url(tls=True)}"\nbase = "{PEOPLE}"\n'
        f'bind_dn = "{SERVICE_DN}"\nbind_password_file = "{service_pw_file}"\n'
        f'ca_file = "{slapd.ca_file}"\ntimeout = 2\n'
    )
    with running_server(
        tmp_path / "server", certs, None, auth='checker = "ldap"', extra=extra
    ) as srv:
        with smtplib.SMTP("127.0.0.1", srv.starttls_port, timeout=10) as s:
            s.starttls(context=certs.client_context())
            s.ehlo("client.example")
            assert auth_plain(s, "alice", WRONG) == 535
            assert auth_plain(s, "nobody", WRONG) == 535
            assert auth_plain(s, "alice", ALICE_PW) == 235
        log = srv.log()
    for secret in SECRETS:
        assert secret not in log


def test_a_connect_cut_off_at_the_timeout_is_said_in_words():
    from twisted.internet.address import HostnameAddress
    from twisted.internet.error import ConnectingCancelledError

    from kumoauth.backends.ldap import describe

    cancelled = ConnectingCancelledError(HostnameAddress(b"192.0.2.9", 389))
    assert describe(cancelled) == "no connection (timed out)"
