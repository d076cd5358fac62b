"""
The relay's delivery reports on large messages: the reactor's CPU for one
attempt whose only recipient the upstream refuses (``550``), the bounce
built and handed to a store that keeps it in memory (the queue write is
not counted), measured in process.

The scheduler is kumoauth's own (:class:`kumoauth.relay.scheduler.Relay`)
over a real queue in a temporary directory, with the real report builder;
the upstream session is a stand-in that answers at once, and the message
read the relay does in a thread for a large message is done in line, so
that everything the attempt costs is counted (``time.process_time``).
Cases: 4 MB and 25 MB messages of 76- and 997-octet lines, with the
sender asking ``RET=FULL`` or not.  Prints one JSON object: seconds of
CPU and the report's size per case.

    python -m bench.reports [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from kumoauth.config import RelayConfig
from kumoauth.ops.metrics import Metrics
from kumoauth.relay import dsn, scheduler
from kumoauth.relay.client import RecipientResult, SendResult
from kumoauth.relay.queue import QueueStore
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import new_id

REFUSED = RecipientResult(550, "5.1.1", "no such user")


class _Refusing:
    """An upstream session that refuses every recipient at once."""

    reusable = False
    extensions: dict[str, str] = {}

    async def transaction(self, message: Any) -> SendResult:
        return SendResult(dict.fromkeys(message.rcpt_to, REFUSED))

    def abort(self) -> None:
        pass

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


def one_attempt(size: int, line: int, ret: str | None) -> tuple[float, int]:
    """CPU seconds of the attempt, and the report's size in octets."""
    with tempfile.TemporaryDirectory() as directory:
        store = QueueStore.open(Path(directory) / "q")
        body = b"Subject: big\r\n\r\n" + (b"a" * line + b"\r\n") * (size // (line + 2))
        message = Message(new_id(), "a@example.com", ["x@example.net"], body, {})
        message.dsn = {"ret": ret} if ret else None
        store.append_batch([message])
        reports: list[bytes] = []

        def store_bounce(data: bytes, sender: str) -> defer.Deferred[str]:
            reports.append(data)
            return defer.succeed("B")

        def connect(*args: object, **kwargs: object) -> defer.Deferred[object]:
            return defer.succeed(_Refusing())

        settings = scheduler.RelaySettings(RelayConfig(host="127.0.0.1"), "relay.test")
        clock = Clock()
        relay = scheduler.Relay(
            store, settings, clock, Metrics(), connect, store_bounce, dsn.build_dsn
        )
        started = time.process_time()
        relay.startService()
        clock.advance(0)
        spent = time.process_time() - started
        relay.stopService()
        store.close()
        return spent, len(reports[0]) if reports else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reports", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 MB only")
    args = parser.parse_args()
    # the attempt's own read of a large message, in line (see above)
    scheduler.threads.deferToThread = defer.maybeDeferred  # type: ignore[assignment]
    sizes = [4_000_000] if args.quick else [4_000_000, 25_000_000]
    out = {}
    for size in sizes:
        for line in (76, 997):
            for ret in (None, "FULL"):
                spent, length = one_attempt(size, line, ret)
                name = f"{size // 1_000_000} MB, {line}-octet lines, RET={ret or '(none)'}"
                out[name] = {"cpu_s": round(spent, 3), "report_octets": length}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
