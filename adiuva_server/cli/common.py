from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from adiuva_server import errors
from adiuva_server.config import Settings, ensure_data_dir

T = TypeVar("T")

DataDirOption = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="Data directory (ADIUVA_DATA_DIR; default: the platform's user data dir).", show_default=False),
]

# Exit codes: 0 ok, 1 the operation failed (unknown user, taken email, ...), 2 bad input.
EXIT_FAILED = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_FAILED) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings(*, existing: bool = False, create: bool = True, missing_hint: str | None = None, **overrides) -> Settings:
    """The settings, with the data dir created if needed (`create=False`: left as it is, for
    commands that only look). `existing=True` (commands that work on a server's data) refuses
    a data dir without a database instead: a mistyped --data-dir must not quietly become a new,
    empty server."""
    try:
        settings = Settings.from_env(**overrides)
        # On PostgreSQL (DATABASE_URL) the server's data is there, not in the data dir.
        if existing and settings.backend == "sqlite" and not settings.db_path.exists():
            fail(f"no Adiuva database in {settings.data_dir}; pass the data dir of your server "
                 "(--data-dir or ADIUVA_DATA_DIR), or " + (missing_hint or "start the server there once with adiuva serve"),
                 EXIT_USAGE)
        return ensure_data_dir(settings) if create else settings
    except errors.ConfigError as exc:
        fail(exc.detail, EXIT_USAGE)
        raise  # unreachable


def run_with_stores(settings: Settings, fn: Callable[..., Awaitable[T]]) -> T:
    """Open every store on the backend the settings choose (compose.open_stores: the data dir's
    SQLite file, or DATABASE_URL's PostgreSQL; migrated if needed), run `fn(stores)`, close;
    domain errors become a message on stderr and an exit code."""
    from adiuva_server.compose import open_stores

    async def go() -> T:
        async with open_stores(settings) as stores:
            return await fn(stores)

    try:
        return asyncio.run(go())
    except errors.ValidationError as exc:
        fail(exc.detail, EXIT_USAGE)
    except errors.AdiuvaError as exc:
        fail(exc.detail, EXIT_FAILED)
    raise AssertionError("unreachable")
