"""kill -9 in the middle of a 100,000-binding replace: every packet is decided entirely by
the old or entirely by the new policy, before, during and after the kill; the restarted
policyd converges to what the store committed.

Each sample runs the live program on a crafted packet (BPF_PROG_TEST_RUN); its trace says
which policy version decided it, and the verdict must be that version's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from conftest import RunningPolicyd
from vpnr.core import bpfsys
from vpnr.policyd import testrun
from vpnr.v1 import codes_pb2, policy_pb2

pytestmark = pytest.mark.root

BINDINGS = 100_000
EXTRA = 20_000  # per version: bindings only that version has, so each replace rewrites them
BASE = int(ipaddress.IPv4Address("10.128.0.0"))
EXTRA_BASE = int(ipaddress.IPv4Address("10.64.0.0"))
PORT = 1000
LO_IFINDEX = 1  # the sampler runs in the host namespace; lo exists everywhere


def document(role: str, generation: int) -> policy_pb2.PolicyDocument:
    """Roles a (allows tcp/1000) and b (allows tcp/2000); the 100,000 sampled bindings have
    ``role``, and 20,000 more (role a) are this generation's own."""
    roles = [policy_pb2.Role(name="a", rules=[policy_pb2.Rule(
                 id=1, action=policy_pb2.ACTION_ALLOW, protocol=codes_pb2.PROTOCOL_TCP,
                 dst_port_from=PORT, dst_port_to=PORT)]),
             policy_pb2.Role(name="b", rules=[policy_pb2.Rule(
                 id=2, action=policy_pb2.ACTION_ALLOW, protocol=codes_pb2.PROTOCOL_TCP,
                 dst_port_from=2000, dst_port_to=2000)])]
    bindings = [policy_pb2.Binding(prefix=f"{ipaddress.IPv4Address(BASE + i)}/32", roles=[role])
                for i in range(BINDINGS)]
    first = EXTRA_BASE + generation * EXTRA
    bindings.extend(policy_pb2.Binding(prefix=f"{ipaddress.IPv4Address(first + i)}/32",
                                       roles=["a"]) for i in range(EXTRA))
    return policy_pb2.PolicyDocument(roles=roles, bindings=bindings)


@dataclass
class Sample:
    """One decision: which version decided, and what."""

    version: int
    verdict: int
    rule_id: int


class Sampler:
    """Runs the pinned program on addresses spread over the whole binding set."""

    def __init__(self, running: RunningPolicyd) -> None:
        self.fd = bpfsys.obj_get(str(running.pin_dir / "xdp_rbac_prog"))
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def one(self, i: int) -> Sample:
        """Decide a packet from binding number ``i``."""
        src = ipaddress.IPv4Address(BASE + i % BINDINGS)
        frame = testrun.build_frame(testrun.Probe(src, ipaddress.IPv4Address("192.0.2.1"), 6,
                                                  dst_port=PORT))
        trace = testrun.run(self.fd, frame, LO_IFINDEX)
        return Sample(trace.version, trace.verdict, trace.rule_id)

    def _run(self) -> None:
        for i in range(2_000_000):  # bounded; stopped by the test long before
            if self.stop.is_set():
                return
            self.samples.append(self.one(i * 7919))

    def close(self) -> None:
        """Stop sampling and release the program fd."""
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(30)
        os.close(self.fd)


def wait_for_stored_version(database: Path, version: int, timeout: float) -> bool:
    """Poll policyd's SQLite store (read-only) until it holds ``version``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True,
                                                    timeout=0.1)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if row and int(row[0]) >= version:
                return True
        except sqlite3.Error:
            pass  # busy or not created yet: poll again
        time.sleep(0.002)
    return False


def replace(running: RunningPolicyd, role: str, generation: int, timeout: float = 120
            ) -> tuple[int, float]:
    """ReplacePolicy; returns (version, seconds)."""
    request = policy_pb2.ReplacePolicyRequest(policy=document(role, generation))
    started = time.monotonic()
    reply = running.stub.ReplacePolicy(request, timeout=timeout)
    return reply.version, time.monotonic() - started


def test_kill9_during_100k_binding_replace_leaves_old_or_new_never_a_mix(
        policyd: RunningPolicyd) -> None:
    version_a, _ = replace(policyd, "a", 0)
    version_b, duration = replace(policyd, "b", 1)
    role_of = {version_a: "a", version_b: "b"}
    sampler = Sampler(policyd)
    try:
        sampler.thread.start()
        result: dict[str, object] = {}

        def send() -> None:
            try:
                result["version"] = replace(policyd, "a", 2)[0]
            except grpc.RpcError as exc:
                result["error"] = exc.code()

        sender = threading.Thread(target=send)
        sender.start()
        # Kill right after the store committed the new version: the kernel is then being
        # written (the store is read the way any reader of a WAL database may).
        committed = wait_for_stored_version(policyd.config.parent / "state" / "policy.db",
                                            version_b + 1, timeout=duration * 3 + 30)
        policyd.process.stop(signal.SIGKILL)
        sender.join(30)
        killed_midway = "error" in result
        time.sleep(0.3)  # the data path keeps deciding with no policyd at all
        sampler.stop.set()
        sampler.thread.join(30)
        during = list(sampler.samples)

        policyd.restart()
        stored = policyd.stub.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=30).version
        role_of.setdefault(stored, "a")
        after = [sampler.one(i * 104729) for i in range(300)]
    finally:
        sampler.close()

    assert committed, "the store never committed the new version"
    assert killed_midway, f"the replace finished in {duration:.2f} s before the kill: {result}"
    assert during and after
    allowed = {"a": (codes_pb2.VERDICT_ALLOW, 1), "b": (codes_pb2.VERDICT_DENY, 0)}
    mixed = [s for s in during + after
             if s.version not in role_of or (s.verdict, s.rule_id) != allowed[role_of[s.version]]]
    assert not mixed, f"{len(mixed)} of {len(during) + len(after)} decisions mixed: {mixed[:5]}"
    # While policyd was dead the kernel stayed on one version: the old one.
    assert {s.version for s in during} <= {version_b, stored}
    # Restarted, policyd brought the kernel to what the store had committed.
    assert stored > version_b
    assert {s.version for s in after} == {stored}
    assert all(s.verdict == codes_pb2.VERDICT_ALLOW for s in after)
