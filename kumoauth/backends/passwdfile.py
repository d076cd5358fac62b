"""
A passwd-file as a credential store: Dovecot's passwd-file format and
Apache's htpasswd, the files operators already keep.

One user a line::

    user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra_fields]
    user:hash

Blank lines and lines whose first non-blank character is ``#`` are
ignored.  The hash is any form :mod:`kumoauth.backends.schemes` reads.  User
names compare exactly, as Dovecot's passwd-file does by default (``Scott``
is not ``scott``).  Of Dovecot's extra fields, every one with which
Dovecot refuses a login is honoured, so a file moved over from Dovecot is
not more permissive here (:func:`_restrictions`): ``nologin``, ``fail``
and ``noauthenticate`` (never), ``allow_nets=<ip>[/<bits>],...`` (only
from those networks), ``allow_real_nets=...`` (only over a connection
from those networks: the proxy's address when a proxy named the client),
``delay_until=<time>`` (not before then), ``user=`` with no name, and
those fields brought in by ``passdb_import`` or with a ``:protected``
suffix.  The others (``nopassword`` included: a password is always
checked) are ignored.

**Re-reading.**  The file is re-read when it changes on disk, without a
restart or SIGHUP.  At most every ``check_interval`` seconds a lookup
stat()s it (inode, size, mtime); a changed stat means a read and parse in
the thread pool, never on the reactor thread, and lookups wait for that one
read.  A half-written file never replaces a table already in use: a file
that is empty, does not end with a newline, or changed while it was read is
refused (one log line), and read again at the next check.  A file that has
gone (an editor's rename in progress) keeps the table too.  mtime has a
coarse granularity, so a file modified within the last two seconds is read
again at the next check even when its stat looks unchanged; its content
digest says whether anything changed.  On a change of content, subscribers
(the verified-credential cache) are told (:meth:`HashStore.changed`).

**Timing.**  An unknown user's password is verified against a dummy hash of
the scheme, and the costs, most users in the file have (Argon2 memory and
passes, bcrypt cost: ``htpasswd -B`` uses bcrypt cost 5, kumoauth's own
dummy 10), so that "no such user" takes as long as "wrong password".
"""

from __future__ import annotations

import collections
import errno
import hashlib
import ipaddress
import math
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from kumoauth.backends import schemes
from kumoauth.backends.base import (
    DENIED,
    BackendError,
    Entry,
    HashStore,
    StoreChecker,
    Verdict,
    client_ip,
    note_scheme,
    parse_table,
    peer_ip,
)
from kumoauth.checks import _number, _str, file_problem
from kumoauth.ops.threads import QueueFull
from kumoauth.textsafe import escape

log = Logger(namespace="kumoauth.backends")

#: a file modified this recently may be modified again within the same
#: mtime tick: read it again at the next check whatever its stat says
RACY_NS = 2_000_000_000

#: problems with lines logged per read; the rest are counted
MAX_PROBLEMS_LOGGED = 20

#: Dovecot's longest ``delay_until`` wait (AUTH_REQUEST_MAX_DELAY_SECS):
#: further ahead, it refuses the login
MAX_DELAY = 300

#: extra fields with which Dovecot refuses every login of the line
#: (``noauthenticate``: it does not authenticate, and no passdb after it
#: here would)
REFUSING = frozenset({"nologin", "fail", "noauthenticate"})

_DELAY_UNTIL = re.compile(r"(-?[0-9]+)(?:\+([0-9]+))?", re.ASCII)


@dataclass(frozen=True)
class Config:
    """``[auth.passwd-file]``."""

    path: Path
    check_interval: float = 1.0


SCHEMA: dict[str, Callable[[Any], Any]] = {
    "path": _str,
    "check_interval": _number(0.0),
}


def validate(raw: Mapping[str, Any], base: Path | None = None) -> Config:
    """
    The table as a :class:`Config`.  The file must exist and be readable
    now: a missing or unreadable file is an operator's mistake, and this
    makes it one start-up (or SIGHUP) error line instead of 454s later.
    """
    config: Config = parse_table(
        Config, raw, SCHEMA, required=("path",), paths=("path",), base=base
    )
    _check_readable(config.path)
    return config


def _check_readable(path: Path) -> None:
    problem = file_problem(path)
    if problem is not None:
        raise ValueError(f"path: {path}: {problem}")


