"""The syslog sink: RFC 5424 messages, facility local0, over a Unix socket, UDP or TCP.

Messages go out on non-blocking sockets, so an absent syslog server never stalls the event
loop; records wait in the sink's bounded buffer while it reconnects.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

from vpnr.auditd import records as R
from vpnr.auditd.records import Formatter, Row
from vpnr.auditd.sinks import (
    CONNECT_TIMEOUT,
    Sink,
    format_rows,
    os_reason,
)
from vpnr.core.config import SyslogSinkConfig
from vpnr.v1 import codes_pb2

log = logging.getLogger("vpnr.auditd.syslog")

# Defined by RFC 5424 section 6.2.1.
FACILITY_LOCAL0 = 16
SEVERITY_ERROR, SEVERITY_WARNING, SEVERITY_NOTICE, SEVERITY_INFO = 3, 4, 5, 6
# SD-ID "name@PEN" (RFC 5424 section 7.2.2). 32473 is the private enterprise number that
# RFC 5612 reserves for documentation and examples; a registered PEN would replace it.
SD_ID = "vpnr@32473"
_PORT_PROTOCOLS = frozenset({6, 17})  # TCP, UDP: the protocols whose ports mean something
_CONTROL_CHARS = {code: " " for code in (*range(32), 127)}  # one record, one line


@dataclass(frozen=True)
class SyslogAddress:
    """A parsed syslog target: ``unix:/path``, ``udp://host:port`` or ``tcp://host:port``."""

    scheme: Literal["unix", "udp", "tcp"]
    host: str  # the socket path for unix
    port: int = 0

    @classmethod
    def parse(cls, target: str) -> SyslogAddress:
        """Parse a target the config already validated (raises ValueError otherwise)."""
        if target.startswith("unix:"):
            return cls("unix", target.removeprefix("unix:"))
        match = re.fullmatch(r"(udp|tcp)://(\[[^\]]+\]|[^:/\[\]]+):([0-9]+)", target)
        if not match:
            raise ValueError(f"not a syslog target: {target!r}")
        scheme: Literal["udp", "tcp"] = "udp" if match.group(1) == "udp" else "tcp"
        return cls(scheme, match.group(2).strip("[]"), int(match.group(3)))


