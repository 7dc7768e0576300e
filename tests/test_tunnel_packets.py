"""vpnr.tunneld.packets: MSS clamping, IPv4 fragmentation, ICMP "too big" errors.

Two halves. The unit tests check the functions against an independent, deliberately naive
checksum (a per-word loop, RFC 1071 section 4.1) and a naive reassembler. The kernel tests
put two network namespaces on a veth pair and let Linux judge the bytes: it must accept the
generated ICMP errors (the PMTU of the socket and route drops), reassemble the fragments
into the original datagram, and complete a handshake on a clamped SYN.

Checksum offload is switched off on both veth ends (``ethtool -K tx off rx off``): with it
on, frames captured on the peer carry only a partial TCP/UDP checksum (CHECKSUM_PARTIAL is
handed through veth untouched). Injection into a namespace goes through AF_PACKET with a
full Ethernet header where possible, so the receiving kernel checks every checksum we
computed (an ``IPPROTO_RAW`` socket would have the sending kernel rewrite the IPv4 header
checksum and total length); each kernel test first shows that the path really verifies
checksums by injecting a corrupted copy and watching the InCsumErrors counter rise.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import random
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from vpnr.core.netns import entered
from vpnr.tunneld import packets
from vpnr.tunneld.packets import (
    clamp_mss,
    fragment_ipv4,
    icmp4_frag_needed,
    icmp6_packet_too_big,
    inner_addresses,
    inner_mtu,
    ip_packet_length,
    ipv4_checksum,
    mss_for,
)

IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14  # linux/in.h
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_MTU = 23, 2, 24  # linux/in6.h
ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
TCP_MAXSEG = 2
WAIT = 3.0  # seconds any kernel reaction may take; every wait loop is bounded by it

A4, B4 = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
A6 = ipaddress.IPv6Address("2001:db8::1").packed
B6 = ipaddress.IPv6Address("2001:db8::2").packed
ROUTER6 = ipaddress.IPv6Address("2001:db8::fe").packed


def seeded(seed: int) -> random.Random:
    """Reproducible test data, not secrets."""
    return random.Random(seed)  # noqa: S311


# -- independent reference implementations -------------------------------------------------


def ref_checksum(data: bytes) -> int:
    """RFC 1071 4.1, word by word, carries folded at the end."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ref_l4_checksum_ok(ip: bytes, protocol: int) -> bool:
    """Whether the TCP/UDP/ICMPv6 checksum of the IPv4 or IPv6 packet ``ip`` verifies,
    pseudo-header built by hand."""
    if ip[0] >> 4 == 4:
        hlen = (ip[0] & 15) * 4
        segment = ip[hlen:struct.unpack("!H", ip[2:4])[0]]
        pseudo = ip[12:20] + bytes([0, protocol]) + struct.pack("!H", len(segment))
    else:
        segment = ip[40:40 + struct.unpack("!H", ip[4:6])[0]]
        pseudo = ip[8:40] + struct.pack("!I", len(segment)) + bytes([0, 0, 0, protocol])
    return ref_checksum(pseudo + segment) == 0


def ipv4(src: bytes, dst: bytes, protocol: int, payload: bytes, *, options: bytes = b"",
         frag: int = 0, ident: int = 0x1234, ttl: int = 64) -> bytes:
    """An IPv4 packet with a correct header checksum (computed with ref_checksum)."""
    assert len(options) % 4 == 0
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | (5 + len(options) // 4), 0,
                                   20 + len(options) + len(payload), ident, frag, ttl,
                                   protocol, 0, src, dst) + options)
    header[10:12] = struct.pack("!H", ref_checksum(bytes(header)))
    return bytes(header) + payload


def ipv6(src: bytes, dst: bytes, next_header: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64, src,
                       dst) + payload


def with_l4_checksum(ip: bytes, protocol: int, position: int) -> bytes:
    """``ip`` with the L4 checksum at ``position`` of the segment filled in (by reference)."""
    out = bytearray(ip)
    start = (out[0] & 15) * 4 if out[0] >> 4 == 4 else 40
    out[start + position:start + position + 2] = b"\x00\x00"
    if out[0] >> 4 == 4:
        segment = bytes(out[start:])
        pseudo = bytes(out[12:20]) + bytes([0, protocol]) + struct.pack("!H", len(segment))
    else:
        segment = bytes(out[start:])
        pseudo = bytes(out[8:40]) + struct.pack("!I", len(segment)) + bytes([0, 0, 0, protocol])
    value = ref_checksum(pseudo + segment)
    if protocol == 17 and value == 0:
        value = 0xFFFF
    out[start + position:start + position + 2] = struct.pack("!H", value)
    return bytes(out)


