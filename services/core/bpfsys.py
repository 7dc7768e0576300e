"""The bpf() system call, for what bcc does not offer: pins, links, object info, map access.

Used by policyd to adopt pinned programs, links and maps without recompiling, and by the
other daemons to read pinned maps. Commands and attribute layouts: include/uapi/linux/bpf.h.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_BPF = 321  # x86_64

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

# enum bpf_map_type
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12

# enum bpf_attach_type / bpf_link_type
BPF_XDP = 37
BPF_LINK_TYPE_XDP = 6

# XDP attach flags (include/uapi/linux/if_link.h)
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_F_REPLACE = 1 << 2

BPF_ANY = 0
ATTR_SIZE = 144  # enough for every command used here


class BpfError(OSError):
    """A bpf() command failed; ``errno`` and the command name are kept."""


def _bpf(cmd: int, attr: bytearray, what: str) -> int:
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    ret = int(_libc.syscall(SYS_BPF, cmd, buf, len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attr() -> bytearray:
    return bytearray(ATTR_SIZE)


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def obj_get(path: str) -> int:
    """Open a pinned object; returns a new fd."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr()
    struct.pack_into("=Q", attr, 0, _addr(name))
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")


def obj_pin(fd: int, path: str) -> None:
    """Pin an object fd at a bpffs path."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr()
    struct.pack_into("=QI", attr, 0, _addr(name), fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def fd_by_id(kind: str, obj_id: int) -> int:
    """Open a program, map or link by its kernel id."""
    cmd = {"prog": BPF_PROG_GET_FD_BY_ID, "map": BPF_MAP_GET_FD_BY_ID,
           "link": BPF_LINK_GET_FD_BY_ID}[kind]
    attr = _attr()
    struct.pack_into("=I", attr, 0, obj_id)
    return _bpf(cmd, attr, f"open {kind} id {obj_id}")


def _info(fd: int, size: int, what: str, prepare: bytes = b"") -> bytes:
    info = ctypes.create_string_buffer(prepare.ljust(size, b"\0"), size)
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, fd, size, _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)
    return info.raw


@dataclass(frozen=True)
class ProgInfo:
    """The fields of struct bpf_prog_info that vpnr reads."""

    prog_type: int
    id: int
    tag: str
    xlated_len: int
    name: str
    map_ids: tuple[int, ...]

    @property
    def instructions(self) -> int:
        """Number of translated instructions (8 bytes each)."""
        return self.xlated_len // 8


def prog_info(fd: int) -> ProgInfo:
    """Describe a loaded program, including the ids of the maps it uses."""
    raw = _info(fd, 112, "program info")
    nr_maps = struct.unpack_from("=I", raw, 52)[0]
    ids = (ctypes.c_uint32 * max(nr_maps, 1))()
    prepare = bytearray(112)
    struct.pack_into("=I", prepare, 52, nr_maps)
    struct.pack_into("=Q", prepare, 56, ctypes.addressof(ids))
    raw = _info(fd, 112, "program info", bytes(prepare))
    prog_type, prog_id = struct.unpack_from("=II", raw, 0)
    tag = raw[8:16].hex()
    xlated_len = struct.unpack_from("=I", raw, 20)[0]
    name = raw[64:80].split(b"\0", 1)[0].decode()
    return ProgInfo(prog_type, prog_id, tag, xlated_len, name, tuple(ids[:nr_maps]))


@dataclass(frozen=True)
class MapInfo:
    """The fields of struct bpf_map_info that vpnr checks before trusting a pinned map."""

    map_type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    """Describe a map."""
    raw = _info(fd, 96, "map info")
    map_type, map_id, key_size, value_size, max_entries, flags = struct.unpack_from("=6I", raw)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(map_type, map_id, key_size, value_size, max_entries, flags, name)


@dataclass(frozen=True)
class LinkInfo:
    """The fields of struct bpf_link_info for an XDP link."""

    link_type: int
    id: int
    prog_id: int
    ifindex: int  # 0 once the interface is gone (the link is then defunct)


def link_info(fd: int) -> LinkInfo:
    """Describe a BPF link."""
    raw = _info(fd, 64, "link info")
    link_type, link_id, prog_id = struct.unpack_from("=III", raw, 0)
    ifindex = struct.unpack_from("=I", raw, 16)[0] if link_type == BPF_LINK_TYPE_XDP else 0
    return LinkInfo(link_type, link_id, prog_id, ifindex)


def link_create_xdp(prog_fd: int, ifindex: int, flags: int) -> int:
    """Attach an XDP program through a BPF link; returns the link fd."""
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, prog_fd, ifindex, BPF_XDP, flags)
    return _bpf(BPF_LINK_CREATE, attr, f"attach XDP link to ifindex {ifindex}")


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int) -> None:
    """Swap the program behind a link atomically, only if it still runs ``old_prog_fd``."""
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, link_fd, new_prog_fd, BPF_F_REPLACE, old_prog_fd)
    _bpf(BPF_LINK_UPDATE, attr, "replace program behind XDP link")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Look a key up; None when absent."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    value = ctypes.create_string_buffer(value_size)
    attr = _attr()
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, _addr(key_buf), _addr(value), 0)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, "map lookup")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return value.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Insert or replace one element."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value, len(value))
    attr = _attr()
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, _addr(key_buf), _addr(value_buf), flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "map update")


def map_delete(fd: int, key: bytes) -> None:
    """Delete one element (ENOENT is an error)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, fd, 0, _addr(key_buf))
    _bpf(BPF_MAP_DELETE_ELEM, attr, "map delete")


