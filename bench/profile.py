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
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.__main__ import Bench, Kumoauth, KumoauthRelay, free_port, make_certs
from bench.relay import Sink


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
    args = p.parse_args()
    args.relay_concurrency = args.concurrency
    workdir = Path(tempfile.mkdtemp(prefix="kumoauth-profile-"))
    cert, key, ca = make_certs(workdir)
    sink: Sink | None = None
    if args.workload == "i":
        sink = Sink(workdir, free_port())
        sink.start()
        server: Kumoauth = KumoauthRelay("kumoauth-relay", workdir, cert, key)
        server.relay_port = sink.port  # type: ignore[attr-defined]
    else:
        server = Kumoauth("kumoauth", workdir, cert, key)
    server.start()
    try:
        assert server.proc is not None
        bench = Bench(args, workdir, ca, [server], cert, key)  # type: ignore[arg-type]
        if sink is not None:
            bench.relayed(server, sink, 200)
        else:
            bench.sessions(server, "starttls", 200, 1, False)
        spy_exe = Path(sys.executable).parent / "py-spy"
        spy_cmd = str(spy_exe) if spy_exe.exists() else "py-spy"
        cmd = [spy_cmd, "record", "--pid", str(server.proc.pid), "--format", "raw",
               "--rate", str(args.rate), "--output", args.out]  # fmt: skip
        # --native needs the process stopped while it is sampled; without
        # it, sample without stopping (less distortion).
        cmd.append("--native" if args.native else "--nonblocking")
        spy_log = open(args.out + ".log", "wb")
        spy = subprocess.Popen(cmd, stdout=spy_log, stderr=subprocess.STDOUT)
        if sink is not None:
            result = bench.relayed(server, sink, args.sessions)
            figure = f"{result['cpu_us_per_message']:.0f} µs CPU per relayed message"
        else:
            result = bench.sessions(server, "starttls", args.sessions, 1, False)
            figure = f"{result['cpu_us_per_session']:.0f} µs CPU per session"
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
        spy_log.close()
        if not Path(args.out).exists():
            print(f"py-spy wrote no profile; its output: {args.out}.log")
            return 1
        print(f"{figure} under the profiler")
        print(summarize(Path(args.out)))
    finally:
        server.stop()
        if sink is not None:
            sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
