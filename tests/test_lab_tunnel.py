"""The tunnel between the lab's two sites, on real traffic between namespaces.

Site A host 1 and site B host 1 are engineers (services/lab/policy.py): each site lets the
other's engineers in, except telnet. Echo servers run on both hosts (tests/netprobe.py).
The underlay bridge (namespace ``<lab>-ul``) is where a capture sees what leaves a router.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from conftest import ns_exec, ns_ping, unique
from vpnr.core import netns
from vpnr.core.client import socket_target
from vpnr.lab.lab import Lab
from vpnr.lab.topology import IDP_ADDRESS, Site
from vpnr.tunneld.keys import StaticKeys
from vpnr.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    codes_pb2,
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    tunnel_pb2,
    tunnel_pb2_grpc,
)

pytestmark = [pytest.mark.root, pytest.mark.lab]

NETPROBE = str(Path(__file__).with_name("netprobe.py"))
MINIPEER = str(Path(__file__).with_name("minipeer.py"))
TUNNEL_PORT = 51820


def probe(site: Site, host: int, verb: str, dst: str, port: int) -> str:
    """OK or FAIL for one exchange from a site host."""
    return ns_exec(site.host_ns(host), sys.executable, NETPROBE, verb, dst,
                 str(port)).stdout.strip()


def ping(site: Site, host: int, dst: str, count: int = 1) -> bool:
    """Do echo requests get answers?"""
    return ns_ping(site.host_ns(host), dst, count)


def tunnel(lab: Lab, letter: str, call: str, request: object) -> object:
    """One TunnelService call to a site's tunneld."""
    path = lab.spec.run_dir / lab.spec.site(letter).instance / "tunneld.sock"
    with grpc.insecure_channel(socket_target(path)) as channel:
        return getattr(tunnel_pb2_grpc.TunnelServiceStub(channel), call)(request, timeout=10)


def status(lab: Lab, letter: str) -> tunnel_pb2.TunnelStatus:
    """A site's tunneld Status."""
    answer = tunnel(lab, letter, "Status", tunnel_pb2.TunnelStatusRequest())
    assert isinstance(answer, tunnel_pb2.TunnelStatus)
    return answer


def wait_established(lab: Lab, timeout: float = 15.0) -> None:
    """Until both routers report a session with the other (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(status(lab, s).sessions >= 1 for s in ("a", "b")):
            return
        time.sleep(0.1)
    raise AssertionError(f"no tunnel session within {timeout} s")


@pytest.fixture(scope="module")
def echo(lab: Lab) -> Iterator[Lab]:
    """Echo servers on host 1 of both sites, and an established tunnel."""
    procs = []
    for site in lab.spec.sites:
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{site.host_ns(1)}",
                                 sys.executable, NETPROBE, "serve", site.host_v4(1),
                                 site.host_v6(1)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        wait_established(lab)
        yield lab
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


class Capture:
    """tcpdump on site A router's port of the underlay bridge (all it sends and receives),
    written to a pcap file and read back."""

    def __init__(self, lab: Lab, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{lab.spec.underlay_ns}", "tcpdump", "-Z", "root",
             "--immediate-mode", "-i", "p-a", "-U", "-n", "-s", "0", "-w", str(path),
             "ip or ip6"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "tcpdump: listening on br0 ..."
        assert "listening" in line, line

    def stop(self) -> list[bytes]:
        """Stop tcpdump; the captured frames."""
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        data = self.path.read_bytes()
        frames, offset = [], 24  # pcap global header
        while offset + 16 <= len(data):
            _, _, caplen, _ = struct.unpack_from("<IIII", data, offset)
            frames.append(data[offset + 16:offset + 16 + caplen])
            offset += 16 + caplen
        return frames


def udp_ports(frame: bytes) -> tuple[int, int] | None:
    """(source, destination) port of an IPv4 UDP frame, else None."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 15) * 4
    return struct.unpack_from("!HH", frame, 14 + ihl)


def send_udp(site: Site, host: int, dst: str, port: int, payload: bytes, count: int) -> None:
    """``count`` datagrams from a site host (no answer awaited)."""
    with netns.entered(site.host_ns(host)), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            sock.sendto(payload, (dst, port))
            time.sleep(0.002)


