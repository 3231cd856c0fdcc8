"""The PostgreSQL implementation of MarketplaceStore (migration postgres/0005), for many
servers on one database. Each write is one `transaction(fn)` of the façade (READ COMMITTED):

- installs and ratings are single upserts on their primary keys (a second, concurrent install
  of the same user waits for the first and then changes nothing); the counters are kept by
  triggers whose UPDATE of the plugin's row takes its row lock, so concurrent increments from
  any number of nodes serialise and none is lost;
- the catalog's writes (submissions, decisions, the bundled import) are rare and their rules
  read several rows, so they take one transaction-scoped advisory lock and see each other's
  commits: the rules are exact across nodes, as SQLite's single writer makes them there.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from typing import Any

import asyncpg

from adiuva_server import errors
from adiuva_server.db.postgres import PgDatabase
from adiuva_server.marketplace import revenue
from adiuva_server.marketplace.checks import Failure, semver_key
from adiuva_server.marketplace.signing import SigningKey
from adiuva_server.marketplace.sqlite import _PLUGIN_COLUMNS, _VERSION_COLUMNS, _catalog_values, _like, _plugin, _version
from adiuva_server.marketplace.store import (
    Installation, NewVersion, PackageBytes, Plugin, PluginNotInstalled, Review, UserView, Version, catalog_failures,
)

# pg_advisory_xact_lock key of the catalog's writes (beside db/postgres's own keys).
CATALOG_LOCK = 0x0AD1_0005
_ORDER = {
    "rating": 'rating_count = 0, rating_sum::float8 / GREATEST(rating_count, 1) DESC, rating_count DESC, '
              'name_key COLLATE "C", id COLLATE "C"',
    "installs": 'install_count DESC, name_key COLLATE "C", id COLLATE "C"',
    "newest": 'listed_at COLLATE "C" DESC, id COLLATE "C"',
}
_INSTALLATION = ("SELECT i.plugin_id, p.name, p.version, i.state, p.status = 'revoked', i.price_cents, i.currency, "
                 "i.payment_state, i.installed_at FROM plugin_installs i JOIN plugins p ON p.id = i.plugin_id")


def _installation(r: Any) -> Installation:
    return Installation(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], r[8])


def _changed(status: str) -> int:
    """Rows changed, from asyncpg's command tag ("UPDATE 1", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresMarketplaceStore(revenue.RevenueMethods):
    def __init__(self, db: PgDatabase) -> None:
        self.db = db

    # -- reads ----------------------------------------------------------------------------------

    async def browse(self, *, category: str | None, q: str | None, sort: str, offset: int,
                     limit: int) -> tuple[list[Plugin], int]:
        where, params = ["status = 'approved'"], []
        if category:
            params.append(category)
            where.append(f"lower(category) = lower(${len(params)})")
        if q:
            params.append(_like(q))
            n = len(params)
            where.append(f"(name ILIKE ${n} ESCAPE '\\' OR description ILIKE ${n} ESCAPE '\\' OR author ILIKE ${n} ESCAPE '\\')")
        sql_where = " AND ".join(where)

        async def read(conn: asyncpg.Connection) -> tuple[list[Plugin], int]:
            n = len(params)
            rows = await conn.fetch(f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE {sql_where} ORDER BY {_ORDER[sort]} "
                                    f"LIMIT ${n + 1} OFFSET ${n + 2}", *params, limit, offset)
            total = await conn.fetchval(f"SELECT count(*) FROM plugins WHERE {sql_where}", *params)
            return [_plugin(r) for r in rows], total

        return await self.db.transaction(read, readonly=True)

    async def plugin(self, plugin_id: str) -> Plugin | None:
        row = await self.db.fetchrow(f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE id = $1", plugin_id)
        return None if row is None else _plugin(row)

    async def user_view(self, user_id: str, plugin_id: str) -> UserView:
        row = await self.db.fetchrow(
            "SELECT (SELECT state FROM plugin_installs WHERE user_id = $1 AND plugin_id = $2) AS state, "
            "(SELECT stars FROM plugin_ratings WHERE user_id = $1 AND plugin_id = $2) AS stars", user_id, plugin_id)
        return UserView(row["state"] == "installed", row["stars"])

    async def versions(self, plugin_id: str) -> list[Version]:
        rows = await self.db.fetch(f"SELECT {_VERSION_COLUMNS} FROM plugin_versions WHERE plugin_id = $1 "
                                   'ORDER BY submitted_at COLLATE "C", id', plugin_id)
        return [_version(r) for r in rows]

    async def reviews(self, plugin_id: str) -> list[Review]:
        rows = await self.db.fetch("SELECT plugin_id, version, decision, reviewer, notes, decided_at "
                                   "FROM plugin_reviews WHERE plugin_id = $1 ORDER BY seq", plugin_id)
        return [Review(*r) for r in rows]

    async def pending(self) -> list[Version]:
        rows = await self.db.fetch(f"SELECT {_VERSION_COLUMNS} FROM plugin_versions WHERE status = 'pending_review' "
                                   'ORDER BY submitted_at COLLATE "C", id')
        return [_version(r) for r in rows]

    async def submissions_of(self, user_id: str) -> list[Version]:
        rows = await self.db.fetch(f"SELECT {_VERSION_COLUMNS} FROM plugin_versions WHERE submitted_by = $1 "
                                   'ORDER BY submitted_at COLLATE "C", id', user_id)
        return [_version(r) for r in rows]

    async def installed(self, user_id: str) -> list[Installation]:
        rows = await self.db.fetch(f"{_INSTALLATION} WHERE i.user_id = $1 AND i.state != 'uninstalled' "
                                   'ORDER BY i.installed_at COLLATE "C", i.plugin_id COLLATE "C"', user_id)
        return [_installation(r) for r in rows]

    async def package(self, plugin_id: str) -> PackageBytes | None:
        row = await self.db.fetchrow(
            "SELECT v.plugin_id, v.version, v.package, v.checksum, v.signature, v.key_id FROM plugins p "
            "JOIN plugin_versions v ON v.plugin_id = p.id AND v.version = p.version AND v.status = 'approved' "
            "WHERE p.id = $1 AND p.status = 'approved'", plugin_id)
        return None if row is None else PackageBytes(row[0], row[1], bytes(row[2]), row[3], row[4], row[5])

    # -- submissions and reviews ----------------------------------------------------------------

    async def submission_failures(self, new: NewVersion) -> list[Failure]:
        return await self.db.transaction(lambda conn: _catalog_failures(conn, new), readonly=True)

    async def add_submission(self, new: NewVersion) -> list[Failure]:
        m = new.manifest

        async def write(conn: asyncpg.Connection) -> list[Failure]:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CATALOG_LOCK)
            failures = await _catalog_failures(conn, new)
            if failures:
                return failures
            await conn.execute(
                "INSERT INTO plugins (id, name, name_key, description, author, category, price_cents, currency, "
                "permissions, owner_id, status, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'unlisted', $11) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, name_key = excluded.name_key, "
                "description = excluded.description, author = excluded.author, category = excluded.category, "
                "price_cents = excluded.price_cents, currency = excluded.currency, permissions = excluded.permissions "
                "WHERE plugins.status = 'unlisted'", m["id"], *_catalog_values(m), new.owner_id, new.now)
            await _insert_version(conn, new, "pending_review")
            return []

        return await self.db.transaction(write)

    async def approve(self, plugin_id: str, version: str, signature: str, key_id: str, reviewer: str,
                      notes: str, now: str) -> Version:
        async def write(conn: asyncpg.Connection) -> Version:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CATALOG_LOCK)
            row = await conn.fetchrow(
                "UPDATE plugin_versions SET status = 'approved', signature = $1, key_id = $2, reviewer = $3, notes = $4, "
                f"reviewed_at = $5 WHERE plugin_id = $6 AND version = $7 AND status = 'pending_review' "
                f"RETURNING {_VERSION_COLUMNS}", signature, key_id, reviewer, notes, now, plugin_id, version)
            if row is None:
                raise errors.Conflict(f"{plugin_id} {version} is no longer waiting for review")
            manifest = json.loads(row["manifest"])
            try:
                status = await conn.execute(
                    "UPDATE plugins SET name = $1, name_key = $2, description = $3, author = $4, category = $5, "
                    "price_cents = $6, currency = $7, permissions = $8, version = $9, status = 'approved', "
                    "listed_at = COALESCE(listed_at, $10) WHERE id = $11 AND status != 'revoked'",
                    *_catalog_values(manifest), version, now, plugin_id)
            except asyncpg.UniqueViolationError:
                raise errors.Conflict(f"another plugin is now called {manifest['name']!r}") from None
            if _changed(status) != 1:
                raise errors.Conflict(f"{plugin_id} has been revoked")
            await _log(conn, plugin_id, version, "approved", reviewer, notes, now)
            return _version(row)

        return await self.db.transaction(write)

    async def reject(self, plugin_id: str, reviewer: str, reason: str, now: str) -> Version:
        async def write(conn: asyncpg.Connection) -> Version:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CATALOG_LOCK)
            row = await conn.fetchrow(
                "UPDATE plugin_versions SET status = 'rejected', reviewer = $1, notes = $2, reviewed_at = $3 "
                f"WHERE plugin_id = $4 AND status = 'pending_review' RETURNING {_VERSION_COLUMNS}",
                reviewer, reason, now, plugin_id)
            if row is None:
                raise errors.NotFound(f"no version of {plugin_id} is waiting for review")
            await _log(conn, plugin_id, row["version"], "rejected", reviewer, reason, now)
            return _version(row)

        return await self.db.transaction(write)

    async def revoke(self, plugin_id: str, reviewer: str, notes: str, now: str) -> Plugin:
        async def write(conn: asyncpg.Connection) -> Plugin:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CATALOG_LOCK)
            row = await conn.fetchrow(f"UPDATE plugins SET status = 'revoked' WHERE id = $1 AND status != 'revoked' "
                                      f"RETURNING {_PLUGIN_COLUMNS}", plugin_id)
            if row is None:
                exists = await conn.fetchval("SELECT 1 FROM plugins WHERE id = $1", plugin_id)
                raise errors.Conflict(f"{plugin_id} is already revoked") if exists else errors.NotFound("no such plugin")
            await conn.execute("UPDATE plugin_versions SET status = 'rejected', reviewer = $1, notes = 'plugin revoked', "
                               "reviewed_at = $2 WHERE plugin_id = $3 AND status = 'pending_review'", reviewer, now, plugin_id)
            await _log(conn, plugin_id, row["version"], "revoked", reviewer, notes, now)
            return _plugin(row)

        return await self.db.transaction(write)

    async def import_bundled(self, new: NewVersion, signature: str, key_id: str) -> bool:
        m = new.manifest

        async def write(conn: asyncpg.Connection) -> bool:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CATALOG_LOCK)
            row = await conn.fetchrow("SELECT status, version FROM plugins WHERE id = $1", m["id"])
            if row is not None and (row["status"] == "revoked" or (
                    row["version"] is not None and semver_key(row["version"]) >= semver_key(m["version"]))):
                return False
            if await conn.fetchval("SELECT 1 FROM plugin_versions WHERE plugin_id = $1 AND version = $2 "
                                   "AND status != 'rejected'", m["id"], m["version"]):
                return False
            if row is None:
                await conn.execute(
                    "INSERT INTO plugins (id, name, name_key, description, author, category, price_cents, currency, "
                    "permissions, owner_id, status, bundled, version, created_at, listed_at) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, 'approved', 1, $10, $11, $11)",
                    m["id"], *_catalog_values(m), m["version"], new.now)
            else:
                await conn.execute(
                    "UPDATE plugins SET name = $1, name_key = $2, description = $3, author = $4, category = $5, "
                    "price_cents = $6, currency = $7, permissions = $8, version = $9, status = 'approved', bundled = 1, "
                    "listed_at = COALESCE(listed_at, $10) WHERE id = $11",
                    *_catalog_values(m), m["version"], new.now, m["id"])
            await _insert_version(conn, new, "approved", signature=signature, key_id=key_id, reviewer="bundled",
                                  notes="shipped with the server")
            await _log(conn, m["id"], m["version"], "approved", "bundled", "shipped with the server", new.now)
            return True

        return await self.db.transaction(write)

    # -- installs and ratings -------------------------------------------------------------------

    async def install(self, user_id: str, plugin_id: str, now: str, *, max_price_cents: int = 0,
                      payment_state: str = "free") -> Installation | None:
        async def write(conn: asyncpg.Connection) -> Installation | None:
            await conn.execute(
                "INSERT INTO plugin_installs (user_id, plugin_id, state, price_cents, currency, payment_state, "
                "first_installed_at, installed_at) SELECT $1, id, 'installed', price_cents, currency, $2, $3, $3 "
                "FROM plugins WHERE id = $4 AND status = 'approved' AND price_cents <= $5 "
                "ON CONFLICT (user_id, plugin_id) DO UPDATE SET state = 'installed', installed_at = excluded.installed_at, "
                "uninstalled_at = NULL WHERE plugin_installs.state = 'uninstalled'",
                user_id, payment_state, now, plugin_id, max_price_cents)
            row = await conn.fetchrow(f"{_INSTALLATION} WHERE i.user_id = $1 AND i.plugin_id = $2 "
                                      "AND p.status = 'approved' AND i.state = 'installed'", user_id, plugin_id)
            return None if row is None else _installation(row)

        return await self.db.transaction(write)

    async def uninstall(self, user_id: str, plugin_id: str, now: str) -> bool:
        async def write(conn: asyncpg.Connection) -> bool:
            if not await conn.fetchval("SELECT 1 FROM plugins WHERE id = $1", plugin_id):
                return False
            await conn.execute("UPDATE plugin_installs SET state = 'uninstalled', uninstalled_at = $1 "
                               "WHERE user_id = $2 AND plugin_id = $3 AND state = 'installed'", now, user_id, plugin_id)
            return True

        return await self.db.transaction(write)

    async def rate(self, user_id: str, plugin_id: str, stars: int, now: str) -> Plugin:
        async def write(conn: asyncpg.Connection) -> tuple[int, Any]:
            status = await conn.execute(
                "INSERT INTO plugin_ratings (plugin_id, user_id, stars, rated_at) SELECT p.id, $1, $2, $3 FROM plugins p "
                "WHERE p.id = $4 AND p.status = 'approved' AND EXISTS (SELECT 1 FROM plugin_installs i "
                "WHERE i.user_id = $1 AND i.plugin_id = p.id AND i.state != 'awaiting_payment') "
                "ON CONFLICT (plugin_id, user_id) DO UPDATE SET stars = excluded.stars, rated_at = excluded.rated_at",
                user_id, stars, now, plugin_id)
            return _changed(status), await conn.fetchrow(f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE id = $1", plugin_id)

        changed, row = await self.db.transaction(write)
        if row is None or row["status"] != "approved":
            raise errors.NotFound("no such plugin")
        if changed != 1:
            raise PluginNotInstalled("rate a plugin you have installed")
        return _plugin(row)

    async def signing_key(self, candidate: SigningKey, now: str) -> SigningKey:
        async def write(conn: asyncpg.Connection) -> Any:
            await conn.execute("INSERT INTO plugin_signing_key (singleton, key_id, private_key, public_key, created_at) "
                               "VALUES (1, $1, $2, $3, $4) ON CONFLICT (singleton) DO NOTHING",
                               candidate.key_id, candidate.private_raw, candidate.public_raw, now)
            return await conn.fetchrow("SELECT key_id, private_key, public_key FROM plugin_signing_key")

        row = await self.db.fetchrow("SELECT key_id, private_key, public_key FROM plugin_signing_key")
        if row is None:
            row = await self.db.transaction(write)
        return SigningKey(row[0], bytes(row[1]), bytes(row[2]))


    # -- paid plugins (revenue.py holds the rules, written once for both backends) --------------

    async def _write(self, fn, *args: Any, **kwargs: Any) -> Any:
        return await self.db.transaction(lambda conn: fn(_Tx(conn), *args, **kwargs))

    async def _read(self, fn, *args: Any, **kwargs: Any) -> Any:
        return await self.db.transaction(lambda conn: fn(_Tx(conn), *args, **kwargs), readonly=True)


async def _catalog_failures(conn: asyncpg.Connection, new: NewVersion) -> list[Failure]:
    m = new.manifest
    plugin = await conn.fetchrow("SELECT owner_id, status, version FROM plugins WHERE id = $1", m["id"])
    pending = await conn.fetchval("SELECT version FROM plugin_versions WHERE plugin_id = $1 AND status = 'pending_review'",
                                  m["id"])
    approved = await conn.fetchval("SELECT 1 FROM plugin_versions WHERE plugin_id = $1 AND version = $2 "
                                   "AND status = 'approved'", m["id"], m["version"])
    taken = await conn.fetchval("SELECT 1 FROM plugins WHERE name_key = $1 AND id != $2", m["name"].lower(), m["id"])
    return catalog_failures(new, plugin, pending, approved is not None, taken is not None)


async def _insert_version(conn: asyncpg.Connection, new: NewVersion, status: str, *, signature: str | None = None,
                          key_id: str | None = None, reviewer: str | None = None, notes: str | None = None) -> None:
    await conn.execute(
        f"INSERT INTO plugin_versions ({_VERSION_COLUMNS}, package) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        new.submission_id, new.manifest["id"], new.manifest["version"], status, json.dumps(new.manifest),
        new.checksum, len(new.package), signature, key_id, new.submitted_by, new.now, reviewer, notes,
        new.now if reviewer else None, new.package)


async def _log(conn: asyncpg.Connection, plugin_id: str, version: str | None, decision: str, reviewer: str,
               notes: str, now: str) -> None:
    await conn.execute("INSERT INTO plugin_reviews (plugin_id, version, decision, reviewer, notes, decided_at) "
                       "VALUES ($1, $2, $3, $4, $5, $6)", plugin_id, version, decision, reviewer, notes or "", now)


class _Tx:
    """revenue.Tx on an asyncpg connection in a transaction: `?` placeholders become `$n`, and
    the rows a transaction reads to change are locked (READ COMMITTED would let two nodes both
    read the old state)."""

    lock = " FOR UPDATE"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @staticmethod
    @functools.lru_cache(maxsize=128)
    def _sql(sql: str) -> str:
        numbers = itertools.count(1)
        return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)

    async def row(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchrow(self._sql(sql), *args)

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        return await self.conn.fetch(self._sql(sql), *args)

    async def run(self, sql: str, *args: Any) -> int:
        return _changed(await self.conn.execute(self._sql(sql), *args))

