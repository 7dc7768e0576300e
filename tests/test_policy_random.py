"""Randomized differential test: the live XDP program against the reference evaluator.

Random policies over a deliberately small address space (so bindings, zones and rule
prefixes overlap) are installed with ReplacePolicy; random packets go through TestDecision
(the real program under BPF_PROG_TEST_RUN): crafted probes, compared with
``model.evaluate``, and exact frames (IPv6 extension chains, VLAN tags, fragments and many
kinds of malformation), compared with ``frames.decide``, which parses them as the C does.
Verdict, reason, matched rule, roles and both zones must agree for every packet.

The seed is random per run and printed; ``VPNR_POLICY_SEED=<n>`` replays a run.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import cast

import frames
import pytest

from conftest import RunningPolicyd
from vpnr.policyd import convert
from vpnr.policyd.compiler import Ids
from vpnr.policyd.model import (
    Action,
    Context,
    Decision,
    IPAddress,
    IPNetwork,
    Packet,
    Policy,
    Rule,
    evaluate,
)
from vpnr.v1 import codes_pb2, policy_pb2

pytestmark = pytest.mark.root

SEED_ENV = "VPNR_POLICY_SEED"
# policyd logs a line per replacement into conftest's pipe, which nobody reads while the
# daemon runs: a few hundred replacements fill its 64 KiB and freeze the daemon.
POLICIES = 80
PACKETS_PER_POLICY = 125
MIN_POLICIES = 10  # compared even when the time budget is spent
TIME_BUDGET = 35.0  # seconds of comparing, of the file's ~60 s (daemon start included)
RAW_SHARE = 0.45  # of the packets, exact frames rather than crafted probes
SHOWN_MISMATCHES = 5
CALL_TIMEOUT = 20.0  # seconds: a wedged daemon fails the test instead of hanging it

ANY, TCP, UDP = codes_pb2.PROTOCOL_ANY, codes_pb2.PROTOCOL_TCP, codes_pb2.PROTOCOL_UDP
ICMP, ICMPV6 = codes_pb2.PROTOCOL_ICMP, codes_pb2.PROTOCOL_ICMPV6
PROTOCOLS = (ANY, TCP, UDP, ICMP, ICMPV6)
OTHER_PROTOCOL = 253  # what TestDecision crafts for PROTOCOL_ANY
ZONES = (codes_pb2.ZONE_INTERNAL, codes_pb2.ZONE_VPN, codes_pb2.ZONE_EXTERNAL)
INTERFACES = {"lan0": codes_pb2.ZONE_INTERNAL, "wan0": codes_pb2.ZONE_EXTERNAL}
ND_TYPES = range(133, 138)

# 10.0.{0..3}.HOST and fd00::{0..3}:HOST; the prefix lengths cut inside and across those.
HOSTS = (0, 1, 2, 3, 7, 8, 15, 16, 64, 127, 128, 200, 254, 255)
V4_LENGTHS = (8, 16, 22, 23, 24, 25, 26, 28, 30, 31, 32)
V6_LENGTHS = (16, 64, 96, 110, 111, 112, 120, 122, 126, 127, 128)
OUTSIDE = {4: ipaddress.ip_address("192.0.2.1"), 6: ipaddress.ip_address("2001:db8::1")}
# Rule ports, and the ports infrastructure is recognised by.
PORTS = (1, 22, 53, 67, 68, 80, 443, 546, 547, 1000, 1024, 8080, 51820, 65535)
SRC_PORTS = (40000, 67, 68, 546, 547, 5353)
ICMP_TYPES = (0, 3, 8, 128, 133, 134, 135, 136, 137, 138)
# Reasons any run of this size reaches; a run that misses one tests less than it claims.
EXPECTED_REASONS = frozenset({
    codes_pb2.REASON_RULE_ALLOW, codes_pb2.REASON_RULE_DENY, codes_pb2.REASON_DEFAULT_DENY,
    codes_pb2.REASON_NO_ROLE, codes_pb2.REASON_INFRA_BYPASS, codes_pb2.REASON_ZONE_EXTERNAL,
    codes_pb2.REASON_TUNNEL_NO_SOCKET, codes_pb2.REASON_MALFORMED_L3,
    codes_pb2.REASON_MALFORMED_L4, codes_pb2.REASON_IPV6_EXT_LIMIT,
    codes_pb2.REASON_UNSUPPORTED_ETHERTYPE})

# (verdict, reason, rule id, roles, source zone, destination zone), names for display
Outcome = tuple[str, str, int, frozenset[str], str, str]


# ------------------------------------------------------------------------------ policies

def random_address(rng: random.Random, family: int) -> IPAddress:
    """An address of the small space."""
    net, host = rng.randrange(4), rng.choice(HOSTS)
    if family == 4:
        return ipaddress.IPv4Address(f"10.0.{net}.{host}")
    return ipaddress.IPv6Address(f"fd00::{net:x}:{host:x}")


def random_prefix(rng: random.Random, family: int) -> IPNetwork:
    """A prefix around an address of the small space."""
    lengths = V4_LENGTHS if family == 4 else V6_LENGTHS
    return ipaddress.ip_network(f"{random_address(rng, family)}/{rng.choice(lengths)}",
                                strict=False)


def random_ports(rng: random.Random) -> tuple[int, int]:
    """A single port or a range (bounds from PORTS, sometimes one off them)."""
    low = rng.choice(PORTS)
    if rng.random() < 0.5:
        return low, low
    high = min(65535, rng.choice(PORTS) + rng.choice((0, 0, 1)))
    return min(low, high), max(low, high)


def random_rule(rng: random.Random, rule_id: int, role: str) -> Rule:
    """A valid rule: prefixes of one family, ICMP kinds only with their family, ports only
    for TCP and UDP."""
    protocol = rng.choice(PROTOCOLS)
    families = {ICMP: (None, 4), ICMPV6: (None, 6)}.get(protocol, (None, 4, 6))
    family = rng.choice(families)
    src = random_prefix(rng, family) if family and rng.random() < 0.5 else None
    dst = random_prefix(rng, family) if family and rng.random() < 0.6 else None
    ports = random_ports(rng) if protocol in (TCP, UDP) and rng.random() < 0.6 else (0, 0)
    action = Action.ALLOW if rng.random() < 0.6 else Action.DENY
    return Rule(rule_id, role, rng.randrange(6), action, protocol, src, dst, *ports)


def random_policy(rng: random.Random) -> Policy:
    """1-6 roles of 0-8 rules (ids shuffled, priorities colliding), 1-8 bindings of 1-3
    roles on overlapping prefixes of both families, 0-4 zones."""
    names = [f"role{i}" for i in range(rng.randint(1, 6))]
    counts = [rng.randint(0, 8) for _ in names]
    ids = iter(rng.sample(range(1, 1000), sum(counts)))
    policy = Policy(roles={name: [random_rule(rng, next(ids), name) for _ in range(count)]
                           for name, count in zip(names, counts, strict=True)})
    for _ in range(rng.randint(1, 8)):
        prefix = random_prefix(rng, rng.choice((4, 6)))
        policy.bindings.setdefault(prefix, tuple(rng.sample(names, rng.randint(
            1, min(3, len(names))))))
    for _ in range(rng.randint(0, 4)):
        policy.zones[random_prefix(rng, rng.choice((4, 6)))] = rng.choice(ZONES)
    policy.validate()
    return policy


def policy_ports(policy: Policy) -> list[int]:
    """Ports worth probing: every rule's bounds and their neighbours, and PORTS."""
    out = set(PORTS)
    for rules in policy.roles.values():
        for r in rules:
            if r.has_ports:
                out.update((r.dst_port_from - 1, r.dst_port_from, r.dst_port_to,
                            r.dst_port_to + 1))
    return sorted(p for p in out if 1 <= p <= 65535)


