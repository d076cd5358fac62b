"""
Delivery status notifications (RFC 3464, RFC 6522, RFC 6533): every field
checked through the stdlib ``email`` parser and a field parser of our own,
plus hypothesis properties: whatever the recipients, the upstream's replies
and the original, the report is well formed and nothing can add a field.
"""

from __future__ import annotations

import binascii
import email
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoauth.relay import dsn
from kumoauth.relay.dsn import FailedRecipient, build_dsn, encode_address, header_section
from kumoauth.smtp.data import has_bare_newline

ARRIVAL = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
ATTEMPT = datetime(2024, 3, 1, 12, 5, 0, tzinfo=UTC)
NOW = datetime(2024, 3, 1, 12, 6, 0, tzinfo=UTC)
ORIGINAL = (
    b"Received: from client (127.0.0.1)\r\n"
    b"\tby relay.example.com; Fri, 1 Mar 2024 12:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch?\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Are you free on Tuesday?\r\n"
)

TOP_FIELDS = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
]
RECIPIENT_FIELDS = {
    "Original-Recipient",
    "Final-Recipient",
    "Action",
    "Status",
    "Remote-MTA",
    "Diagnostic-Code",
    "Last-Attempt-Date",
    "Will-Retry-Until",
}


def failed(address: str = "bob@example.net", **kw: object) -> FailedRecipient:
    args: dict = {
        "address": address,
        "status": "5.1.1",
        "action": "failed",
        "diagnostic": "550 5.1.1 <bob@example.net>: no such user",
        "remote_mta": "mx.example.net",
        "last_attempt": ATTEMPT,
    }
    args.update(kw)
    return FailedRecipient(**args)


def build(*recipients: FailedRecipient, **kw: object) -> bytes | None:
    args: dict = {
        "reporting_mta": "relay.example.com",
        "message_id": "0000018e0000abcd1234",
        "envelope_from": "alice@example.com",
        "arrival": ARRIVAL,
        "recipients": list(recipients) or [failed()],
        "original": ORIGINAL,
        "now": NOW,
    }
    args.update(kw)
    return build_dsn(**args)


def built(*recipients: FailedRecipient, **kw: object) -> bytes:
    out = build(*recipients, **kw)
    assert out is not None
    return out


# -- parsing helpers ----------------------------------------------------------


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def raw_parts(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The three parts as (header section, body), split by hand."""
    boundary = parse(raw).get_boundary()
    assert boundary
    pieces = re.split(rb"\r\n--" + re.escape(boundary.encode()) + rb"(?:--)?\r\n", raw)
    assert pieces[-1] == b""  # nothing after the close delimiter
    parts = []
    for piece in pieces[1:-1]:
        head, sep, body = piece.partition(b"\r\n\r\n")
        assert sep
        parts.append((head + b"\r\n", body))
    return parts


def fields(block: str) -> list[tuple[str, str]]:
    """One block of RFC 822-style fields, unfolded (RFC 5322 §2.2.3)."""
    unfolded = re.sub(r"\r\n(?=[ \t])", "", block)
    out = []
    for line in unfolded.split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        assert colon, f"not a field: {line!r}"
        out.append((name, value.strip()))
    return out


def status_blocks(raw: bytes) -> list[list[tuple[str, str]]]:
    """The delivery-status part's blocks: per-message first, then recipients."""
    head, body = raw_parts(raw)[1]
    text = body.decode("utf-8")
    assert text.endswith("\r\n")
    return [fields(b) for b in text.rstrip("\r\n").split("\r\n\r\n")]


def field(block: list[tuple[str, str]], name: str) -> str | None:
    values = [v for n, v in block if n.lower() == name.lower()]
    assert len(values) <= 1, f"{name} twice"
    return values[0] if values else None


def decode_recipient(value: str) -> str:
    """Final-Recipient's address back (RFC 3464 §2.3.2, RFC 6533 §3)."""
    kind, _, address = value.partition(";")
    # Neither form has white space of its own: any is folding.
    address = re.sub(r"\s", "", address)
    if kind.strip().lower() == "rfc822":
        return address
    assert kind.strip().lower() == "utf-8"
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m[1], 16)), address)


