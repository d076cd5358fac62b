"""
The durable relay queue: accepted messages and their delivery state, on disk.

Pure file I/O (no Twisted).  :class:`SegmentWriter` and :class:`QueueStore`
serialise their own calls with a lock (a store's ``append_batch`` writes and
syncs outside it, so a writer thread never stalls the scheduler's reads of
the index); :class:`QueueReader` is for one thread.

One queue, one owner: :class:`QueueStore` (recovery, the journal, relaying,
compaction) exists only in the process holding ``flock(LOCK_EX)`` on
``<path>/lock``; a second process gets :class:`QueueLocked` and changes
nothing.  So no other process can ever relay; within the owner,
:meth:`QueueStore.claim` keeps two upstream sessions off one message.
Workers only append (:class:`SegmentWriter`) and the owner picks their
records up with :meth:`QueueStore.scan_new`.

Layout of a queue directory::

    <path>/lock                         flock(LOCK_EX) by the owner; its pid
    <path>/journal-<seq:016x>.log       state journal (owner only)
    <path>/seg/<writer>-<seq:016x>.q    append-only segments, one writer each

**Segments.**  Each writing process (``writer``: ``"0"`` for a single
process, ``"w0"``, ``"w1"``… for workers) appends only to its own current
segment, which it holds ``flock(LOCK_EX)`` on while it is current.  A record
is a 32-byte header, the envelope (UTF-8 JSON) and the message bytes::

    magic "KQr1" | flags u32 | env_len u32 | body_len u64 |
    body_crc u32 | env_crc u32 | header_crc u32          (little-endian)

``header_crc`` covers the 28 bytes before it, ``env_crc`` the envelope,
``body_crc`` the message.  Flag ``FIRST`` marks the first record of a batch.
A writer keeps :data:`ZERO_AHEAD` bytes of zeros after its last record and
writes over them, so the file size does not say where the records end: a
reader stops at the first header that does not check (zeros never do).  A
segment its writer has closed ends with its last record.
:meth:`SegmentWriter.append_batch` writes a whole batch and does **one**
``fdatasync`` for it (plus one directory fsync when it has just created the
segment); a message is acknowledged only after that.  A failed write or
sync abandons the segment: the next batch starts a new one, so no
acknowledged record ever follows a doubtful one.  From before its write
until its sync has returned, a batch is under its writer's POSIX write
lock (``lockf``, to the end of the file); :meth:`QueueStore.scan_new`
(and recovery, for a segment a live writer holds) leaves locked records
for a later scan, so the owner never relays a live writer's record before
its sync has returned.  The owner's scan skips its own writer id's
segments: it indexes what it stores itself after each sync.

**Journal.**  JSON lines, appended by the owner only: ``deferred`` (attempts,
next attempt, last error, per-recipient status), ``held``, ``released``,
``done`` and ``deleted`` (both leave the queue).  Lines are written to the
file at once (a kill -9 loses none); ``held``, ``released`` and ``deleted``
are fdatasynced at once, ``deferred`` and ``done`` by :meth:`QueueStore.flush`.

**Recovery** (:meth:`QueueStore.open`) reads the journal, then walks every
segment's headers and envelopes, seeking past message bytes, except in the
last batch of a segment no writer holds, whose bodies are checksummed: that
batch is the only place a crash can tear.  The tail from the first bad or
incomplete record of such a segment is truncated (it was never
acknowledged).  Message bytes are checked against ``body_crc`` whenever
they are read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import heapq
import json
import os
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from kumoauth.smtp.dsnparams import NOTHING, Requested
from kumoauth.stamps import PerSecond
from kumoauth.storage import legacy

MAGIC = b"KQr1"
HEADER = struct.Struct("<4sIIQIII")
HEADER_SIZE = HEADER.size  # 32
FIRST = 1  # flag: first record of a batch

#: a writer starts a new segment once its current one is this big
SEGMENT_MAX = 64 * 1024 * 1024
#: a writer keeps at least this much zero-filled space written ahead of its
#: records (see :meth:`SegmentWriter._zero_ahead`)
ZERO_AHEAD = 1024 * 1024
#: where recovery keeps a copy of a damaged segment, in the queue's directory
DAMAGED_DIR = "damaged"
_ZEROS = bytes(ZERO_AHEAD)
#: an envelope larger than this is corruption, not data
MAX_ENVELOPE = 16 * 1024 * 1024
#: a body larger than this is corruption, not data
MAX_BODY = 1 << 40

SEG_DIR = "seg"
SEG_SUFFIX = ".q"
NEW_SUFFIX = ".new"
LOCK_NAME = "lock"
JOURNAL_RE = re.compile(r"^journal-([0-9a-f]{16})\.log$")
JOURNAL_TMP = "journal.tmp"
WRITER_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
SEGMENT_RE = re.compile(r"^([A-Za-z0-9_]{1,32})-([0-9a-f]{16})\.q$")

#: journal ops that take a message out of the queue
TERMINAL = ("done", "deleted")

#: seconds between tries to rewrite a journal a failed write left behind
CATCH_UP_EVERY = 5.0
#: free bytes below which that rewrite is not even tried
CATCH_UP_ROOM = 64 * 1024
#: rewrite the journal when it has at least this many lines, more than half dead
JOURNAL_COMPACT_MIN = 4096

_IOV_MAX = 512


class QueueError(Exception):
    """
    A message could not be made durable, or the queue cannot be used.
    """


class QueueLocked(QueueError):
    """
    Another process owns the queue (holds its lock).
    """


class QueueCorrupt(QueueError):
    """
    Stored bytes fail their checksum.
    """


class Submission(Protocol):
    """
    What :meth:`SegmentWriter.append_batch` takes: a
    :class:`kumoauth.storage.delivery.Message` fits.
    """

    id: str
    sender: str
    recipients: list[str]
    data: bytes

    def values_now(self) -> dict[str, Any]:
        """The meta to store (encoded at once: a shallow copy will do)."""
        ...


@dataclass(slots=True)
class Entry:
    """
    One queued message in the index: where it is, its envelope (without
    meta, which stays on disk: :attr:`envelope`) and its delivery state.
    Never holds the message bytes.
    """

    id: str
    directory: Path  # seg/ (one object shared by every entry)
    segment: str  # file name under seg/
    offset: int  # of the record header
    env_len: int
    body_len: int
    body_crc: int
    arrival: float  # received_at, in seconds since the epoch
    mail_from: str
    rcpt_to: tuple[str, ...]
    smtputf8: bool
    #: ``meta.authn_id`` (the upstream identity with ``identity = "authz"``)
    authn_id: str | None = None
    # state, from the journal
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    rcpts: dict[str, str] | None = None  # rcpt -> status, as the scheduler wrote it
    held: bool = False
    #: the envelope holds DSN parameters (RFC 3461; read them from disk
    #: with :func:`kumoauth.relay.queue.dsn_of`: the index stays lean)
    dsn: bool = False

    @property
    def size(self) -> int:
        return self.body_len

    @property
    def body_offset(self) -> int:
        return self.offset + HEADER_SIZE + self.env_len

    @property
    def received_at(self) -> str:
        return iso_time(self.arrival)

    @property
    def envelope(self) -> dict[str, Any]:
        """
        The whole envelope, meta included, read from the segment on each
        use (:class:`QueueCorrupt` if damaged, ``KeyError`` if gone).
        """
        return _read_envelope(self.directory, self)

    def rcpt_status(self) -> dict[str, str]:
        """Each recipient's status; ``"pending"`` until one is set."""
        status = dict.fromkeys(self.rcpt_to, "pending")
        if self.rcpts:
            status.update(self.rcpts)
        return status

    def set_rcpt(self, rcpt: str, status: str) -> None:
        """
        Set one recipient's status in memory; it reaches the journal with
        the next :meth:`QueueStore.defer` of this message.
        """
        if self.rcpts is None:
            self.rcpts = {}
        self.rcpts[rcpt] = status


