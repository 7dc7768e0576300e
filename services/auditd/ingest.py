"""From ring-buffer bytes to record rows: decoding, clock conversion and names.

The hot path of auditd: every event passes through :meth:`Decoder.decode`, so it unpacks
with one precompiled struct, keeps names in dictionaries, and allocates one tuple per event.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from vpnr.auditd import records as R
from vpnr.core.client import socket_target
from vpnr.policyd import layout
from vpnr.v1 import common_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger("vpnr.auditd.ingest")

# struct vpnr_audit_event with the role array as raw bytes (one slice, one dict lookup).
_EVENT = struct.Struct(f"=QQ16s16sIIIIIHHH{2 * layout.MAX_ROLES_PER_EVENT}sBBBBBBBBBBH2x")
assert _EVENT.size == layout.AUDIT_EVENT.size
_ROLE_ID = struct.Struct("=H")
NAME_REFRESH_INTERVAL = 1.0


def clock_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC (what bpf_ktime_get_ns counts), read so the two
    clocks are sampled as close together as possible."""
    best = None
    for _ in range(3):
        before = time.monotonic_ns()
        real = time.time_ns()
        after = time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, real - (before + after) // 2)
    assert best is not None
    return best[1]


class RoleNames:
    """Role id -> name, as policyd assigned them (ids are stable; a deleted role's id may
    be reused by a new role, so names are re-read whenever the policy version moves)."""

    def __init__(self, policyd_socket: Path) -> None:
        self.socket = policyd_socket
        self.names: dict[int, str] = {}
        self.version = -1
        self.generation = 0          # bumped when the mapping changes
        self.error = ""
        self._last_try = -NAME_REFRESH_INTERVAL

    async def refresh(self) -> None:
        """Fetch every role's id and name from policyd."""
        async with grpc.aio.insecure_channel(socket_target(self.socket)) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            status = await stub.Status(policy_pb2.PolicyStatusRequest(), timeout=5)
            names: dict[int, str] = {}
            token = ""
            for _ in range(10_000):
                page = await stub.ListRoles(policy_pb2.ListRolesRequest(
                    page=common_pb2.PageRequest(page_size=1000, page_token=token)), timeout=5)
                names.update((role.id, role.name) for role in page.roles)
                token = page.page.next_page_token
                if not token:
                    break
        if names != self.names:
            self.names = names
            self.generation += 1
        self.version = status.policy_version
        self.error = ""

    async def catch_up(self, seen_version: int = 0, timeout: float = 1.0) -> bool:
        """Refresh now if events carry a newer policy version than the names, else at most
        once a second; True when the mapping or the version moved (events are then worth
        decoding again)."""
        now = time.monotonic()
        if seen_version <= self.version and now - self._last_try < NAME_REFRESH_INTERVAL:
            return False
        self._last_try = now
        before = (self.generation, self.version)
        try:
            await asyncio.wait_for(self.refresh(), timeout)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "TIMEOUT"
            self.error = f"cannot read role names from policyd: {code}"
            log.warning("role names not refreshed", extra={"error": self.error})
            return False
        return (self.generation, self.version) != before


class Decoder:
    """Turns raw events into packet rows."""

    def __init__(self, roles: RoleNames, roleset_id: Callable[[tuple[str, ...]], int]) -> None:
        self.roles = roles
        self._roleset_id = roleset_id
        self._rolesets: dict[bytes, int] = {}
        self._generation = roles.generation
        self._interfaces: dict[int, str] = {}
        self.malformed = 0
        self.decoded = 0
        self.unresolved = False   # the last decode met an unknown role or a newer policy
        self.max_version = 0      # newest policy version in the last decode

    def role_name(self, role_id: int) -> str:
        """A role's name; ``role#N`` when policyd has not told us of it."""
        name = self.roles.names.get(role_id)
        if name is None:
            self.unresolved = True
            return f"role#{role_id}"
        return name

    def interface(self, ifindex: int) -> str:
        """The interface name in this network namespace (``if#N`` if it is gone)."""
        name = self._interfaces.get(ifindex)
        if name is None:
            try:
                name = socket.if_indextoname(ifindex)
            except OSError:
                name = f"if#{ifindex}"
            self._interfaces[ifindex] = name
        return name

    def _roleset(self, raw: bytes) -> int:
        names = tuple(self.role_name(_ROLE_ID.unpack_from(raw, i)[0])
                      for i in range(0, len(raw), 2))
        rid = self._roleset_id(names)
        if not any(n.startswith("role#") for n in names):
            self._rolesets[raw] = rid
        return rid

    def decode(self, events: list[bytes], next_id: int) -> list[R.Row]:
        """Rows for ``events`` with ids from ``next_id`` on; malformed events are counted
        and skipped."""
        if self.roles.generation != self._generation:
            self._generation = self.roles.generation
            self._rolesets.clear()
        offset = clock_offset_ns()
        self.unresolved = False
        version_seen = self.roles.version
        unpack = _EVENT.unpack_from
        size = _EVENT.size
        rolesets = self._rolesets
        interfaces = self._interfaces
        rows: list[R.Row] = []
        append = rows.append
        for raw in events:
            if len(raw) < size:
                self.malformed += 1
                continue
            (ktime, version, src, dst, ifindex, rule_id, _binding, _roleset, pkt_len, sport,
             dport, rule_role, role_bytes, role_count, ip_version, proto, verdict, reason,
             src_zone, dst_zone, source, _event_version, flags, icmp) = unpack(raw)
            if ip_version == 4:
                src, dst = src[:4], dst[:4]
            key = role_bytes[:2 * role_count]
            roleset = rolesets.get(key)
            if roleset is None:
                roleset = self._roleset(key) if key else 0
            if version > version_seen:
                self.unresolved = True
                version_seen = self.max_version = version
            iface = interfaces.get(ifindex) or self.interface(ifindex)
            append((next_id, ktime + offset, R.KIND_PACKET, verdict, reason, src, dst, sport, dport,
                    proto, roleset, rule_id, self.role_name(rule_role) if rule_id else None,
                    iface, src_zone, dst_zone, None, version, ktime, pkt_len, icmp, flags,
                    source))
            next_id += 1
        return rows
