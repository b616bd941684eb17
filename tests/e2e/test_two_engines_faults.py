"""The two engines of conftest under faults: corrupted chunk bytes, a frozen peer, a crash.

Runs after test_two_engines.py (same engines), in this order: the corruption test adds a
storage-only member of its own to the mesh and leaves gracefully; the freeze stops engine one
for a few seconds; the crash kills engine two and starts it again, with the same instance id
and configuration, so the engines are whole again for whatever runs after.

Prompts are chosen (from their chunks' homes on the ring) so that what an engine loads ends on
a multiple of 512 tokens, the engines' prefill step: the rest is then computed in the same steps
as on the cache-less baseline, so answers compare exactly even where this random-weight model's
top two tokens are nearly tied (a load ending elsewhere changes the split, which moves logits
by an ulp; see test_two_engines).

The storage member runs in this process: a `MeshNode` serving every namespace, like
``meshkv join --capacity``. It joins through engine one's gossip port and so becomes the home of
about a third of the prompts (all chunks of a prompt up to 4,096 tokens share one home); the
producer pushes such a prompt's chunks to it, the test flips bytes in one chunk's slot (the
store's own memory), and the consumer then fetches the chunks from it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from meshkv.config import MeshConfig
from meshkv.keys import chunk_keys, root_key
from meshkv.member_meta import ANY_NAMESPACE, ROLE_STORAGE
from meshkv.node import MeshNode
from meshkv.ring.hashring import HashRing
from tests.conftest import wait_until
from tests.e2e.conftest import (
    LOOKUP_TIMEOUT_MS,
    MESH_WAIT_S,
    QUERY_CONFIG,
    START_TIMEOUT_S,
    mesh_agrees,
)
from tests.e2e.test_two_engines import CHUNK, answer, assert_same, prompt, retrieved_since

pytestmark = [pytest.mark.vllm, pytest.mark.processes, pytest.mark.timeout(1500)]

PUSH_WAIT_S = 10.0
"""Longest wait for a producer's chunks to reach their home (pushed in the background)."""


@pytest.fixture
def storage_member(engines, seed_port: int) -> Iterator[MeshNode]:
    """A storage-only member in this process (`meshkv join --capacity`'s member), on every
    namespace's ring; leaves gracefully."""
    config = MeshConfig(
        lmcache_instance_id="e2e-store",
        enable_p2p=True,
        p2p_host="127.0.0.1",
        mesh_gossip_profile="local",
        mesh_seeds=[f"127.0.0.1:{seed_port}"],
        max_local_cpu_size=0.25,
    )
    node = MeshNode(config, namespace=ANY_NAMESPACE, role=ROLE_STORAGE)
    node.start()
    try:
        yield node
    finally:
        node.stop(leave=True)


def flip_bytes(node: MeshNode, key: bytes) -> None:
    """XORs the first bytes of ``key``'s slot in place (twice restores them); the checksum
    recorded at commit is left as it was."""
    owner = "e2e-corruptor"
    slots = node.store.pin([key], owner=owner, deadline_s=time.monotonic() + 10)
    assert len(slots) == 1, "the chunk left the store"
    try:
        node.store.view(slots[0])[:4096] ^= 0xFF
    finally:
        node.store.unpin(slots, owner=owner)


@pytest.mark.parametrize(("producer", "consumer"), [("one", "two"), ("two", "one")])
def test_a_corrupted_chunk_is_never_loaded(
    engines, storage_member: MeshNode, seed_port: int, producer: str, consumer: str
):
    """The consumer fetches a prompt's chunks from the storage member, one of them corrupted
    there: that copy is refused (checksum) whenever it is asked, and the chunk is read from
    another copy (its other replica, or the producer's own through the pointer host:
    `mesh_replicas`), so the whole prompt loads, no request fails and the answer is exact."""
    me = storage_member.name
    wait_until(
        "the engines and the storage member see each other",
        lambda: mesh_agrees(f"127.0.0.1:{seed_port}", {"one/0", "two/0", me}),
        MESH_WAIT_S,
    )
    engine_peer = storage_member.membership.peer(f"{producer}/0")
    assert engine_peer is not None
    ring = storage_member.membership.ring_of(engine_peer.namespace)
    assert me in ring.members
    root = root_key(bytes.fromhex(engine_peer.namespace))
    # A prompt homed here (its chunks share one home: meshkv.keys), whose third chunk is then
    # corrupted: the consumer fetches all three from here, refuses the third and reads it
    # from another copy (768 tokens, one prefill step).
    for seed in range(100, 200):
        tokens = prompt(seed=seed + (0 if producer == "one" else 1000), length=1000)
        keys = chunk_keys(root, np.asarray(tokens[: 3 * CHUNK], dtype=np.uint32), CHUNK)
        if ring.home(keys[0]) == me:
            break
    else:
        pytest.fail(f"no prompt is homed at {me}")
    first_bad = 2

    computed = answer(engines[producer].complete(tokens, max_tokens=8))
    wait_until(
        "the producer's chunks reach this member",
        lambda: all(storage_member.store.lookup(key) for key in keys),
        PUSH_WAIT_S,
        explain=lambda: f"(its data-plane counters: {dict(storage_member.server.stats)})",
    )
    flip_bytes(storage_member, keys[first_bad])
    try:
        offset = engines[consumer].log_size()
        gets_served = storage_member.server.stats["rx_get"]
        loaded = answer(engines[consumer].complete(tokens, max_tokens=8))
        assert retrieved_since(engines[consumer], offset) == [(3 * CHUNK, len(tokens))]
        log = engines[consumer].log_text(offset)
        if storage_member.server.stats["rx_get"] > gets_served:  # it asked the bad copy first
            assert f"chunk {keys[first_bad].hex()} from {me} failed its checksum" in log
        assert "Failing" not in log and "Recovered from KV load failure" not in log
        reference = answer(engines["baseline"].complete(tokens, max_tokens=8))
        assert_same(reference, computed)
        assert_same(reference, loaded)
    finally:
        if storage_member.store.lookup(keys[first_bad]):  # sound again for the hand-off
            flip_bytes(storage_member, keys[first_bad])


