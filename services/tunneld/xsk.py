"""An AF_XDP socket in pure Python: ctypes libc for ``bind``/``sendto``, mmap for the rings.

The tunnel daemon receives the frames an XDP program redirects into an XSKMAP
(``bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS)``) and transmits frames on the same
interface. Only copy mode (``XDP_COPY``) is used: veth offers nothing else, and the frames
are copied into Python ``bytes`` anyway. Layouts and constants: include/uapi/linux/if_xdp.h;
the protocol: Documentation/networking/af_xdp.rst.

The UMEM (one anonymous mapping, ``frame_count`` chunks of ``frame_size`` bytes) is split in
two halves. The first half belongs to reception: every frame starts in the fill ring, and
:meth:`XskSocket.recv` hands each one back as soon as its bytes are copied out. The second
half belongs to transmission: :meth:`XskSocket.send` takes frames from a free list, which
the completion ring refills.

Producer and consumer indexes are free-running u32 counters shared with the kernel. CPython
writes them through aligned ``memoryview`` casts, single stores, which x86's ordering (no
store/store or load/load reordering) makes sufficient: descriptors are written before the
producer that publishes them, and a frame's bytes are read before the fill-ring producer
returns it. The socket is not thread-safe; one thread (an event loop) drives it, using
:meth:`XskSocket.fileno` for readiness (POLLIN: frames in the RX ring).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
import time
from collections.abc import Sequence
from typing import Final

from vpnr.core import bpfsys

AF_XDP: Final = 44
SOL_XDP: Final = 283

# socket options (level SOL_XDP)
XDP_MMAP_OFFSETS: Final = 1
XDP_RX_RING: Final = 2
XDP_TX_RING: Final = 3
XDP_UMEM_REG: Final = 4
XDP_UMEM_FILL_RING: Final = 5
XDP_UMEM_COMPLETION_RING: Final = 6
XDP_STATISTICS: Final = 7

# sockaddr_xdp.sxdp_flags
XDP_COPY: Final = 1 << 1

# mmap page offsets of the four rings
XDP_PGOFF_RX_RING: Final = 0
XDP_PGOFF_TX_RING: Final = 0x80000000
XDP_UMEM_PGOFF_FILL_RING: Final = 0x100000000
XDP_UMEM_PGOFF_COMPLETION_RING: Final = 0x180000000

# struct sockaddr_xdp {u16 family; u16 flags; u32 ifindex; u32 queue_id; u32 shared_umem_fd}
SOCKADDR_XDP: Final = struct.Struct("=HHIII")
# struct xdp_umem_reg {u64 addr; u64 len; u32 chunk_size; u32 headroom; u32 flags;
# u32 tx_metadata_len} (32 bytes since 6.8; before, the same size with padding at the end)
UMEM_REG: Final = struct.Struct("=QQIIII")
# struct xdp_mmap_offsets: rx, tx, fill, completion; each {producer, consumer, desc, flags}
MMAP_OFFSETS: Final = struct.Struct("=16Q")
# struct xdp_statistics
STATISTICS_FIELDS: Final = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs",
                            "rx_ring_full", "rx_fill_ring_empty_descs", "tx_ring_empty_descs")
STATISTICS: Final = struct.Struct(f"={len(STATISTICS_FIELDS)}Q")
XDP_DESC_SIZE: Final = 16  # struct xdp_desc {u64 addr; u32 len; u32 options}
UMEM_ENTRY_SIZE: Final = 8  # fill and completion entries: u64 UMEM addresses

TX_BATCH: Final = 32  # frames the kernel sends per sendto() in copy mode (TX_BATCH_SIZE)
KICK_SLACK: Final = 16  # extra sendto() attempts per send() on EAGAIN/EBUSY/ENOBUFS
BIND_BUSY_WAIT: Final = 1.0  # seconds bind retries EBUSY (see _setup)
_RETRY_ERRNOS: Final = frozenset({errno.EAGAIN, errno.EBUSY, errno.ENOBUFS, errno.EINTR})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.bind.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.bind.restype = ctypes.c_int
_libc.sendto.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p, ctypes.c_uint32]
_libc.sendto.restype = ctypes.c_ssize_t


class XskError(OSError):
    """A step of setting up or driving the AF_XDP socket failed. ``errno`` is kept and the
    message names the step, e.g. ``bind AF_XDP to ifindex 5 queue 0: EINVAL (...)``."""


def _error(err: int, step: str) -> XskError:
    name = errno.errorcode.get(err, str(err))
    return XskError(err, f"{step}: {name} ({os.strerror(err)})")


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _next_power_of_two(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


class _Ring:
    """One mmapped ring: free-running u32 producer/consumer and ``size`` entries of
    ``entry_size`` bytes, viewed as u64 (``q``) and u32 (``i``) arrays."""

    def __init__(self, fd: int, pgoff: int, offsets: Sequence[int], size: int,
                 entry_size: int, what: str) -> None:
        producer, consumer, desc, _flags = offsets
        length = desc + size * entry_size
        try:
            self.map = mmap.mmap(fd, length, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                 mmap.PROT_READ | mmap.PROT_WRITE, offset=pgoff)
        except OSError as exc:
            raise _error(exc.errno or errno.EINVAL, f"mmap {what} ring") from exc
        view = memoryview(self.map)
        self.producer = view[producer:producer + 4].cast("I")
        self.consumer = view[consumer:consumer + 4].cast("I")
        entries = view[desc:length]
        self.q = entries.cast("Q")
        self.i = entries.cast("I")
        self._views = (view, entries)
        self.size = size
        self.mask = size - 1

    def close(self) -> None:
        for part in (self.producer, self.consumer, self.q, self.i, *self._views):
            part.release()
        self.map.close()


class XskSocket:
    """An AF_XDP socket bound (copy mode) to queue ``queue`` of interface ``ifindex``.

    Create it in the network namespace of the interface (the socket keeps the namespace it
    was created in). ``frame_size`` is the UMEM chunk size (a power of two from 2048 to the
    page size); ``frame_count`` chunks (even) are split between reception and transmission;
    ``ring_size`` (a power of two) sizes the RX and TX rings, the fill and completion rings
    are at least that big and big enough to hold every frame of their half.
    """

    def __init__(self, ifindex: int, queue: int = 0, *, frame_size: int = 2048,
                 frame_count: int = 16384, ring_size: int = 4096) -> None:
        page = mmap.PAGESIZE
        if not _power_of_two(frame_size) or not 2048 <= frame_size <= page:
            raise ValueError(f"frame_size {frame_size}: a power of two from 2048 to {page}")
        if frame_count < 2 or frame_count % 2:
            raise ValueError(f"frame_count {frame_count}: an even number, at least 2")
        if not _power_of_two(ring_size):
            raise ValueError(f"ring_size {ring_size}: a power of two")
        self.ifindex = ifindex
        self.queue = queue
        self.frame_size = frame_size
        self._chunk_mask = ~(frame_size - 1)
        self._closed = False
        self._rings: list[_Ring] = []
        self._umem = mmap.mmap(-1, frame_count * frame_size,
                               mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self._sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
        except OSError as exc:
            self._umem.close()
            raise _error(exc.errno or errno.EINVAL, "create AF_XDP socket") from exc
        try:
            self._setup(frame_count, ring_size)
        except BaseException:
            self.close()
            raise

    def _setup(self, frame_count: int, ring_size: int) -> None:
        fd = self._sock.fileno()
        size = self.frame_size
        anchor = ctypes.c_char.from_buffer(self._umem)
        address = ctypes.addressof(anchor)
        del anchor  # an exported buffer would keep the mapping from being closed
        rx_frames = frame_count // 2
        tx_frames = frame_count - rx_frames
        fill_size = max(ring_size, _next_power_of_two(rx_frames))
        completion_size = max(ring_size, _next_power_of_two(tx_frames))

        self._setsockopt(XDP_UMEM_REG, UMEM_REG.pack(address, len(self._umem), size, 0, 0, 0),
                         f"register UMEM ({frame_count} frames of {size} bytes)")
        self._setsockopt(XDP_UMEM_FILL_RING, fill_size, f"size fill ring to {fill_size}")
        self._setsockopt(XDP_UMEM_COMPLETION_RING, completion_size,
                         f"size completion ring to {completion_size}")
        self._setsockopt(XDP_RX_RING, ring_size, f"size RX ring to {ring_size}")
        self._setsockopt(XDP_TX_RING, ring_size, f"size TX ring to {ring_size}")
        try:
            raw = self._sock.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, MMAP_OFFSETS.size)
        except OSError as exc:
            raise _error(exc.errno or errno.EINVAL, "read ring mmap offsets") from exc
        offsets = MMAP_OFFSETS.unpack(raw.ljust(MMAP_OFFSETS.size, b"\0"))
        self._rx = self._ring(fd, XDP_PGOFF_RX_RING, offsets[0:4], ring_size,
                              XDP_DESC_SIZE, "RX")
        self._tx = self._ring(fd, XDP_PGOFF_TX_RING, offsets[4:8], ring_size,
                              XDP_DESC_SIZE, "TX")
        self._fill = self._ring(fd, XDP_UMEM_PGOFF_FILL_RING, offsets[8:12], fill_size,
                                UMEM_ENTRY_SIZE, "fill")
        self._completion = self._ring(fd, XDP_UMEM_PGOFF_COMPLETION_RING, offsets[12:16],
                                      completion_size, UMEM_ENTRY_SIZE, "completion")

        # Every reception frame goes into the fill ring before the socket is bound.
        fill = self._fill
        for n in range(rx_frames):
            fill.q[n] = n * size
        fill.producer[0] = rx_frames
        self._free_tx = [n * size for n in range(rx_frames, frame_count)]

        # EBUSY: the queue still has a socket, possibly one already closed, whose UMEM the
        # kernel releases from a work item tens of milliseconds later. Wait that out, bounded.
        sockaddr = SOCKADDR_XDP.pack(AF_XDP, XDP_COPY, self.ifindex, self.queue, 0)
        deadline = time.monotonic() + BIND_BUSY_WAIT
        while _libc.bind(fd, sockaddr, len(sockaddr)) != 0:
            err = ctypes.get_errno()
            if err != errno.EBUSY or time.monotonic() >= deadline:
                busy = " (queue held by another AF_XDP socket)" if err == errno.EBUSY else ""
                raise _error(err, f"bind AF_XDP to ifindex {self.ifindex} queue {self.queue}"
                             f"{busy}")
            time.sleep(0.005)

    def _setsockopt(self, option: int, value: int | bytes, step: str) -> None:
        try:
            self._sock.setsockopt(SOL_XDP, option, value)
        except OSError as exc:
            raise _error(exc.errno or errno.EINVAL, step) from exc

    def _ring(self, fd: int, pgoff: int, offsets: Sequence[int], size: int,
              entry_size: int, what: str) -> _Ring:
        ring = _Ring(fd, pgoff, offsets, size, entry_size, what)
        self._rings.append(ring)
        return ring

    def fileno(self) -> int:
        """The socket's fd: readable (POLLIN) when frames wait in the RX ring."""
        return self._sock.fileno()

    def register(self, map_fd: int, key: int) -> None:
        """Put this socket in the XSKMAP ``map_fd`` at ``key`` (usually the queue index the
        XDP program redirects by). The kernel removes it again when the socket closes."""
        try:
            bpfsys.map_update(map_fd, struct.pack("<I", key), struct.pack("<I", self.fileno()))
        except OSError as exc:
            raise _error(exc.errno or errno.EINVAL,
                         f"register AF_XDP socket in XSKMAP fd {map_fd} at key {key}") from exc

    def recv(self, max_frames: int = 256) -> list[bytes]:
        """Up to ``max_frames`` received frames, copied out; their UMEM frames go straight
        back to the fill ring. Never blocks: ``[]`` when the RX ring is empty."""
        if self._closed:
            raise XskError(errno.EBADF, "recv on a closed AF_XDP socket")
        rx = self._rx
        cons = rx.consumer[0]
        n = min((rx.producer[0] - cons) & 0xFFFFFFFF, max_frames)
        if n <= 0:
            return []
        fill = self._fill
        umem = self._umem
        rxq, rxi, rmask = rx.q, rx.i, rx.mask
        fillq, fmask = fill.q, fill.mask
        chunk = self._chunk_mask
        fprod = fill.producer[0]
        frames: list[bytes] = []
        append = frames.append
        for k in range(n):
            slot = (cons + k) & rmask
            addr = rxq[slot * 2]
            append(umem[addr:addr + rxi[slot * 4 + 2]])
            fillq[(fprod + k) & fmask] = addr & chunk
        # The fill ring holds every reception frame, so it always has room for these.
        fill.producer[0] = (fprod + n) & 0xFFFFFFFF
        rx.consumer[0] = (cons + n) & 0xFFFFFFFF
        return frames

    def send(self, frames: Sequence[bytes]) -> int:
        """Copy ``frames`` (whole Ethernet frames) into free TX frames, publish them and kick
        the kernel; returns how many were queued, fewer than given when TX frames or TX ring
        slots run out (the rest are the caller's to retry). Frames the kernel has not taken
        after a bounded number of kicks go out with the next call; ``send([])`` only kicks
        and reaps the completion ring. Raises ValueError, queuing nothing, for an empty frame
        or one longer than ``frame_size``."""
        if self._closed:
            raise XskError(errno.EBADF, "send on a closed AF_XDP socket")
        size = self.frame_size
        for frame in frames:
            if not 0 < len(frame) <= size:
                raise ValueError(f"frame of {len(frame)} bytes: must be 1 to {size} bytes")
        self._reap()
        tx = self._tx
        prod = tx.producer[0]
        room = tx.size - ((prod - tx.consumer[0]) & 0xFFFFFFFF)
        free = self._free_tx
        n = min(len(frames), len(free), room)
        umem = self._umem
        txq, txi, mask = tx.q, tx.i, tx.mask
        for k in range(n):
            frame = frames[k]
            addr = free.pop()
            umem[addr:addr + len(frame)] = frame
            slot = (prod + k) & mask
            txq[slot * 2] = addr
            txi[slot * 4 + 2] = len(frame)
            txi[slot * 4 + 3] = 0
        if n:
            tx.producer[0] = (prod + n) & 0xFFFFFFFF
        self._kick()
        self._reap()
        return n

    def _kick(self) -> None:
        """sendto() until the kernel took every published TX descriptor (copy mode sends at
        most TX_BATCH per call), a bounded number of times."""
        tx = self._tx
        pending = (tx.producer[0] - tx.consumer[0]) & 0xFFFFFFFF
        fd = self._sock.fileno()
        for _ in range(pending // TX_BATCH + KICK_SLACK):
            if (tx.producer[0] - tx.consumer[0]) & 0xFFFFFFFF == 0:
                return
            if _libc.sendto(fd, None, 0, socket.MSG_DONTWAIT, None, 0) < 0:
                err = ctypes.get_errno()
                if err not in _RETRY_ERRNOS:
                    raise _error(err, f"kick TX of ifindex {self.ifindex} queue {self.queue}")

    def _reap(self) -> None:
        """Return the frames of the completion ring to the TX free list."""
        cr = self._completion
        cons = cr.consumer[0]
        n = (cr.producer[0] - cons) & 0xFFFFFFFF
        if not n:
            return
        q, mask, chunk = cr.q, cr.mask, self._chunk_mask
        self._free_tx.extend(q[(cons + k) & mask] & chunk for k in range(n))
        cr.consumer[0] = (cons + n) & 0xFFFFFFFF

    def stats(self) -> dict[str, int]:
        """The kernel's counters (struct xdp_statistics) and the free TX frames."""
        try:
            raw = self._sock.getsockopt(SOL_XDP, XDP_STATISTICS, STATISTICS.size)
        except OSError as exc:
            raise _error(exc.errno or errno.EINVAL, "read AF_XDP statistics") from exc
        counters = dict(zip(STATISTICS_FIELDS, STATISTICS.unpack(
            raw.ljust(STATISTICS.size, b"\0")), strict=True))
        counters["tx_free_frames"] = len(self._free_tx)
        return counters

    def close(self) -> None:
        """Unmap the rings, close the socket (which leaves every XSKMAP), free the UMEM.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        self._sock.close()
        self._umem.close()

    def __enter__(self) -> XskSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
