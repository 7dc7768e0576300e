"""Interop: our PeerSession against an independent Noise implementation (dissononce).

The far end here is written only from docs/protocol.md: protocol name, prologue, message
types, layouts, sizes and the data-message nonce are spelled out below from the spec's text
and tables, and the datagrams are built and parsed with ``struct``, never with
``vpnr.tunneld.messages`` or ``vpnr.tunneld.constants``. The Noise side is dissononce
(handshake and split), which shares no code with noiseprotocol, the library tunneld uses. If
the spec and the code disagree, or our Noise use is not standard Noise, these tests fail.

Transport: dissononce's split CipherStates encrypt and decrypt the data messages, with
``set_nonce(counter)`` before each message because the counter travels explicitly in the
header (the spec's nonce, 4 zero bytes then the counter as u64 LE, is Noise's ChaChaPoly
nonce, which is what dissononce forms from ``n``).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from dissononce.cipher.chachapoly import ChaChaPolyCipher
from dissononce.dh.x25519.x25519 import X25519DH
from dissononce.exceptions.decrypt import DecryptFailedException
from dissononce.hash.blake2s import Blake2sHash
from dissononce.processing.handshakepatterns.interactive.XX import XXHandshakePattern
from dissononce.processing.impl.cipherstate import CipherState
from dissononce.processing.impl.handshakestate import HandshakeState
from dissononce.processing.impl.symmetricstate import SymmetricState

from vpnr.tunneld.handshake import KeyStatus
from vpnr.tunneld.session import DataReceived, Event, HandshakeCompleted, PeerSession

# --- docs/protocol.md, transcribed ------------------------------------------------------

PROTOCOL_NAME = "Noise_XX_25519_ChaChaPoly_BLAKE2s"  # "## Noise"
PROLOGUE = b"vpnr tunnel v1"  # "the 14 ASCII bytes `vpnr tunnel v1`"
OTHER_PROLOGUE = b"vpnr tunnel v2"  # a peer speaking another version

TYPE_INITIATION, TYPE_RESPONSE, TYPE_FINISH, TYPE_DATA = 1, 2, 3, 5
RESERVED = b"\0\0\0"
NO_COOKIE_MAC = bytes(16)  # "cookie_mac: zero, or ..." (zero: no cookie reply was received)

# Field tables of "## Handshake messages" and "## Data message"; every integer little endian.
INITIATION = struct.Struct("<B3sI32s16s")  # type, reserved, sender, Noise msg 1, cookie_mac
RESPONSE = struct.Struct("<B3sII96s")  # type, reserved, sender, receiver, Noise msg 2
FINISH = struct.Struct("<B3sII64s")  # type, reserved, sender, receiver, Noise msg 3
DATA_HEADER = struct.Struct("<B3sIQ")  # type, reserved, receiver, counter
TAG_SIZE = 16

# Drop reasons named in the spec ("## Drop reasons").
HANDSHAKE_FAILED = "handshake_failed"
UNKNOWN_STATIC_KEY = "unknown_static_key"
REVOKED_STATIC_KEY = "revoked_static_key"
UNKNOWN_INDEX = "unknown_index"


def test_layouts_have_the_sizes_of_the_spec_table() -> None:
    assert len(PROLOGUE) == 14
    assert (INITIATION.size, RESPONSE.size, FINISH.size) == (56, 108, 76)
    assert DATA_HEADER.size + TAG_SIZE == 32  # "data | 32 + length of the inner packet"


# --- The far end: dissononce plus struct --------------------------------------------------

@dataclass
class NoisePeer:
    """One side of the protocol built from the spec with dissononce, no tunneld code."""

    initiator: bool
    prologue: bytes = PROLOGUE
    static: Any = field(default_factory=lambda: X25519DH().generate_keypair())
    index: int = field(default_factory=lambda: random.SystemRandom().getrandbits(32))
    send_state: Any = None
    receive_state: Any = None

    def __post_init__(self) -> None:
        symmetric = SymmetricState(CipherState(ChaChaPolyCipher()), Blake2sHash())
        self.handshake = HandshakeState(symmetric, X25519DH())
        self.handshake.initialize(XXHandshakePattern(), self.initiator, self.prologue,
                                  s=self.static)
        assert self.handshake.protocol_name == PROTOCOL_NAME

    @property
    def public(self) -> bytes:
        return bytes(self.static.public.data)

    @property
    def private(self) -> bytes:
        return bytes(self.static.private.data)

    @property
    def remote_static(self) -> bytes:
        """The peer's static key, learned from Noise message 2 or 3."""
        return bytes(self.handshake.rs.data)

    def write(self) -> bytes:
        """The next Noise handshake message, with the spec's empty payload."""
        buffer = bytearray()
        self._maybe_split(self.handshake.write_message(b"", buffer))
        return bytes(buffer)

    def read(self, noise: bytes) -> None:
        """Read a Noise handshake message; its payload must be empty (spec)."""
        payload = bytearray()
        self._maybe_split(self.handshake.read_message(noise, payload))
        assert payload == b""

    def _maybe_split(self, states: Any) -> None:
        if states is not None:
            # "## Key derivation": the initiator sends with k1 and receives with k2.
            first, second = states
            self.send_state, self.receive_state = (
                (first, second) if self.initiator else (second, first))

    def data(self, receiver_index: int, counter: int, inner: bytes) -> bytes:
        """A data message (type 5) under the split key, nonce from the explicit counter."""
        assert self.send_state is not None, "handshake not finished"
        self.send_state.set_nonce(counter)
        ciphertext = bytes(self.send_state.encrypt_with_ad(b"", inner))  # AD empty
        return DATA_HEADER.pack(TYPE_DATA, RESERVED, receiver_index, counter) + ciphertext

    def open_data(self, datagram: bytes) -> tuple[int, int, bytes]:
        """(receiver index, counter, inner packet) of a data message from our side."""
        assert len(datagram) >= DATA_HEADER.size + TAG_SIZE
        kind, reserved, receiver, counter = DATA_HEADER.unpack_from(datagram)
        assert (kind, reserved) == (TYPE_DATA, RESERVED)
        assert self.receive_state is not None, "handshake not finished"
        self.receive_state.set_nonce(counter)
        inner = bytes(self.receive_state.decrypt_with_ad(b"", datagram[DATA_HEADER.size:]))
        return receiver, counter, inner


