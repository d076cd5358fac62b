"""
Configuration: parsing and validation, and every operator error of SPEC §2
through the real twistd as a subprocess (one line, non-zero exit, no
traceback).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kumoauth.config import ConfigError, parse
from tests.server import TWISTD, make_certs, run_twistd

#: a second listener, its endpoint to be filled in
LISTENER2 = """
[[listener]]
endpoint = {}
tls = "none"
auth_required = false

"""

MINIMAL = """
[[listener]]
endpoint = "tcp:2525"
tls = "none"
auth_required = false

[spool]
path = "spool"
"""


def test_defaults_and_relative_paths(tmp_path):
    cfg = parse(
        MINIMAL
        + """
[tls]
certificate = "tls/cert.pem"
private_key = "/abs/key.pem"
""",
        tmp_path / "kumoauth.toml",
    )
    assert cfg.server.max_connections == 1000
    assert cfg.server.max_connections_per_ip == 50
    assert cfg.server.idle_timeout == 300
    assert cfg.server.max_message_size == 26214400
    assert cfg.server.max_recipients == 100
    assert cfg.server.max_errors == 10
    assert cfg.server.banner == "kumoauth"
    assert cfg.server.hostname
    assert cfg.auth.mechanisms == ("PLAIN", "LOGIN")
    assert cfg.auth.checker == "policy"
    assert (cfg.auth.timeout, cfg.auth.failure_delay, cfg.auth.max_failures) == (10.0, 1.0, 3)
    assert cfg.spool.path == tmp_path / "spool"
    assert cfg.tls is not None
    assert cfg.tls.certificate == tmp_path / "tls/cert.pem"
    assert cfg.tls.private_key == Path("/abs/key.pem")
    assert cfg.tls.min_version == "TLSv1.2"
    listener = cfg.listeners[0]
    assert (listener.tls, listener.auth_required, listener.allow_plaintext_auth) == (
        "none",
        False,
        False,
    )


def test_proxy_networks_parse():
    import ipaddress

    text = MINIMAL.replace('"tcp:2525"', '"haproxy:tcp:2525"').replace(
        "auth_required = false", 'auth_required = false\nproxy_networks = ["10.1.2.3/8", "::1"]'
    )
    (listener,) = parse(text, "/etc/kumoauth.toml").listeners
    assert listener.proxy_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_sample_config_parses():
    cfg = parse(Path("etc/kumoauth.toml").read_text(), Path("etc/kumoauth.toml").resolve())
    assert [listener.tls for listener in cfg.listeners] == ["starttls", "implicit"]
    assert cfg.tls is not None and cfg.tls.self_signed


@pytest.mark.parametrize(
    "text,where,problem",
    [
        ("[server]\nmax_conections = 5\n" + MINIMAL, "[server] max_conections", "unknown key"),
        (
            '[server]\nmax_connections = "5"\n' + MINIMAL,
            "[server] max_connections",
            "expected an integer",
        ),
        (
            "[server]\nmax_connections = true\n" + MINIMAL,
            "[server] max_connections",
            "expected an integer",
        ),
        ("[server]\nidle_timeout = 0\n" + MINIMAL, "[server] idle_timeout", "at least"),
        ("[bogus]\n" + MINIMAL, "[bogus]", "unknown section"),
        ("[spool]\npath = 'x'\n", "[[listener]]", "at least one listener"),
        (
            MINIMAL.replace('tls = "none"', 'tls = "maybe"'),
            "[[listener]] #1 tls",
            "expected one of",
        ),
        (MINIMAL.replace('tls = "none"', 'tls = "starttls"'), "[tls]", "missing"),
        (
            MINIMAL.replace("auth_required = false", "auth_required = true"),
            "[[listener]] #1 auth_required",
            "AUTH needs TLS",
        ),
        (
            MINIMAL + "[auth]\nmechanisms = ['CRAM-MD5']\n",
            "[auth] mechanisms",
            "unsupported mechanism",
        ),
        (MINIMAL.replace('[spool]\npath = "spool"\n', ""), "[spool] path", "required"),
        # nan passes every comparison; inf is no duration either
        ("[server]\nidle_timeout = nan\n" + MINIMAL, "[server] idle_timeout", "finite"),
        ("[server]\nshutdown_grace = inf\n" + MINIMAL, "[server] shutdown_grace", "finite"),
        ("[server]\nworkers = 100000\n" + MINIMAL, "[server] workers", "at most 256"),
        # sent in the greeting, the EHLO reply and Received:
        ('[server]\nbanner = "x\\r\\n250 injected"\n' + MINIMAL, "[server] banner", "one line"),
        ('[server]\nhostname = "a\\r\\nb"\n' + MINIMAL, "[server] hostname", "domain name"),
        ('[server]\nhostname = "mail example"\n' + MINIMAL, "[server] hostname", "domain name"),
        # stored as JSON with every message: a date cannot be
        (
            MINIMAL.replace(
                "auth_required = false", "auth_required = false\nmeta = { d = 1979-05-27 }"
            ),
            "[[listener]] #1 meta",
            "no TOML dates",
        ),
        # more than conn_meta takes (kumoauth.meta.MAX_DEPTH)
        (
            MINIMAL.replace(
                "auth_required = false",
                "auth_required = false\nmeta = { d = " + "[" * 33 + "1" + "]" * 33 + " }",
            ),
            "[[listener]] #1 meta",
            "more than 32 deep",
        ),
        # the identity is AUTH's: it goes upstream as the authzid
        (
            MINIMAL.replace(
                "auth_required = false", 'auth_required = false\nmeta = { authn_id = "ceo" }'
            ),
            "[[listener]] #1 meta",
            "'authn_id' is set by AUTH only",
        ),
        # who may send a PROXY header: only for a haproxy: endpoint
        (
            MINIMAL.replace(
                "auth_required = false", 'auth_required = false\nproxy_networks = ["10.0.0.0/8"]'
            ),
            "[[listener]] #1 proxy_networks",
            "only for a haproxy: endpoint",
        ),
        (
            MINIMAL.replace('"tcp:2525"', '"haproxy:tcp:2525"').replace(
                "auth_required = false", 'auth_required = false\nproxy_networks = ["10.0.0.0/33"]'
            ),
            "[[listener]] #1 proxy_networks",
            "10.0.0.0/33",
        ),
        # ssl: would want its own certificate files (and failed on server.pem)
        (
            MINIMAL.replace('"tcp:2525"', '"ssl:2525"'),
            "[[listener]] #1 endpoint",
            'ssl: is not supported: use tcp: with tls = "implicit"',
        ),
        # two listeners on one socket: the second failed as "address in use"
        (
            MINIMAL.replace(
                "[spool]", LISTENER2.format('"tcp:2525:interface=127.0.0.1"') + "[spool]"
            ),
            "[[listener]] #2 endpoint",
            "the same socket as [[listener]] #1",
        ),
    ],
)
def test_config_errors(text, where, problem):
    with pytest.raises(ConfigError) as e:
        parse(text, "/etc/kumoauth.toml")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("/etc/kumoauth.toml: ")
    assert where in message
    assert problem in message


def test_toml_syntax_error_names_the_line():
    with pytest.raises(ConfigError) as e:
        parse(MINIMAL + "\n[server\n", "k.toml")
    assert "line 10" in str(e.value)


# --- through the real twistd --------------------------------------------------


def listener_config(certs, port=None, extra="", policy=None, auth_required=False):
    port = port or 2525
    policy_part = f'[policy]\npath = "{policy}"\n' if policy else ""
    return f"""
