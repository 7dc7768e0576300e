"""Opening a daemon's SQLite database: WAL, a meta table, and a schema version check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aiosqlite


class SchemaError(Exception):
    """The database cannot be opened, or was written by a newer version of the daemon."""


async def open_database(path: Path, schema: Sequence[str], version: int, owner: str,
                        autocommit: bool = False) -> aiosqlite.Connection:
    """Open (creating if needed) ``path``, run ``schema`` (idempotent statements that include
    a ``meta (key, value)`` table) and record or check the schema version.

    ``autocommit``: the caller opens its own transactions (BEGIN ... COMMIT).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        db = await aiosqlite.connect(str(path), isolation_level=None if autocommit else "")
        # WAL: readers never wait for the writer; NORMAL: durable at checkpoints, and a
        # crash loses at most the last transactions, never consistency.
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        for statement in schema:
            await db.execute(statement)
        async with db.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
            row = await cur.fetchone()
        if row is None:
            await db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
        elif int(row[0]) > version:
            await db.close()
            raise SchemaError(f"{path}: schema version {row[0]} is newer than this {owner} "
                              f"understands ({version}); refusing to touch it")
        if not autocommit:
            await db.commit()
    except (OSError, aiosqlite.Error) as exc:
        raise SchemaError(f"cannot open {owner} database {path}: {exc}") from exc
    return db
