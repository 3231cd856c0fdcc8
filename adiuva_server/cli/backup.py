"""`adiuva backup ...`: whole-server backups (not the desktop app's own backups, which users
upload through the API)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from adiuva_server import errors
from adiuva_server.cli.common import EXIT_FAILED, EXIT_USAGE, DataDirOption, fail, load_settings

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
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Where to restore (created if missing); with --to, "
                                           "where the secrets and the license go.")],
    force: Annotated[bool, typer.Option("--force", help="Replace a data dir that is not empty.")] = False,
    to: Annotated[Optional[str], typer.Option("--to", help="Restore into this empty PostgreSQL database "
                                              "(postgresql://...) and the bucket of --s3-bucket instead of the "
                                              "data dir's SQLite file and blob files. Never printed.",
                                              show_default=False)] = None,
    s3_bucket: Annotated[Optional[str], typer.Option("--s3-bucket", help="With --to: the bucket (S3_BUCKET).")] = None,
    s3_endpoint_url: Annotated[Optional[str], typer.Option("--s3-endpoint-url", help="With --to: S3_ENDPOINT_URL.")] = None,
) -> None:
    """Restore an archive into a data dir, or a cluster's PostgreSQL and bucket; a failed restore changes nothing."""
    from adiuva_server.server_backup import read_manifest, restore_backup

    if to is not None:
        _restore_into_cluster(archive, data_dir, to, s3_bucket, s3_endpoint_url)
        return
    try:
        total = read_manifest(archive).total_bytes
        with typer.progressbar(length=total, label="restoring", file=sys.stderr) as bar:
            manifest = restore_backup(archive, data_dir, force=force, progress=bar.update)
    except errors.AdiuvaError as exc:
        fail(exc.detail, EXIT_FAILED)
    typer.echo(f"restored {archive} into {data_dir} ({_counts(manifest)})")


def _restore_into_cluster(archive: Path, data_dir: Path, to: str, s3_bucket: str | None,
                          s3_endpoint_url: str | None) -> None:
    """Verify and unpack the archive beside `data_dir`, copy it into PostgreSQL and the bucket
    (ops/migrate.py: objects first, then every table in one transaction), keep the secrets and
    the license in `data_dir`, remove the unpacked copy."""
    import os
    import shutil
    import tempfile

    from adiuva_server.config import JWT_SECRET_FILE, LICENSE_FILE, Settings
    from adiuva_server.ops.migrate import migrate
    from adiuva_server.server_backup import read_manifest, restore_backup

    env = {**os.environ, "DATABASE_URL": to, "ADIUVA_SINGLE_NODE": "true"}
    for name, value in (("S3_BUCKET", s3_bucket), ("S3_ENDPOINT_URL", s3_endpoint_url)):
        if value is not None:
            env[name] = value
    try:
        target = Settings.from_env(env, data_dir=data_dir)
    except errors.ConfigError as exc:
        fail(exc.detail, EXIT_USAGE)
    if not target.s3_bucket:
        fail("give the bucket the objects go to (--s3-bucket or S3_BUCKET)", EXIT_USAGE)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
    try:
        unpacked = scratch / "data"
        try:
            total = read_manifest(archive).total_bytes
            with typer.progressbar(length=total, label="verifying", file=sys.stderr) as bar:
                manifest = restore_backup(archive, unpacked, progress=bar.update)
            source = Settings.from_env({}, data_dir=unpacked)
            result = asyncio.run(migrate(source, target))
        except errors.AdiuvaError as exc:
            fail(exc.detail, EXIT_FAILED)
        for name in (JWT_SECRET_FILE, LICENSE_FILE):
            if (unpacked / name).is_file() and not (data_dir / name).exists():
                shutil.copy2(unpacked / name, data_dir / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    typer.echo(f"restored {archive} into PostgreSQL and bucket {target.s3_bucket} ({_counts(manifest)}; "
               f"{result.objects} object(s) verified in the bucket); the JWT secret and license are in {data_dir}")
