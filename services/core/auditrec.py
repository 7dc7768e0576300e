"""Control-plane audit records from a daemon to auditd: best effort, never blocking.

A daemon's own work never waits for auditd: records are sent from background tasks, and
when auditd is down the daemon logs a warning and carries on (auditd's Status reports what
it received).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from vpnr.core.client import socket_target
from vpnr.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger("vpnr.audit.client")
MAX_IN_FLIGHT = 256  # beyond this, records are dropped (and logged) rather than queued


class AuditRecorder:
    """Sends ``ControlEvent``s to the auditd socket at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dropped = 0
        self._channel: grpc.aio.Channel | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, event: audit_pb2.ControlEvent) -> None:
        """Send ``event`` in the background."""
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.dropped += 1
            log.warning("control record dropped: auditd is not keeping up",
                        extra={"action": event.action})
            return
        task = asyncio.create_task(self._send(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, event: audit_pb2.ControlEvent) -> None:
        if not self.path.exists():
            return
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(socket_target(self.path))
        try:
            await audit_pb2_grpc.AuditServiceStub(self._channel).Record(
                audit_pb2.RecordRequest(event=event), timeout=2)
        except grpc.aio.AioRpcError as exc:
            log.warning("auditd did not take a control record",
                        extra={"code": exc.code().name, "action": event.action})

    async def close(self) -> None:
        """Let records in flight finish (briefly), then close the channel."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
