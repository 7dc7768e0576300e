"""``vpnctl policy ...`` and ``vpnctl snapshot ...``: policy as code against policyd.

``policy import`` / ``export`` move a whole policy between a file and policyd (ReplacePolicy,
GetPolicy); ``policy check`` runs the file's decision tests through the LIVE kernel program
(TestDecision) without importing anything; ``policy test`` asks about one packet. Also the
helpers the object verbs (:mod:`vpnr.vpnctl.policy_object_verbs`) share.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any, cast

from vpnr.v1 import codes_pb2, policy_pb2
from vpnr.vpnctl import policyfile
from vpnr.vpnctl.commandline import (
    Subcommands,
    add_group,
    add_verb,
    bounded_int,
    call_timeout,
    emit,
)
from vpnr.vpnctl.output import render, table_lines
from vpnr.vpnctl.policy_client import PolicyClient
from vpnr.vpnctl.policy_terms import (
    ICMP_TYPE_MAX,
    PORT_MAX,
    PROTOCOLS,
    UINT32_MAX,
    enum_label,
    parse_ports,
    parse_prefix,
)
from vpnr.vpnctl.policy_view import (
    decision_table,
    decision_view,
    diff_lines,
    diff_view,
    policy_summary,
    rows_text,
    snapshot_view,
)
from vpnr.vpnctl.reflection import RpcFailure, UsageError, socket_path, to_dict

EXIT_OK = 0
EXIT_MISMATCH = 1
UINT64_MAX = 2**64 - 1
STDOUT = "-"
# A test whose packet the server refuses is reported in the table; anything else (daemon
# gone, method missing, deadline) ends the run, since every further test would fail alike.
TEST_LEVEL_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE")


# ----------------------------------------------------------------- shared by the verbs

def connect(args: argparse.Namespace) -> PolicyClient:
    """A client on the instance's policyd socket, with the command's deadline."""
    return PolicyClient(socket_path(args.run_dir, args.instance, "policyd"),
                        call_timeout(args, False))


def show(args: argparse.Namespace, data: Any, table_text: str) -> None:
    """Print ``data`` as JSON/YAML, or ``table_text`` for the table format."""
    emit(table_text if args.output == "table" else render(data, args.output))


port_arg = bounded_int("a port", 1, PORT_MAX)
icmp_type_arg = bounded_int("an ICMP type", 0, ICMP_TYPE_MAX)
rule_id_arg = bounded_int("a rule id", 1, UINT32_MAX)
priority_arg = bounded_int("a priority", 0, UINT32_MAX)
version_arg = bounded_int("a policy version", 0, UINT64_MAX)
snapshot_id_arg = bounded_int("a snapshot id", 1, UINT64_MAX)
page_size_arg = bounded_int("a page size", 0, UINT32_MAX)


def prefix_arg(text: str) -> str:
    """A CIDR prefix argument, normalized (``10.1.0.10`` -> ``10.1.0.10/32``)."""
    try:
        return str(parse_prefix(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ports_arg(text: str) -> tuple[int, int]:
    """``22`` or ``8000-8080``."""
    try:
        return parse_ports(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def address_arg(text: str) -> str:
    """An IPv4 or IPv6 address argument."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IPv4 or IPv6 address, "
                                         f"got {text!r}") from None


def add_page_size(parser: argparse.ArgumentParser) -> None:
    """``--page-size`` of a list verb (every page is fetched either way)."""
    parser.add_argument("--page-size", type=page_size_arg, default=0, metavar="N",
                        help="items per request while paging (default: the server's)")


def add_expected_version(parser: argparse.ArgumentParser) -> None:
    """``--expected-version`` for compare-and-set writes."""
    parser.add_argument("--expected-version", type=version_arg, default=0, metavar="N",
                        help="refuse (FAILED_PRECONDITION) unless the live policy is at "
                             "version N (default: unconditional)")


