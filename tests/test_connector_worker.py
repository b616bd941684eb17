"""The connector's worker side with real mesh members and real KV caches, no vLLM server.

Two `MeshWorker`s in this process play two engines' rank 0: each runs a real `MeshNode`
(gossip and data plane on 127.0.0.1) and copies blocks of a KV cache allocated by vLLM's own
allocator. The orders they get are the ones the scheduler side writes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CacheConfig, ModelConfig, VllmConfig

from meshkv.config import MeshConfig, load_config
from meshkv.connector.metadata import Fetch, Load, MeshStepOrders, RequestIntro, Save
from meshkv.connector.worker import MeshWorker, WorkerPlace
from tests.conftest import KV_LAYERS, tiny_kv_caches, tiny_model, wait_until
from tests.test_copy_queue import FakeCudaDevice

pytestmark = pytest.mark.processes

BLOCK = 128
CHUNK = 256
NUM_BLOCKS = 16
LAYERS = KV_LAYERS
PLACE = WorkerPlace(tp_rank=0, pp_rank=0, device_type="cpu", layout_name="CPU_ATTN/LBHNC")
WAIT_S = 10.0


@pytest.fixture(scope="module")
def vllm_config() -> VllmConfig:
    return VllmConfig(
        model_config=ModelConfig(model=str(tiny_model()), max_model_len=4096, dtype="bfloat16"),
        cache_config=CacheConfig(block_size=BLOCK),
    )


def kv_caches(seed: int) -> dict[str, torch.Tensor]:
    return tiny_kv_caches(num_blocks=NUM_BLOCKS, block_size=BLOCK, seed=seed)


def mesh_config(name: str, channel: str, seeds: list[str] | None = None) -> MeshConfig:
    return load_config(
        overrides={
            "chunk_size": CHUNK,
            "max_local_cpu_size": 0.05,
            "enable_p2p": True,
            "p2p_host": "127.0.0.1",
            "transfer_channel": channel,
            "mesh_gossip_profile": "test",
            "lookup_timeout_ms": 2000,
            "lmcache_instance_id": name,
            "mesh_seeds": seeds or [],
        }
    )


@pytest.fixture(params=["tcp", pytest.param("nixl", marks=pytest.mark.nixl)])
def pair(request, vllm_config):
    """Two workers in one mesh: ``one`` seeds, ``two`` joins through it."""
    if request.param == "nixl":
        pytest.importorskip("nixl")
    one = MeshWorker(vllm_config, mesh_config("one", request.param))
    one_caches = kv_caches(seed=1)
    one.register(one_caches, num_blocks=NUM_BLOCKS, place=PLACE)
    seed = one.node.gossip_address
    two = MeshWorker(vllm_config, mesh_config("two", request.param, [seed]))
    two_caches = kv_caches(seed=2)
    two.register(two_caches, num_blocks=NUM_BLOCKS, place=PLACE)
    try:
        wait_until(
            "membership", lambda: len(one.node.members()) == 2 == len(two.node.members()), WAIT_S
        )
        yield (one, one_caches), (two, two_caches)
    finally:
        two.close()
        one.close()


def intro(req_id: str, tokens: np.ndarray, salt: str | None = None) -> RequestIntro:
    return RequestIntro(req_id=req_id, token_ids=tokens.astype(np.uint32), cache_salt=salt)


def step(worker: MeshWorker, orders: MeshStepOrders) -> None:
    worker.start_step(orders)
    worker.finish_step(orders)


def report_of(worker: MeshWorker, fetch_id: int) -> int:
    """The count a worker reports for ``fetch_id`` (its fetch runs on the fetch thread)."""
    collected: dict[int, int] = {}

    def arrived() -> bool:
        collected.update(worker.take_report().found.get(0, {}))
        return fetch_id in collected

    wait_until("a fetch report", arrived, WAIT_S)
    return collected[fetch_id]


def found_in_mesh(worker: MeshWorker, req_id: str, num_chunks: int, *, stage: bool) -> int:
    """Ask the way the scheduler side does (a Fetch, then the step report) until the mesh has
    ``num_chunks`` leading chunks: a chunk just saved elsewhere is findable once its push
    reached its home. Returns the last count found."""
    found = 0
    deadline = time.monotonic() + WAIT_S
    for fetch_id in range(1000, 1100):
        fetch = Fetch(
            fetch_id=fetch_id,
            req_id=req_id,
            first_chunk=0,
            num_chunks=num_chunks,
            stage=stage,
            timeout_ms=2000,
        )
        step(worker, MeshStepOrders(fetches=[fetch]))
        found = report_of(worker, fetch_id)
        if found >= num_chunks or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return found


def two_chunks_saved_by_one_staged_at_two(one: MeshWorker, two: MeshWorker, first_token: int):
    """``one`` saves request "a" (2 chunks, from blocks 3, 4, 7, 8); ``two`` stages the same
    prompt as request "b", ready to load."""
    tokens = np.arange(first_token, first_token + 2 * CHUNK)
    step(one, MeshStepOrders(intros=[intro("a", tokens)],
                             saves=[Save(req_id="a", first_chunk=0, num_chunks=2,
                                         block_ids=(3, 4, 7, 8))]))  # fmt: skip
    step(two, MeshStepOrders(intros=[intro("b", tokens)]))
    assert found_in_mesh(two, "b", 2, stage=True) == 2


def test_a_chunk_saved_by_one_engine_is_loaded_by_the_other(pair):
    (one, one_caches), (two, two_caches) = pair
    two_chunks_saved_by_one_staged_at_two(one, two, first_token=100)
    load = Load(req_id="b", first_chunk=0, num_chunks=2, skip_blocks=1, block_ids=(10, 11, 12),
                is_async=False, num_tokens=384, prompt_tokens=512)  # fmt: skip
    step(two, MeshStepOrders(loads=[load], forget=["b"]))
    assert two.take_failed_blocks() == set()
    for name in LAYERS:
        assert torch.equal(two_caches[name][[10, 11, 12]], one_caches[name][[4, 7, 8]])


def test_a_staged_load_copies_from_its_fetch_pins_not_from_a_second_get(pair):
    """vLLM's own cache grew past the first staged chunk: the load takes the second chunk from
    the fetch's lease (no get of its own) and every pin is gone once it is loaded."""
    (one, one_caches), (two, two_caches) = pair
    two_chunks_saved_by_one_staged_at_two(one, two, first_token=700)
    node_get, gets = two.node.get, []
    two.node.get = lambda *args, **kwargs: gets.append(args) or node_get(*args, **kwargs)
    load = Load(req_id="b", first_chunk=1, num_chunks=1, skip_blocks=0, block_ids=(14, 15),
                is_async=False, num_tokens=255, prompt_tokens=512)  # fmt: skip
    step(two, MeshStepOrders(loads=[load], forget=["b"]))
    assert two.take_failed_blocks() == set()
    assert gets == []
    assert two.node.store.stats().pinned == 0
    for name in LAYERS:
        assert torch.equal(two_caches[name][[14, 15]], one_caches[name][[7, 8]])


