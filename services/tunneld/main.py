"""tunneld: Noise XX tunnels between site routers and the AF_XDP AEAD data path."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from pyroute2 import IPRoute

from vpnr.core import preflight
from vpnr.core.auditrec import AuditRecorder
from vpnr.core.daemon import DaemonApp, Runtime, StartupError, run_daemon
from vpnr.tunneld import packets
from vpnr.tunneld.constants import Timers
from vpnr.tunneld.dataplane import DataPlane, KernelSessions
from vpnr.tunneld.decap import DecapError, DecapInterface
from vpnr.tunneld.keys import KeyFileError, StaticKeys, b64
from vpnr.tunneld.peers import PeerDef, PeerError, PeerStore, check_conflicts, make_peer
from vpnr.tunneld.probe import KernelProbeResult, choose_datapath, probe_kernel
from vpnr.tunneld.router import Peer, TunnelCollector, TunnelRouter
from vpnr.tunneld.service import TunnelServicer, revoked_copy
from vpnr.v1 import audit_pb2, tunnel_pb2, tunnel_pb2_grpc

log = logging.getLogger("vpnr.tunneld")


class Tunneld(DaemonApp):
    """The tunnel daemon."""

    name = "tunneld"
    service_names = (tunnel_pb2.DESCRIPTOR.services_by_name["TunnelService"].full_name,)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.probe: KernelProbeResult | None = None
        self.mode = ""
        self.mode_reason = ""
        self.router: TunnelRouter | None = None
        self.dataplane: DataPlane | None = None
        self.store: PeerStore | None = None
        self.warnings: list[str] = []
        self.inner_mtu = 0
        self.lan_names: list[str] = []
        self.audit = AuditRecorder(self.config.router.socket_path("auditd"))

    def _path(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self.config.router.state_path / path

    async def start(self) -> None:
        """Probe, load the key and peers, open the data path, then start handshakes; a
        failure releases what was opened (the store's thread would keep the process)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        preflight.require(self.name, ("kernel", "bpf", "bpffs", "btf", "headers"))
        cfg = self.config.tunneld
        if cfg.reject_after_seconds <= cfg.rekey_after_seconds:
            raise StartupError("tunneld.reject_after_seconds must be greater than "
                               "tunneld.rekey_after_seconds")
        cache = self.config.router.state_path / "tunneld" / "probe-cache"
        try:
            cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            cache = None  # type: ignore[assignment]
            log.warning("probe cache unavailable; compiling the probe each start")
        self.probe = await asyncio.to_thread(probe_kernel, cache)
        self.mode, self.mode_reason = choose_datapath(self.probe)
        log.info("data path chosen", extra={
            "mode": self.mode, "reason": self.mode_reason, "pid": os.getpid(),
            "accepted": self.probe.ciphers_accepted, "refused": self.probe.ciphers_refused})
        if not self.probe.af_xdp:
            raise StartupError("AF_XDP sockets are not available in this kernel: tunneld "
                               "cannot receive the LAN's VPN traffic (" + self.mode_reason + ")")
        try:
            keys = StaticKeys.load_or_create(self._path(cfg.static_key_file))
        except KeyFileError as exc:
            raise StartupError(str(exc)) from exc
        log.info("static key loaded", extra={"public_key": b64(keys.public)})
        try:
            self.store = await PeerStore.open(self._path(cfg.peer_database))
            definitions = await self._merge_config_peers()
            revoked = await self.store.revoked_keys()
        except PeerError as exc:
            raise StartupError(f"tunneld peers: {exc}") from exc
        self.lan_names = self._lan_interfaces()
        await asyncio.to_thread(self._open_dataplane)
        assert self.dataplane is not None
        timers = Timers(rekey_after_time=cfg.rekey_after_seconds,
                        reject_after_time=cfg.reject_after_seconds,
                        rekey_after_messages=cfg.rekey_after_messages)
        router_ip4, router_ip6 = await asyncio.to_thread(self._lan_addresses)
        self.router = TunnelRouter(keys=keys, outputs=self.dataplane, timers=timers,
                                   inner_mtu=self.inner_mtu, router_ip4=router_ip4,
                                   router_ip6=router_ip6,
                                   cookie_threshold=cfg.cookie_threshold)
        self.router.revoked.update(revoked)
        for defn in definitions:
            self.router.add_peer(defn)
        await asyncio.to_thread(self.dataplane.decap.route,
                                [str(p) for d in definitions for p in d.prefixes])
        self.dataplane.start(self.router)
        self.runtime.registry.register(TunnelCollector(self.router, self.datapath_counters))
        # Handshakes now, not at the first packet: after a restart the peers' old sessions
        # are gone on our side, and both directions come back within one round trip.
        for peer in self.router.peers.values():
            if peer.endpoint is not None and peer.state != "revoked":
                self.router.initiate(peer)

    async def _merge_config_peers(self) -> list[PeerDef]:
        """Peers of the config file win over stored ones of the same name, except that a
        stored revocation stands."""
        assert self.store is not None
        stored = {p.name: p for p in await self.store.load()}
        for item in self.config.tunneld.peers:
            defn = make_peer(item.name, item.public_key, item.endpoint,
                             list(item.allowed_prefixes), item.keepalive_seconds)
            old = stored.get(defn.name)
            if old is not None and old.revoked and old.public_key == defn.public_key:
                continue
            if old != defn:
                await self.store.put(defn)
                stored[defn.name] = defn
        definitions = list(stored.values())
        for defn in definitions:
            check_conflicts(defn, definitions)
        return definitions

    def _open_dataplane(self) -> None:
        cfg, router_cfg = self.config.tunneld, self.config.router
        try:
            kernel = KernelSessions(router_cfg.pin_dir)
        except FileNotFoundError as exc:
            raise StartupError(str(exc)) from exc
        kernel.reset(cfg.handshake_rate, cfg.handshake_burst)
        wan_mtu = cfg.wan_mtu or self._interface_mtu(cfg.wan_interface)
        self.inner_mtu = packets.inner_mtu(wan_mtu)
        decap = DecapInterface(cfg.decap_interface)
        try:
            decap.open(self.inner_mtu)
            decap.attach_program(router_cfg.pin_dir, self.config.policyd.audit_ring_mib << 20)
        except DecapError as exc:
            kernel.close()
            raise StartupError(str(exc)) from exc
        dataplane = DataPlane(decap=decap, kernel=kernel, recorder=self.audit)
        try:
            dataplane.open_udp(cfg.listen_port)
            with IPRoute() as ipr:
                for name in self.lan_names:
                    found = ipr.link_lookup(ifname=name)
                    if not found:
                        raise StartupError(f"tunneld.lan_interfaces: {name!r} does not exist")
                    dataplane.open_xsk(name, int(found[0]))
        except OSError as exc:
            raise StartupError(f"tunneld data path: {exc}") from exc
        self.dataplane = dataplane

    def _lan_interfaces(self) -> list[str]:
        named = list(self.config.tunneld.lan_interfaces)
        if not named:
            named = [i.name for i in self.config.policyd.interfaces if i.zone == "internal"]
        if len(named) > 1:
            # policyd's XSK map is indexed by receive queue, shared by every interface.
            self.warnings.append(f"only {named[0]} is served: one LAN interface per router "
                                 f"(configured: {', '.join(named)})")
        return named[:1]

    def _interface_mtu(self, name: str) -> int:
        if not name:
            return 1500
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise StartupError(f"tunneld.wan_interface: {name!r} does not exist")
            return int(ipr.get_links(found[0])[0].get_attr("IFLA_MTU"))

    def _lan_addresses(self) -> tuple[bytes, bytes]:
        """The router's first IPv4 and IPv6 (global) address on the LAN: ICMP errors'
        source."""
        v4 = v6 = b""
        with IPRoute() as ipr:
            for name in self.lan_names:
                found = ipr.link_lookup(ifname=name)
                for addr in ipr.get_addr(index=found[0]) if found else []:
                    ip = ipaddress.ip_address(addr.get_attr("IFA_ADDRESS"))
                    if ip.version == 4 and not v4:
                        v4 = ip.packed
                    elif ip.version == 6 and not v6 and not ip.is_link_local:
                        v6 = ip.packed
        return v4, v6

    async def stop(self) -> None:
        """Close sockets (the kernel drops the XSK from policyd's map) and the store."""
        if self.dataplane is not None:
            await self.dataplane.stop()
        if self.store is not None:
            await self.store.close()
        await self.audit.close()

    def register(self, server: grpc.aio.Server) -> None:
        """Add the TunnelService servicer."""
        tunnel_pb2_grpc.add_TunnelServiceServicer_to_server(TunnelServicer(self), server)

    # -- used by the service --------------------------------------------------------------

    def probe_message(self) -> tunnel_pb2.KernelProbe:
        """The probe result as the API reports it."""
        result = self.probe
        assert result is not None
        return tunnel_pb2.KernelProbe(
            af_xdp=result.af_xdp, bpf_crypto_kfuncs=result.bpf_crypto_kfuncs,
            kfunc_ciphers_accepted=result.ciphers_accepted,
            kfunc_ciphers_refused=result.ciphers_refused, probe_method=result.method,
            kernel_release=result.kernel_release, notes=result.notes)

    def datapath_counters(self) -> dict[str, int]:
        """Packet counters of the sockets and the AF_XDP rings."""
        assert self.dataplane is not None
        counters = dict(self.dataplane.counters)
        for name, count in self.dataplane.decap.write_errors.items():
            counters[f"decap_write_error_{name}"] = count
        for name, xsk in self.dataplane.xsks.items():
            for key, value in xsk.stats().items():
                counters[f"xsk_{name}_{key}"] = value
        return counters

    def _record(self, action: str, detail: dict[str, object]) -> None:
        self.audit.record(audit_pb2.ControlEvent(
            daemon=self.name, action=action, actor="tunneld-api", success=True,
            detail_json=json.dumps(detail, sort_keys=True)))

    async def put_peer(self, defn: PeerDef, action: str) -> Peer:
        """Store first, then apply: a crash in between loses nothing already accepted."""
        assert self.store is not None and self.router is not None
        assert self.dataplane is not None
        old = self.router.peers.get(defn.name)
        await self.store.put(defn)
        if old is not None:
            await asyncio.to_thread(self.dataplane.decap.unroute,
                                    [str(p) for p in old.defn.prefixes])
        peer = self.router.add_peer(defn)
        await asyncio.to_thread(self.dataplane.decap.route, [str(p) for p in defn.prefixes])
        self._record(action, {"peer": defn.name, "public_key": defn.public_key_b64,
                              "endpoint": defn.endpoint_text,
                              "allowed_prefixes": [str(p) for p in defn.prefixes]})
        if peer.endpoint is not None and peer.session.current is None:
            self.router.initiate(peer)
        return peer

    async def delete_peer(self, name: str) -> None:
        """Forget a peer and its routes (a revocation stays on record)."""
        assert self.store is not None and self.router is not None
        assert self.dataplane is not None
        await self.store.delete(name)
        peer = self.router.remove_peer(name)
        if peer is not None:
            await asyncio.to_thread(self.dataplane.decap.unroute,
                                    [str(p) for p in peer.defn.prefixes])
        self._record("tunnel.peer.removed", {"peer": name})

    async def revoke_peer(self, peer: Peer, reason: str) -> None:
        """Persist the revocation, then tear down."""
        assert self.store is not None and self.router is not None
        peer.defn = revoked_copy(peer.defn, reason)
        await self.store.put(peer.defn)
        self.router.revoke_peer(peer.defn.name, reason)

    async def reset_session(self, peer: Peer) -> None:
        """DeleteSession: drop the peer's keys now; traffic starts a new handshake."""
        assert self.router is not None
        defn = peer.defn
        self.router.remove_peer(defn.name)
        self.router.add_peer(defn)
        self._record("tunnel.session.deleted", {"peer": defn.name})

    async def rotate_static_key(self, overlap_seconds: int) -> tuple[bytes, float]:
        """New static key; the previous one answers for ``overlap_seconds``."""
        assert self.router is not None
        keys = self.router.keys
        previous = keys.public
        await asyncio.to_thread(keys.rotate, float(overlap_seconds))
        self.router.use_static_keys()
        self._record("tunnel.static_key.rotated", {
            "new_public_key": b64(keys.public), "previous_public_key": b64(previous),
            "overlap_seconds": overlap_seconds})
        return previous, time.time() + overlap_seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    return run_daemon(Tunneld, argv)
