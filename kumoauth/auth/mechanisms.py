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

    def respond(self, data: bytes) -> bytes | SASLResult:
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


REGISTRY: dict[str, type[Mechanism]] = {}


def register(mechanism: type[Mechanism]) -> type[Mechanism]:
    """
    Make *mechanism* available to ``[auth] mechanisms`` by its name.
    """
    REGISTRY[mechanism.name.upper()] = mechanism
    return mechanism


register(Plain)
register(Login)
