"""auditd's JSON lines and syslog sinks against real files, a real full disk and real
sockets: what they write, rotation, bounded buffers, failures and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import unique
from vpnr.auditd import records as R
from vpnr.auditd.jsonfile import JsonLinesSink
from vpnr.auditd.records import Formatter, Row
from vpnr.auditd.sinks import Sink
from vpnr.auditd.syslog import SyslogAddress, SyslogFormat, SyslogSink, rfc3339_micro
from vpnr.core.config import JsonSinkConfig, SyslogSinkConfig
from vpnr.v1 import codes_pb2

ROLESETS = {1: ("sales",), 2: ("sales", "eng")}
FORMATTER = Formatter("r1", ROLESETS)
BASE_NS = 1_795_255_200_123_456_789  # 2026-11-21T10:00:00.123456789Z
WAIT = 5.0  # seconds any single condition may take

# RFC 5424 section 6 ABNF as regular expressions.
PRINTUSASCII = r"[\x21-\x7e]"
SD_NAME = r'[\x21\x23-\x3c\x3e-\x5c\x5e-\x7e]{1,32}'  # PRINTUSASCII except = SP ] "
PARAM_VALUE = r'(?:[^"\\\]]|\\["\\\]])*'  # '"', '\' and ']' MUST be escaped (6.3.3)
SD_ELEMENT = rf'\[{SD_NAME}(?: {SD_NAME}="{PARAM_VALUE}")*\]'
SYSLOG_MSG = re.compile(
    r"<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) "
    r"(?P<timestamp>-|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})) "
    rf"(?P<hostname>-|{PRINTUSASCII}{{1,255}}) (?P<app>-|{PRINTUSASCII}{{1,48}}) "
    rf"(?P<procid>-|{PRINTUSASCII}{{1,128}}) (?P<msgid>-|{PRINTUSASCII}{{1,32}}) "
    rf"(?P<sd>-|(?:{SD_ELEMENT})+)(?: (?P<msg>.*))?", re.DOTALL)
SD_PARAM = re.compile(rf'({SD_NAME})="({PARAM_VALUE})"')


def packet_row(record_id: int, *, verdict: int = codes_pb2.VERDICT_DENY,
               reason: int = codes_pb2.REASON_RULE_DENY, src: str = "10.1.0.11",
               dst: str = "10.1.0.1", sport: int = 40000, dport: int = 22, proto: int = 6,
               roleset: int = 1, rule: int = 22) -> Row:
    """A packet record in the column layout of records.py."""
    values: dict[str, Any] = {
        "id": record_id, "time_ns": BASE_NS + record_id, "kind": R.KIND_PACKET,
        "verdict": verdict, "reason": reason,
        "src": socket.inet_pton(socket.AF_INET6 if ":" in src else socket.AF_INET, src),
        "dst": socket.inet_pton(socket.AF_INET6 if ":" in dst else socket.AF_INET, dst),
        "src_port": sport, "dst_port": dport, "ip_protocol": proto, "roleset": roleset,
        "rule_id": rule, "rule_role": "sales", "interface": "lan0",
        "src_zone": codes_pb2.ZONE_INTERNAL, "dst_zone": codes_pb2.ZONE_EXTERNAL,
        "peer": "", "policy_version": 4, "kernel_ns": 123, "pkt_len": 60,
        "icmp_type": R.NO_ICMP, "flags": 0, "source": 1,
    }
    return tuple(values[name] for name in R.COLUMNS[:R.PACKET_WIDTH])


def control_row(record_id: int, *, actor: str = "policyd-api", success: bool = True,
                error: str = "") -> Row:
    """A control-plane record in the column layout of records.py."""
    values: dict[str, Any] = dict.fromkeys(R.COLUMNS)
    values.update({
        "id": record_id, "time_ns": BASE_NS + record_id, "kind": R.KIND_CONTROL,
        "daemon": "policyd", "action": "policy.replace", "actor": actor,
        "version_before": 3, "version_after": 4, "success": int(success),
        "detail": '{"rules": 2}', "error": error,
    })
    return tuple(values[name] for name in R.COLUMNS)


def ids_of(path: Path) -> list[int]:
    """The record ids of a JSON lines file (every line must parse)."""
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


async def eventually(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` until true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(sink: Sink) -> AsyncIterator[Sink]:
    """Start ``sink`` and close it (bounded) however the test ends."""
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close(timeout=1.0)


def syslog_config(target: str, **settings: Any) -> SyslogSinkConfig:
    return SyslogSinkConfig(enabled=True, target=target, hostname="router-1", **settings)


def parse_syslog(raw: bytes) -> tuple[re.Match[str], dict[str, str]]:
    """Match one message against the ABNF; its SD-PARAMs unescaped."""
    text = raw.decode()
    match = SYSLOG_MSG.fullmatch(text)
    assert match, f"not RFC 5424: {text!r}"
    params = {name: re.sub(r'\\(["\\\]])', r"\1", value)
              for name, value in SD_PARAM.findall(match["sd"])}
    return match, params


def parse_octet_counted(stream: bytes) -> tuple[list[bytes], bytes]:
    """RFC 6587 section 3.4.1 frames ``MSG-LEN SP SYSLOG-MSG``; (messages, rest)."""
    messages = []
    while match := re.match(rb"([1-9][0-9]*) ", stream):
        end = match.end() + int(match[1])
        if end > len(stream):
            break
        messages.append(stream[match.end():end])
        stream = stream[end:]
    return messages, stream


async def read_frames(conn: socket.socket, count: int) -> list[bytes]:
    """Read octet-counted frames from a non-blocking stream socket until ``count``."""
    loop = asyncio.get_running_loop()
    messages: list[bytes] = []
    pending = b""
    deadline = time.monotonic() + WAIT
    while len(messages) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"got {len(messages)} of {count} frames"
        chunk = await asyncio.wait_for(loop.sock_recv(conn, 65536), remaining)
        assert chunk, f"connection closed after {len(messages)} of {count} frames"
        got, pending = parse_octet_counted(pending + chunk)
        messages += got
    assert pending == b""
    return messages


async def read_datagrams(sock: socket.socket, count: int) -> list[bytes]:
    """Receive ``count`` datagrams from a non-blocking socket, bounded in time."""
    loop = asyncio.get_running_loop()
    return [await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT) for _ in range(count)]


@pytest.fixture
def udp_listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    with sock:
        yield sock


@pytest.fixture
def tcp_socket() -> Iterator[socket.socket]:
    """A TCP socket bound to an ephemeral port of 127.0.0.1, not yet listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    with sock:
        yield sock


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, unmounted after the test."""
    mount_point = tmp_path / unique("fs")
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs",
                    str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


# --- JSON lines ----------------------------------------------------------------------------


async def test_json_lines_are_the_formatter_records(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"  # the directory is created
    rows = [packet_row(1), control_row(2, error="x"),
            packet_row(3, src="2001:db8::1", dst="2001:db8::2", proto=17, roleset=2),
            packet_row(4, verdict=codes_pb2.VERDICT_ALLOW, reason=codes_pb2.REASON_RULE_ALLOW,
                       proto=1, sport=0, dport=0)]
    sink = JsonLinesSink(JsonSinkConfig(), path, FORMATTER)
    async with running(sink):
        assert sink.status().healthy
        sink.offer(rows)
        await eventually(lambda: sink.status().written == len(rows), "rows written")
        status = sink.status()
        assert (status.name, status.enabled, status.healthy, status.error) == (
            "json", True, True, "")
        assert (status.dropped, status.buffered, status.target) == (0, 0, str(path))
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [FORMATTER.to_dict(row) for row in rows]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_json_rotates_by_size_keeping_keep_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    (tmp_path / "audit.jsonl.9").write_text("left by a larger keep_files\n")
    config = JsonSinkConfig(keep_files=3)
    limit = 4096
    sink = JsonLinesSink(config, path, FORMATTER, max_file_bytes=limit)
    total = 300
    async with running(sink):
        for first in range(1, total + 1, 50):  # several offers, one batch spanning rotations
            sink.offer([packet_row(i) for i in range(first, first + 50)])
        await eventually(lambda: sink.status().written == total, "all rows written")
        assert sink.status().healthy
    kept = [path.with_name(f"audit.jsonl.{n}") for n in (3, 2, 1)] + [path]
    assert all(file.exists() for file in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
    assert all(0 < file.stat().st_size <= limit for file in kept)
    ids = [record_id for file in kept for record_id in ids_of(file)]
    assert ids == list(range(ids[0], total + 1))  # oldest to newest, nothing missing
    line = len(FORMATTER.to_json(packet_row(100))) + 1
    assert all(file.stat().st_size + line > limit for file in kept[:-1])  # rotated when full


async def test_json_rotates_by_age(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonLinesSink(JsonSinkConfig(rotate_seconds=1), path, FORMATTER)
    rotated = path.with_name("audit.jsonl.1")
    async with running(sink):
        sink.offer([packet_row(i) for i in (1, 2, 3)])
        await eventually(lambda: sink.status().written == 3, "first rows written")
        assert not rotated.exists()
        await eventually(rotated.exists, "a quiet file rotated by age", timeout=3.0)
        sink.offer([packet_row(i) for i in (4, 5)])
        await eventually(lambda: sink.status().written == 5, "later rows written")
    assert ids_of(rotated) == [1, 2, 3]
    assert ids_of(path) == [4, 5]


async def test_json_existing_file_ages_from_its_last_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text(FORMATTER.to_json(packet_row(1)) + "\n")
    hour_ago = time.time() - 3600
    os.utime(path, (hour_ago, hour_ago))
    sink = JsonLinesSink(JsonSinkConfig(rotate_seconds=600), path, FORMATTER)
    async with running(sink):
        sink.offer([packet_row(2)])
        await eventually(lambda: sink.status().written == 1, "row written")
    assert ids_of(path.with_name("audit.jsonl.1")) == [1]
    assert ids_of(path) == [2]


@pytest.mark.parametrize("layout", ["parent is a file", "path is a directory"])
async def test_json_unwritable_path_is_unhealthy_and_drops(tmp_path: Path, layout: str) -> None:
    if layout == "parent is a file":
        (tmp_path / "plain").write_text("x")
        path, reason = tmp_path / "plain" / "audit.jsonl", "Not a directory"
    else:
        path, reason = tmp_path / "audit.jsonl", "Is a directory"
        path.mkdir()
    sink = JsonLinesSink(JsonSinkConfig(buffer_records=10), path, FORMATTER)
    async with running(sink):
        status = sink.status()
        assert not status.healthy
        assert str(path) in status.error and reason in status.error
        sink.offer([packet_row(i) for i in range(1, 26)])  # never raises
        assert (sink.status().buffered, sink.status().dropped) == (10, 15)
        # the retry (at most once a second) fails too: that batch is dropped and counted
        await eventually(lambda: sink.status().dropped == 25, "failed batch dropped")
        assert sink.running and sink.status().written == 0


@pytest.mark.root
async def test_json_full_disk_then_space_again(tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "audit.jsonl"
    sink = JsonLinesSink(JsonSinkConfig(), path, FORMATTER)
    offered = 0
    async with running(sink):
        deadline = time.monotonic() + WAIT
        while sink.status().healthy:  # 64 KiB hold about a hundred records
            assert offered < 5000 and time.monotonic() < deadline, "disk never filled"
            sink.offer([packet_row(i) for i in range(offered + 1, offered + 21)])
            offered += 20
            await asyncio.sleep(0.01)
        status = sink.status()
        assert str(path) in status.error and "No space left" in status.error
        assert status.dropped > 0 and sink.running
        ids = ids_of(path)  # a torn last line was cut back: every line parses
        assert ids == list(range(1, len(ids) + 1)) and len(ids) == status.written

        subprocess.run(["mount", "-o", "remount,size=1m", str(tiny_tmpfs)], check=True)
        sink.offer([packet_row(i) for i in range(offered + 1, offered + 6)])
        offered += 5
        await eventually(lambda: sink.status().healthy and sink.status().buffered == 0,
                         "healthy again after space was freed")
        status = sink.status()
        assert status.error == "" and ids_of(path)[-5:] == list(range(offered - 4, offered + 1))
        assert status.written + status.dropped == offered
        assert len(ids_of(path)) == status.written


async def test_disabled_sink_does_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonLinesSink(JsonSinkConfig(enabled=False), path, FORMATTER)
    async with running(sink):
        sink.offer([packet_row(1)])
        assert not sink.running
    status = sink.status()
    assert (status.enabled, status.healthy, status.written, status.dropped) == (
        False, True, 0, 0)
    assert not path.exists()


# --- bounded buffer ------------------------------------------------------------------------


async def test_offer_beyond_buffer_drops_exactly_the_excess_while_stalled(
        tcp_socket: socket.socket) -> None:
    # A receiver that never reads: once its window and our send buffer fill, the sink's
    # writer waits on the socket and every offered row has to fit in the buffer.
    tcp_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tcp_socket.listen(1)
    port = tcp_socket.getsockname()[1]
    limit = 1000
    sink = SyslogSink(syslog_config(f"tcp://127.0.0.1:{port}", buffer_records=limit),
                      FORMATTER)
    offered = 0
    async with running(sink):
        last_written, still = -1, 0
        for _ in range(400):  # until nothing was written for 0.3 s with rows waiting
            sink.offer([packet_row(i) for i in range(offered + 1, offered + 201)])
            offered += 200
            await asyncio.sleep(0.05)
            status = sink.status()
            still = still + 1 if status.written == last_written and status.buffered else 0
            last_written = status.written
            if still >= 6:
                break
        assert still >= 6, "the writer never stalled"
        before = sink.status()
        excess = 7
        sink.offer([packet_row(i) for i in range(offered + 1,
                                                 offered + limit - before.buffered + excess + 1)])
        offered += limit - before.buffered + excess
        after = sink.status()
        assert after.dropped - before.dropped == excess
        assert after.buffered == limit
        sink.offer([packet_row(offered + 1), packet_row(offered + 2)])
        offered += 2
        assert sink.status().dropped - after.dropped == 2
        await asyncio.sleep(0.3)  # the loop runs; the writer is still stuck
        assert sink.status().written == after.written
        started = time.monotonic()
        await sink.close(timeout=0.5)
        assert time.monotonic() - started < 2.0
        final = sink.status()
        assert final.buffered == 0 and final.written + final.dropped == offered


# --- syslog --------------------------------------------------------------------------------


def test_syslog_targets_parse() -> None:
    assert SyslogAddress.parse("unix:/dev/log") == SyslogAddress("unix", "/dev/log")
    assert SyslogAddress.parse("udp://[2001:db8::1]:514") == SyslogAddress(
        "udp", "2001:db8::1", 514)
    assert SyslogAddress.parse("tcp://logs.example:6514") == SyslogAddress(
        "tcp", "logs.example", 6514)
    with pytest.raises(ValueError, match="not a syslog target"):
        SyslogAddress.parse("http://x:1")


def test_syslog_format_without_io() -> None:
    form = SyslogFormat.create(FORMATTER, "", "vpnr-auditd")
    assert form.hostname == (socket.gethostname() or "-")
    assert rfc3339_micro(BASE_NS) == "2026-11-21T10:00:00.123456Z"
    assert rfc3339_micro(BASE_NS - 123_456_789 + 999_999_999) == "2026-11-21T10:00:00.999999Z"
    match, params = parse_syslog(form.message(packet_row(
        7, src="2001:db8::1", dst="2001:db8::2", sport=5000, dport=53, proto=17, roleset=0,
        verdict=codes_pb2.VERDICT_ALLOW, reason=codes_pb2.REASON_RULE_ALLOW)))
    assert match["msg"] == ("ALLOW udp [2001:db8::1]:5000 -> [2001:db8::2]:53 roles=- "
                            "rule=22 RULE_ALLOW")
    assert params["roles"] == ""
    match, _ = parse_syslog(form.message(control_row(8, actor="a\nb", success=False,
                                                     error="disk full\nretry")))
    assert match["msg"] == "policyd policy.replace v3->v4 by a b failed: disk full retry"


async def test_syslog_udp_messages_follow_rfc5424(udp_listener: socket.socket) -> None:
    port = udp_listener.getsockname()[1]
    sink = SyslogSink(syslog_config(f"udp://127.0.0.1:{port}"), FORMATTER)
    tricky = 'ops "root" [x]\\y'
    rows = [packet_row(1), packet_row(2, verdict=codes_pb2.VERDICT_ALLOW,
                                      reason=codes_pb2.REASON_RULE_ALLOW, roleset=2),
            control_row(3, actor=tricky), control_row(4, success=False, error="no space")]
    async with running(sink):
        sink.offer(rows)
        datagrams = await read_datagrams(udp_listener, len(rows))
        await eventually(lambda: sink.status().written == len(rows), "written counted")
        assert sink.status().healthy
    parsed = [parse_syslog(raw) for raw in datagrams]
    assert [int(m["pri"]) for m, _ in parsed] == [132, 134, 133, 131]
    for match, params in parsed:
        assert match["version"] == "1"
        assert match["timestamp"] == rfc3339_micro(BASE_NS + int(params["id"]))
        assert (match["hostname"], match["app"], match["procid"]) == (
            "router-1", "vpnr-auditd", str(os.getpid()))
        assert match["sd"].startswith("[vpnr@32473 ")
        assert "\n" not in match["msg"]
    (deny, deny_params), (allow, allow_params) = parsed[0], parsed[1]
    assert deny["msgid"] == "packet"
    assert deny_params == {
        "id": "1", "instance": "r1", "verdict": "DENY", "reason": "RULE_DENY",
        "src": "10.1.0.11", "dst": "10.1.0.1", "sport": "40000", "dport": "22",
        "proto": "tcp", "roles": "sales", "rule": "22", "iface": "lan0",
        "zone": "INTERNAL>EXTERNAL"}
    assert deny["msg"] == "DENY tcp 10.1.0.11:40000 -> 10.1.0.1:22 roles=sales rule=22 RULE_DENY"
    assert allow_params["roles"] == "sales,eng"
    assert allow["msg"] == ("ALLOW tcp 10.1.0.11:40000 -> 10.1.0.1:22 roles=sales,eng rule=22 "
                            "RULE_ALLOW")
    (control, control_params), (failed, _) = parsed[2], parsed[3]
    assert control["msgid"] == "control"
    assert control_params == {
        "id": "3", "instance": "r1", "daemon": "policyd", "action": "policy.replace",
        "actor": tricky, "vbefore": "3", "vafter": "4", "success": "true"}
    assert 'actor="ops \\"root\\" [x\\]\\\\y"' in control["sd"]
    assert control["msg"] == f"policyd policy.replace v3->v4 by {tricky} ok"
    assert failed["msg"] == "policyd policy.replace v3->v4 by policyd-api failed: no space"


async def test_syslog_tcp_uses_octet_counting(tcp_socket: socket.socket) -> None:
    tcp_socket.listen(1)
    port = tcp_socket.getsockname()[1]
    sink = SyslogSink(syslog_config(f"tcp://127.0.0.1:{port}"), FORMATTER)
    rows = [packet_row(1), control_row(2, actor="müller ü"), packet_row(3)]  # bytes != chars
    loop = asyncio.get_running_loop()
    async with running(sink):
        conn, _ = await asyncio.wait_for(loop.sock_accept(tcp_socket), WAIT)
        with conn:
            sink.offer(rows)
            messages = await read_frames(conn, len(rows))
    assert [parse_syslog(m)[1]["id"] for m in messages] == ["1", "2", "3"]
    assert parse_syslog(messages[1])[1]["actor"] == "müller ü"
    assert not any(m.endswith(b"\n") for m in messages)


async def test_syslog_unix_datagram(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    assert len(str(path)) < 108  # sun_path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.setblocking(False)
        sink = SyslogSink(syslog_config(f"unix:{path}"), FORMATTER)
        async with running(sink):
            sink.offer([packet_row(1), control_row(2)])
            datagrams = await read_datagrams(receiver, 2)
            await eventually(lambda: sink.status().written == 2, "written counted")
    assert [parse_syslog(d)[0]["msgid"] for d in datagrams] == ["packet", "control"]


async def test_syslog_unix_stream_socket_is_octet_counted(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        sink = SyslogSink(syslog_config(f"unix:{path}"), FORMATTER)
        async with running(sink):
            assert sink.status().healthy
            conn, _ = await asyncio.wait_for(loop.sock_accept(listener), WAIT)
            with conn:
                sink.offer([packet_row(1), packet_row(2)])
                messages = await read_frames(conn, 2)
    assert [parse_syslog(m)[1]["id"] for m in messages] == ["1", "2"]


async def test_syslog_target_down_then_up(tcp_socket: socket.socket) -> None:
    port = tcp_socket.getsockname()[1]  # bound, not listening: connections are refused
    target = f"tcp://127.0.0.1:{port}"
    sink = SyslogSink(syslog_config(target, buffer_records=8), FORMATTER)
    loop = asyncio.get_running_loop()
    async with running(sink):
        status = sink.status()
        assert not status.healthy and target in status.error
        sink.offer([packet_row(i) for i in range(1, 11)])
        await asyncio.sleep(1.3)  # at least one reconnect, refused again
        status = sink.status()
        assert not status.healthy and "refused" in status.error
        assert (status.buffered, status.dropped, status.written) == (8, 2, 0)
        assert sink.running

        tcp_socket.listen(1)
        conn, _ = await asyncio.wait_for(loop.sock_accept(tcp_socket), WAIT)
        with conn:
            messages = await read_frames(conn, 8)
            assert [int(parse_syslog(m)[1]["id"]) for m in messages] == list(range(1, 9))
            await eventually(lambda: sink.status().healthy, "healthy again")
            status = sink.status()
            assert (status.error, status.written, status.buffered) == ("", 8, 0)


async def test_syslog_reconnects_after_the_receiver_restarts(tcp_socket: socket.socket) -> None:
    tcp_socket.listen(1)
    port = tcp_socket.getsockname()[1]
    sink = SyslogSink(syslog_config(f"tcp://127.0.0.1:{port}"), FORMATTER)
    loop = asyncio.get_running_loop()
    async with running(sink):
        conn, _ = await asyncio.wait_for(loop.sock_accept(tcp_socket), WAIT)
        with conn:
            sink.offer([packet_row(1)])
            assert len(await read_frames(conn, 1)) == 1
        await asyncio.sleep(0.1)  # the receiver has gone; its FIN has arrived
        sink.offer([packet_row(2), packet_row(3)])
        conn, _ = await asyncio.wait_for(loop.sock_accept(tcp_socket), WAIT)
        with conn:
            messages = await read_frames(conn, 2)
        assert [parse_syslog(m)[1]["id"] for m in messages] == ["2", "3"]
        await eventually(lambda: sink.status().written == 3, "all written")
        assert sink.status().healthy and sink.status().dropped == 0


async def test_syslog_start_is_bounded_when_the_host_does_not_answer(
        tcp_socket: socket.socket) -> None:
    # A full accept queue makes Linux drop further SYNs: the connect neither succeeds nor
    # fails, as with a firewalled host.
    tcp_socket.listen(0)
    port = tcp_socket.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # until a connect goes unanswered
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.fail("the accept queue never filled")
        target = f"tcp://127.0.0.1:{port}"
        sink = SyslogSink(syslog_config(target), FORMATTER)
        started = time.monotonic()
        async with running(sink):
            assert time.monotonic() - started < 2.0
            status = sink.status()
            assert not status.healthy and status.error == f"opening {target}"
            sink.offer([packet_row(1)])
            assert sink.running and sink.status().buffered == 1
        assert time.monotonic() - started < 4.0
        assert sink.status().dropped == 1
    finally:
        for filler in fillers:
            filler.close()
