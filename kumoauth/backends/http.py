"""
An HTTP auth API as credential store: each attempt is one JSON POST.

The request (``Content-Type: application/json``)::

    {"authz": "...", "authc": "...", "password": "...",
     "client_ip": "192.0.2.1" | null, "listener": "..." | null, "secured": true}

and what the answer means:

- ``200 {"ok": true, "meta": {...}}``: accepted (235); ``meta``, a JSON
  object, is merged into conn_meta;
- ``200 {"ok": false}``, ``401`` or ``403``: refused (535);
- anything else (another status, a redirect, a body that is not such an
  object or is larger than :data:`MAX_BODY`, no answer within ``timeout``,
  a connection or TLS failure): the API cannot answer, :class:`BackendError`
  (454).

The API judges proxy authorization itself: authz ≠ authc is sent as is.
The request carries the user's password, so ``http://`` is refused to
anything but the loopback unless ``allow_plaintext`` says otherwise, and
``https://`` always verifies the certificate and the host name.

Everything runs on the reactor (treq over Twisted's Agent) with a pool of
persistent connections: no threads, and a connection is reused from one
attempt to the next.  A policy may use the store directly::

    from kumoauth.backends.http import HTTP
    api = HTTP("https://auth.example.net/smtp", token_file="/etc/kumoauth/api-token")
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import stat
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import treq.client
from hyperlink import EncodedURL
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from treq.cookies import IndexableCookieJar
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

import kumoauth
from kumoauth.backends.base import (
    DENIED,
    BackendError,
    ICredentialStore,
    StoreChecker,
    Verdict,
    client_ip,
    default_reactor,
    listener_address,
    parse_table,
    read_secret_file,
    secured,
)
from kumoauth.checks import _LOOPBACK, _bool, _int, _number, _str
from kumoauth.meta import MAX_DEPTH, too_deep
from kumoauth.tls.trust import trust_root

#: Largest response body read (bytes); a larger one is the API misbehaving.
MAX_BODY = 64 * 1024

#: An RFC 6750 §2.1 bearer token (b64token), so it cannot break the header.
_BEARER = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class Config:
    """
    ``[auth.http]``.  The token file and the CA file are read when the
    store is made (and on reload; the token also when its file changes);
    their content is never kept here, so a repr shows no secret.
    """

    url: str
    timeout: float = 5.0
    ca_file: Path | None = None
    token_file: Path | None = None
    max_connections: int = 10
    allow_plaintext: bool = False


SCHEMA: dict[str, Callable[[Any], Any]] = {
    "url": _str,
    "timeout": _number(0.1),
    "ca_file": _str,
    "token_file": _str,
    "max_connections": _int(1),
    "allow_plaintext": _bool,
}


def validate(raw: Mapping[str, Any], base: Path | None = None) -> Config:
    """
    ``[auth.http]`` as a :class:`Config`; relative paths are against *base*.
    The URL is checked, and the CA and token files are read once, so that a
    mistake in them stops start-up (or a reload) instead of failing every
    attempt.  ``ValueError`` with one line, ``key: problem``.
    """
    config: Config = parse_table(
        Config, raw, SCHEMA, required=("url",), paths=("ca_file", "token_file"), base=base
    )
    _check_url(config)
    _ready_url(config.url)
    if config.token_file is not None:
        _Token(config.token_file)
    trust_root(config.ca_file)
    return config


def from_argstring(arg: str) -> Config:
    """
    The configuration of ``twistd kumoauth --auth http:<arg>``: *arg* is the
    API's URL (``http:https://auth.example.net/smtp``); every other key
    takes its default (no token, the system's CAs).
    """
    return validate({"url": arg})


def factory(config: Config, reactor: Any, pool: Any, metrics: Any = None) -> StoreChecker:
    """
    The ``[auth] checker = "http"`` checker.  *pool* is not used: nothing
    here blocks.
    """
    return StoreChecker(HTTP.from_config(config, reactor=reactor), clock=reactor, metrics=metrics)


factory.validate = validate  # type: ignore[attr-defined]


def _check_url(config: Config) -> None:
    if any(c.isspace() or not c.isprintable() for c in config.url):
        # Twisted refuses such a URI at each request (a traceback per AUTH).
        raise ValueError("url: spaces and control characters are not allowed (percent-encode them)")
    try:
        parts = urlsplit(config.url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"url: not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f'url: must start with "https://" or "http://", got "{parts.scheme}:"')
    if not parts.hostname:
        raise ValueError("url: has no host")
    if parts.username is not None or parts.password is not None:
        # Agent would not send them, and the URL is written in logs.
        raise ValueError("url: must not contain a user or password (use token_file)")
    if port == 0:
        raise ValueError("url: port 0")
    if parts.scheme == "http":
        if parts.hostname not in _LOOPBACK and not config.allow_plaintext:
            raise ValueError(
                f"url: http:// sends every password in clear to {parts.hostname}: "
                "use https://, http:// only to 127.0.0.1 / ::1, or set allow_plaintext = true"
            )
        if config.ca_file is not None:
            raise ValueError("ca_file: only for an https:// url")


def _read_token(path: Path | None) -> str | None:
    token = read_secret_file(path, "token_file")
    if token is not None and not _BEARER.fullmatch(token):
        raise ValueError(
            f"token_file: {path}: not a bearer token (letters, digits and -._~+/ then any =)"
        )
    return token


class _Token:
    """
    The bearer token in *path*, read again whenever the file's stat
    changes.  A SIGHUP reaches the store only when ``[auth.http]`` itself
    changed, so a token rotated under the same path would otherwise never
    be seen.  The stat is one syscall per attempt on the reactor thread
    (an HTTP request costs far more); the file, one short line, is read
    only when it changed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp = self._stamp()
        token = _read_token(path)
        assert token is not None
        self.value = token

    def _stamp(self) -> tuple[int, int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise ValueError(f"token_file: {self.path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"token_file: {self.path}: not a regular file")
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> str:
        """
        The token now; :class:`BackendError` (naming the file, never its
        content) when the file is gone or no longer holds a token.
        """
        try:
            stamp = self._stamp()
            if stamp != self.stamp:
                token = _read_token(self.path)
                assert token is not None
                self.value, self.stamp = token, stamp
        except ValueError as e:
            raise BackendError(str(e)) from None
        return self.value


class _ReadyURL(EncodedURL):  # type: ignore[misc]
    """
    A URL already in its wire form.  treq turns every URL it gets into a
    URI with IDNA applied to the host, which fails for an IPv6 literal
    (python-hyper/hyperlink#68); this one is made once, with IDNA applied
    to a host name only, and stays as it is.
    """

    def to_uri(self) -> EncodedURL:
        return self


def _ready_url(url: str) -> EncodedURL:
    try:
        parsed = EncodedURL.from_text(url)
        if not _is_ip(parsed.host):
            parsed = parsed.to_uri()  # a host name in IDNA, the path percent-encoded
        ready: EncodedURL = _ReadyURL.from_text(parsed.to_text())
    except (ValueError, UnicodeError) as e:  # hyperlink's and idna's errors
        raise ValueError(f"url: not a URL: {type(e).__name__}") from None
    return ready


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _where(url: str) -> str:
    """
    The URL as logged: without the query, which might carry a key.
    """
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class _QuietHTTP11ClientFactory(web_client._HTTP11ClientFactory):
    """
    The factory of a pool's connections, without Twisted's "Starting
    factory" / "Stopping factory" line per connection: while the server is
    down that is two lines per attempt, when the owner's health log says
    it once.
    """

    noisy = False


class QuietConnectionPool(web_client.HTTPConnectionPool):
    """
    An ``HTTPConnectionPool`` whose connections log nothing by themselves
    (the HTTP store and the OAuth validator log their outages once).
    """

    _factory = _QuietHTTP11ClientFactory


class _Client:
    """
    One configuration's connections: the treq client over an Agent whose
    pool keeps up to ``max_connections`` idle connections per host.  A
    reload makes a new one and retires the old.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.where = _where(config.url)
        self.url = _ready_url(config.url)
        self.token = _Token(config.token_file) if config.token_file is not None else None
        trust = trust_root(config.ca_file)
        self.pool = QuietConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = config.max_connections
        agent = web_client.Agent(
            reactor,
            contextFactory=web_client.BrowserLikePolicyForHTTPS(trustRoot=trust),
            connectTimeout=config.timeout,
            pool=self.pool,
        )
        # A cookie one user's answer set must not ride along with the next
        # user's request: the jar's policy accepts none.
        jar = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self.http = treq.client.HTTPClient(agent, cookiejar=jar)
        self.headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Accept": [b"application/json"],
                b"User-Agent": [f"kumoauth/{kumoauth.__version__}".encode()],
            }
        )

    def request_headers(self) -> Headers:
        """
        This request's headers (a copy: treq and its agents add to them).
        """
        headers = self.headers.copy()
        if self.token is not None:
            headers.setRawHeaders(b"Authorization", [f"Bearer {self.token.current()}".encode()])
        return headers

    def retire(self, reactor: IReactorTime) -> defer.Deferred[None]:
        """
        Close the idle connections now, and again once every request still
        under way on them must have ended (each is bounded by ``timeout``).
        """
        reactor.callLater(self.config.timeout + 1, self.pool.closeCachedConnections)
        d: defer.Deferred[None] = self.pool.closeCachedConnections()
        return d

    def __repr__(self) -> str:
        return f"<http client {self.where}>"


class _TooBig(Exception):
    pass


class _Body(protocol.Protocol):
    """
    Reads a response body up to *limit* bytes; past that (or when the
    caller gives up) the connection is closed instead of read to its end.
    """

    def __init__(self, limit: int, expected: Any) -> None:
        self.limit = limit
        self.expected = expected
        self.size = 0
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        if isinstance(self.expected, int) and self.expected > self.limit:
            self._too_big()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._too_big()
            return
        self.chunks.append(data)

    def _too_big(self) -> None:
        self.chunks.clear()
        self._close()
        self.done.errback(_TooBig())

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(web_client.ResponseDone, web_client.PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)

    def _cancel(self, d: defer.Deferred[bytes]) -> None:
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


def _read_body(response: IResponse) -> defer.Deferred[bytes]:
    body = _Body(MAX_BODY, response.length)
    response.deliverBody(body)
    return body.done


#: A connection closed before any answer: on a kept-alive connection the
#: server may close it just as the request goes out, and Agent retries only
#: idempotent requests.  Such a failure gets one more try.
_RETRYABLE = (
    web_client.ResponseNeverReceived,
    web_client.RequestNotSent,
    web_client.RequestTransmissionFailed,
)
_CLOSED = (error.ConnectionDone, error.ConnectionLost)


def _closed_unanswered(e: Exception) -> bool:
    if isinstance(e, web_client.RequestNotSent):
        return True
    if not isinstance(e, _RETRYABLE):
        return False
    reasons = getattr(e, "reasons", [])
    return bool(reasons) and all(r.check(*_CLOSED) for r in reasons)


def _cancelled(e: BaseException) -> bool:
    """
    Whether *e* is a cancellation, as such or as Agent reports one.
    """
    if isinstance(e, defer.CancelledError | error.ConnectingCancelledError):
        return True
    if isinstance(e, web_client.ResponseFailed | web_client.RequestTransmissionFailed):
        return any(r.check(defer.CancelledError) for r in e.reasons)
    return False


def _reason(e: BaseException) -> str | None:
    """
    What went wrong talking to the API, for the log; None for anything not
    a network or TLS failure (a bug).
    """
    if isinstance(e, web_client.ResponseFailed | web_client.RequestTransmissionFailed):
        inner = [r.value for r in e.reasons if not r.check(*_CLOSED)]
        if inner:
            described = _reason(inner[0])
            return described if described is not None else type(inner[0]).__name__
        if isinstance(e, web_client.ResponseNeverReceived):
            return "the connection was closed before any answer"
        return "the connection was closed during the answer"
    if isinstance(e, web_client.RequestNotSent):
        return "the connection was closed before the request was sent"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError | error.TCPTimedOutError):
        return "connecting timed out"
    if isinstance(e, error.DNSLookupError):
        return "host name lookup failed"
    if isinstance(e, error.ConnectError | error.ConnectionLost | error.ConnectionDone):
        return f"{type(e).__name__}: {e}"
    if isinstance(e, SSL.Error):
        return f"TLS: {_tls_text(e)}"
    if isinstance(e, VerificationError | CertificateError):
        return "TLS: the certificate is not for the URL's host"
    return None


def _tls_text(e: BaseException) -> str:
    """
    pyOpenSSL's error as text: the reason strings of its queue.
    """
    args = e.args[0] if e.args else None
    if isinstance(args, list):
        parts = [item[-1] for item in args if isinstance(item, tuple) and item]
        if parts:
            return "; ".join(str(p) for p in parts)
    return type(e).__name__


@implementer(ICredentialStore)
class HTTP:
    """
    An HTTP auth API (see the module's docstring for the exchange).
    *pool* is accepted like every store's and not used: nothing blocks.
    """

    name = "http"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        ca_file: str | Path | None = None,
        token_file: str | Path | None = None,
        max_connections: int = 10,
        allow_plaintext: bool = False,
        reactor: Any = None,
        pool: Any = None,
    ) -> None:
        raw: dict[str, Any] = {
            "url": url,
            "timeout": timeout,
            "max_connections": max_connections,
            "allow_plaintext": allow_plaintext,
        }
        if ca_file is not None:
            raw["ca_file"] = str(ca_file)
        if token_file is not None:
            raw["token_file"] = str(token_file)
        self._setup(validate(raw), reactor)

    @classmethod
    def from_config(cls, config: Config, reactor: Any = None) -> HTTP:
        store = cls.__new__(cls)
        store._setup(config, reactor)
        return store

    def _setup(self, config: Config, reactor: Any) -> None:
        self.reactor = default_reactor(reactor)
        self._client = _Client(config, self.reactor)

    @property
    def config(self) -> Config:
        return self._client.config

    def subscribe(self, listener: Callable[[], None]) -> None:
        """
        The API gives no notice of changes: nothing to subscribe to.
        """

    def check(
        self, authz: str, authc: str, password: str, conn_meta: Any = None
    ) -> defer.Deferred[Verdict]:
        if not authc or not password:
            return defer.succeed(DENIED)
        client = self._client
        body = json.dumps(
            {
                "authz": authz or authc,
                "authc": authc,
                "password": password,
                "client_ip": client_ip(conn_meta),
                "listener": listener_address(conn_meta),
                "secured": secured(conn_meta),
            }
        ).encode("utf-8")
        return request_within(
            self._ask(client, body), client.config.timeout, self.reactor, client.where
        )

    async def _ask(self, client: _Client, body: bytes) -> Verdict:
        try:
            response = await self._post(client, body)
        except Exception as e:
            if not _closed_unanswered(e):
                raise
            response = await self._post(client, body)
        code = response.code
        try:
            data = await _read_body(response)
        except _TooBig:
            raise BackendError(
                f"{client.where}: HTTP {code} with a body over {MAX_BODY} bytes"
            ) from None
        if code in (401, 403):
            return DENIED
        if code != 200:
            # The body is not logged: an API's error page may echo the
            # request, password included.
            what = "a redirect, not followed" if 300 <= code < 400 else "expected 200, 401 or 403"
            raise BackendError(f"{client.where}: HTTP {code} ({what})")
        return _verdict(client.where, data)

    def _post(self, client: _Client, body: bytes, url: Any = None) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = client.http.post(
            client.url if url is None else url,
            data=body,
            headers=client.request_headers(),
            allow_redirects=False,
            unbuffered=True,
            reactor=self.reactor,
        )
        return d

    # -- other requests (sender binding) ---------------------------------

    def post_json(self, payload: Mapping[str, Any], path: str = "") -> defer.Deferred[Any]:
        """
        One JSON POST of *payload* to the store's URL with *path* appended
        to its path (``"senders"``: ``https://auth.example.net/smtp`` →
        ``.../smtp/senders``), with the same token, CA, connections and
        ``timeout`` as authentication: the decoded JSON of a ``200`` answer.
        Anything else (another status, a body that is not JSON or is over
        :data:`MAX_BODY`, no answer, a network or TLS failure) is a
        :class:`BackendError`.
        """
        client = self._client
        where = client.where
        url = client.url
        if path:
            parts = urlsplit(client.config.url)
            joined = parts._replace(path=parts.path.rstrip("/") + "/" + path.lstrip("/"))
            url = _ready_url(joined.geturl())
            where = _where(joined.geturl())
        body = json.dumps(payload).encode("utf-8")
        work = self._ask_json(client, url, where, body)
        return request_within(work, client.config.timeout, self.reactor, where)

    async def _ask_json(self, client: _Client, url: Any, where: str, body: bytes) -> Any:
        try:
            response = await self._post(client, body, url)
        except Exception as e:
            if not _closed_unanswered(e):
                raise
            response = await self._post(client, body, url)
        code = response.code
        try:
            data = await _read_body(response)
        except _TooBig:
            raise BackendError(f"{where}: HTTP {code} with a body over {MAX_BODY} bytes") from None
        if code != 200:
            what = "a redirect, not followed" if 300 <= code < 400 else "expected 200"
            raise BackendError(f"{where}: HTTP {code} ({what})")
        return _json_body(where, data)

    def start(self) -> None:
        return None

    def reload(self, config: Config) -> defer.Deferred[None]:
        """
        Take the new table: new connections (a new CA, token or URL applies
        to the next attempt), the old ones closed once idle.  A file that
        cannot be read raises ``ValueError`` and keeps what was.
        """
        old, self._client = self._client, _Client(config, self.reactor)
        return old.retire(self.reactor)

    def stop(self) -> defer.Deferred[None]:
        return self._client.retire(self.reactor)

    def __repr__(self) -> str:
        return f"<HTTP {self._client.where}>"


def _as_backend_error(f: Failure, where: str) -> Any:
    """
    A request's failure as :class:`BackendError` naming *where* and the
    network or TLS cause; a cancellation stays one (not by the deadline,
    which says so itself: not an outage); anything else (a bug) as it is,
    to be logged with its traceback.
    """
    if f.check(BackendError):
        return f
    if f.value is not None and _cancelled(f.value):
        raise defer.CancelledError()
    reason = _reason(f.value) if isinstance(f.value, Exception) else None
    if reason is None:
        return f
    raise BackendError(f"{where}: {reason}")


def request_within(
    work: Coroutine[Any, Any, Any], timeout: float, reactor: Any, where: str
) -> defer.Deferred[Any]:
    """
    *work* (a request to *where* and its answer) under one deadline for
    connecting, the answer and its body (reaching it cancels the request,
    which closes its connection: "no answer within"), its network and TLS
    failures as :class:`BackendError` naming *where*.  A caller that
    cancels gets :class:`~twisted.internet.defer.CancelledError`, whatever
    the cancellation became on its way out of Agent (during the host name
    lookup Twisted's endpoint turns it into a lookup failure): the caller
    gave up, the server is not down.
    """

    def timed_out(result: Any, seconds: float) -> Any:
        # whatever failure the cancellation became on its way out of Agent
        raise BackendError(f"{where}: no answer within {seconds:g} s")

    inner = defer.Deferred.fromCoroutine(work)
    inner.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
    gave_up = False

    def cancel(_: defer.Deferred[Any]) -> None:
        nonlocal gave_up
        gave_up = True
        inner.cancel()

    def give_up_or_fail(f: Failure) -> Any:
        if gave_up:
            raise defer.CancelledError()
        return _as_backend_error(f, where)

    def forward(result: Any) -> None:
        # Once: a cancel that *inner* did not answer at once has already
        # failed *outer* with CancelledError.
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

    outer: defer.Deferred[Any] = defer.Deferred(cancel)
    inner.addErrback(give_up_or_fail).addBoth(forward)
    return outer


def _verdict(where: str, data: bytes) -> Verdict:
    """
    The verdict in a 200 answer's body, or :class:`BackendError` saying
    what is wrong with it (never quoting it).
    """
    answer = _json_body(where, data)
    if not isinstance(answer, dict):
        raise BackendError(f"{where}: HTTP 200 with JSON that is not an object")
    ok = answer.get("ok")
    if not isinstance(ok, bool):
        raise BackendError(f'{where}: HTTP 200 without "ok": true or false')
    if not ok:
        return DENIED
    meta = answer.get("meta")
    if meta is None:
        return Verdict(True, {})
    if not isinstance(meta, dict):
        raise BackendError(f'{where}: HTTP 200 with "meta" that is not a JSON object')
    if too_deep(meta, MAX_DEPTH + 1):
        # set_meta would refuse the value later, as a bug on every attempt
        raise BackendError(f'{where}: HTTP 200 with "meta" nested deeper than {MAX_DEPTH} levels')
    return Verdict(True, meta)


def _json_body(where: str, data: bytes) -> Any:
    """
    A 200 answer's body as JSON, or :class:`BackendError` saying what is
    wrong with it (never quoting it).
    """
    try:
        return json.loads(
            data.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float
        )
    except _OutOfRange:
        raise BackendError(f"{where}: HTTP 200 with a number out of range") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser goes (60 KB of "["
        # fits in MAX_BODY), an answer like any other that is not JSON
        raise BackendError(f"{where}: HTTP 200 with a body that is not JSON") from None


class _OutOfRange(ValueError):
    pass


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259 §6), and not storable meta.
    raise ValueError(name)


def _finite_float(text: str) -> float:
    # 1e400 is JSON, but as a float it is infinity: not storable meta either.
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange(text)
    return value
