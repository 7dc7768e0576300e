"""vpnctl's policy verbs against a real policyd in a network namespace: no mocks.

Decisions come from the live XDP program (TestDecision runs it with BPF_PROG_TEST_RUN), so
the expectations below follow DESIGN.md's policy semantics: deny wins, then allow, else
default deny; a source without a binding is denied; non-first fragments match only rules
without ports.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import BIN, DaemonProcess, router_toml
from vpnr.vpnctl import policyfile
from vpnr.vpnctl.main import main

POLICY = '''\
[[roles]]
name = "eng"
description = "engineering"

  [[roles.rules]]
  id = 10
  priority = 0
  action = "allow"
  protocol = "tcp"
  dst = "10.2.0.0/24"
  ports = "22"
  description = "ssh to site B"

  [[roles.rules]]
  id = 11
  priority = 5
  action = "allow"
  protocol = "icmp"
  dst = "10.2.0.0/24"

[[roles]]
name = "contractor"

  [[roles.rules]]
  id = 30
  priority = 0
  action = "deny"
  protocol = "any"
  dst = "10.2.0.10/32"

[[roles]]
name = "v6"

  [[roles.rules]]
  id = 40
  priority = 0
  action = "allow"
  protocol = "any"
  dst = "fd00:2::/64"

[[bindings]]
prefix = "10.1.0.10/32"
roles = ["eng"]
source = "admin"
subject = "alice"

[[bindings]]
prefix = "10.1.0.20/32"
roles = ["eng", "contractor"]
source = "admin"
subject = "carol"

[[bindings]]
prefix = "fd00:1::/64"
roles = ["v6"]
source = "admin"

[[zones]]
prefix = "10.2.0.0/16"
zone = "internal"
description = "site B"

[[tests]]
name = "alice ssh to site B"
src = "10.1.0.10"
dst = "10.2.0.5"
protocol = "tcp"
dst_port = 22
expect = "allow"
expect_reason = "rule_allow"
expect_rule = 10

[[tests]]
name = "alice http is not allowed"
src = "10.1.0.10"
dst = "10.2.0.5"
protocol = "tcp"
dst_port = 80
expect = "deny"
expect_reason = "default_deny"

[[tests]]
name = "alice ping"
src = "10.1.0.10"
dst = "10.2.0.5"
protocol = "icmp"
icmp_type = 8
expect = "allow"
expect_rule = 11

[[tests]]
name = "unbound source"
src = "10.1.0.99"
dst = "10.2.0.5"
protocol = "tcp"
dst_port = 22
expect = "deny"
expect_reason = "no_role"

[[tests]]
name = "deny wins for carol"
src = "10.1.0.20"
dst = "10.2.0.10"
protocol = "tcp"
dst_port = 22
expect = "deny"
expect_reason = "rule_deny"
expect_rule = 30

[[tests]]
name = "a later fragment carries no port"
src = "10.1.0.10"
dst = "10.2.0.5"
protocol = "tcp"
fragment = true
expect = "deny"
expect_reason = "default_deny"

[[tests]]
name = "v6 to site B"
src = "fd00:1::5"
dst = "fd00:2::1"
protocol = "udp"
dst_port = 53
expect = "allow"
expect_rule = 40
'''

WRONG_EXPECTATIONS = '''\
[[tests]]
name = "right"
src = "10.1.0.10"
dst = "10.2.0.5"
protocol = "tcp"
dst_port = 22
expect = "allow"

[[tests]]
name = "wrong verdict"
src = "10.1.0.10"
dst = "10.2.0.5"
protocol = "tcp"
dst_port = 80
expect = "allow"

[[tests]]
name = "wrong rule"
src = "10.1.0.20"
dst = "10.2.0.10"
protocol = "tcp"
dst_port = 22
expect = "deny"
expect_rule = 10
'''


@dataclass
class Router:
    """Where vpnctl finds the instance's sockets."""

    instance: str
    run_dir: Path

    def argv(self, *args: str) -> list[str]:
        """vpnctl arguments pointed at this instance."""
        return ["--instance", self.instance, "--run-dir", str(self.run_dir), *args]


