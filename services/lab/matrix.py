"""The restart and upgrade matrix: each daemon of one router killed -9, stopped by SIGTERM,
or upgraded to another build (vpnr.lab.upgrade), then started again, while traffic runs
(vpnr.lab.traffic). Measured per case: allowed packets lost, clear-text leaks on the
underlay, policy mismatches, audit events lost, time to healthy, and when tunnel traffic
flowed again.

Flows (site X is the router operated on, Y the other; lab policy, services/lab/policy.py):

| flow | from -> to | the policy says |
|---|---|---|
| local | X host 1 (eng) -> X router UDP 53 | allow (rule 14) |
| tunnel-out | X host 1 -> Y host 1 UDP, through the tunnel | allow (16 at X, 18 at Y) |
| tunnel-in | Y host 1 -> X host 1 UDP, through the tunnel | allow (16 at Y, 18 at X) |
| deny-sales | X host 2 (sales) -> X router UDP 5001 | deny, no rule (X's XDP) |
| deny-telnet | X host 1 -> X router TCP 23 | deny, rule 25 (X's XDP) |
| deny-tunnel-telnet | Y host 1 -> X host 1 TCP 23 | deny, rule 25 (X's decap) |

What is counted:

- lost: allowed datagrams sent and never received (sequence numbers at the receiver);
- leaks: vpnr.lab.traffic.underlay_leaks on a capture of the whole underlay;
- mismatches: a denied probe seen past its decision point (a packet socket behind it), a
  denied probe's audit record with another reason or rule, or an allowed datagram's
  record of a policy denial (a drop because tunneld is away, TUNNEL_NO_SOCKET, is loss);
- audit lost: decisions the kernel made (every probe XDP saw; every tunnel probe that
  reached the decap device) minus the records auditd stored for them, after settling;
- SERVING / healthy: from the signal until health answers SERVING / until the daemon's
  Status is also consistent (policyd: every interface attached, the kernel at the stored
  policy version; tunneld: a session and the AF_XDP socket bound; auditd: the ring attached
  and SQLite healthy; idpd: discovery done, a sync applied, not stale);
- tunnel back: the first arrival of a tunnel datagram sent after the last one lost, from
  the signal and from SERVING (None when no tunnel datagram was lost).

An upgrade of tunneld first runs the new build's ``python -m vpnr.tunneld.decap`` (compile
and pin the new decap program while the old tunneld carries traffic), as an upgrade
procedure would; ``prepare_decap=False`` measures the upgrade without it. A case leaves
the router as it found it: the daemon runs the normal build again, healthy, and the tunnel
is up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor_pool import DescriptorPool

from vpnr.core.client import is_serving, socket_target
from vpnr.lab.lab import STOP_TIMEOUT, Lab, LabError
from vpnr.lab.topology import DAEMONS, Site
from vpnr.lab.traffic import (
    AllowedFlow,
    DeniedFlow,
    Traffic,
    UnderlayCapture,
    tunnel_messages,
    underlay_leaks,
)
from vpnr.lab.upgrade import NEW_FIELD, UpgradeBuild
from vpnr.policyd.datapath import BUILD_TIMEOUT
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

OPERATIONS = ("kill9", "sigterm", "upgrade")
CASES = tuple((daemon, op) for daemon in DAEMONS for op in OPERATIONS)
ZERO_LOSS_DAEMONS = ("policyd", "auditd", "idpd")
TUNNEL_BACK_TARGET_S = 1.0
HEALTHY_TIMEOUT = 90.0    # an upgrade compiles the BPF program: slow on a loaded host
AUDIT_SETTLE_TIMEOUT = 20.0
TUNNEL_UP_TIMEOUT = 15.0
PORT_OUT, PORT_IN, PORT_DENIED_UDP = 47801, 47802, 5001
# Drops that are the tunnel being away, not the policy deciding (fail closed).
NOT_POLICY = (codes_pb2.REASON_TUNNEL_NO_SOCKET, codes_pb2.REASON_TUNNEL_UNKNOWN_SESSION)


class MatrixError(Exception):
    """A case could not be run (not: a target missed); says why."""


@dataclass(frozen=True)
class Rates:
    """Packets per second of each flow, and how long traffic runs around the operation."""

    allowed: float = 100.0
    tunnel_in: float = 50.0
    denied: float = 20.0
    before_s: float = 0.5     # traffic before the signal
    after_s: float = 1.0      # traffic after the daemon is healthy


@dataclass
class CaseResult:
    """What one case measured."""

    daemon: str
    operation: str
    sent: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    leaks: list[str] = field(default_factory=list)
    frames_captured: int = 0
    tunnel_messages: int = 0        # of those, tunnel messages between the routers
    mismatches: list[str] = field(default_factory=list)
    denied: dict[str, dict[str, int]] = field(default_factory=dict)
    audit_expected: int = 0
    audit_stored: int = 0
    audit_duplicates: int = 0
    exited_s: float = 0.0           # signal -> the old process gone
    serving_s: float = 0.0          # signal -> health SERVING
    healthy_s: float = 0.0          # signal -> SERVING and its Status consistent
    tunnel_back_s: float | None = None  # signal -> tunnel traffic flows again (None: no gap)
    tunnel_back_after_serving_s: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def allowed_lost(self) -> int:
        """Allowed datagrams sent and never received, all flows."""
        return sum(self.lost.values())

    @property
    def audit_lost(self) -> int:
        """Decisions the kernel made that auditd did not store."""
        return self.audit_expected - self.audit_stored

    def verdicts(self) -> dict[str, bool]:
        """Each target that applies to this case: met or not."""
        out = {"no leaks": not self.leaks, "no mismatches": not self.mismatches}
        if self.daemon in ZERO_LOSS_DAEMONS:
            out["no loss"] = self.allowed_lost == 0
            out["no audit loss"] = self.audit_lost == 0
        if self.daemon == "tunneld":
            back = self.tunnel_back_after_serving_s
            out["tunnel back <= 1 s"] = back is None or back <= TUNNEL_BACK_TARGET_S
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, with the derived figures."""
        out = asdict(self)
        out.update(allowed_lost=self.allowed_lost, audit_lost=self.audit_lost,
                   verdicts=self.verdicts())
        return out


