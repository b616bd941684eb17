"""Worker side of MeshKVConnector: one mesh member per worker, and the block copies.

Each vLLM worker process owns one `MeshNode` (started in `register`, once the KV cache exists
and the chunk geometry is known) and carries out the scheduler side's orders each step:

- intros: compute the request's chunk keys (this rank's namespace, the request's cache_salt);
- fetches: on the fetch thread, pin the leading chunks found in the mesh (fetching remote ones
  into the local store) and report how many; or, for async loading, only count them;
- loads: copy pinned chunks into vLLM's blocks - before the forward (the forward stream waits
  for the copy), or from the fetch thread for async loads, which report through
  `take_finished_loads` once their copy completed. Each chunk is checked against its checksum
  after its copy completed and before its slot is released. Blocks that could not be written,
  or whose chunk failed that check, are reported (`take_failed_blocks`) so vLLM recomputes them;
- saves: the chunks a step completes are gathered out of the blocks layer by layer as the
  forward goes (`save_layer`, on CUDA) or after it, and `put` once their copy to host memory
  completed (stored here at once, pushed to their home in the background);
- unstage / forget: release pins and per-request state.

The copies themselves, and their ordering against the forward, are `CopyQueue`'s; the store's
segments are page-locked for the copy device at `register` (CUDA reads and writes them
directly). Ownership: vLLM owns the KV cache; the node owns its store; pins on the store are
this module's (one lease per staged request, released on load, unstage, forget or close; one
per load, released when its copy completed). Threads: vLLM's model-runner thread calls every
public method and runs the copies' hand-overs; one fetch thread runs fetches and starts async
loads. Shared state between them sits behind ``_lock``.

This module knows vLLM's worker-side objects and the MeshNode API, not the wire or the ring.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from meshkv.connector.copy_device import CopyDevice, CopyEvent, copy_device_for
from meshkv.connector.copy_queue import CopyQueue
from meshkv.connector.geometry import BlockCopier, ChunkGeometry, geometry_of
from meshkv.connector.identity import namespace_for, worker_rank, worker_world_size
from meshkv.connector.metadata import Fetch, Load, MeshStepOrders, MeshWorkerReport
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.keys import chunk_keys, root_key
from meshkv.member_meta import ROLE_ENGINE
from meshkv.node import ChainSlice, ChunkLease, MeshNode, build_member

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from meshkv.config import MeshConfig

logger = logging.getLogger("vllm.meshkv.connector.worker")

IDLE_STEP_FETCH_WAIT_S = 0.05
"""Longest an idle step (no forward) waits for the fetches it ordered before reporting. Their
results then reach the scheduler with this step; without the wait it spins empty steps asking
again (measured: 2-17 per mesh hit) that share the core and the GIL with the fetch. Only idle
steps wait, so no forward is ever delayed; a request that arrives meanwhile waits at most this
long to be scheduled. A fetch still out after it is reported at a later step, as before."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerPlace:
    """Where this worker sits: its ranks and the cache layout of its attention backend."""

    tp_rank: int
    pp_rank: int
    device_type: str
    layout_name: str
    """Attention backend and resolved KV layout, e.g. "CPU_ATTN/LBHNC"."""


@dataclass(frozen=True, slots=True)
class _Staged:
    lease: ChunkLease
    first_chunk: int
    """The prompt chunk the lease's first chunk is."""
    fetch_s: float


@dataclass(frozen=True, slots=True)
class _FetchJob:
    fetch: Fetch
    keys: list[bytes]
    queued_s: float
    """time.perf_counter() when the order reached this worker (for the timing log)."""


@dataclass(frozen=True, slots=True)
class _LoadJob:
    load: Load
    keys: list[bytes]
    after: CopyEvent
    """Recorded on the forward stream when the order arrived: the copy starts after it."""


