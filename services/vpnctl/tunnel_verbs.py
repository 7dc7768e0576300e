"""``vpnctl tunnel|peer|session ...``: tunneld's TunnelService without writing JSON.

``tunnel status`` and ``tunnel rotate-key`` are about this router; ``peer`` verbs manage the
routers it tunnels to (add, get, list, update, remove, revoke); ``session`` verbs show and
steer the Noise sessions with them (list, create, delete, rotate). Text comes from
:mod:`vpnr.vpnctl.tunnel_view`.
"""

from __future__ import annotations

import argparse

from google.protobuf.message import Message

from vpnr.v1 import tunnel_pb2, tunnel_pb2_grpc
from vpnr.vpnctl.commandline import Subcommands, add_group, add_verb, bounded_int, call_timeout
from vpnr.vpnctl.exitcodes import EXIT_OK
from vpnr.vpnctl.output import table_lines
from vpnr.vpnctl.policy_verbs import add_page_size, prefix_arg, show
from vpnr.vpnctl.policy_view import rows_text
from vpnr.vpnctl.reflection import UsageError, socket_path
from vpnr.vpnctl.service_client import ServiceClient
from vpnr.vpnctl.tunnel_view import (
    peer_row,
    peer_view,
    rotated_view,
    session_row,
    session_table,
    session_view,
    status_table,
    status_view,
)

KEEPALIVE_MAX = 3600  # tunneld refuses more
OVERLAP_MAX = 30 * 86400  # tunneld refuses a longer overlap of the old static key
DEFAULT_OVERLAP = 3600  # an hour to hand the new key to the peers
keepalive_arg = bounded_int("a keepalive in seconds", 0, KEEPALIVE_MAX)
overlap_arg = bounded_int("an overlap in seconds", 0, OVERLAP_MAX)


class TunnelClient(ServiceClient):
    """One connection to tunneld; every call carries the same deadline."""

    daemon = "tunneld"
    stub_class = tunnel_pb2_grpc.TunnelServiceStub


def connect(args: argparse.Namespace) -> TunnelClient:
    """A client on the instance's tunneld socket, with the command's deadline."""
    return TunnelClient(socket_path(args.run_dir, args.instance, "tunneld"),
                        call_timeout(args, False))


def key_arg(text: str) -> str:
    """A base64 X25519 public key: 44 characters ending in ``=`` (tunneld checks the rest)."""
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise argparse.ArgumentTypeError(f"expected a base64 X25519 public key "
                                         f"(44 characters), got {text!r}")
    return text