def test_hosts_reach_each_other_over_the_tunnel(echo: Lab) -> None:
    a, b = echo.spec.sites
    seen = {
        "a->b ping": ping(a, 1, b.host_v4(1), 3),
        "a->b ping6": ping(a, 1, b.host_v6(1), 3),
        "a->b tcp": probe(a, 1, "tcp", b.host_v4(1), 5000),
        "a->b tcp6": probe(a, 1, "tcp", b.host_v6(1), 5001),
        "a->b udp": probe(a, 1, "udp", b.host_v4(1), 53),
        "b->a ping": ping(b, 1, a.host_v4(1), 3),
        "b->a tcp": probe(b, 1, "tcp", a.host_v4(1), 5000),
        "b->a udp6": probe(b, 1, "udp", a.host_v6(1), 53),
    }
    assert seen == {"a->b ping": True, "a->b ping6": True, "a->b tcp": "OK",
                    "a->b tcp6": "OK", "a->b udp": "OK", "b->a ping": True,
                    "b->a tcp": "OK", "b->a udp6": "OK"}
    st = status(echo, "a")
    assert st.sessions == 1 and st.datapath_counters["xsk_rx"] > 0
    assert st.datapath_counters["decap_tx"] > 0


def test_underlay_carries_only_tunnel_messages(echo: Lab, tmp_path: Path) -> None:
    a, b = echo.spec.sites
    marker = b"VPNR-CLEARTEXT-MARKER-" + os.urandom(8).hex().encode()
    capture = Capture(echo, tmp_path / "underlay.pcap")
    try:
        send_udp(a, 1, b.host_v4(1), 53, marker, 50)
        assert probe(a, 1, "tcp", b.host_v4(1), 5000) == "OK"
    finally:
        frames = capture.stop()
    between = [f for f in frames if f[12:14] == b"\x08\x00" and
               {f[26:30], f[30:34]} == {socket.inet_aton(a.router_wan_v4),
                                       socket.inet_aton(b.router_wan_v4)}]
    assert len(between) >= 50  # the 50 datagrams crossed, encrypted
    assert all(udp_ports(f) is not None and TUNNEL_PORT in udp_ports(f)  # type: ignore[operator]
               for f in between)
    assert not any(marker in f for f in frames)
    # Nor do the inner addresses appear in clear (a pair of them would be an IP header).
    inner = socket.inet_aton(a.host_v4(1)) + socket.inet_aton(b.host_v4(1))
    assert not any(inner in f for f in frames)


def test_replayed_data_message_is_rejected(echo: Lab, tmp_path: Path) -> None:
    a, b = echo.spec.sites
    capture = Capture(echo, tmp_path / "replay.pcap")
    try:
        send_udp(a, 1, b.host_v4(1), 53, b"replay me", 3)
    finally:
        frames = capture.stop()
    data = [f for f in frames if udp_ports(f) == (TUNNEL_PORT, TUNNEL_PORT) and
            f[26:30] == socket.inet_aton(a.router_wan_v4) and f[42] == 5]
    assert data, "no data message captured"
    message = data[-1][42:]
    before = status(echo, "b")
    with netns.entered(echo.spec.underlay_ns), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(3):
            sock.sendto(message, (b.router_wan_v4, TUNNEL_PORT))
    deadline = time.monotonic() + 5
    after = before
    while time.monotonic() < deadline:
        after = status(echo, "b")
        if after.drops_by_reason["replayed"] >= before.drops_by_reason["replayed"] + 3:
            break
        time.sleep(0.05)
    assert after.drops_by_reason["replayed"] == before.drops_by_reason["replayed"] + 3
    # Nothing of it reached the kernel a second time.
    assert after.datapath_counters["decap_tx"] == before.datapath_counters["decap_tx"]


def test_unknown_session_index_is_dropped_in_xdp(echo: Lab) -> None:
    b = echo.spec.site("b")
    before = status(echo, "b")
    forged = struct.pack("<B3xIQ", 5, 0xDEADBEEF, 1) + os.urandom(48)
    with netns.entered(echo.spec.underlay_ns), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(20):
            sock.sendto(forged, (b.router_wan_v4, TUNNEL_PORT))
    time.sleep(0.3)
    after = status(echo, "b")
    # Never reached userspace: XDP dropped them (the session map has no such index).
    assert after.datapath_counters["udp_rx"] - before.datapath_counters["udp_rx"] < 20
    assert after.drops_by_reason["unknown_index"] == before.drops_by_reason["unknown_index"]
    denied = audit_query(echo, "b", reason=codes_pb2.REASON_TUNNEL_UNKNOWN_SESSION)
    assert any(r.packet.src == IDP_ADDRESS for r in denied)  # the underlay namespace's address


