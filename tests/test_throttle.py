"""
Failed-attempt throttles and the in-flight limit (SPEC §8): the store and
the throttle on their own, and through the real protocol with a fake clock.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from twisted.internet import defer, task
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kumoauth.auth.throttle import (
    FINGERPRINT_SIZE,
    IFailureStore,
    MemoryFailureStore,
    Throttle,
    Throttled,
    authc_key,
    client_key,
    make_store,
)
from kumoauth.config import AuthConfig, ThrottleConfig
from kumoauth.policy import Policy
from kumoauth.testing import login_b64, plain_b64

PASSWORDS = {"alice": "wonderland", "bob": "builder", "scott": "tiger"}


class Checker:
    def __init__(self):
        self.calls = []

    def __call__(self, authz, authc, password, meta):
        self.calls.append(authc)
        return PASSWORDS.get(authc) == password


@pytest.fixture
def world(make_session):
    """Sessions from several IPs sharing one runtime (one server)."""
    checker = Checker()
    policy = Policy()
    policy.on("smtp_server_auth_plain", checker)
    clock = task.Clock()
    auth = AuthConfig(
        failure_delay=0,
        max_failures=100,
        throttle=ThrottleConfig(window=900, max_failures_per_ip=10, max_failures_per_authc=5),
    )
    first = make_session(policy, clock=clock, auth=auth)

    def connect(ip: str):
        s = make_session(runtime=first.runtime, clock=clock, client=(ip, 40000))
        s.command("EHLO client.example")
        return s

    return checker, clock, connect


def attempt(s, user, password):
    return s.command("AUTH PLAIN " + plain_b64("", user, password))


def attempt_login(s, user, password):
    assert s.command("AUTH LOGIN").startswith("334 ")
    assert s.command(login_b64(user)).startswith("334 ")
    return s.command(login_b64(password))


def result(d):
    """The result of a Deferred that has already fired."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_per_ip_limit(world):
    checker, clock, connect = world
    attacker = connect("203.0.113.9")
    users = [f"u{i}" for i in range(10)]
    for user in users:
        assert attempt(attacker, user, "guess").startswith("535")
    calls = len(checker.calls)
    # The 11th attempt from that IP, even with the right password, is not checked.
    assert attempt(attacker, "scott", "tiger").startswith("454 4.7.0")
    assert len(checker.calls) == calls
    # Another IP with another user is unaffected.
    assert attempt(connect("198.51.100.1"), "bob", "builder").startswith("235")
    # The window slides (a new connection: the old one idled out meanwhile).
    clock.advance(901)
    assert attempt(connect("203.0.113.9"), "scott", "tiger").startswith("235")


def test_per_authc_limit_spares_clean_clients(world):
    checker, clock, connect = world
    attacker = connect("203.0.113.9")
    for i in range(5):
        assert attempt(attacker, "alice", f"guess{i}").startswith("535")
    calls = len(checker.calls)
    assert attempt(attacker, "alice", "guess5").startswith("454 4.7.0")
    assert attempt(connect("203.0.113.9"), "ALICE", "x").startswith("454 4.7.0")
    # A second attacker address that has been failing too is throttled for alice...
    other_attacker = connect("203.0.113.10")
    assert attempt(other_attacker, "mallory", "x").startswith("535")
    assert attempt(other_attacker, "alice", "wonderland").startswith("454")
    assert len(checker.calls) == calls + 1
    # ...but alice from a clean address is still checked.
    assert attempt(connect("192.0.2.50"), "alice", "wonderland").startswith("235")
    # The attacker may still try other users (the IP budget is 10).
    assert attempt(attacker, "bob", "builder").startswith("235")


def test_empty_password_attempts_count(world):
    checker, clock, connect = world
    s = connect("203.0.113.9")
    # An empty password is one distinct failure (retried, still one).
    for _ in range(3):
        assert attempt(s, "scott", "").startswith("535")
    for i in range(4):
        assert attempt(s, "scott", f"guess{i}").startswith("535")
    assert attempt(s, "scott", "tiger").startswith("454")
    assert checker.calls == ["scott"] * 4


def test_throttled_attempt_is_logged(world, captured_log):
    checker, clock, connect = world
    s = connect("203.0.113.9")
    for i in range(10):
        attempt(s, f"user{i}", "no")
    attempt(s, "scott", "no")
    last = captured_log.namespace("kumoauth.auth")[-1]
    assert (last["result"], last["reason"]) == ("throttled", "ip")


def test_memory_store_forgets_expired_keys():
    clock = task.Clock()
    store = MemoryFailureStore(clock)
    for i in range(store.SWEEP_EVERY - 1):
        store.record(f"ip:{i}", b"fp", 10, 5)
    assert len(store) == store.SWEEP_EVERY - 1
    clock.advance(11)
    store.record("ip:new", b"fp", 10, 5)
    assert len(store) == 1
    assert result(store.count("ip:new", 10)) == (1, 10.0)


