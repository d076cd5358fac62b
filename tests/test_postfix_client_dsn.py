"""
A real Postfix as a *null client* in front of kumoauth: the common
deployment where a server's local Postfix relays all its mail through the
submission service (``relayhost``, STARTTLS verified against kumoauth's CA,
SASL AUTH PLAIN as scott through Cyrus SASL from ``smtp_sasl_password_maps``).

A message submitted locally with Postfix's own ``sendmail -N success,failure
-V ENVID -R hdrs`` must keep its DSN requests on the way: Postfix's smtp
client sends RET/ENVID/NOTIFY/ORCPT to kumoauth (which offers DSN), and
kumoauth passes them on to the scripted upstream of tests/upstream.py (which
offers DSN too), so neither kumoauth nor the client Postfix reports anything
itself.  With kumoauth's ``[server] dsn = false`` the upstream gets none of
them, and the client Postfix sends its own "relayed" report instead.

Needs, besides Postfix (tests/postfix.py), Cyrus SASL's client-side PLAIN
plugin: the Debian package ``libsasl2-modules`` (only a Recommends of
``libsasl2-2``).
"""

from __future__ import annotations

import contextlib
import glob
import grp
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import postfix as pf
from tests.server import Certs
from tests.test_relay_dsn import mail_line
from tests.test_relay_e2e import (
    SENDER,
    bounces,
    dsn_blocks,
    relaying,
    wait_queue_empty,
    wait_until,
    with_tag,
)
from tests.upstream import Received, running_upstream

pytestmark = pytest.mark.e2e

SENDMAIL = "/usr/sbin/sendmail"
RCPT = "rcpt@example.net"
#: Cyrus SASL's PLAIN mechanism (the client side Postfix's smtp uses)
PLAIN_PLUGINS = (
    "/usr/lib/*/sasl2/libplain.so*",
    "/usr/lib/sasl2/libplain.so*",
    "/usr/lib64/sasl2/libplain.so*",
)
CLIENT_SASL_PACKAGE = "libsasl2-modules"
TIMEOUT = 30


def require_client_postfix() -> None:
    """
    Skip unless Postfix can run here with a Cyrus SASL client that has PLAIN;
    in CI (``CI`` set) fail instead: .ci/run is meant to install all of it.
    """
    # Dovecot is tests/postfix.py's other half: not needed by this file.
    problems = [p for p in pf.missing() if "dovecot" not in p and "doveadm" not in p]
    if not problems:
        if not os.access(SENDMAIL, os.X_OK):
            problems.append(f"{SENDMAIL} not found")
        types = subprocess.run(
            [pf.POSTCONF, "-A"], capture_output=True, text=True, check=False
        ).stdout.split()
        if "cyrus" not in types:
            problems.append(f"Postfix's smtp client has no Cyrus SASL (postconf -A: {types})")
        if not any(glob.glob(pattern) for pattern in PLAIN_PLUGINS):
            problems.append(
                f"no Cyrus SASL PLAIN plugin (libplain.so; apt-get install {CLIENT_SASL_PACKAGE})"
            )
    if not problems:
        return
    why = "; ".join(problems)
    if os.environ.get("CI"):
        pytest.fail(f"the Postfix null-client test cannot run in CI: {why}", pytrace=False)
    pytest.skip(why)


