"""Sliding anti-replay window (RFC 6479, as in wireguard-go ``replay/replay.go``).

The bitmap is a ring of u64 blocks; moving the window forward clears whole blocks instead
of shifting bits (RFC 6479 section 3). ``check`` only looks; ``accept`` marks, and must be
called only after the message decrypted, so a forged counter cannot advance the window.
"""

from __future__ import annotations

from vpnr.tunneld import errors
from vpnr.tunneld.constants import (
    REJECT_AFTER_MESSAGES,
    REPLAY_BLOCK_BITS,
    REPLAY_RING_BLOCKS,
    REPLAY_WINDOW_SIZE,
)
from vpnr.tunneld.errors import RemoteProtocolError

_BLOCK_SHIFT = REPLAY_BLOCK_BITS.bit_length() - 1  # log2(64) = 6
_BIT_MASK = REPLAY_BLOCK_BITS - 1


class ReplayWindow:
    """Which of the last :data:`REPLAY_WINDOW_SIZE` counters have been received."""

    window_size = REPLAY_WINDOW_SIZE

    def __init__(self, limit: int = REJECT_AFTER_MESSAGES) -> None:
        self._limit = limit  # counters at or beyond this are refused
        self._last = 0  # highest counter accepted
        self._blocks = [0] * REPLAY_RING_BLOCKS

    @property
    def last(self) -> int:
        """Highest counter accepted so far (0 before any)."""
        return self._last

    def check(self, counter: int) -> None:
        """Raise RemoteProtocolError unless ``counter`` may be accepted; marks nothing."""
        if counter >= self._limit:
            raise RemoteProtocolError(errors.COUNTER_LIMIT, str(counter))
        if counter + REPLAY_WINDOW_SIZE < self._last:
            raise RemoteProtocolError(errors.TOO_OLD, f"{counter} behind {self._last}")
        if counter > self._last:
            return
        block = (counter >> _BLOCK_SHIFT) % REPLAY_RING_BLOCKS
        if self._blocks[block] >> (counter & _BIT_MASK) & 1:
            raise RemoteProtocolError(errors.REPLAYED, str(counter))

    def accept(self, counter: int) -> None:
        """Mark ``counter`` received; call only after the message authenticated."""
        self.check(counter)
        block_index = counter >> _BLOCK_SHIFT
        if counter > self._last:
            current = self._last >> _BLOCK_SHIFT
            # RFC 6479 section 3: clear the blocks the window moves over, at most the ring.
            for step in range(1, min(block_index - current, REPLAY_RING_BLOCKS) + 1):
                self._blocks[(current + step) % REPLAY_RING_BLOCKS] = 0
            self._last = counter
        ring_index = block_index % REPLAY_RING_BLOCKS
        self._blocks[ring_index] |= 1 << (counter & _BIT_MASK)
