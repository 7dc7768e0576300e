"""Record filters: validated from the API once, then applied as SQL (stored records) or in
Python (records streamed to Follow as they are committed). Both forms mean the same."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from vpnr.auditd import records as R
from vpnr.v1 import audit_pb2, codes_pb2

MAX_PAGE = 5000
DEFAULT_PAGE = 100  # page_size 0 (proto/vpnr/v1/common.proto: 0 -> server default)


class FilterError(ValueError):
    """A filter or page field is invalid; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class AddressRange:
    """A CIDR prefix as the byte range of stored addresses it covers."""

    low: bytes
    high: bytes

    def contains(self, address: bytes | None) -> bool:
        """True when a stored address lies in the prefix."""
        return (address is not None and len(address) == len(self.low)
                and self.low <= address <= self.high)


@dataclass(frozen=True)
class Filter:
    """What a Query, Follow, Export or Stats call asked for."""

    time_from: int | None = None   # ns, inclusive
    time_to: int | None = None     # ns, exclusive
    verdicts: frozenset[int] = frozenset()
    role: str = ""
    src: AddressRange | None = None
    dst: AddressRange | None = None
    rule_id: int = 0
    peer: str = ""
    kind: int = 0                   # 0 any, KIND_PACKET or KIND_CONTROL

    @property
    def packet_only(self) -> bool:
        """True when a packet field is filtered on (control records cannot match)."""
        return bool(self.verdicts or self.role or self.src or self.dst or self.rule_id
                    or self.peer)

    def sql(self, rolesets_with: Callable[[str], list[int]]) -> tuple[str, list[object]]:
        """``" AND ..."`` conditions and their parameters."""
        where: list[str] = []
        params: list[object] = []
        if self.time_from is not None:
            where.append("time_ns >= ?")
            params.append(self.time_from)
        if self.time_to is not None:
            where.append("time_ns < ?")
            params.append(self.time_to)
        kind = R.KIND_PACKET if self.packet_only else self.kind
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if self.verdicts:
            where.append(f"verdict IN ({', '.join('?' * len(self.verdicts))})")
            params.extend(sorted(self.verdicts))
        if self.role:
            ids = rolesets_with(self.role)
            where.append(f"roleset IN ({', '.join('?' * len(ids))})" if ids else "0")
            params.extend(ids)
        for column, span in (("src", self.src), ("dst", self.dst)):
            if span is not None:
                where.append(f"{column} BETWEEN ? AND ? AND length({column}) = ?")
                params.extend((span.low, span.high, len(span.low)))
        if self.rule_id:
            where.append("rule_id = ?")
            params.append(self.rule_id)
        if self.peer:
            where.append("peer = ?")
            params.append(self.peer)
        return "".join(f" AND {w}" for w in where), params

    def matcher(self, rolesets_with: Callable[[str], list[int]]) -> Callable[[R.Row], bool]:
        """A predicate over committed rows, equivalent to :meth:`sql`."""
        kind = R.KIND_PACKET if self.packet_only else self.kind
        roles = set(rolesets_with(self.role)) if self.role else None

        def matches(row: R.Row) -> bool:
            if kind and row[R.KIND] != kind:
                return False
            time_ns = row[R.TIME_NS]
            if self.time_from is not None and time_ns < self.time_from:
                return False
            if self.time_to is not None and time_ns >= self.time_to:
                return False
            if self.verdicts and row[R.VERDICT] not in self.verdicts:
                return False
            if roles is not None and row[R.ROLESET] not in roles:
                return False
            if self.src is not None and not self.src.contains(row[R.SRC]):
                return False
            if self.dst is not None and not self.dst.contains(row[R.DST]):
                return False
            if self.rule_id and row[R.RULE_ID] != self.rule_id:
                return False
            return not (self.peer and row[R.PEER] != self.peer)
        return matches


def _prefix(field: str, text: str) -> AddressRange | None:
    if not text:
        return None
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise FilterError(field, f"not an IP prefix: {text!r} (expected e.g. 10.1.0.0/24 "
                                 "or 2001:db8::/32)") from None
    return AddressRange(net.network_address.packed, net.broadcast_address.packed)


def time_range(field: str, has_start: bool, start_ns: int, has_end: bool, end_ns: int
               ) -> tuple[int | None, int | None]:
    """Validate a TimeRange already converted to ns."""
    low = start_ns if has_start else None
    high = end_ns if has_end else None
    if low is not None and high is not None and low >= high:
        raise FilterError(field, "start must be before end (the range is inverted or empty)")
    return low, high


def from_proto(msg: audit_pb2.AuditFilter, field: str = "filter") -> Filter:
    """Validate an AuditFilter; raises :class:`FilterError` naming the bad field."""
    low, high = time_range(f"{field}.time", msg.time.HasField("start"),
                           msg.time.start.ToNanoseconds(), msg.time.HasField("end"),
                           msg.time.end.ToNanoseconds())
    for i, verdict in enumerate(msg.verdicts):
        if verdict not in codes_pb2.Verdict.values() or verdict == codes_pb2.VERDICT_UNSPECIFIED:
            raise FilterError(f"{field}.verdicts[{i}]", f"unknown verdict {verdict}")
    if msg.control_only and msg.packets_only:
        raise FilterError(f"{field}.control_only", "control_only and packets_only exclude "
                                                   "each other")
    flt = Filter(time_from=low, time_to=high, verdicts=frozenset(msg.verdicts),
                 role=msg.role, src=_prefix(f"{field}.src_prefix", msg.src_prefix),
                 dst=_prefix(f"{field}.dst_prefix", msg.dst_prefix), rule_id=msg.rule_id,
                 peer=msg.peer,
                 kind=R.KIND_CONTROL if msg.control_only else
                 R.KIND_PACKET if msg.packets_only else 0)
    if msg.control_only and flt.packet_only:
        raise FilterError(f"{field}.control_only", "control records have no verdict, role, "
                                                   "address, rule or peer to filter on")
    return flt


def page_size(size: int, field: str = "page.page_size") -> int:
    """Validate a page size: 0 means DEFAULT_PAGE, otherwise 1 to MAX_PAGE."""
    if size == 0:
        return DEFAULT_PAGE
    if not 1 <= size <= MAX_PAGE:
        raise FilterError(field, f"must be between 1 and {MAX_PAGE} (0: the default of "
                                 f"{DEFAULT_PAGE}), got {size}")
    return size


def page_token(token: str, field: str = "page.page_token") -> int:
    """The id a page token resumes before (tokens are record ids)."""
    if not token:
        return 1 << 62
    if not token.isdigit() or len(token) > 19:
        raise FilterError(field, f"not a token this server issued: {token!r}")
    return int(token)
