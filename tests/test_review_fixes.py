"""Fixes found in review, each checked for real: an idpd with no IdP configured answers every
RPC cleanly (an empty list where a read makes sense, FAILED_PRECONDITION naming the missing
setting otherwise, never UNKNOWN), and ``vpnctl ... | head -1`` stops quietly with exit 141
instead of a BrokenPipeError traceback.

(auditd's page_size 0 is tested in tests/test_auditd.py, tunneld's shared pager in
tests/test_vpnctl_tunnel.py: both need the daemons those modules already run.)
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import BIN, DaemonProcess, router_toml, unique
from vpnr.v1 import common_pb2, idp_pb2, idp_pb2_grpc
from vpnr.vpnctl.exitcodes import EXIT_CONFLICT, EXIT_OK, EXIT_PIPE

pytestmark = pytest.mark.root

NO_IDP = "no IdP configured: set [idpd] issuer"


@dataclass
class BareIdpd:
    """An idpd whose config has no ``[idpd] issuer``, and a stub on its admin socket."""

    instance: str
    run_dir: Path
    daemon: DaemonProcess
    stub: idp_pb2_grpc.IdpServiceStub


@pytest.fixture(scope="module")
def bare_idpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareIdpd]:
    """idpd of a unique instance with no IdP configured; stopped after the module."""
    tmp = tmp_path_factory.mktemp("bare-idpd")
    instance = unique("i")
    config = tmp / "router.toml"
    config.write_text(router_toml(instance, tmp))  # no [idpd] table: issuer is empty
    daemon = DaemonProcess("idpd", config, tmp / "run", instance)
    try:
        daemon.start()
        with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
            yield BareIdpd(instance, tmp / "run", daemon, idp_pb2_grpc.IdpServiceStub(channel))
    finally:
        if daemon.proc is not None:
            daemon.stop()


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    """The error ``call`` fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_idpd_without_an_idp_answers_every_rpc_without_unknown(bare_idpd: BareIdpd) -> None:
    stub = bare_idpd.stub
    # Reads that make sense without an IdP answer what there is.
    reads: dict[str, Callable[[], Any]] = {
        "Status": lambda: stub.Status(idp_pb2.IdpStatusRequest(), timeout=10),
        "GetConfig": lambda: stub.GetConfig(idp_pb2.GetIdpConfigRequest(), timeout=10),
        "ListLogins": lambda: stub.ListLogins(idp_pb2.ListLoginsRequest(all=True), timeout=10),
        "ListBindings": lambda: stub.ListBindings(idp_pb2.ListIdpBindingsRequest(),
                                                  timeout=10),
    }
    # Everything else needs the IdP: FAILED_PRECONDITION saying which setting is missing.
    needs_idp: dict[str, Callable[[], Any]] = {
        "TestConnection": lambda: stub.TestConnection(idp_pb2.TestConnectionRequest(),
                                                      timeout=10),
        "SyncNow": lambda: stub.SyncNow(idp_pb2.SyncNowRequest(), timeout=10),
        "ConfirmSync": lambda: stub.ConfirmSync(
            idp_pb2.ConfirmSyncRequest(held_sync_id="s-1"), timeout=10),
        "StartLogin": lambda: stub.StartLogin(
            idp_pb2.StartLoginRequest(address="10.1.0.10"), timeout=10),
        "WaitLogin": lambda: stub.WaitLogin(idp_pb2.WaitLoginRequest(login_id="l-1"),
                                            timeout=10),
        "CompleteLogin": lambda: stub.CompleteLogin(
            idp_pb2.CompleteLoginRequest(login_id="l-1", code="c", state="s"), timeout=10),
        "Logout": lambda: stub.Logout(idp_pb2.LogoutRequest(address="10.1.0.10"), timeout=10),
    }
    # Every RPC of the service is in one of the two tables (a new one must be placed).
    methods = idp_pb2.DESCRIPTOR.services_by_name["IdpService"].methods_by_name
    assert set(methods) == set(reads) | set(needs_idp)

    status = reads["Status"]()
    assert status.issuer == "" and status.bindings == 0 and status.active_logins == 0
    assert reads["GetConfig"]().issuer == ""
    logins = reads["ListLogins"]()
    assert list(logins.logins) == [] and logins.page.total_size == 0
    assert not logins.page.next_page_token
    bindings = reads["ListBindings"]()
    assert list(bindings.bindings) == [] and bindings.page.total_size == 0

    for name, call in needs_idp.items():
        error = refused(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, error.details())
        assert error.details() == NO_IDP, (name, error.details())

    # The empty list still checks its page request like every list RPC.
    error = refused(lambda: stub.ListLogins(idp_pb2.ListLoginsRequest(
        page=common_pb2.PageRequest(page_token="garbage")), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("page.page_token:")

    # The daemon is still up and logged no failed assertion.
    assert bare_idpd.daemon.proc is not None and bare_idpd.daemon.proc.poll() is None
    log = bare_idpd.daemon.output()
    assert "Traceback" not in log and "AssertionError" not in log, log


def test_vpnctl_idp_verbs_without_an_idp(bare_idpd: BareIdpd) -> None:
    """What an operator sees: an empty login list, and a sync refused as a conflict (5)
    with the setting to fix."""
    base = [str(BIN / "vpnctl"), "--instance", bare_idpd.instance,
            "--run-dir", str(bare_idpd.run_dir)]
    listed = subprocess.run([*base, "idp", "logins", "--all", "-o", "json"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (listed.returncode, listed.stderr) == (EXIT_OK, ""), listed.stderr
    assert json.loads(listed.stdout) == []
    synced = subprocess.run([*base, "idp", "sync"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert synced.returncode == EXIT_CONFLICT, synced
    assert synced.stderr.strip() == f"error: FAILED_PRECONDITION: {NO_IDP}", synced.stderr


def pipe_into_head(argv: list[str]) -> tuple[bytes, int, bytes]:
    """Run ``argv | head -1`` on a real pipe; (head's output, argv's exit code, its stderr).

    The pipe is shrunk to one page, so an output much longer than a page cannot fit in it
    before head reads its first line and exits: the writer always meets the closed pipe.
    """
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
        head = subprocess.Popen(["head", "-1"], stdin=read_end, stdout=subprocess.PIPE)
        os.close(read_end)
        read_end = -1
        writer = subprocess.Popen(argv, stdout=write_end, stderr=subprocess.PIPE)
        os.close(write_end)
        write_end = -1
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    try:
        first, _ = head.communicate(timeout=60)
        _, err = writer.communicate(timeout=60)
    finally:
        for process in (head, writer):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    return first, writer.returncode, err


@pytest.mark.parametrize("shell", ["bash", "fish"])
def test_vpnctl_piped_into_head_stops_quietly(shell: str) -> None:
    argv = [str(BIN / "vpnctl"), "completion", shell]
    whole = subprocess.run(argv, capture_output=True, timeout=60, check=True).stdout
    assert len(whole) > 4 * 4096  # far more than the shrunk pipe and head's first read hold
    first, code, err = pipe_into_head(argv)
    assert first == whole.splitlines(keepends=True)[0]
    assert first.startswith(f"# vpnctl completion for {shell}".encode())
    assert (code, err) == (EXIT_PIPE, b""), err.decode(errors="replace")
