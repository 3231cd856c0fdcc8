"""Account metadata: users and refresh-token families.

`AccountStore` is the interface the services use; `SQLiteAccountStore` is the embedded
implementation. No SQL lives outside this module for accounts.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol, TypeVar

import sqlean

from adiuva_server import errors
from adiuva_server.db import Database

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    tier: str
    is_admin: bool
    disabled: bool
    session_version: int
    created_at: str
    password_hash: str = ""
    # Refresh families revoked by a reused token whose access tokens may still be alive
    # (filled by auth_state only: the per-request check refuses their access tokens).
    revoked_families: frozenset[str] = frozenset()

    @classmethod
    def from_row(cls, row) -> User:
        return cls(
            id=row["id"],
            email=row["email"],
            tier=row["tier"],
            is_admin=bool(row["is_admin"]),
            disabled=bool(row["disabled"]),
            session_version=row["session_version"],
            created_at=row["created_at"],
            password_hash=row["password_hash"],
        )


class Rotation(enum.Enum):
    ROTATED = "rotated"
    RETRIED = "retried"  # the token was rotated moments ago: its successor is handed out again
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REUSED = "reused"  # the family has now been revoked
    USER_INACTIVE = "user_inactive"


class Rotated(NamedTuple):
    outcome: Rotation
    user: User | None = None
    family_id: str | None = None


class LoginSubject(NamedTuple):
    """What a login needs to know before checking the password."""

    user: User | None
    throttle_generation: int  # 0 for an unknown email
    known_address: bool  # this address has signed in to the account before


class AccountStore(Protocol):
    async def auth_state(self, user_id: str) -> User | None:
        """The hot path (every request): the user's current tier and account state, as of now.
        Async, so a store on a networked database can read it; SQLite's answers from a cache
        valid until anything is committed, without a thread hand-off."""

    async def get_by_email(self, email: str) -> User | None: ...
    async def login_subject(self, email: str, address_tag: bytes, now: int) -> LoginSubject: ...
    async def unlock(self, email: str) -> None:
        """Bump the account's throttle generation (its login throttles start afresh)."""
    async def get_by_id(self, user_id: str) -> User | None: ...
    async def list_users(self) -> list[User]: ...
    async def create_user(self, email: str, password_hash: str, tier: str, admin: bool | None,
                          max_users: int | None = None) -> User:
        """admin=None: admin only if this is the first user. Raises EmailTaken; LicenseUserLimit
        when `max_users` accounts exist already (atomically: concurrent creations never pass it)."""
    async def update_user(self, email: str, **changes) -> User:
        """tier / disabled / password_hash; disabling or a new password ends all sessions; a new
        password or enabling also unlocks the account's login throttles."""
    async def rehash_password(self, user_id: str, password_hash: str) -> None:
        """The same password hashed at new cost settings: nothing else changes."""
    async def delete_user(self, email: str) -> None: ...
    async def start_session(self, user_id: str, token_hash: bytes, family_id: str, now: int, expires_at: int,
                            address_tag: bytes | None = None) -> None:
        """A new refresh family; `address_tag`: the address just proved the password, it is
        known to the account until `expires_at`."""
    async def rotate_session(self, old_hash: bytes, new_hash: bytes, now: int, expires_at: int, *,
                             grace_seconds: int, revoke_until: int) -> Rotated:
        """Use the refresh token `old_hash`, issuing `new_hash` (its deterministic successor)
        in its family. Used already, less than `grace_seconds` ago, with that successor still
        unused: RETRIED (the successor is valid, nothing changes). Any other reuse revokes the
        family, and its access tokens until `revoke_until`."""
    async def purge_expired_sessions(self, now: int) -> int: ...
    async def update_user_by_id(self, user_id: str, **changes) -> User:
        """As update_user, by id; refuses (LastAdmin) to leave the server without an active admin."""
    async def delete_user_by_id(self, user_id: str, inside: Callable[[Any, str], Awaitable[T]] | None = None,
                                *, keep_an_admin: bool = True) -> T | None:
        """Delete a user (LastAdmin if it is the last active admin and `keep_an_admin`);
        `inside(conn, user_id)` runs first in the same transaction and its result is returned."""


