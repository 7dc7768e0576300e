"""Cold start to SERVING and steady RSS of each daemon.

Each daemon is started fresh in its own network namespace and instance (policyd on a new
veth, so its bcc compile is included), timed from exec until its health check answers
SERVING, then left to settle and its resident set size read from /proc. Prints a table and,
as the last line, JSON: {"daemons": {name: {"cold_start_s", "rss_mb"}}, "targets": {...}}.

Run as root: .venv/bin/python bench/startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vpnr.core.client import is_serving

BIN = Path(sys.executable).parent
DAEMONS = ("policyd", "tunneld", "auditd", "idpd")
TARGET_START_S = {"policyd": 3.0, "tunneld": 1.0, "auditd": 1.0, "idpd": 1.0}
TARGET_RSS_MB = 120.0
SETTLE_S = 2.0


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_run(daemon: str) -> tuple[float, float]:
    """Start one daemon cold; returns (seconds to SERVING, RSS MiB after settling)."""
    name = f"b{secrets.token_hex(3)}"
    tmp = Path(tempfile.mkdtemp(prefix="vpnr-bench-"))
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "lan0", "type", "veth", "peer",
                        "name", "peer0"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lan0", "up"], check=True)
        config = tmp / "router.toml"
        config.write_text(
            f'[router]\ninstance = "{name}"\nrun_dir = "{tmp}/run"\n'
            f'state_dir = "{tmp}/state"\n'
            '[policyd]\ninterfaces = [{name = "lan0", zone = "internal"}]\n')
        sock = tmp / "run" / name / f"{daemon}.sock"
        started = time.monotonic()
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{name}", str(BIN / daemon),
                                 "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = started + 30
            while time.monotonic() < deadline:
                if sock.exists() and is_serving(sock, timeout=0.5):
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"{daemon} exited with {proc.returncode}")
                time.sleep(0.01)
            else:
                raise RuntimeError(f"{daemon} not SERVING in 30 s")
            elapsed = time.monotonic() - started
            time.sleep(SETTLE_S)
            return elapsed, rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(15)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        pins = Path("/sys/fs/bpf/vpnr") / name
        if pins.exists():
            for pin in pins.iterdir():
                pin.unlink()
            pins.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    """Measure every daemon ``--runs`` times; print medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for daemon in DAEMONS:
        runs = [one_run(daemon) for _ in range(args.runs)]
        results[daemon] = {
            "cold_start_s": round(statistics.median(r[0] for r in runs), 3),
            "rss_mb": round(statistics.median(r[1] for r in runs), 1),
        }
        met = (results[daemon]["cold_start_s"] < TARGET_START_S[daemon]
               and results[daemon]["rss_mb"] < TARGET_RSS_MB)
        print(f"{daemon:8} cold start {results[daemon]['cold_start_s']:6.3f} s "
              f"(target < {TARGET_START_S[daemon]} s)  RSS {results[daemon]['rss_mb']:6.1f} MB "
              f"(target < {TARGET_RSS_MB} MB)  {'ok' if met else 'MISSED'}")
    print(json.dumps({"daemons": results, "runs": args.runs,
                      "targets": {"cold_start_s": TARGET_START_S, "rss_mb": TARGET_RSS_MB}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
