"""
One AUTH attempt, from credentials to outcome, outside the protocol:
throttle (committed failures and attempts in flight; the attempt then
counted in flight) → in-flight limit → Cred portal (with a deadline) → a
failure recorded, a success's password forgotten as a failure → failure
delay → log and metrics.
:meth:`Authenticator.authenticate` returns a Deferred of an
:class:`Outcome`; the protocol only sends its reply.

Testable without a transport: give it a portal, a clock and a throttle.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from twisted.cred import error as cred_error
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumoauth.auth.cred import (
    AccountLocked,
    AuthContext,
    BackendUnavailable,
    IBearerCredentials,
)
from kumoauth.auth.mechanisms import REGISTRY
from kumoauth.auth.throttle import Admission, InFlightKeys, Throttle, Throttled
from kumoauth.config import AuthConfig
from kumoauth.meta import ConnMeta
from kumoauth.ops.cooperate import Slicer
from kumoauth.ops.deadline import deadline
from kumoauth.ops.loglimit import LogLimiter, StateLog
from kumoauth.ops.metrics import Metrics
from kumoauth.storage.delivery import Delivery, IMessageDelivery
from kumoauth.stores import StoreUnavailable
from kumoauth.textsafe import escape, field_value

log = Logger(namespace="kumoauth")
auth_log = Logger(namespace="kumoauth.auth")

R_TEMPFAIL = b"454 4.7.0 Temporary authentication failure"
R_FAILED = b"535 5.7.8 Authentication credentials invalid"
R_IN_FLIGHT = b"454 4.7.0 Too many authentication checks in progress, try again later"
R_SUCCESS = b"235 2.7.0 Authentication successful"

#: results a client can repeat at will: their log lines are rate-limited
#: per client (metrics still count every one)
NOISY_RESULTS = frozenset({"throttled", "cleartext", "unsupported", "malformed", "cancelled"})


def secret_forms(secret: bytes) -> list[str]:
    """
    Every form *secret* can take in an exception's text, longest first: as
    sent, and as ``repr``, ``ascii``, ``str(bytes)``, JSON and our log
    escaping quote it (a checker's ``int(password)`` raises with the
    ``repr``, which doubles a backslash and escapes a tab).  A secret of one
    character is only recognised quoted: replacing every occurrence of one
    character would leave nothing of the text to read.
    """
    text = secret.decode("utf-8", "replace")
    inner = {
        text,
        repr(text)[1:-1],
        ascii(text)[1:-1],
        repr(secret)[2:-1],
        json.dumps(text)[1:-1],
        json.dumps(text, ensure_ascii=False)[1:-1],
        escape(text, len(text) * 10 + 10),
    }
    inner.discard("")
    if len(text) < 2:
        inner = {q + form + q for form in inner for q in "'\""}
    return sorted(inner, key=len, reverse=True)


def scrub(text: str, secrets: list[bytes]) -> str:
    """
    Remove every secret, in every form it may take (:func:`secret_forms`),
    from *text* before it is logged.
    """
    for secret in secrets:
        if secret:
            for form in secret_forms(secret):
                text = text.replace(form, "<hidden>")
    return text


@dataclass
class Attempt:
    """
    One AUTH attempt as the protocol saw it.  ``secrets`` holds everything
    that must be scrubbed from what is logged about it (the base64 lines,
    the password) and is emptied once the attempt is over.
    """

    mechanism: str
    started: float
    client_ip: str
    client: str
    listener: str
    conn_meta: ConnMeta
    authc: str | None = None
    authz: str | None = None
    secrets: list[bytes] = field(default_factory=list)
    checked_at: float | None = None

    def __repr__(self) -> str:
        return f"<Attempt {self.mechanism} authc={self.authc!r} client={self.client}>"


@dataclass(frozen=True)
class Outcome:
    """
    What became of an attempt: ``result`` for the log and metrics
    (success, failure, tempfail, throttled), ``reply`` for the client.
    """

    result: str
    reply: bytes
    delivery: Delivery | None = None
    #: for a refused bearer token: the RFC 7628 §3.2.2 error to send as a
    #: 334 challenge before *reply*, once the client answered it
    challenge: bytes | None = None


class InFlight:
    """
    Checker calls in progress, process-wide (a reload must not multiply
    ``max_in_flight``).
    """

    def __init__(self) -> None:
        self.count = 0
        #: attempts at the checker per throttle key (client, authc)
        self.keys = InFlightKeys()


class AuthLog:
    """
    The one log event per attempt (and the auth metrics).  Noisy results
    are rate-limited per client; every value a client chose is escaped in
    the text (the JSON log gets the raw fields).
    """

    def __init__(self, metrics: Metrics, limiter: LogLimiter) -> None:
        self.metrics = metrics
        self.limiter = limiter

    def record(
        self,
        attempt: Attempt,
        result: str,
        reason: str | None = None,
        latency: float | None = None,
        authn: str | None = None,
    ) -> None:
        """
        Count and log one attempt; *authn* is the account a success logged
        in as, said when the store spells it otherwise than the login.
        """
        metrics = self.metrics
        metrics.auth_attempts.labels(_mechanism_label(attempt.mechanism), result).inc()
        if result == "throttled" and reason:
            metrics.throttle_hits.labels(reason).inc()
        if latency is not None:
            metrics.checker_latency.observe(latency)
        attempt.secrets.clear()
        if result in NOISY_RESULTS:
            key = (attempt.client_ip, result)
            if not self.limiter.allow(key, lambda n: self._summary(attempt, result, n)):
                return
        # The text is built with an f-string: formatting a many-field
        # format string through twisted.logger costs 4x more, per attempt.
        parts = [f"AUTH {escape(attempt.mechanism, 20)} {result}"]
        if attempt.authc is not None:
            parts.append(f"authc={field_value(attempt.authc)}")
        if attempt.authz is not None:
            parts.append(f"authz={field_value(attempt.authz)}")
        if authn is not None and authn != attempt.authc:
            parts.append(f"authn={field_value(authn)}")
        parts.append(f"client={attempt.client} listener={attempt.listener}")
        if latency is not None:
            parts.append(f"checker_latency={latency:.3f}s")
        if reason:
            parts.append(f"reason={field_value(reason)}")
        auth_log.info(
            "{text}",
            text=" ".join(parts),
            mechanism=attempt.mechanism,
            result=result,
            authc=attempt.authc,
            authz=attempt.authz,
            authn=authn,
            client=attempt.client,
            listener=attempt.listener,
            checker_latency=latency or 0.0,
            reason=reason,
        )

    def _summary(self, attempt: Attempt, result: str, n: int) -> None:
        text = (
            f"AUTH {result}: {n} more from client={attempt.client} "
            f"in the last {self.limiter.interval:.0f}s (not logged one by one)"
        )
        auth_log.info("{text}", text=text, result=result, client=attempt.client, suppressed=n)


def _mechanism_label(name: str) -> str:
    # A metrics label must not take any value a client sends.
    return name if name in REGISTRY else "other"


class Authenticator:
    """
    Decides one attempt.  *throttle* may be None (no failure counting).
    """

    def __init__(
        self,
        portal: Portal,
        clock: IReactorTime,
        auth: AuthConfig,
        log: AuthLog,
        in_flight: InFlight,
        throttle: Throttle | None = None,
        store_state: StateLog | None = None,
        slicer: Slicer | None = None,
    ) -> None:
        self.portal = portal
        self.clock = clock
        self.auth = auth
        self.log = log
        self.in_flight = in_flight
        self.throttle = throttle
        #: the failure store's state, logged once per change
        self.store_state = store_state if store_state is not None else StateLog("failure store")
        #: bursts of attempts (or of answers) handled a slice per reactor iteration
        self.slicer = slicer if slicer is not None else Slicer(clock)

    def authenticate(self, attempt: Attempt, credentials: Any) -> defer.Deferred[Outcome]:
        """
        Fire with the :class:`Outcome` of *attempt* for *credentials*
        (``IPlainCredentials`` or ``IBearerCredentials``).  Never fails: a
        bug becomes a tempfail, logged with its traceback (secrets
        scrubbed).  Many attempts at once are started a slice of time per
        reactor iteration (:class:`~kumoauth.ops.cooperate.Slicer`), and so
        are many answers arriving together.
        """
        return self.slicer.call(self._authenticate, attempt, credentials)

    def _authenticate(self, attempt: Attempt, credentials: Any) -> defer.Deferred[Outcome]:
        attempt.authc = credentials.authc
        attempt.authz = credentials.authz
        password = getattr(credentials, "password", b"") or b""
        if password:
            attempt.secrets.append(password)
        throttle = self.throttle
        if throttle is None:
            d: defer.Deferred[Outcome] = self._check(attempt, credentials, None)
        else:
            # Committed failures and attempts in flight decide; admitted,
            # the attempt is counted in flight in the same callback.
            admitted = throttle.admit(
                attempt.client_ip, credentials.authc, password, self.in_flight.keys
            )
            deadline(admitted, self.auth.timeout, self.clock)

            def store_answered(verdict: Admission | Throttled) -> Any:
                if isinstance(verdict, Throttled):
                    # Refused on what the store holds, without writing: no
                    # sign that the store records again, if it did not.
                    if verdict.in_flight:
                        # Only attempts at the checker make the limit: they
                        # are answered within the checker's deadline.
                        return self._throttled(attempt, verdict.reason, self.auth.timeout)
                    return self._throttled(attempt, verdict.reason, verdict.retry_after)
                # It answered, and no write it refused is outstanding (or
                # this attempt was just recorded).
                try:
                    self.store_state.succeeded()
                    return self._check(attempt, credentials, verdict)
                except BaseException:
                    self._not_a_failure(verdict)  # a bug: not counted for good
                    raise

            def store_failed(f: Failure) -> Any:
                if f.check(defer.CancelledError):
                    return f
                if self._store_failed(f):
                    return self._check(attempt, credentials, None)
                # Fail closed: without counters, brute force is unlimited.
                self.log.record(attempt, "tempfail", reason="store")
                return Outcome("tempfail", R_TEMPFAIL)

            d = admitted.addCallbacks(store_answered, store_failed)
        return d.addErrback(self._bug, attempt)

    def _store_failed(self, f: Failure) -> bool:
        """
        The failure store could not answer, or could not record or forget:
        logged once per outage, with what it means for AUTH; whether
        AUTH goes on regardless (``on_store_error = "open"``).
        """
        if not f.check(StoreUnavailable, defer.TimeoutError):
            log.failure("failure store: unexpected error", f)
        open_ = self.auth.throttle.on_store_error == "open"
        self.store_state.failed(
            f.getErrorMessage() or type(f.value).__name__,
            "AUTH goes on without throttles (on_store_error = open)"
            if open_
            else "AUTH gets 454 (on_store_error = closed)",
        )
        return open_

    def _settled(self, d: defer.Deferred[Any]) -> None:
        """A record or forget: its failure marks the store down."""
        deadline(d, self.auth.timeout, self.clock)
        d.addErrback(self._store_failed)

    def _bug(self, f: Failure, attempt: Attempt) -> Outcome:
        if f.check(defer.CancelledError):
            return f  # type: ignore[return-value]  # the session went away
        log.error(
            "bug authenticating {client}: {traceback}",
            client=attempt.client,
            traceback=scrub(f.getTraceback(), attempt.secrets),
        )
        attempt.secrets.clear()
        return Outcome("tempfail", R_TEMPFAIL)

    def _throttled(self, attempt: Attempt, reason: str, retry_after: float) -> Outcome:
        self.log.record(attempt, "throttled", reason=reason)
        wait = max(1, math.ceil(retry_after))
        return Outcome(
            "throttled",
            b"454 4.7.0 Too many failed attempts, try again in %d second%s"
            % (wait, b"" if wait == 1 else b"s"),
        )

    def _check(
        self, attempt: Attempt, credentials: Any, admission: Admission | None
    ) -> defer.Deferred[Outcome]:
        """
        The checker's answer for *credentials*.  *admission* (the attempt
        counted in flight; None without a throttle or with the store down
        and ``on_store_error = "open"``) is done exactly once, when the
        answer is in: for a failure, once it is recorded (so an attempt
        counting against its keys is always in flight or in the store).
        A success forgets its password as a failure.  An attempt whose
        session went away while the checker ran is recorded as a failure
        if it had a password: dropping the connection must not escape
        counting (a later success with that password forgets it).
        """
        bearer = IBearerCredentials.providedBy(credentials)
        if (not credentials.authc and not bearer) or not getattr(credentials, "password", True):
            # Nothing to check: refused without calling the checker (and
            # counted as a failure if it names a user).
            return self._failed(attempt, credentials, None, admission=admission)
        if self.in_flight.count >= self.auth.max_in_flight:
            self._not_a_failure(admission)
            self.log.record(attempt, "throttled", reason="in_flight")
            return defer.succeed(Outcome("throttled", R_IN_FLIGHT))
        attempt.checked_at = self.clock.seconds()
        self.in_flight.count += 1
        d = self.portal.login(
            credentials,
            AuthContext(credentials.authz, credentials.conn_meta, credentials),
            IMessageDelivery,
        )
        # One deadline for every checker, whatever its kind.
        deadline(d, self.auth.timeout, self.clock)
        # Answers that arrive together (one timer tick, one reply from a
        # backend for many) go on a slice at a time.
        d.addBoth(self.slicer.hop)

        def release(result: object) -> object:
            self.in_flight.count -= 1
            return result

        d.addBoth(release)

        def success(result: tuple[Any, Delivery, Any]) -> Outcome:
            self._not_a_failure(admission, verified=True)
            if bearer:
                # A bearer checker learns the user from the token only now.
                attempt.authc, attempt.authz = credentials.authc, credentials.authz
            delivery = result[1]
            self.log.record(
                attempt, "success", latency=self._latency(attempt), authn=delivery.authn_id
            )
            return Outcome("success", R_SUCCESS, delivery=delivery)

        def failure(f: Failure) -> Any:
            if f.check(defer.CancelledError):
                # The session went away: a guess with a password counts.
                if getattr(credentials, "password", b""):
                    self._record_failure(attempt, credentials, admission)
                elif admission is not None:
                    admission.done()
                return f
            latency = self._latency(attempt)
            if f.check(cred_error.UnauthorizedLogin):
                challenge = getattr(f.value, "challenge", None)
                # A locked account's right password: answered as a wrong
                # one (the same delay, counted), its reason in the log only;
                # its good token, as a bad one (the RFC 7628 error first).
                reason = "locked" if f.check(AccountLocked) else None
                if reason and challenge is None:
                    challenge = getattr(credentials, "refusal", None)
                return self._failed(attempt, credentials, latency, challenge, admission, reason)
            # Not a failure of the credentials: the attempt does not count.
            self._not_a_failure(admission)
            if f.check(defer.TimeoutError):
                log.error(
                    "checker did not answer within {timeout}s for authc={authc} from {client}",
                    timeout=self.auth.timeout,
                    authc=field_value(attempt.authc),
                    client=attempt.client,
                )
            elif f.check(BackendUnavailable):
                pass  # the store logged its state change itself: no line per attempt
            else:
                # The checker raised, its Deferred failed, or it gave a non-bool.
                log.error(
                    "checker failed for authc={authc} from {client}: {error}\n{traceback}",
                    authc=field_value(attempt.authc),
                    client=attempt.client,
                    error=escape(scrub(f.getErrorMessage(), attempt.secrets), 1000),
                    traceback=scrub(f.getTraceback(), attempt.secrets),
                )
            self.log.record(attempt, "tempfail", latency=latency)
            return Outcome("tempfail", R_TEMPFAIL)

        return d.addCallbacks(success, failure)

    def _record_failure(
        self, attempt: Attempt, credentials: Any, admission: Admission | None
    ) -> None:
        """
        Record a failure (if it names a user, and there is a throttle);
        *admission* is done once the store has answered, either way.
        """
        throttle = self.throttle
        bearer = IBearerCredentials.providedBy(credentials)
        if throttle is None or not (credentials.authc or bearer):
            # Nothing that names a user or a guess (a bearer token without
            # a user name still counts for its client).
            if admission is not None:
                admission.done()
            return
        d = throttle.failed(
            attempt.client_ip, credentials.authc, getattr(credentials, "password", b"")
        )
        self._settled(d)
        if admission is not None:
            d.addBoth(lambda _: admission.done())

    def _not_a_failure(self, admission: Admission | None, verified: bool = False) -> None:
        """
        The attempt of *admission* ended without a failure of its
        credentials: out of flight, and its password forgotten where it
        may have been counted (*verified*: the checker said yes, so a
        failure recorded for it when its session went away goes too; else
        only if it was recorded before the checker).
        """
        if admission is None:
            return
        admission.done()
        if self.throttle is not None and (verified or admission.recorded):
            self._settled(self.throttle.succeeded(admission))

    def _latency(self, attempt: Attempt) -> float:
        if attempt.checked_at is None:
            return 0.0
        return self.clock.seconds() - attempt.checked_at

    def _failed(
        self,
        attempt: Attempt,
        credentials: Any,
        latency: float | None,
        challenge: bytes | None = None,
        admission: Admission | None = None,
        reason: str | None = None,
    ) -> defer.Deferred[Outcome]:
        """
        535 once ``failure_delay`` has passed since the attempt began (so a
        fast "no such user" and a slow "wrong password" look alike).  The
        failure is recorded (if it names a user), then *admission* done.
        """
        self._record_failure(attempt, credentials, admission)
        self.log.record(attempt, "failure", reason=reason, latency=latency)
        outcome = Outcome("failure", R_FAILED, challenge=challenge)
        wait = max(0.0, attempt.started + self.auth.failure_delay - self.clock.seconds())
        if wait <= 0:
            return defer.succeed(outcome)
        return task.deferLater(self.clock, wait, lambda: outcome)
