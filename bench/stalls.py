"""
What one large message costs everybody else: while one client sends a
message of about 24 MB, another session on the same server sends RSET every
5 ms (stock twisted.mail has no NOOP); the figure is the slowest reply (the
longest the server's event loop was held), medians of alternating runs.
kumoauth relays the message to the bench's sink (``[relay]``, in clear),
and the window runs until the sink has it, so the relay's part counts too;
aiosmtpd (its handler writes and fsyncs in a thread) and stock twisted.mail
(it discards) are the peers, the window ending once they answer.  Prints one JSON object.

    python -m bench.stalls [--runs 3] [--shapes ordinary,dot_lines,bare_lf] [--quick]
                           [--base REV]

``--base REV`` adds that revision's kumoauth beside this tree's (exported
with ``git archive``, as ``bench.ab`` does), for a before and after.

Shapes: ``ordinary`` (76-octet text lines), ``dot_lines`` (lines of one
dot, all dot-stuffed on the wire), ``bare_lf`` (lines ended by bare LFs,
which kumoauth rewrites as CRLF; the peers refuse the message as one
overlong line), ``header`` (a header section of short fields only:
kumoauth refuses it, ``max_header_size``).  ``reply`` is what the sender
got at the end of DATA.
"""

from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.__main__ import Aiosmtpd, KumoauthRelay, Server, TwistedMail, free_port, make_certs
from bench.ab import export, with_path
from bench.relay import Sink

HEAD = b"From: scott@example.com\r\nTo: you@example.net\r\nSubject: large\r\n"
TEXT = b"The quick brown fox jumps over the lazy dog, again and again, 0123456789\r\n"
SHAPES = {
    "ordinary": (HEAD + b"\r\n", TEXT),
    "dot_lines": (HEAD + b"\r\n", b".\r\n"),
    "bare_lf": (HEAD + b"\r\n", b"text\n"),
    "header": (b"", b"a: b\r\n"),
}


def shape(name: str, size: int) -> bytes:
    head, unit = SHAPES[name]
    return head + unit * ((size - len(head)) // len(unit))


def client(port: int, ca: Path) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=120)
    s.starttls(context=ssl.create_default_context(cafile=str(ca)))
    s.ehlo()
    return s


class Pinger(threading.Thread):
    """A session that sends RSET every 5 ms and keeps the slowest reply."""

    def __init__(self, port: int, ca: Path) -> None:
        super().__init__(daemon=True)
        self.session = client(port, ca)
        self.stop = threading.Event()
        self.worst = 0.0
        self.count = 0

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            code, _ = self.session.rset()
            took = time.perf_counter() - started
            if code != 250:
                raise RuntimeError(f"RSET got {code}")
            self.worst = max(self.worst, took)
            self.count += 1
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        self.join(10)
        self.session.quit()


def once(server: Server, sink: Sink | None, ca: Path, message: bytes) -> dict[str, Any]:
    pinger = Pinger(server.starttls_port, ca)
    pinger.start()
    time.sleep(0.2)
    before = sink.count() if sink is not None else 0
    s = client(server.starttls_port, ca)
    s.login("scott", "tiger")
    try:
        s.sendmail("scott@example.com", ["you@example.net"], message)
        reply = "250"
    except smtplib.SMTPResponseException as e:
        reply = str(e.smtp_code)
    s.close()
    if sink is not None and reply == "250":
        if sink.wait(before + 1, 120) < before + 1:
            raise RuntimeError("the sink never got the message")
    time.sleep(0.3)
    pinger.finish()
    return {"worst_ms": round(pinger.worst * 1000, 1), "pings": pinger.count, "reply": reply}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stalls", description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--shapes", default="ordinary,dot_lines,bare_lf,header")
    p.add_argument("--size", type=int, default=24_000_000)
    p.add_argument("--quick", action="store_true", help="one run of 2 MB messages")
    p.add_argument("--base", help="a git revision whose kumoauth runs beside this tree's")
    args = p.parse_args()
    if args.quick:
        args.runs, args.size = 1, 2_000_000
    workdir = Path(tempfile.mkdtemp(prefix="kumoauth-bench-stalls-"))
    cert, key, ca = make_certs(workdir)
    sink = Sink(workdir, free_port())
    kumoauth = KumoauthRelay("kumoauth", workdir, cert, key)
    relaying: list[KumoauthRelay] = [kumoauth]
    if args.base:
        base = with_path(KumoauthRelay, export(args.base, workdir))
        relaying.append(base(f"kumoauth@{args.base}", workdir, cert, key))
    servers: list[Server] = [*relaying, Aiosmtpd("aiosmtpd", workdir, cert, key)]
    servers.append(TwistedMail("twisted.mail", workdir, cert, key))
    out: dict[str, Any] = {}
    try:
        sink.start()
        for each in relaying:
            each.relay_port = sink.port
        for server in servers:
            server.start()
        for name in args.shapes.split(","):
            message = shape(name, args.size)
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            for _ in range(args.runs):
                for server in servers:
                    on = sink if server in relaying else None
                    runs[server.name].append(once(server, on, ca, message))
            row: dict[str, Any] = {}
            for server in servers:
                worst = [r["worst_ms"] for r in runs[server.name]]
                row[server.name] = {
                    "worst_ms": statistics.median(worst),
                    "runs": worst,
                    "reply": runs[server.name][0]["reply"],
                }
            out[f"{name} ({len(message) // 1_000_000} MB)"] = row
    finally:
        for server in servers:
            server.stop()
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
