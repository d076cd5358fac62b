"""
The spool: where accepted messages are made durable before ``250``.

On disk it is the relay queue (:mod:`kumoauth.relay.queue`): append-only
segments, group-committed with one ``fdatasync`` per batch, and a state
journal.  Without ``[relay]`` messages simply stay there (spool only);
with it the relay scheduler sends them on and they leave once the upstream
has them.

- :class:`Spool` is the directory as readers see it (the ``kumoauth
  spool`` command, tests): no lock, safe while a server runs.  It can also
  write, for in-memory sessions (:mod:`kumoauth.testing`).
- :class:`SpoolWriter` is the server's writer: one thread takes whatever
  messages queued up while it wrote the previous batch and appends them
  with one sync (group commit), then hands the batch back to the reactor.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from kumoauth.ops.threads import BackgroundThread
from kumoauth.relay.queue import (
    QueuedMessage,
    QueueError,
    QueueLocked,
    QueueReader,
    QueueStore,
)
from kumoauth.storage.delivery import Message
from kumoauth.storage.ids import is_id, new_id

#: what a reader gets for one message: ``id``, ``envelope``, ``meta``,
#: ``size``, ``read_bytes()``
SpooledMessage = QueuedMessage

__all__ = [
    "QueueLocked",
    "Spool",
    "SpoolError",
    "SpoolWriter",
    "SpooledMessage",
    "is_id",
    "new_id",
]


class SpoolError(Exception):
    """
    A message could not be made durable (disk full, permissions, I/O error).
    """


class Appender(Protocol):
    """
    What appends a batch with one sync: the owner's :class:`QueueStore`, or
    a worker's :class:`~kumoauth.relay.queue.SegmentWriter`.
    """

    def append_batch(self, messages: list[Message]) -> list[Any]: ...


#: stores this process owns, by path: in-memory sessions of one test share
#: a spool directory, and only one store per process may hold its lock
_owned: dict[Path, QueueStore] = {}
_owned_lock = threading.Lock()


def owned_store(path: Path) -> QueueStore:
    """
    The queue at *path* as this process's own (opened, locked and recovered
    on first use).  Raises :class:`QueueError`.
    """
    key = Path(path).resolve()
    with _owned_lock:
        store = _owned.get(key)
        if store is None:
            store = _owned[key] = QueueStore.open(key)
        return store


def release_store(path: Path) -> None:
    """
    Close and unlock a store :func:`owned_store` opened.
    """
    with _owned_lock:
        store = _owned.pop(Path(path).resolve(), None)
    if store is not None:
        store.close()


class Spool:
    """
    A spool directory.  Reading needs no lock; :meth:`write` (for in-memory
    sessions and tools) makes this process the queue's owner.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def create(self) -> None:
        """
        Create the directory if missing.  Raises ``OSError``.
        """
        self.path.mkdir(mode=0o750, parents=True, exist_ok=True)

    def write(self, message: Message) -> str:
        """
        Make *message* durable; return its id.  Raises :class:`SpoolError`.
        """
        (result,) = self.write_batch([message])
        if isinstance(result, SpoolError):
            raise result
        return result

    def write_batch(self, messages: list[Message]) -> list[str | SpoolError]:
        try:
            store = owned_store(self.path)
        except QueueError as e:
            return [SpoolError(str(e)) for _ in messages]
        return _as_spool_results(store.append_batch(messages))

    def _reader(self) -> QueueReader:
        return QueueReader(self.path)

    def ids(self) -> Iterator[str]:
        """
        The ids of queued messages, oldest first.
        """
        return self._reader().ids()

    def read(self, mid: str) -> SpooledMessage:
        """
        One message.  Raises ``KeyError`` if there is none.
        """
        if not is_id(mid):
            raise KeyError(mid)
        return self._reader().read(mid)

    def __iter__(self) -> Iterator[SpooledMessage]:
        return iter(self._reader())


def _as_spool_results(results: list[Any]) -> list[str | SpoolError]:
    out: list[str | SpoolError] = []
    for r in results:
        if isinstance(r, QueueError):
            out.append(SpoolError(str(r)))
        elif isinstance(r, tuple):
            out.append(r[0])
        else:
            out.append(r)
    return out


class SpoolWriter:
    """
    Writes messages in one dedicated thread, so a sync never stalls the
    reactor, with group commit: whatever queued up while the previous batch
    was being written goes out as the next batch, with one ``fdatasync``
    and one hand-back to the reactor.  Under load that replaces a thread
    round trip and a sync per message with one per batch.

    The hand-over is a ``queue.SimpleQueue`` (C, one lock): the reactor's
    ``put`` costs no Python-level condition variable, and the thread
    sleeps in ``get`` while there is nothing to write.
    """

    #: most messages in one batch
    BATCH = 64

    def __init__(
        self, appender: Appender, reactor: IReactorFromThreads, close_appender: bool = False
    ) -> None:
        self.appender = appender
        self.reactor = reactor
        #: close *appender* once the thread has ended (a worker's own
        #: segments: closing cuts the current one back to its last record)
        self.close_appender = close_appender
        # (message, its Deferred); None: stop once what came before is written
        self._inbox: queue.SimpleQueue[tuple[Message, defer.Deferred[str]] | None]
        self._inbox = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: called on the reactor thread with the ids of each stored batch
        self.on_stored: Any = None

    def start(self) -> None:
        """Start the thread; a second call while it runs changes nothing."""
        if self._thread is not None:
            return
        self._inbox = queue.SimpleQueue()
        # Woken by a store, it does not preempt the reactor thread.
        self._thread = BackgroundThread(
            target=self._run, args=(self._inbox,), name="kumoauth-spool", daemon=True
        )
        self._thread.start()

    def stop(self) -> defer.Deferred[None]:
        """
        Finish what is queued, then end the thread; fires on the reactor
        thread once it has ended (the join happens in a helper thread, so a
        slow disk never blocks the reactor).
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return defer.succeed(None)
        self._inbox.put(None)
        d: defer.Deferred[None] = defer.Deferred()

        def join() -> None:
            thread.join()
            if self.close_appender:
                close = getattr(self.appender, "close", None)
                if close is not None:
                    close()
            self.reactor.callFromThread(d.callback, None)

        threading.Thread(target=join, name="kumoauth-spool-stop", daemon=True).start()
        return d

    def store(self, message: Message) -> defer.Deferred[str]:
        if self._thread is None:
            return defer.fail(SpoolError("the spool writer is not running"))
        d: defer.Deferred[str] = defer.Deferred()
        self._inbox.put((message, d))
        return d

    def _run(self, inbox: queue.SimpleQueue[tuple[Message, defer.Deferred[str]] | None]) -> None:
        stopping = False
        while not stopping:
            first = inbox.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.BATCH:
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            try:
                results: list[Any] = _as_spool_results(
                    self.appender.append_batch([m for m, _ in batch])
                )
            except Exception:  # a bug: fail this batch, keep the thread
                results = [Failure()] * len(batch)
            self.reactor.callFromThread(self._fire, [d for _, d in batch], results)

    def _fire(self, deferreds: list[defer.Deferred[str]], results: list[Any]) -> None:
        stored = []
        for d, result in zip(deferreds, results, strict=True):
            if not isinstance(result, (SpoolError, Failure)):
                stored.append(result)
            if d.called:
                continue  # cancelled: the client went away (the message is stored regardless)
            if isinstance(result, (SpoolError, Failure)):
                d.errback(result)
            else:
                d.callback(result)
        if stored and self.on_stored is not None:
            self.on_stored(stored)
