"""
A scripted upstream MTA for relay tests: aiosmtpd on 127.0.0.1 (a free
port) in a thread of its own, with real TLS (STARTTLS or implicit) from a
trustme CA, AUTH PLAIN that records the SASL authzid, scripted replies per
recipient and for MAIL and DATA, optional SMTPUTF8 / 8BITMIME / SIZE / DSN,
and a record of every session and every message exactly as it arrived
(with its MAIL and RCPT command lines as they came).

    with running_upstream(rcpt_replies={"b@example.net": "550 5.1.1 no such user"}) as up:
        ...  # relay to 127.0.0.1:up.port, trusting up.ca
        assert up.messages[0].data == b"..."

Also here: :func:`in_reactor`, which runs a function on the Twisted reactor
(started once in a background thread, since pytest is not trial) and waits
for its result.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import concurrent.futures
import contextlib
import functools
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

DEFAULT_USERS = {"kumoauth": "relay-secret"}


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass
class SessionRecord:
    """One connection to the upstream."""

    peer: Any = None
    #: every command verb, in order, with whether TLS was up when it came
    commands: list[tuple[str, bool]] = field(default_factory=list)
    ehlo: list[str] = field(default_factory=list)
    tls_version: str | None = None
    auth_attempts: int = 0
    authc: str | None = None
    authzid: str | None = None
    messages: int = 0
    mails: int = 0
    #: the current transaction's MAIL and RCPT command lines, from its MAIL
    #: on, as they arrived (the verb as aiosmtpd upper-cases it, the rest
    #: untouched, DSN parameters included): each Received keeps its own
    transaction: list[str] = field(default_factory=list)

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.commands]

    def plaintext_verbs(self) -> list[str]:
        return [verb for verb, tls in self.commands if not tls]


@dataclass
class Received:
    """One message that reached the end of DATA."""

    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    #: the bytes after dot-unstuffing, exactly as on the wire otherwise
    data: bytes
    authc: str | None
    authzid: str | None
    tls_version: str | None
    #: the reply the upstream gave to the end of data
    reply: str
    session: SessionRecord = field(repr=False)
    #: this transaction's MAIL and RCPT command lines as they arrived (the
    #: refused RCPTs too), e.g. ``"MAIL FROM:<a@b> RET=FULL ENVID=x+2By"``
    lines: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


def _crlf(reply: str) -> str:
    """A scripted reply may be multi-line: lines separated by "\\n"."""
    return "\r\n".join(reply.splitlines())


def _tls_version(server: SMTP) -> str | None:
    transport = server.transport
    if transport is None:
        return None
    obj = transport.get_extra_info("ssl_object")
    return obj.version() if obj is not None else None


class _Handler:
    """aiosmtpd hooks; the upstream's options live on :class:`Upstream`."""

    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        record: SessionRecord = server.record  # type: ignore[attr-defined]
        record.ehlo.append(hostname)
        session.host_name = hostname
        drop = set()
        if not self.up.eightbitmime:
            drop.add("8BITMIME")
        if not self.up.starttls_offered:
            drop.add("STARTTLS")
        if not self.up.pipelining:
            drop.add("PIPELINING")
        out = [r for r in responses if r[4:].split(" ")[0].upper() not in drop]
        if self.up.pipelining:
            out.insert(1, "250-PIPELINING")
        if self.up.dsn:
            out.insert(1, "250-DSN")
        return out

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """SASL PLAIN that keeps the authzid (aiosmtpd's own drops it)."""
        record: SessionRecord = server.record  # type: ignore[attr-defined]
        record.auth_attempts += 1
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authz, authc, password = (p.decode("utf-8", "replace") for p in parts)
        if self.up.auth_reply is not None:
            return AuthResult(success=False, handled=False, message=_crlf(self.up.auth_reply))
        if self.up.users.get(authc) != password:
            return AuthResult(
                success=False, handled=False, message="535 5.7.8 Authentication credentials invalid"
            )
        record.authc = authc
        record.authzid = authz or None
        return AuthResult(success=True, auth_data=(authz, authc))

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self.up.eightbitmime and "BODY=8BITMIME" in options:
            return "555 5.5.4 BODY=8BITMIME not supported"
        reply = self.up.mail_reply or "250 2.1.0 OK"
        if self.up.mails_per_session is not None:
            record: SessionRecord = server.record  # type: ignore[attr-defined]
            record.mails += 1
            if record.mails > self.up.mails_per_session:
                reply = "421 4.7.0 Too many messages this session"
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return self._answer(server, reply)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.up.rcpt_replies.get(address, "250 2.1.5 OK")
        if self.up.max_rcpts is not None and len(envelope.rcpt_tos) >= self.up.max_rcpts:
            reply = self.up.too_many_reply
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return self._answer(server, reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        record: SessionRecord = server.record  # type: ignore[attr-defined]
        reply = self.up.data_reply or "250 2.0.0 OK queued"
        record.messages += 1
        self.up.messages.append(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                mail_options=list(envelope.mail_options),
                data=bytes(envelope.original_content or b""),
                authc=record.authc,
                authzid=record.authzid,
                tls_version=_tls_version(server),
                reply=reply,
                session=record,
                lines=list(record.transaction),
            )
        )
        return self._answer(server, reply)

    def _answer(self, server: SMTP, reply: str) -> str:
        if reply.startswith("421"):
            # A 421 is the last thing a server says.
            server.loop.call_soon(_close, server)
        return _crlf(reply)


