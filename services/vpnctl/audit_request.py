"""The requests of the ``vpnctl audit`` verbs, built from the parsed command line.

Pure: no socket, no clock. Every builder takes ``now`` (an aware datetime), so relative
times (``--since 15m``) resolve against a clock the caller chooses and tests pin. Option
values are checked one by one by the argparse types below; checks that involve two options
(``--since`` after ``--until``) raise :class:`UsageError` here, before any RPC.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from vpnr.v1 import audit_pb2, codes_pb2, common_pb2
from vpnr.vpnctl.policy_terms import VERDICTS
from vpnr.vpnctl.reflection import UsageError

PAGE_SIZE_MAX = 5000  # auditd answers INVALID_ARGUMENT to a larger Query page
DEFAULT_LIMIT = 50
DEFAULT_TOP = 10

# An absolute time, or how long before "now" (resolved when the request is built).
Moment = datetime | timedelta

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:\d+[smhd])+")
_DURATION_PART = re.compile(r"(\d+)([smhd])")
TIME_EXPECTED = ("expected a duration ago such as 90s, 15m, 2h, 7d (or 1h30m) or an "
                 "ISO 8601 time such as 2026-11-21T10:00:00Z")


def parse_moment(text: str) -> Moment:
    """``15m`` -> 15 minutes ago (a timedelta); ``2026-11-21T10:00:00Z`` -> that time.

    An ISO 8601 time without an offset is UTC. Raises ValueError naming what was expected.
    """
    value = text.strip()
    if _DURATION.fullmatch(value):
        return timedelta(seconds=sum(int(count) * _UNIT_SECONDS[unit]
                                     for count, unit in _DURATION_PART.findall(value)))
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{TIME_EXPECTED}, got {text!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def resolve_moment(moment: Moment, now: datetime) -> datetime:
    """The UTC time a parsed ``--since``/``--until`` value means at ``now`` (aware)."""
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    if isinstance(moment, timedelta):
        return (now - moment).astimezone(UTC)
    return moment


def parse_time(text: str, now: datetime) -> datetime:
    """``parse_moment`` then ``resolve_moment``: the UTC time ``text`` means at ``now``."""
    return resolve_moment(parse_moment(text), now)


def moment_arg(text: str) -> Moment:
    """argparse type of ``--since`` and ``--until``."""
    try:
        return parse_moment(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def timestamp(moment: datetime) -> Timestamp:
    """An aware datetime as a protobuf Timestamp."""
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def iso_utc(moment: datetime) -> str:
    """``2026-11-21T10:00:00Z``, or ``2026-11-21T10:00:00.250Z`` with a fraction: for
    messages, at the millisecond precision records are shown with."""
    precision = "milliseconds" if moment.microsecond else "seconds"
    return moment.astimezone(UTC).isoformat(timespec=precision).replace("+00:00", "Z")


@dataclass(frozen=True)
class TimeWindow:
    """``--since`` / ``--until`` resolved at one ``now``; ``None`` is an open end."""

    start: datetime | None
    end: datetime | None

    def time_range(self) -> common_pb2.TimeRange | None:
        """The window as the API's TimeRange (start inclusive, end exclusive); None when
        both ends are open, so that the request leaves the field unset."""
        if self.start is None and self.end is None:
            return None
        window = common_pb2.TimeRange()
        if self.start is not None:
            window.start.CopyFrom(timestamp(self.start))
        if self.end is not None:
            window.end.CopyFrom(timestamp(self.end))
        return window

    def text(self) -> str:
        """``2026-11-21T10:00:00Z -> now`` for the stats table."""
        start = iso_utc(self.start) if self.start is not None else "the first record"
        end = iso_utc(self.end) if self.end is not None else "now"
        return f"{start} -> {end}"


def time_window(args: argparse.Namespace, now: datetime) -> TimeWindow:
    """``--since`` and ``--until`` at ``now``; UsageError unless since comes before until."""
    start = resolve_moment(args.since, now) if args.since is not None else None
    end = resolve_moment(args.until, now) if args.until is not None else None
    if start is not None and end is not None and start >= end:
        raise UsageError(f"--since ({iso_utc(start)}) must be before --until ({iso_utc(end)})")
    return TimeWindow(start, end)


def audit_filter(args: argparse.Namespace, now: datetime) -> audit_pb2.AuditFilter:
    """The AuditFilter the events and export verbs share."""
    verdicts = dict.fromkeys(VERDICTS[name] for name in args.verdict or ())  # once each
    return audit_pb2.AuditFilter(
        time=time_window(args, now).time_range(),
        verdicts=[cast(codes_pb2.Verdict, verdict) for verdict in verdicts],
        role=args.role or "", src_prefix=args.src or "", dst_prefix=args.dst or "",
        rule_id=args.rule or 0, peer=args.peer or "",
        control_only=args.control, packets_only=args.packets)


def record_limit(args: argparse.Namespace) -> int | None:
    """How many records ``audit events`` prints: --limit, none with --all, else 50."""
    if args.all:
        return None
    return int(args.limit) if args.limit is not None else DEFAULT_LIMIT


def query_request(args: argparse.Namespace, now: datetime) -> audit_pb2.QueryRequest:
    """The first Query of ``audit events``: the filter and a page of up to --limit records
    (at most :data:`PAGE_SIZE_MAX`; later pages are sized by what is still missing)."""
    check_events_options(args)
    limit = record_limit(args)
    page_size = PAGE_SIZE_MAX if limit is None else min(limit, PAGE_SIZE_MAX)
    return audit_pb2.QueryRequest(filter=audit_filter(args, now),
                                  page=common_pb2.PageRequest(page_size=page_size))


def follow_request(args: argparse.Namespace, now: datetime) -> audit_pb2.FollowRequest:
    """``audit events --follow``: the filter and the cursor (0: from now)."""
    check_events_options(args)
    if args.until is not None:
        raise UsageError("--until cannot be used with --follow: the stream would never end")
    return audit_pb2.FollowRequest(filter=audit_filter(args, now), after_id=args.after_id or 0)


def check_events_options(args: argparse.Namespace) -> None:
    """Options of ``audit events`` that only make sense together (argparse cannot say)."""
    if args.after_id is not None and not args.follow:
        raise UsageError("--after-id needs --follow")


def export_request(args: argparse.Namespace, now: datetime) -> audit_pb2.ExportRequest:
    """``audit export``: the filter."""
    return audit_pb2.ExportRequest(filter=audit_filter(args, now))


def stats_request(args: argparse.Namespace, now: datetime) -> audit_pb2.StatsRequest:
    """``audit stats``: the time window and how many top entries per list."""
    return audit_pb2.StatsRequest(time=time_window(args, now).time_range(), top=args.top)
