"""
``kumoauth sender check``: may USER send as ADDRESS under ``[sender_binding]``?

    kumoauth sender check --config FILE USER ADDRESS

Asks the configured source (the map file, or the LDAP/SQL/HTTP store of
the matching ``[auth.<source>]`` table) exactly as a session's MAIL FROM
would, for the authorization identity USER (prepared with SASLprep like
one from the wire).  ADDRESS may be given with or without angle brackets;
``""`` or ``<>`` is the null sender.  Prints ``allowed: <rule>`` or
``refused: <rule>`` (the rule that decided, or ``no rule for this
address``).

Exit status: 0 allowed; 1 refused; 2 the source could not answer (what a
session would answer with 451), or the configuration or arguments are
wrong (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

EXIT_ALLOWED, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("sender", help="sender binding tools (sender check)")
    actions = parser.add_subparsers(dest="sender_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="may USER send as ADDRESS? (the [sender_binding] rule that decides)",
        description="Ask [sender_binding] whether USER (an authz identity) may use ADDRESS "
        "as sender. Exit 0 allowed, 1 refused, 2 lookup error or bad configuration.",
    )
    check.add_argument("--config", "-c", required=True, help="the kumoauth TOML configuration")
    check.add_argument("user", help="the authorization identity (authz_id)")
    check.add_argument("address", help='the sender address ("" or "<>": the null sender)')
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kumoauth.cli import react

    return react(lambda reactor: _check(reactor, args), EXIT_ERROR)


def _fail(message: str) -> int:
    print(f"kumoauth sender check: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _address(text: str) -> str:
    """
    The address MAIL FROM would take from *text* (with or without angle
    brackets): a source route dropped, UTF-8 allowed (SMTPUTF8).
    ``CommandError`` with the session's reply if MAIL FROM refuses it.
    """
    from kumoauth.smtp.commands import parse_path

    raw = os.fsencode(text.strip())
    if not (raw.startswith(b"<") and raw.endswith(b">")):
        raw = b"<" + raw + b">"
    return parse_path(b"FROM:" + raw, b"FROM", allow_null=True, utf8=True).address


async def _check(reactor: Any, args: argparse.Namespace) -> int:
    from twisted.internet import defer

    from kumoauth.auth.sasl import SASLError, prepare_name
    from kumoauth.auth.senders import SenderBinding, SenderLookupError
    from kumoauth.cli import log_errors_to_stderr
    from kumoauth.ops.assembly import OperatorError, load_config
    from kumoauth.ops.threads import BlockingPool
    from kumoauth.smtp.commands import CommandError
    from kumoauth.textsafe import escape

    log_errors_to_stderr()
    try:
        cfg = load_config(args.config)
    except OperatorError as e:
        return _fail(str(e))
    settings = getattr(cfg, "sender_binding", None)
    if settings is None:
        return _fail(f"{cfg.source}: no [sender_binding] table: sender binding is off")
    try:
        user = prepare_name(args.user, "authzid")
    except SASLError as e:
        return _fail(e.reply.decode("ascii", "replace"))
    if not user:
        return _fail("empty user name")
    try:
        address = _address(args.address)
    except CommandError as e:  # refused at MAIL FROM, before sender binding is asked
        shown = escape(os.fsencode(args.address), 300)
        return _fail(f"{shown}: a session refuses it at MAIL FROM ({e.reply.decode()})")

    pool = BlockingPool(reactor, cfg.auth.threads, cfg.auth.max_in_flight, "kumoauth-sender")
    pool.start()
    try:
        try:
            binding = SenderBinding(settings, cfg.auth.tables, reactor, pool, cfg.source.parent)
        except ValueError as e:
            return _fail(f"{cfg.source}: [sender_binding] {e}")
        try:
            d = binding.check(user, address)
            d.addTimeout(cfg.auth.timeout, reactor)
            decision = await d
        except SenderLookupError as e:
            return _fail(f"cannot check (a session would get 451 4.7.1): {e}")
        except defer.TimeoutError:
            return _fail(f"cannot check: no answer within {cfg.auth.timeout:g}s")
        finally:
            stopped = binding.stop()
            if isinstance(stopped, defer.Deferred):
                stopped.addTimeout(5, reactor).addErrback(lambda f: None)
                await stopped
        word = "allowed" if decision.allowed else "refused"
        print(f"{word}: {escape(decision.rule, 500)}")
        return EXIT_ALLOWED if decision.allowed else EXIT_REFUSED
    finally:
        await pool.stop()
