"""idpd in the two-site lab against the lab IdP (deploy/idp/lab-data.json): the directory's
printers are bound at both routers, a user's device login binds a host, and what the IdP
says next (user disabled, groups changed) reaches the kernel within one sync.

Site A host 3 has no binding of the lab's own (services/lab/policy.py); these tests bind it
only through a login and end that login again. The IdP listens in the underlay namespace,
which the host cannot route to: its HTTP calls (the user's browser, the admin API) are made
from a thread that entered that namespace.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from idp_server import approve_device

from conftest import NETPROBE, ns_ping, router_echo
from vpnr.core import netns
from vpnr.core.client import socket_target
from vpnr.lab.lab import Lab
from vpnr.lab.topology import Site
from vpnr.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    codes_pb2,
    common_pb2,
    idp_pb2,
    idp_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)

pytestmark = [pytest.mark.root, pytest.mark.lab]

CAROL = ("u-carol", "carol", "carol-lab-password")   # groups ["eng"] in lab-data.json
PRINTER_A = "d-printer-a"
FIRST_SYNC_TIMEOUT = 30.0
LOGIN_TIMEOUT = 30.0
AUDIT_TIMEOUT = 3.0


# -- helpers -------------------------------------------------------------------------------

@contextlib.contextmanager
def idpd(lab: Lab, site: Site) -> Iterator[idp_pb2_grpc.IdpServiceStub]:
    """IdpService of a site's idpd."""
    with grpc.insecure_channel(socket_target(lab.spec.run_dir / site.instance
                                             / "idpd.sock")) as channel:
        yield idp_pb2_grpc.IdpServiceStub(channel)


@contextlib.contextmanager
def policyd(lab: Lab, site: Site) -> Iterator[policy_pb2_grpc.PolicyServiceStub]:
    """PolicyService of a site's policyd."""
    with grpc.insecure_channel(socket_target(lab.spec.run_dir / site.instance
                                             / "policyd.sock")) as channel:
        yield policy_pb2_grpc.PolicyServiceStub(channel)


@contextlib.contextmanager
def auditd(lab: Lab, site: Site) -> Iterator[audit_pb2_grpc.AuditServiceStub]:
    """AuditService of a site's auditd."""
    with grpc.insecure_channel(socket_target(lab.spec.run_dir / site.instance
                                             / "auditd.sock")) as channel:
        yield audit_pb2_grpc.AuditServiceStub(channel)


