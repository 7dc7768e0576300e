"""One peer's tunnel session, sans-IO (after aioquic ``QuicConnection``).

:class:`PeerSession` never touches a socket, a clock or a thread. The caller feeds it
datagrams (:meth:`~PeerSession.receive`), inner packets (:meth:`~PeerSession.send`) and the
time (:meth:`~PeerSession.handle_timer` at :meth:`~PeerSession.get_timer`), and collects
:meth:`~PeerSession.datagrams_to_send` and :meth:`~PeerSession.next_event`.

Keypairs current / previous / next follow wireguard-go ``device/keypair.go``, turned
around for Noise XX: the responder reads message 3, so it knows the initiator holds the new
keys and switches to them at once (sending a keepalive if it has nothing queued, which
confirms them). The initiator cannot know whether message 3 arrived, so its new keypair
waits in ``next`` (its old ``current`` keeps sending and decrypting) until the first data
message decrypts with it. Make-before-break: the replaced keypair stays as ``previous`` and
keeps decrypting packets still in flight until it expires.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from vpnr.tunneld import errors, messages
from vpnr.tunneld.constants import (
    AEAD_TAG_SIZE,
    DATA_HEADER_SIZE,
    MAX_DATAGRAM_SIZE,
    MESSAGE_DATA,
    Timers,
)
from vpnr.tunneld.errors import LocalProtocolError, RemoteProtocolError
from vpnr.tunneld.handshake import (
    InitiatorHandshake,
    IsKnown,
    Keypair,
    KeyStatus,
    ResponderHandshake,
)

MAX_INNER_SIZE = MAX_DATAGRAM_SIZE - DATA_HEADER_SIZE - AEAD_TAG_SIZE
_DATA_HEADER = struct.Struct("<IIQ")  # type + 3 reserved bytes as one u32, receiver, counter
_MAX_RESPONDERS = 2  # half-done handshakes kept per peer; an initiator's retry replaces them


class RandomSource(Protocol):
    """Where session indexes and retry jitter come from (``random.SystemRandom`` in use)."""

    def getrandbits(self, k: int, /) -> int:
        """A random integer of ``k`` bits."""

    def random(self) -> float:
        """A random float in [0, 1)."""


@dataclass(frozen=True)
class HandshakeCompleted:
    """A new keypair is in use (``initiator``: we sent message 1)."""

    local_index: int
    remote_index: int
    initiator: bool


@dataclass(frozen=True)
class DataReceived:
    """An inner packet arrived, authenticated and not replayed."""

    inner: bytes


@dataclass(frozen=True)
class SessionExpired:
    """The current keypair reached REJECT_AFTER_TIME with no successor: no session now."""

    local_index: int


@dataclass(frozen=True)
class HandshakeGaveUp:
    """Handshake retries ran for REKEY_ATTEMPT_TIME without success; queued packets dropped."""

    dropped_packets: int


@dataclass(frozen=True)
class SessionRevoked:
    """:meth:`PeerSession.revoke` tore everything down."""


Event = HandshakeCompleted | DataReceived | SessionExpired | HandshakeGaveUp | SessionRevoked


class PeerSession:
    """The tunnel with one peer: handshakes, keypairs, timers, data in and out."""

    def __init__(self, *, static_private: bytes, peer_static: bytes, is_known: IsKnown,
                 random_source: RandomSource, timers: Timers | None = None,
                 persistent_keepalive: float = 0.0,
                 allocate_index: Callable[[], int] | None = None) -> None:
        self.peer_static = peer_static
        self.timers = timers or Timers()
        self.persistent_keepalive = persistent_keepalive
        self.revoked = False
        self.drops: Counter[str] = Counter()
        """Datagrams refused, by reason (errors.REASONS)."""
        self._static_private = static_private
        self.static_public = X25519PrivateKey.from_private_bytes(static_private).public_key() \
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._is_known = is_known
        self._random = random_source
        self._allocate_index = allocate_index
        self.fallback_static: bytes | None = None
        """During a static key rotation's overlap: the previous private key, tried on every
        other handshake attempt for peers that do not know the new public key yet."""
        self._attempts = 0
        self._initiator_static = static_private
        self.index_epoch = 0
        """Bumped whenever the set of receiver indexes may have changed (the router then
        updates its index table and the kernel's session map)."""
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self._initiator: InitiatorHandshake | None = None
        self._responders: dict[int, ResponderHandshake] = {}
        self._cookie = b""
        self._attempt_started: float | None = None  # first initiation of this attempt
        self._retry_at: float | None = None
        self._keepalive_at: float | None = None
        self._persistent_keepalive_at: float | None = None
        self._queue: deque[bytes] = deque()
        self._datagrams: list[bytes] = []
        self._events: deque[Event] = deque()

    # --- Caller interface -----------------------------------------------------------------

    def datagrams_to_send(self) -> list[bytes]:
        """Datagrams to send to the peer since the last call, in order."""
        datagrams, self._datagrams = self._datagrams, []
        return datagrams

    def next_event(self) -> Event | None:
        """The oldest event not yet returned, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        deadlines = [at for at in (self._retry_at, self._keepalive_at,
                                   self._persistent_keepalive_at) if at is not None]
        deadlines += [kp.created_at + self.timers.reject_after_time for kp in self._keypairs()]
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        """Run every timer due at ``now``."""
        self._expired_keypairs(now)
        if self._retry_at is not None and now >= self._retry_at:
            self._expired_rekey_timeout(now)
        if self._keepalive_at is not None and now >= self._keepalive_at:
            self._expired_keepalive(now)
        if self._persistent_keepalive_at is not None and now >= self._persistent_keepalive_at:
            self._expired_persistent_keepalive(now)

    @property
    def has_output(self) -> bool:
        """Datagrams or events wait to be collected."""
        return bool(self._datagrams or self._events)

    @property
    def handshaking(self) -> bool:
        """Whether a handshake we started is waiting for a response or confirmation."""
        return self._initiator is not None

    @property
    def queued_packets(self) -> int:
        """Inner packets waiting for a session."""
        return len(self._queue)

    def set_static(self, private: bytes, fallback: bytes | None) -> None:
        """Use a new static key from the next handshake on (rotation); ``fallback`` is the
        previous one while the overlap lasts."""
        self._static_private = private
        self.static_public = X25519PrivateKey.from_private_bytes(private).public_key() \
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.fallback_static = fallback
        self._attempts = 0

    def initiate(self, now: float) -> None:
        """Start a handshake now (first contact or a rekey) unless one is under way."""
        if self.revoked:
            raise LocalProtocolError("session revoked")
        if self._initiator is None:
            self._attempt_started = now
            self._send_initiation(now)

    def send(self, inner: bytes, now: float) -> None:
        """Encrypt ``inner`` to the peer, or queue it (bounded) until a handshake completes."""
        if len(inner) > MAX_INNER_SIZE:
            raise LocalProtocolError(f"inner packet of {len(inner)} bytes > {MAX_INNER_SIZE}")
        if self.revoked:
            self.drops[errors.REVOKED] += 1
            return
        keypair = self._sending_keypair(now)
        if keypair is None:
            if len(self._queue) >= self.timers.max_queued_packets:
                self._queue.popleft()  # the oldest is the least useful (wireguard-go staged)
                self.drops[errors.QUEUE_FULL] += 1
            self._queue.append(inner)
            self.initiate(now)
            return
        self._send_data(keypair, inner, now)
        if self._needs_rekey(keypair, now):
            self.initiate(now)

    def receive(self, datagram: bytes, now: float) -> None:
        """Handle one datagram from the peer; refused ones are counted in :attr:`drops`."""
        try:
            if self.revoked:
                raise RemoteProtocolError(errors.REVOKED)
            message = messages.parse(datagram)
            if isinstance(message, messages.Data):
                self._receive_data(message, now)
            elif isinstance(message, messages.Initiation):
                self._receive_initiation(message, now)
            elif isinstance(message, messages.Response):
                self._receive_response(message, now)
            elif isinstance(message, messages.Finish):
                self._receive_finish(message, now)
            else:
                self._receive_cookie_reply(message)
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1

    def revoke(self) -> None:
        """Tear down at once: forget every key and handshake, drop queued packets."""
        self.index_epoch += 1
        self.revoked = True
        self.current = self.previous = self.next = None
        self._initiator = None
        self._responders.clear()
        self._queue.clear()
        self._retry_at = self._keepalive_at = self._persistent_keepalive_at = None
        self._events.append(SessionRevoked())

    # --- Receiving ------------------------------------------------------------------------

    def _receive_initiation(self, message: messages.Initiation, now: float) -> None:
        self.index_epoch += 1
        local_index = self._new_index()
        responder = ResponderHandshake(self._static_private, local_index, self._check_peer,
                                       message, now)
        while len(self._responders) >= _MAX_RESPONDERS:
            del self._responders[next(iter(self._responders))]
        self._responders[local_index] = responder
        self._datagrams.append(messages.encode_response(responder.response))

    def _receive_response(self, message: messages.Response, now: float) -> None:
        self.index_epoch += 1
        initiator = self._initiator
        if initiator is None or initiator.local_index != message.receiver_index or \
                (self.next is not None and self.next.local_index == initiator.local_index):
            raise RemoteProtocolError(errors.UNKNOWN_INDEX, f"response to {message.receiver_index}")
        finish, keypair = initiator.read_response(message, now)
        self._datagrams.append(messages.encode_finish(finish))
        self.next = keypair  # unconfirmed until data decrypts with it

    def _receive_finish(self, message: messages.Finish, now: float) -> None:
        self.index_epoch += 1
        # Popped before reading: a message 3 is read once, whatever the outcome, so a resent
        # or replayed one is an unknown index (counted), never a second read.
        responder = self._responders.pop(message.receiver_index, None)
        if responder is None:
            raise RemoteProtocolError(errors.UNKNOWN_INDEX, f"finish to {message.receiver_index}")
        self.accept_responder_keypair(responder.read_finish(message, now), now)

    def accept_responder_keypair(self, keypair: Keypair, now: float) -> None:
        """Install the keypair of a handshake this peer started and we answered (the router
        calls this after reading message 3 itself, when it learnt which peer it was)."""
        if self.revoked:
            raise RemoteProtocolError(errors.REVOKED)
        if self._initiator is not None and self._we_win_tie():
            return  # both sides initiated: the smaller static key's handshake wins
        self._initiator = None
        self.next = None
        self._install(keypair, now)
        if not self._flush_queue(keypair, now):
            self._send_data(keypair, b"", now)  # a keepalive confirms the keypair

    def _receive_cookie_reply(self, message: messages.CookieReply) -> None:
        if self._initiator is None or self._initiator.local_index != message.receiver_index:
            raise RemoteProtocolError(errors.BAD_COOKIE, f"for index {message.receiver_index}")
        self._cookie = message.cookie  # used by the next retry, not at once: no amplification

    def _receive_data(self, message: messages.Data, now: float) -> None:
        inner = self._open(message.receiver_index, message.counter, message.ciphertext, now)
        if inner:
            self._events.append(DataReceived(inner))

    def open_data(self, datagram: bytes, now: float) -> bytes:
        """The data fast path: decrypt one data message and return its inner packet
        (empty for a keepalive) instead of queuing a DataReceived event. A refused message
        is counted in :attr:`drops` and gives empty bytes."""
        if len(datagram) < DATA_HEADER_SIZE + AEAD_TAG_SIZE:
            self.drops[errors.SHORT] += 1
            return b""
        kind, receiver, counter = _DATA_HEADER.unpack_from(datagram)
        if kind != MESSAGE_DATA:  # type byte and the three reserved zero bytes
            self.drops[errors.BAD_RESERVED] += 1
            return b""
        try:
            return self._open(receiver, counter, memoryview(datagram)[DATA_HEADER_SIZE:], now)
        except RemoteProtocolError as exc:
            self.drops[exc.reason] += 1
            return b""

    def seal(self, inner: bytes | bytearray | memoryview, now: float) -> bytes | None:
        """The send fast path: the data message for ``inner``, or None when no keypair may
        send (then :meth:`send` queues it and starts a handshake)."""
        if self.revoked:
            return None
        keypair = self._sending_keypair(now)
        if keypair is None:
            return None
        counter, ciphertext = keypair.encrypt(inner)
        self._timers_data_sent(now)
        if self._needs_rekey(keypair, now):
            self.initiate(now)
        return messages.data_header(keypair.remote_index, counter) + ciphertext

    def _open(self, index: int, counter: int, ciphertext: bytes | memoryview,
              now: float) -> bytes:
        keypair = self._keypair_by_index(index)
        if now - keypair.created_at >= self.timers.reject_after_time:
            raise RemoteProtocolError(errors.KEY_EXPIRED, str(index))
        inner = keypair.decrypt(counter, ciphertext)
        if keypair is self.next:
            self.next = None
            self._initiator = None
            # Start the next rekey with the static key that just worked.
            self._attempts = 0 if self._initiator_static == self._static_private else 1
            self._install(keypair, now)
            self._flush_queue(keypair, now)
        if inner:
            self._timers_data_received(now)
        current = self.current
        if current is not None and current.initiator and self._initiator is None and \
                now - current.created_at >= self.timers.reject_after_time - \
                self.timers.keepalive_timeout - self.timers.rekey_timeout:
            self.initiate(now)  # wireguard-go receive.go: rekey before the peer must reject
        return inner

    # --- Keypairs -------------------------------------------------------------------------

    def _keypairs(self) -> Iterator[Keypair]:
        for keypair in (self.current, self.previous, self.next):
            if keypair is not None:
                yield keypair

    def _keypair_by_index(self, index: int) -> Keypair:
        for keypair in self._keypairs():
            if keypair.local_index == index:
                return keypair
        raise RemoteProtocolError(errors.UNKNOWN_INDEX, str(index))

    def _install(self, keypair: Keypair, now: float) -> None:
        """Make ``keypair`` current; the old current keeps decrypting as previous."""
        self.index_epoch += 1
        self.previous = self.current
        self.current = keypair
        self._timers_handshake_complete(now)
        self._events.append(HandshakeCompleted(keypair.local_index, keypair.remote_index,
                                               keypair.initiator))

    def _sending_keypair(self, now: float) -> Keypair | None:
        keypair = self.current
        if keypair is None or now - keypair.created_at >= self.timers.reject_after_time or \
                keypair.send_counter >= self.timers.reject_after_messages:
            return None
        return keypair

    def _needs_rekey(self, keypair: Keypair, now: float) -> bool:
        # wireguard-go send.go: only the initiator rekeys by time, so both do not race.
        return keypair.send_counter >= self.timers.rekey_after_messages or (
            keypair.initiator and now - keypair.created_at >= self.timers.rekey_after_time)

    def _check_peer(self, remote_static: bytes) -> KeyStatus:
        """is_known, and the key must be this session's peer (else a MITM by another peer)."""
        status = self._is_known(remote_static)
        if status == "ok" and remote_static != self.peer_static:
            return "unknown"
        return status

    def _we_win_tie(self) -> bool:
        return self.static_public < self.peer_static

    def local_indexes(self) -> set[int]:
        """Every receiver index this session answers to: keypairs and handshakes."""
        used = {kp.local_index for kp in self._keypairs()} | set(self._responders)
        if self._initiator is not None:
            used.add(self._initiator.local_index)
        return used

    def keypair_indexes(self) -> set[int]:
        """Receiver indexes of the keypairs that may decrypt data (the kernel's list)."""
        return {kp.local_index for kp in self._keypairs()}

    def keypairs(self) -> list[tuple[str, Keypair]]:
        """(slot, keypair) for current, previous and next, those that exist."""
        return [(slot, kp) for slot, kp in (("current", self.current),
                                            ("previous", self.previous), ("next", self.next))
                if kp is not None]

    def _new_index(self) -> int:
        if self._allocate_index is not None:
            return self._allocate_index()
        used = {kp.local_index for kp in self._keypairs()} | set(self._responders)
        if self._initiator is not None:
            used.add(self._initiator.local_index)
        while True:
            index = self._random.getrandbits(32)
            if index not in used:
                return index

    # --- Sending --------------------------------------------------------------------------

    def _send_initiation(self, now: float) -> None:
        self.index_epoch += 1
        static = self._static_private
        if self.fallback_static is not None and self._attempts % 2:
            static = self.fallback_static
        self._attempts += 1
        self._initiator_static = static
        self._initiator = InitiatorHandshake(static, self._new_index(), self._check_peer, now)
        initiation = self._initiator.initiation()
        encoded = messages.encode_initiation(initiation)
        mac_at = len(encoded) - len(initiation.cookie_mac)
        self._datagrams.append(encoded[:mac_at] + messages.cookie_mac(self._cookie,
                                                                      encoded[:mac_at]))
        self._timers_handshake_initiated(now)

    def _send_data(self, keypair: Keypair, inner: bytes, now: float) -> None:
        counter, ciphertext = keypair.encrypt(inner)
        self._datagrams.append(messages.data_header(keypair.remote_index, counter) + ciphertext)
        self._timers_data_sent(now)

    def _flush_queue(self, keypair: Keypair, now: float) -> bool:
        """Send the packets queued before the session existed; whether there were any."""
        sent = bool(self._queue)
        while self._queue:
            self._send_data(keypair, self._queue.popleft(), now)
        return sent

    # --- Timer hooks (wireguard-go device/timers.go) --------------------------------------

    def _timers_handshake_initiated(self, now: float) -> None:
        """Call when an initiation is sent: arm the retry, with jitter."""
        jitter = self._random.random() * self.timers.rekey_timeout_jitter_max
        self._retry_at = now + self.timers.rekey_timeout + jitter

    def _timers_handshake_complete(self, now: float) -> None:
        """Call when a keypair is installed: stop retrying."""
        self._retry_at = None
        self._attempt_started = None
        self._cookie = b""

    def _timers_data_sent(self, now: float) -> None:
        """Call after a data message (keepalives too) is sent: no passive keepalive needed."""
        self._keepalive_at = None
        if self.persistent_keepalive > 0:
            self._persistent_keepalive_at = now + self.persistent_keepalive

    def _timers_data_received(self, now: float) -> None:
        """Call after a non-empty data message authenticated: answer it if we stay silent."""
        if self._keepalive_at is None:
            self._keepalive_at = now + self.timers.keepalive_timeout

    def _expired_rekey_timeout(self, now: float) -> None:
        """Retry the handshake, or give up after REKEY_ATTEMPT_TIME."""
        self.index_epoch += 1
        started = now if self._attempt_started is None else self._attempt_started
        if now - started >= self.timers.rekey_attempt_time:
            dropped = len(self._queue)
            self._queue.clear()
            self._initiator = None
            self.next = None
            self._retry_at = self._attempt_started = None
            self._events.append(HandshakeGaveUp(dropped))
            return
        self._send_initiation(now)

    def _expired_keepalive(self, now: float) -> None:
        """Passive keepalive: we received data and sent nothing for KEEPALIVE_TIMEOUT."""
        self._keepalive_at = None
        keypair = self._sending_keypair(now)
        if keypair is not None:
            self._send_data(keypair, b"", now)

    def _expired_persistent_keepalive(self, now: float) -> None:
        """Persistent keepalive (NAT bindings): nothing sent for the configured interval."""
        self._persistent_keepalive_at = None
        keypair = self._sending_keypair(now)
        if keypair is not None:
            self._send_data(keypair, b"", now)

    def _expired_keypairs(self, now: float) -> None:
        """Forget keypairs older than REJECT_AFTER_TIME."""
        self.index_epoch += 1
        limit = self.timers.reject_after_time
        if self.previous is not None and now - self.previous.created_at >= limit:
            self.previous = None
        if self.next is not None and now - self.next.created_at >= limit:
            self.next = None
        if self.current is not None and now - self.current.created_at >= limit:
            expired, self.current = self.current, None
            self._events.append(SessionExpired(expired.local_index))
