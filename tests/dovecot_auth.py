"""
A real Dovecot (authentication only) for the Dovecot credential store's
tests, one that can be stopped and started again on the same sockets.

tests/postfix.py's :func:`~tests.postfix.running_dovecot_auth` is shaped for
Postfix; this instance adds what the store's tests must observe:

* a user limited to one network (``allow_nets`` in the passwd-file's
  extra fields): Dovecot accepts her only if kumoauth sent the client's
  address as ``rip``;
* a user who exists only when the request says ``secured``: his passdb's
  file name ends in ``%{secured}``, which Dovecot expands to ``secured``
  for a request that came with the ``secured`` parameter and to nothing
  otherwise;
* a user whose passdb entry says ``nologin``;
* master users (``master = yes``, ``result_success = continue``), as in
  tests/postfix.py, so PLAIN with an authzid logs in as that user;
* ``auth_username_format = %Lu``: Dovecot lower-cases user names, so its
  ``user=`` can differ from what the client typed.

Dovecot runs from a configuration file in its own directory, is stopped
by its PID (SIGTERM) and never touches the system's instance.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests import postfix as pf
from tests.server import children_of, terminate

#: the network the ``allow_nets`` user may come from
ALLOWED_NET = "192.0.2.0/24"


def missing() -> list[str]:
    """What stops a Dovecot from running here (empty: nothing)."""
    problems = [
        f"{path} not found"
        for path in (pf.DOVECOT, pf.DOVEADM)
        if not (os.path.isfile(path) and os.access(path, os.X_OK))
    ]
    if os.geteuid() != 0:
        problems.append("dovecot -F with service auth as root needs root")
    return problems


def require_dovecot() -> None:
    """
    Skip the calling test when Dovecot is missing — except in CI (``CI``
    set), where its absence is a failure: .ci/run installs dovecot-core.
    """
    import pytest

    problems = missing()
    if not problems:
        return
    why = "; ".join(problems) + " (apt-get install dovecot-core)"
    if os.environ.get("CI"):
        pytest.fail(f"Dovecot tests cannot run in CI: {why}", pytrace=False)
    pytest.skip(why)


@dataclass
class Users:
    """Clear-text passwords by user name, in each passwd-file."""

    plain: dict[str, str] = field(default_factory=dict)
    masters: dict[str, str] = field(default_factory=dict)
    #: may log in only from :data:`ALLOWED_NET`
    net_limited: dict[str, str] = field(default_factory=dict)
    #: exist only for requests marked ``secured``
    secured_only: dict[str, str] = field(default_factory=dict)
    #: the password matches, but the entry says ``nologin``
    nologin: dict[str, str] = field(default_factory=dict)


def _config(directory: Path, port: int, auth_failure_delay: str) -> str:
    return f"""\
# kumoauth's Dovecot store tests: authentication only.
instance_name = kumoauth-store-{port}
base_dir = {directory}/run
state_dir = {directory}/state
log_path = {directory}/dovecot.log
protocols = none
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
auth_failure_delay = {auth_failure_delay}
auth_username_format = %Lu
# "alice*kumoauth": the master user kumoauth logging in as alice
auth_master_user_separator = *

passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u {directory}/master-users
  master = yes
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u {directory}/users
}}
# "tls-users" for a request without "secured", "tls-userssecured" with it.
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u {directory}/tls-users%{{secured}}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}

service auth {{
  user = root
  unix_listener auth-client {{
    mode = 0666
  }}
  inet_listener auth-client {{
    address = 127.0.0.1
    port = {port}
  }}
}}
# No per-IP penalty: every test client is 127.0.0.1 or a made-up rip.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


def _passwd_file(path: Path, entries: Mapping[str, tuple[str, str]], config: Path) -> None:
    """*entries*: name -> (password, extra fields)."""
    lines = []
    for name, (password, extra) in entries.items():
        lines.append(f"{name}:{pf.hash_password(password, config)}::::::{extra}\n")
    path.write_text("".join(lines))
    path.chmod(0o600)


class Dovecot:
    """
    ``dovecot -c <directory>/dovecot.conf -F``; :meth:`start` and
    :meth:`stop` may be called again (same sockets, same port).
    """

    def __init__(self, directory: Path, users: Users, auth_failure_delay: str = "0") -> None:
        self.directory = Path(directory).absolute()
        self.users = users
        self.port = pf.free_port()
        self.config = self.directory / "dovecot.conf"
        self.client_socket = self.directory / "run" / "auth-client"
        self.logfile = self.directory / "dovecot.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o711)
        for sub in ("run", "state"):
            (self.directory / sub).mkdir(exist_ok=True)
        self.config.write_text(_config(self.directory, self.port, auth_failure_delay))
        d = self.directory
        _passwd_file(
            d / "users",
            {u: (p, "") for u, p in users.plain.items()}
            | {u: (p, f"allow_nets={ALLOWED_NET}") for u, p in users.net_limited.items()}
            | {u: (p, "nologin reason=go-away") for u, p in users.nologin.items()},
            self.config,
        )
        _passwd_file(
            d / "master-users", {u: (p, "") for u, p in users.masters.items()}, self.config
        )
        _passwd_file(d / "tls-users", {}, self.config)
        _passwd_file(
            d / "tls-userssecured",
            {u: (p, "") for u, p in users.secured_only.items()},
            self.config,
        )

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def log(self) -> str:
        parts = [self.logfile, self.directory / "stderr.txt"]
        return "".join(p.read_text(errors="replace") for p in parts if p.exists())

    def start(self, timeout: float = 20) -> None:
        with open(self.directory / "stderr.txt", "ab") as stderr:
            self.proc = subprocess.Popen(
                [pf.DOVECOT, "-c", str(self.config), "-F"],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        import socket

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(str(self.client_socket))
                    pf.auth_client_handshake(s, timeout=2)
                with socket.create_connection(self.address, timeout=1) as s:
                    pf.auth_client_handshake(s, timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dovecot auth never answered\n{self.log()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """
        SIGTERM to the master's PID, then to the children it leaves: an auth
        process outlives its master while clients are connected to it (under
        systemd, stopping the unit kills the whole control group; here we do).
        """
        proc, self.proc = self.proc, None
        terminate(proc, children=True)

    def auth_pid(self) -> int:
        """The PID of the ``auth`` process (a child of the master)."""
        assert self.proc is not None
        for _ in range(100):
            for child in children_of(self.proc.pid):
                comm = Path(f"/proc/{child}/comm").read_text().strip()
                if comm == "auth":
                    return child
            time.sleep(0.05)
        raise RuntimeError(f"no auth process under dovecot {self.proc.pid}")

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The auth process stopped (SIGSTOP): connections open, nothing answered."""
        pid = self.auth_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def established(self) -> int:
        """Established TCP connections to the auth-client port (server side)."""
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(table).read_text().splitlines()[1:]:
                    parts = line.split()
                    local, state = parts[1], parts[3]
                    if int(local.rsplit(":", 1)[1], 16) == self.port and state == "01":
                        count += 1
        return count


@contextlib.contextmanager
def running(directory: Path, users: Users, auth_failure_delay: str = "0") -> Iterator[Dovecot]:
    """A started :class:`Dovecot`, stopped on exit."""
    dovecot = Dovecot(directory, users, auth_failure_delay)
    dovecot.start()
    try:
        yield dovecot
    finally:
        dovecot.stop()
