"""PolicyService over gRPC: a thin layer that validates requests and calls the engine.

Errors: INVALID_ARGUMENT, NOT_FOUND and ALREADY_EXISTS name the request field;
FAILED_PRECONDITION for a compare-and-set version mismatch; RESOURCE_EXHAUSTED when the
policy does not fit the kernel maps. A failed request changes nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc

from vpnr.core import paging
from vpnr.core.daemon import Context, abort, unix_timestamp
from vpnr.policyd import convert, testrun
from vpnr.policyd.engine import (
    Change,
    ConflictError,
    NotFoundError,
    ResourceError,
    VersionMismatchError,
)
from vpnr.policyd.model import (
    ROLE_NAME_RE,
    Policy,
    PolicyError,
    Rule,
)
from vpnr.policyd.store import SnapshotRow
from vpnr.v1 import codes_pb2, common_pb2, policy_pb2, policy_pb2_grpc

if TYPE_CHECKING:
    from vpnr.policyd.engine import PolicyEngine
    from vpnr.policyd.main import Policyd

SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
PROTOCOL_NUMBERS: dict[int, int] = {codes_pb2.PROTOCOL_TCP: 6, codes_pb2.PROTOCOL_UDP: 17,
                    codes_pb2.PROTOCOL_ICMP: 1, codes_pb2.PROTOCOL_ICMPV6: 58,
                    codes_pb2.PROTOCOL_ANY: testrun.OTHER_PROTOCOL}
T = TypeVar("T")


async def guarded(context: Context, call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call``; turn domain errors into gRPC status codes."""
    try:
        return await call()
    except NotFoundError as exc:
        await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
    except ConflictError as exc:
        await abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
    except PolicyError as exc:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except VersionMismatchError as exc:
        await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except ResourceError as exc:
        await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    raise AssertionError("unreachable")  # context.abort raises


def page_bounds(page: common_pb2.PageRequest, where: str = "page") -> tuple[int, int]:
    """(offset, size) from a PageRequest; the token is an opaque offset."""
    try:
        return paging.page_bounds(page, where)
    except paging.PageError as exc:
        raise PolicyError(exc.field, exc.problem) from None


def page_of(items: Sequence[T], page: common_pb2.PageRequest
            ) -> tuple[Sequence[T], common_pb2.PageResponse]:
    """One page of ``items`` and the response's paging fields."""
    try:
        return paging.page_of(items, page)
    except paging.PageError as exc:
        raise PolicyError(exc.field, exc.problem) from None


def _role_name(where: str, name: str) -> str:
    if not ROLE_NAME_RE.fullmatch(name):
        raise PolicyError(where, "expected a-z, 0-9 and _.:- (up to 63), starting alnum, "
                                 f"got {name!r}")
    return name


