"""
``kumoauth spool``: list (each state, ``--json``), show, and the actions
(flush, retry, hold, release, delete, bounce) with and without a process
owning the queue, run as the real command.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kumoauth.relay import service
from kumoauth.relay.queue import QueueReader, QueueStore
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import new_id
from tests.server import make_certs, running_server

DATA = b"Subject: hello\r\n\r\nhi\r\n"
ERROR = '451 4.3.0 "busy"\r\nInjected: line\x1b[31m'


def cli_command(
    spool: Path | None, *args: str, alias: bool = False, config: Path | None = None
) -> list[str]:
    """``kumoauth spool`` with *args*, on *spool* or on the queue of *config*."""
    command = ["-m", "kumoauth.cli.spool"] if alias else ["-m", "kumoauth.cli", "spool"]
    where = ["--config", str(config)] if config is not None else ["--spool", str(spool)]
    return [sys.executable, *command, *where, *args]


def run_cli(spool: Path | None, *args: str, alias: bool = False, config: Path | None = None):
    return subprocess.run(
        cli_command(spool, *args, alias=alias, config=config),
        capture_output=True,
        text=True,
        timeout=60,
    )


def message(authn: str | None = "scott", rcpts: tuple[str, ...] = ("b@example.net",)) -> Message:
    meta = {"authn_id": authn} if authn else {}
    return Message(new_id(), "a@example.com", list(rcpts), DATA, meta)


@pytest.fixture
def queue(tmp_path: Path) -> tuple[Path, list[str]]:
    """
    A queue with one message of each state, oldest first: queued, deferred
    (one recipient done), held.
    """
    path = tmp_path / "spool"
    msgs = [
        message(),
        message(rcpts=("b@example.net", "c@example.net")),
        message(authn=None),
    ]
    with QueueStore.open(path) as store:
        assert store.append_batch(msgs) == [m.id for m in msgs]
        store.deferred(msgs[1].id, 3, time.time() + 3600, ERROR, {"b@example.net": "done"})
        store.hold(msgs[2].id)
    return path, [m.id for m in msgs]


def state(path: Path, mid: str):
    """The entry of *mid* as the owner sees it (None if it left the queue)."""
    with QueueStore.open(path) as store:
        return store.get(mid) if mid in store else None


# --------------------------------------------------------------------------
# reading


def test_list_shows_each_state(queue):
    path, (queued, deferred, held) = queue
    result = run_cli(path, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [queued, deferred, held]

    assert lines[0].split()[2] == "queued"
    assert "authn=scott" in lines[0] and "from=<a@example.com>" in lines[0]
    assert "to=b@example.net(pending)" in lines[0] and lines[0].endswith(f"{len(DATA)} bytes")

    assert "  deferred next=" in lines[1] and " attempts=3 " in lines[1]
    # One line, the error escaped (quotes too): no CR, LF or ESC reaches the terminal.
    assert 'error="451 4.3.0 \\"busy\\"\\x0d\\x0aInjected: line\\x1b[31m"' in lines[1]
    assert "to=b@example.net(done),c@example.net(pending)" in lines[1]
    next_at = lines[1].split("next=")[1].split()[0]
    assert next_at.endswith("Z") and time.strptime(next_at, "%Y-%m-%dT%H:%M:%SZ")

    assert lines[2].split()[2] == "held" and "authn=-" in lines[2]
    assert len(lines) == 3 and "\x1b" not in result.stdout


def test_list_json(queue):
    path, (queued, deferred, held) = queue
    result = run_cli(path, "list", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == [queued, deferred, held]
    assert [r["state"] for r in records] == ["queued", "deferred", "held"]
    assert records[0]["authn_id"] == "scott" and records[2]["authn_id"] is None
    assert records[1]["attempts"] == 3 and records[1]["last_error"] == ERROR
    assert records[1]["next_attempt"].endswith("Z")
    assert records[1]["recipients"] == {"b@example.net": "done", "c@example.net": "pending"}
    assert records[0]["mail_from"] == "a@example.com" and records[0]["size"] == len(DATA)


def test_show_and_show_meta_with_state(queue):
    path, (_, deferred, held) = queue
    shown = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "spool", "--spool", str(path), "show", deferred],
        capture_output=True,
        timeout=60,
    )
    assert shown.returncode == 0 and shown.stdout == DATA
    meta = json.loads(run_cli(path, "show", deferred, "--meta").stdout)
    assert meta["id"] == deferred and meta["meta"]["authn_id"] == "scott"
    assert meta["state"]["state"] == "deferred" and meta["state"]["attempts"] == 3
    assert meta["state"]["recipients"]["b@example.net"] == "done"
    assert json.loads(run_cli(path, "show", "--meta", held).stdout)["state"]["held"] is True


def test_a_sender_cannot_write_fields_into_the_list_line(tmp_path):
    forged = (
        '"x>  authn=admin  from=<ceo@example.com>  to=ok@example.net(done)  12 bytes"@example.com'
    )
    path = tmp_path / "spool"
    with QueueStore.open(path) as store:
        (mid,) = store.append_batch([Message(new_id(), forged, ['"a b"@example.net'], DATA, {})])
    (line,) = run_cli(path, "list").stdout.splitlines()
    # Quoted as one field, its quotes escaped, like the log's names.
    assert 'from="<\\"x>  authn=admin  from=<ceo@example.com>' in line
    assert 'to="\\"a b\\"@example.net(pending)"' in line
    assert line.count("  authn=") == 2 and line.split("  authn=")[1].startswith("-  from=")


def test_show_escapes_controls_on_a_terminal_and_meta_is_ascii(tmp_path):
    import pty

    path = tmp_path / "spool"
    body = b"Subject: \x1b[31mred\x07\r\n\r\nbody\x1b[2J\r\n" + (
        "From: <\u202eoec\u202c@example.com>\u2028x\r\n".encode() + b"c1 \x9b2J not UTF-8\r\n"
    )
    with QueueStore.open(path) as store:
        (mid,) = store.append_batch(
            [Message(new_id(), "a@example.com", ["b@example.net"], body, {})]
        )
        store.deferred(mid, 1, time.time() + 60, "550 \u202eevil")
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            cli_command(path, "show", mid), stdout=terminal, stderr=subprocess.PIPE, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        os.close(terminal)
        terminal = -1
        seen = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(controller, 4096):
                seen += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert b"\x1b" not in seen and b"\x07" not in seen
    assert b"\\x1b[31mred\\x07" in seen and b"body\\x1b[2J" in seen
    # as less shows them: what reorders or breaks the text is named, not obeyed
    assert "\u202e".encode() not in seen and "\u2028".encode() not in seen
    assert b"From: <<U+202E>oec<U+202C>@example.com><U+2028>x" in seen
    assert b"\x9b" not in seen and b"c1 \\x9b2J not UTF-8" in seen  # a raw C1 byte (CSI)
    # Piped, the message's own bytes (for re-injection, say).
    piped = subprocess.run(cli_command(path, "show", mid), capture_output=True, timeout=60)
    assert piped.stdout == body
    meta = run_cli(path, "show", mid, "--meta").stdout
    assert "\u202e" not in meta and "\\u202e" in meta
    assert json.loads(meta)["state"]["last_error"] == "550 \u202eevil"


def test_empty_queue_lists_nothing(tmp_path):
    QueueStore.open(tmp_path).close()
    result = run_cli(tmp_path, "list")
    assert result.returncode == 0 and result.stdout == ""


# --------------------------------------------------------------------------
# actions with no server running: applied by the command itself


def test_hold_release_delete_applied_directly(queue):
    path, (queued, deferred, held) = queue
    result = run_cli(path, "hold", queued)
    assert result.returncode == 0 and result.stdout == f"{queued} is held\n", result.stderr
    assert state(path, queued).held

    result = run_cli(path, "release", held)
    assert result.returncode == 0 and result.stdout == f"{held} is released\n"
    assert not state(path, held).held

    result = run_cli(path, "delete", deferred)
    assert result.returncode == 0 and result.stdout == f"{deferred} is deleted\n"
    assert state(path, deferred) is None
    assert [line.split()[0] for line in run_cli(path, "list").stdout.splitlines()] == [
        queued,
        held,
    ]
    # Nothing was left for a server: the command did it all.
    assert not list((path / service.CONTROL_DIR).glob("*.json"))


def test_retry_and_flush_applied_directly(queue):
    path, (_, deferred, _) = queue
    before = time.time()
    result = run_cli(path, "retry", deferred)
    assert result.returncode == 0 and result.stdout == f"{deferred} is due now\n"
    entry = state(path, deferred)
    assert entry.next_attempt <= time.time() and entry.attempts == 3
    assert entry.last_error == ERROR and entry.next_attempt >= before - 1

    with QueueStore.open(path) as store:
        store.deferred(deferred, 4, time.time() + 3600, "later")
    result = run_cli(path, "flush")
    assert result.returncode == 0 and "1 deferred messages are due now" in result.stdout
    assert state(path, deferred).next_attempt <= time.time()


def test_bounce_needs_the_running_service(queue):
    path, (queued, *_) = queue
    result = run_cli(path, "bounce", queued)
    assert result.returncode == 1
    assert "bounce needs the running service" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert state(path, queued) is not None


def test_unknown_id(queue):
    path, _ = queue
    for action in ("hold", "release", "retry", "delete", "show"):
        result = run_cli(path, action, "0" * 24)
        assert result.returncode == 1, action
        assert result.stderr.count("\n") == 1 and "0" * 24 in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", "ABCDEF0123456789ABCDEF0G", "0" * 23, "g" * 24]
)
def test_bad_id_refused_before_touching_anything(tmp_path, bad):
    missing = tmp_path / "nowhere"
    for action in ("hold", "delete", "bounce", "show"):
        result = run_cli(missing, action, bad)
        assert result.returncode == 1, (action, result.stderr)
        assert "not a message id" in result.stderr and result.stderr.count("\n") == 1
    assert not missing.exists()


def test_no_such_spool(tmp_path):
    result = run_cli(tmp_path / "nowhere", "hold", "0" * 24)
    assert result.returncode == 1 and "no such spool directory" in result.stderr
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "file").write_text("")
    result = run_cli(tmp_path / "file", "list")
    assert result.returncode == 1 and result.stderr.endswith("/file: not a directory\n")
    # a directory that is no queue (a mistyped --spool) is not made one
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for args in (("flush",), ("list",), ("hold", "0" * 24)):
        result = run_cli(other, *args)
        assert result.returncode == 1 and "not a kumoauth queue" in result.stderr, result
    assert sorted(os.listdir(other)) == ["notes.txt"]


def test_alias_runs_actions(queue):
    path, (queued, *_) = queue
    result = run_cli(path, "hold", queued, alias=True)
    assert result.returncode == 0 and state(path, queued).held


# --------------------------------------------------------------------------
# actions while another process owns the queue: a request it applies

HOLDER = r"""
import json, os, sys, time
from pathlib import Path
from kumoauth.relay import service
from kumoauth.relay.queue import QueueStore