def prefixes_arg(text: str) -> list[str]:
    """``10.2.0.0/24,fd00:2::/64`` -> normalized prefixes."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected prefixes separated by commas, got {text!r}")
    return [prefix_arg(item) for item in items]


# ------------------------------------------------------------------------------ tunnel

def cmd_tunnel_status(args: argparse.Namespace) -> int:
    """Status: data path mode and why, keys, counts, drops, counters, the kernel probe."""
    with connect(args) as client:
        status = client.call("Status", tunnel_pb2.TunnelStatusRequest(),
                             tunnel_pb2.TunnelStatus)
    show(args, status_view(status), "\n".join(table_lines(status_table(status))))
    return EXIT_OK


def cmd_tunnel_rotate_key(args: argparse.Namespace) -> int:
    """RotateStaticKey; the old key keeps working for --overlap seconds."""
    request = tunnel_pb2.RotateStaticKeyRequest(overlap_seconds=args.overlap)
    with connect(args) as client:
        reply = client.call("RotateStaticKey", request, tunnel_pb2.RotateStaticKeyResponse)
    view = rotated_view(reply)
    show(args, view, "\n".join(table_lines(view)))
    return EXIT_OK


# ------------------------------------------------------------------------------- peers

def cmd_peer_list(args: argparse.Namespace) -> int:
    """Every peer (ListPeers, all pages)."""
    with connect(args) as client:
        peers = client.list_all("ListPeers", tunnel_pb2.ListPeersRequest(),
                                tunnel_pb2.ListPeersResponse, "peers", args.page_size)
    show(args, [peer_view(peer) for peer in peers],
         rows_text([peer_row(peer) for peer in peers], "(no peers)"))
    return EXIT_OK


def _show_peer(args: argparse.Namespace, peer: tunnel_pb2.Peer) -> int:
    view = peer_view(peer)
    table = {**view, "endpoint": view["endpoint"] or "- (responder only)",
             "last_handshake": view["last_handshake"] or "never"}
    show(args, view, "\n".join(table_lines(table)))
    return EXIT_OK


def cmd_peer_get(args: argparse.Namespace) -> int:
    """GetPeer: one peer and its counters."""
    with connect(args) as client:
        peer = client.call("GetPeer", tunnel_pb2.GetPeerRequest(name=args.name),
                           tunnel_pb2.Peer)
    return _show_peer(args, peer)


def cmd_peer_add(args: argparse.Namespace) -> int:
    """AddPeer: a router this one tunnels to."""
    peer = tunnel_pb2.Peer(name=args.name, public_key=args.public_key,
                           endpoint=args.endpoint or "", allowed_prefixes=args.allow,
                           keepalive_seconds=args.keepalive or 0)
    with connect(args) as client:
        added = client.call("AddPeer", tunnel_pb2.AddPeerRequest(peer=peer), tunnel_pb2.Peer)
    return _show_peer(args, added)


def cmd_peer_update(args: argparse.Namespace) -> int:
    """GetPeer, change what the options name, UpdatePeer (the rest stays as it was)."""
    if all(value is None for value in (args.public_key, args.endpoint, args.allow,
                                       args.keepalive)):
        raise UsageError("nothing to change: give --public-key, --endpoint, --allow "
                         "or --keepalive")
    with connect(args) as client:
        peer = client.call("GetPeer", tunnel_pb2.GetPeerRequest(name=args.name),
                           tunnel_pb2.Peer)
        if args.public_key is not None:
            peer.public_key = args.public_key
        if args.endpoint is not None:
            peer.endpoint = args.endpoint
        if args.allow is not None:
            peer.ClearField("allowed_prefixes")
            peer.allowed_prefixes.extend(args.allow)
        if args.keepalive is not None:
            peer.keepalive_seconds = args.keepalive
        updated = client.call("UpdatePeer", tunnel_pb2.UpdatePeerRequest(peer=peer),
                              tunnel_pb2.Peer)
    return _show_peer(args, updated)


def cmd_peer_remove(args: argparse.Namespace) -> int:
    """RemovePeer: forget the peer (its key may be added again, unlike revoke)."""
    with connect(args) as client:
        client.call("RemovePeer", tunnel_pb2.RemovePeerRequest(name=args.name),
                    tunnel_pb2.RemovePeerResponse)
    show(args, {"removed": "peer", "name": args.name}, f"removed peer {args.name}")
    return EXIT_OK


def cmd_peer_revoke(args: argparse.Namespace) -> int:
    """RevokePeer: refuse its static key from now on and end its sessions."""
    request = tunnel_pb2.RevokePeerRequest(name=args.name, reason=args.reason)
    with connect(args) as client:
        peer = client.call("RevokePeer", request, tunnel_pb2.Peer)
    return _show_peer(args, peer)


# ---------------------------------------------------------------------------- sessions

def cmd_session_list(args: argparse.Namespace) -> int:
    """Every session, or one peer's (ListSessions, all pages)."""
    request = tunnel_pb2.ListSessionsRequest(peer=args.peer)
    with connect(args) as client:
        sessions = client.list_all("ListSessions", request, tunnel_pb2.ListSessionsResponse,
                                   "sessions", args.page_size)
    show(args, [session_view(session) for session in sessions],
         rows_text([session_row(session) for session in sessions], "(no sessions)"))
    return EXIT_OK


def _session_call(args: argparse.Namespace, method: str, request: Message) -> int:
    with connect(args) as client:
        session = client.call(method, request, tunnel_pb2.Session)
    show(args, session_view(session), "\n".join(table_lines(session_table(session))))
    return EXIT_OK


def cmd_session_create(args: argparse.Namespace) -> int:
    """CreateSession: start a handshake with the peer now."""
    return _session_call(args, "CreateSession", tunnel_pb2.CreateSessionRequest(peer=args.peer))


def cmd_session_rotate(args: argparse.Namespace) -> int:
    """RotateSession: rekey now, make-before-break."""
    return _session_call(args, "RotateSession", tunnel_pb2.RotateSessionRequest(peer=args.peer))


def cmd_session_delete(args: argparse.Namespace) -> int:
    """DeleteSession: drop the peer's keys (traffic starts a new handshake)."""
    with connect(args) as client:
        client.call("DeleteSession", tunnel_pb2.DeleteSessionRequest(peer=args.peer),
                    tunnel_pb2.DeleteSessionResponse)
    show(args, {"deleted": "session", "peer": args.peer}, f"deleted the session of {args.peer}")
    return EXIT_OK


# ------------------------------------------------------------------------ registration

