"""
Listening: binding listeners (before twistd drops privileges), adopting
sockets a supervisor bound, signals, and the small web site for metrics.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger, globalLogPublisher, jsonFileLogObserver
from twisted.web.server import Site
from zope.interface import provider

from kumoauth.ops.logfile import log_is_stderr
from kumoauth.ops.proxyheader import ProxyHeaderFactory
from kumoauth.ops.transport import eager
from kumoauth.ops.worklog import WORKER_LINE
from kumoauth.smtp.protocol import SubmissionFactory, wrap_listener

log = Logger(namespace="kumoauth")


class ListenError(Exception):
    """
    A listener could not bind: an operator error, one line.
    """


def bind(endpoint: Any, factory: Any, source: str, key: str, description: str) -> Any:
    """
    Listen on *endpoint* now; raise :class:`ListenError` (one line naming
    the file and key) if it cannot.
    """
    result: list[Any] = []
    endpoint.listen(factory).addBoth(result.append)
    if not result or not IListeningPort.providedBy(result[0]):
        reason = result[0].getErrorMessage() if result else "did not bind at once"
        raise ListenError(f'{source}: {key} "{description}": cannot listen: {reason}')
    return result[0]


def fail_start(message: str) -> NoReturn:
    """
    Stop start-up with one line for the operator and exit status 1.  By now
    twistd has redirected sys.stderr into the log; the operator's terminal
    is still file descriptor 2 (unless both are one, when the line is
    written once).
    """
    if not log_is_stderr():
        log.critical("{message}", message=message)
    os.write(2, f"kumoauth: error: {message}\n".encode())
    raise SystemExit(1)


class ListenerService(service.Service):
    """
    Binds one listener in ``privilegedStartService`` (before twistd drops
    privileges).  A listener that cannot bind is an operator error: one
    line on stderr and exit status 1.
    """

    def __init__(
        self,
        description: str,
        endpoint: Any,
        factory: Any,
        source: str,
        key: str = "[[listener]] endpoint",
        proxied: bool = False,
    ) -> None:
        self.description = description
        self.endpoint = endpoint
        self.submission_factory = factory if isinstance(factory, SubmissionFactory) else None
        self.factory = wrap_listener(factory) if self.submission_factory else factory
        #: the peers whose PROXY header is believed, as served (a reload
        #: cannot change them: kumoauth/ops/service.py warns)
        self.proxy_networks: tuple[Any, ...] = ()
        if proxied:  # a haproxy: endpoint: the session starts after the header
            from twisted.internet import reactor

            assert self.submission_factory is not None
            rt, listener = self.submission_factory.runtime, self.submission_factory.listener
            self.factory = ProxyHeaderFactory(
                self.factory,
                reactor,
                networks=listener.proxy_networks,
                max_waiting=rt.server.max_connections,
            )
            self.proxy_networks = tuple(listener.proxy_networks)
        self.source = source
        self.key = key
        self.port: IListeningPort | None = None

    #: (file descriptor, address family) of a socket a supervisor bound for
    #: this worker (``[server] workers``); None: bind the endpoint here.
    adopt: tuple[int, int] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.adopt is not None:
            from twisted.internet import reactor

            fd, family = self.adopt
            self.port = reactor.adoptStreamPort(fd, family, self.factory)  # type: ignore[attr-defined]
        else:
            try:
                self.port = bind(
                    self.endpoint, self.factory, self.source, self.key, self.description
                )
            except ListenError as e:
                fail_start(str(e))
        assert self.port is not None
        # Connections send a reply in the call that writes it, not an
        # iteration later (kumoauth/ops/transport.py).
        if hasattr(self.port, "transport"):
            self.port.transport = eager(self.port.transport)  # type: ignore[attr-defined]
        log.info(
            "listening on {address} ({tls})", address=str(self.port.getHost()), tls=self.factory_tls
        )

    @property
    def factory_tls(self) -> str:
        if self.submission_factory is None:
            return "metrics"
        return self.submission_factory.listener.tls

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stop_listening(self) -> Any:
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None

    def stopService(self) -> Any:
        super().stopService()
        return self.stop_listening()


def install_signals(reactor: Any, on_hup: Callable[[], object]) -> None:
    """
    SIGHUP calls *on_hup* and SIGTERM stops the reactor, from now on: the
    listeners are bound before the reactor runs, and a signal in that
    moment must not kill the process (their default action); a SIGTERM
    then stops the server as soon as it runs.  Once the reactor runs
    (after Twisted has installed its own handlers) they are installed
    again: SIGTERM stops the reactor like Twisted's handler, but without
    making the process end "killed by SIGTERM" — a drained, orderly stop
    is a success, exit status 0.
    """

    def on_sighup(signum: int, frame: Any) -> None:
        reactor.callFromThread(on_hup)

    def stop() -> None:
        # A second SIGTERM while the first stop drains is not an error.
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    def on_sigterm(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop)

    signal.signal(signal.SIGHUP, on_sighup)
    signal.signal(signal.SIGTERM, on_sigterm)

    def install() -> None:
        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGHUP, on_sighup)

    reactor.callWhenRunning(install)


class QuietSite(Site):
    """
    No access-log line per scrape.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


def open_json_log(path: Path) -> Any:
    """
    Add an observer that writes kumoauth's own events (namespaces
    ``kumoauth``, ``kumoauth.auth``, ``kumoauth.smtp``) as JSON lines;
    in a supervisor, not the lines it relays from its workers (each wrote
    its own, with their fields).
    """
    stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    # One JSON object per line, as the reference says: no RFC 7464
    # record separator before each (Twisted's default), which `json.loads`
    # of a line and most log shippers do not take.
    json_observer = jsonFileLogObserver(stream, recordSeparator="")

    @provider(ILogObserver)
    def kumoauth_only(event: dict[str, Any]) -> None:
        if event.get(WORKER_LINE):
            return
        namespace = event.get("log_namespace") or ""
        if namespace == "kumoauth" or namespace.startswith("kumoauth."):
            json_observer(event)

    globalLogPublisher.addObserver(kumoauth_only)
    return kumoauth_only
