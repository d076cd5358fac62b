"""
kumoauth.backends.sql against real databases: the PostgreSQL at
127.0.0.1:5432 (a database of our own, dropped afterwards), a PostgreSQL of
our own (``initdb``/``pg_ctl`` in a temporary directory, password
authentication) for the database password, SQLite files, and a real
``twistd kumoauth`` with ``checker = "sql"``.  Stored hashes come from the
real tools where there is one (``doveadm pw``, ``htpasswd``, ``mkpasswd``).

Outages are real: a loopback TCP forwarder in front of PostgreSQL that the
test stops (refused connections), or freezes (a database that accepted the
query and never answers).  Without PostgreSQL or a tool the test skips,
and fails when CI is set.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import psycopg
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.cred import error as cred_error
from twisted.internet import defer, protocol
from twisted.protocols import portforward

from kumoauth.auth import checkers
from kumoauth.auth.cred import BackendUnavailable, PlainCredentials
from kumoauth.backends import schemes
from kumoauth.backends import sql as sql_store
from kumoauth.backends.base import DENIED, BackendError, StoreChecker, Verdict
from kumoauth.backends.sql import SQL, Config, factory, from_argstring, validate
from kumoauth.meta import ConnMeta
from kumoauth.ops.threads import BlockingPool
from kumoauth.storage.spool import Spool
from tests.server import free_port, make_certs, run_twistd, running_server
from tests.test_schemes import (
    FAST,
    PASSWORD,
    WRONG,
    doveadm_hash,
    htpasswd_hash,
    mkpasswd_hash,
    need,
)
from tests.upstream import in_reactor, start_reactor

PG_HOST, PG_PORT = "127.0.0.1", 5432
DB_SECRET = "db-Secret-7f3a9"  # the own PostgreSQL's role password
QUERY = "SELECT password, tenant FROM users WHERE login = :user"


def fail_or_skip(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


# --------------------------------------------------------------------------
# fixtures: the reactor, the checker pool, the databases


@pytest.fixture(scope="module")
def reactor() -> Any:
    return start_reactor()


@pytest.fixture(scope="module")
def pool(reactor: Any) -> Iterator[BlockingPool]:
    p = BlockingPool(reactor, threads=4, max_queued=50, name="test-sql")
    p.start()
    yield p
    in_reactor(p.stop)


@pytest.fixture(scope="module")
def doveadm(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    conf = tmp_path_factory.mktemp("dovecot") / "dovecot.conf"
    conf.write_text("ssl = no\n")
    return [need("doveadm"), "-c", str(conf)]


@pytest.fixture(scope="module")
def hashes(doveadm: list[str]) -> dict[str, str]:
    """A stored hash of PASSWORD per user, most made by the real tools."""
    return {
        "alice": schemes.hash_password(PASSWORD, "ARGON2ID", FAST),
        "bob": doveadm_hash(doveadm, "SHA512-CRYPT"),
        "carol": htpasswd_hash("B"),
        "dave": mkpasswd_hash("yescrypt"),
    }


def admin() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            host=PG_HOST, port=PG_PORT, user="postgres", dbname="test", connect_timeout=3,
            autocommit=True,
        )  # fmt: skip
    except psycopg.OperationalError as e:
        fail_or_skip(f"PostgreSQL at {PG_HOST}:{PG_PORT} not reachable: {e}")
        raise


SCHEMA_SQL = """
CREATE TABLE users (
    login text NOT NULL,
    password text,
    tenant text,
    quota integer,
    created timestamptz DEFAULT now()
)
"""


def fill(conn: Any, hashes: dict[str, str]) -> None:
    rows = [(user, stored, f"tenant-{user}", 100) for user, stored in hashes.items()]
    rows += [
        ("disabled", None, "tenant-x", 1),
        ("twin", hashes["alice"], "tenant-a", 1),
        ("twin", hashes["alice"], "tenant-b", 1),
        ("broken", "not-a-hash", "tenant-x", 1),
    ]
    insert = "INSERT INTO users (login, password, tenant, quota) VALUES (%s, %s, %s, %s)"
    if isinstance(conn, sqlite3.Connection):
        insert = insert.replace("%s", "?")
    for row in rows:
        conn.execute(insert, row)


@pytest.fixture(scope="module")
def pg_db(hashes: dict[str, str]) -> Iterator[str]:
    """A database of our own on the running PostgreSQL; its name."""
    name = f"kumoauth_sql_{uuid.uuid4().hex[:12]}"
    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(
            host=PG_HOST, port=PG_PORT, user="postgres", dbname=name, autocommit=True
        ) as conn:
            conn.execute(SCHEMA_SQL)
            fill(conn, hashes)
        yield name
    finally:
        with admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg_url(pg_db: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{pg_db}"


def user_count(pg_db: str) -> int:
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname=pg_db) as conn:
        row = conn.execute("SELECT count(*) FROM users").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory, hashes: dict[str, str]) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "users.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(SCHEMA_SQL.replace("timestamptz DEFAULT now()", "text DEFAULT 'x'"))
        fill(conn, hashes)
        conn.execute("CREATE TABLE blobs (login text, password blob, born timestamp)")
        conn.execute(
            "INSERT INTO blobs VALUES ('alice', ?, '2024-01-01')", (hashes["alice"].encode(),)
        )
        conn.commit()
    return path


@pytest.fixture
def stores(reactor: Any, pool: BlockingPool) -> Iterator[list[SQL]]:
    """Stores made by a test, stopped (engines disposed) after it."""
    made: list[SQL] = []
    yield made
    for store in made:
        in_reactor(store.stop)


@pytest.fixture
def make_store(reactor: Any, pool: BlockingPool, stores: list[SQL]) -> Any:
    def make(url: str, query: str = QUERY, **kw: Any) -> SQL:
        store = SQL(url, query, reactor=reactor, pool=pool, **kw)
        stores.append(store)
        return store

    return make


def check(store: SQL, authc: str, password: str, authz: str = "") -> Verdict:
    result: Verdict = in_reactor(store.check, authz, authc, password, None)
    return result


def backend_error(store: SQL, authc: str = "alice", password: str = PASSWORD) -> BackendError:
    with pytest.raises(BackendError) as raised:
        check(store, authc, password)
    return raised.value


# --------------------------------------------------------------------------
# answers


@pytest.mark.parametrize("user", ["alice", "bob", "carol", "dave"])
def test_success_per_scheme_on_postgresql(make_store, pg_url, user):
    store = make_store(pg_url)
    verdict = check(store, user, PASSWORD)
    assert verdict.ok and verdict == Verdict(True, {"tenant": f"tenant-{user}"})


@pytest.mark.parametrize("user", ["alice", "carol"])
def test_success_on_sqlite(make_store, sqlite_db, user):
    store = make_store(f"sqlite:///{sqlite_db}")
    assert check(store, user, PASSWORD) == Verdict(True, {"tenant": f"tenant-{user}"})
    assert check(store, user, WRONG) == DENIED


@pytest.mark.parametrize(
    ("authc", "password", "authz"),
    [
        ("alice", WRONG, ""),
        ("bob", PASSWORD + "x", ""),
        ("nobody", PASSWORD, ""),
        ("alice", "", ""),
        ("", PASSWORD, ""),
        ("ALICE", PASSWORD, ""),  # the query compares exactly
        ("alice", PASSWORD, "bob"),  # a hash store cannot judge proxy authorization
    ],
    ids=["wrong", "wrong-suffix", "unknown", "empty-password", "empty-user", "case", "authz"],
)
def test_denied(make_store, pg_url, authc, password, authz):
    assert check(make_store(pg_url), authc, password, authz) == DENIED


def test_same_authz_is_fine(make_store, pg_url):
    assert check(make_store(pg_url), "alice", PASSWORD, "alice").ok


def test_null_hash_is_a_disabled_account(make_store, pg_url, captured_log):
    store = make_store(pg_url)
    assert check(store, "disabled", PASSWORD) == DENIED
    assert check(store, "disabled", "") == DENIED
    assert not captured_log.namespace("kumoauth.backends")


def test_two_rows_deny_and_log_once(make_store, pg_url, captured_log):
    store = make_store(pg_url)
    for _ in range(3):
        assert check(store, "twin", PASSWORD) == DENIED
    lines = [e for e in captured_log.events if "more than one row" in (e.get("log_format") or "")]
    assert len(lines) == 1 and lines[0]["user"] == "twin"


def test_an_unreadable_stored_hash_is_454_for_that_user_only(make_store, pg_url):
    store = make_store(pg_url)
    e = backend_error(store, "broken")
    assert not e.outage and "not-a-hash" not in str(e)
    assert check(store, "alice", PASSWORD).ok


def test_extra_columns_become_meta(make_store, pg_url, captured_log):
    store = make_store(
        pg_url,
        "SELECT password, tenant, quota, created, login AS authn_login FROM users "
        "WHERE login = :user",
    )
    for _ in range(2):
        verdict = check(store, "bob", PASSWORD)
        assert verdict.meta == {"tenant": "tenant-bob", "quota": 100, "authn_login": "bob"}
    warned = [e for e in captured_log.events if e.get("column") == "created"]
    assert len(warned) == 1 and warned[0]["kind"] == "datetime"
    # failures carry no meta
    assert check(store, "bob", WRONG).meta == {}


def test_meta_through_the_checker_into_conn_meta(reactor, make_store, pg_url):
    checker = StoreChecker(make_store(pg_url), reactor)
    meta = ConnMeta()
    avatar = in_reactor(checker.requestAvatarId, PlainCredentials("", "carol", PASSWORD, meta))
    assert avatar == "carol" and meta.get_meta("tenant") == "tenant-carol"
    with pytest.raises(cred_error.UnauthorizedLogin):
        in_reactor(checker.requestAvatarId, PlainCredentials("", "carol", WRONG, ConnMeta()))


def test_bytes_hash_column_and_odd_types_on_sqlite(make_store, sqlite_db):
    store = make_store(
        f"sqlite:///{sqlite_db}",
        "SELECT password, CAST(born AS TEXT) AS born FROM blobs WHERE login = :user",
    )
    assert check(store, "alice", PASSWORD) == Verdict(True, {"born": "2024-01-01"})


@pytest.mark.parametrize(
    "name",
    [
        "' OR '1'='1",
        "x'; DROP TABLE users; --",
        "alice' --",
        "alice'/*",
        '" OR ""="',
        "%",
        "alice\\",
        "alice\x00",
        "\ud800alice",
    ],
)
def test_injection_attempts_are_only_names(make_store, pg_url, pg_db, sqlite_db, name):
    before = user_count(pg_db)
    for store in (
        make_store(pg_url),
        make_store(f"sqlite:///{sqlite_db}"),
    ):
        assert check(store, name, PASSWORD) == DENIED
    assert user_count(pg_db) == before
    with contextlib.closing(sqlite3.connect(sqlite_db)) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == before


@pytest.fixture(scope="module")
def latin1_url(hashes: dict[str, str]) -> Iterator[str]:
    """A LATIN1 database (a legacy mail database) holding josé."""
    name = f"kumoauth_sql_latin1_{uuid.uuid4().hex[:12]}"
    with admin() as conn:
        conn.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    try:
        with psycopg.connect(
            host=PG_HOST, port=PG_PORT, user="postgres", dbname=name, autocommit=True
        ) as conn:
            conn.execute(SCHEMA_SQL)
            fill(conn, {**hashes, "josé": hashes["alice"]})
        yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_name_the_database_encoding_cannot_hold_is_denied(make_store, latin1_url, captured_log):
    # It was a 454 with the driver's UnicodeEncodeError traceback, each time.
    store = make_store(latin1_url)
    assert check(store, "日本", PASSWORD) == DENIED
    assert in_reactor(store.values, "SELECT tenant FROM users WHERE login = :user", "日本") == []
    assert check(store, "josé", PASSWORD).ok
    assert (
        "Traceback" not in captured_log.text() and "UnicodeEncodeError" not in captured_log.text()
    )


# --------------------------------------------------------------------------
# the configuration


@pytest.fixture
def in_dir_with_dbs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory: *tmp_path*, with the (empty) SQLite files
    ``x.db`` and ``u.db`` the relative URLs below name."""
    for name in ("x.db", "u.db"):
        sqlite3.connect(tmp_path / name).close()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"query": QUERY}, "url: required key is missing"),
        ({"url": "sqlite:///x.db"}, "query: required key is missing"),
        ({"url": "sqlite:///x.db", "query": QUERY, "pool": 3}, "pool: unknown key"),
        ({"url": "sqlite:///x.db", "query": QUERY, "pool_size": 0}, "pool_size: must be at least"),
        ({"url": "sqlite:///x.db", "query": QUERY, "timeout": "5"}, "timeout: expected a number"),
        (
            {"url": "sqlite:///x.db", "query": "SELECT password FROM users WHERE login = 'x'"},
            "query: must contain the bound parameter :user",
        ),
        (
            {"url": "sqlite:///x.db", "query": "SELECT password FROM users WHERE login = ?"},
            "query: must contain the bound parameter :user",
        ),
        (
            {"url": "sqlite:///x.db", "query": "SELECT p FROM u WHERE l = :user AND t = :tenant"},
            "query: only :user is bound, not :tenant",
        ),
        (
            {"url": "sqlite:///x.db", "query": "SELECT p FROM u WHERE l = ':user"},
            "query: a quote or comment is not closed",
        ),
        (
            {"url": "sqlite:///x.db", "query": "SELECT p FROM u WHERE l = :user; DROP TABLE u"},
            "query: must be one statement",
        ),
        ({"url": "not a url", "query": QUERY}, "url: not a SQLAlchemy URL"),
        ({"url": "nosuchdb://h/d", "query": QUERY}, "url: SQLAlchemy knows no database"),
        ({"url": "mysql+nosuchdriver://h/d", "query": QUERY}, "url: SQLAlchemy knows no"),
        (
            {"url": "mysql+pymysql://kumo@db/mail", "query": QUERY},
            "url: the driver for 'mysql+pymysql' is not installed (pymysql)",
        ),
        ({"url": "sqlite://", "query": QUERY}, "url: an in-memory SQLite database"),
        ({"url": "sqlite:///:memory:", "query": QUERY}, "url: an in-memory SQLite database"),
    ],
)
def test_validate_refuses_with_one_line(in_dir_with_dbs, table, message):
    with pytest.raises(ValueError) as raised:
        validate(table)
    text = str(raised.value)
    assert "\n" not in text and text.startswith(message), text


