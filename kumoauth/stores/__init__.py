"""
State that sessions share: failure counters (``[auth.throttle]``), per-user
sending limits (``[limits]``), and the few values every process serving
one site must agree on (the fingerprint salt, the verified-credential
cache's generation).

Two implementations behind the interfaces below, chosen by the ``store``
setting:

- ``"memory"`` (:mod:`kumoauth.stores.memory`): in the process; with
  ``[server] workers`` above 1, each worker counts on its own;
- ``"redis://…"``, ``"rediss://…"``, ``"unix://…"``
  (:mod:`kumoauth.stores.redis`): one Redis shared by every process and
  host, each operation one atomic Lua script, keys that expire on their
  own, names under a configurable prefix.

Every method returns a Deferred; a store that cannot answer fails it with
:class:`StoreUnavailable` (its message names the cause, never a secret),
and the caller decides what that means (``on_store_error``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface


class StoreUnavailable(Exception):
    """
    The store could not be reached or did not answer in time.
    """


class IFailureStore(Interface):
    """
    Sliding-window sets of failed-attempt fingerprints, by key.

    A key holds at most *keep* fingerprints (the most recently seen); a
    fingerprint seen again within the window is refreshed, not added, so the
    count is the number of *distinct* failures in the window, capped at
    *keep*.  A shared implementation must make :meth:`record` atomic (one
    Lua script or MULTI in Redis) so that parallel connections get exact
    counts.
    """

    def record(key: str, fingerprint: bytes, window: float, keep: int) -> defer.Deferred[int]:
        """
        Atomically: drop what is older than *window* seconds under *key*,
        add *fingerprint* now (or refresh its time if already there), drop
        the oldest beyond *keep*, and fire with the distinct count now in the
        window (at most *keep*).
        """

    def count(key: str, window: float) -> defer.Deferred[tuple[int, float]]:
        """
        Fire with ``(failures, retry_after)``: the distinct failures under
        *key* in the last *window* seconds, and the seconds until the oldest
        of them leaves the window (``0.0`` when there are none).
        """

    def forget(key: str, user_key: str | None, fingerprint: bytes) -> defer.Deferred[None]:
        """
        Remove *fingerprint* from *key* and from *user_key* (when given),
        wherever it is (nothing else is touched).  The throttle calls it
        after every successful login with the fingerprint of the verified
        password: a password that is right is not a failure, even if an
        attempt with it was counted (one whose session went away while it
        was checked).  A ``package.module:factory`` store may lack it: the
        fingerprint then stays until the window passes.
        """


def fold_user(name: str) -> str:
    """
    The one form of a user name that keys its failure budget, its sending
    limits and its metric label: case-folded, without leading and trailing
    whitespace, each run of whitespace inside made one space.  User
    databases commonly take "Alice", "alice " and " alice" for one account
    (LDAP's matching rules, SQL's PAD SPACE collations); one account must
    have one budget, and a client must not make new label values at will.
    """
    return " ".join(name.casefold().split())


class ICounterStore(Interface):
    """
    Fixed-window counters with a ceiling, by key (per-user sending limits).

    A window starts at a key's first use and lasts *window* seconds; then
    the key is gone and counting starts again.
    """

    def add(
        key: str, amount: int, window: float, limit: int, until: float | None = None
    ) -> defer.Deferred[tuple[bool, int, float]]:
        """
        Atomically: if the count under *key* plus *amount* stays within
        *limit*, add *amount* and fire with ``(True, new_count, reset_in)``;
        otherwise add nothing and fire with ``(False, count, reset_in)``.
        *reset_in* is the seconds until the window ends.  A negative
        *amount* gives back what was counted: never below zero, never
        starting a window, always ``True``, and with *until* (the epoch
        time the counted window was to end) only to that window, not to
        one started since (within a second, or half the window).
        """

    def get(key: str) -> defer.Deferred[tuple[int, float]]:
        """
        Fire with ``(count, reset_in)`` (``(0, 0.0)`` for no window).
        """

    def reset(key: str) -> defer.Deferred[bool]:
        """
        End *key*'s window now; fire with whether there was one.
        """


class ISharedState(Interface):
    """
    Values every process sharing the store agrees on.
    """

    def secret(name: str) -> defer.Deferred[bytes]:
        """
        32 random bytes made once for *name* and the same for every process
        sharing the store (the fingerprint salt: a password retried through
        two instances must count once).  The memory store makes its own.
        Once read, a store keeps it (it never changes): a reload that keeps
        the store does not ask again.
        """

    def generation(name: str) -> defer.Deferred[int]:
        """
        The current generation number of *name* (0 before any bump).
        """

    def bump(name: str) -> defer.Deferred[int]:
        """
        Increment *name*'s generation (every process polling it sees the
        change: the verified-credential cache clears itself); fire with the
        new value.
        """


class IStoreAdmin(Interface):
    """
    What the operator's commands (``kumoauth throttle``, ``kumoauth
    limits``) need.
    """

    shared = Attribute(
        "True when other processes see the same state (an admin command can work on it)"
    )

    def failures(kind: str) -> defer.Deferred[list[tuple[str, int, float]]]:
        """
        Every failure key of *kind* (``"ip"`` or ``"authc"``) with failures
        in it: ``(name, distinct failures, seconds until the key expires)``;
        *name* without the kind prefix (``"192.0.2.1"``, ``"alice"``).
        """

    def clear_failures(key: str) -> defer.Deferred[int]:
        """
        Delete the failure key *key* (``"ip:192.0.2.1"``, ``"ip:2001:db8::/64"``,
        ``"authc:alice"``); fire with the number of keys deleted (0 or 1).
        """

    def close() -> defer.Deferred[None]:
        """
        Drop connections (shutdown, or a reload that stops using the store).
        """


StoreFactory = Callable[[str, IReactorTime], Any]

#: store factories by the scheme of a ``store`` setting, each called with
#: the whole setting and the reactor
STORES: dict[str, str] = {
    "memory": "kumoauth.stores.memory:from_spec",
    "redis": "kumoauth.stores.redis:from_spec",
    "rediss": "kumoauth.stores.redis:from_spec",
    "unix": "kumoauth.stores.redis:from_spec",
}


def scheme_of(spec: str) -> str:
    return spec.split("://", 1)[0] if "://" in spec else spec


def make_store(spec: str, clock: IReactorTime) -> Any:
    """
    The store for a ``store`` setting: ``"memory"``, a Redis URL, or
    ``"package.module:factory"`` (called with the reactor; it must return
    an :class:`IFailureStore`).  ``ValueError`` with one line.
    """
    target = STORES.get(scheme_of(spec))
    if target is not None:
        module_name, _, attr = target.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        try:
            store = factory(spec, clock)
        except ValueError as e:
            raise ValueError(f'"{_safe(spec)}": {e}') from None
    else:
        module_name, sep, attr = spec.partition(":")
        if not sep or "/" in spec:
            known = ", ".join(
                f'"{name}"' for name in ("memory", "redis://…", "rediss://…", "unix://…")
            )
            raise ValueError(f'"{_safe(spec)}" is not one of {known} or "package.module:factory"')
        try:
            store = getattr(importlib.import_module(module_name), attr)(clock)
        except Exception as e:
            raise ValueError(f"{spec}: {type(e).__name__}: {e}") from None
    if not IFailureStore.providedBy(store):
        raise ValueError(f"{_safe(spec)} did not return an IFailureStore")
    return store


_USER_AND_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^:/@]*):")
_USER_ONLY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


#: query options whose values are shown; any other's (a misspelt
#: ``pasword=``, a ``password=`` that is no option) is hidden
_SHOWN_OPTIONS = frozenset({"prefix", "timeout", "db", "password_file", "ca_file"})


def _safe_query(spec: str) -> str:
    head, sep, query = spec.partition("?")
    if not sep:
        return spec
    items = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        items.append(item if not eq or name in _SHOWN_OPTIONS else f"{name}=***")
    return f"{head}?{'&'.join(items)}"


def _safe(spec: str) -> str:
    """
    *spec* without a password (``redis://:secret@host`` -> ``redis://:***@host``):
    everything before the last ``@`` is hidden but a scheme and a user name
    of the usual form, whatever the rest looks like; the value of a query
    option that is not one of the known harmless ones is hidden too
    (``?password=secret`` -> ``?password=***``).
    """
    if "@" not in spec:
        return _safe_query(spec)
    head, _, host = spec.rpartition("@")
    # Only after the last "@": a "?" before it may be in the password.
    host = _safe_query(host)
    m = _USER_AND_PASSWORD.match(head)
    if m:
        return f"{m.group(1)}://{m.group(2)}:***@{host}"
    m = _USER_ONLY.match(head) or _SCHEME.match(head)
    if m:
        return f"{m.group(0)}***@{host}"
    return f"***@{host}"