def _close(server: SMTP) -> None:
    if server.transport is not None:
        server.transport.close()


#: RFC 3461's parameters, which aiosmtpd does not know: taken off a MAIL or
#: RCPT line (when the upstream offers DSN) before aiosmtpd parses it
_DSN_PARAMS = {"MAIL": ("RET", "ENVID"), "RCPT": ("NOTIFY", "ORCPT")}


def _without_dsn(verb: str, arg: str) -> str:
    """
    *arg* of a MAIL or RCPT line without its DSN parameters: the path ends
    at the first "> " (an xtext value may hold a ">", a path rarely "> ").
    """
    end = arg.find("> ")
    path_end = end + 1 if end >= 0 else len(arg)
    path, params = arg[:path_end], arg[path_end:].split()
    keep = [p for p in params if p.partition("=")[0].upper() not in _DSN_PARAMS[verb]]
    return " ".join([path, *keep])


class _SMTP(SMTP):
    """aiosmtpd's SMTP with a :class:`SessionRecord` and scripted misbehaviour."""

    def __init__(self, upstream: Upstream, handler: _Handler, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # "Requiring AUTH while not requiring TLS": implicit TLS (aiosmtpd
            # only knows STARTTLS as TLS) and the plaintext test mode.
            warnings.simplefilter("ignore")
            super().__init__(handler, **kwargs)
        self.upstream = upstream
        self.record = SessionRecord()
        upstream.sessions.append(self.record)
        for verb, method in list(self._smtp_methods.items()):
            self._smtp_methods[verb] = self._recording(verb, method)

    def _recording(self, verb: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def wrapper(arg: Any) -> Any:
            tls = self._tls_protocol is not None or self.upstream.tls == "implicit"
            self.record.commands.append((verb, tls))
            version = _tls_version(self)
            if version is not None:
                self.record.tls_version = version
            if verb == self.upstream.disconnect_on:
                _close(self)
                return None
            if verb == self.upstream.stall_on:
                await asyncio.sleep(3600)
                return None
            if verb in _DSN_PARAMS and arg is not None:
                line = f"{verb} {arg}"
                if verb == "MAIL":
                    self.record.transaction = []
                self.record.transaction.append(line)
                if self.upstream.dsn:
                    arg = _without_dsn(verb, arg)
            return await method(arg)

        return wrapper

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.record.peer is None:
            self.record.peer = transport.get_extra_info("peername")
        self.upstream._connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream._connections.discard(self)
        super().connection_lost(exc)


@dataclass
class Upstream:
    """
    A running scripted upstream.  The script attributes may be changed
    while it runs (between messages).
    """

    ca: trustme.CA
    tls: str = "starttls"
    users: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_USERS))
    auth_required: bool = True
    #: recipient -> reply line ("451 4.7.1 try later"); default 250
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    #: recipients taken per transaction; past it each RCPT gets too_many_reply
    max_rcpts: int | None = None
    too_many_reply: str = "452 4.5.3 Too many recipients"
    #: MAIL commands a session may give; past it MAIL gets a 421 (and the close)
    mails_per_session: int | None = None
    data_reply: str | None = None
    #: every AUTH gets this reply instead of being checked
    auth_reply: str | None = None
    smtputf8: bool = True
    eightbitmime: bool = True
    #: DSN (RFC 3461) advertised, and RET/ENVID on MAIL and NOTIFY/ORCPT on
    #: RCPT taken (and only recorded, in the lines); without it aiosmtpd
    #: refuses them with 555
    dsn: bool = False
    pipelining: bool = False
    starttls_offered: bool = True
    #: SIZE advertised and enforced; None: no SIZE extension
    size: int | None = 10 * 1024 * 1024
    #: a command verb on which the upstream drops the connection unanswered
    disconnect_on: str | None = None
    #: a command verb the upstream never answers
    stall_on: str | None = None
    hostname: str = "upstream.test"
    host: str = "127.0.0.1"
    port: int = 0
    messages: list[Received] = field(default_factory=list)
    sessions: list[SessionRecord] = field(default_factory=list)
    _connections: set[_SMTP] = field(default_factory=set, repr=False)

    def write_ca(self, path: Path) -> Path:
        """The CA certificate as PEM at *path*, for ``ca_file``."""
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def all_verbs(self) -> list[str]:
        return [verb for s in self.sessions for verb in s.verbs()]


