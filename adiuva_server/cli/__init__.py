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
from adiuva_server.cli.user import app as user_app

app = typer.Typer(
    name="adiuva",
    help="Adiuva server: the self-hosted backend of the Adiuva desktop app.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(user_app, name="user")
app.add_typer(backup_app, name="backup")
app.add_typer(billing_app, name="billing")


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