def test_validate_never_shows_the_url_password(tmp_path):
    secret = "Url-Secret-91"
    for url in (
        f"postgresql://u:{secret}@host:notaport/db",
        f"://u:{secret}@host/db",
        f"nosuch://u:{secret}@host/db",
    ):
        with pytest.raises(ValueError) as raised:
            validate({"url": url, "query": QUERY})
        assert secret not in str(raised.value)
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    with pytest.raises(ValueError, match="give only one") as raised:
        validate({"url": f"postgresql://u:{secret}@h/d", "query": QUERY, "password_file": "pw"},
                 base=tmp_path)  # fmt: skip
    assert secret not in str(raised.value)


def test_validate_password_file(tmp_path):
    (tmp_path / "empty").write_text("")
    url = "postgresql://kumo@db.internal/mail"
    with pytest.raises(ValueError, match=r"^password_file: .*missing: No such file"):
        validate({"url": url, "query": QUERY, "password_file": "missing"}, base=tmp_path)
    with pytest.raises(ValueError, match=r"^password_file: .*empty: empty$"):
        validate({"url": url, "query": QUERY, "password_file": "empty"}, base=tmp_path)
    with pytest.raises(ValueError, match="^password_file: SQLite has no password"):
        validate({"url": "sqlite:///x.db", "query": QUERY, "password_file": "empty"})
    (tmp_path / "pw").write_text("s3cret\nignored\n")
    cfg = validate({"url": url, "query": QUERY, "password_file": "pw"}, base=tmp_path)
    assert cfg.password_file == tmp_path / "pw"
    assert "s3cret" not in repr(cfg)


