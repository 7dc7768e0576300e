"""auditd's SQLite store: packet decisions and control-plane events in one table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiosqlite

from vpnr.core.sqlite import SchemaError, open_database

SCHEMA_VERSION = 1

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS records (
        id INTEGER PRIMARY KEY,
        time_ns INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('packet', 'control')),
        verdict INTEGER, reason INTEGER,
        src TEXT, dst TEXT, src_port INTEGER, dst_port INTEGER, ip_protocol INTEGER,
        roles TEXT, rule_id INTEGER, interface TEXT, peer TEXT,
        daemon TEXT, action TEXT, actor TEXT, version_before INTEGER, version_after INTEGER,
        success INTEGER, detail TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX IF NOT EXISTS records_time ON records (time_ns)",
    "CREATE INDEX IF NOT EXISTS records_src ON records (src, time_ns)",
    "CREATE INDEX IF NOT EXISTS records_dst ON records (dst, time_ns)",
    "CREATE INDEX IF NOT EXISTS records_verdict ON records (verdict, time_ns)",
    "CREATE INDEX IF NOT EXISTS records_rule ON records (rule_id, time_ns)",
]


class StoreError(Exception):
    """The audit database cannot be opened or written."""


class AuditStore:
    """An open audit database."""

    def __init__(self, path: Path, db: aiosqlite.Connection) -> None:
        self.path = path
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> AuditStore:
        """Open (creating if needed) the database and bring its schema up to date."""
        try:
            db = await open_database(path, _SCHEMA, SCHEMA_VERSION, "auditd")
        except SchemaError as exc:
            raise StoreError(str(exc)) from exc
        return cls(path, db)

    async def close(self) -> None:
        """Flush and close."""
        await self._db.close()

    async def schema_version(self) -> int:
        """The schema version stored in the database."""
        async with self._db.execute("SELECT value FROM meta WHERE key='schema_version'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def count(self) -> int:
        """Number of stored records."""
        async with self._db.execute("SELECT count(*) FROM records") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def add_control(self, daemon: str, action: str, actor: str, version_before: int,
                          version_after: int, success: bool, detail: dict[str, Any]) -> int:
        """Store one control-plane event; returns its record id."""
        cur = await self._db.execute(
            "INSERT INTO records (time_ns, kind, daemon, action, actor, version_before,"
            " version_after, success, detail) VALUES (?, 'control', ?, ?, ?, ?, ?, ?, ?)",
            (time.time_ns(), daemon, action, actor, version_before, version_after,
             int(success), json.dumps(detail, sort_keys=True)))
        await self._db.commit()
        return int(cur.lastrowid or 0)
