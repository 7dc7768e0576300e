"""PolicyService messages <-> the policy model, and policy diffs.

Every error names the field of the request it comes from, e.g.
``policy.roles[1].rules[0].dst_prefix: expected a CIDR prefix, got '10.0.0.1/33'``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from vpnr.core.daemon import unix_timestamp
from vpnr.policyd.compiler import Ids
from vpnr.policyd.model import (
    ROLE_NAME_RE,
    Action,
    BindingMeta,
    IPNetwork,
    Policy,
    PolicyError,
    Rule,
    parse_prefix,
)
from vpnr.v1 import codes_pb2, policy_pb2

ZONE_NAMES = {codes_pb2.ZONE_INTERNAL: "internal", codes_pb2.ZONE_VPN: "vpn",
              codes_pb2.ZONE_EXTERNAL: "external"}
SOURCE_MAX = 64
TEXT_MAX = 256


def required_prefix(where: str, value: str) -> IPNetwork:
    """A CIDR prefix that must be present."""
    net = parse_prefix(where, value)
    if net is None:
        raise PolicyError(where, "a prefix is required")
    return net


def _text(where: str, value: str, limit: int = TEXT_MAX) -> str:
    if len(value) > limit:
        raise PolicyError(where, f"at most {limit} characters")
    return value


def rule_from_proto(msg: policy_pb2.Rule, where: str, role: str | None = None) -> Rule:
    """A model Rule from a proto Rule (``role`` overrides msg.role when given)."""
    if msg.action not in (policy_pb2.ACTION_ALLOW, policy_pb2.ACTION_DENY):
        raise PolicyError(f"{where}.action", "expected ACTION_ALLOW or ACTION_DENY")
    if msg.protocol not in codes_pb2.Protocol.values():
        raise PolicyError(f"{where}.protocol", f"unknown protocol {msg.protocol}")
    rule = Rule(
        id=msg.id, role=role if role is not None else msg.role, priority=msg.priority,
        action=Action(msg.action), protocol=msg.protocol,
        src_prefix=parse_prefix(f"{where}.src_prefix", msg.src_prefix),
        dst_prefix=parse_prefix(f"{where}.dst_prefix", msg.dst_prefix),
        dst_port_from=msg.dst_port_from, dst_port_to=msg.dst_port_to,
        description=_text(f"{where}.description", msg.description))
    # id 0 asks for a server-assigned id (assign_rule_ids); check the rest meanwhile.
    (rule if rule.id else dataclasses.replace(rule, id=1)).validate(where)
    return rule


def rule_to_proto(rule: Rule) -> policy_pb2.Rule:
    """A proto Rule."""
    return policy_pb2.Rule(
        id=rule.id, role=rule.role, priority=rule.priority,
        action=cast(policy_pb2.Action, int(rule.action)),
        protocol=cast(codes_pb2.Protocol, rule.protocol),
        src_prefix=str(rule.src_prefix or ""), dst_prefix=str(rule.dst_prefix or ""),
        dst_port_from=rule.dst_port_from, dst_port_to=rule.dst_port_to,
        description=rule.description)


def binding_meta_from_proto(msg: policy_pb2.Binding, where: str,
                            default_source: str = "admin") -> BindingMeta:
    """Owner and expiry of a binding."""
    expires = None
    if msg.HasField("expires_at"):
        expires = msg.expires_at.seconds + msg.expires_at.nanos / 1e9
    return BindingMeta(source=_text(f"{where}.source", msg.source or default_source,
                                    SOURCE_MAX),
                       subject=_text(f"{where}.subject", msg.subject), expires_at=expires)


def binding_to_proto(net: IPNetwork, roles: Iterable[str], meta: BindingMeta
                     ) -> policy_pb2.Binding:
    """A proto Binding."""
    msg = policy_pb2.Binding(prefix=str(net), roles=list(roles), source=meta.source,
                             subject=meta.subject)
    stamp = unix_timestamp(meta.expires_at or 0)
    if stamp is not None:
        msg.expires_at.CopyFrom(stamp)
    return msg


def zone_from_proto(msg: policy_pb2.ZoneAssignment, where: str) -> tuple[IPNetwork, int, str]:
    """(prefix, zone, description) of a zone assignment."""
    net = required_prefix(f"{where}.prefix", msg.prefix)
    if msg.zone not in ZONE_NAMES:
        raise PolicyError(f"{where}.zone", "expected ZONE_INTERNAL, ZONE_VPN or ZONE_EXTERNAL")
    return net, msg.zone, _text(f"{where}.description", msg.description)


def policy_from_document(doc: policy_pb2.PolicyDocument, where: str = "policy") -> Policy:
    """A validated Policy from a whole document."""
    policy = Policy()
    for i, role in enumerate(doc.roles):
        rwhere = f"{where}.roles[{i}]"
        if not ROLE_NAME_RE.fullmatch(role.name):
            raise PolicyError(f"{rwhere}.name", "expected a-z, 0-9 and _.:- (up to 63), "
                                                f"starting alnum, got {role.name!r}")
        if role.name in policy.roles:
            raise PolicyError(f"{rwhere}.name", f"role {role.name!r} is defined twice")
        rules = [rule_from_proto(r, f"{rwhere}.rules[{j}]", role.name)
                 for j, r in enumerate(role.rules)]
        policy.roles[role.name] = rules
        policy.role_descriptions[role.name] = _text(f"{rwhere}.description", role.description)
    for i, binding in enumerate(doc.bindings):
        bwhere = f"{where}.bindings[{i}]"
        net = required_prefix(f"{bwhere}.prefix", binding.prefix)
        if net in policy.bindings:
            raise PolicyError(f"{bwhere}.prefix", f"binding {net} is listed twice")
        policy.bindings[net] = tuple(binding.roles)
        policy.binding_meta[net] = binding_meta_from_proto(binding, bwhere)
    for i, zone in enumerate(doc.zones):
        zwhere = f"{where}.zones[{i}]"
        net, value, description = zone_from_proto(zone, zwhere)
        if net in policy.zones:
            raise PolicyError(f"{zwhere}.prefix", f"zone {net} is listed twice")
        policy.zones[net] = value
        policy.zone_descriptions[net] = description
    assign_rule_ids(policy)
    policy.validate()
    return policy


def assign_rule_ids(policy: Policy) -> None:
    """Give rules sent with id 0 the next free ids (in document order)."""
    used = {r.id for rules in policy.roles.values() for r in rules if r.id}
    next_id = max(used, default=0) + 1
    for rules in policy.roles.values():
        for j, rule in enumerate(rules):
            if rule.id == 0:
                rules[j] = Rule(next_id, rule.role, rule.priority, rule.action, rule.protocol,
                                rule.src_prefix, rule.dst_prefix, rule.dst_port_from,
                                rule.dst_port_to, rule.description)
                next_id += 1


def role_to_proto(policy: Policy, ids: Ids, name: str) -> policy_pb2.Role:
    """A proto Role with its rules."""
    return policy_pb2.Role(name=name, id=ids.roles.get(name, 0),
                           description=policy.role_descriptions.get(name, ""),
                           rules=[rule_to_proto(r) for r in policy.roles[name]])


def zone_to_proto(policy: Policy, net: IPNetwork) -> policy_pb2.ZoneAssignment:
    """A proto ZoneAssignment."""
    return policy_pb2.ZoneAssignment(prefix=str(net),
                                     zone=cast(codes_pb2.Zone, policy.zones[net]),
                                     description=policy.zone_descriptions.get(net, ""))


def document(policy: Policy, ids: Ids, version: int, updated_at: float | None = None
             ) -> policy_pb2.PolicyDocument:
    """The whole policy as a PolicyDocument."""
    doc = policy_pb2.PolicyDocument(
        version=version,
        roles=[role_to_proto(policy, ids, n) for n in sorted(policy.roles)],
        bindings=[binding_to_proto(net, policy.bindings[net], meta_of(policy, net))
                  for net in sorted(policy.bindings, key=net_order)],
        zones=[zone_to_proto(policy, net) for net in sorted(policy.zones, key=net_order)])
    stamp = unix_timestamp(updated_at or 0)
    if stamp is not None:
        doc.updated_at.CopyFrom(stamp)
    return doc


def meta_of(policy: Policy, net: IPNetwork) -> BindingMeta:
    """A binding's owner data (defaults when none was recorded)."""
    return policy.binding_meta.get(net, BindingMeta())