def tcp_segment(options: bytes, flags: int = 0x02, payload: bytes = b"") -> bytes:
    assert len(options) % 4 == 0
    return struct.pack("!HHIIBBHHH", 40000, 443, 1000, 0, (5 + len(options) // 4) << 4,
                       flags, 64240, 0, 0) + options + payload


def syn4(options: bytes, flags: int = 0x02) -> bytearray:
    return bytearray(with_l4_checksum(ipv4(A4, B4, 6, tcp_segment(options, flags)), 6, 16))


def syn6(options: bytes, flags: int = 0x02) -> bytearray:
    return bytearray(with_l4_checksum(ipv6(A6, B6, 6, tcp_segment(options, flags)), 6, 16))


def udp4(src: bytes, dst: bytes, sport: int, dport: int, data: bytes,
         options: bytes = b"") -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    return with_l4_checksum(ipv4(src, dst, 17, udp, options=options), 17, 6)


def mss_of(packet: bytes, offset: int = 0) -> list[int]:
    """The MSS options of the TCP SYN at ``offset`` (naive parser, well-formed input)."""
    start = offset + ((packet[offset] & 15) * 4 if packet[offset] >> 4 == 4 else 40)
    end = start + (packet[start + 12] >> 4) * 4
    i, found = start + 20, []
    for _ in range(40):
        if i >= end or packet[i] == 0:
            break
        if packet[i] == 1:
            i += 1
            continue
        if packet[i] == 2:
            found.append(struct.unpack("!H", packet[i + 2:i + 4])[0])
        i += packet[i + 1]
    return found


MSS_1460 = b"\x02\x04\x05\xb4"
# Linux's SYN: MSS, SACK permitted, timestamps, NOP, window scale.
LINUX_OPTIONS = MSS_1460 + b"\x04\x02\x08\x0a" + bytes(8) + b"\x01\x03\x03\x07"


# -- unit: MTU and checksums ---------------------------------------------------------------


def test_inner_mtu_and_mss() -> None:
    assert inner_mtu(1500) == 1440
    assert inner_mtu(1500, underlay_ipv6=True) == 1420
    assert inner_mtu(9000) == 8940
    assert mss_for(1440) == 1400
    assert mss_for(1440, ipv6=True) == 1380
    assert mss_for(inner_mtu(1500), True) == 1380
    with pytest.raises(ValueError, match="IPv6 link"):
        inner_mtu(1000, underlay_ipv6=True)
    with pytest.raises(ValueError, match="inner MTU"):
        inner_mtu(100)


def test_internet_checksum_matches_reference() -> None:
    rng = seeded(7)
    cases = [b"", b"\x00", b"\x00\x00", b"\xff\xff", b"\xff", b"\x01\x02\x03",
             bytes(64), b"\xff" * 64]
    cases += [rng.randbytes(rng.randrange(0, 1600)) for _ in range(300)]
    for data in cases:
        assert packets.internet_checksum(data) == ref_checksum(data), data.hex()
        assert packets.internet_checksum(bytearray(data)) == ref_checksum(data)
        assert packets.internet_checksum(memoryview(data)) == ref_checksum(data)


def test_ipv4_checksum_ignores_checksum_field() -> None:
    header = bytearray(ipv4(A4, B4, 17, b"x" * 10, options=b"\x94\x04\x00\x00"))
    good = struct.unpack("!H", header[10:12])[0]
    assert ipv4_checksum(header) == good
    header[10:12] = b"\xde\xad"
    assert ipv4_checksum(header) == good
    assert ipv4_checksum(bytes(header[:24])) == good
    with pytest.raises(ValueError, match="too short"):
        ipv4_checksum(header[:23])


def test_checksum_update16_equals_recomputation() -> None:
    rng = seeded(11)
    for _ in range(500):
        # Word 0 is the checksum; the last word stays non-zero (as the protocol number in a
        # pseudo-header does): RFC 1624 is exact unless every covered word becomes zero.
        data = bytearray(rng.randbytes(2 * rng.randrange(3, 40)))
        data[0:2] = b"\x00\x00"
        data[-2:] = b"\x00\x06"
        data[0:2] = struct.pack("!H", ref_checksum(bytes(data)))
        word = 2 * rng.randrange(1, len(data) // 2 - 1)
        old = struct.unpack("!H", data[word:word + 2])[0]
        new = rng.choice([0, 0xFFFF, rng.randrange(0x10000)])
        updated = packets.checksum_update16(struct.unpack("!H", data[0:2])[0], old, new)
        data[word:word + 2] = struct.pack("!H", new)
        data[0:2] = struct.pack("!H", updated)
        assert ref_checksum(bytes(data)) == 0


# -- unit: addresses and lengths ------------------------------------------------------------


def test_inner_addresses_and_length() -> None:
    pkt = ipv4(A4, B4, 17, bytes(8))
    frame = bytes(14) + pkt + bytes(18)  # Ethernet padding after a short packet
    assert inner_addresses(frame, 14) == (4, A4, B4)
    assert inner_addresses(frame, 14, expected_version=4) == (4, A4, B4)
    assert inner_addresses(frame, 14, expected_version=6) is None
    assert ip_packet_length(frame, 14) == 28
    pkt6 = ipv6(A6, B6, 17, bytes(8))
    assert inner_addresses(bytes(14) + pkt6, 14) == (6, A6, B6)
    assert ip_packet_length(pkt6 + bytes(10)) == 48
    assert inner_addresses(pkt[:19], 0) is None  # too short
    assert inner_addresses(pkt6[:39], 0) is None
    assert inner_addresses(pkt6[:47], 0) is None  # payload length beyond the buffer
    assert inner_addresses(pkt[:27], 0) is None  # total length beyond the buffer
    assert inner_addresses(b"\x45" + pkt[1:2] + b"\x00\x13" + pkt[4:], 0) is None  # < IHL*4
    assert inner_addresses(b"\x44" + pkt[1:], 0) is None  # IHL 4
    assert inner_addresses(b"\x55" + pkt[1:], 0) is None  # version 5
    assert inner_addresses(b"", 0) is None
    assert inner_addresses(pkt, len(pkt)) is None
    assert inner_addresses(pkt, -1) is None


# -- unit: MSS clamping --------------------------------------------------------------------


@pytest.mark.parametrize("make", [syn4, syn6])
def test_clamp_mss_lowers_syn(make: Callable[..., bytearray]) -> None:
    for options in (LINUX_OPTIONS, b"\x01" + MSS_1460 + b"\x01\x01\x01",  # MSS at odd offset
                    b"\x01\x01" + MSS_1460 + b"\x00\x00", MSS_1460):
        for flags in (0x02, 0x12):  # SYN, SYN-ACK
            pkt = make(options, flags)
            frame = bytearray(14) + pkt + bytearray(6)
            assert clamp_mss(frame, 14, 1400)
            out = bytes(frame[14:14 + len(pkt)])
            assert mss_of(out) == [1400]
            assert ref_l4_checksum_ok(out, 6), options.hex()
            assert frame[:14] == bytes(14) and frame[-6:] == bytes(6)
            changed = [i for i in range(len(pkt)) if pkt[i] != out[i]]
            assert len(changed) <= 4  # MSS value and checksum only
            assert not clamp_mss(frame, 14, 1400)  # idempotent


@pytest.mark.parametrize("make", [syn4, syn6])
def test_clamp_mss_leaves_alone(make: Callable[..., bytearray]) -> None:
    cases = {
        "not SYN": make(LINUX_OPTIONS, 0x10),
        "smaller MSS": make(b"\x02\x04\x05\x00"),
        "equal MSS": make(b"\x02\x04\x05\x78"),
        "no MSS": make(b"\x04\x02\x01\x01"),
        "no options": make(b""),
        "MSS after EOL": make(b"\x00\x01\x01\x01" + MSS_1460),
        "MSS length 3": make(b"\x02\x03\x05\xb4"),
        "MSS length 5": make(b"\x02\x05\x05\xb4\x00\x01\x01\x01"),
        "option length 0": make(b"\x08\x00" + MSS_1460 + b"\x01\x01"),
        "option length 1": make(b"\x08\x01" + MSS_1460 + b"\x01\x01"),
        "option past header": make(b"\x01\x01\x01\x08" + MSS_1460),
        "MSS truncated": make(b"\x01\x01\x01\x01\x01\x01\x02\x04"),
        "kind at last byte": make(b"\x01\x01\x01\x02"),
        "malformed after MSS": make(MSS_1460 + b"\x05\x09\x00\x00"),
    }
    for name, pkt in cases.items():
        before = bytes(pkt)
        assert not clamp_mss(pkt, 0, 1400), name
        assert bytes(pkt) == before, name


def test_clamp_mss_rejects_malformed_ip_and_tcp() -> None:
    good = syn4(LINUX_OPTIONS)
    cases = []
    bad_doff = bytearray(good)
    bad_doff[20 + 12] = 0x40  # data offset 4
    cases.append(bad_doff)
    long_doff = bytearray(good)
    long_doff[20 + 12] = 0xF0  # options beyond the packet
    cases.append(long_doff)
    cases.append(bytearray(good[:30]))  # total length beyond the buffer
    short_tcp = bytearray(ipv4(A4, B4, 6, tcp_segment(b"")[:16]))
    cases.append(short_tcp)
    non_first = bytearray(ipv4(A4, B4, 6, tcp_segment(LINUX_OPTIONS), frag=0x0001))
    cases.append(non_first)
    udp = bytearray(ipv4(A4, B4, 17, tcp_segment(LINUX_OPTIONS)))
    cases.append(udp)
    ext = bytearray(ipv6(A6, B6, 60, b"\x06\x00" + bytes(6) + tcp_segment(LINUX_OPTIONS)))
    cases.append(ext)  # IPv6 with a destination options header: documented as not clamped
    cases.append(bytearray(b"\x45"))
    for pkt in cases:
        before = bytes(pkt)
        assert not clamp_mss(pkt, 0, 1400), before.hex()
        assert bytes(pkt) == before
    first_fragment = bytearray(ipv4(A4, B4, 6, tcp_segment(LINUX_OPTIONS), frag=0x2000))
    assert clamp_mss(first_fragment, 0, 1400)
    assert mss_of(bytes(first_fragment)) == [1400]


def test_clamp_mss_random_options_keep_checksum() -> None:
    rng = seeded(3)
    for _ in range(300):
        parts = [MSS_1460[:2] + struct.pack("!H", rng.randrange(1, 0x10000))]
        for _ in range(rng.randrange(0, 4)):
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(
                [b"\x01", b"\x04\x02", b"\x03\x03\x07", b"\x08\x0a" + rng.randbytes(8)]))
        options = b"".join(parts)
        options += b"\x00" * (-len(options) % 4)
        if len(options) > 40:
            continue
        pkt = rng.choice([syn4, syn6])(options)
        mss = mss_of(bytes(pkt))[0]
        limit = rng.choice([536, 1200, 1400, 1460])
        assert clamp_mss(pkt, 0, limit) == (mss > limit)
        assert mss_of(bytes(pkt)) == [min(mss, limit)]
        assert ref_l4_checksum_ok(bytes(pkt), 6)


# -- unit: fragmentation -------------------------------------------------------------------


def reassemble(fragments: list[bytes]) -> bytes:
    """Naive RFC 815-style reassembly of complete fragment sets, header from the first."""
    data = bytearray()
    seen: list[tuple[int, int]] = []
    first = last = b""
    for frag in fragments:
        assert ref_checksum(frag[:(frag[0] & 15) * 4]) == 0
        hlen = (frag[0] & 15) * 4
        field = struct.unpack("!H", frag[6:8])[0]
        start = (field & 0x1FFF) * 8
        payload = frag[hlen:struct.unpack("!H", frag[2:4])[0]]
        if len(data) < start + len(payload):
            data += bytes(start + len(payload) - len(data))
        data[start:start + len(payload)] = payload
        seen.append((start, start + len(payload)))
        if start == 0:
            first = frag
        if not field & 0x2000:
            last = frag
    assert first and last
    covered = 0
    for start, end in sorted(seen):
        assert start <= covered
        covered = max(covered, end)
    assert covered == len(data)
    hlen = (first[0] & 15) * 4
    header = bytearray(first[:hlen])
    header[2:4] = struct.pack("!H", hlen + len(data))
    header[6:8] = b"\x00\x00"
    header[10:12] = b"\x00\x00"
    header[10:12] = struct.pack("!H", ref_checksum(bytes(header)))
    return bytes(header) + bytes(data)


def normalised(packet: bytes) -> bytes:
    """``packet`` with flags/offset cleared and the header checksum recomputed."""
    out = bytearray(packet)
    out[6:8] = b"\x00\x00"
    out[10:12] = b"\x00\x00"
    out[10:12] = struct.pack("!H", ref_checksum(bytes(out[:(out[0] & 15) * 4])))
    return bytes(out)


RA = b"\x94\x04\x00\x00"  # Router Alert: copied flag set
RR = b"\x07\x07\x04" + bytes(4)  # Record Route, one slot: not copied


@pytest.mark.parametrize("options", [b"", RA, RR + b"\x01" + RA, RA + RR + b"\x00"],
                         ids=["none", "RA", "RR-NOP-RA", "RA-RR-EOL"])
@pytest.mark.parametrize("mtu", [68, 576, 1000, 1280, 1440])
def test_fragment_ipv4_reassembles(options: bytes, mtu: int) -> None:
    rng = seeded(mtu)
    for size in (1, 7, 8, 9, mtu, mtu + 1, 3000, 9000):
        pkt = udp4(B4, A4, 5000, 6000, rng.randbytes(size), options)
        frags = fragment_ipv4(pkt + bytes(5), mtu)  # trailing padding is not payload
        if len(pkt) <= mtu:
            assert frags == [pkt]
            continue
        assert len(frags) > 1
        for i, frag in enumerate(frags):
            assert len(frag) <= mtu
            field = struct.unpack("!H", frag[6:8])[0]
            assert not field & 0x4000
            assert bool(field & 0x2000) == (i < len(frags) - 1)
            assert frag[4:6] == pkt[4:6] and frag[8:10] == pkt[8:10]  # id, TTL, protocol
            hlen = (frag[0] & 15) * 4
            assert struct.unpack("!H", frag[2:4])[0] == len(frag)
            if i < len(frags) - 1:
                assert (len(frag) - hlen) % 8 == 0
            if i == 0:
                assert frag[20:hlen] == options
            else:
                assert frag[20:hlen] == (RA if RA in options else b"")
        assert reassemble(frags) == normalised(pkt)


def test_fragment_ipv4_of_a_fragment_keeps_offset_and_mf() -> None:
    pkt = udp4(B4, A4, 5000, 6000, bytes(range(256)) * 12, RA)
    outer = fragment_ipv4(pkt, 1280)
    assert len(outer) == 3
    again = [f for frag in outer for f in fragment_ipv4(frag, 300)]
    for frag in again:
        assert len(frag) <= 300
    assert all(struct.unpack("!H", f[6:8])[0] & 0x2000 for f in again[:-1])
    assert not struct.unpack("!H", again[-1][6:8])[0] & 0x2000
    assert reassemble(again) == normalised(pkt)


def test_fragment_ipv4_refuses() -> None:
    pkt = udp4(B4, A4, 1, 2, bytes(2000))
    df = bytearray(pkt)
    df[6] |= 0x40
    with pytest.raises(ValueError, match="DF"):
        fragment_ipv4(bytes(df), 1500)
    assert fragment_ipv4(bytes(df), 2028) == [bytes(df)]  # fits: DF does not matter
    with pytest.raises(ValueError, match="no room"):
        fragment_ipv4(pkt, 27)
    with pytest.raises(ValueError, match="well-formed"):
        fragment_ipv4(pkt[:1000], 500)  # total length beyond the buffer
    with pytest.raises(ValueError, match="well-formed"):
        fragment_ipv4(ipv6(A6, B6, 17, bytes(2000)), 1280)
    with pytest.raises(ValueError, match="malformed IPv4 option"):
        fragment_ipv4(udp4(B4, A4, 1, 2, bytes(2000), b"\x94\x09\x00\x00"), 1000)
    high = bytearray(udp4(B4, A4, 1, 2, bytes(2000)))
    high[6:8] = struct.pack("!H", 0x1FFF)
    with pytest.raises(ValueError, match="offset"):
        fragment_ipv4(bytes(high), 1000)


# -- unit: ICMP errors ---------------------------------------------------------------------


def test_icmp4_frag_needed_structure() -> None:
    big = udp4(A4, B4, 1000, 2000, bytes(range(256)) * 6)  # 1564 bytes
    err = icmp4_frag_needed(big + bytes(4), 1200, B4)
    assert err is not None
    assert len(err) == 576
    assert ref_checksum(err[:20]) == 0
    assert err[0] == 0x45 and err[8] == 64 and err[9] == 1
    assert err[12:16] == B4 and err[16:20] == A4
    assert struct.unpack("!H", err[2:4])[0] == 576
    assert ref_checksum(err[20:]) == 0
    assert err[20:24:1][:2] == b"\x03\x04"
    assert struct.unpack("!HH", err[24:28]) == (0, 1200)
    assert err[28:] == big[:548]
    small = udp4(A4, B4, 1000, 2000, b"hi")
    err = icmp4_frag_needed(small + bytes(16), 1200, B4, ident=7)
    assert err is not None
    assert err[28:] == small and err[4:6] == b"\x00\x07"  # the padding is not quoted


def test_icmp4_frag_needed_never_for() -> None:
    payload = bytes(1400)
    none_cases = {
        "non-first fragment": ipv4(A4, B4, 17, payload, frag=0x0010),
        "ICMP unreachable": ipv4(A4, B4, 1, b"\x03\x01" + payload),
        "ICMP time exceeded": ipv4(A4, B4, 1, b"\x0b\x00" + payload),
        "ICMP without type": ipv4(A4, B4, 1, b""),
        "source 0.0.0.0": ipv4(bytes(4), B4, 17, payload),
        "source broadcast": ipv4(b"\xff" * 4, B4, 17, payload),
        "source multicast": ipv4(bytes([224, 0, 0, 1]), B4, 17, payload),
        "source loopback": ipv4(bytes([127, 0, 0, 1]), B4, 17, payload),
        "destination multicast": ipv4(A4, bytes([239, 1, 2, 3]), 17, payload),
        "destination broadcast": ipv4(A4, b"\xff" * 4, 17, payload),
        "malformed": ipv4(A4, B4, 17, payload)[:100],
        "IPv6": ipv6(A6, B6, 17, payload),
    }
    for name, pkt in none_cases.items():
        assert icmp4_frag_needed(pkt, 1200, B4) is None, name
    assert icmp4_frag_needed(ipv4(A4, B4, 1, b"\x08\x00" + payload), 1200, B4) is not None
    assert icmp4_frag_needed(ipv4(A4, B4, 17, payload, frag=0x2000), 1200, B4) is not None
    with pytest.raises(ValueError, match="MTU"):
        icmp4_frag_needed(none_cases["source 0.0.0.0"], 67, B4)
    with pytest.raises(ValueError, match="4-byte"):
        icmp4_frag_needed(none_cases["source 0.0.0.0"], 1200, B6)


def test_icmp6_packet_too_big_structure() -> None:
    big = with_l4_checksum(ipv6(A6, B6, 17, struct.pack("!HHHH", 1, 2, 1508, 0)
                                + bytes(1500)), 17, 6)
    err = icmp6_packet_too_big(big + bytes(3), 1280, ROUTER6)
    assert err is not None
    assert len(err) == 1280
    assert err[0] >> 4 == 6 and err[6] == 58 and err[7] == 64
    assert err[8:24] == ROUTER6 and err[24:40] == A6
    assert struct.unpack("!H", err[4:6])[0] == 1240
    assert err[40:42] == b"\x02\x00" and struct.unpack("!I", err[44:48])[0] == 1280
    assert err[48:] == big[:1232]
    assert ref_l4_checksum_ok(err, 58)
    small = ipv6(A6, B6, 17, bytes(20))
    err = icmp6_packet_too_big(small + bytes(8), 1400, ROUTER6)
    assert err is not None and err[48:] == small and ref_l4_checksum_ok(err, 58)


def test_icmp6_packet_too_big_never_for() -> None:
    payload = bytes(1400)
    dst_opts = b"\x3a\x00" + bytes(6)
    none_cases = {
        "ICMPv6 error": ipv6(A6, B6, 58, b"\x01\x04" + payload),
        "ICMPv6 error behind dest opts": ipv6(A6, B6, 60, dst_opts + b"\x03\x00" + payload),
        "ICMPv6 without type": ipv6(A6, B6, 60, dst_opts),
        "unspecified source": ipv6(bytes(16), B6, 17, payload),
        "multicast source": ipv6(b"\xff\x02" + bytes(13) + b"\x01", B6, 17, payload),
        "loopback source": ipv6(bytes(15) + b"\x01", B6, 17, payload),
        "truncated": ipv6(A6, B6, 17, payload)[:1000],
        "IPv4": ipv4(A4, B4, 17, payload),
    }
    for name, pkt in none_cases.items():
        assert icmp6_packet_too_big(pkt, 1280, ROUTER6) is None, name
    ok = {
        "echo request": ipv6(A6, B6, 58, b"\x80\x00" + payload),
        "multicast destination": ipv6(A6, b"\xff\x0e" + bytes(14), 17, payload),
        "non-first fragment": ipv6(A6, B6, 44, b"\x3a\x00\x00\x08" + bytes(4) + payload),
    }
    for name, pkt in ok.items():
        assert icmp6_packet_too_big(pkt, 1280, ROUTER6) is not None, name
    with pytest.raises(ValueError, match="MTU"):
        icmp6_packet_too_big(ok["echo request"], 1279, ROUTER6)
    with pytest.raises(ValueError, match="16-byte"):
        icmp6_packet_too_big(ok["echo request"], 1280, A4)


# -- kernel: two namespaces on a veth pair -------------------------------------------------


@dataclass
class Pair:
    """Namespaces ``a`` (va: 192.0.2.1, 2001:db8::1) and ``b`` (vb: .2, ::2)."""

    a: str
    b: str
    mac_a: bytes
    mac_b: bytes


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True,
                          timeout=10).stdout


