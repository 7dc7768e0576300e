"""Verifier and kernel failures at start.

- An upgrade whose program the verifier rejects leaves the running program attached and
  deciding; the whole verifier output is saved, Status and ``vpnctl status`` point to it.
- With nothing running, the same rejection refuses the start with the log's path.
- A host without bpffs, kernel headers or BTF gets one clear message naming each missing
  piece. These are real absences from the daemon's point of view: the daemon runs in a
  private mount namespace where bpffs is unmounted and tmpfs covers the headers or BTF.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from conftest import BIN, DaemonProcess, RunningPolicyd, router_toml, unique
from vpnr.v1 import codes_pb2, policy_pb2_grpc
from vpnr.v1 import policy_pb2 as P

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[1]
# Reads a packet byte far past what the program has bounds-checked: the compiler accepts
# it, the verifier refuses it ("invalid access to packet").
BAD_READ = ("\tif (*(volatile __u8 *)(data + 200) == 0x42)\n"
            "\t\treturn XDP_DROP;\n")


def broken_bpf(tmp_path: Path) -> Path:
    """A copy of bpf/ whose XDP entry point the verifier rejects."""
    copy = tmp_path / "bpf-broken"
    shutil.copytree(REPO / "bpf", copy)
    source = copy / "xdp_rbac.c"
    text = source.read_text()
    anchor = "\tint malformed;\n"
    assert anchor in text
    source.write_text(text.replace(anchor, anchor + "\n" + BAD_READ, 1))
    return copy


def start(running: RunningPolicyd, env: dict[str, str] | None = None) -> None:
    running.process = DaemonProcess("policyd", running.config, running.process.run_dir,
                                    running.instance, netns=running.netns, env=env).start()
    running.channel = grpc.insecure_channel(f"unix:{running.process.socket}")
    running.stub = policy_pb2_grpc.PolicyServiceStub(running.channel)


def test_verifier_rejection_keeps_the_running_program_and_saves_the_log(
        policyd: RunningPolicyd, tmp_path: Path) -> None:
    stub = policyd.stub
    stub.CreateRole(P.CreateRoleRequest(role=P.Role(name="eng")))
    stub.CreateBinding(P.CreateBindingRequest(binding=P.Binding(prefix="10.1.0.7/32",
                                                                roles=["eng"])))
    before = stub.Status(P.PolicyStatusRequest())
    old_prog = {i.name: i.program_id for i in before.interfaces}
    assert before.running_build_id == before.build_id and not before.HasField("build_failure")

    policyd.process.stop(signal.SIGTERM)
    policyd.channel.close()
    start(policyd, env={"VPNR_BPF_DIR": str(broken_bpf(tmp_path))})
    status = policyd.stub.Status(P.PolicyStatusRequest())

    # The rejected upgrade changed nothing in the data path.
    assert {i.name: i.program_id for i in status.interfaces} == old_prog
    assert status.running_build_id == before.build_id != status.build_id
    assert status.adopted and status.policy_adopted
    decision = policyd.stub.TestDecision(P.TestDecisionRequest(
        src="10.1.0.7", dst="10.2.0.1", protocol=codes_pb2.PROTOCOL_ICMP, icmp_type=8))
    assert list(decision.roles) == ["eng"]

    # The verifier's own words are saved, and Status says where.
    failure = status.build_failure
    log = Path(failure.log_path)
    assert log.is_file() and log.parent == tmp_path / "state" / "bpf-build"
    text = log.read_text()
    assert "invalid access to packet" in text, text[-2000:]
    assert failure.build_id == status.build_id and failure.at.seconds > 0
    assert failure.error
    warnings = {w.code: w.message for w in status.warnings}
    assert str(log) in warnings["BUILD_REJECTED"]
    daemon_log = policyd.process.output()
    assert "new program rejected; keeping the running one" in daemon_log

    # vpnctl status points the operator at the log.
    shown = subprocess.run(
        [str(BIN / "vpnctl"), "--run-dir", str(policyd.process.run_dir), "--instance",
         policyd.instance, "-o", "json", "status"], capture_output=True, text=True,
        timeout=30, check=False)
    entry = json.loads(shown.stdout)["daemons"]["policyd"]
    assert entry["build_rejected_log"] == str(log)
    assert any(str(log) in w for w in entry["warnings"])

    # Back on the good sources: the upgrade goes through and the warning is gone.
    policyd.process.stop(signal.SIGTERM)
    policyd.channel.close()
    start(policyd)
    healed = policyd.stub.Status(P.PolicyStatusRequest())
    assert not healed.HasField("build_failure")
    assert healed.running_build_id == healed.build_id == before.build_id
    assert "BUILD_REJECTED" not in {w.code for w in healed.warnings}


def test_verifier_rejection_with_nothing_running_refuses_the_start(
        tmp_path: Path, netns: str, instance: str) -> None:
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0"))
    daemon = DaemonProcess("policyd", config, tmp_path / "run", instance, netns=netns,
                           env={"VPNR_BPF_DIR": str(broken_bpf(tmp_path))})
    with pytest.raises(AssertionError, match="exited 1"):
        daemon.start()
    errors = [json.loads(line) for line in daemon.output().splitlines()
              if line.startswith("{") and '"error"' in line]
    assert len(errors) == 1, errors
    message = errors[0]["msg"]
    assert message.startswith("cannot start: cannot build")
    logs = list((tmp_path / "state" / "bpf-build").glob("*.log"))
    assert len(logs) == 1 and str(logs[0]) in message
    assert "invalid access to packet" in logs[0].read_text()
    # Nothing was attached.
    shown = subprocess.run(["ip", "-n", netns, "-d", "link", "show", "lan0"],
                           capture_output=True, text=True, check=True)
    assert "xdp" not in shown.stdout.split("link/ether")[0]


def run_without(netns: str, daemon: str, config: Path, *, bpffs: bool, headers: bool,
                btf: bool) -> subprocess.CompletedProcess[str]:
    """Run a daemon in a private mount namespace with pieces of the host taken away."""
    steps = []
    if not bpffs:
        steps.append("umount /sys/fs/bpf")
    if not headers:
        steps.append(f"mount -t tmpfs vpnr-test /lib/modules/{os.uname().release}")
    if not btf:
        steps.append("mount -t tmpfs vpnr-test /sys/kernel/btf")
    script = " && ".join([*steps, f'exec nsenter --net=/run/netns/{netns} '
                                  f'{BIN / daemon} --config {config}'])
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, text=True, timeout=60, check=False)


def error_lines(output: str) -> list[str]:
    return [json.loads(line)["msg"] for line in output.splitlines()
            if line.startswith("{") and json.loads(line).get("level") == "error"]


def test_missing_bpffs_and_headers_give_one_clear_message(
        tmp_path: Path, netns: str, instance: str) -> None:
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0"))
    run = run_without(netns, "policyd", config, bpffs=False, headers=False, btf=True)
    assert run.returncode == 1, run.stderr
    errors = error_lines(run.stderr)
    assert len(errors) == 1, run.stderr
    message = errors[0]
    assert message.startswith("cannot start: this host cannot run policyd: ")
    assert "bpffs is not mounted at /sys/fs/bpf" in message
    assert f"no kernel headers at /lib/modules/{os.uname().release}/build" in message
    assert "BTF" not in message  # policyd does not need it, and BTF is there
    assert not (Path("/sys/fs/bpf/vpnr") / instance).exists()

    # auditd needs bpffs too.
    run = run_without(netns, "auditd", config, bpffs=False, headers=True, btf=True)
    assert run.returncode == 1
    assert error_lines(run.stderr) == [
        "cannot start: this host cannot run auditd: bpffs is not mounted at /sys/fs/bpf: "
        "pinned programs and maps live there (mount -t bpf bpf /sys/fs/bpf; "
        "deploy/setup-host.sh does it) (docs/troubleshooting.md)"]


def test_missing_btf_stops_tunneld_with_one_clear_message(
        tmp_path: Path, netns: str) -> None:
    instance = unique("i")
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0"))
    run = run_without(netns, "tunneld", config, bpffs=True, headers=True, btf=False)
    assert run.returncode == 1, run.stderr
    errors = error_lines(run.stderr)
    assert errors == ["cannot start: this host cannot run tunneld: the kernel exposes no BTF "
                      "(/sys/kernel/btf/vmlinux is missing): build it with "
                      "CONFIG_DEBUG_INFO_BTF=y (docs/troubleshooting.md)"], run.stderr
    assert not (Path("/sys/fs/bpf/vpnr") / instance).exists()
