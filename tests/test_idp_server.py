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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from idp_server import (
    IDP_DIR,
    IdpError,
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


# ------------------------------------------------------------------ SCIM

SCIM_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
SCIM_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
SCIM_DEVICE = "urn:vpnr:params:scim:schemas:extension:device:2.0:User"
SCIM_LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
SCIM_ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
PRINTER_IPS = ["10.1.0.50/32", "fd00:1::50"]


def _device_users(n: int) -> list[dict[str, Any]]:
    return [
        {
            "sub": f"dev-{i:05d}",
            "username": f"device{i}",
            "password": secrets.token_urlsafe(8),
            "groups": ["devices", f"site-{i % 3}"],
            "ip_addresses": [f"10.1.{i // 256}.{i % 256}/32"],
        }
        for i in range(n)
    ]


def _scim_data() -> dict[str, Any]:
    data = _lab_data()
    data["users"] += [
        {
            "sub": "d-printer",
            "username": "printer",
            "password": "printer-lab-password",
            "name": "Lab printer",
            "groups": ["devices", "lab printers"],
            "ip_addresses": PRINTER_IPS,
        },
        {
            "sub": "d-old",
            "username": "old-server",
            "password": "old-lab-password",
            "groups": ["devices"],
            "ip_addresses": ["10.1.0.99/32"],
            "active": False,
        },
        *_device_users(5),
    ]
    return data


def _rsa_private_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    def b64(n: int) -> str:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    priv = key.private_numbers()
    pub = priv.public_numbers
    return {
        "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
        "n": b64(pub.n), "e": b64(pub.e), "d": b64(priv.d), "p": b64(priv.p), "q": b64(priv.q),
        "dp": b64(priv.dmp1), "dq": b64(priv.dmq1), "qi": b64(priv.iqmp),
    }  # fmt: skip


def _sign_jwt(key: rsa.RSAPrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    def seg(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    signing_input = f"{seg(header)}.{seg(claims)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


@dataclass
class ScimLab:
    idp: RunningIdp
    key: rsa.RSAPrivateKey  # the IdP's own signing key (passed with --keys)
    kid: str
    token: str  # client_credentials, scope scim:read

    def get(self, path: str, token: str | None = None, **params: Any) -> httpx.Response:
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.idp.scim_url(path), params=params, headers=headers, timeout=10.0)

    def ok(self, path: str, **params: Any) -> dict[str, Any]:
        r = self.get(path, **params)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/scim+json")
        doc: dict[str, Any] = r.json()
        return doc

    def page_all(self, path: str, count: int, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        start = 1
        while True:
            doc = self.ok(path, startIndex=start, count=count, **params)
            assert doc["schemas"] == [SCIM_LIST]
            assert doc["startIndex"] == start
            assert doc["itemsPerPage"] == len(doc["Resources"])
            items += doc["Resources"]
            start += doc["itemsPerPage"]
            if not doc["Resources"] or start > doc["totalResults"]:
                assert len(items) == doc["totalResults"]
                return items


def _scim_lab(tmp_path: Path, data: dict[str, Any]) -> Iterator[ScimLab]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = "lab-" + secrets.token_hex(4)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [_rsa_private_jwk(key, kid)]}))
    with running_idp(tmp_path, data, keys=keys) as server:
        yield ScimLab(server, key, kid, server.scim_token(CLIENT_ID, CLIENT_SECRET))


@pytest.fixture
def scim(tmp_path: Path) -> Iterator[ScimLab]:
    yield from _scim_lab(tmp_path, _scim_data())


