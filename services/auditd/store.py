"""auditd's SQLite store: a catalog plus time-ordered chunk files.

Records are appended to one open *chunk* file that has no secondary index, so a write
costs one B-tree append per record. A chunk that reaches ``chunk_rows`` records (or
``chunk_seconds`` of age) is sealed and indexed in bulk by a second connection while the
next chunk takes the writes: sorting once is several times cheaper than updating six
indexes per insert, and the two connections work on different files in parallel.
Retention drops whole chunk files. Measured figures are in docs/benchmarks.md.

Each write transaction also stores the ring-buffer position it covers (table
``batches``), in the same chunk file as its records, so after a crash auditd resumes
exactly after the last committed record: nothing twice, nothing skipped.

The catalog (``audit.sqlite``) lists the chunks, the role sets records point to, and
persistent counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from vpnr.auditd import records as R
from vpnr.auditd.query import Filter
from vpnr.core.sqlite import SchemaError, open_database

log = logging.getLogger("vpnr.auditd.store")

SCHEMA_VERSION = 2

_CATALOG = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS chunks (
        seq INTEGER PRIMARY KEY, first_id INTEGER, last_id INTEGER,
        min_time_ns INTEGER, max_time_ns INTEGER, rows INTEGER NOT NULL DEFAULT 0,
        sealed INTEGER NOT NULL DEFAULT 0, indexed INTEGER NOT NULL DEFAULT 0,
        created_ns INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rolesets (
        id INTEGER PRIMARY KEY, roles TEXT NOT NULL UNIQUE)""",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
]

_COLUMN_TYPES = {"id": "INTEGER PRIMARY KEY", "time_ns": "INTEGER NOT NULL",
                 "kind": "INTEGER NOT NULL", "src": "BLOB", "dst": "BLOB",
                 "rule_role": "TEXT", "interface": "TEXT", "peer": "TEXT", "daemon": "TEXT",
                 "action": "TEXT", "actor": "TEXT", "detail": "TEXT", "error": "TEXT"}
_CHUNK = [
    "CREATE TABLE IF NOT EXISTS records (" + ", ".join(
        f"{name} {_COLUMN_TYPES.get(name, 'INTEGER')}" for name in R.COLUMNS) + ")",
    # One row per write transaction: the ids it holds and the ring position it covers.
    """CREATE TABLE IF NOT EXISTS batches (
        last_id INTEGER PRIMARY KEY, first_id INTEGER NOT NULL, ring_map_id INTEGER NOT NULL,
        ring_pos INTEGER NOT NULL, committed_ns INTEGER NOT NULL)""",
]
# Built when a chunk is sealed. Each index ends in the rowid (id), so "newest first" walks
# an index in order.
CHUNK_INDEXES = {
    "records_time": "time_ns", "records_src": "src", "records_dst": "dst",
    "records_roleset": "roleset", "records_verdict": "verdict", "records_rule": "rule_id",
}
_CHUNK_PRAGMAS = ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL",
                  "PRAGMA cache_size=-65536"]

_INSERT_PACKET = (f"INSERT INTO records ({', '.join(R.COLUMNS[:R.PACKET_WIDTH])}) VALUES "
                  f"({', '.join('?' * R.PACKET_WIDTH)})")
_INSERT_ANY = (f"INSERT INTO records ({', '.join(R.COLUMNS)}) VALUES "
               f"({', '.join('?' * len(R.COLUMNS))})")
_SELECT = f"SELECT {', '.join(R.COLUMNS)} FROM records"


class StoreError(Exception):
    """The audit database cannot be opened or written."""