def map_keys(fd: int, key_size: int, limit: int = 1 << 24) -> Iterator[bytes]:
    """Iterate the keys of a hash-like map (bounded by ``limit``)."""
    current: ctypes.Array[ctypes.c_char] | None = None
    for _ in range(limit):
        nxt = ctypes.create_string_buffer(key_size)
        attr = _attr()
        struct.pack_into("=IIQQ", attr, 0, fd, 0, _addr(current) if current else 0, _addr(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, "map iterate")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        yield nxt.raw
        current = nxt


@cache
def possible_cpus() -> int:
    """Number of possible CPUs: the width of every per-CPU map value."""
    text = Path("/sys/devices/system/cpu/possible").read_text(encoding="ascii").strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def percpu_lookup(fd: int, key: bytes, value_size: int) -> list[bytes] | None:
    """Look up a per-CPU map element: one value per possible CPU."""
    stride = (value_size + 7) & ~7
    raw = map_lookup(fd, key, stride * possible_cpus())
    if raw is None:
        return None
    return [raw[i * stride:i * stride + value_size] for i in range(possible_cpus())]


@dataclass(frozen=True)
class TestRun:
    """What BPF_PROG_TEST_RUN reported for one crafted packet."""

    retval: int
    duration_ns: int  # mean per repetition, as the kernel measured it
    data_out: bytes


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes = b"") -> TestRun:
    """Run a loaded program on ``data`` in the kernel (XDP/TC: an Ethernet frame).

    ``ctx`` is the program's context struct (XDP: struct xdp_md, which names the ingress
    interface and the length of a metadata area at the start of ``data``).
    """
    data_in = ctypes.create_string_buffer(data, len(data))
    out_size = max(len(data) + 256, 256)
    data_out = ctypes.create_string_buffer(out_size)
    ctx_in = ctypes.create_string_buffer(ctx, max(len(ctx), 1))
    ctx_out = ctypes.create_string_buffer(max(len(ctx), 1))
    attr = _attr()
    # struct bpf_attr.test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out,
    # repeat, duration, ctx_size_in, ctx_size_out, ctx_in, ctx_out
    struct.pack_into("=IIIIQQIIIIQQ", attr, 0, prog_fd, 0, len(data), out_size,
                     _addr(data_in), _addr(data_out), max(repeat, 1), 0, len(ctx),
                     len(ctx), _addr(ctx_in) if ctx else 0, _addr(ctx_out) if ctx else 0)
    _bpf(BPF_PROG_TEST_RUN, attr, "program test run")
    retval, _, size_out = struct.unpack_from("=III", attr, 4)
    duration = struct.unpack_from("=I", attr, 36)[0]
    return TestRun(retval, duration, data_out.raw[:size_out])


BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_XDP = 6


