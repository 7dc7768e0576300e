"""Reference figures for the tunnel: wireguard-go between the lab's two sites, and iperf3.

A library for bench/tunnel_throughput.py (no ``__main__``):

- ``run_iperf_tcp`` / ``run_iperf_udp``: one iperf3 stream between two network namespaces,
  figures parsed from ``iperf3 -J``;
- ``wireguard_go_lab``: a context manager building the lab's shape and addresses (see
  vpnr.lab.topology and Lab._build_network: host -- switch bridge -- router lan0/wan0 --
  underlay bridge -- router -- switch -- host, veth MTU 1500, one host per site) with the
  Debian ``wireguard-go`` on ``wg0`` (MTU 1420) in each router instead of vpnr;
- ``measure_wireguard_go``: that lab, one ping A -> B, then TCP and UDP A -> B.

wireguard-go keeps its UAPI socket at /run/wireguard/wg0.sock, one path for every network
namespace: a second ``wg0`` fails with "unix socket in use". So each wireguard-go runs in a
private mount namespace with its own tmpfs on /run, and ``wg`` is run in that namespace
(``nsenter --target PID --mount --net``). Nothing is written outside the lab's namespaces
but the key files, in a temporary directory removed at exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpnr.lab.topology import LabSpec

IPERF_PORT = 5201
WG_PORT = 51820
WG_MTU = 1420      # wireguard's default: 1500 - 20 (IPv4) - 8 (UDP) - 32 (WireGuard) - 20
VETH_MTU = 1500
UDP_LENGTH = WG_MTU - 20 - 8  # the largest UDP payload wg0 carries unfragmented
READY_TIMEOUT = 10.0
CMD_TIMEOUT = 30.0
# wireguard-go in the router's network namespace and a private mount namespace whose /run is
# a fresh tmpfs (its UAPI socket directory); ``exec`` keeps the Popen pid = wireguard-go's.
WG_SHELL = "mount -t tmpfs -o mode=0755 wgbench /run && exec wireguard-go -f wg0"


class WgBenchError(Exception):
    """A lab step or a measurement failed; the message says which."""


def run(*argv: str, timeout: float = CMD_TIMEOUT, stdin: str | None = None) -> str:
    """Run a command; returns its stdout, raises WgBenchError with its stderr on failure."""
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WgBenchError(f"{' '.join(argv)}: no answer in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise WgBenchError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()[-500:]}")
    return proc.stdout


def ns_run(ns: str, *argv: str, timeout: float = CMD_TIMEOUT) -> str:
    """Run a command in network namespace ``ns``."""
    return run("ip", "netns", "exec", ns, *argv, timeout=timeout)


def wait_until(what: str, ready: Any, timeout: float = READY_TIMEOUT) -> None:
    """Poll ``ready()`` every 20 ms until true; WgBenchError naming ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise WgBenchError(f"{what}: not ready in {timeout:.0f} s")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Terminate a process we started (SIGKILL if it lingers) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


# -- iperf3 -----------------------------------------------------------------------------


def _iperf(server_ns: str, server_ip: str, client_ns: str, seconds: float,
           extra: list[str], port: int) -> dict[str, Any]:
    """One-off iperf3 server in ``server_ns`` bound to ``server_ip``, client in
    ``client_ns``; returns the client's JSON report."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1",
                               "-p", str(port), "-B", server_ip],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        def listening() -> bool:
            if server.poll() is not None:
                err = server.stderr.read().decode(errors="replace") if server.stderr else ""
                raise WgBenchError(f"iperf3 server in {server_ns} exited "
                                   f"({server.returncode}): {err.strip()}")
            return bool(ns_run(server_ns, "ss", "-Hltn", f"sport = :{port}").strip())

        wait_until(f"iperf3 server {server_ns} {server_ip}:{port}", listening)
        argv = ["ip", "netns", "exec", client_ns, "iperf3", "-J", "-c", server_ip,
                "-p", str(port), "-t", str(seconds), *extra]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=seconds + CMD_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise WgBenchError(f"iperf3 client in {client_ns}: no end after "
                               f"{seconds + CMD_TIMEOUT:.0f} s") from exc
        try:
            report: dict[str, Any] = json.loads(proc.stdout)
        except ValueError as exc:
            raise WgBenchError(f"iperf3 client in {client_ns} ({proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout[-500:]}") from exc
        if proc.returncode != 0 or "error" in report:
            raise WgBenchError(f"iperf3 {' '.join(extra)} {client_ns} -> {server_ip}: "
                               f"{report.get('error', proc.stderr.strip())}")
        return report
    finally:
        stop(server)
        if server.stderr:
            server.stderr.close()


def run_iperf_tcp(server_ns: str, server_ip: str, client_ns: str, seconds: float = 5,
                  port: int = IPERF_PORT) -> dict[str, float]:
    """One TCP stream client -> server: ``gbit_s`` (what the receiver got) and the
    sender's ``retransmits``."""
    end = _iperf(server_ns, server_ip, client_ns, seconds, [], port)["end"]
    return {"gbit_s": round(end["sum_received"]["bits_per_second"] / 1e9, 3),
            "retransmits": int(end["sum_sent"].get("retransmits", 0))}