def _peer_options(verb: argparse.ArgumentParser, adding: bool) -> None:
    verb.add_argument("--public-key", type=key_arg, required=adding, metavar="KEY",
                      help="the peer's base64 X25519 static public key "
                           "(vpnctl --instance PEER tunnel status shows it)")
    verb.add_argument("--endpoint", metavar="ADDRESS:PORT",
                      help="where to reach it ([v6]:PORT for IPv6; "
                           + ("default: none, it must contact us first)" if adding
                              else "'' for none)"))
    verb.add_argument("--allow", type=prefixes_arg, required=adding, metavar="CIDR[,CIDR...]",
                      help="prefixes behind the peer: what it may send us and what we send it"
                           + ("" if adding else " (replaces the list)"))
    verb.add_argument("--keepalive", type=keepalive_arg, metavar="SECONDS",
                      help=f"persistent keepalive, 0 off (0-{KEEPALIVE_MAX}"
                           + (", default 0)" if adding else ")"))


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register ``tunnel``, ``peer`` and ``session`` with their verbs."""
    tunnel = add_group(commands, common, "tunnel",
                       "this router's tunnel: data path status, static key rotation", [
                           "vpnctl tunnel status", "vpnctl tunnel rotate-key --overlap 3600"])
    add_verb(tunnel, common, "status",
             "data path mode and why, public key, peers, sessions, drops, kernel probe", [
                 "vpnctl tunnel status", "vpnctl --instance b tunnel status -o json"],
             cmd_tunnel_status)
    verb = add_verb(tunnel, common, "rotate-key",
                    "generate a new static key; the old one works for the overlap", [
                        "vpnctl tunnel rotate-key",
                        "vpnctl tunnel rotate-key --overlap 86400 -o json"],
                    cmd_tunnel_rotate_key,
                    notes="Peers need the new public key (vpnctl peer update NAME "
                          "--public-key KEY on\neach of them) before the overlap ends.")
    verb.add_argument("--overlap", type=overlap_arg, default=DEFAULT_OVERLAP, metavar="SECONDS",
                      help="how long the previous key stays valid (default "
                           f"{DEFAULT_OVERLAP}; 0: it stops at once)")

    peer = add_group(commands, common, "peer",
                     "routers this one tunnels to: list, get, add, update, remove, revoke", [
                         "vpnctl peer list",
                         "vpnctl peer add site-b --public-key KEY= --endpoint 192.0.2.2:51820 "
                         "--allow 10.2.0.0/24",
                         "vpnctl peer revoke site-b --reason 'key leaked'"])
    verb = add_verb(peer, common, "list", "every peer with its state and counters", [
        "vpnctl peer list", "vpnctl peer list -o yaml"], cmd_peer_list)
    add_page_size(verb)
    verb = add_verb(peer, common, "get", "one peer", [
        "vpnctl peer get site-b", "vpnctl peer get site-b -o json"], cmd_peer_get)
    verb.add_argument("name", metavar="NAME", help="peer name")
    verb = add_verb(peer, common, "add", "add a peer router", [
        "vpnctl peer add site-b --public-key KEY= --endpoint 192.0.2.2:51820 "
        "--allow 10.2.0.0/24,fd00:2::/64",
        "vpnctl peer add laptop --public-key KEY= --allow 10.9.0.5/32 --keepalive 25"],
                    cmd_peer_add)
    verb.add_argument("name", metavar="NAME", help="a name for the peer")
    _peer_options(verb, adding=True)
    verb = add_verb(peer, common, "update", "change a peer's key, endpoint, prefixes or "
                    "keepalive (the rest stays)", [
                        "vpnctl peer update site-b --endpoint 198.51.100.7:51820",
                        "vpnctl peer update site-b --allow 10.2.0.0/24,10.3.0.0/24"],
                    cmd_peer_update)
    verb.add_argument("name", metavar="NAME", help="peer name")
    _peer_options(verb, adding=False)
    verb = add_verb(peer, common, "remove", "forget a peer (its key may come back, "
                    "unlike revoke)", ["vpnctl peer remove site-b"], cmd_peer_remove)
    verb.add_argument("name", metavar="NAME", help="peer name")
    verb = add_verb(peer, common, "revoke", "refuse a peer's key for good and end its sessions",
                    ["vpnctl peer revoke site-b --reason 'laptop stolen'"], cmd_peer_revoke)
    verb.add_argument("name", metavar="NAME", help="peer name")
    verb.add_argument("--reason", default="", metavar="TEXT", help="why, for the audit log")

    session = add_group(commands, common, "session",
                        "Noise sessions with peers: list, create, delete, rotate", [
                            "vpnctl session list", "vpnctl session rotate site-b"])
    verb = add_verb(session, common, "list", "every session, or one peer's", [
        "vpnctl session list", "vpnctl session list --peer site-b -o yaml"], cmd_session_list)
    verb.add_argument("--peer", default="", metavar="NAME", help="only this peer's session")
    add_page_size(verb)
    for name, help_text, handler in (
            ("create", "start a handshake with a peer now (traffic normally does)",
             cmd_session_create),
            ("delete", "drop a peer's session keys (traffic starts a new handshake)",
             cmd_session_delete),
            ("rotate", "rekey a peer's session now, make-before-break", cmd_session_rotate)):
        verb = add_verb(session, common, name, help_text, [
            f"vpnctl session {name} site-b", f"vpnctl session {name} site-b -o json"], handler)
        verb.add_argument("peer", metavar="PEER", help="peer name")
