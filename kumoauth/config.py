"""
Configuration: the TOML file of SPEC §3, parsed with :mod:`tomllib` into
typed, validated, immutable objects.

Every operator mistake becomes one :class:`ConfigError` whose ``str()`` is a
single line naming the file and the key (or line) at fault; the twistd plugin
prints that line and exits non-zero, without a traceback.

Relative paths in the file (certificate, key, policy, spool) are resolved
against the directory that holds the configuration file, so a config and its
neighbours can be moved together.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kumoauth.auth.names import check_format, check_realm, formatter
from kumoauth.checks import (  # noqa: F401  (re-exported for older importers)
    _LOOPBACK,
    Check,
    _Bad,
    _bool,
    _choice,
    _int,
    _number,
    _port,
    _show,
    _str,
)
from kumoauth.meta import MAX_DEPTH, too_deep

TLS_MODES = ("starttls", "implicit", "none")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
MECHANISMS = ("PLAIN", "LOGIN")
BARE_NEWLINES = ("normalize", "reject")


class ConfigError(Exception):
    """
    An operator's mistake in the configuration: one line, no traceback.
    """

    def __init__(self, path: Path | str, where: str, problem: str) -> None:
        self.path = str(path)
        self.where = where
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.where:
            return f"{self.path}: {self.where}: {self.problem}"
        return f"{self.path}: {self.problem}"


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    banner: str = "kumoauth"
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    idle_timeout: float = 300.0
    max_message_size: int = 26214400
    #: the largest header section accepted (Exim's header_maxsize); 0: any
    max_header_size: int = 1048576
    max_recipients: int = 100
    max_errors: int = 10
    shutdown_grace: float = 30.0
    workers: int = 1
    #: RFC 5321 §2.3.8: what to do with a bare CR or LF inside DATA
    bare_newlines: str = "normalize"
    #: RFC 3461: offer DSN (NOTIFY, ORCPT, RET, ENVID) and honour it
    dsn: bool = True


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path
    private_key: Path
    self_signed: bool = False
    min_version: str = "TLSv1.2"
    session_tickets: bool = False
    #: seconds from connect (implicit) or the 220 to STARTTLS until the
    #: handshake is complete
    handshake_timeout: float = 30.0
    #: key-exchange groups, OpenSSL names; None: kumoauth's default list
    groups: tuple[str, ...] | None = None
    #: TLS 1.2 cipher suites, an OpenSSL cipher string; None: the default
    ciphers: str | None = None


@dataclass(frozen=True)
class ListenerConfig:
    endpoint: str
    tls: str = "starttls"
    auth_required: bool = True
    allow_plaintext_auth: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: for a ``haproxy:`` endpoint, the peers whose PROXY header is believed
    #: (empty: any peer)
    proxy_networks: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ThrottleConfig:
    """
    ``[auth.throttle]``: failed attempts counted per client IP and per authc
    over a sliding window (SPEC §8).
    """

    window: float = 900.0
    max_failures_per_ip: int = 10
    max_failures_per_authc: int = 5
    store: str = "memory"
    #: "closed": 454 while the store is unreachable; "open": let AUTH through
    on_store_error: str = "closed"
    #: IPv6 clients are counted per network of this many bits
    ipv6_prefix: int = 64
    #: the file the failed-password fingerprints' key is read from; None:
    #: a random one per process, or the shared store's
    fingerprint_key_file: Path | None = None
    #: that file's bytes, read when the configuration is (never shown)
    fingerprint_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LimitsConfig:
    """
    ``[limits]``: per authenticated user (authn_id) sending limits over a
    window, across every instance sharing the store.  None: no limit of
    that kind.
    """

    window: float = 3600.0
    max_messages_per_user: int | None = None
    max_recipients_per_user: int | None = None
    store: str = "memory"
    on_store_error: str = "closed"


@dataclass(frozen=True)
class CacheConfig:
    """
    ``[auth.cache]``: the verified-credential cache
    (:mod:`kumoauth.backends.cache`).  Without the table, no cache.
    """

    ttl: float = 300.0
    negative_ttl: float = 30.0
    max_entries: int = 100_000

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 or self.negative_ttl > 0


@dataclass(frozen=True)
class AuthConfig:
    mechanisms: tuple[str, ...] = MECHANISMS
    checker: str = "policy"
    timeout: float = 10.0
    failure_delay: float = 1.0
    max_failures: int = 3
    max_in_flight: int = 100
    threads: int = 10
    #: a file of locked users (kumoauth.auth.locked), or None
    locked_users: Path | None = None
    #: Dovecot's auth_username_format and auth_default_realm for logins
    #: (kumoauth.auth.names), or None
    username_format: str | None = None
    default_realm: str | None = None
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    #: ``[auth.cache]``, or None without the table (no cache)
    cache: CacheConfig | None = None
    #: ``[auth.oauth]`` (kumoauth.backends.oauth.Config), or None: no
    #: XOAUTH2/OAUTHBEARER
    oauth: Any = None
    #: ``[auth.<name>]`` tables for checkers, raw (their factory validates)
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @functools.cached_property
    def account(self) -> Callable[[str], str] | None:
        """The rewriting of a login into its account name, or None (as it comes)."""
        return formatter(self.username_format, self.default_realm)


@dataclass(frozen=True)
class PolicyConfig:
    path: Path | None = None
    #: deadline for every policy event but smtp_server_auth_plain (which
    #: has ``[auth] timeout``)
    timeout: float = 30.0


@dataclass(frozen=True)
class SpoolConfig:
    path: Path


@dataclass(frozen=True)
class MetricsConfig:
    """
    ``[metrics]``: a Twisted endpoint for Prometheus' ``/metrics``.
    """

    endpoint: str | None = None


@dataclass(frozen=True)
class LogConfig:
    """
    ``[log]`` (beyond SPEC §3): where to write JSON lines of kumoauth's
    events, besides twistd's text log.
    """

    json_path: Path | None = None


RELAY_TLS = ("starttls", "implicit", "none")
RELAY_IDENTITY = ("authz", "header", "none")


@dataclass(frozen=True)
class RelayConfig:
    """
    ``[relay]``: hand every accepted message to one upstream MTA.  Absent:
    spool only.  The password and the header key live in files of their
    own; their contents are read at start-up and on SIGHUP, never logged.
    """

    host: str
    port: int = 587
    tls: str = "starttls"
    ca_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    identity: str = "authz"
    header_key_file: Path | None = None
    concurrency: int = 10
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0, 14400.0)
    max_age: float = 432000.0
    #: tls = "none" to a host other than 127.0.0.1 / ::1 / localhost
    allow_plaintext: bool = False
    connect_timeout: float = 30.0
    #: seconds the upstream may take to answer one command (not the end of data)
    command_timeout: float = 300.0
    #: seconds the upstream may take to answer the end of a message's data
    data_timeout: float = 600.0
    #: mail transactions over one upstream session before it is closed
    max_messages_per_session: int = 100
    #: seconds an idle upstream session is kept for reuse
    idle_timeout: float = 10.0


@dataclass(frozen=True)
class Config:
    source: Path
    server: ServerConfig
    tls: TLSConfig | None
    listeners: tuple[ListenerConfig, ...]
    auth: AuthConfig
    policy: PolicyConfig
    spool: SpoolConfig
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    relay: RelayConfig | None = None
    #: ``[limits]``, or None without the table (no sending limits)
    limits: LimitsConfig | None = None
    #: ``[sender_binding]`` (kumoauth.auth.senders.SenderBindingConfig), or
    #: None: any authenticated user may use any sender address
    sender_binding: Any = None


# --- schema ---------------------------------------------------------------

# The value checks (a raw TOML value in, the typed value out, or _Bad)
# live in kumoauth.checks, shared with the modules that validate their own
# tables (credential stores, [auth.oauth], [sender_binding]).


def _table(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad(f"expected a table, got {_show(v)}")
    return dict(v)


def _mechanisms(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(m, str) for m in v):
        raise _Bad(f"expected a list of strings, got {_show(v)}")
    from kumoauth.auth.mechanisms import REGISTRY

    names = tuple(m.upper() for m in v)
    for name in names:
        if name not in REGISTRY:
            supported = ", ".join(REGISTRY)
            raise _Bad(f'unsupported mechanism "{name}" (supported: {supported})')
    if not names:
        raise _Bad("must name at least one mechanism")
    return tuple(dict.fromkeys(names))


def _names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(m, str) and m for m in v):
        raise _Bad(f"expected a list of names, got {_show(v)}")
    if not v:
        raise _Bad("must name at least one")
    return tuple(dict.fromkeys(v))


def _networks(v: Any) -> tuple[Any, ...]:
    if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
        raise _Bad(f"expected a list of addresses or networks, got {_show(v)}")
    try:
        return tuple(ipaddress.ip_network(n, strict=False) for n in v)
    except ValueError as e:
        raise _Bad(_show(str(e))) from None


def _login_setting(check: Callable[[str], str]) -> Check:
    """A string *check* takes (its ValueError is the problem)."""

    def checked(v: Any) -> str:
        try:
            return check(_str(v))
        except ValueError as e:
            raise _Bad(str(e)) from None

    return checked


def _prefix(v: Any) -> int:
    bits = _int(0)(v)
    if bits > 128:
        raise _Bad(f"must be an IPv6 prefix length (0-128), got {bits}")
    return bits


#: ``[server] workers`` above this is a typo, not a plan
MAX_WORKERS = 256

_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def _is_domain(name: str) -> bool:
    return len(name) <= 253 and _HOSTNAME.fullmatch(name) is not None


def _printable_ascii(text: str, space: bool = False) -> bool:
    low = " " if space else "!"
    return all(low <= c <= "~" for c in text)


def _hostname(v: Any) -> str:
    # In the greeting, the EHLO reply and Received: a domain name, or an
    # address literal ([192.0.2.1], [IPv6:...]).
    name = _str(v)
    literal = name.startswith("[") and name.endswith("]") and _printable_ascii(name)
    if not (literal or _is_domain(name)):
        raise _Bad(f"expected a domain name (or an address literal in brackets), got {_show(v)}")
    return name


def _host(v: Any) -> str:
    # A name to resolve, or an IP address.
    name = _str(v)
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return name
    if not _is_domain(name):
        raise _Bad(f"expected a host name or an IP address, got {_show(v)}")
    return name


def _banner(v: Any) -> str:
    text = _str(v)
    if not _printable_ascii(text, space=True):
        raise _Bad("must be printable ASCII on one line (it is sent in the 220 greeting)")
    return text


def _workers(v: Any) -> int:
    n = _int(1)(v)
    if n > MAX_WORKERS:
        raise _Bad(f"must be at most {MAX_WORKERS}, got {n}")
    return n


def _meta(v: Any) -> dict[str, Any]:
    table = _table(v)

    def storable(x: Any) -> bool:
        if isinstance(x, dict):
            return all(storable(y) for y in x.values())
        if isinstance(x, list):
            return all(storable(y) for y in x)
        if isinstance(x, float):
            return math.isfinite(x)
        return isinstance(x, str | int | bool)

    for key, value in table.items():
        if key in ("authn_id", "authz_id"):
            # The identity is what AUTH established, nothing else: relayed
            # as the authzid (identity = "authz") and bound to the sender.
            raise _Bad(f"{key!r} is set by AUTH only and cannot be given here")
        if too_deep(value):
            raise _Bad(f"{key!r} nests arrays and tables more than {MAX_DEPTH} deep")
        if not storable(value):
            raise _Bad(
                f"{key!r} holds {_show(value)}: meta values are stored as JSON, so use strings, "
                "numbers, booleans, arrays and tables (no TOML dates or times, no nan or inf)"
            )
    return table


#: longest wait between two relay attempts (a week), and longest max_age
#: (a year): a time past them is a mistake, and one past year 9999 broke
#: every date the queue shows
MAX_RETRY_DELAY = 7 * 86400.0
MAX_RELAY_AGE = 365 * 86400.0


def _schedule(v: Any) -> tuple[float, ...]:
    if not isinstance(v, list):
        raise _Bad(f"expected a non-empty list of seconds, got {_show(v)}")
    if not v:
        raise _Bad("expected a non-empty list of seconds, got an empty one")
    return tuple(_number(1.0, MAX_RETRY_DELAY)(x) for x in v)


SCHEMA: dict[str, dict[str, Check]] = {
    "server": {
        "hostname": _hostname,
        "banner": _banner,
        "max_connections": _int(1),
        "max_connections_per_ip": _int(1),
        "idle_timeout": _number(0.001),
        "max_message_size": _int(1),
        "max_header_size": _int(0),
        "max_recipients": _int(1),
        "max_errors": _int(1),
        "shutdown_grace": _number(0.0),
        "workers": _workers,
        "bare_newlines": _choice(*BARE_NEWLINES),
        "dsn": _bool,
    },
    "tls": {
        "certificate": _str,
        "private_key": _str,
        "self_signed": _bool,
        "min_version": _choice(*TLS_VERSIONS),
        "session_tickets": _bool,
        "handshake_timeout": _number(0.001),
        "groups": _names,
        "ciphers": _str,
    },
    "listener": {
        "endpoint": _str,
        "tls": _choice(*TLS_MODES),
        "auth_required": _bool,
        "allow_plaintext_auth": _bool,
        "meta": _meta,
        "proxy_networks": _networks,
    },
    "auth": {
        "mechanisms": _mechanisms,
        "checker": _str,
        "timeout": _number(0.001),
        "failure_delay": _number(0.0),
        "max_failures": _int(1),
        "max_in_flight": _int(1),
        "threads": _int(1),
        "locked_users": _str,
        "username_format": _login_setting(check_format),
        "default_realm": _login_setting(check_realm),
    },
    "auth.throttle": {
        "window": _number(1.0),
        "max_failures_per_ip": _int(1),
        "max_failures_per_authc": _int(1),
        "store": _str,
        "on_store_error": _choice("closed", "open"),
        "ipv6_prefix": _prefix,
        "fingerprint_key_file": _str,
    },
    "limits": {
        "window": _number(1.0),
        "max_messages_per_user": _int(1),
        "max_recipients_per_user": _int(1),
        "store": _str,
        "on_store_error": _choice("closed", "open"),
    },
    "auth.cache": {
        "ttl": _number(0.0),
        "negative_ttl": _number(0.0),
        "max_entries": _int(1),
    },
    "policy": {"path": _str, "timeout": _number(0.001)},
    "spool": {"path": _str},
    "log": {"json_path": _str},
    "metrics": {"endpoint": _str},
    "relay": {
        "host": _host,
        "port": _port,
        "tls": _choice(*RELAY_TLS),
        "ca_file": _str,
        "username": _str,
        "password_file": _str,
        "identity": _choice(*RELAY_IDENTITY),
        "header_key_file": _str,
        "concurrency": _int(1),
        "retry_schedule": _schedule,
        "max_age": _number(1.0, MAX_RELAY_AGE),
        "allow_plaintext": _bool,
        "connect_timeout": _number(0.001),
        "command_timeout": _number(0.001),
        "data_timeout": _number(0.001),
        "max_messages_per_session": _int(1),
        "idle_timeout": _number(0.0),
    },
}

REQUIRED: dict[str, tuple[str, ...]] = {
    "tls": ("certificate", "private_key"),
    "listener": ("endpoint",),
    "spool": ("path",),
}


def _section(source: Path, name: str, raw: Any, label: str | None = None) -> dict[str, Any]:
    label = label or f"[{name}]"
    if not isinstance(raw, dict):
        raise ConfigError(source, label, f"expected a table, got {_show(raw)}")
    schema = SCHEMA[name]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        check = schema.get(key)
        if check is None:
            known = ", ".join(schema)
            raise ConfigError(source, f"{label} {key}", f"unknown key (known: {known})")
        try:
            out[key] = check(value)
        except _Bad as e:
            raise ConfigError(source, f"{label} {key}", str(e)) from None
    for key in REQUIRED.get(name, ()):
        if key not in out:
            raise ConfigError(source, f"{label} {key}", "required key is missing")
    return out


#: the shortest and longest ``[auth.throttle] fingerprint_key_file``
FINGERPRINT_KEY_MIN = 32
FINGERPRINT_KEY_MAX = 4096


def _fingerprint_key(source: Path, path: Path) -> bytes:
    """
    The bytes of ``[auth.throttle] fingerprint_key_file``, as they are (a
    newline at the end is part of the key): at least 32, a regular file.
    The error names the file, never what it holds.
    """
    where = "[auth.throttle] fingerprint_key_file"
    try:
        # O_NONBLOCK: a FIFO named by mistake must not hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(source, where, f"{path}: not a regular file")
            with open(fd, "rb", closefd=False) as f:
                data = f.read(FINGERPRINT_KEY_MAX + 1)
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError(source, where, f"{path}: {e.strerror or e}") from None
    if len(data) < FINGERPRINT_KEY_MIN:
        raise ConfigError(
            source,
            where,
            f"{path}: {len(data)} bytes; the key must be at least {FINGERPRINT_KEY_MIN} "
            "(head -c 32 /dev/urandom > FILE)",
        )
    if len(data) > FINGERPRINT_KEY_MAX:
        raise ConfigError(source, where, f"{path}: more than {FINGERPRINT_KEY_MAX} bytes")
    return data


def _spool_directory(source: Path, path: Path) -> None:
    """
    ``[spool] path`` is a directory, or not there yet (the queue makes it);
    a file there is the operator's mistake, said as one (the queue's
    ``mkdir`` said "File exists").  What else is wrong with it (no
    permission) the queue says when it opens it.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise ConfigError(
            source, "[spool] path", f"{path}: not a directory (a part of the path is a file)"
        ) from None
    except OSError:
        return
    if not stat.S_ISDIR(mode):
        raise ConfigError(
            source, "[spool] path", f"{path}: not a directory (the queue is a directory)"
        )


