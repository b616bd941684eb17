"""The connector's scheduler side inside vLLM's real v1 Scheduler.

Each test builds vLLM's `Scheduler` for the tiny Llama with ``MeshKVConnector`` selected by name
(through the plugin registration), adds requests, and plays the workers' part by hand: it reads
each step's `MeshStepOrders` and answers the fetches with a `MeshWorkerReport`, the way worker
processes do. What is checked is what vLLM then does: when it schedules, how many tokens it
computes, which blocks it asks the workers to load and save.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.config import (
    CacheConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from meshkv.connector import plugin
from meshkv.connector.metadata import MeshStepOrders, MeshWorkerReport
from tests import conftest
from tests.conftest import KV_LAYERS, kv_cache_config

BLOCK = 128
CHUNK = 256
NUM_BLOCKS = 64
LAYERS = KV_LAYERS


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return conftest.tiny_model()


class Engine:
    """vLLM's scheduler with MeshKVConnector; `step` plays the workers for one step."""

    def __init__(
        self,
        model: Path,
        *,
        role: str = "kv_both",
        extra: dict | None = None,
        max_batched_tokens: int = 2048,
    ) -> None:
        plugin.register()
        config = VllmConfig(
            model_config=ModelConfig(
                model=str(model), max_model_len=4096, dtype="bfloat16", enforce_eager=True
            ),
            cache_config=CacheConfig(block_size=BLOCK),
            scheduler_config=SchedulerConfig(
                max_num_batched_tokens=max_batched_tokens,
                max_num_seqs=8,
                max_model_len=4096,
                is_encoder_decoder=False,
            ),
            kv_transfer_config=KVTransferConfig(
                kv_connector="MeshKVConnector",
                kv_role=role,
                kv_connector_extra_config=extra or {},
            ),
        )
        config.cache_config.num_gpu_blocks = NUM_BLOCKS
        cache = kv_cache_config(num_blocks=NUM_BLOCKS, block_size=BLOCK)
        self.scheduler = Scheduler(config, cache, StructuredOutputManager(config), BLOCK)
        hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._block_hasher = get_request_block_hasher(BLOCK, hash_fn)
        self.orders: list[MeshStepOrders] = []

    @property
    def mesh(self):
        return self.scheduler.connector._scheduler

    def add(self, req_id: str, prompt: list[int], *, cache_salt: str | None = None) -> Request:
        request = Request(
            req_id,
            prompt,
            SamplingParams(max_tokens=3),
            None,
            cache_salt=cache_salt,
            block_hasher=self._block_hasher,
        )
        self.scheduler.add_request(request)
        return request

    def step(
        self, found: dict[int, int] | None = None, *, finished_recving: frozenset = frozenset()
    ) -> tuple[SchedulerOutput, MeshStepOrders]:
        """One step; ``found`` maps rank -> chunks found, answered to every fetch of the step."""
        out = self.scheduler.schedule()
        orders = out.kv_connector_metadata
        assert isinstance(orders, MeshStepOrders)
        self.orders.append(orders)
        report = None
        if found is not None and orders.fetches:
            report = MeshWorkerReport(
                found={rank: {f.fetch_id: n for f in orders.fetches} for rank, n in found.items()}
            )
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            request = self.scheduler.requests[req_id]
            sampled.append([11] if request.num_computed_tokens >= request.num_tokens else [])
        self.scheduler.update_from_output(
            out,
            ModelRunnerOutput(
                req_ids=req_ids,
                req_id_to_index={r: i for i, r in enumerate(req_ids)},
                sampled_token_ids=sampled,
                kv_connector_output=KVConnectorOutput(
                    kv_connector_worker_meta=report,
                    finished_recving=set(finished_recving) or None,
                ),
            ),
        )
        return out, orders


def prompt(n: int, start: int = 5) -> list[int]:
    return [start + i % 4000 for i in range(n)]


