"""
File descriptors: enough for ``max_connections``, and one line when they
run out.

Every client connection is a descriptor, and the process may open only
``RLIMIT_NOFILE`` of them (``ulimit -n``; systemd's ``LimitNOFILE=``,
often 1,024 by default).  ``max_connections`` above that limit does not
hold: the process runs out first, and then Twisted closes each new
connection unanswered as it accepts it, with a log line per connection,
while the spool, the relay and the credential stores fail to open what
they need.

:func:`fit` runs at start-up and at each reload, in each process that
serves clients.  It raises the soft limit as far as needed (up to the hard
limit, which any process may do) to leave :data:`RESERVE` descriptors for
kumoauth's own files and outbound connections beyond ``max_connections``
(twice that with a ``haproxy:`` listener, whose connections waiting for
their header are counted apart).  If the hard limit is too low it says so
once, and the process serves at most what fits: a client over that gets
the ``421`` of ``max_connections``, not a silent close.

:class:`AcceptPort` is Twisted's TCP port with its accept events folded
into one line per change: "unavailable" when an ``accept`` first fails for
want of descriptors (from a leak, say, or a backend holding many), and
"available again", with how many connections were closed meanwhile, when
one is accepted again.
"""

from __future__ import annotations

import errno
import resource
from typing import Any

from twisted.internet import tcp
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from zope.interface import implementer

from kumoauth.ops.loglimit import StateLog

log = Logger(namespace="kumoauth")

#: descriptors kept beyond the client connections: listening sockets, the
#: log, the queue's segments, the relay's and the stores' connections
RESERVE = 256


def fit(max_connections: int, proxied: bool) -> tuple[int | None, str]:
    """
    The number of connections this process can serve (None: as many as
    ``max_connections``) and, when that is fewer, the warning that says
    why; the soft ``RLIMIT_NOFILE`` is raised first if that helps.
    Raises ValueError (one line) if not even one connection fits.
    """
    per_connection = 2 if proxied else 1
    need = max_connections * per_connection + RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None, ""
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft >= need:
        return None, ""
    ceiling = (soft - RESERVE) // per_connection
    if ceiling < 1:
        raise ValueError(
            f"the file descriptor limit is {soft} (ulimit -n) and kumoauth keeps "
            f"{RESERVE} for its own files: raise it (LimitNOFILE= in the unit, ulimit -n) "
            f"to at least {need} for max_connections = {max_connections}"
        )
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    return ceiling, (
        f"max_connections = {max_connections} needs {need} file descriptors, but this "
        f"process may open only {soft} (hard limit {shown}): at most {ceiling} connections "
        "are served, the rest get 421; raise the limit (LimitNOFILE= in the unit, ulimit -n)"
    )


#: the process's descriptors as new connections met them (process-lived)
STATE = StateLog("file descriptors for new connections", logger=log)

_OUT_OF_DESCRIPTORS = (
    "EMFILE encountered",
    "Could not accept new connection",
    # Twisted's spare descriptor for the recovery, not to be had either: it
    # logged a traceback each time
    "Could not reserve EMFILE",
    "Could not re-reserve EMFILE",
)


@implementer(ILogObserver)
class _AcceptLog:
    """
    The observer of the ports' accept events: a failed ``accept`` is the
    state line, each connection closed in Twisted's recovery is counted
    (the "operations" of the line that ends it), and the rest of the
    recovery's lines are dropped.
    """

    def __init__(self) -> None:
        #: failed accepts seen, for AcceptPort.doRead
        self.seen = 0

    def __call__(self, event: dict[str, Any]) -> None:
        text = event.get("log_format") or ""
        if text.startswith("Could not accept new connection") and event.get("acceptError") not in (
            "EMFILE",
            "ENFILE",
        ):
            globalLogPublisher(event)  # ENOBUFS, ENOMEM, ECONNABORTED: Twisted's line
        elif text.startswith(_OUT_OF_DESCRIPTORS):
            self.seen += 1
            if STATE.down is None:
                error = event.get("acceptError", "EMFILE")
                if text.startswith("Could not"):
                    failure = event.get("log_failure")
                    if failure is not None and isinstance(failure.value, OSError):
                        error = errno.errorcode.get(failure.value.errno or 0, "EMFILE")
                STATE.failed(
                    f"accept: {error} (the limit is "
                    f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]} descriptors)",
                    "new connections are closed unanswered until some close",
                    count=False,
                )
        elif text.startswith("EMFILE recovery: Closed"):
            STATE.failures += 1
        elif not text.startswith("Re-reserving"):
            globalLogPublisher(event)


_accept_log = _AcceptLog()


#: for the process's one spare descriptor (Twisted's, shared by every port)
_reserve_log = Logger(namespace="twisted.internet.tcp", observer=_accept_log)


class AcceptPort(tcp.Port):
    """Twisted's TCP port, its accept events through :class:`_AcceptLog`."""

    _logger = Logger(namespace="twisted.internet.tcp.Port", observer=_accept_log)

    def startListening(self) -> None:
        # The spare descriptor says its failures through the same log.
        reserve = getattr(tcp, "_reservedFD", None)
        if reserve is not None and hasattr(reserve, "_log"):
            reserve._log = _reserve_log
        super().startListening()

    def doRead(self) -> Any:
        before, seen = self.sessionno, _accept_log.seen
        result = super().doRead()
        # A connection accepted, and no accept failed: descriptors again.
        if STATE.down is not None and self.sessionno != before and _accept_log.seen == seen:
            STATE.succeeded()
        return result
