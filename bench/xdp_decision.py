"""Nanoseconds per packet of the live XDP RBAC program, measured by the kernel.

A real policyd is started in a fresh network namespace (veth lan0, zone internal) and given,
through ``PolicyService.ReplacePolicy``, 10 roles of 10 TCP rules (100 rules; per role one
DENY of a /24 and nine ALLOWs of single hosts, all for ports 1000-2000) and 10,000 /32
source bindings of 1-3 roles each. The pinned program is then run by BPF_PROG_TEST_RUN on
one frame per case, ``--repeat`` times in the kernel per run, ``--runs`` runs; the figure
is the median of the kernel's per-run mean (duration_ns). Frames carry no trace metadata,
so the program counts, accounts and audits them as it does real traffic (a denied packet
pays for its audit token bucket); each case's verdict is checked once with
``testrun.run`` (trace metadata), and that traced cost, which skips counting and audit,
is shown alongside. Then the same with 100,000 bindings.

Cases (TCP to port 1500, arriving on lan0):

- ``no_role``: a source without binding (DENY, NO_ROLE);
- ``allow_last``: a source with roles role0, role1, role2 to the host that only the last
  candidate of its 30-rule bucket allows (29 misses, then ALLOW); the bucket is read back
  from the pinned rule_buckets map and its size reported;
- ``deny``: the same source to a /24 that role2's DENY covers (the 3rd candidate);
- ``default_deny_scan``: the same source to a host none of its roles names: all 30
  candidates miss (DEFAULT_DENY), the longest scan this policy has.

Prints a table and, as the last line, one JSON object with every figure.

Run as root: .venv/bin/python bench/xdp_decision.py [--repeat N] [--runs N]

The harness (PolicydUnderTest, the policy generator) is shared with bench/policy_update.py.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc

from vpnr.core import bpfsys, netns
from vpnr.core.client import is_serving, socket_target
from vpnr.policyd import layout, testrun
from vpnr.v1 import codes_pb2, policy_pb2, policy_pb2_grpc

BIN = Path(sys.executable).parent
PIN_ROOT = Path("/sys/fs/bpf/vpnr")
READY_TIMEOUT_S = 60.0
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20)]

ROLES = 10
TARGET_NS = 150.0
BINDING_COUNTS = (10_000, 100_000)
PORT = 1500
PROBE_SRC = ipaddress.IPv4Address("192.168.77.1")   # bound below, outside the bulk range
UNBOUND_SRC = ipaddress.IPv4Address("192.168.99.9")  # never bound
PROBE_ROLES = ("role0", "role1", "role2")
BULK_NET = ipaddress.IPv4Network("10.0.0.0/8")


# -- the policy --------------------------------------------------------------------------


def role_name(j: int) -> str:
    """Name of role ``j``."""
    return f"role{j}"


def allow_host(j: int, k: int) -> ipaddress.IPv4Address:
    """The host that rule k (1-9) of role j allows."""
    return ipaddress.IPv4Address(f"172.16.{j}.{k}")


def denied_host(j: int) -> ipaddress.IPv4Address:
    """A host in the /24 that role j denies."""
    return ipaddress.IPv4Address(f"172.17.{j}.5")


def roles() -> list[policy_pb2.Role]:
    """10 roles x 10 TCP rules (ports 1000-2000). Rule 0 of role j denies 172.17.j.0/24;
    rules 1-9 allow 172.16.j.k. Evaluation order in a bucket is denies first, then allows
    by (priority, id): rule 9 of role j has priority 100 + j, so in the bucket of
    role0+role1+role2 the ALLOW of 172.16.2.9 is the very last of 30 candidates."""
    out = []
    for j in range(ROLES):
        name = role_name(j)
        rules = [policy_pb2.Rule(id=j * 10 + 1, role=name, priority=5,
                                 action=policy_pb2.ACTION_DENY,
                                 protocol=codes_pb2.PROTOCOL_TCP,
                                 dst_prefix=f"172.17.{j}.0/24", dst_port_from=1000,
                                 dst_port_to=2000)]
        for k in range(1, 10):
            rules.append(policy_pb2.Rule(
                id=j * 10 + k + 1, role=name, priority=100 + j if k == 9 else 10 + k,
                action=policy_pb2.ACTION_ALLOW, protocol=codes_pb2.PROTOCOL_TCP,
                dst_prefix=f"{allow_host(j, k)}/32", dst_port_from=1000, dst_port_to=2000))
        out.append(policy_pb2.Role(name=name, rules=rules))
    return out


def bulk_bindings(count: int, seed: int, source: str = "idpd") -> list[policy_pb2.Binding]:
    """``count`` distinct random /32s in 10.0.0.0/8, each with 1-3 random roles."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible policy, not a secret
    base = int(BULK_NET.network_address)
    offsets = rng.sample(range(1, BULK_NET.num_addresses - 1), count)
    names = [role_name(j) for j in range(ROLES)]
    return [policy_pb2.Binding(prefix=f"{ipaddress.IPv4Address(base + off)}/32",
                               roles=rng.sample(names, rng.randint(1, 3)), source=source)
            for off in offsets]


