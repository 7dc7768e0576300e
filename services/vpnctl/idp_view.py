"""idpd's answers as text for the ``vpnctl idp`` verbs.

The table format is what an operator reads (times with how long ago, outcomes in words);
JSON and YAML show the proto3 JSON mapping with every field, defaults included, so that a
script sees ``"stale": false`` rather than a missing key. None of idpd's messages carries a
token or a secret (IdpConfig only says whether a client secret is set), and nothing here
adds one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from vpnr.v1 import idp_pb2
from vpnr.vpnctl.output import columns, human_duration, render, scalar, table_lines
from vpnr.vpnctl.policy_terms import enum_label
from vpnr.vpnctl.reflection import to_dict

NO_LOGINS = "(no logins)"
NO_BINDINGS = "(no bindings)"
# The parts TestConnection checks, with the word an error about each one contains.
CONNECTION_PARTS = (("discovery", "discovery_ok", "discovery"), ("jwks", "jwks_ok", "jwks"),
                    ("token", "token_ok", "token"), ("scim", "scim_ok", "scim"))


def document(message: Message, fmt: str) -> str:
    """A message as a JSON/YAML document, every field shown."""
    return render(to_dict(message, emit_defaults=True), fmt)


def utc_text(moment: datetime) -> str:
    """``2026-11-21T10:00:00Z``."""
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z"


def moment_text(stamp: Timestamp | None, now: datetime) -> str:
    """``2026-11-21T10:00:00Z (5m07s ago)`` / ``(in 4m53s)``; ``-`` when unset."""
    if stamp is None or (stamp.seconds == 0 and stamp.nanos == 0):
        return "-"
    moment = stamp.ToDatetime(tzinfo=UTC)
    delta = (moment - now).total_seconds()
    if abs(delta) < 1:
        return f"{utc_text(moment)} (now)"
    when = f"in {human_duration(delta)}" if delta > 0 else f"{human_duration(-delta)} ago"
    return f"{utc_text(moment)} ({when})"


def _stamp(message: Message, field: str) -> Timestamp | None:
    if not message.HasField(field):
        return None
    value: Timestamp = getattr(message, field)
    return value


def outcome_label(outcome: int) -> str:
    """``applied``, ``unchanged``, ``held``, ``failed`` (``unspecified`` for 0)."""
    return enum_label(idp_pb2.SyncOutcome, outcome)


def state_label(state: int) -> str:
    """``pending``, ``active``, ``expired``, ``denied``, ``revoked``, ``failed``."""
    return enum_label(idp_pb2.LoginState, state)


def flow_label(flow: int) -> str:
    """``device`` or ``code_pkce``."""
    return enum_label(idp_pb2.LoginFlow, flow)


# ------------------------------------------------------------------------------- sync

def counts_text(result: idp_pb2.SyncResult) -> str:
    """``added 2, removed 1, changed 0, total 40``."""
    return (f"added {result.added}, removed {result.removed}, changed {result.changed}, "
            f"total {result.total}")


def sync_result_view(result: idp_pb2.SyncResult, now: datetime) -> dict[str, Any]:
    """One SyncResult for the table format (the fields that are set)."""
    view: dict[str, Any] = {"outcome": outcome_label(result.outcome)}
    if result.sync_id:
        view["sync id"] = result.sync_id
    view.update({"added": result.added, "removed": result.removed,
                 "changed": result.changed, "total": result.total})
    if result.policy_version:
        view["policy version"] = result.policy_version
    if result.HasField("started_at"):
        view["started"] = moment_text(result.started_at, now)
    if result.duration_seconds:
        view["duration"] = f"{result.duration_seconds:.3f}s"
    if result.error:
        view["error"] = result.error
    if result.warnings:
        view["warnings"] = list(result.warnings)
    return view


def confirm_command(held_sync_id: str) -> str:
    """How to release a held sync."""
    return f"vpnctl idp sync --confirm {held_sync_id}"


def sync_lines(result: idp_pb2.SyncResult) -> list[str]:
    """``idp sync`` in the table format: the outcome and counts on one line, then the
    warnings, the error, or for a held sync how to confirm it."""
    outcome = outcome_label(result.outcome)
    name = f"sync {result.sync_id}" if result.sync_id else "sync"
    if result.outcome == idp_pb2.SYNC_OUTCOME_HELD:
        lines = [f"{name} held by the mass-deletion guard: {counts_text(result)}",
                 f"held sync id: {result.sync_id or '-'}",
                 f"to apply it: {confirm_command(result.sync_id or 'ID')}"]
    else:
        line = f"{name}: {outcome} ({counts_text(result)})"
        if result.policy_version:
            line += f", policy version {result.policy_version}"
        if result.duration_seconds:
            line += f", {result.duration_seconds:.3f}s"
        lines = [line]
        if result.error:
            lines.append(f"error: {result.error}")
    lines.extend(f"warning: {warning}" for warning in result.warnings)
    return lines


# ----------------------------------------------------------------------------- status

def status_view(status: idp_pb2.IdpStatus, now: datetime) -> dict[str, Any]:
    """IdpStatus for the table format, in the order an operator reads it."""
    if status.discovery_ok:
        discovery = "ok"
        fetched = _stamp(status, "discovery_fetched_at")
        if fetched is not None:
            discovery += f" (fetched {moment_text(fetched, now)})"
    else:
        discovery = "error: " + (status.discovery_error or "not fetched")
    view: dict[str, Any] = {
        "issuer": status.issuer or "-",
        "discovery": discovery,
        "last sync": moment_text(_stamp(status, "last_sync"), now),
        "last good sync": moment_text(_stamp(status, "last_good_sync"), now),
        "staleness": human_duration(status.staleness_seconds),
        "stale": ("yes: the last sync failed, the last good set is in force"
                  if status.stale else "no"),
        "consecutive failures": status.consecutive_failures,
        "next sync": moment_text(_stamp(status, "next_sync"), now),
        "bindings": status.bindings,
        "active logins": status.active_logins,
        "directory entries": status.directory_entries,
        "tokens rejected": status.tokens_rejected,
        "policy version": status.policy_version,
    }
    if status.held_sync_id:
        held: dict[str, Any] = {"id": status.held_sync_id}
        if status.HasField("held"):
            held.update({"added": status.held.added, "removed": status.held.removed,
                         "changed": status.held.changed, "total": status.held.total})
        held["confirm with"] = confirm_command(status.held_sync_id)
        view["held sync"] = held
    else:
        view["held sync"] = "none"
    if status.HasField("last_result"):
        view["last result"] = sync_result_view(status.last_result, now)
    else:
        view["last result"] = "none yet"
    view["warnings"] = [f"{w.code}: {w.message}" if w.code else w.message
                        for w in status.warnings] or "none"
    return view


def status_text(status: idp_pb2.IdpStatus, now: datetime, fmt: str) -> str:
    """``idp status`` output."""
    if fmt == "table":
        return "\n".join(table_lines(status_view(status, now)))
    return document(status, fmt)


# ----------------------------------------------------------------------------- config

def config_view(config: idp_pb2.IdpConfig) -> dict[str, Any]:
    """IdpConfig for the table format; the secret itself is never sent, only whether set."""
    interval = config.sync_interval_seconds
    return {
        "issuer": config.issuer or "-",
        "client id": config.client_id or "-",
        "client secret": "set" if config.client_secret_set else "not set",
        "scopes": list(config.scopes) or "-",
        "scim base url": config.scim_base_url or "-",
        "sync interval": f"{human_duration(interval)} ({interval}s)" if interval else "-",
        "max delete share": f"{config.max_delete_share * 100:g}%",
        "allowed algorithms": list(config.allowed_algorithms) or "-",
        "claim mappings": list(config.claim_mappings) or "none",
    }


def config_text(config: idp_pb2.IdpConfig, fmt: str) -> str:
    """``idp config`` output."""
    if fmt == "table":
        return "\n".join(table_lines(config_view(config)))
    return document(config, fmt)


# -------------------------------------------------------------------- test-connection

def part_states(reply: idp_pb2.TestConnectionResponse) -> dict[str, str]:
    """Each part: ``ok``, ``FAILED`` (an error names it) or ``-`` (not configured or not
    tried)."""
    states: dict[str, str] = {}
    for part, flag, word in CONNECTION_PARTS:
        if getattr(reply, flag):
            states[part] = "ok"
        elif any(word in error.lower() for error in reply.errors):
            states[part] = "FAILED"
        else:
            states[part] = "-"
    return states


def connection_failed(reply: idp_pb2.TestConnectionResponse) -> bool:
    """The test failed: idpd reported an error, or discovery (always needed) is not ok."""
    return bool(reply.errors) or not reply.discovery_ok


def connection_text(reply: idp_pb2.TestConnectionResponse, fmt: str) -> str:
    """``idp test-connection`` output."""
    if fmt != "table":
        return document(reply, fmt)
    view: dict[str, Any] = dict(part_states(reply))
    view["latency"] = f"{reply.latency_seconds:.3f}s"
    view["errors"] = list(reply.errors) or "none"
    return "\n".join(table_lines(view))


# ----------------------------------------------------------------------------- logins

def login_view(login: idp_pb2.Login, now: datetime) -> dict[str, Any]:
    """One login in detail (``idp login``)."""
    view: dict[str, Any] = {
        "login": login.login_id or "-", "state": state_label(login.state),
        "username": login.username or "-", "subject": login.subject or "-",
        "address": login.address or "-", "roles": list(login.roles) or "none",
        "groups": list(login.groups) or "none",
        "flow": flow_label(login.flow) if login.flow else "-",
        "expires": moment_text(_stamp(login, "expires_at"), now),
    }
    if login.error:
        view["error"] = login.error
    return view


def login_text(login: idp_pb2.Login, now: datetime, fmt: str) -> str:
    """A login in detail, or as a JSON/YAML document."""
    if fmt == "table":
        return "\n".join(table_lines(login_view(login, now)))
    return document(login, fmt)


def _expiry_cell(login: idp_pb2.Login) -> str:
    stamp = _stamp(login, "expires_at")
    return utc_text(stamp.ToDatetime(tzinfo=UTC)) if stamp is not None else "-"


def logins_text(logins: Sequence[idp_pb2.Login], fmt: str) -> str:
    """``idp logins``: one row per login, or a JSON/YAML list."""
    if fmt != "table":
        return render([to_dict(login, emit_defaults=True) for login in logins], fmt)
    if not logins:
        return NO_LOGINS
    rows = [{"login": login.login_id, "username": login.username or login.subject or "-",
             "address": login.address or "-", "state": state_label(login.state),
             "roles": scalar(list(login.roles)) or "-", "expires": _expiry_cell(login)}
            for login in logins]
    return "\n".join(columns(rows))


def bindings_text(bindings: Sequence[idp_pb2.IdpBinding], fmt: str) -> str:
    """``idp bindings``: one row per binding, or a JSON/YAML list."""
    if fmt != "table":
        return render([to_dict(binding, emit_defaults=True) for binding in bindings], fmt)
    if not bindings:
        return NO_BINDINGS
    rows = [{"prefix": binding.prefix, "roles": scalar(list(binding.roles)) or "-",
             "username": binding.username or "-", "subject": binding.subject or "-",
             "origin": binding.origin or "-", "groups": scalar(list(binding.groups)) or "-"}
            for binding in bindings]
    return "\n".join(columns(rows))
