"""Audit records and statistics as text for the ``vpnctl audit`` verbs.

Records print one per line in the table format, with the same fixed-width columns whether
they come from a query or arrive on ``--follow`` (where nothing can be aligned after the
fact); JSON and YAML show the proto3 JSON mapping, exactly what ``vpnctl call
AuditService/Query`` prints for the same records.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from vpnr.v1 import audit_pb2, codes_pb2
from vpnr.vpnctl.audit_request import TimeWindow
from vpnr.vpnctl.output import render, render_stream_item, table_lines
from vpnr.vpnctl.policy_terms import ICMP_PROTOCOLS, REASONS, VERDICTS, enum_label
from vpnr.vpnctl.reflection import to_dict

CONTROL = "CONTROL"
NO_ICMP_TYPE = 0xFFFF  # PacketDecision.icmp_type of a packet that is not ICMP
# Minimum column widths: a wider value pushes the rest of its line, never truncates.
TIME_WIDTH = len("2026-11-21T10:00:00.000Z")
VERDICT_WIDTH = max(len(CONTROL), *(len(name) for name in VERDICTS))
REASON_WIDTH = max(len(name) for name in REASONS)
FLOW_WIDTH = len("255.255.255.255:65535 -> 255.255.255.255:65535")
PROTOCOL_WIDTH = len("icmpv6")
ROLES_WIDTH = 12
RULE_WIDTH = len("rule 1000")
NO_RECORDS = "(no records)"


def record_time(record: audit_pb2.AuditRecord) -> str:
    """``2026-11-21T10:00:00.123Z``: UTC, millisecond precision; ``-`` when unset."""
    if not record.HasField("time"):
        return "-"
    moment = datetime.fromtimestamp(record.time.seconds, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{record.time.nanos // 1_000_000:03d}Z"


def endpoint(address: str, port: int) -> str:
    """``10.1.0.10:51000``, ``[fd00:1::5]:443``; the bare address when there is no port."""
    host = address or "?"
    if not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def protocol_text(packet: audit_pb2.PacketDecision) -> str:
    """``tcp``, ``icmp type 8``, ``proto 47``; ``frag`` added for a non-first fragment."""
    name = enum_label(codes_pb2.Protocol, packet.ip_protocol)
    text = f"proto {packet.ip_protocol}" if name.isdigit() else name
    if packet.ip_protocol in ICMP_PROTOCOLS and packet.icmp_type != NO_ICMP_TYPE:
        text += f" type {packet.icmp_type}"
    return text + " frag" if packet.fragment else text


def _line(*cells: tuple[str, int]) -> str:
    return "  ".join(text.ljust(width) for text, width in cells).rstrip()


def packet_line(when: str, packet: audit_pb2.PacketDecision) -> str:
    """time, verdict, reason, ``src:port -> dst:port``, protocol, roles, rule, interface."""
    rule = f"rule {packet.rule_id}" if packet.rule_id else "-"
    if packet.rule_id and packet.rule_role:
        rule += f" ({packet.rule_role})"
    where = packet.interface or "-"
    if packet.peer:
        where += f" peer {packet.peer}"
    flow = f"{endpoint(packet.src, packet.src_port)} -> {endpoint(packet.dst, packet.dst_port)}"
    return _line((when, TIME_WIDTH),
                 (enum_label(codes_pb2.Verdict, packet.verdict).upper(), VERDICT_WIDTH),
                 (enum_label(codes_pb2.Reason, packet.reason), REASON_WIDTH),
                 (flow, FLOW_WIDTH), (protocol_text(packet), PROTOCOL_WIDTH),
                 (",".join(packet.roles) or "-", ROLES_WIDTH), (rule, RULE_WIDTH), (where, 0))


def control_line(when: str, event: audit_pb2.ControlEvent) -> str:
    """time, ``CONTROL``, daemon, action, actor, ``v4 -> v5``, and why it failed if it did."""
    versions = (f"v{event.version_before} -> v{event.version_after}"
                if event.version_before or event.version_after else "-")
    line = _line((when, TIME_WIDTH), (CONTROL, VERDICT_WIDTH), (event.daemon or "-", 0),
                 (event.action or "-", 0), (event.actor or "-", 0), (versions, 0))
    if not event.success:
        line += "  FAILED" + (f": {event.error}" if event.error else "")
    return line


def record_line(record: audit_pb2.AuditRecord) -> str:
    """One record as one table line."""
    when = record_time(record)
    kind = record.WhichOneof("event")
    if kind == "packet":
        return packet_line(when, record.packet)
    if kind == "control":
        return control_line(when, record.control)
    return _line((when, TIME_WIDTH), ("?", VERDICT_WIDTH), (f"record {record.id}", 0))


def records_text(records: list[audit_pb2.AuditRecord], fmt: str) -> str:
    """A query's records as one document: table lines, or a JSON/YAML list."""
    if fmt == "table":
        return "\n".join(record_line(record) for record in records) or NO_RECORDS
    return render([to_dict(record) for record in records], fmt)


def streamed_record_text(record: audit_pb2.AuditRecord, fmt: str, first: bool) -> str:
    """One record of ``--follow``: a table line, one JSON object on one line (JSON Lines),
    or a YAML document."""
    if fmt == "table":
        return record_line(record)
    if fmt == "json":
        return json.dumps(to_dict(record), ensure_ascii=False)
    return render_stream_item(to_dict(record), fmt, first)


def _top(entries: Any, label: str) -> list[dict[str, Any]] | str:
    return [{label: entry.key, "count": entry.count} for entry in entries] or "none"


def stats_view(stats: audit_pb2.AuditStats, window: TimeWindow) -> dict[str, Any]:
    """The statistics for the table format, in the order an operator reads them."""
    lost = {cause: stats.lost_by_cause[cause] for cause in sorted(stats.lost_by_cause)}
    return {"window": window.text(), "events/s": stats.events_per_second,
            "allowed": stats.allowed, "denied": stats.denied,
            "top sources": _top(stats.top_sources, "source"),
            "top destinations": _top(stats.top_destinations, "destination"),
            "top roles": _top(stats.top_roles, "role"),
            "top rules": _top(stats.top_rules, "rule"),
            "lost by cause": lost or "none"}


def stats_text(stats: audit_pb2.AuditStats, window: TimeWindow, fmt: str) -> str:
    """``audit stats`` output: the table view, or the message as JSON/YAML."""
    if fmt == "table":
        return "\n".join(table_lines(stats_view(stats, window)))
    return render(to_dict(stats), fmt)