def file_error(exc: policyfile.PolicyFileError) -> UsageError:
    """A policy file's problems as one usage error: vpnctl prints ``error:`` before each."""
    return UsageError("\nerror: ".join(exc.problems))


def load_file(path: str) -> policyfile.PolicyFile:
    """A policy file, or a usage error listing its problems."""
    try:
        return policyfile.load(path)
    except policyfile.PolicyFileError as exc:
        raise file_error(exc) from exc


# ----------------------------------------------------------------------- policy verbs

def cmd_policy_import(args: argparse.Namespace) -> int:
    """ReplacePolicy with the file's policy; print the new version and what changed."""
    loaded = load_file(args.file)
    reason = args.reason or f"vpnctl policy import {args.file}"
    request = policy_pb2.ReplacePolicyRequest(policy=loaded.policy, reason=reason,
                                              expected_version=args.expected_version)
    with connect(args) as client:
        reply = client.call("ReplacePolicy", request, policy_pb2.ReplaceResponse)
    data = {"file": args.file, "version": reply.version, "diff": diff_view(reply.diff)}
    lines = [f"imported {args.file}", *diff_lines(reply.diff)]
    if loaded.tests:
        lines.append(f"the file has {len(loaded.tests)} tests: "
                     f"vpnctl --instance {args.instance} policy check {args.file}")
    show(args, data, "\n".join(lines))
    return EXIT_OK


def cmd_policy_export(args: argparse.Namespace) -> int:
    """GetPolicy into a file (format by extension, or --format); ``-`` writes to stdout."""
    fmt = args.format or ("toml" if args.file == STDOUT else None)
    if fmt is None:
        try:
            fmt = policyfile.format_of(args.file)
        except ValueError as exc:
            raise UsageError(f"{exc} (or give --format)") from exc
    with connect(args) as client:
        policy = client.call("GetPolicy", policy_pb2.GetPolicyRequest(),
                             policy_pb2.PolicyDocument)
    updated = policy.updated_at.ToJsonString() if policy.HasField("updated_at") else "never"
    comment = (f"vpnr policy of instance {args.instance}, version {policy.version} "
               f"(updated {updated})\n"
               f"re-import only over this version: vpnctl --instance {args.instance} "
               f"policy import FILE --expected-version {policy.version}")
    if args.file == STDOUT:
        sys.stdout.write(policyfile.dumps(policy, fmt=fmt, comment=comment))
        sys.stdout.flush()
        return EXIT_OK
    try:
        policyfile.dump(args.file, policy, fmt=fmt, comment=comment)
    except policyfile.PolicyFileError as exc:
        raise file_error(exc) from exc
    counts = {"roles": len(policy.roles), "rules": sum(len(r.rules) for r in policy.roles),
              "bindings": len(policy.bindings), "zones": len(policy.zones)}
    show(args, {"file": args.file, "version": policy.version, **counts},
         f"wrote policy version {policy.version} to {args.file}: "
         + ", ".join(f"{count} {name}" for name, count in counts.items()))
    return EXIT_OK


def _expectation(test: policyfile.DecisionTest) -> dict[str, Any]:
    expected: dict[str, Any] = {"verdict": enum_label(codes_pb2.Verdict, test.expect)}
    if test.expect_reason is not None:
        expected["reason"] = enum_label(codes_pb2.Reason, test.expect_reason)
    if test.expect_rule is not None:
        expected["rule"] = test.expect_rule
    return expected