[tls]
certificate = "{certs.chain}"
private_key = "{certs.key}"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "starttls"
auth_required = {str(auth_required).lower()}

{policy_part}
[spool]
path = "spool"
{extra}
"""


def assert_operator_error(tmp_path, config_text, *expected, config_name="kumoauth.toml"):
    config = tmp_path / config_name
    if config_text is not None:
        config.write_text(config_text)
    result = run_twistd(["kumoauth", "--config", str(config)], cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("kumoauth: error: ")
    assert str(config) in line
    for text in expected:
        assert text in line
    return line


@pytest.mark.e2e
def test_twistd_lists_the_plugin(tmp_path):
    result = run_twistd(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    assert "kumoauth" in result.stdout


@pytest.mark.e2e
def test_missing_config_file(tmp_path):
    assert_operator_error(tmp_path, None, "not found")


@pytest.mark.e2e
def test_toml_syntax_error(tmp_path, certs):
    assert_operator_error(tmp_path, "[server]\nhostname = \n", "TOML syntax error", "line 2")


@pytest.mark.e2e
def test_unknown_key(tmp_path, certs):
    assert_operator_error(
        tmp_path, listener_config(certs, extra="bogus = 1"), "[spool] bogus", "unknown key"
    )


@pytest.mark.e2e
def test_wrong_type(tmp_path, certs):
    text = "[server]\nmax_recipients = 'ten'\n" + listener_config(certs)
    assert_operator_error(tmp_path, text, "[server] max_recipients", "expected an integer")


@pytest.mark.e2e
def test_missing_certificate(tmp_path, certs):
    text = listener_config(certs).replace(str(certs.chain), str(tmp_path / "nope.pem"))
    assert_operator_error(tmp_path, text, "[tls] certificate", "nope.pem", "not found")


@pytest.mark.e2e
def test_certificate_that_is_not_pem(tmp_path, certs):
    bad = tmp_path / "bad.pem"
    bad.write_text("this is not a certificate\n")
    text = listener_config(certs).replace(str(certs.chain), str(bad))
    assert_operator_error(tmp_path, text, "[tls] certificate", "not a PEM")


@pytest.mark.e2e
def test_unreadable_key(tmp_path, certs):
    text = listener_config(certs).replace(str(certs.key), str(tmp_path))
    assert_operator_error(tmp_path, text, "[tls] private_key")


@pytest.mark.e2e
def test_key_that_does_not_match(tmp_path, certs):
    other = make_certs(tmp_path / "other")
    text = listener_config(certs).replace(str(certs.key), str(other.key))
    assert_operator_error(tmp_path, text, "[tls] private_key", "does not match")


@pytest.mark.e2e
def test_endpoint_that_does_not_parse(tmp_path, certs):
    text = listener_config(certs).replace("tcp:2525:interface=127.0.0.1", "tcpx:whatever")
    assert_operator_error(
        tmp_path, text, "[[listener]] #1 endpoint", "tcpx:whatever", "cannot parse"
    )


# --- start-up mistakes that were one line, but misleading --------------------


def test_a_spool_path_that_is_a_file_is_not_a_directory(tmp_path):
    # It said: cannot open the queue: [Errno 17] File exists: '…/policy.py'
    (tmp_path / "policy.py").write_text("")
    for path, why in (
        ("policy.py", "not a directory (the queue is a directory)"),
        ("policy.py/spool", "not a directory (a part of the path is a file)"),
    ):
        text = MINIMAL.replace('path = "spool"', f'path = "{path}"')
        with pytest.raises(ConfigError) as e:
            parse(text, tmp_path / "kumoauth.toml")
        assert str(e.value) == (
            f"{tmp_path / 'kumoauth.toml'}: [spool] path: {tmp_path / path}: {why}"
        )
    # not there yet (the queue makes it), or a directory: fine; and a
    # worker's parse (read_files=False) does not look
    parse(MINIMAL, tmp_path / "kumoauth.toml")
    (tmp_path / "spool").mkdir()
    parse(MINIMAL, tmp_path / "kumoauth.toml")
    parse(MINIMAL.replace('"spool"', '"policy.py"'), tmp_path / "k.toml", read_files=False)


@pytest.mark.parametrize(
    "tables,checker",
    [
        ("[auth.throtle]\nwindow = 60\n", ""),
        ("[auth.throtle]\nwindow = 60\n", 'checker = "passwd-file"\n'),
        ("[auth.cach]\nttl = 60\n", ""),
        ("[auth.passwd_file]\npath = 'users'\n", 'checker = "passwd-file"\n'),
    ],
)
def test_a_mistyped_auth_table_is_an_unknown_table(tables, checker):
    # It said "[auth] checker: [auth.throtle]: no such table (no checker
    # named 'throtle')", with no checker set.
    text = MINIMAL + "[auth]\n" + checker + tables
    with pytest.raises(ConfigError) as e:
        parse(text, "/etc/kumoauth.toml")
    name = tables.split("]")[0] + "]"
    meant = {"[auth.throtle]": "throttle", "[auth.cach]": "cache"}.get(name, "passwd-file")
    assert str(e.value).startswith(
        f"/etc/kumoauth.toml: {name}: unknown table: did you mean [auth.{meant}]? (known: "
        "[auth.throttle], [auth.cache], [auth.oauth], [auth.passwd-file], "
    )
    assert "\n" not in str(e.value)
    if not checker:
        assert "checker" not in str(e.value)


def test_the_tables_a_checker_reads_are_not_unknown():
    # the store's own table, a factory's table, the table [sender_binding] reads
    cfg = parse(
        MINIMAL + '[auth]\nchecker = "passwd-file"\n[auth.passwd-file]\npath = "users"\n',
        "/etc/kumoauth.toml",
    )
    assert set(cfg.auth.tables) == {"passwd-file"}
    cfg = parse(
        MINIMAL + '[auth]\nchecker = "tests.checkers:throttler"\n[auth.throttler]\nx = 1\n',
        "/etc/kumoauth.toml",
    )
    assert set(cfg.auth.tables) == {"throttler"}


@pytest.mark.parametrize(
    "endpoint,problem",
    [
        ("tcp:notaport", 'the port "notaport" is not a number'),
        ("tcp:notaport:interface=127.0.0.1", 'the port "notaport" is not a number'),
        ("haproxy:tcp:port=x25", 'the port "x25" is not a number'),
        ("tcp6:25a", 'the port "25a" is not a number'),
        ("tcp:", "no port (tcp:587, say)"),
        ("tcp:70000", "the port 70000 is out of range (0 to 65535)"),
    ],
)
def test_a_listener_port_that_is_not_a_number(endpoint, problem):
    # It said: cannot parse: invalid literal for int() with base 10: 'notaport'
    with pytest.raises(ConfigError) as e:
        parse(MINIMAL.replace('"tcp:2525"', f'"{endpoint}"'), "/etc/kumoauth.toml")
    assert str(e.value) == (
        f'/etc/kumoauth.toml: [[listener]] #1 endpoint: "{endpoint}": {problem}'
    )


def test_a_metrics_port_that_is_not_a_number():
    # It said: cannot parse: invalid literal for int() with base 10: 'notaport'
    with pytest.raises(ConfigError) as e:
        parse(MINIMAL + '\n[metrics]\nendpoint = "tcp:notaport"\n', "/etc/kumoauth.toml")
    assert str(e.value) == (
        '/etc/kumoauth.toml: [metrics] endpoint: "tcp:notaport": '
        'the port "notaport" is not a number'
    )
    config = parse(MINIMAL + '\n[metrics]\nendpoint = "tcp:9100"\n', "/etc/kumoauth.toml")
    assert config.metrics.endpoint == "tcp:9100"


def test_unknown_section_lists_listener_as_it_is_written():
    with pytest.raises(ConfigError) as e:
        parse("[bogus]\n" + MINIMAL, "/etc/kumoauth.toml")
    assert "[[listener]]" in str(e.value) and ", [listener]," not in str(e.value)
    assert str(e.value).startswith(
        "/etc/kumoauth.toml: [bogus]: unknown section (known: [server], [tls], [[listener]], "
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    "change,expected",
    [
        (
            ('path = "spool"', 'path = "policy.py"'),
            ["[spool] path: ", "policy.py: not a directory"],
        ),
        (
            ("[spool]", "[auth.throtle]\nwindow = 60\n[spool]"),
            ["[auth.throtle]: unknown table: did you mean [auth.throttle]?"],
        ),
        (
            ("tcp:2525:interface=127.0.0.1", "tcp:notaport"),
            ['[[listener]] #1 endpoint: "tcp:notaport": the port "notaport" is not a number'],
        ),
        (("[spool]", "[bogus]\n[spool]"), ["[bogus]: unknown section", ", [[listener]], "]),
    ],
    ids=["spool-path-a-file", "auth-table-typo", "port-not-a-number", "unknown-section"],
)
def test_start_up_mistakes_say_what_is_wrong(tmp_path, certs, change, expected):
    (tmp_path / "policy.py").write_text("")
    text = listener_config(certs).replace(*change)
    line = assert_operator_error(tmp_path, text, *expected)
    assert "Errno" not in line and "int()" not in line
    assert "checker" not in line and "cannot open the queue" not in line


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 something else listens on."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def start_on_a_busy_port(
    tmp_path: Path, certs: Any, twistd_args: list[str], **run: Any
) -> tuple[int, Path, subprocess.CompletedProcess[str]]:
    """twistd (*twistd_args*) on a configuration whose port is taken."""
    with busy_port() as port:
        config = tmp_path / "kumoauth.toml"
        config.write_text(listener_config(certs, port=port))
        command = [*TWISTD, *twistd_args, "kumoauth", "--config", str(config)]
        result = subprocess.run(command, cwd=tmp_path, text=True, timeout=60, **run)
    return port, config, result


@pytest.mark.e2e
def test_endpoint_that_cannot_bind(tmp_path, certs):
    with busy_port() as port:
        assert_operator_error(
            tmp_path, listener_config(certs, port=port), f"tcp:{port}", "cannot listen"
        )


@pytest.mark.e2e
def test_a_unix_listener_in_a_missing_directory(tmp_path, certs):
    text = listener_config(certs).replace(
        '"tcp:2525:interface=127.0.0.1"', f'"unix:{tmp_path}/nowhere/smtp.sock"'
    )
    assert "unix:" in text
    assert_operator_error(tmp_path, text, f"no such directory: {tmp_path}/nowhere")


@pytest.mark.e2e
def test_a_start_up_error_is_one_line_where_log_and_stderr_are_one(tmp_path, certs):
    # twistd -n under systemd (or in a terminal): the log and stderr are the
    # same file, and the operator reads the error once.
    port, _, result = start_on_a_busy_port(
        tmp_path, certs, ["-n", "--pidfile="], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert result.returncode == 1
    mentions = [line for line in result.stdout.splitlines() if f"tcp:{port}" in line]
    assert len(mentions) == 1, result.stdout
    assert mentions[0].startswith("kumoauth: error: ") and "cannot listen" in mentions[0]


def test_a_byte_order_mark_is_no_syntax_error(tmp_path):
    cfg = parse("\ufeff" + MINIMAL, tmp_path / "kumoauth.toml")
    assert cfg.listeners[0].endpoint == "tcp:2525"


@pytest.mark.e2e
def test_a_self_signed_certificate_that_cannot_be_created(tmp_path, certs):
    # a place no one can create it (root included): under a regular file
    (tmp_path / "not-a-dir").write_text("")
    text = listener_config(certs).replace(
        f'certificate = "{certs.chain}"\nprivate_key = "{certs.key}"',
        'certificate = "not-a-dir/cert.pem"\nprivate_key = "not-a-dir/key.pem"\nself_signed = true',
    )
    assert "self_signed" in text
    assert_operator_error(
        tmp_path, text, "[tls] self_signed: cannot create the certificate", "not-a-dir"
    )


@pytest.mark.e2e
def test_a_daemonized_start_up_error_exits_1_and_says_why(tmp_path, certs):
    # twistd without -n: its parent waits for the daemon's word on a pipe,
    # which a start-up error never wrote (the command hung for good).
    daemon = [f"--pidfile={tmp_path / 'twistd.pid'}", f"--logfile={tmp_path / 'twistd.log'}"]
    port, config, result = start_on_a_busy_port(tmp_path, certs, daemon, capture_output=True)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert lines[0].startswith("kumoauth: error: ") and str(config) in lines[0], lines
    assert f"tcp:{port}" in lines[0] and "cannot listen" in lines[0], lines
    twistd_says = "An error has occurred: b'kumoauth did not start (see the line above)'"
    assert lines[1] == twistd_says, lines
    assert not (tmp_path / "twistd.pid").exists()  # no pid left for a later kill $(cat …)
    assert "Traceback" not in result.stderr + (tmp_path / "twistd.log").read_text()


@pytest.mark.e2e
def test_a_daemonized_server_names_its_own_pid_in_the_queue_lock(tmp_path, certs):
    # The lock file named the pid twistd had before it forked (gone), so
    # "in use by another kumoauth (pid N)" named no running process.
    from tests.server import free_port, wait_gone

    config = tmp_path / "kumoauth.toml"
    config.write_text(listener_config(certs, port=free_port()))
    pidfile = tmp_path / "twistd.pid"
    daemon = [f"--pidfile={pidfile}", f"--logfile={tmp_path / 'twistd.log'}"]
    command = [*TWISTD, *daemon, "kumoauth", "--config", str(config)]
    assert subprocess.run(command, cwd=tmp_path, timeout=60).returncode == 0
    pid = int(pidfile.read_text())
    try:
        lock = tmp_path / "spool" / "lock"
        deadline = time.monotonic() + 10
        while lock.read_text().strip() != str(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.read_text().strip() == str(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 20):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
def test_policy_that_fails_to_import(tmp_path, certs):
    (tmp_path / "policy.py").write_text("from kumoauth import kumo\n\nimport no_such_module_here\n")
    line = assert_operator_error(
        tmp_path,
        listener_config(certs, policy="policy.py"),
        "[policy] path",
        "policy.py:3:",
        "ModuleNotFoundError",
    )
    assert "no_such_module_here" in line


@pytest.mark.e2e
def test_policy_with_syntax_error(tmp_path, certs):
    (tmp_path / "policy.py").write_text("def broken(:\n")
    assert_operator_error(
        tmp_path, listener_config(certs, policy="policy.py"), "policy.py:1:", "syntax error"
    )


@pytest.mark.e2e
def test_policy_registering_twice(tmp_path, certs):
    (tmp_path / "policy.py").write_text(
        "from kumoauth import kumo\n"
        "kumo.on('smtp_server_ehlo', lambda d, m: None)\n"
        "kumo.on('smtp_server_ehlo', lambda d, m: None)\n"
    )
    assert_operator_error(
        tmp_path, listener_config(certs, policy="policy.py"), "policy.py:3:", "second handler"
    )


@pytest.mark.e2e
def test_auth_required_without_checker(tmp_path, certs):
    (tmp_path / "policy.py").write_text("from kumoauth import kumo\n")
    assert_operator_error(
        tmp_path,
        listener_config(certs, policy="policy.py", auth_required=True),
        "smtp_server_auth_plain",
    )


@pytest.mark.e2e
def test_checker_factory_that_does_not_import(tmp_path, certs):
    text = listener_config(certs) + "\n[auth]\nchecker = 'nowhere.to.be:found'\n"
    assert_operator_error(tmp_path, text, "[auth] checker", "cannot import nowhere.to.be")


@pytest.mark.e2e
def test_spool_that_cannot_be_created(tmp_path, certs):
    (tmp_path / "file").write_text("x")
    text = listener_config(certs).replace('path = "spool"', 'path = "file/spool"')
    assert_operator_error(tmp_path, text, "[spool] path")


@pytest.mark.e2e
def test_json_log_that_cannot_be_opened(tmp_path, certs):
    # Found at start-up, once: not a traceback (or, with workers, a worker
    # dying and restarted for ever).
    (tmp_path / "dir.jsonl").mkdir()
    for workers in (1, 2):
        text = listener_config(certs, extra='[log]\njson_path = "dir.jsonl"\n').replace(
            "[tls]", f"[server]\nworkers = {workers}\n\n[tls]"
        )
        assert_operator_error(tmp_path, text, "[log] json_path", "dir.jsonl")


RELAY = '[relay]\nhost = "127.0.0.1"\nport = 2526\ntls = "none"\nidentity = "none"\n'


@pytest.mark.e2e
@pytest.mark.parametrize(
    "extra,files,expected",
    [
        (
            'username = "k"\npassword_file = "secret"\n',
            {"secret": b"pa\xffss\n"},
            ("[relay] password_file", "not UTF-8"),
        ),
        (
            'username = "k"\npassword_file = "secret"\n',
            {"secret": b"LEAKME1\nLEAKME2\n"},  # was sent as it is: every AUTH failed
            ("[relay] password_file", "more than one line"),
        ),
        ('ca_file = "ca.pem"\n', {"ca.pem": b"not a certificate\n"}, ("[relay] ca_file", "no PEM")),
    ],
    ids=["password-not-utf8", "password-of-two-lines", "ca-file-without-certificates"],
)
def test_relay_files_are_read_at_start(tmp_path, certs, extra, files, expected):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    relay = RELAY
    if "ca_file" in extra:  # a CA only with TLS
        relay = RELAY.replace('tls = "none"\n', 'tls = "starttls"\n')
    line = assert_operator_error(tmp_path, listener_config(certs, extra=relay + extra), *expected)
    for data in files.values():
        assert data.decode("latin-1").strip() not in line  # the file named, never its content


def test_relay_host_must_be_a_host():
    with pytest.raises(ConfigError) as e:
        parse(MINIMAL + RELAY.replace('"127.0.0.1"', '"bad host\\r\\n"'), "/k.toml")
    assert "[relay] host" in str(e.value) and "\n" not in str(e.value)
    for good in ("127.0.0.1", "::1", "localhost", "smarthost.example.net"):
        text = MINIMAL + RELAY.replace('"127.0.0.1"', f'"{good}"') + "allow_plaintext = true\n"
        assert parse(text, "/k.toml").relay


# --- [auth.throttle] fingerprint_key_file -----------------------------------------------


def test_fingerprint_key_file_is_read_with_the_configuration(tmp_path):
    key = bytes(range(256))[:48]
    (tmp_path / "fp.key").write_bytes(key)
    cfg = parse(
        MINIMAL + '[auth.throttle]\nfingerprint_key_file = "fp.key"\n', tmp_path / "kumoauth.toml"
    )
    throttle = cfg.auth.throttle
    assert throttle.fingerprint_key_file == tmp_path / "fp.key"
    assert throttle.fingerprint_key == key  # the bytes as they are
    assert repr(key) not in repr(cfg) and key.hex() not in repr(cfg)
    assert parse(MINIMAL, tmp_path / "kumoauth.toml").auth.throttle.fingerprint_key is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "No such file or directory"),
        (b"short-key\n", "10 bytes; the key must be at least 32"),
        (b"", "0 bytes; the key must be at least 32"),
        (b"k" * 5000, "more than 4096 bytes"),
        ("dir", "not a regular file"),
    ],
    ids=["missing", "short", "empty", "huge", "directory"],
)
def test_fingerprint_key_file_errors(tmp_path, content, problem):
    path = tmp_path / "fp.key"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    text = MINIMAL + '[auth.throttle]\nfingerprint_key_file = "fp.key"\n'
    with pytest.raises(ConfigError) as e:
        parse(text, tmp_path / "kumoauth.toml")
    message = str(e.value)
    assert "\n" not in message
    assert f"[auth.throttle] fingerprint_key_file: {path}: {problem}" in message
    if isinstance(content, bytes) and content:
        assert content.decode()[:8] not in message  # never what the file holds


def test_fingerprint_key_file_that_is_a_fifo_does_not_hang(tmp_path):
    import os

    os.mkfifo(tmp_path / "fp.key")
    with pytest.raises(ConfigError, match="not a regular file"):
        parse(
            MINIMAL + '[auth.throttle]\nfingerprint_key_file = "fp.key"\n',
            tmp_path / "kumoauth.toml",
        )


@pytest.mark.e2e
def test_short_fingerprint_key_file_is_one_line_at_start(tmp_path, certs):
    (tmp_path / "fp.key").write_bytes(b"Secret-Key-Shown?\n")
    extra = '[auth.throttle]\nfingerprint_key_file = "fp.key"\n'
    line = assert_operator_error(
        tmp_path,
        listener_config(certs, extra=extra),
        "[auth.throttle] fingerprint_key_file",
        "the key must be at least 32",
    )
    assert "Secret-Key-Shown" not in line


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.2"),
        ("tcp:2525:interface=127.0.0.1", "tcp6:2525:interface=\\\\:\\\\:1"),
        # tcp: on an IPv6 address binds an IPv6 socket (Twisted): no clash
        # with IPv4's every address
        ("tcp:2525", "tcp:2525:interface=\\\\:\\\\:1"),
        ("tcp:2525:interface=127.0.0.1", "tcp:2526:interface=127.0.0.1"),
        ("tcp:0", "tcp:0"),  # each its own free port
        ("tcp:2525", "unix:/run/kumoauth.sock"),
        ("unix:/run/a.sock", "unix:address=/run/b.sock"),
    ],
)
def test_listeners_on_different_sockets(tmp_path, first, second):
    text = MINIMAL.replace('"tcp:2525"', f'"{first}"')
    second = f'"{second}"'
    cfg = parse(text.replace("[spool]", LISTENER2.format(second) + "[spool]"), tmp_path / "k.toml")
    assert len(cfg.listeners) == 2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tcp:2525:interface=0.0.0.0", "tcp:port=2525:interface=127.0.0.1"),
        ("tcp6:2525", "tcp:2525:interface=\\\\:\\\\:1"),
        ("unix:/run/a.sock", "haproxy:unix:address=/run/a.sock"),
    ],
)
def test_listeners_on_one_socket(tmp_path, first, second):
    text = MINIMAL.replace('"tcp:2525"', f'"{first}"')
    text = text.replace("[spool]", LISTENER2.format(f'"{second}"') + "[spool]")
    with pytest.raises(ConfigError) as e:
        parse(text, tmp_path / "k.toml")
    assert "[[listener]] #2 endpoint: the same socket as [[listener]] #1" in str(e.value)