def human_text(raw: bytes) -> str:
    part = list(parse(raw).iter_parts())[0]
    assert isinstance(part, EmailMessage)
    content = part.get_content()
    assert isinstance(content, str)
    return content


def returned(raw: bytes) -> bytes:
    """The third part's content, transfer encoding undone."""
    head, body = raw_parts(raw)[2]
    if b"quoted-printable" in head:
        return binascii.a2b_qp(body)
    return body


def assert_well_formed(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    assert not has_bare_newline(raw)
    for line in raw.split(b"\r\n"):
        assert len(line) <= dsn.MAX_LINE, line[:80]
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert [name for name, _ in msg.items()][: len(TOP_FIELDS)] == TOP_FIELDS
    assert len(msg.items()) in (len(TOP_FIELDS), len(TOP_FIELDS) + 1)
    assert len(list(msg.iter_parts())) == 3
    assert not msg.defects


# -- examples ---------------------------------------------------------------


def test_one_failed_recipient():
    raw = built(failed())
    assert_well_formed(raw)
    msg = parse(raw)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.com>"
    assert b"\r\nTo: <alice@example.com>\r\n" in raw
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]) == NOW
    assert re.fullmatch(r"<[^<>@\s]+@relay\.example\.com>", msg["Message-ID"])
    assert msg.get_param("report-type") == "delivery-status"
    assert "Content-Transfer-Encoding" not in msg
    assert raw.isascii()
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]

    per_message, recipient = status_blocks(raw)
    assert per_message == [
        ("Reporting-MTA", "dns; relay.example.com"),
        ("X-Kumoauth-Queue-ID", "0000018e0000abcd1234"),
        ("Arrival-Date", "Fri, 01 Mar 2024 12:00:00 +0000"),
    ]
    assert recipient == [
        ("Final-Recipient", "rfc822; bob@example.net"),
        ("Action", "failed"),
        ("Status", "5.1.1"),
        ("Remote-MTA", "dns; mx.example.net"),
        ("Diagnostic-Code", "smtp; 550 5.1.1 <bob@example.net>: no such user"),
        ("Last-Attempt-Date", "Fri, 01 Mar 2024 12:05:00 +0000"),
    ]
    assert returned(raw) == header_section(ORIGINAL)

    text = human_text(raw)
    assert "<bob@example.net>: 5.1.1" in text
    assert "mx.example.net said: 550 5.1.1 <bob@example.net>: no such user" in text
    assert "0000018e0000abcd1234" in text
    assert "the header section of your message follow" in text


def test_the_stdlib_reads_the_report_too():
    msg = parse(built(failed(), failed("carol@example.net", status="5.2.2")))
    report = list(msg.iter_parts())[1]
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    assert blocks[0]["Reporting-MTA"] == "dns; relay.example.com"
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@example.net",
        "rfc822; carol@example.net",
    ]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "5.2.2"]


def test_delayed_recipient():
    until = ARRIVAL + timedelta(days=5)
    raw = built(
        failed(
            status="4.4.1",
            action="delayed",
            diagnostic="451 4.4.1 try later",
            will_retry_until=until,
        )
    )
    assert_well_formed(raw)
    assert parse(raw)["Subject"] == "Delayed Mail (still being retried)"
    _, recipient = status_blocks(raw)
    assert field(recipient, "Action") == "delayed"
    assert field(recipient, "Status") == "4.4.1"
    assert field(recipient, "Diagnostic-Code") == "smtp; 451 4.4.1 try later"
    assert field(recipient, "Will-Retry-Until") == "Wed, 06 Mar 2024 12:00:00 +0000"
    text = human_text(raw)
    assert "not yet been delivered" in text
    assert "do not need to send it again" in text


def test_expired_recipient_fails_with_a_4xx_status():
    raw = built(failed(status=dsn.STATUS_EXPIRED, diagnostic="451 4.3.0 busy"))
    assert parse(raw)["Subject"] == "Undelivered Mail Returned to Sender"
    _, recipient = status_blocks(raw)
    assert field(recipient, "Action") == "failed"
    assert field(recipient, "Status") == "4.4.7"


