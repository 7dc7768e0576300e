"""auditd's outputs besides SQLite: a rotated JSON lines file and RFC 5424 syslog.

The pipeline hands every sink the committed records through :meth:`Sink.offer`, which only
appends to a bounded buffer: it never blocks, and rows beyond ``buffer_records`` are dropped
and counted. Each sink drains its buffer in an asyncio task of its own. Formatting and file
writes run in a worker thread (:func:`asyncio.to_thread`) and syslog goes out on
non-blocking sockets, so neither a slow disk nor an absent syslog server stalls the event
loop. A failing sink says why in its status and retries at most once a second.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from vpnr.auditd import records as R
from vpnr.auditd.records import Formatter, Row
from vpnr.core.config import JsonSinkConfig, SyslogSinkConfig
from vpnr.v1 import audit_pb2, codes_pb2

log = logging.getLogger("vpnr.auditd.sinks")

# Chosen by this implementation.
RETRY_SECONDS = 1.0   # least time between two opens or connects of a failing sink
BATCH_ROWS = 2000     # rows per write: bounds one thread hop and what one failed write drops
CONNECT_TIMEOUT = 5.0  # a silent syslog host must not hold the sink for TCP's SYN retries
START_WAIT = 1.0      # start() waits this long for the first open; the sink's task goes on
FILE_MODE = 0o640     # records name users and addresses: not world-readable
DIR_MODE = 0o750
MIB = 1024 * 1024

# Defined by RFC 5424 section 6.2.1.
FACILITY_LOCAL0 = 16
SEVERITY_ERROR, SEVERITY_WARNING, SEVERITY_NOTICE, SEVERITY_INFO = 3, 4, 5, 6
# SD-ID "name@PEN" (RFC 5424 section 7.2.2). 32473 is the private enterprise number that
# RFC 5612 reserves for documentation and examples; a registered PEN would replace it.
SD_ID = "vpnr@32473"
_PORT_PROTOCOLS = frozenset({6, 17})  # TCP, UDP: the protocols whose ports mean something
_CONTROL_CHARS = {code: " " for code in (*range(32), 127)}  # one record, one line


class Sink(abc.ABC):
    """One output: a bounded buffer filled by :meth:`offer`, drained by a task of its own.

    ``written`` and ``dropped`` count rows since construction; every row offered ends up in
    exactly one of ``written``, ``dropped`` or the buffer. A disabled sink starts nothing,
    ignores what it is offered and reports ``enabled=False`` with ``healthy=True``.
    """

    name: str
    target: str

    def __init__(self, *, enabled: bool, buffer_records: int) -> None:
        self.enabled = enabled
        self.buffer_records = buffer_records
        self.written = 0
        self.dropped = 0
        self.error = "not started" if enabled else ""
        self._buffer: deque[Row] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._retry_at = 0.0  # monotonic time before which no open/connect is tried
        self._release_task: asyncio.Future[None] | None = None

    @property
    def buffered(self) -> int:
        """Rows waiting, including the batch being written."""
        return len(self._buffer)

    @property
    def running(self) -> bool:
        """Whether the sink's task is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Open the output and start the task; a failure is kept as the error, not raised.

        Waits at most :data:`START_WAIT` for the open (a syslog host may take
        :data:`CONNECT_TIMEOUT` to not answer); until it completes the sink reports itself
        unhealthy with "opening <target>".
        """
        if not self.enabled or self._task is not None or self._closing:
            return
        self.error = f"opening {self.target}"
        self._retry_at = time.monotonic() + RETRY_SECONDS
        first_open = asyncio.ensure_future(self._first_open())
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(first_open), name=f"auditd-{self.name}-sink")
        await asyncio.wait({first_open}, timeout=START_WAIT)

    def offer(self, rows: Sequence[Row]) -> None:
        """Queue committed rows (in id order); what does not fit is dropped and counted."""
        if not self.enabled or not rows:
            return
        room = 0 if self._closing else self.buffer_records - len(self._buffer)
        if room >= len(rows):
            self._buffer.extend(rows)
        else:
            if room > 0:
                self._buffer.extend(islice(rows, room))
            self.dropped += len(rows) - max(room, 0)
        self._wakeup.set()

    async def close(self, timeout: float = 2.0) -> None:
        """Write what is buffered (for at most ``timeout`` seconds), then close.

        Rows still buffered when the time is up are counted as dropped.
        """
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        deadline = time.monotonic() + timeout
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task})
        self.dropped += len(self._buffer)
        self._buffer.clear()
        # Closing a file waits for a write still running in its thread; do not wait forever.
        self._release_task = asyncio.ensure_future(self._release())
        await asyncio.wait({self._release_task}, timeout=max(deadline - time.monotonic(), 0.1))

    def status(self) -> audit_pb2.SinkStatus:
        """The sink as AuditService.Status reports it."""
        return audit_pb2.SinkStatus(
            name=self.name, enabled=self.enabled, healthy=not self.error, error=self.error,
            written=self.written, dropped=self.dropped, buffered=len(self._buffer),
            target=self.target)

    @abc.abstractmethod
    async def _open(self) -> bool:
        """Open the file or connect; on failure call :meth:`_fail` and return False."""

    @abc.abstractmethod
    async def _run(self) -> None:
        """Drain the buffer until closing and empty."""

    @abc.abstractmethod
    async def _release(self) -> None:
        """Close the file or socket."""

    async def _first_open(self) -> None:
        if await self._open():
            self.error = ""

    async def _supervise(self, first_open: asyncio.Future[None]) -> None:
        """Run :meth:`_run` once the first open is done; a bug in it is logged and the loop
        restarted, so the sink never stops taking rows."""
        await first_open
        while True:
            try:
                await self._run()
            except Exception as exc:
                log.exception("sink task failed; restarting it", extra={"sink": self.name})
                self._fail(f"internal error: {exc!r}")
                if self._closing:
                    return
                await asyncio.sleep(RETRY_SECONDS)
            else:
                return

    async def _idle(self) -> None:
        """Wait until rows are offered or close is called."""
        self._wakeup.clear()
        if not self._buffer and not self._closing:
            await self._wakeup.wait()

    async def _backoff(self) -> None:
        """Wait until an open or connect may be tried again, and mark the attempt."""
        delay = self._retry_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._retry_at = time.monotonic() + RETRY_SECONDS

    def _batch(self) -> list[Row]:
        """The oldest buffered rows; they stay buffered until :meth:`_settle`."""
        return list(islice(self._buffer, BATCH_ROWS))

    def _settle(self, processed: int, written: int) -> None:
        """Remove the first ``processed`` rows, ``written`` of them delivered."""
        for _ in range(processed):
            self._buffer.popleft()
        self.written += written
        self.dropped += processed - written

    def _fail(self, error: str) -> None:
        """Become unhealthy (logged once per distinct error)."""
        if error != self.error:
            log.warning("sink failing", extra={"sink": self.name, "error": error})
        self.error = error

    def _recovered(self) -> None:
        """Become healthy again."""
        if self.error:
            log.info("sink recovered", extra={"sink": self.name})
        self.error = ""


def _reason(exc: OSError) -> str:
    """The OS's words for an error ("No space left on device")."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)  # asyncio's connect errors say "Connect call failed"
    return exc.strerror or str(exc) or type(exc).__name__


