"""Accounts: registration, login, token refresh with rotation, per-request authentication,
and the admin operations the CLI uses."""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import NamedTuple

from adiuva_server import errors
from adiuva_server.auth.passwords import PasswordHasher
from adiuva_server.auth.store import AccountStore, Rotation, User
from adiuva_server.auth.tokens import AccessTokens, new_refresh_token, refresh_token_hash
from adiuva_server.config import TIERS, Settings
from adiuva_server.ratelimit import RateLimitStore

_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_PASSWORD_LENGTH = 1024


def normalise_email(raw: str) -> str:
    """Trim and lower-case; reject anything that is not a plausible address. Single-label
    domains (ada@homelab) are allowed: this is a LAN server."""
    email = raw.strip()
    local, sep, domain = email.rpartition("@")
    if not sep or not local or not domain or len(email) > 254 or len(local) > 64:
        raise errors.ValidationError.field("email", "not a valid email address")
    try:
        domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        domain = ""
    if not _LOCAL.match(local) or not domain or not all(_LABEL.match(label) for label in domain.split(".")):
        raise errors.ValidationError.field("email", "not a valid email address")
    return f"{local.lower()}@{domain}"


def check_password(settings: Settings, password: str) -> None:
    if len(password) < settings.password_min_length:
        msg = f"must be at least {settings.password_min_length} characters"
    elif len(password) > MAX_PASSWORD_LENGTH:
        msg = f"must be at most {MAX_PASSWORD_LENGTH} characters"
    elif not password.strip():
        msg = "must not be blank"
    else:
        return
    raise errors.ValidationError.field("password", msg)


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise errors.ValidationError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")
    return tier


class Principal(NamedTuple):
    """The authenticated caller, as the database says now (tier is never taken from the token).
    A tuple: one is built on every authenticated request."""

    id: str
    email: str
    tier: str
    is_admin: bool
    created_at: str


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    access_token: str
    refresh_token: str
    expires_in: int


