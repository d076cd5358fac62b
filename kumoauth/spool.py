"""
The durable spool of SPEC §7.

Each accepted message is a pair in the spool directory: ``<id>.eml`` (the
message bytes) and ``<id>.json`` (envelope and meta).  Writing one:

1. both files are written under ``tmp/`` with names that end in ``.tmp``
   (never ``.eml``/``.json``), each fsynced;
2. ``.eml`` is renamed into place, then ``.json`` — the ``.json`` is the
   commit record: a pair is complete exactly when its ``.json`` exists;
3. the spool directory is fsynced, so both directory entries are on disk
   before the caller may answer ``250``.

A crash between the two renames leaves an ``.eml`` with no ``.json``: that
message was never acknowledged.  :meth:`Spool.recover` (run at start-up)
removes such orphans and everything under ``tmp/``; readers
(:meth:`Spool.ids`) only ever see complete pairs.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool

from kumoauth.delivery import Message

EML = ".eml"
JSON = ".json"
TMP = ".tmp"


class SpoolError(Exception):
    """
    A message could not be made durable (disk full, permissions, I/O error).
    """


def new_id() -> str:
    """
    A spool id: 16 hex digits of nanoseconds since the epoch (so ids sort by
    arrival) and 8 random hex digits (so concurrent writers never collide).
    """
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


def is_id(name: str) -> bool:
    return len(name) == 24 and all(c in "0123456789abcdef" for c in name)


@dataclass(frozen=True)
class SpooledMessage:
    id: str
    envelope: dict[str, Any]
    eml_path: Path

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.envelope.get("meta", {}))

    def read_bytes(self) -> bytes:
        return self.eml_path.read_bytes()


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """
    A spool directory.  :meth:`write` blocks (it fsyncs); call it from a
    thread, as :class:`SpoolWriter` does.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.tmp = self.path / "tmp"

    def create(self) -> None:
        """
        Create the spool and its ``tmp/`` if missing.  Raises ``OSError``.
        """
        self.path.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.tmp.mkdir(mode=0o750, exist_ok=True)

    def recover(self) -> list[str]:
        """
        Remove what a crash may have left: everything in ``tmp/`` and every
        ``.eml`` without its ``.json``.  Returns the names removed.
        """
        removed = []
        if self.tmp.is_dir():
            for p in self.tmp.iterdir():
                p.unlink(missing_ok=True)
                removed.append(f"tmp/{p.name}")
        for p in self.path.glob("*" + EML):
            if not p.with_suffix(JSON).exists():
                p.unlink(missing_ok=True)
                removed.append(p.name)
        if removed:
            _fsync_dir(self.path)
        return removed

    def write(self, message: Message, received_at: datetime | None = None) -> str:
        """
        Make *message* durable as ``<id>.eml`` + ``<id>.json``; return the
        id.  On failure nothing partial is left and :class:`SpoolError` is
        raised.
        """
        mid = message.id
        when = received_at or datetime.now(UTC)
        eml_tmp = self.tmp / f"{mid}{EML}{TMP}"
        json_tmp = self.tmp / f"{mid}{JSON}{TMP}"
        eml = self.path / f"{mid}{EML}"
        jsn = self.path / f"{mid}{JSON}"
        try:
            envelope = {
                "id": mid,
                "received_at": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "mail_from": message.sender,
                "rcpt_to": message.recipients,
                "meta": message.snapshot(),
            }
            _write_file(eml_tmp, message.data)
            _write_file(json_tmp, json.dumps(envelope, ensure_ascii=False).encode("utf-8"))
            os.rename(eml_tmp, eml)
            os.rename(json_tmp, jsn)
            _fsync_dir(self.path)
        except (OSError, ValueError, TypeError) as e:
            # Undo in reverse order; the .json goes first so no reader ever
            # sees a pair whose .eml is about to disappear.
            for p in (jsn, eml, json_tmp, eml_tmp):
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise SpoolError(f"cannot spool {mid}: {reason}") from None
        return mid

    def ids(self) -> Iterator[str]:
        """
        The ids of complete pairs, oldest first.
        """
        names = sorted(p.name[: -len(JSON)] for p in self.path.glob("*" + JSON))
        for mid in names:
            if (self.path / f"{mid}{EML}").exists():
                yield mid

    def read(self, mid: str) -> SpooledMessage:
        """
        Load one complete pair.  Raises ``KeyError`` if there is none.
        """
        if not is_id(mid):
            raise KeyError(mid)
        jsn = self.path / f"{mid}{JSON}"
        eml = self.path / f"{mid}{EML}"
        try:
            envelope = json.loads(jsn.read_bytes())
        except FileNotFoundError:
            raise KeyError(mid) from None
        if not eml.exists():
            raise KeyError(mid)
        return SpooledMessage(id=mid, envelope=envelope, eml_path=eml)

    def __iter__(self) -> Iterator[SpooledMessage]:
        for mid in self.ids():
            try:
                yield self.read(mid)
            except KeyError:
                continue


class SpoolWriter:
    """
    Runs :meth:`Spool.write` in a small thread pool so fsync never stalls the
    reactor.  The service starts and stops ``pool``.
    """

    def __init__(self, spool: Spool, reactor: IReactorFromThreads, threads_max: int = 4) -> None:
        self.spool = spool
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads_max, name="kumoauth-spool")

    def store(self, message: Message) -> defer.Deferred[str]:
        return threads.deferToThreadPool(self.reactor, self.pool, self.spool.write, message)
