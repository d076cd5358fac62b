"""
``[server] workers = N``: N reactor processes sharing the listening sockets.

The supervisor (the twistd process) binds every listener itself, before
dropping privileges, and starts N workers (``python -m kumoauth.ops.workers``),
handing each the sockets as inherited file descriptors; a worker adopts them
(``adoptStreamPort``) and runs the ordinary kumoauth service on them, so the
kernel spreads new connections across workers.  The supervisor:

- recovers the spool once, before any worker writes to it;
- restarts a worker that dies (one second later);
- forwards SIGHUP (reload) and SIGTERM (graceful drain) to every worker, and
  exits 0 once they all have;
- serves ``[metrics]`` for all workers together: they write their counters
  to a shared directory (``prometheus_client`` multiprocess mode).

Per-process today: connection limits (``max_connections`` is per worker)
and the in-memory throttle counters.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
from typing import Any

from twisted.application import service
from twisted.cred import strcred
from twisted.internet import defer, endpoints, protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger

from kumoauth.config import Config
from kumoauth.ops.assembly import OperatorError, build_runtime, prepare_spool
from kumoauth.ops.listening import (
    ListenError,
    ListenerService,
    QuietSite,
    bind,
    fail_start,
    install_signals,
)

log = Logger(namespace="kumoauth.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
READY = b"worker ready"
RESTART_DELAY = 1.0


def _family(address: Any) -> int:
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    raise ValueError(f"cannot hand {address!r} to a worker")


class _Unused(protocol.Factory):
    """The supervisor never accepts on the sockets it binds."""

    noisy = False


class WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready = False
        self.pending_hup = False
        self._partial = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        log.info("worker {index} started (pid {pid})", index=self.index, pid=self.pid)

    def outReceived(self, data: bytes) -> None:
        # The worker logs text lines to its stdout; they become ours.
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.endswith(READY):
                self.ready = True
                if self.pending_hup:
                    # A reload asked for while it was starting: it may have
                    # read the file just before it changed.
                    self.pending_hup = False
                    self.transport.signalProcess("HUP")  # type: ignore[union-attr]
            if line.strip():
                log.info(
                    "[worker {index}] {line}",
                    index=self.index,
                    line=line.decode("utf-8", "replace"),
                )

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.supervisor.ended(self, reason)


class Supervisor(service.Service):
    def __init__(self, cfg: Config, reactor: Any, auth_args: list[str]) -> None:
        self.cfg = cfg
        self.reactor = reactor
        self.auth_args = auth_args
        self.ports: list[tuple[Any, int]] = []
        self.workers: dict[int, WorkerProcess] = {}
        self.stopping = False
        self._all_ended: defer.Deferred[None] | None = None
        self.metrics_dir = tempfile.mkdtemp(prefix="kumoauth-metrics-")

    def privilegedStartService(self) -> None:

        super().privilegedStartService()
        for i, listener in enumerate(self.cfg.listeners):
            endpoint = endpoints.serverFromString(self.reactor, listener.endpoint)
            try:
                port = bind(
                    endpoint,
                    _Unused(),
                    str(self.cfg.source),
                    f"[[listener]] #{i + 1} endpoint",
                    listener.endpoint,
                )
            except ListenError as e:
                fail_start(str(e))
            port.stopReading()  # the workers accept, not us
            self.ports.append((port, _family(port.getHost())))
            log.info(
                "listening on {address} ({tls}) for {n} workers",
                address=str(port.getHost()),
                tls=listener.tls,
                n=self.cfg.server.workers,
            )

    def startService(self) -> None:
        super().startService()
        for index in range(self.cfg.server.workers):
            self.spawn(index)

        install_signals(self.reactor, lambda: self.signal_workers("HUP", ready_only=True))

    def spawn(self, index: int) -> None:
        args = [
            sys.executable,
            "-m",
            "kumoauth.ops.workers",
            "--config",
            str(self.cfg.source),
            "--index",
            str(index),
        ]
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for i, (port, family) in enumerate(self.ports):
            fd = 3 + i
            child_fds[fd] = port.fileno()
            args += ["--adopt", f"{i}:{fd}:{family}"]
        for auth in self.auth_args:
            args += ["--auth", auth]
        args.append("--ticket-secret-stdin")
        env = dict(os.environ, **{MULTIPROC_ENV: self.metrics_dir})
        worker = WorkerProcess(self, index)
        self.workers[index] = worker
        transport = self.reactor.spawnProcess(
            worker, sys.executable, args, env=env, childFDs=child_fds
        )
        # TLS session-ticket keys (kumoauth.tls): every worker derives them
        # from this process's secret, so a ticket from one is good at all.
        # Through the stdin pipe: never in argv, the environment or a log.
        from kumoauth.tls.context import ticket_secret

        transport.write(ticket_secret().hex().encode() + b"\n")
        transport.closeStdin()

    def ended(self, worker: WorkerProcess, reason: Any) -> None:
        from prometheus_client import multiprocess

        if worker.pid is not None:
            multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            log.info("worker {index} stopped", index=worker.index)
            if not self.workers and self._all_ended is not None:
                self._all_ended.callback(None)
            return
        log.error(
            "worker {index} (pid {pid}) died: {reason}; restarting",
            index=worker.index,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
        )
        self.reactor.callLater(RESTART_DELAY, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self.spawn(index)

    def signal_workers(self, name: str, ready_only: bool = False) -> None:
        """
        Send a signal to the workers.  A reload skips workers still
        starting: they read the configuration file as they start anyway,
        and a SIGHUP before their handler is installed would kill them.
        """
        for worker in list(self.workers.values()):
            if ready_only and not worker.ready:
                worker.pending_hup = True
                continue
            try:
                worker.transport.signalProcess(name)  # type: ignore[union-attr]
            except ProcessExitedAlready:
                pass  # its processEnded is on the way

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        self.stopping = True
        for port, _ in self.ports:
            port.stopListening()
        if not self.workers:
            return defer.succeed(None)
        self._all_ended = defer.Deferred()
        self.signal_workers("TERM")
        # A worker drains for shutdown_grace; after that and a margin, kill.
        timer = self.reactor.callLater(
            self.cfg.server.shutdown_grace + 10, self.signal_workers, "KILL"
        )

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            return result

        return self._all_ended.addBoth(done)


def make_supervisor(
    cfg: Config, reactor: Any, checkers: list[Any] | None, auth_args: list[str]
) -> service.MultiService:
    """
    The twistd-side service for ``workers > 1``: everything is validated
    here first (so an operator error stops start-up), then the supervisor
    binds and runs the workers.
    """
    from kumoauth.ops.metrics import multiprocess_site_root
    from kumoauth.policy import Invoker
    from kumoauth.smtp.runtime import ProcessState
    from kumoauth.storage.spool import SpoolWriter

    for listener in cfg.listeners:
        if listener.endpoint.startswith(("haproxy:", "systemd:")):
            raise OperatorError(
                f'{cfg.source}: [[listener]] endpoint "{listener.endpoint}": '
                "not supported with [server] workers > 1 yet"
            )
    spool = prepare_spool(cfg, recover=True)
    # Validate TLS, policy, checker and throttle store like a single process.
    process = ProcessState(clock=reactor, store=SpoolWriter(spool, reactor).store)
    build_runtime(cfg, process, checkers, Invoker())
    top = service.MultiService()
    supervisor = Supervisor(cfg, reactor, auth_args)
    supervisor.setServiceParent(top)
    if cfg.metrics.endpoint is not None:
        site = QuietSite(multiprocess_site_root(supervisor.metrics_dir))
        ListenerService(
            cfg.metrics.endpoint,
            endpoints.serverFromString(reactor, cfg.metrics.endpoint),
            site,
            str(cfg.source),
            key="[metrics] endpoint",
        ).setServiceParent(top)
    return top


def worker_main(argv: list[str] | None = None) -> None:
    """
    A worker: adopt the sockets, run the service, exit when it stops.
    """
    from twisted.internet import reactor
    from twisted.logger import FileLogObserver, globalLogBeginner

    from kumoauth.config import load
    from kumoauth.ops.service import make_service_from_config

    p = argparse.ArgumentParser(prog="python -m kumoauth.ops.workers")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--adopt", action="append", default=[])
    p.add_argument("--auth", action="append", default=[])
    p.add_argument("--ticket-secret-stdin", action="store_true")
    args = p.parse_args(argv)
    if args.ticket_secret_stdin:
        from kumoauth.tls.context import adopt_ticket_secret

        adopt_ticket_secret(bytes.fromhex(sys.stdin.readline().strip()))
    # Lines for the supervisor, which adds its own timestamp.
    observer = FileLogObserver(sys.stdout, _line)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    cfg = load(args.config)
    adopt = {}
    for item in args.adopt:
        index, fd, family = (int(x) for x in item.split(":"))
        adopt[index] = (fd, family)
    checkers = [strcred.makeChecker(a) for a in args.auth] or None
    top = make_service_from_config(cfg, reactor, checkers, adopt=adopt)
    top.privilegedStartService()
    top.startService()
    for fd, _ in adopt.values():
        os.close(fd)  # adoptStreamPort duplicated it
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    # After the service's signal handlers are in (they go in when the reactor
    # runs), tell the supervisor this worker may be sent SIGHUP.
    reactor.callWhenRunning(lambda: reactor.callLater(0, log.info, READY.decode()))
    reactor.run()  # type: ignore[attr-defined]


def _line(event: dict[str, Any]) -> str:
    from twisted.logger import formatEvent

    level = event.get("log_level")
    text = (
        f"[{event.get('log_namespace', '-')}#{level.name if level else '-'}] {formatEvent(event)}"
    )
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text.replace("\n", "\n\t") + "\n"


if __name__ == "__main__":
    worker_main()