def admin(lab: Lab, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to the lab IdP's admin API, from the underlay namespace."""
    token = (lab.spec.lab_dir / "idp-admin-token").read_text().strip()
    with netns.entered(lab.spec.underlay_ns):
        reply = httpx.request(method, f"{lab.spec.issuer}/admin{path}", json=body,
                              headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert reply.is_success, f"admin {method} {path}: HTTP {reply.status_code}: {reply.text}"
    return reply.json()


def browser_approves(lab: Lab, verification_uri_complete: str, username: str,
                     password: str) -> None:
    """The user signs in on the IdP's pages (from the underlay namespace)."""
    with netns.entered(lab.spec.underlay_ns):
        approve_device(verification_uri_complete, username, password)


def idp_bindings(lab: Lab, site: Site) -> dict[str, idp_pb2.IdpBinding]:
    """idpd's ListBindings by prefix."""
    with idpd(lab, site) as stub:
        reply = stub.ListBindings(idp_pb2.ListIdpBindingsRequest(
            page=common_pb2.PageRequest(page_size=1000)), timeout=10)
    return {b.prefix: b for b in reply.bindings}


def policy_bindings(lab: Lab, site: Site) -> dict[str, policy_pb2.Binding]:
    """policyd's bindings whose source is idpd, by prefix."""
    with policyd(lab, site) as stub:
        reply = stub.ListBindings(policy_pb2.ListBindingsRequest(
            source="idpd", page=common_pb2.PageRequest(page_size=1000)), timeout=10)
    return {b.prefix: b for b in reply.bindings}


def sync_now(lab: Lab, site: Site) -> idp_pb2.SyncResult:
    """One full sync at a site; it must not fail or be held."""
    with idpd(lab, site) as stub:
        result: idp_pb2.SyncResult = stub.SyncNow(idp_pb2.SyncNowRequest(), timeout=30)
    assert result.outcome in (idp_pb2.SYNC_OUTCOME_APPLIED, idp_pb2.SYNC_OUTCOME_UNCHANGED), \
        result
    return result


def wait_first_sync(lab: Lab, site: Site) -> idp_pb2.IdpStatus:
    """idpd's Status once its first sync (at start) finished (bounded)."""
    deadline = time.monotonic() + FIRST_SYNC_TIMEOUT
    with idpd(lab, site) as stub:
        while True:
            status: idp_pb2.IdpStatus = stub.Status(idp_pb2.IdpStatusRequest(), timeout=10)
            if status.last_result.sync_id or time.monotonic() > deadline:
                return status
            time.sleep(0.1)


def decide(lab: Lab, site: Site, src: str, protocol: int, dst: str,
           dst_port: int = 0) -> policy_pb2.Decision:
    """The live XDP program's decision on lan0 for one packet."""
    with policyd(lab, site) as stub:
        decision: policy_pb2.Decision = stub.TestDecision(policy_pb2.TestDecisionRequest(
            src=src, dst=dst, protocol=protocol, dst_port=dst_port,  # type: ignore[arg-type]
            interface="lan0"), timeout=10)
    return decision


def log_tail(lab: Lab, site: Site, daemon: str = "idpd", limit: int = 3000) -> str:
    """The end of a daemon's log, for assertion messages."""
    path = site.log_dir / f"{daemon}.log"
    return path.read_text(errors="replace")[-limit:] if path.exists() else ""


@pytest.fixture(scope="module")
def echo(lab: Lab) -> Iterator[Site]:
    """Echo servers on site A's router LAN addresses, stopped after the module."""
    with router_echo(lab.spec.site("a")) as site:
        yield site


# -- tests ---------------------------------------------------------------------------------

def test_directory_printers_are_bound_at_both_sites_after_the_first_sync(lab: Lab) -> None:
    printers = {s.letter: (s.printer_v4, s.printer_v6) for s in lab.spec.sites}
    for site in lab.spec.sites:
        status = wait_first_sync(lab, site)
        assert status.last_result.outcome in (idp_pb2.SYNC_OUTCOME_APPLIED,
                                              idp_pb2.SYNC_OUTCOME_UNCHANGED), \
            (status.last_result, log_tail(lab, site))
        assert not status.stale and status.directory_entries == 2, status
        ours = idp_bindings(lab, site)
        at_policyd = policy_bindings(lab, site)
        for letter, addresses in printers.items():
            for address in addresses:
                prefix = f"{address}/{128 if ':' in address else 32}"
                binding = ours.get(prefix)
                assert binding is not None, (site.letter, prefix, ours)
                assert binding.origin == "directory" and list(binding.roles) == ["printers"]
                assert binding.subject == f"device:printer-{letter}"
                assert list(binding.groups) == ["printers"]
                held = at_policyd.get(prefix)
                assert held is not None and held.source == "idpd", (prefix, at_policyd)
                assert list(held.roles) == ["printers"]
        # Nothing else: the people have no directory addresses and nobody is logged in.
        assert set(ours) == set(at_policyd) and len(ours) == 4, ours
        # ... and the kernel decides with them: the printer may ping the LAN, nothing more.
        ping = decide(lab, site, site.printer_v4, codes_pb2.PROTOCOL_ICMP, site.host_v4(1))
        assert ping.verdict == codes_pb2.VERDICT_ALLOW and list(ping.roles) == ["printers"]
        ssh = decide(lab, site, site.printer_v4, codes_pb2.PROTOCOL_TCP, site.router_lan_v4, 22)
        assert ssh.verdict == codes_pb2.VERDICT_DENY
        assert ssh.reason == codes_pb2.REASON_DEFAULT_DENY
    # The lab's own hosts are untouched: host 3 stays unbound.
    a = lab.spec.site("a")
    unbound = decide(lab, a, a.host_v4(3), codes_pb2.PROTOCOL_ICMP, a.router_lan_v4)
    assert unbound.reason == codes_pb2.REASON_NO_ROLE


def test_user_disabled_at_the_idp_is_denied_on_the_next_packet_after_one_sync(
        lab: Lab, echo: Site) -> None:
    site = echo
    address = site.host_v4(3)
    prefix = f"{address}/32"
    sub, username, password = CAROL
    session: subprocess.Popen[str] | None = None
    try:
        assert not ns_ping(site.host_ns(3), site.router_lan_v4)  # unbound before the login
        with idpd(lab, site) as stub:
            challenge = stub.StartLogin(idp_pb2.StartLoginRequest(
                address=address, flow=idp_pb2.LOGIN_FLOW_DEVICE), timeout=10)
            assert challenge.verification_uri_complete
            browser_approves(lab, challenge.verification_uri_complete, username, password)
            login = stub.WaitLogin(idp_pb2.WaitLoginRequest(login_id=challenge.login_id),
                                   timeout=LOGIN_TIMEOUT)
        assert login.state == idp_pb2.LOGIN_STATE_ACTIVE, (login, log_tail(lab, site))
        assert login.username == username and list(login.roles) == ["eng"]
        assert login.address == prefix
        binding = idp_bindings(lab, site)[prefix]
        assert binding.origin == "login" and binding.subject == f"user:{username}"
        assert list(policy_bindings(lab, site)[prefix].roles) == ["eng"]

        # What host 1 (eng) may do, host 3 now may too: ping, and a TCP flow to the
        # router's service range.
        assert ns_ping(site.host_ns(3), site.router_lan_v4)
        session = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{site.host_ns(3)}", sys.executable, NETPROBE,
             "session", site.router_lan_v4, "5002"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert session.stdin is not None and session.stdout is not None

        def exchange() -> str:
            assert session is not None and session.stdin is not None \
                and session.stdout is not None
            session.stdin.write("ping\n")
            session.stdin.flush()
            return session.stdout.readline().strip()

        assert session.stdout.readline().strip() == "CONNECTED"
        assert [exchange() for _ in range(2)] == ["OK", "OK"]

        with auditd(lab, site) as audit:
            start = audit.Status(audit_pb2.AuditStatusRequest(), timeout=10).last_id
        admin(lab, "POST", f"/users/{sub}/disable")
        result = sync_now(lab, site)
        # SyncNow returned: the login is over and its binding is gone at policyd ...
        assert result.outcome == idp_pb2.SYNC_OUTCOME_APPLIED and result.removed == 1, result
        assert prefix not in idp_bindings(lab, site)
        assert prefix not in policy_bindings(lab, site)
        with idpd(lab, site) as stub:
            ended = stub.WaitLogin(idp_pb2.WaitLoginRequest(login_id=challenge.login_id),
                                   timeout=10)
        assert ended.state == idp_pb2.LOGIN_STATE_REVOKED, ended
        # ... and the kernel denies the very next packet of the established flow, and
        # the next new one.
        assert exchange() == "TIMEOUT"
        assert not ns_ping(site.host_ns(3), site.router_lan_v4)

        # auditd has both: host 3 has no role any more.
        denied: list[audit_pb2.AuditRecord] = []
        deadline = time.monotonic() + AUDIT_TIMEOUT
        with auditd(lab, site) as audit:
            while time.monotonic() < deadline:
                reply = audit.Query(audit_pb2.QueryRequest(
                    filter=audit_pb2.AuditFilter(src_prefix=prefix, packets_only=True,
                                                 verdicts=[codes_pb2.VERDICT_DENY]),
                    page=common_pb2.PageRequest(page_size=100)), timeout=10)
                denied = [r for r in reply.records if r.id > start]
                if {r.packet.ip_protocol for r in denied} >= {1, 6}:
                    break
                time.sleep(0.05)
        assert {r.packet.ip_protocol for r in denied} >= {1, 6}, denied
        assert all(r.packet.reason == codes_pb2.REASON_NO_ROLE and not r.packet.roles
                   and r.packet.src == address for r in denied), denied
        tcp = [r for r in denied if r.packet.ip_protocol == 6]
        assert all(r.packet.dst_port == 5002 for r in tcp), tcp
    finally:
        if session is not None:
            session.kill()
            session.wait(10)
        admin(lab, "POST", f"/users/{sub}/enable")
        with idpd(lab, site) as stub, contextlib.suppress(grpc.RpcError):
            stub.Logout(idp_pb2.LogoutRequest(address=address), timeout=10)  # if still on
    assert prefix not in policy_bindings(lab, site)
    unbound = decide(lab, site, address, codes_pb2.PROTOCOL_ICMP, site.router_lan_v4)
    assert unbound.reason == codes_pb2.REASON_NO_ROLE  # host 3 is unbound again


def test_group_change_at_the_idp_reaches_the_kernel_within_one_sync(lab: Lab) -> None:
    site = lab.spec.site("a")
    prefix = f"{site.printer_v4}/32"
    dns = (codes_pb2.PROTOCOL_UDP, site.router_lan_v4, 53)
    before = decide(lab, site, site.printer_v4, *dns)
    assert before.verdict == codes_pb2.VERDICT_DENY and list(before.roles) == ["printers"]
    try:
        admin(lab, "PUT", f"/users/{PRINTER_A}/groups", {"groups": ["printers", "sales"]})
        result = sync_now(lab, site)
        assert result.outcome == idp_pb2.SYNC_OUTCOME_APPLIED and result.changed == 2, result
        assert list(policy_bindings(lab, site)[prefix].roles) == ["printers", "sales"]
        after = decide(lab, site, site.printer_v4, *dns)
        assert list(after.roles) == ["printers", "sales"]
        assert after.verdict == codes_pb2.VERDICT_ALLOW  # sales' rule 23: dns
        assert list(idp_bindings(lab, site)[prefix].groups) == ["printers", "sales"]
    finally:
        admin(lab, "PUT", f"/users/{PRINTER_A}/groups", {"groups": ["printers"]})
        sync_now(lab, site)
    assert list(policy_bindings(lab, site)[prefix].roles) == ["printers"]
    assert decide(lab, site, site.printer_v4, *dns).verdict == codes_pb2.VERDICT_DENY
