"""The policy model, its validation, and the reference evaluator.

This is the contract of DESIGN.md "Policy semantics" written as plain Python: the kernel
program must reach the same decision as :func:`evaluate` for every packet (the randomized
tests compare the two). Nothing here touches the kernel or the network.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from enum import IntEnum

from vpnr.v1 import codes_pb2

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_RULES_PER_ROLE = 32
MAX_ROLES_PER_BINDING = 16
ROLE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,62}$")
PORT_PROTOCOLS = (codes_pb2.PROTOCOL_TCP, codes_pb2.PROTOCOL_UDP)


class Action(IntEnum):
    """What a matching rule does (values as in the policy proto's Action)."""

    ALLOW = 1
    DENY = 2


class PolicyError(ValueError):
    """A policy object is invalid; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def parse_prefix(field_name: str, value: str) -> IPNetwork | None:
    """A CIDR prefix (no host bits), or None for the empty string meaning any."""
    if value == "":
        return None
    try:
        return _network(value)
    except ValueError as exc:
        raise PolicyError(field_name, f"expected a CIDR prefix, got {value!r}: {exc}") from exc


def _network(text: str) -> IPNetwork:
    """ipaddress.ip_network(text, strict=True), four times faster for the common forms.

    A policy can carry 100,000 bindings: parsing the address by hand and building the
    network from (int, prefix length) skips ipaddress's slow string parser. Anything that
    is not plainly "a.b.c.d/n" or an IPv6 "addr/n" goes through ip_network itself.
    """
    address, sep, length = text.partition("/")
    if sep and length.isascii() and length.isdigit() and (length == "0" or length[0] != "0"):
        if ":" in address:
            try:
                packed = socket.inet_pton(socket.AF_INET6, address)
            except OSError:
                packed = b""
            if packed:
                return ipaddress.IPv6Network((int.from_bytes(packed, "big"), int(length)))
        else:
            parts = address.split(".")
            if len(parts) == 4 and all(p.isascii() and p.isdigit() and (p == "0" or p[0] != "0")
                                       and int(p) <= 255 for p in parts):
                value = (int(parts[0]) << 24) | (int(parts[1]) << 16) | (int(parts[2]) << 8) \
                    | int(parts[3])
                return ipaddress.IPv4Network((value, int(length)))
    return ipaddress.ip_network(text, strict=True)


@dataclass(frozen=True)
class Rule:
    """One ACL rule of a role."""

    id: int
    role: str
    priority: int
    action: Action
    protocol: int = codes_pb2.PROTOCOL_ANY
    src_prefix: IPNetwork | None = None
    dst_prefix: IPNetwork | None = None
    dst_port_from: int = 0
    dst_port_to: int = 0
    description: str = field(default="", compare=False)

    @property
    def has_ports(self) -> bool:
        """True when the rule matches on destination ports."""
        return not (self.dst_port_from == 0 and self.dst_port_to == 0)

    def validate(self, where: str = "rule") -> None:
        """Raise PolicyError naming the first invalid field."""
        if self.id <= 0:
            raise PolicyError(f"{where}.id", "must be > 0")
        if self.protocol not in codes_pb2.Protocol.values():
            raise PolicyError(f"{where}.protocol", f"unknown protocol {self.protocol}")
        if self.has_ports:
            if not 1 <= self.dst_port_from <= self.dst_port_to <= 65535:
                raise PolicyError(f"{where}.dst_port_from",
                                  "port range must satisfy 1 <= from <= to <= 65535, got "
                                  f"{self.dst_port_from}-{self.dst_port_to}")
            if self.protocol not in PORT_PROTOCOLS:
                raise PolicyError(f"{where}.protocol",
                                  "a port range needs protocol tcp or udp")
        families = {p.version for p in (self.src_prefix, self.dst_prefix) if p is not None}
        if len(families) > 1:
            raise PolicyError(f"{where}.dst_prefix", "src and dst prefixes mix IPv4 and IPv6")
        if self.protocol == codes_pb2.PROTOCOL_ICMP and 6 in families:
            raise PolicyError(f"{where}.protocol", "icmp with an IPv6 prefix (use icmpv6)")
        if self.protocol == codes_pb2.PROTOCOL_ICMPV6 and 4 in families:
            raise PolicyError(f"{where}.protocol", "icmpv6 with an IPv4 prefix (use icmp)")


@dataclass(frozen=True)
class Packet:
    """The fields of an IP packet the policy looks at."""

    src: IPAddress
    dst: IPAddress
    protocol: int
    dst_port: int = 0
    fragment: bool = False  # a non-first fragment: it carries no ports
    src_port: int = 0
    icmp_type: int | None = None  # set for ICMP/ICMPv6 with a parsed header
    hop_limit: int = 64


class Bypass(IntEnum):
    """Infrastructure traffic that passes without roles (bits as in bpf/lib/maps.h)."""

    ARP = 1 << 1
    DHCP = 1 << 2
    ND = 1 << 3
    TUNNEL = 1 << 4


ALL_BYPASS = frozenset(Bypass)


@dataclass(frozen=True)
class Context:
    """Where a packet arrived and how the router is configured around the policy."""

    interface_zone: int = codes_pb2.ZONE_INTERNAL
    bypass: frozenset[Bypass] = ALL_BYPASS
    tunnel_port: int = 51820
    tunnel_socket_bound: bool = False


@dataclass(frozen=True)
class BindingMeta:
    """Who owns a binding; not part of the decision."""

    source: str = "admin"
    subject: str = ""
    expires_at: float | None = None  # Unix time; None: no expiry


@dataclass(frozen=True)
class Decision:
    """The outcome of evaluating a packet."""

    verdict: int
    reason: int
    roles: tuple[str, ...] = ()
    rule: Rule | None = None
    src_zone: int = codes_pb2.ZONE_UNSPECIFIED
    dst_zone: int = codes_pb2.ZONE_UNSPECIFIED


@dataclass
class Policy:
    """Roles (with their rules), bindings (source prefix -> role names) and destination
    zones; the descriptions and binding owners ride along but never change a decision."""

    roles: dict[str, list[Rule]] = field(default_factory=dict)
    bindings: dict[IPNetwork, tuple[str, ...]] = field(default_factory=dict)
    zones: dict[IPNetwork, int] = field(default_factory=dict)
    role_descriptions: dict[str, str] = field(default_factory=dict)
    binding_meta: dict[IPNetwork, BindingMeta] = field(default_factory=dict)
    zone_descriptions: dict[IPNetwork, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Check limits, names and references; raise PolicyError on the first problem."""
        ids: set[int] = set()
        for name, rules in self.roles.items():
            if not ROLE_NAME_RE.fullmatch(name):
                raise PolicyError(f"roles[{name!r}].name",
                                  "expected a-z, 0-9 and _.:- (up to 63), starting alnum")
            if len(rules) > MAX_RULES_PER_ROLE:
                raise PolicyError(f"roles[{name!r}].rules",
                                  f"{len(rules)} rules, at most {MAX_RULES_PER_ROLE}")
            for rule in rules:
                where = f"roles[{name!r}].rules[id={rule.id}]"
                rule.validate(where)
                if rule.id in ids:
                    raise PolicyError(f"{where}.id", f"rule id {rule.id} is used twice")
                ids.add(rule.id)
        for prefix, roles in self.bindings.items():
            self.check_binding_roles(f"bindings[{prefix}]", roles)
        for prefix, zone in self.zones.items():
            if zone not in (codes_pb2.ZONE_INTERNAL, codes_pb2.ZONE_VPN,
                            codes_pb2.ZONE_EXTERNAL):
                raise PolicyError(f"zones[{prefix}].zone",
                                  "expected internal, vpn or external")

    def check_binding_roles(self, where: str, roles: tuple[str, ...]) -> None:
        """A binding's roles: 1-16 distinct roles that exist."""
        if not roles:
            raise PolicyError(f"{where}.roles", "a binding needs at least one role")
        if len(roles) > MAX_ROLES_PER_BINDING:
            raise PolicyError(f"{where}.roles",
                              f"{len(roles)} roles, at most {MAX_ROLES_PER_BINDING}")
        if len(set(roles)) != len(roles):
            raise PolicyError(f"{where}.roles", "a role is listed twice")
        for role in roles:
            if role not in self.roles:
                raise PolicyError(f"{where}.roles", f"unknown role {role!r}")

    def zone_of(self, address: IPAddress) -> int:
        """Zone of the most specific zone prefix covering ``address``; EXTERNAL if none."""
        best: IPNetwork | None = None
        for prefix in self.zones:
            if prefix.version == address.version and address in prefix and (
                    best is None or prefix.prefixlen > best.prefixlen):
                best = prefix
        return codes_pb2.ZONE_EXTERNAL if best is None else self.zones[best]

    def roles_of(self, address: IPAddress) -> tuple[str, ...] | None:
        """Roles of the most specific binding covering ``address`` (None: no binding)."""
        best: IPNetwork | None = None
        for prefix in self.bindings:
            if prefix.version == address.version and address in prefix and (
                    best is None or prefix.prefixlen > best.prefixlen):
                best = prefix
        return None if best is None else self.bindings[best]


def rule_matches(rule: Rule, packet: Packet) -> bool:
    """Does one rule match a packet? (DESIGN.md: fragments match only port-less rules.)"""
    if rule.protocol not in (codes_pb2.PROTOCOL_ANY, packet.protocol):
        return False
    for prefix, address in ((rule.src_prefix, packet.src), (rule.dst_prefix, packet.dst)):
        if prefix is not None and (prefix.version != address.version or address not in prefix):
            return False
    if rule.has_ports:
        if packet.fragment or packet.protocol not in PORT_PROTOCOLS:
            return False
        if not rule.dst_port_from <= packet.dst_port <= rule.dst_port_to:
            return False
    return True


def is_infrastructure(packet: Packet, ctx: Context,
                      dst_zone: int = codes_pb2.ZONE_EXTERNAL) -> bool:
    """The configured bypass: DHCP, ICMPv6 neighbour discovery, the tunnel port on WAN.
    From an external interface it never reaches an INTERNAL or VPN destination."""
    if packet.fragment:
        return False
    if ctx.interface_zone == codes_pb2.ZONE_EXTERNAL and dst_zone in (
            codes_pb2.ZONE_INTERNAL, codes_pb2.ZONE_VPN):
        return False
    if Bypass.DHCP in ctx.bypass and packet.protocol == codes_pb2.PROTOCOL_UDP:
        ports = (packet.src_port, packet.dst_port)
        if packet.src.version == 4 and ports in ((68, 67), (67, 68)):
            return True
        if packet.src.version == 6 and ports in ((546, 547), (547, 546)):
            return True
    # RFC 4861: neighbour discovery is valid only with hop limit 255 (never routed).
    if (Bypass.ND in ctx.bypass and packet.src.version == 6
            and packet.protocol == codes_pb2.PROTOCOL_ICMPV6
            and packet.icmp_type is not None and 133 <= packet.icmp_type <= 137
            and packet.hop_limit == 255):
        return True
    return (Bypass.TUNNEL in ctx.bypass and ctx.interface_zone == codes_pb2.ZONE_EXTERNAL
            and packet.protocol == codes_pb2.PROTOCOL_UDP and ctx.tunnel_port != 0
            and packet.dst_port == ctx.tunnel_port)


def evaluate(policy: Policy, packet: Packet, ctx: Context | None = None) -> Decision:
    """Deny wins, then allow, else default deny; report the first rule of the winner.

    Zones: the source zone is the zone of the interface the packet arrived on (an address
    claims nothing); EXTERNAL -> INTERNAL is allowed only by an ALLOW rule that names a
    destination prefix. An allowed packet to the VPN zone is redirected to tunneld, or
    dropped while no tunnel socket is bound (fail closed).
    """
    ctx = ctx or Context()
    src_zone, dst_zone = ctx.interface_zone, policy.zone_of(packet.dst)
    if is_infrastructure(packet, ctx, dst_zone):
        return Decision(codes_pb2.VERDICT_ALLOW, codes_pb2.REASON_INFRA_BYPASS,
                        src_zone=src_zone, dst_zone=dst_zone)
    external_to_internal = (src_zone == codes_pb2.ZONE_EXTERNAL
                            and dst_zone == codes_pb2.ZONE_INTERNAL)
    roles = policy.roles_of(packet.src)
    if roles is None:
        reason = codes_pb2.REASON_ZONE_EXTERNAL if external_to_internal \
            else codes_pb2.REASON_NO_ROLE
        return Decision(codes_pb2.VERDICT_DENY, reason, (), None, src_zone, dst_zone)
    matching = [r for role in roles for r in policy.roles[role] if rule_matches(r, packet)]
    denies = [r for r in matching if r.action == Action.DENY]
    if denies:
        first = min(denies, key=lambda r: (r.priority, r.id))
        return Decision(codes_pb2.VERDICT_DENY, codes_pb2.REASON_RULE_DENY, roles, first,
                        src_zone, dst_zone)
    allows = [r for r in matching if r.action == Action.ALLOW
              and not (external_to_internal and r.dst_prefix is None)]
    if allows:
        first = min(allows, key=lambda r: (r.priority, r.id))
        if dst_zone == codes_pb2.ZONE_VPN:
            if ctx.tunnel_socket_bound:
                return Decision(codes_pb2.VERDICT_REDIRECT, codes_pb2.REASON_TUNNEL_REDIRECT,
                                roles, first, src_zone, dst_zone)
            return Decision(codes_pb2.VERDICT_DENY, codes_pb2.REASON_TUNNEL_NO_SOCKET, roles,
                            first, src_zone, dst_zone)
        return Decision(codes_pb2.VERDICT_ALLOW, codes_pb2.REASON_RULE_ALLOW, roles, first,
                        src_zone, dst_zone)
    reason = codes_pb2.REASON_ZONE_EXTERNAL if external_to_internal \
        else codes_pb2.REASON_DEFAULT_DENY
    return Decision(codes_pb2.VERDICT_DENY, reason, roles, None, src_zone, dst_zone)
