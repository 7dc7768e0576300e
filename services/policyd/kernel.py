"""policyd's pinned policy maps: open and check them, write slots, flip, read counters.

The thin layer under the compiler (see compiler.py): it only moves packed entries into the
kernel. Every map of bpf/lib/maps.h is pinned under the instance's pin directory.

Atomic replace: the whole new policy is written into the idle slot, then the one 64-bit
policy_active word is rewritten (slot and version together); after a grace period no
packet still reads the old slot and it may be reused. Single-binding changes are written
into the live slot directly: one LPM element update is atomic on its own.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vpnr.core import bpfsys
from vpnr.policyd import layout
from vpnr.policyd.compiler import SlotImage

log = logging.getLogger("vpnr.policyd.kernel")

HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY = 1, 2, 5, 6
LPM_TRIE, ARRAY_OF_MAPS, XSKMAP, RINGBUF = 11, 12, 17, 27
PROG_ARRAY = 3
BPF_F_NO_PREALLOC = 1

DEFAULT_RING_BYTES = 8 << 20
# The source-binding tries (inner maps of a one-element array of maps, see bpf/lib/maps.h):
# outer pin name -> (family, key size). Both policy slots share one trie.
BINDING_TRIES: dict[str, tuple[int, int]] = {
    "src4_bindings": (4, layout.LPM4_KEY.size),
    "src6_bindings": (6, layout.LPM6_KEY.size),
}
DEFAULT_BINDING_ENTRIES = 1024
BINDING_LIMIT = layout.MAX_BINDINGS  # bindings per family in one policy
GROW_AT = 0.8  # grow a binding trie when a change would leave it fuller than this


def expected_maps(ring_bytes: int) -> dict[str, tuple[int, int, int, int]]:
    """Pinned map name -> (type, key size, value size, max entries), as maps.h declares."""
    percpu = layout.TRAFFIC.size
    return {
        "xdp_stats": (PERCPU_HASH, layout.STATS_KEY.size, layout.COUNTER.size,
                      layout.STATS_MAX_ENTRIES),
        "policy_active": (ARRAY, 4, 8, 1),
        "vpnr_config": (ARRAY, 4, layout.CONFIG.size, 1),
        "iface_zones": (ARRAY, 4, layout.IFACE.size, layout.MAX_IFINDEX),
        "src4_bindings": (ARRAY_OF_MAPS, 4, 4, 1),
        "src6_bindings": (ARRAY_OF_MAPS, 4, 4, 1),
        "dst4_zones": (LPM_TRIE, layout.LPM4_KEY.size, 4, layout.MAX_ZONES),
        "dst6_zones": (LPM_TRIE, layout.LPM6_KEY.size, 4, layout.MAX_ZONES),
        "rolesets": (ARRAY, 4, layout.ROLESET.size, 2 * layout.MAX_ROLESETS),
        "rule_buckets": (HASH, layout.BUCKET_KEY.size, layout.BUCKET.size, layout.MAX_BUCKETS),
        "rule_table": (ARRAY, 4, layout.RULE.size, 2 * layout.RULE_TABLE_HALF),
        "binding_traffic": (PERCPU_ARRAY, 4, percpu, layout.MAX_BINDINGS),
        "roleset_traffic": (PERCPU_ARRAY, 4, percpu, layout.MAX_ROLESETS),
        "audit_buckets": (PERCPU_ARRAY, 4, layout.AUDIT_BUCKET.size, layout.MAX_ROLES),
        "audit_lost": (PERCPU_ARRAY, 4, 8, layout.AUDIT_LOST_MAX),
        "audit_ring": (RINGBUF, 0, 0, ring_bytes),
        "xsk_map": (XSKMAP, 4, 4, layout.MAX_QUEUES),
        "tunnel_settings": (ARRAY, 4, layout.TUNNEL_SETTINGS.size, 1),
        "tunnel_sessions": (HASH, 4, 4, layout.MAX_TUNNEL_SESSIONS),
    }


def open_binding_trie(pin_dir: Path, name: str) -> int:
    """An fd on the binding trie in force (the element of the pinned array of maps ``name``);
    for readers outside policyd, e.g. to count what the kernel holds."""
    outer = bpfsys.obj_get(str(pin_dir / name))
    try:
        raw = bpfsys.map_lookup(outer, layout.U32.pack(0), 4)
    finally:
        os.close(outer)
    if raw is None:
        raise KernelMapError(f"{pin_dir / name} holds no trie yet")
    return bpfsys.fd_by_id("map", layout.U32.unpack(raw)[0])


def check_pinned(pin_dir: Path, ring_bytes: int) -> list[str]:
    """Unpin every pinned map whose shape differs from maps.h (bcc would reuse it blindly);
    returns the names removed. The next build recreates them."""
    removed = []
    for name, shape in expected_maps(ring_bytes).items():
        path = pin_dir / name
        if not path.exists():
            continue
        fd = bpfsys.obj_get(str(path))
        try:
            info = bpfsys.map_info(fd)
        finally:
            os.close(fd)
        if (info.map_type, info.key_size, info.value_size, info.max_entries) != shape:
            log.warning("pinned map has another shape; replacing it",
                        extra={"map": name, "found": [info.map_type, info.key_size,
                                                      info.value_size, info.max_entries],
                               "expected": list(shape)})
            path.unlink()
            removed.append(name)
    return removed


class KernelMapError(Exception):
    """A pinned map is missing, misshapen, or refused an update."""


@dataclass
class Mirror:
    """What policyd knows one slot holds; None for a map it has not read since start."""

    src4: dict[bytes, bytes | None] | None = None
    src6: dict[bytes, bytes | None] | None = None
    zones4: dict[bytes, bytes | None] | None = None
    zones6: dict[bytes, bytes | None] | None = None
    buckets: dict[bytes, bytes | None] | None = None


@dataclass(frozen=True)
class TrieFill:
    """How full one binding trie is."""

    name: str
    entries: int
    capacity: int
    limit: int
    grows: int


class PolicyMaps:
    """Open fds on the pinned maps of one router instance.

    ``fds[name]`` is the map policyd reads and writes; for the binding tries that is the
    inner trie in force (``outer_fds`` hold the pinned arrays of maps that point at them).
    """

    def __init__(self, pin_dir: Path, ring_bytes: int = DEFAULT_RING_BYTES,
                 binding_entries: int = DEFAULT_BINDING_ENTRIES,
                 binding_limit: int = BINDING_LIMIT) -> None:
        self.pin_dir = pin_dir
        self.fds: dict[str, int] = {}
        self.outer_fds: dict[str, int] = {}
        self.capacity: dict[str, int] = {}
        self.grows = dict.fromkeys(BINDING_TRIES, 0)
        # A trie holds both policy slots: at most twice the bindings one policy may have.
        self.binding_limit = binding_limit
        self.trie_limit = 2 * binding_limit
        self.binding_entries = min(binding_entries, self.trie_limit)
        self.mirrors = {0: Mirror(), 1: Mirror()}
        self.grace = bpfsys.GracePeriod()
        try:
            for name, shape in expected_maps(ring_bytes).items():
                path = pin_dir / name
                try:
                    fd = bpfsys.obj_get(str(path))
                except bpfsys.BpfError as exc:
                    raise KernelMapError(f"pinned map {path} cannot be opened: "
                                         f"{exc.strerror}") from exc
                self.fds[name] = fd
                info = bpfsys.map_info(fd)
                found = (info.map_type, info.key_size, info.value_size, info.max_entries)
                if found != shape:
                    raise KernelMapError(f"pinned map {path} has shape {found}, "
                                         f"expected {shape}")
            for name in BINDING_TRIES:
                self.outer_fds[name] = self.fds.pop(name)
                self.fds[name] = self._open_trie(name)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every fd; the maps stay pinned."""
        for fd in (*self.fds.values(), *self.outer_fds.values()):
            os.close(fd)
        self.fds.clear()
        self.outer_fds.clear()
        self.grace.close()

    # -- the binding tries: sized to need, grown by copy and swap -----------------------

    def _open_trie(self, name: str) -> int:
        """The trie the pinned array of maps points at; a new one when it points nowhere
        (a fresh instance: the program then treats every source as unbound)."""
        outer = self.outer_fds[name]
        raw = bpfsys.map_lookup(outer, layout.U32.pack(0), 4)
        if raw is not None:
            fd = bpfsys.fd_by_id("map", layout.U32.unpack(raw)[0])
            self.capacity[name] = bpfsys.map_info(fd).max_entries
            return fd
        fd = self._new_trie(name, self.binding_entries)
        try:
            bpfsys.map_update(outer, layout.U32.pack(0), layout.U32.pack(fd))
        except BaseException:
            os.close(fd)
            raise
        self.capacity[name] = self.binding_entries
        return fd

    def _new_trie(self, name: str, entries: int) -> int:
        key_size = BINDING_TRIES[name][1]
        try:
            return bpfsys.map_create(LPM_TRIE, key_size, layout.BINDING.size, entries,
                                     name=name[:15], flags=BPF_F_NO_PREALLOC)
        except bpfsys.BpfError as exc:
            raise KernelMapError(f"cannot create a {entries}-entry trie for {name}: "
                                 f"{exc.strerror}") from exc

    def trie_entries(self, name: str) -> int:
        """Entries in a binding trie, both slots."""
        total = 0
        for slot in (0, 1):
            mirror = self._mirror(slot)
            held = mirror.src4 if name == "src4_bindings" else mirror.src6
            total += len(held or {})
        return total

    def trie_fill(self) -> list[TrieFill]:
        """Fill of both binding tries (for Status and metrics)."""
        return [TrieFill(name, self.trie_entries(name), self.capacity[name],
                         self.trie_limit, self.grows[name]) for name in BINDING_TRIES]

    def ensure_room(self, name: str, bindings: int, needed: int) -> None:
        """Make binding trie ``name`` ready for a slot of ``bindings`` entries, ``needed``
        in the whole trie: refuse beyond the hard limit (before anything is written), grow
        when ``needed`` passes 80% of the trie's size."""
        if bindings > self.binding_limit:
            raise KernelMapError(
                f"{name}: {bindings} bindings of one address family are beyond the hard "
                f"limit of {self.binding_limit} (policyd.binding_map_limit)")
        capacity = self.capacity[name]
        if needed <= GROW_AT * capacity or capacity >= self.trie_limit:
            return
        target = max(2 * capacity, int(needed / GROW_AT) + 1)
        self.grow(name, min(self.trie_limit, target))

    def grow(self, name: str, entries: int) -> None:
        """Copy binding trie ``name`` into a new one of ``entries`` and swap it in: one
        element update of the outer array, so every lookup finds a complete trie."""
        old_fd, key_size = self.fds[name], BINDING_TRIES[name][1]
        new_fd = self._new_trie(name, entries)
        try:
            items = []
            for key in list(bpfsys.map_keys(old_fd, key_size)):
                value = bpfsys.map_lookup(old_fd, key, layout.BINDING.size)
                if value is not None:
                    items.append((key, value))
            if items:
                bpfsys.map_update_batch(new_fd, items)
            bpfsys.map_update(self.outer_fds[name], layout.U32.pack(0), layout.U32.pack(new_fd))
        except BaseException:
            os.close(new_fd)
            raise
        self.fds[name] = new_fd
        os.close(old_fd)
        old = self.capacity[name]
        self.capacity[name] = entries
        self.grows[name] += 1
        log.info("grew binding map", extra={"map": name, "from_entries": old,
                                            "to_entries": entries, "copied": len(items)})

    # -- the live slot ---------------------------------------------------------------

    def active(self) -> tuple[int, int]:
        """(live slot, policy version) as the program sees them."""
        return layout.split_active(bpfsys.map_lookup(self.fds["policy_active"],
                                                     layout.U32.pack(0), 8))

    def set_active(self, slot: int, version: int) -> None:
        """Rewrite the policy_active word (one aligned 64-bit store in the kernel)."""
        bpfsys.map_update(self.fds["policy_active"], layout.U32.pack(0),
                          layout.active_word(slot, version))

    def flip(self, slot: int, version: int) -> None:
        """Make ``slot`` live, then wait until no packet still reads the other one."""
        self.set_active(slot, version)
        self.grace.wait()

    # -- whole slots ------------------------------------------------------------------

    def _scan(self, name: str, slot: int, slot_offset: int, slot_mask: int = 0xFF
              ) -> dict[bytes, bytes | None]:
        key_size = BINDING_TRIES[name][1] if name in BINDING_TRIES else expected_maps(0)[name][1]
        found: dict[bytes, bytes | None] = {}
        for key in bpfsys.map_keys(self.fds[name], key_size):
            if key[slot_offset] & slot_mask == slot:
                found[key] = None  # value unknown: rewritten on the next write
        return found

    def learn_slot(self, slot: int) -> None:
        """Read which keys a slot holds, for the maps policyd has not read yet."""
        self._mirror(slot)

    def _mirror(self, slot: int) -> Mirror:
        mirror = self.mirrors[slot]
        if mirror.src4 is None:
            mirror.src4 = self._scan("src4_bindings", slot, 4)
        if mirror.src6 is None:
            mirror.src6 = self._scan("src6_bindings", slot, 4)
        if mirror.zones4 is None:
            mirror.zones4 = self._scan("dst4_zones", slot, 4)
        if mirror.zones6 is None:
            mirror.zones6 = self._scan("dst6_zones", slot, 4)
        if mirror.buckets is None:
            mirror.buckets = self._scan("rule_buckets", slot, 7, layout.ACTIVE_SLOT)
        return mirror

    def _sync(self, name: str, have: dict[bytes, bytes | None],
              want: dict[bytes, bytes]) -> None:
        """Make map ``name``'s entries of one slot equal ``want``: batch deletes and
        updates of what differs (the LPM tries take batch operations too on this kernel)."""
        fd = self.fds[name]
        stale = [k for k in have if k not in want]
        if stale:
            try:
                bpfsys.map_delete_batch(fd, stale)
            except bpfsys.BpfError:
                for key in stale:  # a key vanished meanwhile: delete one by one
                    with contextlib.suppress(FileNotFoundError):
                        self._delete(fd, key)
            for key in stale:
                del have[key]
        changed = [(k, v) for k, v in want.items() if have.get(k) != v]
        if changed:
            try:
                bpfsys.map_update_batch(fd, changed)
            except bpfsys.BpfError as exc:
                raise self._full(name, exc) from exc
            have.update(changed)

    def write_slot(self, image: SlotImage) -> None:
        """Make the (idle) slot hold exactly ``image``; writes only what differs."""
        slot = image.slot
        mirror = self._mirror(slot)
        assert mirror.src4 is not None and mirror.src6 is not None
        assert mirror.zones4 is not None and mirror.zones6 is not None
        assert mirror.buckets is not None
        # Room first: a change beyond a hard limit is refused before anything is written.
        other = self._mirror(1 - slot)
        self.ensure_room("src4_bindings", len(image.src4), len(other.src4 or {}) + len(image.src4))
        self.ensure_room("src6_bindings", len(image.src6), len(other.src6 or {}) + len(image.src6))
        # Referenced data first, references last (matters when the slot is live).
        self.write_rules(slot, 0, image.rules)
        self.write_rolesets(slot, image.rolesets)
        self._sync("rule_buckets", mirror.buckets, image.buckets)
        self._sync("dst4_zones", mirror.zones4, image.zones4)
        self._sync("dst6_zones", mirror.zones6, image.zones6)
        self._sync("src4_bindings", mirror.src4, image.src4)
        self._sync("src6_bindings", mirror.src6, image.src6)

    def write_rules(self, slot: int, first: int, rules: list[bytes]) -> None:
        """Rule-table entries ``first``.. of a slot's half."""
        base = slot * layout.RULE_TABLE_HALF + first
        bpfsys.map_update_batch(self.fds["rule_table"],
                                [(layout.U32.pack(base + i), r) for i, r in enumerate(rules)])

    def write_rolesets(self, slot: int, rolesets: dict[int, bytes]) -> None:
        """Role-set entries of a slot."""
        base = slot * layout.MAX_ROLESETS
        bpfsys.map_update_batch(self.fds["rolesets"], [(layout.U32.pack(base + i), v)
                                                       for i, v in rolesets.items()])

    def add_buckets(self, slot: int, buckets: dict[bytes, bytes]) -> None:
        """New bucket entries in a slot (for a role set compiled into the live slot)."""
        mirror = self._mirror(slot)
        assert mirror.buckets is not None
        try:
            bpfsys.map_update_batch(self.fds["rule_buckets"], list(buckets.items()))
        except bpfsys.BpfError as exc:
            raise self._full("rule_buckets", exc) from exc
        mirror.buckets.update(buckets)

    # -- single bindings --------------------------------------------------------------

    def put_binding(self, slot: int, family: int, key: bytes, value: bytes) -> None:
        """Insert or change one binding in a slot (atomic for readers)."""
        name = "src4_bindings" if family == 4 else "src6_bindings"
        mirror = self._mirror(slot)
        have = mirror.src4 if family == 4 else mirror.src6
        assert have is not None
        if key not in have:
            self.ensure_room(name, len(have) + 1, self.trie_entries(name) + 1)
        self._update(self.fds[name], key, value, name)
        have[key] = value

    def delete_binding(self, slot: int, family: int, key: bytes) -> None:
        """Remove one binding from a slot."""
        name = "src4_bindings" if family == 4 else "src6_bindings"
        mirror = self._mirror(slot)
        have = mirror.src4 if family == 4 else mirror.src6
        assert have is not None
        with contextlib.suppress(FileNotFoundError):
            self._delete(self.fds[name], key)
        have.pop(key, None)

    # -- router settings --------------------------------------------------------------

    def write_config(self, value: bytes) -> None:
        """struct vpnr_config."""
        bpfsys.map_update(self.fds["vpnr_config"], layout.U32.pack(0), value)

    def write_interfaces(self, zones: dict[int, int]) -> None:
        """ifindex -> zone for every configured interface; every other index is cleared
        (configured ones are never cleared first, so their packets never see a gap)."""
        for ifindex in zones:
            if not 0 < ifindex < layout.MAX_IFINDEX:
                raise KernelMapError(f"interface index {ifindex} is beyond the "
                                     f"{layout.MAX_IFINDEX} that iface_zones holds")
        unset = layout.IFACE.pack(0)
        bpfsys.map_update_batch(self.fds["iface_zones"], [
            (layout.U32.pack(i), layout.IFACE.pack(zones[i]) if i in zones else unset)
            for i in range(layout.MAX_IFINDEX)])

    # -- reading ----------------------------------------------------------------------

    def traffic(self, name: str, index: int) -> tuple[int, ...]:
        """A per-identity accounting row summed over CPUs (8 counters, TRAFFIC order)."""
        values = bpfsys.percpu_lookup(self.fds[name], layout.U32.pack(index),
                                      layout.TRAFFIC.size) or []
        totals = [0] * 8
        for raw in values:
            for i, v in enumerate(layout.TRAFFIC.unpack(raw)):
                totals[i] += v
        return tuple(totals)

    def all_traffic(self, name: str, upto: int) -> list[tuple[int, ...]]:
        """Accounting rows 0..upto-1 of a map, summed over CPUs, indexed by id."""
        max_entries = min(expected_maps(0)[name][3], max(upto, 1))
        out = []
        for per_cpu in bpfsys.percpu_array_rows(self.fds[name], layout.TRAFFIC.size,
                                                max_entries):
            totals = [0] * 8
            for raw in per_cpu:
                for i, v in enumerate(layout.TRAFFIC.unpack(raw)):
                    totals[i] += v
            out.append(tuple(totals))
        return out

    def clear_traffic(self, name: str, *indexes: int) -> None:
        """Zero accounting rows (ids handed to new identities)."""
        zero = bytes(((layout.TRAFFIC.size + 7) & ~7) * bpfsys.possible_cpus())
        bpfsys.map_update_batch(self.fds[name], [(layout.U32.pack(i), zero) for i in indexes])

    def audit_lost(self) -> list[int]:
        """audit_lost counters summed over CPUs, by AUDIT_* index."""
        return bpfsys.percpu_u64_totals(self.fds["audit_lost"], layout.AUDIT_LOST_MAX)

    def roleset(self, slot: int, roleset_id: int) -> tuple[int, ...]:
        """Role ids of a role set as the kernel holds it."""
        raw = bpfsys.map_lookup(self.fds["rolesets"],
                                layout.U32.pack(slot * layout.MAX_ROLESETS + roleset_id),
                                layout.ROLESET.size)
        if raw is None:
            return ()
        fields = layout.ROLESET.unpack(raw)
        return tuple(fields[1:1 + fields[0]])

    def xsk_bound(self, queue: int = 0) -> bool:
        """Is an AF_XDP socket bound for this receive queue?"""
        try:
            return bpfsys.map_lookup(self.fds["xsk_map"], layout.U32.pack(queue), 4) is not None
        except bpfsys.BpfError:
            return False

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _update(fd: int, key: bytes, value: bytes, name: str) -> None:
        try:
            bpfsys.map_update(fd, key, value)
        except bpfsys.BpfError as exc:
            raise PolicyMaps._full(name, exc) from exc

    @staticmethod
    def _delete(fd: int, key: bytes) -> None:
        try:
            bpfsys.map_delete(fd, key)
        except bpfsys.BpfError as exc:
            if exc.errno == errno.ENOENT:
                raise FileNotFoundError from exc
            raise

    @staticmethod
    def _full(name: str, exc: bpfsys.BpfError) -> KernelMapError:
        if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
            return KernelMapError(f"map {name} is full ({exc.strerror})")
        return KernelMapError(f"map {name}: {exc.strerror}")
