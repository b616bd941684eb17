"""tools/gpu_check.py cannot rot: its CPU mode runs the correctness parts through the same code,
and the caches it builds for a CUDA machine (without vLLM) are laid out as vLLM's allocator lays
them out, in every layout."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.kv_cache_layout import KVCacheLayout

from tests.test_connector_geometry import BLOCK_SIZE, HEAD_SIZE, KV_HEADS, NUM_BLOCKS, make_caches

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_its_layouts_are_vllms(gpu_check):
    assert {name: KVCacheLayout[name].value for name in gpu_check.LAYOUTS} == gpu_check.LAYOUTS
    assert set(gpu_check.LAYOUTS) == {layout.name for layout in KVCacheLayout}


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda layout: layout.name)
def test_its_caches_have_the_strides_vllm_allocates(gpu_check, layout):
    shape = gpu_check.Shape(
        layers=4,
        kv_heads=KV_HEADS,
        head_size=HEAD_SIZE,
        block_tokens=BLOCK_SIZE,
        chunk_tokens=2 * BLOCK_SIZE,
        chunks=1,
        matmul=8,
    )
    ours = gpu_check.make_caches(shape, layout.name, NUM_BLOCKS, torch.device("cpu"), seed=0)
    vllms = make_caches(layout, seed=None)
    assert [(t.shape, t.stride(), t.dtype) for t in ours.values()] == [
        (t.shape, t.stride(), t.dtype) for t in vllms.values()
    ]


def test_the_cpu_mode_moves_every_byte_right_in_every_layout(gpu_check, tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--runs", "1", "--json", str(out)])
    results = json.loads(out.read_text())
    assert set(results["layouts"]) == set(gpu_check.LAYOUTS)
    for entry in results["layouts"].values():
        small = gpu_check.SMALL
        block_bytes = small.kv_heads * small.block_tokens * 2 * small.head_size * 2  # bf16
        assert entry["bytes"] == small.chunks * small.layers * small.blocks_per_chunk * block_bytes
        wrong = [value for key, value in entry.items() if key.startswith("wrong")]
        assert wrong == [0, 0, 0, 0]
