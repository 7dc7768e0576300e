"""The live XDP program on crafted frames (BPF_PROG_TEST_RUN, no trace metadata, so they
count like real traffic): what passes, what is dropped and with which reason, as counted
in its pinned per-CPU map."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DaemonProcess, router_toml
from vpnr.core import bpfsys
from vpnr.policyd.datapath import COUNTER, STATS_KEY
from vpnr.v1 import codes_pb2

pytestmark = pytest.mark.root

XDP_DROP, XDP_PASS = 1, 2
MAC = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")


def ipv4(proto: int, payload: bytes, ihl: int = 5) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", (4 << 4) | ihl, 0, 20 + len(payload), 1, 0, 64, proto,
                         0, bytes([10, 1, 0, 10]), bytes([10, 1, 0, 1]))
    return MAC + b"\x08\x00" + header + payload


ICMP_ECHO = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"x" * 16
ARP = MAC + b"\x08\x06" + bytes(28)
LLDP = MAC + b"\x88\xcc" + bytes(40)
VLAN_ICMP = MAC + b"\x81\x00\x00\x05" + ipv4(1, ICMP_ECHO)[12:]
TRUNCATED_IPV4 = MAC + b"\x08\x00" + bytes([0x45]) + bytes(9)
BAD_IHL = ipv4(1, ICMP_ECHO, ihl=4)


@pytest.fixture
def program(tmp_path: Path, netns: str, instance: str) -> Iterator[tuple[int, int]]:
    """The program and stats map pinned by a real policyd (which is stopped again)."""
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0"))
    proc = DaemonProcess("policyd", config, tmp_path / "run", instance, netns=netns).start()
    assert proc.stop() == 0
    pins = Path("/sys/fs/bpf/vpnr") / instance
    prog_fd = bpfsys.obj_get(str(pins / "xdp_rbac_prog"))
    stats_fd = bpfsys.obj_get(str(pins / "xdp_stats"))
    try:
        yield prog_fd, stats_fd
    finally:
        os.close(prog_fd)
        os.close(stats_fd)


def counted(stats_fd: int) -> dict[tuple[int, int], int]:
    """Packets by (verdict, reason), summed over interfaces and CPUs."""
    totals: dict[tuple[int, int], int] = {}
    for key in bpfsys.map_keys(stats_fd, STATS_KEY.size):
        _, verdict, reason, _, _ = STATS_KEY.unpack(key)
        values = bpfsys.percpu_lookup(stats_fd, key, COUNTER.size) or []
        totals[(verdict, reason)] = totals.get((verdict, reason), 0) + sum(
            COUNTER.unpack(v)[0] for v in values)
    return totals


@pytest.mark.parametrize(("frame", "action", "verdict", "reason"), [
    (ARP, XDP_PASS, codes_pb2.VERDICT_ALLOW, codes_pb2.REASON_INFRA_BYPASS),
    # No policy installed: a source without a binding is denied (fail closed).
    (ipv4(1, ICMP_ECHO), XDP_DROP, codes_pb2.VERDICT_DENY, codes_pb2.REASON_NO_ROLE),
    (VLAN_ICMP, XDP_DROP, codes_pb2.VERDICT_DENY, codes_pb2.REASON_NO_ROLE),
    (LLDP, XDP_DROP, codes_pb2.VERDICT_DENY, codes_pb2.REASON_UNSUPPORTED_ETHERTYPE),
    (TRUNCATED_IPV4, XDP_DROP, codes_pb2.VERDICT_DENY, codes_pb2.REASON_MALFORMED_L3),
    (BAD_IHL, XDP_DROP, codes_pb2.VERDICT_DENY, codes_pb2.REASON_MALFORMED_L3),
], ids=["arp", "ipv4-icmp", "vlan-ipv4", "lldp", "truncated-ipv4", "ipv4-ihl-4"])
def test_frame_verdict_and_counter(program: tuple[int, int], frame: bytes, action: int,
                                   verdict: int, reason: int) -> None:
    prog_fd, stats_fd = program
    before = counted(stats_fd).get((verdict, reason), 0)
    run = bpfsys.prog_test_run(prog_fd, frame, repeat=3)
    assert run.retval == action
    assert counted(stats_fd).get((verdict, reason), 0) - before == 3