@pytest.fixture
def pair() -> Iterator[Pair]:
    names = (f"pk{os.getpid()}a", f"pk{os.getpid()}b")
    for name in names:  # left over by a killed run that had the same pid
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    try:
        a, b = names
        for name in names:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        macs = []
        for name, dev, v4, v6 in ((a, "va", "192.0.2.1/24", "2001:db8::1/64"),
                                  (b, "vb", "192.0.2.2/24", "2001:db8::2/64")):
            ip("-n", name, "addr", "add", v4, "dev", dev)
            ip("-n", name, "addr", "add", v6, "dev", dev, "nodad")
            subprocess.run(["ip", "netns", "exec", name, "ethtool", "-K", dev, "tx", "off",
                            "rx", "off"], check=True, capture_output=True, timeout=10)
            ip("-n", name, "link", "set", dev, "up")
            link = json.loads(ip("-n", name, "-j", "link", "show", dev))[0]
            macs.append(bytes.fromhex(link["address"].replace(":", "")))
        yield Pair(a, b, macs[0], macs[1])
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def capture_socket(ns: str, dev: str, ethertype: int) -> socket.socket:
    with entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    sock.bind((dev, ethertype))
    return sock


def capture(sock: socket.socket, match: Callable[[bytes], bool]) -> bytes:
    """The first incoming IP packet (Ethernet header removed, trimmed) that ``match``es."""
    deadline = time.monotonic() + WAIT
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        frame, address = sock.recvfrom(65536)
        if address[2] == socket.PACKET_OUTGOING:
            continue
        length = ip_packet_length(frame, 14)
        if length is not None and match(frame[14:14 + length]):
            return frame[14:14 + length]
    raise AssertionError("no matching packet captured")


