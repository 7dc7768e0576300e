"""The pure-Python AF_XDP socket on a real veth pair between two network namespaces: a tiny
test-only XDP program (bcc) redirects UDP to port 4789 into an XSKMAP on the side "near";
datagrams come from normal UDP sockets on the side "far", and frames the socket transmits
are received by a UDP socket there."""

from __future__ import annotations

import errno
import json
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import unique
from vpnr.core import netns
from vpnr.tunneld.xsk import XskError, XskSocket

pytestmark = pytest.mark.root

NEAR_IF, FAR_IF = "xsk0", "xsk1"
NEAR_IP, FAR_IP = "192.0.2.1", "192.0.2.2"
XSK_PORT, OTHER_PORT, FAR_PORT = 4789, 4790, 5555
ETH, IPV4, UDP = 14, 20, 8
DEADLINE = 10.0  # seconds any one exchange may take

PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>

BPF_XSKMAP(xsks, 4);

int xsk_redirect(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
        return XDP_PASS;
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end || udp->dest != htons(4789))
        return XDP_PASS;
    return xsks.redirect_map(ctx->rx_queue_index, XDP_PASS);
}
"""


@dataclass
class Pair:
    """Two namespaces joined by a veth pair, the XDP program attached on the near side."""

    near: str
    far: str
    near_ifindex: int
    near_mac: bytes
    far_mac: bytes
    map_fd: int

    def xsk(self, **kwargs: int) -> XskSocket:
        """An AF_XDP socket on the near interface, queue 0, registered at key 0."""
        with netns.entered(self.near):
            xsk = XskSocket(self.near_ifindex, 0, **kwargs)
        try:
            xsk.register(self.map_fd, 0)
        except BaseException:
            xsk.close()
            raise
        return xsk

    def udp(self, side: str, port: int = 0) -> socket.socket:
        """A UDP socket created in ``side``'s namespace (sockets keep it), bound to port."""
        with netns.entered(side):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((NEAR_IP if side == self.near else FAR_IP, port))
        return sock


def link(namespace: str, ifname: str) -> dict[str, Any]:
    """``ip -j link show`` of one interface."""
    out = subprocess.run(["ip", "-n", namespace, "-j", "link", "show", "dev", ifname],
                         check=True, capture_output=True, text=True).stdout
    info: dict[str, Any] = json.loads(out)[0]
    return info


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """Set up once for the module (bcc compiles for a few seconds), torn down by name."""
    from bcc import BPF

    near, far = unique("xska"), unique("xskb")
    try:
        for name in (near, far):
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", near, "link", "add", NEAR_IF, "type", "veth", "peer",
                        "name", FAR_IF, "netns", far], check=True)
        for name, ifname, address in ((near, NEAR_IF, NEAR_IP), (far, FAR_IF, FAR_IP)):
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/24", "dev", ifname],
                           check=True)
            subprocess.run(["ip", "-n", name, "link", "set", ifname, "up"], check=True)
        near_link, far_link = link(near, NEAR_IF), link(far, FAR_IF)
        # Permanent neighbours: no datagram of a test waits for (or is dropped behind) ARP.
        for name, ifname, address, other in ((near, NEAR_IF, FAR_IP, far_link),
                                             (far, FAR_IF, NEAR_IP, near_link)):
            subprocess.run(["ip", "-n", name, "neigh", "replace", address, "lladdr",
                            other["address"], "dev", ifname, "nud", "permanent"], check=True)
        program = BPF(text=PROGRAM)
        try:
            function = program.load_func("xsk_redirect", BPF.XDP)
            with netns.entered(near):
                program.attach_xdp(NEAR_IF, function, BPF.XDP_FLAGS_DRV_MODE)
            assert link(near, NEAR_IF)["xdp"]["mode"] == 1  # XDP_ATTACHED_DRV: native
            yield Pair(near, far, int(near_link["ifindex"]),
                       bytes.fromhex(near_link["address"].replace(":", "")),
                       bytes.fromhex(far_link["address"].replace(":", "")),
                       program["xsks"].map_fd)
        finally:
            program.cleanup()
    finally:
        for name in (near, far):
            subprocess.run(["ip", "netns", "del", name], check=False)


