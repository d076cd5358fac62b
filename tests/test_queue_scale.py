"""
A restart with 100,000 queued messages serves again in ≤ 10 s and holds
no message bodies in memory (a real twistd on a queue written beforehand).
"""

from __future__ import annotations

import time

import pytest

from kumoauth.relay.queue import QueueStore
from kumoauth.storage.delivery import Message
from kumoauth.storage.spool import Spool, new_id
from tests.server import make_certs, running_server
from tests.test_e2e import POLICY, starttls_client

pytestmark = pytest.mark.e2e

N = 100_000
BODY = b"Subject: queued\r\n\r\n" + b"x" * 2000 + b"\r\n"


def test_restart_with_100k_queued_messages(tmp_path):
    spool = tmp_path / "srv" / "spool"
    store = QueueStore.open(spool)
    for _ in range(N // 1000):
        batch = [
            Message(new_id(), "a@example.com", ["b@example.net"], BODY, {"authn_id": "scott"})
            for _ in range(1000)
        ]
        assert all(isinstance(r, str) for r in store.append_batch(batch))
    store.close()
    started = time.monotonic()
    with running_server(tmp_path / "srv", make_certs(tmp_path / "certs"), POLICY) as srv:
        with starttls_client(srv) as s:
            assert s.login("scott", "tiger")[0] == 235
        took = time.monotonic() - started
        rss_mib = srv.rss_kib() / 1024
    print(f"serving again with {N} queued messages after {took:.2f} s, RSS {rss_mib:.0f} MiB")
    assert took <= 10
    # The bodies alone are 200 MB: none of them is in memory.
    assert rss_mib < 150
    assert sum(1 for _ in Spool(spool).ids()) == N
