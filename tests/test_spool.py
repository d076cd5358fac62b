"""
The durable spool of SPEC §7 and the kumoauth-spool command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import Spool, SpoolError, is_id, new_id


def message(mid=None, data=b"Subject: x\r\n\r\nbody\r\n", **meta):
    return Message(
        mid or new_id(), "a@example.com", ["b@example.net"], data, {"authn_id": "scott", **meta}
    )


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.create()
    return s


def test_ids_are_unique_and_sortable():
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert all(is_id(i) for i in ids)
    assert sorted(ids)[0][:16] <= ids[-1][:16]
    # Ids sort by arrival: the time prefixes never go backwards.
    prefixes = [i[:16] for i in ids]
    assert prefixes == sorted(prefixes)


def test_write_and_read_a_message(spool):
    msg = message()
    assert spool.write(msg) == msg.id
    stored = spool.read(msg.id)
    assert stored.read_bytes() == msg.data
    env = stored.envelope
    assert {"id", "received_at", "mail_from", "rcpt_to", "meta"} <= set(env)
    assert env["id"] == msg.id
    assert env["mail_from"] == "a@example.com" and env["rcpt_to"] == ["b@example.net"]
    assert env["meta"] == {"authn_id": "scott"}
    assert env["received_at"].endswith("Z") and len(env["received_at"]) == 20
    assert list(spool.ids()) == [msg.id]


def test_files_are_not_world_readable(spool):
    spool.write(message())
    files = [p for p in spool.path.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert os.stat(path).st_mode & 0o007 == 0, path


def test_failure_leaves_nothing(spool):
    msg = message()
    msg._values["bad"] = object()  # slipped past set_meta: not JSON
    with pytest.raises(SpoolError) as e:
        spool.write(msg)
    assert msg.id in str(e.value)
    assert list(spool.ids()) == []
    good = message()
    assert spool.write(good) == good.id
    assert list(spool.ids()) == [good.id]


def test_id_collision_fails_cleanly(spool):
    msg = message()
    spool.write(msg)
    with pytest.raises(SpoolError):
        spool.write(msg)
    assert list(spool.ids()) == [msg.id]


OPEN_QUEUE = "import sys; from kumoauth.relay.queue import QueueStore; QueueStore.open(sys.argv[1])"


def test_a_second_owner_is_refused(spool, tmp_path):
    # The spool is the queue: one owner at a time, across processes.
    spool.write(message())
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from kumoauth.relay.queue import QueueStore; QueueStore.open({str(spool.path)!r})",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "in use by another kumoauth" in result.stderr


def test_read_unknown(spool):
    with pytest.raises(KeyError):
        spool.read("0" * 24)
    with pytest.raises(KeyError):
        spool.read("../etc/passwd")


def run_cli(*args, alias: bool = False):
    # `kumoauth spool ...`, or the old `kumoauth-spool ...` alias.
    command = ["-m", "kumoauth.cli.spool"] if alias else ["-m", "kumoauth.cli", "spool"]
    return subprocess.run(
        [sys.executable, *command, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_spool_cli_list_and_show(spool):
    msgs = [message(), message(data=b"Subject: two\r\n\r\n2\r\n")]
    for m in msgs:
        spool.write(m)
    listing = run_cli("--spool", str(spool.path), "list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [m.id for m in msgs]
    assert "authn=scott" in lines[0] and "from=<a@example.com>" in lines[0]
    shown = run_cli("--spool", str(spool.path), "show", msgs[1].id)
    assert shown.stdout == "Subject: two\r\n\r\n2\r\n".replace(
        "\r\n", "\n"
    ) or shown.stdout.startswith("Subject: two")
    meta = run_cli("--spool", str(spool.path), "show", "--meta", msgs[0].id)
    assert json.loads(meta.stdout)["id"] == msgs[0].id
    unknown = "0" * 24
    missing = run_cli("--spool", str(spool.path), "show", unknown)
    assert missing.returncode == 1 and f"no message {unknown} in the queue" in missing.stderr


def test_spool_cli_with_config(tmp_path):
    config = tmp_path / "k.toml"
    config.write_text(
        '[[listener]]\nendpoint="tcp:1"\ntls="none"\nauth_required=false\n[spool]\npath="sp"\n'
    )
    Spool(tmp_path / "sp").create()
    result = run_cli("--config", str(config), "list")
    assert result.returncode == 0 and result.stdout == ""
    bad = run_cli("--config", str(tmp_path / "nope.toml"), "list")
    assert bad.returncode == 1 and "not found" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_kumoauth_spool_alias_still_works(spool):
    spool.write(message())
    listing = run_cli("--spool", str(spool.path), "list", alias=True)
    assert listing.returncode == 0 and "authn=scott" in listing.stdout


def test_kumoauth_command_lists_its_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "spool" in result.stdout
    none = subprocess.run([sys.executable, "-m", "kumoauth.cli"], capture_output=True, text=True)
    assert none.returncode == 2 and "COMMAND" in none.stderr


def test_the_spool_writer_runs_one_thread_however_often_started(tmp_path):
    """
    ``start`` twice keeps one writer thread (a second one would wait on an
    inbox nobody fills, forever); what is stored is written, and ``stop``
    ends the thread.
    """
    import threading
    import time

    from kumoauth.storage.spool import SpoolWriter

    written: list[list[str]] = []

    class Appender:
        def append_batch(self, messages):
            written.append([m.id for m in messages])
            return [m.id for m in messages]

    class Reactor:
        def callFromThread(self, f, *args):
            f(*args)

    def writers():
        return {t for t in threading.enumerate() if t.name == "kumoauth-spool"}

    before = writers()
    writer = SpoolWriter(Appender(), Reactor())  # type: ignore[arg-type]
    writer.start()
    writer.start()
    assert len(writers() - before) == 1
    got: list[str] = []
    msg = message()
    writer.store(msg).addCallback(got.append)
    stopped: list[None] = []
    writer.stop().addCallback(stopped.append)
    deadline = time.monotonic() + 10
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [msg.id] and written == [[msg.id]]
    assert stopped and not writers() - before


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policy")
def test_the_spool_writer_thread_does_not_preempt_the_reactor(tmp_path):
    """
    The writer thread runs SCHED_BATCH (no wakeup preemption of the
    reactor thread that holds the GIL); the thread that started it keeps
    its policy.
    """
    import time

    from kumoauth.storage.spool import SpoolWriter

    policies: list[int] = []

    class Appender:
        def append_batch(self, messages):
            policies.append(os.sched_getscheduler(0))  # the writer thread's own
            return [m.id for m in messages]

    class Reactor:
        def callFromThread(self, f, *args):
            f(*args)

    writer = SpoolWriter(Appender(), Reactor())  # type: ignore[arg-type]
    writer.start()
    got: list[str] = []
    writer.store(message()).addCallback(got.append)
    stopped: list[None] = []
    writer.stop().addCallback(stopped.append)
    deadline = time.monotonic() + 10
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got and policies == [os.SCHED_BATCH]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
