"""
A real OpenLDAP ``slapd`` for the LDAP backend's tests.

:func:`running_slapd` writes a ``slapd.conf`` of its own into a temporary
directory (an ``mdb`` database there, the stock schemas read from
``/etc/ldap/schema``, a trustme certificate for ``localhost`` and
``127.0.0.1``), loads the entries offline with ``slapadd`` and starts
``slapd -d stats`` in the foreground on two loopback ports: ``ldap://``
(StartTLS offered) and ``ldaps://``.  It is stopped by its PID; a
:class:`Slapd` can be stopped and started again on the same ports and data
(the outage tests do that).  The system's slapd and ``/etc/ldap/slapd.d``
are never used.

``-d stats`` makes slapd log every connection and operation (``conn=1000
op=0 BIND dn="..." method=128``) to its standard error, kept in
``slapd.log``: tests read it to see what the server was asked.

Users' ``userPassword`` values are ``{SSHA}`` hashes made by the real
``slappasswd``.  Debian packages: ``slapd ldap-utils`` (:data:`APT_PACKAGES`).
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from tests.server import free_port, terminate

APT_PACKAGES = ("slapd", "ldap-utils")

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SLAPPASSWD = "/usr/sbin/slappasswd"
LDAPSEARCH = "/usr/bin/ldapsearch"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")

SUFFIX = "dc=example,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
SERVICE_DN = f"cn=kumoauth,ou=services,{SUFFIX}"
ROOT_DN = f"cn=admin,{SUFFIX}"
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")


def missing() -> list[str]:
    """What stops these fixtures from running here (empty: nothing)."""
    problems = [f"{path} not found" for path in (SLAPD, SLAPADD, SLAPPASSWD) if not _exe(path)]
    problems += [
        f"{SCHEMA_DIR / name}.schema not found"
        for name in SCHEMAS
        if not (SCHEMA_DIR / f"{name}.schema").is_file()
    ]
    if not (MODULE_DIR / "back_mdb.la").exists() and not (MODULE_DIR / "back_mdb.so").exists():
        problems.append(f"{MODULE_DIR}/back_mdb not found")
    return problems


def require_slapd() -> None:
    """
    Skip the calling test when slapd is missing — except in CI (``CI``
    set), where its absence is a failure: .ci/run installs it.
    """
    import pytest

    problems = missing()
    if not problems:
        return
    why = "; ".join(problems) + " (apt-get install " + " ".join(APT_PACKAGES) + ")"
    if os.environ.get("CI"):
        pytest.fail(f"slapd tests cannot run in CI: {why}", pytrace=False)
    pytest.skip(why)


def _exe(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def ssha(password: str) -> str:
    """``{SSHA}...`` from the real ``slappasswd``."""
    out = subprocess.run(
        [SLAPPASSWD, "-h", "{SSHA}", "-T", "/dev/stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    if not out.startswith("{SSHA}"):
        raise RuntimeError("slappasswd gave no {SSHA} value")
    return out


@dataclass
class User:
    """
    An entry under ou=people: ``uid``, ``mail`` and a password; *extra*
    attributes (name -> values, several values for one name allowed, e.g.
    ``{"mail": [...]}``) are added as they are (base64 in the LDIF when a
    value is not a plain ASCII string).
    """

    uid: str
    password: str
    mail: str | None = None
    ou: str = "people"
    extra: dict[str, list[str]] = field(default_factory=dict)

    @property
    def dn(self) -> str:
        return f"uid={self.uid},ou={self.ou},{SUFFIX}"


def _ldif(users: list[User], service_password: str) -> str:
    blocks = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
        "o: Example\ndc: example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=staff,{SUFFIX}\nobjectClass: organizationalUnit\nou: staff\n",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: kumoauth\nuserPassword: {ssha(service_password)}\n",
    ]
    for u in users:
        lines = [
            f"dn: {u.dn}",
            "objectClass: inetOrgPerson",
            f"uid: {u.uid}",
            f"cn: {u.uid}",
            f"sn: {u.uid}",
            f"userPassword: {ssha(u.password)}",
        ]
        if u.mail:
            lines.append(f"mail: {u.mail}")
        for name, values in u.extra.items():
            lines.extend(_ldif_line(name, value) for value in values)
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _ldif_line(name: str, value: str) -> str:
    """``name: value``, or ``name:: base64`` for what RFC 2849 SAFE-STRING is not."""
    safe = (
        value.isascii()
        and not any(ch in value for ch in "\0\r\n")
        and not value.startswith((" ", ":", "<"))
        and not value.endswith(" ")
    )
    if safe:
        return f"{name}: {value}"
    return f"{name}:: {base64.b64encode(value.encode()).decode()}"


def _slapd_conf(directory: Path, anonymous_search: bool) -> str:
    includes = "".join(f"include {SCHEMA_DIR / name}.schema\n" for name in SCHEMAS)
    # The service account (and, if allowed, anonymous) may search the
    # people; nobody may read userPassword, anyone may bind with it.
    anonymous = "by anonymous read" if anonymous_search else "by anonymous auth"
    return f"""\
