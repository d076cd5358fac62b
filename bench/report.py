"""
Write the benchmark's figures into BENCHMARKS.md, between markers, keeping
whatever the file says outside them (the optimisation log).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:begin (written by python -m bench; edits inside are overwritten) -->"
END = "<!-- bench:end -->"

WORKLOADS = {
    "a": "(a) full session over STARTTLS: EHLO, STARTTLS, EHLO, AUTH PLAIN, MAIL, RCPT, DATA 2 KB, QUIT",
    "b": "(b) the same over implicit TLS",
    "c": "(c) failed AUTH sessions (wrong password, `failure_delay = 0`)",
    "d": "(d) 10 messages per session",
}


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(ours: Any, theirs: Any) -> str:
    if not ours or not theirs:
        return "–"
    return f"{ours / theirs:.2f}×"


def render(data: dict[str, Any]) -> str:
    results = data["results"]
    # (i) has servers of its own (Postfix); the peers of a-g are these.
    names = sorted(
        {
            name
            for key, r in results.items()
            if key not in ("h", "h_handshake", "i", "j", "k")
            for name in r
        },
        key=_order,
    )
    peers = [n for n in names if not n.startswith("kumoauth") and "-2w" not in n]
    # One process against two: kumoauth-2w against kumoauth, and the floor,
    # twisted.mail-2w against twisted.mail.
    doubled = [(f"{n}-2w", n) for n in names if f"{n}-2w" in names]
    out = [BEGIN, ""]
    m = data["machine"]
    out += [
        f"Run {data['date']}, {data['duration_s']} s: `{data['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; Linux {m['kernel']}; "
        f"Python {m['python']}; {m['openssl']}; Twisted {m['twisted']}.",
        "",
        "Server CPU is the server process's own (utime + stime, all threads) divided by the "
        "sessions completed; medians of "
        f"{data['parameters']['runs']} alternating runs of {data['parameters']['sessions']} "
        f"sessions at concurrency {data['parameters']['concurrency']} (d: a fifth as many "
        "sessions). Ratios are kumoauth / peer: below 1 is better for kumoauth. "
        "`kumoauth-2w` is kumoauth with `[server] workers = 2` (CPU and RSS summed over "
        "the supervisor and both workers); `twisted.mail-2w` is stock twisted.mail run the "
        "same way, two processes adopting the sockets one parent bound (the cost of two "
        "processes to a server that does nothing else). Both sit out the per-process "
        "workloads e-g.",
        "",
    ]
    for key, title in WORKLOADS.items():
        if key not in results:
            continue
        r = results[key]
        out += [f"### {title}", ""]
        out += [
            "| server | CPU µs / session | sessions/s | p50 ms | p99 ms | peak RSS MiB | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in names:
            x = r.get(name, {})
            out.append(
                f"| {name} | {_fmt(x.get('cpu_us_per_session'))} | "
                f"{_fmt(x.get('sessions_per_s'))} | {_fmt(x.get('p50_ms'), 1)} | "
                f"{_fmt(x.get('p99_ms'), 1)} | {_fmt(x.get('peak_rss_mib'), 1)} | "
                f"{_fmt(x.get('errors'))} |"
            )
        k = r.get("kumoauth", {})
        for variant in [n for n in names if n.startswith("kumoauth-redis") and n in r]:
            x = r[variant]
            out.append(
                f"| **{variant} / kumoauth** | "
                f"**{_ratio(x.get('cpu_us_per_session'), k.get('cpu_us_per_session'))}** | "
                f"{_ratio(x.get('sessions_per_s'), k.get('sessions_per_s'))} | "
                f"{_ratio(x.get('p50_ms'), k.get('p50_ms'))} | "
                f"{_ratio(x.get('p99_ms'), k.get('p99_ms'))} | | |"
            )
        for two, one in doubled:
            x, y = r.get(two, {}), r.get(one, {})
            out.append(
                f"| **{two} / {one}** | "
                f"**{_ratio(x.get('cpu_us_per_session'), y.get('cpu_us_per_session'))}** | "
                f"{_ratio(x.get('sessions_per_s'), y.get('sessions_per_s'))} | "
                f"{_ratio(x.get('p50_ms'), y.get('p50_ms'))} | "
                f"{_ratio(x.get('p99_ms'), y.get('p99_ms'))} | | |"
            )
        for peer in peers:
            x = r.get(peer, {})
            out.append(
                f"| **kumoauth / {peer}** | **{_ratio(k.get('cpu_us_per_session'), x.get('cpu_us_per_session'))}** | "
                f"{_ratio(k.get('sessions_per_s'), x.get('sessions_per_s'))} | "
                f"{_ratio(k.get('p50_ms'), x.get('p50_ms'))} | "
                f"{_ratio(k.get('p99_ms'), x.get('p99_ms'))} | "
                f"{_ratio(k.get('peak_rss_mib'), x.get('peak_rss_mib'))} | |"
            )
        out.append("")
    if "e" in results:
        r = results["e"]
        n = next(iter(r.values()))["sessions"]
        out += [
            f"### (e) {n} concurrent idle authenticated TLS sessions",
            "",
            "| server | RSS KiB / idle session | RSS before MiB | RSS with sessions MiB |",
            "|---|---:|---:|---:|",
        ]
        for name in [n for n in names if n in r]:
            x = r[name]
            out.append(
                f"| {name} | {_fmt(x['rss_kib_per_idle_session'], 1)} | "
                f"{_fmt(x['rss_before_mib'], 1)} | {_fmt(x['rss_with_idle_mib'], 1)} |"
            )
        for peer in peers:
            out.append(
                f"| **kumoauth / {peer}** | **{_ratio(r['kumoauth']['rss_kib_per_idle_session'], r[peer]['rss_kib_per_idle_session'])}** | | |"
            )
        out.append("")
    if "f" in results:
        r = results["f"]
        out += [
            f"### (f) {data['parameters']['burst']} clients AUTH at once; the checker answers "
            "through a Deferred after 100 ms",
            "",
            "Clients connect, STARTTLS and EHLO first; the clock runs from the moment all send "
            "AUTH to the last reply. The stall is the worst NOOP round trip seen meanwhile by a "
            "separate probe connection.",
            "",
            "| server | wall time s | largest stall ms |",
            "|---|---:|---:|",
        ]
        for name in [n for n in names if n in r]:
            x = r[name]
            if "note" in x:
                out.append(f"| {name} | n/a ({x['note']}) | |")
            else:
                out.append(f"| {name} | {_fmt(x['wall_s'], 3)} | {_fmt(x['max_stall_ms'], 1)} |")
        k = r.get("kumoauth", {})
        for peer in [p for p in peers if "wall_s" in r.get(p, {})]:
            x = r[peer]
            out.append(
                f"| **kumoauth / {peer}** | **{_ratio(k.get('wall_s'), x['wall_s'])}** | "
                f"{_ratio(k.get('max_stall_ms'), x['max_stall_ms'])} |"
            )
        out.append("")
    if "g" in results:
        r = results["g"]
        n = next(iter(r.values()))["sessions"]
        out += [
            f"### (g) {n:,} sessions (a) in a row",
            "",
            "| server | RSS after first tenth MiB | RSS at end MiB | growth | CPU µs / session |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in [n for n in names if n in r]:
            x = r[name]
            out.append(
                f"| {name} | {_fmt(x['rss_after_tenth_mib'], 1)} | {_fmt(x['rss_at_end_mib'], 1)} | "
                f"{x['rss_growth_pct']:+.1f} % | {_fmt(x['cpu_us_per_session'])} |"
            )
        k = r["kumoauth"]
        for peer in [p for p in peers if p in r]:
            x = r[peer]
            out.append(
                f"| **kumoauth / {peer}** | {_ratio(k['rss_after_tenth_mib'], x['rss_after_tenth_mib'])} | "
                f"{_ratio(k['rss_at_end_mib'], x['rss_at_end_mib'])} | | "
                f"**{_ratio(k['cpu_us_per_session'], x['cpu_us_per_session'])}** |"
            )
        out.append("")
    if "h" in results:
        out += _resumption(data)
    if "i" in results:
        out += _relay(data)
    if "j" in results:
        out += _logins(data)
    if "k" in results:
        out += _scaling(data)
    out.append(END)
    return "\n".join(out)


def _relay(data: dict[str, Any]) -> list[str]:
    r = data["results"]["i"]
    params = data["parameters"]
    out = [
        "### (i) accept and relay: kumoauth with `[relay]` against Postfix as a null client",
        "",
        f"{params.get('relay_concurrency')} clients, {params.get('relay_sessions'):,} sessions "
        f"per run, medians of {params['runs']} alternating runs after a warm-up; each session "
        "as in (a): STARTTLS, AUTH PLAIN, one 2 KB message; the server relays every "
        "message to the same sink (`bench/sink.py`, its own process, plaintext, no AUTH: "
        'kumoauth `tls = "none"`, `identity = "none"`; Postfix `relayhost`, no smtp_sasl, '
        "no smtp TLS). The clock and the CPU count stop when the sink has every message. CPU "
        "is the server's whole process tree, exited children included: kumoauth's twistd; "
        "Postfix's master and everything under it (smtpd, cleanup, qmgr, smtp, "
        "trivial-rewrite, anvil, postlogd, …) **plus Dovecot's auth server** (its SASL), "
        "shown separately too.",
        "",
        "| server | CPU µs / relayed message | of which Dovecot | wall s | relayed / s "
        "| accept s | p50 ms | p99 ms | RSS MiB | errors | undelivered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sorted(r, key=_order):
        x = r[name]
        if "note" in x:
            out.append(f"| {name} | n/a ({x['note']}) | | | | | | | | | |")
            continue
        out.append(
            f"| {name} | {_fmt(x.get('cpu_us_per_message'))} | "
            f"{_fmt(x.get('dovecot_us_per_message'))} | {_fmt(x.get('wall_s'), 2)} | "
            f"{_fmt(x.get('messages_per_s'))} | {_fmt(x.get('accept_s'), 2)} | "
            f"{_fmt(x.get('p50_ms'), 1)} | {_fmt(x.get('p99_ms'), 1)} | "
            f"{_fmt(x.get('rss_mib'), 1)} | {_fmt(x.get('errors'))} | "
            f"{_fmt(x.get('undelivered'))} |"
        )
    k = r.get("kumoauth", {})
    for peer in [n for n in sorted(r, key=_order) if n != "kumoauth" and "note" not in r[n]]:
        x = r[peer]
        out.append(
            f"| **kumoauth / {peer}** | "
            f"**{_ratio(k.get('cpu_us_per_message'), x.get('cpu_us_per_message'))}** | | "
            f"{_ratio(k.get('wall_s'), x.get('wall_s'))} | "
            f"{_ratio(k.get('messages_per_s'), x.get('messages_per_s'))} | "
            f"{_ratio(k.get('accept_s'), x.get('accept_s'))} | "
            f"{_ratio(k.get('p50_ms'), x.get('p50_ms'))} | "
            f"{_ratio(k.get('p99_ms'), x.get('p99_ms'))} | "
            f"{_ratio(k.get('rss_mib'), x.get('rss_mib'))} | | |"
        )
    out.append("")
    return out


def _resumption(data: dict[str, Any]) -> list[str]:
    r = data["results"]["h"]
    params = data["parameters"]
    out = [
        "### (h) clients that resume TLS sessions",
        "",
        f"Sessions as in (a) ({params['sessions']:,} per run, {params['concurrency']} "
        "client threads with blocking sockets), against kumoauth with "
        "`[tls] session_tickets = true`; each thread offers the TLS session of its previous "
        "connection (resumed) or none (full handshake), the two alternating, medians of "
        f"{params['runs']} runs. The rows marked RSA-2048 are the same against a second "
        "kumoauth whose certificate has an RSA-2048 key instead of ECDSA P-256 (the same "
        "CA): the signature a full handshake makes costs more there, and resumption saves it. "
        "The rows marked twisted.mail are the same client against stock twisted.mail with "
        "session tickets on (ECDSA, nothing stored): what resumption saves a Twisted server "
        "that does no more than answer.",
        "",
        "| client | CPU µs / session | sessions/s | p50 ms | resumed | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, x in r.items():
        out.append(
            f"| {name} | {_fmt(x.get('cpu_us_per_session'))} | {_fmt(x.get('sessions_per_s'))} | "
            f"{_fmt(x.get('p50_ms'), 1)} | {_fmt(x.get('resumed_pct'), 1)} % | "
            f"{_fmt(x.get('errors'))} |"
        )
    for version in ("TLS 1.3", "TLS 1.2", "RSA-2048: TLS 1.3", "twisted.mail: TLS 1.3"):
        full, resumed = r.get(f"{version} full handshake", {}), r.get(f"{version} resumed", {})
        out.append(
            f"| **{version} resumed / full** | "
            f"**{_ratio(resumed.get('cpu_us_per_session'), full.get('cpu_us_per_session'))}** | "
            f"{_ratio(resumed.get('sessions_per_s'), full.get('sessions_per_s'))} | "
            f"{_ratio(resumed.get('p50_ms'), full.get('p50_ms'))} | | |"
        )
    alone = data["results"].get("h_handshake")
    if alone:
        out += [
            "",
            "The handshake alone (`python -m bench.handshake`: kumoauth's TLS context and "
            "connection driven in process by a Python `ssl` client over memory BIOs, "
            f"{params.get('handshakes', 500)} of each kind, medians; only the server's calls "
            "are timed, with the first record in and the reply out): what resumption saves "
            "at most, without the sockets, the reactor and the SMTP session around it.",
            "",
            "| certificate, version | full handshake µs | resumed µs | **resumed / full** |",
            "|---|---:|---:|---:|",
        ]
        for name, x in alone.items():
            out.append(
                f"| {name} | {_fmt(x.get('full_us'))} | {_fmt(x.get('resumed_us'))} | "
                f"**{_ratio(x.get('resumed_us'), x.get('full_us'))}** |"
            )
    out.append("")
    return out


def _logins(data: dict[str, Any]) -> list[str]:
    r = data["results"]["j"]
    params = data["parameters"]
    out = [
        f"### (j) {params.get('login_users')} users with Argon2id hashes log in over and over",
        "",
        f"{params.get('login_concurrency')} clients, {params.get('login_sessions'):,} "
        f"AUTH-only sessions per run (EHLO, STARTTLS, EHLO, AUTH PLAIN, QUIT), the accounts "
        f"used in turn, medians of {params['runs']} alternating runs after a warm-up that "
        "logs every account in once. Hashes at Dovecot's default Argon2id cost (t=3, 64 MiB, "
        "as `kumoauth pw` and `doveadm pw -s ARGON2ID` make them). kumoauth: `checker = "
        '"passwd-file"`, verification in its checker threads; with and without '
        "`[auth.cache]`. aiosmtpd: its authenticator (a plain function, called on the event "
        "loop) verifies with the same library. The stall is the worst NOOP round trip a "
        "separate probe connection saw during the run.",
        "",
        "| server | logins/s | CPU µs / login | worst stall ms | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in r:
        x = r[name]
        out.append(
            f"| {name} | {_fmt(x.get('sessions_per_s'))} | {_fmt(x.get('cpu_us_per_session'))} | "
            f"{_fmt(x.get('max_stall_ms'), 1)} | {_fmt(x.get('p50_ms'), 1)} | "
            f"{_fmt(x.get('p99_ms'), 1)} | {_fmt(x.get('errors'))} |"
        )
    base = r.get("kumoauth (no cache)", {})
    for name in [n for n in r if n != "kumoauth (no cache)"]:
        x = r[name]
        out.append(
            f"| **{name} / kumoauth (no cache)** | "
            f"**{_ratio(x.get('sessions_per_s'), base.get('sessions_per_s'))}** | "
            f"{_ratio(x.get('cpu_us_per_session'), base.get('cpu_us_per_session'))} | "
            f"{_ratio(x.get('max_stall_ms'), base.get('max_stall_ms'))} | | | |"
        )
    out.append("")
    return out


def _order(name: str) -> tuple[int, str]:
    return (0 if name == "kumoauth" else 2 if name.startswith("kumoauth") else 1, name)


def write(path: Path, data: dict[str, Any]) -> None:
    block = render(data)
    text = path.read_text() if path.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def _scaling(data: dict[str, Any]) -> list[str]:
    r = data["results"]["k"]
    params = data["parameters"]
    bases = [
        b
        for b in ("kumoauth", "twisted.mail")
        if any(b in by and f"{b}-2w" in by for by in r.values())
    ]
    out = [
        "### (k) one process against two at the same offered load",
        "",
        "Workload (a)'s sessions started at a fixed rate (open loop, at most "
        f"{params.get('rate_concurrency', params['concurrency'])} at a time; a session that "
        "had to wait for a slot counts as late, and its latency runs from when it was due), "
        f"{params.get('rate_seconds', 4):g} s per run, medians of {params['runs']} "
        "alternating runs after a warm-up at the same rate. In (a) the closed loop "
        "saturates the single process while each of two is half as busy; here both "
        "are offered the same sessions per second. twisted.mail against twisted.mail-2w "
        "is the floor: what a second process costs a server that does nothing else.",
        "",
        "| offered sessions/s | "
        + " | ".join(f"{b} CPU µs / session (1 / 2w) | **{b} 2w / 1**" for b in bases)
        + " | kumoauth served/s (1 / 2w) | kumoauth p50 ms (1 / 2w) | kumoauth late (1 / 2w) |",
        "|---:|" + "---:|---:|" * len(bases) + "---:|---:|---:|",
    ]
    for rate, by in r.items():
        cells = []
        for b in bases:
            one, two = by.get(b, {}), by.get(f"{b}-2w", {})
            cells.append(
                f"{_fmt(one.get('cpu_us_per_session'))} / {_fmt(two.get('cpu_us_per_session'))} "
                f"| **{_ratio(two.get('cpu_us_per_session'), one.get('cpu_us_per_session'))}**"
            )
        one, two = by.get("kumoauth", {}), by.get("kumoauth-2w", {})
        out.append(
            f"| {rate} | "
            + " | ".join(cells)
            + f" | {_fmt(one.get('sessions_per_s'))} / {_fmt(two.get('sessions_per_s'))} | "
            f"{_fmt(one.get('p50_ms'), 1)} / {_fmt(two.get('p50_ms'), 1)} | "
            f"{_fmt(one.get('late'))} / {_fmt(two.get('late'))} |"
        )
    out.append("")
    return out
