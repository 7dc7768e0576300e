"""TunnelService answers as plain data for ``vpnctl tunnel|peer|session ...``.

Views are dicts rendered as JSON or YAML by :mod:`vpnr.vpnctl.output`; rows are their table
form (an unset time reads ``never``, an empty endpoint ``-``). Enum values use short
lowercase names (``established``, ``current``), byte counts stay exact numbers.
"""

from __future__ import annotations

from typing import Any

from vpnr.v1 import tunnel_pb2
from vpnr.vpnctl.output import human_duration
from vpnr.vpnctl.policy_terms import enum_label
from vpnr.vpnctl.policy_view import timestamp_text


def peer_view(peer: tunnel_pb2.Peer) -> dict[str, Any]:
    """One peer with its counters (never a private key: the API has none)."""
    return {"name": peer.name, "public_key": peer.public_key, "endpoint": peer.endpoint,
            "allowed_prefixes": list(peer.allowed_prefixes),
            "state": enum_label(tunnel_pb2.PeerState, peer.state),
            "last_handshake": timestamp_text(peer.last_handshake,
                                             peer.HasField("last_handshake")),
            "rx_bytes": peer.rx_bytes, "tx_bytes": peer.tx_bytes,
            "keepalive_seconds": peer.keepalive_seconds, "revoked": peer.revoked}


def peer_row(peer: tunnel_pb2.Peer) -> dict[str, Any]:
    """A peer as a line of ``vpnctl peer list``."""
    view = peer_view(peer)
    return {"name": view["name"], "state": view["state"], "endpoint": view["endpoint"] or "-",
            "allowed_prefixes": view["allowed_prefixes"] or "-",
            "last_handshake": view["last_handshake"] or "never",
            "rx_bytes": view["rx_bytes"], "tx_bytes": view["tx_bytes"],
            "public_key": view["public_key"]}


def keypair_view(keypair: tunnel_pb2.Keypair) -> dict[str, Any]:
    """One keypair slot of a session."""
    return {"slot": enum_label(tunnel_pb2.KeypairSlot, keypair.slot),
            "local_index": keypair.local_index, "remote_index": keypair.remote_index,
            "created_at": timestamp_text(keypair.created_at, keypair.HasField("created_at")),
            "tx_messages": keypair.tx_messages, "rx_messages": keypair.rx_messages,
            "initiator": keypair.initiator}


def session_view(session: tunnel_pb2.Session) -> dict[str, Any]:
    """One peer's session: its keypairs, when it was set up and rekeys, its rejections."""
    return {"peer": session.peer,
            "established_at": timestamp_text(session.established_at,
                                             session.HasField("established_at")),
            "next_rekey_at": timestamp_text(session.next_rekey_at,
                                            session.HasField("next_rekey_at")),
            "replay_rejected": session.replay_rejected, "auth_failed": session.auth_failed,
            "keypairs": [keypair_view(keypair) for keypair in session.keypairs]}


def session_row(session: tunnel_pb2.Session) -> dict[str, Any]:
    """A session as a line of ``vpnctl session list``."""
    view = session_view(session)
    return {"peer": view["peer"], "established_at": view["established_at"] or "never",
            "next_rekey_at": view["next_rekey_at"] or "-",
            "keypairs": [pair["slot"] for pair in view["keypairs"]] or "-",
            "replay_rejected": view["replay_rejected"], "auth_failed": view["auth_failed"]}


def session_table(session: tunnel_pb2.Session) -> dict[str, Any]:
    """``vpnctl session create|rotate`` in the table format: the session, keypairs as rows."""
    view = session_view(session)
    return {**{key: value or "-" for key, value in view.items() if key != "keypairs"},
            "keypairs": view["keypairs"] or "(none yet: the handshake is under way)"}


def status_view(status: tunnel_pb2.TunnelStatus) -> dict[str, Any]:
    """``vpnctl tunnel status``: data path, keys, counts, drops and the kernel probe."""
    probe = status.probe
    return {
        "version": status.daemon.version, "pid": status.daemon.pid,
        "uptime_seconds": round(status.daemon.uptime_seconds, 3),
        "datapath_mode": status.datapath_mode, "datapath_reason": status.datapath_reason,
        "public_key": status.public_key, "listen_port": status.listen_port,
        "wan_interface": status.wan_interface, "lan_interfaces": list(status.lan_interfaces),
        "decap_interface": status.decap_interface,
        "decap_program_id": status.decap_program_id,
        "decap_program_adopted": status.decap_program_adopted,
        "inner_mtu": status.inner_mtu, "peers": status.peers, "sessions": status.sessions,
        "handshakes_completed": status.handshakes_completed,
        "drops_by_reason": dict(sorted(status.drops_by_reason.items())),
        "datapath_counters": dict(sorted(status.datapath_counters.items())),
        "probe": {"kernel_release": probe.kernel_release, "af_xdp": probe.af_xdp,
                  "bpf_crypto_kfuncs": probe.bpf_crypto_kfuncs,
                  "kfunc_ciphers_accepted": list(probe.kfunc_ciphers_accepted),
                  "kfunc_ciphers_refused": list(probe.kfunc_ciphers_refused),
                  "probe_method": probe.probe_method, "notes": list(probe.notes)},
        "warnings": [f"{w.code}: {w.message}" for w in status.warnings]}


def status_table(status: tunnel_pb2.TunnelStatus) -> dict[str, Any]:
    """The status view for the table format: uptime in words, empty parts as ``-``."""
    view = status_view(status)
    view = {("uptime" if key == "uptime_seconds" else key):
            (human_duration(value) if key == "uptime_seconds" else value)
            for key, value in view.items()}
    view["wan_interface"] = view["wan_interface"] or "-"
    view["lan_interfaces"] = view["lan_interfaces"] or "-"
    for key in ("drops_by_reason", "datapath_counters", "warnings"):
        view[key] = view[key] or "none"
    return view


def rotated_view(reply: tunnel_pb2.RotateStaticKeyResponse) -> dict[str, Any]:
    """``vpnctl tunnel rotate-key``: the new public key and until when the old one works."""
    return {"new_public_key": reply.new_public_key,
            "previous_public_key": reply.previous_public_key,
            "previous_valid_until": timestamp_text(reply.previous_valid_until,
                                                   reply.HasField("previous_valid_until"))}
