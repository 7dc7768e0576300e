"""Python stubs of an older ("behind") or newer ("ahead") vpnr.v1 API, built at test time.

Why a separate top-level package: protobuf keeps one descriptor pool per process, and the
installed package already registers the messages of ``vpnr.v1`` under the file names
``vpnr/v1/*.proto``; a second set with the same names cannot be loaded next to it, and a
``vpnr/v1`` directory earlier on ``sys.path`` would only shadow the installed package by the
accident of import-hook order. So each set is compiled from a copy of the protos placed at
``skewstubs/vpnr/v1/*.proto`` (imports rewritten to match): protoc then generates the Python
modules ``skewstubs.vpnr.v1.*_pb2`` while the proto package, and so every message and
service name on the wire (``/vpnr.v1.PolicyService/Status``), stays ``vpnr.v1``. The set is
imported only in a subprocess (tests/skew/peer.py) that never imports ``vpnr``, with the set's
directory first on ``sys.path``.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "baseline"                           # the API one minor behind (committed)
CURRENT = HERE.parent.parent / "proto"                  # the API of this tree
PEER_SCRIPT = HERE / "peer.py"
STUB_PACKAGE = "skewstubs"


@dataclass(frozen=True)
class Edit:
    """One change to one proto file: ``pattern`` (a regex) must match exactly once."""

    file: str
    pattern: str
    replacement: str = ""


def drop_line(file: str, line: str) -> Edit:
    """Remove the line that starts (after indentation) with ``line``."""
    return Edit(file, r"(?m)^[ \t]*" + re.escape(line) + r".*\n")


def add_field(file: str, message: str, declaration: str) -> Edit:
    """Add a field as the first member of ``message``."""
    return Edit(file, r"(?m)^(message " + re.escape(message) + r" \{)",
                r"\1 " + declaration.replace("\\", "\\\\") + " ")


def add_enum_value(file: str, enum: str, declaration: str) -> Edit:
    """Add a value after the last value of ``enum`` (the zero value must stay first)."""
    return Edit(file, r"(?m)^(enum " + re.escape(enum) + r" \{[^}]*)\}",
                r"\1  " + declaration.replace("\\", "\\\\") + "\n}")


# One minor behind: the fields and the RPC added last are not there yet.
BEHIND_EDITS: tuple[Edit, ...] = (
    drop_line("idp.proto", "bool stale = 15;"),
    drop_line("idp.proto", "uint32 consecutive_failures = 16;"),
    drop_line("idp.proto", "google.protobuf.Timestamp next_sync = 17;"),
    drop_line("idp.proto", "uint64 tokens_rejected = 19;"),
    drop_line("idp.proto", "SyncResult held = 20;"),
    drop_line("idp.proto", "rpc CompleteLogin("),
    drop_line("policy.proto", "string mode = 10;"),
    drop_line("policy.proto", "uint64 kernel_policy_version = 11;"),
    drop_line("policy.proto", "bool policy_adopted = 16;"),
    drop_line("policy.proto", "repeated IdentityTraffic top_traffic = 17;"),
    drop_line("policy.proto", "TrafficCounters traffic = 6;"),
    drop_line("audit.proto", "bool success = 7;"),
    drop_line("audit.proto", "uint64 last_id = 10;"),
    drop_line("audit.proto", "uint32 chunks = 11;"),
    drop_line("audit.proto", "uint64 disk_bytes = 12;"),
    drop_line("audit.proto", "double events_per_second = 13;"),
    drop_line("audit.proto", "uint64 ring_bytes = 14;"),
    drop_line("audit.proto", "uint64 ring_pending_bytes = 15;"),
    drop_line("tunnel.proto", "uint64 handshakes_completed = 18;"),
    drop_line("tunnel.proto", "map<string, uint64> datapath_counters = 17;"),
)

# Older still: a peer from before the RPCs the current daemons call on each other
# (auditd's Record, policyd's ListRoles and ReplaceBindings) existed.
PREDATES_EDITS: tuple[Edit, ...] = (
    *BEHIND_EDITS,
    drop_line("audit.proto", "rpc Record("),
    drop_line("policy.proto", "rpc ListRoles("),
    drop_line("policy.proto", "rpc ReplaceBindings("),
)

TRACE_NOTE = "string trace_note = 900;"

# One minor ahead: new fields in requests, answers and shared messages, new enum values.
AHEAD_EDITS: tuple[Edit, ...] = (
    add_field("policy.proto", "CreateRoleRequest", TRACE_NOTE),
    add_field("policy.proto", "ListBindingsRequest", TRACE_NOTE),
    add_field("policy.proto", "PolicyStatus", TRACE_NOTE),
    add_field("policy.proto", "Role", "uint32 max_rules = 901;"),
    add_field("policy.proto", "Binding", "uint32 weight = 905;"),
    add_field("policy.proto", "ReplaceResponse", TRACE_NOTE),
    add_enum_value("policy.proto", "Action", "ACTION_LOG = 3;"),
    add_field("audit.proto", "RecordRequest", TRACE_NOTE),
    add_field("audit.proto", "RecordResponse", TRACE_NOTE),
    add_field("audit.proto", "ControlEvent", "string request_id = 902;"),
    add_field("audit.proto", "AuditStatusRequest", TRACE_NOTE),
    add_field("audit.proto", "QueryRequest", TRACE_NOTE),
    add_field("idp.proto", "IdpStatusRequest", TRACE_NOTE),
    add_field("idp.proto", "ListIdpBindingsRequest", TRACE_NOTE),
    add_enum_value("idp.proto", "SyncOutcome", "SYNC_OUTCOME_DEFERRED = 5;"),
    add_field("tunnel.proto", "TunnelStatusRequest", TRACE_NOTE),
    add_field("tunnel.proto", "ListPeersRequest", TRACE_NOTE),
    add_field("common.proto", "DaemonInfo", "string build_commit = 903;"),
)


def build_stub_set(source: Path, edits: tuple[Edit, ...], out: Path) -> Path:
    """Copy the protos of ``source`` (an include root holding vpnr/v1) under
    ``out/skewstubs``, apply ``edits``, generate Python stubs next to them; returns ``out``
    (the directory to put first on ``sys.path``). ``out/proto`` holds the edited protos
    under their real names, for the compatibility check."""
    import grpc_tools
    from grpc_tools import protoc

    tree = out / STUB_PACKAGE / "vpnr" / "v1"
    tree.mkdir(parents=True)
    texts = {p.name: p.read_text() for p in sorted((source / "vpnr" / "v1").glob("*.proto"))}
    for edit in edits:
        text, count = re.subn(edit.pattern, edit.replacement, texts[edit.file])
        if count != 1:
            raise ValueError(f"{edit.file}: {edit.pattern!r} matched {count} times, not once")
        texts[edit.file] = text
    for name, text in texts.items():
        plain = out / "proto" / "vpnr" / "v1" / name     # for protocompat, as edited
        plain.parent.mkdir(parents=True, exist_ok=True)
        plain.write_text(text)
        rewritten = text.replace('import "vpnr/v1/', f'import "{STUB_PACKAGE}/vpnr/v1/')
        (tree / name).write_text(rewritten)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = [f"{STUB_PACKAGE}/vpnr/v1/{name}" for name in texts]
    args = ["protoc", f"-I{out}", f"-I{well_known}", f"--python_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    for package in (out / STUB_PACKAGE, out / STUB_PACKAGE / "vpnr", tree):
        (package / "__init__.py").write_text("")
    return out


def copy_tree(source: Path, out: Path) -> Path:
    """A writable copy of a proto include root (for mutation tests)."""
    shutil.copytree(source, out)
    return out
