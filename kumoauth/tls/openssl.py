"""
A small binding of the system's OpenSSL 3 ``libssl`` (cffi, ABI mode) for
the server side of TLS, because pyOpenSSL's bundled OpenSSL does not expose
``SSL_CTX_set_num_tickets``, the groups list control or any session-ticket
key control (see docs/decisions.md).

:class:`Context` is one ``SSL_CTX``; :class:`Connection` is one ``SSL`` on two
memory BIOs with exactly the subset of ``OpenSSL.SSL.Connection`` that
``twisted.protocols.tls.TLSMemoryBIOProtocol`` uses, raising pyOpenSSL's own
exception classes (``WantReadError``, ``ZeroReturnError``, ``SysCallError``,
``Error``) in the same cases, so Twisted cannot tell the difference.

Only what kumoauth needs is declared; every declaration matches the
OpenSSL 3.0 ABI (``libssl.so.3``/``libcrypto.so.3``).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
from collections.abc import Callable, Iterator
from typing import Any

from cffi import FFI
from OpenSSL.SSL import Error, SysCallError, WantReadError, WantWriteError, ZeroReturnError

_CDEF = """
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;
typedef struct ssl_method_st SSL_METHOD;
typedef struct bio_st BIO;
typedef struct bio_method_st BIO_METHOD;
typedef struct x509_st X509;
typedef struct evp_pkey_st EVP_PKEY;
typedef struct ssl_cipher_st SSL_CIPHER;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_mac_ctx_st EVP_MAC_CTX;
typedef struct {
    const char *key;
    unsigned int data_type;
    void *data;
    size_t data_size;
    size_t return_size;
} OSSL_PARAM;

unsigned long OpenSSL_version_num(void);
const char *OpenSSL_version(int);

const SSL_METHOD *TLS_server_method(void);
SSL_CTX *SSL_CTX_new(const SSL_METHOD *);
void SSL_CTX_free(SSL_CTX *);
long SSL_CTX_ctrl(SSL_CTX *, int, long, void *);
uint64_t SSL_CTX_set_options(SSL_CTX *, uint64_t);
int SSL_CTX_set_cipher_list(SSL_CTX *, const char *);
int SSL_CTX_set_ciphersuites(SSL_CTX *, const char *);
int SSL_CTX_set_num_tickets(SSL_CTX *, size_t);
long SSL_CTX_set_timeout(SSL_CTX *, long);
int SSL_CTX_use_PrivateKey(SSL_CTX *, EVP_PKEY *);
int SSL_CTX_use_certificate(SSL_CTX *, X509 *);
int SSL_CTX_check_private_key(const SSL_CTX *);
int SSL_CTX_set_session_id_context(SSL_CTX *, const unsigned char *, unsigned int);
void SSL_CTX_set_default_passwd_cb(SSL_CTX *, int (*)(char *, int, int, void *));
int SSL_CTX_set_tlsext_ticket_key_evp_cb(SSL_CTX *,
    int (*)(SSL *, unsigned char *, unsigned char *, EVP_CIPHER_CTX *, EVP_MAC_CTX *, int));

SSL *SSL_new(SSL_CTX *);
void SSL_free(SSL *);
void SSL_set_accept_state(SSL *);
void SSL_set_bio(SSL *, BIO *, BIO *);
void SSL_set0_rbio(SSL *, BIO *);
void SSL_set0_wbio(SSL *, BIO *);
int SSL_do_handshake(SSL *);
int SSL_read(SSL *, void *, int);
int SSL_write(SSL *, const void *, int);
int SSL_shutdown(SSL *);
int SSL_get_error(const SSL *, int);
const SSL_CIPHER *SSL_get_current_cipher(const SSL *);
const char *SSL_CIPHER_get_name(const SSL_CIPHER *);
const char *SSL_get_version(const SSL *);
int SSL_session_reused(const SSL *);
X509 *SSL_get1_peer_certificate(const SSL *);
void X509_free(X509 *);
int i2d_X509(X509 *, unsigned char **);
void CRYPTO_free(void *, const char *, int);

