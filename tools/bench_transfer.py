"""Benchmark of moving chunk batches between two processes: memcpy vs raw NIXL vs meshkv's channel.

For each UCX transport (``cma``: UCX's same-host default; ``tcp``: what hosts without RDMA use),
one target process holds a store pool registered with a `NixlChannel`. This process writes
batches of chunks into it and measures, per chunk size and batch size, the median over several
runs of (each run moves a batch of that many chunks of that size):

- ``memcpy``: the chunks copied chunk by chunk into another local buffer (the ceiling);
- ``checksum``: meshkv's chunk checksum (XXH3-128) of the chunks, what a reader computes
  for every chunk it fetches before use. Row ratio ``(raw+sum)/raw`` is the get/raw a reader
  would show if the check could not overlap the transfer at all;
- ``nixl_raw``: the stock ``nixl_agent`` API, one ``initialize_xfer`` + ``transfer`` and a busy
  ``check_xfer_state`` loop (no progress thread: the shipped one spins a core);
- ``channel``: ``NixlChannel.write`` (pieces of <= 32 MiB, adaptive sleeping poll, 1 ms
  event-driven progress thread);
- ``meshkv_get``: ``MeshNode.get`` of a reader member in this process from a storage member
  (a ``--holder`` process, the same UCX transport) that holds the chunks: the get requests
  (the holder is the chunks' home, so no lookup goes first; a chunk larger than
  ``fetch_request_bytes`` goes in pieces), the holder's WRITEs into the reader's reserved
  slots, the checksum check of every chunk as it lands and the pins: everything an engine's
  load waits for. Every get reads fresh keys (the holder stores them untimed first), so
  nothing is local;
- ``rtt``: one data-plane round trip, a one-key ``MeshNode.lookup`` at the holder (for the
  latency target: a one-chunk get within raw transfer time + 2 round trips).

Transport ``zmq`` is meshkv's own ``tcp`` channel (bytes inside ZMQ replies, for hosts without
NIXL): it has the memcpy, meshkv_get and rtt measures only.

Memory on both sides is touched before timing, so page faults are not measured. No measure
finds its bytes in a CPU cache (``--cold-bytes``, default `COLD_BYTES`): each call moves the
next batch in a pool of that size, on both sides, and a get reads chunks its holder stored at
least that many bytes earlier. A KV chunk is moved long after it was computed; a batch read
again at once would run from the L3 cache, which is up to 300 MiB on the hosts measured, and
would flatter the measures that reuse their buffers. ``--cold-bytes 0`` measures that case:
every measure reuses its buffers, and a get reads chunks its holder has just stored. (In a VM
with nested paging, memory not touched lately also costs page-table work: then cold numbers
include it, for every measure alike.)

The measures take turns within each repeat (a load burst on a shared host hits all alike) and
each row also keeps the median per-repeat ratios channel / nixl_raw and meshkv_get / nixl_raw.
A measure is an entry of the ``measures`` table in `bench_transport` (seconds for one batch).

``--request-sizes 2M,4M,16M`` adds one ``get@<size>`` measure per size: the same get with
the reader's ``DataPlaneConfig.fetch_request_bytes`` set to it, in the same turns (what its
default rests on).

Writes DIR/transfer.json and DIR/transfer.png and prints a table (GB/s = 1e9 bytes/s).

    python tools/bench_transfer.py --out bench-results/
    python tools/bench_transfer.py --out bench-results/ --transports tcp,zmq --repeats 3
    python tools/bench_transfer.py --transports cma --sizes 4M,32M --request-sizes 4M,16M,1G
    python tools/bench_transfer.py --transports cma --cold-bytes 0   # cache-hot buffers
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import os
import platform
import secrets
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshkv.config import MeshConfig
from meshkv.member_meta import ANY_NAMESPACE, ROLE_SEED, ROLE_STORAGE
from meshkv.node import MeshNode
from meshkv.store import Region, SegmentPool, chunk_checksum, segment_sizes
from meshkv.store import Slot as StoreSlot
from meshkv.transfer import SegmentInfo
from meshkv.transfer.nixl_channel import NixlChannel
from tools.bench.common import ucx_env

KIB, MIB = 1 << 10, 1 << 20
CHUNK_SIZES = (256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 32 * MIB)
BATCHES = (1, 4, 16, 64)
MAX_BATCH_BYTES = 512 * MIB
"""Combinations above this are skipped (each process holds a few times this much)."""
SEGMENT_BYTES = 64 * MIB
COLD_BYTES = 1 << 30
"""Bytes each measure cycles through before it touches the same memory again (default)."""
FILL_BYTES = 256 * MIB
"""Chunk bytes a holder stores per request when the reader's backlog runs low."""
REPEATS = 7
TARGET_START_S = 120.0
WRITE_DEADLINE_S = 60.0
GIB = 1 << 30
NIXL_TRANSPORTS = ("cma", "tcp")
"""UCX transports under the NIXL channel; ``zmq`` (meshkv's tcp channel) is the other choice."""


