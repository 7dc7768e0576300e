"""idpd: syncs users, roles and address bindings from an OIDC IdP."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import grpc

from vpnr.core.daemon import Context, DaemonApp, Runtime, run_daemon, unix_timestamp
from vpnr.idpd.discovery import DiscoveryState, refresh
from vpnr.v1 import idp_pb2, idp_pb2_grpc

log = logging.getLogger("vpnr.idpd")


class IdpServicer(idp_pb2_grpc.IdpServiceServicer):
    """Thin gRPC layer over idpd's state."""

    def __init__(self, app: Idpd) -> None:
        self.app = app

    async def Status(self, request: idp_pb2.IdpStatusRequest,
                     context: Context) -> idp_pb2.IdpStatus:
        state = self.app.discovery
        return idp_pb2.IdpStatus(
            daemon=self.app.runtime.daemon_info(),
            issuer=self.app.config.idpd.issuer,
            discovery_ok=state.ok,
            discovery_error=state.error,
            discovery_fetched_at=unix_timestamp(state.fetched_at),
            discovered_endpoints=state.endpoints(),
        )

    async def GetConfig(self, request: idp_pb2.GetIdpConfigRequest,
                        context: Context) -> idp_pb2.IdpConfig:
        cfg = self.app.config.idpd
        return idp_pb2.IdpConfig(issuer=cfg.issuer, client_id=cfg.client_id)

    async def TestConnection(self, request: idp_pb2.TestConnectionRequest,
                             context: Context
                             ) -> idp_pb2.TestConnectionResponse:
        cfg = self.app.config.idpd
        if not cfg.issuer:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "no IdP configured (idpd.issuer is empty)")
        probe = DiscoveryState()
        started = time.monotonic()
        await refresh(probe, cfg.issuer, cfg.discovery_timeout_seconds)
        return idp_pb2.TestConnectionResponse(
            discovery_ok=probe.ok, errors=[probe.error] if probe.error else [],
            latency_seconds=time.monotonic() - started)


class Idpd(DaemonApp):
    """The identity daemon."""

    name = "idpd"
    service_names = (idp_pb2.DESCRIPTOR.services_by_name["IdpService"].full_name,)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.discovery = DiscoveryState()

    async def start(self) -> None:
        """Fetch the discovery document when an IdP is configured (failure is not fatal)."""
        cfg = self.config.idpd
        if not cfg.issuer:
            log.info("no IdP configured")
            return
        await refresh(self.discovery, cfg.issuer, cfg.discovery_timeout_seconds)
        if self.discovery.ok:
            log.info("discovery fetched", extra={"issuer": cfg.issuer})
        else:
            log.warning("discovery failed; will serve and report it",
                        extra={"issuer": cfg.issuer, "reason": self.discovery.error})

    def register(self, server: grpc.aio.Server) -> None:
        """Add the IdpService servicer."""
        idp_pb2_grpc.add_IdpServiceServicer_to_server(IdpServicer(self), server)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    return run_daemon(Idpd, argv)
