"""
SASL decoders (RFC 4954 §4, RFC 4616 §2): examples and hypothesis properties.
"""

from __future__ import annotations

import base64
import unicodedata

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kumoauth.auth import sasl
from kumoauth.auth.sasl import SASLError

field = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    max_size=64,
).filter(lambda s: len(s.encode()) <= sasl.MAX_FIELD)


@given(st.binary(max_size=9216))
def test_response_round_trip(data):
    assert sasl.decode_response(sasl.encode_response(data)) == data


@given(st.binary(max_size=13000))
def test_arbitrary_response_raises_only_sasl_error(line):
    try:
        sasl.decode_response(line)
    except SASLError as e:
        assert e.reply[:3] in (b"501", b"500")


@given(st.binary(min_size=1, max_size=300))
def test_base64_without_padding_is_rejected(data):
    encoded = base64.b64encode(data)
    stripped = encoded.rstrip(b"=")
    assume(stripped != encoded)
    with pytest.raises(SASLError) as e:
        sasl.decode_response(stripped)
    assert e.value.reply.startswith(b"501 5.5.2")


B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@given(st.binary(min_size=1, max_size=300), st.integers(min_value=1, max_value=15))
def test_non_canonical_pad_bits_are_rejected(data, noise):
    """RFC 4648 §3.5: the bits before the padding must be zero."""
    encoded = bytearray(base64.b64encode(data))
    pad = encoded.count(b"=")
    assume(pad)
    noise %= 1 << (4 if pad == 2 else 2)
    assume(noise)
    pos = len(encoded) - pad - 1
    encoded[pos] = B64[B64.index(encoded[pos]) | noise]
    with pytest.raises(SASLError):
        sasl.decode_response(bytes(encoded))


def test_cancel_and_empty():
    with pytest.raises(SASLError) as e:
        sasl.decode_response(b"*")
    assert e.value.kind == "cancelled"
    assert e.value.reply == b"501 5.7.0 Authentication cancelled"
    assert sasl.decode_response(b"=") == b""
    assert sasl.decode_response(b"") == b""


def test_too_long():
    with pytest.raises(SASLError) as e:
        sasl.decode_response(b"A" * 12292)
    assert e.value.reply.startswith(b"500 5.5.6")
    assert len(sasl.decode_response(b"A" * 12288)) == 9216


@given(field, field, field)
def test_plain_round_trip(authz, authc, password):
    decoded = sasl.decode_plain(sasl.encode_plain(authz, authc, password))
    assert (decoded.authz, decoded.authc, decoded.password) == (authz, authc, password)


@given(st.binary(max_size=1000))
def test_arbitrary_plain_raises_only_sasl_error(message):
    try:
        sasl.decode_plain(message)
    except SASLError as e:
        assert e.reply.startswith(b"501 5.5.2")


@given(st.binary(max_size=300))
def test_arbitrary_login_field_raises_only_sasl_error(data):
    try:
        assert isinstance(sasl.decode_login_field(data, "username"), str)
    except SASLError as e:
        assert e.reply.startswith(b"501 5.5.2")


@pytest.mark.parametrize(
    "message",
    [b"a\x00b", b"a\x00b\x00c\x00d", b"\x00" + b"x" * 256 + b"\x00p", b"\x00u\x00\xff"],
)
def test_malformed_plain(message):
    with pytest.raises(SASLError):
        sasl.decode_plain(message)


def test_errors_never_carry_the_data():
    secret = "hunter2-secret"
    for message in (
        b"\x00user\x00" + secret.encode() + b"\xff",
        b"\x00user\x00" + secret.encode() * 30,
        secret.encode(),
    ):
        with pytest.raises(SASLError) as e:
            sasl.decode_plain(message)
        assert secret not in str(e.value) and secret.encode() not in e.value.reply


def test_repr_hides_password():
    r = sasl.decode_plain(b"\x00scott\x00tiger")
    assert "tiger" not in repr(r)


