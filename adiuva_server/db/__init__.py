from adiuva_server.db.database import Database, connect

__all__ = ["Database", "connect"]