def _exited(pid: int) -> bool:
    """Gone or a zombie (not pid_alive: between fork and exec the command line is still
    the parent's)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


# -- talking to the daemons -----------------------------------------------------------------

def _sock(lab: Lab, site: Site, daemon: str) -> Path:
    return lab.spec.run_dir / site.instance / f"{daemon}.sock"


def daemon_status(lab: Lab, site: Site, daemon: str, timeout: float = 5.0) -> Any:
    """The daemon's Status answer (its own message type)."""
    calls: dict[str, tuple[Callable[[grpc.Channel], Any], Any]] = {
        "policyd": (policy_pb2_grpc.PolicyServiceStub, policy_pb2.PolicyStatusRequest()),
        "tunneld": (tunnel_pb2_grpc.TunnelServiceStub, tunnel_pb2.TunnelStatusRequest()),
        "auditd": (audit_pb2_grpc.AuditServiceStub, audit_pb2.AuditStatusRequest()),
        "idpd": (idp_pb2_grpc.IdpServiceStub, idp_pb2.IdpStatusRequest()),
    }
    stub_class, request = calls[daemon]
    with grpc.insecure_channel(socket_target(_sock(lab, site, daemon))) as channel:
        return stub_class(channel).Status(request, timeout=timeout)


def consistent(daemon: str, status: Any, before: Any) -> bool:
    """Is a freshly started daemon's Status what a healthy one reports?"""
    if daemon == "policyd":
        return (len(status.interfaces) == len(before.interfaces)
                and all(i.attached for i in status.interfaces)
                and status.kernel_policy_version == status.policy_version)
    if daemon == "tunneld":
        return bool(status.sessions >= 1 and status.lan_interfaces)
    if daemon == "auditd":
        return bool(status.ring_buffer) and any(s.name == "sqlite" and s.healthy
                                                for s in status.sinks)
    return bool(status.discovery_ok and status.last_result.sync_id and not status.stale)


