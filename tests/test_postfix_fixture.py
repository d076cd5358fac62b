"""
The real-Postfix upstream (tests/postfix.py) does what the relay needs: it
accepts AUTH PLAIN from a Dovecot master user with the end user as authzid,
records the end user as the authenticated sender, and relays to its
relayhost; Dovecot's auth-client listener speaks the auth-client protocol.
"""

from __future__ import annotations

import email
import smtplib
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message

import pytest
import trustme

from tests import postfix as pf

pytestmark = pytest.mark.e2e

USERS = {"alice": "alice-secret", "bob": "bob-secret"}
MASTERS = {"kumoauth": "kumoauth-master-secret"}


@dataclass
class Upstream:
    dovecot: pf.DovecotAuth
    postfix: pf.Postfix
    sink: pf.RecordingSink
    ca: trustme.CA

    def client(self, source: str | None = None) -> smtplib.SMTP:
        where = (source, 0) if source is not None else None
        smtp = smtplib.SMTP("127.0.0.1", self.postfix.port, timeout=10, source_address=where)
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        smtp.starttls(context=ctx)
        return smtp


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    pf.require_postfix()
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    with pf.service_directory() as base, pf.RecordingSink() as sink:
        chain, key = base / "fullchain.pem", base / "privkey.pem"
        cert.private_key_pem.write_to_path(str(key))
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        with (
            pf.running_dovecot_auth(base / "dovecot", USERS, MASTERS) as dovecot,
            pf.running_postfix(
                base / "postfix",
                port=pf.free_port(),
                relayhost=sink.address,
                sasl_socket=dovecot.socket,
                tls=(chain, key),
            ) as postfix,
        ):
            yield Upstream(dovecot, postfix, sink, ca)


def plain(authz: str, authc: str, password: str):  # type: ignore[no-untyped-def]
    return lambda challenge=None: f"{authz}\0{authc}\0{password}"


def send_tagged(smtp: smtplib.SMTP, sender: str) -> str:
    tag = uuid.uuid4().hex
    smtp.sendmail(
        sender,
        ["someone@example.net"],
        f"From: {sender}\r\nTo: someone@example.net\r\nSubject: {tag}\r\n\r\nhello\r\n",
    )
    return tag


def relayed(upstream: Upstream, tag: str) -> Message:
    envelope = upstream.sink.wait_for(
        lambda e: tag.encode() in (e.original_content or b""), timeout=15
    )
    return email.message_from_bytes(envelope.original_content or b"")


def test_auth_needs_starttls(upstream: Upstream) -> None:
    with smtplib.SMTP("127.0.0.1", upstream.postfix.port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")


def test_user_relays_and_is_named_in_received(upstream: Upstream) -> None:
    with upstream.client() as smtp:
        smtp.ehlo()
        assert "PLAIN" in smtp.esmtp_features["auth"].split()
        code, _ = smtp.auth("PLAIN", plain("", "bob", USERS["bob"]))
        assert code == 235
        tag = send_tagged(smtp, "bob@example.com")
    message = relayed(upstream, tag)
    assert "(Authenticated sender: bob)" in message["Received"]
    upstream.postfix.wait_log(r"sasl_method=PLAIN, sasl_username=bob$")


def test_master_user_with_authzid_is_accepted_as_that_user(upstream: Upstream) -> None:
    with upstream.client() as smtp:
        smtp.ehlo()
        code, _ = smtp.auth("PLAIN", plain("alice", "kumoauth", MASTERS["kumoauth"]))
        assert code == 235
        tag = send_tagged(smtp, "alice@example.com")
    message = relayed(upstream, tag)
    received = message["Received"]
    assert "(Authenticated sender: alice)" in received
    assert "kumoauth" not in received
    upstream.postfix.wait_log(r"sasl_method=PLAIN, sasl_username=alice$")
    assert pf.wait_for(lambda: "Master user logging in as alice" in upstream.dovecot.log(), 5)


@pytest.mark.parametrize(
    ("authz", "authc", "password"),
    [
        pytest.param("alice", "kumoauth", "wrong", id="wrong-master-password"),
        pytest.param("nobody", "kumoauth", MASTERS["kumoauth"], id="unknown-target-user"),
        pytest.param("bob", "alice", USERS["alice"], id="user-is-no-master"),
    ],
)
def test_rejected_logins_get_535_and_cannot_relay(
    upstream: Upstream, authz: str, authc: str, password: str
) -> None:
    with upstream.client() as smtp:
        smtp.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            smtp.auth("PLAIN", plain(authz, authc, password))
        assert failed.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send_tagged(smtp, "alice@example.com")
        ((code, text),) = refused.value.recipients.values()
        assert code == 554 and b"Relay access denied" in text


def test_the_service_account_as_itself_only_from_its_address(upstream: Upstream) -> None:
    """
    docs/relay.md's recipe: kumoauth's own login (its bounces, no authzid)
    is a plain passdb entry with allow_nets, so it works from kumoauth's
    address and nowhere else.
    """
    with upstream.client() as smtp:
        smtp.ehlo()
        assert smtp.auth("PLAIN", plain("", "kumoauth", MASTERS["kumoauth"]))[0] == 235
    with upstream.client(source="127.0.0.2") as smtp:
        smtp.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            smtp.auth("PLAIN", plain("", "kumoauth", MASTERS["kumoauth"]))
        assert failed.value.smtp_code == 535


def _check_handshake(lines: list[str]) -> None:
    assert lines[0].split("\t")[:2] == ["VERSION", "1"]
    mechs = {line.split("\t")[1] for line in lines if line.startswith("MECH\t")}
    assert {"PLAIN", "LOGIN"} <= mechs
    assert any(line.startswith("SPID\t") for line in lines)
    assert lines[-1] == "DONE"


def test_dovecot_auth_client_handshake_unix(upstream: Upstream) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(upstream.dovecot.client_socket))
        _check_handshake(pf.auth_client_handshake(sock))


def test_dovecot_auth_client_handshake_tcp(upstream: Upstream) -> None:
    with socket.create_connection(upstream.dovecot.client_address, timeout=5) as sock:
        _check_handshake(pf.auth_client_handshake(sock))
