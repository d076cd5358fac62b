"""
Helpers for end-to-end tests: a real ``twistd kumoauth`` process on
127.0.0.1, with trustme certificates, talked to by real clients.
"""

from __future__ import annotations

import contextlib
import os
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

import trustme

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Certs:
    ca: trustme.CA
    chain: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
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
    """A running twistd kumoauth."""

    proc: subprocess.Popen[bytes]
    directory: Path
    starttls_port: int
    implicit_port: int
    plain_port: int
    spool: Path
    logfile: Path
    certs: Certs
    extra: dict[str, int] = field(default_factory=dict)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_config(
    directory: Path,
    certs: Certs,
    ports: tuple[int, int, int],
    policy: str | None,
    auth: str = "",
    extra_listeners: str = "",
    server: str = "",
) -> Path:
    starttls, implicit, plain = ports
    defaults = {"failure_delay": "0.2", "timeout": "1.0"}
    given = [line for line in auth.splitlines() if line.strip()]
    for line in given:
        defaults.pop(line.split("=")[0].strip(), None)
    auth_lines = "\n".join([f"{k} = {v}" for k, v in defaults.items()] + given)
    policy_line = ""
    if policy is not None:
        (directory / "policy.py").write_text(textwrap.dedent(policy))
        policy_line = '[policy]\npath = "policy.py"\n'
    config = f"""
[server]
hostname = "localhost"
idle_timeout = 30
{server}

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
{extra_listeners}

[auth]
{auth_lines}

{policy_line}

[spool]
path = "spool"
"""
    path = directory / "kumoauth.toml"
    path.write_text(config)
    return path


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], logfile: Path, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = logfile.read_text(errors="replace") if logfile.exists() else ""
            raise RuntimeError(f"twistd exited with {proc.returncode}:\n{log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


@contextlib.contextmanager
def running_server(
    directory: Path,
    certs: Certs,
    policy: str | None,
    auth: str = "",
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    server: str = "",
) -> Iterator[Server]:
    directory.mkdir(parents=True, exist_ok=True)
    ports = (free_port(), free_port(), free_port())
    config = write_config(directory, certs, ports, policy, auth, server=server)
    logfile = directory / "twistd.log"
    proc = subprocess.Popen(
        [
            *TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={logfile}",
            "kumoauth",
            "--config",
            str(config),
            *(args or []),
        ],
        cwd=directory,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "stderr.txt", "wb"),  # noqa: SIM115
    )
    srv = Server(proc, directory, *ports, spool=directory / "spool", logfile=logfile, certs=certs)
    try:
        for port in ports:
            wait_for_port(port, proc, logfile)
        yield srv
    finally:
        srv.stop()
