"""
TLS: the server context and its policy (:mod:`.context`) on a small
binding of the system OpenSSL 3 (:mod:`.openssl`).
"""
