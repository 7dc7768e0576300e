"""The policy model, its validation, and the reference evaluator.

This is the contract of DESIGN.md "Policy semantics" written as plain Python: the kernel
program must reach the same decision as :func:`evaluate` for every packet (the randomized
tests compare the two). Nothing here touches the kernel or the network.
"""

from __future__ import annotations

import ipaddress
import re
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
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise PolicyError(field_name, f"expected a CIDR prefix, got {value!r}: {exc}") from exc


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
    """The fields of a packet the policy looks at."""

    src: IPAddress
    dst: IPAddress
    protocol: int
    dst_port: int = 0
    fragment: bool = False  # a non-first fragment: it carries no ports


@dataclass(frozen=True)
class Decision:
    """The outcome of evaluating a packet."""

    verdict: int
    reason: int
    roles: tuple[str, ...] = ()
    rule: Rule | None = None


@dataclass
class Policy:
    """Roles (with their rules) and bindings (source prefix -> role names)."""

    roles: dict[str, list[Rule]] = field(default_factory=dict)
    bindings: dict[IPNetwork, tuple[str, ...]] = field(default_factory=dict)

    def validate(self) -> None:
        """Check limits, names and references; raise PolicyError on the first problem."""
        ids: set[int] = set()
        for name, rules in self.roles.items():
            if not ROLE_NAME_RE.match(name):
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
            where = f"bindings[{prefix}]"
            if not roles:
                raise PolicyError(f"{where}.roles", "a binding needs at least one role")
            if len(roles) > MAX_ROLES_PER_BINDING:
                raise PolicyError(f"{where}.roles",
                                  f"{len(roles)} roles, at most {MAX_ROLES_PER_BINDING}")
            for role in roles:
                if role not in self.roles:
                    raise PolicyError(f"{where}.roles", f"unknown role {role!r}")

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


def evaluate(policy: Policy, packet: Packet) -> Decision:
    """Deny wins, then allow, else default deny; report the first rule of the winner."""
    roles = policy.roles_of(packet.src)
    if roles is None:
        return Decision(codes_pb2.VERDICT_DENY, codes_pb2.REASON_NO_ROLE)
    matching = [r for role in roles for r in policy.roles[role] if rule_matches(r, packet)]
    for action, verdict, reason in (
            (Action.DENY, codes_pb2.VERDICT_DENY, codes_pb2.REASON_RULE_DENY),
            (Action.ALLOW, codes_pb2.VERDICT_ALLOW, codes_pb2.REASON_RULE_ALLOW)):
        winners = [r for r in matching if r.action == action]
        if winners:
            first = min(winners, key=lambda r: (r.priority, r.id))
            return Decision(verdict, reason, roles, first)
    return Decision(codes_pb2.VERDICT_DENY, codes_pb2.REASON_DEFAULT_DENY, roles)
