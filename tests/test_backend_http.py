"""
The HTTP auth API store (``[auth.http]``, kumoauth.backends.http) against a
real ``twisted.web`` server on 127.0.0.1, over plain HTTP and over HTTPS
with trustme certificates, on the real reactor (in a thread, as
tests/upstream.py runs it): what each answer means, the request's body and
headers, the deadline, connection reuse and the retry of a connection the
server closed, outages and recovery through StoreChecker's health log, and
no password or token in any log line, error or repr.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.cred import error as cred_error
from twisted.internet import ssl
from twisted.logger import formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from kumoauth.auth.checkers import build, resolve
from kumoauth.auth.cred import BackendUnavailable, PlainCredentials
from kumoauth.backends.base import DENIED, BackendError, StoreChecker, Verdict
from kumoauth.backends.http import HTTP, MAX_BODY, Config, factory, from_argstring, validate
from kumoauth.meta import MAX_DEPTH, ConnMeta
from tests.conftest import SilentResolver
from tests.upstream import in_reactor, start_reactor

USERS = {"alice@example.org": "correct horse battery staple", "bob@example.org": "hunter2 ü"}
PASSWORD = USERS["alice@example.org"]
TOKEN = "s3cr3t-T0ken.value~42"


# --------------------------------------------------------------------------
# the auth API


@dataclass
class Seen:
    """One request as the API received it."""

    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes
    connection: int

    def json(self) -> Any:
        return json.loads(self.body)


def users_answer(request: Request, body: dict[str, Any]) -> bytes:
    """A well-behaved API: the password of authc, authz must be authc or
    shared@example.org (which alice may use)."""
    ok = USERS.get(body["authc"]) == body["password"] and body["authz"] in (
        body["authc"],
        "shared@example.org" if body["authc"] == "alice@example.org" else None,
    )
    meta = {"tenant": body["authc"].partition("@")[2], "quota": 3, "groups": ["smtp"]}
    return answer(request, 200, {"ok": True, "meta": meta} if ok else {"ok": False})


def answer(request: Request, code: int, payload: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


class API(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.respond: Callable[[Request, dict[str, Any]], Any] = users_answer
        self.lost: list[int] = []  # requests whose connection went away unanswered

    def render_POST(self, request: Request) -> Any:
        raw = request.content.read()
        self.seen.append(
            Seen(
                path=request.path,
                headers={k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
                body=raw,
                connection=id(request.channel),
            )
        )
        index = len(self.seen) - 1
        request.notifyFinish().addErrback(lambda _: self.lost.append(index))
        return self.respond(request, json.loads(raw))


class TrackingSite(Site):
    """A Site that counts the connections it accepted and can drop them."""

    noisy = False

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.protocols: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        self.protocols.append(p)
        return p

    def log(self, request: Request) -> None:
        pass  # no access log lines in the captured events

    def transports(self) -> list[Any]:
        """The TCP transport of every connection (under TLS, if any)."""
        # HTTP/1.1 or HTTP/2 is chosen per connection; the channel inside
        # the chooser has the transport
        channels = (getattr(p, "_channel", p) for p in self.protocols)
        found = []
        for c in channels:
            t = getattr(c, "transport", None)
            while getattr(t, "transport", None) is not None:
                t = t.transport
            if t is not None:
                found.append(t)
        return found

    def drop_all(self) -> None:
        for transport in self.transports():
            if not transport.disconnected:
                transport.abortConnection()


@dataclass
class Server:
    reactor: Any
    tls: Any = None  # CertificateOptions, or None for plain HTTP
    interface: str = "127.0.0.1"
    api: API = field(default_factory=API)
    port: int = 0
    listening: Any = None

    def __post_init__(self) -> None:
        self.site = TrackingSite(self.api)

    def start(self) -> None:
        def listen() -> None:
            if self.tls is None:
                self.listening = self.reactor.listenTCP(
                    self.port, self.site, interface=self.interface
                )
            else:
                self.listening = self.reactor.listenSSL(
                    self.port, self.site, self.tls, interface=self.interface
                )
            self.port = self.listening.getHost().port

        in_reactor(listen)

    def stop(self) -> None:
        """Down: no longer listening, and every open connection dropped."""

        def down() -> Any:
            self.site.drop_all()
            return self.listening.stopListening()

        in_reactor(down)

    def url(self, host: str | None = None, path: str = "/smtp-auth") -> str:
        scheme = "http" if self.tls is None else "https"
        host = host or self.interface
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}{path}"

    @property
    def connections(self) -> int:
        return len(self.site.protocols)


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


@pytest.fixture
def server(reactor: Any) -> Iterator[Server]:
    s = Server(reactor)
    s.start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_failure_logged(captured_log: Any) -> Iterator[None]:
    """No traceback, no "Unhandled error in Deferred" (logged when one is
    garbage-collected), whatever the test did."""
    yield
    in_reactor(lambda: None)  # what the reactor had queued has run
    gc.collect()
    failures = [e for e in captured_log.events if "log_failure" in e]
    assert not failures, captured_log.text()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_options(ca: trustme.CA, *names: str) -> Any:
    cert = ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
    return ssl.PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()


@pytest.fixture
def tls_server(reactor: Any, ca: trustme.CA) -> Iterator[Server]:
    s = Server(reactor, tls=tls_options(ca))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "api-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def make_store(reactor: Any) -> Iterator[Callable[..., HTTP]]:
    """HTTP stores made on the reactor thread, stopped (connections closed) after."""
    stores: list[HTTP] = []

    def make(url: str, **kw: Any) -> HTTP:
        store: HTTP = in_reactor(lambda: HTTP(url, reactor=reactor, **kw))
        stores.append(store)
        return store

    yield make
    for store in stores:
        in_reactor(store.stop)


def check(store: HTTP, authc: str, password: str, authz: str = "", meta: Any = None) -> Verdict:
    result: Verdict = in_reactor(store.check, authz, authc, password, meta)
    return result


def backend_error(store: HTTP, authc: str = "alice@example.org", password: str = PASSWORD) -> str:
    with pytest.raises(BackendError) as e:
        check(store, authc, password)
    return str(e.value)


def conn_meta() -> ConnMeta:
    return ConnMeta(
        {
            "received_from": "[2001:db8::7]:40123",
            "received_via": "127.0.0.1:587",
            "tls_protocol_version": "TLSv1.3",
        }
    )


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --------------------------------------------------------------------------
# answers


def test_ok_merges_meta_through_the_store_checker(server, reactor):
    checker = in_reactor(
        factory, config=validate({"url": server.url()}), reactor=reactor, pool=None
    )
    assert isinstance(checker, StoreChecker)
    meta = conn_meta()
    creds = PlainCredentials("", "alice@example.org", PASSWORD, meta)
    try:
        assert in_reactor(checker.requestAvatarId, creds) == "alice@example.org"
        assert meta.get_meta("tenant") == "example.org"
        assert meta.get_meta("quota") == 3
        assert meta.get_meta("groups") == ["smtp"]
        wrong = PlainCredentials("", "alice@example.org", "wrong", ConnMeta())
        with pytest.raises(cred_error.UnauthorizedLogin):
            in_reactor(checker.requestAvatarId, wrong)
    finally:
        in_reactor(checker.stop)


def test_meta_nested_to_the_limit_is_kept(server, make_store, reactor):
    deepest: Any = "x"
    for _ in range(MAX_DEPTH):
        deepest = [deepest]
    server.api.respond = lambda req, body: answer(req, 200, {"ok": True, "meta": {"a": deepest}})
    checker = StoreChecker(make_store(server.url()), clock=reactor)
    meta = ConnMeta()
    creds = PlainCredentials("", "alice@example.org", PASSWORD, meta)
    assert in_reactor(checker.requestAvatarId, creds) == "alice@example.org"
    assert meta.get_meta("a") == deepest
    assert meta.snapshot()["a"] == deepest


def test_ok_false_wrong_password_and_unknown_user(server, make_store):
    store = make_store(server.url())
    assert check(store, "alice@example.org", PASSWORD).ok
    assert check(store, "alice@example.org", PASSWORD + "x") is DENIED
    assert check(store, "nobody@example.org", PASSWORD) is DENIED
    assert len(server.api.seen) == 3


def test_ok_without_meta_is_an_empty_meta(server, make_store):
    server.api.respond = lambda req, body: answer(req, 200, {"ok": True})
    assert check(make_store(server.url()), "alice@example.org", PASSWORD) == Verdict(True, {})
    server.api.respond = lambda req, body: answer(req, 200, {"ok": True, "meta": None})
    assert check(make_store(server.url()), "alice@example.org", PASSWORD) == Verdict(True, {})


@pytest.mark.parametrize("code", [401, 403])
def test_401_and_403_are_denied(server, make_store, code):
    server.api.respond = lambda req, body: answer(req, code, {"error": "no"})
    assert check(make_store(server.url()), "alice@example.org", PASSWORD) is DENIED


def test_empty_password_is_denied_without_a_request(server, make_store):
    store = make_store(server.url())
    assert check(store, "alice@example.org", "") is DENIED
    assert check(store, "", PASSWORD) is DENIED
    assert server.api.seen == []


def test_the_api_judges_proxy_authorization(server, make_store):
    store = make_store(server.url())
    assert check(store, "alice@example.org", PASSWORD, authz="shared@example.org").ok
    assert check(store, "alice@example.org", PASSWORD, authz="bob@example.org") is DENIED
    assert [s.json()["authz"] for s in server.api.seen] == [
        "shared@example.org",
        "bob@example.org",
    ]


@pytest.mark.parametrize(
    "code,payload,reason",
    [
        (500, {"ok": True}, "HTTP 500"),
        (200, b"<html>not json</html>", "not JSON"),
        (200, b"\xff\xfe{}", "not JSON"),
        (200, [True], "not an object"),
        (200, {"ok": "true"}, '"ok"'),
        (200, {"ok": 1}, '"ok"'),
        (200, {}, '"ok"'),
        (200, {"ok": True, "meta": ["tenant"]}, '"meta"'),
        (200, {"ok": True, "meta": "tenant"}, '"meta"'),
        (200, b'{"ok": true, "meta": {"x": NaN}}', "not JSON"),
        # JSON, but a float only as infinity: not storable meta either
        (200, b'{"ok": true, "meta": {"x": 1e400}}', "number out of range"),
        (200, b'{"ok": true, "meta": {"x": [-1e999]}}', "number out of range"),
        (200, b"[" * 60_000, "not JSON"),  # deeper than the parser goes
        (200, b'{"ok": true, "meta": ' + b'{"a":' * 12_000, "not JSON"),
        # parses, but no meta value may nest deeper than MAX_DEPTH
        (200, b'{"ok": true, "meta": {"a": ' + b"[" * 33 + b"]" * 33 + b"}}", "nested deeper"),
        (200, b'{"ok": true, "meta": {"a": ' + b"[" * 900 + b"]" * 900 + b"}}", "nested deeper"),
        (204, b"", "HTTP 204"),
        (404, {"ok": False}, "HTTP 404"),
    ],
)
def test_nonsense_is_a_backend_error(server, make_store, code, payload, reason):
    server.api.respond = lambda req, body: answer(req, code, payload)
    message = backend_error(make_store(server.url()))
    assert reason in message
    assert server.url().split("?")[0] in message


#: nested deeper than json's parser goes, and well under MAX_BODY
DEEP = b"[" * 60_000


def test_deeply_nested_json_is_an_outage_logged_once(reactor, server, make_store, captured_log):
    # A RecursionError in the parser is an answer that is not JSON: 454 with
    # one line when the API goes bad and one when it is back, no traceback
    # per attempt (the autouse fixture finds none).
    assert len(DEEP) < MAX_BODY
    checker = StoreChecker(make_store(server.url()), clock=reactor)

    def attempt() -> Any:
        creds = PlainCredentials("", "alice@example.org", PASSWORD, ConnMeta())
        return in_reactor(checker.requestAvatarId, creds)

    server.api.respond = lambda req, body: answer(req, 200, DEEP)
    for _ in range(3):
        with pytest.raises(BackendUnavailable, match="not JSON"):
            attempt()
    server.api.respond = users_answer
    assert attempt() == "alice@example.org"
    lines = captured_log.namespace("kumoauth.backends")
    texts = [formatEvent(e) for e in lines]
    assert len(lines) == 2, texts
    assert "unavailable" in texts[0] and "HTTP 200 with a body that is not JSON" in texts[0]
    assert "available again" in texts[1] and lines[1]["n"] == 3
    assert "RecursionError" not in captured_log.text()


def test_post_json_deeply_nested_is_a_backend_error(server, make_store):
    store = make_store(server.url())
    server.api.respond = lambda req, body: answer(req, 200, DEEP)
    with pytest.raises(
        BackendError, match="/smtp-auth/senders: HTTP 200 with a body that is not JSON"
    ):
        in_reactor(store.post_json, {"user": "alice@example.org"}, "senders")
    server.api.respond = lambda req, body: answer(req, 200, [[["ok"]]])
    assert in_reactor(store.post_json, {"user": "alice@example.org"}, "senders") == [[["ok"]]]


def test_a_redirect_is_not_followed(server, make_store):
    def redirect(request: Request, body: Any) -> bytes:
        if request.path == b"/elsewhere":
            return answer(request, 200, {"ok": True})
        request.redirect(server.url(path="/elsewhere").encode())
        return b""

    server.api.respond = redirect
    assert "redirect" in backend_error(make_store(server.url()))
    assert [s.path for s in server.api.seen] == [b"/smtp-auth"]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_huge_body_is_a_backend_error(server, make_store, chunked):
    big = json.dumps({"ok": True, "meta": {"x": "y" * MAX_BODY}}).encode()

    def huge(request: Request, body: Any) -> Any:
        if not chunked:
            return answer(request, 200, big)  # with Content-Length
        for i in range(0, len(big), 8192):
            request.write(big[i : i + 8192])
        request.finish()
        return NOT_DONE_YET

    server.api.respond = huge
    store = make_store(server.url())
    assert f"over {MAX_BODY} bytes" in backend_error(store)
    # the connection was closed rather than read to the end; the next works
    server.api.respond = users_answer
    assert check(store, "alice@example.org", PASSWORD).ok


def test_a_body_just_under_the_limit_is_read(server, make_store):
    payload = json.dumps({"ok": True, "meta": {"x": ""}}).encode()
    filler = MAX_BODY - len(payload)
    body = json.dumps({"ok": True, "meta": {"x": "y" * filler}}).encode()
    assert len(body) == MAX_BODY
    server.api.respond = lambda req, _: answer(req, 200, body)
    assert check(make_store(server.url()), "alice@example.org", PASSWORD).meta["x"] == "y" * filler


# --------------------------------------------------------------------------
# the request


def test_the_json_body_and_headers(server, make_store, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    store = make_store(server.url() + "?key=v", token_file=token_file)
    assert check(store, "bob@example.org", USERS["bob@example.org"], meta=conn_meta()).ok
    seen = server.api.seen[0]
    assert seen.json() == {
        "authz": "bob@example.org",
        "authc": "bob@example.org",
        "password": "hunter2 ü",
        "client_ip": "2001:db8::7",
        "listener": "127.0.0.1:587",
        "secured": True,
    }
    assert seen.headers[b"content-type"] == [b"application/json"]
    assert seen.headers[b"authorization"] == [f"Bearer {TOKEN}".encode()]
    assert seen.headers[b"user-agent"][0].startswith(b"kumoauth/")

    # no conn_meta: nulls and false; no token: no Authorization header
    plain = make_store(server.url())
    assert check(plain, "bob@example.org", USERS["bob@example.org"]).ok
    assert server.api.seen[1].json() == {
        "authz": "bob@example.org",
        "authc": "bob@example.org",
        "password": "hunter2 ü",
        "client_ip": None,
        "listener": None,
        "secured": False,
    }
    assert b"authorization" not in server.api.seen[1].headers


@pytest.mark.parametrize(
    "authc",
    [
        'alice@example.org", "ok": true, "x": "',
        "alice@example.org\r\nAuthorization: Bearer forged",
        "alice\\@example.org",
        "\u2028alice\x00@example.org",
        "ålice@exämple.org",
    ],
)
def test_injection_attempts_arrive_as_plain_values(server, make_store, authc):
    password = 'p"w\\" } ]\r\n' + PASSWORD
    assert check(make_store(server.url()), authc, password) is DENIED
    body = server.api.seen[0].json()
    assert (body["authc"], body["authz"], body["password"]) == (authc, authc, password)
    assert b"forged" not in b"".join(v for vs in server.api.seen[0].headers.values() for v in vs)


def test_connections_are_reused(server, make_store):
    store = make_store(server.url(), max_connections=2)
    for _ in range(5):
        assert check(store, "alice@example.org", PASSWORD).ok
    assert len(server.api.seen) == 5
    assert server.connections == 1


def test_cookies_are_not_kept(server, make_store):
    def with_cookie(request: Request, body: dict[str, Any]) -> bytes:
        request.addCookie(b"session", b"from-" + body["authc"].encode(), path=b"/")
        return users_answer(request, body)

    server.api.respond = with_cookie
    store = make_store(server.url())
    check(store, "alice@example.org", PASSWORD)
    check(store, "bob@example.org", USERS["bob@example.org"])
    assert [b"cookie" in s.headers for s in server.api.seen] == [False, False]


def test_a_kept_alive_connection_closed_unanswered_is_retried_once(server, make_store):
    first_connection: list[int] = []

    def close_second_on_first(request: Request, body: dict[str, Any]) -> Any:
        if not first_connection:
            first_connection.append(id(request.channel))
        elif id(request.channel) == first_connection[0]:
            request.channel.transport.abortConnection()  # as if its keep-alive ran out
            return NOT_DONE_YET
        return users_answer(request, body)

    server.api.respond = close_second_on_first
    store = make_store(server.url())
    assert check(store, "alice@example.org", PASSWORD).ok
    assert check(store, "alice@example.org", PASSWORD).ok
    assert len(server.api.seen) == 3
    assert server.connections == 2

    def always_close(request: Request, body: Any) -> Any:
        request.channel.transport.abortConnection()
        return NOT_DONE_YET

    server.api.respond = always_close
    assert "closed before any answer" in backend_error(store)
    assert len(server.api.seen) == 5  # one retry, not more


# --------------------------------------------------------------------------
# the deadline, outages


def test_a_slow_api_times_out_and_the_request_is_cancelled(server, make_store):
    server.api.respond = lambda request, body: NOT_DONE_YET
    store = make_store(server.url(), timeout=0.3)
    started = time.monotonic()
    assert "no answer within 0.3 s" in backend_error(store)
    assert time.monotonic() - started < 2
    wait_for(lambda: server.api.lost == [0])  # the request was dropped, not left hanging


def test_a_caller_that_gives_up_cancels_without_an_outage(server, reactor, make_store):
    from twisted.internet import defer

    server.api.respond = lambda request, body: NOT_DONE_YET
    checker = StoreChecker(make_store(server.url()), clock=reactor)
    creds = PlainCredentials("", "alice@example.org", PASSWORD, ConnMeta())
    pending = []
    in_reactor(lambda: pending.append(checker.requestAvatarId(creds)))
    wait_for(lambda: len(server.api.seen) == 1)
    with pytest.raises(defer.CancelledError):
        in_reactor(lambda: (pending[0].cancel(), pending[0])[1])
    assert checker.health.down is None
    wait_for(lambda: server.api.lost == [0])


def test_a_caller_that_gives_up_during_the_name_lookup_is_no_outage(
    reactor, make_store, silent_dns: SilentResolver
):
    # Twisted's endpoint turns a cancel during the lookup into "couldn't
    # find the hostname": that must not read as the API being down.
    url = "http://api.example.test:8080/smtp-auth"
    checker = StoreChecker(make_store(url, allow_plaintext=True), clock=reactor)
    creds = PlainCredentials("", "alice@example.org", PASSWORD, ConnMeta())
    pending: list[Any] = []
    in_reactor(lambda: pending.append(checker.requestAvatarId(creds)))
    wait_for(lambda: silent_dns.asked == ["api.example.test"])
    from twisted.internet import defer

    with pytest.raises(defer.CancelledError):
        in_reactor(lambda: (pending[0].cancel(), pending[0])[1])
    assert checker.health.down is None


def test_the_deadline_during_the_name_lookup_is_an_outage(make_store, silent_dns):
    store = make_store("http://api.example.test:8080/", allow_plaintext=True, timeout=0.3)
    assert "no answer within 0.3 s" in backend_error(store)


def test_the_deadline_covers_a_body_that_never_ends(server, make_store):
    def trickle(request: Request, body: Any) -> Any:
        request.setResponseCode(200)
        request.write(b'{"ok": true, "meta": {"slow": "')
        return NOT_DONE_YET

    server.api.respond = trickle
    assert "no answer within 0.3 s" in backend_error(make_store(server.url(), timeout=0.3))
    wait_for(lambda: server.api.lost == [0])


def test_down_then_back_logs_one_line_each(reactor, make_store, captured_log):
    server = Server(reactor)
    server.start()
    checker = StoreChecker(make_store(server.url()), clock=reactor)

    def attempt() -> Any:
        creds = PlainCredentials("", "alice@example.org", PASSWORD, ConnMeta())
        return in_reactor(checker.requestAvatarId, creds)

    assert attempt() == "alice@example.org"
    server.stop()
    for _ in range(3):
        with pytest.raises(BackendUnavailable, match="connection refused"):
            attempt()
    server.start()  # the same port again
    assert attempt() == "alice@example.org"
    assert attempt() == "alice@example.org"
    server.stop()

    lines = [e for e in captured_log.namespace("kumoauth.backends")]
    texts = [e["log_format"] for e in lines]
    assert len(lines) == 2, texts
    assert "unavailable" in texts[0] and "connection refused" in lines[0]["reason"]
    assert "available again" in texts[1] and lines[1]["n"] == 3
    assert PASSWORD not in captured_log.text()


def test_nothing_listening_is_a_backend_error(make_store):
    from tests.server import free_port

    store = make_store(f"http://127.0.0.1:{free_port()}/")
    assert "connection refused" in backend_error(store)


def test_an_outage_logs_one_line_and_nothing_per_attempt(reactor, make_store, captured_log):
    # Nothing listening: every AUTH attempt opens (and fails) a connection
    # of the pool.  The whole log is the one "unavailable" line: no Twisted
    # "Starting factory" / "Stopping factory" per attempt.
    from tests.server import free_port

    store = make_store(f"http://127.0.0.1:{free_port()}/smtp-auth")
    checker = StoreChecker(store, clock=reactor)
    creds = PlainCredentials("", "alice@example.org", PASSWORD, ConnMeta())
    for _ in range(5):
        with pytest.raises(BackendUnavailable, match="connection refused"):
            in_reactor(checker.requestAvatarId, creds)
    lines = [formatEvent(e) for e in captured_log.events]
    assert len(lines) == 1, lines
    assert "auth backend http unavailable" in lines[0], lines
    assert "connection refused" in lines[0]


# --------------------------------------------------------------------------
# TLS


def test_https_with_the_configured_ca(tls_server, make_store, ca_file):
    store = make_store(tls_server.url(), ca_file=ca_file)
    assert check(store, "alice@example.org", PASSWORD).ok
    assert check(store, "alice@example.org", "nope") is DENIED
    assert tls_server.connections == 1
    localhost = make_store(tls_server.url(host="localhost"), ca_file=ca_file)
    assert check(localhost, "alice@example.org", PASSWORD).ok


def test_https_with_another_ca_is_a_backend_error(tls_server, make_store, tmp_path):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    message = backend_error(make_store(tls_server.url(), ca_file=other))
    assert "TLS" in message and "certificate verify failed" in message
    assert tls_server.api.seen == []


def test_https_verifies_the_host_name(reactor, ca, ca_file, make_store):
    server = Server(reactor, tls=tls_options(ca, "auth.example.net"))
    server.start()
    try:
        assert "TLS" in backend_error(make_store(server.url(), ca_file=ca_file))
        assert server.api.seen == []
    finally:
        server.stop()


def test_the_system_trust_store_does_not_know_a_private_ca(tls_server, make_store):
    assert "TLS" in backend_error(make_store(tls_server.url()))


def test_ipv6_loopback(reactor, make_store):
    server = Server(reactor, interface="::1")
    try:
        server.start()
    except Exception as e:  # no IPv6 in this container
        pytest.skip(f"cannot listen on ::1: {e}")
    try:
        assert check(make_store(server.url()), "alice@example.org", PASSWORD).ok
    finally:
        server.stop()


# --------------------------------------------------------------------------
# secrets


def test_no_password_or_token_in_logs_errors_or_reprs(server, make_store, tmp_path, captured_log):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)

    def echo(request: Request, body: Any) -> bytes:
        # an error page that echoes the request, password included
        return answer(request, 500, request.content.getvalue())

    server.api.respond = echo
    config = validate({"url": server.url(), "token_file": str(token_file)})
    store = make_store(server.url() + "?apikey=QUERY-SECRET", token_file=token_file)
    checker = StoreChecker(store, clock=server.reactor)
    creds = PlainCredentials("", "alice@example.org", PASSWORD, ConnMeta())
    with pytest.raises(BackendUnavailable) as e:
        in_reactor(checker.requestAvatarId, creds)
    server.api.respond = lambda req, body: answer(req, 200, b"not json " + PASSWORD.encode())
    with pytest.raises(BackendUnavailable) as e2:
        in_reactor(checker.requestAvatarId, creds)
    shown = "\n".join(
        [captured_log.text(), str(e.value), str(e2.value), repr(store), repr(config), repr(checker)]
    )
    assert captured_log.namespace("kumoauth.backends"), "the outage was logged"
    assert PASSWORD not in shown
    assert TOKEN not in shown
    assert "QUERY-SECRET" not in shown  # the URL is shown without its query
    assert server.url() in str(e.value)


def test_a_rotated_token_is_read_again_without_a_reload(server, make_store, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first")
    store = make_store(server.url(), token_file=token_file)
    assert check(store, "alice@example.org", PASSWORD).ok
    replacement = tmp_path / "token.new"
    replacement.write_text("second-token")
    replacement.rename(token_file)  # how a secret is rotated: a new file renamed
    assert check(store, "alice@example.org", PASSWORD).ok
    token_file.write_text("not a token\n")
    assert f"token_file: {token_file}: not a bearer token" in backend_error(store)
    token_file.unlink()
    assert f"token_file: {token_file}" in backend_error(store)
    token_file.write_text("third")
    assert check(store, "alice@example.org", PASSWORD).ok
    assert [s.headers[b"authorization"] for s in server.api.seen] == [
        [b"Bearer first"],
        [b"Bearer second-token"],
        [b"Bearer third"],
    ]


def test_an_unusable_token_file_names_the_file_not_the_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("not a token: has spaces\n")
    with pytest.raises(ValueError) as e:
        validate({"url": "https://auth.example.net/", "token_file": str(token_file)})
    assert str(token_file) in str(e.value) and "spaces" not in str(e.value)


# --------------------------------------------------------------------------
# configuration and lifecycle


def test_reload_takes_a_new_token_and_closes_the_old_connections(server, make_store, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first")
    store = make_store(server.url(), token_file=token_file)
    assert check(store, "alice@example.org", PASSWORD).ok
    token_file.write_text("second")
    in_reactor(store.reload, validate({"url": server.url(), "token_file": str(token_file)}))
    assert check(store, "alice@example.org", PASSWORD).ok
    assert [s.headers[b"authorization"] for s in server.api.seen] == [
        [b"Bearer first"],
        [b"Bearer second"],
    ]
    assert server.connections == 2
    wait_for(lambda: server.site.transports()[0].disconnected)

    with pytest.raises(ValueError, match="token_file"):
        in_reactor(store.reload, Config(url=server.url(), token_file=tmp_path / "missing"))
    assert check(store, "alice@example.org", PASSWORD).ok  # what was, still is
    assert server.api.seen[-1].headers[b"authorization"] == [b"Bearer second"]


def test_a_request_under_way_during_a_reload_ends_and_its_connection_closes(
    server, make_store, reactor
):
    held: list[Request] = []

    def hold(request: Request, body: dict[str, Any]) -> Any:
        held.append(request)
        return NOT_DONE_YET

    server.api.respond = hold
    store = make_store(server.url(), timeout=1.5)
    pending = []
    in_reactor(lambda: pending.append(store.check("", "alice@example.org", PASSWORD, None)))
    wait_for(lambda: len(held) == 1)
    in_reactor(store.reload, validate({"url": server.url(), "timeout": 1.5}))

    def release() -> None:
        held[0].write(json.dumps({"ok": True}).encode())
        held[0].finish()

    in_reactor(release)
    wait_for(lambda: pending[0].called)
    assert in_reactor(lambda: pending[0]) == Verdict(True, {})
    # back in the retired pool for a moment, then closed
    wait_for(lambda: server.site.transports()[0].disconnected, seconds=5)


def test_stop_closes_the_connections(server, make_store):
    store = make_store(server.url())
    assert check(store, "alice@example.org", PASSWORD).ok
    assert not server.site.transports()[0].disconnected
    in_reactor(store.stop)
    wait_for(lambda: server.site.transports()[0].disconnected)


def test_resolve_and_build_through_the_checker_registry(server, reactor, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    spec = resolve(
        "http",
        {"http": {"url": server.url(), "token_file": "token", "timeout": 2}},
        base=tmp_path,
    )
    assert spec.config == Config(url=server.url(), timeout=2.0, token_file=tmp_path / "token")
    checker = in_reactor(build, spec, reactor, None)
    try:
        creds = PlainCredentials("", "alice@example.org", PASSWORD, ConnMeta())
        assert in_reactor(checker.requestAvatarId, creds) == "alice@example.org"
    finally:
        in_reactor(checker.stop)


def test_from_argstring_is_the_url():
    assert from_argstring("https://auth.example.net/smtp") == Config(
        url="https://auth.example.net/smtp"
    )
    assert factory.validate is validate  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "raw,problem",
    [
        ({}, "url: required key is missing"),
        ({"url": "ftp://auth.example.net/"}, "url: must start with"),
        ({"url": "https:///path"}, "url: has no host"),
        ({"url": "https://u:p@auth.example.net/"}, "url: must not contain a user"),
        ({"url": "https://auth.example.net:99999/"}, "url: not a URL"),
        # refused at each request by Twisted (a traceback per AUTH) otherwise
        ({"url": "http://127.0.0.1/auth?key=Se cret"}, "url: spaces and control"),
        ({"url": "http://127.0.0.1/a\tb"}, "url: spaces and control"),
        ({"url": "http://auth.example.net/"}, "allow_plaintext"),
        ({"url": "http://127.0.0.1/", "ca_file": "/x.pem"}, "ca_file: only for an https"),
        ({"url": "https://a.example/", "timeout": 0}, "timeout: must be at least 0.1"),
        ({"url": "https://a.example/", "max_connections": 0}, "max_connections: must be"),
        ({"url": "https://a.example/", "allow_plaintext": "yes"}, "allow_plaintext: expected"),
        ({"url": "https://a.example/", "token_file": "/nonexistent"}, "token_file: /nonexist"),
        ({"url": "https://a.example/", "ca_file": "/nonexistent"}, "ca_file: /nonexistent"),
        ({"url": "https://a.example/", "retries": 3}, "retries: unknown key"),
    ],
)
def test_validate_refuses(raw, problem):
    with pytest.raises(ValueError) as e:
        validate(raw)
    assert problem in str(e.value)
    assert "\n" not in str(e.value)


def test_validate_accepts_and_resolves_paths(tmp_path, ca_file):
    (tmp_path / "tok").write_text(TOKEN)
    config = validate(
        {"url": "https://auth.example.net/smtp", "ca_file": ca_file.name, "token_file": "tok"},
        base=ca_file.parent,
    )
    assert config.ca_file == ca_file and config.token_file == tmp_path / "tok"
    assert validate({"url": "http://auth.example.net/", "allow_plaintext": True}).allow_plaintext
    for loopback in ("http://127.0.0.1:8080/", "http://[::1]:8080/", "http://localhost/"):
        assert validate({"url": loopback}).url == loopback


def test_a_ca_file_without_certificates_is_refused(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        validate({"url": "https://a.example/", "ca_file": str(bad)})


def test_request_within_answers_once_when_the_work_ignores_a_cancel(reactor):
    # Work that swallows the cancellation and ends later (a shared helper
    # must not rely on every Agent path failing at once): the caller gets
    # CancelledError once, the late end goes nowhere, nothing unhandled.
    from twisted.internet import defer, task

    from kumoauth.backends.http import request_within

    clock = task.Clock()
    later: defer.Deferred[None] = defer.Deferred()

    async def stubborn() -> str:
        try:
            await defer.Deferred()
        except defer.CancelledError:
            await later
        return "late"

    d = request_within(stubborn(), 5.0, clock, "api")
    d.cancel()
    failures: list[Any] = []
    d.addErrback(failures.append)
    later.callback(None)
    assert len(failures) == 1 and failures[0].check(defer.CancelledError)
    assert not clock.getDelayedCalls()
