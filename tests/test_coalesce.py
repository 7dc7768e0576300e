"""Decap coalescing (services/tunneld/coalesce.py): which segments merge, and what the
merged packet and its virtio-net header say. The lab tests carry real TCP streams through
it (tests/test_lab_tunnel.py: zero retransmissions)."""

from __future__ import annotations

import os

from vpnr.tunneld.coalesce import GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, NO_GSO, VNET_HDR, coalesce
from vpnr.tunneld.packets import internet_checksum, ipv4_checksum, pseudo_header_sum

ACK, PSH, SYN = 0x10, 0x08, 0x02
OPTIONS = b"\x01\x01\x08\x0a" + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x09"  # NOP NOP TS


def segment(seq: int, payload: bytes, flags: int = ACK, sport: int = 40000,
            window: int = 63, v6: bool = False) -> bytes:
    """An IPv4 (or IPv6) TCP segment with timestamps and a correct IPv4 header."""
    tcp = bytearray(32)
    tcp[0:2], tcp[2:4] = sport.to_bytes(2, "big"), (5201).to_bytes(2, "big")
    tcp[4:8], tcp[8:12] = seq.to_bytes(4, "big"), (1).to_bytes(4, "big")
    tcp[12], tcp[13], tcp[14:16] = 8 << 4, flags, window.to_bytes(2, "big")
    tcp[20:32] = OPTIONS
    if v6:
        ip = bytearray(40)
        ip[0], ip[6], ip[7] = 0x60, 6, 64
        ip[4:6] = (32 + len(payload)).to_bytes(2, "big")
        ip[8:24], ip[24:40] = bytes(15) + b"\x01", bytes(15) + b"\x02"
        return bytes(ip + tcp + payload)
    ip = bytearray(20)
    ip[0], ip[6], ip[8], ip[9] = 0x45, 0x40, 64, 6
    ip[2:4] = (20 + 32 + len(payload)).to_bytes(2, "big")
    ip[12:16], ip[16:20] = bytes([10, 1, 0, 10]), bytes([10, 2, 0, 10])
    ip[10:12] = ipv4_checksum(ip).to_bytes(2, "big")
    return bytes(ip + tcp + payload)


def test_a_run_of_full_segments_and_a_short_last_becomes_one_gso_packet() -> None:
    payloads = [os.urandom(1388) for _ in range(5)] + [os.urandom(100)]
    seqs = [1000 + 1388 * i for i in range(6)]
    packets = [segment(s, p, ACK | (PSH if i == 5 else 0))
               for i, (s, p) in enumerate(zip(seqs, payloads, strict=True))]
    ((vnet, merged),) = coalesce(packets)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(vnet)
    assert (flags, gso_type, gso_size) == (NEEDS_CSUM, GSO_TCPV4, 1388)
    assert (hdr_len, csum_start, csum_offset) == (14 + 52, 14 + 20, 16)
    assert merged[52:] == b"".join(payloads)
    assert int.from_bytes(merged[2:4], "big") == len(merged) == 52 + 5 * 1388 + 100
    assert internet_checksum(merged[:20]) == 0  # header checksum redone
    assert int.from_bytes(merged[24:28], "big") == 1000 and merged[33] == ACK | PSH
    # The TCP checksum field holds the folded pseudo-header sum the kernel completes.
    partial = pseudo_header_sum(merged[12:16], merged[16:20], 6, len(merged) - 20) % 0xFFFF
    assert int.from_bytes(merged[36:38], "big") == partial


def test_ipv6_runs_merge_too() -> None:
    packets = [segment(5 + 1000 * i, os.urandom(1000), v6=True) for i in range(3)]
    ((vnet, merged),) = coalesce(packets)
    assert VNET_HDR.unpack(vnet)[1] == GSO_TCPV6
    assert int.from_bytes(merged[4:6], "big") == len(merged) - 40 == 32 + 3000


def test_what_must_not_merge_is_written_as_it_came() -> None:
    a = segment(1000, b"x" * 500)
    cases = {
        "gap in sequence": [a, segment(1600, b"y" * 500)],
        "other flow": [a, segment(1500, b"y" * 500, sport=40001)],
        "window changed": [a, segment(1500, b"y" * 500, window=64)],
        "SYN": [segment(1000, b"x" * 500, SYN | ACK), segment(1500, b"y" * 500)],
        "pure ack": [segment(1000, b""), segment(1000, b"")],
        "longer after shorter": [a, segment(1500, b"y" * 600)],
        "push ends the run": [segment(1000, b"x" * 500, ACK | PSH), segment(1500, b"y" * 500)],
    }
    for name, packets in cases.items():
        out = coalesce(packets)
        assert [p for _, p in out] == packets, name
        assert all(vnet == NO_GSO for vnet, _ in out), name


def test_order_is_kept_around_merged_runs() -> None:
    ping = bytes([0x45, 0, 0, 28]) + bytes(5) + b"\x01" + bytes(18)
    run = [segment(1000 + 500 * i, bytes([i]) * 500) for i in range(3)]
    out = coalesce([ping, *run, ping])
    assert len(out) == 3 and out[0][1] == ping and out[2][1] == ping
    assert out[1][1][52:] == b"".join(p[52:] for p in run)
    # At most 64 segments in one packet.
    many = [segment(1000 + 100 * i, b"z" * 100) for i in range(100)]
    sizes = [len(p) - 52 for _, p in coalesce(many)]
    assert sizes == [6400, 3600]
