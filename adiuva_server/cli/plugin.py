"""`adiuva plugin ...`: submit plugins and review them, also while the server runs (each
decision is one database transaction; the server reads the catalog on every request)."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated

import typer

from adiuva_server import errors
from adiuva_server.cli.common import EXIT_FAILED, EXIT_USAGE, DataDirOption, fail, load_settings, run_with_stores

app = typer.Typer(help="Submit and review marketplace plugins.", no_args_is_help=True)


def _do(data_dir, op, *, stripe: bool = False):
    """Run `op(service)` on the server's marketplace; with `stripe`, the service talks to Stripe
    (STRIPE_SECRET_KEY) as the server does."""
    from adiuva_server.billing.service import stripe_gateway
    from adiuva_server.license.state import LicenseState
    from adiuva_server.marketplace.service import MarketplaceService

    settings = load_settings(data_dir=data_dir, existing=True)

    async def go(stores):
        license = LicenseState.load(settings)
        if not stripe:
            return await op(MarketplaceService(settings, stores.marketplace, license))
        async with stripe_gateway(settings) as gateway:
            return await op(MarketplaceService(settings, stores.marketplace, license, gateway))

    return run_with_stores(settings, go)


def reviewer() -> str:
    """Who decided, as the review record keeps it: the CLI's operating-system user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@app.command("submit")
def submit(
    path: Annotated[Path, typer.Argument(help="A plugin folder (manifest.json and its files) or a .tar.gz package.")],
    data_dir: DataDirOption = None,
) -> None:
    """Run the automated checks on a plugin; when they pass it waits for review (pending_review)."""
    from adiuva_server.marketplace.checks import build_package

    if path.is_dir():
        data = build_package(path)
    elif path.is_file():
        data = path.read_bytes()
    else:
        fail(f"{path} is neither a plugin folder nor a package file", EXIT_USAGE)

    async def op(service):
        try:
            return await service.submit(data, submitted_by="cli", owner_id=None, admin=True)
        except errors.PluginChecksFailed as exc:
            return exc

    result = _do(data_dir, op)
    if isinstance(result, errors.PluginChecksFailed):
        typer.echo(f"error: {path} failed the automated checks:", err=True)
        for failure in result.failures:
            typer.echo(f"  {failure.check}: {failure.detail}", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"{result.plugin_id} {result.version} passed the automated checks and waits for review "
               f"(submission {result.submission_id}, sha256 {result.checksum})")


