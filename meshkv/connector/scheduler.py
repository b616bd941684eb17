"""Scheduler side of MeshKVConnector: decides, per request, what to fetch, load and save.

It runs inside vLLM's engine core, on the scheduler thread, so it never blocks and never does
I/O: everything the mesh knows reaches it through the workers' step reports. A request's life:

1. `match` (vLLM's get_num_new_matched_tokens) first queues a `Fetch` of the prompt's full
   chunks beyond those vLLM's own prefix cache holds (none at all if it holds every useful one)
   to every worker (each TP rank of each pipeline stage) and answers None ("ask again next
   step"). Each worker looks them up (and, for synchronous loading, pins them in its store) and
   reports how many it found without a gap. Once every worker answered - or
   ``lookup_timeout_ms`` passed, which counts as 0 - the hit is the minimum over workers, capped
   to leave at least one token to compute.
2. `allocated` (update_state_after_alloc) turns a hit into a `Load` of the chunks not already in
   the engine's own prefix cache, into the blocks vLLM just allocated.
3. `orders` (build_connector_meta) also adds a `Save` of every prompt chunk whose tokens became
   computed this step and that the mesh did not already have (chunked prefill saves chunk by
   chunk as the prefill advances).
4. `finished` (request_finished) forgets the request; nothing waits on it (saves complete
   within the step that computed the chunks, so vLLM frees blocks at once).

A preempted request comes back through `match`; its earlier lookup is void and a new one starts.
This module knows vLLM's request and scheduler-output objects, and nothing of keys or sockets.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from meshkv.connector.metadata import (
    Fetch,
    Load,
    MeshStepOrders,
    MeshWorkerReport,
    RequestIntro,
    Save,
)

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.meshkv.connector.scheduler")


class Phase(enum.Enum):
    LOOKING = "looking"  # a Fetch is out; answer None until every rank reported or timeout
    MATCHED = "matched"  # the hit is known; waiting for vLLM to allocate blocks
    ADMITTED = "admitted"  # blocks allocated (a load, if any, is ordered)


@dataclass(slots=True, kw_only=True)
class SchedulingPolicy:
    """What the scheduler side needs from the configuration and the engine."""

    chunk_size: int
    block_size: int
    world_size: int
    """Workers that answer each fetch: TP size x PP size (`identity.worker_world_size`)."""
    lookup_timeout_ms: int
    async_loading: bool
    may_load: bool
    """kv_role is kv_consumer or kv_both."""
    may_save: bool
    """kv_role is kv_producer or kv_both."""


@dataclass(slots=True, kw_only=True)
class RequestState:
    req_id: str
    prompt_len: int
    full_chunks: int
    phase: Phase
    lookup_deadline_s: float = 0.0
    lookup_started_s: float = 0.0
    asks_again: int = 0
    """Steps answered None ("ask again") while this lookup was out (for the timing log)."""
    fetch_id: int = -1
    fetch_first_chunk: int = 0
    rank_found: dict[int, int] = field(default_factory=dict)
    hit_chunks: int = 0
    local_tokens: int = 0
    """Tokens the engine's own prefix cache held when the hit was answered."""
    staged: bool = False
    next_save_chunk: int = 0
    """Chunks below this are in the mesh already (fetched from it, or saved by us)."""


