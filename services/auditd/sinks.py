"""auditd's outputs besides SQLite: what every sink shares.

The pipeline hands every sink the committed records through :meth:`Sink.offer`, which only
appends to a bounded buffer: it never blocks, and rows beyond ``buffer_records`` are dropped
and counted. Each sink drains its buffer in an asyncio task of its own (the JSON lines file
in ``jsonfile.py``, syslog in ``syslog.py``). A failing sink says why in its status and
retries at most once a second.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice

from vpnr.auditd import records as R
from vpnr.auditd.records import Row
from vpnr.v1 import audit_pb2

log = logging.getLogger("vpnr.auditd.sinks")

# Chosen by this implementation.
RETRY_SECONDS = 1.0   # least time between two opens or connects of a failing sink
BATCH_ROWS = 2000     # rows per write: bounds one thread hop and what one failed write drops
CONNECT_TIMEOUT = 5.0  # a silent syslog host must not hold the sink for TCP's SYN retries
START_WAIT = 1.0      # start() waits this long for the first open; the sink's task goes on
FILE_MODE = 0o640     # records name users and addresses: not world-readable
DIR_MODE = 0o750
MIB = 1024 * 1024


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


def os_reason(exc: OSError) -> str:
    """The OS's words for an error ("No space left on device")."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)  # asyncio's connect errors say "Connect call failed"
    return exc.strerror or str(exc) or type(exc).__name__


def format_rows(rows: Sequence[Row], render: Callable[[Row], bytes]) -> list[bytes | None]:
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


