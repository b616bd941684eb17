"""Which engines share a namespace: same model and geometry yes; another copy only by name.

And who an engine is: one instance id for all its processes, one member rank per worker.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.config import KVTransferConfig, ModelConfig, ParallelConfig, VllmConfig

from meshkv.config import load_config
from meshkv.connector import plugin
from meshkv.connector.geometry import ChunkGeometry
from meshkv.connector.identity import (
    check_parallelism,
    engine_instance_id,
    namespace_for,
    worker_rank,
    worker_world_size,
)
from meshkv.errors import ConfigError
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


def engine_config(model: Path, *, tp: int = 1, pp: int = 1) -> VllmConfig:
    plugin.register()
    return VllmConfig(
        model_config=ModelConfig(model=str(model), max_model_len=4096, dtype="bfloat16"),
        parallel_config=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        kv_transfer_config=KVTransferConfig(kv_connector="MeshKVConnector", kv_role="kv_both"),
    )


def test_every_process_of_one_engine_names_the_same_instance_and_two_engines_differ(models):
    original, _ = models
    mesh = load_config(overrides={})
    engine = engine_config(original, tp=2)
    # vLLM hands its workers the engine core's config by pickling it (then syncs engine_id)
    worker_side = pickle.loads(pickle.dumps(engine))
    name = engine_instance_id(engine, mesh)
    assert re.fullmatch(r"vllm-[0-9a-f]{8}", name)
    assert engine_instance_id(worker_side, mesh) == name
    assert engine_instance_id(engine_config(original, tp=2), mesh) != name


def test_data_parallel_engines_and_a_configured_id(models):
    original, _ = models
    engine = engine_config(original)
    first = engine_instance_id(engine, load_config(overrides={}))
    engine.kv_transfer_config.engine_id += "_dp1"  # what vLLM does for DP rank 1's engine
    assert engine_instance_id(engine, load_config(overrides={})) != first
    named = load_config(overrides={"lmcache_instance_id": "prefill-a"})
    assert engine_instance_id(engine, named) == "prefill-a"


def test_pipeline_stages_get_distinct_member_ranks_and_ports(models):
    original, _ = models
    engine = engine_config(original, tp=2, pp=2)
    assert worker_world_size(engine) == 4
    ranks = [worker_rank(engine, tp_rank=t, pp_rank=p) for p in range(2) for t in range(2)]
    assert ranks == [0, 1, 2, 3]  # vLLM's own order: stage major
    mesh = load_config(overrides={"p2p_init_ports": 8200, "p2p_lookup_ports": 8300})
    ports = [mesh.ports_for_rank(rank, worker_world_size(engine)) for rank in ranks]
    assert len({p.gossip for p in ports} | {p.data for p in ports}) == 8


@pytest.mark.parametrize(
    "setting", ["decode_context_parallel_size", "prefill_context_parallel_size"]
)
def test_context_parallelism_is_refused_naming_the_setting(models, setting):
    original, _ = models
    engine = engine_config(original)
    check_parallelism(engine)
    setattr(engine.parallel_config, setting, 2)
    with pytest.raises(ConfigError, match=f"^{setting}: "):
        check_parallelism(engine)
