"""
The AUTH throttle over a real redis-server of the tests' own
(tests/redis_server.py), on the real reactor (in a thread, as
tests/test_store_redis.py runs it), through the Authenticator and, once,
through a real ``twistd kumoauth``:

- a Redis that answers reads but refuses writes (audit finding 2): at
  ``maxmemory`` with ``noeviction`` (OOM) the salt is read, not written,
  so the throttle keeps counting, before and after a reload; where an
  attempt cannot be counted (no salt yet under OOM, NOREPLICAS) AUTH gets
  454 (``on_store_error = "closed"``), logged once when the store goes and
  once when it is back;
- the fingerprint salt of a shared store survives a reload;
- attempts in flight at once from a client with a failure reach the
  checker at most as often as the limits allow, counting the failure in
  Redis and the attempts in flight in the process (finding 4); correct
  logins in flight at once from a clean client, through several
  instances, all succeed, and a success forgets its password in Redis;
- with ``fingerprint_key_file`` nothing in Redis lets a failed password be
  tested offline (finding 6).
"""

from __future__ import annotations

import hashlib
import hmac
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.cred import error as cred_error
from twisted.internet import defer, task
from twisted.logger import formatEvent

from kumoauth.auth.authenticator import Attempt, Authenticator, AuthLog, InFlight
from kumoauth.auth.cred import IPlainCredentials, PlainCredentials, make_portal
from kumoauth.auth.throttle import FINGERPRINT_SIZE, Throttle, authc_key
from kumoauth.config import AuthConfig, ThrottleConfig, parse
from kumoauth.meta import ConnMeta
from kumoauth.ops.loglimit import LogLimiter, StateLog
from kumoauth.ops.metrics import Metrics
from tests.redis_server import RedisServer, running_redis
from tests.redis_server import require_redis as _require_redis
from tests.upstream import in_reactor, start_reactor