def probe_binding() -> policy_pb2.Binding:
    """The measured source: roles role0, role1, role2, owned by admin."""
    return policy_pb2.Binding(prefix=f"{PROBE_SRC}/32", roles=list(PROBE_ROLES),
                              source="admin")


def document(bulk: Sequence[policy_pb2.Binding],
             extra: Sequence[policy_pb2.Binding] = ()) -> policy_pb2.PolicyDocument:
    """The whole policy: the 10 roles, the probe binding, ``extra`` and ``bulk``."""
    return policy_pb2.PolicyDocument(roles=roles(),
                                     bindings=[probe_binding(), *extra, *bulk])


def tcp_frame(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address) -> bytes:
    """A TCP SYN to PORT."""
    return testrun.build_frame(testrun.Probe(src, dst, 6, 40000, PORT))


# -- policyd in a namespace --------------------------------------------------------------

@dataclass
class PolicydUnderTest:
    """A real policyd on lan0 (internal) of a fresh namespace; a unique instance name;
    everything (process, pins, namespace, files) removed on exit, also on failure.

    Inside ``with``, the calling thread is in the namespace, ``stub`` talks to policyd,
    ``prog_fd`` is the pinned program and ``ifindex`` lan0's index."""

    name: str = field(default_factory=lambda: f"vb{secrets.token_hex(3)}")
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vpnr-bench-")))
    proc: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    prog_fd: int = -1
    ifindex: int = 0
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def pin_dir(self) -> Path:
        """The instance's bpffs pins."""
        return PIN_ROOT / self.name

    @property
    def socket(self) -> Path:
        """policyd's Unix socket."""
        return self.tmp / "run" / self.name / "policyd.sock"

    @property
    def log_path(self) -> Path:
        """policyd's JSON log (stdout and stderr)."""
        return self.tmp / "policyd.log"

    @property
    def stub(self) -> policy_pb2_grpc.PolicyServiceStub:
        """PolicyService on the socket."""
        assert self.channel is not None
        return policy_pb2_grpc.PolicyServiceStub(self.channel)

    def __enter__(self) -> PolicydUnderTest:
        try:
            self._start()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._cleanup()

    def _start(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "lan0", "type", "veth", "peer", "name", "peer0"],
                    ["link", "set", "lan0", "up"], ["link", "set", "peer0", "up"]):
            subprocess.run(["ip", "-n", self.name, *cmd], check=True)
        config = self.tmp / "router.toml"
        config.write_text(
            "[router]\n"
            f'instance = "{self.name}"\n'
            f'run_dir = "{self.tmp}/run"\n'
            f'state_dir = "{self.tmp}/state"\n'
            "[policyd]\n"
            'interfaces = [{name = "lan0", zone = "internal"}]\n')
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.name}", str(BIN / "policyd"),
                 "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (self.socket.exists() and is_serving(self.socket, timeout=0.5)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"policyd exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"policyd not SERVING after {READY_TIMEOUT_S} s")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(socket_target(self.socket), options=GRPC_OPTIONS)
        self.prog_fd = bpfsys.obj_get(str(self.pin_dir / "xdp_rbac_prog"))
        self._stack.enter_context(netns.entered(self.name))
        self.ifindex = socket.if_nametoindex("lan0")

    def _cleanup(self) -> None:
        with contextlib.suppress(OSError):
            self._stack.close()  # leave the namespace first
        if self.channel is not None:
            self.channel.close()
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        subprocess.run(["ip", "netns", "del", self.name], check=False,
                       stderr=subprocess.DEVNULL)
        if self.pin_dir.exists():
            for pin in self.pin_dir.iterdir():
                pin.unlink()
            self.pin_dir.rmdir()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------

    def replace_policy(self, doc: policy_pb2.PolicyDocument, reason: str) -> float:
        """ReplacePolicy; returns the RPC's wall time in seconds."""
        request = policy_pb2.ReplacePolicyRequest(policy=doc, reason=reason)
        started = time.perf_counter()
        self.stub.ReplacePolicy(request, timeout=300)
        return time.perf_counter() - started

    def decide(self, frame: bytes) -> testrun.Trace:
        """The live program's decision on ``frame`` arriving on lan0 (traced: not counted)."""
        return testrun.run(self.prog_fd, frame, self.ifindex)

    def policyd_pid(self) -> int:
        """pid of the policyd process (nsenter execs it)."""
        assert self.proc is not None
        return self.proc.pid


