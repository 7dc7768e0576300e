"""Reading a parsed policy-file tree into a ``PolicyDocument`` and decision tests.

Checks everything the file alone can tell (types, unknown keys, CIDRs, ports, enum names,
duplicates, references to roles) and reports every problem as
``<file>: <place>: <what was expected, what was found>``. The daemon stays the authority on
the policy; these checks exist so that a typo is named by its place in the file, not by a
field of a gRPC request.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any, cast

from google.protobuf import timestamp_pb2

from vpnr.policyd.model import MAX_ROLES_PER_BINDING, MAX_RULES_PER_ROLE, ROLE_NAME_RE
from vpnr.v1 import codes_pb2, policy_pb2
from vpnr.vpnctl.policy_terms import (
    ACTIONS,
    ICMP_PROTOCOLS,
    ICMP_TYPE_MAX,
    PORT_MAX,
    PORT_PROTOCOLS,
    PORTS_EXPECTED,
    PROTOCOLS,
    REASONS,
    UINT32_MAX,
    VERDICTS,
    ZONES,
    IPNetwork,
    enum_label,
    parse_ports,
    parse_prefix,
    quote,
)

MAX_REPORTED_PROBLEMS = 50  # past this the rest is noise: the first ones show the pattern


class PolicyFileError(ValueError):
    """A policy file cannot be used; ``problems`` holds one ``file: place: message`` each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class DecisionTest:
    """One ``[[tests]]`` entry: a packet to run through the live program and what to expect."""

    name: str
    src: str
    dst: str
    protocol: int
    expect: int                       # a codes_pb2.Verdict
    dst_port: int = 0
    src_port: int = 0
    icmp_type: int = 0
    interface: str = ""               # empty: policyd's first LAN interface
    fragment: bool = False            # craft a non-first fragment
    expect_reason: int | None = None  # a codes_pb2.Reason, when the test pins it
    expect_rule: int | None = None    # the matched rule id, when the test pins it

    def request(self) -> policy_pb2.TestDecisionRequest:
        """The TestDecision request that crafts this packet."""
        return policy_pb2.TestDecisionRequest(
            src=self.src, dst=self.dst, protocol=cast(codes_pb2.Protocol, self.protocol),
            src_port=self.src_port, dst_port=self.dst_port, interface=self.interface,
            icmp_type=self.icmp_type, fragment=self.fragment)

    def mismatches(self, decision: policy_pb2.Decision) -> list[str]:
        """How the live decision differs from the expectation (empty: the test passes)."""
        found: list[str] = []
        if decision.verdict != self.expect:
            found.append(f"verdict {enum_label(codes_pb2.Verdict, decision.verdict)}, "
                         f"expected {enum_label(codes_pb2.Verdict, self.expect)}")
        if self.expect_reason is not None and decision.reason != self.expect_reason:
            found.append(f"reason {enum_label(codes_pb2.Reason, decision.reason)}, "
                         f"expected {enum_label(codes_pb2.Reason, self.expect_reason)}")
        if self.expect_rule is not None:
            matched = decision.matched_rule.id if decision.HasField("matched_rule") else None
            if matched != self.expect_rule:
                shown = "none" if matched is None else str(matched)
                found.append(f"rule {shown}, expected {self.expect_rule}")
        return found


@dataclass
class PolicyFile:
    """What a policy file holds: the policy (version 0: files carry none) and its tests."""

    policy: policy_pb2.PolicyDocument = field(default_factory=policy_pb2.PolicyDocument)
    tests: list[DecisionTest] = field(default_factory=list)


