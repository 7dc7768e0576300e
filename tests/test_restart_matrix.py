"""The restart and upgrade matrix (vpnr.lab.matrix) on the shared lab: every daemon of site
A killed -9, stopped by SIGTERM, and upgraded to another build (a changed BPF program for
policyd and tunneld, a new proto field for all four), under continuous allowed, denied and
tunnel traffic with the underlay captured. Targets: no clear-text leak and no policy
mismatch anywhere; nothing lost and every audit event stored for policyd, auditd and idpd;
tunnel traffic back within 1 s of tunneld answering SERVING. Each case leaves the lab as it
found it (normal build, healthy, tunnel up), so the other lab tests are not disturbed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpnr.lab.lab import Lab
from vpnr.lab.matrix import (
    CASES,
    TUNNEL_BACK_TARGET_S,
    ZERO_LOSS_DAEMONS,
    Matrix,
    Rates,
    daemon_status,
    wait_tunnel,
)
from vpnr.lab.topology import IDP_ADDRESS, LabSpec
from vpnr.lab.traffic import TUNNEL_PORT, DeniedFlow, Traffic, underlay_leaks
from vpnr.v1 import codes_pb2

pytestmark = [pytest.mark.root, pytest.mark.lab]

# Short windows keep the twelve cases near a minute; the rates are the bench's.
RATES = Rates(allowed=100.0, tunnel_in=50.0, denied=20.0, before_s=0.5, after_s=0.8)


@pytest.fixture(scope="module")
def matrix(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    """The matrix on site A of the shared lab; its upgrade build is removed after."""
    running = Matrix(lab, tmp_path_factory.mktemp("matrix"), "a", RATES)
    try:
        yield running
    finally:
        running.close()


@pytest.mark.parametrize(("daemon", "operation"), CASES,
                         ids=[f"{d}-{o}" for d, o in CASES])
def test_restart_case_meets_targets(matrix: Matrix, daemon: str, operation: str) -> None:
    result = matrix.run(daemon, operation)
    print("\n" + json.dumps(result.as_dict(), default=str))
    assert not result.errors
    # The traffic really ran.
    assert all(sent > 0 for sent in result.sent.values()), result.sent
    assert all(d["sent"] > 0 for d in result.denied.values()), result.denied
    # The capture saw the tunnel: one message per datagram that crossed it, at least.
    crossed = sum(result.sent[f] - result.lost[f] for f in ("tunnel-out", "tunnel-in"))
    assert result.tunnel_messages >= crossed > 0
    assert result.duplicates == 0 and result.audit_duplicates == 0

    assert result.leaks == []
    assert result.mismatches == []
    # Every decision the kernel made is stored, whichever daemon restarted (auditd too).
    assert result.audit_expected > 0 and result.audit_lost == 0, result.denied
    assert result.lost["local"] == 0  # the LAN's own traffic never needs tunneld
    if daemon in ZERO_LOSS_DAEMONS:
        assert result.allowed_lost == 0, result.lost
        # The tunnel stayed up: every telnet probe through it met site A's decap program.
        telnet = result.denied["deny-tunnel-telnet"]
        assert telnet["decided"] == telnet["sent"], telnet
    else:
        # Fail closed while tunneld is away, back within the target of SERVING.
        assert result.tunnel_back_s is not None
        assert result.tunnel_back_after_serving_s is not None
        assert result.tunnel_back_after_serving_s <= TUNNEL_BACK_TARGET_S

    ev = result.evidence
    assert ev["pid_changed"]
    if operation != "upgrade":
        assert not ev["new_field"]
        if daemon == "policyd":  # adopted: same program, same links, policy maps untouched
            assert ev["adopted"] and ev["policy_adopted"] and ev["link_ids_kept"]
            assert not ev["program_ids_changed"] and not ev["build_id_changed"]
        if daemon == "tunneld":
            assert ev["decap_adopted"] and not ev["decap_program_changed"]
        return
    # The daemon ran the other build (its reflection showed the new field), then the
    # normal one again.
    assert ev["new_field"] and not ev["restored_fields_have_new"]
    if daemon == "policyd":  # a new program swapped into the pinned links; maps kept
        assert ev["build_id_changed"] and ev["program_tag_changed"]
        assert ev["program_ids_changed"] and ev["link_ids_kept"]
        assert ev["policy_adopted"] and ev["policy_version_kept"]
        assert ev["restored_build_id"]
    if daemon == "tunneld":  # it adopted the new program prepared before the stop
        assert ev["decap_program_changed"] and ev["decap_adopted"] and ev["decap_is_prepared"]


def test_lab_left_as_found(matrix: Matrix) -> None:
    lab = matrix.lab
    wait_tunnel(lab)
    for site in lab.spec.sites:
        for daemon in ("policyd", "tunneld", "auditd", "idpd"):
            lab.wait_ready(site, daemon, timeout=10)
    status = daemon_status(lab, matrix.site, "policyd")
    assert status.kernel_policy_version == status.policy_version
    assert all(i.attached for i in status.interfaces)


def test_probe_that_gets_through_is_seen_as_a_mismatch(matrix: Matrix) -> None:
    # The mismatch detector on real traffic: probes the policy allows (engineer's DNS to
    # the router), declared denied, must all be seen past the XDP program.
    site = matrix.site
    flow = DeniedFlow("allowed-as-denied", "udp", site.host_ns(1), site.host_v4(1),
                      site.router_lan_v4, 53, 50.0, codes_pb2.REASON_RULE_DENY, 0, "a",
                      "xdp", (site.router_ns, "lan0"))
    traffic = Traffic([], [flow], os.urandom(8)).start(deadline_s=10)
    try:
        time.sleep(0.5)
    finally:
        traffic.stop()
    assert len(flow.probes) >= 10
    assert flow.passed == set(flow.probes)


def _ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return b"\x02" * 12 + b"\x08\x00" + ip + struct.pack("!HHHH", sport, dport,
                                                          8 + len(payload), 0) + payload


def test_leak_classifier_on_crafted_frames(tmp_path: Path) -> None:
    spec = LabSpec(name="x", base_dir=tmp_path)
    a, b = spec.sites
    token = os.urandom(8)
    tunnel = _ipv4_udp(a.router_wan_v4, b.router_wan_v4, TUNNEL_PORT, TUNNEL_PORT, b"x" * 40)
    idp = _ipv4_udp(a.router_wan_v4, IDP_ADDRESS, 40000, 9000, b"")
    idp = idp[:23] + b"\x06" + idp[24:]  # TCP to the IdP's port
    clear = _ipv4_udp(a.host_v4(1), b.host_v4(1), 40000, 47801, b"")
    marker = _ipv4_udp(a.router_wan_v4, b.router_wan_v4, TUNNEL_PORT, TUNNEL_PORT, token)
    other = _ipv4_udp(a.router_wan_v4, b.router_wan_v4, 53, 53, b"")
    leaks = underlay_leaks(spec, [tunnel, idp, clear, marker, other], token)
    assert [leak.split(":")[0] for leak in leaks] == ["frame 2", "frame 3", "frame 4"]
