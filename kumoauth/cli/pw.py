"""
``kumoauth pw``: hash a password for a credential store.

    kumoauth pw [-s SCHEME]

Reads the password (on a terminal: asked twice, not echoed; otherwise one
line of standard input, its line end removed) and prints its hash in
Dovecot's ``{SCHEME}`` form, which ``doveadm pw -t`` verifies.  SCHEME is
one of :data:`kumoauth.backends.schemes.HASH_SCHEMES` (default
``ARGON2ID``).

Exit status: 0 with the hash on standard output; 1 for no password (end
of input at the prompt: Ctrl-D), an empty one, two that differ, or one the
scheme cannot take (one line on stderr); 2 for wrong usage (argparse); 130
interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
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
    """The password: twice without echo on a terminal, else one line of stdin."""
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
        if again != first:
            raise CommandError("the passwords differ")
        return first
    line = sys.stdin.readline()
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


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