def test_several_recipients_in_order():
    rcpts = [
        failed("b@example.net"),
        failed("a@example.net", status="5.2.2", diagnostic="552 5.2.2 mailbox full"),
        failed("c@example.net", status="4.4.1", action="delayed", diagnostic=None),
    ]
    raw = built(*rcpts)
    assert_well_formed(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"  # not all delayed
    blocks = status_blocks(raw)[1:]
    assert [field(b, "Final-Recipient") for b in blocks] == [
        "rfc822; b@example.net",
        "rfc822; a@example.net",
        "rfc822; c@example.net",
    ]
    assert [field(b, "Action") for b in blocks] == ["failed", "failed", "delayed"]
    assert [field(b, "Status") for b in blocks] == ["5.1.1", "5.2.2", "4.4.1"]
    assert field(blocks[1], "Diagnostic-Code") == "smtp; 552 5.2.2 mailbox full"
    assert field(blocks[2], "Diagnostic-Code") is None
    text = human_text(raw)
    assert text.index("<b@example.net>") < text.index("<a@example.net>")
    assert "mailbox full" in text


def test_without_diagnostic_remote_mta_or_attempt():
    raw = built(failed(diagnostic=None, remote_mta=None, last_attempt=None))
    assert_well_formed(raw)
    _, recipient = status_blocks(raw)
    assert [n for n, _ in recipient] == ["Final-Recipient", "Action", "Status"]
    assert "said:" not in human_text(raw)


def test_diagnostic_without_remote_mta():
    raw = built(failed(remote_mta=None))
    _, recipient = status_blocks(raw)
    assert field(recipient, "Remote-MTA") is None
    assert field(recipient, "Diagnostic-Code") == "smtp; 550 5.1.1 <bob@example.net>: no such user"


def test_blank_diagnostic_and_remote_mta_are_left_out():
    raw = built(failed(diagnostic=" \r\n ", remote_mta="\t"))
    _, recipient = status_blocks(raw)
    assert field(recipient, "Remote-MTA") is None
    assert field(recipient, "Diagnostic-Code") is None


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (dsn.STATUS_NEEDS_SMTPUTF8, "upstream does not offer SMTPUTF8"),
        (dsn.STATUS_TOO_BIG, "message is 30000000 octets, upstream takes 10240000"),
    ],
)
def test_reasons_of_the_relays_own(status, reason):
    raw = built(failed(status=status, diagnostic=reason, remote_mta=None))
    _, recipient = status_blocks(raw)
    assert field(recipient, "Status") == status
    assert field(recipient, "Diagnostic-Code") == f"X-Kumoauth; {reason}"
    assert reason in human_text(raw)


def test_multiline_reply_is_one_field():
    reply = "550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 third line"
    raw = built(failed(status="5.7.1", diagnostic=reply))
    _, recipient = status_blocks(raw)
    assert field(recipient, "Diagnostic-Code") == (
        "smtp; 550-5.7.1 first line 550-5.7.1 second line 550 5.7.1 third line"
    )


@pytest.mark.parametrize(
    "diagnostic",
    [
        "550 x\r\nAction: delivered",
        "550 x\nAction: delivered",
        "550 x\rAction: delivered",
        "550 x\r\n\r\nFinal-Recipient: rfc822; eve@example.org\r\nAction: delivered",
        "550 x\u2028Action: delivered",
        "550 x\x85Action: delivered\x00\x1b[31m",
    ],
)
def test_diagnostic_cannot_inject_fields(diagnostic):
    raw = built(failed(diagnostic=diagnostic))
    assert_well_formed(raw)
    blocks = status_blocks(raw)
    assert len(blocks) == 2
    assert field(blocks[1], "Action") == "failed"
    assert [n for n, _ in blocks[1]].count("Final-Recipient") == 1
    said = field(blocks[1], "Diagnostic-Code")
    assert said is not None and said.startswith("smtp; 550 x ")
    assert not any(ord(c) < 0x20 or c == "\x7f" for c in said)


def test_address_and_sender_cannot_inject_fields():
    raw = built(
        failed("bob@example.net\r\nAction: delivered"),
        envelope_from="alice@example.com>\r\nBcc: eve@example.org",
    )
    assert_well_formed(raw)
    msg = parse(raw)
    assert "Bcc" not in msg
    blocks = status_blocks(raw)
    assert len(blocks) == 2
    assert field(blocks[1], "Action") == "failed"
    recipient = field(blocks[1], "Final-Recipient")
    assert recipient is not None
    assert decode_recipient(recipient) == "bob@example.net\r\nAction: delivered"


