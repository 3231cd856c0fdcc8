"""Users' plans in Redis, so a plan built (or answered in plan mode) on one server process can be
listed and run on any other.

Per owner: a sorted set of plan ids by last use (Redis clock) and a hash of the plans, under one
hash tag; both expire PLAN_TTL_SECONDS after the owner's last use of a plan, and each owner keeps
at most `per_user` (the least recently used goes first), as in memory. There is no global count:
the per-owner cap and the TTL bound the total, and Redis' maxmemory is the operator's.

Plan variables may hold user content, and Redis may write its data to disk (RDB, AOF): each
plan is sealed with AES-256-GCM under a key derived from the JWT secret (which every node shares),
bound to its owner and id, so the server never persists it readable and one owner's sealed plan
cannot be passed off as another's.
"""

from __future__ import annotations

import os

import redis.asyncio as aioredis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from adiuva_server.chat.plans import (
    MAX_PLAN_BYTES, PLANS_PER_USER, ExecutionPlan, check_plan_size, no_such_plan,
)
from adiuva_server.cluster.redis import NOW, PREFIX, translated

PLAN_TTL_SECONDS = 24 * 3600

# KEYS: the owner's index and plans. ARGV: plan id, sealed plan, per_user, ttl (ms).
_PUT = NOW + """
redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #old, 2 do redis.call('HDEL', KEYS[2], old[i]) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 0
"""
# ARGV: plan id, ttl (ms). A use makes it the most recently used, and keeps the owner's plans.
_GET = NOW + """
local sealed = redis.call('HGET', KEYS[2], ARGV[1])
if sealed then
  redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', now), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return sealed
"""
_LIST = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
if #ids == 0 then return {} end
return {ids, redis.call('HMGET', KEYS[2], unpack(ids))}
"""


class RedisPlanStore:
    def __init__(self, client: aioredis.Redis, secret: str, builtins: list[ExecutionPlan], *,
                 per_user: int = PLANS_PER_USER, max_bytes: int = MAX_PLAN_BYTES, ttl: float = PLAN_TTL_SECONDS) -> None:
        self.builtins = {p.plan_id: p for p in builtins}
        self.per_user = per_user
        self.max_bytes = max_bytes
        self._ttl_ms = max(1, int(ttl * 1000))
        self._client = client
        self._put = client.register_script(_PUT)
        self._get = client.register_script(_GET)
        self._list = client.register_script(_LIST)
        key = HKDF(hashes.SHA256(), 32, salt=None, info=b"adiuva plans in redis").derive(secret.encode())
        self._aead = AESGCM(key)

    @staticmethod
    def _keys(owner: str) -> list[str]:
        base = f"{PREFIX}plans:{{{owner}}}"
        return [base, base + ":data"]

    def _seal(self, owner: str, plan_id: str, data: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data.encode(), f"{owner}\0{plan_id}".encode())

    def _open(self, owner: str, plan_id: str, sealed: bytes) -> ExecutionPlan | None:
        try:
            data = self._aead.decrypt(sealed[:12], sealed[12:], f"{owner}\0{plan_id}".encode())
        except InvalidTag:  # sealed under another JWT secret (rotated): as good as gone
            return None
        return ExecutionPlan.model_validate_json(data)

    async def put(self, owner: str, plan: ExecutionPlan) -> None:
        data = check_plan_size(plan, self.max_bytes)
        sealed = self._seal(owner, plan.plan_id, data)
        with translated():
            await self._put(keys=self._keys(owner), args=[plan.plan_id, sealed, self.per_user, self._ttl_ms])

    async def get(self, owner: str, plan_id: str) -> ExecutionPlan:
        if plan_id in self.builtins:
            return self.builtins[plan_id]
        with translated():
            sealed = await self._get(keys=self._keys(owner), args=[plan_id, self._ttl_ms])
        plan = self._open(owner, plan_id, sealed) if sealed is not None else None
        if plan is None:
            raise no_such_plan(plan_id)
        return plan

    async def list(self, owner: str) -> list[ExecutionPlan]:
        with translated():
            found = await self._list(keys=self._keys(owner))
        mine = []
        if found:
            for plan_id, sealed in zip(*found):
                plan = self._open(owner, plan_id.decode(), sealed) if sealed is not None else None
                if plan is not None:
                    mine.append(plan)
        return [*self.builtins.values(), *mine]