@implementer(IFailureStore)
class BrokenStore:
    def count(self, key, window):
        return defer.fail(ConnectionError("redis down"))

    def record(self, key, fingerprint, window, keep):
        return defer.fail(ConnectionError("redis down"))


def test_unavailable_store_fails_closed(make_session):
    checker = Checker()
    policy = Policy()
    policy.on("smtp_server_auth_plain", checker)
    s = make_session(policy, connect=False)
    broken = Throttle(BrokenStore(), ThrottleConfig())
    s.factory.runtime = dataclasses.replace(s.runtime, throttle=broken)
    s.connect()
    s.command("EHLO client.example")
    assert attempt(s, "scott", "tiger").startswith("454 4.7.0")
    assert checker.calls == []


def test_authc_keys_fold_case():
    assert authc_key("Alice") == authc_key("alice") == authc_key("ALICE")


def test_in_flight_limit(make_session):
    pending = []
    policy = Policy()
    policy.on(
        "smtp_server_auth_plain", lambda a, c, p, m: pending.append(defer.Deferred()) or pending[-1]
    )
    clock = task.Clock()
    auth = AuthConfig(failure_delay=0, max_in_flight=2, timeout=60)
    first = make_session(policy, clock=clock, auth=auth)
    sessions = [first] + [make_session(runtime=first.runtime, clock=clock) for _ in range(2)]
    for s in sessions:
        s.command("EHLO client.example")
    assert attempt(sessions[0], "scott", "tiger") == ""
    assert attempt(sessions[1], "scott", "tiger") == ""
    assert attempt(sessions[2], "scott", "tiger").startswith("454 4.7.0")
    assert len(pending) == 2
    pending[0].callback(True)
    assert sessions[0].output().startswith("235")
    assert first.runtime.in_flight.count == 1
    assert attempt(sessions[2], "scott", "tiger") == ""
    assert first.runtime.in_flight.count == 2
    # A client that goes away releases its slot.
    sessions[1].close()
    assert first.runtime.in_flight.count == 1


# Distinct wrong passwords (one typo must not lock a user out).

CONFIG = ThrottleConfig(window=900, max_failures_per_ip=10, max_failures_per_authc=5)


def throttle(clock=None, config=CONFIG, **kwargs):
    clock = clock or task.Clock()
    return Throttle(MemoryFailureStore(clock), config, **kwargs), clock


def test_memory_store_provides_the_interface():
    verifyObject(IFailureStore, MemoryFailureStore(task.Clock()))


def test_same_wrong_password_counts_once():
    t, clock = throttle()
    for _ in range(10):
        assert result(t.failed("203.0.113.9", "alice", "typo")) == (1, 1)
        clock.advance(1)
    assert result(t.check("203.0.113.9", "alice")) is None
    # The last retry (at 9 s) refreshed it: it leaves the window at 909 s.
    assert result(t.store.count(authc_key("alice"), 900)) == (1, 899.0)


def test_same_wrong_password_in_another_case_of_the_user_counts_once():
    t, clock = throttle()
    t.failed("203.0.113.9", "alice", "typo")
    assert result(t.failed("203.0.113.9", "Alice", "typo")) == (1, 1)


def test_distinct_wrong_passwords_lock():
    t, clock = throttle()
    for i in range(4):
        t.failed("203.0.113.9", "alice", f"guess{i}")
        assert result(t.check("203.0.113.9", "alice")) is None
    assert result(t.failed("203.0.113.9", "alice", "guess4")) == (5, 5)
    assert result(t.check("203.0.113.9", "alice")) == Throttled("authc", 900.0)
    # A clean client is still checked for alice; the failing one may try others.
    assert result(t.check("192.0.2.50", "alice")) is None
    assert result(t.check("203.0.113.9", "bob")) is None


def test_per_ip_counts_distinct_user_password_pairs():
    t, clock = throttle()
    for i in range(9):
        t.failed("203.0.113.9", f"user{i}", "123456")
        t.failed("203.0.113.9", f"user{i}", "123456")
    assert result(t.check("203.0.113.9", "someone")) is None
    t.failed("203.0.113.9", "user0", "password")
    assert result(t.check("203.0.113.9", "someone")) == Throttled("ip", 900.0)


def test_retry_after_follows_the_oldest_failure():
    t, clock = throttle()
    for i in range(5):
        t.failed("203.0.113.9", "alice", f"guess{i}")
        clock.advance(100)
    # Failures at 0, 100, 200, 300, 400; now 500: the first leaves at 900.
    assert result(t.check("203.0.113.9", "alice")) == Throttled("authc", 400.0)
    clock.advance(399.5)
    assert result(t.check("203.0.113.9", "alice")) == Throttled("authc", 0.5)
    clock.advance(0.5)
    assert result(t.check("203.0.113.9", "alice")) is None
    # Retrying a counted password refreshes it: it is now the newest.
    t.failed("203.0.113.9", "alice", "guess1")
    t.failed("203.0.113.9", "alice", "guess5")
    # Now 900: guess2, 3, 4 (at 200, 300, 400), guess1 and guess5 (at 900).
    assert result(t.check("203.0.113.9", "alice")) == Throttled("authc", 200.0)


