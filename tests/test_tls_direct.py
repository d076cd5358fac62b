"""
kumoauth/tls/direct.py: DirectTLS, TLSMemoryBIOProtocol with one call into
libssl per direction, against Python's ssl module as the client, over a
StringTransport.  Every case runs on DirectTLS and on Twisted's
TLSMemoryBIOProtocol, and both must give the same outcome; the binding's
one-call methods (open, take, seal) are checked on their own too.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from OpenSSL.SSL import Error, ZeroReturnError
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from kumoauth.config import TLSConfig
from kumoauth.tls import openssl
from kumoauth.tls.context import ServerContextFactory, build_context
from kumoauth.tls.direct import DirectTLS, DirectTLSFactory

CLASSES = [DirectTLS, TLSMemoryBIOProtocol]


@pytest.fixture(scope="module")
def ca_and_factory(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Any]:
    d: Path = tmp_path_factory.mktemp("tls-direct")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(d / "cert.pem")
    cert.private_key_pem.write_to_path(d / "key.pem")
    return ca, ServerContextFactory(build_context(TLSConfig(d / "cert.pem", d / "key.pem")))


class Recorder(Protocol):
    """Records what arrives; answers "ping" with "pong"; closes on "bye"."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if data == b"ping":
            self.transport.write(b"pong")
        elif data == b"bye":
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.lost = reason


