"""Access tokens (HS256 JWTs, algorithm pinned) and refresh tokens (opaque, stored hashed)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from adiuva_server import errors

ISSUER = "adiuva"
ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    session_version: int
    expires_at: float
    family: str | None  # the refresh family the token was issued for (None: issued before families were claimed)


def new_refresh_token() -> tuple[str, bytes]:
    """A fresh refresh token and the SHA-256 digest under which it is stored."""
    token = secrets.token_urlsafe(32)
    return token, refresh_token_hash(token)


def refresh_token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def refresh_successor(secret: str, token: str) -> str:
    """The token that rotating `token` issues: derived, not drawn, so a retry of the same refresh
    can be answered with the same successor while only hashes are stored. Without the server's
    secret it is as unguessable as a random token (HMAC-SHA256, 256 bits, base64url)."""
    mac = hmac.new(secret.encode(), b"refresh-successor\0" + token.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


class AccessTokens:
    """Issues and verifies access tokens.

    Verified tokens are remembered (bounded LRU keyed by the exact token string) so the
    ~30 us HMAC check runs once per token, not once per request. The key is the whole signed
    token, so a forged or altered token never matches an entry; expiry is still checked on
    every use, and revocation is the caller's database check of the session version and of
    the token's refresh family (`fam`).
    """

    def __init__(self, secret: str, lifetime_seconds: int, cache_size: int = 10_000) -> None:
        self._secret = secret
        self.lifetime = lifetime_seconds
        self._cache: OrderedDict[str, AccessClaims] = OrderedDict()
        self._cache_size = cache_size

    def issue(self, user_id: str, session_version: int, family: str) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user_id,
            "sv": session_version,
            "fam": family,
            "typ": "access",
            "iat": now,
            "exp": now + self.lifetime,
            "jti": secrets.token_urlsafe(8),
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> AccessClaims:
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at <= time.time():
                self._cache.pop(token, None)
                raise errors.InvalidToken("the access token has expired")
            self._cache.move_to_end(token)
            return cached
        if not token.isascii():  # a JWT is ASCII; undecodable header bytes arrive as surrogates
            raise errors.InvalidToken("the access token is invalid")
        try:
            data = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],  # pinned: "none", RS256 key confusion etc. are refused
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise errors.InvalidToken("the access token has expired") from None
        except jwt.InvalidTokenError:
            raise errors.InvalidToken("the access token is invalid") from None
        family = data.get("fam")
        if (data.get("typ") != "access" or type(data.get("sv")) is not int or not isinstance(data["sub"], str)
                or not (family is None or isinstance(family, str))):
            raise errors.InvalidToken("the access token is invalid")
        claims = AccessClaims(data["sub"], data["sv"], float(data["exp"]), family)
        self._cache[token] = claims
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return claims