def from_argstring(arg: str) -> Config:
    """
    ``twistd kumoauth --auth passwd-file:<arg>``: *arg* is the file's path
    (relative to the working directory); ``check_interval`` is the default.
    """
    return validate({"path": arg}, base=Path.cwd())


def factory(config: Config, reactor: Any, pool: Any, metrics: Any = None) -> StoreChecker:
    """
    The ``passwd-file`` checker: the file is first read in the thread pool
    by ``start()`` (or the first lookup), not here.
    """
    store = PasswdFile(
        config.path, check_interval=config.check_interval, reactor=reactor, pool=pool
    )
    return StoreChecker(store, reactor, metrics)


factory.validate = validate  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# parsing (pure; runs in the thread pool)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class User:
    """One user's line: the stored hash, where it is, its restrictions."""

    hash: str = field(repr=False)
    line: int
    #: the extra field that refuses every login of this line, or None
    refused_by: str | None = None
    #: one tuple per ``allow_nets`` field: the client's address must be in
    #: each (an empty tuple: from nowhere, its value had no usable network)
    allow_nets: tuple[tuple[Network, ...], ...] = ()
    #: the same per ``allow_real_nets``, for the TCP peer's address
    allow_real_nets: tuple[tuple[Network, ...], ...] = ()
    #: ``delay_until``: no login before this Unix time
    delay_until: int | None = None

    @property
    def has_password(self) -> bool:
        """False for a line without one (userdb only) or a locked one (``!``, ``*``)."""
        return bool(self.hash) and not self.hash.startswith(("!", "*"))

    def refusal(self, ip: str | None, peer: str | None) -> str | None:
        """
        The field that refuses a login from *ip* over a connection from
        *peer* (None: not known), or None if none does.
        """
        if self.refused_by is not None:
            return self.refused_by
        if not all(_within(ip, nets) for nets in self.allow_nets):
            return "allow_nets"
        if not all(_within(peer, nets) for nets in self.allow_real_nets):
            return "allow_real_nets"
        return None


def _within(ip: str | None, nets: tuple[Network, ...]) -> bool:
    if ip is None:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in nets)


@dataclass
class Parsed:
    users: dict[str, User]
    #: operator lines: line numbers and user names, never a hash
    problems: list[str]
    #: the stored hash most users have, to make the unknown user's dummy from
    sample: str | None


def parse(data: bytes, path: Path | str) -> Parsed:
    """
    The users of a passwd-file or htpasswd file.  Malformed lines are
    skipped and reported by line number only (a line without ``:`` may be
    a bare hash); of a user listed twice the first line counts, as in
    Dovecot.
    """
    users: dict[str, User] = {}
    problems: list[str] = []
    by_scheme: collections.Counter[tuple[str, str]] = collections.Counter()
    samples: dict[tuple[str, str], str] = {}
    # A byte order mark (Notepad writes one) would become part of the
    # first user's name, and that user could never log in.
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, 1):
        where = f"{path} line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{where}: not UTF-8; line skipped")
            continue
        line = line.removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, colon, rest = line.partition(":")
        if not colon:
            problems.append(f"{where}: no ':' after a user name; line skipped")
            continue
        if not name:
            problems.append(f"{where}: empty user name; line skipped")
            continue
        if name in users:
            problems.append(
                f"{where}: user {escape(name)} again (first on line {users[name].line}); "
                "this line is ignored"
            )
            continue
        unreachable = _unreachable(name)
        if unreachable:
            # Kept (a policy may look it up as written), but said: an NFD
            # "zoë" from a macOS tool got 535 with the right password.
            problems.append(f"{where}: user {escape(name)} {unreachable}")
        fields = rest.split(":", 6)
        stored = fields[0]
        user = User(stored, number)
        if len(fields) == 7:
            user = _restrictions(user, fields[6], name, where, problems)
        users[name] = user
        key = _cost_key(stored)
        if key is not None:
            by_scheme[key] += 1
            samples.setdefault(key, stored)
    sample = samples[by_scheme.most_common(1)[0][0]] if by_scheme else None
    return Parsed(users, problems, sample)


