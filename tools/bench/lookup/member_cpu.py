"""Where a meshkv member's CPU goes, thread by thread: idle (gossip, timers) and per lookup.

Real members (`MeshkvPath`: the asker in this process, N-1 member processes, the shim as seed)
are started once per N; every thread's CPU is read from /proc schedstat and summed by thread
name (``gossip-…``, ``meshkv-data``, ``meshkv-requests``, ``ZMQbg/IO/0``…).

- idle: ms of CPU per second per member process while nobody asks anything, median of
  ``--windows`` windows of ``--idle-s`` each, and by thread.
- lookups (at the smallest N given): ``--lookups`` lookups of 32-chunk prompts whose first home
  is the other member, one at a time (`MeshNode.lookup`) and ``--in-flight`` at a time
  (`MeshNode.lookup_async`); µs of CPU per lookup of the answering member's threads (net of
  its idle rate) and of this process's threads (the asker), median of ``--windows`` blocks.
- ``--rotation`` (at the largest N given): the same lookups, one at a time, in interleaved
  blocks of two kinds: prompts whose first home is one member ("one home"), and as many prompts
  spread one by one over every member that is some prompt's first home ("spread"). Each lookup
  asks one member either way; what differs is whether the member asked is the one asked last
  time (its code and data still in the caches) or one that has not run for many lookups. µs of
  CPU per lookup of the members (net of idle: at N = 64 the idle estimate's error reached
  ~190 µs per lookup in the gossip threads alone), of their lookup-port threads alone (which
  do nothing else, so need no idle estimate; py-spy names them), and of the asker, and wall
  µs, median of ``--windows`` blocks each.
- ``--profile``: then ``--profile-s`` more of each lookup mode under ``py-spy record`` (only
  threads on the CPU are sampled), of the answering member and of this process; the samples by
  thread (its first meshkv frame) and by function (self time) go into the JSON.

    python -m tools.bench.lookup.member_cpu --members 2 8 32 --out bench-results/member_cpu.json
    python -m tools.bench.lookup.member_cpu --members 64 --rotation --windows 5 --lookups 1000
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import zmq

from tools.bench.lookup.meshkv_path import MeshkvPath
from tools.bench.lookup.settings import LOOKUP_DEADLINE_S
from tools.bench.lookup.workload import CHAIN_CHUNKS, lmcache_cases, make_holdings, make_prompt

LOOKUP_CHUNKS = 32
KEYS_PER_MEMBER = 512
LOOKUP_PORT_THREAD = "meshkv-lookup-port"
SETTLE_S = 3.0
"""Wait after the ring converged before measuring idle (joins' gossip dies down)."""


_NAMES: dict[int, str] = {}
"""Thread id -> Python thread name, of every process measured (py-spy dump, once per thread)."""


def thread_cpu_ns(pids: list[int]) -> Counter[str]:
    """CPU ns of every thread of ``pids`` so far, summed by thread name (the Python name where
    py-spy tells it, else the OS one: ``ZMQbg/IO/0``)."""
    out: Counter[str] = Counter()
    for pid in pids:
        tasks: list[str] = []
        with contextlib.suppress(OSError):
            tasks = os.listdir(f"/proc/{pid}/task")
        if any(int(t) not in _NAMES for t in tasks):
            _learn_names(pid)
        for tid in tasks:
            with contextlib.suppress(OSError, ValueError, IndexError):
                base = f"/proc/{pid}/task/{tid}"
                name = _NAMES.get(int(tid)) or Path(f"{base}/comm").read_text().strip()
                out[name] += int(Path(f"{base}/schedstat").read_text().split()[0])
    return out


def _learn_names(pid: int) -> None:
    if pid == os.getpid():
        _NAMES.update({t.native_id: _short(t.name) for t in threading.enumerate()})
        return
    spy_bin = Path(sys.executable).parent / "py-spy"
    if not spy_bin.exists():  # (not a dependency: without it, threads keep their OS names)
        return
    dump = subprocess.run(
        [str(spy_bin), "dump", "-p", str(pid)],
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    for match in re.finditer(r'^Thread (\d+) \(\w+\): "(.*)"$', dump, re.MULTILINE):
        _NAMES[int(match[1])] = _short(match[2])


def _short(name: str) -> str:
    """A thread's name without its member's name (``gossip-bench-mesh-001/0`` -> ``gossip``)."""
    return "gossip" if name.startswith("gossip-") else name


def idle(path: MeshkvPath, members: int, windows: int, seconds: float) -> dict:
    pids = path.server_pids()[1:]  # the member processes (not the shim)
    rates: list[float] = []
    by_thread: list[Counter[str]] = []
    for _ in range(windows):
        c0 = thread_cpu_ns(pids)
        time.sleep(seconds)  # the measured window: nothing to poll for
        delta = thread_cpu_ns(pids)
        delta.subtract(c0)
        rates.append(sum(delta.values()) / seconds / len(pids) / 1e6)
        by_thread.append(delta)
    mid = by_thread[rates.index(statistics.median_low(rates))]
    return {
        "members": members,
        "ms_per_s_per_member_median": statistics.median(rates),
        "ms_per_s_per_member_windows": rates,
        "shim_excluded": True,
        "by_thread_ms_per_s_per_member": {
            k: v / seconds / len(pids) / 1e6 for k, v in mid.most_common() if v > 0
        },
    }


class _Sides:
    """The answering members' threads and this process's (the asker's), with their idle CPU
    rates read once at the start, so each block is measured net of idle."""

    def __init__(self, member_pids: list[int]) -> None:
        self.member_pids, self.me = member_pids, [os.getpid()]
        server0, client0 = thread_cpu_ns(self.member_pids), thread_cpu_ns(self.me)
        time.sleep(1.0)  # the idle rates, per second (nothing to poll for)
        self.server_idle = _minus(thread_cpu_ns(self.member_pids), server0)
        self.client_idle = _minus(thread_cpu_ns(self.me), client0)

    def block(
        self, node, prompts, count: int, in_flight: int
    ) -> tuple[int, float, Counter[str], Counter[str]]:
        """One `run_block`: its wrong answers, its wall seconds, and the CPU ns by thread of
        the members and of the asker, each net of its idle rate."""
        s0, c0, t0 = thread_cpu_ns(self.member_pids), thread_cpu_ns(self.me), time.monotonic()
        wrong = run_block(node, prompts, count, in_flight)
        wall_s = time.monotonic() - t0
        server = _minus(thread_cpu_ns(self.member_pids), s0, self.server_idle, wall_s)
        client = _minus(thread_cpu_ns(self.me), c0, self.client_idle, wall_s)
        return wrong, wall_s, server, client


def lookups(path: MeshkvPath, holdings, args) -> dict:
    node = path.asker
    cases = lmcache_cases(holdings, LOOKUP_CHUNKS, seed=1)
    prompts = [p for p in cases["hit_first"] + cases["hit_last"] if path.servers_asked(p) == 1]
    member_pids = path.server_pids()[1:]
    node.lookup(prompts[0].keys, timeout_s=LOOKUP_DEADLINE_S)  # warm the connection
    out: dict = {"prompt_chunks": LOOKUP_CHUNKS, "prompts": len(prompts)}
    sides = _Sides(member_pids)
    for mode in ("one_at_a_time", "in_flight"):
        blocks = []
        for _ in range(args.windows):
            in_flight = 0 if mode == "one_at_a_time" else args.in_flight
            wrong, wall_s, server, client = sides.block(node, prompts, args.lookups, in_flight)
            blocks.append(
                {
                    "wrong": wrong,
                    "lookups_per_s": args.lookups / wall_s,
                    "server_us": sum(server.values()) / args.lookups / 1e3,
                    "client_us": sum(client.values()) / args.lookups / 1e3,
                    "server_by_thread_us": {
                        k: v / args.lookups / 1e3 for k, v in server.most_common() if v > 0
                    },
                    "client_by_thread_us": {
                        k: v / args.lookups / 1e3 for k, v in client.most_common() if v > 0
                    },
                }
            )
        mid = sorted(blocks, key=lambda b: b["server_us"] + b["client_us"])[len(blocks) // 2]
        out[mode] = {
            "server_us_median": statistics.median(b["server_us"] for b in blocks),
            "client_us_median": statistics.median(b["client_us"] for b in blocks),
            "lookups_per_s_median": statistics.median(b["lookups_per_s"] for b in blocks),
            "wrong": sum(b["wrong"] for b in blocks),
            "median_block": mid,
        }
    if args.profile:
        out["profiles"] = {
            f"{mode}_{side}": profile
            for mode, in_flight in (("one_at_a_time", 0), ("in_flight", args.in_flight))
            for side, profile in spy(node, prompts, in_flight, member_pids[0], args).items()
        }
    return out


def rotation(path: MeshkvPath, holdings, args) -> dict:
    """Lookups asked of one member against the same lookups spread over many (see the module
    docstring, ``--rotation``)."""
    by_home: dict[str, list] = {}
    for member_keys in holdings.member_keys:  # every chain head of every member: many homes
        for start in range(0, len(member_keys) - LOOKUP_CHUNKS + 1, CHAIN_CHUNKS):
            prompt = make_prompt(member_keys[start : start + LOOKUP_CHUNKS], LOOKUP_CHUNKS)
            if path.servers_asked(prompt) == 1:
                by_home.setdefault(path.first_home(prompt), []).append(prompt)
    busiest = max(by_home.values(), key=len)
    spread = [p for group in itertools.zip_longest(*by_home.values()) for p in group if p]
    kinds = {"one_home": busiest, "spread": spread[: max(len(busiest), len(by_home))]}
    node, member_pids = path.asker, path.server_pids()[1:]
    node.lookup(busiest[0].keys, timeout_s=LOOKUP_DEADLINE_S)
    sides = _Sides(member_pids)
    blocks: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for _ in range(args.windows):
        for kind, prompts in kinds.items():
            wrong, wall_s, server, client = sides.block(node, prompts, args.lookups, 0)
            blocks[kind].append(
                {
                    "wrong": wrong,
                    "member_us": sum(server.values()) / args.lookups / 1e3,
                    "lookup_port_us": server[LOOKUP_PORT_THREAD] / args.lookups / 1e3,
                    "asker_us": sum(client.values()) / args.lookups / 1e3,
                    "wall_us": wall_s / args.lookups * 1e6,
                }
            )
    out: dict = {"members": len(member_pids) + 1, "prompt_chunks": LOOKUP_CHUNKS}
    for kind, prompts in kinds.items():
        homes = {path.first_home(p) for p in prompts}
        out[kind] = {
            "homes": len(homes),
            "prompts": len(prompts),
            "wrong": sum(b["wrong"] for b in blocks[kind]),
            **{
                f"{field}_median": statistics.median(b[field] for b in blocks[kind])
                for field in ("member_us", "lookup_port_us", "asker_us", "wall_us")
            },
            "blocks": blocks[kind],
        }
    return out


def spy(node, prompts, in_flight: int, member_pid: int, args) -> dict[str, dict]:
    """Samples the member and this process with py-spy while lookups run for ``profile_s``."""
    spy_bin = Path(sys.executable).parent / "py-spy"
    outs = {side: Path(tempfile.mkdtemp()) / f"{side}.txt" for side in ("server", "client")}
    pids = {"server": member_pid, "client": os.getpid()}
    spies = [
        subprocess.Popen(
            [
                str(spy_bin),
                "record",
                "-p",
                str(pids[side]),
                "-r",
                "1000",
                "-d",
                str(int(args.profile_s)),
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for side, out in outs.items()
    ]
    end_s = time.monotonic() + args.profile_s + 1.0
    while time.monotonic() < end_s:
        run_block(node, prompts, 200, in_flight)
    for process in spies:
        process.wait(args.profile_s + 30)
    return {side: summarize_samples(out.read_text()) for side, out in outs.items()}


def summarize_samples(raw: str, top: int = 25) -> dict:
    """py-spy raw stacks: sample counts by thread (first meshkv frame) and by leaf function."""
    by_thread: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        entry = next((f for f in frames if "meshkv/" in f or "tools/" in f), frames[-1])
        by_thread[entry.split(" (")[0] + " " + entry.split("/")[-1].split(":")[0]] += int(count)
        by_leaf[frames[-1]] += int(count)
    total = sum(by_thread.values())
    return {
        "samples": total,
        "by_thread": {k: v / total for k, v in by_thread.most_common(top)},
        "by_leaf": {k: v / total for k, v in by_leaf.most_common(top)},
    }


def _minus(
    now: Counter[str], then: Counter[str], idle: Counter[str] | None = None, wall_s: float = 0.0
) -> Counter[str]:
    """CPU ns by thread between two readings, less ``idle`` ns/s over ``wall_s``."""
    out = Counter(now)
    out.subtract(then)
    for name, ns in (idle or {}).items():
        out[name] -= ns * wall_s
    return out


def run_block(node, prompts, count: int, in_flight: int) -> int:
    """``count`` lookups, one at a time (``in_flight`` 0) or that many in flight; wrong answers."""
    if not in_flight:
        return sum(
            node.lookup(prompts[i % len(prompts)].keys, timeout_s=LOOKUP_DEADLINE_S)
            != prompts[i % len(prompts)].expected_hits
            for i in range(count)
        )
    lock = threading.Lock()
    finished = threading.Condition(lock)
    state = {"started": 0, "done": 0, "wrong": 0}

    def start() -> None:
        with lock:
            if state["started"] >= count:
                return
            i = state["started"]
            state["started"] += 1
        prompt = prompts[i % len(prompts)]
        node.lookup_async(prompt.keys, lambda hits: answered(prompt, hits), LOOKUP_DEADLINE_S)

    def answered(prompt, hits: int) -> None:
        with lock:
            state["done"] += 1
            state["wrong"] += hits != prompt.expected_hits
            finished.notify_all()
        start()

    for _ in range(in_flight):
        start()
    with lock:
        finished.wait_for(lambda: state["done"] >= count, timeout=count * LOOKUP_DEADLINE_S)
    return state["wrong"] + count - state["done"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--rotation", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("bench-results/member_cpu.json"))
    args = parser.parse_args()
    context = zmq.Context()
    result: dict = {"loadavg_start": os.getloadavg(), "idle": [], "lookups": None}
    with tempfile.TemporaryDirectory(prefix="member-cpu-") as logs:
        for n in sorted(args.members):
            path = MeshkvPath(context, Path(logs))
            holdings = make_holdings(n, KEYS_PER_MEMBER, seed=n)
            try:
                path.setup(holdings)
                time.sleep(SETTLE_S)  # let the joins' gossip die down (nothing to poll for)
                result["idle"].append(idle(path, n, args.windows, args.idle_s))
                print(json.dumps(result["idle"][-1]), flush=True)
                if result["lookups"] is None:
                    result["lookups"] = lookups(path, holdings, args)
                    print(json.dumps(result["lookups"], indent=1), flush=True)
                if args.rotation and n == max(args.members):
                    result["rotation"] = rotation(path, holdings, args)
                    print(json.dumps(result["rotation"], indent=1), flush=True)
            finally:
                path.teardown()
    result["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