def test_a_frozen_peer_costs_a_miss_not_a_hang(engines):
    """Engine one is stopped (SIGSTOP) while two serves a prompt one computed."""
    tokens = prompt(seed=5, length=900)
    engines["one"].complete(tokens, max_tokens=4)
    reference = answer(engines["baseline"].complete(tokens, max_tokens=4))
    fresh = prompt(seed=6, length=900)
    engines["one"].signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        served = answer(engines["two"].complete(fresh, max_tokens=4, timeout_s=60))
        elapsed_s = time.monotonic() - started
        assert_same(answer(engines["baseline"].complete(fresh, max_tokens=4)), served)
        assert elapsed_s < 15, f"a request waited {elapsed_s:.1f} s on a frozen peer"
        again = answer(engines["two"].complete(tokens, max_tokens=4, timeout_s=60))
        assert_same(reference, again)
    finally:
        engines["one"].signal(signal.SIGCONT)


def shares(engines, producer: str, consumer: str, seed: int) -> None:
    """A fresh prompt computed by ``producer`` is loaded whole by ``consumer``, same answer."""
    tokens = prompt(seed=seed, length=700)
    offset = engines[consumer].log_size()
    computed = answer(engines[producer].complete(tokens, max_tokens=8))
    loaded = answer(engines[consumer].complete(tokens, max_tokens=8))
    assert retrieved_since(engines[consumer], offset) == [(2 * CHUNK, len(tokens))]
    assert_same(answer(engines["baseline"].complete(tokens, max_tokens=8)), computed, loaded)


def test_a_killed_engine_costs_a_recompute_and_rejoins_after_a_restart(engines, seed_port):
    """Runs last: engine two is killed (SIGKILL) right after computing a prompt; one serves
    that prompt by recomputing what it cannot find; two, started again, shares again."""
    seed_address = f"127.0.0.1:{seed_port}"
    table = wait_until(
        "both engines see each other",
        lambda: mesh_agrees(seed_address, {"one/0", "two/0"}),
        MESH_WAIT_S,
    )
    old_boot = table["two/0"].nonce
    ring = HashRing(["one/0", "two/0"], QUERY_CONFIG.mesh_vnodes)
    root = root_key(bytes.fromhex(str(table["two/0"].meta["ns"])))
    # A prompt homed at two: one holds none of its chunks once two is gone, asks two until its
    # lookup times out, then computes the whole prompt.
    for seed in range(300, 400):
        tokens = prompt(seed=seed, length=1000)
        first_key = chunk_keys(root, np.asarray(tokens[:CHUNK], dtype=np.uint32), CHUNK)[0]
        if ring.home(first_key) == "two/0":
            break
    else:
        pytest.fail("no prompt has its first chunk homed at two/0")
    reference = answer(engines["baseline"].complete(tokens, max_tokens=8))
    started = time.monotonic()
    engines["one"].complete(prompt(seed=299, length=1000), max_tokens=8)  # computed, no load
    normal_s = time.monotonic() - started

    engines["two"].complete(tokens, max_tokens=8)
    engines["two"].kill()
    started = time.monotonic()
    served = answer(engines["one"].complete(tokens, max_tokens=8, timeout_s=60))
    elapsed_s = time.monotonic() - started
    assert_same(reference, served)
    bound_s = LOOKUP_TIMEOUT_MS / 1000 + 2 * normal_s + 2.0
    assert elapsed_s < bound_s, f"{elapsed_s:.1f} s after a peer died (bound {bound_s:.1f} s)"

    engines["two"].start().wait_ready(START_TIMEOUT_S)
    wait_until(
        "the restarted engine two is back in both member tables",
        lambda: (
            (t := mesh_agrees(seed_address, {"one/0", "two/0"})) and t["two/0"].nonce != old_boot
        ),
        MESH_WAIT_S,
    )
    shares(engines, "one", "two", seed=32)
    shares(engines, "two", "one", seed=33)
