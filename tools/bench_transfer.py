"""Benchmark of moving chunk batches between two processes: memcpy vs raw NIXL vs meshkv's channel.

For each UCX transport (``cma``: UCX's same-host default; ``tcp``: what hosts without RDMA use),
one target process holds a store pool registered with a `NixlChannel`. This process writes
batches of chunks into it and measures, per chunk size and batch size, the median over several
runs of:

- ``memcpy``: the same chunks copied chunk by chunk into another local buffer (the ceiling);
- ``nixl_raw``: the stock ``nixl_agent`` API, one ``initialize_xfer`` + ``transfer`` and a busy
  ``check_xfer_state`` loop (no progress thread: the shipped one spins a core);
- ``channel``: ``NixlChannel.write`` (pieces of <= 32 MiB, adaptive sleeping poll, 1 ms
  event-driven progress thread).

Memory on both sides is touched before timing, so page faults are not measured. The measures
take turns within each repeat (a load burst on a shared host hits all alike) and each row also
keeps the median per-repeat ratio channel / nixl_raw. A measure is an entry of the ``measures``
table in `bench_transport` (seconds for one batch): the data-plane ``get`` of a running member
(lookup + get + checksum check) becomes one more entry there once the service exists.

Writes DIR/transfer.json and DIR/transfer.png and prints a table (GB/s = 1e9 bytes/s).

    python tools/bench_transfer.py --out bench-results/
    python tools/bench_transfer.py --out bench-results/ --transports tcp --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshkv.store import Region, SegmentPool, segment_sizes
from meshkv.transfer import SegmentInfo
from meshkv.transfer.nixl_channel import NixlChannel

KIB, MIB = 1 << 10, 1 << 20
CHUNK_SIZES = (256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 32 * MIB)
BATCHES = (1, 4, 16, 64)
MAX_BATCH_BYTES = 512 * MIB
"""Combinations above this are skipped (both processes hold this much, plus the memcpy copy)."""
SEGMENT_BYTES = 64 * MIB
REPEATS = 7
TARGET_START_S = 120.0
WRITE_DEADLINE_S = 60.0


@dataclass(frozen=True, slots=True)
class Slot:
    segment: int
    offset: int


def layout(chunk_bytes: int, count: int) -> list[Region]:
    """Chunk i at byte i * chunk_bytes of the pool (chunk sizes divide SEGMENT_BYTES)."""
    regions = []
    for i in range(count):
        at = i * chunk_bytes
        regions.append(
            Region(segment_id=at // SEGMENT_BYTES, offset=at % SEGMENT_BYTES, nbytes=chunk_bytes)
        )
    return regions


def ucx_env(transport: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("UCX_NET_DEVICES", "lo")
    env.pop("UCX_TLS", None)
    if transport == "tcp":
        env["UCX_TLS"] = "tcp"
    return env


class Target:
    """The receiving process: a populated pool registered with a NixlChannel."""

    def __init__(self, transport: str, pool_bytes: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--target", str(pool_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=ucx_env(transport),
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], TARGET_START_S)
        if not ready:
            self.close()
            raise TimeoutError("the target process did not start")
        hello = json.loads(self.proc.stdout.readline())
        self.metadata = bytes.fromhex(hello["metadata"])
        self.segments = [
            SegmentInfo(segment=s, address=a, nbytes=n) for s, a, n in hello["segments"]
        ]

    def address(self, slot: Slot) -> int:
        seg = next(s for s in self.segments if s.segment == slot.segment)
        return seg.address + slot.offset

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def run_target(pool_bytes: int) -> None:
    pool = SegmentPool(segment_sizes(pool_bytes, SEGMENT_BYTES), populate=True)
    channel = NixlChannel(f"bench-target-{secrets.randbits(64):016x}", pool)
    table = [[s.segment, s.address, s.nbytes] for s in channel.segments()]
    print(json.dumps({"metadata": channel.metadata().hex(), "segments": table}), flush=True)
    sys.stdin.readline()  # run until killed or told to stop
    channel.close()


class Bench:
    """This process's side under one transport: source pool, memcpy target, two NIXL agents."""

    def __init__(self, transport: str, pool_bytes: int) -> None:
        self.transport = transport
        self.pool = SegmentPool(segment_sizes(pool_bytes, SEGMENT_BYTES), populate=True)
        rng = np.random.default_rng(0)
        for segment in self.pool.segments:
            segment.buffer[:] = rng.integers(0, 256, segment.nbytes, dtype=np.uint8)
        self.copy_pool = SegmentPool(segment_sizes(pool_bytes, SEGMENT_BYTES), populate=True)
        self.target = Target(transport, pool_bytes)
        with_env(ucx_env(transport), self._make_channel)
        self.channel.add_peer("target", self.target.metadata, self.target.segments)

    def _make_channel(self) -> None:
        self.channel = NixlChannel(f"bench-{secrets.randbits(64):016x}", self.pool)

    def memcpy(self, regions: list[Region]) -> float:
        started = time.perf_counter()
        for region in regions:
            np.copyto(self.copy_pool.view(region), self.pool.view(region))
        return time.perf_counter() - started

    def channel_write(self, regions: list[Region]) -> float:
        dest = [Slot(r.segment_id, r.offset) for r in regions]
        started = time.perf_counter()
        if not self.channel.write("target", regions, dest, time.monotonic() + WRITE_DEADLINE_S):
            raise RuntimeError("channel write failed")
        return time.perf_counter() - started

    def close(self) -> None:
        self.channel.close()
        self.target.close()