def test_validate_a_query_password_is_a_url_password(tmp_path):
    # libpq reads ?password= as the password: given with password_file it
    # is a password given twice, and the message does not show it
    (tmp_path / "pw").write_text("x\n")
    secret = "Query-Secret-5"
    for url in (
        f"postgresql://kumo@db/mail?password={secret}",
        f"postgresql://kumo@db/mail?sslmode=require&password={secret}&password=again",
        f"postgresql://kumo@db/mail?password={quote_plus(secret + ' +&')}",
    ):
        with pytest.raises(ValueError, match="^password_file: the url has a password too") as e:
            validate({"url": url, "query": QUERY, "password_file": "pw"}, base=tmp_path)
        assert secret not in str(e.value)
    # sslpassword is the client key's, not the database password
    cfg = validate(
        {"url": f"postgresql://kumo@db/mail?sslpassword={secret}", "query": QUERY,
         "password_file": "pw"},
        base=tmp_path,
    )  # fmt: skip
    assert cfg.password_file == tmp_path / "pw"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://kumo:Port-Secret-1@127.0.0.1:99999/mail", "url: port 99999: must be"),
        ("postgresql://kumo@127.0.0.1:65536/mail", "url: port 65536: must be 1-65535"),
        ("postgresql://kumo@127.0.0.1:0/mail", "url: port 0: must be 1-65535"),
        ("postgresql://kumo@/mail?host=127.0.0.1&port=99999", "url: port 99999: must be 1-65535"),
        ("postgresql://kumo@/mail?host=a:5432&host=b:70000", "url: port 70000: must be 1-65535"),
        ("postgresql://kumo@/mail?host=a&port=abc", "url: Received non-integer port"),
        ("sqlite:////nonexistent/dir/users.db",
         "url: the SQLite file /nonexistent/dir/users.db: file not found"),
    ],
)  # fmt: skip
def test_validate_refuses_a_url_that_cannot_work(url, message):
    with pytest.raises(ValueError) as raised:
        validate({"url": url, "query": QUERY})
    text = str(raised.value)
    assert "\n" not in text and text.startswith(message), text
    assert "Port-Secret-1" not in text


