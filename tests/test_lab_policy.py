"""The lab policy enforced on real traffic between namespaces: roles decide, denials are
audited in the ring buffer, and revoking a role stops an established TCP flow at once.

Site A: host 1 is "eng", host 2 is "sales", host 3 has no binding (services/lab/policy.py).
The router namespace runs echo servers (tests/netprobe.py) on its LAN addresses.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from vpnr.core.client import socket_target
from vpnr.core.ringbuf import RingReader
from vpnr.lab.lab import Lab
from vpnr.lab.topology import Site
from vpnr.policyd import layout
from vpnr.v1 import codes_pb2, policy_pb2, policy_pb2_grpc

pytestmark = [pytest.mark.root, pytest.mark.lab]

NETPROBE = str(Path(__file__).with_name("netprobe.py"))


def in_ns(ns: str, *argv: str, timeout: float = 20) -> str:
    """Run a command in a namespace (network only) and return its stdout."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False).stdout.strip()


def probe(lab: Lab, site: Site, host: int, verb: str, port: int, dst: str = "") -> str:
    """OK or FAIL for one exchange from a site host to the router."""
    return in_ns(site.host_ns(host), sys.executable, NETPROBE, verb,
                 dst or site.router_lan_v4, str(port))


def ping(site: Site, host: int, dst: str) -> bool:
    """Does one echo request get an answer?"""
    ns = f"--net=/run/netns/{site.host_ns(host)}"
    return subprocess.run(["nsenter", ns, "ping", "-c", "1", "-W", "1", dst],
                          capture_output=True, timeout=10, check=False).returncode == 0


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[Site]:
    """Echo servers in site A's router namespace, stopped after the module."""
    site = lab.spec.site("a")
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{site.router_ns}", sys.executable,
                             NETPROBE, "serve", site.router_lan_v4, site.router_lan_v6],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        yield site
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def stub(lab: Lab) -> Iterator[policy_pb2_grpc.PolicyServiceStub]:
    """PolicyService of site A's policyd."""
    path = lab.spec.run_dir / lab.spec.site("a").instance / "policyd.sock"
    with grpc.insecure_channel(socket_target(path)) as channel:
        yield policy_pb2_grpc.PolicyServiceStub(channel)


def test_roles_decide_ping_tcp_udp_between_namespaces(lab: Lab, servers: Site) -> None:
    site = servers
    router = site.router_lan_v4
    seen = {
        "eng ping": ping(site, 1, router),
        "eng ping6": ping(site, 1, site.router_lan_v6),
        "eng ssh": probe(lab, site, 1, "tcp", 22) == "OK",
        "eng service 5001": probe(lab, site, 1, "tcp", 5001) == "OK",
        "eng dns": probe(lab, site, 1, "udp", 53) == "OK",
        "sales ping": ping(site, 2, router),
        "sales ssh": probe(lab, site, 2, "tcp", 22) == "OK",
        "sales service 5001": probe(lab, site, 2, "tcp", 5001) == "OK",
        "sales dns": probe(lab, site, 2, "udp", 53) == "OK",
        "unbound ping": ping(site, 3, router),
        "unbound dns": probe(lab, site, 3, "udp", 53) == "OK",
    }
    assert seen == {
        "eng ping": True, "eng ping6": True, "eng ssh": True, "eng service 5001": True,
        "eng dns": True,
        "sales ping": True, "sales ssh": False, "sales service 5001": False, "sales dns": True,
        "unbound ping": False, "unbound dns": False,
    }


def drain(reader: RingReader) -> None:
    """Consume what is in the ring now."""
    for _ in range(1000):  # bounded: stop once a pass finds nothing
        if reader.consume() == 0:
            return


