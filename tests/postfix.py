"""
Real Postfix and Dovecot for tests and the benchmark.

kumoauth's relay hands every accepted message to one upstream MTA with AUTH
PLAIN as a service account (``kumoauth``), the submitting user being the
SASL *authzid*. The upstream here is a real Postfix whose SASL server is a
real Dovecot (auth only): a Dovecot *master user* passdb accepts a PLAIN
login whose authcid/password are the master user's and whose authzid is the
end user, as that end user. That is the Postfix/Dovecot equivalent of
kumoauth's identity = authz model.

* :func:`running_dovecot_auth` — ``dovecot -c FILE -F``, auth only (no IMAP,
  POP3, LMTP, ...): passwd-file passdbs (users, and master users with
  ``master = yes`` + ``result_success = continue`` so the target user must
  exist; the same accounts as themselves from 127.0.0.1 only, as
  docs/relay.md says for kumoauth's bounces), static userdb, hashes made
  by ``doveadm pw -s SHA512-CRYPT``.
  It exposes three auth-client listeners: ``.socket`` (unix, for Postfix's
  ``smtpd_sasl_type = dovecot``), ``.client_socket`` (unix) and
  ``.client_port`` (TCP on 127.0.0.1) for code that speaks the Dovecot
  auth-client protocol (VERSION/CPID/AUTH lines) itself.
* :func:`running_postfix` — ``postfix -c DIR start`` from a configuration
  directory of its own: queue, data, log in the temporary directory, smtpd on
  127.0.0.1:<port> with STARTTLS and Dovecot SASL, relaying only for
  SASL-authenticated clients, everything accepted forwarded by its smtp client
  to ``relayhost`` (a recording sink, or whatever the benchmark puts there).
* :class:`RecordingSink` — an aiosmtpd server on 127.0.0.1 that keeps what
  it receives.

Postfix runs as root with ``mail_owner = postfix``: its daemons drop to the
``postfix`` user, so every directory they reach by absolute path (the data
directory, Dovecot's socket) must be searchable by that user. pytest's
``tmp_path`` is not (``/tmp/pytest-of-root`` is 0700): use
:func:`service_directory`, a directory under ``/tmp`` with mode 0711.

Debian packages: ``postfix dovecot-core`` (see :data:`APT_PACKAGES`), installed
with ``DEBIAN_FRONTEND=noninteractive`` and the debconf answer
``postfix postfix/main_mailer_type select No configuration``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import Envelope, Session

from tests.server import alive as _alive
from tests.server import free_port, terminate
from tests.server import wait_gone as _wait_gone

APT_PACKAGES = ("postfix", "dovecot-core")
DEBCONF_SELECTIONS = "postfix postfix/main_mailer_type select No configuration"

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
MAIL_OWNER = "postfix"

# maillog_file (and the postlog service) came with Postfix 3.4.
MIN_POSTFIX = (3, 4)

T = TypeVar("T")


# --------------------------------------------------------------------------
# Availability


def missing() -> list[str]:
    """What stops these fixtures from running here (empty: nothing)."""
    problems = [
        f"{path} not found" for path in (POSTFIX, POSTCONF, DOVECOT, DOVEADM) if not _exe(path)
    ]
    if os.geteuid() != 0:
        problems.append("postfix -c DIR start needs root")
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        problems.append(f"no user {MAIL_OWNER!r}")
    if not problems:
        version = postfix_version()
        if version < MIN_POSTFIX:
            problems.append(f"Postfix {version} is older than {MIN_POSTFIX} (no maillog_file)")
    return problems


def postfix_available() -> bool:
    """True when Postfix (>= 3.4) and Dovecot are installed and we are root."""
    return not missing()


def require_postfix() -> None:
    """
    Skip the calling test when Postfix/Dovecot are missing — except in CI
    (``CI`` set), where their absence is a failure: .ci/run installs them.
    """
    import pytest

    problems = missing()
    if not problems:
        return
    why = "; ".join(problems) + " (apt-get install " + " ".join(APT_PACKAGES) + ")"
    if os.environ.get("CI"):
        pytest.fail(f"Postfix/Dovecot end-to-end tests cannot run in CI: {why}", pytrace=False)
    pytest.skip(why)


def postfix_version() -> tuple[int, ...]:
    with tempfile.TemporaryDirectory() as empty:
        out = subprocess.run(
            [POSTCONF, "-c", empty, "-d", "-h", "mail_version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return tuple(int(part) for part in re.findall(r"\d+", out)[:3])


def _exe(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


# --------------------------------------------------------------------------
# Directories and processes


@contextlib.contextmanager
def service_directory(prefix: str = "kumoauth-mta-") -> Iterator[Path]:
    """A fresh directory under /tmp that the ``postfix`` user can search (0711)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unreachable_ancestor(path: Path, user: str = MAIL_OWNER) -> Path | None:
    """The first directory on the way to *path* that *user* cannot search, if any."""
    entry = pwd.getpwnam(user)
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for directory in [*reversed(path.absolute().parents)]:
        st = directory.stat()
        if st.st_uid == entry.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return directory
    return None


