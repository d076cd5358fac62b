"""
``[server] workers = N``: N reactor processes sharing the listening sockets.

The supervisor (the twistd process) binds every listener itself, before
dropping privileges, and starts N workers (``python -m kumoauth.ops.workers``),
handing each the sockets as inherited file descriptors; a worker adopts them
(``adoptStreamPort``) and runs the ordinary kumoauth service on them, so the
kernel spreads new connections across workers.

Workers never read the configuration file. The supervisor holds the
configuration it validated — its text, a generation number, and the policy,
private key, certificate and fingerprint key as it read them
(:class:`~kumoauth.ops.assembly.GenerationFiles`) — and hands it to every
worker it starts, and to every running worker on a reload, over a control
channel: netstrings of JSON on the worker's stdin (file descriptor 0), answers
on descriptor 3. A worker restarted after the files were edited thus runs what
the others run, not what is on disk; it parses the texts without reading the
files they name (they were checked, and may be gone). The first message also
carries the sockets, each named by its listener's ``(endpoint, tls)``, the
``--auth`` checkers and the TLS session-ticket secret (never in argv, the
environment or a log). A worker serves each inherited socket with the listener
of the same ``(endpoint, tls)`` in the current generation — or, if that
listener was removed or changed since start-up, with the one the socket was
bound for; keys that need a restart (``[spool] path``, ``[auth] threads``,
``[log]``, ``[metrics]``) keep their start-up values. A listener without a
socket is logged ("needs a restart") and skipped.

The supervisor:

- recovers the spool once, before any worker writes to it;
- restarts a worker that dies, after a delay that doubles from
  :data:`RESTART_MIN` to :data:`RESTART_MAX` while it keeps dying, and
  starts over once a worker has stayed up :data:`RESTART_RESET_AFTER`
  seconds; a worker that cannot even be spawned is retried the same way;
- on SIGHUP reads and validates the file itself: if it is good, the
  generation goes up and every worker reloads from that text; if not, one
  line in the log and nothing changes (workers never see a broken file);
- on SIGTERM stops every worker (each drains), and exits 0 once they all
  have;
- serves ``[metrics]`` for all workers together: they write their values to
  a shared directory (``prometheus_client`` multiprocess mode), under a
  name per worker index (``w0``, ``w1``…), so a restarted worker carries on
  its predecessor's counters and the files do not pile up.

Per-process: connection limits (``max_connections`` is per worker) and the
in-memory throttle counters.

A worker whose control channel closes (the supervisor is gone) stops as if
sent SIGTERM.  A SIGHUP sent to a worker directly re-applies its current
generation, files included, as the supervisor validated it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.cred import strcred
from twisted.internet import defer, endpoints, protocol, threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ProcessExitedAlready, ReactorNotRunning
from twisted.logger import Logger

from kumoauth.config import Config, ConfigError, ListenerConfig, parse, read_text
from kumoauth.ops import proxyheader
from kumoauth.ops.assembly import (
    GenerationFiles,
    OperatorError,
    build_policy,
    build_runtime,
    build_tls,
    discard,
    open_queue,
    parse_validated,
    read_generation_files,
    relay_settings,
)
from kumoauth.ops.heap import settle_when_running
from kumoauth.ops.listening import (
    ListenError,
    ListenerService,
    QuietSite,
    bind,
    close_json_log,
    fail_start,
    hold_start_up_signals,
    install_signals,
    open_json_log,
)
from kumoauth.ops.logfile import ApplicationLog, on_reopen
from kumoauth.ops.threads import Serial
from kumoauth.ops.worklog import LineReader, WorkerLog

log = Logger(namespace="kumoauth.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
READY = b"worker ready"
#: seconds before the first restart of a worker that died
RESTART_MIN = 1.0
#: the longest wait between restarts of a worker that keeps dying
RESTART_MAX = 60.0
#: a worker that stayed up this many seconds is restarted after RESTART_MIN again
RESTART_RESET_AFTER = 60.0
#: the worker reads the supervisor's messages here (its stdin) …
CONTROL_IN = 0
#: … and writes its own here
CONTROL_OUT = 3
#: the inherited listening sockets start here
FIRST_SOCKET = 4
#: the largest control message: the configuration texts, and the policy,
#: key and chain in base64 (each at most assembly.MAX_GENERATION_FILE)
MAX_MESSAGE = 64 * 1024 * 1024


# --- control channel ----------------------------------------------------------


def encode(message: dict[str, Any]) -> bytes:
    """One control message: a netstring of JSON."""
    payload = json.dumps(message).encode()
    return b"%d:%s," % (len(payload), payload)


class Netstrings:
    """Incremental decoder: bytes in, complete JSON messages out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages: list[dict[str, Any]] = []
        while True:
            length, sep, rest = self._buffer.partition(b":")
            if not sep:
                if len(length) > 10 or not length.isdigit() and length:
                    raise ValueError("bad control message")
                return messages
            if not length.isdigit() or int(length) > MAX_MESSAGE:
                raise ValueError("bad control message")
            n = int(length)
            if len(rest) < n + 1:
                return messages
            if rest[n : n + 1] != b",":
                raise ValueError("bad control message")
            messages.append(json.loads(rest[:n]))
            self._buffer = rest[n + 1 :]