def test_an_idle_step_reports_the_fetches_it_ordered(pair):
    """A step with no forward waits for its fetches, so the scheduler learns the hit at the
    end of that step rather than spinning empty steps; a step with a forward does not wait."""
    (one, _), (two, _) = pair
    two_chunks_saved_by_one_staged_at_two(one, two, first_token=500)
    two.start_step(MeshStepOrders(unstage=["b"]))
    fetches = [
        Fetch(fetch_id=n, req_id=req_id, first_chunk=0, num_chunks=2, stage=True, timeout_ms=2000)
        for n, req_id in ((1, "b"), (2, "unknown"))
    ]
    orders = MeshStepOrders(fetches=fetches, idle_step=True)
    step(two, orders)
    assert two.take_report().found == {0: {1: 2, 2: 0}}


def test_async_load_reports_when_done_and_a_miss_reports_its_blocks(pair):
    (one, one_caches), (two, two_caches) = pair
    tokens = np.arange(7, 7 + CHUNK)
    step(one, MeshStepOrders(intros=[intro("a", tokens, "salt")],
                             saves=[Save(req_id="a", first_chunk=0, num_chunks=1,
                                         block_ids=(5, 6))]))  # fmt: skip
    step(two, MeshStepOrders(intros=[intro("b", tokens, "salt"), intro("c", tokens, "other")]))
    assert found_in_mesh(two, "b", 1, stage=False) == 1
    hit = Load(req_id="b", first_chunk=0, num_chunks=1, skip_blocks=0, block_ids=(1, 2),
               is_async=True, num_tokens=255, prompt_tokens=256)  # fmt: skip
    miss = Load(req_id="c", first_chunk=0, num_chunks=1, skip_blocks=0, block_ids=(3, 4),
                is_async=True, num_tokens=255, prompt_tokens=256)  # fmt: skip
    step(two, MeshStepOrders(loads=[hit, miss]))
    done: set[str] = set()
    wait_until("both async loads",
               lambda: done.update(two.take_finished_loads() or ()) or done == {"b", "c"},
               WAIT_S)  # fmt: skip
    assert two.take_failed_blocks() == {3, 4}  # another tenant's salt: nothing to load
    for name in LAYERS:
        assert torch.equal(two_caches[name][[1, 2]], one_caches[name][[5, 6]])


