"""Craft JWTs for tests, good and bad, with the ``cryptography`` package only.

No JOSE library is used here on purpose: the code under test (vpnr.idpd.tokens) uses
joserfc, and tests should not check it against the same library.

Typical use::

    jwk = load_private_jwk(keys_file)                  # the lab IdP's private key
    good = sign_rs256({"iss": issuer, ...}, None, jwk)  # signed like the IdP signs
    forged = sign_rs256(claims, None, other_key_same_kid(jwk["kid"]))
    none = unsigned_token(claims)                      # alg "none", empty signature
    confused = hs256_with_public_key(claims, jwk)      # HMAC keyed with the public PEM

All functions return compact JWS strings (``header.payload.signature``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def _b64d_int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def _int_b64(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _header(alg: str, header_extra: dict[str, Any] | None, kid: str | None) -> dict[str, Any]:
    """``{"alg", "typ": "JWT", "kid"}`` updated by header_extra; a None value removes a key."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    header.update(header_extra or {})
    return {k: v for k, v in header.items() if v is not None}


def private_key_of(jwk: dict[str, Any]) -> rsa.RSAPrivateKey:
    """The ``cryptography`` RSA private key of a private RSA JWK."""
    public = rsa.RSAPublicNumbers(_b64d_int(jwk["e"]), _b64d_int(jwk["n"]))
    numbers = rsa.RSAPrivateNumbers(
        p=_b64d_int(jwk["p"]), q=_b64d_int(jwk["q"]), d=_b64d_int(jwk["d"]),
        dmp1=_b64d_int(jwk["dp"]), dmq1=_b64d_int(jwk["dq"]), iqmp=_b64d_int(jwk["qi"]),
        public_numbers=public,
    )
    return numbers.private_key()


def public_jwk(jwk: dict[str, Any]) -> dict[str, Any]:
    """The public part of an RSA JWK (kty, n, e and kid/alg/use when present)."""
    return {k: v for k, v in jwk.items() if k in ("kty", "n", "e", "kid", "alg", "use")}


def sign_rs256(
    payload: dict[str, Any], header_extra: dict[str, Any] | None, private_jwk: dict[str, Any]
) -> str:
    """An RS256 JWS over ``payload`` with ``private_jwk``.

    The header is ``{"alg": "RS256", "typ": "JWT", "kid": private_jwk["kid"]}`` updated
    with ``header_extra`` (e.g. ``{"typ": "at+jwt"}``, or ``{"kid": None}`` to drop kid).
    """
    header = _header("RS256", header_extra, private_jwk.get("kid"))
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    signature = private_key_of(private_jwk).sign(
        signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    return f"{signing_input}.{b64url(signature)}"


def unsigned_token(payload: dict[str, Any], header_extra: dict[str, Any] | None = None) -> str:
    """An ``alg: none`` token (RFC 7519 section 6): empty signature segment."""
    header = _header("none", header_extra, None)
    return f"{b64url_json(header)}.{b64url_json(payload)}."


def hs256_with_public_key(
    payload: dict[str, Any], public_jwk_: dict[str, Any],
    header_extra: dict[str, Any] | None = None,
) -> str:
    """The classic algorithm-confusion forgery: HS256 keyed with the RSA public key.

    The HMAC key is the public key's PEM (SubjectPublicKeyInfo) bytes, which is what a
    verifier that feeds "the key" to whatever ``alg`` the header names would use.
    Private members of the JWK, if any, are ignored.
    """
    pem = (
        rsa.RSAPublicNumbers(_b64d_int(public_jwk_["e"]), _b64d_int(public_jwk_["n"]))
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = _header("HS256", header_extra, public_jwk_.get("kid"))
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def load_private_jwk(keys_file: Path) -> dict[str, Any]:
    """The first key of a private JWKS file (as written by ``idp_server.generate_keys``)."""
    keys: list[dict[str, Any]] = json.loads(keys_file.read_text())["keys"]
    return keys[0]


def other_key_same_kid(kid: str) -> dict[str, Any]:
    """A fresh private RSA-2048 JWK that claims ``kid``: an attacker's key posing as the IdP's."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_numbers()
    pub = priv.public_numbers
    return {
        "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
        "n": _int_b64(pub.n), "e": _int_b64(pub.e), "d": _int_b64(priv.d),
        "p": _int_b64(priv.p), "q": _int_b64(priv.q), "dp": _int_b64(priv.dmp1),
        "dq": _int_b64(priv.dmq1), "qi": _int_b64(priv.iqmp),
    }


def claims(issuer: str, audience: str | list[str], sub: str = "u-test", *,
           lifetime: int = 300, now: float | None = None, **extra: Any) -> dict[str, Any]:
    """A plain claim set: iss, sub, aud, iat=now, exp=now+lifetime, plus ``extra``."""
    t = int(time.time() if now is None else now)
    return {"iss": issuer, "sub": sub, "aud": audience, "iat": t, "exp": t + lifetime, **extra}