# -- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measured packet and what the program must decide for it."""

    name: str
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    verdict: int
    reason: int
    rule_id: int = 0


CASES = (
    Case("no_role", UNBOUND_SRC, allow_host(0, 1), codes_pb2.VERDICT_DENY,
         codes_pb2.REASON_NO_ROLE),
    Case("allow_last", PROBE_SRC, allow_host(2, 9), codes_pb2.VERDICT_ALLOW,
         codes_pb2.REASON_RULE_ALLOW, rule_id=2 * 10 + 9 + 1),
    Case("deny", PROBE_SRC, denied_host(2), codes_pb2.VERDICT_DENY,
         codes_pb2.REASON_RULE_DENY, rule_id=2 * 10 + 1),
    Case("default_deny_scan", PROBE_SRC, allow_host(9, 9), codes_pb2.VERDICT_DENY,
         codes_pb2.REASON_DEFAULT_DENY),
)
XDP_ACTION: dict[int, int] = {codes_pb2.VERDICT_ALLOW: testrun.XDP_PASS,
                              codes_pb2.VERDICT_DENY: testrun.XDP_DROP}


def bucket_of(pin_dir: Path, trace: testrun.Trace) -> tuple[int, int]:
    """(size, 1-based position of the deciding rule) of the bucket the program scanned
    for a TCP packet to PORT, read from the pinned maps as vpnr_find_bucket looks it up."""
    buckets = bpfsys.obj_get(str(pin_dir / "rule_buckets"))
    table = bpfsys.obj_get(str(pin_dir / "rule_table"))
    try:
        raw = None
        for dport, kind in ((PORT, layout.BUCKET_EXACT), (0, layout.BUCKET_DEFAULT)):
            key = layout.BUCKET_KEY.pack(trace.roleset_id, dport, 6, trace.slot | kind)
            raw = bpfsys.map_lookup(buckets, key, layout.BUCKET.size)
            if raw is not None:
                break
        if raw is None:
            return 0, 0
        start, count = layout.BUCKET.unpack(raw)
        base = trace.slot * layout.RULE_TABLE_HALF + start
        position = 0
        for i in range(count):
            rule = bpfsys.map_lookup(table, layout.U32.pack(base + i), layout.RULE.size)
            if rule is not None and layout.RULE.unpack(rule)[16] == trace.rule_id:
                position = i + 1
                break
        return count, position
    finally:
        os.close(buckets)
        os.close(table)


def measure_case(rig: PolicydUnderTest, case: Case, repeat: int, runs: int
                 ) -> dict[str, float | int | str | bool]:
    """Verify the case's decision once (traced), then time it untraced."""
    frame = tcp_frame(case.src, case.dst)
    trace = rig.decide(frame)
    verdict_ok = (trace.verdict, trace.reason) == (case.verdict, case.reason) and (
        not case.rule_id or trace.rule_id == case.rule_id)
    size, position = bucket_of(rig.pin_dir, trace) if trace.has_binding else (0, 0)
    ctx = testrun.XDP_MD.pack(0, len(frame), 0, rig.ifindex, 0, 0)  # no metadata area
    bpfsys.prog_test_run(rig.prog_fd, frame, repeat=repeat // 10, ctx=ctx)  # warm-up
    untraced = [bpfsys.prog_test_run(rig.prog_fd, frame, repeat=repeat, ctx=ctx)
                for _ in range(runs)]
    action_ok = all(r.retval == XDP_ACTION[case.verdict] for r in untraced)
    traced = [testrun.run(rig.prog_fd, frame, rig.ifindex, repeat=repeat).duration_ns
              for _ in range(runs)]
    durations = [r.duration_ns for r in untraced]
    median = statistics.median(durations)
    return {
        "verdict": codes_pb2.Verdict.Name(trace.verdict),
        "reason": codes_pb2.Reason.Name(trace.reason),
        "rule_id": trace.rule_id,
        "decision_ok": verdict_ok and action_ok,
        "bucket_size": size,
        "rule_position": position,
        "median_ns": median,
        "min_ns": min(durations),
        "max_ns": max(durations),
        "traced_median_ns": statistics.median(traced),
        "pass": median < TARGET_NS and verdict_ok and action_ok,
    }




def floor_ns(rig: PolicydUnderTest, repeat: int, runs: int) -> float:
    """Median per-packet time of a 2-instruction XDP program (return XDP_PASS) on the same
    frame: what BPF_PROG_TEST_RUN itself costs per repetition, the floor under every case."""
    # r0 = XDP_PASS; exit
    fd = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_XDP,
                          struct.pack("=BBhi", 0xB7, 0, 0, testrun.XDP_PASS)
                          + struct.pack("=BBhi", 0x95, 0, 0, 0))
    try:
        frame = tcp_frame(PROBE_SRC, allow_host(2, 9))
        ctx = testrun.XDP_MD.pack(0, len(frame), 0, rig.ifindex, 0, 0)
        return statistics.median(
            bpfsys.prog_test_run(fd, frame, repeat=repeat, ctx=ctx).duration_ns
            for _ in range(runs))
    finally:
        os.close(fd)


