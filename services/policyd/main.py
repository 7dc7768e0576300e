"""policyd: owns the XDP RBAC program and the policy maps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vpnr.core import bpfsys, preflight
from vpnr.core.auditrec import AuditRecorder
from vpnr.core.daemon import DaemonApp, Runtime, StartupError, run_daemon, unix_timestamp
from vpnr.policyd import convert, layout, testrun
from vpnr.policyd.datapath import DatapathError, XdpDatapath
from vpnr.policyd.engine import Change, PolicyEngine
from vpnr.policyd.kernel import KernelMapError, PolicyMaps
from vpnr.policyd.model import IPNetwork, PolicyError
from vpnr.policyd.service import PolicyServicer, protocol_number
from vpnr.policyd.store import PolicyStore, StoreError
from vpnr.v1 import (
    audit_pb2,
    codes_pb2,
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
)

log = logging.getLogger("vpnr.policyd")

FILL_WARNING_RATIO = 0.8
ZONES = {"internal": codes_pb2.ZONE_INTERNAL, "external": codes_pb2.ZONE_EXTERNAL}
BYPASS_FLAGS = {"arp": 1 << 1, "dhcp": 1 << 2, "nd": 1 << 3, "tunnel": 1 << 4}
EXPIRY_INTERVAL = 1.0
TOP_TALKERS = 10


class XdpCollector(Collector):
    """Prometheus view of the kernel counters, read at scrape time."""

    def __init__(self, app: Policyd) -> None:
        self.app = app

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Packets/bytes by interface, verdict and reason; map fill; audit losses; top
        talkers by binding and traffic by role."""
        labels = ["interface", "verdict", "reason", "ip_version", "ip_protocol"]
        packets = CounterMetricFamily("vpnr_xdp_packets", "Packets seen by the XDP program",
                                      labels=labels)
        nbytes = CounterMetricFamily("vpnr_xdp_bytes", "Bytes seen by the XDP program",
                                     labels=labels)
        names = {a.ifindex: name for name, a in self.app.datapath.attached.items()}
        counters = self.app.datapath.counters()
        for row in counters:
            values = [names.get(row.ifindex) or _interface_name(row.ifindex),
                      codes_pb2.Verdict.Name(row.verdict), codes_pb2.Reason.Name(row.reason),
                      str(row.ip_version), str(row.ip_protocol)]
            packets.add_metric(values, row.packets)
            nbytes.add_metric(values, row.bytes)
        yield from (packets, nbytes)
        fill = GaugeMetricFamily("vpnr_map_fill_ratio", "Entries over max_entries per map",
                                 labels=["map"])
        entries = GaugeMetricFamily("vpnr_map_entries", "Entries in a map", labels=["map"])
        size = GaugeMetricFamily("vpnr_map_max_entries",
                                 "Current size of a map (grows for the binding tries)",
                                 labels=["map"])
        limit = GaugeMetricFamily("vpnr_map_limit_entries",
                                  "Hard limit of a map's size", labels=["map"])
        grows = CounterMetricFamily("vpnr_map_grows", "Times a map was grown (copy and swap)",
                                    labels=["map"])
        for m in self.app.map_fill(len(counters)):
            fill.add_metric([m.name], m.fill_ratio)
            entries.add_metric([m.name], m.entries)
            size.add_metric([m.name], m.max_entries)
            limit.add_metric([m.name], m.hard_limit)
            grows.add_metric([m.name], m.grows)
        yield from (fill, entries, size, limit, grows)
        lost = CounterMetricFamily("vpnr_audit_events", "Audit events by outcome in the kernel",
                                   labels=["outcome"])
        outcomes = ("lost_reserve", "lost_rate_limit", "sampled_out", "emitted")
        for outcome, value in zip(outcomes, self.app.maps.audit_lost(), strict=True):
            lost.add_metric([outcome], value)
        yield lost
        version = GaugeMetricFamily("vpnr_policy_version", "Version of the policy in force")
        version.add_metric([], self.app.engine.version)
        yield version
        talkers = CounterMetricFamily("vpnr_identity_bytes",
                                      "Bytes by binding (top talkers) and by role",
                                      labels=["kind", "name", "verdict", "direction"])
        for kind, name, traffic in self.app.top_traffic():
            for d, direction in enumerate(("outbound", "inbound")):
                talkers.add_metric([kind, name, "allow", direction], traffic[4 + d * 2])
                talkers.add_metric([kind, name, "deny", direction], traffic[4 + d * 2 + 1])
        yield talkers


