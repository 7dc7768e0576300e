"""The JSON lines file sink: one record per line, rotated by size and age.

Formatting and file writes run in a worker thread (:func:`asyncio.to_thread`), so a slow
disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vpnr.auditd.records import Formatter, Row
from vpnr.auditd.sinks import (
    DIR_MODE,
    FILE_MODE,
    MIB,
    Sink,
    format_rows,
    os_reason,
)
from vpnr.core.config import JsonSinkConfig


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
        lines = [line for line in format_rows(rows, self._line) if line is not None]
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
            raise _FileFailure(f"cannot open {self.path}: {os_reason(exc)}") from exc
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
            raise _FileFailure(f"cannot write {self.path}: {os_reason(exc)}", kept) from exc
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
