"""``vpnctl audit events|export|stats``: the audit log auditd keeps, without writing JSON.

``events`` queries the newest matching records (Query, paged) or follows them live (Follow,
resuming transparently when auditd cuts a slow reader off); ``export`` writes the JSON lines
of Export to a file or stdout; ``stats`` shows Stats. The requests come from
:mod:`vpnr.vpnctl.audit_request`, the text from :mod:`vpnr.vpnctl.audit_view` and the loops
from :mod:`vpnr.vpnctl.audit_client`; this module parses, connects and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, NoReturn, TextIO

from vpnr.v1 import audit_pb2
from vpnr.vpnctl.audit_client import AuditClient, query_records, write_export
from vpnr.vpnctl.audit_request import (
    DEFAULT_LIMIT,
    DEFAULT_TOP,
    export_request,
    follow_request,
    moment_arg,
    query_request,
    record_limit,
    stats_request,
    time_window,
)
from vpnr.vpnctl.audit_view import (
    NO_RECORDS,
    record_line,
    records_text,
    stats_text,
    streamed_record_text,
)
from vpnr.vpnctl.commandline import (
    Subcommands,
    add_group,
    add_verb,
    bounded_int,
    call_timeout,
    emit,
)
from vpnr.vpnctl.output import render
from vpnr.vpnctl.policy_terms import UINT32_MAX, VERDICTS
from vpnr.vpnctl.policy_verbs import prefix_arg, rule_id_arg
from vpnr.vpnctl.reflection import UsageError, VpnctlError, socket_path, to_dict

EXIT_OK = 0
STDOUT = "-"
UINT64_MAX = 2**64 - 1

limit_arg = bounded_int("a number of records", 1, UINT32_MAX)
after_id_arg = bounded_int("a record id", 0, UINT64_MAX)
top_arg = bounded_int("a number of entries", 1, UINT32_MAX)


def connect(args: argparse.Namespace) -> AuditClient:
    """A client on the instance's auditd socket: unary calls get the command's deadline,
    streams none unless --timeout is given."""
    return AuditClient(socket_path(args.run_dir, args.instance, "auditd"),
                       call_timeout(args, False), call_timeout(args, True))


def plural(count: int, noun: str) -> str:
    """``1 record``, ``2 records``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


# ------------------------------------------------------------------------------ events

def write_records(records: Iterable[audit_pb2.AuditRecord], fmt: str, out: TextIO) -> int:
    """A query's records on ``out``: table lines as they come, or one JSON/YAML document
    (which needs them all first). Returns how many there were."""
    if fmt != "table":
        collected = list(records)
        out.write(records_text(collected, fmt) + "\n")
        return len(collected)
    count = 0
    for record in records:
        out.write(record_line(record) + "\n")
        count += 1
    if not count:
        out.write(NO_RECORDS + "\n")
    return count


def follow_events(client: AuditClient, request: audit_pb2.FollowRequest, fmt: str,
                  out: TextIO, notes: TextIO) -> NoReturn:
    """Print each record as it arrives until the stream ends (an error: auditd went away)
    or Ctrl-C (KeyboardInterrupt, left to the caller). A resume after a cut-off is noted on
    ``notes``."""
    def on_resume(after_id: int) -> None:
        print(f"note: auditd cut this client off for falling behind; resuming after "
              f"record {after_id}", file=notes, flush=True)

    for count, record in enumerate(client.follow(request, on_resume)):
        out.write(streamed_record_text(record, fmt, first=count == 0) + "\n")
        out.flush()
    raise VpnctlError("auditd ended the Follow stream (is it shutting down?)")


def cmd_audit_events(args: argparse.Namespace) -> int:
    """The newest matching records (Query), or every new one as it comes (Follow)."""
    now = datetime.now(UTC)
    if not args.follow:
        query = query_request(args, now)
        with connect(args) as client:
            write_records(query_records(client.query_page, query, record_limit(args)),
                          args.output, sys.stdout)
        return EXIT_OK
    request = follow_request(args, now)
    try:
        with connect(args) as client:
            follow_events(client, request, args.output, sys.stdout, sys.stderr)
    except KeyboardInterrupt:  # how a follow ends normally
        return EXIT_OK


# ------------------------------------------------------------------------------ export

