"""Examples of the chunk store rules: refusals, slab classes sharing segments, expiry, checksums."""

from __future__ import annotations

import threading
import time

from meshkv.store import (
    DEFAULT_SEGMENT_BYTES,
    ChunkStore,
    Refusal,
    Slot,
    chunk_checksum,
    segment_bytes_for,
    segment_sizes,
)
from meshkv.store.segments import MAX_SEGMENTS
from meshkv.store.slots import PAGE_BYTES

MIB = 1 << 20


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def put(store: ChunkStore, k: bytes, nbytes: int, fill: int = 7) -> Slot:
    slot = store.reserve(k, nbytes, owner="w", deadline_s=100.0)
    assert isinstance(slot, Slot)
    store.view(slot)[:] = fill
    committed = store.commit(k, store.checksum(slot), owner="w")
    assert committed is not None
    return committed


def test_refusals_say_why() -> None:
    store = ChunkStore.with_budget(2 * MIB, segment_bytes=MIB)
    put(store, key(1), MIB)
    assert store.reserve(key(1), MIB, owner="x", deadline_s=1) is Refusal.PRESENT
    assert isinstance(store.reserve(key(2), MIB, owner="x", deadline_s=1), Slot)
    assert store.reserve(key(2), MIB, owner="y", deadline_s=1) is Refusal.IN_FLIGHT
    store.pin([key(1)], owner="reader", deadline_s=1)
    assert store.reserve(key(3), MIB, owner="y", deadline_s=1) is Refusal.NO_ROOM
    assert store.reserve(key(4), 2 * MIB, owner="y", deadline_s=1) is Refusal.TOO_LARGE


def test_large_budgets_get_larger_segments() -> None:
    assert segment_bytes_for(1 << 30) == DEFAULT_SEGMENT_BYTES
    assert len(segment_sizes(4 << 40)) <= MAX_SEGMENTS
    assert sum(segment_sizes(4 << 40)) == 4 << 40


