"""A daemon one minor version ahead of or behind its peers keeps working (docs/api.md).

Two halves. The protos of this tree are compared with the committed baseline of the previous
minor (tests/skew/baseline, compiled at test time) by tests/skew/protocompat.py, which must
find no breaking change, and which is shown to catch each kind of break on mutated copies.
Then clients and servers built from an older ("behind", and "predates": older than the
RPCs daemons call on each other) and a newer ("ahead") copy of the API talk to the current
daemons, running for real: real gRPC peers generated from real older/newer protos, each in
its own process (tests/skew/stubsets.py says why, and how the sets are packaged as
``skewstubs.vpnr.v1`` so they never meet the installed ``vpnr.v1``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from idp_server import running_idp
from skew import protocompat, stubsets
from test_idpd import CLIENT_SECRET, SCIM, devices, idp_data, idpd_section

from conftest import BIN, DaemonProcess, RunningPolicyd, router_toml
from vpnr import __version__
from vpnr.v1 import audit_pb2, audit_pb2_grpc, idp_pb2, idp_pb2_grpc, policy_pb2

PEER_READY_TIMEOUT = 20.0
RECORD_WAIT = 15.0
# What the behind set lacks at least, in the answers checked below (its edits drop these);
# fields added to proto/ since the baseline are unknown to it as well.
DROPPED_NUMBERS = {
    "vpnr.v1.PolicyStatus": {10, 11, 16, 17}, "vpnr.v1.AuditStatus": {10, 11, 12, 13, 14, 15},
    "vpnr.v1.IdpStatus": {15, 16, 17, 19, 20}, "vpnr.v1.TunnelStatus": {17, 18},
}


def newer_numbers(behind: Path, message: str) -> set[int]:
    """Field numbers of ``message`` in proto/ that the behind stub set does not have."""
    def numbers(fds: Any) -> set[int]:
        package, name = message.rsplit(".", 1)
        for file in fds.file:
            if file.package == package:
                for msg in file.message_type:
                    if msg.name == name:
                        return {f.number for f in msg.field}
        return set()
    current = numbers(protocompat.compile_protos(stubsets.CURRENT))
    return current - numbers(protocompat.compile_protos(behind / "proto"))


# -- the machine check of the evolution rules -------------------------------------------


def test_current_protos_keep_the_previous_minors_wire_contract() -> None:
    baseline = protocompat.compile_protos(stubsets.BASELINE)
    current = protocompat.compile_protos(stubsets.CURRENT)
    assert {f.name for f in baseline.file if f.name.startswith("vpnr/")} == {
        f"vpnr/v1/{name}.proto" for name in ("common", "codes", "policy", "tunnel", "audit",
                                             "idp")}
    assert protocompat.breaking_changes(baseline, current) == []


def _mutate(tree: Path, file: str, old: str, new: str) -> None:
    path = tree / "vpnr" / "v1" / file
    text = path.read_text()
    assert text.count(old) == 1, (file, old)
    path.write_text(text.replace(old, new))


def test_the_check_reports_each_breaking_change(tmp_path: Path) -> None:
    baseline = protocompat.compile_protos(stubsets.BASELINE)
    tree = stubsets.copy_tree(stubsets.BASELINE, tmp_path / "mutated")
    _mutate(tree, "policy.proto", "string description = 10;", "string description = 11;")
    _mutate(tree, "audit.proto", "  string peer = 13;           // tunnel peer", "  //")
    _mutate(tree, "tunnel.proto", "uint32 keepalive_seconds = 9;",
            "uint64 keepalive_seconds = 9;")
    _mutate(tree, "tunnel.proto", "rpc RotateStaticKey(", "// rpc RotateStaticKey(")
    _mutate(tree, "policy.proto", "rpc GetRole(GetRoleRequest) returns (Role);",
            "rpc GetRole(GetRoleRequest) returns (Rule);")
    _mutate(tree, "codes.proto", "REASON_MAP_ERROR = 17;", "")
    _mutate(tree, "idp.proto", "repeated string groups = 5;", "string groups = 5;")
    # The legal way to remove a field: its number and name reserved. Not reported.
    _mutate(tree, "idp.proto", "  double latency_seconds = 6;",
            '  reserved 6; reserved "latency_seconds";')
    found = protocompat.breaking_changes(baseline, protocompat.compile_protos(tree))
    assert sorted(found) == sorted([
        "vpnr.v1.Rule.description: renumbered 10 -> 11",
        "vpnr.v1.PacketDecision.peer = 13: removed without reserving number 13 and name 'peer'",
        "vpnr.v1.Peer.keepalive_seconds = 9: type changed from singular TYPE_UINT32 to "
        "singular TYPE_UINT64",
        "rpc vpnr.v1.TunnelService.RotateStaticKey: removed",
        "rpc vpnr.v1.PolicyService.GetRole: response type changed from .vpnr.v1.Role to "
        ".vpnr.v1.Rule",
        "vpnr.v1.Reason.REASON_MAP_ERROR = 17: removed without reserving the number",
        "vpnr.v1.Login.groups = 5: type changed from repeated TYPE_STRING to singular "
        "TYPE_STRING",
    ]), found


@pytest.fixture(scope="module")
def stub_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three stub sets, built once for the module."""
    root = tmp_path_factory.mktemp("stubsets")
    return {
        "behind": stubsets.build_stub_set(stubsets.BASELINE, stubsets.BEHIND_EDITS,
                                          root / "behind"),
        "predates": stubsets.build_stub_set(stubsets.BASELINE, stubsets.PREDATES_EDITS,
                                            root / "predates"),
        "ahead": stubsets.build_stub_set(stubsets.CURRENT, stubsets.AHEAD_EDITS,
                                         root / "ahead"),
    }