def _path(source: Path, value: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = source.parent / p
    return p


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn()


def parse(
    text: str,
    source: Path | str = "<config>",
    *,
    read_files: bool = True,
    fingerprint_key: bytes | None = None,
) -> Config:
    """
    Parse and validate configuration text.  Raises :class:`ConfigError`.

    Files the text names are checked by reading them (the fingerprint key
    is kept), unless *read_files* is false: then the text is one already
    validated (a worker's generation, from its supervisor), whose files may
    have changed or gone since, and the fingerprint key is *fingerprint_key*.
    """
    source = Path(source)
    try:
        # A byte order mark (Windows editors) is no TOML; not worth refusing.
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"TOML syntax error: {e}") from None

    for key in data:
        if key in EXTERNAL_SECTIONS:
            continue
        if key not in SCHEMA or "." in key:
            # [[listener]]: an array of tables, as it is written
            known = ", ".join(
                f"[[{k}]]" if k in ARRAY_SECTIONS else f"[{k}]"
                for k in (*SCHEMA, *sorted(EXTERNAL_SECTIONS))
                if "." not in k
            )
            raise ConfigError(source, f"[{key}]", f"unknown section (known: {known})")

    server = _section(source, "server", data.get("server", {}))
    if "hostname" not in server:
        # Resolved once per process: a reload must not do reverse DNS on
        # the reactor thread (and gets the same answer anyway).
        server["hostname"] = _fqdn()

    raw_listeners = data.get("listener")
    if raw_listeners is None:
        raise ConfigError(source, "[[listener]]", "at least one listener is required")
    if not isinstance(raw_listeners, list) or not raw_listeners:
        raise ConfigError(source, "[[listener]]", "expected one or more [[listener]] blocks")
    listeners = tuple(
        ListenerConfig(
            **_section(source, "listener", raw, f"[[listener]] #{i + 1}"),
        )
        for i, raw in enumerate(raw_listeners)
    )

    bound: dict[int, tuple[str, str, str]] = {}
    for i, listener in enumerate(listeners):
        where = f"[[listener]] #{i + 1} endpoint"
        address = _bind_address(listener.endpoint)
        if address is not None and address[0] == "ssl":
            raise ConfigError(
                source,
                where,
                'ssl: is not supported: use tcp: with tls = "implicit" '
                "(the certificate and key come from [tls])",
            )
        _check_port(source, where, listener.endpoint, address)
        if address is not None:
            for j, other in bound.items():
                if _same_socket(address, other):
                    raise ConfigError(source, where, f"the same socket as [[listener]] #{j + 1}")
            bound[i] = address
        if listener.proxy_networks and not listener.endpoint.startswith("haproxy:"):
            raise ConfigError(
                source,
                f"[[listener]] #{i + 1} proxy_networks",
                "only for a haproxy: endpoint (PROXY protocol)",
            )
        if listener.auth_required and listener.tls == "none" and not listener.allow_plaintext_auth:
            raise ConfigError(
                source,
                f"[[listener]] #{i + 1} auth_required",
                'no client could ever send: AUTH needs TLS, and tls = "none" '
                "(set allow_plaintext_auth = true behind a TLS proxy, or auth_required = false)",
            )

    tls: TLSConfig | None = None
    if "tls" in data:
        t = _section(source, "tls", data["tls"])
        t["certificate"] = _path(source, t["certificate"])
        t["private_key"] = _path(source, t["private_key"])
        tls = TLSConfig(**t)
    else:
        for i, listener in enumerate(listeners):
            if listener.tls != "none":
                raise ConfigError(
                    source,
                    "[tls]",
                    f'missing, but [[listener]] #{i + 1} uses tls = "{listener.tls}"',
                )

    raw_auth = data.get("auth", {})
    raw_throttle = raw_auth.pop("throttle", {}) if isinstance(raw_auth, dict) else {}
    t = _section(source, "auth.throttle", raw_throttle)
    if "store" in t:
        t["store"] = _store_files(source, t["store"])
    if "fingerprint_key_file" in t:
        t["fingerprint_key_file"] = _path(source, t["fingerprint_key_file"])
        t["fingerprint_key"] = (
            _fingerprint_key(source, t["fingerprint_key_file"]) if read_files else fingerprint_key
        )
    throttle = ThrottleConfig(**t)
    raw_oauth = raw_auth.pop("oauth", None) if isinstance(raw_auth, dict) else None
    oauth = _oauth(source, raw_oauth, read_files) if raw_oauth is not None else None
    raw_cache = raw_auth.pop("cache", None) if isinstance(raw_auth, dict) else None
    cache = None
    if raw_cache is not None:
        cache = CacheConfig(**_section(source, "auth.cache", raw_cache))
    # Every other sub-table is a checker's own ([auth.<name>]): its factory
    # validates it (kumoauth.auth.checkers), once the checker is known.
    tables: dict[str, Mapping[str, Any]] = {}
    if isinstance(raw_auth, dict):
        for name in [k for k, v in raw_auth.items() if isinstance(v, dict)]:
            tables[name] = raw_auth.pop(name)
    a = _section(source, "auth", raw_auth)
    if "locked_users" in a:
        # read (and refused if unusable) where it is used: build_runtime
        a["locked_users"] = _path(source, a["locked_users"])
    auth = AuthConfig(
        **a,
        throttle=throttle,
        cache=cache,
        oauth=oauth,
        tables=tables,
    )
    from kumoauth.auth.mechanisms import REGISTRY as MECHANISM_REGISTRY

    for name in auth.mechanisms:
        if MECHANISM_REGISTRY[name].needs_oauth and oauth is None:
            raise ConfigError(
                source,
                "[auth] mechanisms",
                f"{name} needs an [auth.oauth] table (the token issuer to trust)",
            )

    p = _section(source, "policy", data.get("policy", {}))
    if "path" in p:
        p["path"] = _path(source, p["path"])
    policy = PolicyConfig(**p)

    if "spool" not in data:
        raise ConfigError(source, "[spool] path", "required key is missing")
    s = _section(source, "spool", data["spool"])
    spool = SpoolConfig(path=_path(source, s["path"]))
    if read_files:
        _spool_directory(source, spool.path)

    raw_log = _section(source, "log", data.get("log", {}))
    log = LogConfig(
        json_path=_path(source, raw_log["json_path"]) if "json_path" in raw_log else None
    )

    metrics = MetricsConfig(**_section(source, "metrics", data.get("metrics", {})))
    if metrics.endpoint is not None:
        _check_port(source, "[metrics] endpoint", metrics.endpoint, _bind_address(metrics.endpoint))
    relay = _relay(source, data["relay"]) if "relay" in data else None
    sender_binding = None
    if "sender_binding" in data:
        sender_binding = _sender_binding(source, data["sender_binding"], auth, read_files)
    _auth_table_names(source, auth, sender_binding)
    limits = None
    if "limits" in data:
        raw_limits = _section(source, "limits", data["limits"])
        if "store" in raw_limits:
            raw_limits["store"] = _store_files(source, raw_limits["store"])
        limits = LimitsConfig(**raw_limits)

    return Config(
        source=source,
        log=log,
        metrics=metrics,
        relay=relay,
        limits=limits,
        sender_binding=sender_binding,
        server=ServerConfig(**server),
        tls=tls,
        listeners=listeners,
        auth=auth,
        policy=policy,
        spool=spool,
    )


