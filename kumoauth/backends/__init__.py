"""
Credential stores operators already have; one module per store.

- :mod:`~kumoauth.backends.passwdfile`: Dovecot passwd-file and htpasswd;
- :mod:`~kumoauth.backends.dovecot`: a running Dovecot's auth-client socket;
- :mod:`~kumoauth.backends.ldap`: search, then bind as the user;
- :mod:`~kumoauth.backends.sql`: a query returning the stored hash;
- :mod:`~kumoauth.backends.http`: an auth API answering JSON.

:mod:`~kumoauth.backends.schemes` verifies the password hashes those stores
hold, :mod:`~kumoauth.backends.base` is what they share, and
:mod:`~kumoauth.backends.cache` the verified-credential cache in front of
any checker.

The stores are importable from a policy (``from kumoauth.backends import
PasswdFile``); each module is imported on first use, so a server that
uses none of them never loads an LDAP or SQL library.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PasswdFile": "kumoauth.backends.passwdfile",
    "Dovecot": "kumoauth.backends.dovecot",
    "LDAP": "kumoauth.backends.ldap",
    "SQL": "kumoauth.backends.sql",
    "HTTP": "kumoauth.backends.http",
    "Verdict": "kumoauth.backends.base",
    "BackendError": "kumoauth.backends.base",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
