"""The account store's contract, on both backends: a real SQLite file and a real PostgreSQL 18
(tests/servers_postgres.py). The invariants under concurrent writers, each raced with many
concurrent calls through separate stores (separate pools on PostgreSQL) on one database: the
first user is the only one made admin, the last active admin is never demoted nor deleted, a
refresh token rotates once (its retries within the grace get the same successor; a reuse
after it revokes the family), and every node reads the live account state."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import re

import pytest

from adiuva_server import errors
from adiuva_server.auth.store import Rotation, SQLiteAccountStore
from adiuva_server.db import Database

NODES = 4


class Backend:
    """Stores on one database, each as a separate server process would have (own connections)."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind, self.where = kind, where
        self.opened: list = []

    async def node(self):
        if self.kind == "sqlite":
            db = await Database.open(self.where)
            store = SQLiteAccountStore(db)
        else:
            from adiuva_server.auth.postgres import PostgresAccountStore
            from adiuva_server.db.postgres import PgDatabase

            db = await PgDatabase.open(self.where, min_size=1, max_size=8)
            store = PostgresAccountStore(db)
        self.opened.append(db)
        return store

    async def nodes(self, n: int = NODES) -> list:
        return [await self.node() for _ in range(n)]

    async def value(self, store, sql: str, *args):
        if self.kind == "sqlite":
            row = await store.db.fetchone(sql, args)
            return row[0] if row else None
        return await store.db.fetchval(re.sub(r"\?", lambda m, c=iter(range(1, 99)): f"${next(c)}", sql), *args)

    async def close(self) -> None:
        for db in reversed(self.opened):
            await db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_where(request, tmp_path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "adiuva.db")
    return "postgresql", request.getfixturevalue("pg_url")  # a synchronous fixture: asked for here


@pytest.fixture
async def backend(backend_where):
    b = Backend(*backend_where)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def store(backend):
    return await backend.node()


async def auth_state(store, user_id):
    """auth_state is async on PostgreSQL (and becoming so on SQLite)."""
    state = store.auth_state(user_id)
    return await state if inspect.isawaitable(state) else state


H = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"


# -- accounts ------------------------------------------------------------------------------------


async def test_users_are_created_found_listed_and_deleted(store):
    ada = await store.create_user("ada@example.org", H, "pro", None)
    bob = await store.create_user("bob@example.org", H + "b", "free", None)
    assert (ada.is_admin, bob.is_admin) == (True, False)
    assert await store.get_by_email("ada@example.org") == ada
    assert await store.get_by_id(bob.id) == bob
    assert await store.get_by_email("nobody@example.org") is None and await store.get_by_id("nope") is None
    assert [u.email for u in await store.list_users()] == sorted(["ada@example.org", "bob@example.org"])
    assert all(type(u.is_admin) is bool and type(u.disabled) is bool for u in await store.list_users())
    with pytest.raises(errors.EmailTaken):
        await store.create_user("ada@example.org", H, "free", False)
    # Emails are compared as stored (the service lower-cases them before), on both backends.
    assert await store.get_by_email("ADA@example.org") is None
    await store.delete_user("bob@example.org")
    assert await store.get_by_id(bob.id) is None
    with pytest.raises(errors.NotFound):
        await store.delete_user("bob@example.org")
    with pytest.raises(errors.NotFound):
        await store.unlock("bob@example.org")


