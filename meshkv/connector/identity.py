"""Who may share KV with this engine: the member namespace built from vLLM's configuration.

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
from meshkv.keys import Namespace

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from meshkv.config import MeshConfig


_NOT_SHAPING_KV = ("_name_or_path", "_commit_hash", "transformers_version")
"""Config entries that say where the model was loaded from or by which library version; the
digest leaves them out so that copies of one model in different places agree."""


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
