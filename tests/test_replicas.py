"""Replicas that work, with real member processes: a frozen or dead holder costs one hedge.

Three storage members (`meshkv join --capacity`) hold the chunks a producer in this process put
and then handed off by leaving gracefully. A fresh reader in this process then reads while one
of them is frozen (SIGSTOP) and then killed: with ``mesh_replicas: 2`` every chunk is still
served, each get well inside its deadline, never a wrong byte. And a storage member that leaves
gracefully while it is the only holder hands its chunks to their next homes first.
"""

from __future__ import annotations

import hashlib
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshkv.config import MeshConfig
from meshkv.node import MeshNode
from meshkv.ring.hashring import HashRing
from tests.conftest import wait_until
from tests.test_node import NAMESPACE, keys_for, make_config
from tests.test_node_faults import Holder

pytestmark = pytest.mark.processes
SECRET = "replicas-test-secret-0123456789"
CHUNK_BYTES = 256 << 10
PROMPT_CHUNKS = 4  # one home group: one primary home per prompt
GETS_PER_FAULT = 50  # frozen, then killed: 100 gets (issue 17: p50/p99 over >= 50 gets)
DEADLINE_S = 1.0
STORAGE = 3
START_S = 60  # a member process importing meshkv on a busy 2-core host


def content(key: bytes) -> np.ndarray:
    """A chunk's bytes: a pure function of its whole key."""
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return np.random.default_rng(seed).integers(0, 256, CHUNK_BYTES, dtype=np.uint8)


def config_for(name: str, seeds: list[str], replicas: int) -> MeshConfig:
    # 256 MiB: the producer keeps every prompt (100 MiB) until its pushes are done
    return make_config("tcp", seeds, lmcache_instance_id=name, max_local_cpu_size=0.25,
                       mesh_replicas=replicas, mesh_secret=SECRET,
                       mesh_transfer_timeout_ms=int(DEADLINE_S * 1000))  # fmt: skip


def start_storage(tmp: Path, replicas: int) -> list[Holder]:
    members: list[Holder] = []
    for i in range(STORAGE):
        seeds = f"mesh_seeds: ['{members[0].address}']\n" if members else ""
        extra = f"mesh_replicas: {replicas}\nmesh_secret: {SECRET}\n{seeds}"
        member = Holder(tmp, "tcp", member_id=f"store{i}", extra_yaml=extra)
        member.start()
        members.append(member)
    return members


@pytest.fixture
def storage_2(tmp_path: Path) -> Iterator[list[Holder]]:
    yield from _running(start_storage(tmp_path, replicas=2))


@pytest.fixture
def storage_1(tmp_path: Path) -> Iterator[list[Holder]]:
    yield from _running(start_storage(tmp_path, replicas=1))


def _running(members: list[Holder]) -> Iterator[list[Holder]]:
    try:
        yield members
    finally:
        for member in members:
            if member.proc is not None and member.proc.poll() is None:
                member.signal(signal.SIGCONT)
            member.stop()


def joined(name: str, storage: list[Holder], replicas: int) -> MeshNode:
    """An engine member of NAMESPACE that sees every running storage member alive."""
    node = MeshNode(config_for(name, [storage[0].address], replicas), namespace=NAMESPACE)
    node.start()
    for member in storage:
        if member.proc is not None and member.proc.poll() is None:
            wait_until(f"{member.name} alive at {name}",
                       lambda m=member: node.membership.is_alive(m.name), START_S)  # fmt: skip
    return node


def prompts_homed(ring: HashRing, count: int, *, first: str, replicas: int) -> list[list[bytes]]:
    """``count`` prompts whose preference list on ``ring`` starts with ``first`` and holds
    storage members only (not the reader)."""
    found: list[list[bytes]] = []
    for salt in range(100 * count):
        keys = keys_for(PROMPT_CHUNKS, salt=f"prompt-{salt}")
        names = ring.preference_list(keys[0], replicas)
        if names[0] == first and all(n.startswith("store") for n in names):
            found.append(keys)
            if len(found) == count:
                return found
    raise AssertionError("not enough prompts homed there")


def produce_and_leave(storage: list[Holder], prompts: list[list[bytes]], replicas: int) -> None:
    """A producer puts every prompt, waits for its pushes, and leaves (handing off the rest)."""
    producer = joined("producer", storage, replicas)
    for keys in prompts:
        assert producer.put(keys, [content(k) for k in keys]) == len(keys)
    wait_until("the producer's pushes done", producer.pusher.idle, 60)
    producer.stop()


def timed_get(reader: MeshNode, keys: list[bytes]) -> tuple[int, float]:
    """One get: (chunks served, seconds); asserts every served byte is right."""
    started = time.monotonic()
    with reader.get(keys, CHUNK_BYTES, timeout_s=DEADLINE_S) as lease:
        elapsed = time.monotonic() - started
        for key, view in zip(keys, lease.views, strict=False):
            assert np.array_equal(view, content(key)), "a get returned wrong bytes"
        return lease.count, elapsed


def fresh_reader(
    storage: list[Holder], target: Holder, count: int
) -> tuple[MeshNode, list[list[bytes]]]:
    """``count`` prompts homed first at ``target``, put with two replicas by a producer that
    then left; a reader that sees every chunk placed and holds none (its lookups move no
    bytes). The caller stops the reader."""
    ring = HashRing([m.name for m in storage] + ["reader/0"])
    prompts = prompts_homed(ring, count, first=target.name, replicas=2)
    produce_and_leave(storage, prompts, replicas=2)
    reader = joined("reader", storage, replicas=2)
    try:
        wait_until("the producer gone from the reader's ring",
                   lambda: set(reader.membership.ring().current.members) == set(ring.members),
                   START_S)  # fmt: skip
        for keys in prompts:
            wait_until("every chunk placed", lambda k=keys: reader.lookup(k) == PROMPT_CHUNKS, 10)
        assert reader.store.stats().chunks == 0
    except BaseException:
        reader.stop(leave=False)
        raise
    return reader, prompts


