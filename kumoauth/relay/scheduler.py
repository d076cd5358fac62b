"""
The relay scheduler: takes due messages from the queue, hands them to the
upstream over a bounded pool of reusable sessions, and records each
recipient's fate.

- 2xx recipients are done; 4xx recipients stay and are retried after
  ``retry_schedule[attempts - 1]`` (the last value repeats); 5xx
  recipients, and 4xx ones once the message is older than ``max_age``,
  are bounced (RFC 3464, :mod:`kumoauth.relay.dsn`), the bounce queued like
  any message.  A message leaves the queue only once every recipient is
  done or bounced.
- A connection failure (refused, timeout, TLS verification, AUTH refused)
  defers the whole message, logged once per attempt with the reason.
- With ``identity = "authz"`` an upstream session is per identity (AUTH
  once, with the user's ``authn_id`` as SASL authzid) and reused for that
  identity's next messages; at most ``concurrency`` sessions exist.
- Only the queue's owner (the process holding its lock) runs a scheduler,
  and a message is claimed while it is being sent, so it is never sent by
  two sessions at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumoauth.config import RelayConfig
from kumoauth.relay.client import IdentityRefused, NotSent, UpstreamError
from kumoauth.relay.dsn import FULL_RETURN_LIMIT, STATUS_NEEDS_SMTPUTF8, FailedRecipient
from kumoauth.relay.queue import dsn_of
from kumoauth.smtp.dsnparams import NOTHING, Requested
from kumoauth.textsafe import escape, field_value, unescape

log = Logger(namespace="kumoauth.relay")

#: messages up to this size are read on the reactor thread
READ_INLINE = 256 * 1024
#: seconds between looks at the queue for messages other processes stored
#: (workers) and for retries that came due
TICK = 0.5

#: octets of a message read for a report that returns its header section:
#: more than dsn.FULL_RETURN_LIMIT, so that a RET=FULL original read only
#: this far is still seen to be too large to return whole
REPORT_HEAD = 128 * 1024
#: longest recipient list, escaped, in an attempt's log line
MAX_LIST = 8192
#: after a send ends, other writers' records are looked for if the last
#: look is this old (seconds)
RESCAN_AFTER = 0.05
#: seconds a stop waits for the messages being sent unless told otherwise
#: (the server passes ``[server] shutdown_grace``); then their sessions are
#: dropped and they stay queued (sent again later: at-least-once)
STOP_WITHIN = 5.0
#: seconds a stop waits, after that, for bounces still being stored
STORE_WITHIN = 5.0


@dataclass(frozen=True)
class RelaySettings:
    """
    ``[relay]`` with its secrets read from their files.  ``repr`` hides them.
    """

    config: RelayConfig
    hostname: str
    password: str | None = field(default=None, repr=False)
    header_key: bytes | None = field(default=None, repr=False)
    #: ``[server] max_message_size``: said once if the upstream takes less
    max_message_size: int | None = None

    def retry_delay(self, attempts: int) -> float:
        schedule = self.config.retry_schedule
        return schedule[min(max(attempts, 1), len(schedule)) - 1]


#: what :func:`identity_value` leaves as it is (RFC 3986 unreserved, and @ +)
_IDENTITY_SAFE = "@+"


def identity_value(value: str) -> str:
    """
    *value* for ``X-Kumoauth-Identity``: every octet of its UTF-8 form
    other than an ASCII letter, digit or one of ``-._~@+`` becomes ``%XX``
    (upper-case hex), so ``;``, ``=``, ``%``, white space, control and
    non-ASCII characters cannot end a field or start another.
    ``urllib.parse.unquote`` reverses it.
    """
    return quote(value, safe=_IDENTITY_SAFE, encoding="utf-8", errors="strict")


def identity_header(key: bytes, authn: str, authz: str, message_id: str) -> bytes:
    """
    ``X-Kumoauth-Identity`` for ``identity = "header"``: the identities and
    the queue id, each percent-encoded (:func:`identity_value`), signed
    with HMAC-SHA256 under the shared key so the upstream can trust it
    (docs/relay.md shows the check).
    """
    fields = "; ".join(
        f"{name}={identity_value(value)}"
        for name, value in (("authn", authn), ("authz", authz), ("id", message_id))
    )
    sig = hmac.new(key, fields.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"X-Kumoauth-Identity: {fields}; sig={sig}\r\n".encode()


class _Pool:
    """
    Upstream sessions: idle ones by identity, and a count of all, bounded
    by ``concurrency``.
    """

    def __init__(self) -> None:
        self.idle: dict[str | None, deque[tuple[Any, float]]] = {}
        self.count = 0

    def take(self, identity: str | None) -> Any | None:
        sessions = self.idle.get(identity)
        while sessions:
            session, _ = sessions.popleft()
            if getattr(session, "reusable", True):
                return session
            self.count -= 1
            _close(session)
        return None

    def put(self, identity: str | None, session: Any, now: float) -> None:
        self.idle.setdefault(identity, deque()).append((session, now))

    def evict_one(self) -> bool:
        """
        Close the longest-idle session (to make room for another identity).
        """
        oldest: tuple[str | None, float] | None = None
        for identity, sessions in self.idle.items():
            if sessions and (oldest is None or sessions[0][1] < oldest[1]):
                oldest = (identity, sessions[0][1])
        if oldest is None:
            return False
        session, _ = self.idle[oldest[0]].popleft()
        self.count -= 1
        _close(session)
        return True

    def expire(self, now: float, idle_timeout: float) -> None:
        for sessions in self.idle.values():
            while sessions and now - sessions[0][1] >= idle_timeout:
                session, _ = sessions.popleft()
                self.count -= 1
                _close(session)

    def close_all(self) -> None:
        for sessions in self.idle.values():
            while sessions:
                session, _ = sessions.popleft()
                self.count -= 1
                _close(session)


def _close(session: Any) -> None:
    try:
        d = session.close()
        if isinstance(d, defer.Deferred):
            d.addErrback(lambda _: None)
    except Exception:
        log.failure("closing an upstream session")


class Relay(service.Service):
    """
    The scheduler, as a service of the queue's owner.

    *queue* is a :class:`kumoauth.relay.queue.QueueStore` opened (and
    locked) by the caller; *connect* makes an upstream session
    (:func:`kumoauth.relay.client.connect`); *store_bounce* stores a DSN
    (built by *build_bounce*, :func:`kumoauth.relay.dsn.build_dsn`) as a
    new message.  *grace*: seconds a stop lets the messages being sent
    finish (``[server] shutdown_grace``).
    """

    def __init__(
        self,
        queue: Any,
        settings: RelaySettings,
        reactor: Any,
        metrics: Any,
        connect: Callable[..., defer.Deferred[Any]],
        store_bounce: Callable[[bytes, str], defer.Deferred[str]],
        build_bounce: Callable[..., bytes | None],
        grace: float = STOP_WITHIN,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.reactor = reactor
        self.metrics = metrics
        self.connect = connect
        self.store_bounce = store_bounce
        self.build_bounce = build_bounce
        self.grace = grace
        self.pool = _Pool()
        self.in_flight: dict[str, defer.Deferred[None]] = {}
        #: the session each in-flight message is being sent over
        self.sending: dict[str, Any] = {}
        #: in-flight messages still waiting for their session
        self._connecting: set[str] = set()
        #: operator bounces whose DSN is being stored
        self._bouncing: dict[str, defer.Deferred[bool]] = {}
        #: who waits for the end of a message's attempt (:meth:`after_attempt`)
        self._waiters: dict[str, list[defer.Deferred[str | None]]] = {}
        #: how the attempt of a message somebody waits for ended
        self._outcomes: dict[str, str] = {}
        self._loop: task.LoopingCall | None = None
        self._kicked = False
        self._rescan = False
        self._scanned_at = 0.0
        self._stopping = False
        self._stopped: defer.Deferred[None] | None = None
        #: since when (monotonic) no session to the upstream could be made,
        #: or None while one can: one line when that changes, either way
        self._down_since: float | None = None
        #: the upstream SIZE last said to be below max_message_size
        self._size_said: int | None = None
        #: when a session was last made (monotonic): a connection begun
        #: before that and failing after it says nothing new of the upstream
        self._up_at = -math.inf

    # --- service --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.kick)
        self._loop.clock = self.reactor
        self._loop.start(TICK, now=True).addErrback(
            lambda f: log.failure("relay scheduler stopped", f)
        )

    def stopService(self) -> defer.Deferred[None]:
        """
        Take no new work; let what is being sent finish for :attr:`grace`
        seconds (then its session is dropped and it stays queued), let the
        bounces being stored be stored, then close idle sessions.  A second
        call (the server stops the relay before the spool writer, then its
        parent stops it again) waits for the same stop.
        """
        if self._stopped is None:
            self._stopped = self._stop()
        return _follow(self._stopped)

    def _stop(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        waiting: list[defer.Deferred[Any]] = [*self.in_flight.values(), *self._bouncing.values()]
        if self.in_flight:
            log.info(
                "stopping: {n} messages being sent get up to {grace}s to finish",
                n=len(self.in_flight),
                grace=f"{self.grace:g}",
            )
        ended: defer.Deferred[None] = defer.Deferred()
        timers: list[Any] = []

        def end(_: object = None) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()
            if not ended.called:
                ended.callback(None)

        def give_up() -> None:
            # A bounce that cannot be stored (a hung disk) must not hold
            # SIGTERM: its message stays queued (it leaves only once its
            # bounce is stored).
            log.warn(
                "stopping: {n} attempts did not end in time; their messages stay queued",
                n=len(self.in_flight) + len(self._bouncing),
            )
            end()

        defer.DeferredList(waiting, consumeErrors=True).addBoth(end)
        if waiting and not ended.called:
            timers.append(self.reactor.callLater(self.grace, self._abandon))
            timers.append(self.reactor.callLater(self.grace + STORE_WITHIN, give_up))

        def close(_: object) -> None:
            self.pool.close_all()
            with contextlib.suppress(OSError):  # a lagging journal: its owner says so
                self.queue.flush()

        # A failure here (the journal's sync) is logged once, with its
        # traceback, not left to the garbage collector in every follower.
        def failed(f: Failure) -> None:
            log.failure("stopping the relay", f)

        return ended.addBoth(close).addErrback(failed)

    def _abandon(self) -> None:
        """
        The stop has waited long enough (an upstream that stalls must not
        hold SIGTERM): drop what is still being sent; it stays queued.
        """
        log.info(
            "stopping: {n} messages still being sent after {grace}s stay queued",
            n=len(self.sending) + len(self._connecting),
            grace=f"{self.grace:g}",
        )
        for mid, d in list(self.in_flight.items()):
            session = self.sending.get(mid)
            if session is not None:
                session.abort()
            elif mid in self._connecting:
                d.cancel()
            # else: its outcome is being recorded (a bounce stored): it ends

    def reload(self, settings: RelaySettings) -> None:
        """
        SIGHUP: new sessions use *settings*; idle sessions of the old ones
        are closed, busy ones finish their message first.
        """
        self.settings = settings
        self.pool.close_all()

    # --- the operator ---------------------------------------------------

    def busy(self, mid: str) -> bool:
        """True while *mid* is being sent, or its operator bounce stored."""
        return mid in self.in_flight or mid in self._bouncing

    def after_attempt(self, mid: str) -> defer.Deferred[str | None]:
        """
        Fires once what is under way for *mid* has ended (at once if
        nothing is), with how it ended: ``"delivered"``, ``"bounced"``,
        ``"deferred"``, or None if it is not known.  Fired before anything
        else can start on *mid*.
        """
        d: defer.Deferred[str | None] = defer.Deferred()
        if self.busy(mid):
            self._waiters.setdefault(mid, []).append(d)
        else:
            d.callback(None)
        return d

    def _ended(self, mid: str) -> None:
        waiters = self._waiters.pop(mid, [])
        outcome = self._outcomes.pop(mid, None)
        for d in waiters:
            d.callback(outcome)

    def _note(self, mid: str, outcome: str) -> None:
        if mid in self._waiters:
            self._outcomes[mid] = outcome

    def bounce_now(self, entry: Any, status: str, text: str) -> defer.Deferred[bool]:
        """
        The operator's ``kumoauth spool bounce ID``: every recipient still
        pending is bounced now and the message leaves the queue, once the
        bounce is stored.  Fires with True then; with False if the bounce
        could not be stored (logged; the message stays queued, unchanged).
        Not for a message being sent (:meth:`busy`): wait for
        :meth:`after_attempt` first.  ``ValueError`` while the relay stops.
        """
        if self._stopping:
            raise ValueError("the relay is stopping: ask again once it has started")
        mid = entry.id
        pending = [r for r, st in entry.rcpt_status().items() if st == "pending"]

        async def run() -> bool:
            if pending:
                failed: dict[str, Any] = {rcpt: _Operator(status, text) for rcpt in pending}
                if not await self._bounce(entry, failed):
                    return False
            self._finish(entry, "bounced")
            return True

        d = defer.Deferred.fromCoroutine(run())
        if not d.called:
            self._bouncing[mid] = d

            def ended(result: object) -> object:
                self._bouncing.pop(mid, None)
                self._ended(mid)
                return result

            d.addBoth(ended)
        return d

    # --- scheduling -----------------------------------------------------

    def notify(self, rescan: bool = False) -> None:
        """
        A message was just stored in this process, or (*rescan*) a send
        ended: look now, not at the next tick.  What this process stores is
        indexed as it is stored, so a look after a store skips the scan for
        other writers' (workers') records; a look after a send scans if the
        last scan is :data:`RESCAN_AFTER` old, so a busy relay takes up the
        workers' messages without waiting for the tick.
        """
        self._rescan = self._rescan or rescan
        if not self._kicked and not self._stopping:
            self._kicked = True
            self.reactor.callLater(0, self.kick, False)

    def kick(self, scan: bool = True) -> None:
        """
        Start what is due; first, with *scan* (the tick), index what other
        writers have appended since the last look.
        """
        self._kicked = False
        if self._stopping:
            return
        try:
            looked = self.reactor.seconds()
            if scan or (self._rescan and looked - self._scanned_at >= RESCAN_AFTER):
                self._rescan = False
                self._scanned_at = looked
                self.queue.scan_new()
            now = time.time()
            self.pool.expire(now, self.settings.config.idle_timeout)
            for entry in self.queue.due(now):
                if not self._start(entry, now):
                    break
        except Exception:
            log.failure("bug in the relay scheduler")

    def _start(self, entry: Any, now: float) -> bool:
        """
        Send *entry* if a session is free or can be made; False when the
        pool is full (nothing more can start this round).
        """
        if self.busy(entry.id) or not self.queue.claim(entry.id):
            return True
        identity = self._identity(entry)
        session = self.pool.take(identity)
        if session is None:
            if self.pool.count >= self.settings.config.concurrency and not self.pool.evict_one():
                self.queue.release_claim(entry.id)
                return False
            self.pool.count += 1
            self._connecting.add(entry.id)
        d = defer.Deferred.fromCoroutine(self._send(entry, identity, session))
        self.in_flight[entry.id] = d

        def done(_: object) -> None:
            self.in_flight.pop(entry.id, None)
            self._connecting.discard(entry.id)
            self.queue.release_claim(entry.id)
            # An operator's request that waited for this attempt, before
            # anything else can start on the message.
            self._ended(entry.id)
            if not self._stopping:
                self.notify(rescan=True)

        d.addErrback(lambda f: log.failure("bug relaying {id}", f, id=entry.id))
        d.addBoth(done)
        return True

    def _identity(self, entry: Any) -> str | None:
        if self.settings.config.identity != "authz":
            return None
        return entry.authn_id  # type: ignore[no-any-return]

    async def _send(self, entry: Any, identity: str | None, session: Any) -> None:
        settings = self.settings
        started = time.monotonic()
        pending = [r for r, status in entry.rcpt_status().items() if status == "pending"]
        # the sender's DSN requests, read from disk once for the attempt
        requested = self._requested(entry)
        try:
            if session is None:
                try:
                    session = await self.connect(self.reactor, settings, identity)
                except IdentityRefused:
                    # This user's authzid, not the upstream: no state line
                    # either way (nor the rush of every deferred message
                    # that "answers again" starts).
                    raise
                except Exception as e:
                    self._unreachable(e, started)
                    raise
                self._reachable()
                self._check_size(session)
            self._connecting.discard(entry.id)
            self.sending[entry.id] = session
            if entry.size <= READ_INLINE:
                # A pread of a few KB from the page cache: cheaper than a
                # thread round trip.
                data = self.queue.read_message(entry.id)
            else:
                data = await threads.deferToThread(self.queue.read_message, entry.id)
            data = self._outgoing(entry, data)
            outgoing = _Outgoing(entry, pending, data, requested)
            if "XFORWARD" in getattr(session, "extensions", {}):
                outgoing.xforward = xforward_attributes(entry)
            result = await session.transaction(outgoing)
        except Exception as e:
            self._connecting.discard(entry.id)
            self.sending.pop(entry.id, None)
            self.pool.count -= 1
            if session is not None:
                _close(session)
            await self._deferred(entry, pending, _reason(e), started, requested)
            return
        self.sending.pop(entry.id, None)
        latency = time.monotonic() - started
        self.metrics.relay_latency.observe(latency)
        # A session made before a reload (SIGHUP) is not used again: it may
        # be to the previous upstream, or with its credentials.
        fresh = self.settings is settings
        if getattr(session, "reusable", False) and not self._stopping and fresh:
            self.pool.put(identity, session, time.time())
        else:
            self.pool.count -= 1
            _close(session)
        await self._record(entry, pending, result, started, requested)

    def _unreachable(self, e: BaseException, started: float) -> None:
        """
        No session could be made (the attempt began at *started*): said
        once, when the upstream goes down.  An attempt older than the last
        session made does not say it went down again (the log used to
        read: back, unreachable, back, within one second).
        """
        if self._down_since is not None or self._stopping or started <= self._up_at:
            return
        self._down_since = time.monotonic()
        self._upstream_state(
            "unreachable: {reason}; messages are deferred until it answers again",
            reason=_reason(e),
        )

    def _reachable(self) -> None:
        """
        A session was made: if the upstream was down, say so once, and make
        every deferred message due now rather than at its own retry, hours
        later after a long outage (``concurrency`` still bounds the rush).
        """
        self._up_at = time.monotonic()
        if self._down_since is None:
            return
        down = time.monotonic() - self._down_since
        self._down_since = None
        due = self.queue.make_due(time.time())
        self._upstream_state(
            "answers again after {down:.0f}s; {due} deferred messages are due now",
            down=down,
            due=due,
        )
        self.kick()

    def _check_size(self, session: Any) -> None:
        """
        Once per value: the upstream's SIZE is below what kumoauth accepts,
        so a message in between is taken with 250 and then bounced.
        """
        ours = self.settings.max_message_size
        theirs = getattr(session, "size_limit", None)
        if ours is None or not isinstance(theirs, int) or theirs >= ours:
            return
        if theirs == self._size_said:
            return
        self._size_said = theirs
        self._upstream_state(
            "takes messages of at most {theirs} octets (SIZE), less than [server] "
            "max_message_size {ours}: larger ones are accepted, then bounced; set "
            "max_message_size at or below {theirs}",
            theirs=theirs,
            ours=ours,
        )

    def _upstream_state(self, text: str, **fields: Any) -> None:
        config = self.settings.config
        log.warn(
            "relay: upstream {host}:{port} " + text,
            host=escape(config.host),
            port=config.port,
            **fields,
        )

    def _outgoing(self, entry: Any, data: bytes) -> bytes:
        settings = self.settings
        if settings.config.identity == "header" and settings.header_key is not None:
            meta = entry.envelope.get("meta", {})
            authn = meta.get("authn_id")
            if authn:
                header = identity_header(
                    settings.header_key, authn, meta.get("authz_id") or authn, entry.id
                )
                return header + data
        return data

    # --- outcomes -------------------------------------------------------

    async def _record(
        self,
        entry: Any,
        pending: list[str],
        result: Any,
        started: float,
        requested: Requested = NOTHING,
    ) -> None:
        """
        Per-recipient results of one attempt (:meth:`_outcome`), then, once
        they are recorded, the "relayed" report the sender asked for (RFC
        3461 §5.2.2: an upstream that takes no NOTIFY, so the success report
        is ours): a report that fails or hangs never sends the message again.
        """
        head = None
        wanted = [r for r in pending if requested.wants(r, "SUCCESS")] if requested.rcpts else []
        if wanted and not getattr(result, "dsn", False):
            # read now: a message whose outcome is recorded may leave the queue
            head = self._original(entry, whole=False)
        done = await self._outcome(entry, pending, result, started, requested)
        relayed = [r for r in wanted if r in done]
        if relayed and head is not None:
            await self._report_relayed(entry, relayed, result, requested, head)

    async def _outcome(
        self, entry: Any, pending: list[str], result: Any, started: float, requested: Requested
    ) -> list[str]:
        """
        Record one attempt's per-recipient results; the recipients that
        have the message now.  A bounce is stored before
        the message leaves the queue: a crash in between sends it again,
        it never loses the bounce.  If the bounce cannot be stored, its
        recipients stay pending and the message is deferred: the next
        attempt asks the upstream again (and bounces them then if it still
        refuses them, or once they are past ``max_age``).
        """
        done: list[str] = []
        failed: dict[str, Any] = {}
        later: dict[str, Any] = {}
        for rcpt in pending:
            reply = result.recipients.get(rcpt)
            if reply is None:
                later[rcpt] = None
            elif 200 <= reply.code < 300:
                done.append(rcpt)
            elif reply.code >= 500:
                failed[rcpt] = reply
            else:
                later[rcpt] = reply
        expired: dict[str, Any] = {}
        if later and self._too_old(entry):
            # RFC 3463 4.4.7 (out of time), with the upstream's last word
            expired = {rcpt: _Expired(reply=reply) for rcpt, reply in later.items()}
            later = {}
        self._log_attempt(entry, done, failed, later, expired, result, started)
        for rcpt in done:
            entry.set_rcpt(rcpt, "done")
        failed.update(expired)
        if failed and not await self._bounce(entry, failed, requested):
            self._defer(entry, "the bounce could not be stored")
            return done
        if later:
            reason = next((_raw(r.line) for r in later.values() if r is not None), "deferred")
            self._defer(entry, reason)
        else:
            self._finish(entry, "delivered" if not failed else "bounced")
        return done

    async def _deferred(
        self,
        entry: Any,
        pending: list[str],
        reason: str,
        started: float,
        requested: Requested = NOTHING,
    ) -> None:
        """
        The attempt failed as a whole (*reason*: one printable line).
        """
        too_old = self._too_old(entry)
        what = "expired" if too_old else "deferred"
        text = (
            f"relay {entry.id} {what}: {reason} "
            f"(attempt {entry.attempts + 1}, {len(pending)} recipients"
        )
        if too_old:
            text += f"; older than max_age {self.settings.config.max_age:g}s"
        log.info("{text}", text=text + ")", id=entry.id, result=what, reason=reason)
        if too_old:
            expired = {rcpt: _Expired(reason) for rcpt in pending}
            if await self._bounce(entry, expired, requested):
                self._finish(entry, "bounced")
                return
            reason = "the bounce could not be stored"
        self._defer(entry, _raw(reason))

    def _defer(self, entry: Any, reason: str) -> None:
        """
        Another attempt later; *reason* (raw text: ``spool list`` escapes
        it) is kept as the message's last error.
        """
        if entry.id not in self.queue:
            log.warn("relay {id}: left the queue during its attempt", id=entry.id)
            return
        attempts = entry.attempts + 1
        delay = self.settings.retry_delay(attempts)
        self.queue.defer(
            entry.id, attempts=attempts, next_attempt=time.time() + delay, error=reason
        )
        self.metrics.relay_attempts.labels("deferred").inc()
        self._note(entry.id, "deferred")

    def _finish(self, entry: Any, outcome: str) -> None:
        """*entry* leaves the queue: ``"delivered"`` or ``"bounced"``."""
        if entry.id not in self.queue:
            log.warn("relay {id}: left the queue during its attempt", id=entry.id)
            return
        self.queue.done(entry.id, outcome)
        self.metrics.relay_attempts.labels(outcome).inc()
        self._note(entry.id, outcome)

    def _too_old(self, entry: Any) -> bool:
        return time.time() - entry.arrival >= self.settings.config.max_age

    async def _report_relayed(
        self, entry: Any, wanted: list[str], result: Any, requested: Requested, original: bytes
    ) -> None:
        """
        The "relayed" report for the recipients in *wanted*, relayed now,
        whose NOTIFY asked for SUCCESS.  Not stored is one warning, and not
        a reason to send the message again: the upstream has it.
        """
        final = getattr(result, "final", None)
        recipients = [
            FailedRecipient(
                address=rcpt,
                status="2.0.0",
                action="relayed",
                diagnostic=_raw(getattr(result.recipients.get(rcpt) or final, "line", "")),
                remote_mta=self.settings.config.host,
                last_attempt=datetime.now(UTC),
                original=requested.rcpt(rcpt).orcpt,
            )
            for rcpt in wanted
        ]
        try:
            report = self._report(entry, recipients, original, requested.envid)
            if report is None:
                return
            bid = await self.store_bounce(report, entry.mail_from)
        except Exception as e:
            log.warn(
                "relay {id}: the success report (NOTIFY=SUCCESS) for {rcpts} could not be "
                "stored ({why}); the message was relayed and is not sent again",
                id=entry.id,
                rcpts=field_value(",".join(wanted), MAX_LIST),
                why=escape(str(e) or type(e).__name__),
            )
            return
        log.info(
            "relay {id}: success report {bid} queued for {rcpts} (NOTIFY=SUCCESS; the "
            "upstream offers no DSN)",
            id=entry.id,
            bid=bid,
            rcpts=field_value(",".join(wanted), MAX_LIST),
        )

    async def _bounce(
        self, entry: Any, failed: dict[str, Any], requested: Requested | None = None
    ) -> bool:
        """
        Store the bounce for *failed* and mark them failed.  True once it
        is stored (or there is none to store: null sender, a report, a
        bounce that cannot be built, recipients whose NOTIFY leaves out
        FAILURE); False, logged in one line, if it could not be stored:
        the recipients stay as they were.
        """
        if requested is None:
            requested = self._requested(entry)
        # RFC 3461 §4.1: NOTIFY=NEVER (or a list without FAILURE)
        unwanted = [rcpt for rcpt in failed if not requested.wants(rcpt, "FAILURE")]
        if unwanted:
            failed = {rcpt: reply for rcpt, reply in failed.items() if rcpt not in unwanted}
            if not failed:
                self._unreported(entry, unwanted)
                return True

        # The upstream takes no SMTPUTF8 (why these failed): a report in its
        # global, 8-bit form would not get through it either, so this one is
        # 7-bit (addresses as RFC 6533's \x{..}).
        no_smtputf8 = any(
            isinstance(r, NotSent) and r.enhanced == STATUS_NEEDS_SMTPUTF8 for r in failed.values()
        )
        # RET=FULL, unless kumoauth refused to send the message (no 8BITMIME
        # or SMTPUTF8 upstream, too big for it): the whole original would
        # fail the same way, and a report that fails is dropped.
        whole = requested.ret == "FULL" and not any(isinstance(r, NotSent) for r in failed.values())
        recipients = [
            FailedRecipient(
                address=rcpt,
                status=_status(reply),
                action="failed",
                diagnostic=_raw(reply.line),
                # kumoauth's own refusal (not sent) names no remote MTA
                remote_mta=(
                    self.settings.config.host
                    if reply.code and not isinstance(reply, NotSent)
                    else None
                ),
                last_attempt=datetime.now(UTC),
                original=requested.rcpt(rcpt).orcpt,
            )
            for rcpt, reply in failed.items()
        ]
        original = self._original(entry, whole)
        try:
            dsn = self._report(
                entry, recipients, original, requested.envid, whole, smtputf8=not no_smtputf8
            )
        except Exception:
            # Not a reason to send the message again and again.
            log.failure("building the bounce for {id}", id=entry.id)
            dsn = None
        else:
            if dsn is None:
                # A report is never bounced (no loops): it is lost, so say so
                # plainly, with why (a UTF-8 sender behind an upstream
                # without SMTPUTF8 loses every report this way).
                reasons = dict.fromkeys(
                    _shown(str(getattr(r, "line", ""))) for r in failed.values()
                )
                reasons.pop("", None)
                log.warn(
                    "relay {id}: not delivered to {rcpts} ({why}) and not bounced: it has "
                    "the null sender or is a delivery report; it is dropped",
                    id=entry.id,
                    rcpts=field_value(",".join(failed), MAX_LIST),
                    why="; ".join(reasons) or "failed",
                )
        if dsn is not None:
            try:
                bid = await self.store_bounce(dsn, entry.mail_from)
            except Exception as e:
                log.warn(
                    "relay {id}: the bounce for {rcpts} could not be stored ({why}); "
                    "the message stays queued and is tried again",
                    id=entry.id,
                    rcpts=field_value(",".join(failed), MAX_LIST),
                    why=escape(str(e) or type(e).__name__),
                )
                return False
            log.info("relay {id}: bounce {bid} queued", id=entry.id, bid=bid)
        for rcpt in failed:
            entry.set_rcpt(rcpt, "failed")
        if unwanted:
            self._unreported(entry, unwanted)
        return True

    def _report(
        self,
        entry: Any,
        recipients: list[Any],
        original: bytes,
        envid: str | None,
        whole: bool = False,
        smtputf8: bool = True,
    ) -> bytes | None:
        """
        A report on *entry* to its sender (:attr:`build_bounce`), in its
        SMTPUTF8 form if the message had one and *smtputf8* allows it.
        The sender and SMTPUTF8 come from the index: a damaged envelope on
        disk does not cost the sender a report.
        """
        return self.build_bounce(
            reporting_mta=self.settings.hostname,
            message_id=entry.id,
            envelope_from=entry.mail_from,
            arrival=datetime.fromtimestamp(entry.arrival, UTC),
            recipients=recipients,
            original=original,
            smtputf8=entry.smtputf8 and smtputf8,
            return_content="full" if whole else "headers",
            envid=envid,
        )

    def _requested(self, entry: Any) -> Requested:
        """*entry*'s DSN requests; one warning, and none, if they cannot be read."""
        if not entry.dsn:
            return NOTHING
        try:
            return dsn_of(entry)
        except Exception as e:
            log.warn(
                "relay {id}: its DSN requests cannot be read ({why}); it is handled as "
                "if it had none",
                id=entry.id,
                why=escape(str(e) or type(e).__name__),
            )
            return NOTHING

    def _unreported(self, entry: Any, rcpts: list[str]) -> None:
        """*rcpts* failed, and their sender asked for no report of it."""
        log.info(
            "relay {id}: not delivered to {rcpts}; no bounce, as the sender asked "
            "(NOTIFY without FAILURE)",
            id=entry.id,
            rcpts=field_value(",".join(rcpts), MAX_LIST),
        )
        for rcpt in rcpts:
            entry.set_rcpt(rcpt, "failed")

    def _original(self, entry: Any, whole: bool) -> bytes:
        """
        What a report returns of *entry*'s message: the whole of it for
        RET=FULL when it is small enough to be returned
        (:data:`~kumoauth.relay.dsn.FULL_RETURN_LIMIT`), else only its
        beginning, which holds the header section: a large message is not
        read whole on the reactor for a report that returns its headers.
        """
        try:
            if whole and entry.size <= FULL_RETURN_LIMIT:
                return bytes(self.queue.read_message(entry.id))
            head = bytes(self.queue.read_head(entry.id, REPORT_HEAD))
        except Exception:
            return b""
        if len(head) < entry.size:
            # cut after the last whole line (a header section this long is
            # past Postfix's header_size_limit anyway)
            head = head[: head.rfind(b"\n") + 1]
        return head

    def _log_attempt(
        self,
        entry: Any,
        done: list[str],
        failed: dict[str, Any],
        later: dict[str, Any],
        expired: dict[str, Any],
        result: Any,
        started: float,
    ) -> None:
        """
        One line for the attempt: who got the message, who did not and
        why (each reason the upstream's reply, or ours when we refused to
        send: no SMTPUTF8, 8BITMIME, SIZE…), escaped once.
        """
        final = getattr(result, "final", None)
        parts = [f"relay {entry.id} to {self.settings.config.host}:"]
        if done:
            parts.append(f"delivered={field_value(','.join(done), MAX_LIST)}")
        for name, group in (("failed", failed), ("deferred", later), ("expired", expired)):
            if not group:
                continue
            text = f"{name}={field_value(','.join(group), MAX_LIST)}"
            replies = [getattr(r, "reply", r) for r in group.values()]
            reasons = dict.fromkeys(_shown(r.line) for r in replies if r is not None and r != final)
            if name == "expired":
                reasons[f"older than max_age {self.settings.config.max_age:g}s"] = None
            if reasons:
                text += f" ({'; '.join(reasons)})"
            parts.append(text)
        if final is not None:
            parts.append(f"reply='{_shown(final.line)}'")
        parts.append(f"latency={time.monotonic() - started:.3f}s")
        log.info(
            "{text}",
            text=" ".join(parts),
            id=entry.id,
            delivered=done,
            failed=list(failed),
            deferred=list(later),
            expired=list(expired),
        )


