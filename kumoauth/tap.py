"""
The twistd plugin's options and entry point: ``twistd kumoauth --config FILE``.
"""

from __future__ import annotations

import os
import pwd
import sys
from typing import Any

from twisted.application import service
from twisted.cred import strcred
from twisted.python import usage

from kumoauth.ops.assembly import OperatorError, check_json_log, load_config
from kumoauth.ops.heap import settle_when_running
from kumoauth.ops.logfile import ApplicationLog, observer_for


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

    def opt_auth(self, description: str) -> None:
        # Keep the strings too: [server] workers hands them to each worker.
        self.setdefault("authArgs", []).append(description)
        super().opt_auth(description)

    opt_auth.__doc__ = strcred.AuthOptionMixin.opt_auth.__doc__

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


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

    try:
        cfg = load_config(options["config"])
        check_json_log(cfg, owner(options))
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
        sys.stderr.write(f"kumoauth: error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    # twistd's log, in its format, formatted faster (kumoauth/ops/logfile.py)
    top.log_observer = observer_for(getattr(options, "parent", None))
    # Dispatch without the legacy log context, pool threads that do not
    # preempt the reactor thread (kumoauth/ops/reactor.py).
    from kumoauth.ops.reactor import prepare

    prepare(reactor)
    settle_when_running(reactor, slicer)
    return top