def describe_policy(policy: Policy) -> str:
    """The policy on a few lines, for a mismatch report."""
    def one(r: Rule) -> str:
        ports = f" {r.dst_port_from}-{r.dst_port_to}" if r.has_ports else ""
        return (f"#{r.id} p{r.priority} {r.action.name} {protocol_name(r.protocol)} "
                f"{r.src_prefix or '*'} -> {r.dst_prefix or '*'}{ports}")
    lines = [f"  {name}: " + "; ".join(one(r) for r in rules) for name, rules in
             policy.roles.items()]
    lines.append("  bindings: " + ", ".join(f"{net}={'+'.join(roles)}"
                                            for net, roles in policy.bindings.items()))
    lines.append("  zones: " + ", ".join(f"{net}={zone_name(z)}"
                                         for net, z in policy.zones.items()))
    return "\n".join(lines)


def protocol_name(protocol: int) -> str:
    """A Protocol enum value's short name."""
    return codes_pb2.Protocol.Name(cast(codes_pb2.Protocol, protocol)).removeprefix(
        "PROTOCOL_").lower()


def zone_name(zone: int) -> str:
    """A Zone enum value's short name."""
    return codes_pb2.Zone.Name(cast(codes_pb2.Zone, zone)).removeprefix("ZONE_")


