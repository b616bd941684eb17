"""Chunk geometry and the copies between vLLM's paged KV blocks and flat chunk buffers.

A chunk is ``chunk_size`` tokens = ``blocks_per_chunk`` whole vLLM blocks in every attention
layer. Its bytes, the unit the mesh stores and moves, are: for layer 0, its blocks in order, then
layer 1's, and so on; each block is copied whole, as raw bytes, so the format needs no knowledge
of the attention backend's layout (between engines whose namespace matches, blocks are
byte-compatible). vLLM hands the connector one view per layer whose first dimension is the
block (``[B, H, N, C]`` for every layout vLLM 0.32 has); the views may be strided (block-outermost
layouts interleave layers), so copies go through ``index_select``/``index_copy_`` on dimension 0.

This module knows torch and the shape of vLLM's per-layer views; it knows nothing of the mesh,
keys or requests.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from meshkv.errors import UsageError

logger = logging.getLogger("vllm.meshkv.connector.geometry")


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


def geometry_of(
    kv_caches: Mapping[str, torch.Tensor],
    *,
    num_blocks: int,
    block_size_tokens: int,
    chunk_size_tokens: int,
) -> ChunkGeometry:
    """The geometry of vLLM's per-layer cache views; raises UsageError if they are not uniform
    ``[num_blocks, ...]`` views with a unit-stride last dimension."""
    layers = unique_layers(kv_caches)
    if not layers:
        raise UsageError("vLLM registered no KV cache layers")
    first = next(iter(layers.values()))
    for name, tensor in layers.items():
        if tensor.shape != first.shape or tensor.dtype != first.dtype:
            raise UsageError(
                f"layer {name} has cache {tuple(tensor.shape)} {tensor.dtype}, unlike "
                f"{tuple(first.shape)} {first.dtype}: mixed layer geometries are not supported"
            )
        if tensor.dim() < 2 or tensor.shape[0] != num_blocks or tensor.stride(-1) != 1:
            raise UsageError(
                f"layer {name} cache {tuple(tensor.shape)} (strides {tensor.stride()}) is not "
                f"a [{num_blocks} blocks, ...] view with a contiguous last dimension"
            )
    block_shape = tuple(first.shape[1:])
    block_bytes = first[0].numel() * first.element_size()
    return ChunkGeometry(
        layer_names=tuple(layers),
        block_shape=block_shape,
        dtype_name=str(first.dtype).removeprefix("torch."),
        block_bytes=block_bytes,
        block_size_tokens=block_size_tokens,
        chunk_size_tokens=chunk_size_tokens,
    )


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as uint8 along the last (unit-stride) dimension."""
    return tensor if tensor.dtype == torch.uint8 else tensor.view(torch.uint8)


class BlockCopier:
    """Copies whole blocks between one engine's KV cache and flat chunk buffers.

    Buffers are 1-D uint8 CPU tensors of ``geometry.chunk_bytes`` (or views of them); the copier
    never keeps a reference to a buffer after a call returns. Not thread-safe for overlapping
    block ids; callers own that ordering (vLLM never schedules a block for load and compute in
    one step).
    """

    def __init__(self, geometry: ChunkGeometry, kv_caches: Mapping[str, torch.Tensor]) -> None:
        self.geometry = geometry
        self._layers = [_as_bytes(kv_caches[name]) for name in geometry.layer_names]
        self._device = self._layers[0].device
        # One block of one layer as bytes; chunk buffers are viewed as
        # [layers, blocks_per_chunk, *block_bytes_shape].
        self._block_bytes_shape = tuple(self._layers[0].shape[1:])

    def _chunk_view(self, buffer: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if buffer.dtype != torch.uint8 or buffer.numel() != g.chunk_bytes:
            raise UsageError(
                f"chunk buffer is {buffer.numel()} x {buffer.dtype}, expected "
                f"{g.chunk_bytes} x uint8"
            )
        return buffer.view(g.num_layers, g.blocks_per_chunk, *self._block_bytes_shape)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(block_ids), dtype=torch.long, device=self._device)

    def gather(self, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Copy one chunk's blocks (``blocks_per_chunk`` ids, in token order) into ``out``."""
        if len(block_ids) != self.geometry.blocks_per_chunk:
            raise UsageError(
                f"a chunk is {self.geometry.blocks_per_chunk} blocks, got {len(block_ids)} ids"
            )
        view = self._chunk_view(out)
        index = self._index(block_ids)
        for layer, cache in enumerate(self._layers):
            if cache.device == view.device:
                torch.index_select(cache, 0, index, out=view[layer])
            else:
                view[layer].copy_(cache.index_select(0, index))

    def scatter(self, src: torch.Tensor, block_ids: Sequence[int], *, first_block: int = 0) -> None:
        """Copy blocks ``first_block..`` of the chunk in ``src`` into ``block_ids`` (one id per
        copied block, in token order). Leading blocks the engine already holds are skipped by
        passing ``first_block`` (never rewrite a block another request may be reading)."""
        count = self.geometry.blocks_per_chunk - first_block
        if not 0 <= first_block < self.geometry.blocks_per_chunk or len(block_ids) != count:
            raise UsageError(
                f"scatter of blocks {first_block}.. of a {self.geometry.blocks_per_chunk}-block "
                f"chunk needs {max(count, 0)} ids, got {len(block_ids)}"
            )
        view = self._chunk_view(src)
        index = self._index(block_ids)
        for layer, cache in enumerate(self._layers):
            part = view[layer, first_block:]
            cache.index_copy_(0, index, part.to(cache.device, non_blocking=False))
