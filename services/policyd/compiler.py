"""Desired policy -> the contents of one kernel policy slot. Pure: no kernel, no I/O.

The program's layout (bpf/lib/maps.h): source prefix -> (binding id, role-set id) in an LPM
trie per family; role set -> buckets keyed by (family, protocol class, destination port);
each bucket is a run of compiled rules in the rule table, denies first then allows, each in
(priority, id) order, so the first match in the run is the decision. A packet therefore
meets only the rules of its own roles that can apply to its protocol and port.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from vpnr.policyd import layout
from vpnr.policyd.model import MAX_ROLES_PER_BINDING, Action, IPNetwork, Policy, Rule
from vpnr.v1 import codes_pb2

TCP, UDP = codes_pb2.PROTOCOL_TCP, codes_pb2.PROTOCOL_UDP
ICMP, ICMPV6 = codes_pb2.PROTOCOL_ICMP, codes_pb2.PROTOCOL_ICMPV6
PROTOCOL_CLASSES = (TCP, UDP, ICMP, ICMPV6, 0)  # 0: every other IP protocol

RoleSet = tuple[int, ...]  # sorted role ids


class CapacityError(Exception):
    """The policy does not fit the kernel maps; says which limit."""


@dataclass
class Ids:
    """Kernel ids of roles, role sets and bindings; kept stable across versions so that
    counters stay with their identity and unchanged entries are not rewritten."""

    roles: dict[str, int] = field(default_factory=dict)
    rolesets: dict[RoleSet, int] = field(default_factory=dict)
    bindings: dict[IPNetwork, int] = field(default_factory=dict)

    def copy(self) -> Ids:
        """An independent copy."""
        return Ids(dict(self.roles), dict(self.rolesets), dict(self.bindings))


K = TypeVar("K")


def _allocate(existing: dict[K, int], wanted: Iterable[K], limit: int,
                 what: str) -> dict[K, int]:
    """Keep the ids of what stays; give what is new the lowest free ids (0 is reserved)."""
    wanted = list(wanted)
    kept = {k: existing[k] for k in wanted if k in existing}
    used = set(kept.values())
    free = (i for i in range(1, limit) if i not in used)
    for key in wanted:
        if key not in kept:
            try:
                kept[key] = next(free)
            except StopIteration:
                raise CapacityError(f"more than {limit - 1} {what}") from None
    return kept


def role_set(policy: Policy, ids: Ids, roles: Iterable[str]) -> RoleSet:
    """The role-set key of a list of role names."""
    return tuple(sorted(ids.roles[r] for r in roles))


def assign_ids(policy: Policy, previous: Ids) -> Ids:
    """Ids for every role, role set and binding of ``policy``."""
    ids = Ids(roles=_allocate(previous.roles, sorted(policy.roles), layout.MAX_ROLES,
                              "roles"))
    sets = {role_set(policy, ids, r) for r in policy.bindings.values()}
    ids.rolesets = _allocate(previous.rolesets, sorted(sets), layout.MAX_ROLESETS,
                             "distinct role combinations")
    # Document order, not sorted: as deterministic, and sorting 100,000 prefixes is not free.
    ids.bindings = _allocate(previous.bindings, policy.bindings, layout.MAX_BINDINGS,
                             "bindings")
    return ids


# -- packing ---------------------------------------------------------------------------


def lpm_key(net: IPNetwork, slot: int) -> tuple[int, bytes]:
    """(family, packed LPM key) of a prefix in a slot: the slot byte, then the address."""
    if net.version == 4:
        return 4, layout.LPM4_KEY.pack(8 + net.prefixlen, slot, net.network_address.packed)
    return 6, layout.LPM6_KEY.pack(8 + net.prefixlen, slot, net.network_address.packed)


def _words(net: IPNetwork | None) -> tuple[list[int], list[int]]:
    """(network, mask) as the four u32 words the program loads from network-order bytes.
    IPv4 fills word 0; zero words match anything, and "any" is all zero."""
    if net is None:
        return [0, 0, 0, 0], [0, 0, 0, 0]
    addr = net.network_address.packed.ljust(16, b"\0")
    mask = net.netmask.packed.ljust(16, b"\0")
    as_words = [int.from_bytes(addr[i:i + 4], "little") for i in range(0, 16, 4)]
    mask_words = [int.from_bytes(mask[i:i + 4], "little") for i in range(0, 16, 4)]
    return as_words, mask_words


def rule_family(rule: Rule) -> int | None:
    """4 or 6 when the rule's prefixes pin a family, else None (both)."""
    for prefix in (rule.src_prefix, rule.dst_prefix):
        if prefix is not None:
            return prefix.version
    return None


