"""
The twistd plugin's options and entry point: ``twistd kumoauth --config FILE``.
"""

from __future__ import annotations

import os
import pwd
import sys
import warnings
from typing import Any, NoReturn

from twisted.application import service
from twisted.cred import strcred
from twisted.logger import Logger
from twisted.python import usage

from kumoauth import __version__
from kumoauth.ops.assembly import OperatorError, check_json_log, load_config
from kumoauth.ops.heap import settle_when_running
from kumoauth.ops.listening import hold_start_up_signals
from kumoauth.ops.logfile import ApplicationLog, observer_for
from kumoauth.textsafe import escape

log = Logger()


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = "--config FILE [--auth STRCRED]"
    longdesc = (
        "kumoauth: an ESMTP submission server with KumoMTA-style SMTP AUTH. "
        "--auth (e.g. memory:scott:tiger or file:/etc/kumoauth/passwd) replaces "
        "the checker named in the configuration."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
    ]

    def __init__(self) -> None:
        super().__init__()
        # twistd chose kumoauth and starts it: the earliest kumoauth runs.
        hold_start_up_signals()

    def opt_auth(self, description: str) -> None:
        # Keep the strings too: [server] workers hands them to each worker.
        self.setdefault("authArgs", []).append(description)
        # One line and exit 1, as for a mistake in the configuration, not
        # twistd's usage text (and never the argument: it may hold a password).
        kind, _, argument = description.partition(":")
        if kind == "file":
            # Twisted's file: checker only warns, then refuses every login.
            problem = _not_a_readable_file(argument)
            if problem:
                operator_error(f"--auth file: {escape(argument) or '(empty)'}: {problem}")
        try:
            self.addChecker(strcred.makeChecker(description))
        except strcred.InvalidAuthType:
            known = "twistd kumoauth --help-auth lists them"
            operator_error(f"--auth: no checker named {escape(kind)!r} ({known})")
        except strcred.UnsupportedInterfaces:
            operator_error(f"--auth {escape(kind)}: this checker cannot check passwords")
        except Exception as e:
            reason = escape(str(e))  # kumoauth's own stores name themselves
            if not reason.startswith(f"{kind}:"):
                reason = f"{escape(kind)}: {reason}"
            operator_error(f"--auth {reason}")

    opt_auth.__doc__ = strcred.AuthOptionMixin.opt_auth.__doc__

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


def _not_a_readable_file(path: str) -> str | None:
    """Why *path* is not a file this process can read, or None."""
    if not path:
        return "a file name is needed"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None if os.path.isfile(path) else "not a regular file"


def _warning_text(w: warnings.WarningMessage) -> str:
    return f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}"


def operator_error(text: str) -> NoReturn:
    """An operator's mistake: one line on stderr, exit status 1."""
    sys.stderr.write(f"kumoauth: error: {text}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def owner(options: Any) -> tuple[int, int] | None:
    """
    The (uid, gid) twistd will switch to after start-up (``twistd --uid``/
    ``--gid``; -1: not changed), if this process is root and will switch;
    else None.  What start-up creates as root (the spool, the workers'
    metrics directory) is given to them.
    """
    parent = getattr(options, "parent", None)
    if parent is None or os.geteuid() != 0:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None and gid is None:
        return None
    if uid is not None and gid is None:
        gid = pwd.getpwuid(uid).pw_gid  # as twistd does
    return (-1 if uid is None else uid, -1 if gid is None else gid)


def makeService(options: Options | dict[str, Any]) -> service.IService:
    """
    Build the service: one process, or with ``[server] workers > 1`` a
    supervisor and its workers.  An operator error prints one line and
    exits 1.
    """
    from twisted.internet import reactor

    from kumoauth.ops import listening

    listening.twistd_options = parent = getattr(options, "parent", None)
    if parent is not None and not parent.get("nodaemon"):
        listening.keep_terminal(reactor)
    # Warnings while the configuration and its modules load (a custom
    # checker importing one of 0.1's module names) become log lines; before
    # twistd's log begins, Python would print each as two raw lines.
    with warnings.catch_warnings(record=True) as said:
        try:
            cfg = load_config(options["config"])
            check_json_log(cfg, owner(options))
            log.info(
                "kumoauth {version} starting with {path}", version=__version__, path=str(cfg.source)
            )
            checkers = options.get("credCheckers")
            top: ApplicationLog
            if cfg.server.workers > 1:
                from kumoauth.ops.workers import make_supervisor

                top = make_supervisor(
                    cfg, reactor, checkers, options.get("authArgs") or [], owner=owner(options)
                )
                slicer = None  # a supervisor serves no sessions: no AUTH bursts here
            else:
                from kumoauth.ops.service import make_service_from_config

                single = make_service_from_config(cfg, reactor, checkers, owner=owner(options))
                top, slicer = single, single.process.slicer
        except OperatorError as e:
            # What was warned on the way may be the clue (a 0.1 checker
            # using what 0.2 no longer has): on stderr before the error.
            for w in said:
                sys.stderr.write(f"kumoauth: warning: {escape(_warning_text(w))}\n")
            operator_error(str(e))
    for w in said:
        log.warn("{text}", text=_warning_text(w))
    # twistd's log, in its format, formatted faster (kumoauth/ops/logfile.py)
    top.log_observer = observer_for(getattr(options, "parent", None))
    # Dispatch without the legacy log context, pool threads that do not
    # preempt the reactor thread (kumoauth/ops/reactor.py).
    from kumoauth.ops.reactor import prepare

    prepare(reactor)
    settle_when_running(reactor, slicer)
    return top
