"""vpnctl: grpcurl-style admin client for the vpnr daemons on their Unix sockets.

``list``, ``describe`` and ``call`` work from server reflection only; ``status`` and
``health`` are friendly verbs over the four daemons of one router instance; ``policy``,
``snapshot``, ``role``, ``rule``, ``binding`` and ``zone`` speak to policyd (registered from
:mod:`vpnr.vpnctl.policy_verbs` and :mod:`vpnr.vpnctl.policy_object_verbs`); ``audit`` speaks
to auditd (registered from :mod:`vpnr.vpnctl.audit_verbs`); ``idp`` speaks to idpd
(registered from :mod:`vpnr.vpnctl.idp_verbs`).
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vpnr.vpnctl import (
    audit_verbs,
    completion,
    idp_verbs,
    policy_object_verbs,
    policy_verbs,
    reflection,
    tunnel_verbs,
)
from vpnr.vpnctl.commandline import (
    DEFAULT_TIMEOUT,
    Handler,
    call_timeout,
    emit,
    examples_epilog,
)
from vpnr.vpnctl.exitcodes import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPE,
    EXIT_USAGE,
    exit_codes_text,
)
from vpnr.vpnctl.output import (
    FORMATS,
    columns,
    human_duration,
    listing_text,
    render,
    render_stream_item,
    status_details,
)
from vpnr.vpnctl.reflection import (
    DAEMONS,
    SERVICE_DAEMONS,
    ConnectError,
    DaemonClient,
    UnreachableError,
    UsageError,
    VpnctlError,
    build_request,
    daemons_for,
    proto_text,
    rpc_failure,
    socket_path,
    symbol_kind,
    symbol_proto,
    to_dict,
)

DAEMON_SERVICES = {daemon: service for service, daemon in SERVICE_DAEMONS.items()}

EPILOG = exit_codes_text() + """
Errors print "error: CODE: message" (the gRPC status) or name the socket and why.

environment: VPNR_INSTANCE and VPNR_RUN_DIR set the defaults of --instance and --run-dir.

examples:
  vpnctl list                                    # services of the four daemons of instance "a"
  vpnctl list AuditService                       # methods of one service
  vpnctl describe vpnr.v1.AuditService.Record    # a service, method or message as .proto
  vpnctl describe RecordRequest
  vpnctl call AuditService/Record -d '{"event": {"daemon": "ops", "action": "note.add"}}'
  vpnctl call vpnr.v1.PolicyService/ListRoles -d @query.json -o yaml
  echo '{}' | vpnctl call IdpService/Status -d -
  vpnctl call grpc.health.v1.Health/Check --daemon auditd
  vpnctl call AuditService/Follow --timeout 0    # stream until interrupted
  vpnctl --instance b status -o json
  vpnctl health tunneld
  vpnctl policy export policy.toml               # policy as code (see vpnctl policy --help)
  vpnctl policy check policy.toml                # the file's tests against the live program
  vpnctl policy import policy.toml --expected-version 7
  vpnctl policy test --src 10.1.0.10 --dst 10.2.0.5 --dport 22
  vpnctl rule list --role eng
  vpnctl snapshot create before-change
  vpnctl audit events --since 15m --verdict deny # the audit log (see vpnctl audit --help)
  vpnctl audit events --follow --role eng
  vpnctl idp status                              # the IdP link of idpd (see vpnctl idp --help)
  vpnctl idp sync --confirm 7f3c2a               # apply a sync held by the deletion guard
  vpnctl idp login --address 10.1.0.10           # device-grant sign-in bound to an address
  vpnctl tunnel status                           # tunneld (see vpnctl peer --help)
  vpnctl peer list -o yaml
  source <(vpnctl completion bash)               # completion (also zsh, fish)
  vpnctl session rotate site-b
