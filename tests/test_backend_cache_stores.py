"""
The verified-credential cache (``[auth.cache]``) in front of real stores,
where a store's verdict depends on the connection or its content changes
under the cache:

- a passwd-file's ``allow_nets`` through SMTP sessions (StringTransport, a
  fake clock, the real file), and end to end through ``twistd kumoauth``
  from two loopback addresses;
- a real Dovecot's ``allow_nets`` (``rip``) and a passdb that only
  answers for ``secured`` requests;
- an HTTP auth API (a real ``twisted.web`` server) deciding on the
  listener;
- a passwd-file changed on disk: the old password is refused from the
  first attempt after ``check_interval``, also on a quiet server where no
  attempt misses the cache, also behind a checker chain.
"""

from __future__ import annotations

import json
import os
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.cred import error as cred_error
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from kumoauth.auth.cred import CheckerChain, PlainCredentials
from kumoauth.backends.base import StoreChecker
from kumoauth.backends.cache import CredentialCache
from kumoauth.backends.dovecot import Dovecot
from kumoauth.backends.http import HTTP
from kumoauth.backends.passwdfile import PasswdFile
from kumoauth.config import CacheConfig
from kumoauth.ops.metrics import Metrics
from kumoauth.testing import conn_meta, plain_b64
from tests import dovecot_auth as lab
from tests import postfix as pf
from tests.server import passwd_file_server
from tests.upstream import in_reactor, start_reactor

PASSWORD = "c0rrect-Horse"
NEW_PASSWORD = "n3w-Battery-Staple"


