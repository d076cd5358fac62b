"""
The Dovecot credential store (kumoauth.backends.dovecot).

Against a real Dovecot (tests/dovecot_auth.py: ``dovecot -F`` from its own
configuration in a temporary directory, over its Unix and TCP auth-client
listeners) on the real reactor in a thread: every answer, master users,
``rip`` and ``secured`` as Dovecot sees them, fifty requests on one
connection, an outage and the recovery from it, a frozen auth process
(timeouts), a Dovecot reload.

Through a MemoryReactorClock and a StringTransport, the answers a real
Dovecot will not give on demand: another protocol version, no PLAIN, a
CONT, a temporary failure, a proxy referral, nonsense; and the backoff.
The wire format's pure parts with hypothesis.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from kumoauth.auth import checkers
from kumoauth.auth.cred import BackendUnavailable, PlainCredentials
from kumoauth.backends import dovecot as dv
from kumoauth.backends.base import DENIED, BackendError, StoreChecker, Verdict
from kumoauth.backends.dovecot import (
    SCHEMA,
    Config,
    Dovecot,
    from_argstring,
    parse_socket,
    plain_response,
    request_params,
    tab_escape,
    tab_unescape,
    validate,
)
from kumoauth.testing import conn_meta, plain_b64
from tests import dovecot_auth as lab
from tests import postfix as pf
from tests.upstream import in_reactor, start_reactor

USERS = lab.Users(
    plain={"alice": "alice-Secret-1", "bob": "bob-Secret-2"},
    masters={"kumoauth": "master-Secret-3"},
    net_limited={"dave": "dave-Secret-4"},
    secured_only={"erin": "erin-Secret-5"},
    nologin={"nora": "nora-Secret-6"},
)
PASSWORDS = [
    *USERS.plain.values(),
    *USERS.masters.values(),
    *USERS.net_limited.values(),
    *USERS.secured_only.values(),
    *USERS.nologin.values(),
    "wrong-Secret-7",
]
WRONG = "wrong-Secret-7"


# --------------------------------------------------------------------------
# a real Dovecot


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


@pytest.fixture(scope="module")
def dovecot() -> Iterator[lab.Dovecot]:
    lab.require_dovecot()
    with pf.service_directory("kumoauth-dovecot-") as base, lab.running(base / "d", USERS) as d:
        yield d


@pytest.fixture
def own_dovecot() -> Iterator[lab.Dovecot]:
    """An instance of the test's own, to stop, start, reload."""
    lab.require_dovecot()
    with pf.service_directory("kumoauth-dovecot-") as base, lab.running(base / "d", USERS) as d:
        yield d


@pytest.fixture
def stores(reactor: Any) -> Iterator[Callable[..., Dovecot]]:
    made: list[Dovecot] = []

    def make(socket: str | Path, **kw: Any) -> Dovecot:
        store = in_reactor(lambda: Dovecot(socket, reactor=reactor, **kw))
        made.append(store)
        return store

    yield make
    for store in made:
        in_reactor(store.stop)


def tcp(d: lab.Dovecot) -> str:
    return f"127.0.0.1:{d.port}"


def check(store: Dovecot, authz: str, authc: str, password: str, meta: Any = None) -> Verdict:
    result: Verdict = in_reactor(store.check, authz, authc, password, meta)
    return result


def backend_error(store: Dovecot, *args: Any) -> BackendError:
    with pytest.raises(BackendError) as e:
        check(store, *args)
    return e.value


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_a_match_is_ok_over_unix_and_tcp(dovecot, stores, where):
    store = stores(dovecot.client_socket if where == "unix" else tcp(dovecot))
    verdict = check(store, "", "alice", USERS.plain["alice"], conn_meta())
    assert verdict == Verdict(True, {})
    assert store.client.handshakes == 1


def test_wrong_password_and_unknown_user_are_denied(dovecot, stores):
    store = stores(dovecot.client_socket)
    results = in_reactor(
        lambda: defer.gatherResults(
            [
                store.check("", "alice", WRONG, conn_meta()),
                store.check("", "nosuchuser", WRONG, conn_meta()),
                store.check("", "alice", USERS.plain["bob"], conn_meta()),
            ]
        )
    )
    assert results == [DENIED, DENIED, DENIED]
    # Dovecot's log process writes what its auth process tells it after
    # the answer has gone out: wait for the lines.
    wanted = (
        "passwd-file(alice,127.0.0.1): Password mismatch",
        "passwd-file(nosuchuser,127.0.0.1): unknown user",
    )
    assert pf.wait_for(lambda: all(w in dovecot.log() for w in wanted), 5), dovecot.log()


