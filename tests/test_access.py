"""Who may do what: the admin socket takes every call, the viewer socket only reads (a
change is PERMISSION_DENIED and audited), outsiders reach neither; and the gRPC limits every
daemon server runs with (message size, streams per connection, calls per server, deadlines,
a streaming client that stops reading)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from conftest import BIN, DaemonProcess, local_users, router_toml
from vpnr.core import access
from vpnr.v1 import audit_pb2, audit_pb2_grpc, common_pb2, idp_pb2, policy_pb2, tunnel_pb2

pytestmark = pytest.mark.root

DAEMONS = ("policyd", "tunneld", "auditd", "idpd")
# Per daemon: two reads and one change, as (stub module, service, method, request JSON).
Call = tuple[str, str, str, dict[str, Any]]
READS: dict[str, list[Call]] = {
    "policyd": [("policy", "PolicyService", "Status", {}),
                ("policy", "PolicyService", "ListRoles", {})],
    "tunneld": [("tunnel", "TunnelService", "Status", {}),
                ("tunnel", "TunnelService", "ListPeers", {})],
    "auditd": [("audit", "AuditService", "Status", {}),
               ("audit", "AuditService", "Query", {"page": {"pageSize": 10}})],
    "idpd": [("idp", "IdpService", "Status", {}),
             ("idp", "IdpService", "ListBindings", {})],
}
SECRET_NAME = "bodymarker"  # appears in the refused requests, must not reach the audit
CHANGES: dict[str, Call] = {
    "policyd": ("policy", "PolicyService", "CreateRole", {"role": {"name": SECRET_NAME}}),
    "tunneld": ("tunnel", "TunnelService", "AddPeer", {"peer": {"name": SECRET_NAME}}),
    "auditd": ("audit", "AuditService", "Record",
               {"event": {"daemon": SECRET_NAME, "action": "write"}}),
    "idpd": ("idp", "IdpService", "SyncNow", {}),
}

# Runs as the test's users: each call is [socket, module, service, method, request JSON].
CLIENT = """
import json, sys, grpc, importlib
from google.protobuf import json_format
results = []
for sock, module, service, method, body in json.loads(sys.argv[1]):
    pb2 = importlib.import_module(f"vpnr.v1.{module}_pb2")
    desc = pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    request = json_format.ParseDict(body, getattr(pb2, desc.input_type.name)())
    reply = getattr(pb2, desc.output_type.name)
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        call = channel.unary_unary(f"/vpnr.v1.{service}/{method}",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=reply.FromString)
        try:
            call(request, timeout=10)
            results.append(["OK", ""])
        except grpc.RpcError as exc:
            results.append([exc.code().name, exc.details() or ""])