BIO *BIO_new(const BIO_METHOD *);
BIO *BIO_new_mem_buf(const void *, int);
int BIO_free(BIO *);
EVP_PKEY *PEM_read_bio_PrivateKey(BIO *, EVP_PKEY **, int (*)(char *, int, int, void *), void *);
X509 *PEM_read_bio_X509_AUX(BIO *, X509 **, int (*)(char *, int, int, void *), void *);
X509 *PEM_read_bio_X509(BIO *, X509 **, int (*)(char *, int, int, void *), void *);
void EVP_PKEY_free(EVP_PKEY *);
const BIO_METHOD *BIO_s_mem(void);
int BIO_read(BIO *, void *, int);
int BIO_write(BIO *, const void *, int);
long BIO_ctrl(BIO *, int, long, void *);
int BIO_test_flags(const BIO *, int);

unsigned long ERR_get_error(void);
unsigned long ERR_peek_error(void);
unsigned long ERR_peek_last_error(void);
void ERR_clear_error(void);
const char *ERR_lib_error_string(unsigned long);
const char *ERR_reason_error_string(unsigned long);

const EVP_CIPHER *EVP_aes_256_cbc(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *,
                       const unsigned char *, const unsigned char *);
int EVP_DecryptInit_ex(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *,
                       const unsigned char *, const unsigned char *);