@contextmanager
def replacing_file(target: Path) -> Iterator[BinaryIO]:
    """A new file next to ``target`` that becomes ``target`` only when the block succeeds,
    so a failed export never leaves a truncated file under the name asked for. It is
    created (mode 0600: audit records name people's addresses) before any RPC; a target
    that cannot be written is a usage error."""
    try:
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                             suffix=".partial")
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cmd_audit_export(args: argparse.Namespace) -> int:
    """Export's JSON lines into --output-file (or stdout); the count on stderr."""
    request = export_request(args, datetime.now(UTC))
    target = args.output_file
    if target in (None, STDOUT):
        if args.output == "yaml":
            raise UsageError("audit export writes JSON lines: -o yaml needs --output-file "
                             "(it then prints the summary as YAML)")
        with connect(args) as client:
            count = write_export(client.export(request), sys.stdout.buffer)
        print(f"exported {plural(count, 'record')}", file=sys.stderr)
        return EXIT_OK
    with replacing_file(Path(target)) as out, connect(args) as client:
        count = write_export(client.export(request), out)
    if args.output == "table":
        print(f"exported {plural(count, 'record')} to {target}", file=sys.stderr)
    else:
        emit(render({"file": target, "records": count}, args.output))
    return EXIT_OK


# ------------------------------------------------------------------------------- stats

def cmd_audit_stats(args: argparse.Namespace) -> int:
    """Stats over the window: rates, verdict counts, top talkers, losses."""
    now = datetime.now(UTC)
    request = stats_request(args, now)
    with connect(args) as client:
        stats = client.stats(request)
    emit(stats_text(stats, time_window(args, now), args.output))
    return EXIT_OK


# --------------------------------------------------------------------- status, record

def cmd_audit_status(args: argparse.Namespace) -> int:
    """Status: store, record count, sinks, losses, the ring buffer."""
    with connect(args) as client:
        status = client.call("Status", audit_pb2.AuditStatusRequest(), audit_pb2.AuditStatus)
    data = to_dict(status, emit_defaults=True)
    emit(render(data, args.output))
    return EXIT_OK


