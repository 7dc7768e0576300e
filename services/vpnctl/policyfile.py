"""Policy as code: a TOML or YAML file <-> a ``PolicyDocument`` plus decision tests.

The file's shape (TOML shown; YAML is the same tree)::

    [[roles]]
    name = "eng"
    description = "engineering"

      [[roles.rules]]
      id = 10
      priority = 0
      action = "allow"        # allow | deny
      protocol = "tcp"        # any | tcp | udp | icmp | icmpv6
      dst = "10.2.0.0/24"     # optional CIDR; missing or "" = any
      ports = "22"            # optional: "N" or "N-M"

    [[bindings]]
    prefix = "10.1.0.10/32"
    roles = ["eng"]

    [[zones]]
    prefix = "10.2.0.0/16"
    zone = "vpn"              # internal | vpn | external

    [[tests]]
    name = "alice ssh to site B"
    src = "10.1.0.10"
    dst = "10.2.0.5"
    protocol = "tcp"
    dst_port = 22
    expect = "allow"          # allow | deny | redirect

The format follows the extension (.toml, .yaml, .yml). Reading reports every problem with
its place (see :mod:`vpnr.vpnctl.policyfile_reader`); writing produces the same shape, so
``dumps(loads(x))`` is stable. Nothing here talks to a daemon; the only I/O is reading and
writing the file itself.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from vpnr.v1 import codes_pb2, policy_pb2
from vpnr.vpnctl.policy_terms import enum_label, format_ports
from vpnr.vpnctl.policyfile_reader import DecisionTest, PolicyFile, PolicyFileError, from_data

__all__ = ["FILE_FORMATS", "DecisionTest", "PolicyFile", "PolicyFileError", "dump", "dumps",
           "format_of", "load", "loads", "to_data"]

FILE_FORMATS = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def format_of(path: str | Path) -> str:
    """``toml`` or ``yaml`` from the file name's extension; ValueError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(f"{path}: cannot tell the format from the extension "
                         f"{suffix or '(none)'!r}: use .toml, .yaml or .yml")
    return FILE_FORMATS[suffix]


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (plain SafeLoader keeps the last silently)."""


def _mapping_without_duplicates(loader: _StrictYamlLoader,
                                node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"found the key {key!r} twice (first on line {seen[key].start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=True)


_StrictYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                  _mapping_without_duplicates)


def loads(text: str, fmt: str, source: str) -> PolicyFile:
    """Parse the text of a policy file; ``source`` names it in every message."""
    try:
        if fmt == "toml":
            data: Any = tomllib.loads(text)
        elif fmt == "yaml":
            data = yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader
        else:
            raise ValueError(f"unknown policy file format {fmt!r}")
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError([f"{source}: not valid TOML: {exc}"]) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(filter(None, (exc.context, exc.problem)))
        raise PolicyFileError([f"{source}: not valid YAML: {place}{problem}"]) from exc
    except yaml.YAMLError as exc:
        raise PolicyFileError([f"{source}: not valid YAML: {exc}"]) from exc
    return from_data(data, source, fmt)


def load(path: str | Path, fmt: str | None = None) -> PolicyFile:
    """Read a policy file; the format comes from the extension unless given."""
    try:
        chosen = fmt or format_of(path)
    except ValueError as exc:
        raise PolicyFileError([str(exc)]) from exc
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyFileError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise PolicyFileError([f"{path}: not UTF-8 text: {exc.reason} at byte "
                               f"{exc.start}"]) from exc
    return loads(text, chosen, str(path))


# ----------------------------------------------------------------------------- writing

def rule_data(rule: policy_pb2.Rule) -> dict[str, Any]:
    """One rule in the file's shape (the owning role is implied by where it sits)."""
    data: dict[str, Any] = {"id": rule.id, "priority": rule.priority,
                            "action": enum_label(policy_pb2.Action, rule.action),
                            "protocol": enum_label(codes_pb2.Protocol, rule.protocol)}
    optional = {"src": rule.src_prefix, "dst": rule.dst_prefix,
                "ports": format_ports(rule.dst_port_from, rule.dst_port_to),
                "description": rule.description}
    data.update({key: value for key, value in optional.items() if value})
    return data


def role_data(role: policy_pb2.Role) -> dict[str, Any]:
    """One role in the file's shape (its kernel index is policyd's business, not the file's)."""
    data: dict[str, Any] = {"name": role.name}
    if role.description:
        data["description"] = role.description
    if role.rules:
        data["rules"] = [rule_data(rule) for rule in role.rules]
    return data


