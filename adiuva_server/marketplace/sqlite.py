"""The SQLite implementation of MarketplaceStore (migration 0012). Counters are kept by the
schema's triggers; every write is one BEGIN IMMEDIATE transaction on the writer."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import sqlean

from adiuva_server import errors
from adiuva_server.db import Database
from adiuva_server.marketplace import revenue
from adiuva_server.marketplace.checks import Failure, semver_key
from adiuva_server.marketplace.signing import SigningKey
from adiuva_server.marketplace.store import (
    Installation, NewVersion, PackageBytes, Plugin, PluginNotInstalled, Review, UserView, Version, catalog_failures,
)

_PLUGIN_COLUMNS = ("id, name, status, version, description, author, category, price_cents, currency, permissions, "
                   "bundled, install_count, rating_count, rating_sum, owner_id, created_at, listed_at")
_VERSION_COLUMNS = ("id, plugin_id, version, status, manifest, checksum, size_bytes, signature, key_id, submitted_by, "
                    "submitted_at, reviewer, notes, reviewed_at")
_ORDER = {
    # Unrated plugins after rated ones; ties by name, then id, so pages never overlap.
    "rating": "rating_count = 0, CAST(rating_sum AS REAL) / MAX(rating_count, 1) DESC, rating_count DESC, name_key, id",
    "installs": "install_count DESC, name_key, id",
    "newest": "listed_at DESC, id",
}


def _plugin(row: Any) -> Plugin:
    return Plugin(row["id"], row["name"], row["status"], row["version"], row["description"], row["author"],
                  row["category"], row["price_cents"], row["currency"], json.loads(row["permissions"]),
                  bool(row["bundled"]), row["install_count"], row["rating_count"], row["rating_sum"], row["owner_id"],
                  row["created_at"], row["listed_at"])


def _version(row: Any) -> Version:
    return Version(row["id"], row["plugin_id"], row["version"], row["status"], json.loads(row["manifest"]),
                   row["checksum"], row["size_bytes"], row["signature"], row["key_id"], row["submitted_by"],
                   row["submitted_at"], row["reviewer"], row["notes"], row["reviewed_at"])


def _like(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _catalog_values(m: dict[str, Any]) -> tuple:
    return (m["name"], m["name"].lower(), m["description"], m["author"], m["category"], m["price_cents"],
            m["currency"], json.dumps(m["permissions"]))


# Catalog pages kept in memory, each with the commit marker it was read under (see browse).
PAGE_CACHE_ENTRIES = 256


class SQLiteMarketplaceStore(revenue.RevenueMethods):
    def __init__(self, db: Database) -> None:
        self.db = db
        self._pages: OrderedDict[tuple, tuple[object, tuple[list[Plugin], int]]] = OrderedDict()

    # -- reads ----------------------------------------------------------------------------------

    async def browse(self, *, category: str | None, q: str | None, sort: str, offset: int,
                     limit: int) -> tuple[list[Plugin], int]:
        where, params = ["status = 'approved'"], []
        if category:
            where.append("category = ? COLLATE NOCASE")
            params.append(category)
        if q:
            where.append("(name LIKE ? ESCAPE '\\' OR description LIKE ? ESCAPE '\\' OR author LIKE ? ESCAPE '\\')")
            params += [_like(q)] * 3
        sql_where = " AND ".join(where)

        def read(conn: Any) -> tuple[list[Plugin], int]:
            conn.execute("BEGIN")  # the page and the total from one snapshot
            rows = conn.execute(f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE {sql_where} ORDER BY {_ORDER[sort]} "
                                "LIMIT ? OFFSET ?", (*params, limit, offset)).fetchall()
            (total,) = conn.execute(f"SELECT count(*) FROM plugins WHERE {sql_where}", params).fetchone()
            return [_plugin(r) for r in rows], total

        # Browsing is most of the catalog's traffic and changes rarely: a page read under the
        # current commit marker is still exact (nobody, this server, the CLI or another process,
        # has committed since), so it is answered without a thread hand-off. The marker is read
        # before the page, so a commit racing the read only costs a re-read next time.
        key = (category.lower() if category else None, q, sort, offset, limit)
        marker = self.db.commit_marker()
        hit = self._pages.get(key)
        if hit is not None and hit[0] == marker:
            self._pages.move_to_end(key)
            return hit[1]
        page = await self.db.run_read(read)
        self._pages[key] = (marker, page)
        self._pages.move_to_end(key)
        while len(self._pages) > PAGE_CACHE_ENTRIES:
            self._pages.popitem(last=False)
        return page

    async def plugin(self, plugin_id: str) -> Plugin | None:
        row = await self.db.fetchone(f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE id = ?", (plugin_id,))
        return None if row is None else _plugin(row)

    async def user_view(self, user_id: str, plugin_id: str) -> UserView:
        row = await self.db.fetchone(
            "SELECT (SELECT state FROM plugin_installs WHERE user_id = ? AND plugin_id = ?) AS state, "
            "(SELECT stars FROM plugin_ratings WHERE user_id = ? AND plugin_id = ?) AS stars",
            (user_id, plugin_id, user_id, plugin_id))
        return UserView(row["state"] == "installed", row["stars"])

    async def versions(self, plugin_id: str) -> list[Version]:
        rows = await self.db.fetchall(f"SELECT {_VERSION_COLUMNS} FROM plugin_versions WHERE plugin_id = ? "
                                      "ORDER BY submitted_at, rowid", (plugin_id,))
        return [_version(r) for r in rows]

    async def reviews(self, plugin_id: str) -> list[Review]:
        rows = await self.db.fetchall("SELECT plugin_id, version, decision, reviewer, notes, decided_at "
                                      "FROM plugin_reviews WHERE plugin_id = ? ORDER BY seq", (plugin_id,))
        return [Review(*r) for r in rows]

    async def pending(self) -> list[Version]:
        rows = await self.db.fetchall(f"SELECT {_VERSION_COLUMNS} FROM plugin_versions "
                                      "WHERE status = 'pending_review' ORDER BY submitted_at, rowid")
        return [_version(r) for r in rows]

    async def submissions_of(self, user_id: str) -> list[Version]:
        rows = await self.db.fetchall(f"SELECT {_VERSION_COLUMNS} FROM plugin_versions WHERE submitted_by = ? "
                                      "ORDER BY submitted_at, rowid", (user_id,))
        return [_version(r) for r in rows]

    async def installed(self, user_id: str) -> list[Installation]:
        rows = await self.db.fetchall(
            "SELECT i.plugin_id, p.name, p.version, i.state, p.status = 'revoked' AS revoked, i.price_cents, "
            "i.currency, i.payment_state, i.installed_at FROM plugin_installs i JOIN plugins p ON p.id = i.plugin_id "
            "WHERE i.user_id = ? AND i.state != 'uninstalled' ORDER BY i.installed_at, i.plugin_id", (user_id,))
        return [Installation(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], r[8]) for r in rows]

    async def package(self, plugin_id: str) -> PackageBytes | None:
        row = await self.db.fetchone(
            "SELECT v.plugin_id, v.version, v.package, v.checksum, v.signature, v.key_id FROM plugins p "
            "JOIN plugin_versions v ON v.plugin_id = p.id AND v.version = p.version AND v.status = 'approved' "
            "WHERE p.id = ? AND p.status = 'approved'", (plugin_id,))
        return None if row is None else PackageBytes(row[0], row[1], bytes(row[2]), row[3], row[4], row[5])

    # -- submissions and reviews ----------------------------------------------------------------

    async def submission_failures(self, new: NewVersion) -> list[Failure]:
        async with self.db.reader() as conn:
            return await _catalog_failures(conn, new)

    async def add_submission(self, new: NewVersion) -> list[Failure]:
        m = new.manifest
        async with self.db.write() as conn:
            failures = await _catalog_failures(conn, new)
            if failures:
                return failures
            # The first submission of an id reserves it (and its name) for its developer.
            await conn.execute(
                "INSERT INTO plugins (id, name, name_key, description, author, category, price_cents, currency, "
                "permissions, owner_id, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'unlisted', ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, name_key = excluded.name_key, "
                "description = excluded.description, author = excluded.author, category = excluded.category, "
                "price_cents = excluded.price_cents, currency = excluded.currency, permissions = excluded.permissions "
                "WHERE plugins.status = 'unlisted'", (m["id"], *_catalog_values(m), new.owner_id, new.now))
            await _insert_version(conn, new, "pending_review")
        return []

    async def approve(self, plugin_id: str, version: str, signature: str, key_id: str, reviewer: str,
                      notes: str, now: str) -> Version:
        async with self.db.write() as conn:
            cur = await conn.execute(
                "UPDATE plugin_versions SET status = 'approved', signature = ?, key_id = ?, reviewer = ?, notes = ?, "
                "reviewed_at = ? WHERE plugin_id = ? AND version = ? AND status = 'pending_review'",
                (signature, key_id, reviewer, notes, now, plugin_id, version))
            if cur.rowcount != 1:
                raise errors.Conflict(f"{plugin_id} {version} is no longer waiting for review")
            async with conn.execute("SELECT manifest FROM plugin_versions WHERE plugin_id = ? AND version = ? "
                                    "AND status = 'approved'", (plugin_id, version)) as c:
                manifest = json.loads((await c.fetchone())[0])
            try:
                cur = await conn.execute(
                    "UPDATE plugins SET name = ?, name_key = ?, description = ?, author = ?, category = ?, "
                    "price_cents = ?, currency = ?, permissions = ?, version = ?, status = 'approved', "
                    "listed_at = COALESCE(listed_at, ?) WHERE id = ? AND status != 'revoked'",
                    (*_catalog_values(manifest), version, now, plugin_id))
            except sqlean.IntegrityError:
                raise errors.Conflict(f"another plugin is now called {manifest['name']!r}") from None
            if cur.rowcount != 1:
                raise errors.Conflict(f"{plugin_id} has been revoked")
            await _log(conn, plugin_id, version, "approved", reviewer, notes, now)
            async with conn.execute(f"SELECT {_VERSION_COLUMNS} FROM plugin_versions WHERE plugin_id = ? "
                                    "AND version = ? AND status = 'approved'", (plugin_id, version)) as c:
                return _version(await c.fetchone())

    async def reject(self, plugin_id: str, reviewer: str, reason: str, now: str) -> Version:
        async with self.db.write() as conn:
            async with conn.execute(f"SELECT {_VERSION_COLUMNS} FROM plugin_versions WHERE plugin_id = ? "
                                    "AND status = 'pending_review'", (plugin_id,)) as c:
                row = await c.fetchone()
            if row is None:
                raise errors.NotFound(f"no version of {plugin_id} is waiting for review")
            await conn.execute("UPDATE plugin_versions SET status = 'rejected', reviewer = ?, notes = ?, "
                               "reviewed_at = ? WHERE id = ?", (reviewer, reason, now, row["id"]))
            await _log(conn, plugin_id, row["version"], "rejected", reviewer, reason, now)
            async with conn.execute(f"SELECT {_VERSION_COLUMNS} FROM plugin_versions WHERE id = ?", (row["id"],)) as c:
                return _version(await c.fetchone())

    async def revoke(self, plugin_id: str, reviewer: str, notes: str, now: str) -> Plugin:
        async with self.db.write() as conn:
            cur = await conn.execute("UPDATE plugins SET status = 'revoked' WHERE id = ? AND status != 'revoked'",
                                     (plugin_id,))
            if cur.rowcount != 1:
                async with conn.execute("SELECT 1 FROM plugins WHERE id = ?", (plugin_id,)) as c:
                    exists = await c.fetchone()
                raise errors.Conflict(f"{plugin_id} is already revoked") if exists else errors.NotFound("no such plugin")
            async with conn.execute("SELECT version FROM plugins WHERE id = ?", (plugin_id,)) as c:
                (version,) = await c.fetchone()
            await conn.execute("UPDATE plugin_versions SET status = 'rejected', reviewer = ?, notes = 'plugin revoked', "
                               "reviewed_at = ? WHERE plugin_id = ? AND status = 'pending_review'",
                               (reviewer, now, plugin_id))
            await _log(conn, plugin_id, version, "revoked", reviewer, notes, now)
            async with conn.execute(f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE id = ?", (plugin_id,)) as c:
                return _plugin(await c.fetchone())

    async def import_bundled(self, new: NewVersion, signature: str, key_id: str) -> bool:
        m = new.manifest
        async with self.db.write() as conn:
            async with conn.execute("SELECT status, version FROM plugins WHERE id = ?", (m["id"],)) as c:
                row = await c.fetchone()
            if row is not None and (row["status"] == "revoked" or (
                    row["version"] is not None and semver_key(row["version"]) >= semver_key(m["version"]))):
                return False
            async with conn.execute("SELECT 1 FROM plugin_versions WHERE plugin_id = ? AND version = ? "
                                    "AND status != 'rejected'", (m["id"], m["version"])) as c:
                if await c.fetchone() is not None:
                    return False  # that version was submitted by hand and waits for review
            if row is None:
                await conn.execute(
                    "INSERT INTO plugins (id, name, name_key, description, author, category, price_cents, currency, "
                    "permissions, owner_id, status, bundled, version, created_at, listed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 'approved', 1, ?, ?, ?)",
                    (m["id"], *_catalog_values(m), m["version"], new.now, new.now))
            else:  # an upgrade of the server brought a newer version: counts and ratings stay
                await conn.execute(
                    "UPDATE plugins SET name = ?, name_key = ?, description = ?, author = ?, category = ?, "
                    "price_cents = ?, currency = ?, permissions = ?, version = ?, status = 'approved', bundled = 1, "
                    "listed_at = COALESCE(listed_at, ?) WHERE id = ?",
                    (*_catalog_values(m), m["version"], new.now, m["id"]))
            await _insert_version(conn, new, "approved", signature=signature, key_id=key_id, reviewer="bundled",
                                  notes="shipped with the server")
            await _log(conn, m["id"], m["version"], "approved", "bundled", "shipped with the server", new.now)
        return True

    # -- installs and ratings -------------------------------------------------------------------

    async def install(self, user_id: str, plugin_id: str, now: str, *, max_price_cents: int = 0,
                      payment_state: str = "free") -> Installation | None:
        async with self.db.write() as conn:
            # One statement: the plugin is listed and cheap enough at this instant, and a second
            # (or concurrent) install of the same user finds its row and changes nothing.
            await conn.execute(
                "INSERT INTO plugin_installs (user_id, plugin_id, state, price_cents, currency, payment_state, "
                "first_installed_at, installed_at) SELECT ?, id, 'installed', price_cents, currency, ?, ?, ? "
                "FROM plugins WHERE id = ? AND status = 'approved' AND price_cents <= ? "
                "ON CONFLICT (user_id, plugin_id) DO UPDATE SET state = 'installed', installed_at = excluded.installed_at, "
                "uninstalled_at = NULL WHERE plugin_installs.state = 'uninstalled'",
                (user_id, payment_state, now, now, plugin_id, max_price_cents))
            async with conn.execute(
                "SELECT i.plugin_id, p.name, p.version, i.state, p.status = 'revoked', i.price_cents, i.currency, "
                "i.payment_state, i.installed_at FROM plugin_installs i JOIN plugins p ON p.id = i.plugin_id "
                "WHERE i.user_id = ? AND i.plugin_id = ? AND p.status = 'approved' AND i.state = 'installed'",
                (user_id, plugin_id)) as c:
                r = await c.fetchone()
        return None if r is None else Installation(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], r[8])

    async def uninstall(self, user_id: str, plugin_id: str, now: str) -> bool:
        async with self.db.write() as conn:
            async with conn.execute("SELECT 1 FROM plugins WHERE id = ?", (plugin_id,)) as c:
                if await c.fetchone() is None:
                    return False
            await conn.execute("UPDATE plugin_installs SET state = 'uninstalled', uninstalled_at = ? "
                               "WHERE user_id = ? AND plugin_id = ? AND state = 'installed'", (now, user_id, plugin_id))
        return True

    async def rate(self, user_id: str, plugin_id: str, stars: int, now: str) -> Plugin:
        async with self.db.write() as conn:
            cur = await conn.execute(
                "INSERT INTO plugin_ratings (plugin_id, user_id, stars, rated_at) SELECT p.id, ?, ?, ? FROM plugins p "
                "WHERE p.id = ? AND p.status = 'approved' AND EXISTS (SELECT 1 FROM plugin_installs i "
                "WHERE i.user_id = ? AND i.plugin_id = p.id AND i.state != 'awaiting_payment') "
                "ON CONFLICT (plugin_id, user_id) DO UPDATE SET stars = excluded.stars, rated_at = excluded.rated_at",
                (user_id, stars, now, plugin_id, user_id))
            async with conn.execute(f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE id = ?", (plugin_id,)) as c:
                row = await c.fetchone()
        if row is None or row["status"] != "approved":
            raise errors.NotFound("no such plugin")
        if cur.rowcount != 1:
            raise PluginNotInstalled("rate a plugin you have installed")
        return _plugin(row)

    async def signing_key(self, candidate: SigningKey, now: str) -> SigningKey:
        row = await self.db.fetchone("SELECT key_id, private_key, public_key FROM plugin_signing_key")
        if row is None:
            async with self.db.write() as conn:
                await conn.execute("INSERT INTO plugin_signing_key (singleton, key_id, private_key, public_key, created_at) "
                                   "VALUES (1, ?, ?, ?, ?) ON CONFLICT (singleton) DO NOTHING",
                                   (candidate.key_id, candidate.private_raw, candidate.public_raw, now))
                async with conn.execute("SELECT key_id, private_key, public_key FROM plugin_signing_key") as c:
                    row = await c.fetchone()
        return SigningKey(row[0], bytes(row[1]), bytes(row[2]))

    # -- paid plugins (revenue.py holds the rules, written once for both backends) --------------

    async def _write(self, fn, *args: Any, **kwargs: Any) -> Any:
        async with self.db.write() as conn:
            return await fn(_Tx(conn), *args, **kwargs)

    async def _read(self, fn, *args: Any, **kwargs: Any) -> Any:
        async with self.db.reader() as conn:
            return await fn(_Tx(conn), *args, **kwargs)


class _Tx:
    """revenue.Tx on an aiosqlite connection (the writer's, or a reader's)."""

    lock = ""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def row(self, sql: str, *args: Any) -> Any:
        async with self.conn.execute(sql, args) as cur:
            return await cur.fetchone()

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        async with self.conn.execute(sql, args) as cur:
            return list(await cur.fetchall())

    async def run(self, sql: str, *args: Any) -> int:
        cur = await self.conn.execute(sql, args)
        return cur.rowcount


async def _catalog_failures(conn: Any, new: NewVersion) -> list[Failure]:
    m = new.manifest
    async with conn.execute("SELECT owner_id, status, version FROM plugins WHERE id = ?", (m["id"],)) as c:
        plugin = await c.fetchone()
    async with conn.execute("SELECT version FROM plugin_versions WHERE plugin_id = ? AND status = 'pending_review'",
                            (m["id"],)) as c:
        pending = await c.fetchone()
    async with conn.execute("SELECT 1 FROM plugin_versions WHERE plugin_id = ? AND version = ? AND status = 'approved'",
                            (m["id"], m["version"])) as c:
        approved = await c.fetchone() is not None
    async with conn.execute("SELECT 1 FROM plugins WHERE name_key = ? AND id != ?", (m["name"].lower(), m["id"])) as c:
        name_taken = await c.fetchone() is not None
    return catalog_failures(new, plugin, pending[0] if pending else None, approved, name_taken)


async def _insert_version(conn: Any, new: NewVersion, status: str, *, signature: str | None = None,
                          key_id: str | None = None, reviewer: str | None = None, notes: str | None = None) -> None:
    await conn.execute(
        f"INSERT INTO plugin_versions ({_VERSION_COLUMNS}, package) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (new.submission_id, new.manifest["id"], new.manifest["version"], status, json.dumps(new.manifest),
         new.checksum, len(new.package), signature, key_id, new.submitted_by, new.now, reviewer, notes,
         new.now if reviewer else None, new.package))


async def _log(conn: Any, plugin_id: str, version: str | None, decision: str, reviewer: str, notes: str,
               now: str) -> None:
    await conn.execute("INSERT INTO plugin_reviews (plugin_id, version, decision, reviewer, notes, decided_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (plugin_id, version, decision, reviewer, notes or "", now))