def test_a_chunk_that_changes_while_it_is_copied_in_is_reported_not_loaded(pair):
    """A late NIXL write into a leased slot (a holder thawed after its get gave up) can land
    while the chunk is copied into vLLM's blocks. Here the real copier runs, then the slot is
    written under it, as such a write would: the chunk's blocks are reported for recompute."""
    (one, _), (two, _) = pair
    two_chunks_saved_by_one_staged_at_two(one, two, first_token=300)
    copier = two._copies.copier
    scatter_chunk = copier.scatter_chunk
    copies = []

    def scatter_then_late_write(block_ids: list[int], chunk: np.ndarray, skip: int) -> None:
        scatter_chunk(block_ids, chunk, skip)
        copies.append(len(block_ids))
        if len(copies) == 2:  # the second chunk's slot is written under its copy
            chunk[-4096:] ^= 0xFF

    copier.scatter_chunk = scatter_then_late_write
    load = Load(req_id="b", first_chunk=0, num_chunks=2, skip_blocks=0, block_ids=(10, 11, 12, 13),
                is_async=False, num_tokens=511, prompt_tokens=512)  # fmt: skip
    step(two, MeshStepOrders(loads=[load], forget=["b"]))
    assert copies == [2, 2]  # on the CPU: each chunk's blocks, straight from its slot
    assert two.take_failed_blocks() == {12, 13}


def test_on_a_cuda_like_device_loads_and_saves_complete_only_with_their_copy(pair, vllm_config):
    """A worker whose copies run on a stream (the fake of CUDA in test_copy_queue): an async
    load keeps its slots pinned and is not reported finished until its copy's event completed;
    a save reaches the store only then."""
    (one, one_caches), _ = pair
    device = FakeCudaDevice()
    channel = one.node.channel.kind  # the pair's transfer channel
    three = MeshWorker(vllm_config, mesh_config("three", channel, [one.node.gossip_address]))
    three_caches = kv_caches(seed=3)
    three.register(three_caches, num_blocks=NUM_BLOCKS, place=PLACE, device=device)
    try:
        wait_until("membership", lambda: len(three.node.members()) == 3)
        tokens = np.arange(900, 900 + 2 * CHUNK)
        step(one, MeshStepOrders(intros=[intro("a", tokens)],
                                 saves=[Save(req_id="a", first_chunk=0, num_chunks=1,
                                             block_ids=(5, 6))]))  # fmt: skip
        step(three, MeshStepOrders(intros=[intro("b", tokens)]))
        assert found_in_mesh(three, "b", 1, stage=False) == 1
        load = Load(req_id="b", first_chunk=0, num_chunks=1, skip_blocks=0, block_ids=(1, 2),
                    is_async=True, num_tokens=255, prompt_tokens=512)  # fmt: skip
        step(three, MeshStepOrders(loads=[load]))
        wait_until("the load's copy on the copy stream", lambda: three._copies.in_flight)
        assert three.take_finished_loads() is None  # its event has not completed
        assert three.node.store.stats().pinned == 1  # nor is its slot released
        save = Save(req_id="b", first_chunk=1, num_chunks=1, block_ids=(7, 8))
        step(three, MeshStepOrders(saves=[save]))
        assert three.node.store.stats().chunks == 1  # the saved chunk is not in the store yet
        device.complete_all()
        assert three.take_finished_loads() == {"b"}
        assert three.take_failed_blocks() == set()
        wait_until("the saved chunk pushed (a push pins it)", three.node.pusher.idle)
        assert three.node.store.stats().pinned == 0
        assert three.node.store.stats().chunks == 2
        for name in LAYERS:
            assert torch.equal(three_caches[name][[1, 2]], one_caches[name][[5, 6]])
    finally:
        three.close()
