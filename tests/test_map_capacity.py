"""Map capacity: the source-binding tries start small, grow past 80% by copy and atomic swap
while a concurrent reader keeps running the live XDP program (no lookup miss), refuse a
change beyond the hard limit with RESOURCE_EXHAUSTED (nothing stored is lost), and keep
their grown size across a restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from conftest import DaemonProcess
from vpnr.v1 import codes_pb2, policy_pb2_grpc
from vpnr.v1 import policy_pb2 as P

pytestmark = pytest.mark.root

INITIAL, LIMIT = 64, 300  # trie entries to start; bindings per family

# Runs in the policyd's namespace: the live program (opened from its pin, as the kernel runs
# it) decides a packet from a bound source again and again, and counts every time the
# program found no binding for it. Bounded by time and count; stops when told on stdin.
PROBER = """
import json, select, sys, time, ipaddress
from pyroute2 import IPRoute
from vpnr.core import bpfsys
from vpnr.policyd import testrun
pin, src = sys.argv[1], sys.argv[2]
prog = bpfsys.obj_get(pin)
with IPRoute() as ipr:
    ifindex = ipr.link_lookup(ifname="lan0")[0]
frame = testrun.build_frame(testrun.Probe(ipaddress.ip_address(src),
                                          ipaddress.ip_address("10.200.0.1"), 1))
runs = misses = 0
print("READY", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline and runs < 5_000_000:
    trace = testrun.run(prog, frame, ifindex)
    runs += 1
    misses += not trace.has_binding
    if runs % 200 == 0 and select.select([sys.stdin], [], [], 0)[0]:
        break
print(json.dumps({"runs": runs, "misses": misses}), flush=True)
"""


def config(tmp_path: Path, instance: str) -> Path:
    path = tmp_path / "router.toml"
    path.write_text(
        "[router]\n"
        f'instance = "{instance}"\n'
        f'run_dir = "{tmp_path}/run"\n'
        f'state_dir = "{tmp_path}/state"\n'
        "[policyd]\n"
        'interfaces = [{name = "lan0", zone = "internal"}]\n'
        f"binding_map_entries = {INITIAL}\n"
        f"binding_map_limit = {LIMIT}\n")
    return path


def trie(stub: policy_pb2_grpc.PolicyServiceStub) -> P.MapFill:
    status = stub.Status(P.PolicyStatusRequest())
    found: P.MapFill = next(m for m in status.maps if m.name == "src4_bindings")
    return found


def bind(stub: policy_pb2_grpc.PolicyServiceStub, prefix: str) -> None:
    stub.CreateBinding(P.CreateBindingRequest(binding=P.Binding(prefix=prefix, roles=["eng"])))


def test_binding_trie_grows_without_a_miss_and_refuses_beyond_its_limit(
        tmp_path: Path, netns: str, instance: str) -> None:
    cfg = config(tmp_path, instance)
    daemon = DaemonProcess("policyd", cfg, tmp_path / "run", instance, netns=netns).start()
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    prober: subprocess.Popen[str] | None = None
    try:
        stub.CreateRole(P.CreateRoleRequest(role=P.Role(name="eng")))
        bind(stub, "10.9.0.1/32")
        start = trie(stub)
        # The trie holds both policy slots, so its hard size is twice the binding limit.
        assert (start.max_entries, start.hard_limit, start.grows) == (INITIAL, 2 * LIMIT, 0)

        prober = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", PROBER,
             str(Path("/sys/fs/bpf/vpnr") / instance / "xdp_rbac_prog"), "10.9.0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert prober.stdout is not None and prober.stdout.readline().strip() == "READY"

        sizes = [start.max_entries]
        for n in range(2, 201):  # one binding at a time, into the live slot
            bind(stub, f"10.9.{n // 250 + 1}.{n % 250}/32")
            fill = trie(stub)
            if fill.max_entries != sizes[-1]:
                sizes.append(fill.max_entries)
            # Never above 80% after a change: the trie grew before the insert.
            assert fill.fill_ratio <= 0.8, fill
        # A whole-policy replace writes the idle slot too: both slots count.
        doc = stub.GetPolicy(P.GetPolicyRequest())
        stub.ReplacePolicy(P.ReplacePolicyRequest(policy=doc))
        after_replace = trie(stub)

        assert prober.stdin is not None
        prober.stdin.write("stop\n")
        prober.stdin.flush()
        out, _ = prober.communicate(timeout=60)
        probe = json.loads(out.strip().splitlines()[-1])
    finally:
        if prober is not None and prober.poll() is None:
            prober.kill()
            prober.wait(10)

    try:
        # Grown by doubling from 64 as the single inserts passed 80%; the replace needed
        # room for both slots (200 live + 200 new) and fitted in 512.
        assert sizes == [64, 128, 256], sizes
        assert (after_replace.entries, after_replace.max_entries) == (400, 512), after_replace
        assert after_replace.grows == 3
        # The concurrent reader never ran the program without finding the binding.
        assert probe["runs"] > 1000 and probe["misses"] == 0, probe

        # Beyond the hard limit: refused, and nothing stored or enforced changes.
        before = stub.ListBindings(P.ListBindingsRequest()).page.total_size
        version = stub.Status(P.PolicyStatusRequest()).policy_version
        filled = 0
        with pytest.raises(grpc.RpcError) as refused:
            for n in range(LIMIT):  # bounded: the limit is reached well before
                bind(stub, f"10.8.{n // 250}.{n % 250}/32")
                filled += 1
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{LIMIT + 1} bindings" in (refused.value.details() or "")
        assert f"hard limit of {LIMIT}" in (refused.value.details() or "")
        assert "binding_map_limit" in (refused.value.details() or "")
        failed = f"10.8.{filled // 250}.{filled % 250}/32"
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetBinding(P.GetBindingRequest(prefix=failed))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        total = stub.ListBindings(P.ListBindingsRequest()).page.total_size
        assert total == before + filled
        assert stub.Status(P.PolicyStatusRequest()).policy_version > version
        decision = stub.TestDecision(P.TestDecisionRequest(src="10.9.0.1", dst="10.200.0.1",
                                                           protocol=codes_pb2.PROTOCOL_ICMP,
                                                           icmp_type=8))
        assert list(decision.roles) == ["eng"]
        full = trie(stub)
        # The live slot is at the limit (300), the idle one holds the replaced policy
        # (200); the last grow was capped at the trie's hard size.
        assert filled == LIMIT - 200
        assert (full.max_entries, full.entries, full.grows) == (2 * LIMIT, 500, 4), full

        # A restart adopts the grown trie as it is: same size, same entries.
        daemon.stop(signal.SIGTERM)
        channel.close()
        daemon = DaemonProcess("policyd", cfg, tmp_path / "run", instance, netns=netns).start()
        channel = grpc.insecure_channel(f"unix:{daemon.socket}")
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        again = trie(stub)
        # ... and the refused change left the kernel's version equal to the store's.
        assert stub.Status(P.PolicyStatusRequest()).policy_adopted
        assert (again.max_entries, again.entries) == (2 * LIMIT, full.entries)
        assert stub.ListBindings(P.ListBindingsRequest()).page.total_size == total
    finally:
        channel.close()
        daemon.stop()
