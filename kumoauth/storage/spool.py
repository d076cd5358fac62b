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
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from kumoauth.storage.delivery import Message

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

    def write(self, message: Message) -> str:
        """
        Make *message* durable as ``<id>.eml`` + ``<id>.json``; return the
        id.  On failure nothing partial is left and :class:`SpoolError` is
        raised.
        """
        (result,) = self.write_batch([message])
        if isinstance(result, SpoolError):
            raise result
        return result

    def write_batch(self, messages: list[Message]) -> list[str | SpoolError]:
        """
        Make several messages durable with one directory fsync (group
        commit); return each one's id or its :class:`SpoolError`.
        """
        results: list[str | SpoolError] = []
        for message in messages:
            try:
                results.append(self._place(message))
            except SpoolError as e:
                results.append(e)
        placed = [i for i, r in enumerate(results) if not isinstance(r, SpoolError)]
        if placed:
            try:
                _fsync_dir(self.path)
            except OSError as e:
                for i in placed:
                    mid = str(results[i])
                    self._remove(self.path / f"{mid}{JSON}", self.path / f"{mid}{EML}")
                    results[i] = SpoolError(f"cannot spool {mid}: {e.strerror}")
        return results

    def _place(self, message: Message) -> str:
        """
        Write both files under ``tmp/``, fsync them, rename them into place
        (``.eml`` first).  The caller fsyncs the directory.
        """
        mid = message.id
        eml_tmp = self.tmp / f"{mid}{EML}{TMP}"
        json_tmp = self.tmp / f"{mid}{JSON}{TMP}"
        eml = self.path / f"{mid}{EML}"
        jsn = self.path / f"{mid}{JSON}"
        try:
            envelope = {
                "id": mid,
                "received_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "mail_from": message.sender,
                "rcpt_to": message.recipients,
                "meta": message.snapshot(),
            }
            _write_file(eml_tmp, message.data)
            _write_file(json_tmp, json.dumps(envelope, ensure_ascii=False).encode("utf-8"))
            os.rename(eml_tmp, eml)
            os.rename(json_tmp, jsn)
        except (OSError, ValueError, TypeError) as e:
            # Undo in reverse order; the .json goes first so no reader ever
            # sees a pair whose .eml is about to disappear.
            self._remove(jsn, eml, json_tmp, eml_tmp)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise SpoolError(f"cannot spool {mid}: {reason}") from None
        return mid

    @staticmethod
    def _remove(*paths: Path) -> None:
        for p in paths:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass

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
    Writes messages in one dedicated thread, so fsync never stalls the
    reactor, with group commit: whatever queued up while the previous batch
    was being written goes out as the next batch, with one directory fsync
    and one hand-back to the reactor.  Under load that replaces a thread
    round trip per message with one per batch.
    """

    #: most messages in one batch
    BATCH = 64

    def __init__(self, spool: Spool, reactor: IReactorFromThreads) -> None:
        self.spool = spool
        self.reactor = reactor
        self._queue: list[tuple[Message, defer.Deferred[str]]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kumoauth-spool", daemon=True)
        self._thread.start()

    def stop(self) -> defer.Deferred[None]:
        """
        Finish what is queued, then end the thread; fires on the reactor
        thread once it has ended (the join happens in a helper thread, so a
        slow disk never blocks the reactor).
        """
        with self._cond:
            self._stopping = True
            self._cond.notify()
        thread, self._thread = self._thread, None
        if thread is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()

        def join() -> None:
            thread.join()
            self.reactor.callFromThread(d.callback, None)

        threading.Thread(target=join, name="kumoauth-spool-stop", daemon=True).start()
        return d

    def store(self, message: Message) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        with self._cond:
            if self._thread is None:
                return defer.fail(SpoolError("the spool writer is not running"))
            self._queue.append((message, d))
            if len(self._queue) == 1:
                self._cond.notify()
        return d

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._queue[: self.BATCH]
                del self._queue[: self.BATCH]
            try:
                results: list[Any] = self.spool.write_batch([m for m, _ in batch])
            except Exception:  # a bug: fail this batch, keep the thread
                results = [Failure()] * len(batch)
            self.reactor.callFromThread(_fire, [d for _, d in batch], results)


def _fire(deferreds: list[defer.Deferred[str]], results: list[Any]) -> None:
    for d, result in zip(deferreds, results, strict=True):
        if d.called:
            continue  # cancelled: the client went away (the message is spooled regardless)
        if isinstance(result, (SpoolError, Failure)):
            d.errback(result)
        else:
            d.callback(result)