@contextlib.contextmanager
def null_client(srv: Any) -> Iterator[pf.Postfix]:
    """
    A second Postfix, a null client relaying everything to kumoauth's
    STARTTLS port with SASL as scott; its configuration, queue, data and log
    in a directory of its own (never /etc/postfix).
    """
    port = srv.starttls_port
    with pf.service_directory("kumoauth-nullclient-") as base:
        ca = base / "kumoauth-ca.pem"
        srv.certs.ca.cert_pem.write_to_path(str(ca))
        ca.chmod(0o644)
        # texthash: read as is, no postmap; readable by the smtp processes.
        passwords = base / "sasl_passwd"
        passwords.write_text(f"[127.0.0.1]:{port} scott:tiger\n")
        os.chown(passwords, 0, grp.getgrnam(pf.MAIL_OWNER).gr_gid)
        passwords.chmod(0o640)
        extra = {
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_password_maps": f"texthash:{passwords}",
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
            "smtp_sasl_mechanism_filter": "plain",
            # kumoauth's test certificate names localhost (and 127.0.0.1,
            # which Postfix does not match): the name is given literally.
            "smtp_tls_security_level": "verify",
            "smtp_tls_verify_cert_match": "localhost",
            "smtp_tls_CAfile": str(ca),
            "smtp_tls_loglevel": "1",
            # a deferral is retried within seconds, not minutes
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        with pf.running_postfix(
            base / "postfix",
            port=pf.free_port(),  # its smtpd: loopback, only for the readiness check
            relayhost=("127.0.0.1", port),
            sasl_socket=None,
            tls=None,
            myhostname="nullclient.test",
            extra_main=extra,
            timeout=TIMEOUT,
        ) as postfix:
            yield postfix


def sendmail(postfix: pf.Postfix, tag: str, envid: str) -> None:
    """Postfix's own sendmail, with DSN options: NOTIFY, ENVID and RET=HDRS."""
    message = f"From: {SENDER}\nTo: {RCPT}\nSubject: {tag}\n\nA locally submitted message.\n"
    done = subprocess.run(
        [
            SENDMAIL,
            "-C",
            str(postfix.config_dir),
            "-f",
            SENDER,
            "-N",
            "success,failure",
            "-V",
            envid,
            "-R",
            "hdrs",
            RCPT,
        ],
        input=message,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr, postfix.log())


def relayed_to_kumoauth(postfix: pf.Postfix, port: int) -> str:
    """Wait for the client Postfix's status=sent to kumoauth; kumoauth's queue id."""
    found = postfix.wait_log(
        rf"to=<{re.escape(RCPT)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port}, .*"
        r"dsn=2\.0\.0, status=sent \(250 2\.0\.0 OK queued as (\S+)\)$",
        TIMEOUT,
    )
    return found.group(1)


def the_message(up: Any, tag: str) -> Received:
    """The one message from scott with *tag* the upstream received (a report may quote it)."""
    (m,) = wait_until(
        lambda: [m for m in with_tag(up, tag) if m.mail_from == SENDER], TIMEOUT, f"message {tag}"
    )
    return m


@contextlib.contextmanager
def sent_through(tmp_path: Path, certs: Certs, server: str = "") -> Iterator[Any]:
    """
    A message with DSN requests from the client Postfix through kumoauth
    (``[server]`` settings *server*) to an upstream with DSN, once there:
    (up, srv, postfix, tag, envid, the message, kumoauth's queue id).
    """
    require_client_postfix()
    tag = f"nullclient-{os.getpid()}-{time.time_ns()}"
    envid = f"nc+{time.time_ns()}=1"
    with (
        running_upstream(dsn=True) as up,
        relaying(tmp_path, certs, up, server=server) as srv,
        null_client(srv) as postfix,
    ):
        sendmail(postfix, tag, envid)
        m = the_message(up, tag)
        mid = relayed_to_kumoauth(postfix, srv.starttls_port)
        yield up, srv, postfix, tag, envid, m, mid


def test_postfix_null_client_dsn_reaches_the_upstream(tmp_path: Path, certs: Certs) -> None:
    """Postfix's sendmail -N/-V/-R: RET, ENVID, NOTIFY, ORCPT cross kumoauth to the upstream."""
    with sent_through(tmp_path, certs) as (up, srv, postfix, tag, envid, m, mid):
        wait_queue_empty(srv, TIMEOUT)
        time.sleep(1.2)  # a report of kumoauth's own, or of Postfix's, would show now
        log = srv.log()
        client_log = postfix.log()

    # Postfix encodes ENVID as xtext ("+" and "=" as +2B, +3D); kumoauth
    # decodes it, stores it and encodes it again.
    xtext_envid = envid.replace("+", "+2B").replace("=", "+3D")
    mail_line(m, f"RET=HDRS ENVID={xtext_envid}")
    assert m.lines[1:] == [f"RCPT TO:<{RCPT}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;{RCPT}"]
    assert m.mail_from == SENDER and m.rcpt_tos == [RCPT]
    assert (m.authc, m.authzid) == ("kumoauth", "scott")

    # The client Postfix: kumoauth's certificate verified, and no report of
    # its own (its next hop offers DSN).
    assert re.search(
        rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{srv.starttls_port}",
        client_log,
    ), client_log
    assert "delivery status notification" not in client_log, client_log
    # kumoauth: the client's AUTH as scott, the message spooled as scott's,
    # and no report of its own (the upstream offers DSN).
    # (Cyrus sends an empty authzid; kumoauth logs the identity it takes, scott)
    listener = f"tcp:{srv.starttls_port}:interface=127.0.0.1"
    auth = (
        r"AUTH PLAIN success authc=scott authz=scott "
        rf"client=127\.0\.0\.1:\d+ listener={re.escape(listener)} "
    )
    assert re.search(auth, log), log
    assert re.search(rf"spooled {mid} from 127\.0\.0\.1:\d+ .* authn=scott$", log, re.M), log
    assert f"relay {mid}: success report" not in log
    assert not bounces(up), [b.data for b in bounces(up)]
    assert len(up.messages) == 1, [x.lines for x in up.messages]


def test_postfix_null_client_dsn_off_in_kumoauth(tmp_path: Path, certs: Certs) -> None:
    """``[server] dsn = false``: the upstream gets no DSN parameters; Postfix reports 'relayed'."""
    with sent_through(tmp_path, certs, "dsn = false") as (up, srv, postfix, tag, envid, m, mid):
        # The next hop offers no DSN: the client Postfix itself tells scott
        # the message was relayed, through kumoauth (MAIL FROM:<>, AUTH scott).
        postfix.wait_log(r"sender delivery status notification: \w+", TIMEOUT)
        (report,) = wait_until(lambda: bounces(up), TIMEOUT, "Postfix's relayed report")
        wait_queue_empty(srv, TIMEOUT)
        time.sleep(1.2)  # a second report would show now
        log = srv.log()

    mail_line(m, "")
    assert m.lines[1:] == [f"RCPT TO:<{RCPT}>"]
    assert f"relay {mid}: success report" not in log  # kumoauth got no NOTIFY to act on

    # through kumoauth as scott's, null sender, no DSN parameters
    assert re.fullmatch(r"MAIL FROM:<> SIZE=\d+", report.lines[0]), report.lines
    assert report.lines[1:] == [f"RCPT TO:<{SENDER}>"]
    assert (report.authc, report.authzid) == ("kumoauth", "scott")
    _, blocks = dsn_blocks(report.data)
    assert blocks[0]["Original-Envelope-Id"] == envid
    assert "X-Kumoauth-Queue-ID" not in blocks[0]  # Postfix's report, not kumoauth's
    (r,) = blocks[1:]
    assert r["Action"] == "relayed"
    assert r["Final-Recipient"] == f"rfc822; {RCPT}"
    # RET=HDRS: the header section comes back, not the body
    assert tag.encode() in report.data
    assert b"A locally submitted message" not in report.data
    assert len(up.messages) == 2, [x.lines for x in up.messages]
