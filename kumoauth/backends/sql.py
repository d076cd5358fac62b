"""
The ``sql`` credential store: a user's stored hash from an SQL database
through SQLAlchemy (``[auth] checker = "sql"``, table ``[auth.sql]``).

The operator's ``query`` is run with the bound parameter ``:user`` set to
authc, never with the name pasted into the SQL, so a name such as ``' OR
'1'='1`` is only ever a name.  What the query answers:

- no row: an unknown user (verified against a dummy hash, so the answer
  takes as long as for a known one) → ``535``;
- one row: its first column is the stored hash, in any form
  :mod:`kumoauth.backends.schemes` reads; NULL means a disabled account
  (``535``, like an unknown user).  Its other columns, by name, become
  conn_meta on success (``SELECT password, tenant FROM ...`` → ``tenant``),
  when their value survives JSON; a column whose value does not is left
  out and logged once;
- more than one row: the query is ambiguous for that name; denied, and
  logged once per user;
- the database unreachable, a timeout, an SQL error, a statement that
  returns no rows: :class:`~kumoauth.backends.base.BackendError` (``454``).

**Threads.**  The engine is SQLAlchemy's synchronous one; every lookup runs
in the checker pool (``pool.call``), never on the reactor thread.
SQLAlchemy's own connection pool holds at most ``pool_size`` connections
(no overflow), checked with a ping before use, so a restarted database
costs no failed attempt.

**Secrets.**  The database password may be in the URL (``user:password@``,
or ``?password=``, which libpq reads too), but ``password_file`` is
better: it stays out of the configuration file and is read again for every
new connection, so a rotated password is picked up without a reload.  Logs
and errors show the URL with ``***`` for the password, in either place,
and for every other URL parameter that holds one (``sslpassword``, MySQL
drivers' ``passwd``), and never the SQL query's parameters.
"""

from __future__ import annotations

import json
import math
import sqlite3
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import make_url
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kumoauth import checks as _config
from kumoauth.backends.base import (
    BackendError,
    Entry,
    HashStore,
    ICredentialStore,
    OncePer,
    StoreChecker,
    note_scheme,
    parse_table,
    read_secret_file,
)
from kumoauth.ops.threads import QueueFull
from kumoauth.textsafe import escape

log = Logger(namespace="kumoauth.backends")

#: URL schemes that mean PostgreSQL through psycopg 3, the driver kumoauth
#: installs (SQLAlchemy 2.0 would pick psycopg2 for a bare ``postgresql``)
_PSYCOPG_ALIASES = frozenset({"postgresql", "postgres"})

#: a lookup still unanswered after ``timeout`` times this is given up
#: (454), whatever the driver does
_BACKSTOP = 2


@dataclass(frozen=True)
class Config:
    """
    ``[auth.sql]``: where the database is, the query that finds a user,
    and how long a lookup may take.
    """

    url: str
    query: str
    password_file: Path | None = None
    pool_size: int = 5
    timeout: float = 5.0


SCHEMA: dict[str, Callable[[Any], Any]] = {
    "url": _config._str,
    "query": _config._str,
    "password_file": _config._str,
    "pool_size": _config._int(1),
    "timeout": _config._number(0.1),
}


def validate(raw: Mapping[str, Any], base: Path | None = None) -> Config:
    """
    The ``[auth.sql]`` table as a :class:`Config`.  ``ValueError`` with one
    line (``key: problem``) that never holds the URL's password: a URL
    that does not parse, names a database without its driver, a port
    outside 1-65535, an in-memory SQLite or a SQLite file that is not there;
    a query that is not one statement or binds anything but ``:user``; a
    password given twice (in the URL, as ``user:password@`` or
    ``?password=``, and in ``password_file``), or a password file that
    cannot be read.
    """
    cfg: Config = parse_table(
        Config, raw, SCHEMA, required=("url", "query"), paths=("password_file",), base=base
    )
    url = _engine_url(cfg.url)
    _check_connect_args(url)
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ValueError("url: an in-memory SQLite database holds no users; give a file")
        if cfg.password_file is not None:
            raise ValueError("password_file: SQLite has no password")
        _check_sqlite_file(url)
    if cfg.password_file is not None:
        if url.password is not None or _query_values(url, _is_password):
            raise ValueError("password_file: the url has a password too; give only one")
        read_secret_file(cfg.password_file, "password_file")
    _check_query(cfg.query)
    return cfg


