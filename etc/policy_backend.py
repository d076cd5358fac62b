# A policy that checks passwords against a credential store kumoauth has
# built in, then adds meta of its own: here, the user's tenant.
#
# With only the store to ask, configure it directly instead
# ([auth] checker = "passwd-file" and [auth.passwd-file]); a policy is for
# what comes after, as below.  Every store can be used this way:
#   from kumoauth.backends import PasswdFile, Dovecot, LDAP, SQL, HTTP
# Each store's check(authz, authc, password, conn_meta) returns a Deferred
# firing with a Verdict: true when the password matched, with .meta (what
# the store adds, e.g. an auth API's "meta"); a store that cannot answer
# raises kumoauth.backends.BackendError, which the client sees as 454.
#
# Use it with:
#   [policy]
#   path = "policy_backend.py"
# (and [auth] checker = "policy", the default).
from pathlib import Path

from kumoauth import kumo
from kumoauth.backends import PasswdFile

# Re-read when the file changes; hashes are verified off the reactor.
users = PasswdFile(Path(__file__).with_name("users"))

# In practice a table, an API or a directory attribute.
TENANTS = {"example.com": "acme", "example.net": "globex"}


@kumo.on("smtp_server_auth_plain")
async def check(authz, authc, password, conn_meta):
    verdict = await users.check(authz, authc, password, conn_meta)
    if not verdict:
        return False
    domain = authc.rpartition("@")[2].lower()
    conn_meta.set_meta("tenant", TENANTS.get(domain, "default"))
    for key, value in verdict.meta.items():
        conn_meta.set_meta(key, value)
    return True
