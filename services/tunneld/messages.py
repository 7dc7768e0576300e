"""Wire formats of the tunnel messages, parsed with exact-length checks.

Every message starts with a type byte and three reserved zero bytes; integers are little
endian. Sizes and layouts are in docs/protocol.md. Each ``parse_*`` raises
:class:`~vpnr.tunneld.errors.RemoteProtocolError` with the drop reason.

The cookie scheme is a simple stateless cookie, like the DTLS 1.2 HelloVerifyRequest
(RFC 6347 section 4.2.1), not WireGuard's mac1/mac2: a responder under load answers an
initiation whose ``cookie_mac`` does not verify with a cookie reply carrying
``cookie = BLAKE2s-128(key=secret, source address)``; the initiator proves it receives at
that address by sending its next initiation with ``cookie_mac = BLAKE2s-128(key=cookie,
initiation bytes before the mac)``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from vpnr.tunneld import errors
from vpnr.tunneld.constants import (
    COOKIE_REPLY_SIZE,
    COOKIE_SIZE,
    DATA_HEADER_SIZE,
    DATA_MIN_SIZE,
    FINISH_SIZE,
    INITIATION_SIZE,
    MAX_DATAGRAM_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_DATA,
    MESSAGE_FINISH,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    RESPONSE_SIZE,
    TYPE_HEADER_SIZE,
)
from vpnr.tunneld.errors import RemoteProtocolError

_TYPE = struct.Struct("<B3x")  # type, 3 reserved
_ONE_INDEX = struct.Struct("<B3xI")  # type, reserved, index
_TWO_INDEXES = struct.Struct("<B3xII")  # type, reserved, sender, receiver
_DATA_HEADER = struct.Struct("<B3xIQ")  # type, reserved, receiver, counter
_NO_COOKIE = bytes(COOKIE_SIZE)

FIXED_SIZES = {
    MESSAGE_INITIATION: INITIATION_SIZE,
    MESSAGE_RESPONSE: RESPONSE_SIZE,
    MESSAGE_FINISH: FINISH_SIZE,
    MESSAGE_COOKIE_REPLY: COOKIE_REPLY_SIZE,
}


@dataclass(frozen=True)
class Initiation:
    """Handshake message 1: the initiator's index and Noise ``-> e``."""

    sender_index: int
    noise: bytes
    cookie_mac: bytes = _NO_COOKIE


@dataclass(frozen=True)
class Response:
    """Handshake message 2: the responder's index, the initiator's, and ``<- e, ee, s, es``."""

    sender_index: int
    receiver_index: int
    noise: bytes


@dataclass(frozen=True)
class Finish:
    """Handshake message 3: the initiator's index, the responder's, and ``-> s, se``."""

    sender_index: int
    receiver_index: int
    noise: bytes


@dataclass(frozen=True)
class CookieReply:
    """Sent by a responder under load instead of message 2: retry with this cookie."""

    receiver_index: int
    cookie: bytes


@dataclass(frozen=True)
class Data:
    """Transport data: the receiver's index, the counter (nonce) and the AEAD ciphertext."""

    receiver_index: int
    counter: int
    ciphertext: bytes


Message = Initiation | Response | Finish | CookieReply | Data


def message_type(datagram: bytes) -> int:
    """The type of ``datagram`` after the checks every message shares."""
    if len(datagram) < TYPE_HEADER_SIZE:
        raise RemoteProtocolError(errors.SHORT, f"{len(datagram)} bytes")
    if len(datagram) > MAX_DATAGRAM_SIZE:
        raise RemoteProtocolError(errors.BAD_LENGTH, f"{len(datagram)} bytes")
    kind = datagram[0]
    if kind != MESSAGE_DATA and kind not in FIXED_SIZES:
        raise RemoteProtocolError(errors.BAD_TYPE, str(kind))
    if datagram[1:TYPE_HEADER_SIZE] != b"\0\0\0":
        raise RemoteProtocolError(errors.BAD_RESERVED, datagram[1:TYPE_HEADER_SIZE].hex())
    return kind


def _check_fixed(datagram: bytes, kind: int) -> None:
    """Exact-length check of a fixed-size message of type ``kind``."""
    if message_type(datagram) != kind:
        raise RemoteProtocolError(errors.BAD_TYPE, f"{datagram[0]} where {kind} expected")
    size = FIXED_SIZES[kind]
    if len(datagram) < size:
        raise RemoteProtocolError(errors.SHORT, f"type {kind}: {len(datagram)} < {size}")
    if len(datagram) != size:
        raise RemoteProtocolError(errors.BAD_LENGTH, f"type {kind}: {len(datagram)} != {size}")


def parse_initiation(datagram: bytes) -> Initiation:
    """Parse handshake message 1 (exactly :data:`INITIATION_SIZE` bytes)."""
    _check_fixed(datagram, MESSAGE_INITIATION)
    _, sender = _ONE_INDEX.unpack_from(datagram)
    mac_at = INITIATION_SIZE - COOKIE_SIZE
    return Initiation(sender, bytes(datagram[_ONE_INDEX.size:mac_at]), bytes(datagram[mac_at:]))


