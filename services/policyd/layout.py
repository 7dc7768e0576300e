"""Byte layouts of the kernel structs in bpf/lib/*.h, mirrored for Python.

tests/test_struct_layout.py compiles the C headers and fails if a size or offset here
disagrees with the compiler's. Constants carry the names of their C counterparts.
"""

from __future__ import annotations

import struct

# bpf/lib/maps.h
MAX_BINDINGS = 131072
MAX_ROLESETS = 65536
MAX_ROLES = 4096
MAX_BUCKETS = 262144
RULE_TABLE_HALF = 131072
MAX_CANDIDATES = 512
MAX_ZONES = 4096
MAX_IFINDEX = 65536
MAX_QUEUES = 64
MAX_TUNNEL_SESSIONS = 65536
TUNNEL_ENFORCE = 1  # VPNR_TUNNEL_ENFORCE
STATS_MAX_ENTRIES = 4096

ACTIVE_SLOT = 1
ACTIVE_VERSION_SHIFT = 1

CFG_MONITOR = 1 << 0

RULE_SRC_ANY = 1 << 0
RULE_DST_ANY = 1 << 1
RULE_ALLOW_DST_ANY = 1 << 2

BUCKET_IPV6 = 1 << 1
BUCKET_EXACT = 0 << 2
BUCKET_DEFAULT = 1 << 2
BUCKET_NOPORT = 2 << 2

ACTION_ALLOW = 1
ACTION_DENY = 2

# bpf/lib/audit_event.h
MAX_ROLES_PER_EVENT = 16
AUDIT_EVENT_VERSION = 1
AUDIT_LOST_RESERVE = 0
AUDIT_LOST_RATE_LIMIT = 1
AUDIT_SAMPLED_OUT = 2
AUDIT_EMITTED = 3
AUDIT_LOST_MAX = 4

# bpf/lib/trace.h
TRACE_MAGIC = 0x76706E72

STATS_KEY = struct.Struct("=IBBBB")            # struct vpnr_stats_key
COUNTER = struct.Struct("=QQ")                 # struct vpnr_counter
TRAFFIC = struct.Struct("=8Q")                 # struct vpnr_traffic
SETTINGS = struct.Struct("=32sQII")            # struct vpnr_settings
CONFIG = struct.Struct("=IIQQHHI")             # struct vpnr_config
IFACE = struct.Struct("=B3x")                  # struct vpnr_iface
LPM4_KEY = struct.Struct("=IB4s3x")            # struct vpnr_lpm4_key
LPM6_KEY = struct.Struct("=IB16s3x")           # struct vpnr_lpm6_key
BINDING = struct.Struct("=II")                 # struct vpnr_binding
ROLESET = struct.Struct(f"=H{MAX_ROLES_PER_EVENT}HH")  # struct vpnr_roleset
BUCKET_KEY = struct.Struct("=IHBB")            # struct vpnr_bucket_key
BUCKET = struct.Struct("=II")                  # struct vpnr_bucket
RULE = struct.Struct("=4I4I4I4IIHHHBBI")       # struct vpnr_rule
AUDIT_BUCKET = struct.Struct("=QQ")            # struct vpnr_audit_bucket
TUNNEL_SETTINGS = struct.Struct("=IIII")       # struct vpnr_tunnel_settings
ACTIVE = struct.Struct("=Q")                   # policy_active value
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
TRACE = struct.Struct("=IBBBBIIIHBBQ")         # struct vpnr_trace
# struct vpnr_audit_event
AUDIT_EVENT = struct.Struct(f"=QQ16s16sIIIIIHHH{MAX_ROLES_PER_EVENT}HBBBBBBBBBBH2x")

# C struct name -> its Python layout, for tests/test_struct_layout.py
C_STRUCTS: dict[str, struct.Struct] = {
    "vpnr_stats_key": STATS_KEY,
    "vpnr_counter": COUNTER,
    "vpnr_traffic": TRAFFIC,
    "vpnr_settings": SETTINGS,
    "vpnr_config": CONFIG,
    "vpnr_iface": IFACE,
    "vpnr_lpm4_key": LPM4_KEY,
    "vpnr_lpm6_key": LPM6_KEY,
    "vpnr_binding": BINDING,
    "vpnr_roleset": ROLESET,
    "vpnr_bucket_key": BUCKET_KEY,
    "vpnr_bucket": BUCKET,
    "vpnr_rule": RULE,
    "vpnr_audit_bucket": AUDIT_BUCKET,
    "vpnr_trace": TRACE,
    "vpnr_audit_event": AUDIT_EVENT,
    "vpnr_tunnel_settings": TUNNEL_SETTINGS,
}


def active_word(slot: int, version: int) -> bytes:
    """The policy_active value naming the live slot and the policy version."""
    return ACTIVE.pack((version << ACTIVE_VERSION_SHIFT) | (slot & ACTIVE_SLOT))


def split_active(raw: bytes | None) -> tuple[int, int]:
    """(slot, version) from a policy_active value; (0, 0) when unset."""
    if not raw:
        return 0, 0
    word = ACTIVE.unpack(raw)[0]
    return word & ACTIVE_SLOT, word >> ACTIVE_VERSION_SHIFT


AUDIT_FIELDS = ("ktime_ns", "policy_version", "src", "dst", "ifindex", "rule_id",
                "binding_id", "roleset_id", "pkt_len", "src_port", "dst_port", "rule_role")


def decode_audit_event(raw: bytes) -> dict[str, object]:
    """struct vpnr_audit_event as a dict (addresses as bytes; roles trimmed to role_count)."""
    values = AUDIT_EVENT.unpack(raw[:AUDIT_EVENT.size])
    event: dict[str, object] = dict(zip(AUDIT_FIELDS, values[:12], strict=True))
    roles = values[12:12 + MAX_ROLES_PER_EVENT]
    (role_count, ip_version, ip_protocol, verdict, reason, src_zone, dst_zone, source,
     event_version, flags, icmp_type) = values[12 + MAX_ROLES_PER_EVENT:]
    event.update(roles=tuple(roles[:role_count]), ip_version=ip_version,
                 ip_protocol=ip_protocol, verdict=verdict, reason=reason, src_zone=src_zone,
                 dst_zone=dst_zone, source=source, event_version=event_version, flags=flags,
                 icmp_type=icmp_type)
    return event
