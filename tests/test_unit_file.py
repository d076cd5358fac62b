"""
etc/kumoauth.service: its ExecStart runs the server as written (with the
paths of this machine), its ExecReload signal reloads, and SIGTERM (its
KillSignal) stops it with exit status 0 within TimeoutStopSec.
"""

from __future__ import annotations

import configparser
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server import free_port, make_certs, wait_for_port, write_config
from tests.test_e2e import POLICY, login, starttls_client

pytestmark = pytest.mark.e2e

UNIT = Path(__file__).resolve().parent.parent / "etc" / "kumoauth.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_unit_file_runs_reloads_and_stops(tmp_path):
    service = unit()["Service"]
    assert service["Type"] == "simple"
    assert service["KillSignal"] == "SIGTERM"
    assert "kill -HUP $MAINPID" in service["ExecReload"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/kumoauth/bin/twistd" and "--nodaemon" in argv
    certs = make_certs(tmp_path / "certs")
    ports = (free_port(), free_port(), free_port())
    config = write_config(tmp_path, certs, ports, POLICY, server="shutdown_grace = 2")
    # The unit's command line, with this machine's twistd and config.
    argv = [
        *([sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]),
        *[str(config) if a == "/etc/kumoauth/kumoauth.toml" else a for a in argv[1:]],
    ]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log = tmp_path / "missing.log"  # --logfile=- : the log is stdout
        for port in ports:
            wait_for_port(port, proc, log)

        class Srv:
            starttls_port = ports[0]

        Srv.certs = certs  # type: ignore[attr-defined]
        with starttls_client(Srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(float(service["TimeoutStopSec"])) == 0
        out = proc.stdout.read().decode() if proc.stdout else ""
        # The journal gets the log: stdout, because of --logfile=-.
        assert "AUTH PLAIN success authc=scott" in out
        assert "reloaded configuration" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_systemd_accepts_the_unit(tmp_path):
    """systemd-analyze verify, with ExecStart pointing at this machine's twistd."""
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    twistd = Path(sys.executable).parent / "twistd"
    copy = tmp_path / "kumoauth.service"
    copy.write_text(UNIT.read_text().replace("/opt/kumoauth/bin/twistd", str(twistd)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "kumoauth.service" not in result.stderr, result.stderr
