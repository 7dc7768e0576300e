"""auditd: drains the eBPF ring buffer into JSON logs, syslog and SQLite."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import grpc

from vpnr.auditd.store import AuditStore, StoreError
from vpnr.core.daemon import Context, DaemonApp, StartupError, run_daemon
from vpnr.v1 import audit_pb2, audit_pb2_grpc


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Thin gRPC layer over the store."""

    def __init__(self, app: Auditd) -> None:
        self.app = app

    async def Status(self, request: audit_pb2.AuditStatusRequest,
                     context: Context) -> audit_pb2.AuditStatus:
        store = self.app.store
        assert store is not None
        return audit_pb2.AuditStatus(
            daemon=self.app.runtime.daemon_info(),
            database=str(store.path),
            records=await store.count(),
            schema_version=await store.schema_version(),
            sinks=[audit_pb2.SinkStatus(name="sqlite", enabled=True, healthy=True,
                                        target=str(store.path))],
        )

    async def Record(self, request: audit_pb2.RecordRequest,
                     context: Context) -> audit_pb2.RecordResponse:
        event = request.event
        if not event.daemon or not event.action:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "event.daemon and event.action are required")
        try:
            detail = json.loads(event.detail_json) if event.detail_json else {}
        except json.JSONDecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"event.detail_json is not valid JSON: {exc}")
        if not isinstance(detail, dict):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "event.detail_json must be a JSON object")
        assert self.app.store is not None
        record_id = await self.app.store.add_control(
            event.daemon, event.action, event.actor, event.version_before, event.version_after,
            event.success, detail)
        return audit_pb2.RecordResponse(id=record_id)


class Auditd(DaemonApp):
    """The audit daemon."""

    name = "auditd"
    service_names = (audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,)
    store: AuditStore | None = None

    def database_path(self) -> Path:
        """The configured database path, relative paths under the state directory."""
        path = Path(self.config.auditd.database)
        return path if path.is_absolute() else self.config.router.state_path / path

    async def start(self) -> None:
        """Open the SQLite store."""
        try:
            self.store = await AuditStore.open(self.database_path())
        except StoreError as exc:
            raise StartupError(str(exc)) from exc

    async def stop(self) -> None:
        """Close the store."""
        if self.store is not None:
            await self.store.close()

    def register(self, server: grpc.aio.Server) -> None:
        """Add the AuditService servicer."""
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(self), server)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    return run_daemon(Auditd, argv)