def _unreachable(name: str) -> str | None:
    """
    Why no login reaches the stored user *name* (a login is SASLprep'd
    first: :func:`~kumoauth.auth.sasl.prepare_name`), or None if one does.
    """
    if name.isascii() and name.isprintable():
        return None
    from kumoauth.auth.sasl import SASLError, prepare_name

    try:
        prepared = prepare_name(name, "user name")
    except SASLError as e:
        return f"can never log in: {e.reason} (SASLprep)"
    if prepared != name:
        return (
            f"can never log in: a login becomes {escape(prepared)} (SASLprep: NFKC); "
            "write the name in that form"
        )
    return None


def _restrictions(user: User, extra: str, name: str, where: str, problems: list[str]) -> User:
    """
    *user* with the restrictions of its extra fields, read as Dovecot's
    passwd-file passdb reads them (``auth_request_set_field``): fields are
    separated by spaces only; each ``allow_nets`` (``allow_real_nets``)
    field is a check of its own, so all must pass; ``key:protected``
    counts unless the key came before; ``passdb_import``'s value holds
    more fields, separated by tabs, taken where it stands.  A field kumoauth
    cannot read is never ignored when Dovecot would refuse on it: it
    refuses.  ``key:remove`` lifts no refusal here (in Dovecot it can undo
    a ``nologin``): a line is never more permissive than under Dovecot.
    """
    refused_by: str | None = None
    nets: list[tuple[Network, ...]] = []
    real_nets: list[tuple[Network, ...]] = []
    delay_until: int | None = None
    seen: set[str] = set()
    todo = [item for item in extra.split(" ") if item]
    while todo:
        key, _, value = todo.pop(0).partition("=")
        key = key.lower()
        if key.endswith(":remove"):
            seen.discard(key.removesuffix(":remove"))
            continue
        if key.endswith(":protected"):
            key = key.removesuffix(":protected")
            if key in seen:
                continue
        if key == "passdb_import":  # not a field itself: never "came before"
            todo[:0] = [item for item in value.split("\t") if item]
            continue
        seen.add(key)
        if key in REFUSING:
            refused_by = refused_by or key
        elif not value and (key == "user" or key == "username" and "@" not in name):
            # Dovecot: "username attempted to be changed to empty"
            refused_by = refused_by or f"{key}="
        elif key in ("allow_nets", "allow_real_nets"):
            (nets if key == "allow_nets" else real_nets).append(
                _networks(value, key, name, where, problems)
            )
        elif key == "delay_until":
            stamp = _delay_until(value)
            if stamp is None:
                problems.append(
                    f"{where}: user {escape(name)}: delay_until is not a Unix time "
                    "(with an optional +seconds); this user cannot log in"
                )
                refused_by = refused_by or key
            else:
                delay_until = stamp if delay_until is None else max(delay_until, stamp)
    return User(
        user.hash,
        user.line,
        refused_by=refused_by,
        allow_nets=tuple(nets),
        allow_real_nets=tuple(real_nets),
        delay_until=delay_until,
    )


def _delay_until(value: str) -> int | None:
    """
    ``delay_until``'s time, None if Dovecot would not read the value (it
    refuses the login then): a Unix time (64 bits), optionally followed by
    ``+<seconds>`` of random extra wait (32 bits; kumoauth does not wait).
    """
    m = _DELAY_UNTIL.fullmatch(value)
    if m is None:
        return None
    stamp = int(m.group(1))
    if not -(2**63) <= stamp < 2**63 or m.group(2) is not None and int(m.group(2)) >= 2**32:
        return None
    return stamp


def _networks(
    value: str, key: str, name: str, where: str, problems: list[str]
) -> tuple[Network, ...]:
    """
    An ``allow_nets`` value's networks, as Dovecot's ``net_parse_range``
    reads them: ``<address>[/<bits>]``, separated by commas.  An entry that
    is not one matches nothing (fail closed).
    """
    found = []
    tokens = [token for token in value.split(",") if token]
    for token in tokens:
        net = _network(token)
        if net is None:
            problems.append(
                f"{where}: user {escape(name)}: an {key} entry is not an address or "
                "network; it matches nothing"
            )
        else:
            found.append(net)
    if not tokens:
        problems.append(
            f"{where}: user {escape(name)}: {key} lists no network; this user cannot log in"
        )
    return tuple(found)


def _network(token: str) -> Network | None:
    address, slash, bits = token.partition("/")
    if "%" in address or slash and not (bits.isascii() and bits.isdigit()):
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    prefix = int(bits) if slash else ip.max_prefixlen
    if prefix > ip.max_prefixlen:
        return None
    return ipaddress.ip_network((ip, prefix), strict=False)


