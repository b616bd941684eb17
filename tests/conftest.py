"""Helpers every test shares: free ports on 127.0.0.1, waits on a condition with a deadline,
and the tiny Llama with KV caches shaped like the ones vLLM allocates for it.

Import them (``from tests.conftest import free_port, wait_until``; the ports come from
`tools.bench.common`, which the benchmarks and the chaos harness use too); vLLM and torch are
imported only by the functions that need them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from tools.bench.common import free_port as free_port  # re-exported for the tests
from tools.bench.common import free_ports as free_ports

if TYPE_CHECKING:
    import torch
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.kv_cache_layout import KVCacheLayout

REPO = Path(__file__).resolve().parents[1]
LOCALHOST = "127.0.0.1"
POLL_S = 0.05
"""How often a wait looks at its condition."""
WAIT_S = 10.0
"""A wait's default deadline."""

_T = TypeVar("_T")


def wait_until(
    what: str,
    check: Callable[[], _T],
    timeout_s: float = WAIT_S,
    *,
    explain: Callable[[], object] = str,
    poll_s: float = POLL_S,
) -> _T:
    """Polls ``check`` every ``poll_s`` until it returns something true, and returns that;
    fails the test past ``timeout_s``, naming ``what`` (and ``explain()``, to show the state)."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() >= deadline_s:
            pytest.fail(f"not within {timeout_s:g} s: {what} {explain()}".rstrip())
        time.sleep(poll_s)


# ------------------------------------------------------------------- the tiny Llama's KV caches

TINY_MODEL_DIR = REPO / ".models" / "tiny-llama"
KV_LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
"""The tiny Llama's attention layers, as vLLM names them."""
KV_HEADS = 2
HEAD_SIZE = 64


def tiny_model() -> Path:
    """The tiny Llama, generated under ``.models/`` on first use and kept."""
    from meshkv.models.tiny_llama import make_tiny_llama

    return make_tiny_llama(TINY_MODEL_DIR)


def kv_cache_config(*, num_blocks: int, block_size: int, layer_compact: bool = True) -> Any:
    """vLLM's `KVCacheConfig` for the tiny Llama: one tensor holding every layer (bf16),
    layer-outermost (``layer_compact``, the CPU layout) or block-outermost."""
    import torch
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )

    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16
    )
    page = spec.page_size_bytes
    if layer_compact:
        placement = {"layer_stride": page * num_blocks, "block_stride": page}
    else:
        placement = {"layer_stride": page, "block_stride": page * len(KV_LAYERS)}
    config: KVCacheConfig = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[
            KVCacheTensor(size=len(KV_LAYERS) * num_blocks * page, layers=KV_LAYERS, **placement)
        ],
        kv_cache_groups=[KVCacheGroupSpec(KV_LAYERS, spec)],
    )
    return config


def tiny_kv_caches(
    *,
    num_blocks: int,
    block_size: int,
    layout: KVCacheLayout | None = None,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """The tiny Llama's KV caches as vLLM's own allocator lays them out (``layout``, default
    the CPU one, LBHNC), filled from ``seed`` (None: left as allocated)."""
    import torch
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    layout = KVCacheLayout.LBHNC if layout is None else layout
    config = kv_cache_config(
        num_blocks=num_blocks, block_size=block_size, layer_compact=layout.is_layer_compact
    )
    caches = allocate_kv_cache(config, torch.device("cpu"), layout, [block_size])
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        for tensor in caches.values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
    return caches
