"""
The Cred checker for bearer tokens (XOAUTH2, OAUTHBEARER; ``[auth.oauth]``).
Imported only when ``[auth.oauth]`` is configured (it loads the JOSE
library through the validator).

The token goes to the validator (:mod:`kumoauth.backends.oauth`: signature
against the IdP's JWKS, issuer, audience, times, or RFC 7662
introspection).  A valid token names the user in its ``username_claim``,
which becomes ``authn_id``; the identity the client asked for (``user=`` /
``a=``, prepared with SASLprep like a PLAIN name) becomes ``authz_id`` and
must be that user, unless the policy decides otherwise:

``smtp_server_auth_oauth(authz, claims, conn_meta)`` (sync, Deferred or
async) runs for every valid token: ``False`` refuses it, ``True`` accepts
it even when *authz* is not the token's user (delegation the policy
vouches for), ``None`` leaves the rule above; it may add meta (a tenant
from a claim).  A refused token fails with :class:`BearerRefused`, whose
``challenge`` the protocol sends as the RFC 7628 §3.2.2 error before
``535``.  Only the reason and the token's ``sub``/``jti`` are logged.
"""

from __future__ import annotations

from typing import Any

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from kumoauth.auth.cred import BackendUnavailable, IBearerCredentials
from kumoauth.auth.sasl import SASLError, prepare_name
from kumoauth.backends.base import BackendError
from kumoauth.backends.oauth import InvalidToken
from kumoauth.textsafe import escape, field_value

log = Logger(namespace="kumoauth.auth.oauth")


class BearerRefused(error.UnauthorizedLogin):
    """
    A token that is not accepted; *challenge* is the error JSON.
    """

    def __init__(self, challenge: bytes, reason: str) -> None:
        super().__init__(reason)
        self.challenge = challenge
        self.reason = reason


@implementer(ICredentialsChecker)
class BearerChecker:
    credentialInterfaces = (IBearerCredentials,)

    def __init__(
        self,
        validator: Any,
        username_claim: str,
        handler: Any = None,
        invoke: Any = None,
        timeout: float = 10.0,
        clock: Any = None,
    ) -> None:
        self.validator = validator
        self.username_claim = username_claim
        self.handler = handler
        self.invoke = invoke
        self.timeout = timeout
        self.clock = clock

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._check(credentials))

    def _refuse(self, credentials: Any, reason: str, claims: dict[str, Any] | None = None) -> Any:
        claims = claims or {}
        log.info(
            "OAuth token refused for {client}: {reason} (sub={sub} jti={jti})",
            client=escape(credentials.conn_meta.get_meta("received_from") or "?"),
            reason=escape(reason, 200),
            sub=field_value(claims.get("sub"), 100) if claims.get("sub") is not None else "-",
            jti=field_value(claims.get("jti"), 100) if claims.get("jti") is not None else "-",
        )
        return BearerRefused(self.validator.error_json(InvalidToken(reason)), reason)

    async def _check(self, credentials: Any) -> Any:
        try:
            claims = await self.validator.validate(credentials.token)
        except InvalidToken as e:
            log.info(
                "OAuth token refused for {client}: {reason} (sub={sub} jti={jti})",
                client=escape(credentials.conn_meta.get_meta("received_from") or "?"),
                reason=escape(e.reason, 200),
                sub=field_value(e.sub, 100) if getattr(e, "sub", None) else "-",
                jti=field_value(e.jti, 100) if getattr(e, "jti", None) else "-",
            )
            raise BearerRefused(self.validator.error_json(e), e.reason) from None
        except BackendError as e:
            raise BackendUnavailable(f"oauth: {e}") from None
        raw_user = claims.get(self.username_claim)
        if not isinstance(raw_user, str) or not raw_user:
            raise self._refuse(credentials, f"no {self.username_claim} claim", claims)
        try:
            user = prepare_name(raw_user, "authcid")
        except SASLError:
            raise self._refuse(
                credentials, f"unusable {self.username_claim} claim", claims
            ) from None
        if user != raw_user:
            # SASLprep would make it another name (fullwidth "ｃeo" is "ceo"):
            # two identities the IdP keeps apart must not become one here.
            raise self._refuse(
                credentials, f"{self.username_claim} claim not in its prepared form", claims
            )
        requested = credentials.authz
        verdict: Any = None
        if self.handler is not None:
            result = self.invoke(self.handler, requested, claims, credentials.conn_meta)
            if isinstance(result, defer.Deferred):
                result.addTimeout(self.timeout, self.clock)
                verdict = await result
            else:
                verdict = result
            if verdict is not None and not isinstance(verdict, bool):
                raise TypeError(
                    f"smtp_server_auth_oauth returned {type(verdict).__name__}, not bool or None"
                )
            if verdict is False:
                raise self._refuse(credentials, "refused by the policy", claims)
        if requested and requested != user and verdict is not True:
            raise self._refuse(credentials, "the token is for another user", claims)
        credentials.authz = requested or user
        credentials.authc = user
        # Refused after this (a locked user), the client gets the error
        # challenge a bad token gets: nothing tells it the token was good.
        credentials.refusal = self.validator.error_json(InvalidToken("invalid_token"))
        return user
