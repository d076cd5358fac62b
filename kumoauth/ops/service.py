"""
The whole server in one process: one listener service per
``[[listener]]`` (and the metrics site) under :class:`KumoauthService`,
which owns the reload (SIGHUP) and the ordered stop (SIGTERM).
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, endpoints, threads
from twisted.logger import Logger

from kumoauth.auth.checkers import call_hook
from kumoauth.config import Config
from kumoauth.ops import descriptors, proxyheader
from kumoauth.ops.assembly import (
    GenerationFiles,
    OperatorError,
    build_policy,
    build_runtime,
    build_tls,
    load_config,
    open_queue,
    parse_validated,
    read_generation_files,
    relay_settings,
    worker_segments,
)
from kumoauth.ops.listening import (
    ListenerService,
    QuietSite,
    close_json_log,
    install_signals,
    open_json_log,
)
from kumoauth.ops.logfile import ApplicationLog
from kumoauth.ops.metrics import site_root
from kumoauth.ops.threads import BlockingPool, Serial, stop_within
from kumoauth.policy import Invoker
from kumoauth.relay.scheduler import Relay
from kumoauth.relay.service import QueueService
from kumoauth.smtp.protocol import SubmissionFactory
from kumoauth.smtp.runtime import ProcessState, Runtime
from kumoauth.storage.spool import SpoolWriter

log = Logger(namespace="kumoauth")

#: blocking calls that may wait per checker thread before new ones get a 4xx
QUEUED_PER_THREAD = 10
#: parses (messages' headers, the sender map) that may wait for the parse
#: thread before one gets 451 (each waits at most [policy] timeout)
PARSES_QUEUED = 256
#: seconds a shutdown waits for the spool writer and checker threads
STOP_THREADS_WITHIN = 5.0


class KumoauthService(ApplicationLog, service.MultiService):
    """
    The whole server.

    Stopping it (SIGTERM) is ordered: stop accepting at once, let sessions
    finish their transactions for ``shutdown_grace`` seconds (then
    ``421 4.3.2`` to the rest) and, at the same time, the relay finish the
    messages it is sending (then they stay queued), and only then stop the
    spool writer and the checker threads, so a message in DATA is still
    spooled and the bounce of a send that ended is stored.

    SIGHUP reloads the configuration for new connections: certificate and
    key, policy, checker, limits, throttles.  Live sessions keep what they
    started with.  A reload that fails keeps everything as it was.
    """

    def __init__(
        self,
        cfg: Config,
        runtime: Runtime,
        writer: SpoolWriter,
        checker_pool: BlockingPool,
        reactor: Any,
        override: list[ICredentialsChecker] | None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        #: what this process started with: a setting that needs a restart
        #: is reported against it (a change reverted is no change)
        self.boot_cfg = cfg
        self.runtime = runtime
        self.process = runtime.process
        self.writer = writer
        self.checker_pool = checker_pool
        self.reactor = reactor
        self.override = override
        self._json_log: Any = None
        self._reloads = Serial()
        #: SIGTERM came: a reload is no longer applied
        self._stopping = False

    @property
    def listeners(self) -> list[ListenerService]:
        return [s for s in self if isinstance(s, ListenerService)]

    @property
    def smtp_listeners(self) -> list[ListenerService]:
        return [s for s in self.listeners if s.submission_factory is not None]

    def privilegedStartService(self) -> None:
        # Before the listeners bind: a SIGHUP as soon as a port answers must
        # reload, not kill the process.
        install_signals(self.reactor, self.reload)
        super().privilegedStartService()

    def startService(self) -> None:
        self.writer.start()
        self.checker_pool.start()
        if self.process.parse_pool is not None:
            self.process.parse_pool.start()
        if self.cfg.log.json_path is not None:
            self._json_log = open_json_log(self.cfg.log.json_path)
        super().startService()
        if self.runtime.checker is not None:
            call_hook(self.runtime.checker[1], "start")
        for checker in self.override or ():
            # --auth checkers (strcred plugins, the built-in stores among them)
            call_hook(checker, "start")
        if self.process.oauth_validator is not None:
            _start_validator(self.process.oauth_validator)

    # --- reload ------------------------------------------------------------

    def reload(
        self, text: str | None = None, files: GenerationFiles | None = None
    ) -> defer.Deferred[bool]:
        """
        Re-read the configuration file and apply it to new connections.
        Fires with False (and changes nothing) if anything in it is wrong.

        With *text* and *files* (a worker under ``[server] workers``: the
        configuration generation its supervisor validated, and the policy,
        key, certificate and fingerprint key as the supervisor read them),
        those are used instead of the files, with relative paths still
        resolved against the configuration file's directory; the relay is
        the supervisor's, so its files are not read here.

        The slow, blocking part — reading the file, the certificate and key,
        importing the policy — runs in a thread; the reactor only assembles
        and swaps the new generation.
        """
        source = str(self.cfg.source)

        def prepare() -> tuple[Config, Any, Any, Any]:
            if text is None:
                cfg = load_config(source)
                read = read_generation_files(cfg)
            else:
                read = files if files is not None else GenerationFiles()
                cfg = parse_validated(text, source, read)
            relay = relay_settings(cfg) if text is None else None
            return cfg, build_tls(cfg, read), build_policy(cfg, read), relay

        def apply(prepared: tuple[Config, Any, Any, Any]) -> bool:
            if self._stopping:
                return ignored()
            cfg, tls, policy, relay = prepared
            fitted = descriptors_for(cfg)  # before anything changes: it may refuse
            runtime = build_runtime(
                cfg,
                self.process,
                self.override,
                Invoker(self.reactor, self.checker_pool),
                tls=tls,
                policy=policy,
                previous=self.runtime,
            )
            previous = self.runtime.checker
            self._relay_reload(cfg, relay)
            self._swap(cfg, runtime)
            apply_descriptors(self.process, fitted)
            if text is None:
                # (A worker's generation was counted by its supervisor.)
                self.process.metrics.reloads.labels("success").inc()
            self._checker_lifecycle(previous, runtime.checker)
            return True

        def failed(f: Any) -> bool:
            if not f.check(OperatorError):
                log.failure("reload failed, configuration unchanged", f)
            else:
                log.error(
                    "reload failed, configuration unchanged: {error}", error=f.getErrorMessage()
                )
            self.process.metrics.reloads.labels("failure").inc()
            return False

        def ignored() -> bool:
            # Stopping: a checker started now would never be stopped, the
            # one being stopped would be stopped twice.
            log.info("reload not applied: the server is stopping")
            return False

        def run(_: object) -> defer.Deferred[bool]:
            if self._stopping:
                return defer.succeed(ignored())
            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), prepare)
            return d.addCallback(apply).addErrback(failed)

        # One at a time, in the order asked: a quick second SIGHUP must not
        # be overtaken by the first.
        return self._reloads.run(run)

    def _queue_service(self) -> QueueService | None:
        return next((s for s in self if isinstance(s, QueueService)), None)

    def _relay(self) -> Relay | None:
        queue = self._queue_service()
        return queue.relay if queue is not None else None

    def _relay_reload(self, cfg: Config, settings: Any) -> None:
        queue = self._queue_service()
        relay = queue.relay if queue is not None else None
        if relay is not None:
            relay.grace = cfg.server.shutdown_grace  # for the next stop
        if relay is not None and settings is not None:
            relay.reload(settings)
        elif (relay is None) != (settings is None) and queue is not None:
            log.warn("[relay] added or removed: it needs a restart")

    def _swap(self, cfg: Config, runtime: Runtime) -> None:
        self._report_restart_only(cfg)
        by_endpoint = {listener.endpoint: listener for listener in cfg.listeners}
        for ls in self.smtp_listeners:
            factory = ls.submission_factory
            assert factory is not None
            new = by_endpoint.get(ls.description)
            if new is not None and new.tls == factory.listener.tls:
                factory.listener = new
            factory.runtime = runtime
        self.cfg, self.runtime = cfg, runtime
        log.info("reloaded configuration from {path}", path=str(cfg.source))

    @staticmethod
    def _checker_lifecycle(old: tuple[Any, Any] | None, new: tuple[Any, Any] | None) -> None:
        """
        After a swap: a checker configured again gets ``reload(config)``; a
        new one ``start()``, the one it replaced ``stop()`` (sessions of the
        previous generation that authenticate later get 454 from it).
        """
        if new is not None and old is not None and new[1] is old[1]:
            if new[0].config != old[0].config:
                call_hook(new[1], "reload", new[0].config)
            return
        if new is not None:
            call_hook(new[1], "start")
        if old is not None:
            call_hook(old[1], "stop")

    def _report_restart_only(self, cfg: Config) -> None:
        # Against the sockets this process serves, not the generation
        # before: a change reverted is no change.
        old = {
            (ls.description, ls.submission_factory.listener.tls)
            for ls in self.smtp_listeners
            if ls.submission_factory is not None
        }
        new = {(li.endpoint, li.tls) for li in cfg.listeners}
        for endpoint, tls in sorted(new - old):
            log.warn(
                "listener {endpoint} ({tls}) is new or changed: it needs a restart",
                endpoint=endpoint,
                tls=tls,
            )
        for endpoint, tls in sorted(old - new):
            log.warn(
                "listener {endpoint} ({tls}) was removed or changed: it stays until a restart",
                endpoint=endpoint,
                tls=tls,
            )
        # The PROXY header's trusted peers belong to the socket's wrapper.
        served = {
            (ls.description, ls.submission_factory.listener.tls): ls.proxy_networks
            for ls in self.smtp_listeners
            if ls.submission_factory is not None
        }
        for li in cfg.listeners:
            key = (li.endpoint, li.tls)
            if key in served and tuple(li.proxy_networks) != served[key]:
                log.warn(
                    "listener {endpoint} ({tls}): proxy_networks changed: it needs a restart",
                    endpoint=li.endpoint,
                    tls=li.tls,
                )
        boot = self.boot_cfg
        if cfg.spool.path != boot.spool.path:
            log.warn("[spool] path changed: it needs a restart")
        if cfg.auth.threads != boot.auth.threads:
            log.warn("[auth] threads changed: it needs a restart")
        if cfg.metrics != boot.metrics:
            log.warn("[metrics] changed: it needs a restart")
        if cfg.log != boot.log:
            log.warn("[log] changed: it needs a restart")

    # --- stop --------------------------------------------------------------

    def stopService(self) -> defer.Deferred[Any]:
        self._stopping = True
        d = defer.gatherResults([defer.maybeDeferred(s.stop_listening) for s in self.listeners])
        sessions, grace = self.process.sessions, self.runtime.server.shutdown_grace
        # The relay takes no new message from now on; those being sent get
        # the same grace as the sessions, at the same time.  The spool
        # writer outlives it: the bounces of those attempts go through it.
        relay = self._relay()
        relay_stopped = (
            defer.maybeDeferred(relay.stopService) if relay is not None else defer.succeed(None)
        )
        relay_stopped.addErrback(lambda f: log.failure("stopping the relay", f))
        if sessions.live:
            log.info(
                "stopping: {n} sessions get up to {grace}s to finish",
                n=len(sessions.live),
                grace=grace,
            )
        d.addCallback(lambda _: sessions.drain(grace, self.reactor))
        stopping = [self.runtime.checker[1]] if self.runtime.checker is not None else []
        for checker in [*stopping, *(self.override or ())]:
            d.addCallback(_stop_checker, checker)
        if self.process.oauth_validator is not None:
            d.addCallback(_stop_validator, self.process.oauth_validator)
        if self.process.sender_binding is not None:
            d.addCallback(_stop_validator, self.process.sender_binding[1])

        d.addCallback(lambda _: relay_stopped)

        def stop_threads(_: object) -> defer.Deferred[None]:
            # Joined off the reactor thread, and not waited for past a few
            # seconds: a hung handler must not hold SIGTERM.
            if self._json_log is not None:
                close_json_log(self._json_log)
                self._json_log = None
            pools = [self.checker_pool, self.process.parse_pool]
            return stop_within(
                defer.gatherResults(
                    [self.writer.stop(), *(p.stop() for p in pools if p is not None)]
                ),
                STOP_THREADS_WITHIN,
                self.reactor,
            )

        d.addCallback(stop_threads)
        d.addCallback(lambda _: super(KumoauthService, self).stopService())
        return d


def attach_queue(
    parent: service.MultiService,
    queue: Any,
    cfg: Config,
    reactor: Any,
    metrics: Any,
    writer: SpoolWriter | None,
) -> QueueService:
    """
    The queue's owner under *parent*, with the relay if ``[relay]`` is
    configured.  *writer* (this process's, if it accepts mail) stores the
    bounces and tells the relay about new messages at once.
    """
    from kumoauth.relay import client, dsn
    from kumoauth.storage.delivery import Message
    from kumoauth.storage.spool import new_id

    owner = QueueService(queue, reactor, metrics)
    settings = relay_settings(cfg)
    relay = cfg.relay
    if settings is not None and relay is not None and relay.identity == "authz" and relay.username:
        for listener in cfg.listeners:
            if not listener.auth_required:
                # Mail without an authn_id goes upstream without an authzid:
                # as kumoauth's own account, which its bounces use too.
                log.warn(
                    "[[listener]] {endpoint} takes mail without AUTH, and [relay] "
                    'identity = "authz" relays it as kumoauth\'s own account {user} '
                    "(no authzid), as it does its bounces: the upstream must not grant "
                    "that account more than it grants anonymous mail",
                    endpoint=listener.endpoint,
                    user=relay.username,
                )
    if settings is not None:

        def store_bounce(data: bytes, sender: str) -> defer.Deferred[str]:
            message = Message(new_id(), "", [sender], data, {"dsn": True})
            if writer is not None:
                return writer.store(message)
            return threads.deferToThread(queue.append_batch, [message]).addCallback(
                lambda results: (
                    results[0] if isinstance(results[0], str) else defer.fail(results[0])
                )
            )

        owner.set_relay(
            Relay(
                queue,
                settings,
                reactor,
                metrics,
                connect=client.connect,
                store_bounce=store_bounce,
                build_bounce=dsn.build_dsn,
                grace=cfg.server.shutdown_grace,
            )
        )
    if writer is not None:
        writer.on_stored = owner.notify
    owner.setServiceParent(parent)
    return owner


def make_service_from_config(
    cfg: Config,
    reactor: Any,
    checkers: list[Any] | None = None,
    adopt: dict[int, tuple[int, int]] | None = None,
    owner: tuple[int, int] | None = None,
    writer_id: str = "0",
    files: GenerationFiles | None = None,
) -> KumoauthService:
    """
    The server in this process.  With *adopt* (listener index -> socket) it
    is a worker: the listening sockets come from the supervisor, the spool
    is not recovered here, and metrics are served by the supervisor; then
    *files* are the policy, key and certificate as the supervisor read them.

    *owner* (uid, gid; -1 leaves one unchanged): who the process will run
    as once twistd drops privileges (``--uid``/``--gid``); a spool
    directory created here, as root, is given to them.
    """
    queue = None
    if adopt is None:
        queue = open_queue(cfg, owner)  # the lock: one owner per queue
        appender: Any = queue
    else:
        appender = worker_segments(cfg, writer_id)
    writer = SpoolWriter(appender, reactor, close_appender=adopt is not None)
    checker_pool = BlockingPool(
        reactor,
        threads=cfg.auth.threads,
        max_queued=cfg.auth.threads * QUEUED_PER_THREAD,
        name="kumoauth-checker",
    )
    process = ProcessState(clock=reactor, store=writer.store)
    apply_descriptors(process, descriptors_for(cfg))
    process.parse_pool = BlockingPool(
        reactor, threads=1, max_queued=PARSES_QUEUED, name="kumoauth-parse"
    )
    if files is None:
        files = read_generation_files(cfg)
    runtime = build_runtime(
        cfg,
        process,
        checkers,
        Invoker(reactor, checker_pool),
        tls=build_tls(cfg, files),
        policy=build_policy(cfg, files),
    )

    top = KumoauthService(cfg, runtime, writer, checker_pool, reactor, checkers)
    if queue is not None:
        attach_queue(top, queue, cfg, reactor, process.metrics, writer)
    for i, listener in enumerate(cfg.listeners):
        bound, proxied = proxyheader.split(listener.endpoint)
        try:
            endpoint = endpoints.serverFromString(reactor, bound)
        except Exception as e:
            raise OperatorError(
                f'{cfg.source}: [[listener]] #{i + 1} endpoint: "{listener.endpoint}": '
                f"cannot parse: {e}"
            ) from None
        factory = SubmissionFactory(listener, runtime)
        ls = ListenerService(listener.endpoint, endpoint, factory, str(cfg.source), proxied=proxied)
        if adopt is not None:
            ls.adopt = adopt[i]
        ls.setServiceParent(top)
    if cfg.metrics.endpoint is not None and adopt is None:
        try:
            endpoint = endpoints.serverFromString(reactor, cfg.metrics.endpoint)
        except Exception as e:
            raise OperatorError(
                f'{cfg.source}: [metrics] endpoint: "{cfg.metrics.endpoint}": cannot parse: {e}'
            ) from None
        site = QuietSite(site_root(process.metrics))
        ListenerService(
            cfg.metrics.endpoint, endpoint, site, str(cfg.source), key="[metrics] endpoint"
        ).setServiceParent(top)
    return top


def descriptors_for(cfg: Config) -> tuple[int | None, str]:
    """
    The connections this process can serve within its descriptor limit,
    and why when fewer than ``max_connections``
    (:func:`kumoauth.ops.descriptors.fit`); an operator error if none.
    """
    proxied = any(proxyheader.split(listener.endpoint)[1] for listener in cfg.listeners)
    try:
        return descriptors.fit(cfg.server.max_connections, proxied)
    except ValueError as e:
        raise OperatorError(f"{cfg.source}: [server] max_connections: {e}") from None


def apply_descriptors(process: ProcessState, fitted: tuple[int | None, str]) -> None:
    """Apply :func:`descriptors_for`'s answer, said when it changes."""
    ceiling, why = fitted
    limits = process.limits
    if ceiling != limits.ceiling:
        if why:
            log.warn("{why}", why=why)
        limits.ceiling = ceiling


def _stop_checker(_: object, checker: Any) -> defer.Deferred[None]:
    return call_hook(checker, "stop")


def _start_validator(validator: Any) -> None:
    # A prefetch of the JWKS: an IdP that is down is not a start-up error
    # (tokens get 454 until it answers).
    defer.maybeDeferred(validator.start).addErrback(
        lambda f: log.failure("OAuth validator start", f)
    )


def _stop_validator(_: object, part: Any) -> defer.Deferred[Any]:
    # the OAuth validator, the sender-binding engine: connections to close
    return defer.maybeDeferred(part.stop).addErrback(
        lambda f: log.failure("stopping {part}", f, part=type(part).__name__)
    )