def test_long_diagnostic_is_folded():
    words = " ".join(f"word{i}" for i in range(200))
    reply = f"550 5.7.1 {words}"
    raw = built(failed(status="5.7.1", diagnostic=reply))
    assert_well_formed(raw)
    head, body = raw_parts(raw)[1]
    lines = body.split(b"\r\n")
    assert max(len(line) for line in lines) <= dsn.FOLD_WIDTH
    _, recipient = status_blocks(raw)
    assert field(recipient, "Diagnostic-Code") == "smtp; " + reply


def test_unbreakable_diagnostic_stays_under_998_octets():
    raw = built(failed(diagnostic="550 " + "é" * 1900))
    assert_well_formed(raw)
    raw = built(failed(diagnostic="550 " + "x" * 5000), smtputf8=True)
    assert_well_formed(raw)
    _, recipient = status_blocks(raw)
    said = field(recipient, "Diagnostic-Code")
    assert said is not None
    assert said.startswith("smtp; 550 xxx") and said.endswith("x...")


def test_non_ascii_in_an_ascii_report_is_escaped():
    raw = built(failed("józef@example.net", diagnostic="550 nö"))
    assert_well_formed(raw)
    assert raw.isascii()
    _, recipient = status_blocks(raw)
    assert field(recipient, "Final-Recipient") == "utf-8; j\\x{F3}zef@example.net"
    assert field(recipient, "Diagnostic-Code") == "smtp; 550 n\\x{F6}"
    assert "<józef@example.net>" in human_text(raw)


def test_smtputf8_report_uses_the_global_types():
    raw = built(
        failed("józef@example.net", diagnostic="550 5.1.1 nö user"),
        failed("plain@example.net"),
        envelope_from="ålice@example.com",
        original=b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n",
        smtputf8=True,
    )
    assert_well_formed(raw)
    msg = parse(raw)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert "\r\nTo: <ålice@example.com>\r\n".encode() in raw
    assert msg["Content-Transfer-Encoding"] == "8bit"
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global-headers"]
    blocks = status_blocks(raw)
    assert field(blocks[1], "Final-Recipient") == "utf-8; józef@example.net"
    assert field(blocks[1], "Diagnostic-Code") == "smtp; 550 5.1.1 nö user"
    assert field(blocks[2], "Final-Recipient") == "rfc822; plain@example.net"
    assert returned(raw) == b"Subject: caf\xc3\xa9\r\n"


def test_non_ascii_sender_implies_smtputf8():
    raw = built(envelope_from="ålice@example.com")
    assert parse(raw).get_param("report-type") == "global-delivery-status"


def test_full_return():
    raw = built(return_content="full")
    assert_well_formed(raw)
    msg = parse(raw)
    part = list(msg.iter_parts())[2]
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_content()
    assert inner["Subject"] == "lunch?"
    assert returned(raw) == ORIGINAL
    assert "A technical report and your message follow." in human_text(raw)


def test_full_return_of_8bit_mail():
    original = b"Subject: x\r\nContent-Type: text/plain; charset=latin-1\r\n\r\ncaf\xe9\r\n"
    raw = built(return_content="full", original=original)
    assert_well_formed(raw)
    head, _ = raw_parts(raw)[2]
    assert head == b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n"
    assert parse(raw)["Content-Transfer-Encoding"] == "8bit"
    assert returned(raw) == original


def test_full_return_that_cannot_travel_falls_back_to_headers():
    original = b"Subject: x\r\n\r\n" + b"y" * 2000 + b"\r\n"
    raw = built(return_content="full", original=original)
    assert_well_formed(raw)
    assert list(parse(raw).iter_parts())[2].get_content_type() == "text/rfc822-headers"
    assert returned(raw) == b"Subject: x\r\n"


def test_full_return_global():
    original = b"Subject: caf\xc3\xa9\r\n\r\n\x00" + b"y" * 2000 + b"\r\n"
    raw = built(return_content="full", original=original, smtputf8=True)
    assert_well_formed(raw)
    head, _ = raw_parts(raw)[2]
    assert head.startswith(b"Content-Type: message/global\r\n")
    assert returned(raw) == original


