from adiuva_server.db.postgres.database import PgDatabase, pg_unavailable, rows_changed

__all__ = ["PgDatabase", "pg_unavailable", "rows_changed"]