class InlinePool:
    """A checker pool that runs the call at once (the sessions' fake clock)."""

    def call(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(fn, *args)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def lookups(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "kumoauth_auth_cache_lookups_total", {"result": result}
    )
    return value or 0.0


class Cached:
    """
    A passwd-file behind the cache, as ``[auth.passwd-file]`` with
    ``[auth.cache]`` assembles it, on a fake clock; SMTP sessions from any
    address share it.
    """

    def __init__(self, make_session: Any, path: Path, check_interval: float = 1.0) -> None:
        self.make_session = make_session
        self.clock = Clock()
        self.store = PasswdFile(
            path, check_interval=check_interval, reactor=self.clock, pool=InlinePool()
        )
        self.store.start()
        self.metrics = Metrics()
        self.cache = CredentialCache(self.clock, CacheConfig(300.0, 30.0, 1000), self.metrics)
        checker = StoreChecker(self.store, self.clock)
        self.cache.watch([checker])
        self.checker = self.cache.wrap(checker)

    def login(self, user: str, password: str, ip: str = "192.0.2.7", port: int = 40000) -> str:
        """The reply code to AUTH PLAIN in a new session from *ip*."""
        s = self.make_session(checkers=[self.checker], client=(ip, port), clock=self.clock)
        s.command("EHLO client.example")
        reply = s.command("AUTH PLAIN " + plain_b64("", user, password))
        s.close()
        return reply[:3]


# --------------------------------------------------------------------------
# a verdict that depends on the connection (finding 1)


def test_passwd_file_allow_nets_holds_with_the_cache_on(tmp_path, make_session):
    path = tmp_path / "users"
    path.write_text(f"alice:{{PLAIN}}{PASSWORD}::::::allow_nets=192.0.2.0/24\n")
    c = Cached(make_session, path)
    # A refusal because of the address does not lock out the allowed network...
    assert c.login("alice", PASSWORD, ip="198.51.100.1") == "535"
    assert c.login("alice", PASSWORD, ip="192.0.2.7") == "235"
    # ...and the success from there is not replayed for another address.
    assert c.login("alice", PASSWORD, ip="198.51.100.1") == "535"
    # The cache still serves the allowed client, whatever its port.
    assert c.login("alice", PASSWORD, ip="192.0.2.7", port=40001) == "235"
    assert lookups(c.metrics, "hit") == 1
    assert lookups(c.metrics, "negative_hit") == 1  # 198.51.100.1's second try
    assert lookups(c.metrics, "miss") == 2


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


def attempt(checker: Any, user: str, password: str, meta: Any) -> Any:
    """The avatar id, or the exception class of a refusal or an error."""
    try:
        return in_reactor(checker.requestAvatarId, PlainCredentials("", user, password, meta))
    except Exception as e:
        return type(e)


DOVECOT_USERS = lab.Users(
    plain={"alice": "alice-Secret-1"},
    net_limited={"dave": "dave-Secret-4"},
    secured_only={"erin": "erin-Secret-5"},
)


@pytest.fixture(scope="module")
def dovecot() -> Iterator[lab.Dovecot]:
    lab.require_dovecot()
    with (
        pf.service_directory("kumoauth-cache-dovecot-") as base,
        lab.running(base / "d", DOVECOT_USERS) as d,
    ):
        yield d


def test_dovecot_allow_nets_and_secured_hold_with_the_cache_on(dovecot, reactor):
    store = in_reactor(lambda: Dovecot(dovecot.client_socket, reactor=reactor))
    try:
        metrics = Metrics()
        cache = CredentialCache(reactor, CacheConfig(), metrics)
        checker = cache.wrap(StoreChecker(store, reactor))
        dave = DOVECOT_USERS.net_limited["dave"]  # allow_nets=192.0.2.0/24, checked on rip
        outside = conn_meta(received_from="198.51.100.7:4000")
        inside = conn_meta(received_from="192.0.2.7:4000")
        assert attempt(checker, "dave", dave, outside) is cred_error.UnauthorizedLogin
        assert attempt(checker, "dave", dave, inside) == "dave"
        assert attempt(checker, "dave", dave, outside) is cred_error.UnauthorizedLogin
        assert attempt(checker, "dave", dave, conn_meta(received_from="192.0.2.7:4001")) == "dave"
        assert lookups(metrics, "hit") == 1 and lookups(metrics, "negative_hit") == 1
        # erin exists only for requests Dovecot is told are "secured" (TLS)
        erin = DOVECOT_USERS.secured_only["erin"]
        assert attempt(checker, "erin", erin, conn_meta()) == "erin"
        clear = conn_meta(tls_protocol_version=None, tls_cipher=None)
        assert attempt(checker, "erin", erin, clear) is cred_error.UnauthorizedLogin
        assert attempt(checker, "erin", erin, conn_meta()) == "erin"
        assert lookups(metrics, "hit") == 2
    finally:
        in_reactor(store.stop)


class ListenerAPI(Resource):
    """An auth API that accepts alice on the port-465 listener only."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def render_POST(self, request: Request) -> bytes:
        self.requests += 1
        body = json.loads(request.content.read())
        ok = (
            body["authc"] == "alice@example.org"
            and body["password"] == PASSWORD
            and body["listener"] == "127.0.0.1:465"
        )
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"ok": ok}).encode()


def test_an_http_api_deciding_on_the_listener_holds_with_the_cache_on(reactor):
    api = ListenerAPI()
    site = Site(api)
    site.noisy = False
    port = in_reactor(lambda: reactor.listenTCP(0, site, interface="127.0.0.1"))
    url = f"http://127.0.0.1:{port.getHost().port}/smtp-auth"
    store = in_reactor(lambda: HTTP(url, reactor=reactor))
    try:
        checker = CredentialCache(reactor, CacheConfig()).wrap(StoreChecker(store, reactor))
        submissions = conn_meta(received_via="127.0.0.1:465")
        submission = conn_meta(received_via="127.0.0.1:587")
        user = "alice@example.org"
        assert attempt(checker, user, PASSWORD, submissions) == user
        assert attempt(checker, user, PASSWORD, submission) is cred_error.UnauthorizedLogin
        assert attempt(checker, user, PASSWORD, submissions) == user
        assert api.requests == 2
    finally:
        in_reactor(store.stop)
        in_reactor(port.stopListening)


# --------------------------------------------------------------------------
# a passwd-file changed under the cache (finding 3)


def test_a_changed_password_is_refused_at_the_first_attempt_after_the_interval(
    tmp_path, make_session
):
    path = tmp_path / "users"
    path.write_text(f"alice:{{PLAIN}}{PASSWORD}\nbob:{{PLAIN}}bob-Secret\n")
    c = Cached(make_session, path, check_interval=1.0)
    assert c.login("alice", PASSWORD) == "235"
    assert c.login("alice", NEW_PASSWORD) == "535"  # too early: a negative entry
    assert c.login("alice", PASSWORD) == "235"  # a hit
    write_atomically(path, f"alice:{{PLAIN}}{NEW_PASSWORD}\nbob:{{PLAIN}}bob-Secret\n")
    # Within the interval the file is not looked at (as without the cache).
    c.clock.advance(0.5)
    assert c.login("alice", PASSWORD) == "235"
    # The first attempt after it: the stat, the re-read, the cache cleared.
    # No other attempt has to miss the cache first (a quiet server).
    c.clock.advance(0.5)
    assert c.login("alice", PASSWORD) == "535"
    assert c.login("alice", NEW_PASSWORD) == "235"
    assert c.login("alice", NEW_PASSWORD) == "235"
    assert lookups(c.metrics, "hit") == 3
    # A user removed from the file, or barred, likewise.
    assert c.login("bob", "bob-Secret") == "235"
    write_atomically(path, f"alice:{{PLAIN}}{NEW_PASSWORD}\nbob:{{PLAIN}}bob-Secret::::::nologin\n")
    c.clock.advance(1.0)
    assert c.login("bob", "bob-Secret") == "535"


def test_a_passwd_file_in_a_checker_chain_is_looked_at_before_a_hit(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text(f"alice:{{PLAIN}}{PASSWORD}\n")
    second.write_text("carol:{PLAIN}carol-Secret\n")
    clock = Clock()
    stores = [
        PasswdFile(p, check_interval=1.0, reactor=clock, pool=InlinePool()) for p in (first, second)
    ]
    checkers = [StoreChecker(store, clock) for store in stores]
    for store in stores:
        store.start()
    cache = CredentialCache(clock, CacheConfig())
    cache.watch(checkers)
    checker = cache.wrap(CheckerChain(checkers))

    def login(user: str, password: str) -> Any:
        box: list[Any] = []
        meta = conn_meta()
        checker.requestAvatarId(PlainCredentials("", user, password, meta)).addBoth(box.append)
        (result,) = box
        return result if isinstance(result, str) else type(result.value)

    assert login("alice", PASSWORD) == "alice"
    assert login("carol", "carol-Secret") == "carol"
    write_atomically(second, "carol:{PLAIN}carol-New\n")
    clock.advance(1.0)
    assert login("carol", "carol-Secret") is cred_error.UnauthorizedLogin
    assert login("carol", "carol-New") == "carol"
    assert login("alice", PASSWORD) == "alice"


# --------------------------------------------------------------------------
# end to end


@pytest.mark.e2e
def test_end_to_end_with_the_cache_on(tmp_path):
    """
    twistd kumoauth with a passwd-file and ``[auth.cache]``: clients on two
    loopback addresses (alice may log in from 127.0.0.2 only), then the
    file changed while only cache hits come in.
    """
    with passwd_file_server(
        tmp_path,
        f"alice:{{PLAIN}}{PASSWORD}::::::allow_nets=127.0.0.2/32\nbob:{{PLAIN}}{PASSWORD}\n",
        check_interval=0.2,
        extra="[auth.cache]\nttl = 300\nnegative_ttl = 30\n",
    ) as srv:
        users, certs = srv.directory / "users", srv.certs

        def login(user: str, password: str, source: str = "127.0.0.1") -> int:
            with smtplib.SMTP(
                "127.0.0.1", srv.starttls_port, timeout=10, source_address=(source, 0)
            ) as s:
                s.ehlo("client.example")
                s.starttls(context=certs.client_context())
                s.ehlo("client.example")
                return s.docmd("AUTH", "PLAIN " + plain_b64("", user, password))[0]

        assert login("alice", PASSWORD, source="127.0.0.3") == 535
        assert login("alice", PASSWORD, source="127.0.0.2") == 235
        assert login("alice", PASSWORD, source="127.0.0.3") == 535
        assert login("alice", PASSWORD, source="127.0.0.2") == 235
        assert login("bob", PASSWORD) == 235
        assert login("bob", PASSWORD) == 235  # a hit
        write_atomically(users, f"bob:{{PLAIN}}{NEW_PASSWORD}\n")
        time.sleep(0.4)
        assert login("bob", PASSWORD) == 535
        assert login("bob", NEW_PASSWORD) == 235
        srv.stop()
        log = srv.log()
    assert "re-read" in log
    for secret in (PASSWORD, NEW_PASSWORD):
        assert secret not in log
