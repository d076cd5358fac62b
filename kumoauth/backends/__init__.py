"""
Credential stores operators already have; one module per store.

:mod:`kumoauth.backends.schemes` verifies the password hashes those stores
hold (Dovecot ``{SCHEME}`` values, crypt(3) strings, htpasswd lines' hashes).
"""
