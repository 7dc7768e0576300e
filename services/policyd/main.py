"""policyd: owns the XDP RBAC program and the policy maps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import cast

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vpnr.core.daemon import Context, DaemonApp, Runtime, StartupError, run_daemon
from vpnr.policyd.datapath import STATS_MAX_ENTRIES, DatapathError, XdpDatapath
from vpnr.v1 import codes_pb2, common_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger("vpnr.policyd")

FILL_WARNING_RATIO = 0.8
ZONES = {"internal": codes_pb2.ZONE_INTERNAL, "external": codes_pb2.ZONE_EXTERNAL}


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Thin gRPC layer over policyd's data path."""

    def __init__(self, app: Policyd) -> None:
        self.app = app

    async def Status(self, request: policy_pb2.PolicyStatusRequest,
                     context: Context) -> policy_pb2.PolicyStatus:
        return await asyncio.to_thread(self.app.status)


class XdpCollector(Collector):
    """Prometheus view of the per-CPU verdict counters, read at scrape time."""

    def __init__(self, app: Policyd) -> None:
        self.app = app

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Yield packets/bytes by interface, verdict and reason, and the map fill."""
        labels = ["interface", "verdict", "reason", "ip_version", "ip_protocol"]
        packets = CounterMetricFamily("vpnr_xdp_packets", "Packets seen by the XDP program",
                                      labels=labels)
        nbytes = CounterMetricFamily("vpnr_xdp_bytes", "Bytes seen by the XDP program",
                                     labels=labels)
        names = {a.ifindex: name for name, a in self.app.datapath.attached.items()}
        rows = self.app.datapath.counters()
        for row in rows:
            values = [names.get(row.ifindex, str(row.ifindex)),
                      codes_pb2.Verdict.Name(row.verdict), codes_pb2.Reason.Name(row.reason),
                      str(row.ip_version), str(row.ip_protocol)]
            packets.add_metric(values, row.packets)
            nbytes.add_metric(values, row.bytes)
        fill = GaugeMetricFamily("vpnr_map_fill_ratio", "Entries over max_entries per map",
                                 labels=["map"])
        fill.add_metric(["xdp_stats"], len(rows) / STATS_MAX_ENTRIES)  # one row per entry
        yield from (packets, nbytes, fill)


class Policyd(DaemonApp):
    """The policy daemon."""

    name = "policyd"
    service_names = (policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.datapath = XdpDatapath(self.config.router.pin_dir, self.config.policyd.interfaces)

    async def start(self) -> None:
        """Adopt the pinned program or build and attach it (compiling off the event loop)."""
        try:
            await asyncio.to_thread(self.datapath.setup)
        except DatapathError as exc:
            raise StartupError(str(exc)) from exc
        self.runtime.registry.register(XdpCollector(self))

    async def stop(self) -> None:
        """Close fds; the program stays attached and the maps stay pinned."""
        self.datapath.close()

    def register(self, server: grpc.aio.Server) -> None:
        """Add the PolicyService servicer."""
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(self), server)

    def status(self) -> policy_pb2.PolicyStatus:
        """Build the Status answer from the kernel's current state."""
        datapath = self.datapath
        info = datapath.prog_info()
        counters = datapath.counters()
        interfaces = []
        for name, attached in datapath.attached.items():
            interfaces.append(policy_pb2.InterfaceStatus(
                name=name, ifindex=attached.ifindex, zone=ZONES[attached.config.zone],
                program_id=info.id, attach_mode=attached.mode, link_id=attached.link_id,
                instructions=info.instructions, attached=True,
                counters=[policy_pb2.VerdictCount(
                    verdict=cast(codes_pb2.Verdict, row.verdict),
                    reason=cast(codes_pb2.Reason, row.reason), packets=row.packets,
                    bytes=row.bytes, ip_version=row.ip_version, ip_protocol=row.ip_protocol)
                    for row in counters if row.ifindex == attached.ifindex]))
        fill = len(counters)  # one row per map entry: no second walk of the map
        maps = [policy_pb2.MapFill(name="xdp_stats", entries=fill, max_entries=STATS_MAX_ENTRIES,
                                   fill_ratio=fill / STATS_MAX_ENTRIES)]
        warnings = [common_pb2.Warning(code="MAP_FILL", message=f"{m.name} is "
                                       f"{m.fill_ratio:.0%} full")
                    for m in maps if m.fill_ratio > FILL_WARNING_RATIO]
        return policy_pb2.PolicyStatus(
            daemon=self.runtime.daemon_info(), interfaces=interfaces, maps=maps,
            warnings=warnings, program_tag=info.tag, build_id=datapath.build_id.hex(),
            adopted=datapath.adopted, pin_dir=str(datapath.pin_dir))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    return run_daemon(Policyd, argv)
