"""auditd: drains the eBPF ring buffer into SQLite, a JSON lines file and syslog; serves
Query, Follow, Export, Stats and the control-plane Record RPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vpnr.auditd import records as R
from vpnr.auditd.follow import FollowHub
from vpnr.auditd.ingest import Decoder, RoleNames
from vpnr.auditd.jsonfile import JsonLinesSink
from vpnr.auditd.pipeline import Pipeline
from vpnr.auditd.service import AuditServicer, control_fields
from vpnr.auditd.sinks import Sink
from vpnr.auditd.store import AuditStore, StoreError
from vpnr.auditd.syslog import SyslogSink
from vpnr.core import bpfsys, preflight
from vpnr.core.daemon import DaemonApp, StartupError, run_daemon
from vpnr.policyd import layout
from vpnr.v1 import audit_pb2, audit_pb2_grpc, common_pb2

log = logging.getLogger("vpnr.auditd")

RETENTION_INTERVAL_SECONDS = 60.0
STARTUP_NAMES_TIMEOUT = 2.0
# audit_lost indexes (bpf/lib/audit_event.h) that are losses, by the name Status uses.
KERNEL_LOSSES = {layout.AUDIT_LOST_RESERVE: "kernel_reserve_failed",
                 layout.AUDIT_LOST_RATE_LIMIT: "kernel_rate_limited"}


class KernelCounters:
    """policyd's pinned audit_lost per-CPU counters, summed."""

    def __init__(self, pin: Path) -> None:
        self.pin = pin
        self._fd = -1

    def read(self) -> dict[int, int]:
        """Sum per cause; empty until policyd has created the map."""
        if self._fd < 0:
            try:
                self._fd = bpfsys.obj_get(str(self.pin))
            except OSError:
                return {}
        return dict(enumerate(bpfsys.percpu_u64_totals(self._fd, layout.AUDIT_LOST_MAX)))

    def close(self) -> None:
        """Close the map fd."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Auditd(DaemonApp):
    """The audit daemon."""

    name = "auditd"
    service_names = (audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,)

    store: AuditStore
    pipeline: Pipeline
    formatter: R.Formatter
    hub: FollowHub
    roles: RoleNames
    sinks: list[Sink]
    kernel: KernelCounters
    _retention: asyncio.Task[None] | None = None
    _own_records: set[asyncio.Task[None]]

    def state_file(self, name: str) -> Path:
        """A configured path; relative ones are under the state directory."""
        path = Path(name)
        return path if path.is_absolute() else self.config.router.state_path / path

    async def start(self) -> None:
        """Open the store, learn role names, start the sinks and the drain."""
        preflight.require(self.name, ("kernel", "bpf", "bpffs"))
        cfg = self.config.auditd
        try:
            self.store = await AuditStore.open(
                self.state_file(cfg.database), cfg.chunk_rows, cfg.chunk_seconds,
                (cfg.retention_days * 86400, cfg.max_disk_mib << 20))
        except StoreError as exc:
            raise StartupError(str(exc)) from exc
        router = self.config.router
        self.formatter = R.Formatter(router.instance, self.store.rolesets)
        self.hub = FollowHub()
        self._own_records = set()
        self.roles = RoleNames(router.socket_path("policyd"))
        await self.roles.catch_up(timeout=STARTUP_NAMES_TIMEOUT)
        self.sinks = []
        if cfg.json.enabled:
            self.sinks.append(JsonLinesSink(cfg.json, self.state_file(cfg.json.path),
                                            self.formatter))
        if cfg.syslog.enabled:
            self.sinks.append(SyslogSink(cfg.syslog, self.formatter))
        for sink in self.sinks:
            await sink.start()
        self.kernel = KernelCounters(router.pin_dir / "audit_lost")
        self.pipeline = Pipeline(
            self.store, Decoder(self.roles, self.store.roleset_id),
            router.pin_dir / "audit_ring", batch_rows=cfg.batch_rows,
            batch_interval=cfg.batch_interval_ms / 1000, max_buffered=cfg.max_buffered,
            publish=self._publish)
        self.pipeline.start()
        self._retention = asyncio.get_running_loop().create_task(self._retain())
        self.runtime.registry.register(AuditCollector(self))

    def _publish(self, rows: Sequence[R.Row], stored: bool) -> None:
        if stored:
            self.hub.publish(rows)
        for sink in self.sinks:
            sink.offer(rows)

    async def _retain(self) -> None:
        while True:
            try:
                await self.store.apply_retention()
            except (OSError, StoreError) as exc:
                log.warning("retention failed", extra={"error": str(exc)})
            await asyncio.sleep(RETENTION_INTERVAL_SECONDS)

    async def stop(self) -> None:
        """Commit what is queued, flush the sinks, close the store."""
        if self._retention is not None:
            self._retention.cancel()
        with contextlib.suppress(AttributeError):
            await self.pipeline.stop()
        with contextlib.suppress(AttributeError):
            for sink in self.sinks:
                await sink.close()
            self.kernel.close()
        with contextlib.suppress(AttributeError):
            await self.store.close()

    def register(self, server: grpc.aio.Server) -> None:
        """Add the AuditService servicer."""
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(self), server)

    def control_recorder(self) -> Callable[[audit_pb2.ControlEvent], None]:
        """auditd's own control records (access denials) go straight into the pipeline."""
        return self._record_own

    def _record_own(self, event: audit_pb2.ControlEvent) -> None:
        async def store() -> None:
            try:
                await self.pipeline.record_control(
                    control_fields(event, json.loads(event.detail_json or "{}")))
            except StoreError as exc:
                log.warning("own control record not stored",
                            extra={"action": event.action, "error": str(exc)})
        task = asyncio.get_running_loop().create_task(store())
        self._own_records.add(task)
        task.add_done_callback(self._own_records.discard)

    # -- figures ----------------------------------------------------------------------

    def lost_by_cause(self) -> dict[str, int]:
        """Every way a decision can fail to be stored, counted."""
        kernel = self.kernel.read()
        lost = {name: kernel.get(cause, 0) for cause, name in KERNEL_LOSSES.items()}
        lost["sink_sqlite_dropped"] = self.pipeline.sqlite.dropped
        for sink in self.sinks:
            lost[f"sink_{sink.name}_dropped"] = sink.status().dropped
        lost["retention_deleted"] = self.store.retention_deleted
        lost["malformed_event"] = self.pipeline.decoder.malformed
        return lost

    def sink_statuses(self) -> list[audit_pb2.SinkStatus]:
        """SQLite first, then the configured sinks."""
        pipe = self.pipeline
        sqlite = audit_pb2.SinkStatus(
            name="sqlite", enabled=True, healthy=not pipe.sqlite.error,
            error=pipe.sqlite.error, written=pipe.sqlite.written, dropped=pipe.sqlite.dropped,
            buffered=pipe.pending_rows, target=str(self.store.path))
        return [sqlite, *(sink.status() for sink in self.sinks)]

    async def status(self) -> audit_pb2.AuditStatus:
        """The Status answer."""
        pipe = self.pipeline
        sinks = self.sink_statuses()
        lost = self.lost_by_cause()
        warnings = []
        if pipe.ring_error:
            warnings.append(common_pb2.Warning(code="RING", message=pipe.ring_error))
        if self.roles.error:
            warnings.append(common_pb2.Warning(code="NAMES", message=self.roles.error))
        for sink in sinks:
            if not sink.healthy:
                warnings.append(common_pb2.Warning(code="SINK",
                                                   message=f"{sink.name}: {sink.error}"))
        if lost["kernel_reserve_failed"]:
            warnings.append(common_pb2.Warning(
                code="RING_FULL", message=f"{lost['kernel_reserve_failed']} events could not "
                                          "be reserved in the ring buffer (size it up)"))
        ring = pipe.ring
        return audit_pb2.AuditStatus(
            daemon=self.runtime.daemon_info(), database=str(self.store.path),
            records=self.store.record_count, schema_version=await self.store.schema_version(),
            sinks=sinks, lost_by_cause=lost,
            ring_buffer=ring.path if ring else "", drained=pipe.drained, warnings=warnings,
            last_id=pipe.committed_id, chunks=len(self.store.chunks),
            disk_bytes=self.store.disk_bytes(), events_per_second=pipe.events_per_second(),
            ring_bytes=ring.size if ring else 0, ring_pending_bytes=pipe.pending_ring_bytes())


