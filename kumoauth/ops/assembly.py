"""
Assembly: a configuration becomes the parts of a server: TLS context,
policy, checkers, throttle, spool and the :class:`~kumoauth.smtp.runtime.Runtime`
generation.  Used by the single-process service, the supervisor (to
validate before it starts workers) and every reload.

Operator mistakes found here raise :class:`OperatorError` (one line); the
twistd plugin turns that into a message on stderr and a non-zero exit.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.logger import Logger

from kumoauth.auth.checkers import CheckerSpec, build, resolve, resolve_tables_only
from kumoauth.auth.cred import PolicyChecker, make_portal
from kumoauth.auth.throttle import Throttle, make_store
from kumoauth.config import Config, ConfigError, load
from kumoauth.policy import Invoker, Policy, PolicyError, load_policy
from kumoauth.smtp.runtime import ProcessState, Runtime
from kumoauth.storage.spool import Spool
from kumoauth.tls.context import ServerContextFactory, TLSError, build_context, make_self_signed

log = Logger(namespace="kumoauth")


class OperatorError(Exception):
    """
    A mistake in the configuration or environment: one line, exit non-zero.
    """


def load_config(path: str) -> Config:
    """
    Read and validate the configuration; an error is an :class:`OperatorError`.
    """
    try:
        return load(path)
    except ConfigError as e:
        raise OperatorError(str(e)) from None


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
    process: ProcessState,
    override: list[ICredentialsChecker] | None,
    invoker: Invoker,
    previous: Runtime | None = None,
) -> tuple[list[ICredentialsChecker], tuple[CheckerSpec, Any] | None]:
    """
    ``--auth`` checkers if given; else the policy handler or the
    ``[auth] checker`` factory with its ``[auth.<name>]`` table.  On a
    reload, a factory checker that is configured again is kept (its
    ``reload`` hook gets the new table once the generation is swapped).
    Returns the checkers and the factory checker with its spec, if any.
    """
    try:
        spec = None if cfg.auth.checker == "policy" else resolve(cfg.auth.checker, cfg.auth.tables)
        if spec is None:
            resolve_tables_only(cfg.auth.tables)
    except ValueError as e:
        raise OperatorError(f"{cfg.source}: [auth] checker: {e}") from None
    if override:
        return list(override), None
    if spec is None:
        handler = policy.handler("smtp_server_auth_plain")
        if handler is None:
            if any(listener.auth_required for listener in cfg.listeners):
                raise OperatorError(
                    f'{cfg.source}: [auth] checker = "policy", but the policy has no '
                    "smtp_server_auth_plain handler (and a listener has auth_required)"
                )
            return [], None
        return [PolicyChecker(handler, cfg.auth.timeout, process.clock, invoker)], None
    kept = previous.checker if previous is not None else None
    if kept is not None and kept[0].name == spec.name and kept[0].factory is spec.factory:
        return [kept[1]], (spec, kept[1])
    try:
        checker = build(spec, process.clock, invoker.pool)
    except ValueError as e:
        raise OperatorError(f"{cfg.source}: [auth] checker: {e}") from None
    return [checker], (spec, checker)


def build_runtime(
    cfg: Config,
    process: ProcessState,
    override: list[ICredentialsChecker] | None,
    invoker: Invoker,
    tls: ServerContextFactory | None = None,
    policy: Policy | None = None,
    previous: Runtime | None = None,
) -> Runtime:
    """
    The configuration generation for *cfg* over the process-lived *process*.

    *tls* and *policy* may have been built already (a reload builds them
    off the reactor thread); the TLS context goes into the process's
    holder last, once nothing else can fail.  The failure store is kept
    while its setting is unchanged, with its counters and salt.
    """
    clock: Any = process.clock
    if tls is None:
        tls = build_tls(cfg)
    if policy is None:
        policy = build_policy(cfg)
    checker_list, checker = build_checkers(cfg, policy, process, override, invoker, previous)
    spec = cfg.auth.throttle.store
    store = process.failure_stores.get(spec)
    if store is None:
        try:
            store = make_store(spec, clock)
        except ValueError as e:
            raise OperatorError(f"{cfg.source}: [auth.throttle] store: {e}") from None
    runtime = Runtime(
        process=process,
        server=cfg.server,
        auth=cfg.auth,
        policy=policy,
        portal=make_portal(checker_list, process.store),
        invoke=invoker,
        throttle=Throttle(store, cfg.auth.throttle, salt=process.throttle_salt),
        policy_timeout=cfg.policy.timeout,
        handshake_timeout=cfg.tls.handshake_timeout if cfg.tls is not None else 30.0,
        checker=checker,
    )
    # Nothing can fail from here on.
    process.failure_stores.clear()
    process.failure_stores[spec] = store
    if tls is not None:
        if process.tls is None:
            process.tls = tls
        elif process.tls is not tls:
            process.tls.set_context(tls.getContext())
    return runtime


def prepare_spool(cfg: Config, recover: bool = True, owner: tuple[int, int] | None = None) -> Spool:
    """
    Create the spool and (once per server, never in a worker: others may be
    writing) remove what a crash left.

    *owner* (uid, gid; -1 leaves one unchanged): the directories created
    here are given to them — start-up runs as root, the server then runs as
    twistd's ``--uid``/``--gid``.
    """
    spool = Spool(cfg.spool.path)
    try:
        created = [p for p in (spool.tmp, spool.path, *spool.path.parents) if not p.exists()]
        spool.create()
        if owner is not None:
            for p in created:
                os.chown(p, *owner)
        removed = spool.recover() if recover else []
    except OSError as e:
        raise OperatorError(f"{cfg.source}: [spool] path: {cfg.spool.path}: {e.strerror}") from None
    if removed:
        log.warn("spool recovery removed {n} incomplete files", n=len(removed))
    return spool
