"""Refresh and access tokens at rest: AES-256-GCM under a key file only root can read.

The key file (32 random bytes, base64) is created 0600 on first start; a key file others
can read is refused, as is a wrong-sized one. Each sealed value is bound to its login id
(the GCM associated data), so a ciphertext copied to another row does not open. Neither the
key nor any plaintext ever reaches a log or an error message.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = b"\x01"


class VaultError(Exception):
    """The key file is missing, unreadable or not private, or a value does not open."""


class TokenVault:
    """Seals and opens secrets with the router's token key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise VaultError(f"token key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, path: Path) -> TokenVault:
        """Read the key file, creating it (0600 in a 0700 directory) when absent."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(base64.b64encode(key).decode() + "\n")
            return cls(key)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise VaultError(f"{path}: mode {mode:o} lets others read the token key; "
                             "chmod 600 it")
        try:
            key = base64.b64decode(path.read_text().strip(), validate=True)
        except (OSError, ValueError, binascii.Error) as exc:
            raise VaultError(f"{path}: not a token key file ({type(exc).__name__})") from None
        if len(key) != KEY_BYTES:
            raise VaultError(f"{path}: the token key must be {KEY_BYTES} bytes of base64, "
                             f"found {len(key)} bytes")
        return cls(key)

    def seal(self, plaintext: str, context: str) -> bytes:
        """Encrypt ``plaintext`` bound to ``context`` (the login id)."""
        nonce = os.urandom(NONCE_BYTES)
        return VERSION + nonce + self._aead.encrypt(nonce, plaintext.encode(), context.encode())

    def open(self, sealed: bytes, context: str) -> str:
        """Decrypt what :meth:`seal` made for the same ``context``."""
        if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[:1] != VERSION:
            raise VaultError("sealed token has an unknown format")
        nonce = sealed[1:1 + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[1 + NONCE_BYTES:], context.encode()).decode()
        except InvalidTag:
            raise VaultError("sealed token does not open with this key (key file replaced?)"
                             ) from None
