"""Client side of the daemon sockets, shared by vpnctl, the lab and the daemons themselves."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def socket_target(path: str | Path) -> str:
    """gRPC target for a Unix socket path."""
    return f"unix:{Path(path)}"


def is_serving(path: str | Path, timeout: float = 1.0, service: str = "") -> bool:
    """True when the daemon on ``path`` answers its health check with SERVING."""
    try:
        with grpc.insecure_channel(socket_target(path)) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
