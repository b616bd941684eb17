"""Who this engine is in the mesh, and who may share KV with it, from vLLM's configuration.

One engine is one instance: its scheduler process and every worker (each TP rank of each
pipeline stage) agree on `engine_instance_id`, taken from the id vLLM itself gives the engine and
syncs across its ranks. Each worker is one mesh member, named ``instance/rank`` with rank its
`worker_rank` - vLLM's rank within the engine, pipeline stage major - so stages never collide.

Two engines share chunks only if their namespaces are equal (see `meshkv.keys.Namespace`). The
model identity is the model as vLLM was given it, its revision, a digest of its Hugging Face
config and its pipeline stage - or the user's ``mesh_model_id`` (which replaces the name and
revision, never the config digest: differently configured models must not share). Chunk bytes
are in each block's logical order (see `geometry`), so the layout name only records the device
and the attention layout family, never the physical strides.

This module reads vLLM's config objects; it knows nothing of sockets, rings or requests.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from meshkv.connector.geometry import ChunkGeometry
from meshkv.errors import ConfigError
from meshkv.keys import Namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from meshkv.config import MeshConfig


_NOT_SHAPING_KV = ("_name_or_path", "_commit_hash", "transformers_version")
"""Config entries that say where the model was loaded from or by which library version; the
digest leaves them out so that copies of one model in different places agree."""


ENGINE_ID_HEX_CHARS = 8
"""Hex digits of the engine id's digest kept in the instance id (a clash needs ~65,000
engines in one mesh)."""
INSTANCE_PREFIX = "vllm"


def engine_instance_id(vllm_config: VllmConfig, config: MeshConfig) -> str:
    """This engine's instance id: ``lmcache_instance_id`` if set, else ``vllm-<8 hex>``.

    The hex digits are a digest of vLLM's ``kv_transfer_config.engine_id``: a fresh uuid per
    engine that its workers inherit from the engine core and that vLLM broadcasts from rank 0
    over the TP and PP groups before building the worker-side connector (data-parallel engines
    get it with a ``_dp<rank>`` suffix). So the scheduler process and every rank agree, and two
    engines never do. No host name: ranks of one engine may run on several hosts.
    """
    if config.lmcache_instance_id:
        return config.lmcache_instance_id
    engine_id = vllm_config.kv_transfer_config.engine_id
    digest = hashlib.blake2b(str(engine_id).encode(), digest_size=ENGINE_ID_HEX_CHARS // 2)
    return f"{INSTANCE_PREFIX}-{digest.hexdigest()}"


def check_parallelism(vllm_config: VllmConfig) -> None:
    """Refuses context parallelism, which splits a block's tokens across ranks: a rank's chunk
    would then not be every token of its heads, and two engines with different splits would
    share a namespace. Raises `ConfigError` naming the setting."""
    parallel = vllm_config.parallel_config
    for setting in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        size = getattr(parallel, setting, 1)
        if size != 1:
            raise ConfigError(
                setting, f"is {size}; meshkv shares KV only when each rank holds whole blocks (1)"
            )


def worker_world_size(vllm_config: VllmConfig) -> int:
    """Workers of one engine: TP size x PP size (each is one mesh member)."""
    parallel = vllm_config.parallel_config
    return parallel.tensor_parallel_size * parallel.pipeline_parallel_size


def worker_rank(vllm_config: VllmConfig, *, tp_rank: int, pp_rank: int) -> int:
    """A worker's rank within its engine, as vLLM numbers them (stage major, then TP rank): its
    member name's suffix, its index into the per-rank port lists, its key in worker reports."""
    return pp_rank * vllm_config.parallel_config.tensor_parallel_size + tp_rank


def _config_digest(hf_config: Any) -> str:
    as_dict = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
    for where_or_which in _NOT_SHAPING_KV:
        as_dict.pop(where_or_which, None)
    canonical = json.dumps(as_dict, sort_keys=True, default=str).encode()
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def model_identity(vllm_config: VllmConfig, config: MeshConfig) -> str:
    """The namespace's model id: name (or ``mesh_model_id``), config digest, pipeline stage."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    name = config.mesh_model_id or f"{model.model}@{model.revision or 'main'}"
    stage = f"pp{parallel.pipeline_parallel_size}"
    return f"{name}|cfg:{_config_digest(model.hf_config)}|{stage}"


def namespace_for(
    vllm_config: VllmConfig,
    config: MeshConfig,
    geometry: ChunkGeometry,
    *,
    device_type: str,
    layout_name: str,
    tp_rank: int,
    pp_rank: int,
) -> Namespace:
    """The member namespace of one worker (one TP rank of one pipeline stage)."""
    return Namespace(
        model_id=f"{model_identity(vllm_config, config)}/{pp_rank}",
        kv_dtype=geometry.dtype_name,
        kv_layout=f"{device_type}:{layout_name}",
        block_geometry=geometry.block_shape,
        num_layers=geometry.num_layers,
        chunk_size=geometry.chunk_size_tokens,
        tp_world_size=vllm_config.parallel_config.tensor_parallel_size,
        tp_rank=tp_rank,
    )
