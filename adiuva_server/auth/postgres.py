"""The account store on PostgreSQL (migration postgres/0001), for many server processes at once.

The same contract as `SQLiteAccountStore`, kept under READ COMMITTED by the statements
themselves instead of SQLite's one writer:

- registration: when it must count (the first user becomes the admin; the license's account
  limit), the transaction first takes `LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE`, which
  only such registrations (and other writers of `users`, for those few milliseconds) wait for:
  of concurrent first registrations one sees an empty table. Readers never wait. Emails are
  unique exactly as stored (the service lower-cases them), as on SQLite.
- the last active admin: every active admin's row is locked (`FOR UPDATE`, in id order, so two
  demotions cannot deadlock) before they are counted; a concurrent demotion or deletion waits,
  then counts what the first left.
- refresh rotation: the user's row is share-locked, then the token's row locked (`FOR
  UPDATE`), the order every writer of both takes (user, then tokens), so of concurrent
  rotations of one token one rotates and the others, once it commits, find it used: RETRIED
  within the grace (its successor committed and unused), else the family is revoked.
- `auth_state`: from a per-node cache of the accounts it checked, while the node listens on
  channel `adiuva_accounts`: a trigger (migration postgres/0009) notifies every change to what
  it returns, at commit, whoever wrote it, and the notice evicts that account. A read that
  overlapped a notice is not cached (a generation counter). Whenever the listening connection is
  not up (at start, lost, or its health check failing) the cache is off and every call is one
  indexed query, so a missed notice can never leave a node stale; a change counts on another
  node once its notice has arrived (well under a millisecond on a LAN: see README).

Built by the composition root (`compose.postgres_stores`): `PostgresAccountStore(pg)` on the shared pool
in place of `SQLiteAccountStore(db)` when `settings.backend == "postgresql"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from adiuva_server import errors
from adiuva_server.auth.store import AUTH_CACHE_USERS, LoginSubject, Rotated, Rotation, User
from adiuva_server.db.postgres import PgDatabase

T = TypeVar("T")

_USER_COLUMNS = "id, email, tier, is_admin, disabled, session_version, created_at, password_hash"
_AUTH_STATE = ("SELECT id, email, tier, is_admin, disabled, session_version, created_at,"
               " (SELECT array_agg(family_id) FROM revoked_families WHERE user_id = users.id)"
               " FROM users WHERE id = $1")
_FLAGS = frozenset({"is_admin", "disabled"})
CHANNEL = "adiuva_accounts"
# The listening connection is checked this often; a check that fails turns the cache off.
HEALTH_SECONDS = 2.0
RECONNECT_SECONDS = 1.0
log = logging.getLogger(__name__)


def _count(status: str) -> int:
    """Rows affected, from asyncpg's command tag ("UPDATE 3", "DELETE 0")."""
    return int(status.rsplit(" ", 1)[-1])


def _user(row: Any) -> User:
    return User(row["id"], row["email"], row["tier"], row["is_admin"], row["disabled"], row["session_version"],
                row["created_at"], row["password_hash"])