@pytest.fixture
def policyd(tmp_path: Path, netns: str, instance: str) -> Iterator[Router]:
    """policyd serving in a namespace whose lan0 carries its program; stopped after."""
    config = tmp_path / "router.toml"
    config.write_text(router_toml(instance, tmp_path, interface="lan0"))
    proc = DaemonProcess("policyd", config, tmp_path / "run", instance, netns=netns).start()
    try:
        yield Router(instance, tmp_path / "run")
    finally:
        code = proc.stop()
    assert code == 0, proc.output()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    """The policy above, with its tests, as a TOML file."""
    path = tmp_path / "policy.toml"
    path.write_text(POLICY, encoding="utf-8")
    return path


def vpnctl(router: Router, capsys: pytest.CaptureFixture[str],
           *args: str) -> tuple[int, str, str]:
    """Run vpnctl in-process against the router; exit code, stdout, stderr."""
    code = main(router.argv(*args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def vpnctl_json(router: Router, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """Run a verb with ``-o json``; it must succeed; its output parsed."""
    code, out, err = vpnctl(router, capsys, *args, "-o", "json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def vpnctl_json_code(router: Router, capsys: pytest.CaptureFixture[str], expected: int,
                     *args: str) -> Any:
    """Like vpnctl_json, for a verb expected to exit with ``expected``."""
    code, out, _ = vpnctl(router, capsys, *args, "-o", "json")
    assert code == expected
    return json.loads(out)


def imported(router: Router, capsys: pytest.CaptureFixture[str], path: Path) -> int:
    """Import a policy file; the new version."""
    reply = vpnctl_json(router, capsys, "policy", "import", str(path))
    return int(reply["version"])


def canonical(policy: Any) -> dict[str, Any]:
    """A document as file data with each section sorted: the server may order as it likes."""
    data = policyfile.to_data(policy)
    for section, key in (("roles", "name"), ("bindings", "prefix"), ("zones", "prefix")):
        data[section] = sorted(data.get(section, []), key=lambda item: str(item[key]))
    return data


# ------------------------------------------------------------------- no daemon needed

VERBS = {"policy": ("import", "export", "check", "test", "show"),
         "snapshot": ("create", "list", "diff", "restore", "delete"),
         "role": ("list", "get", "create", "delete"),
         "rule": ("list", "add", "delete"),
         "binding": ("list", "add", "delete"),
         "zone": ("list", "set", "delete")}


@pytest.mark.parametrize("argv", [[group] for group in VERBS]
                         + [[group, verb] for group, verbs in VERBS.items() for verb in verbs],
                         ids=" ".join)
def test_help_of_every_verb_ends_with_examples(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n" in out
    last = out.rstrip().splitlines()[-1].strip()
    assert last.startswith(f"vpnctl {argv[0]} ") or last.startswith("vpnctl --instance")


def test_bad_policy_file_exits_2_naming_the_place(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[roles]]\nname = "eng"\n[[roles.rules]]\nid = 1\naction = "allow"\n'
                   'protocol = "tcp"\nports = "70000"\nsrc = "10.0.0.1/8"\n')
    router = Router("nosuch", tmp_path / "run")
    for verb in ("import", "check"):
        code, out, err = vpnctl(router, capsys, "policy", verb, str(bad))
        assert (code, out) == (2, "")
        assert err == (f'error: {bad}: roles[0].rules[0].src: "10.0.0.1/8" has host bits set '
                       '(the prefix would be "10.0.0.0/8")\n'
                       f'error: {bad}: roles[0].rules[0].ports: expected "N" or "N-M" with '
                       '1 <= N <= M <= 65535, got "70000"\n')
    code, _, err = vpnctl(router, capsys, "policy", "import", str(tmp_path / "policy.json"))
    assert code == 2
    assert "cannot tell the format from the extension '.json'" in err
    code, _, err = vpnctl(router, capsys, "policy", "export", str(tmp_path / "out.txt"))
    assert code == 2
    assert "(or give --format)" in err


def test_check_refuses_a_file_without_tests(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "no-tests.yaml"
    empty.write_text("roles: [{name: eng}]\n")
    code, _, err = vpnctl(Router("nosuch", tmp_path / "run"), capsys, "policy", "check",
                          str(empty))
    assert code == 2
    assert err == f"error: {empty}: no tests to check (add [[tests]] entries)\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["rule", "add", "--role", "eng", "--action", "allow", "--ports", "70000"],
     'argument --ports: expected "N" or "N-M" with 1 <= N <= M <= 65535, got "70000"'),
    (["rule", "add", "--role", "eng", "--action", "allow", "--ports", "22"],
     "--ports 22 needs --protocol tcp or udp"),
    (["binding", "add", "10.1.0.1/24", "--roles", "eng"], "has host bits set"),
    (["policy", "test", "--src", "10.1.0.300", "--dst", "10.2.0.1"],
     "argument --src: expected an IPv4 or IPv6 address, got '10.1.0.300'"),
    (["policy", "test", "--src", "10.1.0.1", "--dst", "10.2.0.1", "--dport", "0"],
     "argument --dport: expected a port (1-65535), got 0"),
    (["snapshot", "diff", "3", "now"], "expected a snapshot id or 'live', got 'now'"),
    (["zone", "set", "10.2.0.0/16", "dmz"], "argument ZONE: invalid choice: 'dmz'"),
])
def test_bad_arguments_exit_2(argv: list[str], message: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = vpnctl(Router("nosuch", tmp_path / "run"), capsys, *argv)
    assert code == 2
    assert message in err


def test_down_policyd_names_the_socket(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    router = Router("nosuch", tmp_path / "run")
    socket = tmp_path / "run" / "nosuch" / "policyd.sock"
    for argv in (["policy", "show"], ["role", "list"], ["snapshot", "list"]):
        code, out, err = vpnctl(router, capsys, *argv)
        assert (code, out) == (3, "")  # 3: daemon unreachable
        assert err == f"error: cannot reach policyd at {socket}: no socket\n"


# ------------------------------------------------------------------- against policyd

@pytest.mark.root
def test_import_show_export_round_trip(policyd: Router, policy_file: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = vpnctl(policyd, capsys, "policy", "import", str(policy_file))
    assert (code, err) == (0, "")
    assert out.startswith(f"imported {policy_file}\npolicy version ")
    assert "roles:    3 added (" in out
    assert "bindings: 3 added (" in out
    assert "zones:    1 added (10.2.0.0/16 internal)" in out
    assert f"the file has 7 tests: vpnctl --instance {policyd.instance} policy check" in out

    shown = vpnctl_json(policyd, capsys, "policy", "show")
    assert shown["version"] > 0
    assert sorted(role["name"] for role in shown["roles"]) == ["contractor", "eng", "v6"]
    assert {role["name"]: role["rules"] for role in shown["roles"]} == {
        "eng": 2, "contractor": 1, "v6": 1}
    assert (shown["rules"], shown["bindings"]) == (4, 3)
    assert shown["zones"] == [{"prefix": "10.2.0.0/16", "zone": "internal",
                               "description": "site B"}]

    source = policyfile.load(policy_file).policy
    for name in ("export.toml", "export.yaml"):
        written = vpnctl_json(policyd, capsys, "policy", "export", str(tmp_path / name))
        assert written == {"file": str(tmp_path / name), "version": shown["version"],
                           "roles": 3, "rules": 4, "bindings": 3, "zones": 1}
        exported = policyfile.load(tmp_path / name)
        assert canonical(exported.policy) == canonical(source)
        assert exported.tests == []
    assert (tmp_path / "export.toml").read_text().startswith(
        f"# vpnr policy of instance {policyd.instance}, version {shown['version']} ")

    # Re-importing what was exported changes nothing.
    code, out, _ = vpnctl(policyd, capsys, "policy", "import", str(tmp_path / "export.yaml"))
    assert code == 0
    assert "  no changes" in out


@pytest.mark.root
def test_export_to_stdout_is_toml_or_yaml(policyd: Router, policy_file: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    imported(policyd, capsys, policy_file)
    source = canonical(policyfile.load(policy_file).policy)
    code, out, _ = vpnctl(policyd, capsys, "policy", "export", "-")
    assert code == 0
    assert canonical(policyfile.loads(out, "toml", "stdout").policy) == source
    code, out, _ = vpnctl(policyd, capsys, "policy", "export", "-", "--format", "yaml")
    assert code == 0
    assert canonical(policyfile.loads(out, "yaml", "stdout").policy) == source


@pytest.mark.root
def test_import_with_expected_version_is_compare_and_set(
        policyd: Router, policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    version = imported(policyd, capsys, policy_file)
    code, out, err = vpnctl(policyd, capsys, "policy", "import", str(policy_file),
                            "--expected-version", str(version + 100))
    assert (code, out) == (5, "")  # 5: conflict
    assert err.startswith("error: FAILED_PRECONDITION")
    assert vpnctl_json(policyd, capsys, "policy", "show")["version"] == version
    reply = vpnctl_json(policyd, capsys, "policy", "import", str(policy_file),
                        "--expected-version", str(version), "--reason", "test: re-import")
    assert reply["diff"]["from_version"] == version


@pytest.mark.root
def test_check_passes_against_the_live_program(
        policyd: Router, policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    version = imported(policyd, capsys, policy_file)
    code, out, err = vpnctl(policyd, capsys, "policy", "check", str(policy_file))
    assert (code, err) == (0, ""), out
    lines = out.splitlines()
    assert lines[0].split() == ["RESULT", "TEST", "EXPECT", "VERDICT", "REASON", "ROLES",
                                "RULE", "DETAIL"]
    assert sum(line.startswith("PASS ") for line in lines) == 7
    assert lines[-1].startswith("7 passed, 0 failed")
    report = vpnctl_json(policyd, capsys, "policy", "check", str(policy_file))
    results = {result["test"]: result for result in report["results"]}
    assert (report["passed"], report["failed"], report["errors"]) == (7, 0, 0)
    carol = results["deny wins for carol"]["decision"]
    assert sorted(carol["roles"]) == ["contractor", "eng"]
    assert carol["matched_rule"]["id"] == 30
    assert carol["program_id"] > 0
    # check runs the tests; it never imports.
    assert vpnctl_json(policyd, capsys, "policy", "show")["version"] == version


@pytest.mark.root
def test_check_reports_mismatches_and_exits_1(
        policyd: Router, policy_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    imported(policyd, capsys, policy_file)
    wrong = tmp_path / "wrong.yaml"
    loaded = policyfile.loads(WRONG_EXPECTATIONS, "toml", "wrong")
    policyfile.dump(wrong, loaded.policy, loaded.tests)
    code, out, _ = vpnctl(policyd, capsys, "policy", "check", str(wrong))
    assert code == 1
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["PASS", "FAIL", "FAIL"]
    assert "verdict deny, expected allow" in lines[2]
    assert "rule 30, expected 10" in lines[3]
    assert lines[-1].startswith("1 passed, 2 failed")
    report = vpnctl_json_code(policyd, capsys, 1, "policy", "check", str(wrong))
    results = {result["test"]: result for result in report["results"]}
    assert [r["result"] for r in report["results"]] == ["pass", "fail", "fail"]
    assert results["wrong verdict"]["mismatches"] == ["verdict deny, expected allow"]
    assert results["wrong verdict"]["decision"]["reason"] == "default_deny"
    assert results["wrong rule"]["mismatches"] == ["rule 30, expected 10"]
    # The console script exits 1 too (what CI runs).
    done = subprocess.run([str(BIN / "vpnctl"), *policyd.argv("policy", "check", str(wrong))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "FAIL" in done.stdout


@pytest.mark.root
def test_policy_test_explains_one_packet(policyd: Router, policy_file: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    imported(policyd, capsys, policy_file)
    decision = vpnctl_json(policyd, capsys, "policy", "test", "--src", "10.1.0.10",
                           "--dst", "10.2.0.5", "--dport", "22", "--sport", "40000",
                           "--interface", "lan0")
    assert (decision["verdict"], decision["reason"], decision["roles"]) == (
        "allow", "rule_allow", ["eng"])
    assert decision["matched_rule"]["id"] == 10
    assert decision["matched_rule"]["role"] == "eng"
    assert decision["dst_zone"] == "internal"
    assert decision["program_id"] > 0
    assert decision["explanation"]
    code, out, _ = vpnctl(policyd, capsys, "policy", "test", "--src", "10.1.0.10",
                          "--dst", "10.2.0.5", "--dport", "22")
    assert code == 0
    assert "verdict:" in out and "allow" in out
    assert "matched_rule: 10 (eng): allow tcp any -> 10.2.0.0/24 port 22" in out
    fragment = vpnctl_json(policyd, capsys, "policy", "test", "--src", "10.1.0.10",
                           "--dst", "10.2.0.5", "--fragment")
    assert (fragment["verdict"], fragment["reason"]) == ("deny", "default_deny")
    assert fragment["matched_rule"] is None
    nobody = vpnctl_json(policyd, capsys, "policy", "test", "--src", "10.1.0.99",
                         "--dst", "10.2.0.5", "--protocol", "udp", "--dport", "53")
    assert (nobody["verdict"], nobody["reason"], nobody["roles"]) == ("deny", "no_role", [])


@pytest.mark.root
def test_roles_create_get_list_delete(policyd: Router,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    created = vpnctl_json(policyd, capsys, "role", "create", "ops",
                          "--description", "operations")
    assert (created["name"], created["description"], created["rules"]) == (
        "ops", "operations", [])
    code, out, _ = vpnctl(policyd, capsys, "role", "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["NAME", "ID", "RULES", "DESCRIPTION"]
    assert any(line.split()[:1] == ["ops"] for line in out.splitlines()[1:])
    got = vpnctl_json(policyd, capsys, "role", "get", "ops")
    assert got["name"] == "ops"
    code, out, err = vpnctl(policyd, capsys, "role", "create", "ops")
    assert code == 5  # conflict
    assert err.startswith("error: ALREADY_EXISTS")
    code, out, _ = vpnctl(policyd, capsys, "role", "delete", "ops")
    assert code == 0
    assert out.startswith("deleted role ops (policy version ")
    code, _, err = vpnctl(policyd, capsys, "role", "get", "ops")
    assert code == 4  # NOT_FOUND
    assert err.startswith("error: NOT_FOUND")
    code, _, err = vpnctl(policyd, capsys, "role", "create", "Not A Name")
    assert code == 2  # INVALID_ARGUMENT: usage
    assert err.startswith("error: INVALID_ARGUMENT")


@pytest.mark.root
def test_rules_and_bindings_change_the_live_decision(
        policyd: Router, capsys: pytest.CaptureFixture[str]) -> None:
    vpnctl_json(policyd, capsys, "role", "create", "eng")
    rule = vpnctl_json(policyd, capsys, "rule", "add", "--role", "eng", "--action", "allow",
                       "--protocol", "tcp", "--dst", "10.2.0.0/24", "--ports", "22-23",
                       "--id", "77", "--description", "ssh")
    assert rule == {"id": 77, "role": "eng", "priority": 0, "action": "allow",
                    "protocol": "tcp", "src": "", "dst": "10.2.0.0/24", "ports": "22-23",
                    "description": "ssh"}
    assigned = vpnctl_json(policyd, capsys, "rule", "add", "--role", "eng", "--action",
                           "deny", "--dst", "10.2.0.10/32")
    assert assigned["id"] > 0 and assigned["id"] != 77
    rules = vpnctl_json(policyd, capsys, "rule", "list", "--role", "eng")
    assert sorted(r["id"] for r in rules) == sorted([77, assigned["id"]])
    binding = vpnctl_json(policyd, capsys, "binding", "add", "10.1.0.10", "--roles", "eng",
                          "--subject", "alice")
    assert (binding["prefix"], binding["roles"], binding["subject"]) == (
        "10.1.0.10/32", ["eng"], "alice")
    listed = vpnctl_json(policyd, capsys, "binding", "list", "--role", "eng")
    assert [b["prefix"] for b in listed] == ["10.1.0.10/32"]
    assert vpnctl_json(policyd, capsys, "binding", "list", "--source", "idpd") == []

    def decide(port: str) -> tuple[str, str, int | None]:
        found = vpnctl_json(policyd, capsys, "policy", "test", "--src", "10.1.0.10",
                            "--dst", "10.2.0.5", "--dport", port)
        rule_id = found["matched_rule"]["id"] if found["matched_rule"] else None
        return found["verdict"], found["reason"], rule_id

    assert decide("23") == ("allow", "rule_allow", 77)
    code, out, _ = vpnctl(policyd, capsys, "rule", "delete", "77")
    assert (code, out.split(" (")[0]) == (0, "deleted rule 77")
    assert decide("23") == ("deny", "default_deny", None)
    code, _, _ = vpnctl(policyd, capsys, "binding", "delete", "10.1.0.10/32")
    assert code == 0
    assert decide("23") == ("deny", "no_role", None)
    code, _, err = vpnctl(policyd, capsys, "rule", "delete", "77")
    assert code == 4  # NOT_FOUND
    assert err.startswith("error: NOT_FOUND")


@pytest.mark.root
def test_zone_set_creates_then_updates(policyd: Router,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert vpnctl_json(policyd, capsys, "zone", "list") == []
    code, out, _ = vpnctl(policyd, capsys, "zone", "list")
    assert (code, out) == (0, "(no zones)\n")
    first = vpnctl_json(policyd, capsys, "zone", "set", "10.2.0.0/16", "vpn",
                        "--description", "site B")
    assert first == {"prefix": "10.2.0.0/16", "zone": "vpn", "description": "site B"}
    vpnctl_json(policyd, capsys, "zone", "set", "10.2.0.0/16", "internal")
    zones = yaml.safe_load(vpnctl(policyd, capsys, "zone", "list", "-o", "yaml")[1])
    assert [(z["prefix"], z["zone"]) for z in zones] == [("10.2.0.0/16", "internal")]
    code, out, _ = vpnctl(policyd, capsys, "zone", "delete", "10.2.0.0/16")
    assert code == 0
    assert out.startswith("deleted zone 10.2.0.0/16")
    assert vpnctl_json(policyd, capsys, "zone", "list") == []


@pytest.mark.root
def test_list_verbs_fetch_every_page(policyd: Router, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    roles = [f"r{n:02d}" for n in range(23)]
    text = "".join(f'[[roles]]\nname = "{name}"\n[[roles.rules]]\nid = {n + 1}\n'
                   f'action = "allow"\ndst = "10.2.{n}.0/24"\n'
                   for n, name in enumerate(roles))
    text += "".join(f'[[bindings]]\nprefix = "10.1.{n}.0/24"\nroles = ["{name}"]\n'
                    f'source = "admin"\n' for n, name in enumerate(roles))
    text += "".join(f'[[zones]]\nprefix = "10.3.{n}.0/24"\nzone = "internal"\n'
                    for n in range(23))
    path = tmp_path / "many.toml"
    path.write_text(text)
    imported(policyd, capsys, path)
    for verb, key in (("role", "name"), ("rule", "id"), ("binding", "prefix"),
                      ("zone", "prefix")):
        items = vpnctl_json(policyd, capsys, verb, "list", "--page-size", "2")
        assert len(items) == 23, verb
        assert len({item[key] for item in items}) == 23, verb
    assert len(vpnctl_json(policyd, capsys, "role", "list")) == 23


@pytest.mark.root
def test_snapshots_create_diff_restore_delete(
        policyd: Router, policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    version = imported(policyd, capsys, policy_file)
    snapshot = vpnctl_json(policyd, capsys, "snapshot", "create", "before-ops")
    assert snapshot["name"] == "before-ops"
    assert snapshot["policy_version"] == version
    assert (snapshot["roles"], snapshot["rules"], snapshot["bindings"], snapshot["zones"]) \
        == (3, 4, 3, 1)
    vpnctl_json(policyd, capsys, "role", "create", "ops")
    listed = vpnctl_json(policyd, capsys, "snapshot", "list")
    assert [s["id"] for s in listed if s["name"] == "before-ops"] == [snapshot["id"]]

    diff = vpnctl_json(policyd, capsys, "snapshot", "diff", str(snapshot["id"]), "live")
    assert diff["roles_added"] == ["ops"]
    assert diff["roles_removed"] == [] and diff["bindings_added"] == []
    code, out, _ = vpnctl(policyd, capsys, "snapshot", "diff", str(snapshot["id"]), "live")
    assert code == 0
    assert "  roles:    1 added (ops)" in out

    restored = vpnctl_json(policyd, capsys, "snapshot", "restore", str(snapshot["id"]))
    assert restored["version"] > version
    assert restored["diff"]["roles_removed"] == ["ops"]
    names = [role["name"] for role in vpnctl_json(policyd, capsys, "role", "list")]
    assert sorted(names) == ["contractor", "eng", "v6"]

    code, out, _ = vpnctl(policyd, capsys, "snapshot", "delete", str(snapshot["id"]))
    assert (code, out) == (0, f"deleted snapshot {snapshot['id']}\n")
    listed = vpnctl_json(policyd, capsys, "snapshot", "list")
    assert snapshot["id"] not in [s["id"] for s in listed]
    code, _, err = vpnctl(policyd, capsys, "snapshot", "restore", str(snapshot["id"]))
    assert code == 4  # NOT_FOUND
    assert err.startswith("error: NOT_FOUND")
