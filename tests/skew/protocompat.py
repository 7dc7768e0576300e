"""Wire-compatibility check of two versions of the vpnr.v1 protos (docs/api.md, "Evolution").

``compile_protos`` runs grpc_tools.protoc over a proto tree into a FileDescriptorSet;
``breaking_changes`` compares an old and a new set field by field and names every change
that would break a peer one minor version away: a removed field whose number and name are
not reserved, a renumbered field, a changed type or cardinality, a reused reserved number,
a removed or renumbered enum value, a removed message, enum, service or RPC, and a changed
request/response type or streaming mode.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2

FieldProto = descriptor_pb2.FieldDescriptorProto
MessageProto = descriptor_pb2.DescriptorProto
EnumProto = descriptor_pb2.EnumDescriptorProto
PACKAGE_PREFIX = "vpnr/"  # only our files are compared, not google/protobuf/*


class ProtocError(RuntimeError):
    """protoc refused the protos; the message holds its command line."""


def compile_protos(root: Path) -> descriptor_pb2.FileDescriptorSet:
    """Every ``*.proto`` under ``root`` (the include root) compiled into one descriptor set."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = ["protoc", f"-I{root}", f"-I{well_known}", f"--descriptor_set_out={out}",
                "--include_imports", *protos]
        if protoc.main(args) != 0:
            raise ProtocError("protoc failed: " + " ".join(args))
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _reserved_numbers(message: MessageProto) -> set[int]:
    numbers: set[int] = set()
    for span in message.reserved_range:   # [start, end) in descriptors
        numbers.update(range(span.start, min(span.end, span.start + 100_000)))
    return numbers


def _enum_reserved_numbers(enum: EnumProto) -> set[int]:
    numbers: set[int] = set()
    for span in enum.reserved_range:      # [start, end] (inclusive) for enums
        numbers.update(range(span.start, min(span.end, span.start + 100_000) + 1))
    return numbers


def _walk(prefix: str, messages: Iterable[MessageProto], enums: Iterable[EnumProto]
          ) -> Iterator[tuple[str, MessageProto | EnumProto]]:
    """(full name, descriptor) of every message and enum, nested ones included."""
    for enum in enums:
        yield f"{prefix}.{enum.name}", enum
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _walk(name, message.nested_type, message.enum_type)


def _types(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, MessageProto | EnumProto]:
    found: dict[str, MessageProto | EnumProto] = {}
    for file in fds.file:
        if file.name.startswith(PACKAGE_PREFIX):
            found.update(_walk(file.package, file.message_type, file.enum_type))
    return found


def _field_shape(field: FieldProto, owner: MessageProto) -> str:
    """What a peer must agree on for a field number: type, message/enum type, cardinality
    and oneof membership (a field moving into or out of a oneof changes presence)."""
    kind = FieldProto.Type.Name(field.type)
    label = "repeated" if field.label == FieldProto.LABEL_REPEATED else "singular"
    oneof = ""
    if field.HasField("oneof_index") and not field.proto3_optional:
        oneof = f" in oneof {owner.oneof_decl[field.oneof_index].name}"
    presence = " optional" if field.proto3_optional else ""
    return f"{label}{presence} {kind} {field.type_name}{oneof}".replace("  ", " ").strip()


def _compare_message(name: str, old: MessageProto, new: MessageProto) -> list[str]:
    problems: list[str] = []
    old_by_number = {f.number: f for f in old.field}
    new_by_number = {f.number: f for f in new.field}
    new_by_name = {f.name: f for f in new.field}
    reserved_numbers = _reserved_numbers(new)
    reserved_names = set(new.reserved_name)
    for number, field in sorted(old_by_number.items()):
        moved = new_by_name.get(field.name)
        if moved is not None and moved.number != number:
            problems.append(f"{name}.{field.name}: renumbered {number} -> {moved.number}")
            continue
        current = new_by_number.get(number)
        if current is None:
            missing = []
            if number not in reserved_numbers:
                missing.append(f"number {number}")
            if field.name not in reserved_names:
                missing.append(f"name {field.name!r}")
            if missing:
                problems.append(f"{name}.{field.name} = {number}: removed without reserving "
                                + " and ".join(missing))
            continue
        if current.name != field.name:
            problems.append(f"{name} field {number}: renamed {field.name!r} -> "
                            f"{current.name!r} (breaks JSON and text clients)")
        before, after = _field_shape(field, old), _field_shape(current, new)
        if before != after:
            problems.append(f"{name}.{field.name} = {number}: type changed from {before} "
                            f"to {after}")
    old_reserved = _reserved_numbers(old)
    for number, field in sorted(new_by_number.items()):
        if number not in old_by_number and number in old_reserved:
            problems.append(f"{name}.{field.name} = {number}: reuses a reserved number")
        if number not in old_by_number and field.name in old.reserved_name:
            problems.append(f"{name}.{field.name} = {number}: reuses a reserved name")
    for number in sorted(old_reserved - reserved_numbers):
        problems.append(f"{name}: reserved number {number} is no longer reserved")
    return problems


