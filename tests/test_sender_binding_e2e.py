"""
Sender binding end to end (issue #16): a real ``twistd kumoauth`` with
``[sender_binding]``, real smtplib over STARTTLS, and each source behind
it — the map file, a real slapd (the user's entry with several ``mail``
values), SQLite and PostgreSQL.

Every source holds the same rights, so one set of tests runs against each
(the ``bound`` fixture, one server per source for the module):

- ``scott`` may send as ``scott@example.com``, ``sales@example.com``, any
  address of ``scott.example`` (an ``@domain`` wildcard) and
  ``ü@xn--bcher-kva.example`` (written in IDNA form; the client uses
  ``ü@bücher.example``);
- ``alice`` (the policy's other user) as ``alice@example.com`` and
  ``sales@example.com``.

(The map also has ``ceo@scott.example ceo``: an exact entry beats its
domain's wildcard.)

The policy (``POLICY`` of the e2e tests, whose ``smtp_server_auth_plain``
knows scott/tiger and alice/"wonder land") adds ``smtp_server_sender_binding``
(records what it saw, allows ``helpdesk@support.example`` for scott) and
``smtp_server_mail_from`` (refuses ``blocked@scott.example`` after the
binding allowed it).  The ``[auth.ldap]``/``[auth.sql]`` tables are only
there for the binding: ``[auth] checker`` stays the policy, whose user
names are the LDAP entries' ``uid`` and the SQL rows' ``login``.

Source-specific tests: map wildcards and an exact entry over its domain's
wildcard, the map re-read on change without a restart, ``allow_null_sender
= false`` with ``check_header_from = false``, and the store down → ``451
4.7.1`` for LDAP (slapd stopped, then started again), SQLite (the table
gone, then back; also at the end of DATA) and PostgreSQL (a port with
nothing listening).
"""

from __future__ import annotations

import base64
import contextlib
import os
import smtplib
import sqlite3
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kumoauth.auth.senders import MAX_FIELD_CHARS, header_addresses
from kumoauth.storage.spool import Spool
from tests import slapd
from tests.server import Server, free_port, running_server
from tests.test_e2e import POLICY, login, queued_id, starttls_client

pytestmark = pytest.mark.e2e

PG_HOST, PG_PORT = "127.0.0.1", 5432

POLICY_BOUND = (
    POLICY
    + """

@kumo.on("smtp_server_sender_binding")
def sender_binding(authz, sender, allowed, conn_meta):
    seen = conn_meta.get_meta("binding_seen") or []
    conn_meta.set_meta("binding_seen", seen + [[authz, sender, allowed]])
    if authz == "scott" and sender == "helpdesk@support.example":
        return True
    return None


@kumo.on("smtp_server_mail_from")
def mail_from(sender, conn_meta):
    if sender == "blocked@scott.example":
        kumo.reject(550, "5.7.1 blocked by the policy")
"""
)

#: (login, address) rows every source holds
RIGHTS = [
    ("scott", "scott@example.com"),
    ("scott", "sales@example.com"),
    ("scott", "@scott.example"),
    ("scott", "ü@xn--bcher-kva.example"),
    ("alice", "alice@example.com"),
    ("alice", "sales@example.com"),
]

MAP = """\
# address-or-@domain        logins (e2e test map)

scott@example.com           scott
sales@example.com           alice, scott
ceo@scott.example           ceo
@scott.example              scott
ü@xn--bcher-kva.example     scott
alice@example.com           alice
"""

SQL_QUERY = "SELECT address FROM senders WHERE login = :user"
SCHEMA = "CREATE TABLE senders (login text NOT NULL, address text)"

UTF8_SENDER = "ü@bücher.example"


def fail_or_skip(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


# --------------------------------------------------------------------------
# stores


@pytest.fixture(scope="module")
def directory() -> Iterator[slapd.Slapd]:
    """slapd with scott's and alice's entries, each with several mail values."""
    slapd.require_slapd()
    mails: dict[str, list[str]] = {}
    for user, address in RIGHTS:
        mails.setdefault(user, []).append(address)
    users = [
        slapd.User("scott", "tiger", extra={"mail": mails["scott"]}),
        slapd.User("alice", "wonder land", extra={"mail": mails["alice"]}),
    ]
    with slapd.running_slapd(users) as server:
        yield server


def fill(conn: Any) -> None:
    conn.execute(SCHEMA)
    insert = "INSERT INTO senders (login, address) VALUES (%s, %s)"
    if isinstance(conn, sqlite3.Connection):
        insert = insert.replace("%s", "?")
    for row in [*RIGHTS, ("scott", None)]:  # a NULL row is skipped
        conn.execute(insert, row)


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "senders.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        fill(conn)
        conn.commit()
    return path


def pg_admin() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            host=PG_HOST, port=PG_PORT, user="postgres", dbname="test", connect_timeout=3,
            autocommit=True,
        )  # fmt: skip
    except psycopg.OperationalError as e:
        fail_or_skip(f"PostgreSQL at {PG_HOST}:{PG_PORT} not reachable: {e}")
        raise