def test_validate_wants_the_sqlite_file(tmp_path, sqlite_db):
    missing = tmp_path / "typo.db"
    with pytest.raises(ValueError, match=f"^url: the SQLite file {missing}: file not found"):
        validate({"url": f"sqlite:///{missing}", "query": QUERY})
    assert not missing.exists()  # not made as an empty database either
    with pytest.raises(ValueError, match=f"^url: the SQLite file {tmp_path}: is a directory"):
        validate({"url": f"sqlite:///{tmp_path}", "query": QUERY})
    assert validate({"url": f"sqlite:///{sqlite_db}", "query": QUERY}).url.endswith("users.db")
    for url in (
        "postgresql://kumo@db.internal:5432/mail",
        "postgresql://kumo@/mail?host=a:5432&host=b:65535",
        "postgresql://kumo@/mail?host=a,b&port=5432,",
    ):
        assert validate({"url": url, "query": QUERY}).url == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:////nonexistent/dir/users.db", "/nonexistent/dir/users.db: file not found"),
        ("postgresql://kumo:Port-Secret-1@127.0.0.1:99999/mail", "url: port 99999"),
    ],
)
def test_twistd_refuses_to_start_on_a_url_that_cannot_work(tmp_path, url, shown):
    config = tmp_path / "kumoauth.toml"
    config.write_text(
        '[[listener]]\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
        'auth_required = false\n[auth]\nchecker = "sql"\n'
        f'[auth.sql]\nurl = "{url}"\nquery = "{QUERY}"\n[spool]\npath = "spool"\n'
    )
    done = run_twistd(["kumoauth", "--config", str(config)], cwd=tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr + done.stdout
    assert lines[0].startswith("kumoauth: error: ") and "[auth.sql] url: " in lines[0]
    assert shown in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert "Port-Secret-1" not in done.stdout + done.stderr


def test_validate_defaults_and_postgresql_alias():
    cfg = validate({"url": "postgres://kumo@db/mail", "query": QUERY})
    assert cfg == Config(url="postgres://kumo@db/mail", query=QUERY)
    assert (cfg.pool_size, cfg.timeout, cfg.password_file) == (5, 5.0, None)
    store = SQL("postgresql://kumo:pw@db/mail", QUERY)
    try:
        assert store.current.engine.dialect.driver == "psycopg"
        assert repr(store) == "<SQL postgresql+psycopg://kumo:***@db/mail>"
    finally:
        store.current.engine.dispose()


def test_resolve_names_the_table(in_dir_with_dbs):
    spec = checkers.resolve("sql", {"sql": {"url": "sqlite:///u.db", "query": QUERY}})
    assert spec.factory is factory and isinstance(spec.config, Config)
    with pytest.raises(ValueError, match=r"^\[auth\.sql\] query: must contain"):
        checkers.resolve("sql", {"sql": {"url": "sqlite:///u.db", "query": "SELECT 1"}})


def test_from_argstring(tmp_path, sqlite_db):
    (tmp_path / "flat.toml").write_text(f'url = "sqlite:///{sqlite_db}"\nquery = "{QUERY}"\n')
    assert from_argstring(str(tmp_path / "flat.toml")).url == f"sqlite:///{sqlite_db}"
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "kumoauth.toml").write_text(
        '[auth]\nchecker = "sql"\n[auth.sql]\nurl = "postgresql://k@db/m"\n'
        f'query = "{QUERY}"\npassword_file = "pw"\ntimeout = 2\n'
    )
    cfg = from_argstring(str(tmp_path / "kumoauth.toml"))
    assert cfg.password_file == tmp_path / "pw" and cfg.timeout == 2.0
    (tmp_path / "bad.toml").write_text(f'url = "sqlite:///{sqlite_db}"\nquery = "SELECT 1"\n')
    with pytest.raises(ValueError, match=r"bad\.toml: \[auth\.sql\] query: must contain"):
        from_argstring(str(tmp_path / "bad.toml"))
    with pytest.raises(ValueError, match="No such file"):
        from_argstring(str(tmp_path / "nope.toml"))