def _require_reachable(path: Path, what: str) -> None:
    blocked = unreachable_ancestor(path)
    if blocked is not None:
        raise RuntimeError(
            f"{what} {path}: user {MAIL_OWNER!r} cannot search {blocked}; "
            "use tests.postfix.service_directory() (a 0711 directory under /tmp)"
        )


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll *predicate* until it returns something truthy; return that (or the last falsy)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --------------------------------------------------------------------------
# Dovecot (auth only)


@dataclass
class DovecotAuth:
    """A running ``dovecot -F`` that only authenticates."""

    proc: subprocess.Popen[bytes]
    directory: Path
    config: Path
    socket: Path  # auth-client unix socket for Postfix (smtpd_sasl_path)
    client_socket: Path  # a second auth-client unix socket, for our own clients
    client_port: int  # auth-client over TCP on 127.0.0.1
    logfile: Path
    users: dict[str, str] = field(default_factory=dict)
    master_users: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def client_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.client_port)

    def log(self) -> str:
        parts = [self.logfile, self.directory / "stderr.txt"]
        return "".join(p.read_text(errors="replace") for p in parts if p.exists())

    def stop(self) -> None:
        # The auth process outlives its master while a client (Postfix) is
        # connected to it: stopped by PID too.
        terminate(self.proc, children=True)