# --------------------------------------------------------------------------
# records


def dsn_of(entry: Entry) -> Requested:
    """
    What *entry*'s sender asked of the DSN extension, read from its
    envelope on disk (nothing asked if it has none); :class:`QueueCorrupt`
    or ``KeyError`` if the envelope cannot be read.
    """
    if not entry.dsn:
        return NOTHING
    return Requested.of(entry.envelope.get("dsn"))


def encode_envelope(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _header(env: bytes, body_len: int, body_crc: int, flags: int) -> bytes:
    head = struct.pack("<4sIIQII", MAGIC, flags, len(env), body_len, body_crc, zlib.crc32(env))
    return head + struct.pack("<I", zlib.crc32(head))


def encode_record(envelope: bytes, body: bytes, flags: int = 0) -> list[bytes]:
    """
    The record for *envelope* (encoded) and *body*, as buffers to write in
    order.
    """
    return [_header(envelope, len(body), zlib.crc32(body), flags), envelope, body]


@dataclass(frozen=True, slots=True)
class Header:
    flags: int
    env_len: int
    body_len: int
    body_crc: int
    env_crc: int

    @property
    def length(self) -> int:
        return HEADER_SIZE + self.env_len + self.body_len


def decode_header(raw: bytes) -> Header | None:
    """
    The header in *raw* (32 bytes), or None if it is not a valid one.
    """
    if len(raw) != HEADER_SIZE:
        return None
    magic, flags, env_len, body_len, body_crc, env_crc, hcrc = HEADER.unpack(raw)
    if magic != MAGIC or zlib.crc32(raw[:28]) != hcrc:
        return None
    if env_len > MAX_ENVELOPE or body_len > MAX_BODY:
        return None
    return Header(flags, env_len, body_len, body_crc, env_crc)


def decode_envelope(header: Header, raw: bytes) -> dict[str, Any] | None:
    if len(raw) != header.env_len or zlib.crc32(raw) != header.env_crc:
        return None
    try:
        env = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(env, dict) or not isinstance(env.get("id"), str):
        return None
    return env


def decode_records(data: bytes) -> tuple[list[tuple[dict[str, Any], bytes]], int]:
    """
    Every complete, valid record at the start of *data* (fully checked),
    and the length of that valid prefix.  For tests and tools.
    """
    out: list[tuple[dict[str, Any], bytes]] = []
    o = 0
    while True:
        header = decode_header(data[o : o + HEADER_SIZE])
        if header is None or o + header.length > len(data):
            return out, o
        env = decode_envelope(header, data[o + HEADER_SIZE : o + HEADER_SIZE + header.env_len])
        body = data[o + HEADER_SIZE + header.env_len : o + header.length]
        if env is None or zlib.crc32(body) != header.body_crc:
            return out, o
        out.append((env, body))
        o += header.length


@dataclass(slots=True)
class _Scan:
    entries: list[Entry]
    end: int  # offset just past the last valid record
    clean: bool  # the file ends exactly at `end`


_last_arrival: tuple[str, float] = ("", 0.0)


def _arrival(received_at: object) -> float:
    """``received_at`` ("2026-01-02T03:04:05Z") in epoch seconds (0 if unreadable)."""
    global _last_arrival
    text, value = _last_arrival
    if received_at == text:  # messages of the same second come together
        return value
    try:
        value = datetime.fromisoformat(str(received_at)).replace(tzinfo=UTC).timestamp()
    except ValueError:
        value = 0.0
    _last_arrival = (str(received_at), value)
    return value


def _entry(seg_dir: Path, name: str, offset: int, header: Header, env: dict[str, Any]) -> Entry:
    rcpts = env.get("rcpt_to") or ()
    return Entry(
        id=env["id"],
        directory=seg_dir,
        segment=name,
        offset=offset,
        env_len=header.env_len,
        body_len=header.body_len,
        body_crc=header.body_crc,
        arrival=_arrival(env.get("received_at")),
        mail_from=sys.intern(str(env.get("mail_from", ""))),
        rcpt_to=tuple(sys.intern(str(r)) for r in rcpts),
        smtputf8=bool(env.get("smtputf8")),
        authn_id=_authn_id(env.get("meta")),
        dsn="dsn" in env,
    )


def _authn_id(meta: object) -> str | None:
    authn = meta.get("authn_id") if isinstance(meta, dict) else None
    return sys.intern(authn) if isinstance(authn, str) and authn else None


def _scan_segment(
    f: IO[bytes], seg_dir: Path, name: str, start: int, size: int, check_last_batch: bool
) -> _Scan:
    """
    Walk the records of segment *name* (open as *f*, *size* bytes) from
    *start*: headers and envelopes only, seeking past bodies.  With
    *check_last_batch*, the bodies of the last batch are checksummed too,
    and the scan ends before the first one that fails.
    """
    entries: list[Entry] = []
    headers: list[Header] = []
    batch_start = 0
    o = start
    f.seek(o)
    while o + HEADER_SIZE <= size:
        header = decode_header(f.read(HEADER_SIZE))
        if header is None or o + header.length > size:
            break
        env = decode_envelope(header, f.read(header.env_len))
        if env is None:
            break
        if header.flags & FIRST:
            batch_start = len(entries)
        entries.append(_entry(seg_dir, name, o, header, env))
        headers.append(header)
        o += header.length
        f.seek(o)
    if check_last_batch:
        for i in range(batch_start, len(entries)):
            e = entries[i]
            f.seek(e.body_offset)
            if _crc_stream(f, e.body_len) != e.body_crc:
                del entries[i:]
                o = e.offset
                break
    return _Scan(entries, o, o == size)


def _resync(f: IO[bytes], seg_dir: Path, name: str, start: int, size: int) -> _Scan | None:
    """
    The records from the first valid one after *start* (a record header,
    its checksum and its envelope's all good), or None if no valid record
    follows: what a crash leaves is a torn *last* batch, so a valid record
    after an invalid one means damage, not a write that did not finish.
    """
    pos = start + 1
    while pos + HEADER_SIZE <= size:
        f.seek(pos)
        chunk = f.read(min(1 << 20, size - pos))
        at = chunk.find(MAGIC)
        if at < 0:
            pos += max(1, len(chunk) - len(MAGIC) + 1)
            continue
        candidate = pos + at
        f.seek(candidate)
        header = decode_header(f.read(HEADER_SIZE))
        if (
            header is not None
            and candidate + header.length <= size
            and decode_envelope(header, f.read(header.env_len)) is not None
        ):
            scan = _scan_segment(f, seg_dir, name, candidate, size, check_last_batch=True)
            if scan.entries:
                return scan
        pos = candidate + 1
    return None


def _batch_start(f: IO[bytes], offset: int) -> bool:
    """True if the (valid) record at *offset* starts a batch."""
    f.seek(offset)
    header = decode_header(f.read(HEADER_SIZE))
    return header is not None and bool(header.flags & FIRST)


def _nonzero(f: IO[bytes], start: int, size: int) -> bool:
    """True if any byte of *f* from *start* to *size* is not zero."""
    f.seek(start)
    while start < size:
        chunk = f.read(min(1 << 20, size - start))
        if not chunk:
            return False
        if chunk.count(0) != len(chunk):
            return True
        start += len(chunk)
    return False


def _settled(fd: int, scan: _Scan) -> _Scan:
    """
    *scan* without the records their writer has not synced yet: those it
    still holds under its write lock (see :meth:`SegmentWriter.append_batch`)
    and those it has cut off since they were read (its sync failed; it cuts
    before it unlocks).  They are left for a later scan, or for good.
    """
    entries = scan.entries
    if not entries:
        return scan
    end = scan.end
    if not _lockable(fd, entries[0].offset, end - entries[0].offset):
        for i, e in enumerate(entries):
            if not _lockable(fd, e.offset, e.body_offset + e.body_len - e.offset):
                entries, end = entries[:i], e.offset
                break
    size = os.fstat(fd).st_size
    while entries and entries[-1].body_offset + entries[-1].body_len > size:
        end = entries.pop().offset
    return _Scan(entries, end, scan.clean and end == scan.end)


def _lockable(fd: int, start: int, length: int) -> bool:
    """True if no other process holds a write lock on any of these bytes."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, length, start)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
    return True


def _crc_stream(f: IO[bytes], n: int) -> int:
    crc = 0
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            return -1
        crc = zlib.crc32(chunk, crc)
        n -= len(chunk)
    return crc


# --------------------------------------------------------------------------
# small file helpers


def give_queue(path: Path, uid: int, gid: int) -> None:
    """
    Make the queue at *path* the files of *uid*:*gid* (what root created
    there: a start before twistd drops privileges, a ``kumoauth spool``
    action run with sudo): the directory, its lock, journals, ``seg/``
    with every segment, ``damaged/``.  A symlink is changed, never what it
    points to: the service user may have planted one to be given a file of
    root's.  ``OSError`` if one cannot be changed.
    """
    os.chown(path, uid, gid, follow_symlinks=False)
    for p in path.iterdir():
        if p.name in (SEG_DIR, LOCK_NAME, DAMAGED_DIR) or p.name.startswith("journal-"):
            os.chown(p, uid, gid, follow_symlinks=False)
    seg = path / SEG_DIR
    if seg.is_dir() and not seg.is_symlink():
        for p in seg.iterdir():
            os.chown(p, uid, gid, follow_symlinks=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, buffers: list[bytes], offset: int | None = None) -> None:
    """
    Write *buffers* in order (``writev``), or at *offset* (``pwritev``);
    short writes resumed.
    """
    views = [memoryview(b) for b in buffers if b]
    i = 0
    while i < len(views):
        group = views[i : i + _IOV_MAX]
        if offset is None:
            n = os.writev(fd, group)
        else:
            n = os.pwritev(fd, group, offset)
            offset += n
        while n > 0:
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


def _header_at(path: Path, offset: int) -> bool:
    """True if a valid record header starts at *offset* of *path*."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return decode_header(os.pread(fd, HEADER_SIZE, offset)) is not None
    finally:
        os.close(fd)


def _try_flock(path: Path) -> int | None:
    """
    Open *path* and take ``LOCK_EX`` without waiting: the fd, or None if
    another open file holds it (a live writer) or it is gone.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def iso_time(t: float) -> str:
    """
    *t* as the queue writes times: ``2026-01-02T03:04:05Z`` (UTC, seconds);
    one outside the years 1-9999 (a retry a huge ``retry_schedule`` set
    before it was bounded) as the nearest of them.
    """
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "9999-12-31T23:59:59Z" if t > 0 else "0001-01-01T00:00:00Z"


#: now, as ``received_at``
_received_at = PerSecond(iso_time)


def _writer_of(segment: str) -> str:
    """The writer id in a segment's name (``w1`` of ``w1-<seq>.q``)."""
    return segment.split("-", 1)[0]


def _segments(seg_dir: Path) -> list[str]:
    try:
        names = os.listdir(seg_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if SEGMENT_RE.match(n))


def _journals(path: Path) -> list[tuple[int, str]]:
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    found = []
    for n in names:
        m = JOURNAL_RE.match(n)
        if m:
            found.append((int(m.group(1), 16), n))
    return sorted(found)


# --------------------------------------------------------------------------
# writing


class SegmentWriter:
    """
    Appends messages to this writer's own segments in ``<path>/seg``.  Any
    process may have one (no queue lock needed); two live writers never
    share a segment.
    """

    def __init__(self, path: Path | str, writer: str = "0", lock_batches: bool = True) -> None:
        if not WRITER_RE.match(writer):
            raise ValueError(f"bad writer id {writer!r}")
        self.path = Path(path)
        self.seg_dir = self.path / SEG_DIR
        self.writer = writer
        #: hold each batch under a write lock until its sync has returned,
        #: for the owner's scan; the owner's own writer needs none (its
        #: scan skips this writer's segments, see QueueStore.scan_new)
        self.lock_batches = lock_batches
        self._fd: int | None = None
        self._name: str | None = None
        self._size = 0  # where the next record goes
        self._zeroed = 0  # the file's size: zeros from _size to here
        self._last_seq = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> str | None:
        """The name of the current segment, if one is open."""
        return self._name

    def create(self) -> None:
        self.seg_dir.mkdir(mode=0o750, parents=True, exist_ok=True)

    def _open_segment(self) -> None:
        seq = max(time.time_ns(), self._last_seq + 1)
        self._last_seq = seq
        name = f"{self.writer}-{seq:016x}{SEG_SUFFIX}"
        tmp = self.seg_dir / f".{name}{NEW_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            # Locked before it has its real name: the owner never mistakes
            # a segment being created for a dead one.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, self.seg_dir / name)
            _fsync_dir(self.seg_dir)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd, self._name, self._size, self._zeroed = fd, name, 0, 0

    def _abandon(self) -> None:
        fd, self._fd, self._name = self._fd, None, None
        if fd is not None:
            # A segment no writer holds ends with its last record: cut the
            # zeros (if this fails, recovery or compaction cuts them).
            with contextlib.suppress(OSError):
                if self._zeroed > self._size:
                    os.ftruncate(fd, self._size)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _zero_ahead(self, fd: int, end: int) -> None:
        """
        Fill the :data:`ZERO_AHEAD` bytes after *end* (the file's end, just
        written) with zeros, synced with the batch that made the file
        longer.  The next batches' records overwrite space the file already
        has: their ``fdatasync`` has no file size or block allocation to
        record, only the data (PostgreSQL fills its WAL segments with zeros
        first for the same reason).  A disk too full for the zeros keeps
        the records and does without (the zeros are cut back).
        """
        o = end
        try:
            while o < end + ZERO_AHEAD:
                o += os.pwrite(fd, memoryview(_ZEROS)[: end + ZERO_AHEAD - o], o)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            o = end
        self._zeroed = o

    def close(self) -> None:
        with self._lock:
            self._abandon()

    def append_batch(self, messages: Iterable[Submission]) -> list[tuple[str, Entry] | QueueError]:
        """
        Append *messages* with one ``fdatasync``; for each, its index entry
        (with the segment and offset) or its :class:`QueueError`.  Nothing
        is acknowledged before the sync has returned.
        """
        with self._lock:
            return self._append(list(messages))

    def _append(self, messages: list[Submission]) -> list[tuple[str, Entry] | QueueError]:
        results: list[tuple[str, Entry] | QueueError] = []
        # (result index, envelope, its encoding, body)
        encoded: list[tuple[int, dict[str, Any], bytes, bytes]] = []
        seen: set[str] = set()
        for message in messages:
            mid = message.id
            try:
                if mid in seen:
                    raise ValueError("duplicate id in batch")
                seen.add(mid)
                meta = message.values_now()
                data = bytes(message.data)
                addresses = [message.sender, *message.recipients]
                envelope = {
                    "id": mid,
                    # a message imported from 0.1's spool keeps its own
                    "received_at": getattr(message, "received_at", None) or _received_at(),
                    "mail_from": message.sender,
                    "rcpt_to": list(message.recipients),
                    "meta": meta,
                    "smtputf8": bool(meta.get("smtputf8"))
                    or not all(a.isascii() for a in addresses),
                    "size": len(data),
                }
                dsn = getattr(message, "dsn", None)
                if dsn:
                    # RFC 3461's RET, ENVID, NOTIFY and ORCPT, for the relay
                    envelope["dsn"] = dsn
                encoded.append((len(results), envelope, encode_envelope(envelope), data))
                results.append(QueueError(f"cannot queue {mid}: not written"))
            except (ValueError, TypeError, AttributeError) as e:
                results.append(QueueError(f"cannot queue {mid}: {e}"))
        if not encoded:
            return results
        acknowledged: int | None = None
        try:
            if self._fd is None or self._size >= SEGMENT_MAX:
                self._abandon()
                self._open_segment()
            fd, name = self._fd, self._name
            assert fd is not None and name is not None
            acknowledged = self._size
            # Until its sync has returned, the batch is under a write lock
            # (POSIX, from its start to the end of the file): the owner's
            # scan leaves what it covers for later (QueueStore.scan_new),
            # so another process never relays a record before it is durable.
            if self.lock_batches:
                fcntl.lockf(fd, fcntl.LOCK_EX, 0, acknowledged)
            buffers: list[bytes] = []
            placed: list[tuple[int, Header]] = []
            o = self._size
            for n, (_, _, env, body) in enumerate(encoded):
                crc = zlib.crc32(body)
                flags = FIRST if n == 0 else 0
                buffers += (_header(env, len(body), crc, flags), env, body)
                placed.append((o, Header(flags, len(env), len(body), crc, 0)))
                o += HEADER_SIZE + len(env) + len(body)
            _write_all(fd, buffers, acknowledged)
            self._size = o
            if o > self._zeroed:  # the records made the file longer
                self._zero_ahead(fd, o)
            os.fdatasync(fd)
            if self.lock_batches:
                fcntl.lockf(fd, fcntl.LOCK_UN, 0, acknowledged)
        except OSError as e:
            # The segment may now end in a torn or unsynced batch: cut it
            # back to what was acknowledged (a full disk gets its space
            # back) and never append to it again (recovery truncates what
            # a failed cut leaves).
            if self._fd is not None and acknowledged is not None:
                self._size = acknowledged  # _abandon cuts here if this fails
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, acknowledged)
                    self._zeroed = acknowledged
            self._abandon()
            reason = e.strerror or str(e)
            for i, *_ in encoded:
                results[i] = QueueError(f"cannot queue {messages[i].id}: {reason}")
            return results
        for (i, envelope, _, _), (off, header) in zip(encoded, placed, strict=True):
            results[i] = (messages[i].id, _entry(self.seg_dir, name, off, header, envelope))
        return results