# SASLprep (RFC 4013) for user names: prepare_name.

CONTROLS = [chr(c) for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029)]


def prepared_or_none(name: str) -> str | None:
    try:
        return sasl.prepare_name(name, "authcid")
    except SASLError as e:
        assert e.reply == b"501 5.5.2 authcid contains a prohibited character" or (
            e.reply == b"501 5.5.2 authcid is empty after preparation"
        )
        return None


@pytest.mark.parametrize(
    ("name", "prepared"),
    [
        # RFC 4013 §3 examples
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),  # no transformation
        ("USER", "USER"),  # case preserved (no folding)
        ("\u00aa", "a"),  # FEMININE ORDINAL INDICATOR, NFKC
        ("\u2168", "IX"),  # ROMAN NUMERAL NINE, NFKC
        # non-ASCII spaces become SPACE
        ("a\u00a0b", "a b"),
        ("a\u3000b", "a b"),
        ("a\u1680b", "a b"),
        # NFD from macOS clients
        ("ju\u0308rgen", "j\u00fcrgen"),
        ("", ""),
        ("\u0627\u0628", "\u0627\u0628"),  # right-to-left only: fine
        ("\u05d0" + "1" + "\u05d1", "\u05d0" + "1" + "\u05d1"),  # RandAL at both ends
        # RFC 5893's Bidi Rule (RFC 8265): a right-to-left name may end in a digit
        ("\u0645\u062d\u0645\u062f1", "\u0645\u062d\u0645\u062f1"),
        (
            "\u0645\u062d\u0645\u062f \u0639\u0644\u064a",
            "\u0645\u062d\u0645\u062f \u0639\u0644\u064a",
        ),
        # a query (RFC 3454 §7): code points unassigned in Unicode 3.2 are names too
        ("\u0d05\u0d7b\u0d35\u0d7c", "\u0d05\u0d7b\u0d35\u0d7c"),  # Malayalam chillu letters
        ("\u1e9e", "\u1e9e"),  # LATIN CAPITAL LETTER SHARP S (Unicode 5.1)
        ("a\u0221", "a\u0221"),
        ("\u0bb6", "\u0bb6"),  # TAMIL LETTER SHA (Unicode 4.1)
    ],
)
def test_prepare_name_examples(name, prepared):
    assert sasl.prepare_name(name, "authcid") == prepared


@pytest.mark.parametrize(
    "name",
    [
        "\u0007",  # RFC 4013 §3: prohibited character
        "\u0031\u0627",  # the Bidi Rule: a right-to-left part starts right-to-left
        "\u0627\u0661\u0031",  # ... and does not mix Arabic-Indic and European digits
        "a\u0627",  # mixes left-to-right and right-to-left
        "\u0627a\u0627",
        "a\u202eb",  # RIGHT-TO-LEFT OVERRIDE (C.8)
        "a\ue000",  # private use (C.3)
        "a\ufffe",  # non-character (C.4)
        "a\ud800",  # surrogate (C.5)
        "a\ufffd",  # REPLACEMENT CHARACTER (C.6)
        "a\u2ff0",  # ideographic description character (C.7)
        "a\U000e0041",  # tag (C.9)
        "a\u200e",  # LEFT-TO-RIGHT MARK (C.8)
        "a\ufff9",  # interlinear annotation (C.2.2)
    ],
)
def test_prepare_name_refuses(name):
    with pytest.raises(SASLError) as e:
        sasl.prepare_name(name, "authzid")
    assert e.value.reply == b"501 5.5.2 authzid contains a prohibited character"
    assert e.value.kind == "malformed"


@pytest.mark.parametrize("control", [*CONTROLS, "\x1b", "\x7f"])
def test_prepare_name_refuses_every_control(control):
    for name in (control, "a" + control, control + "b", "a" + control + "b"):
        assert prepared_or_none(name) is None


