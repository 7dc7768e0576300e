"""DESIGN.md "Policy semantics", one test per rule, through the public PolicyService against
the real kernel: ReplacePolicy installs a policy, TestDecision runs the live XDP program on a
crafted packet (or an exact frame) with BPF_PROG_TEST_RUN. No mocks and no reference
model: every expectation below is written out by hand from the design (the malformed-frame
table also holds the randomized test's reference parser, tests/frames.py, to it).

The daemon is shared by the whole module (one bcc compile, not one per test); each test
starts by replacing the whole policy, so no test sees another's rules.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

import frames
import grpc
import pytest

from conftest import RunningPolicyd, start_policyd, unique
from vpnr.policyd import convert
from vpnr.policyd.compiler import Ids
from vpnr.policyd.model import Action, Policy, Rule, parse_prefix
from vpnr.v1 import codes_pb2, policy_pb2

pytestmark = pytest.mark.root

ANY, TCP, UDP = codes_pb2.PROTOCOL_ANY, codes_pb2.PROTOCOL_TCP, codes_pb2.PROTOCOL_UDP
ICMP, ICMPV6 = codes_pb2.PROTOCOL_ICMP, codes_pb2.PROTOCOL_ICMPV6
INTERNAL, VPN, EXTERNAL = codes_pb2.ZONE_INTERNAL, codes_pb2.ZONE_VPN, codes_pb2.ZONE_EXTERNAL
ALLOW, DENY = Action.ALLOW, Action.DENY
LAN, WAN = "lan0", "wan0"
CALL_TIMEOUT = 20.0  # seconds: a wedged daemon fails a test instead of hanging it
TUNNEL_PORT = 51820  # tunneld.listen_port's default, which policyd gives the program

# Sources at this site, destinations at the other; one plan per family so a test can run
# unchanged on IPv4 and IPv6.
PLAN = {
    4: {"lan": "10.1.0.0/24", "host": "10.1.0.10", "other_host": "10.1.0.11",
        "unbound": "10.1.9.9", "site": "10.2.0.0/16", "dst": "10.2.0.5",
        "outside": "192.0.2.7"},
    6: {"lan": "fd01::/64", "host": "fd01::10", "other_host": "fd01::11",
        "unbound": "fd01:9::9", "site": "fd02::/48", "dst": "fd02::5",
        "outside": "2001:db8::7"},
}


# ------------------------------------------------------------------------------ fixture

@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPolicyd]:
    """policyd on lan0 (internal) and wan0 (external) of a fresh namespace, shared by the
    module; the same set-up as conftest's ``policyd`` fixture, but started once."""
    tmp = tmp_path_factory.mktemp("semantics")
    netns, instance = unique("vs"), unique("i")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "lan0", "type", "veth", "peer", "name", "peer0"],
                    ["link", "set", "lan0", "up"], ["link", "set", "peer0", "up"]):
            subprocess.run(["ip", "-n", netns, *cmd], check=True)
        running = start_policyd(tmp, netns, instance)
        try:
            yield running
        finally:
            running.channel.close()
            running.process.stop()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
        pins = Path("/sys/fs/bpf/vpnr") / instance
        if pins.exists():
            for pin in pins.iterdir():
                pin.unlink()
            pins.rmdir()


# ----------------------------------------------------------------------------- builders

def rule(rule_id: int, role: str, action: Action, *, priority: int = 10, protocol: int = ANY,
         src: str = "", dst: str = "", ports: tuple[int, int] = (0, 0)) -> Rule:
    """A model rule; prefixes as CIDR text ("" is any), ``ports`` (0, 0) is any port."""
    return Rule(rule_id, role, priority, action, protocol, parse_prefix("src", src),
                parse_prefix("dst", dst), *ports)


def make_policy(rules: Sequence[Rule], bindings: Mapping[str, Sequence[str]],
                zones: Mapping[str, int] | None = None, empty_roles: Sequence[str] = ()
                ) -> Policy:
    """A policy whose roles are those the rules name (in the order given) plus
    ``empty_roles``; bindings and zones keyed by CIDR text."""
    roles: dict[str, list[Rule]] = {name: [] for name in empty_roles}
    for r in rules:
        roles.setdefault(r.role, []).append(r)
    return Policy(roles=roles,
                  bindings={ipaddress.ip_network(k): tuple(v) for k, v in bindings.items()},
                  zones={ipaddress.ip_network(k): v for k, v in (zones or {}).items()})


def document(policy: Policy) -> policy_pb2.PolicyDocument:
    """The PolicyDocument a client would send for ``policy``."""
    return convert.document(policy, Ids(), 0)


def install(router: RunningPolicyd, policy: Policy) -> None:
    """Replace the whole policy (the daemon validates it the way any client's is)."""
    router.stub.ReplacePolicy(policy_pb2.ReplacePolicyRequest(policy=document(policy),
                                                              reason="semantics test"),
                              timeout=CALL_TIMEOUT)


def rejected(router: RunningPolicyd, policy: Policy) -> str:
    """ReplacePolicy refuses ``policy`` with INVALID_ARGUMENT; returns the message."""
    with pytest.raises(grpc.RpcError) as caught:
        install(router, policy)
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    return details


def ask(router: RunningPolicyd, src: str, dst: str, protocol: int = TCP, *, port: int = 0,
        src_port: int = 0, icmp_type: int = 0, fragment: bool = False,
        interface: str = LAN) -> policy_pb2.Decision:
    """The live program's decision on a crafted packet (src_port 0 and icmp_type 0 let the
    daemon pick 40000 and echo request)."""
    answer: policy_pb2.Decision = router.stub.TestDecision(policy_pb2.TestDecisionRequest(
        src=src, dst=dst, protocol=cast(codes_pb2.Protocol, protocol),
        dst_port=port, src_port=src_port, icmp_type=icmp_type, fragment=fragment,
        interface=interface), timeout=CALL_TIMEOUT)
    return answer


