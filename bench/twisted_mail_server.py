"""
The stock twisted.mail peer: ``twisted.mail.smtp.ESMTP`` with a Cred portal
and an in-memory checker, STARTTLS and implicit TLS with the same
certificate, messages discarded.  User ``slow`` is answered by a Deferred
after 100 ms (workload f).

    python -m bench.twisted_mail_server CERT KEY STARTTLS_PORT IMPLICIT_PORT
        [--workers N [--reuseport]] [--tickets]

With ``--workers N`` the server runs as N processes (``twisted.mail-2w``),
the way kumoauth's ``[server] workers`` does: this process binds both
sockets and N children adopt them (``adoptStreamPort``); with
``--reuseport`` each child binds its own with ``SO_REUSEPORT`` instead and
the kernel picks one per connection.  ``--tickets`` turns TLS session
tickets on (workload h).  It shows what two processes cost a server that does nothing
else (no supervisor, no log, no queue).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys

from twisted.cred import checkers, error, portal
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer, endpoints, reactor, ssl, task
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.protocols.tls import TLSMemoryBIOFactory
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


def listening(port: int, reuseport: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def supervise(args: argparse.Namespace) -> None:
    """Run ``--workers`` children on shared sockets (or SO_REUSEPORT ones); wait."""
    ports = [args.starttls_port, args.implicit_port]
    if args.reuseport:  # a socket held here would take its share and never accept
        held: list[socket.socket] = []
        child = [*map(str, ports), "--reuseport"]
    else:
        held = [listening(port, False) for port in ports]
        child = ["--fds", *(str(h.fileno()) for h in held)]
    command = [sys.executable, "-m", "bench.twisted_mail_server", args.cert, args.key, *child]
    if args.tickets:
        command.append("--tickets")
    children = [
        subprocess.Popen(command, pass_fds=[h.fileno() for h in held]) for _ in range(args.workers)
    ]

    def stop(signum, frame):
        for c in children:
            c.terminate()

    signal.signal(signal.SIGTERM, stop)
    for c in children:
        c.wait()


def serve(args: argparse.Namespace) -> None:
    with open(args.cert, "rb") as f:
        chain = f.read()
    with open(args.key, "rb") as f:
        key_pem = f.read()
    certificate = ssl.PrivateCertificate.loadPEM(chain + b"\n" + key_pem)
    options = ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        enableSessionTickets=args.tickets,
    )
    p = portal.Portal(Realm(), [Checker()])
    factories = [Factory(p, options), TLSMemoryBIOFactory(options, False, Factory(p, None))]
    ports = (args.starttls_port, args.implicit_port)
    for i, factory in enumerate(factories):
        if args.fds:  # a child: the parent's sockets
            reactor.adoptStreamPort(args.fds[i], socket.AF_INET, factory)
        elif args.reuseport:  # a child: its own socket in the port's group
            sock = listening(ports[i], True)
            reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, factory)
            sock.close()
        else:
            endpoints.TCP4ServerEndpoint(reactor, ports[i], interface="127.0.0.1").listen(factory)
    print("READY", flush=True)
    reactor.run()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.twisted_mail_server")
    p.add_argument("cert")
    p.add_argument("key")
    p.add_argument("starttls_port", type=int, nargs="?")
    p.add_argument("implicit_port", type=int, nargs="?")
    p.add_argument("--workers", type=int, default=1, help="processes (the sockets shared)")
    p.add_argument("--reuseport", action="store_true", help="with --workers: SO_REUSEPORT")
    p.add_argument("--tickets", action="store_true", help="TLS session tickets on")
    p.add_argument("--fds", type=int, nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.workers > 1:
        supervise(args)
    else:
        serve(args)


if __name__ == "__main__":
    main()