int EVP_MAC_CTX_set_params(EVP_MAC_CTX *, const OSSL_PARAM *);
int RAND_bytes(unsigned char *, int);
"""

# Constants of the OpenSSL 3 ABI (ssl.h, bio.h, err.h, params.h).
SSL_ERROR_NONE = 0
SSL_ERROR_SSL = 1
SSL_ERROR_WANT_READ = 2
SSL_ERROR_WANT_WRITE = 3
SSL_ERROR_SYSCALL = 5
SSL_ERROR_ZERO_RETURN = 6
SSL_R_UNEXPECTED_EOF_WHILE_READING = 294

SSL_CTRL_MODE = 33
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_SET_GROUPS_LIST = 92
SSL_CTRL_SET_MIN_PROTO_VERSION = 123
SSL_CTRL_CHAIN = 88
SSL_CTRL_CHAIN_CERT = 89
SSL_MODE_RELEASE_BUFFERS = 0x10
SSL_SESS_CACHE_OFF = 0

SSL_OP_NO_TICKET = 1 << 14
SSL_OP_NO_COMPRESSION = 1 << 17
SSL_OP_CIPHER_SERVER_PREFERENCE = 1 << 22
SSL_OP_NO_RENEGOTIATION = 1 << 30

TLS1_2_VERSION = 0x0303
TLS1_3_VERSION = 0x0304

BIO_C_SET_BUF_MEM_EOF_RETURN = 130
BIO_CTRL_PENDING = 10
BIO_FLAGS_READ = 0x01
BIO_FLAGS_WRITE = 0x02
BIO_FLAGS_SHOULD_RETRY = 0x08

OSSL_PARAM_UTF8_STRING = 4
OSSL_PARAM_OCTET_STRING = 5
OSSL_PARAM_UNMODIFIED = (1 << 64) - 1

# Connection._unsettled bits: the BIO into the SSL, the one out of it.
_INTO, _FROM = 1, 2

#: the plaintext buffer for one SSL_read (a record holds at most 16 KiB)
_READ_SIZE = 2**15
_BOTH = _INTO | _FROM

_ERR_SYSTEM_FLAG = 1 << 31
_ERR_REASON_MASK = 0x7FFFFF
_ERR_LIB_OFFSET = 23
_ERR_LIB_MASK = 0xFF
_ERR_LIB_PEM = 9
_PEM_R_NO_START_LINE = 108

ffi = FFI()
ffi.cdef(_CDEF)


def _open(name: str) -> Any:
    """
    ``libssl.so.3`` / ``libcrypto.so.3``: the ABI declared above is 3.x's.
    ``KUMOAUTH_LIBSSL`` / ``KUMOAUTH_LIBCRYPTO`` name another file.
    """
    override = os.environ.get(f"KUMOAUTH_LIB{name.upper()}")
    candidates = [override] if override else [f"lib{name}.so.3", ctypes.util.find_library(name)]
    last: Exception | None = None
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return ffi.dlopen(candidate)
        except OSError as e:
            last = e
    raise ImportError(f"cannot load the system OpenSSL 3 lib{name}: {last}")


# libcrypto first, so that libssl's dependency is the same library.
crypto = _open("crypto")
lib = _open("ssl")

if not 0x30000000 <= lib.OpenSSL_version_num() < 0x40000000:
    raise ImportError(
        "kumoauth needs the system's OpenSSL 3.x libssl, found "
        + ffi.string(lib.OpenSSL_version(0)).decode()
    )

#: e.g. "OpenSSL 3.0.19 27 Jan 2026"
VERSION = ffi.string(lib.OpenSSL_version(0)).decode()


def _text(p: Any) -> str:
    return ffi.string(p).decode("utf-8", "replace") if p != ffi.NULL else ""


def error_queue() -> list[tuple[str, str, str]]:
    """
    Drain this thread's OpenSSL error queue, as pyOpenSSL reports it:
    ``(library, function, reason)`` (OpenSSL 3 has no function names).
    """
    errors: list[tuple[str, str, str]] = []
    while True:
        code = crypto.ERR_get_error()
        if code == 0:
            return errors
        errors.append(
            (
                _text(crypto.ERR_lib_error_string(code)),
                "",
                _text(crypto.ERR_reason_error_string(code)),
            )
        )


#: buffers OpenSSL fills before anything reads them: not zeroed first
_scratch = ffi.new_allocator(should_clear_after_alloc=False)


def _empty(bio: Any) -> bool:
    return not lib.BIO_ctrl(bio, BIO_CTRL_PENDING, 0, ffi.NULL)


def raise_error(exc: type[Exception] = Error) -> Any:
    raise exc(error_queue())


def _reason(code: int) -> int:
    return code & ~_ERR_SYSTEM_FLAG if code & _ERR_SYSTEM_FLAG else code & _ERR_REASON_MASK


# --- session ticket keys ------------------------------------------------------

#: (key_name[16], aes_key[32], hmac_key[32]) pairs: [0] encrypts, every one
#: decrypts.  Supplied by kumoauth.tls; process-wide, so every context (a
#: reload builds a new one) shares them.
TicketKeys = Callable[[], list[tuple[bytes, bytes, bytes]]]
_ticket_keys: TicketKeys | None = None
_params_cache: dict[bytes, Any] = {}
_SHA256 = ffi.new("char[]", b"SHA256")
_KEY = ffi.new("char[]", b"key")
_DIGEST = ffi.new("char[]", b"digest")


def set_ticket_keys(source: TicketKeys) -> None:
    global _ticket_keys
    _ticket_keys = source
    _params_cache.clear()


def _mac_params(hmac_key: bytes) -> Any:
    """The OSSL_PARAM array for HMAC-SHA256 with *hmac_key*, built once per key."""
    cached = _params_cache.get(hmac_key)
    if cached is None:
        if len(_params_cache) > 8:
            _params_cache.clear()
        key = ffi.new("unsigned char[]", hmac_key)
        params = ffi.new("OSSL_PARAM[3]")  # zeroed: [2] is the end marker
        params[0].key, params[0].data_type = _KEY, OSSL_PARAM_OCTET_STRING
        params[0].data, params[0].data_size = key, len(hmac_key)
        params[0].return_size = OSSL_PARAM_UNMODIFIED
        params[1].key, params[1].data_type = _DIGEST, OSSL_PARAM_UTF8_STRING
        params[1].data, params[1].data_size = _SHA256, 6
        params[1].return_size = OSSL_PARAM_UNMODIFIED
        cached = _params_cache[hmac_key] = (params, key)  # the key buffer lives with them
    return cached[0]


@ffi.callback(
    "int(SSL *, unsigned char *, unsigned char *, EVP_CIPHER_CTX *, EVP_MAC_CTX *, int)",
    error=0,  # a bug in here costs a ticket (or a resumption), never the handshake
)
def _ticket_key_cb(ssl: Any, name: Any, iv: Any, cctx: Any, hctx: Any, enc: int) -> int:
    """
    RFC 5077 ticket protection with our own keys (SSL_CTX_set_tlsext_ticket_key_evp_cb):
    encrypt with the current key; decrypt with any still accepted one, and
    ask for a fresh ticket (2) when it was not the current one.
    """
    keys = _ticket_keys() if _ticket_keys is not None else []
    if not keys:
        return 0
    if enc:
        key_name, aes, mac = keys[0]
        ffi.memmove(name, key_name, 16)
        if crypto.RAND_bytes(iv, 16) != 1:
            return -1
        if crypto.EVP_EncryptInit_ex(cctx, crypto.EVP_aes_256_cbc(), ffi.NULL, aes, iv) != 1:
            return -1
        if crypto.EVP_MAC_CTX_set_params(hctx, _mac_params(mac)) != 1:
            return -1
        return 1
    wanted = ffi.buffer(name, 16)[:]
    for i, (key_name, aes, mac) in enumerate(keys):
        if key_name == wanted:
            if crypto.EVP_DecryptInit_ex(cctx, crypto.EVP_aes_256_cbc(), ffi.NULL, aes, iv) != 1:
                return -1
            if crypto.EVP_MAC_CTX_set_params(hctx, _mac_params(mac)) != 1:
                return -1
            return 1 if i == 0 else 2
    return 0  # unknown or expired key: a full handshake


@ffi.callback("int(char *, int, int, void *)", error=0)
def _no_passphrase(buf: Any, size: int, rwflag: int, userdata: Any) -> int:
    """An encrypted key is an operator error, not a prompt on the terminal."""
    return 0


# --- context ------------------------------------------------------------------


@contextlib.contextmanager
def _memory_bio(data: bytes) -> Iterator[Any]:
    """A read-only memory BIO over *data* (not copied: kept alive here)."""
    buf = ffi.from_buffer(data)
    bio = lib.BIO_new_mem_buf(buf, len(data))
    if bio == ffi.NULL:
        raise MemoryError("BIO_new_mem_buf")
    try:
        yield bio
    finally:
        lib.BIO_free(bio)


def _end_of_pem(code: int) -> bool:
    """Whether *code* is PEM's "no start line": the end of a chain."""
    if code & _ERR_SYSTEM_FLAG:
        return False
    lib_code = (code >> _ERR_LIB_OFFSET) & _ERR_LIB_MASK
    return lib_code == _ERR_LIB_PEM and code & _ERR_REASON_MASK == _PEM_R_NO_START_LINE


