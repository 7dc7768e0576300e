"""policyd's desired state in SQLite: the policy, its version, kernel ids, and snapshots.

The store is the source of truth the kernel converges to: a change is committed here
first, then written to the kernel; a policyd killed in between finds the kernel's version
behind the store's on start and rebuilds the idle slot from the store.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from vpnr.core.sqlite import SchemaError, open_database
from vpnr.policyd.compiler import Ids, RoleSet
from vpnr.policyd.model import Action, BindingMeta, IPNetwork, Policy, Rule, parse_prefix

SCHEMA_VERSION = 1

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS roles (
        name TEXT PRIMARY KEY, kernel_id INTEGER NOT NULL, description TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rules (
        id INTEGER PRIMARY KEY, role TEXT NOT NULL, priority INTEGER NOT NULL,
        action INTEGER NOT NULL, protocol INTEGER NOT NULL, src TEXT NOT NULL,
        dst TEXT NOT NULL, port_from INTEGER NOT NULL, port_to INTEGER NOT NULL,
        description TEXT NOT NULL, position INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS bindings (
        prefix TEXT PRIMARY KEY, roles TEXT NOT NULL, source TEXT NOT NULL,
        subject TEXT NOT NULL, expires_at REAL, kernel_id INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS bindings_source ON bindings (source)",
    """CREATE TABLE IF NOT EXISTS zones (
        prefix TEXT PRIMARY KEY, zone INTEGER NOT NULL, description TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS rolesets (id INTEGER PRIMARY KEY, roles TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
        policy_version INTEGER NOT NULL, created_at REAL NOT NULL, roles INTEGER NOT NULL,
        rules INTEGER NOT NULL, bindings INTEGER NOT NULL, zones INTEGER NOT NULL,
        document BLOB NOT NULL)""",
]


class StoreError(Exception):
    """The policy database cannot be opened, read or written."""


@dataclass(frozen=True)
class SnapshotRow:
    """One stored snapshot (without its document)."""

    id: int
    name: str
    policy_version: int
    created_at: float
    roles: int
    rules: int
    bindings: int
    zones: int


def _roleset_text(roles: RoleSet) -> str:
    return ",".join(str(r) for r in roles)


class PolicyStore:
    """An open policy database."""

    def __init__(self, path: Path, db: aiosqlite.Connection) -> None:
        self.path = path
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> PolicyStore:
        """Open (creating if needed) the database and check its schema version."""
        try:
            db = await open_database(path, _SCHEMA, SCHEMA_VERSION, "policyd", autocommit=True)
        except SchemaError as exc:
            raise StoreError(str(exc)) from exc
        return cls(path, db)

    async def close(self) -> None:
        """Close the database."""
        await self._db.close()

    # -- reading --------------------------------------------------------------------

    async def load(self) -> tuple[Policy, Ids, int, float]:
        """(policy, ids, version, updated_at) as last committed; version 0 when empty."""
        db = self._db
        policy, ids = Policy(), Ids()
        meta = {k: v for k, v in await db.execute_fetchall("SELECT key, value FROM meta")}
        async with db.execute("SELECT name, kernel_id, description FROM roles") as cur:
            async for name, kernel_id, description in cur:
                policy.roles[name] = []
                policy.role_descriptions[name] = description
                ids.roles[name] = kernel_id
        async with db.execute("SELECT id, role, priority, action, protocol, src, dst, "
                              "port_from, port_to, description FROM rules "
                              "ORDER BY role, position") as cur:
            async for rid, role, prio, action, proto, src, dst, pfrom, pto, desc in cur:
                policy.roles[role].append(Rule(rid, role, prio, Action(action), proto,
                                               parse_prefix("src", src),
                                               parse_prefix("dst", dst), pfrom, pto, desc))
        async with db.execute("SELECT prefix, roles, source, subject, expires_at, kernel_id "
                              "FROM bindings") as cur:
            async for prefix, roles, source, subject, expires_at, kernel_id in cur:
                net = ipaddress.ip_network(prefix)
                policy.bindings[net] = tuple(json.loads(roles))
                policy.binding_meta[net] = BindingMeta(source, subject, expires_at)
                ids.bindings[net] = kernel_id
        async with db.execute("SELECT prefix, zone, description FROM zones") as cur:
            async for prefix, zone, description in cur:
                net = ipaddress.ip_network(prefix)
                policy.zones[net] = zone
                policy.zone_descriptions[net] = description
        async with db.execute("SELECT id, roles FROM rolesets") as cur:
            async for rid, roles in cur:
                ids.rolesets[tuple(int(r) for r in roles.split(",") if r)] = rid
        return (policy, ids, int(meta.get("version", 0)), float(meta.get("updated_at", 0)))

    # -- writing --------------------------------------------------------------------

    async def save_full(self, policy: Policy, ids: Ids, version: int) -> float:
        """Replace everything stored by ``policy`` at ``version``, in one transaction."""
        now = time.time()
        db = self._db
        try:
            await db.execute("BEGIN IMMEDIATE")
            for table in ("roles", "rules", "bindings", "zones", "rolesets"):
                await db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
            await db.executemany(
                "INSERT INTO roles VALUES (?, ?, ?)",
                [(n, ids.roles[n], policy.role_descriptions.get(n, "")) for n in policy.roles])
            await db.executemany(
                "INSERT INTO rules VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.id, r.role, r.priority, int(r.action), r.protocol,
                  str(r.src_prefix or ""), str(r.dst_prefix or ""), r.dst_port_from,
                  r.dst_port_to, r.description, pos)
                 for rules in policy.roles.values() for pos, r in enumerate(rules)])
            await db.executemany("INSERT INTO bindings VALUES (?, ?, ?, ?, ?, ?)",
                                 [self._binding_row(policy, ids, net) for net in policy.bindings])
            await db.executemany(
                "INSERT INTO zones VALUES (?, ?, ?)",
                [(str(net), zone, policy.zone_descriptions.get(net, ""))
                 for net, zone in policy.zones.items()])
            await db.executemany("INSERT INTO rolesets VALUES (?, ?)",
                                 [(rid, _roleset_text(rs)) for rs, rid in ids.rolesets.items()])
            await self._set_version(version, now)
            await db.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        return now

    async def save_binding(self, policy: Policy, ids: Ids, net: IPNetwork, version: int,
                           new_rolesets: dict[RoleSet, int]) -> float:
        """Store one binding as it now is in ``policy`` (absent there: delete it), with the
        role sets it introduced."""
        now = time.time()
        db = self._db
        try:
            await db.execute("BEGIN IMMEDIATE")
            if net in policy.bindings:
                await db.execute("INSERT OR REPLACE INTO bindings VALUES (?, ?, ?, ?, ?, ?)",
                                 self._binding_row(policy, ids, net))
            else:
                await db.execute("DELETE FROM bindings WHERE prefix = ?", (str(net),))
            if new_rolesets:
                await db.executemany("INSERT OR REPLACE INTO rolesets VALUES (?, ?)",
                                     [(rid, _roleset_text(rs))
                                      for rs, rid in new_rolesets.items()])
            await self._set_version(version, now)
            await db.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        return now

    @staticmethod
    def _binding_row(policy: Policy, ids: Ids, net: IPNetwork
                     ) -> tuple[str, str, str, str, float | None, int]:
        meta = policy.binding_meta.get(net, BindingMeta())
        return (str(net), json.dumps(list(policy.bindings[net])), meta.source, meta.subject,
                meta.expires_at, ids.bindings[net])

    async def _set_version(self, version: int, now: float) -> None:
        await self._db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?), "
                               "('updated_at', ?)", (str(version), repr(now)))

    async def _rollback(self) -> None:
        with contextlib.suppress(aiosqlite.Error):  # no transaction was open
            await self._db.execute("ROLLBACK")

    # -- snapshots ------------------------------------------------------------------

    async def create_snapshot(self, name: str, version: int, counts: tuple[int, int, int, int],
                              document: bytes) -> SnapshotRow:
        """Store a snapshot of a serialized PolicyDocument."""
        now = time.time()
        cur = await self._db.execute(
            "INSERT INTO snapshots (name, policy_version, created_at, roles, rules, bindings, "
            "zones, document) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, version, now, *counts, zlib.compress(document)))
        snapshot_id = cur.lastrowid
        await cur.close()
        assert snapshot_id is not None
        return SnapshotRow(snapshot_id, name, version, now, *counts)

    async def list_snapshots(self, after_id: int, limit: int) -> list[SnapshotRow]:
        """Snapshots with id > after_id, oldest first."""
        rows = await self._db.execute_fetchall(
            "SELECT id, name, policy_version, created_at, roles, rules, bindings, zones "
            "FROM snapshots WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
        return [SnapshotRow(*row) for row in rows]

    async def count_snapshots(self) -> int:
        """How many snapshots are stored."""
        rows = list(await self._db.execute_fetchall("SELECT COUNT(*) FROM snapshots"))
        return int(rows[0][0])

    async def snapshot_document(self, snapshot_id: int) -> bytes | None:
        """The serialized PolicyDocument of a snapshot; None when there is no such id."""
        rows = list(await self._db.execute_fetchall(
            "SELECT document FROM snapshots WHERE id = ?", (snapshot_id,)))
        return zlib.decompress(rows[0][0]) if rows else None

    async def snapshot_exists(self, name: str) -> bool:
        """Is a snapshot with this name stored?"""
        rows = list(await self._db.execute_fetchall(
            "SELECT 1 FROM snapshots WHERE name = ?", (name,)))
        return bool(rows)

    async def delete_snapshot(self, snapshot_id: int) -> bool:
        """Delete a snapshot; False when there was none."""
        cur = await self._db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
        deleted = cur.rowcount
        await cur.close()
        return deleted > 0
