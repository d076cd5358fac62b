"""
Checker factories for ``[auth] checker = "tests.checkers:..."`` in end-to-end
tests.
"""

from __future__ import annotations

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer

from kumoauth.auth.checkers import ICheckerLifecycle
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


@implementer(ICredentialsChecker, ICheckerLifecycle)
class JournalChecker:
    """
    A checker with configuration and a lifecycle: ``[auth.journal_checker]``
    names a file where start/reload/stop are written, and the users.
    """

    credentialInterfaces = (IPlainCredentials,)

    def __init__(self, config):
        self.config = config

    def note(self, event: str) -> None:
        with open(self.config["journal"], "a") as f:
            f.write(event + "\n")

    def start(self):
        self.note("start")

    def reload(self, config):
        self.config = config
        self.note("reload " + ",".join(sorted(config["users"])))

    def stop(self):
        self.note("stop")

    def requestAvatarId(self, credentials):
        if self.config["users"].get(credentials.authc) == credentials.password_text():
            return defer.succeed(credentials.authc)
        return defer.fail(error.UnauthorizedLogin())


def journal_checker(config, reactor, pool):
    return JournalChecker(config)


def _validate(table):
    unknown = set(table) - {"journal", "users"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key (known: journal, users)")
    if "journal" not in table:
        raise ValueError("journal: required key is missing")
    return {"journal": table["journal"], "users": dict(table.get("users", {}))}


journal_checker.validate = _validate  # type: ignore[attr-defined]