def test_retry_after_for_the_ip_limit():
    t, clock = throttle()
    for i in range(10):
        t.failed("203.0.113.9", f"user{i}", "x")
        clock.advance(10)
    assert result(t.check("203.0.113.9", "anyone")) == Throttled("ip", 800.0)


def test_count_when_empty():
    store = MemoryFailureStore(task.Clock())
    assert result(store.count("ip:192.0.2.1", 900)) == (0, 0.0)


def test_record_keeps_at_most_keep_fingerprints():
    clock = task.Clock()
    store = MemoryFailureStore(clock)
    for i in range(100):
        assert result(store.record("authc:alice", b"%d" % i, 900, 5)) == min(i + 1, 5)
        clock.advance(1)
    assert len(store._keys["authc:alice"]) == 5
    # The oldest kept one (recorded at 95) leaves at 995.
    assert result(store.count("authc:alice", 900)) == (5, 895.0)


def test_memory_stays_bounded_after_many_keys():
    clock = task.Clock()
    store = MemoryFailureStore(clock)
    t = Throttle(store, CONFIG)
    for i in range(5000):
        for j in range(20):
            t.failed(f"198.51.{i % 256}.{i // 256}", f"user{i}", f"guess{j}")
        clock.advance(1)
    assert len(store) <= 2 * 900 + store.SWEEP_EVERY
    assert all(len(v) <= CONFIG.max_failures_per_ip for v in store._keys.values())
    clock.advance(901)
    for i in range(store.SWEEP_EVERY):
        t.failed("203.0.113.9", "bob", f"{i}")
    assert len(store) == 2


@implementer(IFailureStore)
class DeferredStore:
    """
    A memory store whose answers come later, in any order: a stand-in for a
    shared store with many connections in flight at once.
    """

    def __init__(self, clock):
        self.inner = MemoryFailureStore(clock)
        self.pending = []

    def record(self, key, fingerprint, window, keep):
        d = defer.Deferred()
        self.pending.append((d, self.inner.record(key, fingerprint, window, keep)))
        return d

    def count(self, key, window):
        return self.inner.count(key, window)

    def flush(self):
        pending, self.pending = self.pending, []
        for d, answer in reversed(pending):
            answer.chainDeferred(d)


def test_parallel_records_give_exact_counts():
    clock = task.Clock()
    store = DeferredStore(clock)
    t = Throttle(store, CONFIG)
    counts = [t.failed("203.0.113.9", "alice", f"guess{i}") for i in range(8)]
    again = [t.failed("203.0.113.9", "alice", "guess0") for _ in range(8)]
    store.flush()
    per_ip, per_authc = zip(*(result(d) for d in counts), strict=True)
    # Each failure saw its own count: no two parallel callers share one.
    assert sorted(per_ip) == list(range(1, 9))
    assert sorted(per_authc) == [1, 2, 3, 4, 5, 5, 5, 5]
    assert {result(d) for d in again} == {(8, 5)}
    assert result(store.count(client_key("203.0.113.9"), 900)) == (8, 900.0)


def test_parallel_records_on_one_key():
    clock = task.Clock()
    store = MemoryFailureStore(clock)
    ds = [store.record("authc:alice", b"%d" % (i % 50), 900, 1000) for i in range(500)]
    assert sorted(result(d) for d in ds[:50]) == list(range(1, 51))
    assert {result(d) for d in ds[50:]} == {50}
    assert result(store.count("authc:alice", 900)) == (50, 900.0)


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "ip:192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "ip:2001:db8:1:2::/64"),
        ("2001:DB8:1:2::ffff", "ip:2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "ip:2001:db8:1:3::/64"),
        ("::ffff:192.0.2.1", "ip:192.0.2.1"),
        ("fe80::1%eth0", "ip:fe80::/64"),
        ("local", "ip:local"),
        ("", "ip:"),
    ],
)
def test_client_key(ip, key):
    assert client_key(ip) == key


def test_client_key_prefix():
    assert client_key("2001:db8:1:2:3:4:5:6", 48) == "ip:2001:db8:1::/48"
    assert client_key("2001:db8:1:2:3:4:5:6", 128) == "ip:2001:db8:1:2:3:4:5:6/128"
    assert client_key("192.0.2.1", 48) == "ip:192.0.2.1"


