"""Inner-packet surgery for the tunnel: MTU arithmetic, TCP MSS clamping, IPv4
fragmentation and the ICMP / ICMPv6 "too big" errors a router owes the sender.

Everything here is a pure function over ``bytes`` / ``bytearray`` / ``memoryview``: no
sockets, no clock, no logging. Malformed input is never "repaired": functions that look at a
packet return ``None`` / ``False`` for anything they cannot parse safely (the caller drops or
forwards it unchanged), and functions that build a packet raise :class:`ValueError` when the
caller asked for something impossible (a DF packet to fragment, an MTU out of range).

Overhead of one tunnelled packet (docs/protocol.md): outer IP header (20 bytes IPv4, 40
IPv6) + UDP 8 + data header 16 + AEAD tag 16 = 60 (IPv4 underlay) or 80 (IPv6 underlay)
bytes, so a WAN MTU of 1500 leaves an inner MTU of 1440.

A router must never truncate an oversize inner packet silently. The choice per packet:

* IPv4 with DF clear: :func:`fragment_ipv4` to the inner MTU.
* IPv4 with DF set: drop and answer :func:`icmp4_frag_needed` (RFC 1191 / RFC 1812 4.3.2.3).
* IPv6: drop and answer :func:`icmp6_packet_too_big` (RFC 8200 section 5, RFC 4443 3.2);
  routers never fragment IPv6.
* TCP SYNs: :func:`clamp_mss` to :func:`mss_for` so most TCP never needs either.

Checksums use the Internet checksum (RFC 1071) with one's-complement arithmetic done on a
Python ``int``: the sum of the big-endian 16-bit words of a buffer is congruent, modulo
``0xFFFF``, to the buffer read as one big-endian integer (because ``2**16 == 1 mod
0xFFFF``), so one ``int.from_bytes`` and one ``%`` replace a per-word loop.
"""

from __future__ import annotations

import struct
from typing import Final

from vpnr.tunneld.constants import AEAD_TAG_SIZE, DATA_HEADER_SIZE

Buffer = bytes | bytearray | memoryview

IPV4_HEADER_SIZE: Final = 20  # without options
IPV6_HEADER_SIZE: Final = 40
UDP_HEADER_SIZE: Final = 8
TCP_HEADER_SIZE: Final = 20  # without options
ICMP_HEADER_SIZE: Final = 8  # type, code, checksum, 4 bytes (unused + MTU for "too big")

# Outer overhead per tunnelled packet: IP + UDP + tunnel data header + AEAD tag.
TUNNEL_OVERHEAD_IPV4: Final = IPV4_HEADER_SIZE + UDP_HEADER_SIZE + DATA_HEADER_SIZE + AEAD_TAG_SIZE
TUNNEL_OVERHEAD_IPV6: Final = IPV6_HEADER_SIZE + UDP_HEADER_SIZE + DATA_HEADER_SIZE + AEAD_TAG_SIZE

IPV4_MIN_MTU: Final = 68  # RFC 791: every IPv4 module forwards 68 bytes without fragmenting
IPV6_MIN_MTU: Final = 1280  # RFC 8200 section 5
ICMP4_ERROR_MAX: Final = 576  # RFC 1812 4.3.2.3: an ICMP error is at most 576 bytes
ICMP6_ERROR_MAX: Final = IPV6_MIN_MTU  # RFC 4443 2.4(c): at most the minimum IPv6 MTU
ERROR_TTL: Final = 64  # TTL / hop limit of the errors this router originates

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58

ICMP_DEST_UNREACH: Final = 3
ICMP_FRAG_NEEDED: Final = 4  # code of ICMP_DEST_UNREACH
ICMPV6_PACKET_TOO_BIG: Final = 2

# ICMPv4 types that are errors (RFC 1812 4.3.2.7 "ICMP error message": Destination
# Unreachable, Source Quench, Redirect, Time Exceeded, Parameter Problem; also what Linux's
# icmp_pointers[] flags as errors). An ICMP packet whose type cannot be read is treated as
# an error too: never risk an error about an error.
_ICMP4_ERRORS: Final = frozenset({3, 4, 5, 11, 12})

_DF: Final = 0x4000
_MF: Final = 0x2000
_RESERVED_FLAG: Final = 0x8000
_OFFSET_MASK: Final = 0x1FFF