path, mode = Path(sys.argv[1]), sys.argv[2]
store = QueueStore.open(path)


class Relay:
    # What bounce asks of the relay: here, only that the message leaves.
    def bounce_now(self, entry, status, text):
        store.done(entry.id, "bounced")


print("ready", flush=True)
control = path / service.CONTROL_DIR
while True:
    time.sleep(0.1)
    if mode != "apply" or not control.is_dir():
        continue
    # What the server's housekeeping does: take each request, apply it and
    # answer it.  This owner, like a server from before answers, leaves
    # flush, delete and bounce unanswered: the command then watches the
    # queue for the change.
    answers = []
    for name in sorted(n for n in os.listdir(control) if n.endswith(".json")):
        request = json.loads((control / name).read_text())
        (control / name).unlink()
        try:
            text = service.apply(store, request["op"], request["id"], Relay())
        except (KeyError, ValueError) as e:
            text = f"{request['op']} not done: {e}"
        print(text, flush=True)
        if request["answer"] and request["op"] in ("hold", "release", "retry"):
            answers.append((control / name, text))
    store.flush()
    for request_path, text in answers:
        service._answer(request_path, text)  # as the server answers
"""


def owner(path: Path, mode: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.stderr
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def applying_owner(queue):
    yield from owner(queue[0], "apply")


@pytest.fixture
def idle_owner(queue):
    yield from owner(queue[0], "idle")


def test_actions_reach_a_running_owner(queue, applying_owner):
    path, (queued, deferred, held) = queue
    pid = applying_owner.pid

    result = run_cli(path, "hold", queued)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{queued} is held (taken by the running server (pid {pid}))\n"
    assert QueueReader(path).get(queued).held

    result = run_cli(path, "release", held)
    assert result.returncode == 0 and result.stdout.startswith(f"{held} is released (taken")
    assert not QueueReader(path).get(held).held

    result = run_cli(path, "retry", deferred)
    assert result.returncode == 0 and result.stdout.startswith(f"{deferred} is due now (taken")
    assert QueueReader(path).get(deferred).next_attempt <= time.time()

    # Unanswered: the command sees the change in the queue, once the
    # answer it waits for at most --wait seconds has not come.
    result = run_cli(path, "flush", "--wait", "1")
    assert (
        result.returncode == 0
        and result.stdout == f"flush: taken by the running server (pid {pid})\n"
    )

    result = run_cli(path, "delete", deferred, "--wait", "1")
    assert result.returncode == 0 and result.stdout.startswith(f"{deferred} has left the queue")
    result = run_cli(path, "bounce", held, "--wait", "1")
    assert result.returncode == 0 and result.stdout.startswith(f"{held} has left the queue")
    assert [e.id for e in QueueReader(path).entries()] == [queued]
    assert not list((path / service.CONTROL_DIR).iterdir())


def test_request_not_taken_in_time(queue, idle_owner):
    path, (queued, *_) = queue
    control = path / service.CONTROL_DIR

    result = run_cli(path, "hold", queued, "--wait", "0.3")
    assert result.returncode == 3
    assert "has not taken the request within 0.3s" in result.stderr
    (left,) = control.glob("*.json")
    assert str(left) in result.stderr
    assert json.loads(left.read_text()) == {"op": "hold", "id": queued, "answer": True}
    left.unlink()

    result = run_cli(path, "delete", queued, "--no-wait")
    assert result.returncode == 0 and "queued for the running server" in result.stdout
    (left,) = control.glob("*.json")
    assert json.loads(left.read_text()) == {"op": "delete", "id": queued, "answer": False}
    left.unlink()

    # An unknown id is refused here too, and leaves no request.
    result = run_cli(path, "hold", "f" * 24)
    assert result.returncode == 1 and "no message" in result.stderr
    assert not list(control.glob("*.json"))
    assert not QueueReader(path).get(queued).held


def test_real_server_applies_requests(tmp_path):
    directory = tmp_path / "srv"
    directory.mkdir()
    msgs = [message(), message()]
    with QueueStore.open(directory / "spool") as store:
        store.append_batch(msgs)
    certs = make_certs(tmp_path / "certs")
    with running_server(directory, certs, None, args=["--auth", "memory:carol:s3cret"]) as srv:
        config = srv.config
        result = run_cli(None, "hold", msgs[0].id, config=config)
        assert result.returncode == 0, (result.stderr, srv.log())
        assert f"{msgs[0].id} is held (taken by the running server (pid" in result.stdout
        result = run_cli(None, "delete", msgs[1].id, config=config)
        assert result.returncode == 0, result
        assert f"{msgs[1].id} is deleted (taken by the running server (pid" in result.stdout

        listing = run_cli(None, "list", config=config)
        (line,) = listing.stdout.splitlines()
        assert line.split()[0] == msgs[0].id and line.split()[2] == "held"

        # No [relay] in this configuration: bounce is refused, nothing left.
        result = run_cli(None, "bounce", msgs[0].id, config=config)
        assert result.returncode == 1 and "bounce needs [relay]" in result.stderr
        assert not list((srv.spool / service.CONTROL_DIR).glob("*.json"))
        assert "operator request: " in srv.log()


@pytest.mark.parametrize("wait", ["nan", "-1", "inf", "1e9", "soon"])
def test_wait_must_be_a_finite_number_of_seconds(queue, wait):
    # nan waited "nans", -1 acted as --no-wait, inf could wait for ever
    path, (queued, *_) = queue
    result = run_cli(path, "hold", queued, "--wait", wait)
    assert result.returncode == 2
    assert (
        f"argument --wait: {wait!r}: not a number of seconds more than 0, at most 86400"
        in result.stderr
    )
    assert not state(path, queued).held


@pytest.mark.parametrize("zero", ["0", "0.0", "-0"])
def test_wait_0_is_wrong_usage_no_wait_says_it(queue, idle_owner, zero):
    # --wait 0 said "queued for the running server" and exit 0, nothing
    # taken: exit 0 is "done" (or --no-wait, which says what it means).
    path, (queued, *_) = queue
    control = path / service.CONTROL_DIR
    result = run_cli(path, "release", queued, "--wait", zero)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert f"argument --wait: {zero!r}: not a wait; use --no-wait" in result.stderr
    assert not list(control.glob("*.json"))  # nothing left for the server either
    result = run_cli(path, "release", queued, "--no-wait")
    assert result.returncode == 0 and "queued for the running server" in result.stdout
    assert len(list(control.glob("*.json"))) == 1


def test_show_into_a_reader_that_stops_early(tmp_path):
    # `kumoauth spool show ID | head`: no "Broken pipe" error, exit 0.
    path = tmp_path / "spool"
    big = Message(new_id(), "a@example.com", ["b@example.net"], b"x" * 4_000_000 + b"\r\n", {})
    with QueueStore.open(path) as store:
        store.append_batch([big])
    with subprocess.Popen(
        cli_command(path, "show", big.id), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        proc.stdout.close()  # before the command writes: its write fails
        assert proc.wait(60) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""


# --------------------------------------------------------------------------
# many messages at once: a phished account's queued spam


def spam_queue(path: Path) -> tuple[list[str], list[str]]:
    """A queue of bob's messages (two senders) among scott's; their ids."""
    bob = [message("Bob@Acme.Example") for _ in range(5)]
    bob[3] = Message(new_id(), "", ["x@example.net"], DATA, {"authn_id": "bob@acme.example"})
    scott = [message("scott") for _ in range(3)]
    with QueueStore.open(path) as store:
        store.append_batch([*bob[:2], *scott[:2], *bob[2:], scott[2]])
    return [m.id for m in bob], [m.id for m in scott]


def test_hold_and_delete_by_user_and_by_sender_applied_directly(tmp_path):
    path = tmp_path / "spool"
    bob, scott = spam_queue(path)
    result = run_cli(path, "hold", "--authn", "BOB@acme.example")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hold of 5 message(s) with authn=BOB@acme.example: 5 held\n"
    assert {e.id for e in QueueReader(path).entries() if e.held} == set(bob)
    # The null sender is ''; a sender compares without case.
    result = run_cli(path, "delete", "--from", "")
    assert result.stdout == "delete of 1 message(s) with from=<>: 1 deleted\n", result.stderr
    result = run_cli(path, "release", "--from", "<A@Example.COM>")
    assert result.stdout == "release of 7 message(s) with from=<a@example.com>: 7 released\n"
    result = run_cli(path, "delete", "--authn", "bob@acme.example")
    assert result.stdout == "delete of 4 message(s) with authn=bob@acme.example: 4 deleted\n"
    assert [e.id for e in QueueReader(path).entries()] == scott
    result = run_cli(path, "hold", "--authn", "nobody")
    assert (result.returncode, result.stdout) == (0, "hold: no queued message with authn=nobody\n")
    # Bouncing spam would answer forged senders: not offered in bulk.
    result = run_cli(path, "bounce", "--authn", "scott")
    assert result.returncode == 2 and "unrecognized arguments: --authn" in result.stderr


def test_a_running_server_applies_a_bulk_request_with_one_line(tmp_path):
    directory = tmp_path / "srv"
    bob, scott = spam_queue(directory / "spool")
    certs = make_certs(tmp_path / "certs")
    with running_server(directory, certs, None, args=["--auth", "memory:carol:s3cret"]) as srv:
        result = run_cli(None, "delete", "--authn", "bob@acme.example", config=srv.config)
        assert result.returncode == 0, (result.stderr, srv.log())
        assert result.stdout.startswith(
            "delete of 5 message(s) with authn=bob@acme.example: 5 deleted (taken by the running"
        )
        assert [e.id for e in QueueReader(srv.spool).entries()] == scott
        lines = [x for x in srv.log().splitlines() if "operator request: " in x]
        assert len(lines) == 1 and "delete of 5 message(s) with authn=bob@acme.example" in lines[0]
        assert not list((srv.spool / service.CONTROL_DIR).iterdir())


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@needs_root
def test_a_spool_action_run_as_root_leaves_the_queue_to_its_owner(tmp_path):
    # sudo kumoauth spool …, no server running: the lock, journal and an
    # imported segment were root's, and the service (User=kumoauth) could
    # not open its queue again.
    path = tmp_path / "spool"
    (mid,) = spam_queue(path)[1][:1]
    v1 = "18ecec3b873661d1fd3f2023"
    (path / f"{v1}.eml").write_bytes(b"Subject: 0.1\r\n\r\nold\r\n")
    (path / f"{v1}.json").write_text(
        json.dumps(
            {
                "id": v1,
                "received_at": "2026-11-28T14:05:13Z",
                "mail_from": "a@x.example",
                "rcpt_to": ["b@y.example"],
                "meta": {},
            }
        )
    )
    for p in [path, *path.rglob("*")]:
        os.chown(p, 65534, 65534)
    result = run_cli(path, "hold", mid)
    assert result.returncode == 0, result.stderr
    assert "moved 1 message(s) kumoauth 0.1 had accepted" in result.stderr
    for p in [path, *path.rglob("*")]:
        assert (p.stat().st_uid, p.stat().st_gid) == (65534, 65534), p


@needs_root
def test_giving_the_queue_away_never_follows_a_symlink(tmp_path):
    from kumoauth.relay.queue import give_queue

    path = tmp_path / "spool"
    QueueStore.open(path).close()
    victim = tmp_path / "root-only"
    victim.write_text("secret")
    (path / "seg" / "planted.q").symlink_to(victim)
    (path / "journal-9.log").symlink_to(victim)
    give_queue(path, 65534, 65534)
    assert victim.stat().st_uid == 0
    assert (path / "seg" / "planted.q").lstat().st_uid == 65534


def test_a_utf8_address_is_escaped_for_a_locale_that_cannot_show_it(tmp_path):
    # PYTHONIOENCODING=ascii: spool list died with a UnicodeEncodeError
    path = tmp_path / "spool"
    with QueueStore.open(path) as store:
        store.append_batch(
            [Message(new_id(), "jürgen@bücher.example", ["b@example.net"], DATA, {})]
        )
    result = subprocess.run(
        cli_command(path, "list"),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "j\\xfcrgen@b\\xfccher.example" in result.stdout
    assert "Traceback" not in result.stderr


def test_several_ids_or_standard_input_in_one_request(queue):
    # postsuper -d - / several ids: one id per call was all there was
    path, (queued, deferred, held) = queue
    result = run_cli(path, "hold", queued, deferred.upper())  # a spreadsheet's capitals
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hold of 2 message(s) with the ids given: 2 held"
    assert state(path, queued).held and state(path, deferred).held
    piped = subprocess.run(
        cli_command(path, "release", "-"),
        input=f"{queued}\n{deferred} {held}\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip() == "release of 3 message(s) with the ids given: 3 released"
    assert not any(state(path, m).held for m in (queued, deferred, held))
    bad = run_cli(path, "delete", queued, "not-an-id")
    assert bad.returncode == 1 and "not-an-id: not a message id" in bad.stderr
    assert state(path, queued) is not None  # nothing done when one id is bad
    nothing = run_cli(path, "delete")
    assert nothing.returncode == 1 and "give a message id" in nothing.stderr


# --------------------------------------------------------------------------
# what an operator's walkthrough found


def test_an_empty_standard_input_is_nothing_to_do_once_the_spool_is_checked(queue, tmp_path):
    # `… list --json | jq … | kumoauth spool delete -` that chose nothing:
    # nothing to do (exit 0, on stdout), as --authn matching nothing is.
    path, (queued, *_) = queue
    for op in ("hold", "release", "retry", "delete"):
        result = subprocess.run(
            cli_command(path, op, "-"), input="\n  \n", capture_output=True, text=True, timeout=60
        )
        assert (result.returncode, result.stderr) == (0, ""), result
        assert result.stdout == f"{op}: no message id on standard input: nothing to do\n"
    assert not state(path, queued).held
    # ... but a wrong --spool is a mistake whatever standard input holds,
    # as it is for --authn (it was not looked at: exit 0)
    for where in ("nowhere", "home"):
        (tmp_path / "home").mkdir(exist_ok=True)
        result = subprocess.run(
            cli_command(tmp_path / where, "delete", "-"),
            input="",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1 and result.stdout == "", result
        assert result.stderr.count("\n") == 1, result
    # no id at all is still wrong usage of the command line
    result = run_cli(path, "hold")
    assert result.returncode == 1 and "give a message id" in result.stderr


def test_a_bad_id_says_hex_digits_as_capitals_are_taken(queue):
    path, (queued, *_) = queue
    result = run_cli(path, "hold", "zzz")
    assert result.returncode == 1
    assert result.stderr == "kumoauth: error: zzz: not a message id (24 hex digits)\n"
    result = run_cli(path, "hold", queued.upper())
    assert result.returncode == 0 and result.stdout == f"{queued} is held\n"


@pytest.mark.parametrize(
    "args,usage,wrong",
    [
        (
            ["spool", "--spool", "S", "bounce", "--authn", "scott"],
            "kumoauth spool bounce",
            "--authn",
        ),
        (["spool", "--spool", "S", "hold", "--bogus"], "kumoauth spool hold", "--bogus"),
        (["spool", "--spool", "S", "--bogus", "list"], "kumoauth spool", "--bogus"),
        (["auth", "test", "--config", "K", "--bogus", "u"], "kumoauth auth test", "--bogus"),
        (["throttle", "--config", "K", "list", "x"], "kumoauth throttle list", "x"),
        (["pw", "extra"], "kumoauth pw", "extra"),
    ],
)
def test_a_subcommand_mistake_shows_the_subcommands_usage(args, usage, wrong):
    # It showed "usage: kumoauth [-h] [--version] COMMAND ...", which says
    # nothing of what the subcommand takes.
    result = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"usage: {usage} ["), result.stderr
    assert result.stderr.endswith(f"{usage}: error: unrecognized arguments: {wrong}\n")
    assert "COMMAND ..." not in result.stderr


class StoringRelay:
    """What bounce asks of the relay: the bounce stored (or not), the message gone."""

    def __init__(self, store: QueueStore, stored: bool = True) -> None:
        self.store, self.stored = store, stored

    def bounce_now(self, entry, status, text):
        from twisted.internet import defer

        if self.stored:
            self.store.done(entry.id, "bounced")
        return defer.succeed(self.stored)


def test_the_bounce_answer_does_not_promise_a_bounce(queue):
    # "ID is bounced" and exit 0, when every recipient had NOTIFY=NEVER and
    # no bounce went out ("no bounce, as the sender asked" in the log).
    path, (queued, deferred, _) = queue
    with QueueStore.open(path) as store:
        said = []
        service.apply(store, "bounce", queued, StoringRelay(store)).addCallback(said.append)
        (text,) = said
        assert text.startswith(f"{queued} is bounced: failed and out of the queue; ")
        assert "whose NOTIFY leaves out FAILURE" in text and "null sender" in text
        assert "\n" not in text and queued not in store
        said = []
        service.apply(store, "bounce", deferred, StoringRelay(store, False)).addCallback(
            said.append
        )
        assert said == [
            f"bounce {deferred} not done: its bounce could not be stored; it stays queued"
        ]
    # The command puts who took it after what was done, before the rest.
    from kumoauth.cli.spool import _with_taken

    taken = "(taken by the running server (pid 7))"
    assert _with_taken(text, taken, queued) == text.replace(
        f"{queued} is bounced: ", f"{queued} is bounced {taken}: "
    )
    assert _with_taken(f"{queued} is held", taken, queued) == f"{queued} is held {taken}"
    bulk = "hold of 2 message(s) with authn=a: 2 held"
    assert _with_taken(bulk, taken, None) == f"{bulk} {taken}"


def test_operations_md_says_what_the_commands_do():
    text = (Path(__file__).resolve().parent.parent / "docs/operations.md").read_text()
    # DSN is RFC 3461's delivery status notification in these docs
    assert "credentials or database connection strings" in text and "DSNs" not in text
    assert "24 lowercase hex digits" not in text  # capitals are taken
    assert "from 0 to 86400" not in text and "`--wait 0`" in text
    assert "no message id on standard input: nothing to do" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| `bounce ID` |")]
    assert "NOTIFY" in row and "no bounce, as the sender asked" in row
