"""Each daemon starts in a temporary instance, serves health, reflection and Status, and
stops cleanly on SIGTERM with its socket removed."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from idp_server import running_idp

from conftest import BIN, DaemonProcess, router_toml
from vpnr.core.client import is_serving, socket_target
from vpnr.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    idp_pb2,
    idp_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    tunnel_pb2,
    tunnel_pb2_grpc,
)

SERVICES: dict[str, tuple[str, Any, Any]] = {
    "policyd": ("vpnr.v1.PolicyService", policy_pb2_grpc.PolicyServiceStub,
                policy_pb2.PolicyStatusRequest),
    "tunneld": ("vpnr.v1.TunnelService", tunnel_pb2_grpc.TunnelServiceStub,
                tunnel_pb2.TunnelStatusRequest),
    "auditd": ("vpnr.v1.AuditService", audit_pb2_grpc.AuditServiceStub,
               audit_pb2.AuditStatusRequest),
    "idpd": ("vpnr.v1.IdpService", idp_pb2_grpc.IdpServiceStub, idp_pb2.IdpStatusRequest),
}


@pytest.mark.root
@pytest.mark.parametrize("daemon", list(SERVICES))
def test_daemon_lifecycle(daemon: str, tmp_path: Path, netns: str, instance: str) -> None:
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0"))
    # tunneld works on policyd's pinned maps (XSK map, session map): policyd comes first.
    policyd = DaemonProcess("policyd", config, tmp_path / "run", instance,
                            netns=netns).start() if daemon == "tunneld" else None
    proc = DaemonProcess(daemon, config, tmp_path / "run", instance, netns=netns).start()
    service, stub_cls, request_cls = SERVICES[daemon]
    try:
        # Socket modes: root and the admin group only (the viewer socket: the viewer
        # group); anyone may enter the directory, the socket files carry the protection.
        assert stat.S_IMODE(proc.socket.stat().st_mode) == 0o660
        viewer = proc.socket.with_name(f"{daemon}-viewer.sock")
        assert stat.S_IMODE(viewer.stat().st_mode) == 0o660
        assert stat.S_IMODE(proc.socket.parent.stat().st_mode) & 0o005 == 0o005
        with grpc.insecure_channel(socket_target(proc.socket)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert {service, "grpc.health.v1.Health"} <= services
            status = stub_cls(channel).Status(request_cls(), timeout=10)
        assert status.daemon.daemon == daemon
        assert status.daemon.instance == instance
        assert status.daemon.uptime_seconds > 0
        assert status.daemon.socket_path == str(proc.socket)
    finally:
        code = proc.stop()
        if policyd is not None:
            policyd.stop()
    assert code == 0, proc.output()
    assert not proc.socket.exists()
    assert '"msg": "stopped"' in proc.output()


def status_once(daemon: str, tmp_path: Path, instance: str, netns: str | None = None,
                extra_config: str = "") -> Any:
    """Start a daemon, take one Status answer, stop it cleanly."""
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0" if netns else "lo",
                                  extra=extra_config))
    policyd = DaemonProcess("policyd", config, tmp_path / "run", instance,
                            netns=netns).start() if daemon == "tunneld" else None
    proc = DaemonProcess(daemon, config, tmp_path / "run", instance, netns=netns).start()
    _, stub_cls, request_cls = SERVICES[daemon]
    try:
        with grpc.insecure_channel(socket_target(proc.socket)) as channel:
            return stub_cls(channel).Status(request_cls(), timeout=10)
    finally:
        assert proc.stop() == 0
        if policyd is not None:
            assert policyd.stop() == 0


@pytest.mark.root
def test_policyd_status_reports_attached_program(tmp_path: Path, netns: str,
                                                 instance: str) -> None:
    status = status_once("policyd", tmp_path, instance, netns)
    (iface,) = status.interfaces
    assert iface.name == "lan0" and iface.attached
    assert iface.attach_mode == "native"
    assert iface.program_id > 0 and iface.instructions > 0
    assert not status.adopted  # first start builds
    assert status.pin_dir == f"/sys/fs/bpf/vpnr/{instance}"
    assert (Path(status.pin_dir) / "link_xdp_lan0").exists()


@pytest.mark.root
def test_tunneld_reports_probe_and_datapath(tmp_path: Path, netns: str, instance: str) -> None:
    status = status_once("tunneld", tmp_path, instance, netns)
    assert status.probe.af_xdp
    assert status.probe.bpf_crypto_kfuncs
    # This kernel's kfuncs take plain skciphers only; ChaCha20-Poly1305 is refused.
    assert any("aes" in c for c in status.probe.kfunc_ciphers_accepted)
    assert any("chacha20,poly1305" in c for c in status.probe.kfunc_ciphers_refused)
    assert status.datapath_mode == "afxdp-userspace-aead"
    assert status.datapath_reason
    # The data path is open: an AF_XDP socket on the LAN, the decap TAP with its program.
    assert list(status.lan_interfaces) == ["lan0"]
    assert status.decap_interface == "vpnr0" and status.decap_program_id > 0
    assert status.inner_mtu == 1440  # lan0's 1500 minus 60 bytes of tunnel overhead
    assert len(status.public_key) == 44 and not status.peers


@pytest.mark.root
def test_tunneld_without_policyd_says_so(tmp_path: Path, netns: str, instance: str) -> None:
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0"))
    argv = ["nsenter", f"--net=/run/netns/{netns}", str(BIN / "tunneld"), "--config",
            str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "start policyd first" in done.stderr


@pytest.mark.root
def test_auditd_opens_store_and_records(tmp_path: Path, instance: str) -> None:
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path))
    proc = DaemonProcess("auditd", config, tmp_path / "run", instance).start()
    try:
        with grpc.insecure_channel(socket_target(proc.socket)) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            before = stub.Status(audit_pb2.AuditStatusRequest(), timeout=5)
            reply = stub.Record(audit_pb2.RecordRequest(event=audit_pb2.ControlEvent(
                daemon="test", action="test.record", actor="uid:0", success=True,
                detail_json='{"k": 1}')), timeout=5)
            after = stub.Status(audit_pb2.AuditStatusRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as bad:
                stub.Record(audit_pb2.RecordRequest(event=audit_pb2.ControlEvent(
                    daemon="test", action="x", detail_json="{oops")), timeout=5)
    finally:
        assert proc.stop() == 0
    assert before.database == str(tmp_path / "state" / "audit.sqlite")
    assert Path(before.database).exists()
    assert before.schema_version == 2  # catalog + chunk files
    assert reply.id > 0
    assert after.records == before.records + 1
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "detail_json" in (bad.value.details() or "")


@pytest.mark.root
def test_second_instance_of_a_daemon_is_refused(tmp_path: Path, instance: str) -> None:
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path))
    first = DaemonProcess("auditd", config, tmp_path / "run", instance).start()
    try:
        second = subprocess.run([str(BIN / "auditd"), "--config", str(config)],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "already serving" in second.stderr
        assert first.socket.exists() and is_serving(first.socket)
    finally:
        assert first.stop() == 0


def test_a_failure_after_start_exits_1_and_releases_everything(tmp_path: Path,
                                                               instance: str) -> None:
    """A metrics port another process holds fails the start after the app started (its
    store and drain are running): the daemon must say why in one line, stop what it started
    and exit 1 promptly (so systemd restarts it), leaving no socket behind."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, extra=f"[auditd]\nmetrics_port = {port}\n"))
    try:
        run = subprocess.run([str(BIN / "auditd"), "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert run.returncode == 1, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    errors = [line["msg"] for line in lines if line["level"] == "error"]
    assert errors == [f"cannot start: cannot serve metrics on 127.0.0.1:{port}: "
                      "Address already in use"], run.stderr
    sockets = tmp_path / "run" / instance
    assert not list(sockets.glob("*.sock")), list(sockets.iterdir())


EXAMPLE_IDP_DATA = Path(__file__).resolve().parents[1] / "deploy" / "idp" / "example-data.json"


@pytest.mark.root
def test_idpd_fetches_discovery_from_real_idp(tmp_path: Path, instance: str) -> None:
    data = json.loads(EXAMPLE_IDP_DATA.read_text())
    with running_idp(tmp_path / "idp", data) as idp:
        status = status_once("idpd", tmp_path, instance,
                             extra_config=f'[idpd]\nissuer = "{idp.issuer}"\nclient_id = "x"\n')
    assert status.issuer == idp.issuer
    assert status.discovery_ok, status.discovery_error
    assert status.discovery_fetched_at.seconds > 0
    endpoints = dict(e.split("=", 1) for e in status.discovered_endpoints)
    assert endpoints["device_authorization_endpoint"].startswith(idp.issuer)
    assert endpoints["jwks_uri"].startswith(idp.issuer)


@pytest.mark.root
def test_idpd_reports_issuer_mismatch_and_keeps_serving(tmp_path: Path, instance: str) -> None:
    data = json.loads(EXAMPLE_IDP_DATA.read_text())
    with running_idp(tmp_path / "idp", data) as idp:
        # Same server under another name: its discovery document names a different issuer.
        assert idp.issuer.startswith("http://127.0.0.1:")
        wrong = idp.issuer.replace("127.0.0.1", "localhost")
        status = status_once("idpd", tmp_path, instance,
                             extra_config=f'[idpd]\nissuer = "{wrong}"\nclient_id = "x"\n')
    assert not status.discovery_ok
    assert f"names issuer {idp.issuer!r}, configured issuer is {wrong!r}" in \
        status.discovery_error


@pytest.mark.root
def test_idpd_unreachable_idp_is_reported_not_fatal(tmp_path: Path, instance: str) -> None:
    # Port 9 on loopback: nothing listens there, the connection is refused at once.
    status = status_once("idpd", tmp_path, instance,
                         extra_config='[idpd]\nissuer = "http://127.0.0.1:9"\nclient_id = "x"\n'
                                      "discovery_timeout_seconds = 2.0\n")
    assert not status.discovery_ok
    assert "cannot fetch http://127.0.0.1:9/.well-known/openid-configuration" in \
        status.discovery_error
