"""The sans-IO tunnel core: two PeerSessions wired in memory with a fake clock.

Like aioquic's ``tests/test_connection.py`` ``roundtrip()``: no sockets, no sleeping; rekeys,
retries and expiry run in simulated seconds.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from vpnr.tunneld import constants, errors, messages
from vpnr.tunneld.constants import Timers
from vpnr.tunneld.errors import LocalProtocolError, RemoteProtocolError
from vpnr.tunneld.handshake import Keypair, KeyStatus
from vpnr.tunneld.replay import ReplayWindow
from vpnr.tunneld.session import (
    DataReceived,
    Event,
    HandshakeCompleted,
    HandshakeGaveUp,
    PeerSession,
    SessionExpired,
    SessionRevoked,
)

# A handshake takes 1.5 round trips (3 lag steps of 0.1 s each way in run_continuous): the
# retry timeout must exceed that or every rekey also retries.
FAST = Timers(rekey_after_time=12.0, reject_after_time=18.0, rekey_attempt_time=9.0,
              rekey_timeout=1.0, rekey_timeout_jitter_max=0.03, keepalive_timeout=1.0)


def static_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 (private, public) pair as raw bytes."""
    key = X25519PrivateKey.generate()
    return (key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


@dataclass
class Pair:
    """Two sessions (a and b) that know each other, and a fake clock."""

    a: PeerSession
    b: PeerSession
    now: float = 0.0
    a_status: dict[bytes, KeyStatus] = field(default_factory=dict)
    b_status: dict[bytes, KeyStatus] = field(default_factory=dict)


def make_pair(timers: Timers = FAST, seed: int = 1) -> Pair:
    """Sessions a and b; each one's is_known reads a dict the test may change."""
    a_private, a_public = static_keypair()
    b_private, b_public = static_keypair()
    a_status: dict[bytes, KeyStatus] = {b_public: "ok"}
    b_status: dict[bytes, KeyStatus] = {a_public: "ok"}
    rng = random.Random(seed)  # noqa: S311 - deterministic indexes and jitter in tests
    a = PeerSession(static_private=a_private, peer_static=b_public,
                    is_known=lambda key: a_status.get(key, "unknown"), random_source=rng,
                    timers=timers)
    b = PeerSession(static_private=b_private, peer_static=a_public,
                    is_known=lambda key: b_status.get(key, "unknown"), random_source=rng,
                    timers=timers)
    return Pair(a, b, 0.0, a_status, b_status)


def transfer(sender: PeerSession, receiver: PeerSession, now: float,
             lose: Callable[[bytes], bool] = lambda datagram: False) -> int:
    """Deliver sender's datagrams to receiver (except lost ones); how many were sent."""
    datagrams = sender.datagrams_to_send()
    for datagram in datagrams:
        if not lose(datagram):
            receiver.receive(datagram, now)
    return len(datagrams)


def roundtrip(pair: Pair) -> None:
    """Exchange datagrams until both sides are quiet."""
    while transfer(pair.a, pair.b, pair.now) + transfer(pair.b, pair.a, pair.now):
        pass


def drain(session: PeerSession) -> list[Event]:
    """Every pending event of ``session``."""
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def received(events: list[Event]) -> list[bytes]:
    """The inner packets among ``events``."""
    return [event.inner for event in events if isinstance(event, DataReceived)]


def established(initiator_first: bool = True) -> Pair:
    """A pair with a confirmed session, started by a (or b), events drained."""
    pair = make_pair()
    first, second = (pair.a, pair.b) if initiator_first else (pair.b, pair.a)
    first.send(b"hello", pair.now)
    roundtrip(pair)
    assert received(drain(second)) == [b"hello"]
    drain(first)
    assert pair.a.current is not None and pair.b.current is not None
    assert pair.a.next is None and pair.b.next is None
    return pair


def current(session: PeerSession) -> Keypair:
    """The session's current keypair, which the test expects to exist."""
    assert session.current is not None
    return session.current


def kind(datagram: bytes) -> int:
    """Message type of a datagram."""
    return datagram[0]


# --- Handshake ----------------------------------------------------------------------------

@pytest.mark.parametrize("a_starts", [True, False])
def test_handshake_either_direction_then_data(a_starts: bool) -> None:
    pair = make_pair()
    first, second = (pair.a, pair.b) if a_starts else (pair.b, pair.a)
    first.send(b"queued before the session", pair.now)
    assert first.queued_packets == 1
    initiation = first.datagrams_to_send()
    assert [kind(d) for d in initiation] == [constants.MESSAGE_INITIATION]
    assert len(initiation[0]) == constants.INITIATION_SIZE
    assert b"queued" not in initiation[0]  # never in clear
    second.receive(initiation[0], pair.now)
    response = second.datagrams_to_send()
    assert [len(d) for d in response] == [constants.RESPONSE_SIZE]
    first.receive(response[0], pair.now)
    finish = first.datagrams_to_send()
    assert [len(d) for d in finish] == [constants.FINISH_SIZE]
    assert first.next is not None and first.current is None  # unconfirmed
    second.receive(finish[0], pair.now)
    second_events = drain(second)
    assert isinstance(second_events[0], HandshakeCompleted) and not second_events[0].initiator
    confirmation = second.datagrams_to_send()
    assert [len(d) for d in confirmation] == [constants.DATA_MIN_SIZE]  # keepalive
    first.receive(confirmation[0], pair.now)
    first_events = drain(first)
    first_keypair, second_keypair = current(first), current(second)
    assert first_events == [HandshakeCompleted(first_keypair.local_index,
                                               second_keypair.local_index, True)]
    assert first_keypair.send_key == second_keypair.receive_key
    roundtrip(pair)
    assert received(drain(second)) == [b"queued before the session"]
    for number in range(20):
        pair.a.send(b"a%d" % number, pair.now)
        pair.b.send(b"b%d" % number, pair.now)
    roundtrip(pair)
    assert received(drain(pair.b)) == [b"a%d" % n for n in range(20)]
    assert received(drain(pair.a)) == [b"b%d" % n for n in range(20)]
    assert not pair.a.drops and not pair.b.drops


def test_simultaneous_initiation_settles_on_one_keypair() -> None:
    pair = make_pair()
    pair.a.initiate(pair.now)
    pair.b.initiate(pair.now)
    roundtrip(pair)
    assert pair.a.current is not None and pair.b.current is not None
    assert pair.a.current.local_index == pair.b.current.remote_index
    assert not pair.a.handshaking and not pair.b.handshaking
    pair.a.send(b"x", pair.now)
    pair.b.send(b"y", pair.now)
    roundtrip(pair)
    assert received(drain(pair.b)) == [b"x"] and received(drain(pair.a)) == [b"y"]


def test_unknown_static_key_refused_by_responder_at_message_3() -> None:
    pair = make_pair()
    pair.b_status.clear()
    pair.a.send(b"x", pair.now)
    roundtrip(pair)
    assert pair.b.drops[errors.UNKNOWN_STATIC_KEY] == 1
    assert pair.b.current is None and received(drain(pair.b)) == []


def test_revoked_static_key_refused_by_initiator_at_message_2() -> None:
    pair = make_pair()
    pair.a_status[pair.a.peer_static] = "revoked"
    pair.a.send(b"x", pair.now)
    roundtrip(pair)
    assert pair.a.drops[errors.REVOKED_STATIC_KEY] == 1
    assert pair.a.next is None and pair.a.current is None


def test_known_key_of_another_peer_refused() -> None:
    pair = make_pair()
    intruder_private, intruder_public = static_keypair()
    pair.b_status[intruder_public] = "ok"  # a configured peer, but not the one of session b
    intruder = PeerSession(static_private=intruder_private, peer_static=pair.a.peer_static,
                           is_known=lambda key: "ok", random_source=random.Random(3),  # noqa: S311
                           timers=FAST)
    intruder.initiate(pair.now)
    while transfer(intruder, pair.b, pair.now) + transfer(pair.b, intruder, pair.now):
        pass
    assert pair.b.drops[errors.UNKNOWN_STATIC_KEY] == 1 and pair.b.current is None


def test_corrupted_handshake_message_dropped() -> None:
    pair = make_pair()
    pair.a.initiate(pair.now)
    transfer(pair.a, pair.b, pair.now)
    response = bytearray(pair.b.datagrams_to_send()[0])
    response[-1] ^= 1
    pair.a.receive(bytes(response), pair.now)
    assert pair.a.drops[errors.HANDSHAKE_FAILED] == 1


def test_handshake_retry_after_loss_then_success() -> None:
    pair = make_pair()
    pair.a.send(b"x", pair.now)
    assert len(pair.a.datagrams_to_send()) == 1  # lost
    deadline = pair.a.get_timer()
    assert deadline is not None
    assert FAST.rekey_timeout <= deadline <= FAST.rekey_timeout + FAST.rekey_timeout_jitter_max
    pair.now = deadline
    pair.a.handle_timer(pair.now)
    roundtrip(pair)
    assert received(drain(pair.b)) == [b"x"]


def test_handshake_gives_up_after_rekey_attempt_time() -> None:
    pair = make_pair()
    pair.a.send(b"x", pair.now)
    pair.a.send(b"y", pair.now)
    initiations = 0
    while (deadline := pair.a.get_timer()) is not None:
        initiations += len(pair.a.datagrams_to_send())  # all lost
        pair.now = deadline
        pair.a.handle_timer(pair.now)
    assert pair.now >= FAST.rekey_attempt_time
    expected = FAST.rekey_attempt_time / (FAST.rekey_timeout + FAST.rekey_timeout_jitter_max)
    assert initiations >= int(expected)
    assert drain(pair.a) == [HandshakeGaveUp(dropped_packets=2)]
    assert pair.a.queued_packets == 0 and not pair.a.handshaking


def test_cookie_reply_makes_next_initiation_carry_the_mac() -> None:
    pair = make_pair()
    pair.a.initiate(pair.now)
    first = pair.a.datagrams_to_send()[0]
    assert first[-constants.COOKIE_SIZE:] == bytes(constants.COOKIE_SIZE)
    secret, source = b"s" * 32, b"192.0.2.1:51820"
    sender_index = messages.parse_initiation(first).sender_index
    assert not messages.initiation_has_cookie(first, secret, source)
    reply = messages.encode_cookie_reply(
        messages.CookieReply(sender_index, messages.make_cookie(secret, source)))
    assert len(reply) == constants.COOKIE_REPLY_SIZE
    pair.a.receive(reply, pair.now)
    assert pair.a.datagrams_to_send() == []  # no immediate resend: no amplification
    pair.now = pair.a.get_timer() or 0.0
    pair.a.handle_timer(pair.now)
    retry = pair.a.datagrams_to_send()[0]
    assert messages.initiation_has_cookie(retry, secret, source)
    pair.a.receive(reply, pair.now)  # for the old index now
    assert pair.a.drops[errors.BAD_COOKIE] == 1


# --- Data ---------------------------------------------------------------------------------

def test_loss_and_reordering_within_the_window() -> None:
    pair = established()
    for number in range(300):
        pair.a.send(struct.pack("<I", number), pair.now)
    datagrams = pair.a.datagrams_to_send()
    kept = [d for position, d in enumerate(datagrams) if position % 7]
    random.Random(5).shuffle(kept)  # noqa: S311 - a reproducible reordering
    for datagram in kept:
        pair.b.receive(datagram, pair.now)
    got = sorted(struct.unpack("<I", inner)[0] for inner in received(drain(pair.b)))
    assert got == [n for n in range(300) if n % 7]
    assert not pair.b.drops


def test_replayed_data_rejected() -> None:
    pair = established()
    pair.a.send(b"once", pair.now)
    datagram = pair.a.datagrams_to_send()[0]
    pair.b.receive(datagram, pair.now)
    pair.b.receive(datagram, pair.now)
    assert received(drain(pair.b)) == [b"once"]
    assert pair.b.drops == {errors.REPLAYED: 1}


def test_too_old_data_rejected() -> None:
    pair = established()
    for _ in range(constants.REPLAY_WINDOW_SIZE + 10):
        pair.a.send(b"", pair.now)
    datagrams = pair.a.datagrams_to_send()
    pair.b.receive(datagrams[-1], pair.now)
    pair.b.receive(datagrams[0], pair.now)
    assert pair.b.drops == {errors.TOO_OLD: 1}


def test_keepalive_answers_received_data() -> None:
    pair = established()
    pair.a.send(b"ping", pair.now)
    transfer(pair.a, pair.b, pair.now)
    assert pair.b.get_timer() == pair.now + FAST.keepalive_timeout
    pair.now += FAST.keepalive_timeout
    pair.b.handle_timer(pair.now)
    keepalive = pair.b.datagrams_to_send()
    assert [len(d) for d in keepalive] == [constants.DATA_MIN_SIZE]
    pair.a.receive(keepalive[0], pair.now)
    assert received(drain(pair.a)) == [] and not pair.a.drops


def test_persistent_keepalive() -> None:
    pair = established()
    pair.a.persistent_keepalive = 3.0
    pair.a.send(b"x", pair.now)
    pair.a.datagrams_to_send()
    pair.now += 3.0
    pair.a.handle_timer(pair.now)
    assert [len(d) for d in pair.a.datagrams_to_send()] == [constants.DATA_MIN_SIZE]


def test_session_expires_without_traffic() -> None:
    pair = established()
    pair.now += FAST.reject_after_time
    pair.a.handle_timer(pair.now)
    events = drain(pair.a)
    assert len(events) == 1 and isinstance(events[0], SessionExpired)
    assert pair.a.current is None


def test_expired_keypair_refuses_data() -> None:
    pair = established()
    pair.a.send(b"late", pair.now)
    datagram = pair.a.datagrams_to_send()[0]
    pair.b.receive(datagram, pair.now + FAST.reject_after_time)
    assert pair.b.drops == {errors.KEY_EXPIRED: 1}


# --- Rekey, make-before-break -------------------------------------------------------------

def run_continuous(pair: Pair, packets: int, step: float, lag: int = 2) -> tuple[int, int]:
    """a and b send numbered packets every step; datagrams arrive ``lag`` steps late.

    Returns the number of handshakes completed on a and b; asserts every packet arrived
    exactly once.
    """
    in_flight: list[tuple[list[bytes], list[bytes]]] = []
    got_a: list[int] = []
    got_b: list[int] = []
    completed = [0, 0]

    def collect() -> None:
        for index, (session, got) in enumerate(((pair.a, got_a), (pair.b, got_b))):
            for event in drain(session):
                if isinstance(event, DataReceived):
                    got.append(struct.unpack("<I", event.inner)[0])
                elif isinstance(event, HandshakeCompleted):
                    completed[index] += 1
                else:
                    raise AssertionError(event)

    for number in range(packets + lag + 20):
        if number < packets:
            pair.a.send(struct.pack("<I", number), pair.now)
            pair.b.send(struct.pack("<I", number), pair.now)
        in_flight.append((pair.a.datagrams_to_send(), pair.b.datagrams_to_send()))
        if len(in_flight) > lag:
            from_a, from_b = in_flight.pop(0)
            for datagram in from_a:
                pair.b.receive(datagram, pair.now)
            for datagram in from_b:
                pair.a.receive(datagram, pair.now)
        for session in (pair.a, pair.b):
            deadline = session.get_timer()
            if deadline is not None and deadline <= pair.now:
                session.handle_timer(pair.now)
        collect()
        pair.now += step
    assert sorted(got_b) == list(range(packets)), "a -> b lost or duplicated packets"
    assert sorted(got_a) == list(range(packets)), "b -> a lost or duplicated packets"
    assert not pair.a.drops and not pair.b.drops
    return completed[0], completed[1]


def test_rekey_by_time_loses_no_packet() -> None:
    pair = established()
    first_index = pair.a.current.local_index  # type: ignore[union-attr]
    # 60 s of traffic with 12 s rekeys and 18 s reject: several rekeys, all make-before-break.
    completed_a, completed_b = run_continuous(pair, packets=600, step=0.1)
    assert completed_a >= 4 and completed_b >= 4
    assert pair.a.current is not None and pair.a.current.local_index != first_index


def test_rekey_by_message_count_loses_no_packet() -> None:
    pair = make_pair(Timers(rekey_after_messages=100, rekey_timeout=1.0,
                            rekey_timeout_jitter_max=0.03))
    pair.a.send(struct.pack("<I", 10**6), pair.now)
    roundtrip(pair)
    drain(pair.a)
    drain(pair.b)
    pair.b.datagrams_to_send()
    completed_a, completed_b = run_continuous(pair, packets=1000, step=0.001, lag=3)
    assert completed_a >= 8 and completed_b >= 8
    assert pair.a.current is not None and pair.a.current.send_counter < 200


def test_previous_keypair_decrypts_after_rotation() -> None:
    pair = established()
    old = pair.a.current
    pair.a.send(b"on the old keypair", pair.now)
    in_flight = pair.a.datagrams_to_send()
    pair.a.initiate(pair.now)
    roundtrip(pair)
    assert pair.a.current is not old and pair.a.previous is old
    for datagram in in_flight:
        pair.b.receive(datagram, pair.now)
    assert received(drain(pair.b)) == [b"on the old keypair"]


def test_lost_finish_keeps_the_old_keypair_sending() -> None:
    pair = established()
    old = pair.a.current
    pair.a.initiate(pair.now)
    transfer(pair.a, pair.b, pair.now)
    transfer(pair.b, pair.a, pair.now)
    pair.a.datagrams_to_send()  # message 3 lost
    assert pair.a.next is not None and pair.a.current is old
    pair.a.send(b"still flows", pair.now)
    transfer(pair.a, pair.b, pair.now)
    assert received(drain(pair.b)) == [b"still flows"]
    pair.now = pair.a.get_timer() or 0.0
    pair.a.handle_timer(pair.now)  # retry
    roundtrip(pair)
    assert pair.a.current is not old and pair.a.current is not None


# --- Revocation ---------------------------------------------------------------------------

def test_revoke_tears_down_at_once() -> None:
    pair = established()
    pair.b.send(b"in flight", pair.now)
    pair.a.revoke()
    assert drain(pair.a) == [SessionRevoked()]
    assert pair.a.current is None and pair.a.get_timer() is None
    transfer(pair.b, pair.a, pair.now)
    assert pair.a.drops == {errors.REVOKED: 1}
    pair.a.send(b"x", pair.now)
    assert pair.a.datagrams_to_send() == [] and pair.a.drops[errors.REVOKED] == 2
    with pytest.raises(LocalProtocolError):
        pair.a.initiate(pair.now)


def test_oversized_inner_packet_is_a_local_error() -> None:
    pair = established()
    with pytest.raises(LocalProtocolError):
        pair.a.send(bytes(constants.MAX_DATAGRAM_SIZE), pair.now)


# --- Malformed input ----------------------------------------------------------------------

def malformed_cases(pair: Pair) -> list[tuple[bytes, str]]:
    """(datagram, expected drop reason) for every kind of malformed input."""
    pair.a.send(b"payload", pair.now)
    good = pair.a.datagrams_to_send()[0]
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    reserved = bytearray(good)
    reserved[2] = 1
    unknown_index = bytearray(good)
    struct.pack_into("<I", unknown_index, 4, (struct.unpack_from("<I", good, 4)[0] + 1) % 2**32)
    initiation = messages.encode_initiation(messages.Initiation(7, bytes(32)))
    return [
        (b"", errors.SHORT),
        (b"\x05\0\0", errors.SHORT),
        (good[:constants.DATA_MIN_SIZE - 1], errors.SHORT),
        (b"\x09\0\0\0" + bytes(40), errors.BAD_TYPE),
        (b"\x00\0\0\0" + bytes(40), errors.BAD_TYPE),
        (initiation + b"\0", errors.BAD_LENGTH),
        (initiation[:-1], errors.SHORT),
        (bytes([constants.MESSAGE_RESPONSE]) + bytes(constants.RESPONSE_SIZE), errors.BAD_LENGTH),
        (bytes([constants.MESSAGE_FINISH]) + bytes(10), errors.SHORT),
        (good[:4] + bytes(constants.MAX_DATAGRAM_SIZE), errors.BAD_LENGTH),
        (bytes(reserved), errors.BAD_RESERVED),
        (bytes(unknown_index), errors.UNKNOWN_INDEX),
        (bytes(flipped), errors.DECRYPT_FAILED),
        (messages.encode_response(messages.Response(1, 2, bytes(96))), errors.UNKNOWN_INDEX),
        (messages.encode_finish(messages.Finish(1, 2, bytes(64))), errors.UNKNOWN_INDEX),
        (messages.encode_cookie_reply(messages.CookieReply(1, bytes(16))), errors.BAD_COOKIE),
    ]


def test_malformed_input_dropped_with_reason_and_counted() -> None:
    pair = established()
    cases = malformed_cases(pair)
    for datagram, reason in cases:
        before = pair.b.drops[reason]
        pair.b.receive(datagram, pair.now)
        assert pair.b.drops[reason] == before + 1, (datagram[:8].hex(), reason)
    assert sum(pair.b.drops.values()) == len(cases)
    assert received(drain(pair.b)) == [] and pair.b.datagrams_to_send() == []
    assert set(pair.b.drops) <= set(errors.REASONS)


def test_forged_counter_does_not_advance_the_window() -> None:
    pair = established()
    pair.a.send(b"real", pair.now)
    good = bytearray(pair.a.datagrams_to_send()[0])
    forged = bytearray(good)
    struct.pack_into("<Q", forged, 8, 10**9)
    pair.b.receive(bytes(forged), pair.now)
    pair.b.receive(bytes(good), pair.now)
    assert received(drain(pair.b)) == [b"real"]
    assert pair.b.drops == {errors.DECRYPT_FAILED: 1}


def test_invalid_initiation_noise_dropped() -> None:
    pair = established()
    # An all-zero ephemeral key is a low-order X25519 point: the DH must fail cleanly.
    pair.b.receive(messages.encode_initiation(messages.Initiation(7, bytes(32))), pair.now)
    assert pair.b.drops == {errors.HANDSHAKE_FAILED: 1}
    assert pair.b.datagrams_to_send() == []


# --- Messages -----------------------------------------------------------------------------

def test_message_sizes_and_roundtrip() -> None:
    assert (constants.INITIATION_SIZE, constants.RESPONSE_SIZE, constants.FINISH_SIZE,
            constants.COOKIE_REPLY_SIZE, constants.DATA_MIN_SIZE) == (56, 108, 76, 24, 32)
    initiation = messages.Initiation(0xDEADBEEF, bytes(range(32)), b"m" * 16)
    assert messages.parse(messages.encode_initiation(initiation)) == initiation
    response = messages.Response(1, 2, b"r" * 96)
    assert messages.parse(messages.encode_response(response)) == response
    finish = messages.Finish(3, 4, b"f" * 64)
    assert messages.parse(messages.encode_finish(finish)) == finish
    cookie = messages.CookieReply(5, b"c" * 16)
    assert messages.parse(messages.encode_cookie_reply(cookie)) == cookie
    data = messages.Data(6, 2**64 - 1, b"d" * 17)
    encoded = messages.encode_data(data)
    assert encoded[:16] == bytes([5, 0, 0, 0, 6, 0, 0, 0]) + b"\xff" * 8
    assert messages.parse(encoded) == data


def test_parse_functions_refuse_other_types() -> None:
    data = messages.encode_data(messages.Data(1, 0, bytes(16)))
    with pytest.raises(RemoteProtocolError) as caught:
        messages.parse_initiation(data)
    assert caught.value.reason == errors.BAD_TYPE
    with pytest.raises(RemoteProtocolError) as caught:
        messages.parse_data(messages.encode_cookie_reply(messages.CookieReply(1, bytes(16))))
    assert caught.value.reason == errors.BAD_TYPE


# --- Replay window (RFC 6479) -------------------------------------------------------------

def reason_of(window: ReplayWindow, counter: int) -> str | None:
    """The drop reason for ``counter``, or None if it is accepted (and marked)."""
    try:
        window.accept(counter)
    except RemoteProtocolError as exc:
        return exc.reason
    return None


def test_replay_window_is_at_least_2048() -> None:
    assert ReplayWindow.window_size >= 2048


def test_replay_window_edges() -> None:
    window = ReplayWindow()
    assert reason_of(window, 0) is None
    assert reason_of(window, 0) == errors.REPLAYED
    top = 10_000
    assert reason_of(window, top) is None
    assert reason_of(window, top - 2048) is None  # 2048 behind is inside
    assert reason_of(window, top - 2048) == errors.REPLAYED
    assert reason_of(window, top - window.window_size) is None  # the last slot
    assert reason_of(window, top - window.window_size - 1) == errors.TOO_OLD
    assert reason_of(window, top - 1) is None
    assert reason_of(window, top) == errors.REPLAYED


def test_replay_window_check_does_not_mark() -> None:
    window = ReplayWindow()
    window.check(5)
    window.check(5)
    assert window.last == 0
    window.accept(5)
    with pytest.raises(RemoteProtocolError):
        window.check(5)


def test_replay_window_ring_wraparound_clears_blocks() -> None:
    window = ReplayWindow()
    ring_bits = constants.REPLAY_RING_BLOCKS * constants.REPLAY_BLOCK_BITS
    for counter in range(0, 5 * ring_bits, 61):  # walks around the ring several times
        assert reason_of(window, counter) is None
    # A counter whose ring slot was used a revolution ago must be accepted (block cleared).
    top = window.last
    unseen = [c for c in range(top - 100, top) if c % 61]
    for counter in unseen:
        assert reason_of(window, counter) is None, counter
    # A jump of more than the whole ring clears everything, including the old top's bit.
    assert reason_of(window, top + 3 * ring_bits) is None
    assert reason_of(window, top + 3 * ring_bits - 1) is None
    assert reason_of(window, top) == errors.TOO_OLD


def test_replay_window_block_boundary() -> None:
    window = ReplayWindow()
    for counter in (63, 64, 65, 127, 128):
        assert reason_of(window, counter) is None
    for counter in (63, 64, 65, 127, 128):
        assert reason_of(window, counter) == errors.REPLAYED
    assert reason_of(window, 62) is None


def test_counter_limit() -> None:
    window = ReplayWindow()
    assert reason_of(window, constants.REJECT_AFTER_MESSAGES) == errors.COUNTER_LIMIT
    assert reason_of(window, constants.REJECT_AFTER_MESSAGES - 1) is None
    assert reason_of(window, 2**64 - 1) == errors.COUNTER_LIMIT
