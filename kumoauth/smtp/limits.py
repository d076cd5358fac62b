"""
Per-user sending limits (``[limits]``): how many messages and recipients
one authenticated user may send per window, across every instance that
shares the store.  A phished account's spam run stops at the limit
instead of getting the service's addresses blocklisted.

The user is ``authn_id`` (the account that logged in: a stolen password
is an account's, whatever identity it then asks for), folded as the
throttles fold user names (:func:`~kumoauth.stores.fold_user`: case, and
spaces around and inside), for its counters and its metric label alike.
A message is counted when MAIL is accepted, a recipient when RCPT is, both
after the policy's own ``smtp_server_mail_from`` / ``smtp_server_rcpt_to``
said yes (what the policy refuses costs nothing), and both are given back
when the transaction ends without the message accepted (RSET, a refusal or
a 451 at the end of DATA, the connection lost): what the limit counts is
mail that left, not attempts (a client retrying after a ``451`` would use up
its budget faster than it sends).
Over the limit: ``451 4.7.1`` saying when the window resets, one log line
per user and kind per minute (repeats are summarised), a metric, and the
policy event ``smtp_server_limit_exceeded(authn_id, kind, conn_meta)`` so a
policy can also act on the account (hold it, alert).
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumoauth.config import LimitsConfig
from kumoauth.ops.deadline import deadline
from kumoauth.ops.loglimit import LogLimiter, StateLog
from kumoauth.stores import StoreUnavailable, fold_user
from kumoauth.textsafe import escape

log = Logger(namespace="kumoauth")

#: kinds of limit, as the policy event and the metric name them
MESSAGES, RECIPIENTS = "messages", "recipients"

R_STORE_DOWN = b"451 4.7.1 Cannot check sending limits now, try again later"


def _silent(result: Any, seconds: float) -> Any:
    # The caller's deadline passed: the store is down as far as it goes.
    raise StoreUnavailable(f"no answer within {seconds:g} s")


def counter_key(kind: str, user: str) -> str:
    return f"limit:{kind}:{fold_user(user)}"


class Charge:
    """
    What one transaction has counted against its user so far: given back
    (:meth:`SendingLimits.give_back`) unless its message is accepted.
    """

    __slots__ = ("user", "counted")

    def __init__(self, user: str) -> None:
        self.user = user
        #: (kind, the epoch time its window ends) -> how many counted there
        self.counted: dict[tuple[str, float], int] = {}

    def add(self, kind: str, until: float) -> None:
        key = (kind, round(until, 3))
        self.counted[key] = self.counted.get(key, 0) + 1


def _now(clock: Any) -> float:
    if clock is None:
        from twisted.internet import reactor

        clock = reactor
    return float(clock.seconds())


def _unexpected(f: Failure) -> None:
    if not f.check(StoreUnavailable, defer.TimeoutError, defer.CancelledError):
        log.failure("sending limits: unexpected error from the store", f)


class SendingLimits:
    """
    The ``[limits]`` of one configuration generation over its store.
    """

    def __init__(
        self,
        store: Any,
        config: LimitsConfig,
        state: StateLog,
        log_limiter: LogLimiter,
        metrics: Any,
        policy: Any = None,
        invoke: Any = None,
    ) -> None:
        self.store = store
        self.config = config
        self.state = state
        self.log_limiter = log_limiter
        self.metrics = metrics
        self.policy = policy
        self.invoke = invoke

    def limit_of(self, kind: str) -> int | None:
        if kind == MESSAGES:
            return self.config.max_messages_per_user
        return self.config.max_recipients_per_user

    def check(
        self,
        kind: str,
        user: str,
        conn_meta: Any,
        timeout: float | None = None,
        clock: Any = None,
        charge: Charge | None = None,
    ) -> defer.Deferred[bytes | None]:
        """
        Count one more of *kind* for *user*; fire with None when within the
        limit, else with the reply to send.  What was counted is added to
        *charge*.  A store silent for *timeout* seconds (on *clock*) is
        down, as if it had refused: its state line and ``on_store_error``
        decide, not a traceback.
        """
        limit = self.limit_of(kind)
        if limit is None:
            return defer.succeed(None)
        cfg = self.config
        d: defer.Deferred[Any] = self.store.add(counter_key(kind, user), 1, cfg.window, limit)
        if timeout is not None:
            deadline(d, timeout, clock, _silent)

        def counted(result: tuple[bool, int, float]) -> bytes | None:
            self.state.succeeded()
            allowed, count, reset_in = result
            if allowed:
                if charge is not None:
                    charge.add(kind, _now(clock) + reset_in)
                return None
            return self._exceeded(kind, user, limit, reset_in, conn_meta)

        def failed(f: Failure) -> Any:
            if f.check(defer.CancelledError):
                return f  # the session went away
            if not f.check(StoreUnavailable, defer.TimeoutError):
                log.failure("sending limits: unexpected error from the store", f)
            open_ = cfg.on_store_error == "open"
            self.state.failed(
                f.getErrorMessage() or type(f.value).__name__,
                "mail goes on without sending limits (on_store_error = open)"
                if open_
                else "MAIL and RCPT get 451 (on_store_error = closed)",
            )
            return None if open_ else R_STORE_DOWN

        return d.addCallbacks(counted, failed)

    def give_back(self, charge: Charge) -> None:
        """
        Uncount what *charge* counted: its transaction ended without the
        message accepted.  Nobody waits for it; a store that is down keeps
        the count until the window ends (its state line is the checks').
        """
        for (kind, until), n in charge.counted.items():
            limit = self.limit_of(kind) or 0
            # to the window it was counted in only: one started since (the
            # transaction outlived its window) must not get it
            d = defer.maybeDeferred(
                self.store.add,
                counter_key(kind, charge.user),
                -n,
                self.config.window,
                limit,
                until=until,
            )
            d.addErrback(_unexpected)

    def _exceeded(self, kind: str, user: str, limit: int, reset_in: float, conn_meta: Any) -> bytes:
        wait = max(1, math.ceil(reset_in))
        folded = fold_user(user)
        # The folded name: a client must not make new label values at will.
        self.metrics.limit_exceeded.labels(kind, escape(folded, 64)).inc()
        key = ("limit", kind, folded)

        def summarise(n: int) -> None:
            log.warn(
                "sending limit: {n} more {kind} refused for user {user}",
                n=n,
                kind=kind,
                user=escape(user),
            )

        if self.log_limiter.allow(key, summarise):
            log.warn(
                "sending limit: user {user} reached {limit} {kind} per {window}s "
                "(resets in {wait}s); refusing more with 451",
                user=escape(user),
                limit=limit,
                kind=kind,
                window=int(self.config.window),
                wait=wait,
            )
        self._tell_policy(user, kind, conn_meta)
        what = b"messages" if kind == MESSAGES else b"recipients"
        return (
            b"451 4.7.1 Sending limit reached (%d %s per %d seconds), try again in %d second%s"
            % (
                limit,
                what,
                int(self.config.window),
                wait,
                b"" if wait == 1 else b"s",
            )
        )

    def _tell_policy(self, user: str, kind: str, conn_meta: Any) -> None:
        handler = self.policy.handler("smtp_server_limit_exceeded") if self.policy else None
        if handler is None:
            return
        try:
            d = defer.maybeDeferred(self.invoke, handler, user, kind, conn_meta)
        except Exception:  # pragma: no cover - maybeDeferred catches
            d = defer.fail(Failure())
        d.addErrback(lambda f: log.failure("policy handler smtp_server_limit_exceeded failed", f))
