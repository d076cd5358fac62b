"""
The two header-section reads at the end of DATA, ``message_id`` and
``strip_identity_header``, against a line-by-line reading of RFC 5322's
fields (a field is its line and the folded lines after it), on generated
header sections.  What they cost on their worst inputs is in
``python -m bench.scans``.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kumoauth.smtp.data import (
    HEADER_LINE,
    MESSAGE_ID_LIMIT,
    header_section_over,
    message_id,
    strip_identity_header,
)


def fields(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """The header section as fields (each a list of its lines), and the rest."""
    end = message.find(b"\r\n\r\n")
    head, rest = (message, b"") if end < 0 else (message[: end + 2], message[end + 2 :])
    out: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if out and line[:1] in (b" ", b"\t"):
            out[-1].append(line)
        else:
            out.append([line])
    return out, rest


def named(field: list[bytes], name: bytes) -> list[bytes] | None:
    """The field's value as lines (after the colon, then its folds), if it is *name*."""
    first = field[0]
    colon = first.find(b":")
    if colon < 0 or first[:colon].rstrip(b" \t").lower() != name:
        return None
    return [first[colon + 1 :], *field[1:]]


def reference_strip(message: bytes) -> bytes:
    parsed, rest = fields(message)
    kept = [f for f in parsed if named(f, b"x-kumoauth-identity") is None]
    return b"\r\n".join(line for f in kept for line in f) + rest


def reference_message_id(message: bytes) -> str | None:
    for field in fields(message)[0]:
        lines = named(field, b"message-id")
        if lines is not None:
            # each fold (CRLF and the space or tab after it) reads as one space
            value = b" ".join([lines[0], *(line[1:] for line in lines[1:])]).strip()
            return value[: MESSAGE_ID_LIMIT * 4].decode("utf-8", "replace") or None
    return None


names = st.sampled_from(
    [
        b"Subject",
        b"X-Kumoauth-Identity",
        b"x-kumoauth-IDENTITY",
        b"Message-ID",
        b"message-id",
        b"X-Kumoauth-Identityx",
        b"Message-IDs",
        b"From",
    ]
)
values = st.lists(
    st.sampled_from([b"a", b" ", b"\t", b"\r", b"<", b"@", b"\xc3\xa9", b"x-kumoauth-identity:"]),
    max_size=8,
).map(b"".join)
field = st.tuples(
    names,
    st.sampled_from([b"", b" ", b" \t"]),
    values,
    st.lists(st.tuples(st.sampled_from([b" ", b"\t"]), values).map(b"".join), max_size=3),
).map(lambda t: b"\r\n".join([t[0] + t[1] + b":" + t[2], *t[3]]))
header_lines = st.lists(st.one_of(field, values), max_size=8)
bodies = st.one_of(st.just(None), st.lists(st.one_of(field, values), max_size=3).map(b"\r\n".join))


def message_of(lines: list[bytes], body: bytes | None) -> bytes:
    head = b"\r\n".join(lines)
    return head if body is None else head + b"\r\n\r\n" + body


@given(header_lines, bodies)
def test_strip_identity_header_removes_exactly_those_fields(lines, body):
    message = message_of(lines, body)
    assert strip_identity_header(message) == reference_strip(message)


@given(header_lines, bodies)
def test_message_id_is_the_first_such_field_unfolded(lines, body):
    message = message_of(lines, body)
    assert message_id(message) == reference_message_id(message)


def test_the_first_line_is_a_field_like_any_other():
    message = b"x-kumoauth-identity : forged\r\n folded\r\nMessage-ID: <a@b>\r\n\r\nbody"
    assert strip_identity_header(message) == b"Message-ID: <a@b>\r\n\r\nbody"
    assert message_id(b"message-ID:\t<a@b>\r\n\r\n") == "<a@b>"


def test_a_field_in_the_body_stays():
    message = b"Subject: x\r\n\r\nX-Kumoauth-Identity: y\r\nMessage-ID: <b>\r\n"
    assert strip_identity_header(message) is message
    assert message_id(message) is None


def test_a_message_id_of_millions_of_folds_is_read_as_far_as_it_is_logged():
    folded = b"Message-ID: <" + b"x" * 10 + b"\r\n y" * 2_000_000 + b">\r\n\r\nhi\r\n"
    value = message_id(folded)
    assert value is not None
    assert value.startswith("<xxxxxxxxxx y y") and len(value) == MESSAGE_ID_LIMIT * 4


def test_an_identity_field_of_millions_of_folds_goes_whole():
    message = b"A: 1\r\nX-Kumoauth-Identity: forged" + b"\r\n x" * 2_000_000 + b"\r\nB: 2\r\n\r\nhi"
    assert strip_identity_header(message) == b"A: 1\r\nB: 2\r\n\r\nhi"


def reference_header_length(message: bytes) -> int:
    """The octets of the lines before the first that is no header line."""
    length = 0
    for line in message.splitlines(keepends=True):
        # splitlines also splits at a bare CR; HEADER_END's "^" only follows LF
        if HEADER_LINE.match(line) is None:
            break
        length += len(line)
    return length


any_lines = st.lists(
    st.one_of(field, values, st.sampled_from([b"", b"From x", b"x", b" y", b"a b: c"])),
    max_size=12,
)


@given(any_lines, st.sampled_from([b"\r\n", b"\n"]), st.integers(0, 200))
def test_the_header_section_is_over_the_limit_exactly_when_its_lines_are(lines, eol, limit):
    message = eol.join(lines)
    expected = reference_header_length(message.replace(b"\r", b"\x00")) > limit
    assert header_section_over(message, limit) is expected


def test_a_header_line_cut_by_the_limit_still_counts():
    # the bound falls inside "X-Long-Name: v": cut there it looked like no
    # header line ("X-Lo"), read whole it is one
    message = b"A: 1\r\nX-Long-Name: v\r\n\r\nbody"
    assert header_section_over(message, 10)
    assert not header_section_over(b"A: 1\r\nno header line, the body\r\n", 10)


def test_a_long_field_name_across_the_limit_is_still_a_header_line():
    # a review: a name of 1,200 octets starting just before the limit hid a
    # header section of any size behind it
    message = b"A: x\r\n" * 20 + b"B" * 1200 + b": y\r\n" + b"C: z\r\n" * 10 + b"\r\nbody"
    assert header_section_over(message, 130)  # 120 octets, then the long name
    assert not header_section_over(b"A: x\r\n" * 20 + b"B" * 1200 + b" no colon\r\n", 130)


def test_a_header_section_of_exactly_the_limit_is_not_over_it():
    assert not header_section_over(b"A: 1\r\n", 6)  # all header
    assert not header_section_over(b"A: 1\r\nbody\r\n", 6)  # then the body
    assert not header_section_over(b"A: 1\r\n\r\nbody\r\n", 6)
    assert header_section_over(b"A: 1\r\nB: 2\r\n", 6)
    assert header_section_over(b"A: 1\r\n", 5)


def test_a_message_without_header_fields_has_an_empty_header_section():
    text = b"just text, no header\r\n" * 100_000
    assert not header_section_over(text, 1024)
    assert header_section_over(b"X: " + b"y" * 2000 + b"\r\n\r\nbody", 1024)
