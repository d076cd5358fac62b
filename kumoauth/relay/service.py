"""
The queue's owner, as a Twisted service: it holds the queue (and its lock)
for the life of the process, flushes the journal, compacts, applies the
operator's requests (``kumoauth spool hold ID`` …) and, with ``[relay]``,
runs the scheduler (:class:`~kumoauth.relay.scheduler.Relay`).

Operator requests while a server runs: the queue is locked, so ``kumoauth
spool`` drops a request file into ``<queue>/control/`` (written under a
temporary name, then renamed: never half-read) and the owner applies it
within a second, then removes it.  Without a running server the command
takes the lock and applies the request itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from kumoauth.ops.loglimit import StateLog
from kumoauth.relay.queue import QueueError, QueueStore
from kumoauth.textsafe import escape

log = Logger(namespace="kumoauth.relay")

CONTROL_DIR = "control"
#: what the owner writes next to a request it has done, when asked
ANSWER_SUFFIX = ".answer"
#: seconds an answer nobody read is kept
ANSWER_KEPT = 3600.0
#: operator requests: what each does to one message (or all: flush)
OPERATIONS = ("flush", "retry", "hold", "release", "delete", "bounce")
#: the operations one request may apply to many messages (``kumoauth spool
#: hold --authn USER``); not bounce: bouncing spam answers forged senders
BULK = ("retry", "hold", "release", "delete")
#: a request taken from control/: operation, id, where to answer, and
#: for a bulk one the ids and what chose them
Request = tuple[str, str | None, Path | None, tuple[list[str], str] | None]

#: seconds between flushes of the journal, looks at control/, metrics
HOUSEKEEPING = 1.0
#: seconds between compactions
COMPACT_EVERY = 10.0
#: seconds between updates of the queue gauges (a walk over the index)
GAUGES_EVERY = 10.0


def request(
    queue_path: Path,
    op: str,
    mid: str | None,
    answer: bool = False,
    many: tuple[list[str], str] | None = None,
) -> Path:
    """
    Leave a request for the running owner of *queue_path*.  Returns its path.
    With *answer*, the owner writes what came of it to :func:`answer_path`
    once it is done (some requests wait for a delivery attempt to end).
    *many* (ids, and what chose them) applies a :data:`BULK` operation to
    each of those messages, with one line for them all.
    """
    if op not in OPERATIONS or (many is not None and op not in BULK):
        raise ValueError(f"unknown operation {op!r}")
    directory = queue_path / CONTROL_DIR
    directory.mkdir(mode=0o750, exist_ok=True)
    path = directory / f"{time.time_ns():016x}-{os.getpid()}-{op}.json"
    record: dict[str, Any] = {"op": op, "id": mid, "answer": answer}
    if many is not None:
        record["ids"], record["label"] = many
    _write_whole(path, json.dumps(record))
    return path


def _write_whole(path: Path, text: str) -> None:
    """*path* appears with all of *text* or not at all (the reader polls)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        with open(fd, "w", encoding="utf-8") as f:
            if os.geteuid() == 0:
                # Root's request (sudo kumoauth spool …), for a service
                # that runs as the directory's owner: theirs to read.
                owner = os.stat(path.parent)
                os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            f.write(text)
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk: nothing half-written left behind
        raise


def answer_path(request_path: Path) -> Path:
    """Where the owner answers the request at *request_path*."""
    return request_path.with_suffix(ANSWER_SUFFIX)


def _answer(request_path: Path, text: str) -> None:
    try:
        _write_whole(answer_path(request_path), text + "\n")
    except OSError as e:
        log.warn(
            "operator request: cannot write the answer {path}: {error}",
            path=str(answer_path(request_path)),
            error=e.strerror or str(e),
        )


def apply(
    queue: QueueStore, op: str, mid: str | None, relay: Any = None
) -> str | defer.Deferred[str]:
    """
    Apply one operator request to *queue*; a one-line description of what
    happened, or a Deferred firing with it (``bounce``, and ``delete`` or
    ``bounce`` of a message being sent).  ``KeyError`` if the message is
    not queued.

    ``delete`` and ``bounce`` of a message the relay is sending wait for
    that attempt to end, then apply to what is left: nothing if the
    upstream took it (the line says it was delivered), the recipients
    still pending otherwise.  So an upstream never gets a message whose
    sender was told it bounced.
    """
    now = time.time()
    if op == "flush":
        return f"{queue.make_due(now)} deferred messages are due now"
    assert mid is not None
    entry = queue.get(mid)
    if op == "retry":
        queue.deferred(mid, entry.attempts, now, entry.last_error)
        if entry.held:
            return f"{mid} is held: it will be due as soon as it is released"
        return f"{mid} is due now"
    if op == "hold":
        queue.hold(mid)
        return f"{mid} is held"
    if op == "release":
        queue.release(mid)
        return f"{mid} is released"
    if op == "bounce" and relay is None:
        raise ValueError("bounce needs [relay] (the bounce is sent through the upstream)")
    if op in ("delete", "bounce"):
        busy = getattr(relay, "busy", None)
        if busy is not None and busy(mid):
            log.info(
                "operator request: {op} {id} waits for the delivery attempt under way",
                op=op,
                id=mid,
            )
            return relay.after_attempt(mid).addCallback(_after_attempt, queue, op, mid, relay)
        return _remove(queue, op, mid, relay)
    raise ValueError(f"unknown operation {op!r}")