_ARGON2_COSTS = re.compile(r"\$m=(\d{1,10}),t=(\d{1,10}),p=\d{1,3}\$")
_BCRYPT_COST = re.compile(r"\$2[aby]\$(\d\d)\$")


def _cost_key(stored: str) -> tuple[str, str] | None:
    """(scheme, costs) of a stored hash, None if no scheme reads it."""
    try:
        scheme = schemes.scheme_of(stored)
    except ValueError:
        return None
    if scheme in ("ARGON2ID", "ARGON2I"):
        m = _ARGON2_COSTS.search(stored)
        return scheme, m.group(0) if m else ""
    if scheme == "BLF-CRYPT":
        cost = _bcrypt_cost(stored)
        return (scheme, str(cost)) if cost is not None else None
    return scheme, ""


def _bcrypt_cost(stored: str) -> int | None:
    """The cost of a bcrypt hash in any of its forms (``{BLF-CRYPT}``, ``{CRYPT}``, bare)."""
    m = _BCRYPT_COST.search(stored)
    return int(m.group(1)) if m else None


def dummy_like(stored: str) -> str | None:
    """
    A hash of a random password with the scheme and costs of *stored*
    (Argon2 memory and passes, bcrypt cost; other schemes at
    :mod:`~kumoauth.backends.schemes`' defaults), None if none can be made.
    Blocking: it hashes.
    """
    try:
        scheme = schemes.scheme_of(stored)
    except ValueError:
        return None
    params = schemes.DEFAULT
    try:
        if scheme in ("ARGON2ID", "ARGON2I"):
            m = _ARGON2_COSTS.search(stored)
            if m is not None:
                params = schemes.Params(
                    argon2_time_cost=int(m.group(2)),
                    argon2_memory_kib=int(m.group(1)),
                    bcrypt_cost=params.bcrypt_cost,
                )
        elif scheme == "BLF-CRYPT":
            cost = _bcrypt_cost(stored)
            if cost is None:
                return None
            params = schemes.Params(
                params.argon2_time_cost, params.argon2_memory_kib, bcrypt_cost=cost
            )
        return schemes.dummy(scheme, params)
    except (ValueError, RuntimeError, MemoryError):
        return None


# --------------------------------------------------------------------------
# reading (runs in the thread pool)


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class Read:
    """What one read of the file found."""

    #: "loaded", "unchanged", "refused" (kept the table), "error" (no access)
    outcome: str
    reason: str = ""
    stamp: tuple[int, int, int, int] | None = None
    digest: bytes = b""
    parsed: Parsed | None = None
    dummy: str | None = None
    #: modified so recently that an unchanged stat proves nothing yet
    racy: bool = False
    gone: bool = False


def read_file(path: Path, complete_only: bool, digest: bytes) -> Read:
    """
    Read and parse *path*, unless it looks half-written (*complete_only*:
    there is a table to keep) or its content digest is still *digest*.
    """
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            return Read("error", reason="not a regular file")
        with open(path, "rb") as f:
            opened = os.fstat(f.fileno())
            data = f.read()
        after = os.stat(path)
    except OSError as e:
        return Read("error", reason=str(e.strerror or e), gone=e.errno == errno.ENOENT)
    stamp = _stamp(opened)
    racy = time.time_ns() - opened.st_mtime_ns < RACY_NS
    if not (_stamp(before) == stamp == _stamp(after)) or len(data) != opened.st_size:
        return Read("refused", reason="it changed while being read", stamp=stamp, racy=True)
    if complete_only and not data:
        return Read("refused", reason="it is empty (still being written?)", stamp=stamp)
    if complete_only and not data.endswith(b"\n"):
        return Read(
            "refused",
            reason="it does not end with a newline (still being written?)",
            stamp=stamp,
        )
    new_digest = hashlib.sha256(data).digest()
    if new_digest == digest:
        return Read("unchanged", stamp=stamp, digest=new_digest, racy=racy)
    parsed = parse(data, path)
    dummy = dummy_like(parsed.sample) if parsed.sample is not None else None
    return Read("loaded", stamp=stamp, digest=new_digest, parsed=parsed, dummy=dummy, racy=racy)


