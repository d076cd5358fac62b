"""
Scans of a whole message that run on a reactor thread, on inputs built to
be their worst: CPU seconds of one call each, measured in process
(``time.process_time``).  Prints one JSON object.

* ``headers_need_utf8`` (the relay, for a client's SMTPUTF8 behind an
  upstream without it): a non-ASCII preamble, then delimiter lines with
  no blank line after them; and a header of boundary parameters;
* ``is_report`` (every bounce): a ``Content-Type`` of 120,000 semicolons;
* ``normalize_newlines`` (the end of DATA): a message of bare CRs;
* ``message_id`` (the end of DATA, for the log line): a Message-ID field
  folded over millions of lines;
* ``strip_identity_header`` (the end of DATA): a client's identity field,
  then millions of short header lines; and one folded over as many.

    python -m bench.scans [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from kumoauth.relay.client import headers_need_utf8
from kumoauth.relay.dsn import is_report
from kumoauth.smtp.data import message_id, normalize_newlines, strip_identity_header


def timed(fn: Callable[[bytes], object], data: bytes) -> float:
    started = time.process_time()
    fn(data)
    return round(time.process_time() - started, 3)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scans", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small inputs only")
    args = parser.parse_args()
    scale = 1 if args.quick else 8
    head = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    delimiters = head + "é\r\n".encode() + b"--b\r\nX: 1\r\n" * (2_700 * scale)
    parameters = b"X: " + b"boundary=n;" * (125_000 * scale) + "\r\n\r\né\r\n".encode()
    semicolons = b"Content-Type: x/y" + b";" * (15_000 * scale) + b"\r\n\r\n"
    bare_crs = b"Subject: x\r\n\r\n" + b"a\r" * (1_000_000 * scale)
    folded_id = b"Message-ID: <x" + b"\r\n x" * (780_000 * scale) + b">\r\n\r\n"
    identity = b"X-Kumoauth-Identity: x\r\n"
    short_lines = identity + b"a: b\r\n" * (520_000 * scale) + b"\r\n"
    folded_identity = identity[:-2] + b"\r\n x" * (780_000 * scale) + b"\r\n\r\n"
    out = {
        f"headers_need_utf8, {len(delimiters) // 1024} KiB of delimiter lines": timed(
            headers_need_utf8, delimiters
        ),
        f"headers_need_utf8, {len(parameters) // 1_000_000} MB of boundary parameters": timed(
            headers_need_utf8, parameters
        ),
        f"is_report, Content-Type of {len(semicolons) // 1000}k semicolons": timed(
            is_report, semicolons
        ),
        f"normalize_newlines, {len(bare_crs) // 1_000_000} MB of bare CRs": timed(
            normalize_newlines, bare_crs
        ),
        f"message_id, {len(folded_id) // 1_000_000} MB Message-ID of folded lines": timed(
            message_id, folded_id
        ),
        f"strip_identity_header, {len(short_lines) // 1_000_000} MB of header lines": timed(
            strip_identity_header, short_lines
        ),
        f"strip_identity_header, {len(folded_identity) // 1_000_000} MB identity field": timed(
            strip_identity_header, folded_identity
        ),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