class MeshScheduler:
    """Per-request bookkeeping for MeshKVConnector(role=SCHEDULER). Single-threaded (vLLM's
    scheduler thread calls every method)."""

    def __init__(
        self, policy: SchedulingPolicy, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy
        self.clock = clock
        self._requests: dict[str, RequestState] = {}
        self._pending = MeshStepOrders()
        self._introduced: set[str] = set()
        self._fetch_owner: dict[int, str] = {}
        self._next_fetch_id = 0

    # -- vLLM's get_num_new_matched_tokens ----------------------------------------------------
    def match(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        p = self.policy
        state = self._requests.get(request.request_id)
        if state is None or state.phase is Phase.ADMITTED:
            state = self._start(request, state, num_computed_tokens)
        if state.phase is Phase.LOOKING:
            if len(state.rank_found) < p.world_size:
                if self.clock() < state.lookup_deadline_s:
                    state.asks_again += 1
                    return None, False
                logger.warning(
                    "mesh lookup for request %s timed out after %d ms; computing it",
                    state.req_id,
                    p.lookup_timeout_ms,
                )
                state.rank_found = {}
            self._resolve(state)
        state.local_tokens = num_computed_tokens
        if num_computed_tokens < state.fetch_first_chunk * p.chunk_size:
            return 0, False  # the engine's cache shrank below where the fetch started: a gap
        hit_tokens = min(state.hit_chunks * p.chunk_size, request.num_tokens - 1)
        new_tokens = hit_tokens - num_computed_tokens
        if new_tokens <= 0:
            return 0, False
        return new_tokens, p.async_loading

    def _start(
        self, request: Request, previous: RequestState | None, num_computed_tokens: int
    ) -> RequestState:
        p = self.policy
        prompt = request.prompt_token_ids
        cacheable = prompt is not None and not request.mm_features and request.lora_request is None
        prompt_len = len(prompt) if prompt is not None else 0
        full_chunks = prompt_len // p.chunk_size if cacheable else 0
        state = RequestState(
            req_id=request.request_id,
            prompt_len=prompt_len,
            full_chunks=full_chunks,
            phase=Phase.MATCHED,
            next_save_chunk=previous.next_save_chunk if previous else 0,
        )
        self._requests[state.req_id] = state
        if full_chunks == 0:
            return state
        self._introduce(state, request)
        first_chunk = num_computed_tokens // p.chunk_size
        state.next_save_chunk = max(state.next_save_chunk, first_chunk)
        useful_tokens = min(full_chunks * p.chunk_size, request.num_tokens - 1)
        if p.may_load and num_computed_tokens < useful_tokens:
            state.phase = Phase.LOOKING
            state.staged = not p.async_loading
            state.lookup_started_s = self.clock()
            state.lookup_deadline_s = state.lookup_started_s + p.lookup_timeout_ms / 1000
            state.fetch_id = self._next_fetch_id
            state.fetch_first_chunk = first_chunk
            self._next_fetch_id += 1
            self._fetch_owner[state.fetch_id] = state.req_id
            self._pending.fetches.append(
                Fetch(
                    fetch_id=state.fetch_id,
                    req_id=state.req_id,
                    first_chunk=first_chunk,
                    num_chunks=full_chunks - first_chunk,
                    stage=state.staged,
                    timeout_ms=p.lookup_timeout_ms,
                )
            )
        return state

    def _introduce(self, state: RequestState, request: Request) -> None:
        if state.req_id in self._introduced:
            return
        tokens = np.asarray(
            request.prompt_token_ids[: state.full_chunks * self.policy.chunk_size],
            dtype=np.uint32,
        )
        self._pending.intros.append(
            RequestIntro(req_id=state.req_id, token_ids=tokens, cache_salt=request.cache_salt)
        )
        self._introduced.add(state.req_id)

    def _resolve(self, state: RequestState) -> None:
        self._fetch_owner.pop(state.fetch_id, None)
        found = min(state.rank_found.values(), default=0)
        state.hit_chunks = min(state.fetch_first_chunk + found, state.full_chunks) if found else 0
        state.phase = Phase.MATCHED
        if state.staged and state.hit_chunks == 0:
            self._unstage(state)
        state.next_save_chunk = max(state.next_save_chunk, state.hit_chunks)
        logger.debug(
            "lookup of %s: %d of %d chunks after %.2f ms and %d asks again, at wall %.6f",
            state.req_id,
            state.hit_chunks,
            state.full_chunks,
            (self.clock() - state.lookup_started_s) * 1000,
            state.asks_again,
            time.time(),
        )

    def _unstage(self, state: RequestState) -> None:
        if state.staged:
            self._pending.unstage.append(state.req_id)
            state.staged = False

    # -- vLLM's update_state_after_alloc -------------------------------------------------------
    def allocated(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None or state.phase is Phase.ADMITTED:
            return  # not ours, or the second call after an async load completed
        state.phase = Phase.ADMITTED
        if num_external_tokens <= 0:
            self._unstage(state)
            return
        p = self.policy
        blocks_per_chunk = p.chunk_size // p.block_size
        first_chunk = state.local_tokens // p.chunk_size
        skip_blocks = (state.local_tokens % p.chunk_size) // p.block_size
        group_blocks = blocks.get_block_ids()[0]
        wanted = group_blocks[first_chunk * blocks_per_chunk : state.hit_chunks * blocks_per_chunk]
        self._pending.loads.append(
            Load(
                req_id=state.req_id,
                first_chunk=first_chunk,
                num_chunks=state.hit_chunks - first_chunk,
                skip_blocks=skip_blocks,
                block_ids=tuple(wanted[skip_blocks:]),
                is_async=p.async_loading,
                num_tokens=num_external_tokens,
                prompt_tokens=state.prompt_len,
            )
        )
        state.staged = False  # the Load consumes (and frees) the staged chunks

    # -- vLLM's build_connector_meta -----------------------------------------------------------
    def orders(self, scheduler_output: SchedulerOutput) -> MeshStepOrders:
        """This step's orders. Queued loads are handed over first, so that a failure while
        planning saves (optional work) can never lose a load vLLM was promised."""
        orders, self._pending = self._pending, MeshStepOrders()
        orders.idle_step = scheduler_output.total_num_scheduled_tokens == 0
        if self.policy.may_save:
            try:
                self._plan_saves(scheduler_output, orders)
            except Exception:
                logger.exception("planning this step's saves failed; it saves nothing")
        return orders

    def _plan_saves(self, out: SchedulerOutput, orders: MeshStepOrders) -> None:
        block_state = out.kv_connector_block_state
        if block_state is None:
            return
        computed_before = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        computed_before.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        p = self.policy
        blocks_per_chunk = p.chunk_size // p.block_size
        for req_id, num_scheduled in out.num_scheduled_tokens.items():
            state = self._requests.get(req_id)
            if state is None or state.phase is not Phase.ADMITTED:
                continue
            done = min(computed_before.get(req_id, 0) + num_scheduled, state.prompt_len)
            upto = min(done // p.chunk_size, state.full_chunks)
            if upto <= state.next_save_chunk:
                continue
            groups = block_state.get_block_ids(req_id)
            if not groups:
                continue
            first = state.next_save_chunk
            block_ids = groups[0][first * blocks_per_chunk : upto * blocks_per_chunk]
            if len(block_ids) != (upto - first) * blocks_per_chunk:
                continue  # blocks not all allocated (cannot happen for computed tokens)
            orders.saves.append(
                Save(
                    req_id=req_id,
                    first_chunk=first,
                    num_chunks=upto - first,
                    block_ids=tuple(block_ids),
                )
            )
            state.next_save_chunk = upto

    # -- vLLM's update_connector_output --------------------------------------------------------
    def reported(self, report: MeshWorkerReport) -> None:
        for rank, results in report.found.items():
            for fetch_id, found in results.items():
                state = self._requests.get(self._fetch_owner.get(fetch_id, ""))
                if state is not None and state.phase is Phase.LOOKING:
                    state.rank_found[rank] = found

    # -- vLLM's request_finished ---------------------------------------------------------------
    def finished(self, request: Request) -> None:
        state = self._requests.pop(request.request_id, None)
        if state is not None:
            self._fetch_owner.pop(state.fetch_id, None)
        if request.request_id in self._introduced:  # staging needs an intro: forget covers it
            self._introduced.discard(request.request_id)
            self._pending.forget.append(request.request_id)

    def tracked_requests(self) -> int:
        """Requests with state here (for tests and leak checks)."""
        return len(self._requests)
