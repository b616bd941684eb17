"""The queue of member updates waiting to be piggybacked: least-sent first, bounded.

Each queued update is keyed by the member it is about, so a newer update about a member replaces
the older one (and starts over at zero sends). Packets take the least-sent updates first (newest
first among equals) until the packet's byte budget or item bound is reached; an update is
dropped once it has been sent `retransmit_limit` times. When the queue is full, the most-sent
update is dropped to make room.

This module knows nothing of messages' meaning, members or the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# A packet stops looking for updates that fit after this many per wanted item did not.
_SCAN_PER_ITEM = 4


def retransmit_limit(retransmit_mult: int, n_members: int) -> int:
    """How many times an update is sent: ``lambda * ceil(log10(N + 1))``."""
    return retransmit_mult * math.ceil(math.log10(n_members + 1))


@dataclass(slots=True)
class _Queued:
    key: str
    item: Any
    size_bytes: int


class BroadcastQueue:
    """Updates keyed by member name, bucketed by how often each has been sent."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._buckets: list[dict[str, _Queued]] = [{}]  # index = times sent
        self._sent_of: dict[str, int] = {}
        self.dropped_full = 0

    def __len__(self) -> int:
        return len(self._sent_of)

    def put(self, key: str, item: Any, size_bytes: int) -> None:
        """Queues ``item`` about ``key``, replacing any queued update about the same key."""
        sent = self._sent_of.pop(key, None)
        if sent is not None:
            del self._buckets[sent][key]
        elif len(self._sent_of) >= self.max_entries:
            self._evict_most_sent()
        self._buckets[0][key] = _Queued(key, item, size_bytes)
        self._sent_of[key] = 0

    def take(self, budget_bytes: int, max_items: int, limit: int) -> list[Any]:
        """Up to ``max_items`` updates whose sizes fit ``budget_bytes``, least-sent first.

        Each one taken counts as sent once; updates sent ``limit`` times leave the queue.
        """
        picked: list[tuple[int, _Queued]] = []
        remaining = budget_bytes
        misses_left = _SCAN_PER_ITEM * max(max_items, 1)
        for sent, bucket in enumerate(self._buckets):
            if len(picked) >= max_items or misses_left <= 0:
                break
            if sent >= limit:
                self._drop_bucket(sent)
                continue
            for entry in reversed(bucket.values()):
                if entry.size_bytes > remaining:
                    misses_left -= 1
                    if misses_left <= 0:
                        break
                    continue
                picked.append((sent, entry))
                remaining -= entry.size_bytes
                if len(picked) >= max_items:
                    break
        for sent, entry in picked:
            del self._buckets[sent][entry.key]
            if sent + 1 >= limit:
                del self._sent_of[entry.key]
                continue
            if sent + 1 == len(self._buckets):
                self._buckets.append({})
            self._buckets[sent + 1][entry.key] = entry
            self._sent_of[entry.key] = sent + 1
        return [entry.item for _, entry in picked]

    def _drop_bucket(self, sent: int) -> None:
        for key in self._buckets[sent]:
            del self._sent_of[key]
        self._buckets[sent] = {}

    def _evict_most_sent(self) -> None:
        for bucket in reversed(self._buckets):
            if bucket:
                key = next(iter(bucket))
                del bucket[key]
                del self._sent_of[key]
                self.dropped_full += 1
                return