def pack_rule(rule: Rule, role_id: int) -> bytes:
    """struct vpnr_rule."""
    src_net, src_mask = _words(rule.src_prefix)
    dst_net, dst_mask = _words(rule.dst_prefix)
    flags = 0
    if rule.src_prefix is None:
        flags |= layout.RULE_SRC_ANY
    if rule.dst_prefix is None:
        flags |= layout.RULE_DST_ANY
        if rule.action == Action.ALLOW:
            flags |= layout.RULE_ALLOW_DST_ANY
    ports = (rule.dst_port_from, rule.dst_port_to) if rule.has_ports else (0, 65535)
    action = layout.ACTION_DENY if rule.action == Action.DENY else layout.ACTION_ALLOW
    return layout.RULE.pack(*src_net, *src_mask, *dst_net, *dst_mask, rule.id, role_id,
                            ports[0], ports[1], action, flags, 0)


def pack_roleset(roles: RoleSet) -> bytes:
    """struct vpnr_roleset."""
    padded = list(roles) + [0] * (layout.MAX_ROLES_PER_EVENT - len(roles))
    return layout.ROLESET.pack(len(roles), *padded, 0)


def evaluation_order(rules: Iterable[Rule]) -> list[Rule]:
    """Denies first, then allows; each by (priority, id): the first match decides."""
    return sorted(rules, key=lambda r: (r.action != Action.DENY, r.priority, r.id))


# -- the slot image --------------------------------------------------------------------


@dataclass
class SlotImage:
    """Everything one slot of the policy maps holds, as packed keys and values."""

    slot: int
    src4: dict[bytes, bytes] = field(default_factory=dict)
    src6: dict[bytes, bytes] = field(default_factory=dict)
    zones4: dict[bytes, bytes] = field(default_factory=dict)
    zones6: dict[bytes, bytes] = field(default_factory=dict)
    rolesets: dict[int, bytes] = field(default_factory=dict)
    buckets: dict[bytes, bytes] = field(default_factory=dict)
    rules: list[bytes] = field(default_factory=list)  # index within the slot's half
    runs: dict[tuple[tuple[int, int], ...], int] = field(default_factory=dict)
    compiled_rolesets: set[int] = field(default_factory=set)

    def bucket_run(self, entries: list[tuple[Rule, int]]) -> tuple[int, int]:
        """(start, count) of a run of compiled rules, shared by identical runs."""
        key = tuple((rule.id, role_id) for rule, role_id in entries)
        start = self.runs.get(key)
        if start is None:
            start = len(self.rules)
            if start + len(entries) > layout.RULE_TABLE_HALF:
                raise CapacityError(f"the compiled rules need more than "
                                    f"{layout.RULE_TABLE_HALF} rule-table entries")
            self.rules.extend(pack_rule(rule, role_id) for rule, role_id in entries)
            self.runs[key] = start
        return start, len(entries)