def read_message(fd: int) -> dict[str, Any]:
    """
    Read exactly one control message from *fd*, blocking, and nothing more
    (what follows stays in the pipe for the reactor).
    """
    length = b""
    while True:
        c = os.read(fd, 1)
        if not c:
            raise EOFError("control channel closed")
        if c == b":":
            break
        length += c
        if not length.isdigit() or len(length) > 10:
            raise ValueError("bad control message")
    n = int(length)
    if n > MAX_MESSAGE:
        raise ValueError("bad control message")
    data = b""
    while len(data) < n + 1:
        chunk = os.read(fd, n + 1 - len(data))
        if not chunk:
            raise EOFError("control channel closed")
        data += chunk
    if data[-1:] != b",":
        raise ValueError("bad control message")
    result: dict[str, Any] = json.loads(data[:-1])
    return result


# --- configuration --------------------------------------------------------------


def read_config(source: Path | str) -> tuple[str, Config]:
    """
    The configuration file's text and what it says; an error is an
    :class:`OperatorError` (one line).
    """
    path = Path(source)
    try:
        text = read_text(path)
        return text, parse(text, path)
    except ConfigError as e:
        raise OperatorError(str(e)) from None


def validate(
    cfg: Config,
    reactor: Any,
    checkers: list[Any] | None,
    spool: Any,
    tls: Any = None,
    policy: Any = None,
) -> None:
    """
    Everything a worker will build, built once here and thrown away: TLS,
    policy, checker, throttle store.  Raises :class:`OperatorError`.
    """
    from kumoauth.policy import Invoker
    from kumoauth.smtp.runtime import ProcessState
    from kumoauth.storage.spool import SpoolWriter

    process = ProcessState(clock=reactor, store=SpoolWriter(spool, reactor).store)
    try:
        build_runtime(cfg, process, checkers, Invoker(), tls=tls, policy=policy)
    finally:
        discard(process)


@dataclass(frozen=True)
class Inherited:
    """A listening socket the supervisor bound, as a worker receives it."""

    endpoint: str
    tls: str
    fd: int
    family: int


