"""
Assembly: configuration → TLS, policy, checker, spool → one listener
service per ``[[listener]]``, all under one ``MultiService``.

Operator mistakes found here raise :class:`OperatorError` (one line); the
twistd plugin turns that into a message on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.logger import ILogObserver, Logger, globalLogPublisher, jsonFileLogObserver
from twisted.web.server import Site
from zope.interface import provider

from kumoauth.config import Config, ConfigError, load
from kumoauth.cred import PolicyChecker, load_checker_factory, make_portal
from kumoauth.listener import Runtime, SubmissionFactory, wrap_listener
from kumoauth.metrics import site_root
from kumoauth.policy import Invoker, Policy, PolicyError, load_policy
from kumoauth.spool import Spool, SpoolWriter
from kumoauth.threads import BlockingPool, stop_within
from kumoauth.throttle import Throttle, make_store
from kumoauth.tls import ServerContextFactory, TLSError, build_context, make_self_signed

log = Logger(namespace="kumoauth")

#: blocking calls that may wait per checker thread before new ones get a 4xx
QUEUED_PER_THREAD = 10
#: seconds a shutdown waits for the spool writer and checker threads
STOP_THREADS_WITHIN = 5.0


class OperatorError(Exception):
    """
    A mistake in the configuration or environment: one line, exit non-zero.
    """


def build_tls(cfg: Config) -> ServerContextFactory | None:
    tls = cfg.tls
    if tls is None:
        return None
    if tls.self_signed and not tls.certificate.exists() and not tls.private_key.exists():
        make_self_signed(tls.certificate, tls.private_key, cfg.server.hostname)
        log.warn(
            "created a self-signed certificate at {path} (self_signed = true): "
            "for development only",
            path=str(tls.certificate),
        )
    try:
        return ServerContextFactory(build_context(tls))
    except TLSError as e:
        raise OperatorError(f"{cfg.source}: {e}") from None


def build_policy(cfg: Config) -> Policy:
    if cfg.policy.path is None:
        return Policy()
    try:
        return load_policy(cfg.policy.path)
    except PolicyError as e:
        raise OperatorError(f"{cfg.source}: [policy] path: {e}") from None


def build_checkers(
    cfg: Config,
    policy: Policy,
    reactor: Any,
    override: list[ICredentialsChecker] | None,
    invoker: Invoker,
) -> list[ICredentialsChecker]:
    """
    ``--auth`` checkers if given; else the policy handler or the
    ``[auth] checker`` factory.
    """
    if override:
        return list(override)
    if cfg.auth.checker == "policy":
        handler = policy.handler("smtp_server_auth_plain")
        if handler is None:
            if any(listener.auth_required for listener in cfg.listeners):
                raise OperatorError(
                    f'{cfg.source}: [auth] checker = "policy", but the policy has no '
                    "smtp_server_auth_plain handler (and a listener has auth_required)"
                )
            return []
        return [PolicyChecker(handler, cfg.auth.timeout, reactor, invoker)]
    try:
        return [load_checker_factory(cfg.auth.checker)]
    except ValueError as e:
        raise OperatorError(f"{cfg.source}: [auth] checker: {e}") from None


def bind(endpoint: Any, factory: Any, source: str, key: str, description: str) -> Any:
    """
    Listen on *endpoint* now.  Failure is an operator error: one line on
    stderr and exit status 1.
    """
    result: list[Any] = []
    endpoint.listen(factory).addBoth(result.append)
    if not result or not IListeningPort.providedBy(result[0]):
        reason = result[0].getErrorMessage() if result else "did not bind at once"
        message = f'{source}: {key} "{description}": cannot listen: {reason}'
        log.critical("{message}", message=message)
        # twistd has redirected sys.stderr into the log by now; the
        # operator's terminal is still file descriptor 2.
        os.write(2, f"kumoauth: error: {message}\n".encode())
        raise SystemExit(1)
    return result[0]


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
    ) -> None:
        self.description = description
        self.endpoint = endpoint
        self.submission_factory = factory if isinstance(factory, SubmissionFactory) else None
        self.factory = wrap_listener(factory) if self.submission_factory else factory
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
            self.port = bind(self.endpoint, self.factory, self.source, self.key, self.description)
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
    Once the reactor runs (after Twisted has installed its own handlers):
    SIGHUP calls *on_hup*; SIGTERM stops the reactor like Twisted's
    handler, but without making the process end "killed by SIGTERM" — a
    drained, orderly stop is a success, exit status 0.
    """

    def install() -> None:
        def on_sigterm(signum: int, frame: Any) -> None:
            reactor.callFromThread(reactor.stop)

        def on_sighup(signum: int, frame: Any) -> None:
            reactor.callFromThread(on_hup)

        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGHUP, on_sighup)

    reactor.callWhenRunning(install)


