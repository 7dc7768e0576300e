"""Audit pipeline: kernel events at steady rates -> auditd -> SQLite and Follow.

A real policyd and auditd are started for a fresh instance in a fresh network namespace
(veth lan0, zone internal; its peer stays down, so no other traffic reaches the program).
policyd audits every denied packet with no rate limit that could bite (``audit_allow_sample
= 0``, ``audit_events_per_second`` and ``audit_burst`` 100,000,000) into a ring of
``--ring-mib`` MiB (8, the product default). auditd runs with its product defaults: SQLite
plus the JSON lines file (``--no-json`` turns the file off to measure SQLite alone), syslog
off, and a Prometheus endpoint on loopback in its namespace. The policy binds 10.1.0.10/32
to one role with one rule (ALLOW TCP 80); every frame the bench makes goes to TCP port 81,
so every one is DEFAULT_DENY and becomes exactly one audit event.

Events are made in the kernel by the live, pinned ``xdp_rbac_prog`` through
BPF_PROG_TEST_RUN (``repeat=K``) in a separate generator process (spawned: it shares no GIL
with the measuring client). It paces against CLOCK_MONOTONIC: every 1 ms tick it runs as
many repetitions as the target rate asks by now, so it catches up after a stall with a
bigger call; it reports the rate it achieved. It is not pinned by default (``--gen-cpu``):
pinned to one of the two CPUs it lagged its schedule more and auditd drained no faster.

Each step (one target rate for ``--duration`` seconds) starts when auditd is idle (ring
released, no rows queued, every sealed chunk indexed) and counts:

- *generated*: what the generator asked for; cross-checked with the kernel's ``audit_lost``
  per-CPU counters (emitted, ring reserve failures, rate limited), read before and after;
- *stored*: the delta of Status.records (auditd's count of rows in SQLite), once auditd has
  caught up (Status polled every 50 ms until stored reaches the kernel's emitted count with
  the ring released and nothing queued, bounded at 30 s, or 5 s without progress);
- losses by cause: reserve failures and rate limiting (kernel), ``sink_sqlite_dropped``
  and ``sink_json_dropped`` (Status.lost_by_cause deltas).

Zero loss: stored == generated == emitted, no reserve failure, nothing rate limited,
nothing dropped from SQLite. (JSON drops are shown beside it.) A 5 s step can be
loss-free while auditd falls behind, since auditd queues up to a million rows in memory;
so the table also shows when everything was stored relative to the generator's end
(*catch-up*), the largest backlog, and auditd's CPU. *Kept up* means zero loss and a
catch-up under 1 s. The ladder (``--rates``) stops after the first step with loss or whose
generator missed its rate by more than 5%.

Latency (before the ladder, on a fresh store): two steps at ``--latency-rate`` events/s,
so that neither measuring client loads the other's figure:

- kernel -> Follow: a Follow stream (src 10.1.0.10/32) read by a thread of this process
  (``--follow-process``: by grpc.aio in a process of its own instead); for each record,
  ``time.monotonic_ns()`` on arrival minus the event's ``kernel_time_ns``
  (bpf_ktime_get_ns: CLOCK_MONOTONIC, the same clock);
- kernel -> SQLite, measured here: a separate process polls the newest chunk file
  read-only (``SELECT id, kernel_ns FROM records WHERE id > last``) every 0.5 ms (the
  achieved interval is printed) and takes, for each newly visible row, the poll's
  completion time minus kernel_ns: an upper bound within one poll interval;
- kernel -> SQLite, auditd's own figure: ``vpnr_audit_kernel_to_store_seconds`` quantiles
  from its /metrics (computed by auditd at commit time for the first and last row of
  each of its recent commits), scraped from inside its namespace after that step.

Targets (issue): at least 200,000 events/s stored with zero loss; kernel -> Follow p99
under 10 ms at 10,000 events/s. Prints tables, a summary, and as the last line one JSON
object with every figure. ``--profile FILE`` records auditd with py-spy (raw collapsed
stacks, per thread) during the ladder.

Run as root: .venv/bin/python bench/audit_pipeline.py [--quick] [--no-json] [--rates ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import ipaddress
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import benchstats
import grpc

from vpnr.core import bpfsys, netns
from vpnr.core.client import is_serving, socket_target
from vpnr.policyd import layout, testrun
from vpnr.v1 import audit_pb2, audit_pb2_grpc, codes_pb2, policy_pb2, policy_pb2_grpc

BIN = Path(sys.executable).parent
PIN_ROOT = Path("/sys/fs/bpf/vpnr")
READY_TIMEOUT_S = 90.0   # policyd compiles its program with bcc before SERVING
SOURCE = "10.1.0.10"
TARGET = "192.0.2.1"
DENIED_PORT = 81         # no rule: DEFAULT_DENY, one audit event per packet
METRICS_PORT = 9464      # auditd's /metrics, on loopback in its own namespace
UNLIMITED = 100_000_000  # audit rate and burst: the token bucket never limits

TARGET_RATE = 200_000
TARGET_FOLLOW_P99_MS = 10.0
DEFAULT_RATES = (10_000, 25_000, 50_000, 100_000, 150_000, 200_000, 250_000, 300_000,
                 400_000)
QUICK_RATES = (10_000, 50_000)

TICK_S = 0.001               # generator pacing tick
GEN_SHORTFALL = 0.95         # a generator below this share of its target missed it
KEPT_UP_S = 1.0              # catch-up bound for "kept up"
RUN_SAMPLE_S = 0.25          # Status polling while the generator runs (Status is not free)
DRAIN_SAMPLE_S = 0.05        # Status polling while auditd catches up
DRAIN_BOUND_S = 30.0         # longest wait for auditd to store a step
STALL_S = 5.0                # no progress for this long: stop waiting
IDLE_BOUND_S = 60.0          # longest wait for auditd to be idle before a step
POLL_INTERVAL_S = 0.0005     # the SQLite poller's sleep between polls
WARMUP_EVENTS = 1000


class BenchError(Exception):
    """The benchmark cannot run or a step failed; the message says which."""


def denied_frame() -> bytes:
    """TCP SYN from SOURCE to TARGET:81 without trace metadata: counted and audited."""
    return testrun.build_frame(testrun.Probe(ipaddress.ip_address(SOURCE),
                                             ipaddress.ip_address(TARGET), 6,
                                             dst_port=DENIED_PORT))


def latency_summary(ns: Sequence[int]) -> dict[str, float]:
    """p50/p99/max in ms of latencies in ns, and their count."""
    if not ns:
        return {"n": 0}
    return benchstats.summary_ms(ns, scale=1e-6)


# -- the generator process ----------------------------------------------------------------


def paced_run(prog: int, frame: bytes, rate: float, duration: float) -> dict[str, float]:
    """Denied decisions at ``rate`` per second for ``duration`` seconds: each tick, one
    BPF_PROG_TEST_RUN with as many repetitions as are due by now."""
    total = round(rate * duration)
    done = calls = 0
    kernel_ns = 0.0
    max_lag = 0
    cpu_before = time.process_time()
    start = time.monotonic()
    deadline = start + duration
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        batch = min(total, int(rate * (now - start))) - done
        if batch > 0:
            run = bpfsys.prog_test_run(prog, frame, repeat=batch)
            if run.retval != testrun.XDP_DROP:
                raise BenchError(f"the program returned {run.retval}, not XDP_DROP")
            done += batch
            calls += 1
            kernel_ns += run.duration_ns * batch
            max_lag = max(max_lag, int(rate * (time.monotonic() - start)) - done)
        time.sleep(max(0.0, TICK_S - (time.monotonic() - start) % TICK_S))
    # The last tick's share, when the generator is on time (a late one stays short).
    rest = total - done
    if 0 < rest <= rate * TICK_S * 2:
        bpfsys.prog_test_run(prog, frame, repeat=rest)
        done += rest
        calls += 1
    end = time.monotonic()
    return {"asked": done, "start": start, "end": end, "calls": calls,
            "achieved": done / (end - start), "kernel_ns_per_event": kernel_ns / max(done, 1),
            "max_lag_ms": max_lag / rate * 1e3, "cpu_s": time.process_time() - cpu_before}


def generator_worker(conn: Connection, namespace: str, prog_pin: str, cpu: int) -> None:
    """Generator process: runs (rate, duration) commands until it receives None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench stops it
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    frame = denied_frame()
    with netns.entered(namespace):  # the frames arrive on the router's own loopback
        prog = bpfsys.obj_get(prog_pin)
        try:
            conn.send("ready")
            while True:
                command = conn.recv()
                if command is None:
                    return
                rate, duration = command
                try:
                    conn.send(paced_run(prog, frame, rate, duration))
                except (OSError, BenchError) as exc:
                    conn.send(str(exc))
        finally:
            os.close(prog)