def run_iperf_udp(server_ns: str, server_ip: str, client_ns: str, seconds: float = 5,
                  bitrate: str = "0", length: int = 1400,
                  port: int = IPERF_PORT) -> dict[str, float]:
    """One UDP stream client -> server at ``bitrate`` (iperf3 ``-b``; "0" is as fast as the
    client can send) of ``length``-byte datagrams: ``gbit_s`` received, ``sent_gbit_s``,
    ``packets`` (datagrams sent), ``lost_packets`` and ``lost_percent`` (at the server).

    A datagram must fit the path: through wireguard-go (MTU 1420) at most 1392 bytes. A
    larger one is fragmented by the client, and the router's ICMP "fragmentation needed"
    can fail the connected socket's next write with EMSGSIZE (iperf3 then gives up)."""
    end = _iperf(server_ns, server_ip, client_ns, seconds,
                 ["-u", "-b", bitrate, "-l", str(length)], port)["end"]
    total = end["sum"]  # the sender's bytes, the server's loss
    received, sent = end.get("sum_received", total), end.get("sum_sent", total)
    return {"gbit_s": round(received["bits_per_second"] / 1e9, 3),
            "sent_gbit_s": round(sent["bits_per_second"] / 1e9, 3),
            "packets": int(sent["packets"]),
            "lost_packets": int(total["lost_packets"]),
            "lost_percent": round(float(total["lost_percent"]), 2)}


def udp_rcvbuf_errors(ns: str) -> int:
    """UDP datagrams the namespace dropped for a full socket receive buffer (since boot of
    the namespace; /proc/net/snmp ``Udp: RcvbufErrors``)."""
    head, values = [line.split() for line in ns_run(ns, "cat", "/proc/net/snmp").splitlines()
                    if line.startswith("Udp:")][:2]
    return int(values[head.index("RcvbufErrors")])


# -- the wireguard-go lab ---------------------------------------------------------------


@dataclass(frozen=True)
class WgLab:
    """Names and addresses of a running wireguard-go lab."""

    spec: LabSpec
    wg_pids: dict[str, int]   # router namespace -> wireguard-go pid

    @property
    def underlay_ns(self) -> str:
        """The underlay bridge's namespace."""
        return self.spec.underlay_ns

    @property
    def routers(self) -> tuple[str, str]:
        """Router namespaces of sites A and B."""
        return self.spec.sites[0].router_ns, self.spec.sites[1].router_ns

    @property
    def hosts(self) -> tuple[str, str]:
        """Host namespaces of sites A and B."""
        return self.spec.sites[0].host_ns(1), self.spec.sites[1].host_ns(1)

    @property
    def host_ips(self) -> tuple[str, str]:
        """IPv4 addresses of the hosts of sites A and B."""
        return self.spec.sites[0].host_v4(1), self.spec.sites[1].host_v4(1)

    def wg(self, router_ns: str, *args: str) -> str:
        """Run ``wg ARGS`` against that router's wireguard-go; returns its output."""
        return run("nsenter", f"--target={self.wg_pids[router_ns]}", "--mount", "--net",
                   "wg", *args)