def from_argstring(arg: str) -> Config:
    """
    The store for ``twistd kumoauth --auth sql:<arg>``: *arg* is the path
    of a TOML file holding the keys of ``[auth.sql]``, either at its top
    level or in an ``[auth.sql]`` table (so kumoauth's own configuration
    file will do).  Relative paths in it are against its directory.

    Not ``URL#QUERY`` on the command line: the database password would be
    in every ``ps`` listing, and a query needs quoting in every shell.
    """
    path = Path(arg).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None
    table = data.get("auth", {}).get("sql") if isinstance(data.get("auth"), dict) else None
    if table is None:
        table = {k: v for k, v in data.items() if k != "auth"}
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [auth.sql] is not a table")
    try:
        return validate(table, base=path.absolute().parent)
    except ValueError as e:
        raise ValueError(f"{path}: [auth.sql] {e}") from None


def factory(config: Config, reactor: Any, pool: Any, metrics: Any = None) -> StoreChecker:
    """
    The checker for ``[auth] checker = "sql"``.
    """
    store = SQL.from_config(config, reactor=reactor, pool=pool)
    return StoreChecker(store, reactor, metrics)


factory.validate = validate  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# checking the table


def _engine_url(value: str) -> Any:
    """
    The SQLAlchemy URL of *value*, ``postgresql://`` made psycopg 3's.
    ``ValueError`` without the value (it may hold a password).
    """
    try:
        url = make_url(value)
    except (exc.ArgumentError, ValueError):
        raise ValueError(
            "url: not a SQLAlchemy URL (dialect+driver://user@host/database)"
        ) from None
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"url: port {url.port}: must be 1-65535")
    if url.drivername in _PSYCOPG_ALIASES:
        url = url.set(drivername="postgresql+psycopg")
    try:
        dialect = url.get_dialect()
    except exc.NoSuchModuleError:
        raise ValueError(f"url: SQLAlchemy knows no database {url.drivername!r}") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        raise ValueError(
            f"url: the driver for {url.drivername!r} is not installed ({e.name or e})"
        ) from None
    return url


def _check_connect_args(url: Any) -> None:
    """
    ``ValueError`` for what the dialect refuses in *url* only when it
    connects (a port that is not a number, ``?host=`` forms it cannot
    mix), or a port given as a query parameter (``?port=``,
    ``?host=h:port``) outside 1-65535: without this, start-up would
    succeed and every AUTH get 454.
    """
    try:
        _, params = url.get_dialect()().create_connect_args(url)
    except (exc.ArgumentError, ValueError, TypeError) as e:
        message = _scrub(_first_line(str(e)), _secrets(url))
        raise ValueError(f"url: {message}") from None
    given = params.get("port")
    if given is None:
        return
    # one port, or libpq's list of them ("5432,5433"; empty: the default)
    listed = given if isinstance(given, list | tuple) else [given]
    for part in ",".join(str(p) for p in listed).split(","):
        part = part.strip()
        if part and not (part.isdigit() and 1 <= int(part) <= 65535):
            raise ValueError(f"url: port {part[:16]}: must be 1-65535")