def _assert_scim_error(r: httpx.Response, status: int, scim_type: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/scim+json")
    body = r.json()
    assert body["schemas"] == [SCIM_ERROR]
    assert body["status"] == str(status)
    assert body.get("scimType") == scim_type


def test_scim_token_is_a_scoped_jwt(scim: ScimLab) -> None:
    header, claims = jwt_parts(scim.token)
    assert header["typ"] == "at+jwt"
    assert header["kid"] == scim.kid
    assert claims["aud"] == "urn:vpnr"
    assert "scim:read" in claims["scope"].split()


def test_scim_users_list_and_paging(scim: ScimLab) -> None:
    doc = scim.ok("/Users")
    assert doc["schemas"] == [SCIM_LIST]
    assert doc["totalResults"] == 9
    assert doc["startIndex"] == 1
    assert doc["itemsPerPage"] == 9
    ids = [u["id"] for u in doc["Resources"]]
    assert ids == sorted(ids)
    assert {"u-alice", "u-bob", "d-printer", "d-old"} <= set(ids)

    for count in (1, 2, 4, 100):
        paged = [u["id"] for u in scim.page_all("/Users", count)]
        assert paged == ids, count

    page = scim.ok("/Users", startIndex=3, count=2)
    assert page["totalResults"] == 9
    assert page["itemsPerPage"] == 2
    assert [u["id"] for u in page["Resources"]] == ids[2:4]
    # count=0 only reports the total; startIndex past the end is an empty page
    assert scim.ok("/Users", count=0) | {"Resources": None} == {
        "schemas": [SCIM_LIST], "totalResults": 9, "startIndex": 1, "itemsPerPage": 0,
        "Resources": None,
    }  # fmt: skip
    assert scim.ok("/Users", startIndex=50)["Resources"] == []
    # out-of-range values are clamped as RFC 7644 says; junk is a 400
    assert scim.ok("/Users", startIndex=0, count=-5)["startIndex"] == 1
    _assert_scim_error(scim.get("/Users", count="ten"), 400, "invalidValue")


def test_scim_user_resource(scim: ScimLab) -> None:
    printer = scim.ok("/Users/d-printer")
    assert printer == {
        "schemas": [SCIM_USER, SCIM_DEVICE],
        "id": "d-printer",
        "userName": "printer",
        "displayName": "Lab printer",
        "active": True,
        "groups": [
            {"value": "g-devices", "display": "devices"},
            {"value": "g64-bGFiIHByaW50ZXJz", "display": "lab printers"},
        ],
        SCIM_DEVICE: {"ipAddresses": PRINTER_IPS},
        "meta": {"resourceType": "User", "location": scim.idp.scim_url("/Users/d-printer")},
    }
    alice = scim.ok("/Users/u-alice")
    assert alice["schemas"] == [SCIM_USER]
    assert SCIM_DEVICE not in alice
    assert alice["displayName"] == "alice"
    assert alice["emails"] == [{"value": "alice@example.test", "primary": True}]
    assert alice["groups"] == [{"value": "g-eng", "display": "eng"}]
    # disabled users are listed, marked inactive
    assert scim.ok("/Users/d-old")["active"] is False
    _assert_scim_error(scim.get("/Users/u-nobody"), 404)
    _assert_scim_error(scim.get("/Nothing"), 404)
    r = httpx.post(
        scim.idp.scim_url("/Users"),
        json={"userName": "x"},
        headers={"Authorization": f"Bearer {scim.token}"},
        timeout=10.0,
    )
    _assert_scim_error(r, 501)


def test_scim_filters(scim: ScimLab) -> None:
    def ids(path: str, flt: str) -> list[str]:
        doc = scim.ok(path, filter=flt)
        assert doc["totalResults"] == len(doc["Resources"])
        return [x["id"] for x in doc["Resources"]]

    assert ids("/Users", 'userName eq "alice"') == ["u-alice"]
    assert ids("/Users", 'username EQ "PRINTER"') == ["d-printer"]  # caseExact=false
    assert ids("/Users", 'userName eq "nobody"') == []
    assert ids("/Users", "active eq false") == ["d-old"]
    assert "d-old" not in ids("/Users", "active eq true")
    assert len(ids("/Users", "active eq true")) == 8
    assert ids("/Users", 'active eq true and userName eq "old-server"') == []
    assert ids("/Users", 'id eq "u-bob"') == ["u-bob"]
    assert ids("/Groups", 'displayName eq "lab printers"') == ["g64-bGFiIHByaW50ZXJz"]
    assert ids("/Groups", 'displayName eq "nope"') == []
    for bad in (
        'userName co "ali"',
        'userName eq "alice" or active eq true',
        '(userName eq "alice")',
        "userName eq alice",
        'active eq "true"',
        'emails.value eq "alice@example.test"',
        'userName eq "unterminated',
        "userName eq",
        "",
    ):
        _assert_scim_error(scim.get("/Users", filter=bad), 400, "invalidFilter")
    _assert_scim_error(scim.get("/Groups", filter='userName eq "alice"'), 400, "invalidFilter")


def test_scim_groups(scim: ScimLab) -> None:
    groups = {g["displayName"]: g for g in scim.page_all("/Groups", 2)}
    assert list(groups) == sorted(groups, key=lambda name: groups[name]["id"])
    assert set(groups) == {"eng", "sales", "devices", "lab printers", "site-0", "site-1", "site-2"}
    devices = groups["devices"]
    assert devices["schemas"] == [SCIM_GROUP]
    assert devices["id"] == "g-devices"
    members = devices["members"]
    assert [m["value"] for m in members] == sorted(m["value"] for m in members)
    assert {m["value"] for m in members} == {"d-printer", "d-old"} | {
        f"dev-{i:05d}" for i in range(5)
    }
    assert {"value": "d-old", "display": "old-server", "type": "User"} in members  # inactive
    assert devices["meta"] == {
        "resourceType": "Group",
        "location": scim.idp.scim_url("/Groups/g-devices"),
    }
    assert scim.ok("/Groups/g-devices") == devices
    printers = scim.ok("/Groups/g64-bGFiIHByaW50ZXJz")
    assert printers["displayName"] == "lab printers"
    assert printers["members"] == [{"value": "d-printer", "display": "printer", "type": "User"}]
    _assert_scim_error(scim.get("/Groups/g-nope"), 404)

    # group changes show up at once
    scim.idp.set_groups("u-alice", ["eng", "devices"])
    assert "u-alice" in {m["value"] for m in scim.ok("/Groups/g-devices")["members"]}
    scim.idp.set_groups("u-bob", [])
    _assert_scim_error(scim.get("/Groups/g-sales"), 404)


def test_scim_rejects_missing_and_invalid_tokens(scim: ScimLab) -> None:
    now = int(time.time())
    header = {"alg": "RS256", "typ": "at+jwt", "kid": scim.kid}
    claims = {
        "iss": scim.idp.issuer, "aud": "urn:vpnr", "sub": CLIENT_ID, "client_id": CLIENT_ID,
        "scope": "scim:read", "iat": now - 10, "exp": now + 300, "jti": secrets.token_hex(8),
    }  # fmt: skip
    # Control: a token forged with the IdP's own key and correct claims passes...
    assert scim.get("/Users", token=_sign_jwt(scim.key, header, claims)).status_code == 200

    foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signed_id_token = _device_login(scim.idp.discovery(), "alice", "alice-lab-password")["id_token"]
    bad_tokens = {
        "expired": _sign_jwt(scim.key, header, {**claims, "iat": now - 600, "exp": now - 60}),
        "no exp": _sign_jwt(scim.key, header, {k: v for k, v in claims.items() if k != "exp"}),
        "foreign key": _sign_jwt(foreign, header, claims),
        "other issuer": _sign_jwt(scim.key, header, {**claims, "iss": "http://evil.test"}),
        "other audience": _sign_jwt(scim.key, header, {**claims, "aud": "urn:other"}),
        "not an access token": _sign_jwt(scim.key, {**header, "typ": "JWT"}, claims),
        "id token": signed_id_token,
        "tampered": scim.token[:-4] + ("AAAA" if not scim.token.endswith("AAAA") else "BBBB"),
        "garbage": "not-a-jwt",
    }
    for what, token in bad_tokens.items():
        r = scim.get("/Users", token=token)
        _assert_scim_error(r, 401)
        assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"', what
    r = scim.get("/Users", token="")
    _assert_scim_error(r, 401)
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    r = httpx.get(
        scim.idp.scim_url("/Users/u-alice"),
        headers={"Authorization": f"Basic {base64.b64encode(b'a:b').decode()}"},
        timeout=10.0,
    )
    _assert_scim_error(r, 401)


def test_scim_requires_scim_read_scope(scim: ScimLab) -> None:
    oidc = scim.idp.discovery()
    with _client() as client:
        r = client.post(oidc["token_endpoint"], data={"grant_type": "client_credentials"})
        plain = r.json()["access_token"]
        r = client.post(
            oidc["token_endpoint"], data={"grant_type": "client_credentials", "scope": "vpn"}
        )
        vpn_only = r.json()["access_token"]
    for token in (plain, vpn_only):
        assert "scim:read" not in jwt_parts(token)[1].get("scope", "").split()
        r = scim.get("/Users", token=token)
        _assert_scim_error(r, 403)
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]