"""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _common_options(with_defaults: bool, environ: Mapping[str, str]
                    ) -> argparse.ArgumentParser:
    """Options accepted before and after the command (only the top level sets defaults)."""

    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--instance", metavar="NAME",
                        default=default(environ.get("VPNR_INSTANCE", "a")),
                        help="router instance (default: $VPNR_INSTANCE or 'a')")
    parser.add_argument("--run-dir", metavar="DIR",
                        default=default(environ.get("VPNR_RUN_DIR", "/run/vpnr")),
                        help="parent of the instance socket directory "
                             "(default: $VPNR_RUN_DIR or /run/vpnr)")
    parser.add_argument("-o", "--output", choices=FORMATS, default=default("table"),
                        help="output format (default: table)")
    parser.add_argument("--viewer", action="store_true", default=default(False),
                        help="use the read-only viewer sockets (default: the admin socket, "
                             "the viewer socket when the admin socket refuses you)")
    parser.add_argument("--timeout", type=_seconds, metavar="SECONDS", default=default(None),
                        help=f"deadline of each call (default {DEFAULT_TIMEOUT:g}; "
                             "server-streaming calls have none unless given; 0: none)")
    return parser


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None
               ) -> argparse.Namespace:
    """Parse vpnctl's command line; exits 2 (argparse) on usage errors. ``environ``
    (default: the process environment) supplies VPNR_INSTANCE and VPNR_RUN_DIR."""
    return build_parser(environ).parse_args(argv)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """vpnctl's whole parser tree (completion and docs/vpnctl.md are generated from it)."""
    environ = os.environ if environ is None else environ
    common = _common_options(with_defaults=False, environ=environ)
    parser = argparse.ArgumentParser(
        prog="vpnctl", parents=[_common_options(with_defaults=True, environ=environ)],
        description="Admin client for the vpnr daemons (policyd, tunneld, auditd, idpd), "
                    "grpcurl-style: list, describe and call work from server reflection.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help_text,
                                   description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    def daemon_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--daemon", choices=DAEMONS,
                         help="daemon to ask (default: the one serving the service)")

    listing = command("list", "list the services of every daemon, or one service's methods")
    listing.add_argument("service", nargs="?", metavar="SERVICE",
                         help="full or short service name, e.g. PolicyService")
    daemon_option(listing)
    describe = command("describe", "show a service, method, message or enum in .proto syntax")
    describe.add_argument("symbol", metavar="SYMBOL",
                          help="full or short name, e.g. vpnr.v1.AuditService.Record")
    daemon_option(describe)
    call = command("call", "call a unary or server-streaming method with a JSON request")
    call.add_argument("method", metavar="SERVICE/METHOD",
                      help="e.g. vpnr.v1.AuditService/Record or AuditService/Record")
    call.add_argument("-d", "--data", default="{}", metavar="JSON",
                      help="request as JSON, @FILE to read a file, - to read stdin "
                           "(default: {})")
    call.add_argument("--emit-defaults", action="store_true",
                      help="also print fields that hold their default value")
    daemon_option(call)
    command("status", "up/down, version, uptime and key facts of the four daemons")
    health = command("health", "grpc.health.v1 Check of one or all daemons")
    shells = commands.add_parser(
        "completion", parents=[common], help="print a shell completion script",
        description="print a completion script for bash, zsh or fish",
        epilog=examples_epilog(COMPLETION_EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    shells.add_argument("shell", choices=completion.SHELLS, metavar="SHELL",
                        help="one of " + ", ".join(completion.SHELLS))
    health.add_argument("daemon", nargs="?", choices=DAEMONS, metavar="DAEMON",
                        help="one of " + ", ".join(DAEMONS) + " (default: all)")
    health.add_argument("--service", default="",
                        help="service whose health to check (default: the whole server)")
    policy_verbs.add_commands(commands, common)
    policy_object_verbs.add_commands(commands, common)
    audit_verbs.add_commands(commands, common)
    idp_verbs.add_commands(commands, common)
    tunnel_verbs.add_commands(commands, common)
    return parser


def open_client(args: argparse.Namespace, daemon: str) -> DaemonClient:
    """A reflection client on one daemon's socket (ConnectError when unusable)."""
    path = socket_path(args.run_dir, args.instance, daemon)
    return DaemonClient(daemon, path, args.timeout or DEFAULT_TIMEOUT)


def locate(args: argparse.Namespace, symbol: str) -> tuple[DaemonClient, str]:
    """An open client on a daemon that knows ``symbol``, and the symbol's full name."""
    candidates = [args.daemon] if args.daemon else daemons_for(symbol)
    down: list[ConnectError] = []
    clients: list[DaemonClient] = []
    found: dict[str, DaemonClient] = {}
    chosen: DaemonClient | None = None
    try:
        for daemon in candidates:
            try:
                client = open_client(args, daemon)
            except ConnectError as exc:
                down.append(exc)
                continue
            clients.append(client)
            for name in client.matches(symbol):
                found.setdefault(name, client)
        if len(found) == 1:
            chosen = next(iter(found.values()))
            return chosen, next(iter(found))
    finally:
        for client in clients:
            if client is not chosen:
                client.close()
    if found:
        raise UsageError(f"ambiguous symbol {symbol!r}: " + ", ".join(sorted(found)))
    if not clients:
        if len(down) == 1:
            raise down[0]
        raise UnreachableError("no daemon is reachable: " + "; ".join(str(exc) for exc in down))
    asked = ", ".join(client.daemon for client in clients)
    raise UsageError(f"unknown symbol {symbol!r} (asked {asked})")


def cmd_list(args: argparse.Namespace) -> int:
    """Services of every daemon, or the methods of one service."""
    if args.service:
        client, full = locate(args, args.service)
        with client:
            symbol = client.index()[full]
            if symbol_kind(symbol) != "service":
                raise UsageError(f"{full} is a {symbol_kind(symbol)}, not a service")
            service = client.service(full)
            methods = [{"method": m.full_name, "request": m.input_type.full_name,
                        "response": m.output_type.full_name,
                        "streaming": "server" if m.server_streaming else ""}
                       for m in service.methods]
        emit(render({"service": full, "daemon": client.daemon, "methods": methods},
                    args.output))
        return EXIT_OK
    listing: dict[str, dict[str, Any]] = {}
    for daemon in DAEMONS:
        path = socket_path(args.run_dir, args.instance, daemon)
        try:
            with open_client(args, daemon) as client:
                listing[daemon] = {"state": "up", "socket": str(path),
                                   "services": client.services()}
        except VpnctlError as exc:
            reason = exc.reason if isinstance(exc, ConnectError) else str(exc)
            listing[daemon] = {"state": "down", "socket": str(path), "reason": reason}
    emit(listing_text(listing) if args.output == "table" else render(listing, args.output))
    up = any(entry["state"] == "up" for entry in listing.values())
    return EXIT_OK if up else EXIT_FAILURE


def cmd_describe(args: argparse.Namespace) -> int:
    """A symbol in .proto syntax (table) or as its descriptor proto (json/yaml)."""
    client, full = locate(args, args.symbol)
    with client:
        symbol = client.index()[full]
        kind = symbol_kind(symbol)
        if args.output == "table":
            article = "an" if kind[0] in "aeiou" else "a"
            emit(f"// {full} is {article} {kind} (from {client.daemon})\n{proto_text(symbol)}")
        else:
            emit(render({"symbol": full, "kind": kind, "daemon": client.daemon,
                         "descriptor": to_dict(symbol_proto(symbol))}, args.output))
    return EXIT_OK


def read_request_text(data: str) -> str:
    """The -d argument: inline JSON, @FILE or - for stdin."""
    if data == "-":
        return sys.stdin.read()
    if data.startswith("@"):
        try:
            return Path(data[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read request file {data[1:]}: "
                             f"{exc.strerror or exc}") from exc
    return str(data)


def cmd_call(args: argparse.Namespace) -> int:
    """Build the request from JSON via reflection, call, print each response."""
    target = args.method.lstrip(".")
    service, sep, method_name = target.partition("/") if "/" in target else \
        target.rpartition(".")
    if not sep or not service or not method_name:
        raise UsageError(f"expected SERVICE/METHOD, got {args.method!r}")
    daemon = args.daemon
    if daemon is None:
        candidates = daemons_for(service)
        if len(candidates) != 1:
            raise UsageError(f"{service} is not a vpnr service: name the daemon to ask with "
                             f"--daemon ({', '.join(DAEMONS)})")
        daemon = candidates[0]
    text = read_request_text(args.data)
    with open_client(args, daemon) as client:
        method = client.method(service, method_name)
        request = build_request(method.input_type, text)
        timeout = call_timeout(args, method.server_streaming)
        for count, reply in enumerate(client.invoke(method, request, timeout)):
            data = to_dict(reply, args.emit_defaults)
            if method.server_streaming:
                emit(render_stream_item(data, args.output, first=count == 0))
            else:
                emit(render(data, args.output))
    return EXIT_OK


def _policyd_facts(status: dict[str, Any]) -> dict[str, Any]:
    facts = {"policy_version": int(status.get("policy_version", 0)),
             "interfaces": [{key: interface.get(key) for key in
                             ("name", "program_id", "attach_mode", "attached")}
                            for interface in status.get("interfaces", [])]}
    failure = status.get("build_failure") or {}
    if failure.get("log_path"):  # an upgrade the verifier refused: where its log is
        facts["build_rejected_log"] = failure["log_path"]
    return facts


def _tunneld_facts(status: dict[str, Any]) -> dict[str, Any]:
    return {key: status.get(key) for key in
            ("datapath_mode", "public_key", "listen_port", "peers", "sessions")}


def _auditd_facts(status: dict[str, Any]) -> dict[str, Any]:
    return {"database": status.get("database"), "records": int(status.get("records", 0))}


def _idpd_facts(status: dict[str, Any]) -> dict[str, Any]:
    facts = {key: status.get(key) for key in ("issuer", "discovery_ok")}
    if status.get("discovery_error"):
        facts["discovery_error"] = status["discovery_error"]
    return facts


STATUS_FACTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "policyd": _policyd_facts, "tunneld": _tunneld_facts,
    "auditd": _auditd_facts, "idpd": _idpd_facts,
}


def daemon_status(args: argparse.Namespace, daemon: str) -> dict[str, Any]:
    """One daemon's Status answer boiled down to up/down, version, uptime and key facts."""
    path = socket_path(args.run_dir, args.instance, daemon)
    try:
        with open_client(args, daemon) as client:
            method = client.method(DAEMON_SERVICES[daemon], "Status")
            request = build_request(method.input_type, "{}")
            reply = next(client.invoke(method, request, call_timeout(args, False)))
    except ConnectError as exc:
        return {"state": "down", "reason": exc.reason, "socket": str(path)}
    except VpnctlError as exc:
        return {"state": "down", "reason": f"Status failed: {exc}", "socket": str(path)}
    status = to_dict(reply, emit_defaults=True)
    info = status.get("daemon", {})
    entry: dict[str, Any] = {
        "state": "up", "version": info.get("version", ""), "pid": info.get("pid", 0),
        "uptime_seconds": round(float(info.get("uptime_seconds", 0.0)), 3),
        **STATUS_FACTS[daemon](status), "socket": str(path)}
    warnings = [f"{w.get('code', '')}: {w.get('message', '')}"
                for w in status.get("warnings", [])]
    if warnings:
        entry["warnings"] = warnings
    return entry


def cmd_status(args: argparse.Namespace) -> int:
    """The four daemons of the instance; exit 1 when any is down."""
    daemons = {daemon: daemon_status(args, daemon) for daemon in DAEMONS}
    if args.output == "table":
        rows = [{"daemon": daemon, "state": entry["state"],
                 "version": entry.get("version", ""),
                 "uptime": human_duration(entry["uptime_seconds"]) if "uptime_seconds"
                 in entry else "", "details": status_details(entry)}
                for daemon, entry in daemons.items()]
        emit("\n".join([f"instance {args.instance} ({args.run_dir})", *columns(rows)]))
    else:
        emit(render({"instance": args.instance, "run_dir": args.run_dir, "daemons": daemons},
                    args.output))
    return EXIT_OK if all(e["state"] == "up" for e in daemons.values()) else EXIT_FAILURE


def cmd_health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check; exit 1 unless every asked daemon is SERVING."""
    results: dict[str, dict[str, str]] = {}
    for daemon in [args.daemon] if args.daemon else DAEMONS:
        path = socket_path(args.run_dir, args.instance, daemon)
        try:
            with open_client(args, daemon) as client:
                stub = health_pb2_grpc.HealthStub(client.channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                                   timeout=call_timeout(args, False))
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            results[daemon] = {"status": str(status), "socket": str(path)}
        except ConnectError as exc:
            results[daemon] = {"status": "DOWN", "reason": exc.reason, "socket": str(path)}
        except grpc.RpcError as exc:
            failure = rpc_failure(exc)
            results[daemon] = {"status": "ERROR", "reason": str(failure), "socket": str(path)}
    if args.output == "table":
        emit("\n".join(columns([{"daemon": daemon, **entry}
                                for daemon, entry in results.items()])))
    else:
        emit(render(results, args.output))
    serving = all(entry["status"] == "SERVING" for entry in results.values())
    return EXIT_OK if serving else EXIT_FAILURE


COMPLETION_EXAMPLES = (
    "vpnctl completion bash > /etc/bash_completion.d/vpnctl",
    "source <(vpnctl completion bash)               # this bash only",
    "vpnctl completion zsh > \"${fpath[1]}/_vpnctl\"   # then: autoload -U compinit; compinit",
    "vpnctl completion fish > ~/.config/fish/completions/vpnctl.fish",
)


def cmd_completion(args: argparse.Namespace) -> int:
    """The completion script of one shell, generated from the parser tree."""
    emit(completion.script(args.shell, build_parser()))
    return EXIT_OK


COMMANDS: dict[str, Handler] = {
    "list": cmd_list, "describe": cmd_describe, "call": cmd_call,
    "status": cmd_status, "health": cmd_health, "completion": cmd_completion,
}


def _reader_gone(stream: TextIO) -> bool:
    """True when ``stream`` is a pipe or socket whose reading end is closed."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a real file (io.UnsupportedOperation is both)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _output_closed(exc: BrokenPipeError) -> int:
    """``vpnctl ... | head -1``: the reader left. Stop quietly with EXIT_PIPE, as a command
    killed by SIGPIPE would; the streams point at /dev/null so that the interpreter's last
    flush cannot fail either. A broken pipe that is not our output is a bug: re-raised."""
    gone = [stream for stream in (sys.stdout, sys.stderr) if _reader_gone(stream)]
    if not gone:
        raise exc
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in gone:
            os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
    return EXIT_PIPE


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (EXIT_USAGE if exc.code else EXIT_OK)
    reflection.VIEWER_ONLY = args.viewer
    # Verb groups (policy, role, ...) name their handler on the parsed arguments.
    handler = COMMANDS.get(args.command) or args.handler
    try:
        return handler(args)
    except VpnctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (see --help)."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except BrokenPipeError as exc:
        return _output_closed(exc)
