"""tunneld: Noise XX tunnels between site routers and the AF_XDP AEAD data path."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

import grpc

from vpnr.core.daemon import Context, DaemonApp, Runtime, run_daemon
from vpnr.tunneld.probe import KernelProbeResult, choose_datapath, probe_kernel
from vpnr.v1 import tunnel_pb2, tunnel_pb2_grpc

log = logging.getLogger("vpnr.tunneld")


def probe_message(result: KernelProbeResult) -> tunnel_pb2.KernelProbe:
    """The probe result as the API reports it."""
    return tunnel_pb2.KernelProbe(
        af_xdp=result.af_xdp, bpf_crypto_kfuncs=result.bpf_crypto_kfuncs,
        kfunc_ciphers_accepted=result.ciphers_accepted,
        kfunc_ciphers_refused=result.ciphers_refused, probe_method=result.method,
        kernel_release=result.kernel_release, notes=result.notes)


class TunnelServicer(tunnel_pb2_grpc.TunnelServiceServicer):
    """Thin gRPC layer over tunneld's state."""

    def __init__(self, app: Tunneld) -> None:
        self.app = app

    async def Status(self, request: tunnel_pb2.TunnelStatusRequest,
                     context: Context) -> tunnel_pb2.TunnelStatus:
        cfg = self.app.config.tunneld
        assert self.app.probe is not None
        return tunnel_pb2.TunnelStatus(
            daemon=self.app.runtime.daemon_info(), probe=probe_message(self.app.probe),
            datapath_mode=self.app.mode, datapath_reason=self.app.mode_reason,
            listen_port=cfg.listen_port, wan_interface=cfg.wan_interface,
            peers=len(cfg.peers))

    async def ListPeers(self, request: tunnel_pb2.ListPeersRequest,
                        context: Context) -> tunnel_pb2.ListPeersResponse:
        return tunnel_pb2.ListPeersResponse(peers=[
            tunnel_pb2.Peer(name=p.name, public_key=p.public_key, endpoint=p.endpoint,
                            allowed_prefixes=p.allowed_prefixes,
                            keepalive_seconds=p.keepalive_seconds,
                            state=tunnel_pb2.PEER_STATE_IDLE)
            for p in self.app.config.tunneld.peers])


class Tunneld(DaemonApp):
    """The tunnel daemon."""

    name = "tunneld"
    service_names = (tunnel_pb2.DESCRIPTOR.services_by_name["TunnelService"].full_name,)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.probe: KernelProbeResult | None = None
        self.mode = ""
        self.mode_reason = ""

    async def start(self) -> None:
        """Probe the kernel's AF_XDP and bpf_crypto support and choose the data path."""
        cache = self.config.router.state_path / "tunneld" / "probe-cache"
        try:
            cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            cache = None  # type: ignore[assignment]
            log.warning("probe cache unavailable; compiling the probe each start")
        self.probe = await asyncio.to_thread(probe_kernel, cache)
        self.mode, self.mode_reason = choose_datapath(self.probe)
        log.info("data path chosen", extra={
            "mode": self.mode, "reason": self.mode_reason, "pid": os.getpid(),
            "accepted": self.probe.ciphers_accepted, "refused": self.probe.ciphers_refused})

    def register(self, server: grpc.aio.Server) -> None:
        """Add the TunnelService servicer."""
        tunnel_pb2_grpc.add_TunnelServiceServicer_to_server(TunnelServicer(self), server)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    return run_daemon(Tunneld, argv)
