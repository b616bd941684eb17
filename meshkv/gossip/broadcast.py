"""The queue of member updates waiting to be piggybacked: least-sent first, bounded.

Each queued update is keyed by the member it is about, so a newer update about a member replaces
the older one (and starts over at zero sends). Packets take the least-sent updates first (newest
first among equals) until the packet's byte budget or item bound is reached; an update is
dropped once it has been sent `retransmit_limit` times. When the queue is full, the oldest of
the most-sent updates is dropped to make room.

Buckets by send count are deques (newest at the right); a replaced update is only marked stale
and skipped when reached, so every operation is O(1) per update handled.

This module knows nothing of messages' meaning, members or the network.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

# A packet stops looking for updates that fit after this many did not, or when less room is
# left than the smallest update takes.
_MAX_MISSES = 4
_MIN_UPDATE_BYTES = 24
_STALE_SLACK = 16  # replaced entries tolerated beyond the live ones before a compaction


def retransmit_limit(retransmit_mult: float, n_members: int) -> int:
    """How many times each member sends an update: ``ceil(lambda * ln(N + 1))``.

    Every member that learns an update sends it this many times to random members, so a given
    member is missed by all N * limit sends with probability about e^-limit: with lambda = 3,
    about 1e-4 of updates miss anyone at all in a mesh of 64 (anti-entropy repairs those).
    """
    return math.ceil(retransmit_mult * math.log(n_members + 1))


class _Queued:
    __slots__ = ("item", "key", "sent", "size_bytes", "stale")

    def __init__(self, key: str, item: Any, size_bytes: int) -> None:
        self.key = key
        self.item = item
        self.size_bytes = size_bytes
        self.sent = 0
        self.stale = False


class BroadcastQueue:
    """Updates keyed by member name, bucketed by how often each has been sent."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.dropped_full = 0
        self._buckets: list[deque[_Queued]] = [deque()]  # index = times sent
        self._by_key: dict[str, _Queued] = {}
        self._stale = 0  # replaced entries still sitting in a bucket

    def __len__(self) -> int:
        return len(self._by_key)

    def put(self, key: str, item: Any, size_bytes: int) -> None:
        """Queues ``item`` about ``key``, replacing any queued update about the same key."""
        old = self._by_key.pop(key, None)
        if old is not None:
            old.stale = True
            self._stale += 1
            if self._stale > len(self._by_key) + _STALE_SLACK:
                self._compact()
        elif len(self._by_key) >= self.max_entries:
            self._evict_most_sent()
        entry = _Queued(key, item, size_bytes)
        self._by_key[key] = entry
        self._buckets[0].append(entry)

    def take(self, budget_bytes: int, max_items: int, limit: int) -> list[Any]:
        """Up to ``max_items`` updates whose sizes fit ``budget_bytes``, least-sent first.

        Each one taken counts as sent once; updates sent ``limit`` times leave the queue.
        """
        picked: list[_Queued] = []
        skipped: list[tuple[int, _Queued]] = []
        remaining = budget_bytes
        wanted = max_items
        misses = 0
        buckets = self._buckets
        for sent, bucket in enumerate(buckets):
            if wanted <= 0 or misses >= _MAX_MISSES:
                break
            if sent >= limit:
                self._drop_bucket(bucket)
                continue
            pop = bucket.pop
            while bucket and wanted > 0:
                entry = pop()
                if entry.stale:
                    self._stale -= 1
                elif entry.size_bytes <= remaining:
                    picked.append(entry)
                    remaining -= entry.size_bytes
                    wanted -= 1
                else:
                    skipped.append((sent, entry))
                    misses += 1
                    if misses >= _MAX_MISSES or remaining < _MIN_UPDATE_BYTES:
                        misses = _MAX_MISSES
                        break
        for sent, entry in reversed(skipped):  # back where they were, in order
            buckets[sent].append(entry)
        by_key = self._by_key
        for entry in reversed(picked):  # oldest first, so that the newest stays rightmost
            sent = entry.sent = entry.sent + 1
            if sent >= limit:
                del by_key[entry.key]
            elif sent < len(buckets):
                buckets[sent].append(entry)
            else:
                buckets.append(deque((entry,)))
        return [entry.item for entry in picked]

    def _drop_bucket(self, bucket: deque[_Queued]) -> None:
        while bucket:
            entry = bucket.pop()
            if entry.stale:
                self._stale -= 1
            else:
                del self._by_key[entry.key]

    def _evict_most_sent(self) -> None:
        for bucket in reversed(self._buckets):
            while bucket:
                entry = bucket.popleft()
                if entry.stale:
                    self._stale -= 1
                    continue
                del self._by_key[entry.key]
                self.dropped_full += 1
                return

    def _compact(self) -> None:
        """Removes replaced entries, so that stale ones never outnumber live ones."""
        for index, bucket in enumerate(self._buckets):
            self._buckets[index] = deque(entry for entry in bucket if not entry.stale)
        self._stale = 0