#: sections validated by the module that owns them (imported only when present)
EXTERNAL_SECTIONS = frozenset({"sender_binding"})

#: sections written as arrays of tables (``[[listener]]``)
ARRAY_SECTIONS = frozenset({"listener"})


def _auth_table_names(source: Path, auth: AuthConfig, sender_binding: Any) -> None:
    """
    An ``[auth.<name>]`` table that no one reads and whose name is a near
    miss of one that someone would (``[auth.throtle]``): an unknown table,
    said as one, whatever ``[auth] checker`` is.  Other names are left to
    the checker's resolution (:func:`kumoauth.auth.checkers.resolve`),
    which knows the factories.
    """
    if not auth.tables:
        return
    import difflib

    from kumoauth.auth.checkers import BUILTIN

    known = ("throttle", "cache", "oauth", *BUILTIN)
    checker = auth.checker
    factory_table = checker.partition(":")[2]  # "package.module:name" reads [auth.name]
    read = {checker, factory_table}
    if sender_binding is not None:
        read.add(sender_binding.source)
    for name in auth.tables:
        if name in known or name in read:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            listed = ", ".join(f"[auth.{k}]" for k in (*known, factory_table) if k)
            raise ConfigError(
                source,
                f"[auth.{name}]",
                f"unknown table: did you mean [auth.{close[0]}]? (known: {listed})",
            )


