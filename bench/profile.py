"""
Profile kumoauth under workload (a), or (i) (accept and relay to the sink).

    python -m bench.profile [--workload a|i] [--sessions N] [--out FILE]

Starts kumoauth as the benchmark does (for (i): with ``[relay]`` to
``bench/sink.py``) and runs the session load against it while py-spy
(``pip install py-spy``) samples the server, every thread, including
native frames (OpenSSL) with ``--native``.  Writes py-spy's "raw"
(collapsed stacks) output and prints the top functions by own and by
total samples.
"""

from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
from pathlib import Path

from bench.rig import Rig


def summarize(raw: Path, top: int = 30) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    out = [f"{samples} samples", "", "own:"]
    out += [f"{n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    out += ["", "total:"]
    out += [f"{n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sessions", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--out", default="kumoauth-profile.txt")
    p.add_argument("--native", action="store_true")
    p.add_argument("--rate", type=int, default=500, help="samples per second (--native: use ~50)")
    p.add_argument("--workload", choices=["a", "i"], default="a")
    p.add_argument(
        "--gil", action="store_true", help="only samples holding the GIL (the Python side's CPU)"
    )
    args = p.parse_args()
    args.relay_concurrency = args.concurrency
    with Rig(args, "kumoauth-profile-") as rig:
        server = rig.server("kumoauth")
        rig.start(server)
        assert server.proc is not None
        spy_exe = Path(sys.executable).parent / "py-spy"
        spy_cmd = str(spy_exe) if spy_exe.exists() else "py-spy"
        cmd = [spy_cmd, "record", "--pid", str(server.proc.pid), "--format", "raw",
               "--rate", str(args.rate), "--output", args.out]  # fmt: skip
        # --native needs the process stopped while it is sampled; without
        # it, sample without stopping (less distortion).
        cmd.append("--native" if args.native else "--nonblocking")
        if args.gil:
            cmd.append("--gil")
        with open(args.out + ".log", "wb") as spy_log:
            spy = subprocess.Popen(cmd, stdout=spy_log, stderr=subprocess.STDOUT)
            us, _ = rig.run(server, args.sessions)
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        if not Path(args.out).exists():
            print(f"py-spy wrote no profile; its output: {args.out}.log")
            return 1
        print(f"{us:.0f} µs CPU per {rig.unit} under the profiler")
        print(summarize(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