class MeshWorker:
    """MeshKVConnector(role=WORKER) logic for one worker (a TP rank of a pipeline stage)."""

    def __init__(
        self, vllm_config: VllmConfig, config: MeshConfig, tuning: DataPlaneConfig | None = None
    ) -> None:
        self._vllm_config = vllm_config
        self._config = config
        self._tuning = tuning = tuning or DataPlaneConfig()
        self._geometry: ChunkGeometry | None = None
        self._copies: CopyQueue | None = None
        self._layer_index: dict[str, int] = {}
        self._saves_open = False  # model thread only: this step's save batch was opened
        self._pinned: list[np.ndarray] = []
        self._node: MeshNode | None = None
        self._rank = 0
        self._root_digest = b""
        self._keys: dict[str, list[bytes]] = {}  # model thread only
        self._lock = threading.Lock()
        self._fetch_ended = threading.Condition(self._lock)
        self._step_fetch_ids: list[int] = []  # model thread only: idle step's fetches
        self._staged: dict[str, _Staged] = {}
        self._inflight_fetch: dict[str, int] = {}
        self._cancelled_fetches: set[int] = set()
        self._found: dict[int, int] = {}
        self._finished_loads: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._jobs: queue.Queue[_FetchJob | _LoadJob | None] = queue.Queue(tuning.fetch_queue_max)
        self._thread: threading.Thread | None = None

    # -- lifetime ------------------------------------------------------------------------------
    def pass_through(self, *, rank: int) -> None:
        """Registration failed: hold nothing, but answer every fetch (found nothing) and load
        (failed) as worker ``rank``."""
        self._rank = rank

    def register(
        self,
        kv_caches: dict[str, torch.Tensor],
        *,
        num_blocks: int,
        place: WorkerPlace,
        device: CopyDevice | None = None,
    ) -> None:
        """Fix the geometry from vLLM's cache views and join the mesh as this rank.

        Raises `UnsupportedCache` for a cache meshkv cannot share (and then holds nothing).
        ``device`` defaults to the copy device of the cache's device."""
        vc = self._vllm_config
        geometry = geometry_of(
            kv_caches,
            num_blocks=num_blocks,
            block_size_tokens=vc.cache_config.block_size,
            chunk_size_tokens=self._config.chunk_size,
        )
        copier = BlockCopier(geometry, kv_caches, num_blocks=num_blocks)
        copies = CopyQueue(device or copy_device_for(copier.device), copier)
        self._rank = worker_rank(vc, tp_rank=place.tp_rank, pp_rank=place.pp_rank)
        namespace = namespace_for(
            vc,
            self._config,
            geometry,
            device_type=place.device_type,
            layout_name=place.layout_name,
            tp_rank=place.tp_rank,
            pp_rank=place.pp_rank,
        )
        self._root_digest = namespace.digest()
        node = build_member(
            self._config,
            ROLE_ENGINE,
            namespace=namespace.digest().hex(),  # the shim derives chunk keys from it
            rank=self._rank,
            world_size=worker_world_size(vc),
            dataplane=self._tuning,
        )
        self._pin_store(node, copies.device)
        try:
            node.start()
        except BaseException:
            self._unpin_store(copies.device)
            raise
        self._node, self._geometry, self._copies = node, geometry, copies
        self._layer_index = {name: index for index, name in enumerate(geometry.layer_names)}
        self._thread = threading.Thread(target=self._run_jobs, name="meshkv-fetch", daemon=True)
        self._thread.start()
        logger.info(
            "rank %d: member %s, namespace %s (%s), chunk %d tokens = %d blocks x %d layers "
            "= %.2f MiB",
            self._rank,
            node.name,
            namespace.label(),
            namespace.model_id,
            geometry.chunk_size_tokens,
            geometry.blocks_per_chunk,
            geometry.num_layers,
            geometry.chunk_bytes / 2**20,
        )

    def _pin_store(self, node: MeshNode, device: CopyDevice) -> None:
        """Page-lock the store's segments, the host side of every load's copy."""
        started = time.perf_counter()
        segments = [segment.buffer for segment in node.store.pool.segments]
        self._pinned = []
        try:
            for buffer in segments:
                if device.pin(buffer):
                    self._pinned.append(buffer)
        except BaseException:
            self._unpin_store(device)
            raise
        if len(self._pinned) < len(segments):
            logger.warning(
                "rank %d: %d of %d store segments could not be page-locked; loads from them "
                "are copied through pinned buffers first (slower)",
                self._rank,
                len(segments) - len(self._pinned),
                len(segments),
            )
        logger.debug("rank %d: store pinned in %.3f s", self._rank, time.perf_counter() - started)

    def _unpin_store(self, device: CopyDevice) -> None:
        for buffer in self._pinned:
            device.unpin(buffer)
        self._pinned = []

    @property
    def node(self) -> MeshNode | None:
        """This rank's mesh member (None before `register`)."""
        return self._node

    def close(self) -> None:
        """Stop the fetch thread, finish every copy, release every pin, leave the mesh."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(self._tuning.close_join_s)
            self._thread = None
        with self._lock:
            staged, self._staged = self._staged, {}
        for entry in staged.values():
            entry.lease.release()
        if self._copies is not None:
            self._copies.drain()
            self._unpin_store(self._copies.device)
        if self._node is not None:
            self._node.stop()
            self._node = None

    # -- per step (model-runner thread) --------------------------------------------------------
    def start_step(self, orders: MeshStepOrders) -> None:
        """Apply intros and fetches; start synchronous loads; queue async ones."""
        for intro in orders.intros:
            root = root_key(self._root_digest, intro.cache_salt)
            self._keys[intro.req_id] = chunk_keys(root, intro.token_ids, self._config.chunk_size)
        for fetch in orders.fetches:
            self._queue_fetch(fetch)
        self._step_fetch_ids = [f.fetch_id for f in orders.fetches] if orders.idle_step else []
        forward_mark: CopyEvent | None = None
        for load in orders.loads:
            if not load.is_async:
                self._load_staged(load)
                continue
            if forward_mark is None and self._copies is not None:
                forward_mark = self._copies.device.event()
                forward_mark.record(self._copies.device.forward_stream())
            self._queue_load(load, forward_mark)

    def save_layer(self, layer_name: str, orders: MeshStepOrders) -> None:
        """After ``layer_name``'s forward: start copying its blocks of this step's saves."""
        index = self._layer_index.get(layer_name)
        if self._copies is None or index is None or not self._copies.device.overlaps_forward:
            return
        if not self._saves_open:
            self._open_saves(orders)
        self._copies.save_layer(index)

    def finish_step(self, orders: MeshStepOrders) -> None:
        """After the forward: saves, then releases."""
        if self._copies is not None:
            if not self._saves_open:
                self._open_saves(orders)
            self._saves_open = False
            self._copies.close_saves()
        for req_id in orders.unstage:
            self._unstage(req_id)
        for req_id in orders.forget:
            self._unstage(req_id)
            self._keys.pop(req_id, None)

    def take_report(self) -> MeshWorkerReport:
        """Fetch results since the last report; an idle step first waits (at most
        `IDLE_STEP_FETCH_WAIT_S`) for the fetches it ordered, releasing the GIL meanwhile."""
        waiting, self._step_fetch_ids = self._step_fetch_ids, []
        with self._lock:
            if waiting:
                self._fetch_ended.wait_for(
                    lambda: all(i in self._found for i in waiting), IDLE_STEP_FETCH_WAIT_S
                )
            found, self._found = self._found, {}
        return MeshWorkerReport(found={self._rank: found} if found else {})

    def take_finished_loads(self) -> set[str] | None:
        if self._copies is not None:
            self._copies.poll()
        with self._lock:
            done, self._finished_loads = self._finished_loads, set()
        return done or None

    def take_failed_blocks(self) -> set[int]:
        """Blocks not loaded since the last call, this step's synchronous loads included (they
        are settled first: the forward has waited for their copies already)."""
        if self._copies is not None:
            self._copies.poll(settle=True)
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # -- fetches -------------------------------------------------------------------------------
    def _queue_fetch(self, fetch: Fetch) -> None:
        first = fetch.first_chunk
        keys = self._keys.get(fetch.req_id, [])[first : first + fetch.num_chunks]
        ready = self._node is not None and keys
        if ready and fetch.stage:
            with self._lock:
                ready = (
                    len(self._staged) + len(self._inflight_fetch) < self._tuning.staged_requests_max
                )
        if ready:
            try:
                self._jobs.put_nowait(_FetchJob(fetch, keys, time.perf_counter()))
            except queue.Full:
                ready = False
        with self._lock:
            if ready:
                self._inflight_fetch[fetch.req_id] = fetch.fetch_id
            else:
                self._found[fetch.fetch_id] = 0

    def _run_fetch(self, job: _FetchJob) -> None:
        fetch, node = job.fetch, self._node
        assert node is not None and self._geometry is not None
        timeout_s = fetch.timeout_ms / 1000 * self._tuning.fetch_share_of_lookup_timeout
        started = time.perf_counter()
        lease: ChunkLease | None = None
        if fetch.stage:  # local chunks unchecked: the load checks each after its copy
            lease = node.get(
                job.keys, self._geometry.chunk_bytes, timeout_s=timeout_s, verify=False
            )
            found = lease.count
        else:
            found = node.lookup(job.keys, timeout_s=timeout_s)
        ended = time.perf_counter()
        fetch_s = ended - started
        previous: _Staged | None = None
        with self._lock:
            if self._inflight_fetch.get(fetch.req_id) == fetch.fetch_id:
                del self._inflight_fetch[fetch.req_id]
            cancelled = fetch.fetch_id in self._cancelled_fetches
            self._cancelled_fetches.discard(fetch.fetch_id)
            keep = lease is not None and found > 0 and not cancelled
            if keep:
                previous = self._staged.pop(fetch.req_id, None)
                self._staged[fetch.req_id] = _Staged(lease, fetch.first_chunk, fetch_s)
            self._found[fetch.fetch_id] = found
            self._fetch_ended.notify_all()
        if previous is not None:
            previous.lease.release()
        if lease is not None and not keep:
            lease.release()
        logger.debug(
            "rank %d: fetch %d of %s found %d of %d chunks: queued %.2f ms, get %.2f ms, "
            "ended at wall %.6f",
            self._rank,
            fetch.fetch_id,
            fetch.req_id,
            found,
            len(job.keys),
            (started - job.queued_s) * 1000,
            fetch_s * 1000,
            time.time() - (time.perf_counter() - ended),
        )

    def _unstage(self, req_id: str) -> None:
        with self._lock:
            entry = self._staged.pop(req_id, None)
            fetch_id = self._inflight_fetch.pop(req_id, None)
            if fetch_id is not None:
                self._cancelled_fetches.add(fetch_id)
        if entry is not None:
            entry.lease.release()

    # -- loads ---------------------------------------------------------------------------------
    def _load_staged(self, load: Load) -> None:
        """A synchronous load: its chunks are those its fetch pinned (staged), unless vLLM's
        own cache grew past some of them since; then the staged lease is narrowed to the load's
        chunks, not fetched again (a second get of local chunks cost ~0.3 ms of the step)."""
        with self._lock:
            staged = self._staged.pop(load.req_id, None)
        lease: ChunkLease | None = None
        try:
            if staged is not None:
                start = load.first_chunk - staged.first_chunk
                lease = staged.lease.narrow(start, load.num_chunks)
            keys = self._keys.get(load.req_id, [])
            fetch_s = staged.fetch_s if staged else 0.0
            self._copy_in(load, keys, fetch_s=fetch_s, after=None, lease=lease)
        finally:
            if staged is not None:  # narrowed (the load owns that part now), or not used
                staged.lease.release()

    def _queue_load(self, load: Load, after: CopyEvent | None) -> None:
        if after is not None:  # None: no copy device, this worker shares nothing
            try:
                self._jobs.put_nowait(_LoadJob(load, self._keys.get(load.req_id, []), after))
                return
            except queue.Full:
                logger.warning(
                    "rank %d: fetch queue full; async load of %s fails", self._rank, load.req_id
                )
        self._loaded(load, None, time.perf_counter(), 0.0)

    def _run_load(self, job: _LoadJob) -> None:
        self._copy_in(job.load, job.keys, fetch_s=0.0, after=job.after)

    def _copy_in(
        self,
        load: Load,
        keys: list[bytes],
        *,
        fetch_s: float,
        after: CopyEvent | None,
        lease: ChunkLease | None = None,
    ) -> None:
        """Pin the load's chunks (``lease``: pinned already by its staged fetch; else local
        after a staged fetch, fetched now for async loads) and start copying them into the
        blocks (``after`` None: before this step's forward). Once the copy completed, `_loaded`
        checks them and reports every block not written. Owns ``lease`` from here on."""
        g, copies, node = self._geometry, self._copies, self._node
        started = time.perf_counter()
        try:
            wanted = keys[load.first_chunk : load.first_chunk + load.num_chunks]
            expected = load.num_chunks * g.blocks_per_chunk - load.skip_blocks if g else -1
            if g is None or copies is None or node is None or len(wanted) != load.num_chunks:
                pass
            elif len(load.block_ids) != expected:
                logger.error(
                    "rank %d: load of %s has %d blocks, expected %d",
                    self._rank,
                    load.req_id,
                    len(load.block_ids),
                    expected,
                )
            else:
                if lease is None:
                    timeout_s = self._tuning.local_get_timeout_s if not load.is_async else None
                    lease = node.get(wanted, g.chunk_bytes, timeout_s=timeout_s, verify=False)
                held = lease.count * g.blocks_per_chunk - (load.skip_blocks if lease.count else 0)
                copies.load(
                    lease.views,
                    load.block_ids[:held],
                    skip_blocks=load.skip_blocks,
                    on_loaded=functools.partial(self._loaded, load, lease, started, fetch_s),
                    after=after,
                )
                return
        except Exception:
            logger.exception(
                "rank %d: load of %s failed; treated as a miss", self._rank, load.req_id
            )
            # A copy that started reads the slots at most: only blocks reported failed change.
        if lease is not None:
            lease.release()
        self._loaded(load, None, started, fetch_s)

    def _loaded(self, load: Load, lease: ChunkLease | None, started: float, fetch_s: float) -> None:
        """A load's copy completed (or never started, ``lease`` None): check each chunk, now
        that the copy it vouches for is done and before its slot is released; report."""
        g = self._geometry
        written = 0
        if lease is not None and g is not None:
            try:
                for index in range(lease.count):
                    if not lease.intact(index):  # checked after the copy: see intact()
                        logger.error(
                            "rank %d: chunk %d of %s changed in the store; not loaded",
                            self._rank,
                            load.first_chunk + index,
                            load.req_id,
                        )
                        break
                    written += g.blocks_per_chunk - (load.skip_blocks if index == 0 else 0)
            finally:
                lease.release()
        missing = load.block_ids[written:]
        with self._lock:
            self._failed_blocks.update(missing)
            if load.is_async:
                self._finished_loads.add(load.req_id)
        if missing:
            logger.warning(
                "rank %d: %d of %d blocks of %s not loaded; vLLM recomputes them",
                self._rank,
                len(missing),
                len(load.block_ids),
                load.req_id,
            )
        if g is not None and written:
            copy_s = time.perf_counter() - started
            self._log_retrieved(load, written, g, fetch_s + copy_s)
            logger.debug(
                "rank %d: load of %s: %d blocks, staged fetch %.2f ms, get and copy %.2f ms, "
                "done at wall %.6f",
                self._rank,
                load.req_id,
                written,
                fetch_s * 1000,
                copy_s * 1000,
                time.time(),
            )

    def _log_retrieved(self, load: Load, blocks: int, g: ChunkGeometry, cost_s: float) -> None:
        size_gb = blocks * g.block_bytes * g.num_layers / 1e9
        tokens = load.num_tokens if blocks == len(load.block_ids) else blocks * g.block_size_tokens
        logger.info(
            "Retrieved %d out of total %d tokens. size: %.4f gb, cost %.4f ms, "
            "throughput: %.4f GB/s",
            tokens,
            load.prompt_tokens,
            size_gb,
            cost_s * 1000,
            size_gb / cost_s if cost_s > 0 else 0.0,
        )

    # -- saves ---------------------------------------------------------------------------------
    def _open_saves(self, orders: MeshStepOrders) -> None:
        """Open this step's save batch: every full chunk the step completed, in order."""
        self._saves_open = True
        g, copies = self._geometry, self._copies
        if g is None or copies is None or self._node is None:
            return
        keys: list[bytes] = []
        slices: list[ChainSlice] = []  # which prompt, from where: one chain entry per prompt
        chunks: list[tuple[int, ...]] = []
        per_chunk = g.blocks_per_chunk
        for save in orders.saves:
            first = save.first_chunk
            prompt_keys = self._keys.get(save.req_id, [])
            req_keys = prompt_keys[first : first + save.num_chunks]
            if len(req_keys) != save.num_chunks or len(save.block_ids) != len(req_keys) * per_chunk:
                continue
            keys.extend(req_keys)
            slices.append(ChainSlice(prompt_keys[0], first, len(req_keys)))
            chunks.extend(
                save.block_ids[i * per_chunk : (i + 1) * per_chunk] for i in range(save.num_chunks)
            )
        if chunks:
            taken = copies.open_saves(chunks, functools.partial(self._put, keys, slices))
            if taken < len(chunks):
                logger.debug(
                    "rank %d: %d chunks not saved this step", self._rank, len(chunks) - taken
                )

    def _put(self, keys: list[bytes], slices: list[ChainSlice], chunks: list[np.ndarray]) -> None:
        """A save batch reached host memory: hand its chunks to the mesh, each prompt's slice
        named by the prompt's first key (so its first home answers lookups of all of it)."""
        node = self._node
        if node is not None:
            stored = node.put(keys[: len(chunks)], chunks, chains=slices)
            logger.debug(
                "rank %d: saved %d/%d chunks (queued for their homes) at wall %.6f",
                self._rank,
                stored,
                len(chunks),
                time.time(),
            )

    # -- fetch thread --------------------------------------------------------------------------
    def _run_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if isinstance(job, _FetchJob):
                    self._run_fetch(job)
                else:
                    self._run_load(job)
            except Exception:
                logger.exception("rank %d: mesh job failed; treated as a miss", self._rank)
                if isinstance(job, _FetchJob):
                    with self._lock:
                        self._inflight_fetch.pop(job.fetch.req_id, None)
                        self._found[job.fetch.fetch_id] = 0
                        self._fetch_ended.notify_all()
