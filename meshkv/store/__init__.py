"""The local chunk store: a byte budget of registered segments, slab slots, LRU, pins."""

from meshkv.store.chunk_store import CHECKSUM_BYTES, ChunkStore, chunk_checksum, chunk_hasher
from meshkv.store.segments import (
    DEFAULT_SEGMENT_BYTES,
    Segment,
    SegmentPool,
    segment_bytes_for,
    segment_sizes,
)
from meshkv.store.slots import Expired, Refusal, Region, Slot, SlotState, SlotTable, StoreStats

__all__ = [
    "CHECKSUM_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "ChunkStore",
    "Expired",
    "Refusal",
    "Region",
    "Segment",
    "SegmentPool",
    "Slot",
    "SlotState",
    "SlotTable",
    "StoreStats",
    "chunk_checksum",
    "chunk_hasher",
    "segment_bytes_for",
    "segment_sizes",
]