def sqlite_poller(conn: Connection, chunk_dir: str, after_id: int, interval: float) -> None:
    """Poll the newest chunk file for rows with id > after_id until told to stop; sends the
    latencies (ns, poll completion minus kernel_ns) and the poll count."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    directory = Path(chunk_dir)
    samples: list[int] = []
    polls = 0
    last_id = after_id

    def newest() -> Path:
        return sorted(directory.glob("*.sqlite"))[-1]

    path = newest()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    started = time.monotonic()
    checked = started
    try:
        while not conn.poll():
            rows = db.execute("SELECT id, kernel_ns FROM records WHERE id > ? ORDER BY id",
                              (last_id,)).fetchall()
            now = time.monotonic_ns()
            polls += 1
            if rows:
                samples += [now - kns for _, kns in rows if kns is not None]
                last_id = rows[-1][0]
            if time.monotonic() - checked > 0.1:
                checked = time.monotonic()
                latest = newest()
                if latest != path:  # the chunk was sealed: what it still held was read
                    db.close()
                    path = latest
                    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            time.sleep(interval)
    finally:
        db.close()
    conn.recv()
    conn.send({"samples": samples, "polls": polls, "seconds": time.monotonic() - started})


class Worker:
    """A spawned helper process and its end of a pipe."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with gRPC threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()

    def call(self, message: object, timeout: float) -> Any:
        """Send ``message``, wait for the answer (bounded)."""
        self.conn.send(message)
        return self.receive(timeout)

    def receive(self, timeout: float) -> Any:
        """The next message, waiting at most ``timeout``."""
        if not self.conn.poll(timeout):
            raise BenchError(f"helper process {self.proc.pid} did not answer in {timeout} s")
        return self.conn.recv()

    def close(self) -> None:
        """Ask it to end, then end it."""
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


# -- policyd and auditd in a namespace ----------------------------------------------------