def test_empty_password_or_user_is_denied_without_asking(dovecot, stores):
    store = stores(dovecot.client_socket)
    assert check(store, "", "emptypw", "", conn_meta()) == DENIED
    assert check(store, "", "", "x", conn_meta()) == DENIED
    # Nothing was sent: no connection was even made, Dovecot logged nothing.
    assert store.client.handshakes == 0 and store.client.attempt is None
    assert "emptypw" not in dovecot.log()
    # Neither does a store whose Dovecot does not exist: no 454 for an empty password.
    nowhere = stores("/nonexistent/auth-client")
    assert check(nowhere, "", "alice", "") == DENIED


def test_dovecot_canonical_user_name_is_the_account(dovecot, stores):
    # auth_username_format = %Lu: Dovecot says user=alice for ALICE.
    store = stores(dovecot.client_socket)
    assert check(store, "", "ALICE", USERS.plain["alice"]) == Verdict(
        True, {"dovecot_user": "alice"}, user="alice"
    )


def test_proxy_authorization_is_dovecots_decision(dovecot, stores):
    store = stores(dovecot.client_socket)
    master = USERS.masters["kumoauth"]
    # the account is the master's, acting as alice (Dovecot's auth_user= and user=)
    assert check(store, "alice", "kumoauth", master) == Verdict(
        True, {}, user="kumoauth", authz="alice"
    )
    assert pf.wait_for(lambda: "Master user logging in as alice" in dovecot.log(), 5)
    # authz_fail (no such target user), the master's wrong password, and a
    # plain user who is no master user: all denied.
    assert check(store, "nosuchuser", "kumoauth", master) == DENIED
    assert check(store, "alice", "kumoauth", WRONG) == DENIED
    assert check(store, "alice", "bob", USERS.plain["bob"]) == DENIED
    # authz = authc is no proxy authorization at all.
    assert check(store, "bob", "bob", USERS.plain["bob"]) == Verdict(True, {})


def test_client_ip_reaches_dovecot_as_rip(dovecot, stores):
    # dave's passdb entry has allow_nets=192.0.2.0/24.
    store = stores(dovecot.client_socket)
    password = USERS.net_limited["dave"]
    assert check(store, "", "dave", password, conn_meta(received_from="192.0.2.7:4000")) == (
        Verdict(True, {})
    )
    assert check(store, "", "dave", password, conn_meta()) == DENIED  # 127.0.0.1
    assert check(store, "", "dave", password, None) == DENIED  # no rip at all


def test_tls_reaches_dovecot_as_secured(dovecot, stores):
    # erin exists only in the passdb file Dovecot picks for "secured" requests.
    store = stores(dovecot.client_socket)
    password = USERS.secured_only["erin"]
    assert check(store, "", "erin", password, conn_meta()) == Verdict(True, {})
    assert check(store, "", "erin", password, conn_meta(tls_protocol_version=None)) == DENIED


def test_nologin_is_denied(dovecot, stores):
    store = stores(dovecot.client_socket)
    assert check(store, "", "nora", USERS.nologin["nora"], conn_meta()) == DENIED


def test_injection_through_names_and_meta_changes_nothing(dovecot, stores):
    store = stores(dovecot.client_socket)
    alice = USERS.plain["alice"]
    forged = base64.b64encode(f"\0alice\0{alice}".encode()).decode()
    for authc in (
        f"x\tresp={forged}",
        f"x\nAUTH\t99\tPLAIN\tservice=smtp\tresp={forged}",
        "alice\x01t",
        "alice\x00alice",
    ):
        assert check(store, "", authc, alice, conn_meta()) == DENIED
    assert check(store, "alice\0bob", "kumoauth", USERS.masters["kumoauth"]) == DENIED
    # Values from conn_meta that are not addresses are not sent: if
    # "secured" got through, erin would be accepted without TLS.
    erin = USERS.secured_only["erin"]
    for bad in ("192.0.2.1\tsecured:25", "192.0.2.1\nsecured:25", "[::1\tsecured]:25"):
        meta = conn_meta(tls_protocol_version=None, received_from=bad, received_via=bad)
        assert check(store, "", "erin", erin, meta) == DENIED
    # One connection throughout: nothing broke the framing.
    assert store.client.handshakes == 1
    assert check(store, "", "alice", alice, conn_meta()) == Verdict(True, {})