def test_scim_fault_injection(scim: ScimLab) -> None:
    assert scim.idp.set_fault("http500") == {"scim": "http500"}
    _assert_scim_error(scim.get("/Users"), 500)
    _assert_scim_error(scim.get("/Groups/g-eng"), 500)
    _assert_scim_error(scim.get("/Users", token="nope"), 401)  # auth comes first

    scim.idp.set_fault("garbage")
    r = scim.get("/Users")
    assert r.status_code == 200
    with pytest.raises(ValueError):
        json.loads(r.text)

    scim.idp.set_fault("truncate")
    first = scim.ok("/Users", count=4)
    assert first["itemsPerPage"] == 4
    assert first["totalResults"] > 9
    second = scim.ok("/Users", startIndex=5, count=4)
    assert second["Resources"] == []
    assert second["totalResults"] > 9
    whole = scim.ok("/Users")  # even a single page claims more than it holds
    assert whole["totalResults"] > whole["itemsPerPage"] == 9
    assert scim.ok("/Groups")["totalResults"] > scim.ok("/Groups")["itemsPerPage"]

    scim.idp.set_fault("slow")
    started = time.monotonic()
    assert scim.ok("/Users/u-alice")["id"] == "u-alice"
    assert time.monotonic() - started >= 2.9

    scim.idp.set_fault("none")
    assert scim.ok("/Users")["totalResults"] == 9
    with pytest.raises(IdpError, match="HTTP 400"):
        scim.idp.set_fault("explode")


