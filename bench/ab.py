"""
A/B: this tree's kumoauth against another revision's, interleaved.

    python -m bench.ab --base REV [--workload a|i] [--rounds 6] [--sessions 1500]
                      [--workers 2] [--rate R]

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
import statistics
import subprocess
import sys
from pathlib import Path

from bench.__main__ import REPO
from bench.rig import Rig


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
    p.add_argument("--workers", type=int, choices=[1, 2], default=1, help="(a): [server] workers")
    p.add_argument("--rate", type=float, default=0, help="(a): sessions/s, open loop")
    args = p.parse_args()
    if (args.base is None) == (args.base_tree is None):
        p.error("give one of --base and --base-tree")
    if args.workload == "i" and (args.workers != 1 or args.rate):
        p.error("--workers and --rate are for workload a")
    args.relay_concurrency = 10
    with Rig(args, "kumoauth-ab-") as rig:
        tree = Path(args.base_tree).resolve() if args.base_tree else export(args.base, rig.workdir)
        base = args.base or str(args.base_tree)
        servers = {
            "this tree": rig.server("new"),
            base: rig.server("base", with_path(rig.server_class, tree)),
        }
        rig.start(*servers.values())
        figures: dict[str, list[float]] = {name: [] for name in servers}
        p50: dict[str, list[float]] = {name: [] for name in servers}
        for r in range(args.rounds):
            order = list(servers.items())
            if r % 2:
                order.reverse()
            for name, s in order:
                us, result = rig.run(s, args.sessions)
                figures[name].append(us)
                p50[name].append(result["p50_ms"])
                print(
                    f"round {r + 1} {name}: {us:,.0f} µs, p50 {result['p50_ms']:.1f} ms", flush=True
                )
        med = {name: statistics.median(v) for name, v in figures.items()}
        for name, m in med.items():
            print(
                f"median {name}: {m:,.0f} µs CPU per {rig.unit}, "
                f"session p50 {statistics.median(p50[name]):.1f} ms"
            )
        print(f"this tree / {base}: {med['this tree'] / med[base]:.3f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
