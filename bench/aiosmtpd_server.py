"""
The aiosmtpd peer: STARTTLS and implicit-TLS listeners, AUTH only over TLS,
the same user, and a handler that writes and fsyncs each message like
kumoauth's spool (in a thread, as kumoauth does).

    python -m bench.aiosmtpd_server CERT KEY STARTTLS_PORT IMPLICIT_PORT SPOOL [USERS]

With USERS (a passwd-file of Argon2id hashes, workload (j)), the
authenticator verifies against it: aiosmtpd's authenticator is a plain
function called on the event loop, so each verification holds the loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import uuid

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

USERS = {b"scott": b"tiger"}
HASHES: dict[bytes, str] = {}


def authenticator(server, session, envelope, mechanism, auth_data):
    if not isinstance(auth_data, LoginPassword):
        return AuthResult(success=False, handled=False)
    if auth_data.login in HASHES:
        from kumoauth.backends.schemes import verify

        if verify(HASHES[auth_data.login], auth_data.password.decode()):
            return AuthResult(success=True, auth_data=auth_data.login)
    elif USERS.get(auth_data.login) == auth_data.password:
        return AuthResult(success=True, auth_data=auth_data.login)
    return AuthResult(success=False, handled=False)


def write_pair(spool: str, mid: str, data: bytes, envelope: dict) -> None:
    for name, blob in ((f"{mid}.eml", data), (f"{mid}.json", json.dumps(envelope).encode())):
        tmp = os.path.join(spool, "tmp", name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
    os.rename(os.path.join(spool, "tmp", f"{mid}.eml.tmp"), os.path.join(spool, f"{mid}.eml"))
    os.rename(os.path.join(spool, "tmp", f"{mid}.json.tmp"), os.path.join(spool, f"{mid}.json"))
    dfd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class SpoolHandler:
    def __init__(self, spool: str) -> None:
        self.spool = spool

    async def handle_DATA(self, server, session, envelope):
        mid = uuid.uuid4().hex
        meta = {
            "id": mid,
            "mail_from": envelope.mail_from,
            "rcpt_to": envelope.rcpt_tos,
            "meta": {"authn_id": session.auth_data.decode() if session.auth_data else None},
        }
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, write_pair, self.spool, mid, envelope.original_content, meta
        )
        return f"250 2.0.0 OK queued as {mid}"


async def main() -> None:
    cert, key, starttls_port, implicit_port, spool = sys.argv[1:6]
    if len(sys.argv) > 6:
        for line in open(sys.argv[6], encoding="utf-8"):
            user, _, hashed = line.strip().partition(":")
            HASHES[user.encode()] = hashed
    os.makedirs(os.path.join(spool, "tmp"), exist_ok=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    handler = SpoolHandler(spool)
    loop = asyncio.get_running_loop()

    def factory(implicit: bool):
        def make():
            return SMTP(
                handler,
                hostname="localhost",
                tls_context=None if implicit else ctx,
                require_starttls=not implicit,
                # aiosmtpd only recognises TLS from STARTTLS; on the
                # implicit-TLS listener every byte is already encrypted.
                auth_require_tls=not implicit,
                authenticator=authenticator,
            )

        return make

    await loop.create_server(factory(False), "127.0.0.1", int(starttls_port))
    await loop.create_server(factory(True), "127.0.0.1", int(implicit_port), ssl=ctx)
    print("READY", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
