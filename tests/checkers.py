"""
Checker factories for ``[auth] checker = "tests.checkers:..."`` in end-to-end
tests.
"""

from __future__ import annotations

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer

from kumoauth.auth.cred import IPlainCredentials


@implementer(ICredentialsChecker)
class TenantChecker:
    """Accepts any password that is the reversed authc, and stamps conn_meta."""

    credentialInterfaces = (IPlainCredentials,)

    def requestAvatarId(self, credentials):
        if credentials.password_text() == credentials.authc[::-1]:
            credentials.conn_meta.set_meta("checked_by", "TenantChecker")
            return defer.succeed(credentials.authc)
        return defer.fail(error.UnauthorizedLogin())


def tenant_checker():
    return TenantChecker()


@implementer(ICredentialsChecker)
class NeverChecker:
    """A backend that never answers (a hung LDAP, say)."""

    credentialInterfaces = (IPlainCredentials,)

    def requestAvatarId(self, credentials):
        return defer.Deferred()


def never_checker():
    return NeverChecker()