def audit_query(lab: Lab, letter: str, reason: int = 0,
                rule_id: int = 0) -> list[audit_pb2.AuditRecord]:
    """Recent packet records at a site, filtered."""
    path = lab.spec.run_dir / lab.spec.site(letter).instance / "auditd.sock"
    with grpc.insecure_channel(socket_target(path)) as channel:
        answer = audit_pb2_grpc.AuditServiceStub(channel).Query(audit_pb2.QueryRequest(
            filter=audit_pb2.AuditFilter(rule_id=rule_id, packets_only=True),
            page=common_pb2.PageRequest(page_size=500)), timeout=10)
    return [r for r in answer.records if not reason or r.packet.reason == reason]


def test_role_denied_inner_traffic_is_dropped_by_decap_and_audited(echo: Lab) -> None:
    a, b = echo.spec.sites
    # Site A lets its engineer send anything to site B; site B refuses telnet into it.
    assert probe(a, 1, "tcp", b.host_v4(1), 23) == "FAIL"
    assert probe(a, 1, "tcp", b.host_v4(1), 22) == "OK"
    deadline = time.monotonic() + 3
    records: list[audit_pb2.AuditRecord] = []
    while time.monotonic() < deadline and not records:
        records = [r for r in audit_query(echo, "b", rule_id=25)
                   if r.packet.src == a.host_v4(1) and r.packet.dst_port == 23]
        time.sleep(0.1)
    assert records, "site B audited no telnet denial"
    packet = records[0].packet
    assert packet.source == "tc_decap"
    assert packet.verdict == codes_pb2.VERDICT_DENY
    assert packet.reason == codes_pb2.REASON_RULE_DENY
    assert packet.src_zone == codes_pb2.ZONE_VPN
    assert packet.interface == "vpnr0"
    assert list(packet.roles) == ["eng"]


def test_rekeying_every_second_loses_no_tcp_segment(echo: Lab) -> None:
    a, b = echo.spec.sites
    before = status(echo, "a").handshakes_completed
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{b.host_ns(1)}", "iperf3", "-s",
                               "-1", "-B", b.host_v4(1), "-p", "5301"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        client = subprocess.Popen(["nsenter", f"--net=/run/netns/{a.host_ns(1)}", "iperf3",
                                   "-c", b.host_v4(1), "-p", "5301", "-t", "8", "-b", "50M",
                                   "-J"], stdout=subprocess.PIPE, text=True)
        rekeys = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and client.poll() is None:
            time.sleep(1.0)
            # Make-before-break rekeys from both ends, alternately.
            tunnel(echo, "ab"[rekeys % 2], "RotateSession",
                   tunnel_pb2.RotateSessionRequest(peer=f"site-{'ba'[rekeys % 2]}"))
            rekeys += 1
        out, _ = client.communicate(timeout=30)
    finally:
        server.kill()
        server.wait(10)
    report = json.loads(out)
    sent = report["end"]["sum_sent"]
    assert rekeys >= 6
    assert status(echo, "a").handshakes_completed - before >= rekeys
    assert sent["bytes"] > 20_000_000  # the stream really ran: ~50 Mbit/s for 8 s
    assert sent["retransmits"] == 0


