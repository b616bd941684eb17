"""Chunk geometry and the batched copies between vLLM's paged KV blocks and chunk buffers.

A chunk is ``chunk_size`` tokens = ``blocks_per_chunk`` whole vLLM blocks in every attention
layer. Its bytes, the unit the mesh stores and moves, are: for layer 0, its blocks in order, then
layer 1's, and so on; each block's elements in the block's logical order, as raw bytes.

vLLM 0.32 hands the connector one logical ``[B, H, N, C]`` view per layer (C = K and V of a head
side by side) whatever the backend: FlashAttention, FlashInfer and Triton (no layout of their
own: LBNHC unless ``VLLM_KV_CACHE_LAYOUT`` or a hybrid model picks another; FlashInfer on SM100:
LBHNC or BLHNC) and the CPU backend (LBHNC). The resolved `KVCacheLayout` only permutes the
physical strides of that view (``vllm/v1/kv_cache_interface.py: create_kv_cache_views``), so the
block is always dimension 0 but a block is not always contiguous (LBNHC stores N before H;
LHBNC and BHLNC split a block into one run per head; block-outermost layouts interleave
layers). A manager block split into kernel blocks shows as ``ratio * B`` rows and is grouped
back. Copies go through ``index_select``/``index_put_`` on dimension 0 (a cache in host memory is
loaded chunk by chunk through numpy views, one copy per run of consecutive blocks and layer),
which handle any strides on any device, so the bytes of a chunk do not depend on the physical
layout.

A cache this cannot describe (not a per-layer ``[B, ...]`` view, a strided innermost dimension,
layers of different shapes or dtypes) raises `UnsupportedCache`; the connector then runs as a
pass-through.

This module knows torch and the shape of vLLM's per-layer views; it knows nothing of the mesh,
keys, requests, streams or events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from meshkv.errors import UsageError


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkGeometry:
    """How a chunk maps onto a cache's blocks: the same in every engine of one namespace."""

    layer_names: tuple[str, ...]
    block_shape: tuple[int, ...]
    """Shape of one block of one layer, in the cache's dtype (e.g. (kv_heads, 128, 2*head))."""
    dtype_name: str
    block_bytes: int
    block_size_tokens: int
    chunk_size_tokens: int

    def __post_init__(self) -> None:
        if self.block_size_tokens <= 0 or self.chunk_size_tokens % self.block_size_tokens:
            raise UsageError(
                f"chunk_size {self.chunk_size_tokens} is not a multiple of vLLM's block size "
                f"{self.block_size_tokens}"
            )
        if not self.layer_names or self.block_bytes <= 0:
            raise UsageError("a chunk geometry needs at least one layer of non-empty blocks")

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_size_tokens // self.block_size_tokens

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's part of a chunk."""
        return self.blocks_per_chunk * self.block_bytes

    @property
    def chunk_bytes(self) -> int:
        return self.num_layers * self.layer_bytes


def unique_layers(kv_caches: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layers that own their cache: a layer reusing another's tensor (cross-layer KV
    sharing) is dropped, so its bytes are neither stored nor loaded twice."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    owners: dict[str, torch.Tensor] = {}
    for name, tensor in kv_caches.items():
        identity = (tensor.data_ptr(), tuple(tensor.stride()))
        if identity in seen:
            continue
        seen.add(identity)
        owners[name] = tensor
    return owners


class UnsupportedCache(UsageError):
    """vLLM's KV cache is one meshkv cannot share; the message says why in one line."""


