"""
Assembly: configuration → TLS, policy, checker, spool → one listener
service per ``[[listener]]``, all under one ``MultiService``.

Operator mistakes found here raise :class:`OperatorError` (one line); the
twistd plugin turns that into a message on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Protocol

from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from kumoauth.config import Config, ConfigError, load
from kumoauth.cred import PolicyChecker, load_checker_factory, make_portal
from kumoauth.listener import Runtime, SubmissionFactory, wrap_listener
from kumoauth.policy import Invoker, Policy, PolicyError, load_policy
from kumoauth.spool import Spool, SpoolWriter
from kumoauth.throttle import Throttle, make_store
from kumoauth.tls import ServerContextFactory, TLSError, build_context, make_self_signed

log = Logger(namespace="kumoauth")


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


class Startable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class ListenerService(service.Service):
    """
    Binds one listener in ``privilegedStartService`` (before twistd drops
    privileges).  A listener that cannot bind is an operator error: one
    line on stderr and exit status 1.
    """

    def __init__(self, description: str, endpoint: Any, factory: Any, source: str) -> None:
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.source = source
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        result: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(result.append)
        if not result or not IListeningPort.providedBy(result[0]):
            reason = result[0].getErrorMessage() if result else "did not bind at once"
            message = (
                f'{self.source}: [[listener]] endpoint "{self.description}": '
                f"cannot listen: {reason}"
            )
            log.critical("{message}", message=message)
            # twistd has redirected sys.stderr into the log by now; the
            # operator's terminal is still file descriptor 2.
            os.write(2, f"kumoauth: error: {message}\n".encode())
            raise SystemExit(1)
        self.port = result[0]
        log.info(
            "listening on {address} ({tls})", address=str(self.port.getHost()), tls=self.factory_tls
        )

    @property
    def factory_tls(self) -> str:
        f = self.factory
        inner = getattr(f, "wrappedFactory", f)
        return str(inner.listener.tls)

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


class KumoauthService(service.MultiService):
    """
    The whole server.  Stopping it (SIGTERM) is ordered: stop accepting at
    once, let sessions finish their transactions for ``shutdown_grace``
    seconds (then ``421 4.3.2`` to the rest), and only then stop the spool
    writer and the checker threads, so a message in DATA is still spooled.
    """

    def __init__(self, runtime: Runtime, pools: list[Startable], reactor: Any) -> None:
        super().__init__()
        self.runtime = runtime
        self.pools = pools
        self.reactor = reactor

    def startService(self) -> None:
        for pool in self.pools:
            pool.start()
        super().startService()
        # Twisted's own SIGTERM handler makes the process end "killed by
        # SIGTERM"; a drained, orderly stop is a success: exit status 0.
        # (Installed once the reactor runs, after Twisted's handlers.)
        self.reactor.callWhenRunning(self._handle_sigterm)

    def _handle_sigterm(self) -> None:
        def on_sigterm(signum: int, frame: Any) -> None:
            log.info("SIGTERM: stopping")
            self.reactor.callFromThread(self.reactor.stop)

        signal.signal(signal.SIGTERM, on_sigterm)

    def stopService(self) -> defer.Deferred[Any]:
        listeners = [s for s in self if isinstance(s, ListenerService)]
        d = defer.gatherResults([defer.maybeDeferred(s.stop_listening) for s in listeners])
        live = len(self.runtime.sessions.live)
        if live:
            log.info(
                "stopping: {n} sessions get up to {grace}s to finish",
                n=live,
                grace=self.runtime.server.shutdown_grace,
            )
        d.addCallback(
            lambda _: self.runtime.sessions.drain(self.runtime.server.shutdown_grace, self.reactor)
        )

        def stop_pools(_: object) -> None:
            for pool in self.pools:
                pool.stop()

        d.addCallback(stop_pools)
        d.addCallback(lambda _: super(KumoauthService, self).stopService())
        return d


def make_service(
    config_path: str, reactor: IReactorCore | None = None, checkers: list[Any] | None = None
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
    return make_service_from_config(cfg, reactor, checkers)


def make_service_from_config(
    cfg: Config, reactor: Any, checkers: list[Any] | None = None
) -> service.MultiService:
    tls = build_tls(cfg)
    policy = build_policy(cfg)
    checker_pool = ThreadPool(minthreads=0, maxthreads=cfg.auth.threads, name="kumoauth-checker")
    invoker = Invoker(reactor, checker_pool)
    checker_list = build_checkers(cfg, policy, reactor, checkers, invoker)
    try:
        store = make_store(cfg.auth.throttle.store, reactor)
    except ValueError as e:
        raise OperatorError(f"{cfg.source}: [auth.throttle] store: {e}") from None

    spool = Spool(cfg.spool.path)
    try:
        spool.create()
        removed = spool.recover()
    except OSError as e:
        raise OperatorError(f"{cfg.source}: [spool] path: {cfg.spool.path}: {e.strerror}") from None
    if removed:
        log.warn("spool recovery removed {n} incomplete files", n=len(removed))
    writer = SpoolWriter(spool, reactor)

    runtime = Runtime(
        server=cfg.server,
        auth=cfg.auth,
        policy=policy,
        portal=make_portal(checker_list, writer.store),
        store=writer.store,
        clock=reactor,
        tls=tls,
        invoke=invoker,
        throttle=Throttle(store, cfg.auth.throttle),
    )

    top = KumoauthService(runtime, [writer, checker_pool], reactor)
    for i, listener in enumerate(cfg.listeners):
        try:
            endpoint = endpoints.serverFromString(reactor, listener.endpoint)
        except Exception as e:
            raise OperatorError(
                f'{cfg.source}: [[listener]] #{i + 1} endpoint: "{listener.endpoint}": '
                f"cannot parse: {e}"
            ) from None
        factory = wrap_listener(SubmissionFactory(listener, runtime))
        ListenerService(listener.endpoint, endpoint, factory, str(cfg.source)).setServiceParent(top)
    return top