@contextlib.contextmanager
def wireguard_go_lab(prefix: str) -> Iterator[WgLab]:
    """Build the lab (namespaces ``{prefix}-ul``, ``{prefix}-a-rtr``, ``-a-sw``, ``-a-h1``,
    likewise for b; ``prefix`` as a vpnr lab name: 1-12 of a-z0-9) with wireguard-go on
    each router; removes every namespace, process and file it made at exit, also when
    setup fails halfway."""
    spec = LabSpec(name=prefix, hosts_per_site=1, with_idp=False)
    namespaces: list[str] = []
    procs: dict[str, subprocess.Popen[bytes]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="vpnr-wgbench-"))
    try:
        def add_ns(ns: str) -> None:
            if Path("/run/netns", ns).exists():
                raise WgBenchError(f"namespace {ns} exists: prefix {prefix!r} is in use")
            namespaces.append(ns)
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")

        def veth(ns1: str, if1: str, ns2: str, if2: str) -> None:
            run("ip", "link", "add", if1, "mtu", str(VETH_MTU), "netns", ns1, "type", "veth",
                "peer", "name", if2, "mtu", str(VETH_MTU), "netns", ns2)
            run("ip", "-n", ns1, "link", "set", if1, "up")
            run("ip", "-n", ns2, "link", "set", if2, "up")

        def bridge(ns: str, ports: list[str]) -> None:
            run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
            for port in ports:
                run("ip", "-n", ns, "link", "set", port, "master", "br0")
            run("ip", "-n", ns, "link", "set", "br0", "up")

        add_ns(spec.underlay_ns)
        for site in spec.sites:
            rtr, sw, host = site.router_ns, site.switch_ns, site.host_ns(1)
            for ns in (rtr, sw, host):
                add_ns(ns)
            ns_run(rtr, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            veth(rtr, "lan0", sw, "p-rtr")
            veth(rtr, "wan0", spec.underlay_ns, f"p-{site.letter}")
            veth(host, "eth0", sw, "p-h1")
            bridge(sw, ["p-rtr", "p-h1"])
            run("ip", "-n", host, "addr", "add", f"{site.host_v4(1)}/24", "dev", "eth0")
            run("ip", "-n", host, "route", "add", "default", "via", site.router_lan_v4)
            run("ip", "-n", rtr, "addr", "add", f"{site.router_lan_v4}/24", "dev", "lan0")
            run("ip", "-n", rtr, "addr", "add", f"{site.router_wan_v4}/24", "dev", "wan0")
        bridge(spec.underlay_ns, [f"p-{s.letter}" for s in spec.sites])

        keys: dict[str, tuple[Path, str]] = {}
        for site in spec.sites:
            private = run("wg", "genkey").strip()
            path = tmp / f"{site.letter}.key"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(private + "\n")
            keys[site.router_ns] = path, run("wg", "pubkey", stdin=private + "\n").strip()
            with (tmp / f"{site.letter}-wireguard-go.log").open("wb") as log:
                procs[site.router_ns] = subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{site.router_ns}", "unshare", "--mount",
                     "--propagation", "private", "sh", "-c", WG_SHELL],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, env={**os.environ, "WG_PROCESS_FOREGROUND": "1"})
        lab = WgLab(spec, {ns: p.pid for ns, p in procs.items()})
        for site, other in (spec.sites, spec.sites[::-1]):
            rtr, proc = site.router_ns, procs[site.router_ns]
            sock = Path(f"/proc/{proc.pid}/root/run/wireguard/wg0.sock")

            def up(proc: subprocess.Popen[bytes] = proc, sock: Path = sock,
                   log: Path = tmp / f"{site.letter}-wireguard-go.log") -> bool:
                if proc.poll() is not None:
                    raise WgBenchError(f"wireguard-go exited ({proc.returncode}): "
                                       f"{log.read_text(errors='replace').strip()}")
                return sock.exists()

            wait_until(f"wireguard-go wg0 in {rtr}", up)
            run("ip", "-n", rtr, "link", "show", "wg0")
            lab.wg(rtr, "set", "wg0", "listen-port", str(WG_PORT), "private-key",
                   str(keys[rtr][0]), "peer", keys[other.router_ns][1], "endpoint",
                   f"{other.router_wan_v4}:{WG_PORT}", "allowed-ips", other.lan_v4)
            run("ip", "-n", rtr, "link", "set", "wg0", "mtu", str(WG_MTU), "up")
            run("ip", "-n", rtr, "route", "add", other.lan_v4, "dev", "wg0")
        yield lab
    finally:
        for proc in procs.values():
            stop(proc)
        for ns in reversed(namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False,
                           timeout=CMD_TIMEOUT)
        shutil.rmtree(tmp, ignore_errors=True)


def measure_wireguard_go(prefix: str, seconds: float = 5,
                         udp_length: int = UDP_LENGTH) -> dict[str, Any]:
    """Build the wireguard-go lab, check that host A pings host B, then measure A -> B one
    TCP stream and one UDP stream at ``-b 0`` (as fast as the client sends).

    Each of ``tcp`` and ``udp`` also gives ``tunnel_rcvbuf_drops``: tunnel datagrams site
    B's router dropped meanwhile because wireguard-go's UDP socket buffer was full (with
    this wireguard-go, the cause of most TCP retransmits)."""
    with wireguard_go_lab(prefix) as lab:
        (host_a, host_b), (_, ip_b), (_, rtr_b) = lab.hosts, lab.host_ips, lab.routers
        try:
            ns_run(host_a, "ping", "-c", "1", "-W", "5", ip_b, timeout=10)
        except WgBenchError as exc:
            raise WgBenchError(f"site A host {host_a} does not reach site B host {ip_b} "
                               f"through wireguard-go: {exc}") from exc
        figures: dict[str, Any] = {"seconds": seconds, "udp_length": udp_length,
                                   "wireguard_go": run("wireguard-go", "--version").split()[1]}
        for kind in ("tcp", "udp"):
            drops = udp_rcvbuf_errors(rtr_b)
            figures[kind] = (run_iperf_tcp(host_b, ip_b, host_a, seconds) if kind == "tcp"
                             else run_iperf_udp(host_b, ip_b, host_a, seconds, "0", udp_length))
            figures[kind]["tunnel_rcvbuf_drops"] = udp_rcvbuf_errors(rtr_b) - drops
        return figures