class KumoauthService(service.MultiService):
    """
    The whole server.

    Stopping it (SIGTERM) is ordered: stop accepting at once, let sessions
    finish their transactions for ``shutdown_grace`` seconds (then
    ``421 4.3.2`` to the rest), and only then stop the spool writer and the
    checker threads, so a message in DATA is still spooled.

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
        self.runtime = runtime
        self.writer = writer
        self.checker_pool = checker_pool
        self.reactor = reactor
        self.override = override
        self._json_log: Any = None

    @property
    def listeners(self) -> list[ListenerService]:
        return [s for s in self if isinstance(s, ListenerService)]

    @property
    def smtp_listeners(self) -> list[ListenerService]:
        return [s for s in self.listeners if s.submission_factory is not None]

    def startService(self) -> None:
        self.writer.start()
        self.checker_pool.start()
        if self.cfg.log.json_path is not None:
            self._json_log = open_json_log(self.cfg.log.json_path)
        super().startService()
        install_signals(self.reactor, self.reload)

    # --- reload ------------------------------------------------------------

    def reload(self) -> bool:
        """
        Re-read the configuration file and apply it to new connections.
        Returns False (and changes nothing) if anything in it is wrong.
        """
        try:
            cfg = load(self.cfg.source)
            runtime = build_runtime(
                cfg,
                self.reactor,
                self.override,
                self.writer,
                Invoker(self.reactor, self.checker_pool),
                previous=self.runtime,
            )
        except (ConfigError, OperatorError) as e:
            self.runtime.metrics.reloads.labels("failure").inc()
            log.error("reload failed, configuration unchanged: {error}", error=str(e))
            return False
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
        runtime.metrics.reloads.labels("success").inc()
        log.info("reloaded configuration from {path}", path=str(cfg.source))
        return True

    def _report_restart_only(self, cfg: Config) -> None:
        old = {(li.endpoint, li.tls) for li in self.cfg.listeners}
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
        if cfg.spool.path != self.cfg.spool.path:
            log.warn("[spool] path changed: it needs a restart")
        if cfg.auth.threads != self.cfg.auth.threads:
            log.warn("[auth] threads changed: it needs a restart")
        if cfg.metrics != self.cfg.metrics:
            log.warn("[metrics] changed: it needs a restart")
        if cfg.log != self.cfg.log:
            log.warn("[log] changed: it needs a restart")

    # --- stop --------------------------------------------------------------

    def stopService(self) -> defer.Deferred[Any]:
        d = defer.gatherResults([defer.maybeDeferred(s.stop_listening) for s in self.listeners])
        sessions, grace = self.runtime.sessions, self.runtime.server.shutdown_grace
        if sessions.live:
            log.info(
                "stopping: {n} sessions get up to {grace}s to finish",
                n=len(sessions.live),
                grace=grace,
            )
        d.addCallback(lambda _: sessions.drain(grace, self.reactor))

        def stop_threads(_: object) -> defer.Deferred[None]:
            # Joined off the reactor thread, and not waited for past a few
            # seconds: a hung handler must not hold SIGTERM.
            if self._json_log is not None:
                globalLogPublisher.removeObserver(self._json_log)
                self._json_log = None
            return stop_within(
                defer.gatherResults([self.writer.stop(), self.checker_pool.stop()]),
                STOP_THREADS_WITHIN,
                self.reactor,
            )

        d.addCallback(stop_threads)
        d.addCallback(lambda _: super(KumoauthService, self).stopService())
        return d


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
    ``kumoauth``, ``kumoauth.auth``, ``kumoauth.smtp``) as JSON lines.
    """
    stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    json_observer = jsonFileLogObserver(stream)

    @provider(ILogObserver)
    def kumoauth_only(event: dict[str, Any]) -> None:
        namespace = event.get("log_namespace") or ""
        if namespace == "kumoauth" or namespace.startswith("kumoauth."):
            json_observer(event)

    globalLogPublisher.addObserver(kumoauth_only)
    return kumoauth_only