#: how an attempt that took a message out of the queue ended, for the log
_ENDED = {
    "delivered": "it was delivered by the attempt under way when the request came",
    "bounced": (
        "the attempt under way when the request came ended it: the upstream "
        "refused it, and the sender gets a bounce unless NOTIFY left out FAILURE"
    ),
}

#: the answer to ``bounce ID`` once the message has left the queue: the
#: relay does not say whether a bounce was stored (RFC 3461 NOTIFY without
#: FAILURE, a null sender or no recipient still pending: none), its log does
BOUNCED = (
    "{mid} is bounced: failed and out of the queue; its sender gets a bounce for the "
    "recipients still pending, except those whose NOTIFY leaves out FAILURE (none to a "
    "null sender): the log says when none is sent"
)


#: what an operator request may meet that leaves the queue as it was: an
#: unknown id, an operation the queue refuses, the queue closed meanwhile,
#: a journal that cannot be written
REFUSED = (KeyError, ValueError, QueueError, OSError)


def apply_many(
    queue: QueueStore, op: str, ids: list[str], label: str, relay: Any = None
) -> str | defer.Deferred[str]:
    """
    Apply the :data:`BULK` *op* to each of *ids* (chosen by *label*, say
    ``authn=bob``); one line for them all, or a Deferred of it when a
    delete waits for an attempt under way.
    """
    counts = {"done": 0, "gone": 0, "not done": 0}
    waiting: list[defer.Deferred[str]] = []

    def count(what: str) -> str:
        counts["not done" if " not done: " in what else "done"] += 1
        return what

    with queue.one_sync():  # one fdatasync for them all, not one each
        for mid in ids:
            try:
                what = apply(queue, op, mid, relay)
            except KeyError:
                counts["gone"] += 1  # it left the queue since it was chosen
                continue
            except REFUSED:
                counts["not done"] += 1
                continue
            if isinstance(what, defer.Deferred):
                waiting.append(what.addCallback(count))
            else:
                count(what)

    def summary(_: object = None) -> str:
        parts = [f"{counts['done']} {_PAST[op]}"]
        if counts["gone"]:
            parts.append(f"{counts['gone']} no longer queued")
        if counts["not done"]:
            parts.append(f"{counts['not done']} not done (delivered meanwhile, or see the log)")
        # The command's label is escaped already; one from a request file
        # someone else wrote may not be.
        said = label if label.isprintable() else escape(label)
        return f"{op} of {len(ids)} message(s) with {said}: {', '.join(parts)}"

    if waiting:
        return defer.gatherResults(waiting, consumeErrors=True).addBoth(summary)
    return summary()


_PAST = {"retry": "due now", "hold": "held", "release": "released", "delete": "deleted"}


