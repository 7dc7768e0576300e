"""A dynamic gRPC client built from the server's own reflection answers (what grpcurl does).

Nothing here imports the compiled stubs: services, methods and messages come from
``grpc.reflection.v1alpha`` through a :class:`ProtoReflectionDescriptorDatabase` feeding a
private :class:`DescriptorPool`, so vpnctl can talk to a daemon newer than itself.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FileDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from vpnr.vpnctl.exitcodes import EXIT_FAILURE, EXIT_UNREACHABLE, EXIT_USAGE, exit_code_of

DAEMONS = ("policyd", "tunneld", "auditd", "idpd")
SERVICE_DAEMONS = {
    "vpnr.v1.PolicyService": "policyd",
    "vpnr.v1.TunnelService": "tunneld",
    "vpnr.v1.AuditService": "auditd",
    "vpnr.v1.IdpService": "idpd",
}

Symbol = ServiceDescriptor | MethodDescriptor | Descriptor | EnumDescriptor


class VpnctlError(Exception):
    """Any failure vpnctl reports as ``error: <message>``; ``exit_code`` says how it exits."""

    exit_code = EXIT_FAILURE


class UsageError(VpnctlError):
    """The command line or the request is wrong (unknown symbol, bad JSON, ...)."""

    exit_code = EXIT_USAGE


class UnreachableError(VpnctlError):
    """No daemon that could answer can be reached."""

    exit_code = EXIT_UNREACHABLE


class ConnectError(UnreachableError):
    """A daemon's socket cannot be used; the message names the socket and why."""

    def __init__(self, daemon: str, path: Path, reason: str) -> None:
        self.daemon, self.path, self.reason = daemon, path, reason
        super().__init__(f"cannot reach {daemon} at {path}: {reason}")


class RpcFailure(VpnctlError):
    """The server answered with a non-OK status; the exit code follows the status."""

    def __init__(self, code: str, details: str) -> None:
        self.code, self.details = code, details
        self.exit_code = exit_code_of(code)
        super().__init__(f"{code}: {details}" if details else code)


def rpc_failure(exc: Any) -> RpcFailure:
    """Turn a ``grpc.RpcError`` into an :class:`RpcFailure` carrying the status code name."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return RpcFailure(code.name if code is not None else "UNKNOWN", details or "")


def socket_path(run_dir: str, instance: str, daemon: str) -> Path:
    """``<run_dir>/<instance>/<daemon>.sock``, as the daemon core creates it."""
    return Path(run_dir) / instance / f"{daemon}.sock"


# vpnctl --viewer: every daemon through its read-only viewer socket (set once by main).
VIEWER_ONLY = False


def viewer_socket(path: Path) -> Path:
    """The read-only twin ``<daemon>-viewer.sock`` of a daemon's admin socket."""
    return path.with_name(f"{path.name.removesuffix('.sock')}-viewer.sock")


def usable_socket(daemon: str, path: Path, timeout: float | None) -> Path:
    """The socket to talk to ``daemon`` through, given its admin socket ``path``: the viewer
    socket with --viewer, or when the admin socket refuses this user (a viewer) and the
    viewer socket accepts; ConnectError when neither can be used."""
    chosen = viewer_socket(path) if VIEWER_ONLY else path
    reason = probe_socket(chosen, timeout)
    if reason is not None and reason.startswith("permission denied") and not VIEWER_ONLY:
        viewer = viewer_socket(path)
        if probe_socket(viewer, timeout) is None:
            return viewer
    if reason is not None:
        raise ConnectError(daemon, chosen, reason)
    return chosen