def test_factory_gives_a_checker_named_sql(reactor, pool, sqlite_db):
    checker = factory(validate({"url": f"sqlite:///{sqlite_db}", "query": QUERY}), reactor, pool)
    try:
        assert isinstance(checker, StoreChecker) and checker.store.name == "sql"
        meta = ConnMeta()
        assert in_reactor(checker.requestAvatarId, PlainCredentials("", "dave", PASSWORD, meta))
        assert meta.get_meta("tenant") == "tenant-dave"
    finally:
        in_reactor(checker.stop)


# --------------------------------------------------------------------------
# the database failing


def test_sql_error_is_454_without_the_statement_or_password(make_store, pg_url):
    store = make_store(pg_url, "SELECT nope FROM users WHERE login = :user")
    e = backend_error(store)
    assert e.outage and "UndefinedColumn" in str(e) and "nope" in str(e)
    assert PASSWORD not in str(e) and "alice" not in str(e) and "\n" not in str(e)


def test_a_statement_that_returns_no_rows_is_454(make_store, tmp_path, hashes):
    db = tmp_path / "u.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE users (login text, password text)")
        conn.execute("INSERT INTO users VALUES ('alice', ?)", (hashes["alice"],))
        conn.commit()
    store = make_store(
        f"sqlite:///{db}", "UPDATE users SET password = password WHERE login = :user"
    )
    assert "returns no rows" in str(backend_error(store))


def test_statement_timeout(make_store, pg_url):
    store = make_store(
        pg_url,
        "SELECT password FROM users, pg_sleep(3) WHERE login = :user",
        timeout=0.5,
    )
    started = time.monotonic()
    e = backend_error(store)
    assert time.monotonic() - started < 2.5
    assert "statement timeout" in str(e), str(e)


def test_unreachable_database(make_store):
    store = make_store(f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout=1)
    e = backend_error(store)
    assert e.outage and "refused" in str(e).lower()


