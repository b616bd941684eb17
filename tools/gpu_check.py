"""GPU check of meshkv's copy path (issue 14): correctness and speed on one CUDA device.

Needs only torch (CUDA) and meshkv's core dependencies (numpy, xxhash; no vLLM): it builds
per-layer KV caches the way vLLM 0.32 allocates them (one logical ``[B, H, N, C]`` view per
layer, strides permuted by the `KVCacheLayout`) in every layout a CUDA backend can get, and
drives `meshkv.connector.copy_queue.CopyQueue` over `CudaCopyDevice` against a real
`ChunkStore` whose segments are page-locked, exactly as the connector's worker does. Per layout,
side by side in one run:

1. **save** of ``--chunks`` chunks (default 16 x 256 tokens = 4,096) from the cache's blocks to
   host memory (``save``: until the chunks are handed over) and into the store (``save+store``:
   plus the store's copy and checksum), and **load** from the store's slots into other blocks
   (``load``: until the copy completed; ``load+check``: plus every chunk's checksum check);
   each bit-exact: every byte compared with an independent gather of the blocks, and every
   block not named checked untouched;
2. throughput of each against a plain pinned ``tensor.copy_`` of one contiguous buffer of the
   same bytes, each way (the PCIe ceiling here): ratio = ceiling time / path time;
3. correctness under concurrency: the forward stream runs a long matmul and then writes each
   layer's saved blocks (as attention would) and other blocks, then the next step overwrites
   the saved blocks at once; a synchronous load is read back on the forward stream, an async
   load lands while the forward keeps writing other blocks. Wrong bytes must be 0;
4. forward-stream stall: a fixed matmul loop per layer on the forward stream, timed by CUDA
   events over several steps, with and without each step's saves running beside it.

Targets (issue 14): 0 wrong bytes; save and load each >= 80 % of the ceiling; the forward slowed
by <= 10 %. Writes JSON (``--json``) and prints a table. Sized to finish well within 5 minutes
on an H100 (about 7 GiB of GPU memory and 2 GiB of host memory per layout); not yet run on one.

``--device cpu`` runs parts 1 and 3 through the same code with `CpuCopyDevice` on small shapes
(the CI test runs it so this script cannot rot); its speeds mean nothing and are not reported.

    python tools/gpu_check.py --json gpu_check.json
    python tools/gpu_check.py --layouts LBNHC,LBHNC --runs 3
    python tools/gpu_check.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a bare checkout runs as it is
from meshkv.connector.copy_device import CopyDevice, CpuCopyDevice, CudaCopyDevice
from meshkv.connector.copy_queue import CopyQueue
from meshkv.connector.geometry import BlockCopier, geometry_of
from meshkv.store import ChunkStore, Slot, chunk_checksum

LAYOUTS = {  # vllm/v1/kv_cache_layout.py: physical order of the logical [L, B, H, N, C] axes
    "LBNHC": (0, 1, 3, 2, 4),  # FlashAttention, Triton, FlashInfer (not SM100): the default
    "LBHNC": (0, 1, 2, 3, 4),  # FlashInfer on SM100; the CPU backend
    "BLHNC": (1, 0, 2, 3, 4),  # FlashInfer on SM100; block-outermost (layers interleaved)
    "BLNHC": (1, 0, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),  # a block is one run per head
    "BHLNC": (1, 2, 0, 3, 4),
}
WAIT_S = 60.0
"""Deadline of any one wait for a copy's hand-over."""


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_size: int
    block_tokens: int
    chunk_tokens: int
    chunks: int
    matmul: int
    """Side of the square bf16 matmul each layer of the stall check runs."""

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_tokens


LLAMA_3_8B = Shape(
    layers=32, kv_heads=8, head_size=128, block_tokens=16, chunk_tokens=256, chunks=16, matmul=8192
)
SMALL = Shape(
    layers=4, kv_heads=2, head_size=64, block_tokens=16, chunk_tokens=64, chunks=4, matmul=256
)


def make_caches(shape: Shape, layout: str, num_blocks: int, device: torch.device, seed: int):
    """Per-layer bf16 views of one allocation, as vLLM's ``create_kv_cache_views``, filled
    with random bytes (every bit pattern)."""
    logical = (shape.layers, num_blocks, shape.kv_heads, shape.block_tokens, 2 * shape.head_size)
    strides, size = [0] * 5, 1
    for dim in reversed(LAYOUTS[layout]):
        strides[dim] = size
        size *= logical[dim]
    generator = torch.Generator(device=device).manual_seed(seed)
    raw = torch.randint(0, 256, (size * 2,), dtype=torch.uint8, device=device, generator=generator)
    view = raw.view(torch.bfloat16).as_strided(logical, strides)
    return {f"model.layers.{layer}.self_attn.attn": view[layer] for layer in range(shape.layers)}


