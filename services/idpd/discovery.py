"""OIDC discovery (OpenID Connect Discovery 1.0, section 4)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

# Discovery 1.0 section 3: metadata every provider must publish that idpd relies on.
REQUIRED_KEYS = ("issuer", "jwks_uri", "token_endpoint", "response_types_supported")
ENDPOINT_KEYS = ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri",
                 "device_authorization_endpoint", "revocation_endpoint", "end_session_endpoint")


class DiscoveryError(Exception):
    """The discovery document could not be fetched or is not valid."""


@dataclass
class DiscoveryState:
    """The last discovery attempt and the last good document."""

    document: dict[str, Any] = field(default_factory=dict)
    fetched_at: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the last attempt succeeded."""
        return bool(self.document) and not self.error

    def endpoints(self) -> list[str]:
        """``name=url`` for each endpoint the provider published."""
        return [f"{k}={self.document[k]}" for k in ENDPOINT_KEYS if k in self.document]


def discovery_url(issuer: str) -> str:
    """Discovery 1.0 section 4: issuer + /.well-known/openid-configuration."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def validate_document(issuer: str, doc: Any) -> dict[str, Any]:
    """Check the document is an object naming the same issuer with the required keys."""
    if not isinstance(doc, dict):
        raise DiscoveryError("discovery document is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if not doc.get(k)]
    if missing:
        raise DiscoveryError("discovery document lacks " + ", ".join(missing))
    # Discovery 1.0 section 4.3: the issuer must match exactly.
    if doc["issuer"] != issuer:
        raise DiscoveryError(f"discovery document names issuer {doc['issuer']!r}, "
                             f"configured issuer is {issuer!r}")
    return doc


async def fetch_discovery(issuer: str, timeout: float) -> dict[str, Any]:
    """Fetch and validate the provider's discovery document."""
    url = discovery_url(issuer)
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            response = await client.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise DiscoveryError(f"cannot fetch {url}: {exc.__class__.__name__}: {exc}") from exc
    if response.status_code != 200:
        raise DiscoveryError(f"{url} answered HTTP {response.status_code}")
    try:
        doc = response.json()
    except ValueError as exc:
        raise DiscoveryError(f"{url} did not return JSON") from exc
    return validate_document(issuer, doc)


async def refresh(state: DiscoveryState, issuer: str, timeout: float) -> None:
    """Fetch once, keeping the last good document when the attempt fails."""
    try:
        state.document = await fetch_discovery(issuer, timeout)
        state.fetched_at = time.time()
        state.error = ""
    except DiscoveryError as exc:
        state.error = str(exc)