class StockAgent:
    """The stock nixl_agent API without a progress thread (the shipped one busy-polls a core,
    which would slow every other measure on a small host); ``check_xfer_state`` progresses."""

    def __init__(self, bench: Bench) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        def make() -> None:
            self.agent = nixl_agent(
                f"bench-raw-{secrets.randbits(64):016x}",
                nixl_agent_config(enable_prog_thread=False),
            )

        with_env(ucx_env(bench.transport), make)
        rows = [(s.address, s.nbytes, 0, "") for s in bench.pool.segments]
        self.agent.register_memory(rows, "DRAM")
        self.remote = self.agent.add_remote_agent(bench.target.metadata)
        self.bench = bench
        self.write([Region(segment_id=0, offset=0, nbytes=4096)])  # connection wire-up

    def write(self, regions: list[Region]) -> float:
        local = np.array([(self.bench.pool.address(r), r.nbytes, 0) for r in regions], np.uint64)
        remote = np.array(
            [
                (self.bench.target.address(Slot(r.segment_id, r.offset)), r.nbytes, 0)
                for r in regions
            ],
            np.uint64,
        )
        agent = self.agent
        started = time.perf_counter()
        handle = agent.initialize_xfer(
            "WRITE",
            agent.get_xfer_descs(local, "DRAM"),
            agent.get_xfer_descs(remote, "DRAM"),
            self.remote,
        )
        state = agent.transfer(handle)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
        elapsed = time.perf_counter() - started
        agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"raw NIXL write ended {state}")
        return elapsed

    def close(self) -> None:
        self.agent.remove_remote_agent(self.remote)
        del self.agent


def with_env(env: dict[str, str], make: Callable[[], None]) -> None:
    """Runs ``make`` with ``env`` as the environment (UCX reads it when a backend starts)."""
    saved = os.environ.copy()
    os.environ.clear()
    os.environ.update(env)
    try:
        make()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def combinations(
    sizes: list[int], batches: list[int], max_batch_bytes: int
) -> list[tuple[int, int]]:
    return [(s, b) for s in sizes for b in batches if s * b <= max_batch_bytes]