def test_ipv6_clients_are_counted_per_64():
    t, clock = throttle()
    for i in range(10):
        t.failed(f"2001:db8:0:1::{i + 1:x}", f"user{i}", "x")
    assert result(t.check("2001:db8:0:1:ffff::1", "anyone")) == Throttled("ip", 900.0)
    assert result(t.check("2001:db8:0:2::1", "anyone")) is None
    t128, _ = throttle(clock, ipv6_prefix=128)
    for i in range(10):
        t128.failed(f"2001:db8:0:1::{i + 1:x}", f"user{i}", "x")
    assert result(t128.check("2001:db8:0:1::1", "anyone")) is None
    with pytest.raises(ValueError):
        Throttle(MemoryFailureStore(clock), CONFIG, ipv6_prefix=129)


def test_fingerprints_are_salted_and_truncated():
    t1, _ = throttle()
    t2, _ = throttle()
    fp = t1.fingerprint("alice", "secret")
    assert len(fp) == FINGERPRINT_SIZE
    assert fp == t1.fingerprint("ALICE", "secret") == t1.fingerprint("alice", b"secret")
    assert t1.fingerprint("j\u00fcrgen", "s\u00e9") == t1.fingerprint(
        "j\u00fcrgen", "s\u00e9".encode()
    )
    assert fp != t1.fingerprint("alice", "Secret")
    assert fp != t2.fingerprint("alice", "secret")
    assert b"secret" not in fp
    same, _ = throttle(salt=b"shared")
    also, _ = throttle(salt=b"shared")
    assert same.fingerprint("alice", "secret") == also.fingerprint("alice", "secret")


def test_nothing_shows_a_password_or_fingerprint():
    password = "hunter2-very-secret"
    t, clock = throttle()
    fp = t.fingerprint("alice", password)
    for i in range(5):
        t.failed("203.0.113.9", "alice", password + str(i))
    failed = result(t.failed("203.0.113.9", "alice", password))
    decision = result(t.check("203.0.113.9", "alice"))
    fingerprints = [f for seen in t.store._keys.values() for f in seen]
    assert fp in fingerprints
    texts = [repr(x) + str(x) for x in (t, t.store, decision, failed, t.config)]
    for text in texts:
        assert password not in text
        for f in fingerprints:
            assert f.hex() not in text and repr(f) not in text and str(f) not in text


def test_failed_ignores_the_ip_for_the_authc_key():
    t, clock = throttle()
    for i in range(5):
        t.failed(f"203.0.113.{i}", "alice", f"guess{i}")
    # Every one of those addresses has failures, so each is held off for alice.
    assert result(t.check("203.0.113.0", "alice")) == Throttled("authc", 900.0)
    assert result(t.store.count(authc_key("ALICE"), 900)) == (5, 900.0)


def memory_factory(clock):
    return MemoryFailureStore(clock)


def test_make_store():
    clock = task.Clock()
    assert isinstance(make_store("memory", clock), MemoryFailureStore)
    store = make_store("tests.test_throttle:memory_factory", clock)
    assert isinstance(store, MemoryFailureStore) and store.clock is clock
    for spec in ("redis", "tests.test_throttle:nothing", "tests.test_throttle:CONFIG"):
        with pytest.raises(ValueError):
            make_store(spec, clock)


# Through the protocol.


def test_same_wrong_password_retried_does_not_lock_out(world):
    checker, clock, connect = world
    for _ in range(10):
        assert attempt(connect("203.0.113.9"), "alice", "wonderlad").startswith("535")
    assert attempt(connect("203.0.113.9"), "alice", "wonderland").startswith("235")


def test_plain_then_login_with_one_wrong_password_counts_once(world):
    checker, clock, connect = world
    s = connect("203.0.113.9")
    # smtplib's login(): PLAIN, then LOGIN with the same credentials.
    assert attempt(s, "alice", "wonderlad").startswith("535")
    assert attempt_login(s, "alice", "wonderlad").startswith("535")
    store = s.runtime.throttle.store
    assert result(store.count(authc_key("alice"), 900)) == (1, 900.0)
    assert result(store.count(client_key("203.0.113.9"), 900)) == (1, 900.0)
    # Four more typos of the same kind: still not locked out.
    for typo in ("wonderlnad", "wonderlan", "Wonderland"):
        assert attempt(s, "alice", typo).startswith("535")
        assert attempt_login(s, "alice", typo).startswith("535")
    assert attempt(s, "alice", "wonderland").startswith("235")


def test_five_distinct_wrong_passwords_lock_through_the_protocol(world):
    checker, clock, connect = world
    s = connect("203.0.113.9")
    for i in range(5):
        assert attempt(s, "alice", f"guess{i}").startswith("535")
    assert attempt(s, "alice", "wonderland").startswith("454 4.7.0")
    clock.advance(901)
    assert attempt(connect("203.0.113.9"), "alice", "wonderland").startswith("235")


seen_specs: list[str] = []


def kv_factory(spec, clock):
    seen_specs.append(spec)
    if spec.endswith("bad"):
        raise ValueError("no such database")
    return MemoryFailureStore(clock)


