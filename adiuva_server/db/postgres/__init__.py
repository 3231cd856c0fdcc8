from adiuva_server.db.postgres.database import PgDatabase, pg_unavailable

__all__ = ["PgDatabase", "pg_unavailable"]
