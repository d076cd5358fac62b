"""
``haproxy:`` listeners (PROXY protocol v1 and v2): the session starts once
the header has named the client, so the connection limits, the throttles,
the log's ``client=`` and conn_meta's ``received_from`` all see the client,
never the proxy.

The wrapper alone on a StringTransport (headers whole, split, invalid,
missing), then real ``twistd kumoauth`` processes (one process and two
workers) with smtplib clients that send the header HAProxy would.
"""

from __future__ import annotations

import contextlib
import ipaddress
import smtplib
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from kumoauth.ops.proxyheader import HEADER_TIMEOUT, ProxyHeaderFactory, split
from tests.server import running_server
from tests.test_e2e import POLICY, login, queued_id, spooled
from tests.test_shared_state_e2e import wait_for

V1 = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 587\r\n"


def v2(source: str, port: int = 40000) -> bytes:
    """A PROXY v2 header for a TCP over IPv4 client at *source*."""
    addresses = socket.inet_aton(source) + socket.inet_aton("10.0.0.1")
    body = addresses + struct.pack("!HH", port, 465)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


class Session(Protocol):
    """Records what a session would see: its peer when it starts, its data."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.data = b""
        self.lost = 0

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peers.append(f"{peer.host}:{peer.port}")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost += 1


class Sessions(Factory):
    def __init__(self) -> None:
        self.made: list[Session] = []

    def buildProtocol(self, addr: object) -> Session:
        session = Session()
        self.made.append(session)
        return session


def connect(
    factory: ProxyHeaderFactory | None = None, peer: str = "127.0.0.1"
) -> tuple[Sessions, StringTransport, Protocol, Clock]:
    if factory is None:
        factory = ProxyHeaderFactory(Sessions(), Clock())
    sessions, clock = factory.wrappedFactory, factory.clock
    transport = StringTransport(peerAddress=_proxy_address(peer))
    wrapper = factory.buildProtocol(transport.getPeer())
    wrapper.makeConnection(transport)
    return sessions, transport, wrapper, clock


def _proxy_address(host: str = "127.0.0.1"):
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, 51000)


@contextlib.contextmanager
def logged() -> list[str]:
    lines: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "kumoauth" and "why" in event:
            lines.append(f"closed {event['client']}: {event['why']}")

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def test_split_takes_off_the_prefix():
    assert split("haproxy:tcp:587") == ("tcp:587", True)
    assert split("tcp:587") == ("tcp:587", False)


def test_the_session_starts_after_the_header_and_sees_the_client():
    sessions, transport, wrapper, _ = connect()
    assert sessions.made[0].peers == []  # nothing started before the header
    wrapper.dataReceived(V1 + b"EHLO client.example\r\n")
    session = sessions.made[0]
    assert session.peers == ["198.51.100.7:40000"]
    assert session.data == b"EHLO client.example\r\n"  # what followed, in the same read
    wrapper.dataReceived(b"QUIT\r\n")
    assert session.data.endswith(b"QUIT\r\n")
    wrapper.connectionLost(None)
    assert session.lost == 1


@pytest.mark.parametrize("cut", [1, 5, 20, len(V1) - 1])
def test_a_header_split_across_reads(cut):
    sessions, _, wrapper, _ = connect()
    wrapper.dataReceived(V1[:cut])
    assert sessions.made[0].peers == []
    wrapper.dataReceived(V1[cut:])
    assert sessions.made[0].peers == ["198.51.100.7:40000"]


def test_a_v2_header():
    sessions, _, wrapper, _ = connect()
    wrapper.dataReceived(v2("203.0.113.9", 41000))
    assert sessions.made[0].peers == ["203.0.113.9:41000"]


def test_a_bare_proxy_unknown_starts_the_session_with_the_connections_own_peer():
    # "PROXY UNKNOWN" alone (15 bytes, under the 16 that tell v1 from v2,
    # and without the fields Twisted's parser wants): a health check's
    # header, valid in the protocol. What follows it goes to the session.
    sessions, transport, wrapper, _ = connect()
    wrapper.dataReceived(b"PROXY UNKNOWN\r\n")
    assert sessions.made[0].peers == ["127.0.0.1:51000"]
    wrapper.dataReceived(b"QUIT\r\n")
    assert sessions.made[0].data == b"QUIT\r\n"
    assert not transport.disconnecting


def test_proxy_unknown_starts_the_session_with_the_connections_own_peer():
    sessions, transport, wrapper, _ = connect()
    wrapper.dataReceived(b"PROXY UNKNOWN ffff::1 ffff::1 1 2\r\n")
    assert sessions.made[0].peers == ["127.0.0.1:51000"]
    assert not transport.disconnecting


def test_an_invalid_header_closes_without_a_session():
    sessions, transport, wrapper, _ = connect()
    with logged() as lines:
        wrapper.dataReceived(b"EHLO client.example\r\n")
    assert transport.disconnecting
    assert sessions.made[0].peers == []
    wrapper.connectionLost(None)
    assert sessions.made[0].lost == 0  # never started: nothing to tell it
    assert lines == ["closed 127.0.0.1:51000: an invalid PROXY header"]


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 1.2.3.4\x1b[31m 10.0.0.1 40000 587\r\n",  # a terminal escape
        b"PROXY TCP4 6.6.6.6\nBcc:\tvictim@example.org 10.0.0.1 1 2\r\n",  # a header line
        b"PROXY TCP4 999.2.3.4 10.0.0.1 40000 587\r\n",
        b"PROXY TCP4 198.51.100.07 10.0.0.1 40000 587\r\n",  # octal-looking
        b"PROXY TCP4 198.51.100.7 10.0.0.1 99999 587\r\n",
        b"PROXY TCP4 198.51.100.7 10.0.0.1 -1 587\r\n",
        b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 65536\r\n",
        b"PROXY TCP4 198.51.100.7 example.org 40000 587\r\n",  # the destination too
        b"PROXY TCP4 2001:db8::1 10.0.0.1 40000 587\r\n",  # not of its family
        b"PROXY TCP6 198.51.100.7 2001:db8::2 40000 587\r\n",
        b"PROXY TCP6 fe80::1%eth0 2001:db8::2 40000 587\r\n",  # a zone
        b"PROXY TCP4 \x80.2.3.4 10.0.0.1 40000 587\r\n",  # not UTF-8: was a traceback
        b"PROXY TCP4 198.51.100.7 10.0.0.1 x 587\r\n",  # not a number: was a traceback
    ],
    ids=[
        "escape",
        "line-feed",
        "octet",
        "leading-zero",
        "port",
        "negative-port",
        "destination-port",
        "destination",
        "tcp4-v6",
        "tcp6-v4",
        "zone",
        "not-utf-8",
        "not-a-number",
    ],
)
def test_a_header_naming_no_valid_address_closes_without_a_session(header):
    # Twisted's v1 parser takes any text for an address and any integer for
    # a port: without this check the session's client was whatever the
    # header said, raw, into the log, conn_meta and the Received: header.
    sessions, transport, wrapper, _ = connect()
    with logged() as lines:
        wrapper.dataReceived(header + b"EHLO client.example\r\n")
    assert transport.disconnecting
    assert sessions.made[0].peers == [] and sessions.made[0].data == b""
    assert lines == ["closed 127.0.0.1:51000: an invalid PROXY header"]
    with logged() as lines:
        wrapper.dataReceived(b"QUIT\r\n")  # already refused: nothing more
    assert lines == [] and sessions.made[0].data == b""


def test_a_tcp6_header_names_its_client():
    sessions, transport, wrapper, _ = connect()
    wrapper.dataReceived(b"PROXY TCP6 2001:db8::7 2001:db8::2 40000 587\r\n")
    assert sessions.made[0].peers == ["2001:db8::7:40000"]
    assert not transport.disconnecting


@given(
    source=st.text(
        st.characters(codec="latin-1", exclude_characters=" \r"), min_size=1, max_size=60
    ),
    port=st.integers(-(2**20), 2**20),
)
def test_a_v1_header_starts_a_session_only_for_a_printable_ip_client(source, port):
    header = f"PROXY TCP4 {source} 10.0.0.1 {port} 587\r\n".encode("latin-1")
    sessions, transport, wrapper, _ = connect()
    with logged():
        wrapper.dataReceived(header)
    if sessions.made[0].peers:
        host, _, seen_port = sessions.made[0].peers[0].rpartition(":")
        assert ipaddress.ip_address(host).version == 4 and host.isprintable()
        assert 0 <= int(seen_port) <= 65535
    else:
        assert transport.disconnecting


def test_no_header_in_time_closes_without_a_session():
    sessions, transport, wrapper, clock = connect()
    wrapper.dataReceived(V1[:10])
    with logged() as lines:
        clock.advance(HEADER_TIMEOUT - 0.1)
        assert not transport.disconnecting
        clock.advance(0.2)
    assert transport.disconnecting
    assert lines == [f"closed 127.0.0.1:51000: no PROXY header within {HEADER_TIMEOUT:g}s"]
    wrapper.connectionLost(None)
    assert sessions.made[0].peers == [] and sessions.made[0].lost == 0


def test_the_timer_stops_once_the_header_is_read():
    sessions, transport, wrapper, clock = connect()
    wrapper.dataReceived(V1)
    clock.advance(HEADER_TIMEOUT * 2)
    assert not transport.disconnecting
    assert clock.getDelayedCalls() == []
    assert sessions.made[0].peers == ["198.51.100.7:40000"]


def test_only_proxy_networks_may_send_a_header():

    networks = (ipaddress.ip_network("10.0.0.0/8"),)
    factory = ProxyHeaderFactory(Sessions(), Clock(), networks=networks)
    with logged() as lines:
        sessions, transport, wrapper, _ = connect(factory, peer="192.0.2.1")
        assert transport.disconnecting  # closed before it sends anything
        connect(factory, peer="192.0.2.1")  # the same peer again: counted, not logged
    assert lines == ["closed 192.0.2.1:51000: not from proxy_networks"]
    sessions, transport, wrapper, _ = connect(factory, peer="10.1.2.3")
    wrapper.dataReceived(V1)
    assert sessions.made[-1].peers == ["198.51.100.7:40000"]


def test_connections_waiting_for_a_header_are_bounded():
    factory = ProxyHeaderFactory(Sessions(), Clock(), max_waiting=2)
    first = connect(factory)
    connect(factory)
    with logged() as lines:
        _, transport, _, _ = connect(factory)
    assert transport.disconnecting
    assert lines == ["closed 127.0.0.1:51000: 2 connections already wait for a PROXY header"]
    first[2].dataReceived(V1)  # one header read: room for one more
    _, transport, _, _ = connect(factory)
    assert not transport.disconnecting
    assert factory.waiting == 2


# --------------------------------------------------------------------------
# end to end


class _Header(smtplib.SMTP):
    """smtplib, sending a PROXY header as soon as it has connected."""

    header = b""

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self.header)
        return sock


class ProxiedSMTP(_Header):
    def __init__(self, header: bytes, port: int) -> None:
        self.header = header
        super().__init__("127.0.0.1", port, timeout=10)


class ProxiedSMTPSSL(smtplib.SMTP_SSL, _Header):
    def __init__(self, header: bytes, port: int, context) -> None:
        self.header = header
        super().__init__("127.0.0.1", port, timeout=10, context=context)


def v1(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 10.0.0.1 {port} 587\r\n".encode()


def proxied_listeners(starttls: int, implicit: int, extra: str = "") -> str:
    return (
        f'[[listener]]\nendpoint = "haproxy:tcp:{starttls}:interface=127.0.0.1"\n'
        f'tls = "starttls"\n{extra}'
        f'[[listener]]\nendpoint = "haproxy:tcp:{implicit}:interface=127.0.0.1"\n'
        f'tls = "implicit"\n{extra}'
    )


def starttls(header: bytes, port: int, certs) -> smtplib.SMTP:
    s = ProxiedSMTP(header, port)
    s.ehlo("client.example")
    s.starttls(context=certs.client_context())
    s.ehlo("client.example")
    return s


def test_behind_haproxy_limits_logs_and_meta_see_the_client(tmp_path, certs):
    from tests.server import free_port

    ports = free_port(), free_port()
    with running_server(
        tmp_path,
        certs,
        POLICY,
        server="max_connections_per_ip = 2",
        throttle="max_failures_per_ip = 2\nmax_failures_per_authc = 100",
        extra=proxied_listeners(*ports),
    ) as srv:
        assert wait_for(lambda: _accepts(ports[0]))
        # Three clients, two connections each, through one proxy address:
        # each client is under its own limit of two.
        with contextlib.ExitStack() as stack:
            for n in range(3):
                for _ in range(2):
                    s = stack.enter_context(ProxiedSMTP(v1(f"198.51.100.{n + 1}"), ports[0]))
                    assert s.noop()[0] == 250
            # the same client a third time is over its limit
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                ProxiedSMTP(v1("198.51.100.1"), ports[0])
            assert refused.value.smtp_code == 421

        # The throttle counts the client: two failures lock 198.51.100.8,
        # not 198.51.100.9 behind the same proxy.
        for password in ("one", "two"):
            with starttls(v1("198.51.100.8"), ports[0], certs) as s:
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    login(s, "PLAIN", "scott", password)
        with starttls(v1("198.51.100.8"), ports[0], certs) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError) as locked:
                login(s, "PLAIN", "scott", "tiger")
            assert locked.value.smtp_code == 454
        assert_client_seen(srv, ports, certs)

        # A v1 header whose "address" is text (a line feed and a header
        # field, an escape): closed before the banner, with a line that
        # does not quote it.
        stored = len(list(srv.spool.rglob("*")))
        for header in (
            b"PROXY TCP4 6.6.6.6\nBcc:\tvictim@example.org 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\x1b[31m 10.0.0.1 1 2\r\n",
        ):
            with pytest.raises(smtplib.SMTPServerDisconnected):
                ProxiedSMTP(header, ports[0])
        # (the second from the same peer for the same reason is counted, not logged)
        assert wait_for(lambda: ": an invalid PROXY header" in srv.log())
        log = srv.log()
        assert log.count(": an invalid PROXY header") == 1
        assert "victim@example.org" not in log and "\x1b" not in log and "6.6.6.6" not in log
        assert len(list(srv.spool.rglob("*"))) == stored


def test_a_peer_outside_proxy_networks_gets_no_session(tmp_path, certs):
    from tests.server import free_port

    ports = free_port(), free_port()
    extra = 'proxy_networks = ["10.0.0.0/8"]\n'
    with running_server(tmp_path, certs, POLICY, extra=proxied_listeners(*ports, extra)) as srv:
        assert wait_for(lambda: _accepts(ports[0]))
        with pytest.raises(smtplib.SMTPServerDisconnected):
            ProxiedSMTP(v1("198.51.100.1"), ports[0])
        assert wait_for(lambda: "not from proxy_networks" in srv.log())
        assert "client=198.51.100.1" not in srv.log()
        # A reload cannot change who may send a header: it says so, and the
        # served networks stay.
        from tests.test_reload import hup_and_wait

        srv.config.write_text(srv.config.read_text().replace("10.0.0.0/8", "127.0.0.0/8"))
        hup_and_wait(srv, "reloaded configuration")
        assert srv.log().count("proxy_networks changed: it needs a restart") == 2
        with pytest.raises(smtplib.SMTPServerDisconnected):
            ProxiedSMTP(v1("198.51.100.2"), ports[0])


def test_behind_haproxy_with_workers(tmp_path, certs):
    # Refused at start-up before; now each worker reads the header.
    from tests.server import free_port

    ports = free_port(), free_port()
    with running_server(
        tmp_path, certs, POLICY, server="workers = 2", extra=proxied_listeners(*ports)
    ) as srv:
        assert wait_for(lambda: _accepts(ports[0]))
        assert_client_seen(srv, ports, certs)
        assert "client=198.51.100.8" not in srv.log()


def sent_meta(srv, s: smtplib.SMTP) -> dict:
    """Log in as scott, send one message, and return its stored meta."""
    assert login(s, "PLAIN", "scott", "tiger")[0] == 235
    s.mail("scott@example.com")
    s.rcpt("rcpt@example.net")
    mid = queued_id(s.data(b"Subject: t\r\n\r\nhi\r\n")[1])
    return spooled(srv, mid).meta


def assert_client_seen(srv, ports: tuple[int, int], certs) -> None:
    """A message's meta and the AUTH log lines name the proxied client."""
    with starttls(v1("198.51.100.9"), ports[0], certs) as s:
        meta = sent_meta(srv, s)
    assert meta["received_from"] == "198.51.100.9:40000"
    # the connection's own peer, the proxy, kept beside it (across STARTTLS)
    assert meta["received_from_proxy"].startswith("127.0.0.1:")
    # Implicit TLS with a v2 header.
    with ProxiedSMTPSSL(v2("203.0.113.5"), ports[1], certs.client_context()) as s:
        s.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            login(s, "PLAIN", "scott", "wrong")
    with ProxiedSMTPSSL(v2("203.0.113.6"), ports[1], certs.client_context()) as s:
        s.ehlo("client.example")
        meta = sent_meta(srv, s)
    assert meta["received_from"] == "203.0.113.6:40000"
    assert meta["received_from_proxy"].startswith("127.0.0.1:")
    assert wait_for(lambda: "client=203.0.113.5:40000" in srv.log())
    log = srv.log()
    assert "client=198.51.100.9:40000" in log
    assert "client=127.0.0.1" not in log  # the proxy is never the client
    assert "Traceback" not in log


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
