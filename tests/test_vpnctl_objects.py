"""The verbs added so that every PolicyService and AuditService RPC has one, against a real
policyd (in a namespace of its own, from conftest's ``policyd`` fixture) and a real auditd of
the same instance: role update, rule get/update, binding get/update/replace, zone get,
policy status, audit status and audit record. Each answer is checked in the form a user
reads it, and what changed is read back with another verb."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from conftest import DaemonProcess, RunningPolicyd
from vpnr.vpnctl.exitcodes import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_USAGE
from vpnr.vpnctl.main import main

pytestmark = pytest.mark.root


def vpnctl(policyd: RunningPolicyd, capsys: pytest.CaptureFixture[str],
           *args: str) -> tuple[int, str, str]:
    """vpnctl in-process against the instance: exit code, stdout, stderr."""
    run_dir = policyd.process.run_dir
    code = main(["--instance", policyd.instance, "--run-dir", str(run_dir), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def as_json(policyd: RunningPolicyd, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """A verb with -o json that must succeed; its output parsed."""
    code, out, err = vpnctl(policyd, capsys, *args, "-o", "json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def test_role_and_rule_get_and_update(policyd: RunningPolicyd,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    as_json(policyd, capsys, "role", "create", "eng", "--description", "engineering")
    rule = as_json(policyd, capsys, "rule", "add", "--role", "eng", "--action", "allow",
                   "--protocol", "tcp", "--dst", "10.2.0.0/24", "--ports", "22")
    role = as_json(policyd, capsys, "role", "update", "eng", "--description", "all sites")
    assert (role["name"], role["description"]) == ("eng", "all sites")
    assert [r["id"] for r in role["rules"]] == [rule["id"]]  # its rules stay
    assert as_json(policyd, capsys, "role", "get", "eng")["description"] == "all sites"

    got = as_json(policyd, capsys, "rule", "get", str(rule["id"]))
    assert got == rule
    updated = as_json(policyd, capsys, "rule", "update", str(rule["id"]), "--ports", "2222",
                      "--dst", "any", "--description", "ssh anywhere")
    assert updated == {**rule, "ports": "2222", "dst": "", "description": "ssh anywhere"}
    code, out, _ = vpnctl(policyd, capsys, "rule", "get", str(rule["id"]), "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == updated
    code, out, _ = vpnctl(policyd, capsys, "rule", "get", str(rule["id"]))
    shown = dict(line.split(":", 1) for line in out.splitlines())
    assert code == 0 and (shown["src"].strip(), shown["dst"].strip()) == ("any", "any")
    assert shown["ports"].strip() == "2222"
    # A stale --expected-version is a conflict (5); a missing rule NOT_FOUND (4).
    code, _, err = vpnctl(policyd, capsys, "rule", "update", str(rule["id"]),
                          "--priority", "3", "--expected-version", "1")
    assert code == EXIT_CONFLICT and err.startswith("error: FAILED_PRECONDITION"), err
    code, _, err = vpnctl(policyd, capsys, "rule", "get", "4242")
    assert code == EXIT_NOT_FOUND and err.startswith("error: NOT_FOUND"), err
    code, _, err = vpnctl(policyd, capsys, "role", "update", "nosuch", "--description", "x")
    assert code == EXIT_NOT_FOUND, err


def test_binding_get_update_replace_and_zone_get(
        policyd: RunningPolicyd, capsys: pytest.CaptureFixture[str]) -> None:
    for role in ("eng", "ops"):
        as_json(policyd, capsys, "role", "create", role)
    as_json(policyd, capsys, "binding", "add", "10.1.0.10/32", "--roles", "eng",
            "--subject", "alice")
    got = as_json(policyd, capsys, "binding", "get", "10.1.0.10")  # an address: its /32
    assert (got["prefix"], got["roles"], got["subject"]) == ("10.1.0.10/32", ["eng"], "alice")
    updated = as_json(policyd, capsys, "binding", "update", "10.1.0.10/32", "--roles",
                      "eng,ops")
    assert (updated["roles"], updated["subject"]) == (["eng", "ops"], "alice")
    code, _, err = vpnctl(policyd, capsys, "binding", "update", "10.1.0.10/32")
    assert code == EXIT_USAGE and "nothing to change" in err

    version = as_json(policyd, capsys, "policy", "show")["version"]
    replaced = as_json(policyd, capsys, "binding", "replace", "--source", "lab",
                       "--binding", "10.1.5.0/24=ops@bob@example.com",
                       "--binding", "10.1.6.0/24=eng,ops")
    assert (replaced["source"], replaced["bindings"]) == ("lab", 2)
    assert replaced["version"] == version + 1  # one version for the whole change
    lab = as_json(policyd, capsys, "binding", "list", "--source", "lab")
    assert [(b["prefix"], b["roles"], b["subject"]) for b in lab] == [
        ("10.1.5.0/24", ["ops"], "bob@example.com"), ("10.1.6.0/24", ["eng", "ops"], "")]
    # The admin binding of another source is left alone; --empty clears the source.
    code, out, _ = vpnctl(policyd, capsys, "binding", "replace", "--source", "lab", "--empty")
    assert code == 0 and out.startswith("replaced the bindings of source lab (0 now)")
    assert as_json(policyd, capsys, "binding", "list", "--source", "lab") == []
    assert as_json(policyd, capsys, "binding", "get", "10.1.0.10/32")["roles"] == ["eng", "ops"]
    code, _, err = vpnctl(policyd, capsys, "binding", "replace", "--source", "lab")
    assert code == EXIT_USAGE and "--empty" in err

    as_json(policyd, capsys, "zone", "set", "10.2.0.0/16", "vpn", "--description", "site B")
    assert as_json(policyd, capsys, "zone", "get", "10.2.0.0/16") == \
        {"prefix": "10.2.0.0/16", "zone": "vpn", "description": "site B"}
    code, _, err = vpnctl(policyd, capsys, "zone", "get", "10.9.0.0/16")
    assert code == EXIT_NOT_FOUND and err.startswith("error: NOT_FOUND"), err


def test_policy_status_audit_status_and_record(
        policyd: RunningPolicyd, capsys: pytest.CaptureFixture[str]) -> None:
    status = as_json(policyd, capsys, "policy", "status")
    assert status["daemon"]["daemon"] == "policyd"
    assert sorted(i["name"] for i in status["interfaces"]) == ["lan0", "wan0"]
    code, out, _ = vpnctl(policyd, capsys, "policy", "status")
    assert code == 0 and "interfaces:" in out.splitlines()

    auditd = DaemonProcess("auditd", policyd.config, policyd.process.run_dir,
                           policyd.instance, netns=policyd.netns).start()
    try:
        before = as_json(policyd, capsys, "audit", "status")
        assert before["daemon"]["daemon"] == "auditd"
        recorded = as_json(policyd, capsys, "audit", "record", "note.add", "--detail",
                           '{"text": "maintenance starts"}')
        assert recorded["action"] == "note.add" and recorded["id"] > 0
        code, out, _ = vpnctl(policyd, capsys, "audit", "record", "firewall.change",
                              "--daemon", "ops", "--error", "rolled back")
        assert code == 0 and out.startswith("recorded firewall.change as record ")
        events = as_json(policyd, capsys, "audit", "events", "--control", "--limit", "5")
        mine = {event["control"]["action"]: event for event in events
                if event.get("control", {}).get("action") in ("note.add", "firewall.change")}
        assert json.loads(mine["note.add"]["control"]["detail_json"]) == \
            {"text": "maintenance starts"}
        assert mine["firewall.change"]["control"]["daemon"] == "ops"
        assert mine["firewall.change"]["control"]["error"] == "rolled back"
        code, out, _ = vpnctl(policyd, capsys, "audit", "status", "-o", "yaml")
        assert code == 0 and int(yaml.safe_load(out)["records"]) >= int(before["records"]) + 2
        code, _, err = vpnctl(policyd, capsys, "audit", "record", "x", "--detail", "[1]")
        assert code == EXIT_USAGE and "expected a JSON object" in err
    finally:
        assert auditd.stop() == 0
