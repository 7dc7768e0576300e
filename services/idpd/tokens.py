"""Validation of the IdP's JWTs: OIDC ID tokens and RFC 9068 JWT access tokens.

JOSE library: joserfc, not ``authlib.jose``.  Authlib 1.9 deprecates its JOSE module:
importing ``authlib.jose`` emits ``AuthlibDeprecationWarning: authlib.jose module is
deprecated, please use joserfc instead`` (it goes away in Authlib 2.0).  joserfc is
Authlib's successor for JOSE, by the same author, and ships type hints.  Authlib stays
the OAuth/OIDC client library; only signature checking and JWK handling use joserfc.

What this module does itself, on purpose, rather than leaving it to the library:

* The header is parsed and ``alg`` is checked against the allow-list *before* any key
  lookup or signature check, so ``alg: none`` and HS256-with-the-public-key confusion
  fail early with reason ``alg_not_allowed``.  Symmetric and ``none`` algorithms can
  never be allowed.
* Claims are checked here (OIDC Core 3.1.3.7, RFC 9068 section 4) so each failure has
  its own reason and a message that names the claim and the expected value.  Messages
  never contain the token, nonces or key material.
* :class:`JwksCache` refetches the JWKS when a token names an unknown ``kid`` (this is
  how key rotation at the IdP is picked up), at most once per ``min_refetch_interval``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import JWKRegistry, Key

Clock = Callable[[], float]

REASONS = frozenset({
    "malformed", "alg_not_allowed", "unknown_key", "bad_signature", "wrong_issuer",
    "wrong_audience", "expired", "not_yet_valid", "nonce_mismatch", "missing_claim",
    "jwks_unavailable",
})

# Asymmetric JWS algorithms and the key type each needs (RFC 7518, RFC 8037).
KEY_TYPE_FOR_ALG: dict[str, str] = {
    **{a: "RSA" for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    **{a: "EC" for a in ("ES256", "ES384", "ES512", "ES256K")},
    **{a: "OKP" for a in ("EdDSA", "Ed25519")},
}
ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
MAX_TOKEN_LENGTH = 16 * 1024


class TokenError(Exception):
    """A token was rejected; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------- JWKS