def initiation(sender_index: int, noise: bytes) -> bytes:
    return INITIATION.pack(TYPE_INITIATION, RESERVED, sender_index, noise, NO_COOKIE_MAC)


def parse_initiation(datagram: bytes) -> tuple[int, bytes, bytes]:
    """(sender index, Noise message 1, cookie_mac); checks type, reserved and exact size."""
    assert len(datagram) == INITIATION.size
    kind, reserved, sender, noise, mac = INITIATION.unpack(datagram)
    assert (kind, reserved) == (TYPE_INITIATION, RESERVED)
    return sender, noise, mac


def response(sender_index: int, receiver_index: int, noise: bytes) -> bytes:
    return RESPONSE.pack(TYPE_RESPONSE, RESERVED, sender_index, receiver_index, noise)


def parse_response(datagram: bytes) -> tuple[int, int, bytes]:
    """(sender index, receiver index, Noise message 2)."""
    assert len(datagram) == RESPONSE.size
    kind, reserved, sender, receiver, noise = RESPONSE.unpack(datagram)
    assert (kind, reserved) == (TYPE_RESPONSE, RESERVED)
    return sender, receiver, noise


def finish(sender_index: int, receiver_index: int, noise: bytes) -> bytes:
    return FINISH.pack(TYPE_FINISH, RESERVED, sender_index, receiver_index, noise)