@pytest.fixture(scope="module")
def pg_db() -> Iterator[str]:
    """A database of our own on the running PostgreSQL, dropped afterwards."""
    name = f"kumoauth_senders_{uuid.uuid4().hex[:12]}"
    with pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(
            host=PG_HOST, port=PG_PORT, user="postgres", dbname=name, autocommit=True
        ) as conn:
            fill(conn)
        yield name
    finally:
        with pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------
# servers


def ldap_config(server: slapd.Slapd) -> str:
    # the policy's user names are the entries' uid (scott, alice)
    return f"""
[auth.ldap]
url = "{server.url()}"
base = "{slapd.PEOPLE}"
filter = "(&(objectClass=inetOrgPerson)(uid={{user}}))"
bind_dn = "{slapd.SERVICE_DN}"
bind_password_file = "ldap-password"
timeout = 1.0

[sender_binding]
source = "ldap"
ldap_attribute = "mail"
"""


def sql_config(url: str) -> str:
    # [auth.sql] query is required by the table; only sql_query is run here.
    return "\n".join(
        [
            "[auth.sql]",
            f'url = "{url}"',
            f'query = "{SQL_QUERY}"',
            "timeout = 1.0",
            "",
            "[sender_binding]",
            'source = "sql"',
            f'sql_query = "{SQL_QUERY}"',
            "",
        ]
    )


@contextlib.contextmanager
def bound_server(
    directory: Path, certs: Any, extra: str, metrics_port: int | None = None
) -> Iterator[Server]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ldap-password").write_text("service-secret\n")
    if metrics_port is not None:
        extra += f'\n[metrics]\nendpoint = "tcp:{metrics_port}:interface=127.0.0.1"\n'
    with running_server(directory, certs, POLICY_BOUND, extra=extra) as srv:
        yield srv


@contextlib.contextmanager
def source_server(
    source: str, tmp_path_factory: pytest.TempPathFactory, certs: Any, extra: str
) -> Iterator[Server]:
    where = tmp_path_factory.mktemp(f"bound-{source}")
    if source == "map":
        (where / "sender_logins").write_text(MAP)
    port = free_port()
    with bound_server(where, certs, extra, metrics_port=port) as srv:
        srv.metrics_port = port  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def map_bound(tmp_path_factory, certs) -> Iterator[Server]:
    extra = '[sender_binding]\nsource = "map"\nmap = "sender_logins"\n'
    with source_server("map", tmp_path_factory, certs, extra) as srv:
        yield srv


@pytest.fixture(scope="module")
def ldap_bound(tmp_path_factory, certs, directory) -> Iterator[Server]:
    with source_server("ldap", tmp_path_factory, certs, ldap_config(directory)) as srv:
        yield srv


@pytest.fixture(scope="module")
def sqlite_bound(tmp_path_factory, certs, sqlite_db) -> Iterator[Server]:
    extra = sql_config(f"sqlite:///{sqlite_db}")
    with source_server("sqlite", tmp_path_factory, certs, extra) as srv:
        yield srv


