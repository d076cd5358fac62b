"""
TLS over memory BIOs with one call into libssl per direction.

``TLSMemoryBIOProtocol`` moves each chunk through ``pyOpenSSL``'s interface:
``bio_write``, then ``recv`` until a ``WantReadError`` is raised, then
``bio_read`` until another is raised; each reply is a ``send`` and a
``bio_read``.  Per SMTP command that is half a dozen calls into the binding
and two exceptions raised and caught.  With kumoauth's own binding
(:mod:`kumoauth.tls.openssl`) the same steps are one call each way:
:meth:`~kumoauth.tls.openssl.Connection.open` returns every record a chunk
completes, :meth:`~kumoauth.tls.openssl.Connection.seal` the TLS bytes of a
reply, and :meth:`~kumoauth.tls.openssl.Connection.take` what is waiting
to go.

:class:`DirectTLS` takes those paths, and steps the handshake with
:meth:`~kumoauth.tls.openssl.Connection.try_handshake` (no exception while
it waits for the client); everything else (writes buffered during the
handshake, a write that fails, shutdown, producers, connection loss) is
``TLSMemoryBIOProtocol``'s own code.  The outcomes are the same: records
are delivered in order and stop as soon as the TLS connection is lost, a
close_notify or an error ends the session as ``_flushReceiveBIO`` would,
a failed handshake as ``_checkHandshakeStatus`` would
(tests/test_tls_direct.py runs every case on both classes).  STARTTLS
builds one directly (:func:`start_server_tls`).  Measured in
BENCHMARKS.md.
"""

from __future__ import annotations

import socket
from typing import Any

from OpenSSL.SSL import Error, ZeroReturnError
from twisted.internet._newtls import _BypassTLS
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from kumoauth.tls.context import ServerContextFactory

#: what one ``seal`` takes at most: a TLS record's plaintext
_RECORD = 2**14


class DirectTLS(TLSMemoryBIOProtocol):
    """
    ``TLSMemoryBIOProtocol`` for a :class:`kumoauth.tls.openssl.Connection`.
    """

    def makeConnection(self, transport: Any) -> None:
        # TLSMemoryBIOProtocol.makeConnection, but for two things.  Its loop
        #     for interface in providedBy(transport): directlyProvides(self, interface)
        # makes ten declarations (~11 µs), each replacing the one before:
        # the last one is made here, found once per kind of transport.  And
        # its first handshake step is left out: a server has nothing to say
        # before the ClientHello.
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        directlyProvides(self, _last_interface(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)

    def dataReceived(self, data: bytes) -> None:
        if self._handshakeDone:
            if self._appSendBuffer:
                super().dataReceived(data)
            else:
                self._deliver(data)
            return
        if self._aborted:
            super().dataReceived(data)
            return
        # TLSMemoryBIOProtocol.dataReceived and _checkHandshakeStatus,
        # without a WantReadError per step.
        conn = self._tlsConnection
        conn.bio_write(data)
        try:
            done = conn.try_handshake()
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        if not done:
            self._flushSendBIO()
            return
        self._handshakeDone = True
        if not self._appSendBuffer and not conn.has_output():
            # Nothing to send now (a TLS 1.2 resumption, TLS 1.3 without a
            # ticket to issue): acknowledge the client's Finished at once,
            # or the kernel delays that ACK by 40 ms and a client with
            # Nagle's algorithm on (smtplib, swaks) holds its first command
            # back until it comes.  Otherwise the ACK rides on what leaves
            # below (a ticket, the greeting, a reply), as before.
            quickack(self.transport)
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._deliver(b"")  # what came with the client's Finished

    def _deliver(self, data: bytes) -> None:
        """*data* in; every record it completes to the protocol; replies out."""
        records, error = self._tlsConnection.open(data)
        deliver = self.wrappedProtocol.dataReceived
        for record in records:
            if self._lostTLSConnection:
                break
            if not self._aborted:
                deliver(record)
        if error is not None and not self._lostTLSConnection:
            if isinstance(error, ZeroReturnError):
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            else:
                self._tlsShutdownFinished(Failure(error))
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        out = self._tlsConnection.take()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection or not data:
            return
        if len(data) <= _RECORD:
            out = self._tlsConnection.seal(data)
            if out is not None:
                if out:
                    self.transport.write(out)  # type: ignore[union-attr]
                return
        # A long write, or SSL_write failed (the handshake wants bytes, the
        # connection broke): TLSMemoryBIOProtocol's loop, which buffers or
        # ends the connection as it should.
        super()._write(data)


class DirectTLSFactory(TLSMemoryBIOFactory):
    """
    ``TLSMemoryBIOFactory`` for the server side of implicit TLS, with
    :class:`DirectTLS` connections: its context must make kumoauth's
    connections (a :class:`~kumoauth.tls.context.ServerContextFactory`).
    """

    protocol = DirectTLS

    def __init__(self, context: ServerContextFactory, wrapped: Any) -> None:
        if not isinstance(context, ServerContextFactory):
            raise TypeError(f"DirectTLSFactory needs a ServerContextFactory, not {context!r}")
        super().__init__(context, False, wrapped)


def quickack(transport: Any) -> None:
    """
    Send the ACK the kernel is holding back for *transport*'s TCP socket
    now (``TCP_QUICKACK``), if it has one.
    """
    try:
        # .socket: below STARTTLS, getHandle() is the TLS connection's
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except (AttributeError, OSError):
        pass  # not a TCP socket (a test's transport, a UNIX socket), or closed


#: a transport's interface declaration -> the last interface it lists
_last: dict[Any, Any] = {}


def _last_interface(transport: Any) -> Any:
    spec = providedBy(transport)  # one shared object per kind of transport
    last = _last.get(spec)
    if last is None:
        listed = list(spec)
        if not listed:
            return ()
        last = _last[spec] = listed[-1]
    return last


def start_server_tls(connection: Any, context: ServerContextFactory) -> DirectTLS:
    """
    ``startTLS`` on the server side of a TCP *connection* with kumoauth's
    *context*: what ``twisted.internet._newtls.startTLS`` does, with a
    :class:`DirectTLS` built at once instead of a ``BufferingTLSTransport``
    recast afterwards (:func:`kumoauth.ops.transport.unbuffer`).
    """
    producer, streaming = connection.producer, connection.streamingProducer
    if producer is not None:
        connection.unregisterProducer()
    factory = TLSMemoryBIOFactory(context, False, None)  # type: ignore[arg-type]
    tls = DirectTLS(factory, connection.protocol, False)
    connection.protocol = tls
    connection.getHandle = tls.getHandle
    connection.getPeerCertificate = tls.getPeerCertificate
    directlyProvides(connection, ISSLTransport)
    connection.TLS = True
    tls.makeConnection(_BypassTLS(FileDescriptor, connection))
    if producer is not None:
        connection.registerProducer(producer, streaming)
    return tls
