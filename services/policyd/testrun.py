"""Test/Explain: craft a packet, run the live XDP program on it, read back its decision.

The frame goes through BPF_PROG_TEST_RUN with a 32-byte metadata area in front of it that
starts with the trace magic; the program writes its decision there (bpf/lib/trace.h) and
skips counters and audit for it. The answer is the kernel's, not a model's.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from vpnr.core import bpfsys
from vpnr.policyd import layout

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAC = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")
XDP_MD = struct.Struct("=6I")  # struct xdp_md: data, data_end, data_meta, ifindex, queue, egress
TRACE_AREA = 32  # metadata bytes: a multiple of 4, at most 32 (kernel limit)
OTHER_PROTOCOL = 253  # RFC 3692 experimentation number: stands for "any other protocol"
FRAGMENT_OFFSET = 185  # a non-first fragment (offset in 8-byte units), never 1 (RFC 1858)
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
ND_TYPES = range(133, 138)


@dataclass(frozen=True)
class Probe:
    """What to put in the crafted packet."""

    src: IPAddress
    dst: IPAddress
    protocol: int  # IANA number
    src_port: int = 40000
    dst_port: int = 0
    icmp_type: int = 8
    fragment: bool = False


@dataclass(frozen=True)
class Trace:
    """The program's decision as written into the metadata area."""

    verdict: int
    reason: int
    src_zone: int
    dst_zone: int
    rule_id: int
    binding_id: int
    roleset_id: int
    rule_role: int
    has_binding: bool
    slot: int
    version: int
    action: int
    duration_ns: int


def _l4(probe: Probe) -> bytes:
    if probe.protocol == 6:
        return struct.pack("!HHIIBBHHH", probe.src_port, probe.dst_port, 1, 0, 5 << 4, 0x02,
                           64240, 0, 0)
    if probe.protocol == 17:
        return struct.pack("!HHHH", probe.src_port, probe.dst_port, 8 + 8, 0) + bytes(8)
    if probe.protocol in (1, 58):
        return struct.pack("!BBHHH", probe.icmp_type, 0, 0, 1, 1) + bytes(8)
    return bytes(16)


def build_frame(probe: Probe) -> bytes:
    """An Ethernet frame carrying the probe (checksums are not checked by XDP)."""
    # A non-first fragment carries the middle of some datagram: no L4 header.
    payload = bytes(16) if probe.fragment else _l4(probe)
    if probe.src.version == 4:
        frag = FRAGMENT_OFFSET if probe.fragment else 0
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64,
                             probe.protocol, 0, probe.src.packed, probe.dst.packed)
        return MAC + b"\x08\x00" + header + payload
    hop_limit = 255 if probe.protocol == 58 and probe.icmp_type in ND_TYPES else 64
    next_header = probe.protocol
    if probe.fragment:
        payload = struct.pack("!BBHI", probe.protocol, 0, FRAGMENT_OFFSET << 3, 1) + payload
        next_header = 44
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit,
                         probe.src.packed, probe.dst.packed)
    return MAC + b"\x86\xdd" + header + payload


def run(prog_fd: int, frame: bytes, ifindex: int, repeat: int = 1) -> Trace:
    """Run the program on ``frame`` as if it arrived on ``ifindex``; decode its trace."""
    meta = layout.U32.pack(layout.TRACE_MAGIC).ljust(TRACE_AREA, b"\0")
    data = meta + frame
    ctx = XDP_MD.pack(TRACE_AREA, len(data), 0, ifindex, 0, 0)
    result = bpfsys.prog_test_run(prog_fd, data, repeat=repeat, ctx=ctx)
    (magic, verdict, reason, src_zone, dst_zone, rule_id, binding_id, roleset_id, rule_role,
     flags, _, active) = layout.TRACE.unpack(result.data_out[:layout.TRACE.size])
    if magic != layout.TRACE_MAGIC:
        raise RuntimeError("the program returned no decision trace")
    slot, version = layout.split_active(layout.ACTIVE.pack(active))
    return Trace(verdict, reason, src_zone, dst_zone, rule_id, binding_id, roleset_id,
                 rule_role, bool(flags & 1), slot, version, result.retval, result.duration_ns)
