"""Active batches on PostgreSQL (migration postgres/0007), for many servers on one database.
The tier's cap is a count then an insert: under READ COMMITTED two nodes could both count below
it, so each start first takes a transaction-scoped advisory lock on its user (starts of other
users never wait).

A node that dies (kill -9) cannot mark its batches interrupted, and at start a node cannot tell
its own leftovers from other nodes' live runs. So a running batch counts against the cap for at
most `stale_after` seconds (compose passes a bound well past the longest run a plan can take:
its step limit times the LLM timeout), and the start-up sweep marks older ones interrupted."""

from __future__ import annotations

import time
import uuid

import asyncpg

from adiuva_server import errors
from adiuva_server.chat.batches import Batch
from adiuva_server.db.postgres import PgDatabase, rows_changed

# pg_advisory_xact_lock(key, hashtext(user_id)): the first half of a two-key advisory lock.
BATCH_LOCK = 0x0AD1_0007


class PostgresBatchStore:
    def __init__(self, db: PgDatabase, stale_after: float) -> None:
        self.db = db
        self.stale_after = int(stale_after)

    async def start(self, user_id: str, plan_id: str, cap: int | None) -> str:
        """Record a running batch; raises ActiveBatchLimit when `cap` are already running."""
        batch_id = str(uuid.uuid4())

        async def write(conn: asyncpg.Connection) -> None:
            if cap is not None:
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", BATCH_LOCK, user_id)
                running = await conn.fetchval(
                    "SELECT count(*) FROM chat_batches WHERE user_id = $1 AND status = 'running' AND started_at > $2",
                    user_id, int(time.time()) - self.stale_after)
                if running >= cap:
                    raise errors.ActiveBatchLimit(f"your tier allows {cap} active batches at once; wait for one to finish")
            await conn.execute("INSERT INTO chat_batches (id, user_id, plan_id, status, started_at) "
                               "VALUES ($1, $2, $3, 'running', $4)", batch_id, user_id, plan_id, int(time.time()))

        await self.db.transaction(write)
        return batch_id

    async def finish(self, batch_id: str, status: str) -> None:
        await self.db.execute("UPDATE chat_batches SET status = $1, finished_at = $2 WHERE id = $3 AND status = 'running'",
                              status, int(time.time()), batch_id)

    async def interrupt_running(self) -> int:
        """At start: batches running for longer than any run can take were left by a node that died."""
        return rows_changed(await self.db.execute(
            "UPDATE chat_batches SET status = 'interrupted', finished_at = $1 WHERE status = 'running' AND started_at <= $2",
            int(time.time()), int(time.time()) - self.stale_after))

    async def recent(self, user_id: str, limit: int = 50) -> list[Batch]:
        rows = await self.db.fetch("SELECT id, plan_id, status, started_at, finished_at FROM chat_batches "
                                   "WHERE user_id = $1 ORDER BY started_at DESC, n DESC LIMIT $2", user_id, limit)
        return [Batch(*row) for row in rows]
