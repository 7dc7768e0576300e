"""Constants of the vpnr tunnel protocol (after wireguard-go ``device/constants.go``).

Two groups: values the protocol defines (changing them breaks the wire format) and values
this implementation chose (WireGuard's values, with WireGuard's meanings). The chosen timer
values travel in :class:`Timers` so tests can shrink them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# --- Defined by the protocol (docs/protocol.md) -------------------------------------------

PROTOCOL_NAME: Final = b"Noise_XX_25519_ChaChaPoly_BLAKE2s"  # Noise spec section 8 naming
PROLOGUE: Final = b"vpnr tunnel v1"  # mixed into the handshake hash: a version mismatch fails

MESSAGE_INITIATION: Final = 1  # Noise XX message 1 (-> e)
MESSAGE_RESPONSE: Final = 2  # Noise XX message 2 (<- e, ee, s, es)
MESSAGE_FINISH: Final = 3  # Noise XX message 3 (-> s, se)
MESSAGE_COOKIE_REPLY: Final = 4  # stateless cookie for a responder under load
MESSAGE_DATA: Final = 5  # transport data (keepalive = empty plaintext)

TYPE_HEADER_SIZE: Final = 4  # type (1 byte) + 3 reserved zero bytes
INDEX_SIZE: Final = 4  # session index, u32 little-endian
COUNTER_SIZE: Final = 8  # data counter, u64 little-endian, the AEAD nonce
KEY_SIZE: Final = 32  # X25519 public keys and ChaCha20-Poly1305 keys
AEAD_TAG_SIZE: Final = 16  # Poly1305 tag
COOKIE_SIZE: Final = 16  # cookie and the MAC keyed with it (BLAKE2s, 16-byte digest)

NOISE_MESSAGE1_SIZE: Final = KEY_SIZE  # e
NOISE_MESSAGE2_SIZE: Final = KEY_SIZE + KEY_SIZE + AEAD_TAG_SIZE + AEAD_TAG_SIZE  # e, s+tag, tag
NOISE_MESSAGE3_SIZE: Final = KEY_SIZE + AEAD_TAG_SIZE + AEAD_TAG_SIZE  # enc s, enc empty payload

INITIATION_SIZE: Final = TYPE_HEADER_SIZE + INDEX_SIZE + NOISE_MESSAGE1_SIZE + COOKIE_SIZE  # 56
RESPONSE_SIZE: Final = TYPE_HEADER_SIZE + 2 * INDEX_SIZE + NOISE_MESSAGE2_SIZE  # 108
FINISH_SIZE: Final = TYPE_HEADER_SIZE + 2 * INDEX_SIZE + NOISE_MESSAGE3_SIZE  # 76
COOKIE_REPLY_SIZE: Final = TYPE_HEADER_SIZE + INDEX_SIZE + COOKIE_SIZE  # 24
DATA_HEADER_SIZE: Final = TYPE_HEADER_SIZE + INDEX_SIZE + COUNTER_SIZE  # 16
DATA_MIN_SIZE: Final = DATA_HEADER_SIZE + AEAD_TAG_SIZE  # 32: a keepalive
MAX_DATAGRAM_SIZE: Final = 65535  # UDP payload limit; anything longer cannot have been sent

# --- Chosen by this implementation (wireguard-go device/constants.go values) --------------

REKEY_AFTER_MESSAGES: Final = 2**60  # rekey long before the nonce space runs out
REJECT_AFTER_MESSAGES: Final = 2**64 - 2**13 - 1  # never reuse a nonce; leaves room for the window
REKEY_AFTER_TIME: Final = 120.0  # seconds; bounds how much traffic one key protects
REJECT_AFTER_TIME: Final = 180.0  # seconds; a key older than this is never used
REKEY_ATTEMPT_TIME: Final = 90.0  # seconds of handshake retries before giving up
REKEY_TIMEOUT: Final = 5.0  # seconds between handshake retries
REKEY_TIMEOUT_JITTER_MAX: Final = 0.333  # seconds; spreads retries of many peers apart
KEEPALIVE_TIMEOUT: Final = 10.0  # seconds; answer received data with a keepalive if idle

REPLAY_BLOCK_BITS: Final = 64  # RFC 6479: the bitmap is a ring of u64 blocks
REPLAY_RING_BLOCKS: Final = 128  # wireguard-go replay.go: 128 blocks
REPLAY_WINDOW_SIZE: Final = (REPLAY_RING_BLOCKS - 1) * REPLAY_BLOCK_BITS  # 8128 >= 2048

MAX_QUEUED_PACKETS: Final = 128  # packets held while no session exists (wireguard-go staged)
COOKIE_SECRET_LIFETIME: Final = 120.0  # seconds; the responder rotates its cookie secret


@dataclass(frozen=True, kw_only=True)
class Timers:
    """The implementation-chosen limits one :class:`~vpnr.tunneld.session.PeerSession` uses.

    Defaults are WireGuard's; tests pass smaller values to run rekeys in milliseconds.
    """

    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES
    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_attempt_time: float = REKEY_ATTEMPT_TIME
    rekey_timeout: float = REKEY_TIMEOUT
    rekey_timeout_jitter_max: float = REKEY_TIMEOUT_JITTER_MAX
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    max_queued_packets: int = MAX_QUEUED_PACKETS
