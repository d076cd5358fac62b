"""
The load client: asyncio (uvloop when installed), closed loop, N sessions
over C concurrent connections.  Prints one JSON object on stdout.

Modes:

- ``session``: banner, EHLO, [STARTTLS, EHLO], AUTH PLAIN, then ``messages``
  times MAIL, RCPT, DATA (2 KB), and QUIT.  ``--fail`` sends a wrong
  password (AUTH gets 535, then QUIT).  ``--rate R`` starts a session every
  1/R s instead (open loop, still at most ``concurrency`` at a time).
- ``idle``: open ``concurrency`` authenticated sessions, print ``READY``,
  hold them until a line arrives on stdin, then QUIT them all.
- ``burst``: like idle, but once all are connected (TLS up, EHLO done)
  print ``READY``, wait for stdin, then every session sends AUTH at once;
  reports the wall time until the last reply.
- ``login``: sessions that only log in (EHLO, STARTTLS, EHLO, AUTH PLAIN,
  QUIT), the user cycling through ``--users`` accounts ``user<i>@example.com``
  with password ``pw<i>`` (workload (j)).
- ``resume``: sessions as in ``session`` (STARTTLS, AUTH, one message),
  from ``concurrency`` threads with blocking sockets, each thread offering
  the TLS session of its previous connection (a ticket) so the server can
  resume; ``--no-resume`` makes the same client do full handshakes (the
  baseline of workload (h)).  Reports how many sessions were resumed.
- ``probe``: one plain connection sending NOOP every 5 ms until stdin
  closes; reports every (send time, latency).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import sys
import time
from typing import Any

BODY = (
    b"From: scott@example.com\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n"
    + (b"x" * 76 + b"\r\n") * 25
)  # about 2 KB


class SMTPError(Exception):
    pass


async def reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def command(reader, writer, line: bytes, expect: int) -> None:
    writer.write(line)
    code = await reply(reader)
    if code != expect:
        raise SMTPError(f"{line[:20]!r} -> {code}")


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = ssl.create_default_context(cafile=args.ca)
        password = "wrong" if args.fail else "tiger"
        self.plain = (
            b"AUTH PLAIN " + base64.b64encode(f"\0{args.user}\0{password}".encode()) + b"\r\n"
        )
        #: workload (j): one AUTH line per account, used in turn
        self.logins = [
            b"AUTH PLAIN " + base64.b64encode(f"\0user{i}@example.com\0pw{i}".encode()) + b"\r\n"
            for i in range(getattr(args, "users", 0) or 0)
        ]
        self.turn = 0

    async def connect(self):
        a = self.args
        if a.tls == "implicit":
            r, w = await asyncio.open_connection(
                "127.0.0.1", a.port, ssl=self.ctx, server_hostname="localhost"
            )
        else:
            r, w = await asyncio.open_connection("127.0.0.1", a.port)
        if await reply(r) != 220:
            raise SMTPError("banner")
        await command(r, w, b"EHLO bench.example\r\n", 250)
        if a.tls == "starttls":
            await command(r, w, b"STARTTLS\r\n", 220)
            await w.start_tls(self.ctx, server_hostname="localhost")
            await command(r, w, b"EHLO bench.example\r\n", 250)
        return r, w

    async def auth(self, r, w) -> None:
        await command(r, w, self.plain, 535 if self.args.fail else 235)

    async def mail(self, r, w) -> None:
        await command(r, w, b"MAIL FROM:<scott@example.com>\r\n", 250)
        await command(r, w, b"RCPT TO:<b@example.net>\r\n", 250)
        await command(r, w, b"DATA\r\n", 354)
        await command(r, w, BODY + b".\r\n", 250)

    async def quit(self, r, w) -> None:
        try:
            await command(r, w, b"QUIT\r\n", 221)
        finally:
            w.close()
            try:
                await w.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    async def session(self) -> float:
        start = time.perf_counter()
        r, w = await self.connect()
        if self.logins:
            line = self.logins[self.turn % len(self.logins)]
            self.turn += 1
            await command(r, w, line, 235)
            await self.quit(r, w)
            return time.perf_counter() - start
        await self.auth(r, w)
        if not self.args.fail:
            for _ in range(self.args.messages):
                await self.mail(r, w)
        await self.quit(r, w)
        return time.perf_counter() - start


async def run_sessions(client: Client, n: int, concurrency: int, rate: float = 0) -> dict:
    if rate:
        return await run_paced(client, n, concurrency, rate)
    latencies: list[float] = []
    errors = 0
    remaining = n

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            try:
                latencies.append(await client.session())
            except (OSError, ssl.SSLError, SMTPError, asyncio.IncompleteReadError):
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"elapsed": time.perf_counter() - start, "latencies": latencies, "errors": errors}


async def run_paced(client: Client, n: int, concurrency: int, rate: float) -> dict:
    """
    Open loop: a session is due every 1/*rate* seconds whatever the
    server's pace, at most *concurrency* at a time (one that has to wait
    for a slot counts as ``late``).  Latency runs from when a session was
    due, so waiting for a slot counts too.
    """
    latencies: list[float] = []
    errors = late = 0
    slots = asyncio.Semaphore(concurrency)

    async def one(due: float) -> None:
        nonlocal errors
        try:
            await client.session()
            latencies.append(time.perf_counter() - due)
        except (OSError, ssl.SSLError, SMTPError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            slots.release()

    start = time.perf_counter()
    tasks = []
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots.locked():
            late += 1
        await slots.acquire()
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    return {
        "elapsed": time.perf_counter() - start,
        "latencies": latencies,
        "errors": errors,
        "late": late,
    }


async def stdin_line() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)


async def run_idle(client: Client, n: int) -> dict:
    sem = asyncio.Semaphore(100)

    async def open_one():
        async with sem:
            r, w = await client.connect()
            await client.auth(r, w)
            return r, w

    conns = await asyncio.gather(*(open_one() for _ in range(n)))
    print("READY", flush=True)
    await stdin_line()
    await asyncio.gather(*(client.quit(r, w) for r, w in conns), return_exceptions=True)
    return {"opened": len(conns)}


async def run_burst(client: Client, n: int) -> dict:
    sem = asyncio.Semaphore(100)

    async def open_one():
        async with sem:
            return await client.connect()

    conns = await asyncio.gather(*(open_one() for _ in range(n)))
    print("READY", flush=True)
    await stdin_line()
    start = time.perf_counter()
    t0 = time.monotonic()
    await asyncio.gather(*(client.auth(r, w) for r, w in conns))
    wall = time.perf_counter() - start
    await asyncio.gather(*(client.quit(r, w) for r, w in conns), return_exceptions=True)
    return {"wall": wall, "start_monotonic": t0, "end_monotonic": t0 + wall}


async def run_probe(args: argparse.Namespace) -> dict:
    r, w = await asyncio.open_connection("127.0.0.1", args.port)
    await reply(r)
    samples: list[tuple[float, float]] = []
    done = asyncio.ensure_future(stdin_line())
    while not done.done():
        t = time.monotonic()
        w.write(b"NOOP\r\n")
        await reply(r)
        samples.append((t, time.monotonic() - t))
        await asyncio.sleep(0.005)
    w.close()
    return {"samples": samples}


def resume_sessions(args: argparse.Namespace) -> dict:
    """
    Workload (h): blocking clients that resume TLS sessions (as Postfix's
    smtp client and reconnecting MUAs do), or do full handshakes.
    """
    import socket
    import threading

    ctx = ssl.create_default_context(cafile=args.ca)
    if args.tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    plain = b"AUTH PLAIN " + base64.b64encode(b"\0scott\0tiger") + b"\r\n"
    latencies: list[float] = []
    counts = {"errors": 0, "resumed": 0}
    lock = threading.Lock()
    remaining = [args.sessions]

    def expect(f: Any, code: int) -> None:
        while True:
            line = f.readline()
            if not line:
                raise SMTPError("closed")
            if line[3:4] != b"-":
                if int(line[:3]) != code:
                    raise SMTPError(line[:40].decode("ascii", "replace"))
                return

    def one(session: Any) -> tuple[Any, bool]:
        sock = socket.create_connection(("127.0.0.1", args.port))
        try:
            f = sock.makefile("rb")
            expect(f, 220)
            sock.sendall(b"EHLO bench.example\r\n")
            expect(f, 250)
            sock.sendall(b"STARTTLS\r\n")
            expect(f, 220)
            tls = ctx.wrap_socket(
                sock,
                server_hostname="localhost",
                session=session if not args.no_resume else None,
            )
            f = tls.makefile("rb")
            for line, code in (
                (b"EHLO bench.example\r\n", 250),
                (plain, 235),
                (b"MAIL FROM:<scott@example.com>\r\n", 250),
                (b"RCPT TO:<b@example.net>\r\n", 250),
                (b"DATA\r\n", 354),
                (BODY + b".\r\n", 250),
                (b"QUIT\r\n", 221),
            ):
                tls.sendall(line)
                expect(f, code)
            reused = tls.session_reused
            # TLS 1.3 tickets arrive after the handshake: take the session
            # once the dialogue has read them.
            saved = tls.session
            tls.close()
            return saved, reused
        finally:
            sock.close()

    def worker() -> None:
        session = None
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            start = time.perf_counter()
            try:
                session, reused = one(session)
            except (OSError, ssl.SSLError, SMTPError):
                with lock:
                    counts["errors"] += 1
                session = None
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                counts["resumed"] += int(reused)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "elapsed": time.perf_counter() - start,
        "latencies": latencies,
        "errors": counts["errors"],
        "resumed": counts["resumed"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["session", "idle", "burst", "probe", "login", "resume"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls", choices=["starttls", "implicit"], default="starttls")
    p.add_argument("--ca", default=None)
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--messages", type=int, default=1)
    p.add_argument("--user", default="scott")
    p.add_argument("--fail", action="store_true")
    p.add_argument("--rate", type=float, default=0, help="session mode: sessions/s, open loop")
    p.add_argument("--users", type=int, default=0, help="accounts for the login mode")
    p.add_argument("--no-resume", action="store_true", help="resume mode: full handshakes")
    p.add_argument("--tls12", action="store_true", help="resume mode: at most TLS 1.2")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.mode == "probe":
        result = asyncio.run(run_probe(args))
    elif args.mode == "resume":
        result = resume_sessions(args)
    else:
        client = Client(args)
        if args.mode in ("session", "login"):
            result = asyncio.run(run_sessions(client, args.sessions, args.concurrency, args.rate))
        elif args.mode == "idle":
            result = asyncio.run(run_idle(client, args.concurrency))
        else:
            result = asyncio.run(run_burst(client, args.concurrency))
    # A long probe's samples are larger than a pipe (64 KiB): a full run once
    # lost (j)'s at exactly that length.  A blocking stdout cannot cut the
    # result short whatever left it non-blocking (the cause was not found).
    os.set_blocking(sys.stdout.fileno(), True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