@dataclass
class Chunk:
    """One chunk file as the catalog lists it."""

    seq: int
    path: Path
    first_id: int | None = None
    last_id: int | None = None
    min_time_ns: int | None = None
    max_time_ns: int | None = None
    rows: int = 0
    sealed: bool = False
    indexed: bool = False
    created_ns: int = 0

    def may_hold(self, flt: Filter) -> bool:
        """False when the chunk's time span cannot meet the filter's range."""
        if not self.sealed or self.min_time_ns is None or self.max_time_ns is None:
            return True
        if flt.time_from is not None and self.max_time_ns < flt.time_from:
            return False
        return not (flt.time_to is not None and self.min_time_ns >= flt.time_to)


@dataclass(frozen=True)
class ResumePoint:
    """Where the last committed write left the ring buffer."""

    ring_map_id: int
    ring_pos: int


class AuditStore:
    """The catalog and its chunks; one writer (the drain loop), many readers."""

    def __init__(self, path: Path, catalog: aiosqlite.Connection, chunk_rows: int,
                 chunk_seconds: float, retention: tuple[float, int]) -> None:
        self.path = path
        self.chunk_dir = path.with_name(path.name + ".chunks")
        self._catalog = catalog
        self.chunk_rows = chunk_rows
        self.chunk_seconds = chunk_seconds
        self.retention = retention   # (max age in seconds, max bytes or 0)
        self.chunks: list[Chunk] = []
        self.rolesets: dict[int, tuple[str, ...]] = {}
        self._roleset_ids: dict[tuple[str, ...], int] = {}
        self._new_rolesets: list[tuple[int, tuple[str, ...]]] = []
        self._writer: aiosqlite.Connection | None = None
        self._indexing: set[asyncio.Task[None]] = set()
        self.next_id = 1
        self.resume: ResumePoint | None = None
        self.retention_deleted = 0

    # -- opening ----------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, chunk_rows: int = 500_000, chunk_seconds: float = 3600.0,
                   retention: tuple[float, int] = (30 * 86400.0, 0)) -> AuditStore:
        """Open (creating if needed) the catalog and the open chunk. ``retention`` is
        (max age in seconds, max bytes or 0), applied by :meth:`apply_retention`."""
        try:
            catalog = await open_database(path, _CATALOG, SCHEMA_VERSION, "auditd",
                                          autocommit=True)
        except SchemaError as exc:
            raise StoreError(str(exc)) from exc
        store = cls(path, catalog, chunk_rows, chunk_seconds, retention)
        try:
            store.chunk_dir.mkdir(mode=0o750, exist_ok=True)
            await store._load()
        except (OSError, sqlite3.Error) as exc:
            await catalog.close()
            raise StoreError(f"cannot open audit chunks in {store.chunk_dir}: {exc}") from exc
        return store

    def chunk_path(self, seq: int) -> Path:
        """File of chunk ``seq``."""
        return self.chunk_dir / f"{seq:08d}.sqlite"

    async def _load(self) -> None:
        async with self._catalog.execute(
                "SELECT seq, first_id, last_id, min_time_ns, max_time_ns, rows, sealed, indexed,"
                " created_ns FROM chunks ORDER BY seq") as cur:
            async for seq, first, last, low, high, rows, sealed, indexed, created in cur:
                self.chunks.append(Chunk(seq, self.chunk_path(seq), first, last, low, high,
                                         rows, bool(sealed), bool(indexed), created))
        async with self._catalog.execute("SELECT id, roles FROM rolesets") as cur:
            async for rid, roles in cur:
                names = tuple(roles.split(",")) if roles else ()
                self.rolesets[rid] = names
                self._roleset_ids[names] = rid
        async with self._catalog.execute(
                "SELECT value FROM counters WHERE name='retention_deleted'") as cur:
            row = await cur.fetchone()
        self.retention_deleted = int(row[0]) if row else 0
        open_chunks = [c for c in self.chunks if not c.sealed]
        if not open_chunks:
            await self._new_chunk()
        else:
            for extra in open_chunks[:-1]:  # cannot happen unless a seal was interrupted
                await self._mark_sealed(extra)
        current = self.chunks[-1]
        self._writer = await self._open_chunk(current.path)
        await self._refresh_open_chunk_stats()
        for chunk in reversed(self.chunks):
            if chunk.last_id is not None:
                self.next_id = chunk.last_id + 1
                break
        self.resume = await self._last_batch()
        for chunk in self.chunks:
            if chunk.sealed and not chunk.indexed:
                self._index_later(chunk)

    @staticmethod
    async def _open_chunk(path: Path) -> aiosqlite.Connection:
        db = await aiosqlite.connect(str(path), isolation_level=None)
        for pragma in _CHUNK_PRAGMAS:
            await db.execute(pragma)
        for statement in _CHUNK:
            await db.execute(statement)
        os.chmod(path, 0o640)
        return db

    async def _new_chunk(self) -> None:
        seq = (self.chunks[-1].seq + 1) if self.chunks else 1
        chunk = Chunk(seq, self.chunk_path(seq), created_ns=time.time_ns())
        await self._catalog.execute("INSERT INTO chunks (seq, created_ns) VALUES (?, ?)",
                                    (seq, chunk.created_ns))
        self.chunks.append(chunk)

    async def _refresh_open_chunk_stats(self) -> None:
        assert self._writer is not None
        chunk = self.chunks[-1]
        async with self._writer.execute(
                "SELECT min(id), max(id), min(time_ns), max(time_ns), count(*) FROM records"
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        chunk.first_id, chunk.last_id, chunk.min_time_ns, chunk.max_time_ns = row[:4]
        chunk.rows = int(row[4])

    async def _last_batch(self) -> ResumePoint | None:
        for chunk in reversed(self.chunks):
            if not chunk.path.exists():
                continue
            with contextlib.closing(sqlite3.connect(chunk.path)) as db:
                row = db.execute("SELECT ring_map_id, ring_pos FROM batches "
                                 "ORDER BY last_id DESC LIMIT 1").fetchone()
            if row is not None:
                return ResumePoint(int(row[0]), int(row[1]))
        return None

    async def close(self) -> None:
        """Finish index builds, then close every connection."""
        for task in list(self._indexing):
            task.cancel()
        await asyncio.gather(*self._indexing, return_exceptions=True)
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        await self._catalog.close()

    # -- role sets --------------------------------------------------------------------

    def roleset_id(self, names: tuple[str, ...]) -> int:
        """auditd's id of a combination of role names (0 for none); new ones are stored
        in the catalog with the next write."""
        if not names:
            return 0
        rid = self._roleset_ids.get(names)
        if rid is None:
            rid = max(self.rolesets, default=0) + 1
            self.rolesets[rid] = names
            self._roleset_ids[names] = rid
            self._new_rolesets.append((rid, names))
        return rid

    def rolesets_with(self, role: str) -> list[int]:
        """Ids of every role set that contains ``role``."""
        return [rid for rid, names in self.rolesets.items() if role in names]

    # -- writing ----------------------------------------------------------------------

    async def write(self, rows: Sequence[R.Row], ring_map_id: int, ring_pos: int) -> None:
        """Commit ``rows`` (ids already assigned, ascending) and the ring position they
        cover in one transaction; raises :class:`StoreError` (nothing is stored then)."""
        if not rows:
            return
        await self._maybe_seal(rows[0][R.TIME_NS])
        assert self._writer is not None
        db = self._writer
        packets = [r for r in rows if len(r) == R.PACKET_WIDTH]
        others = [r for r in rows if len(r) != R.PACKET_WIDTH]
        try:
            if self._new_rolesets:
                await self._catalog.executemany(
                    "INSERT OR IGNORE INTO rolesets (id, roles) VALUES (?, ?)",
                    [(rid, ",".join(names)) for rid, names in self._new_rolesets])
                self._new_rolesets.clear()
            await db.execute("BEGIN")
            try:
                if packets:
                    await db.executemany(_INSERT_PACKET, packets)
                if others:
                    await db.executemany(_INSERT_ANY, others)
                await db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                                 (rows[-1][R.ID], rows[0][R.ID], ring_map_id, ring_pos,
                                  time.time_ns()))
                await db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write {len(rows)} records to "
                             f"{self.chunks[-1].path}: {exc}") from exc
        chunk = self.chunks[-1]
        if chunk.first_id is None:
            chunk.first_id = rows[0][R.ID]
        chunk.last_id = rows[-1][R.ID]
        times = [r[R.TIME_NS] for r in rows]
        low, high = min(times), max(times)
        chunk.min_time_ns = low if chunk.min_time_ns is None else min(chunk.min_time_ns, low)
        chunk.max_time_ns = high if chunk.max_time_ns is None else max(chunk.max_time_ns, high)
        chunk.rows += len(rows)
        self.resume = ResumePoint(ring_map_id, ring_pos)

    async def _maybe_seal(self, now_ns: int) -> None:
        chunk = self.chunks[-1]
        age = (now_ns - chunk.created_ns) / 1e9
        if chunk.rows >= self.chunk_rows or (chunk.rows and age >= self.chunk_seconds):
            await self.seal()

    async def seal(self) -> None:
        """Close the open chunk, index it in the background, and open the next."""
        assert self._writer is not None
        chunk = self.chunks[-1]
        if not chunk.rows:
            return
        await self._writer.close()
        self._writer = None
        await self._mark_sealed(chunk)
        await self._new_chunk()
        self._writer = await self._open_chunk(self.chunks[-1].path)
        self._index_later(chunk)
        await self.apply_retention()

    async def _mark_sealed(self, chunk: Chunk) -> None:
        chunk.sealed = True
        await self._catalog.execute(
            "UPDATE chunks SET first_id=?, last_id=?, min_time_ns=?, max_time_ns=?, rows=?,"
            " sealed=1 WHERE seq=?", (chunk.first_id, chunk.last_id, chunk.min_time_ns,
                                      chunk.max_time_ns, chunk.rows, chunk.seq))

    def _index_later(self, chunk: Chunk) -> None:
        task = asyncio.get_running_loop().create_task(self._build_indexes(chunk),
                                                      name=str(chunk.seq))
        self._indexing.add(task)
        task.add_done_callback(self._indexing.discard)

    async def _build_indexes(self, chunk: Chunk) -> None:
        started = time.monotonic()
        try:
            db = await aiosqlite.connect(str(chunk.path), isolation_level=None)
            try:
                for pragma in _CHUNK_PRAGMAS:
                    await db.execute(pragma)
                for name, column in CHUNK_INDEXES.items():
                    await db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON records ({column})")
                await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                await db.close()
            chunk.indexed = True
            await self._catalog.execute("UPDATE chunks SET indexed=1 WHERE seq=?", (chunk.seq,))
            log.info("chunk indexed", extra={"chunk": chunk.seq, "rows": chunk.rows,
                                             "seconds": round(time.monotonic() - started, 3)})
        except sqlite3.Error as exc:
            # Queries still work on an unindexed chunk (slower); retried at the next start.
            log.warning("cannot index chunk", extra={"chunk": chunk.seq, "error": str(exc)})

    # -- retention --------------------------------------------------------------------

    async def apply_retention(self) -> int:
        """Delete sealed chunks whose newest record is older than the retention age or,
        oldest first, while the store is over its size limit; returns how many records
        were deleted. Runs at every seal and periodically."""
        max_age_seconds, max_bytes = self.retention
        cutoff = time.time_ns() - int(max_age_seconds * 1e9)
        doomed: list[Chunk] = []
        total = self.disk_bytes()
        for chunk in self.chunks[:-1]:
            if not chunk.sealed:
                continue
            if (chunk.max_time_ns or 0) < cutoff or (max_bytes and total > max_bytes):
                doomed.append(chunk)
                total -= _file_bytes(chunk.path)
        deleted = 0
        for chunk in doomed:
            task = next((t for t in self._indexing if t.get_name() == str(chunk.seq)), None)
            if task is not None:
                continue
            await self._catalog.execute("DELETE FROM chunks WHERE seq=?", (chunk.seq,))
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(str(chunk.path) + suffix).unlink()
            self.chunks.remove(chunk)
            deleted += chunk.rows
        if deleted:
            self.retention_deleted += deleted
            await self._catalog.execute(
                "INSERT INTO counters VALUES ('retention_deleted', ?) ON CONFLICT(name) "
                "DO UPDATE SET value=excluded.value", (self.retention_deleted,))
            log.info("retention deleted chunks", extra={"chunks": len(doomed),
                                                        "records": deleted})
        return deleted

    def disk_bytes(self) -> int:
        """Bytes used by the catalog and every chunk file."""
        total = sum(_file_bytes(Path(str(self.path) + s)) for s in ("", "-wal"))
        for chunk in self.chunks:
            total += sum(_file_bytes(Path(str(chunk.path) + s)) for s in ("", "-wal"))
        return total

    # -- reading ----------------------------------------------------------------------

    @property
    def record_count(self) -> int:
        """Records stored (cheap: from the chunk list)."""
        return sum(c.rows for c in self.chunks)

    @property
    def last_id(self) -> int:
        """Newest stored record id (0 when empty)."""
        return self.next_id - 1

    async def schema_version(self) -> int:
        """The schema version stored in the catalog."""
        async with self._catalog.execute(
                "SELECT value FROM meta WHERE key='schema_version'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def newest(self, flt: Filter, before_id: int, limit: int) -> list[R.Row]:
        """Up to ``limit`` matching records with id < ``before_id``, newest first."""
        where, params = flt.sql(self.rolesets_with)
        found: list[R.Row] = []
        for chunk in reversed(list(self.chunks)):
            if len(found) >= limit:
                break
            if chunk.first_id is not None and chunk.first_id >= before_id:
                continue
            if chunk.last_id is None or not chunk.may_hold(flt):
                continue
            sql = f"{_SELECT} WHERE id < ?{where} ORDER BY id DESC LIMIT ?"
            found += await self._read(chunk, sql, (before_id, *params, limit - len(found)))
        return found

    async def after(self, flt: Filter, after_id: int, limit: int) -> list[R.Row]:
        """Up to ``limit`` matching records with id > ``after_id``, oldest first."""
        where, params = flt.sql(self.rolesets_with)
        found: list[R.Row] = []
        for chunk in list(self.chunks):
            if len(found) >= limit:
                break
            if chunk.last_id is None or chunk.last_id <= after_id or not chunk.may_hold(flt):
                continue
            sql = f"{_SELECT} WHERE id > ?{where} ORDER BY id LIMIT ?"
            found += await self._read(chunk, sql, (after_id, *params, limit - len(found)))
        return found

    async def aggregate(self, flt: Filter, sql_select: str, group: str = ""
                        ) -> list[list[R.Row]]:
        """Run ``SELECT {sql_select} FROM records WHERE ...filter... {group}`` on every
        chunk that may match; returns each chunk's rows."""
        where, params = flt.sql(self.rolesets_with)
        sql = f"SELECT {sql_select} FROM records WHERE 1{where} {group}"
        results = []
        for chunk in list(self.chunks):
            if chunk.last_id is not None and chunk.may_hold(flt):
                results.append(await self._read(chunk, sql, params))
        return results

    async def _read(self, chunk: Chunk, sql: str, params: Iterable[object]
                    ) -> list[R.Row]:
        params = tuple(params)

        def run() -> list[R.Row]:
            try:
                with contextlib.closing(sqlite3.connect(f"file:{chunk.path}?mode=ro",
                                                        uri=True)) as db:
                    return db.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                if not chunk.path.exists():  # deleted by retention meanwhile
                    return []
                raise
        return await asyncio.to_thread(run)


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