def inject(pair: Pair, ip_packet: bytes) -> None:
    """Put ``ip_packet`` on the wire from vb to va, as it is (AF_PACKET, Ethernet header)."""
    ethertype = ETH_P_IP if ip_packet[0] >> 4 == 4 else ETH_P_IPV6
    with entered(pair.b):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind(("vb", 0))
        sock.send(pair.mac_a + pair.mac_b + struct.pack("!H", ethertype) + ip_packet)


def snmp(ns: str, key: str) -> int:
    """A counter of /proc/net/snmp (``"Icmp:InCsumErrors"``) or snmp6 (``"Icmp6InCsumErrors"``)
    in namespace ``ns`` (/proc/thread-self/net is the calling thread's namespace)."""
    with entered(ns):
        if ":" in key:
            group, field = key.split(":")
            with open("/proc/thread-self/net/snmp") as f:
                lines = [line.split() for line in f if line.startswith(group + ":")]
            return int(lines[1][lines[0].index(field)])
        with open("/proc/thread-self/net/snmp6") as f:
            return next(int(v) for k, v in (line.split() for line in f) if k == key)


def wait_until(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def corrupt(packet: bytes, position: int) -> bytes:
    out = bytearray(packet)
    out[position] ^= 0x01
    return bytes(out)


@pytest.mark.root
def test_kernel_accepts_icmp4_frag_needed(pair: Pair) -> None:
    cap = capture_socket(pair.b, "vb", ETH_P_IP)
    with entered(pair.b):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with entered(pair.a):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with cap, server, client:
        server.bind(("192.0.2.2", 0))
        port = server.getsockname()[1]
        client.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        client.connect(("192.0.2.2", port))
        assert client.getsockopt(socket.IPPROTO_IP, IP_MTU) == 1500
        client.send(bytes(1400))
        original = capture(cap, lambda p: p[9] == 17 and p[22:24] == struct.pack("!H", port))
        assert len(original) == 1428 and original[6] & 0x40  # DF
        assert ref_l4_checksum_ok(original, 17)  # offload is off: the capture is final

        # Control: the receiving kernel verifies the ICMP checksum on this path.
        lower = icmp4_frag_needed(original, 1100, B4)
        assert lower is not None
        before = snmp(pair.a, "Icmp:InCsumErrors")
        inject(pair, corrupt(lower, 30))
        assert wait_until(lambda: snmp(pair.a, "Icmp:InCsumErrors") == before + 1)
        assert client.getsockopt(socket.IPPROTO_IP, IP_MTU) == 1500

        err = icmp4_frag_needed(original, 1200, B4)
        assert err is not None
        inject(pair, err)
        assert wait_until(lambda: client.getsockopt(socket.IPPROTO_IP, IP_MTU) == 1200)
        route = ip("-n", pair.a, "route", "get", "192.0.2.2")
        assert "mtu 1200" in route, route
        assert snmp(pair.a, "Icmp:InCsumErrors") == before + 1


@pytest.mark.root
def test_kernel_accepts_icmp6_packet_too_big(pair: Pair) -> None:
    cap = capture_socket(pair.b, "vb", ETH_P_IPV6)
    with entered(pair.b):
        server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with entered(pair.a):
        client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with cap, server, client:
        server.bind(("2001:db8::2", 0))
        port = server.getsockname()[1]
        client.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        client.connect(("2001:db8::2", port))
        assert client.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU) == 1500
        client.send(bytes(1400))
        original = capture(cap, lambda p: p[6] == 17 and p[42:44] == struct.pack("!H", port))
        assert len(original) == 1448
        assert ref_l4_checksum_ok(original, 17)

        err = icmp6_packet_too_big(original, 1280, B6)
        assert err is not None and len(err) == 1280
        before = snmp(pair.a, "Icmp6InCsumErrors")
        inject(pair, corrupt(err, 50))
        assert wait_until(lambda: snmp(pair.a, "Icmp6InCsumErrors") == before + 1)
        assert client.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU) == 1500

        inject(pair, err)
        assert wait_until(lambda: client.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU) == 1280)
        route = ip("-n", pair.a, "-6", "route", "get", "2001:db8::2")
        assert "mtu 1280" in route, route
        assert snmp(pair.a, "Icmp6InCsumErrors") == before + 1


