"""
The DSN extension's parameters (RFC 3461 §4, RFC 6533 §3): what a client
may give, what it decodes to, and that what the relay sends on decodes
back to the same thing (hypothesis).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kumoauth.smtp import dsnparams
from kumoauth.smtp.commands import (
    CommandError,
    check_mail_params,
    check_rcpt_params,
    parse_params,
)
from kumoauth.smtp.dsnparams import ParamError, Rcpt, Requested

MAX = 10_000_000


@given(st.text(max_size=200))
def test_xtext_is_visible_ascii_without_plus_or_equals_unescaped(value):
    encoded = dsnparams.xtext(value)
    assert encoded.isascii() and encoded.isprintable() and " " not in encoded
    assert "=" not in encoded
    # and it decodes back (RFC 3461: +HH), whatever the octets
    raw = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m[1], 16)), encoded).encode("latin-1")
    assert raw == value.encode("utf-8", "surrogateescape")


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_xtext_round_trips_printable_ascii(value):
    encoded = dsnparams.xtext(value)
    assert all(0x21 <= ord(c) <= 0x7E and c not in "+=" or c == "+" for c in encoded)
    assert dsnparams.unxtext(encoded) == value


@pytest.mark.parametrize(
    "value",
    ["a+2b", "a+2", "a=b", "a b", "+0D", "+7F", "caf\u00e9", "+C3+A9"],
)
def test_unxtext_refuses_what_is_not_xtext_or_not_printable_ascii(value):
    with pytest.raises(ParamError):
        dsnparams.unxtext(value)


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("NEVER", "NEVER"),
        ("never", "NEVER"),
        ("FAILURE", "FAILURE"),
        ("DELAY,SUCCESS", "SUCCESS,DELAY"),
        ("failure,delay,success", "SUCCESS,FAILURE,DELAY"),
    ],
)
def test_notify_takes_never_or_a_list(value, canonical):
    assert dsnparams.parse_notify(value) == canonical


@pytest.mark.parametrize(
    "value", [None, "", "NEVER,SUCCESS", "SUCCESS,SUCCESS", "SUCCESS,", "ALWAYS", "NEVER,"]
)
def test_notify_refuses_anything_else(value):
    with pytest.raises(ParamError):
        dsnparams.parse_notify(value)


def test_ret_and_envid():
    assert dsnparams.parse_ret("hdrs") == "HDRS"
    assert dsnparams.parse_ret("FULL") == "FULL"
    for bad in (None, "", "BODY"):
        with pytest.raises(ParamError):
            dsnparams.parse_ret(bad)
    assert dsnparams.parse_envid("QQ+2B1") == "QQ+1"
    assert dsnparams.parse_envid("x" * 100) == "x" * 100
    for bad in (None, "", "x" * 101, "a+0Ab"):
        with pytest.raises(ParamError):
            dsnparams.parse_envid(bad)


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("rfc822;bob@example.net", ("rfc822", "bob@example.net")),
        ("RFC822;bob+2Bx@example.net", ("rfc822", "bob+x@example.net")),
        ("utf-8;p\\x{E9}ter@example.net", ("utf-8", "péter@example.net")),
        ("utf-8;a\\x{2B}b@example.net", ("utf-8", "a+b@example.net")),
        ("x400;c+3Dus+3Ba+3Dx", ("x400", "c=us;a=x")),
        # UTF-8 octets as xtext (nodemailer; Postfix for mail not flagged
        # SMTPUTF8): an internationalized address, the utf-8 type
        ("rfc822;bj+C3+B8rn@example.net", ("utf-8", "bjørn@example.net")),
        ("utf-8;bj+C3+B8rn@ex\\x{E4}mple.net", ("utf-8", "bjørn@exämple.net")),
    ],
)
def test_orcpt_decodes(value, decoded):
    assert dsnparams.parse_orcpt(value) == decoded


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "bob@example.net",  # no type
        ";bob@example.net",
        "rfc822;",
        "rfc 822;bob@example.net",
        "utf-8;a\\b@example.net",  # a backslash not in \x{…}
        "utf-8;a\\x{D800}b",  # a surrogate
        "utf-8;a\\x{110000}b",
        "utf-8;a\\x{0}b",  # does not print
        "rfc822;" + "a" * 500,
        "rfc822;bj+C3rn@example.net",  # octets that are not UTF-8
        "rfc822;a+E2+80+AEb@example.net",  # RIGHT-TO-LEFT OVERRIDE: does not print
        "rfc822;a+C2+85b@example.net",  # a C1 control
        "x400;c+3Dj+C3+B8",  # only an address type takes UTF-8
    ],
)
def test_orcpt_refuses(value):
    with pytest.raises(ParamError):
        dsnparams.parse_orcpt(value)


_ADDRESS = st.text(
    # what parse_orcpt takes: printable characters (SPACE the only separator)
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"),
        whitelist_characters=" ",
    ),
    min_size=1,
    max_size=40,  # 40 × "\x{10FFFF}" fits the 500 of an ORCPT sent on
)


@given(_ADDRESS, st.sampled_from(["rfc822", "utf-8", "x400"]))
def test_what_the_relay_sends_decodes_to_what_was_given(address, kind):
    value = dsnparams.orcpt_xtext(kind, address)
    assert value.isascii() and " " not in value
    kind_back, address_back = dsnparams.parse_orcpt(value)
    assert address_back == address
    # an address that is not ASCII travels as the utf-8 type
    assert kind_back == (kind if kind != "utf-8" and address.isascii() else "utf-8")


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=33))
def test_an_envid_goes_on_as_it_came(envid):
    given_ = dsnparams.xtext(envid)
    if not given_ or len(given_) > dsnparams.MAX_ENVID:
        return
    requested = Requested.of(dsnparams.stored("HDRS", dsnparams.parse_envid(given_), {}))
    assert dsnparams.mail_params(requested) == ["RET=HDRS", f"ENVID={given_}"]


def test_stored_and_read_back():
    value = dsnparams.stored(
        "FULL",
        "e1",
        {
            "a@x": Rcpt("SUCCESS,FAILURE", ("rfc822", "orig@x")),
            "b@x": Rcpt("NEVER"),
            "c@x": Rcpt(),
        },
    )
    assert value == {
        "ret": "FULL",
        "envid": "e1",
        "rcpt": {
            "a@x": {"notify": "SUCCESS,FAILURE", "orcpt": ["rfc822", "orig@x"]},
            "b@x": {"notify": "NEVER"},
        },
    }
    requested = Requested.of(value)
    assert requested.wants("a@x", "SUCCESS") and requested.wants("a@x", "FAILURE")
    assert not requested.wants("b@x", "FAILURE") and not requested.wants("b@x", "SUCCESS")
    # without NOTIFY: failures only (RFC 3461 §4.1)
    assert requested.wants("c@x", "FAILURE") and not requested.wants("c@x", "SUCCESS")
    assert dsnparams.rcpt_params(requested, "a@x") == [
        "NOTIFY=SUCCESS,FAILURE",
        "ORCPT=rfc822;orig@x",
    ]
    assert dsnparams.rcpt_params(requested, "c@x") == []
    assert dsnparams.stored(None, None, {"c@x": Rcpt()}) is None


@pytest.mark.parametrize("junk", [None, 1, "x", [], {"ret": "ALL", "envid": 3, "rcpt": {"a": 1}}])
def test_a_damaged_envelope_value_reads_as_nothing_asked(junk):
    requested = Requested.of(junk)
    assert requested.ret is None and requested.envid is None
    assert requested.wants("a", "FAILURE") and not requested.wants("a", "SUCCESS")


def test_the_commands_take_the_parameters_only_when_dsn_is_offered():
    mail = parse_params(b"RET=FULL ENVID=QQ+2B1")
    assert check_mail_params(mail, MAX, dsn=True) == ("FULL", "QQ+1")
    assert check_mail_params(parse_params(b"SIZE=10"), MAX, dsn=True) == (None, None)
    with pytest.raises(CommandError) as e:
        check_mail_params(mail, MAX, dsn=False)
    assert e.value.reply == b"555 5.5.4 Unsupported parameter RET"
    rcpt = parse_params(b"NOTIFY=success ORCPT=rfc822;b+2B1@x")
    assert check_rcpt_params(rcpt, True) == Rcpt("SUCCESS", ("rfc822", "b+1@x"))
    with pytest.raises(CommandError) as e:
        check_rcpt_params(rcpt, False)
    assert e.value.reply == b"555 5.5.4 Unsupported parameter NOTIFY"
    with pytest.raises(CommandError) as e:
        check_rcpt_params(parse_params(b"FOO=1"), True)
    assert e.value.reply == b"555 5.5.4 Unsupported parameter FOO"


@pytest.mark.parametrize(
    ("verb", "line", "name"),
    [
        ("MAIL", b"RET=ALL", b"RET"),
        ("MAIL", b"RET", b"RET"),
        ("MAIL", b"ENVID=a+0Db", b"ENVID"),
        ("MAIL", b"ENVID", b"ENVID"),
        ("RCPT", b"NOTIFY=NEVER,FAILURE", b"NOTIFY"),
        ("RCPT", b"NOTIFY", b"NOTIFY"),
        ("RCPT", b"ORCPT=bob@example.net", b"ORCPT"),
        ("RCPT", b"ORCPT", b"ORCPT"),
    ],
)
def test_a_malformed_parameter_is_501(verb, line, name):
    with pytest.raises(CommandError) as e:
        if verb == "MAIL":
            check_mail_params(parse_params(line), MAX, dsn=True)
        else:
            check_rcpt_params(parse_params(line), True)
    assert e.value.reply == b"501 5.5.4 Bad " + name + b" parameter"
    assert e.value.protocol_error


def test_an_orcpt_that_would_grow_past_500_sent_on_is_refused():
    # "+2B" is three characters as xtext, six as the utf-8 type's "\x{2B}"
    value = "utf-8;" + "+2B" * 163 + "@x"
    assert len(value) <= dsnparams.MAX_ORCPT
    with pytest.raises(ParamError, match="longer than 500"):
        dsnparams.parse_orcpt(value)
    kind, address = dsnparams.parse_orcpt("utf-8;" + "+2B" * 80 + "@x")
    assert len(dsnparams.orcpt_xtext(kind, address)) <= dsnparams.MAX_ORCPT


def test_rcpt_parameters_need_ehlo():
    with pytest.raises(CommandError) as e:
        check_rcpt_params(parse_params(b"NOTIFY=NEVER"), True, esmtp=False)
    assert e.value.reply == b"555 5.5.4 RCPT parameters need EHLO"


def test_an_envid_or_orcpt_given_twice_must_be_the_same_in_case_too():
    # xtext is case-sensitive: "abc" and "ABC" are two envelope ids
    with pytest.raises(CommandError):
        parse_params(b"ENVID=abc ENVID=ABC")
    with pytest.raises(CommandError):
        parse_params(b"ORCPT=rfc822;a@x ORCPT=rfc822;A@x")
    assert parse_params(b"ENVID=abc ENVID=abc") == {"ENVID": "abc"}
    # other values still fold: smtplib repeats BODY=8BITMIME as it likes
    assert parse_params(b"BODY=8bitmime BODY=8BITMIME") == {"BODY": "8bitmime"}


def test_the_utf8_type_takes_hex_digits_in_either_case():
    assert dsnparams.parse_orcpt("utf-8;p\\x{e9}ter@x") == ("utf-8", "péter@x")


@pytest.mark.parametrize(
    "one",
    [
        {"notify": "FOO"},
        {"notify": "SUCCESS\r\nRSET"},
        {"orcpt": ["rfc822\r\nX: y", "a@x"]},
        {"orcpt": ["rfc822", "a\r\nb@x"]},
        {"orcpt": ["rfc822", "a@x", "extra"]},
    ],
)
def test_a_damaged_recipient_value_reads_as_not_given(one):
    requested = Requested.of({"rcpt": {"a@x": one}})
    assert requested.rcpt("a@x") == Rcpt()
    # the default, not silence: a failure is still reported
    assert requested.wants("a@x", "FAILURE")
    assert dsnparams.rcpt_params(requested, "a@x") == []


def test_a_damaged_envid_reads_as_not_given():
    assert Requested.of({"envid": "a\r\nX-Injected: 1"}).envid is None
    assert Requested.of({"envid": "x" * 101}).envid is None
    assert Requested.of({"envid": "a  b"}).envid == "a  b"


def test_one_damaged_value_does_not_take_the_others_with_it():
    # a lone surrogate in ENVID (only a tampered queue file has one)
    requested = Requested.of({"envid": "a\ud800", "rcpt": {"a@x": {"notify": "NEVER"}}})
    assert requested.envid is None
    assert not requested.wants("a@x", "FAILURE")
