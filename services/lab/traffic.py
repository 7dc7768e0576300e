"""Continuous, counted traffic through a running lab, and a capture of its underlay.

Allowed flows are sequence-numbered UDP datagrams from one namespace to a socket in
another: the receiver records which sequence numbers arrived and when, so loss and the
moment traffic came back are measured, not guessed. Denied flows are probes, each one
packet with its own source port: packet sockets (AF_PACKET, which the kernel feeds after
XDP and before TC ingress) record the probes seen past the point that must drop them (a
policy mismatch) and, for the tunnel's decap program, the probes that reached it (a
decision the audit log must hold).

Everything here runs in the calling process: sockets are created inside the namespaces
(``vpnr.core.netns``) and keep their namespace after. Loops are bounded by ``stop()`` and
by the deadline given to ``start``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vpnr.core import netns
from vpnr.lab.topology import IDP_ADDRESS, IDP_PORT, LabSpec

TUNNEL_PORT = 51820
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
PAYLOAD = struct.Struct("!8sBI")  # case token, flow index, sequence number
PAYLOAD_BYTES = 64
PROBE_PORTS = (10000, 30000)      # denied probes' source ports: below the ephemeral range
POLL_MS = 50


@dataclass
class AllowedFlow:
    """Datagrams that the policy allows, ``rate`` per second from src to dst."""

    name: str
    src_ns: str
    src_addr: str
    dst_ns: str
    dst_addr: str
    dst_port: int
    rate: float
    tunnel: bool = False
    src_port: int = 0
    sent: list[float] = field(default_factory=list)        # send time by sequence number
    received: dict[int, float] = field(default_factory=dict)  # seq -> first arrival
    duplicates: int = 0

    @property
    def lost(self) -> int:
        """Sent and never received."""
        return len(self.sent) - len(self.received)

    def back_at(self, since: float) -> float | None:
        """When this flow flowed again after its last loss that was sent after ``since``:
        the first arrival of a datagram sent after that loss. None when nothing sent after
        ``since`` was lost (no interruption); inf when it never came back."""
        lost = [seq for seq, at in enumerate(self.sent)
                if at >= since and seq not in self.received]
        if not lost:
            return None
        after = [self.received[seq] for seq in range(lost[-1] + 1, len(self.sent))
                 if seq in self.received]
        return min(after) if after else float("inf")


@dataclass
class DeniedFlow:
    """Probes that the policy denies: ``proto`` "udp" or "tcp" (one SYN each)."""

    name: str
    proto: str
    src_ns: str
    src_addr: str
    dst_addr: str
    dst_port: int
    rate: float
    reason: int                # the audit record's expected reason (codes.proto)
    rule_id: int               # ... and rule
    audit_site: str            # the site whose auditd records the decision
    source: str                # "xdp" or "tc_decap"
    passed_at: tuple[str, str]  # (namespace, interface) where a probe that got through shows
    decided_at: tuple[str, str] | None = None  # where every probe decided shows (decap only)
    probes: dict[int, float] = field(default_factory=dict)  # source port -> send time
    passed: set[int] = field(default_factory=set)
    decided: set[int] = field(default_factory=set)

    @property
    def ip_protocol(self) -> int:
        """IANA number of the probes' protocol."""
        return 6 if self.proto == "tcp" else 17


