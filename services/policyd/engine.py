"""policyd's policy engine: the desired policy, its versions, and keeping the kernel on it.

Every change is validated against the whole policy, committed to the store, then written to
the kernel. Whole-policy changes (replace, restore, roles, rules, zones) are compiled into
the idle slot and made live with one atomic flip. A single binding is written into the live
slot directly, which is what makes revocation take effect on the next packet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from vpnr.policyd import layout
from vpnr.policyd.compiler import (
    CapacityError,
    Ids,
    RoleSet,
    SlotImage,
    assign_ids,
    binding_entry,
    compile_roleset,
    compile_slot,
    lpm_key,
    role_set,
)
from vpnr.policyd.convert import binding_to_proto, copy_policy, diff
from vpnr.policyd.kernel import KernelMapError, Mirror, PolicyMaps
from vpnr.policyd.model import (
    BindingMeta,
    IPNetwork,
    Policy,
    PolicyError,
)
from vpnr.policyd.store import PolicyStore
from vpnr.v1 import policy_pb2

log = logging.getLogger("vpnr.policyd.engine")

DIFF_LIST_LIMIT = 1000  # bindings listed per kind in a replace's reply; counts are exact


class NotFoundError(PolicyError):
    """The named object does not exist."""


class ConflictError(PolicyError):
    """The object exists already (or belongs to someone else)."""


class VersionMismatchError(Exception):
    """Compare-and-set failed: the policy is at another version than expected."""

    def __init__(self, expected: int, actual: int) -> None:
        self.expected, self.actual = expected, actual
        super().__init__(f"expected_version {expected} but the policy is at version {actual}")


class ResourceError(Exception):
    """The policy does not fit the kernel maps."""


@dataclass(frozen=True)
class Change:
    """The outcome of a successful change."""

    version: int
    diff: policy_pb2.PolicyDiff


class PolicyEngine:
    """Owns the desired policy of one router and keeps the kernel maps equal to it."""

    def __init__(self, maps: PolicyMaps, store: PolicyStore) -> None:
        self.maps = maps
        self.store = store
        self.policy = Policy()
        self.ids = Ids()
        self.version = 0
        self.updated_at = 0.0
        self.slot = 0
        self.live: SlotImage | None = None
        self.adopted = False
        self.lock = asyncio.Lock()
        # Told of every change that took effect: (action, change, reason), for the audit log.
        self.on_change: Callable[[str, Change, str], None] = lambda *_: None
        # Next ids for single-binding changes; ids freed meanwhile are reused only by the
        # next whole-policy compile (assign_ids), which keeps single changes O(1).
        self.next_binding_id = 1
        self.next_roleset_id = 1
        # Bindings with an expiry, so the once-a-second sweep does not walk all of them.
        self._expiring: set[IPNetwork] = set()
        self._expiring_of: dict[IPNetwork, BindingMeta] | None = None

    def _reset_id_counters(self) -> None:
        self.next_binding_id = max(self.ids.bindings.values(), default=0) + 1
        self.next_roleset_id = max(self.ids.rolesets.values(), default=0) + 1

    # -- start --------------------------------------------------------------------

    async def start(self) -> None:
        """Load the stored policy; adopt the kernel's slot when it holds this version,
        else compile it into the idle slot and flip."""
        self.policy, self.ids, self.version, self.updated_at = await self.store.load()
        self._reset_id_counters()
        slot, kernel_version = self.maps.active()
        self.slot = slot
        if kernel_version == self.version and self.version > 0:
            image = compile_slot(self.policy, self.ids, slot)
            self.live = image
            self.maps.mirrors[slot] = Mirror(
                src4=dict(image.src4), src6=dict(image.src6), zones4=dict(image.zones4),
                zones6=dict(image.zones6), buckets=dict(image.buckets))
            self.adopted = True
            # Learn what the idle slot holds (Status counts it, the next replace diffs it).
            await asyncio.to_thread(self.maps.learn_slot, 1 - slot)
            log.info("adopted kernel policy", extra={"version": self.version, "slot": slot})
            return
        log.info("installing stored policy", extra={"version": self.version,
                                                    "kernel_version": kernel_version})
        image = compile_slot(self.policy, self.ids, 1 - slot)
        await asyncio.to_thread(self._install, image, self.version)

    def _install(self, image: SlotImage, version: int) -> None:
        self.maps.write_slot(image)
        self.maps.flip(image.slot, version)
        self.slot, self.live = image.slot, image

    # -- whole-policy changes -------------------------------------------------------

    def _check_version(self, expected: int) -> None:
        if expected and expected != self.version:
            raise VersionMismatchError(expected, self.version)

    async def replace(self, new: Policy, expected_version: int = 0,
                      action: str = "policy.replace", reason: str = "") -> Change:
        """Make ``new`` (already validated) the policy, atomically for every packet."""
        async with self.lock:
            self._check_version(expected_version)
            change = await self._replace_locked(new)
        self.on_change(action, change, reason)
        return change

    async def mutate(self, edit: Callable[[Policy], None], expected_version: int = 0,
                     action: str = "policy.edit", reason: str = "") -> Change:
        """Apply ``edit`` to a copy of the policy, validate the result, replace."""
        async with self.lock:
            self._check_version(expected_version)
            new = copy_policy(self.policy)
            edit(new)
            new.validate()
            change = await self._replace_locked(new)
        self.on_change(action, change, reason)
        return change

    async def _replace_locked(self, new: Policy) -> Change:
        old, old_ids, old_version = self.policy, self.ids, self.version
        try:
            ids = assign_ids(new, old_ids)
            image = compile_slot(new, ids, 1 - self.slot)
        except CapacityError as exc:
            raise ResourceError(str(exc)) from exc
        version = old_version + 1
        self.updated_at = await self.store.save_full(new, ids, version)
        try:
            await asyncio.to_thread(self._install, image, version)
        except KernelMapError as exc:
            # The live slot was not touched: put the store back on the old policy.
            self.updated_at = await self.store.save_full(old, old_ids, version + 1)
            self.version = version + 1
            self.maps.set_active(self.slot, self.version)
            raise ResourceError(str(exc)) from exc
        self.policy, self.ids, self.version = new, ids, version
        self._reset_id_counters()
        self._clear_new_counters(old_ids, ids)
        return Change(version, diff(old, new, old_version, version, DIFF_LIST_LIMIT))

    def _clear_new_counters(self, old: Ids, new: Ids) -> None:
        """Ids handed to a new identity start from zero traffic."""
        old_bindings = {v: k for k, v in old.bindings.items()}
        self.maps.clear_traffic("binding_traffic", *(
            binding_id for net, binding_id in new.bindings.items()
            if old_bindings.get(binding_id) != net))
        old_sets = {v: k for k, v in old.rolesets.items()}
        self.maps.clear_traffic("roleset_traffic", *(
            roleset_id for roles, roleset_id in new.rolesets.items()
            if old_sets.get(roleset_id) != roles))

    # -- single bindings ----------------------------------------------------------

    async def put_binding(self, net: IPNetwork, roles: tuple[str, ...], meta: BindingMeta,
                          create: bool, expected_version: int = 0,
                          where: str = "binding") -> Change:
        """Create (``create``) or update one binding, in the live slot."""
        async with self.lock:
            self._check_version(expected_version)
            exists = net in self.policy.bindings
            if create and exists:
                raise ConflictError(f"{where}.prefix", f"binding {net} exists")
            if not create and not exists:
                raise NotFoundError(f"{where}.prefix", f"no binding {net}")
            self.policy.check_binding_roles(where, roles)
            change = await self._write_binding(net, roles, meta)
        self.on_change("binding.create" if create else "binding.update", change, str(net))
        return change

    async def delete_binding(self, net: IPNetwork, expected_version: int = 0,
                             where: str = "prefix", action: str = "binding.delete"
                             ) -> Change:
        """Remove one binding from the live slot."""
        async with self.lock:
            self._check_version(expected_version)
            if net not in self.policy.bindings:
                raise NotFoundError(where, f"no binding {net}")
            change = await self._write_binding(net, None, None)
        self.on_change(action, change, str(net))
        return change

    async def _write_binding(self, net: IPNetwork, roles: tuple[str, ...] | None,
                             meta: BindingMeta | None) -> Change:
        policy, ids = self.policy, self.ids
        old_version = self.version
        before = copy_single(policy, ids, net)
        new_sets: dict[RoleSet, int] = {}
        if roles is not None:
            assert meta is not None
            key = role_set(policy, ids, roles)
            if key not in ids.rolesets:
                new_sets[key] = self.next_roleset_id
            binding_id = ids.bindings.get(net) or self.next_binding_id
            if (new_sets.get(key, 0) >= layout.MAX_ROLESETS
                    or binding_id >= layout.MAX_BINDINGS):
                # An id space is exhausted by leftovers: a full rebuild compacts it.
                new = copy_policy(policy)
                new.bindings[net], new.binding_meta[net] = roles, meta
                return await self._replace_locked(new)
            ids.rolesets.update(new_sets)
            self._note_expiry(net, meta)
            fresh_binding = net not in ids.bindings
            ids.bindings[net] = binding_id
            self.next_roleset_id += len(new_sets)
            if fresh_binding:
                self.next_binding_id += 1
            policy.bindings[net], policy.binding_meta[net] = roles, meta
        else:
            del policy.bindings[net]
            policy.binding_meta.pop(net, None)
            ids.bindings.pop(net, None)
            fresh_binding = False
        version = old_version + 1
        try:
            self.updated_at = await self.store.save_binding(policy, ids, net, version, new_sets)
        except BaseException:
            restore_single(policy, ids, net, before)
            for key in new_sets:
                ids.rolesets.pop(key, None)
            raise
        try:
            # A handful of syscalls: on the loop, without a hop to a worker thread.
            self._apply_binding(net, roles, new_sets, fresh_binding, version)
        except (KernelMapError, CapacityError) as exc:
            restore_single(policy, ids, net, before)
            self.updated_at = await self.store.save_full(policy, ids, version + 1)
            self.version = version + 1
            # The kernel keeps the old content; its version follows the store's, so a
            # restart adopts it rather than rewriting it.
            self.maps.set_active(self.slot, self.version)
            raise ResourceError(str(exc)) from exc
        self.version = version
        after = copy_single(policy, ids, net)
        out = policy_pb2.PolicyDiff(from_version=old_version, to_version=version)
        out.bindings_added_count = int(before[0] is None and after[0] is not None)
        out.bindings_removed_count = int(after[0] is None and before[0] is not None)
        out.bindings_changed_count = int(None not in (before[0], after[0]))
        if before[0] is None and after[0] is not None:
            out.bindings_added.append(binding_to_proto(net, after[0], after[1] or BindingMeta()))
        elif after[0] is None and before[0] is not None:
            out.bindings_removed.append(binding_to_proto(net, before[0],
                                                         before[1] or BindingMeta()))
        elif after[0] is not None:
            out.bindings_changed.append(binding_to_proto(net, after[0],
                                                         after[1] or BindingMeta()))
        return Change(version, out)

    def _apply_binding(self, net: IPNetwork, roles: tuple[str, ...] | None,
                       new_sets: dict[RoleSet, int], fresh_binding: bool, version: int) -> None:
        """Kernel side of a single-binding change, in the live slot: new role sets first
        (unreferenced until the binding points at them), then the one LPM element."""
        slot, live = self.slot, self.live
        assert live is not None
        if roles is None:
            family, key = lpm_key(net, slot)
            self.maps.delete_binding(slot, family, key)
            (live.src4 if family == 4 else live.src6).pop(key, None)
        else:
            for roleset, roleset_id in new_sets.items():
                first = len(live.rules)
                buckets = compile_roleset(self.policy, self.ids, roleset_id, roleset, live)
                self.maps.write_rules(slot, first, live.rules[first:])
                self.maps.write_rolesets(slot, {roleset_id: live.rolesets[roleset_id]})
                self.maps.add_buckets(slot, buckets)
                self.maps.clear_traffic("roleset_traffic", roleset_id)
            family, key, value = binding_entry(self.ids, net, role_set(self.policy, self.ids,
                                                                       roles), slot)
            if fresh_binding:
                self.maps.clear_traffic("binding_traffic", self.ids.bindings[net])
            self.maps.put_binding(slot, family, key, value)
            (live.src4 if family == 4 else live.src6)[key] = value
        self.maps.set_active(slot, version)

    # -- expiry -------------------------------------------------------------------

    def expired(self, now: float | None = None) -> list[IPNetwork]:
        """Bindings whose expiry has passed (looks only at bindings that expire)."""
        now = time.time() if now is None else now
        meta = self.policy.binding_meta
        if self._expiring_of is not meta:  # a whole-policy change: find them again
            self._expiring = {n for n, m in meta.items() if m.expires_at is not None}
            self._expiring_of = meta
        found = []
        for net in list(self._expiring):
            entry = meta.get(net)
            if entry is None or entry.expires_at is None:
                self._expiring.discard(net)
            elif entry.expires_at <= now:
                found.append(net)
        return found

    def _note_expiry(self, net: IPNetwork, meta: BindingMeta | None) -> None:
        if meta is not None and meta.expires_at is not None:
            self._expiring.add(net)


Single = tuple[tuple[str, ...] | None, BindingMeta | None, int | None]


def copy_single(policy: Policy, ids: Ids, net: IPNetwork) -> Single:
    """A binding's roles, owner and kernel id (None when absent), for undo."""
    return policy.bindings.get(net), policy.binding_meta.get(net), ids.bindings.get(net)


def restore_single(policy: Policy, ids: Ids, net: IPNetwork, saved: Single) -> None:
    """Undo a single-binding change in memory."""
    roles, meta, binding_id = saved
    if roles is None:
        policy.bindings.pop(net, None)
        policy.binding_meta.pop(net, None)
        ids.bindings.pop(net, None)
    else:
        policy.bindings[net] = roles
        if meta is not None:
            policy.binding_meta[net] = meta
        if binding_id is not None:
            ids.bindings[net] = binding_id
