"""
The account name a login stands for, as Dovecot makes it: ``[auth]
default_realm`` (Dovecot's ``auth_default_realm``) adds ``@realm`` to a
login without one, then ``[auth] username_format`` (Dovecot's
``auth_username_format``) rewrites it, ``%Lu`` lower-casing it.  Applied to
the prepared (SASLprep) authcid and a non-empty authzid before the
throttles, the checker and the log see them: ``Alice``, ``ALICE`` and
``alice@example.com`` are then one account, for every store, as they were
for a Dovecot and a Postfix an operator migrates from.

The variables are Dovecot's short ones: ``%u`` the whole name, ``%n`` the
part before the first ``@``, ``%d`` the part after it (empty without one),
each optionally ``%L…`` (lower case) or ``%U…`` (upper case), of ASCII
letters only, as Dovecot changes case; ``%%`` is ``%``.  Anything else in
the template is kept as written.  Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_VARIABLE = re.compile(r"%(%|[LU]?[und])")
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ANY_PERCENT = re.compile(r"%[LU]?.?")


def check_format(template: str) -> str:
    """*template* if every ``%`` in it is a known variable, else ValueError."""
    for m in _ANY_PERCENT.finditer(template):
        if not _VARIABLE.fullmatch(m[0]):
            raise ValueError(
                f"unknown variable {m[0]!r} (known: %u, %n, %d, with L or U: %Lu, %Ln, %Ld…)"
            )
    if not _VARIABLE.search(template.replace("%%", "")):
        raise ValueError("names no part of the login (%u, %n or %d)")
    return template


def check_realm(realm: str) -> str:
    """*realm* if it can follow an ``@`` (no ``@``, space or control), else ValueError."""
    if not realm or "@" in realm or not realm.isprintable() or " " in realm:
        raise ValueError(f"expected a domain such as example.com, got {realm!r}")
    return realm


def formatter(template: str | None, realm: str | None) -> Callable[[str], str] | None:
    """
    The rewriting of a login for these settings, or None when there is
    none to do (both unset: names are taken as they come).
    """
    if template is None and realm is None:
        return None

    def account(name: str) -> str:
        if not name:
            return name
        if realm is not None and "@" not in name:
            name = f"{name}@{realm}"
        if template is None:
            return name
        user, _, domain = name.partition("@")
        parts = {"u": name, "n": user, "d": domain}

        def value(m: re.Match[str]) -> str:
            spec = m[1]
            if spec == "%":
                return "%"
            text = parts[spec[-1]]
            if spec[0] == "L":
                return text.translate(_LOWER)
            if spec[0] == "U":
                return text.translate(_UPPER)
            return text

        return _VARIABLE.sub(value, template)

    return account