def worker_config(
    boot: Config, current: Config, sockets: list[Inherited]
) -> tuple[Config, dict[int, tuple[int, int]], list[str]]:
    """
    What a worker runs: *current* (the supervisor's generation), on the
    sockets the supervisor bound for *boot* (its start-up configuration).

    Each socket gets the listener of the same ``(endpoint, tls)`` in
    *current*, or if there is none any more the one it was bound for (it
    stays until a restart, as in a single process).  What needs a restart
    keeps its *boot* value.  Returns the configuration, the sockets by
    listener index (``make_service_from_config(adopt=)``) and warnings.
    """
    now = {(li.endpoint, li.tls): li for li in current.listeners}
    then = {(li.endpoint, li.tls): li for li in boot.listeners}
    listeners: list[ListenerConfig] = []
    adopt: dict[int, tuple[int, int]] = {}
    warnings = []
    for s in sockets:
        key = (s.endpoint, s.tls)
        listener = now.get(key) or then.get(key)
        if listener is None:  # not from this supervisor's configuration
            warnings.append(f"socket for {s.endpoint} ({s.tls}) has no listener: not served")
            continue
        if key not in now:
            warnings.append(
                f"listener {s.endpoint} ({s.tls}) was removed or changed: it stays until a restart"
            )
        elif key in then:
            # The PROXY header's trusted peers belong to the socket, as in
            # a single process and in the workers started with it.
            listener = replace(listener, proxy_networks=then[key].proxy_networks)
        adopt[len(listeners)] = (s.fd, s.family)
        listeners.append(listener)
    bound = {(s.endpoint, s.tls) for s in sockets}
    for endpoint, tls in sorted(set(now) - bound):
        warnings.append(f"listener {endpoint} ({tls}) is new or changed: it needs a restart")
    cfg = replace(
        current,
        listeners=tuple(listeners),
        server=replace(current.server, workers=boot.server.workers),
        auth=replace(current.auth, threads=boot.auth.threads),
        spool=boot.spool,
        log=boot.log,
        metrics=boot.metrics,
    )
    return cfg, adopt, warnings


# --- supervisor -----------------------------------------------------------------


def _family(address: Any) -> int:
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    raise ValueError(f"cannot hand {address!r} to a worker")


def metrics_id(index: int) -> str:
    """The name under which worker *index* writes its metric files."""
    return f"w{index}"


class _Unused(protocol.Factory):
    """The supervisor never accepts on the sockets it binds."""

    noisy = False


class WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready = False
        #: the supervisor's SIGUSR1 count when this worker was started
        self.reopens = supervisor.reopens
        #: the configuration generation the worker last said it runs
        self.generation = 0
        self.started_at = 0.0
        # stdout (1) and stderr (2), each with its own partial line
        self._lines = {fd: LineReader(f"[worker {index}] ", log.observer, log) for fd in (1, 2)}
        self._control = Netstrings()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        log.info("worker {index} started (pid {pid})", index=self.index, pid=self.pid)

    def send(self, message: dict[str, Any]) -> None:
        self.transport.write(encode(message))  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == CONTROL_OUT:
            try:
                messages = self._control.feed(data)
            except ValueError:
                log.error("worker {index}: bad control message", index=self.index)
                return
            for message in messages:
                self.controlReceived(message)
            return
        # The worker logs its events to its stdout (kumoauth.ops.worklog);
        # they become ours, with the worker's time.
        reader = self._lines.get(childFD)
        if reader is not None:
            reader.feed(data, self.supervisor.reactor.seconds)

    def controlReceived(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ready":
            self.ready = True
            self.generation = int(message.get("generation", 0))
            if self.reopens != self.supervisor.reopens and self.pid is not None:
                # A SIGUSR1 came while it started (it had opened its JSON
                # log under the name logrotate then moved): now it can.
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGUSR1)
        elif kind == "reloaded":
            if message.get("ok"):
                self.generation = int(message.get("generation", 0))
            else:
                log.error(
                    "worker {index} could not apply configuration generation {generation}",
                    index=self.index,
                    generation=message.get("generation"),
                )

    def processEnded(self, reason: Any) -> None:
        self.supervisor.ended(self, reason)


class SupervisorTop(ApplicationLog, service.MultiService):
    """
    What twistd gets with ``workers > 1``: the supervisor, the queue and the
    metrics listener, and (ApplicationLog) twistd's log observer, which
    writes the workers' lines too.

    With ``[log] json_path`` the supervisor's own events (reloads, workers
    that died, the queue and the relay) go there too, as a single process's
    do; the workers write theirs themselves.
    """

    json_path: Path | None = None
    _json_log: Any = None

    def startService(self) -> None:
        if self.json_path is not None:
            self._json_log = open_json_log(self.json_path)
        super().startService()

    def stopService(self) -> defer.Deferred[Any]:
        def remove(result: object) -> object:
            if self._json_log is not None:
                close_json_log(self._json_log)
                self._json_log = None
            return result

        return defer.maybeDeferred(super().stopService).addBoth(remove)