def probe_socket(path: Path, timeout: float | None) -> str | None:
    """Why the socket cannot be used (``no socket``, ``permission denied``, ...), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no socket"
    except PermissionError:
        return "permission denied (not in the admin or viewer group?)"
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    if not stat.S_ISSOCK(mode):
        return "unavailable (not a socket)"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except PermissionError:
            return "permission denied (not in the admin or viewer group?)"
        except ConnectionRefusedError:
            return "unavailable (stale socket: nobody is listening)"
        except OSError as exc:
            return f"unavailable ({exc.strerror or exc})"
    return None


class _DeadlineChannel:
    """Gives every reflection call a deadline: the stock reflection client sets none."""

    def __init__(self, channel: Any, timeout: float | None) -> None:
        self._channel = channel
        self._timeout = timeout

    def stream_stream(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return functools.partial(self._channel.stream_stream(*args, **kwargs),
                                 timeout=self._timeout)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class DaemonClient:
    """One daemon's socket, its reflection descriptors and dynamic calls."""

    def __init__(self, daemon: str, path: Path, timeout: float | None) -> None:
        path = usable_socket(daemon, path, timeout)
        self.daemon, self.path, self.timeout = daemon, path, timeout
        self.channel = grpc.insecure_channel(f"unix:{path}")
        self.database = ProtoReflectionDescriptorDatabase(_DeadlineChannel(self.channel, timeout))
        self.pool = DescriptorPool(self.database)
        self._index: dict[str, Symbol] | None = None

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def _reflect(self, ask: Callable[[], Any]) -> Any:
        try:
            return ask()
        except grpc.RpcError as exc:
            failure = rpc_failure(exc)
            raise VpnctlError(f"reflection on {self.daemon} ({self.path}) failed: "
                              f"{failure}") from exc

    def services(self) -> list[str]:
        """Full names of the services the daemon serves, sorted."""
        return sorted(self._reflect(self.database.get_services))

    def service(self, name: str) -> ServiceDescriptor:
        """A service by full or short name."""
        return self._find_service(resolve(name, self.services(), "service"))

    def _find_service(self, full_name: str) -> ServiceDescriptor:
        found: ServiceDescriptor = self._reflect(
            functools.partial(self.pool.FindServiceByName, full_name))
        return found

    def method(self, service: str, method: str) -> MethodDescriptor:
        """``service`` (full or short) and a method name."""
        svc = self.service(service)
        found = svc.methods_by_name.get(method)
        if found is None:
            known = ", ".join(m.name for m in svc.methods)
            raise UsageError(f"service {svc.full_name} has no method {method!r} "
                             f"(methods: {known})")
        return found

    def index(self) -> dict[str, Symbol]:
        """Every service, method, message and enum reachable from the served services."""
        if self._index is None:
            files: dict[str, FileDescriptor] = {}
            for name in self.services():
                _collect_files(self._find_service(name).file, files)
            self._index = {}
            for file in files.values():
                _index_file(file, self._index)
        return self._index

    def matches(self, symbol: str) -> list[str]:
        """Full names matching a full or short symbol (``Svc.Method`` or ``Svc/Method``)."""
        return matching(symbol.replace("/", ".").lstrip("."), self.index())

    def invoke(self, method: MethodDescriptor, request: Message,
               timeout: float | None) -> Iterator[Message]:
        """Call a unary or server-streaming method; yields each response message."""
        if method.client_streaming:
            raise UsageError(f"{method.full_name} is client-streaming: vpnctl calls only "
                             "unary and server-streaming methods")
        path = f"/{method.containing_service.full_name}/{method.name}"
        response_class = GetMessageClass(method.output_type)
        try:
            if method.server_streaming:
                stream = self.channel.unary_stream(
                    path, request_serializer=_serialize,
                    response_deserializer=response_class.FromString)
                yield from stream(request, timeout=timeout)
            else:
                unary = self.channel.unary_unary(
                    path, request_serializer=_serialize,
                    response_deserializer=response_class.FromString)
                yield unary(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise rpc_failure(exc) from exc


def _collect_files(file: FileDescriptor, files: dict[str, FileDescriptor]) -> None:
    if file.name in files:
        return
    files[file.name] = file
    for dependency in file.dependencies:
        _collect_files(dependency, files)


def _index_message(message: Descriptor, index: dict[str, Symbol]) -> None:
    if message.GetOptions().map_entry:
        return
    index[message.full_name] = message
    for enum in message.enum_types:
        index[enum.full_name] = enum
    for nested in message.nested_types:
        _index_message(nested, index)


def _index_file(file: FileDescriptor, index: dict[str, Symbol]) -> None:
    for message in file.message_types_by_name.values():
        _index_message(message, index)
    for enum in file.enum_types_by_name.values():
        index[enum.full_name] = enum
    for svc in file.services_by_name.values():
        index[svc.full_name] = svc
        for method in svc.methods:
            index[method.full_name] = method


def matching(symbol: str, names: Any) -> list[str]:
    """Names equal to ``symbol`` or ending with ``.symbol`` (short names)."""
    if symbol in names:
        return [symbol]
    return sorted(name for name in names if name.endswith("." + symbol))


def resolve(symbol: str, names: Any, kind: str) -> str:
    """The one full name a full or short symbol refers to; UsageError otherwise."""
    found = matching(symbol.lstrip("."), names)
    if not found:
        raise UsageError(f"unknown {kind} {symbol!r}")
    if len(found) > 1:
        raise UsageError(f"ambiguous {kind} {symbol!r}: " + ", ".join(found))
    return found[0]


def daemons_for(symbol: str) -> list[str]:
    """The daemon serving a vpnr service named at the start of ``symbol``, else all four."""
    head = symbol.replace("/", ".").lstrip(".")
    for full, daemon in SERVICE_DAEMONS.items():
        short = full.rsplit(".", 1)[1]
        if any(head == name or head.startswith(name + ".") for name in (full, short)):
            return [daemon]
    return list(DAEMONS)


def build_request(message: Descriptor, text: str) -> Message:
    """The request message from JSON text; UsageError naming what is wrong."""
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"request is not valid JSON: {exc.msg} "
                         f"(line {exc.lineno}, column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"request must be a JSON object for {message.full_name}, "
                         f"got {type(data).__name__}")
    try:
        return json_format.ParseDict(data, GetMessageClass(message)())
    except json_format.ParseError as exc:
        problem = " ".join(str(exc).split())
        raise UsageError(f"request does not fit {message.full_name}: {problem}") from exc


