"""A local user who is neither root nor in the admin group cannot change state through any
daemon socket; a member of the admin group can reach them (so the test can fail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DaemonProcess, local_users, router_toml

pytestmark = pytest.mark.root

# One state-changing call per daemon: (daemon, stub module, stub, method, request JSON)
CALLS = [
    ("policyd", "policy", "PolicyServiceStub", "CreateRole", {"role": {"name": "x"}}),
    ("tunneld", "tunnel", "TunnelServiceStub", "AddPeer", {"peer": {"name": "x"}}),
    ("auditd", "audit", "AuditServiceStub", "Record",
     {"event": {"daemon": "intruder", "action": "write"}}),
    ("idpd", "idp", "IdpServiceStub", "SyncNow", {}),
]

CLIENT = """
import json, sys, grpc, importlib
from google.protobuf import json_format
run_dir, instance = sys.argv[1], sys.argv[2]
results = {}
for daemon, module, stub_name, method, body in json.loads(sys.argv[3]):
    pb2 = importlib.import_module(f"vpnr.v1.{module}_pb2")
    grpc_mod = importlib.import_module(f"vpnr.v1.{module}_pb2_grpc")
    with grpc.insecure_channel(f"unix:{run_dir}/{instance}/{daemon}.sock") as channel:
        fn = getattr(getattr(grpc_mod, stub_name)(channel), method)
        input_type = pb2.DESCRIPTOR.services_by_name[stub_name[:-4]].methods_by_name[method]
        cls = getattr(pb2, input_type.input_type.name)
        try:
            fn(json_format.ParseDict(body, cls()), timeout=5)
            results[daemon] = ["OK", ""]
        except grpc.RpcError as exc:
            results[daemon] = [exc.code().name, exc.details() or ""]
print(json.dumps(results))
"""


@pytest.fixture
def users() -> Iterator[dict[str, str]]:
    with local_users(outsider="", admin="vpnr-admin") as made:
        yield made


@pytest.fixture
def run_dir(socket_run_dir: Path) -> Path:
    return socket_run_dir


def call_as(user: str, run_dir: Path, instance: str) -> dict[str, list[str]]:
    proc = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", sys.executable,
         "-c", CLIENT, str(run_dir), instance, json.dumps(CALLS)],
        capture_output=True, text=True, timeout=60, cwd="/", env={
            "PATH": os.environ.get("PATH", ""), "HOME": "/"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_non_admin_cannot_change_state(tmp_path: Path, netns: str, instance: str,
                                       users: dict[str, str], run_dir: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0").replace(
        f'run_dir = "{tmp_path}/run"', f'run_dir = "{run_dir}"'))
    daemons = [DaemonProcess(d, config, run_dir, instance, netns=netns) for d, *_ in CALLS]
    try:
        for daemon in daemons:
            daemon.start()
        outsider = call_as(users["outsider"], run_dir, instance)
        admin = call_as(users["admin"], run_dir, instance)
    finally:
        for daemon in daemons:
            if daemon.proc is not None:
                daemon.stop()
    for name, (code, details) in outsider.items():
        assert code == "UNAVAILABLE", (name, code, details)
        assert "Permission denied" in details, (name, details)
    # The admin group reaches every daemon; auditd really stores the record.
    assert all(code != "UNAVAILABLE" for code, _ in admin.values()), admin
    assert admin["auditd"][0] == "OK"