def run_test(client: PolicyClient,
             test: policyfile.DecisionTest) -> tuple[dict[str, Any], dict[str, Any]]:
    """One test through TestDecision: its result (JSON/YAML) and its table row."""
    expected = _expectation(test)
    result: dict[str, Any] = {"test": test.name, "expect": expected}
    try:
        decision = client.call("TestDecision", test.request(), policy_pb2.Decision)
    except RpcFailure as exc:
        if exc.code not in TEST_LEVEL_CODES:
            raise
        result.update(result="error", error=str(exc))
        return result, {"result": "ERROR", "test": test.name,
                        "expect": expected["verdict"], "detail": str(exc)}
    mismatches = test.mismatches(decision)
    view = decision_view(decision)
    result.update(result="fail" if mismatches else "pass", decision=view,
                  mismatches=mismatches)
    matched = view["matched_rule"]
    return result, {"result": "FAIL" if mismatches else "PASS", "test": test.name,
                    "expect": expected["verdict"], "verdict": view["verdict"],
                    "reason": view["reason"], "roles": view["roles"] or "-",
                    "rule": matched["id"] if matched else "-",
                    "detail": "; ".join(mismatches)}


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Run each test of the file through TestDecision; exit 1 unless all pass."""
    loaded = load_file(args.file)
    if not loaded.tests:
        raise UsageError(f"{args.file}: no tests to check (add [[tests]] entries)")
    with connect(args) as client:
        outcomes = [run_test(client, test) for test in loaded.tests]
    results = [result for result, _ in outcomes]
    counts = {kind: sum(1 for r in results if r["result"] == kind)
              for kind in ("pass", "fail", "error")}
    summary = (f"{counts['pass']} passed, {counts['fail']} failed"
               + (f", {counts['error']} errors" if counts["error"] else "")
               + f" ({args.file} against policyd of instance {args.instance})")
    show(args, {"file": args.file, "passed": counts["pass"], "failed": counts["fail"],
                "errors": counts["error"], "results": results},
         rows_text([row for _, row in outcomes], "") + "\n" + summary)
    return EXIT_OK if counts["pass"] == len(results) else EXIT_MISMATCH


def cmd_policy_test(args: argparse.Namespace) -> int:
    """TestDecision for one crafted packet; print the verdict and why."""
    request = policy_pb2.TestDecisionRequest(
        src=args.src, dst=args.dst, protocol=cast(codes_pb2.Protocol, PROTOCOLS[args.protocol]),
        src_port=args.sport or 0, dst_port=args.dport or 0, interface=args.interface,
        icmp_type=args.icmp_type or 0, fragment=args.fragment)
    with connect(args) as client:
        decision = client.call("TestDecision", request, policy_pb2.Decision)
    show(args, decision_view(decision), "\n".join(table_lines(decision_table(decision))))
    return EXIT_OK


def cmd_policy_show(args: argparse.Namespace) -> int:
    """GetPolicy, summarized: version, roles with rule counts, bindings by source, zones."""
    with connect(args) as client:
        policy = client.call("GetPolicy", policy_pb2.GetPolicyRequest(),
                             policy_pb2.PolicyDocument)
    summary = policy_summary(policy)
    show(args, summary, "\n".join(table_lines(summary)))
    return EXIT_OK


def cmd_policy_status(args: argparse.Namespace) -> int:
    """Status of policyd: version, interfaces and programs, map fill, verdict counters."""
    with connect(args) as client:
        status = client.call("Status", policy_pb2.PolicyStatusRequest(),
                             policy_pb2.PolicyStatus)
    data = to_dict(status, emit_defaults=True)
    show(args, data, "\n".join(table_lines(data)))
    return EXIT_OK


# --------------------------------------------------------------------- snapshot verbs

def cmd_snapshot_create(args: argparse.Namespace) -> int:
    """CreateSnapshot of the live policy."""
    with connect(args) as client:
        snapshot = client.call("CreateSnapshot",
                               policy_pb2.CreateSnapshotRequest(name=args.name),
                               policy_pb2.Snapshot)
    view = snapshot_view(snapshot)
    show(args, view, "\n".join(table_lines(view)))
    return EXIT_OK


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    """Every snapshot, paging through ListSnapshots."""
    with connect(args) as client:
        snapshots = client.list_all("ListSnapshots", policy_pb2.ListSnapshotsRequest(),
                                    policy_pb2.ListSnapshotsResponse, "snapshots",
                                    args.page_size)
    views = [snapshot_view(snapshot) for snapshot in snapshots]
    show(args, views, rows_text(views, "(no snapshots)"))
    return EXIT_OK


def snapshot_ref(text: str) -> int:
    """A snapshot id, or ``live`` (0) for the live policy."""
    if text == "live":
        return 0
    try:
        return int(snapshot_id_arg(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a snapshot id or 'live', "
                                         f"got {text!r}") from None


def cmd_snapshot_diff(args: argparse.Namespace) -> int:
    """DiffSnapshots between two snapshots (or the live policy)."""
    request = policy_pb2.DiffSnapshotsRequest(from_snapshot=args.source,
                                              to_snapshot=args.target)
    with connect(args) as client:
        diff = client.call("DiffSnapshots", request, policy_pb2.PolicyDiff)
    show(args, diff_view(diff), "\n".join(diff_lines(diff)))
    return EXIT_OK


def cmd_snapshot_restore(args: argparse.Namespace) -> int:
    """RestoreSnapshot: the snapshot's policy becomes the live one."""
    request = policy_pb2.RestoreSnapshotRequest(id=args.id,
                                                expected_version=args.expected_version)
    with connect(args) as client:
        reply = client.call("RestoreSnapshot", request, policy_pb2.ReplaceResponse)
    show(args, {"snapshot": args.id, "version": reply.version, "diff": diff_view(reply.diff)},
         "\n".join([f"restored snapshot {args.id}", *diff_lines(reply.diff)]))
    return EXIT_OK


