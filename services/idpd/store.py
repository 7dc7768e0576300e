"""idpd's SQLite file: logins (tokens sealed by the vault) and the last good sync.

The last good binding set and the directory read behind it survive a restart, so a
restarted idpd that cannot reach the IdP keeps serving what it last pushed and reports how
old it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiosqlite

from vpnr.core.sqlite import open_database
from vpnr.idpd.vault import TokenVault, VaultError
from vpnr.v1 import idp_pb2

SCHEMA_VERSION = 1
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS logins (
        login_id TEXT PRIMARY KEY, flow INTEGER NOT NULL, address TEXT NOT NULL,
        state INTEGER NOT NULL, subject TEXT NOT NULL, username TEXT NOT NULL,
        claims TEXT NOT NULL, roles TEXT NOT NULL, refresh_token BLOB, access_token BLOB,
        access_expires_at REAL NOT NULL, created_at REAL NOT NULL, refreshed_at REAL NOT NULL,
        ended_at REAL NOT NULL, error TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

ACTIVE = idp_pb2.LOGIN_STATE_ACTIVE
PENDING = idp_pb2.LOGIN_STATE_PENDING


@dataclass
class LoginRecord:
    """One login of a user for a device address."""

    login_id: str
    flow: idp_pb2.LoginFlow
    address: str                      # CIDR, /32 or /128
    state: idp_pb2.LoginState = PENDING
    subject: str = ""
    username: str = ""
    claims: dict[str, Any] = field(default_factory=dict)  # non-secret claims only
    roles: tuple[str, ...] = ()
    refresh_token: str = field(default="", repr=False)
    access_token: str = field(default="", repr=False)
    access_expires_at: float = 0.0
    created_at: float = 0.0
    refreshed_at: float = 0.0
    ended_at: float = 0.0
    error: str = ""

    @property
    def active(self) -> bool:
        """The login binds its address."""
        return bool(self.state == ACTIVE)


class IdpStore:
    """Reads and writes idpd's database."""

    def __init__(self, db: aiosqlite.Connection, vault: TokenVault) -> None:
        self._db = db
        self._vault = vault

    @classmethod
    async def open(cls, path: Path, vault: TokenVault) -> IdpStore:
        """Open or create the database."""
        return cls(await open_database(path, SCHEMA, SCHEMA_VERSION, "idpd"), vault)

    async def close(self) -> None:
        """Close the database."""
        await self._db.close()

    async def save_login(self, login: LoginRecord) -> None:
        """Insert or update one login (tokens sealed, bound to the login id)."""
        seal = self._vault.seal
        await self._db.execute(
            "INSERT OR REPLACE INTO logins VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (login.login_id, login.flow, login.address, login.state, login.subject,
             login.username, json.dumps(login.claims), json.dumps(list(login.roles)),
             seal(login.refresh_token, login.login_id) if login.refresh_token else None,
             seal(login.access_token, login.login_id) if login.access_token else None,
             login.access_expires_at, login.created_at, login.refreshed_at, login.ended_at,
             login.error))
        await self._db.commit()

    async def load_logins(self) -> list[LoginRecord]:
        """Every stored login; a login whose tokens no longer open is marked failed."""
        out = []
        async with self._db.execute("SELECT * FROM logins ORDER BY created_at") as cursor:
            rows = await cursor.fetchall()
        for row in rows:
            login = LoginRecord(
                login_id=row[0], flow=cast(idp_pb2.LoginFlow, row[1]), address=row[2],
                state=cast(idp_pb2.LoginState, row[3]), subject=row[4],
                username=row[5], claims=json.loads(row[6]), roles=tuple(json.loads(row[7])),
                access_expires_at=row[10], created_at=row[11], refreshed_at=row[12],
                ended_at=row[13], error=row[14])
            try:
                login.refresh_token = self._vault.open(row[8], login.login_id) if row[8] else ""
                login.access_token = self._vault.open(row[9], login.login_id) if row[9] else ""
            except VaultError as exc:
                if login.active:
                    login.state = idp_pb2.LOGIN_STATE_FAILED
                    login.error = str(exc)
            out.append(login)
        return out

    async def delete_ended(self, before: float) -> None:
        """Forget logins that ended before ``before`` (wall clock)."""
        await self._db.execute("DELETE FROM logins WHERE state != ? AND state != ? AND "
                               "ended_at > 0 AND ended_at < ?", (ACTIVE, PENDING, before))
        await self._db.commit()

    async def put(self, key: str, value: Any) -> None:
        """Store a JSON value."""
        await self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                               (key, json.dumps(value)))
        await self._db.commit()

    async def get(self, key: str, default: Any = None) -> Any:
        """A stored JSON value, or ``default``."""
        async with self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)) as cursor:
            row = await cursor.fetchone()
        return default if row is None else json.loads(row[0])
