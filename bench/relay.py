"""
Workload (i), accept and relay: the pieces that are not kumoauth.

- :class:`Sink`: ``python -m bench.sink`` in its own process, the one
  upstream both servers relay to; :meth:`Sink.count` asks it how many
  messages it has accepted.
- :class:`PostfixNullClient`: a real Postfix null client (smtpd with
  STARTTLS and Dovecot SASL, cleanup, its queue, qmgr, its smtp client,
  ``relayhost = [127.0.0.1]:<sink>``) and the Dovecot auth server behind
  it, from ``tests/postfix.py``, in a 0711 directory under /tmp.
- :func:`tree_cpu`: CPU seconds of a process tree, including what its
  exited children used (Postfix's smtpd and smtp processes come and go;
  the master reaps them, so their time lands in its ``cutime``/``cstime``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def tree(pid: int) -> list[int]:
    """*pid* and all its descendants (those alive now)."""
    found = [pid]
    i = 0
    while i < len(found):
        p = found[i]
        i += 1
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                children = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except OSError:
                continue
            found.extend(int(c) for c in children)
    return found


def tree_cpu(pid: int) -> float:
    """
    utime + stime of *pid* and every live descendant, plus cutime + cstime
    of each (the children they have already reaped), in seconds.
    """
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / CLK_TCK


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


class Sink:
    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from tests.postfix import wait_for

        log = open(self.workdir / "sink.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sink", str(self.port)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if not wait_for(self._up, 15):
            raise RuntimeError(f"sink on {self.port} never answered")

    def _up(self) -> bool:
        try:
            self.count()
            return True
        except OSError:
            return False

    def count(self) -> int:
        from bench.sink import count

        return count(self.port)

    def wait(self, target: int, timeout: float) -> int:
        """Poll until the sink has *target* messages (or *timeout*); the count."""
        deadline = time.monotonic() + timeout
        n = self.count()
        while n < target and time.monotonic() < deadline:
            time.sleep(0.01)
            n = self.count()
        return n

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def postfix_missing() -> list[str]:
    from tests.postfix import missing

    return missing()


class PostfixNullClient:
    """
    Postfix as a null client relaying to the sink, Dovecot for its SASL.

    Fairness settings (said in BENCHMARKS.md): Dovecot's passwd-file holds
    ``{PLAIN}`` passwords (kumoauth's bench checker compares plain text; a
    SHA512-CRYPT hash would cost Dovecot 5,000 SHA-512 rounds per login);
    ``smtpd_tls_session_cache_timeout = 0``, so no TLS session tickets
    (kumoauth's default, and the client never resumes); no SASL and no TLS
    towards the sink (kumoauth's ``identity = "none"``, ``tls = "none"``).
    Everything else is Postfix's default.
    """

    name = "postfix"

    def __init__(self, cert: Path, key: Path, sink_port: int) -> None:
        self.cert, self.key, self.sink_port = cert, key, sink_port
        self.stack = contextlib.ExitStack()
        self.starttls_port = 0
        self.postfix_pid = 0
        self.dovecot_pid = 0

    def start(self) -> None:
        from tests.postfix import (
            free_port,
            running_dovecot_auth,
            running_postfix,
            service_directory,
        )

        try:
            base = self.stack.enter_context(service_directory("kumoauth-bench-postfix-"))
            cert, key = base / "cert.pem", base / "key.pem"
            shutil.copy(self.cert, cert)
            shutil.copy(self.key, key)
            cert.chmod(0o644)
            key.chmod(0o600)
            dovecot = self.stack.enter_context(
                running_dovecot_auth(base / "dovecot", {"scott": "tiger"}, {})
            )
            # Plain-text passwords, like kumoauth's bench checker (read again
            # on change: Dovecot checks the passwd-file's mtime per lookup).
            users = base / "dovecot" / "users"
            users.write_text("scott:{PLAIN}tiger\n")
            users.chmod(0o600)
            self.starttls_port = free_port()
            postfix = self.stack.enter_context(
                running_postfix(
                    base / "postfix",
                    port=self.starttls_port,
                    relayhost=("127.0.0.1", self.sink_port),
                    sasl_socket=dovecot.socket,
                    tls=(cert, key),
                    myhostname="localhost",
                    extra_main={"smtpd_tls_session_cache_timeout": "0"},
                )
            )
        except BaseException:
            self.stack.close()
            raise
        self.postfix_pid, self.dovecot_pid = postfix.pid, dovecot.pid
        self.postfix = postfix

    def cpu_parts(self) -> dict[str, float]:
        return {"postfix": tree_cpu(self.postfix_pid), "dovecot": tree_cpu(self.dovecot_pid)}

    def rss_total_kib(self) -> int:
        return tree_rss_kib(self.postfix_pid) + tree_rss_kib(self.dovecot_pid)

    def stop(self) -> None:
        self.stack.close()
