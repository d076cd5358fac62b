"""
The verified-credential cache (``[auth.cache]``, kumoauth.backends.cache):
hits, misses, expiry, negative entries, meta replay, invalidation by a
store change and by SIGHUP, errors never cached, the key never the
password, the connection a store judges in the key.  The cache in front
of real stores: tests/test_backend_cache_stores.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, task
from twisted.logger import formatEvent
from zope.interface import implementer

from kumoauth.auth.cred import IPlainCredentials, PlainCredentials, make_portal
from kumoauth.backends.base import BackendError, StoreChecker, Verdict
from kumoauth.backends.cache import CredentialCache
from kumoauth.config import CacheConfig, ConfigError, parse
from kumoauth.meta import ConnMeta
from kumoauth.ops.metrics import Metrics


def result_of(d: defer.Deferred) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


class CountingStore:
    """
    A credential store whose answers the test sets, counting questions;
    adds a tenant to the meta on success.
    """

    name = "counting"

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.calls = 0
        self.down = False
        self.listeners: list[Any] = []

    def check(self, authz: str, authc: str, password: str, conn_meta: Any) -> Verdict:
        self.calls += 1
        if self.down:
            raise BackendError("connection refused")
        if self.users.get(authc) == password and authz == authc:
            return Verdict(True, {"tenant": authc.split("@")[-1]})
        return Verdict(False)

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)

    def changed(self) -> None:
        for listener in self.listeners:
            listener()


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


def make(clock: task.Clock, ttl: float = 300, negative_ttl: float = 30, max_entries: int = 100):
    store = CountingStore({"alice@a.example": "right", "bob@b.example": "pw"})
    metrics = Metrics()
    cache = CredentialCache(clock, CacheConfig(ttl, negative_ttl, max_entries), metrics)
    checker = StoreChecker(store, clock, metrics)
    cache.watch([checker])
    return store, cache, cache.wrap(checker), metrics


def attempt(checker: Any, user: str, password: str, authz: str = "") -> tuple[Any, ConnMeta]:
    meta = ConnMeta({"received_from": "192.0.2.1:5000"})
    return result_of(checker.requestAvatarId(PlainCredentials(authz, user, password, meta))), meta


def lookups(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value(
        "kumoauth_auth_cache_lookups_total", {"result": result}
    )


def test_positive_hit_skips_the_store_and_replays_meta(clock):
    store, cache, checker, metrics = make(clock)
    first, meta1 = attempt(checker, "alice@a.example", "right")
    second, meta2 = attempt(checker, "alice@a.example", "right")
    assert first == second == "alice@a.example"
    assert store.calls == 1
    assert meta2.get_meta("tenant") == "a.example" == meta1.get_meta("tenant")
    assert lookups(metrics, "miss") == 1 and lookups(metrics, "hit") == 1


def test_entries_expire(clock):
    store, cache, checker, _ = make(clock, ttl=300, negative_ttl=30)
    attempt(checker, "alice@a.example", "right")
    attempt(checker, "alice@a.example", "wrong")
    clock.advance(29)
    attempt(checker, "alice@a.example", "wrong")
    assert store.calls == 2  # both answered from the cache
    clock.advance(2)  # the negative entry expired, the positive one did not
    failed, _ = attempt(checker, "alice@a.example", "wrong")
    assert failed.check(error.UnauthorizedLogin) and store.calls == 3
    attempt(checker, "alice@a.example", "right")
    assert store.calls == 3
    clock.advance(300)
    attempt(checker, "alice@a.example", "right")
    assert store.calls == 4


def test_negative_hit_is_still_a_refusal(clock):
    store, cache, checker, metrics = make(clock)
    for _ in range(3):
        failed, _ = attempt(checker, "alice@a.example", "wrong")
        assert failed.check(error.UnauthorizedLogin)
    assert store.calls == 1 and lookups(metrics, "negative_hit") == 2


def test_every_part_of_the_attempt_is_in_the_key(clock):
    store, cache, checker, _ = make(clock)
    attempt(checker, "alice@a.example", "right")
    # a different password, user or authz is not the cached success
    assert attempt(checker, "alice@a.example", "righ")[0].check(error.UnauthorizedLogin)
    assert attempt(checker, "alice@a.example", "right", authz="bob@b.example")[0].check(
        error.UnauthorizedLogin
    )
    # length prefixes: "ab"+"c" and "a"+"bc" are different attempts
    k1 = cache.key("ab", "c", b"x")
    k2 = cache.key("a", "bc", b"x")
    k3 = cache.key("a", "b", b"cx")
    assert len({k1, k2, k3}) == 3
    assert store.calls == 3


def test_the_connection_a_store_judges_is_in_the_key(clock):
    from kumoauth.backends.base import connection_context
    from kumoauth.testing import conn_meta

    cache = CredentialCache(clock, CacheConfig())

    def key(**meta: Any) -> bytes:
        return cache.key("u", "u", b"pw", connection_context(conn_meta(**meta)))

    usual = key()
    assert key(received_from="127.0.0.1:61000") == usual  # not the client's port
    others = [
        key(received_from="127.0.0.2:50000"),  # another client address
        key(received_from="[::1]:50000"),
        key(received_from="local"),  # a Unix socket: no address
        key(received_from_proxy="10.0.0.5:6000"),  # the TCP peer: a proxy
        key(received_via="127.0.0.1:465"),  # another listener
        key(tls_protocol_version=None),  # no TLS
    ]
    assert len({usual, *others}) == 1 + len(others)
    # no value of one part reads as another's: None, "", a flag, a string
    parts = [cache.key("u", "u", b"pw", (v,)) for v in (None, "", False, True, "n", "y", "-")]
    assert len(set(parts)) == len(parts)
    assert cache.key("u", "u", b"pw", ("a", "b")) != cache.key("u", "u", b"pw", ("ab", ""))


class NetStore(CountingStore):
    """A store that also refuses whoever comes from outside 192.0.2.0/24."""

    def check(self, authz: str, authc: str, password: str, conn_meta: Any) -> Verdict:
        verdict = super().check(authz, authc, password, conn_meta)
        if not str(conn_meta.get_meta("received_from")).startswith("192.0.2."):
            return Verdict(False)
        return verdict


def test_a_verdict_on_the_address_is_not_replayed_for_another(clock):
    store = NetStore({"alice@a.example": "right"})
    cache = CredentialCache(clock, CacheConfig())
    checker = cache.wrap(StoreChecker(store, clock))

    def from_ip(ip: str) -> Any:
        meta = ConnMeta({"received_from": f"{ip}:5000"})
        return result_of(
            checker.requestAvatarId(PlainCredentials("", "alice@a.example", "right", meta))
        )

    assert from_ip("198.51.100.1").check(error.UnauthorizedLogin)
    assert from_ip("192.0.2.1") == "alice@a.example"
    assert from_ip("198.51.100.1").check(error.UnauthorizedLogin)
    assert from_ip("192.0.2.1") == "alice@a.example"
    assert store.calls == 2  # one question per address


def test_key_is_not_derived_from_the_password_alone():
    clock = task.Clock()
    one = CredentialCache(clock, CacheConfig())
    two = CredentialCache(clock, CacheConfig())
    # another process (another secret) cannot compute this process's keys
    assert one.key("u", "u", b"pw") != two.key("u", "u", b"pw")
    assert b"pw" not in one.key("u", "u", b"pw")


def test_errors_are_not_cached_and_positive_entries_outlive_an_outage(clock):
    store, cache, checker, _ = make(clock)
    attempt(checker, "alice@a.example", "right")
    store.down = True
    ok, meta = attempt(checker, "alice@a.example", "right")
    assert ok == "alice@a.example" and meta.get_meta("tenant") == "a.example"
    failed, _ = attempt(checker, "bob@b.example", "pw")
    assert not failed.check(error.UnauthorizedLogin)  # 454, not 535
    store.down = False
    assert attempt(checker, "bob@b.example", "pw")[0] == "bob@b.example"
    assert store.calls == 3


def test_a_store_change_clears_the_cache(clock):
    store, cache, checker, _ = make(clock)
    attempt(checker, "alice@a.example", "right")
    attempt(checker, "alice@a.example", "new")
    assert len(cache) == 2
    store.users["alice@a.example"] = "new"
    store.changed()
    assert len(cache) == 0
    assert attempt(checker, "alice@a.example", "new")[0] == "alice@a.example"
    assert attempt(checker, "alice@a.example", "right")[0].check(error.UnauthorizedLogin)


def test_a_store_is_subscribed_once(clock):
    store, cache, checker, _ = make(clock)
    cache.watch([checker])
    cache.watch([checker])
    assert len(store.listeners) == 1


def test_ttl_zero_caches_nothing(clock):
    store, cache, checker, _ = make(clock, ttl=0, negative_ttl=0)
    for _ in range(2):
        attempt(checker, "alice@a.example", "right")
        attempt(checker, "alice@a.example", "wrong")
    assert store.calls == 4 and len(cache) == 0


def test_size_is_bounded_least_recently_used_first(clock):
    store, cache, checker, _ = make(clock, max_entries=3)
    for i in range(5):
        attempt(checker, "alice@a.example", f"wrong{i}")
    assert len(cache) == 3
    calls = store.calls
    attempt(checker, "alice@a.example", "wrong0")  # evicted: asks again
    attempt(checker, "alice@a.example", "wrong4")  # kept
    assert store.calls == calls + 1


@implementer(ICredentialsChecker)
class PolicyLike:
    """
    A checker that adds meta of its own (as a policy's tenant lookup does)
    and changes a key that was already there.
    """

    credentialInterfaces = (IPlainCredentials,)

    def __init__(self) -> None:
        self.calls = 0

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        self.calls += 1
        credentials.conn_meta.set_meta("plan", "gold")
        credentials.conn_meta.set_meta("received_from", "rewritten")
        return defer.succeed(credentials.authc)


def test_meta_replay_carries_only_what_the_checker_changed(clock):
    inner = PolicyLike()
    cache = CredentialCache(clock, CacheConfig())
    portal_checker = cache.wrap(inner)
    attempt(portal_checker, "carol", "pw")
    ok, meta = attempt(portal_checker, "carol", "pw")
    assert ok == "carol" and inner.calls == 1
    assert meta.get_meta("plan") == "gold" and meta.get_meta("received_from") == "rewritten"


def test_portal_wraps_a_chain_once(clock):
    cache = CredentialCache(clock, CacheConfig())
    a, b = PolicyLike(), PolicyLike()
    portal = make_portal([a, b], wrap=cache.wrap)
    (checker,) = portal.checkers.values()
    assert type(checker).__name__ == "CachingChecker"


# --- configuration and assembly ------------------------------------------------------

BASE = (
    '[server]\nhostname = "h"\n[[listener]]\nendpoint = "tcp:1"\ntls = "none"\n'
    'auth_required = false\n[spool]\npath = "/tmp/kumoauth-cache-test"\n'
)


def test_cache_table_parses_with_defaults_and_checks_values():
    assert parse(BASE).auth.cache is None
    cfg = parse(BASE + "[auth.cache]\n")
    assert cfg.auth.cache == CacheConfig(300.0, 30.0, 100_000)
    assert parse(BASE + "[auth.cache]\nttl = 0\nnegative_ttl = 0\n").auth.cache.enabled is False
    with pytest.raises(ConfigError, match=r"\[auth.cache\] ttl"):
        parse(BASE + "[auth.cache]\nttl = -1\n")
    with pytest.raises(ConfigError, match=r"\[auth.cache\] size: unknown key"):
        parse(BASE + "[auth.cache]\nsize = 1\n")


def test_assembly_wraps_the_checker_and_a_reload_clears_the_cache(tmp_path):
    from kumoauth.ops.assembly import build_runtime
    from kumoauth.policy import Invoker
    from kumoauth.smtp.runtime import ProcessState

    policy = tmp_path / "policy.py"
    policy.write_text(
        "from kumoauth import kumo\n"
        "@kumo.on('smtp_server_auth_plain')\n"
        "def check(authz, authc, password, conn_meta):\n"
        "    return password == 'tiger'\n"
    )
    text = BASE + f'[policy]\npath = "{policy}"\n[auth.cache]\nttl = 60\n'
    cfg = parse(text, tmp_path / "kumoauth.toml")
    process = ProcessState(clock=task.Clock(), store=lambda m: defer.succeed(m.id))
    first = build_runtime(cfg, process, None, Invoker())
    (checker,) = first.portal.checkers.values()
    assert type(checker).__name__ == "CachingChecker"
    attempt(checker, "scott", "tiger")
    assert len(process.credential_cache) == 1
    second = build_runtime(cfg, process, None, Invoker(), previous=first)
    assert process.credential_cache is not None and len(process.credential_cache) == 0
    (checker2,) = second.portal.checkers.values()
    assert checker2.cache is process.credential_cache
    # without the table: no wrapper
    plain = build_runtime(parse(BASE + f'[policy]\npath = "{policy}"\n'), process, None, Invoker())
    (checker3,) = plain.portal.checkers.values()
    assert type(checker3).__name__ == "PolicyChecker"


def test_invalidation_reaches_every_process_sharing_the_store(clock):
    """
    Two caches (two processes) following one shared store's generation: a
    clear in one empties the other within a poll interval.
    """
    from kumoauth.stores.memory import MemoryStore

    class Shared(MemoryStore):
        shared = True

    shared = Shared(clock)
    store_a, cache_a, checker_a, _ = make(clock)
    store_b, cache_b, checker_b, _ = make(clock)
    cache_a.share(shared)
    cache_b.share(shared)
    attempt(checker_a, "alice@a.example", "right")
    attempt(checker_b, "alice@a.example", "right")
    assert len(cache_a) == len(cache_b) == 1
    store_a.changed()  # a passwd-file re-read in process A
    assert len(cache_a) == 0 and len(cache_b) == 1
    clock.advance(1.0)
    assert len(cache_b) == 0
    attempt(checker_b, "alice@a.example", "right")
    clock.advance(1.0)
    assert len(cache_b) == 1  # no change since: kept
    cache_a.stop()
    cache_b.stop()


def test_a_shared_store_outage_is_one_line_each_way(clock, captured_log):
    """
    The cache polls the shared store without traffic: its outage is logged
    once when it starts and once when it ends, not once per poll.
    """
    from kumoauth.stores import StoreUnavailable
    from kumoauth.stores.memory import MemoryStore

    class Shared(MemoryStore):
        shared = True
        down = False

        def generation(self, name):
            if self.down:
                return defer.fail(StoreUnavailable("redis://127.0.0.1:1/0: connection refused"))
            return super().generation(name)

    shared = Shared(clock)
    _, cache, _, _ = make(clock)
    cache.share(shared)
    shared.down = True
    for _ in range(5):
        clock.advance(1.0)
    shared.down = False
    clock.advance(1.0)
    clock.advance(1.0)
    cache.stop()
    lines = [formatEvent(e) for e in captured_log.events if "cache invalidation" in formatEvent(e)]
    assert len(lines) == 2, lines
    assert "unavailable: redis://127.0.0.1:1/0: connection refused" in lines[0]
    assert "available again (5 operations met it down)" in lines[1]


@implementer(ICredentialsChecker)
class Pending:
    """A checker whose answers the test gives, one per call, when it likes."""

    credentialInterfaces = (IPlainCredentials,)

    def __init__(self) -> None:
        self.calls: list[defer.Deferred[Any]] = []

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append(d)
        return d


@pytest.mark.parametrize("answer", ["verified", "refused"])
def test_an_answer_begun_before_a_clear_is_not_stored(answer):
    # A check against a passwd-file's old line that ends after the re-read
    # cleared the cache must not put that old verdict back for ttl.
    cache = CredentialCache(task.Clock(), CacheConfig())
    inner = Pending()
    checker = cache.wrap(inner)

    def attempt() -> defer.Deferred[Any]:
        meta = ConnMeta({"received_from": "192.0.2.1:5000"})
        return checker.requestAvatarId(PlainCredentials("", "bob", "old", meta))

    attempt().addErrback(lambda f: f.trap(error.UnauthorizedLogin))
    cache.clear()
    if answer == "verified":
        inner.calls.pop().callback("bob")
    else:
        inner.calls.pop().errback(error.UnauthorizedLogin())
    assert len(cache) == 0
    attempt().addErrback(lambda f: f.trap(error.UnauthorizedLogin))
    assert len(inner.calls) == 1  # asked again, not answered from memory
