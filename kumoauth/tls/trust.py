"""
Trust anchors for kumoauth's own TLS clients (LDAP, the HTTP auth API,
the IdP, Redis, the relay upstream): the certificates of an operator's PEM
file, or the system's trust store.  One loader, one set of error messages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.internet import ssl

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


def trust_root(ca_file: Path | str | None) -> Any:
    """
    The certificates of the PEM file *ca_file* as a Twisted trust root, or
    None without one (Twisted then uses the platform's trust store).
    ``ValueError`` naming the file (``ca_file: PATH: why``), never with its
    content.
    """
    if ca_file is None:
        return None
    if not str(ca_file):
        raise ValueError("ca_file: empty: give a path")
    try:
        text = Path(ca_file).read_bytes()
    except OSError as e:
        raise ValueError(f"ca_file: {ca_file}: {e.strerror}") from None
    blocks = _PEM.findall(text)
    if not blocks:
        raise ValueError(f"ca_file: {ca_file}: no PEM certificate in it")
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:  # pyOpenSSL's errors have no common base worth naming
        raise ValueError(
            f"ca_file: {ca_file}: unreadable certificate ({type(e).__name__})"
        ) from None
    return ssl.trustRootFromCertificates(certificates)
