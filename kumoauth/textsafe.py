"""
Client-controlled text made safe for a text log line or an SMTP reply.

A value a client chose (authc, authz, the EHLO name, an address, a reason
from a decoder) must never split one log event into two lines, forge a line
(CR, LF, U+2028, NEL, vertical tab, form feed…: everything ``str.splitlines``
splits on) or reach a terminal as an escape sequence.  :func:`escape` turns
every character that is not printable into a visible escape, and doubles
the backslash so the result is unambiguous.  The JSON log keeps the raw
values (JSON escapes them itself).
"""

from __future__ import annotations

import re
from functools import lru_cache

#: Longest escaped value written to a log line; the rest is elided.
MAX_LOGGED = 256

#: Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties),
#: as a regex character-class body: characters a reader shows as nothing
#: (zero-width space, soft hyphen, joiners, variation selectors, bidi
#: controls, fillers, tags).  ``str.isprintable`` passes some of them
#: (variation selectors, the combining grapheme joiner, Hangul fillers).
IGNORABLE_RANGES = (
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
)
#: those and the C0 and C1 controls
INVISIBLE = re.compile(f"[{IGNORABLE_RANGES}\x00-\x1f\x7f-\x9f]")


@lru_cache(maxsize=4096)
def _escape(value: str) -> str:
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable() and not INVISIBLE.match(ch):
            out.append(ch)
        else:
            n = ord(ch)
            if 0xDC80 <= n <= 0xDCFF:
                # a byte that was not UTF-8 (decoded with surrogateescape)
                out.append(f"\\x{n - 0xDC00:02x}")
            elif n <= 0xFF:
                out.append(f"\\x{n:02x}")
            elif n <= 0xFFFF:
                out.append(f"\\u{n:04x}")
            else:
                out.append(f"\\U{n:08x}")
    return "".join(out)


def escape(value: object, limit: int = MAX_LOGGED) -> str:
    """
    *value* as one printable line: bytes are decoded as UTF-8 (invalid
    bytes escaped), every non-printable character and the backslash are
    escaped, and more than *limit* characters are cut with ``…``.
    ``None`` is ``-``.
    """
    if value is None:
        return "-"
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    if len(text) > limit:
        text = text[:limit]
        return _escape(text) + "…"
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to do
    return _escape(text)


#: what makes a key=value field's value need quotes: a reader would split
#: the field at a space, or take ``authc=a client=b`` as two fields
_UNQUOTED = re.compile(r'[^ ="]+')


def field_value(value: object, limit: int = MAX_LOGGED) -> str:
    """
    *value* as the value of one ``key=value`` field of a log line:
    :func:`escape`, then in double quotes (a ``"`` inside escaped as
    ``\\"``) if it is empty or has a space, ``=`` or ``"``, so a client
    cannot make one field read as several (``authc=bob result=success``).
    """
    text = escape(value, limit)
    if _UNQUOTED.fullmatch(text):
        return text
    return '"' + text.replace('"', '\\"') + '"'


_ESCAPED = re.compile(r"\\(?:(\\)|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")


def unescape(value: str) -> str:
    """
    The text :func:`escape` (without its cut) made *value* from: for
    upstream text kept as it was sent (the queue's journal, a DSN), where
    it arrived escaped.
    """
    return _ESCAPED.sub(lambda m: m[1] or chr(int(m[2] or m[3] or m[4], 16)), value)