class PostgresAccountStore:
    def __init__(self, db: PgDatabase) -> None:
        self.db = db
        self._cache: dict[str, User | None] = {}
        self._generation = 0  # moves with every notice: a read that overlapped one is not kept
        self._listening = False
        self._listener: asyncio.Task | None = None

    async def auth_state(self, user_id: str) -> User | None:
        if self._listening:
            try:
                return self._cache[user_id]
            except KeyError:
                pass
        generation = self._generation
        row = await self.db.fetchrow(_AUTH_STATE, user_id)
        user = None if row is None else User(row[0], row[1], row[2], row[3], row[4], row[5], row[6], "",
                                             frozenset(row[7] or ()))
        if self._listening and generation == self._generation:
            if len(self._cache) >= AUTH_CACHE_USERS:
                self._cache.clear()
            self._cache[user_id] = user
        return user

    # -- the cache's notices (servers only: commands read every time) ---------------------------

    async def listen(self) -> None:
        """Start keeping a cache, kept true by the change notices; until the listening connection
        is up (and whenever it is down) every call reads the database."""
        if self._listener is None:
            self._listener = asyncio.ensure_future(self._listen_forever())

    async def stop_listening(self) -> None:
        self._off()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    def _off(self) -> None:
        self._listening = False
        self._cache.clear()
        self._generation += 1

    def _notice(self, _conn: Any, _pid: int, _channel: str, user_id: str) -> None:
        self._generation += 1
        self._cache.pop(user_id, None)

    async def _listen_forever(self) -> None:
        while True:
            conn = None
            try:
                conn = await self.db.connect_listener()
                await conn.add_listener(CHANNEL, self._notice)
                conn.add_termination_listener(lambda _c: self._off())
                self._cache.clear()  # what was read before listening is not covered by notices
                self._generation += 1
                self._listening = True
                while not conn.is_closed():
                    await asyncio.sleep(HEALTH_SECONDS)
                    await asyncio.wait_for(conn.execute("SELECT 1"), HEALTH_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL gone or unreachable: read every time meanwhile
                if self._listening:
                    log.warning("account change notices lost (%s); reading accounts on every request until "
                                "they are back", type(exc).__name__)
            finally:
                self._off()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=1))
            await asyncio.sleep(RECONNECT_SECONDS)

    async def get_by_email(self, email: str) -> User | None:
        row = await self.db.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE email = $1", email)
        return None if row is None else _user(row)

    async def login_subject(self, email: str, address_tag: bytes, now: int) -> LoginSubject:
        row = await self.db.fetchrow(
            f"SELECT {_USER_COLUMNS}, throttle_generation, EXISTS (SELECT 1 FROM login_addresses"
            " WHERE user_id = users.id AND address_tag = $1 AND known_until > $2) AS known FROM users WHERE email = $3",
            address_tag, now, email)
        if row is None:
            return LoginSubject(None, 0, False)
        return LoginSubject(_user(row), row["throttle_generation"], row["known"])

    async def unlock(self, email: str) -> None:
        if not _count(await self.db.execute(
                "UPDATE users SET throttle_generation = throttle_generation + 1 WHERE email = $1", email)):
            raise errors.NotFound(f"no user with email {email}")

    async def get_by_id(self, user_id: str) -> User | None:
        row = await self.db.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1", user_id)
        return None if row is None else _user(row)

    async def list_users(self) -> list[User]:
        rows = await self.db.fetch(f"SELECT {_USER_COLUMNS} FROM users ORDER BY created_at, email")
        return [_user(r) for r in rows]

    async def create_user(self, email: str, password_hash: str, tier: str, admin: bool | None,
                          max_users: int | None = None) -> User:
        user_id = str(uuid.uuid4())
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

        async def go(conn: Any) -> bool:
            is_admin = admin
            if max_users is not None or is_admin is None:
                # Concurrent registrations that count take turns (readers do not wait); READ
                # COMMITTED: the count below sees every registration committed before the lock.
                await conn.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
                if max_users is not None and await conn.fetchval("SELECT count(*) FROM users") >= max_users:
                    raise errors.LicenseUserLimit(
                        f"this server's license allows {max_users} accounts, and all are taken; "
                        "ask the server's admin")
                if is_admin is None:
                    is_admin = not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users)")
            try:
                await conn.execute(
                    "INSERT INTO users (id, email, password_hash, tier, is_admin, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    user_id, email, password_hash, tier, bool(is_admin), created)
            except asyncpg.UniqueViolationError:
                raise errors.EmailTaken() from None
            return bool(is_admin)

        is_admin = await self.db.transaction(go)
        return User(user_id, email, tier, is_admin, False, 0, created, password_hash)

    async def update_user(self, email: str, **changes) -> User:
        return await self._update("email", email, changes, keep_an_admin=False)

    async def update_user_by_id(self, user_id: str, **changes) -> User:
        return await self._update("id", user_id, changes, keep_an_admin=True)

    async def _update(self, column: str, key: str, changes: dict, *, keep_an_admin: bool) -> User:
        allowed = {"tier", "disabled", "password_hash", "is_admin"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"unsupported changes: {sorted(set(changes) - allowed)}")
        values = [bool(v) if k in _FLAGS else v for k, v in changes.items()]
        ends_sessions = "password_hash" in changes or bool(changes.get("disabled"))
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(changes, 1))
        if ends_sessions:
            sets += ", session_version = session_version + 1"
        if "password_hash" in changes or ("disabled" in changes and not changes["disabled"]):
            # A new password or an enabled account starts with clean login throttles.
            sets += ", throttle_generation = throttle_generation + 1"
        loses_an_admin = ("is_admin" in changes and not changes["is_admin"]) or bool(changes.get("disabled"))

        async def go(conn: Any) -> User:
            if keep_an_admin and loses_an_admin:
                await self._keeps_an_admin(conn, key)
            row = await conn.fetchrow(
                f"UPDATE users SET {sets} WHERE {column} = ${len(values) + 1} RETURNING {_USER_COLUMNS}", *values, key)
            if row is None:
                raise errors.NotFound(f"no user with email {key}" if column == "email" else "no such user")
            if ends_sessions:
                await conn.execute("UPDATE refresh_tokens SET revoked = true WHERE user_id = $1", row["id"])
            if "password_hash" in changes:
                # Whoever signed in with the old password proves nothing now.
                await conn.execute("DELETE FROM login_addresses WHERE user_id = $1", row["id"])
            return _user(row)

        return await self.db.transaction(go)

    async def rehash_password(self, user_id: str, password_hash: str) -> None:
        await self.db.execute("UPDATE users SET password_hash = $1 WHERE id = $2", password_hash, user_id)

    async def delete_user(self, email: str) -> None:
        # Every row the user owns goes with it (ON DELETE CASCADE).
        if not _count(await self.db.execute("DELETE FROM users WHERE email = $1", email)):
            raise errors.NotFound(f"no user with email {email}")

    # -- sessions -----------------------------------------------------------------------------

    async def start_session(self, user_id: str, token_hash: bytes, family_id: str, now: int, expires_at: int,
                            address_tag: bytes | None = None) -> None:
        async def go(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, family_id, user_id, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
                token_hash, family_id, user_id, now, expires_at)
            if address_tag is not None:
                await conn.execute(
                    "INSERT INTO login_addresses (user_id, address_tag, known_until) VALUES ($1, $2, $3)"
                    " ON CONFLICT (user_id, address_tag) DO UPDATE SET known_until = excluded.known_until",
                    user_id, address_tag, expires_at)

        await self.db.transaction(go)

    async def rotate_session(self, old_hash: bytes, new_hash: bytes, now: int, expires_at: int, *,
                             grace_seconds: int, revoke_until: int) -> Rotated:
        # Unknown tokens (garbage, guesses) are answered from one primary-key read.
        owner = await self.db.fetchval("SELECT user_id FROM refresh_tokens WHERE token_hash = $1", old_hash)
        if owner is None:
            return Rotated(Rotation.UNKNOWN)

        async def go(conn: Any) -> Rotated:
            # The user's row, then the token's: the order every writer of both takes (a disable
            # or a deletion locks the user, then its tokens), so none of them deadlock.
            user_row = await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1 FOR SHARE", owner)
            token = await conn.fetchrow(
                "SELECT family_id, user_id, expires_at, used_at, revoked FROM refresh_tokens WHERE token_hash = $1"
                " FOR UPDATE", old_hash)
            if token is None or user_row is None:
                return Rotated(Rotation.UNKNOWN)
            family, user_id = token["family_id"], token["user_id"]
            user = None if user_row["disabled"] else _user(user_row)
            if token["used_at"] is not None or token["revoked"]:
                if not token["revoked"] and now < token["used_at"] + grace_seconds:
                    # A new statement: it sees the successor the rotation we waited for committed.
                    successor = await conn.fetchrow(
                        "SELECT used_at, revoked FROM refresh_tokens WHERE token_hash = $1 AND family_id = $2",
                        new_hash, family)
                    if successor is not None and successor["used_at"] is None and not successor["revoked"]:
                        return Rotated(Rotation.RETRIED, user, family) if user else Rotated(Rotation.USER_INACTIVE)
                # Reuse: the token was stolen or replayed. End the family, and its access tokens.
                await conn.execute("UPDATE refresh_tokens SET revoked = true WHERE family_id = $1", family)
                await conn.execute(
                    "INSERT INTO revoked_families (family_id, user_id, until) VALUES ($1, $2, $3)"
                    " ON CONFLICT (family_id) DO UPDATE SET until = greatest(revoked_families.until, excluded.until)",
                    family, user_id, revoke_until)
                return Rotated(Rotation.REUSED)
            if token["expires_at"] <= now:
                return Rotated(Rotation.EXPIRED)
            if user is None:
                return Rotated(Rotation.USER_INACTIVE)
            await conn.execute("UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2", now, old_hash)
            await conn.execute(
                "INSERT INTO refresh_tokens (token_hash, family_id, user_id, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
                new_hash, family, user_id, now, expires_at)
            return Rotated(Rotation.ROTATED, user, family)

        return await self.db.transaction(go)

    async def purge_expired_sessions(self, now: int) -> int:
        # Used tokens are kept until they expire: that is what makes reuse detectable.
        async def go(conn: Any) -> int:
            purged = _count(await conn.execute("DELETE FROM refresh_tokens WHERE expires_at <= $1", now))
            await conn.execute("DELETE FROM login_addresses WHERE known_until <= $1", now)
            await conn.execute("DELETE FROM revoked_families WHERE until <= $1", now)
            return purged

        return await self.db.transaction(go)

    # -- admin (the admin API and `adiuva user delete`) ----------------------------------------

    @staticmethod
    async def _keeps_an_admin(conn: Any, user_id: str) -> None:
        """Inside the transaction: lock every active admin's row (id order), then refuse when
        `user_id` is the only one. A concurrent demotion waits here, and READ COMMITTED
        re-checks each row it waited for: an admin the first demoted is no longer counted."""
        admins = {r[0] for r in await conn.fetch(
            "SELECT id FROM users WHERE is_admin AND NOT disabled ORDER BY id FOR UPDATE")}
        if user_id in admins and len(admins) == 1:
            raise errors.LastAdmin("this is the server's only active admin; make another account admin first")

    async def delete_user_by_id(self, user_id: str, inside: Callable[[Any, str], Awaitable[T]] | None = None,
                                *, keep_an_admin: bool = True) -> T | None:
        """`inside(conn, user_id)` gets the transaction's asyncpg connection; it may run more
        than once (the transaction is retried on a deadlock), so it must only touch the database."""
        async def go(conn: Any) -> T | None:
            if keep_an_admin:
                await self._keeps_an_admin(conn, user_id)
            result = await inside(conn, user_id) if inside is not None else None
            # Every row the user owns goes with it (ON DELETE CASCADE).
            if not _count(await conn.execute("DELETE FROM users WHERE id = $1", user_id)):
                raise errors.NotFound("no such user")
            return result

        return await self.db.transaction(go)
