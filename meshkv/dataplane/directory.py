"""Held-at pointers: chunks this member is home for but another member keeps the bytes of.

When a producer cannot push a chunk to its home in time (the push queue is full), it sends
``HELD_AT`` instead, and the home answers lookups with the producer's name. Pointers are hints:
a lookup that follows one to a member that no longer has the chunk is a miss, never wrong KV.

Bounded: the oldest pointers go first past ``max_entries``. Thread-safe. The directory also
carries this member's chain index (`chains`, `meshkv.dataplane.chain_index`): pointers for whole
prompts whose first chunk is homed here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from meshkv.dataplane.chain_index import CHAIN_INDEX_CHUNKS_MAX, ChainIndex

DIRECTORY_MAX_ENTRIES = 1 << 20
"""Pointers kept per member (about 100 MB at most; 1M chunks of 256 tokens is 256M tokens)."""


class HolderDirectory:
    """A bounded LRU map from chunk key to the name of a member that holds it."""

    def __init__(
        self,
        max_entries: int = DIRECTORY_MAX_ENTRIES,
        chain_chunks_max: int = CHAIN_INDEX_CHUNKS_MAX,
    ) -> None:
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self.chains = ChainIndex(chain_chunks_max)

    def record(self, keys: Iterable[bytes], holder: str) -> None:
        with self._lock:
            for key in keys:
                self._entries[key] = holder
                self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def holder_of(self, key: bytes) -> str | None:
        with self._lock:
            return self._entries.get(key)

    def leading_holders(self, keys: Sequence[bytes]) -> list[str]:
        """The holder of each leading key of ``keys``, up to the first key with none (one lock
        for the batch)."""
        holders: list[str] = []
        with self._lock:
            for key in keys:
                holder = self._entries.get(key)
                if holder is None:
                    break
                holders.append(holder)
        return holders

    def forget_holder(self, holder: str) -> int:
        """Drops every pointer to a member that died or left; returns how many."""
        with self._lock:
            stale = [k for k, h in self._entries.items() if h == holder]
            for key in stale:
                del self._entries[key]
            return len(stale)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
