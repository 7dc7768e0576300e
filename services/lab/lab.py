"""Bring the two-site lab up and down, and act inside it.

Everything `up` creates is written to the manifest before it is created, so `down` (or a
failed `up`) removes exactly that: namespaces by name, processes by recorded pid and
command line (never a process the lab did not start), directories and pins by path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from vpnr.core.client import is_serving, socket_target
from vpnr.lab.policy import site_policy
from vpnr.lab.topology import DAEMONS, IDP_ADDRESS, IDP_CLIENT_ID, IDP_PORT, LabSpec, Site
from vpnr.tunneld.keys import StaticKeys, b64
from vpnr.v1 import codes_pb2, policy_pb2, policy_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
IDP_DIR = REPO_ROOT / "deploy" / "idp"
IDP_DATA = IDP_DIR / "lab-data.json"   # users, the printers (directory devices), idpd's client
READY_TIMEOUT = 90.0  # bcc compiles the program at first start: slow on a loaded host
STOP_TIMEOUT = 10.0


class LabError(Exception):
    """The lab cannot be brought up or acted on; says why."""


def run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise LabError with its stderr."""
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ns_run(ns: str, *argv: str, check: bool = True,
           timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a command in a lab namespace (network namespace only)."""
    return run("nsenter", f"--net=/run/netns/{ns}", *argv, check=check, timeout=timeout)


@dataclass
class Manifest:
    """What one `up` created."""

    spec: dict[str, Any] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    shared_dirs: list[str] = field(default_factory=list)  # removed only when left empty

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a manifest; an absent one is empty."""
        if not path.exists():
            return cls()
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        """Write atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        tmp.replace(path)


class Lab:
    """One lab on this host."""

    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        self.manifest = Manifest.load(spec.manifest_path)

    # -- bookkeeping --------------------------------------------------------------------

    def _record(self, kind: str, value: Any) -> None:
        getattr(self.manifest, kind).append(value)
        self.manifest.save(self.spec.manifest_path)

    def is_up(self) -> bool:
        """True when a manifest with namespaces exists."""
        return bool(self.manifest.namespaces)

    # -- up -----------------------------------------------------------------------------

    def up(self) -> None:
        """Create namespaces, links and addresses, then start the IdP and the daemons."""
        if self.is_up():
            raise LabError(f"lab {self.spec.name!r} is already up (vpnr-lab down first)")
        self.spec.lab_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(spec={"name": self.spec.name,
                                       "instance_prefix": self.spec.instance_prefix,
                                       "hosts_per_site": self.spec.hosts_per_site,
                                       "with_idp": self.spec.with_idp})
        self._record("paths", str(self.spec.lab_dir))
        try:
            self._build_network()
            if self.spec.with_idp:
                self._start_idp()
            keys = self._static_keys()
            for site in self.spec.sites:
                other = next(s for s in self.spec.sites if s.letter != site.letter)
                self._configure_router(site, keys[other.letter])
                # tunneld and auditd open policyd's pinned maps: policyd comes first.
                self.start_daemon(site, "policyd")
            # The policy before the rest: wan0 is enforced too, and idpd's first request to
            # the IdP needs the underlay's answers let in.
            for site in self.spec.sites:
                self.wait_ready(site, "policyd")
                self.install_policy(site)
            for site in self.spec.sites:
                for daemon in DAEMONS[1:]:
                    self.start_daemon(site, daemon)
            for site in self.spec.sites:
                for daemon in DAEMONS[1:]:
                    self.wait_ready(site, daemon)
        except BaseException:
            self.down()
            raise

    def install_policy(self, site: Site) -> int:
        """Replace the site's policy by the lab policy; returns the new version."""
        path = self.spec.run_dir / site.instance / "policyd.sock"
        with grpc.insecure_channel(socket_target(path)) as channel:
            reply = policy_pb2_grpc.PolicyServiceStub(channel).ReplacePolicy(
                policy_pb2.ReplacePolicyRequest(policy=lab_policy(self.spec, site),
                                                reason="vpnr-lab up"), timeout=30)
        return int(reply.version)

    def _add_ns(self, ns: str) -> None:
        self._record("namespaces", ns)
        run("ip", "netns", "add", ns)
        ns_run(ns, "ip", "link", "set", "lo", "up")

    def _veth(self, ns1: str, if1: str, ns2: str, if2: str) -> None:
        run("ip", "link", "add", if1, "netns", ns1, "type", "veth", "peer", "name", if2,
            "netns", ns2)
        ns_run(ns1, "ip", "link", "set", if1, "up")
        ns_run(ns2, "ip", "link", "set", if2, "up")

    def _bridge(self, ns: str, ports: list[str]) -> None:
        ns_run(ns, "ip", "link", "add", "br0", "type", "bridge")
        for port in ports:
            ns_run(ns, "ip", "link", "set", port, "master", "br0")
        ns_run(ns, "ip", "link", "set", "br0", "up")

    def _build_network(self) -> None:
        ul = self.spec.underlay_ns
        self._add_ns(ul)
        for site in self.spec.sites:
            for ns in (site.router_ns, site.switch_ns, *site.host_namespaces):
                self._add_ns(ns)
            rtr = site.router_ns
            ns_run(rtr, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            ns_run(rtr, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            self._veth(rtr, "lan0", site.switch_ns, "p-rtr")
            self._veth(rtr, "wan0", ul, f"p-{site.letter}")
            ports = ["p-rtr"]
            for n, host in enumerate(site.host_namespaces, start=1):
                self._veth(host, "eth0", site.switch_ns, f"p-h{n}")
                ports.append(f"p-h{n}")
                # A wire carries whole checksums; a veth would pass the sender's partial
                # one, which XDP (and so tunneld's AF_XDP socket) sees as is.
                ns_run(host, "ethtool", "-K", "eth0", "tx", "off")
                ns_run(host, "ip", "addr", "add", f"{site.host_v4(n)}/24", "dev", "eth0")
                ns_run(host, "ip", "-6", "addr", "add", f"{site.host_v6(n)}/64", "dev", "eth0",
                       "nodad")
                ns_run(host, "ip", "route", "add", "default", "via", site.router_lan_v4)
                ns_run(host, "ip", "-6", "route", "add", "default", "via", site.router_lan_v6)
            self._bridge(site.switch_ns, ports)
            ns_run(rtr, "ip", "addr", "add", f"{site.router_lan_v4}/24", "dev", "lan0")
            ns_run(rtr, "ip", "-6", "addr", "add", f"{site.router_lan_v6}/64", "dev", "lan0",
                   "nodad")
            ns_run(rtr, "ip", "addr", "add", f"{site.router_wan_v4}/24", "dev", "wan0")
        self._bridge(ul, [f"p-{s.letter}" for s in self.spec.sites])
        ns_run(ul, "ip", "addr", "add", f"{IDP_ADDRESS}/24", "dev", "br0")

    def _static_keys(self) -> dict[str, str]:
        """Each router's tunnel static key, created now (0600) so that each router's
        config can name the other's public key; tunneld reads it from its state dir."""
        return {site.letter: b64(StaticKeys.load_or_create(self.spec.static_key_path(site))
                                 .public) for site in self.spec.sites}

    def _configure_router(self, site: Site, peer_public_key: str = "") -> None:
        for path in (site.state_dir, site.log_dir):
            path.mkdir(parents=True, exist_ok=True)
        for shared in (self.spec.run_dir, self.spec.bpffs_dir):
            if not shared.exists() and str(shared) not in self.manifest.shared_dirs:
                self._record("shared_dirs", str(shared))
        for path in (self.spec.run_dir / site.instance, self.spec.bpffs_dir / site.instance):
            if path.exists():
                raise LabError(f"{path} exists: instance {site.instance!r} is in use by "
                               "another router on this host")
            self._record("paths", str(path))
        if self.spec.with_idp:
            self._write_idp_secret(site)
        site.config_path.write_text(self.spec.router_config(site, peer_public_key))

    @staticmethod
    def _write_idp_secret(site: Site) -> None:
        """idpd's client secret at the lab IdP (from the IdP's data), 0600 from the start."""
        clients = json.loads(IDP_DATA.read_text())["clients"]
        secret = next(c["client_secret"] for c in clients if c["client_id"] == IDP_CLIENT_ID)
        path = site.idp_secret_path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
        os.chmod(path, 0o600)  # also when it existed with another mode

    # -- processes ----------------------------------------------------------------------

    def _spawn(self, name: str, ns: str, argv: list[str], log: Path,
               env: dict[str, str] | None = None) -> dict[str, Any]:
        full = ["nsenter", f"--net=/run/netns/{ns}", *argv]
        with log.open("ab") as out:
            proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        entry = {"name": name, "ns": ns, "pid": proc.pid, "argv": argv, "log": str(log)}
        self.manifest.processes = [p for p in self.manifest.processes if p["name"] != name]
        self._record("processes", entry)
        return entry

    def _start_idp(self) -> None:
        server = IDP_DIR / "server.mjs"
        if not (IDP_DIR / "node_modules").is_dir():
            raise LabError(f"the lab IdP is not installed: run deploy/setup-host.sh "
                           f"(npm ci in {IDP_DIR}) or use --no-idp")
        data = self.spec.lab_dir / "idp-data.json"
        shutil.copy(IDP_DATA, data)
        token = os.urandom(16).hex()
        (self.spec.lab_dir / "idp-admin-token").write_text(token)
        os.chmod(self.spec.lab_dir / "idp-admin-token", 0o600)
        log = self.spec.lab_dir / "idp.log"
        self._spawn("idp", self.spec.underlay_ns,
                    ["node", str(server), "--host", IDP_ADDRESS, "--port", str(IDP_PORT),
                     "--data", str(data)], log,
                    env={"VPNR_IDP_ADMIN_TOKEN": token})  # not on the command line
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if '"ready"' in log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise LabError(f"the lab IdP did not become ready in {READY_TIMEOUT:.0f} s; see {log}")

    def daemon_argv(self, site: Site, daemon: str) -> list[str]:
        """Command line of one router daemon."""
        exe = str(Path(sys.executable).parent / daemon)
        return [exe, "--config", str(site.config_path)]

    def start_daemon(self, site: Site, daemon: str, env: dict[str, str] | None = None) -> int:
        """Start one daemon of a router in its namespace; returns its pid. ``env`` adds to
        the environment (e.g. another build: vpnr.lab.upgrade)."""
        entry = self._spawn(f"{site.instance}/{daemon}", site.router_ns,
                            self.daemon_argv(site, daemon), site.log_dir / f"{daemon}.log",
                            env=env)
        return int(entry["pid"])

    def process(self, name: str) -> dict[str, Any] | None:
        """The manifest entry of a lab process."""
        return next((p for p in self.manifest.processes if p["name"] == name), None)

    def pid_alive(self, entry: dict[str, Any]) -> bool:
        """True when the recorded pid still runs the recorded command (ours)."""
        try:
            cmdline = Path(f"/proc/{entry['pid']}/cmdline").read_bytes()
        except OSError:
            return False
        return cmdline.split(b"\0")[-len(entry["argv"]) - 1:-1] == \
            [a.encode() for a in entry["argv"]]

    def signal_daemon(self, site: Site, daemon: str, sig: int) -> None:
        """Send a signal to one of the lab's own daemons."""
        entry = self.process(f"{site.instance}/{daemon}")
        if entry is None or not self.pid_alive(entry):
            raise LabError(f"{site.instance}/{daemon} is not running")
        os.kill(entry["pid"], sig)

    def wait_exit(self, entry: dict[str, Any], timeout: float) -> bool:
        """Wait (bounded) until a lab process is gone; reaps it if it is our child."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(entry["pid"], os.WNOHANG)
            if not self.pid_alive(entry):
                return True
            time.sleep(0.05)
        return False

    def wait_ready(self, site: Site, daemon: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the daemon's health check answers SERVING."""
        sock = self.spec.run_dir / site.instance / f"{daemon}.sock"
        entry = self.process(f"{site.instance}/{daemon}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.exists() and is_serving(sock):
                return
            if entry is not None and _exited(int(entry["pid"])):
                break
            time.sleep(0.05)
        log = site.log_dir / f"{daemon}.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise LabError(f"{site.instance}/{daemon} did not become SERVING; log tail:\n{tail}")

    # -- acting inside ------------------------------------------------------------------

    def host_run(self, site: Site, n: int, *argv: str,
                 timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command on a site host."""
        return ns_run(site.host_ns(n), *argv, check=False, timeout=timeout)

    # -- down ---------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove exactly what `up` recorded; returns what was removed."""
        removed: list[str] = []
        for entry in reversed(self.manifest.processes):
            if self.pid_alive(entry):
                os.kill(entry["pid"], signal.SIGTERM)
                if not self.wait_exit(entry, STOP_TIMEOUT):
                    os.kill(entry["pid"], signal.SIGKILL)
                    self.wait_exit(entry, STOP_TIMEOUT)
                removed.append(f"process {entry['name']} (pid {entry['pid']})")
        for ns in reversed(self.manifest.namespaces):
            if run("ip", "netns", "del", ns, check=False).returncode == 0:
                removed.append(f"netns {ns}")
        for path in reversed(self.manifest.paths):
            target = Path(path)
            if target.exists():
                shutil.rmtree(target)
                removed.append(f"dir {target}")
        for path in reversed(self.manifest.shared_dirs):
            with contextlib.suppress(OSError):  # still used by another router: keep it
                Path(path).rmdir()
                removed.append(f"dir {path}")
        self.manifest = Manifest()
        return removed


def lab_policy(spec: LabSpec, site: Site) -> policy_pb2.PolicyDocument:
    """The site's lab policy (vpnr.lab.policy) with every role idpd's mappings name: the
    printers (directory devices of the lab IdP) may ping the site's LAN, nothing more."""
    doc = site_policy(spec, site)
    if spec.with_idp and not any(r.name == "printers" for r in doc.roles):
        rule_ids = {rule.id for role in doc.roles for rule in role.rules}
        first = max(rule_ids | {39}) + 1
        doc.roles.append(policy_pb2.Role(name="printers", description="directory printers",
                                         rules=[
            policy_pb2.Rule(id=first, priority=10, action=policy_pb2.ACTION_ALLOW,
                            protocol=codes_pb2.PROTOCOL_ICMP, dst_prefix=site.lan_v4,
                            description="ping this site's LAN"),
            policy_pb2.Rule(id=first + 1, priority=10, action=policy_pb2.ACTION_ALLOW,
                            protocol=codes_pb2.PROTOCOL_ICMPV6, dst_prefix=site.lan_v6,
                            description="ping6 this site's LAN")]))
    return doc


def _exited(pid: int) -> bool:
    """The process is gone or a zombie. (Not pid_alive: between fork and exec a fresh
    child's command line is still its parent's.)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")