def daemon_info_fields(lab: Lab, site: Site, daemon: str) -> list[str]:
    """DaemonInfo's field names as the running daemon describes them (gRPC reflection):
    the daemon's own build, whatever stubs this process has."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(socket_target(_sock(lab, site, daemon))) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        message = pool.FindMessageTypeByName("vpnr.v1.DaemonInfo")
        return [f.name for f in message.fields]


def audit_packets(lab: Lab, site: Site, after_id: int) -> list[audit_pb2.PacketDecision]:
    """Every packet record the site's auditd stored after ``after_id`` (bounded pages)."""
    out: list[audit_pb2.PacketDecision] = []
    with grpc.insecure_channel(socket_target(_sock(lab, site, "auditd"))) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        token = ""
        for _ in range(100):
            answer = stub.Query(audit_pb2.QueryRequest(
                filter=audit_pb2.AuditFilter(packets_only=True),
                page=common_pb2.PageRequest(page_size=5000, page_token=token)), timeout=20)
            newer = [r for r in answer.records if r.id > after_id]
            out.extend(r.packet for r in newer)
            token = answer.page.next_page_token
            if not token or len(newer) < len(answer.records):
                break
    return out


def audit_last_id(lab: Lab, site: Site) -> int:
    """The newest record id of a site's auditd."""
    return int(daemon_status(lab, site, "auditd").last_id)


def wait_tunnel(lab: Lab, timeout: float = TUNNEL_UP_TIMEOUT) -> None:
    """Until a ping crosses the tunnel both ways between the sites' host 1 (bounded). An
    idle tunnel has no session (keys expire); the ping is what starts the handshake."""
    a, b = lab.spec.sites
    deadline = time.monotonic() + timeout
    pending = {(a.host_ns(1), b.host_v4(1)), (b.host_ns(1), a.host_v4(1))}
    while pending and time.monotonic() < deadline:
        for ns, dst in sorted(pending):
            ping = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "ping", "-c", "1",
                                   "-W", "1", dst], capture_output=True, timeout=10,
                                  check=False)
            if ping.returncode == 0:
                pending.discard((ns, dst))
    if pending:
        raise MatrixError(f"no ping across the tunnel within {timeout:.0f} s: {pending}")


# -- the flows ------------------------------------------------------------------------------

def flows(site: Site, other: Site, decap: str, rates: Rates) -> tuple[list[AllowedFlow],
                                                                      list[DeniedFlow]]:
    """The case's flows (see the module's table)."""
    allowed = [
        AllowedFlow("local", site.host_ns(1), site.host_v4(1), site.router_ns,
                    site.router_lan_v4, 53, rates.allowed),
        AllowedFlow("tunnel-out", site.host_ns(1), site.host_v4(1), other.host_ns(1),
                    other.host_v4(1), PORT_OUT, rates.allowed, tunnel=True),
        AllowedFlow("tunnel-in", other.host_ns(1), other.host_v4(1), site.host_ns(1),
                    site.host_v4(1), PORT_IN, rates.tunnel_in, tunnel=True),
    ]
    denied = [
        DeniedFlow("deny-sales", "udp", site.host_ns(2), site.host_v4(2), site.router_lan_v4,
                   PORT_DENIED_UDP, rates.denied, codes_pb2.REASON_DEFAULT_DENY, 0,
                   site.letter, "xdp", (site.router_ns, "lan0")),
        DeniedFlow("deny-telnet", "tcp", site.host_ns(1), site.host_v4(1), site.router_lan_v4,
                   23, rates.denied, codes_pb2.REASON_RULE_DENY, 25, site.letter, "xdp",
                   (site.router_ns, "lan0")),
        DeniedFlow("deny-tunnel-telnet", "tcp", other.host_ns(1), other.host_v4(1),
                   site.host_v4(1), 23, rates.denied, codes_pb2.REASON_RULE_DENY, 25,
                   site.letter, "tc_decap", (site.host_ns(1), "eth0"),
                   decided_at=(site.router_ns, decap)),
    ]
    return allowed, denied


# -- one case -------------------------------------------------------------------------------