@dataclass(frozen=True, slots=True)
class Slot:
    segment: int
    offset: int


def layout(chunk_bytes: int, count: int, first: int = 0) -> list[Region]:
    """Chunks first .. first + count - 1, chunk i at byte i * chunk_bytes of the pool (chunk
    sizes divide SEGMENT_BYTES)."""
    regions = []
    for i in range(first, first + count):
        at = i * chunk_bytes
        regions.append(
            Region(segment_id=at // SEGMENT_BYTES, offset=at % SEGMENT_BYTES, nbytes=chunk_bytes)
        )
    return regions


def batches_in_turn(chunk_bytes: int, count: int, span_bytes: int) -> Iterator[list[Region]]:
    """Batches of ``count`` chunks, each the next one in the pool's first ``span_bytes``, from
    the start again after the last that fits (always the first batch if none does)."""
    fit = max(1, span_bytes // (chunk_bytes * count))
    for k in itertools.count():
        yield layout(chunk_bytes, count, first=(k % fit) * count)


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


def member_config(channel: str, budget_bytes: int, seeds: list[str]) -> MeshConfig:
    return MeshConfig(
        enable_p2p=True,
        p2p_host="127.0.0.1",
        transfer_channel=channel,
        max_local_cpu_size=budget_bytes / GIB,
        mesh_seeds=seeds,
        mesh_gossip_profile="local",
        mesh_transfer_timeout_ms=int(WRITE_DEADLINE_S * 1000),
    )


def run_holder(channel: str, budget_bytes: int) -> None:
    """The holder process: a storage member that stores fresh chunks when told (JSON lines:
    ``[chunk_bytes, count]`` in, the new keys out), straight into its store: nothing is pushed."""
    node = MeshNode(member_config(channel, budget_bytes, []), namespace=ANY_NAMESPACE,
                    role=ROLE_STORAGE, name="holder/0")  # fmt: skip
    node.start()
    source = np.random.default_rng(1).integers(0, 256, 64 * MIB + 4096, dtype=np.uint8)
    print(json.dumps({"gossip": node.gossip_address}), flush=True)
    for line in sys.stdin:
        chunk_bytes, count = json.loads(line)
        keys = [secrets.token_bytes(16) for _ in range(count)]
        for key in keys:
            slot = node.store.reserve(
                key, chunk_bytes, owner="bench", deadline_s=time.monotonic() + 60
            )
            assert isinstance(slot, StoreSlot), slot
            view, shift = node.store.view(slot), secrets.randbelow(4096)
            for at in range(0, chunk_bytes, 64 * MIB):  # distinct bytes per chunk, cheaply
                piece = min(64 * MIB, chunk_bytes - at)
                view[at : at + piece] = source[shift : shift + piece]
            view[:16] = np.frombuffer(key, np.uint8)
            assert node.store.commit(key, node.store.checksum(slot), owner="bench") is not None
        print(json.dumps([k.hex() for k in keys]), flush=True)
    node.stop(leave=False)


class Holder:
    """A storage member process holding the chunks that `Reader` gets."""

    def __init__(self, transport: str, budget_bytes: int) -> None:
        channel = "tcp" if transport == "zmq" else "nixl"
        env = ucx_env("cma" if transport == "zmq" else transport)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--holder", f"{channel}:{budget_bytes}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        self.address = self._read(TARGET_START_S)["gossip"]

    def _read(self, timeout_s: float) -> object:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout_s)[0]:
            self.close()
            raise TimeoutError("the holder process did not answer")
        return json.loads(self.proc.stdout.readline())

    def fill(self, chunk_bytes: int, count: int) -> list[bytes]:
        """Stores ``count`` fresh chunks at the holder and returns their keys."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps([chunk_bytes, count]) + "\n").encode())
        self.proc.stdin.flush()
        return [bytes.fromhex(k) for k in self._read(WRITE_DEADLINE_S)]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


class Reader:
    """A member in this process that gets the holder's chunks. It takes no share of the ring
    (a seed's role), so the holder is home to every key and each get crosses the network.
    One reader serves one chunk size (see `bench_transport`)."""

    def __init__(
        self, transport: str, budget_bytes: int, holder_budget_bytes: int, cold_bytes: int
    ) -> None:
        self.holder = Holder(transport, holder_budget_bytes)
        self._cold_bytes = cold_bytes
        self._backlog: collections.deque[bytes] = collections.deque()  # keys held, oldest first
        channel = "tcp" if transport == "zmq" else "nixl"
        config = member_config(channel, budget_bytes, [self.holder.address])

        def make() -> None:
            self.node = MeshNode(config, namespace="bench", role=ROLE_SEED, name="reader/0")

        with_env(ucx_env("cma" if transport == "zmq" else transport), make)
        for segment in self.node.store.pool.segments:  # a warm store, as in a running engine:
            segment.buffer[:] = 0  # page faults are not measured (as for the other measures)
        self.node.start()
        deadline = time.monotonic() + TARGET_START_S
        while not self.node.membership.is_alive("holder/0"):
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("the reader never saw the holder join")
            time.sleep(0.05)

    def get(self, regions: list[Region], request_bytes: int | None = None) -> float:
        """One timed get of fresh keys, as many chunks of the size of ``regions``, with
        the reader's ``fetch_request_bytes`` (`DataPlaneConfig`) set to ``request_bytes`` if
        given."""
        chunk_bytes = regions[0].nbytes
        keys = self._cold_keys(chunk_bytes, len(regions))
        gets = self.node.gets
        default = gets.config
        if request_bytes:
            gets.config = dataclasses.replace(default, fetch_request_bytes=request_bytes)
        try:
            started = time.perf_counter()
            lease = self.node.get(keys, chunk_bytes, timeout_s=WRITE_DEADLINE_S)
            elapsed = time.perf_counter() - started
        finally:
            gets.config = default
        with lease:
            if lease.count != len(keys):
                raise RuntimeError(
                    f"meshkv get returned {lease.count} of {len(keys)} chunks of {chunk_bytes} "
                    f"bytes; reader store {self.node.store.stats()}"
                )
            if any(bytes(v[:16]) != k for k, v in zip(keys, lease.views, strict=True)):
                raise RuntimeError("meshkv get returned a chunk under the wrong key")
        return elapsed

    def _cold_keys(self, chunk_bytes: int, count: int) -> list[bytes]:
        """Keys of ``count`` chunks the holder stored at least ``cold_bytes`` of chunks ago (it
        stores them untimed, up to FILL_BYTES at a time), never read before."""
        fill = max(count, min(FILL_BYTES, self._cold_bytes) // chunk_bytes)
        while len(self._backlog) < count + self._cold_bytes // chunk_bytes:
            self._backlog.extend(self.holder.fill(chunk_bytes, fill))
        return [self._backlog.popleft() for _ in range(count)]

    def rtt(self, regions: list[Region]) -> float:
        """One timed lookup of a fresh key (never fetched, so it has to ask the holder)."""
        [probe] = self._cold_keys(regions[0].nbytes, 1)
        started = time.perf_counter()
        if self.node.lookup([probe], timeout_s=WRITE_DEADLINE_S) != 1:
            raise RuntimeError("the holder did not answer a lookup")
        return time.perf_counter() - started

    def close(self) -> None:
        self.node.stop(leave=False)
        self.holder.close()


class Bench:
    """This process's side under one transport: source pool, memcpy target and, under a NIXL
    transport, a channel to a `Target` process."""

    def __init__(self, transport: str, pool_bytes: int) -> None:
        self.transport = transport
        self.pool = SegmentPool(segment_sizes(pool_bytes, SEGMENT_BYTES), populate=True)
        rng = np.random.default_rng(0)
        for segment in self.pool.segments:
            segment.buffer[:] = rng.integers(0, 256, segment.nbytes, dtype=np.uint8)
        self.copy_pool = SegmentPool(segment_sizes(pool_bytes, SEGMENT_BYTES), populate=True)
        self.target: Target | None = None
        self.channel: NixlChannel | None = None
        if transport in NIXL_TRANSPORTS:
            self.target = Target(transport, pool_bytes)
            with_env(ucx_env(transport), self._make_channel)

    def _make_channel(self) -> None:
        assert self.target is not None
        self.channel = NixlChannel(f"bench-{secrets.randbits(64):016x}", self.pool)
        self.channel.add_peer("target", self.target.metadata, self.target.segments)

    def memcpy(self, regions: list[Region]) -> float:
        started = time.perf_counter()
        for region in regions:
            np.copyto(self.copy_pool.view(region), self.pool.view(region))
        return time.perf_counter() - started

    def checksum(self, regions: list[Region]) -> float:
        started = time.perf_counter()
        for region in regions:
            chunk_checksum(self.pool.view(region))
        return time.perf_counter() - started

    def channel_write(self, regions: list[Region]) -> float:
        assert self.channel is not None
        dest = [Slot(r.segment_id, r.offset) for r in regions]
        started = time.perf_counter()
        if not self.channel.write("target", regions, dest, time.monotonic() + WRITE_DEADLINE_S):
            raise RuntimeError("channel write failed")
        return time.perf_counter() - started

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.target is not None:
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
        assert bench.target is not None
        self.target = bench.target
        rows = [(s.address, s.nbytes, 0, "") for s in bench.pool.segments]
        self.agent.register_memory(rows, "DRAM")
        self.remote = self.agent.add_remote_agent(bench.target.metadata)
        self.bench = bench
        self.write([Region(segment_id=0, offset=0, nbytes=4096)])  # connection wire-up

    def write(self, regions: list[Region]) -> float:
        local = np.array([(self.bench.pool.address(r), r.nbytes, 0) for r in regions], np.uint64)
        remote = np.array(
            [(self.target.address(Slot(r.segment_id, r.offset)), r.nbytes, 0) for r in regions],
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


def sweep_name(request_bytes: int) -> str:
    return f"get@{request_bytes // MIB}M"


def combinations(
    sizes: list[int], batches: list[int], max_batch_bytes: int
) -> list[tuple[int, int]]:
    return [(s, b) for s in sizes for b in batches if s * b <= max_batch_bytes]


def bench_transport(transport: str, args: argparse.Namespace) -> list[dict]:
    """Times every measure on every combination; the measures take turns within each repeat,
    so that a burst of load on the shared machine hits all of them alike."""
    combos = combinations(args.sizes, args.batches, args.max_batch_bytes)
    batch_bytes = max(s * b for s, b in combos)
    pool_bytes = -(-max(batch_bytes, args.cold_bytes) // SEGMENT_BYTES) * SEGMENT_BYTES
    bench = Bench(transport, pool_bytes)
    stock = StockAgent(bench) if transport in NIXL_TRANSPORTS else None
    rows = []
    try:
        for chunk_bytes, sized in itertools.groupby(combos, key=lambda combo: combo[0]):
            # A new reader and holder per chunk size: a store keeps the segments it carved for
            # one slot size. The reader's LRU store cycles through the pool's bytes and more,
            # so its slots are as cold. While a chunk waits in the holder's backlog, the
            # holder stores cold_bytes of others and serves as many: its store keeps both.
            reader = Reader(
                transport,
                budget_bytes=pool_bytes + 2 * batch_bytes,
                holder_budget_bytes=2 * pool_bytes + FILL_BYTES + 2 * batch_bytes,
                cold_bytes=args.cold_bytes,
            )
            try:
                measures = measures_of(bench, stock, reader, args.request_sizes)
                for _, batch in sized:
                    batches = batches_in_turn(chunk_bytes, batch, args.cold_bytes)
                    runs = time_in_turns(measures, batches, args.repeats)
                    rows.append(summary(transport, chunk_bytes, batch, runs, args.request_sizes))
            finally:
                reader.close()
    finally:
        if stock is not None:
            stock.close()
        bench.close()
    return rows


def measures_of(
    bench: Bench, stock: StockAgent | None, reader: Reader, request_sizes: list[int]
) -> dict[str, Callable[[list[Region]], float]]:
    """Each measure by name: seconds to move one batch (the regions name its chunks)."""
    measures: dict[str, Callable[[list[Region]], float]] = {
        "memcpy": bench.memcpy,
        "checksum": bench.checksum,
    }
    if stock is not None:
        measures |= {"nixl_raw": stock.write, "channel": bench.channel_write}
    measures |= {"meshkv_get": reader.get, "rtt": reader.rtt}
    for request_bytes in request_sizes:
        measures[sweep_name(request_bytes)] = functools.partial(
            reader.get, request_bytes=request_bytes
        )
    return measures


def time_in_turns(
    measures: dict[str, Callable[[list[Region]], float]],
    batches: Iterator[list[Region]],
    repeats: int,
) -> dict[str, list[float]]:
    """One warm-up call of each measure (and the first handshakes), then ``repeats`` rounds in
    which each measure moves the next batch in turn."""
    for measure in measures.values():
        measure(next(batches))
    runs: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            runs[name].append(measure(next(batches)))
    return runs


def summary(
    transport: str,
    chunk_bytes: int,
    batch: int,
    runs: dict[str, list[float]],
    request_sizes: list[int],
) -> dict:
    """One row: the median time and GB/s of each measure, and the median per-repeat ratios to
    raw NIXL."""
    row: dict = {"transport": transport, "chunk_bytes": chunk_bytes, "batch": batch}
    for name, seconds in runs.items():
        median_s = statistics.median(seconds)
        row[f"{name}_ms"] = median_s * 1e3
        if name != "rtt":
            row[f"{name}_gbps"] = chunk_bytes * batch / median_s / 1e9
    if "nixl_raw" in runs:
        raw = runs["nixl_raw"]
        for name in ("channel", "meshkv_get", *map(sweep_name, request_sizes)):
            row[f"{name}_over_raw"] = statistics.median(
                c / r for c, r in zip(runs[name], raw, strict=True)
            )
        row["raw_plus_checksum_over_raw"] = statistics.median(
            (r + c) / r for c, r in zip(runs["checksum"], raw, strict=True)
        )
    return row


STYLES = {
    "memcpy": "k--",
    "checksum": "k:",
    "nixl_raw": "C0-o",
    "channel": "C1-s",
    "meshkv_get": "C2-^",
}


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
            for name, style in STYLES.items():
                if mine and f"{name}_gbps" in mine[0]:
                    batches, gbps = [r["batch"] for r in mine], [r[f"{name}_gbps"] for r in mine]
                    ax.plot(batches, gbps, style, label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{transport}, {size // KIB} KiB chunks", fontsize=9)
            ax.set_xlabel("chunks per batch")
            if j == 0:
                ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
    for row_axes in axes:
        row_axes[0].legend(fontsize=8)
    fig.suptitle("Moving a batch of chunks between two processes (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_sizes(text: str) -> list[int]:
    units = {"K": KIB, "M": MIB}
    return [int(t[:-1]) * units[t[-1].upper()] for t in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--transports", default="cma,tcp,zmq")
    parser.add_argument("--sizes", type=parse_sizes, default=list(CHUNK_SIZES), help="e.g. 256K,1M")
    parser.add_argument(
        "--batches", type=lambda t: [int(b) for b in t.split(",")], default=list(BATCHES)
    )
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--max-batch-bytes", type=int, default=MAX_BATCH_BYTES)
    parser.add_argument(
        "--cold-bytes",
        type=lambda t: 0 if t == "0" else parse_sizes(t)[0],
        default=COLD_BYTES,
        help="memory each measure cycles through (e.g. 1G); 0: reuse buffers (cache-hot)",
    )
    parser.add_argument(
        "--request-sizes",
        type=parse_sizes,
        default=[],
        help="also time meshkv get with fetch_request_bytes set to each, e.g. 2M,4M,16M",
    )
    parser.add_argument("--target", type=int, help=argparse.SUPPRESS)  # internal: run the target
    parser.add_argument("--holder", help=argparse.SUPPRESS)  # internal: CHANNEL:BUDGET_BYTES
    args = parser.parse_args()
    if args.target:
        run_target(args.target)
        return
    if args.holder:
        channel, budget = args.holder.split(":")
        run_holder(channel, int(budget))
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
        "cold_bytes": args.cold_bytes,
        "rows": rows,
    }
    (args.out / "transfer.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / "transfer.png")
    print(table(rows))
    if args.request_sizes:
        print(sweep_table(rows, args.request_sizes))


def table(rows: list[dict]) -> str:
    """GB/s per measure, the one-chunk round trip, and the time ratios to raw NIXL."""
    names = ("memcpy", "checksum", "nixl_raw", "channel", "meshkv_get")
    lines = [
        f"{'transport':9} {'chunk':>8} {'batch':>5} "
        + " ".join(f"{n:>10}" for n in names)
        + f" {'rtt_ms':>7} {'chan/raw':>8} {'get/raw':>8} {'(raw+sum)/raw':>13}"
        + "   (GB/s; time ratios)"
    ]
    for r in rows:
        cells = [f"{r[f'{n}_gbps']:10.2f}" if f"{n}_gbps" in r else f"{'-':>10}" for n in names]
        ratios = [
            f"{r[k]:8.2f}" if k in r else f"{'-':>8}"
            for k in ("channel_over_raw", "meshkv_get_over_raw")
        ] + [
            f"{r['raw_plus_checksum_over_raw']:13.2f}"
            if "raw_plus_checksum_over_raw" in r
            else f"{'-':>13}"
        ]
        lines.append(
            f"{r['transport']:9} {r['chunk_bytes'] // KIB:>6}Ki {r['batch']:>5} "
            + " ".join(cells)
            + f" {r['rtt_ms']:7.2f} "
            + " ".join(ratios)
        )
    return "\n".join(lines)


def sweep_table(rows: list[dict], request_sizes: list[int]) -> str:
    """meshkv get's GB/s per fetch_request_bytes, and its time ratio to raw NIXL."""
    names = [sweep_name(n) for n in request_sizes]
    lines = [
        f"{'transport':9} {'chunk':>8} {'batch':>5} "
        + " ".join(f"{n:>10}" for n in names)
        + "   (GB/s, and get/raw where there is raw)"
    ]
    for r in rows:
        cells = [
            f"{r[f'{n}_gbps']:.2f}" + (f"/{r[f'{n}_over_raw']:.2f}" if f"{n}_over_raw" in r else "")
            for n in names
        ]
        lines.append(
            f"{r['transport']:9} {r['chunk_bytes'] // KIB:>6}Ki {r['batch']:>5} "
            + " ".join(f"{c:>10}" for c in cells)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