class Forwarder:
    """
    A loopback TCP forwarder to PostgreSQL, run in the test reactor: stop
    it (connections refused, open ones cut) and start it again; freeze it
    (what clients send is held back: the database never answers).
    """

    def __init__(self, reactor: Any, target: int) -> None:
        self.reactor = reactor
        self.port = free_port()
        self.target = target
        self.listening: Any = None
        self.conns: set[Any] = set()
        self.frozen = False

    def start(self) -> None:
        forwarder = self

        class Server(portforward.ProxyServer):
            held: list[bytes]

            def connectionMade(self) -> None:
                self.held = []
                forwarder.conns.add(self)
                super().connectionMade()

            def dataReceived(self, data: bytes) -> None:
                if forwarder.frozen:
                    self.held.append(data)
                else:
                    super().dataReceived(data)

            def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
                forwarder.conns.discard(self)
                super().connectionLost(reason)

        factory = portforward.ProxyFactory("127.0.0.1", self.target)
        factory.protocol = Server

        def listen() -> None:
            self.listening = self.reactor.listenTCP(self.port, factory, interface="127.0.0.1")

        in_reactor(listen)

    def stop(self) -> None:
        def stop() -> Any:
            for conn in list(self.conns):
                conn.transport.abortConnection()
            return self.listening.stopListening()

        in_reactor(stop)

    def thaw(self) -> None:
        def thaw() -> None:
            self.frozen = False
            for conn in list(self.conns):
                held, conn.held = conn.held, []
                for data in held:
                    conn.peer.transport.write(data)

        in_reactor(thaw)


@pytest.fixture
def forwarder(reactor: Any) -> Iterator[Forwarder]:
    fwd = Forwarder(reactor, PG_PORT)
    fwd.start()
    yield fwd
    if fwd.frozen:
        fwd.thaw()
    with contextlib.suppress(Exception):
        fwd.stop()


def test_database_down_then_back(reactor, make_store, pg_db, forwarder, captured_log):
    store = make_store(f"postgresql://postgres@127.0.0.1:{forwarder.port}/{pg_db}", timeout=2)
    checker = StoreChecker(store, reactor)

    def login(authc: str, password: str) -> Any:
        return in_reactor(
            checker.requestAvatarId, PlainCredentials("", authc, password, ConnMeta())
        )

    assert login("alice", PASSWORD) == "alice"
    forwarder.stop()
    for user in ("alice", "nobody", "bob"):
        with pytest.raises(BackendUnavailable) as raised:
            login(user, PASSWORD)
        assert "sql:" in str(raised.value) and "***" not in str(raised.value)
    forwarder.start()
    assert login("alice", PASSWORD) == "alice"  # the pooled connection was cut: a new one
    with pytest.raises(cred_error.UnauthorizedLogin):
        login("alice", WRONG)
    down = [e for e in captured_log.events if "unavailable" in (e.get("log_format") or "")]
    back = [e for e in captured_log.events if "available again" in (e.get("log_format") or "")]
    assert len(down) == 1 and len(back) == 1 and back[0]["n"] == 3
    assert f"127.0.0.1:{forwarder.port}" in down[0]["reason"]


def test_a_database_that_never_answers(make_store, pg_db, forwarder):
    store = make_store(f"postgresql://postgres@127.0.0.1:{forwarder.port}/{pg_db}", timeout=0.5)
    assert check(store, "alice", PASSWORD).ok  # a pooled connection now exists
    forwarder.frozen = True
    started = time.monotonic()
    e = backend_error(store)
    assert 0.9 < time.monotonic() - started < 2.0
    assert "no answer within 1s" in str(e)
    forwarder.thaw()
    assert check(store, "alice", PASSWORD).ok


def test_no_free_connection_is_454(make_store, pg_db, forwarder):
    store = make_store(
        f"postgresql://postgres@127.0.0.1:{forwarder.port}/{pg_db}", pool_size=1, timeout=0.3
    )
    assert check(store, "alice", PASSWORD).ok  # the one connection exists
    forwarder.frozen = True  # whoever takes it hangs; the other waits for it

    def two() -> defer.Deferred[Any]:
        return defer.DeferredList(
            [store.check("", "alice", PASSWORD), store.check("", "alice", PASSWORD)],
            consumeErrors=True,
        )

    results = in_reactor(two)
    reasons = sorted(str(f.value) for ok, f in results if not ok and f.check(BackendError))
    assert len(reasons) == 2, results
    assert reasons[0] == "no answer within 0.6s"
    assert reasons[1].endswith(": no free connection within 0.3s (all 1 busy)")
    forwarder.thaw()
    assert check(store, "alice", PASSWORD).ok


