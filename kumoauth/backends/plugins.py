"""
The built-in credential stores as Twisted strcred checker factories, so
``twistd kumoauth --auth passwd-file:/etc/kumoauth/users`` works and
``--help-auth`` lists them (``twisted/plugins/kumoauth_checkers.py``
exposes what :func:`plugins` returns).

The argument after the name is each store's ``from_argstring`` form (a
path, a socket, a URL: see the store's module).  A checker made this way
verifies hashes in the reactor's thread pool rather than kumoauth's
``[auth] threads`` pool (it exists before the configuration is read).
"""

from __future__ import annotations

import importlib
from typing import Any

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

#: name -> (module, help, argument format)
STORES: dict[str, tuple[str, str, str]] = {
    "passwd-file": (
        "kumoauth.backends.passwdfile",
        "A Dovecot passwd-file or htpasswd file of password hashes (any scheme "
        "kumoauth verifies: ARGON2ID, BLF-CRYPT, SHA512-CRYPT, yescrypt, ...), "
        "re-read when it changes.",
        "PATH",
    ),
    "dovecot": (
        "kumoauth.backends.dovecot",
        "Ask a running Dovecot over its auth-client socket.",
        "SOCKET-PATH or HOST:PORT",
    ),
    "ldap": (
        "kumoauth.backends.ldap",
        "Search an LDAP directory for the user, then bind as the entry found.",
        "an RFC 4516 LDAP URL: ldap://HOST:PORT/BASE??SCOPE?FILTER ({user} in FILTER)",
    ),
    "sql": (
        "kumoauth.backends.sql",
        "A SQL query (SQLAlchemy) returning the user's password hash.",
        "PATH of a TOML file holding the [auth.sql] keys",
    ),
    "http": (
        "kumoauth.backends.http",
        "POST the attempt as JSON to an auth API.",
        "URL",
    ),
}


@implementer(ICheckerFactory, IPlugin)
class StoreCheckerFactory:
    """
    One built-in store as a strcred ``ICheckerFactory``.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, name: str, module: str, help: str, arg_format: str) -> None:
        self.authType = name
        self.module = module
        self.authHelp = help
        self.argStringFormat = arg_format

    def generateChecker(self, argstring: str = "") -> Any:
        from twisted.internet import reactor

        store = importlib.import_module(self.module)
        try:
            config = store.from_argstring(argstring)
        except ValueError as e:
            # strcred turns this into one usage line
            raise ValueError(f"{self.authType}: {e}") from None
        return store.factory(config=config, reactor=reactor, pool=None)


def plugins() -> dict[str, StoreCheckerFactory]:
    """
    Module-level names for the plugin file: one factory per store.
    """
    return {
        f"kumoauth_{name.replace('-', '_')}": StoreCheckerFactory(name, module, help, fmt)
        for name, (module, help, fmt) in STORES.items()
    }
