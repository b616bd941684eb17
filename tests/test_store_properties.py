"""Property tests of the chunk store against a small model (hypothesis state machines).

Each run drives a real `ChunkStore` (real memory) with random reserves, writes, commits, aborts,
pins, unpins and clock steps, and checks after every step: the budget is never exceeded, a pinned
or reserved slot is never evicted or handed out twice, bytes of pinned chunks are intact, expired
pins and reservations are reclaimed, and (with one slot size) eviction takes the least recently
used unpinned chunk.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from meshkv.store import ChunkStore, Refusal, Slot, chunk_checksum, segment_sizes
from meshkv.store.slots import PAGE_BYTES

KEYS = [bytes([i]) * 16 for i in range(24)]
OWNERS = ["a", "b", "c"]


def fill_byte(key: bytes) -> int:
    return key[0] + 1


class StoreMachine(RuleBasedStateMachine):
    """Random operations on a store; the model says what must be true after each."""

    chunk_pages: tuple[int, ...] = (1,)

    @initialize(segments=st.integers(1, 4), pages_per_segment=st.integers(3, 6))
    def start(self, segments: int, pages_per_segment: int) -> None:
        segment_bytes = pages_per_segment * PAGE_BYTES
        self.budget = segments * segment_bytes
        self.store = ChunkStore.with_budget(self.budget, segment_bytes=segment_bytes)
        self.now = 0.0
        self.reserved: dict[bytes, tuple[str, float, Slot]] = {}
        self.ready: dict[bytes, int] = {}  # key -> chunk size
        self.lru: list[bytes] = []  # READY keys, least recently used first
        self.pins: dict[bytes, list[tuple[str, float, Slot]]] = {}

    # -- helpers -------------------------------------------------------------------------------

    def _use(self, key: bytes) -> None:
        if key in self.lru:
            self.lru.remove(key)
        self.lru.append(key)

    def _evictable_in_order(self) -> list[bytes]:
        return [k for k in self.lru if not self.pins.get(k)]

    def _forget_evicted(self) -> list[bytes]:
        gone = [k for k in self.ready if not self.store.lookup(k)]
        for key in gone:
            assert not self.pins.get(key), "a pinned chunk was evicted"
            del self.ready[key]
            self.lru.remove(key)
        return gone

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        key=st.sampled_from(KEYS),
        owner=st.sampled_from(OWNERS),
        pages=st.data(),
        ttl=st.floats(1, 10),
        partial=st.integers(0, PAGE_BYTES - 1),
    )
    def reserve(
        self, key: bytes, owner: str, pages: st.DataObject, ttl: float, partial: int
    ) -> None:
        nbytes = pages.draw(st.sampled_from(self.chunk_pages)) * PAGE_BYTES - partial
        evictable_before = self._evictable_in_order()
        got = self.store.reserve(key, nbytes, owner=owner, deadline_s=self.now + ttl)
        gone = self._forget_evicted()
        if key in self.ready:
            assert got is Refusal.PRESENT
        elif key in self.reserved:
            held_by, held_until, held = self.reserved[key]
            if held_by != owner or held.region.nbytes != nbytes:
                assert got is Refusal.IN_FLIGHT
            else:  # its own open reservation: the same slot, the later deadline
                assert not isinstance(got, Refusal) and got.region == held.region
                self.reserved[key] = (owner, max(held_until, self.now + ttl), held)
        elif isinstance(got, Refusal):
            assert got is Refusal.NO_ROOM
        else:
            assert got.key == key and got.region.nbytes == nbytes
            self.store.view(got)[:] = fill_byte(key)
            self.reserved[key] = (owner, self.now + ttl, got)
        if len(self.chunk_pages) == 1:
            assert len(gone) <= 1
            if gone:
                assert gone == evictable_before[:1], "eviction skipped the LRU chunk"

    @rule(data=st.data())
    @precondition(lambda self: self.reserved)
    def commit(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.reserved)))
        owner, _, slot = self.reserved.pop(key)
        committed = self.store.commit(key, self.store.checksum(slot), owner=owner)
        assert committed is not None and committed.checksum == chunk_checksum(self.store.view(slot))
        self.ready[key] = slot.region.nbytes
        self._use(key)

    @rule(data=st.data(), wrong_owner=st.booleans())
    @precondition(lambda self: self.reserved)
    def abort(self, data: st.DataObject, wrong_owner: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.reserved)))
        owner = self.reserved[key][0]
        if wrong_owner:
            assert not self.store.abort(key, owner=owner + "-other")
            assert self.store.commit(key, b"x", owner=owner + "-other") is None
            return
        assert self.store.abort(key, owner=owner)
        del self.reserved[key]

    @rule(start=st.integers(0, len(KEYS) - 1), owner=st.sampled_from(OWNERS), ttl=st.floats(1, 10))
    def pin(self, start: int, owner: str, ttl: float) -> None:
        keys = KEYS[start : start + 4]
        slots = self.store.pin(keys, owner=owner, deadline_s=self.now + ttl)
        expected = 0
        while expected < len(keys) and keys[expected] in self.ready:
            expected += 1
        assert [s.key for s in slots] == keys[:expected]
        for slot in slots:
            self.pins.setdefault(slot.key, []).append((owner, self.now + ttl, slot))
            self._use(slot.key)

    @rule(data=st.data())
    @precondition(lambda self: any(self.pins.values()))
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, v in self.pins.items() if v)))
        owner, _, slot = self.pins[key].pop(0)
        assert self.store.unpin([slot], owner=owner) == 1
        if not self.pins[key]:
            self._use(key)

    @rule(step=st.floats(0.5, 6))
    def advance_clock(self, step: float) -> None:
        self.now += step
        expired = self.store.expire(self.now)
        expected = {
            ("reservation", o, k) for k, (o, d, _) in self.reserved.items() if d <= self.now
        }
        expected_pins = [
            ("pin", o, k) for k, pins in self.pins.items() for (o, d, _) in pins if d <= self.now
        ]
        got = [(e.what, e.owner, e.key) for e in expired]
        assert {g for g in got if g[0] == "reservation"} == expected
        assert sorted(g for g in got if g[0] == "pin") == sorted(expected_pins)
        for _, owner, key in expected:
            slot = self.reserved.pop(key)[2]
            assert self.store.commit(key, b"late", owner=owner) is None
            assert self.store.reserve(key, slot.region.nbytes, owner="z", deadline_s=0) is not (
                Refusal.IN_FLIGHT
            )
            self.store.abort(key, owner="z")
            self._forget_evicted()
        for key in list(self.pins):
            left = [p for p in self.pins[key] if p[1] > self.now]
            if self.pins[key] and not left:
                self._use(key)
            self.pins[key] = left

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def within_budget(self) -> None:
        stats = self.store.stats()
        assert stats.used_bytes <= stats.budget_bytes <= self.budget
        assert stats.chunks == len(self.ready)
        assert stats.reserved == len(self.reserved)
        assert stats.pinned == sum(1 for v in self.pins.values() if v)
        assert stats.chunk_bytes == sum(self.ready.values())

    @invariant()
    def held_slots_are_disjoint_and_intact(self) -> None:
        held = [s for _, _, s in self.reserved.values()]
        held += [pins[0][2] for pins in self.pins.values() if pins]
        spans = sorted((s.region.segment_id, s.region.offset, s.region.nbytes) for s in held)
        for (seg_a, off_a, n_a), (seg_b, off_b, _) in itertools.pairwise(spans):
            assert seg_a != seg_b or off_a + n_a <= off_b, "two held slots overlap"
        for slot in held:
            assert (self.store.view(slot) == fill_byte(slot.key)).all(), "held bytes changed"

    @invariant()
    def pinned_chunks_stay_present(self) -> None:
        for key, pins in self.pins.items():
            if pins:
                assert self.store.lookup(key)


class MixedSizeStoreMachine(StoreMachine):
    """Three slot sizes share the segments: whole segments move between slab classes."""

    chunk_pages = (1, 2, 3)


TestStore = StoreMachine.TestCase
TestStore.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
TestMixedSizeStore = MixedSizeStoreMachine.TestCase
TestMixedSizeStore.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)


def test_segment_sizes_never_exceed_the_budget() -> None:
    assert segment_sizes(10 * PAGE_BYTES + 5, 4 * PAGE_BYTES) == [4 * PAGE_BYTES] * 2 + [
        2 * PAGE_BYTES
    ]
    assert sum(segment_sizes(3 << 30)) == 3 << 30
