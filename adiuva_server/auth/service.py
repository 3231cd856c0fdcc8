"""Accounts: registration, login, token refresh with rotation, per-request authentication,
and the admin operations the CLI uses."""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from adiuva_server import errors
from adiuva_server.auth import throttle
from adiuva_server.auth.passwords import PasswordHasher
from adiuva_server.auth.store import AccountStore, Rotation, User
from adiuva_server.auth.tokens import AccessTokens, new_refresh_token, refresh_successor, refresh_token_hash
from adiuva_server.config import TIERS, Settings
from adiuva_server.ratelimit import RateLimitStore

if TYPE_CHECKING:
    from adiuva_server.license.state import LicenseState

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


def new_account_terms(settings: Settings, license: LicenseState | None) -> tuple[str, int | None]:
    """The default tier of a new account and the license's cap on accounts, as of now (the
    license is live: a renewal or an expiry counts without a restart)."""
    if license is None:
        return settings.default_tier, None
    return license.default_tier, license.max_users


class AuthService:
    def __init__(self, settings: Settings, store: AccountStore, hasher: PasswordHasher, limits: RateLimitStore,
                 *, license: LicenseState | None = None) -> None:
        assert settings.jwt_secret, "resolve the JWT secret before building the service"
        self.settings = settings
        self.license = license
        self.store = store
        self.hasher = hasher
        self.limits = limits
        self.access = AccessTokens(settings.jwt_secret, settings.access_token_minutes * 60)
        self.refresh_lifetime = settings.refresh_token_days * 86400

    # -- sessions -----------------------------------------------------------------------------

    async def _new_session(self, user: User, client: str) -> IssuedTokens:
        """Called once `client` has proved the password: a new refresh family, and the address
        is known to the account from now on (see auth/throttle.py)."""
        token, digest = new_refresh_token()
        family = str(uuid.uuid4())
        now = int(time.time())
        tag = throttle.address_tag(self.settings.jwt_secret, client)
        await self.store.start_session(user.id, digest, family, now, now + self.refresh_lifetime, tag)
        return IssuedTokens(self.access.issue(user.id, user.session_version, family), token, self.access.lifetime)

    async def register(self, email: str, password: str, client: str) -> IssuedTokens:
        if not self.settings.signups_open:
            raise errors.SignupsClosed("ask the server's admin for an account")
        s = self.settings
        email = normalise_email(email)
        check_password(s, password)
        # Counted before the hash (one atomic hit), whatever the outcome: the limit bounds the
        # hashes and the accounts one address can cause.
        decision = await self.limits.hit(f"register:{client}", s.registrations_per_address, s.registration_window_seconds)
        if not decision.allowed:
            raise errors.RateLimited(decision.retry_after, "too many registrations from this address")
        password_hash = await self.hasher.hash(password)
        tier, max_users = new_account_terms(s, self.license)
        user = await self.store.create_user(email, password_hash, tier, admin=None, max_users=max_users)
        return await self._new_session(user, client)

    async def login(self, email: str, password: str, client: str) -> IssuedTokens:
        """Throttled as auth/throttle.py describes: a place in the address's and the account's
        throttles is reserved before the password check and refunded when it was right."""
        s = self.settings
        try:
            email = normalise_email(email)
        except errors.ValidationError:
            raise errors.InvalidCredentials() from None
        async with throttle.Attempt(self.limits, s.login_failure_window_seconds) as attempt:
            await attempt.take(throttle.address_key(client), s.login_failures_per_address,
                               "too many failed logins for this address; wait and try again")
            tag = throttle.address_tag(s.jwt_secret, client)
            subject = await self.store.login_subject(email, tag, int(time.time()))
            key = throttle.account_key(email, subject.throttle_generation, tag if subject.known_address else None)
            await attempt.take(key, s.login_failures_per_account,
                               "too many failed logins for this account; wait and try again")
            user = subject.user
            ok = await self.hasher.verify(user.password_hash if user else None, password)
            if not ok or user is None:
                raise errors.InvalidCredentials()  # the places are kept: they count this failure
            await attempt.refund()
        if user.disabled:
            raise errors.AccountDisabled("ask the server's admin to enable it")
        if self.hasher.needs_rehash(user.password_hash):
            # Cost settings changed since this hash was made: upgrade it now that we know the
            # password. The same password: sessions and known addresses stay.
            await self.store.rehash_password(user.id, await self.hasher.hash(password))
        return await self._new_session(user, client)

    async def refresh(self, refresh_token: str, client: str) -> IssuedTokens:
        s = self.settings
        successor = refresh_successor(s.jwt_secret, refresh_token)
        async with throttle.Attempt(self.limits, s.login_failure_window_seconds) as attempt:
            await attempt.take(f"refresh-fail:addr:{client}", s.login_failures_per_address,
                               "too many invalid refresh tokens from this address")
            now = int(time.time())
            outcome, user, family = await self.store.rotate_session(
                refresh_token_hash(refresh_token), refresh_token_hash(successor), now, now + self.refresh_lifetime,
                grace_seconds=s.refresh_grace_seconds, revoke_until=now + self.access.lifetime + 1,
            )
            if outcome in (Rotation.ROTATED, Rotation.RETRIED):
                await attempt.refund()
        if outcome is Rotation.REUSED:
            raise errors.TokenReused("this refresh token was already used; sign in again")
        if outcome not in (Rotation.ROTATED, Rotation.RETRIED) or user is None or family is None:
            raise errors.InvalidToken("the refresh token is invalid or expired")
        return IssuedTokens(self.access.issue(user.id, user.session_version, family), successor, self.access.lifetime)

    async def unlock(self, email: str) -> None:
        """Lift every login back-off of the account (all its throttle keys), on every server
        process: the throttle generation in the database moves on. NotFound for no such user."""
        await self.store.unlock(normalise_email(email))

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise errors.Unauthorized("missing Authorization: Bearer <token>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthorized("the Authorization header must be 'Bearer <token>'")
        return await self.authenticate_token(token.strip())

    async def authenticate_token(self, token: str) -> Principal:
        claims = self.access.verify(token)
        user = await self.store.auth_state(claims.user_id)
        if (user is None or user.disabled or user.session_version != claims.session_version
                or claims.family in user.revoked_families):
            raise errors.InvalidToken("the access token is no longer valid")
        return Principal(user.id, user.email, user.tier, user.is_admin, user.created_at)


class UserAdmin:
    """What the `adiuva user` commands do; importable and testable on its own. `license`: the
    server's; None reads the license file now (the CLI), so its max_users holds there too."""

    def __init__(self, settings: Settings, store: AccountStore, hasher: PasswordHasher,
                 license: LicenseState | None = None) -> None:
        from adiuva_server.license.state import LicenseState

        self.settings = settings
        self.store = store
        self.hasher = hasher
        self.license = LicenseState.load(settings) if license is None else license

    async def _get(self, email: str) -> User:
        user = await self.store.get_by_email(normalise_email(email))
        if user is None:
            raise errors.NotFound(f"no user with email {email.strip()}")
        return user

    async def add(self, email: str, password: str | None, tier: str | None, admin: bool) -> tuple[User, str | None]:
        """Returns the user and, when no password was given, the generated one."""
        email = normalise_email(email)
        default, max_users = new_account_terms(self.settings, self.license)
        tier = check_tier(tier or default)
        generated = None
        if password is None:
            password = generated = secrets.token_urlsafe(15)
        check_password(self.settings, password)
        user = await self.store.create_user(email, await self.hasher.hash(password), tier, admin=admin or None,
                                            max_users=max_users)
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

    async def unlock(self, email: str) -> None:
        await self.store.unlock((await self._get(email)).email)

    async def set_disabled(self, email: str, disabled: bool) -> User:
        user = await self._get(email)
        return await self.store.update_user(user.email, disabled=int(disabled))

    async def delete(self, email: str) -> None:
        """The rows only: `adiuva user delete` and the admin API use admin.service, which also
        removes the user's objects, in-memory vectors and WAL pages at once."""
        user = await self._get(email)
        await self.store.delete_user(user.email)
