"""`adiuva user ...`: account administration, safe while the server runs (every change is one
database transaction, on SQLite or DATABASE_URL's PostgreSQL; the server reads tier and account
state on every request)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from adiuva_server.cli.common import EXIT_USAGE, DataDirOption, fail, load_settings, run_with_stores

app = typer.Typer(help="Manage user accounts.", no_args_is_help=True)


def _admin(settings, stores):
    from adiuva_server.auth.passwords import PasswordHasher
    from adiuva_server.auth.service import UserAdmin

    return UserAdmin(settings, stores.accounts, PasswordHasher(settings))


def _do(data_dir, op, *, existing: bool = True, missing_hint: str | None = None):
    settings = load_settings(data_dir=data_dir, existing=existing, missing_hint=missing_hint)

    async def go(stores):
        return await op(_admin(settings, stores))

    return run_with_stores(settings, go)


@app.command("add")
def add(
    email: str,
    password: Annotated[Optional[str], typer.Option(help="The password; generated and printed once when omitted.")] = None,
    tier: Annotated[Optional[str], typer.Option(help="free, pro, power or team (default: ADIUVA_DEFAULT_TIER).")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Make the user an admin.")] = False,
    create: Annotated[bool, typer.Option("--create", "--init", help="Start a new server's data dir here if it has no database (the first admin, before the first start).")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Create an account."""
    # Only with --create may it start a data dir (a first admin before the first `serve`): a
    # mistyped --data-dir must not quietly become a second, empty server.
    user, generated = _do(data_dir, lambda a: a.add(email, password, tier, admin), existing=not create,
                          missing_hint="pass --create to start a new server's data dir there")
    typer.echo(f"created {user.email} (tier {user.tier}{', admin' if user.is_admin else ''}) id {user.id}")
    if generated:
        typer.echo(f"password: {generated}")


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """List accounts."""
    users = _do(data_dir, lambda a: a.list())
    if as_json:
        for u in users:
            typer.echo(json.dumps({"id": u.id, "email": u.email, "tier": u.tier, "admin": u.is_admin,
                                   "disabled": u.disabled, "created_at": u.created_at}))
        return
    if not users:
        typer.echo("no users")
        return
    width = max(len(u.email) for u in users)
    typer.echo(f"{'EMAIL':<{width}}  TIER   ADMIN  STATE     CREATED")
    for u in users:
        state = "disabled" if u.disabled else "active"
        typer.echo(f"{u.email:<{width}}  {u.tier:<5}  {'yes' if u.is_admin else 'no':<5}  {state:<8}  {u.created_at}")


@app.command("passwd")
def passwd(
    email: str,
    password: Annotated[Optional[str], typer.Option(help="The new password; asked for when omitted.")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Set a user's password (asked for, or read from piped input, when not given). Signs the
    user out everywhere and lifts its login back-offs."""
    if password is None:
        password = _read_password()
    user = _do(data_dir, lambda a: a.set_password(email, password))
    typer.echo(f"password changed for {user.email}; its sessions were ended")


def _read_password() -> str:
    if sys.stdin.isatty():
        return typer.prompt("New password", hide_input=True, confirmation_prompt=True)
    # Piped input (a script, `echo pw | adiuva user passwd ...`): the hidden prompt would read the
    # controlling terminal instead (getpass opens /dev/tty), so read the first line of stdin.
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        fail("no password on standard input", EXIT_USAGE)
    return line


@app.command("unlock")
def unlock(email: str, data_dir: DataDirOption = None) -> None:
    """Lift a user's login back-off (failed-password throttles), also on a running server."""
    _do(data_dir, lambda a: a.unlock(email))
    typer.echo(f"{email.strip().lower()} unlocked: failed sign-ins no longer hold it back")


@app.command("set-tier")
def set_tier(email: str, tier: str, data_dir: DataDirOption = None) -> None:
    """Set a user's tier (free, pro, power, team); takes effect on the user's next request."""
    user = _do(data_dir, lambda a: a.set_tier(email, tier))
    typer.echo(f"{user.email} is now on the {user.tier} tier")


@app.command("disable")
def disable(email: str, data_dir: DataDirOption = None) -> None:
    """Disable an account: its tokens stop working at once and it cannot sign in."""
    user = _do(data_dir, lambda a: a.set_disabled(email, True))
    typer.echo(f"{user.email} disabled")


@app.command("enable")
def enable(email: str, data_dir: DataDirOption = None) -> None:
    """Enable a disabled account."""
    user = _do(data_dir, lambda a: a.set_disabled(email, False))
    typer.echo(f"{user.email} enabled")


@app.command("delete")
def delete(
    email: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Delete an account and everything it owns."""
    if not yes:
        typer.confirm(f"Delete {email} and all of its data?", abort=True)
    from adiuva_server.admin.service import delete_user_from_cli

    settings = load_settings(data_dir=data_dir, existing=True)
    deletion = run_with_stores(settings, lambda stores: delete_user_from_cli(settings, stores, email))
    typer.echo(f"{deletion.email} deleted ({deletion.objects_deleted} stored object(s) removed)")
    if deletion.objects_kept:
        typer.echo(f"{deletion.objects_kept} object(s) kept: shared with other users, or written in the last hour "
                   "while the server runs (its next sweep removes those)")