class JwksCache:
    """The IdP's signing keys, fetched from ``jwks_uri`` and refetched on unknown kids."""

    def __init__(
        self,
        jwks_uri: str,
        *,
        timeout: float,
        min_refetch_interval: float = 30.0,
        clock: Clock = time.time,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.jwks_uri = jwks_uri
        self.timeout = timeout
        self.min_refetch_interval = min_refetch_interval
        self.clock = clock
        self.client = client
        self.fetched_at: float | None = None  # time of the last *successful* fetch
        self.fetch_count = 0  # fetch attempts, successful or not
        self.last_error = ""  # why the last attempt failed; "" after a success
        self.warnings: list[str] = []  # keys skipped by the last successful fetch
        self._keys: list[Key] = []
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()

    @property
    def kids(self) -> list[str]:
        return [k.kid for k in self._keys if k.kid is not None]

    async def key_for(self, kid: str | None, alg: str) -> Key:
        """The key to verify a token signed with ``alg`` by key ``kid``.

        Raises :class:`TokenError` ``unknown_key`` when no such key is published, or
        ``jwks_unavailable`` when it is unknown and the JWKS could not be fetched.
        """
        key = self._find(kid, alg)
        if key is not None:
            return key
        async with self._lock:
            key = self._find(kid, alg)  # another task may have refetched meanwhile
            if key is None and self._may_fetch():
                await self.refresh()
                key = self._find(kid, alg)
        if key is not None:
            return key
        name = f"kid {kid!r}" if kid is not None else "no kid"
        if self.last_error:
            raise TokenError("jwks_unavailable", f"no {alg} key with {name} is cached and "
                             f"the JWKS cannot be fetched: {self.last_error}")
        raise TokenError("unknown_key", f"the IdP publishes no {alg} key with {name} "
                         f"at {self.jwks_uri} (known kids: {', '.join(self.kids) or 'none'})")

    async def refresh(self) -> None:
        """Fetch the JWKS once; on failure keep the last good key set, set ``last_error``."""
        self._last_attempt = self.clock()
        self.fetch_count += 1
        try:
            doc = await self._get()
            keys, warnings = parse_jwks(doc)
        except ValueError as exc:
            self.last_error = f"{self.jwks_uri}: {exc}"
            return
        self._keys, self.warnings = keys, warnings
        self.fetched_at = self._last_attempt
        self.last_error = ""

    def _may_fetch(self) -> bool:
        return (self._last_attempt is None
                or self.clock() - self._last_attempt >= self.min_refetch_interval)

    def _find(self, kid: str | None, alg: str) -> Key | None:
        usable = [k for k in self._keys
                  if k.key_type == KEY_TYPE_FOR_ALG.get(alg) and k.alg in (None, alg)]
        if kid is None:  # only unambiguous without a kid
            return usable[0] if len(usable) == 1 else None
        return next((k for k in usable if k.kid == kid), None)

    async def _get(self) -> Any:
        try:
            if self.client is not None:
                response = await self.client.get(self.jwks_uri, timeout=self.timeout)
            else:
                async with httpx.AsyncClient(timeout=self.timeout) as client:
                    response = await client.get(self.jwks_uri)
        except httpx.HTTPError as exc:
            raise ValueError(f"{exc.__class__.__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError as exc:
            raise ValueError("the JWKS is not JSON") from exc


def parse_jwks(doc: Any) -> tuple[list[Key], list[str]]:
    """Public signature keys of a JWKS document, and a warning for each key skipped.

    Raises ValueError when the document is not a JWKS or has no usable key.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('the JWKS is not an object with a "keys" list')
    keys: list[Key] = []
    warnings: list[str] = []
    for i, entry in enumerate(doc["keys"]):
        name = f"key {i}" + (f" (kid {entry.get('kid')!r})" if isinstance(entry, dict) else "")
        problem = _unusable(entry)
        if problem:
            warnings.append(f"{name} skipped: {problem}")
            continue
        try:
            key = JWKRegistry.import_key(entry)
            if key.is_private:  # use, and keep, only the public half
                warnings.append(f"{name} publishes private key material; using its public part")
                key = JWKRegistry.import_key(key.as_dict(private=False))
        except (JoseError, ValueError, TypeError) as exc:
            warnings.append(f"{name} skipped: cannot import it ({exc.__class__.__name__})")
            continue
        keys.append(key)
    if not keys:
        raise ValueError("the JWKS has no usable signature key" +
                         (f" ({'; '.join(warnings)})" if warnings else ""))
    return keys, warnings


def _unusable(entry: Any) -> str:
    if not isinstance(entry, dict):
        return "not an object"
    if entry.get("kty") not in ("RSA", "EC", "OKP"):
        return f"kty {entry.get('kty')!r} is not an asymmetric key type"
    if entry.get("use", "sig") != "sig":
        return f"use is {entry.get('use')!r}, not 'sig'"
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops does not allow 'verify'"
    alg = entry.get("alg")
    if alg is not None and KEY_TYPE_FOR_ALG.get(alg) != entry["kty"]:
        return f"alg {alg!r} is not an asymmetric signature algorithm for kty {entry['kty']}"
    if "kid" in entry and not isinstance(entry["kid"], str):
        return "kid is not a string"
    return ""


# ---------------------------------------------------------------------------- tokens


class TokenValidator:
    """Checks ID tokens and JWT access tokens issued by one IdP."""

    def __init__(
        self,
        *,
        issuer: str,
        client_id: str,
        jwks: JwksCache,
        allowed_algorithms: Sequence[str],
        leeway: float = 60.0,
        clock: Clock = time.time,
    ) -> None:
        if not allowed_algorithms:
            raise ValueError("allowed_algorithms is empty")
        for alg in allowed_algorithms:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                raise ValueError(f"algorithm {alg!r} must not be allowed: tokens must be "
                                 "signed with the IdP's asymmetric key")
            if alg not in KEY_TYPE_FOR_ALG:
                raise ValueError(f"algorithm {alg!r} is not a supported asymmetric JWS "
                                 f"algorithm ({', '.join(KEY_TYPE_FOR_ALG)})")
        self.issuer = issuer
        self.client_id = client_id
        self.jwks = jwks
        self.allowed_algorithms = tuple(allowed_algorithms)
        self.leeway = leeway
        self.clock = clock
        self.rejected: collections.Counter[str] = collections.Counter()

    async def validate_id_token(self, token: str, *, nonce: str | None = None) -> dict[str, Any]:
        """Claims of a valid ID token (OIDC Core 3.1.3.7); raises :class:`TokenError`."""
        try:
            claims = await self._verify(token, "ID token")
            self._check_issuer(claims, "ID token")
            aud = _audiences(claims, "ID token")
            if self.client_id not in aud:
                raise TokenError("wrong_audience", f"ID token audience {aud} does not "
                                 f"include this client {self.client_id!r}")
            azp = claims.get("azp")
            if (len(aud) > 1 or azp is not None) and azp != self.client_id:
                raise TokenError("wrong_audience", f"ID token azp {azp!r} is not this "
                                 f"client {self.client_id!r}")
            self._check_times(claims, "ID token")
            _require_str(claims, "sub", "ID token")
            if nonce is not None:
                sent = claims.get("nonce")
                if not isinstance(sent, str) or not hmac.compare_digest(
                        sent.encode(), nonce.encode()):
                    raise TokenError("nonce_mismatch", "ID token has no nonce, but one was sent"
                                     if sent is None else
                                     "ID token nonce differs from the one sent in the request")
        except TokenError as exc:
            self.rejected[exc.reason] += 1
            raise
        return claims

    async def validate_access_token(
        self, token: str, *, audience: str, required_scopes: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Claims of a valid RFC 9068 JWT access token; raises :class:`TokenError`.

        A missing required scope is reported with reason ``missing_claim``.
        """
        what = "access token"
        try:
            claims = await self._verify(token, what, access_token=True)
            self._check_issuer(claims, what)
            aud = _audiences(claims, what)
            if audience not in aud:
                raise TokenError("wrong_audience",
                                 f"{what} audience {aud} does not include {audience!r}")
            self._check_times(claims, what)
            for name in ("sub", "client_id", "jti"):  # RFC 9068 2.2: required
                _require_str(claims, name, what)
            scope = claims.get("scope", "")
            if not isinstance(scope, str):
                raise TokenError("malformed", f"{what} scope claim is not a string")
            missing = [s for s in required_scopes if s not in scope.split()]
            if missing:
                raise TokenError("missing_claim", f"{what} lacks required scope(s) "
                                 f"{', '.join(missing)} (it has: {scope or 'none'})")
        except TokenError as exc:
            self.rejected[exc.reason] += 1
            raise
        return claims

    # ------------------------------------------------------------------ steps

    async def _verify(self, token: str, what: str, *, access_token: bool = False
                      ) -> dict[str, Any]:
        header, claims = _parse(token, what)
        alg = header.get("alg")
        if alg not in self.allowed_algorithms:
            raise TokenError("alg_not_allowed", f"{what} is signed with alg {alg!r}, allowed: "
                             f"{', '.join(self.allowed_algorithms)}")
        if access_token:
            typ = header.get("typ")
            if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
                raise TokenError("malformed", f"{what} has typ {typ!r}, not 'at+jwt' "
                                 "(RFC 9068); is it an access token?")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed", f"{what} header kid is not a string")
        key = await self.jwks.key_for(kid, alg)
        try:
            jws.deserialize_compact(token, key, algorithms=[alg])
        except BadSignatureError:
            raise TokenError("bad_signature", f"{what} signature does not verify with the "
                             f"IdP's key {key.kid!r}") from None
        except JoseError as exc:
            raise TokenError("malformed", f"{what} cannot be verified: "
                             f"{exc.__class__.__name__}: {exc}") from None
        return claims

    def _check_issuer(self, claims: dict[str, Any], what: str) -> None:
        iss = _require_str(claims, "iss", what)
        if iss != self.issuer:
            raise TokenError("wrong_issuer", f"{what} issuer {iss!r} is not the configured "
                             f"issuer {self.issuer!r}")

    def _check_times(self, claims: dict[str, Any], what: str) -> None:
        now = self.clock()
        exp = _require_time(claims, "exp", what)
        iat = _require_time(claims, "iat", what)
        if now >= exp + self.leeway:
            raise TokenError("expired", f"{what} expired {now - exp:.0f} s ago "
                             f"(leeway {self.leeway:g} s)")
        if iat > now + self.leeway:
            raise TokenError("not_yet_valid", f"{what} is issued {iat - now:.0f} s in the "
                             f"future (leeway {self.leeway:g} s)")
        if "nbf" in claims:
            nbf = _require_time(claims, "nbf", what)
            if nbf > now + self.leeway:
                raise TokenError("not_yet_valid", f"{what} is not valid for another "
                                 f"{nbf - now:.0f} s (leeway {self.leeway:g} s)")


def _b64decode(segment: str) -> bytes:
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member names")
    return result


def _parse(token: str, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload of a compact JWS, unverified; raises ``malformed``."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("malformed", f"{what} is not a string of at most "
                         f"{MAX_TOKEN_LENGTH} characters")
    segments = token.split(".")
    if len(segments) != 3:
        raise TokenError("malformed", f"{what} has {len(segments)} dot-separated segments, "
                         "a signed JWT has 3")
    parsed: list[dict[str, Any]] = []
    for name, segment in zip(("header", "payload"), segments, strict=False):
        try:
            value = json.loads(_b64decode(segment), object_pairs_hook=_no_duplicates)
        except (ValueError, binascii.Error) as exc:
            raise TokenError("malformed", f"{what} {name} is not base64url JSON "
                             f"({exc.__class__.__name__})") from None
        if not isinstance(value, dict):
            raise TokenError("malformed", f"{what} {name} is not a JSON object")
        parsed.append(value)
    try:
        _b64decode(segments[2])
    except (ValueError, binascii.Error):
        raise TokenError("malformed", f"{what} signature is not base64url") from None
    return parsed[0], parsed[1]


def _require_str(claims: dict[str, Any], name: str, what: str) -> str:
    value = claims.get(name)
    if value is None:
        raise TokenError("missing_claim", f"{what} has no {name!r} claim")
    if not isinstance(value, str) or not value:
        raise TokenError("malformed", f"{what} claim {name!r} is not a non-empty string")
    return value


def _require_time(claims: dict[str, Any], name: str, what: str) -> float:
    value = claims.get(name)
    if value is None:
        raise TokenError("missing_claim", f"{what} has no {name!r} claim")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError("malformed", f"{what} claim {name!r} is not a number")
    return float(value)


def _audiences(claims: dict[str, Any], what: str) -> list[str]:
    aud = claims.get("aud")
    if aud is None:
        raise TokenError("missing_claim", f"{what} has no 'aud' claim")
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not values or not all(
            isinstance(v, str) for v in values):
        raise TokenError("malformed", f"{what} claim 'aud' is not a string or list of strings")
    return values


__all__ = ["REASONS", "JwksCache", "TokenError", "TokenValidator", "parse_jwks"]