def test_registered_store_schemes(monkeypatch):
    from kumoauth import stores

    monkeypatch.setitem(stores.STORES, "kv", "tests.test_throttle:kv_factory")
    seen_specs.clear()
    clock = task.Clock()
    assert isinstance(make_store("kv://127.0.0.1/0", clock), MemoryFailureStore)
    assert seen_specs == ["kv://127.0.0.1/0"]
    with pytest.raises(ValueError, match='"kv://host/bad": no such database'):
        make_store("kv://host/bad", clock)
    with pytest.raises(ValueError, match='is not one of "memory"'):
        make_store("nope://x", clock)


# --- deadlines on what a session waits for (kumoauth.ops.deadline) ------------


def test_a_deadline_is_set_only_on_what_has_no_result_yet():
    from kumoauth.ops.deadline import deadline as _deadline

    clock = task.Clock()
    # An answer already there (a memory store, a synchronous checker): no timer.
    _deadline(defer.succeed(None), 5, clock)
    assert clock.getDelayedCalls() == []
    # No answer yet: cancelled with a TimeoutError after the deadline.
    pending: defer.Deferred[None] = defer.Deferred()
    _deadline(pending, 5, clock)
    errors: list[object] = []
    pending.addErrback(errors.append)
    clock.advance(5)
    assert errors and errors[0].check(defer.TimeoutError)  # type: ignore[attr-defined]
    # Called, but waiting on a Deferred it was chained to: no result yet either.
    inner: defer.Deferred[None] = defer.Deferred()
    outer = defer.succeed(None).addCallback(lambda _: inner)
    assert outer.called and outer.paused
    _deadline(outer, 5, clock)
    outer.addErrback(errors.append)
    clock.advance(5)
    assert len(errors) == 2 and errors[1].check(defer.TimeoutError)  # type: ignore[attr-defined]

    # on_timeout: the caller's own failure instead of TimeoutError.
    def silent(result: object, seconds: float) -> None:
        raise LookupError(f"no answer within {seconds:g} s")

    third: defer.Deferred[None] = defer.Deferred()
    _deadline(third, 2.5, clock, silent).addErrback(errors.append)
    clock.advance(2.5)
    assert errors[2].check(LookupError) and str(errors[2].value) == "no answer within 2.5 s"  # type: ignore[attr-defined]


# --- attempts in flight counted in the process (audit finding 4, review) ------


@pytest.fixture
def held(make_session):
    """
    Sessions sharing one runtime whose checker answers only when the test
    says so: every attempt is in flight at once, as 40 connections
    arriving together against a slow (Argon2) checker are.  ``user<n>``'s
    password is ``right-user<n>``.
    """
    pending = []

    def check(authz, authc, password, meta):
        d = defer.Deferred()
        pending.append((authc, password, d))
        return d

    policy = Policy()
    policy.on("smtp_server_auth_plain", check)
    clock = task.Clock()
    auth = AuthConfig(
        failure_delay=0,
        timeout=60,
        throttle=ThrottleConfig(window=900, max_failures_per_ip=10, max_failures_per_authc=5),
    )
    first = make_session(policy, clock=clock, auth=auth, client=("203.0.113.9", 40000))

    def connect(ip="203.0.113.9"):
        s = make_session(runtime=first.runtime, clock=clock, client=(ip, 40000))
        s.command("EHLO client.example")
        return s

    def answer_all():
        for authc, password, d in pending:
            if not d.called:
                d.callback(PASSWORDS.get(authc, "right-" + authc) == password)
        pending.clear()

    return pending, connect, answer_all, first.runtime


def fail_once(held, ip, user, password):
    """One committed failure for *user* from *ip*."""
    pending, connect, answer_all, _ = held
    s = connect(ip)
    assert attempt(s, user, password) == ""
    answer_all()
    assert s.output().startswith("535")


def test_parallel_guesses_from_a_failing_ip_reach_the_checker_at_most_limit_minus_one(held):
    pending, connect, answer_all, runtime = held
    fail_once(held, "203.0.113.9", "bob", "guess")
    sessions = [connect() for _ in range(40)]
    replies = [attempt(s, f"user{i}", "123456") for i, s in enumerate(sessions)]
    # One failure + nine in flight = the limit (10): the other 31 refused.
    assert len(pending) == 9
    refused = [r for r in replies if r]
    assert len(refused) == 31
    # Refused for attempts in flight only: a short wait (the checker's deadline).
    assert all(
        r.startswith("454 4.7.0 Too many failed attempts, try again in 60 seconds") for r in refused
    )
    answer_all()
    store = runtime.throttle.store
    assert result(store.count(client_key("203.0.113.9"), 900)) == (10, 900.0)
    # The budget is spent: refused on committed failures, with their wait.
    assert attempt(connect(), "scott", "tiger").startswith(
        "454 4.7.0 Too many failed attempts, try again in 900 seconds"
    )
    assert pending == []
    assert len(runtime.in_flight.keys) == 0


