"""Policy objects as plain data for the friendly verbs, in the policy file's words.

Each view is a dict rendered as a table, JSON or YAML by :mod:`vpnr.vpnctl.output`. Enum
values use the file's short names (``allow``, ``tcp``, ``vpn``) and port ranges its
``"N-M"`` syntax, so what ``vpnctl rule list -o yaml`` prints reads like the file that
``vpnctl policy export`` writes. Table rows show an empty match as ``any``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from vpnr.v1 import codes_pb2, policy_pb2
from vpnr.vpnctl.output import columns
from vpnr.vpnctl.policy_terms import enum_label, format_ports

MAX_LISTED = 10  # a diff line names this many items, then counts the rest


def timestamp_text(stamp: timestamp_pb2.Timestamp, is_set: bool) -> str:
    """RFC 3339, or ``""`` when the field is unset."""
    return stamp.ToJsonString() if is_set else ""


def rule_view(rule: policy_pb2.Rule) -> dict[str, Any]:
    """One rule with its owning role."""
    return {"id": rule.id, "role": rule.role, "priority": rule.priority,
            "action": enum_label(policy_pb2.Action, rule.action),
            "protocol": enum_label(codes_pb2.Protocol, rule.protocol),
            "src": rule.src_prefix, "dst": rule.dst_prefix,
            "ports": format_ports(rule.dst_port_from, rule.dst_port_to),
            "description": rule.description}


def rule_row(rule: policy_pb2.Rule) -> dict[str, Any]:
    """A rule as a table row: empty matches read ``any``."""
    view = rule_view(rule)
    for key in ("src", "dst", "ports"):
        view[key] = view[key] or "any"
    return view


def rule_summary(rule: policy_pb2.Rule) -> str:
    """``10 (eng): allow tcp any -> 10.2.0.0/24 port 22 "ssh"`` on one line."""
    ports = format_ports(rule.dst_port_from, rule.dst_port_to)
    text = (f"{rule.id} ({rule.role or '?'}): {enum_label(policy_pb2.Action, rule.action)} "
            f"{enum_label(codes_pb2.Protocol, rule.protocol)} {rule.src_prefix or 'any'} -> "
            f"{rule.dst_prefix or 'any'}")
    if ports:
        text += f" port {ports}"
    if rule.description:
        text += f" {rule.description!r}"
    return text


def role_view(role: policy_pb2.Role) -> dict[str, Any]:
    """A role and its rules."""
    return {"name": role.name, "id": role.id, "description": role.description,
            "rules": [rule_view(rule) for rule in role.rules]}


def role_row(role: policy_pb2.Role) -> dict[str, Any]:
    """A role as a table row: its rules counted."""
    return {"name": role.name, "id": role.id, "rules": len(role.rules),
            "description": role.description}


def binding_view(binding: policy_pb2.Binding) -> dict[str, Any]:
    """One binding."""
    return {"prefix": binding.prefix, "roles": list(binding.roles), "source": binding.source,
            "subject": binding.subject,
            "expires_at": timestamp_text(binding.expires_at, binding.HasField("expires_at"))}


def zone_view(zone: policy_pb2.ZoneAssignment) -> dict[str, Any]:
    """One zone assignment."""
    return {"prefix": zone.prefix, "zone": enum_label(codes_pb2.Zone, zone.zone),
            "description": zone.description}


def snapshot_view(snapshot: policy_pb2.Snapshot) -> dict[str, Any]:
    """One snapshot and what it holds."""
    return {"id": snapshot.id, "name": snapshot.name,
            "policy_version": snapshot.policy_version,
            "created_at": timestamp_text(snapshot.created_at,
                                         snapshot.HasField("created_at")),
            "roles": snapshot.roles, "rules": snapshot.rules, "bindings": snapshot.bindings,
            "zones": snapshot.zones}


def decision_view(decision: policy_pb2.Decision) -> dict[str, Any]:
    """What the live program decided for one crafted packet."""
    matched = decision.HasField("matched_rule")
    return {"verdict": enum_label(codes_pb2.Verdict, decision.verdict),
            "reason": enum_label(codes_pb2.Reason, decision.reason),
            "roles": list(decision.roles),
            "matched_rule": rule_view(decision.matched_rule) if matched else None,
            "src_zone": enum_label(codes_pb2.Zone, decision.src_zone),
            "dst_zone": enum_label(codes_pb2.Zone, decision.dst_zone),
            "program_id": decision.program_id, "duration_ns": decision.duration_ns,
            "explanation": decision.explanation}


def decision_table(decision: policy_pb2.Decision) -> dict[str, Any]:
    """The decision for the table format: the matched rule on one line."""
    view = decision_view(decision)
    view["matched_rule"] = rule_summary(decision.matched_rule) \
        if decision.HasField("matched_rule") else "none"
    view["roles"] = view["roles"] or "none"
    view["duration"] = f"{view.pop('duration_ns')} ns"
    return view


def diff_view(diff: policy_pb2.PolicyDiff) -> dict[str, Any]:
    """Everything a PolicyDiff says, bindings and zones as their views."""
    return {"from_version": diff.from_version, "to_version": diff.to_version,
            "roles_added": list(diff.roles_added),
            "roles_removed": list(diff.roles_removed),
            "roles_changed": list(diff.roles_changed),
            "bindings_added": [binding_view(b) for b in diff.bindings_added],
            "bindings_removed": [binding_view(b) for b in diff.bindings_removed],
            "bindings_changed": [binding_view(b) for b in diff.bindings_changed],
            "zones_added": [zone_view(z) for z in diff.zones_added],
            "zones_removed": [zone_view(z) for z in diff.zones_removed],
            "bindings_added_count": diff.bindings_added_count,
            "bindings_removed_count": diff.bindings_removed_count,
            "bindings_changed_count": diff.bindings_changed_count,
            "truncated": diff.truncated}


def _named(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _changes(label: str, kinds: Iterable[tuple[str, Sequence[str]]]) -> str | None:
    parts = [f"{len(items)} {kind} ({_named(items)})" for kind, items in kinds if items]
    return f"  {label + ':':<9} " + "; ".join(parts) if parts else None


def diff_lines(diff: policy_pb2.PolicyDiff) -> list[str]:
    """``policy version 4 -> 5`` then one line each for roles, bindings and zones."""
    bindings = {kind: [f"{b.prefix} ({', '.join(b.roles)})" for b in found]
                for kind, found in (("added", diff.bindings_added),
                                    ("removed", diff.bindings_removed),
                                    ("changed", diff.bindings_changed))}
    zones = {kind: [f"{z.prefix} {enum_label(codes_pb2.Zone, z.zone)}" for z in found]
             for kind, found in (("added", diff.zones_added),
                                 ("removed", diff.zones_removed))}
    lines = [_changes("roles", (("added", diff.roles_added),
                                ("removed", diff.roles_removed),
                                ("changed", diff.roles_changed))),
             _changes("bindings", bindings.items()), _changes("zones", zones.items())]
    changed = [line for line in lines if line]
    if diff.truncated:
        changed.append(f"  (binding lists shortened; in all {diff.bindings_added_count} added, "
                       f"{diff.bindings_removed_count} removed, "
                       f"{diff.bindings_changed_count} changed)")
    return [f"policy version {diff.from_version} -> {diff.to_version}",
            *(changed or ["  no changes"])]


def policy_summary(policy: policy_pb2.PolicyDocument) -> dict[str, Any]:
    """``vpnctl policy show``: version, roles with rule counts, bindings by source, zones."""
    by_source: dict[str, int] = {}
    for binding in policy.bindings:
        by_source[binding.source or "-"] = by_source.get(binding.source or "-", 0) + 1
    return {"version": policy.version,
            "updated_at": timestamp_text(policy.updated_at, policy.HasField("updated_at")),
            "roles": [role_row(role) for role in policy.roles],
            "rules": sum(len(role.rules) for role in policy.roles),
            "bindings": len(policy.bindings), "bindings_by_source": by_source,
            "zones": [zone_view(zone) for zone in policy.zones]}


def rows_text(rows: Sequence[dict[str, Any]], nothing: str) -> str:
    """Aligned columns, or ``nothing`` (e.g. ``(no roles)``) for an empty list."""
    return "\n".join(columns(rows)) if rows else nothing
