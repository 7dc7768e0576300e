"""Receive coalescing for the decap TAP: consecutive segments of one TCP flow become one
large packet the kernel cuts apart again only where it must (GRO done in userspace).

Every write to the TAP runs the TC program, routing and forwarding for one packet inside
the write (measured: most of tunneld's time on the receiving side of a TCP stream). A
batch from the underlay usually holds runs of one flow's full-size segments; writing a run
as one packet with a virtio-net header (``IFF_VNET_HDR``: GSO type TCPv4/TCPv6, segment
size, checksum left to the kernel) costs one pass through the stack for up to 64 segments.

A run is merged only under GRO's own conditions: same addresses and ports, contiguous
sequence numbers, identical IP fields (TOS, TTL, DF), identical TCP header from the ack
number on (ack, flags but PSH, window, options), only ACK (and PSH) set, equal payload
sizes with the last possibly shorter, at most 64 segments and 64 KiB. Anything else is
written as it came, with an empty virtio-net header.
"""

from __future__ import annotations

import struct

from vpnr.tunneld.packets import ipv4_checksum, pseudo_header_sum

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, offset
NEEDS_CSUM = 1  # VIRTIO_NET_HDR_F_NEEDS_CSUM
GSO_TCPV4, GSO_TCPV6 = 1, 4
NO_GSO = VNET_HDR.pack(0, 0, 0, 0, 0, 0)
ETH_LEN = 14
MAX_SEGMENTS = 64
MAX_BYTES = 65535
_ACK, _PSH = 0x10, 0x08


def _tcp_run_key(packet: bytes) -> tuple[bytes, int, int, int] | None:
    """(flow and fixed-field key, TCP header offset, header length, payload length) of a
    mergeable TCP segment, else None."""
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 40 or packet[0] != 0x45 or packet[9] != 6:
            return None
        if (packet[6] & 0x3F) or packet[7]:  # MF or a fragment offset
            return None
        l4, total = 20, (packet[2] << 8) | packet[3]
        # addresses, ports; TOS, flags/DF, TTL must match
        fixed = packet[12:24] + packet[1:2] + packet[6:7] + packet[8:9]
    elif version == 6:
        if len(packet) < 60 or packet[6] != 6:
            return None
        l4, total = 40, 40 + ((packet[4] << 8) | packet[5])
        fixed = packet[8:44] + packet[0:4] + packet[7:8]
    else:
        return None
    if total != len(packet):
        return None
    hl = l4 + (packet[l4 + 12] >> 4) * 4
    flags = packet[l4 + 13]
    payload = total - hl
    if payload <= 0 or flags & ~(_ACK | _PSH) or not flags & _ACK or hl > len(packet):
        return None
    # ack number, data offset, flags without PSH, window, urgent pointer, options
    header = packet[l4 + 8:l4 + 13] + bytes([flags & ~_PSH]) + packet[l4 + 14:l4 + 16] + \
        packet[l4 + 18:hl]
    return fixed + header, l4, hl, payload


def coalesce(packets: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(virtio-net header, packet) to write, in order, merging runs of one TCP flow."""
    out: list[tuple[bytes, bytes]] = []
    run: list[bytes] = []
    run_key: bytes = b""
    run_size = run_bytes = next_seq = 0
    layout = (0, 0)

    def close() -> None:
        if len(run) == 1:
            out.append((NO_GSO, run[0]))
        elif run:
            out.append(_merge(run, layout[0], layout[1], run_size))
        run.clear()

    for packet in packets:
        parsed = _tcp_run_key(packet)
        if parsed is None:
            close()
            out.append((NO_GSO, packet))
            continue
        key, l4, hl, payload = parsed
        seq = int.from_bytes(packet[l4 + 4:l4 + 8], "big")
        if run and key == run_key and seq == next_seq and payload <= run_size and \
                len(run) < MAX_SEGMENTS and run_bytes + payload <= MAX_BYTES - hl:
            run.append(packet)
            run_bytes += payload
            next_seq = (seq + payload) & 0xFFFFFFFF
            if payload < run_size or packet[l4 + 13] & _PSH:
                close()  # a short segment or a push ends the run
            continue
        close()
        run.append(packet)
        run_key, layout, run_size, run_bytes = key, (l4, hl), payload, payload
        next_seq = (seq + payload) & 0xFFFFFFFF
        if packet[l4 + 13] & _PSH:
            close()
    close()
    return out


def _merge(run: list[bytes], l4: int, hl: int, mss: int) -> tuple[bytes, bytes]:
    """One packet with the first segment's headers and every segment's payload."""
    first = run[0]
    merged = bytearray(first[:hl])
    for packet in run:
        merged += packet[hl:]
    merged[l4 + 13] |= run[-1][l4 + 13] & _PSH
    tcp_len = len(merged) - l4
    if first[0] >> 4 == 4:
        merged[2:4] = len(merged).to_bytes(2, "big")
        merged[10:12] = ipv4_checksum(merged).to_bytes(2, "big")
        src, dst, gso = merged[12:16], merged[16:20], GSO_TCPV4
    else:
        merged[4:6] = (len(merged) - 40).to_bytes(2, "big")
        src, dst, gso = merged[8:24], merged[24:40], GSO_TCPV6
    # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum; the kernel finishes
    # it for every segment it cuts.
    total = pseudo_header_sum(src, dst, 6, tcp_len)
    folded = total % 0xFFFF or (0xFFFF if total else 0)
    merged[l4 + 16:l4 + 18] = folded.to_bytes(2, "big")
    header = VNET_HDR.pack(NEEDS_CSUM, gso, ETH_LEN + hl, mss, ETH_LEN + l4, 16)
    return header, bytes(merged)
