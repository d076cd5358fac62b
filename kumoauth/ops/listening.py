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
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger, globalLogPublisher, jsonFileLogObserver
from twisted.web.server import Site
from zope.interface import provider

from kumoauth.ops.logfile import forget_reopen, log_is_stderr, on_reopen, reopen_logs
from kumoauth.ops.proxyheader import ProxyHeaderFactory
from kumoauth.ops.transport import eager
from kumoauth.ops.worklog import WORKER_LINE
from kumoauth.smtp.protocol import SubmissionFactory, wrap_listener
from kumoauth.textsafe import escape

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
    address = (
        getattr(endpoint, "_address", None) if isinstance(endpoint, UNIXServerEndpoint) else None
    )
    if isinstance(address, str) and not os.path.isdir(os.path.dirname(address) or "."):
        # Twisted's own words name its lock file and a process id.
        where = os.path.dirname(address)
        raise ListenError(
            f'{source}: {key} "{description}": cannot listen: no such directory: {where}'
        )
    result: list[Any] = []
    endpoint.listen(factory).addBoth(result.append)
    if not result or not IListeningPort.providedBy(result[0]):
        reason = result[0].getErrorMessage() if result else "did not bind at once"
        raise ListenError(f'{source}: {key} "{description}": cannot listen: {reason}')
    return result[0]


#: twistd's options (``ServerOptions``), set by ``makeService``: when
#: twistd daemonizes, its parent waits on ``statusPipe`` for the outcome
twistd_options: Any = None
#: the operator's terminal (descriptor 2 before twistd daemonizes), kept
#: until the reactor runs so that a start-up error still reaches it
_terminal: int | None = None


def keep_terminal(reactor: Any) -> None:
    """
    Before twistd daemonizes (it points descriptor 2 at /dev/null), keep
    the operator's standard error for :func:`fail_start`, until the
    reactor runs.
    """
    global _terminal
    if _terminal is None:
        _terminal = os.dup(2)
        reactor.callWhenRunning(_release_terminal)


def _release_terminal() -> None:
    global _terminal
    if _terminal is not None:
        fd, _terminal = _terminal, None
        os.close(fd)


def fail_start(message: str) -> NoReturn:
    """
    Stop start-up with one line for the operator and exit status 1.  By now
    twistd has redirected sys.stderr into the log; the operator's terminal
    is still file descriptor 2 (unless both are one, when the line is
    written once).  Daemonized (twistd without ``-n``), descriptor 2 is
    /dev/null and twistd's parent waits on its status pipe, which only an
    ``Exception`` would have written (not ``SystemExit``): the line goes
    there (its first 98 bytes: the parent prints them and exits 1; it hung
    before), and the whole line to the terminal kept by
    :func:`keep_terminal`.
    """
    if not log_is_stderr():
        log.critical("{message}", message=message)
    line = f"kumoauth: error: {message}\n".encode()
    os.write(2, line)
    told = False
    if _terminal is not None and not _same_file(_terminal, 2):
        with contextlib.suppress(OSError):
            os.write(_terminal, line)
            told = True
    pipe = twistd_options.get("statusPipe") if twistd_options is not None else None
    if pipe is not None:
        # The parent reads 100 bytes and shows them after "An error has
        # occurred:": the whole line is above it, or the start of it here.
        why = b"kumoauth did not start (see the line above)" if told else message.encode()[:98]
        with contextlib.suppress(OSError):
            os.write(pipe, b"1 " + why)
            os.close(pipe)
        _remove_pidfile()
    raise SystemExit(1)


def _remove_pidfile() -> None:
    """
    twistd removes its pid file only after an ``Exception``; a daemon that
    did not start must not leave its pid there for a later ``kill $(cat
    …)`` to hit another process.
    """
    name = twistd_options.get("pidfile") if twistd_options is not None else None
    if not name:
        return
    with contextlib.suppress(OSError, ValueError):
        with open(name) as f:
            if int(f.read().strip()) == os.getpid():
                os.unlink(name)


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


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


def hold_start_up_signals() -> None:
    """
    From now until :func:`install_signals`: a SIGUSR1 (logrotate's
    postrotate, which systemd's MainPID form sends at any moment) or a
    SIGHUP is taken and dropped, not left to its default action, which ends
    the process.  The log files are opened, and the configuration read,
    after this anyway.  A handler, not SIG_IGN, which a child would
    inherit.
    """
    for signum in (signal.SIGUSR1, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signum, _dropped)


def _dropped(signum: int, frame: Any) -> None:
    """A signal before the service's handlers: nothing to do yet."""


def install_signals(reactor: Any, on_hup: Callable[[], object]) -> None:
    """
    SIGHUP calls *on_hup*, SIGUSR1 re-opens the log files
    (:func:`~kumoauth.ops.logfile.reopen_logs`; its default action would
    end the process) and SIGTERM stops the reactor, from now on: the
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

    def on_sigusr1(signum: int, frame: Any) -> None:
        reactor.callFromThread(reopen_logs)

    signal.signal(signal.SIGHUP, on_sighup)
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGUSR1, on_sigusr1)

    def install() -> None:
        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGHUP, on_sighup)
        signal.signal(signal.SIGUSR1, on_sigusr1)

    reactor.callWhenRunning(install)


class QuietSite(Site):
    """
    No access-log line per scrape.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


class ReopenableFile:
    """
    A text file appended to under one name, that :meth:`reopen` opens
    again by that name (after logrotate moved it: SIGUSR1).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, text: str) -> None:
        self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def reopen(self) -> bool:
        try:
            fresh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            log.warn(
                "cannot re-open {path}: {error}; still writing to the file it was",
                path=escape(str(self.path)),
                error=escape(e.strerror or str(e)),
            )
            return False
        old, self.file = self.file, fresh
        old.close()
        return True

    def close(self) -> None:
        self.file.close()


def open_json_log(path: Path) -> Any:
    """
    Add an observer that writes kumoauth's own events (namespaces
    ``kumoauth``, ``kumoauth.auth``, ``kumoauth.smtp``) as JSON lines;
    in a supervisor, not the lines it relays from its workers (each wrote
    its own, with their fields).  SIGUSR1 re-opens the file; give the
    observer to :func:`close_json_log` at the end.
    """
    stream = ReopenableFile(path)
    on_reopen(stream.reopen)
    # One JSON object per line, as the reference says: no RFC 7464
    # record separator before each (Twisted's default), which `json.loads`
    # of a line and most log shippers do not take.
    json_observer = jsonFileLogObserver(stream, recordSeparator="")  # type: ignore[arg-type]

    @provider(ILogObserver)
    def kumoauth_only(event: dict[str, Any]) -> None:
        if event.get(WORKER_LINE):
            return
        namespace = event.get("log_namespace") or ""
        if namespace == "kumoauth" or namespace.startswith("kumoauth."):
            json_observer(event)

    kumoauth_only.stream = stream  # type: ignore[attr-defined]
    globalLogPublisher.addObserver(kumoauth_only)
    return kumoauth_only


def close_json_log(observer: Any) -> None:
    """The end of what :func:`open_json_log` started."""
    globalLogPublisher.removeObserver(observer)
    stream = observer.stream
    forget_reopen(stream.reopen)
    stream.close()