def _store_files(source: Path, spec: str) -> str:
    """A Redis store URL's file options, relative to the configuration file."""
    if "?" not in spec:
        return spec  # no options: nothing to import the Redis client for
    from kumoauth.stores.redis import with_files_under

    return with_files_under(spec, source.parent)


def _sender_binding(source: Path, raw: Any, auth: AuthConfig, read_files: bool = True) -> Any:
    """
    ``[sender_binding]``, validated by :mod:`kumoauth.auth.senders`; a
    source other than the map needs the store's ``[auth.<source>]`` table.
    """
    if not isinstance(raw, dict):
        raise ConfigError(source, "[sender_binding]", f"expected a table, got {_show(raw)}")
    from kumoauth.auth import senders

    try:
        binding = senders.validate(raw, base=source.parent, read_files=read_files)
    except ValueError as e:
        key, sep, problem = str(e).partition(": ")
        if sep and " " not in key:
            raise ConfigError(source, f"[sender_binding] {key}", problem) from None
        raise ConfigError(source, "[sender_binding]", str(e)) from None
    if binding.source != "map" and binding.source not in auth.tables:
        raise ConfigError(
            source,
            "[sender_binding] source",
            f'"{binding.source}" reads the [auth.{binding.source}] table, which is missing',
        )
    return binding


