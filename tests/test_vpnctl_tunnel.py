"""vpnctl's tunnel, peer and session verbs against a real tunneld (and the policyd it needs)
in a network namespace of its own, plus the exit codes a script sees for real: NOT_FOUND,
conflicts and usage errors from the daemons, no mocks.

One tunneld serves the whole module (policyd compiles its program at start: slow); each test
uses peer names of its own so the order of the tests does not matter.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from conftest import BIN, DaemonProcess, router_toml, unique
from vpnr.v1 import common_pb2, tunnel_pb2, tunnel_pb2_grpc
from vpnr.vpnctl.exitcodes import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_USAGE
from vpnr.vpnctl.main import main

pytestmark = pytest.mark.root


@dataclass
class Tunnel:
    """policyd and tunneld of one instance in namespace ``netns``."""

    instance: str
    run_dir: Path
    netns: str

    def argv(self, *args: str) -> list[str]:
        """vpnctl arguments pointed at this instance."""
        return ["--instance", self.instance, "--run-dir", str(self.run_dir), *args]


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tunnel]:
    """A namespace with lan0 (veth, up) and lo, policyd and tunneld on it; all removed
    after the module by name, even when a start fails."""
    tmp = tmp_path_factory.mktemp("tunnel")
    netns, instance = unique("vc"), unique("i")
    config = tmp / "router.toml"
    config.write_text(router_toml(instance, tmp, interface="lan0"))
    started: list[DaemonProcess] = []
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "lan0", "type", "veth", "peer", "name", "peer0"],
                    ["link", "set", "lan0", "up"], ["link", "set", "peer0", "up"]):
            subprocess.run(["ip", "-n", netns, *cmd], check=True, timeout=30)
        for daemon in ("policyd", "tunneld"):  # tunneld works on policyd's pinned maps
            process = DaemonProcess(daemon, config, tmp / "run", instance, netns=netns)
            started.append(process)
            process.start()
        yield Tunnel(instance, tmp / "run", netns)
    finally:
        for process in reversed(started):
            if process.proc is not None:
                process.stop()
        subprocess.run(["ip", "netns", "del", netns], check=False, timeout=30)
        pins = Path("/sys/fs/bpf/vpnr") / instance
        if pins.exists():
            for pin in pins.iterdir():
                pin.unlink()
            pins.rmdir()


def vpnctl(tunnel: Tunnel, capsys: pytest.CaptureFixture[str],
           *args: str) -> tuple[int, str, str]:
    """vpnctl in-process against the instance: exit code, stdout, stderr."""
    code = main(tunnel.argv(*args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def as_json(tunnel: Tunnel, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """A verb with -o json that must succeed; its output parsed."""
    code, out, err = vpnctl(tunnel, capsys, *args, "-o", "json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def table_field(out: str, key: str) -> str:
    """The value of ``key: value`` in table output (columns are aligned with spaces)."""
    values = [line.split(":", 1)[1].strip() for line in out.splitlines()
              if line.split(":", 1)[0] == key]
    assert len(values) == 1, out
    return values[0]


def public_key() -> str:
    """A fresh X25519 public key as tunneld takes it (any 32 bytes are one)."""
    return base64.b64encode(os.urandom(32)).decode()


def test_tunnel_status_in_three_formats(tunnel: Tunnel,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    status = as_json(tunnel, capsys, "tunnel", "status")
    assert status["datapath_mode"] and status["datapath_reason"]
    assert len(status["public_key"]) == 44 and status["lan_interfaces"] == ["lan0"]
    assert status["probe"]["kernel_release"] == os.uname().release
    code, out, _ = vpnctl(tunnel, capsys, "tunnel", "status", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["public_key"] == status["public_key"]
    code, out, _ = vpnctl(tunnel, capsys, "tunnel", "status")
    assert code == 0
    assert table_field(out, "public_key") == status["public_key"]
    assert table_field(out, "datapath_mode") == status["datapath_mode"]
    assert table_field(out, "lan_interfaces") == "lan0"


def test_peer_lifecycle_add_get_list_update_revoke_remove(
        tunnel: Tunnel, capsys: pytest.CaptureFixture[str]) -> None:
    name, key = unique("site-"), public_key()
    added = as_json(tunnel, capsys, "peer", "add", name, "--public-key", key,
                    "--endpoint", "127.0.0.1:51999", "--allow", "10.2.0.0/24,fd00:2::/64",
                    "--keepalive", "25")
    # With a keepalive tunneld starts calling at once: idle or handshaking (nobody answers).
    assert added.pop("state") in ("idle", "handshaking")
    assert added == {"name": name, "public_key": key, "endpoint": "127.0.0.1:51999",
                     "allowed_prefixes": ["10.2.0.0/24", "fd00:2::/64"],
                     "last_handshake": "", "rx_bytes": 0, "tx_bytes": 0,
                     "keepalive_seconds": 25, "revoked": False}
    got = as_json(tunnel, capsys, "peer", "get", name)
    assert got.pop("state") in ("idle", "handshaking") and got == added
    code, out, _ = vpnctl(tunnel, capsys, "peer", "get", name, "-o", "yaml")
    assert code == 0 and {**yaml.safe_load(out), "state": None} == {**added, "state": None}
    listed = as_json(tunnel, capsys, "peer", "list", "--page-size", "1")
    assert name in [peer["name"] for peer in listed]
    code, out, _ = vpnctl(tunnel, capsys, "peer", "list")
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "ENDPOINT"]
    (row,) = [row.split() for row in rows if row.split()[0] == name]
    assert row[1] in ("idle", "handshaking") and row[2] == "127.0.0.1:51999"
    # The same key under a second name: tunneld refuses it (INVALID_ARGUMENT -> usage, 2).
    code, _, err = vpnctl(tunnel, capsys, "peer", "add", unique("dup-"), "--public-key", key,
                          "--allow", "10.9.0.0/24")
    assert code == EXIT_USAGE and err.startswith("error: INVALID_ARGUMENT"), err
    code, _, err = vpnctl(tunnel, capsys, "peer", "add", name, "--public-key", public_key(),
                          "--allow", "10.8.0.0/24")
    assert code == EXIT_CONFLICT and err.startswith("error: ALREADY_EXISTS"), err

    updated = as_json(tunnel, capsys, "peer", "update", name, "--allow", "10.3.0.0/24")
    updated.pop("state")
    assert updated == {**added, "allowed_prefixes": ["10.3.0.0/24"]}  # the rest stays
    code, out, _ = vpnctl(tunnel, capsys, "peer", "update", name, "--endpoint",
                          "127.0.0.1:52000")
    assert code == 0 and table_field(out, "endpoint") == "127.0.0.1:52000"

    revoked = as_json(tunnel, capsys, "peer", "revoke", name, "--reason", "test")
    assert revoked["revoked"] is True and revoked["state"] == "revoked"
    code, _, err = vpnctl(tunnel, capsys, "peer", "update", name, "--keepalive", "0")
    assert code == EXIT_CONFLICT and err.startswith("error: FAILED_PRECONDITION"), err
    code, out, _ = vpnctl(tunnel, capsys, "peer", "remove", name)
    assert (code, out) == (0, f"removed peer {name}\n")
    code, _, err = vpnctl(tunnel, capsys, "peer", "get", name)
    assert code == EXIT_NOT_FOUND and err.startswith("error: NOT_FOUND"), err
    assert name not in [peer["name"] for peer in as_json(tunnel, capsys, "peer", "list")]


def test_session_create_list_rotate_delete(tunnel: Tunnel,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    name, quiet = unique("hs-"), unique("rs-")
    as_json(tunnel, capsys, "peer", "add", name, "--public-key", public_key(),
            "--endpoint", "127.0.0.1:51998", "--allow", "10.4.0.0/24")
    as_json(tunnel, capsys, "peer", "add", quiet, "--public-key", public_key(),
            "--allow", "10.5.0.0/24")
    try:
        created = as_json(tunnel, capsys, "session", "create", name)
        assert created["peer"] == name
        assert as_json(tunnel, capsys, "peer", "get", name)["state"] == "handshaking"
        code, out, _ = vpnctl(tunnel, capsys, "session", "list", "--peer", name, "-o", "yaml")
        assert code == 0 and [s["peer"] for s in yaml.safe_load(out)] == [name]
        code, out, _ = vpnctl(tunnel, capsys, "session", "list", "--peer", name)
        assert code == 0 and out.splitlines()[0].split()[:2] == ["PEER", "ESTABLISHED_AT"]
        assert out.splitlines()[1].split()[0] == name
        rotated = as_json(tunnel, capsys, "session", "rotate", name)
        assert rotated["peer"] == name
        code, out, _ = vpnctl(tunnel, capsys, "session", "delete", name)
        assert (code, out) == (0, f"deleted the session of {name}\n")
        assert as_json(tunnel, capsys, "session", "delete", name) == \
            {"deleted": "session", "peer": name}
        # A responder-only peer cannot be called: FAILED_PRECONDITION -> conflict.
        code, _, err = vpnctl(tunnel, capsys, "session", "create", quiet)
        assert code == EXIT_CONFLICT and "has no endpoint" in err, err
        code, _, err = vpnctl(tunnel, capsys, "session", "rotate", unique("nobody-"))
        assert code == EXIT_NOT_FOUND and err.startswith("error: NOT_FOUND"), err
    finally:
        for peer in (name, quiet):
            main(tunnel.argv("peer", "remove", peer))
        capsys.readouterr()


def test_rotate_key_changes_the_public_key(tunnel: Tunnel,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = as_json(tunnel, capsys, "tunnel", "status")["public_key"]
    code, out, _ = vpnctl(tunnel, capsys, "tunnel", "rotate-key", "--overlap", "600",
                          "-o", "yaml")
    assert code == 0
    rotated = yaml.safe_load(out)
    assert rotated["previous_public_key"] == before
    assert rotated["new_public_key"] != before and len(rotated["new_public_key"]) == 44
    assert rotated["previous_valid_until"].endswith("Z")
    assert as_json(tunnel, capsys, "tunnel", "status")["public_key"] == \
        rotated["new_public_key"]
    code, out, _ = vpnctl(tunnel, capsys, "tunnel", "rotate-key")
    assert code == 0 and table_field(out, "previous_public_key") == rotated["new_public_key"]
    # Usage errors stop in vpnctl, before any call: argparse's exit code 2.
    assert main(tunnel.argv("tunnel", "rotate-key", "--overlap", "-1")) == EXIT_USAGE
    assert "expected an overlap in seconds" in capsys.readouterr().err


def test_exit_codes_of_the_console_script(tunnel: Tunnel, tmp_path: Path) -> None:
    """What a shell script sees: the installed vpnctl, one code per kind of failure."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "vpnctl"), *args], capture_output=True, text=True,
                              timeout=60, check=False)

    missing = run(*tunnel.argv("role", "get", unique("norole")))
    assert missing.returncode == EXIT_NOT_FOUND and "NOT_FOUND" in missing.stderr
    unreachable = run("--instance", "nosuch", "--run-dir", str(tmp_path),
                      "peer", "list")
    assert unreachable.returncode == 3
    assert unreachable.stderr == (f"error: cannot reach tunneld at "
                                  f"{tmp_path / 'nosuch' / 'tunneld.sock'}: no socket\n")
    usage = run(*tunnel.argv("peer", "add", "x", "--public-key", "short"))
    assert usage.returncode == EXIT_USAGE and "expected a base64 X25519" in usage.stderr
    ok = run(*tunnel.argv("peer", "list", "-o", "json"))
    assert ok.returncode == 0 and isinstance(json.loads(ok.stdout), list)