# ------------------------------------------------------------------------------ probes

@dataclass(frozen=True)
class Probe:
    """A crafted packet as TestDecision's fields describe it."""

    src: IPAddress
    dst: IPAddress
    protocol: int  # Protocol enum value
    dst_port: int
    src_port: int
    icmp_type: int
    fragment: bool

    def request(self, interface: str) -> policy_pb2.TestDecisionRequest:
        """The TestDecision request for this probe."""
        return policy_pb2.TestDecisionRequest(
            src=str(self.src), dst=str(self.dst),
            protocol=cast(codes_pb2.Protocol, self.protocol), dst_port=self.dst_port,
            src_port=self.src_port, icmp_type=self.icmp_type, fragment=self.fragment,
            interface=interface)

    def packet(self) -> Packet:
        """What the program sees in the frame the daemon crafts (services/policyd/testrun.py):
        ports only in a TCP/UDP header, an ICMP type only in an ICMP header, neither in a
        non-first fragment; hop limit 255 only for IPv6 ND types."""
        number = OTHER_PROTOCOL if self.protocol == ANY else self.protocol
        hop_limit = 255 if (self.src.version == 6 and number == ICMPV6
                            and self.icmp_type in ND_TYPES) else 64
        if self.fragment:
            return Packet(self.src, self.dst, number, fragment=True, hop_limit=hop_limit)
        ported, icmp = number in (TCP, UDP), number in (ICMP, ICMPV6)
        return Packet(self.src, self.dst, number, dst_port=self.dst_port if ported else 0,
                      src_port=self.src_port if ported else 0,
                      icmp_type=self.icmp_type if icmp else None, hop_limit=hop_limit)


def random_source(rng: random.Random, policy: Policy, family: int) -> IPAddress:
    """Half the time an address inside one of the policy's bindings (so rules get to
    decide), else one of the space or, rarely, outside it."""
    bound = [net for net in policy.bindings if net.version == family]
    if bound and rng.random() < 0.5:
        net = rng.choice(bound)
        return net[rng.randrange(net.num_addresses)]
    return random_address(rng, family) if rng.random() < 0.9 else OUTSIDE[family]


def random_destination(rng: random.Random, family: int) -> IPAddress:
    """An address of the space or, sometimes, outside it (no zone, no rule prefix)."""
    return random_address(rng, family) if rng.random() < 0.85 else OUTSIDE[family]


def random_probe(rng: random.Random, policy: Policy, ports: list[int]) -> Probe:
    """A probe of any protocol, ports from the policy's, sometimes a non-first fragment.
    Ports and ICMP type are never 0: the daemon reads 0 as "pick a default"."""
    family = rng.choice((4, 6))
    src, dst = random_source(rng, policy, family), random_destination(rng, family)
    icmp_type = rng.choice([t for t in ICMP_TYPES if t])
    return Probe(src, dst, rng.choice(PROTOCOLS), rng.choice(ports), rng.choice(SRC_PORTS),
                 icmp_type, rng.random() < 0.2)


