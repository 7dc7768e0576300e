"""``vpnctl completion bash|zsh|fish`` in the real shells: bash's completion function driven
through COMP_WORDS/COMP_CWORD, zsh loading the script after compinit, fish completing
command lines with ``complete -C``. The scripts come from the installed console script, as
a user would load them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN
from vpnr.vpnctl.completion import command_tree
from vpnr.vpnctl.main import build_parser

PEER_VERBS = ["add", "get", "list", "remove", "revoke", "update"]


def shell_env(home: Path) -> dict[str, str]:
    """A clean environment: vpnctl on PATH, HOME in the test's directory (compinit and fish
    write their caches there)."""
    return {"PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data"),
            "XDG_CACHE_HOME": str(home / "cache"), "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bash script, as ``vpnctl completion bash`` prints it."""
    done = subprocess.run([str(BIN / "vpnctl"), "completion", "bash"], capture_output=True,
                          text=True, timeout=60, check=True)
    path = tmp_path_factory.mktemp("bash") / "vpnctl.bash"
    path.write_text(done.stdout)
    return path


def bash_complete(script: Path, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one being the word under the cursor)."""
    driver = ('source "$0" || exit 9; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); '
              "_vpnctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", driver, str(script),
                           *words], capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return sorted(line for line in done.stdout.splitlines() if line)


@pytest.mark.parametrize(("words", "expected"), [
    (["vpnctl", "po"], ["policy"]),
    (["vpnctl", "peer", ""], PEER_VERBS),
    (["vpnctl", "-o", ""], ["json", "table", "yaml"]),
    (["vpnctl", "--output", "y"], ["yaml"]),
    (["vpnctl", "--instance", "b", "tunnel", ""], ["rotate-key", "status"]),
    (["vpnctl", "session", "-o", "json", "r"], ["rotate"]),
    (["vpnctl", "policy", "import", "--exp"], ["--expected-version"]),
    (["vpnctl", "health", ""], ["auditd", "idpd", "policyd", "tunneld"]),
    (["vpnctl", "zone", "set", "10.2.0.0/16", "ex"], ["external"]),
    (["vpnctl", "audit", "events", "--verdict", "d"], ["deny"]),
    (["vpnctl", "completion", ""], ["bash", "fish", "zsh"]),
])
def test_bash_completes_commands_verbs_options_and_choices(
        bash_script: Path, words: list[str], expected: list[str]) -> None:
    assert bash_complete(bash_script, *words) == expected


def test_bash_offers_every_command_and_every_option(bash_script: Path) -> None:
    root = build_parser({})
    commands = sorted(command_tree(root)[0].subcommands)
    assert bash_complete(bash_script, "vpnctl", "") == commands
    options = bash_complete(bash_script, "vpnctl", "peer", "add", "--")
    assert {"--public-key", "--endpoint", "--allow", "--keepalive", "--instance",
            "--output", "--timeout", "--help"} <= set(options)


def test_zsh_loads_the_script_after_compinit(tmp_path: Path) -> None:
    script = ("autoload -U compinit; compinit -u -d \"$HOME/zcompdump\"; "
              "source <(vpnctl completion zsh); "
              "print -r -- \"$_comps[vpnctl]\"; print -r -- \"${_vpnctl_subs[vpnctl peer]}\"")
    done = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True,
                          timeout=60, env=shell_env(tmp_path), check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    function, peer_verbs = done.stdout.splitlines()
    assert function == "_vpnctl"  # compdef registered our function for vpnctl
    assert sorted(peer_verbs.split()) == PEER_VERBS


def zsh_candidates(home: Path, *words: str) -> list[str]:
    """What the zsh function hands compadd for ``words`` (cursor on the last one). Outside
    a completion widget compadd cannot run, so a shell function stands in for it and prints
    its arguments; zsh itself would then keep those matching the word typed."""
    script = ('autoload -U compinit; compinit -u -d "$HOME/zcompdump"; '
              "source <(vpnctl completion zsh); "
              "compadd() { print -rl -- ${@:#--} }; _files() { print -r -- FILES }; "
              'words=("$@"); CURRENT=$#; _vpnctl')
    done = subprocess.run(["zsh", "-f", "-c", script, "zsh", *words], capture_output=True,
                          text=True, timeout=60, env=shell_env(home), check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return sorted(done.stdout.split())


def test_zsh_function_finds_the_command_path(tmp_path: Path) -> None:
    assert zsh_candidates(tmp_path, "vpnctl", "peer", "") == PEER_VERBS
    assert zsh_candidates(tmp_path, "vpnctl", "-o", "") == ["json", "table", "yaml"]
    assert zsh_candidates(tmp_path, "vpnctl", "--instance", "b", "tunnel", "") == \
        ["rotate-key", "status"]
    assert "--expected-version" in zsh_candidates(tmp_path, "vpnctl", "role", "delete", "--")
    assert zsh_candidates(tmp_path, "vpnctl", "policy", "import", "") == ["FILES"]


def fish_complete(home: Path, line: str) -> list[str]:
    """The candidates (without descriptions) fish offers for the command line ``line``."""
    script = f"vpnctl completion fish | source; complete -C {line!r}"
    done = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True,
                          text=True, timeout=60, env=shell_env(home), check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return sorted(line.split("\t")[0] for line in done.stdout.splitlines() if line)


def test_fish_completes_from_the_sourced_script(tmp_path: Path) -> None:
    assert fish_complete(tmp_path, "vpnctl po") == ["policy"]
    assert fish_complete(tmp_path, "vpnctl peer ") == PEER_VERBS
    assert fish_complete(tmp_path, "vpnctl -o ") == ["json", "table", "yaml"]
    assert fish_complete(tmp_path, "vpnctl --instance b tunnel ") == ["rotate-key", "status"]
    assert "--expected-version" in fish_complete(tmp_path, "vpnctl policy import --")
