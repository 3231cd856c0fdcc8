"""Pins shared by every node of a cluster, so that no node deletes an object another node is
storing for a row it has not committed yet (storage/keeper.py keeps the in-process half).

One process (SQLite, or files) needs nothing more than the keeper's own pins: `LocalPins`.
On PostgreSQL (`PostgresPins`, migration postgres/0008) a pin is a row written under the
object's advisory lock, and a deletion holds that lock from its check to the end of the delete:

- node B pins (lock, insert, commit) before it stores the object, and unpins after the
  transaction that references it has finished;
- node A, deleting, takes the lock, finds no live pin and no reference, deletes, unlocks.

Either B's pin comes first (A sees it and keeps the object), or B waits for A's deletion and
stores the object again after it: a committed row never points at a missing object.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # asyncpg is loaded only by servers on PostgreSQL
    from adiuva_server.db.postgres import PgDatabase

# pg_advisory_(xact_)lock(key, hashtext(digest)); other keys: db/postgres, marketplace, chat.
PIN_LOCK = 0x0AD1_0008
# A pin outlives any upload's transaction by far; past it, its node is taken for dead.
PIN_SECONDS = 3600


class SharedPins(Protocol):
    async def pin(self, digests: Sequence[str]) -> str | None:
        """Pin these objects on every node; returns the token to unpin with."""
    async def unpin(self, token: str | None) -> None: ...
    def deleting(self, digest: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """Held around one deletion: yields whether some node has the object pinned."""
    async def purge(self) -> int:
        """Forget pins of nodes that died."""


class LocalPins:
    """One process: the keeper's own pins are all there is."""

    async def pin(self, digests: Sequence[str]) -> str | None:
        return None

    async def unpin(self, token: str | None) -> None:
        return None

    @contextlib.asynccontextmanager
    async def deleting(self, digest: str) -> AsyncIterator[bool]:
        yield False

    async def purge(self) -> int:
        return 0


class PostgresPins:
    def __init__(self, db: "PgDatabase") -> None:
        self.db = db

    async def pin(self, digests: Sequence[str]) -> str | None:
        token = str(uuid.uuid4())
        unique = sorted(set(digests))  # one lock order everywhere: no deadlock between pinners

        async def write(conn) -> None:
            for digest in unique:
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", PIN_LOCK, digest)
            await conn.executemany("INSERT INTO blob_pins (digest, pin_id, expires_at) VALUES ($1, $2, $3)",
                                   [(d, token, int(time.time()) + PIN_SECONDS) for d in unique])

        await self.db.transaction(write)
        return token

    async def unpin(self, token: str | None) -> None:
        if token is not None:
            await self.db.execute("DELETE FROM blob_pins WHERE pin_id = $1", token)

    @contextlib.asynccontextmanager
    async def deleting(self, digest: str) -> AsyncIterator[bool]:
        async with self.db.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", PIN_LOCK, digest)
            try:
                yield bool(await conn.fetchval("SELECT 1 FROM blob_pins WHERE digest = $1 AND expires_at > $2",
                                               digest, int(time.time())))
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", PIN_LOCK, digest)

    async def purge(self) -> int:
        from adiuva_server.db.postgres import rows_changed

        return rows_changed(await self.db.execute("DELETE FROM blob_pins WHERE expires_at <= $1", int(time.time())))