# ------------------------------------------------------------------------------ frames

V4_FLAWS = ("truncate", "ihl", "version", "tot_len", "tot_len_small", "doff", "udp_len",
            "icmp_short", "pad", "vlan_truncated")
V6_FLAWS = ("truncate", "version", "tot_len", "doff", "udp_len", "icmp_short", "pad",
            "hop_by_hop_late", "vlan_truncated")
EXT_KINDS = ("routing", "dstopts", "ah", "frag_first", "frag_later")
EXT_NUMBERS = {"hopopts": frames.HOPOPTS, "routing": frames.ROUTING,
               "dstopts": frames.DSTOPTS, "ah": frames.AH, "frag_first": frames.FRAGMENT,
               "frag_later": frames.FRAGMENT}


def transport(rng: random.Random, protocol: int, flaw: str, ports: list[int]) -> bytes:
    """The bytes after the IP header(s): a TCP, UDP or ICMP header (broken when ``flaw``
    says so) or an opaque payload for other protocols."""
    # Port 0 only fits in a frame (TestDecision reads 0 as "default"); no rule names it.
    sport, dport = rng.choice(SRC_PORTS), rng.choice(ports) if rng.random() < 0.95 else 0
    if protocol == frames.TCP:
        if flaw == "doff":
            header = bytearray(frames.tcp(sport, dport))
            header[12] = rng.choice((0, 1, 4, 15)) << 4  # 15: options past the frame
            return bytes(header)
        return frames.tcp(sport, dport, doff=rng.choice((5, 5, 5, 6, 8)))
    if protocol == frames.UDP:
        length = rng.randrange(8) if flaw == "udp_len" else None
        return frames.udp(sport, dport, bytes(rng.randrange(0, 16)), length)
    if protocol in (frames.ICMP, frames.ICMPV6):
        size = rng.randrange(8) if flaw == "icmp_short" else rng.choice((8, 16, 24))
        return frames.icmp(rng.choice(ICMP_TYPES), size)
    return bytes(rng.randrange(0, 24))


def ipv4_packet(rng: random.Random, src: IPAddress, dst: IPAddress, protocol: int,
                payload: bytes, flaw: str) -> tuple[bytes, str]:
    """An IPv4 packet: options, fragment fields and TTL at random, or one header flaw."""
    ihl = rng.randrange(0, 5) if flaw == "ihl" else (5 if rng.random() < 0.8
                                                     else rng.randint(6, 15))
    version = rng.choice((0, 5, 6, 15)) if flaw == "version" else 4
    # 0x2000 MF, 0x4000 DF; offset 1 with TCP is the RFC 1858 case.
    frag_off = rng.choice((0, 0, 0, 0, 0x4000, 0x2000, 1, 2, 185, 0x2000 | 185))
    true_len = max(ihl, 5) * 4 + len(payload)
    tot_len = {"tot_len": true_len + rng.randint(1, 64),
               "tot_len_small": rng.randrange(0, max(ihl, 5) * 4)}.get(flaw)
    ttl = rng.choice((64, 255, 1))
    header = frames.ipv4(src, dst, protocol, payload, ttl=ttl, ihl=ihl, version=version,
                         frag_off=frag_off, tot_len=tot_len)
    return header, f"v4 ihl={ihl} ver={version} frag={frag_off:#x} ttl={ttl} len={tot_len}"


