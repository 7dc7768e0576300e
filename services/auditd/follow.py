"""Follow: committed records pushed to streaming clients, each with a bounded queue.

A client that falls ``limit`` records behind is cut off (RESOURCE_EXHAUSTED) with the id of
the last record it was sent; it reconnects with that cursor and catches up from the store,
so a slow client loses nothing and never holds the daemon back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from vpnr.auditd import records as R


class Subscriber:
    """One Follow call's queue."""

    def __init__(self, matches: Callable[[R.Row], bool] | None, limit: int) -> None:
        self.matches = matches
        self.limit = limit
        self.rows: list[R.Row] = []
        self.overflowed = False
        self.ready = asyncio.Event()

    def offer(self, rows: Sequence[R.Row]) -> None:
        """Queue the matching rows, or mark the subscriber cut off when they do not fit."""
        if self.overflowed:
            return
        chosen = rows if self.matches is None else [r for r in rows if self.matches(r)]
        if not chosen:
            return
        if len(self.rows) + len(chosen) > self.limit:
            self.overflowed = True
            self.rows.clear()
        else:
            self.rows.extend(chosen)
        self.ready.set()

    def take(self) -> list[R.Row]:
        """Everything queued, emptying the queue."""
        rows, self.rows = self.rows, []
        self.ready.clear()
        return rows


class FollowHub:
    """The set of live Follow calls."""

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.cut_off = 0

    def subscribe(self, matches: Callable[[R.Row], bool] | None, limit: int) -> Subscriber:
        """Start receiving committed rows."""
        sub = Subscriber(matches, limit)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Stop receiving."""
        self.subscribers.discard(sub)
        if sub.overflowed:
            self.cut_off += 1

    def publish(self, rows: Sequence[R.Row]) -> None:
        """Hand committed rows to every subscriber."""
        for sub in self.subscribers:
            sub.offer(rows)
