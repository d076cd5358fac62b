"""
An operator who runs kumoauth, or its admin command, as a user who may not
read the queue (forgetting ``sudo -u kumoauth``, a spool under a directory
only root may search) gets one line and a non-zero exit, not a traceback.

These run as user nobody: root may read everything.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kumoauth.relay.queue import QueueStore
from tests.server import free_port, write_config
from tests.test_workers import UID_PYTHON, UID_TWISTD, needs_nobody, nobodys_directory

pytestmark = needs_nobody


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


@pytest.fixture
def nobodys() -> Iterator[tuple[Path, Any]]:
    with nobodys_directory() as made:
        yield made


def test_spool_commands_on_a_queue_nobody_may_read(nobodys: tuple[Path, Any]) -> None:
    top, _ = nobodys
    spool = top / "spool"
    with QueueStore.open(spool):
        pass
    spool.chmod(0o750)  # as the server makes it, its group not nobody's
    kumoauth = [UID_PYTHON, "-m", "kumoauth.cli"]
    for args in (["list"], ["show", "0" * 24], ["hold", "0" * 24]):
        line = one_line(as_nobody([*kumoauth, "spool", "--spool", str(spool), *args], top))
        assert line.startswith("kumoauth: error: ") and "Permission denied" in line, line
        assert str(spool) in line
    # readable but not this user's to change: say whose it is
    spool.chmod(0o755)
    line = one_line(as_nobody([*kumoauth, "spool", "--spool", str(spool), "hold", "0" * 24], top))
    assert "Permission denied" in line and "run the command as root, or with sudo" in line, line


def test_a_server_whose_spool_it_may_not_reach(nobodys: tuple[Path, Any]) -> None:
    top, certs = nobodys
    directory = top / "srv"
    hidden = top / "hidden"
    hidden.mkdir(mode=0o700)  # root's alone
    ports = (free_port(), free_port(), free_port())
    config = write_config(directory, certs, ports, None, extra="")
    config.write_text(config.read_text().replace('path = "spool"', f'path = "{hidden}/q"'))
    config.chmod(0o644)
    result = as_nobody([*UID_TWISTD, "-n", "--pidfile=", "kumoauth", "--config", str(config)], top)
    line = one_line(result)
    assert "[spool] path" in line and "Permission denied" in line, line
