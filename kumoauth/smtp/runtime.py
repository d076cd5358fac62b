"""
What sessions share: the process-lived state (:class:`ProcessState`:
connection limits, live sessions, metrics, checks in flight…) and the
immutable configuration generation over it (:class:`Runtime`).

A connection captures the :class:`Runtime` current when it is accepted and
keeps it to the end, so replacing ``factory.runtime`` (a reload) changes what
new connections get without touching live sessions; the process-lived part
is the same object in every generation.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kumoauth.auth.authenticator import Authenticator, AuthLog, InFlight
from kumoauth.auth.locked import LockedUsers
from kumoauth.auth.throttle import Throttle, WriteState
from kumoauth.config import AuthConfig, ListenerConfig, ServerConfig
from kumoauth.ops.cooperate import Slicer
from kumoauth.ops.loglimit import LogLimiter, StateLog
from kumoauth.ops.metrics import Metrics
from kumoauth.policy import Invoke, Policy, invoke
from kumoauth.smtp.limits import SendingLimits
from kumoauth.storage.delivery import Message
from kumoauth.tls.context import ServerContextFactory

_MAPPED = b"\0" * 10 + b"\xff\xff"


def limit_key(ip: str, ipv6_prefix: int) -> str:
    """
    What ``max_connections_per_ip`` counts *ip* under: an IPv4 address
    itself, an IPv6 one its network of *ipv6_prefix* bits (one host
    commonly holds a whole /64), an IPv4-mapped one its IPv4 address (one
    host on a dual-stack listener and an IPv4 one is one host).  A few
    microseconds: it runs for every IPv6 connection.
    """
    if ":" not in ip:
        return ip
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    except OSError:
        return ip
    if packed[:12] == _MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return f"{int.from_bytes(packed, 'big') >> (128 - ipv6_prefix):x}/{ipv6_prefix}"


class ConnectionLimits:
    """
    Counts open connections server-wide and per client IP (SPEC §3
    ``max_connections``, ``max_connections_per_ip``).
    """

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}
        #: connections the process's file descriptors allow, when fewer than
        #: max_connections (kumoauth/ops/descriptors.py)
        self.ceiling: int | None = None

    def acquire(self, ip: str, server: ServerConfig) -> bool:
        """
        Count a new connection; False (and nothing counted) if over a limit.
        """
        n = self.per_ip.get(ip, 0)
        limit = server.max_connections if self.ceiling is None else self.ceiling
        if self.total >= limit or n >= server.max_connections_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        n = self.per_ip[ip] - 1
        if n:
            self.per_ip[ip] = n
        else:
            del self.per_ip[ip]


class Sessions:
    """
    The live sessions, so a shutdown can drain them (SPEC §9).
    """

    def __init__(self) -> None:
        self.live: set[Any] = set()
        self.draining = False
        self._waiters: list[defer.Deferred[None]] = []

    def add(self, session: Any) -> None:
        self.live.add(session)
        if self.draining:
            session.drain()

    def discard(self, session: Any) -> None:
        self.live.discard(session)
        if not self.live:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self, grace: float, clock: IReactorTime) -> defer.Deferred[None]:
        """
        Ask every session to finish: idle ones close now with 421 4.3.2,
        ones in a transaction after it.  Fires once all are gone; after
        *grace* seconds whatever is left is closed.
        """
        self.draining = True
        for session in list(self.live):
            session.drain()
        if not self.live:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        timer = clock.callLater(grace, self._force)
        d.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return d

    def _force(self) -> None:
        for session in list(self.live):
            session.shutdown_now()


@dataclass
class ProcessState:
    """
    What lives as long as the process, whatever the configuration: a
    reload hands it to the new generation unchanged.  Connection counts,
    live sessions, metrics, checks in flight, log summaries, the spool, the
    TLS context holder (whose context a reload replaces) and the failure
    stores with the salt of their fingerprints.
    """

    clock: IReactorTime
    store: Callable[[Message], Any]
    tls: ServerContextFactory | None = None
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    sessions: Sessions = field(default_factory=Sessions)
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: InFlight = field(default_factory=InFlight)
    log_limiter: LogLimiter = field(init=False)
    #: failure stores by their ``[auth.throttle] store`` setting
    failure_stores: dict[str, Any] = field(default_factory=dict)
    #: key of the failed-password fingerprints (kumoauth.auth.throttle)
    throttle_salt: bytes = field(default_factory=lambda: os.urandom(32))
    #: whether the failure store refuses writes, across reloads
    throttle_writes: WriteState = field(default_factory=WriteState)
    #: the verified-credential cache (kumoauth.backends.cache), once configured
    credential_cache: Any = None
    #: AUTH work of bursts, a slice per reactor iteration
    slicer: Slicer = field(init=False)
    #: the failure store's state for AUTH, logged once per change
    failure_store_state: StateLog = field(default_factory=lambda: StateLog("failure store"))
    #: ``[sender_binding]``: (its settings, the engine), kept across reloads
    #: while unchanged (a map file's watch, a store's connections)
    sender_binding: Any = None
    #: the bearer-token validator (``[auth.oauth]``): its JWKS cache
    #: outlives reloads
    oauth_validator: Any = None
    #: the [limits] store's state, logged once per change
    limits_store_state: StateLog = field(default_factory=lambda: StateLog("sending-limits store"))
    #: the spool's state (a full disk), logged once per change, not per message
    spool_state: StateLog = field(
        default_factory=lambda: StateLog("spool", logger=Logger(namespace="kumoauth.smtp"))
    )
    #: ``[sender_binding]``'s own parsing (messages' headers, the map file
    #: re-read), in a thread of its own (a BlockingPool): a credential store
    #: holding every checker thread must not hold it up
    parse_pool: Any = None
    #: ``[auth] locked_users``: its file's watch, kept across reloads
    locked_users: LockedUsers = field(init=False)

    def __post_init__(self) -> None:
        self.log_limiter = LogLimiter(self.clock)
        self.slicer = Slicer(self.clock)
        self.locked_users = LockedUsers(self.clock)


@dataclass(frozen=True)
class Runtime:
    """
    One configuration generation: everything a session needs that a reload
    replaces (settings, policy, portal, throttle), over the process-lived
    :class:`ProcessState`.  A session captures the generation current when
    it connects and keeps it to the end.
    """

    process: ProcessState
    server: ServerConfig
    auth: AuthConfig
    policy: Policy
    portal: Portal
    #: calls policy handlers (blocking ones in a thread pool)
    invoke: Invoke = invoke
    #: failed-attempt throttles; None disables them
    throttle: Throttle | None = None
    #: ``[policy] timeout``: deadline of every policy event but AUTH
    policy_timeout: float = 30.0
    #: ``[tls] handshake_timeout``
    handshake_timeout: float = 30.0
    #: the ``[auth] checker`` factory's checker with its spec (for its
    #: lifecycle hooks and for a reload to keep it), if one is configured
    checker: tuple[Any, Any] | None = None
    #: ``[limits]``: per-user sending limits; None without the table
    sending_limits: SendingLimits | None = None
    #: ``[sender_binding]``: who may send as whom; None without the table
    sender_gate: Any = None
    authenticator: Authenticator = field(init=False)

    def __post_init__(self) -> None:
        process = self.process
        authenticator = Authenticator(
            portal=self.portal,
            clock=process.clock,
            auth=self.auth,
            log=AuthLog(process.metrics, process.log_limiter),
            in_flight=process.in_flight,
            throttle=self.throttle,
            store_state=process.failure_store_state,
            slicer=process.slicer,
        )
        object.__setattr__(self, "authenticator", authenticator)

    # The process-lived parts, as a session sees them.

    @property
    def clock(self) -> IReactorTime:
        return self.process.clock

    @property
    def store(self) -> Callable[[Message], Any]:
        return self.process.store

    @property
    def tls(self) -> ServerContextFactory | None:
        return self.process.tls

    @property
    def limits(self) -> ConnectionLimits:
        return self.process.limits

    @property
    def sessions(self) -> Sessions:
        return self.process.sessions

    @property
    def metrics(self) -> Metrics:
        return self.process.metrics

    @property
    def in_flight(self) -> InFlight:
        return self.process.in_flight

    def ehlo_keywords(self, listener: ListenerConfig, secure: bool) -> list[str]:
        """
        The EHLO extensions for a listener in a given TLS state: STARTTLS
        only before TLS, AUTH only inside TLS (or where plaintext AUTH is
        allowed).
        """
        words = [
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            f"SIZE {self.server.max_message_size}",
        ]
        if self.server.dsn:
            words.append("DSN")
        if listener.tls == "starttls" and not secure:
            words.append("STARTTLS")
        if secure or listener.allow_plaintext_auth:
            words.append("AUTH " + " ".join(self.auth.mechanisms))
        return words
