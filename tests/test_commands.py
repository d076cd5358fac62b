"""
Command-line parsing (RFC 5321 §4.1): examples and hypothesis properties.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoauth.smtp.commands import (
    CommandError,
    check_mail_params,
    is_mailbox,
    parse_command,
    parse_path,
    reply_lines,
)


@pytest.mark.parametrize(
    "line,verb,arg",
    [
        (b"EHLO client.example", "EHLO", b"client.example"),
        (b"ehlo  client.example ", "EHLO", b"client.example"),
        (b"QUIT", "QUIT", b""),
        (b"MAIL FROM:<a@b.c>", "MAIL", b"FROM:<a@b.c>"),
        (b"", "", b""),
        (b"\xff\xfe", "", b""),
        (b"MA1L x", "", b""),
    ],
)
def test_parse_command(line, verb, arg):
    assert parse_command(line) == (verb, arg)


@given(st.binary(max_size=2000))
def test_parse_command_never_raises(line):
    verb, arg = parse_command(line)
    assert verb == "" or (verb.isalpha() and verb.isupper())


@pytest.mark.parametrize(
    "arg,address,params",
    [
        (b"FROM:<a@example.com>", "a@example.com", {}),
        (b"from:<a@example.com>", "a@example.com", {}),
        (b"FROM: <a@example.com>", "a@example.com", {}),
        (b"FROM:<>", "", {}),
        (b"FROM:<@relay.example:a@example.com>", "a@example.com", {}),
        (b'FROM:<"john doe"@example.com>', '"john doe"@example.com', {}),
        (b"FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]", {}),
        (
            b"FROM:<a@example.com> SIZE=100 body=8bitmime",
            "a@example.com",
            {"SIZE": "100", "BODY": "8bitmime"},
        ),
        (b"FROM:<a@example.com> AUTH=<>", "a@example.com", {"AUTH": "<>"}),
        (b"FROM:<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", {}),
        (b"FROM:<a@[ipv6:::ffff:192.0.2.1]>", "a@[ipv6:::ffff:192.0.2.1]", {}),
        # The same parameter twice with the same value is taken once:
        # smtplib's send_message adds SMTPUTF8 and BODY=8BITMIME to its
        # caller's options.
        (
            b"FROM:<a@example.com> size=9 SMTPUTF8 SMTPUTF8 BODY=8BITMIME body=8bitmime",
            "a@example.com",
            {"SIZE": "9", "SMTPUTF8": None, "BODY": "8BITMIME"},
        ),
    ],
)
def test_parse_mail_path(arg, address, params):
    path = parse_path(arg, b"FROM", allow_null=True)
    assert path.address == address
    assert path.params == params


@pytest.mark.parametrize(
    "arg,code",
    [
        (b"FROM a@example.com", b"501 5.5.4"),
        (b"FROM:a@example.com", b"501 5.5.4"),
        (b"FROM:<a@example.com", b"501 5.5.4"),
        (b"FROM:<a@example.com>x", b"501 5.5.4"),
        (b"FROM:<a b@example.com>", b"501 5.1.7"),
        (b"FROM:<a@-example.com>", b"501 5.1.7"),
        (b"FROM:<@relay.example:>", b"501 5.1.7"),
        (b"FROM:<\xc3\xa9@example.com>", b"501 5.1.7"),
        (b"FROM:<a@example.com> SIZE=1 SIZE=2", b"501 5.5.4"),
        (b"FROM:<a@example.com> =x", b"501 5.5.4"),
        (b"FROM:<a@example.com> BODY=7BIT body=8bitmime", b"501 5.5.4 Conflicting"),
        # Address literals are IPv4 or IPv6 (RFC 5321 §4.1.3).
        (b"FROM:<a@[foo]>", b"501 5.1.7"),
        (b"FROM:<a@[192.0.2.256]>", b"501 5.1.7"),
        (b"FROM:<a@[IPv6:192.0.2.1]>", b"501 5.1.7"),
        (b"FROM:<a@[IPv6:fe80::1%eth0]>", b"501 5.1.7"),
        (b"FROM:<a@[x-tag:content]>", b"501 5.1.7"),
    ],
)
def test_bad_mail_paths(arg, code):
    with pytest.raises(CommandError) as e:
        parse_path(arg, b"FROM", allow_null=True)
    assert e.value.reply.startswith(code)


@pytest.mark.parametrize(
    "arg,address",
    [
        (b'FROM:<"a>b"@example.com>', '"a>b"@example.com'),
        (b'FROM:<"a\\">b"@example.com> SIZE=5', '"a\\">b"@example.com'),
        (b'FROM:<"x y"@example.com>', '"x y"@example.com'),
    ],
)
def test_a_quoted_local_part_may_hold_the_closing_bracket(arg, address):
    # qtextSMTP includes ">" (RFC 5321 §4.1.2): the path ends at the first
    # ">" outside the quotes.
    assert parse_path(arg, b"FROM", allow_null=True).address == address


def test_null_recipient_is_bad():
    with pytest.raises(CommandError) as e:
        parse_path(b"TO:<>", b"TO", allow_null=False)
    assert e.value.reply.startswith(b"501 5.1.3")


@given(st.binary(max_size=400))
def test_parse_path_raises_only_command_error(arg):
    try:
        path = parse_path(arg, b"FROM", allow_null=True)
    except CommandError as e:
        assert e.reply[:1] in (b"5",)
    else:
        assert path.address == "" or is_mailbox(path.address)


local = st.from_regex(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\.[A-Za-z0-9_-]{1,10}){0,2}", fullmatch=True
)
domain = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,6}){1,2}", fullmatch=True)


@given(local, domain, st.sampled_from([b"", b" SIZE=10", b" BODY=7BIT AUTH=<>"]))
def test_valid_addresses_round_trip(lp, dom, params):
    address = f"{lp}@{dom}"
    path = parse_path(b"TO:<" + address.encode() + b">" + params, b"TO", allow_null=False)
    assert path.address == address


@pytest.mark.parametrize(
    "params,code",
    [
        ({"SIZE": "x"}, b"501 5.5.4"),
        ({"SIZE": None}, b"501 5.5.4"),
        ({"SIZE": "101"}, b"552 5.3.4"),
        ({"BODY": "BINARYMIME"}, b"501 5.5.4"),
        ({"AUTH": None}, b"501 5.5.4"),
        ({"SMTPUTF8": "yes"}, b"501 5.5.4"),
        ({"X-UNKNOWN": None}, b"555 5.5.4"),
    ],
)
def test_bad_mail_params(params, code):
    with pytest.raises(CommandError) as e:
        check_mail_params(params, 100)
    assert e.value.reply.startswith(code)


def test_good_mail_params():
    check_mail_params({"SIZE": "100", "BODY": "7bit", "AUTH": "<>"}, 100)


def test_reply_lines():
    assert reply_lines(250, ["a", "b", "c"]) == b"250-a\r\n250-b\r\n250 c\r\n"
    assert reply_lines(221, ["bye"]) == b"221 bye\r\n"