def test_fifty_requests_share_one_connection(dovecot, stores):
    store = stores(tcp(dovecot))
    users = [("alice", USERS.plain["alice"]), ("bob", USERS.plain["bob"]), ("bob", WRONG)]
    asked = [users[i % 3] for i in range(50)]

    def ask_all() -> defer.Deferred[list[Verdict]]:
        return defer.gatherResults([store.check("", u, p, conn_meta()) for u, p in asked])

    seen: dict[str, int] = {}

    def ask_and_count() -> defer.Deferred[list[Verdict]]:
        d = ask_all()
        connection = store.client.connection or store.client.handshaking
        seen["max_pending"] = len(connection.pending) if connection is not None else 0
        return d

    # the first request opens the connection; then all fifty go out at once
    assert check(store, "", "alice", USERS.plain["alice"]) == Verdict(True, {})
    results = in_reactor(ask_and_count)
    assert seen["max_pending"] == 50
    assert results == [Verdict(p != WRONG, {}) for _, p in asked]
    assert store.client.handshakes == 1
    assert dovecot.established() == 1  # the server's view: one connection
    in_reactor(store.stop)
    assert pf.wait_for(lambda: dovecot.established() == 0, 5)


def test_outage_answers_454_quickly_and_recovers_by_itself(
    own_dovecot, stores, reactor, captured_log
):
    store = stores(own_dovecot.client_socket)
    checker = in_reactor(lambda: StoreChecker(store, reactor))
    alice = USERS.plain["alice"]

    def login(password: str = alice) -> Any:
        return in_reactor(
            checker.requestAvatarId, PlainCredentials("", "alice", password, conn_meta())
        )

    assert login() == "alice"
    own_dovecot.stop()
    started = time.monotonic()
    for password in (alice, WRONG, alice):
        with pytest.raises(BackendUnavailable):
            login(password)
    assert time.monotonic() - started < 1.0  # 454 at once, not after a timeout
    own_dovecot.start()
    # No restart on kumoauth's side: the backoff (at most 2 s) reconnects.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert login() == "alice"
            break
        except BackendUnavailable:
            assert time.monotonic() < deadline, "no recovery within 5 s"
            time.sleep(0.1)
    assert store.client.handshakes == 2
    text = captured_log.text()
    # The first connection, then one line each way (there were two each:
    # the connection's and the checker's).
    lines = [formatEvent(e) for e in captured_log.events]
    assert len(lines) == 3, lines
    assert "connected (server pid" in lines[0]
    assert "auth backend dovecot unavailable: dovecot auth at" in lines[1]
    assert "connection lost" in lines[1]
    assert "auth backend dovecot available again" in lines[2]
    for password in PASSWORDS:
        assert password not in text


def test_start_does_not_fail_while_dovecot_is_down(own_dovecot, stores):
    own_dovecot.stop()
    store = stores(own_dovecot.client_socket)
    assert in_reactor(store.start) is None
    problem = str(backend_error(store, "", "alice", USERS.plain["alice"]))
    assert "connection refused" in problem or "no such file" in problem
    own_dovecot.start()
    assert pf.wait_for(lambda: store.client.connection is not None, 5)
    assert check(store, "", "alice", USERS.plain["alice"]) == Verdict(True, {})


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_an_outage_logs_its_state_change_and_no_line_per_attempt(
    stores, reactor, captured_log, tmp_path, where
):
    # Nothing there (no socket file; a closed port): for a few seconds the
    # background retries and the attempts of clients fail.  The whole log
    # is one "unavailable" line, the connection's and the checker's state
    # being one: no second line from the other (there were two), and no
    # Twisted "Starting factory" / "Stopping factory" per attempt.
    from tests.server import free_port

    target = tmp_path / "auth-client" if where == "unix" else f"127.0.0.1:{free_port()}"
    store = stores(target)
    checker = in_reactor(lambda: StoreChecker(store, reactor))
    in_reactor(store.start)
    credentials = PlainCredentials("", "alice", USERS.plain["alice"], conn_meta())
    attempts = 0
    deadline = time.monotonic() + 20.0  # a loaded machine may retry slowly
    while attempts < 5 or store.client.failures < 4:  # that many connections tried
        assert time.monotonic() < deadline, (attempts, store.client.failures)
        with pytest.raises(BackendUnavailable):
            in_reactor(checker.requestAvatarId, credentials)
        attempts += 1
        time.sleep(0.2)
    lines = [formatEvent(e) for e in captured_log.events]
    assert len(lines) == 1, lines
    assert "auth backend dovecot unavailable: cannot reach dovecot auth at" in lines[0]
    assert "next try" not in lines[0]
    assert not [line for line in lines if "actory" in line]


def test_no_answer_in_time_is_a_timeout_and_the_late_answer_is_ignored(dovecot, stores):
    store = stores(dovecot.client_socket, timeout=0.5)
    alice = USERS.plain["alice"]
    assert check(store, "", "alice", alice) == Verdict(True, {})
    fresh = stores(tcp(dovecot), timeout=0.5)
    with dovecot.frozen():
        started = time.monotonic()
        e = backend_error(store, "", "alice", alice)
        assert "no answer from dovecot auth within 0.5 s" in str(e)
        assert 0.45 < time.monotonic() - started < 2
        # connected, but no handshake comes
        assert "within 0.5 s" in str(backend_error(fresh, "", "alice", alice))
    # The late OK for the first request arrives and is dropped; the same
    # connection goes on.
    assert check(store, "", "bob", USERS.plain["bob"]) == Verdict(True, {})
    assert store.client.handshakes == 1
    assert not store.client.connection.pending


