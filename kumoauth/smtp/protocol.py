"""
The ESMTP submission protocol: the state machine of SPEC §6.

It frames lines, keeps session state and calls out to the pieces around it:
:mod:`kumoauth.smtp.commands` parses, :mod:`kumoauth.auth.sasl` decodes, the Cred
portal checks, the policy handlers decide, the delivery avatar spools.

Pipelining (RFC 2920) is served by processing buffered lines one at a time
and pausing while a command waits on a handler, the checker or the spool;
replies therefore always come in order.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IProtocolFactory, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kumoauth.auth import sasl
from kumoauth.auth.authenticator import R_TEMPFAIL, Attempt, Outcome
from kumoauth.auth.cred import credentials_for
from kumoauth.auth.mechanisms import REGISTRY, Mechanism
from kumoauth.meta import ConnMeta
from kumoauth.ops.transport import corked
from kumoauth.policy import Reject
from kumoauth.smtp import dsnparams
from kumoauth.smtp.commands import (
    MAX_COMMAND_LINE,
    CommandError,
    check_mail_params,
    check_rcpt_params,
    is_helo_domain,
    parse_command,
    parse_path,
    reply_lines,
)
from kumoauth.smtp.data import (
    MESSAGE_ID_LIMIT,
    DataReader,
    header_section_over,
    message_id,
    protocol_type,
    received_header,
    strip_identity_header,
    trace_date,
)
from kumoauth.smtp.limits import MESSAGES, RECIPIENTS, Charge
from kumoauth.smtp.runtime import Runtime, limit_key
from kumoauth.smtp.sender_gate import SenderGate, failed_reply
from kumoauth.storage.delivery import Delivery, Message
from kumoauth.storage.spool import SpoolError, new_id
from kumoauth.textsafe import field_value
from kumoauth.tls.context import describe
from kumoauth.tls.direct import DirectTLSFactory

if TYPE_CHECKING:
    from kumoauth.config import ListenerConfig

log = Logger(namespace="kumoauth.smtp")
auth_log = Logger(namespace="kumoauth.auth")

# Framing limits.  A command line may be 1000 octets (SPEC §6) except an
# AUTH line, which carries an initial response of up to 12288 (RFC 4954 §4).
_AUTH_LINE_MAX = sasl.MAX_RESPONSE + 32
_PAUSE_BUFFER = 256 * 1024  # stop reading while this much waits unprocessed
# Seconds a closing connection may take to say goodbye before it is aborted.
_CLOSE_TIMEOUT = 5.0
#: the sending limits and the sender gate bound their store waits by
#: [policy] timeout themselves (a silent store is an outage: one state
#: line, on_store_error); the session's own bound is this much later
STORE_WAIT_GRACE = 1.0

COMMAND, AUTH, DATA = range(3)

R_TOO_LONG = b"500 5.5.2 Line too long"
R_UNKNOWN = b"500 5.5.2 Command unrecognized"
R_BARE_LF = b"500 5.5.2 Line must end with CRLF"
R_BARE_LF_AUTH = b"501 5.5.2 Line must end with CRLF"
#: RFC 6531 §3.4: UTF-8 addresses only with SMTPUTF8 (one address refused)
R_NEEDS_SMTPUTF8 = b"553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter"
#: replies held for one write at most (an EHLO's is ~200 octets)
_GATHER_MAX = 64
R_NO_ARGS = b"501 5.5.4 Syntax error: no arguments allowed"
R_INTERNAL = b"451 4.3.0 Internal error, try again later"
R_SHUTDOWN = b"421 4.3.2 Service shutting down, try again later"
R_CLEARTEXT = b"538 5.7.11 Encryption required for requested authentication mechanism"
R_BAD_DOMAIN = b"501 5.5.4 Invalid domain name"


@implementer(IHandshakeListener, IPushProducer)
class SubmissionProtocol(Protocol):
    factory: SubmissionFactory
    # Both captured when the connection is made, so a reload (which swaps
    # them on the factory) never changes a live session.
    rt: Runtime
    listener: ListenerConfig
    # A TCP transport, or a TLS wrapper around one (startTLS, getHandle).
    transport: Any

    # An idle session holds one of these: slots instead of a ~40-key
    # instance dict save ~1 KiB each (Twisted's own attributes, factory and
    # transport, stay in the small __dict__ its base class keeps).
    __slots__ = (
        "rt", "listener", "client", "conn_meta", "delivery", "_buf", "_mode",
        "_paused", "_draining", "_in_process", "_active_at", "_reading_paused",
        "_output_blocked", "_closing", "_counted", "_discarding", "_discard_reply",
        "_timer", "_handshake_timer", "_pending", "_errors", "_auth_failures",
        "_secure", "_greeted", "_esmtp", "_sasl", "_final", "_mail_from",
        "_smtputf8", "_rcpts", "_reader", "_ip", "_initial_meta", "_producing",
        "_out", "_charge", "_dsn",
    )  # fmt: skip

    def __init__(self) -> None:
        self._buf = bytearray()
        self._mode = COMMAND
        self._paused = False
        self._draining = False
        self._in_process = False
        self._active_at = 0.0
        self._reading_paused = False
        self._output_blocked = False
        self._closing = False
        self._counted = False
        self._producing = False  # registered with the transport as its producer
        #: replies held while pipelined commands are answered, sent as one write
        self._out: list[bytes] | None = None
        self._discarding = False
        #: the reply once a discarded line ends (None: already answered)
        self._discard_reply: bytes | None = R_TOO_LONG
        self._timer: Any = None
        self._handshake_timer: Any = None
        self._pending: defer.Deferred[Any] | None = None
        self._errors = 0
        self._auth_failures = 0
        self._secure = False
        self._greeted = False
        self._esmtp = False
        self._sasl: _SASLExchange | None = None
        #: a refused bearer token's outcome, sent once the client answered its challenge
        self._final: Outcome | None = None
        self._mail_from: str | None = None
        self._smtputf8 = False
        self._rcpts: list[str] = []
        #: the transaction's DSN parameters (RET, ENVID, each NOTIFY/ORCPT)
        self._dsn: tuple[str | None, str | None, dict[str, dsnparams.Rcpt]] | None = None
        #: what this transaction counted against its runtime's [limits]
        #: (a session keeps its runtime: a reload does not change them)
        self._charge: Charge | None = None
        self._reader: DataReader | None = None
        self._ip = ""
        self.client = ""
        self.conn_meta = ConnMeta()
        # conn_meta as the server knew it before the client said anything:
        # what STARTTLS goes back to (RFC 3207 §4.2).
        self._initial_meta: dict[str, Any] = {}
        self.delivery: Delivery | None = None

    @property
    def authenticated(self) -> bool:
        return self.delivery is not None and self.delivery.authn_id is not None

    # --- connection ----------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self.rt = rt = factory.runtime
        self.listener = listener = factory.listener
        peer = self.transport.getPeer()
        host = self.transport.getHost()
        self._ip = getattr(peer, "host", None) or "local"
        self.client = _addr(peer)
        self._secure = listener.tls == "implicit"
        meta = {
            "reception_protocol": "ESMTP",
            "received_from": self.client,
            "received_via": _addr(host),
            "hostname": rt.server.hostname,
        }
        # On a haproxy: listener the peer above is the client the PROXY
        # header named; the connection's own peer is the proxy.
        proxy = getattr(self.transport, "proxy_peer", None)
        if proxy is not None:
            meta["received_from_proxy"] = _addr(proxy)
        self.conn_meta = ConnMeta({**meta, **listener.meta})
        self.delivery = Delivery(self.conn_meta, store=rt.store)
        # What max_connections_per_ip counts this client under: an IPv6
        # client by its network, as the throttles count it (one host
        # commonly holds a /64, and every address of it would otherwise get
        # max_connections_per_ip of its own).
        self._limit_key = limit_key(self._ip, rt.auth.throttle.ipv6_prefix)
        if not rt.limits.acquire(self._limit_key, rt.server):
            rt.metrics.connections_rejected.labels("limit").inc()
            log.info("refused {client}: connection limit reached", client=self.client)
            self._close(
                b"421 4.7.0 " + rt.server.hostname.encode() + b" Too many connections, try later"
            )
            return
        self._counted = True
        rt.metrics.connections.inc()
        rt.metrics.connections_total.labels(listener.endpoint).inc()
        rt.sessions.add(self)
        # Backpressure: the transport pauses us when the client does not
        # read its replies, and we stop reading its commands.
        self.transport.registerProducer(self, True)
        self._producing = True
        self._touch()
        self._timer = rt.clock.callLater(rt.server.idle_timeout, self._idle_check)
        if self._secure:
            self._start_handshake_timer()
        self._call_policy(
            "smtp_server_connection_accepted",
            (self.conn_meta,),
            self._banner,
            closing=True,
        )

    # --- shutdown (SPEC §9) -------------------------------------------------

    def drain(self) -> None:
        """
        The server is stopping: close now if idle, else once the
        transaction in progress is answered.
        """
        self._draining = True
        self._finish_drain()

    def _finish_drain(self) -> None:
        if (
            self._draining
            and not self._paused
            and self._mode == COMMAND
            and self._mail_from is None
        ):
            self._close(R_SHUTDOWN, abort_after=1.0)

    def shutdown_now(self) -> None:
        """
        The grace period is over.
        """
        if self._closing:
            self.transport.abortConnection()
        else:
            self._close(R_SHUTDOWN, abort_after=0.5)

    def _banner(self) -> None:
        s = self.rt.server
        if self.listener.tls == "starttls":
            # Only where a STARTTLS can come, which goes back to it.
            self._initial_meta = self.conn_meta.values_now()
        self._send(f"220 {s.hostname} ESMTP {s.banner}".encode())

    # --- TLS handshake deadline ([tls] handshake_timeout) ------------------

    def _start_handshake_timer(self) -> None:
        self._handshake_timer = self.rt.clock.callLater(
            self.rt.handshake_timeout, self._handshake_expired
        )

    def _cancel_handshake_timer(self) -> None:
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self._closing:
            return
        self.rt.metrics.tls_failures.inc()
        log.info("TLS handshake timeout for {client}", client=self.client)
        # Nothing can be said to a client half-way through a handshake.
        self._closing = True
        self._cancel_timer()
        self.transport.abortConnection()

    # --- backpressure (IPushProducer, for the transport) -------------------

    def pauseProducing(self) -> None:
        self._output_blocked = True
        self._sync_reading()

    def resumeProducing(self) -> None:
        if not self._output_blocked:
            return
        self._output_blocked = False
        self._sync_reading()
        if not self._paused and not self._closing:
            self._process()

    def stopProducing(self) -> None:
        pass

    def _sync_reading(self) -> None:
        """
        Read from the client only while its replies drain and unprocessed
        input stays small.
        """
        if self._closing:
            return
        # During a TLS handshake the TLS layer holds our writes back (and
        # says so by pausing us) until the handshake, which needs reading,
        # is done: never stop reading then.
        blocked = self._output_blocked and self._handshake_timer is None
        want_paused = blocked or (self._paused and len(self._buf) > _PAUSE_BUFFER)
        if want_paused and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif not want_paused and self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def handshakeCompleted(self) -> None:
        self._cancel_handshake_timer()
        self._sync_reading()
        self.rt.metrics.tls_handshakes.inc()
        try:
            for key, value in describe(self.transport.getHandle()).items():
                self.conn_meta.set_meta(key, value)
        except Exception:
            log.failure("reading TLS parameters from {client}", client=self.client)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._closing = True
        self._cancel_timer()
        self._cancel_handshake_timer()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._counted:
            self._counted = False
            self.rt.limits.release(self._limit_key)
            self.rt.metrics.connections.dec()
            self.rt.sessions.discard(self)
        self._give_back()
        if self.delivery is not None:
            self.delivery.logout()
        if isinstance(reason, Failure) and _is_tls_failure(reason):
            self.rt.metrics.tls_failures.inc()
            log.info(
                "TLS handshake with {client} failed: {reason}",
                client=self.client,
                reason=reason.getErrorMessage(),
            )

    # --- idle timer ------------------------------------------------------
    # One timer per connection, not one per line: each line only records the
    # time, and the timer re-arms itself for what is left when it fires.

    def _touch(self) -> None:
        self._active_at = self.rt.clock.seconds()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _idle_check(self) -> None:
        self._timer = None
        if self._closing:
            return
        timeout = self.rt.server.idle_timeout
        if self._paused or self._handshake_timer is not None:
            # The server is busy for this client (checker, spool), or a TLS
            # handshake is under way, which has its own deadline
            # ([tls] handshake_timeout): not idle.
            self._touch()
        left = self._active_at + timeout - self.rt.clock.seconds()
        if left > 0:
            self._timer = self.rt.clock.callLater(left, self._idle_check)
            return
        log.info("idle timeout for {client}", client=self.client)
        self._close(
            b"421 4.4.2 " + self.rt.server.hostname.encode() + b" Idle timeout, closing connection"
        )

    # --- output ----------------------------------------------------------

    def _send(self, reply: bytes) -> None:
        if self._closing:
            return
        out = self._out
        if out is None:
            self.transport.write(reply + b"\r\n")
        else:
            out.append(reply)
            if len(out) >= _GATHER_MAX:
                # Bounded, so a client that pipelines without reading still
                # meets the transport's backpressure.
                self._write_out()

    def _write_out(self) -> None:
        """
        Send the replies held for a pipelined group, in one write (RFC 2920
        §3.2: one TLS record, one segment, not one per reply).
        """
        out = self._out
        if out:
            out.append(b"")
            data = b"\r\n".join(out)
            out.clear()
            self.transport.write(data)

    def _close(self, reply: bytes | None = None, abort_after: float = _CLOSE_TIMEOUT) -> None:
        if self._closing:
            return
        self._closing = True
        self._cancel_timer()
        self._cancel_handshake_timer()
        self._buf.clear()
        # The reply, and over TLS the close_notify at once (no more output
        # from us: the TLS layer would otherwise wait for the client's
        # close_notify before sending its own), in one segment.
        with corked(self.transport):
            self._write_out()
            if reply is not None:
                self.transport.write(reply + b"\r\n")
            if self._producing:
                self._producing = False
                self.transport.unregisterProducer()
            self.transport.loseConnection()
        # A TLS close waits for the client's close_notify; a client that
        # stopped reading would keep its slot forever.
        self._timer = self.rt.clock.callLater(abort_after, self.transport.abortConnection)

    def _refused(self, e: CommandError) -> None:
        """A command refused: a protocol error, or a refusal like a policy's."""
        if e.protocol_error:
            self._error(e.reply)
        else:
            self._send(e.reply)

    def _error(self, reply: bytes) -> None:
        """
        A client's protocol error: reply, and close at ``max_errors``.
        """
        self._send(reply)
        self._errors += 1
        if self._errors >= self.rt.server.max_errors:
            log.info(
                "closing {client}: too many errors ({errors})",
                client=self.client,
                errors=self._errors,
            )
            self._close(b"421 4.7.0 Too many errors, closing connection")

    # --- input framing -------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buf += data
        if not self._paused and not self._output_blocked:
            self._process()
        elif len(self._buf) > _PAUSE_BUFFER and not self._reading_paused:
            self._sync_reading()

    def _limit(self) -> int:
        if self._mode == AUTH:
            return sasl.MAX_RESPONSE
        return _AUTH_LINE_MAX

    def _process(self) -> None:
        # Not re-entrant: a command whose result is already there (a sync
        # checker, say) resumes from inside _line; the loop below goes on.
        if self._in_process:
            return
        self._in_process = True
        # The replies to what this read brought (a pipelined group: RFC 2920
        # §3.2) leave together, one TLS record and one segment.
        self._out = []
        try:
            self._process_lines()
        finally:
            self._in_process = False
            self._write_out()
            self._out = None
        if self._reading_paused:
            self._sync_reading()
        if self._draining:
            self._finish_drain()

    def _process_lines(self) -> None:
        buf = self._buf
        while buf and not self._paused and not self._closing and not self._output_blocked:
            if self._mode == DATA:
                if not self._data_chunk(buf):
                    return
                continue
            if self._discarding:
                end = buf.find(b"\r\n")
                if end < 0:
                    keep = 1 if buf.endswith(b"\r") else 0
                    del buf[: len(buf) - keep]
                    return
                del buf[: end + 2]
                self._discarding = False
                self._touch()
                if self._discard_reply is not None:
                    self._malformed(self._discard_reply)
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if buf[-1] == 10:
                    # Input that stops at a bare LF (`openssl s_client`
                    # without -crlf, `nc` without -C, waiting for a reply):
                    # said at once, not left to the idle timeout.  A bare
                    # LF ends no line (RFC 5321 §2.3.8): what a later CRLF
                    # ends is the rest of this one, dropped unanswered (a
                    # proxy framing on CRLF saw one line and one reply).
                    buf.clear()
                    self._touch()
                    in_auth = self._mode == AUTH  # RFC 4954 §4: a malformed response is a 501
                    self._malformed(R_BARE_LF_AUTH if in_auth else R_BARE_LF)
                    self._discarding = True
                    self._discard_reply = None
                    return
                if len(buf) > self._limit():
                    # Drop what we have and the rest of the line as it comes.
                    self._discard_reply = self._overlong_reply(bytes(buf[:5]))
                    self._discarding = True
                    buf.clear()
                return
            line = bytes(buf[:end])
            del buf[: end + 2]
            self._touch()
            if len(line) > self._limit():
                self._malformed(self._overlong_reply(line[:5]))
                continue
            if self._mode == AUTH or line[:5].upper() == b"AUTH ":
                slicer = self.rt.process.slicer
                if slicer.busy:
                    # A burst of AUTH lines (500 clients at once): decoded
                    # and checked a slice per reactor iteration, so the
                    # other sessions are served in between.
                    self._wait(slicer.call(self._line, line), _ignore, self._line_failed)
                    continue
            try:
                self._line(line)
            except Exception:
                self._line_failed(Failure())

    def _line_failed(self, f: Failure) -> None:
        log.failure("bug handling a line from {client}", f, client=self.client)
        self._close(b"421 4.3.0 Internal error, closing connection")

    def _overlong_reply(self, head: bytes) -> bytes:
        if self._mode == AUTH or head.upper().startswith(b"AUTH "):
            return sasl.too_long().reply
        return R_TOO_LONG

    def _malformed(self, reply: bytes) -> None:
        """A line too long or ended by a bare LF: an AUTH exchange ends with it."""
        if self._mode == AUTH:
            self._mode = COMMAND
            self._sasl_done("malformed")
        self._error(reply)

    # --- waiting ----------------------------------------------------------

    def _wait(
        self,
        d: defer.Deferred[Any],
        ok: Callable[[Any], None],
        failed: Callable[[Failure], None],
        timeout: float | None = None,
    ) -> None:
        """
        Stop reading commands until *d* fires, then call *ok* or *failed*;
        go on with buffered commands unless that started another wait.
        With *timeout*, *d* is cancelled after that many seconds and
        *failed* gets a ``defer.TimeoutError``: nothing a session waits on
        can hold it forever.  An exception in *ok* or *failed* is a bug:
        logged, 421 to this client only.
        """
        self._paused = True
        self._pending = d
        if timeout is not None:
            d.addTimeout(timeout, self.rt.clock)

        def fire(result: Any) -> None:
            if self._closing or self._pending is not d:
                return
            self._pending = None
            try:
                if isinstance(result, Failure):
                    failed(result)
                else:
                    ok(result)
            except Exception:
                log.failure("bug after a wait for {client}", client=self.client)
                self._close(b"421 4.3.0 Internal error, closing connection")
                return
            if self._pending is None and not self._closing:
                self._paused = False
                self._touch()
                self._process()

        d.addBoth(fire)

    def _line(self, line: bytes) -> None:
        if self._mode == AUTH:
            self._sasl_response(line)
        else:
            verb, arg = parse_command(line)
            if len(line) > MAX_COMMAND_LINE and verb != "AUTH":
                self._error(R_TOO_LONG)
                return
            # Looked up at call time (as Twisted does), so a subclass may
            # override any smtp_VERB.
            handler = getattr(self, "smtp_" + verb, None) if verb else None
            if handler is None:
                self._error(R_UNKNOWN)
            else:
                handler(arg)

    def _call_policy(
        self,
        event: str,
        args: tuple[Any, ...],
        then: Callable[[], None],
        closing: bool = False,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        """
        Run a policy handler, then *then*.  A Reject sends its reply (and
        closes, for a 421 or when *closing*); any other exception is a
        policy bug: logged with its traceback, and a 4xx to this client.
        """
        handler = self.rt.policy.handler(event)
        if handler is None:
            then()
            return

        def failed(f: Failure) -> None:
            if on_reject is not None:
                on_reject()
            if f.check(Reject):
                reject: Reject = f.value  # type: ignore[assignment]
                if reject.closes or closing:
                    self._close(reject.reply)
                else:
                    self._send(reject.reply)
                return
            if f.check(defer.TimeoutError):
                log.error(
                    "policy handler {event} did not answer within {timeout}s ({client})",
                    event=event,
                    timeout=self.rt.policy_timeout,
                    client=self.client,
                )
            else:
                log.failure("policy handler {event} failed", f, event=event)
            if closing:
                self._close(b"421 4.3.0 Internal error, closing connection")
            else:
                self._send(R_INTERNAL)

        try:
            result = self.rt.invoke(handler, *args)
        except Exception:
            failed(Failure())
            return
        if isinstance(result, defer.Deferred):
            self._wait(result, lambda _: then(), failed, timeout=self.rt.policy_timeout)
        else:
            then()

    # --- commands --------------------------------------------------------

    def smtp_EHLO(self, arg: bytes) -> None:
        self._hello(arg, esmtp=True)

    def smtp_HELO(self, arg: bytes) -> None:
        self._hello(arg, esmtp=False)

    def _hello(self, arg: bytes, esmtp: bool) -> None:
        if not arg or b" " in arg:
            self._error(b"501 5.5.4 Syntax: " + (b"EHLO" if esmtp else b"HELO") + b" hostname")
            return
        # RFC 5321 §4.1.1.1: a Domain or an address literal.  It goes into
        # the reply and the Received header: nothing else may (no CR, LF,
        # control characters, spaces, 8-bit bytes).
        if not is_helo_domain(arg):
            self._error(R_BAD_DOMAIN)
            return
        domain = arg.decode("ascii")
        # RFC 5321 §4.1.4: EHLO/HELO resets the transaction state.
        self._reset_transaction()
        self.conn_meta.set_meta("ehlo_domain", domain)

        def done() -> None:
            self._greeted = True
            self._esmtp = esmtp
            host = self.rt.server.hostname
            if esmtp:
                words = self.rt.ehlo_keywords(self.listener, self._secure)
                self._send(reply_lines(250, [f"{host} Hello {domain}", *words])[:-2])
            else:
                self._send(f"250 {host} Hello {domain}".encode())

        def undo() -> None:
            self._greeted = False

        self._call_policy("smtp_server_ehlo", (domain, self.conn_meta), done, on_reject=undo)

    def smtp_STARTTLS(self, arg: bytes) -> None:
        if arg:
            self._error(R_NO_ARGS)
        elif self.listener.tls != "starttls" or self.rt.tls is None:
            self._error(b"502 5.5.1 STARTTLS not available on this port")
        elif self._secure:
            self._error(b"503 5.5.1 TLS already active")
        else:
            self._send(b"220 2.0.0 Ready to start TLS")
            # RFC 3207 §4.2 / CVE-2011-0411: anything the client pipelined
            # after STARTTLS arrived in cleartext and is discarded.  The
            # session starts over: no EHLO, no transaction, no identity.
            self._buf.clear()
            self._reset_transaction()
            self._greeted = False
            self._esmtp = False
            # Identity too: a man in the middle could otherwise log the
            # victim's session in as himself before TLS.
            if self.delivery is not None:
                self.delivery.logout()
            self.conn_meta.restore(self._initial_meta)
            self.delivery = Delivery(self.conn_meta, store=self.rt.store)
            self._auth_failures = 0
            self._secure = True
            self._start_handshake_timer()
            self._write_out()  # the 220 in cleartext, before the handshake
            self.transport.startTLS(self.rt.tls)

    def smtp_NOOP(self, arg: bytes) -> None:
        self._send(b"250 2.0.0 OK")

    def smtp_RSET(self, arg: bytes) -> None:
        if arg:
            self._error(R_NO_ARGS)
            return
        self._reset_transaction()
        self._send(b"250 2.0.0 OK")

    def smtp_VRFY(self, arg: bytes) -> None:
        if not arg.strip():
            self._error(b"501 5.5.4 Syntax: VRFY <address>")  # RFC 5321 §4.1.1.6
            return
        # RFC 5321 §3.5.3: 252 when we will not verify.
        self._send(b"252 2.5.0 Cannot VRFY user, but will accept message")

    def smtp_EXPN(self, arg: bytes) -> None:
        # A defined command we do not offer (RFC 5321 §3.5.2, §4.2.4): 502,
        # not 500, and not a client error.
        self._send(b"502 5.5.1 EXPN not available")

    def smtp_HELP(self, arg: bytes) -> None:
        self._send(
            b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"
        )

    def smtp_QUIT(self, arg: bytes) -> None:
        self._close(b"221 2.0.0 " + self.rt.server.hostname.encode() + b" closing connection")

    def smtp_MAIL(self, arg: bytes) -> None:
        if not self._greeted:
            self._error(b"503 5.5.1 Send EHLO first")
            return
        if self.listener.auth_required and not self.authenticated:
            if (
                not self._secure
                and self.listener.tls == "starttls"
                and self.rt.tls is not None
                and not self.listener.allow_plaintext_auth
            ):
                # RFC 3207 §4: the client's next step is TLS, not a password.
                self._send(b"530 5.7.0 Must issue a STARTTLS command first")
            else:
                self._send(b"530 5.7.0 Authentication required")
            return
        if self._mail_from is not None:
            self._error(b"503 5.5.1 Nested MAIL command")
            return
        self._give_back()  # the last message's, if it was not accepted
        if self._locked_out():
            return
        try:
            path = parse_path(arg, b"FROM", allow_null=True, utf8=True)
            ret, envid = check_mail_params(
                path.params, self.rt.server.max_message_size, self._esmtp, self.rt.server.dsn
            )
            smtputf8 = "SMTPUTF8" in path.params
            if not smtputf8 and not path.address.isascii():
                # RFC 6531 §3.4: UTF-8 addresses only with SMTPUTF8.
                raise CommandError(R_NEEDS_SMTPUTF8, False)
        except CommandError as e:
            self._refused(e)
            return

        def accept() -> None:
            self._mail_from = path.address
            self._smtputf8 = smtputf8
            self._rcpts = []
            self._dsn = (ret, envid, {}) if ret or envid else None
            self._send(b"250 2.1.0 Sender OK")

        def counted() -> None:
            self._within_limit(MESSAGES, accept)

        def bound() -> None:
            self._call_policy("smtp_server_mail_from", (path.address, self.conn_meta), counted)

        binding = self._binding()
        if binding is None:
            bound()
            return
        gate, authz = binding
        self._through_gate(gate.envelope(authz, path.address, self.conn_meta), bound, "envelope")

    def _binding(self) -> tuple[SenderGate, str] | None:
        """``[sender_binding]``'s gate and the user it binds, if it applies."""
        gate = self.rt.sender_gate
        authz = self.delivery.authz_id if self.delivery is not None else None
        return None if gate is None or authz is None else (gate, authz)

    def _locked_out(self) -> bool:
        """
        Whether this session's user is in ``[auth] locked_users`` now: if
        so the session is closed, once logged.  A lock reaches sessions
        that authenticated before it (a phished account's open sessions).
        """
        delivery = self.delivery
        if delivery is None or delivery.authn_id is None:
            return False
        locked = self.rt.process.locked_users.which(delivery.authn_id, delivery.login)
        if locked is None:
            return False
        log.warn(
            "closing {client}: user {user} is locked ([auth] locked_users)",
            client=self.client,
            user=field_value(locked),
        )
        self._close(b"421 4.7.0 Account locked, closing connection")
        return True

    def _through_gate(
        self, d: defer.Deferred[bytes | None], then: Callable[[], None], where: str
    ) -> None:
        """
        Wait for a sender-binding decision: None goes on with *then*, a
        reply is sent instead; a policy Reject is its reply; no decision in
        time is the gate's 451 4.7.1 (a state line); a bug is 451 4.3.0.
        """
        timeout = self.rt.policy_timeout + STORE_WAIT_GRACE

        def decided(reply: bytes | None) -> None:
            if reply is None:
                then()
            elif reply[:1] == b"5":
                # A refused sender counts toward max_errors: a client that
                # tries forged senders in a loop is closed, not answered
                # (and logged) for ever.
                self._error(reply)
            else:
                self._send(reply)

        def failed(f: Failure) -> None:
            if f.check(Reject):
                reject: Reject = f.value  # type: ignore[assignment]
                self._send(reject.reply)
            elif f.check(defer.TimeoutError):
                self._send(self.rt.sender_gate.undecided(timeout, where))
            else:
                self._send(failed_reply(f))

        self._wait(d, decided, failed, timeout=timeout)

    def smtp_RCPT(self, arg: bytes) -> None:
        if self._mail_from is None:
            self._error(b"503 5.5.1 Need MAIL command first")
            return
        try:
            path = parse_path(arg, b"TO", allow_null=False, utf8=True)
            params = path.params
            dsn = check_rcpt_params(params, self.rt.server.dsn, self._esmtp) if params else None
            if not self._smtputf8 and not path.address.isascii():
                raise CommandError(R_NEEDS_SMTPUTF8, False)
        except CommandError as e:
            self._refused(e)
            return
        if len(self._rcpts) >= self.rt.server.max_recipients:
            self._send(b"452 4.5.3 Too many recipients")
            return
        if self._mail_from == "" and self._rcpts and self._binding() is not None:
            # A report (DSN, MDN, vacation reply) has one recipient; under
            # [sender_binding] the null sender, which binds to nobody, must
            # not carry a phished account's spam to a hundred.
            self._send(b"550 5.7.1 A message from the null sender takes one recipient")
            return

        def accept() -> None:
            self._rcpts.append(path.address)
            if dsn is not None:
                if self._dsn is None:
                    self._dsn = (None, None, {})
                self._dsn[2][path.address] = dsn
            self._send(b"250 2.1.5 Recipient OK")

        def counted() -> None:
            self._within_limit(RECIPIENTS, accept)

        self._call_policy("smtp_server_rcpt_to", (path.address, self.conn_meta), counted)

    def _within_limit(self, kind: str, then: Callable[[], None]) -> None:
        """
        Count one more of *kind* against the user's ``[limits]``, then
        *then*; over the limit (or the store down, failing closed), the
        reply instead.
        """
        limits = self.rt.sending_limits
        user = self.delivery.authn_id if self.delivery is not None else None
        if limits is None or user is None:
            then()
            return
        if self._charge is None:
            self._charge = Charge(user)
        charge = self._charge

        def checked(reply: bytes | None) -> None:
            if reply is None:
                then()
            else:
                self._send(reply)

        def failed(f: Failure) -> None:
            log.failure("sending limits for {client}", f, client=self.client)
            self._send(R_INTERNAL)

        timeout = self.rt.policy_timeout
        self._wait(
            limits.check(kind, user, self.conn_meta, timeout, self.rt.clock, charge),
            checked,
            failed,
            timeout=timeout + STORE_WAIT_GRACE,
        )

    def smtp_DATA(self, arg: bytes) -> None:
        if arg:
            self._error(R_NO_ARGS)
            return
        if self._mail_from is None:
            self._error(b"503 5.5.1 Need MAIL command first")
            return
        if not self._rcpts:
            # RFC 2920 §3.1: after pipelined RCPTs that all failed, which
            # is how pipelining goes, not a protocol mistake.
            self._send(b"554 5.5.1 No valid recipients")
            return
        self._mode = DATA
        server = self.rt.server
        self._reader = DataReader(server.max_message_size, server.bare_newlines == "normalize")
        self._send(b"354 End data with <CR><LF>.<CR><LF>")

    def _data_chunk(self, buf: bytearray) -> bool:
        """
        Move message bytes from *buf* into the message; True once the end
        of data was found (the rest of *buf* is commands again).
        """
        reader = self._reader
        assert reader is not None
        # Activity is a complete line (as for commands), so a client that
        # trickles bytes cannot hold the connection.
        if b"\n" in buf:
            self._touch()
        if not reader.feed(buf):
            return False
        self._end_data()
        return True

    def _end_data(self) -> None:
        self._mode = COMMAND
        sender, recipients, smtputf8 = self._mail_from or "", self._rcpts, self._smtputf8
        dsn = self._dsn
        # This message's [limits] count stays until its outcome: kept if it
        # is accepted, given back at the next MAIL, RSET or disconnect if not.
        charge, self._charge = self._charge, None
        self._reset_transaction()
        self._charge = charge
        if self._locked_out():
            self._reader = None
            return
        reader, self._reader = self._reader, None
        assert reader is not None
        # The limit is on the message, not its dot-stuffed wire form.
        if reader.too_big or reader.message_size > self.rt.server.max_message_size:
            self._send(b"552 5.3.4 Message size exceeds fixed limit")
            return
        # RFC 5321 §2.3.8; passed on raw, bare line ends are the stuff of
        # SMTP smuggling at the next hop.  The reader rewrote them as they
        # came, unless the setting is to refuse the message for them.
        if reader.bare and not reader.normalize:
            self._send(b"550 5.6.0 Message contains bare CR or LF characters")
            return
        body: bytes | bytearray = reader.message()
        limit = self.rt.server.max_header_size
        if limit and header_section_over(body, limit):
            # Exim's header_maxsize: a header section this large is no
            # mail's, and every scan of it (here, the policy's, the
            # upstream's) would pay for it.
            self._send(b"552 5.3.4 Message header exceeds fixed limit")
            return
        # Only kumoauth writes the identity header it signs for the
        # upstream ([relay] identity = "header"): never a client's copy.
        body = strip_identity_header(body)
        mid = new_id()
        data = self._received_header(mid, smtputf8) + body
        message = Message(mid, sender, recipients, data, self.conn_meta.snapshot())
        if smtputf8:
            message.set_meta("smtputf8", True)
        if dsn is not None:
            message.dsn = dsnparams.stored(*dsn)
        delivery = self.delivery
        assert delivery is not None

        def stored(mid: str) -> None:
            size, n = len(message.data), len(message.recipients)
            self.rt.metrics.messages_spooled.inc()
            self.rt.metrics.bytes_spooled.inc(size)
            text = f"spooled {mid} from {self.client} ({size} bytes, {n} recipients)"
            # what a Postfix admin greps for: the sender and the Message-ID
            text += f" from={field_value('<' + sender + '>')}"
            header_id = message_id(body)
            if header_id is not None:
                text += f" message_id={field_value(header_id, MESSAGE_ID_LIMIT)}"
            authn = delivery.authn_id
            if authn is not None:
                # who sent it, for a phished account's post-mortem
                text += f" authn={field_value(authn)}"
            log.info(
                "{text}",
                text=text,
                id=mid,
                client=self.client,
                size=size,
                n=n,
                authn=authn,
                mail_from=sender,
                message_id=header_id,
            )
            self._send(b"250 2.0.0 OK queued as " + mid.encode())
            self.rt.process.spool_state.succeeded()

        def not_stored(f: Failure, charge: Charge | None) -> None:
            self._give_back(charge)  # not stored: it does not count
            self.rt.metrics.spool_errors.inc()
            if f.check(SpoolError):
                # A full disk: one line when it starts, one when mail is
                # stored again, not one per message (the metric counts them).
                self.rt.process.spool_state.failed(
                    f"write failed: {f.getErrorMessage()}", "messages get 451 4.3.0"
                )
            else:
                log.failure("delivering {id}", f, id=mid)
            self._send(b"451 4.3.0 Could not store message, try again later")

        def spool() -> None:
            # From here the message may be stored even if the client goes
            # (a cancelled write still completes): its [limits] counts go
            # with it, and come back only if the store refuses it.
            charge, self._charge = self._charge, None
            self._wait(delivery.deliver(message), stored, lambda f: not_stored(f, charge))

        def received() -> None:
            self._call_policy("smtp_server_message_received", (message, self.conn_meta), spool)

        binding = self._binding()
        if binding is None or not binding[0].check_headers:
            received()
            return
        gate, authz = binding
        # From:/Sender: must be the user's too: nothing stored otherwise.
        self._through_gate(gate.headers(authz, body, smtputf8, self.conn_meta), received, "header")

    def _received_header(self, mid: str, smtputf8: bool) -> bytes:
        """
        RFC 5321 §4.4 trace header, with the RFC 3848 / RFC 6531 protocol type.
        """
        meta = self.conn_meta
        version = meta.get_meta("tls_protocol_version") if self._secure else None
        return received_header(
            helo=meta.get_meta("ehlo_domain") or "unknown",
            ip=self._ip,
            hostname=self.rt.server.hostname,
            protocol=protocol_type(self._esmtp, self._secure, self.authenticated, smtputf8),
            message_id=mid,
            date=trace_date(),
            tls_version=version,
            tls_cipher=meta.get_meta("tls_cipher") if version else None,
        )

    def _reset_transaction(self) -> None:
        self._mail_from = None
        self._smtputf8 = False
        self._rcpts = []
        self._dsn = None
        self._give_back()

    def _give_back(self, charge: Charge | None = None) -> None:
        """
        Uncount a transaction that ended without its message accepted:
        *charge* (what a message took to the spool), else this
        transaction's counts so far.
        """
        if charge is None:
            charge, self._charge = self._charge, None
        limits = self.rt.sending_limits
        if charge is not None and limits is not None:
            limits.give_back(charge)

    # --- AUTH (RFC 4954) -------------------------------------------------
    # The protocol only frames the exchange: the mechanism object decodes
    # (kumoauth.auth.mechanisms), the Authenticator decides (kumoauth.auth.authenticator).

    def _attempt_for(self, mechanism: str) -> Attempt:
        return Attempt(
            mechanism=mechanism,
            started=self.rt.clock.seconds(),
            client_ip=self._ip,
            client=self.client,
            listener=self.listener.endpoint,
            conn_meta=self.conn_meta,
        )

    def smtp_AUTH(self, arg: bytes) -> None:
        listener = self.listener
        words = arg.split(b" ")
        name = words[0].decode("ascii", "replace").upper() if arg else ""
        if not self._secure and not listener.allow_plaintext_auth:
            # The attempt an operator most needs to see: a client about to
            # send its password in clear.  Logged (never the secret).
            self.rt.authenticator.log.record(self._attempt_for(name), "cleartext")
            self._error(R_CLEARTEXT)
            return
        if not self._greeted or not self._esmtp:
            self._error(b"503 5.5.1 Send EHLO first")
            return
        if self.authenticated:
            self._error(b"503 5.5.1 Already authenticated")
            return
        if self._mail_from is not None:
            self._error(b"503 5.5.1 AUTH not permitted during a mail transaction")
            return
        if not arg or len(words) > 2:
            self._error(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        factory = REGISTRY.get(name) if name in self.rt.auth.mechanisms else None
        if factory is None:
            self.rt.authenticator.log.record(self._attempt_for(name), "unsupported")
            self._error(b"504 5.5.4 Unrecognized authentication type")
            return
        mechanism = factory()
        attempt = self._sasl = _SASLExchange(mechanism, self._attempt_for(name))
        initial = words[1] if len(words) == 2 else None
        if initial is None:
            self._mode = AUTH
            self._challenge(mechanism.initial_challenge())
            return
        attempt.attempt.secrets.append(initial)
        self._sasl_step(initial)

    def _challenge(self, challenge: bytes) -> None:
        self._send(b"334 " + base64.b64encode(challenge))

    def _sasl_response(self, line: bytes) -> None:
        assert self._sasl is not None
        final, self._final = self._final, None
        if final is not None:
            # The answer to a failure challenge ends the exchange with the
            # outcome decided before; its content does not matter, except
            # that "*" gets the 501 RFC 4954 §4 gives a cancel.
            self._mode = COMMAND
            reply = sasl.cancelled().reply if line == sasl.CANCEL else final.reply
            self._auth_outcome(Outcome(final.result, reply))
            return
        self._sasl.attempt.secrets.append(line)
        self._sasl_step(line)

    def _sasl_step(self, line: bytes) -> None:
        exchange = self._sasl
        assert exchange is not None
        try:
            result = exchange.mechanism.respond(sasl.decode_response(line))
            if isinstance(result, bytes):
                self._mode = AUTH
                self._challenge(result)
                return
            self._mode = COMMAND
            # RFC 4616 §2 / RFC 4013: names are prepared before any checker,
            # log or meta sees them (a decomposed "jürgen" is "jürgen").
            creds = credentials_for(result, self.conn_meta, self.rt.auth.account)
        except sasl.SASLError as e:
            self._mode = COMMAND
            # the reason is kumoauth's own words ("authcid contains a
            # prohibited character"), never the client's bytes
            self._sasl_done(e.kind, e.reason if e.kind == "malformed" else None)
            self._error(e.reply)
            return
        self._wait(
            self.rt.authenticator.authenticate(exchange.attempt, creds),
            self._auth_outcome,
            self._auth_bug,
        )

    def _auth_outcome(self, outcome: Outcome) -> None:
        if outcome.result == "failure" and outcome.challenge is not None:
            # RFC 7628 §3.2.2: the error goes as a challenge; the final
            # reply follows the client's (dummy) response, whatever it is.
            self._final = outcome
            self._mode = AUTH
            self._challenge(outcome.challenge)
            return
        self._sasl = None
        if outcome.result == "success":
            self.delivery = outcome.delivery
            self._send(outcome.reply)
        elif outcome.result == "failure":
            self._auth_failures += 1
            if self._auth_failures >= self.rt.auth.max_failures:
                log.info(
                    "closing {client}: too many authentication failures ({failures})",
                    client=self.client,
                    failures=self._auth_failures,
                )
                self._close(b"421 4.7.0 Too many authentication failures, closing connection")
            else:
                self._send(outcome.reply)
        elif outcome.result == "throttled":
            # A throttled client repeating itself is a protocol error too,
            # so a flood ends at max_errors.
            self._error(outcome.reply)
        else:
            self._send(outcome.reply)

    def _auth_bug(self, f: Failure) -> None:
        self._sasl = None
        log.failure("bug in an AUTH attempt from {client}", f, client=self.client)
        self._send(R_TEMPFAIL)

    def _sasl_done(self, result: str, reason: str | None = None) -> None:
        """
        An exchange that ended before its credentials were checked
        (malformed, cancelled, too long): log it and forget it, and a
        refused token's outcome that waited for the client's answer (the
        next exchange must not get it).
        """
        self._final = None
        exchange, self._sasl = self._sasl, None
        if exchange is not None:
            self.rt.authenticator.log.record(exchange.attempt, result, reason=reason)


class _SASLExchange:
    """
    One AUTH exchange in progress: the mechanism and the attempt.
    """

    __slots__ = ("mechanism", "attempt")

    def __init__(self, mechanism: Mechanism, attempt: Attempt) -> None:
        self.mechanism = mechanism
        self.attempt = attempt


def _addr(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(getattr(address, "name", None) or "local")
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _is_tls_failure(reason: Failure) -> bool:
    from OpenSSL import SSL

    return reason.check(SSL.Error) is not None


class SubmissionFactory(Factory):
    """
    Builds :class:`SubmissionProtocol` for one listener.  ``runtime`` is the
    configuration generation new connections get; a reload replaces it.
    """

    noisy = False
    protocol = SubmissionProtocol  # type: ignore[assignment]

    def __init__(self, listener: ListenerConfig, runtime: Runtime) -> None:
        self.listener = listener
        self.runtime = runtime


def wrap_listener(factory: SubmissionFactory) -> IProtocolFactory:
    """
    The factory to listen with: wrapped in TLS for ``tls = "implicit"``.
    """
    if factory.listener.tls == "implicit":
        assert factory.runtime.tls is not None
        return DirectTLSFactory(factory.runtime.tls, factory)
    return factory


def _ignore(result: object) -> None:
    return None
