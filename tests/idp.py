"""
A test identity provider: a real ``twisted.web`` server on 127.0.0.1
(plain HTTP, or HTTPS with a trustme certificate) serving

- ``/jwks``: the public half of :attr:`IdP.published` as a JWKS, with a
  configurable ``Cache-Control`` header;
- ``/introspect``: RFC 7662 introspection with HTTP Basic client
  authentication (``client_id`` / ``secret``); a token's answer is what
  :attr:`IdP.introspected` holds for it, ``{"active": false}`` otherwise;

and counting the requests each gets.  :class:`SigningKey` makes real keys
(RSA 2048 for RS256, EC P-256 for ES256, Ed25519 for EdDSA) and signs
tokens with them; rotating a key is replacing :attr:`IdP.published`.

    idp = IdP(reactor); idp.start()
    key = SigningKey.make("EdDSA", "k1"); idp.published = [key]
    token = key.sign(idp.claims(email="alice@example.org"))
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.upstream import in_reactor

ISSUER_PATH = "/realms/mail"
AUDIENCE = "smtp.example.org"
CLIENT_ID = "kumoauth"
CLIENT_SECRET = "introspection-s3cret:/+ü"


@dataclass
class SigningKey:
    """A private key, its kid and its JWS algorithm."""

    alg: str
    kid: str | None
    private: Any

    @classmethod
    def make(cls, alg: str, kid: str | None) -> SigningKey:
        private: Any
        if alg == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif alg == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(alg)
        return cls(alg, kid, private)

    def with_kid(self, kid: str | None) -> SigningKey:
        return SigningKey(self.alg, kid, self.private)

    def jwk(self, *, with_alg: bool = True) -> dict[str, Any]:
        """The public key as a JWK."""
        algorithm = jwt.get_algorithm_by_name(self.alg)
        out: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        out["use"] = "sig"
        if with_alg:
            out["alg"] = self.alg
        if self.kid is not None:
            out["kid"] = self.kid
        return out

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        h: dict[str, Any] = {"kid": self.kid} if self.kid is not None else {}
        h.update(headers or {})
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=h)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWS put together by hand (for the attacks PyJWT will not sign)."""
    h = b64url(json.dumps(header).encode())
    p = b64url(json.dumps(claims).encode())
    return f"{h}.{p}.{b64url(signature)}"


class _JWKS(Resource):
    isLeaf = True

    def __init__(self, idp: IdP) -> None:
        super().__init__()
        self.idp = idp

    def render_GET(self, request: Request) -> bytes:
        self.idp.jwks_requests += 1
        if self.idp.jwks_status != 200:
            request.setResponseCode(self.idp.jwks_status)
            return b"nope"
        request.setHeader(b"Content-Type", b"application/json")
        if self.idp.cache_control is not None:
            request.setHeader(b"Cache-Control", self.idp.cache_control.encode())
        if self.idp.jwks_body is not None:
            return self.idp.jwks_body
        return json.dumps({"keys": [k.jwk() for k in self.idp.published]}).encode()


class _Introspect(Resource):
    isLeaf = True

    def __init__(self, idp: IdP) -> None:
        super().__init__()
        self.idp = idp

    def render_POST(self, request: Request) -> bytes:
        self.idp.introspection_requests += 1
        form = parse_qs(request.content.read().decode())
        self.idp.introspection_forms.append(form)
        request.setHeader(b"Content-Type", b"application/json")
        if not self._authenticated(request):
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Basic realm="idp"')
            return b'{"error":"invalid_client"}'
        if self.idp.introspection_body is not None:
            return self.idp.introspection_body
        token = form.get("token", [""])[0]
        answer = self.idp.introspected.get(token, {"active": False})
        return json.dumps(answer).encode()

    def _authenticated(self, request: Request) -> bool:
        header = (request.getHeader(b"authorization") or b"").decode()
        scheme, _, value = header.partition(" ")
        if scheme != "Basic":
            return False
        user, _, password = base64.b64decode(value).decode().partition(":")
        return (unquote(user), unquote(password)) == (self.idp.client_id, self.idp.client_secret)


class _Site(Site):
    noisy = False

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.protocols: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        self.protocols.append(p)
        return p

    def log(self, request: Request) -> None:
        pass  # no access log lines in the captured events

    def drop_all(self) -> None:
        for p in self.protocols:
            t = getattr(getattr(p, "_channel", p), "transport", None)
            while getattr(t, "transport", None) is not None:
                t = t.transport
            if t is not None and not t.disconnected:
                t.abortConnection()


@dataclass
class IdP:
    reactor: Any
    tls: Any = None  # CertificateOptions, or None for plain HTTP
    port: int = 0
    published: list[SigningKey] = field(default_factory=list)
    #: Cache-Control of the JWKS answer (None: no header)
    cache_control: str | None = None
    #: status of the JWKS answer; a body other than the published keys
    jwks_status: int = 200
    jwks_body: bytes | None = None
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    #: token -> introspection answer
    introspected: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: an introspection body to send instead of the answer
    introspection_body: bytes | None = None
    jwks_requests: int = 0
    introspection_requests: int = 0
    introspection_forms: list[dict[str, list[str]]] = field(default_factory=list)
    listening: Any = None

    def __post_init__(self) -> None:
        root = Resource()
        root.putChild(b"jwks", _JWKS(self))
        root.putChild(b"introspect", _Introspect(self))
        self.site = _Site(root)

    def start(self) -> None:
        def listen() -> None:
            if self.tls is None:
                self.listening = self.reactor.listenTCP(self.port, self.site, interface="127.0.0.1")
            else:
                self.listening = self.reactor.listenSSL(
                    self.port, self.site, self.tls, interface="127.0.0.1"
                )
            self.port = self.listening.getHost().port

        in_reactor(listen)

    def stop(self) -> None:
        """Down: no longer listening, every open connection dropped."""

        def down() -> Any:
            self.site.drop_all()
            return self.listening.stopListening()

        in_reactor(down)

    def url(self, path: str) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    @property
    def issuer(self) -> str:
        return self.url(ISSUER_PATH)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """A valid access token's claims, for *overrides* to spoil."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
            "jti": "jti-0001",
            "email": "alice@example.org",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "scope": "openid email smtp",
        }
        for key, value in overrides.items():
            if value is None:
                claims.pop(key, None)
            else:
                claims[key] = value
        return claims
