"""`adiuva plugin ...`: submit plugins and review them, also while the server runs (each
decision is one SQLite transaction; the server reads the catalog on every request)."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated

import typer

from adiuva_server import errors
from adiuva_server.cli.common import EXIT_FAILED, EXIT_USAGE, DataDirOption, fail, load_settings, run_with_db

app = typer.Typer(help="Submit and review marketplace plugins.", no_args_is_help=True)


def _do(data_dir, op):
    from adiuva_server.marketplace.service import MarketplaceService
    from adiuva_server.license.state import LicenseState
    from adiuva_server.marketplace.sqlite import SQLiteMarketplaceStore

    settings = load_settings(data_dir=data_dir, existing=True)

    async def go(db):
        return await op(MarketplaceService(settings, SQLiteMarketplaceStore(db), LicenseState.load(settings)))

    return run_with_db(settings, go)


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
