"""vpnr-lab: a two-site lab on this host in network namespaces."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from vpnr.core.client import is_serving, socket_target
from vpnr.lab.lab import Lab, LabError
from vpnr.lab.topology import DAEMONS, LabSpec, Site
from vpnr.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    codes_pb2,
    common_pb2,
    idp_pb2,
    idp_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    tunnel_pb2,
    tunnel_pb2_grpc,
)
from vpnr.vpnctl.audit_view import record_line

ICMP = 1
# A TCP connection attempt to port 22 that reports what came back within a second.
SSH_ATTEMPT = """import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
    print("answered")
except ConnectionRefusedError:
    print("refused by " + sys.argv[3] + " (reached it)")
except OSError:
    print("got no answer (dropped)")
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse vpnr-lab's command line."""
    parser = argparse.ArgumentParser(
        prog="vpnr-lab",
        description="Two vpnr routers, their sites and an IdP in network namespaces.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  vpnr-lab demo            # bring the lab up (if down) and show it working\n"
            "  vpnr-lab up --no-idp     # routers and hosts only\n"
            "  vpnr-lab status\n"
            "  vpnr-lab down            # remove exactly what up created\n"
            "exit codes: 0 ok, 1 failure"
        ),
    )
    parser.add_argument("command", choices=("up", "down", "status", "demo"))
    parser.add_argument("--name", default="vpnr", help="lab name, prefix of every namespace")
    parser.add_argument("--instance-prefix", default="",
                        help="prefix of the router instance names (default: a and b)")
    parser.add_argument("--hosts", type=int, default=2, help="hosts per site (1-8)")
    parser.add_argument("--base-dir", default="/var/lib/vpnr-lab", help="lab files")
    parser.add_argument("--no-idp", action="store_true", help="do not start the lab IdP")
    return parser.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> LabSpec:
    """The lab described by the command line."""
    return LabSpec(name=args.name, instance_prefix=args.instance_prefix,
                   hosts_per_site=args.hosts, base_dir=Path(args.base_dir),
                   with_idp=not args.no_idp)


def policy_status(spec: LabSpec, site: Site) -> policy_pb2.PolicyStatus:
    """policyd's Status for one router."""
    path = spec.run_dir / site.instance / "policyd.sock"
    with grpc.insecure_channel(socket_target(path)) as channel:
        status: policy_pb2.PolicyStatus = policy_pb2_grpc.PolicyServiceStub(channel).Status(
            policy_pb2.PolicyStatusRequest(), timeout=5)
    return status


def icmp4_packets(status: policy_pb2.PolicyStatus, interface: str = "lan0") -> int:
    """IPv4 ICMP packets counted by the XDP program on one interface."""
    return sum(c.packets for i in status.interfaces if i.name == interface
               for c in i.counters if c.ip_version == 4 and c.ip_protocol == ICMP)


def show_status(lab: Lab) -> int:
    """Print what runs; returns 0 when everything the manifest names is alive."""
    if not lab.is_up():
        print(f"lab {lab.spec.name!r} is down")
        return 1
    healthy = True
    print(f"lab {lab.spec.name!r}: namespaces {', '.join(lab.manifest.namespaces)}")
    for site in lab.spec.sites:
        states = []
        for daemon in DAEMONS:
            sock = lab.spec.run_dir / site.instance / f"{daemon}.sock"
            ok = sock.exists() and is_serving(sock)
            healthy &= ok
            states.append(f"{daemon} {'SERVING' if ok else 'DOWN'}")
        print(f"router {site.instance} ({site.router_ns}): " + ", ".join(states))
    idp = lab.process("idp")
    if idp is not None:
        alive = lab.pid_alive(idp)
        healthy &= alive
        print(f"idp {lab.spec.issuer}: {'running' if alive else 'DOWN'}")
    return 0 if healthy else 1


def demo(lab: Lab) -> int:
    """Bring the lab up if needed and show traffic crossing the real XDP program."""
    spec = lab.spec
    if not lab.is_up():
        print(f"== bringing lab {spec.name!r} up (namespaces, routers, IdP)")
        started = time.monotonic()
        lab.up()
        print(f"   up in {time.monotonic() - started:.1f} s")
    show_status(lab)
    for site in spec.sites:
        print(f"\n== site {site.letter.upper()}: router {site.instance}, LAN {site.lan_v4}")
        status = policy_status(spec, site)
        iface = status.interfaces[0]
        print(f"   XDP program id {iface.program_id} ({iface.attach_mode}) on {iface.name}, "
              f"{iface.instructions} instructions, policy version {status.policy_version} "
              f"({status.mode})")
        show_traffic(lab, site)
        with grpc.insecure_channel(socket_target(spec.run_dir / site.instance
                                                 / "idpd.sock")) as channel:
            idp = idp_pb2_grpc.IdpServiceStub(channel).Status(idp_pb2.IdpStatusRequest(),
                                                               timeout=5)
        if not idp.issuer:
            print("   idpd: no IdP configured (lab started with --no-idp)")
        else:
            print(f"   idpd: issuer {idp.issuer}, discovery "
                  f"{'ok' if idp.discovery_ok else 'FAILED: ' + idp.discovery_error}")
    show_tunnel(lab)
    if spec.with_idp:
        show_idpd(lab)
    print(f"\nInspect: vpnctl --instance {spec.sites[0].instance} status | "
          f"vpnctl --instance {spec.sites[0].instance} audit events --verdict deny | "
          f"Tear down: vpnr-lab down --name {spec.name}")
    return 0


