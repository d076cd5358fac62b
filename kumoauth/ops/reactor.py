"""
The epoll reactor's dispatch of ready descriptors, without the legacy log
context around each one.

``EPollReactor.doPoll`` hands every ready descriptor to ``doRead`` /
``doWrite`` through ``twisted.python.log.callWithLogger``: per event it
asks the connection for its ``logPrefix()``, copies the thread's context
dictionary with ``{"system": prefix}`` added, pushes it, calls, and pops
it.  Only legacy ``log.msg`` / ``log.err`` events read that context;
kumoauth logs through ``twisted.logger``, whose events never do.  For a
submission session that is some twenty context pushes: 5.8 % of the
server's CPU per session on workload (a) (``python -m bench.ab``,
BENCHMARKS.md).

:func:`streamline` gives the process's reactor, when it is Twisted's
``EPollReactor`` (twistd's default on Linux), a ``doPoll`` that calls the
reactor's own ``_doReadOrWrite`` directly.  Everything ``_doReadOrWrite``
does is unchanged: an exception from ``doRead``/``doWrite`` is still
logged with its traceback and the connection dropped.  What changes is the
``system`` field of such a legacy error line (``-`` instead of the
connection's prefix); an exception escaping ``_doReadOrWrite`` itself is
logged, as before, with the connection's prefix.  Other reactors are left
as they are.  docs/decisions.md has the choice.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log as legacy_log

from kumoauth.ops.descriptors import AcceptPort
from kumoauth.ops.threads import background_pool


class DirectDispatchEPollReactor(EPollReactor):
    """
    ``EPollReactor`` whose poll calls ``_doReadOrWrite`` without
    ``callWithLogger``, and whose TCP listening ports are
    :class:`~kumoauth.ops.descriptors.AcceptPort`.
    """

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait until something happens
        try:
            # At most one event per descriptor the reactor watches, as
            # EPollReactor asks.
            ready = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        dispatch = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this poll
            try:
                dispatch(selectable, fd, event)
            except BaseException:
                legacy_log.err(system=_prefix(selectable))

    doIteration = doPoll

    # TCP listening ports whose accept events say "out of descriptors" once
    # (kumoauth/ops/descriptors.py), not once per connection closed.

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        p = AcceptPort(port, factory, backlog, interface, self)
        p.startListening()
        return p

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            return super().adoptStreamPort(fileDescriptor, addressFamily, factory)
        p = AcceptPort._fromListeningDescriptor(self, fileDescriptor, addressFamily, factory)
        p.startListening()
        return p


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"


def streamline(reactor: Any) -> bool:
    """
    Make *reactor* a :class:`DirectDispatchEPollReactor` if it is exactly an
    ``EPollReactor`` (the same object, its class swapped for the subclass,
    which overrides ``doPoll`` and the listening ports); True when it
    did.
    """
    if type(reactor) is EPollReactor:
        reactor.__class__ = DirectDispatchEPollReactor
        return True
    return isinstance(reactor, DirectDispatchEPollReactor)


def prepare(reactor: Any) -> None:
    """
    Everything kumoauth changes about the process's reactor, before it
    runs (the single process, the supervisor, each worker):
    :func:`streamline`, and pool threads that do not preempt the reactor
    thread (:func:`kumoauth.ops.threads.background_pool`).
    """
    streamline(reactor)
    background_pool(reactor)