class Policyd(DaemonApp):
    """The policy daemon."""

    name = "policyd"
    service_names = (policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        cfg = self.config.policyd
        self.datapath = XdpDatapath(self.config.router.pin_dir, cfg.interfaces,
                                    ring_bytes=cfg.audit_ring_mib << 20,
                                    log_dir=self.config.router.state_path / "bpf-build")
        self._maps: PolicyMaps | None = None
        self._engine: PolicyEngine | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.audit = AuditRecorder(self.config.router.socket_path("auditd"))

    @property
    def maps(self) -> PolicyMaps:
        """The pinned maps (open once started)."""
        assert self._maps is not None
        return self._maps

    @property
    def engine(self) -> PolicyEngine:
        """The policy engine (exists once started)."""
        assert self._engine is not None
        return self._engine

    async def start(self) -> None:
        """Adopt or build the program, bring the maps to the stored policy, then attach:
        the first packet on an interface already meets the full policy."""
        preflight.require(self.name, ("kernel", "bpf", "bpffs", "headers"))
        cfg = self.config.policyd
        try:
            await asyncio.to_thread(self.datapath.prepare)
            self._maps = PolicyMaps(self.config.router.pin_dir, cfg.audit_ring_mib << 20,
                                    binding_entries=cfg.binding_map_entries,
                                    binding_limit=cfg.binding_map_limit)
            database = Path(cfg.database)
            if not database.is_absolute():
                database = self.config.router.state_path / database
            store = await PolicyStore.open(database)
            self._engine = PolicyEngine(self._maps, store)
            self._engine.on_change = self.record
            await self._engine.start()
            ifindexes = await asyncio.to_thread(self.datapath.ifindexes)
            self._maps.write_interfaces({ifindexes[i.name]: ZONES[i.zone]
                                         for i in cfg.interfaces})
            self._maps.write_config(self._config_value())
            await asyncio.to_thread(self.datapath.attach)
        except (DatapathError, KernelMapError, StoreError, PolicyError) as exc:
            raise StartupError(str(exc)) from exc
        self.runtime.registry.register(XdpCollector(self))
        self._tasks.append(asyncio.create_task(self._expire_bindings()))

    def _config_value(self) -> bytes:
        cfg = self.config.policyd
        flags = layout.CFG_MONITOR if cfg.mode == "monitor" else 0
        for name in cfg.infra_bypass:
            flags |= BYPASS_FLAGS[name]
        cpus = bpfsys.possible_cpus()
        # Each CPU keeps its own bucket: give each its share of the rate and burst.
        rate = max(1, cfg.audit_events_per_second // cpus)
        burst = max(1, cfg.audit_burst // cpus)
        return layout.CONFIG.pack(flags, cfg.audit_allow_sample, rate, burst,
                                  self.config.tunneld.listen_port, 0, 0)

    async def stop(self) -> None:
        """Close fds and the store; the program stays attached and the maps stay pinned."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.audit.close()
        if self._engine is not None:
            await self._engine.store.close()
        if self._maps is not None:
            self._maps.close()
        self.datapath.close()

    def register(self, server: grpc.aio.Server) -> None:
        """Add the PolicyService servicer."""
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(self), server)

    async def _expire_bindings(self) -> None:
        """Remove bindings whose expiry passed (a login that was not renewed)."""
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            for net in self.engine.expired():
                try:
                    change = await self.engine.delete_binding(net, action="binding.expired")
                except PolicyError:
                    continue  # removed meanwhile
                log.info("binding expired", extra={"prefix": str(net),
                                                   "version": change.version})

    # -- control-plane audit ------------------------------------------------------

    def record(self, action: str, change: Change, reason: str) -> None:
        """Send a control-plane audit record to auditd (best effort, never blocks)."""
        detail = {"reason": reason,
                  "bindings_added": change.diff.bindings_added_count,
                  "bindings_removed": change.diff.bindings_removed_count,
                  "bindings_changed": change.diff.bindings_changed_count,
                  "roles_changed": list(change.diff.roles_changed)[:20]}
        event = audit_pb2.ControlEvent(daemon=self.name, action=action, actor="policyd-api",
                                       version_before=change.diff.from_version,
                                       version_after=change.version,
                                       detail_json=json.dumps(detail), success=True)
        log.info("policy changed", extra={"action": action, "version": change.version})
        self.audit.record(event)

    # -- reading ------------------------------------------------------------------

    def map_fill(self, stats_rows: int) -> list[policy_pb2.MapFill]:
        """Fill level of every map that can fill up (``stats_rows``: the verdict counter
        rows the caller has just read, one per xdp_stats entry)."""
        engine, maps = self.engine, self.maps
        live = engine.live
        # Fixed-size maps: their size is their hard limit. The binding tries grow.
        rows = [
            ("xdp_stats", stats_rows, layout.STATS_MAX_ENTRIES),
            ("rule_buckets", len(maps.mirrors[0].buckets or {})
             + len(maps.mirrors[1].buckets or {}), layout.MAX_BUCKETS),
            ("rule_table", len(live.rules) if live else 0, layout.RULE_TABLE_HALF),
            ("rolesets", len(engine.ids.rolesets), layout.MAX_ROLESETS),
            ("roles", len(engine.ids.roles), layout.MAX_ROLES),
        ]
        out = [policy_pb2.MapFill(name=t.name, entries=t.entries, max_entries=t.capacity,
                                  fill_ratio=t.entries / t.capacity, hard_limit=t.limit,
                                  grows=t.grows) for t in maps.trie_fill()]
        out += [policy_pb2.MapFill(name=n, entries=e, max_entries=m, fill_ratio=e / m,
                                   hard_limit=m) for n, e, m in rows]
        return out

    def binding_with_traffic(self, net: IPNetwork) -> policy_pb2.Binding:
        """A binding and its traffic counters."""
        policy = self.engine.policy
        msg = convert.binding_to_proto(net, policy.bindings[net], convert.meta_of(policy, net))
        binding_id = self.engine.ids.bindings.get(net)
        if binding_id:
            msg.traffic.CopyFrom(_traffic_message(self.maps.traffic("binding_traffic",
                                                                    binding_id)))
        return msg

    def role_traffic(self) -> dict[str, list[int]]:
        """Traffic per role: the sum over the role sets that contain it."""
        ids = self.engine.ids.copy()  # the engine may change them meanwhile
        names = {v: k for k, v in ids.roles.items()}
        rows = self.maps.all_traffic("roleset_traffic", self.engine.next_roleset_id)
        totals: dict[str, list[int]] = {}
        for roles, roleset_id in ids.rolesets.items():
            row = rows[roleset_id] if roleset_id < len(rows) else (0,) * 8
            for role_id in roles:
                acc = totals.setdefault(names.get(role_id, str(role_id)), [0] * 8)
                for i, v in enumerate(row):
                    acc[i] += v
        return totals

    def top_traffic(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """("binding", prefix, row) for the top talkers and ("role", name, row) for all."""
        traffic = self.maps.all_traffic("binding_traffic", self.engine.next_binding_id)
        busiest = sorted((i for i, row in enumerate(traffic) if sum(row[4:])),
                         key=lambda i: -sum(traffic[i][4:]))[:TOP_TALKERS]
        by_id = {bid: net for net, bid in self.engine.ids.copy().bindings.items()}
        rows = [(str(by_id[i]), traffic[i]) for i in busiest if i in by_id]
        out = [("binding", name, row) for name, row in rows[:TOP_TALKERS] if sum(row[4:])]
        out.extend(("role", name, tuple(row)) for name, row in sorted(self.role_traffic().items()))
        return out

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
        maps = self.map_fill(len(counters))
        warnings = [common_pb2.Warning(code="MAP_FILL", message=f"{m.name} is "
                                       f"{m.fill_ratio:.0%} full")
                    for m in maps if m.fill_ratio > FILL_WARNING_RATIO]
        slot, kernel_version = self.maps.active()
        if kernel_version != self.engine.version:
            warnings.append(common_pb2.Warning(
                code="POLICY_VERSION", message=f"kernel runs version {kernel_version}, "
                                               f"stored is {self.engine.version}"))
        if self.config.policyd.mode == "monitor":
            warnings.append(common_pb2.Warning(code="MONITOR_MODE",
                                               message="policy is not enforced (monitor)"))
        failure = datapath.build_failure
        if failure is not None:
            warnings.append(common_pb2.Warning(
                code="BUILD_REJECTED",
                message=f"the new XDP program was rejected and the running one "
                        f"({datapath.running_build_id.hex()[:16]}) stays in force; "
                        f"compiler/verifier output: {failure.log_path}"))
        lost = self.maps.audit_lost()
        top = [policy_pb2.IdentityTraffic(kind=kind, name=name,
                                          traffic=_traffic_message(row))
               for kind, name, row in self.top_traffic()]
        return policy_pb2.PolicyStatus(
            daemon=self.runtime.daemon_info(), policy_version=self.engine.version,
            interfaces=interfaces, maps=maps, warnings=warnings, program_tag=info.tag,
            build_id=datapath.build_id.hex(), adopted=datapath.adopted,
            pin_dir=str(datapath.pin_dir), mode=self.config.policyd.mode,
            kernel_policy_version=kernel_version, active_slot=slot,
            audit_lost_reserve=lost[layout.AUDIT_LOST_RESERVE],
            audit_lost_rate_limit=lost[layout.AUDIT_LOST_RATE_LIMIT],
            audit_emitted=lost[layout.AUDIT_EMITTED], policy_adopted=self.engine.adopted,
            top_traffic=top, running_build_id=datapath.running_build_id.hex(),
            build_failure=None if failure is None else policy_pb2.BuildFailure(
                error=str(failure).split("\n", 1)[-1], log_path=str(failure.log_path),
                build_id=failure.build_id.hex(), at=unix_timestamp(failure.at)))

    # -- test / explain -----------------------------------------------------------

    def test_decision(self, request: policy_pb2.TestDecisionRequest) -> policy_pb2.Decision:
        """Run the live program on a crafted (or given) frame and explain the result."""
        attached = self.datapath.attached
        if request.interface:
            if request.interface not in attached:
                raise PolicyError("interface", f"{request.interface!r} is not a policyd "
                                               f"interface ({', '.join(attached)})")
            iface = attached[request.interface]
        else:
            iface = next(iter(attached.values()))
        if request.raw_frame:
            if len(request.raw_frame) < 14 or len(request.raw_frame) > 9000:
                raise PolicyError("raw_frame", "an Ethernet frame of 14-9000 bytes")
            frame = request.raw_frame
        else:
            src = convert.parse_address("src", request.src)
            dst = convert.parse_address("dst", request.dst)
            if src.version != dst.version:
                raise PolicyError("dst", "src and dst are of different IP versions")
            for field, port in (("src_port", request.src_port), ("dst_port", request.dst_port)):
                if port > 65535:
                    raise PolicyError(field, f"a port 0-65535, got {port}")
            if request.icmp_type > 255:
                raise PolicyError("icmp_type", f"0-255, got {request.icmp_type}")
            probe = testrun.Probe(src, dst, protocol_number(request.protocol),
                                  request.src_port or 40000, request.dst_port,
                                  request.icmp_type or (8 if src.version == 4 else 128),
                                  request.fragment)
            frame = testrun.build_frame(probe)
        trace = testrun.run(self.datapath.prog_fd, frame, iface.ifindex)
        return self._explain(trace)

    def _explain(self, trace: testrun.Trace) -> policy_pb2.Decision:
        engine = self.engine
        role_names = {v: k for k, v in engine.ids.roles.items()}
        roles = [role_names.get(r, f"#{r}") for r in
                 (self.maps.roleset(trace.slot, trace.roleset_id) if trace.has_binding else ())]
        decision = policy_pb2.Decision(
            verdict=cast(codes_pb2.Verdict, trace.verdict),
            reason=cast(codes_pb2.Reason, trace.reason), roles=roles,
            src_zone=cast(codes_pb2.Zone, trace.src_zone),
            dst_zone=cast(codes_pb2.Zone, trace.dst_zone),
            program_id=self.datapath.prog_info().id, duration_ns=trace.duration_ns,
            policy_version=trace.version)
        rule = None
        if trace.rule_id:
            for rules in engine.policy.roles.values():
                for candidate in rules:
                    if candidate.id == trace.rule_id:
                        rule = candidate
            if rule is not None:
                decision.matched_rule.CopyFrom(convert.rule_to_proto(rule))
        verdict = codes_pb2.Verdict.Name(trace.verdict).removeprefix("VERDICT_")
        reason = codes_pb2.Reason.Name(trace.reason).removeprefix("REASON_").lower()
        if rule is not None:
            what = (f"rule {rule.id} of role {rule.role} (priority {rule.priority}, "
                    f"{rule.action.name.lower()})")
        elif trace.has_binding:
            what = f"roles {', '.join(roles)}: no rule matched"
        else:
            what = "no binding for the source"
        decision.explanation = f"{verdict} ({reason}): {what}; policy version {trace.version}"
        return decision


def _interface_name(ifindex: int) -> str:
    """Name of an interface policyd does not attach to (e.g. tunneld's decap interface,
    whose packets the program also sees); the index when it is gone."""
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return str(ifindex)


def _traffic_message(row: tuple[int, ...]) -> policy_pb2.TrafficCounters:
    """Counters in struct vpnr_traffic order: packets then bytes, [direction][verdict]."""
    return policy_pb2.TrafficCounters(
        outbound_allowed_packets=row[0], outbound_denied_packets=row[1],
        inbound_allowed_packets=row[2], inbound_denied_packets=row[3],
        outbound_allowed_bytes=row[4], outbound_denied_bytes=row[5],
        inbound_allowed_bytes=row[6], inbound_denied_bytes=row[7])


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    return run_daemon(Policyd, argv)