def ipv6_packet(rng: random.Random, src: IPAddress, dst: IPAddress, protocol: int,
                payload: bytes, flaw: str) -> tuple[bytes, str]:
    """An IPv6 packet with 0-8 extension headers (hop-by-hop often first, misplaced when
    ``flaw`` says so), or one fixed-header flaw."""
    kinds = []
    for index in range(rng.randint(0, 8)):
        if index == 0 and rng.random() < 0.4:
            kinds.append("hopopts")
        else:
            kinds.append(rng.choice(EXT_KINDS))
    if flaw == "hop_by_hop_late" and kinds:
        kinds.insert(rng.randint(1, len(kinds)), "hopopts")
    numbers = [EXT_NUMBERS[k] for k in kinds]
    body = payload
    for kind, following in reversed(list(zip(kinds, [*numbers, protocol][1:], strict=True))):
        if kind == "frag_first":
            header = frames.extension(frames.FRAGMENT, following, more=rng.random() < 0.7)
        elif kind == "frag_later":
            header = frames.extension(frames.FRAGMENT, following,
                                      offset=rng.choice((1, 185, 8191)),
                                      more=rng.random() < 0.5)
        else:
            header = frames.extension(EXT_NUMBERS[kind], following, rng.choice((0, 0, 1, 2)))
        body = header + body
    version = rng.choice((0, 4, 7)) if flaw == "version" else 6
    payload_len = len(body) + rng.randint(1, 64) if flaw == "tot_len" else None
    hop_limit = rng.choice((64, 255, 1))
    first = numbers[0] if numbers else protocol
    packet = frames.ipv6(src, dst, first, body, hop_limit=hop_limit, version=version,
                         payload_len=payload_len)
    return packet, (f"v6 ext={kinds} ver={version} hop={hop_limit} "
                    f"len={payload_len}")


def random_frame(rng: random.Random, policy: Policy, ports: list[int]) -> tuple[bytes, str]:
    """An exact frame and a one-line description of how it was made."""
    roll = rng.random()
    vlans = [rng.randrange(1, 4095) for _ in range(rng.choice((0,) * 17 + (1, 1, 2)))]
    if roll < 0.04:
        return frames.ethernet(frames.ETH_ARP, frames.arp()[14:], vlans), f"arp vlans={vlans}"
    if roll < 0.07:
        ethertype = rng.choice((frames.ETH_LLDP, frames.ETH_QINQ, 0x9000, 0x88E5))
        return (frames.ethernet(ethertype, bytes(rng.randrange(0, 46)), vlans),
                f"ethertype={ethertype:#x} vlans={vlans}")
    family = rng.choice((4, 6))
    flaw = rng.choice(V4_FLAWS if family == 4 else V6_FLAWS) if rng.random() < 0.5 else ""
    protocol = rng.choice((frames.TCP, frames.UDP, frames.ICMP, frames.ICMPV6, 47, 253))
    src, dst = random_source(rng, policy, family), random_destination(rng, family)
    payload = transport(rng, protocol, flaw, ports)
    build = ipv4_packet if family == 4 else ipv6_packet
    packet, what = build(rng, src, dst, protocol, payload, flaw)
    ethertype = frames.ETH_IP if family == 4 else frames.ETH_IPV6
    frame = frames.ethernet(ethertype, packet, vlans)
    if flaw == "truncate":
        frame = frame[:rng.randint(frames.ETH_HEADER, len(frame) - 1)]
    elif flaw == "pad":  # Ethernet padding after the IP packet is legal
        frame += bytes(rng.randint(1, 30))
    elif flaw == "vlan_truncated":
        frame = frames.MAC + b"\x81\x00" + bytes(rng.randrange(0, 4))
    return frame, (f"{what} proto={protocol} {src}->{dst} vlans={vlans} flaw={flaw or '-'} "
                   f"len={len(frame)}")


# ----------------------------------------------------------------------------- compare

def expected_outcome(decision: Decision) -> Outcome:
    """The model's decision in comparable form."""
    return (codes_pb2.Verdict.Name(cast(codes_pb2.Verdict, decision.verdict)),
            codes_pb2.Reason.Name(cast(codes_pb2.Reason, decision.reason)),
            decision.rule.id if decision.rule is not None else 0, frozenset(decision.roles),
            zone_name(decision.src_zone), zone_name(decision.dst_zone))


def actual_outcome(decision: policy_pb2.Decision) -> Outcome:
    """The kernel's decision in comparable form."""
    return (codes_pb2.Verdict.Name(decision.verdict), codes_pb2.Reason.Name(decision.reason),
            decision.matched_rule.id if decision.HasField("matched_rule") else 0,
            frozenset(decision.roles), zone_name(decision.src_zone),
            zone_name(decision.dst_zone))


