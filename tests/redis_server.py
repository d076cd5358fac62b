"""
A real ``redis-server`` of the tests' own for the shared store
(kumoauth.stores.redis).

:func:`running_redis` starts ``/usr/bin/redis-server`` in the foreground
(``daemonize no``) in a temporary directory, on a free loopback port and a
UNIX socket there, with nothing saved (``--save '' --appendonly no``) and,
if asked, a password (``--requirepass``) and a TLS port (trustme
certificate for ``localhost`` and ``127.0.0.1``).  It is stopped by its
PID; a :class:`RedisServer` can be killed (SIGKILL, as a crash) and started
again on the same ports (the outage tests do that).  The system's Redis
(6379) is never touched.

:class:`RawClient` is a tiny blocking RESP client the tests use to look at
the keys themselves (PTTL, SCAN ...), independent of the code under test.
Debian package: ``redis-server`` (:data:`APT_PACKAGES`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from tests.server import free_port, terminate

APT_PACKAGES = ("redis-server",)
REDIS_SERVER = "/usr/bin/redis-server"


def missing() -> list[str]:
    """What stops these fixtures from running here (empty: nothing)."""
    if os.path.isfile(REDIS_SERVER) and os.access(REDIS_SERVER, os.X_OK):
        return []
    return [f"{REDIS_SERVER} not found"]


def require_redis() -> None:
    """
    Skip the calling test when redis-server is missing, except in CI
    (``CI`` set), where its absence is a failure: .ci/run installs it.
    """
    import pytest

    problems = missing()
    if not problems:
        return
    why = "; ".join(problems) + " (apt-get install " + " ".join(APT_PACKAGES) + ")"
    if os.environ.get("CI"):
        pytest.fail(f"Redis tests cannot run in CI: {why}", pytrace=False)
    pytest.skip(why)


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``)."""


class RawClient:
    """A blocking RESP2 client on one connection (tests only)."""

    def __init__(
        self, port: int | None = None, *, path: Path | None = None, password: str | None = None
    ) -> None:
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(str(path))
        else:
            assert port is not None
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        if password is not None:
            self("AUTH", password)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, *args: Any) -> Any:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            raw = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
        self.sock.sendall(b"".join(out))
        reply = self._reply()
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisReplyError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exactly(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ValueError(f"bad RESP line {line!r}")

    def scan(self, pattern: bytes | str) -> list[bytes]:
        """Every key matching *pattern* (SCAN, as the store does)."""
        keys: list[bytes] = []
        cursor: bytes = b"0"
        while True:
            cursor, batch = self("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            keys.extend(batch)
            if cursor == b"0":
                return keys


@dataclass
class RedisServer:
    """A redis-server started by :func:`running_redis` (restartable)."""

    directory: Path
    port: int
    password: str | None = None
    tls_port: int | None = None
    ca: trustme.CA | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def logfile(self) -> Path:
        return self.directory / "redis.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def url(self, *, db: int | None = None, password: bool = True, **query: Any) -> str:
        auth = f":{self.password}@" if self.password and password else ""
        path = f"/{db}" if db is not None else ""
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return f"redis://{auth}127.0.0.1:{self.port}{path}" + (f"?{qs}" if qs else "")

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def client(self) -> RawClient:
        return RawClient(self.port, password=self.password)

    def start(self, timeout: float = 20) -> None:
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--logfile",
            str(self.logfile),
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.tls_port is not None:
            args += [
                "--tls-port",
                str(self.tls_port),
                "--tls-cert-file",
                str(self.directory / "cert.pem"),
                "--tls-key-file",
                str(self.directory / "key.pem"),
                "--tls-ca-cert-file",
                str(self.ca_file),
                "--tls-auth-clients",
                "no",
            ]
        self.proc = subprocess.Popen(
            args,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}\n{self.log()}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server never answered\n{self.log()}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with RawClient(self.port) as c:
                return c("PING") == "PONG"
        except RedisReplyError:
            return True  # NOAUTH: up, with a password
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to our redis-server's PID, then wait (SIGKILL after 10 s)."""
        proc, self.proc = self.proc, None
        terminate(proc)

    def kill(self) -> None:
        """SIGKILL (a crash): connections are reset, nothing is saved."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, never answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def running_redis(
    *,
    password: str | None = None,
    tls: bool = False,
    cert_names: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> Iterator[RedisServer]:
    """
    A redis-server of our own on a free 127.0.0.1 port and a UNIX socket,
    with *password* (``requirepass``) and, if *tls*, a TLS port whose
    certificate (a trustme CA's, ``server.ca_file``) names *cert_names*.
    """
    with tempfile.TemporaryDirectory(prefix="redis-") as tmp:
        directory = Path(tmp).absolute()
        server = RedisServer(directory=directory, port=free_port(), password=password)
        if tls:
            server.ca = trustme.CA()
            cert = server.ca.issue_cert(*cert_names)
            server.ca.cert_pem.write_to_path(str(server.ca_file))
            cert.private_key_pem.write_to_path(str(directory / "key.pem"))
            with open(directory / "cert.pem", "wb") as f:
                for blob in cert.cert_chain_pems:
                    f.write(blob.bytes())
            server.tls_port = free_port()
        try:
            server.start()
            yield server
        finally:
            if server.proc is not None and server.proc.poll() is None:
                server.resume()
            server.stop()
