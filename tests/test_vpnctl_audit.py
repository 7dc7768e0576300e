"""vpnctl's audit verbs without a server: the command line into the exact requests, the
records and statistics into text, and the paging, follow-resume and export loops run over
in-memory streams. No mocks: the clock, the output streams and the page/stream sources are
parameters of the code under test. End-to-end tests against a real auditd live elsewhere.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import cast

import pytest
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from vpnr.v1 import audit_pb2, codes_pb2, common_pb2
from vpnr.vpnctl.audit_client import (
    MAX_RESUMES_WITHOUT_PROGRESS,
    FollowCutOff,
    follow_records,
    query_records,
    write_export,
)
from vpnr.vpnctl.audit_request import (
    TimeWindow,
    export_request,
    follow_request,
    parse_moment,
    parse_time,
    query_request,
    resolve_moment,
    stats_request,
)
from vpnr.vpnctl.audit_verbs import replacing_file, write_records
from vpnr.vpnctl.audit_view import (
    record_line,
    records_text,
    stats_text,
    stats_view,
    streamed_record_text,
)
from vpnr.vpnctl.main import main, parse_args
from vpnr.vpnctl.reflection import RpcFailure, UsageError, VpnctlError

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
RequestBuilder = Callable[[argparse.Namespace, datetime], object]


def stamp(text: str) -> Timestamp:
    """A Timestamp from RFC 3339 text."""
    result = Timestamp()
    result.FromJsonString(text)
    return result


def audit_args(*argv: str) -> argparse.Namespace:
    """``vpnctl audit ...`` parsed, with an empty environment."""
    return parse_args(["audit", *argv], environ={})


def vpnctl(tmp_path: Path, capsys: pytest.CaptureFixture[str],
           *argv: str) -> tuple[int, str, str]:
    """vpnctl in-process against an instance with no daemon: exit code, stdout, stderr."""
    code = main(["--instance", "nosuch", "--run-dir", str(tmp_path / "run"), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------- times

@pytest.mark.parametrize(("text", "ago"), [
    ("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)),
    ("2h", timedelta(hours=2)), ("7d", timedelta(days=7)),
    ("1h30m", timedelta(hours=1, minutes=30)), ("0s", timedelta(0)),
])
def test_relative_times_count_back_from_now(text: str, ago: timedelta) -> None:
    assert parse_moment(text) == ago
    assert parse_time(text, NOW) == NOW - ago


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-21T10:00:00Z", datetime(2026, 11, 21, 10, tzinfo=UTC)),
    ("2026-11-21T10:00:00", datetime(2026, 11, 21, 10, tzinfo=UTC)),  # naive is UTC
    ("2026-11-21T12:00:00+02:00", datetime(2026, 11, 21, 10, tzinfo=UTC)),
    ("2026-11-21T10:00:00.250Z", datetime(2026, 11, 21, 10, 0, 0, 250000, tzinfo=UTC)),
    ("2026-11-21", datetime(2026, 11, 21, tzinfo=UTC)),
])
def test_absolute_times_are_utc_and_ignore_now(text: str, expected: datetime) -> None:
    resolved = parse_time(text, NOW)
    assert resolved == expected
    assert resolved.utcoffset() == timedelta(0)
    assert parse_time(text, NOW + timedelta(days=30)) == expected


def test_now_in_another_zone_gives_the_same_instant() -> None:
    elsewhere = NOW.astimezone(timezone(timedelta(hours=-5)))
    assert parse_time("15m", elsewhere) == NOW - timedelta(minutes=15)
    assert parse_time("15m", elsewhere).utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="aware"):
        resolve_moment(timedelta(minutes=1), NOW.replace(tzinfo=None))


@pytest.mark.parametrize("text", ["yesterday", "15", "15x", "-5m", "m", "2026-13-01", ""])
def test_bad_times_name_what_was_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected a duration ago such as 90s, 15m, 2h, 7d"):
        parse_moment(text)


# --------------------------------------------------------------------- the requests

def test_events_defaults_to_one_page_of_50_without_filter() -> None:
    assert query_request(audit_args("events"), NOW) == audit_pb2.QueryRequest(
        filter=audit_pb2.AuditFilter(), page=common_pb2.PageRequest(page_size=50))


def test_events_every_filter_into_the_query() -> None:
    args = audit_args("events", "--since", "15m", "--until", "2026-11-21T11:59:00Z",
                      "--verdict", "deny", "--verdict", "REDIRECT", "--verdict", "deny",
                      "--role", "eng", "--src", "10.1.0.10", "--dst", "fd00:2::/64",
                      "--rule", "10", "--peer", "site-b", "--packets", "--limit", "7")
    assert query_request(args, NOW) == audit_pb2.QueryRequest(
        filter=audit_pb2.AuditFilter(
            time=common_pb2.TimeRange(start=stamp("2026-11-21T11:45:00Z"),
                                      end=stamp("2026-11-21T11:59:00Z")),
            verdicts=[codes_pb2.VERDICT_DENY, codes_pb2.VERDICT_REDIRECT],
            role="eng", src_prefix="10.1.0.10/32", dst_prefix="fd00:2::/64", rule_id=10,
            peer="site-b", packets_only=True),
        page=common_pb2.PageRequest(page_size=7))


def test_an_open_end_leaves_it_unset() -> None:
    request = query_request(audit_args("events", "--since", "2h", "--control"), NOW)
    assert request.filter == audit_pb2.AuditFilter(
        time=common_pb2.TimeRange(start=stamp("2026-11-21T10:00:00Z")), control_only=True)
    assert not request.filter.time.HasField("end")
    request = query_request(audit_args("events", "--until", "1d"), NOW)
    assert request.filter.time == common_pb2.TimeRange(end=stamp("2026-11-20T12:00:00Z"))


@pytest.mark.parametrize(("argv", "page_size"), [
    (["--limit", "1"], 1), (["--limit", "5000"], 5000), (["--limit", "12000"], 5000),
    (["--all"], 5000),
])
def test_page_size_stays_within_the_server_maximum(argv: list[str], page_size: int) -> None:
    assert query_request(audit_args("events", *argv), NOW).page.page_size == page_size


def test_follow_request_carries_filter_and_cursor() -> None:
    args = audit_args("events", "--follow", "--verdict", "allow", "--dst", "10.2.0.0/24")
    assert follow_request(args, NOW) == audit_pb2.FollowRequest(
        filter=audit_pb2.AuditFilter(verdicts=[codes_pb2.VERDICT_ALLOW],
                                     dst_prefix="10.2.0.0/24"))
    args = audit_args("events", "--follow", "--after-id", "123456", "--since", "1h")
    assert follow_request(args, NOW) == audit_pb2.FollowRequest(
        filter=audit_pb2.AuditFilter(
            time=common_pb2.TimeRange(start=stamp("2026-11-21T11:00:00Z"))),
        after_id=123456)


def test_follow_option_conflicts_are_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"^--until cannot be used with --follow"):
        follow_request(audit_args("events", "--follow", "--until", "1h"), NOW)
    with pytest.raises(UsageError, match=r"^--after-id needs --follow$"):
        query_request(audit_args("events", "--after-id", "5"), NOW)


@pytest.mark.parametrize(("verb", "build"), [
    ("events", query_request), ("export", export_request), ("stats", stats_request)])
def test_since_must_come_before_until(verb: str, build: RequestBuilder) -> None:
    with pytest.raises(UsageError, match=r"^--since \(2026-11-21T11:00:00Z\) must be before "
                                         r"--until \(2026-11-21T10:00:00Z\)$"):
        build(audit_args(verb, "--since", "1h", "--until", "2h"), NOW)
    with pytest.raises(UsageError, match="must be before"):  # an empty window
        build(audit_args(verb, "--since", "1h", "--until", "2026-11-21T11:00:00Z"), NOW)


def test_export_request_is_the_filter() -> None:
    args = audit_args("export", "--since", "2026-11-21", "--until", "2026-11-22",
                      "--verdict", "deny", "-f", "out.jsonl")
    assert export_request(args, NOW) == audit_pb2.ExportRequest(
        filter=audit_pb2.AuditFilter(
            time=common_pb2.TimeRange(start=stamp("2026-11-21T00:00:00Z"),
                                      end=stamp("2026-11-22T00:00:00Z")),
            verdicts=[codes_pb2.VERDICT_DENY]))
    assert args.output_file == "out.jsonl"


def test_stats_request_defaults_to_top_10() -> None:
    assert stats_request(audit_args("stats"), NOW) == audit_pb2.StatsRequest(top=10)
    assert stats_request(audit_args("stats", "--since", "1h", "--top", "3"), NOW) == \
        audit_pb2.StatsRequest(time=common_pb2.TimeRange(start=stamp("2026-11-21T11:00:00Z")),
                               top=3)


# ------------------------------------------------------------- bad input exits 2

@pytest.mark.parametrize(("argv", "message"), [
    (["events", "--since", "yesterday"], "argument --since: expected a duration ago"),
    (["events", "--until", "2026-11-31T00:00:00Z"], "argument --until: expected a duration"),
    (["stats", "--since", "5 minutes"], "argument --since: expected a duration ago"),
    (["events", "--src", "10.1.0.1/24"],
     'argument --src: "10.1.0.1/24" has host bits set (the prefix would be "10.1.0.0/24")'),
    (["export", "--dst", "10.2.0.300"],
     'argument --dst: expected a CIDR prefix such as "10.2.0.0/24", got "10.2.0.300"'),
    (["events", "--verdict", "drop"], "argument --verdict: invalid choice: 'drop'"),
    (["events", "--control", "--packets"],
     "argument --packets: not allowed with argument --control"),
    (["events", "--limit", "0"],
     "argument --limit: expected a number of records (1-4294967295), got 0"),
    (["events", "--limit", "-3"], "argument --limit: expected a number of records"),
    (["events", "--limit", "ten"], "argument --limit: expected a number of records"),
    (["events", "--limit", "10", "--all"], "argument --all: not allowed with argument --limit"),
    (["events", "--all", "--follow"], "argument --follow: not allowed with argument --all"),
    (["events", "--rule", "0"], "argument --rule: expected a rule id (1-4294967295), got 0"),
    (["events", "--after-id", "-1", "--follow"], "argument --after-id: expected a record id"),
    (["stats", "--top", "0"], "argument --top: expected a number of entries"),
    (["stats", "--verdict", "deny"], "unrecognized arguments: --verdict deny"),
])
def test_bad_arguments_exit_2_naming_the_option(argv: list[str], message: str,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = vpnctl(tmp_path, capsys, "audit", *argv)
    assert (code, out) == (2, "")
    assert message in err


@pytest.mark.parametrize(("argv", "message"), [
    (["events", "--since", "1h", "--until", "2h"],
     "error: --since (2026"),
    (["stats", "--since", "2026-11-21T10:00:00Z", "--until", "2026-11-21T09:00:00Z"],
     "error: --since (2026-11-21T10:00:00Z) must be before --until (2026-11-21T09:00:00Z)"),
    (["export", "--since", "2026-01-02", "--until", "2026-01-01"], "error: --since"),
    (["events", "--after-id", "7"], "error: --after-id needs --follow"),
    (["events", "--follow", "--until", "1h"], "error: --until cannot be used with --follow"),
    (["export", "-f", "/nonexistent-dir/audit.jsonl"],
     "error: cannot write /nonexistent-dir/audit.jsonl: No such file or directory"),
])
def test_conflicting_options_exit_2_on_one_line_before_any_rpc(
        argv: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # No auditd runs: a request that got as far as connecting would exit 1, not 2.
    code, out, err = vpnctl(tmp_path, capsys, "audit", *argv)
    assert (code, out) == (2, "")
    assert err.startswith(message)
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv", [["events"], ["events", "--follow"], ["stats"],
                                  ["export"], ["export", "-f", "{tmp}/out.jsonl"]],
                         ids=" ".join)
def test_down_auditd_names_the_socket(argv: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    code, out, err = vpnctl(tmp_path, capsys, "audit", *argv)
    assert (code, out) == (3, "")  # 3: daemon unreachable
    socket = tmp_path / "run" / "nosuch" / "auditd.sock"
    assert err == f"error: cannot reach auditd at {socket}: no socket\n"
    assert list(tmp_path.iterdir()) == []  # no export file, not even a partial one


@pytest.mark.parametrize("argv", [["audit"], ["audit", "events"], ["audit", "export"],
                                  ["audit", "stats"]], ids=" ".join)
def test_help_of_every_audit_verb_ends_with_examples(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n" in out
    assert out.rstrip().splitlines()[-1].strip().startswith("vpnctl audit ")


# ----------------------------------------------------------------------- rendering

PACKET_V4 = audit_pb2.AuditRecord(
    id=41, time=stamp("2026-11-21T10:00:00.123456789Z"), instance="a",
    packet=audit_pb2.PacketDecision(
        verdict=codes_pb2.VERDICT_ALLOW, reason=codes_pb2.REASON_RULE_ALLOW,
        src="10.1.0.10", dst="10.2.0.5", src_port=51000, dst_port=22, ip_protocol=6,
        roles=["eng", "ops"], rule_id=10, rule_role="eng", interface="lan0",
        icmp_type=0xFFFF))
PACKET_V6 = audit_pb2.AuditRecord(
    id=42, time=stamp("2026-11-21T10:00:01Z"), instance="a",
    packet=audit_pb2.PacketDecision(
        verdict=codes_pb2.VERDICT_DENY, reason=codes_pb2.REASON_NO_ROLE,
        src="fd00:1::5", dst="fd00:2::1", src_port=40000, dst_port=53, ip_protocol=17,
        interface="lan1", peer="site-b", icmp_type=0xFFFF))
PING = audit_pb2.AuditRecord(
    id=43, time=stamp("2026-11-21T10:00:02.999Z"),
    packet=audit_pb2.PacketDecision(
        verdict=codes_pb2.VERDICT_DENY, reason=codes_pb2.REASON_DEFAULT_DENY,
        src="10.1.0.10", dst="10.2.0.5", ip_protocol=1, icmp_type=8, roles=["eng"],
        interface="lan0"))
CONTROL = audit_pb2.AuditRecord(
    id=44, time=stamp("2026-11-21T10:00:03.5Z"), instance="a",
    control=audit_pb2.ControlEvent(daemon="policyd", action="policy.replace", actor="uid:0",
                                   version_before=4, version_after=5, success=True,
                                   detail_json='{"roles": 3}'))
FAILED = audit_pb2.AuditRecord(
    id=45, time=stamp("2026-11-21T10:00:04Z"),
    control=audit_pb2.ControlEvent(daemon="policyd", action="binding.create",
                                   actor="idpd", error="role 'qa' does not exist"))


def test_packet_line_ipv4() -> None:
    assert record_line(PACKET_V4) == (
        "2026-11-21T10:00:00.123Z  ALLOW     rule_allow              "
        "10.1.0.10:51000 -> 10.2.0.5:22                  tcp     eng,ops       "
        "rule 10 (eng)  lan0")


def test_packet_line_ipv6_brackets_addresses_with_ports() -> None:
    assert record_line(PACKET_V6) == (
        "2026-11-21T10:00:01.000Z  DENY      no_role                 "
        "[fd00:1::5]:40000 -> [fd00:2::1]:53             udp     -             "
        "-          lan1 peer site-b")


def test_packet_line_without_ports_shows_icmp_type_fragments_and_odd_protocols() -> None:
    assert record_line(PING) == (
        "2026-11-21T10:00:02.999Z  DENY      default_deny            "
        "10.1.0.10 -> 10.2.0.5                           icmp type 8  eng           "
        "-          lan0")
    fragment = audit_pb2.AuditRecord()
    fragment.CopyFrom(PACKET_V4)
    fragment.packet.src_port = fragment.packet.dst_port = 0
    fragment.packet.fragment = True
    assert "  10.1.0.10 -> 10.2.0.5  " in record_line(fragment)
    assert "  tcp frag  " in record_line(fragment)
    gre = audit_pb2.AuditRecord(packet=audit_pb2.PacketDecision(
        verdict=cast(codes_pb2.Verdict, 5), reason=cast(codes_pb2.Reason, 99),
        src="10.1.0.10", dst="10.2.0.5", ip_protocol=47))  # codes of a newer auditd
    assert record_line(gre).split() == ["-", "5", "99", "10.1.0.10", "->", "10.2.0.5",
                                        "proto", "47", "-", "-", "-"]


def test_control_line() -> None:
    assert record_line(CONTROL) == (
        "2026-11-21T10:00:03.500Z  CONTROL   policyd  policy.replace  uid:0  v4 -> v5")
    assert record_line(FAILED) == (
        "2026-11-21T10:00:04.000Z  CONTROL   policyd  binding.create  idpd  -  "
        "FAILED: role 'qa' does not exist")


def test_records_table_json_and_yaml() -> None:
    records = [CONTROL, PACKET_V6, PACKET_V4]
    table = records_text(records, "table").splitlines()
    assert table == [record_line(record) for record in records]
    assert records_text([], "table") == "(no records)"
    data = json.loads(records_text(records, "json"))
    assert data[0] == {"id": "44", "time": "2026-11-21T10:00:03.500Z", "instance": "a",
                       "control": {"daemon": "policyd", "action": "policy.replace",
                                   "actor": "uid:0", "version_before": "4",
                                   "version_after": "5", "detail_json": '{"roles": 3}',
                                   "success": True}}
    assert data[2]["packet"]["verdict"] == "VERDICT_ALLOW"
    assert data[2]["packet"]["roles"] == ["eng", "ops"]
    assert data[1]["packet"]["src"] == "fd00:1::5"
    assert yaml.safe_load(records_text(records, "yaml")) == data
    assert json.loads(records_text([], "json")) == []


def test_followed_records_print_one_per_line() -> None:
    assert streamed_record_text(PACKET_V4, "table", first=True) == record_line(PACKET_V4)
    line = streamed_record_text(PACKET_V6, "json", first=False)
    assert "\n" not in line
    assert json.loads(line)["packet"]["dst"] == "fd00:2::1"
    assert streamed_record_text(CONTROL, "yaml", first=True).startswith("---\nid: '44'\n")


def test_write_records_streams_table_lines_and_counts() -> None:
    out = io.StringIO()
    assert write_records(iter([PACKET_V4, CONTROL]), "table", out) == 2
    assert out.getvalue() == record_line(PACKET_V4) + "\n" + record_line(CONTROL) + "\n"
    out = io.StringIO()
    assert write_records(iter([]), "table", out) == 0
    assert out.getvalue() == "(no records)\n"
    out = io.StringIO()
    assert write_records(iter([PING]), "json", out) == 1
    assert json.loads(out.getvalue())[0]["packet"]["icmp_type"] == 8


STATS = audit_pb2.AuditStats(
    events_per_second=12.5, allowed=1200, denied=34,
    top_sources=[audit_pb2.TopEntry(key="10.1.0.10", count=900),
                 audit_pb2.TopEntry(key="fd00:1::5", count=10)],
    top_destinations=[audit_pb2.TopEntry(key="10.2.0.5", count=800)],
    top_rules=[audit_pb2.TopEntry(key="10", count=700)],
    lost_by_cause={"sink_json_dropped": 3, "kernel_reserve_failed": 7})
WINDOW = TimeWindow(datetime(2026, 11, 21, 11, tzinfo=UTC), None)


def test_stats_table() -> None:
    assert stats_text(STATS, WINDOW, "table").splitlines() == [
        "window:    2026-11-21T11:00:00Z -> now",
        "events/s:  12.5",
        "allowed:   1200",
        "denied:    34",
        "top sources:",
        "  SOURCE     COUNT",
        "  10.1.0.10  900",
        "  fd00:1::5  10",
        "top destinations:",
        "  DESTINATION  COUNT",
        "  10.2.0.5     800",
        "top roles: none",
        "top rules:",
        "  RULE  COUNT",
        "  10    700",
        "lost by cause:",
        "  kernel_reserve_failed: 7",
        "  sink_json_dropped:     3",
    ]
    fraction = TimeWindow(datetime(2026, 11, 21, 11, 0, 0, 250999, tzinfo=UTC),
                          datetime(2026, 11, 21, 12, tzinfo=UTC))
    assert stats_view(STATS, fraction)["window"] == \
        "2026-11-21T11:00:00.250Z -> 2026-11-21T12:00:00Z"
    empty = stats_view(audit_pb2.AuditStats(), TimeWindow(None, None))
    assert empty["window"] == "the first record -> now"
    assert (empty["allowed"], empty["top sources"], empty["lost by cause"]) == (0, "none",
                                                                                "none")


def test_stats_json_and_yaml_are_the_message() -> None:
    data = json.loads(stats_text(STATS, WINDOW, "json"))
    assert data["events_per_second"] == 12.5
    assert data["allowed"] == "1200"
    assert data["top_sources"][0] == {"key": "10.1.0.10", "count": "900"}
    assert data["lost_by_cause"] == {"sink_json_dropped": "3", "kernel_reserve_failed": "7"}
    assert yaml.safe_load(stats_text(STATS, WINDOW, "yaml")) == data


# --------------------------------------------------- loops over in-memory streams

def records(*ids: int) -> list[audit_pb2.AuditRecord]:
    """Packet records with these ids."""
    return [audit_pb2.AuditRecord(id=i, packet=audit_pb2.PacketDecision(src="10.1.0.10"))
            for i in ids]


class Pages:
    """A Query server over a list of records (newest first) that keeps what it was asked."""

    def __init__(self, stored: list[audit_pb2.AuditRecord]) -> None:
        self.stored = stored
        self.asked: list[tuple[str, int]] = []  # (page_token, page_size) of each request

    def fetch(self, request: audit_pb2.QueryRequest) -> audit_pb2.QueryResponse:
        """One page: ``page_token`` is the offset."""
        self.asked.append((request.page.page_token, request.page.page_size))
        start = int(request.page.page_token or 0)
        end = start + request.page.page_size
        more = str(end) if end < len(self.stored) else ""
        return audit_pb2.QueryResponse(records=self.stored[start:end],
                                       page=common_pb2.PageResponse(next_page_token=more))


def test_query_pages_ask_for_what_is_missing_up_to_the_limit() -> None:
    pages = Pages(records(*range(12000, 0, -1)))
    request = query_request(audit_args("events", "--limit", "7000"), NOW)
    found = list(query_records(pages.fetch, request, 7000))
    assert [r.id for r in found] == list(range(12000, 5000, -1))
    assert pages.asked == [("", 5000), ("5000", 2000)]
    assert request.page == common_pb2.PageRequest(page_size=5000)  # not changed


def test_query_all_pages_until_the_last_and_one_page_by_default() -> None:
    pages = Pages(records(*range(11000, 0, -1)))
    assert len(list(query_records(pages.fetch, audit_pb2.QueryRequest(), None))) == 11000
    assert pages.asked == [("", 5000), ("5000", 5000), ("10000", 5000)]
    pages = Pages(records(*range(60, 0, -1)))
    assert [r.id for r in query_records(pages.fetch, audit_pb2.QueryRequest(), 50)] == \
        list(range(60, 10, -1))
    assert pages.asked == [("", 50)]


def test_query_stops_on_a_repeated_page_token() -> None:
    def same_token(request: audit_pb2.QueryRequest) -> audit_pb2.QueryResponse:
        return audit_pb2.QueryResponse(records=records(1),
                                       page=common_pb2.PageResponse(next_page_token="t"))
    with pytest.raises(VpnctlError, match="returned the page token 't' twice"):
        list(query_records(same_token, audit_pb2.QueryRequest(), None))


class CuttingServer:
    """A Follow server over ids 1..last that cuts the reader off after ``burst`` records,
    the way auditd does a slow reader; it records every after_id it was opened with."""

    def __init__(self, last: int, burst: int, resume_ids: list[int | None] | None = None
                 ) -> None:
        self.last, self.burst = last, burst
        self.resume_ids = resume_ids  # what the trailing metadata says; None: the truth
        self.opened: list[int] = []

    def open(self, after_id: int) -> Iterator[audit_pb2.AuditRecord]:
        self.opened.append(after_id)
        sent = after_id
        for record in records(*range(after_id + 1, min(after_id + self.burst, self.last) + 1)):
            sent = record.id
            yield record
        if sent >= self.last:
            return
        told = self.resume_ids.pop(0) if self.resume_ids else sent
        raise FollowCutOff(told, RpcFailure("RESOURCE_EXHAUSTED", "reader too slow"))


def test_follow_resumes_after_a_cut_off_without_loss_or_duplicates() -> None:
    server = CuttingServer(last=10, burst=4)
    resumed: list[int] = []
    got = [r.id for r in follow_records(server.open, 0, resumed.append)]
    assert got == list(range(1, 11))
    assert server.opened == [0, 4, 8]
    assert resumed == [4, 8]


def test_follow_drops_records_the_server_sends_again() -> None:
    # The metadata lags behind what was received: reconnect after what was received.
    server = CuttingServer(last=9, burst=4, resume_ids=[2, None])
    resumed: list[int] = []
    got = [r.id for r in follow_records(server.open, 0, resumed.append)]
    assert got == list(range(1, 10))
    assert server.opened == [0, 4, 8]
    assert resumed == [4, 8]

    def replaying(after_id: int) -> Iterator[audit_pb2.AuditRecord]:
        yield from records(after_id, after_id + 1, after_id + 1, after_id + 2)
    assert [r.id for r in follow_records(replaying, 5, resumed.append)] == [6, 7]


def test_follow_gives_up_when_the_server_cannot_catch_it_up() -> None:
    def cut_at_once(after_id: int) -> Iterator[audit_pb2.AuditRecord]:
        raise FollowCutOff(after_id, RpcFailure("RESOURCE_EXHAUSTED", "reader too slow"))

    resumed: list[int] = []
    with pytest.raises(VpnctlError, match=f"cut the Follow stream off "
                                          f"{MAX_RESUMES_WITHOUT_PROGRESS} times"):
        list(follow_records(cut_at_once, 3, resumed.append))
    assert resumed == [3] * (MAX_RESUMES_WITHOUT_PROGRESS - 1)


def test_follow_from_now_without_a_resume_id_is_an_error() -> None:
    def cut_without_metadata(after_id: int) -> Iterator[audit_pb2.AuditRecord]:
        raise FollowCutOff(None, RpcFailure("RESOURCE_EXHAUSTED", "reader too slow"))

    with pytest.raises(VpnctlError, match="without vpnr-resume-after-id"):
        list(follow_records(cut_without_metadata, 0, print))


def test_export_writes_each_chunk_and_counts_records(tmp_path: Path) -> None:
    chunks = [audit_pb2.ExportChunk(jsonl=b'{"id":1}\n{"id":2}\n', records=2),
              audit_pb2.ExportChunk(jsonl=b'{"id":3}\n', records=1)]
    out = io.BytesIO()
    assert write_export(iter(chunks), out) == 3
    assert out.getvalue() == b'{"id":1}\n{"id":2}\n{"id":3}\n'

    target = tmp_path / "audit.jsonl"
    with replacing_file(target) as file:
        assert write_export(iter(chunks), file) == 3
    assert target.read_bytes() == out.getvalue()
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["audit.jsonl"]


def test_a_failed_export_leaves_the_old_file_alone(tmp_path: Path) -> None:
    target = tmp_path / "audit.jsonl"
    target.write_bytes(b"before\n")

    def failing() -> Iterator[audit_pb2.ExportChunk]:
        yield audit_pb2.ExportChunk(jsonl=b'{"id":1}\n', records=1)
        raise RpcFailure("UNAVAILABLE", "auditd went away")

    with pytest.raises(RpcFailure), replacing_file(target) as file:
        write_export(failing(), file)
    assert target.read_bytes() == b"before\n"
    assert [p.name for p in tmp_path.iterdir()] == ["audit.jsonl"]
    with pytest.raises(UsageError, match="cannot write"):
        replacing_file(tmp_path / "missing" / "x.jsonl").__enter__()