def test_broken_headers_are_quoted_printable():
    original = b"Subject: \x00caf\xe9\rX-Long: " + b"z" * 1500 + b"\nTo: x\r\n\r\nbody"
    raw = built(original=original)
    assert_well_formed(raw)
    assert raw.isascii()
    head, _ = raw_parts(raw)[2]
    assert b"Content-Transfer-Encoding: quoted-printable" in head
    assert returned(raw) == (b"Subject: \x00caf\xe9\r\nX-Long: " + b"z" * 1500 + b"\r\nTo: x\r\n")


def test_8bit_headers_in_an_ascii_report_stay_7bit():
    raw = built(original=b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n")
    assert raw.isascii()
    head, _ = raw_parts(raw)[2]
    assert head == (
        b'Content-Type: text/rfc822-headers; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )
    assert returned(raw) == b"Subject: caf\xc3\xa9\r\n"


def test_sender_in_angle_brackets():
    raw = built(envelope_from="<alice@example.com>")
    assert b"\r\nTo: <alice@example.com>\r\n" in raw


@pytest.mark.parametrize("sender", ["", "<>", " <> ", "  ", "< >"])
def test_null_sender_gets_no_bounce(sender):
    assert build(envelope_from=sender) is None


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n",
        b'Content-Type: Multipart/Report;\r\n\tboundary="x"; report-type="Delivery-Status"\r\n',
        b"Content-Type: multipart/report; report-type=global-delivery-status; boundary=x\r\n",
        b"Content-Type: multipart/report; report-type*=utf-8''delivery-status\r\n",
        b"Content-Type: multipart/report; report-type*0=deliv; report-type*1=ery-status\r\n",
        b"Content-Type: multipart/report;\r\n report-type=delivery-status\r\n",
    ],
)
def test_reports_get_no_bounce(headers):
    original = b"From: x@example.com\r\n" + headers + b"\r\nbody\r\n"
    assert build(original=original) is None
    assert build(original=original.replace(b"\r\n", b"\n")) is None


@pytest.mark.parametrize(
    "headers",
    [
        b"Auto-Submitted: no\r\n",
        b"Auto-Submitted: No (a person wrote this)\r\n",
        # RFC 3834 is about automatic responses, not delivery reports (its
        # §1.2): automatic mail from a real address has a sender to tell.
        b"Auto-Submitted: auto-replied\r\n",
        b"Auto-Submitted: auto-generated; owner-email=x@example.com\r\n",
        b"Auto-Submitted: \xff\xfe\r\n",
        b"Content-Type: multipart/report; report-type=disposition-notification; boundary=x\r\n",
        b"Content-Type: multipart/mixed; boundary=x\r\n",
        b"Content-Type: text/plain; report-type=delivery-status\r\n",
        b'Content-Type: multipart/report; report-type="\xff"\r\n',
        b"Content-Type: \xff\x00;;;=\r\n",
    ],
)
def test_ordinary_mail_gets_a_bounce(headers):
    assert build(original=b"From: x@example.com\r\n" + headers + b"\r\nbody\r\n") is not None


def test_report_type_in_the_body_does_not_count():
    original = b"Subject: x\r\n\r\nContent-Type: multipart/report; report-type=delivery-status\r\n"
    assert build(original=original) is not None


def test_boundary_is_not_in_the_content(monkeypatch):
    real = dsn.secrets.token_hex
    tokens = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr(dsn.secrets, "token_hex", lambda n: next(tokens, None) or real(n))
    original = b"Subject: x\r\nX-Trap: =_kumoauth_" + b"a" * 32 + b"\r\n\r\n"
    raw = built(original=original)
    assert parse(raw).get_boundary() == "=_kumoauth_" + "b" * 32
    assert_well_formed(raw)


def test_message_ids_are_unique():
    ids = {parse(built())["Message-ID"] for _ in range(20)}
    assert len(ids) == 20


