"""
``kumoauth spool``: list and show spooled messages.

    kumoauth spool --config etc/kumoauth.toml list
    kumoauth spool --config etc/kumoauth.toml show ID [--meta]
    kumoauth spool --spool var/spool list

Read-only, and safe against a running server: only complete messages
(whose ``.json`` commit record exists) are listed.  ``kumoauth-spool`` is
an alias kept for existing scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kumoauth.config import ConfigError, load
from kumoauth.storage.spool import Spool


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("spool", help="list and show spooled messages")
    configure(parser)


def configure(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="kumoauth TOML configuration (uses [spool] path)")
    where.add_argument("--spool", help="spool directory")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="one line per complete message, oldest first")
    show = sub.add_parser("show", help="print one message")
    show.add_argument("id")
    show.add_argument("--meta", action="store_true", help="print the .json envelope only")
    parser.set_defaults(run=run)


def open_spool(args: argparse.Namespace) -> Spool:
    from kumoauth.cli import CommandError

    if args.config:
        try:
            path = load(args.config).spool.path
        except ConfigError as e:
            raise CommandError(str(e)) from None
    else:
        path = args.spool
    spool = Spool(path)
    if not spool.path.is_dir():
        raise CommandError(f"{spool.path}: no such spool directory")
    return spool


def run(args: argparse.Namespace) -> int:
    from kumoauth.cli import CommandError

    spool = open_spool(args)
    if args.action == "list":
        for msg in spool:
            env = msg.envelope
            meta = env.get("meta", {})
            rcpts = ",".join(env.get("rcpt_to", []))
            print(
                f"{msg.id}  {env.get('received_at', '?')}  "
                f"authn={meta.get('authn_id') or '-'}  "
                f"from=<{env.get('mail_from', '')}>  to={rcpts}  "
                f"{msg.size} bytes"
            )
        return 0
    try:
        msg = spool.read(args.id)
    except KeyError:
        raise CommandError(f"no complete message {args.id!r}") from None
    if args.meta:
        print(json.dumps(msg.envelope, indent=2, ensure_ascii=False))
    else:
        sys.stdout.buffer.write(msg.read_bytes())
    return 0


def main(argv: list[str] | None = None) -> int:
    """
    ``kumoauth-spool`` (the alias): ``kumoauth spool`` under its old name.
    """
    from kumoauth.cli import main as kumoauth_main

    return kumoauth_main(["spool", *(sys.argv[1:] if argv is None else argv)], prog="kumoauth")


if __name__ == "__main__":
    sys.exit(main())