def _check_sqlite_file(url: Any) -> None:
    """
    ``ValueError`` unless the SQLite file of *url* is there and readable:
    SQLite would make an empty database (or fail, for a missing
    directory) at the first lookup, and every AUTH get 454.  A URI
    filename (``?uri=true``) is SQLite's to resolve.
    """
    if str(url.query.get("uri", "")).lower() in ("true", "1", "yes", "on"):
        return
    path = url.database
    problem = _config.file_problem(path)
    if problem is not None:
        raise ValueError(f"url: the SQLite file {path}: {problem}")


def _is_secret(name: str) -> bool:
    """
    Whether the query parameter *name* holds a secret, to be hidden:
    ``password``, ``sslpassword`` (libpq), ``passwd`` (MySQL drivers)
    and the like.
    """
    name = name.lower()
    return "password" in name or name in ("passwd", "pwd")


def _is_password(name: str) -> bool:
    """
    Whether the query parameter *name* is the database password itself
    (what ``password_file`` gives), not another secret like libpq's
    ``sslpassword`` (the client key's).
    """
    return name.lower() in ("password", "passwd", "pwd")


def _query_values(url: Any, which: Callable[[str], bool]) -> list[str]:
    """The values of *url*'s query parameters whose name *which* accepts."""
    found: list[str] = []
    for name, value in url.query.items():
        if which(name):
            found.extend([value] if isinstance(value, str) else list(value))
    return found


def _secrets(url: Any) -> tuple[str, ...]:
    """
    The secrets in *url*, each also as the URL writes it (percent-encoded),
    longest first, to scrub from messages.
    """
    values = [url.password] if url.password else []
    values += [v for v in _query_values(url, _is_secret) if v]
    forms = {form for v in values for form in (str(v), quote(str(v), safe=""), quote_plus(str(v)))}
    return tuple(sorted(forms, key=len, reverse=True))


def _shown(url: Any) -> str:
    """
    *url* as logs and errors show it: ``***`` for the password, in the
    user part and in every query parameter that holds a secret.
    """
    hidden = {name: "***" for name in url.query if _is_secret(name)}
    if hidden:
        url = url.update_query_dict(hidden)
    shown: str = url.render_as_string(hide_password=True)
    return shown.replace("=%2A%2A%2A", "=***")


def _check_query(query: str) -> None:
    """
    ``ValueError`` unless *query* is one statement whose only bound
    parameter is ``:user``.  What the database thinks of it shows at the
    first lookup (an SQL error there is a 454 and one log line).
    """
    try:
        names = set(text(query).compile().params)
    except exc.SQLAlchemyError as e:
        raise ValueError(f"query: {e}") from None
    if "user" not in names:
        raise ValueError("query: must contain the bound parameter :user (the user name)")
    others = sorted(names - {"user"})
    if others:
        listed = ", ".join(f":{n}" for n in others)
        raise ValueError(f"query: only :user is bound, not {listed}")
    body = query.strip().rstrip(";").rstrip()
    # SQLite's tokenizer knows the quotes and comments every SQL dialect
    # shares: it finds a quote left open, or a ";" that ends a statement
    # with more after it (drivers refuse several statements with bound
    # parameters anyway; this says so at start-up instead).
    if not sqlite3.complete_statement(body + ";"):
        raise ValueError("query: a quote or comment is not closed")
    for i, ch in enumerate(body):
        if ch == ";" and sqlite3.complete_statement(body[: i + 1]):
            raise ValueError("query: must be one statement (it has a ';' in the middle)")


def _connect_args(url: Any, timeout: float) -> dict[str, Any]:
    """
    The driver's own timeouts, where it has them: PostgreSQL's connect,
    statement and unacknowledged-data timeouts; SQLite's wait for a lock.
    A value the URL sets itself wins.
    """
    backend = url.get_backend_name()
    query = url.query
    args: dict[str, Any] = {}
    if backend == "postgresql" and url.get_driver_name() == "psycopg":
        if "connect_timeout" not in query:
            # libpq counts whole seconds and treats 1 as 2
            args["connect_timeout"] = max(2, math.ceil(timeout))
        if "tcp_user_timeout" not in query:
            args["tcp_user_timeout"] = int(timeout * 1000)
        options = f"-c statement_timeout={int(timeout * 1000)}"
        given = query.get("options")
        if given:
            # an explicit statement_timeout in the URL's options comes later
            # and so wins
            options = f"{options} {given if isinstance(given, str) else ' '.join(given)}"
        args["options"] = options
    elif backend == "sqlite" and "timeout" not in query:
        args["timeout"] = timeout
    return args