def test_parallel_guesses_for_one_user_reach_the_checker_at_most_per_authc_minus_one(held):
    pending, connect, answer_all, runtime = held
    fail_once(held, "203.0.113.9", "scott", "guess")
    sessions = [connect() for _ in range(40)]
    replies = [attempt(s, "scott", f"guess{i}") for i, s in enumerate(sessions)]
    assert len(pending) == 4  # 1 failure + 4 in flight = max_failures_per_authc
    assert sum(r.startswith("454 4.7.0 Too many failed attempts") for r in replies) == 36
    answer_all()
    store = runtime.throttle.store
    assert result(store.count(authc_key("scott"), 900)) == (5, 900.0)


@pytest.mark.parametrize("n", [11, 40])
def test_parallel_correct_logins_from_a_clean_ip_all_succeed(held, n):
    """An office NAT address, a webmail host: no failure, no refusal."""
    pending, connect, answer_all, runtime = held
    sessions = [connect() for _ in range(n)]
    assert [attempt(s, f"user{i}", f"right-user{i}") for i, s in enumerate(sessions)] == [""] * n
    assert len(pending) == n
    # A clean client's attempts are not even counted in flight (fast path).
    assert len(runtime.in_flight.keys) == 0
    answer_all()
    assert all(s.output().startswith("235") for s in sessions)
    store = runtime.throttle.store
    assert result(store.count(client_key("203.0.113.9"), 900)) == (0, 0.0)
    assert len(runtime.in_flight.keys) == 0


def test_alice_from_her_clean_ip_is_checked_while_attackers_filled_her_budget(held):
    pending, connect, answer_all, runtime = held
    for i in range(5):
        fail_once(held, f"198.51.100.{i}", "alice", f"guess{i}")
    store = runtime.throttle.store
    assert result(store.count(authc_key("alice"), 900)) == (5, 900.0)
    # Two connections of hers at once, from her own address.
    phone, laptop = connect("192.0.2.10"), connect("192.0.2.10")
    assert attempt(phone, "alice", "wonderland") == ""
    assert attempt(laptop, "alice", "wonderland") == ""
    assert len(pending) == 2
    answer_all()
    assert phone.output().startswith("235") and laptop.output().startswith("235")
    # Her successes removed none of the attackers' guesses.
    assert result(store.count(authc_key("alice"), 900)) == (5, 900.0)
    assert result(store.count(client_key("192.0.2.10"), 900)) == (0, 0.0)


def test_a_dropped_attempt_with_the_right_password_is_forgotten_by_a_success(held):
    pending, connect, answer_all, runtime = held
    store = runtime.throttle.store
    s = connect("192.0.2.10")
    assert attempt(s, "alice", "wonderland") == ""
    s.close()  # the session went away while the password was checked: it counts
    answer_all()
    assert result(store.count(client_key("192.0.2.10"), 900)) == (1, 900.0)
    assert result(store.count(authc_key("alice"), 900)) == (1, 900.0)
    assert len(runtime.in_flight.keys) == 0
    s = connect("192.0.2.10")
    assert attempt(s, "alice", "wonderland") == ""
    answer_all()
    assert s.output().startswith("235")
    assert result(store.count(client_key("192.0.2.10"), 900)) == (0, 0.0)
    assert result(store.count(authc_key("alice"), 900)) == (0, 0.0)


def test_an_attempt_whose_client_left_stays_counted(held):
    pending, connect, answer_all, runtime = held
    s = connect()
    assert attempt(s, "scott", "guess") == ""
    s.close()  # the attempt reached the checker: it counts
    answer_all()
    assert result(runtime.throttle.store.count(authc_key("scott"), 900)) == (1, 900.0)
    assert len(runtime.in_flight.keys) == 0


def test_one_guess_on_two_connections_counts_once_whatever_the_other_became(held):
    """The same guess twice at once: one checker cannot answer, one says no."""
    pending, connect, answer_all, runtime = held
    a, b = connect(), connect()
    assert attempt(a, "bob", "guess1") == ""
    assert attempt(b, "bob", "guess1") == ""
    pending.pop(0)[2].errback(RuntimeError("backend exploded"))
    assert a.output().startswith("454 4.7.0 Temporary")
    answer_all()
    assert b.output().startswith("535")
    assert result(runtime.throttle.store.count(authc_key("bob"), 900)) == (1, 900.0)


def test_one_wrong_password_in_flight_many_times_takes_one_place(held):
    pending, connect, answer_all, runtime = held
    fail_once(held, "203.0.113.9", "alice", "first")
    sessions = [connect() for _ in range(12)]
    assert [attempt(s, "alice", "wonderlad") for s in sessions] == [""] * 12
    answer_all()
    assert all(s.output().startswith("535") for s in sessions)
    store = runtime.throttle.store
    assert result(store.count(authc_key("alice"), 900)) == (2, 900.0)
    assert attempt(connect(), "alice", "wonderland") == ""
    answer_all()