# --------------------------------------------------------------------------
# the store


class PasswdFile(HashStore):
    """
    Users of a Dovecot passwd-file or an htpasswd file (see the module
    docstring), re-read when the file changes.  Usable from a policy::

        users = PasswdFile("/etc/kumoauth/users")
        verdict = await users.check(authz, authc, password, conn_meta)
    """

    name = "passwd-file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        check_interval: float = 1.0,
        reactor: Any = None,
        pool: Any = None,
    ) -> None:
        super().__init__(pool=pool, reactor=reactor)
        self.path = Path(path)
        self.check_interval = check_interval
        self.users: dict[str, User] | None = None
        self.stamp: tuple[int, int, int, int] | None = None
        self.digest = b""
        self.racy = False
        self.next_check = 0.0
        self.error: str | None = None
        self.dummy_hash: str | None = None
        self.loading = False
        self.waiters: list[defer.Deferred[None]] = []
        # one log line per refused stamp (or reason), per disappearance
        self.refused: object = None
        self.gone = False

    def __repr__(self) -> str:
        count = "not read" if self.users is None else f"{len(self.users)} users"
        return f"<PasswdFile {str(self.path)!r} ({count})>"

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """Read the file now (in the pool), so the first AUTH need not."""
        return self._refresh()

    def reload(self, config: Config) -> defer.Deferred[None]:
        """SIGHUP with a changed table: take its path and interval, read it."""
        self.path = config.path
        self.check_interval = config.check_interval
        self.stamp = None
        self.refused = None
        self.next_check = 0.0
        return self._refresh()

    # --- lookups -----------------------------------------------------------

    def check(
        self, authz: str, authc: str, password: str, conn_meta: Any = None
    ) -> defer.Deferred[Verdict]:
        d = super().check(authz, authc, password, conn_meta)
        return d.addCallback(self._restrict, authc, conn_meta)

    def _restrict(self, verdict: Verdict, authc: str, conn_meta: Any) -> Verdict:
        # After the verification, so a refused login takes as long as any.
        if not verdict.ok:
            return verdict
        user = self.users.get(authc) if self.users is not None else None
        if user is None or not user.has_password:
            return DENIED  # the dummy matched, or the user went meanwhile
        ip, peer = client_ip(conn_meta), peer_ip(conn_meta)
        field = user.refusal(ip, peer)
        where = f"{self.path} line {user.line}"
        if field is None and user.delay_until is not None:
            wait = user.delay_until - self.reactor.seconds()
            if wait > MAX_DELAY:
                field = "delay_until"  # Dovecot refuses rather than wait that long
            elif wait > 0:
                # Dovecot would hold the answer until then: come back later.
                raise BackendError(
                    f"user {escape(authc)} ({where}) may not log in for another "
                    f"{math.ceil(wait)}s (delay_until)",
                    outage=False,
                )
        if field is not None:
            shown = peer if field == "allow_real_nets" else ip
            log.info(
                "auth backend {backend}: user {user} ({where}) may not log in from {ip} ({field})",
                backend=self.name,
                user=escape(authc),
                where=where,
                ip=escape(shown or "an unknown address"),
                field=field,
            )
            return DENIED
        return verdict

    def fresh(self) -> defer.Deferred[None] | None:
        """
        Before the verified-credential cache answers from memory: the check
        a lookup makes (a stat() once ``check_interval`` has passed), and
        if the file changed, a Deferred that fires once it is re-read (new
        content has cleared the cache by then: :meth:`changed`).  None when
        there is nothing to wait for; between checks, that costs one clock
        comparison.
        """
        if self._due():
            return self._refresh()
        return None

    def lookup(self, authc: str) -> Entry | None | defer.Deferred[Entry | None]:
        if self._due():
            return self._refresh().addCallback(lambda _: self._entry(authc))
        return self._entry(authc)

    def _entry(self, authc: str) -> Entry | None:
        if self.users is None:
            raise BackendError(
                f"cannot read the passwd-file {self.path}: {self.error or 'not read yet'}"
            )
        user = self.users.get(authc)
        if user is None or not user.has_password:
            # Unknown, or no password (a userdb-only line, a locked one):
            # verify against the dummy so the answer takes as long.
            if self.dummy_hash is not None:
                return Entry(self.dummy_hash, where="dummy")
            return None
        return Entry(user.hash, where=f"{self.path} line {user.line}")

    def _due(self) -> bool:
        """
        Whether this lookup must wait for a read: none yet, one under way,
        or the check interval passed and the file's stat changed.
        """
        if self.loading:
            return True
        now = self.reactor.seconds()
        if now < self.next_check:
            return False
        if self.users is None or self.racy:
            return True
        self.next_check = now + self.check_interval
        try:
            # A stat on the reactor thread: one syscall, no reading.
            stamp = _stamp(os.stat(self.path))
        except OSError as e:
            self._note_gone(str(e.strerror or e))
            return False
        if self.gone:
            self.gone = False
        return stamp != self.stamp

    # --- reading -----------------------------------------------------------

    def _refresh(self) -> defer.Deferred[None]:
        """Read the file in the pool; concurrent callers share one read."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self.waiters.append(waiter)
        if not self.loading:
            self.loading = True
            self.next_check = self.reactor.seconds() + self.check_interval
            complete_only = self.users is not None
            d = self.pool.call(read_file, self.path, complete_only, self.digest)
            d.addCallbacks(self._done, self._read_failed)
        return waiter

    def _read_failed(self, f: Failure) -> None:
        if f.check(QueueFull):
            reason = "the checker thread pool is full"
        else:
            log.failure(
                "auth backend {backend}: reading {path} failed",
                f,
                backend=self.name,
                path=str(self.path),
            )
            reason = f"reading it failed ({type(f.value).__name__})"
        self._done(Read("error", reason=reason))

    def _done(self, result: Read) -> None:
        self.loading = False
        try:
            self._apply(result)
        finally:
            waiters, self.waiters = self.waiters, []
            for w in waiters:
                if not w.called:  # a caller that gave up cancelled its own
                    w.callback(None)

    def _apply(self, result: Read) -> None:
        if result.outcome == "error":
            if self.users is None:
                if result.reason != self.error:
                    log.error(
                        "auth backend {backend}: cannot read {path}: {reason}; "
                        "AUTH gets 454 until it can",
                        backend=self.name,
                        path=str(self.path),
                        reason=result.reason,
                    )
                self.error = result.reason
            elif result.gone:
                self._note_gone(result.reason)
            else:
                self._note_refused(result.stamp, result.reason)
            return
        self.gone = False
        if result.outcome == "refused":
            self.racy = result.racy
            if self.users is None:  # pragma: no cover - only a racing writer at start
                self.error = result.reason
            self._note_refused(result.stamp, result.reason)
            return
        self.stamp, self.racy, self.refused, self.error = result.stamp, result.racy, None, None
        if result.outcome == "unchanged":
            return
        parsed = result.parsed
        assert parsed is not None
        first = self.users is None
        self.users, self.digest = parsed.users, result.digest
        self.dummy_hash = result.dummy
        if parsed.sample is not None:
            note_scheme(self, parsed.sample)
        for problem in parsed.problems[:MAX_PROBLEMS_LOGGED]:
            log.warn("auth backend {backend}: {problem}", backend=self.name, problem=problem)
        more = len(parsed.problems) - MAX_PROBLEMS_LOGGED
        if more > 0:
            log.warn(
                "auth backend {backend}: {path}: {more} more problem lines not logged",
                backend=self.name,
                path=str(self.path),
                more=more,
            )
        log.info(
            "auth backend {backend}: {verb} {path}: {count} users",
            backend=self.name,
            verb="read" if first else "re-read",
            path=str(self.path),
            count=len(parsed.users),
        )
        if not first:
            self.changed()

    def _note_refused(self, stamp: tuple[int, int, int, int] | None, reason: str) -> None:
        key = stamp if stamp is not None else reason
        if key == self.refused:
            return
        self.refused = key
        log.warn(
            "auth backend {backend}: not re-reading {path}: {reason}; keeping the "
            "{count} users read before, trying again in {interval}s",
            backend=self.name,
            path=str(self.path),
            reason=reason,
            count=len(self.users or ()),
            interval=self.check_interval,
        )

    def _note_gone(self, reason: str) -> None:
        if self.gone:
            return
        self.gone = True
        log.warn(
            "auth backend {backend}: cannot read {path} ({reason}); keeping the {count} "
            "users read before",
            backend=self.name,
            path=str(self.path),
            reason=reason,
            count=len(self.users or ()),
        )
