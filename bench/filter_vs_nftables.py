"""Router CPU per packet: vpnr's XDP policy vs nftables (typical, expert) vs no filter.

One policy (10,000 /32 source bindings, 10 roles of 10 UDP rules = 100 ACL rules, deny
wins) is enforced in turn by:

- ``none``: no filter; the router only forwards;
- ``floor``: a one-instruction XDP program on the router's LAN veth, XDP_DROP for the
  dropped traffic and XDP_PASS for the allowed: the least any XDP filter can cost here;
- ``typical``: nftables as an administrator usually writes it: an ``inet`` forward chain
  with one rule per ACL rule (deny rules first, since the policy is deny-wins), a source
  set per role, no conntrack;
- ``expert``: nftables as an expert writes it: a ``netdev`` ingress chain on the router's
  LAN veth (drop before IP), a verdict map source -> role chain, and per role one deny and
  one allow interval set over ``daddr . l4proto . dport`` concatenations;
- ``xdp``: vpnr policyd on the router's LAN veth (native XDP), policy loaded through
  ``PolicyService.ReplacePolicy``.

Topology: namespaces gen -> rtr -> sink joined by veth pairs; the router forwards IPv4.
The generator is an XDP program run by ``BPF_PROG_TEST_RUN`` in live-frame mode
(``BPF_F_TEST_XDP_LIVE_FRAMES``) on the generator's veth: it writes each frame's headers
from a table of flows and returns ``XDP_TX``, so frames enter the router's veth at kernel
speed with no Python per packet. By default it floods (several times what the router
takes; the router's full ingress ring refuses the rest); with ``--overload X`` it is paced
instead at X times what the saturated router takes. The router's LAN veth has GRO on (which
gives a veth the NAPI instance it needs to take XDP frames from its peer) and threaded
NAPI, its NAPI thread pinned to the router core; the generator, the sink (its own XDP_DROP),
policyd and this script run on the other core, SCHED_FIFO while measuring (see measure()).

Router CPU is the runtime of the router's NAPI thread (/proc/PID/schedstat) over the
measured interval; packets are those the router's NAPI took from its ingress ring (rx of
its LAN veth); forwarded packets are counted on its uplink. ``dropped`` traffic comes from
sources whose role has a DENY rule matching the destination and port (half of those flows
also match an ALLOW rule: deny wins); ``allowed`` traffic matches ALLOW rules only. Every
case is measured in each of ``--rounds`` rounds (cases interleaved); figures are medians.
Prints a table, then as the last line one JSON object with every figure.

Run as root: .venv/bin/python bench/filter_vs_nftables.py [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from pyroute2 import IPRoute

from vpnr.core import bpfsys, netns
from vpnr.core.client import is_serving
from vpnr.policyd import model
from vpnr.policyd.datapath import LINK_PIN_PREFIX, PROG_PIN
from vpnr.v1 import codes_pb2, policy_pb2, policy_pb2_grpc

BIN = Path(sys.executable).parent
CASES = ("none", "floor", "typical", "expert", "xdp")
KINDS = ("dropped", "allowed")
TARGETS = {
    "dropped_cost_typical_over_xdp": 3.0,
    "dropped_cost_expert_over_xdp": 1.5,
    "allowed_pps_xdp_over_expert": 1.15,
    "allowed_pps_xdp_over_none": 0.80,
}

N_ROLES = 10
RULES_PER_ROLE = 10  # 8 ALLOW + 2 DENY per role
SRC_BASE = ipaddress.IPv4Address("10.1.0.0")
SRC_NET = ipaddress.IPv4Network("10.1.0.0/16")
DST_NET = ipaddress.IPv4Network("172.30.0.0/16")
ADMIN_PORTS = (9000, 9099)  # denied to every role, everywhere in DST_NET
FLOWS_PER_KIND = 8192
# Links between the namespaces (private addresses that exist only inside them).
LAN_ROUTER, LAN_GEN = "192.168.250.1/24", "192.168.250.2/24"
UPLINK_ROUTER, UPLINK_SINK = "192.168.251.1/24", "192.168.251.2"
MAC = {"gen": "02:76:62:00:00:01", "lan": "02:76:62:00:00:02",
       "up": "02:76:62:00:00:03", "sink": "02:76:62:00:00:04"}
FRAME_LEN = 64
HDR_LEN = 14 + 20 + 8  # Ethernet, IPv4, UDP
GEN_SPORT = 40000

# Frames per BPF_PROG_TEST_RUN call of the generator (tens of ms; most are paced out).
GEN_CHUNK = 1 << 18
GEN_START_PPS = 1e6  # where pacing (--overload) starts looking for the router's rate
GEN_MAX_PPS = 20e6
CALIBRATION_STEP_S = 0.25
# Frames per live-frame batch, also the size of the run's page pool: the largest the kernel
# takes (256). Measured with 64: pages the router frees on its core overflow the pool's
# recycling ring, and forwarding cost ~25% more per packet.
GEN_BATCH = 256
GEN_MAX_CALLS = 100_000
# SCHED_FIFO priorities while measuring (see measure()): the sink's NAPI thread above the
# generator on the generator core, this script's main thread above both so it samples on
# time, the router's NAPI thread alone on its core.
RT_PRIORITY = {"router": 50, "main": 40, "sink": 30, "generator": 10}
PROGRAM_ALONE_REPEAT = 100_000

READY_TIMEOUT = 90.0  # policyd compiles its program with bcc before SERVING
RPC_TIMEOUT = 120.0
# Enforcement checks: a filter must deliver at most 1% of dropped traffic and at least
# 95% of allowed traffic (the sink may lose a little when it is starved of CPU).
MAX_DROPPED_DELIVERED = 0.01
MIN_ALLOWED_DELIVERED = 0.95



class BenchError(Exception):
    """The benchmark cannot run or a step failed; the message says which."""


# -- the policy -------------------------------------------------------------------------


@dataclass(frozen=True)
class AclRule:
    """One ACL rule of the benchmark policy (every rule is UDP with a port range)."""

    id: int
    role: str
    priority: int
    deny: bool
    dst: ipaddress.IPv4Network
    port_from: int
    port_to: int


@dataclass
class BenchPolicy:
    """Roles with their rules, and the /32 sources bound to each role (one role each)."""

    rules: dict[str, list[AclRule]]
    sources: dict[str, list[ipaddress.IPv4Address]]

    def all_rules(self) -> list[AclRule]:
        """Every rule of every role."""
        return [r for rules in self.rules.values() for r in rules]

    def bindings(self) -> int:
        """Number of source bindings."""
        return sum(len(s) for s in self.sources.values())


def role_name(index: int) -> str:
    """Name of the index-th role."""
    return f"team{index:02d}"


def own_subnet(role: int, j: int) -> ipaddress.IPv4Network:
    """The j-th server /24 a role may reach."""
    return ipaddress.IPv4Network(f"172.30.{8 * role + j}.0/24")


def forbidden_subnet(role: int) -> ipaddress.IPv4Network:
    """A /24 the role must never reach on any port."""
    return ipaddress.IPv4Network(f"172.30.{200 + role}.0/24")


def make_policy(bindings: int) -> BenchPolicy:
    """10 roles x 10 rules; ``bindings`` /32 sources from 10.1.0.0, round robin over roles.

    Role i: ALLOW udp to own_subnet(i, j) ports 1000+100j..1099+100j for j < 7; ALLOW udp
    to own_subnet(i, 7) on every port; DENY udp to forbidden_subnet(i) on every port; DENY
    udp to all of 172.30.0.0/16 on the admin ports (this overlaps the j = 7 ALLOW).
    """
    rules: dict[str, list[AclRule]] = {}
    for i in range(N_ROLES):
        name, base = role_name(i), i * RULES_PER_ROLE
        role_rules = [AclRule(base + j + 1, name, 10 * j, False, own_subnet(i, j),
                              1000 + 100 * j, 1099 + 100 * j) for j in range(7)]
        role_rules.append(AclRule(base + 8, name, 70, False, own_subnet(i, 7), 1, 65535))
        role_rules.append(AclRule(base + 9, name, 80, True, forbidden_subnet(i), 1, 65535))
        role_rules.append(AclRule(base + 10, name, 90, True, DST_NET, *ADMIN_PORTS))
        rules[name] = role_rules
    sources: dict[str, list[ipaddress.IPv4Address]] = {role_name(i): [] for i in range(N_ROLES)}
    for k in range(bindings):
        sources[role_name(k % N_ROLES)].append(SRC_BASE + k)
    return BenchPolicy(rules, sources)


@dataclass(frozen=True)
class Flow:
    """One UDP flow the generator sends."""

    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    dport: int


def make_flows(policy: BenchPolicy, kind: str, count: int, rng: random.Random) -> list[Flow]:
    """``count`` flows from random bound sources that the policy drops or allows."""
    flows = []
    for _ in range(count):
        i = rng.randrange(N_ROLES)
        src = rng.choice(policy.sources[role_name(i)])
        host = rng.randrange(1, 255)
        if kind == "dropped":
            if rng.random() < 0.5:
                dst, port = forbidden_subnet(i)[host], rng.randrange(1, 65536)
            else:  # admin ports, half of them in the subnet whose ALLOW covers every port
                j = 7 if rng.random() < 0.5 else rng.randrange(7)
                dst, port = own_subnet(i, j)[host], rng.randrange(ADMIN_PORTS[0],
                                                                  ADMIN_PORTS[1] + 1)
        else:
            j = rng.randrange(8)
            dst = own_subnet(i, j)[host]
            if j < 7:
                port = rng.randrange(1000 + 100 * j, 1100 + 100 * j)
            else:
                port = rng.choice([rng.randrange(1, ADMIN_PORTS[0]),
                                   rng.randrange(ADMIN_PORTS[1] + 1, 65536)])
        flows.append(Flow(src, dst, port))
    return flows


def check_flows(policy: BenchPolicy, flows: dict[str, list[Flow]], sample: int = 200) -> None:
    """Check a sample of flows against vpnr's reference evaluator (DESIGN.md semantics)."""
    ref = model.Policy()
    for role, rules in policy.rules.items():
        ref.roles[role] = [model.Rule(
            id=r.id, role=role, priority=r.priority,
            action=model.Action.DENY if r.deny else model.Action.ALLOW,
            protocol=codes_pb2.PROTOCOL_UDP, dst_prefix=r.dst, dst_port_from=r.port_from,
            dst_port_to=r.port_to) for r in rules]
    role_of = {src: role for role, srcs in policy.sources.items() for src in srcs}
    expected = {"dropped": codes_pb2.VERDICT_DENY, "allowed": codes_pb2.VERDICT_ALLOW}
    for kind, kind_flows in flows.items():
        for flow in kind_flows[:sample]:
            # /32 bindings never overlap, so the flow's own binding decides alone.
            ref.bindings = {ipaddress.IPv4Network(flow.src): (role_of[flow.src],)}
            ref.validate()
            decision = model.evaluate(ref, model.Packet(flow.src, flow.dst,
                                                        codes_pb2.PROTOCOL_UDP, flow.dport))
            if decision.verdict != expected[kind]:
                raise BenchError(f"{kind} flow {flow} is {decision} by the reference evaluator")


