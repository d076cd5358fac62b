"""
kumoauth/ops/reactor.py: the epoll reactor dispatching ready descriptors
without the legacy log context, run for real (its own EPollReactor
instance, real sockets on 127.0.0.1).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import globalLogPublisher
from twisted.python import log as legacy_log

from kumoauth.ops.reactor import DirectDispatchEPollReactor, streamline


class Boom(Exception):
    pass


class Server(Protocol):
    lost: list[Any] = []

    def dataReceived(self, data: bytes) -> None:
        if b"boom" in data:
            raise Boom("a bug in dataReceived")
        self.transport.write(b"echo " + data)

    def connectionLost(self, reason: Any) -> None:
        Server.lost.append(reason)


class Client(Protocol):
    """Sends one message, hangs up at the first reply; reports what it got."""

    def __init__(self, send: bytes, done: Any) -> None:
        self.send, self.done, self.got = send, done, b""

    def connectionMade(self) -> None:
        self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.done(self.got)


def converse(reactor: Any, messages: list[bytes]) -> list[bytes]:
    """
    A server on *reactor*, one connection per message in turn: what each
    got back (b"" when the server dropped it).
    """
    Server.lost = []
    port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
    answers: list[bytes] = []

    def next_one(got: bytes | None = None) -> None:
        if got is not None:
            answers.append(got)
        if len(answers) == len(messages):
            reactor.stop()
            return
        message = messages[len(answers)]
        reactor.connectTCP(
            "127.0.0.1",
            port.getHost().port,
            ClientFactory.forProtocol(lambda: Client(message, next_one)),
        )

    reactor.callWhenRunning(next_one)
    timeout = reactor.callLater(10, reactor.stop)
    reactor.run(installSignalHandlers=False)
    if timeout.active():
        timeout.cancel()
    port.stopListening()
    return answers


def test_streamline_swaps_only_the_epoll_reactor():
    epoll = EPollReactor()
    select = SelectReactor()
    try:
        assert streamline(epoll) is True
        assert type(epoll) is DirectDispatchEPollReactor
        assert streamline(epoll) is True  # again: unchanged
        assert streamline(select) is False
        assert type(select) is SelectReactor
    finally:
        epoll._poller.close()


def test_connections_are_served_without_a_log_context_and_a_bug_is_logged(monkeypatch):
    wrapped: list[Any] = []
    original = legacy_log.callWithLogger

    def counting(logger: Any, func: Any, *args: Any, **kw: Any) -> Any:
        wrapped.append(logger)
        return original(logger, func, *args, **kw)

    monkeypatch.setattr(legacy_log, "callWithLogger", counting)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        # Twisted's reactor: every ready descriptor goes through callWithLogger.
        plain = EPollReactor()
        expected = converse(plain, [b"one", b"boom", b"two"])
        assert expected == [b"echo one", b"", b"echo two"]
        assert len(wrapped) >= 10
        del wrapped[:]
        # Streamlined: the same outcome, none of them does.
        reactor = EPollReactor()
        assert streamline(reactor)
        del events[:]
        assert converse(reactor, [b"one", b"boom", b"two"]) == expected
        assert wrapped == []
    finally:
        globalLogPublisher.removeObserver(events.append)
    # The bug cost its own connection only, and was logged with its traceback.
    failures = [e.get("log_failure") or e.get("failure") for e in events]
    assert [f for f in failures if f is not None and f.check(Boom)]
    assert sum(1 for r in Server.lost if r.check(Boom)) == 1
