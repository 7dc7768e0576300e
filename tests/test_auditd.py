"""auditd against a real policyd: kernel decisions become stored, queryable, followable
records; nothing is stored twice or lost across restarts; bad requests are refused clearly;
a failing sink is reported while the others keep working.

Events are produced by the live XDP program through BPF_PROG_TEST_RUN (frames without the
trace marker count and are audited like traffic), in the test's own namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conftest import DaemonProcess, router_toml, unique
from vpnr.core import bpfsys
from vpnr.policyd import layout, testrun
from vpnr.v1 import audit_pb2, audit_pb2_grpc, codes_pb2, common_pb2, policy_pb2, policy_pb2_grpc

pytestmark = pytest.mark.root

SOURCE = "10.1.0.10"
OTHER = "10.1.0.20"
TARGET = "192.0.2.1"
METRICS_PORT = 9471  # inside the test's own namespace


def frame(port: int, src: str = SOURCE) -> bytes:
    """A TCP packet to TARGET:port (no trace metadata: it counts and is audited)."""
    return testrun.build_frame(testrun.Probe(ipaddress.ip_address(src),
                                             ipaddress.ip_address(TARGET), 6, dst_port=port))


@dataclass
class Router:
    """policyd and auditd of one instance in a namespace, with stubs."""

    tmp: Path
    netns: str
    instance: str
    config: Path
    policyd: DaemonProcess
    auditd: DaemonProcess
    audit: audit_pb2_grpc.AuditServiceStub
    channel: grpc.Channel
    prog: int
    syslog: socket.socket

    @property
    def pins(self) -> Path:
        """The instance's pins."""
        return Path("/sys/fs/bpf/vpnr") / self.instance

    def emit(self, port: int, count: int, src: str = SOURCE) -> None:
        """``count`` decisions for SOURCE -> TARGET:port in the kernel (81: denied, 80:
        allowed)."""
        bpfsys.prog_test_run(self.prog, frame(port, src), repeat=count)

    def emitted(self) -> int:
        """The kernel's count of events written to the ring."""
        fd = bpfsys.obj_get(str(self.pins / "audit_lost"))
        try:
            return bpfsys.percpu_u64_totals(fd, layout.AUDIT_LOST_MAX)[layout.AUDIT_EMITTED]
        finally:
            os.close(fd)

    def status(self) -> audit_pb2.AuditStatus:
        """auditd's Status."""
        status: audit_pb2.AuditStatus = self.audit.Status(audit_pb2.AuditStatusRequest(),
                                                          timeout=10)
        return status

    def restart_auditd(self, sig: int) -> None:
        """Stop auditd with ``sig`` and start it again."""
        self.auditd.stop(sig)
        self.channel.close()
        self.auditd = DaemonProcess("auditd", self.config, self.tmp / "run", self.instance,
                                    netns=self.netns).start()
        self.channel = grpc.insecure_channel(f"unix:{self.auditd.socket}")
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)

    def query(self, **filters: object) -> list[audit_pb2.AuditRecord]:
        """Every record matching, newest first (all pages)."""
        found: list[audit_pb2.AuditRecord] = []
        token = ""
        for _ in range(1000):
            reply = self.audit.Query(audit_pb2.QueryRequest(
                filter=audit_pb2.AuditFilter(**filters),  # type: ignore[arg-type]
                page=common_pb2.PageRequest(page_size=5000, page_token=token)), timeout=30)
            found += reply.records
            token = reply.page.next_page_token
            if not token:
                return found
        raise AssertionError("too many pages")