def ask_raw(router: RunningPolicyd, frame: bytes, interface: str = LAN) -> policy_pb2.Decision:
    """The live program's decision on exactly ``frame``."""
    answer: policy_pb2.Decision = router.stub.TestDecision(policy_pb2.TestDecisionRequest(
        raw_frame=frame, interface=interface), timeout=CALL_TIMEOUT)
    return answer


def outcome(decision: policy_pb2.Decision) -> tuple[str, str, int]:
    """(verdict, reason, matched rule id or 0) with readable names for failure output."""
    return (codes_pb2.Verdict.Name(decision.verdict).removeprefix("VERDICT_"),
            codes_pb2.Reason.Name(decision.reason).removeprefix("REASON_"),
            decision.matched_rule.id if decision.HasField("matched_rule") else 0)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address object from text."""
    return ipaddress.ip_address(text)


def tcp_frame(src: str, dst: str, port: int, *, frag_off: int = 0, ihl: int = 5,
              vlans: Sequence[int] = ()) -> bytes:
    """An IPv4 TCP SYN frame to ``port``."""
    return frames.ethernet(frames.ETH_IP, frames.ipv4(ip(src), ip(dst), frames.TCP,
                                                      frames.tcp(40000, port),
                                                      frag_off=frag_off, ihl=ihl), vlans)


def v6_frame(next_header: int, payload: bytes, *, hop_limit: int = 64,
             src: str = "fd01::10", dst: str = "fd02::5") -> bytes:
    """An IPv6 frame whose payload starts with ``next_header``."""
    return frames.ethernet(frames.ETH_IPV6, frames.ipv6(ip(src), ip(dst), next_header,
                                                        payload, hop_limit=hop_limit))


ALLOWED = ("ALLOW", "RULE_ALLOW")
DEFAULT_DENY = ("DENY", "DEFAULT_DENY", 0)
NO_ROLE = ("DENY", "NO_ROLE", 0)
BYPASS = ("ALLOW", "INFRA_BYPASS", 0)
ZONE_REFUSED = ("DENY", "ZONE_EXTERNAL", 0)


# ------------------------------------------------------------------- roles and bindings

def test_roles_come_from_the_longest_prefix_binding_without_merging(
        router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "broad", ALLOW, protocol=TCP), rule(2, "narrow", ALLOW, protocol=UDP)],
        {"10.1.0.0/16": ["broad"], "10.1.7.0/24": ["narrow"], "10.1.7.7/32": ["broad"]}))
    # 10.1.7.5 is in both /16 and /24: only the /24's role counts, the /16's tcp allow not.
    d = ask(router, "10.1.7.5", "10.2.0.5", TCP, port=22)
    assert outcome(d) == DEFAULT_DENY
    assert set(d.roles) == {"narrow"}
    assert outcome(ask(router, "10.1.7.5", "10.2.0.5", UDP, port=53)) == (*ALLOWED, 2)
    d = ask(router, "10.1.9.5", "10.2.0.5", TCP, port=22)
    assert (outcome(d), set(d.roles)) == (((*ALLOWED, 1)), {"broad"})
    # A /32 inside the /24 is more specific again.
    d = ask(router, "10.1.7.7", "10.2.0.5", UDP, port=53)
    assert (outcome(d), set(d.roles)) == (DEFAULT_DENY, {"broad"})


def test_an_address_holds_several_roles_and_every_rule_of_each_applies(
        router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "ssh", ALLOW, protocol=TCP, ports=(22, 22)),
         rule(2, "dns", ALLOW, protocol=UDP, ports=(53, 53)),
         rule(3, "ping", ALLOW, protocol=ICMP)],
        {"10.1.0.10/32": ["ssh", "dns", "ping"]}))
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=22)) == (*ALLOWED, 1)
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", UDP, port=53)) == (*ALLOWED, 2)
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", ICMP)) == (*ALLOWED, 3)
    d = ask(router, "10.1.0.10", "10.2.0.5", TCP, port=80)
    assert (outcome(d), set(d.roles)) == (DEFAULT_DENY, {"ssh", "dns", "ping"})


def test_any_matching_deny_wins_even_at_a_worse_priority(router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "open", ALLOW, priority=0),
         rule(2, "closed", DENY, priority=1000, protocol=TCP, dst="10.2.0.0/24",
              ports=(22, 22)),
         rule(3, "open", DENY, priority=999, protocol=UDP)],
        {"10.1.0.10/32": ["open", "closed"]}))
    # The deny of another role, at the worst priority, beats the best-priority allow.
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=22)) == ("DENY",
                                                                           "RULE_DENY", 2)
    # The same within one role.
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", UDP, port=53)) == ("DENY",
                                                                           "RULE_DENY", 3)
    # Where no deny matches, the allow decides.
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=23)) == (*ALLOWED, 1)
    assert outcome(ask(router, "10.1.0.10", "10.2.1.5", TCP, port=22)) == (*ALLOWED, 1)


def test_reported_rule_is_the_lowest_priority_then_the_lowest_id(
        router: RunningPolicyd) -> None:
    # Listed out of id order, spread over two roles, ties on priority broken by id.
    allows = [rule(50, "a", ALLOW, priority=1), rule(7, "a", ALLOW, priority=2),
              rule(40, "b", ALLOW, priority=1), rule(30, "b", ALLOW, priority=1),
              rule(3, "b", ALLOW, priority=4)]
    denies = [rule(60, "c", DENY, priority=5), rule(61, "c", DENY, priority=3),
              rule(9, "d", DENY, priority=3), rule(2, "d", DENY, priority=8)]
    install(router, make_policy([*allows, *denies], {"10.1.0.10/32": ["a", "b"],
                                                     "10.1.0.11/32": ["a", "b", "c", "d"]}))
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=80)) == (*ALLOWED, 30)
    assert outcome(ask(router, "10.1.0.11", "10.2.0.5", TCP, port=80)) == ("DENY",
                                                                           "RULE_DENY", 9)


def test_a_rule_matches_on_source_and_destination_prefixes(router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "r", ALLOW, protocol=TCP, src="10.1.0.0/28", dst="10.2.0.0/24"),
         rule(2, "r", DENY, protocol=TCP, src="10.1.0.8/29", dst="10.2.0.128/25")],
        {"10.1.0.0/24": ["r"]}))
    # Inside the binding, the rule's own source prefix narrows who it applies to.
    assert outcome(ask(router, "10.1.0.5", "10.2.0.5", TCP, port=22)) == (*ALLOWED, 1)
    assert outcome(ask(router, "10.1.0.100", "10.2.0.5", TCP, port=22)) == DEFAULT_DENY
    assert outcome(ask(router, "10.1.0.5", "10.2.1.5", TCP, port=22)) == DEFAULT_DENY
    assert outcome(ask(router, "10.1.0.9", "10.2.0.200", TCP, port=22)) == ("DENY",
                                                                            "RULE_DENY", 2)
    assert outcome(ask(router, "10.1.0.5", "10.2.0.200", TCP, port=22)) == (*ALLOWED, 1)


def test_roles_come_from_a_pool_of_a_thousand(router: RunningPolicyd) -> None:
    pool = 1000
    rules = [rule(i + 1, f"p{i:04}", ALLOW, protocol=TCP, ports=(1000 + i, 1000 + i))
             for i in range(pool)]
    chosen = [f"p{i:04}" for i in range(0, pool, 63)]  # 16 roles spread over the pool
    install(router, make_policy(rules, {"10.1.0.10/32": chosen, "10.1.0.11/32": ["p0999"]}))
    d = ask(router, "10.1.0.10", "10.2.0.5", TCP, port=1000 + 945)
    assert (outcome(d), set(d.roles)) == (((*ALLOWED, 946)), set(chosen))
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=1000)) == (*ALLOWED, 1)
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=1999)) == DEFAULT_DENY
    assert outcome(ask(router, "10.1.0.11", "10.2.0.5", TCP, port=1999)) == (*ALLOWED, 1000)


def test_no_matching_rule_is_the_default_deny(router: RunningPolicyd) -> None:
    install(router, make_policy([rule(1, "dns", ALLOW, protocol=UDP, ports=(53, 53))],
                                {"10.1.0.10/32": ["dns"], "10.1.0.11/32": ["nothing"]},
                                empty_roles=["nothing"]))
    d = ask(router, "10.1.0.10", "10.2.0.5", TCP, port=53)
    assert (outcome(d), set(d.roles)) == (DEFAULT_DENY, {"dns"})
    assert not d.HasField("matched_rule")
    # A role without any rule allows nothing.
    d = ask(router, "10.1.0.11", "10.2.0.5", UDP, port=53)
    assert (outcome(d), set(d.roles)) == (DEFAULT_DENY, {"nothing"})


@pytest.mark.parametrize("family", [4, 6])
def test_a_source_without_binding_is_denied_no_role(router: RunningPolicyd,
                                                    family: int) -> None:
    plan = PLAN[family]
    install(router, make_policy([rule(1, "all", ALLOW)], {plan["lan"]: ["all"]}))
    assert outcome(ask(router, plan["host"], plan["dst"], UDP, port=53)) == (*ALLOWED, 1)
    d = ask(router, plan["unbound"], plan["dst"], UDP, port=53)
    assert outcome(d) == NO_ROLE
    assert list(d.roles) == []


# -------------------------------------------------------------- infrastructure bypass

EMPTY = make_policy([], {})


def test_arp_is_bypassed_without_a_role(router: RunningPolicyd) -> None:
    install(router, EMPTY)
    for interface in (LAN, WAN):
        assert outcome(ask_raw(router, frames.arp(), interface)) == BYPASS
    # Behind one VLAN tag too: the tag is parsed first.
    tagged = frames.ethernet(frames.ETH_ARP, frames.arp()[14:], vlans=[5])
    assert outcome(ask_raw(router, tagged)) == BYPASS


def test_dhcpv4_client_and_server_ports_are_bypassed(router: RunningPolicyd) -> None:
    install(router, EMPTY)
    assert outcome(ask(router, "0.0.0.0", "255.255.255.255", UDP, src_port=68,
                       port=67)) == BYPASS
    assert outcome(ask(router, "10.1.0.1", "10.1.0.10", UDP, src_port=67, port=68)) == BYPASS
    # Only the exact pairs, only UDP, only IPv4 for ports 67/68.
    assert outcome(ask(router, "10.1.0.1", "10.1.0.10", UDP, src_port=68, port=68)) == NO_ROLE
    assert outcome(ask(router, "10.1.0.1", "10.1.0.10", TCP, src_port=68, port=67)) == NO_ROLE
    assert outcome(ask(router, "fd01::1", "fd01::2", UDP, src_port=68, port=67)) == NO_ROLE


def test_dhcpv6_client_and_server_ports_are_bypassed(router: RunningPolicyd) -> None:
    install(router, EMPTY)
    assert outcome(ask(router, "fe80::1", "ff02::1:2", UDP, src_port=546, port=547)) == BYPASS
    assert outcome(ask(router, "fe80::2", "fe80::1", UDP, src_port=547, port=546)) == BYPASS
    assert outcome(ask(router, "fe80::2", "fe80::1", UDP, src_port=546, port=546)) == NO_ROLE
    assert outcome(ask(router, "10.1.0.1", "10.1.0.2", UDP, src_port=546, port=547)) == NO_ROLE


@pytest.mark.parametrize("icmp_type", [133, 134, 135, 136, 137])
def test_neighbour_discovery_with_hop_limit_255_is_bypassed(router: RunningPolicyd,
                                                            icmp_type: int) -> None:
    install(router, EMPTY)
    # The daemon crafts ND types with hop limit 255, as RFC 4861 requires.
    assert outcome(ask(router, "fe80::1", "ff02::1", ICMPV6, icmp_type=icmp_type)) == BYPASS
    frame = v6_frame(frames.ICMPV6, frames.icmp(icmp_type), hop_limit=255)
    assert outcome(ask_raw(router, frame, WAN)) == BYPASS


def test_neighbour_discovery_with_hop_limit_64_is_not_bypassed(router: RunningPolicyd) -> None:
    install(router, EMPTY)
    for icmp_type in range(133, 138):
        frame = v6_frame(frames.ICMPV6, frames.icmp(icmp_type), hop_limit=64)
        assert outcome(ask_raw(router, frame)) == NO_ROLE, icmp_type
    # Other ICMPv6 types are never infrastructure, whatever the hop limit.
    frame = v6_frame(frames.ICMPV6, frames.icmp(128), hop_limit=255)
    assert outcome(ask_raw(router, frame)) == NO_ROLE


def test_neighbour_discovery_bypass_is_icmpv6_over_ipv6_only(router: RunningPolicyd) -> None:
    install(router, EMPTY)
    # IPv4 protocol 58 is not neighbour discovery (RFC 4861 is IPv6 only): an unbound
    # source must not pass it anywhere because it sets TTL 255.
    payload = frames.ipv4(ip("10.1.9.9"), ip("10.2.0.5"), frames.ICMPV6, frames.icmp(135),
                          ttl=255)
    assert outcome(ask_raw(router, frames.ethernet(frames.ETH_IP, payload))) == NO_ROLE


def test_tunnel_port_on_an_external_interface_is_bypassed(router: RunningPolicyd) -> None:
    install(router, EMPTY)
    assert outcome(ask(router, "198.51.100.7", "203.0.113.1", UDP, port=TUNNEL_PORT,
                       interface=WAN)) == BYPASS
    assert outcome(ask(router, "2001:db8::7", "2001:db8:1::1", UDP, port=TUNNEL_PORT,
                       interface=WAN)) == BYPASS
    # Only UDP, only that port.
    assert outcome(ask(router, "198.51.100.7", "203.0.113.1", TCP, port=TUNNEL_PORT,
                       interface=WAN)) == NO_ROLE
    assert outcome(ask(router, "198.51.100.7", "203.0.113.1", UDP, port=TUNNEL_PORT + 1,
                       interface=WAN)) == NO_ROLE


def test_from_outside_infrastructure_never_reaches_an_internal_or_vpn_destination(
        router: RunningPolicyd) -> None:
    # The bypass admits infrastructure to the router and the outside; a WAN packet aimed at
    # an inside address with a bypass port is still subject to the zones.
    install(router, make_policy([], {}, zones={"10.2.0.0/16": INTERNAL, "10.3.0.0/16": VPN}))
    for port, src_port in ((TUNNEL_PORT, 40000), (68, 67)):
        assert outcome(ask(router, "198.51.100.7", "10.2.0.5", UDP, port=port,
                           src_port=src_port, interface=WAN)) == ZONE_REFUSED
        assert outcome(ask(router, "198.51.100.7", "10.3.0.5", UDP, port=port,
                           src_port=src_port, interface=WAN)) == NO_ROLE
    assert outcome(ask(router, "198.51.100.7", "203.0.113.1", UDP, port=TUNNEL_PORT,
                       interface=WAN)) == BYPASS


def test_tunnel_port_on_an_internal_interface_is_not_bypassed(router: RunningPolicyd) -> None:
    install(router, EMPTY)
    assert outcome(ask(router, "10.1.9.9", "203.0.113.1", UDP, port=TUNNEL_PORT,
                       interface=LAN)) == NO_ROLE


def test_non_first_fragments_are_never_infrastructure(router: RunningPolicyd) -> None:
    install(router, EMPTY)
    # A fragment has no ports or ICMP header to recognise infrastructure by.
    assert outcome(ask(router, "fe80::1", "ff02::1", ICMPV6, icmp_type=135,
                       fragment=True)) == NO_ROLE
    assert outcome(ask(router, "198.51.100.7", "203.0.113.1", UDP, port=TUNNEL_PORT,
                       interface=WAN, fragment=True)) == NO_ROLE


@pytest.mark.parametrize("frame", [
    frames.ethernet(frames.ETH_LLDP, bytes(40)),
    frames.ethernet(frames.ETH_QINQ, bytes(4) + tcp_frame("10.1.0.10", "10.2.0.5", 22)[12:]),
    # Only one 802.1Q tag is parsed: what is inside a second one is not IP to the program.
    frames.ethernet(frames.ETH_IP, tcp_frame("10.1.0.10", "10.2.0.5", 22)[14:], vlans=[5, 6]),
], ids=["lldp", "qinq", "double-vlan"])
def test_other_ethertypes_are_denied_unsupported(router: RunningPolicyd, frame: bytes) -> None:
    install(router, make_policy([rule(1, "all", ALLOW)], {"10.1.0.0/24": ["all"]}))
    assert outcome(ask_raw(router, frame)) == ("DENY", "UNSUPPORTED_ETHERTYPE", 0)


# ------------------------------------------------------------------------------- zones

SITE_ZONES = {"10.2.0.0/16": INTERNAL, "fd02::/48": INTERNAL, "10.3.0.0/16": VPN}


def test_external_to_internal_is_refused_for_an_allow_without_destination_prefix(
        router: RunningPolicyd) -> None:
    install(router, make_policy([rule(1, "partner", ALLOW, priority=0, protocol=TCP)],
                                {"198.51.100.0/24": ["partner"]}, SITE_ZONES))
    d = ask(router, "198.51.100.7", "10.2.0.5", TCP, port=443, interface=WAN)
    assert outcome(d) == ZONE_REFUSED
    assert (d.src_zone, d.dst_zone, set(d.roles)) == (EXTERNAL, INTERNAL, {"partner"})
    # The same allow is enough from inside, and towards destinations that are not internal.
    assert outcome(ask(router, "198.51.100.7", "10.2.0.5", TCP, port=443)) == (*ALLOWED, 1)
    assert outcome(ask(router, "198.51.100.7", "192.0.2.1", TCP, port=443,
                       interface=WAN)) == (*ALLOWED, 1)


def test_external_to_internal_is_accepted_for_an_allow_with_destination_prefix(
        router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "partner", ALLOW, priority=0, protocol=TCP),
         rule(2, "partner", ALLOW, priority=50, protocol=TCP, dst="10.2.0.0/24"),
         rule(3, "partner", DENY, priority=60, protocol=TCP, dst="10.2.0.66/32")],
        {"198.51.100.0/24": ["partner"]}, SITE_ZONES))
    # The dst-any allow does not count from outside, so the explicit one is reported.
    d = ask(router, "198.51.100.7", "10.2.0.5", TCP, port=443, interface=WAN)
    assert outcome(d) == (*ALLOWED, 2)
    assert outcome(ask(router, "198.51.100.7", "10.2.0.5", TCP, port=443)) == (*ALLOWED, 1)
    # Internal, but not covered by the explicit allow.
    assert outcome(ask(router, "198.51.100.7", "10.2.1.5", TCP, port=443,
                       interface=WAN)) == ZONE_REFUSED
    # A matching deny is still a rule deny.
    assert outcome(ask(router, "198.51.100.7", "10.2.0.66", TCP, port=443,
                       interface=WAN)) == ("DENY", "RULE_DENY", 3)


def test_external_to_internal_without_binding_is_zone_external(router: RunningPolicyd) -> None:
    install(router, make_policy([], {}, SITE_ZONES))
    assert outcome(ask(router, "198.51.100.7", "10.2.0.5", TCP, port=443,
                       interface=WAN)) == ZONE_REFUSED
    assert outcome(ask(router, "2001:db8::7", "fd02::5", TCP, port=443,
                       interface=WAN)) == ZONE_REFUSED
    assert outcome(ask(router, "198.51.100.7", "192.0.2.1", TCP, port=443,
                       interface=WAN)) == NO_ROLE


def test_destination_zone_is_the_longest_prefix_and_defaults_to_external(
        router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "all", ALLOW)], {"10.1.0.0/24": ["all"]},
        {"10.2.0.0/16": INTERNAL, "10.2.5.0/24": EXTERNAL, "10.2.5.128/25": INTERNAL}))
    for dst, zone in (("10.2.0.5", INTERNAL), ("10.2.5.5", EXTERNAL),
                      ("10.2.5.200", INTERNAL), ("10.9.0.1", EXTERNAL)):
        d = ask(router, "10.1.0.10", dst, UDP, port=53)
        assert (d.dst_zone, outcome(d)) == (zone, (*ALLOWED, 1)), dst


def test_source_zone_is_the_interface_zone_not_the_address(router: RunningPolicyd) -> None:
    install(router, make_policy([rule(1, "site", ALLOW, protocol=TCP)],
                                {"10.2.0.0/24": ["site"]}, SITE_ZONES))
    # An internal address arriving on the external interface is external: it claims nothing.
    d = ask(router, "10.2.0.9", "10.2.0.5", TCP, port=22, interface=WAN)
    assert (d.src_zone, d.dst_zone, outcome(d)) == (EXTERNAL, INTERNAL, ZONE_REFUSED)
    d = ask(router, "10.2.0.9", "10.2.0.5", TCP, port=22, interface=LAN)
    assert (d.src_zone, d.dst_zone, outcome(d)) == (INTERNAL, INTERNAL, (*ALLOWED, 1))


def test_vpn_zone_traffic_fails_closed_without_a_tunnel_socket(router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "vpn", ALLOW, protocol=TCP), rule(2, "vpn", DENY, dst="10.3.9.0/24")],
        {"10.1.0.0/24": ["vpn"], "198.51.100.0/24": ["vpn"]}, SITE_ZONES))
    d = ask(router, "10.1.0.10", "10.3.0.5", TCP, port=22)
    assert (outcome(d), d.dst_zone) == (("DENY", "TUNNEL_NO_SOCKET", 1), VPN)
    assert outcome(ask(router, "198.51.100.7", "10.3.0.5", TCP, port=22,
                       interface=WAN)) == ("DENY", "TUNNEL_NO_SOCKET", 1)
    # Denied or unmatched traffic keeps its own reason.
    assert outcome(ask(router, "10.1.0.10", "10.3.9.5", TCP, port=22)) == ("DENY",
                                                                           "RULE_DENY", 2)
    assert outcome(ask(router, "10.1.0.10", "10.3.0.5", UDP, port=53)) == DEFAULT_DENY


# --------------------------------------------------------------------------- fragments

@pytest.mark.parametrize("family", [4, 6])
def test_non_first_fragments_match_only_rules_without_ports(router: RunningPolicyd,
                                                            family: int) -> None:
    plan = PLAN[family]
    install(router, make_policy(
        [rule(1, "ported", ALLOW, priority=0, protocol=TCP, ports=(22, 22)),
         rule(2, "ported", ALLOW, priority=0, protocol=TCP, ports=(1, 65535)),
         rule(3, "portless", ALLOW, priority=9, protocol=TCP)],
        {plan["host"] + ("/32" if family == 4 else "/128"): ["ported"],
         plan["other_host"] + ("/32" if family == 4 else "/128"): ["ported", "portless"]}))
    assert outcome(ask(router, plan["host"], plan["dst"], TCP, port=22)) == (*ALLOWED, 1)
    # Even a 1-65535 range needs a port to compare.
    assert outcome(ask(router, plan["host"], plan["dst"], TCP, fragment=True)) == DEFAULT_DENY
    assert outcome(ask(router, plan["other_host"], plan["dst"], TCP,
                       fragment=True)) == (*ALLOWED, 3)
    assert outcome(ask(router, plan["other_host"], plan["dst"], TCP,
                       port=22)) == (*ALLOWED, 1)


@pytest.mark.parametrize("family", [4, 6])
def test_a_deny_with_ports_does_not_apply_to_non_first_fragments(router: RunningPolicyd,
                                                                 family: int) -> None:
    plan = PLAN[family]
    install(router, make_policy(
        [rule(1, "r", DENY, protocol=TCP, ports=(22, 22)), rule(2, "r", ALLOW, protocol=TCP)],
        {plan["lan"]: ["r"]}))
    assert outcome(ask(router, plan["host"], plan["dst"], TCP, port=22)) == ("DENY",
                                                                             "RULE_DENY", 1)
    assert outcome(ask(router, plan["host"], plan["dst"], TCP, fragment=True)) == (*ALLOWED, 2)


def test_ipv4_fragment_at_offset_8_bytes_with_tcp_is_malformed_l4(
        router: RunningPolicyd) -> None:
    install(router, make_policy([rule(1, "all", ALLOW)], {"10.1.0.0/24": ["all"]}))
    # RFC 1858: offset 1 can rewrite the first fragment's TCP header.
    frame = tcp_frame("10.1.0.10", "10.2.0.5", 22, frag_off=1)
    assert outcome(ask_raw(router, frame)) == ("DENY", "MALFORMED_L4", 0)
    # Not for UDP, and not at offset 2: those are ordinary non-first fragments.
    udp = frames.ethernet(frames.ETH_IP, frames.ipv4(
        ip("10.1.0.10"), ip("10.2.0.5"), frames.UDP, bytes(16), frag_off=1))
    assert outcome(ask_raw(router, udp)) == (*ALLOWED, 1)
    frame = tcp_frame("10.1.0.10", "10.2.0.5", 22, frag_off=2)
    assert outcome(ask_raw(router, frame)) == (*ALLOWED, 1)


def test_first_fragments_carry_ports_and_match_port_rules(router: RunningPolicyd) -> None:
    install(router, make_policy([rule(1, "ssh", ALLOW, protocol=TCP, ports=(22, 22))],
                                {"10.1.0.0/24": ["ssh"], "fd01::/64": ["ssh"]}))
    more_fragments = 0x2000  # MF set, offset 0: the first fragment has the TCP header
    frame = tcp_frame("10.1.0.10", "10.2.0.5", 22, frag_off=more_fragments)
    assert outcome(ask_raw(router, frame)) == (*ALLOWED, 1)
    first = frames.extension(frames.FRAGMENT, frames.TCP, offset=0, more=True)
    frame = v6_frame(frames.FRAGMENT, first + frames.tcp(40000, 22))
    assert outcome(ask_raw(router, frame)) == (*ALLOWED, 1)
    frame = v6_frame(frames.FRAGMENT, first + frames.tcp(40000, 23))
    assert outcome(ask_raw(router, frame)) == DEFAULT_DENY


# --------------------------------------------------------------------- IPv4 and IPv6

@pytest.mark.parametrize("family", [4, 6])
def test_ipv6_is_enforced_like_ipv4(router: RunningPolicyd, family: int) -> None:
    plan = PLAN[family]
    install(router, make_policy(
        [rule(1, "eng", ALLOW, protocol=TCP, dst=plan["site"], ports=(22, 22)),
         rule(2, "eng", DENY, dst=plan["dst"] + ("/32" if family == 4 else "/128"))],
        {plan["lan"]: ["eng"]}))
    other = str(ipaddress.ip_address(plan["dst"]) + 1)
    assert outcome(ask(router, plan["host"], other, TCP, port=22)) == (*ALLOWED, 1)
    assert outcome(ask(router, plan["host"], plan["dst"], TCP, port=22)) == ("DENY",
                                                                             "RULE_DENY", 2)
    assert outcome(ask(router, plan["host"], other, TCP, port=80)) == DEFAULT_DENY
    assert outcome(ask(router, plan["host"], plan["outside"], TCP, port=22)) == DEFAULT_DENY
    assert outcome(ask(router, plan["unbound"], other, TCP, port=22)) == NO_ROLE


def test_rules_without_prefixes_cover_both_families_and_prefixed_rules_only_theirs(
        router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "r", ALLOW, protocol=TCP, dst="10.2.0.0/16"),
         rule(2, "r", ALLOW, protocol=UDP),
         rule(3, "r", ALLOW, protocol=ICMPV6, src="fd01::/64")],
        {"10.1.0.0/24": ["r"], "fd01::/64": ["r"]}))
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=22)) == (*ALLOWED, 1)
    # The IPv4 prefix never matches an IPv6 packet: nothing passes because of its family.
    assert outcome(ask(router, "fd01::10", "fd02::5", TCP, port=22)) == DEFAULT_DENY
    assert outcome(ask(router, "fd01::10", "fd02::5", UDP, port=53)) == (*ALLOWED, 2)
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", UDP, port=53)) == (*ALLOWED, 2)
    assert outcome(ask(router, "fd01::10", "fd02::5", ICMPV6, icmp_type=128)) == (*ALLOWED, 3)
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", ICMP)) == DEFAULT_DENY


def test_other_ip_protocols_match_only_protocol_any_rules(router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "typed", ALLOW, protocol=TCP), rule(2, "typed", ALLOW, protocol=UDP),
         rule(3, "typed", ALLOW, protocol=ICMP), rule(4, "any", ALLOW, priority=50)],
        {"10.1.0.10/32": ["typed"], "10.1.0.11/32": ["typed", "any"]}))
    # TestDecision's PROTOCOL_ANY crafts IP protocol 253, "some other protocol".
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", ANY)) == DEFAULT_DENY
    assert outcome(ask(router, "10.1.0.11", "10.2.0.5", ANY)) == (*ALLOWED, 4)
    # Protocol 47 (GRE) in an exact frame: the same.
    gre = frames.ethernet(frames.ETH_IP, frames.ipv4(ip("10.1.0.10"), ip("10.2.0.5"), 47,
                                                     bytes(8)))
    assert outcome(ask_raw(router, gre)) == DEFAULT_DENY


# ------------------------------------------------------------------------------- ports

def test_port_ranges_include_both_bounds_and_single_ports_inside_them(
        router: RunningPolicyd) -> None:
    install(router, make_policy(
        [rule(1, "r", ALLOW, protocol=TCP, ports=(1000, 2000)),
         rule(2, "r", DENY, protocol=TCP, ports=(1500, 1500))],
        {"10.1.0.0/24": ["r"]}))
    expected = {999: DEFAULT_DENY, 1000: (*ALLOWED, 1), 1499: (*ALLOWED, 1),
                1500: ("DENY", "RULE_DENY", 2), 1501: (*ALLOWED, 1), 2000: (*ALLOWED, 1),
                2001: DEFAULT_DENY}
    got = {port: outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=port))
           for port in expected}
    assert got == expected
    # The range is TCP's: UDP to the same port is not covered.
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", UDP, port=1000)) == DEFAULT_DENY


@pytest.mark.parametrize("protocol", [ANY, ICMP, ICMPV6])
def test_a_port_range_needs_protocol_tcp_or_udp(router: RunningPolicyd, protocol: int) -> None:
    install(router, EMPTY)
    bad = make_policy([rule(1, "r", ALLOW, protocol=protocol, ports=(22, 22))],
                      {"10.1.0.0/24": ["r"]})
    details = rejected(router, bad)
    assert "protocol" in details and "tcp or udp" in details, details


# -------------------------------------------------------------------------- malformed

def _v4(protocol: int, payload: bytes, **fields: int) -> bytes:
    """An IPv4 frame from 10.1.0.10 to 10.2.0.5."""
    return frames.ethernet(frames.ETH_IP, frames.ipv4(ip("10.1.0.10"), ip("10.2.0.5"),
                                                      protocol, payload, **fields))


def _chain(kinds: Sequence[int], last: int, payload: bytes) -> bytes:
    """IPv6 extension headers of ``kinds`` (in order) followed by ``last`` and
    ``payload``; returns the bytes after the fixed header (its next header is kinds[0])."""
    out = payload
    nexts = [*kinds, last][1:]
    for kind, following in reversed(list(zip(kinds, nexts, strict=True))):
        out = frames.extension(kind, following) + out
    return out


SEVEN = [frames.HOPOPTS, frames.DSTOPTS, frames.ROUTING, frames.AH, frames.DSTOPTS,
         frames.ROUTING, frames.DSTOPTS]
MALFORMED = {
    "vlan-truncated": (frames.MAC + b"\x81\x00\x00", "MALFORMED_L2"),
    "ipv4-truncated": (_v4(frames.TCP, frames.tcp(1, 22))[:14 + 19], "MALFORMED_L3"),
    "ipv4-ihl-4": (_v4(frames.TCP, frames.tcp(1, 22), ihl=4), "MALFORMED_L3"),
    "ipv4-ihl-past-frame": (_v4(frames.TCP, b"", ihl=15, tot_len=20)[:14 + 40],
                            "MALFORMED_L3"),
    "ipv4-version-5": (_v4(frames.TCP, frames.tcp(1, 22), version=5), "MALFORMED_L3"),
    "ipv4-tot-len-past-frame": (_v4(frames.TCP, frames.tcp(1, 22), tot_len=41),
                                "MALFORMED_L3"),
    "ipv4-tot-len-below-header": (_v4(frames.TCP, frames.tcp(1, 22), tot_len=19),
                                  "MALFORMED_L3"),
    "ipv6-truncated": (v6_frame(frames.TCP, frames.tcp(1, 22))[:14 + 39], "MALFORMED_L3"),
    "ipv6-version-4": (frames.ethernet(frames.ETH_IPV6, frames.ipv6(
        ip("fd01::10"), ip("fd02::5"), frames.TCP, frames.tcp(1, 22), version=4)),
        "MALFORMED_L3"),
    "ipv6-payload-len-past-frame": (frames.ethernet(frames.ETH_IPV6, frames.ipv6(
        ip("fd01::10"), ip("fd02::5"), frames.TCP, frames.tcp(1, 22), payload_len=21)),
        "MALFORMED_L3"),
    "ipv6-hop-by-hop-not-first": (v6_frame(frames.DSTOPTS, _chain(
        [frames.DSTOPTS, frames.HOPOPTS], frames.TCP, frames.tcp(1, 22))), "MALFORMED_L3"),
    "ipv6-extension-past-frame": (v6_frame(frames.ROUTING, frames.extension(
        frames.ROUTING, frames.TCP, units=4)[:16]), "MALFORMED_L3"),
    "ipv6-seven-extensions": (v6_frame(SEVEN[0], _chain(SEVEN, frames.TCP,
                                                        frames.tcp(1, 22))), "IPV6_EXT_LIMIT"),
    "tcp-truncated": (_v4(frames.TCP, frames.tcp(1, 22)[:19]), "MALFORMED_L4"),
    "tcp-doff-4": (_v4(frames.TCP, frames.tcp(1, 22, doff=4)), "MALFORMED_L4"),
    "tcp-doff-past-frame": (_v4(frames.TCP, frames.tcp(1, 22, doff=6)[:20]), "MALFORMED_L4"),
    "udp-length-7": (_v4(frames.UDP, frames.udp(1, 53, length=7)), "MALFORMED_L4"),
    "udp-truncated": (_v4(frames.UDP, frames.udp(1, 53)[:7]), "MALFORMED_L4"),
    "icmp-7-bytes": (_v4(frames.ICMP, frames.icmp(8, size=7)), "MALFORMED_L4"),
    "icmpv6-7-bytes": (v6_frame(frames.ICMPV6, frames.icmp(128, size=7)), "MALFORMED_L4"),
    "ipv6-tcp-truncated": (v6_frame(frames.TCP, frames.tcp(1, 22)[:12]), "MALFORMED_L4"),
}


@pytest.mark.parametrize(("frame", "reason"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_frames_are_denied_with_their_reason(router: RunningPolicyd, frame: bytes,
                                                       reason: str) -> None:
    # Even an allow-everything policy for the source does not let them through.
    install(router, make_policy([rule(1, "all", ALLOW)], {"10.1.0.0/24": ["all"],
                                                          "fd01::/64": ["all"]}))
    assert outcome(ask_raw(router, frame)) == ("DENY", reason, 0)
    # The randomized test's reference parser agrees with this hand-written table.
    assert codes_pb2.Reason.Name(frames.parse(frame).reason) == f"REASON_{reason}"


def test_six_extension_headers_are_walked_to_the_transport_header(
        router: RunningPolicyd) -> None:
    install(router, make_policy([rule(1, "ssh", ALLOW, protocol=TCP, ports=(22, 22))],
                                {"fd01::/64": ["ssh"]}))
    six = SEVEN[:6]
    assert outcome(ask_raw(router, v6_frame(six[0], _chain(six, frames.TCP,
                                                           frames.tcp(1, 22))))) == (
        *ALLOWED, 1)
    assert outcome(ask_raw(router, v6_frame(six[0], _chain(six, frames.TCP,
                                                           frames.tcp(1, 23))))) == DEFAULT_DENY


def test_one_vlan_tag_and_ipv4_options_are_parsed_and_enforced(router: RunningPolicyd) -> None:
    install(router, make_policy([rule(1, "ssh", ALLOW, protocol=TCP, ports=(22, 22))],
                                {"10.1.0.0/24": ["ssh"]}))
    assert outcome(ask_raw(router, tcp_frame("10.1.0.10", "10.2.0.5", 22,
                                             vlans=[7]))) == (*ALLOWED, 1)
    assert outcome(ask_raw(router, tcp_frame("10.1.9.9", "10.2.0.5", 22,
                                             vlans=[7]))) == NO_ROLE
    assert outcome(ask_raw(router, tcp_frame("10.1.0.10", "10.2.0.5", 22,
                                             ihl=15))) == (*ALLOWED, 1)
    assert outcome(ask_raw(router, tcp_frame("10.1.0.10", "10.2.0.5", 23,
                                             ihl=15))) == DEFAULT_DENY


# ------------------------------------------------------------------------------ limits

MAX_ROLES, MAX_RULES = 16, 32


def _big_roles(roles: int, rules: int) -> list[Rule]:
    """``rules`` rules in each of ``roles`` roles, none of which matches a packet to
    10.2.0.5 except the very last, which sorts last of all (worst priority, highest id):
    reaching it means every earlier candidate was looked at."""
    out = []
    for r in range(roles):
        for i in range(rules):
            out.append(rule(1 + r * rules + i, f"r{r:02}", ALLOW, priority=i % 7,
                            protocol=TCP, dst=f"10.9.{r}.{i}/32"))
    last = out[-1]
    out[-1] = rule(last.id, last.role, ALLOW, priority=1000, protocol=TCP, dst="10.2.0.0/16")
    return out


def test_sixteen_roles_of_32_rules_on_one_address_are_all_evaluated(
        router: RunningPolicyd) -> None:
    rules = _big_roles(MAX_ROLES, MAX_RULES)
    names = sorted({r.role for r in rules})
    install(router, make_policy(rules, {"10.1.0.10/32": names}))
    d = ask(router, "10.1.0.10", "10.2.0.5", TCP, port=22)
    assert outcome(d) == (*ALLOWED, MAX_ROLES * MAX_RULES)
    assert set(d.roles) == set(names)
    assert outcome(ask(router, "10.1.0.10", "10.9.3.4", TCP, port=22)) == (
        *ALLOWED, 3 * MAX_RULES + 5)
    assert outcome(ask(router, "10.1.0.10", "10.3.0.5", TCP, port=22)) == DEFAULT_DENY


def test_seventeen_roles_on_a_binding_are_rejected_naming_the_field(
        router: RunningPolicyd) -> None:
    install(router, make_policy([rule(1, "ok", ALLOW)], {"10.1.0.0/24": ["ok"]}))
    rules = _big_roles(MAX_ROLES + 1, 1)
    details = rejected(router, make_policy(rules, {"10.1.0.10/32": sorted({r.role
                                                                           for r in rules})}))
    assert "bindings" in details and "roles" in details and "17" in details, details
    # A refused replacement changes nothing.
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=22)) == (*ALLOWED, 1)


def test_thirty_three_rules_in_a_role_are_rejected_naming_the_field(
        router: RunningPolicyd) -> None:
    install(router, make_policy([rule(1, "ok", ALLOW)], {"10.1.0.0/24": ["ok"]}))
    details = rejected(router, make_policy(_big_roles(1, MAX_RULES + 1),
                                           {"10.1.0.10/32": ["r00"]}))
    assert "r00" in details and "rules" in details and "33" in details, details
    assert outcome(ask(router, "10.1.0.10", "10.2.0.5", TCP, port=22)) == (*ALLOWED, 1)
