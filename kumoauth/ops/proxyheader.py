"""
``haproxy:`` listeners: the PROXY protocol header (v1 or v2) names the
client, and the session starts only once it has been read.

Twisted's ``haproxy:`` endpoint starts the wrapped protocol as soon as the
TCP connection opens, before the header has arrived, so a session that
looks at its peer then (to count the connection against
``max_connections_per_ip``, for the throttles' key, the log's ``client=``,
conn_meta's ``received_from``) sees the proxy, not the client.  Here the
endpoint without its ``haproxy:`` prefix is bound (by this process or by
the supervisor for its workers), and :class:`ProxyHeaderFactory` wraps
the listener's factory: the session (or implicit TLS under it) is started
when the header is complete, with whatever followed the header in the same
read handed to it after.  A connection whose header is invalid, that sends
none within :data:`HEADER_TIMEOUT` seconds, that comes from outside the
listener's ``proxy_networks``, or that would be one too many waiting for
a header, is closed without a session, with a log line (one per peer and
reason a minute, then a count).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from kumoauth.ops.loglimit import LogLimiter
from kumoauth.textsafe import escape

log = Logger(namespace="kumoauth")

PREFIX = "haproxy:"

#: seconds a connection has to send its PROXY header (HAProxy sends it at once)
HEADER_TIMEOUT = 10.0

#: a v1 header that names no client (a health check's): the session sees
#: the connection's own peer.  Twisted's parser wants fields after it.
_UNKNOWN = b"PROXY UNKNOWN\r\n"


def split(description: str) -> tuple[str, bool]:
    """The endpoint description to bind, and whether a PROXY header comes first."""
    if description.startswith(PREFIX):
        return description[len(PREFIX) :], True
    return description, False


def names_valid_addresses(info: Any) -> bool:
    """
    Whether a parsed header's addresses are IP addresses of its family
    (no IPv6 zone) and its ports 0-65535.  Twisted's v1 parser takes any
    text between the spaces and any integer: a header could otherwise name
    a "client" with control characters or line ends in it, which the log,
    conn_meta and the Received: header would carry.  A v2 header's
    addresses are binary, valid by construction; a v2 UNIX socket's path is
    taken as sent (shown escaped, the client ``local``), as any peer
    ``proxy_networks`` lets through may name any IP address.
    """
    for addr in (info.source, info.destination):
        if addr is None or isinstance(addr, UNIXAddress):
            continue
        try:
            ip = ipaddress.ip_address(addr.host)
        except ValueError:
            return False
        family = 6 if isinstance(addr, IPv6Address) else 4
        if ip.version != family or getattr(ip, "scope_id", None) is not None:
            return False
        if not 0 <= addr.port <= 65535:
            return False
    return True


class _Early:
    """Stands in for the session while the header is parsed: keeps what follows it."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


class ProxyHeaderFirst(HAProxyProtocolWrapper):
    """Twisted's PROXY header parser, starting the session after the header."""

    factory: ProxyHeaderFactory
    _started = False
    _timer: Any = None
    _head = b""
    _waiting = False

    @property
    def proxy_peer(self) -> Any:
        """The connection's own peer, the proxy (``getPeer`` is the client)."""
        assert self.transport is not None
        return self.transport.getPeer()

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection without starting the wrapped protocol.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        factory = self.factory
        factory.registerProtocol(self)
        why = factory.refusal(transport.getPeer())
        if why is not None:
            self._refuse(why)
            self.loseConnection()
            return
        factory.waiting += 1
        self._waiting = True
        self._timer = factory.clock.callLater(factory.timeout, self._no_header)

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:  # refused already
            return
        if self._parser is None:
            # Twisted's parser tells v1 from v2 by the first read and refuses
            # one too short to tell: wait for 16 bytes (a v2 header's fixed
            # part) or a line end (the shortest v1, "PROXY UNKNOWN", is 15).
            self._head += data
            if len(self._head) < 16 and b"\n" not in self._head:
                return
            data, self._head = self._head, b""
            if data.startswith(_UNKNOWN):
                self._start(self.wrappedProtocol, [data[len(_UNKNOWN) :]])
                return
        session, early = self.wrappedProtocol, _Early()
        self.wrappedProtocol = early  # type: ignore[assignment]
        try:
            super().dataReceived(data)
        except ValueError:
            # Twisted's v1 parser lets a port that is not a number, or an
            # address that is not UTF-8, out as ValueError.
            self.loseConnection()
        finally:
            self.wrappedProtocol = session
        if self._proxyInfo is None:
            if self.disconnecting:  # Twisted's parser found it invalid
                self._refuse("an invalid PROXY header")
            return
        if not names_valid_addresses(self._proxyInfo):
            self._proxyInfo = None  # getPeer() is the connection's own peer again
            self._refuse("an invalid PROXY header")
            self.loseConnection()
            return
        self._start(session, early.data)

    def _start(self, session: Any, early: list[bytes]) -> None:
        self._stop_timer()
        self._started = True
        session.makeConnection(self)
        for chunk in early:
            if self.disconnecting:
                break
            if chunk:
                session.dataReceived(chunk)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self._started:
            super().connectionLost(reason)
        else:  # no session was started: nothing to tell it
            self.factory.unregisterProtocol(self)

    def _no_header(self) -> None:
        self._timer = None
        self._refuse(f"no PROXY header within {self.factory.timeout:g}s")
        self.loseConnection()

    def _refuse(self, why: str) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        host = escape(str(getattr(peer, "host", peer)))
        client = f"{host}:{getattr(peer, 'port', '')}"

        def summarise(n: int) -> None:
            log.info("closed {n} more from {host}: {why}", n=n, host=host, why=why)

        if self.factory.log_limit.allow(("proxy", why, host), summarise):
            log.info("closed {client}: {why}", client=client, why=why)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._waiting:
            self._waiting = False
            self.factory.waiting -= 1


class ProxyHeaderFactory(WrappingFactory):
    """Wraps a listener's factory for a ``haproxy:`` endpoint."""

    protocol = ProxyHeaderFirst

    def __init__(
        self,
        wrapped: IProtocolFactory,
        clock: Any,
        timeout: float = HEADER_TIMEOUT,
        networks: tuple[Any, ...] = (),
        max_waiting: int = 1000,
    ) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.timeout = timeout
        #: peers whose header is believed (empty: any)
        self.networks = networks
        #: connections at once that may wait for their header
        self.max_waiting = max_waiting
        self.waiting = 0
        self.log_limit = LogLimiter(clock)

    def refusal(self, peer: Any) -> str | None:
        """Why a connection from *peer* is closed before its header, or None."""
        if self.networks:
            try:
                address = ipaddress.ip_address(getattr(peer, "host", ""))
            except ValueError:
                return "not from proxy_networks"
            if not any(address in net for net in self.networks):
                return "not from proxy_networks"
        if self.waiting >= self.max_waiting:
            return f"{self.waiting} connections already wait for a PROXY header"
        return None

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedFactory, "logPrefix", None)
        return f"{prefix() if prefix else type(self.wrappedFactory).__name__} (PROXY)"
