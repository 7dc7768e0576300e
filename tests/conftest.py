"""Shared fixtures: unique names, temporary router instances, daemons as real processes."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from vpnr.core.client import is_serving
from vpnr.lab.lab import Lab
from vpnr.lab.topology import LabSpec, Site
from vpnr.v1 import policy_pb2_grpc

BIN = Path(sys.executable).parent
READY_TIMEOUT = 90.0  # bcc compiles the program at first start: slow on a loaded host


def unique(prefix: str = "t") -> str:
    """A short name no other run uses at the same time."""
    return f"{prefix}{os.getpid() % 10000}{secrets.token_hex(2)}"


def router_toml(instance: str, tmp: Path, interface: str = "lo", extra: str = "") -> str:
    """A valid router config for a temporary instance under ``tmp``."""
    return (
        "[router]\n"
        f'instance = "{instance}"\n'
        f'run_dir = "{tmp}/run"\n'
        f'state_dir = "{tmp}/state"\n'
        'admin_group = "vpnr-admin"\n'
        "[policyd]\n"
        f'interfaces = [{{name = "{interface}", zone = "internal"}}]\n'
        + extra
    )


@dataclass
class DaemonProcess:
    """One daemon started by a test, stopped by the test."""

    name: str
    config: Path
    run_dir: Path
    instance: str
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path = Path("/dev/null")
    env: dict[str, str] | None = None  # extra environment variables

    @property
    def socket(self) -> Path:
        """The daemon's Unix socket."""
        return self.run_dir / self.instance / f"{self.name}.sock"

    def start(self) -> DaemonProcess:
        """Start and wait (bounded) until health says SERVING."""
        argv = [str(BIN / self.name), "--config", str(self.config)]
        if self.netns:
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", *argv]
        # A file, not a pipe: nobody reads a pipe until the daemon stops, and a full pipe
        # would freeze the daemon on its next log line.
        self.log = self.run_dir.parent / f"{self.name}-{self.instance}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            env = {**os.environ, **self.env} if self.env else None
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.socket.exists() and is_serving(self.socket):
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: "
                                     f"{self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"{self.name} not SERVING after {READY_TIMEOUT} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the daemon and wait for it; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        """Everything the daemon logged so far."""
        return self.log.read_text(errors="replace")


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with a veth pair lan0/peer0 (both up), removed after."""
    name = unique("vt")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "lan0", "type", "veth", "peer", "name", "peer0"],
                    ["ip", "link", "set", "lan0", "up"], ["ip", "link", "set", "peer0", "up"]):
            subprocess.run(["ip", "-n", name, *cmd[1:]], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[str]:
    """A unique instance name; its bpffs pins are removed after the test."""
    name = unique("i")
    yield name
    pins = Path("/sys/fs/bpf/vpnr") / name
    if pins.exists():
        for pin in pins.iterdir():
            pin.unlink()
        pins.rmdir()


@dataclass
class RunningPolicyd:
    """A real policyd serving in its own network namespace (interface lan0, zone internal;
    wan0 with zone external when the fixture asks for it), and a stub on its socket."""

    process: DaemonProcess
    netns: str
    instance: str
    channel: grpc.Channel
    stub: policy_pb2_grpc.PolicyServiceStub
    config: Path

    @property
    def pin_dir(self) -> Path:
        """The instance's pins."""
        return Path("/sys/fs/bpf/vpnr") / self.instance

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop (by ``sig``) and start again, as an operator or a crash would."""
        self.process.stop(sig)
        self.channel.close()
        self.process = DaemonProcess("policyd", self.config, self.process.run_dir,
                                     self.instance, netns=self.netns).start()
        self.channel = grpc.insecure_channel(f"unix:{self.process.socket}")
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)


def start_policyd(tmp_path: Path, netns: str, instance: str) -> RunningPolicyd:
    """Add wan0 to ``netns`` (which has lan0) and start policyd on both."""
    for cmd in (["link", "add", "wan0", "type", "veth", "peer", "name", "wanpeer0"],
                ["link", "set", "wan0", "up"], ["link", "set", "wanpeer0", "up"]):
        subprocess.run(["ip", "-n", netns, *cmd], check=True)
    config = tmp_path / "router.toml"
    config.write_text(
        "[router]\n"
        f'instance = "{instance}"\n'
        f'run_dir = "{tmp_path}/run"\n'
        f'state_dir = "{tmp_path}/state"\n'
        "[policyd]\n"
        'interfaces = [{name = "lan0", zone = "internal"}, {name = "wan0", zone = "external"}]\n')
    process = DaemonProcess("policyd", config, tmp_path / "run", instance, netns=netns).start()
    channel = grpc.insecure_channel(f"unix:{process.socket}")
    return RunningPolicyd(process, netns, instance, channel,
                          policy_pb2_grpc.PolicyServiceStub(channel), config)


@pytest.fixture
def policyd(tmp_path: Path, netns: str, instance: str) -> Iterator[RunningPolicyd]:
    """policyd on lan0 (internal) and wan0 (external) of a fresh namespace."""
    running = start_policyd(tmp_path, netns, instance)
    try:
        yield running
    finally:
        running.channel.close()
        running.process.stop()


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One two-site lab (3 hosts per site, real IdP) shared by the lab tests of a run."""
    name = unique("l")
    spec = LabSpec(name=name, instance_prefix=f"{name}-",
                   base_dir=tmp_path_factory.mktemp("lab"), with_idp=True, hosts_per_site=3,
                   syslog=True)
    running = Lab(spec)
    try:
        running.up()
        yield running
    finally:
        running.down()


def ns_exec(ns: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a command in a lab namespace (network only: the host's bpffs stays visible)."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False)


def ns_ping(ns: str, dst: str, count: int = 1) -> bool:
    """Do echo requests from namespace ``ns`` get answers?"""
    return ns_exec(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "1", dst).returncode == 0


NETPROBE = str(Path(__file__).with_name("netprobe.py"))


@contextlib.contextmanager
def router_echo(site: Site) -> Iterator[Site]:
    """netprobe's echo servers on ``site``'s router LAN addresses while the block runs."""
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{site.router_ns}", sys.executable,
                             NETPROBE, "serve", site.router_lan_v4, site.router_lan_v6],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        yield site
    finally:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def local_users(**roles: str) -> Iterator[dict[str, str]]:
    """Throwaway system users, one per role (value: comma-separated groups, "" for none),
    deleted afterwards by name, also when a test fails."""
    made: dict[str, str] = {}
    try:
        for role, groups in roles.items():
            name = unique("vu")
            argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name]
            if groups:
                argv[1:1] = ["--groups", groups]
            subprocess.run(argv, check=True)
            made[role] = name
        yield made
    finally:
        for name in made.values():
            subprocess.run(["userdel", name], check=False)


@pytest.fixture
def socket_run_dir() -> Iterator[Path]:
    """A run dir under /run (not the root-only pytest tmp dir), so that only the socket modes
    protect the daemons' sockets; removed afterwards."""
    path = Path("/run") / unique("vpnrsock")
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
