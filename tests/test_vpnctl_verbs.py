"""The shape of vpnctl as a whole, without daemons: every RPC of every vpnr service has a
friendly verb (services/vpnctl/verbmap.py, checked against the generated descriptors and the
parser), every verb's --help ends with examples, the exit code table is in --help, and
docs/vpnctl.md is exactly what the code generates."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from conftest import BIN
from vpnr.v1 import audit_pb2, idp_pb2, policy_pb2, tunnel_pb2
from vpnr.vpnctl.exitcodes import EXIT_TABLE, EXIT_USAGE
from vpnr.vpnctl.main import build_parser, main
from vpnr.vpnctl.reference import leaves, reference_markdown
from vpnr.vpnctl.verbmap import VERB_RPCS

DOCS = Path(__file__).resolve().parent.parent / "docs" / "vpnctl.md"
# Commands that are not about one service's RPCs: reflection, health, completion.
GENERIC = {"list", "describe", "call", "health", "completion"}


def all_rpcs() -> set[str]:
    """``Service/Method`` of every method of every vpnr service, from the descriptors."""
    return {f"{service.full_name}/{method.name}"
            for module in (policy_pb2, tunnel_pb2, audit_pb2, idp_pb2)
            for service in module.DESCRIPTOR.services_by_name.values()
            for method in service.methods}


def leaf_verbs() -> dict[str, argparse.ArgumentParser]:
    """Every runnable command without the leading ``vpnctl``."""
    return {path.removeprefix("vpnctl "): parser for path, parser in leaves(build_parser({}))}


def test_every_rpc_of_every_service_has_a_verb() -> None:
    rpcs = all_rpcs()
    assert len(rpcs) >= 59  # the four services of proto/vpnr/v1 (59 methods when written)
    mapped = {rpc for called in VERB_RPCS.values() for rpc in called}
    assert sorted(rpcs - mapped) == []  # an RPC nobody can reach without `vpnctl call`
    assert sorted(mapped - rpcs) == []  # a verb naming an RPC that does not exist


def test_every_mapped_verb_exists_and_every_verb_is_mapped() -> None:
    verbs = leaf_verbs()
    assert sorted(set(VERB_RPCS) - set(verbs)) == []
    assert sorted(set(verbs) - set(VERB_RPCS) - GENERIC) == []
    tunnel = {verb for verb in verbs if verb.split()[0] in ("tunnel", "peer", "session")}
    assert tunnel == {"tunnel status", "tunnel rotate-key", "peer add", "peer get",
                      "peer list", "peer update", "peer remove", "peer revoke",
                      "session list", "session create", "session delete", "session rotate"}


@pytest.mark.parametrize("verb", sorted(leaf_verbs()))
def test_every_verb_help_has_examples(verb: str) -> None:
    parser = leaf_verbs()[verb]
    text = parser.format_help()
    lines = text.splitlines()
    assert "examples:" in lines, text
    examples = [line.strip() for line in lines[lines.index("examples:") + 1:]]
    # At least one example runs this very verb (global options may come first).
    assert any(line.startswith("vpnctl ") and f" {verb}" in line for line in examples), text
    assert all(line.startswith(("vpnctl ", "source ", "echo ")) for line in examples if line)


@pytest.mark.parametrize("verb", sorted(leaf_verbs()))
def test_every_verb_takes_each_output_format(verb: str) -> None:
    parser = leaf_verbs()[verb]
    formats = [action.choices for action in parser._actions if "-o" in action.option_strings]
    assert formats == [("table", "json", "yaml")]


def test_help_shows_the_exit_code_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("exit codes:")
    shown = [int(line.split()[0]) for line in lines[start + 1:]
             if line[:2] == "  " and line.split() and line.split()[0].isdigit()]
    assert shown[:len(EXIT_TABLE)] == [code for code, _ in EXIT_TABLE]
    assert "3    daemon unreachable" in out and "4    NOT_FOUND" in out


def test_usage_errors_exit_2_from_the_console_script() -> None:
    for argv in (["peer"], ["peer", "get"], ["tunnel", "rotate-key", "--overlap", "x"],
                 ["no-such-command"], ["-o", "xml", "status"]):
        done = subprocess.run([str(BIN / "vpnctl"), *argv], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == EXIT_USAGE, (argv, done.stderr)
        assert done.stderr.startswith("usage: vpnctl"), done.stderr


def test_docs_reference_matches_the_code() -> None:
    text = DOCS.read_text()
    assert text == reference_markdown(), \
        "docs/vpnctl.md is stale: python -m vpnr.vpnctl.reference > docs/vpnctl.md"
    for verb in leaf_verbs():
        assert f"\n### vpnctl {verb}\n" in text
    for code, meaning in EXIT_TABLE:
        assert f"| {code} | {meaning} |" in text