def test_tunneld_kill9_leaks_nothing_and_traffic_resumes(echo: Lab, tmp_path: Path) -> None:
    a, b = echo.spec.sites
    marker = b"KILL9-MARKER-" + os.urandom(6).hex().encode()
    capture = Capture(echo, tmp_path / "kill9.pcap")
    replies: list[float] = []
    try:
        with netns.entered(a.host_ns(1)), \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)

            def pump(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    sock.sendto(marker, (b.host_v4(1), 53))
                    time.sleep(0.01)
                    try:
                        while sock.recv(256) == marker:
                            replies.append(time.monotonic())
                    except BlockingIOError:
                        pass

            pump(0.5)
            assert replies, "no echo before the kill"
            echo.signal_daemon(a, "tunneld", signal.SIGKILL)
            entry = echo.process(f"{a.instance}/tunneld")
            assert entry is not None and echo.wait_exit(entry, 5)
            replies.clear()
            pump(1.0)  # tunneld is dead: XDP must drop what goes to the VPN zone
            assert not replies
            start = time.monotonic()
            echo.start_daemon(a, "tunneld")
            echo.wait_ready(a, "tunneld")
            ready = time.monotonic()
            pump(3.0)
    finally:
        frames = capture.stop()
    assert replies, "traffic did not resume"
    print(f"\ntunneld restart: SERVING after {ready - start:.2f} s, traffic back "
          f"{replies[0] - ready:.2f} s after that ({replies[0] - start:.2f} s after exec)")
    assert replies[0] - ready < 1.0
    assert not any(marker in f for f in frames)  # never in clear on the underlay
    # Down time: the kernel counted the drops (fail closed, not a silent route elsewhere).
    denied = audit_query(echo, "a", reason=codes_pb2.REASON_TUNNEL_NO_SOCKET)
    assert any(r.packet.src == a.host_v4(1) for r in denied)


def policy(lab: Lab, letter: str, call: str, request: object) -> object:
    """One PolicyService call to a site's policyd."""
    path = lab.spec.run_dir / lab.spec.site(letter).instance / "policyd.sock"
    with grpc.insecure_channel(socket_target(path)) as channel:
        return getattr(policy_pb2_grpc.PolicyServiceStub(channel), call)(request, timeout=10)


def test_ten_peers_have_concurrent_sessions(echo: Lab, tmp_path: Path) -> None:
    a = echo.spec.site("a")
    names = [unique(f"p{n}") for n in range(10)]
    router_pub = status(echo, "a").public_key
    procs: list[subprocess.Popen[str]] = []
    created: list[str] = []
    try:
        # Site A learns of ten more sites: 10.100.N.0/24 behind peer N, in the VPN zone, and
        # their people are engineers (so site A's rules let their pings in and out).
        policy(echo, "a", "CreateZone", policy_pb2.CreateZoneRequest(zone=policy_pb2.ZoneAssignment(
            prefix="10.100.0.0/16", zone=codes_pb2.ZONE_VPN)))
        policy(echo, "a", "CreateBinding", policy_pb2.CreateBindingRequest(
            binding=policy_pb2.Binding(prefix="10.100.0.0/16", roles=["eng"], source="test",
                                       subject="ten-peers")))
        for n, ns in enumerate(names):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
            created.append(ns)
            subprocess.run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer",
                            "name", f"q{n}", "netns", echo.spec.underlay_ns], check=True,
                           timeout=10)
            ns_exec(echo.spec.underlay_ns, "ip", "link", "set", f"q{n}", "master", "br0", "up")
            ns_exec(ns, "ip", "addr", "add", f"198.51.100.{20 + n}/24", "dev", "eth0")
            ns_exec(ns, "ip", "link", "set", "eth0", "up")
            key = StaticKeys.load_or_create(tmp_path / f"peer{n}.key")
            tunnel(echo, "a", "AddPeer", tunnel_pb2.AddPeerRequest(peer=tunnel_pb2.Peer(
                name=f"extra-{n}", public_key=base64.b64encode(key.public).decode(),
                endpoint=f"198.51.100.{20 + n}:51820",
                allowed_prefixes=[f"10.100.{n}.0/24"])))
        for n, ns in enumerate(names):
            procs.append(subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", sys.executable, MINIPEER,
                 str(tmp_path / f"peer{n}.key"), router_pub, f"{a.router_wan_v4}:51820",
                 f"10.100.{n}.1", a.host_v4(1), "5"], stdout=subprocess.PIPE, text=True))
        results = [p.communicate(timeout=30)[0].strip() for p in procs]
        assert results == ["OK 5"] * 10
        peers = tunnel(echo, "a", "ListPeers", tunnel_pb2.ListPeersRequest())
        states = {p.name: p.state for p in peers.peers}  # type: ignore[attr-defined]
        assert all(states[f"extra-{n}"] == tunnel_pb2.PEER_STATE_ESTABLISHED
                   for n in range(10))
        assert status(echo, "a").sessions == 11  # ten extra peers and site B
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for n in range(10):
            with contextlib.suppress(grpc.RpcError):
                tunnel(echo, "a", "RemovePeer", tunnel_pb2.RemovePeerRequest(name=f"extra-{n}"))
        with contextlib.suppress(grpc.RpcError):
            policy(echo, "a", "DeleteBinding", policy_pb2.DeleteBindingRequest(
                prefix="10.100.0.0/16"))
        with contextlib.suppress(grpc.RpcError):
            policy(echo, "a", "DeleteZone", policy_pb2.DeleteZoneRequest(prefix="10.100.0.0/16"))
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
