"""The `adiuva` command: one Typer app, a sub-app per noun. Each command is a thin wrapper
around an importable function."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from adiuva_server import __version__, errors
from adiuva_server.cli.common import DataDirOption, fail, load_settings
from adiuva_server.cli.backup import app as backup_app
from adiuva_server.cli.billing import app as billing_app
from adiuva_server.cli.license import app as license_app
from adiuva_server.cli.user import app as user_app
from adiuva_server.cli.plugin import app as plugin_app

app = typer.Typer(
    name="adiuva",
    help="Adiuva server: the self-hosted backend of the Adiuva desktop app.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(user_app, name="user")
app.add_typer(backup_app, name="backup")
app.add_typer(plugin_app, name="plugin")
app.add_typer(billing_app, name="billing")
app.add_typer(license_app, name="license")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"adiuva {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    pass


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (ADIUVA_HOST; default 0.0.0.0, every interface).")] = None,
    port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="TCP port (ADIUVA_PORT; default 8000).")] = None,
    data_dir: DataDirOption = None,
    tls: Annotated[Optional[bool], typer.Option("--tls/--no-tls", help="Serve HTTPS with a self-signed certificate kept in the data dir (ADIUVA_TLS).", show_default=False)] = None,
    cert: Annotated[Optional[Path], typer.Option(help="Your own TLS certificate (PEM, chain first); implies --tls.")] = None,
    key: Annotated[Optional[Path], typer.Option(help="The private key of --cert (PEM).")] = None,
) -> None:
    """Run the server in the foreground until SIGINT or SIGTERM."""
    from adiuva_server.cli.serve import run

    settings = load_settings(data_dir=data_dir, host=host, port=port, tls=tls, tls_cert=cert, tls_key=key)
    try:
        run(settings)
    except errors.ConfigError as exc:
        fail(exc.detail, code=2)
    except OSError as exc:
        fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", code=1)


@app.command()
def doctor(
    fix: Annotated[bool, typer.Option("--fix", help="Mend what is safe to mend (permissions, leftover files).")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Check the database, the stored objects, permissions and the LLM provider."""
    import asyncio

    from adiuva_server.doctor import FAIL, run_doctor

    settings = load_settings(data_dir=data_dir, existing=True)
    findings = asyncio.run(run_doctor(settings, fix=fix))
    for finding in findings:
        typer.echo(str(finding))
    failed = [f for f in findings if f.level == FAIL]
    typer.echo("all is well" if not failed else f"{len(failed)} problem(s) found")
    raise typer.Exit(1 if failed else 0)


@app.command()
def migrate(
    to: Annotated[Optional[str], typer.Option("--to", help="The PostgreSQL database to move into (postgresql://...; "
                                              "empty, or made by adiuva and without users; default: DATABASE_URL, "
                                              "which keeps the password out of the process list). Never printed.",
                                              show_default=False)] = None,
    s3_bucket: Annotated[Optional[str], typer.Option("--s3-bucket", help="The bucket the blobs go to (S3_BUCKET).")] = None,
    s3_endpoint_url: Annotated[Optional[str], typer.Option("--s3-endpoint-url", help="S3-compatible endpoint "
                                                           "(S3_ENDPOINT_URL; default AWS). Keys: AWS_ACCESS_KEY_ID, "
                                                           "AWS_SECRET_ACCESS_KEY.")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Copy this homelab server into PostgreSQL and an S3 bucket, verified; the data dir is only read."""
    import asyncio

    from adiuva_server.config import JWT_SECRET_FILE, Settings
    from adiuva_server.ops.migrate import Plan, migrate as run_migration

    to = to or os.environ.get("DATABASE_URL")
    if not to:
        fail("say where to migrate to: --to postgresql://... or DATABASE_URL", code=2)
    # The data dir's own settings: the homelab server's (no DATABASE_URL, no bucket).
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "S3_BUCKET", "REDIS_URL")}
    try:
        settings = Settings.from_env(base, data_dir=data_dir)
    except errors.ConfigError as exc:
        fail(exc.detail, code=2)
    if not settings.db_path.exists():
        fail(f"no Adiuva database in {settings.data_dir}; pass the homelab server's data dir (--data-dir)", code=2)
    env = {**os.environ, "DATABASE_URL": to, "ADIUVA_SINGLE_NODE": "true"}  # the target is not a server
    for name, value in (("S3_BUCKET", s3_bucket), ("S3_ENDPOINT_URL", s3_endpoint_url)):
        if value is not None:
            env[name] = value
    try:
        target = Settings.from_env(env, data_dir=settings.data_dir)
    except errors.ConfigError as exc:
        fail(exc.detail, code=2)
    bar = None

    def on_plan(plan: Plan) -> None:
        nonlocal bar
        typer.echo(f"copying {len(plan.objects)} object(s) to bucket {target.s3_bucket}, then {plan.rows} row(s) "
                   "to PostgreSQL", err=True)
        bar = typer.progressbar(length=plan.total, label="migrating", file=sys.stderr)
        bar.__enter__()

    try:
        result = asyncio.run(run_migration(settings, target, on_plan=on_plan, progress=lambda n: bar.update(n)))
    except errors.ValidationError as exc:
        fail(exc.detail, code=2)
    except errors.AdiuvaError as exc:
        fail(exc.detail, code=1)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    tables = ", ".join(f"{n} {t}" for t, n in sorted(result.rows.items()) if n)
    typer.echo(f"migrated: {result.objects} object(s), {result.object_bytes} bytes, each hash verified in the bucket "
               f"({result.objects_present} there already); {sum(result.rows.values())} row(s), counts verified "
               f"({tables})")
    typer.echo(f"{settings.data_dir} is unchanged. On every node set DATABASE_URL, S3_BUCKET, REDIS_URL and "
               f"JWT_SECRET to "
               + ("the same JWT_SECRET as here" if os.environ.get("JWT_SECRET") else
                  f"the contents of {settings.data_dir / JWT_SECRET_FILE}") + " (so issued tokens stay valid)"
               + (", and ADIUVA_LICENSE_FILE to a copy of the license" if settings.license_path.exists() else ""))


@app.command()
def openapi(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the server's OpenAPI 3.1 document."""
    from adiuva_server.app import FEATURES
    from adiuva_server.http.openapi import build_openapi

    doc = json.dumps(build_openapi([spec for feature in FEATURES for spec in feature.specs]), indent=2)
    if out:
        out.write_text(doc + "\n")
    else:
        sys.stdout.write(doc + "\n")


def main() -> None:
    # Everything the server writes (database, secrets, blobs) is for this user only.
    os.umask(0o077)
    app(prog_name="adiuva")
