"""`adiuva license ...`: install a signed license file (licensed mode), and show its state."""

from __future__ import annotations

from pathlib import Path

import typer

from adiuva_server import errors
from adiuva_server.cli.common import DataDirOption, fail, load_settings

app = typer.Typer(help="Install and show the server's license (licensed mode).", no_args_is_help=True)


@app.command("install")
def install(
    file: Path = typer.Argument(..., help="The license file (JSON, signed).", show_default=False),
    data_dir: DataDirOption = None,
) -> None:
    """Verify a license file and install it (a running server picks it up at its daily check or restart)."""
    from adiuva_server.license.install import install as install_license
    from adiuva_server.license.state import LicenseStatus

    settings = load_settings(data_dir=data_dir)
    was_licensed = settings.licensed
    try:
        ev = install_license(settings, file)
    except errors.LicenseRefused as exc:
        fail(exc.detail)
        raise  # unreachable
    lic = ev.license
    assert lic is not None
    typer.echo(f"installed the license of {lic.licensee} ({lic.id}) as {settings.license_path}")
    typer.echo(f"state: {ev.status.value}; features: {', '.join(sorted(lic.features)) or 'none'}")
    if ev.status is not LicenseStatus.VALID:
        typer.echo(f"warning: {ev.reason}", err=True)
    if not was_licensed:
        typer.echo("restart the server to switch it to licensed mode now (otherwise it does at its next daily "
                   "license check); new accounts then get the free tier unless ADIUVA_DEFAULT_TIER says otherwise")


@app.command("show")
def show(data_dir: DataDirOption = None) -> None:
    """The license's state, licensee, features, expiry and days left; or `homelab mode` and why."""
    from adiuva_server.license.state import LicenseState, describe

    settings = load_settings(data_dir=data_dir, create=False)
    state = LicenseState.load(settings)
    for line in describe(state.current):
        typer.echo(line)
    key = "ADIUVA_LICENSE_PUBLIC_KEY" if settings.license_public_key else "the built-in production key"
    typer.echo(f"file: {settings.license_path} (verified with {key})")
