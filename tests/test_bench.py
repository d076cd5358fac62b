"""
A smoke run of the benchmark (tiny numbers, seconds) so it cannot rot.
The performance targets live in the benchmark itself, not here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_quick_bench_produces_every_figure_for_every_server(tmp_path):
    out, data = tmp_path / "BENCH.md", tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--json", str(data)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(data.read_text())["results"]
    servers = {"kumoauth", "aiosmtpd", "twisted.mail", "kumoauth-2w", "twisted.mail-2w"}
    single = servers - {"kumoauth-2w", "twisted.mail-2w"}
    for key in "abcd":
        assert set(results[key]) == servers
        for name, figures in results[key].items():
            assert figures["errors"] == 0, (key, name)
            assert figures["sessions"] > 0 and figures["cpu_us_per_session"] > 0
    assert set(results["e"]) == single
    assert results["f"]["kumoauth"]["wall_s"] > 0.1  # the checker waits 100 ms
    assert "note" in results["f"]["aiosmtpd"]
    assert set(results["g"]) == single
    # (i) accept and relay: kumoauth against Postfix (a note when Postfix
    # and Dovecot are not installed, or we are not root).
    relay = results["i"]
    assert set(relay) == {"kumoauth", "postfix"}
    for name, figures in relay.items():
        if "note" in figures:
            assert name == "postfix"
            continue
        assert figures["errors"] == 0 and figures["undelivered"] == 0, name
        assert figures["relayed"] > 0 and figures["cpu_us_per_message"] > 0
    # (h) resumed TLS sessions against full handshakes, TLS 1.3 and 1.2,
    # TLS 1.3 behind an RSA-2048 certificate, and stock twisted.mail's
    resumption = results["h"]
    assert set(resumption) == {
        f"{v} {kind}"
        for v in ("TLS 1.3", "TLS 1.2", "RSA-2048: TLS 1.3", "twisted.mail: TLS 1.3")
        for kind in ("full handshake", "resumed")
    }
    for name, figures in resumption.items():
        assert figures["errors"] == 0 and figures["sessions"] > 0, name
        if name.endswith("resumed"):
            assert figures["resumed_pct"] > 50, name  # the client does resume
        else:
            assert figures["resumed_pct"] == 0, name
    # ... and the handshake alone, in process: a resumed TLS 1.2 handshake
    # skips the key exchange and the signature, so it must cost less
    alone = results["h_handshake"]
    assert set(alone) == {
        f"{key}, {v}" for key in ("ECDSA P-256", "RSA-2048") for v in ("TLS 1.3", "TLS 1.2")
    }
    for name, figures in alone.items():
        assert figures["full_us"] > 0 and figures["resumed_us"] > 0, name
    assert alone["RSA-2048, TLS 1.2"]["resumed_us"] < alone["RSA-2048, TLS 1.2"]["full_us"]
    # (j) Argon2 logins: kumoauth with and without the cache, aiosmtpd
    logins = results["j"]
    assert set(logins) == {"kumoauth (no cache)", "kumoauth + [auth.cache]", "aiosmtpd"}
    for name, figures in logins.items():
        assert figures["errors"] == 0 and figures["sessions"] > 0, name
        assert figures["cpu_us_per_session"] > 0 and figures["max_stall_ms"] is not None
    # (k) one process and two at the same offered rate (50/s with --quick),
    # kumoauth's workers and twisted.mail's: every session served, at the
    # rate asked, not faster
    scaling = results["k"]
    assert set(scaling) == {"50"}
    assert set(scaling["50"]) == {"kumoauth", "kumoauth-2w", "twisted.mail", "twisted.mail-2w"}
    for name, figures in scaling["50"].items():
        assert figures["errors"] == 0 and figures["sessions"] == 50, name
        assert figures["cpu_us_per_session"] > 0, name
        assert 30 < figures["sessions_per_s"] <= 51, (name, figures["sessions_per_s"])
    text = out.read_text()
    assert "(k) one process against two at the same offered load" in text
    assert "kumoauth / aiosmtpd" in text and "kumoauth / twisted.mail" in text
    assert text.count("**kumoauth / twisted.mail**") == 7  # a-g: a ratio row for every workload
    assert "kumoauth / twisted.mail-2w" not in text  # two processes are not a peer
    # a-d: one process against two, kumoauth's and the floor's
    assert text.count("**kumoauth-2w / kumoauth**") == 4
    assert text.count("**twisted.mail-2w / twisted.mail**") == 4
    assert "**twisted.mail: TLS 1.3 resumed / full**" in text


def test_ab_runs_both_builds_and_cleans_up():
    # bench.ab against a copy of this tree given as --base-tree, workload
    # (i) (the sink included): a figure for each build every round, the
    # ratio, and nothing left running or on disk.
    before = set(Path(tempfile.gettempdir()).glob("kumoauth-ab-*"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.ab",
            "--base-tree",
            str(REPO),
            "--workload",
            "i",
            "--rounds",
            "1",
            "--sessions",
            "30",
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("round 1 ") for line in lines) == 2
    assert sum("µs CPU per relayed message" in line for line in lines) == 2
    ratio = re.fullmatch(r"this tree / .+: (\d+\.\d+)×", lines[-1])
    assert ratio and float(ratio.group(1)) > 0
    assert set(Path(tempfile.gettempdir()).glob("kumoauth-ab-*")) == before


def quick_figures(module: str) -> dict:
    """``python -m MODULE --quick``'s JSON, the run checked."""
    import json

    result = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_reports_bench_measures_every_case():
    # bench.reports --quick: a figure for each 4 MB case, and the report a
    # RET=FULL of 4 MB gets is the header-section one (FULL_RETURN_LIMIT)
    figures = quick_figures("bench.reports")
    assert len(figures) == 4
    for name, figure in figures.items():
        assert isinstance(figure["cpu_s"], float), name  # a figure, not a verdict
        assert 0 < figure["report_octets"] < 10_000, name


def test_scans_bench_measures_every_scan():
    figures = quick_figures("bench.scans")
    assert [name.split(",")[0] for name in figures] == [
        "headers_need_utf8",
        "headers_need_utf8",
        "is_report",
        "normalize_newlines",
        "message_id",
        "strip_identity_header",
        "strip_identity_header",
    ]
    assert all(isinstance(seconds, float) for seconds in figures.values()), figures


def test_stalls_bench_measures_each_server_on_each_shape():
    # bench.stalls --quick: every server on every shape, the relayed
    # kumoauth included; kumoauth refuses the header shape (max_header_size)
    figures = quick_figures("bench.stalls")
    assert list(figures) == [
        "ordinary (1 MB)",
        "dot_lines (1 MB)",
        "bare_lf (1 MB)",
        "header (1 MB)",
    ]
    for name, row in figures.items():
        assert set(row) == {"kumoauth", "aiosmtpd", "twisted.mail"}, name
        for server, figure in row.items():
            assert figure["worst_ms"] > 0, (name, server)
    assert figures["header (1 MB)"]["kumoauth"]["reply"] == "552"
    assert figures["ordinary (1 MB)"]["kumoauth"]["reply"] == "250"