def bench_transport(transport: str, args: argparse.Namespace) -> list[dict]:
    """Times every measure on every combination; the measures take turns within each repeat,
    so that a burst of load on the shared machine hits all of them alike."""
    combos = combinations(args.sizes, args.batches, args.max_batch_bytes)
    pool_bytes = max(s * b for s, b in combos)
    pool_bytes = -(-pool_bytes // SEGMENT_BYTES) * SEGMENT_BYTES
    bench = Bench(transport, pool_bytes)
    stock = StockAgent(bench)
    measures: dict[str, Callable[[list[Region]], float]] = {
        "memcpy": bench.memcpy,
        "nixl_raw": stock.write,
        "channel": bench.channel_write,
    }
    rows = []
    try:
        for chunk_bytes, batch in combos:
            regions = layout(chunk_bytes, batch)
            for measure in measures.values():
                measure(regions)  # warm-up
            runs: dict[str, list[float]] = {name: [] for name in measures}
            for _ in range(args.repeats):
                for name, measure in measures.items():
                    runs[name].append(measure(regions))
            row: dict = {"transport": transport, "chunk_bytes": chunk_bytes, "batch": batch}
            for name, seconds in runs.items():
                median_s = statistics.median(seconds)
                row[f"{name}_ms"] = median_s * 1e3
                row[f"{name}_gbps"] = chunk_bytes * batch / median_s / 1e9
            row["channel_over_raw"] = statistics.median(
                c / r for c, r in zip(runs["channel"], runs["nixl_raw"], strict=True)
            )
            rows.append(row)
    finally:
        stock.close()
        bench.close()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transports = sorted({r["transport"] for r in rows})
    sizes = sorted({r["chunk_bytes"] for r in rows})
    fig, axes = plt.subplots(
        len(transports), len(sizes), figsize=(3.2 * len(sizes), 3 * len(transports)), squeeze=False
    )
    for i, transport in enumerate(transports):
        for j, size in enumerate(sizes):
            ax = axes[i][j]
            mine = sorted(
                (r for r in rows if r["transport"] == transport and r["chunk_bytes"] == size),
                key=lambda r: r["batch"],
            )
            for name, style in (("memcpy", "k--"), ("nixl_raw", "C0-o"), ("channel", "C1-s")):
                ax.plot(
                    [r["batch"] for r in mine], [r[f"{name}_gbps"] for r in mine], style, label=name
                )
            ax.set_xscale("log", base=2)
            ax.set_title(f"{transport}, {size // KIB} KiB chunks", fontsize=9)
            ax.set_xlabel("chunks per batch")
            if j == 0:
                ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Writing a batch of chunks into another process (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_sizes(text: str) -> list[int]:
    units = {"K": KIB, "M": MIB}
    return [int(t[:-1]) * units[t[-1].upper()] for t in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--transports", default="cma,tcp")
    parser.add_argument("--sizes", type=parse_sizes, default=list(CHUNK_SIZES), help="e.g. 256K,1M")
    parser.add_argument(
        "--batches", type=lambda t: [int(b) for b in t.split(",")], default=list(BATCHES)
    )
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--max-batch-bytes", type=int, default=MAX_BATCH_BYTES)
    parser.add_argument("--target", type=int, help=argparse.SUPPRESS)  # internal: run the target
    args = parser.parse_args()
    if args.target:
        run_target(args.target)
        return
    rows = []
    for transport in args.transports.split(","):
        rows += bench_transport(transport, args)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "host": {
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "rows": rows,
    }
    (args.out / "transfer.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / "transfer.png")
    header = ("transport", "chunk", "batch", "memcpy", "nixl_raw", "channel", "chan/raw")
    print("{:9} {:>8} {:>5} {:>8} {:>9} {:>8} {:>9}  (GB/s; time ratio)".format(*header))
    for r in rows:
        print(
            f"{r['transport']:9} {r['chunk_bytes'] // KIB:>6}Ki {r['batch']:>5} "
            f"{r['memcpy_gbps']:8.2f} {r['nixl_raw_gbps']:9.2f} {r['channel_gbps']:8.2f} "
            f"{r['channel_over_raw']:9.2f}"
        )


if __name__ == "__main__":
    main()