def test_a_hit_waits_for_the_lookup_then_loads_the_chunks(tiny_model):
    engine = Engine(tiny_model)
    engine.add("a", prompt(600), cache_salt="tenant-1")

    out, orders = engine.step({0: 2})
    assert out.num_scheduled_tokens == {}  # None: waiting for the lookup
    (intro,) = orders.intros
    assert intro.req_id == "a" and intro.cache_salt == "tenant-1"
    assert intro.token_ids.tolist() == prompt(512)
    (fetch,) = orders.fetches
    assert (fetch.first_chunk, fetch.num_chunks, fetch.stage) == (0, 2, True)

    assert orders.idle_step  # no forward: the workers may wait for the fetch in this step
    out, orders = engine.step()
    assert out.num_scheduled_tokens == {"a": 600 - 512}
    assert not orders.idle_step
    (load,) = orders.loads
    blocks = engine.scheduler.kv_cache_manager.get_block_ids("a")[0]
    assert (load.first_chunk, load.num_chunks, load.skip_blocks) == (0, 2, 0)
    assert load.block_ids == tuple(blocks[:4])
    assert (load.is_async, load.num_tokens, load.prompt_tokens) == (False, 512, 600)
    assert out.has_sync_kv_loads
    assert not orders.saves  # both chunks are in the mesh already


def test_a_whole_prompt_hit_leaves_one_token_to_compute(tiny_model):
    engine = Engine(tiny_model)
    engine.add("a", prompt(512))
    engine.step({0: 2})
    out, orders = engine.step()
    assert out.num_scheduled_tokens == {"a": 1}
    (load,) = orders.loads
    assert (load.num_chunks, load.num_tokens, len(load.block_ids)) == (2, 511, 4)


def test_a_miss_unstages_and_saves_each_chunk_as_chunked_prefill_completes_it(tiny_model):
    engine = Engine(tiny_model, max_batched_tokens=300)
    engine.add("a", prompt(700))
    engine.step({0: 0})
    saved = []
    for _ in range(3):
        _, orders = engine.step()
        saved += [(s.first_chunk, s.num_chunks, s.block_ids) for s in orders.saves]
        assert not orders.loads
    assert engine.orders[1].unstage == ["a"]
    blocks = engine.scheduler.kv_cache_manager.get_block_ids("a")[0]
    # 300 tokens -> chunk 0; 600 -> chunk 1; 700 -> no further full chunk
    assert saved == [(0, 1, tuple(blocks[0:2])), (1, 1, tuple(blocks[2:4]))]


def test_the_hit_is_the_minimum_over_tensor_parallel_ranks(tiny_model):
    engine = Engine(tiny_model)
    engine.mesh.policy.world_size = 2
    engine.add("a", prompt(800))
    out, orders = engine.step({0: 3})
    assert out.num_scheduled_tokens == {}
    out, _ = engine.step()  # rank 1 has not answered yet
    assert out.num_scheduled_tokens == {}
    fetch_id = orders.fetches[0].fetch_id
    engine.mesh.reported(MeshWorkerReport(found={1: {fetch_id: 1}}))
    out, orders = engine.step()
    assert out.num_scheduled_tokens == {"a": 800 - 256}
    assert orders.loads[0].num_chunks == 1
    assert [(s.first_chunk, s.num_chunks) for s in orders.saves] == [(1, 2)]


@pytest.mark.parametrize(
    ("world_size", "found", "loaded_chunks"),
    [(2, [3, 1], 1), (2, [1, 3], 1), (4, [3, 2, 3, 3], 2), (2, [3, 0], 0)],
)
def test_vllm_merges_the_workers_reports_and_the_hit_is_their_minimum(
    tiny_model, world_size, found, loaded_chunks
):
    """Each worker (TP rank, or TP rank of a pipeline stage) reports only its own count; vLLM's
    own aggregator merges the reports; the scheduler loads what the poorest rank holds."""
    engine = Engine(tiny_model)
    engine.mesh.policy.world_size = world_size
    engine.add("a", prompt(1000))
    _, orders = engine.step()
    fetch_id = orders.fetches[0].fetch_id
    reports = [MeshWorkerReport(found={rank: {fetch_id: n}}) for rank, n in enumerate(found)]
    outputs = [
        ModelRunnerOutput.with_kv_conn_output_only(KVConnectorOutput(kv_connector_worker_meta=r))
        for r in reports
    ]
    merged = KVOutputAggregator(expected_finished_count=world_size).aggregate(outputs)
    report = merged.kv_connector_output.kv_connector_worker_meta
    assert report.found == {rank: {fetch_id: n} for rank, n in enumerate(found)}
    engine.scheduler.connector.update_connector_output(merged.kv_connector_output)
    out, orders = engine.step()
    assert out.num_scheduled_tokens == {"a": 1000 - loaded_chunks * CHUNK}
    assert [load.num_chunks for load in orders.loads] == ([loaded_chunks] if loaded_chunks else [])


