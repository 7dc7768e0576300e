"""vpnctl against real auditd and idpd processes on their Unix sockets: no mocks, no skips."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

# mypy names this source tree "services", not "vpnr" (the editable install maps it at runtime).
from vpnr.vpnctl.main import main, parse_args

# The daemons chown their socket directory to root:admin_group, so they must run as root.
pytestmark = pytest.mark.root

BIN = Path(sys.executable).parent
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0
NOBODY = 65534

CONFIG = """\
[router]
instance = "{instance}"
run_dir = "{run_dir}"
state_dir = "{state_dir}"
admin_group = "root"

[policyd]
interfaces = [{{name = "lo", zone = "internal"}}]
"""


@dataclass
class Router:
    """One router instance with some of its daemons running as real processes."""

    instance: str
    run_dir: Path
    config: Path
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def socket(self, daemon: str) -> Path:
        """The daemon's Unix socket path."""
        return self.run_dir / self.instance / f"{daemon}.sock"

    def argv(self, *args: str) -> list[str]:
        """vpnctl arguments pointed at this instance."""
        return ["--instance", self.instance, "--run-dir", str(self.run_dir), *args]

    def start(self, daemon: str) -> None:
        """Start a daemon and wait (bounded) until its socket exists."""
        log = (self.logs / f"{daemon}.log").open("wb")
        process = subprocess.Popen([str(BIN / daemon), "-c", str(self.config)],
                                   stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.processes[daemon] = process
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.socket(daemon).exists():
            if process.poll() is not None or time.monotonic() > deadline:
                output = (self.logs / f"{daemon}.log").read_text(errors="replace")
                pytest.fail(f"{daemon} did not create {self.socket(daemon)} "
                            f"(exit {process.poll()}):\n{output}")
            time.sleep(0.05)

    def stop(self, daemon: str) -> int:
        """SIGTERM a daemon and return its exit code."""
        process = self.processes.pop(daemon)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def stop_all(self) -> None:
        """Stop every daemon; each must exit 0 and remove its socket."""
        for daemon in list(self.processes):
            assert self.stop(daemon) == 0, (self.logs / f"{daemon}.log").read_text()
            assert not self.socket(daemon).exists()


def make_router(base: Path) -> Router:
    """A config for a fresh instance under ``base``."""
    instance = f"t{os.getpid()}x{secrets.randbelow(1_000_000)}"
    run_dir, state_dir = base / "run", base / "state"
    config = base / "router.toml"
    config.write_text(CONFIG.format(instance=instance, run_dir=run_dir, state_dir=state_dir),
                      encoding="utf-8")
    return Router(instance=instance, run_dir=run_dir, config=config, logs=base)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """auditd and idpd running; policyd and tunneld not started (they show as down)."""
    running = make_router(tmp_path_factory.mktemp("vpnctl"))
    try:
        running.start("auditd")
        running.start("idpd")
        yield running
    finally:
        running.stop_all()


def vpnctl(router: Router, capsys: pytest.CaptureFixture[str],
           *args: str) -> tuple[int, str, str]:
    """Run vpnctl in-process against the router; exit code, stdout, stderr."""
    code = main(router.argv(*args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_parse_args_defaults_env_and_option_positions() -> None:
    args = parse_args(["status"], environ={})
    assert (args.instance, args.run_dir, args.output, args.timeout) == (
        "a", "/run/vpnr", "table", None)
    environ = {"VPNR_INSTANCE": "b", "VPNR_RUN_DIR": "/tmp/elsewhere"}
    args = parse_args(["call", "AuditService/Status", "-o", "yaml", "--timeout", "2"],
                      environ=environ)
    assert (args.instance, args.run_dir, args.output, args.timeout) == (
        "b", "/tmp/elsewhere", "yaml", 2.0)
    assert parse_args(["-o", "json", "--instance", "c", "list"], environ={}).output == "json"


def test_help_documents_exit_codes_and_ends_with_examples(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    assert "examples:" in out
    assert out.rstrip().splitlines()[-1].strip().startswith("vpnctl ")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert main(["status", "--timeout", "-1"]) == 2
    assert main(["-o", "xml", "status"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_list_shows_services_grouped_by_daemon(
        router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vpnctl(router, capsys, "list")
    assert code == 0
    assert "vpnr.v1.AuditService" in out
    assert "vpnr.v1.IdpService" in out
    assert "grpc.health.v1.Health" in out
    assert f"policyd (down: no socket, {router.socket('policyd')})" in out
    code, out, _ = vpnctl(router, capsys, "list", "-o", "json")
    listing = json.loads(out)
    assert "vpnr.v1.AuditService" in listing["auditd"]["services"]
    assert "grpc.reflection.v1alpha.ServerReflection" in listing["idpd"]["services"]
    assert listing["tunneld"] == {"state": "down", "socket": str(router.socket("tunneld")),
                                  "reason": "no socket"}


def test_list_service_shows_its_methods(
        router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vpnctl(router, capsys, "list", "AuditService", "-o", "json")
    assert code == 0
    listing = json.loads(out)
    assert listing["service"] == "vpnr.v1.AuditService"
    methods = {m["method"]: m for m in listing["methods"]}
    assert methods["vpnr.v1.AuditService.Record"]["request"] == "vpnr.v1.RecordRequest"
    assert methods["vpnr.v1.AuditService.Follow"]["streaming"] == "server"
    code, out, _ = vpnctl(router, capsys, "list", "grpc.health.v1.Health")
    assert code == 0
    assert "grpc.health.v1.Health.Check" in out


def test_describe_method_shows_request_type(
        router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vpnctl(router, capsys, "describe", "vpnr.v1.AuditService.Record")
    assert code == 0
    assert "rpc Record(.vpnr.v1.RecordRequest) returns (.vpnr.v1.RecordResponse);" in out
    code, out, _ = vpnctl(router, capsys, "describe", "AuditService")
    assert "rpc Follow(.vpnr.v1.FollowRequest) returns (stream .vpnr.v1.FollowResponse);" in out


def test_describe_messages_in_proto_syntax(
        router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vpnctl(router, capsys, "describe", "RecordRequest")
    assert code == 0
    assert "message RecordRequest {\n  .vpnr.v1.ControlEvent event = 1;\n}" in out
    _, out, _ = vpnctl(router, capsys, "describe", "vpnr.v1.AuditRecord")
    assert "  oneof event {\n    .vpnr.v1.PacketDecision packet = 4;" in out
    _, out, _ = vpnctl(router, capsys, "describe", "AuditStats")
    assert "map<string, uint64> lost_by_cause = 8;" in out
    _, out, _ = vpnctl(router, capsys, "describe", "IdpStatus", "-o", "yaml")
    described = yaml.safe_load(out)
    assert described["kind"] == "message"
    assert described["daemon"] == "idpd"
    assert {"name": "issuer", "number": 2, "label": "LABEL_OPTIONAL",
            "type": "TYPE_STRING"} in described["descriptor"]["field"]


def test_describe_unknown_or_ambiguous_symbol_exits_2(
        router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = vpnctl(router, capsys, "describe", "NoSuchMessage")
    assert code == 2
    assert "unknown symbol 'NoSuchMessage'" in err
    code, _, err = vpnctl(router, capsys, "describe", "Status")
    assert code == 2
    assert "vpnr.v1.AuditService.Status" in err
    assert "vpnr.v1.IdpService.Status" in err


def test_call_record_returns_an_id(router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    request = '{"event":{"daemon":"test","action":"x.y"}}'
    code, out, err = vpnctl(router, capsys, "call", "vpnr.v1.AuditService/Record", "-d", request,
                            "-o", "json")
    assert (code, err) == (0, "")
    first = int(json.loads(out)["id"])
    code, out, _ = vpnctl(router, capsys, "call", "AuditService/Record", "-d", request)
    assert code == 0
    assert out.startswith("id: ")
    assert int(out.split()[1]) > first


def test_call_server_error_shows_code_and_exits_with_its_code(
        router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = vpnctl(router, capsys, "call", "vpnr.v1.AuditService/Record",
                            "-d", '{"event":{"daemon":"test"}}')
    assert code == 2  # INVALID_ARGUMENT exits like a usage error
    assert out == ""
    assert err == ("error: INVALID_ARGUMENT: event.daemon and event.action are required\n")


@pytest.mark.parametrize(("data", "expected"), [
    ("{bad", "request is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"evnt": {}}', 'no field named "evnt"'),
    ('{"event": {"version_before": "abc"}}', "version_before"),
])
def test_call_bad_json_exits_2(router: Router, capsys: pytest.CaptureFixture[str],
                               data: str, expected: str) -> None:
    code, _, err = vpnctl(router, capsys, "call", "AuditService/Record", "-d", data)
    assert code == 2
    assert err.startswith("error: ")
    assert expected in err


def test_call_request_from_file_and_stdin(router: Router, capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text('{"event": {"daemon": "test", "action": "from.file"}}', encoding="utf-8")
    code, out, _ = vpnctl(router, capsys, "call", "AuditService/Record", "-d", f"@{request}")
    assert code == 0
    assert out.startswith("id: ")
    # The real console script, with the request on its standard input.
    piped = subprocess.run([str(BIN / "vpnctl"), *router.argv("call", "AuditService/Record",
                                                               "-d", "-")],
                           input='{"event": {"daemon": "t", "action": "a"}}',
                           capture_output=True, text=True, timeout=30)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("id: ")
    code, _, err = vpnctl(router, capsys, "call", "AuditService/Record",
                          "-d", f"@{tmp_path / 'missing.json'}")
    assert code == 2
    assert "cannot read request file" in err


def test_call_unknown_method_exits_2(router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = vpnctl(router, capsys, "call", "AuditService/Nope")
    assert code == 2
    assert "has no method 'Nope'" in err


def test_call_health_needs_a_daemon(router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = vpnctl(router, capsys, "call", "grpc.health.v1.Health/Check")
    assert code == 2
    assert "--daemon" in err
    code, out, _ = vpnctl(router, capsys, "call", "grpc.health.v1.Health/Check",
                          "--daemon", "idpd", "-o", "yaml")
    assert code == 0
    assert yaml.safe_load(out) == {"status": "SERVING"}


def test_call_server_streaming_prints_each_message(
        router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    # Watch sends the current status and then waits: the deadline ends the stream.
    code, out, err = vpnctl(router, capsys, "call", "grpc.health.v1.Health/Watch",
                            "--daemon", "auditd", "--timeout", "2", "-o", "yaml")
    assert code == 7  # DEADLINE_EXCEEDED
    assert list(yaml.safe_load_all(out)) == [{"status": "SERVING"}]
    assert err.startswith("error: DEADLINE_EXCEEDED")


def test_call_down_daemon_names_the_socket(
        router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = vpnctl(router, capsys, "call", "PolicyService/Status")
    assert code == 3  # daemon unreachable
    assert err == f"error: cannot reach policyd at {router.socket('policyd')}: no socket\n"


def test_call_output_yaml_parses(router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vpnctl(router, capsys, "call", "IdpService/Status", "-o", "yaml",
                          "--emit-defaults")
    assert code == 0
    status = yaml.safe_load(out)
    assert status["daemon"]["daemon"] == "idpd"
    assert status["daemon"]["instance"] == router.instance
    assert status["discovery_ok"] is False


def test_status_json_shows_up_and_down_daemons(
        router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vpnctl(router, capsys, "status", "-o", "json")
    assert code == 1
    daemons = json.loads(out)["daemons"]
    assert daemons["auditd"]["state"] == "up"
    assert daemons["auditd"]["database"].endswith("audit.sqlite")
    assert daemons["auditd"]["records"] >= 0
    assert daemons["auditd"]["pid"] == router.processes["auditd"].pid
    assert daemons["idpd"]["state"] == "up"
    assert daemons["idpd"]["issuer"] == ""
    assert daemons["idpd"]["discovery_ok"] is False
    for daemon in ("policyd", "tunneld"):
        assert daemons[daemon] == {"state": "down", "reason": "no socket",
                                   "socket": str(router.socket(daemon))}


def test_status_yaml_and_table(router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vpnctl(router, capsys, "status", "-o", "yaml")
    assert code == 1
    status: dict[str, Any] = yaml.safe_load(out)
    assert status["instance"] == router.instance
    assert status["daemons"]["idpd"]["state"] == "up"
    code, out, _ = vpnctl(router, capsys, "status")
    assert code == 1
    lines = out.splitlines()
    assert lines[1].split() == ["DAEMON", "STATE", "VERSION", "UPTIME", "DETAILS"]
    assert any(line.startswith("auditd") and " up " in line and "records=" in line
               for line in lines)
    assert any(line.startswith("tunneld") and "no socket" in line for line in lines)


def test_health_of_one_and_all_daemons(router: Router,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vpnctl(router, capsys, "health", "auditd", "-o", "json")
    assert code == 0
    assert json.loads(out)["auditd"]["status"] == "SERVING"
    code, out, _ = vpnctl(router, capsys, "health", "-o", "json")
    assert code == 1
    health = json.loads(out)
    assert health["idpd"]["status"] == "SERVING"
    assert health["policyd"]["status"] == "DOWN"
    code, out, _ = vpnctl(router, capsys, "health", "idpd", "--service", "no.such.Service")
    assert code == 1
    assert "NOT_FOUND" in out


def test_console_script_and_permission_denied(router: Router) -> None:
    script = str(BIN / "vpnctl")
    done = subprocess.run([script, *router.argv("call", "AuditService/Record", "-d", "{}")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2  # INVALID_ARGUMENT exits like a usage error
    assert "INVALID_ARGUMENT" in done.stderr
    done = subprocess.run([script, *router.argv("status", "-o", "json")],
                          capture_output=True, text=True, timeout=30,
                          user=NOBODY, group=NOBODY, extra_groups=[])
    assert done.returncode == 1
    auditd = json.loads(done.stdout)["daemons"]["auditd"]
    assert auditd["state"] == "down"
    assert auditd["reason"].startswith("permission denied")


def test_sigterm_removes_the_socket_and_status_shows_down(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    single = make_router(tmp_path)
    try:
        single.start("auditd")
        code, out, _ = vpnctl(single, capsys, "health", "auditd")
        assert code == 0
        assert single.stop("auditd") == 0
        assert not single.socket("auditd").exists()
        code, out, _ = vpnctl(single, capsys, "status", "-o", "json")
        assert code == 1
        assert json.loads(out)["daemons"]["auditd"]["reason"] == "no socket"
    finally:
        single.stop_all()
