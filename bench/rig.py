"""
One workload against kumoauth servers made for the occasion: what
``bench.ab`` and ``bench.profile`` share.

A :class:`Rig` owns a work directory with a certificate, the sink for
workload (i), the servers it starts (each warmed up with 200 sessions), and
stops and removes all of it on exit.  :meth:`Rig.run` is one measurement:
workload (a) (sessions over STARTTLS) or (i) (sessions relayed to the sink).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.__main__ import (
    Bench,
    Kumoauth,
    KumoauthRelay,
    KumoauthWorkers,
    free_port,
    make_certs,
)
from bench.relay import Sink


class Rig:
    def __init__(self, args: argparse.Namespace, prefix: str) -> None:
        """
        *args*: ``workload`` ("a" or "i"), ``concurrency``, ``relay_concurrency``;
        for (a), optionally ``workers`` (1 or 2) and ``rate`` (sessions/s, open loop).
        """
        self.args = args
        self.relay = args.workload == "i"
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self.cert, self.key, self.ca = make_certs(self.workdir)
        self.sink: Sink | None = None
        self.servers: list[Kumoauth] = []
        self.bench: Bench | None = None

    @property
    def server_class(self) -> type[Kumoauth]:
        if self.relay:
            return KumoauthRelay
        return KumoauthWorkers if getattr(self.args, "workers", 1) == 2 else Kumoauth

    @property
    def unit(self) -> str:
        return "relayed message" if self.relay else "session"

    def server(self, name: str, cls: type[Kumoauth] | None = None) -> Kumoauth:
        """A server of this rig's kind (or of *cls*, a subclass of it), not started."""
        return (cls or self.server_class)(name, self.workdir, self.cert, self.key)

    def start(self, *servers: Kumoauth) -> None:
        if self.relay:
            self.sink = Sink(self.workdir, free_port())
            self.sink.start()
        for s in servers:
            if self.sink is not None:
                s.relay_port = self.sink.port  # type: ignore[attr-defined]
            self.servers.append(s)
            s.start()
        self.bench = Bench(self.args, self.workdir, self.ca, list(servers), self.cert, self.key)  # type: ignore[arg-type]
        for s in servers:
            self.run(s, 200)  # warm-up

    def run(self, server: Kumoauth, n: int) -> tuple[float, dict[str, Any]]:
        """*n* sessions: server CPU µs per session (a) or relayed message (i), and every figure."""
        assert self.bench is not None
        if self.sink is not None:
            result = self.bench.relayed(server, self.sink, n)
            return result["cpu_us_per_message"], result
        rate = getattr(self.args, "rate", 0)
        result = self.bench.sessions(server, "starttls", n, 1, False, rate)
        return result["cpu_us_per_session"], result

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.servers:
            s.stop()
        if self.sink is not None:
            self.sink.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