class Matrix:
    """Runs cases on a running lab (the operated router: ``letter``)."""

    def __init__(self, lab: Lab, work_dir: Path, letter: str = "a",
                 rates: Rates | None = None, prepare_decap: bool = True) -> None:
        self.lab, self.work_dir = lab, work_dir
        self.prepare_decap = prepare_decap  # tunneld's upgrade compiles before the stop
        self.site = lab.spec.site(letter)
        self.other = next(s for s in lab.spec.sites if s.letter != letter)
        self.rates = rates or Rates()
        self._build: UpgradeBuild | None = None

    def build(self) -> UpgradeBuild:
        """The upgrade build, made on first use."""
        if self._build is None:
            self._build = UpgradeBuild(self.work_dir).make()
        return self._build

    def close(self) -> None:
        """Remove the upgrade build."""
        if self._build is not None:
            self._build.remove()
            self._build = None

    def _prepare_decap(self, env: dict[str, str]) -> int:
        """Run the upgrade's preparation of tunneld (in ``env``'s build); the program id."""
        proc = subprocess.run([sys.executable, "-m", "vpnr.tunneld.decap", "--config",
                               str(self.site.config_path)], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=BUILD_TIMEOUT + 30,
                              check=False)
        if proc.returncode != 0:
            raise MatrixError(f"preparing tunneld's decap program failed: {proc.stderr}")
        return int(json.loads(proc.stdout)["prog_id"])

    def _entry(self, daemon: str) -> dict[str, Any]:
        entry = self.lab.process(f"{self.site.instance}/{daemon}")
        if entry is None or not self.lab.pid_alive(entry):
            raise MatrixError(f"{self.site.instance}/{daemon} is not running")
        return entry

    def _stop(self, daemon: str, sig: int) -> None:
        entry = self._entry(daemon)
        self.lab.signal_daemon(self.site, daemon, sig)
        if not self.lab.wait_exit(entry, STOP_TIMEOUT):
            os.kill(entry["pid"], signal.SIGKILL)  # our own daemon, recorded by pid
            self.lab.wait_exit(entry, STOP_TIMEOUT)
            raise MatrixError(f"{daemon} did not stop within {STOP_TIMEOUT:.0f} s of "
                              f"{signal.Signals(sig).name}")

    def _wait_healthy(self, daemon: str, before: Any, since: float) -> tuple[float, float]:
        """(signal -> SERVING, signal -> consistent Status), polled every 20 ms."""
        sock = _sock(self.lab, self.site, daemon)
        deadline = time.monotonic() + HEALTHY_TIMEOUT
        serving = 0.0
        while time.monotonic() < deadline:
            if not serving and sock.exists() and is_serving(sock, timeout=0.5):
                serving = time.monotonic() - since
            if serving:
                with contextlib.suppress(grpc.RpcError):
                    if consistent(daemon, daemon_status(self.lab, self.site, daemon), before):
                        return serving, time.monotonic() - since
            elif _exited(int(self._entry_any(daemon)["pid"])):
                break
            time.sleep(0.02)
        log = self.site.log_dir / f"{daemon}.log"
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise MatrixError(f"{daemon} not healthy within {HEALTHY_TIMEOUT:.0f} s; log:\n{tail}")

    def _entry_any(self, daemon: str) -> dict[str, Any]:
        entry = self.lab.process(f"{self.site.instance}/{daemon}")
        assert entry is not None
        return entry

    def restore(self, daemon: str) -> None:
        """The daemon runs the normal build, healthy, and the tunnel is up (bounded)."""
        entry = self.lab.process(f"{self.site.instance}/{daemon}")
        if entry is None or not self.lab.pid_alive(entry):
            self.lab.start_daemon(self.site, daemon)
        self.lab.wait_ready(self.site, daemon)
        deadline = time.monotonic() + HEALTHY_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                status = daemon_status(self.lab, self.site, daemon)
                if consistent(daemon, status, status):
                    break
            time.sleep(0.05)
        wait_tunnel(self.lab)

    def run(self, daemon: str, operation: str) -> CaseResult:
        """One case; the router is left as found (normal build, healthy, tunnel up), also
        when the case fails (best effort then: the case's error is what is raised)."""
        if (daemon, operation) not in CASES:
            raise MatrixError(f"no such case: {daemon} {operation}")
        try:
            return self._run(daemon, operation)
        except BaseException:
            with contextlib.suppress(Exception):
                self._recover(daemon)
            raise

    def _recover(self, daemon: str) -> None:
        entry = self.lab.process(f"{self.site.instance}/{daemon}")
        if entry is not None and self.lab.pid_alive(entry):
            self._stop(daemon, signal.SIGTERM)  # it may run the upgrade build
        if daemon == "tunneld":
            self._prepare_decap({})
        self.restore(daemon)

    def _run(self, daemon: str, operation: str) -> CaseResult:
        result = CaseResult(daemon, operation)
        wait_tunnel(self.lab)
        build = self.build() if operation == "upgrade" else None
        decap = str(daemon_status(self.lab, self.site, "tunneld").decap_interface)
        before = daemon_status(self.lab, self.site, daemon)
        start_ids = {s.letter: audit_last_id(self.lab, s) for s in self.lab.spec.sites}
        allowed, denied = flows(self.site, self.other, decap, self.rates)
        token = os.urandom(8)
        capture = UnderlayCapture(self.lab.spec, self.work_dir / f"{daemon}-{operation}.pcap")
        traffic = Traffic(allowed, denied, token)
        capture.start()
        try:
            traffic.start(deadline_s=HEALTHY_TIMEOUT + 60)
            time.sleep(self.rates.before_s)
            if daemon == "tunneld" and build is not None and self.prepare_decap:
                # The new build's decap program, compiled and pinned while the old tunneld
                # still carries traffic (python -m vpnr.tunneld.decap): the new one adopts it.
                result.evidence["prepared_prog_id"] = self._prepare_decap(build.env(True))
            signalled = time.monotonic()
            self._stop(daemon, signal.SIGKILL if operation == "kill9" else signal.SIGTERM)
            result.exited_s = time.monotonic() - signalled
            env = None if build is None else build.env(daemon in ("policyd", "tunneld"))
            self.lab.start_daemon(self.site, daemon, env=env)
            result.serving_s, result.healthy_s = self._wait_healthy(daemon, before, signalled)
            serving_at = signalled + result.serving_s
            time.sleep(self.rates.after_s)
        finally:
            traffic.stop()
            frames = capture.stop()
        result.errors = list(traffic.errors)
        after = daemon_status(self.lab, self.site, daemon)
        self._evidence(result, before, after)
        self._losses(result, allowed, signalled, serving_at)
        result.frames_captured = len(frames)
        result.tunnel_messages = tunnel_messages(self.lab.spec, frames)
        result.leaks = underlay_leaks(self.lab.spec, frames, token)
        self._audit(result, allowed, denied, start_ids)
        if operation == "upgrade":
            if daemon == "tunneld":
                self._prepare_decap({})
            self._stop(daemon, signal.SIGTERM)
            self.restore(daemon)
            result.evidence["restored_fields_have_new"] = NEW_FIELD in daemon_info_fields(
                self.lab, self.site, daemon)
            if daemon == "policyd":
                result.evidence["restored_build_id"] = daemon_status(
                    self.lab, self.site, daemon).build_id == before.build_id
        else:
            wait_tunnel(self.lab)
        return result

    # -- evaluation -------------------------------------------------------------------------

    def _evidence(self, result: CaseResult, before: Any, after: Any) -> None:
        """What the restarted daemon says about itself, next to what it said before."""
        ev = result.evidence
        ev["pid_changed"] = before.daemon.pid != after.daemon.pid
        ev["new_field"] = NEW_FIELD in daemon_info_fields(self.lab, self.site, result.daemon)
        if result.daemon == "policyd":
            ev.update(adopted=after.adopted, policy_adopted=after.policy_adopted,
                      policy_version_kept=after.policy_version == before.policy_version,
                      build_id_changed=after.build_id != before.build_id,
                      program_tag_changed=after.program_tag != before.program_tag,
                      program_ids_changed=[i.program_id for i in after.interfaces] !=
                      [i.program_id for i in before.interfaces],
                      link_ids_kept=[i.link_id for i in after.interfaces] ==
                      [i.link_id for i in before.interfaces])
        elif result.daemon == "tunneld":
            ev.update(decap_adopted=after.decap_program_adopted,
                      decap_program_changed=after.decap_program_id != before.decap_program_id,
                      decap_is_prepared=after.decap_program_id == ev.get("prepared_prog_id"))

    def _losses(self, result: CaseResult, allowed: list[AllowedFlow], signalled: float,
                serving_at: float) -> None:
        for flow in allowed:
            result.sent[flow.name] = len(flow.sent)
            result.lost[flow.name] = flow.lost
            result.duplicates += flow.duplicates
        backs = [flow.back_at(signalled) for flow in allowed if flow.tunnel]
        gaps = [b for b in backs if b is not None]
        if gaps:
            back = max(gaps)
            result.tunnel_back_s = back - signalled
            result.tunnel_back_after_serving_s = max(0.0, back - serving_at)

    def _audit(self, result: CaseResult, allowed: list[AllowedFlow],
               denied: list[DeniedFlow], start_ids: dict[str, int]) -> None:
        """Wait (bounded) until auditd holds every decision the kernel made, then count;
        collect the mismatches that the records and the packet sockets show."""
        expected = {f.name: (set(f.probes) if f.decided_at is None else set(f.decided))
                    for f in denied}
        result.audit_expected = sum(len(v) for v in expected.values())
        deadline = time.monotonic() + AUDIT_SETTLE_TIMEOUT
        records: dict[str, list[audit_pb2.PacketDecision]] = {}
        while True:
            records = {s.letter: audit_packets(self.lab, s, start_ids[s.letter])
                       for s in self.lab.spec.sites}
            stored = self._match_denied(denied, records)
            if all(expected[n] <= {p.src_port for p in stored[n]} for n in expected) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.25)
        for flow in denied:
            got = stored[flow.name]
            ports = {p.src_port for p in got}
            result.audit_stored += len(expected[flow.name] & ports)
            result.audit_duplicates += len(got) - len(ports)
            result.denied[flow.name] = {"sent": len(flow.probes), "decided": len(flow.decided),
                                        "audited": len(ports), "passed": len(flow.passed)}
            result.mismatches += [f"{flow.name}: probe from port {port} got through"
                                  for port in sorted(flow.passed)]
            result.mismatches += [
                f"{flow.name}: decided {codes_pb2.Reason.Name(p.reason)} rule {p.rule_id} "
                f"by {p.source}" for p in got
                if (p.reason, p.rule_id, p.source) != (flow.reason, flow.rule_id, flow.source)]
        for ok in allowed:
            for letter, packets in records.items():
                result.mismatches += [
                    f"{ok.name}: refused at site {letter}: "
                    f"{codes_pb2.Reason.Name(p.reason)} rule {p.rule_id} by {p.source}"
                    for p in packets
                    if p.verdict == codes_pb2.VERDICT_DENY and p.src == ok.src_addr
                    and p.dst == ok.dst_addr and p.dst_port == ok.dst_port
                    and p.src_port == ok.src_port and p.reason not in NOT_POLICY]

    def _match_denied(self, denied: list[DeniedFlow],
                      records: dict[str, list[audit_pb2.PacketDecision]]
                      ) -> dict[str, list[audit_pb2.PacketDecision]]:
        return {f.name: [p for p in records[f.audit_site]
                         if p.src == f.src_addr and p.dst == f.dst_addr
                         and p.dst_port == f.dst_port and p.ip_protocol == f.ip_protocol
                         and p.src_port in f.probes] for f in denied}