def binding_data(binding: policy_pb2.Binding) -> dict[str, Any]:
    """One binding in the file's shape."""
    data: dict[str, Any] = {"prefix": binding.prefix, "roles": list(binding.roles)}
    for key in ("subject", "source"):
        if getattr(binding, key):
            data[key] = getattr(binding, key)
    if binding.HasField("expires_at"):
        data["expires_at"] = binding.expires_at.ToJsonString()
    return data


def zone_data(zone: policy_pb2.ZoneAssignment) -> dict[str, Any]:
    """One zone assignment in the file's shape."""
    data: dict[str, Any] = {"prefix": zone.prefix,
                            "zone": enum_label(codes_pb2.Zone, zone.zone)}
    if zone.description:
        data["description"] = zone.description
    return data


def decision_test_data(test: DecisionTest) -> dict[str, Any]:
    """One decision test in the file's shape; defaults are left out."""
    data: dict[str, Any] = {"name": test.name, "src": test.src, "dst": test.dst,
                            "protocol": enum_label(codes_pb2.Protocol, test.protocol)}
    for key in ("dst_port", "src_port", "icmp_type", "interface", "fragment"):
        if getattr(test, key):
            data[key] = getattr(test, key)
    data["expect"] = enum_label(codes_pb2.Verdict, test.expect)
    if test.expect_reason is not None:
        data["expect_reason"] = enum_label(codes_pb2.Reason, test.expect_reason)
    if test.expect_rule is not None:
        data["expect_rule"] = test.expect_rule
    return data


def to_data(policy: policy_pb2.PolicyDocument,
            tests: Sequence[DecisionTest] = ()) -> dict[str, list[dict[str, Any]]]:
    """The whole file as plain data, sections in file order; empty sections left out."""
    sections = {"roles": [role_data(role) for role in policy.roles],
                "bindings": [binding_data(binding) for binding in policy.bindings],
                "zones": [zone_data(zone) for zone in policy.zones],
                "tests": [decision_test_data(test) for test in tests]}
    return {key: items for key, items in sections.items() if items}


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """A TOML basic string (TOML 1.0 "String": escape quote, backslash and controls)."""
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def _toml_table(path: str, table: Mapping[str, Any], indent: str) -> list[str]:
    """``[[path]]`` with its plain keys, then its nested arrays of tables, indented."""
    lines = [f"{indent}[[{path}]]"]
    nested = {key: value for key, value in table.items()
              if isinstance(value, list) and value and isinstance(value[0], dict)}
    lines.extend(f"{indent}{_toml_key(key)} = {_toml_value(value)}"
                 for key, value in table.items() if key not in nested)
    for key, items in nested.items():
        for item in items:
            lines.append("")
            lines.extend(_toml_table(f"{path}.{_toml_key(key)}", item, indent + "  "))
    return lines


def _comment_lines(comment: str) -> list[str]:
    return [f"# {line}".rstrip() for line in comment.splitlines()]


def dumps(policy: policy_pb2.PolicyDocument, tests: Sequence[DecisionTest] = (),
          fmt: str = "toml", comment: str = "") -> str:
    """The text of a policy file; ``comment`` (any lines) goes on top as ``#`` comments."""
    data = to_data(policy, tests)
    header = _comment_lines(comment)
    if fmt == "toml":
        blocks = ["\n".join(_toml_table(key, table, ""))
                  for key, tables in data.items() for table in tables]
        body = "\n\n".join(blocks)
    elif fmt == "yaml":
        body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False,
                              allow_unicode=True, width=100).rstrip("\n") if data else "{}"
    else:
        raise ValueError(f"unknown policy file format {fmt!r}")
    text = "\n".join([*header, *([""] if header and body else []), body]).strip("\n")
    return text + "\n" if text else ""


def _mode_for(target: Path) -> int:
    """The replaced file's permission bits, or 0666 less the umask for a new file."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it; put it back at once
        os.umask(umask)
        return 0o666 & ~umask


def dump(path: str | Path, policy: policy_pb2.PolicyDocument,
         tests: Sequence[DecisionTest] = (), fmt: str | None = None,
         comment: str = "") -> None:
    """Write a policy file atomically (a reader never sees half a file); the format comes
    from the extension unless given."""
    try:
        chosen = fmt or format_of(path)
    except ValueError as exc:
        raise PolicyFileError([str(exc)]) from exc
    text = dumps(policy, tests, chosen, comment)
    target = Path(path)
    try:
        mode = _mode_for(target)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                             suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            # mkstemp makes 0600: give the file the mode an ordinary write would have.
            os.chmod(temporary, mode)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise PolicyFileError([f"{path}: cannot write: {exc.strerror or exc}"]) from exc