class Context:
    """
    One server ``SSL_CTX``.  Raises ``OpenSSL.SSL.Error`` (with the error
    queue) when OpenSSL refuses something.
    """

    def __init__(self) -> None:
        crypto.ERR_clear_error()
        ctx = lib.SSL_CTX_new(lib.TLS_server_method())
        if ctx == ffi.NULL:
            raise_error()
        self._ctx = ffi.gc(ctx, lib.SSL_CTX_free)
        lib.SSL_CTX_set_default_passwd_cb(self._ctx, _no_passphrase)

    def _check(self, ok: bool) -> None:
        if not ok:
            raise_error()

    def _ctrl(self, cmd: int, larg: int, parg: Any = ffi.NULL) -> int:
        return int(lib.SSL_CTX_ctrl(self._ctx, cmd, larg, parg))

    def set_min_proto_version(self, version: int) -> None:
        self._check(self._ctrl(SSL_CTRL_SET_MIN_PROTO_VERSION, version) == 1)

    def set_options(self, options: int) -> int:
        return int(lib.SSL_CTX_set_options(self._ctx, options))

    def set_mode(self, mode: int) -> int:
        return self._ctrl(SSL_CTRL_MODE, mode)

    def set_session_cache_mode(self, mode: int) -> int:
        return self._ctrl(SSL_CTRL_SET_SESS_CACHE_MODE, mode)

    def set_session_id(self, sid: bytes) -> None:
        self._check(lib.SSL_CTX_set_session_id_context(self._ctx, sid, len(sid)) == 1)

    def set_timeout(self, seconds: int) -> None:
        lib.SSL_CTX_set_timeout(self._ctx, seconds)

    def set_cipher_list(self, ciphers: bytes) -> None:
        self._check(lib.SSL_CTX_set_cipher_list(self._ctx, ciphers) == 1)

    def set_ciphersuites(self, suites: bytes) -> None:
        self._check(lib.SSL_CTX_set_ciphersuites(self._ctx, suites) == 1)

    def set_groups(self, groups: bytes) -> None:
        """``SSL_CTX_set1_groups_list``: colon-separated OpenSSL names."""
        buf = ffi.new("char[]", groups)
        self._check(self._ctrl(SSL_CTRL_SET_GROUPS_LIST, 0, buf) == 1)

    def set_num_tickets(self, n: int) -> None:
        self._check(lib.SSL_CTX_set_num_tickets(self._ctx, n) == 1)

    def use_ticket_keys(self) -> None:
        """Protect tickets with :func:`set_ticket_keys`' keys (see there)."""
        self._check(lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(self._ctx, _ticket_key_cb) == 1)

    def _use_pem(self, bio: Any, read: Any, use: Any, free: Any) -> None:
        # One PEM object read from *bio*, handed to the context (which
        # keeps a reference of its own), ours freed.
        item = read(bio, ffi.NULL, _no_passphrase, ffi.NULL)
        if item == ffi.NULL:
            raise_error()
        try:
            self._check(use(self._ctx, item) == 1)
        finally:
            free(item)

    def use_privatekey_pem(self, data: bytes) -> None:
        """
        What ``SSL_CTX_use_PrivateKey_file`` does, from PEM bytes in memory
        (no file, no descriptor): an encrypted key is refused, not prompted for.
        """
        crypto.ERR_clear_error()
        with _memory_bio(data) as bio:
            self._use_pem(
                bio, lib.PEM_read_bio_PrivateKey, lib.SSL_CTX_use_PrivateKey, lib.EVP_PKEY_free
            )

    def use_certificate_chain_pem(self, data: bytes) -> None:
        """
        What ``SSL_CTX_use_certificate_chain_file`` does, from PEM bytes in
        memory: the first certificate is the server's (with its trust
        settings, ``X509_AUX``), every further one its chain, in order.
        """
        crypto.ERR_clear_error()
        with _memory_bio(data) as bio:
            leaf = (lib.PEM_read_bio_X509_AUX, lib.SSL_CTX_use_certificate, lib.X509_free)
            self._use_pem(bio, *leaf)
            self._check(self._ctrl(SSL_CTRL_CHAIN, 0) == 1)  # SSL_CTX_clear_chain_certs
            while True:
                ca = lib.PEM_read_bio_X509(bio, ffi.NULL, _no_passphrase, ffi.NULL)
                if ca == ffi.NULL:
                    break
                if self._ctrl(SSL_CTRL_CHAIN_CERT, 0, ca) != 1:  # add0: owns it if added
                    lib.X509_free(ca)
                    raise_error()
            # The loop ends at the end of the data ("no start line"), or at
            # a certificate that does not parse.
            code = crypto.ERR_peek_last_error()
            if code and not _end_of_pem(code):
                raise_error()
            crypto.ERR_clear_error()

    def check_privatekey(self) -> None:
        self._check(lib.SSL_CTX_check_private_key(self._ctx) == 1)


