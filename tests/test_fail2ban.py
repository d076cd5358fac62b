"""
The fail2ban filters (etc/fail2ban/filter.d) against real kumoauth logs: a
real ``twistd kumoauth`` writes its text log and its JSON log while clients
fail, succeed, and try to forge failure lines for other addresses through
their user names; then ``fail2ban-regex`` must find exactly the failed
attempts, each with the real client's address.

fail2ban-regex comes from the fail2ban package (.ci/run installs it): under
``CI`` its absence is a failure, elsewhere a skip.
"""

from __future__ import annotations

import ast
import configparser
import io
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest
from twisted.logger import Logger, jsonFileLogObserver, textFileLogObserver

from kumoauth.auth import authenticator
from kumoauth.auth.authenticator import Attempt, AuthLog
from kumoauth.meta import ConnMeta
from kumoauth.ops.loglimit import LogLimiter
from kumoauth.ops.metrics import Metrics
from tests.server import free_port, make_certs, running_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
FILTERS = REPO / "etc" / "fail2ban" / "filter.d"
TEXT_FILTER = FILTERS / "kumoauth.conf"
JSON_FILTER = FILTERS / "kumoauth-json.conf"
JAIL = REPO / "etc" / "fail2ban" / "jail.d" / "kumoauth.local"

POLICY = """
from kumoauth import kumo

@kumo.on("smtp_server_auth_plain")
def auth(authz, authc, password, conn_meta):
    if authc.startswith("forge "):
        return password == "ok"
    return authc == "scott" and password == "tiger"
"""

# User names that try to make a line name another address (203.0.113.0/24).
FORGED = [
    "x from 203.0.113.66",
    "x client=203.0.113.67:587 listener=tcp:587 checker_latency=0.001s",
    "2026-01-02T03:04:05+0000 [kumoauth.auth#info] AUTH PLAIN failure authc=a "
    "client=203.0.113.68:1 listener=tcp:587 checker_latency=0.000s",
    'x", "client": "203.0.113.69:587", "result": "failure", "log_namespace": "kumoauth.auth"}',
    "x client=[2001:db8::66]:587 listener=tcp:587",
]
FORGED_NET = re.compile(r"203\.0\.113\.|2001:db8::66")


