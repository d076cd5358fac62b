"""
Hypothesis against the whole protocol: arbitrary input, in arbitrary
chunks, never raises, never logs a traceback, and every reply is a
well-formed SMTP reply line.
"""

from __future__ import annotations

import re
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kumoauth.config import AuthConfig, ServerConfig
from kumoauth.policy import Policy
from kumoauth.testing import Session, plain_b64

REPLY = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*\r\n")

COMMANDS = [
    b"EHLO x.example\r\n",
    b"HELO x.example\r\n",
    b"AUTH PLAIN " + plain_b64("", "scott", "tiger").encode() + b"\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"*\r\n",
    b"=\r\n",
    b"MAIL FROM:<a@example.com> SIZE=10\r\n",
    b"RCPT TO:<b@example.net>\r\n",
    b"DATA\r\n",
    b".\r\n",
    b"RSET\r\n",
    b"STARTTLS\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
]

chunks = st.lists(
    st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=300)), min_size=1, max_size=30
)


def policy() -> Policy:
    p = Policy()
    p.on("smtp_server_auth_plain", lambda a, c, pw, m: pw == "tiger")
    return p


# The captured log accumulates across examples: a traceback in any fails.
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks, st.sampled_from(["implicit", "starttls", "none"]))
def test_any_input_gets_well_formed_replies(captured_log, data, tls):
    with tempfile.TemporaryDirectory() as spool:
        s = Session(
            policy(),
            spool_dir=spool,
            tls=tls,
            auth_required=tls != "none",
            allow_plaintext_auth=tls == "none",
            server=ServerConfig(hostname="mx.example", max_errors=1000),
            auth=AuthConfig(failure_delay=0, max_failures=1000),
        )
        out = s.banner.encode()
        for chunk in data:
            out += s.send(chunk).encode()
            if s.closed:
                break
        s.close()
        assert REPLY.sub(b"", out) == b""
        assert "Traceback" not in captured_log.text()
        assert not any(
            e.get("log_level") and e["log_level"].name == "critical" for e in captured_log.events
        )
