"""Noise XX handshake (noiseprotocol) and the keypair it yields.

Noise runs only the three handshake messages. Its split gives two 32-byte keys; data
messages then use ChaCha20-Poly1305 from ``cryptography`` with an explicit 64-bit counter
as nonce, never noiseprotocol's CipherState, whose implicit nonce counts messages and
breaks on a lossy, reordering transport (STYLE.md "What to avoid").

XX reveals the peer's static key to the initiator in message 2 and to the responder in
message 3; that is where ``is_known`` is asked and unknown or revoked keys are refused.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from noise.connection import Keypair as NoiseKeypair
from noise.connection import NoiseConnection
from noise.exceptions import NoiseHandshakeError, NoiseInvalidMessage, NoiseValueError

from vpnr.tunneld import errors
from vpnr.tunneld.constants import KEY_SIZE, PROLOGUE, PROTOCOL_NAME, REJECT_AFTER_MESSAGES
from vpnr.tunneld.errors import LocalProtocolError, RemoteProtocolError
from vpnr.tunneld.messages import Finish, Initiation, Response
from vpnr.tunneld.replay import ReplayWindow

KeyStatus = Literal["ok", "unknown", "revoked"]
IsKnown = Callable[[bytes], KeyStatus]
"""Callback: the status of a peer's static public key (32 raw bytes)."""

_NONCE_PREFIX = b"\0\0\0\0"  # nonce = 4 zero bytes + counter u64 LE (RFC 8439 section 2.8)
_COUNTER = struct.Struct("<Q")
# What noiseprotocol raises on a forged or corrupted handshake message.
_NOISE_ERRORS = (NoiseHandshakeError, NoiseInvalidMessage, NoiseValueError, InvalidTag,
                 ValueError)


def nonce(counter: int) -> bytes:
    """The 12-byte ChaCha20-Poly1305 nonce of data message ``counter``."""
    return _NONCE_PREFIX + _COUNTER.pack(counter)


