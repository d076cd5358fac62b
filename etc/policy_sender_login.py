# A second example policy: bind MAIL FROM to the authenticated identity,
# what Postfix calls smtpd_sender_login_maps + reject_sender_login_mismatch.
#
# Use it with  [policy] path = "policy_sender_login.py".
import hmac

from kumoauth import kumo

# In production these come from a database; see docs/policy.md.
PASSWORDS = {"scott": "tiger", "newsletter": "s3nd-only"}

# Which envelope senders each authorization identity may use.
SENDER_LOGIN_MAP = {
    "scott": {"scott@example.com", "postmaster@example.com"},
    "newsletter": {"news@example.com"},
}


@kumo.on("smtp_server_auth_plain")
def check(authz, authc, password, conn_meta):
    expected = PASSWORDS.get(authc)
    if expected is None or password == "":
        return False
    # Constant time, so the reply time does not tell how close a guess was.
    if not hmac.compare_digest(expected.encode(), password.encode()):
        return False
    # No proxy authorization: a user may act only as themselves.
    return authz == authc


@kumo.on("smtp_server_mail_from")
def mail_from(sender, conn_meta):
    authz = conn_meta.get_meta("authz_id")
    allowed = SENDER_LOGIN_MAP.get(authz, set())
    if sender.lower() not in allowed:
        kumo.reject(553, f"5.7.1 Sender address rejected: not owned by user {authz}")
    conn_meta.set_meta("sender_checked", True)