def _oauth(source: Path, raw: Any, read_files: bool = True) -> Any:
    """
    ``[auth.oauth]``, validated by the token validator's module (imported
    only when the table exists: JOSE libraries are not loaded otherwise).
    """
    if not isinstance(raw, dict):
        raise ConfigError(source, "[auth.oauth]", f"expected a table, got {_show(raw)}")
    from kumoauth.backends import oauth

    try:
        return oauth.validate(raw, base=source.parent, read_files=read_files)
    except ValueError as e:
        key, sep, problem = str(e).partition(": ")
        if sep and " " not in key:
            raise ConfigError(source, f"[auth.oauth] {key}", problem) from None
        raise ConfigError(source, "[auth.oauth]", str(e)) from None


def _relay(source: Path, raw: Any) -> RelayConfig:
    r = _section(source, "relay", raw)
    if "host" not in r:
        raise ConfigError(source, "[relay] host", "required key is missing")
    for key in ("ca_file", "password_file", "header_key_file"):
        if key in r:
            r[key] = _path(source, r[key])
    if "ca_file" in r and r.get("tls") == "none":
        raise ConfigError(
            source, "[relay] ca_file", 'only with tls = "starttls" or "implicit": tls is "none"'
        )
    if ("username" in r) != ("password_file" in r):
        raise ConfigError(
            source, "[relay] username", "username and password_file go together (AUTH PLAIN)"
        )
    if r.get("tls") == "none" and r["host"] not in _LOOPBACK and not r.get("allow_plaintext"):
        raise ConfigError(
            source,
            "[relay] tls",
            f'"none" sends mail and the relay password in clear to {r["host"]}: '
            "only to 127.0.0.1 / ::1, or set allow_plaintext = true",
        )
    if r.get("identity", "authz") == "authz" and "username" not in r:
        raise ConfigError(
            source,
            "[relay] identity",
            '"authz" passes the user as the SASL authzid, which needs username and '
            'password_file (or set identity = "header" or "none")',
        )
    if r.get("identity") == "header" and "header_key_file" not in r:
        raise ConfigError(source, "[relay] header_key_file", 'required with identity = "header"')
    return RelayConfig(**r)


