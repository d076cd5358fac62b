"""
kumoauth.ops.transport: eager writes on real loopback sockets, on the real
reactor (in a thread), against Twisted's own transport as the control.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from typing import Any

import pytest
import trustme
from twisted.internet import defer, protocol
from twisted.protocols.tls import BufferingTLSTransport

from kumoauth.config import TLSConfig
from kumoauth.ops.transport import EagerWrites, corked, eager, make_eager_connection
from kumoauth.tls.context import ServerContextFactory, build_context
from kumoauth.tls.direct import DirectTLS
from tests.upstream import in_reactor, start_reactor


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


@pytest.fixture
def tls_server(tmp_path: Any) -> tuple[trustme.CA, ServerContextFactory]:
    """A CA and kumoauth's server context with a certificate it issued."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    options = ServerContextFactory(
        build_context(TLSConfig(tmp_path / "cert.pem", tmp_path / "key.pem"))
    )
    return ca, options


class Recorder(protocol.Protocol):
    """Writes what the test asks for and reports the transport's state right after."""

    def connectionMade(self) -> None:
        self.factory.made.callback(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += data  # type: ignore[attr-defined]


def listen(reactor: Any) -> tuple[Any, Any]:
    factory = protocol.Factory.forProtocol(Recorder)
    factory.made = defer.Deferred()  # type: ignore[attr-defined]
    factory.received = b""  # type: ignore[attr-defined]
    port = in_reactor(reactor.listenTCP, 0, factory, interface="127.0.0.1")
    return port, factory


def accepted(reactor: Any, eager_port: bool) -> tuple[Any, Any, socket.socket]:
    """A connection from a plain socket; its Twisted end made eager or not."""
    port, factory = listen(reactor)
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    proto = in_reactor(lambda: factory.made)
    if eager_port:
        in_reactor(make_eager_connection, proto.transport)
    return port, proto, client


def write_and_look(proto: Any, data: bytes) -> tuple[int, bool]:
    """Write, then report (bytes still buffered, registered for writing)."""
    t = proto.transport
    t.write(data)
    pending = len(t.dataBuffer) - t.offset + t._tempDataLen
    return pending, t in t.reactor.getWriters()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("eager_port", [True, False], ids=["eager", "twisted"])
def test_a_reply_leaves_in_the_call_that_wrote_it(reactor, eager_port):
    port, proto, client = accepted(reactor, eager_port)
    with client:
        pending, registered = in_reactor(write_and_look, proto, b"250 2.0.0 OK\r\n")
        if eager_port:
            assert isinstance(proto.transport, EagerWrites)
            # Sent already: nothing buffered, no epoll registration.
            assert (pending, registered) == (0, False)
        else:
            # Twisted's own transport (the control): buffered for a later
            # iteration.
            assert pending == 14 and registered
        assert recv_exactly(client, 14) == b"250 2.0.0 OK\r\n"
    in_reactor(port.stopListening)


@pytest.mark.parametrize("cork", [False, True], ids=["plain", "corked"])
def test_write_then_lose_connection_still_closes(reactor, cork):
    # loseConnection asks for a last doWrite with nothing left to send; the
    # eager path must leave that to the reactor, or the close never comes;
    # inside corked() as well.
    port, proto, client = accepted(reactor, True)
    with client:

        def write_and_close() -> None:
            with corked(proto.transport) if cork else contextlib.nullcontext():
                proto.transport.write(b"421 4.7.0 bye\r\n")
                proto.transport.loseConnection()

        in_reactor(write_and_close)
        client.settimeout(5)
        got = b""
        while chunk := client.recv(1000):
            got += chunk
        assert got == b"421 4.7.0 bye\r\n"
    in_reactor(port.stopListening)


def test_more_than_the_kernel_takes_goes_out_whole(reactor):
    # The client does not read yet: the kernel takes part, the reactor
    # sends the rest later, in order.
    port, proto, client = accepted(reactor, True)
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB
    with client:
        pending, registered = in_reactor(write_and_look, proto, big)
        assert pending > 0 and registered
        in_reactor(proto.transport.write, b"END")
        assert recv_exactly(client, len(big) + 3) == big + b"END"
    in_reactor(port.stopListening)


def test_starttls_on_an_eager_connection_writes_straight_through(reactor, tls_server):
    ca, options = tls_server
    port, proto, client = accepted(reactor, True)
    in_reactor(proto.transport.startTLS, options)
    tls = proto.transport.protocol
    # Twisted's write-gathering layer (a callLater(0) per reply) is gone.
    assert type(tls) is DirectTLS and not isinstance(tls, BufferingTLSTransport)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with ctx.wrap_socket(client, server_hostname="localhost") as tls_client:
        tls_client.sendall(b"EHLO x\r\n")
        in_reactor(proto.transport.write, b"250 hello\r\n")
        assert recv_exactly(tls_client, 11) == b"250 hello\r\n"
    in_reactor(port.stopListening)


def test_eager_classes():
    from twisted.internet import tcp, unix

    assert issubclass(eager(tcp.Server), tcp.Server) and issubclass(eager(tcp.Server), EagerWrites)
    assert eager(tcp.Server) is eager(tcp.Server)
    assert eager(eager(tcp.Server)) is eager(tcp.Server)
    assert issubclass(eager(unix.Server), unix.Server)
    assert eager(object) is object  # not a stream connection: unchanged


def test_make_eager_connection_swaps_a_live_client(reactor):
    from twisted.internet.endpoints import TCP4ClientEndpoint

    port, factory = listen(reactor)
    client_proto = in_reactor(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect,
        protocol.Factory.forProtocol(protocol.Protocol),
    )
    server_proto = in_reactor(lambda: factory.made)
    in_reactor(make_eager_connection, client_proto.transport)
    assert isinstance(client_proto.transport, EagerWrites)
    pending, registered = in_reactor(write_and_look, client_proto, b"MAIL FROM:<>\r\n")
    assert (pending, registered) == (0, False)
    # ... and the other end has it, whole.
    deadline = time.monotonic() + 5
    while in_reactor(lambda: factory.received) != b"MAIL FROM:<>\r\n":
        assert time.monotonic() < deadline, factory.received
        time.sleep(0.01)
    in_reactor(client_proto.transport.loseConnection)
    in_reactor(port.stopListening)
    assert server_proto is not None


def test_a_listeners_connections_write_eagerly(reactor):
    """
    The submission listeners' ports make eager connections: a reply leaves
    in the call that wrote it (kumoauth.ops.listening.ListenerService).
    """
    from twisted.internet import endpoints

    from kumoauth.ops.listening import ListenerService

    factory = protocol.Factory.forProtocol(Recorder)
    factory.made = defer.Deferred()  # type: ignore[attr-defined]
    factory.received = b""  # type: ignore[attr-defined]
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    svc = ListenerService("tcp:0", endpoint, factory, "test.toml")
    in_reactor(svc.privilegedStartService)
    port = svc.port
    assert port is not None
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    with client:
        proto = in_reactor(lambda: factory.made)
        assert isinstance(proto.transport, EagerWrites)
        pending, registered = in_reactor(write_and_look, proto, b"220 ready\r\n")
        assert (pending, registered) == (0, False)
        assert recv_exactly(client, 11) == b"220 ready\r\n"
    in_reactor(port.stopListening)


def test_corked_writes_leave_together_when_the_block_ends(reactor):
    port, proto, client = accepted(reactor, True)

    def corked_writes() -> list[tuple[int, bool]]:
        t = proto.transport
        seen = []
        with corked(t):
            t.write(b"221 2.0.0 bye\r\n")
            t.write(b"CLOSE")
            # Held: buffered, not sent, not registered with the reactor.
            seen.append((t._tempDataLen, t in t.reactor.getWriters()))
        # The end of the block sent both in one go.
        seen.append((t._tempDataLen + len(t.dataBuffer) - t.offset, t in t.reactor.getWriters()))
        return seen

    with client:
        assert in_reactor(corked_writes) == [(20, False), (0, False)]
        assert recv_exactly(client, 20) == b"221 2.0.0 bye\r\nCLOSE"
    in_reactor(port.stopListening)


def test_corked_leaves_other_transports_alone():
    from twisted.internet.testing import StringTransport

    t = StringTransport()
    with corked(t):
        t.write(b"x")
        assert t.value() == b"x"


def test_direct_starttls_leaves_what_twisteds_startTLS_leaves(reactor, tls_server):
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import directlyProvidedBy, providedBy

    options = tls_server[1]
    seen = []
    for eager_port in (True, False):
        port, proto, client = accepted(reactor, eager_port)
        with client:
            proto.transport.registerProducer(proto, True)  # as the SMTP protocol does
            in_reactor(proto.transport.startTLS, options)
            t = proto.transport
            tls = t.protocol
            seen.append(
                (
                    list(directlyProvidedBy(tls)),
                    list(providedBy(tls)),
                    ISSLTransport.providedBy(t),
                    t.TLS,
                    t.getHandle() is tls._tlsConnection,
                    t.producer is not None,
                    tls._producer is not None,
                )
            )
            assert (type(tls) is DirectTLS) is eager_port
        in_reactor(port.stopListening)
    assert seen[0] == seen[1]
    assert seen[0][1] and all(seen[0][2:])
