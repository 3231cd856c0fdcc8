"""`adiuva billing ...`: Stripe billing in licensed mode."""

from __future__ import annotations

import typer

from adiuva_server.cli.common import EXIT_USAGE, DataDirOption, fail, load_settings, run_with_stores

app = typer.Typer(help="Stripe billing (licensed mode).", no_args_is_help=True)


async def reconcile(settings, stores) -> list[str]:
    """Read every subscription from Stripe, repair what disagrees; lines saying what changed."""
    from adiuva_server.billing.service import BillingService, stripe_gateway
    from adiuva_server.license.state import LicenseState

    async with stripe_gateway(settings) as gateway:
        service = BillingService(settings, stores.billing, gateway,
                                 LicenseState.load(settings))
        result = await service.reconcile()
    lines = [f"{c.email}: {c.old} -> {c.new}" for c in result.changes]
    lines.append(f"{len(result.changes)} tier(s) repaired, {result.updated} subscription state(s) updated"
                 + (f", {result.unknown} subscription(s) of customers not on this server" if result.unknown else ""))
    return lines


@app.command("reconcile")
def reconcile_command(data_dir: DataDirOption = None) -> None:
    """Re-read every subscription from Stripe and repair every tier that disagrees (missed webhooks)."""
    from adiuva_server.billing import mode
    from adiuva_server.license.state import LicenseState

    settings = load_settings(data_dir=data_dir, existing=True)
    if not mode.billing_enabled(LicenseState.load(settings)):
        fail("billing is not enabled on this server (homelab mode): there is nothing to reconcile", EXIT_USAGE)
    if not settings.stripe_secret_key:
        fail("STRIPE_SECRET_KEY is not set: cannot read subscriptions from Stripe", EXIT_USAGE)
    lines = run_with_stores(settings, lambda stores: reconcile(settings, stores))
    for line in lines:
        typer.echo(line)