def _describe(value: Any, fmt: str) -> str:
    """How a wrong value is named in a message: its type in the file's words, and itself."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, (datetime, date, time)):
        return f"date/time {value.isoformat()}"
    if isinstance(value, Mapping):
        return "a table" if fmt == "toml" else "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if value is None:
        return "null"
    return type(value).__name__


def _one_of(names: Iterable[str]) -> str:
    """``"allow" or "deny"``; ``one of "any", "tcp", "udp"`` past two choices."""
    quoted = [quote(name) for name in names]
    return " or ".join(quoted) if len(quoted) <= 2 else "one of " + ", ".join(quoted)


class _Reader:
    """Walks the parsed tree, converting values and collecting every problem with its place."""

    def __init__(self, source: str, fmt: str) -> None:
        self.source = source
        self.fmt = fmt
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        """Record one problem at ``where`` (``roles[0].rules[2].ports``)."""
        self.problems.append(f"{self.source}: {where}: {message}")

    def wrong_type(self, where: str, expected: str, value: Any) -> None:
        """Record a value of the wrong type."""
        self.problem(where, f"expected {expected}, got {_describe(value, self.fmt)}")

    def table(self, value: Any, where: str, allowed: Iterable[str]) -> dict[str, Any] | None:
        """A table whose keys are all in ``allowed``; unknown keys are problems.

        ``where`` is ``""`` for the file's top level."""
        if not isinstance(value, Mapping):
            self.wrong_type(where or "top level",
                            "a table" if self.fmt == "toml" else "a mapping", value)
            return None
        known = sorted(allowed)
        for key in value:
            if key in known:
                continue
            place = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f'did you mean "{close[0]}"?' if close else \
                "expected one of: " + ", ".join(known)
            self.problem(place, f"unknown key ({hint})")
        return dict(value)

    def tables(self, parent: Mapping[str, Any], key: str, where: str) -> list[tuple[str, Any]]:
        """The entries of an optional array of tables, each with its place."""
        place = f"{where}.{key}" if where else key
        value = parent.get(key, [])
        if not isinstance(value, list):
            self.wrong_type(place, "an array of tables" if self.fmt == "toml" else "a list",
                            value)
            return []
        return [(f"{place}[{index}]", item) for index, item in enumerate(value)]

    def required(self, table: Mapping[str, Any], key: str, where: str, expected: str) -> Any:
        """The value of a required key, or None after recording that it is missing."""
        if key not in table or table[key] is None:
            self.problem(f"{where}.{key}", f"missing (expected {expected})")
            return None
        return table[key]

    def string(self, table: Mapping[str, Any], key: str, where: str,
               required: bool = False, expected: str = "a string") -> str | None:
        """A string value; a missing optional one is ``""``."""
        if required:
            value = self.required(table, key, where, expected)
            if value is None:
                return None
        else:
            value = table.get(key, "")
            if value is None:
                value = ""
        if not isinstance(value, str):
            self.wrong_type(f"{where}.{key}", "a string", value)
            return None
        return value

    def integer(self, table: Mapping[str, Any], key: str, where: str, low: int, high: int,
                required: bool = False, default: int = 0) -> int | None:
        """An integer in [low, high]."""
        if required:
            value = self.required(table, key, where, f"an integer from {low} to {high}")
            if value is None:
                return None
        else:
            value = table.get(key, default)
            if value is None:
                return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong_type(f"{where}.{key}", f"an integer from {low} to {high}", value)
            return None
        if not low <= value <= high:
            self.problem(f"{where}.{key}", f"expected an integer from {low} to {high}, "
                                           f"got {value}")
            return None
        return value

    def boolean(self, table: Mapping[str, Any], key: str, where: str) -> bool | None:
        """An optional boolean (default false)."""
        value = table.get(key, False)
        if not isinstance(value, bool):
            self.wrong_type(f"{where}.{key}", "true or false", value)
            return None
        return value

    def choice(self, table: Mapping[str, Any], key: str, where: str, names: Mapping[str, int],
               required: bool = True, default: str = "") -> int | None:
        """One of an enum's file names, as its number."""
        expected = _one_of(names)
        if required:
            value = self.required(table, key, where, expected)
            if value is None:
                return None
        else:
            value = table.get(key, default)
            if value is None:
                value = default
        if not isinstance(value, str) or value not in names:
            self.wrong_type(f"{where}.{key}", expected, value)
            return None
        return names[value]

    def prefix(self, table: Mapping[str, Any], key: str, where: str,
               required: bool = False) -> IPNetwork | None:
        """A CIDR prefix; None when absent or empty (any) or after a problem."""
        text = self.string(table, key, where, required, expected="a CIDR prefix")
        if text is None:
            return None
        if text.strip() == "":
            if required:
                self.problem(f"{where}.{key}",
                             'expected a CIDR prefix such as "10.2.0.0/24", got ""')
            return None
        try:
            return parse_prefix(text)
        except ValueError as exc:
            self.problem(f"{where}.{key}", str(exc))
            return None

    def address(self, table: Mapping[str, Any], key: str,
                where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """A required IPv4 or IPv6 address."""
        text = self.string(table, key, where, required=True,
                           expected="an IPv4 or IPv6 address")
        if text is None:
            return None
        try:
            return ipaddress.ip_address(text.strip())
        except ValueError:
            self.problem(f"{where}.{key}",
                         f'expected an IPv4 or IPv6 address such as "10.2.0.5", got '
                         f"{quote(text)}")
            return None

    def timestamp(self, table: Mapping[str, Any], key: str,
                  where: str) -> timestamp_pb2.Timestamp | None:
        """An optional RFC 3339 time with a UTC offset; None when absent or after a problem."""
        value = table.get(key)
        if value is None or value == "":
            return None
        expected = 'an RFC 3339 time with an offset, such as "2030-01-31T12:00:00Z"'
        stamp = timestamp_pb2.Timestamp()
        if isinstance(value, datetime):
            if value.tzinfo is None:
                self.problem(f"{where}.{key}", f"{value.isoformat()} has no UTC offset "
                                               f"(expected {expected})")
                return None
            stamp.FromDatetime(value.astimezone(UTC))
            return stamp
        if not isinstance(value, str):
            self.wrong_type(f"{where}.{key}", expected, value)
            return None
        try:
            stamp.FromJsonString(value)
        except ValueError:
            self.problem(f"{where}.{key}", f"expected {expected}, got {quote(value)}")
            return None
        return stamp

    def string_list(self, table: Mapping[str, Any], key: str, where: str) -> list[str] | None:
        """A required, non-empty list of strings."""
        value = self.required(table, key, where, "a list of role names")
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            self.wrong_type(f"{where}.{key}", "a non-empty list of role names", value)
            return None
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.wrong_type(f"{where}.{key}[{index}]", "a role name", item)
                return None
        return list(value)


ROLE_KEYS = ("name", "description", "rules")
RULE_KEYS = ("id", "priority", "action", "protocol", "src", "dst", "ports", "description")
BINDING_KEYS = ("prefix", "roles", "subject", "source", "expires_at")
ZONE_KEYS = ("prefix", "zone", "description")
TEST_KEYS = ("name", "src", "dst", "protocol", "dst_port", "src_port", "icmp_type",
             "interface", "fragment", "expect", "expect_reason", "expect_rule")
TOP_KEYS = ("roles", "bindings", "zones", "tests")


def _read_rule(reader: _Reader, value: Any, where: str, role: str,
               rule_places: dict[int, str]) -> policy_pb2.Rule | None:
    table = reader.table(value, where, RULE_KEYS)
    if table is None:
        return None
    before = len(reader.problems)
    rule_id = reader.integer(table, "id", where, 1, UINT32_MAX, required=True)
    priority = reader.integer(table, "priority", where, 0, UINT32_MAX)
    action = reader.choice(table, "action", where, ACTIONS)
    protocol = reader.choice(table, "protocol", where, PROTOCOLS, required=False,
                             default="any")
    src = reader.prefix(table, "src", where)
    dst = reader.prefix(table, "dst", where)
    description = reader.string(table, "description", where)
    ports: tuple[int, int] | None = (0, 0)
    ports_value = table.get("ports", "")
    if isinstance(ports_value, int) and not isinstance(ports_value, bool):
        ports_value = str(ports_value)  # a lone port written as a number means itself
    if ports_value is None:
        ports_value = ""
    if not isinstance(ports_value, str):
        reader.wrong_type(f"{where}.ports", PORTS_EXPECTED.removeprefix("expected "),
                          ports_value)
        ports = None
    else:
        try:
            ports = parse_ports(ports_value)
        except ValueError as exc:
            reader.problem(f"{where}.ports", str(exc))
            ports = None
    if rule_id is not None:
        if rule_id in rule_places:
            reader.problem(f"{where}.id", f"rule id {rule_id} is already used by "
                                          f"{rule_places[rule_id]}")
        else:
            rule_places[rule_id] = where
    if ports not in (None, (0, 0)) and protocol is not None and protocol not in PORT_PROTOCOLS:
        reader.problem(f"{where}.ports", "a port range needs protocol \"tcp\" or \"udp\", "
                                         f"got {quote(enum_label(codes_pb2.Protocol, protocol))}")
    families = {p.version for p in (src, dst) if p is not None}
    if len(families) > 1:
        reader.problem(f"{where}.dst", "src and dst mix IPv4 and IPv6: a rule matches one "
                                       "family")
    elif protocol == codes_pb2.PROTOCOL_ICMP and families == {6}:
        reader.problem(f"{where}.protocol", '"icmp" with an IPv6 prefix (use "icmpv6")')
    elif protocol == codes_pb2.PROTOCOL_ICMPV6 and families == {4}:
        reader.problem(f"{where}.protocol", '"icmpv6" with an IPv4 prefix (use "icmp")')
    if len(reader.problems) > before:
        return None
    assert rule_id is not None and priority is not None and action is not None
    assert protocol is not None and ports is not None and description is not None
    return policy_pb2.Rule(
        id=rule_id, role=role, priority=priority, action=cast(policy_pb2.Action, action),
        protocol=cast(codes_pb2.Protocol, protocol),
        src_prefix=str(src) if src else "", dst_prefix=str(dst) if dst else "",
        dst_port_from=ports[0], dst_port_to=ports[1], description=description)


def _read_role(reader: _Reader, value: Any, where: str, role_places: dict[str, str],
               rule_places: dict[int, str]) -> policy_pb2.Role | None:
    table = reader.table(value, where, ROLE_KEYS)
    if table is None:
        return None
    before = len(reader.problems)
    name = reader.string(table, "name", where, required=True)
    if name is not None:
        if not ROLE_NAME_RE.fullmatch(name):
            reader.problem(f"{where}.name", "expected a-z, 0-9 and _.:- (at most 63 "
                                            f"characters, starting a-z or 0-9), got "
                                            f"{quote(name)}")
        elif name in role_places:
            reader.problem(f"{where}.name", f"role {quote(name)} is already defined at "
                                            f"{role_places[name]}")
        else:
            role_places[name] = where
    description = reader.string(table, "description", where)
    rule_entries = reader.tables(table, "rules", where)
    if len(rule_entries) > MAX_RULES_PER_ROLE:
        reader.problem(f"{where}.rules", f"{len(rule_entries)} rules, a role has at most "
                                         f"{MAX_RULES_PER_ROLE}")
    rules = [_read_rule(reader, item, place, name or "", rule_places)
             for place, item in rule_entries]
    if len(reader.problems) > before:
        return None
    assert name is not None and description is not None
    return policy_pb2.Role(name=name, description=description,
                           rules=[rule for rule in rules if rule is not None])


def _read_binding(reader: _Reader, value: Any, where: str, roles: Mapping[str, str],
                  binding_places: dict[IPNetwork, str]) -> policy_pb2.Binding | None:
    table = reader.table(value, where, BINDING_KEYS)
    if table is None:
        return None
    before = len(reader.problems)
    prefix = reader.prefix(table, "prefix", where, required=True)
    if prefix is not None:
        if prefix in binding_places:
            reader.problem(f"{where}.prefix", f"prefix {prefix} is already bound at "
                                              f"{binding_places[prefix]}")
        else:
            binding_places[prefix] = where
    role_names = reader.string_list(table, "roles", where)
    if role_names is not None:
        if len(role_names) > MAX_ROLES_PER_BINDING:
            reader.problem(f"{where}.roles", f"{len(role_names)} roles, a binding has at "
                                             f"most {MAX_ROLES_PER_BINDING}")
        seen: set[str] = set()
        for index, role in enumerate(role_names):
            if role in seen:
                reader.problem(f"{where}.roles[{index}]", f"role {quote(role)} is listed "
                                                          "twice")
            elif role not in roles:
                defined = ", ".join(roles) or "none"
                reader.problem(f"{where}.roles[{index}]",
                               f"unknown role {quote(role)} (roles defined in this file: "
                               f"{defined})")
            seen.add(role)
    subject = reader.string(table, "subject", where)
    source = reader.string(table, "source", where)
    expires_at = reader.timestamp(table, "expires_at", where)
    if len(reader.problems) > before:
        return None
    assert prefix is not None and role_names is not None
    assert subject is not None and source is not None
    binding = policy_pb2.Binding(prefix=str(prefix), roles=role_names, subject=subject,
                                 source=source)
    if expires_at is not None:
        binding.expires_at.CopyFrom(expires_at)
    return binding


def _read_zone(reader: _Reader, value: Any, where: str,
               zone_places: dict[IPNetwork, str]) -> policy_pb2.ZoneAssignment | None:
    table = reader.table(value, where, ZONE_KEYS)
    if table is None:
        return None
    before = len(reader.problems)
    prefix = reader.prefix(table, "prefix", where, required=True)
    if prefix is not None:
        if prefix in zone_places:
            reader.problem(f"{where}.prefix", f"prefix {prefix} already has a zone at "
                                              f"{zone_places[prefix]}")
        else:
            zone_places[prefix] = where
    zone = reader.choice(table, "zone", where, ZONES)
    description = reader.string(table, "description", where)
    if len(reader.problems) > before:
        return None
    assert prefix is not None and zone is not None
    return policy_pb2.ZoneAssignment(prefix=str(prefix), zone=cast(codes_pb2.Zone, zone),
                                     description=description or "")


def _read_test(reader: _Reader, value: Any, where: str,
               test_places: dict[str, str]) -> DecisionTest | None:
    table = reader.table(value, where, TEST_KEYS)
    if table is None:
        return None
    before = len(reader.problems)
    name = reader.string(table, "name", where, required=True)
    if name is not None:
        if name.strip() == "":
            reader.problem(f"{where}.name", "expected a non-empty name")
        elif name in test_places:
            reader.problem(f"{where}.name", f"test {quote(name)} is already defined at "
                                            f"{test_places[name]}")
        else:
            test_places[name] = where
    src = reader.address(table, "src", where)
    dst = reader.address(table, "dst", where)
    protocol = reader.choice(table, "protocol", where, PROTOCOLS)
    dst_port = reader.integer(table, "dst_port", where, 0, PORT_MAX)
    src_port = reader.integer(table, "src_port", where, 0, PORT_MAX)
    icmp_type = reader.integer(table, "icmp_type", where, 0, ICMP_TYPE_MAX)
    interface = reader.string(table, "interface", where)
    fragment = reader.boolean(table, "fragment", where)
    expect = reader.choice(table, "expect", where, VERDICTS)
    expect_reason = reader.choice(table, "expect_reason", where, REASONS, required=False) \
        if table.get("expect_reason") is not None else None
    expect_rule = reader.integer(table, "expect_rule", where, 1, UINT32_MAX) \
        if table.get("expect_rule") is not None else None
    if src is not None and dst is not None and src.version != dst.version:
        reader.problem(f"{where}.dst", f"src is IPv{src.version} and dst is IPv{dst.version}")
    if protocol is not None:
        label = quote(enum_label(codes_pb2.Protocol, protocol))
        for key in ("dst_port", "src_port"):
            if table.get(key) and protocol not in PORT_PROTOCOLS:
                reader.problem(f"{where}.{key}", f'ports need protocol "tcp" or "udp", '
                                                 f"got {label}")
        if table.get("icmp_type") and protocol not in ICMP_PROTOCOLS:
            reader.problem(f"{where}.icmp_type", f'needs protocol "icmp" or "icmpv6", '
                                                 f"got {label}")
        version = src.version if src is not None else None
        if protocol == codes_pb2.PROTOCOL_ICMP and version == 6:
            reader.problem(f"{where}.protocol", '"icmp" between IPv6 addresses (use "icmpv6")')
        elif protocol == codes_pb2.PROTOCOL_ICMPV6 and version == 4:
            reader.problem(f"{where}.protocol", '"icmpv6" between IPv4 addresses (use "icmp")')
    if len(reader.problems) > before:
        return None
    assert name is not None and src is not None and dst is not None
    assert protocol is not None and expect is not None and interface is not None
    assert dst_port is not None and src_port is not None and icmp_type is not None
    assert fragment is not None
    return DecisionTest(name=name, src=str(src), dst=str(dst), protocol=protocol,
                        expect=expect, dst_port=dst_port, src_port=src_port,
                        icmp_type=icmp_type, interface=interface, fragment=fragment,
                        expect_reason=expect_reason, expect_rule=expect_rule)


def from_data(data: Any, source: str, fmt: str = "toml") -> PolicyFile:
    """The policy file from an already parsed tree; PolicyFileError lists every problem."""
    reader = _Reader(source, fmt)
    top = reader.table({} if data is None else data, "", TOP_KEYS)
    if top is None:
        raise PolicyFileError(reader.problems)
    role_places: dict[str, str] = {}
    rule_places: dict[int, str] = {}
    roles = [_read_role(reader, item, where, role_places, rule_places)
             for where, item in reader.tables(top, "roles", "")]
    binding_places: dict[IPNetwork, str] = {}
    bindings = [_read_binding(reader, item, where, role_places, binding_places)
                for where, item in reader.tables(top, "bindings", "")]
    zone_places: dict[IPNetwork, str] = {}
    zones = [_read_zone(reader, item, where, zone_places)
             for where, item in reader.tables(top, "zones", "")]
    test_places: dict[str, str] = {}
    tests = [_read_test(reader, item, where, test_places)
             for where, item in reader.tables(top, "tests", "")]
    if reader.problems:
        shown = reader.problems[:MAX_REPORTED_PROBLEMS]
        hidden = len(reader.problems) - len(shown)
        if hidden:
            shown.append(f"{source}: ... and {hidden} more problems")
        raise PolicyFileError(shown)
    document = policy_pb2.PolicyDocument(
        roles=[r for r in roles if r is not None],
        bindings=[b for b in bindings if b is not None],
        zones=[z for z in zones if z is not None])
    return PolicyFile(document, [t for t in tests if t is not None])