def test_dates():
    later = datetime(2024, 3, 1, 14, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    raw = built(failed(last_attempt=later), arrival=datetime(2024, 3, 1, 12, 0, 0))
    per_message, recipient = status_blocks(raw)
    assert field(per_message, "Arrival-Date") == "Fri, 01 Mar 2024 12:00:00 +0000"  # naive: UTC
    assert field(recipient, "Last-Attempt-Date") == "Fri, 01 Mar 2024 14:00:00 +0200"


def test_now_defaults_to_the_clock():
    before = datetime.now(UTC).replace(microsecond=0)
    raw = built(now=None)
    assert before <= parsedate_to_datetime(parse(raw)["Date"]) <= datetime.now(UTC)


@pytest.mark.parametrize(
    "kw",
    [
        {"status": "5.1"},
        {"status": "6.1.1"},
        {"status": "5.1.1\r\nAction: delivered"},
        {"status": "5.1.1", "action": "delivered"},
        {"status": "5.1.1", "action": "delayed"},
    ],
)
def test_invalid_recipients_are_refused(kw):
    with pytest.raises(ValueError):
        FailedRecipient(address="bob@example.net", **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"recipients": []},
        {"reporting_mta": ""},
        {"reporting_mta": "relay.example.com\r\nBcc: eve@example.org"},
        {"reporting_mta": "relay example"},
    ],
)
def test_invalid_arguments_are_refused(kw):
    with pytest.raises(ValueError):
        build_dsn(
            **{
                "reporting_mta": "relay.example.com",
                "message_id": "q",
                "envelope_from": "alice@example.com",
                "arrival": ARRIVAL,
                "recipients": [failed()],
                "original": ORIGINAL,
                **kw,
            }
        )


@pytest.mark.parametrize(
    ("message", "section"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\r\n", b"A: 1\r\n"),
        (b"A: 1", b"A: 1\r\n"),
        (b"\r\nbody", b""),
        (b"", b""),
    ],
)
def test_header_section(message, section):
    assert header_section(message) == section


@pytest.mark.parametrize(
    ("address", "utf8", "value"),
    [
        ("bob@example.net", False, "rfc822; bob@example.net"),
        ("bob+tag=x@example.net", False, "rfc822; bob+tag=x@example.net"),
        ('"b b"@example.net', False, 'utf-8; "b\\x{20}b"@example.net'),
        ("b+é@example.net", False, "utf-8; b\\x{2B}\\x{E9}@example.net"),
        ("b+é@example.net", True, "utf-8; b\\x{2B}é@example.net"),
        ("b\\😀@example.net", True, "utf-8; b\\x{5C}😀@example.net"),
        ("b\\😀@example.net", False, "utf-8; b\\x{5C}\\x{1F600}@example.net"),
        ("\u3000\x00@x", True, "utf-8; \\x{3000}\\x{0}@x"),
    ],
)
def test_encode_address(address, utf8, value):
    assert encode_address(address, utf8) == value
    assert decode_recipient(value) == address


# -- properties -------------------------------------------------------------

addresses = st.text(min_size=1, max_size=80)
diagnostics = st.one_of(
    st.none(),
    st.text(max_size=300),
    st.builds(
        lambda code, text: f"{code} {text}",
        st.integers(200, 599),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=300),
    ),
    st.sampled_from(["x\r\nAction: delivered", "550 a\r\n\r\nFinal-Recipient: rfc822; e@x"]),
)
moments = st.one_of(st.none(), st.datetimes(timezones=st.just(UTC)))
recipient = st.builds(
    FailedRecipient,
    address=addresses,
    status=st.sampled_from(["5.1.1", "5.0.0", "4.4.7", "5.6.7", "5.3.4"]),
    action=st.just("failed"),
    diagnostic=diagnostics,
    remote_mta=st.one_of(st.none(), st.text(max_size=40)),
    last_attempt=moments,
    # an ORCPT as dsnparams decodes it (any address: the report must hold)
    original=st.one_of(st.none(), st.tuples(st.sampled_from(["rfc822", "utf-8"]), addresses)),
) | st.builds(
    FailedRecipient,
    address=addresses,
    status=st.sampled_from(["4.4.1", "4.0.0"]),
    action=st.just("delayed"),
    diagnostic=diagnostics,
    remote_mta=st.one_of(st.none(), st.text(max_size=40)),
    last_attempt=moments,
    will_retry_until=moments,
)
header_names = st.sampled_from([b"Subject", b"From", b"To", b"X-Thing", b"Received", b"Date"])
header_lines = st.one_of(
    st.builds(lambda n, v: n + b": " + v, header_names, st.binary(max_size=200)),
    st.binary(max_size=200),
    st.builds(lambda n: b"x" * n, st.integers(990, 1100)),
)
originals = st.one_of(
    st.binary(max_size=2000),
    st.builds(
        lambda lines, sep, body: sep.join(lines) + sep + sep + body,
        st.lists(header_lines, max_size=10),
        st.sampled_from([b"\r\n", b"\n", b"\r"]),
        st.binary(max_size=300),
    ),
)