async def test_updates_end_sessions_and_unlock_throttles(backend, store):
    ada = await store.create_user("ada@example.org", H, "free", None)
    await store.start_session(ada.id, b"t1", "fam", 100, 10_000, address_tag=b"addr")
    subject = await store.login_subject("ada@example.org", b"addr", 200)
    assert (subject.user, subject.throttle_generation, subject.known_address) == (ada, 0, True)
    assert not (await store.login_subject("ada@example.org", b"other", 200)).known_address
    assert not (await store.login_subject("ada@example.org", b"addr", 10_000)).known_address  # expired
    assert await store.login_subject("x@example.org", b"addr", 200) == (None, 0, False)
    await store.unlock("ada@example.org")
    assert (await store.login_subject("ada@example.org", b"addr", 200)).throttle_generation == 1

    assert (await store.update_user("ada@example.org", tier="power")).tier == "power"
    assert (await auth_state(store, ada.id)).session_version == 0  # a tier change keeps sessions
    changed = await store.update_user("ada@example.org", password_hash=H + "new")
    assert (changed.session_version, changed.password_hash) == (1, H + "new")
    subject = await store.login_subject("ada@example.org", b"addr", 200)
    assert (subject.throttle_generation, subject.known_address) == (2, False)  # addresses forgotten
    assert await backend.value(store, "SELECT count(*) FROM refresh_tokens WHERE revoked = ?",
                               True if backend.kind == "postgresql" else 1) == 1
    off = await store.update_user("ada@example.org", disabled=1)
    assert (off.disabled, off.session_version) == (True, 2)
    on = await store.update_user("ada@example.org", disabled=0)
    assert (on.disabled, on.session_version) == (False, 2)
    assert (await store.login_subject("ada@example.org", b"addr", 200)).throttle_generation == 3
    await store.rehash_password(ada.id, H + "rehashed")
    assert (await store.get_by_id(ada.id)).password_hash == H + "rehashed"
    assert (await store.get_by_id(ada.id)).session_version == 2
    with pytest.raises(ValueError):
        await store.update_user("ada@example.org", session_version=7)
    with pytest.raises(errors.NotFound):
        await store.update_user("nobody@example.org", tier="pro")
    with pytest.raises(errors.NotFound):
        await store.update_user_by_id("nope", tier="pro")


async def test_auth_state_is_live_on_every_node(backend):
    one, two = await backend.nodes(2)
    ada = await one.create_user("ada@example.org", H, "free", None)
    state = await auth_state(two, ada.id)
    assert (state.tier, state.disabled, state.password_hash, state.revoked_families) == ("free", False, "", frozenset())
    await one.update_user_by_id(ada.id, tier="team")
    assert (await auth_state(two, ada.id)).tier == "team"
    await one.create_user("bob@example.org", H, "free", True)
    await one.update_user("ada@example.org", disabled=1)
    assert (await auth_state(two, ada.id)).disabled is True
    assert await auth_state(two, "nope") is None
    await one.delete_user("ada@example.org")
    assert await auth_state(two, ada.id) is None


async def test_only_one_of_many_concurrent_first_registrations_is_admin(backend):
    stores = await backend.nodes()
    users = await asyncio.gather(*(stores[i % NODES].create_user(f"u{i}@example.org", H, "free", None)
                                   for i in range(24)))
    assert sum(u.is_admin for u in users) == 1
    assert sum(u.is_admin for u in await stores[0].list_users()) == 1


async def test_concurrent_registrations_never_pass_the_license_limit(backend):
    stores = await backend.nodes()
    results = await asyncio.gather(*(stores[i % NODES].create_user(f"u{i}@example.org", H, "free", None, max_users=5)
                                     for i in range(20)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 5
    assert all(isinstance(r, errors.LicenseUserLimit) for r in results if isinstance(r, BaseException))
    assert len(await stores[0].list_users()) == 5


async def test_one_email_once_under_concurrent_registrations(backend):
    stores = await backend.nodes()
    results = await asyncio.gather(*(stores[i % NODES].create_user("ada@example.org", H, "free", False)
                                     for i in range(12)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, errors.EmailTaken) for r in results if isinstance(r, BaseException))


def _register_in_a_process(kind: str, where: str, emails: list[str], start, out) -> None:
    async def go() -> list[bool]:
        b = Backend(kind, where)
        stores = await b.nodes(2)
        start.wait()
        users = await asyncio.gather(*(stores[i % 2].create_user(e, H, "free", None) for i, e in enumerate(emails)))
        await b.close()
        return [u.is_admin for u in users]

    out.put(asyncio.run(go()))


async def test_first_admin_across_two_processes(backend, store):
    # The schema exists before the processes start (they would otherwise race to migrate).
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_register_in_a_process,
                         args=(backend.kind, backend.where, [f"p{p}u{i}@example.org" for i in range(10)], start, out))
             for p in range(2)]
    for p in procs:
        p.start()
    await asyncio.sleep(1.5)  # both import and connect, then register at once
    start.set()
    flags = [await asyncio.to_thread(out.get, True, 60) for _ in procs]
    for p in procs:
        await asyncio.to_thread(p.join, 30)
        assert p.exitcode == 0
    assert sum(sum(f) for f in flags) == 1
    assert sum(u.is_admin for u in await store.list_users()) == 1 and len(await store.list_users()) == 20


