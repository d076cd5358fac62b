"""
Delivery: what the Cred realm hands a session (its avatar), and the message
a session submits.

kumoauth defines its own ``IMessageDelivery`` rather than reusing
``twisted.mail.smtp.IMessageDelivery``: that one feeds a message to the
avatar line by line (one Python call per line) and has no notion of
conn_meta; ours takes the whole message once DATA is complete, which is
what a durable spool needs.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from kumoauth.meta import ConnMeta, Meta


class Message(Meta):
    """
    A message at the end of DATA, as given to ``smtp_server_message_received``.

    ``get_meta``/``set_meta`` work on the message's own meta, which starts
    as a snapshot of conn_meta.  ``dsn`` is what the client asked of the
    DSN extension (RFC 3461), as :func:`kumoauth.smtp.dsnparams.stored`
    made it, or None.
    """

    __slots__ = ("sender", "recipients", "data", "id", "dsn", "_headers")

    def __init__(
        self, id: str, sender: str, recipients: list[str], data: bytes, meta: dict[str, Any]
    ) -> None:
        super().__init__(meta)
        self.id = id
        self.sender = sender
        self.recipients = list(recipients)
        self.data = data
        self.dsn: dict[str, Any] | None = None
        self._headers: EmailMessage | None = None

    @property
    def headers(self) -> EmailMessage:
        """
        The parsed header section (``email.message.EmailMessage``), parsed on
        first use.
        """
        if self._headers is None:
            parser = email.parser.BytesHeaderParser(policy=email.policy.SMTP)
            self._headers = parser.parsebytes(self.data)  # type: ignore[assignment]
        assert self._headers is not None
        return self._headers

    def __repr__(self) -> str:
        return f"<Message {self.id} from={self.sender!r} to={self.recipients!r}>"


class IMessageDelivery(Interface):
    """
    A session's avatar: accepts the messages the session submits.
    """

    authn_id = Attribute("The authenticated identity (str), or None.")
    authz_id = Attribute("The authorized identity (str), or None.")
    conn_meta = Attribute("The connection's ConnMeta.")

    def deliver(message: Message) -> defer.Deferred[str]:
        """
        Store *message* durably; fire with its id once it is on disk.
        """

    def logout() -> None:
        """
        The session is over.
        """


Store = Callable[[Message], "defer.Deferred[str]"]


@implementer(IMessageDelivery)
class Delivery:
    """
    The avatar: stamps the session's identities on conn_meta and passes each
    message to the spool (*store*).
    """

    __slots__ = ("conn_meta", "authn_id", "authz_id", "store", "login")

    def __init__(
        self,
        conn_meta: ConnMeta,
        authn_id: str | None = None,
        authz_id: str | None = None,
        store: Store | None = None,
        login: str | None = None,
    ) -> None:
        self.conn_meta = conn_meta
        self.authn_id = authn_id
        self.authz_id = authz_id
        self.store = store
        #: the name the session logged in with (authcid, after
        #: username_format), where the store named the account otherwise
        self.login = login
        if authn_id is not None:
            conn_meta.set_meta("authn_id", authn_id)
            conn_meta.set_meta("authz_id", authz_id or authn_id)

    def deliver(self, message: Message) -> defer.Deferred[str]:
        if self.store is None:
            return defer.fail(RuntimeError("this delivery has no store"))
        if self.authn_id is not None:
            # The message meta is the conn_meta snapshot; a handler may have
            # changed it, but never the identities the checker established.
            message.set_meta("authn_id", self.authn_id)
            message.set_meta("authz_id", self.authz_id or self.authn_id)
        return self.store(message)

    def logout(self) -> None:
        self.store = None
