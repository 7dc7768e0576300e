"""Audit events from the XDP program: every DENY, ALLOW sampled 1 in N, a per-role token
bucket against floods, and every event not written counted (kernel and Status agree)."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from conftest import DaemonProcess, router_toml
from vpnr.core import bpfsys
from vpnr.core.ringbuf import RingReader
from vpnr.policyd import layout, testrun
from vpnr.v1 import codes_pb2, policy_pb2, policy_pb2_grpc

pytestmark = pytest.mark.root

RATE, BURST = 20, 10  # per role, split over the CPUs by policyd
SOURCE = "10.1.0.10"
SOURCE_BYTES = ipaddress.IPv4Address(SOURCE).packed


@pytest.fixture
def audited(tmp_path: Path, netns: str, instance: str
            ) -> Iterator[tuple[policy_pb2_grpc.PolicyServiceStub, Path]]:
    """policyd auditing every allowed packet, with a small per-role rate."""
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0",
                                  extra=f"audit_allow_sample = 1\n"
                                        f"audit_events_per_second = {RATE}\n"
                                        f"audit_burst = {BURST}\n"))
    proc = DaemonProcess("policyd", config, tmp_path / "run", instance, netns=netns).start()
    try:
        with grpc.insecure_channel(f"unix:{proc.socket}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            stub.ReplacePolicy(policy_pb2.ReplacePolicyRequest(policy=policy_pb2.PolicyDocument(
                roles=[policy_pb2.Role(name="web", rules=[policy_pb2.Rule(
                    id=7, action=policy_pb2.ACTION_ALLOW, protocol=codes_pb2.PROTOCOL_TCP,
                    dst_port_from=80, dst_port_to=80)])],
                bindings=[policy_pb2.Binding(prefix=f"{SOURCE}/32", roles=["web"])])),
                timeout=30)
            yield stub, Path("/sys/fs/bpf/vpnr") / instance
    finally:
        proc.stop()


def frame(port: int) -> bytes:
    """A TCP packet from the bound source (no trace metadata: it counts as traffic)."""
    return testrun.build_frame(testrun.Probe(ipaddress.ip_address(SOURCE),
                                             ipaddress.ip_address("192.0.2.1"), 6,
                                             dst_port=port))


def test_flood_is_rate_limited_per_role_and_every_suppressed_event_is_counted(
        audited: tuple[policy_pb2_grpc.PolicyServiceStub, Path]) -> None:
    stub, pins = audited
    events: list[dict[str, object]] = []
    reader = RingReader(str(pins / "audit_ring"),
                        lambda raw: events.append(layout.decode_audit_event(raw)))
    prog = bpfsys.obj_get(str(pins / "xdp_rbac_prog"))
    try:
        reader.consume()
        events.clear()
        before = stub.Status(policy_pb2.PolicyStatusRequest(), timeout=10)
        flood = 500
        run = bpfsys.prog_test_run(prog, frame(81), repeat=flood)  # denied: no rule for 81
        assert run.retval == testrun.XDP_DROP
        reader.consume()
        after = stub.Status(policy_pb2.PolicyStatusRequest(), timeout=10)
        ours = SOURCE_BYTES.ljust(16, b"\0")  # the veth also carries the kernel's own IPv6
        denied = [e for e in events if e["verdict"] == codes_pb2.VERDICT_DENY
                  and e["src"] == ours]
        # One test run stays on one CPU: that CPU's share of the burst gets through.
        assert 1 <= len(denied) <= BURST
        assert after.audit_emitted - before.audit_emitted == len(events)
        # Every flood packet not audited was counted (background traffic may add a few).
        assert (after.audit_lost_rate_limit - before.audit_lost_rate_limit
                >= flood - len(denied))
        assert after.audit_lost_reserve == before.audit_lost_reserve  # the ring had room

        time.sleep(1.2)  # the bucket refills at its rate
        events.clear()
        run = bpfsys.prog_test_run(prog, frame(80), repeat=1)
        assert run.retval == testrun.XDP_PASS
        reader.consume()
        allowed = [e for e in events if e["verdict"] == codes_pb2.VERDICT_ALLOW
                   and e["src"] == ours]
        assert len(allowed) == 1  # sampling 1 in 1: the allowed packet is audited
        assert allowed[0]["rule_id"] == 7 and allowed[0]["reason"] == codes_pb2.REASON_RULE_ALLOW
        assert allowed[0]["dst_port"] == 80 and allowed[0]["ip_protocol"] == 6
    finally:
        os.close(prog)
        reader.close()
