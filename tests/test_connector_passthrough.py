"""A KV cache meshkv cannot share never fails the engine's start: the connector says why in one
line and passes through (every lookup finds nothing, no load, no save).

The worker-side connector is built as vLLM builds it and handed caches from vLLM's own
allocator (or, for a model without attention layer views, the raw buffer vLLM hands such
layers). The cache is judged before anything asks vLLM's process groups (not set up here) or
starts a mesh member, so nothing here needs the heavy lock.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CacheConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from meshkv.connector import plugin
from meshkv.connector.connector import MeshKVConnector
from meshkv.connector.metadata import Fetch, Load, MeshStepOrders, RequestIntro, Save
from tests.test_connector_geometry import (
    BLOCK_SIZE,
    CHUNK_SIZE,
    LAYERS,
    NUM_BLOCKS,
    make_caches,
)


@pytest.fixture
def warnings_logged():
    """Records of the connector's loggers (vLLM's 'vllm' logger does not propagate)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("vllm.meshkv")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def worker_connector(groups: int) -> MeshKVConnector:
    plugin.register()
    vllm_config = VllmConfig(
        cache_config=CacheConfig(block_size=BLOCK_SIZE),
        kv_transfer_config=KVTransferConfig(
            kv_connector="MeshKVConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"chunk_size": CHUNK_SIZE, "p2p_host": "127.0.0.1"},
        ),
    )
    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE, num_kv_heads=2, head_size=64, dtype=torch.bfloat16
    )
    halves = [LAYERS[: len(LAYERS) // 2], LAYERS[len(LAYERS) // 2 :]] if groups == 2 else [LAYERS]
    kv_cache_config = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[KVCacheTensor(size=1, layers=LAYERS, layer_stride=1, block_stride=1)],
        kv_cache_groups=[KVCacheGroupSpec(names, spec) for names in halves],
    )
    return MeshKVConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)


def mixed_caches() -> dict[str, torch.Tensor]:
    caches = make_caches(KVCacheLayout.LBHNC, seed=None)
    caches[LAYERS[1]] = make_caches(KVCacheLayout.LBHNC, None, dtype=torch.float32)[LAYERS[1]]
    return caches


def raw_caches() -> dict[str, torch.Tensor]:
    buffer = torch.zeros(1 << 16, dtype=torch.int8)  # what vLLM hands layers without views
    return dict.fromkeys(LAYERS, buffer)


CASES = {
    "two KV-cache groups": (2, lambda: make_caches(KVCacheLayout.LBHNC, None), "2 KV-cache"),
    "mixed layer shapes": (1, mixed_caches, "mixed layer geometries"),
    "no per-layer views": (1, raw_caches, "per-layer"),
}


@pytest.mark.parametrize("case", CASES)
def test_an_unsupported_cache_makes_a_logged_pass_through(case, warnings_logged):
    groups, caches, reason = CASES[case]
    connector = worker_connector(groups)
    connector.register_kv_caches(caches())
    (line,) = [record.getMessage() for record in warnings_logged]
    assert reason in line and "pass-through" in line

    tokens = np.arange(CHUNK_SIZE, dtype=np.uint32)
    orders = MeshStepOrders(
        intros=[RequestIntro(req_id="r", token_ids=tokens, cache_salt=None)],
        fetches=[Fetch(fetch_id=7, req_id="r", first_chunk=0, num_chunks=1, stage=True,
                       timeout_ms=1000)],
        loads=[Load(req_id="a", first_chunk=0, num_chunks=1, skip_blocks=0, block_ids=(1, 2),
                    is_async=True, num_tokens=31, prompt_tokens=32)],
        saves=[Save(req_id="r", first_chunk=0, num_chunks=1, block_ids=(3, 4))],
    )  # fmt: skip
    connector.bind_connector_metadata(orders)
    connector.start_load_kv(None)
    connector.save_kv_layer(LAYERS[0], torch.empty(0), None)
    connector.wait_for_save()
    connector.clear_connector_metadata()
    assert connector.build_connector_worker_meta().found == {0: {7: 0}}  # found nothing, at once
    assert connector.get_finished(set()) == (None, {"a"})
    assert connector.get_block_ids_with_load_errors() == {1, 2}
    connector.shutdown()