def _might_be_a_report(original: bytes) -> bool:
    return b"report" in original.lower()


@given(
    st.lists(recipient, min_size=1, max_size=5),
    originals,
    st.booleans(),
    st.sampled_from(["headers", "full"]),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60),
    st.one_of(
        st.none(), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=100)
    ),
)
def test_any_report_is_well_formed(recipients, original, smtputf8, what, message_id, envid):
    raw = build(
        *recipients,
        original=original,
        smtputf8=smtputf8,
        return_content=what,
        message_id=message_id,
        envid=envid,
    )
    if raw is None:
        assert _might_be_a_report(original)
        return
    assert_well_formed(raw)
    msg = parse(raw)
    utf8 = msg.get_param("report-type") == "global-delivery-status"
    assert utf8 == smtputf8
    if not smtputf8 and what == "headers":
        assert raw.isascii()

    per_message, *blocks = status_blocks(raw)
    first = [] if envid is None else ["Original-Envelope-Id"]
    assert [n for n, _ in per_message] == [
        *first,
        "Reporting-MTA",
        "X-Kumoauth-Queue-ID",
        "Arrival-Date",
    ]
    assert len(blocks) == len(recipients)
    for block, r in zip(blocks, recipients, strict=True):
        names = [n for n, _ in block]
        assert len(names) == len(set(names))
        assert set(names) <= RECIPIENT_FIELDS
        if r.original is not None:
            assert names[0] == "Original-Recipient"
            names = names[1:]
            kind, address = r.original
            value = field(block, "Original-Recipient")
            assert value is not None
            if kind == "rfc822" and address.isascii() and address.isprintable():
                # as given, runs of spaces kept (field() strips the ends)
                assert value == f"rfc822; {address}".rstrip()
            else:
                assert decode_recipient(value) == address
        assert names[:3] == ["Final-Recipient", "Action", "Status"]
        value = field(block, "Final-Recipient")
        assert value is not None
        assert decode_recipient(value) == r.address
        assert field(block, "Action") == r.action
        assert field(block, "Status") == r.status
        assert ("Last-Attempt-Date" in names) == (r.last_attempt is not None)
        said = field(block, "Diagnostic-Code")
        if r.diagnostic is None or not r.diagnostic.split():
            assert said is None
        elif (
            r.diagnostic.isascii()
            and r.diagnostic.isprintable()
            and len(r.diagnostic) <= dsn.MAX_DIAGNOSTIC
        ):
            assert said is not None
            assert said.split("; ", 1)[1] == " ".join(r.diagnostic.split())

    section = header_section(re.sub(rb"\r\n|\r|\n", b"\r\n", original))
    assert returned(raw) in (section, re.sub(rb"\r\n|\r|\n", b"\r\n", original))


# -- the DSN extension's fields (RFC 3461 via RFC 3464) ---------------------


def relayed(address: str = "bob@example.net", **kw: object) -> FailedRecipient:
    args: dict = {
        "status": "2.0.0",
        "action": "relayed",
        "diagnostic": "250 2.0.0 Ok: queued as 4Zx",
    }
    args.update(kw)
    return failed(address, **args)


