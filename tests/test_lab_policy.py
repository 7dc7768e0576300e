"""The lab policy enforced on real traffic between namespaces: roles decide, denials are
audited (auditd's Query, Follow, JSON file and syslog), and revoking a role stops an
established TCP flow at once.

Site A: host 1 is "eng", host 2 is "sales", host 3 has no binding (services/lab/policy.py).
The router namespace runs echo servers (tests/netprobe.py) on its LAN addresses.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from conftest import NETPROBE, ns_exec, ns_ping, router_echo
from vpnr.core.client import socket_target
from vpnr.lab.lab import Lab
from vpnr.lab.topology import Site
from vpnr.v1 import audit_pb2, audit_pb2_grpc, codes_pb2, common_pb2, policy_pb2, policy_pb2_grpc

pytestmark = [pytest.mark.root, pytest.mark.lab]



def in_ns(ns: str, *argv: str, timeout: float = 20) -> str:
    """Run a command in a namespace (network only) and return its stdout."""
    return ns_exec(ns, *argv, timeout=timeout).stdout.strip()


def probe(lab: Lab, site: Site, host: int, verb: str, port: int, dst: str = "") -> str:
    """OK or FAIL for one exchange from a site host to the router."""
    return in_ns(site.host_ns(host), sys.executable, NETPROBE, verb,
                 dst or site.router_lan_v4, str(port))


def ping(site: Site, host: int, dst: str) -> bool:
    """Does one echo request get an answer?"""
    return ns_ping(site.host_ns(host), dst)


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[Site]:
    """Echo servers in site A's router namespace, stopped after the module."""
    with router_echo(lab.spec.site("a")) as site:
        yield site


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


@pytest.fixture
def audit(lab: Lab) -> Iterator[audit_pb2_grpc.AuditServiceStub]:
    """AuditService of site A's auditd."""
    path = lab.spec.run_dir / lab.spec.site("a").instance / "auditd.sock"
    with grpc.insecure_channel(socket_target(path)) as channel:
        yield audit_pb2_grpc.AuditServiceStub(channel)


@pytest.fixture
def syslog(lab: Lab) -> Iterator[socket.socket]:
    """A syslog receiver on the Unix socket site A's auditd sends to."""
    path = lab.spec.syslog_socket(lab.spec.site("a"))
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def test_each_denied_flow_is_an_audit_record_within_a_second_everywhere(
        lab: Lab, servers: Site, audit: audit_pb2_grpc.AuditServiceStub,
        syslog: socket.socket) -> None:
    site = servers
    router = site.router_lan_v4
    follow = audit.Follow(audit_pb2.FollowRequest(filter=audit_pb2.AuditFilter(
        dst_prefix=f"{router}/32", verdicts=[codes_pb2.VERDICT_DENY])), timeout=60)
    time.sleep(0.5)  # the stream is open and the syslog sink has reconnected
    start = audit.Status(audit_pb2.AuditStatusRequest(), timeout=10).last_id
    assert probe(lab, site, 2, "tcp", 22) == "FAIL"      # explicit deny rule 22
    denied_at = time.monotonic()
    assert probe(lab, site, 2, "tcp", 5001) == "FAIL"    # no rule: default deny
    assert not ping(site, 3, router)                      # no binding

    def records(**filters: object) -> list[audit_pb2.AuditRecord]:
        return list(audit.Query(audit_pb2.QueryRequest(
            filter=audit_pb2.AuditFilter(dst_prefix=f"{router}/32",
                                         **filters),  # type: ignore[arg-type]
            page=common_pb2.PageRequest(page_size=100)), timeout=10).records)

    ssh: list[audit_pb2.AuditRecord] = []
    for _ in range(200):  # the SSH SYN was denied at denied_at; its record within 1 s
        ssh = [r for r in records(src_prefix=f"{site.host_v4(2)}/32")
               if r.packet.dst_port == 22 and r.id > start]
        if ssh or time.monotonic() - denied_at > 1.0:
            break
        time.sleep(0.01)
    assert ssh, "no record of the denied SSH attempt within 1 s"
    assert all(r.packet.verdict == codes_pb2.VERDICT_DENY
               and r.packet.reason == codes_pb2.REASON_RULE_DENY and r.packet.rule_id == 22
               and r.packet.rule_role == "sales" and list(r.packet.roles) == ["sales"]
               and r.packet.interface == "lan0" and r.packet.ip_protocol == 6
               and r.packet.src_zone == codes_pb2.ZONE_INTERNAL
               and r.packet.dst_zone == codes_pb2.ZONE_INTERNAL for r in ssh), ssh
    time.sleep(0.5)
    service = [r for r in records(src_prefix=f"{site.host_v4(2)}/32")
               if r.packet.dst_port == 5001 and r.id > start]
    assert service and all(r.packet.reason == codes_pb2.REASON_DEFAULT_DENY
                           and r.packet.rule_id == 0 for r in service), service
    unbound = [r for r in records(src_prefix=f"{site.host_v4(3)}/32")
               if r.packet.ip_protocol == 1 and r.id > start]
    assert unbound and all(r.packet.reason == codes_pb2.REASON_NO_ROLE
                           and not r.packet.roles for r in unbound), unbound

    ids = {r.id for r in ssh + service + unbound}
    followed: set[int] = set()
    for response in follow:  # bounded by the ids we wait for and the stream's deadline
        followed.update(r.id for r in response.records)
        if ids <= followed:
            break
    follow.cancel()
    assert ids <= followed

    lines = (site.state_dir / "audit.jsonl").read_text().splitlines()
    in_json = {x["id"]: x for x in map(json.loads, lines) if x["id"] in ids}
    assert set(in_json) == ids
    assert all(in_json[r.id]["verdict"] == "DENY" and in_json[r.id]["src"] == site.host_v4(2)
               and in_json[r.id]["rule_id"] == 22 for r in ssh)
    # Earlier lab tests may have left denials queued for syslog ahead of ours: read until
    # ours are in (bounded in count and time).
    messages: list[str] = []
    in_syslog: set[int] = set()
    deadline = time.monotonic() + 10
    while in_syslog != ids and len(messages) < 20000 and time.monotonic() < deadline:
        try:
            message = syslog.recv(65536).decode()
        except TimeoutError:
            break
        messages.append(message)
        in_syslog |= {i for i in ids if f'id="{i}"' in message}
    assert in_syslog == ids
    assert all(m.startswith("<132>1 ") for m in messages if 'verdict="DENY"' in m)


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
