"""
Helpers for testing kumoauth policies without a network.

Call one handler with a ready-made conn_meta::

    from kumoauth.testing import call_event, conn_meta, load_policy

    policy = load_policy("etc/policy.py")
    assert call_event(policy, "smtp_server_auth_plain", "", "scott", "tiger", conn_meta())

Or run a whole in-memory SMTP session against a policy (the real protocol,
the real Cred portal and a real spool in a directory you give, driven
through Twisted's ``StringTransport`` and a fake ``Clock``)::

    from kumoauth.testing import Session

    s = Session(policy, spool_dir=tmp_path)
    s.command("EHLO client.example")
    assert s.command("AUTH PLAIN " + plain_b64("", "scott", "tiger")).startswith("235")

The session's listener is an implicit-TLS one by default: the protocol is
told TLS is up from the first byte (no real TLS is performed in memory), so
AUTH is offered.  Use ``tls="starttls"`` to test the STARTTLS dialogue.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import address, defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from kumoauth.auth.cred import PolicyChecker, make_portal
from kumoauth.auth.throttle import MemoryFailureStore, Throttle
from kumoauth.config import AuthConfig, LimitsConfig, ListenerConfig, ServerConfig
from kumoauth.meta import ConnMeta
from kumoauth.policy import Policy, Reject, invoke, load_policy
from kumoauth.smtp.limits import SendingLimits
from kumoauth.smtp.protocol import SubmissionFactory, SubmissionProtocol
from kumoauth.smtp.runtime import ProcessState, Runtime
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import Spool, SpooledMessage, release_store
from kumoauth.stores.memory import MemoryStore

__all__ = [
    "Reject",
    "Session",
    "TLSStringTransport",
    "call_event",
    "conn_meta",
    "load_policy",
    "login_b64",
    "plain_b64",
]


def conn_meta(**values: Any) -> ConnMeta:
    """
    A conn_meta with the preset keys of a connection from 127.0.0.1 to a
    STARTTLS listener after EHLO and TLS; keyword arguments add or replace.
    """
    preset: dict[str, Any] = {
        "reception_protocol": "ESMTP",
        "received_from": "127.0.0.1:50000",
        "received_via": "127.0.0.1:587",
        "hostname": "mail.example.com",
        "ehlo_domain": "client.example",
        "tls_cipher": "TLS_AES_128_GCM_SHA256",
        "tls_protocol_version": "TLSv1.3",
    }
    preset.update(values)
    return ConnMeta(preset)


def call_event(policy: Policy, event: str, *args: Any) -> Any:
    """
    Call *policy*'s handler for *event* and return its result.  A Deferred or
    coroutine must have finished by the time it returns (use
    ``Session`` with its ``clock`` for handlers that wait on time); a
    ``kumo.reject`` propagates as :class:`~kumoauth.policy.Reject`.
    """
    handler = policy.handler(event)
    if handler is None:
        raise LookupError(f"the policy has no handler for {event!r}")
    result = invoke(handler, *args)
    if not isinstance(result, defer.Deferred):
        return result
    box: list[Any] = []
    result.addBoth(box.append)
    if not box:
        raise RuntimeError(f"{event} handler has not finished (it waits on something)")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def plain_b64(authz: str, authc: str, password: str) -> str:
    """
    The base64 SASL PLAIN initial response for these identities.
    """
    raw = b"\x00".join(s.encode() for s in (authz, authc, password))
    return base64.b64encode(raw).decode("ascii")


def login_b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


class TLSStringTransport(StringTransport):
    """
    A ``StringTransport`` that accepts ``startTLS`` and records it.  No TLS
    is performed: after the call the session is simply told it is secure.
    """

    def __init__(self, peer: Any = None, host: Any = None) -> None:
        super().__init__(hostAddress=host, peerAddress=peer)
        self.tls_started = False

    #: called once "TLS" is up (the in-memory handshake completes at once)
    on_tls: Any = None

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_started = True
        if self.on_tls is not None:
            self.on_tls()


class Session:
    """
    One in-memory SMTP session against a policy.

    ``command(line)`` sends a line and returns what the server answered to
    it (as text); ``send(raw)`` sends raw bytes.  ``clock`` is the fake
    clock (``clock.advance(seconds)`` for failure delays and timeouts),
    ``spool`` the spool in *spool_dir*, ``meta`` the connection's conn_meta.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        spool_dir: Path | str,
        tls: str = "implicit",
        auth_required: bool = True,
        allow_plaintext_auth: bool = False,
        listener_meta: dict[str, Any] | None = None,
        server: ServerConfig | None = None,
        auth: AuthConfig | None = None,
        checkers: Iterable[ICredentialsChecker] | None = None,
        client: tuple[str, int] = ("127.0.0.1", 50000),
        clock: Clock | None = None,
        runtime: Runtime | None = None,
        connect: bool = True,
        limits: LimitsConfig | None = None,
        limits_store: Any = None,
        bearer: ICredentialsChecker | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.spool = Spool(spool_dir)
        self.spool.create()
        if runtime is None:
            policy = policy or Policy()
            auth = auth or AuthConfig(failure_delay=0.0)
            if checkers is None:
                handler = policy.handler("smtp_server_auth_plain")
                checkers = [PolicyChecker(handler, auth.timeout, self.clock)] if handler else []
            store = self._store
            process = ProcessState(
                clock=self.clock, store=store, tls=_NO_TLS if tls != "none" else None
            )
            sending_limits = None
            if limits is not None:
                sending_limits = SendingLimits(
                    limits_store if limits_store is not None else MemoryStore(self.clock),
                    limits,
                    process.limits_store_state,
                    process.log_limiter,
                    process.metrics,
                    policy,
                    invoke,
                )
            runtime = Runtime(
                process=process,
                server=server or ServerConfig(hostname="mail.example.com"),
                auth=auth,
                policy=policy,
                portal=make_portal(
                    list(checkers), store, bearer=bearer, locked=process.locked_users
                ),
                throttle=Throttle(MemoryFailureStore(self.clock), auth.throttle),
                sending_limits=sending_limits,
            )
        self.runtime = runtime
        listener = ListenerConfig(
            endpoint="tcp:587",
            tls=tls,
            auth_required=auth_required,
            allow_plaintext_auth=allow_plaintext_auth,
            meta=listener_meta or {},
        )
        self.factory = SubmissionFactory(listener, runtime)
        self.transport = TLSStringTransport(
            peer=address.IPv4Address("TCP", *client),
            host=address.IPv4Address("TCP", "127.0.0.1", 587),
        )
        protocol = self.factory.buildProtocol(self.transport.getPeer())
        assert isinstance(protocol, SubmissionProtocol)
        self.protocol: SubmissionProtocol = protocol
        # No real handshake happens in memory: it is complete at once (the
        # TLS parameters stay absent from conn_meta).
        self.transport.on_tls = protocol._cancel_handshake_timer
        self.banner: str = ""
        self._lost: bool = False
        if connect:
            self.connect()

    def _store(self, message: Message) -> defer.Deferred[str]:
        # The real spool, written synchronously: in memory there is no
        # reactor thread to keep free.
        return defer.maybeDeferred(self.spool.write, message)

    def connect(self) -> str:
        self.protocol.makeConnection(self.transport)
        self.protocol._cancel_handshake_timer()
        self.banner = self.output()
        return self.banner

    @property
    def meta(self) -> ConnMeta:
        return self.protocol.conn_meta

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def output(self) -> str:
        """
        Everything the server wrote since the last call, as text.
        """
        data = self.transport.value()
        self.transport.clear()
        return data.decode("utf-8", "replace")

    def send(self, raw: bytes | str) -> str:
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        self.protocol.dataReceived(raw)
        return self.output()

    def command(self, line: str | bytes) -> str:
        if isinstance(line, str):
            line = line.encode("utf-8")
        return self.send(line + b"\r\n")

    def messages(self) -> list[SpooledMessage]:
        return list(self.spool)

    def close(self) -> None:
        """
        End the connection as the client would (the protocol sees
        ``connectionLost``).
        """
        if not self._lost:
            self._lost = True
            self.transport.loseConnection()
            self.protocol.connectionLost(Failure(error.ConnectionDone()))
            release_store(self.spool.path)


class _NoTLS:
    """
    Stands in for the server TLS context in memory: STARTTLS is recorded by
    :class:`TLSStringTransport`, never performed.
    """

    def getContext(self) -> None:
        return None


_NO_TLS: Any = _NoTLS()
