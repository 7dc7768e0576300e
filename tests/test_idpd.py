"""idpd end to end: the real lab IdP, a real policyd in a namespace, idpd as a process.

The tests act as the user in the provider's own login pages (tests/idp_server.py drives
them over HTTP) and check the result where it matters: the kernel's decision for the
address (policyd's TestDecision runs the loaded XDP program).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from idp_server import IDP_DIR, RunningIdp, approve_device, browser_authorize, running_idp

from conftest import DaemonProcess, RunningPolicyd, start_policyd
from vpnr.v1 import codes_pb2, idp_pb2, idp_pb2_grpc, policy_pb2

CLIENT_ID = "vpnr-idpd"
CLIENT_SECRET = "vpnr-idpd-lab-secret"
REDIRECT = "http://127.0.0.1:8765/callback"
ALICE = ("alice", "alice-lab-password")
BOB = ("bob", "bob-lab-password")


def idp_data() -> dict[str, Any]:
    data: dict[str, Any] = copy.deepcopy(json.loads((IDP_DIR / "example-data.json").read_text()))
    return data


def idpd_section(issuer: str, secret_file: Path, extra: str = "") -> str:
    return (
        "[idpd]\n"
        f'issuer = "{issuer}"\n'
        f'client_id = "{CLIENT_ID}"\n'
        f'client_secret_file = "{secret_file}"\n'
        f'redirect_uri = "{REDIRECT}"\n'
        "http_timeout_seconds = 2.0\n"
        "discovery_timeout_seconds = 2.0\n"
        "sync_interval_seconds = 3600.0\n"
        + extra
        + '[[idpd.role_mappings]]\nclaim = "groups"\nvalue = "eng"\nroles = ["eng"]\n'
        + '[[idpd.role_mappings]]\nclaim = "groups"\nmatch = "prefix"\nvalue = "sal"\n'
          'roles = ["sales"]\n'
        + '[[idpd.role_mappings]]\nclaim = "groups"\nmatch = "regex"\nvalue = "print(er)?s"\n'
          'roles = ["printers"]\n'
    )


@dataclass
class Stack:
    policyd: RunningPolicyd
    idpd: DaemonProcess
    idp: RunningIdp
    stub: idp_pb2_grpc.IdpServiceStub
    channel: grpc.Channel

    def status(self) -> idp_pb2.IdpStatus:
        status: idp_pb2.IdpStatus = self.stub.Status(idp_pb2.IdpStatusRequest(), timeout=10)
        return status

    def sync(self) -> idp_pb2.SyncResult:
        result: idp_pb2.SyncResult = self.stub.SyncNow(idp_pb2.SyncNowRequest(), timeout=60)
        return result

    def roles_in_kernel(self, src: str) -> tuple[int, list[str]]:
        d = self.policyd.stub.TestDecision(policy_pb2.TestDecisionRequest(
            src=src, dst="10.9.0.1", protocol=codes_pb2.PROTOCOL_TCP, src_port=40000,
            dst_port=22), timeout=10)
        return d.reason, sorted(d.roles)

    def restart_idpd(self) -> None:
        self.channel.close()
        self.idpd.stop()
        self.idpd.start()
        self.channel = grpc.insecure_channel(f"unix:{self.idpd.socket}")
        self.stub = idp_pb2_grpc.IdpServiceStub(self.channel)


def make_roles(policyd: RunningPolicyd) -> None:
    for name in ("eng", "sales", "printers"):
        policyd.stub.CreateRole(policy_pb2.CreateRoleRequest(role=policy_pb2.Role(
            name=name, rules=[policy_pb2.Rule(
                action=policy_pb2.ACTION_ALLOW, protocol=codes_pb2.PROTOCOL_TCP,
                dst_prefix="10.9.0.0/24", dst_port_from=22, dst_port_to=22)])), timeout=10)


@pytest.fixture
def stack_factory(tmp_path: Path, netns: str, instance: str) -> Iterator[Any]:
    started: list[Stack] = []

    def make(data: dict[str, Any], extra: str = "", keys: Path | None = None) -> Stack:
        idp_cm = running_idp(tmp_path / "idp", data, keys=keys)
        idp = idp_cm.__enter__()
        policyd = start_policyd(tmp_path, netns, instance)
        make_roles(policyd)
        secret = tmp_path / "client.secret"
        secret.write_text(CLIENT_SECRET + "\n")
        os.chmod(secret, 0o600)
        with policyd.config.open("a") as f:
            f.write(idpd_section(idp.issuer, secret, extra))
        idpd = DaemonProcess("idpd", policyd.config, tmp_path / "run", instance).start()
        channel = grpc.insecure_channel(f"unix:{idpd.socket}")
        stack = Stack(policyd, idpd, idp, idp_pb2_grpc.IdpServiceStub(channel), channel)
        stack._idp_cm = idp_cm  # type: ignore[attr-defined]
        started.append(stack)
        return stack

    yield make
    for stack in started:
        stack.channel.close()
        stack.idpd.stop()
        stack.policyd.channel.close()
        stack.policyd.process.stop()
        stack._idp_cm.__exit__(None, None, None)  # type: ignore[attr-defined]


def device_login(stack: Stack, address: str, user: tuple[str, str]) -> idp_pb2.Login:
    challenge = stack.stub.StartLogin(idp_pb2.StartLoginRequest(
        address=address, flow=idp_pb2.LOGIN_FLOW_DEVICE), timeout=10)
    assert challenge.user_code and challenge.verification_uri
    approve_device(challenge.verification_uri_complete, *user)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        login: idp_pb2.Login = stack.stub.WaitLogin(
            idp_pb2.WaitLoginRequest(login_id=challenge.login_id), timeout=15)
        if login.state != idp_pb2.LOGIN_STATE_PENDING:
            return login
    raise AssertionError("device login still pending after 30 s")


def pkce_login(stack: Stack, address: str, user: tuple[str, str]) -> idp_pb2.Login:
    challenge = stack.stub.StartLogin(idp_pb2.StartLoginRequest(
        address=address, flow=idp_pb2.LOGIN_FLOW_CODE_PKCE), timeout=10)
    assert challenge.redirect_uri == REDIRECT
    assert "code_challenge_method=S256" in challenge.authorization_url
    query = browser_authorize(challenge.authorization_url, REDIRECT, *user)
    login: idp_pb2.Login = stack.stub.CompleteLogin(idp_pb2.CompleteLoginRequest(
        login_id=challenge.login_id, code=query.get("code", ""), state=query.get("state", ""),
        iss=query.get("iss", ""), error=query.get("error", "")), timeout=20)
    return login


def test_device_login_binds_address_and_group_change_reaches_kernel(stack_factory: Any) -> None:
    stack = stack_factory(idp_data())
    assert stack.roles_in_kernel("10.1.0.7")[1] == []
    login = device_login(stack, "10.1.0.7", ALICE)
    assert login.state == idp_pb2.LOGIN_STATE_ACTIVE, login.error
    assert (login.username, list(login.roles), login.address) == ("alice", ["eng"],
                                                                   "10.1.0.7/32")
    assert stack.roles_in_kernel("10.1.0.7")[1] == ["eng"]
    # The group changes at the IdP; one sync later the kernel decides with the new role.
    stack.idp.set_groups("u-alice", ["sales-emea"])
    result = stack.sync()
    assert result.outcome == idp_pb2.SYNC_OUTCOME_APPLIED, result.error
    assert (result.added, result.removed, result.changed) == (0, 0, 1)
    assert stack.roles_in_kernel("10.1.0.7")[1] == ["sales"]
    assert stack.sync().outcome == idp_pb2.SYNC_OUTCOME_UNCHANGED
    listed = stack.stub.ListBindings(idp_pb2.ListIdpBindingsRequest(), timeout=10).bindings
    assert [(b.prefix, list(b.roles), b.origin, b.username) for b in listed] == [
        ("10.1.0.7/32", ["sales"], "login", "alice")]


def test_pkce_login_disable_and_logout(stack_factory: Any) -> None:
    stack = stack_factory(idp_data())
    login = pkce_login(stack, "10.1.0.8", BOB)
    assert login.state == idp_pb2.LOGIN_STATE_ACTIVE, login.error
    assert list(login.roles) == ["sales"]
    assert stack.roles_in_kernel("10.1.0.8")[1] == ["sales"]
    alice = pkce_login(stack, "10.1.0.9", ALICE)
    assert list(alice.roles) == ["eng"]
    # Disabled at the IdP: the next sync removes the binding, the kernel says NO_ROLE.
    stack.idp.disable("u-bob")
    result = stack.sync()
    assert (result.outcome, result.removed) == (idp_pb2.SYNC_OUTCOME_APPLIED, 1), result.error
    assert stack.roles_in_kernel("10.1.0.8") == (codes_pb2.REASON_NO_ROLE, [])
    logins = {x.login_id: x for x in stack.stub.ListLogins(
        idp_pb2.ListLoginsRequest(all=True), timeout=10).logins}
    assert logins[login.login_id].state == idp_pb2.LOGIN_STATE_REVOKED
    assert "disabled" in logins[login.login_id].error
    # Logout takes effect at once, without a sync.
    stack.stub.Logout(idp_pb2.LogoutRequest(address="10.1.0.9"), timeout=20)
    assert stack.roles_in_kernel("10.1.0.9") == (codes_pb2.REASON_NO_ROLE, [])


def test_pkce_login_with_forged_state_fails(stack_factory: Any) -> None:
    stack = stack_factory(idp_data())
    challenge = stack.stub.StartLogin(idp_pb2.StartLoginRequest(
        address="10.1.0.10", flow=idp_pb2.LOGIN_FLOW_CODE_PKCE), timeout=10)
    query = browser_authorize(challenge.authorization_url, REDIRECT, *ALICE)
    login = stack.stub.CompleteLogin(idp_pb2.CompleteLoginRequest(
        login_id=challenge.login_id, code=query["code"], state="forged"), timeout=20)
    assert login.state == idp_pb2.LOGIN_STATE_FAILED and "state" in login.error
    assert stack.roles_in_kernel("10.1.0.10")[1] == []


def test_bad_login_requests_are_named(stack_factory: Any) -> None:
    stack = stack_factory(idp_data())
    with pytest.raises(grpc.RpcError) as err:
        stack.stub.StartLogin(idp_pb2.StartLoginRequest(address="10.1.0.0/24"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "address" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        stack.stub.ConfirmSync(idp_pb2.ConfirmSyncRequest(held_sync_id="s-nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_idp_unreachable_keeps_policy_reports_stale_and_recovers(stack_factory: Any) -> None:
    stack = stack_factory(idp_data())
    assert device_login(stack, "10.1.0.11", ALICE).state == idp_pb2.LOGIN_STATE_ACTIVE
    version = stack.policyd.stub.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=10).version
    os.kill(stack.idp.process.pid, signal.SIGSTOP)  # the IdP hangs: connects, never answers
    try:
        failed = stack.sync()
        assert failed.outcome == idp_pb2.SYNC_OUTCOME_FAILED and failed.error
        status = stack.status()
        assert status.stale and status.consecutive_failures == 1
        assert status.bindings == 1 and status.staleness_seconds > 0
        assert any(w.code == "STALE" for w in status.warnings)
        # Policy untouched, kernel still binds the address.
        after = stack.policyd.stub.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=10)
        assert after.version == version
        assert stack.roles_in_kernel("10.1.0.11")[1] == ["eng"]
        # A restart while the IdP is away keeps the last good set and says it is stale.
        stack.restart_idpd()
        status = stack.status()
        assert status.bindings == 1 and status.stale
        assert stack.roles_in_kernel("10.1.0.11")[1] == ["eng"]
    finally:
        os.kill(stack.idp.process.pid, signal.SIGCONT)
    recovered = stack.sync()
    assert recovered.outcome in (idp_pb2.SYNC_OUTCOME_UNCHANGED,
                                 idp_pb2.SYNC_OUTCOME_APPLIED), recovered.error
    status = stack.status()
    assert not status.stale and status.consecutive_failures == 0
    assert stack.roles_in_kernel("10.1.0.11")[1] == ["eng"]