def show_traffic(lab: Lab, site: Site) -> None:
    """Real traffic from the site's hosts to its router, and what the kernel decided."""
    spec = lab.spec
    path = spec.run_dir / site.instance / "policyd.sock"
    audit_path = spec.run_dir / site.instance / "auditd.sock"
    roles = {1: "eng", 2: "sales"}
    with grpc.insecure_channel(socket_target(audit_path)) as audit_channel:
        audit = audit_pb2_grpc.AuditServiceStub(audit_channel)
        first = audit.Status(audit_pb2.AuditStatusRequest(), timeout=5).last_id
    with grpc.insecure_channel(socket_target(path)) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        before = stub.Status(policy_pb2.PolicyStatusRequest(), timeout=5)
        for n in range(1, spec.hosts_per_site + 1):
            who = f"host{n} {site.host_v4(n)} ({roles.get(n, 'no binding')})"
            ping = lab.host_run(site, n, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-q",
                                site.router_lan_v4)
            received = re.search(r"(\d+) received", ping.stdout)
            decision = stub.TestDecision(policy_pb2.TestDecisionRequest(
                src=site.host_v4(n), dst=site.router_lan_v4, protocol=codes_pb2.PROTOCOL_ICMP,
                interface="lan0"), timeout=5)
            print(f"   ping {who} -> router: {received.group(1) if received else '?'}/3 "
                  f"answered | kernel: {decision.explanation}")
            ssh = stub.TestDecision(policy_pb2.TestDecisionRequest(
                src=site.host_v4(n), dst=site.router_lan_v4, protocol=codes_pb2.PROTOCOL_TCP,
                dst_port=22, interface="lan0"), timeout=5)
            attempt = lab.host_run(site, n, sys.executable, "-c", SSH_ATTEMPT,
                                   site.router_lan_v4, "22", "the router")
            print(f"   ssh  {who} -> router: real SYN {attempt.stdout.strip() or '?'} | "
                  f"kernel: {ssh.explanation}")
        after = stub.Status(policy_pb2.PolicyStatusRequest(), timeout=5)
    emitted = after.audit_emitted - before.audit_emitted
    print(f"   audit ring: +{emitted} events for the packets denied meanwhile "
          f"(lost: {after.audit_lost_reserve} ring full, "
          f"{after.audit_lost_rate_limit} rate-limited)")
    show_audit(audit_path, first, emitted)


