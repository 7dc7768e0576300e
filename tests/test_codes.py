"""The verdict and reason codes in bpf/lib/codes.h mirror proto/vpnr/v1/codes.proto."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf.descriptor import EnumDescriptor

from vpnr.v1 import codes_pb2

HEADER = Path(__file__).resolve().parents[1] / "bpf" / "lib" / "codes.h"


def header_enum(c_name: str) -> dict[str, int]:
    """Parse `enum c_name { NAME = value, ... }` from the C header."""
    text = HEADER.read_text()
    body = re.search(r"enum\s+" + c_name + r"\s*\{(.*?)\};", text, re.S)
    assert body, f"enum {c_name} not found in {HEADER}"
    pairs = re.findall(r"(\w+)\s*=\s*(\d+)\s*,", body.group(1))
    return {name: int(value) for name, value in pairs}


def proto_enum(descriptor: EnumDescriptor) -> dict[str, int]:
    """Proto enum values, named as the C header names them (VPNR_ prefix)."""
    return {f"VPNR_{v.name}": v.number for v in descriptor.values}


def test_verdicts_match() -> None:
    assert header_enum("vpnr_verdict") == proto_enum(codes_pb2.Verdict.DESCRIPTOR)


def test_reasons_match() -> None:
    assert header_enum("vpnr_reason") == proto_enum(codes_pb2.Reason.DESCRIPTOR)


def test_parser_sees_every_value() -> None:
    # Guards the regex: a header it half-read would make the comparisons above vacuous.
    assert len(header_enum("vpnr_reason")) == len(codes_pb2.Reason.DESCRIPTOR.values) >= 17


def test_zones_match() -> None:
    assert header_enum("vpnr_zone") == proto_enum(codes_pb2.Zone.DESCRIPTOR)
