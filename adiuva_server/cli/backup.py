"""`adiuva backup ...`: whole-server backups (not the desktop app's own backups, which users
upload through the API)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from adiuva_server import errors
from adiuva_server.cli.common import EXIT_FAILED, DataDirOption, fail, load_settings

app = typer.Typer(help="Back up, verify and restore the whole server.", no_args_is_help=True)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _counts(manifest) -> str:
    return ", ".join(f"{v} {k}" for k, v in manifest.counts.items())


@app.command("create")
def create(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Archive to write (default: <data dir>/server-backups/adiuva-<UTC time>.tar).")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Snapshot the whole server into one archive while it keeps serving."""
    from adiuva_server.server_backup import create_backup

    settings = load_settings(data_dir=data_dir, existing=True)
    bar = None

    def on_total(total: int) -> None:
        nonlocal bar
        bar = typer.progressbar(length=total, label="writing archive", file=sys.stderr)
        bar.__enter__()

    try:
        path, manifest = asyncio.run(create_backup(settings, out, progress=lambda n: bar.update(n), on_total=on_total))
    except errors.AdiuvaError as exc:
        fail(exc.detail, EXIT_FAILED)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    typer.echo(f"backup written: {path} ({_human(path.stat().st_size)}; {_counts(manifest)})")


@app.command("verify")
def verify(archive: Path) -> None:
    """Read a whole archive and check every hash and the database's integrity."""
    from adiuva_server.server_backup import read_manifest, verify_backup

    try:
        total = read_manifest(archive).total_bytes
        with typer.progressbar(length=total, label="verifying", file=sys.stderr) as bar:
            manifest = verify_backup(archive, progress=bar.update)
    except errors.AdiuvaError as exc:
        fail(exc.detail, EXIT_FAILED)
    typer.echo(f"ok: {archive} from {manifest.created_at} (adiuva {manifest.server_version}; {_counts(manifest)})")


@app.command("list")
def list_(data_dir: DataDirOption = None) -> None:
    """List the archives in <data dir>/server-backups."""
    from adiuva_server.server_backup import backup_dir, list_backups

    # No database needed (after a disaster this is how to find an archive), and nothing created.
    settings = load_settings(data_dir=data_dir, create=False)
    archives = list_backups(settings)
    if not archives:
        typer.echo(f"no backups in {backup_dir(settings)}")
        return
    for path, size, manifest in archives:
        detail = f"{manifest.created_at}  {_counts(manifest)}" if manifest else "UNREADABLE"
        typer.echo(f"{path.name}  {_human(size):>10}  {detail}")


@app.command("restore")
def restore(
    archive: Path,
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Where to restore (created if missing).")],
    force: Annotated[bool, typer.Option("--force", help="Replace a data dir that is not empty.")] = False,
) -> None:
    """Restore an archive into a data dir; a failed restore leaves the data dir as it was."""
    from adiuva_server.server_backup import read_manifest, restore_backup

    try:
        total = read_manifest(archive).total_bytes
        with typer.progressbar(length=total, label="restoring", file=sys.stderr) as bar:
            manifest = restore_backup(archive, data_dir, force=force, progress=bar.update)
    except errors.AdiuvaError as exc:
        fail(exc.detail, EXIT_FAILED)
    typer.echo(f"restored {archive} into {data_dir} ({_counts(manifest)})")