def test_name_that_maps_to_nothing_is_refused():
    # An authz of only SOFT HYPHENs must not silently become the authc.
    with pytest.raises(SASLError) as e:
        sasl.prepare_name("\u00ad\u200b", "authzid")
    assert e.value.reply == b"501 5.5.2 authzid is empty after preparation"


def test_prepare_name_errors_never_carry_the_name():
    secret = "hunter2-secret"
    for name in (secret + "\x07", secret + "\u0627", "\u00ad" * 3):
        with pytest.raises(SASLError) as e:
            sasl.prepare_name(name, "username")
        assert secret not in str(e.value) and secret.encode() not in e.value.reply
        assert secret not in e.value.reason


def test_decoders_do_not_prepare():
    # decode_plain and decode_login_field stay pure decoders.
    nfd = "ju\u0308rgen"
    assert sasl.decode_plain(sasl.encode_plain("I\u00adX", nfd, "pw")).authc == nfd
    assert sasl.decode_plain(sasl.encode_plain("I\u00adX", nfd, "pw")).authz == "I\u00adX"
    assert sasl.decode_login_field(nfd.encode(), "username") == nfd


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),
    max_size=32,
)


@given(names)
def test_prepare_name_is_idempotent(name):
    prepared = prepared_or_none(name)
    if prepared is not None:
        assert sasl.prepare_name(prepared, "authcid") == prepared


@given(names | st.text(alphabet=st.sampled_from(CONTROLS + ["a", "\u00ad", "\u0627"])))
def test_prepared_names_have_no_control_or_format_characters(name):
    prepared = prepared_or_none(name)
    if prepared is not None:
        assert not [c for c in prepared if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


latin = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x24F, blacklist_categories=("Cc",)),
    max_size=32,
)


@given(latin)
def test_nfd_and_nfc_latin_names_prepare_alike(name):
    nfc = prepared_or_none(unicodedata.normalize("NFC", name))
    nfd = prepared_or_none(unicodedata.normalize("NFD", name))
    assert nfc == nfd


@given(latin.filter(lambda s: s.strip()))
def test_prepared_latin_names_are_nfc(name):
    prepared = prepared_or_none(unicodedata.normalize("NFD", name))
    if prepared is not None:
        assert unicodedata.is_normalized("NFC", prepared)


def test_printable_ascii_fast_path_agrees_with_full_preparation():
    """The shortcut for printable ASCII gives what the full SASLprep gives."""
    import stringprep
    import unicodedata

    for code in range(0x20, 0x7F):
        c = chr(code)
        assert not stringprep.in_table_b1(c) and not stringprep.in_table_c12(c)
        assert unicodedata.normalize("NFKC", c) == c
        assert not stringprep.in_table_c21_c22(c) and not stringprep.in_table_d1(c)
        assert sasl.prepare_name(f"x{c}y", "authcid") == f"x{c}y"


@pytest.mark.parametrize(
    "name",
    [
        "alice\u2066",  # FIRST STRONG ISOLATE (Unicode 6.3)
        "alice\u2064",  # INVISIBLE PLUS (5.1)
        "alice\U000e0100",  # VARIATION SELECTOR-17 (4.0)
        "alice\U0001bca0",  # SHORTHAND FORMAT LETTER OVERLAP (7.0)
        "alice\u180f",  # MONGOLIAN FREE VARIATION SELECTOR FOUR (14.0)
        "alice\u3164",  # HANGUL FILLER (in 3.2, and shows as nothing)
        "alice\U000e0001",  # LANGUAGE TAG
        "alice\U0010fffd",  # private use, newer table
        "alice\U0003ffff",  # unassigned even now
    ],
)
def test_a_query_still_refuses_what_shows_as_nothing(name):
    # The review: allowing what Unicode 3.2 did not know let "alice\u2066"
    # through, which MariaDB's collations take for alice (a fresh lock,
    # limit and throttle key per spelling).
    with pytest.raises(SASLError):
        sasl.prepare_name(name, "authcid")