def payload_of(frame: bytes) -> tuple[int, bytes]:
    """(UDP destination port, payload) of an Ethernet/IPv4/UDP frame."""
    assert frame[12:14] == b"\x08\x00", frame[:14].hex()
    ihl = (frame[ETH] & 0x0F) * 4
    assert frame[ETH + 9] == socket.IPPROTO_UDP
    udp = ETH + ihl
    dport, length = struct.unpack_from("!2xHH", frame, udp)
    return dport, frame[udp + UDP:udp + length]


def checksum(header: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, src_mac: bytes, payload: bytes, sport: int, dport: int) -> bytes:
    """Ethernet/IPv4/UDP from NEAR_IP to FAR_IP, IPv4 checksum right, UDP checksum 0."""
    length = IPV4 + UDP + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, 1, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(NEAR_IP), socket.inet_aton(FAR_IP))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    udp = struct.pack("!HHHH", sport, dport, UDP + len(payload), 0)
    return dst_mac + src_mac + b"\x08\x00" + header + udp + payload


def receive(xsk: XskSocket, count: int, deadline: float = DEADLINE) -> list[bytes]:
    """Exactly ``count`` frames (fails on fewer by the deadline), waiting with poll."""
    frames: list[bytes] = []
    poller = select.poll()
    poller.register(xsk.fileno(), select.POLLIN)
    end = time.monotonic() + deadline
    while len(frames) < count and time.monotonic() < end:
        got = xsk.recv(count - len(frames))
        if not got:
            poller.poll(50)
        frames.extend(got)
    assert len(frames) == count, f"{len(frames)} of {count} frames; {xsk.stats()}"
    return frames


def test_udp_to_port_arrives_whole_in_order(pair: Pair) -> None:
    total, batch = 5000, 250
    with pair.xsk() as xsk, pair.udp(pair.far) as sender, \
            pair.udp(pair.near, OTHER_PORT) as other:
        other.settimeout(DEADLINE)
        got: list[bytes] = []
        for start in range(0, total, batch):
            for i in range(start, start + batch):
                sender.sendto(b"datagram %d" % i, (NEAR_IP, XSK_PORT))
            sender.sendto(b"not for xsk %d" % start, (NEAR_IP, OTHER_PORT))
            frames = receive(xsk, batch)
            assert other.recv(100) == b"not for xsk %d" % start
            for frame in frames:
                dport, payload = payload_of(frame)
                assert dport == XSK_PORT
                assert frame[:6] == pair.near_mac and frame[6:12] == pair.far_mac
                got.append(payload)
        assert got == [b"datagram %d" % i for i in range(total)]
        assert xsk.recv() == []
        stats = xsk.stats()
        assert stats["rx_dropped"] == stats["rx_ring_full"] == stats["rx_invalid_descs"] == 0


def test_send_reaches_udp_socket_on_peer(pair: Pair) -> None:
    count = 200
    with pair.xsk() as xsk, pair.udp(pair.far, FAR_PORT) as receiver:
        receiver.settimeout(DEADLINE)
        frames = [udp_frame(pair.far_mac, pair.near_mac, b"from xsk %d" % i, XSK_PORT,
                            FAR_PORT) for i in range(count)]
        queued = 0
        end = time.monotonic() + DEADLINE
        while queued < count and time.monotonic() < end:
            queued += xsk.send(frames[queued:])
        assert queued == count
        got = [receiver.recvfrom(100) for _ in range(count)]
        assert got == [(b"from xsk %d" % i, (NEAR_IP, XSK_PORT)) for i in range(count)]
        # Every TX frame comes back through the completion ring (bounded wait).
        end = time.monotonic() + DEADLINE
        while xsk.stats()["tx_free_frames"] < 8192:
            assert time.monotonic() < end, xsk.stats()
            xsk.send([])
        assert xsk.stats()["tx_invalid_descs"] == 0


def test_frames_recycle_through_fill_ring(pair: Pair) -> None:
    frame_count, batch = 256, 100  # 128 reception frames, each reused about 20 times
    total = batch * 26
    with pair.xsk(frame_count=frame_count) as xsk, pair.udp(pair.far) as sender:
        got: list[bytes] = []
        for start in range(0, total, batch):
            for i in range(start, start + batch):
                sender.sendto(b"r%d" % i, (NEAR_IP, XSK_PORT))
            got.extend(payload_of(frame)[1] for frame in receive(xsk, batch))
        assert got == [b"r%d" % i for i in range(total)]
        assert xsk.stats()["rx_fill_ring_empty_descs"] == 0


