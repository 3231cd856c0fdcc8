"""The MarketplaceStore contract, on both backends: SQLite (a real file) and PostgreSQL (a real
server, tests/servers_postgres.py). The same service over each store must behave the same:
the bundled import, submissions and their catalog rules, decisions, installs and ratings with
exact counters under concurrency and user deletion, browsing order, the signing key."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from adiuva_server import errors
from adiuva_server.db import Database
from adiuva_server.db.postgres import PgDatabase
from adiuva_server.db.postgres.database import migrations as pg_migrations
from adiuva_server.marketplace import revenue
from adiuva_server.marketplace.postgres import PostgresMarketplaceStore
from adiuva_server.marketplace.service import MarketplaceService
from adiuva_server.marketplace.signing import SigningKey
from adiuva_server.marketplace.sqlite import SQLiteMarketplaceStore
from adiuva_server.marketplace.store import PluginNotInstalled
from tests.conftest import REPO, make_settings
from tests.plugin_kit import package


class Backend:
    """A store on one backend, and a way to make users (the rows installs point at)."""

    def __init__(self, name: str, db, store) -> None:
        self.name, self.db, self.store = name, db, store

    async def add_user(self) -> str:
        uid = str(uuid.uuid4())
        if self.name == "sqlite":
            await self.db.execute_write(
                "INSERT INTO users (id, email, password_hash, tier, is_admin, created_at) VALUES (?, ?, 'x', 'team', 0, "
                "'2026-01-01T00:00:00Z')", (uid, f"{uid}@example.org"))
            return uid
        # Whatever the accounts migration's users table requires, filled with placeholders.
        cols = await self.db.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'users' "
            "AND is_nullable = 'NO' AND column_default IS NULL AND column_name != 'id'")
        values = [uid] + [f"{uid}@example.org" if c["column_name"] == "email" else
                          0 if c["data_type"] in ("bigint", "integer", "smallint") else
                          False if c["data_type"] == "boolean" else "x" for c in cols]
        names = ", ".join(["id", *(c["column_name"] for c in cols)])
        marks = ", ".join(f"${i + 1}" for i in range(len(values)))
        await self.db.execute(f"INSERT INTO users ({names}) VALUES ({marks})", *values)
        return uid

    async def delete_user(self, uid: str) -> None:
        if self.name == "sqlite":
            await self.db.execute_write("DELETE FROM users WHERE id = ?", (uid,))
        else:
            await self.db.execute("DELETE FROM users WHERE id = $1", uid)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_kind(request) -> tuple[str, str | None]:
    # pg_url (a synchronous fixture) only for the PostgreSQL runs, and outside the event loop.
    return request.param, request.getfixturevalue("pg_url") if request.param == "postgresql" else None


@pytest.fixture
async def backend(backend_kind, tmp_path):
    kind, url = backend_kind
    if kind == "sqlite":
        db = await Database.open(tmp_path / "store.db")
        yield Backend("sqlite", db, SQLiteMarketplaceStore(db))
        await db.close()
        return
    if not any("CREATE TABLE users" in sql for _, _, sql in pg_migrations()):
        # Until the PostgreSQL accounts schema is on this branch: the one column installs need.
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE users (id text PRIMARY KEY)")
        await conn.close()
    db = await PgDatabase.open(url)
    yield Backend("postgresql", db, PostgresMarketplaceStore(db))
    await db.close()


@pytest.fixture
def service(backend, tmp_path):
    settings = make_settings(tmp_path / "data", plugins_dir=str(REPO / "plugins"))
    return MarketplaceService(settings, backend.store)


async def test_bundled_import_is_idempotent(service, backend):
    assert len(await service.import_bundled()) == 3
    assert await service.import_bundled() == []
    assert await MarketplaceService(service.settings, backend.store).import_bundled() == []  # another node, a restart
    items, total = await backend.store.browse(category=None, q=None, sort="newest", offset=0, limit=20)
    assert total == 3 and {p.id for p in items} == {"github-sync", "slack-notifier", "time-tracker"}
    assert [len(await backend.store.versions(p.id)) for p in items] == [1, 1, 1]


async def test_concurrent_imports_add_each_plugin_once(service, backend):
    nodes = [MarketplaceService(service.settings, backend.store) for _ in range(4)]
    results = await asyncio.gather(*(n.import_bundled() for n in nodes))
    assert sorted(x for r in results for x in r) == ["github-sync 1.0.0", "slack-notifier 1.0.0", "time-tracker 1.0.0"]
    keys = {(await n.signing_key()).key_id for n in nodes}
    assert len(keys) == 1  # one key, whoever stored it first


async def test_installs_count_exactly_under_concurrency(service, backend):
    await service.import_bundled()
    users = [await backend.add_user() for _ in range(10)]
    installs = [backend.store.install(u, "github-sync", "2026-12-03T00:00:00.000Z") for u in users for _ in range(3)]
    results = await asyncio.gather(*installs)
    assert all(r is not None and r.state == "installed" for r in results)
    assert (await backend.store.plugin("github-sync")).install_count == 10
    churn = [backend.store.uninstall(u, "github-sync", "2026-12-03T00:00:01.000Z") for u in users[:6]]
    churn += [backend.store.uninstall(u, "github-sync", "2026-12-03T00:00:01.000Z") for u in users[:6]]
    await asyncio.gather(*churn)
    assert (await backend.store.plugin("github-sync")).install_count == 4
    again = await backend.store.install(users[0], "github-sync", "2026-12-03T00:00:02.000Z")
    assert again.price_cents == 0 and again.payment_state == "free"
    assert (await backend.store.plugin("github-sync")).install_count == 5
    # Paid: refused at max_price_cents=0, nothing recorded.
    assert await backend.store.install(users[0], "slack-notifier", "2026-12-03T00:00:03.000Z") is None
    assert (await backend.store.plugin("slack-notifier")).install_count == 0
    assert await backend.store.uninstall(users[0], "nope", "x") is False
    await backend.delete_user(users[0])
    assert (await backend.store.plugin("github-sync")).install_count == 4
    assert [i.plugin_id for i in await backend.store.installed(users[1])] == []
    assert [i.plugin_id for i in await backend.store.installed(users[9])] == ["github-sync"]


async def test_ratings_and_their_sums(service, backend):
    await service.import_bundled()
    a, b = await backend.add_user(), await backend.add_user()
    with pytest.raises(PluginNotInstalled):
        await backend.store.rate(a, "github-sync", 5, "t")
    with pytest.raises(errors.NotFound):
        await backend.store.rate(a, "nope", 5, "t")
    for u in (a, b):
        await backend.store.install(u, "github-sync", "t")
    await asyncio.gather(backend.store.rate(a, "github-sync", 5, "t"), backend.store.rate(b, "github-sync", 2, "t"))
    p = await backend.store.rate(a, "github-sync", 4, "t2")
    assert (p.rating_count, p.rating_sum, p.average_rating) == (2, 6, 3.0)
    assert (await backend.store.user_view(a, "github-sync")).stars == 4
    await backend.delete_user(b)
    p = await backend.store.plugin("github-sync")
    assert (p.rating_count, p.rating_sum) == (1, 4)


async def test_submissions_decisions_and_catalog_rules(service, backend, tmp_path):
    await service.import_bundled()
    dev, other = await backend.add_user(), await backend.add_user()
    v = await service.submit(package(tmp_path), submitted_by=dev, owner_id=dev, admin=False)
    assert v.status == "pending_review"

    async def failed(data, who=dev):
        with pytest.raises(errors.PluginChecksFailed) as info:
            await service.submit(data, submitted_by=who, owner_id=who, admin=False)
        return sorted({f.check for f in info.value.failures})

    assert await failed(package(tmp_path, version="1.1.0")) == ["review_pending"]
    assert await failed(package(tmp_path, version="2.0.0"), other) == ["id_unique", "review_pending"]
    assert await failed(package(tmp_path, id="other-timer"), other) == ["name_unique"]
    assert await failed(package(tmp_path, id="github-sync", name="GitHub Sync", version="9.0.0")) == ["id_unique"]
    approved = await service.approve("focus-timer", reviewer="rev@example.org", notes="ok")
    assert approved.signature and approved.reviewer == "rev@example.org"
    pkg = await backend.store.package("focus-timer")
    key = await service.signing_key()
    from adiuva_server.marketplace.signing import verify

    assert verify(key.public_raw, "focus-timer", "1.0.0", pkg.data, pkg.signature)
    assert await failed(package(tmp_path, version="1.0.0")) == ["version_newer"]
    await service.submit(package(tmp_path, version="1.1.0"), submitted_by=dev, owner_id=dev, admin=False)
    rejected = await service.reject("focus-timer", reviewer="rev@example.org", reason="crashes")
    assert (rejected.status, rejected.notes) == ("rejected", "crashes")
    assert (await backend.store.plugin("focus-timer")).version == "1.0.0"
    await service.submit(package(tmp_path, version="1.1.0"), submitted_by=dev, owner_id=dev, admin=False)
    with pytest.raises(errors.Conflict):  # approving a version that is no longer pending
        await backend.store.approve("focus-timer", "1.0.0", "sig", key.key_id, "rev", "", "t")
    revoked = await service.revoke("focus-timer", reviewer="rev@example.org", notes="malware")
    assert revoked.status == "revoked"
    assert await backend.store.package("focus-timer") is None
    assert await failed(package(tmp_path, version="3.0.0")) == ["plugin_revoked"]
    with pytest.raises(errors.Conflict):
        await service.revoke("focus-timer", reviewer="rev", notes="")
    with pytest.raises(errors.NotFound):
        await service.revoke("nope", reviewer="rev", notes="")
    decisions = [(r.version, r.decision) for r in await backend.store.reviews("focus-timer")]
    assert decisions == [("1.0.0", "approved"), ("1.1.0", "rejected"), ("1.0.0", "revoked")]
    assert [v.status for v in await backend.store.versions("focus-timer")] == ["approved", "rejected", "rejected"]
    assert await backend.store.pending() == []
    assert len(await backend.store.submissions_of(dev)) == 3


async def test_racing_developers_get_one_id(service, backend, tmp_path):
    devs = [await backend.add_user() for _ in range(5)]
    data = package(tmp_path, id="race", name="Race")
    outcomes = await asyncio.gather(*(service.submit(data, submitted_by=d, owner_id=d, admin=False) for d in devs),
                                    return_exceptions=True)
    assert sum(not isinstance(o, Exception) for o in outcomes) == 1
    assert all(isinstance(o, errors.PluginChecksFailed) for o in outcomes if isinstance(o, Exception))


async def test_browse_order_filters_and_pages(service, backend, tmp_path):
    await service.import_bundled()
    for i in range(4):
        pid = f"util-{i}"
        await service.submit(package(tmp_path, id=pid, name=f"Util {i}", category="Utilities",
                                     description="50% off_100"), submitted_by="cli", owner_id=None, admin=True)
        await service.approve(pid, reviewer="r")
    users = [await backend.add_user() for _ in range(3)]
    for u in users:
        await backend.store.install(u, "util-2", "t")
    await backend.store.install(users[0], "util-1", "t")
    await backend.store.rate(users[0], "util-1", 5, "t")
    await backend.store.rate(users[0], "util-2", 3, "t")
    store = backend.store

    async def ids(**kw):
        kw = {"category": None, "q": None, "sort": "rating", "offset": 0, "limit": 20, **kw}
        items, total = await store.browse(**kw)
        return [p.id for p in items], total

    assert (await ids(sort="installs"))[0][:2] == ["util-2", "util-1"]
    assert (await ids(sort="rating"))[0][:2] == ["util-1", "util-2"]
    assert (await ids(sort="newest"))[0][0] == "util-3"
    assert (await ids(category="utilities"))[1] == 4
    assert (await ids(q="GITHUB"))[0] == ["github-sync"]
    assert (await ids(q="50%"))[1] == 4 and (await ids(q="5%"))[1] == 0  # % and _ are literal
    assert (await ids(q="off_1"))[1] == 4 and (await ids(q="of__"))[1] == 0
    page, total = await ids(sort="installs", offset=5, limit=5)
    assert (len(page), total) == (2, 7)
    await service.revoke("util-2", reviewer="r")
    assert "util-2" not in (await ids())[0]
    assert [(i.plugin_id, i.revoked) for i in await store.installed(users[1])] == [("util-2", True)]


async def test_signing_key_first_use_wins(backend):
    a, b = SigningKey.generate(), SigningKey.generate()
    first, second = await asyncio.gather(backend.store.signing_key(a, "t"), backend.store.signing_key(b, "t"))
    assert first == second and first.key_id in (a.key_id, b.key_id)
    assert await backend.store.signing_key(SigningKey.generate(), "t") == first


# -- paid plugins (marketplace/revenue.py), on both backends -----------------------------------


async def test_one_purchase_per_user_and_plugin_and_an_exact_ledger(service, backend):
    await service.import_bundled()  # slack-notifier: EUR 4.99, the operator's own
    buyer, dev = await backend.add_user(), await backend.add_user()
    store = backend.store
    # Twenty racing installs (connections of their own on PostgreSQL): one purchase.
    opened = await asyncio.gather(*(store.open_purchase(buyer, "slack-notifier", str(uuid.uuid4()),
                                                        "2026-12-03T10:00:00.000Z", 1_796_000_000) for _ in range(20)))
    ids = {o.purchase.id for o in opened}
    assert len(ids) == 1 and not any(o.installed for o in opened)
    purchase = opened[0].purchase
    assert (purchase.price_cents, purchase.fee_cents, purchase.developer_cents, purchase.destination) == (499, 499, 0, None)
    assert [(i.state, i.payment_state) for i in await store.installed(buyer)] == [("awaiting_payment", "pending")]
    assert (await store.plugin("slack-notifier")).install_count == 0
    await store.set_checkout(purchase.id, "cs_1", "https://pay/cs_1")
    assert (await store.set_checkout(purchase.id, "cs_other", "x")).checkout_session == "cs_1"  # first one stays
    # A wrong amount installs nothing; two racing confirmations apply once.
    assert "nothing installed" in await store.complete_purchase(purchase.id, "cs_1", "pi_1", 100, "eur", "t1")
    outcomes = await asyncio.gather(*(store.complete_purchase(purchase.id, "cs_1", "pi_1", 499, "eur",
                                                              "2026-12-03T10:01:00.000Z") for _ in range(5)))
    assert sum(o.startswith(f"purchase {purchase.id} paid") for o in outcomes) == 1
    assert [(i.state, i.payment_state) for i in await store.installed(buyer)] == [("installed", "paid")]
    assert (await store.plugin("slack-notifier")).install_count == 1
    again = await store.open_purchase(buyer, "slack-notifier", str(uuid.uuid4()), "t2", 1_796_000_100)
    assert again.installed and again.purchase is None
    # Refunds: once, by id or by payment intent; the ledger nets to zero.
    refunds = await asyncio.gather(store.refunded(purchase_id=purchase.id, refund_id="re_1", now="2026-12-03T11:00:00.000Z"),
                                   store.refunded(payment_intent="pi_1", refund_id="re_1", now="2026-12-03T11:00:00.000Z"))
    assert sum(r.startswith(f"purchase {purchase.id} refunded:") for r in refunds) == 1
    assert await store.installed(buyer) == []
    assert (await store.plugin("slack-notifier")).install_count == 0
    report = await store.earnings(None, "2026-12-01", "2026-12-31", everyone=True)
    assert [(e.developer_id, e.plugin_id, e.sales, e.refunds, e.gross_cents, e.fee_cents) for e in report] == [
        (None, "slack-notifier", 1, 1, 0, 0)]
    with pytest.raises(revenue.PurchaseNotRefundable):
        await store.refundable(purchase.id)
    # A developer's plugin: not for sale without a connected account; then 70/30 to it.
    with pytest.raises(errors.NotFound):
        await store.add_developer("nobody@example.org", "acct_1", [], "t")
    developer = await store.add_developer(f"{dev}@example.org", "acct_dev1", ["time-tracker"], "t")
    assert developer.user_id == dev and [d.stripe_account for d in await store.developers()] == ["acct_dev1"]
    with pytest.raises(errors.Conflict):
        await store.add_developer(f"{buyer}@example.org", "acct_dev1", [], "t")
    sold = await store.open_purchase(buyer, "time-tracker", str(uuid.uuid4()), "2026-12-03T12:00:00.000Z", 1_796_000_200)
    assert (sold.purchase.fee_cents, sold.purchase.developer_cents, sold.purchase.destination) == (300, 699, "acct_dev1")
    await store.complete_purchase(sold.purchase.id, "cs_2", "pi_2", 999, "EUR", "2026-12-03T12:01:00.000Z")
    mine = await store.earnings(dev, "2026-12-01", "2026-12-31", everyone=False)
    assert [(e.plugin_id, e.sales, e.gross_cents, e.fee_cents, e.developer_cents) for e in mine] == [
        ("time-tracker", 1, 999, 300, 699)]
    # The buyer's account deleted: the books stay.
    await backend.delete_user(buyer)
    assert [p.user_id for p in await store.purchases(None, 10)] == [None, None]
    assert len(await store.earnings(None, "2026-12-01", "2026-12-31", everyone=True)) == 2


async def test_a_developer_without_an_account_cannot_sell(service, backend, tmp_path):
    dev, buyer = await backend.add_user(), await backend.add_user()
    data = package(tmp_path, id="mood-board", name="Mood Board", price_cents=299)
    await service.submit(data, submitted_by=dev, owner_id=dev, admin=False)
    await service.approve("mood-board", reviewer="test")
    with pytest.raises(revenue.DeveloperNotPayable):
        await backend.store.open_purchase(buyer, "mood-board", str(uuid.uuid4()), "t", 1)
    assert await backend.store.purchases(None, 10) == [] and await backend.store.installed(buyer) == []


async def test_a_plugin_installed_while_it_was_free_is_not_charged_when_it_gets_a_price(service, backend, tmp_path):
    buyer = await backend.add_user()
    await service.submit(package(tmp_path, id="was-free", name="Was Free"), submitted_by="cli", owner_id=None, admin=True)
    await service.approve("was-free", reviewer="test")
    assert (await backend.store.install(buyer, "was-free", "t")).payment_state == "free"
    await service.submit(package(tmp_path, id="was-free", name="Was Free", version="1.1.0", price_cents=199),
                         submitted_by="cli", owner_id=None, admin=True)
    await service.approve("was-free", reviewer="test")
    opened = await backend.store.open_purchase(buyer, "was-free", str(uuid.uuid4()), "t2", 2)
    assert opened.installed and opened.purchase is None and await backend.store.purchases(None, 10) == []
