"""
SASL mechanisms as small objects the protocol drives (RFC 4954 §4).

Each mechanism is a class registered by name; the protocol makes one
object per AUTH attempt and feeds it the decoded client responses:
:meth:`Mechanism.respond` returns either the next challenge (bytes, which
the protocol sends base64-encoded after ``334``) or the finished
:class:`SASLResult`.  Malformed input raises :class:`~kumoauth.auth.sasl.SASLError`.
Twisted's ``IChallengeResponse`` is the model; a new mechanism is one new
class here (or anywhere, with :func:`register`), not a branch in the state
machine.

Pure: no I/O, no Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kumoauth.auth import sasl


@dataclass(frozen=True)
class SASLResult:
    """
    What a finished password exchange yields; ``repr`` hides the password.
    """

    authz: str
    authc: str
    password: str

    def __repr__(self) -> str:
        return f"SASLResult(authz={self.authz!r}, authc={self.authc!r}, password=<hidden>)"


@dataclass(frozen=True)
class BearerResult:
    """
    What a finished bearer-token exchange yields (XOAUTH2, OAUTHBEARER):
    the identity asked for (may be empty) and the token; ``repr`` hides it.
    """

    authz: str
    token: str

    def __repr__(self) -> str:
        return f"BearerResult(authz={self.authz!r}, token=<hidden>)"


class Mechanism:
    """
    One exchange of one mechanism.
    """

    name: ClassVar[str]

    def initial_challenge(self) -> bytes:
        """
        The challenge sent when AUTH came without an initial response.
        """
        return b""

    #: True for mechanisms that need ``[auth.oauth]`` (a token validator)
    needs_oauth: ClassVar[bool] = False

    def respond(self, data: bytes) -> bytes | SASLResult | BearerResult:
        """
        Take one decoded client response; return the next challenge or the
        result.
        """
        raise NotImplementedError


class Plain(Mechanism):
    """
    RFC 4616: one message, ``[authzid] NUL authcid NUL passwd``.
    """

    name = "PLAIN"

    def respond(self, data: bytes) -> SASLResult:
        plain = sasl.decode_plain(data)
        return SASLResult(plain.authz, plain.authc, plain.password)


class Login(Mechanism):
    """
    The LOGIN mechanism (draft-murchison-sasl-login): user name, then
    password, each in answer to a prompt.
    """

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def initial_challenge(self) -> bytes:
        return b"Username:"

    def respond(self, data: bytes) -> bytes | SASLResult:
        if self._username is None:
            self._username = sasl.decode_login_field(data, "username")
            return b"Password:"
        password = sasl.decode_login_field(data, "password")
        return SASLResult("", self._username, password)


class XOAuth2(Mechanism):
    """
    Google's XOAUTH2: one message, ``user=…^Aauth=Bearer …^A^A``.  On a
    refused token the server sends an error challenge and the client an
    empty response (the protocol's failure challenge).
    """

    name = "XOAUTH2"
    needs_oauth = True

    def respond(self, data: bytes) -> BearerResult:
        bearer = sasl.decode_xoauth2(data)
        return BearerResult(bearer.authz, bearer.token)


class OAuthBearer(Mechanism):
    """
    RFC 7628 OAUTHBEARER: a GS2 header with an optional ``a=`` authzid,
    then ``auth=Bearer …``.
    """

    name = "OAUTHBEARER"
    needs_oauth = True

    def respond(self, data: bytes) -> BearerResult:
        bearer = sasl.decode_oauthbearer(data)
        return BearerResult(bearer.authz, bearer.token)


REGISTRY: dict[str, type[Mechanism]] = {}


def register(mechanism: type[Mechanism]) -> type[Mechanism]:
    """
    Make *mechanism* available to ``[auth] mechanisms`` by its name.
    """
    REGISTRY[mechanism.name.upper()] = mechanism
    return mechanism


register(Plain)
register(Login)
register(XOAuth2)
register(OAuthBearer)
