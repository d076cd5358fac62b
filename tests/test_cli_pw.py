"""
``kumoauth pw`` at its password prompt, on a real terminal (a pty): Ctrl-D
is one line and exit 1, Ctrl-C exit 130; never a traceback.  The hashing
itself and the standard-input form are tested in tests/test_schemes.py.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

CTRL_C, CTRL_D = b"\x03", b"\x04"


def _read_until(fd: int, wanted: bytes, deadline: float) -> bytes:
    """What the terminal shows until *wanted* appears (or the program ends)."""
    seen = b""
    while wanted not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{wanted!r} never shown; the terminal had: {seen!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the program ended, the terminal is gone
            return seen
        if not chunk:
            return seen
        seen += chunk
    return seen


def at_a_terminal(
    args: list[str], keys: list[bytes], prompt: bytes = b"assword: ", timeout: float = 30
) -> tuple[int, str]:
    """
    Run ``python -m kumoauth.cli *args`` with a pty as its controlling
    terminal (stdin, stdout, stderr and /dev/tty, where getpass prompts);
    at each prompt type the next of *keys*.  Its exit status, and all the
    terminal showed.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its terminal
        try:
            os.execv(sys.executable, [sys.executable, "-m", "kumoauth.cli", *args])  # noqa: S606
        finally:
            os._exit(127)
    deadline = time.monotonic() + timeout
    shown = b""
    try:
        for key in keys:
            shown += _read_until(fd, prompt, deadline)
            shown = shown.replace(prompt, b"<prompt>", 1)
            os.write(fd, key)
        shown += _read_until(fd, b"\x00never\x00", deadline)  # to the end
    finally:
        os.close(fd)  # a program still waiting at a prompt gets SIGHUP
        status = _reap(pid)
    return os.waitstatus_to_exitcode(status), shown.decode("utf-8", "replace")


def _reap(pid: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def lines_after_prompt(shown: str) -> list[str]:
    return [line for line in shown.split("<prompt>")[-1].splitlines() if line.strip()]


@pytest.mark.parametrize("at", ["first", "retype"])
def test_ctrl_d_at_the_prompt_is_one_line_and_exit_1(at):
    keys = [CTRL_D] if at == "first" else [b"tiger\n", CTRL_D]
    status, shown = at_a_terminal(["pw"], keys)
    assert status == 1, shown
    assert "Traceback" not in shown and "EOFError" not in shown
    assert lines_after_prompt(shown) == ["kumoauth: error: no password given"], shown


@pytest.mark.parametrize("at", ["first", "retype"])
def test_ctrl_c_at_the_prompt_exits_130_without_a_traceback(at):
    keys = [CTRL_C] if at == "first" else [b"tiger\n", CTRL_C]
    status, shown = at_a_terminal(["pw"], keys)
    assert status == 130, shown
    assert "Traceback" not in shown and "KeyboardInterrupt" not in shown
    assert lines_after_prompt(shown) == [], shown


def test_a_password_typed_twice_is_hashed():
    from kumoauth.backends.schemes import verify

    status, shown = at_a_terminal(["pw", "-s", "SSHA512"], [b"tiger\n", b"tiger\n"])
    assert status == 0, shown
    (hashed,) = lines_after_prompt(shown)
    assert hashed.startswith("{SSHA512}") and verify(hashed.strip(), "tiger")
    assert "tiger" not in shown.replace(hashed, "")  # not echoed


def test_no_standard_input_at_all_is_one_line_and_exit_1():
    done = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "pw"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(0),  # started with fd 0 closed: sys.stdin is None
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == "kumoauth: error: no password given (no standard input)\n"
    assert done.stdout == ""


NOT_UTF8 = "kumoauth: error: the password is not valid UTF-8"


def test_a_password_not_utf8_at_the_prompt_is_one_line_and_exit_1(monkeypatch):
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    status, shown = at_a_terminal(["pw"], [b"p\xe4ss\n"])  # Latin-1 "päss"
    assert status == 1, shown
    assert "Traceback" not in shown and "UnicodeDecodeError" not in shown
    assert lines_after_prompt(shown) == [NOT_UTF8], shown


@pytest.mark.parametrize(
    "io_encoding",
    [None, "utf-8:strict"],
    ids=["surrogateescape", "strict"],  # what Python picks in the C locale; elsewhere
)
def test_a_password_not_utf8_on_standard_input_is_one_line_and_exit_1(io_encoding):
    from kumoauth.backends.schemes import verify

    env = {k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}
    env["LC_ALL"] = "C.UTF-8"
    if io_encoding is not None:
        env["PYTHONIOENCODING"] = io_encoding
    for password in (b"p\xe4ss", b"\xff\xfe", b"ok\xc3"):
        done = subprocess.run(
            [sys.executable, "-m", "kumoauth.cli", "pw", "-s", "SSHA512"],
            input=password + b"\n",
            capture_output=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.decode() == NOT_UTF8 + "\n"
        assert done.stdout == b""
    # valid UTF-8 is hashed as before
    done = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "pw", "-s", "SSHA512"],
        input="päss\n".encode(),
        capture_output=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert verify(done.stdout.decode().strip(), "päss")