# --------------------------------------------------------------------------
# the owner

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run *method* holding the store's mutex."""

    @functools.wraps(method)
    def wrapper(self: QueueStore, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class QueueStore:
    """
    The queue as its owner sees it: the only process that relays, keeps
    the journal, recovers and compacts.  Get one with :meth:`open`.
    """

    def __init__(self, path: Path | str, writer: str = "0") -> None:
        self.path = Path(path)
        self.seg_dir = self.path / SEG_DIR
        # The owner indexes its own batches after their sync, and its scan
        # skips its own segments: no batch locks (two fcntl calls each).
        self.writer = SegmentWriter(self.path, writer, lock_batches=False)
        self._lock_fd: int | None = None
        #: what recovery found that the operator should read: (level, line)
        #: pairs, "info", "warn" or "error", for the caller to log
        self.recovery_notes: list[tuple[str, str]] = []
        self._index: dict[str, Entry] = {}
        # segment name -> [bytes scanned, ids still live]
        self._segs: dict[str, _SegInfo] = {}
        # done/deleted ids whose segment still exists (journal must keep them)
        self._done: dict[str, str] = {}
        self._claimed: set[str] = set()
        # what is due now, in the order it became due (oldest first)
        self._ready: dict[str, None] = {}
        # (next attempt, id) of the rest; stale pairs are skipped
        self._later: list[tuple[float, str]] = []
        self._journal_fd: int | None = None
        self._journal_seq = 0
        self._journal_lines = 0
        self._journal_dirty = False
        self._journal_bad = False
        #: offset past the journal's last complete line
        self._journal_end = 0
        #: why the journal lags memory (a write that failed: a full disk),
        #: None when it does not; the next write or flush rewrites it whole
        self.journal_behind: str | None = None
        self._catch_up_at = 0.0
        #: inside one_sync(): synced lines wait for its one fdatasync
        self._sync_later = False
        self._mutex = threading.RLock()
        #: one flush at a time: a second waits for the first's sync, which
        #: runs without the mutex, instead of returning before it is done
        self._flushing = threading.Lock()

    # -- opening -------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, writer: str = "0") -> QueueStore:
        """
        Take the queue's lock (or raise :class:`QueueLocked`), recover and
        index it.  Raises :class:`QueueError` (``OSError`` wrapped) if the
        directory cannot be used.
        """
        store = cls(path, writer)
        try:
            store._lock()
            store._recover()
            store._import_legacy()
        except QueueError:
            store.close()
            raise
        except OSError as e:
            store.close()
            raise QueueError(f"{store.path}: cannot open the queue: {e}") from None
        return store

    def _lock(self) -> None:
        self.path.mkdir(mode=0o750, parents=True, exist_ok=True)
        lock = self.path / LOCK_NAME
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise QueueLocked(
                f"{self.path}: the queue is in use by another kumoauth{who}; not starting"
            ) from None
        self._lock_fd = fd
        self.note_pid()

    def note_pid(self) -> None:
        """
        Write this process's id into the lock file, for the messages that
        name the queue's owner.  Again once twistd has daemonized: the
        lock (``flock``) goes with the forked process, the id written
        before the fork does not.
        """
        fd = self._lock_fd
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # only a message's detail

    def _recover(self) -> None:
        self.writer.create()
        self._remove_stale_new()
        states = self._read_journal()
        for name in _segments(self.seg_dir):
            self._recover_segment(name)
        rewrite = False
        for mid, state in states.items():
            op = state.get("op")
            entry = self._index.get(mid)
            if entry is None:
                rewrite = True  # its segment is gone: the line is dead
                continue
            if op in TERMINAL:
                self._forget(entry)
                self._done[mid] = entry.segment
            else:
                _apply_state(entry, state)
        self._ready.clear()
        for mid in sorted(self._index):
            self._schedule(self._index[mid])
        self._open_journal(rewrite)

    def _import_legacy(self) -> None:
        """
        Move the messages kumoauth 0.1 left in this directory
        (:mod:`kumoauth.storage.legacy`) into the queue, each pair removed
        once the queue has synced it, and say so in one note.  One that
        cannot be read stays where it is, named in a note; a write that
        fails stops the import (the rest is tried at the next start).
        """
        ids, json_only, eml_only = legacy.listing(self.path)
        left = [f"{mid} (no .eml)" for mid in json_only]
        try:
            removed = legacy.remove_incomplete(self.path, eml_only)
        except OSError as e:
            removed = 0
            left.append(f"what 0.1 never acknowledged cannot be removed ({e.strerror or e})")
        if not ids and not removed and not left:
            return
        moved = 0
        stopped = ""
        for group in legacy.batches(self.path, ids):
            loaded: list[legacy.LegacyMessage] = []
            for mid in group:
                try:
                    loaded.append(legacy.load(self.path, mid))
                except (OSError, ValueError) as e:
                    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    left.append(f"{mid} ({why})")
            results = self.append_batch(loaded)
            for message, result in zip(loaded, results, strict=True):
                if isinstance(result, QueueError) and not self._has(message.id):
                    stopped = str(result)
                    continue
                moved += 1
                try:
                    legacy.remove(self.path, message.id)  # queued now, or before a crash
                except OSError as e:
                    # Queued: the next start finds its id queued and only
                    # tries the removal again; nothing is sent twice.
                    left.append(f"{message.id} (queued, but not removed: {e.strerror or e})")
            with contextlib.suppress(OSError):
                _fsync_dir(self.path)
            if stopped:
                break
        text = (
            f"{self.path}: moved {moved} message(s) kumoauth 0.1 had accepted into the queue"
            f" (its <id>.eml/<id>.json spool format)"
        )
        if removed:
            text += f"; removed {removed} file(s) of messages 0.1 never acknowledged"
        if moved or removed:
            self.recovery_notes.append(("info", text))
        if left:
            self.recovery_notes.append(
                (
                    "warn",
                    f"{self.path}: {len(left)} of kumoauth 0.1's file(s) stay where they are:"
                    f" {', '.join(left[:5])}{' …' if len(left) > 5 else ''}",
                )
            )
        if stopped:
            self.recovery_notes.append(
                (
                    "warn",
                    f"{self.path}: moving kumoauth 0.1's messages stopped: {stopped}; the rest"
                    " stay where they are and are moved at the next start",
                )
            )

    def _has(self, mid: str) -> bool:
        with self._mutex:
            return mid in self._index or mid in self._done

    def _remove_stale_new(self) -> None:
        for n in os.listdir(self.seg_dir):
            if n.startswith(".") and n.endswith(NEW_SUFFIX):
                fd = _try_flock(self.seg_dir / n)
                if fd is not None:  # a crash between create and rename
                    with contextlib.suppress(OSError):
                        os.unlink(self.seg_dir / n)
                    os.close(fd)

    def _recover_segment(self, name: str) -> None:
        path = self.seg_dir / name
        fd = _try_flock(path)
        dead = fd is not None
        try:
            with open(path, "rb", buffering=1 << 20) as f:
                size = os.fstat(f.fileno()).st_size
                # The last batch's bodies are checked whether or not a
                # writer holds the segment: a live writer may be writing it
                # into its zeros right now, or syncing it (then it is
                # indexed later, by scan_new); a dead one's is cut below.
                scan = _scan_segment(f, self.seg_dir, name, 0, size, check_last_batch=True)
                if not dead:
                    scan = _settled(f.fileno(), scan)
                elif not scan.clean:
                    self._salvage(f, name, scan, size)
            if dead and not scan.clean:
                # A torn tail no writer will complete: it was never
                # acknowledged (its batch's fdatasync did not return).
                assert fd is not None
                os.ftruncate(fd, scan.end)
                os.fsync(fd)
            if dead and scan.end == 0:
                os.unlink(path)
                _fsync_dir(self.seg_dir)
                return
        finally:
            if fd is not None:
                os.close(fd)
        self._segs[name] = _SegInfo(scan.end)
        self._add(scan.entries)

    def _salvage(self, f: IO[bytes], name: str, scan: _Scan, size: int) -> None:
        """
        *scan* of a segment no writer holds stopped before its end, and the
        caller cuts it there: noted, as damage (:meth:`_damaged`) or as a
        torn tail that held anything but the zeros written ahead.
        """
        if self._damaged(f, name, scan.end, size):
            return
        if _nonzero(f, scan.end, size):
            self.recovery_notes.append(
                (
                    "warn",
                    f"queue segment {name}: cut {size - scan.end} bytes at its end, a write that "
                    "never finished (its messages were never acknowledged)",
                )
            )

    def _damaged(self, f: IO[bytes], name: str, end: int, size: int) -> bool:
        """
        True (and noted) if the bad bytes at *end* of segment *name* are
        damage to acknowledged mail rather than a torn last batch.  A writer
        starts a batch only once the one before is synced, so a crash can
        tear only the last batch; bad bytes followed by the start of a later
        batch are damage.  The segment is copied to ``damaged/`` (once)
        before it is cut or removed.  What follows the damage is not taken
        back into the queue: a record is not bound to where it lies, so one
        found by searching could be bytes inside a message body.
        """
        at, later = end, False
        while not later and (found := _resync(f, self.seg_dir, name, at, size)) is not None:
            later = any(_batch_start(f, e.offset) for e in found.entries)
            at = found.end
        if not later:
            return False
        copy = self.path / DAMAGED_DIR / name
        try:
            copy.parent.mkdir(mode=0o750, exist_ok=True)
            if not copy.exists():
                tmp = copy.with_name(copy.name + ".tmp")
                with open(tmp, "wb") as out:
                    f.seek(0)
                    while chunk := f.read(1 << 20):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, copy)
            kept = f"a copy of the segment is at {copy}"
        except OSError as e:
            kept = f"it could not be copied ({e.strerror or e})"
        self.recovery_notes.append(
            (
                "error",
                f"queue segment {name} is damaged at byte {end} of {size} (not an unfinished "
                f"write: a later batch follows): the messages stored from there on cannot be "
                f"read and leave the queue; {kept}",
            )
        )
        return True

    def take_notes(self) -> list[tuple[str, str]]:
        """:attr:`recovery_notes` so far, emptied (compaction adds to them)."""
        with self._mutex:
            notes, self.recovery_notes = self.recovery_notes, []
        return notes

    def _add(self, entries: list[Entry]) -> list[Entry]:
        added = []
        for e in entries:
            if e.id in self._index or e.id in self._done:
                continue  # an id written twice (never by kumoauth): first wins
            self._index[e.id] = e
            self._ready[e.id] = None
            info = self._segs.get(e.segment)
            if info is None:
                info = self._segs[e.segment] = _SegInfo(0)
            info.live.add(e.id)
            added.append(e)
        return added

    def _schedule(self, e: Entry) -> None:
        """Put *e* where :meth:`due` finds it when its time comes."""
        self._ready.pop(e.id, None)
        if e.held:
            return
        if e.next_attempt <= 0:
            self._ready[e.id] = None
        else:
            heapq.heappush(self._later, (e.next_attempt, e.id))

    def _forget(self, entry: Entry) -> None:
        self._index.pop(entry.id, None)
        self._ready.pop(entry.id, None)
        self._claimed.discard(entry.id)
        info = self._segs.get(entry.segment)
        if info is not None:
            info.live.discard(entry.id)

    # -- journal -------------------------------------------------------

    def _read_journal(self) -> dict[str, dict[str, Any]]:
        journals = _journals(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / JOURNAL_TMP)
        states: dict[str, dict[str, Any]] = {}
        if not journals:
            return states
        seq, name = journals[-1]
        for _, old in journals[:-1]:  # a compaction that crashed before its unlink
            os.unlink(self.path / old)
        self._journal_seq = seq
        lines, good_end, bad = _parse_journal(self.path / name, states)
        self._journal_lines = lines
        if bad:
            self._journal_bad = True  # rewritten (without the bad lines) below
            self.recovery_notes.append(
                (
                    "warn",
                    f"{self.path / name}: {bad} unreadable journal lines skipped (the "
                    "messages they were about keep their earlier state)",
                )
            )
        else:
            with open(self.path / name, "r+b") as f:
                if os.fstat(f.fileno()).st_size != good_end:
                    f.truncate(good_end)  # a torn last line
                    os.fsync(f.fileno())
        return states

    def _open_journal(self, rewrite: bool) -> None:
        if rewrite or self._journal_seq == 0 or self._journal_bad:
            self._rewrite_journal()
            return
        name = self._journal_name(self._journal_seq)
        self._journal_fd = os.open(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._journal_end = os.fstat(self._journal_fd).st_size

    @staticmethod
    def _journal_name(seq: int) -> str:
        return f"journal-{seq:016x}.log"

    def _live_lines(self) -> list[bytes]:
        lines = []
        for e in self._index.values():
            if e.attempts or e.rcpts or e.last_error or e.next_attempt or e.held:
                lines.append(_jline(_state_line(e)))
        for mid in self._done:
            lines.append(_jline({"id": mid, "op": "done"}))
        return lines

    def _rewrite_journal(self) -> None:
        """
        Write a journal holding only what is still needed, and rename it in.
        """
        lines = self._live_lines()
        tmp = self.path / JOURNAL_TMP
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, lines)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # what it holds is space a full disk needs
            raise
        os.close(fd)
        old_seq = self._journal_seq
        seq = old_seq + 1
        name = self._journal_name(seq)
        os.rename(tmp, self.path / name)
        _fsync_dir(self.path)
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if old_seq:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / self._journal_name(old_seq))
        self._journal_seq = seq
        self._journal_lines = len(lines)
        self._journal_fd = os.open(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._journal_end = sum(len(line) for line in lines)
        self._journal_dirty = False
        self._journal_bad = False
        self.journal_behind = None

    def _journal(self, record: dict[str, Any], sync: bool) -> None:
        """
        Append *record* (fdatasynced with *sync*).  A write that fails is
        cut back to the last complete line, so the next line is not glued
        to a torn one (recovery would drop both), and ``OSError`` raised;
        the journal is then rewritten whole from memory before the next
        line.
        """
        if self._journal_fd is None:
            raise QueueError(f"{self.path}: the queue is closed")
        if self.journal_behind is not None:
            self._rewrite_journal()  # from memory, which holds every change
        line = _jline(record)
        end = self._journal_end
        try:
            _write_all(self._journal_fd, [line])
            if sync and not self._sync_later:
                # A sync that fails is a write that failed: the line must
                # not take effect at the next start when the operator was
                # told it did not.
                os.fdatasync(self._journal_fd)
        except OSError as e:
            self.journal_behind = f"{self.path}: the journal: {e.strerror or e}"
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal_fd, end)
            raise
        self._journal_end = end + len(line)
        self._journal_lines += 1
        self._journal_dirty = not sync or self._sync_later

    @contextlib.contextmanager
    def one_sync(self) -> Iterator[None]:
        """
        The operator's changes made inside (``hold``, ``release``,
        ``delete``) share one ``fdatasync`` at the end instead of one each:
        a bulk request changes thousands of messages, on the reactor
        thread.  ``OSError`` if that sync fails.
        """
        with self._mutex:
            self._sync_later = True
            try:
                yield
            finally:
                self._sync_later = False
            if self._journal_dirty and self._journal_fd is not None:
                os.fdatasync(self._journal_fd)
                self._journal_dirty = False

    def _catch_up(self) -> None:
        """
        Rewrite the lagging journal from memory; ``OSError`` while it still
        cannot be written.  Tried at most every :data:`CATCH_UP_EVERY`
        seconds (with a large queue the rewrite is work), in between the
        reason it lags is raised again.
        """
        now = time.monotonic()
        if now < self._catch_up_at:
            raise OSError(errno.EIO, self.journal_behind or "the journal lags")
        self._catch_up_at = now + CATCH_UP_EVERY
        free = os.statvfs(self.path)
        if free.f_bavail * free.f_frsize < CATCH_UP_ROOM:
            # Plainly full: not worth building the whole journal (under the
            # mutex the reactor waits on) to find out.
            raise OSError(errno.ENOSPC, f"{self.path}: no space left for the journal")
        self._rewrite_journal()

    def _journal_later(self, record: dict[str, Any]) -> None:
        """
        :meth:`_journal` for a change memory has already made (the relay's
        outcomes): if it cannot be written, memory stays ahead and the
        journal catches up with its next write or :meth:`flush` (a crash
        meanwhile sends a message again: at-least-once).  While the journal
        lags, nothing is tried here: the catch-up writes the whole journal,
        which is the housekeeping thread's to try, not each relay outcome's
        on the reactor thread.
        """
        if self.journal_behind is not None:
            return
        with contextlib.suppress(OSError):
            self._journal(record, sync=False)

    def flush(self) -> None:
        """
        Make every journal line written so far durable (one fdatasync).

        The sync runs without the store's mutex, on a descriptor of its
        own: under a burst of large messages the disk can take seconds to
        sync even a small file (its size changed: the file system's journal
        commits, and waits for the data written before it), and every call
        of the reactor thread (a delivery's ``done``, a new message's
        index entry) would wait on the mutex as long.
        """
        with self._flushing:
            with self._mutex:
                if self.journal_behind is not None and self._journal_fd is not None:
                    self._catch_up()
                    return
                if not self._journal_dirty or self._journal_fd is None:
                    return
                fd = os.dup(self._journal_fd)
                self._journal_dirty = False  # lines written from here on set it again
            try:
                os.fdatasync(fd)
            except OSError:
                with self._mutex:
                    self._journal_dirty = True
                raise
            finally:
                os.close(fd)

    # -- appending and tailing ----------------------------------------

    def append_batch(self, messages: Iterable[Submission]) -> list[str | QueueError]:
        """
        Append *messages* through this process's own writer (one fdatasync
        for the batch) and index them; each one's id or its error.
        """
        batch = list(messages)
        results: list[str | QueueError] = []
        with self._mutex:
            for m in batch:
                if m.id in self._index or m.id in self._done:
                    results.append(QueueError(f"cannot queue {m.id}: id already queued"))
                else:
                    results.append(m.id)
        todo = [m for m, r in zip(batch, results, strict=True) if isinstance(r, str)]
        # The write and its fdatasync happen outside the mutex: a scheduler
        # thread keeps using the index meanwhile.
        written = iter(self.writer.append_batch(todo))
        with self._mutex:
            self._index_appended(results, written)
        return results

    def _index_appended(
        self, results: list[str | QueueError], written: Iterator[tuple[str, Entry] | QueueError]
    ) -> None:
        for i, r in enumerate(results):
            if isinstance(r, str):
                w = next(written)
                if isinstance(w, QueueError):
                    results[i] = w
                else:
                    entry = w[1]
                    self._add([entry])
                    info = self._segs[entry.segment]
                    info.scanned = max(info.scanned, entry.body_offset + entry.body_len)

    @_locked
    def scan_new(self) -> list[Entry]:
        """
        Index the records appended since the last scan, by any writer
        (this process's own appends are indexed already).  Cheap when
        nothing changed: a directory listing and a stat per segment, and
        for a segment with zeros after its last record (a writer's current
        one), a read of the 32 bytes there.
        """
        new: list[Entry] = []
        own = self.writer.writer
        for name in _segments(self.seg_dir):
            if _writer_of(name) == own:
                # Ours (this run's: an earlier run's were recovered): indexed
                # as each batch is stored, after its sync.  A scan could see
                # one between its write and its sync, and our own write lock
                # does not stop our own probe.  By writer id, not by the
                # current segment's name: the writer thread may be opening
                # the next one while we look.
                continue
            info = self._segs.get(name)
            scanned = info.scanned if info is not None else 0
            path = self.seg_dir / name
            try:
                size = os.stat(path).st_size
                if size <= scanned or not _header_at(path, scanned):
                    continue
            except FileNotFoundError:
                continue
            try:
                with open(path, "rb", buffering=1 << 20) as f:
                    # A writer may be writing the last batch right now, into
                    # space it has already filled with zeros (the file size
                    # says nothing): its bodies are checksummed, and a record
                    # not all there yet waits for the next scan.
                    scan = _scan_segment(
                        f, self.seg_dir, name, scanned, size, check_last_batch=True
                    )
                    scan = _settled(f.fileno(), scan)
            except FileNotFoundError:
                continue
            if info is None:
                info = self._segs[name] = _SegInfo(0)
            info.scanned = scan.end
            new.extend(self._add(scan.entries))
        return new

    # -- reading -------------------------------------------------------

    @_locked
    def __len__(self) -> int:
        return len(self._index)

    @_locked
    def __contains__(self, mid: object) -> bool:
        return mid in self._index

    @_locked
    def ids(self) -> list[str]:
        """Live ids, oldest first."""
        return sorted(self._index)

    @_locked
    def entries(self) -> list[Entry]:
        """Live entries with their state, oldest first."""
        return [self._index[mid] for mid in sorted(self._index)]

    @_locked
    def get(self, mid: str) -> Entry:
        """The live entry *mid*; ``KeyError`` if there is none."""
        return self._index[mid]

    def read_message(self, mid: str) -> bytes:
        """The message bytes of *mid*, checksummed (:class:`QueueCorrupt`)."""
        with self._mutex:
            entry = self._index[mid]
        return _read_body(self.seg_dir, entry)

    def read_head(self, mid: str, limit: int) -> bytes:
        """
        At most the first *limit* bytes of *mid*'s message, not checksummed:
        enough for a report that returns the header section, without
        reading a large message whole.
        """
        with self._mutex:
            e = self._index[mid]
        return _read_at(self.seg_dir, e, e.body_offset, min(limit, e.body_len))

    @_locked
    def read_envelope(self, mid: str) -> dict[str, Any]:
        """The full envelope of *mid* (with ``meta``), from disk."""
        return _read_envelope(self.seg_dir, self._index[mid])

    @_locked
    def message_path(self, mid: str) -> tuple[Path, int, int]:
        """Where *mid*'s bytes are: (segment path, offset, length)."""
        e = self._index[mid]
        return self.seg_dir / e.segment, e.body_offset, e.body_len

    # -- claiming (in memory: only the lock holder relays) -------------

    def due(self, now: float | None = None) -> Iterator[Entry]:
        """
        Entries to relay now (next attempt reached, not held, not claimed),
        oldest first, yielded lazily: stop when no more can be started, and
        the rest stay due.  Costs what is consumed, not the queue's size.
        """
        now = time.time() if now is None else now
        with self._mutex:
            later = self._later
            while later and later[0][0] <= now:
                t, mid = heapq.heappop(later)
                e = self._index.get(mid)
                if e is not None and not e.held and e.next_attempt == t:
                    self._ready[mid] = None
            ids = list(self._ready)
        for mid in ids:
            with self._mutex:
                e = self._index.get(mid)
                if e is None or e.held or mid in self._claimed or mid not in self._ready:
                    continue
            yield e

    @_locked
    def claim(self, mid: str) -> bool:
        """
        Mark *mid* as being relayed; False if it is claimed already, held,
        or not queued.
        """
        e = self._index.get(mid)
        if e is None or e.held or mid in self._claimed:
            return False
        self._claimed.add(mid)
        return True

    @_locked
    def release_claim(self, mid: str) -> None:
        self._claimed.discard(mid)

    @_locked
    def is_claimed(self, mid: str) -> bool:
        return mid in self._claimed

    # -- state changes -------------------------------------------------

    @_locked
    def deferred(
        self,
        mid: str,
        attempts: int,
        next_attempt: float,
        error: str | None,
        rcpts: dict[str, str] | None = None,
    ) -> None:
        """
        Record a failed attempt (journalled; durable at the next :meth:`flush`).
        """
        e = self._index[mid]
        e.attempts, e.next_attempt, e.last_error = attempts, next_attempt, error
        if rcpts is not None:
            e.rcpts = dict(rcpts)
        self._schedule(e)
        self._journal_later(_state_line(e))

    #: the name the scheduler uses
    defer = deferred

    def make_due(self, now: float) -> int:
        """
        Every deferred message that is not held due at *now* (``spool
        flush``, or the upstream answering again); how many.
        """
        n = 0
        for entry in self.entries():
            if not entry.held and entry.next_attempt > now:
                self.deferred(entry.id, entry.attempts, now, entry.last_error)
                n += 1
        return n

    @_locked
    def hold(self, mid: str) -> None:
        """Keep *mid* from being relayed until :meth:`release` (synced at once)."""
        e = self._index[mid]
        # Synced first: an operator told "held" must find it held after a
        # crash; told it failed (a full disk), finds nothing changed.
        self._journal({"id": mid, "op": "held"}, sync=True)
        e.held = True
        self._ready.pop(mid, None)

    @_locked
    def release(self, mid: str) -> None:
        e = self._index[mid]
        self._journal({"id": mid, "op": "released"}, sync=True)
        e.held = False
        self._schedule(e)

    @_locked
    def done(self, mid: str, outcome: str = "delivered") -> None:
        """
        *mid* leaves the queue (delivered or bounced).  Written to the
        journal at once but fdatasynced only by :meth:`flush`: lost to a
        power cut before that, the message is sent again (at-least-once).
        """
        e = self._index[mid]
        self._forget(e)
        self._done[mid] = e.segment
        self._journal_later({"id": mid, "op": "done", "outcome": outcome})

    @_locked
    def delete(self, mid: str) -> None:
        """*mid* leaves the queue without being sent (synced at once)."""
        e = self._index[mid]
        self._journal({"id": mid, "op": "deleted"}, sync=True)
        self._forget(e)
        self._done[mid] = e.segment

    # -- compaction ----------------------------------------------------

    def compact(self) -> tuple[list[str], bool]:
        """
        Delete every segment whose messages have all left the queue (and
        that no writer holds), then rewrite the journal if more than half
        of it is dead.  Returns (segments removed, journal rewritten).

        A journal that cannot be written (a full disk) does not keep the
        segments: a deleted segment's messages are gone whatever the
        journal says of them, and their space may be what it needs.

        The journal's and the directory's syncs run without the mutex
        (:meth:`flush` says why).
        """
        if self.journal_behind is None:  # lagging, the catch-up below is tried
            with contextlib.suppress(OSError):
                self.flush()
        with self._mutex:
            removed = self._remove_dead_segments()
        if removed:
            # Segments go before the journal forgets their done ids: a crash
            # in between must not bring delivered messages back.
            _fsync_dir(self.seg_dir)
        with self._mutex:
            return removed, self._forget_segments(removed)

    def _remove_dead_segments(self) -> list[str]:
        removed = []
        for name, info in list(self._segs.items()):
            if info.live or name == self.writer.current:
                continue
            path = self.seg_dir / name
            fd = _try_flock(path)
            if fd is None:
                continue  # a live writer's current segment
            try:
                size = os.fstat(fd).st_size
                if size > info.scanned and not self._only_a_tail(fd, name, info.scanned, size):
                    continue  # records we have not indexed yet
                os.unlink(path)
            finally:
                os.close(fd)
            del self._segs[name]
            removed.append(name)
        return removed

    def _forget_segments(self, removed: list[str]) -> bool:
        """
        The done ids of the *removed* segments (their removal synced) leave
        memory, and the journal is rewritten if more than half of it is
        dead: whether it was.
        """
        if removed:
            self._catch_up_at = 0.0  # space freed: a lagging journal may fit now
            gone = set(removed)
            self._done = {m: s for m, s in self._done.items() if s not in gone}
        if self._lock_fd is None:
            return False  # closed during the directory's sync: no journal to write
        live = len(self._done) + sum(
            1
            for e in self._index.values()
            if e.attempts or e.rcpts or e.last_error or e.next_attempt or e.held
        )
        rewrite = self._journal_lines >= JOURNAL_COMPACT_MIN and live * 2 < self._journal_lines
        if self.journal_behind is not None:
            self._catch_up()  # raises while it still cannot be written
        elif rewrite:
            self._rewrite_journal()
        return rewrite

    def _only_a_tail(self, fd: int, name: str, scanned: int, size: int) -> bool:
        """
        True if what segment *name* (*fd*, locked by us: no writer) holds
        from *scanned* to *size* is no record: a writer's zeros, or a batch
        it never finished, left by a writer that died.
        """
        with open(os.dup(fd), "rb", buffering=1 << 20) as f:
            scan = _scan_segment(f, self.seg_dir, name, scanned, size, check_last_batch=True)
            if scan.entries:
                return False
            # Bad bytes where the scan stopped: a torn tail, or damage
            # (noted, and the segment copied) that nothing can read past.
            self._damaged(f, name, scanned, size)
        return True

    @_locked
    def rewrite_journal(self) -> None:
        """Rewrite the journal now (what :meth:`compact` does when it is worth it)."""
        self.flush()
        self._rewrite_journal()

    @_locked
    def close(self) -> None:
        """Flush the journal, close the writer, release the lock."""
        with contextlib.suppress(OSError):
            self.flush()
        self.writer.close()
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> QueueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SegInfo:
    __slots__ = ("scanned", "live")

    def __init__(self, scanned: int) -> None:
        self.scanned = scanned
        self.live: set[str] = set()