def test_receive_rate(pair: Pair) -> None:
    """Copy-out rate of recv() over frames already waiting in the RX ring, then the rate
    end to end from a separate sender process (which that process's speed bounds)."""
    rounds, queued, blast = 5, 4000, 100_000
    payload = bytes(64)
    with pair.xsk() as xsk, pair.udp(pair.far) as sender:
        elapsed = 0.0
        for _ in range(rounds):
            for _ in range(queued):
                sender.sendto(payload, (NEAR_IP, XSK_PORT))
            received = 0
            end = time.monotonic() + DEADLINE
            start = time.perf_counter()
            while received < queued and time.monotonic() < end:
                received += len(xsk.recv())
            elapsed += time.perf_counter() - start
            assert received == queued, xsk.stats()
        rate = rounds * queued / elapsed
        print(f"\nxsk recv, ring already full: {rounds * queued} frames of "
              f"{ETH + IPV4 + UDP + len(payload)} bytes in {elapsed * 1000:.1f} ms: "
              f"{rate:,.0f} frames/s")
        assert rate > 50_000

        code = ("import socket, time\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "t = time.perf_counter()\n"
                f"for _ in range({blast}): s.sendto(bytes(64), ({NEAR_IP!r}, {XSK_PORT}))\n"
                f"print(f'{{{blast} / (time.perf_counter() - t):.0f}}')\n")
        proc = subprocess.Popen(["ip", "netns", "exec", pair.far, sys.executable, "-c", code],
                                stdout=subprocess.PIPE, text=True)
        try:
            poller = select.poll()
            poller.register(xsk.fileno(), select.POLLIN)
            received, first, last = 0, 0.0, 0.0
            end = time.monotonic() + DEADLINE
            while received < blast and time.monotonic() < end:
                frames = xsk.recv(1024)
                if frames:
                    last = time.perf_counter()
                    first = first or last
                    received += len(frames)
                elif not poller.poll(200) and proc.poll() is not None:
                    break  # the sender is done and nothing came for 200 ms
            sent_rate = proc.communicate(timeout=DEADLINE)[0].strip()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stats = xsk.stats()
        print(f"xsk recv end to end: {received} of {blast} datagrams, "
              f"{received / max(last - first, 1e-9):,.0f} frames/s "
              f"(sender {int(sent_rate):,} datagrams/s); rx_ring_full {stats['rx_ring_full']}, "
              f"rx_dropped {stats['rx_dropped']}")
        assert received > blast // 2, stats


def test_bad_ifindex_or_queue_names_the_step(pair: Pair) -> None:
    with netns.entered(pair.near), pytest.raises(XskError) as bad_index:
        XskSocket(999_999, 0)
    assert bad_index.value.errno == errno.ENODEV
    assert "bind AF_XDP to ifindex 999999 queue 0" in str(bad_index.value)
    with netns.entered(pair.near), pytest.raises(XskError) as bad_queue:
        XskSocket(pair.near_ifindex, 7)
    assert bad_queue.value.errno == errno.EINVAL
    assert f"bind AF_XDP to ifindex {pair.near_ifindex} queue 7" in str(bad_queue.value)
    with pair.xsk(frame_count=64), netns.entered(pair.near), \
            pytest.raises(XskError) as taken:
        XskSocket(pair.near_ifindex, 0, frame_count=64)  # waits out EBUSY for a second
    assert taken.value.errno == errno.EBUSY
    assert "queue held by another AF_XDP socket" in str(taken.value)


def test_oversize_frame_is_refused(pair: Pair) -> None:
    with pair.xsk(frame_count=64) as xsk:
        with pytest.raises(ValueError, match="2049 bytes"):
            xsk.send([bytes(60), bytes(2049)])
        assert xsk.stats()["tx_free_frames"] == 32  # nothing was queued
    xsk.close()  # idempotent
    with pytest.raises(XskError, match="closed"):
        xsk.recv()