def test_the_emulated_versions_are_legal_evolutions(stub_sets: dict[str, Path]) -> None:
    current = protocompat.compile_protos(stubsets.CURRENT)
    behind = protocompat.compile_protos(stub_sets["behind"] / "proto")
    ahead = protocompat.compile_protos(stub_sets["ahead"] / "proto")
    assert protocompat.breaking_changes(behind, current) == []
    assert protocompat.breaking_changes(current, ahead) == []
    # Seen from the other side, the behind set really lacks what it should.
    backwards = protocompat.breaking_changes(current, behind)
    assert "rpc vpnr.v1.IdpService.CompleteLogin: removed" in backwards
    assert any(line.startswith("vpnr.v1.IdpStatus.stale = 15: removed") for line in backwards)


# -- stub sets against the running daemons ----------------------------------------------


def run_client(stubs: Path, plan: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    """Make the calls of ``plan`` from a process built on ``stubs``."""
    plan_file = tmp / f"plan-{time.monotonic_ns()}.json"
    plan_file.write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, str(stubsets.PEER_SCRIPT), str(stubs), "client",
                           str(plan_file)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def call(socket: Path, module: str, service: str, method: str,
         request: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of a client plan."""
    return {"socket": str(socket), "module": module, "service": service, "method": method,
            "request": request or {}}


class Peer:
    """A server built from one stub set, on the socket of the daemon it stands in for."""

    def __init__(self, stubs: Path, socket: Path, module: str, service: str,
                 replies: dict[str, Any], log: Path) -> None:
        self.log = log
        spec = log.with_suffix(".spec.json")
        spec.write_text(json.dumps({"socket": str(socket), "module": module,
                                    "service": service, "replies": replies, "log": str(log)}))
        self.proc = subprocess.Popen([sys.executable, str(stubsets.PEER_SCRIPT), str(stubs),
                                      "serve", str(spec)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # the peer ends itself after 600 s
        if line != "READY":
            self.stop()
            raise AssertionError(f"peer did not start: {line!r}")

    def requests(self) -> list[dict[str, Any]]:
        """Every request the peer received so far."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        """SIGTERM and wait."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Peers a test started; each is stopped after the test."""
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.stop()


def assert_old_view(result: dict[str, Any], hidden: set[str], behind: Path,
                    sent_newer: bool = True) -> None:
    """An answer as the behind stubs see it: ok, the newer fields unknown to them (kept as
    unknown fields, not an error), and the daemon's version readable. ``sent_newer``: the
    daemon's state is such that it set some of the newer fields."""
    assert result["ok"], result
    assert not hidden & set(result["known_fields"]), result["known_fields"]
    newer = newer_numbers(behind, result["type"])
    assert DROPPED_NUMBERS[result["type"]] <= newer, newer
    assert set(result["unknown_numbers"]) <= newer, result
    assert bool(result["unknown_numbers"]) == sent_newer, result["unknown_numbers"]
    assert result["value"]["daemon"]["version"] == __version__


def test_old_and_new_clients_with_policyd_and_tunneld(
        policyd: RunningPolicyd, stub_sets: dict[str, Path], tmp_path: Path) -> None:
    tunneld = DaemonProcess("tunneld", policyd.config, policyd.process.run_dir,
                            policyd.instance, netns=policyd.netns).start()
    try:
        pol, tun = policyd.process.socket, tunneld.socket
        old = run_client(stub_sets["behind"], [
            call(pol, "policy", "PolicyService", "CreateRole",
                 {"role": {"name": "skew-old", "rules": [{"action": "ACTION_ALLOW"}]}}),
            call(pol, "policy", "PolicyService", "ListBindings", {"page": {"page_size": 10}}),
            call(pol, "policy", "PolicyService", "Status"),
            call(tun, "tunnel", "TunnelService", "Status"),
            call(tun, "tunnel", "TunnelService", "ListPeers"),
        ], tmp_path)
        assert old[0]["ok"] and old[0]["value"]["name"] == "skew-old", old[0]
        assert old[1]["ok"] and old[1]["unknown_numbers"] == [], old[1]
        assert_old_view(old[2], {"mode", "policy_adopted", "top_traffic"}, stub_sets["behind"])
        assert_old_view(old[3], {"handshakes_completed", "datapath_counters"},
                        stub_sets["behind"])
        assert old[4]["ok"], old[4]

        new = run_client(stub_sets["ahead"], [
            call(pol, "policy", "PolicyService", "CreateRole",
                 {"trace_note": "from a newer vpnctl", "role": {"name": "skew-new",
                                                                "max_rules": 8}}),
            call(pol, "policy", "PolicyService", "ListBindings", {"trace_note": "x"}),
            call(pol, "policy", "PolicyService", "Status"),
            call(tun, "tunnel", "TunnelService", "Status", {"trace_note": "x"}),
            call(tun, "tunnel", "TunnelService", "ListPeers", {"trace_note": "x"}),
        ], tmp_path)
        assert all(r["ok"] for r in new), new
        assert new[0]["value"]["name"] == "skew-new"
        assert "max_rules" not in new[0]["value"]      # the daemon dropped what it ignores
        assert new[2]["value"]["daemon"]["version"] == __version__
        assert "trace_note" in new[2]["known_fields"] and new[2]["unknown_numbers"] == []
        # The current client sees both roles, made by either version, as any other.
        names = {r.name for r in policyd.stub.ListRoles(policy_pb2.ListRolesRequest(),
                                                        timeout=10).roles}
        assert {"skew-old", "skew-new"} <= names
    finally:
        tunneld.stop()


def _create_role_until_recorded(policyd: RunningPolicyd, peer: Peer, tag: str
                                ) -> dict[str, Any]:
    """Create roles (bounded) until the peer has policyd's record of one; returns it."""
    deadline = time.monotonic() + RECORD_WAIT
    for attempt in range(30):
        policyd.stub.CreateRole(policy_pb2.CreateRoleRequest(
            role=policy_pb2.Role(name=f"skew-{tag}-{attempt}")), timeout=10)
        version = str(policyd.stub.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=10).version)
        for _ in range(10):
            for request in peer.requests():
                event = request["value"].get("event", {})
                if (event.get("daemon"), event.get("action"), event.get("version_after")) \
                        == ("policyd", "role.create", version):
                    return request
            time.sleep(0.1)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no record of a {tag} role reached the {tag} auditd")


def test_policyd_records_reach_an_older_and_a_newer_auditd(
        policyd: RunningPolicyd, stub_sets: dict[str, Path], tmp_path: Path,
        peers: list[Peer]) -> None:
    auditd_socket = policyd.process.socket.with_name("auditd.sock")
    not_taken = "auditd did not take a control record"
    for tag, reply in (("behind", {"id": 41}),
                       ("ahead", {"id": 42, "trace_note": "answered by a newer auditd"})):
        peer = Peer(stub_sets[tag], auditd_socket, "audit", "AuditService",
                    {"Record": reply}, tmp_path / f"auditd-{tag}.jsonl")
        peers.append(peer)
        request = _create_role_until_recorded(policyd, peer, tag)
        if tag == "behind":   # policyd's newer ControlEvent.success arrives as unknown
            assert "success" not in request["value"]["event"]
            assert request["unknown_by_path"] == {"event": [7]}, request
        else:                 # the newer auditd knows fields policyd never sets
            assert "trace_note" in request["known_fields"]
            assert request["value"]["event"]["success"] is True
            assert request["unknown_by_path"] == {}, request
        peer.stop()
    # The newer auditd's answer carried a field policyd does not know: it parsed anyway.
    assert not_taken not in policyd.process.output()

    # An auditd older than the Record RPC answers UNIMPLEMENTED: policyd logs it and goes on.
    oldest = Peer(stub_sets["predates"], auditd_socket, "audit", "AuditService",
                  {"Record": {"id": 1}}, tmp_path / "auditd-predates.jsonl")
    peers.append(oldest)
    deadline = time.monotonic() + RECORD_WAIT
    attempt = 0
    while not_taken not in policyd.process.output() and time.monotonic() < deadline:
        reply = policyd.stub.CreateRole(policy_pb2.CreateRoleRequest(
            role=policy_pb2.Role(name=f"skew-oldest-{attempt}")), timeout=10)
        assert reply.name == f"skew-oldest-{attempt}"
        attempt += 1
        time.sleep(0.3)
    lines = [json.loads(line) for line in policyd.process.output().splitlines()
             if not_taken in line]
    assert lines and lines[-1]["code"] == "UNIMPLEMENTED", lines
    assert oldest.requests() == []


def _start_auditd(tmp_path: Path, instance: str) -> DaemonProcess:
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path))
    return DaemonProcess("auditd", config, tmp_path / "run", instance).start()


