"""
``[relay]`` configuration: the pinned names, their checks, one line per
mistake.
"""

from __future__ import annotations

import pytest

from kumoauth.config import ConfigError, parse

BASE = """
[server]
hostname = "mx.example"
[[listener]]
endpoint = "tcp:1"
tls = "none"
auth_required = false
[spool]
path = "spool"
"""


def relay(text: str):
    return parse(BASE + "[relay]\n" + text, "/etc/kumoauth/kumoauth.toml").relay


def test_absent_means_spool_only():
    assert parse(BASE, "/x.toml").relay is None


def test_the_issue_example_parses():
    r = relay(
        """
host = "kumomta.internal"
port = 587
tls = "starttls"
ca_file = "upstream-ca.pem"
username = "kumoauth"
password_file = "relay.secret"
identity = "authz"
concurrency = 10
retry_schedule = [60, 300, 900, 3600, 14400]
max_age = 432000
"""
    )
    assert r.host == "kumomta.internal" and r.port == 587
    assert str(r.ca_file) == "/etc/kumoauth/upstream-ca.pem"
    assert str(r.password_file) == "/etc/kumoauth/relay.secret"
    assert r.retry_schedule == (60, 300, 900, 3600, 14400)


@pytest.mark.parametrize(
    "text,where,problem",
    [
        ("port = 587", "[relay] host", "required"),
        ('host = "a"\nport = 70000', "[relay] port", "port number"),
        ('host = "a"\nidentity = "none"\ntls = "none"', "[relay] tls", "in clear"),
        ('host = "a"\nusername = "k"\nidentity = "none"', "[relay] username", "together"),
        ('host = "a"', "[relay] identity", "authzid"),
        ('host = "a"\nidentity = "header"', "[relay] header_key_file", "required"),
        (
            'host = "a"\nidentity = "none"\nretry_schedule = []',
            "[relay] retry_schedule",
            "got an empty one",
        ),
        # past year 9999 broke every date `spool list` shows
        (
            'host = "a"\nidentity = "none"\nretry_schedule = [60, 1e300]',
            "[relay] retry_schedule",
            "must be at most 604800",
        ),
        ('host = "a"\nidentity = "none"\nmax_age = 1e12', "[relay] max_age", "at most 31536000"),
        # a CA for a session without TLS does nothing
        (
            'host = "127.0.0.1"\nidentity = "none"\ntls = "none"\nca_file = "ca.pem"',
            "[relay] ca_file",
            'only with tls = "starttls" or "implicit"',
        ),
        ('host = "a"\nidentity = "none"\npasword_file = "x"', "[relay] pasword_file", "unknown"),
        ('host = "a"\nidentity = "none"\ndata_timeout = 0', "[relay] data_timeout", "at least"),
        (
            'host = "a"\nidentity = "none"\nmax_messages_per_session = 0',
            "[relay] max_messages_per_session",
            "at least 1",
        ),
    ],
)
def test_mistakes_are_one_line(text, where, problem):
    with pytest.raises(ConfigError) as e:
        relay(text)
    assert e.value.where == where and problem in e.value.problem
    assert "\n" not in str(e.value)


def test_plaintext_to_loopback_or_when_allowed():
    assert relay('host = "127.0.0.1"\ntls = "none"\nidentity = "none"').tls == "none"
    allowed = relay('host = "mx"\ntls = "none"\nidentity = "none"\nallow_plaintext = true')
    assert allowed.allow_plaintext


def test_session_limits_and_timeouts():
    defaults = relay('host = "a"\nidentity = "none"')
    assert defaults.command_timeout == 300 and defaults.data_timeout == 600
    assert defaults.max_messages_per_session == 100
    r = relay(
        'host = "a"\nidentity = "none"\ncommand_timeout = 20\ndata_timeout = 900\n'
        "max_messages_per_session = 2"
    )
    assert (r.command_timeout, r.data_timeout, r.max_messages_per_session) == (20, 900, 2)
