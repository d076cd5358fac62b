"""
The shared store (kumoauth.stores.redis) against real redis-servers of our
own (tests/redis_server.py) on the real reactor (in a thread, as
tests/upstream.py runs it): the same scenario on the memory store and on
Redis, exact counts under concurrency from several store instances (as
several processes), the keys' TTLs and names as Redis holds them, the
shared secret and generation, the admin calls, outages (Redis killed,
paused, restarted): failures naming the store, which logs nothing itself,
and one log line per state change from a real ``twistd kumoauth`` whose
failure store it is; cancellation, the UNIX socket and TLS, passwords
that never reach a message or a log line, and the URL parser.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from kumoauth.stores import (
    ICounterStore,
    IFailureStore,
    ISharedState,
    IStoreAdmin,
    StoreUnavailable,
    make_store,
)
from kumoauth.stores.memory import MemoryStore
from kumoauth.stores.redis import RedisStore, from_spec, parse_spec
from tests.redis_server import RedisServer, running_redis
from tests.redis_server import require_redis as _require_redis
from tests.upstream import in_reactor, start_reactor

WINDOW = 0.3
PASSWORD = "Redis-Secret-pw/7"  # noqa: S105 - the test server's


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def either_store(
    reactor: Any, request: pytest.FixtureRequest, prefix: str, stores: Any
) -> Callable[[str], Any]:
    """The memory store, or a Redis one (its server started only then)."""

    def make(kind: str) -> Any:
        if kind == "memory":
            return MemoryStore(reactor)
        return stores(request.getfixturevalue("redis").url(prefix=prefix))

    return make


def fp(n: int) -> bytes:
    """A 12-byte fingerprint, binary (NUL, CR, LF, high bytes)."""
    return bytes([n % 256, 0, 13, 10, 255, 128]) + n.to_bytes(6, "big")


def sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def fails(fn: Callable[..., Any], *args: Any) -> tuple[StoreUnavailable, float]:
    """Call *fn* in the reactor: it must fail with StoreUnavailable; how long it took."""
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        in_reactor(fn, *args)
    return info.value, time.monotonic() - start


# --------------------------------------------------------------------------
# one scenario, two stores


async def scenario(store: Any, reactor: Any) -> list[Any]:
    """Everything observable, with times cut to "in the window" or 0."""
    trace: list[Any] = []

    def t(value: float, window: float = WINDOW) -> str:
        if value == 0.0:
            return "0"
        return "in window" if 0 < value <= window + 0.01 else f"out of window: {value}"

    k, other = "ip:192.0.2.1", "authc:alice"
    trace.append(await store.count(k, WINDOW))
    for f in (fp(1), fp(1), fp(2), fp(3), fp(4), fp(1)):
        trace.append(await store.record(k, f, WINDOW, 3))
    n, retry = await store.count(k, WINDOW)
    trace.append((n, t(retry)))
    trace.append(await store.record(other, fp(1), WINDOW, 0))  # keep 0 counts as 1
    trace.append(await store.record(other, fp(2), WINDOW, 0))
    trace.append(await store.record("ip:2001:db8::/64", fp(9), WINDOW, 5))
    listed = sorted((name, n) for name, n, _ in await store.failures("ip"))
    trace.append(listed)
    trace.append(sorted((name, n) for name, n, _ in await store.failures("authc")))
    await sleep(reactor, WINDOW + 0.05)
    trace.append(await store.count(k, WINDOW))
    trace.append(await store.record(k, fp(1), WINDOW, 3))
    trace.append(await store.clear_failures(k))
    trace.append(await store.clear_failures(k))
    trace.append(await store.count(k, WINDOW))

    c = "user:alice"
    for amount in (2, 3, 1, 0):
        ok, count, reset_in = await store.add(c, amount, WINDOW, 5)
        trace.append((ok, count, t(reset_in)))
    count, reset_in = await store.get(c)
    trace.append((count, t(reset_in)))
    trace.append(await store.reset(c))
    trace.append(await store.reset(c))
    trace.append(await store.get(c))
    ok, count, reset_in = await store.add("user:bob", 10, WINDOW, 5)  # over the limit at once
    trace.append((ok, count, t(reset_in)))
    trace.append(await store.get("user:bob"))
    await store.add(c, 4, WINDOW, 5)
    await sleep(reactor, WINDOW + 0.05)
    trace.append(await store.get(c))
    ok, count, reset_in = await store.add(c, 4, WINDOW, 5)
    trace.append((ok, count, t(reset_in)))
    # a negative amount gives back: never below zero, never a new window
    for amount in (-3, -5):
        ok, count, reset_in = await store.add(c, amount, WINDOW, 5)
        trace.append((ok, count, t(reset_in)))
    count, reset_in = await store.get(c)
    trace.append((count, t(reset_in)))
    ok, count, reset_in = await store.add("user:carol", -2, WINDOW, 5)
    trace.append((ok, count, t(reset_in)))
    trace.append(await store.get("user:carol"))
    # a give-back for another window than the running one changes nothing
    _, _, reset_in = await store.add(c, 3, WINDOW, 5)
    ends = time.time() + reset_in
    trace.append((await store.add(c, -1, WINDOW, 5, until=ends + 3600))[:2])
    trace.append((await store.add(c, -1, WINDOW, 5, until=ends))[:2])

    s1, s2, s3 = await store.secret("salt"), await store.secret("salt"), await store.secret("x")
    trace.append((len(s1), s1 == s2, s1 == s3))
    trace.append(await store.generation("cache"))
    trace.append(await store.bump("cache"))
    trace.append(await store.bump("cache"))
    trace.append(await store.generation("cache"))
    return trace


EXPECTED = [
    (0, 0.0),
    1,
    1,
    2,
    3,
    3,
    3,
    (3, "in window"),
    1,
    1,
    1,
    [("192.0.2.1", 3), ("2001:db8::/64", 1)],
    [("alice", 1)],
    (0, 0.0),
    1,
    1,
    0,
    (0, 0.0),
    (True, 2, "in window"),
    (True, 5, "in window"),
    (False, 5, "in window"),
    (True, 5, "in window"),
    (5, "in window"),
    True,
    False,
    (0, 0.0),
    (False, 0, "in window"),
    (0, 0.0),
    (0, 0.0),
    (True, 4, "in window"),
    (True, 1, "in window"),
    (True, 0, "in window"),
    (0, "in window"),
    (True, 0, "0"),
    (0, 0.0),
    (True, 3),
    (True, 2),
    (32, True, False),
    0,
    1,
    2,
    2,
]


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_same_semantics_as_memory(kind: str, reactor: Any, either_store: Any) -> None:
    assert in_reactor(scenario, either_store(kind), reactor) == EXPECTED


def test_provides_the_interfaces(redis: RedisServer, stores: Any, prefix: str) -> None:
    store = stores(redis.url(prefix=prefix))
    for interface in (IFailureStore, ICounterStore, ISharedState, IStoreAdmin):
        assert verifyObject(interface, store)
    assert store.shared is True


def test_make_store_knows_the_schemes(reactor: Any, redis: RedisServer) -> None:
    for spec in (redis.url(), f"unix://{redis.socket_path}", "rediss://localhost"):
        store = make_store(spec, reactor)
        assert isinstance(store, RedisStore)
        in_reactor(store.close)


# --------------------------------------------------------------------------
# what Redis holds


def test_keys_ttls_and_binary_fingerprints(redis: RedisServer, stores: Any, prefix: str) -> None:
    store = stores(redis.url(prefix=prefix))
    with redis.client() as raw:
        before = set(raw.scan("*"))
        # Every byte value, fingerprints differing in one byte only: all distinct.
        fps = [bytes([b]) + b"\x00" * 10 + bytes([255 - b]) for b in range(256)]
        for i, f in enumerate(fps):
            assert in_reactor(store.record, "ip:198.51.100.7", f, 5.0, 1000) == i + 1
        assert in_reactor(store.record, "ip:198.51.100.7", fps[0], 5.0, 1000) == 256
        in_reactor(store.add, "user:carol", 1, 2.5, 10)
        in_reactor(store.secret, "salt")
        in_reactor(store.bump, "cache")
        new = set(raw.scan("*")) - before
        assert new == {
            f"{prefix}fail:ip:198.51.100.7".encode(),
            f"{prefix}count:user:carol".encode(),
            f"{prefix}secret:salt".encode(),
            f"{prefix}gen:cache".encode(),
        }
        members = raw("ZRANGE", f"{prefix}fail:ip:198.51.100.7", 0, -1)
        assert sorted(members) == sorted(fps)  # the raw 12 bytes, not an encoding
        assert 0 < raw("PTTL", f"{prefix}fail:ip:198.51.100.7") <= 5000
        assert 0 < raw("PTTL", f"{prefix}count:user:carol") <= 2500
        assert raw("PTTL", f"{prefix}secret:salt") == -1  # kept for good
        assert len(raw("GET", f"{prefix}secret:salt")) == 32


def test_keys_expire_on_their_own(redis: RedisServer, stores: Any, prefix: str) -> None:
    store = stores(redis.url(prefix=prefix))
    in_reactor(store.record, "ip:203.0.113.1", fp(1), 0.2, 5)
    in_reactor(store.add, "user:dave", 1, 0.2, 5)
    time.sleep(0.35)
    with redis.client() as raw:
        assert raw.scan(f"{prefix}*") == []


def test_window_slides(redis: RedisServer, stores: Any, prefix: str, reactor: Any) -> None:
    store = stores(redis.url(prefix=prefix))

    async def run() -> list[Any]:
        out = [await store.record("k", fp(1), 1.0, 10)]
        await sleep(reactor, 0.5)
        out.append(await store.record("k", fp(2), 1.0, 10))
        n, retry = await store.count("k", 1.0)
        out.append((n, 0.25 < retry < 0.5))  # the first one leaves in ~0.5 s
        await sleep(reactor, 0.6)
        n, retry = await store.count("k", 1.0)
        out.append((n, 0.1 < retry <= 0.5))  # the second one leaves in ~0.4 s
        return out

    assert in_reactor(run) == [1, 2, (2, True), (1, True)]


# --------------------------------------------------------------------------
# atomicity across "processes"


def test_concurrent_records_from_several_instances_count_exactly(
    redis: RedisServer, stores: Any, prefix: str
) -> None:
    instances = [stores(redis.url(prefix=prefix)) for _ in range(4)]

    def burst() -> defer.Deferred[list[int]]:
        return defer.gatherResults(
            [instances[i % 4].record("authc:victim", fp(1000 + i), 30.0, 1000) for i in range(200)]
        )

    counts = in_reactor(burst)
    # Each record saw the count right after its own addition: 1..200, once each.
    assert sorted(counts) == list(range(1, 201))
    assert in_reactor(instances[0].count, "authc:victim", 30.0)[0] == 200
    # The cap holds under concurrency too.
    capped = in_reactor(
        lambda: defer.gatherResults(
            [instances[i % 4].record("ip:192.0.2.9", fp(i), 30.0, 5) for i in range(60)]
        )
    )
    assert max(capped) == 5 and capped.count(5) == 56
    assert in_reactor(instances[1].count, "ip:192.0.2.9", 30.0)[0] == 5


def test_counter_limit_holds_under_concurrency(
    redis: RedisServer, stores: Any, prefix: str
) -> None:
    a, b = stores(redis.url(prefix=prefix)), stores(redis.url(prefix=prefix))
    results = in_reactor(
        lambda: defer.gatherResults(
            [(a if i % 2 else b).add("user:eve", 1, 30.0, 37) for i in range(100)]
        )
    )
    allowed = [count for ok, count, _ in results if ok]
    assert sorted(allowed) == list(range(1, 38))
    assert all(count == 37 for ok, count, _ in results if not ok)
    assert in_reactor(a.get, "user:eve")[0] == 37
    assert in_reactor(b.reset, "user:eve") is True
    assert in_reactor(a.get, "user:eve") == (0, 0.0)


def test_shared_state_across_instances(redis: RedisServer, stores: Any, prefix: str) -> None:
    a, b = stores(redis.url(prefix=prefix)), stores(redis.url(prefix=prefix))
    both = in_reactor(
        lambda: defer.gatherResults([s.secret("fingerprint-salt") for s in (a, b, a, b)])
    )
    assert len(set(both)) == 1 and len(both[0]) == 32
    c = stores(redis.url(prefix=prefix + "other:"))
    assert in_reactor(c.secret, "fingerprint-salt") != both[0]  # another prefix, another site
    assert in_reactor(b.generation, "cache") == 0
    assert in_reactor(a.bump, "cache") == 1
    assert in_reactor(b.generation, "cache") == 1
    assert in_reactor(b.bump, "cache") == 2
    assert in_reactor(a.generation, "cache") == 2


def test_instances_agree_on_the_secret_again_after_redis_forgets_it(
    redis: RedisServer, stores: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a Redis restart (here: the key gone, as after one) an instance
    # started meanwhile made a new salt and the running ones kept theirs
    # until restarted: one wrong password counted once per instance.
    from kumoauth.stores import redis as redis_store

    a = stores(redis.url(prefix=prefix))
    old = in_reactor(a.secret, "fingerprint-salt")
    key = f"{prefix}secret:fingerprint-salt"
    raw = redis.client()
    raw("DEL", key)
    b = stores(redis.url(prefix=prefix))  # started after the restart
    new = in_reactor(b.secret, "fingerprint-salt")
    assert new != old
    assert in_reactor(a.secret, "fingerprint-salt") == old  # held, until the next comparison
    monkeypatch.setattr(redis_store, "SECRET_RESYNC", 0.0)
    assert in_reactor(a.secret, "fingerprint-salt") == new  # takes what Redis holds
    # The other way: the running instance compares first and writes back
    # the salt they all had; one started after that takes it.
    raw("DEL", key)
    assert in_reactor(a.secret, "fingerprint-salt") == new
    assert raw("GET", key) == new
    raw.close()
    c = stores(redis.url(prefix=prefix))
    assert in_reactor(c.secret, "fingerprint-salt") == new


def test_admin_lists_and_clears_across_instances(
    redis: RedisServer, stores: Any, prefix: str
) -> None:
    a, b = stores(redis.url(prefix=prefix)), stores(redis.url(prefix=prefix))
    for i in range(3):
        in_reactor(a.record, "ip:192.0.2.1", fp(i), 10.0, 10)
    in_reactor(a.record, "ip:2001:db8::/64", fp(1), 10.0, 10)
    in_reactor(a.record, "authc:alice", fp(1), 10.0, 10)
    listed = in_reactor(b.failures, "ip")
    by_name = {name: (n, ttl) for name, n, ttl in listed}
    assert by_name["192.0.2.1"][0] == 3 and by_name["2001:db8::/64"][0] == 1
    assert all(0 < ttl <= 10.0 for _, ttl in by_name.values())
    assert [(name, n) for name, n, _ in in_reactor(b.failures, "authc")] == [("alice", 1)]
    assert in_reactor(b.clear_failures, "ip:192.0.2.1") == 1
    assert in_reactor(b.clear_failures, "ip:192.0.2.1") == 0
    assert in_reactor(a.count, "ip:192.0.2.1", 10.0) == (0, 0.0)
    assert "192.0.2.1" not in {name for name, _, _ in in_reactor(a.failures, "ip")}


def test_admin_scan_walks_many_keys_and_escapes_the_prefix(
    redis: RedisServer, stores: Any, prefix: str
) -> None:
    # "[ab]*" would match "a..." and "b..." prefixes if used as a glob.
    odd = stores(redis.url(prefix=f"{prefix}[ab]*:"))
    plain_a = stores(redis.url(prefix=f"{prefix}a:"))
    in_reactor(plain_a.record, "ip:192.0.2.200", fp(1), 10.0, 10)

    def many() -> defer.Deferred[Any]:
        return defer.gatherResults(
            [odd.record(f"ip:10.1.{i // 250}.{i % 250}", fp(i), 10.0, 10) for i in range(1500)]
        )

    in_reactor(many)
    listed = in_reactor(odd.failures, "ip")
    assert len(listed) == 1500 and {n for _, n, _ in listed} == {1}
    assert in_reactor(odd.failures, "authc") == []
    assert [name for name, _, _ in in_reactor(plain_a.failures, "ip")] == ["192.0.2.200"]


# --------------------------------------------------------------------------
# outages


def store_lines(captured_log: Any) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in captured_log.namespace("kumoauth.stores")]


def test_redis_killed_then_restarted(
    reactor: Any, stores: Any, prefix: str, captured_log: Any
) -> None:
    _require_redis()
    with running_redis() as server:
        store = stores(server.url(prefix=prefix, timeout=0.5))
        assert in_reactor(store.record, "ip:192.0.2.1", fp(1), 10.0, 5) == 1
        server.kill()
        reasons = set()
        for _ in range(25):
            e, took = fails(store.count, "ip:192.0.2.1", 10.0)
            assert took < 0.5 + 0.8
            reasons.add(str(e))
        burst = in_reactor(
            lambda: defer.DeferredList(
                [store.record("ip:192.0.2.1", fp(i), 10.0, 5) for i in range(30)],
                consumeErrors=True,
            )
        )
        assert all(not ok and r.check(StoreUnavailable) for ok, r in burst)
        named = f"{store.settings.display}: "
        assert f"127.0.0.1:{server.port}" in named
        assert all(reason.startswith(named) for reason in reasons), reasons
        causes = {reason.removeprefix(named) for reason in reasons}
        assert causes <= {"connection refused", "connection closed by Redis", "connection lost"}
        # The callers log the outage, saying what it means for them.
        assert store_lines(captured_log) == []

        server.start()  # the same port; the data are gone (nothing saved)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert in_reactor(store.count, "ip:192.0.2.1", 10.0) == (0, 0.0)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "no recovery"
                time.sleep(0.1)
        assert in_reactor(store.record, "ip:192.0.2.1", fp(1), 10.0, 5) == 1
        assert in_reactor(store.secret, "s") == in_reactor(store.secret, "s")
        assert store_lines(captured_log) == []


def test_paused_redis_times_out_then_recovers(
    reactor: Any, stores: Any, prefix: str, captured_log: Any
) -> None:
    _require_redis()
    with running_redis() as server:
        store = stores(server.url(prefix=prefix, timeout=0.3))
        other = stores(server.url(prefix=prefix, timeout=0.3))
        assert in_reactor(store.bump, "g") == 1
        assert in_reactor(other.generation, "g") == 1  # other is connected too
        server.pause()
        try:
            e, took = fails(store.generation, "g")
            assert "no answer within 0.3 s" in str(e)
            assert 0.25 < took < 1.3
            # After a timeout the store backs off: failing at once, no waiting.
            _, took = fails(store.generation, "g")
            assert took < 0.5
            # Many at once: each one fails within the timeout, not one after the other.
            start = time.monotonic()
            burst = in_reactor(
                lambda: defer.DeferredList(
                    [other.count("ip:x", 1.0) for _ in range(20)], consumeErrors=True
                )
            )
            assert time.monotonic() - start < 1.3
            assert all(not ok and r.check(StoreUnavailable) for ok, r in burst)
        finally:
            server.resume()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert in_reactor(store.generation, "g") == 1
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert store_lines(captured_log) == []  # the callers log outages


def test_a_server_logs_one_line_per_state_change(tmp_path: Path) -> None:
    """
    A real ``twistd kumoauth`` whose failure store is a Redis of the test's
    own, killed, then started again: its log says the store is unavailable
    once (naming it, and what AUTH gets meanwhile) and available again
    once, not a line of the store's and one of the throttle's for the same
    event.
    """
    from tests.server import make_certs, running_server
    from tests.test_e2e import POLICY
    from tests.test_shared_state_e2e import attempt, wait_for

    _require_redis()
    certs = make_certs(tmp_path / "certs")
    with running_redis() as redis:
        url = redis.url(db=0, prefix="one-line:", timeout="0.5")
        with running_server(tmp_path / "k", certs, POLICY, throttle=f'store = "{url}"') as srv:
            assert attempt(srv, "scott", "tiger") == 235
            redis.kill()
            for _ in range(5):
                assert attempt(srv, "scott", "tiger") == 454
            redis.start()
            assert wait_for(lambda: attempt(srv, "scott", "tiger") == 235, timeout=20)
            assert attempt(srv, "scott", "tiger") == 235
            log = srv.log()
    down = [line for line in log.splitlines() if "unavailable" in line]
    back = [line for line in log.splitlines() if "available again" in line]
    assert len(down) == 1 and len(back) == 1, log
    assert "[kumoauth#error] failure store unavailable: " in down[0], down
    assert f"redis://127.0.0.1:{redis.port}/0: connection " in down[0], down
    assert "AUTH gets 454" in down[0], down
    assert "failure store available again" in back[0], back
    assert "kumoauth.stores" not in log and "Traceback" not in log, log


def test_cancelled_operations_leave_the_connection_in_sync(
    redis: RedisServer, stores: Any, prefix: str, reactor: Any
) -> None:
    store = stores(redis.url(prefix=prefix))

    async def run() -> list[Any]:
        # Cancelled while waiting for the first connection...
        first = store.count("ip:a", 10.0)
        first.cancel()
        try:
            await first
        except defer.CancelledError:
            pass
        # ...and while its command is on the wire: the replies that still
        # come must not be handed to the next operations.
        cancelled = []
        for i in range(40):
            d = store.record("ip:b", fp(i), 10.0, 1000)
            if i % 2:
                d.cancel()
                cancelled.append(d)
            else:
                await d
        for d in cancelled:
            d.addErrback(lambda f: f.trap(defer.CancelledError))
        return [
            await store.count("ip:a", 10.0),
            (await store.count("ip:b", 10.0))[0],
            await store.get("user:none"),
            await store.bump("g"),
        ]

    result = in_reactor(run)
    assert result[0] == (0, 0.0)
    assert 20 <= result[1] <= 40  # cancelled ones may have reached Redis
    assert result[2:] == [(0, 0.0), 1]


def test_close_leaves_nothing_behind(reactor: Any, redis: RedisServer, prefix: str) -> None:
    store = in_reactor(from_spec, redis.url(prefix=prefix), reactor)
    assert in_reactor(store.bump, "g") == 1
    with redis.client() as raw:
        clients = raw("CLIENT", "LIST").count(b"\n")
    in_reactor(store.close)
    e, _ = fails(store.generation, "g")
    assert str(e) == "store closed"
    time.sleep(0.1)
    with redis.client() as raw:
        assert raw("CLIENT", "LIST").count(b"\n") == clients - 1
    ours = [
        c
        for c in in_reactor(reactor.getDelayedCalls)
        if any(name in repr(c) for name in ("RedisStore", "kumoauth.stores.redis", "txredisapi"))
    ]
    assert ours == []
    # Closing a store that never connected, and closing twice.
    idle = in_reactor(from_spec, redis.url(prefix=prefix), reactor)
    in_reactor(idle.close)
    in_reactor(idle.close)


def test_unreachable_at_start(reactor: Any, stores: Any, tmp_path: Path) -> None:
    from tests.server import free_port

    store = stores(f"redis://127.0.0.1:{free_port()}?timeout=0.5")
    e, took = fails(store.count, "ip:x", 1.0)
    assert str(e) == f"{store.settings.display}: connection refused" and took < 0.5
    missing = stores(f"unix://{tmp_path}/nothing.sock")
    e, _ = fails(missing.bump, "g")
    assert "No such file" in str(e)


# --------------------------------------------------------------------------
# UNIX socket, TLS, passwords


def test_unix_socket_and_db(redis: RedisServer, stores: Any, prefix: str) -> None:
    store = stores(f"unix://{redis.socket_path}?db=3&prefix={prefix}")
    assert in_reactor(store.record, "ip:192.0.2.1", fp(1), 10.0, 5) == 1
    assert in_reactor(store.count, "ip:192.0.2.1", 10.0)[0] == 1
    tcp = stores(redis.url(db=3, prefix=prefix))
    assert in_reactor(tcp.count, "ip:192.0.2.1", 10.0)[0] == 1
    with redis.client() as raw:
        assert raw.scan(f"{prefix}*") == []  # not in db 0
        raw("SELECT", 3)
        assert raw.scan(f"{prefix}*") == [f"{prefix}fail:ip:192.0.2.1".encode()]


def test_rediss_verifies_the_certificate(
    reactor: Any, stores: Any, prefix: str, tmp_path: Path
) -> None:
    _require_redis()
    with running_redis(tls=True) as server:
        for host in ("localhost", "127.0.0.1"):
            store = stores(f"rediss://{host}:{server.tls_port}?ca_file={server.ca_file}")
            assert in_reactor(store.bump, prefix + host) == 1
        # Another CA, or the system's: refused.
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        for spec in (
            f"rediss://localhost:{server.tls_port}?ca_file={other}&timeout=2",
            f"rediss://localhost:{server.tls_port}?timeout=2",
        ):
            refused = stores(spec)
            e, _ = fails(refused.bump, "g")
            named = f"{refused.settings.display}: "
            assert str(e).startswith(named + "TLS") or "connection" in str(e), str(e)
    with running_redis(tls=True, cert_names=("redis.example",)) as server:
        # The right CA, the wrong name.
        store = stores(f"rediss://127.0.0.1:{server.tls_port}?ca_file={server.ca_file}&timeout=2")
        fails(store.bump, "g")


def test_passwords_never_shown(
    reactor: Any, stores: Any, prefix: str, captured_log: Any, tmp_path: Path
) -> None:
    _require_redis()
    with running_redis(password=PASSWORD) as server:
        encoded = PASSWORD.replace("/", "%2F")
        good = stores(f"redis://:{encoded}@127.0.0.1:{server.port}?prefix={prefix}")
        assert in_reactor(good.bump, "g") == 1
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        from_file = stores(server.url(password=False, password_file=tmp_path / "pw"))
        assert in_reactor(from_file.bump, prefix + "g") == 1
        unix = stores(f"unix://{server.socket_path}?password_file={tmp_path / 'pw'}")
        assert in_reactor(unix.bump, prefix + "g") == 2

        wrong_pw = "Wrong-Secret-pw"
        wrong = stores(f"redis://:{wrong_pw}@127.0.0.1:{server.port}?prefix={prefix}")
        e, _ = fails(wrong.bump, "g")
        assert str(e).startswith(
            f"redis://:***@127.0.0.1:{server.port}: authentication failed: WRONGPASS"
        ), str(e)
        none = stores(server.url(password=False, prefix=prefix))
        e2, _ = fails(none.bump, "g")
        assert "NOAUTH" in str(e2)
        shown = [str(e), str(e2), repr(good), repr(wrong), repr(parse_spec(good.settings.display))]
        shown += [captured_log.text()]
        for text in shown:
            for secret in (PASSWORD, encoded, wrong_pw):
                assert secret not in text
        assert ":***@" in repr(wrong)

        # The password is fixed in Redis: the store gets in without a restart.
        with server.client() as raw:
            raw("CONFIG", "SET", "requirepass", wrong_pw)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert in_reactor(wrong.bump, "g") == 2
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)


# --------------------------------------------------------------------------
# the URL


def test_parse_good_urls(tmp_path: Path) -> None:
    s = parse_spec("redis://localhost")
    assert (s.host, s.port, s.db, s.prefix, s.timeout, s.password) == (
        "localhost",
        6379,
        None,
        "kumoauth:",
        1.0,
        None,
    )
    s = parse_spec("redis://u%40x:p%40ss%3Aw@[::1]:6380/2?prefix=site%3A&timeout=0.25")
    assert (s.username, s.password, s.host, s.port, s.db) == ("u@x", "p@ss:w", "::1", 6380, 2)
    assert (s.prefix, s.timeout) == ("site:", 0.25)
    assert s.display == "redis://u@x:***@[::1]:6380/2"
    s = parse_spec("redis://:raw@pass@h")  # the last "@" ends the password
    assert (s.password, s.host) == ("raw@pass", "h")
    s = parse_spec("unix:///run/redis/redis.sock?db=1&prefix=p:")
    assert (s.path, s.db, s.prefix, s.display) == (
        "/run/redis/redis.sock",
        1,
        "p:",
        "unix:///run/redis/redis.sock?db=1",
    )
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    s = parse_spec(f"REDISS://h.example:6390?ca_file={ca}")
    assert (s.scheme, s.ca_file) == ("rediss", str(ca)) and s.trust_root is not None


@pytest.mark.parametrize(
    "spec",
    [
        "redis",
        "redis:/localhost",
        "http://localhost",
        "redis://",
        "redis://:6379",
        "redis://host:0",
        "redis://host:65536",
        "redis://host:port",
        "redis://host:",
        "redis://host:12:34",
        "redis://::1",
        "redis://[::1",
        "redis://[nope]:1",
        "redis://[::1]x",
        "redis://host/x",
        "redis://host/-1",
        "redis://host?bogus=1",
        "redis://host?prefix=a&prefix=b",
        "redis://host?prefix",
        "redis://host?timeout=0",
        "redis://host?timeout=nan",
        "redis://host?timeout=x",
        "redis://host?ca_file=/x",
        "rediss://host?ca_file=/nonexistent/ca.pem",
        "redis://host?password_file=/nonexistent/pw",
        "redis://user@host",
        "redis://:@host",
        "redis://ho st",
        "redis://host#frag",
        "redis://bad_host!",
        "unix://relative.sock",
        "unix://",
        "unix:///run/",
        "unix:///x.sock?db=a",
        "unix://:pw@/x.sock",
        "unix:///" + "x" * 200,
        "redis://host?prefix=%ff",
    ],
)
def test_parse_bad_urls(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert message and "\n" not in message


SPECIALS = "@:/?#%&= \\[]"


@given(
    scheme=st.sampled_from(["redis", "rediss", "unix", "REDIS"]),
    user=st.sampled_from(["", "admin"]),
    password=st.text(alphabet=st.sampled_from("Kq9xyz" + SPECIALS), min_size=1, max_size=12),
    tail=st.sampled_from(
        ["", ":6379", ":99999", "/0", "/x", "?prefix=a", "?nope=1", "/1?timeout=2"]
    ),
)
def test_parser_never_echoes_a_password(scheme: str, user: str, password: str, tail: str) -> None:
    secret = "Zz7" + password + "Zz7"
    spec = f"{scheme}://{user}:{secret}@host.example{tail}"
    try:
        s = parse_spec(spec)
    except ValueError as e:
        text = str(e)
    else:
        text = repr(s) + s.display
    assert "Zz7" not in text


@given(st.text(max_size=80))
def test_parser_raises_only_value_error(text: str) -> None:
    for spec in (text, "redis://" + text, "unix:///" + text, "rediss://h?" + text):
        try:
            parse_spec(spec)
        except ValueError as e:
            assert "\n" not in str(e)


@given(tail=st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
@example(tail="://")  # "redis:/:Secr3t://@host": a scheme-like part after the secret
def test_make_store_errors_never_echo_a_password(tail):
    from kumoauth.stores import make_store

    password = "Secr3t" + tail

    for spec in (
        f"redis://:{password}@host:99999",
        f"redis:/:{password}@host",
        f"nope://user:{password}@host",
        # a password given as an option (no such option: Redis's own URL
        # form), or an option misspelt, is hidden too
        f"redis://127.0.0.1:6379/0?prefix=p:&password={password}",
        f"rediss://h?pasword={password}&timeout=1",
        # a "?" in the password itself (the review: "redis://:Xy7?k=***")
        f"redis://:{password}?k=9@host:99999/0",
    ):
        try:
            make_store(spec, None)  # type: ignore[arg-type]
        except ValueError as e:
            assert "Secr3t" not in str(e)


# --------------------------------------------------------------------------
# forget (a verified password is not a failure)

#: a window no loaded test box outlives during the trace
LONG_WINDOW = 600.0


async def forgetting(store: Any, reactor: Any) -> list[Any]:
    """Record and forget on *store*: only the fingerprint given goes, from the keys given."""
    trace: list[Any] = []
    ip, user, other = "ip:192.0.2.1", "authc:alice", "ip:192.0.2.2"
    w = LONG_WINDOW

    async def sizes() -> list[int]:
        return [(await store.count(k, w))[0] for k in (ip, user, other)]

    for n in (1, 2, 3):
        await store.record(ip, fp(n), w, 10)
        await store.record(user, fp(n), w, 5)
    await store.record(other, fp(2), w, 10)
    trace.append(await sizes())
    trace.append(await store.forget(ip, user, fp(2)))
    trace.append(await sizes())  # another key keeps its fp(2)
    await store.forget(ip, None, fp(1))
    trace.append(await sizes())
    await store.forget(ip, user, fp(9))  # nowhere: nothing taken
    trace.append(await sizes())
    await store.forget(ip, user, fp(3))
    trace.append(await store.count(ip, w))
    trace.append(await sizes())
    return trace


FORGETTING = [
    [3, 3, 1],
    None,
    [2, 2, 1],
    [1, 2, 1],
    [1, 2, 1],
    (0, 0.0),
    [0, 1, 1],
]


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_forget_same_semantics_as_memory(kind: str, reactor: Any, either_store: Any) -> None:
    assert in_reactor(forgetting, either_store(kind), reactor) == FORGETTING


def test_forget_across_instances_and_after_the_window(
    reactor: Any, redis: RedisServer, stores: Any, prefix: str
) -> None:
    a, b = stores(redis.url(prefix=prefix)), stores(redis.url(prefix=prefix))
    in_reactor(a.record, "ip:192.0.2.3", fp(1), LONG_WINDOW, 10)
    in_reactor(a.record, "authc:bob", fp(1), LONG_WINDOW, 5)
    in_reactor(a.record, "authc:bob", fp(2), LONG_WINDOW, 5)
    in_reactor(b.forget, "ip:192.0.2.3", "authc:bob", fp(1))
    assert in_reactor(a.count, "ip:192.0.2.3", LONG_WINDOW) == (0, 0.0)
    assert in_reactor(a.count, "authc:bob", LONG_WINDOW)[0] == 1
    with redis.client() as raw:
        assert raw("EXISTS", f"{prefix}fail:ip:192.0.2.3") == 0  # empty: gone
    # Expiry, on a short window of its own: forgetting what left is nothing.
    in_reactor(a.record, "ip:192.0.2.4", fp(3), WINDOW, 10)
    in_reactor(sleep, reactor, WINDOW + 0.1)
    in_reactor(b.forget, "ip:192.0.2.4", None, fp(3))
    assert in_reactor(a.count, "ip:192.0.2.4", WINDOW) == (0, 0.0)


def test_the_secret_is_read_when_redis_refuses_writes(
    reactor: Any, stores: Any, prefix: str
) -> None:
    """
    At ``maxmemory`` with ``noeviction`` Redis refuses SET: the secret it
    holds is read (GET first), and a store keeps it once read.
    """
    _require_redis()
    with running_redis() as server:
        secret = in_reactor(stores(server.url(prefix=prefix)).secret, "fingerprint-salt")
        with server.client() as raw:
            raw("CONFIG", "SET", "maxmemory-policy", "noeviction")
            raw("CONFIG", "SET", "maxmemory", "1")
        later = stores(server.url(prefix=prefix, timeout=0.5))
        assert in_reactor(later.secret, "fingerprint-salt") == secret
        # None there yet: it cannot be made, and that is a failure.
        e, _ = fails(later.secret, "other")
        assert "OOM" in str(e)
        server.kill()
        assert in_reactor(later.secret, "fingerprint-salt") == secret  # kept


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("redis://h/0?password_file=pw", "redis://h/0?password_file=/etc/k/pw"),
        ("redis://h/0?password_file=/abs/pw", "redis://h/0?password_file=/abs/pw"),
        (
            "rediss://h?prefix=a%26b&ca_file=ca.pem&timeout=2",
            "rediss://h?prefix=a%26b&ca_file=/etc/k/ca.pem&timeout=2",
        ),
        ("redis://h/0?password_file=my%20pw", "redis://h/0?password_file=/etc/k/my%20pw"),
        ("redis://h/0?password_file=", "redis://h/0?password_file="),
        ("redis://h/0", "redis://h/0"),
        ("memory", "memory"),
        ("pkg.mod:factory?x=password_file", "pkg.mod:factory?x=password_file"),
    ],
)
def test_file_options_are_relative_to_the_configuration(spec, expected):
    from pathlib import Path

    from kumoauth.stores.redis import with_files_under

    assert with_files_under(spec, Path("/etc/k")) == expected
