"""
The seams of the core, each alone: the blocking-call pool (bounded,
cancellable), the checker chain (several --auth), the Authenticator
without a transport, the mechanism registry.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from zope.interface import implementer

from kumoauth.auth.authenticator import Attempt, Authenticator, AuthLog, InFlight
from kumoauth.auth.cred import CheckerChain, IPlainCredentials, PlainCredentials, make_portal
from kumoauth.auth.mechanisms import REGISTRY, Login, Plain, SASLResult
from kumoauth.auth.throttle import MemoryFailureStore, Throttle
from kumoauth.config import AuthConfig, ConfigError, ThrottleConfig, parse
from kumoauth.meta import ConnMeta
from kumoauth.ops.loglimit import LogLimiter
from kumoauth.ops.metrics import Metrics
from kumoauth.ops.threads import BlockingPool, QueueFull, background_pool

# --- BlockingPool -----------------------------------------------------------------


class ThreadReactor:
    """callFromThread into a list the test drains: no real reactor."""

    def __init__(self) -> None:
        self.calls: list = []
        self.lock = threading.Lock()

    def callFromThread(self, fn, *args):
        with self.lock:
            self.calls.append((fn, args))

    def drain(self, timeout: float = 5.0, until=lambda: True) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                calls, self.calls = self.calls, []
            for fn, args in calls:
                fn(*args)
            if until() or time.monotonic() > deadline:
                return
            time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policy")
def test_pool_threads_do_not_preempt_the_reactor_thread():
    """
    BlockingPool's threads and the reactor's own pool (background_pool)
    run SCHED_BATCH; the calling thread keeps its policy.
    """
    from twisted.python.threadpool import ThreadPool

    reactor = ThreadReactor()
    pool = BlockingPool(reactor, threads=1, max_queued=10, name="test")
    pool.start()
    seen: list[int] = []
    try:
        d = pool.call(lambda: os.sched_getscheduler(0))
        d.addCallback(seen.append)
        reactor.drain(until=lambda: bool(seen))
    finally:
        pool.pool.stop()

    class Reactor:
        def __init__(self) -> None:
            self.pool = ThreadPool(0, 1)

        def getThreadPool(self) -> ThreadPool:
            return self.pool

    plain = Reactor()
    background_pool(plain)
    plain.pool.start()
    done = threading.Event()
    plain.pool.callInThread(lambda: (seen.append(os.sched_getscheduler(0)), done.set()))
    try:
        assert done.wait(5)
    finally:
        plain.pool.stop()
    assert seen == [os.SCHED_BATCH, os.SCHED_BATCH]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_withdrawn_calls_never_run_and_release_their_arguments():
    reactor = ThreadReactor()
    pool = BlockingPool(reactor, threads=2, max_queued=100, name="test")
    pool.start()
    gate = threading.Event()
    ran: list[str] = []

    def backend(password: str) -> bool:
        gate.wait(5)
        ran.append(password)
        return True

    try:
        deferreds = [pool.call(backend, f"pw{i}") for i in range(20)]
        time.sleep(0.2)  # two are running, 18 wait
        for d in deferreds:
            d.addErrback(lambda f: f.trap(defer.CancelledError))
            d.cancel()
        assert pool.queued == 0
        gate.set()
        reactor.drain(until=lambda: len(ran) >= 2)
        time.sleep(0.2)
        reactor.drain(timeout=0.1)
    finally:
        gate.set()
        pool.pool.stop()
    # Only the two that had started ran; the 18 withdrawn ones never will.
    assert len(ran) == 2


def test_queue_is_bounded():
    reactor = ThreadReactor()
    pool = BlockingPool(reactor, threads=1, max_queued=3, name="test")
    pool.start()
    gate = threading.Event()
    try:
        results = [pool.call(gate.wait, 5)]
        time.sleep(0.2)  # the first one is running: it does not wait
        results += [pool.call(gate.wait, 5) for _ in range(4)]
        failures: list = []
        for d in results:
            d.addErrback(failures.append)
        assert [f.type for f in failures] == [QueueFull]
    finally:
        gate.set()
        reactor.drain(until=lambda: all(d.called for d in results))
        pool.pool.stop()


def test_results_and_errors_come_back():
    reactor = ThreadReactor()
    pool = BlockingPool(reactor, threads=2, max_queued=10, name="test")
    pool.start()
    try:
        ok = pool.call(lambda a, b: a + b, 1, 2)
        bad = pool.call(lambda: 1 / 0)
        reactor.drain(until=lambda: ok.called and bad.called)
        got: list = []
        ok.addCallback(got.append)
        bad.addErrback(lambda f: got.append(f.type))
        assert got == [3, ZeroDivisionError]
    finally:
        pool.pool.stop()


def test_stop_does_not_wait_for_a_hung_thread():
    reactor = ThreadReactor()
    pool = BlockingPool(reactor, threads=1, max_queued=10, name="test")
    pool.start()
    hang = threading.Event()
    pool.call(hang.wait, 30)
    time.sleep(0.1)
    started = time.monotonic()
    d = pool.stop()
    assert time.monotonic() - started < 0.5  # returned at once
    assert not d.called
    assert all(t.daemon for t in pool.pool.threads)
    hang.set()
    reactor.drain(until=lambda: d.called)
    assert d.called


# --- CheckerChain ---------------------------------------------------------------------


@implementer(ICredentialsChecker)
class Fixed:
    credentialInterfaces = (IPlainCredentials,)

    def __init__(self, users: dict[str, str] | None = None, error: bool = False) -> None:
        self.users = users or {}
        self.error = error
        self.calls = 0

    def requestAvatarId(self, credentials):
        self.calls += 1
        if self.error:
            return defer.fail(ConnectionRefusedError("backend down"))
        if self.users.get(credentials.authc) == credentials.password_text():
            return defer.succeed(credentials.authc)
        return defer.fail(cred_error.UnauthorizedLogin())


def creds(user: str, password: str) -> PlainCredentials:
    return PlainCredentials("", user, password, ConnMeta())


def result_of(d: Deferred):
    box: list = []
    d.addBoth(box.append)
    assert box
    return box[0]


def test_chain_first_yes_wins():
    a, b = Fixed({"alice": "x"}), Fixed({"bob": "y"})
    chain = CheckerChain([a, b])
    assert result_of(chain.requestAvatarId(creds("alice", "x"))) == "alice"
    assert b.calls == 0
    assert result_of(chain.requestAvatarId(creds("bob", "y"))) == "bob"


def test_chain_error_is_tempfail_only_if_nobody_said_yes():
    down, b = Fixed(error=True), Fixed({"bob": "y"})
    chain = CheckerChain([down, b])
    assert result_of(chain.requestAvatarId(creds("bob", "y"))) == "bob"
    failure = result_of(chain.requestAvatarId(creds("bob", "wrong")))
    assert failure.check(ConnectionRefusedError)
    failure = result_of(CheckerChain([b, b]).requestAvatarId(creds("bob", "no")))
    assert failure.check(cred_error.UnauthorizedLogin)


def test_portal_with_two_checkers_uses_both():
    portal = make_portal([Fixed({"alice": "x"}), Fixed({"bob": "y"})])
    from kumoauth.auth.cred import AuthContext
    from kumoauth.storage.delivery import IMessageDelivery

    for user, password in (("alice", "x"), ("bob", "y")):
        c = creds(user, password)
        result = result_of(portal.login(c, AuthContext(user, c.conn_meta), IMessageDelivery))
        assert result[1].authn_id == user


# --- Authenticator, no transport -------------------------------------------------------


def make_authenticator(checker, clock, **auth):
    metrics = Metrics()
    config = AuthConfig(**{"failure_delay": 1.0, "timeout": 5.0, **auth})
    throttle = Throttle(MemoryFailureStore(clock), ThrottleConfig(max_failures_per_ip=3))
    return Authenticator(
        portal=make_portal([checker]),
        clock=clock,
        auth=config,
        log=AuthLog(metrics, LogLimiter(clock)),
        in_flight=InFlight(),
        throttle=throttle,
    )


def attempt(clock) -> Attempt:
    return Attempt("PLAIN", clock.seconds(), "192.0.2.1", "192.0.2.1:1", "tcp:587", ConnMeta())


def test_authenticator_outcomes():
    clock = task.Clock()
    auth = make_authenticator(Fixed({"scott": "tiger"}), clock)
    ok = result_of(auth.authenticate(attempt(clock), creds("scott", "tiger")))
    assert ok.result == "success" and ok.delivery.authn_id == "scott"
    d = auth.authenticate(attempt(clock), creds("scott", "lion"))
    box: list = []
    d.addBoth(box.append)
    assert box == []  # the failure delay
    clock.advance(1)
    assert box[0].reply.startswith(b"535 5.7.8")
    for pw in ("a", "b"):
        auth.authenticate(attempt(clock), creds("scott", pw))
        clock.advance(1)
    throttled = result_of(auth.authenticate(attempt(clock), creds("scott", "tiger")))
    assert throttled.result == "throttled"
    assert throttled.reply.startswith(b"454 4.7.0 Too many failed attempts, try again in ")
    assert throttled.reply.endswith(b" seconds")
    wait = int(throttled.reply.split()[-2])
    clock.advance(wait - 0.5)
    last = result_of(auth.authenticate(attempt(clock), creds("scott", "tiger")))
    assert last.reply == b"454 4.7.0 Too many failed attempts, try again in 1 second"


def test_authenticator_deadline_and_in_flight():
    clock = task.Clock()

    @implementer(ICredentialsChecker)
    class Never:
        credentialInterfaces = (IPlainCredentials,)

        def requestAvatarId(self, credentials):
            return Deferred()

    auth = make_authenticator(Never(), clock, max_in_flight=1, timeout=2.0)
    first = auth.authenticate(attempt(clock), creds("scott", "tiger"))
    second = result_of(auth.authenticate(attempt(clock), creds("scott", "tiger")))
    assert second.reply.startswith(b"454 4.7.0 Too many authentication checks")
    clock.advance(2)
    assert result_of(first).result == "tempfail"
    assert auth.in_flight.count == 0


# --- mechanisms ---------------------------------------------------------------------------


def test_registry_and_steps():
    assert REGISTRY["PLAIN"] is Plain and REGISTRY["LOGIN"] is Login
    assert Plain().respond(b"\0scott\0tiger") == SASLResult("", "scott", "tiger")
    login = Login()
    assert login.initial_challenge() == b"Username:"
    assert login.respond(b"scott") == b"Password:"
    assert login.respond(b"tiger") == SASLResult("", "scott", "tiger")
    assert "tiger" not in repr(SASLResult("", "scott", "tiger"))


def test_config_validates_mechanisms_against_the_registry():
    base = '[[listener]]\nendpoint = "tcp:1"\ntls = "none"\nauth_required = false\n'
    base += '[spool]\npath = "s"\n[server]\nhostname = "h"\n'
    with pytest.raises(ConfigError, match="unsupported mechanism"):
        parse(base + '[auth]\nmechanisms = ["CRAM-MD5"]\n')
    assert parse(base + '[auth]\nmechanisms = ["login"]\n').auth.mechanisms == ("LOGIN",)


# --- checker factories: tables and lifecycle -----------------------------------------


def config_with(auth: str, tmp_path) -> str:
    return (
        '[server]\nhostname = "h"\n[[listener]]\nendpoint = "tcp:1"\ntls = "none"\n'
        f'auth_required = false\n[spool]\npath = "{tmp_path}/s"\n{auth}'
    )


def assemble(text: str):
    from kumoauth.ops.assembly import build_runtime
    from kumoauth.policy import Invoker
    from kumoauth.smtp.runtime import ProcessState

    cfg = parse(text, "/etc/kumoauth.toml")
    process = ProcessState(clock=task.Clock(), store=lambda m: defer.succeed(m.id))
    return build_runtime(cfg, process, None, Invoker())


def test_checker_table_is_validated_by_its_factory(tmp_path):
    from kumoauth.ops.assembly import OperatorError

    journal = tmp_path / "journal"
    good = (
        '[auth]\nchecker = "tests.checkers:journal_checker"\n'
        f'[auth.journal_checker]\njournal = "{journal}"\nusers = {{ scott = "tiger" }}\n'
    )
    runtime = assemble(config_with(good, tmp_path))
    spec, checker = runtime.checker
    assert spec.table == "journal_checker" and checker.config["users"] == {"scott": "tiger"}
    bad_key = good.replace("users =", "userz =")
    with pytest.raises(OperatorError, match=r"\[auth.journal_checker\] userz: unknown key"):
        assemble(config_with(bad_key, tmp_path))
    stray = good + "[auth.ldap]\nurl = 'x'\n"
    with pytest.raises(OperatorError, match=r"\[auth.ldap\]: no such table"):
        assemble(config_with(stray, tmp_path))
    with pytest.raises(OperatorError, match=r"\[auth.typo\]: no such table"):
        assemble(config_with("[auth.typo]\nx = 1\n", tmp_path))
    # a store's table under the default checker (the policy): say what to set
    with pytest.raises(OperatorError, match=r'set \[auth\] checker = "passwd-file"'):
        assemble(config_with('[auth.passwd-file]\npath = "users"\n', tmp_path))


def test_reload_keeps_a_checker_configured_again(tmp_path):
    from kumoauth.ops.assembly import build_runtime
    from kumoauth.policy import Invoker

    journal = tmp_path / "journal"
    text = config_with(
        '[auth]\nchecker = "tests.checkers:journal_checker"\n'
        f'[auth.journal_checker]\njournal = "{journal}"\n',
        tmp_path,
    )
    first = assemble(text)
    cfg = parse(text.replace(f'"{journal}"\n', f'"{journal}"\nusers = {{ a = "b" }}\n'), "/x")
    second = build_runtime(cfg, first.process, None, Invoker(), previous=first)
    assert second.checker[1] is first.checker[1]
    assert second.checker[0].config["users"] == {"a": "b"}
