"""
The stock twisted.mail peer: ``twisted.mail.smtp.ESMTP`` with a Cred portal
and an in-memory checker, STARTTLS and implicit TLS with the same
certificate, messages discarded.  User ``slow`` is answered by a Deferred
after 100 ms (workload f).

    python -m bench.twisted_mail_server CERT KEY STARTTLS_PORT IMPLICIT_PORT
"""

from __future__ import annotations

import sys

from twisted.cred import checkers, error, portal
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer, endpoints, reactor, ssl, task
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from zope.interface import implementer


@implementer(smtp.IMessage)
class Discard:
    def lineReceived(self, line):
        pass

    def eomReceived(self):
        return defer.succeed(None)

    def connectionLost(self):
        pass


@implementer(smtp.IMessageDelivery)
class Delivery:
    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from bench"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return Discard


@implementer(portal.IRealm)
class Realm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, Delivery(), lambda: None
        raise NotImplementedError()


@implementer(checkers.ICredentialsChecker)
class Checker:
    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        if credentials.username == b"slow":
            return task.deferLater(reactor, 0.1, lambda: credentials.username)
        if credentials.username == b"scott" and credentials.checkPassword(b"tiger"):
            return defer.succeed(credentials.username)
        return defer.fail(error.UnauthorizedLogin())


class Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    domain = b"localhost"

    def __init__(self, portal, ctx):
        super().__init__(portal)
        self.ctx = ctx

    def buildProtocol(self, addr):
        p = self.protocol({b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}, self.ctx)
        p.factory = self
        p.portal = self.portal
        p.host = self.domain
        return p


def main() -> None:
    cert, key, starttls_port, implicit_port = sys.argv[1:5]
    with open(cert, "rb") as f:
        chain = f.read()
    with open(key, "rb") as f:
        key_pem = f.read()
    certificate = ssl.PrivateCertificate.loadPEM(chain + b"\n" + key_pem)
    options = certificate.options()
    p = portal.Portal(Realm(), [Checker()])
    endpoints.TCP4ServerEndpoint(reactor, int(starttls_port), interface="127.0.0.1").listen(
        Factory(p, options)
    )
    endpoints.SSL4ServerEndpoint(
        reactor, int(implicit_port), options, interface="127.0.0.1"
    ).listen(Factory(p, None))
    print("READY", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
