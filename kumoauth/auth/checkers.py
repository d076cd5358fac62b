"""
Checker factories: how ``[auth] checker`` becomes checkers, each with its
own configuration table and a lifecycle.

A factory is registered under a name (the built-in credential stores use
this: ``checker = "passwd-file"``) or loaded as ``"package.module:factory"``.
It gets:

- ``config``: its own table, ``[auth.<name>]`` (for ``pkg.module:factory``
  the table is named after the factory: ``[auth.factory]``), already
  checked by the factory's optional ``validate(table) -> config``, whose
  ``ValueError`` becomes one operator line naming the table;
- ``reactor`` and ``pool`` (the bounded :class:`~kumoauth.ops.threads.BlockingPool`
  for work that must block: hash verification, synchronous clients).

A checker may provide :class:`ICheckerLifecycle`: ``start()`` once it is in
service (start-up, or when a reload brings it in), ``reload(config)`` when
a SIGHUP keeps the same checker with a new table, ``stop()`` at shutdown
or when a reload replaces it.  Each may return a Deferred.

A factory that takes no arguments (the original ``[auth] checker =
"pkg.module:factory"`` form) still works.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface

from kumoauth.auth.cred import normalize_checker

log = Logger(namespace="kumoauth")

#: ``[auth.<name>]`` tables that belong to kumoauth itself, not a checker
RESERVED_TABLES = frozenset({"throttle", "cache", "oauth"})

#: the built-in credential stores (:mod:`kumoauth.backends`), imported only
#: when configured: ``[auth] checker = "<name>"`` with ``[auth.<name>]``
BUILTIN: dict[str, str] = {
    "passwd-file": "kumoauth.backends.passwdfile:factory",
    "dovecot": "kumoauth.backends.dovecot:factory",
    "ldap": "kumoauth.backends.ldap:factory",
    "sql": "kumoauth.backends.sql:factory",
    "http": "kumoauth.backends.http:factory",
}


class ICheckerLifecycle(Interface):
    """
    Optional hooks of a checker with resources (connections, files, caches).
    """

    def start() -> defer.Deferred[None] | None:
        """
        The checker goes into service.
        """

    def reload(config: Any) -> defer.Deferred[None] | None:
        """
        SIGHUP, and the configuration still names this checker: take *config*
        (its validated table) for what comes next.
        """

    def stop() -> defer.Deferred[None] | None:
        """
        The checker leaves service (shutdown, or a reload replaced it).
        """


CheckerFactory = Callable[..., ICredentialsChecker]

#: built-in checker factories by ``[auth] checker`` name
REGISTRY: dict[str, CheckerFactory] = {}


def register(name: str, factory: CheckerFactory) -> CheckerFactory:
    """
    Make *factory* available as ``[auth] checker = "<name>"``.
    """
    REGISTRY[name] = factory
    return factory


@dataclass(frozen=True)
class CheckerSpec:
    """
    A resolved ``[auth] checker``: the factory, its table name and its
    validated configuration.
    """

    name: str
    table: str
    factory: CheckerFactory
    config: Any


def builtin(name: str) -> CheckerFactory:
    """
    The factory of the built-in store *name* (imports its module).
    """
    factory = REGISTRY.get(name)
    if factory is None:
        factory = REGISTRY[name] = _import(BUILTIN[name])
    return factory


def resolve(
    spec: str,
    tables: Mapping[str, Mapping[str, Any]],
    base: Path | None = None,
    also: frozenset[str] = frozenset(),
) -> CheckerSpec:
    """
    Find the factory for *spec* and validate its table (relative paths in
    it are against *base*, the configuration file's directory).  Raises
    ``ValueError`` with one line (the caller adds the file name).
    """
    if spec in REGISTRY or spec in BUILTIN:
        factory, table = builtin(spec), spec
    else:
        factory, table = _import(spec), spec.partition(":")[2]
    for name in tables:
        if name != table and name not in RESERVED_TABLES and name not in also:
            raise ValueError(
                f'[auth.{name}]: no such table (the checker is "{spec}", whose table is '
                f"[auth.{table}])"
            )
    raw = dict(tables.get(table, {}))
    validate = getattr(factory, "validate", None)
    if validate is None:
        if raw:
            raise ValueError(f'[auth.{table}]: the checker "{spec}" takes no configuration')
        config: Any = raw
    else:
        try:
            config = validate(raw, base=base) if _accepts(validate, "base") else validate(raw)
        except ValueError as e:
            raise ValueError(f"[auth.{table}] {e}") from None
    return CheckerSpec(name=spec, table=table, factory=factory, config=config)


def resolve_tables_only(
    tables: Mapping[str, Mapping[str, Any]], also: frozenset[str] = frozenset()
) -> None:
    """
    With the policy (or ``--auth``) as checker, no checker table may be
    there (but those *also* names: a store ``[sender_binding]`` reads): a
    typo in a table name must not pass silently.
    """
    for name in tables:
        if name not in RESERVED_TABLES and name not in also:
            if name in BUILTIN or name in REGISTRY:
                # The table is there, the choice of checker is not.
                raise ValueError(
                    f'[auth.{name}]: the checker is not chosen: set [auth] checker = "{name}" '
                    "(the policy is the checker now, and this table would be ignored)"
                )
            raise ValueError(f"[auth.{name}]: no such table (no checker named {name!r})")


def _import(spec: str) -> CheckerFactory:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(f'"{n}"' for n in ("policy", *dict.fromkeys([*BUILTIN, *REGISTRY])))
        raise ValueError(f'"{spec}" is not one of {known} or "package.module:factory"')
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"cannot import {module_name}: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{module_name} has no callable {attr}")
    return factory


def build(spec: CheckerSpec, reactor: Any, pool: Any, metrics: Any = None) -> ICredentialsChecker:
    """
    Call the factory and make its checker speak ``IPlainCredentials``.
    Raises ``ValueError`` with one line.
    """
    factory = spec.factory
    try:
        if _takes_arguments(factory):
            extra = {"metrics": metrics} if _accepts(factory, "metrics") else {}
            checker = factory(config=spec.config, reactor=reactor, pool=pool, **extra)
        else:
            checker = factory()
    except ValueError as e:
        raise ValueError(f"[auth.{spec.table}] {e}") from None
    except Exception as e:
        raise ValueError(f"{spec.name}: the factory failed: {type(e).__name__}: {e}") from None
    if not ICredentialsChecker.providedBy(checker):
        raise ValueError(f"{spec.name}: the factory did not return an ICredentialsChecker")
    try:
        normalize_checker(checker)
    except TypeError as e:
        raise ValueError(str(e)) from None
    return checker


def _takes_arguments(factory: CheckerFactory) -> bool:
    return _accepts(factory, "config")


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters


def call_hook(checker: Any, hook: str, *args: Any) -> defer.Deferred[None]:
    """
    Call ``checker.<hook>(*args)`` if the checker has it; a failure is
    logged (a checker that cannot start is still asked, and answers 454).
    """
    fn = getattr(checker, hook, None)
    if fn is None or not ICheckerLifecycle.providedBy(checker):
        return defer.succeed(None)
    d = defer.maybeDeferred(fn, *args)

    def failed(f: Any) -> None:
        log.failure(
            "checker {checker} {hook}() failed", f, checker=type(checker).__name__, hook=hook
        )

    return d.addErrback(failed)