class AuditCollector(Collector):
    """Prometheus view of auditd, read at scrape time."""

    def __init__(self, app: Auditd) -> None:
        self.app = app

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Records drained and stored, losses by cause, sink health, ring backlog."""
        app = self.app
        pipe = app.pipeline
        yield CounterMetricFamily("vpnr_audit_drained_records",
                                  "Packet records drained from the ring buffer",
                                  value=pipe.drained)
        lost = CounterMetricFamily("vpnr_audit_lost_records",
                                   "Decision records not stored, by cause", labels=["cause"])
        for cause, value in app.lost_by_cause().items():
            lost.add_metric([cause], value)
        yield lost
        written = CounterMetricFamily("vpnr_audit_sink_written_records",
                                      "Records written by each sink", labels=["sink"])
        healthy = GaugeMetricFamily("vpnr_audit_sink_healthy", "1 when the sink's last write "
                                    "worked", labels=["sink"])
        buffered = GaugeMetricFamily("vpnr_audit_sink_buffered_records",
                                     "Records waiting in each sink", labels=["sink"])
        for sink in app.sink_statuses():
            written.add_metric([sink.name], sink.written)
            healthy.add_metric([sink.name], float(sink.healthy))
            buffered.add_metric([sink.name], sink.buffered)
        yield from (written, healthy, buffered)
        yield GaugeMetricFamily("vpnr_audit_ring_pending_bytes",
                                "Bytes in the ring not yet released by auditd",
                                value=pipe.pending_ring_bytes())
        yield GaugeMetricFamily("vpnr_audit_stored_records", "Records in the store",
                                value=app.store.record_count)
        yield GaugeMetricFamily("vpnr_audit_disk_bytes", "Bytes used by the store",
                                value=app.store.disk_bytes())
        latency = sorted(pipe.sqlite.latency_ns)
        # A gauge per percentile of a sliding window (the last 4096 records), not a
        # summary: "quantile" is reserved for summaries, whose _sum/_count are cumulative.
        quantiles = GaugeMetricFamily("vpnr_audit_kernel_to_store_seconds",
                                      "Kernel event to SQLite commit, percentile over the "
                                      "last 4096 stored records", labels=["percentile"])
        for q in (0.5, 0.99):
            seconds = latency[min(int(q * len(latency)), len(latency) - 1)] / 1e9 \
                if latency else 0.0
            quantiles.add_metric([str(round(q * 100))], seconds)
        yield quantiles


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    return run_daemon(Auditd, argv)