# -- the last admin ------------------------------------------------------------------------------


async def test_the_last_active_admin_is_kept(store):
    ada = await store.create_user("ada@example.org", H, "free", None)
    bob = await store.create_user("bob@example.org", H, "free", None)
    for change in ({"is_admin": 0}, {"disabled": 1}):
        with pytest.raises(errors.LastAdmin):
            await store.update_user_by_id(ada.id, **change)
    with pytest.raises(errors.LastAdmin):
        await store.delete_user_by_id(ada.id)
    assert (await store.update_user_by_id(bob.id, is_admin=1)).is_admin
    assert not (await store.update_user_by_id(ada.id, is_admin=0)).is_admin
    with pytest.raises(errors.LastAdmin):
        await store.update_user_by_id(bob.id, disabled=1)
    await store.delete_user_by_id(ada.id)  # not an admin any more
    assert await store.delete_user_by_id(bob.id, keep_an_admin=False) is None  # `adiuva user delete --force`
    assert await store.list_users() == []
    with pytest.raises(errors.NotFound):
        await store.delete_user_by_id(bob.id, keep_an_admin=False)


async def test_concurrent_demotions_and_deletions_leave_an_active_admin(backend):
    stores = await backend.nodes()
    admins = [await stores[0].create_user(f"a{i}@example.org", H, "free", True) for i in range(6)]
    calls = []
    for i, a in enumerate(admins):
        s = stores[i % NODES]
        calls += [s.update_user_by_id(a.id, is_admin=0), s.update_user_by_id(a.id, disabled=1), s.delete_user_by_id(a.id)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures and all(isinstance(r, (errors.LastAdmin, errors.NotFound)) for r in failures), failures
    active = [u for u in await stores[0].list_users() if u.is_admin and not u.disabled]
    assert len(active) == 1


async def test_delete_runs_inside_in_the_same_transaction(backend, store):
    ada = await store.create_user("ada@example.org", H, "free", None)
    bob = await store.create_user("bob@example.org", H, "free", None)
    await store.start_session(bob.id, b"tb", "famb", 100, 10_000)
    seen = []

    async def inside(conn, user_id):
        if backend.kind == "sqlite":
            async with conn.execute("SELECT count(*) FROM refresh_tokens WHERE user_id = ?", (user_id,)) as cur:
                seen.append((await cur.fetchone())[0])
        else:
            seen.append(await conn.fetchval("SELECT count(*) FROM refresh_tokens WHERE user_id = $1", user_id))
        return ["digest"]

    assert await store.delete_user_by_id(bob.id, inside) == ["digest"] and seen == [1]
    assert await backend.value(store, "SELECT count(*) FROM refresh_tokens") == 0  # cascaded

    async def fails(conn, user_id):
        if backend.kind == "sqlite":
            await conn.execute("UPDATE users SET tier = 'team' WHERE id = ?", (ada.id,))
        else:
            await conn.execute("UPDATE users SET tier = 'team' WHERE id = $1", ada.id)
        raise RuntimeError("boom")

    carl = await store.create_user("carl@example.org", H, "free", False)
    with pytest.raises(RuntimeError):
        await store.delete_user_by_id(carl.id, fails)
    assert (await store.get_by_id(ada.id)).tier == "free" and await store.get_by_id(carl.id)  # rolled back
    with pytest.raises(errors.LastAdmin):  # checked before `inside` runs
        await store.delete_user_by_id(ada.id, fails)


# -- refresh tokens ------------------------------------------------------------------------------

GRACE, REVOKE = 30, 5000
ROTATIONS = 48


async def rotate(store, old: bytes, new: bytes, now: int, expires_at: int = 10_000):
    return await store.rotate_session(old, new, now, expires_at, grace_seconds=GRACE, revoke_until=REVOKE)


async def test_rotation_retry_reuse_and_revoked_families(store):
    ada = await store.create_user("ada@example.org", H, "free", None)
    await store.start_session(ada.id, b"t0", "fam", 100, 10_000)
    assert (await rotate(store, b"nope", b"x", 100)).outcome is Rotation.UNKNOWN
    first = await rotate(store, b"t0", b"t1", 200)
    assert (first.outcome, first.user, first.family_id) == (Rotation.ROTATED, ada, "fam")
    again = await rotate(store, b"t0", b"t1", 200 + GRACE - 1)  # a retried request within the grace
    assert (again.outcome, again.family_id) == (Rotation.RETRIED, "fam")
    assert (await rotate(store, b"t1", b"t2", 300)).outcome is Rotation.ROTATED
    # t0 once more, its successor used now: reuse. The family ends, and its access tokens.
    assert (await rotate(store, b"t0", b"t1", 301)).outcome is Rotation.REUSED
    assert (await auth_state(store, ada.id)).revoked_families == frozenset({"fam"})
    assert (await rotate(store, b"t2", b"t3", 302)).outcome is Rotation.REUSED
    # A second family: expiry, reuse after the grace, and a disabled user.
    await store.start_session(ada.id, b"u0", "fam2", 100, 500)
    assert (await rotate(store, b"u0", b"u1", 500)).outcome is Rotation.EXPIRED
    await store.start_session(ada.id, b"v0", "fam3", 100, 10_000)
    assert (await rotate(store, b"v0", b"v1", 1000)).outcome is Rotation.ROTATED
    assert (await rotate(store, b"v0", b"v1", 1000 + GRACE)).outcome is Rotation.REUSED
    assert (await auth_state(store, ada.id)).revoked_families == frozenset({"fam", "fam3"})
    await store.start_session(ada.id, b"w0", "fam4", 100, 10_000)
    bob = await store.create_user("bob@example.org", H, "free", True)
    await store.update_user_by_id(ada.id, is_admin=0)
    await store.start_session(bob.id, b"b0", "famb", 100, 10_000)
    await store.update_user("bob@example.org", disabled=1)  # ends bob's sessions
    assert (await rotate(store, b"b0", b"b1", 200)).outcome is Rotation.REUSED  # revoked by the disable
    assert (await rotate(store, b"w0", b"w1", 200)).outcome is Rotation.ROTATED


async def test_concurrent_rotations_of_one_token_rotate_once(backend):
    stores = await backend.nodes()
    ada = await stores[0].create_user("ada@example.org", H, "free", None)
    await stores[0].start_session(ada.id, b"t0", "fam", 100, 10_000)
    results = await asyncio.gather(*(rotate(stores[i % NODES], b"t0", b"t1", 200) for i in range(ROTATIONS)))
    outcomes = sorted(r.outcome.value for r in results)
    assert outcomes == ["retried"] * (ROTATIONS - 1) + ["rotated"], outcomes
    assert {r.family_id for r in results} == {"fam"}
    assert await backend.value(stores[0], "SELECT count(*) FROM refresh_tokens") == 2
    # After the grace, concurrent reuses all revoke (none rotates, none fails).
    late = await asyncio.gather(*(rotate(stores[i % NODES], b"t0", b"t1", 200 + GRACE) for i in range(8)))
    assert {r.outcome for r in late} == {Rotation.REUSED}
    assert (await rotate(stores[1], b"t1", b"t2", 300)).outcome is Rotation.REUSED
    assert (await auth_state(stores[2], ada.id)).revoked_families == frozenset({"fam"})



async def test_a_disable_during_rotations_leaves_no_live_token(backend):
    """The user's row is locked before the token's by a rotation as by a disable: the disable's
    revocation sees every successor committed before it, and no rotation succeeds after it."""
    stores = await backend.nodes()
    ada = await stores[0].create_user("ada@example.org", H, "free", None)
    await stores[0].create_user("bob@example.org", H, "free", True)
    for i in range(24):
        await stores[0].start_session(ada.id, b"t%d" % i, f"fam{i}", 100, 10_000)
    calls = [rotate(stores[i % NODES], b"t%d" % i, b"n%d" % i, 200) for i in range(24)]
    calls.insert(12, stores[1].update_user("ada@example.org", disabled=1))
    results = await asyncio.gather(*calls)
    assert {r.outcome for r in results[:12] + results[13:]} <= {Rotation.ROTATED, Rotation.REUSED, Rotation.USER_INACTIVE}
    live = await backend.value(stores[0], "SELECT count(*) FROM refresh_tokens WHERE user_id = ? AND revoked = ?",
                               ada.id, False if backend.kind == "postgresql" else 0)
    assert live == 0
    assert {(await rotate(stores[2], b"n%d" % i, b"m%d" % i, 300)).outcome for i in range(24)} <= {
        Rotation.UNKNOWN, Rotation.REUSED}

async def test_purge_expired_sessions(backend, store):
    ada = await store.create_user("ada@example.org", H, "free", None)
    await store.start_session(ada.id, b"old", "f1", 100, 500, address_tag=b"a1")
    await store.start_session(ada.id, b"new", "f2", 100, 5000, address_tag=b"a2")
    await store.rotate_session(b"old", b"old2", 200, 400, grace_seconds=GRACE, revoke_until=300)
    await store.rotate_session(b"old", b"old2", 300, 400, grace_seconds=GRACE, revoke_until=600)  # reuse
    assert (await auth_state(store, ada.id)).revoked_families == {"f1"}
    assert await store.purge_expired_sessions(500) == 2  # "old" and its successor
    assert await backend.value(store, "SELECT count(*) FROM refresh_tokens") == 1
    assert await backend.value(store, "SELECT count(*) FROM login_addresses") == 1
    assert (await auth_state(store, ada.id)).revoked_families == {"f1"}  # until 600
    assert await store.purge_expired_sessions(600) == 0
    assert (await auth_state(store, ada.id)).revoked_families == frozenset()


# -- one schema, two engines ---------------------------------------------------------------------

ACCOUNT_TABLES = ("users", "refresh_tokens", "storage_usage", "login_addresses", "revoked_families")


async def test_accounts_copied_from_sqlite_read_the_same_on_postgresql(tmp_path, pg_url):
    """The rule of db/postgres/migrations/: tables and columns named as SQLite's, values carried
    by ops/tablecopy.py's conversions; a copied account works on the PostgreSQL store."""
    from adiuva_server.auth.postgres import PostgresAccountStore
    from adiuva_server.db.postgres import PgDatabase
    from adiuva_server.ops import tablecopy

    lite_db = await Database.open(tmp_path / "adiuva.db")
    lite = SQLiteAccountStore(lite_db)
    ada = await lite.create_user("ada@example.org", H, "team", None)
    bob = await lite.create_user("bob@example.org", H, "free", None)
    await lite.update_user("bob@example.org", disabled=1)
    await lite.start_session(ada.id, b"t0", "fam", 100, 10_000, address_tag=b"\x00tag")
    await lite.start_session(ada.id, b"u0", "fam2", 100, 10_000)
    await rotate(lite, b"u0", b"u1", 200)
    await rotate(lite, b"u0", b"u1", 200 + GRACE)  # reuse: fam2 revoked
    await lite_db.close()

    sqlite_cols = dict(tablecopy.sqlite_tables(tmp_path / "adiuva.db"))
    pg = await PgDatabase.open(pg_url)
    try:
        async with pg.pool.acquire() as conn:
            pg_cols = await tablecopy.pg_columns(conn)
            for table in ACCOUNT_TABLES:
                names = [c for c, _ in sqlite_cols[table]]
                assert sorted(names) == sorted(pg_cols[table]), table
                types = [pg_cols[table][c] for c in names]
                reader = tablecopy.connect(tmp_path / "adiuva.db", readonly=True)
                rows = reader.execute(f"SELECT {', '.join(names)} FROM {table}").fetchall()
                reader.close()
                await conn.executemany(
                    f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(names)))})",
                    [[tablecopy._to_pg(v, t) for v, t in zip(row, types)] for row in rows])
        store = PostgresAccountStore(pg)
        assert [u.email for u in await store.list_users()] == ["ada@example.org", "bob@example.org"]
        assert await store.get_by_id(ada.id) == ada and (await store.get_by_id(bob.id)).disabled is True
        assert (await store.auth_state(ada.id)).revoked_families == {"fam2"}
        assert (await store.login_subject("ada@example.org", b"\x00tag", 200)).known_address
        assert (await rotate(store, b"t0", b"t1", 300)).outcome is Rotation.ROTATED
        assert (await rotate(store, b"u1", b"u2", 300)).outcome is Rotation.REUSED
        with pytest.raises(errors.LastAdmin):
            await store.delete_user_by_id(ada.id)
    finally:
        await pg.close()


