"""
An operator who runs kumoauth, or its admin command, as a user who may not
read the queue (forgetting ``sudo -u kumoauth``, a spool under a directory
only root may search) gets one line and a non-zero exit, not a traceback.

These run as user nobody: root may read everything.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kumoauth.relay.queue import QueueStore
from tests.server import free_port, make_certs, write_config
from tests.test_workers import NOBODY_RUNS_PYTHON, UID_PYTHON, UID_TWISTD, needs_nobody

pytestmark = needs_nobody


@pytest.fixture
def top() -> Iterator[Path]:
    """A directory nobody may search (outside /tmp's pytest tree, which is 0700)."""
    if not NOBODY_RUNS_PYTHON:  # CI, where it must run: say why it cannot, at once
        pytest.fail(f"user nobody cannot import kumoauth with {UID_PYTHON} (KUMOAUTH_UID_PYTHON)")
    path = Path(tempfile.mkdtemp(prefix="kumoauth-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def as_nobody(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        user="nobody",
        group="nogroup",
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    return line


def test_spool_commands_on_a_queue_nobody_may_read(top: Path) -> None:
    spool = top / "spool"
    with QueueStore.open(spool):
        pass
    spool.chmod(0o750)  # as the server makes it, its group not nobody's
    kumoauth = [UID_PYTHON, "-m", "kumoauth.cli"]
    for args in (["list"], ["show", "0" * 24], ["hold", "0" * 24]):
        line = one_line(as_nobody([*kumoauth, "spool", "--spool", str(spool), *args], top))
        assert line.startswith("kumoauth: error: ") and "Permission denied" in line, line
        assert str(spool) in line


def test_a_server_whose_spool_it_may_not_reach(top: Path) -> None:
    certs = make_certs(top / "certs")
    for p in (top / "certs", certs.chain, certs.key):
        p.chmod(0o755 if p.is_dir() else 0o644)
    directory = top / "srv"
    directory.mkdir(mode=0o755)
    hidden = top / "hidden"
    hidden.mkdir(mode=0o700)  # root's alone
    ports = (free_port(), free_port(), free_port())
    config = write_config(directory, certs, ports, None, extra="")
    config.write_text(config.read_text().replace('path = "spool"', f'path = "{hidden}/q"'))
    config.chmod(0o644)
    result = as_nobody([*UID_TWISTD, "-n", "--pidfile=", "kumoauth", "--config", str(config)], top)
    line = one_line(result)
    assert "[spool] path" in line and "Permission denied" in line, line
