"""
Sender binding (``[sender_binding]``): which addresses an authenticated
user may send as, in ``MAIL FROM`` and in the From:/Sender: header.

This module is the engine: the configuration table, address
normalization, the Postfix-style map file, the From:/Sender: extraction,
and :class:`SenderBinding`, which answers "may *authz* use *address*?"
with a :class:`Decision` naming the rule.  The protocol side (replies,
log events, metrics, the policy's say) is :mod:`kumoauth.smtp.sender_gate`.

**Sources.**  ``source = "map"``: a map file (:func:`parse_map`), re-read
when it changes on disk.  ``"ldap"``: the user's entry (found with the
``[auth.ldap]`` search) lists the addresses in ``ldap_attribute``, one per
value.  ``"sql"``: ``sql_query`` with ``:user`` run on the ``[auth.sql]``
database returns one address per row.  ``"http"``: a JSON POST
``{"user": authz}`` to the ``[auth.http]`` URL with ``/senders`` appended
to its path (same token, CA and timeout), answered ``200
{"addresses": [...]}``.  An ``@domain`` value from a store means any
address of that domain.  A store that cannot answer makes
:class:`SenderLookupError` (the protocol answers ``451 4.7.1``), never an
allowed sender.

**Comparing addresses** (:func:`normalize`): the domain compares without
regard to case and IDNA form (``bücher.example`` and
``xn--bcher-kva.example`` are one domain); the local part compares exactly
(RFC 5321 §2.4: only the destination host may interpret it), after NFC
and with needless quotes removed (``"alice"@x`` is ``alice@x``).  With
``strip_detail``, an address ``user+detail@domain`` that no rule names
is looked up again as ``user@domain``.  An exact map entry also guards
the variants of its address that receiving systems take for it (case,
compatibility characters: ``CEO@x`` for ``ceo@x``) from its domain's
wildcard; a variant in another letter case only is the entry's own for
the users it lists (``Alice@x`` for alice, as Postfix's maps fold case),
any other variant only ever refuses.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email import errors
from email import policy as email_policy
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from kumoauth.backends.base import BackendError, ReactorThreads, default_reactor, parse_table
from kumoauth.checks import _Bad, _bool, _choice, _ldap_attribute, _str
from kumoauth.ops.loglimit import StateLog
from kumoauth.ops.threads import QueueFull
from kumoauth.smtp.data import HEADER_END
from kumoauth.textsafe import INVISIBLE, escape

log = Logger(namespace="kumoauth.auth")

SOURCES = ("map", "ldap", "sql", "http")

#: what :func:`header_addresses` returns for an address it cannot read (a
#: From: with no address in it, ``From: <>``, a bare word): never allowed
UNPARSEABLE = "(unparseable header address)"

#: what :func:`header_addresses` returns for a header too large to read on
#: the reactor thread (see the limits below): never allowed
TOO_LARGE = "(header too large to check)"

#: most bytes of a message header read for From:/Sender: (Postfix's
#: ``header_size_limit`` is 100 KiB): reading costs about 0.1 s a MiB
MAX_HEADER_BYTES = 1024 * 1024

#: most characters of the From:/Sender: fields read (their parsing time
#: grows faster than their length: 1.8 MB of addresses took 40 s, 16 KiB of
#: quoted words 1.2 s, 8 KiB about 0.3 s, in a thread)
MAX_FIELD_CHARS = 8 * 1024

#: most distinct From:/Sender: addresses checked (each may be a lookup)
MAX_HEADER_ADDRESSES = 50

#: the map file is stat()ed at most this often (seconds) on lookups
STAT_INTERVAL = 1.0

#: for source = "http": appended to the [auth.http] URL's path
HTTP_PATH = "senders"

#: most values read from a store for one user (more are ignored)
MAX_VALUES = 10_000


# --------------------------------------------------------------------------
# configuration


def _separator(v: Any) -> str:
    text = _str(v)
    for ch in text:
        if ch in '@"\\.' or not ch.isprintable() or ch.isspace() or ch in "()<>[]:;,":
            raise _Bad(f"{ch!r} cannot separate a detail (it has a meaning in addresses)")
    return text


@dataclass(frozen=True)
class SenderBindingConfig:
    """
    ``[sender_binding]``.
    """

    source: str = "map"
    map: Path | None = None
    ldap_attribute: str = "mail"
    sql_query: str | None = None
    check_header_from: bool = True
    allow_null_sender: bool = True
    strip_detail: bool = False
    detail_separator: str = "+"


SCHEMA: dict[str, Callable[[Any], Any]] = {
    "source": _choice(*SOURCES),
    "map": _str,
    "ldap_attribute": _ldap_attribute,
    "sql_query": _str,
    "check_header_from": _bool,
    "allow_null_sender": _bool,
    "strip_detail": _bool,
    "detail_separator": _separator,
}

#: keys that only one source reads
_ONLY_FOR = {"map": "map", "ldap_attribute": "ldap", "sql_query": "sql"}


def validate(
    raw: Mapping[str, Any], base: Path | None = None, read_files: bool = True
) -> SenderBindingConfig:
    """
    ``[sender_binding]`` as a :class:`SenderBindingConfig`; relative paths
    against *base*.  For ``source = "map"`` the map file is read and parsed
    now (*read_files*), so a bad line stops start-up (or the reload) with
    its line number.  ``ValueError``: ``key: problem``.
    """
    config: SenderBindingConfig = parse_table(
        SenderBindingConfig, raw, SCHEMA, paths=("map",), base=base
    )
    for key, source in _ONLY_FOR.items():
        if key in raw and config.source != source:
            raise ValueError(f'{key}: only used with source = "{source}"')
    if config.source == "map":
        if config.map is None:
            raise ValueError('map: required with source = "map"')
        try:
            if read_files:
                read_map(config.map)
        except ValueError as e:
            raise ValueError(f"map: {e}") from None
    if config.source == "sql":
        if config.sql_query is None:
            raise ValueError('sql_query: required with source = "sql"')
        from kumoauth.backends.sql import _check_query

        try:
            _check_query(config.sql_query)
        except ValueError as e:
            raise ValueError("sql_query: " + str(e).removeprefix("query: ")) from None
    return config


# --------------------------------------------------------------------------
# addresses


#: RFC 5322 atext, plus every non-ASCII character (RFC 6532 §3.2)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")


class _BadDomain(ValueError):
    pass


@functools.lru_cache(maxsize=4096)
def _domain(domain: str, strict: bool = False) -> str:
    """
    *domain* in its compared form: lower case, U-labels (IDNA decoded,
    UTS #46 mapped), no trailing dot; a domain literal (``[192.0.2.1]``)
    lower-cased.  *strict*: ``_BadDomain`` for what is not a domain name
    (the map's keys); otherwise the best effort (lower case, NFC).
    """
    if domain.endswith(".") and not domain.endswith(".."):
        domain = domain[:-1]
    if domain.startswith("[") and domain.endswith("]"):
        return domain.lower()
    if strict:
        if not domain:
            raise _BadDomain("no domain")
        bad = next((ch for ch in domain if ch in '@[]",\\<>()' or not ch.isprintable()), None)
        if bad is not None or " " in domain:
            raise _BadDomain(f"{bad or ' '!r} in the domain")
    if domain.isascii() and "xn--" not in domain.lower():
        if strict and any(not label for label in domain.split(".")):
            raise _BadDomain("an empty label in the domain")
        return domain.lower()
    import idna

    try:
        mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False)
        labels = []
        for label in mapped.split("."):
            if not label and strict:
                raise _BadDomain("an empty label in the domain")
            if label.isascii() and not label.startswith("xn--"):
                labels.append(label.lower())
            else:
                labels.append(idna.decode(idna.encode(label, uts46=False)).lower())
        return ".".join(labels)
    except (idna.IDNAError, UnicodeError, IndexError) as e:
        if strict:
            raise _BadDomain(f"not a valid internationalized domain name ({e})") from None
    return unicodedata.normalize("NFC", domain).lower()


def _local(local: str) -> str:
    """
    The local part as compared: NFC; a quoted one unquoted when the quotes
    are not needed, else quoted canonically.
    """
    local = unicodedata.normalize("NFC", local)
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        inner = re.sub(r"\\(.)", r"\1", local[1:-1])
        if _DOT_ATOM.fullmatch(inner):
            return inner
        return '"' + inner.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return local


def normalize(address: str) -> str:
    """
    *address* in the form sender binding compares: the local part exactly
    as given (case kept: ``Alice`` and ``alice`` are two keys, as RFC 5321
    §2.4 lets only the receiving host decide; :meth:`SenderMap.decide`
    lets a case variant of an entry's address be that entry's), after Unicode NFC (an
    SMTPUTF8 address from a macOS client may come decomposed) and with
    needless quotes removed; the domain lower-cased and, when
    internationalized, IDNA-decoded to U-labels after UTS #46 mapping (the
    ``idna`` package, already a Twisted dependency).  So ``Alice@EXAMPLE.com``
    is ``Alice@example.com``, which is not ``alice@example.com``, and
    ``x@xn--bcher-kva.example`` is ``x@bücher.example``.  ``""`` (the null
    sender) stays ``""``; without an ``@`` only NFC applies.  Pure, and
    never raises: a domain that is not a valid IDN is only lower-cased.
    """
    if "@" not in address:
        return unicodedata.normalize("NFC", address)
    local, _, domain = address.rpartition("@")
    return f"{_local(local)}@{_domain(domain)}"


def strip_detail(address: str, separators: str) -> str:
    """
    *address* (normalized) without its ``+detail``: the local part cut at
    the first of *separators* (each character is one, as Postfix's
    ``recipient_delimiter``) that is not its first character.  A quoted
    local part is left alone.
    """
    local, at, domain = address.rpartition("@")
    if not at or local.startswith('"'):
        return address
    cut = min((i for i, ch in enumerate(local) if ch in separators and i > 0), default=-1)
    return address if cut < 0 else f"{local[:cut]}@{domain}"


def _login(name: str) -> str:
    # NFKC, as SASLprep leaves the authz it is compared with: a map line
    # written "ｆｕｌｌ" (fullwidth) is the login "full"
    return unicodedata.normalize("NFKC", name)


def _login_domain(login: str) -> str | None:
    if "@" not in login:
        return None
    return _domain(login.rpartition("@")[2])


# --------------------------------------------------------------------------
# the map file


@dataclass(frozen=True)
class Rule:
    """
    One map line: the logins it lists and the domains whose logins it
    admits (``@example.com`` on the right).
    """

    line: int
    text: str
    logins: frozenset[str]
    login_domains: frozenset[str]

    def admits(self, login: str, login_domain: str | None) -> bool:
        return login in self.logins or (
            login_domain is not None and login_domain in self.login_domains
        )

    def describe(self) -> str:
        return f'map line {self.line}: "{escape(self.text, 200)}"'


@dataclass
class SenderMap:
    """
    A parsed map: exact addresses and ``@domain`` wildcards, each with the
    lines that name it (a key on several lines: all of them count).
    """

    source: str
    exact: dict[str, list[Rule]] = field(default_factory=dict)
    domains: dict[str, list[Rule]] = field(default_factory=dict)
    #: the exact keys by their :func:`_variant_key` (case and compatibility
    #: forms folded): what guards ``CEO@example.com`` for ``ceo@example.com``
    variants: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.exact) + len(self.domains)

    def decide(self, login: str, candidates: list[str]) -> Decision:
        """
        The decision for *login* and an address given as *candidates* (the
        address, then without its detail): the first exact entry that
        exists decides, else the domain's wildcard; an exact entry that
        does not list the user refuses even if the domain's wildcard would
        allow (``ceo@example.com ceo`` protects that address).

        The protection covers the address's variants too: receiving
        systems take ``CEO@example.com`` (or ``ｃeo@example.com`` in
        compatibility characters) for ``ceo@example.com``, so a candidate
        that differs from an exact entry only in case or compatibility
        form is refused to a user that entry does not list.  A candidate
        that differs only in letter case (``Alice@example.com``) is allowed
        to the users the entry lists, as Postfix's ``smtpd_sender_login_maps``
        (whose tables fold case) allowed it; a compatibility form or an
        invisible character never allows.
        """
        login = _login(login)
        login_domain = _login_domain(login)
        for candidate in candidates:
            rules = self.exact.get(candidate)
            if rules is not None:
                return _by_rules(rules, login, login_domain)
        for candidate in candidates:
            for key in self.variants.get(_variant_key(candidate), ()):
                if _case_key(key) != _case_key(candidate):
                    continue
                for rule in self.exact[key]:
                    if rule.admits(login, login_domain):
                        return Decision(True, rule.describe() + " (the address in another case)")
        for candidate in candidates:
            for key in self.variants.get(_variant_key(candidate), ()):
                rules = self.exact[key]
                if not any(r.admits(login, login_domain) for r in rules):
                    return Decision(
                        False,
                        rules[0].describe() + " (does not list this user; the address "
                        "differs from it only in case or form)",
                    )
        domain = candidates[0].rpartition("@")[2]
        rules = self.domains.get(domain)
        if rules is not None:
            return _by_rules(rules, login, login_domain)
        return NO_RULE

    def allowed_for(self, login: str) -> list[str]:
        """
        The keys that admit *login*, each domain wildcard with the exact
        entries under it that do not (``@example.com (except
        ceo@example.com)``).
        """
        login = _login(login)
        login_domain = _login_domain(login)
        out: list[str] = []
        refused_in: dict[str, list[str]] = {}
        for address, rules in self.exact.items():
            if any(r.admits(login, login_domain) for r in rules):
                out.append(address)
            else:
                refused_in.setdefault(address.rpartition("@")[2], []).append(address)
        for domain, rules in self.domains.items():
            if any(r.admits(login, login_domain) for r in rules):
                except_ = sorted(refused_in.get(domain, []))
                out.append(f"@{domain}" + (f" (except {', '.join(except_)})" if except_ else ""))
        return sorted(out)


def _case_key(address: str) -> str:
    """*address* (normalized) with its local part lower-cased: letter case only."""
    local, at, domain = address.rpartition("@")
    return f"{local.lower()}{at}{domain}"


def _variant_key(address: str) -> str:
    """
    *address* (normalized) with its local part lower-cased and in NFKC
    (``lower``, not ``casefold``: ``straße`` and ``strasse`` stay two),
    without the characters that show as nothing (:func:`_visible`): the
    form in which mail systems and readers commonly take two local parts
    for one mailbox (``CEO`` is ``ceo``; ``ｃeo``, ``c\u200beo`` and
    ``ce\u034fo`` are ``ceo`` to the eye).
    """
    local, at, domain = address.rpartition("@")
    # Without them first: "ce\u200b\u0301o" must compose as "céo" does.
    seen = unicodedata.normalize("NFKC", _visible(local))
    folded = unicodedata.normalize("NFKC", _visible(seen.lower()))
    return f"{folded}{at}{domain}"


def _deceptive(address: str) -> bool:
    """
    Whether *address* holds a character no mailbox needs and a reader may
    be fooled by: default-ignorables and controls (:data:`~kumoauth.textsafe.INVISIBLE`,
    bidi embeddings, overrides and isolates among them) or a separator
    other than SPACE (NO-BREAK SPACE, LINE SEPARATOR...).
    """
    if INVISIBLE.search(address) is not None:
        return True
    return not address.isascii() and any(
        c != " " and unicodedata.category(c) in ("Zs", "Zl", "Zp") for c in address
    )


def _visible(text: str) -> str:
    """*text* without default-ignorable and control characters."""
    return INVISIBLE.sub("", text)


def _by_rules(rules: list[Rule], login: str, login_domain: str | None) -> Decision:
    for rule in rules:
        if rule.admits(login, login_domain):
            return Decision(True, rule.describe())
    return Decision(False, rules[0].describe() + " (does not list this user)")


_SEPARATORS = re.compile(r"[ \t,]+")
_QUOTED_KEY = re.compile(r'"(?:[^"\\]|\\.)*"@[^ \t,]*')


def parse_map(text: str, source: str) -> SenderMap:
    """
    A map file's *text* (*source* names it in errors).  One entry a line,
    Postfix ``smtpd_sender_login_maps`` style::

        # address            logins allowed to send as it
        alice@example.com    alice
        sales@example.com    alice, bob carol
        @example.org         dave              # not allowed: see below
        @example.net         @example.net

    - the key: an address (that address only) or ``@domain`` (any address
      of the domain); a quoted local part (``"john doe"@example.com``) may
      hold spaces;
    - then spaces or tabs, then the logins (authz identities), separated
      by commas and/or spaces; ``@domain`` among them admits every login
      of that domain (a login ``bob@example.net`` matches ``@example.net``);
    - ``#`` starts a comment only as a line's first non-blank character
      (a ``#`` token elsewhere is an error, so a trailing comment cannot
      turn into logins); blank lines are skipped;
    - a line that starts with a space or tab is an error: Postfix would
      read it as the continuation of the line above, which kumoauth does
      not support (put the whole entry on one line);
    - the same key on several lines: every line counts.

    A bad line raises ``ValueError`` with one line: ``<source> line N:
    problem``.  Nothing else is raised for any text.
    """
    result = SenderMap(source)
    if text.startswith("\ufeff"):
        text = text[1:]
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        stripped = line.strip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        try:
            _parse_line(result, number, line, stripped)
        except ValueError as e:
            raise ValueError(f"{source} line {number}: {e}") from None
    return result


def _parse_line(result: SenderMap, number: int, line: str, stripped: str) -> None:
    bad = next((ch for ch in line if (ch.isspace() and ch not in " \t") or _control(ch)), None)
    if bad is not None:
        raise ValueError(f"a control or odd space character (U+{ord(bad):04X})")
    if line[0] in " \t":
        raise ValueError(
            "starts with a space or tab (continuation lines are not supported: "
            "put the whole entry on one line)"
        )
    if stripped.startswith('"'):
        m = _QUOTED_KEY.match(stripped)
        if m is None:
            raise ValueError("a quoted local part without its closing quote and @domain")
        key, rest = m.group(), stripped[m.end() :]
        if rest and rest[0] not in " \t":
            raise ValueError("the key must be followed by a space or tab")
    else:
        key, _, rest = stripped.replace("\t", " ").partition(" ")
    if "," in key and not key.startswith('"'):
        raise ValueError(
            f'a comma in the key "{escape(key, 80)}" '
            "(separate the address from the logins with a space or tab)"
        )
    local, at, domain = key.rpartition("@")
    if not at:
        raise ValueError(f'the key "{escape(key, 80)}" is neither an address nor @domain')
    if not local.startswith('"') and ("@" in local or '"' in local):
        raise ValueError(f'the key "{escape(key, 80)}" is not one address')
    try:
        domain_n = _domain(domain, strict=True)
    except _BadDomain as e:
        raise ValueError(f'the key "{escape(key, 80)}": {e}') from None
    tokens = [t for t in _SEPARATORS.split(rest.strip(" \t")) if t]
    if not tokens:
        raise ValueError(f'no login after "{escape(key, 80)}"')
    logins: set[str] = set()
    login_domains: set[str] = set()
    for token in tokens:
        if token.startswith("#"):
            raise ValueError("a comment must be on a line of its own ('#' among the logins)")
        if token.startswith("@"):
            try:
                login_domains.add(_domain(token[1:], strict=True))
            except _BadDomain as e:
                raise ValueError(f'the login domain "{escape(token, 80)}": {e}') from None
        else:
            logins.add(_login(token))
    rule = Rule(number, " ".join(stripped.split()), frozenset(logins), frozenset(login_domains))
    if local:
        address = f"{_local(local)}@{domain_n}"
        if address not in result.exact:
            result.variants.setdefault(_variant_key(address), []).append(address)
        result.exact.setdefault(address, []).append(rule)
    else:
        result.domains.setdefault(domain_n, []).append(rule)


def _control(ch: str) -> bool:
    return ch != "\t" and unicodedata.category(ch) in ("Cc", "Cs")


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(0, "not a regular file")
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_map(path: Path) -> tuple[tuple[int, int, int, int], SenderMap]:
    """
    The map file at *path* (blocking) and the stat it was read under.
    ``ValueError`` with one line naming the file.
    """
    try:
        stamp = _stamp(path)
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8") from None
    return stamp, parse_map(text, str(path))


# --------------------------------------------------------------------------
# decisions


@dataclass(frozen=True)
class Decision:
    """
    Whether the user may use the address, and the rule that said so (for
    logs and ``kumoauth sender check``).
    """

    allowed: bool
    rule: str


NO_RULE = Decision(False, "no rule for this address")


class SenderLookupError(Exception):
    """
    The source cannot answer now (store down, timeout, too busy): the
    protocol answers ``451 4.7.1``.  The message is safe to log.
    """


# --------------------------------------------------------------------------
# header addresses


#: a field name, then spaces or tabs before its colon: the obsolete syntax
#: of RFC 5322 §4.5 (obs-from, obs-sender, obs-optional), which receivers
#: must accept and Postfix's is_header() does.  The stdlib parser does not:
#: it skips a ``From :`` line as a misplaced envelope header and ends the
#: header at any other such field, so a From: after it would go unchecked.
_OBS_COLON = re.compile(r"^([\x21-\x39\x3b-\x7e]+)[ \t]+:", re.MULTILINE)

#: what looks like an address in a field the parser found invalid
_ADDRESS_LIKE = re.compile(
    # anchored at a token's start (the lookbehind): without it, a long run
    # with no "@" is searched again from each of its characters (quadratic)
    r"(?<![^\s<>()\[\],;:\"\\@])[^\s<>()\[\],;:\"\\@]+@[^\s<>()\[\],;:\"\\@]+"
)


def header_addresses(header_block: bytes, smtputf8: bool) -> list[str] | None:
    """
    The addresses to check in a message's header: those of the ``Sender:``
    field when there is one (RFC 5322 §3.6.2: the mailbox of the agent
    that actually sent it, so it is the one bound to the user), else every
    address of every ``From:`` field (each must be allowed).  Groups give
    their members, comments and display names (encoded words included)
    are ignored, folded lines are unfolded: the stdlib parser
    (``email.policy.SMTPUTF8``/``default``) reads them.

    ``None`` when the header has neither field: nothing to check (the
    envelope sender was checked at MAIL FROM).  An address that cannot be
    read — a field with no address at all (``From:``, an empty group),
    ``<>``, a bare word, a domain missing, bytes that are not UTF-8, a
    field the parser chokes on — comes back as :data:`UNPARSEABLE`, which
    no rule allows, so the message is refused.  Never raises.

    The header is read as UTF-8 whatever *smtputf8* says (8-bit headers
    without SMTPUTF8 are common); *smtputf8* picks the parser's policy.

    The stdlib parser is slow (20 µs a character of a From: full of
    commas, worse than linear on some forms), so the sender gate calls this
    in a thread, and what it reads is bounded: a header over
    :data:`MAX_HEADER_BYTES`, From:/Sender: fields over
    :data:`MAX_FIELD_CHARS` together, or more than
    :data:`MAX_HEADER_ADDRESSES` distinct addresses in them come back as
    ``[TOO_LARGE]``, which no rule allows either.
    """
    try:
        # where the parser would stop anyway, looked for in the first
        # MAX_HEADER_BYTES only (a message without a blank line is long)
        bound = MAX_HEADER_BYTES + 1
        end = HEADER_END.search(header_block, 0, bound)
        if end is not None:
            cut = end.start()
            if cut < len(header_block) and header_block.find(b"\n", cut, bound) < 0:
                # a line the bound cuts short, not one the parser stops at
                # (b"X-Jun" looks like no header line): the header goes on
                return [TOO_LARGE]
            header_block = header_block[:cut]
        if len(header_block) > MAX_HEADER_BYTES:
            return [TOO_LARGE]
        text = _OBS_COLON.sub(r"\1:", header_block.decode("utf-8", "surrogateescape"))
        chosen = email_policy.SMTPUTF8 if smtputf8 else email_policy.default
        message = HeaderParser(policy=chosen).parsestr(text, headersonly=True)
        raw_fields = [v for k, v in message.raw_items() if k.lower() == "sender"]
        name = "Sender"
        if not raw_fields:
            raw_fields = [v for k, v in message.raw_items() if k.lower() == "from"]
            name = "From"
        if not raw_fields:
            return None
    except Exception:
        return [UNPARSEABLE]
    if sum(len(str(value)) for value in raw_fields) > MAX_FIELD_CHARS:
        return [TOO_LARGE]
    out: list[str] = []
    seen: set[str] = set()
    for value in raw_fields:
        for address in _field_addresses(chosen, name, value):
            if address not in seen:
                seen.add(address)
                out.append(address)
    if len(out) > MAX_HEADER_ADDRESSES:
        return [TOO_LARGE]
    return out


def _field_addresses(chosen: Any, name: str, value: Any) -> list[str]:
    try:
        header = chosen.header_fetch_parse(name, value)
        addresses = list(header.addresses)
        invalid = any(isinstance(d, errors.InvalidHeaderDefect) for d in header.defects)
    except Exception:
        return [UNPARSEABLE]
    if not addresses:
        return [UNPARSEABLE]
    out: list[str] = []
    for a in addresses:
        try:
            username, domain, spec = a.username, a.domain, a.addr_spec
        except Exception:
            out.append(UNPARSEABLE)
            continue
        if not username or not domain or "@" not in spec:
            out.append(UNPARSEABLE)
            continue
        try:
            spec.encode("utf-8")
        except UnicodeEncodeError:
            out.append(UNPARSEABLE)  # bytes that were not UTF-8
            continue
        if any(c < " " or "\x7f" <= c <= "\x9f" for c in spec):
            out.append(UNPARSEABLE)  # a NUL or another control: no mailbox has one
            continue
        out.append(spec)
    if invalid:
        # The parser dropped what it could not read (``a@x <b@y>``, ``a@x
        # b@y``, ``a@x;b@y``): other readers may take it for the mailbox,
        # so every address-like token of the field must be allowed too.
        known = set(out)
        out.extend(m for m in dict.fromkeys(_ADDRESS_LIKE.findall(str(value))) if m not in known)
    return out


# --------------------------------------------------------------------------
# sources


class _MapSource:
    """
    The map file, re-read when its stat changes (checked at most once per
    :data:`STAT_INTERVAL` on lookups; read and parsed in the pool).  A new
    file that does not parse is logged once and the previous map kept.
    """

    kind = "map"

    def __init__(self, path: Path, clock: Any, pool: Any) -> None:
        self.path = path
        self.clock = clock
        self.pool = pool
        self.stamp, self.map = read_map(path)
        self.checked = clock.seconds()
        self.bad: Any = None  # the stamp (or error) last logged
        self.loading: list[defer.Deferred[None]] | None = None

    def describe(self) -> str:
        return f"map {self.path} ({len(self.map)} entries)"

    async def current(self) -> SenderMap:
        now = self.clock.seconds()
        if self.loading is None and now - self.checked < STAT_INTERVAL:
            return self.map
        if self.loading is not None:
            d: defer.Deferred[None] = defer.Deferred()
            self.loading.append(d)
            await d
            return self.map
        self.checked = now
        try:
            stamp = _stamp(self.path)
        except OSError as e:
            self._problem(("stat", str(e.strerror or e)), f"{self.path}: {e.strerror or e}")
            return self.map
        if stamp == self.stamp or stamp == self.bad:
            return self.map
        self.loading = []
        try:
            self._take(await self.pool.call(_read_quietly, self.path))
        except QueueFull:
            self.checked = now - STAT_INTERVAL  # busy: try again at the next lookup
        finally:
            waiting, self.loading = self.loading, None
            for w in waiting:
                w.callback(None)
        return self.map

    def _take(self, result: tuple[Any, SenderMap | str]) -> None:
        stamp, found = result
        if isinstance(found, SenderMap):
            self.stamp, self.map, self.bad = stamp, found, None
            log.info(
                "sender binding: map {path} re-read ({n} entries)",
                path=str(self.path),
                n=len(found),
            )
        else:
            self._problem(stamp, found)

    def _problem(self, key: Any, message: str) -> None:
        if key != self.bad:
            self.bad = key
            log.error(
                "sender binding: {problem}; keeping the previous map ({n} entries)",
                problem=escape(message, 300),
                n=len(self.map),
            )

    async def decide(self, login: str, candidates: list[str]) -> Decision:
        return (await self.current()).decide(login, candidates)

    async def allowed(self, login: str) -> list[str]:
        return (await self.current()).allowed_for(login)

    def stop(self) -> None:
        return None


def _read_quietly(path: Path) -> tuple[Any, SenderMap | str]:
    """
    :func:`read_map` for the pool: the error as text (with the stat it
    belongs to, so it is logged once), never raised.
    """
    try:
        return read_map(path)
    except ValueError as e:
        try:
            stamp: Any = _stamp(path)
        except OSError:
            stamp = ("error", str(e))
        return stamp, str(e)


class _ListSource:
    """
    A store that answers with the user's addresses (LDAP, SQL, HTTP).
    """

    kind = ""

    async def values(self, login: str) -> list[str] | None:
        raise NotImplementedError

    def rule(self, value: str) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    async def decide(self, login: str, candidates: list[str]) -> Decision:
        values = await self.values(login)
        if values is None:
            return Decision(False, f"no {self.kind} entry for this user")
        domain = candidates[0].rpartition("@")[2]
        folded = {_case_key(c) for c in candidates}
        wildcard: str | None = None
        other_case: str | None = None
        for value in values:
            n = normalize(value.strip())
            if n in candidates:
                return Decision(True, self.rule(value))
            if wildcard is None and n.startswith("@") and n[1:] == domain:
                wildcard = value
            if other_case is None and "@" in n[1:] and _case_key(n) in folded:
                other_case = value
        if other_case is not None:
            # the user's own address in another letter case (Alice@ for alice@)
            return Decision(True, self.rule(other_case) + " (the address in another case)")
        if wildcard is not None:
            return Decision(True, self.rule(wildcard))
        return NO_RULE

    async def allowed(self, login: str) -> list[str]:
        values = await self.values(login)
        return sorted({normalize(v.strip()) for v in values or [] if "@" in v})

    def stop(self) -> Any:
        return self.store.stop()  # type: ignore[attr-defined]


class _LdapSource(_ListSource):
    kind = "ldap"

    def __init__(self, store: Any, attribute: str) -> None:
        self.store = store
        self.attribute = attribute

    def describe(self) -> str:
        return f"ldap {self.store.settings.url}, attribute {self.attribute}"

    async def values(self, login: str) -> list[str] | None:
        found: list[str] | None = await self.store.attribute_values(login, self.attribute)
        return None if found is None else found[:MAX_VALUES]

    def rule(self, value: str) -> str:
        return f"ldap {self.attribute}={escape(value, 200)}"


class _SqlSource(_ListSource):
    kind = "sql"

    def __init__(self, store: Any, query: str) -> None:
        self.store = store
        self.query = query

    def describe(self) -> str:
        return f"sql {self.store.current.shown}"

    async def values(self, login: str) -> list[str] | None:
        found: list[str] = await self.store.values(self.query, login)
        return found

    def rule(self, value: str) -> str:
        return f'sql row "{escape(value, 200)}"'


class _HttpSource(_ListSource):
    kind = "http"

    def __init__(self, store: Any) -> None:
        self.store = store

    def describe(self) -> str:
        return f"http {self.store._client.where}"

    async def values(self, login: str) -> list[str] | None:
        answer = await self.store.post_json({"user": login}, HTTP_PATH)
        where = self.store._client.where
        addresses = answer.get("addresses") if isinstance(answer, dict) else None
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise BackendError(f'{where}: HTTP 200 without "addresses": a list of strings')
        return list(addresses[:MAX_VALUES])

    def rule(self, value: str) -> str:
        return f'http address "{escape(value, 200)}"'


def _make_source(
    config: SenderBindingConfig,
    auth_tables: Mapping[str, Mapping[str, Any]],
    reactor: Any,
    pool: Any,
    base: Path | None,
    parse_pool: Any,
) -> Any:
    if config.source == "map":
        if config.map is None:
            raise ValueError('map: required with source = "map"')
        return _MapSource(config.map, reactor, parse_pool)
    table = auth_tables.get(config.source)
    if not isinstance(table, Mapping):
        raise ValueError(
            f'source = "{config.source}" reads the [auth.{config.source}] table, which is missing'
        )
    try:
        if config.source == "ldap":
            from kumoauth.backends import ldap

            ldap_store = ldap.LDAP.from_config(ldap.validate(table, base), reactor, pool)
            return _LdapSource(ldap_store, config.ldap_attribute)
        if config.source == "sql":
            from kumoauth.backends import sql

            assert config.sql_query is not None
            sql_store = sql.SQL.from_config(sql.validate(table, base), reactor, pool)
            return _SqlSource(sql_store, config.sql_query)
        from kumoauth.backends import http

        return _HttpSource(http.HTTP.from_config(http.validate(table, base), reactor))
    except ValueError as e:
        raise ValueError(f"[auth.{config.source}] {e}") from None


# --------------------------------------------------------------------------
# the engine


class SenderBinding:
    """
    Who may send as whom, from one source (see the module docstring).
    *auth_tables* are the configuration's raw ``[auth.<name>]`` tables: for
    ``source = "ldap"``/``"sql"``/``"http"`` the store is built from the
    same table as the credential checker (its own connections).
    ``ValueError`` (one line) for a missing table or an unreadable map.
    """

    def __init__(
        self,
        config: SenderBindingConfig,
        auth_tables: Mapping[str, Mapping[str, Any]],
        reactor: Any,
        pool: Any,
        base: Path | None = None,
        parse_pool: Any = None,
    ) -> None:
        self.reactor = default_reactor(reactor)
        self.pool = pool if pool is not None else ReactorThreads(self.reactor)
        #: for parsing (messages' headers, the map file): not the store's
        #: threads, which a hung store holds
        self.parse_pool = parse_pool if parse_pool is not None else self.pool
        self.base = base
        self.auth_tables = auth_tables
        self.config = config
        self.source = _make_source(
            config, auth_tables, self.reactor, self.pool, base, self.parse_pool
        )
        #: the source's outages, one log line per change of state (the
        #: protocol side, :mod:`kumoauth.smtp.sender_gate`, reports each
        #: lookup to it); lives as long as the engine, which a reload keeps
        #: while the settings are unchanged
        self.state = StateLog("sender binding store", log)
        #: the header's parse waiting for a thread (the checks hold them):
        #: a state of its own, so the store's lookups succeeding meanwhile
        #: do not make it one line per message
        self.parse_state = StateLog("sender binding header check", log)

    def __repr__(self) -> str:
        return f"<SenderBinding {self.source.describe()}>"

    def _candidates(self, address: str) -> list[str]:
        n = normalize(address)
        out = [n]
        if self.config.strip_detail:
            bare = strip_detail(n, self.config.detail_separator)
            if bare != n:
                out.append(bare)
        return out

    def check(self, authz: str, address: str) -> defer.Deferred[Decision]:
        """
        Whether *authz* may use *address* (``""``: the null sender); fails
        with :class:`SenderLookupError` when the source cannot answer.
        """
        decision = self.shortcut(authz, address)
        if decision is not None:
            return defer.succeed(decision)
        return self.lookup(authz, address)

    def shortcut(self, authz: str, address: str) -> Decision | None:
        """
        The decision that needs no lookup (the null sender, an address
        that cannot be read or has no domain, no user), else None.
        """
        if address == "":
            if self.config.allow_null_sender:
                return Decision(True, "null sender allowed")
            return Decision(False, "null sender refused (allow_null_sender = false)")
        if address == UNPARSEABLE:
            return Decision(False, "a From:/Sender: address that cannot be read")
        if address == TOO_LARGE:
            return Decision(
                False,
                f"a header over {MAX_HEADER_BYTES >> 20} MiB, or From:/Sender: over "
                f"{MAX_FIELD_CHARS >> 10} KiB or with more than {MAX_HEADER_ADDRESSES} "
                "addresses (not read)",
            )
        if not authz:
            return Decision(False, "no authenticated user")
        if "@" not in address or address.endswith("@"):
            return Decision(False, "not an address (no @domain)")
        if _deceptive(address):
            # RLO "oec" PDF shows as "ceo": no mailbox needs such a character
            return Decision(
                False,
                "an address with a character that shows as nothing, reorders "
                "the text (bidi control) or is a space or line break other than SPACE",
            )
        return None

    def lookup(self, authz: str, address: str) -> defer.Deferred[Decision]:
        """
        :meth:`check` for an address :meth:`shortcut` cannot decide: the
        source's answer, or :class:`SenderLookupError`.
        """
        source = self.source
        d = defer.Deferred.fromCoroutine(source.decide(authz, self._candidates(address)))
        return d.addErrback(_lookup_failed, source)

    def allowed_addresses(self, authz: str) -> defer.Deferred[list[str]]:
        """
        The addresses and ``@domain`` wildcards *authz* may send as (for
        ``kumoauth auth test``); :class:`SenderLookupError` as for
        :meth:`check`.
        """
        source = self.source
        d = defer.Deferred.fromCoroutine(source.allowed(authz))
        return d.addErrback(_lookup_failed, source)

    def start(self) -> None:
        log.info(
            "sender binding: {source}{header}",
            source=self.source.describe(),
            header="" if self.config.check_header_from else " (envelope only)",
        )

    def reload(
        self,
        config: SenderBindingConfig,
        auth_tables: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Any:
        """
        Take new settings: the same map file keeps its state (and is
        stat()ed at the next lookup); anything else gets a new source and
        the old one is stopped (returned: a Deferred or None).
        ``ValueError`` keeps what was.
        """
        tables = self.auth_tables if auth_tables is None else auth_tables
        old = self.source
        if config.source == "map" and isinstance(old, _MapSource) and config.map == self.config.map:
            old.checked = float("-inf")
            self.config, self.auth_tables = config, tables
            return None
        new = _make_source(config, tables, self.reactor, self.pool, self.base, self.parse_pool)
        self.config, self.auth_tables, self.source = config, tables, new
        return old.stop()

    def stop(self) -> Any:
        """
        Close the store's connections (a Deferred for ldap, sql, http).
        """
        return self.source.stop()


def _lookup_failed(f: Any, source: Any) -> Any:
    if f.check(BackendError, QueueFull):
        raise SenderLookupError(f"{source.kind}: {f.getErrorMessage()}")
    if f.check(defer.TimeoutError):
        raise SenderLookupError(f"{source.kind}: no answer in time")
    return f
