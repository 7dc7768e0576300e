"""The Python struct layouts in vpnr.policyd.layout match the C structs in bpf/lib/*.h.

The C side is measured by the compiler, not parsed from the headers: a host program that
includes the headers prints sizeof and offsetof of every field, and the #define values that
layout.py mirrors. The Python formats use "=" (no automatic alignment), so a field the C
compiler aligns differently shows up here as an offset or size mismatch.
"""

from __future__ import annotations

import math
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vpnr.policyd import layout

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"

# Per struct, the C fields that the Python format's values map to, in order. "name[n]" (or
# "name[n][m]") takes n (n * m) format values: the elements of an array item like "4I", or
# the bytes of a byte string like "16s". Fields the format covers with pad bytes ("x") are
# left out. An explicit list, rather than one derived from the compiler, is what lets the
# test notice a format value landing on the wrong field.
FIELDS: dict[str, list[str]] = {
    "vpnr_stats_key": ["ifindex", "verdict", "reason", "ip_version", "ip_protocol"],
    "vpnr_counter": ["packets", "bytes"],
    "vpnr_traffic": ["packets[2][2]", "bytes[2][2]"],
    "vpnr_settings": ["build_id[32]", "reserved0", "reserved1", "reserved2"],
    "vpnr_config": [
        "flags", "allow_sample_n", "audit_rate", "audit_burst", "tunnel_port", "reserved0",
        "reserved1",
    ],
    "vpnr_iface": ["zone"],
    "vpnr_lpm4_key": ["prefixlen", "slot", "addr[4]"],
    "vpnr_lpm6_key": ["prefixlen", "slot", "addr[16]"],
    "vpnr_binding": ["binding_id", "roleset_id"],
    "vpnr_roleset": ["count", f"roles[{layout.MAX_ROLES_PER_EVENT}]", "reserved"],
    "vpnr_bucket_key": ["roleset", "dport", "proto", "kind"],
    "vpnr_bucket": ["start", "count"],
    "vpnr_rule": [
        "src_net[4]", "src_mask[4]", "dst_net[4]", "dst_mask[4]", "rule_id", "role_id",
        "port_from", "port_to", "action", "flags", "reserved",
    ],
    "vpnr_audit_bucket": ["tokens", "last_ns"],
    "vpnr_trace": [
        "magic", "verdict", "reason", "src_zone", "dst_zone", "rule_id", "binding_id",
        "roleset_id", "rule_role", "flags", "reserved", "active",
    ],
    "vpnr_audit_event": [
        "ktime_ns", "policy_version", "src[16]", "dst[16]", "ifindex", "rule_id", "binding_id",
        "roleset_id", "pkt_len", "src_port", "dst_port", "rule_role",
        f"roles[{layout.MAX_ROLES_PER_EVENT}]", "role_count", "ip_version", "ip_protocol",
        "verdict", "reason", "src_zone", "dst_zone", "source", "event_version", "flags",
        "icmp_type",
    ],
    "vpnr_tunnel_settings": ["flags", "handshake_rate", "handshake_burst", "reserved"],
}

# Every int constant in layout.py mirrors the C #define VPNR_<NAME>: found by type, so a
# constant added to layout.py is checked without touching this test.
CONSTANTS: dict[str, int] = {
    name: value
    for name, value in vars(layout).items()
    if name.isupper() and type(value) is int
}

# The headers on the host: kernel UAPI types, bcc's map macros expanding to nothing (no
# map is created, only types measured). glibc defines __always_inline too, hence the #undef.
PROLOGUE = """\
#include <stddef.h>
#include <stdio.h>
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#define bpf_ntohs(x) __builtin_bswap16(x)
#undef __always_inline
#define __always_inline inline
#define BPF_TABLE_PINNED(...)
#define BPF_TABLE(...)
#define BPF_F_TABLE(...)
#define BPF_ARRAY(...)
#define BPF_PROG_ARRAY(...)
#define BPF_PERCPU_ARRAY(...)
#define VPNR_PIN_DIR "/x"

#include "lib/codes.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/trace.h"

int main(void)
{
"""

_FIELD = re.compile(r"(\w+)((?:\[\d+\])*)")
_FORMAT_ITEM = re.compile(r"\s*(\d*)([xcbB?hHiIlLqQnNefdspP])\s*")


def parse_field(spec: str) -> tuple[str, int]:
    """Split a FIELDS entry like ``"packets[2][2]"`` into the C name and its value count."""
    match = _FIELD.fullmatch(spec)
    assert match, f"bad field spec {spec!r}"
    dims = [int(d) for d in re.findall(r"\d+", match.group(2))]
    return match.group(1), math.prod(dims)


