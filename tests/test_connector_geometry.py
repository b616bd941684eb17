"""Block <-> chunk-buffer copies against KV caches allocated by vLLM's own allocator.

The caches come from `vllm.v1.worker.utils.allocate_kv_cache`, the function vLLM's model
runners use, on CPU tensors, in every `KVCacheLayout` vLLM 0.32 can resolve: the CPU backend's
LBHNC; FlashAttention's and Triton's (they declare none, so any of the six, LBNHC by default);
FlashInfer's (LBHNC or BLHNC on SM100, else any). Layer-compact layouts give one contiguous
tensor per layer; block-outermost ones interleave layers (strided dimension 0); LBNHC stores a
block's tokens before its heads; LHBNC and BHLNC split a block into one run per head.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

from meshkv.connector.geometry import BlockCopier, UnsupportedCache, geometry_of, unique_layers
from meshkv.errors import UsageError

NUM_LAYERS = 4
NUM_BLOCKS = 12
BLOCK_SIZE = 16
CHUNK_SIZE = 32
KV_HEADS = 2
HEAD_SIZE = 64
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
ALL_LAYOUTS = list(KVCacheLayout)


def make_caches(
    layout: KVCacheLayout,
    seed: int | None,
    *,
    kernel_block_size: int = BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=dtype
    )
    page = spec.page_size_bytes
    block_stride = page * NUM_LAYERS if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(  # as vLLM's kv_cache_utils does
        spec, NUM_BLOCKS, NUM_LAYERS, layout, fixed_strides=(None, block_stride, None, None, None)
    )
    config = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[
            KVCacheTensor(
                size=NUM_LAYERS * NUM_BLOCKS * page,
                layers=LAYERS,
                layer_stride=layer_stride,
                block_stride=block_stride,
            )
        ],
        kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)],
    )
    caches = allocate_kv_cache(config, torch.device("cpu"), layout, [kernel_block_size])
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        for tensor in caches.values():
            as_uint8 = tensor.view(torch.uint8)
            raw = torch.randint(0, 256, as_uint8.shape, generator=generator, dtype=torch.uint8)
            as_uint8.copy_(raw)  # every bit pattern, NaNs included
    return caches


def geometry(caches):
    return geometry_of(
        caches, num_blocks=NUM_BLOCKS, block_size_tokens=BLOCK_SIZE, chunk_size_tokens=CHUNK_SIZE
    )


def copier(caches) -> BlockCopier:
    return BlockCopier(geometry(caches), caches, num_blocks=NUM_BLOCKS)


def gather(source: BlockCopier, chunks: list[list[int]]) -> torch.Tensor:
    buffer = torch.empty(len(chunks) * source.geometry.chunk_bytes, dtype=torch.uint8)
    view = source.batch_view(buffer, len(chunks))
    for layer in range(source.geometry.num_layers):
        source.gather_layer(layer, torch.tensor(chunks), view[:, layer])
    return buffer


def scatter(target: BlockCopier, buffer: torch.Tensor, chunks: list[list[int]]) -> None:
    view = target.batch_view(buffer, len(chunks))
    for layer in range(target.geometry.num_layers):
        target.scatter_layer(layer, torch.tensor(chunks), view[:, layer])


def as_bytes(block: torch.Tensor) -> torch.Tensor:
    return block.contiguous().view(torch.uint8).flatten()


def test_every_layout_a_cuda_or_cpu_backend_declares_is_covered():
    declared = get_supported_kv_cache_layouts([FlashAttentionBackend])
    assert get_supported_kv_cache_layouts([TritonAttentionBackend]) == declared
    assert declared[0] is KVCacheLayout.LBNHC  # what FlashAttention and Triton get by default
    assert set(CPUAttentionBackend.supported_kv_cache_layouts()) == {KVCacheLayout.LBHNC}
    assert set(declared) == set(ALL_LAYOUTS)  # FlashInfer's (a subset, or None) included


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.name)
def test_geometry_is_the_blocks_logical_shape_whatever_the_layout(layout):
    g = geometry(make_caches(layout, seed=None))
    assert g.layer_names == tuple(LAYERS)
    assert g.block_shape == (KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)
    assert g.dtype_name == "bfloat16"
    assert g.block_bytes == KV_HEADS * BLOCK_SIZE * 2 * HEAD_SIZE * 2
    assert g.blocks_per_chunk == 2
    assert g.chunk_bytes == NUM_LAYERS * 2 * g.block_bytes


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.name)
def test_chunk_bytes_are_each_layers_blocks_in_logical_order(layout):
    caches = make_caches(layout, seed=1)
    source = copier(caches)
    g = source.geometry
    buffer = gather(source, [[7, 3], [0, 11]])
    for chunk, ids in enumerate(([7, 3], [0, 11])):
        for layer, name in enumerate(LAYERS):
            for position, block in enumerate(ids):
                start = chunk * g.chunk_bytes + layer * g.layer_bytes + position * g.block_bytes
                expected = as_bytes(caches[name][block])
                assert torch.equal(buffer[start : start + g.block_bytes], expected)


@pytest.mark.parametrize("target_layout", ALL_LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("source_layout", ALL_LAYOUTS, ids=lambda layout: layout.name)
def test_a_round_trip_moves_exactly_the_blocks_bit_for_bit(source_layout, target_layout):
    """gather -> a flat buffer (what the store holds) -> scatter into another engine's cache."""
    source = make_caches(source_layout, seed=2)
    target = make_caches(target_layout, seed=3)
    before = {name: tensor.clone() for name, tensor in target.items()}
    assert geometry(source) == geometry(target)
    buffer = gather(copier(source), [[4, 9], [1, 2]])
    scatter(copier(target), buffer.clone(), [[0, 11], [5, 6]])
    moved = {0: 4, 11: 9, 5: 1, 6: 2}
    for name in LAYERS:
        for dst, src in moved.items():
            assert torch.equal(as_bytes(target[name][dst]), as_bytes(source[name][src]))
        untouched = [b for b in range(NUM_BLOCKS) if b not in moved]
        assert torch.equal(as_bytes(target[name][untouched]), as_bytes(before[name][untouched]))


