"""The SQLite layer: works on a Python whose sqlite3 cannot load extensions, loads sqlite-vec
on every connection, migrates once even when two processes start together."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from adiuva_server.db import Database
from adiuva_server.db import database
from adiuva_server.db.database import connect, migrations


async def test_sqlite_vec_is_loaded_on_every_connection(tmp_path):
    db = await Database.open(tmp_path / "a.db")
    try:
        assert (await db.fetchone("SELECT vec_version()"))[0].startswith("v")
        assert db.lookup("SELECT vec_version()")[0].startswith("v")
        async with db.write() as conn:
            async with conn.execute("SELECT vec_length(vec_f32('[1, 2, 3]'))") as cur:
                assert (await cur.fetchone())[0] == 3
        for pragma, expected in [("journal_mode", "wal"), ("foreign_keys", 1), ("busy_timeout", 10000)]:
            assert (await db.fetchone(f"PRAGMA {pragma}"))[0] == expected
    finally:
        await db.close()


async def test_migrations_run_once_even_concurrently(tmp_path):
    path = tmp_path / "a.db"
    dbs = await asyncio.gather(*[Database.open(path) for _ in range(4)])
    for db in dbs:
        await db.close()
    # Never the stdlib sqlite3 on a file this process opens through sqlean: two copies of SQLite
    # in one process drop each other's POSIX locks (sqlite.org/howtocorrupt.html, 2.2).
    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations()[-1][0]
    conn.close()
    again = await Database.open(path)
    await again.close()


async def test_a_failed_write_changes_nothing(tmp_path):
    db = await Database.open(tmp_path / "a.db")
    try:
        try:
            async with db.write() as conn:
                await conn.execute(
                    "INSERT INTO users (id, email, password_hash, created_at) VALUES ('1', 'a@b', 'h', 'now')")
                raise RuntimeError("half way")
        except RuntimeError:
            pass
        assert (await db.fetchone("SELECT count(*) FROM users"))[0] == 0
    finally:
        await db.close()


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "a.db"
    await (await Database.open(path)).close()
    conn = connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    try:
        await Database.open(path)
    except RuntimeError as exc:
        assert "newer than this server" in str(exc)
    else:
        raise AssertionError("opened a database from the future")


@pytest.mark.parametrize("mode", ["wal-index", "pragma"])
async def test_commit_marker_changes_with_every_commit_from_anyone(tmp_path, monkeypatch, mode):
    """The per-request auth cache is exact only if every commit, by our writer or by another
    process (the CLI), changes the marker, and nothing else does."""
    if mode == "pragma":  # where the WAL-index cannot be mapped, SQLite is asked
        monkeypatch.setattr(database, "_open_wal_index", lambda conn, path: None)
    path = tmp_path / "a.db"
    db = await Database.open(path, watch_commits=True)
    try:
        assert (db._wal_header is not None) == (mode == "wal-index")
        marker = db.commit_marker()
        await db.fetchone("SELECT count(*) FROM users")
        assert db.lookup("SELECT count(*) FROM users")[0] == 0
        assert db.commit_marker() == marker  # reads change nothing

        async with db.write() as conn:
            await conn.execute("INSERT INTO users (id, email, password_hash, created_at) VALUES ('1', 'a@b', 'h', 'now')")
        assert db.commit_marker() != marker
        marker = db.commit_marker()

        other = connect(path)  # another connection, as the CLI's
        assert other.execute("UPDATE users SET tier = 'team' WHERE id = '1'").rowcount == 1
        other.close()
        assert db.commit_marker() != marker
        assert db.commit_marker() == db.commit_marker()
    finally:
        await db.close()


def shm_locks(pid: int, shm: Path) -> list[str]:
    """The POSIX locks process `pid` holds on `shm` (Linux's /proc/locks: 'N: POSIX ADVISORY
    READ|WRITE PID MAJ:MIN:INODE START END')."""
    inode = f":{shm.stat().st_ino}"
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "POSIX" and fields[4] == str(pid) and fields[5].endswith(inode):
            found.append(f"{fields[3]} {fields[6]}")
    return found


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see another process's locks")
def test_a_running_server_keeps_its_wal_index_locks(tmp_path):
    """Regression: the server once opened and closed the -shm file itself, which released
    SQLite's own locks on it (POSIX drops all of a process's locks on any close); the next
    process to open the database truncated the file and the server died of SIGBUS or lost
    commits. Two Database objects on one file in one process share the locks the same way."""
    code = (
        "import asyncio, sys\n"
        "from adiuva_server.db import Database\n"
        "async def main():\n"
        "    first = await Database.open(sys.argv[1], watch_commits=True)\n"
        "    db = await Database.open(sys.argv[1], watch_commits=True)\n"
        "    await first.close()  # must not release the locks of the other's connections\n"
        "    print('open', flush=True)\n"
        "    sys.stdin.readline()\n"
        "    for i in range(200):\n"
        "        async with db.write() as conn:\n"
        "            await conn.execute(\"INSERT INTO users (id, email, password_hash, created_at) VALUES (?, ?, 'h', 'now')\", (str(i), f'{i}@b'))\n"
        "        db.commit_marker()\n"
        "        await asyncio.sleep(0.002)\n"
        "    await db.close()\n"
        "asyncio.run(main())\n"
    )
    path = tmp_path / "a.db"
    server = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "open\n"
        # SQLite's "somebody uses this WAL-index" lock (a read lock on byte 128) is still held.
        assert "READ 128" in shm_locks(server.pid, Path(f"{path}-shm"))
        server.stdin.write("go\n")
        server.stdin.flush()
        for _ in range(20):  # other processes come and go, as the CLI does
            other = connect(path)
            other.execute("SELECT count(*) FROM users").fetchone()
            other.close()
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    conn = connect(path)
    assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 200
    conn.close()