@dataclass
class Daemon:
    """One daemon process started by the bench in the namespace."""

    name: str
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def wait_serving(self) -> None:
        """Until health says SERVING (bounded)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (self.socket.exists() and is_serving(self.socket, timeout=0.5)):
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}: "
                                 f"{self.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not SERVING after {READY_TIMEOUT_S} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Rig:
    """policyd + auditd of a unique instance in a unique namespace. Everything it creates
    (processes, namespace, pins, files) is removed on exit, also after an error."""

    ring_mib: int
    json_sink: bool
    name: str = field(default_factory=lambda: f"va{os.getpid() % 10000}{secrets.token_hex(2)}")
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vpnr-bench-audit-",
                                                                    dir="/var/tmp")))
    daemons: list[Daemon] = field(default_factory=list)
    channel: grpc.Channel | None = None
    audit: audit_pb2_grpc.AuditServiceStub | None = None
    lost_fd: int = -1
    netns_made: bool = False

    @property
    def pin_dir(self) -> Path:
        """The instance's bpffs pins."""
        return PIN_ROOT / self.name

    @property
    def state(self) -> Path:
        """auditd's and policyd's state directory."""
        return self.tmp / "state"

    @property
    def chunk_dir(self) -> Path:
        """auditd's chunk files."""
        return self.state / "audit.sqlite.chunks"

    @property
    def auditd(self) -> Daemon:
        """The auditd process."""
        return self.daemons[1]

    def __enter__(self) -> Rig:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _config(self) -> Path:
        path = self.tmp / "router.toml"
        path.write_text(
            "[router]\n"
            f'instance = "{self.name}"\n'
            f'run_dir = "{self.tmp}/run"\n'
            f'state_dir = "{self.state}"\n'
            "[policyd]\n"
            'interfaces = [{name = "lan0", zone = "internal"}]\n'
            f"audit_ring_mib = {self.ring_mib}\n"
            "audit_allow_sample = 0\n"
            f"audit_events_per_second = {UNLIMITED}\n"
            f"audit_burst = {UNLIMITED}\n"
            "[auditd]\n"
            f"metrics_port = {METRICS_PORT}\n"
            "[auditd.json]\n"
            f"enabled = {'true' if self.json_sink else 'false'}\n"
            "[auditd.syslog]\n"
            "enabled = false\n")
        return path

    def _daemon(self, name: str, config: Path) -> Daemon:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            # Its own session: a Ctrl-C reaches the bench only, which stops it in order.
            proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.name}",
                                     str(BIN / name), "--config", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        daemon = Daemon(name, proc, self.tmp / "run" / self.name / f"{name}.sock", log)
        self.daemons.append(daemon)
        daemon.wait_serving()
        return daemon

    def _start(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.netns_made = True
        # The peer stays down: nothing but the bench's frames reaches the program.
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "lan0", "type", "veth", "peer", "name", "peer0"],
                    ["link", "set", "lan0", "up"]):
            subprocess.run(["ip", "-n", self.name, *cmd], check=True)
        config = self._config()
        policyd = self._daemon("policyd", config)
        with grpc.insecure_channel(socket_target(policyd.socket)) as channel:
            policy_pb2_grpc.PolicyServiceStub(channel).ReplacePolicy(
                policy_pb2.ReplacePolicyRequest(policy=policy_pb2.PolicyDocument(
                    roles=[policy_pb2.Role(name="web", rules=[policy_pb2.Rule(
                        id=1, action=policy_pb2.ACTION_ALLOW, protocol=codes_pb2.PROTOCOL_TCP,
                        dst_port_from=80, dst_port_to=80)])],
                    bindings=[policy_pb2.Binding(prefix=f"{SOURCE}/32", roles=["web"])]),
                    reason="audit_pipeline bench"), timeout=60)
        prog = bpfsys.obj_get(str(self.pin_dir / "xdp_rbac_prog"))
        try:
            trace = testrun.run(prog, denied_frame(), 1)
        finally:
            os.close(prog)
        if (trace.verdict, trace.reason) != (codes_pb2.VERDICT_DENY,
                                             codes_pb2.REASON_DEFAULT_DENY):
            raise BenchError(f"the bench frame is decided {trace.verdict}/{trace.reason}, "
                             "not DENY/DEFAULT_DENY")
        self._daemon("auditd", config)
        self.channel = grpc.insecure_channel(socket_target(self.auditd.socket))
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self.lost_fd = bpfsys.obj_get(str(self.pin_dir / "audit_lost"))

    def close(self) -> None:
        """Stop the daemons, remove the namespace, the pins and the files."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.lost_fd >= 0:
            os.close(self.lost_fd)
            self.lost_fd = -1
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.daemons.clear()
        if self.netns_made:
            subprocess.run(["ip", "netns", "del", self.name], check=False,
                           stderr=subprocess.DEVNULL)
            self.netns_made = False
        if self.pin_dir.exists():
            for pin in self.pin_dir.iterdir():
                pin.unlink()
            self.pin_dir.rmdir()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- reading figures ----------------------------------------------------------------

    def status(self) -> audit_pb2.AuditStatus:
        """auditd's Status."""
        assert self.audit is not None
        answer: audit_pb2.AuditStatus = self.audit.Status(audit_pb2.AuditStatusRequest(),
                                                          timeout=30)
        return answer

    def kernel(self) -> dict[int, int]:
        """audit_lost counters summed over CPUs, by index (layout.AUDIT_*)."""
        return dict(enumerate(bpfsys.percpu_u64_totals(self.lost_fd, layout.AUDIT_LOST_MAX)))

    def unindexed_chunks(self) -> int:
        """Sealed chunks whose indexes auditd has not built yet (its catalog, read-only)."""
        catalog = self.state / "audit.sqlite"
        with contextlib.closing(sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT count(*) FROM chunks WHERE sealed=1 AND indexed=0"
                             ).fetchone()
        return int(row[0])

    def metrics(self) -> dict[str, float]:
        """auditd's kernel-to-store quantiles from its /metrics (inside its namespace)."""
        with netns.entered(self.name):
            conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=10)
            try:
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
            finally:
                conn.close()
        found = {}
        for line in text.splitlines():
            if line.startswith("vpnr_audit_kernel_to_store_seconds{"):
                labels, value = line.rsplit(" ", 1)
                quantile = labels.split('quantile="')[1].split('"')[0]
                found[f"p{round(float(quantile) * 100)}_ms"] = round(float(value) * 1e3, 3)
        return found