def not_done(op: str, mid: str | None, e: Exception) -> str:
    """The line for an operator request that changed nothing, and why."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"{op} {escape(mid)} not done: {escape(why)}"


def _after_attempt(
    outcome: str | None, queue: QueueStore, op: str, mid: str, relay: Any
) -> str | defer.Deferred[str]:
    if mid not in queue:
        ended = _ENDED.get(outcome or "", "it left the queue during the attempt under way")
        return f"{op} {mid} not done: {ended}"
    try:
        return _remove(queue, op, mid, relay)
    except REFUSED as e:
        return not_done(op, mid, e)


def _remove(queue: QueueStore, op: str, mid: str, relay: Any) -> str | defer.Deferred[str]:
    if op == "delete":
        queue.delete(mid)
        return f"{mid} is deleted"
    result = relay.bounce_now(queue.get(mid), "5.0.0", "bounced by the operator")
    if not isinstance(result, defer.Deferred):
        return BOUNCED.format(mid=mid)

    def said(stored: bool) -> str:
        if stored:
            return BOUNCED.format(mid=mid)
        return f"bounce {mid} not done: its bounce could not be stored; it stays queued"

    return result.addCallback(said)


class QueueService(service.MultiService):
    """
    Owns *queue* for the process; its child, if any, is the relay.
    """

    def __init__(self, queue: QueueStore, reactor: Any, metrics: Any) -> None:
        super().__init__()
        self.queue = queue
        self.reactor = reactor
        self.metrics = metrics
        self.relay: Any = None
        self._loop: task.LoopingCall | None = None
        self._last_compact = time.monotonic()
        self._last_gauges = 0.0
        self._busy = False
        #: the housekeeping's file system errors (a full disk, no descriptors
        #: left), logged once per change rather than every HOUSEKEEPING
        self.housekeeping = StateLog("queue housekeeping", logger=log)

    def set_relay(self, relay: Any) -> None:
        self.relay = relay
        relay.setServiceParent(self)

    def notify(self, ids: list[str]) -> None:
        """
        Messages were just stored in this process.
        """
        if self.relay is not None:
            self.relay.notify()

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._housekeeping)
        self._loop.clock = self.reactor
        self._loop.start(HOUSEKEEPING, now=False).addErrback(
            lambda f: log.failure("queue housekeeping stopped", f)
        )

    def stopService(self) -> defer.Deferred[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        d = defer.maybeDeferred(super().stopService)

        def close(_: object) -> None:
            try:
                self.queue.flush()
            except OSError as e:  # a full disk: what memory had is sent again
                log.warn(
                    "queue: the journal could not be written at stop ({why}); messages "
                    "delivered since it lagged may be sent again",
                    why=escape(e.strerror or str(e)),
                )
            self.queue.close()

        return d.addBoth(close)

    def _housekeeping(self) -> None:
        if self._busy:
            return
        self._busy = True
        now = time.monotonic()
        compact = now - self._last_compact >= COMPACT_EVERY
        if compact:
            self._last_compact = now
        gauges = now - self._last_gauges >= GAUGES_EVERY
        if gauges:
            self._last_gauges = now

        def then(done: tuple[list[Request], OSError | None]) -> None:
            requests, problem = done
            for level, text in self.queue.take_notes():  # what compaction found
                getattr(log, level)("{text}", text=text)
            for op, mid, answer, many in requests:
                self._apply(op, mid, answer, many)
            if requests and self.relay is not None:
                self.relay.notify()
            if problem is not None:
                raise problem

        def failed(f: Any) -> None:
            if f.check(OSError):
                self.housekeeping.failed(
                    str(f.value), "the queue is not synced, compacted or scanned for requests"
                )
            else:
                log.failure("queue housekeeping", f)

        d = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self.housekeeping_work, compact, gauges
        )
        d.addCallback(then)
        d.addCallback(lambda _: self.housekeeping.succeeded())
        d.addErrback(failed)
        d.addBoth(lambda _: setattr(self, "_busy", False))

    def housekeeping_work(
        self, compact: bool, gauges: bool
    ) -> tuple[list[Request], OSError | None]:
        """
        Off the reactor thread: sync the journal, compact, update the gauges,
        take the operator's requests; and the journal's problem, if it
        cannot be written (a full disk).  That problem stops none of the
        rest: compaction is what gives a full disk delivered mail's space
        back, and an operator's request gets its answer.
        """
        problem: OSError | None = None
        try:
            self.queue.flush()
        except OSError as e:
            problem = e
        if compact or problem is not None:
            try:
                self.queue.compact()
            except OSError as e:
                problem = problem or e
        if gauges:
            self._gauges()
        return self._take_requests(), problem

    def _apply(
        self,
        op: str,
        mid: str | None,
        answer: Path | None = None,
        many: tuple[list[str], str] | None = None,
    ) -> None:
        """
        One operator request, logged once it is done (some wait), and
        answered in a file next to the request when it asked (*answer*).
        """
        try:
            if many is not None:
                what = apply_many(self.queue, op, *many, relay=self.relay)
            else:
                what = apply(self.queue, op, mid, self.relay)
        except REFUSED as e:
            what = not_done(op, mid, e)
        if not isinstance(what, defer.Deferred):
            log.info("operator request: {what}", what=what)
            if answer is not None:
                _answer(answer, what)
            return

        def done(text: str) -> None:
            log.info("operator request: {what}", what=text)
            if answer is not None:
                _answer(answer, text)
            if self.relay is not None:
                self.relay.notify()

        what.addCallback(done).addErrback(
            lambda f: log.failure("operator request {op} {id}", f, op=op, id=mid)
        )

    def _take_requests(self) -> list[Request]:
        directory = self.queue.path / CONTROL_DIR
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        out = []
        now = time.time()
        for name in names:
            path = directory / name
            if name.endswith(ANSWER_SUFFIX):
                # Answers nobody came for (the command was interrupted).
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime > ANSWER_KEPT:
                        path.unlink()
                continue
            if not name.endswith(".json"):
                continue
            try:
                req = json.loads(path.read_text())
                op, mid = str(req["op"]), req.get("id")
                many = None
                if "ids" in req:
                    many = ([str(i) for i in req["ids"]], str(req.get("label", "")))
                if op in OPERATIONS and (many is None or op in BULK):
                    answer = path if req.get("answer") is True else None
                    out.append((op, str(mid) if mid is not None else None, answer, many))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                log.warn("ignored a malformed operator request {name}", name=name)
            try:
                path.unlink()
            except OSError:
                pass
        return out

    def _gauges(self) -> None:
        now = time.time()
        counts = {"queued": 0, "deferred": 0, "held": 0}
        oldest = {"queued": 0.0, "deferred": 0.0, "held": 0.0}
        for entry in self.queue.entries():
            state = "held" if entry.held else ("deferred" if entry.attempts else "queued")
            counts[state] += 1
            oldest[state] = max(oldest[state], now - entry.arrival)
        for state in counts:
            self.metrics.queue_messages.labels(state).set(counts[state])
            self.metrics.queue_oldest.labels(state).set(oldest[state])
