"""The drain: ring buffer -> rows -> SQLite -> Follow clients and the other sinks.

Two coroutines share a queue of pending rows:

- the *reader* copies records out of the ring as soon as they are submitted, decodes them,
  gives them ids and queues them, without releasing their space;
- the *writer* commits the queue to SQLite in batches, each transaction storing the ring
  position it covers, then releases that space to the kernel and publishes the rows.

So a record leaves the ring only once it is stored, and after a crash auditd resumes right
after the last committed record. While SQLite keeps up nothing else is needed. When it
falls behind by half the ring, the reader releases space anyway (the records stay queued
in memory, up to ``max_buffered``) so producers never wait on a slow disk; beyond that
bound rows are dropped from SQLite, counted, and still go to the other sinks. Control-plane
records from the Record RPC enter the same queue, so ids always increase in commit order
and a Follow cursor never skips a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vpnr.auditd import records as R
from vpnr.auditd.ingest import Decoder
from vpnr.auditd.store import AuditStore, StoreError
from vpnr.core import bpfsys
from vpnr.core.ringbuf import MappedRing, RingBufferError

log = logging.getLogger("vpnr.auditd.pipeline")

RING_WAIT_SECONDS = 1.0       # recheck the pin (a restarted policyd may have replaced it)
BEHIND_POLL_SECONDS = 0.0005  # the kernel does not wake a consumer that is behind
RATE_WINDOW_SECONDS = 10


@dataclass
class Pending:
    """Rows waiting for the writer, and the ring position they end at (None for control
    records, which do not come from the ring)."""

    rows: list[R.Row]
    ring: MappedRing | None = None
    end: int = 0
    queued: float = field(default_factory=time.monotonic)
    done: asyncio.Future[str] | None = None   # control records: "" once stored, or the error


@dataclass
class SqliteState:
    """What Status and the metrics say about the SQLite sink."""

    written: int = 0
    dropped: int = 0
    error: str = ""
    commits: int = 0
    latency_ns: deque[int] = field(default_factory=lambda: deque(maxlen=4096))


class Pipeline:
    """Owns the ring consumer, the pending queue and the writer."""

    def __init__(self, store: AuditStore, decoder: Decoder, ring_path: Path, *,
                 batch_rows: int, batch_interval: float, max_buffered: int,
                 publish: Callable[[Sequence[R.Row], bool], None]) -> None:
        self.store = store
        self.decoder = decoder
        self.ring_path = ring_path
        self.batch_rows = batch_rows
        self.batch_interval = batch_interval
        self.max_buffered = max_buffered
        self._publish = publish
        self.ring: MappedRing | None = None
        self._old_rings: list[MappedRing] = []
        self.read_pos = 0
        self.pending: deque[Pending] = deque()
        self.pending_rows = 0
        self.committed_id = store.last_id
        self.sqlite = SqliteState()
        self.drained = 0
        self.ring_error = ""
        self._rate: deque[tuple[int, int]] = deque()   # (monotonic second, rows)
        self._work = asyncio.Event()
        self._released = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader and the writer."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reader(), name="ring-reader"),
                       loop.create_task(self._writer(), name="sqlite-writer")]

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop reading, commit what is queued (bounded), release and unmap."""
        reader, writer = self._tasks
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline and not writer.done():
            self._work.set()
            await asyncio.sleep(0.01)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        for ring in [*self._old_rings, *([self.ring] if self.ring else [])]:
            ring.close()

    # -- control records --------------------------------------------------------------

    async def record_control(self, fields: tuple[object, ...]) -> int:
        """Queue one control record (every column but the id) and wait until it is
        stored; returns its id. Raises :class:`StoreError` if SQLite refused it."""
        record_id = self.store.next_id
        self.store.next_id += 1
        row = (record_id, *fields)
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._enqueue(Pending([row], done=done))
        error = await done
        if error:
            raise StoreError(error)
        return record_id

    def _enqueue(self, pending: Pending) -> None:
        self.pending.append(pending)
        self.pending_rows += len(pending.rows)
        self._work.set()

    # -- reader -------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                ring = await self._attach()
                await self._read_ring(ring)
            except (OSError, RingBufferError) as exc:
                self.ring_error = f"ring buffer {self.ring_path}: {exc}"
                log.warning("ring buffer lost; reattaching", extra={"error": self.ring_error})
                await asyncio.sleep(RING_WAIT_SECONDS)

    async def _attach(self) -> MappedRing:
        """Open the pinned ring (waiting for policyd to create it) and find where to read."""
        while True:
            try:
                ring = MappedRing(str(self.ring_path))
                break
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                self.ring_error = f"waiting for {self.ring_path} (policyd creates it)"
                await asyncio.sleep(RING_WAIT_SECONDS / 4)
        if self.ring is not None:
            self._old_rings.append(self.ring)
        resume = self.store.resume
        if (resume is not None and resume.ring_map_id == ring.map_id
                and ring.consumer_pos < resume.ring_pos <= ring.producer_pos):
            # Stored before a crash, not released: those records must not be stored twice.
            log.info("skipping records already stored",
                     extra={"bytes": resume.ring_pos - ring.consumer_pos})
            ring.release(resume.ring_pos)
        self.ring = ring
        self.read_pos = ring.consumer_pos
        self.ring_error = ""
        log.info("draining ring buffer", extra={"path": str(self.ring_path),
                                                "map_id": ring.map_id, "bytes": ring.size,
                                                "backlog": ring.producer_pos - self.read_pos})
        return ring

    async def _read_ring(self, ring: MappedRing) -> None:
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while True:
            events, end = ring.read(self.read_pos, self.batch_rows)
            if end != self.read_pos:
                self.read_pos = end
                await self._queue_events(ring, events, end)
                continue
            if loop.time() - checked > RING_WAIT_SECONDS:
                checked = loop.time()
                if self._pin_replaced(ring):
                    return
            await self._wait_for_data(ring)

    async def _queue_events(self, ring: MappedRing, events: list[bytes], end: int) -> None:
        rows = self.decoder.decode(events, self.store.next_id)
        if self.decoder.unresolved and await self.decoder.roles.catch_up(
                self.decoder.max_version):
            # A new policy or role: names as of the event, not placeholders, in the store.
            rows = self.decoder.decode(events, self.store.next_id)
        self.store.next_id += len(rows)
        self.drained += len(rows)
        second = int(time.monotonic())
        if self._rate and self._rate[-1][0] == second:
            self._rate[-1] = (second, self._rate[-1][1] + len(rows))
        else:
            self._rate.append((second, len(rows)))
        if self.pending_rows + len(rows) > self.max_buffered:
            # SQLite is too far behind: these rows skip it (counted) but reach the
            # other sinks, and their ring space is given back now.
            self.sqlite.dropped += len(rows)
            ring.release(max(end, ring.consumer_pos))
            self._publish(rows, False)
            return
        self._enqueue(Pending(rows, ring, end))
        if end - ring.consumer_pos > ring.size // 2:
            # Keep producers going while SQLite catches up; the rows wait in memory.
            ring.release(end)

    def _pin_replaced(self, ring: MappedRing) -> bool:
        try:
            fd = bpfsys.obj_get(str(self.ring_path))
        except OSError:
            return False  # gone for now: keep draining what we have
        try:
            replaced = bpfsys.map_info(fd).id != ring.map_id
        finally:
            os.close(fd)
        if replaced:
            log.info("ring buffer replaced; switching", extra={"old_map_id": ring.map_id})
        return replaced

    async def _wait_for_data(self, ring: MappedRing) -> None:
        if ring.consumer_pos != self.read_pos:
            # Our own unreleased records keep the fd readable: poll until the writer
            # releases them (it wakes us) or a short tick passes.
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), BEHIND_POLL_SECONDS)
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)
        loop.add_reader(ring.fd, readable)
        try:
            await asyncio.wait_for(ready, RING_WAIT_SECONDS)
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(ring.fd)

    # -- writer ---------------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self.pending:
                await self._gather()
                await self._commit(self._take())

    async def _gather(self) -> None:
        """Let a small batch grow for up to batch_interval (bounded latency)."""
        if self.pending_rows >= self.batch_rows or not self.batch_interval:
            return
        wait = self.pending[0].queued + self.batch_interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _take(self) -> list[Pending]:
        batch = [self.pending.popleft()]
        count = len(batch[0].rows)
        while self.pending and count + len(self.pending[0].rows) <= self.batch_rows:
            batch.append(self.pending.popleft())
            count += len(batch[-1].rows)
        self.pending_rows -= count
        return batch

    async def _commit(self, batch: list[Pending]) -> None:
        rows = [row for pending in batch for row in pending.rows]
        ring_entries = [p for p in batch if p.ring is not None]
        last = ring_entries[-1] if ring_entries else None
        ring_map_id = last.ring.map_id if last and last.ring else (
            self.store.resume.ring_map_id if self.store.resume else 0)
        ring_pos = last.end if last else (self.store.resume.ring_pos if self.store.resume
                                          else 0)
        error = ""
        try:
            await self.store.write(rows, ring_map_id, ring_pos)
        except StoreError as exc:
            error = str(exc)
            self.sqlite.dropped += len(rows)
            if error != self.sqlite.error:
                log.error("SQLite write failed; records dropped from the store",
                          extra={"error": error, "records": len(rows)})
        else:
            self.sqlite.written += len(rows)
            self.sqlite.commits += 1
            self.committed_id = rows[-1][R.ID]
            if self.sqlite.error:
                log.info("SQLite writes work again")
            now = time.monotonic_ns()
            packets = [r for r in (rows[0], rows[-1]) if r[R.KIND] == R.KIND_PACKET]
            self.sqlite.latency_ns.extend(now - r[R.KERNEL_NS] for r in packets)
        self.sqlite.error = error
        for pending in ring_entries:
            assert pending.ring is not None
            if pending.end > pending.ring.consumer_pos:
                pending.ring.release(pending.end)
        self._released.set()
        for pending in batch:
            if pending.done is not None and not pending.done.done():
                pending.done.set_result(error)
        self._publish(rows, not error)

    # -- figures --------------------------------------------------------------------------

    def events_per_second(self) -> float:
        """Packet records drained per second over the last ten (whole) seconds."""
        now = int(time.monotonic())
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_SECONDS:
            self._rate.popleft()
        return sum(n for _, n in self._rate) / RATE_WINDOW_SECONDS

    def pending_ring_bytes(self) -> int:
        """Bytes produced into the ring and not yet released."""
        if self.ring is None:
            return 0
        return self.ring.producer_pos - self.ring.consumer_pos