def test_peer_and_session_lists_page_like_policyd_and_idpd(
        tunnel: Tunnel, capsys: pytest.CaptureFixture[str]) -> None:
    """tunneld pages with services/core/paging.py: default 100, at most 1000, opaque tokens,
    and the same error messages as policyd and idpd."""
    names = sorted(unique("pg-") for _ in range(3))
    try:
        for i, name in enumerate(names):
            as_json(tunnel, capsys, "peer", "add", name, "--public-key", public_key(),
                    "--allow", f"10.6.{i}.0/24")
        socket = tunnel.run_dir / tunnel.instance / "tunneld.sock"
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = tunnel_pb2_grpc.TunnelServiceStub(channel)
            seen: list[str] = []
            totals: set[int] = set()
            token = ""
            for _ in range(100):
                reply = stub.ListPeers(tunnel_pb2.ListPeersRequest(
                    page=common_pb2.PageRequest(page_size=2, page_token=token)), timeout=10)
                assert 1 <= len(reply.peers) <= 2
                seen += [peer.name for peer in reply.peers]
                totals.add(reply.page.total_size)
                token = reply.page.next_page_token
                if not token:
                    break
            assert not token, "the pages did not end"
            assert seen == sorted(set(seen)) and set(names) <= set(seen)  # each once, in order
            assert totals == {len(seen)}
            whole = stub.ListPeers(tunnel_pb2.ListPeersRequest(), timeout=10)  # size 0: 100
            assert [p.name for p in whole.peers] == seen and not whole.page.next_page_token

            for method, request in (("ListPeers", tunnel_pb2.ListPeersRequest),
                                    ("ListSessions", tunnel_pb2.ListSessionsRequest)):
                call = getattr(stub, method)
                for page, message in (
                        (common_pb2.PageRequest(page_size=1001),
                         "page.page_size: at most 1000, got 1001"),
                        (common_pb2.PageRequest(page_token="garbage"),
                         "page.page_token: not a token from a previous response")):
                    with pytest.raises(grpc.RpcError) as err:
                        call(request(page=page), timeout=10)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                    assert err.value.details() == message, (method, err.value.details())
    finally:
        for name in names:
            main(tunnel.argv("peer", "remove", name))
        capsys.readouterr()