def test_each_denied_flow_leaves_an_audit_event_in_the_ring(lab: Lab, servers: Site,
                                                            stub: policy_pb2_grpc.
                                                            PolicyServiceStub) -> None:
    site = servers
    events: list[dict[str, object]] = []
    reader = RingReader(str(lab.spec.bpffs_dir / site.instance / "audit_ring"),
                        lambda raw: events.append(layout.decode_audit_event(raw)))
    try:
        drain(reader)
        events.clear()
        assert probe(lab, site, 2, "tcp", 22) == "FAIL"      # explicit deny rule 22
        assert probe(lab, site, 2, "tcp", 5001) == "FAIL"    # no rule: default deny
        assert not ping(site, 3, site.router_lan_v4)          # no binding
        time.sleep(0.2)
        drain(reader)
    finally:
        reader.close()
    host2 = bytes(int(x) for x in site.host_v4(2).split("."))
    host3 = bytes(int(x) for x in site.host_v4(3).split("."))
    router = bytes(int(x) for x in site.router_lan_v4.split("."))
    roles = {r.name: r.id for r in stub.ListRoles(policy_pb2.ListRolesRequest()).roles}

    def matching(src: bytes, **fields: object) -> list[dict[str, object]]:
        return [e for e in events if e["src"] == src.ljust(16, b"\0")
                and e["dst"] == router.ljust(16, b"\0")
                and all(e[k] == v for k, v in fields.items())]

    ssh = matching(host2, dst_port=22, ip_protocol=6)
    assert ssh, events
    assert all(e["verdict"] == codes_pb2.VERDICT_DENY and e["reason"] == codes_pb2.REASON_RULE_DENY
               and e["rule_id"] == 22 and e["roles"] == (roles["sales"],)
               and e["src_zone"] == codes_pb2.ZONE_INTERNAL
               and e["dst_zone"] == codes_pb2.ZONE_INTERNAL for e in ssh), ssh
    service = matching(host2, dst_port=5001, ip_protocol=6)
    assert service and all(e["reason"] == codes_pb2.REASON_DEFAULT_DENY and e["rule_id"] == 0
                           for e in service), service
    unbound = matching(host3, ip_protocol=1)
    assert unbound and all(e["reason"] == codes_pb2.REASON_NO_ROLE and e["roles"] == ()
                           for e in unbound), unbound
    assert all(e["event_version"] == layout.AUDIT_EVENT_VERSION and e["ktime_ns"]
               for e in ssh + service + unbound)


def test_revoking_a_role_stops_an_established_tcp_flow_on_the_next_packet(
        lab: Lab, servers: Site, stub: policy_pb2_grpc.PolicyServiceStub) -> None:
    site = servers
    prefix = f"{site.host_v4(1)}/32"
    session = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{site.host_ns(1)}", sys.executable, NETPROBE,
         "session", site.router_lan_v4, "5002"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert session.stdin is not None and session.stdout is not None

    def exchange() -> str:
        assert session.stdin is not None and session.stdout is not None
        session.stdin.write("ping\n")
        session.stdin.flush()
        return session.stdout.readline().strip()

    try:
        assert session.stdout.readline().strip() == "CONNECTED"
        assert [exchange() for _ in range(3)] == ["OK", "OK", "OK"]
        stub.UpdateBinding(policy_pb2.UpdateBindingRequest(binding=policy_pb2.Binding(
            prefix=prefix, roles=["sales"], source="lab", subject="host1")), timeout=5)
        # The RPC returned: the kernel already decides with the new roles.
        assert exchange() == "TIMEOUT"
        assert exchange() == "TIMEOUT"
    finally:
        stub.UpdateBinding(policy_pb2.UpdateBindingRequest(binding=policy_pb2.Binding(
            prefix=prefix, roles=["eng"], source="lab", subject="host1")), timeout=5)
        session.kill()
        session.wait(10)
    binding = stub.GetBinding(policy_pb2.GetBindingRequest(prefix=prefix))
    assert binding.traffic.outbound_denied_packets >= 2  # the two sends after revocation
    assert probe(lab, site, 1, "tcp", 5002) == "OK"  # restoring the role restores access
