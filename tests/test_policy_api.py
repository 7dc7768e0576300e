"""PolicyService against a real policyd in its own network namespace: no mocks.

Every decision is the live XDP program's (TestDecision runs it with BPF_PROG_TEST_RUN).
Every rejected request must leave the policy exactly as it was (version and content).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest

from conftest import DaemonProcess, RunningPolicyd
from vpnr.core import bpfsys
from vpnr.policyd import layout
from vpnr.policyd.kernel import open_binding_trie
from vpnr.v1 import audit_pb2, audit_pb2_grpc, codes_pb2, common_pb2, policy_pb2, policy_pb2_grpc

pytestmark = pytest.mark.root

P = policy_pb2
Stub = policy_pb2_grpc.PolicyServiceStub
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
STALE = grpc.StatusCode.FAILED_PRECONDITION
TCP, UDP, ICMP = codes_pb2.PROTOCOL_TCP, codes_pb2.PROTOCOL_UDP, codes_pb2.PROTOCOL_ICMP
ANY = codes_pb2.PROTOCOL_ANY
ALLOW, DENY = P.ACTION_ALLOW, P.ACTION_DENY
EXPIRY_WAIT = 4.0


# ------------------------------------------------------------------------------ builders

def rule(rule_id: int, action: int, protocol: int, dst: str = "", ports: str = "",
         role: str = "", priority: int = 0, src: str = "") -> policy_pb2.Rule:
    """A Rule; ``ports`` is "" (any), "22" or "1000-2000"."""
    low, _, high = ports.partition("-")
    return P.Rule(id=rule_id, role=role, priority=priority, action=action,  # type: ignore[arg-type]
                  protocol=protocol, src_prefix=src, dst_prefix=dst,  # type: ignore[arg-type]
                  dst_port_from=int(low or 0), dst_port_to=int(high or low or 0))


def role(name: str, *rules: policy_pb2.Rule, description: str = "") -> policy_pb2.Role:
    return P.Role(name=name, rules=rules, description=description)


def binding(prefix: str, *roles: str, source: str = "", subject: str = "",
            expires_ns: int = 0) -> policy_pb2.Binding:
    msg = P.Binding(prefix=prefix, roles=roles, source=source, subject=subject)
    if expires_ns:
        msg.expires_at.FromNanoseconds(expires_ns)
    return msg


def zone(prefix: str, value: int = codes_pb2.ZONE_INTERNAL,
         description: str = "") -> policy_pb2.ZoneAssignment:
    return P.ZoneAssignment(prefix=prefix, zone=value,  # type: ignore[arg-type]
                            description=description)


def base_policy() -> policy_pb2.PolicyDocument:
    """eng: ssh and ping to 10.2.0.0/24; contractor: deny 10.2.0.10; ops: anything to
    10.3.0.0/16. 10.1.1.5 holds eng and contractor (deny wins)."""
    return P.PolicyDocument(
        roles=[role("eng", rule(10, ALLOW, TCP, "10.2.0.0/24", "22"),
                    rule(11, ALLOW, ICMP, "10.2.0.0/24", priority=5), description="engineering"),
               role("contractor", rule(30, DENY, ANY, "10.2.0.10/32")),
               role("ops", rule(20, ALLOW, ANY, "10.3.0.0/16"))],
        bindings=[binding("10.1.0.0/24", "eng", subject="eng-lan"),
                  binding("10.1.1.5/32", "eng", "contractor", subject="carol"),
                  binding("10.1.2.0/24", "ops")],
        zones=[zone("10.2.0.0/16", description="site B"), zone("10.3.0.0/16")])


def install(stub: Stub, doc: policy_pb2.PolicyDocument | None = None) -> int:
    """Replace the whole policy; returns the new version."""
    reply = stub.ReplacePolicy(P.ReplacePolicyRequest(policy=doc or base_policy(),
                                                      reason="test"))
    version: int = reply.version
    assert stub.GetPolicy(P.GetPolicyRequest()).version == version
    return version


# ------------------------------------------------------------------------------- helpers

def policy(stub: Stub) -> policy_pb2.PolicyDocument:
    doc: policy_pb2.PolicyDocument = stub.GetPolicy(P.GetPolicyRequest())
    return doc


def version(stub: Stub) -> int:
    return policy(stub).version


def content(doc: policy_pb2.PolicyDocument) -> policy_pb2.PolicyDocument:
    """The document without its version and time stamp."""
    out = P.PolicyDocument()
    out.CopyFrom(doc)
    out.ClearField("version")
    out.ClearField("updated_at")
    return out


def rejected(stub: Stub, call: Callable[[], object], code: grpc.StatusCode,
             *fragments: str) -> str:
    """``call`` fails with ``code``, its message names every fragment, and the policy is
    unchanged afterwards (version, content and time stamp)."""
    before = policy(stub)
    with pytest.raises(grpc.RpcError) as caught:
        call()
    details = caught.value.details() or ""
    assert caught.value.code() == code, (caught.value.code(), details)
    for fragment in fragments:
        assert fragment in details, (fragment, details)
    assert policy(stub) == before, f"half-applied after: {details}"
    return details


def decide(stub: Stub, src: str, dst: str, protocol: int = TCP, port: int = 22,
           interface: str = "") -> policy_pb2.Decision:
    answer: policy_pb2.Decision = stub.TestDecision(P.TestDecisionRequest(
        src=src, dst=dst, protocol=protocol, dst_port=port,  # type: ignore[arg-type]
        interface=interface))
    return answer


# (src, dst, protocol, port) -> (verdict, reason, rule id) under base_policy()
PROBES: dict[tuple[str, str, int, int], tuple[int, int, int]] = {
    ("10.1.0.7", "10.2.0.5", TCP, 22): (codes_pb2.VERDICT_ALLOW, codes_pb2.REASON_RULE_ALLOW, 10),
    ("10.1.0.7", "10.2.0.5", TCP, 80): (codes_pb2.VERDICT_DENY, codes_pb2.REASON_DEFAULT_DENY, 0),
    ("10.1.0.7", "10.2.0.5", ICMP, 0): (codes_pb2.VERDICT_ALLOW, codes_pb2.REASON_RULE_ALLOW, 11),
    ("10.1.1.5", "10.2.0.10", TCP, 22): (codes_pb2.VERDICT_DENY, codes_pb2.REASON_RULE_DENY, 30),
    ("10.1.1.5", "10.2.0.11", TCP, 22): (codes_pb2.VERDICT_ALLOW, codes_pb2.REASON_RULE_ALLOW,
                                         10),
    ("10.1.2.9", "10.3.7.7", UDP, 53): (codes_pb2.VERDICT_ALLOW, codes_pb2.REASON_RULE_ALLOW, 20),
    ("10.9.0.1", "10.2.0.5", TCP, 22): (codes_pb2.VERDICT_DENY, codes_pb2.REASON_NO_ROLE, 0),
}


def decisions(stub: Stub, extra: Sequence[tuple[str, str, int, int]] = ()
              ) -> dict[tuple[str, str, int, int], tuple[Any, ...]]:
    """What the kernel decides for every probe: (verdict, reason, roles, rule id,
    policy version)."""
    out: dict[tuple[str, str, int, int], tuple[Any, ...]] = {}
    for probe in [*PROBES, *extra]:
        d = decide(stub, *probe)
        out[probe] = (d.verdict, d.reason, tuple(sorted(d.roles)), d.matched_rule.id,
                      d.policy_version)
    return out


def check_base_decisions(stub: Stub) -> None:
    live = version(stub)
    for probe, (verdict, reason, rule_id) in PROBES.items():
        d = decide(stub, *probe)
        assert (d.verdict, d.reason, d.matched_rule.id) == (verdict, reason, rule_id), \
            (probe, d.explanation)
        assert d.policy_version == live
        assert d.program_id > 0


def collect_pages(fetch: Callable[[common_pb2.PageRequest], Any], field: str,
                  size: int = 2) -> tuple[list[Any], list[common_pb2.PageResponse]]:
    """Walk a List call page by page (bounded); returns the items and page answers."""
    items: list[Any] = []
    pages: list[common_pb2.PageResponse] = []
    token = ""
    for _ in range(50):
        reply = fetch(common_pb2.PageRequest(page_size=size, page_token=token))
        items.extend(getattr(reply, field))
        pages.append(reply.page)
        token = reply.page.next_page_token
        if not token:
            return items, pages
    raise AssertionError("pagination did not end")


def assert_three_pages(pages: list[common_pb2.PageResponse], total: int = 5) -> None:
    assert len(pages) == 3
    assert [bool(p.next_page_token) for p in pages] == [True, True, False]
    assert {p.total_size for p in pages} == {total}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Bounded by ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


def kernel_bindings(running: RunningPolicyd) -> dict[int, int]:
    """IPv4 binding entries per slot, read from the pinned LPM trie itself."""
    fd = open_binding_trie(running.pin_dir, "src4_bindings")
    try:
        keys = list(bpfsys.map_keys(fd, layout.LPM4_KEY.size))
    finally:
        os.close(fd)
    counts = {0: 0, 1: 0}
    for key in keys:
        counts[key[4]] += 1
    return counts


def map_fill(status: policy_pb2.PolicyStatus) -> dict[str, policy_pb2.MapFill]:
    return {m.name: m for m in status.maps}


# ------------------------------------------------------------------------------- CRUD


def test_roles_crud_and_pagination(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    start = version(stub)
    created = []
    for i in range(5):
        got = stub.CreateRole(P.CreateRoleRequest(role=role(
            f"r{i}", rule(0, ALLOW, TCP, f"10.{i}.0.0/16", "443"), description=f"role {i}")))
        assert (got.name, got.description, len(got.rules)) == (f"r{i}", f"role {i}", 1)
        assert got.id > 0 and got.rules[0].id > 0 and got.rules[0].role == f"r{i}"
        assert version(stub) == start + i + 1
        created.append(got)
    assert len({r.rules[0].id for r in created}) == 5
    assert stub.GetRole(P.GetRoleRequest(name="r2")) == created[2]

    listed, pages = collect_pages(lambda page: stub.ListRoles(P.ListRolesRequest(page=page)),
                                  "roles")
    assert_three_pages(pages)
    assert listed == created

    v = version(stub)
    updated = stub.UpdateRole(P.UpdateRoleRequest(
        role=role("r1", rule(created[1].rules[0].id, DENY, UDP, "10.1.0.0/16", "53"),
                  rule(0, ALLOW, ICMP, "10.1.0.0/16"), description="changed"),
        expected_version=v))
    assert updated.description == "changed"
    assert [r.action for r in updated.rules] == [DENY, ALLOW]
    assert updated.rules[0].id == created[1].rules[0].id
    assert updated.id == created[1].id
    doc = policy(stub)
    assert doc.version == v + 1
    assert {r.name: r for r in doc.roles}["r1"] == updated

    deleted = stub.DeleteRole(P.DeleteRoleRequest(name="r4"))
    assert deleted.version == v + 2 == version(stub)
    rejected(stub, lambda: stub.GetRole(P.GetRoleRequest(name="r4")), NOT_FOUND, "name", "r4")
    assert [r.name for r in policy(stub).roles] == ["r0", "r1", "r2", "r3"]
    assert stub.ListRoles(P.ListRolesRequest()).page.total_size == 4

    # ReplacePolicy: rules sent with id 0 get the next free ids, in document order.
    doc = base_policy()
    doc.roles.append(role("auto", rule(0, ALLOW, TCP, "10.9.0.0/16", "80"),
                          rule(0, DENY, UDP, "10.9.0.0/16")))
    install(stub, doc)
    assert [r.id for r in stub.GetRole(P.GetRoleRequest(name="auto")).rules] == [31, 32]
    assert [r.name for r in policy(stub).roles] == ["auto", "contractor", "eng", "ops"]


def test_rules_crud_and_pagination(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    install(stub)
    made = []
    for i in range(4):
        v = version(stub)
        got = stub.CreateRule(P.CreateRuleRequest(rule=rule(
            0, ALLOW, UDP, "10.4.0.0/16", f"{1000 + i}", role="ops", priority=i)))
        assert got.id > 30 and got.role == "ops" and got.dst_port_from == 1000 + i
        assert version(stub) == v + 1
        made.append(got)
    assert stub.GetRule(P.GetRuleRequest(id=made[0].id)) == made[0]
    # An explicit id is kept.
    explicit = stub.CreateRule(P.CreateRuleRequest(rule=rule(500, DENY, TCP, "10.3.9.0/24",
                                                             role="ops")))
    assert explicit.id == 500

    rules, pages = collect_pages(
        lambda page: stub.ListRules(P.ListRulesRequest(role="ops", page=page)), "rules")
    assert_three_pages(pages, total=6)
    assert [r.id for r in rules] == sorted([20, *(r.id for r in made), 500])
    everything = stub.ListRules(P.ListRulesRequest()).rules
    assert [r.id for r in everything] == sorted([10, 11, 20, 30, *(r.id for r in made), 500])

    # The new deny rule of ops is live in the kernel.
    d = decide(stub, "10.1.2.9", "10.3.9.9", TCP, 80)
    assert (d.verdict, d.reason, d.matched_rule.id) == (codes_pb2.VERDICT_DENY,
                                                        codes_pb2.REASON_RULE_DENY, 500)

    v = version(stub)
    changed = stub.UpdateRule(P.UpdateRuleRequest(
        rule=rule(500, DENY, TCP, "10.3.8.0/24", role="ops", priority=1), expected_version=v))
    assert (changed.dst_prefix, changed.priority) == ("10.3.8.0/24", 1)
    assert version(stub) == v + 1
    assert {r.id: r for r in stub.ListRules(P.ListRulesRequest(role="ops")).rules}[500] == \
        changed
    d = decide(stub, "10.1.2.9", "10.3.9.9", TCP, 80)
    assert (d.verdict, d.matched_rule.id) == (codes_pb2.VERDICT_ALLOW, 20)

    deleted = stub.DeleteRule(P.DeleteRuleRequest(id=500, expected_version=v + 1))
    assert deleted.version == v + 2 == version(stub)
    rejected(stub, lambda: stub.GetRule(P.GetRuleRequest(id=500)), NOT_FOUND, "id", "500")
    assert 500 not in {r.id for doc_role in policy(stub).roles for r in doc_role.rules}


def test_bindings_and_zones_crud_and_pagination(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    install(stub)
    start = version(stub)
    # Two of the five are IPv6; one from another source.
    prefixes = ["10.5.0.0/24", "10.5.1.0/24", "10.5.2.7/32", "fd00:5::/64", "fd00:6::1/128"]
    made = []
    for i, prefix in enumerate(prefixes):
        got = stub.CreateBinding(P.CreateBindingRequest(binding=binding(
            prefix, "ops", source="lab" if i == 4 else "", subject=f"s{i}")))
        assert (got.prefix, list(got.roles), got.subject) == (prefix, ["ops"], f"s{i}")
        assert got.source == ("lab" if i == 4 else "admin")
        assert version(stub) == start + i + 1
        made.append(got)
    got = stub.GetBinding(P.GetBindingRequest(prefix="10.5.1.0/24"))
    assert (got.prefix, list(got.roles), got.subject) == ("10.5.1.0/24", ["ops"], "s1")

    listed, pages = collect_pages(
        lambda page: stub.ListBindings(P.ListBindingsRequest(page=page, role="ops")), "bindings")
    assert_three_pages(pages, total=6)  # the five and base's 10.1.2.0/24
    assert [b.prefix for b in listed] == ["10.1.2.0/24", *prefixes]
    by_source = stub.ListBindings(P.ListBindingsRequest(source="lab"))
    assert [b.prefix for b in by_source.bindings] == ["fd00:6::1/128"]
    assert by_source.page.total_size == 1
    assert decide(stub, "10.5.1.9", "10.3.0.1", UDP, 53).reason == codes_pb2.REASON_RULE_ALLOW

    v = version(stub)
    updated = stub.UpdateBinding(P.UpdateBindingRequest(
        binding=binding("10.5.1.0/24", "eng", "contractor", subject="moved"),
        expected_version=v))
    assert (sorted(updated.roles), updated.subject) == (["contractor", "eng"], "moved")
    assert version(stub) == v + 1
    doc_binding = {b.prefix: b for b in policy(stub).bindings}["10.5.1.0/24"]
    assert sorted(doc_binding.roles) == ["contractor", "eng"]
    d = decide(stub, "10.5.1.9", "10.2.0.10")
    assert (d.reason, sorted(d.roles)) == (codes_pb2.REASON_RULE_DENY, ["contractor", "eng"])

    deleted = stub.DeleteBinding(P.DeleteBindingRequest(prefix="10.5.1.0/24"))
    assert deleted.version == v + 2 == version(stub)
    assert decide(stub, "10.5.1.9", "10.3.0.1", UDP, 53).reason == codes_pb2.REASON_NO_ROLE
    rejected(stub, lambda: stub.GetBinding(P.GetBindingRequest(prefix="10.5.1.0/24")),
             NOT_FOUND, "prefix", "10.5.1.0/24")

    # Zones: base has two, add three.
    v = version(stub)
    for i, prefix in enumerate(["10.6.0.0/16", "10.7.0.0/16", "fd00:7::/48"]):
        got_zone = stub.CreateZone(P.CreateZoneRequest(zone=zone(
            prefix, codes_pb2.ZONE_VPN if i == 0 else codes_pb2.ZONE_INTERNAL, f"z{i}")))
        assert (got_zone.prefix, got_zone.description) == (prefix, f"z{i}")
        assert version(stub) == v + i + 1
    assert stub.GetZone(P.GetZoneRequest(prefix="10.6.0.0/16")).zone == codes_pb2.ZONE_VPN
    zones, pages = collect_pages(lambda page: stub.ListZones(P.ListZonesRequest(page=page)),
                                 "zones")
    assert_three_pages(pages)
    assert [z.prefix for z in zones] == ["10.2.0.0/16", "10.3.0.0/16", "10.6.0.0/16",
                                         "10.7.0.0/16", "fd00:7::/48"]
    assert decide(stub, "10.1.2.9", "10.7.0.1").dst_zone == codes_pb2.ZONE_INTERNAL
    v = version(stub)
    got_zone = stub.UpdateZone(P.UpdateZoneRequest(
        zone=zone("10.7.0.0/16", codes_pb2.ZONE_EXTERNAL, "now external"), expected_version=v))
    assert (got_zone.zone, got_zone.description) == (codes_pb2.ZONE_EXTERNAL, "now external")
    assert version(stub) == v + 1
    assert decide(stub, "10.1.2.9", "10.7.0.1").dst_zone == codes_pb2.ZONE_EXTERNAL
    assert stub.DeleteZone(P.DeleteZoneRequest(prefix="10.7.0.0/16")).version == v + 2
    assert "10.7.0.0/16" not in [z.prefix for z in policy(stub).zones]
    rejected(stub, lambda: stub.GetZone(P.GetZoneRequest(prefix="10.7.0.0/16")), NOT_FOUND,
             "prefix")


# -------------------------------------------------------------------------- validation


def test_rejected_requests_name_the_field_and_change_nothing(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    install(stub)
    many_roles = P.PolicyDocument()
    many_roles.CopyFrom(base_policy())
    many_roles.roles.extend(role(f"x{i}") for i in range(17))
    install(stub, many_roles)
    stub.CreateSnapshot(P.CreateSnapshotRequest(name="taken"))
    seventeen = [f"x{i}" for i in range(17)]
    page = common_pb2.PageRequest

    def new_rule(r: policy_pb2.Rule) -> Callable[[], object]:
        r.role = r.role or "eng"
        return lambda: stub.CreateRule(P.CreateRuleRequest(rule=r))

    cases: list[tuple[Callable[[], object], grpc.StatusCode, tuple[str, ...]]] = [
        # CIDRs
        (new_rule(rule(0, ALLOW, TCP, "10.0.0.1/33", "22")), INVALID,
         ("rule.dst_prefix", "10.0.0.1/33")),
        (new_rule(rule(0, ALLOW, TCP, "10.0.0.1/24", "22")), INVALID,
         ("rule.dst_prefix", "10.0.0.1/24")),
        (new_rule(rule(0, ALLOW, TCP, src="10.0.0.1/24")), INVALID, ("rule.src_prefix",)),
        (lambda: stub.CreateRole(P.CreateRoleRequest(role=role(
            "new", rule(0, ALLOW, ANY, "10.0.0.0/8"), rule(0, ALLOW, ANY, "10.0.0.1/33")))),
         INVALID, ("role.rules[1].dst_prefix",)),
        (lambda: stub.CreateBinding(P.CreateBindingRequest(binding=binding("10.0.0.1/24",
                                                                           "eng"))),
         INVALID, ("binding.prefix", "10.0.0.1/24")),
        (lambda: stub.CreateBinding(P.CreateBindingRequest(binding=binding("10.0.0.0/33",
                                                                           "eng"))),
         INVALID, ("binding.prefix",)),
        (lambda: stub.CreateZone(P.CreateZoneRequest(zone=zone("10.0.0.1/24"))), INVALID,
         ("zone.prefix",)),
        (lambda: stub.ReplacePolicy(P.ReplacePolicyRequest(policy=P.PolicyDocument(
            roles=[role("a"), role("b", rule(0, ALLOW, ANY, "fd00::1/64"))]))),
         INVALID, ("policy.roles[1].rules[0].dst_prefix",)),
        # port ranges
        (new_rule(rule(0, ALLOW, TCP, "10.0.0.0/8", "100-50")), INVALID,
         ("rule.dst_port_from", "100-50")),
        (new_rule(rule(0, ALLOW, TCP, "10.0.0.0/8", "0-80")), INVALID,
         ("rule.dst_port_from", "0-80")),
        (new_rule(rule(0, ALLOW, UDP, "10.0.0.0/8", "70000")), INVALID,
         ("rule.dst_port_from", "70000")),
        (new_rule(rule(0, ALLOW, TCP, "10.0.0.0/8", "1-70000")), INVALID,
         ("rule.dst_port_from",)),
        (new_rule(rule(0, ALLOW, ANY, "10.0.0.0/8", "22")), INVALID, ("rule.protocol",)),
        (new_rule(rule(0, ALLOW, ICMP, "10.0.0.0/8", "1-100")), INVALID, ("rule.protocol",)),
        (lambda: stub.UpdateRule(P.UpdateRuleRequest(rule=rule(10, ALLOW, ANY, "10.2.0.0/24",
                                                               "22"))),
         INVALID, ("rule.protocol",)),
        # references and limits
        (lambda: stub.CreateBinding(P.CreateBindingRequest(binding=binding("10.8.0.0/24",
                                                                           "nosuch"))),
         INVALID, ("binding.roles", "nosuch")),
        (lambda: stub.UpdateBinding(P.UpdateBindingRequest(binding=binding(
            "10.1.0.0/24", "eng", "nosuch"))), INVALID, ("binding.roles", "nosuch")),
        (lambda: stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd", bindings=[
            binding("10.8.0.0/24", "eng"), binding("10.8.1.0/24", "nosuch")])),
         INVALID, ("bindings[1].roles", "nosuch")),
        (new_rule(rule(0, ALLOW, TCP, "10.0.0.0/8", "22", role="nosuch")), INVALID,
         ("rule.role", "nosuch")),
        (lambda: stub.CreateRole(P.CreateRoleRequest(role=role(
            "big", *(rule(0, ALLOW, TCP, "10.0.0.0/8", str(1000 + i)) for i in range(33))))),
         INVALID, ("rules", "33", "at most 32")),
        (lambda: stub.CreateBinding(P.CreateBindingRequest(binding=binding("10.8.0.0/24",
                                                                           *seventeen))),
         INVALID, ("binding.roles", "17", "at most 16")),
        (lambda: stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd", bindings=[
            binding("10.8.0.0/24", *seventeen)])), INVALID, ("bindings[0].roles", "at most 16")),
        (lambda: stub.CreateBinding(P.CreateBindingRequest(binding=binding("10.8.0.0/24",
                                                                           "eng", "eng"))),
         INVALID, ("binding.roles", "twice")),
        (lambda: stub.CreateBinding(P.CreateBindingRequest(binding=binding("10.8.0.0/24"))),
         INVALID, ("binding.roles",)),
        (lambda: stub.CreateRole(P.CreateRoleRequest(role=role("Eng"))), INVALID,
         ("role.name",)),
        (lambda: stub.CreateRole(P.CreateRoleRequest(role=role(""))), INVALID, ("role.name",)),
        # A regex ending in "$" also matches before a final newline: not a valid name.
        (lambda: stub.CreateRole(P.CreateRoleRequest(role=role("eng2\n"))), INVALID,
         ("role.name",)),
        (lambda: stub.ReplacePolicy(P.ReplacePolicyRequest(policy=P.PolicyDocument(
            roles=[role("ok"), role("ops2\n")]))), INVALID, ("policy.roles[1].name",)),
        # duplicates
        (lambda: stub.CreateRole(P.CreateRoleRequest(role=role("eng"))), EXISTS,
         ("role.name", "eng")),
        (new_rule(rule(10, ALLOW, TCP, "10.0.0.0/8", "80", role="ops")), EXISTS,
         ("rule.id", "10")),
        (lambda: stub.CreateBinding(P.CreateBindingRequest(binding=binding("10.1.0.0/24",
                                                                           "ops"))),
         EXISTS, ("binding.prefix", "10.1.0.0/24")),
        (lambda: stub.CreateZone(P.CreateZoneRequest(zone=zone("10.2.0.0/16"))), EXISTS,
         ("zone.prefix", "10.2.0.0/16")),
        (lambda: stub.CreateSnapshot(P.CreateSnapshotRequest(name="taken")), EXISTS,
         ("name", "taken")),
        # missing things
        (lambda: stub.DeleteRole(P.DeleteRoleRequest(name="nosuch")), NOT_FOUND,
         ("name", "nosuch")),
        (lambda: stub.UpdateRole(P.UpdateRoleRequest(role=role("nosuch"))), NOT_FOUND,
         ("role.name",)),
        (lambda: stub.DeleteRule(P.DeleteRuleRequest(id=999)), NOT_FOUND, ("id", "999")),
        (lambda: stub.UpdateRule(P.UpdateRuleRequest(rule=rule(999, ALLOW, ANY))), NOT_FOUND,
         ("rule.id", "999")),
        (lambda: stub.DeleteBinding(P.DeleteBindingRequest(prefix="10.99.0.0/24")), NOT_FOUND,
         ("prefix", "10.99.0.0/24")),
        (lambda: stub.UpdateBinding(P.UpdateBindingRequest(binding=binding("10.99.0.0/24",
                                                                           "eng"))),
         NOT_FOUND, ("binding.prefix",)),
        (lambda: stub.DeleteZone(P.DeleteZoneRequest(prefix="10.99.0.0/16")), NOT_FOUND,
         ("prefix", "10.99.0.0/16")),
        (lambda: stub.UpdateZone(P.UpdateZoneRequest(zone=zone("10.99.0.0/16"))), NOT_FOUND,
         ("zone.prefix",)),
        (lambda: stub.DeleteSnapshot(P.DeleteSnapshotRequest(id=999)), NOT_FOUND,
         ("id", "999")),
        (lambda: stub.ListRules(P.ListRulesRequest(role="nosuch")), NOT_FOUND, ("role",)),
        # a role still in use
        (lambda: stub.DeleteRole(P.DeleteRoleRequest(name="contractor")), INVALID,
         ("name", "contractor", "10.1.1.5/32")),
        # paging
        (lambda: stub.ListRoles(P.ListRolesRequest(page=page(page_size=1001))), INVALID,
         ("page.page_size", "1000")),
        (lambda: stub.ListBindings(P.ListBindingsRequest(page=page(page_size=1001))), INVALID,
         ("page.page_size",)),
        (lambda: stub.ListSnapshots(P.ListSnapshotsRequest(page=page(page_size=1001))),
         INVALID, ("page.page_size",)),
        (lambda: stub.ListZones(P.ListZonesRequest(page=page(page_token="garbage"))), INVALID,
         ("page.page_token",)),
        (lambda: stub.ListRules(P.ListRulesRequest(page=page(page_token="LTE="))), INVALID,
         ("page.page_token",)),  # base64 of "-1"
        (lambda: stub.ListSnapshots(P.ListSnapshotsRequest(page=page(page_token="!!!"))),
         INVALID, ("page.page_token",)),
        # snapshot names
        *[(lambda name=name: stub.CreateSnapshot(P.CreateSnapshotRequest(name=name)),
           INVALID, ("name",))
          for name in ["", "has space", "-lead", "x" * 65, "snap/1", "snap\n"]],
        # TestDecision
        (lambda: decide(stub, "10.0.0.300", "10.2.0.5"), INVALID, ("src", "10.0.0.300")),
        (lambda: decide(stub, "10.1.0.7", "nope"), INVALID, ("dst", "nope")),
        (lambda: decide(stub, "10.1.0.7/32", "10.2.0.5"), INVALID, ("src",)),
        (lambda: decide(stub, "10.1.0.7", "fd00::1"), INVALID, ("dst", "IP versions")),
        (lambda: decide(stub, "10.1.0.7", "10.2.0.5", interface="eth9"), INVALID,
         ("interface", "eth9")),
        (lambda: decide(stub, "10.1.0.7", "10.2.0.5", port=70000), INVALID, ("dst_port",)),
    ]
    failures = []
    for i, (call, code, fragments) in enumerate(cases):
        try:
            rejected(stub, call, code, *fragments)
        except (AssertionError, pytest.fail.Exception) as exc:  # collect all, fail once
            failures.append(f"case {i} {fragments}: {exc}")
    assert not failures, "\n".join(failures)
    assert [s.name for s in stub.ListSnapshots(P.ListSnapshotsRequest()).snapshots] == ["taken"]
    # The kernel is untouched too.
    status = stub.Status(P.PolicyStatusRequest())
    assert status.kernel_policy_version == status.policy_version == version(stub)
    check_base_decisions(stub)


# ---------------------------------------------------------------------- compare-and-set


def test_compare_and_set(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    install(stub)
    live = install(stub)
    assert live >= 2  # 0 would mean "unconditional"
    stale = live - 1
    snap = stub.CreateSnapshot(P.CreateSnapshotRequest(name="cas"))
    replaced = base_policy()
    replaced.bindings.append(binding("10.1.3.0/24", "ops"))
    stale_calls: list[Callable[[], object]] = [
        lambda: stub.ReplacePolicy(P.ReplacePolicyRequest(policy=replaced,
                                                          expected_version=stale)),
        lambda: stub.ReplaceBindings(P.ReplaceBindingsRequest(
            source="idpd", bindings=[binding("10.1.4.0/24", "eng")], expected_version=stale)),
        lambda: stub.UpdateBinding(P.UpdateBindingRequest(
            binding=binding("10.1.0.0/24", "ops"), expected_version=stale)),
        lambda: stub.DeleteRule(P.DeleteRuleRequest(id=11, expected_version=stale)),
        lambda: stub.UpdateRole(P.UpdateRoleRequest(role=role("ops"), expected_version=stale)),
        lambda: stub.DeleteBinding(P.DeleteBindingRequest(prefix="10.1.2.0/24",
                                                          expected_version=live + 1)),
        lambda: stub.DeleteZone(P.DeleteZoneRequest(prefix="10.3.0.0/16",
                                                    expected_version=stale)),
        lambda: stub.RestoreSnapshot(P.RestoreSnapshotRequest(id=snap.id,
                                                              expected_version=stale)),
    ]
    for call in stale_calls:
        rejected(stub, call, STALE, "expected_version", str(live))
    check_base_decisions(stub)

    reply = stub.ReplacePolicy(P.ReplacePolicyRequest(policy=replaced, expected_version=live))
    assert reply.version == live + 1
    assert [b.prefix for b in reply.diff.bindings_added] == ["10.1.3.0/24"]
    reply = stub.ReplaceBindings(P.ReplaceBindingsRequest(
        source="idpd", bindings=[binding("10.1.4.0/24", "eng")], expected_version=live + 1))
    assert reply.version == live + 2
    got = stub.UpdateBinding(P.UpdateBindingRequest(binding=binding("10.1.0.0/24", "ops"),
                                                    expected_version=live + 2))
    assert list(got.roles) == ["ops"]
    assert stub.DeleteRule(P.DeleteRuleRequest(id=11, expected_version=live + 3)).version == \
        live + 4
    doc = policy(stub)
    assert doc.version == live + 4
    bindings = {b.prefix: b for b in doc.bindings}
    assert list(bindings["10.1.0.0/24"].roles) == ["ops"]
    assert bindings["10.1.4.0/24"].source == "idpd"
    assert "10.1.3.0/24" in bindings
    assert 11 not in {r.id for r in {r.name: r for r in doc.roles}["eng"].rules}
    d = decide(stub, "10.1.0.7", "10.3.0.1", UDP, 53)
    assert (d.reason, d.matched_rule.id, d.policy_version) == (codes_pb2.REASON_RULE_ALLOW, 20,
                                                               live + 4)


# ---------------------------------------------------------------------- replace bindings


def test_replace_bindings_of_one_source(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    install(stub)
    admin = [b for b in policy(stub).bindings]
    v = version(stub)

    first = stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd", reason="login", bindings=[
        binding("10.8.0.1/32", "eng", subject="alice"),
        binding("10.8.0.2/32", "ops", subject="bob", source="idpd"),
        binding("fd00:8::3/128", "ops", subject="dave")]))
    assert first.version == v + 1
    assert (first.diff.from_version, first.diff.to_version) == (v, v + 1)
    assert [b.prefix for b in first.diff.bindings_added] == ["10.8.0.1/32", "10.8.0.2/32",
                                                             "fd00:8::3/128"]
    assert {b.source for b in first.diff.bindings_added} == {"idpd"}
    assert not first.diff.bindings_removed and not first.diff.bindings_changed
    assert decide(stub, "10.8.0.1", "10.2.0.5").reason == codes_pb2.REASON_RULE_ALLOW

    second = stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd", bindings=[
        binding("10.8.0.2/32", "eng", subject="bob"),
        binding("fd00:8::3/128", "ops", subject="dave"),
        binding("10.8.0.4/32", "eng", subject="erin")]))
    assert second.version == v + 2
    assert [b.prefix for b in second.diff.bindings_added] == ["10.8.0.4/32"]
    assert [b.prefix for b in second.diff.bindings_removed] == ["10.8.0.1/32"]
    assert [(b.prefix, list(b.roles)) for b in second.diff.bindings_changed] == [
        ("10.8.0.2/32", ["eng"])]
    counts = (second.diff.bindings_added_count, second.diff.bindings_removed_count,
              second.diff.bindings_changed_count, second.diff.truncated)
    assert counts == (1, 1, 1, False)
    doc = policy(stub)
    assert [b for b in doc.bindings if b.source == "admin"] == admin
    assert sorted(b.prefix for b in doc.bindings if b.source == "idpd") == [
        "10.8.0.2/32", "10.8.0.4/32", "fd00:8::3/128"]
    listed = stub.ListBindings(P.ListBindingsRequest(source="idpd"))
    assert listed.page.total_size == 3
    assert decide(stub, "10.8.0.1", "10.2.0.5").reason == codes_pb2.REASON_NO_ROLE
    assert decide(stub, "10.8.0.2", "10.2.0.5").reason == codes_pb2.REASON_RULE_ALLOW

    # A prefix another source owns: refused, naming the request's index; nothing changes.
    rejected(stub, lambda: stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd", bindings=[
        binding("10.8.0.2/32", "eng"), binding("10.1.1.5/32", "eng")])),
        EXISTS, "bindings[1].prefix", "10.1.1.5/32", "admin")
    rejected(stub, lambda: stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd", bindings=[
        binding("10.8.0.2/32", "eng", source="admin")])), INVALID, "bindings[0].source")
    rejected(stub, lambda: stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd", bindings=[
        binding("10.8.0.2/32", "eng"), binding("10.8.0.2/32", "ops")])), INVALID,
        "bindings[1].prefix")
    rejected(stub, lambda: stub.ReplaceBindings(P.ReplaceBindingsRequest(bindings=[])), INVALID,
             "source")

    # Another source's replace leaves idpd's alone; an empty list clears idpd's.
    stub.ReplaceBindings(P.ReplaceBindingsRequest(source="vpn", bindings=[
        binding("10.9.9.0/24", "ops")]))
    cleared = stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd"))
    assert sorted(b.prefix for b in cleared.diff.bindings_removed) == [
        "10.8.0.2/32", "10.8.0.4/32", "fd00:8::3/128"]
    doc = policy(stub)
    assert [b for b in doc.bindings if b.source == "admin"] == admin
    assert [(b.prefix, b.source) for b in doc.bindings if b.source != "admin"] == [
        ("10.9.9.0/24", "vpn")]
    check_base_decisions(stub)


# ----------------------------------------------------------------------------- snapshots


def test_snapshots_create_list_diff_restore_delete(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    install(stub)
    saved = policy(stub)
    snap = stub.CreateSnapshot(P.CreateSnapshotRequest(name="before-change"))
    assert (snap.id > 0, snap.name, snap.policy_version) == (True, "before-change",
                                                             saved.version)
    assert (snap.roles, snap.rules, snap.bindings, snap.zones) == (3, 4, 3, 2)
    assert snap.created_at.seconds > 0
    assert version(stub) == saved.version  # a snapshot is not a change

    # Change the policy: drop eng's ssh rule and a binding, add a zone.
    stub.DeleteRule(P.DeleteRuleRequest(id=10))
    stub.DeleteBinding(P.DeleteBindingRequest(prefix="10.1.2.0/24"))
    stub.CreateZone(P.CreateZoneRequest(zone=zone("10.4.0.0/16")))
    changed = policy(stub)
    assert decide(stub, "10.1.0.7", "10.2.0.5").reason == codes_pb2.REASON_DEFAULT_DENY
    assert decide(stub, "10.1.2.9", "10.3.7.7", UDP, 53).reason == codes_pb2.REASON_NO_ROLE

    for i in range(4):
        stub.CreateSnapshot(P.CreateSnapshotRequest(name=f"later-{i}"))
    snaps, pages = collect_pages(
        lambda page: stub.ListSnapshots(P.ListSnapshotsRequest(page=page)), "snapshots")
    assert_three_pages(pages)
    assert [s.name for s in snaps] == ["before-change", *(f"later-{i}" for i in range(4))]
    assert snaps[0] == snap
    assert {s.policy_version for s in snaps[1:]} == {changed.version}

    diff = stub.DiffSnapshots(P.DiffSnapshotsRequest(from_snapshot=snap.id))
    assert (diff.from_version, diff.to_version) == (saved.version, changed.version)
    assert [b.prefix for b in diff.bindings_removed] == ["10.1.2.0/24"]
    assert not diff.bindings_added and not diff.bindings_changed
    assert list(diff.roles_changed) == ["eng"]
    assert [z.prefix for z in diff.zones_added] == ["10.4.0.0/16"]
    back = stub.DiffSnapshots(P.DiffSnapshotsRequest(to_snapshot=snap.id))
    assert [b.prefix for b in back.bindings_added] == ["10.1.2.0/24"]
    assert [z.prefix for z in back.zones_removed] == ["10.4.0.0/16"]
    between = stub.DiffSnapshots(P.DiffSnapshotsRequest(from_snapshot=snap.id,
                                                        to_snapshot=snaps[1].id))
    assert between == diff
    same = stub.DiffSnapshots(P.DiffSnapshotsRequest())
    assert same == P.PolicyDiff(from_version=changed.version, to_version=changed.version)

    # Roll back.
    restored = stub.RestoreSnapshot(P.RestoreSnapshotRequest(id=snap.id,
                                                             expected_version=changed.version))
    assert restored.version == changed.version + 1
    assert [b.prefix for b in restored.diff.bindings_added] == ["10.1.2.0/24"]
    now = policy(stub)
    assert now.version == changed.version + 1
    assert content(now) == content(saved)
    check_base_decisions(stub)
    after = stub.DiffSnapshots(P.DiffSnapshotsRequest(from_snapshot=snap.id))
    assert after == P.PolicyDiff(from_version=saved.version, to_version=now.version)

    # Delete; missing ids are NOT_FOUND everywhere.
    assert stub.DeleteSnapshot(P.DeleteSnapshotRequest(id=snap.id)).version == now.version
    assert [s.name for s in stub.ListSnapshots(P.ListSnapshotsRequest()).snapshots] == [
        f"later-{i}" for i in range(4)]
    for call, where in [
            (lambda: stub.RestoreSnapshot(P.RestoreSnapshotRequest(id=snap.id)), "id"),
            (lambda: stub.DeleteSnapshot(P.DeleteSnapshotRequest(id=snap.id)), "id"),
            (lambda: stub.DiffSnapshots(P.DiffSnapshotsRequest(from_snapshot=snap.id)),
             "from_snapshot"),
            (lambda: stub.DiffSnapshots(P.DiffSnapshotsRequest(to_snapshot=999)),
             "to_snapshot")]:
        rejected(stub, call, NOT_FOUND, where)
    rejected(stub, lambda: stub.RestoreSnapshot(P.RestoreSnapshotRequest()), INVALID, "id")


# ---------------------------------------------------------------- persistence, adoption


def test_restart_keeps_and_adopts_the_policy(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    install(stub)
    # Single-binding changes (written into the live slot) and a source replace on top.
    stub.CreateBinding(P.CreateBindingRequest(binding=binding("10.1.5.0/24", "ops", "eng",
                                                              subject="new-set")))
    stub.DeleteBinding(P.DeleteBindingRequest(prefix="10.1.0.0/24"))
    stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd", bindings=[
        binding("10.8.0.1/32", "eng", subject="alice",
                expires_ns=(int(time.time()) + 3600) * 10**9)]))
    extra = [("10.1.5.1", "10.3.0.1", UDP, 53), ("10.1.5.1", "10.2.0.5", TCP, 22),
             ("10.8.0.1", "10.2.0.5", TCP, 22), ("10.1.0.7", "10.2.0.5", TCP, 22)]
    doc, seen = policy(stub), decisions(stub, extra)
    assert seen[("10.1.0.7", "10.2.0.5", TCP, 22)][1] == codes_pb2.REASON_NO_ROLE
    assert seen[("10.1.5.1", "10.3.0.1", UDP, 53)][2] == ("eng", "ops")
    status = stub.Status(P.PolicyStatusRequest())
    assert not status.policy_adopted  # the first start had nothing to adopt
    fill = map_fill(status)["src4_bindings"].entries
    assert fill == sum(kernel_bindings(policyd).values())

    fill_errors: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pid = policyd.process.proc.pid if policyd.process.proc else 0
        policyd.restart(sig)
        stub = policyd.stub
        assert policyd.process.proc is not None and policyd.process.proc.pid != pid
        assert policy(stub) == doc, sig
        assert decisions(stub, extra) == seen, sig
        status = stub.Status(P.PolicyStatusRequest())
        assert status.policy_adopted, sig
        assert status.adopted, sig
        assert status.policy_version == status.kernel_policy_version == doc.version
        assert not [w for w in status.warnings if w.code == "POLICY_VERSION"]
        reported = map_fill(status)["src4_bindings"].entries
        in_kernel = sum(kernel_bindings(policyd).values())
        if reported != in_kernel:
            fill_errors.append(f"after {sig.name}: Status says src4_bindings holds "
                               f"{reported} entries, the pinned map holds {in_kernel}")

    # The adopted daemon keeps working: a binding with a new role set, then a full replace.
    stub.CreateBinding(P.CreateBindingRequest(binding=binding("10.1.6.0/24", "contractor",
                                                              "ops")))
    d = decide(stub, "10.1.6.1", "10.2.0.10")
    assert (d.reason, sorted(d.roles)) == (codes_pb2.REASON_RULE_DENY, ["contractor", "ops"])
    assert decisions(stub, extra) == {k: (*v[:4], v[4] + 1) for k, v in seen.items()}
    install(stub)
    stub.ReplaceBindings(P.ReplaceBindingsRequest(source="idpd"))
    check_base_decisions(stub)
    # Map fill counts both slots of the LPM tries; an adopting start must not forget the
    # idle slot's entries (they are still in the kernel map).
    assert not fill_errors, fill_errors


# ------------------------------------------------------------------------- consistency


def test_reads_never_show_a_binding_change_under_the_old_version(
        policyd: RunningPolicyd) -> None:
    """Readers see a binding change together with its version, never before it.

    One binding is created and deleted in turns: from the installed version ``base`` on it
    exists exactly at the odd offsets. Meanwhile one thread reads GetPolicy and another
    takes snapshots (a snapshot records its policy version and binding count)."""
    stub = policyd.stub
    base = install(stub)
    prefix = "10.1.9.0/24"
    samples: list[tuple[int, bool]] = []
    snapshots: list[policy_pb2.Snapshot] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            doc = policy(stub)
            samples.append((doc.version, prefix in [b.prefix for b in doc.bindings]))

    def snap() -> None:
        while not stop.is_set():
            snapshots.append(stub.CreateSnapshot(P.CreateSnapshotRequest(
                name=f"s{len(snapshots)}")))

    readers = [threading.Thread(target=read), threading.Thread(target=snap)]
    for reader in readers:
        reader.start()
    cycles = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and cycles < 40:
            stub.CreateBinding(P.CreateBindingRequest(binding=binding(prefix, "ops")))
            stub.DeleteBinding(P.DeleteBindingRequest(prefix=prefix))
            cycles += 1
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=10)
    assert not any(reader.is_alive() for reader in readers)
    assert version(stub) == base + 2 * cycles
    assert samples and snapshots
    problems = []
    torn = [(v, present) for v, present in samples if present != ((v - base) % 2 == 1)]
    if torn:
        problems.append(f"{len(torn)} of {len(samples)} GetPolicy answers show {prefix} "
                        f"(present, version) inconsistently, e.g. {torn[:5]}")
    torn_snaps = [(s.policy_version, s.bindings) for s in snapshots
                  if s.bindings != 3 + (s.policy_version - base) % 2]
    if torn_snaps:
        problems.append(f"{len(torn_snaps)} of {len(snapshots)} snapshots record a binding "
                        f"count that their policy version does not have, e.g. "
                        f"(version, bindings) {torn_snaps[:5]}")
    assert not problems, problems


def test_status_answers_while_bindings_change(policyd: RunningPolicyd) -> None:
    """Status reads the binding ids in a worker thread; single-binding changes on the event
    loop must not make it fail ("dictionary changed size during iteration"). A race: it
    shows reliably on a busy host, rarely on an idle one."""
    stub = policyd.stub
    doc = base_policy()
    doc.bindings.extend(binding(f"10.20.{i // 250}.{i % 250}/32", "ops") for i in range(2000))
    install(stub, doc)
    errors: list[str] = []
    answered: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                answered.append(stub.Status(P.PolicyStatusRequest()).policy_version)
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    cycles = 0
    try:
        deadline = time.monotonic() + 4.0
        for i in range(1000):
            if time.monotonic() > deadline or errors:
                break
            stub.CreateBinding(P.CreateBindingRequest(binding=binding(
                f"10.30.{i // 250}.{i % 250}/32", "ops")))
            cycles += 1
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=10)
    assert not any(reader.is_alive() for reader in readers)
    assert not errors, f"{len(errors)} of {len(errors) + len(answered)} Status calls " \
                       f"failed, e.g. {errors[0]}"
    assert answered and cycles


# ------------------------------------------------------------------------------- expiry


def test_expired_binding_is_removed_and_denied(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    install(stub)
    expires = time.time_ns() + 2 * 10**9
    got = stub.CreateBinding(P.CreateBindingRequest(binding=binding(
        "10.1.7.7/32", "eng", subject="temp", expires_ns=expires)))
    assert got.HasField("expires_at")
    assert abs(got.expires_at.ToNanoseconds() - expires) < 10**6
    v = version(stub)
    assert decide(stub, "10.1.7.7", "10.2.0.5").reason == codes_pb2.REASON_RULE_ALLOW

    def gone() -> bool:
        doc = policy(stub)
        return doc.version == v + 1 and "10.1.7.7/32" not in [b.prefix for b in doc.bindings]

    wait_until(gone, 2.0 + EXPIRY_WAIT, "expired binding removed")
    assert time.time_ns() - expires < EXPIRY_WAIT * 10**9
    assert time.time_ns() >= expires  # not early
    d = decide(stub, "10.1.7.7", "10.2.0.5")
    assert (d.verdict, d.reason, d.policy_version) == (codes_pb2.VERDICT_DENY,
                                                       codes_pb2.REASON_NO_ROLE, v + 1)
    check_base_decisions(stub)


# ------------------------------------------------------------------------------- status


def test_status_reports_versions_maps_and_interfaces(policyd: RunningPolicyd) -> None:
    stub = policyd.stub
    status = stub.Status(P.PolicyStatusRequest())
    assert status.daemon.daemon == "policyd"
    assert policyd.process.proc is not None
    assert status.daemon.pid == policyd.process.proc.pid
    assert status.policy_version == status.kernel_policy_version == version(stub)
    before = map_fill(status)

    v = install(stub)
    stub.CreateBinding(P.CreateBindingRequest(binding=binding("fd00:1::/64", "eng")))
    status = stub.Status(P.PolicyStatusRequest())
    assert status.policy_version == status.kernel_policy_version == v + 1
    assert status.mode == "enforce"
    assert status.pin_dir == str(policyd.pin_dir)
    fill = map_fill(status)
    live = kernel_bindings(policyd)[status.active_slot]
    assert live == 3  # base's three IPv4 bindings in the live slot
    assert fill["src4_bindings"].entries == sum(kernel_bindings(policyd).values())
    assert fill["src4_bindings"].entries >= before["src4_bindings"].entries + 3
    assert fill["src6_bindings"].entries >= 1
    assert fill["roles"].entries == 3
    assert fill["rolesets"].entries == 3  # {eng}, {eng, contractor}, {ops}
    for m in fill.values():
        assert m.max_entries > 0
        assert m.fill_ratio == pytest.approx(m.entries / m.max_entries)

    interfaces = {i.name: i for i in status.interfaces}
    assert set(interfaces) == {"lan0", "wan0"}
    assert interfaces["lan0"].zone == codes_pb2.ZONE_INTERNAL
    assert interfaces["wan0"].zone == codes_pb2.ZONE_EXTERNAL
    program = decide(stub, "10.1.0.7", "10.2.0.5").program_id
    for iface in interfaces.values():
        assert iface.attached and iface.ifindex > 0 and iface.link_id > 0
        assert iface.program_id == program > 0
        assert iface.attach_mode in ("native", "generic")
    assert decide(stub, "10.1.0.7", "10.2.0.5", interface="wan0").src_zone == \
        codes_pb2.ZONE_EXTERNAL


def test_every_change_is_recorded_in_the_control_plane_audit(policyd: RunningPolicyd) -> None:
    """policyd sends auditd a record for each change, with the versions before and after."""
    auditd = DaemonProcess("auditd", policyd.config, policyd.process.run_dir,
                           policyd.instance).start()
    try:
        stub = policyd.stub
        stub.CreateRole(policy_pb2.CreateRoleRequest(role=policy_pb2.Role(name="ops")),
                        timeout=10)
        stub.CreateBinding(policy_pb2.CreateBindingRequest(binding=policy_pb2.Binding(
            prefix="10.9.0.1/32", roles=["ops"])), timeout=10)
        stub.DeleteBinding(policy_pb2.DeleteBindingRequest(prefix="10.9.0.1/32"), timeout=10)
        wanted = ["role.create", "binding.create", "binding.delete"]
        rows: list[tuple[str, int, int]] = []
        deadline = time.monotonic() + 10
        with grpc.insecure_channel(f"unix:{auditd.socket}") as channel:
            audit = audit_pb2_grpc.AuditServiceStub(channel)
            while time.monotonic() < deadline:
                reply = audit.Query(audit_pb2.QueryRequest(
                    filter=audit_pb2.AuditFilter(control_only=True),
                    page=common_pb2.PageRequest(page_size=100)), timeout=10)
                rows = [(r.control.action, r.control.version_before, r.control.version_after)
                        for r in reversed(reply.records) if r.control.daemon == "policyd"]
                if [r[0] for r in rows] == wanted:
                    break
                time.sleep(0.1)
    finally:
        auditd.stop()
    assert [r[0] for r in rows] == wanted
    assert all(after == before + 1 for _, before, after in rows)