def start_router(tmp: Path, netns: str, instance: str, auditd_extra: str = "",
                 state_dir: Path | None = None) -> Router:
    """policyd (lan0, a policy binding SOURCE to role web: TCP 80 allowed) and auditd with
    its JSON file and syslog to a Unix datagram socket the test holds."""
    syslog_path = tmp / "syslog.sock"
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(str(syslog_path))
    syslog.settimeout(0.2)
    config = tmp / "router.toml"
    text = router_toml(instance, tmp, interface="lan0",
                       extra="audit_allow_sample = 1\n"
                             "audit_events_per_second = 10000000\n"
                             "audit_burst = 10000000\n")
    if state_dir is not None:
        text = text.replace(f'state_dir = "{tmp}/state"', f'state_dir = "{state_dir}"')
    config.write_text(text + "[auditd]\nbatch_interval_ms = 2\n" + auditd_extra
                      + f'[auditd.syslog]\nenabled = true\ntarget = "unix:{syslog_path}"\n'
                        'hostname = "router-a"\n')
    policyd = DaemonProcess("policyd", config, tmp / "run", instance, netns=netns).start()
    with grpc.insecure_channel(f"unix:{policyd.socket}") as channel:
        policy_pb2_grpc.PolicyServiceStub(channel).ReplacePolicy(
            policy_pb2.ReplacePolicyRequest(policy=policy_pb2.PolicyDocument(
                roles=[policy_pb2.Role(name="web", rules=[policy_pb2.Rule(
                    id=7, action=policy_pb2.ACTION_ALLOW, protocol=codes_pb2.PROTOCOL_TCP,
                    dst_port_from=80, dst_port_to=80)])],
                bindings=[policy_pb2.Binding(prefix=f"{SOURCE}/32", roles=["web"])])),
            timeout=30)
    auditd = DaemonProcess("auditd", config, tmp / "run", instance, netns=netns).start()
    channel = grpc.insecure_channel(f"unix:{auditd.socket}")
    prog = bpfsys.obj_get(str(Path("/sys/fs/bpf/vpnr") / instance / "xdp_rbac_prog"))
    return Router(tmp, netns, instance, config, policyd, auditd,
                  audit_pb2_grpc.AuditServiceStub(channel), channel, prog, syslog)


def stop_router(router: Router) -> None:
    """Stop both daemons and release what the test held."""
    router.channel.close()
    router.auditd.stop()
    router.policyd.stop()
    os.close(router.prog)
    router.syslog.close()


@pytest.fixture
def router(tmp_path: Path, netns: str, instance: str) -> Iterator[Router]:
    """A running policyd + auditd pair."""
    running = start_router(tmp_path, netns, instance)
    try:
        yield running
    finally:
        stop_router(running)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check()`` until true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout} s: {what}")


def syslog_messages(sock: socket.socket, limit: int = 10000) -> list[str]:
    """Every datagram waiting on the test's syslog socket."""
    found: list[str] = []
    for _ in range(limit):
        try:
            found.append(sock.recv(65536).decode())
        except TimeoutError:
            break
    return found


def records_of(stream: Iterator[audit_pb2.FollowResponse]) -> Iterator[audit_pb2.AuditRecord]:
    """The records of a Follow stream, one at a time (messages carry several)."""
    for response in stream:
        yield from response.records


