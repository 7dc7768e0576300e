"""The router's tunnel table: every peer's session, the index table, and the packet paths.

:class:`TunnelRouter` is the layer between the sans-IO :class:`PeerSession` (one per peer)
and the sockets. It is driven by three inputs and a clock:

- :meth:`from_wire`: a UDP datagram from the underlay. Data messages and handshake
  responses go to the session that owns the receiver index. Initiations and finishes are
  answered here, because Noise XX reveals the initiator's identity only in message 3: the
  router keeps the half-done responder handshakes, and hands the keypair to the peer whose
  static key message 3 carried.
- :meth:`from_lan`: an inner packet to send: routed by destination prefix to a peer
  (cryptokey routing), MSS clamped, sized against the inner MTU (ICMP too-big or IPv4
  fragmentation, never truncation), then encrypted.
- :meth:`tick`: the sessions' timers.

Its outputs go through :class:`Outputs`: datagrams to an endpoint, inner packets to the
decap interface, ICMP errors to the LAN, the kernel's session map, and audit records.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vpnr.tunneld import errors, messages, packets
from vpnr.tunneld.constants import (
    MESSAGE_COOKIE_REPLY,
    MESSAGE_DATA,
    MESSAGE_FINISH,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    Timers,
)
from vpnr.tunneld.errors import RemoteProtocolError
from vpnr.tunneld.handshake import KeyStatus, ResponderHandshake
from vpnr.tunneld.keys import StaticKeys, b64
from vpnr.tunneld.peers import PeerDef
from vpnr.tunneld.session import (
    DataReceived,
    HandshakeCompleted,
    HandshakeGaveUp,
    PeerSession,
    SessionExpired,
    SessionRevoked,
)

log = logging.getLogger("vpnr.tunneld.router")

Address = tuple[str, int]
MAX_PENDING = 4096  # half-done responder handshakes kept; the oldest goes first
PENDING_LIFETIME = 15.0  # seconds a responder waits for message 3
REFUSAL_AUDIT_INTERVAL = 10.0  # one audit record per refused key per this many seconds

# Router-level drop reasons, besides the protocol ones of errors.py.
NO_ROUTE = "no_route"  # inner packet to a destination no peer announces
NO_ENDPOINT = "no_endpoint"  # a peer with no known endpoint yet
INNER_SOURCE = "inner_source_not_allowed"  # decrypted packet from outside the peer's prefixes
INNER_MALFORMED = "inner_malformed"  # not an IPv4/IPv6 packet
TOO_BIG = "too_big"  # oversize with DF (IPv4) or IPv6: answered with ICMP
UNDER_LOAD = "cookie_required"  # initiation without a valid cookie while under load
SEND_FAILED = "send_failed"  # the UDP socket refused a datagram
ROUTER_REASONS = (NO_ROUTE, NO_ENDPOINT, INNER_SOURCE, INNER_MALFORMED, TOO_BIG, UNDER_LOAD,
                  SEND_FAILED)
PEER_STATES = ("idle", "handshaking", "established", "unreachable", "revoked")


class Outputs(Protocol):
    """Where the router's results go (sockets, TAP, kernel map, auditd)."""

    def send_datagram(self, datagram: bytes, endpoint: Address) -> bool:
        """Send one tunnel message; False when the socket refused it."""

    def deliver(self, inner: bytes) -> None:
        """Hand a decrypted inner packet to the kernel."""

    def send_icmp(self, packet: bytes, ipv6: bool) -> None:
        """Send an ICMP error packet (full IP packet) towards the LAN."""

    def sessions_changed(self, live: dict[int, int]) -> None:
        """The receiver indexes data may arrive for, index -> peer id."""

    def audit(self, action: str, success: bool, detail: dict[str, object]) -> None:
        """A control-plane audit record."""


@dataclass
class Peer:
    """One configured peer at run time."""

    defn: PeerDef
    peer_id: int
    session: PeerSession
    endpoint: Address | None
    routes: list[tuple[int, int, int]] = field(default_factory=list)  # (version, net, mask)
    last_handshake: float = 0.0  # wall clock
    state: str = "idle"
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    synced_epoch: int = -1
    indexes: frozenset[int] = frozenset()
    data_indexes: frozenset[int] = frozenset()
    responder_static: bytes = field(default=b"", repr=False)  # our key its last handshake used


