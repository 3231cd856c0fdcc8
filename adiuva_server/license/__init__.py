"""Licensed mode: the signed license file (format.py), its live state (state.py), installing one
(install.py), and `setup_license(app)`, which puts a LicenseState on the app and checks it daily."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from adiuva_server.keys import CLOCK, LICENSE, SETTINGS
from adiuva_server.license.format import FEATURES, License, LicenseError
from adiuva_server.license.state import LicenseState, LicenseStatus

__all__ = ["FEATURES", "License", "LicenseError", "LicenseState", "LicenseStatus", "setup_license"]


def setup_license(app: web.Application) -> None:
    """Before the services: registration reads max_users and the default tier from it."""
    app.cleanup_ctx.append(_license)


async def _license(app: web.Application) -> AsyncIterator[None]:
    state = app[LICENSE] = LicenseState.for_settings(app[SETTINGS], app[CLOCK])
    await state.check()
    task = asyncio.create_task(state.run_daily())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