def ts(ns: int) -> Timestamp:
    """A Timestamp."""
    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def test_denied_packets_reach_query_follow_json_and_syslog_within_a_second(
        router: Router) -> None:
    follow = router.audit.Follow(audit_pb2.FollowRequest(
        filter=audit_pb2.AuditFilter(src_prefix=f"{SOURCE}/32")), timeout=20)
    time.sleep(0.3)  # the stream is open
    before_ns = time.time_ns()
    started = time.monotonic()
    router.emit(81, 5)
    denied = dict(src_prefix=f"{SOURCE}/32", verdicts=[codes_pb2.VERDICT_DENY])
    wait_for(lambda: len(router.query(**denied)) == 5, 1.0, "5 denied records in Query")
    elapsed = time.monotonic() - started
    records = router.query(**denied)
    ids = [r.id for r in records]
    assert ids == sorted(ids, reverse=True)  # newest first
    for record in records:
        packet = record.packet
        assert record.instance == router.instance
        assert before_ns - 1_000_000_000 <= record.time.ToNanoseconds() <= time.time_ns()
        assert (packet.verdict, packet.reason) == (codes_pb2.VERDICT_DENY,
                                                   codes_pb2.REASON_DEFAULT_DENY)
        assert (packet.src, packet.dst, packet.dst_port, packet.ip_protocol) == (
            SOURCE, TARGET, 81, 6)
        assert list(packet.roles) == ["web"] and packet.rule_id == 0
        assert packet.interface == "lo"  # BPF_PROG_TEST_RUN runs on the caller's loopback
        assert packet.kernel_time_ns > 0 and packet.policy_version >= 1
        assert packet.source == "xdp"
    print(f"5 denied decisions stored and queryable after {elapsed * 1000:.0f} ms")

    followed_records = records_of(follow)
    followed = [next(followed_records) for _ in range(5)]
    follow.cancel()
    assert sorted(r.id for r in followed) == sorted(ids)

    json_file = router.tmp / "state" / "audit.jsonl"
    wait_for(lambda: json_file.exists() and len(
        [x for x in json_file.read_text().splitlines() if json.loads(x).get("id") in ids]) == 5,
        1.0, "5 records in the JSON file")
    lines = [json.loads(x) for x in json_file.read_text().splitlines()]
    mine = [x for x in lines if x["id"] in ids]
    assert all(x["verdict"] == "DENY" and x["reason"] == "DEFAULT_DENY" and x["src"] == SOURCE
               and x["dst_port"] == 81 and x["roles"] == ["web"] and x["time"].endswith("Z")
               and x["codes"]["verdict"] == codes_pb2.VERDICT_DENY for x in mine), mine

    messages: list[str] = []

    def five_in_syslog() -> bool:
        messages.extend(syslog_messages(router.syslog))
        return sum(any(f'id="{i}"' in m for i in ids) for m in messages) >= 5
    wait_for(five_in_syslog, 1.0, "5 syslog messages")
    ours = [m for m in messages if any(f'id="{i}"' in m for i in ids)]
    assert len(ours) == 5
    assert all(m.startswith("<132>1 ") and " router-a vpnr-auditd " in m
               and f'src="{SOURCE}"' in m for m in ours), ours


def stream_events(router: Router, stop: threading.Event, per_tick: int,
                  counted: list[int]) -> None:
    """Denied decisions at a steady rate until ``stop``; counts what it asked for."""
    for _ in range(100_000):
        if stop.is_set():
            return
        router.emit(81, per_tick)
        counted[0] += per_tick
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_restart_during_a_steady_stream_stores_every_event_exactly_once(
        router: Router, sig: int) -> None:
    emitted_before = router.emitted()
    stored_before = len(router.query(src_prefix=f"{SOURCE}/32"))
    stop = threading.Event()
    counted = [0]
    worker = threading.Thread(target=stream_events, args=(router, stop, 20, counted))
    worker.start()
    try:
        time.sleep(1.0)
        router.restart_auditd(sig)
        time.sleep(1.0)
        router.restart_auditd(sig)
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join(10)
    produced = counted[0]
    # Every decision made an event (the veth's own IPv6 chatter may add a few more).
    assert router.emitted() - emitted_before >= produced

    def all_stored() -> bool:
        return len(router.query(src_prefix=f"{SOURCE}/32")) - stored_before == produced
    wait_for(all_stored, 10, f"{produced} events stored")
    records = router.query(src_prefix=f"{SOURCE}/32")
    assert len(records) - stored_before == produced
    assert len({r.id for r in records}) == len(records)  # ids unique
    status = router.status()
    assert status.lost_by_cause["kernel_reserve_failed"] == 0
    assert status.lost_by_cause["sink_sqlite_dropped"] == 0
    print(f"{produced} events across two {signal.Signals(sig).name} restarts: "
          f"{len(records) - stored_before} stored, none twice")