_TCP_SYN: Final = 0x02
_TCPOPT_EOL: Final = 0
_TCPOPT_NOP: Final = 1
_TCPOPT_MSS: Final = 2
_TCPOPT_MSS_LEN: Final = 4

_IPOPT_EOL: Final = 0
_IPOPT_NOP: Final = 1
_IPOPT_COPIED: Final = 0x80

# IPv6 extension headers walked to find out whether a packet is an ICMPv6 error.
_IPV6_EXT_GENERIC: Final = frozenset({0, 43, 60})  # hop-by-hop, routing, destination: (n+1)*8
_IPV6_FRAGMENT: Final = 44  # fixed 8 bytes
_IPV6_AH: Final = 51  # (n+2)*4
_IPV6_MAX_EXT: Final = 8  # bound on the walk


# -- checksums -----------------------------------------------------------------------------


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """The RFC 1071 Internet checksum of ``data``: the one's complement of the one's-complement
    sum of its big-endian 16-bit words (an odd trailing byte is padded with zero).

    ``initial`` is an unfolded partial sum added in, e.g. :func:`pseudo_header_sum` for TCP,
    UDP and ICMPv6. A buffer that already holds a correct checksum sums to 0 here.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8  # the zero pad byte
    total = value + initial
    folded = total % 0xFFFF
    if folded == 0 and total != 0:
        folded = 0xFFFF  # one's complement "negative zero": any non-zero sum ends here
    return 0xFFFF - folded


def pseudo_header_sum(src: Buffer, dst: Buffer, protocol: int, length: int) -> int:
    """The unfolded sum of the TCP/UDP/ICMPv6 pseudo-header (RFC 793 / RFC 8200 8.1) for
    4-byte (IPv4) or 16-byte (IPv6) addresses; pass it as ``initial`` to
    :func:`internet_checksum`. ``length`` is the upper-layer length (header + payload)."""
    return (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + protocol
            + (length >> 16) + (length & 0xFFFF))


def ipv4_checksum(header: Buffer) -> int:
    """The header checksum of the IPv4 header at the start of ``header`` (its first
    ``IHL * 4`` bytes, options included; a whole packet may be passed), computed as if the
    checksum field (bytes 10-11) were zero, so it works whatever that field holds. Store it
    big-endian at offset 10. Raises ValueError if the buffer is shorter than IHL * 4 or the
    IHL is below 5."""
    size = (header[0] & 0x0F) * 4 if header else 0
    if size < IPV4_HEADER_SIZE or len(header) < size:
        raise ValueError("buffer too short for an IPv4 header (or IHL < 5)")
    return internet_checksum(bytes(header[:10]) + bytes(header[12:size]))


def checksum_update16(checksum: int, old: int, new: int) -> int:
    """RFC 1624 equation 3: the checksum after one 16-bit word of the covered data changed
    from ``old`` to ``new`` (``HC' = ~(~HC + ~m + m')``). The word must sit at an even offset
    of the checksummed data; for an odd offset pass both values byte-swapped."""
    total = (~checksum & 0xFFFF) + (~old & 0xFFFF) + new
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# -- MTU arithmetic ------------------------------------------------------------------------


def inner_mtu(wan_mtu: int, underlay_ipv6: bool = False) -> int:
    """The largest inner IP packet one tunnel datagram carries on a WAN link of ``wan_mtu``:
    ``wan_mtu - 60`` over an IPv4 underlay, ``wan_mtu - 80`` over IPv6 (1500 -> 1440 / 1420).

    Raises ValueError when the result is below the IPv4 minimum MTU of 68, or when an IPv6
    underlay link is below 1280 (no such link exists). An inner MTU below 1280 cannot carry
    IPv6 without fragmenting the outer datagram; that is the caller's decision.
    """
    if underlay_ipv6 and wan_mtu < IPV6_MIN_MTU:
        raise ValueError(f"an IPv6 link has an MTU of at least {IPV6_MIN_MTU}, not {wan_mtu}")
    mtu = wan_mtu - (TUNNEL_OVERHEAD_IPV6 if underlay_ipv6 else TUNNEL_OVERHEAD_IPV4)
    if mtu < IPV4_MIN_MTU:
        raise ValueError(f"WAN MTU {wan_mtu} leaves an inner MTU of {mtu} < {IPV4_MIN_MTU}")
    return mtu


def mss_for(inner_mtu: int, ipv6: bool = False) -> int:
    """The MSS to clamp TCP SYNs to for an inner MTU: minus 20 (IPv4) or 40 (IPv6) bytes of
    IP header and 20 of TCP header (1440 -> 1400 / 1380). TCP options reduce the segment
    size further on their own, so this is the RFC 879 / RFC 6691 value."""
    return inner_mtu - (IPV6_HEADER_SIZE if ipv6 else IPV4_HEADER_SIZE) - TCP_HEADER_SIZE


# -- parsing -------------------------------------------------------------------------------


def ip_packet_length(packet: Buffer, offset: int = 0) -> int | None:
    """The length of the IP packet at ``packet[offset:]`` according to its own header (IPv4
    total length; IPv6 40 + payload length), or None if malformed: too short for the fixed
    header, version neither 4 nor 6, IPv4 IHL < 5 or total length < IHL * 4, or a length
    beyond the buffer. Use it to cut Ethernet padding (short frames are padded to 60 bytes)
    off an inner packet before encrypting it. IPv6 jumbograms (payload length 0 with a Jumbo
    Payload option) are not recognised: they cannot occur on Ethernet; a payload length of 0
    is taken literally (a 40-byte packet)."""
    available = len(packet) - offset
    if offset < 0 or available < 1:
        return None
    version = packet[offset] >> 4
    if version == 4:
        if available < IPV4_HEADER_SIZE:
            return None
        ihl = packet[offset] & 0x0F
        length = (packet[offset + 2] << 8) | packet[offset + 3]
        if ihl < 5 or length < ihl * 4 or length > available:
            return None
        return length
    if version == 6:
        if available < IPV6_HEADER_SIZE:
            return None
        length = IPV6_HEADER_SIZE + ((packet[offset + 4] << 8) | packet[offset + 5])
        return length if length <= available else None
    return None


def inner_addresses(packet: Buffer, offset: int = 0, expected_version: int | None = None
                    ) -> tuple[int, bytes, bytes] | None:
    """``(version, source, destination)`` of the IPv4 or IPv6 packet at ``packet[offset:]``
    (4- or 16-byte addresses), or None when :func:`ip_packet_length` finds it malformed or its
    version is not ``expected_version`` (4 or 6, e.g. from the EtherType; None accepts both).
    """
    if ip_packet_length(packet, offset) is None:
        return None
    version = packet[offset] >> 4
    if expected_version is not None and version != expected_version:
        return None
    if version == 4:
        return 4, bytes(packet[offset + 12:offset + 16]), bytes(packet[offset + 16:offset + 20])
    return 6, bytes(packet[offset + 8:offset + 24]), bytes(packet[offset + 24:offset + 40])


def _tcp_segment(packet: Buffer, offset: int) -> tuple[int, int] | None:
    """``(start, end)`` of the TCP segment inside the IP packet at ``offset``, or None if the
    packet is not TCP (directly after the fixed IPv6 header), is malformed, or is a non-first
    IPv4 fragment (which has no TCP header)."""
    length = ip_packet_length(packet, offset)
    if length is None:
        return None
    end = offset + length
    if packet[offset] >> 4 == 4:
        frag = (packet[offset + 6] << 8) | packet[offset + 7]
        if packet[offset + 9] != PROTO_TCP or frag & _OFFSET_MASK:
            return None
        return offset + (packet[offset] & 0x0F) * 4, end
    if packet[offset + 6] != PROTO_TCP:
        return None
    return offset + IPV6_HEADER_SIZE, end


# -- MSS clamping --------------------------------------------------------------------------


def clamp_mss(packet: bytearray, offset: int, max_mss: int) -> bool:
    """Lower the MSS option of a TCP SYN (or SYN-ACK) in place to ``max_mss``.

    ``packet[offset:]`` is an IPv4 or IPv6 packet (``offset`` 14 after an untagged Ethernet
    header). When it is TCP with SYN set and carries an MSS option greater than ``max_mss``,
    the option is rewritten and the TCP checksum updated incrementally (RFC 1624); returns
    whether the packet changed. Every other packet is left alone and False returned:

    * not TCP, a non-first IPv4 fragment, or a malformed IP header / length;
    * IPv6 with any extension header: only a TCP header directly after the fixed IPv6 header
      is clamped (extension headers on a SYN are rare; walking them is the XDP program's job);
    * TCP without SYN, without an MSS option, or with an MSS <= ``max_mss``;
    * malformed TCP options (a data offset < 5 or beyond the packet, an option length < 2 or
      running past the header, an MSS option whose length is not 4): the whole packet is left
      unchanged rather than half-edited. Options after End of Option List are not read.

    The first fragment of a fragmented IPv4 SYN is clamped too when its TCP header is whole:
    the incremental update does not need the rest of the segment.
    """
    segment = _tcp_segment(packet, offset)
    if segment is None:
        return False
    start, end = segment
    if start + TCP_HEADER_SIZE > end or not packet[start + 13] & _TCP_SYN:
        return False
    options_end = start + (packet[start + 12] >> 4) * 4
    if options_end < start + TCP_HEADER_SIZE or options_end > end:
        return False
    found: list[int] = []  # positions of MSS values to lower
    i = start + TCP_HEADER_SIZE
    while i < options_end:  # bounded: every step advances i by at least 1
        kind = packet[i]
        if kind == _TCPOPT_EOL:
            break
        if kind == _TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= options_end:
            return False
        size = packet[i + 1]
        if size < 2 or i + size > options_end:
            return False
        if kind == _TCPOPT_MSS:
            if size != _TCPOPT_MSS_LEN:
                return False
            if ((packet[i + 2] << 8) | packet[i + 3]) > max_mss:
                found.append(i + 2)
        i += size
    if not found:
        return False
    checksum = (packet[start + 16] << 8) | packet[start + 17]
    for position in found:
        old = (packet[position] << 8) | packet[position + 1]
        if (position - start) & 1:  # the value straddles two checksum words: swap bytes
            checksum = checksum_update16(checksum, _swap16(old), _swap16(max_mss))
        else:
            checksum = checksum_update16(checksum, old, max_mss)
        packet[position:position + 2] = max_mss.to_bytes(2, "big")
    packet[start + 16:start + 18] = checksum.to_bytes(2, "big")
    return True


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


# -- IPv4 fragmentation --------------------------------------------------------------------


def _copied_options(options: Buffer) -> bytes:
    """The IPv4 options with the copied flag set (RFC 791: they go into every fragment),
    padded with End of Option List to a multiple of 4 bytes. Raises ValueError on malformed
    options (a length < 2 or past the header)."""
    copied = bytearray()
    i = 0
    while i < len(options):  # bounded: every step advances i by at least 1
        kind = options[i]
        if kind == _IPOPT_EOL:
            break
        if kind == _IPOPT_NOP:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            raise ValueError(f"malformed IPv4 option {kind} at option byte {i}")
        size = options[i + 1]
        if kind & _IPOPT_COPIED:
            copied += options[i:i + size]
        i += size
    copied += bytes(-len(copied) % 4)
    return bytes(copied)


def fragment_ipv4(packet: Buffer, mtu: int) -> list[bytes]:
    """Fragment the IPv4 packet ``packet`` (no Ethernet header) for a link of ``mtu`` bytes
    (RFC 791 section 3.2, RFC 1812 4.2.2.7).

    A packet of at most ``mtu`` bytes comes back as the single item (trimmed to its total
    length). Otherwise every fragment is at most ``mtu`` bytes, carries a multiple of 8
    payload bytes except the last, has MF set except the last (which keeps the MF of the
    input, so a fragment can be fragmented again) and its offset counted from the input's
    own offset. The first fragment keeps all options; later ones only those with the copied
    flag set (padded with End of Option List). Identification, TOS, TTL and protocol are
    kept; each header checksum is recomputed. TTL is not decremented here.

    Raises ValueError when the packet must be fragmented but has DF set (answer with
    :func:`icmp4_frag_needed` instead), when it is malformed (see :func:`ip_packet_length`,
    or malformed options), or when ``mtu`` leaves no room for 8 payload bytes after a header.
    """
    length = ip_packet_length(packet, 0)
    if length is None or packet[0] >> 4 != 4:
        raise ValueError("not a well-formed IPv4 packet")
    if length <= mtu:
        return [bytes(packet[:length])]
    header_len = (packet[0] & 0x0F) * 4
    frag = (packet[6] << 8) | packet[7]
    if frag & _DF:
        raise ValueError(f"DF is set on a {length}-byte packet for an MTU of {mtu}")
    first_header = bytearray(packet[:header_len])
    later_header = bytearray(packet[:IPV4_HEADER_SIZE]) + _copied_options(
        packet[IPV4_HEADER_SIZE:header_len])
    later_header[0] = 0x40 | (len(later_header) // 4)
    first_step = (mtu - len(first_header)) & ~7
    later_step = (mtu - len(later_header)) & ~7
    if first_step < 8 or later_step < 8:
        raise ValueError(f"an MTU of {mtu} leaves no room for fragments of this header")
    base_offset = (frag & _OFFSET_MASK) * 8
    kept_flags = frag & _RESERVED_FLAG
    last_mf = frag & _MF
    payload = memoryview(packet)[header_len:length]
    fragments: list[bytes] = []
    position = 0
    header = first_header
    step = first_step
    while position < len(payload):  # bounded: every step advances position by >= 8
        chunk = payload[position:position + step]
        more = _MF if position + len(chunk) < len(payload) else last_mf
        units = (base_offset + position) // 8
        if units > _OFFSET_MASK:
            raise ValueError("fragment offset beyond 65528 bytes")
        header[2:4] = (len(header) + len(chunk)).to_bytes(2, "big")
        header[6:8] = (kept_flags | more | units).to_bytes(2, "big")
        header[10:12] = b"\x00\x00"
        header[10:12] = ipv4_checksum(header).to_bytes(2, "big")
        fragments.append(bytes(header) + chunk)
        position += len(chunk)
        header = later_header
        step = later_step
    return fragments


# -- ICMP errors ---------------------------------------------------------------------------


def _ipv4_source_may_get_error(src: bytes, dst: bytes) -> bool:
    """RFC 1812 4.3.2.7: no ICMP error to a source that does not name a single host (0/8,
    127/8, multicast 224/4, reserved 240/4 incl. limited broadcast), nor about a packet sent
    to multicast or the limited broadcast address."""
    if src[0] in (0, 127) or src[0] >= 224:
        return False
    return not 224 <= dst[0] < 240 and dst != b"\xff\xff\xff\xff"


def icmp4_frag_needed(packet: Buffer, mtu: int, router_ip: bytes, *, ident: int = 0
                      ) -> bytes | None:
    """The ICMP Destination Unreachable / Fragmentation Needed and DF Set (type 3 code 4,
    RFC 1191 next-hop MTU ``mtu``) a router at ``router_ip`` sends back for the IPv4 packet
    ``packet`` (no Ethernet header): an IPv4 packet from ``router_ip`` to the packet's source,
    TTL 64, TOS 0xC0 (internetwork control, as Linux), DF clear, identification ``ident``,
    quoting as much of the packet (up to its total length, so never Ethernet padding) as
    fits in 576 bytes (RFC 1812 4.3.2.3), with correct IP and ICMP checksums.

    None when no error may be sent (RFC 1812 4.3.2.7): the packet is malformed, a non-first
    fragment, an ICMP error (or ICMP whose type is unreadable), from a source that is not a
    single host (0/8, 127/8, multicast, 240/4, 255.255.255.255) or to a multicast / limited
    broadcast destination. Raises ValueError for an ``mtu`` outside 68..65535 or a
    ``router_ip`` that is not 4 bytes.
    """
    if not IPV4_MIN_MTU <= mtu <= 0xFFFF:
        raise ValueError(f"next-hop MTU {mtu} outside {IPV4_MIN_MTU}..65535")
    if len(router_ip) != 4:
        raise ValueError("router_ip must be a 4-byte IPv4 address")
    length = ip_packet_length(packet, 0)
    if length is None or packet[0] >> 4 != 4:
        return None
    header_len = (packet[0] & 0x0F) * 4
    if ((packet[6] << 8) | packet[7]) & _OFFSET_MASK:
        return None
    if packet[9] == PROTO_ICMP and (length <= header_len or packet[header_len] in _ICMP4_ERRORS):
        return None
    src, dst = bytes(packet[12:16]), bytes(packet[16:20])
    if not _ipv4_source_may_get_error(src, dst):
        return None
    quote = bytes(packet[:min(length, ICMP4_ERROR_MAX - IPV4_HEADER_SIZE - ICMP_HEADER_SIZE)])
    icmp = bytearray(struct.pack("!BBHHH", ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, mtu))
    icmp += quote
    icmp[2:4] = internet_checksum(icmp).to_bytes(2, "big")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, IPV4_HEADER_SIZE + len(icmp),
                                   ident & 0xFFFF, 0, ERROR_TTL, PROTO_ICMP, 0, router_ip, src))
    header[10:12] = ipv4_checksum(header).to_bytes(2, "big")
    return bytes(header + icmp)


def _icmp6_is_error(packet: Buffer, length: int) -> bool | None:
    """Whether the IPv6 packet (``length`` bytes) is an ICMPv6 error (type < 128), walking
    at most 8 extension headers; None if the chain is truncated or too long to tell. A
    non-first fragment is not an error as far as can be known (its upper layer is absent)."""
    next_header = packet[6]
    position = IPV6_HEADER_SIZE
    for _ in range(_IPV6_MAX_EXT):
        if next_header == PROTO_ICMPV6:
            return None if position >= length else packet[position] < 128
        if next_header in _IPV6_EXT_GENERIC or next_header == _IPV6_AH:
            if position + 2 > length:
                return None
            if next_header == _IPV6_AH:
                size = (packet[position + 1] + 2) * 4
            else:
                size = (packet[position + 1] + 1) * 8
        elif next_header == _IPV6_FRAGMENT:
            if position + 8 > length:
                return None
            if ((packet[position + 2] << 8) | packet[position + 3]) & 0xFFF8:
                return False  # non-first fragment
            size = 8
        else:
            return False  # an upper layer that is not ICMPv6 (or No Next Header)
        next_header = packet[position]
        position += size
    return None


def icmp6_packet_too_big(packet: Buffer, mtu: int, router_ip: bytes) -> bytes | None:
    """The ICMPv6 Packet Too Big (type 2, code 0, MTU ``mtu``; RFC 4443 3.2) a router at
    ``router_ip`` sends back for the IPv6 packet ``packet`` (no Ethernet header): an IPv6
    packet from ``router_ip`` to the packet's source, hop limit 64, quoting as much of the
    packet (up to its own length, never Ethernet padding) as fits in 1280 bytes, with the
    checksum over the IPv6 pseudo-header (RFC 8200 8.1).

    None when no error may be sent (RFC 4443 2.4(e)): the packet is malformed, an ICMPv6
    error (type < 128, found after walking extension headers; also when the chain cannot be
    walked), or from the unspecified address, loopback or a multicast source. Packet Too Big
    is, unlike other errors, sent for a multicast destination. Raises ValueError for an
    ``mtu`` outside 1280..2**32-1 (an inner MTU below 1280 must be handled by fragmenting the
    outer datagram, not by asking IPv6 hosts for less) or a ``router_ip`` not 16 bytes.
    """
    if not IPV6_MIN_MTU <= mtu <= 0xFFFFFFFF:
        raise ValueError(f"IPv6 MTU {mtu} outside {IPV6_MIN_MTU}..2**32-1")
    if len(router_ip) != 16:
        raise ValueError("router_ip must be a 16-byte IPv6 address")
    length = ip_packet_length(packet, 0)
    if length is None or packet[0] >> 4 != 6:
        return None
    src = bytes(packet[8:24])
    if src[0] == 0xFF or src == bytes(16) or src == bytes(15) + b"\x01":
        return None
    if _icmp6_is_error(packet, length) is not False:
        return None
    quote = bytes(packet[:min(length, ICMP6_ERROR_MAX - IPV6_HEADER_SIZE - ICMP_HEADER_SIZE)])
    icmp = bytearray(struct.pack("!BBHI", ICMPV6_PACKET_TOO_BIG, 0, 0, mtu)) + quote
    checksum = internet_checksum(icmp, pseudo_header_sum(router_ip, src, PROTO_ICMPV6, len(icmp)))
    icmp[2:4] = checksum.to_bytes(2, "big")
    header = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), PROTO_ICMPV6, ERROR_TTL,
                         router_ip, src)
    return header + bytes(icmp)