def _compare_enum(name: str, old: EnumProto, new: EnumProto) -> list[str]:
    problems: list[str] = []
    new_by_name = {v.name: v.number for v in new.value}
    new_numbers = {v.number for v in new.value}
    reserved = _enum_reserved_numbers(new)
    for value in old.value:
        if value.name in new_by_name:
            if new_by_name[value.name] != value.number:
                problems.append(f"{name}.{value.name}: renumbered {value.number} -> "
                                f"{new_by_name[value.name]}")
        elif value.number not in new_numbers and value.number not in reserved:
            problems.append(f"{name}.{value.name} = {value.number}: removed without "
                            "reserving the number")
    if not new.value or new.value[0].number != 0:
        problems.append(f"{name}: the first value must be the zero (unspecified) value")
    return problems


def _services(fds: descriptor_pb2.FileDescriptorSet
              ) -> dict[str, descriptor_pb2.ServiceDescriptorProto]:
    return {f"{file.package}.{service.name}": service for file in fds.file
            if file.name.startswith(PACKAGE_PREFIX) for service in file.service}


def _compare_services(old: descriptor_pb2.FileDescriptorSet,
                      new: descriptor_pb2.FileDescriptorSet) -> list[str]:
    problems: list[str] = []
    new_services = _services(new)
    for name, service in sorted(_services(old).items()):
        current = new_services.get(name)
        if current is None:
            problems.append(f"service {name}: removed")
            continue
        methods = {m.name: m for m in current.method}
        for method in service.method:
            now = methods.get(method.name)
            if now is None:
                problems.append(f"rpc {name}.{method.name}: removed")
                continue
            for what, before, after in (
                    ("request type", method.input_type, now.input_type),
                    ("response type", method.output_type, now.output_type),
                    ("client streaming", method.client_streaming, now.client_streaming),
                    ("server streaming", method.server_streaming, now.server_streaming)):
                if before != after:
                    problems.append(f"rpc {name}.{method.name}: {what} changed from "
                                    f"{before} to {after}")
    return problems


def breaking_changes(old: descriptor_pb2.FileDescriptorSet,
                     new: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """Every change from ``old`` to ``new`` that breaks a peer on the other version."""
    problems: list[str] = []
    old_files = {f.name: f for f in old.file if f.name.startswith(PACKAGE_PREFIX)}
    new_files = {f.name: f for f in new.file if f.name.startswith(PACKAGE_PREFIX)}
    for name, file in sorted(old_files.items()):
        if name in new_files and new_files[name].package != file.package:
            problems.append(f"file {name}: package changed from {file.package} to "
                            f"{new_files[name].package}")
    old_types, new_types = _types(old), _types(new)
    for name, before in sorted(old_types.items()):
        after = new_types.get(name)
        if after is None:
            problems.append(f"{name}: removed")
        elif isinstance(before, MessageProto) and isinstance(after, MessageProto):
            problems.extend(_compare_message(name, before, after))
        elif isinstance(before, EnumProto) and isinstance(after, EnumProto):
            problems.extend(_compare_enum(name, before, after))
        else:
            problems.append(f"{name}: changed between message and enum")
    for name, added in sorted(new_types.items()):
        if name not in old_types and isinstance(added, EnumProto):
            problems.extend(_compare_enum(name, EnumProto(), added))
    problems.extend(_compare_services(old, new))
    return problems