def show_tunnel(lab: Lab) -> None:
    """Site A's engineer to site B's over the tunnel: ping, and telnet that site B's own
    rules refuse at the decap program."""
    spec = lab.spec
    a, b = spec.sites
    print(f"\n== tunnel {a.instance} <-> {b.instance} (Noise XX, ChaCha20-Poly1305, AF_XDP)")
    for site in (a, b):
        with grpc.insecure_channel(socket_target(spec.run_dir / site.instance
                                                 / "tunneld.sock")) as channel:
            st = tunnel_pb2_grpc.TunnelServiceStub(channel).Status(
                tunnel_pb2.TunnelStatusRequest(), timeout=5)
        print(f"   {site.instance}: key {st.public_key[:12]}..., {st.sessions} session(s), "
              f"inner MTU {st.inner_mtu}, decap {st.decap_interface} (TC program "
              f"{st.decap_program_id}), mode {st.datapath_mode}")
    audit_path = spec.run_dir / b.instance / "auditd.sock"
    with grpc.insecure_channel(socket_target(audit_path)) as channel:
        first = audit_pb2_grpc.AuditServiceStub(channel).Status(
            audit_pb2.AuditStatusRequest(), timeout=5).last_id
    ping = lab.host_run(a, 1, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-q", b.host_v4(1))
    received = re.search(r"(\d+) received", ping.stdout)
    print(f"   ping host1 {a.host_v4(1)} (eng, site A) -> host1 {b.host_v4(1)} (site B): "
          f"{received.group(1) if received else '?'}/3 answered through the tunnel")
    attempt = lab.host_run(a, 1, sys.executable, "-c", SSH_ATTEMPT, b.host_v4(1), "23",
                           "the host")
    print(f"   telnet host1 site A -> host1 site B: SYN {attempt.stdout.strip() or '?'} "
          "(site B's rule 25: no telnet into this site)")
    print(f"   site B {b.instance}:")
    show_audit(audit_path, first, 1)


def idpd_status(spec: LabSpec, site: Site, first_sync_timeout: float = 0.0) -> idp_pb2.IdpStatus:
    """idpd's Status; waits (bounded) up to ``first_sync_timeout`` for its first sync."""
    path = spec.run_dir / site.instance / "idpd.sock"
    with grpc.insecure_channel(socket_target(path)) as channel:
        stub = idp_pb2_grpc.IdpServiceStub(channel)
        deadline = time.monotonic() + first_sync_timeout
        while True:
            status: idp_pb2.IdpStatus = stub.Status(idp_pb2.IdpStatusRequest(), timeout=5)
            if status.last_result.sync_id or time.monotonic() >= deadline:
                return status
            time.sleep(0.1)


def idpd_bindings(spec: LabSpec, site: Site) -> list[idp_pb2.IdpBinding]:
    """What idpd holds at policyd (ListBindings, every page)."""
    path = spec.run_dir / site.instance / "idpd.sock"
    bindings: list[idp_pb2.IdpBinding] = []
    token = ""
    with grpc.insecure_channel(socket_target(path)) as channel:
        stub = idp_pb2_grpc.IdpServiceStub(channel)
        for _ in range(100):  # bounded whatever the pages say
            reply = stub.ListBindings(idp_pb2.ListIdpBindingsRequest(
                page=common_pb2.PageRequest(page_size=200, page_token=token)), timeout=5)
            bindings.extend(reply.bindings)
            token = reply.page.next_page_token
            if not token:
                break
    return bindings


def show_idpd(lab: Lab) -> None:
    """idpd at each router: the last sync with the lab IdP (`vpnctl idp status`, in short)
    and the bindings it keeps at policyd (`vpnctl idp bindings`): the directory's devices."""
    spec = lab.spec
    print(f"\n== idpd: identities from the lab IdP {spec.issuer} (SCIM directory, logins)")
    for site in spec.sites:
        status = idpd_status(spec, site, first_sync_timeout=10.0)
        result = status.last_result
        outcome = (idp_pb2.SyncOutcome.Name(result.outcome).removeprefix("SYNC_OUTCOME_")
                   .lower() if result.sync_id else "no sync yet")
        stale = "STALE (last good set in force)" if status.stale else "fresh"
        print(f"   {site.instance}: last sync {outcome} "
              f"(+{result.added} -{result.removed} ~{result.changed}, {result.total} total, "
              f"{result.duration_seconds * 1000:.0f} ms), {stale}, "
              f"{status.staleness_seconds:.0f} s since the last good sync, "
              f"{status.bindings} binding(s), {status.directory_entries} directory "
              f"entr{'y' if status.directory_entries == 1 else 'ies'}, "
              f"{status.active_logins} active login(s), policy version "
              f"{status.policy_version}")
        if result.error:
            print(f"     error: {result.error}")
        for warning in result.warnings[:5]:
            print(f"     warning: {warning}")
        for b in idpd_bindings(spec, site):
            print(f"     {b.prefix:<16} {','.join(b.roles):<10} {b.origin:<9} {b.subject} "
                  f"(groups {','.join(b.groups) or '-'})")


def show_audit(path: Path, after_id: int, expected: int) -> None:
    """The denials auditd stored from the demo's traffic (what `vpnctl audit events`
    shows), waiting up to a second for the last of them."""
    denied = audit_pb2.AuditFilter(verdicts=[codes_pb2.VERDICT_DENY], packets_only=True)
    records: list[audit_pb2.AuditRecord] = []
    with grpc.insecure_channel(socket_target(path)) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            reply = stub.Query(audit_pb2.QueryRequest(
                filter=denied, page=common_pb2.PageRequest(page_size=50)), timeout=5)
            records = [r for r in reply.records if r.id > after_id]
            if len(records) >= expected:
                break
            time.sleep(0.05)
    print(f"   auditd: {len(records)} denials stored (SQLite, JSON file), newest first:")
    for record in records[:6]:
        print(f"     {record_line(record)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = parse_args(argv)
    try:
        lab = Lab(spec_from_args(args))
        if args.command == "up":
            lab.up()
            return show_status(lab)
        if args.command == "down":
            removed = lab.down()
            print("\n".join(removed) if removed else "nothing to remove")
            return 0
        if args.command == "status":
            return show_status(lab)
        return demo(lab)
    except (LabError, ValueError) as exc:
        print(f"vpnr-lab: {exc}", file=sys.stderr)
        return 1
