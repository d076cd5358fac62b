"""
Assembly: a configuration becomes the parts of a server: TLS context,
policy, checkers, throttle, spool and the :class:`~kumoauth.smtp.runtime.Runtime`
generation.  Used by the single-process service, the supervisor (to
validate before it starts workers) and every reload.

Operator mistakes found here raise :class:`OperatorError` (one line); the
twistd plugin turns that into a message on stderr and a non-zero exit.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.logger import Logger

from kumoauth.auth import locked
from kumoauth.auth.checkers import CheckerSpec, build, resolve, resolve_tables_only
from kumoauth.auth.cred import PolicyChecker, make_portal
from kumoauth.auth.throttle import Throttle, make_store
from kumoauth.config import Config, ConfigError, load, parse
from kumoauth.policy import Invoker, Policy, PolicyError, load_policy, read_policy
from kumoauth.relay.queue import (
    QueueError,
    QueueLocked,
    QueueStore,
    SegmentWriter,
    give_queue,
)
from kumoauth.relay.scheduler import RelaySettings
from kumoauth.smtp.limits import SendingLimits
from kumoauth.smtp.runtime import ProcessState, Runtime
from kumoauth.tls.context import (
    ServerContextFactory,
    TLSError,
    build_context,
    make_self_signed,
    read_pem,
)
from kumoauth.tls.trust import trust_root

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


#: the largest policy file, private key or certificate chain
MAX_GENERATION_FILE = 4 * 1024 * 1024


@dataclass(frozen=True)
class GenerationFiles:
    """
    The files a configuration generation is built from, besides its text:
    the policy, the TLS private key and certificate chain, and the
    throttle's fingerprint key, as read once.  The supervisor reads them
    when it validates a generation and hands the same bytes to every worker
    it starts or reloads, so that a worker restarted later runs what was
    validated, whatever is on disk by then.
    """

    # Not in a repr: keys must never reach a log or a traceback.
    policy: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    certificate: bytes | None = field(default=None, repr=False)
    fingerprint_key: bytes | None = field(default=None, repr=False)

    def to_wire(self) -> dict[str, str | None]:
        """For the workers' control channel (JSON)."""
        return {
            f.name: None if value is None else base64.b64encode(value).decode("ascii")
            for f in fields(self)
            for value in [getattr(self, f.name)]
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> GenerationFiles:
        def get(name: str) -> bytes | None:
            value = wire.get(name)
            return None if value is None else base64.b64decode(value, validate=True)

        return cls(get("policy"), get("private_key"), get("certificate"), get("fingerprint_key"))


def parse_validated(text: str, source: Path | str, files: GenerationFiles) -> Config:
    """
    A generation's text as a worker parses it: validated by the supervisor
    already, so the files it names are not read again (they may have
    changed or gone since: a worker restarted then must still start), and
    the fingerprint key is the one the supervisor read.  An
    :class:`OperatorError` if it does not parse.
    """
    try:
        cfg = parse(text, source, read_files=False, fingerprint_key=files.fingerprint_key)
        if cfg.auth.throttle.fingerprint_key_file is not None and files.fingerprint_key is None:
            cfg = parse(text, source)  # from a supervisor that sends no files
    except ConfigError as e:
        raise OperatorError(str(e)) from None
    return cfg


def read_generation_files(cfg: Config) -> GenerationFiles:
    """
    Read the files *cfg* names (creating the self-signed certificate first
    where it asks for one); an unreadable one, or one over
    :data:`MAX_GENERATION_FILE`, is an :class:`OperatorError`.
    """
    policy = None
    if cfg.policy.path is not None:
        try:
            policy = read_policy(cfg.policy.path)
        except PolicyError as e:
            raise OperatorError(f"{cfg.source}: [policy] path: {e}") from None
        _not_too_big(cfg, "[policy] path", cfg.policy.path, policy)
    key, chain = _read_tls(cfg) if cfg.tls is not None else (None, None)
    # Read when the text was parsed: the supervisor's key, for every worker.
    fingerprint = cfg.auth.throttle.fingerprint_key
    return GenerationFiles(policy, key, chain, fingerprint)


def _read_tls(cfg: Config) -> tuple[bytes, bytes]:
    tls = cfg.tls
    assert tls is not None
    if tls.self_signed and not tls.certificate.exists() and not tls.private_key.exists():
        try:
            make_self_signed(tls.certificate, tls.private_key, cfg.server.hostname)
        except OSError as e:
            where = e.filename or tls.certificate
            raise OperatorError(
                f"{cfg.source}: [tls] self_signed: cannot create the certificate: "
                f"{where}: {e.strerror or e}"
            ) from None
        log.warn(
            "created a self-signed certificate at {path} (self_signed = true): "
            "for development only",
            path=str(tls.certificate),
        )
    try:
        key, chain = read_pem(tls)
    except TLSError as e:
        raise OperatorError(f"{cfg.source}: {e}") from None
    _not_too_big(cfg, "[tls] private_key", tls.private_key, key)
    _not_too_big(cfg, "[tls] certificate", tls.certificate, chain)
    return key, chain


def _not_too_big(cfg: Config, key: str, path: Path, data: bytes) -> None:
    # Workers get the bytes over their control pipe (kumoauth.ops.workers).
    if len(data) > MAX_GENERATION_FILE:
        raise OperatorError(f"{cfg.source}: {key}: {path}: over {MAX_GENERATION_FILE >> 20} MiB")


def build_tls(cfg: Config, files: GenerationFiles | None = None) -> ServerContextFactory | None:
    """The TLS context for *cfg*: from *files*, or from the files as they are now."""
    tls = cfg.tls
    if tls is None:
        return None
    if files is not None and files.private_key is not None and files.certificate is not None:
        pem = (files.private_key, files.certificate)
    else:
        pem = _read_tls(cfg)
    try:
        return ServerContextFactory(build_context(tls, pem=pem))
    except TLSError as e:
        raise OperatorError(f"{cfg.source}: {e}") from None


def build_policy(cfg: Config, files: GenerationFiles | None = None) -> Policy:
    """The policy for *cfg*: from *files*, or from the file as it is now."""
    if cfg.policy.path is None:
        return Policy()
    source = files.policy if files is not None else None
    try:
        return load_policy(cfg.policy.path, source)
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
    binding = cfg.sender_binding
    also: frozenset[str] = frozenset()
    if binding is not None and binding.source != "map":
        also = frozenset({binding.source})  # [sender_binding] reads that store's table
    try:
        spec = (
            None
            if cfg.auth.checker == "policy"
            else resolve(cfg.auth.checker, cfg.auth.tables, base=cfg.source.parent, also=also)
        )
        if spec is None:
            resolve_tables_only(cfg.auth.tables, also)
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
        checker = build(spec, process.clock, invoker.pool, metrics=process.metrics)
    except ValueError as e:
        raise OperatorError(f"{cfg.source}: [auth] checker: {e}") from None
    return [checker], (spec, checker)


def _cache(cfg: Config, process: ProcessState, checkers: list[Any], shared: Any) -> Any:
    """
    The ``[auth.cache]`` wrapper for this generation's checker, or None.
    The cache lives as long as the process; each build (start-up,
    SIGHUP) clears it, so a reload invalidates every entry.  With a
    *shared* throttle store, invalidations reach every instance.
    """
    settings = cfg.auth.cache
    if settings is None or not settings.enabled:
        if process.credential_cache is not None:
            process.credential_cache.clear()
        return None
    from kumoauth.backends.cache import CredentialCache

    cache = process.credential_cache
    if cache is None:
        cache = process.credential_cache = CredentialCache(process.clock, settings, process.metrics)
    cache.share(shared)
    cache.configure(settings)
    cache.watch(checkers)
    return cache.wrap


def _sender_gate(
    cfg: Config, process: ProcessState, policy: Policy, invoker: Invoker
) -> tuple[Any, Any]:
    """
    The ``[sender_binding]`` engine (kept while its settings and the store
    table it reads are unchanged) and this generation's gate over it.
    """
    settings = cfg.sender_binding
    if settings is None:
        return None, None
    from kumoauth.auth.senders import SenderBinding
    from kumoauth.smtp.sender_gate import SenderGate

    table = cfg.auth.tables.get(settings.source) if settings.source != "map" else None
    key = (settings, repr(table))
    kept = process.sender_binding
    if kept is not None and kept[0] == key:
        binding = kept
    else:
        try:
            engine = SenderBinding(
                settings,
                cfg.auth.tables,
                process.clock,
                invoker.pool,
                cfg.source.parent,
                parse_pool=process.parse_pool,
            )
        except ValueError as e:
            raise OperatorError(f"{cfg.source}: [sender_binding] {e}") from None
        binding = (key, engine)
    gate = SenderGate(
        binding[1], policy, invoker, process.metrics, cfg.policy.timeout, process.clock
    )
    return binding, gate


def discard(process: ProcessState) -> None:
    """
    Let go of what :func:`build_runtime` opened for *process*, a state that
    was only built to be thrown away (a supervisor checks a configuration
    its workers will build): the stores' connections, the cache's poll of
    the shared store, the sender-binding engine, the token validator.
    Each SIGHUP to a supervisor left one more Redis connection, and its
    cache's poll logging every outage again.
    """
    for store in process.failure_stores.values():
        if hasattr(store, "close"):
            store.close()
    process.failure_stores.clear()
    if process.credential_cache is not None:
        process.credential_cache.stop()
    if process.sender_binding is not None:
        process.sender_binding[1].stop()
    if process.oauth_validator is not None:
        process.oauth_validator.stop()


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
    # One store per setting, shared by the throttle and [limits] when they
    # name the same one, and kept across reloads while it is still named.
    stores: dict[str, Any] = {}

    def store_for(spec: str, where: str) -> Any:
        if spec not in stores:
            found = process.failure_stores.get(spec)
            if found is None:
                try:
                    found = make_store(spec, clock)
                except ValueError as e:
                    raise OperatorError(f"{cfg.source}: {where} store: {e}") from None
            stores[spec] = found
        return stores[spec]

    try:
        store = store_for(cfg.auth.throttle.store, "[auth.throttle]")
        limits = None
        if cfg.limits is not None:
            limits = SendingLimits(
                store_for(cfg.limits.store, "[limits]"),
                cfg.limits,
                process.limits_store_state,
                process.log_limiter,
                process.metrics,
                policy,
                invoker,
            )
        oauth = cfg.auth.oauth
        validator = None
        bearer = None
        if oauth is not None:
            from kumoauth.auth.bearer import BearerChecker
            from kumoauth.backends.oauth import TokenValidator

            validator = process.oauth_validator
            if validator is None:
                validator = TokenValidator(oauth, reactor=clock, pool=invoker.pool)
            bearer = BearerChecker(
                validator,
                oauth.username_claim,
                policy.handler("smtp_server_auth_oauth"),
                invoker,
                cfg.policy.timeout,
                clock,
            )
        binding, gate = _sender_gate(cfg, process, policy, invoker)
        locked_path = cfg.auth.locked_users
        try:
            locked_now = locked.read(locked_path) if locked_path is not None else None
        except locked.LockedFileError as e:
            raise OperatorError(f"{cfg.source}: [auth] locked_users: {e}") from None
        runtime = Runtime(
            process=process,
            server=cfg.server,
            auth=cfg.auth,
            policy=policy,
            portal=make_portal(
                checker_list,
                process.store,
                wrap=_cache(cfg, process, checker_list, store),
                bearer=bearer,
                locked=process.locked_users,
            ),
            invoke=invoker,
            throttle=Throttle(
                store,
                cfg.auth.throttle,
                salt=process.throttle_salt,
                ipv6_prefix=cfg.auth.throttle.ipv6_prefix,
                writes=process.throttle_writes,
            ),
            policy_timeout=cfg.policy.timeout,
            handshake_timeout=cfg.tls.handshake_timeout if cfg.tls is not None else 30.0,
            checker=checker,
            sending_limits=limits,
            sender_gate=gate,
        )
    except BaseException:
        # A reload that fails keeps the running stores; the ones it opened
        # for itself go (a Redis connection per failed SIGHUP, otherwise).
        for spec, made in stores.items():
            if process.failure_stores.get(spec) is not made and hasattr(made, "close"):
                made.close()
        raise
    # Nothing can fail from here on.
    for spec, old in process.failure_stores.items():
        if spec not in stores and hasattr(old, "close"):
            old.close()  # a store no longer named (a shared one's connection)
    process.failure_stores.clear()
    process.failure_stores.update(stores)
    process.locked_users.use(locked_path, locked_now)
    if binding is not process.sender_binding:
        if process.sender_binding is not None:
            process.sender_binding[1].stop()
        process.sender_binding = binding
        if binding is not None:
            binding[1].start()
    if validator is not None:
        if process.oauth_validator is None:
            process.oauth_validator = validator
        elif validator.config != oauth:
            validator.reload(oauth)
    elif process.oauth_validator is not None:
        process.oauth_validator.stop()
        process.oauth_validator = None
    if tls is not None:
        if process.tls is None:
            process.tls = tls
        elif process.tls is not tls:
            process.tls.set_context(tls.getContext())
    return runtime


def _absent(path: Path) -> bool:
    """Whether *path* does not exist (one that cannot be looked at does, here)."""
    try:
        path.stat()
    except FileNotFoundError:
        return True
    except OSError:  # EACCES under a directory we may not search: QueueStore.open says so
        return False
    return False


def open_queue(cfg: Config, owner: tuple[int, int] | None = None) -> QueueStore:
    """
    Take the queue (``[spool] path``) as its one owner: lock it, recover
    what a crash left, index it.  Another kumoauth on the same queue is an
    operator error (one line, and nothing touched).

    *owner* (uid, gid; -1 leaves one unchanged): who the server runs as once
    twistd drops privileges; what is created here, as root, is given to them.
    """
    path = cfg.spool.path
    created = [p for p in (path, *path.parents) if _absent(p)]
    try:
        queue = QueueStore.open(path)
    except QueueLocked as e:
        raise OperatorError(f"{cfg.source}: [spool] path: {e}") from None
    except QueueError as e:
        raise OperatorError(f"{cfg.source}: [spool] path: {e}") from None
    for level, text in queue.take_notes():
        getattr(log, level)("{text}", text=text)
    if owner is not None:
        try:
            for p in created:
                os.chown(p, *owner)
            give_queue(path, *owner)
        except OSError as e:
            queue.close()
            raise OperatorError(f"{cfg.source}: [spool] path: {path}: {e.strerror}") from None
    from twisted.internet import reactor

    # Once running, this is the daemon's own process (twistd forks after
    # this): the lock file names it, not the parent that exited.
    reactor.callWhenRunning(queue.note_pid)
    return queue


def worker_segments(cfg: Config, writer: str) -> SegmentWriter:
    """
    A worker's own segments in the queue its supervisor owns.
    """
    segments = SegmentWriter(cfg.spool.path, writer)
    try:
        segments.create()
    except OSError as e:
        raise OperatorError(f"{cfg.source}: [spool] path: {cfg.spool.path}: {e.strerror}") from None
    return segments


def check_json_log(cfg: Config, owner: tuple[int, int] | None = None) -> None:
    """
    ``[log] json_path`` can be opened for appending (created if need be,
    and given to the user twistd switches to): found at start-up, once,
    rather than by every process that opens it.
    """
    path = cfg.log.json_path
    if path is None:
        return
    try:
        existed = path.exists()
        with open(path, "a", encoding="utf-8"):
            pass
        if not existed and owner is not None:
            os.chown(path, *owner)
    except OSError as e:
        raise OperatorError(f"{cfg.source}: [log] json_path: {path}: {e.strerror or e}") from None


def relay_settings(cfg: Config) -> RelaySettings | None:
    """
    ``[relay]`` with its secrets read from their files (operator errors if
    they cannot be read); None without ``[relay]``.
    """
    relay = cfg.relay
    if relay is None:
        return None
    password = header_key = None
    if relay.password_file is not None:
        raw = _secret(cfg, "password_file", relay.password_file)
        try:
            password = raw.decode("utf-8", "strict")
        except UnicodeDecodeError:
            raise OperatorError(
                f"{cfg.source}: [relay] password_file: {relay.password_file}: not UTF-8"
            ) from None
        if "\n" in password or "\r" in password:
            # Sent as it is, every AUTH would fail: the password is one line.
            raise OperatorError(
                f"{cfg.source}: [relay] password_file: {relay.password_file}: "
                "more than one line (the password is the file's one line)"
            )
    if relay.header_key_file is not None:
        header_key = _secret(cfg, "header_key_file", relay.header_key_file)
    if relay.ca_file is not None:
        # Read now, as the relay will: a file without a usable certificate
        # is a start-up error, not a deferral of every message.
        try:
            trust_root(relay.ca_file)
        except ValueError as e:
            raise OperatorError(f"{cfg.source}: [relay] {e}") from None
    return RelaySettings(
        config=relay,
        hostname=cfg.server.hostname,
        password=password,
        header_key=header_key,
        max_message_size=cfg.server.max_message_size,
    )


def _secret(cfg: Config, key: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OperatorError(f"{cfg.source}: [relay] {key}: {path}: {e.strerror}") from None
    data = data.rstrip(b"\r\n")
    if not data:
        raise OperatorError(f"{cfg.source}: [relay] {key}: {path}: the file is empty")
    return data