def test_envid_and_orcpt_are_returned_as_given():
    raw = built(
        failed(original=("rfc822", "bob.alias@example.net")),
        failed("carol@example.net", original=("utf-8", "пётр@example.net")),
        envid="QQ314159+x",
    )
    assert_well_formed(raw)
    head, bob, carol = status_blocks(raw)
    assert head[0] == ("Original-Envelope-Id", "QQ314159+x")
    assert field(bob, "Original-Recipient") == "rfc822; bob.alias@example.net"
    assert bob[0][0] == "Original-Recipient"  # before Final-Recipient (RFC 3464 §2.3)
    # a 7-bit report: the utf-8 address type in its \x{HEX} form
    value = field(carol, "Original-Recipient")
    assert value == r"utf-8; \x{43F}\x{451}\x{442}\x{440}@example.net"
    assert decode_recipient(value) == "пётр@example.net"


def test_without_envid_or_orcpt_there_are_no_such_fields():
    raw = built(failed())
    head, bob = status_blocks(raw)
    assert field(head, "Original-Envelope-Id") is None
    assert field(bob, "Original-Recipient") is None


def test_a_utf8_orcpt_in_a_global_report_is_unitext():
    raw = built(failed(original=("utf-8", "пётр+1@example.net")), smtputf8=True)
    _, bob = status_blocks(raw)
    assert field(bob, "Original-Recipient") == r"utf-8; пётр\x{2B}1@example.net"


def test_a_relayed_report_returns_headers_only_whatever_ret_says():
    raw = built(relayed(), return_content="full", envid="e1")
    assert_well_formed(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Successful Mail Relay Report"
    _, bob = status_blocks(raw)
    assert field(bob, "Action") == "relayed"
    assert field(bob, "Status") == "2.0.0"
    assert returned(raw) == header_section(ORIGINAL)
    assert "handed on" in human_text(raw)


def test_relayed_recipients_are_not_reported_with_failed_ones():
    with pytest.raises(ValueError, match="apart"):
        build(relayed(), failed("carol@example.net"))
    with pytest.raises(ValueError, match="2.x.x"):
        relayed(status="5.0.0")
    with pytest.raises(ValueError, match="only a relayed"):
        failed(status="2.0.0")


def test_an_original_recipient_is_returned_with_its_spaces():
    # RFC 3464 §2.3.1: the address "as specified by the sender"
    raw = built(failed(original=("rfc822", '"a  b"@example.net')))
    assert b'\r\nOriginal-Recipient: rfc822; "a  b"@example.net\r\n' in raw


def test_the_envid_is_returned_with_its_spaces():
    # RFC 3464 §2.2.1: "original case and spelling"
    raw = built(failed(), envid=" a  b ")
    assert b"\r\nOriginal-Envelope-Id:  a  b \r\n" in raw


def test_ret_full_of_a_large_original_returns_its_headers_and_says_why():
    big = ORIGINAL + b"x" * dsn.FULL_RETURN_LIMIT + b"\r\n"
    raw = built(failed(), original=big, return_content="full")
    assert_well_formed(raw)
    assert returned(raw) == header_section(ORIGINAL)
    assert "too large to be returned whole" in human_text(raw)
    # exactly the limit is returned whole; one octet more is not
    at_limit = of_size(dsn.FULL_RETURN_LIMIT)
    assert returned(built(failed(), original=at_limit, return_content="full")) == at_limit
    over = returned(
        built(failed(), original=of_size(dsn.FULL_RETURN_LIMIT + 1), return_content="full")
    )
    assert over == header_section(ORIGINAL)


def of_size(size: int) -> bytes:
    """ORIGINAL and lines of x: exactly *size* octets."""
    fill = size - len(ORIGINAL)
    lines, rest = divmod(fill, 100)
    last = b"y" * (rest + 98) + b"\r\n" if rest else b""
    body = ORIGINAL + (b"x" * 98 + b"\r\n") * (lines - 1 if rest else lines) + last
    assert len(body) == size
    return body


def test_a_report_type_is_read_from_the_start_of_a_long_content_type():
    # the stdlib parser is quadratic on some long values: only the first
    # 2 KiB are parsed, where a real report names its type
    report = (
        b"Content-Type: multipart/report; report-type=delivery-status;"
        + b" x=y;" * 20_000
        + b"\r\n\r\n"
    )
    assert dsn.is_report(report)
    padded = (
        b"Content-Type: multipart/report;" + b";" * 50_000 + b" report-type=delivery-status\r\n\r\n"
    )
    assert not dsn.is_report(padded)  # past what is looked at: bounced like any message
