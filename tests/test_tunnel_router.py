"""The router table (services/tunneld/router.py) between two routers in one process: the
real protocol core and crypto, datagrams carried by a list instead of a socket (the socket
side runs for real in tests/test_lab_tunnel.py)."""

from __future__ import annotations

import base64
from pathlib import Path

from vpnr.tunneld.keys import StaticKeys
from vpnr.tunneld.packets import ipv4_checksum
from vpnr.tunneld.peers import make_peer
from vpnr.tunneld.router import INNER_SOURCE, TOO_BIG, Address, TunnelRouter

A_WAN, B_WAN = ("192.0.2.1", 51820), ("192.0.2.2", 51820)


class Wire:
    """Outputs of one router, kept for the test to carry or inspect."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.delivered: list[bytes] = []
        self.icmp: list[bytes] = []
        self.live: dict[int, int] = {}
        self.audits: list[tuple[str, bool, dict[str, object]]] = []

    def send_datagram(self, datagram: bytes, endpoint: Address) -> bool:
        self.datagrams.append(datagram)
        return True

    def deliver(self, inner: bytes) -> None:
        self.delivered.append(inner)

    def send_icmp(self, packet: bytes, ipv6: bool) -> None:
        self.icmp.append(packet)

    def sessions_changed(self, live: dict[int, int]) -> None:
        self.live = dict(live)

    def audit(self, action: str, success: bool, detail: dict[str, object]) -> None:
        self.audits.append((action, success, detail))


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def pair(tmp_path: Path) -> tuple[TunnelRouter, TunnelRouter, Wire, Wire, Clock]:
    keys_a = StaticKeys.load_or_create(tmp_path / "a.key")
    keys_b = StaticKeys.load_or_create(tmp_path / "b.key")
    wa, wb, clock = Wire(), Wire(), Clock()
    ra = TunnelRouter(keys=keys_a, outputs=wa, clock=clock, router_ip4=bytes([10, 1, 0, 1]))
    rb = TunnelRouter(keys=keys_b, outputs=wb, clock=clock, router_ip4=bytes([10, 2, 0, 1]))
    ra.add_peer(make_peer("b", b64(keys_b.public), "192.0.2.2:51820", ["10.2.0.0/24"]))
    rb.add_peer(make_peer("a", b64(keys_a.public), "", ["10.1.0.0/24"]))
    return ra, rb, wa, wb, clock


def carry(ra: TunnelRouter, rb: TunnelRouter, wa: Wire, wb: Wire, rounds: int = 4) -> None:
    """Deliver every datagram in flight, both ways, until quiet (bounded)."""
    for _ in range(rounds):
        for wire, router, source in ((wa, rb, A_WAN), (wb, ra, B_WAN)):
            pending, wire.datagrams = wire.datagrams, []
            for datagram in pending:
                router.from_wire(datagram, source)


def ipv4(src: str, dst: str, size: int = 100, df: bool = True) -> bytes:
    header = bytearray(20)
    header[0], header[8], header[9] = 0x45, 64, 17
    header[6] = 0x40 if df else 0
    header[2:4] = size.to_bytes(2, "big")
    header[12:16] = bytes(int(x) for x in src.split("."))
    header[16:20] = bytes(int(x) for x in dst.split("."))
    header[10:12] = ipv4_checksum(header).to_bytes(2, "big")
    return bytes(header) + bytes(size - 20)


def test_responder_learns_the_peer_at_message_3_and_data_flows(tmp_path: Path) -> None:
    ra, rb, wa, wb, _ = pair(tmp_path)
    ra.from_lan(ipv4("10.1.0.10", "10.2.0.10"))  # queued; starts the handshake
    carry(ra, rb, wa, wb)
    assert [p[12:20] for p in wb.delivered] == [bytes([10, 1, 0, 10, 10, 2, 0, 10])]
    assert rb.peers["a"].endpoint == A_WAN  # B had no endpoint for A: learnt from msg 3
    rb.from_lan(ipv4("10.2.0.10", "10.1.0.10"))
    carry(ra, rb, wa, wb)
    assert len(wa.delivered) == 1
    # The kernel's session maps list exactly the keypairs' receiver indexes.
    assert set(wa.live) == ra.peers["b"].session.keypair_indexes() and wa.live
    assert set(wb.live) == rb.peers["a"].session.keypair_indexes() and wb.live


def test_inner_source_outside_the_peers_prefixes_is_dropped(tmp_path: Path) -> None:
    ra, rb, wa, wb, _ = pair(tmp_path)
    ra.from_lan(ipv4("10.9.9.9", "10.2.0.10"))  # A routes it, B must refuse it
    carry(ra, rb, wa, wb)
    assert wb.delivered == [] and rb.drops[INNER_SOURCE] == 1


def test_oversize_packets_are_answered_or_fragmented_never_truncated(tmp_path: Path) -> None:
    ra, rb, wa, wb, _ = pair(tmp_path)
    ra.from_lan(ipv4("10.1.0.10", "10.2.0.10", 1500, df=True))
    assert ra.drops[TOO_BIG] == 1 and len(wa.icmp) == 1
    icmp = wa.icmp[0]
    assert icmp[9] == 1 and icmp[20:22] == b"\x03\x04"  # ICMP dest unreachable, frag needed
    assert int.from_bytes(icmp[26:28], "big") == 1440 and icmp[16:20] == bytes([10, 1, 0, 10])
    ra.from_lan(ipv4("10.1.0.10", "10.2.0.10", 1500, df=False))
    carry(ra, rb, wa, wb)
    assert [len(p) for p in wb.delivered] == [1436, 84]  # 1416 + 64 payload bytes, 8-aligned
    assert sum(len(p) - 20 for p in wb.delivered) == 1480


def test_revoked_and_unknown_keys_are_refused_and_audited(tmp_path: Path) -> None:
    ra, rb, wa, wb, _ = pair(tmp_path)
    rb.revoke_peer("a", "laptop stolen")
    assert rb.is_known(ra.keys.public) == "revoked"
    ra.initiate(ra.peers["b"])
    carry(ra, rb, wa, wb)
    assert rb.peers["a"].session.current is None and wb.delivered == []
    assert rb.drops["revoked_static_key"] == 1
    refused = [a for a in wb.audits if a[0] == "tunnel.handshake.refused"]
    assert refused and refused[0][2]["reason"] == "revoked_static_key"
    assert refused[0][2]["public_key"] == b64(ra.keys.public)
    # A key B never heard of.
    stranger_keys = StaticKeys.load_or_create(tmp_path / "c.key")
    wc = Wire()
    rc = TunnelRouter(keys=stranger_keys, outputs=wc, clock=ra.clock)
    rc.add_peer(make_peer("b", b64(rb.keys.public), "192.0.2.2:51820", ["10.2.0.0/24"]))
    rc.initiate(rc.peers["b"])
    carry(rc, rb, wc, wb)
    assert rb.drops["unknown_static_key"] == 1
    assert any(a[2]["reason"] == "unknown_static_key" for a in wb.audits)


def test_static_key_rotation_keeps_old_peers_working_during_the_overlap(
        tmp_path: Path) -> None:
    ra, rb, wa, wb, clock = pair(tmp_path)
    old_public = ra.keys.public
    ra.keys.rotate(3600)
    ra.use_static_keys()
    assert ra.keys.public != old_public
    # B still knows only A's old key: the first attempt (new key) is refused at message 3,
    # the retry after REKEY_TIMEOUT uses the previous key and completes.
    ra.initiate(ra.peers["b"])
    carry(ra, rb, wa, wb)
    assert ra.peers["b"].session.current is None or rb.peers["a"].session.current is None
    clock.now += 6
    ra.tick()
    carry(ra, rb, wa, wb)
    ra.from_lan(ipv4("10.1.0.10", "10.2.0.10"))
    carry(ra, rb, wa, wb)
    assert len(wb.delivered) == 1
    # B learns the new key: from then on A's handshakes with the new key succeed too.
    rb.add_peer(make_peer("a", b64(ra.keys.public), "", ["10.1.0.0/24"]))
    ra.initiate(ra.peers["b"])
    carry(ra, rb, wa, wb)
    clock.now += 6
    ra.tick()
    carry(ra, rb, wa, wb)
    ra.from_lan(ipv4("10.1.0.10", "10.2.0.10"))
    carry(ra, rb, wa, wb)
    assert len(wb.delivered) == 2