def test_slots_are_page_aligned_and_sized_by_class() -> None:
    store = ChunkStore.with_budget(4 * MIB, segment_bytes=MIB)
    a = store.reserve(key(1), 100_000, owner="w", deadline_s=1)
    b = store.reserve(key(2), 100_000, owner="w", deadline_s=1)
    assert isinstance(a, Slot) and isinstance(b, Slot)
    assert a.region.segment_id == b.region.segment_id
    assert abs(a.region.offset - b.region.offset) == -(-100_000 // PAGE_BYTES) * PAGE_BYTES
    assert store.view(a).nbytes == 100_000
    assert store.pool.address(a.region) % PAGE_BYTES == 0


def test_lru_evicts_the_least_recently_used_chunk_and_pin_counts_as_use() -> None:
    store = ChunkStore.with_budget(3 * MIB, segment_bytes=3 * MIB)
    for i in range(3):
        put(store, key(i), MIB)
    store.unpin(store.pin([key(0)], owner="r", deadline_s=10), owner="r")  # 0 is now the newest
    put(store, key(3), MIB)
    assert not store.lookup(key(1))
    assert [store.lookup(key(i)) for i in (0, 2, 3)] == [True, True, True]
    assert store.stats().evictions == 1
    assert sorted(store.keys()) == [key(0), key(2), key(3)]


def test_a_new_slot_size_takes_over_the_least_recently_used_segment() -> None:
    store = ChunkStore.with_budget(2 * MIB, segment_bytes=MIB)
    for i in range(4):  # two segments of 512 KiB slots, filled in order
        put(store, key(i), MIB // 2)
    store.pin([key(1)], owner="r", deadline_s=10)  # keeps segment 0 busy
    big = store.reserve(key(9), MIB, owner="w", deadline_s=10)
    assert isinstance(big, Slot)
    assert big.region.segment_id == 1
    assert [store.lookup(key(i)) for i in range(4)] == [True, True, False, False]
    assert store.reserve(key(10), MIB, owner="w", deadline_s=10) is Refusal.NO_ROOM
    assert store.stats().used_bytes <= 2 * MIB


def test_a_full_class_grows_into_another_class_s_stale_segment() -> None:
    store = ChunkStore.with_budget(4 * MIB, segment_bytes=2 * MIB)
    for i in range(4):  # segment 0: four 512 KiB chunks, then left alone
        put(store, key(i), MIB // 2)
    for i in range(10, 12):  # segment 1: two 1 MiB chunks, the class now full
        put(store, key(i), MIB)
    put(store, key(12), MIB)  # takes over segment 0, whose chunks are all older than 10
    assert [store.lookup(key(i)) for i in (10, 11, 12)] == [True, True, True]
    assert not any(store.lookup(key(i)) for i in range(4))
    put(store, key(13), MIB)
    put(store, key(14), MIB)  # no stale segment left: its own oldest chunk goes
    assert [store.lookup(key(i)) for i in (10, 11, 12, 13, 14)] == [False, True, True, True, True]


def test_expired_reservations_and_pins_are_reclaimed() -> None:
    store = ChunkStore.with_budget(MIB, segment_bytes=MIB)
    slot = store.reserve(key(1), MIB, owner="w", deadline_s=5.0)
    assert isinstance(slot, Slot)
    assert store.expire(4.9) == []
    assert [(e.what, e.owner) for e in store.expire(5.0)] == [("reservation", "w")]
    assert store.commit(key(1), b"late", owner="w") is None
    put(store, key(2), MIB)
    pinned = store.pin([key(2)], owner="r", deadline_s=8.0)
    assert store.reserve(key(3), MIB, owner="w", deadline_s=20) is Refusal.NO_ROOM
    assert [(e.what, e.owner) for e in store.expire(8.0)] == [("pin", "r")]
    assert store.unpin(pinned, owner="r") == 0  # the pin is gone already
    assert isinstance(store.reserve(key(3), MIB, owner="w", deadline_s=20), Slot)
    assert store.stats().expired_pins == 1 and store.stats().expired_reservations == 1


def test_unpin_of_a_reused_slot_is_ignored() -> None:
    store = ChunkStore.with_budget(MIB, segment_bytes=MIB)
    old = put(store, key(1), MIB)
    store.pin([key(1)], owner="r", deadline_s=1.0)
    store.expire(1.0)
    put(store, key(2), MIB)  # evicts key 1, reuses its slot
    store.pin([key(2)], owner="r", deadline_s=10.0)
    assert store.unpin([old], owner="r") == 0
    assert store.stats().pinned == 1


def test_checksum_catches_a_flipped_byte() -> None:
    store = ChunkStore.with_budget(MIB, segment_bytes=MIB)
    slot = put(store, key(1), 64 * 1024, fill=3)
    assert chunk_checksum(store.view(slot)) == slot.checksum
    store.view(slot)[1234] ^= 1
    assert chunk_checksum(store.view(slot)) != slot.checksum
    assert len(slot.checksum) == 16


def test_threads_share_one_store() -> None:
    store = ChunkStore.with_budget(4 * MIB, segment_bytes=MIB)
    errors: list[BaseException] = []

    def worker(base: int) -> None:
        try:
            for i in range(300):
                k = key(base + i % 40)
                slot = store.reserve(k, 64 * 1024, owner=f"t{base}", deadline_s=1e9)
                if isinstance(slot, Slot):
                    store.view(slot)[:] = k[-1]
                    store.commit(k, store.checksum(slot), owner=f"t{base}")
                for got in store.pin([k], owner=f"t{base}", deadline_s=1e9):
                    assert (store.view(got) == got.key[-1]).all()
                    store.unpin([got], owner=f"t{base}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(b,)) for b in (0, 20, 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    stats = store.stats()
    assert stats.pinned == 0 and stats.reserved == 0 and stats.used_bytes <= 4 * MIB


def test_held_among_names_committed_keys_only() -> None:
    store = ChunkStore.with_budget(4 * MIB, segment_bytes=MIB)
    put(store, key(1), 4096)
    put(store, key(3), 4096)
    assert isinstance(store.reserve(key(2), 4096, owner="x", deadline_s=100.0), Slot)
    assert store.held_among([key(i) for i in range(5)]) == {key(1), key(3)}


def test_a_reader_waits_for_a_chunk_someone_else_is_writing_here_not_for_its_own() -> None:
    store = ChunkStore.with_budget(MIB, segment_bytes=MIB)
    soon = time.monotonic() + 30
    assert not store.await_arrival(key(1), owner="get", deadline_s=soon)  # nobody writes it
    slot = store.reserve(key(2), 4096, owner="push", deadline_s=soon)
    assert isinstance(slot, Slot)
    writer = threading.Thread(
        target=lambda: store.commit(key(2), chunk_checksum(store.view(slot)), owner="push")
    )
    writer.start()  # commits while the reader waits, or before it looks: both are an arrival
    assert store.await_arrival(key(2), owner="get", deadline_s=soon)
    writer.join()

    assert isinstance(store.reserve(key(3), 4096, owner="get", deadline_s=soon), Slot)
    assert not store.await_arrival(key(3), owner="get", deadline_s=soon)  # its own write
    assert isinstance(store.reserve(key(4), 4096, owner="push", deadline_s=soon), Slot)
    assert not store.await_arrival(key(4), owner="get", deadline_s=time.monotonic() + 0.05)


def test_an_owner_reserving_its_own_open_reservation_again_gets_the_same_slot() -> None:
    store = ChunkStore.with_budget(MIB, segment_bytes=MIB)
    first = store.reserve(key(1), 4096, owner="get", deadline_s=10.0)
    again = store.reserve(key(1), 4096, owner="get", deadline_s=20.0)
    assert isinstance(first, Slot) and isinstance(again, Slot)
    assert again.region == first.region and store.reserved_by(key(1)) == "get"
    assert store.reserve(key(1), 4096, owner="other", deadline_s=20.0) is Refusal.IN_FLIGHT
    assert store.reserve(key(1), 8192, owner="get", deadline_s=20.0) is Refusal.IN_FLIGHT
    assert store.expire(15.0) == []  # the later deadline holds
    assert [e.key for e in store.expire(20.0)] == [key(1)]