def test_a_reloaded_dovecot_is_reached_through_a_fresh_connection(own_dovecot, stores):
    import os
    import signal

    store = stores(own_dovecot.client_socket, connection_lifetime=1.0)
    assert check(store, "", "alice", USERS.plain["alice"]) == Verdict(True, {})
    old = store.client.connection.server_pid
    assert old == str(own_dovecot.auth_pid())
    os.kill(own_dovecot.proc.pid, signal.SIGHUP)  # the old auth process lives on

    def new_process() -> bool:
        check(store, "", "alice", USERS.plain["alice"])
        connection = store.client.connection
        return connection is not None and connection.server_pid != old

    assert pf.wait_for(new_process, 5, interval=0.2)
    assert store.client.handshakes >= 2


def test_reload_to_another_socket(dovecot, stores, reactor):
    store = stores(dovecot.client_socket)
    assert check(store, "", "alice", USERS.plain["alice"]) == Verdict(True, {})
    old = store.client.connection
    config = validate({"socket": tcp(dovecot), "timeout": 2.0})
    in_reactor(store.reload, config)
    assert check(store, "", "bob", USERS.plain["bob"]) == Verdict(True, {})
    assert store.client.connection is not old and old.closed.called
    assert store.client.target == parse_socket(tcp(dovecot))
    assert dovecot.established() == 1


def test_the_built_in_checker_and_the_strcred_argument(dovecot, reactor, tmp_path):
    spec = checkers.resolve(
        "dovecot", {"dovecot": {"socket": str(dovecot.client_socket)}}, base=tmp_path
    )
    checker = in_reactor(checkers.build, spec, reactor, None)
    assert ICredentialsChecker.providedBy(checker)
    assert isinstance(checker, StoreChecker) and checker.store.name == "dovecot"
    try:
        creds = PlainCredentials("", "alice", USERS.plain["alice"], conn_meta())
        assert in_reactor(checker.requestAvatarId, creds) == "alice"
        # the account Dovecot names (auth_username_format = %Lu), not the login
        creds = PlainCredentials("", "Alice", USERS.plain["alice"], conn_meta())
        assert in_reactor(checker.requestAvatarId, creds) == "alice"
        # a master user's login stays the master's, acting as the target
        # Dovecot names (alice, for ALICE): the avatar carries both
        creds = PlainCredentials("ALICE", "kumoauth", USERS.masters["kumoauth"], conn_meta())
        avatar = in_reactor(checker.requestAvatarId, creds)
        assert (avatar, avatar.authz) == ("kumoauth", "alice")
    finally:
        in_reactor(checker.stop)
    assert from_argstring(tcp(dovecot)).socket == tcp(dovecot)


# --------------------------------------------------------------------------
# the answers a real Dovecot will not give on demand: a memory reactor