def detail_arg(text: str) -> str:
    """``--detail``: a JSON object, kept as the text given."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return text


def cmd_audit_record(args: argparse.Namespace) -> int:
    """Record: add one control event (an operator's note, a change made by hand)."""
    event = audit_pb2.ControlEvent(daemon=args.daemon, action=args.action,
                                   detail_json=args.detail or "", success=not args.error,
                                   error=args.error or "")
    with connect(args) as client:
        reply = client.call("Record", audit_pb2.RecordRequest(event=event),
                            audit_pb2.RecordResponse)
    data = {"id": reply.id, "daemon": args.daemon, "action": args.action}
    emit(f"recorded {args.action} as record {reply.id}" if args.output == "table"
         else render(data, args.output))
    return EXIT_OK


# ------------------------------------------------------------------------ registration

TIME_NOTES = """\
T is how long ago (90s, 15m, 2h, 7d, 1h30m) or an ISO 8601 time (2026-11-21T10:00:00Z,
2026-11-21T12:00:00+02:00; without an offset it is UTC). --since is inclusive, --until
exclusive; either may be left open."""

EVENTS_NOTES = TIME_NOTES + f"""

Without --follow: the {DEFAULT_LIMIT} newest matching records (--limit N for more, --all for
every one), newest first. With --follow: each new record as it arrives, oldest first, until
Ctrl-C (exit 0); --after-id N starts after record N (the id shown by -o json) instead of now,
catching up from storage. When auditd cuts a reader that falls behind off, vpnctl resumes
where it stopped (a note on stderr): nothing is missed or shown twice. If auditd goes away,
the command ends with the error (exit 1). -o json with --follow prints one JSON object per
line."""


def add_window(parser: argparse.ArgumentParser) -> None:
    """``--since`` and ``--until``."""
    parser.add_argument("--since", type=moment_arg, metavar="T",
                        help="records at or after T (a duration ago or an ISO 8601 time)")
    parser.add_argument("--until", type=moment_arg, metavar="T",
                        help="records before T (a duration ago or an ISO 8601 time)")


def add_filters(parser: argparse.ArgumentParser) -> None:
    """The AuditFilter options shared by ``events`` and ``export``."""
    add_window(parser)
    parser.add_argument("--verdict", action="append", type=str.lower, choices=tuple(VERDICTS),
                        help="only packets with this verdict (repeat for several)")
    parser.add_argument("--role", metavar="NAME", help="only packets of a source in this role")
    parser.add_argument("--src", type=prefix_arg, metavar="CIDR",
                        help="only packets from this prefix (an address means its /32 or /128)")
    parser.add_argument("--dst", type=prefix_arg, metavar="CIDR",
                        help="only packets to this prefix")
    parser.add_argument("--rule", type=rule_id_arg, metavar="ID",
                        help="only packets decided by this rule")
    parser.add_argument("--peer", metavar="NAME", help="only packets of this tunnel peer")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--control", action="store_true",
                      help="only control-plane events (policy changes and other state changes)")
    kind.add_argument("--packets", action="store_true", help="only packet decisions")


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register ``audit`` with its verbs."""
    audit = add_group(commands, common, "audit",
                      "the audit log of auditd: events, export, stats, status, record", [
                          "vpnctl audit events --since 15m --verdict deny",
                          "vpnctl audit events --follow --role eng",
                          "vpnctl audit export --since 1d -f audit.jsonl",
                          "vpnctl audit stats --since 1h"])
    verb = add_verb(audit, common, "events",
                    "recent packet decisions and control events, or follow them live", [
                        "vpnctl audit events                       # the 50 newest records",
                        "vpnctl audit events --since 15m --verdict deny --verdict redirect",
                        "vpnctl audit events --since 2026-11-21T10:00:00Z --until 1h "
                        "--src 10.1.0.0/24 --all",
                        "vpnctl audit events --control --limit 10 -o yaml",
                        "vpnctl audit events --follow --dst 10.2.0.5 --rule 10",
                        "vpnctl audit events --follow --after-id 123456 -o json | jq ."],
                    cmd_audit_events, notes=EVENTS_NOTES)
    add_filters(verb)
    amount = verb.add_mutually_exclusive_group()
    amount.add_argument("--limit", type=limit_arg, metavar="N",
                        help=f"the N newest matching records (default {DEFAULT_LIMIT})")
    amount.add_argument("--all", action="store_true",
                        help="every matching record, page after page")
    amount.add_argument("--follow", action="store_true",
                        help="print new records as they arrive, until Ctrl-C")
    verb.add_argument("--after-id", type=after_id_arg, metavar="N",
                      help="with --follow: start after record N instead of now")

    verb = add_verb(audit, common, "export", "write matching records as JSON lines", [
        "vpnctl audit export --since 1d -f audit.jsonl",
        "vpnctl audit export --since 2026-11-21 --until 2026-11-22 --verdict deny "
        "--output-file deny.jsonl",
        "vpnctl audit export --control | jq -r .action"],
                    cmd_audit_export, notes=TIME_NOTES + "\n\nThe records are JSON lines "
                    "whatever -o says. The number exported is printed on stderr, or with\n"
                    "--output-file and -o json|yaml as a document on stdout; a failed export "
                    "leaves no file.")
    add_filters(verb)
    verb.add_argument("-f", "--output-file", metavar="FILE",
                      help="file to write (default: stdout; - is stdout too)")

    verb = add_verb(audit, common, "stats",
                    "rates, verdict counts, top sources, destinations, roles, rules, losses", [
                        "vpnctl audit stats", "vpnctl audit stats --since 1h --top 5",
                        "vpnctl audit stats --since 7d -o json"],
                    cmd_audit_stats, notes=TIME_NOTES)
    add_window(verb)
    verb.add_argument("--top", type=top_arg, default=DEFAULT_TOP, metavar="N",
                      help=f"entries in each top list (default {DEFAULT_TOP})")

    add_verb(audit, common, "status", "store, record count, sinks, losses and ring buffer", [
        "vpnctl audit status", "vpnctl audit status -o json"], cmd_audit_status)
    verb = add_verb(audit, common, "record", "add a control event to the audit log", [
        "vpnctl audit record note.add --detail '{\"text\": \"maintenance starts\"}'",
        "vpnctl audit record firewall.manual_change --daemon ops --error 'rolled back'"],
                    cmd_audit_record)
    verb.add_argument("action", metavar="ACTION", help='what happened, e.g. "note.add"')
    verb.add_argument("--daemon", default="vpnctl", metavar="NAME",
                      help="who records it (default: vpnctl)")
    verb.add_argument("--detail", type=detail_arg, metavar="JSON",
                      help="details as a JSON object (never put secrets here)")
    verb.add_argument("--error", metavar="TEXT",
                      help="record it as failed, with this error")
