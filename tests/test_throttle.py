"""
Failed-attempt throttles and the in-flight limit (SPEC §8), through the
real protocol with a fake clock.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from zope.interface import implementer

from kumoauth.config import AuthConfig, ThrottleConfig
from kumoauth.policy import Policy
from kumoauth.testing import plain_b64
from kumoauth.throttle import IFailureStore, MemoryFailureStore, Throttle, authc_key

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
    for _ in range(5):
        assert attempt(attacker, "alice", "guess").startswith("535")
    calls = len(checker.calls)
    assert attempt(attacker, "alice", "guess2").startswith("454 4.7.0")
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
    for _ in range(5):
        assert attempt(s, "scott", "").startswith("535")
    assert attempt(s, "scott", "tiger").startswith("454")
    assert checker.calls == []


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
        store.record(f"ip:{i}", 10)
    assert len(store) == store.SWEEP_EVERY - 1
    clock.advance(11)
    store.record("ip:new", 10)
    assert len(store) == 1
    result = []
    store.count("ip:new", 10).addCallback(result.append)
    assert result == [1]


@implementer(IFailureStore)
class BrokenStore:
    def count(self, key, window):
        return defer.fail(ConnectionError("redis down"))

    def record(self, key, window):
        return defer.fail(ConnectionError("redis down"))


def test_unavailable_store_fails_closed(make_session):
    checker = Checker()
    policy = Policy()
    policy.on("smtp_server_auth_plain", checker)
    s = make_session(policy)
    s.runtime.throttle = Throttle(BrokenStore(), ThrottleConfig())
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
    assert first.runtime.in_flight == 1
    assert attempt(sessions[2], "scott", "tiger") == ""
    assert first.runtime.in_flight == 2
    # A client that goes away releases its slot.
    sessions[1].close()
    assert first.runtime.in_flight == 1
