"""
Value checks for configuration tables: a raw TOML value in, the typed
value out, or :class:`_Bad` with what was expected.  Shared by
:mod:`kumoauth.config` and the modules that validate tables of their own
(the credential stores, ``[auth.oauth]``, ``[sender_binding]``), which
must not import the configuration module itself (it imports them).
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kumoauth.textsafe import escape

#: a check: the raw value in, the typed value out (or _Bad)
Check = Callable[[Any], Any]

#: hosts a cleartext connection may go to without an explicit allow
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _Bad(Exception):
    pass


def _int(minimum: int = 0) -> Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"expected an integer, got {_show(v)}")
        if v < minimum:
            raise _Bad(f"must be at least {minimum}, got {v}")
        return v

    return check


def _number(minimum: float = 0.0, maximum: float | None = None) -> Check:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _Bad(f"expected a number of seconds, got {_show(v)}")
        if not math.isfinite(v):  # nan passes every comparison
            raise _Bad(f"must be a finite number, got {v}")
        if v < minimum:
            raise _Bad(f"must be at least {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise _Bad(f"must be at most {maximum:.15g}, got {v:.15g}")
        return float(v)

    return check


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"expected a string, got {_show(v)}")
    if not v:
        raise _Bad("must not be empty")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {_show(v)}")
    return v


def _choice(*options: str) -> Check:
    def check(v: Any) -> str:
        if v not in options:
            allowed = ", ".join(f'"{o}"' for o in options)
            raise _Bad(f"expected one of {allowed}, got {_show(v)}")
        return str(v)

    return check


def _port(v: Any) -> int:
    port = _int(1)(v)
    if port > 65535:
        raise _Bad(f"must be a port number (1-65535), got {port}")
    return port


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{escape(v, 200)}"'  # the error is one line, whatever the value
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "a list"
    return repr(v)


def file_problem(path: Path | str) -> str | None:
    """
    Why *path* cannot be read as a file (None: it can), in words for an
    operator: missing, a directory or another kind of file that is not a
    regular one (opening a FIFO would wait for a writer), or not readable.
    One check for every file a configuration names.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "file not found"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return (
            "not readable"
            if isinstance(e, PermissionError)
            else f"cannot be read ({e.strerror or e})"
        )
    return None


def _ldap_attribute(v: Any) -> str:
    text = _str(v)
    # an attribute description (RFC 4512 §2.5): a name or an OID, options
    if not re.fullmatch(r"(?:[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)+)(?:;[A-Za-z0-9-]+)*", text):
        raise _Bad(f'not an LDAP attribute name, got "{escape(text, 80)}"')
    return text
