"""Shared fixtures: unique names, temporary router instances, daemons as real processes."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vpnr.core.client import is_serving

BIN = Path(sys.executable).parent
READY_TIMEOUT = 30.0


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

    @property
    def socket(self) -> Path:
        """The daemon's Unix socket."""
        return self.run_dir / self.instance / f"{self.name}.sock"

    def start(self) -> DaemonProcess:
        """Start and wait (bounded) until health says SERVING."""
        argv = [str(BIN / self.name), "--config", str(self.config)]
        if self.netns:
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.socket.exists() and is_serving(self.socket):
                return self
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: {out}")
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
        """Everything the daemon logged (after it stopped)."""
        assert self.proc is not None and self.proc.stdout is not None
        return self.proc.stdout.read().decode()


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
