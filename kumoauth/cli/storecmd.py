"""
What ``kumoauth throttle`` and ``kumoauth limits`` share: read the
configuration, open the store it names, run one action on it under the
reactor, and turn the outcome into an exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

EXIT_STORE_DOWN = 2

MEMORY_EXPLAINED = (
    '{table} store = "memory": the counters live inside each server process, '
    "where this command cannot reach them; they clear on their own after "
    "{table} window, or on a restart (a shared store, redis://, makes them "
    "visible here)"
)


def fail(message: str, code: int) -> int:
    print(f"kumoauth: error: {message}", file=sys.stderr)
    return code


def run_on_store(
    args: argparse.Namespace,
    table: str,
    spec_of: Callable[[Any], str | None],
    action: Callable[[argparse.Namespace, Any, Any], Awaitable[int]],
) -> int:
    """
    Open the store ``spec_of(config)`` names and run ``action(args, config,
    store)``.  The memory store is explained, not opened (exit 1); a store
    that cannot be reached is one line (exit 2).
    """
    from twisted.internet import defer

    from kumoauth.cli import react
    from kumoauth.ops.assembly import OperatorError, load_config
    from kumoauth.stores import StoreUnavailable, make_store

    try:
        cfg = load_config(args.config)
    except OperatorError as e:
        return fail(str(e), 1)
    spec = spec_of(cfg)
    if spec is None:
        return fail(f"{cfg.source} has no {table} table", 1)
    if spec == "memory":
        return fail(MEMORY_EXPLAINED.format(table=table), 1)

    async def on_store(reactor: Any) -> int:
        try:
            store = make_store(spec, reactor)
        except ValueError as e:
            return fail(f"{table} store: {e}", 1)
        if not getattr(store, "shared", False) or not hasattr(store, "failures"):
            return fail(f"{table} store {spec!r} offers no administration", 1)
        try:
            return await action(args, cfg, store)
        except StoreUnavailable as e:
            return fail(f"{table} store unavailable: {e}", EXIT_STORE_DOWN)
        finally:
            await defer.maybeDeferred(store.close)

    return react(on_store)