def parse_finish(datagram: bytes) -> tuple[int, int, bytes]:
    """(sender index, receiver index, Noise message 3)."""
    assert len(datagram) == FINISH.size
    kind, reserved, sender, receiver, noise = FINISH.unpack(datagram)
    assert (kind, reserved) == (TYPE_FINISH, RESERVED)
    return sender, receiver, noise


# --- Our side -----------------------------------------------------------------------------

@dataclass
class Ours:
    """Our PeerSession with a fresh static key and an is_known backed by ``status``."""

    session: PeerSession
    public: bytes
    status: dict[bytes, KeyStatus]


def ours(peer_public: bytes, status: KeyStatus | None = "ok") -> Ours:
    """Our session for the peer ``peer_public``; ``status`` None: the key is not configured."""
    keypair = X25519DH().generate_keypair()  # dissononce makes the key; PeerSession derives
    table: dict[bytes, KeyStatus] = {} if status is None else {peer_public: status}
    session = PeerSession(static_private=bytes(keypair.private.data), peer_static=peer_public,
                          is_known=lambda key: table.get(key, "unknown"),
                          random_source=random.SystemRandom())
    assert session.static_public == bytes(keypair.public.data)
    return Ours(session, bytes(keypair.public.data), table)


def drain(session: PeerSession) -> list[Event]:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def one_datagram(session: PeerSession) -> bytes:
    datagrams = session.datagrams_to_send()
    assert len(datagrams) == 1, [d[:1].hex() for d in datagrams]
    return datagrams[0]


NOW = 100.0


# --- 1. dissononce initiates, we respond --------------------------------------------------

def test_dissononce_initiator_our_responder() -> None:
    peer = NoisePeer(initiator=True)
    us = ours(peer.public)
    session = us.session

    message1 = peer.write()
    assert len(message1) == 32  # "-> e  message 1: 32 bytes"
    session.receive(initiation(peer.index, message1), NOW)

    our_index, receiver, message2 = parse_response(one_datagram(session))
    assert receiver == peer.index
    peer.read(message2)
    assert peer.remote_static == us.public  # the responder's static key is ours

    message3 = peer.write()
    assert len(message3) == 64
    assert peer.send_state is not None  # split after message 3
    session.receive(finish(peer.index, our_index, message3), NOW)
    assert drain(session) == [HandshakeCompleted(our_index, peer.index, initiator=False)]
    assert not session.drops

    # "Responder, after reading message 3 ... a keepalive if there are none."
    assert peer.open_data(one_datagram(session)) == (peer.index, 0, b"")

    # Data in: explicit counters, out of order within the window.
    sent = {0: b"first inner packet", 7: b"counter seven", 3: b"late but fresh", 8: b""}
    for counter, inner in sent.items():
        session.receive(peer.data(our_index, counter, inner), NOW)
    assert drain(session) == [DataReceived(inner) for inner in sent.values() if inner]
    assert not session.drops

    # Data out: our next counter after the keepalive is 1.
    session.send(b"answer from tunneld", NOW)
    assert peer.open_data(one_datagram(session)) == (peer.index, 1, b"answer from tunneld")


# --- 2. we initiate, dissononce responds --------------------------------------------------

def test_our_initiator_dissononce_responder() -> None:
    peer = NoisePeer(initiator=False)
    us = ours(peer.public)
    session = us.session

    session.send(b"queued before the session", NOW)
    our_index, message1, mac = parse_initiation(one_datagram(session))
    assert mac == NO_COOKIE_MAC  # no cookie reply received
    peer.read(message1)

    message2 = peer.write()
    assert len(message2) == 96  # "<- e, ee, s, es  message 2: 32 + (32 + 16) + 16"
    session.receive(response(peer.index, our_index, message2), NOW)
    assert not session.drops

    sender, receiver, message3 = parse_finish(one_datagram(session))
    assert (sender, receiver) == (our_index, peer.index)
    peer.read(message3)
    assert peer.remote_static == us.public  # the initiator's static key is ours
    assert peer.receive_state is not None
    # "Initiator, after writing message 3: next = new" - unconfirmed, nothing installed yet.
    assert drain(session) == [] and session.current is None

    # The responder's first data message (a keepalive) confirms; queued packets follow.
    session.receive(peer.data(our_index, 0, b""), NOW)
    assert drain(session) == [HandshakeCompleted(our_index, peer.index, initiator=True)]
    assert peer.open_data(one_datagram(session)) == (peer.index, 0, b"queued before the session")

    for counter in (2, 1, 5):
        session.receive(peer.data(our_index, counter, b"inner %d" % counter), NOW)
    assert drain(session) == [DataReceived(b"inner %d" % c) for c in (2, 1, 5)]
    session.send(b"back", NOW)
    assert peer.open_data(one_datagram(session)) == (peer.index, 1, b"back")
    assert not session.drops