def test_bad_queries_are_refused_naming_the_field(router: Router) -> None:
    now = time.time_ns()
    bad = {
        "filter.time": audit_pb2.QueryRequest(
            filter=audit_pb2.AuditFilter(time=common_pb2.TimeRange(start=ts(now), end=ts(now - 1))),
            page=common_pb2.PageRequest(page_size=10)),
        "filter.src_prefix": audit_pb2.QueryRequest(
            filter=audit_pb2.AuditFilter(src_prefix="10.1.0.300/24"),
            page=common_pb2.PageRequest(page_size=10)),
        "filter.dst_prefix": audit_pb2.QueryRequest(
            filter=audit_pb2.AuditFilter(dst_prefix="bogus"),
            page=common_pb2.PageRequest(page_size=10)),
        "page.page_token": audit_pb2.QueryRequest(
            page=common_pb2.PageRequest(page_size=10, page_token="x")),
    }
    for field, request in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            router.audit.Query(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (err.value.details() or ""), (field, err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        router.audit.Query(audit_pb2.QueryRequest(
            page=common_pb2.PageRequest(page_size=1_000_000_000)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "between 1 and 5000" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        next(router.audit.Follow(audit_pb2.FollowRequest(
            filter=audit_pb2.AuditFilter(src_prefix="nope")), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        router.audit.Stats(audit_pb2.StatsRequest(
            time=common_pb2.TimeRange(start=ts(now), end=ts(now))), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for detail in ("{not json", "[1, 2]"):
        with pytest.raises(grpc.RpcError) as err:
            router.audit.Record(audit_pb2.RecordRequest(event=audit_pb2.ControlEvent(
                daemon="test", action="x", detail_json=detail)), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "detail_json" in (err.value.details() or "")
    assert router.status().sinks[0].healthy  # nothing stored was harmed


def test_page_size_zero_means_the_default_page_of_100(router: Router) -> None:
    """proto/vpnr/v1/common.proto: page_size 0 is the server default, as for the other
    services (auditd used to refuse it)."""
    router.emit(81, 150)
    mine = audit_pb2.AuditFilter(src_prefix=f"{SOURCE}/32")
    wait_for(lambda: len(router.query(src_prefix=f"{SOURCE}/32")) == 150, 5.0,
             "150 records stored")
    first = router.audit.Query(audit_pb2.QueryRequest(filter=mine), timeout=10)
    assert len(first.records) == 100 and first.page.next_page_token
    rest = router.audit.Query(audit_pb2.QueryRequest(filter=mine, page=common_pb2.PageRequest(
        page_size=0, page_token=first.page.next_page_token)), timeout=10)
    assert len(rest.records) == 50 and not rest.page.next_page_token
    ids = [r.id for r in first.records] + [r.id for r in rest.records]
    assert ids == [r.id for r in router.query(src_prefix=f"{SOURCE}/32")]  # newest first
    with pytest.raises(grpc.RpcError) as err:
        router.audit.Query(audit_pb2.QueryRequest(
            filter=mine, page=common_pb2.PageRequest(page_size=5001)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("page.page_size: must be between 1 and 5000")


def test_query_filters_stats_export_and_control_records(router: Router) -> None:
    router.emit(81, 30)             # denied, role web
    router.emit(80, 10)             # allowed by rule 7 (sampled 1 in 1)
    router.emit(81, 4, src=OTHER)   # denied, no role
    control = router.audit.Record(audit_pb2.RecordRequest(event=audit_pb2.ControlEvent(
        daemon="test", action="policy.replace", actor="uid:0", version_before=1,
        version_after=2, detail_json='{"why": "test"}', success=True)), timeout=10)
    wait_for(lambda: len(router.query(src_prefix="10.1.0.0/24")) >= 44, 2, "44 records")
    assert len(router.query(src_prefix=f"{SOURCE}/32", verdicts=[codes_pb2.VERDICT_DENY])) == 30
    assert len(router.query(src_prefix=f"{SOURCE}/32", verdicts=[codes_pb2.VERDICT_ALLOW])) == 10
    assert len(router.query(rule_id=7)) == 10
    assert len(router.query(role="web")) == 40
    assert len(router.query(role="nobody")) == 0
    assert len(router.query(src_prefix=f"{OTHER}/32")) == 4
    assert len(router.query(dst_prefix="2001:db8::/32")) == 0
    controls = router.query(control_only=True)
    assert [c.id for c in controls if c.control.action == "policy.replace"] == [control.id]
    assert controls[0].control.actor == "uid:0" and controls[0].control.version_after == 2

    # Pages: newest first, no overlap, nothing missed.
    seen: list[int] = []
    token = ""
    for _ in range(20):
        page = router.audit.Query(audit_pb2.QueryRequest(
            filter=audit_pb2.AuditFilter(src_prefix="10.1.0.0/24"),
            page=common_pb2.PageRequest(page_size=7, page_token=token)), timeout=10)
        seen += [r.id for r in page.records]
        token = page.page.next_page_token
        if not token:
            break
    assert seen == [r.id for r in router.query(src_prefix="10.1.0.0/24")]

    stats = router.audit.Stats(audit_pb2.StatsRequest(top=5), timeout=10)
    assert stats.denied >= 34 and stats.allowed >= 10
    top_sources = {e.key: e.count for e in stats.top_sources}
    assert top_sources[SOURCE] >= 40 and top_sources[OTHER] >= 4
    assert {e.key: e.count for e in stats.top_rules}["7 (web)"] >= 10
    assert "kernel_reserve_failed" in stats.lost_by_cause

    exported = b"".join(c.jsonl for c in router.audit.Export(audit_pb2.ExportRequest(
        filter=audit_pb2.AuditFilter(src_prefix="10.1.0.0/24")), timeout=30))
    lines = [json.loads(x) for x in exported.decode().splitlines()]
    assert [x["id"] for x in lines] == sorted(seen)
    assert {x["verdict"] for x in lines} == {"ALLOW", "DENY"}


def test_follow_resumes_from_a_cursor_and_cuts_off_a_client_that_stops_reading(
        tmp_path: Path, netns: str, instance: str) -> None:
    router = start_router(tmp_path, netns, instance, auditd_extra="follow_buffer = 50\n")
    try:
        router.emit(81, 10)
        wait_for(lambda: len(router.query(src_prefix=f"{SOURCE}/32")) == 10, 2, "10 records")
        first = sorted(r.id for r in router.query(src_prefix=f"{SOURCE}/32"))
        # From a cursor: the records after it, oldest first, then live ones.
        stream = router.audit.Follow(audit_pb2.FollowRequest(
            filter=audit_pb2.AuditFilter(src_prefix=f"{SOURCE}/32"), after_id=first[4]),
            timeout=20)
        streamed = records_of(stream)
        assert [next(streamed).id for _ in range(5)] == first[5:]
        router.emit(81, 3)
        live = [next(streamed).id for _ in range(3)]
        assert live == sorted(live) and live[0] > first[-1]
        stream.cancel()

        # A client that stops reading while 3000 records arrive is cut off with the cursor
        # once HTTP/2 flow control stops the server (a fixed 64 KiB window: no BDP probe).
        slow = grpc.insecure_channel(f"unix:{router.auditd.socket}",
                                     options=[("grpc.http2.bdp_probe", 0)])
        stalled = audit_pb2_grpc.AuditServiceStub(slow).Follow(audit_pb2.FollowRequest(
            filter=audit_pb2.AuditFilter(src_prefix=f"{SOURCE}/32")), timeout=30)
        router.emit(81, 1)
        stalled_records = records_of(stalled)
        got = [next(stalled_records).id]
        for _ in range(30):
            router.emit(81, 100)
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as err:
            for record in stalled_records:
                got.append(record.id)
        slow.close()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = {item.key: str(item.value) for item in err.value.trailing_metadata() or ()}
        resume = trailers["vpnr-resume-after-id"]
        assert int(resume) == got[-1]
        resumed = router.audit.Follow(audit_pb2.FollowRequest(
            filter=audit_pb2.AuditFilter(src_prefix=f"{SOURCE}/32"), after_id=int(resume)),
            timeout=20)
        expected = sorted(r.id for r in router.query(src_prefix=f"{SOURCE}/32")
                          if r.id >= got[0])
        resumed_records = records_of(resumed)
        rest = [next(resumed_records).id for _ in range(len(expected) - len(got))]
        resumed.cancel()
        assert got + rest == expected
    finally:
        stop_router(router)


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real, small filesystem that fills up."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", unique("vpnrfull"),
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_under_the_json_file_is_reported_and_sqlite_and_syslog_keep_working(
        tmp_path: Path, netns: str, instance: str) -> None:
    with tiny_tmpfs(tmp_path / "full", "64k") as full:
        (full / "filler").write_bytes(b"\0" * (60 * 1024))
        router = start_router(tmp_path, netns, instance,
                              auditd_extra=f'[auditd.json]\npath = "{full}/audit.jsonl"\n')
        try:
            router.emit(81, 200)
            wait_for(lambda: len(router.query(src_prefix=f"{SOURCE}/32")) == 200, 2,
                     "200 records in SQLite")

            def json_failing() -> bool:
                sink = {s.name: s for s in router.status().sinks}["json"]
                return not sink.healthy and sink.dropped > 0
            wait_for(json_failing, 5, "json sink reported failing")
            status = router.status()
            sinks = {s.name: s for s in status.sinks}
            assert "No space left" in sinks["json"].error and str(full) in sinks["json"].error
            assert sinks["sqlite"].healthy and sinks["sqlite"].written >= 200
            assert any(w.code == "SINK" and "json" in w.message for w in status.warnings)
            assert status.lost_by_cause["sink_json_dropped"] > 0
            assert len([m for m in syslog_messages(router.syslog) if f'src="{SOURCE}"' in m]) \
                == 200
        finally:
            stop_router(router)


def test_a_full_disk_under_sqlite_is_reported_and_the_json_file_keeps_working(
        tmp_path: Path, netns: str, instance: str) -> None:
    with tiny_tmpfs(tmp_path / "full", "2m") as full:
        router = start_router(tmp_path, netns, instance, state_dir=full,
                              auditd_extra=f'[auditd.json]\npath = "{tmp_path}/audit.jsonl"\n')
        try:
            def sqlite_failing() -> bool:
                router.emit(81, 2000)
                sink = {s.name: s for s in router.status().sinks}["sqlite"]
                return not sink.healthy
            wait_for(sqlite_failing, 20, "sqlite sink reported failing")
            status = router.status()
            sqlite = {s.name: s for s in status.sinks}["sqlite"]
            assert "full" in sqlite.error, sqlite.error
            assert status.lost_by_cause["sink_sqlite_dropped"] > 0
            lines_before = len((tmp_path / "audit.jsonl").read_text().splitlines())
            router.emit(81, 50)
            wait_for(lambda: len((tmp_path / "audit.jsonl").read_text().splitlines())
                     >= lines_before + 50, 3, "JSON file still written")
            assert router.audit.Query(audit_pb2.QueryRequest(
                page=common_pb2.PageRequest(page_size=5)), timeout=10).records  # reads work
        finally:
            stop_router(router)


def test_a_full_ring_while_auditd_is_down_is_counted_exactly(
        tmp_path: Path, netns: str, instance: str) -> None:
    router = start_router(tmp_path, netns, instance,
                          auditd_extra=f"metrics_port = {METRICS_PORT}\n")
    try:
        stored_before = len(router.query(src_prefix=f"{SOURCE}/32"))
        lost_before = router.status().lost_by_cause["kernel_reserve_failed"]
        router.auditd.stop()
        ring_events = (8 << 20) // 128   # the default 8 MiB ring holds 65536 records
        generated = ring_events + 5000
        router.emit(81, generated)       # nobody drains: the ring fills, the rest is counted
        router.restart_auditd(signal.SIGTERM)  # already stopped: this starts it
        wait_for(lambda: len(router.query(src_prefix=f"{SOURCE}/32")) - stored_before
                 >= ring_events - 100, 10, "the waiting events drained first")
        time.sleep(0.5)
        stored = len(router.query(src_prefix=f"{SOURCE}/32")) - stored_before
        lost = router.status().lost_by_cause["kernel_reserve_failed"] - lost_before
        # Every event generated is either stored or counted as a failed reserve (the veth's
        # own IPv6 chatter can take a few slots of the ring meanwhile).
        assert generated <= stored + lost <= generated + 20, (stored, lost, generated)
        assert lost >= 5000
        scraped = subprocess.run(
            ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c",
             "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
             f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())"],
            capture_output=True, text=True, timeout=20, check=True).stdout
        metric = re.search(r'^vpnr_audit_lost_records_total\{cause="kernel_reserve_failed"\} '
                           r"(\S+)$", scraped, re.MULTILINE)
        assert metric and float(metric.group(1)) >= lost
        assert re.search(r'^vpnr_audit_sink_healthy\{sink="sqlite"\} 1\.0$', scraped,
                         re.MULTILINE)
    finally:
        stop_router(router)


def test_full_chunks_are_sealed_indexed_and_deleted_by_retention(
        tmp_path: Path, netns: str, instance: str) -> None:
    # Chunks of 100 records; retention of 2 seconds (0.0000231 days).
    router = start_router(tmp_path, netns, instance,
                          auditd_extra="chunk_rows = 100\nretention_days = 0.0000231\n")
    try:
        router.emit(81, 150)
        wait_for(lambda: len(router.query(src_prefix=f"{SOURCE}/32")) == 150, 3, "150 stored")
        router.emit(81, 100)  # the first write past 100 records seals the open chunk
        wait_for(lambda: len(router.query(src_prefix=f"{SOURCE}/32")) == 250, 3, "250 stored")
        chunk_dir = tmp_path / "state" / "audit.sqlite.chunks"

        def indexed() -> bool:
            sealed = sorted(chunk_dir.glob("*.sqlite"))[0]
            with contextlib.closing(sqlite3.connect(f"file:{sealed}?mode=ro", uri=True)) as db:
                names = {r[0] for r in db.execute(
                    "SELECT name FROM sqlite_master WHERE type='index'")}
                plan = " ".join(str(r) for r in db.execute(
                    "EXPLAIN QUERY PLAN SELECT id FROM records WHERE src BETWEEN ? AND ?",
                    (b"\x0a\x01\x00\x00", b"\x0a\x01\x00\xff")))
            return {"records_src", "records_time", "records_roleset"} <= names and \
                "records_src" in plan
        wait_for(indexed, 5, "the sealed chunk indexed, and used for an address range")
        assert router.status().chunks >= 2
        time.sleep(2.5)       # the first chunk's records are now past retention
        router.emit(81, 100)  # the next seal applies retention
        wait_for(lambda: router.status().lost_by_cause["retention_deleted"] >= 100, 5,
                 "retention deleted the old chunk")
        # Whole chunks went, with whatever else they held (the veth's own IPv6 chatter is
        # audited too): what is left and what was deleted add up to everything stored.
        status = router.status()
        assert len(router.query()) == status.last_id - status.lost_by_cause["retention_deleted"]
        assert len(router.query(src_prefix=f"{SOURCE}/32")) < 350
    finally:
        stop_router(router)
