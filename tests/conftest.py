from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from kumoauth.testing import Session

settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if __import__("os").environ.get("CI") else "dev")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A CA and a server certificate for 127.0.0.1 (trustme), per test module."""
    from tests.server import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def redis() -> Iterator[Any]:
    """A redis-server of the module's own (tests/redis_server.py), on a free port."""
    from tests.redis_server import require_redis, running_redis

    require_redis()
    with running_redis() as server:
        yield server


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def make_session(spool_dir: Path) -> Iterator[Callable[..., Session]]:
    sessions: list[Session] = []

    def make(*args: Any, **kwargs: Any) -> Session:
        kwargs.setdefault("spool_dir", spool_dir)
        s = Session(*args, **kwargs)
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.close()


class CapturedLog:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def text(self) -> str:
        out = []
        for e in self.events:
            out.append(formatEvent(e) or "")
            if "log_failure" in e:
                out.append(e["log_failure"].getTraceback())
            out.append(repr(e))
        return "\n".join(out)

    def namespace(self, ns: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_namespace") == ns]


@pytest.fixture
def captured_log() -> Iterator[CapturedLog]:
    observer = CapturedLog()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """
    Make *path* read-only for the server: chmod for an ordinary user; as
    root (whom permissions do not stop) a read-only bind mount.
    """
    if os.geteuid() != 0:
        os.chmod(path, 0o500)
        try:
            yield
        finally:
            os.chmod(path, 0o750)  # noqa: S103 - restores the spool mode
        return
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def stores(reactor: Any) -> Iterator[Callable[[str], Any]]:
    """
    Make Redis stores from URLs (``kumoauth.stores.redis.from_spec``), each
    closed at the end of the test; *reactor* is the test module's own.
    """
    from kumoauth.stores.redis import from_spec
    from tests.upstream import in_reactor

    made: list[Any] = []

    def make(spec: str) -> Any:
        store = in_reactor(from_spec, spec, reactor)
        made.append(store)
        return store

    yield make
    for store in made:
        in_reactor(store.close)


@implementer(IHostnameResolver)
class SilentResolver:
    """A name resolver that never answers (a DNS server gone quiet)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kw: Any) -> Any:
        self.asked.append(hostName)
        return None


@pytest.fixture
def silent_dns() -> Iterator[SilentResolver]:
    """The running reactor's name resolver silent for the test."""
    from tests.upstream import in_reactor, start_reactor

    reactor = start_reactor()
    resolver = SilentResolver()
    previous = in_reactor(lambda: reactor.installNameResolver(resolver))
    yield resolver
    in_reactor(lambda: reactor.installNameResolver(previous))
