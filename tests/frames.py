"""Ethernet frames for the XDP program, built by hand, and a reference parser that reads them
the way bpf/lib/parse.h does: to a MALFORMED_* reason, or to the model Packet the policy sees.

The parser follows the C step by step, including where the C is lenient (the L4 header is
read up to the end of the frame, not of the IP length; a non-first IPv6 fragment ends the
walk before its own header length is checked), because the randomized test compares the
kernel's decision with :func:`decide` on the same bytes. Pure: no kernel, no network.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vpnr.policyd.model import Bypass, Context, Decision, Packet, Policy, evaluate
from vpnr.v1 import codes_pb2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAC = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")
ETH_IP, ETH_IPV6, ETH_ARP, ETH_VLAN = 0x0800, 0x86DD, 0x0806, 0x8100
ETH_QINQ, ETH_LLDP = 0x88A8, 0x88CC
ETH_HEADER, VLAN_HEADER, IPV4_HEADER, IPV6_HEADER = 14, 4, 20, 40

# IPv6 extension headers the C walks (bpf/lib/parse.h VPNR_IPPROTO_*).
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
EXTENSION_HEADERS = frozenset({HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS})
IPV6_MAX_EXT = 6  # VPNR_IPV6_MAX_EXT
MAX_L4_OFFSET = 1024  # VPNR_MAX_L4_OFFSET
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58


# -- building ---------------------------------------------------------------------------


def ethernet(ethertype: int, payload: bytes, vlans: Sequence[int] = ()) -> bytes:
    """An Ethernet frame; each entry of ``vlans`` adds an 802.1Q tag (outermost first)."""
    tags = b"".join(struct.pack("!HH", ETH_VLAN, vid) for vid in vlans)
    return MAC + tags + struct.pack("!H", ethertype) + payload


def arp() -> bytes:
    """An ARP request for 10.0.0.1 (the content does not matter to the program)."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 1, MAC[6:], bytes([10, 0, 0, 2]),
                       bytes(6), bytes([10, 0, 0, 1]))
    return ethernet(ETH_ARP, body)


def ipv4(src: IPAddress, dst: IPAddress, protocol: int, payload: bytes, *, ttl: int = 64,
         ihl: int = 5, version: int = 4, frag_off: int = 0, tot_len: int | None = None
         ) -> bytes:
    """An IPv4 header (``ihl`` - 5 words of zero options) and ``payload``. ``frag_off`` is
    the raw 16-bit field (flags and offset); ``tot_len`` None means the true length."""
    options = bytes(max(ihl - 5, 0) * 4)  # option 0 is End of Options: never interpreted
    length = IPV4_HEADER + len(options) + len(payload) if tot_len is None else tot_len
    header = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, length & 0xFFFF, 1,
                         frag_off, ttl, protocol, 0, src.packed, dst.packed)
    return header + options + payload


def ipv6(src: IPAddress, dst: IPAddress, next_header: int, payload: bytes, *,
         hop_limit: int = 64, version: int = 6, payload_len: int | None = None) -> bytes:
    """An IPv6 header and ``payload`` (``payload_len`` None means the true length)."""
    length = len(payload) if payload_len is None else payload_len
    header = struct.pack("!IHBB16s16s", version << 28, length & 0xFFFF, next_header,
                         hop_limit, src.packed, dst.packed)
    return header + payload


def extension(kind: int, next_header: int, units: int = 0, *, offset: int = 0,
              more: bool = False) -> bytes:
    """One IPv6 extension header. ``units`` is the header's own length field: 8-byte units
    beyond the first for hop-by-hop/routing/destination options (RFC 8200), 4-byte units
    minus 2 for AH (RFC 4302); the fragment header is always 8 bytes, with ``offset`` in
    8-byte units."""
    if kind == FRAGMENT:
        return struct.pack("!BBHI", next_header, 0, (offset << 3) | int(more), 0x1234)
    size = (units + 2) * 4 if kind == AH else (units + 1) * 8
    return struct.pack("!BB", next_header, units) + bytes(size - 2)