def frame_ports(frame: bytes) -> tuple[str, str, int, int, int] | None:
    """(src, dst, protocol, src port, dst port) of an Ethernet IPv4 TCP/UDP frame."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 15) * 4
    proto = frame[23]
    if proto not in (6, 17) or len(frame) < 14 + ihl + 4:
        return None
    sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
    return (socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), proto, sport,
            dport)


class Traffic:
    """Runs the flows from ``start`` to ``stop`` in two threads (sender, receiver)."""

    def __init__(self, allowed: list[AllowedFlow], denied: list[DeniedFlow],
                 token: bytes) -> None:
        self.allowed, self.denied, self.token = allowed, denied, token
        self._stop = threading.Event()
        self._stop_sending = threading.Event()
        self._threads: list[threading.Thread] = []
        self._senders: list[socket.socket] = []
        self._receivers: dict[int, int] = {}          # fd -> allowed flow index
        self._watchers: dict[int, list[tuple[DeniedFlow, str]]] = {}  # fd -> flows, kind
        self._sockets: list[socket.socket] = []
        self._next_port = PROBE_PORTS[0] + secrets.randbelow(PROBE_PORTS[1] - PROBE_PORTS[0])
        self.errors: list[str] = []

    # -- set-up ---------------------------------------------------------------------------

    def _open(self) -> None:
        for index, flow in enumerate(self.allowed):
            with netns.entered(flow.dst_ns):
                rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                rx.bind((flow.dst_addr, flow.dst_port))
            self._sockets.append(rx)
            self._receivers[rx.fileno()] = index
            with netns.entered(flow.src_ns):
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                tx.bind((flow.src_addr, 0))
            flow.src_port = tx.getsockname()[1]
            self._sockets.append(tx)
            self._senders.append(tx)
        places: dict[tuple[str, str], list[tuple[DeniedFlow, str]]] = {}
        for denied in self.denied:
            places.setdefault(denied.passed_at, []).append((denied, "passed"))
            if denied.decided_at is not None:
                places.setdefault(denied.decided_at, []).append((denied, "decided"))
        for (ns, ifname), flows in places.items():
            with netns.entered(ns):
                watcher = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                        socket.htons(ETH_P_ALL))
                watcher.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                watcher.bind((ifname, ETH_P_ALL))
            self._sockets.append(watcher)
            self._watchers[watcher.fileno()] = flows

    def start(self, deadline_s: float) -> Traffic:
        """Open every socket, then send and receive until ``stop`` (or ``deadline_s``)."""
        try:
            self._open()
        except BaseException:
            self._close()
            raise
        end = time.monotonic() + deadline_s
        self._threads = [threading.Thread(target=self._receive, args=(end,), daemon=True),
                         threading.Thread(target=self._send, args=(end,), daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop_sending(self) -> None:
        """No more packets; the receiver keeps counting what is in flight."""
        self._stop_sending.set()

    def stop(self, drain_s: float = 0.5) -> None:
        """Stop sending, let the last packets arrive, stop receiving, close everything."""
        self._stop_sending.set()
        if self._threads:
            self._threads[1].join(10)
            time.sleep(drain_s)
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._close()

    def _close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    # -- sending --------------------------------------------------------------------------

    def _payload(self, index: int, seq: int) -> bytes:
        return PAYLOAD.pack(self.token, index, seq).ljust(PAYLOAD_BYTES, b".")

    def _probe_port(self) -> int:
        port = self._next_port
        self._next_port = port + 1 if port + 1 < PROBE_PORTS[1] else PROBE_PORTS[0]
        return port

    def _probe(self, index: int, flow: DeniedFlow) -> None:
        port = self._probe_port()
        kind = socket.SOCK_DGRAM if flow.proto == "udp" else socket.SOCK_STREAM
        with netns.entered(flow.src_ns), socket.socket(socket.AF_INET, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((flow.src_addr, port))
            flow.probes[port] = time.monotonic()
            if flow.proto == "udp":
                sock.sendto(self._payload(100 + index, port), (flow.dst_addr, flow.dst_port))
            else:
                # A non-blocking connect sends the SYN before it returns; closing a socket
                # in SYN-SENT sends nothing, so each probe is exactly one packet.
                sock.setblocking(False)
                sock.connect_ex((flow.dst_addr, flow.dst_port))

    def _send(self, end: float) -> None:
        flows: list[tuple[float, int, AllowedFlow | DeniedFlow]] = \
            [(1.0 / f.rate, i, f) for i, f in enumerate(self.allowed)] + \
            [(1.0 / f.rate, i, f) for i, f in enumerate(self.denied)]
        start = time.monotonic()
        due = [start + n * 0.001 for n in range(len(flows))]
        while not self._stop_sending.is_set() and time.monotonic() < end:
            now = time.monotonic()
            for n, (period, index, flow) in enumerate(flows):
                if now < due[n]:
                    continue
                due[n] += period
                try:
                    if isinstance(flow, AllowedFlow):
                        seq = len(flow.sent)
                        flow.sent.append(time.monotonic())
                        self._senders[index].sendto(self._payload(index, seq),
                                                    (flow.dst_addr, flow.dst_port))
                    else:
                        self._probe(index, flow)
                except OSError as exc:  # counted as sent and lost, and said
                    if len(self.errors) < 20:
                        self.errors.append(f"send {flow.name}: {exc}")
            time.sleep(max(0.0, min(due) - time.monotonic()))

    # -- receiving ------------------------------------------------------------------------

    def _receive(self, end: float) -> None:
        poller = select.poll()
        for fd in (*self._receivers, *self._watchers):
            poller.register(fd, select.POLLIN)
        by_fd = {s.fileno(): s for s in self._sockets}
        while not self._stop.is_set() and time.monotonic() < end + 5:
            for fd, _ in poller.poll(POLL_MS):
                now = time.monotonic()
                sock = by_fd[fd]
                try:
                    if fd in self._receivers:
                        self._on_datagram(sock.recv(2048), now)
                    else:
                        frame, address = sock.recvfrom(65536)
                        if address[2] != PACKET_OUTGOING:
                            self._on_frame(self._watchers[fd], frame)
                except OSError as exc:  # e.g. a device gone: said, and the loop goes on
                    if len(self.errors) < 20:
                        self.errors.append(f"receive: {exc}")
                    poller.unregister(fd)

    def _on_datagram(self, data: bytes, now: float) -> None:
        if len(data) < PAYLOAD.size:
            return
        token, index, seq = PAYLOAD.unpack_from(data)
        if token != self.token or index >= len(self.allowed):
            return
        flow = self.allowed[index]
        if seq in flow.received:
            flow.duplicates += 1
        else:
            flow.received[seq] = now

    @staticmethod
    def _on_frame(flows: list[tuple[DeniedFlow, str]], frame: bytes) -> None:
        ports = frame_ports(frame)
        if ports is None:
            return
        src, dst, proto, sport, dport = ports
        for flow, kind in flows:
            if (src, dst, proto, dport) == (flow.src_addr, flow.dst_addr, flow.ip_protocol,
                                            flow.dst_port) and sport in flow.probes:
                (flow.passed if kind == "passed" else flow.decided).add(sport)


# -- the underlay ---------------------------------------------------------------------------

LAN_V4 = ipaddress.ip_network("10.0.0.0/8")
LAN_V6 = ipaddress.ip_network("fd00::/8")


class UnderlayCapture:
    """tcpdump on the underlay bridge (both routers and the IdP), to a pcap file."""

    def __init__(self, spec: LabSpec, path: Path) -> None:
        self.spec, self.path = spec, path
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> UnderlayCapture:
        """Start and wait (bounded) until tcpdump listens."""
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.spec.underlay_ns}", "tcpdump", "-Z", "root",
             "--immediate-mode", "-i", "br0", "-U", "-n", "-s", "0", "-B", "8192", "-w",
             str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], 10)
        line = self.proc.stderr.readline() if ready else ""
        if "listening" not in line:
            self.stop()
            raise RuntimeError(f"tcpdump did not start on the underlay: {line.strip()}")
        return self

    def stop(self) -> list[bytes]:
        """Stop tcpdump (it flushes on SIGINT); the captured frames."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        data = self.path.read_bytes() if self.path.exists() else b""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        frames, offset = [], 24  # the pcap file header
        while offset + 16 <= len(data):
            caplen = struct.unpack_from("<I", data, offset + 8)[0]
            frames.append(data[offset + 16:offset + 16 + caplen])
            offset += 16 + caplen
        return frames