class Peer:
    """The Dovecot end of a store's connection in a MemoryReactorClock."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        _, self.factory, _, _ = clock.unixClients[-1]
        self.connector = clock.connectors[-1]

    def accept(self) -> Peer:
        self.transport = StringTransportWithDisconnection()
        self.protocol = self.factory.buildProtocol(None)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        return self

    def refuse(self) -> None:
        self.factory.clientConnectionFailed(self.connector, Failure(ConnectionRefusedError()))

    def send(self, *lines: str) -> None:
        for line in lines:
            self.protocol.dataReceived(line.encode() + b"\n")

    def handshake(self, version: str = "1\t2", mechs: tuple[str, ...] = ("PLAIN", "LOGIN")) -> None:
        self.send(f"VERSION\t{version}")
        self.send(*(f"MECH\t{m}\tplaintext" for m in mechs))
        self.send("SPID\t4242", "CUID\t7", "COOKIE\t" + "ab" * 16, "DONE")

    def lines(self) -> list[list[str]]:
        out = [line.split("\t") for line in self.transport.value().decode().splitlines()]
        self.transport.clear()
        return out

    def requests(self) -> list[list[str]]:
        return [fields for fields in self.lines() if fields[0] == "AUTH"]

    def close(self) -> None:
        self.transport.loseConnection()


def result_of(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def not_fired(d: defer.Deferred[Any]) -> bool:
    return not d.called


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


def memory_store(clock: MemoryReactorClock, **kw: Any) -> Dovecot:
    return Dovecot("/run/test/auth-client", reactor=clock, **kw)


def connected(clock: MemoryReactorClock, store: Dovecot, **handshake: Any) -> Peer:
    d = store.check("", "warmup", "warmup-pw")
    peer = Peer(clock).accept()
    assert peer.lines()[:2] == [["VERSION", "1", "2"], ["CPID", str(__import__("os").getpid())]]
    peer.handshake(**handshake)
    (request,) = peer.requests()
    peer.send(f"OK\t{request[1]}\tuser=warmup")
    assert result_of(d) == Verdict(True, {})
    return peer


def test_the_auth_line(clock):
    store = memory_store(clock, service="submission")
    peer = connected(clock, store)
    meta = conn_meta(received_from="[2001:db8::1]:5000", received_via="192.0.2.9:587")
    d = store.check("alice", "alice", "pw\twith tab", meta)
    (line,) = peer.requests()
    assert line[:3] == ["AUTH", "2", "PLAIN"]
    assert line[3:-1] == [
        "service=submission",
        "secured",
        "rip=2001:db8::1",
        "rport=5000",
        "lip=192.0.2.9",
        "lport=587",
    ]
    assert line[-1] == "resp=" + base64.b64encode(b"\0alice\0pw\twith tab").decode()
    peer.send("OK\t2\tuser=alice")
    assert result_of(d) == Verdict(True, {})
    # proxy authorization: the authzid goes along
    store.check("bob", "kumoauth", "pw", None)
    (line,) = peer.requests()
    assert line[3:] == ["service=submission", "resp=" + plain_response("bob", "kumoauth", "pw")]


def test_answers_out_of_order_reach_their_requests(clock):
    store = memory_store(clock)
    peer = connected(clock, store)
    ds = [store.check("", f"u{i}", "pw") for i in range(3)]
    ids = [line[1] for line in peer.requests()]
    assert ids == ["2", "3", "4"]
    peer.send(f"FAIL\t{ids[2]}\tuser=u2", "UNKNOWNCMD\tx", f"OK\t{ids[0]}\tuser=u0")
    assert result_of(ds[0]) == Verdict(True, {}) and result_of(ds[2]) == DENIED
    assert not_fired(ds[1])
    peer.send(f"OK\t{ids[1]}\tuser=U1\textra=field\tpass=notforus")
    assert result_of(ds[1]) == Verdict(True, {"dovecot_user": "U1"}, user="U1")


@pytest.mark.parametrize(
    "reply",
    ["FAIL\t{id}\tcode=temp_fail\treason=database down", "FAIL\t{id}\ttemp", "CONT\t{id}\tAAAA"],
)
def test_temporary_failures_and_challenges_are_454(clock, reply):
    store = memory_store(clock)
    peer = connected(clock, store)
    d = store.check("", "alice", "pw")
    (line,) = peer.requests()
    peer.send(reply.format(id=line[1]))
    with pytest.raises(BackendError):
        result_of(d)
    # the connection stays
    d = store.check("", "alice", "pw")
    (line,) = peer.requests()
    peer.send(f"FAIL\t{line[1]}\tuser=alice\treason=Authentication failed")
    assert result_of(d) == DENIED


def test_a_proxy_referral_is_454_and_logged_once_per_user(clock, captured_log):
    store = memory_store(clock)
    peer = connected(clock, store)
    for _ in range(2):
        d = store.check("", "alice", "pw-Secret")
        (line,) = peer.requests()
        peer.send(f"OK\t{line[1]}\tuser=alice\tproxy\thost=10.0.0.1\tnologin\tpass=pw-Secret")
        with pytest.raises(BackendError) as e:
            result_of(d)
        assert e.value.outage is False
    lines = [formatEvent(e) for e in captured_log.events]
    assert sum("proxy referral, which may not have checked" in line for line in lines) == 1
    assert "pw-Secret" not in captured_log.text()


@pytest.mark.parametrize(
    "handshake,problem",
    [
        ({"version": "2\t0"}, "dovecot speaks auth protocol version 2"),
        ({"mechs": ("LOGIN", "CRAM-MD5")}, "dovecot does not offer PLAIN"),
    ],
)
def test_a_handshake_kumoauth_cannot_use(clock, handshake, problem):
    store = memory_store(clock)
    d = store.check("", "alice", "pw")
    peer = Peer(clock).accept()
    peer.handshake(**handshake)
    with pytest.raises(BackendError, match=problem):
        result_of(d)
    assert not peer.transport.connected
    assert not peer.requests()


@pytest.mark.parametrize("nonsense", ["OK", "OK\tabc", "FAIL\t-1", "OK\t" + "9" * 11])
def test_nonsense_drops_the_connection_and_fails_what_was_sent(clock, nonsense):
    store = memory_store(clock)
    peer = connected(clock, store)
    d = store.check("", "alice", "pw")
    peer.send(nonsense)
    with pytest.raises(BackendError, match="without a request id"):
        result_of(d)
    assert not peer.transport.connected and store.client.connection is None


def test_a_line_too_long_drops_the_connection(clock):
    store = memory_store(clock)
    peer = connected(clock, store)
    d = store.check("", "alice", "pw")
    peer.protocol.dataReceived(b"OK\t2\tuser=" + b"a" * dv.MAX_LINE)
    with pytest.raises(BackendError, match="longer than"):
        result_of(d)


def test_an_answer_during_the_handshake_is_nonsense(clock):
    store = memory_store(clock)
    d = store.check("", "alice", "pw")
    peer = Peer(clock).accept()
    peer.send("VERSION\t1\t2", "OK\t1")
    with pytest.raises(BackendError, match="during the handshake"):
        result_of(d)


def test_backoff_answers_at_once_then_retries_in_the_background(clock):
    store = memory_store(clock)
    d = store.check("", "alice", "pw")
    Peer(clock).refuse()
    with pytest.raises(BackendError, match="connection refused"):
        result_of(d)
    attempts = len(clock.unixClients)
    # within the backoff: 454 at once, no new attempt
    with pytest.raises(BackendError, match=r"next try in 0\.1 s"):
        result_of(store.check("", "alice", "pw"))
    assert len(clock.unixClients) == attempts
    delays = []
    for _ in range(6):
        delay = store.client.retry_call.getTime() - clock.seconds()
        delays.append(round(delay, 3))
        clock.advance(delay)
        assert len(clock.unixClients) == attempts + 1
        attempts += 1
        Peer(clock).refuse()
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    # Dovecot is back: the background attempt connects, requests flow.
    clock.advance(dv.BACKOFF_MAX)
    assert len(clock.unixClients) == attempts + 1
    peer = Peer(clock).accept()
    peer.handshake()
    d = store.check("", "alice", "pw")
    (line,) = peer.requests()
    peer.send(f"OK\t{line[1]}")
    assert result_of(d) == Verdict(True, {})


def test_a_lost_connection_fails_what_was_sent_and_reconnects_at_once(clock):
    store = memory_store(clock)
    peer = connected(clock, store)
    clock.advance(dv.STABLE_AFTER)
    d = store.check("", "alice", "pw")
    peer.close()
    with pytest.raises(BackendError, match="connection to dovecot lost: closed by dovecot"):
        result_of(d)
    attempts = len(clock.unixClients)
    d = store.check("", "alice", "pw")  # no backoff after a stable connection
    assert len(clock.unixClients) == attempts + 1
    peer = Peer(clock).accept()
    peer.handshake()
    (line,) = peer.requests()
    peer.send(f"OK\t{line[1]}")
    assert result_of(d) == Verdict(True, {})


def test_timeouts_while_connecting_and_while_waiting(clock):
    store = memory_store(clock, timeout=2.0)
    d = store.check("", "alice", "pw")  # the connection never comes up
    clock.advance(2.0)
    with pytest.raises(BackendError, match="within 2 s"):
        result_of(d)
    clock.advance(dv.BACKOFF_MAX)
    peer = Peer(clock).accept()
    peer.handshake()
    d = store.check("", "alice", "pw")
    (line,) = peer.requests()
    clock.advance(2.0)
    with pytest.raises(BackendError, match="no answer from dovecot auth within 2 s"):
        result_of(d)
    assert not store.client.connection.pending
    peer.send(f"OK\t{line[1]}")  # too late: ignored
    assert store.client.connection is peer.protocol._wrappedProtocol


def test_max_pending(clock):
    store = memory_store(clock, max_pending=3)
    connected(clock, store)
    ds = [store.check("", f"u{i}", "pw") for i in range(3)]
    with pytest.raises(BackendError, match="3 requests already wait"):
        result_of(store.check("", "u4", "pw"))
    assert all(not_fired(d) for d in ds)


def test_a_cancelled_request_is_forgotten(clock):
    store = memory_store(clock)
    peer = connected(clock, store)
    d = store.check("", "alice", "pw")
    (line,) = peer.requests()
    d.cancel()
    with pytest.raises(defer.CancelledError):
        result_of(d)
    assert not store.client.connection.pending
    peer.send(f"OK\t{line[1]}")


def test_the_connection_is_recycled_after_its_lifetime(clock):
    store = memory_store(clock, connection_lifetime=30.0)
    first = connected(clock, store)
    attempts = len(clock.unixClients)
    clock.advance(30.0)
    assert len(clock.unixClients) == attempts + 1
    # until the new one is ready, the old one takes requests
    d = store.check("", "alice", "pw")
    d2 = store.check("", "bob", "pw")
    line, line2 = first.requests()
    second = Peer(clock).accept()
    second.handshake()
    d3 = store.check("", "carol", "pw")
    assert second.requests()[0][1] == "1"
    # the old connection closes once its answers are in
    assert first.transport.connected
    first.send(f"OK\t{line[1]}", f"FAIL\t{line2[1]}")
    assert result_of(d) == Verdict(True, {}) and result_of(d2) == DENIED
    assert not first.transport.connected
    assert not_fired(d3)


def test_a_recycled_connection_does_not_end_a_passdb_outage(clock, captured_log):
    # Dovecot answering "FAIL temp" (its passdb down): each recycle of the
    # connection said "available again", the next attempt "unavailable".
    store = memory_store(clock, connection_lifetime=30.0)
    checker = StoreChecker(store, clock)
    connected(clock, store)
    store.health.failed("dovecot: temporary failure")  # as the checker logs it
    clock.advance(30.0)
    Peer(clock).accept().handshake()
    assert store.health.down is not None
    assert "available again" not in captured_log.text()
    assert checker.health is store.health


def test_stop_closes_and_refuses(clock):
    store = memory_store(clock)
    peer = connected(clock, store)
    d = store.check("", "alice", "pw")
    done = store.stop()
    with pytest.raises(BackendError):
        result_of(d)
    assert not peer.transport.connected
    assert result_of(done) is not None
    with pytest.raises(BackendError, match="stopped"):
        result_of(store.check("", "alice", "pw"))


def test_a_store_is_usable_from_a_policy_without_a_reactor_argument():
    store = Dovecot("relative/auth-client")
    assert store.reactor is not None and store.name == "dovecot"
    assert store.client.target.path == Path.cwd() / "relative/auth-client"
    assert "Secret" not in repr(store)
    store.subscribe(lambda: None)


# --------------------------------------------------------------------------
# configuration and the wire format


def test_schema_is_the_config():
    assert set(SCHEMA) == {f.name for f in fields(Config)}


def test_validate(tmp_path):
    config = validate({"socket": "run/auth-client"}, base=tmp_path)
    assert config == Config(socket=str(tmp_path / "run/auth-client"))
    assert validate({"socket": "[::1]:9999", "service": "submission"}).socket == "[::1]:9999"
    assert validate({"socket": "localhost:9999"}).socket == "localhost:9999"
    remote = {"socket": "auth.example.net:9999"}
    assert validate({**remote, "allow_plaintext": True}).socket == "auth.example.net:9999"


@pytest.mark.parametrize(
    "raw,problem",
    [
        ({}, "socket: required key is missing"),
        ({"socket": ""}, "socket: must not be empty"),
        ({"socket": "/x", "sockt": 1}, "sockt: unknown key"),
        ({"socket": "/x", "timeout": 0}, "timeout: must be at least"),
        ({"socket": "/x", "max_pending": 0}, "max_pending: must be at least 1"),
        ({"socket": "/x", "service": "smtp\tsecured"}, "service: expected a service name"),
        ({"socket": "/x", "service": "a b"}, "service: expected a service name"),
        ({"socket": "/x", "connection_lifetime": 0.5}, "connection_lifetime: must be at least"),
        ({"socket": "192.0.2.1:9999"}, "socket: 192.0.2.1:9999 is not on this host"),
        ({"socket": "[1.2.3.4]:9"}, "socket: [1.2.3.4]:9: expected [IPv6 address]:port"),
        ({"socket": "host:70000"}, "the port must be 1-65535"),
        ({"socket": "/a\tb"}, "expected a socket path"),
        ({"socket": "/" + "x" * 120}, "too long for a Unix socket"),
    ],
)
def test_validate_refuses(raw, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        validate(raw)


def test_from_argstring(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert from_argstring("auth-client").socket == str(tmp_path / "auth-client")
    assert from_argstring("127.0.0.1:12345").socket == "127.0.0.1:12345"
    with pytest.raises(ValueError):
        from_argstring("")


@given(st.text())
def test_tab_escaping_round_trips_and_never_frames(value):
    escaped = tab_escape(value)
    assert not any(c in escaped for c in "\t\n\r\x00")
    assert tab_unescape(escaped) == value


def test_tab_unescape_as_documented():
    assert tab_unescape("a\x01tb\x01nc\x01rd\x010e\x011f\x01xg\x01") == "a\tb\nc\rd\x00e\x01fxg"


@given(st.text(), st.text())
def test_request_params_never_carry_framing_characters(from_value, via_value):
    meta = conn_meta(received_from=from_value, received_via=via_value)
    for param in request_params("smtp", meta):
        assert not any(c in param for c in "\t\n\r\x00\x01")


def test_request_params_tell_dovecot_the_proxy_as_real_rip():
    # Behind a PROXY header: rip is the client the header named, real_rip
    # the proxy (Dovecot's allow_real_nets); without one, no real_rip.
    meta = conn_meta(
        received_from="198.51.100.7:40000",
        received_via="127.0.0.1:587",
        received_from_proxy="10.0.0.5:51234",
    )
    params = request_params("smtp", meta)
    assert "rip=198.51.100.7" in params and "real_rip=10.0.0.5" in params
    direct = request_params("smtp", conn_meta(received_from="198.51.100.7:40000"))
    assert not any(p.startswith("real_rip=") for p in direct)


def dovecot_server(dovecot: lab.Dovecot, certs: Any, tmp_path: Path, extra: str = "") -> Any:
    """A real ``twistd kumoauth`` with ``checker = "dovecot"`` and an empty ``locked_users``."""
    from tests.server import running_server

    (tmp_path / "locked").write_text("")
    return running_server(
        tmp_path / "srv",
        certs,
        None,
        auth=f'checker = "dovecot"\nlocked_users = "{tmp_path / "locked"}"',
        extra=f'[auth.dovecot]\nsocket = "{dovecot.client_socket}"\n' + extra,
    )


def plain_reply_once_locked(srv: Any, authz: str, authc: str, password: str) -> int:
    """AUTH PLAIN's code once the lock file's change is seen (within 5 s), or the last."""
    from tests.test_e2e import starttls_client

    blob = plain_b64(authz, authc, password)
    deadline = time.monotonic() + 5
    while True:
        with starttls_client(srv) as s:
            code = s.docmd("AUTH PLAIN", blob)[0]
        if code == 535 or time.monotonic() > deadline:
            return int(code)
        time.sleep(0.2)


def test_a_login_acts_as_the_account_dovecot_names(dovecot, certs, tmp_path):
    """
    Through a real ``twistd kumoauth`` with ``checker = "dovecot"``: "ALICE"
    and "Alice" are Dovecot's alice (``auth_username_format = %Lu``), so
    the stored identity, the sender binding and ``locked_users`` see that
    one account.  A postmaster's walkthrough found a locked alice logging
    in as ALICE, and Alice refused her own address, as Postfix never did.
    """
    from tests.test_e2e import login, queued_id, spooled, starttls_client

    senders = tmp_path / "senders"
    senders.write_text("alice@example.com alice\n")
    password = USERS.plain["alice"]
    with dovecot_server(dovecot, certs, tmp_path, f'[sender_binding]\nmap = "{senders}"\n') as srv:
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "ALICE", password)[0] == 235
            assert s.mail("alice@example.com")[0] == 250
            assert s.rcpt("x@example.net")[0] == 250
            code, reply = s.data(b"From: alice@example.com\r\nSubject: t\r\n\r\nhi\r\n")
            assert code == 250, reply
        meta = spooled(srv, queued_id(reply)).meta
        assert (meta["authn_id"], meta["authz_id"], meta["dovecot_user"]) == ("alice",) * 3
        assert "AUTH PLAIN success authc=ALICE authz=ALICE authn=alice " in srv.log()
        (tmp_path / "locked").write_text("alice\n")
        assert plain_reply_once_locked(srv, "", "Alice", password) == 535
        assert "reason=locked" in srv.log()
        log = srv.log()
        leaked = password in log  # not in the assertion: a failure would print it
        assert not leaked, "the password is in the log"
        assert "Traceback" not in log


def test_a_master_login_is_the_masters_account_acting_as_its_target(dovecot, certs, tmp_path):
    """
    The review: Dovecot's separator form ("alice*kumoauth", no authzid) made
    the master's login alice's account (authn_id alice): a lock on the
    master never applied and its mail counted as alice's.  Either form is
    the master's account (authn_id), acting as alice (authz_id).
    """
    from tests.test_e2e import queued_id, spooled, starttls_client

    master = USERS.masters["kumoauth"]
    with dovecot_server(dovecot, certs, tmp_path) as srv:
        for authz, authc in (("", "ALICE*kumoauth"), ("Alice", "kumoauth")):
            with starttls_client(srv) as s:
                blob = plain_b64(authz, authc, master)
                assert s.docmd("AUTH PLAIN", blob)[0] == 235
                assert s.mail("alice@example.com")[0] == 250
                assert s.rcpt("x@example.net")[0] == 250
                code, reply = s.data(b"Subject: t\r\n\r\nhi\r\n")
                assert code == 250, reply
            meta = spooled(srv, queued_id(reply)).meta
            assert (meta["authn_id"], meta["authz_id"]) == ("kumoauth", "alice"), (authz, authc)
        (tmp_path / "locked").write_text("kumoauth\n")
        assert plain_reply_once_locked(srv, "", "alice*kumoauth", master) == 535
        log = srv.log()
        leaked = master in log  # not in the assertion: a failure would print it
        assert not leaked, "the master password is in the log"
        assert "Traceback" not in log