class AuthService:
    def __init__(self, settings: Settings, store: AccountStore, hasher: PasswordHasher, limits: RateLimitStore) -> None:
        assert settings.jwt_secret, "resolve the JWT secret before building the service"
        self.settings = settings
        self.store = store
        self.hasher = hasher
        self.limits = limits
        self.access = AccessTokens(settings.jwt_secret, settings.access_token_minutes * 60)
        self.refresh_lifetime = settings.refresh_token_days * 86400

    # -- sessions -----------------------------------------------------------------------------

    async def _new_session(self, user: User) -> IssuedTokens:
        token, digest = new_refresh_token()
        now = int(time.time())
        await self.store.start_session(user.id, digest, str(uuid.uuid4()), now, now + self.refresh_lifetime)
        return IssuedTokens(self.access.issue(user.id, user.session_version), token, self.access.lifetime)

    async def register(self, email: str, password: str, client: str) -> IssuedTokens:
        if not self.settings.signups_open:
            raise errors.SignupsClosed("ask the server's admin for an account")
        s = self.settings
        decision = self.limits.hit(f"register:{client}", s.registrations_per_address, s.registration_window_seconds)
        if not decision.allowed:
            raise errors.RateLimited(decision.retry_after, "too many registrations from this address")
        email = normalise_email(email)
        check_password(s, password)
        password_hash = await self.hasher.hash(password)
        user = await self.store.create_user(email, password_hash, s.default_tier, admin=None)
        return await self._new_session(user)

    async def login(self, email: str, password: str, client: str) -> IssuedTokens:
        s = self.settings
        try:
            email = normalise_email(email)
        except errors.ValidationError:
            raise errors.InvalidCredentials() from None
        by_address = f"login-fail:addr:{client}"
        by_account = f"login-fail:acct:{email}"
        window = s.login_failure_window_seconds
        for key, limit, what in (
            (by_address, s.login_failures_per_address, "this address"),
            (by_account, s.login_failures_per_account, "this account"),
        ):
            decision = self.limits.check(key, limit, window)
            if not decision.allowed:
                raise errors.RateLimited(decision.retry_after, f"too many failed logins for {what}; wait and try again")
        user = await self.store.get_by_email(email)
        ok = await self.hasher.verify(user.password_hash if user else None, password)
        if not ok or user is None:
            self.limits.hit(by_address, s.login_failures_per_address, window)
            self.limits.hit(by_account, s.login_failures_per_account, window)
            raise errors.InvalidCredentials()
        if user.disabled:
            raise errors.AccountDisabled("ask the server's admin to enable it")
        self.limits.reset(by_account)
        if self.hasher.needs_rehash(user.password_hash):
            # Cost settings changed since this hash was made: upgrade it now that we know the password.
            await self.store.update_user(user.email, password_hash=await self.hasher.hash(password))
            user = await self.store.get_by_email(email) or user
        return await self._new_session(user)

    async def refresh(self, refresh_token: str, client: str) -> IssuedTokens:
        s = self.settings
        failures = f"refresh-fail:addr:{client}"
        decision = self.limits.check(failures, s.login_failures_per_address, s.login_failure_window_seconds)
        if not decision.allowed:
            raise errors.RateLimited(decision.retry_after, "too many invalid refresh tokens from this address")
        new_token, new_digest = new_refresh_token()
        now = int(time.time())
        outcome, user = await self.store.rotate_session(
            refresh_token_hash(refresh_token), new_digest, now, now + self.refresh_lifetime
        )
        if outcome is not Rotation.ROTATED:
            self.limits.hit(failures, s.login_failures_per_address, s.login_failure_window_seconds)
        if outcome is Rotation.REUSED:
            raise errors.TokenReused("this refresh token was already used; sign in again")
        if outcome is not Rotation.ROTATED or user is None:
            raise errors.InvalidToken("the refresh token is invalid or expired")
        return IssuedTokens(self.access.issue(user.id, user.session_version), new_token, self.access.lifetime)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise errors.Unauthorized("missing Authorization: Bearer <token>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthorized("the Authorization header must be 'Bearer <token>'")
        return self.authenticate_token(token.strip())

    def authenticate_token(self, token: str) -> Principal:
        claims = self.access.verify(token)
        user = self.store.auth_state(claims.user_id)
        if user is None or user.disabled or user.session_version != claims.session_version:
            raise errors.InvalidToken("the access token is no longer valid")
        return Principal(user.id, user.email, user.tier, user.is_admin, user.created_at)

    async def unlock(self, email: str) -> None:
        """Lift a login back-off on this account (minimal: the auth work replaces it)."""
        self.limits.reset(f"login-fail:acct:{normalise_email(email)}")


class UserAdmin:
    """What the `adiuva user` commands do; importable and testable on its own."""

    def __init__(self, settings: Settings, store: AccountStore, hasher: PasswordHasher) -> None:
        self.settings = settings
        self.store = store
        self.hasher = hasher

    async def _get(self, email: str) -> User:
        user = await self.store.get_by_email(normalise_email(email))
        if user is None:
            raise errors.NotFound(f"no user with email {email.strip()}")
        return user

    async def add(self, email: str, password: str | None, tier: str | None, admin: bool) -> tuple[User, str | None]:
        """Returns the user and, when no password was given, the generated one."""
        email = normalise_email(email)
        tier = check_tier(tier or self.settings.default_tier)
        generated = None
        if password is None:
            password = generated = secrets.token_urlsafe(15)
        check_password(self.settings, password)
        user = await self.store.create_user(email, await self.hasher.hash(password), tier, admin=admin or None)
        return user, generated

    async def list(self) -> list[User]:
        return await self.store.list_users()

    async def set_password(self, email: str, password: str) -> User:
        user = await self._get(email)
        check_password(self.settings, password)
        return await self.store.update_user(user.email, password_hash=await self.hasher.hash(password))

    async def set_tier(self, email: str, tier: str) -> User:
        check_tier(tier)
        user = await self._get(email)
        return await self.store.update_user(user.email, tier=tier)

    async def set_disabled(self, email: str, disabled: bool) -> User:
        user = await self._get(email)
        return await self.store.update_user(user.email, disabled=int(disabled))

    async def delete(self, email: str) -> None:
        """The rows only: `adiuva user delete` and the admin API use admin.service, which also
        removes the user's objects, in-memory vectors and WAL pages at once."""
        user = await self._get(email)
        await self.store.delete_user(user.email)