def underlay_leaks(spec: LabSpec, frames: list[bytes], token: bytes) -> list[str]:
    """What on the underlay is not the routers' tunnel messages or idpd's exchanges with
    the IdP: the case's payload in clear anywhere, a site address in an IP header
    (also inside an ICMP error), or a router sending or receiving anything else."""
    routers = {s.router_wan_v4 for s in spec.sites}
    leaks = []
    for n, frame in enumerate(frames):
        why = ""
        if token in frame:
            why = "the traffic's payload in clear"
        elif frame[12:14] == b"\x08\x00" and len(frame) >= 34:
            why = _ipv4_leak(frame, routers)
        elif frame[12:14] == b"\x86\xdd" and len(frame) >= 54:
            src = ipaddress.ip_address(frame[22:38])
            dst = ipaddress.ip_address(frame[38:54])
            if not src.is_link_local and not (src.is_unspecified and dst.is_multicast):
                why = f"IPv6 {src} -> {dst} on the underlay"
        if why:
            leaks.append(f"frame {n}: {why}")
    return leaks


def tunnel_messages(spec: LabSpec, frames: list[bytes]) -> int:
    """How many frames are tunnel messages between the routers (UDP, the tunnel port)."""
    routers = {socket.inet_aton(s.router_wan_v4) for s in spec.sites}
    return sum(1 for f in frames if len(f) >= 42 and f[12:14] == b"\x08\x00" and f[23] == 17
               and {f[26:30], f[30:34]} <= routers
               and TUNNEL_PORT in struct.unpack_from("!HH", f, 14 + (f[14] & 15) * 4))


def _ipv4_leak(frame: bytes, routers: set[str]) -> str:
    src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    proto, ihl = frame[23], (frame[14] & 15) * 4
    inner = frame[14 + ihl + 8:]  # an ICMP error quotes the offending IP header here
    if any(ipaddress.ip_address(a) in LAN_V4 for a in (src, dst)):
        return f"site address in clear: {src} -> {dst}"
    if proto == 1 and len(inner) >= 20 and any(
            ipaddress.ip_address(inner[o:o + 4]) in LAN_V4 for o in (12, 16)):
        return f"site address quoted in ICMP {src} -> {dst}"
    if not ({src, dst} & routers):
        return ""
    ports = struct.unpack_from("!HH", frame, 14 + ihl) if proto in (6, 17) else (0, 0)
    if proto == 17 and {src, dst} <= routers and TUNNEL_PORT in ports:
        return ""                        # a tunnel message
    if proto == 6 and IDP_ADDRESS in (src, dst) and IDP_PORT in ports:
        return ""                        # idpd and the IdP
    if proto == 1 and {src, dst} <= routers and len(inner) >= 28 and inner[9] == 17 and \
            TUNNEL_PORT in struct.unpack_from("!HH", inner, (inner[0] & 15) * 4):
        return ""                        # an ICMP error about a tunnel message
    return f"not a tunnel message: proto {proto} {src}:{ports[0]} -> {dst}:{ports[1]}"