def tcp(src_port: int, dst_port: int, doff: int = 5) -> bytes:
    """A TCP SYN header with ``doff`` - 5 words of zero options (doff < 5 is malformed)."""
    header = struct.pack("!HHIIBBHHH", src_port, dst_port, 1, 0, (doff & 0xF) << 4, 0x02,
                         64240, 0, 0)
    return header + bytes(max(doff - 5, 0) * 4)


def udp(src_port: int, dst_port: int, body: bytes = bytes(8), length: int | None = None
        ) -> bytes:
    """A UDP header and ``body`` (``length`` None means the true length)."""
    size = 8 + len(body) if length is None else length
    return struct.pack("!HHHH", src_port, dst_port, size & 0xFFFF, 0) + body


def icmp(icmp_type: int, size: int = 16) -> bytes:
    """An ICMP/ICMPv6 message of ``size`` bytes (fewer than 8 is malformed)."""
    message = struct.pack("!BBHHH", icmp_type, 0, 0, 1, 1) + bytes(max(size - 8, 0))
    return message[:size]


# -- parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """What bpf/lib/parse.h makes of a frame: a reason when it refused it, else the
    ethertype (after one VLAN tag) and, for IPv4/IPv6, the packet the policy sees."""

    reason: int = 0
    ethertype: int = 0
    packet: Packet | None = None


def _u16(frame: bytes, offset: int) -> int:
    """A big-endian 16-bit field."""
    return int.from_bytes(frame[offset:offset + 2], "big")


def _address(raw: bytes) -> IPAddress:
    """An address from its packed bytes (4 or 16)."""
    return ipaddress.ip_address(raw)


def _malformed(reason: int, ethertype: int = 0) -> Parsed:
    """A refusal."""
    return Parsed(reason=reason, ethertype=ethertype)


def parse(frame: bytes) -> Parsed:
    """vpnr_parse(): Ethernet, at most one 802.1Q tag, then IPv4 or IPv6; any other
    ethertype (ARP included) parses to no packet."""
    end = len(frame)
    if end < ETH_HEADER:
        return _malformed(codes_pb2.REASON_MALFORMED_L2)
    ethertype, off = _u16(frame, 12), ETH_HEADER
    if ethertype == ETH_VLAN:
        if off + VLAN_HEADER > end:
            return _malformed(codes_pb2.REASON_MALFORMED_L2)
        ethertype = _u16(frame, off + 2)
        off += VLAN_HEADER
    if ethertype == ETH_IP:
        return _parse_ipv4(frame, off)
    if ethertype == ETH_IPV6:
        return _parse_ipv6(frame, off)
    return Parsed(ethertype=ethertype)


def _parse_ipv4(frame: bytes, off: int) -> Parsed:
    """vpnr_parse_ipv4(): header, options, total length, fragment offset, then L4."""
    end = len(frame)
    if off + IPV4_HEADER > end:
        return _malformed(codes_pb2.REASON_MALFORMED_L3, ETH_IP)
    version, hlen = frame[off] >> 4, (frame[off] & 0xF) * 4
    if version != 4 or hlen < IPV4_HEADER or off + hlen > end:
        return _malformed(codes_pb2.REASON_MALFORMED_L3, ETH_IP)
    tot_len = _u16(frame, off + 2)
    # Ethernet may pad past the IP length, so only "too long for the frame" is refused.
    if tot_len < hlen or off + tot_len > end:
        return _malformed(codes_pb2.REASON_MALFORMED_L3, ETH_IP)
    ttl, protocol = frame[off + 8], frame[off + 9]
    src, dst = _address(frame[off + 12:off + 16]), _address(frame[off + 16:off + 20])
    offset = _u16(frame, off + 6) & 0x1FFF
    if offset:
        if offset == 1 and protocol == TCP:  # RFC 1858 overlapping-fragment attack
            return _malformed(codes_pb2.REASON_MALFORMED_L4, ETH_IP)
        return Parsed(ethertype=ETH_IP, packet=Packet(src, dst, protocol, fragment=True,
                                                      hop_limit=ttl))
    return _parse_l4(frame, off + hlen, ETH_IP, src, dst, protocol, ttl)


def _parse_ipv6(frame: bytes, off: int) -> Parsed:
    """vpnr_parse_ipv6(): fixed header, up to six extension headers, then L4."""
    end = len(frame)
    refused = _malformed(codes_pb2.REASON_MALFORMED_L3, ETH_IPV6)
    if off + IPV6_HEADER > end or frame[off] >> 4 != 6:
        return refused
    if off + IPV6_HEADER + _u16(frame, off + 4) > end:
        return refused
    next_header, hop_limit = frame[off + 6], frame[off + 7]
    src, dst = _address(frame[off + 8:off + 24]), _address(frame[off + 24:off + 40])
    off += IPV6_HEADER
    for index in range(IPV6_MAX_EXT):
        if next_header not in EXTENSION_HEADERS:
            break
        if next_header == HOPOPTS and index > 0:  # RFC 8200 4.3: only right after the header
            return refused
        if off > MAX_L4_OFFSET or off + 4 > end:  # the C reads 4 bytes of every header
            return refused
        kind, next_header = next_header, frame[off]
        if kind == FRAGMENT:
            fragment_offset = _u16(frame, off + 2) >> 3
            off += 8
            if fragment_offset:
                # The C returns here, before checking that the 8 bytes are in the frame.
                return Parsed(ethertype=ETH_IPV6, packet=Packet(
                    src, dst, next_header, fragment=True, hop_limit=hop_limit))
        elif kind == AH:
            off += (frame[off + 1] + 2) * 4
        else:
            off += (frame[off + 1] + 1) * 8
        if off > end:
            return refused
    if next_header in EXTENSION_HEADERS:
        return _malformed(codes_pb2.REASON_IPV6_EXT_LIMIT, ETH_IPV6)
    return _parse_l4(frame, off, ETH_IPV6, src, dst, next_header, hop_limit)


def _parse_l4(frame: bytes, off: int, ethertype: int, src: IPAddress, dst: IPAddress,
              protocol: int, hop_limit: int) -> Parsed:
    """vpnr_parse_l4(): TCP, UDP, ICMP and ICMPv6 (either family) need a whole header;
    other protocols are not looked into."""
    end = len(frame)
    refused = _malformed(codes_pb2.REASON_MALFORMED_L4, ethertype)
    if off > MAX_L4_OFFSET:
        return refused
    src_port = dst_port = 0
    icmp_type: int | None = None
    if protocol == TCP:
        if off + 20 > end or frame[off + 12] >> 4 < 5 or off + (frame[off + 12] >> 4) * 4 > end:
            return refused
        src_port, dst_port = _u16(frame, off), _u16(frame, off + 2)
    elif protocol == UDP:
        if off + 8 > end or _u16(frame, off + 4) < 8:
            return refused
        src_port, dst_port = _u16(frame, off), _u16(frame, off + 2)
    elif protocol in (ICMP, ICMPV6):
        if off + 8 > end:
            return refused
        icmp_type = frame[off]
    return Parsed(ethertype=ethertype, packet=Packet(
        src, dst, protocol, dst_port=dst_port, src_port=src_port, icmp_type=icmp_type,
        hop_limit=hop_limit))


def decide(policy: Policy, frame: bytes, ctx: Context) -> Decision:
    """What xdp_rbac() decides for ``frame``: refusals of the parser, the ARP bypass and
    unsupported ethertypes here, every IP packet by the reference evaluator."""
    parsed = parse(frame)
    zone = ctx.interface_zone
    if parsed.reason:
        return Decision(codes_pb2.VERDICT_DENY, parsed.reason, src_zone=zone)
    if parsed.packet is None:
        if parsed.ethertype == ETH_ARP and Bypass.ARP in ctx.bypass:
            return Decision(codes_pb2.VERDICT_ALLOW, codes_pb2.REASON_INFRA_BYPASS,
                            src_zone=zone)
        return Decision(codes_pb2.VERDICT_DENY, codes_pb2.REASON_UNSUPPORTED_ETHERTYPE,
                        src_zone=zone)
    return evaluate(policy, parsed.packet, ctx)
