"""idpd end to end: the real lab IdP, a real policyd in a namespace, idpd as a process.

The tests act as the user in the provider's own login pages (tests/idp_server.py drives
them over HTTP) and check the result where it matters: the kernel's decision for the
address (policyd's TestDecision runs the loaded XDP program).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt_craft
import pytest
from idp_server import (
    IDP_DIR,
    RunningIdp,
    approve_device,
    browser_authorize,
    generate_keys,
    jwt_parts,
    running_idp,
)

from conftest import BIN, DaemonProcess, RunningPolicyd, start_policyd
from vpnr.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    codes_pb2,
    common_pb2,
    idp_pb2,
    idp_pb2_grpc,
    policy_pb2,
)

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
    auditd: DaemonProcess | None = None

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


class TokenProxy:
    """An HTTP proxy in front of the IdP that can replace the ID token in token responses.

    A fake for a fault we cannot cause for real: an IdP (or a man in the middle) handing
    idpd a forged token. Everything else passes through unchanged; the IdP's issuer is the
    proxy's URL, so every URL the IdP publishes leads through it.
    """

    def __init__(self) -> None:
        self.upstream = ""
        self.rewrite: Any = None  # callable(real_id_token) -> forged token, or None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("content-length", "connection")}
                resp = httpx.request(self.command, proxy.upstream + self.path, headers=headers,
                                     content=body, timeout=10.0, follow_redirects=False)
                content = resp.content
                if self.path.startswith("/token") and proxy.rewrite is not None \
                        and resp.status_code == 200:
                    doc = resp.json()
                    if "id_token" in doc:
                        doc["id_token"] = proxy.rewrite(doc["id_token"])
                        content = json.dumps(doc).encode()
                self.send_response(resp.status_code)
                for k, v in resp.headers.multi_items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "content-encoding"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stack_factory(tmp_path: Path, netns: str, instance: str) -> Iterator[Any]:
    started: list[Stack] = []
    proxies: list[TokenProxy] = []

    def make(data: dict[str, Any], extra: str = "", keys: Path | None = None,
             proxy: TokenProxy | None = None, auditd: bool = False,
             access_token_ttl: int | None = None) -> Stack:
        if proxy is not None:
            proxies.append(proxy)
        idp_cm = running_idp(tmp_path / "idp", data, keys=keys,
                             issuer=proxy.url if proxy else None,
                             access_token_ttl=access_token_ttl)
        idp = idp_cm.__enter__()
        if proxy is not None:
            proxy.upstream = f"http://127.0.0.1:{idp.port}"
        policyd = start_policyd(tmp_path, netns, instance)
        make_roles(policyd)
        secret = tmp_path / "client.secret"
        secret.write_text(CLIENT_SECRET + "\n")
        os.chmod(secret, 0o600)
        with policyd.config.open("a") as f:
            f.write(idpd_section(idp.issuer, secret, extra.replace("{issuer}", idp.issuer)))
        audit = (DaemonProcess("auditd", policyd.config, tmp_path / "run", instance).start()
                 if auditd else None)
        idpd = DaemonProcess("idpd", policyd.config, tmp_path / "run", instance).start()
        channel = grpc.insecure_channel(f"unix:{idpd.socket}")
        stack = Stack(policyd, idpd, idp, idp_pb2_grpc.IdpServiceStub(channel), channel, audit)
        stack._idp_cm = idp_cm  # type: ignore[attr-defined]
        started.append(stack)
        return stack

    yield make
    for stack in started:
        stack.channel.close()
        stack.idpd.stop()
        if stack.auditd is not None:
            stack.auditd.stop()
        stack.policyd.channel.close()
        stack.policyd.process.stop()
        stack._idp_cm.__exit__(None, None, None)  # type: ignore[attr-defined]
    for proxy in proxies:
        proxy.close()


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


def devices(n: int, *, start: int = 1) -> list[dict[str, Any]]:
    """Directory entries (fixed devices) with addresses in 10.2.x.y and group printers."""
    return [{"sub": f"d-{i:04d}", "username": f"printer-{i:04d}", "password": "unused-pw",
             "groups": ["printers"], "ip_addresses": [f"10.2.{i // 250}.{i % 250 + 1}"]}
            for i in range(start, start + n)]


SCIM = "scim_base_url = \"{issuer}/scim/v2\"\n"


def test_directory_sync_binds_devices_and_never_applies_a_bad_read(
        stack_factory: Any, tmp_path: Path) -> None:
    data = idp_data()
    data["users"] += devices(3)
    data["users"].append({"sub": "d-bad", "username": "broken-device", "password": "x",
                          "groups": ["printers"], "ip_addresses": ["10.2.99.300"]})
    data["users"].append({"sub": "d-off", "username": "retired", "password": "x",
                          "active": False, "groups": ["printers"],
                          "ip_addresses": ["10.2.99.1"]})
    stack = stack_factory(data, extra=SCIM)
    probe = stack.stub.TestConnection(idp_pb2.TestConnectionRequest(), timeout=30)
    assert (probe.discovery_ok, probe.jwks_ok, probe.token_ok, probe.scim_ok) == \
        (True, True, True, True), probe.errors
    cli = subprocess.run([str(BIN / "vpnctl"), "--run-dir", str(stack.idpd.run_dir),
                          "--instance", stack.idpd.instance, "idp", "test-connection"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    first = stack.sync()
    assert first.outcome in (idp_pb2.SYNC_OUTCOME_APPLIED, idp_pb2.SYNC_OUTCOME_UNCHANGED)
    assert first.total == 3, first
    assert any("broken-device" in w for w in stack.status().last_result.warnings) or \
        any("broken-device" in w for w in first.warnings)
    assert stack.roles_in_kernel("10.2.0.2")[1] == ["printers"]
    assert stack.roles_in_kernel("10.2.99.1")[1] == []          # inactive: not bound
    bound = stack.stub.ListBindings(idp_pb2.ListIdpBindingsRequest(), timeout=10).bindings
    assert {(b.prefix, b.origin, b.username) for b in bound} == {
        (f"10.2.0.{i + 1}/32", "directory", f"printer-{i:04d}") for i in (1, 2, 3)}
    version = stack.policyd.stub.GetPolicy(policy_pb2.GetPolicyRequest(), timeout=10).version
    # Each broken answer fails the sync and changes nothing, however it is broken.
    for fault in ("http500", "garbage", "truncate"):
        stack.idp.set_fault(fault)
        result = stack.sync()
        assert result.outcome == idp_pb2.SYNC_OUTCOME_FAILED, (fault, result)
        assert stack.status().stale
        assert stack.policyd.stub.GetPolicy(policy_pb2.GetPolicyRequest(),
                                            timeout=10).version == version
        assert stack.roles_in_kernel("10.2.0.2")[1] == ["printers"]
        if fault == "http500":
            cli = subprocess.run([str(BIN / "vpnctl"), "--run-dir", str(stack.idpd.run_dir),
                                  "--instance", stack.idpd.instance, "idp", "test-connection"],
                                 capture_output=True, text=True, timeout=60)
            assert cli.returncode == 1 and "scim" in cli.stdout + cli.stderr
    stack.idp.set_fault("none")
    assert stack.sync().outcome == idp_pb2.SYNC_OUTCOME_UNCHANGED
    assert not stack.status().stale


def test_mass_deletion_is_held_until_confirmed(stack_factory: Any) -> None:
    data = idp_data()
    data["users"] += devices(20)
    port = free_port()
    stack = stack_factory(data, extra=SCIM + "max_delete_share = 0.5\nguard_min_bindings = 10\n"
                          f"metrics_port = {port}\n")
    assert stack.sync().total == 20
    for i in range(3, 21):                       # 18 of 20 devices leave the directory
        stack.idp.delete_user(f"d-{i:04d}")
    held = stack.sync()
    assert held.outcome == idp_pb2.SYNC_OUTCOME_HELD, held
    assert (held.removed, held.total) == (18, 2)
    assert "18 of 20" in held.error and held.sync_id in held.error
    status = stack.status()
    assert status.held_sync_id == held.sync_id and status.held.removed == 18
    assert any(w.code == "SYNC_HELD" for w in status.warnings)
    # Nothing was removed: the kernel still binds a device that left the directory.
    assert stack.roles_in_kernel("10.2.0.10")[1] == ["printers"]
    with pytest.raises(grpc.RpcError) as err:
        stack.stub.ConfirmSync(idp_pb2.ConfirmSyncRequest(held_sync_id="s-other"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    done = stack.stub.ConfirmSync(idp_pb2.ConfirmSyncRequest(held_sync_id=held.sync_id),
                                  timeout=30)
    assert (done.outcome, done.removed) == (idp_pb2.SYNC_OUTCOME_APPLIED, 18), done
    assert stack.roles_in_kernel("10.2.0.10") == (codes_pb2.REASON_NO_ROLE, [])
    assert stack.roles_in_kernel("10.2.0.2")[1] == ["printers"]
    assert not stack.status().held_sync_id
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'vpnr_idp_syncs_total{result="held"} 1.0' in metrics
    assert 'vpnr_idp_syncs_total{result="applied"} 2.0' in metrics
    assert 'vpnr_idp_bindings{origin="directory"} 2.0' in metrics
    assert "vpnr_idp_sync_duration_seconds_count 3.0" in metrics
    assert "vpnr_idp_staleness_seconds " in metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _forgeries(issuer: str, key: dict[str, Any]) -> dict[str, Any]:
    """reason -> function(real ID token) -> forged token."""
    def resign(**change: Any) -> Any:
        def make(real: str) -> str:
            header, payload = jwt_parts(real)
            payload.update(change)
            return jwt_craft.sign_rs256(payload, {"kid": header["kid"]}, key)
        return make

    def bad_signature(real: str) -> str:
        head, body, sig = real.split(".")
        return ".".join([head, body, sig[:-6] + ("AAAAAA" if sig[-6:] != "AAAAAA" else "BBBBBB")])

    def alg_none(real: str) -> str:
        return jwt_craft.unsigned_token(jwt_parts(real)[1])

    return {
        "bad_signature": bad_signature,
        "wrong_issuer": resign(iss="http://evil.example"),
        "wrong_audience": resign(aud="someone-else"),
        "expired": resign(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        "alg_not_allowed": alg_none,
    }


def test_forged_id_tokens_are_rejected_and_audited(stack_factory: Any, tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "idp-keys.json")
    proxy = TokenProxy()
    stack = stack_factory(idp_data(), keys=keys, proxy=proxy, auditd=True)
    forgeries = _forgeries(stack.idp.issuer, jwt_craft.load_private_jwk(keys))
    for n, (reason, forge) in enumerate(forgeries.items()):
        proxy.rewrite = forge
        login = pkce_login(stack, f"10.1.1.{n + 1}", ALICE)
        assert login.state == idp_pb2.LOGIN_STATE_FAILED, (reason, login)
        assert "ID token rejected" in login.error and reason in login.error, login.error
        assert stack.roles_in_kernel(f"10.1.1.{n + 1}")[1] == []
    proxy.rewrite = None                         # the genuine token still works
    assert pkce_login(stack, "10.1.1.99", ALICE).state == idp_pb2.LOGIN_STATE_ACTIVE
    assert stack.status().tokens_rejected == len(forgeries)
    assert stack.auditd is not None
    with grpc.insecure_channel(f"unix:{stack.auditd.socket}") as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        deadline = time.monotonic() + 10
        reasons: list[str] = []
        while time.monotonic() < deadline:
            records = audit.Query(audit_pb2.QueryRequest(
                filter=audit_pb2.AuditFilter(control_only=True),
                page=common_pb2.PageRequest(page_size=500)), timeout=10).records
            rejected = [json.loads(r.control.detail_json) for r in records
                        if r.control.action == "idp.token_rejected"]
            reasons = sorted(d["reason"] for d in rejected)
            if len(reasons) == len(forgeries):
                break
            time.sleep(0.1)
        assert reasons == sorted(forgeries)
        for r in records:                         # no token text in any record
            assert "eyJ" not in r.control.detail_json and "eyJ" not in r.control.error


def test_tokens_refreshed_before_expiry_and_sealed_at_rest(
        stack_factory: Any, tmp_path: Path) -> None:
    # The IdP's access tokens live 8 s; idpd refreshes them 5 s before they expire.
    stack = stack_factory(idp_data(), extra="refresh_margin_seconds = 5.0\n",
                          access_token_ttl=8)
    login = pkce_login(stack, "10.1.2.1", BOB)
    assert login.state == idp_pb2.LOGIN_STATE_ACTIVE, login.error
    first_expiry = login.access_expires_at.seconds
    assert first_expiry - time.time() < 10
    # No SyncNow: idpd schedules the refresh itself, before the token expires.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = stack.stub.ListLogins(idp_pb2.ListLoginsRequest(), timeout=10).logins[0]
        if now.access_expires_at.seconds > first_expiry:
            break
        time.sleep(0.2)
    assert now.access_expires_at.seconds > first_expiry, "access token was not refreshed"
    assert now.refreshed_at.seconds >= login.refreshed_at.seconds
    assert stack.roles_in_kernel("10.1.2.1")[1] == ["sales"]
    state = Path(str(stack.policyd.config.parent / "state"))
    key = state / "idpd" / "token.key"
    assert key.stat().st_mode & 0o777 == 0o600
    # No token in the clear anywhere in idpd's database files (tokens are 43+ characters
    # of base64url; sealed ones are random bytes).
    for f in (state / "idpd").glob("idpd.sqlite*"):
        assert not re.search(rb"[A-Za-z0-9_-]{40,}", f.read_bytes()), f
    # A token key others can read stops idpd with a clear message.
    stack.idpd.stop()
    os.chmod(key, 0o644)
    proc = subprocess.run([str(BIN / "idpd"), "--config", str(stack.policyd.config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "lets others read the token key" in proc.stderr + proc.stdout
    os.chmod(key, 0o600)
    stack.idpd.start()


def _vpnctl(stack: Stack, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "vpnctl"), "--run-dir", str(stack.idpd.run_dir), "--instance",
         stack.idpd.instance, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _line_with(proc: subprocess.Popen[str], needle: str) -> str:
    assert proc.stdout is not None
    for _ in range(20):
        line = proc.stdout.readline()
        if needle in line:
            return line
    raise AssertionError(f"vpnctl never printed {needle!r}")


def test_vpnctl_idp_login_device_and_pkce(stack_factory: Any) -> None:
    stack = stack_factory(idp_data())
    # Device flow: vpnctl prints the URL and code and waits; the user signs in elsewhere.
    proc = _vpnctl(stack, "idp", "login", "--address", "10.1.3.1", "--timeout", "60")
    try:
        line = _line_with(proc, "or open ")
        approve_device(line.split("or open ", 1)[1].strip(), *ALICE)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "alice" in out and "eng" in out and "10.1.3.1/32" in out
    # Code + PKCE: vpnctl listens on the loopback redirect and completes the login.
    proc = _vpnctl(stack, "idp", "login", "--address", "10.1.3.2", "--flow", "pkce",
                   "--timeout", "60")
    try:
        url = _line_with(proc, "Open this URL in a browser: ").split(": ", 1)[1].strip()
        query = browser_authorize(url, REDIRECT, *BOB)
        page = httpx.get(REDIRECT, params=query, timeout=10)
        assert page.status_code == 200 and "Signed in" in page.text
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "bob" in out and "sales" in out
    table = subprocess.run(
        [str(BIN / "vpnctl"), "--run-dir", str(stack.idpd.run_dir), "--instance",
         stack.idpd.instance, "-o", "json", "idp", "bindings"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    bound = {b["prefix"]: b["roles"] for b in json.loads(table)}
    assert bound == {"10.1.3.1/32": ["eng"], "10.1.3.2/32": ["sales"]}
    assert stack.roles_in_kernel("10.1.3.2")[1] == ["sales"]