def _routes(defn: PeerDef) -> list[tuple[int, int, int]]:
    return [(net.version, int(net.network_address), int(net.netmask)) for net in defn.prefixes]


@dataclass
class Pending:
    """A responder handshake waiting for message 3."""

    handshake: ResponderHandshake
    source: Address
    static_private: bytes


class TunnelRouter:
    """Peers, sessions and the packet paths between the LAN, the TAP and the underlay."""

    def __init__(self, *, keys: StaticKeys, outputs: Outputs, timers: Timers | None = None,
                 inner_mtu: int = 1440, router_ip4: bytes = b"", router_ip6: bytes = b"",
                 cookie_threshold: int = 64, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.keys = keys
        self.out = outputs
        self.timers = timers or Timers()
        self.inner_mtu = inner_mtu
        self.router_ip4, self.router_ip6 = router_ip4, router_ip6
        self.cookie_threshold = cookie_threshold
        self.clock = clock
        self.peers: dict[str, Peer] = {}
        self.revoked: dict[bytes, str] = {}  # static key -> peer it belonged to
        self.drops: Counter[str] = Counter()
        self.handshakes_completed = 0
        self.handshakes_given_up = 0  # HandshakeGaveUp events (REKEY_ATTEMPT_TIME ran out)
        self._rng = rng or random.SystemRandom()
        self._by_static: dict[bytes, Peer] = {}
        self._owner: dict[int, Peer] = {}
        self._pending: OrderedDict[int, Pending] = OrderedDict()
        self._route_table: list[tuple[int, int, int, int, Peer]] = []  # sorted, longest first
        self._route_cache: dict[bytes, Peer | None] = {}
        self._next_peer_id = 1
        self._cookie_secret = self._rng.getrandbits(256).to_bytes(32, "little")
        self._cookie_secret_at = clock()
        self._refusals: dict[bytes, float] = {}
        self._live: dict[int, int] = {}

    # -- peers ----------------------------------------------------------------------------

    def is_known(self, static: bytes) -> KeyStatus:
        """The handshake's check of a remote static key."""
        if static in self.revoked:
            return "revoked"
        peer = self._by_static.get(static)
        if peer is None:
            return "unknown"
        return "revoked" if peer.defn.revoked else "ok"

    def add_peer(self, defn: PeerDef) -> Peer:
        """Add or replace a peer; an unchanged key keeps its sessions."""
        old = self.peers.get(defn.name)
        if old is not None and old.defn.public_key == defn.public_key and not defn.revoked:
            old.defn = defn
            old.routes = _routes(defn)
            if defn.endpoint is not None:
                old.endpoint = defn.endpoint
            old.session.persistent_keepalive = float(defn.keepalive_seconds)
            self._rebuild_routes()
            return old
        if old is not None:
            self.remove_peer(defn.name)
        previous = self.keys.previous_active()
        session = PeerSession(static_private=self.keys.private, peer_static=defn.public_key,
                              is_known=self.is_known, random_source=self._rng,
                              timers=self.timers,
                              persistent_keepalive=float(defn.keepalive_seconds),
                              allocate_index=self._allocate_index)
        session.fallback_static = previous
        peer = Peer(defn=defn, peer_id=self._next_peer_id, session=session,
                    endpoint=defn.endpoint, routes=_routes(defn))
        self._next_peer_id += 1
        if defn.revoked:
            session.revoke()
            peer.state = "revoked"
        self.peers[defn.name] = peer
        self._by_static[defn.public_key] = peer
        self._rebuild_routes()
        return peer

    def remove_peer(self, name: str) -> Peer | None:
        """Forget a peer and every index of its sessions."""
        peer = self.peers.pop(name, None)
        if peer is None:
            return None
        self._by_static.pop(peer.defn.public_key, None)
        peer.session.revoke()
        peer.session.next_event()
        for index in peer.indexes:
            self._owner.pop(index, None)
        peer.indexes = peer.data_indexes = frozenset()
        self._rebuild_routes()
        self._publish_live()
        return peer

    def revoke_peer(self, name: str, reason: str) -> Peer | None:
        """Refuse the peer's key from now on and tear its sessions down at once."""
        peer = self.peers.get(name)
        if peer is None:
            return None
        self.revoked[peer.defn.public_key] = name
        peer.session.revoke()
        peer.state = "revoked"
        self._drain(peer)
        self.out.audit("tunnel.peer.revoked", True, {"peer": name, "reason": reason,
                                                     "public_key": peer.defn.public_key_b64})
        return peer

    def use_static_keys(self) -> None:
        """After a rotation: every session starts its next handshake with the new key."""
        previous = self.keys.previous_active()
        for peer in self.peers.values():
            peer.session.set_static(self.keys.private, previous)

    def _rebuild_routes(self) -> None:
        table = []
        for peer in self.peers.values():
            for prefix, (version, net, mask) in zip(peer.defn.prefixes, peer.routes,
                                                    strict=True):
                table.append((prefix.prefixlen, version, net, mask, peer))
        table.sort(key=lambda row: -row[0])
        self._route_table = table
        self._route_cache.clear()

    def _allocate_index(self) -> int:
        while True:
            index = self._rng.getrandbits(32)
            if index not in self._owner and index not in self._pending:
                return index

    def route(self, dst: bytes) -> Peer | None:
        """The peer announcing the longest prefix containing ``dst``."""
        if dst in self._route_cache:
            return self._route_cache[dst]
        version, value = (4 if len(dst) == 4 else 6), int.from_bytes(dst, "big")
        found = None
        for _, v, net, mask, peer in self._route_table:
            if v == version and value & mask == net:
                found = peer
                break
        if len(self._route_cache) > 65536:
            self._route_cache.clear()
        self._route_cache[dst] = found
        return found

    # -- outbound -------------------------------------------------------------------------

    def from_lan(self, packet: bytes | bytearray | memoryview) -> None:
        """An inner IP packet (no Ethernet header) to carry to the peer behind its
        destination. The hot path: one route lookup, one AEAD seal, one send."""
        version = packet[0] >> 4 if len(packet) >= 20 else 0
        if version == 4:
            dst, proto, l4 = bytes(packet[16:20]), packet[9], (packet[0] & 15) * 4
        elif version == 6 and len(packet) >= 40:
            dst, proto, l4 = bytes(packet[24:40]), packet[6], 40
        else:
            self.drops[INNER_MALFORMED] += 1
            return
        peer = self.route(dst)
        if peer is None:
            self.drops[NO_ROUTE] += 1
            return
        now = self.clock()
        if len(packet) > self.inner_mtu:
            self._oversize(bytes(packet), version, peer, now)
            return
        if proto == 6 and len(packet) > l4 + 13 and packet[l4 + 13] & 0x02:  # TCP SYN
            packet = bytearray(packet)
            packets.clamp_mss(packet, 0, packets.mss_for(self.inner_mtu, version == 6))
        self._send(peer, packet, now)

    def _oversize(self, packet: bytes, version: int, peer: Peer, now: float) -> None:
        if version == 4 and not packet[6] & 0x40:  # DF clear: a router fragments
            for fragment in packets.fragment_ipv4(packet, self.inner_mtu):
                self._send(peer, fragment, now)
            return
        self.drops[TOO_BIG] += 1
        if version == 4:
            icmp = packets.icmp4_frag_needed(packet, self.inner_mtu, self.router_ip4) \
                if self.router_ip4 else None
        else:
            icmp = packets.icmp6_packet_too_big(packet, self.inner_mtu, self.router_ip6) \
                if self.router_ip6 else None
        if icmp is not None:
            self.out.send_icmp(icmp, version == 6)

    def _send(self, peer: Peer, inner: bytes | bytearray | memoryview, now: float) -> None:
        session = peer.session
        peer.tx_packets += 1
        peer.tx_bytes += len(inner)
        datagram = session.seal(inner, now)
        if datagram is None:
            session.send(bytes(inner), now)  # queued until a handshake completes
        elif peer.endpoint is None:
            self.drops[NO_ENDPOINT] += 1
        elif not self.out.send_datagram(datagram, peer.endpoint):
            self.drops[SEND_FAILED] += 1
        if session.has_output or session.index_epoch != peer.synced_epoch:
            self._drain(peer)

    # -- inbound --------------------------------------------------------------------------

    def from_wire(self, datagram: bytes, source: Address) -> None:
        """One UDP datagram from the underlay."""
        if len(datagram) < 8:
            self.drops[errors.SHORT] += 1
            return
        kind = datagram[0]
        try:
            if kind == MESSAGE_DATA:
                peer = self._owner.get(int.from_bytes(datagram[4:8], "little"))
                if peer is None:
                    raise RemoteProtocolError(errors.UNKNOWN_INDEX)
                session = peer.session
                inner = session.open_data(datagram, self.clock())
                if inner:
                    self._deliver(peer, inner)
                if session.has_output or session.index_epoch != peer.synced_epoch:
                    self._drain(peer, source)
            elif kind == MESSAGE_INITIATION:
                self._initiation(datagram, source)
            elif kind == MESSAGE_FINISH:
                self._finish(datagram, source)
            elif kind in (MESSAGE_RESPONSE, MESSAGE_COOKIE_REPLY):
                answer = messages.parse_response(datagram) if kind == MESSAGE_RESPONSE \
                    else messages.parse_cookie_reply(datagram)
                peer = self._owner.get(answer.receiver_index)
                if peer is None:
                    raise RemoteProtocolError(errors.UNKNOWN_INDEX)
                self._from_peer(peer, datagram, source)
            else:
                raise RemoteProtocolError(errors.BAD_TYPE, str(kind))
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1

    def _from_peer(self, peer: Peer, datagram: bytes, source: Address) -> None:
        """A handshake response or cookie reply for a handshake the peer's session
        started."""
        session = peer.session
        before = sum(session.drops.values())
        session.receive(datagram, self.clock())
        if sum(session.drops.values()) == before:
            peer.endpoint = source  # an authenticated handshake message: the peer is here
        self._drain(peer, source)

    def _initiation(self, datagram: bytes, source: Address) -> None:
        message = messages.parse_initiation(datagram)
        now = self.clock()
        if len(self._pending) >= self.cookie_threshold:
            self._rotate_cookie_secret(now)
            address = _source_bytes(source)
            if not messages.initiation_has_cookie(datagram, self._cookie_secret, address):
                reply = messages.CookieReply(message.sender_index,
                                             messages.make_cookie(self._cookie_secret, address))
                self.out.send_datagram(messages.encode_cookie_reply(reply), source)
                raise RemoteProtocolError(UNDER_LOAD, f"{source[0]}:{source[1]}")
        static = self._static_for(source)
        index = self._allocate_index()
        handshake = ResponderHandshake(static, index, self.is_known, message, now)
        while len(self._pending) >= MAX_PENDING:
            self._pending.popitem(last=False)
        self._pending[index] = Pending(handshake, source, static)
        self.out.send_datagram(messages.encode_response(handshake.response), source)

    def _static_for(self, source: Address) -> bytes:
        """Responder's static key: during a rotation's overlap, the key the peer at this
        endpoint last completed a handshake with."""
        previous = self.keys.previous_active()
        if previous is None:
            return self.keys.private
        for peer in self.peers.values():
            if peer.endpoint == source and peer.responder_static == previous:
                return previous
        return self.keys.private

    def _finish(self, datagram: bytes, source: Address) -> None:
        message = messages.parse_finish(datagram)
        pending = self._pending.pop(message.receiver_index, None)
        if pending is None:
            raise RemoteProtocolError(errors.UNKNOWN_INDEX, f"finish to {message.receiver_index}")
        now = self.clock()
        try:
            keypair = pending.handshake.read_finish(message, now)
        except RemoteProtocolError as exc:
            if exc.reason in (errors.UNKNOWN_STATIC_KEY, errors.REVOKED_STATIC_KEY):
                self._refused(exc, source, now)
            raise
        peer = self._by_static[keypair.remote_static]
        peer.session.accept_responder_keypair(keypair, now)
        peer.endpoint = source
        peer.responder_static = pending.static_private
        self._drain(peer, source)

    def _refused(self, exc: RemoteProtocolError, source: Address, now: float) -> None:
        key = bytes.fromhex(exc.detail) if exc.detail else b""
        if now - self._refusals.get(key, -1e9) < REFUSAL_AUDIT_INTERVAL:
            return
        self._refusals[key] = now
        if len(self._refusals) > 4096:
            self._refusals.clear()
        self.out.audit("tunnel.handshake.refused", False, {
            "reason": exc.reason, "public_key": b64(key) if len(key) == 32 else "",
            "peer": self.revoked.get(key, ""), "source": f"{source[0]}:{source[1]}"})

    def _rotate_cookie_secret(self, now: float) -> None:
        if now - self._cookie_secret_at >= 120.0:
            self._cookie_secret = self._rng.getrandbits(256).to_bytes(32, "little")
            self._cookie_secret_at = now

    # -- timers ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Run the timers that are due, and forget stale responder handshakes."""
        now = self.clock()
        for peer in list(self.peers.values()):
            deadline = peer.session.get_timer()
            if deadline is not None and deadline <= now:
                peer.session.handle_timer(now)
                self._drain(peer)
        while self._pending:
            index, pending = next(iter(self._pending.items()))
            if now - pending.handshake.started_at < PENDING_LIFETIME:
                break
            del self._pending[index]

    def initiate(self, peer: Peer) -> None:
        """Start a handshake now (CreateSession, RotateSession, start-up)."""
        peer.session.initiate(self.clock())
        self._drain(peer)

    # -- session output -------------------------------------------------------------------

    def _drain(self, peer: Peer, source: Address | None = None) -> None:
        """Publish index changes, then send what the session wrote, then act on events.

        The kernel learns a new keypair's index before the message that lets the peer use
        it leaves, so no data message is dropped for an index it has not heard of yet."""
        session = peer.session
        if session.index_epoch != peer.synced_epoch:
            self._sync_indexes(peer)
        datagrams = session.datagrams_to_send()
        if datagrams:
            endpoint = peer.endpoint or source
            if endpoint is None:
                self.drops[NO_ENDPOINT] += len(datagrams)
            else:
                for datagram in datagrams:
                    if not self.out.send_datagram(datagram, endpoint):
                        self.drops[SEND_FAILED] += 1
        event = session.next_event()
        while event is not None:
            if isinstance(event, DataReceived):
                self._deliver(peer, event.inner)
            elif isinstance(event, HandshakeCompleted):
                peer.last_handshake = time.time()
                peer.state = "established"
                self.handshakes_completed += 1
            elif isinstance(event, SessionExpired):
                if session.current is None:
                    peer.state = "idle"
            elif isinstance(event, HandshakeGaveUp):
                peer.state = "unreachable"
                self.handshakes_given_up += 1
                log.warning("handshake gave up", extra={"peer": peer.defn.name,
                                                        "dropped": event.dropped_packets})
            elif isinstance(event, SessionRevoked):
                peer.state = "revoked"
            event = session.next_event()
        if peer.state in ("idle", "unreachable") and session.handshaking:
            peer.state = "handshaking"

    def _deliver(self, peer: Peer, inner: bytes) -> None:
        """Cryptokey routing, inbound: the inner source must be behind this peer."""
        version = inner[0] >> 4
        if version == 4 and len(inner) >= 20:
            value = int.from_bytes(inner[12:16], "big")
        elif version == 6 and len(inner) >= 40:
            value = int.from_bytes(inner[8:24], "big")
        else:
            self.drops[INNER_MALFORMED] += 1
            return
        for v, net, mask in peer.routes:
            if v == version and value & mask == net:
                break
        else:
            self.drops[INNER_SOURCE] += 1
            return
        peer.rx_packets += 1
        peer.rx_bytes += len(inner)
        self.out.deliver(inner)

    def _sync_indexes(self, peer: Peer) -> None:
        session = peer.session
        indexes = frozenset(session.local_indexes())
        for index in peer.indexes - indexes:
            if self._owner.get(index) is peer:
                del self._owner[index]
        for index in indexes:
            self._owner[index] = peer
        peer.indexes = indexes
        peer.synced_epoch = session.index_epoch
        data = frozenset(session.keypair_indexes())
        if data != peer.data_indexes:
            peer.data_indexes = data
            self._publish_live()

    def _publish_live(self) -> None:
        live = {index: peer.peer_id for peer in self.peers.values()
                for index in peer.data_indexes}
        if live != self._live:
            self._live = live
            self.out.sessions_changed(live)

    # -- reading --------------------------------------------------------------------------

    def drops_by_reason(self) -> dict[str, int]:
        """Router and session drops together."""
        total: Counter[str] = Counter(self.drops)
        for peer in self.peers.values():
            total.update(peer.session.drops)
        return dict(total)

    def sessions(self) -> Iterable[Peer]:
        """Peers with at least one keypair."""
        return [p for p in self.peers.values() if p.session.keypairs()]


def _source_bytes(source: Address) -> bytes:
    address = ipaddress.ip_address(source[0])
    return address.packed + source[1].to_bytes(2, "big")


class TunnelCollector(Collector):
    """Prometheus view of the tunnel table and the data path, read at scrape time."""

    def __init__(self, router: TunnelRouter, datapath: Callable[[], dict[str, int]]) -> None:
        self.router = router
        self.datapath = datapath

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        """Handshakes, drops by reason, peers by state, traffic per peer, data-path counters."""
        router = self.router
        yield CounterMetricFamily("vpnr_tunnel_handshakes_completed",
                                  "Noise handshakes completed (either side initiated)",
                                  value=router.handshakes_completed)
        yield CounterMetricFamily("vpnr_tunnel_handshakes_given_up",
                                  "Handshake attempts abandoned after retrying for "
                                  "REKEY_ATTEMPT_TIME (peer unreachable or refusing us)",
                                  value=router.handshakes_given_up)
        drops = CounterMetricFamily("vpnr_tunnel_drops",
                                    "Datagrams and inner packets dropped, by reason",
                                    labels=["reason"])
        counted = dict.fromkeys((*errors.REASONS, *ROUTER_REASONS), 0)
        counted.update(router.drops_by_reason())
        for reason, count in sorted(counted.items()):
            drops.add_metric([reason], count)
        yield drops
        states = GaugeMetricFamily("vpnr_tunnel_peers", "Configured peers by state",
                                   labels=["state"])
        by_state = dict.fromkeys(PEER_STATES, 0)
        for peer in router.peers.values():
            by_state[peer.state] = by_state.get(peer.state, 0) + 1
        for state, count in by_state.items():
            states.add_metric([state], count)
        yield states
        labels = ["peer"]
        established = GaugeMetricFamily("vpnr_tunnel_peer_established",
                                        "1 when the peer has a session in use", labels=labels)
        last = GaugeMetricFamily("vpnr_tunnel_peer_last_handshake_timestamp_seconds",
                                 "Unix time of the peer's last completed handshake "
                                 "(0: none since start)", labels=labels)
        traffic = {
            "rx_bytes": CounterMetricFamily("vpnr_tunnel_peer_received_bytes",
                                            "Inner bytes received from the peer", labels=labels),
            "tx_bytes": CounterMetricFamily("vpnr_tunnel_peer_sent_bytes",
                                            "Inner bytes sent to the peer", labels=labels),
            "rx_packets": CounterMetricFamily("vpnr_tunnel_peer_received_packets",
                                              "Inner packets received from the peer",
                                              labels=labels),
            "tx_packets": CounterMetricFamily("vpnr_tunnel_peer_sent_packets",
                                              "Inner packets sent to the peer", labels=labels),
        }
        for name, peer in sorted(router.peers.items()):
            established.add_metric([name], float(peer.state == "established"))
            last.add_metric([name], peer.last_handshake)
            for attribute, family in traffic.items():
                family.add_metric([name], getattr(peer, attribute))
        yield established
        yield last
        yield from traffic.values()
        datapath = CounterMetricFamily("vpnr_tunnel_datapath_events",
                                       "Data-path counters: UDP and AF_XDP socket events, "
                                       "decap writes and errors", labels=["counter"])
        free = GaugeMetricFamily("vpnr_tunnel_xsk_tx_free_frames",
                                 "Free TX frames of each AF_XDP socket's UMEM",
                                 labels=["interface"])
        for counter, count in sorted(self.datapath().items()):
            if counter.startswith("xsk_") and counter.endswith("_tx_free_frames"):
                free.add_metric([counter[len("xsk_"):-len("_tx_free_frames")]], count)
            else:
                datapath.add_metric([counter], count)
        yield from (datapath, free)