def block_rows(cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``cache`` as ``[num_blocks, *block]`` (kernel blocks grouped back into manager blocks)
    with the innermost dimension viewed as bytes. No copy. Raises `UnsupportedCache`."""
    if cache.dim() < 2 or cache.shape[0] == 0 or cache.shape[0] % num_blocks:
        raise UnsupportedCache(
            f"a layer's cache {tuple(cache.shape)} is not a per-layer [{num_blocks} blocks, ...] "
            "view (a model without attention layer views, e.g. Mamba, or an unknown layout)"
        )
    if cache.stride(-1) != 1:
        raise UnsupportedCache(
            f"a layer's cache {tuple(cache.shape)} (strides {cache.stride()}) has a strided "
            "innermost dimension: an unknown layout"
        )
    if cache.shape[0] != num_blocks:
        cache = cache.unflatten(0, (num_blocks, cache.shape[0] // num_blocks))
    return cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)


def geometry_of(
    kv_caches: Mapping[str, torch.Tensor],
    *,
    num_blocks: int,
    block_size_tokens: int,
    chunk_size_tokens: int,
) -> ChunkGeometry:
    """The geometry of vLLM's per-layer cache views; raises `UnsupportedCache` if they are not
    uniform ``[num_blocks, ...]`` views with a unit-stride innermost dimension (any strides
    elsewhere), and UsageError if the chunk size is not a whole number of blocks."""
    layers = unique_layers(kv_caches)
    if not layers:
        raise UnsupportedCache("vLLM registered no KV cache layers")
    first = next(iter(layers.values()))
    first_rows = block_rows(first, num_blocks)
    for name, tensor in layers.items():
        if tensor.dtype != first.dtype or block_rows(tensor, num_blocks).shape != first_rows.shape:
            raise UnsupportedCache(
                f"layer {name} has cache {tuple(tensor.shape)} {tensor.dtype}, unlike "
                f"{tuple(first.shape)} {first.dtype}: mixed layer geometries"
            )
    grouped = first if first.shape[0] == num_blocks else first.unflatten(0, (num_blocks, -1))
    return ChunkGeometry(
        layer_names=tuple(layers),
        block_shape=tuple(grouped.shape[1:]),
        dtype_name=str(first.dtype).removeprefix("torch."),
        block_bytes=first_rows[0].numel(),
        block_size_tokens=block_size_tokens,
        chunk_size_tokens=chunk_size_tokens,
    )


class BlockCopier:
    """Batched copies of whole blocks between one engine's KV cache and chunk buffers.

    A chunk buffer is a uint8 tensor of ``geometry.chunk_bytes``; a batch of chunks is
    ``num_chunks`` of them back to back, viewed as ``[chunks, layers, blocks_per_chunk,
    *block_bytes]`` (`batch_view`). Each call moves one layer's blocks of a whole batch: one
    gather (or scatter) per layer, never one per chunk. The copies run on whatever device and
    stream the caller made current; index tensors are on the cache's device. Not thread-safe for
    overlapping block ids: callers own that ordering.
    """

    def __init__(
        self, geometry: ChunkGeometry, kv_caches: Mapping[str, torch.Tensor], *, num_blocks: int
    ) -> None:
        self.geometry = geometry
        self._layers = [block_rows(kv_caches[name], num_blocks) for name in geometry.layer_names]
        self.device = self._layers[0].device
        self.block_bytes_shape = tuple(self._layers[0].shape[1:])
        self._host_rows = (
            [rows.numpy() for rows in self._layers] if self.device.type == "cpu" else []
        )
        """The layers' rows as numpy views (same memory, same strides), for a cache in host
        memory: `scatter_chunk` copies through them."""

    def batch_view(self, buffer: torch.Tensor, num_chunks: int) -> torch.Tensor:
        """``buffer`` (``num_chunks`` chunks of uint8) as [chunks, layers, blocks, *block]."""
        g = self.geometry
        if buffer.dtype != torch.uint8 or buffer.numel() != num_chunks * g.chunk_bytes:
            raise UsageError(
                f"chunk buffer is {buffer.numel()} x {buffer.dtype}, expected "
                f"{num_chunks} x {g.chunk_bytes} x uint8"
            )
        return buffer.view(num_chunks, g.num_layers, g.blocks_per_chunk, *self.block_bytes_shape)

    def gather_layer(self, layer: int, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Copy blocks ``block_ids`` (``[chunks, blocks]``) of ``layer`` into ``out``
        (``[chunks, blocks, *block]``, e.g. ``batch_view(...)[:, layer]``)."""
        cache = self._layers[layer]
        if out.is_contiguous() and out.device == cache.device:
            torch.index_select(cache, 0, block_ids.reshape(-1), out=out.view(-1, *out.shape[2:]))
        else:
            out.copy_(cache.index_select(0, block_ids.reshape(-1)).view(out.shape))

    def scatter_layer(self, layer: int, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` (``[chunks, blocks, *block]``, any strides) into blocks ``block_ids``
        (``[chunks, blocks]``, distinct) of ``layer`` with ``index_put_`` (the ids stay on the
        device: reading them here would wait for the stream). Never writes any other block."""
        self._layers[layer].index_put_((block_ids,), src)

    def scatter_chunk(self, block_ids: Sequence[int], chunk: np.ndarray, skip: int) -> None:
        """A cache in host memory: copy one chunk buffer's blocks from block ``skip`` on, every
        layer, into blocks ``block_ids`` (one per block copied, distinct). Never writes any
        other block.

        Each run of consecutive block ids is one numpy copy per layer. ``index_put_`` copies
        element by element on the CPU (~1 GB/s: ~5 ms for a 3.4k-token prompt), and a torch
        ``copy_`` per run and layer still spent ~1 ms of such a load in indexing; this ~0.3 ms
        (13 chunks of 0.5 MiB, against ~0.2 ms for one memcpy of them)."""
        g = self.geometry
        if not self._host_rows or not 0 <= skip < g.blocks_per_chunk:
            raise UsageError(
                f"scatter_chunk needs a host cache and 0 <= skip < {g.blocks_per_chunk}"
            )
        if len(block_ids) != g.blocks_per_chunk - skip:
            raise UsageError(f"{len(block_ids)} block ids for {g.blocks_per_chunk - skip} blocks")
        blocks = chunk[: g.chunk_bytes].reshape(
            g.num_layers, g.blocks_per_chunk, *self.block_bytes_shape
        )
        runs: list[tuple[int, int, int]] = []  # (first block in the chunk, first id, length)
        start = 0
        for end in range(1, len(block_ids) + 1):
            if end == len(block_ids) or block_ids[end] != block_ids[end - 1] + 1:
                runs.append((skip + start, block_ids[start], end - start))
                start = end
        for layer, rows in enumerate(self._host_rows):
            for at, first, count in runs:
                rows[first : first + count] = blocks[layer, at : at + count]
