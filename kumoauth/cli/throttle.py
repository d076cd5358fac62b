"""
``kumoauth throttle``: who is locked out, and unlocking them.

    kumoauth throttle --config FILE list [--json]
    kumoauth throttle --config FILE clear KEY

``list`` shows every client (an IPv4 address or an IPv6 prefix) and user
name with failures in the window of ``[auth.throttle]``: the distinct
failures, whether the limit is reached (``locked``), and when the entry
expires.  ``clear`` forgets one: KEY is an IP address (an IPv6 address
clears its whole prefix), an IPv6 network (``2001:db8:1:2::/64``; one
inside a counted prefix clears that prefix, one holding several is
refused) or a user name (prepared and folded as the server does: any case, any
SASLprep spelling); ``ip:…`` and ``user:…`` force the kind.  It works on a shared
store (Redis), so it unlocks the user on every instance at once.

The memory store lives inside each server process: there is nothing this
command could read, and it says so (exit status 1) — restarting the
server, or waiting for the window, clears it.

Exit status: 0 done; 1 an operator's mistake or the memory store; 2 the
store could not be reached, and also a command line argparse refuses;
130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("throttle", help="list and clear AUTH failure throttles")
    parser.add_argument("--config", "-c", required=True, help="the kumoauth TOML configuration")
    actions = parser.add_subparsers(dest="throttle_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="clients and users with failures in the window")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    clear = actions.add_parser("clear", help="forget the failures of an IP, a prefix or a user")
    clear.add_argument("key", help="IP address, IPv6 network, or user name (ip:… / user:…)")
    parser.set_defaults(run=run)


_LOOKS_LIKE_A_NETWORK = re.compile(r"[0-9A-Fa-f.:]*[.:][0-9A-Fa-f.:]*/\d*")


def key_for(text: str, ipv6_prefix: int) -> str:
    """
    The failure-store key an operator means by *text* (see the module
    docstring).  ``ValueError`` for an empty one.
    """
    from kumoauth.auth.throttle import authc_key, client_key

    if text.startswith("user:"):
        name = text[5:]
        if not name:
            raise ValueError("empty user name")
        return authc_key(user_name(name))
    forced = text.startswith("ip:")
    value = text[3:] if forced else text
    if not value:
        raise ValueError("empty key")
    try:
        ipaddress.ip_address(value.partition("%")[0])
        return client_key(value, ipv6_prefix)
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        if forced or _LOOKS_LIKE_A_NETWORK.fullmatch(value):
            # "10.0.0.1/33" is a mistyped network, not a user of that name
            # (whose counters would be "nothing to clear", exit 0).
            raise ValueError(
                f"not an IP address or network: {value!r} (a user of that name: user:NAME)"
            ) from None
        return authc_key(user_name(value))
    # The store counts an IPv4 client by its address, an IPv6 one by its
    # /ipv6_prefix: a network inside one of those is that one.
    whole = 32 if network.version == 4 else ipv6_prefix
    if network.prefixlen < whole:
        unit = "each IPv4 address" if network.version == 4 else f"each IPv6 /{whole}"
        raise ValueError(
            f"{network} holds more than one client the throttle counts "
            f"(it counts {unit}): clear them one by one"
        )
    return client_key(str(network.network_address), ipv6_prefix)


def user_name(text: str) -> str:
    """
    *text* prepared as the server prepares an authcid from the wire
    (SASLprep: ``"\uff21lice"`` is ``"Alice"``) before it folds it into a
    key, so that any spelling the server takes for one user names that
    user's counters here too.  ``ValueError`` for a name no session could
    use.
    """
    from kumoauth.auth.sasl import SASLError, prepare_name

    try:
        name = prepare_name(text, "authcid")
    except SASLError:
        raise ValueError(
            f"not a user name a client can log in with (SASLprep refuses it): {text!r}"
        ) from None
    if not name:
        raise ValueError(f"empty user name after SASLprep: {text!r}")
    return name


def run(args: argparse.Namespace) -> int:
    from kumoauth.cli.storecmd import run_on_store

    return run_on_store(args, "[auth.throttle]", lambda cfg: cfg.auth.throttle.store, _act)


async def _act(args: argparse.Namespace, cfg: Any, store: Any) -> int:
    from kumoauth.cli.storecmd import fail

    throttle = cfg.auth.throttle
    if args.throttle_command == "clear":
        try:
            key = key_for(args.key, throttle.ipv6_prefix)
        except ValueError as e:
            return fail(str(e), 1)
        removed = await store.clear_failures(key)
        print(f"{'cleared' if removed else 'nothing to clear for'} {_printable(key)}")
        return 0
    rows = []
    for kind, limit in (
        ("ip", throttle.max_failures_per_ip),
        ("authc", throttle.max_failures_per_authc),
    ):
        for name, failures, expires in sorted(await store.failures(kind)):
            rows.append(
                {
                    "kind": "client" if kind == "ip" else "user",
                    "key": name,
                    "failures": failures,
                    "limit": limit,
                    "locked": failures >= limit,
                    "expires_in": round(expires),
                }
            )
    if args.json:
        for row in rows:
            # ASCII: a C1 control (U+009B CSI) or a bidi override from the
            # store reaches a terminal as \u escapes, not as itself.
            print(json.dumps(row))
        return 0
    if not rows:
        print("no failures in the window")
        return 0
    width = max(len(_printable(r["key"])) for r in rows)
    print(f"{'KIND':6}  {'KEY':{width}}  FAILURES  LOCKED  EXPIRES IN")
    for r in rows:
        print(
            f"{r['kind']:6}  {_printable(r['key']):{width}}  {r['failures']:>3}/{r['limit']:<4}  "
            f"{'yes' if r['locked'] else 'no':6}  {r['expires_in']}s"
        )
    return 0


def _printable(value: str) -> str:
    from kumoauth.textsafe import escape

    # Whole (no "…" cut): what is listed must be what ``clear`` takes.
    return escape(value, len(value))