def prog_load(prog_type: int, insns: bytes, license_: str = "GPL") -> int:
    """Load a program from raw instructions (8 bytes each); returns its fd."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license_.encode())
    attr = _attr()
    struct.pack_into("=IIQQ", attr, 0, prog_type, len(insns) // 8, _addr(code), _addr(lic))
    return _bpf(BPF_PROG_LOAD, attr, "load program")


def prog_test_run_live(prog_fd: int, frame: bytes, ctx: bytes, repeat: int,
                       batch_size: int) -> None:
    """Run an XDP program ``repeat`` times with BPF_F_TEST_XDP_LIVE_FRAMES: each frame it
    passes, redirects or transmits really leaves (a kernel-speed packet generator)."""
    data = ctypes.create_string_buffer(frame, len(frame))
    ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
    attr = _attr()
    # struct bpf_attr.test: ..., ctx_in, ctx_out, flags, cpu, batch_size
    struct.pack_into("=IIIIQQIIIIQQIII", attr, 0, prog_fd, 0, len(frame), 0, _addr(data), 0,
                     repeat, 0, len(ctx), 0, _addr(ctx_in), 0, BPF_F_TEST_XDP_LIVE_FRAMES, 0,
                     batch_size)
    _bpf(BPF_PROG_TEST_RUN, attr, "live-frame test run")


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "", inner_map_fd: int = 0, flags: int = 0) -> int:
    """Create a map; returns its fd."""
    attr = _attr()
    struct.pack_into("=IIIIII", attr, 0, map_type, key_size, value_size, max_entries, flags,
                     inner_map_fd)
    struct.pack_into("16s", attr, 28, name.encode()[:15])
    return _bpf(BPF_MAP_CREATE, attr, f"create map {name or map_type}")


def _batch(cmd: int, fd: int, keys: bytes, values: bytes, count: int, what: str) -> None:
    key_buf = ctypes.create_string_buffer(keys, max(len(keys), 1))
    value_buf = ctypes.create_string_buffer(values, max(len(values), 1))
    attr = _attr()
    # struct bpf_attr.batch: in_batch, out_batch, keys, values, count, map_fd, elem_flags
    struct.pack_into("=QQQQIIQ", attr, 0, 0, 0, _addr(key_buf),
                     _addr(value_buf) if values else 0, count, fd, 0)
    _bpf(cmd, attr, what)
    done = struct.unpack_from("=I", attr, 32)[0]
    if done != count:
        raise BpfError(errno.EIO, f"{what}: {done} of {count} elements")


BATCH_CHUNK = 8192


def map_update_batch(fd: int, items: list[tuple[bytes, bytes]]) -> None:
    """Insert or replace many elements of a hash or array map, a few syscalls in all."""
    for i in range(0, len(items), BATCH_CHUNK):
        chunk = items[i:i + BATCH_CHUNK]
        _batch(BPF_MAP_UPDATE_BATCH, fd, b"".join(k for k, _ in chunk),
               b"".join(v for _, v in chunk), len(chunk), "map batch update")


def map_delete_batch(fd: int, keys: list[bytes]) -> None:
    """Delete many elements of a hash map (every key must exist)."""
    for i in range(0, len(keys), BATCH_CHUNK):
        chunk = keys[i:i + BATCH_CHUNK]
        _batch(BPF_MAP_DELETE_BATCH, fd, b"".join(chunk), b"", len(chunk), "map batch delete")


class GracePeriod:
    """Waits until every BPF program that started before the call has finished.

    The kernel runs synchronize_rcu() on each update of a map-in-map (so that user space
    knows no program still sees the old inner map): updating a private one-slot
    array-of-maps is the documented way for user space to wait for in-flight programs.
    """

    def __init__(self) -> None:
        self.inner_fd = map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, "vpnr_rcu_inner")
        self.outer_fd = map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1, "vpnr_rcu",
                                   inner_map_fd=self.inner_fd)

    def wait(self) -> None:
        """Return once a full RCU grace period has passed."""
        map_update(self.outer_fd, struct.pack("=I", 0), struct.pack("=I", self.inner_fd))

    def close(self) -> None:
        """Release both maps."""
        os.close(self.outer_fd)
        os.close(self.inner_fd)


def percpu_u64_totals(fd: int, max_entries: int) -> list[int]:
    """Each u64 element of a per-CPU array summed over the CPUs (counters), by index."""
    return [sum(int.from_bytes(v, "little") for v in row)
            for row in percpu_array_rows(fd, 8, max_entries)]


def percpu_array_rows(fd: int, value_size: int, max_entries: int) -> list[list[bytes]]:
    """Every element of a per-CPU array, one list of per-CPU values per index, read with
    BPF_MAP_LOOKUP_BATCH (a few syscalls instead of one per element)."""
    stride = (value_size + 7) & ~7
    cpus = possible_cpus()
    rows: list[list[bytes]] = []
    token = ctypes.create_string_buffer(4)
    first = True
    while len(rows) < max_entries:
        count = min(BATCH_CHUNK, max_entries - len(rows))
        keys = ctypes.create_string_buffer(4 * count)
        values = ctypes.create_string_buffer(stride * cpus * count)
        attr = _attr()
        struct.pack_into("=QQQQIIQ", attr, 0, 0 if first else _addr(token), _addr(token),
                         _addr(keys), _addr(values), count, fd, 0)
        try:
            _bpf(BPF_MAP_LOOKUP_BATCH, attr, "map batch lookup")
            done_all = False
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            done_all = True  # the last chunk: count says how many came back
        got = struct.unpack_from("=I", attr, 32)[0]
        raw = values.raw
        for i in range(got):
            base = i * stride * cpus
            rows.append([raw[base + c * stride:base + c * stride + value_size]
                         for c in range(cpus)])
        first = False
        if done_all or got == 0:
            break
    return rows
