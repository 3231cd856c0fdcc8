"""The admin console at /admin: server-rendered pages over the AdminService (the code behind
/api/v1/admin/...), with its own cookie sessions, CSRF tokens and first-run setup."""

from adiuva_server.console.routes import setup_console

__all__ = ["setup_console"]