def policy_document(policy: BenchPolicy) -> policy_pb2.PolicyDocument:
    """The policy as policyd's API takes it."""
    doc = policy_pb2.PolicyDocument()
    for role, rules in policy.rules.items():
        pb_role = doc.roles.add(name=role, description="filter_vs_nftables bench")
        for r in rules:
            pb_role.rules.add(
                id=r.id, role=role, priority=r.priority,
                action=policy_pb2.ACTION_DENY if r.deny else policy_pb2.ACTION_ALLOW,
                protocol=codes_pb2.PROTOCOL_UDP, dst_prefix=str(r.dst),
                dst_port_from=r.port_from, dst_port_to=r.port_to)
    for role, srcs in policy.sources.items():
        for src in srcs:
            doc.bindings.add(prefix=f"{src}/32", roles=[role], source="admin",
                             subject=f"bench-{src}")
    for prefix in (SRC_NET, DST_NET):
        doc.zones.add(prefix=str(prefix), zone=codes_pb2.ZONE_INTERNAL)
    return doc


def _ports(rule: AclRule) -> str:
    return str(rule.port_from) if rule.port_from == rule.port_to \
        else f"{rule.port_from}-{rule.port_to}"


def nft_typical(policy: BenchPolicy) -> str:
    """One forward rule per ACL rule, a source set per role, default drop."""
    lines = ["table inet vpnr_typical {"]
    for role, srcs in policy.sources.items():
        lines += [f"\tset src_{role} {{", "\t\ttype ipv4_addr",
                  f"\t\telements = {{ {', '.join(map(str, srcs))} }}", "\t}"]
    lines += ["\tchain forward {", "\t\ttype filter hook forward priority filter; policy drop;"]
    # First match wins in a chain, so deny-wins means every DENY rule before any ALLOW.
    for r in sorted(policy.all_rules(), key=lambda r: (not r.deny, r.id)):
        verdict = "drop" if r.deny else "accept"
        lines.append(f"\t\tip saddr @src_{r.role} ip daddr {r.dst} udp dport {_ports(r)} "
                     f"{verdict} comment \"rule {r.id}\"")
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def nft_expert(policy: BenchPolicy, lan_if: str) -> str:
    """netdev ingress: source -> role chain verdict map, per-role concatenated interval sets."""
    lines = ["table netdev vpnr_expert {"]
    for role, rules in policy.rules.items():
        for action, deny in (("deny", True), ("allow", False)):
            elems = ", ".join(f"{r.dst} . udp . {_ports(r)}" for r in rules if r.deny == deny)
            lines += [f"\tset {action}_{role} {{",
                      "\t\ttype ipv4_addr . inet_proto . inet_service", "\t\tflags interval",
                      f"\t\telements = {{ {elems} }}", "\t}"]
    elems = ", ".join(f"{src} : goto role_{role}"
                      for role, srcs in policy.sources.items() for src in srcs)
    lines += ["\tmap src_role {", "\t\ttype ipv4_addr : verdict",
              f"\t\telements = {{ {elems} }}", "\t}"]
    for role in policy.rules:
        lines += [f"\tchain role_{role} {{",
                  f"\t\tip daddr . meta l4proto . th dport @deny_{role} drop",
                  f"\t\tip daddr . meta l4proto . th dport @allow_{role} accept",
                  "\t\tdrop", "\t}"]
    lines += ["\tchain ingress {",
              f"\t\ttype filter hook ingress device \"{lan_if}\" priority -500; policy accept;",
              "\t\tmeta protocol arp accept",
              "\t\tip saddr vmap @src_role",
              "\t\tdrop", "\t}", "}"]
    return "\n".join(lines) + "\n"