@pytest.mark.root
def test_kernel_reassembles_fragments(pair: Pair) -> None:
    with entered(pair.a):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server:
        server.bind(("192.0.2.1", 0))
        server.settimeout(WAIT)
        port = server.getsockname()[1]
        data = seeded(5).randbytes(4000)

        # Control: a datagram with a wrong UDP checksum is dropped after reassembly. Linux
        # checks a UDP checksum when the application reads, so read to make it look.
        bad = corrupt(udp4(B4, A4, 7000, port, data, RA + RR + b"\x01"), 40)
        before = snmp(pair.a, "Udp:InCsumErrors")
        for frag in fragment_ipv4(bad, 1000):
            inject(pair, frag)

        def rejected() -> bool:
            try:
                got = server.recv(65536)
            except BlockingIOError:
                return snmp(pair.a, "Udp:InCsumErrors") == before + 1
            raise AssertionError(f"a corrupted datagram was delivered ({len(got)} bytes)")

        server.setblocking(False)
        assert wait_until(rejected)
        server.settimeout(WAIT)

        pkt = udp4(B4, A4, 7000, port, data, RA + RR + b"\x01")
        outer = fragment_ipv4(pkt, 1400)
        frags = [f for frag in outer for f in fragment_ipv4(frag, 576)]  # twice fragmented
        assert len(outer) == 3 and len(frags) > 6
        seeded(1).shuffle(frags)
        for frag in frags:
            inject(pair, frag)
        received, source = server.recvfrom(65536)
        assert received == data
        assert source == ("192.0.2.2", 7000)
        assert snmp(pair.a, "Udp:InCsumErrors") == before + 1