def net_order(net: IPNetwork) -> tuple[int, int, int]:
    """Sort key: family, address, prefix length."""
    return net.version, int(net.network_address), net.prefixlen


def copy_policy(policy: Policy) -> Policy:
    """A copy whose containers can be changed without touching ``policy``."""
    return Policy(roles={k: list(v) for k, v in policy.roles.items()},
                  bindings=dict(policy.bindings), zones=dict(policy.zones),
                  role_descriptions=dict(policy.role_descriptions),
                  binding_meta=dict(policy.binding_meta),
                  zone_descriptions=dict(policy.zone_descriptions))


def diff(old: Policy, new: Policy, from_version: int, to_version: int,
         limit: int | None = None) -> policy_pb2.PolicyDiff:
    """What changed between two policies (only the changes are sorted: cheap when few).
    ``limit`` caps each binding list (the counts stay exact)."""
    out = policy_pb2.PolicyDiff(from_version=from_version, to_version=to_version)
    old_b, new_b = old.bindings, new.bindings
    added = [n for n in new_b if n not in old_b]
    removed = [n for n in old_b if n not in new_b]
    changed = [n for n, roles in new_b.items() if n in old_b and (
        old_b[n] != roles or meta_of(old, n) != meta_of(new, n))]
    out.bindings_added_count, out.bindings_removed_count = len(added), len(removed)
    out.bindings_changed_count = len(changed)
    if limit is not None and max(len(added), len(removed), len(changed)) > limit:
        out.truncated = True
    for net in sorted(added, key=net_order)[:limit]:
        out.bindings_added.append(binding_to_proto(net, new_b[net], meta_of(new, net)))
    for net in sorted(removed, key=net_order)[:limit]:
        out.bindings_removed.append(binding_to_proto(net, old_b[net], meta_of(old, net)))
    for net in sorted(changed, key=net_order)[:limit]:
        out.bindings_changed.append(binding_to_proto(net, new_b[net], meta_of(new, net)))
    out.roles_added.extend(sorted(new.roles.keys() - old.roles.keys()))
    out.roles_removed.extend(sorted(old.roles.keys() - new.roles.keys()))
    out.roles_changed.extend(sorted(
        n for n in old.roles.keys() & new.roles.keys()
        if old.roles[n] != new.roles[n]
        or [r.description for r in old.roles[n]] != [r.description for r in new.roles[n]]
        or old.role_descriptions.get(n, "") != new.role_descriptions.get(n, "")))
    for net in sorted(new.zones.keys() - old.zones.keys(), key=net_order):
        out.zones_added.append(zone_to_proto(new, net))
    for net in sorted(old.zones.keys() - new.zones.keys(), key=net_order):
        out.zones_removed.append(zone_to_proto(old, net))
    for net in sorted(old.zones.keys() & new.zones.keys(), key=net_order):
        if old.zones[net] != new.zones[net]:
            out.zones_removed.append(zone_to_proto(old, net))
            out.zones_added.append(zone_to_proto(new, net))
    return out


def timestamp_seconds(ts: Timestamp) -> float:
    """A Timestamp as Unix seconds."""
    return ts.seconds + ts.nanos / 1e9


def parse_address(where: str, value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address (no prefix)."""
    try:
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise PolicyError(where, f"expected an IP address, got {value!r}") from exc