def read_text(path: Path) -> str:
    """
    The configuration file's text.  Raises :class:`ConfigError`.
    """
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "configuration file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "configuration file is not UTF-8") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read configuration: {e.strerror}") from None


def _endpoint_fields(description: str) -> tuple[list[str], dict[str, str]]:
    """
    The positional and keyword arguments of a Twisted endpoint description
    (the type first): fields split at ":", a keyword at its first "=", and a
    backslash taking the next character as it is.
    """
    positional: list[str] = []
    keywords: dict[str, str] = {}
    key: str | None = None
    current: list[str] = []

    def end_field() -> None:
        if key is None:
            positional.append("".join(current))
        else:
            keywords[key] = "".join(current)

    chars = iter(description)
    for c in chars:
        if c == "\\":
            current.append(next(chars, ""))
        elif c == ":":
            end_field()
            key, current = None, []
        elif c == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(c)
    end_field()
    return positional, keywords


def _bind_address(endpoint: str) -> tuple[str, str, str] | None:
    """
    What a listener's endpoint binds, for the checks that need no reactor:
    (``"4"``, ``"6"``, ``"unix"`` or ``"ssl"``; the port or path; the
    interface, ``""`` for every address), or None for a type not looked at
    here (Twisted parses every endpoint when the listeners are made).
    """
    positional, keywords = _endpoint_fields(endpoint.removeprefix("haproxy:"))
    kind = positional[0].strip().lower()
    if kind not in ("tcp", "tcp6", "unix", "ssl"):
        return None
    first = "address" if kind == "unix" else "port"
    where = (positional[1] if len(positional) > 1 else keywords.get(first, "")).strip()
    if kind == "unix":
        return "unix", where, ""
    interface = keywords.get("interface", "").strip()
    # As Twisted binds it: tcp6:, or tcp: with an IPv6 interface, is IPv6.
    family = "6" if kind == "tcp6" or ":" in interface else "4"
    if interface in ("0.0.0.0", "::"):
        interface = ""
    return "ssl" if kind == "ssl" else family, where, interface


