"""The IdP's standard endpoints, through Authlib's httpx OAuth 2 client.

Only discovery metadata, the standard grants (device code, authorization code + PKCE,
refresh token, client credentials), userinfo and revocation are used, so any standard OIDC
provider works.

Errors are split by what they mean for the binding set:

- :class:`IdpUnavailable`: the IdP could not give an answer (network error, timeout, 5xx,
  a body that is not what the standard says). The last good state stays in force.
- :class:`IdpRefused`: the IdP answered, and the answer is no (``invalid_grant``, a 401
  from userinfo ...). The identity concerned loses its binding.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from authlib.common.security import generate_token
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class IdpUnavailable(Exception):
    """No usable answer from the IdP (keep the last good state)."""


class IdpRefused(Exception):
    """The IdP answered with a definite refusal; ``error`` is the OAuth error code."""

    def __init__(self, error: str, description: str = "") -> None:
        self.error = error
        self.description = description
        super().__init__(f"{error}: {description}" if description else error)


@dataclass
class TokenSet:
    """What a token endpoint returned (secrets are kept out of repr)."""

    access_token: str = field(repr=False)
    expires_at: float
    refresh_token: str = field(default="", repr=False)
    id_token: str = field(default="", repr=False)
    scope: str = ""


@dataclass
class DeviceChallenge:
    """RFC 8628 section 3.2: the device authorization response."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_at: float
    interval: float


def _str(doc: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise IdpUnavailable(f"{where}: {key!r} is missing or not a string")
    return value


def _token_set(doc: Mapping[str, Any], where: str, now: float) -> TokenSet:
    """Validate the shape of a token response (RFC 6749 5.1)."""
    if str(doc.get("token_type", "")).lower() not in ("bearer", "dpop"):
        raise IdpUnavailable(f"{where}: token_type {doc.get('token_type')!r} is not Bearer")
    expires_in = doc.get("expires_in", 3600)
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) \
            or expires_in <= 0:
        raise IdpUnavailable(f"{where}: expires_in {expires_in!r} is not a positive number")
    return TokenSet(access_token=_str(doc, "access_token", where),
                    expires_at=now + float(expires_in),
                    refresh_token=_str(doc, "refresh_token", where, required=False),
                    id_token=_str(doc, "id_token", where, required=False),
                    scope=_str(doc, "scope", where, required=False))