def test_old_and_new_clients_with_auditd_and_idpd(
        stub_sets: dict[str, Path], tmp_path: Path, instance: str) -> None:
    auditd = _start_auditd(tmp_path, instance)
    idpd = DaemonProcess("idpd", auditd.config, auditd.run_dir, instance).start()
    try:
        aud, idp = auditd.socket, idpd.socket
        old = run_client(stub_sets["behind"], [
            call(aud, "audit", "AuditService", "Record",
                 {"event": {"daemon": "vpnctl", "action": "skew.old", "actor": "test"}}),
            call(aud, "audit", "AuditService", "Query", {"filter": {"control_only": True},
                                                        "page": {"page_size": 50}}),
            call(aud, "audit", "AuditService", "Status"),
            call(idp, "idp", "IdpService", "Status"),
            call(idp, "idp", "IdpService", "ListBindings"),
            call(idp, "idp", "IdpService", "CompleteLogin", {}),
        ], tmp_path)
        assert old[0]["ok"] and int(old[0]["value"]["id"]) > 0, old[0]
        assert old[1]["ok"] and any(r["control"]["action"] == "skew.old"
                                    for r in old[1]["value"]["records"]), old[1]
        assert_old_view(old[2], {"last_id", "disk_bytes", "ring_bytes"}, stub_sets["behind"])
        # Without an IdP configured idpd leaves the newer fields at their defaults.
        assert_old_view(old[3], {"stale", "next_sync", "held", "tokens_rejected"},
                        stub_sets["behind"], sent_newer=False)
        assert old[4]["ok"], old[4]
        assert old[5] == {"ok": False, "code": "NOT_IN_STUBS"}   # it cannot even ask

        new = run_client(stub_sets["ahead"], [
            call(aud, "audit", "AuditService", "Record",
                 {"trace_note": "x", "event": {"daemon": "vpnctl", "action": "skew.new",
                                               "request_id": "r-1"}}),
            call(aud, "audit", "AuditService", "Query",
                 {"trace_note": "x", "filter": {"control_only": True},
                  "page": {"page_size": 50}}),
            call(aud, "audit", "AuditService", "Status", {"trace_note": "x"}),
            call(idp, "idp", "IdpService", "Status", {"trace_note": "x"}),
            call(idp, "idp", "IdpService", "ListBindings", {"trace_note": "x"}),
        ], tmp_path)
        assert all(r["ok"] for r in new), new
        stored = [r["control"] for r in new[1]["value"]["records"]]
        assert any(c["action"] == "skew.new" and "request_id" not in c for c in stored), stored
        for status in (new[2], new[3]):
            assert status["value"]["daemon"]["version"] == __version__

        # vpnctl status shows each daemon's version: how an operator sees a skew.
        shown = subprocess.run([str(BIN / "vpnctl"), "--run-dir", str(auditd.run_dir),
                                "--instance", instance, "-o", "json", "status"],
                               capture_output=True, text=True, timeout=60)
        daemons = json.loads(shown.stdout)["daemons"]
        assert daemons["auditd"]["version"] == daemons["idpd"]["version"] == __version__
        assert daemons["policyd"]["state"] == "down"
    finally:
        idpd.stop()
        auditd.stop()


