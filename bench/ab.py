"""
A/B: this tree's kumoauth against another revision's, interleaved.

    python -m bench.ab --base REV [--workload a|i] [--rounds 6] [--sessions 1500]

The noise between two separate runs on a shared VM (±15 %) is larger than
most single changes; alternating rounds of the two builds in one run, and
comparing medians, is not.  The base revision is exported with
``git archive`` into a temporary directory and put first on that server's
``PYTHONPATH``; everything else (config, certificate, client, sink) is
shared.  Prints one line per round and the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.__main__ import REPO, Bench, Kumoauth, KumoauthRelay, free_port, make_certs
from bench.relay import Sink


def export(rev: str, into: Path) -> Path:
    tree = into / "base"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def with_path(cls: type, tree: Path) -> type:
    class Base(cls):  # type: ignore[misc, valid-type]
        def start(self) -> None:
            old = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = str(tree) + (os.pathsep + old if old else "")
            try:
                super().start()
            finally:
                if old is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = old

    return Base


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base", help="git revision to compare with (e.g. HEAD)")
    p.add_argument(
        "--base-tree",
        help="or a directory holding the other build (a patched copy, for cost attribution)",
    )
    p.add_argument("--workload", choices=["a", "i"], default="a")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--sessions", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=20)
    args = p.parse_args()
    if (args.base is None) == (args.base_tree is None):
        p.error("give one of --base and --base-tree")
    args.relay_concurrency = 10
    workdir = Path(tempfile.mkdtemp(prefix="kumoauth-ab-"))
    tree = Path(args.base_tree).resolve() if args.base_tree else export(args.base, workdir)
    args.base = args.base or str(args.base_tree)
    cert, key, ca = make_certs(workdir)
    cls = KumoauthRelay if args.workload == "i" else Kumoauth
    servers = {"this tree": cls("new", workdir, cert, key), args.base: with_path(cls, tree)(
        "base", workdir, cert, key
    )}  # fmt: skip
    sink = None
    if args.workload == "i":
        sink = Sink(workdir, free_port())
        sink.start()
        for s in servers.values():
            s.relay_port = sink.port  # type: ignore[attr-defined]
    figures: dict[str, list[float]] = {name: [] for name in servers}
    p50: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for s in servers.values():
            s.start()
        bench = Bench(args, workdir, ca, list(servers.values()), cert, key)  # type: ignore[arg-type]
        for s in servers.values():  # warm-up
            if sink is not None:
                bench.relayed(s, sink, 200)
            else:
                bench.sessions(s, "starttls", 200, 1, False)
        for r in range(args.rounds):
            order = list(servers.items())
            if r % 2:
                order.reverse()
            for name, s in order:
                if sink is not None:
                    result = bench.relayed(s, sink, args.sessions)
                    us = result["cpu_us_per_message"]
                else:
                    result = bench.sessions(s, "starttls", args.sessions, 1, False)
                    us = result["cpu_us_per_session"]
                figures[name].append(us)
                p50[name].append(result["p50_ms"])
                print(
                    f"round {r + 1} {name}: {us:,.0f} µs, p50 {result['p50_ms']:.1f} ms", flush=True
                )
        unit = "relayed message" if sink is not None else "session"
        med = {name: statistics.median(v) for name, v in figures.items()}
        for name, m in med.items():
            print(
                f"median {name}: {m:,.0f} µs CPU per {unit}, "
                f"session p50 {statistics.median(p50[name]):.1f} ms"
            )
        new, base = med["this tree"], med[args.base]
        print(f"this tree / {args.base}: {new / base:.3f}×")
    finally:
        for s in servers.values():
            s.stop()
        if sink is not None:
            sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