def _header_field(text: str, limit: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII only, at most ``limit`` characters, "-" if
    empty (section 6.2)."""
    return "".join(ch for ch in text if "!" <= ch <= "~")[:limit] or "-"


def _param(value: object) -> str:
    """A PARAM-VALUE: '"', '\\' and ']' escaped with a backslash (RFC 5424 section 6.3.3)."""
    text = "" if value is None else str(value)
    return (text.translate(_CONTROL_CHARS).replace("\\", "\\\\").replace('"', '\\"')
            .replace("]", "\\]"))


def _endpoint(address: str, port: int, with_port: bool) -> str:
    if not address:
        return "-"
    if not with_port:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def rfc3339_micro(time_ns: int) -> str:
    """UTC with microseconds, the most RFC 5424 TIME-SECFRAC allows: 2026-11-21T10:00:00.123456Z
    (truncated, not rounded, so the second never changes)."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos // 1000:06d}Z"


@dataclass(frozen=True)
class SyslogFormat:
    """Renders records as RFC 5424 messages (no I/O): facility local0, MSGID ``packet`` or
    ``control``, the record's fields as SD-PARAMs of ``[vpnr@32473 ...]`` and a one-line
    summary as MSG. MSG carries no BOM (RFC 5424 MSG-ANY): receivers print a BOM as junk."""

    formatter: Formatter
    hostname: str
    app_name: str
    procid: str

    @classmethod
    def create(cls, formatter: Formatter, hostname: str, app_name: str) -> SyslogFormat:
        """Header fields made valid: ``hostname`` empty means this host's name."""
        return cls(formatter, _header_field(hostname or socket.gethostname(), 255),
                   _header_field(app_name, 48), str(os.getpid()))

    def message(self, row: Row) -> bytes:
        """One complete SYSLOG-MSG."""
        record = self.formatter.to_dict(row)
        if row[R.KIND] == R.KIND_CONTROL:
            severity, msgid, params, summary = self._control(record)
        else:
            severity, msgid, params, summary = self._packet(row, record)
        data = "".join(f' {name}="{_param(value)}"' for name, value in params)
        return (f"<{FACILITY_LOCAL0 * 8 + severity}>1 {rfc3339_micro(row[R.TIME_NS])} "
                f"{self.hostname} {self.app_name} {self.procid} {msgid} [{SD_ID}{data}] "
                f"{summary.translate(_CONTROL_CHARS)}").encode(errors="replace")

    @staticmethod
    def _packet(row: Row, record: dict[str, Any]
                ) -> tuple[int, str, list[tuple[str, object]], str]:
        severity = (SEVERITY_WARNING if row[R.VERDICT] == codes_pb2.VERDICT_DENY
                    else SEVERITY_INFO)
        roles = ",".join(record["roles"])
        params: list[tuple[str, object]] = [
            ("id", record["id"]), ("instance", record["instance"]),
            ("verdict", record["verdict"]), ("reason", record["reason"]),
            ("src", record["src"]), ("dst", record["dst"]), ("sport", record["src_port"]),
            ("dport", record["dst_port"]), ("proto", record["protocol"]), ("roles", roles),
            ("rule", record["rule_id"]), ("iface", record["interface"]),
            ("zone", f"{record['src_zone']}>{record['dst_zone']}")]
        ported = row[R.IP_PROTOCOL] in _PORT_PROTOCOLS
        summary = (f"{record['verdict']} {record['protocol']} "
                   f"{_endpoint(record['src'], record['src_port'], ported)} -> "
                   f"{_endpoint(record['dst'], record['dst_port'], ported)} "
                   f"roles={roles or '-'} rule={record['rule_id']} {record['reason']}")
        return severity, "packet", params, summary

    @staticmethod
    def _control(record: dict[str, Any]) -> tuple[int, str, list[tuple[str, object]], str]:
        success = record["success"]
        params: list[tuple[str, object]] = [
            ("id", record["id"]), ("instance", record["instance"]),
            ("daemon", record["daemon"]), ("action", record["action"]),
            ("actor", record["actor"]), ("vbefore", record["version_before"]),
            ("vafter", record["version_after"]), ("success", "true" if success else "false")]
        error = record["error"]
        outcome = "ok" if success else (f"failed: {error}" if error else "failed")
        summary = (f"{record['daemon']} {record['action']} v{record['version_before'] or 0}"
                   f"->v{record['version_after'] or 0} by {record['actor'] or '-'} {outcome}")
        return SEVERITY_NOTICE if success else SEVERITY_ERROR, "control", params, summary


async def _connected(family: int, kind: int, address: Any, proto: int = 0) -> socket.socket:
    """A non-blocking socket connected to ``address`` (closed again on failure)."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_closed(sock: socket.socket) -> bool:
    """Whether a stream receiver has closed its end. Syslog receivers never send, so a
    readable socket means EOF (or a reset, which raises)."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False


class SyslogSink(Sink):
    """RFC 5424 messages (see :class:`SyslogFormat`) to the local syslog socket, UDP (one
    message per datagram) or TCP (RFC 6587 octet counting, ``LEN SP MSG``).

    ``unix:`` targets are datagram sockets; a stream socket (connect fails with EPROTOTYPE)
    is framed like TCP. While the target is unreachable or refuses, rows stay buffered (up
    to ``buffer_records``) and the sink reconnects at most once a second. Over UDP the
    messages sent before the receiver's "port unreachable" comes back are lost, as UDP
    syslog always loses them. Over a stream, a batch cut off by a reset is sent again
    whole on the next connection, so a receiver may see a record twice (the ``id``
    SD-PARAM tells).
    """

    name = "syslog"

    def __init__(self, config: SyslogSinkConfig, formatter: Formatter,
                 app_name: str = "vpnr-auditd") -> None:
        super().__init__(enabled=config.enabled, buffer_records=config.buffer_records)
        self.config = config
        self.target = config.target
        self.address = SyslogAddress.parse(config.target)
        self.format = SyslogFormat.create(formatter, config.hostname, app_name)
        self._sock: socket.socket | None = None
        self._stream = False

    async def _open(self) -> bool:
        try:
            await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
        except OSError as exc:
            self._fail(f"cannot connect to {self.target}: {os_reason(exc)}")
            return False
        return True

    async def _connect(self) -> None:
        address = self.address
        if address.scheme == "unix":
            try:
                self._sock = await _connected(socket.AF_UNIX, socket.SOCK_DGRAM, address.host)
                self._stream = False
            except OSError as exc:
                if exc.errno != errno.EPROTOTYPE:
                    raise
                self._sock = await _connected(socket.AF_UNIX, socket.SOCK_STREAM, address.host)
                self._stream = True
            return
        kind = socket.SOCK_STREAM if address.scheme == "tcp" else socket.SOCK_DGRAM
        infos = await asyncio.get_running_loop().getaddrinfo(address.host, address.port,
                                                             type=kind)
        failure = OSError(errno.EADDRNOTAVAIL, "no address")
        for family, sock_type, proto, _, sockaddr in infos:
            try:
                self._sock = await _connected(family, sock_type, sockaddr, proto)
            except OSError as exc:
                failure = exc
                continue
            self._stream = kind == socket.SOCK_STREAM
            return
        raise failure

    async def _run(self) -> None:
        while True:
            if not self._buffer:
                if self._closing:
                    return
                await self._idle()
                continue
            if self._sock is None:
                await self._backoff()
                await self._open()
                if self._sock is None:
                    continue
            batch = self._batch()
            messages = await asyncio.to_thread(format_rows, batch, self.format.message)
            await self._send(messages)

    async def _send(self, messages: list[bytes | None]) -> None:
        """Send one batch; rows sent or unformattable leave the buffer, the rest stay."""
        loop = asyncio.get_running_loop()
        sock = self._sock
        assert sock is not None
        processed = sent = 0
        try:
            if self._stream:
                if _peer_closed(sock):
                    raise ConnectionResetError(errno.ECONNRESET, "connection closed by peer")
                frames = [b"%d %b" % (len(m), m) for m in messages if m is not None]
                await loop.sock_sendall(sock, b"".join(frames))
                processed, sent = len(messages), len(frames)
            else:
                for message in messages:
                    if message is not None:
                        try:
                            await loop.sock_sendall(sock, message)
                            sent += 1
                        except OSError as exc:
                            if exc.errno != errno.EMSGSIZE:
                                raise
                            log.warning("syslog message too large for a datagram; dropped",
                                        extra={"bytes": len(message)})
                    processed += 1
        except OSError as exc:
            self._disconnect()
            self._fail(f"cannot send to {self.target}: {os_reason(exc)}")
        else:
            self._recovered()
        finally:
            self._settle(processed, sent)

    async def _release(self) -> None:
        self._disconnect()

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

