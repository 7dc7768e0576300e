"""This router's static key: generated on first start, stored 0600, never logged.

Rotation keeps the previous key for an overlap period, so peers that still know only the
old public key keep completing handshakes until they are updated (docs/protocol.md,
"Static key rotation").
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


class KeyFileError(Exception):
    """The key file is unreadable, malformed or not private; says which."""


def public_of(private: bytes) -> bytes:
    """The X25519 public key of ``private``."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def b64(raw: bytes) -> str:
    """Base64 text of a public key."""
    return base64.b64encode(raw).decode()


@dataclass
class StaticKeys:
    """The current static key and, during a rotation's overlap, the previous one."""

    path: Path
    private: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)
    previous_valid_until: float = 0.0  # wall-clock seconds

    @property
    def public(self) -> bytes:
        """Current public key."""
        return public_of(self.private)

    def previous_active(self, now: float | None = None) -> bytes | None:
        """The previous private key while its overlap lasts."""
        if self.previous is None:
            return None
        if (time.time() if now is None else now) >= self.previous_valid_until:
            return None
        return self.previous

    @classmethod
    def load_or_create(cls, path: Path) -> StaticKeys:
        """Read the key file, creating it (0600, in a 0700 directory) on first start."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            keys = cls(path, X25519PrivateKey.generate().private_bytes_raw())
            keys.save()
            return keys
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyFileError(f"{path}: mode {mode:o} lets others read the static key; "
                               "chmod 600 it")
        try:
            doc = json.loads(path.read_text())
            keys = cls(path, base64.b64decode(doc["private_key"], validate=True))
            if doc.get("previous_private_key"):
                keys.previous = base64.b64decode(doc["previous_private_key"], validate=True)
                keys.previous_valid_until = float(doc["previous_valid_until"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never echo the content: it is a private key.
            raise KeyFileError(f"{path}: not a vpnr static key file "
                               f"({type(exc).__name__})") from None
        for raw in (keys.private, keys.previous):
            if raw is not None and len(raw) != 32:
                raise KeyFileError(f"{path}: a private key must be 32 bytes")
        return keys

    def save(self) -> None:
        """Write atomically with mode 0600."""
        doc: dict[str, object] = {"private_key": base64.b64encode(self.private).decode()}
        if self.previous is not None:
            doc["previous_private_key"] = base64.b64encode(self.previous).decode()
            doc["previous_valid_until"] = self.previous_valid_until
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(doc))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def rotate(self, overlap_seconds: float) -> None:
        """New current key; the old one stays usable for ``overlap_seconds``."""
        self.previous = self.private
        self.previous_valid_until = time.time() + overlap_seconds
        self.private = X25519PrivateKey.generate().private_bytes_raw()
        self.save()