def _names_warning(auditd: DaemonProcess) -> list[str]:
    with grpc.insecure_channel(f"unix:{auditd.socket}") as channel:
        status = audit_pb2_grpc.AuditServiceStub(channel).Status(
            audit_pb2.AuditStatusRequest(), timeout=10)
    return [w.message for w in status.warnings if w.code == "NAMES"]


def test_auditd_reads_role_names_from_an_older_and_a_newer_policyd(
        stub_sets: dict[str, Path], tmp_path: Path, instance: str,
        peers: list[Peer]) -> None:
    policyd_socket = tmp_path / "run" / instance / "policyd.sock"
    daemon = {"daemon": "policyd", "version": __version__}
    status: dict[str, Any] = {"daemon": daemon, "policy_version": 5}
    roles = {"roles": [{"name": "eng", "id": 3, "rules": [{"action": "ACTION_ALLOW"}]}]}
    ahead_status = {**status, "trace_note": "newer",
                    "daemon": {**daemon, "build_commit": "abc"}}
    ahead_roles = {"roles": [{"name": "eng", "id": 3, "max_rules": 4,
                              "rules": [{"action": "ACTION_LOG"}]}]}
    for tag, replies in (("behind", {"Status": status, "ListRoles": roles}),
                         ("ahead", {"Status": ahead_status, "ListRoles": ahead_roles}),
                         ("predates", {"Status": status, "ListRoles": roles})):
        peer = Peer(stub_sets[tag], policyd_socket, "policy", "PolicyService", replies,
                    tmp_path / f"policyd-{tag}.jsonl")
        peers.append(peer)
        auditd = _start_auditd(tmp_path, instance)
        try:
            warnings = _names_warning(auditd)
        finally:
            auditd.stop()
        peer.stop()
        asked = [r["method"] for r in peer.requests()]
        if tag == "predates":   # no ListRoles there: auditd serves, and says why names lack
            assert asked == ["Status"], asked
            assert warnings == ["cannot read role names from policyd: UNIMPLEMENTED"]
            assert "role names not refreshed" in auditd.output()
        else:
            assert asked == ["Status", "ListRoles"], (tag, asked)
            assert warnings == [], (tag, warnings)


