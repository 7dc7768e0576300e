"""The reference evaluator follows DESIGN.md's policy semantics line by line (pure, no root)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from vpnr.policyd.model import (
    Action,
    Packet,
    Policy,
    PolicyError,
    Rule,
    evaluate,
    parse_prefix,
)
from vpnr.v1 import codes_pb2 as codes

TCP, UDP, ICMP = codes.PROTOCOL_TCP, codes.PROTOCOL_UDP, codes.PROTOCOL_ICMP


def rule(rule_id: int, role: str, action: Action, priority: int = 10, protocol: int = 0,
         src: str = "", dst: str = "", ports: tuple[int, int] = (0, 0)) -> Rule:
    return Rule(rule_id, role, priority, action, protocol, parse_prefix("src", src),
                parse_prefix("dst", dst), *ports)


def packet(src: str, dst: str = "10.2.0.10", protocol: int = TCP, port: int = 443,
           fragment: bool = False) -> Packet:
    return Packet(ip_address(src), ip_address(dst), protocol, port, fragment)


@pytest.fixture
def policy() -> Policy:
    p = Policy(
        roles={
            "eng": [rule(1, "eng", Action.ALLOW, protocol=TCP, dst="10.2.0.0/24",
                         ports=(443, 443)),
                    rule(2, "eng", Action.ALLOW, priority=5, protocol=ICMP)],
            "contractor": [rule(3, "contractor", Action.DENY, dst="10.2.0.10/32"),
                           rule(4, "contractor", Action.DENY, priority=1,
                                dst="10.2.0.0/24")],
            "v6": [rule(5, "v6", Action.ALLOW, dst="fd00:2::/64")],
        },
        bindings={ip_network("10.1.0.0/24"): ("eng",),
                  ip_network("10.1.0.11/32"): ("eng", "contractor"),
                  ip_network("10.1.0.12/32"): ("v6",),
                  ip_network("fd00:1::/64"): ("v6",)},
    )
    p.validate()
    return p


def test_allow_rule_of_a_role(policy: Policy) -> None:
    d = evaluate(policy, packet("10.1.0.10"))
    assert (d.verdict, d.reason, d.rule and d.rule.id) == (codes.VERDICT_ALLOW,
                                                          codes.REASON_RULE_ALLOW, 1)


def test_longest_prefix_binding_wins_and_is_not_merged(policy: Policy) -> None:
    # 10.1.0.12/32 has only "v6": the broader /24 "eng" binding is not merged in.
    d = evaluate(policy, packet("10.1.0.12"))
    assert d.roles == ("v6",) and d.verdict == codes.VERDICT_DENY
    assert d.reason == codes.REASON_DEFAULT_DENY


def test_deny_wins_over_allow_and_reports_lowest_priority(policy: Policy) -> None:
    d = evaluate(policy, packet("10.1.0.11"))
    assert d.verdict == codes.VERDICT_DENY and d.reason == codes.REASON_RULE_DENY
    assert d.rule is not None and d.rule.id == 4  # priority 1 beats priority 10


def test_ties_on_priority_report_lowest_id() -> None:
    p = Policy(roles={"r": [rule(9, "r", Action.ALLOW), rule(7, "r", Action.ALLOW)]},
               bindings={ip_network("10.0.0.0/8"): ("r",)})
    assert evaluate(p, packet("10.9.9.9")).rule.id == 7  # type: ignore[union-attr]


def test_no_role_is_denied(policy: Policy) -> None:
    d = evaluate(policy, packet("192.0.2.1"))
    assert (d.verdict, d.reason, d.roles) == (codes.VERDICT_DENY, codes.REASON_NO_ROLE, ())


def test_default_deny_when_nothing_matches(policy: Policy) -> None:
    d = evaluate(policy, packet("10.1.0.10", port=22))
    assert (d.verdict, d.reason) == (codes.VERDICT_DENY, codes.REASON_DEFAULT_DENY)


def test_non_first_fragment_matches_only_portless_rules(policy: Policy) -> None:
    assert evaluate(policy, packet("10.1.0.10", fragment=True)).reason == \
        codes.REASON_DEFAULT_DENY
    d = evaluate(policy, packet("10.1.0.10", protocol=ICMP, port=0, fragment=True))
    assert d.verdict == codes.VERDICT_ALLOW and d.rule.id == 2  # type: ignore[union-attr]


def test_ipv6_enforced_like_ipv4(policy: Policy) -> None:
    assert evaluate(policy, packet("fd00:1::5", dst="fd00:2::9")).verdict == \
        codes.VERDICT_ALLOW
    assert evaluate(policy, packet("fd00:1::5", dst="fd00:3::9")).reason == \
        codes.REASON_DEFAULT_DENY
    assert evaluate(policy, packet("fd00:9::5", dst="fd00:2::9")).reason == \
        codes.REASON_NO_ROLE


@pytest.mark.parametrize(("make", "field", "words"), [
    (lambda: Policy(roles={"Bad Name": []}), "roles['Bad Name'].name", "expected"),
    (lambda: Policy(roles={"r": [rule(i, "r", Action.ALLOW) for i in range(1, 34)]}),
     "roles['r'].rules", "at most 32"),
    (lambda: Policy(roles={"r": [rule(1, "r", Action.ALLOW), rule(1, "r", Action.DENY)]}),
     "roles['r'].rules[id=1].id", "used twice"),
    (lambda: Policy(roles={"r": [rule(1, "r", Action.ALLOW, protocol=TCP, ports=(90, 80))]}),
     "roles['r'].rules[id=1].dst_port_from", "1 <= from <= to"),
    (lambda: Policy(roles={"r": [rule(1, "r", Action.ALLOW, ports=(80, 80))]}),
     "roles['r'].rules[id=1].protocol", "tcp or udp"),
    (lambda: Policy(roles={"r": [rule(1, "r", Action.ALLOW, src="10.0.0.0/8",
                                      dst="fd00::/8")]}),
     "roles['r'].rules[id=1].dst_prefix", "mix IPv4 and IPv6"),
    (lambda: Policy(roles={"r": []}, bindings={ip_network("10.0.0.0/8"): ("nope",)}),
     "bindings[10.0.0.0/8].roles", "unknown role 'nope'"),
    (lambda: Policy(roles={"r": []},
                    bindings={ip_network("10.0.0.0/8"): tuple(["r"] * 17)}),
     "bindings[10.0.0.0/8].roles", "at most 16"),
])
def test_invalid_policy_names_the_field(make: object, field: str, words: str) -> None:
    with pytest.raises(PolicyError) as err:
        make().validate()  # type: ignore[operator]
    assert err.value.field == field
    assert words in str(err.value)


def test_bad_prefix_names_the_field() -> None:
    with pytest.raises(PolicyError, match=r"^dst: expected a CIDR prefix, got '10.0.0.1/8'"):
        parse_prefix("dst", "10.0.0.1/8")


def test_fast_prefix_parser_agrees_with_ipaddress() -> None:
    import random

    from vpnr.policyd.model import _network

    rng = random.Random(20261121)  # noqa: S311 - reproducible test data, not secrets
    cases = ["10.0.0.0/8", "10.0.0.1/8", "1.2.3.4/33", "01.2.3.4/32", "1.2.3.4/032", "::/0",
             "fd00::1/128", "fd00::1/64", "1.2.3/24", "1.2.3.4/", "1.2.3.4", "256.1.1.1/32",
             "::ffff:1.2.3.4/128", "fe80::1%eth0/128", "1.2.3.4/-1", "1.2.3.4/ 8",
             "\u0661.2.3.4/32", "1.2.3.4/3\u0662"]
    for _ in range(3000):
        bits = rng.choice([32, 128])
        address = ip_address(rng.getrandbits(bits)) if bits == 32 else \
            ip_address(rng.getrandbits(bits).to_bytes(16, "big"))
        cases.append(f"{address}/{rng.randint(0, bits)}")

    def outcome(parse: object, text: str) -> object:
        try:
            return parse(text)  # type: ignore[operator]
        except ValueError:
            return "error"

    mismatches = [c for c in cases if outcome(lambda t: ip_network(t, strict=True), c)
                  != outcome(_network, c)]
    assert not mismatches
