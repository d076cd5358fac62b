"""
``[tls] certificate`` and ``private_key`` paths that exist but are not
regular files (a directory, a FIFO, a device): :func:`build_context` says
what is wrong instead of "file not found", in one line, at start-up (the
real twistd exits non-zero) and at a SIGHUP reload (one ``reload failed``
line; the old context keeps serving STARTTLS and AUTH).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kumoauth.config import TLSConfig
from kumoauth.tls import context as tls
from tests.server import Certs, make_certs, running_server
from tests.test_config import assert_operator_error, listener_config
from tests.test_e2e import POLICY, login, starttls_client
from tests.test_reload import hup_and_wait


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


def special(tmp_path: Path, kind: str) -> Path:
    """A path that exists and is not a regular file."""
    if kind == "device":
        return Path(os.devnull)
    path = tmp_path / f"{kind}.pem"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    return path


PROBLEMS = {
    "directory": "is a directory, not a file",
    "fifo": "not a regular file",
    "device": "not a regular file",
}


@pytest.mark.parametrize("kind", sorted(PROBLEMS))
@pytest.mark.parametrize("label", ["certificate", "private_key"])
def test_build_context_names_what_the_path_is(
    tmp_path: Path, certs: Certs, label: str, kind: str
) -> None:
    path = special(tmp_path, kind)
    paths = {"certificate": certs.chain, "private_key": certs.key, label: path}
    with pytest.raises(tls.TLSError) as e:
        tls.build_context(TLSConfig(**paths))
    assert str(e.value) == f"[tls] {label}: {path}: {PROBLEMS[kind]}"


def test_build_context_missing_file_is_still_not_found(tmp_path: Path, certs: Certs) -> None:
    with pytest.raises(tls.TLSError) as e:
        tls.build_context(TLSConfig(certs.chain, tmp_path / "nope.pem"))
    assert str(e.value) == f"[tls] private_key: {tmp_path / 'nope.pem'}: file not found"
    # a path through a regular file is missing too (ENOTDIR)
    through = certs.key / "key.pem"
    with pytest.raises(tls.TLSError) as e:
        tls.build_context(TLSConfig(certs.chain, through))
    assert str(e.value) == f"[tls] private_key: {through}: file not found"


@pytest.mark.e2e
@pytest.mark.parametrize("label", ["certificate", "private_key"])
def test_a_directory_stops_startup_with_one_line(tmp_path: Path, certs: Certs, label: str) -> None:
    directory = tmp_path / "a-directory.pem"
    directory.mkdir()
    original = certs.chain if label == "certificate" else certs.key
    text = listener_config(certs).replace(f'"{original}"', f'"{directory}"')
    assert_operator_error(tmp_path, text, f"[tls] {label}: {directory}: is a directory")


@pytest.mark.e2e
def test_a_directory_at_reload_keeps_the_old_context(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    key_pem = certs.key.read_bytes()
    with running_server(tmp_path / "srv", certs, POLICY) as srv:
        certs.key.unlink()
        certs.key.mkdir()
        hup_and_wait(srv, "reload failed")
        lines = [x for x in srv.log().splitlines() if "reload failed" in x]
        assert len(lines) == 1, lines
        assert lines[0].endswith(
            f"reload failed, configuration unchanged: {srv.config}: "
            f"[tls] private_key: {certs.key}: is a directory, not a file"
        ), lines[0]
        assert "Traceback" not in srv.log()
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235
        # the key back: the next reload takes it
        certs.key.rmdir()
        certs.key.write_bytes(key_pem)
        hup_and_wait(srv, "reloaded configuration")
        with starttls_client(srv) as s:
            assert login(s, "PLAIN", "scott", "tiger")[0] == 235


def test_read_pem_then_build_from_the_bytes_alone(tmp_path: Path, certs: Certs) -> None:
    # What a worker does: the bytes the supervisor read, the files gone.
    cfg = TLSConfig(certificate=certs.chain, private_key=certs.key)
    pem = tls.read_pem(cfg)
    assert pem == (certs.key.read_bytes(), certs.chain.read_bytes())
    certs.key.unlink()
    certs.chain.write_bytes(b"half a certificate")
    assert tls.build_context(cfg, pem=pem) is not None


def test_bytes_that_are_not_pem_are_named_by_the_configured_file(
    tmp_path: Path, certs: Certs
) -> None:
    cfg = TLSConfig(certificate=certs.chain, private_key=certs.key)
    key, chain = tls.read_pem(cfg)
    with pytest.raises(tls.TLSError) as e:
        tls.build_context(cfg, pem=(key, b"-----BEGIN CERTIFICATE-----\nxx\n"))
    assert str(e.value) == f"[tls] certificate: {certs.chain}: not a PEM certificate chain"
    with pytest.raises(tls.TLSError) as e:
        tls.build_context(cfg, pem=(b"not a key", chain))
    assert str(e.value) == f"[tls] private_key: {certs.key}: not a PEM private key"
    assert b"BEGIN" not in str(e.value).encode()


def test_an_encrypted_key_is_said_to_be_encrypted(tmp_path: Path, certs: Certs) -> None:
    from cryptography.hazmat.primitives import serialization

    cfg = TLSConfig(certificate=certs.chain, private_key=certs.key)
    key, chain = tls.read_pem(cfg)
    encrypted = serialization.load_pem_private_key(key, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase"),
    )
    with pytest.raises(tls.TLSError) as e:
        tls.build_context(cfg, pem=(encrypted, chain))
    assert str(e.value).startswith(f"[tls] private_key: {certs.key}: the key is encrypted")