def run_matrix(lab: Lab, work_dir: Path, cases: tuple[tuple[str, str], ...] = CASES,
               rates: Rates | None = None, letter: str = "a",
               on_result: Callable[[CaseResult], None] | None = None,
               prepare_decap: bool = True) -> list[CaseResult]:
    """Every case in order on one running lab; the upgrade build is removed after."""
    matrix = Matrix(lab, work_dir, letter, rates, prepare_decap)
    results = []
    try:
        for daemon, operation in cases:
            result = matrix.run(daemon, operation)
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        matrix.close()
    return results


def table(results: list[CaseResult]) -> str:
    """The matrix as a Markdown table."""
    rows = ["| daemon | operation | allowed lost | leaks | mismatches | audit lost "
            "| exited (s) | SERVING (s) | healthy (s) "
            "| tunnel back (s after signal / after SERVING) | targets |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        sent = sum(r.sent.values())
        if r.tunnel_back_s is None:
            back = "no gap"
        else:
            back = f"{r.tunnel_back_s:.2f} / {r.tunnel_back_after_serving_s or 0.0:.2f}"
        missed = [name for name, ok in r.verdicts().items() if not ok]
        rows.append(f"| {r.daemon} | {r.operation} | {r.allowed_lost} of {sent} "
                    f"| {len(r.leaks)} | {len(r.mismatches)} "
                    f"| {r.audit_lost} of {r.audit_expected} | {r.exited_s:.2f} "
                    f"| {r.serving_s:.2f} "
                    f"| {r.healthy_s:.2f} | {back} "
                    f"| {'met' if not missed else 'MISSED: ' + ', '.join(missed)} |")
    return "\n".join(rows)


__all__ = ["CASES", "CaseResult", "LabError", "Matrix", "MatrixError", "Rates", "run_matrix",
           "table"]
