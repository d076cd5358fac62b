"""
A running Dovecot as the credential store: kumoauth speaks Dovecot's
auth-client protocol (what Postfix's ``smtpd_sasl_type = dovecot`` speaks)
to its ``auth-client`` listener and lets Dovecot decide, with its passdbs,
hash schemes, master users, ``allow_nets`` and penalties.

The protocol is Dovecot's "Authentication Protocol" v1 (doc.dovecot.org,
developers/design/auth_protocol): lines of TAB-separated fields ending in
LF, values "tab-escaped" with ``\\001``::

    C: VERSION 1 2            C: CPID <pid>
    S: VERSION 1 <minor>      S: MECH PLAIN plaintext ...   S: SPID, CUID, COOKIE
    S: DONE
    C: AUTH <id> PLAIN service=smtp [secured] [rip=..] [lip=..] resp=<base64>
    S: OK <id> user=alice ... | FAIL <id> [code=temp_fail] ... | CONT <id> <data>

One connection carries every request, told apart by *id*; it is opened
on first use (or at :meth:`Dovecot.start`), re-opened after a loss with a
short backoff, replaced by a fresh one every ``connection_lifetime``
seconds (a reloaded Dovecot serves old connections with its old
configuration), and requests already sent when it is lost fail with
:class:`~kumoauth.backends.base.BackendError` (454): an answer that never
comes must not be guessed.  Nothing here blocks, so the checker pool is
not used.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from kumoauth.backends.base import (
    DENIED,
    BackendError,
    BackendHealth,
    ICredentialStore,
    OncePer,
    StoreChecker,
    Verdict,
    client_ip,
    default_reactor,
    listener_address,
    parse_table,
    peer_ip,
    secured,
)
from kumoauth.textsafe import escape

log = Logger(namespace="kumoauth.backends")

#: the protocol major version kumoauth speaks, and the minor it announces
MAJOR, MINOR = 1, 2

#: Dovecot's own limit is 16384 bytes; OK lines may carry passdb extra fields
MAX_LINE = 65536

#: reconnect delays after failed attempts: 0.1 s, doubling, at most 2 s
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0

#: a connection lost sooner than this after its handshake counts as a failed
#: attempt, so a server that accepts and hangs up is not retried in a loop
STABLE_AFTER = 1.0

#: a Unix socket path longer than this does not fit ``sockaddr_un``
MAX_UNIX_PATH = 107


# --------------------------------------------------------------------------
# configuration


def _service(v: Any) -> str:
    from kumoauth.checks import _Bad, _str

    value = _str(v)
    if not re.fullmatch(r"[!-~]{1,64}", value):
        raise _Bad(f"expected a service name (printable ASCII, no spaces), got {escape(value)!r}")
    return value


def _checks() -> dict[str, Callable[[Any], Any]]:
    from kumoauth.checks import _bool, _int, _number, _str

    return {
        "socket": _str,
        "service": _service,
        "timeout": _number(0.001),
        "max_pending": _int(1),
        "connection_lifetime": _number(1.0),
        "allow_plaintext": _bool,
    }


@dataclass(frozen=True)
class Config:
    """
    ``[auth.dovecot]``: where Dovecot's auth-client listener is, and how
    long and how many requests kumoauth waits for it.
    """

    #: a Unix socket path, or ``host:port`` / ``[v6]:port`` (an
    #: ``inet_listener`` of ``service auth``); paths are absolute here
    socket: str
    #: ``service=`` of every request: Dovecot's ``%s``, its passdb filters
    service: str = "smtp"
    #: seconds for one request: connecting if need be, and the answer
    timeout: float = 5.0
    #: requests waiting for Dovecot at once; more are answered 454 at once
    max_pending: int = 1000
    #: seconds one connection is used; then a fresh one takes over, so a
    #: Dovecot reload (whose old auth process keeps serving connections it
    #: already has, with the old configuration) reaches kumoauth too
    connection_lifetime: float = 60.0
    #: a TCP socket on a host other than 127.0.0.1, ::1, localhost (the
    #: auth-client protocol carries passwords in base64, not encrypted)
    allow_plaintext: bool = False


SCHEMA: dict[str, Callable[[Any], Any]] = _checks()


@dataclass(frozen=True)
class Target:
    """
    Where the auth-client listener is: a Unix socket *path*, or *host* and
    *port*.  ``str()`` gives back the configuration's form.
    """

    path: Path | None = None
    host: str = ""
    port: int = 0

    @property
    def remote(self) -> bool:
        """TCP to a host other than the loopback."""
        if self.path is not None or self.host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return True

    def endpoint(self, reactor: Any, timeout: float) -> Any:
        if self.path is not None:
            return UNIXClientEndpoint(reactor, str(self.path), timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_socket(value: str, base_dir: Path | None = None) -> Target:
    """
    ``[v6]:port`` and ``host:port`` (no ``/`` in host) are TCP; anything
    else is a Unix socket path, relative to *base_dir* (else the current
    directory).  ``ValueError`` with the problem.
    """
    if m := re.fullmatch(r"\[([^\]]*)\]:([0-9]{1,5})", value):
        try:
            host = str(ipaddress.IPv6Address(m[1]))
        except ValueError:
            raise ValueError(f"{escape(value)}: expected [IPv6 address]:port") from None
        return Target(host=host, port=_port(m[2], value))
    if m := re.fullmatch(r"([^/:\s\[\]]+):([0-9]{1,5})", value):
        return Target(host=m[1], port=_port(m[2], value))
    if value.startswith("[") or not value.isprintable():
        raise ValueError(f"{escape(value)}: expected a socket path, host:port or [IPv6]:port")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    if len(os.fsencode(str(path))) > MAX_UNIX_PATH:
        raise ValueError(f"{path}: longer than {MAX_UNIX_PATH} bytes, too long for a Unix socket")
    return Target(path=path)


def _port(text: str, value: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{escape(value)}: the port must be 1-65535")
    return port


def validate(raw: Mapping[str, Any], base: Path | None = None) -> Config:
    """
    The ``[auth.dovecot]`` table, checked; a relative socket path is made
    absolute against *base* (the configuration file's directory).
    """
    config: Config = parse_table(Config, raw, SCHEMA, required=("socket",), base=base)
    try:
        target = parse_socket(config.socket, base)
    except ValueError as e:
        raise ValueError(f"socket: {e}") from None
    if target.remote and not config.allow_plaintext:
        raise ValueError(
            f"socket: {target} is not on this host and the auth-client protocol is not "
            "encrypted (passwords cross the network in base64); use a Unix socket or the "
            "loopback, or set allow_plaintext = true for a network you trust"
        )
    return replace(config, socket=str(target))


def from_argstring(arg: str) -> Config:
    """
    ``twistd kumoauth --auth dovecot:<arg>``: *arg* is the socket, a Unix
    socket path (relative to the current directory) or ``host:port`` /
    ``[v6]:port`` on the loopback; the other keys keep their defaults.
    """
    return validate({"socket": arg}, base=Path.cwd())


def factory(config: Config, reactor: Any, pool: Any, metrics: Any = None) -> StoreChecker:
    """
    The ``[auth] checker = "dovecot"`` checker.  *pool* is not used:
    nothing here blocks.
    """
    return StoreChecker(Dovecot.from_config(config, reactor=reactor), reactor, metrics)


factory.validate = validate  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# the wire format


def tab_escape(value: str) -> str:
    """
    Dovecot's tab-escaping: ``\\001`` then ``1`` (itself), ``t`` (TAB),
    ``r`` (CR), ``n`` (LF) or ``0`` (NUL), so a value never splits a line
    or a field.
    """
    if not any(c in value for c in "\x00\x01\t\r\n"):
        return value
    return (
        value.replace("\x01", "\x011")
        .replace("\x00", "\x010")
        .replace("\t", "\x01t")
        .replace("\r", "\x01r")
        .replace("\n", "\x01n")
    )


_UNESCAPE = {"0": "\x00", "1": "\x01", "t": "\t", "r": "\r", "n": "\n"}


def tab_unescape(value: str) -> str:
    """
    The inverse of :func:`tab_escape`; ``\\001`` before any other
    character stands for that character, as the protocol says.
    """
    if "\x01" not in value:
        return value
    out: list[str] = []
    chars = iter(value)
    for c in chars:
        if c == "\x01":
            nxt = next(chars, "")
            out.append(_UNESCAPE.get(nxt, nxt))
        else:
            out.append(c)
    return "".join(out)


def parse_params(fields: list[str]) -> dict[str, str]:
    """
    ``name=value`` and boolean ``name`` fields of a reply, unescaped (a
    boolean's value is ``""``; an empty field is skipped).
    """
    params: dict[str, str] = {}
    for f in fields:
        if not f:
            continue
        name, _, value = f.partition("=")
        params[name] = tab_unescape(value)
    return params


def plain_response(authzid: str, authc: str, password: str) -> str:
    """
    The PLAIN initial response (RFC 4616 §2: authzid NUL authcid NUL
    passwd), in base64 as ``resp=`` wants it.
    """
    return base64.b64encode(f"{authzid}\0{authc}\0{password}".encode()).decode("ascii")


def _host_port(value: str | None) -> tuple[str | None, str | None]:
    """
    ``"192.0.2.1:5000"`` or ``"[2001:db8::1]:5000"`` as (address, port),
    each None unless it is an IP address / a port number: only those go
    to Dovecot.
    """
    if not value or ":" not in value:
        return None, None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.rpartition(":")
    ip = _ip(host)
    return ip, port if ip and re.fullmatch(r"[0-9]{1,5}", port) else None


def _ip(value: str | None) -> str | None:
    """*value* in the standard form if it is an IP address, else None."""
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def request_params(service: str, conn_meta: Any) -> list[str]:
    """
    The AUTH fields before ``resp=``: the service, ``secured`` when TLS is
    up, and the client's and the listener's address and port (Dovecot's
    ``rip``/``rport``/``lip``/``lport``: its ``allow_nets``, penalties and
    log lines use them), and behind a PROXY header the proxy's address as
    ``real_rip`` (its ``allow_real_nets``).  Only values that are IP addresses and port
    numbers are sent, escaped all the same.
    """
    params = [f"service={tab_escape(service)}"]
    if secured(conn_meta):
        params.append("secured")
    rip = _ip(client_ip(conn_meta))
    received_from = conn_meta.get_meta("received_from") if conn_meta is not None else None
    rport = _host_port(received_from)[1] if rip and isinstance(received_from, str) else None
    lip, lport = _host_port(listener_address(conn_meta))
    # Behind a PROXY header the TCP peer is the proxy: Dovecot's real_rip,
    # which its allow_real_nets checks (not sent, Dovecot takes it as rip).
    real_rip = _ip(peer_ip(conn_meta))
    if real_rip == rip:
        real_rip = None
    fields = (
        ("rip", rip),
        ("rport", rport),
        ("lip", lip),
        ("lport", lport),
        ("real_rip", real_rip),
    )
    for name, value in fields:
        if value is not None:
            params.append(f"{name}={tab_escape(value)}")
    return params


@dataclass(frozen=True)
class Reply:
    """One answer to an AUTH: ``OK``, ``FAIL`` or ``CONT``, and its fields."""

    command: str
    params: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------
# one connection


class AuthClientProtocol(LineOnlyReceiver):
    """
    One auth-client connection: the handshake, then AUTH requests by id.
    The connection manager (:class:`AuthClient`) hears when it is ready
    and when it is gone.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, client: AuthClient) -> None:
        self.client = client
        self.ready = False
        self.ready_at = 0.0
        self.version: str | None = None
        self.mechanisms: set[str] = set()
        self.server_pid = ""
        self.pending: dict[int, defer.Deferred[Reply]] = {}
        self.last_id = 0
        self.problem: str | None = None
        self.retired = False
        self.recycle_call: Any = None
        self.closed: defer.Deferred[None] = defer.Deferred()

    @property
    def wire(self) -> Any:
        """The transport (a TCP or Unix one: it can abort)."""
        return self.transport

    def connectionMade(self) -> None:
        # The client half of the handshake, pipelined (the protocol allows it).
        self.wire.write(f"VERSION\t{MAJOR}\t{MINOR}\nCPID\t{os.getpid()}\n".encode())

    def lineReceived(self, line: bytes) -> None:
        fields = line.decode("utf-8", "replace").split("\t")
        if self.ready:
            self._answer(fields[0], fields[1:])
        else:
            self._handshake(fields[0], fields[1:])

    def _handshake(self, command: str, args: list[str]) -> None:
        if command == "VERSION":
            self.version = args[0] if args else ""
            if self.version != str(MAJOR):
                self.fail(
                    f"dovecot speaks auth protocol version {escape(self.version, 20)}, "
                    f"kumoauth speaks {MAJOR}"
                )
        elif command == "MECH" and args:
            self.mechanisms.add(args[0].upper())
        elif command == "SPID" and args:
            self.server_pid = escape(args[0], 20)
        elif command == "DONE":
            if self.version is None:
                self.fail("dovecot ended its handshake without VERSION")
            elif "PLAIN" not in self.mechanisms:
                self.fail("dovecot does not offer PLAIN (see its auth_mechanisms)")
            else:
                self.ready = True
                self.client.connection_ready(self)
        elif command in ("OK", "FAIL", "CONT"):
            self.fail(f"dovecot answered {command} during the handshake")
        # CUID, COOKIE and commands of later versions: nothing to do

    def _answer(self, command: str, args: list[str]) -> None:
        if command not in ("OK", "FAIL", "CONT"):
            return  # a command of a later protocol version
        if not args or not re.fullmatch(r"[0-9]{1,10}", args[0]):
            self.fail(f"dovecot answered {command} without a request id")
            return
        d = self.pending.pop(int(args[0]), None)
        if d is None:
            return  # a request kumoauth stopped waiting for (timeout)
        d.callback(Reply(command, parse_params(args[1:])))
        self.client.idle(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.fail(f"dovecot sent a line longer than {MAX_LINE} bytes")

    def fail(self, problem: str) -> None:
        """Close the connection because of *problem* (it ends up in the 454's log line)."""
        if self.problem is None:
            self.problem = problem
        self.wire.abortConnection()

    def auth(self, params: list[str]) -> defer.Deferred[Reply]:
        """
        Send ``AUTH <id> PLAIN <params>``; the Deferred fires with the reply.
        Cancelling it forgets the id (a late answer is then ignored).
        """
        request_id = self._next_id()

        def forget(d: defer.Deferred[Reply]) -> None:
            self.pending.pop(request_id, None)
            self.client.idle(self)

        d: defer.Deferred[Reply] = defer.Deferred(canceller=forget)
        self.pending[request_id] = d
        line = "\t".join(["AUTH", str(request_id), "PLAIN", *params])
        # Every field is an IP address, a port, base64 or escaped: no framing
        # character can be in the line.  Refuse rather than trust that.
        if any(c in line for c in "\x00\r\n"):
            self.pending.pop(request_id, None)
            return defer.fail(BackendError("refused to send a request that breaks the framing"))
        self.wire.write(line.encode() + b"\n")
        return d

    def _next_id(self) -> int:
        # 32-bit ids, never one still waiting for its answer
        while True:
            self.last_id = self.last_id % 0xFFFFFFFF + 1
            if self.last_id not in self.pending:
                return self.last_id

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        problem = self.problem or _describe(reason)
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(BackendError(f"connection to dovecot lost: {problem}"))
        self.client.connection_lost(self, problem)
        self.closed.callback(None)


class _ProtocolFactory(Factory):
    # No "Starting factory" / "Stopping factory" line per connection attempt:
    # while Dovecot is down the background retries would log two a second.
    # AuthClient logs the state changes.
    noisy = False

    def __init__(self, client: AuthClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> AuthClientProtocol:
        return AuthClientProtocol(self.client)


def _describe(reason: Any) -> str:
    """A connection failure as a short phrase for a log line (never a secret in it)."""
    if isinstance(reason, Failure):
        e = reason.value
    elif isinstance(reason, BaseException):
        e = reason
    else:
        return "closed"
    if isinstance(e, ConnectionDone):
        return "closed by dovecot"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    code = getattr(e, "osError", None)  # Twisted's ConnectError: an errno
    if isinstance(code, int):
        return os.strerror(code).lower()
    text = str(e).strip() or type(e).__name__
    return escape(text, 200)


# --------------------------------------------------------------------------
# the connection, kept up


class AuthClient:
    """
    Keeps one :class:`AuthClientProtocol` to *target* ready for requests.

    - No connection: a request starts an attempt and waits for its
      handshake (its own timeout bounds the wait).
    - An attempt failed less than the backoff ago (0.1 s, doubling to 2 s):
      a request fails at once with the last reason, so an outage answers
      454 quickly instead of holding every client; meanwhile a timer tries
      again in the background.
    - The connection is lost: what was sent on it fails, and it is
      re-opened at once (with the backoff if it keeps dying young).
    - After *lifetime* seconds a fresh connection is opened; when its
      handshake is done it takes new requests and the old one closes once
      its answers are in.  A reloaded Dovecot's old auth process keeps
      serving the connections it has with its old passdbs: this is how
      kumoauth gets to the new one.

    Each state change logs one line (attempts that fail in a row, one).
    """

    def __init__(
        self,
        reactor: Any,
        target: Target,
        timeout: float,
        lifetime: float = 60.0,
        health: BackendHealth | None = None,
    ) -> None:
        self.reactor = reactor
        self.health = health if health is not None else BackendHealth("dovecot")
        #: whether the down state in the log is this connection's to end
        #: (not a passdb's temporary failure, which a new connection does
        #: not mend: each recycle would say "available again")
        self._said_down = False
        self.target = target
        self.timeout = timeout
        self.lifetime = lifetime
        self.connection: AuthClientProtocol | None = None
        self.attempt: defer.Deferred[Any] | None = None
        self.handshaking: AuthClientProtocol | None = None
        self.attempt_timer: Any = None
        self.attempt_expired = False
        self.waiters: list[defer.Deferred[AuthClientProtocol]] = []
        self.retired: set[AuthClientProtocol] = set()
        self.failures = 0
        self.last_error: str | None = None
        self.retry_at = 0.0
        self.retry_call: Any = None
        self.active = False
        #: handshakes completed: how many connections were ever made
        self.handshakes = 0

    # -- what the store uses --

    def ready(self) -> defer.Deferred[AuthClientProtocol]:
        """The connection, once it has finished its handshake."""
        self.active = True
        if self.connection is not None:
            return defer.succeed(self.connection)
        if self.attempt is None:
            wait = self.retry_at - self.reactor.seconds()
            if self.last_error is not None and wait > 0:
                return defer.fail(
                    BackendError(f"{self._cannot()}: {self.last_error} (next try in {wait:.1f} s)")
                )

        def forget(d: defer.Deferred[AuthClientProtocol]) -> None:
            if d in self.waiters:
                self.waiters.remove(d)

        d: defer.Deferred[AuthClientProtocol] = defer.Deferred(canceller=forget)
        self.waiters.append(d)
        if self.attempt is None:
            self._connect()
        return d

    def pending(self) -> int:
        """Requests waiting: for the connection, or for Dovecot's answer."""
        sent = len(self.connection.pending) if self.connection is not None else 0
        return sent + len(self.waiters)

    def start(self) -> None:
        self.active = True
        if self.connection is None and self.attempt is None:
            self._connect()

    def retarget(self, target: Target, timeout: float, lifetime: float) -> None:
        """
        A reload: new requests go to *target*; the old connection closes
        once what was sent on it is answered.
        """
        self.timeout = timeout
        self.lifetime = lifetime
        if target == self.target:
            return
        self.target = target
        self._retire_connection()
        self._abort_attempt("the socket was reconfigured")
        self.failures, self.last_error, self.retry_at = 0, None, 0.0
        if self.active:
            self._connect()

    def stop(self) -> defer.Deferred[Any]:
        """Close every connection; the Deferred fires when they are closed."""
        self.active = False
        self._cancel_retry()
        closing = [p.closed for p in (self.handshaking, *self.retired) if p is not None]
        self._abort_attempt("kumoauth is stopping")
        self._retire_connection()
        closing += [p.closed for p in self.retired]
        for p in list(self.retired):
            p.wire.loseConnection()
        return defer.gatherResults(closing, consumeErrors=True)

    # -- connecting --

    def _connect(self) -> None:
        self._cancel_retry()
        self.attempt_expired = False
        self.attempt_timer = self.reactor.callLater(self.timeout, self._expire_attempt)
        endpoint = self.target.endpoint(self.reactor, self.timeout)
        attempt = self.attempt = endpoint.connect(_ProtocolFactory(self))

        def connected(protocol: AuthClientProtocol) -> None:
            if self.attempt is attempt:
                self.handshaking = protocol
            else:
                protocol.wire.abortConnection()  # abandoned meanwhile

        def failed(f: Failure) -> None:
            if self.attempt is attempt:
                why = f"no connection within {self.timeout:g} s" if self.attempt_expired else None
                self._attempt_failed(why or _describe(f))

        attempt.addCallbacks(connected, failed)

    def _expire_attempt(self) -> None:
        self.attempt_timer = None
        self.attempt_expired = True
        if self.handshaking is not None:
            self.handshaking.fail(f"no handshake within {self.timeout:g} s")
        elif self.attempt is not None:
            self.attempt.cancel()

    def _abort_attempt(self, why: str) -> None:
        if self.attempt is None:
            return
        attempt, protocol = self.attempt, self.handshaking
        self._attempt_done()
        waiters, self.waiters = self.waiters, []
        if protocol is not None:
            protocol.fail(why)
        else:
            attempt.cancel()
        for d in waiters:
            d.errback(BackendError(f"{self._cannot()}: {why}"))

    def _attempt_done(self) -> None:
        self.attempt = None
        self.handshaking = None
        if self.attempt_timer is not None and self.attempt_timer.active():
            self.attempt_timer.cancel()
        self.attempt_timer = None

    def connection_ready(self, protocol: AuthClientProtocol) -> None:
        if protocol is not self.handshaking:
            protocol.fail("an abandoned connection")
            return
        self._attempt_done()
        self._retire_connection()  # the one this replaces, if it was recycled
        protocol.ready_at = self.reactor.seconds()
        self.connection = protocol
        self._arm_recycle(protocol)
        self.handshakes += 1
        if self.last_error is None and self.handshakes == 1:
            log.info(
                "dovecot auth at {target}: connected (server pid {pid})",
                target=str(self.target),
                pid=protocol.server_pid or "?",
            )
        if self._said_down:
            self._said_down = False
            self.health.succeeded()
        self.last_error = None
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(protocol)

    def _attempt_failed(self, problem: str) -> None:
        self._attempt_done()
        self.failures += 1
        first = self.last_error is None
        self.last_error = problem
        delay = _backoff(self.failures)
        self.retry_at = self.reactor.seconds() + delay
        if first:
            self._failed(f"{self._cannot()}: {problem}")
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.errback(BackendError(f"{self._cannot()}: {problem}"))
        if self.connection is not None:
            self._arm_recycle(self.connection)  # the old one still works: keep it
        else:
            self._schedule_retry(delay)

    def connection_lost(self, protocol: AuthClientProtocol, problem: str) -> None:
        self.retired.discard(protocol)
        _cancel(protocol.recycle_call)
        if protocol is self.handshaking:
            self._attempt_failed(problem)
            return
        if protocol is not self.connection:
            return
        self.connection = None
        lived = self.reactor.seconds() - protocol.ready_at
        self.failures = 0 if lived >= STABLE_AFTER else self.failures + 1
        delay = _backoff(self.failures)
        self.last_error = problem
        self.retry_at = self.reactor.seconds() + delay
        if self.active:
            self._failed(f"dovecot auth at {self.target}: connection lost: {problem}")
        self._schedule_retry(delay)

    def _failed(self, reason: str) -> None:
        """The connection's failure, into the store's state log."""
        if self.health.down is None:
            self._said_down = True
        self.health.failed(reason, count=False)

    def _arm_recycle(self, protocol: AuthClientProtocol) -> None:
        def recycle() -> None:
            protocol.recycle_call = None
            if protocol is self.connection and self.attempt is None and self.active:
                self._connect()  # requests keep using it until the new one is ready

        _cancel(protocol.recycle_call)
        protocol.recycle_call = self.reactor.callLater(self.lifetime, recycle)

    def _schedule_retry(self, delay: float) -> None:
        if not self.active or self.retry_call is not None:
            return

        def retry() -> None:
            self.retry_call = None
            if self.active and self.connection is None and self.attempt is None:
                self._connect()

        self.retry_call = self.reactor.callLater(delay, retry)

    def _cancel_retry(self) -> None:
        if self.retry_call is not None and self.retry_call.active():
            self.retry_call.cancel()
        self.retry_call = None

    def _retire_connection(self) -> None:
        protocol, self.connection = self.connection, None
        if protocol is not None:
            _cancel(protocol.recycle_call)
            protocol.recycle_call = None
            protocol.retired = True
            self.retired.add(protocol)
            self.idle(protocol)

    def idle(self, protocol: AuthClientProtocol) -> None:
        """A request on *protocol* ended: a retired connection with none left closes."""
        if protocol.retired and not protocol.pending:
            protocol.wire.loseConnection()

    def _cannot(self) -> str:
        return f"cannot reach dovecot auth at {self.target}"


def _cancel(call: Any) -> None:
    if call is not None and call.active():
        call.cancel()


def _backoff(failures: int) -> float:
    """Seconds before the next attempt after *failures* failed ones in a row."""
    return 0.0 if failures <= 0 else min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (failures - 1))


# --------------------------------------------------------------------------
# the store


@implementer(ICredentialStore)
class Dovecot:
    """
    Passwords checked by a running Dovecot, over its auth-client socket::

        users = Dovecot("/run/dovecot/auth-client")
        verdict = await users.check(authz, authc, password, conn_meta)

    - ``OK`` → ``Verdict(True)``; when Dovecot's ``user=`` differs from the
      identity asked for (``auth_username_format``, a default realm, a
      master user), meta ``dovecot_user`` is that user name, and it is the
      verdict's ``user`` (the session's ``authn_id``) for a login that
      asked for no other identity;
    - ``FAIL`` → :data:`DENIED`, unless it says the failure is temporary
      (``code=temp_fail``, ``temp``): :class:`BackendError`;
    - ``OK`` with ``nologin`` (the passdb says this user may not log in)
      → :data:`DENIED`; with ``proxy``/``proxy_maybe``, Dovecot may not
      have checked the password at all: :class:`BackendError` and one
      log line per user;
    - authz ≠ authc is sent as PLAIN's authzid: Dovecot decides (master
      users);
    - no answer within *timeout*, the connection lost, an answer that is
      not the protocol → :class:`BackendError`.
    """

    name = "dovecot"

    def __init__(
        self,
        socket: str | Path,
        service: str = "smtp",
        timeout: float = 5.0,
        max_pending: int = 1000,
        allow_plaintext: bool = False,
        connection_lifetime: float = 60.0,
        *,
        reactor: Any = None,
        pool: Any = None,
    ) -> None:
        config = validate(
            {
                "socket": str(socket),
                "service": service,
                "timeout": timeout,
                "max_pending": max_pending,
                "allow_plaintext": allow_plaintext,
                "connection_lifetime": connection_lifetime,
            }
        )
        self.reactor = default_reactor(reactor)
        self.config = config
        #: the state log the store's checker shares (kumoauth/backends/base.py)
        self.health = BackendHealth(self.name)
        self.client = AuthClient(
            self.reactor,
            parse_socket(config.socket),
            config.timeout,
            config.connection_lifetime,
            health=self.health,
        )
        self.proxied = OncePer()
        self.stopped = False

    @classmethod
    def from_config(cls, config: Config, reactor: Any = None) -> Dovecot:
        return cls(
            config.socket,
            config.service,
            config.timeout,
            config.max_pending,
            config.allow_plaintext,
            config.connection_lifetime,
            reactor=reactor,
        )

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Dovecot does not say when its users change: nothing to tell."""

    # -- lifecycle --

    def start(self) -> None:
        """Connect now; if Dovecot is down, AUTH answers 454 until it is up."""
        self.stopped = False
        self.client.start()

    def reload(self, config: Config) -> None:
        self.config = config
        self.client.retarget(
            parse_socket(config.socket), config.timeout, config.connection_lifetime
        )

    def stop(self) -> defer.Deferred[Any]:
        self.stopped = True
        return self.client.stop()

    # -- checking --

    def check(
        self, authz: str, authc: str, password: str, conn_meta: Any = None
    ) -> defer.Deferred[Verdict]:
        if not authc or not password or "\0" in f"{authz}{authc}{password}":
            # Nothing Dovecot could accept: no request, no penalty.
            return defer.succeed(DENIED)
        authzid = "" if authz in ("", authc) else authz
        if self.stopped:
            return defer.fail(BackendError("the dovecot store is stopped"))
        if self.client.pending() >= self.config.max_pending:
            return defer.fail(
                BackendError(f"{self.config.max_pending} requests already wait for dovecot")
            )
        params = request_params(self.config.service, conn_meta)
        params.append(f"resp={plain_response(authzid, authc, password)}")  # must be last
        stage = ["connect"]
        d = defer.Deferred.fromCoroutine(self._ask(params, stage))
        timeout = self.config.timeout

        def timed_out(result: Any, seconds: float) -> Any:
            if stage[0] == "connect":
                raise BackendError(f"no connection to dovecot auth within {timeout:g} s")
            raise BackendError(f"no answer from dovecot auth within {timeout:g} s")

        d.addTimeout(timeout, self.reactor, onTimeoutCancel=timed_out)
        return d.addCallback(self._verdict, authzid or authc, authc)

    async def _ask(self, params: list[str], stage: list[str]) -> Reply:
        connection = await self.client.ready()
        stage[0] = "answer"
        return await connection.auth(params)

    def _verdict(self, reply: Reply, identity: str, authc: str) -> Verdict:
        p = reply.params
        if reply.command == "CONT":
            # PLAIN with its initial response is one step; a challenge means
            # the other end is not the Dovecot we think.  Dovecot drops the
            # request by itself after its own timeout.
            raise BackendError("dovecot asked for more data (CONT) after a PLAIN response")
        if reply.command == "FAIL":
            if "temp" in p or p.get("code") == "temp_fail":
                reason = f" ({escape(p['reason'], 100)})" if p.get("reason") else ""
                raise BackendError(f"dovecot: temporary failure{reason}")
            return DENIED
        if "proxy" in p or "proxy_maybe" in p:
            if self.proxied.first(authc):
                log.error(
                    "auth backend dovecot: user {user}: dovecot answered with a proxy "
                    "referral, which may not have checked the password; give service "
                    "{service} a passdb without proxy fields; this user gets 454",
                    user=escape(authc),
                    service=escape(self.config.service),
                )
            raise BackendError("dovecot answered a proxy referral", outage=False)
        if "nologin" in p:
            return DENIED
        user = p.get("user")
        master = p.get("auth_user")
        if user and master and master != user:
            # A master user logged in as *user* (authzid, or Dovecot's
            # auth_master_user_separator in the name): the account is the
            # master's, acting as the target.
            meta = {"dovecot_user": user} if user != identity else {}
            return Verdict(True, meta, user=master, authz=user)
        if not user or user == identity:
            return Verdict(True, {})
        return Verdict(True, {"dovecot_user": user}, user=user)

    def __repr__(self) -> str:
        return f"<Dovecot {self.client.target}>"
