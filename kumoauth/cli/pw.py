"""
``kumoauth pw``: hash a password for a credential store.

    kumoauth pw [-s SCHEME]

Reads the password (on a terminal: asked twice, not echoed; otherwise one
line of standard input, its line end removed) and prints its hash in
Dovecot's ``{SCHEME}`` form, which ``doveadm pw -t`` verifies.  SCHEME is
one of :data:`kumoauth.backends.schemes.HASH_SCHEMES` (default
``ARGON2ID``).

Exit status: 0 with the hash on standard output; 1 for no password (end
of input at the prompt: Ctrl-D), an empty one, two that differ, one that
is not text in the locale's encoding ("not valid UTF-8"), or one the scheme cannot take
(one line on stderr); 2 for wrong usage (argparse); 130 interrupted
(Ctrl-C).
"""

from __future__ import annotations

import argparse
import codecs
import getpass
import sys
from typing import Any

from kumoauth.backends.schemes import HASH_SCHEMES, hash_password


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("pw", help="hash a password (Dovecot {SCHEME} form)")
    parser.add_argument(
        "-s",
        "--scheme",
        type=str.upper,
        choices=HASH_SCHEMES,
        default="ARGON2ID",
        help="hash scheme (default ARGON2ID)",
    )
    parser.set_defaults(run=run)


def read_password() -> str:
    """
    The password: twice without echo on a terminal, else one line of stdin.
    Bytes that are not text in the locale's encoding (UTF-8 nearly always)
    are refused, whether decoding failed or left them as surrogates
    (surrogateescape).
    """
    from kumoauth.cli import CommandError

    if sys.stdin is None:
        raise CommandError("no password given (no standard input)")
    if sys.stdin.isatty():
        try:
            first = getpass.getpass("Password: ")
            again = getpass.getpass("Retype password: ")
        except EOFError:
            print(file=sys.stderr)  # end the prompt's line
            raise CommandError("no password given") from None
        except UnicodeDecodeError as e:
            print(file=sys.stderr)
            raise CommandError(_not_valid(e.encoding)) from None
        if again != first:
            raise CommandError("the passwords differ")
        return _text(first)
    try:
        line = sys.stdin.readline()
    except UnicodeDecodeError as e:
        raise CommandError(_not_valid(e.encoding)) from None
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return _text(line)


def _text(password: str) -> str:
    """
    *password*, unless it holds a surrogate: decoding valid UTF-8 never
    makes one, surrogateescape (Python's choice for standard input in the
    C and POSIX locales) makes one of each byte it cannot decode.
    """
    from kumoauth.cli import CommandError

    if any("\ud800" <= ch <= "\udfff" for ch in password):
        raise CommandError(_not_valid(getattr(sys.stdin, "encoding", None)))
    return password


def _not_valid(encoding: str | None) -> str:
    """The error for a password that is not text in *encoding* (the locale's)."""
    try:
        utf8 = encoding is None or codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        utf8 = False
    return f"the password is not valid {'UTF-8' if utf8 else encoding}"


def run(args: argparse.Namespace) -> int:
    from kumoauth.cli import CommandError

    password = read_password()
    if password == "":
        raise CommandError("empty password")
    try:
        hashed = hash_password(password, args.scheme)
    except ValueError as e:
        # hash_password's messages never contain the password
        raise CommandError(str(e)) from None
    print(hashed)
    return 0