def compile_roleset(policy: Policy, ids: Ids, roleset_id: int, roles: RoleSet,
                    image: SlotImage) -> dict[bytes, bytes]:
    """Add one role set's rule runs to the image; returns its new bucket entries."""
    by_id = {v: k for k, v in ids.roles.items()}
    rules = [(rule, role_id) for role_id in roles for rule in policy.roles[by_id[role_id]]]
    buckets: dict[bytes, bytes] = {}

    def add(family: int, proto: int, kind: int, port: int,
            entries: list[tuple[Rule, int]]) -> None:
        if not entries:
            return  # no bucket: the packet is default-denied
        ordered = sorted(entries, key=lambda e: (e[0].action != Action.DENY, e[0].priority,
                                                 e[0].id))
        start, count = image.bucket_run(ordered)
        fam_bit = layout.BUCKET_IPV6 if family == 6 else 0
        key = layout.BUCKET_KEY.pack(roleset_id, port, proto, image.slot | fam_bit | kind)
        buckets[key] = layout.BUCKET.pack(start, count)

    for family in (4, 6):
        fam_rules = [(r, i) for r, i in rules if rule_family(r) in (None, family)]
        for proto in PROTOCOL_CLASSES:
            applicable = [(r, i) for r, i in fam_rules
                          if r.protocol == codes_pb2.PROTOCOL_ANY
                          or (proto != 0 and r.protocol == proto)]
            portless = [(r, i) for r, i in applicable if not r.has_ports]
            if proto not in (TCP, UDP):
                add(family, proto, layout.BUCKET_NOPORT, 0, portless)
                continue
            ported = [(r, i) for r, i in applicable if r.has_ports]
            singles = sorted({r.dst_port_from for r, _ in ported
                              if r.dst_port_from == r.dst_port_to})
            for port in singles:
                covering = [(r, i) for r, i in ported
                            if r.dst_port_from <= port <= r.dst_port_to]
                add(family, proto, layout.BUCKET_EXACT, port, portless + covering)
            ranges = [(r, i) for r, i in ported if r.dst_port_from != r.dst_port_to]
            add(family, proto, layout.BUCKET_DEFAULT, 0, portless + ranges)
            add(family, proto, layout.BUCKET_NOPORT, 0, portless)  # non-first fragments
    image.rolesets[roleset_id] = pack_roleset(roles)
    image.compiled_rolesets.add(roleset_id)
    image.buckets.update(buckets)
    return buckets


def binding_entry(ids: Ids, net: IPNetwork, roles: RoleSet, slot: int) -> tuple[int, bytes,
                                                                                 bytes]:
    """(family, LPM key, value) of one binding."""
    family, key = lpm_key(net, slot)
    return family, key, layout.BINDING.pack(ids.bindings[net], ids.rolesets[roles])


def compile_slot(policy: Policy, ids: Ids, slot: int) -> SlotImage:
    """The complete image of ``policy`` for one slot."""
    image = SlotImage(slot)
    for roles, roleset_id in sorted(ids.rolesets.items(), key=lambda kv: kv[1]):
        if len(roles) > MAX_ROLES_PER_BINDING:
            raise CapacityError(f"role set {roles} has more than {MAX_ROLES_PER_BINDING} roles")
        compile_roleset(policy, ids, roleset_id, roles, image)
    if len(image.buckets) > layout.MAX_BUCKETS // 2:
        raise CapacityError(f"the policy needs {len(image.buckets)} rule buckets, at most "
                            f"{layout.MAX_BUCKETS // 2}")
    counts = {4: 0, 6: 0}
    for net, names in policy.bindings.items():
        family, key, value = binding_entry(ids, net, role_set(policy, ids, names), slot)
        (image.src4 if family == 4 else image.src6)[key] = value
        counts[family] += 1
    for family, count in counts.items():
        if count > layout.MAX_BINDINGS:
            raise CapacityError(f"{count} IPv{family} bindings, at most {layout.MAX_BINDINGS}")
    for net, zone in policy.zones.items():
        family, key = lpm_key(net, slot)
        (image.zones4 if family == 4 else image.zones6)[key] = layout.U32.pack(zone)
    if max(len(image.zones4), len(image.zones6)) > layout.MAX_ZONES // 2:
        raise CapacityError(f"more than {layout.MAX_ZONES // 2} zone prefixes per family")
    return image
