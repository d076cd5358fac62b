"""
Upgrading from kumoauth 0.1: the messages its spool holds move into the
queue (and are relayed), the modules it had are found under their old
names, and the version says which release runs.

0.1's spool, as its ``kumoauth/spool.py`` wrote it: ``<id>.eml`` (the
message with its ``Received:`` header) and ``<id>.json`` (``id``,
``received_at``, ``mail_from``, ``rcpt_to``, ``meta``), each written under
``tmp/`` as ``*.tmp`` and renamed into place, the ``.json`` last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kumoauth
from kumoauth.relay.queue import QueueReader, QueueStore
from tests.server import TWISTD, Certs, running_server, write_config
from tests.test_e2e import starttls_client
from tests.test_relay_e2e import relaying, wait_queue_empty, wait_until
from tests.upstream import running_upstream

OLD = "2026-11-28T14:05:13Z"


def v1_pair(spool: Path, mid: str, rcpts: list[str], body: bytes, authn: str = "scott") -> bytes:
    """Write one message as 0.1 left it; its bytes."""
    data = (
        b"Received: from client.example (localhost [127.0.0.1])\r\n"
        b"\tby localhost (kumoauth) with ESMTPSA id " + mid.encode() + b";\r\n"
        b"\tSat, 28 Nov 2026 14:05:13 +0000\r\n" + body
    )
    envelope = {
        "id": mid,
        "received_at": OLD,
        "mail_from": "scott@example.com",
        "rcpt_to": rcpts,
        "meta": {
            "authn_id": authn,
            "authz_id": authn,
            "received_from": "127.0.0.1:50000",
            "tls": "TLSv1.3",
        },
    }
    spool.mkdir(parents=True, exist_ok=True)
    (spool / f"{mid}.eml").write_bytes(data)
    (spool / f"{mid}.json").write_text(json.dumps(envelope, ensure_ascii=False))
    return data


def v1_leftovers(spool: Path) -> None:
    """What a crash of 0.1 left: files under tmp/ and an .eml without .json."""
    (spool / "tmp").mkdir(exist_ok=True)
    (spool / "tmp" / "18ecec3e16b02aa8c9a43aaa.eml.tmp").write_bytes(b"half")
    (spool / "tmp" / "18ecec3e16b02aa8c9a43aaa.json.tmp").write_bytes(b"{")
    (spool / "18ecec3e16b02aa8c9a43bbb.eml").write_bytes(b"never acknowledged")


IDS = ["18ecec3b873661d1fd3f2023", "18ecec3b873661d1fd3f2024", "18ecec3b873661d1fd3f2025"]


def test_the_owner_moves_01_messages_into_the_queue(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    datas = {
        mid: v1_pair(spool, mid, [f"r{i}@example.net"], b"body\r\n") for i, mid in enumerate(IDS)
    }
    v1_leftovers(spool)
    (spool / "18ecec3b873661d1fd3f2099.json").write_text("{not json")
    (spool / "18ecec3b873661d1fd3f2099.eml").write_bytes(b"x")
    store = QueueStore.open(spool)
    try:
        notes = store.take_notes()
        assert sorted(store.ids()) == IDS
        for i, mid in enumerate(IDS):
            assert store.read_message(mid) == datas[mid]
            envelope = store.read_envelope(mid)
            assert envelope["received_at"] == OLD  # max_age counts from 0.1's acceptance
            assert envelope["rcpt_to"] == [f"r{i}@example.net"]
            assert envelope["meta"]["authn_id"] == "scott"
    finally:
        store.close()
    assert (
        "info",
        f"{spool}: moved 3 message(s) kumoauth 0.1 had accepted into the queue"
        " (its <id>.eml/<id>.json spool format); removed 3 file(s) of messages 0.1 never"
        " acknowledged",
    ) in notes
    (warning,) = [text for level, text in notes if level == "warn"]
    assert "1 of kumoauth 0.1's file(s) stay where they are" in warning
    assert "18ecec3b873661d1fd3f2099 (not JSON" in warning
    left = sorted(p.name for p in spool.iterdir())
    assert [n for n in left if n.endswith((".eml", ".json"))] == [
        "18ecec3b873661d1fd3f2099.eml",
        "18ecec3b873661d1fd3f2099.json",
    ]
    assert "tmp" not in left
    # A reader sees the same queue; a second start moves nothing twice.
    assert sorted(QueueReader(spool).ids()) == IDS
    store = QueueStore.open(spool)
    try:
        assert len(store) == 3
        assert not [t for _, t in store.take_notes() if "moved" in t]
    finally:
        store.close()


def test_what_cannot_move_is_named_and_stops_nothing_else(tmp_path: Path) -> None:
    # A pair the queue refuses (a lone surrogate) stopped the import of the
    # rest for good; a pair that cannot be removed made the queue unopenable;
    # a .json without its .eml was not mentioned.
    spool = tmp_path / "spool"
    v1_pair(spool, IDS[0], ["a@example.net"], b"one\r\n")
    (spool / f"{IDS[1]}.eml").write_bytes(b"two\r\n")
    (spool / f"{IDS[1]}.json").write_text(
        json.dumps({"mail_from": "\udcff@x", "rcpt_to": ["b@example.net"], "received_at": OLD})
    )
    v1_pair(spool, IDS[2], ["c@example.net"], b"three\r\n")
    (spool / "18ecec3b873661d1fd3f2030.json").write_text("{}")
    store = QueueStore.open(spool)
    try:
        assert sorted(store.ids()) == [IDS[0], IDS[2]]
        (warning,) = [text for level, text in store.take_notes() if level == "warn"]
    finally:
        store.close()
    assert f"{IDS[1]} (not storable" in warning
    assert "18ecec3b873661d1fd3f2030 (no .eml)" in warning
    assert "stopped" not in warning


def test_a_pair_left_by_a_crash_after_its_import_is_only_removed(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    data = v1_pair(spool, IDS[0], ["b@example.net"], b"once\r\n")
    QueueStore.open(spool).close()
    # The queue synced it, then the process died before the pair went.
    v1_pair(spool, IDS[0], ["b@example.net"], b"once\r\n")
    store = QueueStore.open(spool)
    try:
        assert store.ids() == [IDS[0]]
        assert store.read_message(IDS[0]) == data
    finally:
        store.close()
    assert not list(spool.glob("*.json"))


def test_01_messages_are_relayed_after_the_upgrade(tmp_path: Path, certs: Certs) -> None:
    spool = tmp_path / "srv" / "spool"
    for i, mid in enumerate(IDS[:2]):
        v1_pair(spool, mid, [f"r{i}@example.net"], f"Subject: v1 {i}\r\n\r\nold\r\n".encode())
    # Before the first start, the admin command says where they are.
    listed = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "spool", "--spool", str(spool), "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "2 message(s) in kumoauth 0.1's format" in listed.stderr
    with running_upstream() as up, relaying(tmp_path, certs, up) as srv:
        wait_until(lambda: len(up.messages) == 2, what="0.1's messages upstream")
        wait_queue_empty(srv)
        assert sorted(m.rcpt_tos[0] for m in up.messages) == ["r0@example.net", "r1@example.net"]
        for m in up.messages:
            assert (m.authc, m.authzid) == ("kumoauth", "scott")
            assert b"with ESMTPSA id 18ecec3b873661d1fd3f202" in m.data
        assert "moved 2 message(s) kumoauth 0.1 had accepted into the queue" in srv.log()
    assert not list(spool.glob("*.eml"))


@pytest.mark.parametrize(
    "old,new",
    [
        ("kumoauth.cred", "kumoauth.auth.cred"),
        ("kumoauth.delivery", "kumoauth.storage.delivery"),
        ("kumoauth.spool", "kumoauth.storage.spool"),
        ("kumoauth.throttle", "kumoauth.auth.throttle"),
        ("kumoauth.sasl", "kumoauth.auth.sasl"),
    ],
)
def test_01_module_names_still_import(old: str, new: str) -> None:
    # A custom checker written for 0.1 (`from kumoauth.cred import
    # IPlainCredentials`) keeps working, with a warning naming the new home.
    code = (
        "import importlib, warnings\n"
        "warnings.simplefilter('error')\n"
        f"try:\n    importlib.import_module({old!r})\n"
        "except FutureWarning as w:\n    print(w)\n"
        "warnings.simplefilter('ignore')\n"
        f"m = importlib.import_module({old!r})\n"
        f"assert m is importlib.import_module({new!r})\n"
        # its own spec, not the alias's: reload() works on it
        f"assert m.__spec__.name == {new!r}\n"
        "importlib.reload(m)\n"
        f"assert m.__name__ == {new!r}\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == f"{old} is now {new} (moved in kumoauth 0.2); the old name goes in 0.3"


def test_a_01_checker_runs_and_its_old_import_is_one_log_line(tmp_path: Path, certs: Certs) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "oldchecker.py").write_text(
        "from kumoauth.cred import IPlainCredentials  # 0.1's name\n"
        "from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse\n"
        "def factory():\n"
        "    return InMemoryUsernamePasswordDatabaseDontUse(scott=b'tiger')\n"
    )
    with running_server(
        tmp_path / "srv",
        certs,
        None,
        auth='checker = "oldchecker:factory"',
        env={"PYTHONPATH": f"{code}:{os.environ.get('PYTHONPATH', '')}"},
    ) as srv:
        with starttls_client(srv) as s:
            assert s.login("scott", "tiger")[0] == 235
        log = srv.log()
    (line,) = [x for x in log.splitlines() if "FutureWarning" in x]
    assert "#warn] " in line
    assert line.endswith(
        "oldchecker.py:1: FutureWarning: kumoauth.cred is now kumoauth.auth.cred"
        " (moved in kumoauth 0.2); the old name goes in 0.3"
    )
    assert f"kumoauth {kumoauth.__version__} starting with {srv.config}" in log
    assert "Traceback" not in log


def test_a_01_checker_that_cannot_start_shows_the_warning_before_the_error(
    tmp_path: Path, certs: Certs
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "gone.py").write_text("from kumoauth.cred import load_checker_factory\n")
    config = write_config(tmp_path, certs, (0, 0, 0), None, auth='checker = "gone:factory"')
    done = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "kumoauth", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(code)},
    )
    assert done.returncode == 1
    warning, error = done.stderr.strip().splitlines()
    assert warning.startswith("kumoauth: warning: ") and warning.endswith(
        "gone.py:1: FutureWarning: kumoauth.cred is now kumoauth.auth.cred (moved in kumoauth"
        " 0.2); the old name goes in 0.3"
    )
    assert error.startswith("kumoauth: error: ") and "load_checker_factory" in error


def test_kumoauth_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kumoauth.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == f"kumoauth {kumoauth.__version__}"
    assert kumoauth.__version__.startswith("0.2.")
