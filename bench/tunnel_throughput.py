"""Tunnel throughput: vpnr's tunnel against wireguard-go in the same lab, in one run.

1. vpnr: a two-site lab (vpnr.lab, no IdP, one host per site), its tunnel up; iperf3
   single-stream TCP and UDP from site A's host to site B's host.
2. wireguard-go (Debian): the same shape and addresses (bench/wgbench.py), same iperf3.
3. The ratio vpnr / wireguard-go for TCP and UDP (target: at least 2).
4. CPU-only figures of tunneld's code on one core, in process: packets/s of the AEAD loop
   (seal at one router, open and deliver at the other, 1400-byte inner packets) and
   complete Noise XX handshakes/s.

Prints a table and, last, one JSON line. Run as root on a quiet host:
    .venv/bin/python bench/tunnel_throughput.py [--seconds 5] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wgbench

from vpnr.lab.lab import Lab
from vpnr.lab.topology import LabSpec
from vpnr.tunneld.constants import Timers
from vpnr.tunneld.keys import StaticKeys, public_of
from vpnr.tunneld.peers import make_peer
from vpnr.tunneld.router import Address, TunnelRouter
from vpnr.tunneld.session import PeerSession

TARGET_RATIO = 2.0
UDP_LENGTH = 1392  # fits both tunnels' inner MTU (ours 1440, wireguard-go's 1420)


def measure_vpnr(seconds: float) -> dict[str, Any]:
    """iperf3 through vpnr's tunnel in a fresh lab."""
    name = "tb" + secrets.token_hex(3)
    with tempfile.TemporaryDirectory(prefix="vpnr-bench-") as tmp:
        spec = LabSpec(name=name, instance_prefix=f"{name}-", base_dir=Path(tmp),
                       run_dir=Path(f"/run/vpnr-{name}"),
                       bpffs_dir=Path(f"/sys/fs/bpf/vpnr-{name}"), with_idp=False,
                       hosts_per_site=1)
        lab = Lab(spec)
        try:
            lab.up()
            a, b = spec.sites
            deadline = time.monotonic() + 20
            while True:  # until the tunnel carries a ping (handshake done), bounded
                try:
                    wgbench.run("ip", "netns", "exec", a.host_ns(1), "ping", "-c", "1", "-W",
                                "1", b.host_v4(1), timeout=5)
                    break
                except wgbench.WgBenchError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            tcp = wgbench.run_iperf_tcp(b.host_ns(1), b.host_v4(1), a.host_ns(1), seconds)
            udp = wgbench.run_iperf_udp(b.host_ns(1), b.host_v4(1), a.host_ns(1), seconds,
                                        length=UDP_LENGTH)
        finally:
            lab.down()
    return {"tcp": tcp, "udp": udp}


