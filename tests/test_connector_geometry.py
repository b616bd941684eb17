"""Block <-> chunk-buffer copies against KV caches allocated by vLLM's own allocator.

The caches come from `vllm.v1.worker.utils.allocate_kv_cache`, the function vLLM's model
runners use, with the CPU backend's block geometry (bf16, 2 KV heads, 128-token blocks,
2*head_dim last dimension) in the CPU layout (LBHNC) and a block-outermost layout (BLHNC).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.kv_cache_layout import KVCacheLayout

from meshkv.connector.geometry import BlockCopier, geometry_of, unique_layers
from meshkv.errors import UsageError
from tests.conftest import KV_LAYERS, tiny_kv_caches

NUM_BLOCKS = 12
BLOCK_SIZE = 128
CHUNK_SIZE = 256
LAYERS = KV_LAYERS
NUM_LAYERS = len(LAYERS)


def make_caches(layout: KVCacheLayout, seed: int | None) -> dict[str, torch.Tensor]:
    return tiny_kv_caches(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, layout=layout, seed=seed)


def geometry(caches):
    return geometry_of(
        caches, num_blocks=NUM_BLOCKS, block_size_tokens=BLOCK_SIZE, chunk_size_tokens=CHUNK_SIZE
    )


def test_geometry_of_the_cpu_cache():
    g = geometry(make_caches(KVCacheLayout.LBHNC, seed=None))
    assert g.layer_names == tuple(LAYERS)
    assert g.block_shape == (2, BLOCK_SIZE, 128)
    assert g.dtype_name == "bfloat16"
    assert g.block_bytes == 2 * BLOCK_SIZE * 128 * 2
    assert g.blocks_per_chunk == 2
    assert g.chunk_bytes == NUM_LAYERS * 2 * g.block_bytes


def test_chunk_bytes_are_each_layers_blocks_in_order():
    caches = make_caches(KVCacheLayout.LBHNC, seed=1)
    g = geometry(caches)
    copier = BlockCopier(g, caches)
    buffer = torch.empty(g.chunk_bytes, dtype=torch.uint8)
    copier.gather([7, 3], buffer)
    for layer, name in enumerate(LAYERS):
        for position, block in enumerate((7, 3)):
            start = layer * g.layer_bytes + position * g.block_bytes
            expected = caches[name][block].contiguous().view(torch.uint8).flatten()
            assert torch.equal(buffer[start : start + g.block_bytes], expected)


@pytest.mark.parametrize(
    ("source_layout", "target_layout"),
    [
        (KVCacheLayout.LBHNC, KVCacheLayout.LBHNC),
        (KVCacheLayout.BLHNC, KVCacheLayout.BLHNC),
        (KVCacheLayout.LBHNC, KVCacheLayout.BLHNC),
    ],
)
def test_gather_then_scatter_moves_exactly_the_blocks(source_layout, target_layout):
    source = make_caches(source_layout, seed=2)
    target = make_caches(target_layout, seed=3)
    assert target[LAYERS[0]].is_contiguous() == target_layout.is_layer_compact
    before = {name: tensor.clone() for name, tensor in target.items()}
    g = geometry(source)
    assert g == geometry(target)
    buffer = torch.empty(g.chunk_bytes, dtype=torch.uint8)
    BlockCopier(g, source).gather([4, 9], buffer)
    BlockCopier(g, target).scatter(buffer, [0, 11])
    for name in LAYERS:
        assert torch.equal(target[name][0], source[name][4])
        assert torch.equal(target[name][11], source[name][9])
        untouched = [b for b in range(NUM_BLOCKS) if b not in (0, 11)]
        assert torch.equal(target[name][untouched], before[name][untouched])


def test_scatter_skips_leading_blocks_the_engine_holds():
    source = make_caches(KVCacheLayout.LBHNC, seed=4)
    target = make_caches(KVCacheLayout.LBHNC, seed=5)
    before = {name: tensor.clone() for name, tensor in target.items()}
    g = geometry(source)
    buffer = torch.empty(g.chunk_bytes, dtype=torch.uint8)
    BlockCopier(g, source).gather([1, 2], buffer)
    BlockCopier(g, target).scatter(buffer, [6], first_block=1)
    for name in LAYERS:
        assert torch.equal(target[name][6], source[name][2])
        assert torch.equal(target[name][:6], before[name][:6])
        assert torch.equal(target[name][7:], before[name][7:])


def test_misuse_is_refused():
    caches = make_caches(KVCacheLayout.LBHNC, seed=None)
    g = geometry(caches)
    copier = BlockCopier(g, caches)
    with pytest.raises(UsageError):
        copier.gather([1], torch.empty(g.chunk_bytes, dtype=torch.uint8))
    with pytest.raises(UsageError):
        copier.gather([1, 2], torch.empty(g.chunk_bytes - 1, dtype=torch.uint8))
    with pytest.raises(UsageError):
        copier.scatter(torch.empty(g.chunk_bytes, dtype=torch.uint8), [1, 2], first_block=1)
    with pytest.raises(UsageError, match="multiple"):
        geometry_of(caches, num_blocks=NUM_BLOCKS, block_size_tokens=128, chunk_size_tokens=200)
    with pytest.raises(UsageError, match="blocks"):
        geometry_of(caches, num_blocks=NUM_BLOCKS + 1, block_size_tokens=128, chunk_size_tokens=256)


def test_a_layer_sharing_another_layers_cache_is_copied_once():
    caches = make_caches(KVCacheLayout.LBHNC, seed=None)
    caches["model.layers.4.self_attn.attn"] = caches[LAYERS[0]]
    assert list(unique_layers(caches)) == LAYERS
    assert geometry(caches).num_layers == NUM_LAYERS