class Session:
    """
    One server-side TLS protocol of class *cls* (over an *app* protocol)
    and an ssl-module client; with *handshake*, the handshake done and the
    client's Finished delivered.
    """

    def __init__(
        self,
        ca: trustme.CA,
        scf: Any,
        cls: type,
        version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
        app: type[Protocol] | None = None,
        handshake: bool = True,
    ) -> None:
        factory = TLSMemoryBIOFactory(scf, False, Factory.forProtocol(app or Recorder))
        factory.protocol = cls
        self.tls = factory.buildProtocol(None)
        self.wire = StringTransport()
        self.tls.makeConnection(self.wire)
        self.app: Recorder = self.tls.wrappedProtocol
        cctx = ssl.create_default_context()
        ca.configure_trust(cctx)
        cctx.minimum_version = cctx.maximum_version = version
        self.to_client, self.to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = cctx.wrap_bio(self.to_client, self.to_server, server_hostname="localhost")
        if handshake:
            self.client_handshake()
            self.deliver(self.to_server.read())  # the client's Finished

    def client_handshake(self) -> None:
        """The handshake, up to the client's Finished (left with the client)."""
        while True:
            try:
                self.client.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.deliver(self.to_server.read())

    def deliver(self, data: bytes) -> None:
        """*data* to the server; what it answers to the client."""
        if data:
            self.tls.dataReceived(data)
        self.to_client.write(self.wire.value())
        self.wire.clear()

    def send(self, *chunks: bytes) -> None:
        """Each chunk as its own TLS record, all in one dataReceived."""
        for chunk in chunks:
            self.client.write(chunk)
        self.deliver(self.to_server.read())

    def read(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.client.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return out


VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cls", CLASSES)
def test_records_arrive_in_order_and_replies_go_out(ca_and_factory, cls, version):
    s = Session(*ca_and_factory, cls, version)
    s.send(b"one", b"two", b"ping", b"three")
    assert s.app.received == [b"one", b"two", b"ping", b"three"]
    assert s.read() == b"pong"
    s.send(b"ping")
    assert s.read() == b"pong"
    assert s.app.lost is None


@pytest.mark.parametrize("cls", CLASSES)
def test_a_long_write_arrives_whole(ca_and_factory, cls):
    s = Session(*ca_and_factory, cls, ssl.TLSVersion.TLSv1_3)
    big = bytes(range(256)) * 400  # 100 KiB: more than one record and one bio_read
    s.tls.write(big)
    s.tls.write(b"END")
    s.deliver(b"")
    assert s.read() == big + b"END"


@pytest.mark.parametrize("cls", CLASSES)
def test_nothing_is_delivered_after_the_app_closes_mid_chunk(ca_and_factory, cls):
    s = Session(*ca_and_factory, cls, ssl.TLSVersion.TLSv1_3)
    # "bye" makes the app close: the record after it, in the same chunk,
    # still arrives (TLS is only half-closed by our close_notify)...
    s.send(b"bye", b"after")
    assert s.app.received == [b"bye", b"after"]
    assert s.tls.disconnecting
    # ...and the client sees our close_notify: the end of the stream.
    assert s.client.read(10) == b""


@pytest.mark.parametrize("cls", CLASSES)
def test_close_notify_from_the_client_ends_the_session(ca_and_factory, cls):
    s = Session(*ca_and_factory, cls, ssl.TLSVersion.TLSv1_3)
    s.client.write(b"last")
    try:
        s.client.unwrap()
    except ssl.SSLWantReadError:
        pass
    s.deliver(s.to_server.read())
    assert s.app.received == [b"last"]
    assert s.wire.disconnecting  # TLSMemoryBIOProtocol asked the TCP side to close
    s.tls.connectionLost(Failure(ConnectionDone()))
    assert s.app.lost.check(ConnectionDone)


@pytest.mark.parametrize("cls", CLASSES)
def test_garbage_after_the_handshake_ends_the_session_with_an_error(ca_and_factory, cls):
    s = Session(*ca_and_factory, cls, ssl.TLSVersion.TLSv1_3)
    s.send(b"fine")
    s.deliver(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # an application record that fails to decrypt
    assert s.app.received == [b"fine"]
    assert s.wire.disconnecting
    s.tls.connectionLost(Failure(ConnectionDone()))
    assert s.app.lost.check(Error)  # the TLS error, not the TCP close


def test_the_factory_refuses_a_context_that_is_not_kumoauths():
    from twisted.internet.ssl import CertificateOptions

    with pytest.raises(TypeError):
        DirectTLSFactory(CertificateOptions(), Factory.forProtocol(Recorder))


def test_implicit_tls_connections_are_direct(ca_and_factory):
    factory = DirectTLSFactory(ca_and_factory[1], Factory.forProtocol(Recorder))
    tls = factory.buildProtocol(None)
    tls.makeConnection(StringTransport())
    assert type(tls) is DirectTLS


def test_a_pyopenssl_connection_keeps_twisteds_class(ca_and_factory):
    # The relay's client side (pyOpenSSL): unbuffer drops Twisted's
    # write-gathering layer and leaves TLSMemoryBIOProtocol.
    from twisted.internet.ssl import CertificateOptions
    from twisted.protocols.tls import BufferingTLSTransport

    from kumoauth.ops.transport import unbuffer

    factory = TLSMemoryBIOFactory(CertificateOptions(), True, Factory.forProtocol(Recorder))
    tls = factory.buildProtocol(None)
    assert type(tls) is BufferingTLSTransport
    tls.makeConnection(StringTransport())
    unbuffer(tls)
    assert type(tls) is TLSMemoryBIOProtocol


# --- the binding's one-call methods -------------------------------------------


def test_open_take_and_seal(ca_and_factory):
    s = Session(*ca_and_factory, TLSMemoryBIOProtocol, ssl.TLSVersion.TLSv1_3)
    conn: openssl.Connection = s.tls._tlsConnection
    assert conn.take() == b""  # nothing waiting: no exception
    s.client.write(b"a")
    s.client.write(b"bc")
    records, error = conn.open(s.to_server.read())
    assert records == [b"a", b"bc"] and error is None
    s.to_client.write(conn.seal(b"reply"))
    assert s.read() == b"reply"
    try:
        s.client.unwrap()
    except ssl.SSLWantReadError:
        pass
    records, error = conn.open(s.to_server.read())
    assert records == [] and isinstance(error, ZeroReturnError)


def test_seal_before_the_handshake_is_none_and_send_says_why(ca_and_factory):
    ca, scf = ca_and_factory
    conn = scf.serverConnectionForTLS(None)
    assert conn.seal(b"early") is None
    from OpenSSL.SSL import WantReadError

    with pytest.raises(WantReadError):
        conn.send(b"early")


@pytest.mark.parametrize("cls", CLASSES)
def test_data_with_the_clients_finished_is_delivered(ca_and_factory, cls):
    s = Session(*ca_and_factory, cls, handshake=False)
    s.client_handshake()
    s.send(b"ping")  # after the Finished, in the same chunk
    assert s.app.received == [b"ping"]
    assert s.client.read(100) == b"pong"


@pytest.mark.parametrize("cls", CLASSES)
def test_a_broken_client_hello_ends_the_session_with_an_error(ca_and_factory, cls):
    s = Session(*ca_and_factory, cls, handshake=False)
    s.tls.dataReceived(b"\x16\x03\x01\x00\x05hello")  # a handshake record that is not one
    assert s.wire.disconnecting
    assert s.wire.value()  # the alert
    s.tls.connectionLost(Failure(ConnectionDone()))
    assert s.app.lost.check(Error)


@pytest.mark.parametrize("cls", CLASSES)
def test_the_greeting_written_before_the_handshake_goes_after_it(ca_and_factory, cls):
    # Implicit TLS: the protocol greets in connectionMade, before any TLS.
    class Greeter(Recorder):
        def connectionMade(self) -> None:
            self.transport.write(b"220 hello")

    s = Session(*ca_and_factory, cls, app=Greeter, handshake=False)
    assert s.wire.value() == b""
    s.client_handshake()
    s.deliver(s.to_server.read())
    assert s.client.read(100) == b"220 hello"