def parse_response(datagram: bytes) -> Response:
    """Parse handshake message 2 (exactly :data:`RESPONSE_SIZE` bytes)."""
    _check_fixed(datagram, MESSAGE_RESPONSE)
    _, sender, receiver = _TWO_INDEXES.unpack_from(datagram)
    return Response(sender, receiver, bytes(datagram[_TWO_INDEXES.size:]))


def parse_finish(datagram: bytes) -> Finish:
    """Parse handshake message 3 (exactly :data:`FINISH_SIZE` bytes)."""
    _check_fixed(datagram, MESSAGE_FINISH)
    _, sender, receiver = _TWO_INDEXES.unpack_from(datagram)
    return Finish(sender, receiver, bytes(datagram[_TWO_INDEXES.size:]))


def parse_cookie_reply(datagram: bytes) -> CookieReply:
    """Parse a cookie reply (exactly :data:`COOKIE_REPLY_SIZE` bytes)."""
    _check_fixed(datagram, MESSAGE_COOKIE_REPLY)
    _, receiver = _ONE_INDEX.unpack_from(datagram)
    return CookieReply(receiver, bytes(datagram[_ONE_INDEX.size:]))


def parse_data(datagram: bytes) -> Data:
    """Parse a data message (at least :data:`DATA_MIN_SIZE` bytes: header and AEAD tag)."""
    if message_type(datagram) != MESSAGE_DATA:
        raise RemoteProtocolError(errors.BAD_TYPE, f"{datagram[0]} where data expected")
    if len(datagram) < DATA_MIN_SIZE:
        raise RemoteProtocolError(errors.SHORT, f"data: {len(datagram)} < {DATA_MIN_SIZE}")
    _, receiver, counter = _DATA_HEADER.unpack_from(datagram)
    return Data(receiver, counter, bytes(datagram[DATA_HEADER_SIZE:]))


def parse(datagram: bytes) -> Message:
    """Parse any tunnel message, dispatching on its type."""
    kind = message_type(datagram)
    if kind == MESSAGE_INITIATION:
        return parse_initiation(datagram)
    if kind == MESSAGE_RESPONSE:
        return parse_response(datagram)
    if kind == MESSAGE_FINISH:
        return parse_finish(datagram)
    if kind == MESSAGE_COOKIE_REPLY:
        return parse_cookie_reply(datagram)
    return parse_data(datagram)


def encode_initiation(message: Initiation) -> bytes:
    """Bytes of handshake message 1."""
    return _ONE_INDEX.pack(MESSAGE_INITIATION, message.sender_index) + message.noise + \
        message.cookie_mac


def encode_response(message: Response) -> bytes:
    """Bytes of handshake message 2."""
    return _TWO_INDEXES.pack(MESSAGE_RESPONSE, message.sender_index,
                             message.receiver_index) + message.noise


def encode_finish(message: Finish) -> bytes:
    """Bytes of handshake message 3."""
    return _TWO_INDEXES.pack(MESSAGE_FINISH, message.sender_index,
                             message.receiver_index) + message.noise


def encode_cookie_reply(message: CookieReply) -> bytes:
    """Bytes of a cookie reply."""
    return _ONE_INDEX.pack(MESSAGE_COOKIE_REPLY, message.receiver_index) + message.cookie


def encode_data(message: Data) -> bytes:
    """Bytes of a data message."""
    return _DATA_HEADER.pack(MESSAGE_DATA, message.receiver_index, message.counter) + \
        message.ciphertext


def data_header(receiver_index: int, counter: int) -> bytes:
    """The 16-byte header of a data message (for building datagrams without copies)."""
    return _DATA_HEADER.pack(MESSAGE_DATA, receiver_index, counter)


# --- Stateless cookie (see the module docstring) ------------------------------------------

def make_cookie(secret: bytes, source: bytes) -> bytes:
    """The cookie a responder hands to ``source`` (an encoded address and port)."""
    return hashlib.blake2s(source, key=secret, digest_size=COOKIE_SIZE).digest()


def cookie_mac(cookie: bytes, initiation_without_mac: bytes) -> bytes:
    """The ``cookie_mac`` of an initiation; all zero when there is no cookie."""
    if not cookie:
        return _NO_COOKIE
    return hashlib.blake2s(initiation_without_mac, key=cookie, digest_size=COOKIE_SIZE).digest()


def initiation_has_cookie(datagram: bytes, secret: bytes, source: bytes) -> bool:
    """Whether an initiation from ``source`` carries a valid mac for ``secret``'s cookie."""
    mac_at = INITIATION_SIZE - COOKIE_SIZE
    expected = cookie_mac(make_cookie(secret, source), datagram[:mac_at])
    return hmac.compare_digest(expected, datagram[mac_at:INITIATION_SIZE])