def _format_rows(rows: Sequence[Row], render: Callable[[Row], bytes]) -> list[bytes | None]:
    """Render each row; a row that cannot be rendered becomes None (and is dropped) rather
    than stopping the sink. One warning per batch keeps a systematic bug from flooding."""
    out: list[bytes | None] = []
    first: tuple[object, Exception] | None = None
    for row in rows:
        try:
            out.append(render(row))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            out.append(None)
            first = first or (row[R.ID] if row else None, exc)
    if first is not None:
        log.warning("records could not be formatted", extra={
            "count": out.count(None), "first_id": first[0], "reason": repr(first[1])})
    return out


# --- JSON lines ----------------------------------------------------------------------------


class _FileFailure(Exception):
    """A failed open, write or rotation: the error text and the rows that made it first."""

    def __init__(self, message: str, kept: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.kept = kept


class _JsonLinesFile:
    """The file side of :class:`JsonLinesSink`. Every method blocks and runs in a worker
    thread; one lock serialises them, so a close waits for a write instead of closing the
    descriptor underneath it."""

    def __init__(self, path: Path, formatter: Formatter, *, max_bytes: int,
                 rotate_seconds: int, keep_files: int) -> None:
        self.path = path
        self.formatter = formatter
        self.max_bytes = max_bytes
        self.rotate_seconds = rotate_seconds
        self.keep_files = keep_files
        self.size = 0
        self.created_at: float | None = None  # monotonic; None until the file is opened
        self._fd: int | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        """Whether a descriptor is open (False after a failure until the next open)."""
        return self._fd is not None

    def rotation_deadline(self) -> float | None:
        """When the current file becomes too old (monotonic), None if age does not apply."""
        if self.rotate_seconds <= 0 or self.size == 0 or self.created_at is None:
            return None
        return self.created_at + self.rotate_seconds

    def open(self) -> str:
        """Open the file, creating it and its directory; the error text, "" on success."""
        with self._lock:
            try:
                self._open()
            except _FileFailure as failure:
                return failure.message
            return ""

    def append(self, rows: Sequence[Row]) -> tuple[int, str]:
        """Append rows as JSON lines, rotating on the way: (rows written, error or "").

        A write that fails part-way is cut back to its last whole line, so every line in
        the file is one complete record; the descriptor is closed so the next call reopens.
        """
        lines = [line for line in _format_rows(rows, self._line) if line is not None]
        with self._lock:
            if self._closed:
                return 0, "closed"
            written = 0
            try:
                self._open()
                if self._too_old():
                    self._rotate()
                    self._open()
                chunk: list[bytes] = []
                pending = 0
                for line in lines:
                    if self.size + pending > 0 and (
                            self.size + pending + len(line) > self.max_bytes):
                        written += self._write(chunk)
                        chunk, pending = [], 0
                        self._rotate()
                        self._open()
                    chunk.append(line)
                    pending += len(line)
                written += self._write(chunk)
            except _FileFailure as failure:
                self._close()
                return written + failure.kept, failure.message
            return written, ""

    def rotate_if_old(self) -> str:
        """Rotate a quiet file that reached its age; the error text, "" otherwise."""
        with self._lock:
            if self._closed or not self._too_old():
                return ""
            try:
                self._rotate()
            except _FileFailure as failure:
                return failure.message
            return ""

    def close(self) -> None:
        """Close for good."""
        with self._lock:
            self._closed = True
            self._close()

    def _line(self, row: Row) -> bytes:
        return self.formatter.to_json(row).encode() + b"\n"

    def _too_old(self) -> bool:
        deadline = self.rotation_deadline()
        return deadline is not None and time.monotonic() >= deadline

    def _open_fd(self) -> tuple[int, bool]:
        """(descriptor, created)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE), True
        except FileExistsError:
            return os.open(self.path, flags), False

    def _open(self) -> None:
        if self._fd is not None:
            return
        try:
            try:
                fd, created = self._open_fd()
            except FileNotFoundError:
                self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                fd, created = self._open_fd()
            try:
                if created:
                    os.fchmod(fd, FILE_MODE)  # exactly 0640, whatever the umask
                info = os.fstat(fd)
            except OSError:
                os.close(fd)
                raise
        except OSError as exc:
            raise _FileFailure(f"cannot open {self.path}: {_reason(exc)}") from exc
        now = time.monotonic()
        if created or info.st_size == 0:
            self.created_at = now
        elif self.created_at is None:
            # A file found at start: its creation time is unknown, so its age counts from
            # its last write (see JsonLinesSink).
            self.created_at = now - max(0.0, time.time() - info.st_mtime)
        self._fd, self.size = fd, info.st_size

    def _write(self, lines: list[bytes]) -> int:
        if not lines:
            return 0
        assert self._fd is not None
        data = memoryview(b"".join(lines))
        done = 0
        try:
            while done < len(data):
                count = os.write(self._fd, data[done:])
                if count <= 0:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                done += count
        except OSError as exc:
            kept = kept_bytes = 0
            for line in lines:
                if kept_bytes + len(line) > done:
                    break
                kept += 1
                kept_bytes += len(line)
            with contextlib.suppress(OSError):  # drop the torn line; space is freed by it
                os.ftruncate(self._fd, self.size + kept_bytes)
            self.size += kept_bytes
            raise _FileFailure(f"cannot write {self.path}: {_reason(exc)}", kept) from exc
        self.size += done
        return len(lines)

    def _numbered(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def _rotate(self) -> None:
        """path.N-1 -> path.N, ..., path -> path.1; numbers from keep_files up are deleted.
        The next write creates a fresh file."""
        self._close()
        pattern = re.compile(re.escape(self.path.name) + r"\.([0-9]+)")
        try:
            with os.scandir(self.path.parent) as entries:
                stale = [entry.path for entry in entries
                         if (match := pattern.fullmatch(entry.name))
                         and int(match.group(1)) >= self.keep_files]
            for name in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
            for number in range(self.keep_files - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    self._numbered(number).rename(self._numbered(number + 1))
            with contextlib.suppress(FileNotFoundError):
                self.path.rename(self._numbered(1))
        except OSError as exc:
            raise _FileFailure(f"cannot rotate {self.path}: {exc}") from exc
        self.size = 0
        self.created_at = None

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class JsonLinesSink(Sink):
    """One ``Formatter.to_json`` line per record, appended to ``path`` (mode 0640).

    The file is rotated before it would pass ``max_file_mib`` (or ``max_file_bytes``) and
    once it is ``rotate_seconds`` old: ``path`` -> ``path.1`` -> ``path.2`` ..., keeping
    ``keep_files`` rotated files. Age counts from when the sink created the file; a
    non-empty file found at start counts from its last modification (Linux exposes no
    creation time here), so after a restart a file may live up to ``rotate_seconds`` past
    its last write. A quiet file is rotated when it comes of age; the next record creates
    the new ``path``.

    A failed write leaves the sink unhealthy with an error naming the file; the rows of
    that write are dropped and counted, and the file is reopened at most once a second.
    """

    name = "json"

    def __init__(self, config: JsonSinkConfig, path: Path, formatter: Formatter, *,
                 max_file_bytes: int | None = None) -> None:
        """``path`` is already resolved; ``max_file_bytes`` overrides ``max_file_mib``."""
        super().__init__(enabled=config.enabled, buffer_records=config.buffer_records)
        self.config = config
        self.path = path
        self.target = str(path)
        self.max_file_bytes = (config.max_file_mib * MIB if max_file_bytes is None
                               else max_file_bytes)
        self._file = _JsonLinesFile(path, formatter, max_bytes=self.max_file_bytes,
                                    rotate_seconds=config.rotate_seconds,
                                    keep_files=config.keep_files)

    async def _open(self) -> bool:
        error = await asyncio.to_thread(self._file.open)
        if error:
            self._fail(error)
        return not error

    async def _run(self) -> None:
        while True:
            if not self._buffer:
                if self._closing:
                    return
                deadline = self._file.rotation_deadline() if self._file.is_open else None
                if deadline is None:
                    await self._idle()
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle(), max(0.0, deadline - time.monotonic()))
                if not self._buffer and not self._closing:
                    self._result(await asyncio.to_thread(self._file.rotate_if_old))
                    if self.error:
                        await self._backoff()
                continue
            if self.error and not self._file.is_open:
                await self._backoff()
            batch = self._batch()
            written, error = await asyncio.to_thread(self._file.append, batch)
            self._settle(len(batch), written)
            self._result(error)

    async def _release(self) -> None:
        await asyncio.to_thread(self._file.close)

    def _result(self, error: str) -> None:
        if error:
            self._fail(error)
        else:
            self._recovered()


# --- syslog --------------------------------------------------------------------------------


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
            self._fail(f"cannot connect to {self.target}: {_reason(exc)}")
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
            messages = await asyncio.to_thread(_format_rows, batch, self.format.message)
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
            self._fail(f"cannot send to {self.target}: {_reason(exc)}")
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