# kumoauth test instance; nothing here comes from /etc/ldap/slapd.d.
{includes}
pidfile {directory}/slapd.pid
argsfile {directory}/slapd.args
modulepath {MODULE_DIR}
moduleload back_mdb
TLSCACertificateFile {directory}/ca.pem
TLSCertificateFile {directory}/cert.pem
TLSCertificateKeyFile {directory}/key.pem

database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
directory {directory}/data
access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by dn.exact="{SERVICE_DN}" read
    {anonymous}
    by * none
"""


@dataclass
class Slapd:
    """A slapd started by :func:`running_slapd` (restartable)."""

    directory: Path
    config: Path
    port: int  # ldap:// (StartTLS offered)
    tls_port: int  # ldaps://
    ca: trustme.CA
    ca_file: Path
    service_password: str
    users: dict[str, User] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def logfile(self) -> Path:
        return self.directory / "slapd.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def url(self, tls: bool = False, host: str = "127.0.0.1") -> str:
        return f"ldaps://{host}:{self.tls_port}" if tls else f"ldap://{host}:{self.port}"

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def start(self, timeout: float = 20) -> None:
        urls = f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/"
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [SLAPD, "-f", str(self.config), "-h", urls, "-d", "stats"],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited with {self.proc.returncode}\n{self.log()}")
            if all(_listening(p) for p in (self.port, self.tls_port)):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"slapd never listened\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to our slapd's PID, then wait (SIGKILL after 10 s)."""
        proc, self.proc = self.proc, None
        terminate(proc)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, never answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def running_slapd(
    users: Mapping[str, str] | list[User],
    *,
    service_password: str = "service-secret",  # noqa: S107 - a test directory's account
    anonymous_search: bool = True,
    cert_names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    directory: Path | None = None,
) -> Iterator[Slapd]:
    """
    slapd with *users* (uid -> password, or :class:`User` entries) under
    ``ou=people``, the service account :data:`SERVICE_DN` and, if
    *anonymous_search*, searches allowed without a bind.  Its certificate
    names *cert_names*.
    """
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slapd-")))
        directory = Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
        entries = (
            list(users)
            if isinstance(users, list)
            else [User(uid, pw, mail=f"{uid}@example.test") for uid, pw in users.items()]
        )
        ca = trustme.CA()
        cert = ca.issue_cert(*cert_names)
        ca.cert_pem.write_to_path(str(directory / "ca.pem"))
        cert.private_key_pem.write_to_path(str(directory / "key.pem"))
        with open(directory / "cert.pem", "wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        config = directory / "slapd.conf"
        config.write_text(_slapd_conf(directory, anonymous_search))
        ldif = directory / "data.ldif"
        ldif.write_text(_ldif(entries, service_password))
        loaded = subprocess.run(
            [SLAPADD, "-f", str(config), "-l", str(ldif)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if loaded.returncode != 0:
            raise RuntimeError(f"slapadd failed: {loaded.stdout}{loaded.stderr}")
        server = Slapd(
            directory=directory,
            config=config,
            port=free_port(),
            tls_port=free_port(),
            ca=ca,
            ca_file=directory / "ca.pem",
            service_password=service_password,
            users={u.uid: u for u in entries},
        )
        try:
            server.start()
            yield server
        finally:
            if server.proc is not None and server.proc.poll() is None:
                server.resume()
            server.stop()
