"""Garbage collection across nodes: two nodes (their own PostgreSQL connections and S3 clients)
on one real PostgreSQL and one real S3 bucket. Node A deletes an object nothing references any
more while node B is storing the same bytes for a new record: with the shared pins B waits for
A's deletion and stores the object again, so B's committed record never points at nothing.
The same interleaving with each node's pins alone loses the object: the test can fail."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from adiuva_server.auth.postgres import PostgresAccountStore
from adiuva_server.db.postgres import PgDatabase
from adiuva_server.storage.keeper import BlobKeeper
from adiuva_server.storage.pins import PIN_SECONDS, LocalPins, PostgresPins
from adiuva_server.storage.postgres import PostgresStorageStore

BODY = b"the same encrypted bytes, uploaded twice"
DIGEST = hashlib.sha256(BODY).hexdigest()


async def chunks():
    yield BODY


class Node:
    def __init__(self, db, blobs, shared: bool) -> None:
        self.db, self.blobs = db, blobs
        self.store = PostgresStorageStore(db)
        self.keeper = BlobKeeper(blobs, self.store, PostgresPins(db) if shared else LocalPins())


async def two_nodes(pg_url, s3_bucket, shared: bool) -> list[Node]:
    nodes = []
    for _ in range(2):
        db = await PgDatabase.open(pg_url, min_size=1, max_size=4)
        blobs = s3_bucket.store()
        await blobs.open()
        nodes.append(Node(db, blobs, shared))
    return nodes


@pytest.mark.parametrize("shared", [True, False], ids=["shared-pins", "local-pins-only"])
async def test_a_deletion_on_one_node_never_loses_an_upload_on_another(pg_url, s3_bucket, shared):
    a, b = await two_nodes(pg_url, s3_bucket, shared)
    try:
        ada = (await PostgresAccountStore(a.db).create_user("ada@example.org", "x", "pro", False)).id
        # A record of the object, then deleted: node A is about to free the object.
        staged = await a.blobs.receive(chunks(), 1 << 20)
        old = await a.keeper.commit(staged, lambda: a.store.insert_record(ada, "pro", "notes", DIGEST, len(BODY), 100))
        await a.store.delete_record(ada, "pro", old.id, None)

        entered, go = asyncio.Event(), asyncio.Event()
        real_delete = a.blobs.delete

        async def slow_delete(digest, **kw):  # A has checked: nothing references the object
            entered.set()
            await go.wait()
            return await real_delete(digest, **kw)

        a.blobs.delete = slow_delete
        freeing = asyncio.ensure_future(a.keeper.release([DIGEST]))
        await asyncio.wait_for(entered.wait(), 10)
        staged = await b.blobs.receive(chunks(), 1 << 20)
        storing = asyncio.ensure_future(b.keeper.commit(
            staged, lambda: b.store.insert_record(ada, "pro", "notes", DIGEST, len(BODY), 100)))
        await asyncio.sleep(0.3)
        assert storing.done() is (not shared)  # shared: B waits for A's deletion to end
        go.set()
        assert await freeing == 1
        record = await storing
        present = await b.blobs.size_and_hash(DIGEST)
        assert await b.store.referenced([DIGEST]) == {DIGEST} and record.checksum == DIGEST
        if shared:
            assert present == (len(BODY), DIGEST)  # stored again after the deletion
            assert await a.db.fetchval("SELECT count(*) FROM blob_pins") == 0  # unpinned after the commit
        else:
            assert present is None  # the failure the shared pins exist for
    finally:
        for node in (a, b):
            await node.blobs.close()
            await node.db.close()


async def test_pins_of_a_dead_node_expire(pg_url, s3_bucket, monkeypatch):
    a, b = await two_nodes(pg_url, s3_bucket, True)
    try:
        pins = PostgresPins(a.db)
        await pins.pin([DIGEST])  # a node that died before unpinning
        async with PostgresPins(b.db).deleting(DIGEST) as pinned:
            assert pinned
        import time

        later = time.time() + PIN_SECONDS + 1
        monkeypatch.setattr(time, "time", lambda: later)
        async with PostgresPins(b.db).deleting(DIGEST) as pinned:
            assert not pinned
        assert await pins.purge() == 1
    finally:
        for node in (a, b):
            await node.blobs.close()
            await node.db.close()