def test_admin_add_delete_user_and_ip_addresses(scim: ScimLab) -> None:
    idp = scim.idp
    added = idp.add_user(
        {"sub": "d-cam", "username": "camera", "password": "pw", "groups": ["cams"],
         "ip_addresses": ["10.1.0.77/32"]}
    )  # fmt: skip
    assert added["sub"] == "d-cam"
    assert added["ip_addresses"] == ["10.1.0.77/32"]
    assert "password" not in added
    assert "d-cam" in {u["sub"] for u in idp.users()}
    cam = scim.ok("/Users/d-cam")
    assert cam[SCIM_DEVICE] == {"ipAddresses": ["10.1.0.77/32"]}
    assert scim.ok("/Users")["totalResults"] == 10
    assert scim.ok("/Groups/g-cams")["members"][0]["value"] == "d-cam"

    with pytest.raises(IdpError, match="HTTP 409"):
        idp.add_user({"sub": "d-cam", "username": "camera2", "password": "pw"})
    with pytest.raises(IdpError, match="HTTP 409"):
        idp.add_user({"sub": "d-cam2", "username": "camera", "password": "pw"})
    for bad in (
        {"sub": "x", "username": "x"},  # no password
        {"sub": "x", "username": "x", "password": "pw", "ip_addresses": [""]},
        {"sub": "x", "username": "x", "password": "pw", "ip_addresses": "10.0.0.1"},
        {"sub": "x", "username": "x", "password": "pw", "groups": [1]},
    ):
        with pytest.raises(IdpError, match="HTTP 400"):
            idp.add_user(bad)

    assert idp.set_ip_addresses("d-cam", ["10.1.0.78/32", "fd00:1::78"])["ip_addresses"] == [
        "10.1.0.78/32",
        "fd00:1::78",
    ]
    assert scim.ok("/Users/d-cam")[SCIM_DEVICE]["ipAddresses"] == ["10.1.0.78/32", "fd00:1::78"]
    idp.set_ip_addresses("d-cam", [])
    cam = scim.ok("/Users/d-cam")
    assert cam["schemas"] == [SCIM_USER]
    assert SCIM_DEVICE not in cam
    idp.set_ip_addresses("u-alice", ["10.1.0.5/32"])
    assert scim.ok("/Users/u-alice")[SCIM_DEVICE] == {"ipAddresses": ["10.1.0.5/32"]}
    with pytest.raises(IdpError, match="HTTP 400"):
        idp.set_ip_addresses("d-cam", [""])
    with pytest.raises(IdpError, match="HTTP 404"):
        idp.set_ip_addresses("d-nobody", ["10.0.0.1"])

    assert idp.delete_user("d-cam") == {"deleted": "d-cam"}
    _assert_scim_error(scim.get("/Users/d-cam"), 404)
    _assert_scim_error(scim.get("/Groups/g-cams"), 404)
    assert scim.ok("/Users")["totalResults"] == 9
    with pytest.raises(IdpError, match="HTTP 404"):
        idp.delete_user("d-cam")


def test_admin_added_user_can_log_in_and_deleted_cannot(scim: ScimLab) -> None:
    idp = scim.idp
    idp.add_user({"sub": "u-dora", "username": "dora", "password": "dora-pw", "groups": ["ops"]})
    oidc = idp.discovery()
    tokens = _device_login(oidc, "dora", "dora-pw")
    assert _userinfo(oidc, tokens["access_token"]).json()["groups"] == ["ops"]
    idp.delete_user("u-dora")
    assert _userinfo(oidc, tokens["access_token"]).status_code == 401


def test_data_file_validates_ip_addresses(tmp_path: Path) -> None:
    for i, bad in enumerate(([""], "10.0.0.1", [10])):
        data = _lab_data()
        data["users"][0]["ip_addresses"] = bad
        with pytest.raises(IdpError, match="ip_addresses"), running_idp(tmp_path / str(i), data):
            pass


def test_scim_pages_through_10k_users(tmp_path: Path) -> None:
    data = _lab_data()
    data["users"] += _device_users(10_000)
    for lab in _scim_lab(tmp_path, data):
        users = lab.page_all("/Users", 1000)
        ids = [u["id"] for u in users]
        assert len(ids) == 10_002
        assert len(set(ids)) == 10_002
        assert ids == sorted(ids)
        assert all(u[SCIM_DEVICE]["ipAddresses"] for u in users if u["id"].startswith("dev-"))
        # count is capped at 1000
        assert lab.ok("/Users", count=5000)["itemsPerPage"] == 1000
        groups = {g["displayName"]: g for g in lab.page_all("/Groups", 1000)}
        assert len(groups["devices"]["members"]) == 10_000
        assert sum(len(groups[f"site-{i}"]["members"]) for i in range(3)) == 10_000