class IdpClient:
    """One router's client of one IdP (discovery document already validated)."""

    def __init__(self, metadata: Mapping[str, Any], *, client_id: str, client_secret: str,
                 scopes: tuple[str, ...], redirect_uri: str, timeout: float) -> None:
        self.metadata = dict(metadata)
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.scopes = scopes
        method = "client_secret_basic" if client_secret else "none"
        self._oauth = AsyncOAuth2Client(
            client_id=client_id, client_secret=client_secret or None,
            token_endpoint_auth_method=method, scope=" ".join(scopes),
            redirect_uri=redirect_uri, code_challenge_method="S256", timeout=timeout,
            follow_redirects=False)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._oauth.aclose()

    def endpoint(self, name: str) -> str:
        """A metadata endpoint, or IdpUnavailable naming the one the IdP does not publish."""
        url = self.metadata.get(name)
        if not isinstance(url, str) or not url:
            raise IdpUnavailable(f"the IdP's discovery document has no {name}")
        return url

    async def _token(self, where: str, **params: Any) -> TokenSet:
        now = time.time()
        try:
            doc = await self._oauth.fetch_token(self.endpoint("token_endpoint"), **params)
        except OAuthError as exc:
            raise IdpRefused(str(exc.error or "error"), str(exc.description or "")) from None
        except httpx.HTTPStatusError as exc:
            raise IdpUnavailable(f"{where}: HTTP {exc.response.status_code}") from None
        except httpx.HTTPError as exc:
            raise IdpUnavailable(f"{where}: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:
            raise IdpUnavailable(f"{where}: {exc}") from None
        return _token_set(doc, where, now)

    # -- device authorization grant (RFC 8628) ----------------------------------------

    async def device_authorization(self) -> DeviceChallenge:
        """Ask for a device code and a user code."""
        url = self.endpoint("device_authorization_endpoint")
        doc = await self._post_json(url, {"scope": " ".join(self.scopes)}, "device authorization")
        if "error" in doc:
            raise IdpRefused(str(doc["error"]), str(doc.get("error_description", "")))
        where = "device authorization response"
        expires_in = doc.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
            raise IdpUnavailable(f"{where}: expires_in is missing or not a number")
        interval = doc.get("interval", 5)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval < 0:
            raise IdpUnavailable(f"{where}: interval {interval!r} is not a number")
        uri = _str(doc, "verification_uri", where)
        return DeviceChallenge(
            device_code=_str(doc, "device_code", where), user_code=_str(doc, "user_code", where),
            verification_uri=uri,
            verification_uri_complete=_str(doc, "verification_uri_complete", where,
                                           required=False) or uri,
            expires_at=time.time() + float(expires_in), interval=float(interval or 5))

    async def poll_device(self, device_code: str) -> TokenSet:
        """One token request for a device code; IdpRefused('authorization_pending') etc."""
        return await self._token("device token", grant_type=DEVICE_GRANT,
                                 device_code=device_code)

    # -- authorization code + PKCE (RFC 6749, RFC 7636) -------------------------------

    def authorization_url(self) -> tuple[str, str, str, str]:
        """(url, state, nonce, code_verifier) for a new code + PKCE login."""
        verifier = generate_token(64)
        nonce = secrets.token_urlsafe(24)
        url, state = self._oauth.create_authorization_url(
            self.endpoint("authorization_endpoint"), code_verifier=verifier, nonce=nonce,
            prompt="consent")
        return str(url), str(state), nonce, verifier

    async def exchange_code(self, code: str, verifier: str) -> TokenSet:
        """Trade an authorization code (and the PKCE verifier) for tokens."""
        return await self._token("code exchange", grant_type="authorization_code", code=code,
                                 code_verifier=verifier, redirect_uri=self.redirect_uri)

    # -- the rest ---------------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> TokenSet:
        """Use a refresh token (RFC 6749 section 6)."""
        tokens = await self._token("refresh", grant_type="refresh_token",
                                   refresh_token=refresh_token)
        if not tokens.refresh_token:
            tokens.refresh_token = refresh_token  # not rotated: keep using the old one
        return tokens

    async def client_credentials(self, scope: str) -> TokenSet:
        """A token for this router itself (directory reads)."""
        return await self._token("client credentials", grant_type="client_credentials",
                                 scope=scope)

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        """OIDC Core 5.3: the user's current claims; 401/403 mean the login is over."""
        doc = await self.get_json(self.endpoint("userinfo_endpoint"), access_token, {},
                                  "userinfo", accept="application/json")
        if not isinstance(doc, dict) or not isinstance(doc.get("sub"), str):
            raise IdpUnavailable("userinfo answer is not an object with a sub")
        return doc

    async def revoke(self, token: str, hint: str = "refresh_token") -> None:
        """RFC 7009, best effort: a provider without revocation is not an error."""
        url = self.metadata.get("revocation_endpoint")
        if not isinstance(url, str) or not url:
            return
        try:
            await self._oauth.revoke_token(url, token=token, token_type_hint=hint)
        except (httpx.HTTPError, OAuthError):
            return

    async def get_json(self, url: str, bearer: str, params: Mapping[str, Any], where: str,
                       accept: str = "application/scim+json, application/json") -> Any:
        """GET a JSON resource with a bearer token (userinfo, SCIM); 401/403 are a
        refusal."""
        headers = {"Authorization": f"Bearer {bearer}", "Accept": accept}
        try:
            resp = await self._oauth.request("GET", url, params=dict(params), headers=headers,
                                             withhold_token=True)
        except httpx.HTTPError as exc:
            raise IdpUnavailable(f"{where}: {type(exc).__name__}: {exc}") from None
        if resp.status_code in (401, 403):
            raise IdpRefused("invalid_token", f"{where} answered HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise IdpUnavailable(f"{where} answered HTTP {resp.status_code}")
        try:
            return resp.json()
        except ValueError:
            raise IdpUnavailable(f"{where} did not answer JSON") from None

    async def _post_json(self, url: str, data: dict[str, str], where: str) -> dict[str, Any]:
        try:
            auth = self._oauth.client_auth(self._oauth.token_endpoint_auth_method)
            resp = await self._oauth.request("POST", url, data=data, withhold_token=True,
                                             auth=auth)
        except httpx.HTTPError as exc:
            raise IdpUnavailable(f"{where}: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 500:
            raise IdpUnavailable(f"{where}: HTTP {resp.status_code}")
        try:
            doc = resp.json()
        except (ValueError, json.JSONDecodeError):
            raise IdpUnavailable(f"{where}: HTTP {resp.status_code}, not JSON") from None
        if not isinstance(doc, dict):
            raise IdpUnavailable(f"{where}: not a JSON object")
        return doc