@dataclass(frozen=True)
class Mismatch:
    """One packet on which the kernel and the reference disagree."""

    policy_index: int
    packet_index: int
    packet: str
    expected: Outcome
    actual: Outcome


def report(seed: int, mismatches: list[Mismatch], policies: dict[int, Policy],
           counts: Counter[str]) -> str:
    """The first mismatches with their policies, and how to replay the run."""
    lines = [f"{len(mismatches)} mismatches; seed {seed} (replay: {SEED_ENV}={seed}); "
             f"compared {dict(counts)}"]
    shown: set[int] = set()
    for m in mismatches[:SHOWN_MISMATCHES]:
        lines += [f"policy {m.policy_index}, packet {m.packet_index}: {m.packet}",
                  f"  expected {m.expected}", f"  actual   {m.actual}"]
        if m.policy_index not in shown:  # mismatches tend to come in runs on one policy
            shown.add(m.policy_index)
            lines.append(describe_policy(policies[m.policy_index]))
    return "\n".join(lines)


def test_kernel_decisions_match_the_reference_evaluator(
        policyd: RunningPolicyd, capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get(SEED_ENV) or secrets.randbelow(2**32))
    rng = random.Random(seed)  # noqa: S311 -- reproducible test data, not secrets
    print(f"seed {seed} (replay with {SEED_ENV}={seed})")
    started = time.monotonic()
    mismatches: list[Mismatch] = []
    policies: dict[int, Policy] = {}
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for policy_index in range(POLICIES):
        # On a loaded machine compare fewer policies rather than overrun the budget; the
        # sequence is the seed's either way, so a replay reaches the same packets.
        if policy_index >= MIN_POLICIES and time.monotonic() - started > TIME_BUDGET:
            break
        policy = random_policy(rng)
        policies[policy_index] = policy
        policyd.stub.ReplacePolicy(policy_pb2.ReplacePolicyRequest(
            policy=convert.document(policy, Ids(), 0), reason=f"random seed {seed}"),
            timeout=CALL_TIMEOUT)
        counts["policies"] += 1
        ports = policy_ports(policy)
        for packet_index in range(PACKETS_PER_POLICY):
            interface = rng.choice(sorted(INTERFACES))
            ctx = Context(interface_zone=INTERFACES[interface])
            if rng.random() < RAW_SHARE:
                frame, what = random_frame(rng, policy, ports)
                request = policy_pb2.TestDecisionRequest(raw_frame=frame, interface=interface)
                expected = expected_outcome(frames.decide(policy, frame, ctx))
                what = f"{interface} raw {what} hex={frame.hex()}"
                counts["raw frames"] += 1
            else:
                probe = random_probe(rng, policy, ports)
                request = probe.request(interface)
                expected = expected_outcome(evaluate(policy, probe.packet(), ctx))
                what = f"{interface} probe {probe}"
                counts["probes"] += 1
            actual = actual_outcome(policyd.stub.TestDecision(request, timeout=CALL_TIMEOUT))
            reasons[actual[1]] += 1
            if actual != expected:
                mismatches.append(Mismatch(policy_index, packet_index, what, expected,
                                           actual))
    elapsed = time.monotonic() - started
    summary = (f"seed {seed}: compared {counts['probes']} probes and {counts['raw frames']} "
               f"raw frames over {counts['policies']} policies in {elapsed:.1f} s, "
               f"{len(mismatches)} mismatches; kernel reasons {dict(reasons.most_common())}")
    with capsys.disabled():  # the counts belong in the run's output, not only on failure
        print(f"\n{summary}")
    assert not mismatches, report(seed, mismatches, policies, counts)
    missing = {codes_pb2.Reason.Name(r) for r in EXPECTED_REASONS} - set(reasons)
    assert not missing, f"seed {seed}: the generator never reached {sorted(missing)}"
