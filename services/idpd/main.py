"""idpd: syncs users, roles and address bindings from an OIDC IdP into policyd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from vpnr.core.auditrec import AuditRecorder
from vpnr.core.daemon import DaemonApp, Runtime, StartupError, run_daemon
from vpnr.core.sqlite import SchemaError
from vpnr.idpd.discovery import DiscoveryState, refresh
from vpnr.idpd.logins import LoginManager
from vpnr.idpd.mapping import RoleMapper
from vpnr.idpd.oauth import IdpClient, IdpUnavailable
from vpnr.idpd.service import IdpServicer
from vpnr.idpd.store import IdpStore
from vpnr.idpd.sync import SyncEngine
from vpnr.idpd.tokens import JwksCache, TokenValidator
from vpnr.idpd.vault import TokenVault, VaultError
from vpnr.v1 import common_pb2, idp_pb2, idp_pb2_grpc

log = logging.getLogger("vpnr.idpd")

DISCOVERY_MAX_AGE = 300.0  # refetch discovery at most this often while it works


class Idpd(DaemonApp):
    """The identity daemon."""

    name = "idpd"
    service_names = (idp_pb2.DESCRIPTOR.services_by_name["IdpService"].full_name,)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        cfg = self.config.idpd
        self.discovery = DiscoveryState()
        self.mapper = RoleMapper(cfg.role_mappings)
        self.audit = AuditRecorder(self.config.router.socket_path("auditd"))
        self.client_secret = ""
        self.store: IdpStore | None = None
        self.engine: SyncEngine | None = None
        self.logins: LoginManager | None = None
        self._client: IdpClient | None = None
        self._client_doc: dict[str, Any] = {}
        self._validator: TokenValidator | None = None
        self._task: asyncio.Task[None] | None = None
        self._discovery_lock = asyncio.Lock()

    def _path(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self.config.router.state_path / path

    def _read_secret(self) -> str:
        name = self.config.idpd.client_secret_file
        if not name:
            return ""
        path = self._path(name)
        try:
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise StartupError(f"idpd.client_secret_file {path}: mode {mode:o} lets others "
                                   "read the client secret; chmod 600 it")
            secret = path.read_text().strip()
        except OSError as exc:
            raise StartupError(f"idpd.client_secret_file {path}: {exc.strerror}") from None
        if not secret:
            raise StartupError(f"idpd.client_secret_file {path} is empty")
        return secret

    async def start(self) -> None:
        """Open the store, restore the last good state, start syncing (the IdP being down
        is reported, never fatal)."""
        cfg = self.config.idpd
        if not cfg.issuer:
            log.info("no IdP configured")
            return
        self.client_secret = self._read_secret()
        try:
            vault = TokenVault.load_or_create(self._path(cfg.token_key_file))
            self.store = await IdpStore.open(self._path(cfg.database), vault)
        except (VaultError, SchemaError) as exc:
            raise StartupError(str(exc)) from None
        try:
            self.engine = SyncEngine(cfg, self.store, self.mapper, self.audit,
                                     str(self.config.router.socket_path("policyd")),
                                     self.runtime.registry, self.client, self.validator)
            await self.engine.load()
        except BaseException:
            await self.store.close()
            raise
        self.logins = LoginManager(self.engine, self.client, self.validator)
        await refresh(self.discovery, cfg.issuer, cfg.discovery_timeout_seconds)
        if not self.discovery.ok:
            log.warning("discovery failed; the last good bindings stay in force",
                        extra={"issuer": cfg.issuer, "reason": self.discovery.error})
        self._task = asyncio.create_task(self.engine.run())

    async def stop(self) -> None:
        """Stop syncing and close what start() opened."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.logins is not None:
            await self.logins.close()
        if self._client is not None:
            await self._client.aclose()
        if self.engine is not None:
            await self.engine.close()
        if self.store is not None:
            await self.store.close()
        await self.audit.close()

    # -- the IdP, lazily (re)built from the current discovery document ------------------

    async def _document(self) -> dict[str, Any]:
        cfg = self.config.idpd
        async with self._discovery_lock:
            state = self.discovery
            if not state.ok or time.time() - state.fetched_at > DISCOVERY_MAX_AGE:
                await refresh(state, cfg.issuer, cfg.discovery_timeout_seconds)
            if not state.document:
                raise IdpUnavailable(f"discovery: {state.error}")
            if not state.ok:
                # The IdP is down: requests will fail, but not for want of a document.
                log.debug("using the last good discovery document")
            return state.document

    def make_client(self, document: dict[str, Any]) -> IdpClient:
        """A client of the IdP described by ``document``."""
        cfg = self.config.idpd
        return IdpClient(document, client_id=cfg.client_id, client_secret=self.client_secret,
                         scopes=cfg.scopes, redirect_uri=cfg.redirect_uri,
                         timeout=cfg.http_timeout_seconds)

    async def client(self) -> IdpClient:
        """The IdP client (rebuilt when the discovery document changed)."""
        document = await self._document()
        if self._client is None or document != self._client_doc:
            if self._client is not None:
                await self._client.aclose()
            self._client = self.make_client(document)
            self._client_doc = document
            self._validator = None
        return self._client

    async def fresh_validator(self, document: dict[str, Any]) -> TokenValidator:
        """A validator for ``document``'s keys."""
        cfg = self.config.idpd
        jwks = JwksCache(str(document["jwks_uri"]), timeout=cfg.http_timeout_seconds)
        return TokenValidator(issuer=cfg.issuer, client_id=cfg.client_id, jwks=jwks,
                              allowed_algorithms=cfg.allowed_algorithms)

    async def validator(self) -> TokenValidator:
        """The token validator; its JWKS cache follows key rotation at the IdP."""
        await self.client()
        if self._validator is None:
            self._validator = await self.fresh_validator(self._client_doc)
        return self._validator

    def warnings(self) -> list[common_pb2.Warning]:
        """Status warnings."""
        out = []
        if self.config.idpd.issuer and not self.config.idpd.role_mappings:
            out.append(common_pb2.Warning(code="NO_ROLE_MAPPINGS",
                                          message="idpd.role_mappings is empty: logins and "
                                                  "directory entries get no roles"))
        engine = self.engine
        if engine is not None and engine.held is not None:
            out.append(common_pb2.Warning(
                code="SYNC_HELD", message=f"sync {engine.held.sync_id} is held by the "
                                          "mass-deletion guard: vpnctl idp sync --confirm "
                                          f"{engine.held.sync_id}"))
        if engine is not None and engine.stale:
            out.append(common_pb2.Warning(
                code="STALE", message=f"the last {engine.state.consecutive_failures} sync(s) "
                                      f"failed ({engine.state.last_result.error}); the last "
                                      "good bindings stay in force"))
        return out

    def register(self, server: grpc.aio.Server) -> None:
        """Add the IdpService servicer."""
        idp_pb2_grpc.add_IdpServiceServicer_to_server(IdpServicer(self), server)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    return run_daemon(Idpd, argv)