async def _until(predicate, timeout: float = 5.0) -> float:
    """Seconds until `predicate()` (a coroutine function) is true."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await predicate():
        assert loop.time() - start < timeout, "timed out"
        await asyncio.sleep(0.001)
    return loop.time() - start


async def test_a_listening_node_answers_from_its_cache_and_every_change_evicts(pg_url):
    """PostgreSQL: the per-request check comes from memory while the node listens for the
    change notices; a change on another node (or any tool) evicts the account at its commit."""
    backend = Backend("postgresql", pg_url)
    one, two = await backend.nodes(2)
    try:
        await one.create_user("admin@example.org", H, "team", True)
        ada = await one.create_user("ada@example.org", H, "free", False)
        await two.listen()
        await _until(lambda: asyncio.sleep(0, two._listening))
        reads = 0
        real = two.db.fetchrow

        async def counted(*args):
            nonlocal reads
            reads += 1
            return await real(*args)

        two.db.fetchrow = counted
        assert (await two.auth_state(ada.id)).tier == "free"
        assert (await two.auth_state(ada.id)).tier == "free" and reads == 1  # the second from memory
        waits = []
        for change, check in (({"tier": "team"}, lambda s: s.tier == "team"),
                              ({"disabled": 1}, lambda s: s.disabled),
                              ({"disabled": 0}, lambda s: not s.disabled)):
            await one.update_user_by_id(ada.id, **change)

            async def seen(check=check):
                return check(await two.auth_state(ada.id))

            waits.append(await _until(seen))
        # A revoked token family (reuse detected on another node) evicts too.
        await backend.value(one, "INSERT INTO revoked_families (family_id, user_id, until) VALUES (?, ?, ?)",
                            "fam-1", ada.id, 2_000_000_000)

        async def revoked():
            return "fam-1" in (await two.auth_state(ada.id)).revoked_families

        waits.append(await _until(revoked))
        print(f"notice to eviction: {', '.join(f'{w * 1000:.1f}' for w in waits)} ms")
        assert max(waits) < 1.0
        # A read that overlapped a notice is not kept.
        async def overlapping(*args):
            row = await real(*args)
            two._notice(None, 0, "adiuva_accounts", ada.id)
            return row

        two.db.fetchrow = overlapping
        two._cache.clear()
        await two.auth_state(ada.id)
        assert ada.id not in two._cache
        two.db.fetchrow = counted
        # The listening connection killed: the cache is off at once, on again once it reconnects.
        await two.auth_state(ada.id)
        assert ada.id in two._cache
        await backend.value(one, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE application_name = 'adiuva-listener'")
        await _until(lambda: asyncio.sleep(0, not two._listening))
        assert two._cache == {}
        before = reads
        await two.auth_state(ada.id)
        await two.auth_state(ada.id)
        assert reads == before + 2  # no cache without notices
        await _until(lambda: asyncio.sleep(0, two._listening), timeout=10)
        await one.update_user_by_id(ada.id, tier="pro")

        async def pro():
            return (await two.auth_state(ada.id)).tier == "pro"

        await _until(pro)
        await one.delete_user("ada@example.org")

        async def gone():
            return await two.auth_state(ada.id) is None

        await _until(gone)
    finally:
        await two.stop_listening()
        await backend.close()
