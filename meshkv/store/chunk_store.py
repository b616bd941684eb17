"""The local chunk store: slot bookkeeping over a segment pool, safe to share between threads.

`ChunkStore` is what the data-plane service and the vLLM worker use. Writing a chunk:

    slot = store.reserve(key, nbytes, owner=o, deadline_s=d)   # a Slot, or a Refusal
    store.view(slot)[:] = chunk_bytes                          # or a peer WRITEs slot.region
    store.commit(key, chunk_checksum(store.view(slot)), owner=o)

Reading: ``slots = store.pin(keys, owner=o, deadline_s=d)`` pins the leading present chunks; read
``store.view(s)`` or push ``s.region`` to a peer, then ``store.unpin(slots, owner=o)``.

Deadlines and ``now_s`` are on ``time.monotonic()``. Someone (the service loop) must call
``expire(time.monotonic())`` regularly: that is what frees the pins and reservations of owners
that died or gave up. An owner must stop touching a slot's bytes by its deadline; after that the
slot may be handed to another writer (``view`` does not check, it only addresses memory).

One lock guards the bookkeeping; it is held for dictionary work only, never while bytes are
copied or hashed. This module knows nothing of peers, transfers or vLLM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import numpy as np
import xxhash

from meshkv.store.segments import SegmentPool, segment_sizes
from meshkv.store.slots import Expired, Refusal, Slot, SlotTable, StoreStats

CHECKSUM_BYTES = 16


def chunk_checksum(data: np.ndarray | memoryview | bytes) -> bytes:
    """XXH3-128 of a chunk's bytes (every member must use the same function: it is on the wire).

    It catches torn, misplaced and corrupted transfers; it is not a defence against a member
    that lies (frame authentication is). Every fetched chunk is hashed before use, so its speed
    bounds a get's throughput: on 4 MiB here, XXH3-128 runs at ~37 GiB/s from cache and ~7 GiB/s
    from memory, against 6.2 and 4.4 GiB/s for MurmurHash3 x64-128 (and 0.55 GB/s for BLAKE2b).
    """
    return xxhash.xxh3_128_digest(data)


def chunk_hasher() -> xxhash.xxh3_128:
    """`chunk_checksum` taken in pieces: ``update`` with the chunk's bytes in order, then
    ``digest``; the result is the same, so a reader can check pieces as they land."""
    return xxhash.xxh3_128()


class ChunkStore:
    """Slots for chunks over one `SegmentPool`, with LRU eviction, pins and reservations."""

    def __init__(self, pool: SegmentPool) -> None:
        self.pool = pool
        self._table = SlotTable([s.nbytes for s in pool.segments])
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # a reservation committed or ended

    @classmethod
    def with_budget(
        cls,
        budget_bytes: int,
        *,
        segment_bytes: int | None = None,
        populate: bool = False,
    ) -> ChunkStore:
        """A store of ``budget_bytes`` (e.g. ``int(max_local_cpu_size * 2**30)``).

        Segments are `DEFAULT_SEGMENT_BYTES` unless given (or unless the budget needs larger
        ones); a chunk larger than a segment is refused (`Refusal.TOO_LARGE`).
        """
        return cls(SegmentPool(segment_sizes(budget_bytes, segment_bytes), populate=populate))

    def reserve(self, key: bytes, nbytes: int, *, owner: str, deadline_s: float) -> Slot | Refusal:
        """A RESERVED slot of ``nbytes`` for ``owner`` to fill before ``deadline_s``.

        Evicts least recently used unpinned chunks to make room. Returns a `Refusal` when the
        key is present already (PRESENT), being written by someone else (IN_FLIGHT), when
        everything evictable is pinned or reserved (NO_ROOM), or when no segment is large
        enough (TOO_LARGE).
        """
        with self._lock:
            return self._table.reserve(key, nbytes, owner=owner, deadline_s=deadline_s)

    def view(self, slot: Slot) -> np.ndarray:
        """The slot's ``region.nbytes`` bytes as a writable uint8 array (no copy, no lock)."""
        return self.pool.view(slot.region)

    def commit(self, key: bytes, checksum: bytes, *, owner: str) -> Slot | None:
        """Makes ``owner``'s reservation of ``key`` READY with its checksum.

        Returns the committed slot, or None if ``owner`` no longer holds the reservation (it
        expired or was aborted): the bytes written are then not published.
        """
        with self._lock:
            self._settled.notify_all()
            return self._table.commit(key, checksum, owner=owner)

    def abort(self, key: bytes, *, owner: str) -> bool:
        """Frees ``owner``'s reservation of ``key``; False if it held none."""
        with self._lock:
            self._settled.notify_all()
            return self._table.abort(key, owner=owner)

    def await_arrival(self, key: bytes, *, owner: str, deadline_s: float) -> bool:
        """True once a committed copy of ``key`` is here: at once if it is; else, while someone
        other than ``owner`` is writing it into this store (a push from its producer, a read
        repair, another reader's fetch), after that write commits, waiting until ``deadline_s``
        at most. False if it is absent and nobody else is writing it, or not committed in time.
        """
        with self._settled:
            while not self._table.lookup(key):
                writer = self._table.reserved_by(key)
                left_s = deadline_s - time.monotonic()
                if writer is None or writer == owner or left_s <= 0:
                    return False
                self._settled.wait(left_s)
            return True

    def reserved_by(self, key: bytes) -> str | None:
        """Who is writing ``key`` into this store now (its reservation's owner), or None."""
        with self._lock:
            return self._table.reserved_by(key)

    def lookup(self, key: bytes) -> bool:
        """True if a committed copy of ``key`` is here."""
        with self._lock:
            return self._table.lookup(key)

    def held_among(self, keys: Iterable[bytes]) -> set[bytes]:
        """Which of ``keys`` have a committed copy here (one lock for the batch)."""
        with self._lock:
            return self._table.held_among(keys)

    def lookup_prefix(self, keys: Iterable[bytes]) -> int:
        """How many leading ``keys`` are here, stopping at the first miss."""
        with self._lock:
            return self._table.lookup_prefix(keys)

    def keys(self) -> list[bytes]:
        """Every committed key (a snapshot)."""
        with self._lock:
            return self._table.keys()

    def pin(self, keys: Iterable[bytes], *, owner: str, deadline_s: float) -> list[Slot]:
        """Pins the leading committed ``keys`` until unpinned or ``deadline_s``; counts as use."""
        with self._lock:
            return self._table.pin(keys, owner=owner, deadline_s=deadline_s)

    def unpin(self, slots: Iterable[Slot], *, owner: str) -> int:
        """Drops one of ``owner``'s pins from each slot; returns how many were dropped."""
        with self._lock:
            return self._table.unpin(slots, owner=owner)

    def expire(self, now_s: float) -> list[Expired]:
        """Reclaims pins and reservations whose deadline is at or before ``now_s``."""
        with self._lock:
            self._settled.notify_all()
            return self._table.expire(now_s)

    def stats(self) -> StoreStats:
        with self._lock:
            return self._table.stats()

    def checksum(self, slot: Slot) -> bytes:
        """The checksum of the slot's current bytes (hashes outside the lock)."""
        return chunk_checksum(self.view(slot))