def hash_password(password: str, config: Path | None = None) -> str:
    """``{SHA512-CRYPT}$6$...`` from the real ``doveadm pw``."""
    args = [DOVEADM] + (["-c", str(config)] if config else []) + ["pw", "-s", "SHA512-CRYPT"]
    out = subprocess.run(
        [*args, "-p", password], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    if not out.startswith("{SHA512-CRYPT}$6$"):
        raise RuntimeError(f"doveadm pw gave {out!r}")
    return out


def _passwd_file(path: Path, users: Mapping[str, str], config: Path, extra: str = "") -> None:
    lines = []
    for name, password in users.items():
        if not name or any(c in name for c in ":\n\r\t\0"):
            raise ValueError(f"user name not usable in a passwd-file: {name!r}")
        fields = f"::::::{extra}" if extra else ""
        lines.append(f"{name}:{hash_password(password, config)}{fields}\n")
    path.write_text("".join(lines))
    path.chmod(0o600)


def _dovecot_config(
    directory: Path, client_port: int, instance: str, auth_failure_delay: str
) -> str:
    return f"""\
# kumoauth test instance: authentication only.
instance_name = {instance}
base_dir = {directory}/run
state_dir = {directory}/state
log_path = {directory}/dovecot.log
protocols = none
listen = 127.0.0.1
ssl = no
# Postfix already did STARTTLS; it says "secured" itself.
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
auth_failure_delay = {auth_failure_delay}

# Master users first: "PLAIN authzid=alice authcid=kumoauth" logs in as
# alice; result_success = continue looks alice up in the next passdb, so the
# target user must exist.
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u {directory}/master-users
  master = yes
  result_success = continue
}}
# The same account logging in as itself (kumoauth's own bounces, no
# authzid), from kumoauth's address only: docs/relay.md's recipe.
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u {directory}/service-users
}}
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u {directory}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}

service auth {{
  # Reads the passwd-files in this (root's) directory.
  user = root
  unix_listener auth-postfix {{
    mode = 0666
  }}
  unix_listener auth-client {{
    mode = 0666
  }}
  inet_listener auth-client {{
    address = 127.0.0.1
    port = {client_port}
  }}
}}
# No per-IP penalty: every test client is 127.0.0.1.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


@contextlib.contextmanager
def running_dovecot_auth(
    directory: Path,
    users: Mapping[str, str],
    master_users: Mapping[str, str],
    *,
    auth_failure_delay: str = "0",
    timeout: float = 20,
) -> Iterator[DovecotAuth]:
    """
    Dovecot, authentication only, configured in *directory* (created).
    *users* and *master_users* map names to clear-text passwords; the
    passwd-files hold SHA512-CRYPT hashes made by ``doveadm pw``.
    """
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o711)
    (directory / "run").mkdir(exist_ok=True)
    (directory / "state").mkdir(exist_ok=True)
    client_port = free_port()
    config = directory / "dovecot.conf"
    config.write_text(
        _dovecot_config(directory, client_port, f"kumoauth-{client_port}", auth_failure_delay)
    )
    _passwd_file(directory / "users", users, config)
    _passwd_file(directory / "master-users", master_users, config)
    _passwd_file(directory / "service-users", master_users, config, "allow_nets=127.0.0.1/32")
    run = directory / "run"
    for name in ("auth-postfix", "auth-client"):
        if len(str(run / name).encode()) > 100:
            raise RuntimeError(f"{run / name}: too long for a unix socket")
    with open(directory / "stderr.txt", "ab") as stderr:
        proc = subprocess.Popen(
            [DOVECOT, "-c", str(config), "-F"],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
    auth = DovecotAuth(
        proc=proc,
        directory=directory,
        config=config,
        socket=run / "auth-postfix",
        client_socket=run / "auth-client",
        client_port=client_port,
        logfile=directory / "dovecot.log",
        users=dict(users),
        master_users=dict(master_users),
    )
    try:
        _wait_dovecot(auth, timeout)
        yield auth
    finally:
        auth.stop()


def _wait_dovecot(auth: DovecotAuth, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if auth.proc.poll() is not None:
            raise RuntimeError(f"dovecot exited with {auth.proc.returncode}\n{auth.log()}")
        try:
            for path in (auth.socket, auth.client_socket):
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(str(path))
            with socket.create_connection(auth.client_address, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"dovecot auth never listened\n{auth.log()}") from None
            time.sleep(0.05)


def auth_client_handshake(sock: socket.socket, timeout: float = 5) -> list[str]:
    """
    Send the client half of the Dovecot auth-client handshake
    (``VERSION\\t1\\t2``, ``CPID\\t<pid>``) and return the server's lines up
    to and including ``DONE``.
    """
    sock.settimeout(timeout)
    sock.sendall(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
    buf = b""
    while not (buf == b"DONE\n" or buf.endswith(b"\nDONE\n")):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"auth server closed after {buf!r}")
        buf += chunk
    return buf.decode().splitlines()


# --------------------------------------------------------------------------
# Postfix


@dataclass
class Postfix:
    """A Postfix started with ``postfix -c <config_dir> start``."""

    directory: Path
    config_dir: Path
    queue_dir: Path
    port: int
    pid: int
    logfile: Path

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Wait until the mail log matches *pattern* (a regex); return the match."""
        found = wait_for(lambda: re.search(pattern, self.log(), re.MULTILINE), timeout)
        if not found:
            raise AssertionError(f"{pattern!r} not in the Postfix log:\n{_tail(self.logfile)}")
        return found

    def postconf(self, *args: str) -> str:
        return subprocess.run(
            [POSTCONF, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM to the master's PID (what ``postfix stop`` does), then wait."""
        if not _alive(self.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if not _wait_gone(self.pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, 5)


_MASTER_CF = """\
# service    type  private unpriv chroot wakeup maxproc command
{listen}     inet  n       -      n      -      -       smtpd
pickup       unix  n       -      n      60     1       pickup
cleanup      unix  n       -      n      -      0       cleanup
qmgr         unix  n       -      n      300    1       qmgr
tlsmgr       unix  -       -      n      1000?  1       tlsmgr
rewrite      unix  -       -      n      -      -       trivial-rewrite
bounce       unix  -       -      n      -      0       bounce
defer        unix  -       -      n      -      0       bounce
trace        unix  -       -      n      -      0       bounce
verify       unix  -       -      n      -      1       verify
flush        unix  n       -      n      1000?  0       flush
proxymap     unix  -       -      n      -      -       proxymap
proxywrite   unix  -       -      n      -      1       proxymap
smtp         unix  -       -      n      -      -       smtp
relay        unix  -       -      n      -      -       smtp
showq        unix  n       -      n      -      -       showq
error        unix  -       -      n      -      -       error
retry        unix  -       -      n      -      -       error
discard      unix  -       -      n      -      -       discard
anvil        unix  -       -      n      -      1       anvil
scache       unix  -       -      n      -      1       scache
postlog      unix-dgram n  -      n      -      1       postlogd
"""


def _main_cf(
    directory: Path,
    relayhost: tuple[str, int] | None,
    sasl_path: str | None,
    tls: tuple[Path, Path] | None,
    myhostname: str,
    extra: Mapping[str, str],
) -> str:
    settings: dict[str, str] = {
        "compatibility_level": "3.6",
        "queue_directory": f"{directory}/queue",
        "data_directory": f"{directory}/data",
        "mail_owner": MAIL_OWNER,
        "setgid_group": "postdrop",
        "myhostname": myhostname,
        # A null client: nothing is delivered here.
        "mydestination": "",
        "relay_domains": "",
        "local_transport": "error:local delivery is disabled",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.1/32",
        "smtpd_peername_lookup": "no",
        "maillog_file_prefixes": str(directory),
        "maillog_file": f"{directory}/maillog",
        "smtp_tls_security_level": "none",
    }
    if relayhost is None:
        settings["default_transport"] = "discard:no relayhost configured"
    else:
        host, port = relayhost
        settings["relayhost"] = f"[{host}]:{port}"
    if sasl_path is None:
        settings["smtpd_sasl_auth_enable"] = "no"
        settings["smtpd_relay_restrictions"] = "permit_mynetworks, reject_unauth_destination"
    else:
        settings |= {
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": sasl_path,
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_sasl_authenticated_header": "yes",
            # Relay for SASL-authenticated clients only (not for mynetworks).
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
        }
    if tls is None:
        settings["smtpd_tls_security_level"] = "none"
    else:
        cert, key = tls
        settings |= {
            "smtpd_tls_cert_file": str(Path(cert).absolute()),
            "smtpd_tls_key_file": str(Path(key).absolute()),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_auth_only": "yes",
            "smtpd_tls_received_header": "yes",
        }
    settings |= dict(extra)
    return "".join(f"{k} = {v}\n" for k, v in settings.items())


@contextlib.contextmanager
def running_postfix(
    directory: Path,
    *,
    port: int,
    relayhost: tuple[str, int] | None,
    sasl_socket: str | Path | None,
    tls: tuple[Path, Path] | None,
    myhostname: str = "upstream.test",
    extra_main: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> Iterator[Postfix]:
    """
    Postfix from a configuration directory of its own under *directory*
    (created; it and its ancestors must be searchable by ``postfix``: see
    :func:`service_directory`).

    *port*: smtpd on 127.0.0.1:<port>. *relayhost*: where its smtp client
    forwards everything accepted (``None``: discard). *sasl_socket*: a
    Dovecot auth-client socket path (or ``inet:host:port``); ``None`` turns
    SASL off and lets 127.0.0.1 relay unauthenticated. *tls*: (certificate
    chain, key) for STARTTLS (``smtpd_tls_security_level = may`` and
    ``smtpd_tls_auth_only = yes``). *extra_main*: more main.cf settings.
    """
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o711)
    _require_reachable(directory / "data", "data_directory")
    sasl_path: str | None = None
    if sasl_socket is not None:
        sasl_path = str(sasl_socket)
        if not sasl_path.startswith(("inet:", "unix:")):
            _require_reachable(Path(sasl_path), "Dovecot socket")
    config_dir = directory / "conf"
    queue_dir = directory / "queue"
    data_dir = directory / "data"
    for path in (config_dir, queue_dir, data_dir):
        path.mkdir(exist_ok=True)
    # The queue directory belongs to root (post-install creates its
    # subdirectories with the right owners); the data directory to mail_owner.
    queue_dir.chmod(0o755)
    owner = pwd.getpwnam(MAIL_OWNER)
    os.chown(data_dir, owner.pw_uid, 0)
    data_dir.chmod(0o700)
    (config_dir / "main.cf").write_text(
        _main_cf(directory, relayhost, sasl_path, tls, myhostname, extra_main or {})
    )
    (config_dir / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{port}"))
    logfile = directory / "maillog"

    started = subprocess.run(
        [POSTFIX, "-c", str(config_dir), "start"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    pid_file = queue_dir / "pid" / "master.pid"
    pid = 0
    if pid_file.exists():
        with contextlib.suppress(ValueError):
            pid = int(pid_file.read_text().split()[0])
    postfix = Postfix(directory, config_dir, queue_dir, port, pid, logfile)
    try:
        if started.returncode != 0 or not pid:
            raise RuntimeError(
                f"postfix start failed ({started.returncode}): "
                f"{started.stdout}{started.stderr}\n{_tail(logfile)}"
            )
        _wait_smtp(postfix, timeout)
        yield postfix
    finally:
        if postfix.pid:
            postfix.stop()


def _wait_smtp(postfix: Postfix, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not _alive(postfix.pid):
            raise RuntimeError(f"postfix master {postfix.pid} exited\n{_tail(postfix.logfile)}")
        try:
            with socket.create_connection(("127.0.0.1", postfix.port), timeout=5) as s:
                s.settimeout(5)
                banner = s.recv(512)
                s.sendall(b"QUIT\r\n")
            if banner.startswith(b"220"):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"postfix smtpd never greeted\n{_tail(postfix.logfile)}")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# A recording sink: what the upstream relays lands here


class _Recorder:
    def __init__(self, sink: RecordingSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: AiosmtpdSMTP, session: Session, envelope: Envelope) -> str:
        with self.sink.lock:
            self.sink.messages.append(envelope)
            self.sink.lock.notify_all()
        return "250 2.0.0 Recorded"


class RecordingSink:
    """An aiosmtpd server on 127.0.0.1 that records every envelope it accepts."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.messages: list[Envelope] = []
        self.lock = threading.Condition()
        self.controller = Controller(
            _Recorder(self), hostname="127.0.0.1", port=self.port, ready_timeout=10
        )

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, asyncio.CancelledError):
            self.controller.stop()

    def wait_for(self, predicate: Callable[[Envelope], bool], timeout: float = 10) -> Envelope:
        """The first recorded envelope for which ``predicate(envelope)`` is true."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for envelope in self.messages:
                    if predicate(envelope):
                        return envelope
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching message in {len(self.messages)} received")
                self.lock.wait(remaining)

    def __enter__(self) -> RecordingSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