def test_a_frozen_then_killed_primary_costs_one_hedge_with_two_replicas(
    storage_2: list[Holder],
) -> None:
    target = storage_2[2]
    reader, prompts = fresh_reader(storage_2, target, 2 * GETS_PER_FAULT)
    try:
        results: dict[str, list[tuple[int, float]]] = {}
        target.signal(signal.SIGSTOP)
        results["frozen"] = [timed_get(reader, keys) for keys in prompts[:GETS_PER_FAULT]]
        target.signal(signal.SIGKILL)
        assert target.proc is not None
        target.proc.wait(10)
        results["killed"] = [timed_get(reader, keys) for keys in prompts[GETS_PER_FAULT:]]
    finally:
        reader.stop(leave=False)
    for phase, gets in results.items():
        times_ms = sorted(1000 * elapsed for _, elapsed in gets)
        p99_ms = times_ms[min(len(times_ms) - 1, int(0.99 * len(times_ms)))]
        print(f"{phase}: {len(gets)} gets, p50 {statistics.median(times_ms):.1f} ms, "
              f"p99 {p99_ms:.1f} ms, max {times_ms[-1]:.1f} ms")  # fmt: skip
    served = [count for gets in results.values() for count, _ in gets]
    assert served == [PROMPT_CHUNKS] * len(prompts), "every chunk must be served"
    slowest_s = max(elapsed for gets in results.values() for _, elapsed in gets)
    assert slowest_s <= DEADLINE_S / 2, f"a get took {slowest_s:.3f} s: more than one hedge"


def test_a_lookup_whose_first_home_is_frozen_costs_one_hedge_then_none(
    storage_2: list[Holder],
) -> None:
    """A lookup asks its first home alone first (`meshkv.node.hedged_calls`): silent for
    the hedge delay, that home is avoided and the next replica answers; later lookups ask the
    avoided home last, so they cost no hedge at all."""
    target = storage_2[1]
    reader, prompts = fresh_reader(storage_2, target, 8)
    try:
        hedge = reader.gets.readers.hedge
        assert not hedge.is_avoided(target.name)
        target.signal(signal.SIGSTOP)
        timed: list[tuple[int, float]] = []
        for keys in prompts:
            started = time.monotonic()
            timed.append((reader.lookup(keys, timeout_s=DEADLINE_S), time.monotonic() - started))
        assert hedge.is_avoided(target.name), "the frozen home was not avoided"
    finally:
        reader.stop(leave=False)
    assert [hits for hits, _ in timed] == [PROMPT_CHUNKS] * len(prompts), timed
    assert timed[0][1] <= DEADLINE_S / 2, f"the first lookup took {timed[0][1]:.3f} s"
    later_s = statistics.median(elapsed for _, elapsed in timed[1:])
    assert later_s < timed[0][1], f"later lookups (median {later_s:.3f} s) still waited"


def test_a_member_leaving_gracefully_hands_its_chunks_to_their_next_homes(
    storage_1: list[Holder],
) -> None:
    storage, leaving = storage_1, storage_1[1]
    ring = HashRing([m.name for m in storage] + ["reader/0"])
    after = ring.without_member(leaving.name)
    prompts = [
        keys
        for keys in prompts_homed(ring, 40, first=leaving.name, replicas=1)
        if after.home(keys[0]).startswith("store")
    ][:20]
    produce_and_leave(storage, prompts, replicas=1)  # now the leaving member is the only holder
    stats = leaving.leave()  # SIGTERM: a graceful leave
    assert stats.get("push.pushed", 0) >= len(prompts) * PROMPT_CHUNKS, stats
    reader = joined("reader", [m for m in storage if m is not leaving], replicas=1)
    try:
        wait_until("the leaver gone from the reader's ring",
                   lambda: set(reader.membership.ring().current.members) == set(after.members),
                   START_S)  # fmt: skip
        for keys in prompts:
            count, _ = timed_get(reader, keys)
            assert count == PROMPT_CHUNKS, "a chunk was lost when its only holder left"
    finally:
        reader.stop(leave=False)


def test_with_one_replica_a_frozen_home_falls_back_to_the_producers_pointer(
    storage_1: list[Holder],
) -> None:
    storage, target = storage_1, storage_1[0]
    ring = HashRing([m.name for m in storage] + ["producer/0", "reader/0"])
    prompts = prompts_homed(ring, 10, first=target.name, replicas=2)  # pointer host: storage
    producer = joined("producer", storage, replicas=1)  # it stays, and keeps its copies
    reader = joined("reader", storage, replicas=1)
    try:
        for keys in prompts:
            assert producer.put(keys, [content(k) for k in keys]) == len(keys)
        wait_until("the producer's pushes done", producer.pusher.idle, 60)
        assert producer.pusher.stats["pointed"] >= len(prompts) * PROMPT_CHUNKS
        wait_until("one ring", lambda: set(reader.membership.ring().current.members)
                   == set(ring.members), START_S)  # fmt: skip
        target.signal(signal.SIGSTOP)
        gets = [timed_get(reader, keys) for keys in prompts]
    finally:
        reader.stop(leave=False)
        producer.stop(leave=False)
    assert [count for count, _ in gets] == [PROMPT_CHUNKS] * len(prompts)
    slowest_s = max(elapsed for _, elapsed in gets)
    assert slowest_s <= DEADLINE_S / 2, f"a get took {slowest_s:.3f} s"