@pytest.mark.root
def test_kernel_completes_handshake_on_clamped_syn(pair: Pair) -> None:
    # B drops SYNs arriving on vb after the capture tap (AF_PACKET sees frames before
    # netfilter), so only the clamped copy injected below reaches B's TCP. Timestamps off
    # in B: then B's MSS for the connection is exactly what the SYN announced.
    ruleset = ('table ip pk {\n chain pre {\n type filter hook prerouting priority -300;\n'
               ' iifname "vb" tcp flags & (syn | ack) == syn drop\n }\n}\n')
    subprocess.run(["ip", "netns", "exec", pair.b, "nft", "-f", "-"], check=True, timeout=10,
                   input=ruleset, text=True)
    subprocess.run(["ip", "netns", "exec", pair.b, "sysctl", "-qw",
                    "net.ipv4.tcp_timestamps=0"], check=True, timeout=10)
    cap = capture_socket(pair.b, "vb", ETH_P_IP)
    with entered(pair.b):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with entered(pair.a):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with cap, listener, raw, client:
        listener.bind(("192.0.2.2", 0))
        listener.listen(4)
        listener.settimeout(WAIT)
        port = listener.getsockname()[1]
        client.setblocking(False)
        assert client.connect_ex(("192.0.2.2", port)) == errno.EINPROGRESS
        original = capture(cap, lambda p: p[9] == 6 and p[22:24] == struct.pack("!H", port)
                           and p[33] & 0x12 == 0x02)
        assert ref_l4_checksum_ok(original, 6)
        assert mss_of(original) == [1460]

        # Control: B's TCP verifies checksums of what the raw socket injects.
        bad = bytearray(original)
        assert clamp_mss(bad, 0, 1300)
        before = snmp(pair.b, "Tcp:InCsumErrors")
        raw.sendto(corrupt(bytes(bad), 37), ("192.0.2.2", 0))
        assert wait_until(lambda: snmp(pair.b, "Tcp:InCsumErrors") == before + 1)

        syn = bytearray(original)
        assert clamp_mss(syn, 0, mss_for(inner_mtu(1500)))
        assert mss_of(bytes(syn)) == [1400]
        assert ref_l4_checksum_ok(bytes(syn), 6)
        raw.sendto(bytes(syn), ("192.0.2.2", 0))
        conn, _ = listener.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, TCP_MAXSEG) == 1400
            _, writable, _ = select.select([], [client], [], WAIT)
            assert writable and client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            client.setblocking(True)
            client.sendall(b"ping")
            conn.settimeout(WAIT)
            assert conn.recv(16) == b"ping"
        assert snmp(pair.b, "Tcp:InCsumErrors") == before + 1