def instructions(rig: PolicydUnderTest) -> dict[str, int]:
    """Translated instruction counts of the entry program and of the rule-scan stage it
    tail-calls (found through the pinned xdp_stages_<build id> program array)."""
    out = {"xdp_rbac": bpfsys.prog_info(rig.prog_fd).instructions}
    for pin in rig.pin_dir.glob("xdp_stages_*"):
        fd = bpfsys.obj_get(str(pin))
        try:
            raw = bpfsys.map_lookup(fd, layout.U32.pack(0), 4)
        finally:
            os.close(fd)
        if raw is not None:
            stage = bpfsys.fd_by_id("prog", layout.U32.unpack(raw)[0])
            try:
                out["xdp_rbac_rules"] = bpfsys.prog_info(stage).instructions
            finally:
                os.close(stage)
    status = rig.stub.Status(policy_pb2.PolicyStatusRequest(), timeout=10)
    for iface in status.interfaces:
        out[f"status:{iface.name}"] = iface.instructions
    return out


def src4_fill(rig: PolicydUnderTest) -> int:
    """Entries in src4_bindings (both slots), as Status reports them."""
    status = rig.stub.Status(policy_pb2.PolicyStatusRequest(), timeout=60)
    return next((int(m.entries) for m in status.maps if m.name == "src4_bindings"), -1)


def main() -> int:
    """Install each policy size, measure every case, print the table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=100_000,
                        help="packets per BPF_PROG_TEST_RUN call (kernel loop)")
    parser.add_argument("--runs", type=int, default=7, help="calls per case; median taken")
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, float | int | str | bool]]] = {}
    install_s: dict[str, float] = {}
    entries: dict[str, int] = {}
    with PolicydUnderTest() as rig:
        insns = instructions(rig)
        floor = floor_ns(rig, args.repeat, args.runs)
        for count in BINDING_COUNTS:
            doc = document(bulk_bindings(count, seed=count))
            install_s[str(count)] = round(rig.replace_policy(doc, f"xdp bench {count}"), 3)
            entries[str(count)] = src4_fill(rig)
            results[str(count)] = {c.name: measure_case(rig, c, args.repeat, args.runs)
                                   for c in CASES}
    print(f"XDP decision cost per packet (BPF_PROG_TEST_RUN, {args.repeat} packets per run, "
          f"median of {args.runs} runs; untraced: counted, accounted and audited like real "
          "traffic)")
    print("instructions: " + ", ".join(f"{k} {v}" for k, v in insns.items()))
    print(f"floor: a 2-instruction XDP program costs {floor:.0f} ns per repetition here "
          "(included in every figure below)")
    print(f"{'bindings':>8} {'case':18} {'verdict/reason':28} {'bucket':>6} {'pos':>4} "
          f"{'median':>7} {'min':>6} {'max':>6} {'traced':>7}  target < {TARGET_NS:.0f} ns")
    for size, cases in results.items():
        for name, r in cases.items():
            decided = f"{r['verdict']}/{r['reason']}".replace("VERDICT_", "").replace(
                "REASON_", "")
            if not r["decision_ok"]:
                decided += " (WRONG)"
            print(f"{size:>8} {name:18} {decided:28} {r['bucket_size']!s:>6} "
                  f"{r['rule_position']!s:>4} {r['median_ns']:7.0f} {r['min_ns']:6.0f} "
                  f"{r['max_ns']:6.0f} {r['traced_median_ns']:7.0f}  "
                  f"{'ok' if r['pass'] else 'MISSED'}")
        print(f"{'':>8} (ReplacePolicy with {size} bindings took {install_s[size]} s; "
              f"src4_bindings holds {entries[size]} entries over both slots)")
    print(json.dumps({"results": results, "instructions": insns, "repeat": args.repeat,
                      "runs": args.runs, "floor_ns": floor, "install_s": install_s,
                      "src4_entries": entries, "target_ns": TARGET_NS,
                      "all_pass": all(r["pass"] for c in results.values() for r in c.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
