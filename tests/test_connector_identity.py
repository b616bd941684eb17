"""Which engines share a namespace: same model and geometry yes; another copy only by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.config import ModelConfig, VllmConfig

from meshkv.config import load_config
from meshkv.connector.geometry import ChunkGeometry
from meshkv.connector.identity import namespace_for
from tests.conftest import tiny_model

GEOMETRY = ChunkGeometry(
    layer_names=tuple(f"model.layers.{i}.self_attn.attn" for i in range(4)),
    block_shape=(2, 128, 128),
    dtype_name="bfloat16",
    block_bytes=65536,
    block_size_tokens=128,
    chunk_size_tokens=256,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    original = tiny_model()
    copy = tmp_path_factory.mktemp("copy") / "renamed-llama"
    shutil.copytree(original, copy)
    return original, copy


def namespace(model: Path, *, tp_rank: int = 0, layout: str = "CPU_ATTN/LBHNC", **mesh):
    vllm_config = VllmConfig(
        model_config=ModelConfig(model=str(model), max_model_len=4096, dtype="bfloat16")
    )
    return namespace_for(
        vllm_config,
        load_config(overrides=mesh),
        GEOMETRY,
        device_type="cpu",
        layout_name=layout,
        tp_rank=tp_rank,
        pp_rank=0,
    )


def test_the_same_engine_setup_gives_the_same_namespace(models):
    original, _ = models
    assert namespace(original).digest() == namespace(original).digest()


def test_a_renamed_copy_shares_only_under_one_mesh_model_id(models):
    original, copy = models
    assert namespace(original).digest() != namespace(copy).digest()
    shared = {"mesh_model_id": "tiny-llama-v1"}
    assert namespace(original, **shared).digest() == namespace(copy, **shared).digest()


def test_rank_and_layout_separate_namespaces(models):
    original, _ = models
    base = namespace(original).digest()
    assert namespace(original, tp_rank=0, layout="FLASH_ATTN/LBNHC").digest() != base
    with pytest.raises(Exception, match="rank"):
        namespace(original, tp_rank=1)  # world size 1: no rank 1