class Supervisor(service.Service):
    def __init__(
        self,
        cfg: Config,
        reactor: Any,
        auth_args: list[str],
        text: str | None = None,
        owner: tuple[int, int] | None = None,
        checkers: list[Any] | None = None,
        spool: Any = None,
        files: GenerationFiles | None = None,
    ) -> None:
        #: the configuration the sockets were bound for
        self.boot_cfg = self.cfg = cfg
        #: the validated text of the current generation
        self.boot_text = self.text = text if text is not None else read_config(cfg.source)[0]
        #: the policy, key and certificate the current generation was validated with
        self.files = files if files is not None else read_generation_files(cfg)
        self.generation = 1
        self.reactor = reactor
        self.auth_args = auth_args
        self.checkers = checkers
        self.spool = spool
        #: the queue's owner service (and the relay), in this process
        self.queue_service: Any = None
        #: this process's metrics (the queue's, the relay's, reloads)
        self.metrics: Any = None
        self.ports: list[tuple[ListenerConfig, Any, int]] = []
        self.workers: dict[int, WorkerProcess] = {}
        #: SIGUSR1s so far (log re-opens), for workers that were starting
        self.reopens = 0
        self.stopping = False
        self._all_ended: defer.Deferred[None] | None = None
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}
        self._reloads = Serial()
        self.metrics_dir = tempfile.mkdtemp(prefix="kumoauth-metrics-")
        if owner is not None:
            # Created as root; the supervisor and the workers write there
            # after twistd has dropped privileges.
            os.chown(self.metrics_dir, *owner)

    def privilegedStartService(self) -> None:
        install_signals(self.reactor, self.reload)  # before a port answers
        on_reopen(self._reopen_workers_logs)
        super().privilegedStartService()
        for i, listener in enumerate(self.cfg.listeners):
            # A haproxy: listener's socket is a plain one; each worker reads
            # the PROXY header (kumoauth/ops/proxyheader.py).
            bound, _ = proxyheader.split(listener.endpoint)
            endpoint = endpoints.serverFromString(self.reactor, bound)
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
            self.ports.append((listener, port, _family(port.getHost())))
            log.info(
                "listening on {address} ({tls}) for {n} workers",
                address=str(port.getHost()),
                tls=listener.tls,
                n=self.cfg.server.workers,
            )

    def startService(self) -> None:
        super().startService()
        for index in range(self.boot_cfg.server.workers):
            self.spawn(index)

    # --- workers -------------------------------------------------------------

    def spawn(self, index: int) -> None:
        """
        Start worker *index*.  It is registered only once it runs: a spawn
        that fails is retried later, like a worker that died.
        """
        args = [sys.executable, "-m", "kumoauth.ops.workers", "--index", str(index)]
        child_fds: dict[int, Any] = {CONTROL_IN: "w", 1: "r", 2: "r", CONTROL_OUT: "r"}
        sockets = []
        for i, (listener, port, family) in enumerate(self.ports):
            fd = FIRST_SOCKET + i
            child_fds[fd] = port.fileno()
            sockets.append(
                {"endpoint": listener.endpoint, "tls": listener.tls, "fd": fd, "family": family}
            )
        # The supervisor's own standard error (the journal under systemd):
        # where a worker's lines go if the supervisor is killed before it.
        orphan = FIRST_SOCKET + len(self.ports)
        child_fds[orphan] = 2
        args += ["--orphan-fd", str(orphan)]
        env = dict(os.environ, **{MULTIPROC_ENV: self.metrics_dir})
        worker = WorkerProcess(self, index)
        try:
            self.reactor.spawnProcess(worker, sys.executable, args, env=env, childFDs=child_fds)
        except Exception as e:
            delay = self._next_delay(index, uptime=0.0)
            log.error(
                "worker {index} could not be started: {error}; retrying in {delay:g}s",
                index=index,
                error=f"{type(e).__name__}: {e}",
                delay=delay,
            )
            self._restart_later(index, delay)
            return
        worker.started_at = self.reactor.seconds()
        self.workers[index] = worker
        # TLS session-ticket keys (kumoauth.tls): every worker derives them
        # from this process's secret, so a ticket from one is good at all.
        from kumoauth.tls.context import ticket_secret

        worker.send(
            {
                "type": "start",
                "index": index,
                "source": str(self.cfg.source),
                "generation": self.generation,
                "text": self.text,
                "boot_text": self.boot_text,
                "files": self.files.to_wire(),
                "sockets": sockets,
                "auth": self.auth_args,
                "ticket_secret": ticket_secret().hex(),
            }
        )

    def _next_delay(self, index: int, uptime: float) -> float:
        if uptime >= RESTART_RESET_AFTER:
            self._delays.pop(index, None)
        delay = self._delays.get(index, RESTART_MIN)
        self._delays[index] = min(delay * 2, RESTART_MAX)
        return delay

    def _restart_later(self, index: int, delay: float) -> None:
        self._restarts[index] = self.reactor.callLater(delay, self._respawn, index)

    def ended(self, worker: WorkerProcess, reason: Any) -> None:
        from prometheus_client import multiprocess

        # Its live gauges (open connections) end with it; its counters stay
        # for the next worker of the same index to carry on.
        multiprocess.mark_process_dead(metrics_id(worker.index), self.metrics_dir)
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            log.info("worker {index} stopped", index=worker.index)
            if not self.workers and self._all_ended is not None:
                self._all_ended.callback(None)
            return
        delay = self._next_delay(worker.index, self.reactor.seconds() - worker.started_at)
        log.error(
            "worker {index} (pid {pid}) died: {reason}; restarting in {delay:g}s",
            index=worker.index,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._restart_later(worker.index, delay)

    def _respawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self.stopping and index not in self.workers:
            self.spawn(index)

    def signal_workers(self, name: str) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(name)  # type: ignore[union-attr]
            except ProcessExitedAlready:
                pass  # its processEnded is on the way

    # --- reload --------------------------------------------------------------

    def reload(self) -> defer.Deferred[bool]:
        """
        SIGHUP: read and validate the file here; if it is good, make it the
        current generation and send it to every worker.  Fires with whether
        it was.
        """
        source = self.boot_cfg.source

        def prepare() -> tuple[str, Config, GenerationFiles, Any, Any, Any]:
            text, cfg = read_config(source)
            files = read_generation_files(cfg)
            tls, policy = build_tls(cfg, files), build_policy(cfg, files)
            return text, cfg, files, tls, policy, relay_settings(cfg)

        def apply(prepared: tuple[str, Config, GenerationFiles, Any, Any, Any]) -> bool:
            text, cfg, files, tls, policy, relay = prepared
            validate(cfg, self.reactor, self.checkers, self.spool, tls=tls, policy=policy)
            if self.stopping:
                return False
            owner = self.queue_service
            if owner is not None and owner.relay is not None and relay is not None:
                owner.relay.reload(relay)
            elif owner is not None and (owner.relay is None) != (relay is None):
                log.warn("[relay] added or removed: it needs a restart")
            self.generation += 1
            self.cfg, self.text, self.files = cfg, text, files
            if cfg.server.workers != self.boot_cfg.server.workers:
                log.warn("[server] workers changed: it needs a restart")
            if self.metrics is not None:
                self.metrics.reloads.labels("success").inc()
            log.info(
                "configuration generation {generation} from {path}: sent to {n} workers",
                generation=self.generation,
                path=str(source),
                n=len(self.workers),
            )
            message = {
                "type": "config",
                "generation": self.generation,
                "text": text,
                "files": files.to_wire(),
            }
            for worker in self.workers.values():
                worker.send(message)
            return True

        def failed(f: Any) -> bool:
            if f.check(OperatorError):
                message = f.getErrorMessage()
            else:
                message = f"{f.type.__name__}: {f.getErrorMessage()}"
            log.error("reload failed, configuration unchanged: {error}", error=message)
            if self.metrics is not None:
                self.metrics.reloads.labels("failure").inc()
            return False

        def run(_: object) -> defer.Deferred[bool]:
            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), prepare)
            return d.addCallback(apply).addErrback(failed)

        # One at a time, in the order asked.
        return self._reloads.run(run)

    # --- stop ----------------------------------------------------------------

    def _reopen_workers_logs(self) -> None:
        """
        SIGUSR1: each worker re-opens its own JSON log too; one still
        starting (which ignores the signal until its handler is there) is
        signalled once it is ready.
        """
        self.reopens += 1
        for worker in list(self.workers.values()):
            if worker.pid is not None and worker.ready:
                worker.reopens = self.reopens
                with contextlib.suppress(OSError):
                    os.kill(worker.pid, signal.SIGUSR1)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        self.stopping = True
        for timer in self._restarts.values():
            if timer.active():
                timer.cancel()
        self._restarts.clear()
        for _, port, _ in self.ports:
            port.stopListening()
        if not self.workers:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
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
    cfg: Config,
    reactor: Any,
    checkers: list[Any] | None,
    auth_args: list[str],
    owner: tuple[int, int] | None = None,
) -> SupervisorTop:
    """
    The twistd-side service for ``workers > 1``: everything is validated
    here first (so an operator error stops start-up), then the supervisor
    binds and runs the workers.  *owner* (uid, gid): who twistd will run
    as (``--uid``/``--gid``), for the directories created here as root.
    """
    from kumoauth.ops.metrics import multiprocess_site_root

    # The text the workers will run, and what it says (read once: the
    # file may change under us).
    text, cfg = read_config(cfg.source)
    for listener in cfg.listeners:
        if listener.endpoint.startswith("systemd:"):
            raise OperatorError(
                f'{cfg.source}: [[listener]] endpoint "{listener.endpoint}": '
                "not supported with [server] workers > 1 yet"
            )
    # The supervisor owns the queue (its lock): it recovers it before any
    # worker writes, and it is the one process that relays.
    queue = open_queue(cfg, owner)
    try:
        # Validate TLS, policy, checker and throttle store like a single
        # process, with the files the workers will be given.
        files = read_generation_files(cfg)
        tls, policy = build_tls(cfg, files), build_policy(cfg, files)
        validate(cfg, reactor, checkers, queue, tls=tls, policy=policy)
        relay_settings(cfg)
    except OperatorError:
        queue.close()
        raise
    top = SupervisorTop()
    top.json_path = cfg.log.json_path
    supervisor = Supervisor(
        cfg,
        reactor,
        auth_args,
        text=text,
        owner=owner,
        checkers=checkers,
        spool=queue,
        files=files,
    )
    supervisor.setServiceParent(top)
    # The supervisor's own metrics (queue, relay) go to the workers' shared
    # directory, so /metrics sums them with theirs.
    from prometheus_client import values

    os.environ[MULTIPROC_ENV] = supervisor.metrics_dir
    values.ValueClass = values.MultiProcessValue(  # type: ignore[misc]
        process_identifier=lambda: "sup"
    )
    from kumoauth.ops.metrics import Metrics
    from kumoauth.ops.service import attach_queue

    metrics = supervisor.metrics = Metrics()
    if owner is not None:
        # Its files were created here, as root: the supervisor writes them
        # after twistd has dropped privileges.
        for path in Path(supervisor.metrics_dir).iterdir():
            os.chown(path, *owner)
    supervisor.queue_service = attach_queue(top, queue, cfg, reactor, metrics, writer=None)
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