def test_a_lookup_that_times_out_is_a_miss_and_a_late_answer_is_ignored(tiny_model):
    engine = Engine(tiny_model, extra={"lmcache.lookup_timeout_ms": 100})
    now_s = [1000.0]
    engine.mesh.clock = lambda: now_s[0]
    engine.add("a", prompt(600))
    _, first = engine.step()
    now_s[0] += 0.099
    out, _ = engine.step()
    assert out.num_scheduled_tokens == {}
    now_s[0] += 0.002  # past the lookup deadline: the next step gives up
    out, orders = engine.step()
    assert out.num_scheduled_tokens == {"a": 600}
    assert orders.unstage == ["a"]
    late = MeshWorkerReport(found={0: {first.fetches[0].fetch_id: 2}})
    engine.mesh.reported(late)
    _, orders = engine.step()
    assert not orders.loads


def test_the_engine_prefix_cache_is_not_reloaded(tiny_model):
    engine = Engine(tiny_model)
    shared = prompt(600)
    engine.add("a", shared)
    engine.step({0: 0})
    for _ in range(4):
        engine.step()
    assert "a" not in engine.scheduler.requests  # finished and freed: its blocks are cached
    # b shares a's first 384 tokens = 3 blocks held by vLLM's own prefix cache
    engine.add("b", shared[:384] + prompt(400, start=900))
    _, orders = engine.step({0: 2})
    (fetch,) = orders.fetches
    assert (fetch.first_chunk, fetch.num_chunks) == (1, 2)  # chunk 0 is in vLLM's own cache
    out, orders = engine.step()
    (load,) = orders.loads
    blocks = engine.scheduler.kv_cache_manager.get_block_ids("b")[0]
    assert (load.first_chunk, load.num_chunks, load.skip_blocks) == (1, 2, 1)
    assert load.block_ids == tuple(blocks[3:6])
    assert out.num_scheduled_tokens == {"b": 784 - 768}


def test_a_prompt_the_engine_holds_already_is_not_looked_up(tiny_model):
    engine = Engine(tiny_model)
    engine.add("a", prompt(600))
    engine.step({0: 0})
    for _ in range(4):
        engine.step()
    engine.add("again", prompt(600))  # 512 tokens in vLLM's prefix cache: nothing to gain
    out, orders = engine.step()
    assert out.num_scheduled_tokens == {"again": 600 - 512}
    assert not orders.fetches and not orders.loads and not orders.saves


def test_async_loading_admits_after_the_lookup_and_waits_for_the_load(tiny_model):
    engine = Engine(tiny_model, extra={"lmcache.enable_async_loading": True})
    engine.add("a", prompt(600))
    _, orders = engine.step({0: 2})
    assert not orders.fetches[0].stage
    out, orders = engine.step()
    (load,) = orders.loads
    assert load.is_async and out.num_scheduled_tokens == {}
    assert engine.scheduler.requests["a"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    engine.step(finished_recving=frozenset({"a"}))
    out, _ = engine.step()
    assert out.num_scheduled_tokens == {"a": 600 - 512}


@pytest.mark.parametrize(
    ("role", "fetches", "saves"), [("kv_producer", 0, 1), ("kv_consumer", 1, 0)]
)
def test_kv_role_decides_loading_and_saving(tiny_model, role, fetches, saves):
    engine = Engine(tiny_model, role=role)
    engine.add("a", prompt(300))
    for _ in range(3):
        engine.step({0: 0})
    assert sum(len(o.fetches) for o in engine.orders) == fetches
    assert sum(len(o.saves) for o in engine.orders) == saves


def test_an_aborted_lookup_is_forgotten(tiny_model):
    engine = Engine(tiny_model)
    engine.add("a", prompt(600))
    engine.add("short", prompt(100))
    engine.step()
    engine.scheduler.finish_requests(["a", "short"], RequestStatus.FINISHED_ABORTED)
    _, orders = engine.step()
    assert orders.forget == ["a"]  # "short" has no full chunk: the workers never heard of it
    assert engine.mesh.tracked_requests() == 0


def test_a_preempted_request_looks_up_again(tiny_model):
    """After a preemption vLLM asks again (its blocks were freed; here its prefix cache no longer
    holds them either, so it passes 0 computed tokens): a new lookup starts."""
    engine = Engine(tiny_model)
    request = engine.add("a", prompt(600))
    engine.step({0: 0})
    engine.step()
    assert engine.mesh.match(request, 0) == (None, False)
    orders = engine.scheduler.schedule().kv_connector_metadata
    assert [(f.first_chunk, f.num_chunks) for f in orders.fetches] == [(0, 2)]
    assert not orders.intros  # the workers still hold its chunks' tokens
