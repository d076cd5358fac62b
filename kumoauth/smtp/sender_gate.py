"""
Sender binding at the two places the protocol asks (``[sender_binding]``):
the envelope sender at ``MAIL FROM`` and the From:/Sender: addresses at
the end of ``DATA``.  The engine (:mod:`kumoauth.auth.senders`) says
whether *authz* may use an address and by which rule; this module turns
that into replies, log events, metrics and the policy's say:

``smtp_server_sender_binding(authz, sender, allowed, conn_meta)`` (sync,
Deferred or async) runs for every decision: ``True`` allows, ``False``
refuses, ``None`` keeps the engine's answer.  It runs before the policy's
own ``smtp_server_mail_from``, which can still refuse what was allowed.

Replies: ``553 5.7.1 Sender address rejected: not owned by user <authz>``
at MAIL FROM; ``550 5.7.1`` with the same text at the end of DATA (nothing
stored); ``451 4.7.1`` when the store behind the binding cannot answer,
never an open pass; the outage is logged once when it starts and once when
the store answers again (the engine's ``state``), not at every command.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumoauth.ops.deadline import deadline
from kumoauth.ops.threads import QueueFull
from kumoauth.textsafe import escape

log = Logger(namespace="kumoauth.auth")

R_LOOKUP_DOWN = b"451 4.7.1 Cannot verify the sender address now, try again later"


def _refusal(code: bytes, authz: str) -> bytes:
    # The user is the client's own identity; escaped like any client value.
    name = escape(authz, 200).encode("utf-8", "replace")
    return code + b" 5.7.1 Sender address rejected: not owned by user <" + name + b">"


class SenderGate:
    def __init__(
        self,
        binding: Any,
        policy: Any,
        invoke: Any,
        metrics: Any,
        timeout: float,
        clock: Any,
    ) -> None:
        self.binding = binding
        self.policy = policy
        self.invoke = invoke
        self.metrics = metrics
        self.timeout = timeout
        self.clock = clock
        # The engine's module, loaded only when [sender_binding] is
        # configured (the protocol imports this module in any case).
        from kumoauth.auth import senders

        self._senders = senders

    @property
    def check_headers(self) -> bool:
        return bool(self.binding.config.check_header_from)

    @property
    def _consequence(self) -> str:
        # What an outage means for clients, in its log line.
        if self.check_headers:
            return "MAIL FROM and the end of DATA get 451 4.7.1"
        return "MAIL FROM gets 451 4.7.1"

    def envelope(self, authz: str, sender: str, conn_meta: Any) -> defer.Deferred[bytes | None]:
        """
        None when *authz* may use *sender* (``""``: the null sender) in MAIL
        FROM, else the reply.
        """
        return defer.Deferred.fromCoroutine(self._decide(authz, [sender], conn_meta, "envelope"))

    def headers(
        self, authz: str, body: bytes | bytearray, smtputf8: bool, conn_meta: Any
    ) -> defer.Deferred[bytes | None]:
        """
        None when every address the message's Sender: (or else From:)
        header names is *authz*'s, else the reply.
        """
        limit = self._senders.MAX_HEADER_BYTES
        end = body.find(b"\r\n\r\n", 0, limit + 4)
        if end >= 0:
            head = bytes(body[: end + 4])
        elif len(body) <= limit:
            head = bytes(body) + b"\r\n\r\n"
        else:
            head = bytes(body[: limit + 1])  # header_addresses says it is too large
        # The stdlib's header parser is slow on crafted fields (tens of ms
        # for a few KiB): never on the reactor thread.  In a thread of its
        # own, not behind the checks (a hung store holds all of those);
        # behind other headers' parses at most as long as a lookup's wait.
        parsed = deadline(
            self.binding.parse_pool.call(self._senders.header_addresses, head, smtputf8),
            self.timeout,
            self.clock,
            self._not_parsed,
        )

        def check(addresses: list[str] | None) -> Any:
            self.binding.parse_state.succeeded()
            if not addresses:
                return None
            return defer.Deferred.fromCoroutine(self._decide(authz, addresses, conn_meta, "header"))

        def busy(f: Failure) -> bytes:
            f.trap(QueueFull, self._senders.SenderLookupError)
            self.binding.parse_state.failed(f.getErrorMessage(), "the end of DATA gets 451 4.7.1")
            self.metrics.sender_binding.labels("header", "error").inc()
            return R_LOOKUP_DOWN

        return parsed.addCallbacks(check, busy)

    def undecided(self, seconds: float, where: str) -> bytes:
        """
        The reply when the whole decision (lookups, the policy's say, the
        header's parse) took longer than the session waits: as a store
        outage, one state line, not a traceback per message.
        """
        return self._cannot_verify(f"no decision within {seconds:g} s", where)

    def _cannot_verify(self, reason: str, where: str) -> bytes:
        # One line when this starts, one when a lookup succeeds again.
        self.binding.state.failed(reason, self._consequence)
        self.metrics.sender_binding.labels(where, "error").inc()
        return R_LOOKUP_DOWN

    def _not_parsed(self, result: Any, seconds: float) -> Any:
        raise self._senders.SenderLookupError(f"not parsed within {seconds:g} s")

    async def _decide(
        self, authz: str, addresses: list[str], conn_meta: Any, where: str
    ) -> bytes | None:
        # The store's answers share one deadline ([policy] timeout; the
        # policy handler's time is its own): a store still silent then is
        # down (one state line, 451 4.7.1), not a traceback per command.
        waited = 0.0
        for address in addresses:
            decision = self.binding.shortcut(authz, address)
            if decision is None:
                asked = self.clock.seconds()
                lookup = deadline(
                    self.binding.lookup(authz, address),
                    max(0.0, self.timeout - waited),
                    self.clock,
                    self._silent,
                )
                try:
                    decision = await lookup
                except self._senders.SenderLookupError as e:
                    # One line when the store goes down, not one per command.
                    return self._cannot_verify(str(e), where)
                finally:
                    waited += self.clock.seconds() - asked
                self.binding.state.succeeded()
            allowed = await self._policy(authz, address, decision.allowed, conn_meta)
            if not allowed:
                log.info(
                    "sender binding: user {user} may not send as {address} ({where}; {rule})",
                    user=escape(authz),
                    address=escape(address or "<>"),
                    where=where,
                    rule=escape(decision.rule, 200),
                )
                self.metrics.sender_binding.labels(where, "refused").inc()
                return _refusal(b"553" if where == "envelope" else b"550", authz)
        self.metrics.sender_binding.labels(where, "allowed").inc()
        return None

    def _silent(self, result: Any, seconds: float) -> Any:
        kind = self.binding.source.kind
        raise self._senders.SenderLookupError(f"{kind}: no answer within {self.timeout:g} s")

    async def _policy(self, authz: str, address: str, allowed: bool, conn_meta: Any) -> bool:
        handler = self.policy.handler("smtp_server_sender_binding") if self.policy else None
        if handler is None:
            return allowed
        result = self.invoke(handler, authz, address, allowed, conn_meta)
        if isinstance(result, defer.Deferred):
            result = await deadline(result, self.timeout, self.clock, _handler_late)
        if result is None:
            return allowed
        if not isinstance(result, bool):
            raise TypeError(
                f"smtp_server_sender_binding returned {type(result).__name__}, not bool or None"
            )
        return result


class HandlerTimeout(Exception):
    """
    ``smtp_server_sender_binding`` did not answer within ``[policy]
    timeout``: the policy's problem, told in one line like any handler's.
    """


def _handler_late(result: Any, seconds: float) -> Any:
    raise HandlerTimeout(
        f"policy handler smtp_server_sender_binding did not answer within {seconds:g}s"
    )


def failed_reply(f: Failure) -> bytes:
    """
    A bug in the gate (or the policy handler failing or silent): logged,
    451.
    """
    if f.check(HandlerTimeout):
        log.error("{error}", error=str(f.value))
    else:
        log.failure("sender binding failed", f)
    return b"451 4.3.0 Internal error, try again later"
