"""
Twisted Cred for SMTP AUTH (SPEC §5): credentials, checkers and the realm.

The protocol builds :class:`PlainCredentials` for each attempt and hands them
to a :class:`~twisted.cred.portal.Portal`.  Every checker in that portal
speaks :class:`IPlainCredentials`:

- :class:`PolicyChecker` wraps the policy's ``smtp_server_auth_plain``;
- :class:`UsernamePasswordChecker` wraps any stock ``IUsernamePassword``
  checker (``FilePasswordDB``, strcred's ``memory:`` and ``file:``, …) and
  refuses a proxy authorization (authz ≠ authc) it cannot judge.

The realm hands back a :class:`~kumoauth.storage.delivery.Delivery` avatar carrying
``authn_id``, ``authz_id`` and conn_meta into every message.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from twisted.cred import error
from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from kumoauth.auth.mechanisms import BearerResult
from kumoauth.auth.sasl import SASLError, prepare_name
from kumoauth.meta import ConnMeta
from kumoauth.policy import Handler, Invoke, invoke
from kumoauth.storage.delivery import Delivery, IMessageDelivery, Store


class IPlainCredentials(IUsernamePassword):
    """
    The credentials of one SASL PLAIN or LOGIN attempt.

    As an ``IUsernamePassword``, ``username`` is authc and ``password`` the
    password, both UTF-8 bytes, so stock checkers work unchanged.
    """

    authz = Attribute("Authorization identity (str); authc when the client sent none.")
    authc = Attribute("Authentication identity (str).")
    conn_meta = Attribute("The connection's ConnMeta.")

    def password_text() -> str:
        """
        The password as str, for checkers that want text.
        """


@implementer(IPlainCredentials)
class PlainCredentials:
    __slots__ = ("authz", "authc", "username", "password", "conn_meta")

    def __init__(self, authz: str, authc: str, password: str, conn_meta: ConnMeta) -> None:
        self.authc = authc
        self.authz = authz or authc  # SPEC §1: empty authz means authc
        self.username = authc.encode("utf-8")
        self.password = password.encode("utf-8")
        self.conn_meta = conn_meta

    def password_text(self) -> str:
        return self.password.decode("utf-8")

    def checkPassword(self, password: bytes | str) -> bool:
        """
        Constant-time comparison (``hmac.compare_digest``), so the reply time
        does not tell how much of a guess was right.
        """
        if isinstance(password, str):
            password = password.encode("utf-8")
        return hmac.compare_digest(self.password, password)

    def __repr__(self) -> str:
        return f"<PlainCredentials authz={self.authz!r} authc={self.authc!r} password=<hidden>>"


class IBearerCredentials(Interface):
    """
    The credentials of one XOAUTH2 or OAUTHBEARER attempt.  Not an
    ``IUsernamePassword``: no password checker may ever see a token.
    """

    authz = Attribute(
        "The identity asked for (str, may be empty); once the token is "
        "verified, the identity the session acts as."
    )
    authc = Attribute("The identity asked for, for throttles and the log (str, may be empty).")
    token = Attribute("The bearer token (str).")
    password = Attribute("The token as bytes: fingerprints and log scrubbing treat it as a secret.")
    conn_meta = Attribute("The connection's ConnMeta.")


@implementer(IBearerCredentials)
class BearerCredentials:
    __slots__ = ("authz", "authc", "token", "password", "conn_meta", "refusal")

    def __init__(self, authz: str, token: str, conn_meta: ConnMeta) -> None:
        self.authz = authz
        self.authc = authz
        self.token = token
        self.password = token.encode("ascii")
        self.conn_meta = conn_meta
        #: the RFC 7628 error a refusal after the checker sends (a locked
        #: user's good token), set by the checker that accepted the token
        self.refusal: bytes | None = None

    def __repr__(self) -> str:
        return f"<BearerCredentials authz={self.authz!r} token=<hidden>>"


def credentials_for(
    result: Any, conn_meta: ConnMeta, account: Callable[[str], str] | None = None
) -> Any:
    """
    The Cred credentials for a finished SASL exchange, with the names
    prepared (SASLprep, RFC 4616 §2) before any checker, log or meta sees
    them, then made account names by *account* (``[auth] username_format``
    and ``default_realm``: :mod:`kumoauth.auth.names`) if given.  Raises
    :class:`~kumoauth.auth.sasl.SASLError` for a name SASLprep refuses.
    """
    if isinstance(result, BearerResult):
        return BearerCredentials(prepare_name(result.authz, "authzid"), result.token, conn_meta)
    authz, authc = login_names(result.authz, result.authc, account)
    return PlainCredentials(authz, authc, result.password, conn_meta)


def login_names(
    authz: str, authc: str, account: Callable[[str], str] | None = None
) -> tuple[str, str]:
    """
    *authz* and *authc* as every checker, log and meta sees them: prepared
    (SASLprep), then made account names by *account* if given.  A session
    and ``kumoauth auth test`` both take names through here.
    """
    authc = prepare_name(authc, "authcid")
    authz = prepare_name(authz, "authzid")
    if account is None:
        return authz, authc
    named = account(authz), account(authc)
    if authc and not named[1]:
        raise SASLError(
            b"501 5.5.2 authcid is empty after username_format",
            "authcid is empty after username_format",
        )
    return named


class CheckerError(Exception):
    """
    The checker failed (not "wrong password"): the client gets 454.
    """


class BackendUnavailable(CheckerError):
    """
    The credential store could not answer and has logged why itself (one
    line per change of its state): 454, and no traceback per attempt.
    """


@implementer(ICredentialsChecker)
class PolicyChecker:
    """
    The policy's ``smtp_server_auth_plain(authz, authc, password, conn_meta)``
    as a Cred checker.  Sync, Deferred and coroutine handlers alike; the
    result must be a ``bool`` and arrive within *timeout* seconds.
    """

    credentialInterfaces = (IPlainCredentials,)

    def __init__(
        self, handler: Handler, timeout: float, clock: IReactorTime, invoke: Invoke = invoke
    ) -> None:
        self.handler = handler
        self.timeout = timeout
        self.clock = clock
        self.invoke = invoke

    def requestAvatarId(self, credentials: IPlainCredentials) -> defer.Deferred[Any]:
        try:
            result = self.invoke(
                self.handler,
                credentials.authz,
                credentials.authc,
                credentials.password_text(),
                credentials.conn_meta,
            )
        except Exception:
            return defer.fail(Failure())
        d = result if isinstance(result, defer.Deferred) else defer.succeed(result)
        if isinstance(result, defer.Deferred):
            d.addTimeout(self.timeout, self.clock)

        def decide(ok: object) -> str:
            if ok is True:
                return str(credentials.authc)
            if ok is False:
                raise error.UnauthorizedLogin()
            raise CheckerError(f"smtp_server_auth_plain returned {type(ok).__name__}, not bool")

        return d.addCallback(decide)


@implementer(ICredentialsChecker)
class UsernamePasswordChecker:
    """
    Adapt a checker that only knows ``IUsernamePassword``.  It cannot judge
    whether authc may act as a different authz, so such attempts fail
    (SPEC §5).
    """

    credentialInterfaces = (IPlainCredentials,)

    def __init__(self, inner: ICredentialsChecker) -> None:
        self.inner = inner

    def requestAvatarId(self, credentials: IPlainCredentials) -> defer.Deferred[Any]:
        if credentials.authz != credentials.authc:
            return defer.fail(error.UnauthorizedLogin())
        return defer.maybeDeferred(self.inner.requestAvatarId, credentials)


def normalize_checker(checker: ICredentialsChecker) -> ICredentialsChecker:
    """
    Make any checker speak ``IPlainCredentials``.

    strcred's ``memory:`` stores str user names and passwords while every
    other stock checker (``FilePasswordDB``) uses bytes, as
    ``IUsernamePassword`` says; we convert the former so both work.
    """
    if IPlainCredentials in getattr(checker, "credentialInterfaces", ()):
        return checker
    if not any(
        issubclass(IPlainCredentials, i) or i is IUsernamePassword
        for i in getattr(checker, "credentialInterfaces", ())
    ):
        raise TypeError(
            f"{type(checker).__name__} accepts neither IPlainCredentials nor IUsernamePassword"
        )
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {_b(name): _b(password) for name, password in checker.users.items()}
    return UsernamePasswordChecker(checker)


def _b(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


class AuthContext:
    """
    The *mind* passed to ``Portal.login``: what the realm needs besides the
    avatar id to build the session's delivery avatar.  With *credentials*,
    authz is read from them when the realm asks (a bearer checker sets it
    once the token names the user).
    """

    __slots__ = ("_authz", "conn_meta", "credentials")

    def __init__(self, authz: str, conn_meta: ConnMeta, credentials: Any = None) -> None:
        self._authz = authz
        self.conn_meta = conn_meta
        self.credentials = credentials

    @property
    def authz(self) -> str:
        if self.credentials is not None:
            return str(self.credentials.authz)
        return self._authz


class AccountLocked(error.UnauthorizedLogin):
    """The user is in ``[auth] locked_users``: answered as a wrong password."""

    def __init__(self, user: str) -> None:
        super().__init__(user)
        self.user = user


@implementer(IRealm)
class SubmissionRealm:
    """
    Gives each authenticated session an ``IMessageDelivery`` avatar that
    stamps ``authn_id`` and ``authz_id`` on its conn_meta and stores
    messages with *store* (the spool).  A user *locked*
    (:class:`kumoauth.auth.locked.LockedUsers`) gets no avatar: the checker
    said yes, the session is told no, and nothing is stamped.
    """

    def __init__(self, store: Store | None = None, locked: Any = None) -> None:
        self.store = store
        self.locked = locked

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> tuple[Any, Delivery, Any]:
        assert isinstance(mind, AuthContext)
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("SubmissionRealm only provides IMessageDelivery")
        authn = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        credentials = mind.credentials
        login = getattr(credentials, "authc", None)
        if self.locked is not None and (name := self.locked.which(authn, login)):
            raise AccountLocked(name)
        authz = mind.authz
        proxied = getattr(avatarId, "authz", None)
        if isinstance(proxied, str) and proxied:
            # the store resolved a proxy login: the target it named
            authz = proxied
        elif credentials is not None and authz == credentials.authc:
            # No other identity asked for: the account's own name, as the
            # store spells it (Dovecot's user= for "Alice"), not the login's.
            authz = authn
        delivery = Delivery(mind.conn_meta, authn, authz, self.store, login)
        return IMessageDelivery, delivery, delivery.logout


@implementer(ICredentialsChecker)
class CheckerChain:
    """
    Several checkers tried in order (``--auth a --auth b``), as Dovecot tries
    its passdbs: the first that says yes wins; "no" from one passes the
    attempt to the next; an error in one (a backend down) is remembered and
    the next is tried.  At the end: an error if any checker failed and none
    said yes (454, so a user of the broken backend is not told their
    password is wrong), else ``UnauthorizedLogin`` (535).
    """

    credentialInterfaces = (IPlainCredentials,)

    def __init__(self, checkers: list[ICredentialsChecker]) -> None:
        self.checkers = checkers

    async def _check(self, credentials: IPlainCredentials) -> Any:
        error_seen: Failure | None = None
        for checker in self.checkers:
            try:
                return await defer.maybeDeferred(checker.requestAvatarId, credentials)
            except error.UnauthorizedLogin:
                continue
            except defer.CancelledError:
                raise
            except Exception:
                error_seen = error_seen or Failure()
        if error_seen is not None:
            error_seen.raiseException()
        raise error.UnauthorizedLogin()

    def requestAvatarId(self, credentials: IPlainCredentials) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._check(credentials))


def make_portal(
    checkers: list[ICredentialsChecker],
    store: Store | None = None,
    wrap: Callable[[ICredentialsChecker], ICredentialsChecker] | None = None,
    bearer: ICredentialsChecker | None = None,
    locked: Any = None,
) -> Portal:
    """
    The portal over *checkers*, each made to speak ``IPlainCredentials``;
    *wrap* goes around the result (the verified-credential cache).  The
    *bearer* checker (``[auth.oauth]``) answers ``IBearerCredentials``: it
    is neither chained nor cached (a token's validity is its own clock).
    """
    normalized = [normalize_checker(c) for c in checkers]
    if len(normalized) > 1:
        # A Portal keeps one checker per credentials interface: several
        # become one chain, or all but the last would be ignored.
        normalized = [CheckerChain(normalized)]
    if wrap is not None and normalized:
        normalized = [wrap(normalized[0])]
    if bearer is not None:
        normalized.append(bearer)
    return Portal(SubmissionRealm(store, locked), normalized)