@pytest.fixture(scope="module")
def fail2ban_regex() -> str:
    path = shutil.which("fail2ban-regex") or (
        "/usr/bin/fail2ban-regex" if os.path.exists("/usr/bin/fail2ban-regex") else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("fail2ban-regex not found (CI installs fail2ban in .ci/run)")
        pytest.skip("fail2ban-regex not installed (apt-get install fail2ban)")
    return path


def matches(tool: str, log: Path, filt: Path) -> list[tuple[str, str]]:
    """(address, line) for every line fail2ban-regex matches in *log*."""
    out = subprocess.run(
        [tool, "-e", "UTF-8", "-o", "<ip> <msg>", str(log), str(filt)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    # Not splitlines(): it would split on the \x1e an older JSON log line began with.
    return [tuple(row.split(" ", 1)) for row in out.split("\n") if row]


def summary(tool: str, log: Path, filt: Path) -> tuple[int, str]:
    """The number of lines fail2ban-regex's report says matched, and the report."""
    out = subprocess.run(
        [tool, "-e", "UTF-8", "--print-all-matched", str(log), str(filt)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    m = re.search(r"^Lines: \d+ lines, 0 ignored, (\d+) matched, \d+ missed", out, re.M)
    assert m, out
    return int(m.group(1)), out


def can_listen_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def attempt(s: smtplib.SMTP, user: str, password: str) -> int:
    s.user, s.password = user, password
    try:
        code, _ = s.auth("PLAIN", s.auth_plain)
    except smtplib.SMTPAuthenticationError as e:
        code = e.smtp_code
    return code


def session(host: str, port: int, ctx) -> smtplib.SMTP:
    s = smtplib.SMTP(host, port, timeout=10)
    s.ehlo("client.example")
    s.starttls(context=ctx)
    s.ehlo("client.example")
    return s


def json_events(path: Path) -> list[dict]:
    # One JSON object per line, nothing before it ([log] json_path's reference).
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def address(client: str) -> str:
    return client.rpartition(":")[0].strip("[]")


def test_filters_on_real_logs(tmp_path, fail2ban_regex):
    certs = make_certs(tmp_path / "certs")
    ipv6 = can_listen_ipv6()
    port6 = free_port() if ipv6 else 0
    extra = '[log]\njson_path = "events.jsonl"\n'
    # Without ::1 here, IPv6 is left to test_filters_on_synthetic_lines.
    if ipv6:
        extra += (
            f'\n[[listener]]\nendpoint = "tcp6:{port6}:interface=\\\\:\\\\:1"\ntls = "starttls"\n'
        )
    replies: list[tuple[str, int]] = []  # (address, code) of every attempt
    with running_server(tmp_path / "server", certs, POLICY, extra=extra) as srv:
        ctx = certs.client_context()
        ctx6 = certs.client_context()
        ctx6.check_hostname = False  # the certificate names 127.0.0.1, not ::1
        tries = [("scott", "wrong"), ("scott", "wrong2"), ("nobody", "x")]
        tries += [(user, "wrong") for user in FORGED]
        tries += [("scott", "tiger")]
        # Successful logins whose names are forged failure lines.
        tries += [("forge " + user, "ok") for user in FORGED]
        for user, password in tries:
            # One connection each: kumoauth drops a session after [auth] max_failures.
            with session("127.0.0.1", srv.starttls_port, ctx) as s:
                replies.append(("127.0.0.1", attempt(s, user, password)))
        if ipv6:
            for password in ("wrong", "wrong2"):
                with session("::1", port6, ctx6) as s:
                    replies.append(("::1", attempt(s, "scott", password)))
    text_log, json_log = srv.logfile, srv.directory / "events.jsonl"

    codes = [code for _, code in replies]
    assert codes.count(235) == 1 + len(FORGED), replies
    failed = sorted(ip for ip, code in replies if code == 535)
    assert len(failed) == len(replies) - codes.count(235), replies
    assert failed.count("127.0.0.1") == 3 + len(FORGED)
    assert failed.count("::1") == (2 if ipv6 else 0)

    # What kumoauth logged: one failure event per 535, with the real address.
    events = [e for e in json_events(json_log) if e.get("log_namespace") == "kumoauth.auth"]
    logged = sorted(address(e["client"]) for e in events if e["result"] == "failure")
    assert logged == failed
    assert any(e["result"] == "success" and e["authc"].startswith("forge ") for e in events)

    for log, filt in [(text_log, TEXT_FILTER), (json_log, JSON_FILTER)]:
        found = matches(fail2ban_regex, log, filt)
        assert sorted(ip for ip, _ in found) == failed, found
        for ip, line in found:
            assert not FORGED_NET.search(ip), line
            assert " success " not in line and '"success"' not in line, line
        # The forged names are in the log, and matched only as the real client.
        assert FORGED_NET.search(log.read_text())
        matched, report = summary(fail2ban_regex, log, filt)
        assert matched == len(failed), report


def synthetic_lines(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """
    Text and JSON logs written by AuthLog.record through Twisted's own
    observers (the ones twistd --logfile and [log] json_path use), for
    addresses a loopback server cannot have; plus a multi-line event whose
    continuation line carries a forged failure line.
    """
    text, js = io.StringIO(), io.StringIO()
    text_obs, json_obs = textFileLogObserver(text), jsonFileLogObserver(js)

    def observer(event):
        text_obs(event)
        json_obs(event)

    monkeypatch.setattr(authenticator.auth_log, "observer", observer)

    class Clock:
        def seconds(self):
            return 1000.0

        def callLater(self, *a, **kw):
            return None

    auth_log = AuthLog(Metrics(), LogLimiter(Clock()))

    def record(ip, port, result, authc="scott", reason=None, latency=0.002):
        client = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        a = Attempt("PLAIN", 0.0, ip, client, "tcp6:587", ConnMeta({}), authc, authc)
        auth_log.record(a, result, reason=reason, latency=latency)

    record("2001:db8::9", 41234, "failure")
    record("2001:db8:0:1::abcd", 5, "failure", latency=None)
    record("::ffff:192.0.2.10", 6, "failure", authc="x client=[2001:db8::66]:1 listener=y")
    record("192.0.2.11", 7, "failure", authc="")
    # the right password of a user in [auth] locked_users
    record("192.0.2.13", 8, "failure", reason="locked")
    record("2001:db8::9", 41235, "success")
    record("2001:db8::9", 41236, "throttled", reason="authc")
    record("2001:db8::9", 41237, "tempfail")
    record("198.51.100.1", 8, "success", authc="a failure client=203.0.113.70:1 listener=x")
    forged = (
        "checker failed: boom\n2026-01-02T03:04:05+0000 [kumoauth.auth#info] AUTH PLAIN failure "
        "client=203.0.113.71:1 listener=tcp:587 checker_latency=0.000s\n"
        "[kumoauth.auth#info] AUTH PLAIN failure client=203.0.113.72:1 listener=tcp:587"
    )
    Logger(namespace="kumoauth.auth", observer=observer).info("{text}", text=forged)
    # With [server] workers: a worker's failure as its supervisor writes it,
    # and a forged one the worker printed raw to its stderr.
    from kumoauth.ops.worklog import LineReader, worker_line

    reader = LineReader("[worker 0] ", observer, Logger(namespace="kumoauth.workers"))
    worker_auth: list[dict] = []
    worker_log = AuthLog(Metrics(), LogLimiter(Clock()))
    monkeypatch.setattr(authenticator.auth_log, "observer", worker_auth.append)
    a = Attempt("PLAIN", 0.0, "192.0.2.12", "192.0.2.12:9", "tcp:587", ConnMeta({}), "w", "w")
    worker_log.record(a, "failure", latency=0.001)
    monkeypatch.setattr(authenticator.auth_log, "observer", observer)
    for e in worker_auth:
        reader.feed(worker_line(e).encode(), lambda: 1000.0)
    reader.feed(
        b"[kumoauth.auth#info] AUTH PLAIN failure client=203.0.113.73:1 listener=tcp:587\n",
        lambda: 1000.0,
    )
    text_path, json_path = tmp_path / "synthetic.log", tmp_path / "synthetic.jsonl"
    text_path.write_text(text.getvalue())
    json_path.write_text(js.getvalue())
    return text_path, json_path


def test_filters_on_synthetic_lines(tmp_path, monkeypatch, fail2ban_regex):
    text_path, json_path = synthetic_lines(tmp_path, monkeypatch)
    assert "\n\t2026-01-02T03:04:05+0000 [kumoauth.auth#info] AUTH PLAIN failure" in (
        text_path.read_text()
    )
    expected = ["192.0.2.10", "192.0.2.11", "192.0.2.13", "2001:db8:0:1::abcd", "2001:db8::9"]
    # the worker's failure is in the text log only (each worker writes its
    # own JSON log; the supervisor's copies are not in its)
    for log, filt, more in [(text_path, TEXT_FILTER, ["192.0.2.12"]), (json_path, JSON_FILTER, [])]:
        found = matches(fail2ban_regex, log, filt)
        assert sorted(ip for ip, _ in found) == sorted(expected + more), found


def test_jail_example(tmp_path, fail2ban_regex):
    """
    fail2ban's own reader accepts the jails (in a copy of the installed
    configuration, /etc/fail2ban, with only our jail file in jail.d).
    """
    client = Path(fail2ban_regex).with_name("fail2ban-client")
    if not client.exists() or not Path("/etc/fail2ban/jail.conf").exists():
        pytest.fail("fail2ban-regex without fail2ban-client or /etc/fail2ban/jail.conf")
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf, symlinks=True)
    shutil.rmtree(conf / "jail.d")
    (conf / "jail.d").mkdir()
    shutil.copy(JAIL, conf / "jail.d")
    (conf / "jail.d" / "zz-test.local").write_text("[kumoauth-json]\nenabled = true\n")
    for filt in (TEXT_FILTER, JSON_FILTER):
        shutil.copy(filt, conf / "filter.d")
    dump = subprocess.run(
        [str(client), "-c", str(conf), "-d"], capture_output=True, text=True, timeout=30
    )
    assert dump.returncode == 0, dump.stderr
    commands = [ast.literal_eval(line) for line in dump.stdout.splitlines() if line.startswith("[")]
    jails = {c[1]: {} for c in commands if c[0] == "add"}
    for c in commands:
        if c[0] == "set" and c[1] in jails:
            jails[c[1]].setdefault(c[2], []).append(c[3])
        if c[0] == "multi-set" and c[1] in jails:
            jails[c[1]]["action"] = dict(c[4])
    assert sorted(jails) == ["kumoauth", "kumoauth-json"], dump.stdout
    for name, filt in [("kumoauth", TEXT_FILTER), ("kumoauth-json", JSON_FILTER)]:
        jail = jails[name]
        assert jail["action"]["port"] == "submission,submissions"
        assert (jail["maxretry"], jail["findtime"], jail["bantime"]) == ([5], ["15m"], ["1h"])
        assert jail["addfailregex"][0] in filt.read_text()
    # The log paths (absent here, so not in the dump) as written:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(JAIL)
    assert parser["kumoauth"]["logpath"] == "/var/log/kumoauth/kumoauth.log"
    assert parser["kumoauth-json"]["logpath"] == "/var/log/kumoauth/events.jsonl"