def _find_rule(policy: Policy, rule_id: int, where: str) -> tuple[str, int]:
    for name, rules in policy.roles.items():
        for i, rule in enumerate(rules):
            if rule.id == rule_id:
                return name, i
    raise NotFoundError(where, f"no rule with id {rule_id}")


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Thin gRPC layer over policyd's engine and data path."""

    def __init__(self, app: Policyd) -> None:
        self.app = app

    @property
    def engine(self) -> PolicyEngine:
        """The policy engine (exists once policyd has started)."""
        return self.app.engine

    async def _read(self, context: Context, call: Callable[[], Awaitable[T]]) -> T:
        """A read under the engine lock: it never sees half of a change in flight (the
        new binding under the old version)."""
        async def locked() -> T:
            async with self.engine.lock:
                return await call()
        return await guarded(context, locked)

    async def Status(self, request: policy_pb2.PolicyStatusRequest,
                     context: Context) -> policy_pb2.PolicyStatus:
        return await asyncio.to_thread(self.app.status)

    # -- roles ----------------------------------------------------------------------

    async def CreateRole(self, request: policy_pb2.CreateRoleRequest,
                         context: Context) -> policy_pb2.Role:
        role = request.role

        async def call() -> policy_pb2.Role:
            name = _role_name("role.name", role.name)

            def edit(policy: Policy) -> None:
                if name in policy.roles:
                    raise ConflictError("role.name", f"role {name!r} exists")
                policy.roles[name] = [convert.rule_from_proto(r, f"role.rules[{i}]", name)
                                      for i, r in enumerate(role.rules)]
                policy.role_descriptions[name] = role.description
                convert.assign_rule_ids(policy)

            await self.engine.mutate(edit, action="role.create")
            return convert.role_to_proto(self.engine.policy, self.engine.ids, name)
        return await guarded(context, call)

    async def GetRole(self, request: policy_pb2.GetRoleRequest,
                      context: Context) -> policy_pb2.Role:
        async def call() -> policy_pb2.Role:
            if request.name not in self.engine.policy.roles:
                raise NotFoundError("name", f"no role {request.name!r}")
            return convert.role_to_proto(self.engine.policy, self.engine.ids, request.name)
        return await self._read(context, call)

    async def ListRoles(self, request: policy_pb2.ListRolesRequest,
                        context: Context) -> policy_pb2.ListRolesResponse:
        async def call() -> policy_pb2.ListRolesResponse:
            names, page = page_of(sorted(self.engine.policy.roles), request.page)
            return policy_pb2.ListRolesResponse(
                roles=[convert.role_to_proto(self.engine.policy, self.engine.ids, n)
                       for n in names], page=page)
        return await self._read(context, call)

    async def UpdateRole(self, request: policy_pb2.UpdateRoleRequest,
                         context: Context) -> policy_pb2.Role:
        role = request.role

        async def call() -> policy_pb2.Role:
            name = role.name

            def edit(policy: Policy) -> None:
                if name not in policy.roles:
                    raise NotFoundError("role.name", f"no role {name!r}")
                policy.roles[name] = [convert.rule_from_proto(r, f"role.rules[{i}]", name)
                                      for i, r in enumerate(role.rules)]
                policy.role_descriptions[name] = role.description
                convert.assign_rule_ids(policy)

            await self.engine.mutate(edit, request.expected_version, action="role.update")
            return convert.role_to_proto(self.engine.policy, self.engine.ids, name)
        return await guarded(context, call)

    async def DeleteRole(self, request: policy_pb2.DeleteRoleRequest,
                         context: Context) -> policy_pb2.DeleteResponse:
        async def call() -> policy_pb2.DeleteResponse:
            name = request.name

            def edit(policy: Policy) -> None:
                if name not in policy.roles:
                    raise NotFoundError("name", f"no role {name!r}")
                users = [str(n) for n, roles in policy.bindings.items() if name in roles]
                if users:
                    raise PolicyError("name", f"role {name!r} is used by {len(users)} "
                                              f"binding(s), e.g. {users[0]}; remove it there "
                                              "first")
                del policy.roles[name]
                policy.role_descriptions.pop(name, None)

            change = await self.engine.mutate(edit, request.expected_version, action="role.delete")
            return policy_pb2.DeleteResponse(version=change.version)
        return await guarded(context, call)

    # -- rules ----------------------------------------------------------------------

    async def CreateRule(self, request: policy_pb2.CreateRuleRequest,
                         context: Context) -> policy_pb2.Rule:
        async def call() -> policy_pb2.Rule:
            holder: list[Rule] = []

            def edit(policy: Policy) -> None:
                rule = convert.rule_from_proto(request.rule, "rule") if request.rule.id else \
                    None
                if request.rule.role not in policy.roles:
                    raise PolicyError("rule.role", f"unknown role {request.rule.role!r}")
                if rule is None:
                    used = {r.id for rs in policy.roles.values() for r in rs}
                    msg = policy_pb2.Rule()
                    msg.CopyFrom(request.rule)
                    msg.id = max(used, default=0) + 1
                    rule = convert.rule_from_proto(msg, "rule")
                elif any(r.id == rule.id for rs in policy.roles.values() for r in rs):
                    raise ConflictError("rule.id", f"rule id {rule.id} exists")
                policy.roles[rule.role].append(rule)
                holder.append(rule)

            await self.engine.mutate(edit, action="rule.create")
            return convert.rule_to_proto(holder[0])
        return await guarded(context, call)

    async def GetRule(self, request: policy_pb2.GetRuleRequest,
                      context: Context) -> policy_pb2.Rule:
        async def call() -> policy_pb2.Rule:
            name, i = _find_rule(self.engine.policy, request.id, "id")
            return convert.rule_to_proto(self.engine.policy.roles[name][i])
        return await self._read(context, call)

    async def ListRules(self, request: policy_pb2.ListRulesRequest,
                        context: Context) -> policy_pb2.ListRulesResponse:
        async def call() -> policy_pb2.ListRulesResponse:
            policy = self.engine.policy
            if request.role and request.role not in policy.roles:
                raise NotFoundError("role", f"no role {request.role!r}")
            rules = sorted((r for name, rs in policy.roles.items()
                            if not request.role or name == request.role for r in rs),
                           key=lambda r: r.id)
            chunk, page = page_of(rules, request.page)
            return policy_pb2.ListRulesResponse(rules=[convert.rule_to_proto(r) for r in chunk],
                                                page=page)
        return await self._read(context, call)

    async def UpdateRule(self, request: policy_pb2.UpdateRuleRequest,
                         context: Context) -> policy_pb2.Rule:
        async def call() -> policy_pb2.Rule:
            holder: list[Rule] = []

            def edit(policy: Policy) -> None:
                name, i = _find_rule(policy, request.rule.id, "rule.id")
                role = request.rule.role or name
                if role not in policy.roles:
                    raise PolicyError("rule.role", f"unknown role {role!r}")
                rule = convert.rule_from_proto(request.rule, "rule", role)
                del policy.roles[name][i]
                if role == name:
                    policy.roles[name].insert(i, rule)
                else:
                    policy.roles[role].append(rule)
                holder.append(rule)

            await self.engine.mutate(edit, request.expected_version, action="rule.update")
            return convert.rule_to_proto(holder[0])
        return await guarded(context, call)

    async def DeleteRule(self, request: policy_pb2.DeleteRuleRequest,
                         context: Context) -> policy_pb2.DeleteResponse:
        async def call() -> policy_pb2.DeleteResponse:
            def edit(policy: Policy) -> None:
                name, i = _find_rule(policy, request.id, "id")
                del policy.roles[name][i]

            change = await self.engine.mutate(edit, request.expected_version, action="rule.delete")
            return policy_pb2.DeleteResponse(version=change.version)
        return await guarded(context, call)

    # -- bindings -------------------------------------------------------------------

    async def _put_binding(self, msg: policy_pb2.Binding, create: bool, expected: int,
                           context: Context) -> policy_pb2.Binding:
        async def call() -> policy_pb2.Binding:
            net = convert.required_prefix("binding.prefix", msg.prefix)
            meta = convert.binding_meta_from_proto(msg, "binding")
            await self.engine.put_binding(net, tuple(msg.roles), meta, create, expected)
            return convert.binding_to_proto(net, self.engine.policy.bindings[net], meta)
        return await guarded(context, call)

    async def CreateBinding(self, request: policy_pb2.CreateBindingRequest,
                            context: Context) -> policy_pb2.Binding:
        return await self._put_binding(request.binding, True, 0, context)

    async def UpdateBinding(self, request: policy_pb2.UpdateBindingRequest,
                            context: Context) -> policy_pb2.Binding:
        return await self._put_binding(request.binding, False, request.expected_version,
                                       context)

    async def GetBinding(self, request: policy_pb2.GetBindingRequest,
                         context: Context) -> policy_pb2.Binding:
        async def call() -> policy_pb2.Binding:
            net = convert.required_prefix("prefix", request.prefix)
            policy = self.engine.policy
            if net not in policy.bindings:
                raise NotFoundError("prefix", f"no binding {net}")
            return self.app.binding_with_traffic(net)
        return await self._read(context, call)

    async def ListBindings(self, request: policy_pb2.ListBindingsRequest,
                           context: Context) -> policy_pb2.ListBindingsResponse:
        async def call() -> policy_pb2.ListBindingsResponse:
            policy = self.engine.policy
            if request.role and request.role not in policy.roles:
                raise NotFoundError("role", f"no role {request.role!r}")
            nets = sorted((n for n, roles in policy.bindings.items()
                           if (not request.role or request.role in roles)
                           and (not request.source
                                or convert.meta_of(policy, n).source == request.source)),
                          key=convert.net_order)
            chunk, page = page_of(nets, request.page)
            return policy_pb2.ListBindingsResponse(
                bindings=[self.app.binding_with_traffic(n) for n in chunk], page=page)
        return await self._read(context, call)

    async def DeleteBinding(self, request: policy_pb2.DeleteBindingRequest,
                            context: Context) -> policy_pb2.DeleteResponse:
        async def call() -> policy_pb2.DeleteResponse:
            net = convert.required_prefix("prefix", request.prefix)
            change = await self.engine.delete_binding(net, request.expected_version)
            return policy_pb2.DeleteResponse(version=change.version)
        return await guarded(context, call)

    # -- zones ----------------------------------------------------------------------

    async def _put_zone(self, msg: policy_pb2.ZoneAssignment, create: bool, expected: int,
                        context: Context) -> policy_pb2.ZoneAssignment:
        async def call() -> policy_pb2.ZoneAssignment:
            net, zone, description = convert.zone_from_proto(msg, "zone")

            def edit(policy: Policy) -> None:
                if create and net in policy.zones:
                    raise ConflictError("zone.prefix", f"zone {net} exists")
                if not create and net not in policy.zones:
                    raise NotFoundError("zone.prefix", f"no zone {net}")
                policy.zones[net] = zone
                policy.zone_descriptions[net] = description

            await self.engine.mutate(edit, expected, action="zone.put")
            return convert.zone_to_proto(self.engine.policy, net)
        return await guarded(context, call)

    async def CreateZone(self, request: policy_pb2.CreateZoneRequest,
                         context: Context) -> policy_pb2.ZoneAssignment:
        return await self._put_zone(request.zone, True, 0, context)

    async def UpdateZone(self, request: policy_pb2.UpdateZoneRequest,
                         context: Context) -> policy_pb2.ZoneAssignment:
        return await self._put_zone(request.zone, False, request.expected_version, context)

    async def GetZone(self, request: policy_pb2.GetZoneRequest,
                      context: Context) -> policy_pb2.ZoneAssignment:
        async def call() -> policy_pb2.ZoneAssignment:
            net = convert.required_prefix("prefix", request.prefix)
            if net not in self.engine.policy.zones:
                raise NotFoundError("prefix", f"no zone {net}")
            return convert.zone_to_proto(self.engine.policy, net)
        return await self._read(context, call)

    async def ListZones(self, request: policy_pb2.ListZonesRequest,
                        context: Context) -> policy_pb2.ListZonesResponse:
        async def call() -> policy_pb2.ListZonesResponse:
            policy = self.engine.policy
            chunk, page = page_of(sorted(policy.zones, key=convert.net_order), request.page)
            return policy_pb2.ListZonesResponse(
                zones=[convert.zone_to_proto(policy, n) for n in chunk], page=page)
        return await self._read(context, call)

    async def DeleteZone(self, request: policy_pb2.DeleteZoneRequest,
                         context: Context) -> policy_pb2.DeleteResponse:
        async def call() -> policy_pb2.DeleteResponse:
            net = convert.required_prefix("prefix", request.prefix)

            def edit(policy: Policy) -> None:
                if net not in policy.zones:
                    raise NotFoundError("prefix", f"no zone {net}")
                del policy.zones[net]
                policy.zone_descriptions.pop(net, None)

            change = await self.engine.mutate(edit, request.expected_version, action="zone.delete")
            return policy_pb2.DeleteResponse(version=change.version)
        return await guarded(context, call)

    # -- whole policy ---------------------------------------------------------------

    async def GetPolicy(self, request: policy_pb2.GetPolicyRequest,
                        context: Context) -> policy_pb2.PolicyDocument:
        engine = self.engine
        async with engine.lock:
            return convert.document(engine.policy, engine.ids, engine.version,
                                    engine.updated_at)

    async def ReplacePolicy(self, request: policy_pb2.ReplacePolicyRequest,
                            context: Context) -> policy_pb2.ReplaceResponse:
        async def call() -> policy_pb2.ReplaceResponse:
            new = convert.policy_from_document(request.policy)
            change = await self.engine.replace(new, request.expected_version,
                                               "policy.replace", request.reason)
            return _replace_response(change)
        return await guarded(context, call)

    async def ReplaceBindings(self, request: policy_pb2.ReplaceBindingsRequest,
                              context: Context) -> policy_pb2.ReplaceResponse:
        async def call() -> policy_pb2.ReplaceResponse:
            source = request.source
            if not source:
                raise PolicyError("source", "name the owner whose bindings are replaced")
            wanted = {}
            for i, msg in enumerate(request.bindings):
                where = f"bindings[{i}]"
                net = convert.required_prefix(f"{where}.prefix", msg.prefix)
                if net in wanted:
                    raise PolicyError(f"{where}.prefix", f"binding {net} is listed twice")
                if msg.source and msg.source != source:
                    raise PolicyError(f"{where}.source",
                                      f"{msg.source!r} differs from the request's {source!r}")
                wanted[net] = (tuple(msg.roles),
                               convert.binding_meta_from_proto(msg, where, source))

            def edit(policy: Policy) -> None:
                for i, net in enumerate(wanted):
                    owner = convert.meta_of(policy, net).source
                    if net in policy.bindings and owner != source:
                        raise ConflictError(f"bindings[{i}].prefix",
                                            f"{net} is bound by source {owner!r}")
                for net in [n for n in policy.bindings
                            if convert.meta_of(policy, n).source == source]:
                    del policy.bindings[net]
                    policy.binding_meta.pop(net, None)
                for net, (roles, meta) in wanted.items():
                    policy.bindings[net] = roles
                    policy.binding_meta[net] = meta
                _name_binding_errors(policy, list(wanted))

            change = await self.engine.mutate(edit, request.expected_version,
                                              f"policy.replace_bindings:{source}",
                                              request.reason)
            return _replace_response(change)
        return await guarded(context, call)

    # -- snapshots ------------------------------------------------------------------

    async def CreateSnapshot(self, request: policy_pb2.CreateSnapshotRequest,
                             context: Context) -> policy_pb2.Snapshot:
        async def call() -> policy_pb2.Snapshot:
            if not SNAPSHOT_NAME_RE.fullmatch(request.name):
                raise PolicyError("name", "expected 1-64 of A-Z a-z 0-9 _.:- starting alnum, "
                                          f"got {request.name!r}")
            store = self.engine.store
            if await store.snapshot_exists(request.name):
                raise ConflictError("name", f"snapshot {request.name!r} exists")
            engine = self.engine
            async with engine.lock:  # never half of a change in flight
                doc = convert.document(engine.policy, engine.ids, engine.version,
                                       engine.updated_at)
            counts = (len(doc.roles), sum(len(r.rules) for r in doc.roles), len(doc.bindings),
                      len(doc.zones))
            row = await store.create_snapshot(request.name, doc.version, counts,
                                              doc.SerializeToString())
            return _snapshot(row)
        return await guarded(context, call)

    async def ListSnapshots(self, request: policy_pb2.ListSnapshotsRequest,
                            context: Context) -> policy_pb2.ListSnapshotsResponse:
        async def call() -> policy_pb2.ListSnapshotsResponse:
            offset, size = page_bounds(request.page)
            store = self.engine.store
            rows = await store.list_snapshots(0, offset + size + 1)
            chunk = rows[offset:offset + size]
            total = await store.count_snapshots()
            return policy_pb2.ListSnapshotsResponse(
                snapshots=[_snapshot(r) for r in chunk],
                page=paging.page_response(offset, size, total))
        return await guarded(context, call)

    async def _snapshot_policy(self, snapshot_id: int, where: str) -> tuple[Policy, int]:
        if snapshot_id == 0:
            return self.engine.policy, self.engine.version
        raw = await self.engine.store.snapshot_document(snapshot_id)
        if raw is None:
            raise NotFoundError(where, f"no snapshot {snapshot_id}")
        doc = policy_pb2.PolicyDocument.FromString(raw)
        return convert.policy_from_document(doc, f"snapshot[{snapshot_id}]"), doc.version

    async def DiffSnapshots(self, request: policy_pb2.DiffSnapshotsRequest,
                            context: Context) -> policy_pb2.PolicyDiff:
        async def call() -> policy_pb2.PolicyDiff:
            old, old_version = await self._snapshot_policy(request.from_snapshot,
                                                           "from_snapshot")
            new, new_version = await self._snapshot_policy(request.to_snapshot, "to_snapshot")
            return convert.diff(old, new, old_version, new_version)
        return await self._read(context, call)  # 0 is the live policy

    async def RestoreSnapshot(self, request: policy_pb2.RestoreSnapshotRequest,
                              context: Context) -> policy_pb2.ReplaceResponse:
        async def call() -> policy_pb2.ReplaceResponse:
            if request.id == 0:
                raise PolicyError("id", "name a snapshot id")
            policy, _ = await self._snapshot_policy(request.id, "id")
            change = await self.engine.replace(policy, request.expected_version,
                                               f"policy.restore_snapshot:{request.id}")
            return _replace_response(change)
        return await guarded(context, call)

    async def DeleteSnapshot(self, request: policy_pb2.DeleteSnapshotRequest,
                             context: Context) -> policy_pb2.DeleteResponse:
        async def call() -> policy_pb2.DeleteResponse:
            if not await self.engine.store.delete_snapshot(request.id):
                raise NotFoundError("id", f"no snapshot {request.id}")
            return policy_pb2.DeleteResponse(version=self.engine.version)
        return await guarded(context, call)

    # -- test / explain -------------------------------------------------------------

    async def TestDecision(self, request: policy_pb2.TestDecisionRequest,
                           context: Context) -> policy_pb2.Decision:
        async def call() -> policy_pb2.Decision:
            return await asyncio.to_thread(self.app.test_decision, request)
        return await guarded(context, call)


def _name_binding_errors(policy: Policy, order: list[ipaddress.IPv4Network |
                                                   ipaddress.IPv6Network]) -> None:
    """Validate bindings naming their index in the request rather than their prefix."""
    for i, net in enumerate(order):
        policy.check_binding_roles(f"bindings[{i}]", policy.bindings[net])


def _replace_response(change: Change) -> policy_pb2.ReplaceResponse:
    return policy_pb2.ReplaceResponse(version=change.version, diff=change.diff)


def _snapshot(row: SnapshotRow) -> policy_pb2.Snapshot:
    msg = policy_pb2.Snapshot(id=row.id, name=row.name, policy_version=row.policy_version,
                              roles=row.roles, rules=row.rules, bindings=row.bindings,
                              zones=row.zones)
    stamp = unix_timestamp(row.created_at)
    if stamp is not None:
        msg.created_at.CopyFrom(stamp)
    return msg


def protocol_number(protocol: int) -> int:
    """IANA number of a Protocol enum value for a crafted packet."""
    return PROTOCOL_NUMBERS[protocol]