@dataclass(eq=False)
class Keypair:
    """Send and receive keys of one completed handshake, with their counters and window."""

    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    local_index: int
    remote_index: int
    created_at: float
    initiator: bool
    remote_static: bytes
    send_counter: int = 0  # next counter to send
    received_messages: int = 0
    replay: ReplayWindow = field(default_factory=ReplayWindow, repr=False)

    def __post_init__(self) -> None:
        self._send_aead = ChaCha20Poly1305(self.send_key)
        self._receive_aead = ChaCha20Poly1305(self.receive_key)

    def encrypt(self, plaintext: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """Encrypt with the next counter; returns (counter, ciphertext with tag)."""
        counter = self.send_counter
        if counter >= REJECT_AFTER_MESSAGES:
            raise LocalProtocolError("keypair exhausted: rekey before REJECT_AFTER_MESSAGES")
        self.send_counter = counter + 1
        return counter, self._send_aead.encrypt(nonce(counter), plaintext, None)

    def decrypt(self, counter: int, ciphertext: bytes | memoryview) -> bytes:
        """Check the window, decrypt, then mark the counter (only once authenticated)."""
        self.replay.check(counter)
        try:
            plaintext = self._receive_aead.decrypt(nonce(counter), ciphertext, None)
        except InvalidTag as exc:
            raise RemoteProtocolError(errors.DECRYPT_FAILED, f"counter {counter}") from exc
        self.replay.accept(counter)
        self.received_messages += 1
        return plaintext


def _connection(static_private: bytes, initiator: bool) -> Any:
    """A NoiseConnection set up with our static key and the prologue."""
    connection = NoiseConnection.from_name(PROTOCOL_NAME)
    connection.set_prologue(PROLOGUE)
    connection.set_keypair_from_private_bytes(NoiseKeypair.STATIC, static_private)
    if initiator:
        connection.set_as_initiator()
    else:
        connection.set_as_responder()
    connection.start_handshake()
    return connection


def _check_static(is_known: IsKnown, remote_static: bytes) -> None:
    """Refuse a peer whose static key is not configured or was revoked."""
    status = is_known(remote_static)
    if status == "revoked":
        raise RemoteProtocolError(errors.REVOKED_STATIC_KEY, remote_static.hex())
    if status != "ok":
        raise RemoteProtocolError(errors.UNKNOWN_STATIC_KEY, remote_static.hex())


def _split(connection: Any, local_index: int, remote_index: int, now: float, initiator: bool,
           remote_static: bytes) -> Keypair:
    """The keypair from Noise's split (Noise spec section 5.2), keys taken out as bytes."""
    protocol = connection.noise_protocol
    send_key = bytes(protocol.cipher_state_encrypt.k)
    receive_key = bytes(protocol.cipher_state_decrypt.k)
    if len(send_key) != KEY_SIZE or len(receive_key) != KEY_SIZE:
        raise LocalProtocolError("Noise split did not give 32-byte keys")
    return Keypair(send_key=send_key, receive_key=receive_key, local_index=local_index,
                   remote_index=remote_index, created_at=now, initiator=initiator,
                   remote_static=remote_static)


class InitiatorHandshake:
    """Our side of a handshake we started: writes message 1, reads 2, writes 3."""

    def __init__(self, static_private: bytes, local_index: int, is_known: IsKnown,
                 now: float) -> None:
        self.local_index = local_index
        self.started_at = now
        self._is_known = is_known
        self._connection = _connection(static_private, initiator=True)
        self._initiation: Initiation | None = None

    def initiation(self) -> Initiation:
        """Message 1 (``-> e``); the same bytes on every call, so resends cost nothing."""
        if self._initiation is None:
            noise_bytes = bytes(self._connection.write_message(b""))
            self._initiation = Initiation(self.local_index, noise_bytes)
        return self._initiation

    def read_response(self, response: Response, now: float) -> tuple[Finish, Keypair]:
        """Read message 2, check the responder's static key, write message 3."""
        if self._initiation is None or self._connection.handshake_finished:
            raise LocalProtocolError("read_response before initiation() or after finish")
        if response.receiver_index != self.local_index:
            raise LocalProtocolError("response for another handshake")
        remote_static = _read_static(self._connection, response.noise, "message 2",
                                     self._is_known)
        finish_noise = bytes(self._connection.write_message(b""))
        keypair = _split(self._connection, self.local_index, response.sender_index, now,
                         initiator=True, remote_static=remote_static)
        return Finish(self.local_index, response.sender_index, finish_noise), keypair


def _read_static(connection: NoiseConnection, noise: bytes, what: str,
                 is_known: IsKnown) -> bytes:
    """Read the handshake message that carries the peer's static key; return the key once
    ``is_known`` accepts it."""
    # noiseprotocol drops its handshake state when the handshake ends: keep a reference.
    state = connection.noise_protocol.handshake_state
    try:
        connection.read_message(noise)
    except _NOISE_ERRORS as exc:
        raise RemoteProtocolError(errors.HANDSHAKE_FAILED, what) from exc
    remote_static = bytes(state.rs.public_bytes)
    _check_static(is_known, remote_static)
    return remote_static


class ResponderHandshake:
    """Our side of a handshake the peer started: reads message 1, writes 2, reads 3."""

    def __init__(self, static_private: bytes, local_index: int, is_known: IsKnown,
                 initiation: Initiation, now: float) -> None:
        self.local_index = local_index
        self.remote_index = initiation.sender_index
        self.started_at = now
        self._is_known = is_known
        self._connection = _connection(static_private, initiator=False)
        try:
            self._connection.read_message(initiation.noise)
            response_noise = bytes(self._connection.write_message(b""))
        except _NOISE_ERRORS as exc:
            raise RemoteProtocolError(errors.HANDSHAKE_FAILED, "message 1") from exc
        self.response = Response(local_index, initiation.sender_index, response_noise)

    def read_finish(self, finish: Finish, now: float) -> Keypair:
        """Read message 3 and check the initiator's static key."""
        if self._connection.handshake_finished:
            raise LocalProtocolError("read_finish called twice")
        if finish.sender_index != self.remote_index:
            raise RemoteProtocolError(errors.UNKNOWN_INDEX, "finish from another initiator")
        remote_static = _read_static(self._connection, finish.noise, "message 3",
                                     self._is_known)
        return _split(self._connection, self.local_index, self.remote_index, now,
                      initiator=False, remote_static=remote_static)
