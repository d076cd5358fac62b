"""
Eager writes: a command (the relay client) or a reply (the submission
listeners) leaves in the call that wrote it.

Twisted's stream transports never send from ``write()``: the bytes are
buffered, the descriptor is registered for writability (``epoll_ctl``), and
the send happens in a later reactor iteration, which then unregisters it
(``epoll_ctl`` again); over TLS, ``BufferingTLSTransport`` adds one more
iteration (it gathers small writes until a ``callLater(0)``).  The relay
client writes each pipelined group in one call
(``_ClientProtocol.commands``) and then only waits for replies, so here a
connection whose buffer is empty tries the ``send`` at once (asyncio's
transports do the same) and the TLS layer's gathering is dropped; only
what the kernel does not take is left to the reactor, the usual way.

Back-pressure (a paused producer), a connection being closed, or a
half-close all take Twisted's ordinary path.  Measured in BENCHMARKS.md:
with the relay client's pipelined DATA, 0.915x the CPU per relayed
message of the build before (workload i, ``python -m bench.ab``); on the
submission listeners (``ListenerService`` makes its port's transport
class eager), 0.886x on workload (a) and 0.968x on (i), ``epoll_ctl``
calls per session 26 -> 4 (docs/decisions.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import tcp
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

from kumoauth.tls.context import ServerContextFactory
from kumoauth.tls.direct import start_server_tls


class EagerWrites:
    """
    Mixin for a :class:`twisted.internet.tcp.Connection` subclass: send at
    once when nothing is waiting to go, instead of in a later iteration.
    """

    _eager_busy = False
    #: inside :func:`corked`: writes wait for its end
    _eager_held = False
    _eager_wanted = False

    def startWriting(self) -> None:
        if self._eager_held:
            self._eager_wanted = True  # decided when corked() ends
            return
        # Only for bytes just written to empty buffers: then nothing is
        # registered yet.  Anything else (loseConnection asking for a last
        # doWrite with nothing to send, data already waiting for the
        # reactor) takes the ordinary path, unchanged.
        if (
            self._tempDataLen  # type: ignore[attr-defined]
            and not self.dataBuffer  # type: ignore[attr-defined]
            and not self._eager_busy
            and self.connected  # type: ignore[attr-defined]
            and not self.disconnecting  # type: ignore[attr-defined]
            and not self._writeDisconnecting  # type: ignore[attr-defined]
            and (self.producer is None or not self.producerPaused)  # type: ignore[attr-defined]
        ):
            self._eager_busy = True
            try:
                # doWrite sends what the buffers hold; when all of it went,
                # it calls stopWriting (nothing registered: no system call)
                # and, with an unpaused producer, nothing else.
                failed = self.doWrite()  # type: ignore[attr-defined]
            finally:
                self._eager_busy = False
            if failed is None and not self.dataBuffer and not self._tempDataLen:  # type: ignore[attr-defined]
                return
            # The kernel took part of it, or the send failed: the reactor
            # finishes the job (and reports a failure) the ordinary way.
        super().startWriting()  # type: ignore[misc]

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        if normal and not self._tlsClientDefault and isinstance(ctx, ServerContextFactory):  # type: ignore[attr-defined]
            start_server_tls(self, ctx)  # kumoauth/tls/direct.py
            return
        super().startTLS(ctx, normal)  # type: ignore[misc]
        unbuffer(self.protocol)  # type: ignore[attr-defined]


@contextmanager
def corked(transport: Any) -> Iterator[None]:
    """
    What *transport* is asked to write inside the block goes out together
    when it ends (a reply and the TLS close_notify after it: one segment,
    one ``send``).  For an eager connection, or a TLS layer over one; other
    transports are left as they are.  Nothing is sent and nothing is
    registered with the reactor until the block ends, so it must not wait
    for anything.
    """
    tcp = transport
    while tcp is not None and not isinstance(tcp, EagerWrites):
        tcp = getattr(tcp, "transport", None)  # a TLS wrapper's TCP connection
    if tcp is None or tcp._eager_held:
        yield
        return
    tcp._eager_held = True
    try:
        yield
    finally:
        tcp._eager_held = False
        if tcp._eager_wanted:
            tcp._eager_wanted = False
            tcp.startWriting()


def unbuffer(tls: Any) -> None:
    """
    Make a just-created ``BufferingTLSTransport`` write straight through to
    TLS (its base class), as ``TLSMemoryBIOProtocol`` itself does.
    """
    if type(tls) is BufferingTLSTransport:
        tls.__dict__.pop("write", None)
        tls.__dict__.pop("_aggregator", None)
        tls.__class__ = TLSMemoryBIOProtocol  # type: ignore[assignment]


_classes: dict[type, type] = {}


def eager(transport_class: type) -> type:
    """
    The eager-writing subclass of a stream connection class (``tcp.Client``,
    ``tcp.Server``, ``unix.Server``); other classes come back unchanged.
    """
    if not (isinstance(transport_class, type) and issubclass(transport_class, tcp.Connection)):
        return transport_class
    if issubclass(transport_class, EagerWrites):
        return transport_class
    cls = _classes.get(transport_class)
    if cls is None:
        cls = type(f"Eager{transport_class.__name__}", (EagerWrites, transport_class), {})
        _classes[transport_class] = cls
    return cls


def make_eager_connection(transport: Any) -> None:
    """
    Make one connected transport (a ``tcp.Client`` an endpoint made) write
    eagerly from now on: the same object, its class swapped for the eager
    subclass, which only adds methods.
    """
    cls = eager(type(transport))
    if cls is not type(transport):
        transport.__class__ = cls
