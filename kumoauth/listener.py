"""
Listeners: one protocol factory per ``[[listener]]``, and the run-time state
they share (:class:`Runtime`).

A connection captures the :class:`Runtime` current when it is accepted and
keeps it to the end, so replacing ``factory.runtime`` (a reload) changes what
new connections get without touching live sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory

from kumoauth.authenticator import Authenticator, AuthLog, InFlight
from kumoauth.config import AuthConfig, ListenerConfig, ServerConfig
from kumoauth.delivery import Message
from kumoauth.loglimit import LogLimiter
from kumoauth.metrics import Metrics
from kumoauth.policy import Invoke, Policy, invoke
from kumoauth.throttle import Throttle
from kumoauth.tls import ServerContextFactory


class ConnectionLimits:
    """
    Counts open connections server-wide and per client IP (SPEC §3
    ``max_connections``, ``max_connections_per_ip``).
    """

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def acquire(self, ip: str, server: ServerConfig) -> bool:
        """
        Count a new connection; False (and nothing counted) if over a limit.
        """
        n = self.per_ip.get(ip, 0)
        if self.total >= server.max_connections or n >= server.max_connections_per_ip:
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
class Runtime:
    """
    Everything a session needs, shared by all listeners.
    """

    server: ServerConfig
    auth: AuthConfig
    policy: Policy
    portal: Portal
    store: Callable[[Message], Any]
    clock: IReactorTime
    tls: ServerContextFactory | None = None
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    sessions: Sessions = field(default_factory=Sessions)
    metrics: Metrics = field(default_factory=Metrics)
    #: calls policy handlers (blocking ones in a thread pool)
    invoke: Invoke = invoke
    #: failed-attempt throttles; None disables them
    throttle: Throttle | None = None
    #: checker calls in progress, against ``auth.max_in_flight`` (process-lived)
    in_flight: InFlight = field(default_factory=InFlight)
    #: ``[policy] timeout``: deadline of every policy event but AUTH
    policy_timeout: float = 30.0
    #: ``[tls] handshake_timeout``
    handshake_timeout: float = 30.0
    #: summarises repeated log events per client (process-lived)
    log_limiter: LogLimiter | None = None
    authenticator: Authenticator = field(init=False)

    def __post_init__(self) -> None:
        if self.log_limiter is None:
            self.log_limiter = LogLimiter(self.clock)
        self.authenticator = Authenticator(
            portal=self.portal,
            clock=self.clock,
            auth=self.auth,
            log=AuthLog(self.metrics, self.log_limiter),
            in_flight=self.in_flight,
            throttle=self.throttle,
        )

    def ehlo_keywords(self, listener: ListenerConfig, secure: bool) -> list[str]:
        """
        The EHLO extensions for a listener in a given TLS state (SPEC §6):
        STARTTLS only before TLS, AUTH only inside TLS (or where plaintext
        AUTH is allowed).
        """
        words = [
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            f"SIZE {self.server.max_message_size}",
        ]
        if listener.tls == "starttls" and not secure:
            words.append("STARTTLS")
        if secure or listener.allow_plaintext_auth:
            words.append("AUTH " + " ".join(self.auth.mechanisms))
        return words


class SubmissionFactory(Factory):
    """
    Builds :class:`~kumoauth.protocol.SubmissionProtocol` for one listener.
    """

    noisy = False

    def __init__(self, listener: ListenerConfig, runtime: Runtime) -> None:
        from kumoauth.protocol import SubmissionProtocol

        self.protocol = SubmissionProtocol  # type: ignore[assignment]
        self.listener = listener
        self.runtime = runtime


def wrap_listener(factory: SubmissionFactory) -> IProtocolFactory:
    """
    The factory to listen with: wrapped in TLS for ``tls = "implicit"``.
    """
    if factory.listener.tls == "implicit":
        assert factory.runtime.tls is not None
        return TLSMemoryBIOFactory(factory.runtime.tls, False, factory)
    return factory