def _jline(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _state_line(e: Entry) -> dict[str, Any]:
    line: dict[str, Any] = {
        "id": e.id,
        "op": "deferred",
        "attempts": e.attempts,
        "next": e.next_attempt,
        "error": e.last_error,
        "rcpts": e.rcpts,
    }
    if e.held:
        line["held"] = True
    return line


def _apply_state(e: Entry, state: dict[str, Any]) -> None:
    e.attempts = int(state.get("attempts", 0))
    e.next_attempt = float(state.get("next", 0.0))
    e.last_error = state.get("error")
    rcpts = state.get("rcpts")
    e.rcpts = dict(rcpts) if isinstance(rcpts, dict) else None
    e.held = bool(state.get("held"))


def _merge(states: dict[str, dict[str, Any]], line: dict[str, Any]) -> None:
    """Fold one journal line into *states* (id -> the state so far)."""
    mid, op = line["id"], line.get("op")
    prev = states.get(mid)
    if prev is not None and prev.get("op") in TERMINAL:
        return
    if op == "deferred":
        state = dict(line)
        state["held"] = bool(line.get("held", prev.get("held") if prev else False))
        states[mid] = state
    elif op in ("held", "released"):
        state = dict(prev) if prev else {"id": mid, "op": "deferred"}
        state["held"] = op == "held"
        states[mid] = state
    elif op in TERMINAL:
        states[mid] = {"id": mid, "op": op}


def _parse_journal(path: Path, states: dict[str, dict[str, Any]]) -> tuple[int, int, int]:
    """
    Fold journal *path* into *states*.  Returns (lines read, offset past the
    last complete line, complete lines that were unreadable).
    """
    lines = 0
    good_end = 0
    bad = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a torn last line: never synced, never relied on
            good_end += len(raw)
            lines += 1
            try:
                line = json.loads(raw)
                if not isinstance(line, dict) or not isinstance(line.get("id"), str):
                    raise ValueError(raw)
            except ValueError:
                bad += 1
                continue
            _merge(states, line)
    return lines, good_end, bad


def _read_at(seg_dir: Path, e: Entry, offset: int, size: int) -> bytes:
    """
    *size* bytes at *offset* of *e*'s segment (fewer at its end);
    ``KeyError`` if the segment is gone (the message left the queue).
    """
    try:
        fd = os.open(seg_dir / e.segment, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyError(e.id) from None
    try:
        parts = []
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
    finally:
        os.close(fd)
    return b"".join(parts)


def _read_body(seg_dir: Path, e: Entry) -> bytes:
    body = _read_at(seg_dir, e, e.body_offset, e.body_len)
    if len(body) != e.body_len or zlib.crc32(body) != e.body_crc:
        raise QueueCorrupt(f"{seg_dir / e.segment}@{e.offset}: message {e.id} fails its checksum")
    return body


def _read_envelope(seg_dir: Path, e: Entry) -> dict[str, Any]:
    raw = _read_at(seg_dir, e, e.offset, HEADER_SIZE + e.env_len)
    header = decode_header(raw[:HEADER_SIZE])
    env = decode_envelope(header, raw[HEADER_SIZE:]) if header else None
    if env is None or env.get("id") != e.id:
        raise QueueCorrupt(f"{seg_dir / e.segment}@{e.offset}: envelope of {e.id} is damaged")
    return env


# --------------------------------------------------------------------------
# reading without the lock


@dataclass(frozen=True)
class QueuedMessage:
    """
    One queued message as a reader sees it (the shape of
    :class:`kumoauth.storage.spool.SpooledMessage`).
    """

    id: str
    envelope: dict[str, Any]
    entry: Entry
    seg_dir: Path

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.envelope.get("meta", {}))

    @property
    def size(self) -> int:
        return self.entry.body_len

    def read_bytes(self) -> bytes:
        return _read_body(self.seg_dir, self.entry)


class QueueReader:
    """
    A read-only view of a queue, safe while its owner runs (no lock, no
    writes): the segments and the journal as they are now.  A message the
    journal says is done or deleted is not listed.  :meth:`refresh` (done
    lazily by the first read) takes a new snapshot.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.seg_dir = self.path / SEG_DIR
        self._index: dict[str, Entry] | None = None

    def refresh(self) -> None:
        states: dict[str, dict[str, Any]] = {}
        for _ in range(5):  # the owner may rename a new journal in meanwhile
            journals = _journals(self.path)
            if not journals:
                break
            try:
                states.clear()
                _parse_journal(self.path / journals[-1][1], states)
                break
            except FileNotFoundError:
                continue
        index: dict[str, Entry] = {}
        for name in _segments(self.seg_dir):
            try:
                with open(self.seg_dir / name, "rb", buffering=1 << 20) as f:
                    size = os.fstat(f.fileno()).st_size
                    scan = _scan_segment(f, self.seg_dir, name, 0, size, check_last_batch=True)
            except FileNotFoundError:
                continue
            for e in scan.entries:
                index.setdefault(e.id, e)
        for mid, state in states.items():
            found = index.get(mid)
            if found is None:
                continue
            if state.get("op") in TERMINAL:
                del index[mid]
            else:
                _apply_state(found, state)
        self._index = index

    def _entries(self) -> dict[str, Entry]:
        if self._index is None:
            self.refresh()
        assert self._index is not None
        return self._index

    def ids(self) -> Iterator[str]:
        """Ids of queued messages, oldest first."""
        yield from sorted(self._entries())

    def entries(self) -> list[Entry]:
        index = self._entries()
        return [index[m] for m in sorted(index)]

    def get(self, mid: str) -> Entry:
        return self._entries()[mid]

    def read(self, mid: str) -> QueuedMessage:
        """
        One queued message; ``KeyError`` if there is none (or it has just
        left the queue).
        """
        e = self._entries().get(mid)
        if e is None:
            self.refresh()  # perhaps it arrived since the snapshot
            e = self._entries().get(mid)
            if e is None:
                raise KeyError(mid)
        try:
            env = _read_envelope(self.seg_dir, e)
        except QueueCorrupt:
            raise KeyError(mid) from None
        return QueuedMessage(id=mid, envelope=env, entry=e, seg_dir=self.seg_dir)

    def __iter__(self) -> Iterator[QueuedMessage]:
        for mid in self.ids():
            try:
                yield self.read(mid)
            except KeyError:
                continue
