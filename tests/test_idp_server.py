"""Tests against the real lab OpenID Provider (deploy/idp/server.mjs)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from idp_server import (
    IDP_DIR,
    RunningIdp,
    approve_device,
    browser_authorize,
    find_form,
    jwt_parts,
    running_idp,
    submit,
)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_ID = "vpnr-idpd"
CLIENT_SECRET = "vpnr-idpd-lab-secret"
PUBLIC_CLIENT_ID = "vpnr-cli"
REDIRECT_URI = "http://127.0.0.1:8765/callback"
USER_SCOPE = "openid offline_access groups email profile"
POLL_TIMEOUT_S = 10.0


def _lab_data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((IDP_DIR / "example-data.json").read_text())
    data = copy.deepcopy(data)
    data["clients"].append(
        {
            "client_id": PUBLIC_CLIENT_ID,
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
        }
    )
    return data


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[RunningIdp]:
    with running_idp(tmp_path, _lab_data()) as server:
        yield server


@pytest.fixture
def oidc(idp: RunningIdp) -> dict[str, Any]:
    return idp.discovery()


def _client() -> httpx.Client:
    return httpx.Client(auth=(CLIENT_ID, CLIENT_SECRET), timeout=10.0)


def _b64d(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def _verify_rs256(token: str, jwks_uri: str) -> dict[str, Any]:
    header, payload = jwt_parts(token)
    assert header["alg"] == "RS256"
    keys = httpx.get(jwks_uri, timeout=10.0).json()["keys"]
    jwk = next(k for k in keys if k["kid"] == header["kid"])
    public_key = RSAPublicNumbers(
        int.from_bytes(_b64d(jwk["e"]), "big"), int.from_bytes(_b64d(jwk["n"]), "big")
    ).public_key()
    signing_input, signature = token.rsplit(".", 1)
    public_key.verify(_b64d(signature), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return payload


def _start_device(oidc: dict[str, Any], client: httpx.Client) -> dict[str, Any]:
    r = client.post(oidc["device_authorization_endpoint"], data={"scope": USER_SCOPE})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _poll_token(oidc: dict[str, Any], client: httpx.Client, device_code: str) -> dict[str, Any]:
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        r = client.post(
            oidc["token_endpoint"], data={"grant_type": DEVICE_GRANT, "device_code": device_code}
        )
        body: dict[str, Any] = r.json()
        if r.status_code == 200:
            return body
        assert body.get("error") in ("authorization_pending", "slow_down"), body
        assert time.monotonic() < deadline, "device flow did not complete in time"
        time.sleep(0.2)


def _device_login(oidc: dict[str, Any], username: str, password: str) -> dict[str, Any]:
    with _client() as client:
        start = _start_device(oidc, client)
        approve_device(start["verification_uri_complete"], username, password)
        return _poll_token(oidc, client, start["device_code"])


def _userinfo(oidc: dict[str, Any], access_token: str) -> httpx.Response:
    return httpx.get(
        oidc["userinfo_endpoint"],
        headers={"Authorization": f"Bearer {access_token}"},
        timeout=10.0,
    )


def _refresh(oidc: dict[str, Any], refresh_token: str, **extra: str) -> httpx.Response:
    with _client() as client:
        return client.post(
            oidc["token_endpoint"],
            data={"grant_type": "refresh_token", "refresh_token": refresh_token, **extra},
        )


# ------------------------------------------------------------------ tests


def test_discovery_document(idp: RunningIdp, oidc: dict[str, Any]) -> None:
    assert oidc["issuer"] == idp.issuer
    for key in (
        "jwks_uri",
        "device_authorization_endpoint",
        "token_endpoint",
        "userinfo_endpoint",
        "authorization_endpoint",
    ):
        assert oidc[key].startswith(idp.issuer + "/"), key
    assert DEVICE_GRANT in oidc["grant_types_supported"]
    assert {"authorization_code", "refresh_token", "client_credentials"} <= set(
        oidc["grant_types_supported"]
    )
    assert "S256" in oidc["code_challenge_methods_supported"]
    assert {"openid", "offline_access", "groups"} <= set(oidc["scopes_supported"])


def test_jwks_has_rs256_key(oidc: dict[str, Any]) -> None:
    keys = httpx.get(oidc["jwks_uri"], timeout=10.0).json()["keys"]
    rsa = [k for k in keys if k["kty"] == "RSA" and k.get("alg") == "RS256"]
    assert rsa, keys
    assert all("d" not in k for k in keys), "private key material published"
    assert rsa[0]["kid"]


def test_client_credentials_returns_jwt(idp: RunningIdp, oidc: dict[str, Any]) -> None:
    with _client() as client:
        r = client.post(oidc["token_endpoint"], data={"grant_type": "client_credentials"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] > 0
    header, _ = jwt_parts(body["access_token"])
    assert header["typ"] == "at+jwt"
    claims = _verify_rs256(body["access_token"], oidc["jwks_uri"])
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == "urn:vpnr"
    assert claims["client_id"] == CLIENT_ID
    assert claims["sub"] == CLIENT_ID


def test_client_credentials_rejects_bad_secret(oidc: dict[str, Any]) -> None:
    r = httpx.post(
        oidc["token_endpoint"],
        data={"grant_type": "client_credentials"},
        auth=(CLIENT_ID, "wrong"),
        timeout=10.0,
    )
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_client"


def test_device_flow_end_to_end(idp: RunningIdp, oidc: dict[str, Any]) -> None:
    with _client() as client:
        start = _start_device(oidc, client)
        assert start["verification_uri"] == idp.issuer + "/device"
        assert start["user_code"] in start["verification_uri_complete"]
        assert start["expires_in"] > 0

        # Not approved yet.
        r = client.post(
            oidc["token_endpoint"],
            data={"grant_type": DEVICE_GRANT, "device_code": start["device_code"]},
        )
        assert r.status_code == 400
        assert r.json()["error"] == "authorization_pending"

        page = approve_device(start["verification_uri_complete"], "alice", "alice-lab-password")
        assert "Sign-in Success" in page.text

        tokens = _poll_token(oidc, client, start["device_code"])

    assert tokens["token_type"] == "Bearer"
    assert tokens["refresh_token"]
    assert set(tokens["scope"].split()) == set(USER_SCOPE.split())

    id_token = _verify_rs256(tokens["id_token"], oidc["jwks_uri"])
    assert id_token["iss"] == idp.issuer
    assert id_token["aud"] == CLIENT_ID
    assert id_token["sub"] == "u-alice"
    assert id_token["groups"] == ["eng"]

    r = _userinfo(oidc, tokens["access_token"])
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["sub"] == "u-alice"
    assert info["groups"] == ["eng"]
    assert info["email"] == "alice@example.test"
    assert info["preferred_username"] == "alice"


def test_device_code_is_single_use(oidc: dict[str, Any]) -> None:
    with _client() as client:
        start = _start_device(oidc, client)
        approve_device(start["verification_uri_complete"], "bob", "bob-lab-password")
        _poll_token(oidc, client, start["device_code"])
        r = client.post(
            oidc["token_endpoint"],
            data={"grant_type": DEVICE_GRANT, "device_code": start["device_code"]},
        )
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"


def test_device_flow_abort_denies(oidc: dict[str, Any]) -> None:
    with _client() as client:
        start = _start_device(oidc, client)
        approve_device(start["verification_uri_complete"], "alice", "", abort=True)
        r = client.post(
            oidc["token_endpoint"],
            data={"grant_type": DEVICE_GRANT, "device_code": start["device_code"]},
        )
    assert r.status_code == 400
    assert r.json()["error"] == "access_denied"


def test_login_rejects_wrong_password(oidc: dict[str, Any]) -> None:
    with _client() as client:
        start = _start_device(oidc, client)
    with httpx.Client(follow_redirects=True, timeout=10.0) as browser:
        page = browser.get(start["verification_uri_complete"])
        page = submit(browser, find_form(page))
        page = submit(browser, find_form(page, form_id="op.deviceConfirmForm"))
        login = find_form(page, form_id="login")
        page = submit(browser, login, {"username": "alice", "password": "nope"})
        assert page.status_code == 401
        assert "Invalid username or password" in page.text
        # The form is offered again and the right password still works.
        page = submit(
            browser,
            find_form(page, form_id="login"),
            {"username": "alice", "password": "alice-lab-password"},
        )
        assert "Sign-in Success" in page.text


def test_set_groups_visible_after_refresh(idp: RunningIdp, oidc: dict[str, Any]) -> None:
    tokens = _device_login(oidc, "alice", "alice-lab-password")
    assert _userinfo(oidc, tokens["access_token"]).json()["groups"] == ["eng"]

    user = idp.set_groups("u-alice", ["eng", "ops"])
    assert user["groups"] == ["eng", "ops"]

    r = _refresh(oidc, tokens["refresh_token"])
    assert r.status_code == 200, r.text
    refreshed = r.json()
    info = _userinfo(oidc, refreshed["access_token"]).json()
    assert info["groups"] == ["eng", "ops"]
    assert _verify_rs256(refreshed["id_token"], oidc["jwks_uri"])["groups"] == ["eng", "ops"]

    # A JWT access token for the vpnr resource carries the new groups too.
    r = _refresh(oidc, refreshed.get("refresh_token", tokens["refresh_token"]), resource="urn:vpnr")
    assert r.status_code == 200, r.text
    at = r.json()["access_token"]
    header, _ = jwt_parts(at)
    assert header["typ"] == "at+jwt"
    claims = _verify_rs256(at, oidc["jwks_uri"])
    assert claims["aud"] == "urn:vpnr"
    assert claims["sub"] == "u-alice"
    assert claims["groups"] == ["eng", "ops"]


def test_disable_and_enable_user(idp: RunningIdp, oidc: dict[str, Any]) -> None:
    tokens = _device_login(oidc, "bob", "bob-lab-password")
    assert _userinfo(oidc, tokens["access_token"]).status_code == 200

    assert idp.disable("u-bob")["active"] is False
    assert _userinfo(oidc, tokens["access_token"]).status_code == 401
    r = _refresh(oidc, tokens["refresh_token"])
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"

    assert idp.enable("u-bob")["active"] is True
    r = _userinfo(oidc, tokens["access_token"])
    assert r.status_code == 200
    assert r.json()["groups"] == ["sales"]


def test_disabled_user_cannot_log_in(idp: RunningIdp, oidc: dict[str, Any]) -> None:
    idp.disable("u-alice")
    with _client() as client:
        start = _start_device(oidc, client)
    with httpx.Client(follow_redirects=True, timeout=10.0) as browser:
        page = browser.get(start["verification_uri_complete"])
        page = submit(browser, find_form(page))
        page = submit(browser, find_form(page, form_id="op.deviceConfirmForm"))
        page = submit(
            browser,
            find_form(page, form_id="login"),
            {"username": "alice", "password": "alice-lab-password"},
        )
    assert page.status_code == 401


def test_authorization_code_with_pkce(idp: RunningIdp, oidc: dict[str, Any]) -> None:
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    state = secrets.token_urlsafe(8)
    params = {
        "client_id": PUBLIC_CLIENT_ID,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "scope": "openid groups offline_access",
        "prompt": "consent",  # OIDC: offline_access is only honoured with prompt=consent
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    callback = browser_authorize(
        f"{oidc['authorization_endpoint']}?{urlencode(params)}",
        REDIRECT_URI,
        "bob",
        "bob-lab-password",
    )
    assert callback.get("state") == state, callback
    assert callback.get("iss") == idp.issuer
    code = callback["code"]

    token_req = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": PUBLIC_CLIENT_ID,
    }
    # Without the verifier the code is rejected...
    r = httpx.post(oidc["token_endpoint"], data=token_req, timeout=10.0)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"

    # ...and the failed attempt may have used the code up: get a fresh one.
    callback = browser_authorize(
        f"{oidc['authorization_endpoint']}?{urlencode(params)}",
        REDIRECT_URI,
        "bob",
        "bob-lab-password",
    )
    r = httpx.post(
        oidc["token_endpoint"],
        data={**token_req, "code": callback["code"], "code_verifier": verifier},
        timeout=10.0,
    )
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert _verify_rs256(tokens["id_token"], oidc["jwks_uri"])["sub"] == "u-bob"
    assert _userinfo(oidc, tokens["access_token"]).json()["groups"] == ["sales"]
    assert tokens["refresh_token"]
    # Public clients get their refresh token rotated.
    r = httpx.post(
        oidc["token_endpoint"],
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": PUBLIC_CLIENT_ID,
        },
        timeout=10.0,
    )
    assert r.status_code == 200, r.text
    assert r.json()["refresh_token"] != tokens["refresh_token"]


def test_admin_api_requires_token(idp: RunningIdp) -> None:
    r = httpx.get(idp.url("/admin/users"), timeout=10.0)
    assert r.status_code == 401
    r = httpx.get(idp.url("/admin/users"), headers={"Authorization": "Bearer nope"}, timeout=10.0)
    assert r.status_code == 401
    subs = {u["sub"] for u in idp.users()}
    assert subs == {"u-alice", "u-bob"}
    assert all("password" not in u for u in idp.users())


def test_reload_rereads_data_file(idp: RunningIdp) -> None:
    idp.set_groups("u-bob", ["temp"])
    data = json.loads(idp.data_path.read_text())
    data["users"].append(
        {"sub": "u-carol", "username": "carol", "password": "pw", "groups": ["ops"]}
    )
    idp.data_path.write_text(json.dumps(data))
    assert idp.reload()["users"] == 3
    groups = {u["sub"]: u["groups"] for u in idp.users()}
    assert groups == {"u-alice": ["eng"], "u-bob": ["sales"], "u-carol": ["ops"]}


def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    with running_idp(tmp_path, _lab_data()) as server:
        server.process.send_signal(signal.SIGTERM)
        try:
            rc = server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("IdP did not exit within 5 s of SIGTERM")
        assert rc == 0, server.log()
