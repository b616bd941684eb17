"""The measuring loops: latency cells, closed-loop throughput, CPU per lookup, per member count."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from tools.bench.common import cpu_ns, percentile
from tools.bench.lookup.paths import Answer, LookupPath, RequesterGroup, run_one
from tools.bench.lookup.settings import (
    AGGREGATE_IN_FLIGHT,
    LOOKUP_DEADLINE_S,
    THROUGHPUT_PROMPT_CHUNKS,
)
from tools.bench.lookup.workload import Holdings, Prompt


@dataclass
class Cell:
    """Accumulates one (path, N, case, prompt size) cell over rounds."""

    latencies_ns: list[int] = field(default_factory=list)
    lookups: int = 0
    wrong: int = 0
    timeouts: int = 0
    errors: int = 0
    server_cpu_ns: int = 0
    server_cpu_stat_ns: int = 0
    client_cpu_ns: int = 0
    block_wall_ns: int = 0
    servers_asked: float = 1.0

    def summary(self, idle_cpu_ns_per_s: float) -> dict:
        lat = sorted(self.latencies_ns)
        net_cpu = self.server_cpu_ns - idle_cpu_ns_per_s * self.block_wall_ns / 1e9
        return {
            "lookups": self.lookups,
            "servers_asked_mean": self.servers_asked,
            "p50_us": percentile(lat, 0.5) / 1e3,
            "p99_us": percentile(lat, 0.99) / 1e3,
            "mean_us": statistics.fmean(lat) / 1e3 if lat else float("nan"),
            "wrong": self.wrong,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "server_cpu_us_per_lookup": self.server_cpu_ns / max(1, self.lookups) / 1e3,
            "server_cpu_us_per_lookup_net_of_idle": net_cpu / max(1, self.lookups) / 1e3,
            "server_cpu_stat_us_per_lookup": self.server_cpu_stat_ns / max(1, self.lookups) / 1e3,
            "client_cpu_us_per_lookup": self.client_cpu_ns / max(1, self.lookups) / 1e3,
            "cpu_us_per_lookup_client_plus_server": (self.client_cpu_ns + self.server_cpu_ns)
            / max(1, self.lookups)
            / 1e3,
        }


def latency_block(
    path: LookupPath, group: RequesterGroup, prompts: Sequence[Prompt], count: int, cell: Cell
) -> None:
    pids = path.server_pids()
    cpu0 = cpu_ns(pids)
    client0 = cpu_ns([os.getpid()])[0]
    t0 = time.perf_counter_ns()
    for i in range(count):
        prompt = prompts[i % len(prompts)]
        answer, latency = run_one(group, 0, prompt, LOOKUP_DEADLINE_S)
        cell.lookups += 1
        if answer is None:
            cell.timeouts += 1
            continue
        cell.latencies_ns.append(latency)
        if answer.error:
            cell.errors += 1
        elif answer.hits >= 0 and answer.hits != prompt.expected_hits:
            cell.wrong += 1
    cell.block_wall_ns += time.perf_counter_ns() - t0
    cell.client_cpu_ns += cpu_ns([os.getpid()])[0] - client0
    cpu1 = cpu_ns(pids)
    cell.server_cpu_ns += cpu1[0] - cpu0[0]
    cell.server_cpu_stat_ns += cpu1[1] - cpu0[1]


@dataclass
class ThroughputCell:
    completed: int = 0
    wall_ns: int = 0
    server_cpu_ns: int = 0
    wrong: int = 0
    errors: int = 0

    def summary(self, idle_cpu_ns_per_s: float) -> dict:
        net_cpu = self.server_cpu_ns - idle_cpu_ns_per_s * self.wall_ns / 1e9
        return {
            "lookups": self.completed,
            "lookups_per_s": self.completed / (self.wall_ns / 1e9) if self.wall_ns else 0.0,
            "server_cpu_us_per_lookup": self.server_cpu_ns / max(1, self.completed) / 1e3,
            "server_cpu_us_per_lookup_net_of_idle": net_cpu / max(1, self.completed) / 1e3,
            "wrong": self.wrong,
            "errors": self.errors,
        }


def throughput_block(
    path: LookupPath,
    group: RequesterGroup,
    concurrency: int,
    prompts: Sequence[Prompt],
    duration_s: float,
    cell: ThroughputCell,
) -> None:
    """Closed loop: `concurrency` requesters each keep one lookup in flight for duration_s."""
    poller = zmq.Poller()
    for sock in group.sockets():
        poller.register(sock, zmq.POLLIN)
    pids = path.server_pids()
    rng = random.Random(concurrency)
    in_flight: dict[int, Prompt] = {}

    def start(slot: int) -> None:
        while time.perf_counter_ns() < end_ns:  # answers given at once count and go on
            prompt = prompts[rng.randrange(len(prompts))]
            done = group.begin(slot, prompt)
            if done is None:
                in_flight[slot] = prompt
                return
            record(prompt, done)

    def record(prompt: Prompt, answer: Answer) -> None:
        cell.completed += 1
        if answer.error:
            cell.errors += 1
        elif answer.hits >= 0 and answer.hits != prompt.expected_hits:
            cell.wrong += 1

    cpu0 = cpu_ns(pids)[0]
    t0 = time.perf_counter_ns()
    end_ns = t0 + int(duration_s * 1e9)
    for slot in range(concurrency):
        start(slot)
    while time.perf_counter_ns() < end_ns:
        for sock, _ in poller.poll(max(1.0, (end_ns - time.perf_counter_ns()) / 1e6)):
            for slot, answer in group.on_readable(sock):
                record(in_flight.pop(slot), answer)
                if time.perf_counter_ns() < end_ns:
                    start(slot)
    cell.wall_ns += time.perf_counter_ns() - t0
    cell.server_cpu_ns += cpu_ns(pids)[0] - cpu0
    drain_deadline = time.monotonic() + LOOKUP_DEADLINE_S
    while in_flight and time.monotonic() < drain_deadline:  # let stragglers land, not counted
        for sock, _ in poller.poll(100):
            for slot, _answer in group.on_readable(sock):
                in_flight.pop(slot, None)
    for slot in list(in_flight):
        group.abandon(slot)


def idle_cpu_rate(path: LookupPath, seconds: float) -> float:
    """Server CPU ns per second while nobody asks anything (gossip, timers)."""
    pids = path.server_pids()
    c0 = cpu_ns(pids)[0]
    time.sleep(seconds)
    return (cpu_ns(pids)[0] - c0) / seconds


SHARED_CASES = ("hit_first", "hit_last", "miss")
"""The cases every path answers with the same prompts: the throughput mix uses only these."""


def measure_member_count(
    paths: Sequence[LookupPath], holdings: Holdings, args: argparse.Namespace, seed: int
) -> dict:
    """All paths, all cases, all prompt sizes and concurrencies, interleaved in rounds.

    A path that cannot be set up at this N is recorded with its error and left out of it.
    """
    setup: dict[str, dict] = {}
    setup_errors: dict[str, str] = {}
    live: list[LookupPath] = []
    for p in paths:
        try:
            setup[p.name] = p.setup(holdings)
            live.append(p)
        except Exception as exc:
            setup_errors[p.name] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"[bench_lookup] N={holdings.members}: {p.name} not measured: {exc}")
            p.teardown()
    paths = live
    idle = {p.name: idle_cpu_rate(p, args.idle_s) for p in paths}
    cases = {
        (p.name, chunks): p.cases(holdings, chunks, seed) for p in paths for chunks in args.chunks
    }
    mixes = {
        p.name: [
            prompt
            for case in SHARED_CASES
            for prompt in cases[(p.name, THROUGHPUT_PROMPT_CHUNKS)][case]
        ]
        for p in paths
    }
    latency_groups = {p.name: p.requesters(1) for p in paths}
    load_groups = {
        (p.name, c): p.requesters(c, background=c > 1) for p in paths for c in args.concurrency
    }
    cells: dict[tuple[str, str, int], Cell] = {}
    tput: dict[tuple[str, int], ThroughputCell] = {}
    rng = random.Random(seed)
    try:
        for p in paths:  # open and warm every connection once
            warm = cases[(p.name, THROUGHPUT_PROMPT_CHUNKS)]["hit_first"][0]
            run_one(latency_groups[p.name], 0, warm, LOOKUP_DEADLINE_S)
            for c in args.concurrency:
                throughput_block(p, load_groups[(p.name, c)], c, [warm], 0.05, ThroughputCell())
        for round_index in range(args.rounds):
            items: list[tuple] = [
                ("latency", p, case, chunks)
                for p in paths
                for chunks in args.chunks
                for case in cases[(p.name, chunks)]
            ]
            items += [("throughput", p, c) for p in paths for c in args.concurrency]
            rng.shuffle(items)
            for item in items:
                if item[0] == "latency":
                    _, p, case, chunks = item
                    cell = cells.setdefault((p.name, case, chunks), Cell())
                    prompts = cases[(p.name, chunks)][case]
                    cell.servers_asked = statistics.fmean(map(p.servers_asked, prompts))
                    latency_block(p, latency_groups[p.name], prompts, args.block, cell)
                else:
                    _, p, c = item
                    tcell = tput.setdefault((p.name, c), ThroughputCell())
                    group = load_groups[(p.name, c)]
                    throughput_block(p, group, c, mixes[p.name], args.throughput_s, tcell)
            print(f"[bench_lookup] N={holdings.members} round {round_index + 1}/{args.rounds}")
        aggregate = aggregate_rounds(paths, mixes, args, rng)
    finally:
        for group in [*latency_groups.values(), *load_groups.values()]:
            group.close()
    return {
        "members": holdings.members,
        "setup": setup,
        "setup_errors": setup_errors,
        "idle_server_cpu_ms_per_s": {k: v / 1e6 for k, v in idle.items()},
        "latency": [
            {"path": name, "case": case, "chunks": chunks, **cell.summary(idle[name])}
            for (name, case, chunks), cell in sorted(cells.items())
        ],
        "throughput": [
            {"path": name, "concurrency": c, **cell.summary(idle[name])}
            for (name, c), cell in sorted(tput.items())
        ],
        "aggregate": aggregate,
    }


def aggregate_rounds(
    paths: Sequence[LookupPath], mixes: dict[str, list[Prompt]], args, rng: random.Random
) -> list[dict]:
    """Aggregate load (`tools.bench.lookup.aggregate`), the paths that have it alternating in
    shuffled order, ``aggregate_rounds`` blocks each; per path, every block and the medians."""
    loaded = [p for p in paths if hasattr(p, "aggregate")]
    blocks: dict[str, list[dict]] = {p.name: [] for p in loaded}
    for _ in range(args.aggregate_rounds):
        for p in rng.sample(loaded, len(loaded)):
            try:
                blocks[p.name].append(p.aggregate(mixes[p.name], args.aggregate_s,
                                                  AGGREGATE_IN_FLIGHT))  # fmt: skip
            except Exception as exc:  # recorded, and the other path still measured
                blocks[p.name].append({"error": f"{type(exc).__name__}: {exc}"[:300]})
    out = []
    for name, runs in blocks.items():
        good = [b for b in runs if "error" not in b]
        out.append(
            {
                "path": name,
                "in_flight_per_asker": AGGREGATE_IN_FLIGHT,
                "blocks": runs,
                "lookups_per_s_median": statistics.median(b["lookups_per_s"] for b in good)
                if good
                else None,
                "cpu_us_per_lookup_median": statistics.median(
                    b["cpu_us_per_lookup_client_plus_server"] for b in good
                )
                if good
                else None,
                "wrong": sum(b["wrong"] for b in good),
            }
        )
    return out