def _check_port(
    source: Path, where: str, endpoint: str, address: tuple[str, str, str] | None
) -> None:
    """
    A ``tcp:``, ``tcp6:`` or ``ssl:`` *endpoint* (its :func:`_bind_address`)
    whose port is wrong is one line naming *where*: Twisted's own error for
    ``tcp:notaport`` is ``invalid literal for int() with base 10``.
    """
    if address is None or address[0] == "unix":
        return
    port = address[1]
    problem = None
    if not port:
        problem = "no port (tcp:587, say)"
    elif not (port.isascii() and port.isdigit()):
        problem = f"the port {_show(port)} is not a number"
    elif int(port) > 65535:
        problem = f"the port {port} is out of range (0 to 65535)"
    if problem is not None:
        raise ConfigError(source, where, f"{_show(endpoint)}: {problem}")


def _same_socket(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    """
    Whether two listeners would bind one socket (the second then fails):
    one family, one port or path, and one interface or every one.  (An IPv6
    listener on every address may take IPv4 too, as the system decides:
    not refused here.)
    """
    if a[0] != b[0] or a[1] != b[1] or a[1] in ("", "0"):
        return False
    return a[2] == b[2] or "" in (a[2], b[2])


def load(path: Path | str) -> Config:
    """
    Read and validate the configuration file at *path*.
    """
    path = Path(path)
    return parse(read_text(path), path.resolve())