def test_stop_then_454_and_reload_takes_the_new_table(reactor, make_store, pg_url, sqlite_db):
    store = make_store(pg_url)
    changed: list[int] = []
    store.subscribe(lambda: changed.append(1))
    assert check(store, "alice", PASSWORD).meta == {"tenant": "tenant-alice"}
    new = validate({"url": f"sqlite:///{sqlite_db}", "query": QUERY.replace("tenant", "quota")})
    in_reactor(store.reload, new)
    assert changed == [1]
    assert check(store, "alice", PASSWORD).meta == {"quota": 100}
    in_reactor(store.reload, new)  # the same table: nothing to do
    assert changed == [1]
    in_reactor(store.stop)
    e = backend_error(store)
    assert not e.outage and "stopped" in str(e)


# --------------------------------------------------------------------------
# the database password, on a PostgreSQL of our own


def _pg_tool(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        fail_or_skip(f"{name} missing (apt-get install postgresql)")
    return str(found)


def alive(pid: int) -> bool:
    """True while *pid* runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def own_postgres() -> Iterator[int]:
    """
    ``initdb`` + ``pg_ctl start`` in a directory under /tmp, role ``kumo``
    with DB_SECRET, scram-sha-256 on 127.0.0.1; stopped by PID.  Runs as
    ``postgres`` when we are root (PostgreSQL refuses root).
    """
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    as_user: dict[str, Any] = {}
    directory = Path(tempfile.mkdtemp(prefix="kumoauth-pg-", dir="/tmp"))
    try:
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(directory, entry.pw_uid, entry.pw_gid)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        pwfile = directory / "pwfile"
        pwfile.write_text(DB_SECRET + "\n")
        if as_user:
            os.chown(pwfile, as_user["user"], as_user["group"])
        data, port = directory / "data", free_port()
        env = {**os.environ, "LC_ALL": "C"}
        subprocess.run(
            [initdb, "-D", str(data), "-U", "kumo", "--pwfile", str(pwfile), "-A",
             "scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True, capture_output=True, timeout=60, env=env, **as_user,
        )  # fmt: skip
        subprocess.run(
            [pg_ctl, "-D", str(data), "-l", str(directory / "log"), "-w", "-t", "30", "-o",
             f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off",
             "start"],
            check=True, capture_output=True, timeout=60, env=env, **as_user,
        )  # fmt: skip
        pid = int((data / "postmaster.pid").read_text().split()[0])
        try:
            yield port
        finally:
            os.kill(pid, signal.SIGINT)  # fast shutdown
            deadline = time.monotonic() + 20
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def secured_pg(hashes: dict[str, str]) -> Iterator[int]:
    with own_postgres() as port:
        with psycopg.connect(
            host="127.0.0.1", port=port, user="kumo", password=DB_SECRET, dbname="postgres",
            autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(SCHEMA_SQL)
            fill(conn, hashes)
        yield port


def test_database_password_never_logged(
    make_store, secured_pg, tmp_path, captured_log, caplog, reactor
):
    url = f"postgresql://kumo@127.0.0.1:{secured_pg}/postgres"
    pw = tmp_path / "db-password"
    pw.write_text("wrong-Db-Secret-55\n")
    store = make_store(url, password_file=pw)
    checker = StoreChecker(store, reactor)
    with pytest.raises(BackendUnavailable) as raised:
        in_reactor(checker.requestAvatarId, PlainCredentials("", "alice", PASSWORD, ConnMeta()))
    assert "password authentication failed" in str(raised.value)
    messages = [str(raised.value)]
    # rotated: the next new connection reads the file again, no reload
    pw.write_text(DB_SECRET + "\n")
    assert check(store, "alice", PASSWORD).ok
    # in the URL instead: a wrong one shows as ***
    inline = make_store(f"postgresql://kumo:Inline-Secret-3@127.0.0.1:{secured_pg}/postgres")
    messages.append(str(backend_error(inline)))
    assert "kumo:***@" in messages[-1]
    right = make_store(f"postgresql://kumo:{DB_SECRET}@127.0.0.1:{secured_pg}/postgres")
    assert check(right, "bob", PASSWORD).ok
    messages.append(repr(right))
    # no file any more: 454 naming the file, not its content
    pw.unlink()
    in_reactor(store.current.engine.dispose)
    messages.append(str(backend_error(store)))
    assert "db-password" in messages[-1]
    everything = "\n".join([*messages, captured_log.text(), caplog.text])
    for secret in (DB_SECRET, "wrong-Db-Secret-55", "Inline-Secret-3", PASSWORD):
        assert secret not in everything


def test_a_query_password_is_used_and_never_shown(
    make_store, secured_pg, captured_log, caplog, reactor
):
    # libpq takes the password as a query parameter too; psycopg gets it
    base = f"postgresql://kumo@127.0.0.1:{secured_pg}/postgres"
    right = make_store(f"{base}?password={quote_plus(DB_SECRET)}")
    in_reactor(right.start)  # the start-up line
    assert check(right, "bob", PASSWORD).ok
    assert (
        repr(right)
        == f"<SQL postgresql+psycopg://kumo@127.0.0.1:{secured_pg}/postgres?password=***>"
    )
    # a wrong one, percent-encoded, with another secret beside it: the
    # outage line, the error and the start-up line show *** for each
    wrong_secret = "Query Secret+7&x"
    wrong = make_store(
        f"{base}?sslmode=disable&password={quote_plus(wrong_secret)}&sslpassword=Ssl-Secret-8"
    )
    in_reactor(wrong.start)
    checker = StoreChecker(wrong, reactor)
    with pytest.raises(BackendUnavailable) as raised:
        in_reactor(checker.requestAvatarId, PlainCredentials("", "alice", PASSWORD, ConnMeta()))
    message = str(raised.value)
    assert "password authentication failed" in message
    assert "?password=***&sslmode=disable&sslpassword=***" in message
    down = [e for e in captured_log.events if "unavailable" in (e.get("log_format") or "")]
    assert len(down) == 1 and "password=***" in down[0]["reason"]
    started = [e for e in captured_log.events if e.get("url") is not None]
    assert [e["url"].rpartition("?")[2] for e in started] == [
        "password=***",
        "password=***&sslmode=disable&sslpassword=***",
    ]
    everything = "\n".join([message, repr(wrong), captured_log.text(), caplog.text])
    for secret in (
        DB_SECRET,
        wrong_secret,
        quote_plus(wrong_secret),
        quote(wrong_secret, safe=""),
        "Query",
        "Ssl-Secret-8",
        PASSWORD,
    ):
        assert secret not in everything


def test_auth_test_never_shows_a_query_password(tmp_path, secured_pg):
    # `kumoauth auth test` prints the store's error: the URL with ***
    secret = "Cli-Query-Secret-4"
    config = tmp_path / "kumoauth.toml"
    config.write_text(
        '[[listener]]\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
        'auth_required = false\n[auth]\nchecker = "sql"\n[auth.sql]\n'
        f'url = "postgresql://kumo@127.0.0.1:{secured_pg}/postgres?password={secret}"\n'
        f'query = "{QUERY}"\ntimeout = 2\n[spool]\npath = "{tmp_path / "spool"}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "auth", "test", "--config", str(config), "bob"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "password authentication failed" in output and "?password=***" in output
    assert secret not in output and PASSWORD not in output


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_every_form_of_a_url_password_is_hidden(password):
    # in the user part and in each query parameter that holds a secret,
    # whatever the characters (percent-encoded in the URL as they must be)
    url = sql_store._engine_url(
        f"postgresql://kumo:{quote(password, safe='')}@db:5432/mail?sslmode=require"
        f"&password={quote_plus(password)}&sslpassword={quote(password, safe='')}"
        f"&passwd={quote_plus(password)}"
    )
    assert url.password == password and url.query["password"] == password
    assert sql_store._shown(url) == (
        "postgresql+psycopg://kumo:***@db:5432/mail"
        "?passwd=***&password=***&sslmode=require&sslpassword=***"
    )
    assume("*" not in password)
    secrets = sql_store._secrets(url)
    for form in (password, quote(password, safe=""), quote_plus(password)):
        assert form not in sql_store._scrub(f"failed for {form}: no", secrets)


# --------------------------------------------------------------------------
# end to end: twistd kumoauth with checker = "sql"


def auth_plain(s: smtplib.SMTP, authc: str, password: str) -> int:
    """AUTH PLAIN in UTF-8 (smtplib's own login wants ASCII passwords)."""
    blob = base64.b64encode(f"\0{authc}\0{password}".encode()).decode("ascii")
    return s.docmd("AUTH", f"PLAIN {blob}")[0]


def test_twistd_with_the_sql_checker(tmp_path, sqlite_db):
    certs = make_certs(tmp_path / "certs")
    extra = f'[auth.sql]\nurl = "sqlite:///{sqlite_db}"\nquery = "{QUERY}"\ntimeout = 2\n'
    with running_server(
        tmp_path / "server", certs, None, auth='checker = "sql"', extra=extra
    ) as srv:
        with smtplib.SMTP("127.0.0.1", srv.starttls_port, timeout=10) as s:
            s.starttls(context=certs.client_context())
            s.ehlo("client.example")
            assert auth_plain(s, "alice", WRONG) == 535
            assert auth_plain(s, "alice", PASSWORD) == 235
            s.mail("alice@example.com")
            s.rcpt("b@example.net")
            code, reply = s.data(b"Subject: t\r\n\r\nhi\r\n")
            assert code == 250
        mid = reply.decode().rsplit(" ", 1)[-1]
        assert Spool(srv.spool).read(mid).meta["tenant"] == "tenant-alice"
        log = srv.log()
    assert PASSWORD not in log and WRONG not in log
    assert re.search(r"auth backend sql: sqlite:///\S+users\.db", log), log
