"""
``kumoauth limits``: a user's sending counters (``[limits]``).

    kumoauth limits --config FILE show USER [--json]
    kumoauth limits --config FILE reset USER

``show`` prints, per kind (messages, recipients), what USER (the authn_id
they log in with, any case or SASLprep spelling) has used of the limit in the current window
and when the window ends; ``reset`` ends the windows now, on every
instance sharing the store — for a user whose limit was reached by mail
they really meant to send, once you are sure the account is not abused.

With the memory store the counters live inside each server process and
this command says so (exit status 1).  Exit status: 0 done; 1 an
operator's mistake or the memory store; 2 the store could not be reached,
and also a command line argparse refuses; 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("limits", help="show and reset per-user sending limits")
    parser.add_argument("--config", "-c", required=True, help="the kumoauth TOML configuration")
    actions = parser.add_subparsers(dest="limits_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="a user's counters in the current window")
    show.add_argument("user")
    show.add_argument("--json", action="store_true", help="one JSON object")
    reset = actions.add_parser("reset", help="end a user's windows now (every instance)")
    reset.add_argument("user")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kumoauth.cli.storecmd import run_on_store

    return run_on_store(
        args, "[limits]", lambda cfg: cfg.limits.store if cfg.limits else None, _act
    )


async def _act(args: argparse.Namespace, cfg: Any, store: Any) -> int:
    from kumoauth.cli.storecmd import fail
    from kumoauth.cli.throttle import user_name
    from kumoauth.smtp.limits import MESSAGES, RECIPIENTS, counter_key
    from kumoauth.textsafe import escape

    limits = cfg.limits
    try:
        user = user_name(args.user)
    except ValueError as e:
        return fail(str(e), 1)
    kinds = {
        MESSAGES: limits.max_messages_per_user,
        RECIPIENTS: limits.max_recipients_per_user,
    }
    if args.limits_command == "reset":
        done = [kind for kind in kinds if await store.reset(counter_key(kind, user))]
        if done:
            print(f"reset {', '.join(done)} for {escape(user)}")
        else:
            print(f"nothing to reset for {escape(user)}")
        return 0
    report: dict[str, Any] = {"user": user, "window": limits.window}
    for kind, limit in kinds.items():
        count, reset_in = await store.get(counter_key(kind, user))
        report[kind] = {"used": count, "limit": limit, "resets_in": round(reset_in)}
    if args.json:
        print(json.dumps(report))  # ASCII: nothing from the user raw to a terminal
        return 0
    print(f"user {escape(user)}, window {int(limits.window)}s")
    for kind in kinds:
        r = report[kind]
        limit = r["limit"] if r["limit"] is not None else "no limit"
        resets = f", resets in {r['resets_in']}s" if r["used"] else ""
        print(f"  {kind}: {r['used']} of {limit}{resets}")
    return 0