# --- 3. Prologue mismatch -----------------------------------------------------------------

def test_prologue_mismatch_fails_our_initiator_at_message_2() -> None:
    peer = NoisePeer(initiator=False, prologue=OTHER_PROLOGUE)
    session = ours(peer.public).session

    session.initiate(NOW)
    our_index, message1, _ = parse_initiation(one_datagram(session))
    peer.read(message1)  # message 1 is not authenticated: the mismatch is not visible yet
    session.receive(response(peer.index, our_index, peer.write()), NOW)

    assert session.drops == {HANDSHAKE_FAILED: 1}
    assert session.datagrams_to_send() == [] and drain(session) == []
    assert session.current is None and session.next is None


def test_prologue_mismatch_fails_dissononce_initiator_at_message_2() -> None:
    peer = NoisePeer(initiator=True, prologue=OTHER_PROLOGUE)
    session = ours(peer.public).session

    session.receive(initiation(peer.index, peer.write()), NOW)
    our_index, _, message2 = parse_response(one_datagram(session))
    with pytest.raises(DecryptFailedException):
        peer.read(message2)  # the peer cannot write message 3: no session anywhere

    assert drain(session) == [] and session.current is None
    # Whatever the peer sends next cannot be a session on our side.
    session.receive(finish(peer.index, our_index, bytes(64)), NOW)
    assert session.drops == {HANDSHAKE_FAILED: 1}
    assert drain(session) == [] and session.current is None


# --- 4. Static key our side does not accept -----------------------------------------------

REFUSALS = [(None, UNKNOWN_STATIC_KEY), ("unknown", UNKNOWN_STATIC_KEY),
            ("revoked", REVOKED_STATIC_KEY)]


@pytest.mark.parametrize(("status", "reason"), REFUSALS)
def test_refused_static_key_at_message_3(status: KeyStatus | None, reason: str) -> None:
    peer = NoisePeer(initiator=True)
    us = ours(peer.public, status)
    session = us.session

    session.receive(initiation(peer.index, peer.write()), NOW)
    our_index, _, message2 = parse_response(one_datagram(session))
    peer.read(message2)
    session.receive(finish(peer.index, our_index, peer.write()), NOW)

    assert session.drops == {reason: 1}
    assert session.datagrams_to_send() == []  # "The refusing side sends nothing back."
    assert drain(session) == [] and session.current is None
    # The peer holds keys; ours never installed them.
    session.receive(peer.data(our_index, 0, b"x"), NOW)
    assert session.drops == {reason: 1, UNKNOWN_INDEX: 1}
    assert drain(session) == []


@pytest.mark.parametrize(("status", "reason"), REFUSALS)
def test_refused_static_key_at_message_2(status: KeyStatus | None, reason: str) -> None:
    peer = NoisePeer(initiator=False)
    session = ours(peer.public, status).session

    session.initiate(NOW)
    our_index, message1, _ = parse_initiation(one_datagram(session))
    peer.read(message1)
    session.receive(response(peer.index, our_index, peer.write()), NOW)

    assert session.drops == {reason: 1}
    assert session.datagrams_to_send() == []  # no message 3
    assert drain(session) == [] and session.current is None and session.next is None