def test_idpd_pushes_bindings_to_an_older_and_a_newer_policyd(
        stub_sets: dict[str, Path], tmp_path: Path, instance: str,
        peers: list[Peer]) -> None:
    data = idp_data()
    data["users"] += devices(2)
    secret = tmp_path / "client.secret"
    secret.write_text(CLIENT_SECRET + "\n")
    os.chmod(secret, 0o600)
    roles = [{"name": name, "id": i + 1} for i, name in enumerate(("eng", "sales", "printers"))]
    admin = {"prefix": "10.9.9.9/32", "roles": ["eng"], "source": "admin"}
    replies: dict[str, dict[str, Any]] = {
        "behind": {"GetPolicy": {"version": 6, "roles": roles, "bindings": [admin]},
                   "ReplaceBindings": {"version": 7}},
        "ahead": {"GetPolicy": {"version": 7, "roles": roles,
                                "bindings": [{**admin, "weight": 3}]},
                  "ReplaceBindings": {"version": 8, "trace_note": "newer policyd"}},
    }
    replies["predates"] = replies["behind"]
    policyd_socket = tmp_path / "run" / instance / "policyd.sock"
    with running_idp(tmp_path / "idp", data) as idp:
        config = tmp_path / "router.toml"
        config.write_text(router_toml(instance, tmp_path)
                          + idpd_section(idp.issuer, secret, SCIM.replace("{issuer}",
                                                                          idp.issuer)))
        first = Peer(stub_sets["behind"], policyd_socket, "policy", "PolicyService",
                     replies["behind"], tmp_path / "policyd-behind.jsonl")
        peers.append(first)
        idpd = DaemonProcess("idpd", config, tmp_path / "run", instance).start()
        try:
            with grpc.insecure_channel(f"unix:{idpd.socket}") as channel:
                stub = idp_pb2_grpc.IdpServiceStub(channel)
                for tag in ("behind", "ahead", "predates"):
                    peer = first if tag == "behind" else Peer(
                        stub_sets[tag], policyd_socket, "policy", "PolicyService",
                        replies[tag], tmp_path / f"policyd-{tag}.jsonl")
                    if peer is not first:
                        peers.append(peer)
                    result = _sync_until_policyd_answers(stub)
                    pushed = [r for r in peer.requests() if r["method"] == "ReplaceBindings"]
                    peer.stop()
                    if tag == "predates":   # no ReplaceBindings: the sync fails, idpd goes on
                        assert result.outcome == idp_pb2.SYNC_OUTCOME_FAILED, result
                        assert "UNIMPLEMENTED" in result.error, result.error
                        assert pushed == []
                        status = stub.Status(idp_pb2.IdpStatusRequest(), timeout=10)
                        assert status.stale and status.policy_version == 8
                        continue
                    assert result.outcome == idp_pb2.SYNC_OUTCOME_APPLIED, result
                    assert result.policy_version == replies[tag]["ReplaceBindings"]["version"]
                    assert pushed, tag       # (idpd's start-up sync may have pushed too)
                    sent = pushed[-1]["value"]
                    assert sent["source"] == "idpd"
                    assert sorted((b["prefix"], tuple(b["roles"])) for b in sent["bindings"]) \
                        == [("10.2.0.2/32", ("printers",)), ("10.2.0.3/32", ("printers",))]
                    assert pushed[-1]["unknown_by_path"] == {}
        finally:
            idpd.stop()
    assert "sync failed" in idpd.output()


def _sync_until_policyd_answers(stub: idp_pb2_grpc.IdpServiceStub) -> idp_pb2.SyncResult:
    """SyncNow, again (bounded) while idpd's channel to the swapped policyd reconnects."""
    for _ in range(5):
        result: idp_pb2.SyncResult = stub.SyncNow(idp_pb2.SyncNowRequest(), timeout=60)
        if "UNAVAILABLE" not in result.error:
            return result
        time.sleep(0.5)
    return result
