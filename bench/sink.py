"""
The upstream sink of the relay workload (i): a minimal asyncio SMTP server
on 127.0.0.1 that accepts everything, keeps nothing and counts messages.
The same sink, in its own process, serves every server under test, so its
CPU is charged to nobody.

    python -m bench.sink PORT

ESMTP with PIPELINING, 8BITMIME, SIZE and ENHANCEDSTATUSCODES; no TLS, no
AUTH (the servers relay to it unauthenticated, in clear, on loopback).
``XCOUNT`` (a bench-only command) answers ``250 <messages accepted so
far>``: the bench polls it until every message it sent has arrived.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

COUNT = 0


class SinkProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.in_data = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"220 sink.test ESMTP bench sink\r\n")

    def data_received(self, data: bytes) -> None:
        global COUNT
        self.buffer += data
        out = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    # Only the tail can hold the start of the terminator.
                    if len(self.buffer) > 8:
                        del self.buffer[:-8]
                    break
                del self.buffer[: end + 5]
                self.in_data = False
                COUNT += 1
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            nl = self.buffer.find(b"\r\n")
            if nl < 0:
                break
            line = bytes(self.buffer[:nl])
            del self.buffer[: nl + 2]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                out.append(
                    b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
                    b"250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
                    if verb == b"EHLO"
                    else b"250 sink.test\r\n"
                )
            elif verb == b"DATA":
                self.in_data = True
                # A DATA with the message right behind it: the terminator
                # may follow the "DATA\r\n" directly.
                self.buffer[0:0] = b"\r\n"
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            elif verb == b"XCOU":
                out.append(b"250 %d\r\n" % COUNT)
            else:  # MAIL, RCPT, RSET, NOOP, ...
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def count(port: int, timeout: float = 5) -> int:
    """Messages the sink on *port* has accepted (one short connection)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"XCOUNT\r\nQUIT\r\n")
        n = int(f.readline().split()[1])
        f.readline()
        return n


def main() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
