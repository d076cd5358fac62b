"""
The policy API of SPEC §4: ``from kumoauth import kumo``.

A policy file is plain Python that registers one handler per event with
``kumo.on(event, fn)`` or ``@kumo.on(event)``.  :func:`load_policy` executes
such a file into a fresh :class:`Policy`, so a reload never mixes handlers
of two versions of the file.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import linecache
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from twisted.internet.defer import Deferred

from kumoauth.ops.threads import BlockingPool
from kumoauth.textsafe import escape

EVENTS = (
    "smtp_server_connection_accepted",
    "smtp_server_ehlo",
    "smtp_server_auth_plain",
    "smtp_server_mail_from",
    "smtp_server_rcpt_to",
    "smtp_server_message_received",
    "smtp_server_limit_exceeded",
    "smtp_server_auth_oauth",
    "smtp_server_sender_binding",
)

Handler = Callable[..., Any]


class PolicyError(Exception):
    """
    An operator's mistake in a policy file: one line, no traceback.
    """


class Reject(Exception):
    """
    Raised by a handler (or through :func:`reject`) to send an SMTP reply
    instead of going on.  A 421 also closes the connection.
    """

    def __init__(self, code: int, text: str) -> None:
        if not isinstance(code, int) or not 400 <= code <= 599:
            raise ValueError(f"kumo.reject code must be 400-599, got {code!r}")
        super().__init__(code, text)
        self.code = code
        # One line, and no control character reaches the client (the text
        # may quote what the client sent).
        self.text = escape(" ".join(str(text).split()), 400)

    @property
    def reply(self) -> bytes:
        text = self.text
        first = text.split(" ", 1)[0]
        if not _is_enhanced(first, self.code):
            # ENHANCEDSTATUSCODES is advertised: every reply carries one
            # (RFC 2034 §4).
            text = f"{self.code // 100}.7.1 {text}" if text else f"{self.code // 100}.7.1"
        return f"{self.code} {text}".encode("utf-8", "replace")

    @property
    def closes(self) -> bool:
        return self.code == 421


def _is_enhanced(word: str, code: int) -> bool:
    parts = word.split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(code // 100)


class Policy:
    """
    The handlers of one loaded policy file, by event name.
    """

    def __init__(self, source: str = "<policy>") -> None:
        self.source = source
        self.handlers: dict[str, Handler] = {}

    def on(self, event: str, fn: Handler | None = None) -> Any:
        """
        Register *fn* for *event*; without *fn*, return a decorator.
        """
        if event not in EVENTS:
            raise PolicyError(f"unknown event {event!r} (known: {', '.join(EVENTS)})")
        if fn is None:

            def decorator(f: Handler) -> Handler:
                self.on(event, f)
                return f

            return decorator
        if not callable(fn):
            raise PolicyError(f"handler for {event!r} is not callable")
        if event in self.handlers:
            raise PolicyError(f"a second handler for {event!r} (one per event)")
        self.handlers[event] = fn
        return fn

    def handler(self, event: str) -> Handler | None:
        return self.handlers.get(event)


def blocking(fn: Handler) -> Handler:
    """
    Mark a handler that blocks (sqlite, a synchronous HTTP call, bcrypt):
    kumoauth runs it in a bounded thread pool (``[auth] threads``) instead of
    on the reactor thread, so it never stalls other sessions.  Such a handler
    should only read conn_meta; ``set_meta`` from it is not ordered with
    the other events of the connection.
    """
    fn.kumoauth_blocking = True  # type: ignore[attr-defined]
    return fn


def is_blocking(fn: Handler) -> bool:
    return bool(getattr(fn, "kumoauth_blocking", False))


class _Kumo:
    """
    The ``kumo`` object policy files import.  Registrations go to the policy
    being loaded; outside :func:`load_policy` they go to ``kumo.default``.
    """

    Reject = Reject
    blocking = staticmethod(blocking)

    def __init__(self) -> None:
        self.default = Policy("<default>")
        self._loading: list[Policy] = []

    @property
    def current(self) -> Policy:
        return self._loading[-1] if self._loading else self.default

    def on(self, event: str, fn: Handler | None = None) -> Any:
        return self.current.on(event, fn)

    @staticmethod
    def reject(code: int, text: str) -> NoReturn:
        raise Reject(code, text)


kumo = _Kumo()
_counter = itertools.count()


def read_policy(path: Path | str) -> bytes:
    """The policy file's bytes, as they are now; :class:`PolicyError` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"{path}: policy file not found")
    try:
        return path.read_bytes()
    except OSError as e:
        raise PolicyError(f"{path}: cannot be read ({e.strerror or e})") from None


def load_policy(path: Path | str, source: bytes | None = None) -> Policy:
    """
    Execute the policy file at *path* and return its handlers: *source*,
    the file's bytes as :func:`read_policy` read them (perhaps in another
    process), or the file as it is now.  Any failure is a
    :class:`PolicyError` with one line naming the file and line.
    """
    path = Path(path)
    if source is None:
        source = read_policy(path)
    policy = Policy(str(path))
    name = f"kumoauth_policy_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PolicyError(f"{path}: cannot load as a Python file")
    module = importlib.util.module_from_spec(spec)
    kumo._loading.append(policy)
    sys.modules[name] = module
    try:
        # These bytes, not the file again: the file may have changed since.
        code = compile(source, str(path), "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - running the operator's policy is the point
        # Tracebacks from its handlers quote these lines, not the file's
        # lines of the moment (a worker runs what its supervisor read).
        lines = importlib.util.decode_source(source).splitlines(keepends=True)
        linecache.cache[str(path)] = (len(source), None, lines, str(path))
    except PolicyError as e:
        raise PolicyError(f"{path}:{_line_in(e, path)} {e}") from None
    except SyntaxError as e:
        raise PolicyError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except BaseException as e:  # noqa: BLE001 - any import failure is the operator's
        if isinstance(e, KeyboardInterrupt):
            raise
        raise PolicyError(
            f"{path}:{_line_in(e, path)} failed to import: {type(e).__name__}: {e}"
        ) from None
    finally:
        kumo._loading.pop()
        sys.modules.pop(name, None)
    return policy


def _line_in(e: BaseException, path: Path) -> str:
    """
    The line of *path* where *e* was raised, as "N:" (or "" if unknown).
    """
    line = ""
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename) == path:
            line = f"{frame.lineno}:"
    return line


Invoke = Callable[..., Any]


def invoke(fn: Handler, *args: Any) -> Any:
    """
    Call a handler on this thread: a plain value comes back as is, a
    Deferred as is, and a coroutine (``async def``) as a Deferred.
    Exceptions propagate.
    """
    result = fn(*args)
    if inspect.isawaitable(result) and not isinstance(result, Deferred):
        return Deferred.fromCoroutine(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


class Invoker:
    """
    Calls handlers: those marked :func:`blocking` in *pool* (a bounded
    :class:`~kumoauth.ops.threads.BlockingPool`), all others with :func:`invoke`
    on the reactor thread.
    """

    def __init__(self, reactor: Any = None, pool: BlockingPool | None = None) -> None:
        self.reactor = reactor
        self.pool = pool

    def __call__(self, fn: Handler, *args: Any) -> Any:
        if self.pool is not None and is_blocking(fn):
            return self.pool.call(fn, *args)
        return invoke(fn, *args)
