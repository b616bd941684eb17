"""MeshKVConnector: the class vLLM instantiates; a thin facade routing by role.

vLLM builds one instance with role SCHEDULER inside the engine core and one with role WORKER in
each worker process (one per TP rank); they share nothing but `MeshStepOrders` (scheduler ->
workers, once per step) and `MeshWorkerReport` (workers -> scheduler). Each override below says
when vLLM calls it; the logic lives in `scheduler.MeshScheduler` and `worker.MeshWorker`.

No exception escapes into vLLM once the engine runs: a failure inside the connector is logged
under ``vllm.meshkv`` and becomes a cache miss (0 matched tokens, or failed blocks that vLLM
recomputes). A bad configuration, on the other hand, fails the engine's start with one line
naming the key (`meshkv.errors.ConfigError`). A KV cache meshkv cannot share (several KV-cache
groups, mixed layer shapes, an unknown layout) never fails the start: the worker logs one line
saying why and the connector passes through (every lookup finds nothing, nothing is saved).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from meshkv.config import config_from_vllm_extra
from meshkv.connector.geometry import UnsupportedCache, geometry_of
from meshkv.connector.identity import (
    check_parallelism,
    engine_instance_id,
    worker_rank,
    worker_world_size,
)
from meshkv.connector.metadata import MeshStepOrders, MeshWorkerReport
from meshkv.connector.scheduler import MeshScheduler, SchedulingPolicy
from meshkv.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from meshkv.connector.worker import MeshWorker

logger = logging.getLogger("vllm.meshkv.connector")

_Result = TypeVar("_Result")


def contained(fallback: Callable[[], Any]) -> Callable[[Callable[..., _Result]], Callable]:
    """Run an override; on any exception log it with its traceback and return ``fallback()``."""

    def wrap(method: Callable[..., _Result]) -> Callable[..., _Result]:
        @functools.wraps(method)
        def guarded(self: MeshKVConnector, *args: Any, **kwargs: Any) -> _Result:
            try:
                return method(self, *args, **kwargs)
            except Exception:
                logger.exception("meshkv connector: %s failed; treated as a miss", method.__name__)
                return fallback()

        return guarded

    return wrap


def recompute_load_failures(transfer: KVTransferConfig) -> None:
    """Makes vLLM recompute blocks meshkv could not load, whatever ``kv_load_failure_policy``.

    A chunk can vanish between the lookup and the load (its holder dies, its bytes fail their
    checksum, an async load times out); meshkv then reports its blocks as failed. Under vLLM's
    default policy, "fail", that would fail the request with an error: a cache miss must never
    do that, so the scheduler side switches the policy to "recompute". vLLM reads the policy
    right after constructing the scheduler-side connector (vllm/v1/core/sched/scheduler.py), and
    cannot tell its default from an explicit "fail", so both are switched, with one log line.
    """
    if transfer.kv_load_failure_policy != "recompute":
        logger.info(
            "kv_load_failure_policy %r -> 'recompute': a chunk that cannot be loaded from the "
            "mesh is a cache miss, recomputed, never a failed request",
            transfer.kv_load_failure_policy,
        )
        transfer.kv_load_failure_policy = "recompute"


class MeshKVConnector(KVConnectorBase_V1):
    """Shares KV chunks with the meshkv peer mesh. Select it with
    ``--kv-transfer-config '{"kv_connector":"MeshKVConnector","kv_role":"kv_both"}'``."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        config = config_from_vllm_extra(transfer.kv_connector_extra_config)
        self._config = dataclasses.replace(
            config, lmcache_instance_id=engine_instance_id(vllm_config, config)
        )
        check_parallelism(vllm_config)
        block_size = vllm_config.cache_config.block_size
        if self._config.chunk_size % block_size:
            raise ConfigError(
                "chunk_size",
                f"{self._config.chunk_size} is not a multiple of vLLM's block size {block_size}",
            )
        self._scheduler: MeshScheduler | None = None
        self._worker: MeshWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = MeshScheduler(
                SchedulingPolicy(
                    chunk_size=self._config.chunk_size,
                    block_size=block_size,
                    world_size=worker_world_size(vllm_config),
                    lookup_timeout_ms=self._config.lookup_timeout_ms,
                    async_loading=self._config.enable_async_loading,
                    may_load=transfer.is_kv_consumer,
                    may_save=transfer.is_kv_producer,
                )
            )
            recompute_load_failures(transfer)
        else:
            from meshkv.connector.worker import MeshWorker

            self._worker = MeshWorker(vllm_config, self._config)
        logger.info(
            "MeshKVConnector (%s) ready: instance %s, role %s, chunk_size %d, %s loading",
            role.name.lower(),
            self._config.instance_id,
            transfer.kv_role,
            self._config.chunk_size,
            "async" if self._config.enable_async_loading else "sync",
        )

    @property
    def requires_kv_delivery(self) -> bool:
        """False: a save that does not happen is a future miss, never a correctness problem."""
        return False

    # ==== scheduler side (engine core process, scheduler thread) ================================

    @contained(lambda: (0, False))
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Called for each waiting request every step until it is scheduled (and again after a
        preemption). Answers None while the workers look the prompt up in the mesh (at most
        ``lookup_timeout_ms``), then the tokens beyond ``num_computed_tokens`` it can load and
        whether the load is asynchronous. Never blocks."""
        assert self._scheduler is not None
        return self._scheduler.match(request, num_computed_tokens)

    @contained(lambda: None)
    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Called once when vLLM allocated the request's blocks (twice for async loads; the
        second call is ignored). Plans the load of ``num_external_tokens`` into ``blocks``; the
        blocks stay vLLM's, written by the workers before vLLM reads them."""
        assert self._scheduler is not None
        self._scheduler.allocated(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Called once per step, after scheduling. Returns this step's orders (the connector
        keeps no reference) and plans the saves of chunks this step completes."""
        assert self._scheduler is not None
        return self._scheduler.orders(scheduler_output)

    @contained(lambda: None)
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Called once per step with the workers' merged output; takes their fetch reports."""
        assert self._scheduler is not None
        report = connector_output.kv_connector_worker_meta
        if isinstance(report, MeshWorkerReport):
            self._scheduler.reported(report)

    @contained(lambda: (False, None))
    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Called once when a request finishes or is aborted, before vLLM frees its blocks.
        Returns (False, None): saves finished within their step, so the blocks are free now."""
        assert self._scheduler is not None
        self._scheduler.finished(request)
        return False, None

    # ==== worker side (one per TP rank, model-runner thread) ====================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Called once after vLLM allocated the KV cache (``[blocks, ...]`` view per layer,
        owned by vLLM). Fixes the chunk geometry and starts this rank's mesh member; for a
        cache meshkv cannot share, logs one line and passes through. Never raises."""
        assert self._worker is not None
        try:
            self._register(kv_caches)
        except Exception as error:
            why = str(error) if isinstance(error, UnsupportedCache) else repr(error)
            logger.warning(
                "meshkv cannot share this engine's KV cache (%s); running as a pass-through: "
                "no KV is loaded from or saved to the mesh",
                why,
            )
            logger.debug("meshkv: why registration failed", exc_info=True)
            try:
                self._worker.pass_through(rank=self._rank_in_engine())
            except Exception:  # still never raises into vLLM's start
                logger.exception("meshkv: could not tell this pass-through worker's rank")

    def _rank_in_engine(self) -> int:
        """This worker's rank, so a pass-through rank still answers fetches as itself (the
        scheduler side waits for every rank); 0 where vLLM set up no process groups (one
        worker)."""
        from vllm.distributed.parallel_state import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            model_parallel_is_initialized,
        )

        if not model_parallel_is_initialized():
            return 0
        return worker_rank(
            self._vllm_config,
            tp_rank=get_tensor_model_parallel_rank(),
            pp_rank=get_pp_group().rank_in_group,
        )

    def _register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Judge the cache first (`UnsupportedCache`), then ask vLLM where this worker sits."""
        assert self._worker is not None
        groups = len(self._kv_cache_config.kv_cache_groups)
        if groups != 1:
            raise UnsupportedCache(
                f"{groups} KV-cache groups (a hybrid model, or sliding-window layers beside "
                "full attention); meshkv shares models with one group"
            )
        geometry_of(
            kv_caches,
            num_blocks=self._kv_cache_config.num_blocks,
            block_size_tokens=self._vllm_config.cache_config.block_size,
            chunk_size_tokens=self._config.chunk_size,
        )
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        from vllm.platforms import current_platform

        from meshkv.connector.worker import WorkerPlace

        first_layer = self._vllm_config.compilation_config.static_forward_context.get(
            next(iter(kv_caches), "")
        )
        backend = getattr(getattr(first_layer, "attn_backend", None), "get_name", None)
        layout = self._vllm_config.cache_config.get_resolved_kv_cache_layout().name
        place = WorkerPlace(
            tp_rank=get_tensor_model_parallel_rank(),
            pp_rank=get_pp_group().rank_in_group,
            device_type=current_platform.device_type,
            layout_name=f"{backend() if backend else 'unknown'}/{layout}",
        )
        self._worker.register(kv_caches, num_blocks=self._kv_cache_config.num_blocks, place=place)

    @contained(lambda: None)
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Called once per step with this step's orders bound: applies intros and fetches,
        completes synchronous loads (before the forward when vLLM says the step has any) and
        starts asynchronous ones."""
        assert self._worker is not None
        self._worker.start_step(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Called before each attention layer runs. Nothing to wait for on the host: the
        forward stream already waits for the synchronous loads started in `start_load_kv`
        (on the CPU they completed there), and async-loaded requests are not in the batch."""

    @contained(lambda: None)
    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Called after each attention layer runs. On CUDA, starts copying this layer's blocks
        of the chunks this step completes, on the copy stream, beside the next layers' forward
        (on the CPU every layer is copied in `wait_for_save`). Never waits."""
        assert self._worker is not None
        self._worker.save_layer(layer_name, self._get_connector_metadata())

    @contained(lambda: None)
    def wait_for_save(self) -> None:
        """Called once per step after the forward (also on empty steps). Finishes copying the
        chunks this step completed out of vLLM's blocks (the forward stream waits for those
        copies, so the blocks may be reused next step; the mesh gets the bytes once they reached
        host memory) and applies the step's releases."""
        assert self._worker is not None
        self._worker.finish_step(self._get_connector_metadata())

    @contained(lambda: (None, None))
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Called once per step. Returns (None, requests whose async load ended since the last
        call, successful or not); meshkv never delays freeing blocks for a save."""
        assert self._worker is not None
        return None, self._worker.take_finished_loads()

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Called once per step: blocks promised to vLLM that could not be written since the
        last call (vLLM recomputes them). Never raises."""
        if self._worker is None:
            return set()
        try:
            return self._worker.take_failed_blocks()
        except Exception:
            logger.exception("meshkv connector: could not collect failed blocks")
            return set()

    @contained(lambda: None)
    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """Called once per step: fetch results since the last call, for the scheduler side."""
        assert self._worker is not None
        report = self._worker.take_report()
        return report if report.found else None

    @contained(lambda: None)
    def shutdown(self) -> None:
        """Called once when the worker exits: leaves the mesh and frees its memory."""
        if self._worker is not None:
            self._worker.close()


__all__ = ["MeshKVConnector", "MeshStepOrders"]
