"""Sans-I/O bookkeeping of the chunk store: slab classes, slots, LRU, reservations and pins.

The store's memory is a fixed set of segments (sizes given once, summing to at most the byte
budget). A segment is handed to one slab class at a time and carved into equal slots of that
class's size (a chunk's size rounded up to a page); a segment whose slots are all free goes back
to whichever class needs room next. Every slot is in one of three states:

    FREE ──reserve──▶ RESERVED ──commit──▶ READY ──evict──▶ FREE
                          └─abort / reservation expired─▶ FREE

A RESERVED slot is being written by its owner and is invisible to lookups. A READY slot holds
one committed chunk and its checksum; it sits in its class's LRU list unless pinned. A pinned
slot is never evicted or reused; each pin (and each reservation) has an owner and a deadline,
and `SlotTable.expire` reclaims the ones whose deadline passed. Pinning a chunk counts as a use.

This module owns the numbers only: no memory, no locks, no clock (callers pass ``now_s`` and
deadlines on one monotonic clock of their choice), no knowledge of peers or transfers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from meshkv.errors import UsageError

PAGE_BYTES = 4096
"""Slot sizes are multiples of this, so every slot starts page-aligned in its segment."""


class SlotState(Enum):
    FREE = "free"
    RESERVED = "reserved"
    READY = "ready"


class Refusal(Enum):
    """Why `SlotTable.reserve` gave no slot."""

    PRESENT = "present"  # a committed copy of the key is here already
    IN_FLIGHT = "in_flight"  # another owner holds a reservation for the key
    NO_ROOM = "no_room"  # every slot that could hold it is reserved or pinned
    TOO_LARGE = "too_large"  # larger than any segment: the store needs larger segments


@dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    """A byte range inside one registered segment (local or a peer's)."""

    segment_id: int
    offset: int
    nbytes: int

    def __post_init__(self) -> None:
        if self.segment_id < 0 or self.offset < 0 or self.nbytes <= 0:
            raise UsageError(f"bad region {self.segment_id}:{self.offset}+{self.nbytes}")

    def part(self, offset: int, nbytes: int) -> Region:
        """Its bytes [offset, offset + nbytes); UsageError unless they lie inside it."""
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.nbytes:
            raise UsageError(f"bytes {offset}+{nbytes} are not inside a {self.nbytes}-byte region")
        return Region(segment_id=self.segment_id, offset=self.offset + offset, nbytes=nbytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class Slot:
    """A snapshot of one slot as handed to a caller (immutable; the table keeps the truth).

    ``generation`` changes every time the slot is freed, so a snapshot of a slot that has since
    been reused is recognised as stale. ``checksum`` is empty while the slot is RESERVED.
    """

    slot_id: int
    generation: int
    key: bytes
    region: Region
    checksum: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Expired:
    """A pin or reservation that `SlotTable.expire` reclaimed because its deadline passed."""

    what: str  # "pin" or "reservation"
    owner: str
    key: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStats:
    budget_bytes: int  # sum of all segment sizes
    used_bytes: int  # slot bytes of RESERVED and READY slots
    chunk_bytes: int  # payload bytes of READY chunks
    chunks: int  # READY slots
    reserved: int  # RESERVED slots
    pinned: int  # READY slots with at least one pin
    segments_in_use: int  # segments carved for some slab class
    evictions: int  # READY chunks dropped to make room
    expired_pins: int
    expired_reservations: int


@dataclass(slots=True)
class _Pin:
    owner: str
    deadline_s: float


@dataclass(slots=True)
class _SlotRecord:
    slot_id: int
    segment_id: int
    offset: int
    slot_bytes: int
    state: SlotState = SlotState.FREE
    generation: int = 0
    key: bytes = b""
    nbytes: int = 0
    checksum: bytes = b""
    owner: str = ""  # the reservation's owner (RESERVED only)
    deadline_s: float = 0.0  # the reservation's deadline (RESERVED only)
    pins: list[_Pin] = field(default_factory=list)
    last_use: int = 0

    def snapshot(self) -> Slot:
        region = Region(segment_id=self.segment_id, offset=self.offset, nbytes=self.nbytes)
        return Slot(
            slot_id=self.slot_id,
            generation=self.generation,
            key=self.key,
            region=region,
            checksum=self.checksum,
        )


@dataclass(slots=True)
class _SlabClass:
    slot_bytes: int
    segments: set[int] = field(default_factory=set)
    free: dict[int, None] = field(default_factory=dict)  # FREE slot ids (an ordered set)
    lru: OrderedDict[int, None] = field(
        default_factory=OrderedDict
    )  # READY, unpinned; oldest first


def slot_bytes_for(nbytes: int) -> int:
    """The slab class (slot size) that holds a chunk of ``nbytes``."""
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


class SlotTable:
    """Slots, slab classes, LRU, reservations and pins over a fixed list of segment sizes."""

    def __init__(self, segment_sizes: Sequence[int]) -> None:
        if any(size < PAGE_BYTES or size % PAGE_BYTES for size in segment_sizes):
            raise UsageError("segment sizes must be positive multiples of PAGE_BYTES")
        self._segment_bytes = list(segment_sizes)
        self._unassigned: set[int] = set(range(len(segment_sizes)))
        self._segment_class: dict[int, int] = {}  # segment -> slot_bytes of its class
        self._segment_slots: dict[int, list[int]] = {}
        self._segment_live: dict[int, int] = {}  # non-FREE slots per carved segment
        self._segment_busy: dict[int, int] = {}  # RESERVED or pinned slots per carved segment
        self._segment_newest: dict[int, int] = {}  # latest use of a slot in the segment
        self._classes: dict[int, _SlabClass] = {}
        self._records: dict[int, _SlotRecord] = {}
        self._index: dict[bytes, int] = {}  # key -> READY slot
        self._reserved: dict[bytes, int] = {}  # key -> RESERVED slot
        self._pinned: set[int] = set()
        self._idle: set[int] = set()  # carved segments whose slots are all FREE
        self._used_bytes = 0
        self._chunk_bytes = 0
        self._next_slot_id = 0
        self._tick = 0
        self._evictions = 0
        self._expired_pins = 0
        self._expired_reservations = 0

    # -- queries -------------------------------------------------------------------------------

    def lookup(self, key: bytes) -> bool:
        """True if a committed copy of ``key`` is here (does not count as a use)."""
        return key in self._index

    def held_among(self, keys: Iterable[bytes]) -> set[bytes]:
        """Which of ``keys`` have a committed copy here (one set intersection, in C)."""
        return self._index.keys() & keys

    def lookup_prefix(self, keys: Iterable[bytes]) -> int:
        """How many leading ``keys`` are here, stopping at the first miss."""
        count = 0
        for key in keys:
            if key not in self._index:
                break
            count += 1
        return count

    def reserved_by(self, key: bytes) -> str | None:
        """The owner of the reservation of ``key`` being written here, or None."""
        slot_id = self._reserved.get(key)
        return None if slot_id is None else self._records[slot_id].owner

    def keys(self) -> list[bytes]:
        """Every committed key, in no particular order."""
        return list(self._index)

    def stats(self) -> StoreStats:
        return StoreStats(
            budget_bytes=sum(self._segment_bytes),
            used_bytes=self._used_bytes,
            chunk_bytes=self._chunk_bytes,
            chunks=len(self._index),
            reserved=len(self._reserved),
            pinned=len(self._pinned),
            segments_in_use=len(self._segment_class),
            evictions=self._evictions,
            expired_pins=self._expired_pins,
            expired_reservations=self._expired_reservations,
        )

    # -- writing a chunk -----------------------------------------------------------------------

    def reserve(self, key: bytes, nbytes: int, *, owner: str, deadline_s: float) -> Slot | Refusal:
        """A slot for ``owner`` to write ``key`` into until ``deadline_s``, or why there is none.

        Makes room by evicting least recently used unpinned chunks (of this size first, then
        whole segments of other sizes). An owner that reserves a key it holds a reservation of
        already gets the same slot again (its deadline the later of the two): a reader that
        asks another holder after one went silent keeps the slot the silent one may still
        write into.
        """
        if not key or nbytes <= 0:
            raise UsageError("reserve needs a non-empty key and a positive size")
        if key in self._index:
            return Refusal.PRESENT
        if key in self._reserved:
            held = self._records[self._reserved[key]]
            if held.owner != owner or held.nbytes != nbytes:
                return Refusal.IN_FLIGHT
            held.deadline_s = max(held.deadline_s, deadline_s)
            return held.snapshot()
        slot_bytes = slot_bytes_for(nbytes)
        if slot_bytes > max(self._segment_bytes, default=0):
            return Refusal.TOO_LARGE
        slot_id = self._take_free_slot(slot_bytes)
        if slot_id is None:
            return Refusal.NO_ROOM
        rec = self._records[slot_id]
        rec.state, rec.key, rec.nbytes, rec.checksum = SlotState.RESERVED, key, nbytes, b""
        rec.owner, rec.deadline_s = owner, deadline_s
        self._reserved[key] = slot_id
        self._segment_live[rec.segment_id] += 1
        self._segment_busy[rec.segment_id] += 1
        self._idle.discard(rec.segment_id)
        self._used_bytes += rec.slot_bytes
        return rec.snapshot()

    def commit(self, key: bytes, checksum: bytes, *, owner: str) -> Slot | None:
        """Publishes ``owner``'s reservation of ``key`` as READY; None if it no longer holds one."""
        rec = self._reservation(key, owner)
        if rec is None:
            return None
        del self._reserved[key]
        rec.state, rec.checksum, rec.owner = SlotState.READY, checksum, ""
        self._index[key] = rec.slot_id
        self._chunk_bytes += rec.nbytes
        self._segment_busy[rec.segment_id] -= 1
        self._touch(rec)
        self._classes[rec.slot_bytes].lru[rec.slot_id] = None
        return rec.snapshot()

    def abort(self, key: bytes, *, owner: str) -> bool:
        """Frees ``owner``'s reservation of ``key``; False if it no longer holds one."""
        rec = self._reservation(key, owner)
        if rec is None:
            return False
        del self._reserved[key]
        self._segment_busy[rec.segment_id] -= 1
        self._free(rec)
        return True

    # -- reading a chunk -----------------------------------------------------------------------

    def pin(self, keys: Iterable[bytes], *, owner: str, deadline_s: float) -> list[Slot]:
        """Pins the leading committed ``keys`` (stopping at the first miss) and returns them."""
        pinned = []
        for key in keys:
            slot_id = self._index.get(key)
            if slot_id is None:
                break
            rec = self._records[slot_id]
            if not rec.pins:
                del self._classes[rec.slot_bytes].lru[slot_id]
                self._pinned.add(slot_id)
                self._segment_busy[rec.segment_id] += 1
            rec.pins.append(_Pin(owner, deadline_s))
            self._touch(rec)
            pinned.append(rec.snapshot())
        return pinned

    def unpin(self, slots: Iterable[Slot], *, owner: str) -> int:
        """Drops one of ``owner``'s pins from each slot; returns how many pins were dropped.

        A slot whose pin already expired (or that was reused since) is skipped silently.
        """
        dropped = 0
        for slot in slots:
            rec = self._records.get(slot.slot_id)
            if rec is None or rec.generation != slot.generation or rec.state is not SlotState.READY:
                continue
            for i, pin in enumerate(rec.pins):
                if pin.owner == owner:
                    del rec.pins[i]
                    dropped += 1
                    break
            if not rec.pins and rec.slot_id in self._pinned:
                self._release_pins(rec)
        return dropped

    # -- time ----------------------------------------------------------------------------------

    def expire(self, now_s: float) -> list[Expired]:
        """Reclaims every pin and reservation whose deadline is at or before ``now_s``."""
        expired = []
        for slot_id in list(self._pinned):
            rec = self._records[slot_id]
            kept = [p for p in rec.pins if p.deadline_s > now_s]
            for pin in rec.pins:
                if pin.deadline_s <= now_s:
                    expired.append(Expired(what="pin", owner=pin.owner, key=rec.key))
            rec.pins = kept
            if not kept:
                self._release_pins(rec)
        for key, slot_id in list(self._reserved.items()):
            rec = self._records[slot_id]
            if rec.deadline_s <= now_s:
                expired.append(Expired(what="reservation", owner=rec.owner, key=key))
                self.abort(key, owner=rec.owner)
        self._expired_pins += sum(1 for e in expired if e.what == "pin")
        self._expired_reservations += sum(1 for e in expired if e.what == "reservation")
        return expired

    # -- internals -----------------------------------------------------------------------------

    def _reservation(self, key: bytes, owner: str) -> _SlotRecord | None:
        slot_id = self._reserved.get(key)
        if slot_id is None or self._records[slot_id].owner != owner:
            return None
        return self._records[slot_id]

    def _touch(self, rec: _SlotRecord) -> None:
        self._tick += 1
        rec.last_use = self._segment_newest[rec.segment_id] = self._tick

    def _release_pins(self, rec: _SlotRecord) -> None:
        """The last pin is gone: the chunk becomes the most recently used evictable one."""
        self._pinned.discard(rec.slot_id)
        self._segment_busy[rec.segment_id] -= 1
        self._classes[rec.slot_bytes].lru[rec.slot_id] = None

    def _free(self, rec: _SlotRecord) -> None:
        if rec.state is SlotState.READY:
            self._chunk_bytes -= rec.nbytes
        self._used_bytes -= rec.slot_bytes
        rec.state, rec.key, rec.nbytes, rec.checksum, rec.owner = SlotState.FREE, b"", 0, b"", ""
        rec.pins.clear()
        rec.generation += 1
        self._segment_live[rec.segment_id] -= 1
        if not self._segment_live[rec.segment_id]:
            self._idle.add(rec.segment_id)
        self._classes[rec.slot_bytes].free[rec.slot_id] = None

    def _evict(self, rec: _SlotRecord) -> None:
        del self._classes[rec.slot_bytes].lru[rec.slot_id]
        del self._index[rec.key]
        self._evictions += 1
        self._free(rec)

    def _take_free_slot(self, slot_bytes: int) -> int | None:
        """A FREE slot of this class, making room in the cheapest way that works."""
        cls = self._classes.get(slot_bytes)
        if cls is None:
            cls = self._classes[slot_bytes] = _SlabClass(slot_bytes)
        if not cls.free:
            segment = self._idle_segment(slot_bytes)
            if segment is not None:
                self._carve(segment, cls)
            elif cls.lru:  # a whole segment of older data elsewhere, else our own oldest chunk
                victim = self._records[next(iter(cls.lru))]
                segment = self._reclaim_segment(slot_bytes, older_than=victim.last_use)
                if segment is None:
                    self._evict(victim)
                else:
                    self._carve(segment, cls)
            else:
                segment = self._reclaim_segment(slot_bytes)
                if segment is None:
                    if not cls.segments:
                        del self._classes[slot_bytes]
                    return None
                self._carve(segment, cls)
        slot_id, _ = cls.free.popitem()
        return slot_id

    def _idle_segment(self, slot_bytes: int) -> int | None:
        """A segment holding no data that fits this class: never carved, or all slots FREE."""
        fitting = [s for s in self._unassigned if self._segment_bytes[s] >= slot_bytes]
        if fitting:
            segment = min(fitting)
            self._unassigned.discard(segment)
            return segment
        for segment in self._idle:
            if (
                self._segment_class[segment] != slot_bytes
                and self._segment_bytes[segment] >= slot_bytes
            ):
                break
        else:
            return None
        self._uncarve(segment)
        self._unassigned.discard(segment)
        return segment

    def _reclaim_segment(self, slot_bytes: int, older_than: int | None = None) -> int | None:
        """Empties a segment of another class with nothing reserved or pinned (fewest chunks,
        then least recently used), evicting its chunks; None if there is no such segment.
        With ``older_than``, only a segment whose every chunk was last used before that tick
        qualifies: a class that is full grows into stale memory rather than evict its own
        newer chunks, so no size class keeps memory the others need more (LRU across classes).
        """
        best: tuple[int, int, int] | None = None
        for segment, busy in self._segment_busy.items():
            if busy or self._segment_class[segment] == slot_bytes:
                continue
            if self._segment_bytes[segment] < slot_bytes:
                continue
            newest = self._segment_newest[segment]
            if older_than is not None and newest >= older_than:
                continue
            rank = (self._segment_live[segment], newest, segment)
            if best is None or rank < best:
                best = rank
        if best is None:
            return None
        segment = best[2]
        for slot_id in self._segment_slots[segment]:
            rec = self._records[slot_id]
            if rec.state is SlotState.READY:
                self._evict(rec)
        self._uncarve(segment)
        self._unassigned.discard(segment)
        return segment

    def _carve(self, segment: int, cls: _SlabClass) -> None:
        count = self._segment_bytes[segment] // cls.slot_bytes
        ids = list(range(self._next_slot_id, self._next_slot_id + count))
        self._next_slot_id += count
        for i, slot_id in reversed(list(enumerate(ids))):  # popitem() takes offset 0 first
            self._records[slot_id] = _SlotRecord(
                slot_id=slot_id,
                segment_id=segment,
                offset=i * cls.slot_bytes,
                slot_bytes=cls.slot_bytes,
            )
            cls.free[slot_id] = None
        cls.segments.add(segment)
        self._segment_class[segment] = cls.slot_bytes
        self._segment_slots[segment] = ids
        self._segment_live[segment] = 0
        self._segment_busy[segment] = 0
        self._segment_newest[segment] = 0
        self._idle.add(segment)

    def _uncarve(self, segment: int) -> None:
        """Returns a segment whose slots are all FREE to the unassigned set."""
        cls = self._classes[self._segment_class.pop(segment)]
        for slot_id in self._segment_slots.pop(segment):
            del cls.free[slot_id]
            del self._records[slot_id]
        del self._segment_live[segment], self._segment_busy[segment]
        del self._segment_newest[segment]
        self._idle.discard(segment)
        cls.segments.discard(segment)
        if not cls.segments:
            del self._classes[cls.slot_bytes]
        self._unassigned.add(segment)
