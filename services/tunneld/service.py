"""TunnelService: the gRPC layer over tunneld's router (peers, sessions, keys, status)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import grpc

from vpnr.core import paging
from vpnr.core.daemon import Context, abort, unix_timestamp
from vpnr.tunneld.keys import b64
from vpnr.tunneld.peers import PeerDef, PeerError, check_conflicts, make_peer
from vpnr.tunneld.router import Peer
from vpnr.v1 import tunnel_pb2, tunnel_pb2_grpc

if TYPE_CHECKING:
    from vpnr.tunneld.main import Tunneld

STATES = {"idle": tunnel_pb2.PEER_STATE_IDLE, "handshaking": tunnel_pb2.PEER_STATE_HANDSHAKING,
          "established": tunnel_pb2.PEER_STATE_ESTABLISHED,
          "revoked": tunnel_pb2.PEER_STATE_REVOKED,
          "unreachable": tunnel_pb2.PEER_STATE_UNREACHABLE}
SLOTS = {"current": tunnel_pb2.KEYPAIR_SLOT_CURRENT, "previous": tunnel_pb2.KEYPAIR_SLOT_PREVIOUS,
         "next": tunnel_pb2.KEYPAIR_SLOT_NEXT}
MAX_OVERLAP_SECONDS = 30 * 86400


def peer_message(peer: Peer) -> tunnel_pb2.Peer:
    """A peer as the API shows it (its public key only)."""
    defn = peer.defn
    message = tunnel_pb2.Peer(
        name=defn.name, public_key=defn.public_key_b64, endpoint=defn.endpoint_text,
        allowed_prefixes=[str(p) for p in defn.prefixes], state=STATES[peer.state],
        rx_bytes=peer.rx_bytes, tx_bytes=peer.tx_bytes,
        keepalive_seconds=defn.keepalive_seconds,
        revoked=peer.state == "revoked" or defn.revoked)
    stamp = unix_timestamp(peer.last_handshake)
    if stamp is not None:
        message.last_handshake.CopyFrom(stamp)
    return message


def session_message(peer: Peer, clock_offset: float) -> tunnel_pb2.Session:
    """A peer's keypairs; times converted from the monotonic clock to wall time."""
    session = peer.session
    message = tunnel_pb2.Session(
        peer=peer.defn.name, replay_rejected=session.drops["replayed"] +
        session.drops["too_old"], auth_failed=session.drops["decrypt_failed"])
    for slot, keypair in session.keypairs():
        entry = message.keypairs.add(
            slot=SLOTS[slot], local_index=keypair.local_index,
            remote_index=keypair.remote_index, tx_messages=keypair.send_counter,
            rx_messages=keypair.received_messages, initiator=keypair.initiator)
        created = unix_timestamp(keypair.created_at + clock_offset)
        if created is not None:
            entry.created_at.CopyFrom(created)
        if slot == "current":
            established = unix_timestamp(keypair.created_at + clock_offset)
            if established is not None:
                message.established_at.CopyFrom(established)
            if keypair.initiator:
                rekey = unix_timestamp(keypair.created_at + clock_offset +
                                       session.timers.rekey_after_time)
                if rekey is not None:
                    message.next_rekey_at.CopyFrom(rekey)
    return message


