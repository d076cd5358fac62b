"""
Workload (h), the handshake alone: server CPU of one TLS handshake, full or
resumed, measured in process.

The server side is kumoauth's own: a context from
:func:`kumoauth.tls.context.build_context` with ``session_tickets = true``
and a :class:`kumoauth.tls.openssl.Connection`, driven as
:class:`kumoauth.tls.direct.DirectTLS` drives it (``try_handshake``,
``take``, then one record in with ``open`` and the reply out with
``seal``); the client is Python's ``ssl`` over memory BIOs in the same
thread.  Only the server's calls are timed (``time.thread_time``), so the
figures leave out the sockets, the reactor, the SMTP session around the
handshake and making and freeing the connection (``SSL_new``,
``SSL_free``): what resumption can save at most.  Prints one JSON object:
for each certificate (ECDSA P-256, RSA-2048) and TLS version, the median
server CPU of a full and of a resumed handshake.
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trustme

from kumoauth.config import TLSConfig
from kumoauth.tls import openssl as tls
from kumoauth.tls.context import build_context

VERSIONS = {"TLS 1.3": ssl.TLSVersion.TLSv1_3, "TLS 1.2": ssl.TLSVersion.TLSv1_2}
KEYS = {"ECDSA P-256": trustme.KeyType.ECDSA, "RSA-2048": trustme.KeyType.RSA}


def handshake(server: Any, client: ssl.SSLContext, session: Any) -> tuple[float, Any, bool]:
    """One handshake and one exchange: (server CPU s, the client's session, resumed)."""
    spent = 0.0
    conn = tls.Connection(server)
    into, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(into, out, server_hostname="localhost", session=session)
    for _ in range(10):
        try:
            c.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        data = out.read()
        start = time.thread_time()
        if data:
            conn.bio_write(data)
        conn.try_handshake()
        reply = conn.take()
        spent += time.thread_time() - start
        if reply:
            into.write(reply)
        if done:
            break
    c.write(b"EHLO client.example\r\n")
    data = out.read()
    start = time.thread_time()
    records, error = conn.open(data)
    reply = conn.seal(b"250 OK\r\n")
    spent += time.thread_time() - start
    if error is not None or records != [b"EHLO client.example\r\n"] or not reply:
        raise RuntimeError("the exchange after the handshake failed")
    into.write(reply)
    if c.read(100) != b"250 OK\r\n":
        raise RuntimeError("the client did not read the reply")
    return spent, c.session, c.session_reused


def measure(n: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="kumoauth-bench-hs-") as tmp:
        return _measure(n, Path(tmp))


def _measure(n: int, workdir: Path) -> dict[str, dict[str, float]]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    results: dict[str, dict[str, float]] = {}
    for key_name, key_type in KEYS.items():
        leaf = ca.issue_cert("localhost", key_type=key_type)
        cert, key = workdir / f"{key_type.name}.pem", workdir / f"{key_type.name}.key"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        server = build_context(TLSConfig(certificate=cert, private_key=key, session_tickets=True))
        for version_name, version in VERSIONS.items():
            client = ssl.create_default_context(cafile=str(workdir / "ca.pem"))
            client.minimum_version = client.maximum_version = version
            row: dict[str, float] = {}
            for mode in ("full", "resumed"):
                _, session, _ = handshake(server, client, None)  # a ticket, and warm-up
                times = []
                for _ in range(n):
                    spent, new, resumed = handshake(
                        server, client, session if mode == "resumed" else None
                    )
                    if resumed != (mode == "resumed"):
                        raise RuntimeError(f"{key_name} {version_name}: resumed={resumed}")
                    if mode == "resumed":
                        session = new
                    times.append(spent)
                row[f"{mode}_us"] = statistics.median(times) * 1e6
            results[f"{key_name}, {version_name}"] = row
    return results


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.handshake", description=__doc__)
    p.add_argument("--handshakes", type=int, default=500, help="of each kind")
    args = p.parse_args()
    print(json.dumps(measure(args.handshakes)))


if __name__ == "__main__":
    main()