class Connection:
    """
    A server-side ``SSL`` on memory BIOs: the part of
    ``OpenSSL.SSL.Connection`` that ``TLSMemoryBIOProtocol`` and
    :func:`kumoauth.tls.describe` use.
    """

    def __init__(self, context: Context) -> None:
        self._context = context
        ssl = lib.SSL_new(context._ctx)
        if ssl == ffi.NULL:
            raise_error()
        self._ssl = ffi.gc(ssl, lib.SSL_free)
        into = lib.BIO_new(lib.BIO_s_mem())
        out = lib.BIO_new(lib.BIO_s_mem())
        if into == ffi.NULL or out == ffi.NULL:
            raise MemoryError("BIO_new")
        lib.SSL_set_bio(self._ssl, into, out)  # the SSL owns (and frees) both
        self._into_ssl, self._from_ssl = into, out
        #: the memory BIOs still to be swapped for empty ones (see _settle)
        self._unsettled = 0
        #: set once: by the handshake's end, or by the incoming EOF
        self._armed = False
        self._app_data: Any = None
        lib.SSL_set_accept_state(self._ssl)

    def get_context(self) -> Context:
        return self._context

    # Twisted's connection factory calls these on every new connection.
    def set_accept_state(self) -> None:
        lib.SSL_set_accept_state(self._ssl)

    def set_connect_state(self) -> None:
        raise NotImplementedError("server side only")

    def set_app_data(self, data: Any) -> None:
        self._app_data = data

    def get_app_data(self) -> Any:
        return self._app_data

    # --- the TLSMemoryBIOProtocol interface --------------------------------

    def _raise_ssl_error(self, result: int) -> None:
        error = self._ssl_error(result, lib.SSL_get_error(self._ssl, result))
        if error is not None:
            raise error

    def _ssl_error(self, result: int, error: int) -> Exception | None:
        """
        The exception pyOpenSSL raises for a failed call's *result* and its
        ``SSL_get_error`` code *error*; None for ``SSL_ERROR_NONE``.
        """
        if error == SSL_ERROR_NONE:
            return None
        if error == SSL_ERROR_WANT_READ:
            return WantReadError()
        if error == SSL_ERROR_WANT_WRITE:
            return WantWriteError()
        if error == SSL_ERROR_ZERO_RETURN:
            return ZeroReturnError()
        if error == SSL_ERROR_SYSCALL:
            errno = ffi.errno
            if crypto.ERR_peek_error() == 0 or errno != 0:
                crypto.ERR_clear_error()
                if result < 0 and errno != 0:
                    return SysCallError(errno, os.strerror(errno))
                return SysCallError(-1, "Unexpected EOF")
            return Error(error_queue())
        if error == SSL_ERROR_SSL:
            peeked = crypto.ERR_peek_error()
            if peeked != 0 and _reason(peeked) == SSL_R_UNEXPECTED_EOF_WHILE_READING:
                crypto.ERR_clear_error()
                return SysCallError(-1, "Unexpected EOF")
        return Error(error_queue())

    def do_handshake(self) -> None:
        if not self.try_handshake():
            raise WantReadError()

    def try_handshake(self) -> bool:
        """
        ``do_handshake`` without an exception for the usual case: True once
        the handshake is done, False while it wants more bytes; any other
        failure raises as ``do_handshake`` does.
        """
        crypto.ERR_clear_error()
        result = lib.SSL_do_handshake(self._ssl)
        if result != 1:
            error = lib.SSL_get_error(self._ssl, result)
            if error == SSL_ERROR_WANT_READ:
                return False
            raise self._ssl_error(result, error) or Error(error_queue())
        if not self._armed:  # once per connection
            self._armed = True
            self._unsettled = _BOTH
        return True

    # A memory BIO keeps the capacity of the largest flight it held: for
    # the rest of the session, the handshake's (the certificate chain out,
    # the ClientHello in), 1-3 KiB an idle session does not need.  Each is
    # swapped, once, for an empty one as soon as it has been drained after
    # the handshake (two small allocations per connection).

    def _settle(self, which: int) -> None:
        self._unsettled &= ~which
        fresh = lib.BIO_new(lib.BIO_s_mem())
        if fresh == ffi.NULL:
            return  # keep the old one: nothing is lost but the memory
        if which == _INTO:
            lib.SSL_set0_rbio(self._ssl, fresh)  # frees the old one
            self._into_ssl = fresh
        else:
            lib.SSL_set0_wbio(self._ssl, fresh)
            self._from_ssl = fresh

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        crypto.ERR_clear_error()
        buf = _scratch("char[]", bufsiz)
        result = lib.SSL_read(self._ssl, buf, bufsiz)
        if result <= 0:
            if (
                self._unsettled & _INTO
                and lib.SSL_get_error(self._ssl, result) == SSL_ERROR_WANT_READ
                and _empty(self._into_ssl)
            ):
                # Before the swap: SSL_get_error reads the BIO's retry flag.
                self._settle(_INTO)
                raise WantReadError()
            self._raise_ssl_error(result)
        return ffi.buffer(buf, result)[:]

    read = recv

    def send(self, buf: bytes, flags: int = 0) -> int:
        if len(buf) > 2147483647:
            raise ValueError("Cannot send more than 2**31-1 bytes at once.")
        crypto.ERR_clear_error()
        result = lib.SSL_write(self._ssl, buf, len(buf))
        if result <= 0:
            self._raise_ssl_error(result)
        return int(result)

    write = send

    def _bio_error(self, bio: Any) -> Any:
        if lib.BIO_test_flags(bio, BIO_FLAGS_SHOULD_RETRY):
            if lib.BIO_test_flags(bio, BIO_FLAGS_READ):
                raise WantReadError()
            if lib.BIO_test_flags(bio, BIO_FLAGS_WRITE):
                raise WantWriteError()
            raise ValueError("unknown bio failure")
        raise_error()

    def bio_read(self, bufsiz: int) -> bytes:
        buf = _scratch("char[]", bufsiz)
        result = lib.BIO_read(self._from_ssl, buf, bufsiz)
        if result <= 0:
            self._bio_error(self._from_ssl)
        if self._unsettled & _FROM and _empty(self._from_ssl):
            self._settle(_FROM)
        return ffi.buffer(buf, result)[:]

    def bio_write(self, buf: bytes) -> int:
        result = lib.BIO_write(self._into_ssl, buf, len(buf))
        if result <= 0:
            self._bio_error(self._into_ssl)
        return int(result)

    # --- one call per direction (kumoauth.tls.direct) ----------------------

    def open(self, data: bytes) -> tuple[list[bytes], Exception | None]:
        """
        ``bio_write(data)`` (unless empty), then ``recv`` until OpenSSL
        wants more bytes, in one call: the plaintext read, record by record, and the exception
        the last ``recv`` would have raised, None for "wants more bytes"
        (``WantReadError``), the usual end.
        """
        if data:
            self.bio_write(data)
        crypto.ERR_clear_error()
        buf = _scratch("char[]", _READ_SIZE)
        records: list[bytes] = []
        while True:
            result = lib.SSL_read(self._ssl, buf, _READ_SIZE)
            if result > 0:
                records.append(ffi.buffer(buf, result)[:])
                continue
            error = lib.SSL_get_error(self._ssl, result)
            if error != SSL_ERROR_WANT_READ:
                return records, self._ssl_error(result, error)
            if self._unsettled & _INTO and _empty(self._into_ssl):
                self._settle(_INTO)  # as recv does
            return records, None

    def has_output(self) -> bool:
        """Whether :meth:`take` would return anything."""
        return not _empty(self._from_ssl)

    def take(self) -> bytes:
        """
        All the outgoing BIO holds (b"" when it is empty): ``bio_read``
        without a size limit or a ``WantReadError`` for nothing to send.
        """
        pending = lib.BIO_ctrl(self._from_ssl, BIO_CTRL_PENDING, 0, ffi.NULL)
        if pending <= 0:
            return b""
        buf = _scratch("char[]", pending)
        result = lib.BIO_read(self._from_ssl, buf, pending)
        if result <= 0:
            self._bio_error(self._from_ssl)
        if self._unsettled & _FROM and result == pending:
            self._settle(_FROM)  # drained, as bio_read does
        return ffi.buffer(buf, result)[:]

    def seal(self, data: bytes) -> bytes | None:
        """
        ``send(data)`` and ``take()`` in one call: the TLS records for
        *data*, or None when ``SSL_write`` failed (nothing was sent; calling
        ``send`` with the same bytes raises what it would have raised).
        """
        crypto.ERR_clear_error()
        if lib.SSL_write(self._ssl, data, len(data)) <= 0:
            return None
        return self.take()

    def bio_shutdown(self) -> None:
        # The EOF mark belongs to this BIO: it is never swapped after this,
        # even by a handshake that would finish later.
        self._unsettled &= ~_INTO
        self._armed = True
        lib.BIO_ctrl(self._into_ssl, BIO_C_SET_BUF_MEM_EOF_RETURN, 0, ffi.NULL)

    def shutdown(self) -> bool:
        crypto.ERR_clear_error()
        result = lib.SSL_shutdown(self._ssl)
        if result < 0:
            self._raise_ssl_error(result)
        return bool(result > 0)

    def get_peer_certificate(self) -> Any:
        """The client's certificate (``OpenSSL.crypto.X509``) or None."""
        cert = lib.SSL_get1_peer_certificate(self._ssl)
        if cert == ffi.NULL:
            return None
        try:
            out = ffi.new("unsigned char **")
            n = lib.i2d_X509(cert, out)
            if n <= 0:
                raise_error()
            try:
                der = ffi.buffer(out[0], n)[:]
            finally:
                crypto.CRYPTO_free(out[0], b"kumoauth", 0)
        finally:
            lib.X509_free(cert)
        from OpenSSL import crypto as pyo_crypto

        return pyo_crypto.load_certificate(pyo_crypto.FILETYPE_ASN1, der)

    def get_alpn_proto_negotiated(self) -> bytes:
        return b""  # no ALPN on SMTP

    # --- what kumoauth.tls.describe reads ----------------------------------

    def get_cipher_name(self) -> str | None:
        cipher = lib.SSL_get_current_cipher(self._ssl)
        if cipher == ffi.NULL:
            return None
        return _text(lib.SSL_CIPHER_get_name(cipher))

    def get_protocol_version_name(self) -> str:
        return _text(lib.SSL_get_version(self._ssl))

    def session_reused(self) -> bool:
        return bool(lib.SSL_session_reused(self._ssl))