# --- worker ---------------------------------------------------------------------


class WorkerControl(protocol.Protocol):
    """
    A worker's end of the control channel: new configuration generations
    in, their outcome out.  When the supervisor goes away, the worker stops.
    """

    def __init__(
        self, server: Any, reactor: Any, generation: int, text: str, files: GenerationFiles
    ) -> None:
        self.server = server
        self.reactor = reactor
        self.generation = generation
        self.text = text
        self.files = files
        self.stopping = False
        self._decoder = Netstrings()

    def tell(self, message: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(encode(message))

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ValueError:
            log.error("bad control message from the supervisor: dropped")
            self._decoder = Netstrings()  # what follows starts afresh
            return
        for message in messages:
            if message.get("type") != "config":
                continue
            try:
                generation, text = int(message["generation"]), str(message["text"])
                files = GenerationFiles.from_wire(message.get("files") or {})
            except (KeyError, TypeError, ValueError):
                log.error("bad configuration message from the supervisor: ignored")
                continue
            self.apply(generation, text, files)

    def apply(self, generation: int, text: str, files: GenerationFiles) -> defer.Deferred[Any]:
        def done(ok: bool) -> None:
            if ok:
                self.generation, self.text, self.files = generation, text, files
                log.info("running configuration generation {generation}", generation=generation)
            self.tell({"type": "reloaded", "generation": generation, "ok": bool(ok)})

        d = self.server.reload(text, files)
        d.addCallback(done)
        return d

    def reapply(self) -> None:
        """A SIGHUP sent to this worker: its current generation, again."""
        self.server.reload(self.text, self.files)

    def shutting_down(self) -> None:
        self.stopping = True

    def connectionLost(self, reason: Any = None) -> None:
        if self.stopping:  # the reactor closing everything
            return
        log.info("the supervisor is gone: stopping")
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass


def worker_main(argv: list[str] | None = None) -> None:
    """
    A worker: receive the configuration and the sockets from the
    supervisor, run the service, exit when it stops.
    """
    # A worker still starting opens its JSON log after this; the
    # supervisor signals it once it is ready if logrotate came meanwhile.
    hold_start_up_signals()
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner

    from kumoauth.ops.reactor import prepare
    from kumoauth.ops.service import make_service_from_config
    from kumoauth.tls.context import adopt_ticket_secret

    p = argparse.ArgumentParser(prog="python -m kumoauth.ops.workers")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--orphan-fd", type=int, default=2)
    args = p.parse_args(argv)
    # Lines for the supervisor, gathered (kumoauth.ops.worklog).
    observer = WorkerLog(sys.stdout.fileno(), reactor, orphan_fd=args.orphan_fd)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
    atexit.register(observer.flush)
    start = read_message(CONTROL_IN)
    if os.environ.get(MULTIPROC_ENV):
        # Metric files named after the worker index, not the pid (before
        # any metric exists): a restarted worker carries on the counters.
        from prometheus_client import values

        index = args.index
        values.ValueClass = values.MultiProcessValue(  # type: ignore[misc]
            process_identifier=lambda: metrics_id(index)
        )
    adopt_ticket_secret(bytes.fromhex(start["ticket_secret"]))
    source = start["source"]
    # (A supervisor older than this worker sends no files: read from disk.)
    files = GenerationFiles.from_wire(start.get("files") or {})
    try:
        # The start-up text only for what needs a restart: the files it
        # named may be long gone.
        boot = parse(start["boot_text"], source, read_files=False)
        current = parse_validated(start["text"], source, files)
        sockets = [
            Inherited(s["endpoint"], s["tls"], int(s["fd"]), int(s["family"]))
            for s in start["sockets"]
        ]
        cfg, adopt, warnings = worker_config(boot, current, sockets)
        for warning in warnings:
            log.warn("{warning}", warning=warning)
        checkers = [strcred.makeChecker(a) for a in start["auth"]] or None
        top = make_service_from_config(
            cfg, reactor, checkers, adopt=adopt, writer_id=metrics_id(args.index), files=files
        )
    except (ConfigError, OperatorError) as e:
        # What the supervisor validated no longer builds here (a store's
        # own files): one line, not a traceback; the supervisor restarts us
        # with its backoff.
        log.critical("worker cannot start: {error}", error=str(e))
        raise SystemExit(1) from None
    top.privilegedStartService()
    top.startService()
    for s in sockets:
        os.close(s.fd)  # adoptStreamPort duplicated it (or it is not served)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    generation = int(start["generation"])
    control = WorkerControl(top, reactor, generation, start["text"], files)
    reactor.addSystemEventTrigger("before", "shutdown", control.shutting_down)
    stdio.StandardIO(control, stdin=CONTROL_IN, stdout=CONTROL_OUT, reactor=reactor)  # type: ignore[call-arg]
    # After the service's own (installed when the reactor runs): a SIGHUP
    # sent to a worker must not read the file.
    install_signals(reactor, control.reapply)

    def ready() -> None:
        log.info(
            "{ready} (configuration generation {generation})",
            ready=READY.decode(),
            generation=generation,
        )
        control.tell({"type": "ready", "generation": generation})

    prepare(reactor)  # kumoauth/ops/reactor.py, as the single process does
    settle_when_running(reactor, top.process.slicer)
    reactor.callWhenRunning(lambda: reactor.callLater(0, ready))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    worker_main()