class TunnelServicer(tunnel_pb2_grpc.TunnelServiceServicer):
    """Peers, sessions, the static key, and status."""

    def __init__(self, app: Tunneld) -> None:
        self.app = app

    def _peer(self, name: str) -> Peer | None:
        assert self.app.router is not None
        return self.app.router.peers.get(name)

    async def _need_peer(self, name: str, context: Context) -> Peer:
        if not name:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "name: required")
        peer = self._peer(name)
        if peer is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"peer {name!r} does not exist")
        return peer

    async def Status(self, request: tunnel_pb2.TunnelStatusRequest,
                     context: Context) -> tunnel_pb2.TunnelStatus:
        app = self.app
        router, cfg = app.router, app.config.tunneld
        assert app.probe is not None and router is not None and app.dataplane is not None
        status = tunnel_pb2.TunnelStatus(
            daemon=app.runtime.daemon_info(), probe=app.probe_message(),
            datapath_mode=app.mode, datapath_reason=app.mode_reason,
            public_key=b64(router.keys.public), listen_port=cfg.listen_port,
            wan_interface=cfg.wan_interface, peers=len(router.peers),
            sessions=len(list(router.sessions())), drops_by_reason=router.drops_by_reason(),
            inner_mtu=router.inner_mtu, decap_interface=app.dataplane.decap.name,
            decap_program_id=app.dataplane.decap.prog_id,
            decap_program_adopted=app.dataplane.decap.adopted,
            lan_interfaces=sorted(app.dataplane.xsks),
            datapath_counters=app.datapath_counters(),
            handshakes_completed=router.handshakes_completed)
        for warning in app.warnings:
            status.warnings.add(code="tunneld", message=warning)
        return status

    # -- peers ----------------------------------------------------------------------------

    async def _validated(self, message: tunnel_pb2.Peer, context: Context) -> PeerDef:
        try:
            defn = make_peer(message.name, message.public_key, message.endpoint,
                             list(message.allowed_prefixes), message.keepalive_seconds)
            assert self.app.router is not None
            check_conflicts(defn, [p.defn for p in self.app.router.peers.values()])
            if defn.public_key in self.app.router.revoked:
                raise PeerError(f"public_key: revoked (it was peer "
                                f"{self.app.router.revoked[defn.public_key]!r}); a revoked "
                                "key is never accepted again")
            if defn.public_key == self.app.router.keys.public:
                raise PeerError("public_key: this router's own key")
        except PeerError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"peer.{exc}")
        return defn

    async def AddPeer(self, request: tunnel_pb2.AddPeerRequest,
                      context: Context) -> tunnel_pb2.Peer:
        if self._peer(request.peer.name) is not None:
            await abort(context, grpc.StatusCode.ALREADY_EXISTS,
                         f"peer {request.peer.name!r} exists (UpdatePeer changes it)")
        defn = await self._validated(request.peer, context)
        peer = await self.app.put_peer(defn, "tunnel.peer.added")
        return peer_message(peer)

    async def UpdatePeer(self, request: tunnel_pb2.UpdatePeerRequest,
                         context: Context) -> tunnel_pb2.Peer:
        old = await self._need_peer(request.peer.name, context)
        if old.defn.revoked or old.state == "revoked":
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"peer {old.defn.name!r} is revoked; remove it and add a new key")
        defn = await self._validated(request.peer, context)
        peer = await self.app.put_peer(defn, "tunnel.peer.updated")
        return peer_message(peer)

    async def GetPeer(self, request: tunnel_pb2.GetPeerRequest,
                      context: Context) -> tunnel_pb2.Peer:
        return peer_message(await self._need_peer(request.name, context))

    async def ListPeers(self, request: tunnel_pb2.ListPeersRequest,
                        context: Context) -> tunnel_pb2.ListPeersResponse:
        assert self.app.router is not None
        peers = sorted(self.app.router.peers.values(), key=lambda p: p.defn.name)
        chunk, page = await paging.page_or_abort(context, peers, request.page)
        return tunnel_pb2.ListPeersResponse(peers=[peer_message(p) for p in chunk], page=page)

    async def RemovePeer(self, request: tunnel_pb2.RemovePeerRequest,
                         context: Context) -> tunnel_pb2.RemovePeerResponse:
        await self._need_peer(request.name, context)
        await self.app.delete_peer(request.name)
        return tunnel_pb2.RemovePeerResponse()

    async def RevokePeer(self, request: tunnel_pb2.RevokePeerRequest,
                         context: Context) -> tunnel_pb2.Peer:
        peer = await self._need_peer(request.name, context)
        if len(request.reason) > 1024:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "reason: at most 1024 characters")
        await self.app.revoke_peer(peer, request.reason)
        return peer_message(peer)

    # -- sessions -------------------------------------------------------------------------

    async def ListSessions(self, request: tunnel_pb2.ListSessionsRequest,
                           context: Context) -> tunnel_pb2.ListSessionsResponse:
        assert self.app.router is not None
        if request.peer:
            peers = [await self._need_peer(request.peer, context)]
        else:
            peers = sorted(self.app.router.sessions(), key=lambda p: p.defn.name)
        chunk, page = await paging.page_or_abort(context, peers, request.page)
        offset = time.time() - time.monotonic()
        return tunnel_pb2.ListSessionsResponse(
            sessions=[session_message(p, offset) for p in chunk], page=page)

    async def _start_handshake(self, name: str, context: Context) -> tunnel_pb2.Session:
        peer = await self._need_peer(name, context)
        if peer.state == "revoked":
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"peer {name!r} is revoked")
        if peer.endpoint is None:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"peer {name!r} has no endpoint: it must contact us first")
        assert self.app.router is not None
        self.app.router.initiate(peer)
        return session_message(peer, time.time() - time.monotonic())

    async def CreateSession(self, request: tunnel_pb2.CreateSessionRequest,
                            context: Context) -> tunnel_pb2.Session:
        return await self._start_handshake(request.peer, context)

    async def RotateSession(self, request: tunnel_pb2.RotateSessionRequest,
                            context: Context) -> tunnel_pb2.Session:
        return await self._start_handshake(request.peer, context)

    async def DeleteSession(self, request: tunnel_pb2.DeleteSessionRequest,
                            context: Context) -> tunnel_pb2.DeleteSessionResponse:
        peer = await self._need_peer(request.peer, context)
        await self.app.reset_session(peer)
        return tunnel_pb2.DeleteSessionResponse()

    async def RotateStaticKey(self, request: tunnel_pb2.RotateStaticKeyRequest,
                              context: Context) -> tunnel_pb2.RotateStaticKeyResponse:
        if request.overlap_seconds > MAX_OVERLAP_SECONDS:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"overlap_seconds: at most {MAX_OVERLAP_SECONDS}")
        previous, valid_until = await self.app.rotate_static_key(request.overlap_seconds)
        assert self.app.router is not None
        reply = tunnel_pb2.RotateStaticKeyResponse(
            new_public_key=b64(self.app.router.keys.public), previous_public_key=b64(previous))
        stamp = unix_timestamp(valid_until)
        if stamp is not None:
            reply.previous_valid_until.CopyFrom(stamp)
        return reply


def revoked_copy(defn: PeerDef, reason: str) -> PeerDef:
    """The definition marked revoked (kept in the store so it stays refused)."""
    return replace(defn, revoked=True, revoked_reason=reason)