_USER_COLUMNS = "id, email, tier, is_admin, disabled, session_version, created_at, password_hash"


AUTH_CACHE_USERS = 10_000


class SQLiteAccountStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Per-request account state, valid only while nothing at all has been committed since
        # it was read (Database.commit_marker): any write, by this server or the CLI, empties it.
        self._auth_cache: dict[str, User | None] = {}
        self._auth_cache_marker: object = None

    async def auth_state(self, user_id: str) -> User | None:
        # Never suspends: the cache check and the primary-key read run on the loop (~10 us).
        marker = self.db.commit_marker()
        if marker != self._auth_cache_marker or len(self._auth_cache) >= AUTH_CACHE_USERS:
            self._auth_cache.clear()
            self._auth_cache_marker = marker
        try:
            return self._auth_cache[user_id]
        except KeyError:
            pass
        # No password hash, and a tuple straight into the dataclass. Revoked families are rare
        # and few (kept for one access-token lifetime): one index probe finds none.
        row = self.db.lookup(
            "SELECT id, email, tier, is_admin, disabled, session_version, created_at,"
            " (SELECT group_concat(family_id, ' ') FROM revoked_families WHERE user_id = users.id)"
            " FROM users WHERE id = ?", (user_id,)
        )
        if row is None:
            user = None
        else:
            revoked = frozenset(row[7].split()) if row[7] else frozenset()
            user = User(*row[:3], bool(row[3]), bool(row[4]), row[5], row[6], "", revoked)
        self._auth_cache[user_id] = user
        return user

    async def get_by_email(self, email: str) -> User | None:
        row = await self.db.fetchone(f"SELECT {_USER_COLUMNS} FROM users WHERE email = ?", (email,))
        return None if row is None else User.from_row(row)

    async def login_subject(self, email: str, address_tag: bytes, now: int) -> LoginSubject:
        row = await self.db.fetchone(
            f"SELECT {_USER_COLUMNS}, throttle_generation, EXISTS (SELECT 1 FROM login_addresses"
            " WHERE user_id = users.id AND address_tag = ? AND known_until > ?) AS known FROM users WHERE email = ?",
            (address_tag, now, email),
        )
        if row is None:
            return LoginSubject(None, 0, False)
        return LoginSubject(User.from_row(row), row["throttle_generation"], bool(row["known"]))

    async def unlock(self, email: str) -> None:
        if not await self.db.execute_write(
            "UPDATE users SET throttle_generation = throttle_generation + 1 WHERE email = ?", (email,)
        ):
            raise errors.NotFound(f"no user with email {email}")

    async def get_by_id(self, user_id: str) -> User | None:
        row = await self.db.fetchone(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,))
        return None if row is None else User.from_row(row)

    async def list_users(self) -> list[User]:
        rows = await self.db.fetchall(f"SELECT {_USER_COLUMNS} FROM users ORDER BY created_at, email")
        return [User.from_row(r) for r in rows]

    async def create_user(self, email: str, password_hash: str, tier: str, admin: bool | None,
                          max_users: int | None = None) -> User:
        user_id = str(uuid.uuid4())
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        async with self.db.write() as conn:
            # Counted inside the write transaction (BEGIN IMMEDIATE: SQLite's one writer), so two
            # registrations at the limit cannot both see room. (PostgreSQL: lock the table first.)
            if max_users is not None:
                async with conn.execute("SELECT count(*) FROM users") as cur:
                    if (await cur.fetchone())[0] >= max_users:
                        raise errors.LicenseUserLimit(
                            f"this server's license allows {max_users} accounts, and all are taken; "
                            "ask the server's admin")
            if admin is None:
                async with conn.execute("SELECT EXISTS (SELECT 1 FROM users)") as cur:
                    admin = not (await cur.fetchone())[0]
            try:
                await conn.execute(
                    "INSERT INTO users (id, email, password_hash, tier, is_admin, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (user_id, email, password_hash, tier, int(admin), created),
                )
            except sqlean.IntegrityError:
                raise errors.EmailTaken() from None
        return User(user_id, email, tier, bool(admin), False, 0, created, password_hash)

    async def update_user(self, email: str, **changes) -> User:
        return await self._update("email", email, changes, keep_an_admin=False)

    async def _update(self, column: str, key: str, changes: dict, *, keep_an_admin: bool) -> User:
        allowed = {"tier", "disabled", "password_hash", "is_admin"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"unsupported changes: {sorted(set(changes) - allowed)}")
        ends_sessions = "password_hash" in changes or changes.get("disabled")
        sets = ", ".join(f"{k} = ?" for k in changes)
        if ends_sessions:
            sets += ", session_version = session_version + 1"
        if "password_hash" in changes or changes.get("disabled") == 0:
            # A new password or an enabled account starts with clean login throttles.
            sets += ", throttle_generation = throttle_generation + 1"
        async with self.db.write() as conn:
            if keep_an_admin and (changes.get("is_admin") == 0 or changes.get("disabled")):
                await self._keeps_an_admin(conn, key)
            async with conn.execute(
                f"UPDATE users SET {sets} WHERE {column} = ? RETURNING {_USER_COLUMNS}", (*changes.values(), key)
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                raise errors.NotFound(f"no user with email {key}" if column == "email" else "no such user")
            if ends_sessions:
                await conn.execute("UPDATE refresh_tokens SET revoked = 1 WHERE user_id = ?", (row["id"],))
            if "password_hash" in changes:
                # Whoever signed in with the old password proves nothing now.
                await conn.execute("DELETE FROM login_addresses WHERE user_id = ?", (row["id"],))
        return User.from_row(row)

    async def rehash_password(self, user_id: str, password_hash: str) -> None:
        await self.db.execute_write("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))

    async def delete_user(self, email: str) -> None:
        # Refresh tokens go with the user (ON DELETE CASCADE); so will every later feature's rows.
        async with self.db.write() as conn:
            cur = await conn.execute("DELETE FROM users WHERE email = ?", (email,))
            if cur.rowcount == 0:
                raise errors.NotFound(f"no user with email {email}")

    async def start_session(self, user_id: str, token_hash: bytes, family_id: str, now: int, expires_at: int,
                            address_tag: bytes | None = None) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, family_id, user_id, issued_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (token_hash, family_id, user_id, now, expires_at),
            )
            if address_tag is not None:
                await conn.execute(
                    "INSERT INTO login_addresses (user_id, address_tag, known_until) VALUES (?, ?, ?)"
                    " ON CONFLICT (user_id, address_tag) DO UPDATE SET known_until = excluded.known_until",
                    (user_id, address_tag, expires_at),
                )

    async def rotate_session(self, old_hash: bytes, new_hash: bytes, now: int, expires_at: int, *,
                             grace_seconds: int, revoke_until: int) -> Rotated:
        # Unknown tokens (garbage, guesses) are answered from a primary-key read, without
        # queueing for the single writer.
        if self.db.lookup("SELECT 1 FROM refresh_tokens WHERE token_hash = ?", (old_hash,)) is None:
            return Rotated(Rotation.UNKNOWN)
        # One transaction: of concurrent refreshes with one token, one rotates and the others
        # find it used (retries within the grace, or reuse).
        async with self.db.write() as conn:
            async with conn.execute(
                "SELECT family_id, user_id, expires_at, used_at, revoked FROM refresh_tokens WHERE token_hash = ?",
                (old_hash,),
            ) as cur:
                token = await cur.fetchone()
            if token is None:
                return Rotated(Rotation.UNKNOWN)
            family, user_id = token["family_id"], token["user_id"]
            if token["used_at"] is not None or token["revoked"]:
                if not token["revoked"] and now < token["used_at"] + grace_seconds:
                    async with conn.execute(
                        "SELECT used_at, revoked FROM refresh_tokens WHERE token_hash = ? AND family_id = ?",
                        (new_hash, family),
                    ) as cur:
                        successor = await cur.fetchone()
                    if successor is not None and successor["used_at"] is None and not successor["revoked"]:
                        user = await self._active_user(conn, user_id)
                        return Rotated(Rotation.RETRIED, user, family) if user else Rotated(Rotation.USER_INACTIVE)
                # Reuse: the token was stolen or replayed. End the family, and its access tokens.
                await conn.execute("UPDATE refresh_tokens SET revoked = 1 WHERE family_id = ?", (family,))
                await conn.execute(
                    "INSERT INTO revoked_families (family_id, user_id, until) VALUES (?, ?, ?)"
                    " ON CONFLICT (family_id) DO UPDATE SET until = max(until, excluded.until)",
                    (family, user_id, revoke_until),
                )
                return Rotated(Rotation.REUSED)
            if token["expires_at"] <= now:
                return Rotated(Rotation.EXPIRED)
            user = await self._active_user(conn, user_id)
            if user is None:
                return Rotated(Rotation.USER_INACTIVE)
            await conn.execute("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ?", (now, old_hash))
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, family_id, user_id, issued_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (new_hash, family, user_id, now, expires_at),
            )
            return Rotated(Rotation.ROTATED, user, family)

    @staticmethod
    async def _active_user(conn, user_id: str) -> User | None:
        async with conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,)) as cur:
            row = await cur.fetchone()
        return None if row is None or row["disabled"] else User.from_row(row)

    async def purge_expired_sessions(self, now: int) -> int:
        # Used tokens are kept until they expire: that is what makes reuse detectable.
        async with self.db.write() as conn:
            cur = await conn.execute("DELETE FROM refresh_tokens WHERE expires_at <= ?", (now,))
            await conn.execute("DELETE FROM login_addresses WHERE known_until <= ?", (now,))
            await conn.execute("DELETE FROM revoked_families WHERE until <= ?", (now,))
            return cur.rowcount

    # -- admin (the admin API and `adiuva user delete`) ----------------------------------------

    async def _keeps_an_admin(self, conn, user_id: str) -> None:
        """Inside the write transaction: refuse when `user_id` is the only enabled admin, so two
        admins demoting each other at once cannot both succeed."""
        async with conn.execute(
            "SELECT (SELECT is_admin = 1 AND disabled = 0 FROM users WHERE id = ?), "
            "(SELECT count(*) FROM users WHERE is_admin = 1 AND disabled = 0 AND id != ?)",
            (user_id, user_id),
        ) as cur:
            active_admin, others = await cur.fetchone()
        if active_admin and others == 0:
            raise errors.LastAdmin("this is the server's only active admin; make another account admin first")

    async def update_user_by_id(self, user_id: str, **changes) -> User:
        return await self._update("id", user_id, changes, keep_an_admin=True)

    async def delete_user_by_id(self, user_id: str, inside: Callable[[Any, str], Awaitable[T]] | None = None,
                                *, keep_an_admin: bool = True) -> T | None:
        async with self.db.write() as conn:
            if keep_an_admin:
                await self._keeps_an_admin(conn, user_id)
            result = await inside(conn, user_id) if inside is not None else None
            # Every row the user owns goes with it (ON DELETE CASCADE; vectors through triggers).
            cur = await conn.execute("DELETE FROM users WHERE id = ?", (user_id,))
            if cur.rowcount == 0:
                raise errors.NotFound("no such user")
        return result
