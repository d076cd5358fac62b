"""
``kumoauth auth test``: the ``doveadm auth test`` of kumoauth.

    kumoauth auth test --config FILE [--authz NAME] [--client-ip IP] [--cache] USER

Reads the password (on a terminal: asked once, not echoed; otherwise one
line of standard input), then runs the configured checker exactly as a
session would after STARTTLS: the policy's ``smtp_server_auth_plain``, a
built-in store (``[auth] checker = "passwd-file"`` …) or a factory, through
the same Cred portal, with the user name prepared (SASLprep) like one from
the wire.  It prints the result and what the attempt would put in
conn_meta (``authn_id``, ``authz_id`` and any meta the checker adds).

The verified-credential cache is bypassed unless ``--cache`` is given;
then the attempt runs twice through ``[auth.cache]`` (a miss, then what
the cache answers), which shows the cache's settings at work.  A failure
with ``[auth.cache]`` configured says that a running server may still
take a password it verified before, for up to ``ttl``.  A right password
of a user in ``[auth] locked_users`` is a failure, as the server answers,
and says so.

The configuration, the user name and ``--cache`` are checked before the
password is asked for.

Exit status: 0 success (235); 1 failure (535, or a user name the server
answers 501); 2 the checker could not
decide (454: backend down or erroring, timeout), or the configuration or
arguments are wrong, or no password was given (end of input: Ctrl-D, an
empty pipe), with one line on stderr; 130 interrupted (Ctrl-C).  A
standard output its reader closed (``| head``, ``| true``) ends the
command quietly with 0, as for every ``kumoauth`` command.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import os
import sys
from typing import Any

EXIT_SUCCESS, EXIT_FAILURE, EXIT_ERROR = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("auth", help="authentication tools (auth test)")
    actions = parser.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    test = actions.add_parser(
        "test",
        help="check USER's password with the configured checker, as a session would",
        description="Run the configured checker for USER (password from a prompt or stdin). "
        "Exit 0 success, 1 failure, 2 backend error or bad configuration.",
    )
    test.add_argument("--config", "-c", required=True, help="the kumoauth TOML configuration")
    test.add_argument("--authz", default="", help="authorization identity (default: USER)")
    test.add_argument(
        "--client-ip",
        default="127.0.0.1",
        type=_ip_address,
        help="client address the checker sees (127.0.0.1)",
    )
    test.add_argument(
        "--cache",
        action="store_true",
        help="go through [auth.cache]: the attempt twice (a miss, then the cache's answer)",
    )
    test.add_argument("user", help="the user name (authc)")
    test.set_defaults(run=run)


def _ip_address(text: str) -> str:
    """``--client-ip``: an IPv4 or IPv6 address (argparse's usage error otherwise)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
    return text


class NoPassword(Exception):
    """Standard input ended (Ctrl-D, a closed pipe) before any password."""


def read_password() -> str:
    """
    The password: asked without echo on a terminal, else one line of
    standard input.  :class:`NoPassword` when there is none to read (end
    of input at once: Ctrl-D, an empty pipe, no standard input at all).
    """
    if sys.stdin is None:
        raise NoPassword()
    if sys.stdin.isatty():
        try:
            return getpass.getpass("Password: ")
        except EOFError:
            print(file=sys.stderr)  # end the prompt's line
            raise NoPassword() from None
    # Piped, the password's bytes are read as UTF-8, what a client sends
    # in AUTH, whatever the locale (latin-1 would make "pässwort" another).
    stream = getattr(sys.stdin, "buffer", None)
    raw = stream.readline() if stream is not None else sys.stdin.readline().encode()
    if raw == b"":
        raise NoPassword()
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        from kumoauth.cli import CommandError

        raise CommandError("the password is not UTF-8 (as SMTP AUTH sends it)") from None
    return line.rstrip("\r\n") if line.endswith("\n") else line


def run(args: argparse.Namespace) -> int:
    from kumoauth.auth.cred import login_names
    from kumoauth.auth.sasl import SASLError, field_text
    from kumoauth.cli import log_errors_to_stderr, react
    from kumoauth.ops.assembly import OperatorError, build_policy, load_config

    # Everything that can be wrong without the password is said before
    # asking for it.  The stores' info lines too: why a right password was
    # refused (nologin, allow_nets), as doveadm auth test shows it.
    log_errors_to_stderr(info_from=("kumoauth.backends",))
    try:
        cfg = load_config(args.config)
        policy = build_policy(cfg)
    except OperatorError as e:
        return _fail(str(e))
    try:
        # As a session takes them: the bytes given, then SASLprep and
        # [auth] username_format / default_realm.
        authz, authc = login_names(
            field_text(os.fsencode(args.authz), "authzid"),
            field_text(os.fsencode(args.user), "authcid"),
            cfg.auth.account,
        )
    except SASLError as e:
        # the name a client could not log in with: a failure (1), as the
        # server's 501 is, not a configuration error (2)
        print(f"result: failure ({e.reply.decode('ascii', 'replace')})")
        return EXIT_FAILURE
    if not authc:
        return _fail("empty user name")
    if args.cache and (cfg.auth.cache is None or not cfg.auth.cache.enabled):
        return _fail("--cache, but the configuration has no [auth.cache] (or both ttls are 0)")
    try:
        password = read_password()
    except NoPassword:
        return _fail("no password given")
    return react(
        lambda reactor: _test(reactor, args, cfg, policy, authc, authz, password), EXIT_ERROR
    )


def _fail(message: str) -> int:
    print(f"kumoauth auth test: error: {message}", file=sys.stderr)
    return EXIT_ERROR


async def _test(
    reactor: Any,
    args: argparse.Namespace,
    cfg: Any,
    policy: Any,
    authc: str,
    authz: str,
    password: str,
) -> int:
    from twisted.cred import error
    from twisted.internet import defer

    from kumoauth.auth import locked
    from kumoauth.auth.authenticator import scrub
    from kumoauth.auth.checkers import call_hook
    from kumoauth.auth.cred import AccountLocked, AuthContext, PlainCredentials, make_portal
    from kumoauth.meta import ConnMeta
    from kumoauth.ops.assembly import OperatorError, build_checkers
    from kumoauth.ops.threads import BlockingPool
    from kumoauth.policy import Invoker
    from kumoauth.smtp.runtime import ProcessState
    from kumoauth.storage.delivery import Delivery, IMessageDelivery

    pool = BlockingPool(reactor, cfg.auth.threads, cfg.auth.max_in_flight, "kumoauth-auth-test")
    pool.start()
    process = ProcessState(clock=reactor, store=lambda message: defer.succeed(None))
    locked_path = cfg.auth.locked_users
    if locked_path is not None:
        try:
            process.locked_users.use(locked_path, locked.read(locked_path))
        except locked.LockedFileError as e:
            return _fail(f"[auth] locked_users: {e}")
    try:
        checkers, spec = build_checkers(cfg, policy, process, None, Invoker(reactor, pool))
    except OperatorError as e:
        return _fail(str(e))
    if not checkers:
        return _fail('[auth] checker = "policy", but the policy has no smtp_server_auth_plain')
    for checker in checkers:
        await call_hook(checker, "start")

    wrap = None
    if args.cache:
        from kumoauth.backends.cache import CredentialCache

        cache = CredentialCache(reactor, cfg.auth.cache, process.metrics)
        cache.watch(checkers)
        wrap = cache.wrap
    # The server's realm, which refuses a locked user as the server does.
    portal = make_portal(checkers, None, wrap=wrap, locked=process.locked_users)

    listener_meta = dict(cfg.listeners[0].meta) if cfg.listeners else {}
    rounds = 2 if args.cache else 1
    result = EXIT_ERROR
    try:
        for n in range(rounds):
            start = {
                "reception_protocol": "ESMTPSA",
                "received_from": f"[{args.client_ip}]:0"
                if ":" in args.client_ip
                else f"{args.client_ip}:0",
                "received_via": "kumoauth-auth-test",
                "hostname": cfg.server.hostname,
                "tls_protocol_version": "TLSv1.3",
                "tls_cipher": "TLS_AES_256_GCM_SHA384",
                **listener_meta,
            }
            meta = ConnMeta(start)
            credentials = PlainCredentials(authz, authc, password, meta)
            d = portal.login(
                credentials, AuthContext(credentials.authz, meta, credentials), IMessageDelivery
            )
            d.addTimeout(cfg.auth.timeout, reactor)
            label = ("first attempt", "second attempt (cache)")[n] if args.cache else "result"
            try:
                _, delivery, logout = await d
                assert isinstance(delivery, Delivery)
            except AccountLocked as e:
                print(
                    f"{label}: failure (535 5.7.8): {e.user!r} is in [auth] locked_users "
                    f"({locked_path}); the password is right"
                )
                result = EXIT_FAILURE
                continue
            except error.UnauthorizedLogin:
                print(f"{label}: failure (535 5.7.8)")
                if cfg.auth.cache is not None and not args.cache:
                    # What the store says now; not what a running server's
                    # cache still holds (a password just changed, say).
                    print(
                        f"note: a running server's [auth.cache] may take a password it verified "
                        f"before for up to {cfg.auth.cache.ttl:g}s more (SIGHUP empties it)"
                    )
                result = EXIT_FAILURE
                continue
            except defer.TimeoutError:
                print(f"{label}: tempfail (454 4.7.0): no answer within {cfg.auth.timeout}s")
                result = EXIT_ERROR
                continue
            except defer.CancelledError:
                raise  # Ctrl-C: no result to give
            except Exception as e:
                text = scrub(f"{type(e).__name__}: {e}", [password.encode("utf-8")])
                print(f"{label}: tempfail (454 4.7.0): {text}")
                result = EXIT_ERROR
                continue
            added = {k: v for k, v in meta.values_now().items() if k not in start or start[k] != v}
            added.setdefault("authn_id", delivery.authn_id)
            added.setdefault("authz_id", delivery.authz_id)
            print(f"{label}: success (235 2.7.0)")
            print("meta: " + json.dumps(added, sort_keys=True, ensure_ascii=False))
            if n == 0 and cfg.sender_binding is not None:
                print("may send as: " + await _senders(reactor, cfg, pool, added["authz_id"]))
            logout()
            result = EXIT_SUCCESS
    finally:
        for checker in checkers:
            await call_hook(checker, "stop")
        await pool.stop()
    return result


async def _senders(reactor: Any, cfg: Any, pool: Any, authz: str) -> str:
    """
    The addresses ``[sender_binding]`` lets *authz* use, or why they cannot
    be listed.
    """
    from twisted.internet import defer

    from kumoauth.auth.senders import SenderBinding, SenderLookupError

    binding = SenderBinding(cfg.sender_binding, cfg.auth.tables, reactor, pool, cfg.source.parent)
    try:
        addresses = await binding.allowed_addresses(authz)
    except SenderLookupError as e:
        return f"(cannot tell: {e})"
    finally:
        await defer.maybeDeferred(binding.stop)
    return ", ".join(addresses) if addresses else "(none)"
