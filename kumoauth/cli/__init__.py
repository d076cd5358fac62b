"""
``kumoauth``: the operator's command, one subcommand per concern.

    kumoauth spool --config FILE list [--json]
    kumoauth spool --config FILE show ID [--meta]
    kumoauth spool --config FILE flush | retry ID | hold ID | release ID | delete ID | bounce ID
    kumoauth spool --config FILE hold|release|retry|delete --authn USER | --from ADDRESS
    kumoauth pw [-s SCHEME]            a password hash in Dovecot {SCHEME} form
    kumoauth auth test --config FILE USER   check a password as a session would
    kumoauth throttle --config FILE list | clear KEY   AUTH failure throttles
    kumoauth limits --config FILE show USER | reset USER   per-user sending limits
    kumoauth sender check --config FILE USER ADDRESS   may USER send as ADDRESS

Each subcommand is a module of this package with ``add_parser(subparsers)``
(which registers its arguments and sets ``run``) and a ``run(args) -> int``;
later ones (``pw``, ``auth test``, ``throttle``, queue actions) are new
modules listed in :data:`COMMANDS`, not branches here.  Exit status: 0 for
success, 1 for an operator's mistake (one line on stderr), 2 for wrong
usage (argparse: the usage of the subcommand at fault), 130 after Ctrl-C
(no traceback), other values as each subcommand documents.  A standard
output closed early (``| head``, ``| grep -q``, ``| true``) is no error:
the rest of the output is dropped and the status is 0, whatever the
subcommand (:data:`EXIT_PIPE_CLOSED`), without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = ("spool", "pw", "auth", "throttle", "limits", "sender")


#: exit status after Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_INTERRUPTED = 130

#: exit status once standard output is closed by its reader (`| head`):
#: the reader has what it wanted, as `kumoauth spool list | head` always had
EXIT_PIPE_CLOSED = 0


class CommandError(Exception):
    """
    An operator's mistake: one line on stderr, exit status 1.
    """


def react(action: Callable[[Any], Awaitable[int]], failed: int = 1) -> int:
    """
    Run ``action(reactor)`` (a coroutine function returning an exit status)
    under a reactor of its own, for subcommands that talk to a store or a
    checker; *failed* if the reactor itself ends in error, 130 if Ctrl-C
    stopped it (while a backend was being waited on, say).
    """
    import signal

    from twisted.internet import defer, task

    code = [failed]
    interrupted: list[int] = []
    #: standard output closed under the action (`kumoauth auth test … | true`)
    closed: list[BrokenPipeError] = []

    def main(reactor: Any) -> defer.Deferred[None]:
        done: list[defer.Deferred[None]] = []

        def on_sigint(signum: int, frame: Any) -> None:
            # The first Ctrl-C cancels what is awaited (the action's own
            # clean-up still runs); a second ends the process at once, even
            # while a check blocks or that clean-up waits on a thread.
            interrupted.append(signum)
            if len(interrupted) > 1 or not done:
                os._exit(EXIT_INTERRUPTED)
            reactor.callFromThread(done[0].cancel)

        # Now (the action starts before the reactor runs) and again after
        # the reactor's own handler, which would stop it under the action
        # as if it had finished.
        signal.signal(signal.SIGINT, on_sigint)
        reactor.callWhenRunning(signal.signal, signal.SIGINT, on_sigint)

        async def go() -> None:
            try:
                code[0] = await action(reactor)
            except defer.CancelledError:
                if not interrupted:
                    raise
            except BrokenPipeError as e:
                # Not the reactor's error (a traceback, exit *failed*):
                # the action's own clean-up ran on the way here, and
                # main() ends as for any command whose reader went away.
                closed.append(e)

        done.append(defer.Deferred.fromCoroutine(go()))
        return done[0]

    try:
        task.react(main)
    except SystemExit as e:
        if interrupted:
            return EXIT_INTERRUPTED
        if e.code not in (0, None):
            return failed
    if closed and not interrupted:
        raise closed[0]  # for main(), as if the action had run without a reactor
    return EXIT_INTERRUPTED if interrupted else code[0]


def log_errors_to_stderr(info_from: tuple[str, ...] = ()) -> None:
    """
    Warnings and errors (a backend going down, a malformed stored hash) on
    stderr, one line each, as the server would log them; and the info lines
    of the namespaces *info_from* (a store's reason for a refusal).
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    for namespace in info_from:
        predicate.setLogLevelForNamespace(namespace, LogLevel.info)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def os_error(e: OSError) -> str:
    """``FILE: reason`` for an operating system error, escaped."""
    from kumoauth.textsafe import escape

    reason = e.strerror or str(e)
    if e.filename is None:
        return escape(reason)
    if e.filename2 is not None:
        return f"{escape(str(e.filename))} -> {escape(str(e.filename2))}: {escape(reason)}"
    return f"{escape(str(e.filename))}: {escape(reason)}"


class SubcommandParser(argparse.ArgumentParser):
    """
    The parser of a subcommand (``spool``, ``spool bounce``, ``auth test``
    …): an argument it does not know is its own usage error, with its own
    usage line (``usage: kumoauth spool bounce …``), not the top-level
    parser's ``usage: kumoauth [-h] [--version] COMMAND ...``, to which
    argparse hands a subparser's leftovers.  Subcommands of a subcommand
    are of this class too (argparse gives them their parent's).
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser(prog: str = "kumoauth") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="kumoauth administration (the server itself is `twistd kumoauth`)"
    )
    from kumoauth import __version__

    parser.add_argument("--version", action="version", version=f"kumoauth {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser
    )
    for name in COMMANDS:
        importlib.import_module(f"kumoauth.cli.{name}").add_parser(sub)
    return parser


def _stdout_to_devnull() -> None:
    """
    Standard output is closed by its reader: the rest of what is written
    goes nowhere, and the flush at exit finds nothing to complain about.
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _flush_stdout() -> None:
    """Flush standard output; if its reader has gone, see :func:`_stdout_to_devnull`."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()


def main(argv: list[str] | None = None, prog: str = "kumoauth") -> int:
    for stream in (sys.stdout, sys.stderr):
        # A locale that is not UTF-8 (LANG=C on an old system,
        # PYTHONIOENCODING=latin-1): a UTF-8 address or user name is shown
        # as \xfc escapes, not a UnicodeEncodeError traceback.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit:
        _flush_stdout()  # --help or --version into `| head`
        raise
    try:
        code = int(args.run(args))
        # What is still buffered (stdout to a pipe, without
        # PYTHONUNBUFFERED) meets a closed pipe here, not at the exit,
        # where Python would print "Exception ignored" and exit 120.
        sys.stdout.flush()
        return code
    except CommandError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `kumoauth spool show ID | head`, `kumoauth auth test … | true`:
        # the reader has what it wanted.
        _stdout_to_devnull()
        return EXIT_PIPE_CLOSED
    except OSError as e:
        # A file the command may not read (run as a user other than the
        # server's) or cannot write: the file and why, not a traceback.
        print(f"{prog}: error: {os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C (at a password prompt, say): no traceback; the newline
        # ends the line the prompt left the cursor on.
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def console() -> None:
    """
    The ``kumoauth`` console script.
    """
    sys.exit(main())


if __name__ == "__main__":
    console()