def make_service(
    config_path: str,
    reactor: IReactorCore | None = None,
    checkers: list[Any] | None = None,
    auth_args: list[str] | None = None,
) -> service.MultiService:
    """
    Build the whole service from a configuration file.  Raises
    :class:`OperatorError`.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor  # type: ignore[assignment]
    try:
        cfg = load(config_path)
    except ConfigError as e:
        raise OperatorError(str(e)) from None
    return make_service_from_config(cfg, reactor, checkers, auth_args=auth_args)


def build_runtime(
    cfg: Config,
    reactor: Any,
    override: list[ICredentialsChecker] | None,
    writer: SpoolWriter,
    invoker: Invoker,
    previous: Runtime | None = None,
) -> Runtime:
    """
    Everything a new connection needs, from *cfg*.  On a reload,
    *previous* hands over what must outlive it: connection counts, the
    live sessions, the TLS context holder (its context is replaced only
    once everything else has been built) and, if its setting is
    unchanged, the throttle store with its counters.
    """
    tls = build_tls(cfg)
    policy = build_policy(cfg)
    checker_list = build_checkers(cfg, policy, reactor, override, invoker)
    store = None
    if previous is not None and previous.throttle is not None:
        if previous.auth.throttle.store == cfg.auth.throttle.store:
            store = previous.throttle.store
    if store is None:
        try:
            store = make_store(cfg.auth.throttle.store, reactor)
        except ValueError as e:
            raise OperatorError(f"{cfg.source}: [auth.throttle] store: {e}") from None
    holder = tls
    if previous is not None and previous.tls is not None and tls is not None:
        holder = previous.tls
    extra: dict[str, Any] = {}
    if previous is not None:
        extra = {
            "limits": previous.limits,
            "sessions": previous.sessions,
            "metrics": previous.metrics,
            "in_flight": previous.in_flight,
            "log_limiter": previous.log_limiter,
        }
    runtime = Runtime(
        server=cfg.server,
        auth=cfg.auth,
        policy=policy,
        portal=make_portal(checker_list, writer.store),
        store=writer.store,
        clock=reactor,
        tls=holder,
        invoke=invoker,
        # The salt of the password fingerprints lives as long as the store
        # (a reload must not make a retried password count again).
        throttle=Throttle(
            store,
            cfg.auth.throttle,
            salt=previous.throttle.salt if previous and previous.throttle else None,
        ),
        policy_timeout=cfg.policy.timeout,
        handshake_timeout=cfg.tls.handshake_timeout if cfg.tls is not None else 30.0,
        **extra,
    )
    if holder is not tls and holder is not None and tls is not None:
        holder.set_context(tls.getContext())  # last: nothing can fail after it
    return runtime


def prepare_spool(cfg: Config, recover: bool = True) -> Spool:
    """
    Create the spool and (once per server, never in a worker: others may be
    writing) remove what a crash left.
    """
    spool = Spool(cfg.spool.path)
    try:
        spool.create()
        removed = spool.recover() if recover else []
    except OSError as e:
        raise OperatorError(f"{cfg.source}: [spool] path: {cfg.spool.path}: {e.strerror}") from None
    if removed:
        log.warn("spool recovery removed {n} incomplete files", n=len(removed))
    return spool


def make_service_from_config(
    cfg: Config,
    reactor: Any,
    checkers: list[Any] | None = None,
    adopt: dict[int, tuple[int, int]] | None = None,
    auth_args: list[str] | None = None,
) -> service.MultiService:
    """
    The server in this process.  With *adopt* (listener index -> socket) it
    is a worker: the listening sockets come from the supervisor, the spool
    is not recovered here, and metrics are served by the supervisor.
    """
    if adopt is None and cfg.server.workers > 1:
        from kumoauth.workers import make_supervisor

        return make_supervisor(cfg, reactor, checkers, auth_args or [])
    spool = prepare_spool(cfg, recover=adopt is None)
    writer = SpoolWriter(spool, reactor)
    checker_pool = BlockingPool(
        reactor,
        threads=cfg.auth.threads,
        max_queued=cfg.auth.threads * QUEUED_PER_THREAD,
        name="kumoauth-checker",
    )
    runtime = build_runtime(cfg, reactor, checkers, writer, Invoker(reactor, checker_pool))

    top = KumoauthService(cfg, runtime, writer, checker_pool, reactor, checkers)
    for i, listener in enumerate(cfg.listeners):
        try:
            endpoint = endpoints.serverFromString(reactor, listener.endpoint)
        except Exception as e:
            raise OperatorError(
                f'{cfg.source}: [[listener]] #{i + 1} endpoint: "{listener.endpoint}": '
                f"cannot parse: {e}"
            ) from None
        factory = SubmissionFactory(listener, runtime)
        ls = ListenerService(listener.endpoint, endpoint, factory, str(cfg.source))
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
        site = QuietSite(site_root(runtime.metrics))
        ListenerService(
            cfg.metrics.endpoint, endpoint, site, str(cfg.source), key="[metrics] endpoint"
        ).setServiceParent(top)
    return top
