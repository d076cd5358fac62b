"""
The ESMTP submission protocol: the state machine of SPEC §6.

It frames lines, keeps session state and calls out to the pieces around it:
:mod:`kumoauth.commands` parses, :mod:`kumoauth.sasl` decodes, the Cred
portal checks, the policy handlers decide, the delivery avatar spools.

Pipelining (RFC 2920) is served by processing buffered lines one at a time
and pausing while a command waits on a handler, the checker or the spool;
replies therefore always come in order.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twisted.cred import error as cred_error
from twisted.internet import defer, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kumoauth import sasl
from kumoauth.commands import (
    MAX_COMMAND_LINE,
    CommandError,
    check_mail_params,
    parse_command,
    parse_path,
    reply_lines,
)
from kumoauth.cred import AuthContext, PlainCredentials
from kumoauth.delivery import Delivery, IMessageDelivery, Message
from kumoauth.meta import ConnMeta
from kumoauth.policy import Reject
from kumoauth.spool import SpoolError, new_id
from kumoauth.tls import describe

if TYPE_CHECKING:
    from kumoauth.config import ListenerConfig
    from kumoauth.listener import Runtime, SubmissionFactory

log = Logger(namespace="kumoauth.smtp")
auth_log = Logger(namespace="kumoauth.auth")

# Framing limits.  A command line may be 1000 octets (SPEC §6) except an
# AUTH line, which carries an initial response of up to 12288 (RFC 4954 §4).
_AUTH_LINE_MAX = sasl.MAX_RESPONSE + 32
_PAUSE_BUFFER = 256 * 1024  # stop reading while this much waits unprocessed
# Dot-stuffing makes the wire form of a message slightly longer than the
# message; this much over max_message_size is read before giving up early.
_DATA_SLACK = 64 * 1024
# Seconds a closing connection may take to say goodbye before it is aborted.
_CLOSE_TIMEOUT = 5.0

COMMAND, AUTH, DATA = range(3)

R_TOO_LONG = b"500 5.5.2 Line too long"
R_UNKNOWN = b"500 5.5.2 Command unrecognized"
R_NO_ARGS = b"501 5.5.4 Syntax error: no arguments allowed"
R_INTERNAL = b"451 4.3.0 Internal error, try again later"
R_SHUTDOWN = b"421 4.3.2 Service shutting down, try again later"
R_TEMPFAIL_AUTH = b"454 4.7.0 Temporary authentication failure"
R_AUTH_FAILED = b"535 5.7.8 Authentication credentials invalid"


def scrub(text: str, secrets: list[bytes]) -> str:
    """
    Remove every secret (and its text form) from *text* before it is logged.
    """
    for secret in secrets:
        if len(secret) < 2:
            continue
        text = text.replace(secret.decode("utf-8", "replace"), "<hidden>")
    return text


@implementer(IHandshakeListener)
class SubmissionProtocol(Protocol):
    factory: SubmissionFactory
    # Both captured when the connection is made, so a reload (which swaps
    # them on the factory) never changes a live session.
    rt: Runtime
    listener: ListenerConfig
    # A TCP transport, or a TLS wrapper around one (startTLS, getHandle).
    transport: Any

    def __init__(self) -> None:
        self._buf = bytearray()
        self._mode = COMMAND
        self._paused = False
        self._draining = False
        self._in_process = False
        self._active_at = 0.0
        self._reading_paused = False
        self._closing = False
        self._counted = False
        self._discarding = False
        self._discard_reply = R_TOO_LONG
        self._timer: Any = None
        self._pending: defer.Deferred[Any] | None = None
        self._errors = 0
        self._auth_failures = 0
        self._secure = False
        self._greeted = False
        self._esmtp = False
        self._sasl: _SASLExchange | None = None
        self._mail_from: str | None = None
        self._rcpts: list[str] = []
        # DATA: the raw (dot-stuffed) bytes so far, after a CRLF sentinel so
        # that the terminator is always CRLF "." CRLF, even for an empty message.
        self._data = bytearray()
        self._data_scanned = 0
        self._data_too_big = False
        self._ip = ""
        self.client = ""
        self.conn_meta = ConnMeta()
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
        self.conn_meta = ConnMeta(
            {
                "reception_protocol": "ESMTP",
                "received_from": self.client,
                "received_via": _addr(host),
                "hostname": rt.server.hostname,
                **listener.meta,
            }
        )
        self.delivery = Delivery(self.conn_meta, store=rt.store)
        if not rt.limits.acquire(self._ip, rt.server):
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
        self._touch()
        self._timer = rt.clock.callLater(rt.server.idle_timeout, self._idle_check)
        self._call_policy(
            "smtp_server_connection_accepted", (self.conn_meta,), self._banner, closing=True
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
        self._send(f"220 {s.hostname} ESMTP {s.banner}".encode())

    def handshakeCompleted(self) -> None:
        self.rt.metrics.tls_handshakes.inc()
        try:
            for key, value in describe(self.transport.getHandle()).items():
                self.conn_meta.set_meta(key, value)
        except Exception:
            log.failure("reading TLS parameters from {client}", client=self.client)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._closing = True
        self._cancel_timer()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._counted:
            self._counted = False
            self.rt.limits.release(self._ip)
            self.rt.metrics.connections.dec()
            self.rt.sessions.discard(self)
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
        if self._paused:
            # The server is busy for this client (checker, spool): not idle.
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
        if not self._closing:
            self.transport.write(reply + b"\r\n")

    def _close(self, reply: bytes | None = None, abort_after: float = _CLOSE_TIMEOUT) -> None:
        if self._closing:
            return
        if reply is not None:
            self.transport.write(reply + b"\r\n")
        self._closing = True
        self._cancel_timer()
        self._buf.clear()
        self.transport.loseConnection()
        # A TLS close waits for the client's close_notify; a client that
        # stopped reading would keep its slot forever.
        self._timer = self.rt.clock.callLater(abort_after, self.transport.abortConnection)

    def _error(self, reply: bytes) -> None:
        """
        A client's protocol error: reply, and close at ``max_errors``.
        """
        self._send(reply)
        self._errors += 1
        if self._errors >= self.rt.server.max_errors:
            self._close(b"421 4.7.0 Too many errors, closing connection")

    # --- input framing -------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buf += data
        if not self._paused:
            self._process()
        elif len(self._buf) > _PAUSE_BUFFER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

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
        try:
            self._process_lines()
        finally:
            self._in_process = False
        if self._reading_paused and not self._paused and not self._closing:
            self._reading_paused = False
            self.transport.resumeProducing()
        if self._draining:
            self._finish_drain()

    def _process_lines(self) -> None:
        buf = self._buf
        while buf and not self._paused and not self._closing:
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
                self._overlong()
                continue
            end = buf.find(b"\r\n")
            if end < 0:
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
                self._discard_reply = self._overlong_reply(line[:5])
                self._overlong()
                continue
            try:
                self._line(line)
            except Exception:
                log.failure("bug handling a line from {client}", client=self.client)
                self._close(b"421 4.3.0 Internal error, closing connection")

    def _overlong_reply(self, head: bytes) -> bytes:
        if self._mode == AUTH or head.upper().startswith(b"AUTH "):
            return sasl.too_long().reply
        return R_TOO_LONG

    def _overlong(self) -> None:
        if self._mode == AUTH:
            self._mode = COMMAND
            self._sasl_done("malformed")
        self._error(self._discard_reply)

    # --- waiting ----------------------------------------------------------

    def _wait(
        self,
        d: defer.Deferred[Any],
        ok: Callable[[Any], None],
        failed: Callable[[Failure], None],
    ) -> None:
        """
        Stop reading commands until *d* fires, then call *ok* or *failed*;
        go on with buffered commands unless that started another wait.
        An exception there is a bug: logged, 421 to this client only.
        """
        self._paused = True
        self._pending = d

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
            handler = _COMMANDS.get(verb)
            if handler is None:
                self._error(R_UNKNOWN)
            else:
                handler(self, arg)

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
            self._wait(result, lambda _: then(), failed)
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
        try:
            domain = arg.decode("ascii")
        except UnicodeDecodeError:
            self._error(b"501 5.5.4 Invalid domain")
            return
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
            self.conn_meta._values.pop("ehlo_domain", None)
            self._secure = True
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
        # RFC 5321 §3.5.3: 252 when we will not verify.
        self._send(b"252 2.5.0 Cannot VRFY user, but will accept message")

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
            self._send(b"530 5.7.0 Authentication required")
            return
        if self._mail_from is not None:
            self._error(b"503 5.5.1 Nested MAIL command")
            return
        try:
            path = parse_path(arg, b"FROM", allow_null=True)
            check_mail_params(path.params, self.rt.server.max_message_size)
        except CommandError as e:
            if e.reply.startswith(b"552"):
                self._send(e.reply)
            else:
                self._error(e.reply)
            return

        def accept() -> None:
            self._mail_from = path.address
            self._rcpts = []
            self._send(b"250 2.1.0 Sender OK")

        self._call_policy("smtp_server_mail_from", (path.address, self.conn_meta), accept)

    def smtp_RCPT(self, arg: bytes) -> None:
        if self._mail_from is None:
            self._error(b"503 5.5.1 Need MAIL command first")
            return
        try:
            path = parse_path(arg, b"TO", allow_null=False)
            if path.params:
                raise CommandError(b"555 5.5.4 RCPT TO parameters are not supported")
        except CommandError as e:
            self._error(e.reply)
            return
        if len(self._rcpts) >= self.rt.server.max_recipients:
            self._send(b"452 4.5.3 Too many recipients")
            return

        def accept() -> None:
            self._rcpts.append(path.address)
            self._send(b"250 2.1.5 Recipient OK")

        self._call_policy("smtp_server_rcpt_to", (path.address, self.conn_meta), accept)

    def smtp_DATA(self, arg: bytes) -> None:
        if arg:
            self._error(R_NO_ARGS)
            return
        if self._mail_from is None:
            self._error(b"503 5.5.1 Need MAIL command first")
            return
        if not self._rcpts:
            # RFC 2920 §3.1: after pipelined RCPTs that all failed.
            self._error(b"554 5.5.1 No valid recipients")
            return
        self._mode = DATA
        self._data = bytearray(b"\r\n")
        self._data_scanned = 0
        self._data_too_big = False
        self._send(b"354 End data with <CR><LF>.<CR><LF>")

    def _data_chunk(self, buf: bytearray) -> bool:
        """
        Move message bytes from *buf* into the message; True once the end
        of data was found (the rest of *buf* is commands again).

        RFC 5321 §4.1.1.4: only CRLF "." CRLF ends the data, so a bare CR
        or LF never ends or splits a message.  The whole chunk is handled
        at once, not line by line.
        """
        data = self._data
        start = len(data)
        data += buf
        end = data.find(b"\r\n.\r\n", max(0, self._data_scanned - 4))
        if end < 0:
            # Activity is a complete line (as for commands), so a client
            # that trickles bytes cannot hold the connection.
            if b"\n" in buf:
                self._touch()
            buf.clear()
            self._data_scanned = len(data)
            if len(data) > self.rt.server.max_message_size + _DATA_SLACK:
                # Too big already: keep only what the terminator search needs.
                self._data_too_big = True
                del data[:-4]
                self._data_scanned = len(data)
            return False
        self._touch()
        consumed = end + 5 - start  # bytes of buf up to and including "\r\n.\r\n"
        del buf[:consumed]
        del data[end + 2 :]
        self._end_data()
        return True

    def _end_data(self) -> None:
        self._mode = COMMAND
        sender, recipients = self._mail_from or "", self._rcpts
        self._reset_transaction()
        raw, self._data = self._data, bytearray()
        # RFC 5321 §4.5.2: remove the leading dot of every line (the CRLF
        # sentinel in front makes the first line no exception).
        body = bytes(raw).replace(b"\r\n.", b"\r\n")[2:]
        if self._data_too_big or len(body) > self.rt.server.max_message_size:
            self._send(b"552 5.3.4 Message size exceeds fixed limit")
            return
        mid = new_id()
        data = self._received_header(mid) + body
        message = Message(mid, sender, recipients, data, self.conn_meta.snapshot())
        delivery = self.delivery
        assert delivery is not None

        def stored(mid: str) -> None:
            size, n = len(message.data), len(message.recipients)
            self.rt.metrics.messages_spooled.inc()
            self.rt.metrics.bytes_spooled.inc(size)
            log.info(
                "{text}",
                text=f"spooled {mid} from {self.client} ({size} bytes, {n} recipients)",
                id=mid,
                client=self.client,
                size=size,
                n=n,
            )
            self._send(b"250 2.0.0 OK queued as " + mid.encode())

        def not_stored(f: Failure) -> None:
            self.rt.metrics.spool_errors.inc()
            if f.check(SpoolError):
                log.error("spool write failed: {reason}", reason=f.getErrorMessage())
            else:
                log.failure("delivering {id}", f, id=mid)
            self._send(b"451 4.3.0 Could not store message, try again later")

        def spool() -> None:
            self._wait(delivery.deliver(message), stored, not_stored)

        self._call_policy("smtp_server_message_received", (message, self.conn_meta), spool)

    def _received_header(self, mid: str) -> bytes:
        """
        RFC 5321 §4.4 trace header, with the RFC 3848 protocol type.
        """
        proto = "ESMTP" if self._esmtp else "SMTP"
        if self._esmtp:
            if self._secure:
                proto += "S"
            if self.authenticated:
                proto += "A"
        helo = self.conn_meta.get_meta("ehlo_domain") or "unknown"
        tls = ""
        if self._secure:
            version = self.conn_meta.get_meta("tls_protocol_version")
            cipher = self.conn_meta.get_meta("tls_cipher")
            if version:
                tls = f"\r\n\t(using {version} with cipher {cipher})"
        date = email.utils.format_datetime(datetime.now(UTC))
        return (
            f"Received: from {helo} ({self._ip_literal()})\r\n"
            f"\tby {self.rt.server.hostname} (kumoauth) with {proto} id {mid}{tls};\r\n"
            f"\t{date}\r\n"
        ).encode("utf-8", "replace")

    def _ip_literal(self) -> str:
        ip = self._ip
        return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"

    def _reset_transaction(self) -> None:
        self._mail_from = None
        self._rcpts = []

    # --- AUTH (RFC 4954) -------------------------------------------------

    def smtp_AUTH(self, arg: bytes) -> None:
        listener = self.listener
        if not self._secure and not listener.allow_plaintext_auth:
            self._error(b"538 5.7.11 Encryption required for requested authentication mechanism")
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
        words = arg.split(b" ")
        if not arg or len(words) > 2:
            self._error(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].decode("ascii", "replace").upper()
        if mechanism not in self.rt.auth.mechanisms:
            self._error(b"504 5.5.4 Unrecognized authentication type")
            return
        exchange = self._sasl = _SASLExchange(mechanism, self.rt.clock.seconds())
        initial = words[1] if len(words) == 2 else None
        if initial is None:
            self._mode = AUTH
            self._send(b"334 " if mechanism == "PLAIN" else b"334 " + sasl.LOGIN_USERNAME_PROMPT)
            return
        exchange.secrets.append(initial)
        self._sasl_step(initial)

    def _sasl_response(self, line: bytes) -> None:
        assert self._sasl is not None
        self._sasl.secrets.append(line)
        self._sasl_step(line)

    def _sasl_step(self, line: bytes) -> None:
        exchange = self._sasl
        assert exchange is not None
        try:
            data = sasl.decode_response(line)
            if exchange.mechanism == "PLAIN":
                plain = sasl.decode_plain(data)
                self._mode = COMMAND
                self._attempt(plain.authz, plain.authc, plain.password)
            elif exchange.username is None:
                exchange.username = sasl.decode_login_field(data, "username")
                self._mode = AUTH
                self._send(b"334 " + sasl.LOGIN_PASSWORD_PROMPT)
            else:
                password = sasl.decode_login_field(data, "password")
                self._mode = COMMAND
                self._attempt("", exchange.username, password)
        except sasl.SASLError as e:
            self._mode = COMMAND
            self._sasl_done(e.kind)
            self._error(e.reply)

    def _attempt(self, authz: str, authc: str, password: str) -> None:
        exchange = self._sasl
        assert exchange is not None
        exchange.secrets.append(password.encode("utf-8"))
        creds = PlainCredentials(authz, authc, password, self.conn_meta)
        exchange.authc, exchange.authz = creds.authc, creds.authz
        throttle = self.rt.throttle
        if throttle is None:
            self._check(exchange, creds)
            return

        def decide(reason: str | None) -> None:
            if reason is None:
                self._check(exchange, creds)
            else:
                self._throttled(reason)

        def store_failed(f: Failure) -> None:
            # Fail closed: without counters, brute force would be unlimited.
            log.failure("failure store unavailable", f)
            self._sasl_done("tempfail")
            self._send(R_TEMPFAIL_AUTH)

        self._wait(throttle.check(self._ip, creds.authc), decide, store_failed)

    def _throttled(self, reason: str) -> None:
        self._sasl_done("throttled", reason)
        self._send(b"454 4.7.0 Too many failed attempts or checks in progress, try later")

    def _check(self, exchange: _SASLExchange, creds: PlainCredentials) -> None:
        if not creds.authc or not creds.password:
            # SPEC §6: nothing to check; refused without calling the checker.
            self._auth_failed(exchange)
            return
        rt = self.rt
        if rt.in_flight >= rt.auth.max_in_flight:
            self._throttled("in_flight")
            return
        exchange.checked_at = rt.clock.seconds()
        rt.in_flight += 1
        d = rt.portal.login(creds, AuthContext(creds.authz, self.conn_meta), IMessageDelivery)

        def release(result: object) -> object:
            rt.in_flight -= 1
            return result

        d.addBoth(release)

        def success(result: tuple[Any, Delivery, Any]) -> None:
            self.delivery = result[1]
            self._sasl_done("success")
            self._send(b"235 2.7.0 Authentication successful")

        def failure(f: Failure) -> None:
            if f.check(cred_error.UnauthorizedLogin):
                self._auth_failed(exchange)
                return
            # Checker raised, its Deferred failed, non-bool, or timeout.
            log.error(
                "checker failed for authc={authc} from {client}: {error}\n{traceback}",
                authc=exchange.authc,
                client=self.client,
                error=scrub(f.getErrorMessage(), exchange.secrets),
                traceback=scrub(f.getTraceback(), exchange.secrets),
            )
            self._sasl_done("tempfail")
            self._send(R_TEMPFAIL_AUTH)

        self._wait(d, success, failure)

    def _auth_failed(self, exchange: _SASLExchange) -> None:
        """
        535 once ``failure_delay`` has passed since the attempt began (so a
        fast "no such user" and a slow "wrong password" look alike), or 421
        and close at ``max_failures``.
        """
        self._auth_failures += 1
        self._sasl_done("failure")
        if self.rt.throttle is not None and exchange.authc is not None:
            self.rt.throttle.failed(self._ip, exchange.authc).addErrback(
                lambda f: log.failure("recording a failed attempt", f)
            )
        clock = self.rt.clock
        wait = max(0.0, exchange.started + self.rt.auth.failure_delay - clock.seconds())

        def answer(_: object) -> None:
            if self._auth_failures >= self.rt.auth.max_failures:
                self._close(b"421 4.7.0 Too many authentication failures, closing connection")
            else:
                self._send(R_AUTH_FAILED)

        if wait > 0:
            self._wait(task.deferLater(clock, wait, lambda: None), answer, answer)
        else:
            answer(None)

    def _sasl_done(self, result: str, reason: str | None = None) -> None:
        """
        Emit the one auth log event of this attempt (SPEC §9) and forget it.
        """
        exchange, self._sasl = self._sasl, None
        if exchange is None:
            return
        metrics = self.rt.metrics
        metrics.auth_attempts.labels(exchange.mechanism, result).inc()
        if reason:
            metrics.throttle_hits.labels(reason).inc()
        latency = 0.0
        if exchange.checked_at is not None:
            latency = self.rt.clock.seconds() - exchange.checked_at
            metrics.checker_latency.observe(latency)
        listener = self.listener.endpoint
        # The text is built here with an f-string: formatting a many-field
        # format string through twisted.logger costs 4x more, per attempt.
        # The fields stay in the event for JSON observers.
        text = (
            f"AUTH {exchange.mechanism} {result} authc={exchange.authc} "
            f"authz={exchange.authz} client={self.client} listener={listener} "
            f"checker_latency={latency:.3f}s"
        )
        if reason:
            text += f" reason={reason}"
        auth_log.info(
            "{text}",
            text=text,
            mechanism=exchange.mechanism,
            result=result,
            authc=exchange.authc,
            authz=exchange.authz,
            client=self.client,
            listener=listener,
            checker_latency=latency,
            reason=reason,
        )
        exchange.secrets.clear()


class _SASLExchange:
    """
    One AUTH attempt in progress.  ``secrets`` holds what must be scrubbed
    from anything logged about it.
    """

    __slots__ = ("mechanism", "started", "checked_at", "username", "authc", "authz", "secrets")

    def __init__(self, mechanism: str, started: float) -> None:
        self.mechanism = mechanism
        self.started = started
        self.checked_at: float | None = None
        self.username: str | None = None
        self.authc: str | None = None
        self.authz: str | None = None
        self.secrets: list[bytes] = []


_COMMANDS: dict[str, Callable[[SubmissionProtocol, bytes], None]] = {
    name[len("smtp_") :]: getattr(SubmissionProtocol, name)
    for name in dir(SubmissionProtocol)
    if name.startswith("smtp_")
}


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
