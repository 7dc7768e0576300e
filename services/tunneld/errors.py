"""Errors of the tunnel protocol core (after h11 ``_util.py``).

:class:`LocalProtocolError` means this process called the core wrongly (a bug here);
:class:`RemoteProtocolError` means a datagram from the network was refused. The latter
carries a short ``reason`` code used as the key of the drop counters
(``TunnelStatus.drops_by_reason``).
"""

from __future__ import annotations

from typing import Final

# Drop reasons, one per way a datagram can be refused.
SHORT: Final = "short"  # shorter than its type's size
BAD_TYPE: Final = "bad_type"  # unknown message type
BAD_LENGTH: Final = "bad_length"  # fixed-size message of the wrong size, or too long
BAD_RESERVED: Final = "bad_reserved"  # reserved bytes not zero
UNKNOWN_INDEX: Final = "unknown_index"  # receiver index names no live handshake or keypair
REPLAYED: Final = "replayed"  # counter already seen in the window
TOO_OLD: Final = "too_old"  # counter behind the window
COUNTER_LIMIT: Final = "counter_limit"  # counter at or beyond REJECT_AFTER_MESSAGES
KEY_EXPIRED: Final = "key_expired"  # keypair older than REJECT_AFTER_TIME
DECRYPT_FAILED: Final = "decrypt_failed"  # AEAD authentication failed
UNKNOWN_STATIC_KEY: Final = "unknown_static_key"  # peer's static key not configured
REVOKED_STATIC_KEY: Final = "revoked_static_key"  # peer's static key revoked
HANDSHAKE_FAILED: Final = "handshake_failed"  # Noise refused a handshake message
BAD_COOKIE: Final = "bad_cookie"  # cookie reply for no pending initiation
REVOKED: Final = "revoked"  # the session was revoked; everything is dropped
QUEUE_FULL: Final = "queue_full"  # local: too many packets waiting for a handshake

REASONS: Final = (SHORT, BAD_TYPE, BAD_LENGTH, BAD_RESERVED, UNKNOWN_INDEX, REPLAYED, TOO_OLD,
                  COUNTER_LIMIT, KEY_EXPIRED, DECRYPT_FAILED, UNKNOWN_STATIC_KEY,
                  REVOKED_STATIC_KEY, HANDSHAKE_FAILED, BAD_COOKIE, REVOKED, QUEUE_FULL)


class TunnelError(Exception):
    """Base of every error the tunnel protocol core raises."""


class LocalProtocolError(TunnelError):
    """The caller used the core wrongly (wrong state, wrong argument)."""


class RemoteProtocolError(TunnelError):
    """A datagram from the network was refused; ``reason`` is its drop-counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
