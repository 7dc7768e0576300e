"""Peer routers: validated definitions and their durable store.

A peer is its static public key (its identity), the prefixes behind it (cryptokey routing:
what it may send us and what we send it) and, for peers we initiate to, an endpoint.
Every definition from outside (config file, gRPC) passes :func:`make_peer`, which names the
field that is wrong; the store keeps what was accepted, including revocations, across
restarts.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiosqlite

from vpnr.core.sqlite import open_database

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_PREFIXES = 1024
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PeerError(ValueError):
    """A peer definition is wrong; the message names the field."""


@dataclass(frozen=True)
class PeerDef:
    """What an operator configured for one peer."""

    name: str
    public_key: bytes = field(repr=False)
    endpoint: tuple[str, int] | None
    prefixes: tuple[Network, ...]
    keepalive_seconds: int = 0
    revoked: bool = False
    revoked_reason: str = ""

    @property
    def public_key_b64(self) -> str:
        """The static key as configured (base64)."""
        return base64.b64encode(self.public_key).decode()

    @property
    def endpoint_text(self) -> str:
        """``host:port`` (IPv6 in brackets), or empty."""
        if self.endpoint is None:
            return ""
        host, port = self.endpoint
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def decode_key(text: str, what: str = "public_key") -> bytes:
    """A base64 X25519 key of exactly 32 bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PeerError(f"{what}: not base64 ({exc})") from None
    if len(raw) != 32:
        raise PeerError(f"{what}: {len(raw)} bytes, an X25519 key has 32")
    return raw


def parse_endpoint(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` with an IP address host; empty means none."""
    text = text.strip()
    if not text:
        return None
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", text)
    if not match:
        raise PeerError(f"endpoint: {text!r} is not ADDRESS:PORT ([v6]:PORT for IPv6)")
    host, port_text = (match.group(1), match.group(2)) if match.group(1) else \
        (match.group(3), match.group(4))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise PeerError(f"endpoint: {host!r} is not an IP address") from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise PeerError(f"endpoint: port {port} is not in 1..65535")
    return str(address), port


def parse_prefixes(items: list[str] | tuple[str, ...]) -> tuple[Network, ...]:
    """CIDR prefixes with no host bits set."""
    if not items:
        raise PeerError("allowed_prefixes: at least one prefix is needed")
    if len(items) > MAX_PREFIXES:
        raise PeerError(f"allowed_prefixes: {len(items)} prefixes, at most {MAX_PREFIXES}")
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as exc:
            raise PeerError(f"allowed_prefixes: {item!r}: {exc}") from None
    return tuple(out)


def make_peer(name: str, public_key: str, endpoint: str, prefixes: list[str] | tuple[str, ...],
              keepalive_seconds: int = 0) -> PeerDef:
    """Validate a peer definition; PeerError names the wrong field."""
    if not NAME_RE.fullmatch(name):
        raise PeerError(f"name: {name!r} must be 1-63 letters, digits, '.', '_' or '-'")
    if not 0 <= keepalive_seconds <= 3600:
        raise PeerError(f"keepalive_seconds: {keepalive_seconds} is not in 0..3600")
    return PeerDef(name=name, public_key=decode_key(public_key),
                   endpoint=parse_endpoint(endpoint), prefixes=parse_prefixes(prefixes),
                   keepalive_seconds=keepalive_seconds)


def check_conflicts(peer: PeerDef, others: list[PeerDef]) -> None:
    """Two peers may not share a static key or an allowed prefix (routing must be exact)."""
    for other in others:
        if other.name == peer.name:
            continue
        if other.public_key == peer.public_key:
            raise PeerError(f"public_key: already the key of peer {other.name!r}")
        for mine in peer.prefixes:
            for theirs in other.prefixes:
                if mine.version == theirs.version and mine.overlaps(theirs):
                    raise PeerError(f"allowed_prefixes: {mine} overlaps {theirs} of peer "
                                    f"{other.name!r}")


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS peers (name TEXT PRIMARY KEY, public_key TEXT NOT NULL, "
    "endpoint TEXT NOT NULL, prefixes TEXT NOT NULL, keepalive INTEGER NOT NULL, "
    "revoked INTEGER NOT NULL DEFAULT 0, revoked_reason TEXT NOT NULL DEFAULT '', "
    "updated_at REAL NOT NULL)",
    # Revoked keys outlive their peer entry: a removed and re-added peer stays refused.
    "CREATE TABLE IF NOT EXISTS revoked_keys (public_key TEXT PRIMARY KEY, peer TEXT NOT NULL,"
    " reason TEXT NOT NULL, revoked_at REAL NOT NULL)",
)
SCHEMA_VERSION = 1


class PeerStore:
    """tunneld's SQLite file of peers and revoked keys."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> PeerStore:
        """Open or create the store."""
        return cls(await open_database(path, SCHEMA, SCHEMA_VERSION, "tunneld"))

    async def close(self) -> None:
        """Close the database."""
        await self._db.close()

    async def load(self) -> list[PeerDef]:
        """Every stored peer."""
        out = []
        async with self._db.execute(
                "SELECT name, public_key, endpoint, prefixes, keepalive, revoked, "
                "revoked_reason FROM peers ORDER BY name") as cursor:
            async for row in cursor:
                peer = make_peer(row[0], row[1], row[2], json.loads(row[3]), int(row[4]))
                out.append(replace(peer, revoked=bool(row[5]), revoked_reason=row[6]))
        return out

    async def revoked_keys(self) -> dict[bytes, str]:
        """Revoked static key -> the peer it belonged to."""
        async with self._db.execute("SELECT public_key, peer FROM revoked_keys") as cursor:
            return {decode_key(row[0]): row[1] async for row in cursor}

    async def put(self, peer: PeerDef) -> None:
        """Insert or replace one peer."""
        await self._db.execute(
            "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (peer.name, peer.public_key_b64, peer.endpoint_text,
             json.dumps([str(p) for p in peer.prefixes]), peer.keepalive_seconds,
             int(peer.revoked), peer.revoked_reason, time.time()))
        if peer.revoked:
            await self._db.execute(
                "INSERT OR REPLACE INTO revoked_keys VALUES (?, ?, ?, ?)",
                (peer.public_key_b64, peer.name, peer.revoked_reason, time.time()))
        await self._db.commit()

    async def delete(self, name: str) -> None:
        """Remove one peer (its revocation, if any, stays)."""
        await self._db.execute("DELETE FROM peers WHERE name = ?", (name,))
        await self._db.commit()
