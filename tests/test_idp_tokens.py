"""vpnr.idpd.tokens against the real lab IdP (deploy/idp/server.mjs), no mocks of the IdP.

The IdP runs with a key file the test wrote, so the test holds the IdP's private key and
can forge tokens that are correctly signed but wrong in one claim (see jwt_craft).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
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
from jwt_craft import (
    b64url,
    b64url_json,
    claims,
    hs256_with_public_key,
    load_private_jwk,
    other_key_same_kid,
    sign_rs256,
    unsigned_token,
)

from vpnr.idpd.tokens import JwksCache, TokenError, TokenValidator, parse_jwks

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_ID = "vpnr-idpd"
CLIENT_SECRET = "vpnr-idpd-lab-secret"
REDIRECT_URI = "http://127.0.0.1:8765/callback"
RESOURCE = "urn:vpnr"


def _lab_data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((IDP_DIR / "example-data.json").read_text())
    return data


def _client() -> httpx.Client:
    return httpx.Client(auth=(CLIENT_ID, CLIENT_SECRET), timeout=10.0)


def _client_credentials(idp: RunningIdp) -> str:
    with _client() as client:
        r = client.post(idp.url("/token"), data={"grant_type": "client_credentials",
                                                  "scope": "vpn"})
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


def _device_id_token(idp: RunningIdp) -> str:
    with _client() as client:
        r = client.post(idp.url("/device/auth"), data={"scope": "openid groups email profile"})
        assert r.status_code == 200, r.text
        start = r.json()
        approve_device(start["verification_uri_complete"], "alice", "alice-lab-password")
        deadline = time.monotonic() + 10.0
        while True:
            r = client.post(idp.url("/token"),
                            data={"grant_type": DEVICE_GRANT, "device_code": start["device_code"]})
            if r.status_code == 200:
                token: str = r.json()["id_token"]
                return token
            assert r.json().get("error") in ("authorization_pending", "slow_down"), r.text
            assert time.monotonic() < deadline, "device flow did not complete"
            time.sleep(0.2)


def _code_flow_id_token(idp: RunningIdp, nonce: str) -> str:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    params = {"client_id": CLIENT_ID, "response_type": "code", "redirect_uri": REDIRECT_URI,
              "scope": "openid groups", "state": secrets.token_urlsafe(8), "nonce": nonce,
              "code_challenge": challenge, "code_challenge_method": "S256"}
    callback = browser_authorize(f"{idp.url('/auth')}?{urlencode(params)}", REDIRECT_URI,
                                 "bob", "bob-lab-password")
    with _client() as client:
        r = client.post(idp.url("/token"), data={
            "grant_type": "authorization_code", "code": callback["code"],
            "redirect_uri": REDIRECT_URI, "code_verifier": verifier})
    assert r.status_code == 200, r.text
    token: str = r.json()["id_token"]
    return token


@dataclass
class Lab:
    idp: RunningIdp
    keys_file: Path
    jwk: dict[str, Any]  # the IdP's private signing key
    id_token: str  # alice, device flow, no nonce
    access_token: str  # client credentials, scope vpn
    nonce: str
    nonce_id_token: str  # bob, code flow + PKCE, with nonce

    @property
    def issuer(self) -> str:
        return self.idp.issuer

    @property
    def jwks_uri(self) -> str:
        return self.idp.url("/jwks")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("idp-tokens")
    keys_file = generate_keys(tmp / "keys.json")
    with running_idp(tmp, _lab_data(), keys=keys_file) as idp:
        nonce = secrets.token_urlsafe(16)
        yield Lab(idp=idp, keys_file=keys_file, jwk=load_private_jwk(keys_file),
                  id_token=_device_id_token(idp), access_token=_client_credentials(idp),
                  nonce=nonce, nonce_id_token=_code_flow_id_token(idp, nonce))


def _validator(issuer: str, jwks_uri: str, clock: Any = time.time,
               client: httpx.AsyncClient | None = None) -> TokenValidator:
    cache = JwksCache(jwks_uri, timeout=5.0, min_refetch_interval=30.0, clock=clock,
                      client=client)
    return TokenValidator(issuer=issuer, client_id=CLIENT_ID, jwks=cache,
                          allowed_algorithms=["RS256"])


@pytest.fixture
def validator(lab: Lab) -> TokenValidator:
    return _validator(lab.issuer, lab.jwks_uri)


async def _rejects(coro: Any, reason: str, token: str) -> TokenError:
    with pytest.raises(TokenError) as info:
        await coro
    err = info.value
    assert err.reason == reason, str(err)
    # Messages name what is wrong but never carry the token or its signature.
    signature = token.rsplit(".", 1)[-1]
    if len(signature) >= 8:  # too short a string matches by chance
        assert token not in str(err)
        assert signature not in str(err)
    return err


# ---------------------------------------------------------------- real tokens


async def test_real_id_token_validates(lab: Lab, validator: TokenValidator) -> None:
    got = await validator.validate_id_token(lab.id_token)
    assert got["sub"] == "u-alice"
    assert got["groups"] == ["eng"]
    assert got["email"] == "alice@example.test"
    assert got["aud"] == CLIENT_ID
    assert got["iss"] == lab.issuer
    assert validator.jwks.fetch_count == 1
    assert validator.jwks.kids == [lab.jwk["kid"]]
    assert validator.jwks.fetched_at is not None
    assert validator.jwks.warnings == []
    assert not validator.rejected


async def test_real_access_token_validates(lab: Lab, validator: TokenValidator) -> None:
    got = await validator.validate_access_token(lab.access_token, audience=RESOURCE,
                                                required_scopes=["vpn"])
    assert got["aud"] == RESOURCE
    assert got["client_id"] == CLIENT_ID
    assert got["scope"] == "vpn"
    err = await _rejects(validator.validate_access_token(
        lab.access_token, audience=RESOURCE, required_scopes=["vpn", "admin"]),
        "missing_claim", lab.access_token)
    assert "admin" in str(err)


async def test_nonce(lab: Lab, validator: TokenValidator) -> None:
    got = await validator.validate_id_token(lab.nonce_id_token, nonce=lab.nonce)
    assert got["sub"] == "u-bob"
    assert got["groups"] == ["sales"]
    err = await _rejects(validator.validate_id_token(lab.nonce_id_token, nonce="other"),
                         "nonce_mismatch", lab.nonce_id_token)
    assert lab.nonce not in str(err)
    # A nonce was sent but the token carries none.
    await _rejects(validator.validate_id_token(lab.id_token, nonce=lab.nonce),
                   "nonce_mismatch", lab.id_token)


async def test_token_kinds_are_not_interchangeable(lab: Lab, validator: TokenValidator) -> None:
    # An access token is not an ID token for this client...
    await _rejects(validator.validate_id_token(lab.access_token), "wrong_audience",
                   lab.access_token)
    # ...and an ID token has no at+jwt typ.
    err = await _rejects(validator.validate_access_token(lab.id_token, audience=RESOURCE),
                         "malformed", lab.id_token)
    assert "at+jwt" in str(err)
    await _rejects(validator.validate_access_token(lab.access_token, audience="urn:other"),
                   "wrong_audience", lab.access_token)


# ---------------------------------------------------------------- forgeries


async def test_bad_signature(lab: Lab, validator: TokenValidator) -> None:
    header, _payload, signature = lab.id_token.split(".")
    _, original = jwt_parts(lab.id_token)
    altered = f"{header}.{b64url_json({**original, 'groups': ['admin']})}.{signature}"
    await _rejects(validator.validate_id_token(altered), "bad_signature", altered)

    forged = sign_rs256(original, None, other_key_same_kid(lab.jwk["kid"]))
    err = await _rejects(validator.validate_id_token(forged), "bad_signature", forged)
    assert "signature" in str(err)


async def test_wrong_issuer(lab: Lab, validator: TokenValidator) -> None:
    token = sign_rs256(claims("http://evil", CLIENT_ID), None, lab.jwk)
    err = await _rejects(validator.validate_id_token(token), "wrong_issuer", token)
    assert str(err) == (f"ID token issuer 'http://evil' is not the configured issuer "
                        f"'{lab.issuer}'")
    at = sign_rs256({**claims("http://evil", RESOURCE), "client_id": CLIENT_ID, "jti": "j"},
                    {"typ": "at+jwt"}, lab.jwk)
    await _rejects(validator.validate_access_token(at, audience=RESOURCE), "wrong_issuer", at)


async def test_wrong_audience(lab: Lab, validator: TokenValidator) -> None:
    cases: list[tuple[str | list[str], dict[str, Any]]] = [
        ("someone-else", {}),
        ([CLIENT_ID, "someone-else"], {}),  # several audiences need azp
        ([CLIENT_ID, "someone-else"], {"azp": "someone-else"}),
        (CLIENT_ID, {"azp": "someone-else"}),
    ]
    for aud, extra in cases:
        token = sign_rs256(claims(lab.issuer, aud, **extra), None, lab.jwk)
        await _rejects(validator.validate_id_token(token), "wrong_audience", token)
    ok = sign_rs256(claims(lab.issuer, [CLIENT_ID, "x"], azp=CLIENT_ID), None, lab.jwk)
    assert (await validator.validate_id_token(ok))["azp"] == CLIENT_ID


async def test_token_times(lab: Lab, validator: TokenValidator) -> None:
    now = time.time()
    expired = sign_rs256(claims(lab.issuer, CLIENT_ID, now=now - 600, lifetime=480), None,
                         lab.jwk)  # expired 120 s ago, leeway is 60 s
    await _rejects(validator.validate_id_token(expired), "expired", expired)
    within = sign_rs256(claims(lab.issuer, CLIENT_ID, now=now - 600, lifetime=570), None,
                        lab.jwk)  # expired 30 s ago: within leeway
    await validator.validate_id_token(within)
    future = sign_rs256(claims(lab.issuer, CLIENT_ID, nbf=int(now) + 600), None, lab.jwk)
    await _rejects(validator.validate_id_token(future), "not_yet_valid", future)
    issued_later = sign_rs256(claims(lab.issuer, CLIENT_ID, now=now + 600), None, lab.jwk)
    await _rejects(validator.validate_id_token(issued_later), "not_yet_valid", issued_later)


async def test_missing_claims(lab: Lab, validator: TokenValidator) -> None:
    for name in ("sub", "exp", "iat", "iss", "aud"):
        payload = claims(lab.issuer, CLIENT_ID)
        del payload[name]
        token = sign_rs256(payload, None, lab.jwk)
        err = await _rejects(validator.validate_id_token(token), "missing_claim", token)
        assert repr(name) in str(err)


async def test_alg_none_and_hs256_rejected_before_key_lookup(lab: Lab) -> None:
    validator = _validator(lab.issuer, lab.jwks_uri)
    _, payload = jwt_parts(lab.id_token)
    none = unsigned_token(payload)
    err = await _rejects(validator.validate_id_token(none), "alg_not_allowed", none)
    assert "'none'" in str(err)
    confused = hs256_with_public_key(payload, lab.jwk)
    err = await _rejects(validator.validate_id_token(confused), "alg_not_allowed", confused)
    assert "'HS256'" in str(err)
    assert validator.jwks.fetch_count == 0  # never got as far as the JWKS


async def test_unknown_kid(lab: Lab, validator: TokenValidator) -> None:
    token = sign_rs256(claims(lab.issuer, CLIENT_ID), {"kid": "no-such-kid"},
                       other_key_same_kid("no-such-kid"))
    err = await _rejects(validator.validate_id_token(token), "unknown_key", token)
    assert "'no-such-kid'" in str(err)


@pytest.mark.parametrize("token", [
    "",
    "onlyone",
    "a.b",
    "a.b.c.d",
    "!!!.e30.c2ln",  # header not base64url
    "e30.e30=.c2ln",  # padding is not base64url
    f"{base64.urlsafe_b64encode(b'not json').decode().rstrip('=')}.e30.c2ln",
    f"{b64url_json([1, 2])}.e30.c2ln",  # header not an object
    b64url(b'{"alg":"RS256","alg":"none"}') + ".e30.c2ln",  # duplicate alg
    '{"alg":"RS256"}.e30.c2ln',
])
async def test_malformed(lab: Lab, validator: TokenValidator, token: str) -> None:
    await _rejects(validator.validate_id_token(token), "malformed", token)


async def test_rejections_are_counted(lab: Lab, validator: TokenValidator) -> None:
    for token in ("a.b", "x.y.z", unsigned_token({})):
        with pytest.raises(TokenError):
            await validator.validate_id_token(token)
    assert validator.rejected == {"malformed": 2, "alg_not_allowed": 1}


# ---------------------------------------------------------------- JWKS cache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_key_rotation_and_refetch_limit(tmp_path: Path) -> None:
    old_keys, new_keys = generate_keys(tmp_path / "old.json"), generate_keys(tmp_path / "new.json")
    clock = FakeClock()  # drives the refetch limit only; token times use the real clock
    with running_idp(tmp_path / "a", _lab_data(), keys=old_keys) as idp:
        port, issuer = idp.port, idp.issuer
        validator = _validator(issuer, idp.url("/jwks"), clock=clock)
        old_token = _client_credentials(idp)
        await validator.validate_access_token(old_token, audience=RESOURCE)
    cache = validator.jwks
    assert cache.fetch_count == 1
    assert cache.kids == [load_private_jwk(old_keys)["kid"]]

    with running_idp(tmp_path / "b", _lab_data(), port=port, keys=new_keys) as idp:
        assert idp.issuer == issuer
        new_token = _client_credentials(idp)
        assert jwt_parts(new_token)[0]["kid"] == load_private_jwk(new_keys)["kid"]
        clock.now += 31
        got = await validator.validate_access_token(new_token, audience=RESOURCE)
        assert got["aud"] == RESOURCE
        assert cache.fetch_count == 2
        assert cache.kids == [load_private_jwk(new_keys)["kid"]]

        # A flood of unknown kids right after a fetch: no fetch at all.
        attacker = other_key_same_kid("x")
        flood = [sign_rs256(claims(issuer, CLIENT_ID), {"kid": secrets.token_hex(8)}, attacker)
                 for _ in range(50)]
        results = await asyncio.gather(*(validator.validate_id_token(t) for t in flood),
                                       return_exceptions=True)
        assert all(isinstance(r, TokenError) and r.reason == "unknown_key" for r in results)
        assert cache.fetch_count == 2
        # Once the interval has passed, the next flood costs exactly one fetch.
        clock.now += 31
        results = await asyncio.gather(*(validator.validate_id_token(t) for t in flood),
                                       return_exceptions=True)
        assert all(isinstance(r, TokenError) and r.reason == "unknown_key" for r in results)
        assert cache.fetch_count == 3
        # The old key is gone from the IdP, so its tokens no longer validate.
        await _rejects(validator.validate_access_token(old_token, audience=RESOURCE),
                       "unknown_key", old_token)
        assert cache.fetch_count == 3
    assert validator.rejected["unknown_key"] == 101


async def test_idp_down_keeps_cached_keys(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys.json")
    jwk = load_private_jwk(keys)
    clock = FakeClock()
    async with httpx.AsyncClient() as shared:
        with running_idp(tmp_path, _lab_data(), keys=keys) as idp:
            issuer = idp.issuer
            validator = _validator(issuer, idp.url("/jwks"), clock=clock, client=shared)
            token = _client_credentials(idp)
            await validator.validate_access_token(token, audience=RESOURCE)
        cache = validator.jwks
        # The IdP is down now.  A known kid needs no fetch.
        assert (await validator.validate_access_token(token, audience=RESOURCE))["aud"]
        stranger = sign_rs256(claims(issuer, CLIENT_ID), {"kid": "new-kid"}, jwk)
        # Within the refetch interval: not even tried, the kid is simply unknown.
        await _rejects(validator.validate_id_token(stranger), "unknown_key", stranger)
        assert cache.fetch_count == 1
        # After it: the fetch fails, cleanly, and the last good key set is kept.
        clock.now += 31
        err = await _rejects(validator.validate_id_token(stranger), "jwks_unavailable", stranger)
        assert "ConnectError" in str(err)
        assert cache.fetch_count == 2
        assert cache.last_error
        assert cache.kids == [jwk["kid"]]
        assert (await validator.validate_access_token(token, audience=RESOURCE))["aud"]


def test_parse_jwks_skips_unusable_keys(lab: Lab) -> None:
    public = {k: v for k, v in lab.jwk.items() if k in ("kty", "n", "e", "kid", "alg")}
    doc = {"keys": [
        {**public, "kid": "enc", "use": "enc"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**public, "kid": "ops", "key_ops": ["encrypt"]},
        "garbage",
        {**public, "kid": "broken", "n": "!!"},
        {**lab.jwk, "kid": "private"},
        public,
    ]}
    keys, warnings = parse_jwks(doc)
    assert [k.kid for k in keys] == ["private", lab.jwk["kid"]]
    assert all(not k.is_private for k in keys)
    assert len(warnings) == 6, warnings
    assert any("'enc'" in w and "use" in w for w in warnings)
    assert any("private key material" in w for w in warnings)
    bad: Any
    for bad in ([], {"keys": {}}, {"keys": []}, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}):
        with pytest.raises(ValueError, match="JWKS"):
            parse_jwks(bad)


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512", "RS1", "none "])
def test_validator_refuses_unsafe_algorithms(alg: str) -> None:
    cache = JwksCache("http://127.0.0.1:1/jwks", timeout=1.0)
    with pytest.raises(ValueError, match=repr(alg).replace("'", "")):
        TokenValidator(issuer="http://x", client_id="c", jwks=cache,
                       allowed_algorithms=["RS256", alg])
