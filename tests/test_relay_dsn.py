"""
The DSN extension (RFC 3461) end to end: a real ``twistd kumoauth`` takes
RET, ENVID, NOTIFY and ORCPT from a client, passes them to an upstream that
offers DSN (the scripted aiosmtpd one of tests/upstream.py, or a real
Postfix), and where the upstream offers none reports success itself
("relayed"); its own bounces honour NOTIFY and RET and carry ENVID and
ORCPT.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.server import Certs, running_server
from tests.test_e2e import POLICY, starttls_client
from tests.test_relay_e2e import (
    SENDER,
    bounces,
    dsn_blocks,
    real_postfix,
    relaying,
    send_on,
    submit,
    wait_queue_empty,
    wait_until,
    with_tag,
)
from tests.upstream import Received, running_upstream

pytestmark = pytest.mark.e2e


def mail_line(m: Received, params: str) -> None:
    """The transaction's MAIL line is kumoauth's SIZE, then exactly *params*."""
    pattern = rf"MAIL FROM:<{re.escape(SENDER)}> SIZE=\d+" + (
        f" {re.escape(params)}" if params else ""
    )
    assert re.fullmatch(pattern, m.lines[0]), m.lines


def test_upstream_with_dsn_gets_the_parameters_and_kumoauth_reports_nothing(
    tmp_path: Path, certs: Certs
) -> None:
    """An upstream offering DSN gets RET/ENVID/NOTIFY/ORCPT as given; kumoauth sends no report."""
    with running_upstream(dsn=True) as up, relaying(tmp_path, certs, up) as srv:
        mid = submit(
            srv,
            [
                ("b@example.net", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig+2Bb@example.net"]),
                ("c@example.net", ["NOTIFY=NEVER"]),
                ("d@example.net", ["ORCPT=utf-8;bj\\x{F8}rn@ex\\x{E4}mple.net"]),
                ("e@example.net", []),
            ],
            b"Subject: dsn-upstream\r\n\r\nbody\r\n",
            mail_options=["RET=FULL", "ENVID=id+2B1"],
        )
        wait_until(lambda: with_tag(up, "dsn-upstream"), what="the message")
        wait_queue_empty(srv)
        time.sleep(1.2)  # a report of kumoauth's own would show now
        (m,) = up.messages
        mail_line(m, "RET=FULL ENVID=id+2B1")
        assert m.lines[1:] == [
            "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Bb@example.net",
            "RCPT TO:<c@example.net> NOTIFY=NEVER",
            "RCPT TO:<d@example.net> ORCPT=utf-8;bj\\x{F8}rn@ex\\x{E4}mple.net",
            "RCPT TO:<e@example.net>",
        ]
        assert m.rcpt_tos == ["b@example.net", "c@example.net", "d@example.net", "e@example.net"]
        assert not bounces(up)
        assert f"relay {mid}: success report" not in srv.log()


def test_upstream_without_dsn_gets_no_parameters_and_kumoauth_reports_relayed(
    tmp_path: Path, certs: Certs
) -> None:
    """Without DSN upstream, kumoauth sends none and reports "relayed" to NOTIFY=SUCCESS only."""
    body = b"Subject: dsn-relayed\r\n\r\nthe-secret-body\r\n"
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        mid = submit(
            srv,
            [
                ("b@example.net", ["NOTIFY=SUCCESS", "ORCPT=rfc822;orig+2Bb@example.net"]),
                ("c@example.net", ["NOTIFY=FAILURE"]),
            ],
            body,
            mail_options=["RET=FULL", "ENVID=env+2Bok"],
        )
        wait_until(lambda: bounces(up), 10, "the relayed report")
        wait_queue_empty(srv)
        time.sleep(1.2)  # a second report would show now
        (m,) = [m for m in up.messages if m.mail_from == SENDER]
        mail_line(m, "")
        assert m.lines[1:] == ["RCPT TO:<b@example.net>", "RCPT TO:<c@example.net>"]
        assert m.rcpt_tos == ["b@example.net", "c@example.net"]

        (report,) = bounces(up)
        assert report.rcpt_tos == [SENDER]
        msg, blocks = dsn_blocks(report.data)
        assert msg["Subject"] == "Successful Mail Relay Report"
        per_message, per_rcpt = blocks[0], blocks[1:]
        assert per_message["Original-Envelope-Id"] == "env+ok"
        (r,) = per_rcpt  # c@example.net asked for failures only
        assert r["Final-Recipient"] == "rfc822; b@example.net"
        assert r["Original-Recipient"] == "rfc822; orig+b@example.net"
        assert r["Action"] == "relayed"
        assert r["Status"] == "2.0.0"
        # RET=FULL or not, a success report returns the header section only.
        types = [p.get_content_type() for p in msg.walk()]
        assert "text/rfc822-headers" in types and "message/rfc822" not in types, types
        assert b"Subject: dsn-relayed" in report.data
        assert b"the-secret-body" not in report.data
        assert re.search(
            rf"relay {mid}: success report \S+ queued for b@example\.net\b", srv.log()
        ), srv.log()


def test_a_refused_recipient_is_bounced_as_notify_and_ret_say(tmp_path: Path, certs: Certs) -> None:
    """A 550: NOTIFY=NEVER gives no bounce; RET=FULL returns the message, RET=HDRS its headers."""
    refused = "x@example.net"
    with (
        running_upstream(dsn=True, rcpt_replies={refused: "550 5.1.1 no such user"}) as up,
        relaying(tmp_path, certs, up) as srv,
    ):
        with starttls_client(srv) as s:
            s.login("scott", "tiger")
            never = send_on(
                s, [(refused, ["NOTIFY=NEVER"])], b"Subject: tag-never\r\n\r\nbody-never\r\n"
            )
            full = send_on(
                s,
                [(refused, ["ORCPT=rfc822;first+2Bx@example.net"])],
                b"Subject: tag-full\r\n\r\nbody-full\r\n",
                mail_options=["RET=FULL", "ENVID=full+2B1"],
            )
            hdrs = send_on(
                s,
                [(refused, [])],
                b"Subject: tag-hdrs\r\n\r\nbody-hdrs\r\n",
                mail_options=["RET=HDRS"],
            )
        wait_until(lambda: len(bounces(up)) >= 2, 10, "the two bounces")
        wait_queue_empty(srv)  # the bounces are queued, and relayed, too
        time.sleep(1.2)
        log = srv.log()
        assert (
            f"relay {never}: not delivered to {refused}; no bounce, as the sender asked "
            "(NOTIFY without FAILURE)"
        ) in log, log
        assert f"relay {full}: not delivered" not in log

        by_tag = {tag: with_tag(up, f"tag-{tag}") for tag in ("never", "full", "hdrs")}
        assert by_tag["never"] == [], by_tag["never"]
        assert all(b.mail_from in ("", "<>") for b in bounces(up))
        assert len(bounces(up)) == 2

        (bounce,) = by_tag["full"]
        assert bounce.rcpt_tos == [SENDER]
        msg, blocks = dsn_blocks(bounce.data)
        assert blocks[0]["Original-Envelope-Id"] == "full+1"
        assert blocks[0]["X-Kumoauth-Queue-ID"] == full
        (r,) = blocks[1:]
        assert r["Original-Recipient"] == "rfc822; first+x@example.net"
        assert r["Final-Recipient"] == f"rfc822; {refused}"
        assert (r["Action"], r["Status"]) == ("failed", "5.1.1")
        (returned,) = [p for p in msg.walk() if p.get_content_type() == "message/rfc822"]
        assert b"body-full" in returned.as_bytes()

        (bounce,) = by_tag["hdrs"]
        msg, blocks = dsn_blocks(bounce.data)
        assert "Original-Envelope-Id" not in blocks[0]
        assert "Original-Recipient" not in blocks[1]
        types = [p.get_content_type() for p in msg.walk()]
        assert "text/rfc822-headers" in types and "message/rfc822" not in types, types
        assert b"body-hdrs" not in bounce.data
        assert blocks[0]["X-Kumoauth-Queue-ID"] == hdrs


def test_dsn_false_offers_and_takes_no_dsn_parameters(tmp_path: Path, certs: Certs) -> None:
    """``[server] dsn = false``: no DSN in EHLO, and RET/NOTIFY get 555; by default 501 if bad."""
    with running_server(tmp_path / "on", certs, POLICY) as srv, starttls_client(srv) as s:
        assert s.has_extn("dsn")
        s.login("scott", "tiger")
        assert s.mail(SENDER, ["RET=PART"]) == (501, b"5.5.4 Bad RET parameter")
        assert s.mail(SENDER, ["ENVID=a+2b"]) == (501, b"5.5.4 Bad ENVID parameter")
        assert s.mail(SENDER, ["ret=hdrs", "ENVID=a+2Bb"])[0] == 250
        assert s.rcpt("b@example.net", ["NOTIFY=NEVER,SUCCESS"]) == (
            501,
            b"5.5.4 Bad NOTIFY parameter",
        )
        assert s.rcpt("b@example.net", ["ORCPT=b@example.net"]) == (
            501,
            b"5.5.4 Bad ORCPT parameter",
        )
        assert s.rcpt("b@example.net", ["notify=failure,success"])[0] == 250
    with (
        running_server(tmp_path / "off", certs, POLICY, server="dsn = false") as srv,
        starttls_client(srv) as s,
    ):
        assert not s.has_extn("dsn")
        s.login("scott", "tiger")
        assert s.mail(SENDER, ["RET=FULL"]) == (555, b"5.5.4 Unsupported parameter RET")
        assert s.mail(SENDER, ["ENVID=abc"]) == (555, b"5.5.4 Unsupported parameter ENVID")
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt("b@example.net", ["NOTIFY=SUCCESS"]) == (
            555,
            b"5.5.4 Unsupported parameter NOTIFY",
        )


def test_real_postfix_gets_the_parameters_and_reports_relayed_itself(
    tmp_path: Path, certs: Certs
) -> None:
    """A real Postfix gets ENVID/RET/NOTIFY/ORCPT: it, not kumoauth, reports "relayed"."""
    with real_postfix(tmp_path) as (sink, _dovecot, _postfix, extra):
        with running_server(tmp_path / "srv", certs, POLICY, extra=extra) as srv:
            tag = f"dsn-postfix-{time.time_ns()}"
            mid = submit(
                srv,
                [
                    (
                        "someone@example.net",
                        ["NOTIFY=SUCCESS", "ORCPT=rfc822;orig+2Bpf@example.net"],
                    ),
                    # RFC 6533's utf-8 type, in the ASCII form kumoauth sends on
                    (
                        "other@example.net",
                        ["NOTIFY=SUCCESS", "ORCPT=utf-8;bj\\x{F8}rn@example.net"],
                    ),
                ],
                f"Subject: {tag}\r\n\r\nbody\r\n".encode(),
                mail_options=["RET=HDRS", "ENVID=pf+2Benv"],
            )
            sink.wait_for(
                lambda e: e.mail_from == SENDER and tag.encode() in (e.original_content or b""),
                timeout=20,
            )
            envelope = sink.wait_for(lambda e: e.mail_from in ("", "<>"), timeout=20)
            wait_queue_empty(srv)
            time.sleep(2)  # a report of kumoauth's own would show by now
            assert f"relay {mid}: success report" not in srv.log()
        assert envelope.rcpt_tos == [SENDER]
        data = envelope.original_content or b""
        _, blocks = dsn_blocks(data)
        assert blocks[0]["Original-Envelope-Id"] == "pf+env"
        assert "X-Kumoauth-Queue-ID" not in blocks[0]  # Postfix's, not kumoauth's
        r, other = sorted(blocks[1:], key=lambda b: b["Final-Recipient"], reverse=True)
        assert r["Action"] == other["Action"] == "relayed"
        assert r["Original-Recipient"] == "rfc822;orig+pf@example.net"
        # Postfix read the \x{F8} kumoauth sent: its report has the UTF-8
        assert "\r\nOriginal-Recipient: utf-8;bjørn@example.net\r\n".encode() in data
        # only one report for that message: Postfix's
        reports = [e for e in list(sink.messages) if e.mail_from in ("", "<>")]
        assert len(reports) == 1, [e.original_content for e in reports]
        assert tag.encode() in data


@pytest.mark.parametrize(
    ("to", "original", "mail", "orcpt"),
    [
        ("rcpt@example.net", "orig@example.net", "", "rfc822;orig@example.net"),
        # nodemailer sends a UTF-8 original recipient as rfc822 with its
        # octets as xtext (+C3+B8): taken, and sent on as RFC 6533's utf-8
        (
            "bjørn@example.net",
            "bjørn@example.net",
            "BODY=8BITMIME SMTPUTF8 ",
            "utf-8;bj\\x{F8}rn@example.net",
        ),
    ],
    ids=["ascii", "utf8"],
)
def test_nodemailer_dsn_options_reach_the_upstream(
    tmp_path: Path, certs: Certs, to: str, original: str, mail: str, orcpt: str
) -> None:
    """A real client's DSN request (nodemailer's `dsn` option) reaches an upstream with DSN."""
    import json
    import subprocess

    from tests.test_oauth_e2e import NODE_DIR, require_nodemailer

    node = require_nodemailer()
    with running_upstream(dsn=True) as up, relaying(tmp_path, certs, up) as srv:
        ca = tmp_path / "client-ca.pem"
        srv.certs.ca.cert_pem.write_to_path(str(ca))
        result = subprocess.run(
            [node, "send_dsn.js", str(srv.starttls_port), str(ca), "scott", to, original],
            input="tiger",
            capture_output=True,
            text=True,
            timeout=60,
            cwd=NODE_DIR,
        )
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
        assert outcome["ok"], outcome
        (m,) = wait_until(lambda: with_tag(up, "nodemailer asking for DSN"), what="the message")
        wait_queue_empty(srv)
    # nodemailer's xtext (ENVID "nm+env=1") arrives as it sent it
    mail_line(m, mail + "RET=HDRS ENVID=nm+2Benv+3D1")
    assert m.lines[1] == f"RCPT TO:<{to}> NOTIFY=SUCCESS,FAILURE ORCPT={orcpt}"
    assert not bounces(up)  # the upstream offers DSN: the reports are its own


def test_the_parameters_cross_from_a_worker_to_the_relay(tmp_path: Path, certs: Certs) -> None:
    """With `[server] workers = 2` a worker queues them and the supervisor's relay sends them."""
    with (
        running_upstream(dsn=True) as up,
        relaying(tmp_path, certs, up, server="workers = 2") as srv,
    ):
        submit(
            srv,
            [("b@example.net", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;o@example.net"])],
            b"Subject: dsn-workers\r\n\r\nx\r\n",
            mail_options=["RET=FULL", "ENVID=w1"],
        )
        (m,) = wait_until(lambda: with_tag(up, "Subject: dsn-workers"), what="the message")
        wait_queue_empty(srv)
    mail_line(m, "RET=FULL ENVID=w1")
    assert m.lines[1:] == [
        "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;o@example.net"
    ]