class _Wire:
    """In-memory outputs: datagrams land in a list, inner packets are counted."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.delivered = 0

    def send_datagram(self, datagram: bytes, endpoint: Address) -> bool:
        self.datagrams.append(datagram)
        return True

    def deliver(self, inner: bytes) -> None:
        self.delivered += 1

    def send_icmp(self, packet: bytes, ipv6: bool) -> None:
        pass

    def sessions_changed(self, live: dict[int, int]) -> None:
        pass

    def audit(self, action: str, success: bool, detail: dict[str, object]) -> None:
        pass


def _router_pair() -> tuple[TunnelRouter, TunnelRouter, _Wire, _Wire]:
    with tempfile.TemporaryDirectory() as tmp:
        ka = StaticKeys.load_or_create(Path(tmp) / "a.key")
        kb = StaticKeys.load_or_create(Path(tmp) / "b.key")
    wa, wb = _Wire(), _Wire()
    ra = TunnelRouter(keys=ka, outputs=wa)
    rb = TunnelRouter(keys=kb, outputs=wb)
    import base64
    ra.add_peer(make_peer("b", base64.b64encode(public_of(kb.private)).decode(),
                          "192.0.2.2:51820", ["10.2.0.0/24"]))
    rb.add_peer(make_peer("a", base64.b64encode(public_of(ka.private)).decode(),
                          "192.0.2.1:51820", ["10.1.0.0/24"]))
    ra.initiate(ra.peers["b"])
    for _ in range(4):  # shuttle handshake messages until both are quiet
        for src, dst, addr in ((wa, rb, ("192.0.2.1", 51820)), (wb, ra, ("192.0.2.2", 51820))):
            pending, src.datagrams = src.datagrams, []
            for datagram in pending:
                dst.from_wire(datagram, addr)
    return ra, rb, wa, wb


def _inner_packet(size: int) -> bytes:
    header = bytearray(20)
    header[0], header[9] = 0x45, 17
    header[2:4] = size.to_bytes(2, "big")
    header[12:16], header[16:20] = bytes([10, 1, 0, 10]), bytes([10, 2, 0, 10])
    return bytes(header) + os.urandom(size - 20)


def measure_aead_loop(packets: int = 100_000, size: int = 1400) -> dict[str, float]:
    """Seal at router A, open and deliver at router B: packets/s on this one core."""
    ra, rb, wa, wb = _router_pair()
    assert ra.peers["b"].session.current is not None, "in-process handshake failed"
    packet = _inner_packet(size)
    source = ("192.0.2.1", 51820)
    start = time.process_time()
    done = 0
    while done < packets:
        for _ in range(256):
            ra.from_lan(packet)
        batch, wa.datagrams = wa.datagrams, []
        for datagram in batch:
            rb.from_wire(datagram, source)
        done += 256
    cpu = time.process_time() - start
    assert wb.delivered == done, f"delivered {wb.delivered} of {done}"
    return {"packets_per_s": done / cpu, "gbit_s_equivalent": done * size * 8 / cpu / 1e9,
            "inner_bytes": size}


def measure_handshakes(count: int = 300) -> dict[str, float]:
    """Complete Noise XX handshakes (both sides' work) per second on this core."""
    rng = random.SystemRandom()
    keys = [secrets.token_bytes(32) for _ in range(2)]
    pubs = [public_of(k) for k in keys]
    start = time.process_time()
    for _ in range(count):
        a = PeerSession(static_private=keys[0], peer_static=pubs[1], is_known=lambda s: "ok",
                        random_source=rng, timers=Timers())
        b = PeerSession(static_private=keys[1], peer_static=pubs[0], is_known=lambda s: "ok",
                        random_source=rng, timers=Timers())
        a.initiate(0.0)
        for _ in range(3):
            for src, dst in ((a, b), (b, a)):
                for datagram in src.datagrams_to_send():
                    dst.receive(datagram, 0.0)
        assert b.current is not None
    cpu = time.process_time() - start
    return {"handshakes_per_s": count / cpu}


def main() -> int:
    """Run everything and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1, help="iperf3 runs per tunnel")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces)")
    ours, theirs = [], []
    for _ in range(args.repeat):
        ours.append(measure_vpnr(args.seconds))
        theirs.append(wgbench.measure_wireguard_go("wb" + secrets.token_hex(3), args.seconds,
                                                   udp_length=UDP_LENGTH))

    def median(runs: list[dict[str, Any]], kind: str) -> float:
        return float(statistics.median(r[kind]["gbit_s"] for r in runs))

    result: dict[str, Any] = {
        "vpnr": {"tcp_gbit_s": median(ours, "tcp"), "udp_gbit_s": median(ours, "udp"),
                 "tcp_retransmits": [r["tcp"]["retransmits"] for r in ours],
                 "udp_lost_percent": [r["udp"]["lost_percent"] for r in ours]},
        "wireguard_go": {"tcp_gbit_s": median(theirs, "tcp"), "udp_gbit_s": median(theirs, "udp"),
                         "tcp_retransmits": [r["tcp"]["retransmits"] for r in theirs],
                         "udp_lost_percent": [r["udp"]["lost_percent"] for r in theirs]},
        "aead_loop": measure_aead_loop(),
        "handshakes": measure_handshakes(),
        "target_ratio": TARGET_RATIO, "seconds": args.seconds, "repeat": args.repeat,
    }
    for kind in ("tcp", "udp"):
        base = result["wireguard_go"][f"{kind}_gbit_s"]
        result[f"ratio_{kind}"] = result["vpnr"][f"{kind}_gbit_s"] / base if base else None
    print(f"{'':22}{'vpnr':>10}{'wireguard-go':>14}{'ratio':>8}")
    for kind in ("tcp", "udp"):
        ratio = result[f"ratio_{kind}"]
        print(f"{kind.upper() + ' Gbit/s (1 stream)':22}{result['vpnr'][f'{kind}_gbit_s']:>10.3f}"
              f"{result['wireguard_go'][f'{kind}_gbit_s']:>14.3f}"
              f"{ratio if ratio is not None else float('nan'):>8.2f}")
    loop = result["aead_loop"]
    print(f"AEAD loop, one core: {loop['packets_per_s']:,.0f} packets/s of "
          f"{loop['inner_bytes']} B ({loop['gbit_s_equivalent']:.2f} Gbit/s)")
    print(f"Noise XX handshakes, one core: {result['handshakes']['handshakes_per_s']:,.0f}/s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