def test_every_answer_takes_the_attempt_out_of_flight(held):
    pending, connect, answer_all, runtime = held
    clock = runtime.clock
    fail_once(held, "203.0.113.9", "bob", "guess")
    keys = runtime.in_flight.keys
    sessions = [connect() for _ in range(5)]
    for i, s in enumerate(sessions):
        assert attempt(s, f"user{i}", f"pw{i}") == ""
    assert keys.count(client_key("203.0.113.9")) == 5
    pending.pop(0)[2].callback(True)  # success
    pending.pop(0)[2].callback(False)  # failure
    pending.pop(0)[2].errback(RuntimeError("backend exploded"))  # checker error
    sessions[3].close()  # the session went away
    assert keys.count(client_key("203.0.113.9")) == 1
    clock.advance(60)  # the last one: no answer within the deadline
    assert len(keys) == 0
    # Neither a success nor a checker that could not answer counts.
    store = runtime.throttle.store
    assert result(store.count(client_key("203.0.113.9"), 900))[0] == 3  # bob, user1, user3


def test_throttle_check_counts_attempts_in_flight_only_against_failing_keys():
    from kumoauth.auth.throttle import InFlightKeys

    t, clock = throttle()
    busy = InFlightKeys()
    for i in range(20):
        busy.add(client_key("192.0.2.1"), b"fp%d" % i)
        busy.add(authc_key("alice"), b"fp%d" % i)
    # No committed failure: never refused for concurrency.
    assert result(t.check("192.0.2.1", "alice", busy)) is None
    result(t.failed("192.0.2.1", "bob", "x"))
    assert result(t.check("192.0.2.1", "alice", busy)) == Throttled("ip", 0.0, in_flight=True)
    # An attempt whose password is in flight already adds no guess.
    busy2 = InFlightKeys()
    for i in range(9):
        busy2.add(client_key("192.0.2.1"), b"fp%d" % i)
    assert result(t.check("192.0.2.1", "bob", busy2, b"fp0")) is None
    assert result(t.check("192.0.2.1", "bob", busy2, b"new")) == Throttled("ip", 0.0, True)
    # Committed failures at the limit: their own wait.
    for i in range(9):
        result(t.failed("192.0.2.1", "bob", f"y{i}"))
    assert result(t.check("192.0.2.1", "carol")) == Throttled("ip", 900.0)


def test_memory_store_forget_removes_one_fingerprint_from_both_keys():
    clock = task.Clock()
    store = MemoryFailureStore(clock)
    ip, user = "ip:192.0.2.1", "authc:alice"
    for fp in (b"a", b"b"):
        result(store.record(ip, fp, 900, 10))
        result(store.record(user, fp, 900, 5))
    result(store.record("ip:192.0.2.2", b"a", 900, 10))
    assert result(store.forget(ip, user, b"a")) is None
    assert result(store.count(ip, 900))[0] == 1
    assert result(store.count(user, 900))[0] == 1
    assert result(store.count("ip:192.0.2.2", 900))[0] == 1  # another key: untouched
    result(store.forget(ip, None, b"b"))
    assert ip not in store._keys
    assert result(store.count(user, 900))[0] == 1
    result(store.forget("ip:none", "authc:none", b"a"))  # nothing there: nothing done


def test_a_store_that_refuses_writes_stops_attempts_until_a_write_succeeds(
    make_session, captured_log
):
    """
    A ``package.module:factory`` store with IFailureStore's count and
    record only: once a record fails, the next attempt is recorded before
    it goes on, and refused (454, on_store_error = "closed") while that
    fails; a store without ``forget`` keeps the success's fingerprint.
    """
    checker = Checker()
    policy = Policy()
    policy.on("smtp_server_auth_plain", checker)
    s, store = read_only_session(make_session, policy)
    assert attempt(s, "scott", "guess1").startswith("535")
    assert checker.calls == ["scott"]
    store.writable = False
    assert attempt(s, "scott", "guess2").startswith("535")  # the check read; the record failed
    assert attempt(s, "scott", "guess3").startswith("454 4.7.0")
    assert checker.calls == ["scott", "scott"]
    assert attempt(s, "scott", "guess4").startswith("454 4.7.0")
    store.writable = True
    assert attempt(s, "scott", "tiger").startswith("235")
    assert result(store.inner.count(authc_key("scott"), 900))[0] == 2  # guess1, tiger
    text = captured_log.text()
    assert text.count("failure store unavailable: OOM command not allowed") == 1
    assert text.count("failure store available again (3 operations met it down)") == 1


