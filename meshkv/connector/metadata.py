"""What the scheduler-side connector tells the workers each step, and what they answer.

vLLM pickles `MeshStepOrders` from the engine core to every worker once per step (bound before
the forward, cleared after it) and hands the workers' `MeshWorkerReport`s, merged across TP
ranks, back to the scheduler side the step after. These two types are the only things the two
halves of the connector share.

Chunks are named by their index in the request's prompt (chunk i = tokens [i*C, (i+1)*C)); the
workers turn indices into keys with their own namespace (TP rank r has its own keys), so the
scheduler never hashes. Block ids are vLLM's (KV cache group 0), in token order.

This module knows vLLM's metadata base classes and nothing of the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from meshkv.errors import UsageError


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestIntro:
    """A request's full prompt chunks, sent once before any order that names it."""

    req_id: str
    token_ids: np.ndarray
    """uint32 token ids of the prompt's full chunks (length a multiple of the chunk size)."""
    cache_salt: str | None

    def __post_init__(self) -> None:
        if self.token_ids.dtype != np.uint32 or self.token_ids.ndim != 1:
            raise UsageError("RequestIntro.token_ids must be a 1-D uint32 array")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetch:
    """Find the request's chunks first_chunk..first_chunk+num_chunks-1 in the mesh.

    ``first_chunk`` skips the chunks vLLM's own prefix cache holds already.

    ``stage`` true: fetch remote ones into the local store and keep them all pinned for a later
    `Load` (or `unstage`); false: only look them up (an async load fetches them later).
    Each rank answers with the count of leading chunks found, in a `MeshWorkerReport`.
    """

    fetch_id: int
    """Unique per scheduler; reports name it, so a late answer is never taken for a newer one."""
    req_id: str
    first_chunk: int
    num_chunks: int
    stage: bool
    timeout_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    """Write chunks first_chunk..first_chunk+num_chunks-1 into the request's blocks.

    ``block_ids`` holds one id per written block: every block of every chunk except the first
    ``skip_blocks`` of the first chunk (those the engine already holds from its own prefix cache).
    ``is_async``: run off the forward path and report through `get_finished`; otherwise the
    copy completes in `start_load_kv`, before the forward reads the blocks.
    """

    req_id: str
    first_chunk: int
    num_chunks: int
    skip_blocks: int
    block_ids: tuple[int, ...]
    is_async: bool
    num_tokens: int
    """Tokens vLLM skips computing thanks to this load (for the log line)."""
    prompt_tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Save:
    """Copy chunks first_chunk.. out of ``block_ids`` (all their blocks, in order) after this
    step's forward and hand them to the mesh."""

    req_id: str
    first_chunk: int
    num_chunks: int
    block_ids: tuple[int, ...]


@dataclass(slots=True, kw_only=True)
class MeshStepOrders(KVConnectorMetadata):
    """One step's orders, applied by each worker in field order."""

    intros: list[RequestIntro] = field(default_factory=list)
    fetches: list[Fetch] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)
    unstage: list[str] = field(default_factory=list)
    """Requests whose staged chunks will not be loaded (miss, timeout, or already loaded)."""
    forget: list[str] = field(default_factory=list)
    """Finished requests: drop every trace of them once this step's saves are done."""
    idle_step: bool = False
    """vLLM scheduled no tokens this step (no forward): a worker may wait a little for this
    step's fetches, so their results go back with this step rather than after the empty steps
    the scheduler would otherwise spin while it asks again."""

    def is_empty(self) -> bool:
        return not (
            self.intros or self.fetches or self.loads or self.saves or self.unstage or self.forget
        )


@dataclass(slots=True, kw_only=True)
class MeshWorkerReport(KVConnectorWorkerMetadata):
    """Fetch results: worker rank (`identity.worker_rank`) -> fetch id -> chunks found from the
    fetch's first chunk on, without a gap (staged when staging). vLLM merges the reports of an
    engine's workers with `aggregate`; the scheduler side takes the minimum over ranks."""

    found: dict[int, dict[str, int]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> MeshWorkerReport:
        if not isinstance(other, MeshWorkerReport):
            raise UsageError(f"cannot merge a MeshWorkerReport with {type(other).__name__}")
        merged = {rank: dict(results) for rank, results in self.found.items()}
        for rank, results in other.found.items():
            merged.setdefault(rank, {}).update(results)
        return MeshWorkerReport(found=merged)
