"""The vocabulary policy files and the policy verbs share.

Enum values by their short lowercase names (``allow`` for ``ACTION_ALLOW``, ``tcp`` for
``PROTOCOL_TCP``), and the syntax of port ranges and prefixes, so that ``ports = "22"`` in a
file and ``--ports 22`` on the command line mean the same and fail with the same message.
"""

from __future__ import annotations

import ipaddress
import re

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from vpnr.v1 import codes_pb2, policy_pb2

UINT32_MAX = 2**32 - 1
PORT_MAX = 65535
ICMP_TYPE_MAX = 255
PORT_PROTOCOLS = (codes_pb2.PROTOCOL_TCP, codes_pb2.PROTOCOL_UDP)
ICMP_PROTOCOLS = (codes_pb2.PROTOCOL_ICMP, codes_pb2.PROTOCOL_ICMPV6)
PORTS_EXPECTED = f'expected "N" or "N-M" with 1 <= N <= M <= {PORT_MAX}'
_ENUM_PREFIX = re.compile(r"(?<!^)(?=[A-Z])")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _enum_prefix(enum: EnumTypeWrapper) -> str:
    """``Verdict`` -> ``VERDICT_``: the prefix every value name of a proto enum carries."""
    return _ENUM_PREFIX.sub("_", enum.DESCRIPTOR.name).upper() + "_"


def enum_names(enum: EnumTypeWrapper) -> dict[str, int]:
    """The file's names of a proto enum's values (``allow`` for ``ACTION_ALLOW``), without
    ``unspecified``."""
    prefix = _enum_prefix(enum)
    return {name.removeprefix(prefix).lower(): int(number) for name, number in enum.items()
            if not name.endswith("_UNSPECIFIED")}


def enum_label(enum: EnumTypeWrapper, number: int) -> str:
    """The short lowercase name of one enum value; the number itself when this vpnctl does
    not know it (a newer daemon)."""
    try:
        return str(enum.Name(number)).removeprefix(_enum_prefix(enum)).lower()
    except ValueError:
        return str(number)


ACTIONS = enum_names(policy_pb2.Action)
PROTOCOLS = enum_names(codes_pb2.Protocol)
ZONES = enum_names(codes_pb2.Zone)
VERDICTS = enum_names(codes_pb2.Verdict)
REASONS = enum_names(codes_pb2.Reason)


def quote(text: str) -> str:
    """A string as it would appear in the file (double quotes), for messages."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_ports(value: str) -> tuple[int, int]:
    """``"22"`` or ``"8000-8080"`` -> (from, to); ``""`` -> (0, 0), any port.

    Raises ValueError with the message the file and the CLI both show."""
    text = value.strip()
    if text == "":
        return 0, 0
    low, sep, high = text.partition("-")
    try:
        first = int(low, 10)
        last = int(high, 10) if sep else first
    except ValueError:
        raise ValueError(f"{PORTS_EXPECTED}, got {quote(value)}") from None
    if not 1 <= first <= last <= PORT_MAX:
        raise ValueError(f"{PORTS_EXPECTED}, got {quote(value)}")
    return first, last


def format_ports(first: int, last: int) -> str:
    """(22, 22) -> ``"22"``, (8000, 8080) -> ``"8000-8080"``, (0, 0) -> ``""``."""
    if first == 0 and last == 0:
        return ""
    return str(first) if first == last else f"{first}-{last}"


def parse_prefix(value: str) -> IPNetwork:
    """A CIDR prefix without host bits; a bare address means its /32 or /128.

    Raises ValueError naming what was expected."""
    text = value.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'expected a CIDR prefix such as "10.2.0.0/24", got '
                         f"{quote(value)}") from None
    raise ValueError(f"{quote(value)} has host bits set (the prefix would be "
                     f"{quote(str(network))})")