# -- the bpf() calls this bench needs ---------------------------------------------------


def xdp_link(prog_fd: int, ifindex: int) -> int:
    """Attach an XDP program natively through a BPF link; closing the fd detaches it."""
    return bpfsys.link_create_xdp(prog_fd, ifindex, bpfsys.XDP_FLAGS_DRV_MODE)


def test_run_ns(prog_fd: int, frame: bytes, ifindex: int, repeat: int) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN an XDP program ``repeat`` times on one frame arriving on
    ``ifindex`` (of the calling thread's namespace): (return code, mean ns per run)."""
    run = bpfsys.prog_test_run(prog_fd, frame, repeat=repeat,
                               ctx=struct.pack("=6I", 0, len(frame), 0, ifindex, 0, 0))
    return run.retval, run.duration_ns


def ifindex(name: str) -> int:
    """Index of an interface in the calling thread's network namespace."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
    if not found:
        raise BenchError(f"no interface {name}")
    return int(found[0])


def link_stats(namespace: str) -> dict[str, dict[str, int]]:
    """The 64-bit counters of every interface in a namespace, from one netlink dump (so
    the counters of two interfaces are read microseconds apart)."""
    with netns.entered(namespace), IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME"): dict(link.get_attr("IFLA_STATS64"))
                for link in ipr.get_links()}


def run(argv: Sequence[str], what: str = "", stdin: str | None = None) -> str:
    """Run a command; raise BenchError with its stderr when it fails."""
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BenchError(f"{what or ' '.join(argv)}: exit {proc.returncode}: "
                         f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout


# -- topology -----------------------------------------------------------------------------


def thread_runtime_ns(pid: int) -> int:
    """CPU time a thread has run, in ns (first field of /proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def core_busy_jiffies(cpu: int) -> tuple[int, int]:
    """(busy, total) ticks of one core from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(v) for v in line.split()[1:]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            return sum(ticks) - idle, sum(ticks)
    raise BenchError(f"cpu{cpu} not in /proc/stat")


@dataclass
class Topology:
    """gen -> rtr -> sink namespaces; every name carries this run's tag."""

    tag: str
    gen_cpu: int
    rtr_cpu: int
    created: list[str] = field(default_factory=list)

    @property
    def ns(self) -> dict[str, str]:
        """Namespace names by role."""
        return {r: f"vpnr-bench-{self.tag}-{r}" for r in ("gen", "rtr", "sink")}

    @property
    def gen_if(self) -> str:
        """Generator's veth (in gen)."""
        return f"g{self.tag}"

    @property
    def lan_if(self) -> str:
        """Router's LAN veth (in rtr): where traffic enters and every filter sits."""
        return f"l{self.tag}"

    @property
    def up_if(self) -> str:
        """Router's uplink veth towards the sink (in rtr)."""
        return f"u{self.tag}"

    @property
    def sink_if(self) -> str:
        """Sink's veth (in sink)."""
        return f"s{self.tag}"

    def _ns_exec(self, role: str, *argv: str) -> str:
        return run(["ip", "netns", "exec", self.ns[role], *argv])

    def create(self) -> None:
        """Namespaces, veths, addresses, forwarding, GRO on the router's LAN veth."""
        for role, name in self.ns.items():
            run(["ip", "netns", "add", name])
            self.created.append(name)
            # No IPv6: its router solicitations would be the only other traffic.
            self._ns_exec(role, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                          "net.ipv6.conf.default.disable_ipv6=1")
        gen, rtr, sink = self.ns["gen"], self.ns["rtr"], self.ns["sink"]
        run(["ip", "-n", gen, "link", "add", self.gen_if, "address", MAC["gen"], "type", "veth",
             "peer", "name", self.lan_if, "address", MAC["lan"], "netns", rtr])
        run(["ip", "-n", rtr, "link", "add", self.up_if, "address", MAC["up"], "type", "veth",
             "peer", "name", self.sink_if, "address", MAC["sink"], "netns", sink])
        run(["ip", "-n", gen, "addr", "add", LAN_GEN, "dev", self.gen_if])
        run(["ip", "-n", rtr, "addr", "add", LAN_ROUTER, "dev", self.lan_if])
        run(["ip", "-n", rtr, "addr", "add", UPLINK_ROUTER, "dev", self.up_if])
        run(["ip", "-n", sink, "addr", "add", f"{UPLINK_SINK}/24", "dev", self.sink_if])
        self._ns_exec("rtr", "sysctl", "-qw", "net.ipv4.ip_forward=1",
                      "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                      f"net.ipv4.conf.{self.lan_if}.rp_filter=0")
        for ns, dev in ((gen, self.gen_if), (rtr, self.lan_if), (rtr, self.up_if),
                        (sink, self.sink_if), (gen, "lo"), (rtr, "lo"), (sink, "lo")):
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        run(["ip", "-n", rtr, "route", "add", str(DST_NET), "via", UPLINK_SINK])
        # A permanent neighbour: no ARP on the measured path, no neighbour timeouts.
        run(["ip", "-n", rtr, "neigh", "replace", UPLINK_SINK, "lladdr", MAC["sink"], "dev",
             self.up_if, "nud", "permanent"])
        self._ns_exec("gen", "ethtool", "-K", self.gen_if, "tso", "off", "gso", "off")
        # GRO gives a veth its NAPI instance, which is what lets it take XDP frames from its
        # peer (XDP_TX of the generator) and run threaded; no XDP program is needed for it.
        self._ns_exec("rtr", "ethtool", "-K", self.lan_if, "gro", "on")

    def set_threaded(self) -> None:
        """Threaded NAPI on the router's LAN veth and the sink's veth (sysfs of the netns)."""
        for role, dev in (("rtr", self.lan_if), ("sink", self.sink_if)):
            self._ns_exec(role, "sh", "-c", f"echo 1 > /sys/class/net/{dev}/threaded")

    @staticmethod
    def napi_thread(dev: str) -> int:
        """Pid of the NAPI kthread of a device ("napi/<dev>-<id>", cut to 15 chars)."""
        prefix = f"napi/{dev}"
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip().startswith(prefix):
                    found.append(int(entry.name))
        if len(found) != 1:
            raise BenchError(f"expected one NAPI thread {prefix}*, found {found}")
        return found[0]

    def pin_napi(self) -> tuple[int, int]:
        """Pin the router's NAPI thread to the router core, the sink's to the other core;
        returns their pids (router, sink)."""
        router, sink = self.napi_thread(self.lan_if), self.napi_thread(self.sink_if)
        os.sched_setaffinity(router, {self.rtr_cpu})
        os.sched_setaffinity(sink, {self.gen_cpu})
        return router, sink

    def destroy(self) -> None:
        """Delete our namespaces (their veths go with them)."""
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        self.created.clear()


# -- generator ----------------------------------------------------------------------------

GEN_PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

struct flow {
	__be32 saddr;
	__be32 daddr;
	__be16 dport;
	__u16 pad;
};

struct window {
	__u32 base;
	__u32 count;
	__u64 gap_ps;  /* pacing: picoseconds between two sent frames; 0 = unpaced */
};

struct gen_state {
	__u64 seq;
	__u64 next_ps;
};

/* Ethernet + IPv4 + UDP headers of the frame, as user space built them. */
struct headers {
	__u8 bytes[HDR_LEN];
};

BPF_ARRAY(flows, struct flow, MAX_FLOWS);
BPF_ARRAY(windows, struct window, 1);
BPF_ARRAY(templates, struct headers, 1);
BPF_PERCPU_ARRAY(states, struct gen_state, 1);

/* Live-frame generator: write the template headers, then the next flow's addresses and
 * port, fix the IPv4 header checksum (the router checks it), and send it out (XDP_TX).
 * Every header byte is rewritten because live-frame pages are recycled as the router left
 * them (MACs rewritten, TTL decremented). Frames over the paced rate are dropped here, so
 * the router's ring is not hammered by a producer ten times faster than its consumer. */
int bench_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct udphdr *udp = (void *)ip + sizeof(*ip);
	__u16 *word = (__u16 *)ip;
	struct headers *tpl;
	struct window *win;
	struct flow *flow;
	struct gen_state *st;
	__u32 zero = 0, idx, sum = 0;
	__u64 now_ps;
	int i;

	if ((void *)(udp + 1) > data_end || data + HDR_LEN > data_end)
		return XDP_ABORTED;
	win = windows.lookup(&zero);
	st = states.lookup(&zero);
	tpl = templates.lookup(&zero);
	if (!win || !st || !tpl || !win->count)
		return XDP_ABORTED;
	if (win->gap_ps) {
		now_ps = bpf_ktime_get_ns() * 1000;
		if (now_ps < st->next_ps)
			return XDP_DROP;
		/* After a pause, catch up by at most one burst, not by the whole pause. */
		if (st->next_ps + BURST * win->gap_ps < now_ps)
			st->next_ps = now_ps - BURST * win->gap_ps;
		st->next_ps += win->gap_ps;
	}
	__builtin_memcpy(data, tpl->bytes, HDR_LEN);
	idx = win->base + (__u32)(st->seq % win->count);
	st->seq += 1;
	flow = flows.lookup(&idx);
	if (!flow)
		return XDP_ABORTED;
	ip->saddr = flow->saddr;
	ip->daddr = flow->daddr;
	udp->dest = flow->dport;
	ip->check = 0;
#pragma unroll
	for (i = 0; i < 10; i++)
		sum += word[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip->check = (__u16)~sum;
	return XDP_TX;
}

/* The sink (drop everything: it costs little, off the router core), and the floor case on
 * the router's LAN veth: the least any XDP filter can cost, dropping or passing. */
int bench_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}

int bench_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
"""


def template_frame(flow: Flow | None = None) -> bytes:
    """A 64-byte Ethernet/IPv4/UDP frame to the router's LAN MAC; without a flow, its
    addresses, port and checksum are zero (the generator fills them per frame)."""
    eth = bytes.fromhex(MAC["lan"].replace(":", "")) + \
        bytes.fromhex(MAC["gen"].replace(":", "")) + b"\x08\x00"
    ip_len = FRAME_LEN - len(eth)
    src, dst, dport = (flow.src.packed, flow.dst.packed, flow.dport) if flow \
        else (b"\0" * 4, b"\0" * 4, 0)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0x4000, 64, 17, 0, src,
                               dst))
    if flow:
        total = sum(struct.unpack("!10H", ip))
        total = (total & 0xFFFF) + (total >> 16)
        struct.pack_into("!H", ip, 10, ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF)
    udp = struct.pack("!HHHH", GEN_SPORT, dport, ip_len - len(ip), 0)  # checksum 0: none
    return eth + bytes(ip) + udp + b"\0" * (ip_len - len(ip) - len(udp))


class Generator:
    """XDP live-frame generator on the generator's veth, driven from one thread."""

    def __init__(self, topo: Topology, flows: dict[str, list[Flow]]) -> None:
        from bcc import BPF  # heavy: only when the bench runs

        self.topo = topo
        total = sum(len(f) for f in flows.values())
        self.bpf: Any = BPF(text=GEN_PROGRAM, cflags=[f"-DMAX_FLOWS={total}",
                                                      f"-DHDR_LEN={HDR_LEN}",
                                                      f"-DBURST={GEN_BATCH}"])
        self.gen_fd = int(self.bpf.load_func("bench_gen", BPF.XDP).fd)
        self.drop_fd = int(self.bpf.load_func("bench_drop", BPF.XDP).fd)
        self.pass_fd = int(self.bpf.load_func("bench_pass", BPF.XDP).fd)
        templates = self.bpf["templates"]
        templates[ctypes.c_int(0)] = templates.Leaf((ctypes.c_ubyte * HDR_LEN)(
            *template_frame()[:HDR_LEN]))
        table = self.bpf["flows"]
        self.windows: dict[str, tuple[int, int]] = {}
        base = 0
        for kind, kind_flows in flows.items():
            for n, flow in enumerate(kind_flows):
                table[ctypes.c_int(base + n)] = table.Leaf(
                    struct.unpack("=I", flow.src.packed)[0],
                    struct.unpack("=I", flow.dst.packed)[0],
                    struct.unpack("=H", struct.pack("!H", flow.dport))[0], 0)
            self.windows[kind] = (base, len(kind_flows))
            base += len(kind_flows)
        self.frame = template_frame()
        with netns.entered(topo.ns["gen"]):
            self.ifindex = ifindex(topo.gen_if)
            # Attached, the program stays in the kernel's XDP dispatcher; otherwise every
            # test run swaps it in and out, each time waiting for an RCU grace period
            # (measured: the generator then spends most of its time asleep). The veth
            # receives nothing, so the attachment never runs.
            self.link_fd = xdp_link(self.gen_fd, self.ifindex)
        # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress
        self.ctx = struct.pack("=6I", 0, FRAME_LEN, 0, self.ifindex, 0, 0)
        self.thread: threading.Thread | None = None
        self.realtime = False
        self.kind = KINDS[0]
        self.rate = 0.0
        self.stop_event = threading.Event()
        self.error: OSError | None = None

    def _live_run(self, repeat: int) -> None:
        bpfsys.prog_test_run_live(self.gen_fd, self.frame, self.ctx, repeat, GEN_BATCH)

    def _loop(self, deadline: float) -> None:
        try:
            os.sched_setaffinity(0, {self.topo.gen_cpu})  # this thread only
            if self.realtime:
                set_fifo(0, RT_PRIORITY["generator"])
            with netns.entered(self.topo.ns["gen"]):
                for _ in range(GEN_MAX_CALLS):
                    if self.stop_event.is_set() or time.monotonic() > deadline:
                        break
                    self._live_run(GEN_CHUNK)
        except OSError as exc:  # reported by stop() in the main thread
            self.error = exc

    def set_rate(self, pps: float) -> None:
        """Pace the frames sent to the router to ``pps`` (0: as fast as possible)."""
        base, count = self.windows[self.kind]
        gap_ps = round(1e12 / pps) if pps > 0 else 0
        windows = self.bpf["windows"]
        windows[ctypes.c_int(0)] = windows.Leaf(base, count, gap_ps)
        self.rate = pps

    def start(self, kind: str, pps: float, max_seconds: float) -> None:
        """Send ``kind`` flows at ``pps`` until stop() or ``max_seconds``, from a thread."""
        self.kind = kind
        self.set_rate(pps)
        self.error = None
        self.stop_event.clear()
        self.thread = threading.Thread(target=self._loop, args=(time.monotonic() + max_seconds,),
                                       name="generator", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop sending (raises what the thread raised)."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
            if self.thread.is_alive():
                raise BenchError("generator thread did not stop within 30 s")
            self.thread = None
        if self.error is not None:
            raise BenchError(f"generator failed: {self.error}") from self.error

    def close(self) -> None:
        """Stop the thread if it runs, detach and unload the programs."""
        with contextlib.suppress(BenchError):
            self.stop()
        os.close(self.link_fd)
        self.bpf.cleanup()


# -- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    """Router counters at one instant."""

    time: float
    rx: int            # packets the router's NAPI took from its LAN veth
    overflow: int      # frames refused because the router's LAN ring was full
    out: int           # packets the router forwarded out of its uplink
    runtime_ns: int    # CPU time of the router's NAPI thread
    busy: int          # busy ticks of the router core
    ticks: int         # all ticks of the router core


def read_counters(topo: Topology, napi_pid: int) -> Counters:
    """Sample the router's counters."""
    links = link_stats(topo.ns["rtr"])
    lan, up = links[topo.lan_if], links[topo.up_if]
    busy, ticks = core_busy_jiffies(topo.rtr_cpu)
    # A packet the sink's full ring refused was still forwarded: count tx_dropped too.
    return Counters(time.monotonic(), lan["rx_packets"], lan["rx_dropped"],
                    up["tx_packets"] + up["tx_dropped"], thread_runtime_ns(napi_pid), busy,
                    ticks)


@dataclass(frozen=True)
class Sample:
    """What the router did over one measured interval."""

    start: Counters
    end: Counters
    offered_pps: float  # the generator's paced rate; 0: unpaced flood

    @property
    def processed(self) -> int:
        """Packets the router's NAPI took from its LAN veth."""
        return self.end.rx - self.start.rx

    @property
    def delivered(self) -> int:
        """Packets the router forwarded."""
        return self.end.out - self.start.out

    @property
    def wall_s(self) -> float:
        """Length of the interval."""
        return self.end.time - self.start.time

    @property
    def ns_per_packet(self) -> float:
        """Router CPU per packet."""
        runtime = self.end.runtime_ns - self.start.runtime_ns
        return runtime / self.processed if self.processed else float("nan")

    @property
    def pps(self) -> float:
        """Packets the router handled per second."""
        return self.processed / self.wall_s

    def figures(self) -> dict[str, float | int]:
        """Everything for the JSON line."""
        overflow = self.end.overflow - self.start.overflow
        ticks = max(self.end.ticks - self.start.ticks, 1)
        return {"ns_per_packet": round(self.ns_per_packet, 1), "pps": round(self.pps),
                "napi_util": round((self.end.runtime_ns - self.start.runtime_ns) / 1e9
                                   / self.wall_s, 3),
                "core_busy": round((self.end.busy - self.start.busy) / ticks, 3),
                "delivered_fraction": round(self.delivered / max(self.processed, 1), 4),
                "offered_pps": round(self.offered_pps),  # 0: flood
                "ring_full_fraction": round(overflow / max(overflow + self.processed, 1), 4),
                "packets": self.processed}


def set_fifo(pid: int, priority: int) -> None:
    """SCHED_FIFO at ``priority`` for a thread (0: the calling thread); 0 restores
    SCHED_OTHER."""
    policy = os.SCHED_FIFO if priority else os.SCHED_OTHER
    os.sched_setscheduler(pid, policy, os.sched_param(priority))


def find_rate(topo: Topology, gen: Generator, napi_pid: int, seconds: float,
              overload: float) -> None:
    """Adjust the generator's rate until the router is just saturated (warm-up).

    Saturated means the router's ingress ring overflows now and then: the rate is then set
    to ``overload`` times what the router took.
    """
    steps = max(3, round(seconds / CALIBRATION_STEP_S))
    for _ in range(steps):
        before = read_counters(topo, napi_pid)
        time.sleep(seconds / steps)
        after = read_counters(topo, napi_pid)
        took = (after.rx - before.rx) / (after.time - before.time)
        refused = (after.overflow - before.overflow) / (after.time - before.time)
        if refused < 0.01 * (took + refused):  # not saturated yet: offer more
            gen.set_rate(min(gen.rate * 1.6, GEN_MAX_PPS))
        else:
            gen.set_rate(min(max(took, 1.0) * overload, GEN_MAX_PPS))


def measure(topo: Topology, gen: Generator, kind: str, start_pps: float,
            args: argparse.Namespace) -> Sample:
    """Run one traffic kind through the router and sample it after a warm-up.

    Unless ``args.no_realtime``, the threads of the measurement run SCHED_FIFO meanwhile:
    on this shared 2-core machine other work would otherwise take turns with the generator
    (the router then idles for want of packets) and with the router (packets/s would
    measure the neighbours). The kernel still leaves ~5% of each core to normal tasks.
    """
    napi_pid, sink_pid = topo.pin_napi()
    gen.realtime = not args.no_realtime
    if gen.realtime:
        set_fifo(napi_pid, RT_PRIORITY["router"])
        set_fifo(sink_pid, RT_PRIORITY["sink"])
        set_fifo(0, RT_PRIORITY["main"])
    gen.start(kind, start_pps if args.overload else 0, args.warmup + args.duration + 10)
    try:
        if args.overload:
            find_rate(topo, gen, napi_pid, args.warmup, args.overload)
        else:
            time.sleep(args.warmup)
        start = read_counters(topo, napi_pid)
        time.sleep(args.duration)
        end = read_counters(topo, napi_pid)
    finally:
        gen.stop()
        if gen.realtime:
            for pid in (0, napi_pid, sink_pid):
                set_fifo(pid, 0)
    return Sample(start, end, gen.rate)


# -- the filters ----------------------------------------------------------------------------


@dataclass
class Policyd:
    """policyd for the router namespace: config, process, API, and its pins on bpffs."""

    topo: Topology
    tmp: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def instance(self) -> str:
        """Router instance name (also names the pin directory)."""
        return f"fvn-{self.topo.tag}"

    @property
    def socket(self) -> Path:
        """policyd's gRPC socket."""
        return self.tmp / "run" / self.instance / "policyd.sock"

    @property
    def log_path(self) -> Path:
        """Where policyd's JSON log goes."""
        return self.tmp / "policyd.log"

    def start(self) -> None:
        """Write the config, start policyd in the router namespace, wait until SERVING."""
        config = self.tmp / "router.toml"
        config.write_text(
            "[router]\n"
            f'instance = "{self.instance}"\n'
            f'run_dir = "{self.tmp}/run"\n'
            f'state_dir = "{self.tmp}/state"\n'
            'admin_group = "vpnr-admin"\n'
            "[policyd]\n"
            f'interfaces = [{{name = "{self.topo.lan_if}", zone = "internal"}}]\n')
        with self.log_path.open("wb") as log:
            # nsenter --net, not ip netns exec: policyd must see the host's bpffs. It
            # inherits this process's CPU affinity (the generator core).
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.topo.ns['rtr']}", str(BIN / "policyd"),
                 "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.socket.exists() and is_serving(self.socket):
                return
            if self.proc.poll() is not None:
                raise BenchError(f"policyd exited {self.proc.returncode}: {self.log_tail()}")
            time.sleep(0.1)
        raise BenchError(f"policyd not SERVING after {READY_TIMEOUT} s: {self.log_tail()}")

    def log_tail(self) -> str:
        """The end of policyd's log."""
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def replace_policy(self, doc: policy_pb2.PolicyDocument) -> int:
        """Load the whole policy; returns the new policy version."""
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            answer = policy_pb2_grpc.PolicyServiceStub(channel).ReplacePolicy(
                policy_pb2.ReplacePolicyRequest(policy=doc, reason="filter_vs_nftables bench"),
                timeout=RPC_TIMEOUT)
        return int(answer.version)

    def status(self) -> policy_pb2.PolicyStatus:
        """policyd's Status (attach mode, counters)."""
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            status: policy_pb2.PolicyStatus = policy_pb2_grpc.PolicyServiceStub(channel).Status(
                policy_pb2.PolicyStatusRequest(), timeout=RPC_TIMEOUT)
        return status

    def test_decision(self, flow: Flow) -> dict[str, Any]:
        """policyd's TestDecision (its live program on a crafted packet) for one flow."""
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            decision: policy_pb2.Decision = policy_pb2_grpc.PolicyServiceStub(
                channel).TestDecision(policy_pb2.TestDecisionRequest(
                    src=str(flow.src), dst=str(flow.dst), protocol=codes_pb2.PROTOCOL_UDP,
                    src_port=GEN_SPORT, dst_port=flow.dport), timeout=RPC_TIMEOUT)
        return {"flow": f"{flow.src} -> {flow.dst} udp/{flow.dport}",
                "verdict": codes_pb2.Verdict.Name(decision.verdict),
                "reason": codes_pb2.Reason.Name(decision.reason),
                "duration_ns": int(decision.duration_ns)}

    @property
    def pin_dir(self) -> Path:
        """policyd's pins on bpffs."""
        return Path("/sys/fs/bpf/vpnr") / self.instance

    def stop(self) -> None:
        """SIGTERM policyd (its program stays attached through its pinned link)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
            self.proc = None

    def detach(self) -> None:
        """Unpin the XDP links, which detaches the program; the pinned program and maps
        stay, so the next start adopts them instead of compiling."""
        if self.pin_dir.exists():
            for pin in self.pin_dir.glob(f"{LINK_PIN_PREFIX}*"):
                pin.unlink()

    def unpin_all(self) -> None:
        """Remove every pin of this instance (detaching the program)."""
        pins = self.pin_dir
        if pins.exists():
            # Deepest first: files are unlinked, then their directories removed.
            for path in sorted(pins.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()
            pins.rmdir()


MEDIAN_FIGURES = ("ns_per_packet", "pps", "napi_util", "core_busy", "delivered_fraction",
                  "offered_pps", "ring_full_fraction")


@dataclass
class CaseResult:
    """Samples of one case over the rounds, or why it did not run."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    enforced: bool | None = None  # None: never measured; False: a round failed the check
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self, kind: str) -> dict[str, Any] | None:
        """Median of each figure over the rounds, the per-round ns/packet, packets total."""
        rounds = [s.figures() for s in self.samples.get(kind, [])]
        if not rounds:
            return None
        out: dict[str, Any] = {name: round(statistics.median(r[name] for r in rounds), 4)
                               for name in MEDIAN_FIGURES}
        out["ns_per_packet_rounds"] = [r["ns_per_packet"] for r in rounds]
        out["packets"] = sum(int(r["packets"]) for r in rounds)
        return out


def program_alone(topo: Topology, policyd: Policyd,
                  flows: dict[str, list[Flow]]) -> dict[str, int]:
    """Mean ns per run of policyd's pinned program on one frame of each kind, repeated in
    BPF_PROG_TEST_RUN (caches hot, one flow): the program's cost without the data path."""
    fd = bpfsys.obj_get(str(policyd.pin_dir / PROG_PIN))
    try:
        with netns.entered(topo.ns["rtr"]):
            lan = ifindex(topo.lan_if)
            return {kind: test_run_ns(fd, template_frame(flows[kind][0]), lan,
                                      PROGRAM_ALONE_REPEAT)[1] for kind in KINDS}
    finally:
        os.close(fd)


def enforcement_ok(case: str, samples: dict[str, Sample]) -> bool:
    """Did the filter drop the dropped traffic and forward the allowed traffic (and did
    no filter forward both)?"""
    for kind, sample in samples.items():
        forwarded = sample.delivered / max(sample.processed, 1)
        if kind == "allowed" or case == "none":
            if forwarded < MIN_ALLOWED_DELIVERED:
                return False
        elif forwarded > MAX_DROPPED_DELIVERED:
            return False
    return True


def xdp_counters(status: policy_pb2.PolicyStatus, lan_if: str) -> dict[str, int]:
    """policyd's verdict counters on the LAN interface, by "VERDICT/REASON"."""
    out: dict[str, int] = {}
    for iface in status.interfaces:
        if iface.name != lan_if:
            continue
        for row in iface.counters:
            key = (f"{codes_pb2.Verdict.Name(row.verdict).removeprefix('VERDICT_')}/"
                   f"{codes_pb2.Reason.Name(row.reason).removeprefix('REASON_')}")
            out[key] = out.get(key, 0) + int(row.packets)
    return out


@dataclass
class Bench:
    """Everything a round needs: topology, generator, policy, flows and the policyd."""

    topo: Topology
    gen: Generator
    policy: BenchPolicy
    flows: dict[str, list[Flow]]
    tmp: Path
    args: argparse.Namespace
    policyd: Policyd | None = None
    rates: dict[tuple[str, str], float] = field(default_factory=dict)

    def _measure(self, case: str, kind: str) -> Sample:
        # Start where the last round of this case ended: the warm-up then only confirms.
        sample = measure(self.topo, self.gen, kind,
                         self.rates.get((case, kind)) or GEN_START_PPS, self.args)
        self.rates[case, kind] = self.gen.rate
        return sample

    def _start_xdp(self, result: CaseResult) -> bool:
        """Start policyd and load the policy; False when the case cannot be measured."""
        if self.policyd is None:
            self.policyd = Policyd(self.topo, self.tmp)
        policyd = self.policyd
        started = time.monotonic()
        policyd.start()
        result.details.setdefault("policyd_start_s", []).append(
            round(time.monotonic() - started, 2))
        try:
            started = time.monotonic()
            version = policyd.replace_policy(policy_document(self.policy))
        except grpc.RpcError as exc:
            result.errors.append(f"ReplacePolicy: {exc.code()}: {exc.details()}")
            return bool(self.args.measure_unenforced_xdp)
        result.details.setdefault("replace_policy_s", []).append(
            round(time.monotonic() - started, 2))
        result.details["policy_version"] = version
        if "attach_mode" not in result.details:
            status = policyd.status()
            result.details["attach_mode"] = [i.attach_mode for i in status.interfaces]
            result.details["instructions"] = [i.instructions for i in status.interfaces]
            # policyd's own view of one flow of each kind, through its API, and the
            # program's cost alone on those frames.
            result.details["test_decision"] = {kind: policyd.test_decision(self.flows[kind][0])
                                               for kind in KINDS}
            result.details["program_alone_ns"] = program_alone(self.topo, policyd, self.flows)
        return True

    def run_case(self, case: str, result: CaseResult) -> None:
        """Install one filter on the router, measure both traffic kinds, remove it."""
        topo = self.topo
        rtr_nft = ["nsenter", f"--net=/run/netns/{topo.ns['rtr']}", "nft"]
        samples: dict[str, Sample] = {}
        try:
            if case in ("typical", "expert"):
                ruleset = nft_typical(self.policy) if case == "typical" \
                    else nft_expert(self.policy, topo.lan_if)
                (self.tmp / f"{case}.nft").write_text(ruleset)
                run([*rtr_nft, "-f", str(self.tmp / f"{case}.nft")],
                    f"load the {case} nftables rules")
                result.details["nft_rules"] = ruleset.count("\n\t\tip ") + ruleset.count(
                    "\n\t\tdrop")
            elif case == "xdp" and not self._start_xdp(result):
                return
            for kind in KINDS:
                if case == "floor":
                    with netns.entered(topo.ns["rtr"]):
                        link = xdp_link(self.gen.drop_fd if kind == "dropped"
                                        else self.gen.pass_fd, ifindex(topo.lan_if))
                    try:
                        samples[kind] = self._measure(case, kind)
                    finally:
                        os.close(link)  # the link's last reference: detaches the program
                else:
                    samples[kind] = self._measure(case, kind)
            for kind, sample in samples.items():
                result.samples.setdefault(kind, []).append(sample)
            result.enforced = enforcement_ok(case, samples) and result.enforced is not False
            if case == "xdp" and self.policyd is not None:
                result.details["xdp_counters"] = xdp_counters(self.policyd.status(),
                                                              topo.lan_if)
        finally:
            if case == "xdp" and self.policyd is not None:
                self.policyd.stop()
                self.policyd.detach()
            if case in ("typical", "expert"):
                # Our own namespace: flushing its whole ruleset touches nothing else.
                subprocess.run([*rtr_nft, "flush", "ruleset"], check=False,
                               capture_output=True)


# -- report ---------------------------------------------------------------------------------


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing."""
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 3)


def figure(results: dict[str, CaseResult], case: str, kind: str, name: str) -> float | None:
    """The median of one figure of a case that ran and enforced the policy, else None."""
    res = results.get(case)
    summary = res.summary(kind) if res is not None else None
    if res is None or summary is None or res.enforced is not True:
        return None
    return float(summary[name])


def report(results: dict[str, CaseResult], policy: BenchPolicy, args: argparse.Namespace,
           notes: list[str]) -> dict[str, Any]:
    """Print the table and return the JSON document."""
    print(f"\npolicy: {policy.bindings()} source bindings, {len(policy.all_rules())} rules in "
          f"{len(policy.rules)} roles; {FLOWS_PER_KIND} flows per traffic kind; "
          f"{FRAME_LEN}-byte UDP frames; {args.rounds} round(s) of {args.duration} s per "
          f"case and traffic after {args.warmup} s warm-up; medians over the rounds")
    head = (f"{'case':<8} {'traffic':<8} {'ns/pkt':>8} {'(min-max)':>13} {'pps':>10} "
            f"{'napi util':>9} {'core busy':>9} {'forwarded':>9} {'ring full':>9}")
    print(head)
    print("-" * len(head))
    for case, res in results.items():
        for kind in KINDS:
            f = res.summary(kind)
            if f is None:
                continue
            spread = f"{min(f['ns_per_packet_rounds']):.0f}-{max(f['ns_per_packet_rounds']):.0f}"
            print(f"{case:<8} {kind:<8} {f['ns_per_packet']:>8.1f} {spread:>13} "
                  f"{f['pps']:>10,.0f} {f['napi_util']:>9.2f} {f['core_busy']:>9.2f} "
                  f"{f['delivered_fraction']:>9.2%} {f['ring_full_fraction']:>9.2%}")
        if not res.samples:
            print(f"{case:<8} not measured")
        if res.enforced is False:
            print(f"{case:<8} WARNING: enforcement check failed (see forwarded)")
        for error in dict.fromkeys(res.errors):
            print(f"{case:<8} error: {error}")
    ratios = {
        "dropped_cost_typical_over_xdp": ratio(
            figure(results, "typical", "dropped", "ns_per_packet"),
            figure(results, "xdp", "dropped", "ns_per_packet")),
        "dropped_cost_expert_over_xdp": ratio(
            figure(results, "expert", "dropped", "ns_per_packet"),
            figure(results, "xdp", "dropped", "ns_per_packet")),
        "allowed_pps_xdp_over_expert": ratio(figure(results, "xdp", "allowed", "pps"),
                                             figure(results, "expert", "allowed", "pps")),
        "allowed_pps_xdp_over_none": ratio(figure(results, "xdp", "allowed", "pps"),
                                           figure(results, "none", "allowed", "pps")),
    }
    met = {k: (None if v is None else v >= TARGETS[k]) for k, v in ratios.items()}
    print()
    for name, value in ratios.items():
        shown = "n/a" if value is None else f"{value:.2f}"
        verdict = "  (a case is missing)" if met[name] is None \
            else ("  met" if met[name] else "  NOT met")
        print(f"{name:<32} {shown:>6}  target >= {TARGETS[name]}{verdict}")
    for note in notes:
        print(f"note: {note}")
    cases: dict[str, Any] = {}
    for case, res in results.items():
        entry: dict[str, Any] = {k: res.summary(k) for k in KINDS if res.summary(k)}
        entry["enforced"] = res.enforced
        if res.errors:
            entry["errors"] = list(dict.fromkeys(res.errors))
        entry.update(res.details)
        cases[case] = entry
    return {"cases": cases, "ratios": ratios, "targets": TARGETS, "met": met,
            "xdp_ran": figure(results, "xdp", "dropped", "ns_per_packet") is not None,
            "config": {"bindings": policy.bindings(), "rules": len(policy.all_rules()),
                       "roles": len(policy.rules), "flows_per_kind": FLOWS_PER_KIND,
                       "frame_bytes": FRAME_LEN, "rounds": args.rounds,
                       "duration_s": args.duration, "warmup_s": args.warmup,
                       "overload": args.overload, "realtime": not args.no_realtime,
                       "gen_cpu": args.gen_cpu, "router_cpu": args.router_cpu,
                       "kernel": os.uname().release},
            "notes": notes}


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind through the finally blocks: clean up


def main(argv: Sequence[str] | None = None) -> int:
    """Build the topology, run every case, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all cases; figures are medians (default 3)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds measured per case, traffic kind and round (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of traffic before each measurement (default 1)")
    parser.add_argument("--overload", type=float, default=0.0,
                        help="pace the generator at this many times what the saturated "
                             "router takes, found during the warm-up (default: flood)")
    parser.add_argument("--bindings", type=int, default=10_000,
                        help="source /32 bindings (default 10000)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--gen-cpu", type=int, default=0,
                        help="core of the generator, the sink and this script (default 0)")
    parser.add_argument("--router-cpu", type=int, default=1,
                        help="core of the router's NAPI thread (default 1)")
    parser.add_argument("--no-realtime", action="store_true",
                        help="leave every thread SCHED_OTHER (default: the router's NAPI "
                             "thread, the sink's, the generator and this script run "
                             "SCHED_FIFO while measuring)")
    parser.add_argument("--measure-unenforced-xdp", action="store_true",
                        help="measure the XDP case even if ReplacePolicy fails (its figures "
                             "are then reported but never used in the ratios)")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if unknown := set(cases) - set(CASES):
        parser.error(f"unknown cases {sorted(unknown)}")
    if not 0 < args.duration <= 60 or not 0.5 <= args.warmup <= 30:
        parser.error("--duration must be in (0, 60] and --warmup in [0.5, 30]")
    if args.overload and not 1.0 < args.overload <= 10:
        parser.error("--overload must be in (1, 10]")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be in [1, 20]")
    if not N_ROLES <= args.bindings <= 60_000:
        parser.error(f"--bindings must be in [{N_ROLES}, 60000] (every role needs a source)")
    if os.geteuid() != 0:
        print("filter_vs_nftables: run as root", file=sys.stderr)
        return 2
    if args.gen_cpu == args.router_cpu or not {args.gen_cpu, args.router_cpu} <= \
            os.sched_getaffinity(0):
        print("filter_vs_nftables: needs two distinct usable cores", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    # Everything but the router's NAPI thread (this script, its threads, policyd, nft, the
    # generator, the sink) stays off the router core.
    os.sched_setaffinity(0, {args.gen_cpu})

    policy = make_policy(args.bindings)
    rng = random.Random(20240611)  # noqa: S311 -- the same flows on every run, no secret
    flows = {kind: make_flows(policy, kind, FLOWS_PER_KIND, rng) for kind in KINDS}
    check_flows(policy, flows)

    tag = f"{os.getpid() % 1000:03d}{secrets.token_hex(2)}"
    topo = Topology(tag, args.gen_cpu, args.router_cpu)
    tmp = Path(tempfile.mkdtemp(prefix=f"vpnr-bench-{tag}-"))
    gen: Generator | None = None
    bench: Bench | None = None
    sink_link = -1
    results: dict[str, CaseResult] = {case: CaseResult() for case in cases}
    notes = ["router CPU = runtime of the router's threaded-NAPI kthread over the interval; "
             "packets = rx of the router's LAN veth; the sink's XDP_DROP runs off-core",
             "typical: inet forward chain, stateless (no conntrack); expert: netdev ingress",
             "floor: a one-instruction XDP_DROP / XDP_PASS program on the router's LAN veth"]
    started = time.monotonic()
    try:
        topo.create()
        gen = Generator(topo, flows)
        with netns.entered(topo.ns["sink"]):
            sink_link = xdp_link(gen.drop_fd, ifindex(topo.sink_if))
        topo.set_threaded()
        bench = Bench(topo, gen, policy, flows, tmp, args)
        # Rounds interleave the cases, so a noisy neighbour hits every case alike.
        for n in range(args.rounds):
            for case in cases:
                print(f"[{time.monotonic() - started:5.1f} s] round {n + 1}/{args.rounds} "
                      f"{case}", file=sys.stderr)
                try:
                    bench.run_case(case, results[case])
                except (BenchError, OSError, grpc.RpcError) as exc:
                    results[case].errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if bench is not None and bench.policyd is not None:
            bench.policyd.stop()
            bench.policyd.unpin_all()
        if gen is not None:
            gen.close()
        if sink_link >= 0:
            os.close(sink_link)
        topo.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    doc = report(results, policy, args, notes)
    doc["runtime_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(doc, sort_keys=True))
    failed = any(r.enforced is False or (r.errors and not r.samples) for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
