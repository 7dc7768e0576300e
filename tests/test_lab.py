"""The two-site lab on real namespaces: traffic crosses the real XDP program, and policyd
can be killed -9 and restarted under traffic without the data path noticing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from conftest import unique
from vpnr.core.client import socket_target
from vpnr.lab.lab import Lab
from vpnr.lab.main import icmp4_packets, policy_status
from vpnr.lab.topology import DAEMONS, LabSpec
from vpnr.v1 import idp_pb2, idp_pb2_grpc

pytestmark = [pytest.mark.root, pytest.mark.lab]


def xdp_prog_ids(ns: str, ifname: str) -> dict[str, int]:
    """What the kernel reports attached to an interface: {"prog": id, "mode": ...}."""
    out = subprocess.run(["ip", "-n", ns, "-j", "-d", "link", "show", ifname],
                         capture_output=True, text=True, check=True).stdout
    xdp = json.loads(out)[0].get("xdp", {})
    return {"mode": xdp.get("mode", 0), "prog": xdp.get("prog", {}).get("id", 0),
            "attached": len(xdp.get("attached", [xdp] if xdp else []))}


def ping_summary(output: str) -> tuple[int, int]:
    match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


def test_ping_counted_by_xdp_program(lab: Lab) -> None:
    site = lab.spec.site("a")
    before = icmp4_packets(policy_status(lab.spec, site))
    ping = lab.host_run(site, 1, "ping", "-c", "7", "-i", "0.05", "-W", "1", site.router_lan_v4)
    sent, received = ping_summary(ping.stdout)
    assert (sent, received) == (7, 7)
    after = icmp4_packets(policy_status(lab.spec, site))
    assert after - before == sent


def test_policyd_kill9_restart_under_traffic(lab: Lab) -> None:
    site = lab.spec.site("a")
    status = policy_status(lab.spec, site)
    prog_id = status.interfaces[0].program_id
    link_id = status.interfaces[0].link_id
    before = icmp4_packets(status)
    count = 400

    ping = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{site.host_ns(1)}", "ping", "-c", str(count),
         "-i", "0.01", "-W", "1", site.router_lan_v4],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen_while_down: list[dict[str, int]] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        for _ in range(2000):  # bounded
            if stop_sampling.is_set():
                return
            seen_while_down.append(xdp_prog_ids(site.router_ns, "lan0"))
            time.sleep(0.005)

    try:
        time.sleep(1.0)
        entry = lab.process(f"{site.instance}/policyd")
        assert entry is not None
        sampler = threading.Thread(target=sample)
        sampler.start()
        lab.signal_daemon(site, "policyd", signal.SIGKILL)
        assert lab.wait_exit(entry, 10)
        time.sleep(0.3)  # traffic flows with no policyd at all
        lab.start_daemon(site, "policyd")
        lab.wait_ready(site, "policyd")
        stop_sampling.set()
        sampler.join(10)
        output, _ = ping.communicate(timeout=60)
    finally:
        stop_sampling.set()
        if ping.poll() is None:
            ping.kill()
            ping.wait(10)

    sent, received = ping_summary(output)
    assert sent == count and received == count  # nothing lost
    after_status = policy_status(lab.spec, site)
    assert after_status.adopted  # the restarted policyd adopted, did not rebuild
    assert after_status.policy_adopted  # ... nor rewrote the policy maps
    iface = after_status.interfaces[0]
    assert iface.program_id == prog_id and iface.link_id == link_id
    assert icmp4_packets(after_status) - before == count  # counters continuous
    # No detach window: every sample while policyd was down or starting saw our program.
    assert seen_while_down
    assert all(s["prog"] == prog_id for s in seen_while_down), seen_while_down
    final = xdp_prog_ids(site.router_ns, "lan0")
    assert final["prog"] == prog_id and final["attached"] == 1  # one program, not stacked


def test_every_daemon_serving_and_idpd_discovered_lab_idp(lab: Lab) -> None:
    for site in lab.spec.sites:
        for daemon in DAEMONS:
            lab.wait_ready(site, daemon, timeout=5)
        with grpc.insecure_channel(socket_target(
                lab.spec.run_dir / site.instance / "idpd.sock")) as channel:
            status = idp_pb2_grpc.IdpServiceStub(channel).Status(idp_pb2.IdpStatusRequest(),
                                                                 timeout=5)
        # idpd in the router namespace reached the IdP across the underlay.
        assert status.issuer == lab.spec.issuer
        assert status.discovery_ok, status.discovery_error


def test_lab_down_removes_exactly_what_up_created(tmp_path: Path) -> None:
    name = unique("d")
    spec = LabSpec(name=name, instance_prefix=f"{name}-", base_dir=tmp_path, with_idp=False,
                   hosts_per_site=1)
    lab = Lab(spec)
    lab.up()
    try:
        created = list(lab.manifest.namespaces)
        pids = [p["pid"] for p in lab.manifest.processes]
        assert len(created) == 7 and len(pids) == 8
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(ns in listed for ns in created)
    finally:
        lab.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in created)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    for site in spec.sites:
        assert not (spec.run_dir / site.instance).exists()
        assert not (spec.bpffs_dir / site.instance).exists()
    assert not spec.lab_dir.exists()