# --------------------------------------------------------------------------
# the store


class _Problem(Exception):
    """A lookup that failed in an expected way; the message is safe to log."""


@dataclass(frozen=True)
class _Engine:
    """What one configuration opened: the engine and its parts."""

    engine: Any
    statement: Any
    shown: str  # the URL with *** for the password
    secrets: tuple[str, ...]  # to scrub from driver messages
    timeout: float
    pool_size: int


@implementer(ICredentialStore)
class SQL(HashStore):
    """
    Users in an SQL database (see the module docstring).  A policy makes
    one with the table's keys::

        users = SQL("postgresql://kumoauth@db/mail",
                    "SELECT password, tenant FROM users WHERE login = :user",
                    password_file="/etc/kumoauth/db-password")

    Without *pool*, lookups and verification run in the reactor's thread
    pool.  ``ValueError`` (one line) for a table :func:`validate` refuses.
    """

    name = "sql"

    def __init__(
        self,
        url: str,
        query: str,
        *,
        password_file: str | Path | None = None,
        pool_size: int = 5,
        timeout: float = 5.0,
        reactor: Any = None,
        pool: Any = None,
    ) -> None:
        raw: dict[str, Any] = {
            "url": url,
            "query": query,
            "pool_size": pool_size,
            "timeout": timeout,
        }
        if password_file is not None:
            raw["password_file"] = str(password_file)
        self._setup(validate(raw, base=Path.cwd()), reactor, pool)

    @classmethod
    def from_config(cls, config: Config, reactor: Any = None, pool: Any = None) -> SQL:
        """
        The store for a table :func:`validate` made.
        """
        store = cls.__new__(cls)
        store._setup(config, reactor, pool)
        return store

    def _setup(self, config: Config, reactor: Any, pool: Any) -> None:
        HashStore.__init__(self, pool=pool, reactor=reactor)
        self.config = config
        self.ambiguous = OncePer()
        self.unusable_columns = OncePer(1000)
        self.stopped = False
        self.current = _open(config)
        self.statements: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<SQL {self.current.shown}>"

    # --- lookup ------------------------------------------------------------

    def lookup(self, authc: str) -> defer.Deferred[Entry | None]:
        if self.stopped:
            return defer.fail(BackendError("the sql store was stopped", outage=False))
        if not _bindable(authc):
            # No row can have this name (a NUL, an unpaired surrogate): a
            # driver would refuse it with an error, which must not look like
            # an outage a client can cause at will.
            return defer.succeed(None)
        current = self.current
        d = self.pool.call(_fetch, current, authc)
        # The driver's timeouts free the thread; this one answers the client
        # when the driver cannot tell (a database that accepted the query and
        # hangs, a peer that acknowledges and never answers).
        d.addTimeout(_BACKSTOP * current.timeout, self.reactor, onTimeoutCancel=_timed_out)
        d.addCallbacks(self._entry, _pool_failed, callbackArgs=(authc,))
        return d

    def _entry(self, found: tuple[Sequence[str], list[tuple[Any, ...]]], authc: str) -> Any:
        keys, rows = found
        if not rows:
            return None
        if len(rows) > 1:
            if self.ambiguous.first(authc):
                log.error(
                    "auth backend sql: the query returned more than one row for user {user}; "
                    "denied until it returns one",
                    user=escape(authc),
                )
            return None
        row = rows[0]
        stored = _hash_text(row[0])
        if stored is None:
            return None  # NULL: a disabled account
        note_scheme(self, stored)
        return Entry(stored, self._meta(keys[1:], row[1:]))

    def _meta(self, keys: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for key, value in zip(keys, values, strict=True):
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                if self.unusable_columns.first(key):
                    log.warn(
                        "auth backend sql: column {column} ({kind}) is not JSON and is left "
                        "out of conn_meta; cast it in the query (CAST(... AS TEXT))",
                        column=escape(key),
                        kind=type(value).__name__,
                    )
                continue
            meta[key] = value
        return meta

    # --- other lookups (sender binding) --------------------------------------

    def values(self, query: str, user: str) -> defer.Deferred[list[str]]:
        """
        The first column of every row *query* (one statement binding only
        ``:user``, checked like ``query``) returns for *user*, as text, in
        the same pool and on the same connections as authentication; NULLs
        are skipped, at most :data:`MAX_VALUES` rows are read.
        :class:`BackendError` when the database cannot answer;
        ``ValueError`` (at once) for a query :func:`validate` would refuse.
        """
        if self.stopped:
            return defer.fail(BackendError("the sql store was stopped", outage=False))
        if not _bindable(user):
            return defer.succeed([])
        statement = self.statements.get(query)
        if statement is None:
            _check_query(query)
            statement = self.statements[query] = text(query)
        current = self.current
        d = self.pool.call(_fetch_values, current, statement, user)
        d.addTimeout(_BACKSTOP * current.timeout, self.reactor, onTimeoutCancel=_timed_out)
        d.addErrback(_pool_failed)
        return d

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        log.info(
            "auth backend sql: {url}, at most {n} connections",
            url=self.current.shown,
            n=self.current.pool_size,
        )

    def reload(self, config: Config) -> defer.Deferred[None] | None:
        """
        A new table: new lookups use it at once; the previous engine's
        idle connections are closed (in the pool), busy ones when they
        finish.
        """
        if config == self.config:
            return None
        old, new = self.current, _open(config)
        self.config, self.current = config, new
        self.ambiguous.clear()
        self.unusable_columns.clear()
        self.changed()
        return self._dispose(old)

    def stop(self) -> defer.Deferred[None]:
        """
        Close the connections; later attempts get 454.
        """
        self.stopped = True
        return self._dispose(self.current)

    def _dispose(self, opened: _Engine) -> defer.Deferred[None]:
        d = self.pool.call(opened.engine.dispose)
        d.addTimeout(opened.timeout, self.reactor)

        def failed(f: Failure) -> None:
            log.warn(
                "auth backend sql: closing the connections to {url} failed: {error}",
                url=opened.shown,
                error=_scrub(f.getErrorMessage(), opened.secrets),
            )

        return d.addErrback(failed)


def _open(config: Config) -> _Engine:
    """
    The engine for *config* (no connection yet): at most ``pool_size``
    connections, pinged before use, each in autocommit (a lookup is one
    SELECT: no BEGIN/ROLLBACK round trips), parameters never in SQLAlchemy's
    messages.
    """
    url = _engine_url(config.url)
    secrets = list(_secrets(url))
    engine = create_engine(
        url,
        pool_size=config.pool_size,
        max_overflow=0,
        pool_timeout=config.timeout,
        pool_pre_ping=True,
        hide_parameters=True,
        isolation_level="AUTOCOMMIT",
        connect_args=_connect_args(url, config.timeout),
    )
    if config.password_file is not None:
        path = config.password_file
        secret = read_secret_file(path, "password_file")
        if secret:
            secrets.append(secret)

        @event.listens_for(engine, "do_connect")
        def with_password(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            # Read for each new connection, in the pool thread that opens it.
            try:
                cparams["password"] = read_secret_file(path, "password_file")
            except ValueError as e:
                raise _Problem(str(e)) from None

    return _Engine(
        engine=engine,
        statement=text(config.query),
        shown=_shown(url),
        secrets=tuple(sorted({str(s) for s in secrets}, key=len, reverse=True)),
        timeout=config.timeout,
        pool_size=config.pool_size,
    )


def _encodable(text: str, encoding: str) -> bool:
    """
    Whether *text* fits the database's *encoding*: a driver that binds on
    the server encodes the name alone, one that binds in the client (MySQL)
    the whole statement, so the error's own object cannot tell.
    """
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    except LookupError:  # an encoding Python does not know: cannot tell
        pass
    return True


def _bindable(authc: str) -> bool:
    return "\x00" not in authc and _encodable(authc, "utf-8")


def _hash_text(value: Any) -> str | None:
    """
    The stored hash as text; None for NULL.  A column of bytes is read as
    UTF-8 (what cannot be read is left for :func:`schemes.verify` to refuse).
    """
    if value is None:
        return None
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _run(
    current: _Engine, statement: Any, user: str, most: int
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """
    Run *statement* for *user* (blocking: in the pool) and read at most
    *most* rows: the column names and the rows.  Expected failures become
    :class:`BackendError` with a message safe to log.
    """
    try:
        with current.engine.connect() as conn:
            result = conn.execute(statement, {"user": user})
            if not result.returns_rows:
                raise _Problem("the query returns no rows (it must be a SELECT)")
            keys = list(result.keys())
            rows = [tuple(row) for row in result.fetchmany(most)]
            result.close()
    except _Problem as e:
        raise BackendError(f"{current.shown}: {e}") from None
    except UnicodeEncodeError as e:
        if not _encodable(user, e.encoding):
            # The database's encoding (LATIN1, SQL_ASCII…) cannot hold the
            # name, so no row has it; not an outage a client can cause.
            return [], []
        raise BackendError(f"{current.shown}: {type(e).__name__}: {e.reason}") from None
    except exc.TimeoutError:
        raise BackendError(
            f"{current.shown}: no free connection within {current.timeout:g}s "
            f"(all {current.pool_size} busy)"
        ) from None
    except exc.DBAPIError as e:
        raise BackendError(f"{current.shown}: {_driver_message(e, current.secrets)}") from None
    except exc.SQLAlchemyError as e:
        message = _scrub(_first_line(str(e)), current.secrets)
        raise BackendError(f"{current.shown}: {type(e).__name__}: {message}") from None
    return keys, rows


def _fetch(current: _Engine, authc: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """
    The authentication query for *authc*: at most two rows are read, two
    already make it ambiguous.
    """
    return _run(current, current.statement, authc, 2)


#: most rows :meth:`SQL.values` reads
MAX_VALUES = 10_000


def _fetch_values(current: _Engine, statement: Any, user: str) -> list[str]:
    """
    :meth:`SQL.values` in the pool: the first column of up to
    :data:`MAX_VALUES` rows, as text.
    """
    _, rows = _run(current, statement, user, MAX_VALUES)
    out: list[str] = []
    for row in rows:
        value = _hash_text(row[0]) if len(row) else None
        if value:
            out.append(value)
    return out


def _driver_message(e: Any, secrets: Sequence[str]) -> str:
    """
    The driver's own error, first line only: not SQLAlchemy's, which adds
    the statement, and not the rest of PostgreSQL's, which quotes it.
    """
    orig = e.orig if e.orig is not None else e
    message = _first_line(str(orig)) or type(orig).__name__
    return f"{type(orig).__name__}: {_scrub(message, secrets)}"


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else ""


def _scrub(message: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message


def _timed_out(result: Any, timeout: float) -> Any:
    raise BackendError(f"no answer within {timeout:g}s")


def _pool_failed(f: Failure) -> Any:
    if f.check(QueueFull):
        # The server is busy, not the database down: no outage line.
        raise BackendError("too many lookups waiting for a thread", outage=False)
    return f