@pytest.fixture(scope="module")
def postgresql_bound(tmp_path_factory, certs, pg_db) -> Iterator[Server]:
    extra = sql_config(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{pg_db}")
    with source_server("postgresql", tmp_path_factory, certs, extra) as srv:
        yield srv


@pytest.fixture(scope="module", params=["map", "ldap", "sqlite", "postgresql"])
def bound(request: pytest.FixtureRequest) -> Server:
    """The server of each source in turn (each started once for the module)."""
    srv: Server = request.getfixturevalue(f"{request.param}_bound")
    return srv


# --------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def session(srv: Server, user: str = "scott") -> Iterator[smtplib.SMTP]:
    password = {"scott": "tiger", "alice": "wonder land"}[user]
    with starttls_client(srv) as s:
        assert login(s, "PLAIN", user, password)[0] == 235
        yield s


def message(*headers: str) -> bytes:
    head = "".join(h + "\r\n" for h in headers)
    return (head + "Subject: sender binding\r\n\r\nhello\r\n").encode()


def spooled_ids(srv: Server) -> set[str]:
    return set(Spool(srv.spool).ids()) if srv.spool.exists() else set()


def send(
    s: smtplib.SMTP, sender: str, body: bytes, options: tuple[str, ...] = ()
) -> tuple[str, int, str]:
    """
    One transaction: ("mail", code, text) when MAIL FROM is refused, else
    ("data", code, text) for the end of DATA (the queue id in the text on 250).
    """
    code, reply = s.mail(sender, list(options))
    if code != 250:
        s.rset()
        return "mail", code, reply.decode()
    assert s.rcpt("rcpt@example.net")[0] == 250
    code, reply = s.data(body)  # raises unless 354, returns the final reply
    return "data", code, reply.decode()


def sent(s: smtplib.SMTP, srv: Server, sender: str, body: bytes, **kw: Any) -> Any:
    """A transaction that must be stored; the spooled message."""
    stage, code, text = send(s, sender, body, **kw)
    assert (stage, code) == ("data", 250), text
    return Spool(srv.spool).read(queued_id(text.encode()))


def noop_latencies(other: smtplib.SMTP, work: Callable[[], None], pause: float) -> list[float]:
    """
    Run *work* in a thread; meanwhile time NOOPs on the *other* session
    (each answered 250), *pause* apart: a stalled reactor shows in them.
    """
    latencies: list[float] = []
    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        start = time.monotonic()
        assert other.noop()[0] == 250
        latencies.append(time.monotonic() - start)
        time.sleep(pause)
    worker.join(60)
    return latencies


def refused_by_binding(code: int, text: str, expected: int, user: str = "scott") -> None:
    assert code == expected, text
    assert text == f"5.7.1 Sender address rejected: not owned by user <{user}>", text


def wait_for_log(srv: Server, needle: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = srv.log()
        if needle in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in the log:\n{log[-3000:]}")
        time.sleep(0.05)


def scrape(port: int) -> dict[tuple[str, str], float]:
    """kumoauth_sender_binding_total by (where, result)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kumoauth_sender_binding_total":
                out[(sample.labels["where"], sample.labels["result"])] = sample.value
    return out


# --------------------------------------------------------------------------
# every source


def test_allowed_envelope_is_stored(bound):
    with session(bound) as s:
        assert s.has_extn("smtputf8")
        for sender in ("scott@example.com", "sales@example.com", "anything@scott.example"):
            msg = sent(s, bound, sender, message(f"From: <{sender}>"))
            assert msg.meta["authz_id"] == "scott"
            assert msg.read_bytes().endswith(b"hello\r\n")


def test_domain_and_local_part_compare_without_case(bound):
    # As Postfix's smtpd_sender_login_maps (its tables fold case): a user's
    # own address in another case is still the user's.
    with session(bound) as s:
        sent(s, bound, "scott@EXAMPLE.Com", message("From: scott@Example.COM"))
        sent(s, bound, "Scott@example.com", message("From: SCOTT@example.com"))
    with session(bound, "alice") as s:
        stage, code, text = send(s, "Scott@example.com", message("From: scott@example.com"))
        assert stage == "mail"
        refused_by_binding(code, text, 553, user="alice")


def test_forbidden_envelope_is_553_with_the_user(bound):
    before = spooled_ids(bound)
    with session(bound) as s:
        for sender in ("alice@example.com", "scott@example.org", "x@sub.scott.example"):
            stage, code, text = send(s, sender, message(f"From: {sender}"))
            assert stage == "mail", sender
            refused_by_binding(code, text, 553)
        # the session goes on: an allowed one right after
        sent(s, bound, "scott@example.com", message("From: scott@example.com"))
    with session(bound, "alice") as s:
        stage, code, text = send(s, "scott@example.com", message("From: scott@example.com"))
        assert stage == "mail"
        refused_by_binding(code, text, 553, user="alice")
        sent(s, bound, "alice@example.com", message("From: alice@example.com"))
        sent(s, bound, "sales@example.com", message("From: sales@example.com"))
    assert len(spooled_ids(bound) - before) == 3


def test_forged_from_is_550_and_nothing_is_stored(bound):
    with session(bound) as s:
        before = spooled_ids(bound)
        for header in (
            "From: The CEO <ceo@example.net>",
            "From: alice@example.com",
            "From: scott@example.com.evil.example",
            "From: undisclosed",  # no address at all: never allowed
        ):
            stage, code, text = send(s, "scott@example.com", message(header))
            assert stage == "data", header
            refused_by_binding(code, text, 550)
        assert spooled_ids(bound) == before
        assert s.noop()[0] == 250


def test_several_from_addresses_must_all_be_allowed(bound):
    with session(bound) as s:
        msg = sent(
            s,
            bound,
            "scott@example.com",
            message("From: Scott <scott@example.com>, Sales <sales@example.com>, x@scott.example"),
        )
        assert b"Sales <sales@example.com>" in msg.read_bytes()
        before = spooled_ids(bound)
        for headers in (
            ("From: scott@example.com, ceo@example.net",),
            ("From: ceo@example.net, scott@example.com",),
            ("From: scott@example.com", "From: alice@example.com"),  # two fields
            ("From: friends: scott@example.com, alice@example.com;",),  # a group
        ):
            stage, code, text = send(s, "scott@example.com", message(*headers))
            assert stage == "data", headers
            refused_by_binding(code, text, 550)
        assert spooled_ids(bound) == before


def test_sender_header_is_checked_instead_of_from(bound):
    with session(bound) as s:
        # RFC 5322 §3.6.2: Sender: is the mailbox that sent it; From: the author
        msg = sent(
            s,
            bound,
            "scott@example.com",
            message("From: The Boss <boss@example.net>", "Sender: Scott <scott@example.com>"),
        )
        assert b"Sender: Scott <scott@example.com>" in msg.read_bytes()
        before = spooled_ids(bound)
        stage, code, text = send(
            s,
            "scott@example.com",
            message("From: scott@example.com", "Sender: alice@example.com"),
        )
        assert stage == "data"
        refused_by_binding(code, text, 550)
        assert spooled_ids(bound) == before


def test_no_from_no_sender_only_the_envelope_counts(bound):
    with session(bound) as s:
        sent(s, bound, "scott@example.com", b"Subject: no author\r\n\r\nhi\r\n")


def test_null_sender_is_allowed_by_default(bound):
    with session(bound) as s:
        msg = sent(s, bound, "", message("From: scott@example.com"))
        assert msg.envelope["mail_from"] == ""


def test_the_null_sender_takes_one_recipient(map_bound):
    # MAIL FROM:<> binds to nobody: a phished account sent its spam to 100
    # recipients that way, with no From: for the header check to refuse.
    with session(map_bound) as s:
        assert s.mail("")[0] == 250
        assert s.rcpt("one@example.net")[0] == 250
        assert s.rcpt("two@example.net") == (
            550,
            b"5.7.1 A message from the null sender takes one recipient",
        )
        code, reply = s.data(b"Subject: auto\r\n\r\nreport\r\n")
        assert code == 250
        msg = Spool(map_bound.spool).read(queued_id(reply))
        assert msg.envelope["rcpt_to"] == ["one@example.net"]


def test_a_loop_of_forged_senders_is_closed_at_max_errors(map_bound):
    # Refusals counted as errors: 60,000 553s on open sessions, each logged,
    # ended only when the attacker stopped.
    replies = []
    with contextlib.suppress(smtplib.SMTPResponseException), session(map_bound) as s:
        for _ in range(10):
            replies.append(s.mail("alice@example.com")[0])
        replies.append(s.getreply()[0])
    assert replies == [553] * 10 + [421]


def test_smtputf8_address_matches_its_idna_form(bound):
    with session(bound) as s:
        assert s.has_extn("smtputf8")
        msg = sent(
            s,
            bound,
            UTF8_SENDER,
            message(f"From: Ü <{UTF8_SENDER}>"),
            options=("SMTPUTF8",),
        )
        assert msg.envelope["mail_from"] == UTF8_SENDER
        assert msg.meta.get("smtputf8") is True
        # the A-label form the client might use is the same domain
        sent(
            s,
            bound,
            "ü@xn--bcher-kva.example",
            message("From: ü@xn--BCHER-kva.example"),
            options=("SMTPUTF8",),
        )
        stage, code, text = send(
            s, "ö@bücher.example", message("From: ö@bücher.example"), options=("SMTPUTF8",)
        )
        assert stage == "mail"
        refused_by_binding(code, text, 553)
        before = spooled_ids(bound)
        stage, code, text = send(
            s, UTF8_SENDER, message("From: ö@bücher.example"), options=("SMTPUTF8",)
        )
        assert stage == "data"
        refused_by_binding(code, text, 550)
        assert spooled_ids(bound) == before


def test_policy_override_and_mail_from_after_the_binding(bound):
    with session(bound) as s:
        # the binding refuses, smtp_server_sender_binding allows this one case
        msg = sent(s, bound, "helpdesk@support.example", message("From: helpdesk@support.example"))
        assert ["scott", "helpdesk@support.example", False] in msg.meta["binding_seen"]
        stage, code, text = send(s, "other@support.example", message("From: scott@example.com"))
        assert stage == "mail"
        refused_by_binding(code, text, 553)
        # the binding allows, smtp_server_mail_from still refuses
        stage, code, text = send(s, "blocked@scott.example", message("From: x@scott.example"))
        assert (stage, code, text) == ("mail", 550, "5.7.1 blocked by the policy")
        msg = sent(s, bound, "scott@example.com", message("From: scott@example.com"))
        assert msg.meta["binding_seen"][-1] == ["scott", "scott@example.com", True]
    with session(bound, "alice") as s:  # the override is scott's only
        stage, code, text = send(s, "helpdesk@support.example", message("From: alice@example.com"))
        assert stage == "mail"
        refused_by_binding(code, text, 553, user="alice")


def test_proxy_authorization_is_checked_as_the_authz_identity(bound):
    with starttls_client(bound) as s:
        # scott's password, acting as alice (the policy's checker lets it)
        code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"alice\0scott\0tiger").decode())
        assert code == 235
        msg = sent(s, bound, "alice@example.com", message("From: alice@example.com"))
        assert (msg.meta["authn_id"], msg.meta["authz_id"]) == ("scott", "alice")
        stage, code, text = send(s, "scott@example.com", message("From: scott@example.com"))
        assert stage == "mail"
        refused_by_binding(code, text, 553, user="alice")


def test_pipelined_commands_wait_for_the_decision(bound):
    before = spooled_ids(bound)
    with session(bound) as s:
        assert s.has_extn("pipelining")
        s.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n")
        replies = [s.getreply() for _ in range(3)]
        assert [code for code, _ in replies] == [553, 503, 503], replies
        s.send(b"MAIL FROM:<scott@example.com>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n")
        replies = [s.getreply() for _ in range(3)]
        assert [code for code, _ in replies] == [250, 250, 354], replies
        s.send(b"From: ceo@example.net\r\n\r\nhi\r\n.\r\nNOOP\r\n")
        code, text = s.getreply()
        refused_by_binding(code, text.decode(), 550)
        assert s.getreply()[0] == 250
    assert spooled_ids(bound) == before


def test_refusals_are_logged_and_counted(bound):
    before = scrape(bound.metrics_port)
    with session(bound) as s:
        stage, code, _ = send(s, "alice@example.com", message("From: alice@example.com"))
        assert (stage, code) == ("mail", 553)
        stage, code, _ = send(s, "scott@example.com", message("From: forged@example.net"))
        assert (stage, code) == ("data", 550)
        sent(s, bound, "scott@example.com", message("From: scott@example.com"))
    log = wait_for_log(
        bound, "sender binding: user scott may not send as alice@example.com (envelope; "
    )
    assert "sender binding: user scott may not send as forged@example.net (header; " in log
    after = scrape(bound.metrics_port)

    def delta(where: str, result: str) -> float:
        return after.get((where, result), 0) - before.get((where, result), 0)

    assert delta("envelope", "refused") == 1
    assert delta("header", "refused") == 1
    assert delta("envelope", "allowed") == 2  # the forged one's envelope, then the good one
    assert delta("header", "allowed") == 1
    assert delta("envelope", "error") == delta("header", "error") == 0


# --------------------------------------------------------------------------
# From: headers other readers see differently from Python's parser: the
# obsolete space before the colon (RFC 5322 §4.5, read by Postfix) and junk
# after an allowed address (read as the mailbox by MUAs and DMARC tools)
# must not let a foreign address through


@pytest.mark.parametrize(
    "headers",
    [
        ("From : The CEO <ceo@example.net>",),
        ("X-Mailer : kit", "From: The CEO <ceo@example.net>"),
    ],
    ids=["from-space-colon", "field-space-colon-then-from"],
)
def test_obsolete_space_before_colon_is_still_checked(map_bound, headers):
    with session(map_bound) as s:
        before = spooled_ids(map_bound)
        stage, code, text = send(s, "scott@example.com", message(*headers))
        assert spooled_ids(map_bound) == before, "the forged message was stored"
        assert stage == "data"
        refused_by_binding(code, text, 550)


@pytest.mark.parametrize(
    "header",
    [
        "From: scott@example.com <ceo@example.net>",
        "From: scott@example.com ceo@example.net",
        "From: scott@example.com;ceo@example.net",
    ],
    ids=["bare-address-as-display-name", "two-bare-addresses", "semicolon"],
)
def test_junk_after_an_allowed_from_address_is_still_checked(map_bound, header):
    with session(map_bound) as s:
        before = spooled_ids(map_bound)
        stage, code, text = send(s, "scott@example.com", message(header))
        assert spooled_ids(map_bound) == before, "the forged message was stored"
        assert stage == "data"
        refused_by_binding(code, text, 550)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("<@relay.example,@b.example:alice@example.com>", 553),  # the route is dropped
        ("<@relay.example:scott@example.com>", 250),
        ('<"alice"@example.com>', 553),  # needless quotes: alice@example.com
        ('<"scott"@example.com>', 250),
        ('<"scott@example.com"@evil.example>', 553),
        ('<"alice@scott.example"@example.com>', 553),
        ("<alice@example.com.>", 553),
        ("<scott@example.com.>", 250),  # the same domain
        ("<scott+x@example.com>", 553),  # strip_detail is off
        ("<SCOTT@EXAMPLE.COM>", 250),  # the user's own address in another case
        ("<ceo@scott.example.>", 553),
        ("<x@sub.scott.example>", 553),
    ],
)
def test_envelope_forms_a_client_may_try(map_bound, path, expected):
    """Raw MAIL FROM arguments (smtplib would rewrite them)."""
    with session(map_bound) as s:
        code, text = s.docmd("MAIL", f"FROM:{path}")
        if expected == 553:
            refused_by_binding(code, text.decode(), 553)
        else:
            assert code == 250, text


@pytest.mark.parametrize(
    "headers, stored",
    [
        (("From: =?utf-8?q?alice=40example.com?= <scott@example.com>",), True),  # a name
        (('From: "alice@example.com" <scott@example.com>',), True),
        (("From: scott@example.com (alice@example.com)",), True),  # a comment
        (("From: =?utf-8?q?alice=40example.com?=",), False),  # no address at all
        (("From: <@evil.example:alice@example.com>",), False),
        (("From: scott@example.com,\r\n alice@example.com",), False),  # folded
        (("From: scott@example.com", "FROM: alice@example.com"), False),  # twice
        (("From: alice@example.com.",), False),
        (("From: Friends: scott@example.com, ceo@scott.example;",), False),  # a group
        (("Subject: x", "From : alice@example.com"), False),  # obsolete syntax
        (("From: scott@example.com", " From: alice@example.com"), False),  # folded into it
    ],
)
def test_header_forms_a_client_may_try(map_bound, headers, stored):
    before = spooled_ids(map_bound)
    with session(map_bound) as s:
        stage, code, text = send(s, "scott@example.com", message(*headers))
    assert stage == "data"
    if stored:
        assert code == 250, text
    else:
        refused_by_binding(code, text, 550)
        assert spooled_ids(map_bound) == before


def test_a_huge_from_header_neither_stalls_the_server_nor_passes(map_bound):
    """
    From: with 30,000 copies of an allowed address (540 kB, well within
    the size limit): reading it on the reactor thread took seconds, every
    other session waiting, then one lookup per copy, and it was stored.
    Now it is refused at once; another session's NOOPs stay fast.
    """
    head = "From: " + ",\r\n ".join(["scott@example.com"] * 30_000)
    body = message(head)
    before = spooled_ids(map_bound)
    result: list[Any] = []
    with session(map_bound) as other, session(map_bound) as s:
        assert s.mail("scott@example.com")[0] == 250
        assert s.rcpt("rcpt@example.net")[0] == 250
        latencies = noop_latencies(other, lambda: result.append(s.data(body)), pause=0.02)
    code, text = result[0]
    refused_by_binding(code, text.decode(), 550)
    assert spooled_ids(map_bound) == before
    assert max(latencies) < 2.0, latencies
    wait_for_log(map_bound, "may not send as (header too large to check) (header; ")


def test_a_slow_to_parse_from_header_does_not_stall_other_sessions(map_bound):
    """
    A From: just under the field limit, written to be slow for the stdlib's
    parser (quoted words joined by dots: ~0.3 s of parsing here): parsed
    off the reactor thread, so another session's NOOPs stay fast while
    three such messages go through.  On the reactor each was a 0.3 s stall.
    """
    field = '"a".' * 2000 + "scott@example.com"
    assert len(field) < MAX_FIELD_CHARS
    body = message("From: " + field)
    # what the parse costs on this machine now (a loaded one is slower at both)
    started = time.monotonic()
    header_addresses(f"From: {field}\r\n\r\n".encode(), False)
    parse = time.monotonic() - started
    codes: list[int] = []
    with session(map_bound) as other, session(map_bound) as s:

        def send_three() -> None:
            for _ in range(3):
                assert s.mail("scott@example.com")[0] == 250
                assert s.rcpt("rcpt@example.net")[0] == 250
                codes.append(s.data(body)[0])

        latencies = noop_latencies(other, send_three, pause=0.01)
    # "a".….scott@example.com is not scott's address: refused, after parsing
    assert codes == [550, 550, 550], codes
    # on the reactor thread a NOOP would wait a whole parse
    assert latencies and max(latencies) < max(0.15, parse / 2), (parse, sorted(latencies)[-5:])


#: the policy's checker in a checker thread, and "hang" holding that thread
HUNG_POLICY = (
    POLICY_BOUND.replace(
        '@kumo.on("smtp_server_auth_plain")\ndef auth(',
        '@kumo.on("smtp_server_auth_plain")\n@kumo.blocking\ndef auth(',
    ).replace(
        'if authc == "hang":\n        return defer.Deferred()',
        'if authc == "hang":\n        return threading.Event().wait(60)',
    )
    + "\nimport threading\n"
)


def test_a_hung_credential_store_does_not_hold_up_the_header_check(tmp_path, certs):
    """
    The one checker thread is held by a check that never ends (a store that
    hangs): a session that logged in before still gets its message's
    From: checked at once, and the map re-read when it changes, in the
    binding's own parse thread.  Behind the checks each waited [policy]
    timeout for a thread and got 451 4.7.1.
    """
    assert HUNG_POLICY.count("@kumo.blocking") == 1 and "Event().wait(60)" in HUNG_POLICY
    where = tmp_path / "hung"
    where.mkdir()
    (where / "sender_logins").write_text(MAP)
    (where / "policy.py").write_text(HUNG_POLICY)
    extra = (
        '[policy]\npath = "policy.py"\ntimeout = 5\n\n'
        '[sender_binding]\nsource = "map"\nmap = "sender_logins"\n'
    )
    with running_server(where, certs, None, auth="threads = 1", extra=extra) as srv:
        with session(srv) as s, starttls_client(srv) as hung:
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                login(hung, "PLAIN", "hang", "any")
            assert e.value.smtp_code == 454  # [auth] timeout; the thread stays held
            started = time.monotonic()
            sent(s, srv, "scott@example.com", message("From: scott@example.com"))
            stage, code, _ = send(s, "scott@example.com", message("From: alice@example.com"))
            assert (stage, code) == ("data", 550)
            assert time.monotonic() - started < 2.5
            # The map changes meanwhile: it is re-read in that thread too.
            (where / "sender_logins").write_text(MAP + "new@example.com scott\n")
            time.sleep(1.2)  # past the map's stat interval
            started = time.monotonic()
            sent(s, srv, "new@example.com", message("From: new@example.com"))
            assert time.monotonic() - started < 2.5
        log = srv.log()
        assert "sender binding header check unavailable" not in log
        assert "sender binding: map" in log and "re-read" in log


# --------------------------------------------------------------------------
# the map file


@pytest.fixture(scope="module")
def strict(tmp_path_factory, certs) -> Iterator[Server]:
    """A map server with allow_null_sender = false and check_header_from = false."""
    where = tmp_path_factory.mktemp("strict")
    (where / "sender_logins").write_text(MAP)
    extra = (
        '[sender_binding]\nsource = "map"\nmap = "sender_logins"\n'
        "allow_null_sender = false\ncheck_header_from = false\n"
    )
    with bound_server(where, certs, extra) as srv:
        yield srv


def test_map_exact_entry_beats_its_domain_wildcard(strict):
    with session(strict) as s:
        sent(s, strict, "whatever@scott.example", message("From: x@y.example"))
        stage, code, text = send(s, "ceo@scott.example", message("From: x@y.example"))
        assert stage == "mail"
        refused_by_binding(code, text, 553)
    log = wait_for_log(strict, "may not send as ceo@scott.example (envelope; ")
    assert 'map line 5: "ceo@scott.example ceo" (does not list this user)' in log


@pytest.mark.parametrize("variant", ["CEO@scott.example", "Ceo@SCOTT.example"])
def test_map_exact_entry_also_guards_its_case_variants(map_bound, variant):
    """
    ``ceo@scott.example ceo`` protects the CEO's address from the
    ``@scott.example`` wildcard in any case: mail systems deliver and show
    ``CEO@scott.example`` as the CEO's mailbox.  Envelope and From: alike.
    """
    before = spooled_ids(map_bound)
    with session(map_bound) as s:
        stage, code, text = send(s, variant, message("From: x@scott.example"))
        assert stage == "mail"
        refused_by_binding(code, text, 553)
        stage, code, text = send(s, "scott@example.com", message(f"From: The CEO <{variant}>"))
        assert stage == "data"
        refused_by_binding(code, text, 550)
        assert spooled_ids(map_bound) == before
        # the rest of the domain is still the wildcard's
        sent(s, map_bound, "Chief@scott.example", message("From: Chief@scott.example"))
    wait_for_log(map_bound, f"may not send as {variant} (envelope; ")


def test_null_sender_refused_when_not_allowed(strict):
    with session(strict) as s:
        stage, code, text = send(s, "", message("From: scott@example.com"))
        assert stage == "mail"
        refused_by_binding(code, text, 553)


def test_envelope_only_when_check_header_from_is_off(strict):
    with session(strict) as s:
        msg = sent(s, strict, "scott@example.com", message("From: The CEO <ceo@example.net>"))
        assert b"From: The CEO <ceo@example.net>" in msg.read_bytes()


def test_map_is_reread_on_change_without_restart(strict):
    path = strict.directory / "sender_logins"
    pid = strict.proc.pid
    with session(strict) as s:
        stage, code, _ = send(s, "new@example.org", message())
        assert (stage, code) == ("mail", 553)
        sent(s, strict, "sales@example.com", message())
        # a new file (new inode) in place, as an editor or a deploy writes it:
        # new@example.org is scott's now, sales@example.com no longer
        tmp = path.with_suffix(".new")
        changed = MAP.replace("alice, scott", "alice") + "new@example.org scott\n"
        tmp.write_text(changed)
        os.replace(tmp, path)
        # checked at most once a second: wait for it, at most a few seconds
        deadline = time.monotonic() + 5
        while True:
            stage, code, text = send(s, "new@example.org", message())
            if code != 553 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (stage, code) == ("data", 250), text
        stage, code, text = send(s, "sales@example.com", message())
        assert stage == "mail"
        refused_by_binding(code, text, 553)
        # a broken file: logged with its line, the previous map kept
        path.write_text(changed + "broken-line\n")
        time.sleep(1.1)
        sent(s, strict, "new@example.org", message())
    wait_for_log(strict, f"sender binding: map {path} re-read (7 entries)")
    wait_for_log(
        strict,
        f'sender binding: {path} line 10: the key "broken-line" is neither an address nor '
        "@domain; keeping the previous map (7 entries)",
    )
    assert strict.proc.pid == pid and strict.proc.poll() is None


# --------------------------------------------------------------------------
# a store that cannot answer: 451 4.7.1, never a pass


def assert_lookup_down(s: smtplib.SMTP, sender: str = "scott@example.com") -> None:
    stage, code, text = send(s, sender, message(f"From: {sender}"))
    assert (stage, code) == ("mail", 451), text
    assert text.startswith("4.7.1 "), text


def test_ldap_down_is_451_then_back(ldap_bound, directory):
    bound = ldap_bound
    before = spooled_ids(bound)
    directory.stop()
    try:
        with session(bound) as s:
            assert_lookup_down(s)
            assert_lookup_down(s, "alice@example.com")  # not a refusal either: unknown
            assert s.noop()[0] == 250
    finally:
        directory.start()
    assert spooled_ids(bound) == before
    wait_for_log(bound, "sender binding store unavailable: ldap: ldap://127.0.0.1:")
    with session(bound) as s:
        sent(s, bound, "scott@example.com", message("From: scott@example.com"))
    # one line down, one line back: not one per command
    log = wait_for_log(bound, "sender binding store available again (2 operations met it down)")
    assert log.count("sender binding store unavailable") == 1


def test_sqlite_table_gone_is_451_at_mail_and_at_end_of_data(sqlite_bound, sqlite_db):
    bound = sqlite_bound

    def rename(old: str, new: str) -> None:
        with contextlib.closing(sqlite3.connect(sqlite_db)) as conn:
            conn.execute(f"ALTER TABLE {old} RENAME TO {new}")
            conn.commit()

    before = spooled_ids(bound)
    metrics = scrape(bound.metrics_port)
    with session(bound) as s:
        rename("senders", "senders_gone")
        try:
            assert_lookup_down(s)
        finally:
            rename("senders_gone", "senders")
        # the envelope passes, then the store goes before the end of DATA
        assert s.mail("scott@example.com")[0] == 250
        assert s.rcpt("rcpt@example.net")[0] == 250
        rename("senders", "senders_gone")
        try:
            code, reply = s.data(message("From: sales@example.com"))
            assert code == 451 and reply.startswith(b"4.7.1 "), reply
        finally:
            rename("senders_gone", "senders")
        assert spooled_ids(bound) == before
        sent(s, bound, "scott@example.com", message("From: sales@example.com"))
    after = scrape(bound.metrics_port)
    assert after[("envelope", "error")] - metrics.get(("envelope", "error"), 0) == 1
    assert after[("header", "error")] - metrics.get(("header", "error"), 0) == 1
    # down at MAIL FROM, back at the next MAIL FROM, down at DATA, back
    log = wait_for_log(bound, "sender binding store unavailable: sql: ")
    assert log.count("sender binding store unavailable: sql: ") == 2
    assert log.count("sender binding store available again (1 operations met it down)") == 2


def test_postgresql_down_is_451(tmp_path, certs):
    dead = f"postgresql://postgres@{PG_HOST}:{free_port()}/nothing_here"
    with bound_server(tmp_path / "down", certs, sql_config(dead)) as srv:
        with session(srv) as s:
            start = time.monotonic()
            assert_lookup_down(s)
            assert time.monotonic() - start < 10
            # the null sender needs no lookup, the From: at the end of DATA does
            assert s.mail("")[0] == 250
            assert s.rcpt("rcpt@example.net")[0] == 250
            code, reply = s.data(message("From: scott@example.com"))
            assert code == 451 and reply.startswith(b"4.7.1 "), reply
            assert spooled_ids(srv) == set()
            sent(s, srv, "", message())  # no From: either: nothing to look up
        log = wait_for_log(srv, "sender binding store unavailable: sql: ")
        # one line for both lookups: the null sender between them says nothing
        assert log.count("sender binding store unavailable") == 1
        assert "sender binding store available again" not in log


def test_a_from_that_bidi_controls_make_read_as_a_protected_address_is_550(bound):
    # "<RLO>oec<PDF>@scott.example" shows as ceo@scott.example, which only
    # ceo may use; scott's wildcard let the header through (outside test)
    before = spooled_ids(bound)
    with session(bound) as s:
        for header in (
            "From: <\u202eoec\u202c@scott.example>",
            "From: CEO <\u2067oec\u2069@scott.example>",
            "From: <ceo\u00a0@scott.example>",
        ):
            stage, code, text = send(s, "x@scott.example", message(header), ("SMTPUTF8",))
            assert (stage, code) == ("data", 550), (header, text)
        sent(s, bound, "x@scott.example", message("From: <oec@scott.example>"))
    assert len(spooled_ids(bound) - before) == 1