def test_a_success_forgets_the_password_recorded_while_the_store_recovered(
    make_session, captured_log
):
    checker = Checker()
    policy = Policy()
    policy.on("smtp_server_auth_plain", checker)
    s, store = read_only_session(make_session, policy, forget=True)
    store.writable = False
    assert attempt(s, "scott", "guess2").startswith("535")
    store.writable = True
    assert attempt(s, "scott", "tiger").startswith("235")  # recorded first, then forgotten
    assert result(store.inner.count(authc_key("scott"), 900)) == (0, 0.0)
    assert captured_log.text().count("failure store available again") == 1


@pytest.mark.parametrize("ending", ["checker error", "in-flight limit"])
def test_a_password_recorded_in_advance_is_forgotten_whatever_ends_its_check(make_session, ending):
    # While a refused write is outstanding, admitted attempts are recorded
    # before the checker; an attempt that then is no failure (the checker
    # could not answer, the in-flight limit) must not stay counted.
    def check(authz, authc, password, meta):
        if password == "boom":
            raise RuntimeError("backend bug")
        return PASSWORDS.get(authc) == password

    policy = Policy()
    policy.on("smtp_server_auth_plain", check)
    auth = AuthConfig(failure_delay=0, max_failures=100, max_in_flight=100)
    s, store = read_only_session(make_session, policy, forget=True, auth=auth)
    store.writable = False
    assert attempt(s, "scott", "guess").startswith("535")  # its record is refused
    store.writable = True
    if ending == "in-flight limit":
        authenticator = s.factory.runtime.authenticator
        authenticator.auth = dataclasses.replace(authenticator.auth, max_in_flight=0)
        assert attempt(s, "scott", "tiger").startswith("454")
    else:
        assert attempt(s, "scott", "boom").startswith("454")
    assert result(store.inner.count(authc_key("scott"), 900)) == (0, 0.0)
    assert result(store.inner.count(client_key("127.0.0.1"), 900)) == (0, 0.0)


def test_a_reload_keeps_that_the_store_refuses_writes(make_session):
    # A reload builds a new Throttle: it must still record first (and say
    # the store is back only once a write succeeds), not take the fast path.
    from kumoauth.auth.throttle import WriteState

    clock = task.Clock()
    store = ReadOnlyStore(clock, forget=True)
    writes = WriteState()
    before = Throttle(store, ThrottleConfig(), writes=writes)
    store.writable = False
    with pytest.raises(Exception, match="OOM"):
        result(before.failed("192.0.2.1", "scott", "guess"))
    after = Throttle(store, ThrottleConfig(), writes=writes)  # the reload's
    store.writable = True
    admission = result(after.admit("192.0.2.1", "scott", "tiger"))
    assert admission.recorded  # recorded before the checker, as before the reload
    assert writes.refused is None


@implementer(IFailureStore)
class ReadOnlyStore:
    """A store with IFailureStore only, whose writes can be refused."""

    def __init__(self, clock, forget=False):
        self.inner = MemoryFailureStore(clock)
        self.writable = True
        if forget:
            self.forget = self.inner.forget

    def count(self, key, window):
        return self.inner.count(key, window)

    def record(self, key, fingerprint, window, keep):
        if not self.writable:
            from kumoauth.stores import StoreUnavailable

            return defer.fail(StoreUnavailable("OOM command not allowed"))
        return self.inner.record(key, fingerprint, window, keep)


def read_only_session(
    make_session: Any, policy: Policy, forget: bool = False, **kw: Any
) -> tuple[Any, ReadOnlyStore]:
    """A session after EHLO whose throttle's store can be made to refuse writes."""
    s = make_session(policy, connect=False, **kw)
    store = ReadOnlyStore(s.clock, forget=forget)
    t = Throttle(store, ThrottleConfig())
    s.factory.runtime = dataclasses.replace(s.runtime, throttle=t)
    s.connect()
    s.command("EHLO client.example")
    return s, store


# --- one account, one key (audit finding 3) ----------------------------------


@pytest.mark.parametrize(
    "variant",
    ["alice smith", "Alice Smith", " alice smith", "alice smith ", "alice  smith", "ALICE\tSMITH"],
)
def test_user_name_variants_share_one_key(variant):
    from kumoauth.smtp.limits import counter_key
    from kumoauth.stores import fold_user

    assert fold_user(variant) == "alice smith"
    assert authc_key(variant) == "authc:alice smith"
    assert counter_key("messages", variant) == "limit:messages:alice smith"


def test_user_name_variants_share_one_failure_budget(world):
    checker, clock, connect = world
    attacker = connect("203.0.113.9")
    variants = ["alice", "alice ", " alice", "alice  ", "ALICE ", " Alice"]
    replies = [attempt(attacker, v, f"guess{i}") for i, v in enumerate(variants)]
    assert [r[:3] for r in replies] == ["535"] * 5 + ["454"]
    t, _ = throttle()
    # The same wrong password typed with a space after the name counts once.
    t.failed("203.0.113.9", "alice", "typo")
    assert result(t.failed("203.0.113.9", "alice ", "typo")) == (1, 1)
