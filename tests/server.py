"""
Helpers for end-to-end tests: a real ``twistd kumoauth`` process on
127.0.0.1, with trustme certificates, talked to by real clients.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from bench.__main__ import wait_port

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def children_of(pid: int) -> list[int]:
    """The PIDs of *pid*'s children (all its threads'), from /proc."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def terminate(proc: subprocess.Popen[Any] | None, children: bool = False) -> None:
    """
    Stop a server a test started, by its PID: SIGTERM, then SIGKILL after
    10 s.  With *children*, its child processes too, by their PIDs (a
    Dovecot auth process outlives its master while a client is connected;
    under systemd the unit's control group would go, here we do it).
    """
    if proc is None or proc.poll() is not None:
        return
    kids = children_of(proc.pid) if children else []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in kids:
        if not wait_gone(pid, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """True while *pid* runs (a zombie waiting for its reaper counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


#: Ports :func:`free_port` hands out lie below the kernel's ephemeral range
#: (32768 and up), so no socket bound to port 0 and no outgoing connection
#: takes one between the check and the server's bind; each pytest-xdist
#: worker has a block of its own, so two never hand out the same port.
PORT_BASE, PORT_BLOCK, PORT_BLOCKS = 20000, 2000, 6
_handed_out = random.randrange(PORT_BLOCK)  # two test runs at once rarely meet


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()


def _bindable(host: str, family: socket.AddressFamily, port: int) -> bool:
    try:
        with socket.socket(family) as s:
            s.bind((host, port))
    except OSError as e:
        # No IPv6 on this machine: only 127.0.0.1 counts.
        return family == socket.AF_INET6 and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
    return True


def free_port() -> int:
    """
    A TCP port nothing listens on (127.0.0.1 and ::1), for a server to bind
    next: not one this process handed out recently, nor one of another
    xdist worker's.
    """
    global _handed_out
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index = int(worker) if worker.isdigit() else 0
    if index >= PORT_BLOCKS:
        raise RuntimeError(f"free_port() has {PORT_BLOCKS} blocks of ports: run at most -n 6")
    low = PORT_BASE + index * PORT_BLOCK
    if low + PORT_BLOCK > _EPHEMERAL_LOW:
        raise RuntimeError(
            f"ports {low}-{low + PORT_BLOCK - 1} overlap the ephemeral range "
            f"(/proc/sys/net/ipv4/ip_local_port_range starts at {_EPHEMERAL_LOW})"
        )
    for _ in range(PORT_BLOCK):
        port = low + _handed_out % PORT_BLOCK
        _handed_out += 1
        if _bindable("127.0.0.1", socket.AF_INET, port) and _bindable("::1", socket.AF_INET6, port):
            return port
    raise RuntimeError(f"no free port in {low}-{low + PORT_BLOCK - 1}")


@dataclass
class Certs:
    ca: trustme.CA
    chain: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def make_certs(directory: Path, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> Certs:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=key_type)
    directory.mkdir(parents=True, exist_ok=True)
    chain = directory / "fullchain.pem"
    key = directory / "privkey.pem"
    cert.private_key_pem.write_to_path(str(key))
    with open(chain, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return Certs(ca=ca, chain=chain, key=key)


def run_twistd(args: list[str], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile=", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Server:
    """A running twistd kumoauth (restartable on the same configuration)."""

    proc: subprocess.Popen[bytes]
    directory: Path
    config: Path
    starttls_port: int
    implicit_port: int
    plain_port: int
    certs: Certs
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    #: (soft, hard) RLIMIT_NOFILE the server starts with; None: the tests'
    nofile: tuple[int, int] | None = None

    @property
    def spool(self) -> Path:
        return self.directory / "spool"

    @property
    def logfile(self) -> Path:
        return self.directory / "twistd.log"

    @property
    def ports(self) -> tuple[int, int, int]:
        return (self.starttls_port, self.implicit_port, self.plain_port)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self) -> None:
        terminate(self.proc)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        self.proc.kill()
        self.proc.wait()

    def start(self) -> None:
        self.proc = spawn(self.directory, self.config, self.args, self.env, self.nofile)
        for port in self.ports:
            wait_for_port(port, self.proc, self.logfile)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def write_config(
    directory: Path,
    certs: Certs,
    ports: tuple[int, int, int],
    policy: str | None,
    auth: str = "",
    server: str = "",
    throttle: str = "",
    extra: str = "",
) -> Path:
    starttls, implicit, plain = ports
    auth_lines = _merge({"failure_delay": "0.2", "timeout": "1.0"}, auth)
    # Tests share 127.0.0.1: throttles high unless a test sets them.
    throttle_lines = _merge(
        {"max_failures_per_ip": "100000", "max_failures_per_authc": "100000"}, throttle
    )
    server_lines = _merge({"hostname": '"localhost"', "idle_timeout": "30"}, server)
    policy_line = ""
    if policy is not None:
        (directory / "policy.py").write_text(textwrap.dedent(policy))
        policy_line = '[policy]\npath = "policy.py"\n'
    config = f"""
[server]
{server_lines}

[tls]
certificate = "{certs.chain}"
private_key = "{certs.key}"

[[listener]]
endpoint = "tcp:{starttls}:interface=127.0.0.1"
tls = "starttls"
meta = {{ listener_name = "submission" }}

[[listener]]
endpoint = "tcp:{implicit}:interface=127.0.0.1"
tls = "implicit"

[[listener]]
endpoint = "tcp:{plain}:interface=127.0.0.1"
tls = "none"
auth_required = false

[auth]
{auth_lines}

[auth.throttle]
{throttle_lines}

{policy_line}

[spool]
path = "spool"

{extra}
"""
    path = directory / "kumoauth.toml"
    path.write_text(config)
    return path


def _merge(defaults: dict[str, str], given: str) -> str:
    lines = [line for line in given.splitlines() if line.strip()]
    for line in lines:
        defaults.pop(line.split("=")[0].strip(), None)
    return "\n".join([f"{k} = {v}" for k, v in defaults.items()] + lines)


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], logfile: Path, timeout: float = 20
) -> None:
    def log() -> str:
        return logfile.read_text(errors="replace") if logfile.exists() else ""

    wait_port(port, proc, timeout, describe=log)


def spawn(
    directory: Path,
    config: Path,
    args: list[str],
    env: dict[str, str],
    nofile: tuple[int, int] | None = None,
) -> subprocess.Popen[bytes]:
    logfile = directory / "twistd.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    with open(directory / "stderr.txt", "ab") as stderr:
        return subprocess.Popen(
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                f"--logfile={logfile}",
                "kumoauth",
                "--config",
                str(config),
                *args,
            ],
            cwd=directory,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=limit if nofile is not None else None,
        )


@contextlib.contextmanager
def running_server(
    directory: Path,
    certs: Certs,
    policy: str | None,
    auth: str = "",
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    server: str = "",
    throttle: str = "",
    extra: str = "",
    nofile: tuple[int, int] | None = None,
) -> Iterator[Server]:
    directory.mkdir(parents=True, exist_ok=True)
    ports = (free_port(), free_port(), free_port())
    config = write_config(
        directory, certs, ports, policy, auth, server=server, throttle=throttle, extra=extra
    )
    srv = Server(
        None, directory, config, *ports, certs=certs, args=args or [], env=env or {}, nofile=nofile
    )  # type: ignore[arg-type]
    try:
        srv.start()
        yield srv
    finally:
        if srv.proc is not None:
            srv.stop()


@contextlib.contextmanager
def passwd_file_server(
    tmp_path: Path, users: str, check_interval: float, extra: str = ""
) -> Iterator[Server]:
    """
    ``twistd kumoauth`` with ``checker = "passwd-file"`` over a file
    holding *users* (``srv.directory / "users"``), then *extra* tables.
    """
    directory = tmp_path / "server"
    directory.mkdir()
    (directory / "users").write_text(users)
    table = f'[auth.passwd-file]\npath = "users"\ncheck_interval = {check_interval}\n'
    with running_server(
        directory,
        make_certs(tmp_path / "certs"),
        None,
        auth='checker = "passwd-file"',
        extra=table + extra,
    ) as srv:
        yield srv
