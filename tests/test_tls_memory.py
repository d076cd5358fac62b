"""
kumoauth's OpenSSL binding (kumoauth/tls/openssl.py) driven exactly as
Twisted's TLSMemoryBIOProtocol drives it (bytes in, handshake, read until
WantReadError, drain the outgoing BIO), against Python's ssl module as the
client, in memory: after the handshake each memory BIO is swapped once for
an empty one (an idle session does not keep the handshake's buffers), and
the session goes on working, over TLS 1.2 and 1.3, whatever arrives with
the client's Finished.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from OpenSSL.SSL import WantReadError

from kumoauth.tls import openssl


@pytest.fixture(scope="module")
def ca_and_context(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, openssl.Context]:
    d: Path = tmp_path_factory.mktemp("tls-memory")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    chain, key = d / "chain.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    ctx = openssl.Context()
    ctx.use_certificate_chain_pem(chain.read_bytes())
    ctx.use_privatekey_pem(key.read_bytes())
    return ca, ctx


class Pair:
    """A server Connection and an ssl-module client joined by memory."""

    def __init__(self, ca: trustme.CA, ctx: openssl.Context, version: ssl.TLSVersion) -> None:
        cctx = ssl.create_default_context()
        ca.configure_trust(cctx)
        cctx.minimum_version = cctx.maximum_version = version
        self.to_client, self.to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = cctx.wrap_bio(self.to_client, self.to_server, server_hostname="localhost")
        self.server = openssl.Connection(ctx)
        self.handshake_done = False
        self.received = b""

    def server_gets(self) -> None:
        """What TLSMemoryBIOProtocol.dataReceived does with the client's bytes."""
        data = self.to_server.read()
        if data:
            self.server.bio_write(data)
        if not self.handshake_done:
            try:
                self.server.do_handshake()
                self.handshake_done = True
            except WantReadError:
                pass
        while True:
            try:
                self.received += self.server.recv(2**15)
            except WantReadError:
                break
        self.flush()

    def flush(self) -> None:
        while True:
            try:
                self.to_client.write(self.server.bio_read(2**15))
            except WantReadError:
                break

    def handshake(self) -> None:
        for _ in range(5):
            try:
                self.client.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.server_gets()
        raise AssertionError("no handshake")

    def client_reads(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += self.client.read(n - len(out))
        return out


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_buffers_are_released_once_and_the_session_goes_on(ca_and_context, version):
    pair = Pair(*ca_and_context, version)
    pair.handshake()
    # With TLS 1.3 the client's Finished and its first command arrive together.
    pair.client.write(b"EHLO client.example\r\n")
    pair.server_gets()
    assert pair.handshake_done
    assert pair.received == b"EHLO client.example\r\n"
    assert pair.server._unsettled == 0  # both BIOs swapped for empty ones
    pair.server.send(b"250 ok\r\n")
    pair.flush()
    assert pair.client_reads(8) == b"250 ok\r\n"
    # Large records both ways through the new BIOs.
    big = b"x" * 100_000
    pair.client.write(big)
    pair.received = b""
    pair.server_gets()
    assert pair.received == big
    pair.server.send(big)
    pair.flush()
    assert pair.client_reads(len(big)) == big


# --------------------------------------------------------------------------
# key and chain from memory (what a worker gets from its supervisor)


def _chain_through_an_intermediate() -> tuple[trustme.CA, trustme.LeafCert]:
    root = trustme.CA()
    return root, root.create_child_ca().issue_cert("localhost")


def test_key_and_chain_from_memory_serve_the_whole_chain():
    # The client trusts only the root: the handshake verifies only if the
    # intermediate after the leaf in the PEM reached the context as chain.
    root, leaf = _chain_through_an_intermediate()
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    assert chain.count(b"BEGIN CERTIFICATE") == 2
    ctx = openssl.Context()
    ctx.use_privatekey_pem(leaf.private_key_pem.bytes())
    ctx.use_certificate_chain_pem(chain)
    ctx.check_privatekey()
    pair = Pair(root, ctx, ssl.TLSVersion.TLSv1_3)
    pair.handshake()
    assert pair.client.getpeercert()["subjectAltName"] == (("DNS", "localhost"),)
    # the leaf alone: the client cannot build a path to the root
    alone = openssl.Context()
    alone.use_privatekey_pem(leaf.private_key_pem.bytes())
    alone.use_certificate_chain_pem(leaf.cert_chain_pems[0].bytes())
    with pytest.raises(ssl.SSLCertVerificationError):
        Pair(root, alone, ssl.TLSVersion.TLSv1_3).handshake()


@pytest.mark.parametrize(
    "chain",
    [
        b"",
        b"not pem at all",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "leaf, then a broken one",
    ],
)
def test_a_chain_that_does_not_parse_is_refused(chain):
    _, leaf = _chain_through_an_intermediate()
    if chain == "leaf, then a broken one":
        chain = leaf.cert_chain_pems[0].bytes() + b"-----BEGIN CERTIFICATE-----\nAA\n"
    ctx = openssl.Context()
    with pytest.raises(openssl.Error):
        ctx.use_certificate_chain_pem(chain)
    assert openssl.error_queue() == []  # nothing left behind for the next call


def test_an_encrypted_or_broken_key_is_refused_without_a_prompt():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    for key in (encrypted, b"", b"-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n"):
        with pytest.raises(openssl.Error):
            openssl.Context().use_privatekey_pem(key)