@app.command("pending")
def pending(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """List the submissions waiting for review."""
    items = _do(data_dir, lambda s: s.pending())
    if as_json:
        for v in items:
            typer.echo(json.dumps({"plugin_id": v.plugin_id, "version": v.version, "name": v.manifest.get("name"),
                                   "submission_id": v.submission_id, "submitted_by": v.submitted_by,
                                   "submitted_at": v.submitted_at, "permissions": v.manifest.get("permissions"),
                                   "price_cents": v.manifest.get("price_cents"), "checksum": v.checksum}))
        return
    if not items:
        typer.echo("nothing waits for review")
        return
    for v in items:
        perms = ", ".join(v.manifest.get("permissions", [])) or "none"
        typer.echo(f"{v.plugin_id} {v.version}  {v.manifest.get('name')!r}  by {v.submitted_by}  "
                   f"submitted {v.submitted_at}  permissions: {perms}")


@app.command("approve")
def approve(
    plugin_id: Annotated[str, typer.Argument(metavar="ID", help="The plugin's id.")],
    notes: Annotated[str, typer.Option(help="The reviewer's notes, kept with the decision.")] = "",
    data_dir: DataDirOption = None,
) -> None:
    """Approve (and sign) the version of a plugin that waits for review."""
    v = _do(data_dir, lambda s: s.approve(plugin_id, reviewer=reviewer(), notes=notes))
    typer.echo(f"{v.plugin_id} {v.version} approved and signed (key {v.key_id}); it is in the catalog")


@app.command("reject")
def reject(
    plugin_id: Annotated[str, typer.Argument(metavar="ID", help="The plugin's id.")],
    reason: Annotated[str, typer.Option(help="Why, for the developer (required).")],
    data_dir: DataDirOption = None,
) -> None:
    """Reject the version of a plugin that waits for review."""
    v = _do(data_dir, lambda s: s.reject(plugin_id, reviewer=reviewer(), reason=reason))
    typer.echo(f"{v.plugin_id} {v.version} rejected")


@app.command("revoke")
def revoke(
    plugin_id: Annotated[str, typer.Argument(metavar="ID", help="The plugin's id.")],
    notes: Annotated[str, typer.Option(help="Why, kept with the decision.")] = "",
    data_dir: DataDirOption = None,
) -> None:
    """Withdraw a plugin: gone from the catalog, shown revoked in its users' installed lists."""
    p = _do(data_dir, lambda s: s.revoke(plugin_id, reviewer=reviewer(), notes=notes))
    typer.echo(f"{p.id} revoked ({p.install_count} installation(s) now show it revoked)")


# -- revenue (licensed mode) ---------------------------------------------------------------------

developer_app = typer.Typer(help="Plugin developers and the Stripe connected accounts they are paid through.",
                            no_args_is_help=True)
app.add_typer(developer_app, name="developer")


def _cents(amount: int, currency: str) -> str:
    sign = "-" if amount < 0 else ""
    return f"{sign}{abs(amount) // 100}.{abs(amount) % 100:02d} {currency}"


@developer_app.command("add")
def developer_add(
    email: Annotated[str, typer.Argument(help="The developer's account (it must exist on this server).")],
    stripe_account: Annotated[str, typer.Option("--stripe-account", help="Their Stripe connected account, acct_...")],
    plugin: Annotated[list[str] | None, typer.Option("--plugin", help="Also make them the owner of this plugin "
                                                      "(repeatable): its sales are paid to them from now on.")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Pay a developer's plugins (70 % of each sale) to their Stripe connected account; again: replaced."""
    d = _do(data_dir, lambda s: s.add_developer(email, stripe_account, plugin or []), stripe=True)
    owned = f"; owns {', '.join(plugin)}" if plugin else ""
    typer.echo(f"{d.email} is a plugin developer paid through {d.stripe_account}{owned}")


@developer_app.command("list")
def developer_list(data_dir: DataDirOption = None) -> None:
    """Every developer and their connected account."""
    found = _do(data_dir, lambda s: s.developers())
    for d in found:
        typer.echo(f"{d.email}  {d.stripe_account}  since {d.created_at}")
    if not found:
        typer.echo("no plugin developers yet (add one with `adiuva plugin developer add`)")


def _date(value: str | None, name: str):
    import datetime as dt

    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        fail(f"{name} must be a date, YYYY-MM-DD (got {value!r})", EXIT_USAGE)


@app.command("earnings")
def earnings(
    developer: Annotated[str | None, typer.Option(help="One developer's email; default: everyone, and the "
                                                  "operator's own plugins.")] = None,
    since: Annotated[str | None, typer.Option("--from", help="First day, YYYY-MM-DD; default: the 1st of the "
                                               "month of --to.")] = None,
    until: Annotated[str | None, typer.Option("--to", help="Last day, included; default: today.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Plugin revenue over a period from the ledger: gross, fee and developers' share per plugin."""
    from adiuva_server.marketplace.models import EarningsOut

    first, last = _date(since, "--from"), _date(until, "--to")
    report = EarningsOut.of(_do(data_dir, lambda s: s.earnings(developer, first, last)))
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    typer.echo(f"plugin earnings {report.from_} to {report.to}" + (f" of {report.developer}" if report.developer else ""))
    for i in report.items:
        who = i.developer or "(operator)"
        typer.echo(f"  {who}  {i.plugin_id}  {i.sales} sale(s), {i.refunds} refund(s)  gross "
                   f"{_cents(i.gross_cents, i.currency)}  fee {_cents(i.fee_cents, i.currency)}  developer "
                   f"{_cents(i.developer_cents, i.currency)}")
    for t in report.totals:
        typer.echo(f"  total {t.currency}: gross {_cents(t.gross_cents, t.currency)}, fee "
                   f"{_cents(t.fee_cents, t.currency)}, developers {_cents(t.developer_cents, t.currency)}")
    if not report.items:
        typer.echo("  no sales in this period")


@app.command("purchases")
def purchases(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """The latest 100 plugin purchases (their ids are what `adiuva plugin refund` takes)."""
    from adiuva_server.marketplace.models import PurchaseOut

    for p in _do(data_dir, lambda s: s.purchases()):
        if as_json:
            typer.echo(PurchaseOut.of(p).model_dump_json())
        else:
            typer.echo(f"{p.id}  {p.state:8}  {p.plugin_id}  {_cents(p.price_cents, p.currency)}  user {p.user_id}  "
                       f"{p.created_at}")


@app.command("refund")
def refund(
    purchase_id: Annotated[str, typer.Argument(metavar="PURCHASE_ID", help="From `adiuva plugin purchases`.")],
    data_dir: DataDirOption = None,
) -> None:
    """Refund a paid plugin purchase in full: transfer and fee reversed, the plugin uninstalled."""
    p = _do(data_dir, lambda s: s.refund(purchase_id, by=reviewer()), stripe=True)
    typer.echo(f"purchase {p.id} refunded: {_cents(p.price_cents, p.currency)} back to the buyer "
               f"({_cents(p.developer_cents, p.currency)} reversed from the developer)")