def to_dict(message: Message, emit_defaults: bool = False) -> dict[str, Any]:
    """Proto3 JSON mapping with the .proto field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=emit_defaults)


def symbol_kind(symbol: Symbol) -> str:
    """``service``, ``method``, ``message`` or ``enum``."""
    if isinstance(symbol, ServiceDescriptor):
        return "service"
    if isinstance(symbol, MethodDescriptor):
        return "method"
    if isinstance(symbol, EnumDescriptor):
        return "enum"
    return "message"


def symbol_proto(symbol: Symbol) -> Message:
    """The descriptor as its ``*DescriptorProto`` (what describe shows as JSON/YAML)."""
    if isinstance(symbol, ServiceDescriptor):
        service = descriptor_pb2.ServiceDescriptorProto()
        symbol.CopyToProto(service)
        return service
    if isinstance(symbol, MethodDescriptor):
        method = descriptor_pb2.MethodDescriptorProto()
        symbol.CopyToProto(method)
        return method
    if isinstance(symbol, EnumDescriptor):
        enum = descriptor_pb2.EnumDescriptorProto()
        symbol.CopyToProto(enum)
        return enum
    message = descriptor_pb2.DescriptorProto()
    symbol.CopyToProto(message)
    return message


def _rpc_line(method: descriptor_pb2.MethodDescriptorProto) -> str:
    request = ("stream " if method.client_streaming else "") + method.input_type
    response = ("stream " if method.server_streaming else "") + method.output_type
    return f"rpc {method.name}({request}) returns ({response});"


def _field_type(field: descriptor_pb2.FieldDescriptorProto,
                maps: dict[str, descriptor_pb2.DescriptorProto]) -> str:
    if field.type_name.rsplit(".", 1)[-1] in maps and \
            field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        entry = maps[field.type_name.rsplit(".", 1)[-1]]
        key, value = (_field_type(f, {}) for f in entry.field)
        return f"map<{key}, {value}>"
    if field.type_name:
        type_name = field.type_name
    else:
        type_name = descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)[5:].lower()
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return "repeated " + type_name
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REQUIRED:
        return "required " + type_name
    return ("optional " if field.proto3_optional else "") + type_name


def _message_lines(message: descriptor_pb2.DescriptorProto, indent: str) -> list[str]:
    maps = {n.name: n for n in message.nested_type if n.options.map_entry}
    lines = [f"{indent}message {message.name} {{"]
    inner = indent + "  "
    for nested in message.nested_type:
        if not nested.options.map_entry:
            lines.extend(_message_lines(nested, inner))
    for enum in message.enum_type:
        lines.extend(_enum_lines(enum, inner))
    shown_oneofs: set[int] = set()
    for field in message.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            if field.oneof_index in shown_oneofs:
                continue
            shown_oneofs.add(field.oneof_index)
            lines.append(f"{inner}oneof {message.oneof_decl[field.oneof_index].name} {{")
            lines.extend(f"{inner}  {_field_type(f, maps)} {f.name} = {f.number};"
                         for f in message.field
                         if f.HasField("oneof_index") and f.oneof_index == field.oneof_index)
            lines.append(f"{inner}}}")
            continue
        lines.append(f"{inner}{_field_type(field, maps)} {field.name} = {field.number};")
    lines.append(f"{indent}}}")
    return lines


def _enum_lines(enum: descriptor_pb2.EnumDescriptorProto, indent: str) -> list[str]:
    values = [f"{indent}  {value.name} = {value.number};" for value in enum.value]
    return [f"{indent}enum {enum.name} {{", *values, f"{indent}}}"]


def proto_text(symbol: Symbol) -> str:
    """The symbol in .proto syntax."""
    proto = symbol_proto(symbol)
    if isinstance(proto, descriptor_pb2.ServiceDescriptorProto):
        lines = [f"service {proto.name} {{", *(f"  {_rpc_line(m)}" for m in proto.method), "}"]
    elif isinstance(proto, descriptor_pb2.MethodDescriptorProto):
        lines = [_rpc_line(proto)]
    elif isinstance(proto, descriptor_pb2.EnumDescriptorProto):
        lines = _enum_lines(proto, "")
    else:
        assert isinstance(proto, descriptor_pb2.DescriptorProto)
        lines = _message_lines(proto, "")
    return "\n".join(lines)