print(json.dumps(results))
"""

READ_NAME = re.compile(r"^(Status|Get.*|List.*|Query|Follow|Export|Stats|DiffSnapshots|"
                       r"TestDecision|TestConnection|Check|Watch|ServerReflectionInfo)$")


def test_every_rpc_of_every_service_is_classified_by_the_naming_rule() -> None:
    services = [pb2.DESCRIPTOR.services_by_name[name]
                for pb2, name in ((policy_pb2, "PolicyService"), (tunnel_pb2, "TunnelService"),
                                  (audit_pb2, "AuditService"), (idp_pb2, "IdpService"),
                                  (health_pb2, "Health"), (reflection_pb2, "ServerReflection"))]
    methods = {f"/{s.full_name}/{m.name}": m.name for s in services for m in s.methods}
    # The four vpnr services (59), health (Check, Watch, List) and reflection.
    assert len(methods) == 59 + 3 + 1
    # Every method is in the table, and the table names nothing that does not exist.
    assert set(methods) == set(access.METHODS)
    for full, name in methods.items():
        expected = access.READ if READ_NAME.match(name) else access.CHANGE
        assert access.METHODS[full] is expected, full
    # A method the table does not know counts as a change on the viewer socket.
    assert access.access_of("/vpnr.v1.PolicyService/NewThing") is access.CHANGE


@pytest.fixture
def users() -> Iterator[dict[str, str]]:
    with local_users(viewer="vpnr-viewer", admin="vpnr-admin", outsider="") as made:
        yield made


@pytest.fixture
def run_dir(socket_run_dir: Path) -> Path:
    return socket_run_dir


def as_user(user: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": os.environ.get("PATH", ""), "HOME": "/"})


def calls_as(user: str, calls: list[list[Any]]) -> list[list[str]]:
    proc = as_user(user, [sys.executable, "-c", CLIENT, json.dumps(calls)])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def denied_records(auditd: Path) -> list[audit_pb2.AuditRecord]:
    with grpc.insecure_channel(f"unix:{auditd}") as channel:
        answer = audit_pb2_grpc.AuditServiceStub(channel).Query(audit_pb2.QueryRequest(
            filter=audit_pb2.AuditFilter(control_only=True),
            page=common_pb2.PageRequest(page_size=1000)), timeout=10)
    return [r for r in answer.records if r.control.action == access.DENIED_ACTION]


def test_viewer_reads_admin_changes_outsider_reaches_neither(
        tmp_path: Path, netns: str, instance: str, users: dict[str, str],
        run_dir: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0").replace(
        f'run_dir = "{tmp_path}/run"', f'run_dir = "{run_dir}"'))
    sock_dir = run_dir / instance
    admin = {d: str(sock_dir / f"{d}.sock") for d in DAEMONS}
    viewer = {d: str(sock_dir / f"{d}-viewer.sock") for d in DAEMONS}
    daemons = [DaemonProcess(d, config, run_dir, instance, netns=netns) for d in DAEMONS]
    vpnctl = [str(BIN / "vpnctl"), "--run-dir", str(run_dir), "--instance", instance]
    try:
        for daemon in daemons:
            daemon.start()
        modes = {p.name: (oct(p.stat().st_mode & 0o777), p.stat().st_gid)
                 for p in sock_dir.iterdir()}
        # The viewer: reads on the viewer socket, refused changes there, no admin socket.
        viewer_plan = [[viewer[d], *call] for d in DAEMONS for call in READS[d]]
        viewer_plan += [[viewer[d], *CHANGES[d]] for d in DAEMONS]
        viewer_plan += [[admin[d], *READS[d][0]] for d in DAEMONS]
        seen_viewer = calls_as(users["viewer"], viewer_plan)
        # The admin changes state through the admin socket.
        seen_admin = calls_as(users["admin"], [
            [admin["policyd"], "policy", "PolicyService", "CreateRole",
             {"role": {"name": "admin-made"}}],
            [admin["auditd"], *CHANGES["auditd"]]])
        # The outsider reaches neither socket of any daemon.
        seen_outsider = calls_as(users["outsider"], [[s[d], *READS[d][0]] for d in DAEMONS
                                                     for s in (admin, viewer)])
        # vpnctl as a viewer falls back to the viewer socket; --viewer forces it for root.
        show = as_user(users["viewer"], [*vpnctl, "policy", "show", "-o", "json"])
        create = as_user(users["viewer"], [*vpnctl, "role", "create", SECRET_NAME])
        forced = subprocess.run([*vpnctl, "--viewer", "role", "create", SECRET_NAME],
                                capture_output=True, text=True, timeout=60)
        # Denials reach auditd in the background: wait (bounded) for all six.
        deadline = time.monotonic() + 10
        records = denied_records(Path(admin["auditd"]))
        while len(records) < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
            records = denied_records(Path(admin["auditd"]))
        time.sleep(0.3)  # and no more than six
        records = denied_records(Path(admin["auditd"]))
    finally:
        for daemon in daemons:
            if daemon.proc is not None:
                daemon.stop()

    for d in DAEMONS:
        assert modes[f"{d}.sock"][0] == "0o660" and modes[f"{d}-viewer.sock"][0] == "0o660"
        assert modes[f"{d}-viewer.sock"][1] == int(
            subprocess.run(["getent", "group", "vpnr-viewer"], capture_output=True,
                           text=True, check=True).stdout.split(":")[2])
    reads, changes, admin_sock = seen_viewer[:8], seen_viewer[8:12], seen_viewer[12:]
    assert all(code == "OK" for code, _ in reads), json.dumps(reads)
    for d, (code, details) in zip(DAEMONS, changes, strict=True):
        method = f"/vpnr.v1.{CHANGES[d][1]}/{CHANGES[d][2]}"
        assert code == "PERMISSION_DENIED", (d, code, details)
        assert method in details and "viewer socket is read-only" in details, details
        assert "admin" in details, details
    for code, details in admin_sock:
        assert code == "UNAVAILABLE" and "Permission denied" in details, (code, details)
    assert seen_admin == [["OK", ""], ["OK", ""]], seen_admin
    for code, details in seen_outsider:
        assert code == "UNAVAILABLE" and "Permission denied" in details, (code, details)

    assert show.returncode == 0, show.stderr
    assert "admin-made" in show.stdout, show.stdout  # the role the admin created
    for refused in (create, forced):
        assert refused.returncode != 0
        assert "PERMISSION_DENIED" in refused.stderr and "read-only" in refused.stderr, \
            refused.stderr

    # One access.denied control record per refused call: the four direct calls, the
    # viewer's vpnctl role create and root's --viewer role create (both policyd).
    by_daemon = sorted(r.control.daemon for r in records)
    assert by_daemon == sorted([*DAEMONS, "policyd", "policyd"]), records
    for record in records:
        detail = json.loads(record.control.detail_json)
        assert detail["socket"] == viewer[record.control.daemon]
        assert detail["method"] in {f"/vpnr.v1.{c[1]}/{c[2]}" for c in CHANGES.values()}
        assert not record.control.success
        assert SECRET_NAME not in str(record)  # the request body is never recorded


# -- limits ---------------------------------------------------------------------------


@pytest.fixture
def auditd(tmp_path: Path, netns: str, instance: str) -> Iterator[DaemonProcess]:
    """auditd alone, committing every 2 ms."""
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0")
                      + "[auditd]\nbatch_interval_ms = 2\n")
    daemon = DaemonProcess("auditd", config, tmp_path / "run", instance, netns=netns).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def status_of(channel: grpc.Channel, timeout: float = 5) -> audit_pb2.AuditStatus:
    answer: audit_pb2.AuditStatus = audit_pb2_grpc.AuditServiceStub(channel).Status(
        audit_pb2.AuditStatusRequest(), timeout=timeout)
    return answer


def record(stub: audit_pb2_grpc.AuditServiceStub, detail: str = "{}") -> int:
    answer = stub.Record(audit_pb2.RecordRequest(event=audit_pb2.ControlEvent(
        daemon="test", action="test.note", detail_json=detail)), timeout=5)
    return int(answer.id)


def test_big_messages_and_deadlines(auditd: DaemonProcess) -> None:
    with grpc.insecure_channel(f"unix:{auditd.socket}") as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        # 17 MiB is over the 16 MiB limit: refused, and the daemon carries on.
        with pytest.raises(grpc.RpcError) as big:
            stub.Record(audit_pb2.RecordRequest(event=audit_pb2.ControlEvent(
                daemon="test", action="x" * (17 << 20))), timeout=30)
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, big.value
        assert status_of(channel).daemon.daemon == "auditd"
        # A Follow with a 1 s deadline and nothing to send ends at the deadline.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            list(stub.Follow(audit_pb2.FollowRequest(), timeout=1))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2
        assert record(stub) > 0
        assert status_of(channel, timeout=2).records >= 1


def test_streams_per_connection_queue_and_calls_per_server_are_refused(
        auditd: DaemonProcess) -> None:
    target = f"unix:{auditd.socket}"
    per_conn = access.MAX_STREAMS_PER_CONNECTION
    # A local subchannel pool: one connection per channel (by default they share one).
    channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(6)]
    streams: list[Any] = []
    try:
        writer = audit_pb2_grpc.AuditServiceStub(channels[-1])
        # Connection 0 full of Follow streams: each gets the next record, so all are live.
        first = [audit_pb2_grpc.AuditServiceStub(channels[0]).Follow(
            audit_pb2.FollowRequest(), timeout=60) for _ in range(per_conn)]
        streams += first
        time.sleep(0.5)
        record(writer)
        assert all(len(next(s).records) == 1 for s in first)
        # One more call on that connection waits for a free stream (it queues) ...
        with pytest.raises(grpc.RpcError) as queued:
            status_of(channels[0], timeout=1)
        assert queued.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # ... while another connection is served at once.
        assert status_of(channels[1], timeout=2).daemon.daemon == "auditd"
        first.pop().cancel()
        assert status_of(channels[0], timeout=5).daemon.daemon == "auditd"

        # Calls in progress per server: fill up to the limit with Follow streams on four
        # connections, then the next call anywhere is RESOURCE_EXHAUSTED.
        live = len(first)
        more: list[Any] = []
        for i in range(1, 5):
            follower = audit_pb2_grpc.AuditServiceStub(channels[i])
            for _ in range(min(per_conn, access.MAX_CONCURRENT_RPCS - live)):
                more.append(follower.Follow(audit_pb2.FollowRequest(), timeout=60))
                live += 1
        streams += more
        assert live == access.MAX_CONCURRENT_RPCS
        refused = None
        deadline = time.monotonic() + 5
        while refused is None and time.monotonic() < deadline:
            try:
                status_of(channels[5], timeout=2)
                time.sleep(0.1)  # some streams may not have reached the server yet
            except grpc.RpcError as exc:
                refused = exc
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # One call ends: there is room again.
        more.pop().cancel()
        answered = None
        deadline = time.monotonic() + 5
        while answered is None and time.monotonic() < deadline:
            try:
                answered = status_of(channels[5], timeout=2)
            except grpc.RpcError:
                time.sleep(0.1)
        assert answered is not None and answered.daemon.daemon == "auditd"
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()


def test_a_follow_client_that_never_reads_is_cut_off(auditd: DaemonProcess) -> None:
    target = f"unix:{auditd.socket}"
    # A fixed 64 KiB window (no BDP probe): the stalled client's window fills for sure.
    stalled_channel = grpc.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)])
    channel = grpc.insecure_channel(target)
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    stalled = audit_pb2_grpc.AuditServiceStub(stalled_channel).Follow(
        audit_pb2.FollowRequest(), timeout=60)
    reading = stub.Follow(audit_pb2.FollowRequest(), timeout=60)
    received: list[int] = []

    def read() -> None:
        try:
            for message in reading:
                received.extend(r.id for r in message.records)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        time.sleep(0.5)
        pad = json.dumps({"pad": "x" * 60_000})
        ids = [record(stub, pad) for _ in range(40)]  # 2.4 MB the stalled client never reads
        # The daemon keeps taking records and feeding the reading client while the write
        # to the stalled one is blocked, and past the write timeout.
        slowest = 0.0
        end = time.monotonic() + access.WRITE_TIMEOUT_SECONDS + 2
        while time.monotonic() < end:
            started = time.monotonic()
            ids.append(record(stub))
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.5)
        wait_until = time.monotonic() + 5
        while ids[-1] not in received and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert slowest < 1.0
        assert received[-len(ids):] == ids
        # The stalled client, reading at last, learns it was cut off.
        with pytest.raises(grpc.RpcError) as cut:
            for _ in stalled:
                pass
        assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "did not read" in (cut.value.details() or "")
        assert "cut off" in auditd.output()
    finally:
        reading.cancel()
        stalled.cancel()
        reader.join(10)
        channel.close()
        stalled_channel.close()
