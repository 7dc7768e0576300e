"""tunneld's I/O: the sockets and maps around :class:`~vpnr.tunneld.router.TunnelRouter`.

- LAN: an AF_XDP socket per LAN interface, in policyd's XSK map, receives what policyd's XDP
  program allowed towards the VPN zone. Were tunneld to die, the kernel removes the socket
  from the map and XDP drops the VPN zone's traffic (TUNNEL_NO_SOCKET): nothing leaves in
  clear text.
- Underlay: one UDP socket on the tunnel port sends every tunnel message and receives what
  policyd's XDP program let through (data for a live session index, rate-limited
  handshakes; bpf/lib/tunnel.h).
- Decap: the TAP device (decap.py); the kernel routes the peers' prefixes to it, so the
  router's own traffic to the other sites is read from it and tunneled too.
- Kernel: the session map (receiver indexes of live keypairs) and the tunnel settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
import struct
from pathlib import Path

from vpnr.core import bpfsys
from vpnr.core.auditrec import AuditRecorder
from vpnr.policyd import layout
from vpnr.tunneld.coalesce import VNET_HDR
from vpnr.tunneld.decap import DecapInterface
from vpnr.tunneld.router import Address, TunnelRouter
from vpnr.tunneld.xsk import XskSocket
from vpnr.v1 import audit_pb2

log = logging.getLogger("vpnr.tunneld.dataplane")

BATCH = 256  # packets handled per readiness callback before the loop gets a turn
SOCKET_BUFFER = 8 << 20
TICK_SECONDS = 0.05
_U32 = struct.Struct("=I")
# UDP segmentation offload (Linux 4.18): one sendmsg carries up to 64 equal-size datagrams
# (the last may be shorter); the kernel cuts them apart. One syscall per run of a batch.
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_U16 = struct.Struct("=H")
_CMSG_SPACE = socket.CMSG_SPACE(4)


class KernelSessions:
    """policyd's pinned tunnel maps, written by tunneld."""

    def __init__(self, pin_dir: Path) -> None:
        self.fds: dict[str, int] = {}
        try:
            for name in ("tunnel_sessions", "tunnel_settings", "xsk_map"):
                self.fds[name] = bpfsys.obj_get(str(pin_dir / name))
        except OSError as exc:
            self.close()
            raise FileNotFoundError(
                f"policyd's pinned map {pin_dir / name} is missing ({exc.strerror}); tunneld "
                "needs policyd's XDP program: start policyd first") from exc
        self._live: set[int] = set()

    def reset(self, handshake_rate: int, handshake_burst: int) -> None:
        """Forget sessions of a previous run, then switch the WAN check on."""
        fd = self.fds["tunnel_sessions"]
        stale = list(bpfsys.map_keys(fd, 4))
        if stale:
            bpfsys.map_delete_batch(fd, stale)
        settings = layout.TUNNEL_SETTINGS.pack(layout.TUNNEL_ENFORCE, handshake_rate,
                                               handshake_burst, 0)
        bpfsys.map_update(self.fds["tunnel_settings"], _U32.pack(0), settings)

    def set_live(self, live: dict[int, int]) -> None:
        """Make the session map equal ``live`` (index -> peer id)."""
        fd = self.fds["tunnel_sessions"]
        for index in self._live - live.keys():
            with contextlib.suppress(OSError):
                bpfsys.map_delete(fd, _U32.pack(index))
        for index, peer_id in live.items():
            if index not in self._live:
                bpfsys.map_update(fd, _U32.pack(index), _U32.pack(peer_id))
        self._live = set(live)

    def close(self) -> None:
        """Close the map fds."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def ip_slice(frame: bytes) -> memoryview | None:
    """The IP packet inside an Ethernet frame, trimmed to its own length (padding off)."""
    if len(frame) < 34:
        return None
    ethertype = (frame[12] << 8) | frame[13]
    view = memoryview(frame)
    if ethertype == 0x0800:
        length = (frame[16] << 8) | frame[17]
    elif ethertype == 0x86DD:
        length = 40 + ((frame[18] << 8) | frame[19])
    else:
        return None
    if length + 14 > len(frame):
        return None
    return view[14:14 + length]


class DataPlane:
    """Sockets, TAP and maps; implements the router's Outputs."""

    def __init__(self, *, decap: DecapInterface, kernel: KernelSessions,
                 recorder: AuditRecorder, daemon: str = "tunneld") -> None:
        self.decap = decap
        self.kernel = kernel
        self.recorder = recorder
        self.daemon = daemon
        self.router: TunnelRouter | None = None
        self.udp: socket.socket | None = None
        self.xsks: dict[str, XskSocket] = {}
        self.raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.counters = {"udp_rx": 0, "udp_tx": 0, "udp_tx_calls": 0, "xsk_rx": 0,
                         "tap_rx": 0, "decap_tx": 0, "decap_writes": 0, "lan_not_ip": 0}
        self._tick: asyncio.Task[None] | None = None
        self._outbox: list[tuple[bytes, Address]] = []
        self._inbound: list[bytes] = []
        self._batching = False
        self.gso = True

    # -- setup ----------------------------------------------------------------------------

    def open_udp(self, port: int, address: str = "0.0.0.0") -> None:
        """Bind the tunnel port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setblocking(False)
        # Receive side of the same offload: the kernel may hand us several datagrams of
        # one flow in one read, with their size in a control message.
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind UDP {address}:{port}: {exc.strerror}") \
                from exc
        self.udp = sock

    def open_xsk(self, ifname: str, ifindex: int, queue: int = 0) -> None:
        """An AF_XDP socket on a LAN interface, registered in policyd's XSK map."""
        xsk = XskSocket(ifindex, queue)
        xsk.register(self.kernel.fds["xsk_map"], queue)
        self.xsks[ifname] = xsk

    def start(self, router: TunnelRouter) -> None:
        """Register the readers and the timer task on the running loop."""
        self.router = router
        loop = asyncio.get_running_loop()
        assert self.udp is not None
        loop.add_reader(self.udp.fileno(), self._on_udp)
        for xsk in self.xsks.values():
            loop.add_reader(xsk.fileno(), self._on_xsk, xsk)
        loop.add_reader(self.decap.fd, self._on_tap)
        self._tick = asyncio.create_task(self._ticker())

    async def stop(self) -> None:
        """Unregister and close everything (the TAP device itself stays)."""
        loop = asyncio.get_running_loop()
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        if self.udp is not None:
            loop.remove_reader(self.udp.fileno())
            self.udp.close()
            self.udp = None
        for xsk in self.xsks.values():
            loop.remove_reader(xsk.fileno())
            xsk.close()
        self.xsks.clear()
        if self.decap.fd >= 0:
            loop.remove_reader(self.decap.fd)
        self.decap.close()
        self.raw4.close()
        self.raw6.close()
        self.kernel.close()

    # -- readers --------------------------------------------------------------------------

    def _on_udp(self) -> None:
        self._batching = True
        try:
            self._drain_udp()
        finally:
            self._flush()

    def _drain_udp(self) -> None:
        router, sock = self.router, self.udp
        assert router is not None and sock is not None
        for _ in range(BATCH):
            try:
                data, ancillary, _, source = sock.recvmsg(65536, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                log.debug("udp receive error", extra={"errno": exc.errno})
                continue
            size = 0
            for level, kind, value in ancillary:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 2:
                    size = _U16.unpack_from(value)[0]
            if not size or size >= len(data):
                self.counters["udp_rx"] += 1
                router.from_wire(data, source)
                continue
            for offset in range(0, len(data), size):  # coalesced: equal sizes, last shorter
                self.counters["udp_rx"] += 1
                router.from_wire(data[offset:offset + size], source)

    def _on_xsk(self, xsk: XskSocket) -> None:
        router = self.router
        assert router is not None
        frames = xsk.recv(BATCH)
        self.counters["xsk_rx"] += len(frames)
        self._batching = True
        try:
            for frame in frames:
                packet = ip_slice(frame)
                if packet is None:
                    self.counters["lan_not_ip"] += 1
                    continue
                router.from_lan(packet)
        finally:
            self._flush()

    def _on_tap(self) -> None:
        self._batching = True
        try:
            self._drain_tap()
        finally:
            self._flush()

    def _drain_tap(self) -> None:
        router = self.router
        assert router is not None
        for _ in range(BATCH):
            try:
                frame = os.read(self.decap.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.EBADFD:
                    return
                raise
            self.counters["tap_rx"] += 1
            packet = ip_slice(frame[VNET_HDR.size:])
            if packet is not None:
                router.from_lan(packet)

    async def _ticker(self) -> None:
        router = self.router
        assert router is not None
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self._batching = True
            try:
                router.tick()
            except Exception:  # a timer bug must not stop every later timer
                log.exception("timer handling failed")
            finally:
                self._flush()

    # -- Outputs --------------------------------------------------------------------------

    def send_datagram(self, datagram: bytes, endpoint: Address) -> bool:
        """Send one tunnel message (queued to the end of the batch being handled)."""
        if self._batching:
            self._outbox.append((datagram, endpoint))
            return True
        return self._sendto(datagram, endpoint)

    def _sendto(self, datagram: bytes, endpoint: Address) -> bool:
        assert self.udp is not None
        self.counters["udp_tx_calls"] += 1
        try:
            self.udp.sendto(datagram, endpoint)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.debug("udp send error", extra={"errno": exc.errno, "to": endpoint[0]})
            return False
        self.counters["udp_tx"] += 1
        return True

    def _flush(self) -> None:
        """Send the batch's datagrams in order: runs of equal size to one endpoint go as
        one segmented send."""
        self._batching = False
        if self._inbound:
            inbound, self._inbound = self._inbound, []
            self.counters["decap_writes"] += self.decap.write_batch(inbound)
        out, self._outbox = self._outbox, []
        i, n = 0, len(out)
        while i < n:
            first, endpoint = out[i]
            size = len(first)
            j, total = i + 1, size
            if self.gso:
                while (j < n and j - i < GSO_MAX_SEGMENTS and out[j][1] == endpoint
                       and len(out[j][0]) <= size and total + len(out[j][0]) <= GSO_MAX_BYTES):
                    total += len(out[j][0])
                    j += 1
                    if len(out[j - 1][0]) < size:
                        break  # only the last segment may be shorter
            if j - i == 1:
                self._sendto(first, endpoint)
            elif not self._send_segmented([d for d, _ in out[i:j]], size, endpoint):
                for datagram, _ in out[i:j]:
                    self._sendto(datagram, endpoint)
            i = j

    def _send_segmented(self, datagrams: list[bytes], size: int, endpoint: Address) -> bool:
        assert self.udp is not None
        self.counters["udp_tx_calls"] += 1
        try:
            self.udp.sendmsg(datagrams, [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, endpoint)
        except (BlockingIOError, InterruptedError):
            return True  # the socket buffer is full: dropped, as one sendto would be
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EIO, errno.EOPNOTSUPP):
                log.warning("UDP segmentation offload refused; sending one by one",
                            extra={"errno": exc.errno})
                self.gso = False
                return False
            log.debug("udp send error", extra={"errno": exc.errno, "to": endpoint[0]})
            return True
        self.counters["udp_tx"] += len(datagrams)
        return True

    def deliver(self, inner: bytes) -> None:
        """Into the kernel through the TAP (and its TC program); batched like sends."""
        self.counters["decap_tx"] += 1
        if self._batching:
            self._inbound.append(inner)
            return
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self.decap.write(inner)

    def send_icmp(self, packet: bytes, ipv6: bool) -> None:
        """An ICMP error to a LAN host, as the router."""
        try:
            if ipv6:
                dst = str(ipaddress.IPv6Address(packet[24:40]))
                self.raw6.sendto(packet, (dst, 0))
            else:
                dst = str(ipaddress.IPv4Address(packet[16:20]))
                self.raw4.sendto(packet, (dst, 0))
        except OSError as exc:
            log.debug("icmp send error", extra={"errno": exc.errno})

    def sessions_changed(self, live: dict[int, int]) -> None:
        """Keep the kernel's session map equal to the router's keypairs."""
        try:
            self.kernel.set_live(live)
        except OSError as exc:
            log.error("session map update failed", extra={"errno": exc.errno})

    def audit(self, action: str, success: bool, detail: dict[str, object]) -> None:
        """A control-plane record to auditd."""
        self.recorder.record(audit_pb2.ControlEvent(
            daemon=self.daemon, action=action, actor="tunneld", success=success,
            detail_json=json.dumps(detail, sort_keys=True)))
