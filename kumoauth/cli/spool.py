"""
``kumoauth-spool``: list and show spooled messages.

    kumoauth-spool --config etc/kumoauth.toml list
    kumoauth-spool --config etc/kumoauth.toml show ID [--meta]
    kumoauth-spool --spool var/spool list
"""

from __future__ import annotations

import argparse
import json
import sys

from kumoauth.config import ConfigError, load
from kumoauth.storage.spool import Spool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kumoauth-spool", description=__doc__.split("\n")[1])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="kumoauth TOML configuration (uses [spool] path)")
    where.add_argument("--spool", help="spool directory")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="one line per complete message, oldest first")
    show = sub.add_parser("show", help="print one message")
    show.add_argument("id")
    show.add_argument("--meta", action="store_true", help="print the .json envelope only")
    args = parser.parse_args(argv)

    if args.config:
        try:
            path = load(args.config).spool.path
        except ConfigError as e:
            print(f"kumoauth-spool: error: {e}", file=sys.stderr)
            return 1
    else:
        path = args.spool
    spool = Spool(path)
    if not spool.path.is_dir():
        print(f"kumoauth-spool: error: {spool.path}: no such spool directory", file=sys.stderr)
        return 1

    if args.command == "list":
        for msg in spool:
            env = msg.envelope
            meta = env.get("meta", {})
            rcpts = ",".join(env.get("rcpt_to", []))
            print(
                f"{msg.id}  {env.get('received_at', '?')}  "
                f"authn={meta.get('authn_id') or '-'}  "
                f"from=<{env.get('mail_from', '')}>  to={rcpts}  "
                f"{msg.eml_path.stat().st_size} bytes"
            )
        return 0

    try:
        msg = spool.read(args.id)
    except KeyError:
        print(f"kumoauth-spool: error: no complete message {args.id!r}", file=sys.stderr)
        return 1
    if args.meta:
        print(json.dumps(msg.envelope, indent=2, ensure_ascii=False))
    else:
        sys.stdout.buffer.write(msg.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