def _follow(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A new Deferred that fires (with None) when *d* has."""
    out: defer.Deferred[None] = defer.Deferred()

    def fire(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out


def _shown(text: str) -> str:
    """
    *text* for a log line, escaped exactly once: upstream text comes from
    the client already escaped (printable: left as it is); anything else
    not printable is escaped here.
    """
    return text if text.isprintable() else escape(text, len(text))


def _raw(text: str) -> str:
    """
    The text :func:`kumoauth.textsafe.escape` (or :func:`_shown`) made
    *text* from: what the journal keeps (``spool list`` escapes it when it
    shows it) and what a DSN reports (it encodes it its own way).
    """
    return unescape(_shown(text))


class _Outgoing:
    """
    What the client sends for one attempt: only the recipients still pending.
    """

    def __init__(
        self, entry: Any, recipients: list[str], data: bytes, requested: Requested = NOTHING
    ) -> None:
        # The index has what the envelope says about these (no disk read).
        self.id = entry.id
        self.mail_from = entry.mail_from
        self.rcpt_to = recipients
        self.data = data
        self.size = len(data)
        self.smtputf8 = entry.smtputf8
        #: the sender's RET, ENVID, NOTIFY and ORCPT (RFC 3461), or None
        self.dsn = requested if entry.dsn else None
        # The client looks at the bytes itself (BODY=8BITMIME if any is
        # 8-bit): no second scan of the message here.
        self.eightbit = False
        #: the submitting client, for an upstream that offers XFORWARD
        self.xforward: list[tuple[str, str]] | None = None


def xforward_attributes(entry: Any) -> list[tuple[str, str]] | None:
    """
    Postfix's XFORWARD attributes for *entry*: its submitting client's
    address, port and EHLO name, and kumoauth's queue id (Postfix logs it
    as ``orig_queue_id``); None for kumoauth's own mail (a bounce has no
    client) or an envelope that cannot be read.
    """
    try:
        meta = entry.envelope.get("meta", {})
    except Exception:
        return None
    received = meta.get("received_from")
    if not isinstance(received, str) or ":" not in received:
        return None
    host, _, port = received.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit():
        return None
    helo = meta.get("ehlo_domain")
    return [
        ("NAME", "[UNAVAILABLE]"),
        ("ADDR", f"IPV6:{host}" if ":" in host else host),
        ("PORT", port),
        ("HELO", helo if isinstance(helo, str) and helo else "[UNAVAILABLE]"),
        ("PROTO", "ESMTP"),
        ("SOURCE", "REMOTE"),
        ("IDENT", entry.id),
    ]


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _status(reply: Any) -> str:
    """
    The RFC 3463 status for a DSN: the upstream's enhanced code if it is
    well formed, else one from the reply code.
    """
    enhanced = getattr(reply, "enhanced", None)
    if enhanced and _ENHANCED.fullmatch(enhanced):
        if reply.code and str(reply.code)[0] != enhanced[0]:
            return f"{str(reply.code)[0]}.0.0"
        return str(enhanced)
    return "5.0.0" if reply.code >= 500 else "4.0.0"


class _Operator:
    """
    A recipient the operator bounced.
    """

    code = 0

    def __init__(self, enhanced: str, text: str) -> None:
        self.enhanced = enhanced
        self.line = text


class _Expired:
    """
    A recipient out of time: RFC 3463 4.4.7, with the upstream's last reply
    (its 4xx) as the diagnostic when there is one.
    """

    enhanced = "4.4.7"

    def __init__(self, reason: str = "", reply: Any = None) -> None:
        self.reply = reply
        if reply is not None:
            self.code = reply.code
            self.line = reply.line
        else:
            self.code = 0
            self.line = f"delivery time expired{': ' + reason if reason else ''}"


def _reason(e: BaseException) -> str:
    """
    Why an attempt failed, one printable line escaped once: an
    :class:`~kumoauth.relay.client.UpstreamError`'s reason is escaped
    already (it quotes the upstream), anything else is escaped here.
    """
    text = str(e) or type(e).__name__
    if isinstance(e, UpstreamError):
        return _shown(text)
    return escape(text, 400)