def test_kernel_blocks_are_grouped_back_into_the_managers_blocks():
    """A backend whose kernels take smaller blocks sees each block as several kernel blocks."""
    source = make_caches(KVCacheLayout.LBNHC, seed=4, kernel_block_size=BLOCK_SIZE // 2)
    target = make_caches(KVCacheLayout.LBNHC, seed=5, kernel_block_size=BLOCK_SIZE // 2)
    assert source[LAYERS[0]].shape[0] == 2 * NUM_BLOCKS
    g = geometry(source)
    assert g.block_shape == (2, KV_HEADS, BLOCK_SIZE // 2, 2 * HEAD_SIZE)
    assert g.block_bytes == KV_HEADS * BLOCK_SIZE * 2 * HEAD_SIZE * 2
    scatter(copier(target), gather(copier(source), [[3, 8]]), [[10, 1]])
    for name in LAYERS:
        grouped_source = source[name].unflatten(0, (NUM_BLOCKS, 2))
        grouped_target = target[name].unflatten(0, (NUM_BLOCKS, 2))
        assert torch.equal(as_bytes(grouped_target[10]), as_bytes(grouped_source[3]))
        assert torch.equal(as_bytes(grouped_target[1]), as_bytes(grouped_source[8]))


def test_a_partial_scatter_writes_only_the_blocks_it_names():
    source = make_caches(KVCacheLayout.LBHNC, seed=4)
    target = make_caches(KVCacheLayout.LBHNC, seed=5)
    before = {name: tensor.clone() for name, tensor in target.items()}
    buffer = gather(copier(source), [[1, 2]])
    into = copier(target)
    view = into.batch_view(buffer, 1)
    for layer in range(NUM_LAYERS):  # the engine holds block 1 of the chunk already
        into.scatter_layer(layer, torch.tensor([[6]]), view[:1, layer, 1:])
    for name in LAYERS:
        assert torch.equal(as_bytes(target[name][6]), as_bytes(source[name][2]))
        assert torch.equal(as_bytes(target[name][:6]), as_bytes(before[name][:6]))
        assert torch.equal(as_bytes(target[name][7:]), as_bytes(before[name][7:]))


def test_a_buffer_of_the_wrong_size_is_refused():
    caches = make_caches(KVCacheLayout.LBHNC, seed=None)
    g = geometry(caches)
    with pytest.raises(UsageError):
        copier(caches).batch_view(torch.empty(g.chunk_bytes - 1, dtype=torch.uint8), 1)
    with pytest.raises(UsageError):
        copier(caches).batch_view(torch.empty(g.chunk_bytes, dtype=torch.int8), 1)
    with pytest.raises(UsageError, match="multiple"):
        geometry_of(caches, num_blocks=NUM_BLOCKS, block_size_tokens=16, chunk_size_tokens=40)


def test_caches_meshkv_cannot_share_are_named_unsupported():
    caches = make_caches(KVCacheLayout.LBHNC, seed=None)
    with pytest.raises(UnsupportedCache, match="blocks"):  # not a [num_blocks, ...] view
        geometry_of(caches, num_blocks=NUM_BLOCKS + 1, block_size_tokens=16, chunk_size_tokens=32)
    mixed = dict(caches)
    mixed[LAYERS[1]] = make_caches(KVCacheLayout.LBHNC, None, dtype=torch.float32)[LAYERS[1]]
    with pytest.raises(UnsupportedCache, match="mixed"):
        geometry(mixed)
    raw = {name: torch.zeros(1 << 16, dtype=torch.int8) for name in LAYERS}  # e.g. Mamba state
    with pytest.raises(UnsupportedCache, match="per-layer"):
        geometry(raw)
    strided = {name: t.transpose(-1, -2) for name, t in caches.items()}  # innermost not unit
    with pytest.raises(UnsupportedCache, match="innermost"):
        geometry(strided)
    with pytest.raises(UnsupportedCache, match="no KV cache layers"):
        geometry({})


def test_a_layer_sharing_another_layers_cache_is_copied_once():
    caches = make_caches(KVCacheLayout.LBHNC, seed=None)
    caches["model.layers.4.self_attn.attn"] = caches[LAYERS[0]]
    assert list(unique_layers(caches)) == LAYERS
    assert geometry(caches).num_layers == NUM_LAYERS