def sinks(status: audit_pb2.AuditStatus) -> dict[str, audit_pb2.SinkStatus]:
    """Sinks by name."""
    return {s.name: s for s in status.sinks}


def idle(status: audit_pb2.AuditStatus) -> bool:
    """Ring released and nothing queued in any sink."""
    return status.ring_pending_bytes == 0 and all(s.buffered == 0 for s in status.sinks)


def thread_cpu(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (thread name, ns on a CPU so far) of every live thread of a process, and
    under key 0 the whole process (utime + stime, which keeps the time of threads that
    have exited: auditd opens a new SQLite connection thread for every chunk)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            run_ns = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(task.name)] = (name, run_ns)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    out[0] = ("process", ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK"))
    return out


def cpu_delta(pid: int, before: dict[int, tuple[str, int]],
              after: dict[int, tuple[str, int]]) -> tuple[float, list[tuple[str, float]]]:
    """(process CPU seconds, [(thread, CPU seconds)] busiest first) over an interval. The
    thread whose id is the process id is the main thread (auditd's event loop); threads
    that exited meanwhile are summed as "exited"."""
    total = (after[0][1] - before[0][1]) / 1e9
    rows = [("main(loop)" if tid == pid else f"{name}/{tid}",
             (ns - before.get(tid, (name, 0))[1]) / 1e9)
            for tid, (name, ns) in after.items() if tid]
    rows.append(("exited", max(0.0, total - sum(s for _, s in rows))))
    return total, sorted(rows, key=lambda r: -r[1])


# -- one step -----------------------------------------------------------------------------


@dataclass
class Step:
    """What one steady-rate step produced."""

    target: int
    gen: dict[str, float]
    emitted: int = 0
    reserve_failed: int = 0
    rate_limited: int = 0
    drained: int = 0
    stored: int = 0
    sqlite_dropped: int = 0
    json_dropped: int = 0
    json_written: int = 0
    stored_after_s: float | None = None      # from the generator's start
    waited_s: float = 0.0                    # from the generator's start to the wait's end
    catch_up_s: float | None = None          # after the generator's end
    json_after_s: float | None = None        # JSON sink empty, after the generator's end
    max_backlog: int = 0
    max_ring_pending: float = 0.0            # share of the ring
    idle_wait_s: float = 0.0
    auditd_cpu_s: float = 0.0
    auditd_threads: list[tuple[str, float]] = field(default_factory=list)

    @property
    def generated(self) -> int:
        """Events the generator asked for."""
        return int(self.gen["asked"])

    @property
    def gen_short(self) -> bool:
        """The generator missed its target rate."""
        return self.gen["achieved"] < GEN_SHORTFALL * self.target

    @property
    def zero_loss(self) -> bool:
        """Every generated event stored, none lost anywhere before SQLite."""
        return (self.stored == self.generated == self.emitted and self.reserve_failed == 0
                and self.rate_limited == 0 and self.sqlite_dropped == 0)

    @property
    def kept_up(self) -> bool:
        """Zero loss, and auditd had stored everything within KEPT_UP_S of the end."""
        return self.zero_loss and self.catch_up_s is not None and self.catch_up_s < KEPT_UP_S

    @property
    def drain_rate(self) -> float:
        """Stored records per second, from the generator's start until all were stored
        (until the wait ended, if they never were)."""
        span = self.stored_after_s or self.waited_s
        return self.stored / span if span > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Every figure, for the JSON line."""
        return {"target": self.target, "achieved": round(self.gen["achieved"]),
                "generated": self.generated, "emitted": self.emitted,
                "drained": self.drained, "stored": self.stored,
                "lost": {"kernel_reserve_failed": self.reserve_failed,
                         "kernel_rate_limited": self.rate_limited,
                         "sink_sqlite_dropped": self.sqlite_dropped,
                         "sink_json_dropped": self.json_dropped},
                "zero_loss": self.zero_loss, "kept_up": self.kept_up,
                "drain_rate": round(self.drain_rate),
                "catch_up_s": None if self.catch_up_s is None else round(self.catch_up_s, 3),
                "json_catch_up_s": (None if self.json_after_s is None
                                    else round(self.json_after_s, 3)),
                "max_backlog": self.max_backlog,
                "max_ring_pending": round(self.max_ring_pending, 3),
                "auditd_cpu_s": round(self.auditd_cpu_s, 2),
                "auditd_threads": [(n, round(s, 2)) for n, s in self.auditd_threads[:4]],
                "generator": {k: round(v, 3) for k, v in self.gen.items()
                              if k not in ("start", "end")},
                "idle_wait_s": round(self.idle_wait_s, 2)}


def wait_idle(rig: Rig) -> float:
    """Wait until auditd is idle and every sealed chunk indexed (bounded); seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < IDLE_BOUND_S:
        if idle(rig.status()) and rig.unindexed_chunks() == 0:
            break
        time.sleep(0.05)
    return time.monotonic() - started


def run_step(rig: Rig, gen: Worker, rate: int, duration: float) -> Step:
    """One step: generate at ``rate`` for ``duration``, wait until auditd has stored it."""
    waited = wait_idle(rig)
    before = rig.status()
    kernel_before = rig.kernel()
    cpu_before = thread_cpu(rig.auditd.proc.pid)
    gen.conn.send((rate, duration))
    max_backlog, max_pending = 0, 0.0
    while not gen.conn.poll(RUN_SAMPLE_S):
        status = rig.status()
        emitted_now = rig.kernel()[layout.AUDIT_EMITTED] - kernel_before[layout.AUDIT_EMITTED]
        max_backlog = max(max_backlog, emitted_now - (status.records - before.records))
        max_pending = max(max_pending, status.ring_pending_bytes / max(status.ring_bytes, 1))
    result = gen.receive(10)
    if isinstance(result, str):
        raise BenchError(f"generator: {result}")
    kernel_after = rig.kernel()
    step = Step(rate, result)
    step.idle_wait_s = waited
    step.emitted = kernel_after[layout.AUDIT_EMITTED] - kernel_before[layout.AUDIT_EMITTED]
    step.reserve_failed = (kernel_after[layout.AUDIT_LOST_RESERVE]
                           - kernel_before[layout.AUDIT_LOST_RESERVE])
    step.rate_limited = (kernel_after[layout.AUDIT_LOST_RATE_LIMIT]
                         - kernel_before[layout.AUDIT_LOST_RATE_LIMIT])
    # Until auditd has stored what the kernel emitted (or stops making progress).
    deadline = time.monotonic() + DRAIN_BOUND_S
    progress = (-1, -1)
    progress_at = time.monotonic()
    status = before
    while time.monotonic() < deadline:
        status = rig.status()
        now = time.monotonic()
        max_backlog = max(max_backlog, step.emitted - (status.records - before.records))
        max_pending = max(max_pending, status.ring_pending_bytes / max(status.ring_bytes, 1))
        if (status.records - before.records >= step.emitted
                and status.ring_pending_bytes == 0 and sinks(status)["sqlite"].buffered == 0):
            step.stored_after_s = now - step.gen["start"]
            step.catch_up_s = max(0.0, now - step.gen["end"])
            break
        if (status.records, status.drained) != progress:
            progress, progress_at = (status.records, status.drained), now
        elif now - progress_at > STALL_S and status.ring_pending_bytes == 0:
            break
        time.sleep(DRAIN_SAMPLE_S)
    if rig.json_sink:
        while time.monotonic() < deadline:
            status = rig.status()
            if sinks(status)["json"].buffered == 0:
                step.json_after_s = max(0.0, time.monotonic() - step.gen["end"])
                break
            time.sleep(DRAIN_SAMPLE_S)
    cpu_after = thread_cpu(rig.auditd.proc.pid)
    step.waited_s = time.monotonic() - step.gen["start"]
    step.auditd_cpu_s, step.auditd_threads = cpu_delta(rig.auditd.proc.pid, cpu_before,
                                                       cpu_after)
    step.drained = status.drained - before.drained
    step.stored = status.records - before.records
    lost_before, lost_after = before.lost_by_cause, status.lost_by_cause
    step.sqlite_dropped = (lost_after["sink_sqlite_dropped"]
                           - lost_before["sink_sqlite_dropped"])
    if rig.json_sink:
        step.json_dropped = lost_after["sink_json_dropped"] - lost_before["sink_json_dropped"]
        step.json_written = sinks(status)["json"].written - sinks(before)["json"].written
    step.max_backlog = max_backlog
    step.max_ring_pending = max_pending
    return step


# -- latency ------------------------------------------------------------------------------


class FollowClient:
    """A Follow stream read by a thread of this process: kernel -> Follow latency of each
    record (arrival on CLOCK_MONOTONIC minus the event's kernel_time_ns)."""

    def __init__(self, rig: Rig) -> None:
        assert rig.audit is not None
        self.latencies: list[int] = []
        self.error = ""
        self.stream = rig.audit.Follow(audit_pb2.FollowRequest(
            filter=audit_pb2.AuditFilter(src_prefix=f"{SOURCE}/32")), timeout=600)
        self.thread = threading.Thread(target=self._read, name="follow", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        append = self.latencies.append
        try:
            for response in self.stream:
                now = time.monotonic_ns()
                for record in response.records:
                    append(now - record.packet.kernel_time_ns)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"

    def received(self) -> int:
        """Records received so far."""
        return len(self.latencies)

    def finish(self) -> tuple[list[int], str]:
        """Cancel the stream; (latencies in ns, error text)."""
        self.stream.cancel()
        self.thread.join(10)
        return self.latencies, self.error


def follow_process(conn: Connection, socket_path: str) -> None:
    """The same Follow client with grpc.aio in a process of its own (``--follow-process``:
    checks that the bench's client is not what limits the figure)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def run() -> None:
        latencies: list[int] = []
        error = ""
        async with grpc.aio.insecure_channel(socket_target(socket_path)) as channel:
            call = audit_pb2_grpc.AuditServiceStub(channel).Follow(audit_pb2.FollowRequest(
                filter=audit_pb2.AuditFilter(src_prefix=f"{SOURCE}/32")))

            async def read() -> None:
                nonlocal error
                try:
                    async for response in call:
                        now = time.monotonic_ns()
                        latencies.extend(now - record.packet.kernel_time_ns
                                         for record in response.records)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.CANCELLED:
                        error = f"{exc.code().name}: {exc.details()}"
            reader = asyncio.get_running_loop().create_task(read())
            conn.send("ready")
            while True:
                if conn.poll():
                    message = conn.recv()
                    if message == "count":
                        conn.send(len(latencies))
                        continue
                    break
                await asyncio.sleep(0.01)
            call.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        conn.send((latencies, error))
    asyncio.run(run())


class FollowInProcess:
    """:func:`follow_process` driven from the bench."""

    def __init__(self, rig: Rig) -> None:
        self.worker = Worker(follow_process, str(rig.auditd.socket))
        if self.worker.receive(30) != "ready":
            raise BenchError("the Follow process did not start")

    def received(self) -> int:
        """Records received so far."""
        return int(self.worker.call("count", 10))

    def finish(self) -> tuple[list[int], str]:
        """Cancel the stream; (latencies in ns, error text)."""
        try:
            latencies, error = self.worker.call("stop", 30)
        finally:
            self.worker.close()
        return latencies, error


@dataclass
class Latency:
    """Figures of the two latency steps."""

    follow_step: Step
    follow: dict[str, float]
    follow_error: str
    sqlite_step: Step
    sqlite_own: dict[str, float]
    poll_interval_ms: float
    sqlite_metric: dict[str, float]


def measure_latency(rig: Rig, gen: Worker, rate: int, duration: float,
                    follow_in_process: bool) -> Latency:
    """Two steps at ``rate``: one with a Follow client, then one with the chunk-file
    poller (so that neither measuring client loads the other's figure); auditd's own
    kernel-to-store metric is scraped after the second."""
    wait_idle(rig)
    follow: FollowClient | FollowInProcess = (FollowInProcess(rig) if follow_in_process
                                              else FollowClient(rig))
    try:
        time.sleep(0.5)  # the stream is open
        follow_step = run_step(rig, gen, rate, duration)
        deadline = time.monotonic() + 10
        while follow.received() < follow_step.stored and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        latencies, error = follow.finish()
    wait_idle(rig)
    poller = Worker(sqlite_poller, str(rig.chunk_dir), rig.status().last_id, POLL_INTERVAL_S)
    try:
        time.sleep(0.5)  # the poller is polling
        sqlite_step = run_step(rig, gen, rate, duration)
        metric = rig.metrics()
        polled = poller.call("stop", 30)
    finally:
        poller.close()
    return Latency(follow_step, latency_summary(latencies), error, sqlite_step,
                   latency_summary(polled["samples"]),
                   polled["seconds"] / max(polled["polls"], 1) * 1e3, metric)


def index_builds(log: Path) -> list[tuple[int, float]]:
    """(rows, seconds) of every chunk auditd sealed and indexed, from its log."""
    builds = []
    for line in log.read_text(errors="replace").splitlines():
        if '"chunk indexed"' in line:
            with contextlib.suppress(ValueError, KeyError):
                entry = json.loads(line)
                builds.append((int(entry["rows"]), float(entry["seconds"])))
    return builds


# -- output -------------------------------------------------------------------------------


def fmt_catch_up(value: float | None) -> str:
    """Catch-up seconds, or 'never' when the wait ran out."""
    return "never" if value is None else f"{value:.2f}s"


def print_table(steps: Sequence[Step]) -> None:
    """The ladder."""
    print(f"{'target/s':>9} {'achieved/s':>10} {'generated':>10} {'emitted':>10} "
          f"{'stored':>10} {'lost rsv/rl/sql':>16} {'json drop':>9} {'drain/s':>9} "
          f"{'catch-up':>8} {'json':>7} {'backlog':>8} {'ring%':>5} {'auditd CPU':>10}  "
          "result")
    for s in steps:
        lost = f"{s.reserve_failed}/{s.rate_limited}/{s.sqlite_dropped}"
        json_drop = str(s.json_dropped) if s.json_written or s.json_dropped else "-"
        json_after = fmt_catch_up(s.json_after_s) if s.json_written or s.json_dropped else "-"
        unstored = (s.stored < s.emitted and s.catch_up_s is None and not s.reserve_failed
                    and not s.sqlite_dropped)
        verdict = ("kept up" if s.kept_up else "zero loss, fell behind" if s.zero_loss
                   else f"not all stored within {DRAIN_BOUND_S:g} s" if unstored else "LOSS")
        if s.gen_short:
            verdict += " (generator short of target)"
        print(f"{s.target:>9} {s.gen['achieved']:>10.0f} {s.generated:>10} {s.emitted:>10} "
              f"{s.stored:>10} {lost:>16} {json_drop:>9} {s.drain_rate:>9.0f} "
              f"{fmt_catch_up(s.catch_up_s):>8} {json_after:>7} {s.max_backlog:>8} "
              f"{s.max_ring_pending * 100:>5.1f} {s.auditd_cpu_s:>9.2f}s  {verdict}")


def print_threads(steps: Sequence[Step]) -> None:
    """auditd's CPU per step: process total, busiest threads, per stored record."""
    print("auditd CPU per step, from the generator's start until all was stored and the "
          "JSON sink empty (process "
          "total; busiest threads: main(loop) is the event loop, auditd/N other Python "
          "threads (SQLite connections, to_thread workers), exited: threads gone by the end, "
          "e.g. the connection of a sealed chunk); idle wait: before the step, until the "
          "previous chunks were indexed:")
    for s in steps:
        span = s.waited_s
        busiest = ", ".join(f"{name} {sec:.2f}" for name, sec in s.auditd_threads[:4])
        print(f"  {s.target:>7}/s: {s.auditd_cpu_s:.2f} s over {span:.2f} s "
              f"({s.auditd_cpu_s / span:.2f} CPUs; "
              f"{s.auditd_cpu_s / max(s.stored, 1) * 1e6:.1f} us per record); {busiest}; "
              f"idle wait {s.idle_wait_s:.1f} s")


def main() -> int:
    """Start the pair, measure latency, climb the ladder, print everything."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per step")
    parser.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)),
                        help="comma-separated target rates (events/s), climbed in order")
    parser.add_argument("--latency-rate", type=int, default=10_000,
                        help="events/s of the latency steps")
    parser.add_argument("--latency-duration", type=float, default=None,
                        help="seconds of each latency step (default: --duration)")
    parser.add_argument("--no-json", action="store_true",
                        help="turn auditd's JSON lines sink off (SQLite alone)")
    parser.add_argument("--ring-mib", type=int, default=8, help="audit ring size (power of 2)")
    parser.add_argument("--gen-cpu", type=int, default=-1,
                        help="pin the generator process to this CPU (default -1: not pinned; "
                             "pinning it to CPU 1 of 2 did not raise the drain rate here and "
                             "made it lag its schedule more)")
    parser.add_argument("--follow-process", action="store_true",
                        help="read Follow with grpc.aio in a separate process instead of a "
                             "thread of this one")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: rates {QUICK_RATES}, 2 s steps")
    parser.add_argument("--profile", metavar="FILE",
                        help="record auditd with py-spy during the ladder into FILE")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or str(BIN / "py-spy"),
                        help="the py-spy executable for --profile")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    if args.quick:
        rates, args.duration = list(QUICK_RATES), 2.0
    latency_duration = args.latency_duration or args.duration

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)

    load = [os.getloadavg()[0]]
    started = time.monotonic()
    steps: list[Step] = []
    stop_reason = "every rate measured"
    with contextlib.ExitStack() as stack:
        rig = stack.enter_context(Rig(args.ring_mib, not args.no_json))
        gen = Worker(generator_worker, rig.name, str(rig.pin_dir / "xdp_rbac_prog"),
                     args.gen_cpu)
        stack.callback(gen.close)
        if gen.receive(30) != "ready":
            raise BenchError("the generator did not start")
        setup = (f"instance {rig.name}: ring {args.ring_mib} MiB; auditd sinks: SQLite"
                 f"{' + JSON lines' if rig.json_sink else ' only (--no-json)'}, syslog off; "
                 f"{os.cpu_count()} CPUs: generator process "
                 + (f"pinned to CPU {args.gen_cpu}" if args.gen_cpu >= 0 else "not pinned")
                 + ", auditd and this process not pinned; Follow read by "
                 + ("grpc.aio in a separate process" if args.follow_process
                    else "a thread of this process"))
        print(f"{setup}; up in {time.monotonic() - started:.1f} s", flush=True)
        warm = run_step(rig, gen, WARMUP_EVENTS * 10, 0.1)  # role names, first commits
        if not warm.zero_loss:
            raise BenchError(f"warm-up lost events: {warm.as_dict()}")

        latency = measure_latency(rig, gen, args.latency_rate, latency_duration,
                                  args.follow_process)
        for what, lat in (("Follow", latency.follow_step), ("SQLite", latency.sqlite_step)):
            print(f"latency step ({what}): {args.latency_rate}/s for {latency_duration:g} s, "
                  f"generated {lat.generated} (achieved {lat.gen['achieved']:.0f}/s), stored "
                  f"{lat.stored}, {'zero loss' if lat.zero_loss else 'LOSS'}, auditd "
                  f"{lat.auditd_cpu_s / lat.waited_s:.2f} CPUs",
                  flush=True)

        profiler = None
        if args.profile:
            profiler = subprocess.Popen(
                [args.py_spy, "record", "--pid", str(rig.auditd.proc.pid), "--rate", "200",
                 "--nonblocking", "--format", "raw", "--threads", "--output", args.profile],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for rate in rates:
                step = run_step(rig, gen, rate, args.duration)
                steps.append(step)
                print(f"  step {rate}/s: achieved {step.gen['achieved']:.0f}/s, stored "
                      f"{step.stored}/{step.generated}, catch-up "
                      f"{fmt_catch_up(step.catch_up_s)}, auditd CPU {step.auditd_cpu_s:.2f} s",
                      file=sys.stderr, flush=True)
                if not step.zero_loss:
                    stop_reason = f"stopped after the first step with loss ({rate}/s)"
                    break
                if step.gen_short:
                    stop_reason = (f"stopped: the generator reached {step.gen['achieved']:.0f}"
                                   f" of {rate} events/s")
                    break
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
        wait_idle(rig)
        final = rig.status()
        builds = index_builds(rig.auditd.log)
        peak_rss = next((int(line.split()[1]) for line in Path(
            f"/proc/{rig.auditd.proc.pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")), 0)
    load.append(os.getloadavg()[0])

    print()
    print(setup)
    print(f"Rate ladder: {args.duration:g} s per step, {stop_reason}.")
    print("  lost rsv/rl/sql: kernel ring reserve failures / kernel rate-limited / dropped "
          "from SQLite (max_buffered); json drop: dropped by the JSON sink (not counted as "
          "loss); drain/s: stored / (generator start -> all stored); catch-up: all stored, "
          "after the generator stopped (Status polled every "
          f"{DRAIN_SAMPLE_S * 1e3:.0f} ms); json: JSON sink empty, after the generator "
          "stopped; backlog: most records emitted but not yet stored; ring%: most of the ring "
          f"unreleased (Status every {RUN_SAMPLE_S * 1e3:.0f} ms); kept up: zero loss and "
          f"catch-up < {KEPT_UP_S:g} s")
    print_table(steps)
    print_threads(steps)
    rows_per_s = [r / s for r, s in builds if s > 0]
    print(f"generator: kernel ns per event {[round(s.gen['kernel_ns_per_event']) for s in steps]}"
          f", CPU s per step {[round(s.gen['cpu_s'], 2) for s in steps]}, worst lag behind "
          f"schedule ms {[round(s.gen['max_lag_ms'], 1) for s in steps]}")
    print(f"store at the end: {final.records} records in {final.chunks} chunks, "
          f"{final.disk_bytes / 2**20:.0f} MiB; auditd peak RSS {peak_rss / 1024:.0f} MiB; "
          f"chunks indexed after sealing: {len(builds)}"
          + (f", {min(rows_per_s):.0f}-{max(rows_per_s):.0f} rows/s of index build "
             f"({statistics.median(s for _, s in builds):.2f} s median per chunk)"
             if rows_per_s else ""))

    zero = [s.target for s in steps if s.zero_loss and not s.gen_short]
    kept = [s.target for s in steps if s.kept_up and not s.gen_short]
    json_ok = [s.target for s in steps if s.zero_loss and not s.gen_short
               and s.json_dropped == 0]
    best_zero = max(zero, default=0)
    best_kept = max(kept, default=0)
    follow, own, metric = latency.follow, latency.sqlite_own, latency.sqlite_metric
    follow_p99 = follow.get("p99_ms")
    follow_met = follow_p99 is not None and follow_p99 < TARGET_FOLLOW_P99_MS
    print()
    print("== summary ==")
    print(f"highest rate with zero loss: {best_zero} events/s (target {TARGET_RATE}): "
          f"{'met' if best_zero >= TARGET_RATE else 'not met'} ({stop_reason})")
    print(f"highest rate kept up (zero loss and all stored within {KEPT_UP_S:g} s of the "
          f"generator stopping): {best_kept} events/s")
    if rig.json_sink:
        print(f"highest rate with zero loss and nothing dropped by the JSON sink: "
              f"{max(json_ok, default=0)} events/s")
    print(f"kernel->Follow at {args.latency_rate}/s: p50 {follow.get('p50_ms')} ms p99 "
          f"{follow_p99} ms max {follow.get('max_ms')} ms (n={follow.get('n', 0)} of "
          f"{latency.follow_step.stored}) (target p99 < {TARGET_FOLLOW_P99_MS:g} ms): "
          f"{'met' if follow_met else 'not met'}"
          + (f"; stream ended: {latency.follow_error}" if latency.follow_error else ""))
    print(f"kernel->SQLite at {args.latency_rate}/s, polled here: p50 {own.get('p50_ms')} ms "
          f"p99 {own.get('p99_ms')} ms max {own.get('max_ms')} ms (n={own.get('n', 0)}; newest "
          f"chunk polled read-only every {latency.poll_interval_ms:.2f} ms: upper bounds "
          "within one interval)")
    print(f"kernel->SQLite at {args.latency_rate}/s, auditd's metric "
          f"vpnr_audit_kernel_to_store_seconds (first and last row of its recent commits): "
          f"p50 {metric.get('p50_ms')} ms p99 {metric.get('p99_ms')} ms")
    print(f"load average before/after: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} CPUs "
          f"(other work on the host shares them); total {time.monotonic() - started:.0f} s")
    print(json.dumps({
        "json_sink": rig.json_sink, "ring_mib": args.ring_mib, "duration_s": args.duration,
        "gen_cpu": args.gen_cpu, "follow_process": args.follow_process,
        "highest_zero_loss_rate": best_zero, "highest_kept_up_rate": best_kept,
        "stop_reason": stop_reason,
        "latency": {"rate": args.latency_rate, "follow": follow,
                    "follow_error": latency.follow_error, "sqlite_polled": own,
                    "poll_interval_ms": round(latency.poll_interval_ms, 3),
                    "sqlite_metric": metric, "follow_step": latency.follow_step.as_dict(),
                    "sqlite_step": latency.sqlite_step.as_dict()},
        "steps": [s.as_dict() for s in steps],
        "index_builds": [{"rows": r, "seconds": sec} for r, sec in builds],
        "auditd_peak_rss_mib": round(peak_rss / 1024),
        "targets": {"zero_loss_rate": TARGET_RATE, "follow_p99_ms": TARGET_FOLLOW_P99_MS},
        "loadavg_1m": load}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the namespace, pins, files and processes were removed",
              file=sys.stderr)
        sys.exit(130)
