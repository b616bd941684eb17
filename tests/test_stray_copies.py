"""Copies that readers could not find: the producer's before its push runs, copies held away
from their keys' replicas after the ring changed, and a reader's own copies evicted by its get
(issue 17: the chaos harness's misses).

Real nodes in this process (real ZMQ on 127.0.0.1, both channels): a put tells its homes where
its copy is before it queues the bytes, so a reader finds it even when the pusher never runs;
a replica without the bytes answers a get's lookup with that pointer, so the get reaches the
producer without waiting on a dead pointer host; after a membership change a member holding a
copy away from its key's replicas points the replicas at itself, so a reader finds the copy
through the home; and a get that makes room for the chunks it fetches never evicts the chunks it
found here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from meshkv.node import MeshNode
from meshkv.ring.hashring import HashRing
from meshkv.store import Slot, chunk_checksum
from tests.conftest import wait_until
from tests.test_node import CHUNK_BYTES, Mesh, chunk, keys_for
from tests.test_node import mesh as mesh  # the same fixture: both channels

PROMPT_CHUNKS = 4


def prompt_where(fits: Callable[[list[bytes]], bool]) -> list[bytes]:
    """The keys of the first prompt that ``fits``."""
    for salt in range(500):
        keys = keys_for(PROMPT_CHUNKS, salt=f"stray{salt}")
        if fits(keys):
            return keys
    raise AssertionError("no prompt fits")


def placed(ring: HashRing, keys: list[bytes]) -> set[str]:
    """The replica and pointer host of a prompt (``mesh_replicas: 1``: one home group)."""
    return set(ring.preference_list(keys[0], 2))


def read_all(reader: MeshNode, keys: list[bytes]) -> int:
    """How many leading chunks a get brings (each checked against its true bytes)."""
    with reader.get(keys, CHUNK_BYTES) as lease:
        for key, view in zip(keys, lease.views, strict=False):
            assert np.array_equal(view, chunk(key)), "wrong bytes"
        return lease.count


def store_here(member: MeshNode, key: bytes) -> None:
    """Writes ``key``'s chunk into ``member``'s store directly (no push, no pointer)."""
    data = chunk(key)
    slot = member.store.reserve(key, data.nbytes, owner="test", deadline_s=1e12)
    assert isinstance(slot, Slot)
    member.store.view(slot)[:] = data
    assert member.store.commit(key, chunk_checksum(data), owner="test") is not None


def test_a_put_points_its_homes_at_its_copy_before_the_pusher_runs(mesh: Mesh) -> None:
    producer, home, reader = mesh.add("a"), mesh.add("b"), mesh.add("c")
    ring = producer.membership.ring().current
    keys = prompt_where(lambda ks: ring.preference_list(ks[0], 2) == [home.name, reader.name])
    producer.pusher.stop()  # the queued bytes never move: only the put's own pointers can help
    assert producer.put(keys, [chunk(k) for k in keys]) == PROMPT_CHUNKS
    for member in (home, reader):  # the replica, and the pointer host
        wait_until(
            f"{member.name} points at the producer",
            lambda m=member: m.directory.leading_holders(keys) == [producer.name] * len(keys),
        )
    assert home.store.lookup_prefix(keys) == 0
    assert read_all(reader, keys) == PROMPT_CHUNKS


def test_a_replica_without_the_bytes_points_a_get_at_the_producer_while_the_pointer_host_is_dead(
    mesh: Mesh,
) -> None:
    producer, home, reader, host = mesh.add("a"), mesh.add("b"), mesh.add("c"), mesh.add("d")
    ring = producer.membership.ring().current
    keys = prompt_where(lambda ks: ring.preference_list(ks[0], 2) == [home.name, host.name])
    producer.pusher.stop()  # the bytes stay at the producer; the home has only its pointer
    assert producer.put(keys, [chunk(k) for k in keys]) == PROMPT_CHUNKS
    wait_until(
        "the home points at the producer",
        lambda: home.directory.leading_holders(keys) == [producer.name] * len(keys),
    )
    mesh.nodes.remove(host)
    host.stop(leave=False)  # silent from now on; the reader still lists it alive
    with reader.get(keys, CHUNK_BYTES, timeout_s=2.0) as lease:
        # found through the home's pointer (waiting on the pointer host would take it all)
        assert lease.count == PROMPT_CHUNKS


def test_after_a_join_a_copy_away_from_its_replicas_is_found_through_the_home(
    mesh: Mesh,
) -> None:
    holder, reader = mesh.add("a"), mesh.add("c")
    mesh.add("b")
    before = holder.membership.ring().current
    after = before.with_member("d/0")
    # The reader is the home on both rings (so no join points anyone at the copy for it, and
    # no fallback to a previous home finds it); the holder is no replica or pointer host.
    keys = prompt_where(
        lambda ks: (
            before.home(ks[0]) == after.home(ks[0]) == reader.name
            and holder.name not in placed(before, ks) | placed(after, ks)
        )
    )
    mesh.settle()
    for key in keys:  # a copy left by an older placement: no push, no pointer to it
        store_here(holder, key)
    assert read_all(reader, keys) == 0  # its replica and pointer host know nothing of it
    mesh.add("d")  # a membership change: the holder points the new ones at its copy
    wait_until("found through the home", lambda: read_all(reader, keys) == PROMPT_CHUNKS)


def test_a_get_making_room_for_what_it_fetches_keeps_the_chunks_it_found_here(
    mesh: Mesh,
) -> None:
    producer = mesh.add("a")
    reader = mesh.add("c", max_local_cpu_size=PROMPT_CHUNKS * CHUNK_BYTES / (1 << 30))
    ring = mesh.add("b").membership.ring().current
    keys = prompt_where(lambda ks: reader.name not in placed(ring, ks))
    for key in keys[2:]:  # the prompt's tail is here, least recently used ...
        store_here(reader, key)
    for key in keys_for(2, salt="filler"):  # ... then two other chunks fill the store
        store_here(reader, key)
    assert producer.put(keys, [chunk(k) for k in keys]) == PROMPT_CHUNKS
    mesh.settle()
    assert read_all(reader, keys) == PROMPT_CHUNKS  # room made by evicting the fillers