def _server_context(ca: trustme.CA, names: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


@contextlib.contextmanager
def running_upstream(
    *,
    ca: trustme.CA | None = None,
    cert_names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    **options: Any,
) -> Iterator[Upstream]:
    """
    Run an upstream for the ``with`` block.  *options* are the fields of
    :class:`Upstream` (``tls = "starttls" | "implicit" | "none"``,
    ``users``, ``rcpt_replies``, ``data_reply``, ``smtputf8``, ``size``…).
    """
    up = Upstream(ca=ca or trustme.CA(), **options)
    if up.tls not in ("starttls", "implicit", "none"):
        raise ValueError(f"tls: {up.tls!r}")
    context = None if up.tls == "none" else _server_context(up.ca, cert_names)
    handler = _Handler(up)

    def factory() -> _SMTP:
        return _SMTP(
            up,
            handler,
            hostname=up.hostname,
            tls_context=context if up.tls == "starttls" else None,
            require_starttls=False,
            auth_required=up.auth_required,
            auth_require_tls=up.tls == "starttls",
            enable_SMTPUTF8=up.smtputf8,
            data_size_limit=up.size,
            auth_exclude_mechanism=["LOGIN"],
            loop=loop,
        )

    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[int] = concurrent.futures.Future()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                loop.create_server(
                    factory, up.host, 0, ssl=context if up.tls == "implicit" else None
                )
            )
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            ready.set_exception(e)
            return
        ready.set_result(server.sockets[0].getsockname()[1])
        loop.run_forever()
        server.close()
        for conn in list(up._connections):
            if conn.transport is not None:
                conn.transport.abort()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()

    thread = threading.Thread(target=run, name="upstream", daemon=True)
    thread.start()
    up.port = ready.result(timeout=10)
    try:
        yield up
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# ---------------------------------------------------------------------------
# The Twisted reactor, in a thread
# ---------------------------------------------------------------------------

_reactor_lock = threading.Lock()
_reactor_thread: threading.Thread | None = None


def _stop_reactor() -> None:
    from twisted.internet import reactor

    if _reactor_thread is not None and _reactor_thread.is_alive():
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]
        _reactor_thread.join(5)


def start_reactor() -> Any:
    """
    Run the global reactor in a daemon thread (once per process; a reactor
    cannot be restarted, so it runs until the process exits) and return it.
    """
    global _reactor_thread
    from twisted.internet import reactor

    with _reactor_lock:
        if _reactor_thread is None:
            started = threading.Event()
            reactor.callWhenRunning(started.set)  # type: ignore[attr-defined]
            _reactor_thread = threading.Thread(
                target=reactor.run,  # type: ignore[attr-defined]
                kwargs={"installSignalHandlers": False},
                name="twisted-reactor",
                daemon=True,
            )
            _reactor_thread.start()
            if not started.wait(10):
                raise RuntimeError("the reactor did not start")
            atexit.register(_stop_reactor)
    return reactor


def in_reactor(fn: Callable[..., Any], *args: Any, timeout: float = 30, **kwargs: Any) -> Any:
    """
    Call *fn* in the reactor thread and wait for its result (a Deferred or
    a coroutine is waited for); its exception is raised here.
    """
    from twisted.internet import defer

    reactor = start_reactor()
    result: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def call() -> None:
        def call_fn() -> Any:
            value = fn(*args, **kwargs)
            if asyncio.iscoroutine(value):
                return defer.Deferred.fromCoroutine(value)
            return value

        d = defer.maybeDeferred(call_fn)

        def ok(value: Any) -> None:
            result.set_result(value)

        def failed(failure: Any) -> None:
            result.set_exception(failure.value)

        d.addCallbacks(ok, failed)

    reactor.callFromThread(call)
    return result.result(timeout=timeout)
