"""
kumoauth 0.1's spool, read once so its messages move into the queue.

0.1 stored each accepted message as a pair in the spool directory:
``<id>.eml`` (the message, its ``Received:`` header included) and
``<id>.json`` (``id``, ``received_at``, ``mail_from``, ``rcpt_to``,
``meta``).  Both were written under ``tmp/`` as ``*.tmp``, then renamed
into place, the ``.json`` last: a pair is complete exactly when its
``.json`` exists, and an ``.eml`` without one was never acknowledged (0.1's
own start-up removed it, and ``tmp/``).

The queue's owner (:meth:`kumoauth.relay.queue.QueueStore.open`) imports
the complete pairs it finds, with their ids and arrival times, then
removes each pair once the queue has synced it; a crash in between leaves
a pair whose id is already queued, which the next start only removes.
Nothing here imports the queue: the owner drives it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kumoauth.storage.ids import is_id

EML = ".eml"
JSON = ".json"
TMP_DIR = "tmp"

#: at most this many bytes of messages are read for one queue batch
BATCH_BYTES = 32 * 1024 * 1024


def listing(path: Path) -> tuple[list[str], list[str], list[str]]:
    """
    What 0.1 left in *path*, as ids oldest first (ids sort by arrival):
    complete pairs, ``.json`` files without their ``.eml`` (0.1 never left
    one: its ``.eml`` came first) and ``.eml`` files without their
    ``.json`` (never acknowledged).  ``OSError`` if it cannot be listed.
    """
    stems: dict[str, set[str]] = {}
    for n in os.listdir(path):
        stem, dot, suffix = n.rpartition(".")
        if dot and is_id(stem) and "." + suffix in (EML, JSON):
            stems.setdefault(stem, set()).add("." + suffix)
    both: list[str] = []
    json_only: list[str] = []
    eml_only: list[str] = []
    for stem in sorted(stems):
        have = stems[stem]
        (both if len(have) == 2 else json_only if JSON in have else eml_only).append(stem)
    return both, json_only, eml_only


@dataclass
class LegacyMessage:
    """One 0.1 pair, in the shape :meth:`QueueStore.append_batch` takes."""

    id: str
    sender: str
    recipients: list[str]
    data: bytes
    received_at: str
    meta: dict[str, Any]

    def values_now(self) -> dict[str, Any]:
        return self.meta


def load(path: Path, mid: str) -> LegacyMessage:
    """
    Read the pair *mid*.  ``ValueError`` (saying what is wrong) if its
    ``.json`` is not what 0.1 wrote; ``OSError`` if a file cannot be read.
    """
    try:
        envelope = json.loads((path / f"{mid}{JSON}").read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(envelope, dict):
        raise ValueError("not a JSON object")
    sender = envelope.get("mail_from")
    recipients = envelope.get("rcpt_to")
    meta = envelope.get("meta", {})
    received_at = envelope.get("received_at")
    if not isinstance(sender, str):
        raise ValueError("no mail_from")
    if not (
        isinstance(recipients, list)
        and recipients
        and all(isinstance(r, str) and r for r in recipients)
    ):
        raise ValueError("no rcpt_to")
    if not isinstance(meta, dict):
        raise ValueError("meta is not an object")
    if not isinstance(received_at, str):
        raise ValueError("no received_at")
    try:
        json.dumps([sender, recipients, meta, received_at], ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        # the queue would refuse it (a lone surrogate, say): not for ever
        # at every start, stopping the rest
        raise ValueError(f"not storable ({e})") from None
    data = (path / f"{mid}{EML}").read_bytes()
    return LegacyMessage(mid, sender, list(recipients), data, received_at, dict(meta))


def batches(path: Path, ids: list[str]) -> list[list[str]]:
    """*ids* cut into groups of at most :data:`BATCH_BYTES` of messages."""
    out: list[list[str]] = []
    size = 0
    for mid in ids:
        try:
            n = (path / f"{mid}{EML}").stat().st_size
        except OSError:
            n = 0
        if not out or (out[-1] and size + n > BATCH_BYTES):
            out.append([])
            size = 0
        out[-1].append(mid)
        size += n
    return out


def remove(path: Path, mid: str) -> None:
    """
    Remove the pair *mid*, its commit record (``.json``) first, as 0.1
    undid a pair.  ``OSError`` if it cannot.
    """
    (path / f"{mid}{JSON}").unlink(missing_ok=True)
    (path / f"{mid}{EML}").unlink(missing_ok=True)


def remove_incomplete(path: Path, eml_only: list[str]) -> int:
    """
    Remove what 0.1 left of messages it never acknowledged, as its own
    start-up did: ``tmp/*.tmp`` (and ``tmp/`` once empty) and the ``.eml``
    files without a ``.json`` (*eml_only*, from :func:`listing`).  Returns
    how many files went.  ``OSError`` if one cannot be removed.
    """
    removed = 0
    tmp = path / TMP_DIR
    if tmp.is_dir():
        for p in tmp.iterdir():
            if p.name.endswith(".tmp") and is_id(p.name.split(".", 1)[0]):
                p.unlink(missing_ok=True)
                removed += 1
        try:
            tmp.rmdir()
        except OSError:
            pass  # something else is in it: not ours to remove
    for stem in eml_only:
        (path / f"{stem}{EML}").unlink(missing_ok=True)
        removed += 1
    return removed


def count(path: Path) -> int:
    """How many complete 0.1 pairs *path* holds (0 if it cannot be listed)."""
    try:
        return len(listing(path)[0])
    except OSError:
        return 0
