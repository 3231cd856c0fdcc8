"""Active batches: a plan being run. Each tier caps how many a user has running at once; the
check and the insert happen in one write transaction, so two concurrent starts cannot both
squeeze under the cap."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from adiuva_server import errors
from adiuva_server.db import Database


@dataclass(frozen=True)
class Batch:
    id: str
    plan_id: str
    status: str
    started_at: int
    finished_at: int | None


class BatchStore(Protocol):
    async def start(self, user_id: str, plan_id: str, cap: int | None) -> str: ...
    async def finish(self, batch_id: str, status: str) -> None: ...
    async def interrupt_running(self) -> int: ...
    async def recent(self, user_id: str, limit: int = 50) -> list[Batch]: ...


class SQLiteBatchStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def start(self, user_id: str, plan_id: str, cap: int | None) -> str:
        """Record a running batch; raises ActiveBatchLimit when `cap` are already running."""
        batch_id = str(uuid.uuid4())
        async with self.db.write() as conn:
            if cap is not None:
                async with conn.execute(
                    "SELECT count(*) FROM chat_batches WHERE user_id = ? AND status = 'running'", (user_id,)
                ) as cur:
                    (running,) = await cur.fetchone()
                if running >= cap:
                    raise errors.ActiveBatchLimit(
                        f"your tier allows {cap} active batches at once; wait for one to finish"
                    )
            await conn.execute(
                "INSERT INTO chat_batches (id, user_id, plan_id, status, started_at) VALUES (?, ?, ?, 'running', ?)",
                (batch_id, user_id, plan_id, int(time.time())),
            )
        return batch_id

    async def finish(self, batch_id: str, status: str) -> None:
        await self.db.execute_write(
            "UPDATE chat_batches SET status = ?, finished_at = ? WHERE id = ? AND status = 'running'",
            (status, int(time.time()), batch_id),
        )

    async def interrupt_running(self) -> int:
        """At start: batches left running by a previous process will never finish."""
        return await self.db.execute_write(
            "UPDATE chat_batches SET status = 'interrupted', finished_at = ? WHERE status = 'running'",
            (int(time.time()),),
        )

    async def recent(self, user_id: str, limit: int = 50) -> list[Batch]:
        rows = await self.db.fetchall(
            "SELECT id, plan_id, status, started_at, finished_at FROM chat_batches "
            "WHERE user_id = ? ORDER BY started_at DESC, rowid DESC LIMIT ?",
            (user_id, limit),
        )
        return [Batch(*row) for row in rows]
