"""The copies between vLLM's blocks and host chunk buffers, ordered by events against the forward.

One `CopyQueue` per worker, over one `CopyDevice` (copy_device.py) and one `BlockCopier`
(geometry.py). The same code runs on the CPU, where every copy is synchronous, and on CUDA:

- **Saves** (one batch per step). `open_saves` takes the step's chunks; after each layer's
  forward, `save_layer` records an event on the forward stream, makes the copy stream wait for
  it and gathers that layer's blocks of every chunk in one batched copy into device staging;
  `close_saves` gathers any layer not gathered yet, makes the forward stream wait for the
  gathers (vLLM may hand the blocks to another request next step), copies the staging to
  page-locked host memory and hands the chunks over (``on_saved``) only once that copy's event
  has completed.
- **Loads**. `load` copies chunks from host buffers (page-locked; a buffer that is not is first
  copied into one that is) into device staging and scatters each layer's blocks in one batched
  copy, on the copy stream, after an event on the forward stream. A synchronous load (made on
  the model-runner thread before the forward) makes the forward stream wait for it; an async
  one (from the fetch thread) starts after the event its order carried. ``on_loaded`` (which
  checks the chunks and releases their slots) runs only once the copy's event completed. A
  cache in host memory (the CPU) needs no staging: each chunk is copied from its buffer straight
  into its blocks.
- `poll` runs the hand-overs of completed copies; it never waits, except with ``settle``, for
  synchronous loads the forward has already waited for. Nothing blocks the forward stream on
  the host; nothing calls ``torch.cuda.synchronize()``.

Threads: `load` with ``after`` may be called from any thread; everything else from vLLM's
model-runner thread, which is also where hand-overs run. This module knows block ids, chunk
buffers and events; it knows nothing of keys, requests or the mesh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from meshkv.connector.copy_device import CopyDevice, CopyEvent
from meshkv.connector.geometry import BlockCopier
from meshkv.errors import UsageError

logger = logging.getLogger("vllm.meshkv.connector.copy_queue")

COPY_BATCH_BYTES_MAX = 1 << 30
"""Device staging for one step's saves, or for one group of a load's chunks (on CUDA: GPU
memory outside vLLM's budget, freed when the copy completes). A step's chunks beyond it are not
saved (a later miss); a larger load is copied in several groups. At least one chunk always fits."""
SAVES_IN_FLIGHT_MAX = 4
"""Save batches whose copy to host memory has not completed (each holds its staging and its
pinned host buffer: at most this many times `COPY_BATCH_BYTES_MAX` of each). Past it a step's
saves are dropped (a later miss) rather than make the host wait for the device."""


@dataclass(slots=True, eq=False)  # identity: a copy is itself, whatever its buffers hold
class _Pending:
    done: CopyEvent
    on_done: Callable[[], None]
    settle: bool
    """A synchronous load: the forward waited for it; the step's report waits too."""
    is_save: bool
    keep: tuple[object, ...] = ()
    """Buffers the device may still read or write until ``done`` completed."""


@dataclass(slots=True)
class _SaveBatch:
    block_ids: torch.Tensor  # [chunks, blocks_per_chunk] on the cache's device
    staging: torch.Tensor  # chunks * chunk_bytes, on the cache's device
    view: torch.Tensor  # staging as [chunks, layers, blocks, *block]
    on_saved: Callable[[list[np.ndarray]], None]
    gathered: set[int] = field(default_factory=set)


class CopyQueue:
    """Event-ordered, batched block copies for one engine's KV cache (see the module doc)."""

    def __init__(self, device: CopyDevice, copier: BlockCopier) -> None:
        self.device = device
        self.copier = copier
        self._chunk_bytes = copier.geometry.chunk_bytes
        self._batch_chunks_max = max(1, COPY_BATCH_BYTES_MAX // self._chunk_bytes)
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._batch: _SaveBatch | None = None  # model-runner thread only

    # -- saves ---------------------------------------------------------------------------------
    def open_saves(
        self,
        chunk_block_ids: Sequence[Sequence[int]],
        on_saved: Callable[[list[np.ndarray]], None],
    ) -> int:
        """Start this step's save batch of chunks (each its blocks' ids, in token order); returns
        how many leading chunks it takes (0: none, the rest are not saved this step).
        ``on_saved`` later gets those chunks' bytes, each a chunk_bytes host array."""
        if self._batch is not None:
            raise UsageError("a save batch is already open this step")
        self.poll()
        with self._lock:
            in_flight = sum(p.is_save for p in self._pending)
        if in_flight >= SAVES_IN_FLIGHT_MAX:
            logger.debug("%d save batches in flight: this step's saves are dropped", in_flight)
            return 0
        chunks = [list(ids) for ids in chunk_block_ids[: self._batch_chunks_max]]
        if not chunks:
            return 0
        with self.device.on_copy_stream():
            ids = self.device.to_device(torch.tensor(chunks, dtype=torch.long))
            staging = self.device.device_buffer(len(chunks) * self._chunk_bytes)
        view = self.copier.batch_view(staging, len(chunks))
        self._batch = _SaveBatch(ids, staging, view, on_saved)
        return len(chunks)

    def save_layer(self, layer: int) -> None:
        """After ``layer``'s forward: gather its blocks of the open batch (on a device that
        overlaps copies with the forward; elsewhere `close_saves` gathers every layer)."""
        batch = self._batch
        if batch is not None and self.device.overlaps_forward and layer not in batch.gathered:
            self._gather(batch, [layer])

    def close_saves(self) -> None:
        """After the forward: finish the open batch (if any) as the module doc says."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        device, copy_stream = self.device, self.device.copy_stream()
        missing = [
            layer for layer in range(self.copier.geometry.num_layers) if layer not in batch.gathered
        ]
        if missing:
            self._gather(batch, missing)
        gathered = device.event()
        gathered.record(copy_stream)
        device.forward_stream().wait_event(gathered)
        host = batch.staging
        if not device.staging_is_host:
            host = device.host_buffer(batch.staging.numel())
            with device.on_copy_stream():
                host.copy_(batch.staging, non_blocking=True)
        done = device.event()
        done.record(copy_stream)
        size = self._chunk_bytes
        chunks = [host[i * size : (i + 1) * size].numpy() for i in range(len(batch.block_ids))]
        self._add(
            _Pending(
                done,
                lambda: batch.on_saved(chunks),
                settle=False,
                is_save=True,
                keep=(batch.staging, host),
            )
        )
        self.poll()

    def _gather(self, batch: _SaveBatch, layers: list[int]) -> None:
        ready = self.device.event()
        ready.record(self.device.forward_stream())
        self.device.copy_stream().wait_event(ready)
        with self.device.on_copy_stream():
            for layer in layers:
                self.copier.gather_layer(layer, batch.block_ids, batch.view[:, layer])
                batch.gathered.add(layer)

    # -- loads ---------------------------------------------------------------------------------
    def load(
        self,
        sources: Sequence[np.ndarray],
        block_ids: Sequence[int],
        *,
        skip_blocks: int,
        on_loaded: Callable[[], None],
        after: CopyEvent | None = None,
    ) -> None:
        """Copy chunks ``sources`` (host arrays of at least chunk_bytes each) into ``block_ids``:
        every block of every chunk except the first ``skip_blocks`` of the first, in order.

        ``after`` None: a synchronous load on the model-runner thread, before the forward: the
        copy starts after the forward stream's work so far and the forward stream waits for
        it. Otherwise an async load: the copy starts after ``after``. Either way ``on_loaded``
        runs (in `poll`) only once the copy completed, and every source must stay untouched by
        this process until then."""
        per_chunk = self.copier.geometry.blocks_per_chunk
        if not 0 <= skip_blocks < per_chunk or len(block_ids) != len(sources) * per_chunk - (
            skip_blocks if sources else 0
        ):
            raise UsageError(
                f"a load of {len(sources)} chunks skipping {skip_blocks} blocks got "
                f"{len(block_ids)} block ids"
            )
        device = self.device
        synchronous = after is None
        if after is None:
            after = device.event()
            after.record(device.forward_stream())
        device.copy_stream().wait_event(after)
        keep: list[object] = []
        with device.on_copy_stream():
            if device.staging_is_host:
                self._load_in_place(sources, block_ids, skip_blocks)
            else:
                for start in range(0, len(sources), self._batch_chunks_max):
                    group = sources[start : start + self._batch_chunks_max]
                    first = 0 if start == 0 else start * per_chunk - skip_blocks
                    skip = skip_blocks if start == 0 else 0
                    ids = block_ids[first : first + len(group) * per_chunk - skip]
                    keep.extend(self._load_group(group, ids, skip))
        done = device.event()
        done.record(device.copy_stream())
        if synchronous:
            device.forward_stream().wait_event(done)
        self._add(_Pending(done, on_loaded, settle=synchronous, is_save=False, keep=tuple(keep)))
        if synchronous:
            self.poll()

    def _load_in_place(
        self, sources: Sequence[np.ndarray], block_ids: Sequence[int], skip: int
    ) -> None:
        """The cache is in host memory: copy each chunk straight from its buffer into its
        blocks (`BlockCopier.scatter_chunk`), no staging."""
        per_chunk, first = self.copier.geometry.blocks_per_chunk, 0
        for index, source in enumerate(sources):
            head = skip if index == 0 else 0
            self.copier.scatter_chunk(block_ids[first : first + per_chunk - head], source, head)
            first += per_chunk - head

    def _load_group(
        self, group: Sequence[np.ndarray], ids: Sequence[int], skip: int
    ) -> list[torch.Tensor]:
        """Stage a group of chunks on the device and scatter it, layer by layer; returns the
        host buffers the copy reads."""
        device, size = self.device, self._chunk_bytes
        hosts = [torch.from_numpy(source[:size]) for source in group]
        staging = device.device_buffer(len(group) * size)
        for index, host in enumerate(hosts):
            if not device.is_pinned(host):  # never a pageable source on a device copy
                bounce = device.host_buffer(size)
                bounce.copy_(host)
                hosts[index] = host = bounce
            staging[index * size : (index + 1) * size].copy_(host, non_blocking=True)
        view = self.copier.batch_view(staging, len(group))
        per_chunk = self.copier.geometry.blocks_per_chunk
        head = device.to_device(torch.tensor([ids[: per_chunk - skip]], dtype=torch.long))
        rest = device.to_device(
            torch.tensor(ids[per_chunk - skip :], dtype=torch.long).view(-1, per_chunk)
        )
        for layer in range(self.copier.geometry.num_layers):
            self.copier.scatter_layer(layer, head, view[:1, layer, skip:])
            if len(group) > 1:
                self.copier.scatter_layer(layer, rest, view[1:, layer])
        return hosts

    # -- completions ---------------------------------------------------------------------------
    def _add(self, pending: _Pending) -> None:
        with self._lock:
            self._pending.append(pending)

    def poll(self, *, settle: bool = False) -> None:
        """Run the hand-overs of completed copies, oldest first (model-runner thread). With
        ``settle``, first wait for the synchronous loads, which the forward waited for."""
        with self._lock:
            pending = list(self._pending)
        if settle:
            for entry in pending:
                if entry.settle:
                    entry.done.synchronize()
        completed = [entry for entry in pending if entry.done.query()]
        with self._lock:
            self._pending = [entry for entry in self._pending if entry not in completed]
        for entry in completed:
            try:
                entry.on_done()
            except Exception:
                logger.exception("a copy's hand-over failed; treated as a miss")

    def drain(self) -> None:
        """Wait for every copy and run its hand-over (at close)."""
        with self._lock:
            pending = list(self._pending)
        for entry in pending:
            entry.done.synchronize()
        self.poll()

    @property
    def in_flight(self) -> int:
        """Copies whose hand-over has not run yet."""
        with self._lock:
            return len(self._pending)