def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    """DeleteSnapshot."""
    with connect(args) as client:
        reply = client.call("DeleteSnapshot", policy_pb2.DeleteSnapshotRequest(id=args.id),
                            policy_pb2.DeleteResponse)
    show(args, {"deleted": "snapshot", "id": args.id, "version": reply.version},
         f"deleted snapshot {args.id}")
    return EXIT_OK


# ----------------------------------------------------------------------- registration

CHECK_NOTES = """\
Runs every [[tests]] entry of FILE through the program attached NOW (TestDecision crafts
the packet and runs it with BPF_PROG_TEST_RUN); it does not import the file.
exit codes: 0 every test passed, 1 a test failed or errored (or policyd failed),
2 the file or the arguments are invalid"""


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register ``policy`` and ``snapshot`` with their verbs."""
    policy = add_group(commands, common, "policy",
                       "policy as code: import, export, check and test against policyd", [
                           "vpnctl policy export policy.toml",
                           "vpnctl policy check policy.toml",
                           "vpnctl policy import policy.toml --expected-version 7",
                           "vpnctl policy test --src 10.1.0.10 --dst 10.2.0.5 --dport 22"])
    verb = add_verb(policy, common, "import",
                    "replace the whole policy with a TOML/YAML file (ReplacePolicy)", [
                        "vpnctl policy import policy.toml",
                        "vpnctl policy import policy.yaml --expected-version 7 "
                        "--reason 'JIRA-42: site C'",
                        "vpnctl --instance b policy import policy.toml -o json"],
                    cmd_policy_import)
    verb.add_argument("file", metavar="FILE", help="policy file (.toml, .yaml or .yml)")
    add_expected_version(verb)
    verb.add_argument("--reason", default="", metavar="TEXT",
                      help="why, for the audit log (default: the command and file)")
    verb = add_verb(policy, common, "export",
                    "write the live policy to a TOML/YAML file (GetPolicy)", [
                        "vpnctl policy export policy.toml",
                        "vpnctl policy export policy.yaml",
                        "vpnctl policy export -                  # TOML to stdout",
                        "vpnctl policy export - --format yaml"], cmd_policy_export)
    verb.add_argument("file", metavar="FILE",
                      help="file to write (format from the extension), - for stdout")
    verb.add_argument("--format", choices=("toml", "yaml"),
                      help="file format (default: from the extension; toml for -)")
    verb = add_verb(policy, common, "check",
                    "run a file's decision tests against the live program (TestDecision)", [
                        "vpnctl policy check policy.toml",
                        "vpnctl policy check tests.yaml -o json"],
                    cmd_policy_check, notes=CHECK_NOTES)
    verb.add_argument("file", metavar="FILE", help="policy file holding [[tests]]")
    verb = add_verb(policy, common, "test",
                    "run one crafted packet through the live program and explain", [
                        "vpnctl policy test --src 10.1.0.10 --dst 10.2.0.5 --dport 22",
                        "vpnctl policy test --src 10.1.0.10 --dst 10.2.0.5 --protocol icmp",
                        "vpnctl policy test --src fd00:1::10 --dst fd00:2::5 "
                        "--protocol udp --dport 53 --interface lan0 -o yaml",
                        "vpnctl policy test --src 10.1.0.10 --dst 10.2.0.5 --fragment"],
                    cmd_policy_test)
    verb.add_argument("--src", type=address_arg, required=True, metavar="IP",
                      help="source address")
    verb.add_argument("--dst", type=address_arg, required=True, metavar="IP",
                      help="destination address")
    verb.add_argument("--protocol", choices=tuple(PROTOCOLS), default="tcp",
                      help="IP protocol (default: tcp)")
    verb.add_argument("--dport", type=port_arg, metavar="N", help="destination port")
    verb.add_argument("--sport", type=port_arg, metavar="N", help="source port")
    verb.add_argument("--icmp-type", type=icmp_type_arg, metavar="N",
                      help="ICMP/ICMPv6 type")
    verb.add_argument("--interface", default="", metavar="IF",
                      help="interface whose program runs (default: the first LAN one)")
    verb.add_argument("--fragment", action="store_true",
                      help="craft a non-first fragment (it carries no ports)")
    add_verb(policy, common, "show", "summary of the live policy (GetPolicy)", [
        "vpnctl policy show", "vpnctl --instance b policy show -o yaml"], cmd_policy_show)
    add_verb(policy, common, "status",
             "policyd's status: interfaces, programs, map fill, verdict counters", [
                 "vpnctl policy status", "vpnctl policy status -o json"], cmd_policy_status)

    snapshot = add_group(commands, common, "snapshot",
                         "named copies of the policy: create, list, diff, restore, delete", [
                             "vpnctl snapshot create before-site-c",
                             "vpnctl snapshot diff 3 live",
                             "vpnctl snapshot restore 3"])
    verb = add_verb(snapshot, common, "create", "snapshot the live policy", [
        "vpnctl snapshot create before-site-c"], cmd_snapshot_create)
    verb.add_argument("name", metavar="NAME", help="a name to recognize it by")
    verb = add_verb(snapshot, common, "list", "every snapshot", [
        "vpnctl snapshot list", "vpnctl snapshot list -o json"], cmd_snapshot_list)
    add_page_size(verb)
    verb = add_verb(snapshot, common, "diff", "what changes from one snapshot to another", [
        "vpnctl snapshot diff 3 4", "vpnctl snapshot diff 3 live   # snapshot 3 -> now",
        "vpnctl snapshot diff live 3 -o yaml"], cmd_snapshot_diff)
    verb.add_argument("source", type=snapshot_ref, metavar="FROM",
                      help="snapshot id, or 'live'")
    verb.add_argument("target", type=snapshot_ref, metavar="TO",
                      help="snapshot id, or 'live'")
    verb = add_verb(snapshot, common, "restore", "make a snapshot the live policy", [
        "vpnctl snapshot restore 3", "vpnctl snapshot restore 3 --expected-version 12"],
                    cmd_snapshot_restore)
    verb.add_argument("id", type=snapshot_id_arg, metavar="ID", help="snapshot id")
    add_expected_version(verb)
    verb = add_verb(snapshot, common, "delete", "delete a snapshot", [
        "vpnctl snapshot delete 3"], cmd_snapshot_delete)
    verb.add_argument("id", type=snapshot_id_arg, metavar="ID", help="snapshot id")