def format_values(fmt: str) -> list[tuple[int, int]]:
    """(offset, size) of each value of a struct format, one per array element or byte.

    Offsets come from ``struct.calcsize`` of the format's prefixes, so they are exactly
    where ``struct`` packs and unpacks; pad bytes take space but yield no value.
    """
    order, body = fmt[:1], fmt[1:]
    # Native alignment ("@" or none) would follow the host ABI and hide the mismatches
    # this test is for; the layouts are all declared with an explicit "=".
    assert order in {"=", "<", ">", "!"}, f"format {fmt!r} lacks an explicit byte order"
    values: list[tuple[int, int]] = []
    prefix = order
    pos = 0
    while pos < len(body):
        item = _FORMAT_ITEM.match(body, pos)
        assert item, f"cannot parse {body[pos:]!r} in format {fmt!r}"
        pos = item.end()
        count, code = int(item.group(1) or 1), item.group(2)
        start = struct.calcsize(prefix)
        prefix += f"{count}{code}"
        if code == "x":
            continue
        unit = struct.calcsize(order + code)  # 1 for "s" and "p": one value per byte
        values.extend((start + i * unit, unit) for i in range(count))
    assert struct.calcsize(prefix) == struct.calcsize(fmt)  # the walk covered the format
    return values


def python_layout(name: str) -> dict[str, tuple[int, int]]:
    """{field: (offset, size)} of a struct as its Python format lays it out, plus sizeof."""
    fmt = layout.C_STRUCTS[name].format
    values = format_values(fmt)
    result = {"sizeof": (0, struct.calcsize(fmt))}
    taken = 0
    for spec in FIELDS[name]:
        c_name, count = parse_field(spec)
        mine = values[taken:taken + count]
        assert len(mine) == count, f"{name}: format {fmt!r} runs out of values at {c_name}"
        # From the first value's start to the last one's end: pad inside a field widens it.
        first_offset = mine[0][0]
        last_offset, last_size = mine[-1]
        result[c_name] = (first_offset, last_offset + last_size - first_offset)
        taken += count
    assert taken == len(values), (
        f"{name}: FIELDS names {taken} values, format {fmt!r} has {len(values)}"
    )
    return result


@dataclass
class CLayout:
    """What the compiler says: struct sizes, field (offset, size), #define values."""

    sizes: dict[str, int] = field(default_factory=dict)
    fields: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    constants: dict[str, int] = field(default_factory=dict)
    undefined: set[str] = field(default_factory=set)

    def struct_layout(self, name: str) -> dict[str, tuple[int, int]]:
        """{field: (offset, size)} plus sizeof, shaped like python_layout's answer."""
        return {"sizeof": (0, self.sizes[name]), **self.fields.get(name, {})}


def c_program() -> str:
    """The host C program printing the layout of every listed struct and each constant."""
    lines = [PROLOGUE]
    for name in layout.C_STRUCTS:
        lines.append(f'\tprintf("S {name} %zu\\n", sizeof(struct {name}));')
        for spec in FIELDS.get(name, []):
            c_name, _ = parse_field(spec)
            member = f"((struct {name} *)0)->{c_name}"
            lines.append(
                f'\tprintf("F {name} {c_name} %zu %zu\\n", '
                f"offsetof(struct {name}, {c_name}), sizeof({member}));"
            )
    # #ifdef so a constant missing from C fails its own test instead of the whole build.
    for const in CONSTANTS:
        lines += [
            f"#ifdef VPNR_{const}",
            f'\tprintf("C {const} %lld\\n", (long long)(VPNR_{const}));',
            "#else",
            f'\tprintf("U {const}\\n");',
            "#endif",
        ]
    lines.append("\treturn 0;\n}\n")
    return "\n".join(lines)


def parse_output(out: str) -> CLayout:
    """Read the program's S/F/C/U lines into a CLayout."""
    result = CLayout()
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "S":
            result.sizes[rest[0]] = int(rest[1])
        elif kind == "F":
            result.fields.setdefault(rest[0], {})[rest[1]] = (int(rest[2]), int(rest[3]))
        elif kind == "C":
            result.constants[rest[0]] = int(rest[1])
        else:
            result.undefined.add(rest[0])
    return result


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> CLayout:
    """Compile and run the layout program once for the module."""
    tmp = tmp_path_factory.mktemp("layout")
    source, binary = tmp / "layout.c", tmp / "layout"
    source.write_text(c_program())
    build = subprocess.run(
        # policy.h declares accessors only the entry files define; this program never
        # calls them, so the warning about them would only bury a real error.
        [
            "clang", "-Wno-unused", "-Wno-undefined-internal", "-I", str(BPF_DIR),
            "-o", str(binary), str(source),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert build.returncode == 0, f"clang failed on {source}:\n{build.stderr}"
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return parse_output(run.stdout)


def test_every_struct_has_a_field_list() -> None:
    # A struct added to C_STRUCTS without a field list would be checked for size only.
    assert set(FIELDS) == set(layout.C_STRUCTS)


def test_constants_are_found() -> None:
    # Guards the discovery: an empty CONSTANTS would make the constant tests vacuous.
    assert {"MAX_ROLES", "BUCKET_NOPORT", "AUDIT_LOST_MAX", "TRACE_MAGIC"} <= set(CONSTANTS)


@pytest.mark.parametrize("name", sorted(layout.C_STRUCTS))
def test_struct_layout(name: str, c_layout: CLayout) -> None:
    assert name in FIELDS, f"no field list for struct {name} in FIELDS"
    python, c = python_layout(name), c_layout.struct_layout(name)
    assert python == c, f"struct {name}: (offset, size) per field, Python format vs C"


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constant(name: str, c_layout: CLayout) -> None:
    assert name not in c_layout.undefined, f"VPNR_{name} is not #defined in bpf/lib"
    assert CONSTANTS[name] == c_layout.constants[name], f"layout.{name} != VPNR_{name}"