def block_bytes(caches: dict[str, torch.Tensor], blocks: list[int]) -> torch.Tensor:
    """The chunk format, built without the copier: layer by layer, the blocks in order."""
    index = torch.tensor(blocks, device=next(iter(caches.values())).device)
    return torch.cat([cache[index].view(torch.uint8).flatten() for cache in caches.values()])


def wrong(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum().item()) if a.shape == b.shape else max(a.numel(), b.numel())


class Rig:
    """One layout: a source cache, a target cache, a pinned store and the copy queue."""

    def __init__(self, shape: Shape, layout: str, device: torch.device, copy: CopyDevice) -> None:
        self.shape, self.device = shape, device
        self.num_blocks = 4 * shape.chunks * shape.blocks_per_chunk
        self.source = make_caches(shape, layout, self.num_blocks, device, seed=1)
        self.target = make_caches(shape, layout, self.num_blocks, device, seed=2)
        g = geometry_of(
            self.source,
            num_blocks=self.num_blocks,
            block_size_tokens=shape.block_tokens,
            chunk_size_tokens=shape.chunk_tokens,
        )
        self.geometry = g
        self.queue = CopyQueue(copy, BlockCopier(g, self.source, num_blocks=self.num_blocks))
        self.into = CopyQueue(copy, BlockCopier(g, self.target, num_blocks=self.num_blocks))
        self.store = ChunkStore.with_budget(
            3 * shape.chunks * g.chunk_bytes + (64 << 20), populate=True
        )
        self.pinned = [s.buffer for s in self.store.pool.segments if copy.pin(s.buffer)]
        self.copy = copy
        self.serial = 0

    def close(self) -> None:
        for buffer in self.pinned:
            self.copy.unpin(buffer)

    def chunk_ids(self, first_block: int) -> list[list[int]]:
        per = self.shape.blocks_per_chunk
        return [
            list(range(first_block + c * per, first_block + (c + 1) * per))
            for c in range(self.shape.chunks)
        ]

    def wait(self, queue: CopyQueue, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("a copy was not handed over in time")
            queue.poll()

    def save(self, chunks: list[list[int]], per_layer: Callable[[int], None] | None = None):
        """Save ``chunks`` of the source into fresh keys; returns (keys, save_s, stored_s)."""
        self.serial += 1
        keys = [self.serial.to_bytes(8, "big") + c.to_bytes(8, "big") for c in range(len(chunks))]
        marks: dict[str, float] = {}

        def on_saved(data: list[np.ndarray]) -> None:
            marks["copied"] = time.perf_counter()
            for key, chunk in zip(keys, data, strict=True):  # what MeshNode.put does
                slot = self.store.reserve(key, chunk.nbytes, owner="check", deadline_s=1e18)
                assert isinstance(slot, Slot), f"the store refused a chunk: {slot}"
                view = self.store.view(slot)
                view[:] = chunk
                self.store.commit(key, chunk_checksum(view), owner="check")
            marks["stored"] = time.perf_counter()

        started = time.perf_counter()
        assert self.queue.open_saves(chunks, on_saved) == len(chunks)
        for layer in range(self.shape.layers):
            if per_layer is not None:
                per_layer(layer)
            self.queue.save_layer(layer)
        self.queue.close_saves()
        self.wait(self.queue, lambda: "stored" in marks)
        return keys, marks["copied"] - started, marks["stored"] - started

    def load(self, keys: list[bytes], chunks: list[list[int]], *, after=None, during=None):
        """Load ``keys`` from the store into ``chunks`` of the target; returns (load_s,
        checked_s, chunks that failed their checksum)."""
        slots = self.store.pin(keys, owner="check", deadline_s=1e18)
        marks: dict[str, float] = {}
        failed: list[int] = []

        def on_loaded() -> None:
            marks["copied"] = time.perf_counter()
            failed.extend(i for i, s in enumerate(slots) if self.store.checksum(s) != s.checksum)
            self.store.unpin(slots, owner="check")
            marks["checked"] = time.perf_counter()

        started = time.perf_counter()
        ids = [block for chunk in chunks for block in chunk]
        views = [self.store.view(slot) for slot in slots]
        self.into.load(views, ids, skip_blocks=0, on_loaded=on_loaded, after=after)
        if during is not None:
            during()
        self.wait(self.into, lambda: "checked" in marks)
        return marks["copied"] - started, marks["checked"] - started, failed

    def stored_bytes(self, key: bytes) -> torch.Tensor:
        (slot,) = self.store.pin([key], owner="read", deadline_s=1e18)
        data = torch.from_numpy(self.store.view(slot)[: self.geometry.chunk_bytes].copy())
        self.store.unpin([slot], owner="read")
        return data.to(self.device)


def check_round_trip(rig: Rig, runs: int) -> dict:
    """Parts 1 and 2: bit-exact save and load, timed against the pinned-copy ceiling."""
    saves, stores, loads, checks, wrong_bytes = [], [], [], [], 0
    sources, targets = rig.chunk_ids(0), rig.chunk_ids(rig.num_blocks // 2)
    before = {name: t.clone() for name, t in rig.target.items()}
    for _ in range(runs):
        keys, save_s, stored_s = rig.save(sources)
        saves.append(save_s)
        stores.append(stored_s)
        for key, blocks in zip(keys, sources, strict=True):
            wrong_bytes += wrong(rig.stored_bytes(key), block_bytes(rig.source, blocks))
        load_s, checked_s, failed = rig.load(keys, targets)
        loads.append(load_s)
        checks.append(checked_s)
        wrong_bytes += len(failed) * rig.geometry.chunk_bytes
    for source_blocks, target_blocks in zip(sources, targets, strict=True):
        wrong_bytes += wrong(
            block_bytes(rig.target, target_blocks), block_bytes(rig.source, source_blocks)
        )
    named = {block for chunk in targets for block in chunk}
    others = [b for b in range(rig.num_blocks) if b not in named]
    wrong_bytes += wrong(block_bytes(rig.target, others), block_bytes(before, others))
    nbytes = len(sources) * rig.geometry.chunk_bytes
    return {
        "bytes": nbytes,
        "wrong_bytes": wrong_bytes,
        "save_s": statistics.median(saves),
        "save_store_s": statistics.median(stores),
        "load_s": statistics.median(loads),
        "load_check_s": statistics.median(checks),
    }


def pinned_ceiling(nbytes: int, device: torch.device, runs: int) -> dict:
    """One contiguous pinned host buffer <-> one device buffer, plain ``copy_`` each way."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times: dict[str, list[float]] = {"d2h_s": [], "h2d_s": []}
    for _ in range(runs):
        for name, dst, src in (("d2h_s", host, dev), ("h2d_s", dev, host)):
            torch.cuda.synchronize(device)  # the harness's own fences, not the copy path's
            started = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def check_concurrency(rig: Rig) -> dict:
    """Part 3: copies beside a forward stream that writes the cache."""
    device, shape = rig.device, rig.shape
    sources, targets = rig.chunk_ids(0), rig.chunk_ids(rig.num_blocks // 2)
    others = torch.tensor(range(rig.num_blocks // 4, rig.num_blocks // 2), device=device)
    saved = torch.tensor([b for chunk in sources for b in chunk], device=device)
    size = shape.matmul
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    product = torch.empty_like(a)
    layers = list(rig.source.values())
    fresh = [torch.randint_like(layer[saved].view(torch.uint8), 0, 256) for layer in layers]

    def attention_writes(layer: int) -> None:  # a slow layer, then its KV, then other blocks
        torch.mm(a, a, out=product)
        layers[layer].view(torch.uint8)[saved] = fresh[layer]
        layers[layer].view(torch.uint8)[others] = 0x5A

    keys, _, _ = rig.save(sources, per_layer=attention_writes)
    for layer in layers:  # the next step reuses the blocks; the forward must not outrun the saves
        layer.view(torch.uint8)[saved] = 0xA5
    expected = {name: fresh[i].flatten() for i, name in enumerate(rig.source)}
    wrong_saved = 0
    per_chunk = shape.blocks_per_chunk * rig.geometry.block_bytes
    for c, key in enumerate(keys):
        stored = rig.stored_bytes(key).view(shape.layers, -1)
        for i, name in enumerate(rig.source):
            want = expected[name][c * per_chunk : (c + 1) * per_chunk]
            wrong_saved += wrong(stored[i], want)

    def forward_writes_others() -> None:
        for layer in rig.target.values():
            torch.mm(a, a, out=product)
            layer.view(torch.uint8)[others] = 0x3C

    target_ids = torch.tensor([b for chunk in targets for b in chunk], device=device)
    rig.load(keys, targets)  # synchronous: the forward stream reads the blocks after it
    read_back = [layer.view(torch.uint8)[target_ids].clone() for layer in rig.target.values()]
    wrong_loaded = sum(
        wrong(read_back[i].flatten().view(shape.chunks, -1), expected[name].view(shape.chunks, -1))
        for i, name in enumerate(rig.source)
    )
    for layer in rig.target.values():
        layer.view(torch.uint8)[target_ids] = 0
    mark = rig.copy.event()
    mark.record(rig.copy.forward_stream())
    rig.load(keys, targets, after=mark, during=forward_writes_others)  # async, beside writes
    wrong_async = sum(
        wrong(layer.view(torch.uint8)[target_ids].flatten(), expected[name])
        for layer, name in zip(rig.target.values(), rig.source, strict=True)
    )
    return {
        "wrong_saved_bytes": wrong_saved,
        "wrong_loaded_bytes": wrong_loaded,
        "wrong_async_loaded_bytes": wrong_async,
    }


def check_stall(rig: Rig, runs: int, steps: int) -> dict:
    """Part 4: the forward's time with and without saves beside it (CUDA events)."""
    size = rig.shape.matmul
    a = torch.randn(size, size, device=rig.device, dtype=torch.bfloat16)
    product = torch.empty_like(a)
    sources = rig.chunk_ids(0)
    forward = torch.cuda.current_stream(rig.device)

    def run(with_saves: bool) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(forward)
        for _ in range(steps):
            if with_saves:
                rig.queue.open_saves(sources, lambda data: None)
            for layer in range(rig.shape.layers):
                torch.mm(a, a, out=product)
                rig.queue.save_layer(layer)
            rig.queue.close_saves()
        end.record(forward)
        end.synchronize()
        rig.queue.drain()
        return start.elapsed_time(end) / 1000

    run(False)
    run(True)  # warm-up
    plain, beside = [], []
    for _ in range(runs):
        plain.append(run(False))
        beside.append(run(True))
    plain_s, beside_s = statistics.median(plain), statistics.median(beside)
    return {
        "steps": steps,
        "forward_s": plain_s,
        "forward_with_saves_s": beside_s,
        "slowdown": beside_s / plain_s - 1,
        "saved_bytes_per_step": len(sources) * rig.geometry.chunk_bytes,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per stall measurement")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --device cpu for the correctness parts")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shape = LLAMA_3_8B if cuda else SMALL
    copy: CopyDevice = CudaCopyDevice(device) if cuda else CpuCopyDevice()
    results = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "shape": asdict(shape),
        "layouts": {},
    }
    for layout in args.layouts.split(","):
        rig = Rig(shape, layout, device, copy)
        try:
            entry = check_round_trip(rig, args.runs)
            entry.update(check_concurrency(rig))
            if cuda:
                ceiling = pinned_ceiling(entry["bytes"], device, args.runs)
                entry.update(
                    ceiling,
                    save_ratio=ceiling["d2h_s"] / entry["save_s"],
                    load_ratio=ceiling["h2d_s"] / entry["load_s"],
                )
                if layout == "LBNHC":
                    results["stall"] = check_stall(rig, args.runs, args.steps)
        finally:
            rig.close()
        results["layouts"][layout] = entry
        del rig
        if cuda:
            torch.cuda.empty_cache()
    report(results, cuda)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return results


def report(results: dict, cuda: bool) -> None:
    print(f"meshkv gpu_check on {results['device']} (torch {results['torch']})")
    header = f"{'layout':8} {'wrong B':>8}"
    if cuda:
        header += (
            f" {'save GB/s':>10} {'ceil':>7} {'ratio':>6} {'+store':>7}"
            f" {'load GB/s':>10} {'ceil':>7} {'ratio':>6} {'+check':>7}"
        )
    print(header)
    for layout, e in results["layouts"].items():
        wrong_bytes = (
            e["wrong_bytes"]
            + e["wrong_saved_bytes"]
            + e["wrong_loaded_bytes"]
            + e["wrong_async_loaded_bytes"]
        )
        line = f"{layout:8} {wrong_bytes:>8}"
        if cuda:
            gbps = e["bytes"] / 1e9
            line += (
                f" {gbps / e['save_s']:>10.1f} {gbps / e['d2h_s']:>7.1f}"
                f" {e['save_ratio']:>6.2f} {gbps / e['save_store_s']:>7.1f}"
                f" {gbps / e['load_s']:>10.1f} {gbps / e['h2d_s']:>7.1f}"
                f" {e['load_ratio']:>6.2f} {gbps / e['load_check_s']:>7.1f}"
            )
        print(line)
    if "stall" in results:
        stall = results["stall"]
        print(
            f"forward stall (LBNHC): {stall['forward_s'] * 1e3:.1f} ms -> "
            f"{stall['forward_with_saves_s'] * 1e3:.1f} ms with saves "
            f"({stall['slowdown'] * 100:+.1f} %)"
        )


if __name__ == "__main__":
    main()