USERS = {"scott": "tiger", "alice": "wonderland"}


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own: some tests make it refuse writes."""
    _require_redis()
    with running_redis() as server:
        yield server


class Checker:
    """
    A password checker that answers when told (``hold``) or at once, and
    counts what reached it.
    """

    credentialInterfaces = (IPlainCredentials,)

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.calls: list[str] = []
        self.pending: list[tuple[defer.Deferred[str], PlainCredentials]] = []

    def requestAvatarId(self, credentials: PlainCredentials) -> defer.Deferred[str]:  # noqa: N802
        self.calls.append(credentials.authc)
        if self.hold:
            d: defer.Deferred[str] = defer.Deferred()
            self.pending.append((d, credentials))
            return d
        return self._answer(credentials)

    def _answer(self, credentials: PlainCredentials) -> defer.Deferred[str]:
        if (
            USERS.get(credentials.authc, "right-" + credentials.authc)
            == credentials.password_text()
        ):
            return defer.succeed(credentials.authc)
        return defer.fail(cred_error.UnauthorizedLogin())

    def answer_all(self) -> None:
        pending, self.pending = self.pending, []
        for d, credentials in pending:
            self._answer(credentials).chainDeferred(d)


def authenticator(
    checker: Checker, store: Any, reactor: Any, config: ThrottleConfig | None = None
) -> Authenticator:
    config = config or ThrottleConfig(window=600, max_failures_per_ip=10, max_failures_per_authc=5)
    metrics = Metrics()
    return Authenticator(
        portal=make_portal([checker]),
        clock=reactor,
        auth=AuthConfig(failure_delay=0.0, timeout=10.0, throttle=config),
        log=AuthLog(metrics, LogLimiter(reactor)),
        in_flight=InFlight(),
        throttle=Throttle(store, config),
        store_state=StateLog("failure store"),
    )


def attempt(reactor: Any, ip: str = "192.0.2.7") -> Attempt:
    return Attempt("PLAIN", reactor.seconds(), ip, f"{ip}:1", "tcp:587", ConnMeta())


def creds(user: str, password: str) -> PlainCredentials:
    return PlainCredentials("", user, password, ConnMeta())


def authenticate(auth: Authenticator, reactor: Any, user: str, password: str) -> bytes:
    outcome = in_reactor(auth.authenticate, attempt(reactor), creds(user, password))
    return outcome.reply[:3]


def refuse_writes(redis: RedisServer, refuse: bool = True) -> None:
    with redis.client() as raw:
        raw("CONFIG", "SET", "maxmemory-policy", "noeviction")
        raw("CONFIG", "SET", "maxmemory", "1" if refuse else "0")


def state_lines(captured_log: Any) -> tuple[list[str], list[str]]:
    text = [formatEvent(e) or "" for e in captured_log.events]
    return (
        [line for line in text if "failure store unavailable" in line],
        [line for line in text if "failure store available again" in line],
    )


# --------------------------------------------------------------------------
# Redis answers reads, refuses writes (finding 2)


def test_redis_at_maxmemory_keeps_counting(
    reactor: Any, redis: RedisServer, stores: Any, captured_log: Any
) -> None:
    """
    Redis at ``maxmemory`` with ``noeviction`` refuses SET (the salt) but
    still runs the throttle's scripts (their first write is a removal, and
    Redis does not stop a script that has written): a process started then
    reads the salt (GET first) and counts, so the limits hold and nothing
    is logged.
    """
    url = redis.url(prefix="oom:")
    running = stores(url)
    # A running site: the salt is in Redis.
    assert authenticate(authenticator(Checker(), running, reactor), reactor, "bob", "x") == b"535"
    refuse_writes(redis)
    checker = Checker()
    auth = authenticator(checker, stores(url), reactor)  # started now
    replies = [authenticate(auth, reactor, "scott", f"guess{i}") for i in range(12)]
    assert replies == [b"535"] * 5 + [b"454"] * 7
    assert checker.calls == ["scott"] * 5
    assert state_lines(captured_log) == ([], [])


def test_redis_refusing_the_salt_fails_closed_with_one_line_each_way(
    reactor: Any, redis: RedisServer, stores: Any, captured_log: Any
) -> None:
    """
    A site whose Redis refuses to store the salt (none there yet, OOM): no
    attempt can be counted, so none reaches the checker; one line when the
    store goes, one when it is back.
    """
    refuse_writes(redis)
    checker = Checker()
    auth = authenticator(checker, stores(redis.url(prefix="new-site:")), reactor)
    replies = [authenticate(auth, reactor, "scott", f"guess{i}") for i in range(12)]
    assert replies == [b"454"] * 12
    assert checker.calls == []
    down, back = state_lines(captured_log)
    assert len(down) == 1 and back == []
    assert "OOM" in down[0] and "AUTH gets 454 (on_store_error = closed)" in down[0]
    refuse_writes(redis, False)
    assert authenticate(auth, reactor, "scott", "guess-after") == b"535"
    assert authenticate(auth, reactor, "scott", "tiger") == b"235"
    assert checker.calls == ["scott", "scott"]
    down, back = state_lines(captured_log)
    assert len(down) == 1 and len(back) == 1
    assert "(12 operations met it down)" in back[0]


def test_redis_refusing_every_write_fails_closed_with_one_line_each_way(
    reactor: Any, redis: RedisServer, stores: Any, captured_log: Any
) -> None:
    """
    Redis refusing writes while answering reads (``min-replicas-to-write``
    unmet: NOREPLICAS): the salt is read, but no attempt can be counted,
    so AUTH gets 454 and the log has one line each way.
    """
    url = redis.url(prefix="noreplicas:")
    checker = Checker()
    auth = authenticator(checker, stores(url), reactor)
    assert authenticate(auth, reactor, "bob", "x") == b"535"  # the salt is in Redis
    assert authenticate(auth, reactor, "scott", "tiger") == b"235"
    with redis.client() as raw:
        raw("CONFIG", "SET", "min-replicas-to-write", "1")
        assert len(raw("GET", "noreplicas:secret:fingerprint-salt")) == 32  # reads work
    try:
        fresh = authenticator(checker, stores(url), reactor)  # reads the salt, counts nothing
        replies = [authenticate((auth, fresh)[i % 2], reactor, "scott", f"g{i}") for i in range(10)]
        assert replies == [b"454"] * 10
        assert checker.calls == ["bob", "scott"]
    finally:
        with redis.client() as raw:
            raw("CONFIG", "SET", "min-replicas-to-write", "0")
    down, back = state_lines(captured_log)
    assert len(down) == 2 and back == []  # one per process (each has its own state)
    assert all("NOREPLICAS" in line for line in down), down
    assert authenticate(auth, reactor, "scott", "tiger") == b"235"
    assert len(state_lines(captured_log)[1]) == 1


def runtime_config(tmp_path: Path, url: str, extra: str = "") -> Any:
    text = (
        '[server]\nhostname = "h"\n[[listener]]\nendpoint = "tcp:1"\ntls = "none"\n'
        f'auth_required = false\n[spool]\npath = "{tmp_path}/spool"\n'
        f'[auth]\nfailure_delay = 0\n[auth.throttle]\nstore = "{url}"\n'
        "max_failures_per_ip = 10\nmax_failures_per_authc = 5\n" + extra
    )
    return parse(text, tmp_path / "kumoauth.toml")


def test_a_reload_keeps_the_fingerprint_salt_of_a_shared_store(
    reactor: Any, redis: RedisServer, tmp_path: Path
) -> None:
    """
    Two generations (start, SIGHUP) built as the service builds them: the
    second uses the salt the first read, without asking Redis again.
    Redis losing the salt in between (restarted without persistence) shows
    it: the same wrong password before and after the reload counts once.
    """
    from kumoauth.ops.assembly import build_runtime
    from kumoauth.policy import Invoker
    from kumoauth.smtp.runtime import ProcessState

    url = redis.url(prefix="reload:")
    checker = Checker()
    process = ProcessState(clock=reactor, store=lambda m: defer.succeed(m.id))
    cfg = runtime_config(tmp_path, url)
    first = in_reactor(build_runtime, cfg, process, [checker], Invoker())
    try:
        one = in_reactor(first.authenticator.authenticate, attempt(reactor), creds("scott", "x"))
        assert one.result == "failure"
        with redis.client() as raw:
            assert raw("DEL", "reload:secret:fingerprint-salt") == 1
        second = in_reactor(build_runtime, cfg, process, [checker], Invoker(), previous=first)
        assert second.throttle.store is first.throttle.store
        again = in_reactor(second.authenticator.authenticate, attempt(reactor), creds("scott", "x"))
        assert again.result == "failure"
        store = second.throttle.store
        assert in_reactor(store.count, authc_key("scott"), 600)[0] == 1
        with redis.client() as raw:
            assert raw("EXISTS", "reload:secret:fingerprint-salt") == 0  # not written again
    finally:
        for store in process.failure_stores.values():
            in_reactor(store.close)


@pytest.mark.e2e
def test_a_server_keeps_its_throttle_when_redis_is_full_across_a_sighup(
    tmp_path: Path, redis: RedisServer
) -> None:
    """
    The audit's reproduction: a real ``twistd kumoauth``, Redis at
    ``maxmemory`` with ``noeviction``, distinct wrong guesses before and
    after a SIGHUP: the limits hold both times (3 per user reach the
    checker), and nothing says the store is unavailable.
    """
    from tests.server import make_certs, running_server
    from tests.test_e2e import POLICY
    from tests.test_shared_state_e2e import attempt as smtp_attempt
    from tests.test_shared_state_e2e import wait_for

    certs = make_certs(tmp_path / "certs")
    url = redis.url(db=0, prefix="oom-e2e:", timeout="0.5")
    throttle = f'store = "{url}"\nmax_failures_per_ip = 5\nmax_failures_per_authc = 3'
    with running_server(tmp_path / "k", certs, POLICY, throttle=throttle) as srv:
        assert smtp_attempt(srv, "scott", "tiger") == 235
        refuse_writes(redis)
        phases = []
        for phase in ("before", "after"):
            phases.append([smtp_attempt(srv, "scott", f"{phase}{i}") for i in range(6)])
            with redis.client() as raw:
                raw("DEL", "oom-e2e:fail:ip:127.0.0.1", "oom-e2e:fail:authc:scott")
            if phase == "before":
                srv.proc.send_signal(signal.SIGHUP)
                assert wait_for(lambda: "reloaded configuration" in srv.log())
        refuse_writes(redis, False)
        log = srv.log()
    assert phases == [[535] * 3 + [454] * 3] * 2
    assert "failure store" not in log and "Traceback" not in log, log
    assert "before1" not in log and "after1" not in log


# --------------------------------------------------------------------------
# attempts in flight at once, several instances (finding 4)


async def all_in_flight(checker: Checker, ds: list[Any], reactor: Any) -> list[Any]:
    """Wait until every attempt is with the checker or answered; answer; collect."""
    # Not d.called: a Deferred paused on another (a count still to come)
    # has been called and is not answered.
    answered: list[None] = []
    for d in ds:
        d.addBoth(lambda result: (answered.append(None), result)[1])
    deadline = reactor.seconds() + 10
    while len(checker.pending) + len(answered) < len(ds):
        assert reactor.seconds() < deadline, "attempts stuck"
        await task.deferLater(reactor, 0.01, lambda: None)
    checker.answer_all()
    return [await d for d in ds]


@pytest.mark.parametrize(
    ("users", "reached"), [("one", 4), ("many", 9)], ids=["per-authc", "per-ip"]
)
def test_parallel_guesses_from_a_failing_client_reach_the_checker_at_most_limit_minus_one(
    reactor: Any, redis: RedisServer, stores: Any, users: str, reached: int
) -> None:
    prefix = f"race-{users}:"
    store = stores(redis.url(prefix=prefix))
    assert authenticate(authenticator(Checker(), store, reactor), reactor, "scott", "x") == b"535"
    checker = Checker(hold=True)
    auth = authenticator(checker, store, reactor)

    def run() -> defer.Deferred[list[Any]]:
        ds = [
            auth.authenticate(
                attempt(reactor), creds("scott" if users == "one" else f"user{i}", f"guess{i}")
            )
            for i in range(40)
        ]
        return defer.ensureDeferred(all_in_flight(checker, ds, reactor))

    outcomes = in_reactor(run)
    assert len(checker.calls) == reached
    assert sorted(o.reply[:3] for o in outcomes) == [b"454"] * (40 - reached) + [b"535"] * reached
    assert in_reactor(store.count, "ip:192.0.2.7", 600)[0] == reached + 1
    assert len(auth.in_flight.keys) == 0


def test_parallel_correct_logins_through_several_instances_all_succeed(
    reactor: Any, redis: RedisServer, stores: Any
) -> None:
    """A webmail host: 40 users at once from one clean address, four instances."""
    prefix = "clean:"
    checker = Checker(hold=True)
    instances = [
        authenticator(checker, stores(redis.url(prefix=prefix)), reactor) for _ in range(4)
    ]

    def run() -> defer.Deferred[list[Any]]:
        ds = [
            instances[i % 4].authenticate(attempt(reactor), creds(f"user{i}", f"right-user{i}"))
            for i in range(40)
        ]
        return defer.ensureDeferred(all_in_flight(checker, ds, reactor))

    outcomes = in_reactor(run)
    assert [o.reply[:3] for o in outcomes] == [b"235"] * 40
    assert len(checker.calls) == 40


def test_a_success_forgets_its_password_in_redis_and_nothing_else(
    reactor: Any, redis: RedisServer, stores: Any
) -> None:
    """
    alice's right password counted once (her session went away while it
    was checked, through another instance), attackers' guesses for her from
    elsewhere: her next success removes her password from both keys, and
    only it.
    """
    url = redis.url(prefix="forget:")
    store = stores(url)
    attackers = authenticator(Checker(), store, reactor)
    for i in range(3):
        outcome = in_reactor(
            attackers.authenticate, attempt(reactor, f"198.51.100.{i}"), creds("alice", f"g{i}")
        )
        assert outcome.reply[:3] == b"535"
    # The dropped attempt, counted through another instance.
    other = Throttle(
        stores(url), ThrottleConfig(window=600, max_failures_per_ip=10, max_failures_per_authc=5)
    )
    in_reactor(other.failed, "192.0.2.10", "alice", "wonderland")
    assert in_reactor(store.count, authc_key("alice"), 600)[0] == 4
    home = attempt(reactor, "192.0.2.10")
    assert (
        in_reactor(attackers.authenticate, home, creds("alice", "wonderland")).reply[:3] == b"235"
    )

    def settled() -> bool:
        return in_reactor(store.count, "ip:192.0.2.10", 600)[0] == 0

    deadline = time.monotonic() + 5
    while not settled():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert in_reactor(store.count, authc_key("alice"), 600)[0] == 3  # the attackers' guesses


# --------------------------------------------------------------------------
# the fingerprint key outside Redis (finding 6)


def test_fingerprint_key_file_keeps_the_key_out_of_redis(
    reactor: Any, redis: RedisServer, stores: Any
) -> None:
    from kumoauth.auth.throttle import key_from_file

    key = bytes(range(40))
    config = ThrottleConfig(
        window=600, max_failures_per_ip=10, max_failures_per_authc=5, fingerprint_key=key
    )
    a = authenticator(Checker(), stores(redis.url(prefix="keyed:")), reactor, config)
    b = authenticator(Checker(), stores(redis.url(prefix="keyed:")), reactor, config)
    assert authenticate(a, reactor, "scott", "tigre") == b"535"
    assert authenticate(b, reactor, "scott", "tigre") == b"535"  # another instance: counts once
    with redis.client() as raw:
        keys = sorted(raw.scan("keyed:*"))
        fingerprints = raw("ZRANGE", "keyed:fail:authc:scott", 0, -1)
    assert keys == [b"keyed:fail:authc:scott", b"keyed:fail:ip:192.0.2.7"]  # no secret: key
    expected = hmac.new(key_from_file(key), b"scott\0tigre", hashlib.sha256).digest()
    assert fingerprints == [expected[:FINGERPRINT_SIZE]]
    # What Redis holds does not key them: not its salt, not the file's bytes as they are.
    assert hmac.new(key, b"scott\0tigre", hashlib.sha256).digest()[:FINGERPRINT_SIZE] not in (
        fingerprints
    )


def test_without_a_key_file_a_redis_store_keeps_its_salt(
    reactor: Any, redis: RedisServer, stores: Any
) -> None:
    auth = authenticator(Checker(), stores(redis.url(prefix="salted:")), reactor)
    assert authenticate(auth, reactor, "scott", "tigre") == b"535"
    with redis.client() as raw:
        deadline = time.monotonic() + 5
        while not (fingerprints := raw("ZRANGE", "salted:fail:authc:scott", 0, -1)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        salt = raw("GET", "salted:secret:fingerprint-salt")
    assert len(salt) == 32
    assert fingerprints == [hmac.new(salt, b"scott\0tigre", hashlib.sha256).digest()[:12]]
